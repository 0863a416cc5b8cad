//! The `lookup_rows` table: the pre-computed predictions of lookup_table mode.

use super::{Reader, StoreError, Tx};
use crate::domain::LookupRow;

pub(super) const INSERT: &str =
    "INSERT INTO lookup_rows (model_name, hardware, features, expect_ms, error_ms, quantiles)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
pub(super) const CLEAR: &str = "DELETE FROM lookup_rows";

/// Repository of lookup-table rows.
pub struct LookupRepo;

impl LookupRepo {
    /// Every row, in import order.
    pub async fn all(read: &Reader) -> Result<Vec<LookupRow>, StoreError> {
        let rows: Vec<StoredRow> = match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    StoredRow,
                    "SELECT model_name, hardware, features, expect_ms, error_ms, quantiles
                     FROM lookup_rows ORDER BY id"
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    StoredRow,
                    "/* pg */ SELECT model_name, hardware, features, expect_ms, error_ms, quantiles
                     FROM lookup_rows ORDER BY id"
                )
                .fetch_all(pool)
                .await?
            }
        };
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
    pub fn clear(tx: &mut Tx<'_>) -> Result<(), StoreError> {
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(CLEAR)?.execute(())?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!("/* pg */ DELETE FROM lookup_rows").execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }

    /// Appends rows.
    pub fn insert(tx: &mut Tx<'_>, rows: &[LookupRow]) -> Result<(), StoreError> {
        for row in rows {
            let features = serde_json::to_string(&row.features)
                .map_err(|e| StoreError::Corrupt(format!("features: {e}")))?;
            let quantiles = serde_json::to_string(&row.quantiles)
                .map_err(|e| StoreError::Corrupt(format!("quantiles: {e}")))?;
            match tx {
                Tx::Sqlite(conn) => {
                    conn.prepare_cached(INSERT)?.execute((
                        &row.model_name,
                        &row.hardware,
                        features,
                        row.expect_ms,
                        row.error_ms,
                        quantiles,
                    ))?;
                }
                Tx::Postgres(pg) => {
                    pg.rt.block_on(
                        sqlx::query!(
                            "/* pg */ INSERT INTO lookup_rows
                                 (model_name, hardware, features, expect_ms, error_ms, quantiles)
                             VALUES ($1, $2, $3, $4, $5, $6)",
                            row.model_name,
                            row.hardware,
                            features,
                            row.expect_ms,
                            row.error_ms,
                            quantiles
                        )
                        .execute(&mut *pg.conn),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// A row as read from the table.
struct StoredRow {
    model_name: String,
    hardware: Option<String>,
    features: String,
    expect_ms: f64,
    error_ms: f64,
    quantiles: String,
}
