//! The `decisions` table: one row per choice of a TI for a task, with every candidate.

use super::{Reader, StoreError, Tx};
use crate::domain::{NewDecision, TaskId, TiUuid};

pub(super) const INSERT: &str =
    "INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode,
                            predicted_ms, predicted_error_ms, prediction_source,
                            lookup_fallback, chosen_ti, candidates)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Repository of scheduling decisions.
pub struct DecisionRepo;

/// A decision ready for the writer: its candidates already serialized, so that the
/// writer thread only binds and steps.
#[derive(Debug, Clone)]
pub struct DecisionRow {
    /// The decision.
    pub decision: NewDecision,
    /// Its candidates as JSON text.
    pub candidates: String,
}

impl TryFrom<NewDecision> for DecisionRow {
    type Error = StoreError;

    fn try_from(decision: NewDecision) -> Result<Self, StoreError> {
        let candidates = serde_json::to_string(&decision.candidates)
            .map_err(|e| StoreError::Corrupt(format!("candidates: {e}")))?;
        Ok(Self {
            decision,
            candidates,
        })
    }
}

impl DecisionRepo {
    /// Stores a decision.
    pub fn insert(tx: &mut Tx<'_>, row: &DecisionRow) -> Result<(), StoreError> {
        let d = &row.decision;
        let conn = match tx {
            Tx::Sqlite(conn) => conn,
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!(
                        "/* pg */ INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode,
                                                predicted_ms, predicted_error_ms, prediction_source,
                                                lookup_fallback, chosen_ti, candidates)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                        d.task_id.as_str(),
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
                )?;
                return Ok(());
            }
        };
        conn.prepare_cached(INSERT)?.execute(rusqlite::params![
            d.task_id.as_str(),
            d.decided_at,
            d.reason.as_str(),
            d.strategy,
            d.predict_mode,
            d.predicted_ms,
            d.predicted_error_ms,
            d.prediction_source,
            d.lookup_fallback,
            d.chosen_ti.to_string(),
            row.candidates,
        ])?;
        Ok(())
    }

    /// True if `ti` was ever chosen for the task (so its result callback is legitimate).
    pub async fn was_chosen(
        read: &Reader,
        task_id: &TaskId,
        ti: TiUuid,
    ) -> Result<bool, StoreError> {
        let task_id = task_id.as_str();
        if !super::storable(task_id) {
            return Ok(false);
        }
        let ti = ti.to_string();
        Ok(match read {
            Reader::Sqlite(pool) => sqlx::query_scalar!(
                r#"SELECT EXISTS (SELECT 1 FROM decisions WHERE task_id = ? AND chosen_ti = ?) AS "found!: bool""#,
                task_id,
                ti
            )
            .fetch_one(pool)
            .await?,
            Reader::Postgres(pool) => sqlx::query_scalar!(
                r#"/* pg */ SELECT EXISTS (SELECT 1 FROM decisions WHERE task_id = $1 AND chosen_ti = $2) AS "found!""#,
                task_id,
                ti
            )
            .fetch_one(pool)
            .await?,
        })
    }

    /// Every decision made for a task, oldest first.
    pub async fn for_task(
        read: &Reader,
        task_id: &TaskId,
    ) -> Result<Vec<StoredDecision>, StoreError> {
        let id = task_id.as_str();
        if !super::storable(id) {
            return Ok(Vec::new());
        }
        let rows = match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    DecisionRead,
                    r#"SELECT decided_at, reason, strategy, predict_mode, predicted_ms, predicted_error_ms,
                              prediction_source, lookup_fallback AS "lookup_fallback: bool", chosen_ti,
                              candidates
                       FROM decisions WHERE task_id = ? ORDER BY id"#,
                    id
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    DecisionRead,
                    r#"/* pg */ SELECT decided_at, reason, strategy, predict_mode, predicted_ms, predicted_error_ms,
                              prediction_source, lookup_fallback, chosen_ti, candidates
                       FROM decisions WHERE task_id = $1 ORDER BY id"#,
                    id
                )
                .fetch_all(pool)
                .await?
            }
        };
        rows.into_iter()
            .map(|r| {
                Ok(StoredDecision {
                    candidates: serde_json::from_str(&r.candidates).map_err(|e| {
                        StoreError::Corrupt(format!("candidates of a decision of {id}: {e}"))
                    })?,
                    decided_at: r.decided_at,
                    reason: r.reason,
                    strategy: r.strategy,
                    predict_mode: r.predict_mode,
                    predicted_ms: r.predicted_ms,
                    predicted_error_ms: r.predicted_error_ms,
                    prediction_source: r.prediction_source,
                    lookup_fallback: r.lookup_fallback,
                    chosen_ti: r.chosen_ti,
                })
            })
            .collect()
    }
}

/// A decision as stored, for `GET /task/decisions`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDecision {
    /// Unix seconds.
    pub decided_at: f64,
    /// `submit` or `reroute`.
    pub reason: String,
    /// Strategy name.
    pub strategy: String,
    /// Predict mode name.
    pub predict_mode: String,
    /// Prediction on the chosen TI, ms.
    pub predicted_ms: f64,
    /// Its error, ms.
    pub predicted_error_ms: f64,
    /// Which predictor gave it.
    pub prediction_source: String,
    /// lookup_table mode found no row and the default chain answered.
    pub lookup_fallback: bool,
    /// The TI chosen.
    pub chosen_ti: String,
    /// Every TI considered, with its estimates (the stored JSON array).
    pub candidates: serde_json::Value,
}

/// A decision as read from the table.
struct DecisionRead {
    decided_at: f64,
    reason: String,
    strategy: String,
    predict_mode: String,
    predicted_ms: f64,
    predicted_error_ms: f64,
    prediction_source: String,
    lookup_fallback: bool,
    chosen_ti: String,
    candidates: String,
}
