//! The `execution_stats` table: running mean and variance of actual execution times.

use super::{Reader, StoreError, Tx};

pub(super) const SAVE: &str = "INSERT INTO execution_stats (model_name, hardware, n, mean_ms, m2)
                               VALUES (?1, ?2, ?3, ?4, ?5)
                               ON CONFLICT (model_name, hardware) DO UPDATE SET
                                   n = excluded.n, mean_ms = excluded.mean_ms, m2 = excluded.m2";
pub(super) const CLEAR: &str = "DELETE FROM execution_stats";

/// Repository of execution statistics.
pub struct StatsRepo;

/// Welford's running statistics of one (model, hardware) pair; hardware `""` means any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionStats {
    /// Model name.
    pub model_name: String,
    /// Hardware, or `""` for all hardware together.
    pub hardware: String,
    /// Completions seen.
    pub n: i64,
    /// Mean execution time, ms.
    pub mean_ms: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl StatsRepo {
    /// Every row.
    pub async fn all(read: &Reader) -> Result<Vec<ExecutionStats>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    ExecutionStats,
                    "SELECT model_name, hardware, n, mean_ms, m2 FROM execution_stats"
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    ExecutionStats,
                    "/* pg */ SELECT model_name, hardware, n, mean_ms, m2 FROM execution_stats"
                )
                .fetch_all(pool)
                .await?
            }
        })
    }

    /// Deletes every row (before a retrain).
    pub fn clear(tx: &mut Tx<'_>) -> Result<(), StoreError> {
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(CLEAR)?.execute(())?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!("/* pg */ DELETE FROM execution_stats").execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }

    /// Stores one row, replacing the previous values.
    pub fn save(tx: &mut Tx<'_>, stats: &ExecutionStats) -> Result<(), StoreError> {
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(SAVE)?.execute((
                    &stats.model_name,
                    &stats.hardware,
                    stats.n,
                    stats.mean_ms,
                    stats.m2,
                ))?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!(
                        "/* pg */ INSERT INTO execution_stats (model_name, hardware, n, mean_ms, m2)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (model_name, hardware) DO UPDATE SET
                             n = excluded.n, mean_ms = excluded.mean_ms, m2 = excluded.m2",
                        stats.model_name,
                        stats.hardware,
                        stats.n,
                        stats.mean_ms,
                        stats.m2
                    )
                    .execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }
}
