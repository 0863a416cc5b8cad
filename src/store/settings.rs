//! The `settings` table: strategy and predict mode, kept across restarts.

use super::{Reader, StoreError, Tx};

pub(super) const SET: &str = "INSERT INTO settings (key, value) VALUES (?1, ?2)
                              ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Repository of settings.
pub struct SettingsRepo;

impl SettingsRepo {
    /// The stored value of `key`, if any.
    pub async fn get(read: &Reader, key: &str) -> Result<Option<String>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => {
                sqlx::query_scalar!("SELECT value FROM settings WHERE key = ?", key)
                    .fetch_optional(pool)
                    .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_scalar!("/* pg */ SELECT value FROM settings WHERE key = $1", key)
                    .fetch_optional(pool)
                    .await?
            }
        })
    }

    /// Stores `value` under `key`.
    pub fn set(tx: &mut Tx<'_>, key: &str, value: &str) -> Result<(), StoreError> {
        match tx {
            Tx::Sqlite(conn) => {
                conn.prepare_cached(SET)?.execute((key, value))?;
            }
            Tx::Postgres(pg) => {
                pg.rt.block_on(
                    sqlx::query!(
                        "/* pg */ INSERT INTO settings (key, value) VALUES ($1, $2)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        key,
                        value
                    )
                    .execute(&mut *pg.conn),
                )?;
            }
        }
        Ok(())
    }
}
