//! The `settings` table: strategy and predict mode, kept across restarts.

use rusqlite::Connection;
use sqlx::SqliteExecutor;

use super::StoreError;

pub(super) const SET: &str = "INSERT INTO settings (key, value) VALUES (?1, ?2)
                              ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// Repository of settings.
pub struct SettingsRepo;

impl SettingsRepo {
    /// The stored value of `key`, if any.
    pub async fn get(
        exec: impl SqliteExecutor<'_>,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let value = sqlx::query_scalar!("SELECT value FROM settings WHERE key = ?", key)
            .fetch_optional(exec)
            .await?;
        Ok(value)
    }

    /// Stores `value` under `key`.
    pub fn set(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
        conn.prepare_cached(SET)?.execute((key, value))?;
        Ok(())
    }
}
