//! The database: the service's whole state, and the only truth. SQLite (the default) or
//! PostgreSQL, with the same repositories and the same guarantees.
//!
//! [`open`] migrates an SQLite file with refinery (through rusqlite, which shares sqlx's
//! libsqlite3), then opens a read pool (sqlx) and the single write connection (rusqlite)
//! owned by the group-commit [`Writer`] thread. [`open_postgres`] migrates a PostgreSQL
//! database with sqlx's migrator (`migrations/postgres/`), then opens a read pool and the
//! writer's own connection. The repositories hold every SQL statement the service runs,
//! one per backend where the dialects differ; each matches on [`Reader`] or [`Tx`].
//! Reads on both backends, and writes on PostgreSQL, are checked at compile time (offline
//! metadata in `sqlx-data/`, `scripts/sqlx-prepare.sh`); SQLite writes are rusqlite
//! statements, each one prepared against the migrated schema by a test (`store::tests`).
//! [`backup`] copies an SQLite file that a service may be using (`ti-scheduler backup`).

mod backup;
mod checkpoint;
mod decisions;
mod guard;
mod history;
mod learned;
mod lease;
mod lookup;
mod postgres;
mod settings;
mod stats;
mod tasks;
mod tis;
mod window;
pub mod writer;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::ConnectOptions;

use crate::domain::Durability;

pub use backup::{backup, BackupError, BackupReport};
pub use decisions::{DecisionRepo, DecisionRow, StoredDecision};
pub use guard::{quick_check, DbLock};
pub use history::{
    history_sql, HistoryBind, HistoryCursor, HistoryFilter, HistoryPage, HistoryRow, HistorySql,
};
pub use learned::{LearnedRepo, StoredModel};
pub use lease::{LeaseRepo, LeaseView};
pub use lookup::LookupRepo;
pub use postgres::{
    create_postgres_database, migrate_postgres, open_postgres, pg_options, PG_MIGRATIONS,
};
pub use settings::SettingsRepo;
pub use stats::{ExecutionStats, StatsRepo};
pub use tasks::{Completed, Completion, Execution, NewTask, StoredTask, TaskRepo, UnfinishedTask};
pub use tis::{StoredTi, TiRepo};
pub use window::{CompletedTask, WindowRepo};
pub use writer::{Fence, Flush, PgTx, Tx, Writer};

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
    /// A write of the batch found the database full, so the batch was rolled back.
    #[error("a write of the batch found the database full")]
    BatchFull,
    /// Migrating the file failed.
    #[error("database migration failed")]
    Migrate(#[from] refinery::Error),
    /// A statement on the write connection failed, or opening the file did.
    #[error("database error")]
    Sqlite(#[source] rusqlite::Error),
    /// SQLite answered SQLITE_FULL: the disk is full, or `database.max_size_mb` is
    /// reached. Writes fail until space is freed; reads go on.
    #[error("the database is full: the disk has no space left or database.max_size_mb is reached")]
    Full(#[source] rusqlite::Error),
    /// Another process holds the database file (the message names it).
    #[error("{0}")]
    Locked(String),
    /// The file failed its integrity check at start (the message says how to inspect it).
    #[error("{0}")]
    Damaged(String),
    /// The file cannot be written by this process (the message names it and says why).
    #[error("{0}")]
    ReadOnly(String),
    /// The file's schema is newer than every migration this binary embeds.
    #[error(
        "database {path} was created by a newer ti-scheduler, schema V{found}; this binary knows V{known}"
    )]
    NewerSchema {
        /// The file.
        path: String,
        /// The highest migration applied to it.
        found: i64,
        /// The highest migration this binary embeds.
        known: i64,
    },
    /// Creating the database's directory failed.
    #[error("creating the database directory failed")]
    Io(#[from] std::io::Error),
    /// A stored value could not be read back (a JSON column, an id).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The writer task has stopped (the service is shutting down), or lost its
    /// PostgreSQL connection and could not reconnect.
    #[error("the database writer has stopped")]
    WriterClosed,
    /// The PostgreSQL server could not be reached, or refused this user or database.
    #[error("cannot connect to PostgreSQL at {0}")]
    PgConnect(String, #[source] sqlx::Error),
    /// Migrating a PostgreSQL database failed.
    #[error("database migration failed: {0}")]
    PgMigrate(#[from] sqlx::migrate::MigrateError),
    /// High availability: the lease has another epoch than this node's; this node is no
    /// longer the leader and may not write.
    #[error("this node lost the leader lease (epoch {epoch}, the lease is at {held:?})")]
    Deposed {
        /// The epoch this node led under.
        epoch: i64,
        /// The lease's epoch now.
        held: Option<i64>,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::Full(e),
            _ => Self::Sqlite(e),
        }
    }
}

impl StoreError {
    /// True if this write failed, or was rolled back with its batch, because the
    /// database is full.
    pub fn is_full(&self) -> bool {
        match self {
            Self::Full(_) | Self::BatchFull => true,
            Self::Batch(cause) => cause.is_full(),
            // SQLITE_FULL through sqlx; PostgreSQL's disk_full.
            Self::Sql(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("13" | "53100"))
            }
            _ => false,
        }
    }

    /// True if this write failed, or was rolled back with its batch, because the
    /// PostgreSQL connection is gone: an I/O or protocol error, or the server ending the
    /// session (57P01 admin_shutdown; 25P03 idle_in_transaction_session_timeout, see
    /// [`Fence::idle_limit`]). The writer reconnects for its next batch, so the write may
    /// be tried again. (If the connection broke during the COMMIT, the server may have
    /// committed it: a retry must be idempotent, as a submit with its `task_id` is.)
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Sql(sqlx::Error::Io(_) | sqlx::Error::Protocol(_)) => true,
            Self::Sql(sqlx::Error::Database(e)) => {
                matches!(e.code().as_deref(), Some("57P01" | "25P03"))
            }
            Self::Batch(cause) => cause.is_connection_lost(),
            _ => false,
        }
    }
}

/// True if `text` can be a stored value on both backends: PostgreSQL's TEXT cannot hold
/// NUL, so a lookup by a string with one finds nothing there (and the API refuses names
/// with control characters, so none is stored on SQLite either).
pub(crate) fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// The open database: a read pool and the writer.
#[derive(Clone)]
pub struct Db {
    /// Connections for reads; on SQLite, WAL lets them run beside the writer.
    pub read: Reader,
    /// The only way to write.
    pub writer: Writer,
}

/// The read pool of either backend; every read of a repository matches on it.
#[derive(Clone, Debug)]
pub enum Reader {
    /// Read-only connections to the SQLite file.
    Sqlite(SqlitePool),
    /// Connections to the PostgreSQL database.
    Postgres(sqlx::PgPool),
}

impl Reader {
    /// Closes every connection of the pool.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

/// Applies pending migrations to the file at `path` (creating it and its directory).
/// Returns how many were applied.
pub fn migrate(path: &Path) -> Result<usize, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut conn = rusqlite::Connection::open(path)?;
    refuse_read_only(&conn, path)?;
    // WAL is persistent in the file; set it before the first table is written.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let runner = embedded::migrations::runner();
    let known = runner
        .get_migrations()
        .iter()
        .map(|m| i64::from(m.version()))
        .max()
        .unwrap_or(0);
    let found = applied_version(&conn)?;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.display().to_string(),
            found,
            known,
        });
    }
    // A migration that rebuilds a table (V9) drops the old one; with foreign keys on, that
    // drop would first delete its rows and cascade into decisions. SQLite's procedure for
    // such changes: foreign keys off while migrating, then check every reference (once,
    // after migrations ran: it reads every row that has a foreign key).
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let applied = runner.run(&mut conn)?.applied_migrations().len();
    if applied == 0 {
        return Ok(0);
    }
    let dangling: i64 =
        conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })?;
    if dangling > 0 {
        return Err(StoreError::Damaged(format!(
            "database {} has {dangling} row(s) whose foreign key names a missing row after \
             migrating; inspect them with: sqlite3 {} 'PRAGMA foreign_key_check'",
            path.display(),
            path.display()
        )));
    }
    Ok(applied)
}

/// SQLite silently opens a file it may not write read-only; every write would then fail.
/// Refuses such a file with one line naming it and the likely reason.
fn refuse_read_only(conn: &rusqlite::Connection, path: &Path) -> Result<(), StoreError> {
    if !conn.is_readonly(rusqlite::DatabaseName::Main)? {
        return Ok(());
    }
    let why = match std::fs::metadata(path) {
        Ok(m) if m.permissions().readonly() => "the file's permissions forbid writing",
        _ => "the file is immutable, on a read-only mount, or not writable by this user",
    };
    Err(StoreError::ReadOnly(format!(
        "database {} is read-only ({why}); the service must write it",
        path.display()
    )))
}

/// The highest migration applied to the file (refinery's history table), 0 if none.
fn applied_version(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    let has_history: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'table' AND name = 'refinery_schema_history')",
        [],
        |r| r.get(0),
    )?;
    if !has_history {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history",
        [],
        |r| r.get(0),
    )?)
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
    let (writer, handle) = Writer::spawn(writer::Target::Sqlite(conn), max_batch, stop).await?;
    Ok((
        Db {
            read: Reader::Sqlite(read),
            writer,
        },
        handle,
    ))
}

/// Caps the database at `max_mb` MiB (`PRAGMA max_page_count` on the write connection;
/// 0 = no cap): beyond it writes fail as on a full disk (SQLITE_FULL) while reads go on.
/// A file already larger keeps its size as its cap. Returns the cap in pages (0: none).
pub async fn limit_size(db: &Db, max_mb: u64) -> Result<u64, StoreError> {
    if max_mb == 0 {
        return Ok(0);
    }
    if !matches!(db.read, Reader::Sqlite(_)) {
        tracing::warn!("database.max_size_mb applies to SQLite only; PostgreSQL ignores it");
        return Ok(0);
    }
    db.writer
        .run(move |tx| {
            let Tx::Sqlite(conn) = tx else {
                return Ok(0);
            };
            let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = (max_mb * 1024 * 1024 / page_size.max(1)).max(1);
            let cap: u64 =
                conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                    r.get(0)
                })?;
            Ok(cap)
        })
        .await
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
        tasks::COMPLETED,
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

    /// The opcodes of `sql`'s program, as `EXPLAIN` lists them.
    fn opcodes(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let mut rows = stmt.raw_query();
        let mut ops = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            ops.push(row.get::<_, String>(1).unwrap());
        }
        ops
    }

    #[test]
    fn the_writers_statements_on_tasks_build_no_temporary_btree_and_completion_checks_no_foreign_key(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("schema.db");
        migrate(&path).unwrap();
        let conn = write_connection(&path, Durability::Full).unwrap();
        for sql in [
            tasks::INSERT,
            tasks::MARK_SCHEDULED,
            tasks::COMPLETE,
            tasks::COMPLETED,
            tasks::REASSIGN,
        ] {
            let ops = opcodes(&conn, sql);
            assert!(
                !ops.iter().any(|op| op == "OpenEphemeral"),
                "a temporary b-tree in:\n{sql}\n{ops:?}"
            );
        }
        let complete = opcodes(&conn, tasks::COMPLETE);
        assert!(
            !complete.iter().any(|op| op.starts_with("Fk")),
            "COMPLETE checks a foreign key: {complete:?}"
        );
        // What these assertions look for is there when a statement has it: a re-route
        // sets ti_uuid, which keeps its foreign key, and an IN list of three builds a
        // b-tree.
        assert!(opcodes(&conn, tasks::REASSIGN)
            .iter()
            .any(|op| op.starts_with("Fk")));
        let in_list = opcodes(&conn, "SELECT 1 FROM tasks WHERE status IN ('a', 'b', 'c')");
        assert!(in_list.iter().any(|op| op == "OpenEphemeral"));
    }

    #[test]
    fn v9_rebuilds_tasks_keeping_every_task_and_decision_and_every_constraint_that_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v8.db");
        // A file as round 2 left it (V8), foreign keys on as the service writes: a TI, an
        // unfinished task and a completed one, each with its decision.
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            embedded::migrations::runner()
                .set_target(refinery::Target::Version(8))
                .run(&mut conn)
                .unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            conn.execute_batch(
                "INSERT INTO task_instances (ti_uuid, host, port, model_name, callback_token,
                                             registered_at, kind, max_concurrency)
                 VALUES ('ti-1', '127.0.0.1', 9001, 'm', 'tok', 1.0, 'openai', 4);
                 INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid,
                                    predicted_ms, predicted_error_ms, submit_time, origin)
                 VALUES ('t-open', 'm', '{}', '{}', 'scheduled', 'ti-1', 5.0, 1.0, 10.0, 'openai');
                 INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid,
                                    predicted_ms, predicted_error_ms, submit_time, completion_time,
                                    execution_time_ms, result, outcome, result_ti,
                                    prompt_tokens, completion_tokens, ttft_ms)
                 VALUES ('t-done', 'm', '{\"prompt\":\"hi\"}', '{\"n\":1}', 'completed', 'ti-1',
                         5.0, 1.0, 11.0, 12.5, 4.0, '{\"ok\":true}', 'succeeded', 'ti-1',
                         3, 16, 0.8);
                 INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode,
                                        predicted_ms, predicted_error_ms, prediction_source,
                                        lookup_fallback, chosen_ti, candidates)
                 VALUES ('t-open', 10.0, 'submit', 'min_time', 'default', 5.0, 1.0, 'prior', 0,
                         'ti-1', '[]'),
                        ('t-done', 11.0, 'submit', 'min_time', 'default', 5.0, 1.0, 'prior', 0,
                         'ti-1', '[]');",
            )
            .unwrap();
        }
        assert_eq!(migrate(&path).unwrap(), 1);

        let conn = write_connection(&path, Durability::Full).unwrap();
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        // Dropping the old table did not cascade: both decisions are there.
        assert_eq!(count("SELECT count(*) FROM decisions"), 2);
        let done: (String, String, String, String, f64, i64, String, f64) = conn
            .query_row(
                "SELECT task_input, metadata, result, result_ti, completion_time,
                        completion_tokens, origin, ttft_ms
                 FROM tasks WHERE task_id = 't-done'",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(
            done,
            (
                r#"{"prompt":"hi"}"#.to_string(),
                r#"{"n":1}"#.to_string(),
                r#"{"ok":true}"#.to_string(),
                "ti-1".to_string(),
                12.5,
                16,
                "queue".to_string(),
                0.8
            )
        );
        assert_eq!(
            count("SELECT count(*) FROM tasks WHERE task_id = 't-open' AND origin = 'openai'"),
            1
        );
        // The four indexes are back.
        assert_eq!(
            count("SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'tasks' AND sql IS NOT NULL"),
            4
        );
        // The constraints that stay still hold: status, and ti_uuid's foreign key; and
        // deleting a task still takes its decisions with it.
        let bad_status = conn.execute(
            "UPDATE tasks SET status = 'done' WHERE task_id = 't-open'",
            [],
        );
        assert!(bad_status
            .unwrap_err()
            .to_string()
            .contains("CHECK constraint failed"));
        let bad_ti = conn.execute(
            "UPDATE tasks SET ti_uuid = 'nope' WHERE task_id = 't-open'",
            [],
        );
        assert!(bad_ti
            .unwrap_err()
            .to_string()
            .contains("FOREIGN KEY constraint failed"));
        conn.execute("DELETE FROM tasks WHERE task_id = 't-done'", [])
            .unwrap();
        assert_eq!(count("SELECT count(*) FROM decisions"), 1);
        assert_eq!(count("SELECT count(*) FROM pragma_foreign_key_check"), 0);
    }

    #[test]
    fn a_file_migrated_by_a_newer_version_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("newer.db");
        migrate(&path).unwrap();
        let known: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT MAX(version) FROM refinery_schema_history",
                [],
                |r| r.get(0),
            )
            .unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
                 VALUES (?1, 'from_the_future', '2030-01-01T00:00:00Z', '1')",
                [known + 1],
            )
            .unwrap();
        let err = migrate(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "database {} was created by a newer ti-scheduler, schema V{}; this binary knows V{known}",
                path.display(),
                known + 1
            )
        );
    }
}
