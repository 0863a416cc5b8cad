//! SQLite: the service's whole state, and the only truth.
//!
//! [`open`] migrates the file with refinery (through rusqlite, which shares sqlx's
//! libsqlite3), then opens a read pool and the single write connection owned by the
//! group-commit [`Writer`]. The repositories hold every SQL statement the service runs,
//! checked at compile time against the migrated schema (offline metadata in `sqlx-data/`).

pub mod coalesce;
mod decisions;
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
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, SqliteConnection};

pub use decisions::{Candidate, DecisionReason, DecisionRepo, NewDecision};
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
    /// Opening the file for migration failed.
    #[error("opening the database failed")]
    Open(#[from] rusqlite::Error),
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
    let applied = tokio::task::spawn_blocking(move || migrate(&owned))
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
    if applied > 0 {
        tracing::info!(applied, path = %path.display(), "database migrated");
    }

    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(Duration::from_secs(10))
        // Statement journals (multi-row statements) in memory, not in temp files.
        .pragma("temp_store", "MEMORY")
        .foreign_keys(true)
        .log_statements(log::LevelFilter::Trace);
    let read = SqlitePoolOptions::new()
        .max_connections(read_connections.max(1))
        .connect_with(options.clone().read_only(true))
        .await?;
    let conn: SqliteConnection = options.connect().await?;
    let (writer, handle) = Writer::spawn(conn, max_batch, stop);
    Ok((Db { read, writer }, handle))
}
