//! SQLite: the service's whole state, and the only truth.
//!
//! [`open`] migrates the file with refinery (through rusqlite, which shares sqlx's
//! libsqlite3), then opens a read pool (sqlx) and the single write connection (rusqlite)
//! owned by the group-commit [`Writer`] thread. The repositories hold every SQL statement
//! the service runs. Reads are checked at compile time against the migrated schema
//! (offline metadata in `sqlx-data/`); writes are plain rusqlite statements, each one
//! prepared against the migrated schema by a test (`store::tests`).

mod decisions;
mod history;
mod learned;
mod lookup;
mod settings;
mod stats;
mod tasks;
mod tis;
pub mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::ConnectOptions;

pub use decisions::{Candidate, DecisionReason, DecisionRepo, DecisionRow, NewDecision};
pub use history::{
    history_sql, HistoryBind, HistoryCursor, HistoryFilter, HistoryPage, HistoryRow, HistorySql,
};
pub use learned::{LearnedRepo, StoredModel};
pub use lookup::LookupRepo;
pub use settings::SettingsRepo;
pub use stats::{ExecutionStats, StatsRepo};
pub use tasks::{Completion, Execution, NewTask, StoredTask, TaskRepo, UnfinishedTask};
pub use tis::{StoredTi, TiRepo};
pub use writer::Writer;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A statement failed.
    #[error("database error")]
    Sql(#[from] sqlx::Error),
    /// Another write of the same batch failed, or the commit did: this write was rolled
    /// back with the batch.
    #[error("the write was rolled back with its batch")]
    Batch(#[source] Arc<StoreError>),
    /// A write of the batch failed, so the batch was rolled back.
    #[error("a write of the batch failed")]
    BatchFailed,
    /// Migrating the file failed.
    #[error("database migration failed")]
    Migrate(#[from] refinery::Error),
    /// A statement on the write connection failed, or opening the file did.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// Creating the database's directory failed.
    #[error("creating the database directory failed")]
    Io(#[from] std::io::Error),
    /// A stored value could not be read back (a JSON column, an id).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The writer task has stopped (the service is shutting down).
    #[error("the database writer has stopped")]
    WriterClosed,
}

/// How hard SQLite works to make a commit durable (PRAGMA synchronous, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync the WAL at every commit: a commit survives a crash of the process and a
    /// power loss or OS crash.
    Full,
    /// fsync the WAL only at checkpoints: a commit survives a crash of the process
    /// (kill -9), but the last commits may be lost if the machine loses power.
    Normal,
}

/// The open database: a read pool and the writer.
#[derive(Clone)]
pub struct Db {
    /// Connections for reads; WAL lets them run beside the writer.
    pub read: SqlitePool,
    /// The only way to write.
    pub writer: Writer,
}

/// Applies pending migrations to the file at `path` (creating it and its directory).
/// Returns how many were applied.
pub fn migrate(path: &Path) -> Result<usize, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut conn = rusqlite::Connection::open(path)?;
    // WAL is persistent in the file; set it before the first table is written.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let report = embedded::migrations::runner().run(&mut conn)?;
    Ok(report.applied_migrations().len())
}

/// Migrates the file, then opens the read pool and starts the writer.
pub async fn open(
    path: &Path,
    durability: Durability,
    read_connections: u32,
    max_batch: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(Db, tokio::task::JoinHandle<()>), StoreError> {
    let owned = path.to_path_buf();
    let (applied, conn) = tokio::task::spawn_blocking(move || {
        let applied = migrate(&owned)?;
        Ok::<_, StoreError>((applied, write_connection(&owned, durability)?))
    })
    .await
    .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    if applied > 0 {
        tracing::info!(applied, path = %path.display(), "database migrated");
    }

    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT)
        .read_only(true)
        .log_statements(log::LevelFilter::Trace);
    let read = SqlitePoolOptions::new()
        .max_connections(read_connections.max(1))
        .connect_with(options)
        .await?;
    let (writer, handle) = Writer::spawn(conn, max_batch, stop)?;
    Ok((Db { read, writer }, handle))
}

/// How long a connection waits for another one's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The write connection: WAL, the chosen synchronous level, foreign keys enforced,
/// statement journals in memory.
pub fn write_connection(
    path: &Path,
    durability: Durability,
) -> Result<rusqlite::Connection, StoreError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Every write statement stays prepared.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every statement the writer runs: reads are checked by sqlx at compile time, these
    /// are checked here against the schema the migrations build.
    const WRITES: &[&str] = &[
        tasks::INSERT,
        tasks::MARK_SCHEDULED,
        tasks::COMPLETE,
        tasks::REASSIGN,
        tasks::EXPIRE_RESULTS,
        tasks::PURGE_COMPLETED,
        decisions::INSERT,
        tis::UPSERT_REGISTERED,
        tis::MARK_REMOVED,
        settings::SET,
        learned::SAVE,
        learned::CLEAR,
        stats::SAVE,
        stats::CLEAR,
        lookup::INSERT,
        lookup::CLEAR,
    ];

    #[test]
    fn every_write_statement_prepares_against_the_migrated_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.db");
        migrate(&path).unwrap();
        let conn = write_connection(&path, Durability::Full).unwrap();
        for sql in WRITES {
            if let Err(e) = conn.prepare(sql) {
                panic!("{e}\nin:\n{sql}");
            }
        }
        // And a statement naming a missing column does fail here.
        assert!(conn.prepare("UPDATE tasks SET no_such_column = 1").is_err());
    }
}
