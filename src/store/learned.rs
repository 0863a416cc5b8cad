//! The `learned_models` table: the online regressions of the default predictor.

use rusqlite::Connection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::SqliteExecutor;

use super::StoreError;

pub(super) const SAVE: &str = "INSERT INTO learned_models (model_name, hardware, state)
                               VALUES (?1, ?2, ?3)
                               ON CONFLICT (model_name, hardware) DO UPDATE SET state = excluded.state";
pub(super) const CLEAR: &str = "DELETE FROM learned_models";

/// Repository of learned models.
pub struct LearnedRepo;

/// A learned model with its key. The model is the predictor's own type, stored as JSON:
/// the store only needs to (de)serialize it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel<M> {
    /// Model name.
    pub model_name: String,
    /// Hardware, or `""` for all hardware together.
    pub hardware: String,
    /// The regression.
    pub model: M,
}

impl LearnedRepo {
    /// Every model.
    pub async fn all<M: DeserializeOwned>(
        exec: impl SqliteExecutor<'_>,
    ) -> Result<Vec<StoredModel<M>>, StoreError> {
        let rows = sqlx::query!("SELECT model_name, hardware, state FROM learned_models")
            .fetch_all(exec)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(StoredModel {
                    model: serde_json::from_str(&row.state).map_err(|e| {
                        StoreError::Corrupt(format!(
                            "learned model {}/{}: {e}",
                            row.model_name, row.hardware
                        ))
                    })?,
                    model_name: row.model_name,
                    hardware: row.hardware,
                })
            })
            .collect()
    }

    /// Stores one model, replacing its previous state.
    pub fn save<M: Serialize>(
        conn: &Connection,
        stored: &StoredModel<M>,
    ) -> Result<(), StoreError> {
        let state = serde_json::to_string(&stored.model)
            .map_err(|e| StoreError::Corrupt(format!("learned model: {e}")))?;
        conn.prepare_cached(SAVE)?
            .execute((&stored.model_name, &stored.hardware, state))?;
        Ok(())
    }

    /// Deletes every model (before a retrain).
    pub fn clear(conn: &Connection) -> Result<(), StoreError> {
        conn.prepare_cached(CLEAR)?.execute(())?;
        Ok(())
    }
}
