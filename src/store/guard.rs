//! What guards a database file before the service uses it: an exclusive lock, so two
//! processes never share one file, and an integrity check, so a corrupt file is refused
//! at start rather than failing the queries that touch the bad page.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::StoreError;

/// An exclusive lock on a database file, held until dropped (or until the process ends,
/// however it ends: the operating system releases it).
///
/// The lock is on `<db>.lock` beside the file, which holds the holder's pid. The lock
/// file is left in place when released: removing it could let two processes lock two
/// different files of the same name.
#[derive(Debug)]
pub struct DbLock {
    _file: File,
    path: PathBuf,
}

impl DbLock {
    /// Locks `<db>.lock` (creating it and the directory) or fails with one line naming
    /// the file and, if it wrote it, the holder's pid.
    pub fn acquire(db: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder may not have written its pid yet.
                let _ = file.read_to_string(&mut holder);
                let pid = holder.trim();
                let who = if pid.is_empty() {
                    "another process".to_string()
                } else {
                    format!("another process (pid {pid})")
                };
                return Err(StoreError::Locked(format!(
                    "database {} is in use by {who}: {} is locked; stop that process first",
                    db.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::Io(e)),
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Problems listed in the refusal at most.
const PROBLEMS_SHOWN: usize = 3;

/// Runs `PRAGMA quick_check` on the file, if it exists; a file that fails it is refused
/// with one line naming it, its first problems and the command to inspect it. Returns
/// how long the check took, ms.
pub fn quick_check(db: &Path) -> Result<u64, StoreError> {
    if !db.exists() {
        return Ok(0);
    }
    let started = Instant::now();
    let refuse = |problems: String| {
        StoreError::Damaged(format!(
            "database {} failed PRAGMA quick_check ({problems}); inspect it with: sqlite3 {} 'PRAGMA integrity_check'",
            db.display(),
            db.display()
        ))
    };
    let checked = rusqlite::Connection::open(db).and_then(|conn| {
        let mut stmt = conn.prepare(&format!("PRAGMA quick_check({PROBLEMS_SHOWN})"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<Vec<String>, _>>()
    });
    match checked {
        Ok(lines) if lines.len() == 1 && lines[0] == "ok" => {
            Ok(started.elapsed().as_millis() as u64)
        }
        Ok(lines) => Err(refuse(lines.join("; ").replace('\n', " "))),
        // A file too damaged to be read at all.
        Err(rusqlite::Error::SqliteFailure(e, msg))
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            ) =>
        {
            Err(refuse(msg.unwrap_or_else(|| e.to_string())))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_file_fails_naming_the_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub").join("x.db");
        let first = DbLock::acquire(&db).unwrap();
        let err = DbLock::acquire(&db).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("x.db.lock"), "{err}");
        assert!(!err.contains('\n'));
        drop(first);
        DbLock::acquire(&db).unwrap();
    }

    #[test]
    fn a_missing_file_passes_the_check_and_a_fresh_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        assert_eq!(quick_check(&db).unwrap(), 0);
        super::super::migrate(&db).unwrap();
        quick_check(&db).unwrap();
    }
}
