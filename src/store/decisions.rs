//! The `decisions` table: one row per choice of a TI for a task, with every candidate.

use rusqlite::Connection;
use sqlx::SqliteExecutor;

use super::StoreError;
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
    pub fn insert(conn: &Connection, row: &DecisionRow) -> Result<(), StoreError> {
        let d = &row.decision;
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
        exec: impl SqliteExecutor<'_>,
        task_id: &TaskId,
        ti: TiUuid,
    ) -> Result<bool, StoreError> {
        let task_id = task_id.as_str();
        let ti = ti.to_string();
        let found = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM decisions WHERE task_id = ? AND chosen_ti = ?) AS "found!: bool""#,
            task_id,
            ti
        )
        .fetch_one(exec)
        .await?;
        Ok(found)
    }
}
