//! Task history (`GET /tasks`): the tasks matching a filter, newest first, a page at a
//! time.
//!
//! Pages are keyset-paged on `(submit_time, task_id)`, a key that is unique and never
//! changes for a task: each page reads strictly below the last task of the previous one,
//! so no task is ever returned twice, and a task present when the first page was read and
//! still present when its page is read is returned once. The query is built per filter
//! combination so that it reads only index ranges of V4's indexes (see
//! `migrations/V4__task_history_indexes.sql`): one range per wanted state, merged by
//! SQLite in key order, never sorted.

use super::tasks::{parse_status, parse_ti};
use super::{Reader, StoreError, TaskRepo};
use crate::domain::{Outcome, TaskId, TaskStatus, TiUuid};

/// Which tasks to list.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryFilter {
    /// Only this model.
    pub model_name: Option<String>,
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// Only completed tasks that ended so.
    pub outcome: Option<Outcome>,
    /// Only tasks whose current TI is this one.
    pub ti_uuid: Option<TiUuid>,
    /// Only tasks submitted at or after this Unix time (seconds).
    pub since: Option<f64>,
    /// Only tasks submitted before this Unix time (seconds).
    pub until: Option<f64>,
    /// Only tasks after this one in the order (older, or as old with a smaller id).
    pub after: Option<HistoryCursor>,
    /// At most this many tasks.
    pub limit: u32,
}

impl HistoryFilter {
    /// A filter that lists everything, `limit` at a time.
    pub fn all(limit: u32) -> Self {
        Self {
            model_name: None,
            status: None,
            outcome: None,
            ti_uuid: None,
            since: None,
            until: None,
            after: None,
            limit,
        }
    }

    /// The states (`coalesce(outcome, status)`, see V4) a matching task can be in.
    fn states(&self) -> Vec<&'static str> {
        const QUEUED: &str = "queued";
        const SCHEDULED: &str = "scheduled";
        let outcome = |o: Outcome| o.as_str();
        match (self.status, self.outcome) {
            (Some(TaskStatus::Completed) | None, Some(o)) => vec![outcome(o)],
            // An outcome belongs to completed tasks only.
            (Some(_), Some(_)) => Vec::new(),
            (Some(TaskStatus::Queued), None) => vec![QUEUED],
            (Some(TaskStatus::Scheduled), None) => vec![SCHEDULED],
            (Some(TaskStatus::Completed), None) => {
                vec![outcome(Outcome::Succeeded), outcome(Outcome::Failed)]
            }
            (None, None) => vec![
                QUEUED,
                SCHEDULED,
                outcome(Outcome::Succeeded),
                outcome(Outcome::Failed),
            ],
        }
    }

    /// The index a query with this filter reads.
    pub fn index(&self) -> &'static str {
        if self.ti_uuid.is_some() {
            "tasks_by_ti"
        } else if self.model_name.is_some() {
            "tasks_by_model"
        } else {
            "tasks_by_state"
        }
    }
}

/// A position in the history: the last task of a page.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryCursor {
    /// That task's submit time (Unix seconds, exactly as stored).
    pub submit_time: f64,
    /// That task's id.
    pub task_id: TaskId,
}

impl HistoryCursor {
    /// The cursor as text for a client: `{submit_time}~{task_id}`. Rust prints an `f64`
    /// with the fewest digits that read back to the same value, so the stored time
    /// survives the round trip exactly.
    pub fn encode(&self) -> String {
        format!("{}~{}", self.submit_time, self.task_id)
    }

    /// Reads a cursor made by [`encode`](Self::encode).
    pub fn decode(text: &str) -> Option<Self> {
        let (time, id) = text.split_once('~')?;
        let submit_time: f64 = time.parse().ok()?;
        (submit_time.is_finite() && !id.is_empty()).then(|| Self {
            submit_time,
            task_id: TaskId::from_stored(id.to_string()),
        })
    }
}

/// One task of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// Its id.
    pub task_id: TaskId,
    /// The model it asked for.
    pub model_name: String,
    /// Where it is in its life.
    pub status: TaskStatus,
    /// How it ended, once completed.
    pub outcome: Option<Outcome>,
    /// The TI currently chosen for it, if any.
    pub ti_uuid: Option<TiUuid>,
    /// Unix seconds.
    pub submit_time: f64,
    /// Unix seconds, once completed.
    pub completion_time: Option<f64>,
    /// As reported by the TI, ms.
    pub execution_time_ms: Option<f64>,
}

/// A history row as read from the table.
#[derive(sqlx::FromRow)]
struct StoredRow {
    task_id: String,
    model_name: String,
    status: String,
    outcome: Option<String>,
    ti_uuid: Option<String>,
    submit_time: f64,
    completion_time: Option<f64>,
    execution_time_ms: Option<f64>,
}

impl TryFrom<StoredRow> for HistoryRow {
    type Error = StoreError;

    fn try_from(row: StoredRow) -> Result<Self, StoreError> {
        let outcome = match row.outcome.as_deref() {
            None => None,
            Some("succeeded") => Some(Outcome::Succeeded),
            Some("failed") => Some(Outcome::Failed),
            Some(other) => return Err(StoreError::Corrupt(format!("bad outcome {other:?}"))),
        };
        Ok(Self {
            task_id: TaskId::from_stored(row.task_id),
            model_name: row.model_name,
            status: parse_status(&row.status)?,
            outcome,
            ti_uuid: parse_ti(row.ti_uuid)?,
            submit_time: row.submit_time,
            completion_time: row.completion_time,
            execution_time_ms: row.execution_time_ms,
        })
    }
}

/// A page of the history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The tasks, newest first.
    pub tasks: Vec<HistoryRow>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<HistoryCursor>,
}

/// A value bound to a history query.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryBind {
    /// A text parameter.
    Text(String),
    /// A real parameter.
    Real(f64),
    /// An integer parameter.
    Int(i64),
}

/// A history query: its SQL and the values of its numbered parameters, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySql {
    /// The statement.
    pub sql: String,
    /// `?1`, `?2`, ... in order.
    pub binds: Vec<HistoryBind>,
}

impl HistorySql {
    /// Adds a parameter; returns its placeholder.
    fn bind(&mut self, value: HistoryBind) -> String {
        self.binds.push(value);
        format!("?{}", self.binds.len())
    }

    /// The statement with its values bound, ready for sqlx; `prefix` goes before it
    /// (`EXPLAIN QUERY PLAN ` in the tests).
    pub fn query_as<T>(
        &self,
        prefix: &str,
    ) -> sqlx::query::QueryAs<'_, sqlx::Sqlite, T, sqlx::sqlite::SqliteArguments>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        // The SQL is assembled from constant text and numbered placeholders only; every
        // value from a client is bound.
        let sql = format!("{prefix}{}", self.sql);
        let mut query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(sql));
        for bind in &self.binds {
            query = match bind {
                HistoryBind::Text(s) => query.bind(s.as_str()),
                HistoryBind::Real(x) => query.bind(*x),
                HistoryBind::Int(i) => query.bind(*i),
            };
        }
        query
    }

    /// The same statement for PostgreSQL: `$n` placeholders, and no `INDEXED BY` (its
    /// planner picks the same index by itself: the filter and the order match it).
    fn postgres_sql(&self) -> String {
        let mut sql = self.sql.replace('?', "$");
        while let Some(start) = sql.find(" INDEXED BY ") {
            let name = start + " INDEXED BY ".len();
            let end = sql[name..].find(' ').map_or(sql.len(), |i| name + i);
            sql.replace_range(start..end, "");
        }
        sql
    }

    /// The PostgreSQL statement with its values bound.
    fn postgres_query<T>(
        &self,
    ) -> sqlx::query::QueryAs<'static, sqlx::Postgres, T, sqlx::postgres::PgArguments>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        let mut query = sqlx::query_as::<_, T>(sqlx::AssertSqlSafe(self.postgres_sql()));
        for bind in &self.binds {
            query = match bind {
                HistoryBind::Text(s) => query.bind(s.clone()),
                HistoryBind::Real(x) => query.bind(*x),
                HistoryBind::Int(i) => query.bind(*i),
            };
        }
        query
    }
}

/// The columns a history row reads.
const COLUMNS: &str = "task_id, model_name, status, outcome, ti_uuid, submit_time, \
                       completion_time, execution_time_ms";

/// Builds the query for `filter`, reading one more row than the page holds (to tell
/// whether another page follows). `None` when no task can match (an outcome with a
/// status other than `completed`).
///
/// The query is one `SELECT` per state the filter allows, each naming the index it must
/// read (`INDEXED BY`: the plan cannot change under the service's feet, and a query the
/// index cannot serve fails instead of scanning), joined by `UNION ALL` under the order
/// of the keyset. SQLite merges the arms, each already in that order.
pub fn history_sql(filter: &HistoryFilter) -> Option<HistorySql> {
    let states = filter.states();
    if states.is_empty() {
        return None;
    }
    let mut q = HistorySql {
        sql: String::new(),
        binds: Vec::new(),
    };
    let mut terms = Vec::new();
    if let Some(ti) = filter.ti_uuid {
        let p = q.bind(HistoryBind::Text(ti.to_string()));
        terms.push(format!("ti_uuid = {p}"));
    }
    if let Some(model) = &filter.model_name {
        let p = q.bind(HistoryBind::Text(model.clone()));
        terms.push(format!("model_name = {p}"));
    }
    if let Some(since) = filter.since {
        let p = q.bind(HistoryBind::Real(since));
        terms.push(format!("submit_time >= {p}"));
    }
    // Only the tighter of `until` and the cursor bounds the range: given both, SQLite
    // would take one as the end of its range and check the other on every row in between,
    // which for a cursor deep in the window is a scan from `until` down to the cursor.
    match (filter.until, &filter.after) {
        (Some(until), Some(after)) if until <= after.submit_time => {
            let p = q.bind(HistoryBind::Real(until));
            terms.push(format!("submit_time < {p}"));
        }
        (_, Some(after)) => {
            let t = q.bind(HistoryBind::Real(after.submit_time));
            let id = q.bind(HistoryBind::Text(after.task_id.as_str().to_string()));
            terms.push(format!("(submit_time, task_id) < ({t}, {id})"));
        }
        (Some(until), None) => {
            let p = q.bind(HistoryBind::Real(until));
            terms.push(format!("submit_time < {p}"));
        }
        (None, None) => {}
    }
    let limit = q.bind(HistoryBind::Int(i64::from(filter.limit) + 1));
    let index = filter.index();
    let arms: Vec<String> = states
        .iter()
        .map(|state| {
            // `state` is one of the constant names above, never client text.
            let mut arm = format!(
                "SELECT {COLUMNS} FROM tasks INDEXED BY {index} \
                 WHERE coalesce(outcome, status) = '{state}'"
            );
            for term in &terms {
                arm.push_str(" AND ");
                arm.push_str(term);
            }
            arm
        })
        .collect();
    q.sql = format!(
        "{} ORDER BY submit_time DESC, task_id DESC LIMIT {limit}",
        arms.join(" UNION ALL ")
    );
    Some(q)
}

impl TaskRepo {
    /// A page of the tasks matching `filter`, newest first.
    #[tracing::instrument(skip_all, fields(index = filter.index(), limit = filter.limit))]
    pub async fn history(read: &Reader, filter: &HistoryFilter) -> Result<HistoryPage, StoreError> {
        let names = [
            filter.model_name.as_deref(),
            filter.after.as_ref().map(|a| a.task_id.as_str()),
        ];
        let query =
            history_sql(filter).filter(|_| names.into_iter().flatten().all(super::storable));
        let Some(query) = query else {
            // Nothing can match: an outcome with a status other than completed, or a name
            // no row can hold.
            return Ok(HistoryPage {
                tasks: Vec::new(),
                next: None,
            });
        };
        let rows = match read {
            Reader::Sqlite(pool) => query.query_as::<StoredRow>("").fetch_all(pool).await?,
            Reader::Postgres(pool) => query.postgres_query::<StoredRow>().fetch_all(pool).await?,
        };
        let mut tasks = rows
            .into_iter()
            .map(HistoryRow::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let limit = filter.limit as usize;
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|last| HistoryCursor {
                submit_time: last.submit_time,
                task_id: last.task_id.clone(),
            })
        } else {
            None
        };
        Ok(HistoryPage { tasks, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter from the combinations the README documents.
    fn filter(
        model: bool,
        ti: bool,
        status: Option<TaskStatus>,
        outcome: Option<Outcome>,
    ) -> HistoryFilter {
        HistoryFilter {
            model_name: model.then(|| "llama-7b".to_string()),
            ti_uuid: ti.then(|| "00000000-0000-4000-8000-000000000001".parse().unwrap()),
            status,
            outcome,
            ..HistoryFilter::all(100)
        }
    }

    /// Every documented combination of filters, by name: no filter, status, outcome,
    /// model_name, ti_uuid, and each of the last two with a status or an outcome.
    fn documented() -> Vec<(String, HistoryFilter)> {
        let narrowing: [(&str, Option<TaskStatus>, Option<Outcome>); 6] = [
            ("", None, None),
            ("status=queued", Some(TaskStatus::Queued), None),
            ("status=scheduled", Some(TaskStatus::Scheduled), None),
            ("status=completed", Some(TaskStatus::Completed), None),
            ("outcome=succeeded", None, Some(Outcome::Succeeded)),
            ("outcome=failed", None, Some(Outcome::Failed)),
        ];
        let mut all = Vec::new();
        for (lead, model, ti) in [
            ("", false, false),
            ("model_name", true, false),
            ("ti_uuid", false, true),
            ("model_name ti_uuid", true, true),
        ] {
            for (name, status, outcome) in narrowing {
                let base = filter(model, ti, status, outcome);
                let name = format!("{lead} {name}").trim().to_string();
                let cursor = Some(HistoryCursor {
                    submit_time: 1.5,
                    task_id: TaskId::from_stored("task-x".into()),
                });
                let variants = [
                    ("", base.clone()),
                    (
                        " since until",
                        HistoryFilter {
                            since: Some(1.0),
                            until: Some(2.0),
                            ..base.clone()
                        },
                    ),
                    (
                        " cursor",
                        HistoryFilter {
                            after: cursor.clone(),
                            ..base.clone()
                        },
                    ),
                    (
                        " since cursor",
                        HistoryFilter {
                            since: Some(1.0),
                            after: cursor.clone(),
                            ..base.clone()
                        },
                    ),
                    (
                        " since until cursor",
                        HistoryFilter {
                            since: Some(1.0),
                            until: Some(2.0),
                            after: cursor,
                            ..base
                        },
                    ),
                ];
                for (suffix, f) in variants {
                    all.push((format!("{name}{suffix}").trim().to_string(), f));
                }
            }
        }
        all
    }

    async fn migrated_pool() -> (tempfile::TempDir, sqlx::SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plans.db");
        crate::store::migrate(&path).unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        (dir, pool)
    }

    async fn plan(pool: &sqlx::SqlitePool, query: &HistorySql) -> Vec<String> {
        let rows: Vec<(i64, i64, i64, String)> = query
            .query_as("EXPLAIN QUERY PLAN ")
            .fetch_all(pool)
            .await
            .unwrap();
        rows.into_iter().map(|r| r.3).collect()
    }

    #[tokio::test]
    async fn every_documented_filter_reads_only_ranges_of_its_index_and_never_sorts() {
        let (_dir, pool) = migrated_pool().await;
        for (name, filter) in documented() {
            let query = history_sql(&filter).unwrap();
            let plan = plan(&pool, &query).await;
            let text = plan.join("\n");
            let index = filter.index();
            let searches: Vec<&String> = plan.iter().filter(|l| l.contains("tasks")).collect();
            assert_eq!(
                searches.len(),
                filter.states().len(),
                "{name}: one range per state\n{text}"
            );
            for line in searches {
                assert!(
                    line.starts_with(&format!("SEARCH tasks USING INDEX {index} (")),
                    "{name}: reads a range of {index}\n{text}"
                );
                let key = match (filter.ti_uuid, &filter.model_name) {
                    (Some(_), _) => "(ti_uuid=? AND <expr>=?",
                    (None, Some(_)) => "(model_name=? AND <expr>=?",
                    (None, None) => "(<expr>=?",
                };
                assert!(line.contains(key), "{name}: keyed by {key}\n{text}");
                if filter.since.is_some() {
                    assert!(
                        line.contains("submit_time>?"),
                        "{name}: since bounds the range\n{text}"
                    );
                }
                // The documented cursor lies inside the window: it, not until, ends the range.
                if filter.after.is_some() {
                    assert!(
                        line.contains("(submit_time,task_id)<(?,?)"),
                        "{name}: the cursor bounds the range\n{text}"
                    );
                } else if filter.until.is_some() {
                    assert!(
                        line.contains("submit_time<?"),
                        "{name}: until bounds the range\n{text}"
                    );
                }
            }
            assert!(!text.contains("TEMP B-TREE"), "{name}: no sort\n{text}");
            assert!(!text.contains("SCAN"), "{name}: no scan\n{text}");
        }
    }

    /// Prints the plan of every documented filter (for the README):
    /// `cargo test --lib history::tests::print_plans -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore]
    async fn print_plans() {
        let (_dir, pool) = migrated_pool().await;
        for (name, filter) in documented() {
            let query = history_sql(&filter).unwrap();
            println!("## {name}\n{}\n", plan(&pool, &query).await.join("\n"));
        }
    }

    #[test]
    fn an_outcome_with_a_status_other_than_completed_matches_nothing() {
        let f = filter(
            false,
            false,
            Some(TaskStatus::Queued),
            Some(Outcome::Failed),
        );
        assert_eq!(history_sql(&f), None);
        let f = filter(
            false,
            false,
            Some(TaskStatus::Completed),
            Some(Outcome::Failed),
        );
        assert_eq!(f.states(), vec!["failed"]);
    }

    #[test]
    fn a_cursor_survives_its_round_trip_exactly_and_junk_is_refused() {
        let cursor = HistoryCursor {
            submit_time: 1_795_833_489.325 + 0.1 + 0.2, // no short decimal form
            task_id: TaskId::from_stored("job~1".into()),
        };
        assert_eq!(HistoryCursor::decode(&cursor.encode()), Some(cursor));
        for junk in [
            "",
            "abc",
            "1.5",
            "1.5~",
            "x~task-1",
            "NaN~task-1",
            "inf~task-1",
        ] {
            assert_eq!(HistoryCursor::decode(junk), None, "{junk:?}");
        }
    }
}
