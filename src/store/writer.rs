//! The group-commit writer: the one owner of SQLite's write connection.
//!
//! Callers hand it a write (a closure over the connection) and wait for the answer. The
//! writer takes every write that is waiting, up to `max_batch`, runs them one after the
//! other in one transaction and commits once, so many writes share one commit (one fsync).
//! Every caller hears back only after the commit: a success answer means the write is
//! durable. If any write of a batch fails, the whole batch is rolled back and every caller
//! gets an error: nothing is ever half-written, and no write pays for a savepoint of its
//! own. (Writes fail only on I/O errors or bugs: expected conflicts, such as an existing
//! `task_id`, are handled inside the statements.)

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// How a batch ended, as each of its callers learns it.
type Outcome = Result<(), Arc<StoreError>>;

/// What a write sends back to its caller once the batch's outcome is known.
type Reply = Box<dyn FnOnce(Outcome) + Send>;

/// One queued write: runs on the connection; says whether it succeeded and how to answer
/// its caller.
type Job = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, (bool, Reply)> + Send>;

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer task on `conn`. It ends when `stop` is cancelled (or every handle
    /// is dropped), after committing what was already queued; later writes get
    /// [`StoreError::WriterClosed`].
    pub fn spawn(
        conn: SqliteConnection,
        max_batch: usize,
        stop: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(max_batch.max(1) * 4);
        let handle = tokio::spawn(run(conn, rx, max_batch.max(1), stop));
        (Self { jobs }, handle)
    }

    /// Runs `write` in the next batch and returns its output once the batch is committed.
    ///
    /// If `write` fails, or another write of its batch does, or the commit does, the
    /// batch is rolled back and this returns the error.
    pub async fn run<T, F>(&self, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>
            + Send
            + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let output = write(conn).await;
                let succeeded = output.is_ok();
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
                (succeeded, reply)
            })
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }
}

async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut stopping = false;
    loop {
        let received = if stopping {
            rx.recv_many(&mut batch, max_batch).await
        } else {
            tokio::select! {
                n = rx.recv_many(&mut batch, max_batch) => n,
                _ = stop.cancelled() => {
                    // Refuse new writes; commit those already queued, then stop.
                    rx.close();
                    stopping = true;
                    continue;
                }
            }
        };
        if received == 0 {
            break;
        }
        let started = Instant::now();
        let size = batch.len();
        let mut replies = Vec::with_capacity(size);
        let outcome = match conn.begin().await {
            Ok(mut txn) => {
                let mut all_succeeded = true;
                for job in batch.drain(..) {
                    let (succeeded, reply) = job(&mut txn).await;
                    all_succeeded &= succeeded;
                    replies.push(reply);
                }
                if all_succeeded {
                    txn.commit().await.map_err(StoreError::from)
                } else {
                    let rolled_back = txn.rollback().await;
                    Err(rolled_back.map_or_else(StoreError::from, |()| StoreError::BatchFailed))
                }
            }
            Err(e) => {
                // Nothing ran; dropping the jobs answers each caller with an error.
                batch.clear();
                Err(StoreError::from(e))
            }
        };
        let elapsed = started.elapsed();
        metrics::histogram!("ti_scheduler_db_commit_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("ti_scheduler_db_batch_size").record(size as f64);
        tracing::trace!(
            size,
            elapsed_us = elapsed.as_micros() as u64,
            "batch written"
        );
        let outcome = outcome.map_err(|e| {
            tracing::error!(error = ?e, size, "batch rolled back");
            Arc::new(e)
        });
        for reply in replies {
            reply(outcome.clone());
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = ?e, "closing the write connection failed");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{open, Durability, SettingsRepo};

    #[tokio::test]
    async fn a_failed_write_rolls_back_its_whole_batch_and_every_caller_hears_it() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle) = open(
            &dir.path().join("w.db"),
            Durability::Normal,
            1,
            64,
            stop.clone(),
        )
        .await
        .unwrap();
        // Keep the writer busy so that the next two writes share a batch.
        let writer = db.writer.clone();
        let busy = tokio::spawn(async move {
            writer
                .run(|_conn| {
                    Box::pin(async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(())
                    })
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let good = db.writer.run(|conn| {
            Box::pin(async move { SettingsRepo::set(conn, "strategy", "weighted").await })
        });
        let bad = db.writer.run(|conn| {
            Box::pin(async move {
                SettingsRepo::set(conn, "predict_mode", "default").await?;
                Err::<(), _>(StoreError::Corrupt("refused".into()))
            })
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

        let after = db.writer.run(|conn| {
            Box::pin(async move { SettingsRepo::set(conn, "strategy", "weighted").await })
        });
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
}
