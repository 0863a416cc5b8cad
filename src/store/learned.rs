//! The `learned_models` table: the online regressions of the default predictor.

use sqlx::{SqliteConnection, SqliteExecutor};

use super::StoreError;
use crate::predictor::OnlineModel;

/// Repository of learned models.
pub struct LearnedRepo;

/// A learned model with its key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel {
    /// Model name.
    pub model_name: String,
    /// Hardware, or `""` for all hardware together.
    pub hardware: String,
    /// The regression.
    pub model: OnlineModel,
}

impl LearnedRepo {
    /// Every model.
    pub async fn all(exec: impl SqliteExecutor<'_>) -> Result<Vec<StoredModel>, StoreError> {
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
    pub async fn save(conn: &mut SqliteConnection, stored: &StoredModel) -> Result<(), StoreError> {
        let state = serde_json::to_string(&stored.model)
            .map_err(|e| StoreError::Corrupt(format!("learned model: {e}")))?;
        sqlx::query!(
            "INSERT INTO learned_models (model_name, hardware, state) VALUES (?, ?, ?)
             ON CONFLICT (model_name, hardware) DO UPDATE SET state = excluded.state",
            stored.model_name,
            stored.hardware,
            state
        )
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Deletes every model (before a retrain).
    pub async fn clear(conn: &mut SqliteConnection) -> Result<(), StoreError> {
        sqlx::query!("DELETE FROM learned_models")
            .execute(conn)
            .await?;
        Ok(())
    }
}
