//! The `settings` table: strategy and predict mode, kept across restarts.

use sqlx::{SqliteConnection, SqliteExecutor};

use super::StoreError;

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
    pub async fn set(
        conn: &mut SqliteConnection,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO settings (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key,
            value
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}
