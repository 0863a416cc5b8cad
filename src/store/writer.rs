//! The group-commit writer: the one owner of SQLite's write connection.
//!
//! Callers hand it a write (a closure over the connection) and wait for the answer. The
//! writer takes every write that is waiting, up to `max_batch`, runs them in one
//! transaction, each inside its own savepoint, and commits once. A write that fails is
//! rolled back to its savepoint alone; the others still commit. Every caller hears back
//! only after the commit, so a success answer means the write is durable. Throughput
//! comes from sharing one commit (one fsync) among many writes, not from weakening it.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use sqlx::{Connection, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// What a write sends back to its caller once the batch's commit is known.
type Reply = Box<dyn FnOnce(Result<(), Arc<sqlx::Error>>) + Send>;

/// One queued write: runs on the connection, returns how to answer its caller.
type Job = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Reply> + Send>;

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
    /// `write` runs inside a savepoint: if it fails, its own changes are undone and the
    /// error is returned; if the commit fails, every write of the batch gets that error.
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
                let output = in_savepoint(conn, write).await;
                Box::new(move |commit: Result<(), Arc<sqlx::Error>>| {
                    let answer = match commit {
                        Ok(()) => output,
                        Err(e) => Err(StoreError::Commit(e)),
                    };
                    // The caller may have gone away (client disconnected); the write
                    // stands either way.
                    let _ = tx.send(answer);
                }) as Reply
            })
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }
}

async fn in_savepoint<T, F>(conn: &mut SqliteConnection, write: F) -> Result<T, StoreError>
where
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, StoreError>>,
{
    sqlx::query("SAVEPOINT write").execute(&mut *conn).await?;
    let output = write(&mut *conn).await;
    if output.is_err() {
        sqlx::query("ROLLBACK TO write").execute(&mut *conn).await?;
    }
    sqlx::query("RELEASE write").execute(&mut *conn).await?;
    output
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
        let commit = match conn.begin().await {
            Ok(mut txn) => {
                for job in batch.drain(..) {
                    replies.push(job(&mut txn).await);
                }
                txn.commit().await
            }
            Err(e) => {
                // Nothing ran; dropping the jobs answers each caller with an error.
                batch.clear();
                Err(e)
            }
        };
        let elapsed = started.elapsed();
        metrics::histogram!("ti_scheduler_db_commit_seconds").record(elapsed.as_secs_f64());
        metrics::histogram!("ti_scheduler_db_batch_size").record(size as f64);
        tracing::trace!(
            size,
            elapsed_us = elapsed.as_micros() as u64,
            "batch committed"
        );
        let commit = commit.map_err(|e| {
            tracing::error!(error = ?e, size, "batch commit failed");
            Arc::new(e)
        });
        for reply in replies {
            reply(commit.clone());
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = ?e, "closing the write connection failed");
    }
}
