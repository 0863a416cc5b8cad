//! Checkpoints beside the writer (SQLite).
//!
//! Commits go to the WAL; a checkpoint copies them into the database file and syncs it.
//! SQLite's automatic checkpoint runs inside the commit that takes the WAL past 1 000
//! pages: it copies them all and syncs the file there, on the writer's thread, and the
//! callers of that batch and every write queued behind it wait (several ms; at
//! `durability = "normal"` also the sync of every commit since the last one, up to tens of
//! ms). This thread runs a PASSIVE checkpoint on its own connection every [`EVERY_FULL`]
//! ([`EVERY_NORMAL`] at `durability = "normal"`), so each copies and syncs only what was
//! committed since, and never blocks the writer.
//!
//! The writer keeps the automatic checkpoint. Under continuous writes a passive
//! checkpoint from another connection never finds the whole WAL copied (a commit lands
//! while it runs), and SQLite starts the WAL over only then: alone, this thread would
//! let the WAL grow without bound (README, Performance: tried in round 1). The writer's
//! checkpoint now finds only the last pages left to copy.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// Time between two checkpoints at `durability = "full"`, where every commit has synced
/// its own WAL frames and a checkpoint syncs the database file.
pub(super) const EVERY_FULL: Duration = Duration::from_millis(20);

/// Time between two checkpoints at `durability = "normal"`, where commits do not sync and
/// a checkpoint syncs the WAL too: a commit that lands during that sync waits for it, so
/// each holds half as many commits as at FULL (README, What it costs: one client's p99).
pub(super) const EVERY_NORMAL: Duration = Duration::from_millis(10);

/// Time between two checkpoints of a database whose commits sync (`synced`, FULL) or not.
pub(super) fn interval(synced: bool) -> Duration {
    if synced {
        EVERY_FULL
    } else {
        EVERY_NORMAL
    }
}

/// The checkpoint thread; dropping it stops the thread and closes its connection.
pub(super) struct Checkpointer {
    /// Dropped to stop the thread.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the database file at `path` once `every`.
    pub(super) fn start(path: &Path, every: Duration) -> std::io::Result<Self> {
        let conn = Connection::open(path).map_err(std::io::Error::other)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("db-checkpoint".into())
            .spawn(move || run(&conn, every, &stopped))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, every: Duration, stopped: &mpsc::Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
        // Busy (the writer's own checkpoint is under way) and failures are harmless: the
        // writer's automatic checkpoint still bounds the WAL.
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match done {
            Ok((wal_pages, copied)) => tracing::trace!(wal_pages, copied, "checkpoint"),
            Err(e) => tracing::debug!(error = %e, "checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Durability;
    use crate::store::write_connection;

    /// Commits `rows` rows of about 1 KiB (a quarter of a page each) in one transaction.
    fn write_rows(conn: &mut Connection, rows: usize) {
        let filler = "x".repeat(1000);
        let tx = conn.transaction().unwrap();
        for _ in 0..rows {
            tx.execute("INSERT INTO t (v) VALUES (?1)", [&filler])
                .unwrap();
        }
        tx.commit().unwrap();
    }

    /// A write connection to `c.db` in `dir` with a table `t` settled into the file (the
    /// WAL empty), and the file's size then.
    fn settled(dir: &tempfile::TempDir) -> (Connection, std::path::PathBuf, u64) {
        let path = dir.path().join("c.db");
        let writer = write_connection(&path, Durability::Full).unwrap();
        writer.execute("CREATE TABLE t (v TEXT)", []).unwrap();
        writer
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        (writer, path, size)
    }

    #[test]
    fn commits_reach_the_database_file_without_waiting_for_the_automatic_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        // About 100 pages are committed: far below the automatic checkpoint's 1 000, so
        // only this thread can copy them.
        let (mut writer, path, before) = settled(&dir);
        let checkpoints = Checkpointer::start(&path, EVERY_FULL).unwrap();
        write_rows(&mut writer, 400);
        let grown = || std::fs::metadata(&path).unwrap().len() >= before + 90 * 4096;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !grown() && std::time::Instant::now() < deadline {
            std::thread::sleep(EVERY_FULL);
        }
        assert!(
            grown(),
            "the file grew from {before} to {} bytes only",
            std::fs::metadata(&path).unwrap().len()
        );
        drop(checkpoints);
    }

    #[test]
    fn without_it_the_commits_stay_in_the_wal() {
        // The control of the test above: the same writes, no checkpoint thread.
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, path, before) = settled(&dir);
        write_rows(&mut writer, 400);
        std::thread::sleep(EVERY_FULL * 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
    }

    #[test]
    fn the_wal_stays_bounded_under_continuous_writes_and_goes_at_the_last_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let wal = dir.path().join("c.db-wal");
        let mut writer = write_connection(&path, Durability::Normal).unwrap();
        writer.execute("CREATE TABLE t (v TEXT)", []).unwrap();
        let checkpoints = Checkpointer::start(&path, EVERY_FULL).unwrap();
        // About 5 000 pages, written without a pause: five times the WAL's usual size.
        let mut largest = 0;
        for _ in 0..100 {
            write_rows(&mut writer, 200);
            largest = largest.max(std::fs::metadata(&wal).unwrap().len());
        }
        assert!(largest < 3 * 1024 * 4096, "the WAL reached {largest} bytes");
        drop(checkpoints);
        writer.close().unwrap();
        assert!(
            !wal.exists(),
            "the last connection to close removes the WAL"
        );
    }
}
