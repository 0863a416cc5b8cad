//! ti-scheduler: a central, durable scheduler for machine-learning inference.
//!
//! Clients submit tasks for a named model; several replicas of each model, Task Instances
//! (TIs), run them. The scheduler predicts each task's execution time on every TI, keeps a
//! live estimate of every TI's queue, routes each task by the chosen strategy, collects the
//! result and answers status queries. Its whole state lives in SQLite.
//!
//! # Layout
//!
//! - [`api`]: axum handlers, one module per area, the admin-token extractor and the JSON
//!   error envelope.
//! - [`scheduling`]: the scheduling core, one file per step of a task's life (below), around
//!   the hot-path [`scheduling::Cache`] (TIs, queue estimates, the predictor).
//! - [`predictor`]: execution-time prediction (fallback chain, learned model, lookup table).
//! - [`store`]: the repositories (SQLite and PostgreSQL) and the group-commit writer.
//! - [`ti`]: the TI protocol: the client, the wire types, the host allow-list and the
//!   simulated TI.
//! - [`domain`]: the nouns every layer shares (ids, states, strategies, decisions).
//! - [`ha`]: high availability on PostgreSQL: the leader lease and the standby.
//! - [`jobs`]: the periodic cleanup job.
//! - [`config`]: typed settings (file, environment, flags).
//! - [`cli`]: the client commands (`ti-scheduler tasks`).
//! - [`telemetry`]: every metric family with its help text, the recorder, and the logs.
//!
//! The benchmarks are not part of the library: they are the `measure` and `decision`
//! bench targets (`benches/`). `ARCHITECTURE.md` maps the whole repository.
//!
//! # The path of a task
//!
//! 1. `POST /queue/submit` (`api/queue.rs`) → [`scheduling::Scheduler::submit`]
//!    (`scheduling/submit.rs`): under the cache lock each task is *placed*
//!    (`Cache::place`: predict on every usable TI → the strategy selects → the prediction
//!    joins that TI's queue estimate);
//! 2. the task rows and their decision rows are committed by the writer (`store/writer.rs`,
//!    one transaction per batch of requests), and the client gets its `task_id`;
//! 3. a dispatcher (`scheduling/dispatch.rs`) sends each task to its TI, with retries; a TI
//!    that keeps failing is marked unhealthy (`scheduling/health.rs`) and the task is
//!    placed again (`scheduling/reroute.rs`);
//! 4. the TI calls `POST /result/submit` (`api/result.rs`) →
//!    [`scheduling::Scheduler::accept_result`] (`scheduling/complete.rs`): the outcome is
//!    stored, the predictor learns, the prediction leaves the queue;
//! 5. whatever nobody is driving (after a restart, a lost callback, a failed write) is
//!    settled by start-up recovery and the periodic sweep (`scheduling/recovery.rs`), run
//!    with the probes by `scheduling/background.rs`.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ha;
pub mod jobs;
pub mod predictor;
pub mod scheduling;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod ti;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseLocation, Settings};
use crate::scheduling::Scheduler;

/// A built service, bound to its port and ready to run.
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    scheduler: Scheduler,
    db: store::Db,
    writer_stop: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    cron: tokio_cron_scheduler::JobScheduler,
    /// SQLite: held until the database is closed, so no second process uses the file.
    lock: Option<store::DbLock>,
    /// PostgreSQL: this node's leader lease, released when it stops.
    leadership: Option<ha::Leadership>,
    limits: server::Limits,
    /// How long a shutdown waits for the unfinished tasks once drained.
    shutdown_grace: Duration,
}

impl App {
    /// Binds the port, opens (creating and migrating) the database, rebuilds the cache
    /// from it and starts the background work. On PostgreSQL it first takes the leader
    /// lease (waiting up to twice `ha.lease_ms` for a crashed previous holder's).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.server.bind)
            .await
            .with_context(|| format!("binding {}", settings.server.bind))?;
        Self::build_on(listener, settings, None).await
    }

    /// The connection limits of `settings`, for this server and a standby's.
    pub fn limits(settings: &Settings) -> server::Limits {
        server::Limits {
            header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(settings.server.idle_timeout_ms),
            max_connections: server::raise_fd_limit(settings.server.max_connections),
        }
    }

    /// Builds the service on a bound `listener`. On PostgreSQL, `leadership` is the lease
    /// a standby just took (`None`: take it now).
    pub async fn build_on(
        listener: TcpListener,
        settings: Settings,
        leadership: Option<ha::Leadership>,
    ) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        // First: a metric handle taken before the recorder is installed reports nowhere.
        let metrics = telemetry::metrics_handle();
        let limits = Self::limits(&settings);
        let location = settings.database.location().map_err(anyhow::Error::msg)?;
        let writer_stop = CancellationToken::new();
        let (db, writer, lock, leadership) = match &location {
            DatabaseLocation::Sqlite(db_path) => {
                let lock = store::DbLock::acquire(db_path)?;
                if settings.database.quick_check {
                    let path = db_path.clone();
                    let ms =
                        tokio::task::spawn_blocking(move || store::quick_check(&path)).await??;
                    tracing::info!(db = %db_path.display(), elapsed_ms = ms, "PRAGMA quick_check: ok");
                }
                let (db, writer) = store::open(
                    db_path,
                    settings.database.durability,
                    settings.database.read_connections,
                    settings.database.max_batch,
                    writer_stop.clone(),
                )
                .await
                .with_context(|| format!("opening database {}", db_path.display()))?;
                (db, writer, Some(lock), None)
            }
            DatabaseLocation::Postgres(url) => {
                let leadership = match leadership {
                    Some(leadership) => leadership,
                    None => {
                        ha::Lease::connect(&settings, url, &settings.public_url(addr))
                            .await?
                            .acquire_within_two_leases()
                            .await?
                    }
                };
                let (db, writer) = store::open_postgres(
                    url,
                    settings.database.durability,
                    settings.database.read_connections,
                    settings.database.max_batch,
                    Some(leadership.fence()),
                    writer_stop.clone(),
                )
                .await
                .with_context(|| format!("opening database {}", location.display()))?;
                (db, writer, None, Some(leadership))
            }
        };
        let cap = store::limit_size(&db, settings.database.max_size_mb).await?;
        if cap > 0 {
            tracing::info!(pages = cap, "database size capped (database.max_size_mb)");
        }
        let callback_url = format!("{}/result/submit", settings.public_url(addr));
        let scheduler = Scheduler::load(db.clone(), &settings, callback_url)
            .await
            .context("loading state from the database")?;
        scheduler.start_background();
        let cron = jobs::start(db.clone(), settings.cleanup.clone()).await?;
        let admin_token = Some(settings.server.admin_token.trim())
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let router = api::app(api::AppState {
            scheduler: scheduler.clone(),
            admin_token,
            body_limit: settings.server.body_limit_bytes,
            metrics,
            max_json_depth: settings.server.max_json_depth,
            max_batch_tasks: settings.server.max_batch_tasks,
            api_keys: settings
                .server
                .api_keys
                .iter()
                .map(|k| Arc::from(k.as_str()))
                .collect(),
            openai_requests: Arc::default(),
        });
        tracing::info!(%addr, db = %location.display(), "ti-scheduler ready");
        Ok(Self {
            listener,
            addr,
            router,
            scheduler,
            db,
            writer_stop,
            writer,
            cron,
            lock,
            leadership,
            limits,
            shutdown_grace: Duration::from_millis(settings.server.shutdown_grace_ms),
        })
    }

    /// The address the API listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then drains (no new task; `/ready` answers 503)
    /// and goes on serving until no task is unfinished or `server.shutdown_grace_ms` has
    /// passed; then stops accepting, finishes the requests under way, stops the
    /// background work, commits what the writer holds and closes the database.
    ///
    /// On PostgreSQL, a node that loses the leader lease stops at once (no drain: it may
    /// no longer write) and returns an error; otherwise it releases the lease at the end.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let scheduler = self.scheduler.clone();
        let grace = self.shutdown_grace;
        let deposed = self.leadership.as_ref().map(ha::Leadership::deposed);
        let lost = deposed.clone();
        let shutdown = async move {
            let lost = async {
                match lost {
                    Some(token) => token.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown => {}
                _ = lost => {
                    tracing::error!("this node lost the leader lease: stopping at once");
                    scheduler.stop_waiting();
                    return;
                }
            }
            // Dispatches and result callbacks go on meanwhile: the server still serves.
            scheduler.drain_within(grace).await;
            // Long-polls and event streams end now, so the requests under way finish.
            scheduler.stop_waiting();
        };
        server::serve(self.listener, self.router, self.limits, shutdown).await;
        let mut cron = self.cron;
        if let Err(e) = cron.shutdown().await {
            tracing::warn!(error = ?e, "stopping the cron scheduler failed");
        }
        self.scheduler.shutdown().await;
        self.writer_stop.cancel();
        if let Err(e) = self.writer.await {
            tracing::error!(error = ?e, "the writer task failed");
        }
        self.db.read.close().await;
        drop(self.lock);
        if let Some(leadership) = self.leadership {
            leadership.release().await;
        }
        if deposed.is_some_and(|d| d.is_cancelled()) {
            anyhow::bail!("this node lost the leader lease and stopped");
        }
        tracing::info!("ti-scheduler stopped");
        Ok(())
    }
}

/// Sets `TCP_NODELAY` on every connection the listener accepts: an answer goes out at once
/// instead of waiting, under Nagle's algorithm, for the peer to acknowledge earlier data.
pub fn nodelay(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(stream: &mut TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    }
    listener.tap_io(set as fn(&mut TcpStream))
}
