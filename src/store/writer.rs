//! The group-commit writer: the one owner of SQLite's write connection.
//!
//! The writer is a dedicated thread holding a rusqlite connection. Callers hand it a
//! write (a closure over the connection) and wait for the answer. The thread takes every
//! write that is waiting, up to `max_batch`, runs them one after the other in one
//! transaction and commits once, so many writes share one commit (one fsync). While it
//! commits, the next batch gathers in the channel. Every caller hears back only after the
//! commit: a success answer means the write is durable. If any write of a batch fails, the
//! whole batch is rolled back and every caller gets an error: nothing is ever
//! half-written, and no write pays for a savepoint of its own. (Writes fail only on I/O
//! errors or bugs: expected conflicts, such as an existing `task_id`, are handled inside
//! the statements.)
//!
//! A thread rather than an async task: a batch runs start to finish without giving way,
//! so a commit never waits behind HTTP work in the runtime's queue, and each statement
//! runs where the connection lives instead of being handed to a connection thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StoreError;
use crate::telemetry;

/// How a batch ended, as each of its callers learns it.
type Outcome = Result<(), Arc<StoreError>>;

/// What a write sends back to its caller once the batch's outcome is known.
type Reply = Box<dyn FnOnce(Outcome) + Send>;

/// How one write of a batch went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ran {
    Succeeded,
    Failed,
    /// Failed because the database is full.
    Full,
}

/// One queued write: runs on the connection; says how it went and how to answer its
/// caller.
type Job = Box<dyn FnOnce(&Connection) -> (Ran, Reply) + Send>;

enum Message {
    Write(Job),
    /// Refuse new writes, commit those already queued, then end.
    Stop,
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Message>,
    /// True while the last batch failed because the database is full.
    full: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer thread on `conn`. It ends when `stop` is cancelled (or every
    /// handle is dropped), after committing what was already queued; later writes get
    /// [`StoreError::WriterClosed`]. The returned task finishes when the thread has ended
    /// and the connection is closed.
    pub fn spawn(
        conn: Connection,
        max_batch: usize,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let max_batch = max_batch.max(1);
        let (jobs, rx) = mpsc::channel(max_batch * 4);
        let (ended, mut ended_rx) = oneshot::channel::<()>();
        let full = Arc::new(AtomicBool::new(false));
        let flag = full.clone();
        std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || {
                run(conn, rx, max_batch, &flag);
                let _ = ended.send(());
            })?;
        // Only a weak handle, so that dropping every `Writer` still ends the thread.
        let weak = jobs.downgrade();
        let handle = tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {
                    if let Some(jobs) = weak.upgrade() {
                        let _ = jobs.send(Message::Stop).await;
                    }
                }
                _ = &mut ended_rx => return,
            }
            let _ = ended_rx.await;
        });
        Ok((Self { jobs, full }, handle))
    }

    /// True while the last batch failed because the database is full (the disk, or
    /// `database.max_size_mb`); false again once a batch commits.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Runs `write` in the next batch and returns its output once the batch is committed.
    ///
    /// If `write` fails, or another write of its batch does, or the commit does, the
    /// batch is rolled back and this returns the error.
    pub async fn run<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |conn| {
            let output = write(conn);
            let ran = match &output {
                Ok(_) => Ran::Succeeded,
                Err(e) if e.is_full() => Ran::Full,
                Err(_) => Ran::Failed,
            };
            let reply = Box::new(move |batch: Outcome| {
                let answer = match (output, batch) {
                    // Our own error says more than the batch's.
                    (Err(e), _) => Err(e),
                    (Ok(value), Ok(())) => Ok(value),
                    (Ok(_), Err(e)) => Err(StoreError::Batch(e)),
                };
                // The caller may have gone away (client disconnected); the outcome
                // stands either way.
                let _ = tx.send(answer);
            }) as Reply;
            (ran, reply)
        });
        self.jobs
            .send(Message::Write(job))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }
}

/// The writer thread: one transaction per batch of waiting writes, until stopped.
fn run(mut conn: Connection, mut rx: mpsc::Receiver<Message>, max_batch: usize, full: &AtomicBool) {
    let mut batch = Vec::with_capacity(max_batch);
    // After `close`, the channel still yields what was queued, then `None`.
    while let Some(first) = rx.blocking_recv() {
        match first {
            Message::Write(job) => batch.push(job),
            Message::Stop => {
                rx.close();
                continue;
            }
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(Message::Write(job)) => batch.push(job),
                Ok(Message::Stop) => rx.close(),
                Err(_) => break,
            }
        }
        write_batch(&mut conn, &mut batch, full);
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = ?e, "closing the write connection failed");
    }
}

/// Runs every write of `batch` in one transaction and answers each caller.
fn write_batch(conn: &mut Connection, batch: &mut Vec<Job>, full: &AtomicBool) {
    let started = Instant::now();
    let size = batch.len();
    let mut replies = Vec::with_capacity(size);
    let outcome = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(txn) => {
            let mut all_succeeded = true;
            let mut any_full = false;
            for job in batch.drain(..) {
                // A write that panics fails its batch like one that returns an error (its
                // caller hears that the writer dropped it); the thread lives on.
                match std::panic::catch_unwind(AssertUnwindSafe(|| job(&txn))) {
                    Ok((ran, reply)) => {
                        all_succeeded &= ran == Ran::Succeeded;
                        any_full |= ran == Ran::Full;
                        replies.push(reply);
                    }
                    Err(_) => {
                        tracing::error!("a write panicked; its batch is rolled back");
                        all_succeeded = false;
                    }
                }
            }
            if all_succeeded {
                txn.commit().map_err(StoreError::from)
            } else {
                let rolled_back = txn.rollback();
                Err(if any_full {
                    // SQLite may have rolled the transaction back itself on SQLITE_FULL,
                    // so the rollback's own error says nothing new.
                    StoreError::BatchFull
                } else {
                    rolled_back.map_or_else(StoreError::from, |()| StoreError::BatchFailed)
                })
            }
        }
        Err(e) => {
            // Nothing ran; dropping the jobs answers each caller with an error.
            batch.clear();
            Err(StoreError::from(e))
        }
    };
    let elapsed = started.elapsed();
    metrics::histogram!(telemetry::DB_COMMIT).record(elapsed.as_secs_f64());
    metrics::histogram!(telemetry::DB_BATCH_SIZE).record(size as f64);
    tracing::trace!(
        size,
        elapsed_us = elapsed.as_micros() as u64,
        "batch written"
    );
    // Any other failure says nothing about space: the flag waits for a commit.
    match &outcome {
        Ok(()) => full.store(false, Ordering::Relaxed),
        Err(e) if e.is_full() => full.store(true, Ordering::Relaxed),
        Err(_) => {}
    }
    let outcome = outcome.map_err(|e| {
        tracing::error!(error = ?e, size, "batch rolled back");
        Arc::new(e)
    });
    for reply in replies {
        reply(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{open, Db, Durability, SettingsRepo};

    /// A database in `dir` whose writer is kept busy for 200 ms, so that the writes
    /// queued meanwhile share the next batch; returns the busy write's task too.
    async fn busy_db(
        dir: &tempfile::TempDir,
        stop: &CancellationToken,
    ) -> (
        Db,
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (db, handle) = open(
            &dir.path().join("w.db"),
            Durability::Normal,
            1,
            64,
            stop.clone(),
        )
        .await
        .unwrap();
        let writer = db.writer.clone();
        let busy = tokio::spawn(async move {
            writer
                .run(|_conn| {
                    std::thread::sleep(Duration::from_millis(200));
                    Ok(())
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        (db, handle, busy)
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back_its_whole_batch_and_every_caller_hears_it() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle, busy) = busy_db(&dir, &stop).await;
        let good = db
            .writer
            .run(|conn| SettingsRepo::set(conn, "strategy", "weighted"));
        let bad = db.writer.run(|conn| {
            SettingsRepo::set(conn, "predict_mode", "default")?;
            Err::<(), _>(StoreError::Corrupt("refused".into()))
        });
        let (good, bad) = tokio::join!(good, bad);
        assert!(busy.await.unwrap().is_ok());
        assert!(matches!(good, Err(StoreError::Batch(_))), "{good:?}");
        assert!(matches!(bad, Err(StoreError::Corrupt(_))), "{bad:?}");
        assert_eq!(SettingsRepo::get(&db.read, "strategy").await.unwrap(), None);
        assert_eq!(
            SettingsRepo::get(&db.read, "predict_mode").await.unwrap(),
            None
        );

        let after = db
            .writer
            .run(|conn| SettingsRepo::set(conn, "strategy", "weighted"));
        assert!(after.await.is_ok(), "the next batch commits");
        assert_eq!(
            SettingsRepo::get(&db.read, "strategy")
                .await
                .unwrap()
                .as_deref(),
            Some("weighted")
        );
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn a_write_that_panics_fails_its_batch_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle, busy) = busy_db(&dir, &stop).await;
        let good = db
            .writer
            .run(|conn| SettingsRepo::set(conn, "strategy", "weighted"));
        let panics = db.writer.run(|_conn| -> Result<(), StoreError> {
            panic!("a bug in a write");
        });
        let (good, panics) = tokio::join!(good, panics);
        assert!(busy.await.unwrap().is_ok());
        assert!(matches!(good, Err(StoreError::Batch(_))), "{good:?}");
        assert!(panics.is_err(), "{panics:?}");
        assert_eq!(SettingsRepo::get(&db.read, "strategy").await.unwrap(), None);

        let after = db
            .writer
            .run(|conn| SettingsRepo::set(conn, "strategy", "weighted"));
        assert!(after.await.is_ok(), "the writer still commits");
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn stopping_commits_what_is_queued_then_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle) = open(
            &dir.path().join("w.db"),
            Durability::Full,
            1,
            4,
            stop.clone(),
        )
        .await
        .unwrap();
        let queued: Vec<_> = (0..10)
            .map(|i| {
                let writer = db.writer.clone();
                tokio::spawn(async move {
                    writer
                        .run(move |conn| SettingsRepo::set(conn, &format!("k{i}"), "v"))
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        handle.await.unwrap();
        for q in queued {
            assert!(q.await.unwrap().is_ok());
        }
        for i in 0..10 {
            let key = format!("k{i}");
            assert_eq!(
                SettingsRepo::get(&db.read, &key).await.unwrap().as_deref(),
                Some("v"),
                "{key}"
            );
        }
        let late = db
            .writer
            .run(|conn| SettingsRepo::set(conn, "late", "v"))
            .await;
        assert!(matches!(late, Err(StoreError::WriterClosed)), "{late:?}");
    }
}
