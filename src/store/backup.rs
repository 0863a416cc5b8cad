//! Online backup: a consistent copy of a database file, taken while the service runs.
//!
//! SQLite makes the copy (`VACUUM INTO`) on a read-only connection, inside one read
//! transaction: the copy is the database as of one commit, the WAL's committed pages
//! included, and compact. In WAL mode a reader never blocks the writer, so the service
//! goes on committing meanwhile; its WAL only grows until the copy is done (a checkpoint
//! cannot pass a reader). The service's file lock (`<db>.lock`) is neither taken nor
//! checked: a backup is meant to run beside the service.
//!
//! Then the copy is checked (`PRAGMA quick_check`), its tasks counted, and it is flushed
//! to disk (SQLite does not fsync a `VACUUM INTO` file) with its directory entry.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How long SQLite waits on a lock of the file before giving up (a reader only waits in
/// the rare moments a WAL is being reset or recovered).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// Size of the copy, bytes.
    pub bytes: u64,
    /// Tasks in the copy.
    pub tasks: i64,
    /// The highest migration applied to the copy (its schema version).
    pub schema: i64,
}

/// Why a backup was refused or failed. A copy that was started is removed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The database to copy does not exist (a backup never creates one).
    #[error(
        "database {0} does not exist; give the one the service uses (--db, --config or TI_SCHEDULER__DATABASE__PATH)"
    )]
    NoDatabase(PathBuf),
    /// The target exists: a backup never overwrites a file.
    #[error(
        "{0} already exists; a backup never overwrites a file: give a new name or remove it first"
    )]
    TargetExists(PathBuf),
    /// SQLite takes the target's name as text.
    #[error("the backup file name {0} is not valid UTF-8")]
    TargetName(PathBuf),
    /// The target cannot be created (no such directory, no permission) or flushed.
    #[error("cannot write the backup {path}")]
    Target {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not read the database or write the copy.
    #[error("copying {from} to {to} failed")]
    Copy {
        /// The database.
        from: PathBuf,
        /// The target.
        to: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The copy failed its check, or is not a ti-scheduler database (no `tasks` table).
    #[error("the copy of {from} is not usable: {problem}")]
    Unusable {
        /// The database.
        from: PathBuf,
        /// What is wrong with the copy.
        problem: String,
    },
}

/// Copies the database `db` to the new file `to` (which must not exist), while a service
/// may be using `db`. On error nothing is left at `to`.
pub fn backup(db: &Path, to: &Path) -> Result<BackupReport, BackupError> {
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db.to_path_buf()));
    }
    let name = to
        .to_str()
        .ok_or_else(|| BackupError::TargetName(to.to_path_buf()))?;
    // Creating the file with create_new refuses an existing one atomically; SQLite then
    // writes into the empty file (VACUUM INTO accepts an empty target, not another).
    let target = match OpenOptions::new().write(true).create_new(true).open(to) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(BackupError::TargetExists(to.to_path_buf()))
        }
        Err(source) => {
            return Err(BackupError::Target {
                path: to.to_path_buf(),
                source,
            })
        }
    };
    let made = copy(db, to, name).and_then(|()| {
        let report = check_copy(db, to)?;
        flush(&target, to)?;
        Ok(report)
    });
    if made.is_err() {
        drop(target);
        // The file is ours (create_new above): a half-made copy must not pass for a backup.
        let _ = std::fs::remove_file(to);
    }
    made
}

/// `VACUUM INTO` on a read-only connection: one read transaction, so one snapshot.
fn copy(db: &Path, to: &Path, name: &str) -> Result<(), BackupError> {
    let failed = |source| BackupError::Copy {
        from: db.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    // Read-only and without SQLITE_OPEN_CREATE: a backup never writes the database (nor
    // creates it), whatever the file's permissions would allow.
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(failed)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(failed)?;
    conn.execute("VACUUM INTO ?1", [name]).map_err(failed)?;
    Ok(())
}

/// Checks the copy and reads its task count and schema version.
fn check_copy(db: &Path, to: &Path) -> Result<BackupReport, BackupError> {
    let unusable = |problem: String| BackupError::Unusable {
        from: db.to_path_buf(),
        problem,
    };
    super::quick_check(to).map_err(|e| unusable(e.to_string()))?;
    let conn = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| unusable(e.to_string()))?;
    let tasks: i64 = conn
        .query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0))
        .map_err(|e| {
            unusable(format!(
                "{e}: {} is not a ti-scheduler database",
                db.display()
            ))
        })?;
    let schema = super::applied_version(&conn).map_err(|e| unusable(e.to_string()))?;
    drop(conn);
    let bytes = std::fs::metadata(to)
        .map_err(|source| BackupError::Target {
            path: to.to_path_buf(),
            source,
        })?
        .len();
    Ok(BackupReport {
        bytes,
        tasks,
        schema,
    })
}

/// Flushes the copy's data and its directory entry to disk: SQLite does not fsync the
/// file of a `VACUUM INTO`, and a backup that a power loss can undo is no backup.
fn flush(target: &File, to: &Path) -> Result<(), BackupError> {
    let failed = |source| BackupError::Target {
        path: to.to_path_buf(),
        source,
    };
    // fsync is per file, not per descriptor: this one reaches what SQLite wrote.
    target.sync_all().map_err(failed)?;
    #[cfg(unix)]
    {
        let dir = match to.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_holds_the_committed_rows_including_those_still_in_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let (db, copy) = (dir.path().join("a.db"), dir.path().join("b.db"));
        super::super::migrate(&db).unwrap();
        // A writer that stays open keeps its commits in the WAL (no checkpoint on close).
        let writer = Connection::open(&db).unwrap();
        writer
            .execute(
                "INSERT INTO tasks (task_id, model_name, task_input, metadata, status, \
                 predicted_ms, predicted_error_ms, submit_time) \
                 VALUES ('t1', 'm', '{}', '{}', 'queued', 1.0, 1.0, 1.0)",
                [],
            )
            .unwrap();
        assert!(
            std::fs::metadata(dir.path().join("a.db-wal"))
                .unwrap()
                .len()
                > 0
        );
        let report = backup(&db, &copy).unwrap();
        assert_eq!(report.tasks, 1);
        assert!(report.schema >= 1);
        assert_eq!(report.bytes, std::fs::metadata(&copy).unwrap().len());
        drop(writer);
    }

    #[test]
    fn a_directory_that_does_not_exist_is_named_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        super::super::migrate(&db).unwrap();
        let to = dir.path().join("no").join("b.db");
        let err = backup(&db, &to).unwrap_err();
        assert!(matches!(err, BackupError::Target { .. }), "{err}");
        assert!(err.to_string().contains("b.db"), "{err}");
        assert!(!to.exists());
    }

    #[test]
    fn a_file_that_is_not_a_ti_scheduler_database_is_refused_and_its_copy_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (db, copy) = (dir.path().join("other.db"), dir.path().join("b.db"));
        Connection::open(&db)
            .unwrap()
            .execute("CREATE TABLE x (y)", [])
            .unwrap();
        let err = backup(&db, &copy).unwrap_err().to_string();
        assert!(err.contains("not a ti-scheduler database"), "{err}");
        assert!(!copy.exists());
    }
}
