//! The `tasks` table: every accepted task from submit to completion.

use serde_json::Value;

use super::{DecisionRepo, DecisionRow, Reader, StoreError, Tx};
use crate::domain::{Origin, Outcome, TaskId, TaskStatus, TiUuid, Usage};

pub(super) const INSERT: &str =
    "INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid,
                        predicted_ms, predicted_error_ms, submit_time, origin)
     VALUES (?1, ?2, ?3, ?4, ?9, ?5, ?6, ?7, ?8, ?10)
     ON CONFLICT (task_id) DO NOTHING";
pub(super) const MARK_SCHEDULED: &str = "UPDATE tasks SET status = 'scheduled', dispatch_time = ?1
     WHERE task_id = ?2 AND status = 'queued' AND ti_uuid = ?3";
pub(super) const COMPLETE: &str =
    "UPDATE tasks SET status = 'completed', result = ?1, outcome = ?2,
                      execution_time_ms = ?3, completion_time = ?4, result_ti = ?6,
                      prompt_tokens = ?7, completion_tokens = ?8, ttft_ms = ?9
     WHERE task_id = ?5 AND status <> 'completed'";
/// What the caller of [`TaskRepo::complete`] needs of the task, read after COMPLETE in
/// the same transaction. Not COMPLETE's RETURNING clause: SQLite runs one through a
/// temporary table at every execution, and the completion is the writer's costliest
/// statement.
pub(super) const COMPLETED: &str =
    "SELECT model_name, metadata, submit_time, predicted_ms FROM tasks WHERE task_id = ?1";
pub(super) const REASSIGN: &str =
    "UPDATE tasks SET status = ?5, ti_uuid = ?1, dispatch_time = NULL,
                      predicted_ms = ?2, predicted_error_ms = ?3
     WHERE task_id = ?4 AND status <> 'completed'";
pub(super) const EXPIRE_RESULTS: &str = "UPDATE tasks SET result = NULL, result_expired = 1
     WHERE task_id IN (SELECT task_id FROM tasks
                       WHERE status = 'completed' AND completion_time < ?1
                         AND result_expired = 0
                       LIMIT ?2)";
pub(super) const PURGE_COMPLETED: &str = "DELETE FROM tasks
     WHERE task_id IN (SELECT task_id FROM tasks
                       WHERE status = 'completed' AND completion_time < ?1
                       LIMIT ?2)";

/// Repository of tasks.
pub struct TaskRepo;

/// A task about to be committed by a submit.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id.
    pub task_id: TaskId,
    /// The model it asks for.
    pub model_name: String,
    /// The client's input, as JSON text.
    pub task_input: String,
    /// The client's metadata, as JSON text (`{}` when none was given).
    pub metadata: String,
    /// The TI the strategy chose; `None` while no TI of the model is usable.
    pub ti_uuid: Option<TiUuid>,
    /// `queued`, or `scheduled` when bound to an OpenAI-compatible TI (whose queue the
    /// scheduler keeps itself).
    pub status: TaskStatus,
    /// Predicted execution time on that TI, ms.
    pub predicted_ms: f64,
    /// Error of that prediction, ms.
    pub predicted_error_ms: f64,
    /// Unix seconds.
    pub submit_time: f64,
    /// How it came in.
    pub origin: Origin,
}

/// A task as `/task/query` shows it.
#[derive(Debug, Clone)]
pub struct StoredTask {
    /// Its id.
    pub task_id: TaskId,
    /// The model it asked for.
    pub model_name: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// The TI currently chosen for it, if any.
    pub ti_uuid: Option<TiUuid>,
    /// Unix seconds.
    pub submit_time: f64,
    /// Unix seconds, once completed.
    pub completion_time: Option<f64>,
    /// As reported by the TI, ms.
    pub execution_time_ms: Option<f64>,
    /// The result (or `{"error": ...}`), until it expires.
    pub result: Option<Value>,
    /// How it ended, once completed.
    pub outcome: Option<Outcome>,
    /// True once the cleanup job cleared the result.
    pub result_expired: bool,
    /// Prompt tokens an OpenAI-compatible TI reported.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens an OpenAI-compatible TI reported.
    pub completion_tokens: Option<i64>,
    /// The TI whose result was stored, once completed (after a re-route, the first TI to
    /// answer, which may be the one the task was moved away from).
    pub result_ti: Option<TiUuid>,
    /// A streamed front-door request's time to its first text chunk, ms.
    pub ttft_ms: Option<f64>,
}

/// An unfinished task, with what is needed to dispatch it again and rebuild the queue
/// estimate of its TI.
#[derive(Debug, Clone)]
pub struct UnfinishedTask {
    /// Its id.
    pub task_id: TaskId,
    /// The model it asks for.
    pub model_name: String,
    /// JSON text.
    pub task_input: String,
    /// JSON text.
    pub metadata: String,
    /// `queued` or `scheduled`.
    pub status: TaskStatus,
    /// The TI currently chosen for it, if any.
    pub ti_uuid: Option<TiUuid>,
    /// Prediction on that TI, ms.
    pub predicted_ms: f64,
    /// Its error, ms.
    pub predicted_error_ms: f64,
    /// When that TI accepted it (Unix seconds), if it did.
    pub dispatch_time: Option<f64>,
    /// How it came in.
    pub origin: Origin,
}

/// A task as read from the table by [`TaskRepo::find`].
struct TaskRow {
    task_id: String,
    model_name: String,
    status: String,
    ti_uuid: Option<String>,
    submit_time: f64,
    completion_time: Option<f64>,
    execution_time_ms: Option<f64>,
    result: Option<String>,
    outcome: Option<String>,
    result_expired: bool,
    result_ti: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    ttft_ms: Option<f64>,
}

/// An unfinished task as read from the table.
struct UnfinishedRow {
    task_id: String,
    model_name: String,
    task_input: String,
    metadata: String,
    status: String,
    ti_uuid: Option<String>,
    predicted_ms: f64,
    predicted_error_ms: f64,
    dispatch_time: Option<f64>,
    origin: String,
}

impl TryFrom<UnfinishedRow> for UnfinishedTask {
    type Error = StoreError;

    fn try_from(row: UnfinishedRow) -> Result<Self, StoreError> {
        Ok(Self {
            task_id: TaskId::from_stored(row.task_id),
            model_name: row.model_name,
            task_input: row.task_input,
            metadata: row.metadata,
            status: parse_status(&row.status)?,
            ti_uuid: parse_ti(row.ti_uuid)?,
            predicted_ms: row.predicted_ms,
            predicted_error_ms: row.predicted_error_ms,
            dispatch_time: row.dispatch_time,
            origin: Origin::from_stored(&row.origin)
                .ok_or_else(|| StoreError::Corrupt(format!("bad origin {:?}", row.origin)))?,
        })
    }
}

/// A successful execution, as `ti-scheduler retrain` learns from it.
#[derive(Debug, Clone)]
pub struct Execution {
    /// The model.
    pub model_name: String,
    /// The hardware of the TI it ran on, if known.
    pub hardware: Option<String>,
    /// The task's metadata, JSON text.
    pub metadata: String,
    /// ms, as reported by the TI.
    pub execution_time_ms: f64,
}

/// What a TI reported for a finished task.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The result, or `{"error": ...}`, as JSON text (serialized before it reaches the
    /// writer, whose thread only binds and steps).
    pub result: String,
    /// Success or failure.
    pub outcome: Outcome,
    /// ms, as measured by the TI.
    pub execution_time_ms: f64,
    /// Unix seconds.
    pub completion_time: f64,
    /// Token usage an OpenAI-compatible TI reported.
    pub usage: Option<Usage>,
    /// The TI whose outcome this is (after a re-route, possibly not the current one);
    /// `None` for a task failed by the scheduler before any TI answered.
    pub result_ti: Option<TiUuid>,
    /// A streamed front-door request's time to its first text chunk, ms.
    pub ttft_ms: Option<f64>,
}

/// A task whose result was just stored, as the completion path needs it.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Its model.
    pub model_name: String,
    /// Its metadata, as JSON text.
    pub metadata: String,
    /// When it was submitted, Unix seconds.
    pub submit_time: f64,
    /// The execution time predicted on its current TI, ms.
    pub predicted_ms: f64,
}

pub(super) fn parse_ti(raw: Option<String>) -> Result<Option<TiUuid>, StoreError> {
    raw.map(|s| {
        s.parse()
            .map_err(|_| StoreError::Corrupt(format!("bad ti_uuid {s:?}")))
    })
    .transpose()
}

pub(super) fn parse_status(raw: &str) -> Result<TaskStatus, StoreError> {
    TaskStatus::from_stored(raw).ok_or_else(|| StoreError::Corrupt(format!("bad status {raw:?}")))
}

impl TaskRepo {
    /// Reads from the table: proves the database is open and migrated.
    pub async fn probe(read: &Reader) -> Result<(), StoreError> {
        match read {
            Reader::Sqlite(pool) => {
                sqlx::query_scalar!("SELECT COUNT(*) FROM (SELECT 1 FROM tasks LIMIT 1)")
                    .fetch_one(pool)
                    .await?;
            }
            Reader::Postgres(pool) => {
                sqlx::query_scalar!(
                    "/* pg */ SELECT COUNT(*) FROM (SELECT 1 FROM tasks LIMIT 1) AS one"
                )
                .fetch_one(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// The task with this id, if it exists.
    pub async fn find(read: &Reader, task_id: &TaskId) -> Result<Option<StoredTask>, StoreError> {
        let id = task_id.as_str();
        if !super::storable(id) {
            return Ok(None);
        }
        let row = match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    TaskRow,
                    r#"SELECT task_id, model_name, status, ti_uuid, submit_time, completion_time,
                              execution_time_ms, result, outcome,
                              result_expired AS "result_expired: bool",
                              result_ti, prompt_tokens, completion_tokens, ttft_ms
                       FROM tasks WHERE task_id = ?"#,
                    id
                )
                .fetch_optional(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    TaskRow,
                    r#"/* pg */ SELECT task_id, model_name, status, ti_uuid, submit_time, completion_time,
                              execution_time_ms, result, outcome, result_expired,
                              result_ti, prompt_tokens, completion_tokens, ttft_ms
                       FROM tasks WHERE task_id = $1"#,
                    id
                )
                .fetch_optional(pool)
                .await?
            }
        };
        let Some(row) = row else { return Ok(None) };
        let result = row
            .result
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("result of {id}: {e}")))?;
        let outcome = match row.outcome.as_deref() {
            None => None,
            Some("succeeded") => Some(Outcome::Succeeded),
            Some("failed") => Some(Outcome::Failed),
            Some(other) => return Err(StoreError::Corrupt(format!("bad outcome {other:?}"))),
        };
        Ok(Some(StoredTask {
            task_id: TaskId::from_stored(row.task_id),
            model_name: row.model_name,
            status: parse_status(&row.status)?,
            ti_uuid: parse_ti(row.ti_uuid)?,
            submit_time: row.submit_time,
            completion_time: row.completion_time,
            execution_time_ms: row.execution_time_ms,
            result,
            outcome,
            result_expired: row.result_expired,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            result_ti: parse_ti(row.result_ti)?,
            ttft_ms: row.ttft_ms,
        }))
    }

    /// Inserts the tasks of one submit with their decisions (if a TI was chosen). Says,
    /// per task, whether it was inserted (false: the id existed, and nothing was written).
    pub fn insert_submit(
        tx: &mut Tx<'_>,
        rows: &[(NewTask, Option<DecisionRow>)],
    ) -> Result<Vec<bool>, StoreError> {
        rows.iter()
            .map(|(t, d)| match (&mut *tx, d) {
                // One round trip for both rows instead of two.
                (Tx::Postgres(pg), Some(d)) => Self::insert_with_decision(pg, t, d),
                (tx, d) => {
                    let new = Self::insert(tx, t)?;
                    if let (true, Some(d)) = (new, d) {
                        DecisionRepo::insert(tx, d)?;
                    }
                    Ok(new)
                }
            })
            .collect()
    }

    /// PostgreSQL: inserts a task and, if it was new, its decision, in one statement.
    fn insert_with_decision(
        pg: &mut super::PgTx<'_>,
        t: &NewTask,
        row: &DecisionRow,
    ) -> Result<bool, StoreError> {
        let d = &row.decision;
        let inserted = pg
            .rt
            .block_on(
                sqlx::query!(
                    "/* pg */ WITH task AS (
                         INSERT INTO tasks (task_id, model_name, task_input, metadata, status,
                                            ti_uuid, predicted_ms, predicted_error_ms,
                                            submit_time, origin)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (task_id) DO NOTHING
                         RETURNING task_id)
                     INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode,
                                            predicted_ms, predicted_error_ms, prediction_source,
                                            lookup_fallback, chosen_ti, candidates)
                     SELECT task_id, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20 FROM task",
                    t.task_id.as_str(),
                    t.model_name,
                    t.task_input,
                    t.metadata,
                    t.status.as_str(),
                    t.ti_uuid.map(|u| u.to_string()),
                    t.predicted_ms,
                    t.predicted_error_ms,
                    t.submit_time,
                    t.origin.as_str(),
                    d.decided_at,
                    d.reason.as_str(),
                    d.strategy,
                    d.predict_mode,
                    d.predicted_ms,
                    d.predicted_error_ms,
                    d.prediction_source,
                    d.lookup_fallback,
                    d.chosen_ti.to_string(),
                    row.candidates
                )
                .execute(&mut *pg.conn),
            )?
            .rows_affected();
        Ok(inserted == 1)
    }

    /// Inserts one task; false if its id existed (nothing was written).
    fn insert(tx: &mut Tx<'_>, t: &NewTask) -> Result<bool, StoreError> {
        let ti_uuid = t.ti_uuid.map(|u| u.to_string());
        let inserted = match tx {
            Tx::Sqlite(conn) => conn.prepare_cached(INSERT)?.execute(rusqlite::params![
                t.task_id.as_str(),
                t.model_name,
                t.task_input,
                t.metadata,
                ti_uuid,
                t.predicted_ms,
                t.predicted_error_ms,
                t.submit_time,
                t.status.as_str(),
                t.origin.as_str(),
            ])? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid,
                                            predicted_ms, predicted_error_ms, submit_time, origin)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (task_id) DO NOTHING",
                        t.task_id.as_str(),
                        t.model_name,
                        t.task_input,
                        t.metadata,
                        t.status.as_str(),
                        ti_uuid,
                        t.predicted_ms,
                        t.predicted_error_ms,
                        t.submit_time,
                        t.origin.as_str()
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        };
        Ok(inserted == 1)
    }

    /// Marks a task `scheduled` at `at`, once `ti` accepted it. Returns false if it was
    /// no longer queued for that TI (completed or re-routed meanwhile).
    pub fn mark_scheduled(
        tx: &mut Tx<'_>,
        task_id: &TaskId,
        ti: TiUuid,
        at: f64,
    ) -> Result<bool, StoreError> {
        let changed = match tx {
            Tx::Sqlite(conn) => conn.prepare_cached(MARK_SCHEDULED)?.execute((
                at,
                task_id.as_str(),
                ti.to_string(),
            ))? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ UPDATE tasks SET status = 'scheduled', dispatch_time = $1
                         WHERE task_id = $2 AND status = 'queued' AND ti_uuid = $3",
                        at,
                        task_id.as_str(),
                        ti.to_string()
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        };
        Ok(changed == 1)
    }

    /// Stores a task's result. Returns what the completion path needs of the task if it
    /// was stored, `None` if the task is unknown or already completed (the first result
    /// wins).
    pub fn complete(
        tx: &mut Tx<'_>,
        task_id: &TaskId,
        c: &Completion,
    ) -> Result<Option<Completed>, StoreError> {
        let conn = match tx {
            Tx::Sqlite(conn) => conn,
            Tx::Postgres(pg) => {
                return Ok(pg.rt.block_on(
                    sqlx::query_as!(
                        Completed,
                        "/* pg */ UPDATE tasks SET status = 'completed', result = $1, outcome = $2,
                                          execution_time_ms = $3, completion_time = $4,
                                          result_ti = $6, prompt_tokens = $7,
                                          completion_tokens = $8, ttft_ms = $9
                         WHERE task_id = $5 AND status <> 'completed'
                         RETURNING model_name, metadata, submit_time, predicted_ms",
                        c.result,
                        c.outcome.as_str(),
                        c.execution_time_ms,
                        c.completion_time,
                        task_id.as_str(),
                        c.result_ti.map(|t| t.to_string()),
                        c.usage.and_then(|u| u.prompt_tokens),
                        c.usage.and_then(|u| u.completion_tokens),
                        c.ttft_ms
                    )
                    .fetch_optional(&mut *pg.conn),
                )?);
            }
        };
        let changed = conn.prepare_cached(COMPLETE)?.execute((
            &c.result,
            c.outcome.as_str(),
            c.execution_time_ms,
            c.completion_time,
            task_id.as_str(),
            c.result_ti.map(|t| t.to_string()),
            c.usage.and_then(|u| u.prompt_tokens),
            c.usage.and_then(|u| u.completion_tokens),
            c.ttft_ms,
        ))?;
        if changed == 0 {
            return Ok(None);
        }
        let stored = conn
            .prepare_cached(COMPLETED)?
            .query_row([task_id.as_str()], |r| {
                Ok(Completed {
                    model_name: r.get(0)?,
                    metadata: r.get(1)?,
                    submit_time: r.get(2)?,
                    predicted_ms: r.get(3)?,
                })
            })?;
        Ok(Some(stored))
    }

    /// Moves an unfinished task to another TI (or to none), back in `status` (`queued`,
    /// or `scheduled` for an OpenAI-compatible TI). Returns false if it had completed
    /// meanwhile.
    pub fn reassign(
        tx: &mut Tx<'_>,
        task_id: &TaskId,
        ti: Option<TiUuid>,
        status: TaskStatus,
        predicted_ms: f64,
        predicted_error_ms: f64,
    ) -> Result<bool, StoreError> {
        let ti = ti.map(|t| t.to_string());
        let changed = match tx {
            Tx::Sqlite(conn) => conn.prepare_cached(REASSIGN)?.execute((
                ti,
                predicted_ms,
                predicted_error_ms,
                task_id.as_str(),
                status.as_str(),
            ))? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ UPDATE tasks SET status = $5, ti_uuid = $1, dispatch_time = NULL,
                                          predicted_ms = $2, predicted_error_ms = $3
                         WHERE task_id = $4 AND status <> 'completed'",
                        ti,
                        predicted_ms,
                        predicted_error_ms,
                        task_id.as_str(),
                        status.as_str()
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        };
        Ok(changed == 1)
    }

    /// Every successful execution, oldest first, with the hardware it ran on: the
    /// training data of `ti-scheduler retrain`.
    pub async fn executions(read: &Reader) -> Result<Vec<Execution>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    Execution,
                    r#"SELECT t.model_name, ti.hardware, t.metadata,
                              t.execution_time_ms AS "execution_time_ms!: f64"
                       FROM tasks t LEFT JOIN task_instances ti ON ti.ti_uuid = t.ti_uuid
                       WHERE t.outcome = 'succeeded' AND t.execution_time_ms IS NOT NULL
                       ORDER BY t.completion_time"#
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    Execution,
                    r#"/* pg */ SELECT t.model_name, ti.hardware AS "hardware?", t.metadata,
                              t.execution_time_ms AS "execution_time_ms!"
                       FROM tasks t LEFT JOIN task_instances ti ON ti.ti_uuid = t.ti_uuid
                       WHERE t.outcome = 'succeeded' AND t.execution_time_ms IS NOT NULL
                       ORDER BY t.completion_time"#
                )
                .fetch_all(pool)
                .await?
            }
        })
    }

    /// How many tasks are not yet completed.
    pub async fn count_unfinished(read: &Reader) -> Result<u64, StoreError> {
        // SQLite: the unfinished tasks are two ranges of tasks_by_state (migration V8).
        let n = match read {
            Reader::Sqlite(pool) => {
                sqlx::query_scalar!(
                    "SELECT COUNT(*) FROM tasks
                     WHERE coalesce(outcome, status) IN ('queued', 'scheduled')"
                )
                .fetch_one(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_scalar!(
                    r#"/* pg */ SELECT COUNT(*) AS "n!" FROM tasks WHERE status <> 'completed'"#
                )
                .fetch_one(pool)
                .await?
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every task not yet completed, oldest first.
    pub async fn unfinished(read: &Reader) -> Result<Vec<UnfinishedTask>, StoreError> {
        match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    UnfinishedRow,
                    "SELECT task_id, model_name, task_input, metadata, status, ti_uuid,
                            predicted_ms, predicted_error_ms, dispatch_time, origin
                     FROM tasks WHERE coalesce(outcome, status) IN ('queued', 'scheduled')
                     ORDER BY submit_time"
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    UnfinishedRow,
                    "/* pg */ SELECT task_id, model_name, task_input, metadata, status, ti_uuid,
                            predicted_ms, predicted_error_ms, dispatch_time, origin
                     FROM tasks WHERE status <> 'completed' ORDER BY submit_time"
                )
                .fetch_all(pool)
                .await?
            }
        }
        .into_iter()
        .map(UnfinishedTask::try_from)
        .collect()
    }

    /// Per model, the unfinished tasks with no TI: none of their model's TIs was usable
    /// when they were placed (they wait for the sweep to place them).
    pub async fn waiting_for_ti(read: &Reader) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => sqlx::query!(
                r#"SELECT model_name, COUNT(*) AS "waiting!: i64"
                   FROM tasks WHERE ti_uuid IS NULL
                                AND coalesce(outcome, status) IN ('queued', 'scheduled')
                   GROUP BY model_name"#
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.model_name, r.waiting))
            .collect(),
            Reader::Postgres(pool) => sqlx::query!(
                r#"/* pg */ SELECT model_name, COUNT(*) AS "waiting!"
                   FROM tasks WHERE status <> 'completed' AND ti_uuid IS NULL
                   GROUP BY model_name"#
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.model_name, r.waiting))
            .collect(),
        })
    }

    /// One unfinished task, to dispatch it again.
    pub async fn find_unfinished(
        read: &Reader,
        task_id: &TaskId,
    ) -> Result<Option<UnfinishedTask>, StoreError> {
        let id = task_id.as_str();
        if !super::storable(id) {
            return Ok(None);
        }
        match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    UnfinishedRow,
                    "SELECT task_id, model_name, task_input, metadata, status, ti_uuid,
                            predicted_ms, predicted_error_ms, dispatch_time, origin
                     FROM tasks WHERE task_id = ? AND status <> 'completed'",
                    id
                )
                .fetch_optional(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    UnfinishedRow,
                    "/* pg */ SELECT task_id, model_name, task_input, metadata, status, ti_uuid,
                            predicted_ms, predicted_error_ms, dispatch_time, origin
                     FROM tasks WHERE task_id = $1 AND status <> 'completed'",
                    id
                )
                .fetch_optional(pool)
                .await?
            }
        }
        .map(UnfinishedTask::try_from)
        .transpose()
    }

    /// Clears the results of up to `limit` tasks completed before `before` (Unix seconds).
    pub fn expire_results(tx: &mut Tx<'_>, before: f64, limit: i64) -> Result<u64, StoreError> {
        Ok(match tx {
            Tx::Sqlite(conn) => conn
                .prepare_cached(EXPIRE_RESULTS)?
                .execute((before, limit))? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ UPDATE tasks SET result = NULL, result_expired = TRUE
                         WHERE task_id IN (SELECT task_id FROM tasks
                                           WHERE status = 'completed' AND completion_time < $1
                                             AND NOT result_expired
                                           LIMIT $2)",
                        before,
                        limit
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        })
    }

    /// Deletes up to `limit` tasks completed before `before` (their decisions go with them).
    pub fn purge_completed(tx: &mut Tx<'_>, before: f64, limit: i64) -> Result<u64, StoreError> {
        Ok(match tx {
            Tx::Sqlite(conn) => conn
                .prepare_cached(PURGE_COMPLETED)?
                .execute((before, limit))? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ DELETE FROM tasks
                         WHERE task_id IN (SELECT task_id FROM tasks
                                           WHERE status = 'completed' AND completion_time < $1
                                           LIMIT $2)",
                        before,
                        limit
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        })
    }
}
