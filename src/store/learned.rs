//! The `learned_models` table: the online regressions of the default predictor.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Reader, StoreError, Tx};

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
        read: &Reader,
    ) -> Result<Vec<StoredModel<M>>, StoreError> {
        let rows: Vec<(String, String, String)> = match read {
            Reader::Sqlite(pool) => {
                sqlx::query!("SELECT model_name, hardware, state FROM learned_models")
                    .fetch_all(pool)
                    .await?
                    .into_iter()
                    .map(|r| (r.model_name, r.hardware, r.state))
                    .collect()
            }
            Reader::Postgres(pool) => {
                sqlx::query!("/* pg */ SELECT model_name, hardware, state FROM learned_models")
                    .fetch_all(pool)
                    .await?
                    .into_iter()
                    .map(|r| (r.model_name, r.hardware, r.state))
                    .collect()
            }
        };
        rows.into_iter()
            .map(|(model_name, hardware, state)| {
                Ok(StoredModel {
                    model: serde_json::from_str(&state).map_err(|e| {
                        StoreError::Corrupt(format!("learned model {model_name}/{hardware}: {e}"))
                    })?,
                    model_name,
                    hardware,
                })
            })
            .collect()
    }

    /// Stores one model, replacing its previous state.
    pub fn save<M: Serialize>(tx: &mut Tx<'_>, stored: &StoredModel<M>) -> Result<(), StoreError> {
        let state = serde_json::to_string(&stored.model)
            .map_err(|e| StoreError::Corrupt(format!("learned model: {e}")))?;
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(SAVE)?.execute((
                    &stored.model_name,
                    &stored.hardware,
                    state,
                ))?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!(
                        "/* pg */ INSERT INTO learned_models (model_name, hardware, state)
                         VALUES ($1, $2, $3)
                         ON CONFLICT (model_name, hardware) DO UPDATE SET state = excluded.state",
                        stored.model_name,
                        stored.hardware,
                        state
                    )
                    .execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }

    /// Deletes every model (before a retrain).
    pub fn clear(tx: &mut Tx<'_>) -> Result<(), StoreError> {
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(CLEAR)?.execute(())?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!("/* pg */ DELETE FROM learned_models").execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }
}
