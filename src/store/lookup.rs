//! The `lookup_rows` table: the pre-computed predictions of lookup_table mode.

use rusqlite::Connection;
use sqlx::SqliteExecutor;

use super::StoreError;
use crate::domain::LookupRow;

pub(super) const INSERT: &str =
    "INSERT INTO lookup_rows (model_name, hardware, features, expect_ms, error_ms, quantiles)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
pub(super) const CLEAR: &str = "DELETE FROM lookup_rows";

/// Repository of lookup-table rows.
pub struct LookupRepo;

impl LookupRepo {
    /// Every row, in import order.
    pub async fn all(exec: impl SqliteExecutor<'_>) -> Result<Vec<LookupRow>, StoreError> {
        let rows = sqlx::query!(
            "SELECT model_name, hardware, features, expect_ms, error_ms, quantiles
             FROM lookup_rows ORDER BY id"
        )
        .fetch_all(exec)
        .await?;
        rows.into_iter()
            .map(|row| {
                let corrupt =
                    |e: serde_json::Error| StoreError::Corrupt(format!("lookup row: {e}"));
                Ok(LookupRow {
                    model_name: row.model_name,
                    hardware: row.hardware,
                    features: serde_json::from_str(&row.features).map_err(corrupt)?,
                    expect_ms: row.expect_ms,
                    error_ms: row.error_ms,
                    quantiles: serde_json::from_str(&row.quantiles).map_err(corrupt)?,
                })
            })
            .collect()
    }

    /// Deletes every row.
    pub fn clear(conn: &Connection) -> Result<(), StoreError> {
        conn.prepare_cached(CLEAR)?.execute(())?;
        Ok(())
    }

    /// Appends rows.
    pub fn insert(conn: &Connection, rows: &[LookupRow]) -> Result<(), StoreError> {
        let mut insert = conn.prepare_cached(INSERT)?;
        for row in rows {
            let features = serde_json::to_string(&row.features)
                .map_err(|e| StoreError::Corrupt(format!("features: {e}")))?;
            let quantiles = serde_json::to_string(&row.quantiles)
                .map_err(|e| StoreError::Corrupt(format!("quantiles: {e}")))?;
            insert.execute((
                &row.model_name,
                &row.hardware,
                features,
                row.expect_ms,
                row.error_ms,
                quantiles,
            ))?;
        }
        Ok(())
    }
}
