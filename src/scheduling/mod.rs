//! The scheduling core: what the API handlers call. Each step of a task's life has its
//! own file:
//!
//! - [`submit`](Scheduler::submit) (`submit.rs`): a client's tasks are placed on TIs and
//!   committed with their decisions, once admission control (`admission.rs`) admits them;
//!   while the service drains (`drain.rs`) it takes no new task;
//! - `dispatch.rs`: each committed task is sent to its TI (retries, backoff, bounded
//!   concurrency per TI);
//! - `reroute.rs`: a task whose TI failed or went away is placed again;
//! - `complete.rs`: the TI's result callback stores the outcome and teaches the predictor;
//! - `recovery.rs`: start-up recovery and the periodic sweep settle the unfinished tasks
//!   nobody is driving, asking their TIs when needed;
//! - `health.rs`: health probes take TIs out of scheduling and bring them back;
//! - `instances.rs`: TIs are registered and removed;
//! - `background.rs`: the loops behind recovery, probes, sweeps and saving what the
//!   predictor learned, and their shutdown;
//! - `drain.rs`: the drain before a shutdown: no new task, the unfinished ones finish.
//!
//! All of them share the hot-path [`Cache`] (`cache.rs`: TIs, queue estimates, the
//! predictor), behind one lock held for microseconds; the pure parts are `queue.rs`
//! (one TI's queue estimate) and `strategy.rs` (choosing among candidates).

mod admission;
mod background;
mod cache;
mod complete;
mod dispatch;
mod drain;
mod events;
mod health;
mod instances;
mod proxy;
mod queue;
mod recovery;
mod reroute;
mod strategy;
mod submit;
mod waiters;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use metrics::{Counter, Histogram};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admission::{deadline_of, Limits as AdmissionLimits, Reason as RefusalReason, Refusal};
pub use cache::{Cache, Placing, TiSnapshot};
pub use events::{Event, Events, Since, EVENT_BUFFER};
pub use instances::Registration;
pub use proxy::{Answer, Proxied, ProxyRequest, Relayed, CLIENT_GONE, RESTARTED, SHUTTING_DOWN};
pub use queue::QueueEstimate;
pub use submit::{SubmitItem, Submitted};

use crate::config::Settings;
use crate::domain::{
    unix_now, LookupRow, Outcome, PredictMode, StrategyKind, TaskId, TaskStatus, TiUuid,
};
use crate::predictor::Predictor;
use crate::store::{
    Db, LearnedRepo, LookupRepo, SettingsRepo, StatsRepo, StoreError, StoredTask, TaskRepo, TiRepo,
};
use crate::telemetry::Handles;
use crate::ti::{AllowList, TiClient, TiError};

/// Why a scheduling operation failed; the API maps each to its HTTP code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong (400).
    #[error("{0}")]
    Invalid(String),
    /// Nothing by that id (404).
    #[error("{0}")]
    NotFound(String),
    /// Not possible in the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// A result callback that is not from a TI the task was sent to (403).
    #[error("{0}")]
    Forbidden(String),
    /// A TI could not be reached or failed its health check (502).
    #[error("{0}")]
    TiUnreachable(#[from] TiError),
    /// No TI serves the model (503).
    #[error("{0}")]
    NoInstance(String),
    /// Admission control refused a task (429 with `Retry-After`).
    #[error("{0}")]
    Overloaded(Refusal),
    /// The service is draining and takes no new task (503).
    #[error(
        "the service is draining (POST /admin/drain or a shutdown signal) and accepts no \
         new tasks; submit to another instance"
    )]
    Draining,
    /// The database failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Settings the core needs.
#[derive(Debug, Clone)]
struct CoreSettings {
    ti: crate::config::TiSettings,
    callback_url: String,
    allowed_hosts: AllowList,
    admission: AdmissionLimits,
}

struct Inner {
    /// Held for microseconds, never across an `.await`.
    cache: Mutex<Cache>,
    /// Tasks with a dispatch or re-route under way, so the sweep leaves them alone.
    in_flight: dispatch::InFlight,
    /// Clients waiting for a task to complete.
    waiters: waiters::Waiters,
    /// What changed, for `GET /events`.
    events: Events,
    /// Cancelled when the service stops serving: long-polls and event streams end.
    stop_waiting: CancellationToken,
    /// Set by a drain, never cleared: submits that would create a task are refused.
    draining: AtomicBool,
    db: Db,
    client: TiClient,
    settings: CoreSettings,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The handles of what each completion records, by model.
    completions: CompletionMetrics,
}

/// The labelled families each completion records ([`telemetry::Handles`]).
#[derive(Default)]
struct CompletionMetrics {
    /// `ti_scheduler_tasks_completed_total`, by model, TI and outcome.
    completed: Handles<(Option<TiUuid>, Outcome), Counter>,
    /// `ti_scheduler_task_latency_seconds`, by model.
    latency: Handles<(), Histogram>,
    /// `ti_scheduler_prediction_error_ratio`, by model.
    prediction_error: Handles<(), Histogram>,
}

/// The scheduling core; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

const STRATEGY_KEY: &str = "strategy";
const PREDICT_MODE_KEY: &str = "predict_mode";

impl Scheduler {
    /// Loads TIs, settings, the lookup table and statistics from the database, and
    /// rebuilds every TI's queue estimate from the unfinished tasks. Nothing is sent to
    /// TIs until [`Scheduler::start_background`].
    pub async fn load(db: Db, settings: &Settings, callback_url: String) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let stored_strategy = SettingsRepo::get(&db.read, STRATEGY_KEY).await?;
        let strategy = match stored_strategy.as_deref().map(StrategyKind::parse) {
            Some(Ok(s)) => s,
            _ => settings.scheduling.strategy,
        };
        let stored_mode = SettingsRepo::get(&db.read, PREDICT_MODE_KEY).await?;
        let predict_mode = match stored_mode.as_deref().map(PredictMode::parse) {
            Some(Ok(m)) => m,
            _ => settings.scheduling.predict_mode,
        };
        let predictor = Predictor::new(
            settings.scheduling.prior_ms,
            settings.scheduling.prior_error_ms,
            LookupRepo::all(&db.read).await?,
            StatsRepo::all(&db.read).await?,
            LearnedRepo::all(&db.read).await?,
        );
        let rng = match settings.scheduling.rng_seed {
            0 => StdRng::from_os_rng(),
            seed => StdRng::seed_from_u64(seed),
        };
        let mut cache = Cache::new(
            strategy,
            predict_mode,
            predictor,
            rng,
            settings.scheduling.weighted_lambda,
            settings.ti.max_inflight_dispatches,
            std::time::Duration::from_millis(settings.ti.retry_backoff_ms),
        );
        let tis = TiRepo::all(&db.read).await?;
        let ti_count = tis.len();
        for ti in tis {
            cache.upsert_ti(ti);
        }
        let unfinished = TaskRepo::unfinished(&db.read).await?;
        let now = Instant::now();
        let unix = unix_now();
        for task in &unfinished {
            let Some(ti) = task.ti_uuid else { continue };
            cache.reserve(
                &task.task_id,
                ti,
                task.predicted_ms,
                task.predicted_error_ms,
            );
            if let Some(at) = task.dispatch_time {
                let ran = std::time::Duration::from_secs_f64((unix - at).max(0.0));
                cache.mark_started(&task.task_id, ti, now.checked_sub(ran).unwrap_or(now));
            }
        }
        tracing::info!(
            tis = ti_count,
            unfinished = unfinished.len(),
            strategy = strategy.as_str(),
            predict_mode = predict_mode.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state loaded from the database"
        );
        let allowed_hosts = AllowList::parse(&settings.ti.allowed_hosts).map_err(Error::Invalid)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache: Mutex::new(cache),
                in_flight: dispatch::InFlight::default(),
                waiters: waiters::Waiters::default(),
                events: Events::with_capacity(settings.server.event_buffer),
                stop_waiting: CancellationToken::new(),
                draining: AtomicBool::new(false),
                db,
                client: TiClient::new(
                    settings.ti.health_timeout(),
                    std::time::Duration::from_millis(settings.ti.dispatch_timeout_ms),
                    std::time::Duration::from_millis(settings.ti.request_timeout_ms),
                ),
                settings: CoreSettings {
                    ti: settings.ti.clone(),
                    callback_url,
                    allowed_hosts,
                    admission: AdmissionLimits::from_settings(&settings.scheduling),
                },
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
                completions: CompletionMetrics::default(),
            }),
        })
    }

    /// Locks the cache. Never hold the guard across an `.await`.
    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A panic while holding the lock cannot leave the cache half-updated in a way
        // that matters more than stopping would: keep serving.
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A TI's `host:port`, to name it in log lines beside its uuid.
    fn ti_address(&self, ti: TiUuid) -> String {
        match self.cache().address(ti) {
            Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
            Some((host, port)) => format!("{host}:{port}"),
            None => "unknown".into(),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// What changed: task and TI events, for `GET /events`.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// Completes when the service stops serving: long-polls and event streams end then,
    /// so that a graceful shutdown need not wait for them.
    pub async fn serving_stops(&self) {
        self.inner.stop_waiting.cancelled().await;
    }

    /// The service stops serving (see [`Scheduler::serving_stops`]).
    pub fn stop_waiting(&self) {
        self.inner.stop_waiting.cancel();
    }

    /// Current strategy, predict mode and lookup-table size.
    pub fn settings(&self) -> (StrategyKind, PredictMode, usize) {
        let cache = self.cache();
        (cache.strategy(), cache.predict_mode(), cache.lookup_rows())
    }

    /// Sets and persists the strategy.
    pub async fn set_strategy(&self, kind: StrategyKind) -> Result<(), Error> {
        self.inner
            .db
            .writer
            .run(move |conn| SettingsRepo::set(conn, STRATEGY_KEY, kind.as_str()))
            .await?;
        self.cache().set_strategy(kind);
        Ok(())
    }

    /// Sets and persists the predict mode; `lookup_table` needs a loaded table.
    pub async fn set_predict_mode(&self, mode: PredictMode) -> Result<(), Error> {
        if mode == PredictMode::LookupTable && self.cache().lookup_rows() == 0 {
            return Err(Error::Conflict(
                "no lookup table is loaded; import one first with POST /predictor/lookup_table \
                 (CSV or JSON body) or `ti-scheduler import-lookup FILE`"
                    .into(),
            ));
        }
        self.inner
            .db
            .writer
            .run(move |conn| SettingsRepo::set(conn, PREDICT_MODE_KEY, mode.as_str()))
            .await?;
        self.cache().set_predict_mode(mode);
        Ok(())
    }

    /// Replaces the lookup table (or appends to it) atomically. Returns the rows now loaded.
    pub async fn load_lookup(&self, rows: Vec<LookupRow>, append: bool) -> Result<usize, Error> {
        let stored = rows.clone();
        self.inner
            .db
            .writer
            .run(move |conn| {
                if !append {
                    LookupRepo::clear(conn)?;
                }
                LookupRepo::insert(conn, &stored)
            })
            .await?;
        Ok(self.cache().load_lookup(rows, append))
    }

    /// The models some registered OpenAI-compatible TI serves, sorted, each with the
    /// earliest registration time (Unix seconds) among its TIs.
    pub fn openai_models(&self) -> Vec<(String, f64)> {
        self.cache().openai_models()
    }

    /// Every TI, removed ones included, with its live estimate.
    pub fn tis(&self) -> Vec<TiSnapshot> {
        self.cache().snapshots(Instant::now())
    }

    /// Per model, the unfinished tasks with no TI: when they were placed, no TI of their
    /// model was usable, and they wait for the sweep to place them.
    pub async fn waiting_for_ti(&self) -> Result<Vec<(String, i64)>, Error> {
        Ok(TaskRepo::waiting_for_ti(&self.inner.db.read).await?)
    }

    /// A stored task.
    pub async fn task(&self, task_id: &TaskId) -> Result<Option<StoredTask>, Error> {
        Ok(TaskRepo::find(&self.inner.db.read, task_id).await?)
    }

    /// A stored task, once it is completed or `wait` has passed (long-poll): woken by the
    /// completion itself, not by polling.
    pub async fn task_when_completed(
        &self,
        task_id: &TaskId,
        wait: std::time::Duration,
    ) -> Result<Option<StoredTask>, Error> {
        if wait.is_zero() {
            return self.task(task_id).await;
        }
        let notify = self.inner.waiters.subscribe(task_id);
        let (task, waiting) = {
            // Registered before the read, so a completion between the read and the wait
            // still wakes it.
            let completed = notify.notified();
            tokio::pin!(completed);
            completed.as_mut().enable();
            let task = self.task(task_id).await;
            let waiting = matches!(&task, Ok(Some(t)) if t.status != TaskStatus::Completed);
            if waiting {
                tokio::select! {
                    _ = tokio::time::timeout(wait, completed) => {}
                    _ = self.serving_stops() => {}
                }
            }
            (task, waiting)
        };
        self.inner.waiters.release(task_id, notify);
        if waiting {
            self.task(task_id).await
        } else {
            task
        }
    }
}
