//! The scheduling core: what the API handlers call.
//!
//! A submit takes the [`State`] lock for microseconds to choose a TI for each task (the
//! predictor gives the task's expected time on every usable TI, the strategy picks one,
//! the prediction joins that TI's queue estimate), then commits the tasks and their
//! decisions through the group-commit writer, answers, and hands each task to a
//! dispatcher ([`dispatch`]). Results come back through [`Scheduler::accept_result`] (the
//! TI's callback) or from reconciliation; either stores the outcome and takes the task's
//! prediction off its TI.

mod dispatch;
mod queue;
mod state;
mod strategy;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;

pub use dispatch::{RecoveryReport, SweepReport};
pub use queue::QueueEstimate;
pub use state::{State, TiEntry};

use crate::config::Settings;
use crate::domain::{unix_now, TaskId, TiUuid};
use crate::predictor::{LookupRow, Predictor};
use crate::store::{
    Db, DecisionReason, DecisionRow, LearnedRepo, LookupRepo, NewDecision, NewTask, SettingsRepo,
    StatsRepo, StoreError, StoredTask, StoredTi, TaskRepo, TiRepo,
};
use crate::ti::{TiClient, TiError};

/// A scheduling strategy (SPEC.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Earliest expected completion.
    ShortestQueue,
    /// Cycle over the healthy TIs.
    RoundRobin,
    /// Lowest expected completion + λ · its error.
    Weighted,
    /// Smallest of one random draw per TI.
    Probabilistic,
}

impl StrategyKind {
    /// Every strategy, in the order the API lists them.
    pub const ALL: [Self; 4] = [
        Self::ShortestQueue,
        Self::RoundRobin,
        Self::Weighted,
        Self::Probabilistic,
    ];

    /// Its API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShortestQueue => "shortest_queue",
            Self::RoundRobin => "round_robin",
            Self::Weighted => "weighted",
            Self::Probabilistic => "probabilistic",
        }
    }

    /// Parses an API name; the error lists the valid ones.
    ///
    /// ```
    /// use ti_scheduler::scheduling::StrategyKind;
    /// assert_eq!(StrategyKind::parse("round_robin"), Ok(StrategyKind::RoundRobin));
    /// assert_eq!(
    ///     StrategyKind::parse("fastest").unwrap_err(),
    ///     "unknown strategy 'fastest'; valid: shortest_queue, round_robin, weighted, probabilistic"
    /// );
    /// ```
    pub fn parse(name: &str) -> Result<Self, String> {
        parse_name(name, &Self::ALL, Self::as_str, "strategy")
    }
}

/// How execution times are predicted (SPEC.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredictMode {
    /// The default chain (learned statistics and fallbacks).
    Default,
    /// The lookup table first.
    LookupTable,
}

impl PredictMode {
    /// Every mode.
    pub const ALL: [Self; 2] = [Self::Default, Self::LookupTable];

    /// Its API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::LookupTable => "lookup_table",
        }
    }

    /// Parses an API name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self, String> {
        parse_name(name, &Self::ALL, Self::as_str, "predict mode")
    }
}

/// A JSON object as text, without copying it first.
fn serialized_object(map: &Map<String, Value>) -> String {
    // Serializing a map of JSON values cannot fail (keys are strings).
    serde_json::to_string(map).unwrap_or_else(|_| "{}".to_string())
}

/// The variant named `name` (exactly: names are case-sensitive), or an error that lists
/// the valid names.
fn parse_name<T: Copy>(
    name: &str,
    all: &[T],
    as_str: fn(T) -> &'static str,
    what: &str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == name)
        .ok_or_else(|| {
            let valid: Vec<&str> = all.iter().map(|v| as_str(*v)).collect();
            format!("unknown {what} '{name}'; valid: {}", valid.join(", "))
        })
}

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
    /// The database failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A task of a submit.
#[derive(Debug, Clone)]
pub struct SubmitItem {
    /// The client's idempotency key, if any.
    pub task_id: Option<TaskId>,
    /// The client's input, as JSON.
    pub task_input: Box<RawValue>,
    /// The client's metadata.
    pub metadata: Map<String, Value>,
}

/// What a submit answers for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The task's id.
    pub task_id: TaskId,
    /// The TI chosen for it, if one is usable.
    pub scheduled_ti: Option<TiUuid>,
}

/// A TI with its live queue estimate, for `/queue/info` and `/ti/list`.
#[derive(Debug, Clone)]
pub struct TiSnapshot {
    /// What is stored of it.
    pub ti: StoredTi,
    /// Whether it may get new tasks.
    pub healthy: bool,
    /// Expected wait, ms.
    pub wait_ms: f64,
    /// Its error, ms.
    pub wait_error_ms: f64,
    /// Tasks dispatched to it and not completed.
    pub queue_length: usize,
}

/// Settings the core needs.
#[derive(Debug, Clone)]
struct CoreSettings {
    ti: crate::config::TiSettings,
    callback_url: String,
    allowed_hosts: Vec<dispatch::HostRule>,
}

struct Inner {
    /// Held for microseconds, never across an `.await`.
    state: Mutex<State>,
    /// Tasks with a dispatch or re-route under way, so the sweep leaves them alone.
    in_flight: Mutex<HashSet<TaskId>>,
    db: Db,
    client: TiClient,
    settings: CoreSettings,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// The scheduling core; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

const STRATEGY_KEY: &str = "strategy";
/// Tasks of a batch decided per hold of the cache lock.
const DECIDE_CHUNK: usize = 64;
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
        let mut state = State::new(
            strategy,
            predict_mode,
            predictor,
            rng,
            settings.scheduling.weighted_lambda,
            settings.ti.max_inflight_dispatches,
        );
        let tis = TiRepo::all(&db.read).await?;
        let ti_count = tis.len();
        for ti in tis {
            state.upsert_ti(ti);
        }
        let unfinished = TaskRepo::unfinished(&db.read).await?;
        let now = Instant::now();
        let unix = unix_now();
        for task in &unfinished {
            let Some(ti) = task.ti_uuid else { continue };
            state.reserve(
                &task.task_id,
                ti,
                task.predicted_ms,
                task.predicted_error_ms,
            );
            if let Some(at) = task.dispatch_time {
                let ran = std::time::Duration::from_secs_f64((unix - at).max(0.0));
                state.mark_started(&task.task_id, ti, now.checked_sub(ran).unwrap_or(now));
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
        let allowed_hosts = settings
            .ti
            .allowed_hosts
            .iter()
            .map(|rule| dispatch::HostRule::parse(rule))
            .collect::<Result<_, _>>()
            .map_err(Error::Invalid)?;
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                in_flight: Mutex::new(HashSet::new()),
                db,
                client: TiClient::new(
                    settings.ti.health_timeout(),
                    std::time::Duration::from_millis(settings.ti.dispatch_timeout_ms),
                ),
                settings: CoreSettings {
                    ti: settings.ti.clone(),
                    callback_url,
                    allowed_hosts,
                },
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        })
    }

    /// Locks the cache. Never hold the guard across an `.await`.
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the cache half-updated in a way
        // that matters more than stopping would: keep serving.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Current strategy, predict mode and lookup-table size.
    pub fn settings(&self) -> (StrategyKind, PredictMode, usize) {
        let st = self.state();
        (st.strategy, st.predict_mode, st.predictor.lookup_rows())
    }

    /// Sets and persists the strategy.
    pub async fn set_strategy(&self, kind: StrategyKind) -> Result<(), Error> {
        self.inner
            .db
            .writer
            .run(move |conn| SettingsRepo::set(conn, STRATEGY_KEY, kind.as_str()))
            .await?;
        self.state().strategy = kind;
        Ok(())
    }

    /// Sets and persists the predict mode; `lookup_table` needs a loaded table.
    pub async fn set_predict_mode(&self, mode: PredictMode) -> Result<(), Error> {
        if mode == PredictMode::LookupTable && self.state().predictor.lookup_rows() == 0 {
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
        self.state().predict_mode = mode;
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
        let mut st = self.state();
        st.predictor.load_lookup(rows, append);
        Ok(st.predictor.lookup_rows())
    }

    /// Registers a TI after checking `GET /health` and `GET /info`; registering the same
    /// host:port again returns the same id.
    pub async fn register(
        &self,
        host: &str,
        port: u16,
        model_name: Option<&str>,
    ) -> Result<TiUuid, Error> {
        if !self.inner.settings.allowed_hosts.is_empty()
            && !dispatch::host_allowed(&self.inner.settings.allowed_hosts, host)
        {
            return Err(Error::Invalid(format!(
                "host '{host}' is not in the allowed TI hosts (ti.allowed_hosts)"
            )));
        }
        let client = &self.inner.client;
        client.health(host, port).await?;
        let info = client.info(host, port).await?;
        let model = match (info.model_name.as_deref(), model_name) {
            (Some(reported), Some(given)) if reported != given => {
                return Err(Error::Invalid(format!(
                    "model_name '{given}' does not match the model '{reported}' that the TI at {host}:{port} reports"
                )))
            }
            (Some(reported), _) => reported.to_string(),
            (None, Some(given)) => given.to_string(),
            (None, None) => {
                return Err(Error::Invalid(format!(
                    "the TI at {host}:{port} reports no model in GET /info; give model_name"
                )))
            }
        };
        let candidate = StoredTi {
            ti_uuid: TiUuid::generate(),
            host: host.to_string(),
            port,
            model_name: model,
            hardware: info.hardware,
            callback_token: uuid::Uuid::new_v4().simple().to_string(),
            registered_at: unix_now(),
            removed_at: None,
        };
        let stored = self
            .inner
            .db
            .writer
            .run(move |conn| TiRepo::upsert_registered(conn, &candidate))
            .await?;
        let id = stored.ti_uuid;
        tracing::info!(ti = %id, host, port, model = %stored.model_name, "TI registered");
        self.state().upsert_ti(stored);
        // Tasks that waited for a usable TI of this model can go now.
        self.spawn_sweep();
        Ok(id)
    }

    /// Removes a TI: it gets no new tasks; what it already accepted runs to completion.
    pub async fn remove(&self, id: TiUuid) -> Result<(), Error> {
        let known = self
            .state()
            .tis
            .get(&id)
            .is_some_and(|e| e.ti.removed_at.is_none());
        let not_found = || Error::NotFound("TaskInstance not found".into());
        if !known {
            return Err(not_found());
        }
        let at = unix_now();
        let removed = self
            .inner
            .db
            .writer
            .run(move |conn| TiRepo::mark_removed(conn, id, at))
            .await?;
        if !removed {
            return Err(not_found());
        }
        let waiting: Vec<TaskId> = {
            let mut st = self.state();
            st.remove_ti(id, at);
            st.tis
                .get(&id)
                .map(|e| e.queue.not_started().cloned().collect())
                .unwrap_or_default()
        };
        tracing::info!(ti = %id, rerouted = waiting.len(), "TI removed");
        // Tasks it had not accepted yet go elsewhere; what it accepted runs there.
        for task_id in waiting {
            self.spawn_reroute(task_id);
        }
        Ok(())
    }

    /// Every TI, removed ones included, with its live estimate.
    pub fn tis(&self) -> Vec<TiSnapshot> {
        let st = self.state();
        let now = Instant::now();
        let mut list: Vec<TiSnapshot> = st
            .tis
            .values()
            .map(|e| TiSnapshot {
                ti: e.ti.clone(),
                healthy: e.healthy,
                wait_ms: e.queue.wait_ms(now),
                wait_error_ms: e.queue.error_ms(),
                queue_length: e.queue.len(),
            })
            .collect();
        list.sort_by(|a, b| {
            a.ti.registered_at
                .total_cmp(&b.ti.registered_at)
                .then(a.ti.ti_uuid.cmp(&b.ti.ti_uuid))
        });
        list
    }

    /// Submits tasks for `model`: chooses a TI for each, commits them all in one
    /// transaction (all or nothing), then dispatches them. A client `task_id` that exists
    /// already answers that task and creates nothing.
    pub async fn submit(
        &self,
        model: &str,
        items: Vec<SubmitItem>,
    ) -> Result<Vec<Submitted>, Error> {
        let mut answers: Vec<Option<Submitted>> = vec![None; items.len()];
        // Earlier item with the same client id, for repeats inside one batch.
        let mut first_with_id: HashMap<&TaskId, usize> = HashMap::new();
        let mut repeats = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(id) = &item.task_id else { continue };
            if let Some(&first) = first_with_id.get(id) {
                repeats.push((i, first));
                continue;
            }
            first_with_id.insert(id, i);
            if let Some(existing) = TaskRepo::find(&self.inner.db.read, id).await? {
                answers[i] = Some(Submitted {
                    task_id: existing.task_id,
                    scheduled_ti: existing.ti_uuid,
                });
            }
        }
        let repeated: HashSet<usize> = repeats.iter().map(|(r, _)| *r).collect();
        let fresh: Vec<usize> = (0..items.len())
            .filter(|&i| answers[i].is_none() && !repeated.contains(&i))
            .collect();

        let mut rows: Vec<(NewTask, Option<NewDecision>)> = Vec::with_capacity(fresh.len());
        if !fresh.is_empty() {
            let now = Instant::now();
            let submit_time = unix_now();
            // A batch gives the lock back between chunks, so single submits are decided
            // in between instead of waiting for the whole batch.
            for (c, chunk) in fresh.chunks(DECIDE_CHUNK).enumerate() {
                if c > 0 {
                    tokio::task::yield_now().await;
                }
                let mut st = self.state();
                if c == 0 && !st.serves(model) {
                    return Err(Error::NoInstance(format!(
                        "no TaskInstance is registered for model '{model}'"
                    )));
                }
                for &i in chunk {
                    let item = &items[i];
                    let task_id = item.task_id.clone().unwrap_or_else(TaskId::generate);
                    let decision = st.decide(
                        &task_id,
                        model,
                        &item.metadata,
                        DecisionReason::Submit,
                        now,
                        submit_time,
                    );
                    let (ti, mean, error) = match &decision {
                        Some(d) => (Some(d.chosen_ti), d.predicted_ms, d.predicted_error_ms),
                        None => {
                            let p =
                                st.predictor
                                    .predict(st.predict_mode, model, None, &item.metadata);
                            (None, p.mean_ms, p.error_ms)
                        }
                    };
                    rows.push((
                        NewTask {
                            task_id,
                            model_name: model.to_string(),
                            task_input: item.task_input.get().to_string(),
                            metadata: serialized_object(&item.metadata),
                            ti_uuid: ti,
                            predicted_ms: mean,
                            predicted_error_ms: error,
                            submit_time,
                        },
                        decision,
                    ));
                }
            }
        }

        // What dispatching needs afterwards; the rows themselves go to the writer.
        let placed: Vec<(TaskId, Option<TiUuid>, String)> = rows
            .iter()
            .map(|(t, _)| (t.task_id.clone(), t.ti_uuid, t.metadata.clone()))
            .collect();
        let rows = rows
            .into_iter()
            .map(|(t, d)| Ok((t, d.map(DecisionRow::try_from).transpose()?)))
            .collect::<Result<Vec<_>, StoreError>>();
        let inserted = match rows {
            Ok(rows) if rows.is_empty() => Ok(Vec::new()),
            Ok(rows) => {
                self.inner
                    .db
                    .writer
                    .run(move |conn| TaskRepo::insert_submit(conn, &rows))
                    .await
            }
            Err(e) => Err(e),
        };
        let inserted = match inserted {
            Ok(flags) => flags,
            Err(e) => {
                let mut st = self.state();
                for (task_id, ..) in &placed {
                    st.release(task_id);
                }
                return Err(e.into());
            }
        };

        for ((task_id, ti, metadata), (&i, new)) in
            placed.into_iter().zip(fresh.iter().zip(inserted))
        {
            if !new {
                // A concurrent submit of the same client id won the race: answer with it.
                self.state().release(&task_id);
                let existing = TaskRepo::find(&self.inner.db.read, &task_id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt(format!("task {task_id} vanished")))?;
                answers[i] = Some(Submitted {
                    task_id: existing.task_id,
                    scheduled_ti: existing.ti_uuid,
                });
                continue;
            }
            metrics::counter!("ti_scheduler_submits_total").increment(1);
            answers[i] = Some(Submitted {
                task_id: task_id.clone(),
                scheduled_ti: ti,
            });
            let Some(ti) = ti else { continue };
            let item = &items[i];
            match RawValue::from_string(metadata) {
                Ok(metadata_raw) => {
                    let payload = Arc::new(dispatch::Payload {
                        model: model.to_string(),
                        task_input: item.task_input.clone(),
                        metadata_raw,
                        metadata: item.metadata.clone(),
                    });
                    self.spawn_drive(task_id, dispatch::Step::Dispatch(ti), payload);
                }
                // Cannot happen (we serialized it); the sweep would dispatch it.
                Err(e) => tracing::error!(error = %e, "metadata did not serialize"),
            }
        }
        for (i, first) in repeats {
            answers[i] = answers[first].clone();
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// A stored task.
    pub async fn task(&self, task_id: &TaskId) -> Result<Option<StoredTask>, Error> {
        Ok(TaskRepo::find(&self.inner.db.read, task_id).await?)
    }
}
