//! The group-commit writer: the one owner of the database's write connection.
//!
//! The writer is a dedicated thread holding the write connection: rusqlite for SQLite, a
//! sqlx connection driven by a small runtime of the thread's own for PostgreSQL. Callers
//! hand it a write (a closure over a [`Tx`]) and wait for the answer. The thread takes
//! every write that is waiting, up to `max_batch`, runs them one after the other in one
//! transaction and commits once, so many writes share one commit (one fsync). While it
//! commits, the next batch gathers in the channel. Every caller hears back only after the
//! commit: a success answer means the write is durable (for a [`Flush::Deferred`] write,
//! durable against a crash of the process, and of the machine once the next commit or
//! checkpoint has synced the WAL). If any write of a batch fails, the
//! whole batch is rolled back and every caller gets an error: nothing is ever
//! half-written, and no write pays for a savepoint of its own. (Writes fail only on I/O
//! errors or bugs: expected conflicts, such as an existing `task_id`, are handled inside
//! the statements.)
//!
//! On PostgreSQL with high availability, every batch first reads the lease row `FOR
//! SHARE` and checks its epoch ([`Fence`]): a leader that lost its lease cannot commit,
//! and a take-over waits for the commit under way.
//!
//! On SQLite a second thread checkpoints beside the writer (`checkpoint.rs`), so that a
//! commit seldom has to copy the WAL into the database file itself.
//!
//! A thread rather than an async task: a batch runs start to finish without giving way,
//! so a commit never waits behind HTTP work in the runtime's queue, and each statement
//! runs where the connection lives instead of being handed to a connection thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use sqlx::{Connection as _, PgConnection};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::checkpoint::{self, Checkpointer};
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

/// One queued write: runs in the batch's transaction; says how it went and how to answer
/// its caller.
type Job = Box<dyn FnOnce(&mut Tx<'_>) -> (Ran, Reply) + Send>;

enum Message {
    Write(Job, Flush),
    /// Refuse new writes, commit those already queued, then end.
    Stop,
}

/// When a write's commit must reach the disk. A batch is flushed as its most demanding
/// write asks (`Deferred < OnCommit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flush {
    /// With the next commit that is flushed, or the next checkpoint: for a write whose
    /// loss in a crash of the machine (not of the process: the commit is in the OS's
    /// hands) the system recovers from, such as the outcome of a front-door request its
    /// client already has. At `durability = "full"`, a batch of only such writes commits
    /// without waiting for `fsync` (SQLite's `synchronous = NORMAL`, PostgreSQL's
    /// `synchronous_commit = off`, for that transaction alone), so that the next write
    /// someone waits for does not queue behind a sync nobody waits for.
    Deferred,
    /// Before its caller hears back, at the configured durability.
    OnCommit,
}

/// The open transaction of a batch, as each write sees it.
pub enum Tx<'a> {
    /// SQLite: the write connection, inside its transaction.
    Sqlite(&'a Connection),
    /// PostgreSQL.
    Postgres(PgTx<'a>),
}

/// A PostgreSQL transaction on the writer thread: statements run to completion on the
/// thread's own runtime (`rt.block_on(query.execute(&mut *conn))`).
pub struct PgTx<'a> {
    pub(super) rt: &'a Runtime,
    pub(super) conn: &'a mut PgConnection,
}

/// The lease epoch a leader writes under (PostgreSQL high availability).
#[derive(Clone, Debug)]
pub struct Fence {
    /// The epoch this node's lease has.
    pub epoch: i64,
    /// Cancelled when a batch finds another epoch: this node is no longer the leader.
    pub deposed: CancellationToken,
    /// The longest a batch's transaction may sit idle between two statements before the
    /// server ends the session (`idle_in_transaction_session_timeout`). The transaction
    /// holds the lease row `FOR SHARE` until it ends, and a take-over waits for that lock:
    /// without a limit, a leader paused (SIGSTOP, a stalled VM) inside a batch would keep
    /// every standby from taking over until it resumed.
    pub idle_limit: Duration,
}

/// What the thread writes to.
pub(super) enum Target {
    Sqlite(Connection),
    Postgres {
        /// `postgres://...`, to reconnect after the connection is lost.
        url: String,
        /// `SET synchronous_commit = off` for `durability = "normal"`.
        synchronous_commit: bool,
        fence: Option<Fence>,
    },
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Message>,
    /// True while the last batch failed because the database is full.
    full: Arc<AtomicBool>,
}

impl Writer {
    /// Starts the writer thread on `target`. It ends when `stop` is cancelled (or every
    /// handle is dropped), after committing what was already queued; later writes get
    /// [`StoreError::WriterClosed`]. The returned task finishes when the thread has ended
    /// and the connection is closed. On PostgreSQL the thread connects first, and a
    /// failure to connect is returned here.
    pub(super) async fn spawn(
        target: Target,
        max_batch: usize,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StoreError> {
        let max_batch = max_batch.max(1);
        let (jobs, rx) = mpsc::channel(max_batch * 4);
        let (ended, mut ended_rx) = oneshot::channel::<()>();
        let (opened, opened_rx) = oneshot::channel::<Result<(), StoreError>>();
        let full = Arc::new(AtomicBool::new(false));
        let flag = full.clone();
        std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || {
                match Connected::open(target) {
                    Ok(mut conn) => {
                        let _ = opened.send(Ok(()));
                        run(&mut conn, rx, max_batch, &flag);
                        conn.close();
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                    }
                }
                let _ = ended.send(());
            })?;
        opened_rx.await.map_err(|_| StoreError::WriterClosed)??;
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
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.run_flushed(Flush::OnCommit, write).await
    }

    /// [`Self::run`], with the commit flushed to disk as `flush` says.
    pub async fn run_flushed<T, F>(&self, flush: Flush, write: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
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
            .send(Message::Write(job, flush))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }
}

/// The thread's open connection.
enum Connected {
    Sqlite {
        conn: Connection,
        /// The thread that checkpoints beside it (`None` for a database in memory).
        checkpoints: Option<Checkpointer>,
        /// True when the configured durability is `synchronous = FULL`.
        synced: bool,
        /// The level the connection is at now: FULL, or NORMAL for deferred batches.
        at_full: bool,
    },
    Postgres {
        rt: Runtime,
        /// `None` after the connection was lost, until the next batch reconnects.
        conn: Option<PgConnection>,
        url: String,
        synchronous_commit: bool,
        fence: Option<Fence>,
    },
}

impl Connected {
    fn open(target: Target) -> Result<Self, StoreError> {
        match target {
            Target::Sqlite(conn) => {
                let synced = conn
                    .pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))?
                    >= SYNCHRONOUS_FULL;
                let every = checkpoint::interval(synced);
                let checkpoints = match conn.path().filter(|p| !p.is_empty()) {
                    Some(path) => Some(Checkpointer::start(std::path::Path::new(path), every)?),
                    None => None,
                };
                Ok(Self::Sqlite {
                    conn,
                    checkpoints,
                    synced,
                    at_full: synced,
                })
            }
            Target::Postgres {
                url,
                synchronous_commit,
                fence,
            } => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let conn = rt.block_on(pg_connect(&url, synchronous_commit, fence.as_ref()))?;
                Ok(Self::Postgres {
                    rt,
                    conn: Some(conn),
                    url,
                    synchronous_commit,
                    fence,
                })
            }
        }
    }

    fn close(self) {
        match self {
            Self::Sqlite {
                conn, checkpoints, ..
            } => {
                // Its connection closes first, so that the writer's is the last one and
                // removes the WAL.
                drop(checkpoints);
                if let Err((_, e)) = conn.close() {
                    tracing::warn!(error = ?e, "closing the write connection failed");
                }
            }
            Self::Postgres { rt, conn, .. } => {
                if let Some(conn) = conn {
                    let _ = rt.block_on(conn.close());
                }
            }
        }
    }
}

/// The PostgreSQL write connection; under a `fence`, the server ends the session when a
/// transaction sits idle for [`Fence::idle_limit`].
async fn pg_connect(
    url: &str,
    synchronous_commit: bool,
    fence: Option<&Fence>,
) -> Result<PgConnection, StoreError> {
    let mut conn = PgConnection::connect_with(&super::pg_options(url)?).await?;
    if !synchronous_commit {
        sqlx::raw_sql(sqlx::AssertSqlSafe("SET synchronous_commit = off"))
            .execute(&mut conn)
            .await?;
    }
    if let Some(fence) = fence {
        let ms = fence.idle_limit.as_millis().max(1);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET idle_in_transaction_session_timeout = {ms}"
        )))
        .execute(&mut conn)
        .await?;
    }
    Ok(conn)
}

/// The writer thread: one transaction per batch of waiting writes, until stopped.
fn run(conn: &mut Connected, mut rx: mpsc::Receiver<Message>, max_batch: usize, full: &AtomicBool) {
    let mut batch = Vec::with_capacity(max_batch);
    // After `close`, the channel still yields what was queued, then `None`.
    while let Some(first) = rx.blocking_recv() {
        // Deferred only if every write of the batch is.
        let mut flush = Flush::Deferred;
        match first {
            Message::Write(job, f) => {
                batch.push(job);
                flush = flush.max(f);
            }
            Message::Stop => {
                rx.close();
                continue;
            }
        }
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(Message::Write(job, f)) => {
                    batch.push(job);
                    flush = flush.max(f);
                }
                Ok(Message::Stop) => rx.close(),
                Err(_) => break,
            }
        }
        write_batch(conn, &mut batch, flush, full);
    }
}

/// What running the jobs of a batch gave.
struct BatchRun {
    replies: Vec<Reply>,
    all_succeeded: bool,
    any_full: bool,
}

/// Runs every job on `tx`; a write that panics fails its batch like one that returns an
/// error (its caller hears that the writer dropped it), and the thread lives on.
fn run_jobs(tx: &mut Tx<'_>, batch: &mut Vec<Job>) -> BatchRun {
    let mut ran = BatchRun {
        replies: Vec::with_capacity(batch.len()),
        all_succeeded: true,
        any_full: false,
    };
    for job in batch.drain(..) {
        match std::panic::catch_unwind(AssertUnwindSafe(|| job(tx))) {
            Ok((how, reply)) => {
                ran.all_succeeded &= how == Ran::Succeeded;
                ran.any_full |= how == Ran::Full;
                ran.replies.push(reply);
            }
            Err(_) => {
                tracing::error!("a write panicked; its batch is rolled back");
                ran.all_succeeded = false;
            }
        }
    }
    ran
}

/// Runs every write of `batch` in one transaction and answers each caller.
fn write_batch(conn: &mut Connected, batch: &mut Vec<Job>, flush: Flush, full: &AtomicBool) {
    let started = Instant::now();
    let size = batch.len();
    let (outcome, replies) = match conn {
        Connected::Sqlite {
            conn,
            synced,
            at_full,
            ..
        } => {
            let fsync = *synced && flush == Flush::OnCommit;
            sqlite_batch(conn, batch, fsync, at_full)
        }
        Connected::Postgres {
            rt,
            conn,
            url,
            synchronous_commit,
            fence,
        } => {
            if conn.is_none() {
                match rt.block_on(pg_connect(url, *synchronous_commit, fence.as_ref())) {
                    Ok(c) => *conn = Some(c),
                    Err(e) => tracing::error!(error = ?e, "reconnecting the writer failed"),
                }
            }
            match conn.as_mut() {
                Some(c) => {
                    let deferred = *synchronous_commit && flush == Flush::Deferred;
                    let (outcome, replies) = pg_batch(rt, c, fence.as_ref(), batch, deferred);
                    if outcome.as_ref().is_err_and(StoreError::is_connection_lost) {
                        *conn = None;
                    }
                    (outcome, replies)
                }
                None => {
                    batch.clear();
                    (Err(StoreError::WriterClosed), Vec::new())
                }
            }
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

/// `synchronous = FULL`, as `PRAGMA synchronous` reads it.
const SYNCHRONOUS_FULL: i64 = 2;

/// One batch in one SQLite transaction, committed at `synchronous = FULL` when `fsync`,
/// else at NORMAL; `at_full` is the level the connection is at, switched only on a
/// change (outside any transaction, as SQLite requires).
fn sqlite_batch(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
    fsync: bool,
    at_full: &mut bool,
) -> (Result<(), StoreError>, Vec<Reply>) {
    if fsync != *at_full {
        let level = if fsync { "FULL" } else { "NORMAL" };
        if let Err(e) = conn.pragma_update(None, "synchronous", level) {
            batch.clear();
            return (Err(e.into()), Vec::new());
        }
        *at_full = fsync;
    }
    sqlite_transaction(conn, batch)
}

/// Runs the batch's writes in one transaction and commits them, or rolls all back.
fn sqlite_transaction(
    conn: &mut Connection,
    batch: &mut Vec<Job>,
) -> (Result<(), StoreError>, Vec<Reply>) {
    match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(txn) => {
            let ran = run_jobs(&mut Tx::Sqlite(&txn), batch);
            let outcome = if ran.all_succeeded {
                txn.commit().map_err(StoreError::from)
            } else {
                let rolled_back = txn.rollback();
                Err(if ran.any_full {
                    // SQLite may have rolled the transaction back itself on SQLITE_FULL,
                    // so the rollback's own error says nothing new.
                    StoreError::BatchFull
                } else {
                    rolled_back.map_or_else(StoreError::from, |()| StoreError::BatchFailed)
                })
            };
            (outcome, ran.replies)
        }
        Err(e) => {
            // Nothing ran; dropping the jobs answers each caller with an error.
            batch.clear();
            (Err(StoreError::from(e)), Vec::new())
        }
    }
}

fn pg_batch(
    rt: &Runtime,
    conn: &mut PgConnection,
    fence: Option<&Fence>,
    batch: &mut Vec<Job>,
    deferred: bool,
) -> (Result<(), StoreError>, Vec<Reply>) {
    let mut txn = match rt.block_on(conn.begin()) {
        Ok(txn) => txn,
        Err(e) => {
            batch.clear();
            return (Err(e.into()), Vec::new());
        }
    };
    if deferred {
        let set = sqlx::raw_sql(sqlx::AssertSqlSafe("SET LOCAL synchronous_commit = off"));
        if let Err(e) = rt.block_on(set.execute(&mut *txn)) {
            let _ = rt.block_on(txn.rollback());
            batch.clear();
            return (Err(e.into()), Vec::new());
        }
    }
    if let Some(fence) = fence {
        let held = rt.block_on(
            sqlx::query_scalar!("/* pg */ SELECT epoch FROM ha_lease WHERE id = 1 FOR SHARE")
                .fetch_optional(&mut *txn),
        );
        let refused = match held {
            Ok(Some(epoch)) if epoch == fence.epoch => None,
            Ok(held) => {
                fence.deposed.cancel();
                Some(StoreError::Deposed {
                    epoch: fence.epoch,
                    held,
                })
            }
            Err(e) => Some(e.into()),
        };
        if let Some(e) = refused {
            let _ = rt.block_on(txn.rollback());
            batch.clear();
            return (Err(e), Vec::new());
        }
    }
    let ran = run_jobs(&mut Tx::Postgres(PgTx { rt, conn: &mut txn }), batch);
    let outcome = if ran.all_succeeded {
        rt.block_on(txn.commit()).map_err(StoreError::from)
    } else {
        let rolled_back = rt.block_on(txn.rollback());
        Err(if ran.any_full {
            StoreError::BatchFull
        } else {
            rolled_back.map_or_else(StoreError::from, |()| StoreError::BatchFailed)
        })
    };
    (outcome, ran.replies)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{open, Db, Durability, SettingsRepo};

    /// The database `w.db` in `dir` at `durability`, with its writer's task.
    async fn sqlite_db(
        dir: &tempfile::TempDir,
        durability: Durability,
        stop: &CancellationToken,
    ) -> (Db, tokio::task::JoinHandle<()>) {
        open(&dir.path().join("w.db"), durability, 1, 64, stop.clone())
            .await
            .unwrap()
    }

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
        let (db, handle) = sqlite_db(dir, Durability::Normal, stop).await;
        let busy = make_busy(&db).await;
        (db, handle, busy)
    }

    /// Keeps the writer busy for 200 ms, so that the writes queued meanwhile share the
    /// next batch.
    async fn make_busy(db: &Db) -> tokio::task::JoinHandle<Result<(), StoreError>> {
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
        busy
    }

    /// A fresh PostgreSQL database on the server `TI_TEST_POSTGRES` names (as
    /// `scripts/pg-cluster.sh` prints it), written under `fence`; `None` when unset.
    async fn postgres_db(
        fence: impl FnOnce(&sqlx::PgPool) -> Option<super::Fence>,
        stop: &CancellationToken,
    ) -> Option<(Db, tokio::task::JoinHandle<()>, sqlx::PgPool)> {
        let Ok(server) = std::env::var("TI_TEST_POSTGRES") else {
            eprintln!("skipped: TI_TEST_POSTGRES is not set");
            return None;
        };
        let url = crate::store::create_postgres_database(&server, "w")
            .await
            .unwrap();
        crate::store::migrate_postgres(&url).await.unwrap();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        // The throw-away cluster of the tests turns synchronous_commit off; this database
        // commits as a durable server does, so that a deferred batch can be told apart.
        sqlx::raw_sql(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = on', \
             current_database()); END $$",
        )
        .execute(&pool)
        .await
        .unwrap();
        let fence = fence(&pool);
        let (db, handle) =
            crate::store::open_postgres(&url, Durability::Full, 1, 64, fence, stop.clone())
                .await
                .unwrap();
        Some((db, handle, pool))
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back_its_whole_batch_and_every_caller_hears_it() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle, busy) = busy_db(&dir, &stop).await;
        rolls_back_the_whole_batch(db, busy).await;
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn on_postgres_a_failed_write_rolls_back_its_whole_batch_too() {
        let stop = CancellationToken::new();
        let Some((db, handle, _)) = postgres_db(|_| None, &stop).await else {
            return;
        };
        let busy = make_busy(&db).await;
        rolls_back_the_whole_batch(db, busy).await;
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn on_postgres_a_batch_under_a_lost_lease_commits_nothing_and_deposes_the_node() {
        let stop = CancellationToken::new();
        let deposed = CancellationToken::new();
        let token = deposed.clone();
        let Some((db, handle, pool)) = postgres_db(
            move |_| {
                Some(super::Fence {
                    epoch: 1,
                    deposed: token,
                    idle_limit: Duration::from_secs(30),
                })
            },
            &stop,
        )
        .await
        else {
            return;
        };
        let epoch = crate::store::LeaseRepo::try_acquire(&pool, "me", "http://me", 60_000)
            .await
            .unwrap();
        assert_eq!(epoch, Some(1));
        let before = db
            .writer
            .run(|tx| SettingsRepo::set(tx, "strategy", "weighted"))
            .await;
        assert!(before.is_ok(), "{before:?}");

        // Another node takes the lease (as after this one was paused past it).
        let other = sqlx::query_scalar::<_, i64>(
            "UPDATE ha_lease SET epoch = epoch + 1, holder = 'other',
                 expires_at = now() + interval '1 hour' WHERE id = 1 RETURNING epoch",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(other, 2);
        let after = db
            .writer
            .run(|tx| SettingsRepo::set(tx, "strategy", "round_robin"))
            .await;
        assert!(after.is_err(), "a deposed leader committed: {after:?}");
        assert!(deposed.is_cancelled(), "the node learns it was deposed");
        assert_eq!(
            SettingsRepo::get(&db.read, "strategy")
                .await
                .unwrap()
                .as_deref(),
            Some("weighted"),
            "nothing of the refused batch was written"
        );
        stop.cancel();
        handle.await.unwrap();
    }

    async fn rolls_back_the_whole_batch(
        db: Db,
        busy: tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
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
        assert_eq!(stored_strategy(&db).await.as_deref(), Some("weighted"));
    }

    /// The `strategy` setting as stored.
    async fn stored_strategy(db: &Db) -> Option<String> {
        SettingsRepo::get(&db.read, "strategy").await.unwrap()
    }

    /// The level a write's transaction commits at, `full` or `normal`: SQLite's
    /// `PRAGMA synchronous`, PostgreSQL's `synchronous_commit`.
    fn level(tx: &mut Tx<'_>) -> Result<String, StoreError> {
        let full = match tx {
            Tx::Sqlite(conn) => {
                conn.pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))?
                    == SYNCHRONOUS_FULL
            }
            Tx::Postgres(pg) => {
                let on: String = pg.rt.block_on(
                    sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&mut *pg.conn),
                )?;
                on == "on"
            }
        };
        Ok(if full { "full" } else { "normal" }.to_string())
    }

    /// On a database at `durability = "full"`: a batch of deferred writes alone commits
    /// at NORMAL, and only that batch; a deferred write that shares a batch with another
    /// is flushed with it; what a deferred write wrote is committed.
    async fn flushes_as_asked(db: &Db) {
        let at = |flush| db.writer.run_flushed(flush, level);
        assert_eq!(at(Flush::OnCommit).await.unwrap(), "full");
        assert_eq!(at(Flush::Deferred).await.unwrap(), "normal");
        assert_eq!(at(Flush::OnCommit).await.unwrap(), "full", "the next batch");

        let busy = make_busy(db).await;
        let (deferred, flushed) = tokio::join!(at(Flush::Deferred), at(Flush::OnCommit));
        busy.await.unwrap().unwrap();
        assert_eq!(deferred.unwrap(), "full", "in a batch with a flushed write");
        assert_eq!(flushed.unwrap(), "full");

        db.writer
            .run_flushed(Flush::Deferred, |tx| {
                SettingsRepo::set(tx, "strategy", "weighted")
            })
            .await
            .unwrap();
        assert_eq!(stored_strategy(db).await.as_deref(), Some("weighted"));
    }

    #[tokio::test]
    async fn only_a_batch_of_deferred_writes_alone_commits_without_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (db, handle) = sqlite_db(&dir, Durability::Full, &stop).await;
        flushes_as_asked(&db).await;
        stop.cancel();
        handle.await.unwrap();

        // At NORMAL every batch commits at NORMAL.
        let stop = CancellationToken::new();
        let (db, handle, busy) = busy_db(&dir, &stop).await;
        busy.await.unwrap().unwrap();
        let at = |flush| db.writer.run_flushed(flush, level);
        assert_eq!(at(Flush::OnCommit).await.unwrap(), "normal");
        assert_eq!(at(Flush::Deferred).await.unwrap(), "normal");
        stop.cancel();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn on_postgres_only_a_batch_of_deferred_writes_alone_commits_without_waiting_for_the_flush(
    ) {
        let stop = CancellationToken::new();
        let Some((db, handle, _)) = postgres_db(|_| None, &stop).await else {
            return;
        };
        flushes_as_asked(&db).await;
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
