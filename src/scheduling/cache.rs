//! The hot-path cache: every TI with its queue estimate, the models' replicas, the current
//! strategy and predict mode, and the predictor. It lives behind one `std::sync::Mutex`
//! held for microseconds and never across an `.await`; SQLite is the truth and this is
//! rebuilt from it at start-up.
//!
//! Its fields are private: this file owns the invariant that a task's prediction sits in
//! exactly one TI's queue, the one [`Cache::reservations`] names, from the decision that
//! put it there until the task completes or moves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::admission::{self, Ask, Refusal, Seen};
use super::events::Event;
use super::queue::QueueEstimate;
use super::strategy;
use crate::domain::{
    Candidate, DecisionReason, LookupRow, NewDecision, PredictMode, StrategyKind, TaskId,
    TaskStatus, TiKind, TiUuid,
};
use crate::predictor::{Observed, Prediction, Predictor};
use crate::store::StoredTi;
use crate::ti::TiClient;

/// One TI as the scheduler sees it.
#[derive(Debug)]
struct TiEntry {
    /// What is stored of it.
    ti: StoredTi,
    /// False after a failed health probe or dispatch, until a probe succeeds.
    healthy: bool,
    /// Consecutive failed health probes.
    failed_probes: u32,
    /// Tasks dispatched to it and not completed, with their predictions.
    queue: QueueEstimate,
    /// Bounds the dispatches in flight to it.
    dispatch_slots: Arc<Semaphore>,
    /// Where requests go, parsed once rather than per dispatch (`None` if its host cannot
    /// form a URL): [`request_url`].
    url: Option<reqwest::Url>,
    /// It answered 408, 429 or 503: no new request until then.
    paused_until: Option<Instant>,
    /// The next pause when it gives no `Retry-After`; doubles, back to the base after a 2xx.
    next_pause: Duration,
}

impl TiEntry {
    /// Registered and healthy: may get new tasks.
    fn usable(&self) -> bool {
        self.healthy && self.ti.removed_at.is_none()
    }

    /// Stops the requests waiting for one of its slots (it was removed or went
    /// unhealthy): they are decided again. Only an OpenAI-compatible TI's requests wait
    /// there; a callback TI's dispatches are short.
    fn close_slots(&mut self) {
        if self.ti.kind == TiKind::Openai {
            self.dispatch_slots.close();
        }
    }

    /// Opens its slots again after [`TiEntry::close_slots`].
    fn reopen_slots(&mut self) {
        if self.dispatch_slots.is_closed() {
            let permits = match self.ti.kind {
                TiKind::Openai => self.queue.slots(),
                TiKind::Callback => 1,
            };
            self.dispatch_slots = Arc::new(Semaphore::new(permits));
        }
    }

    /// Its expected wait and error for a new task at `now`: the queue estimate, and no
    /// less than the time left of a pause.
    fn estimate(&self, now: Instant) -> (f64, f64) {
        let (wait, error) = self.queue.estimate(now);
        let paused = self.paused_until.map_or(0.0, |until| {
            until.saturating_duration_since(now).as_secs_f64() * 1000.0
        });
        (wait.max(paused), error)
    }
}

/// Longest pause of a TI that answers "busy" without a `Retry-After` (docs/API.md, OpenAI-compatible servers).
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Where requests to a TI go: `POST /queue/submit` for a callback TI; for an
/// OpenAI-compatible one its root, whose path each request sets
/// ([`TiClient::openai_url`]). `None` if its host cannot form a URL.
fn request_url(ti: &StoredTi) -> Option<reqwest::Url> {
    match ti.kind {
        TiKind::Callback => TiClient::submit_url(&ti.host, ti.port),
        TiKind::Openai => TiClient::openai_root(&ti.host, ti.port),
    }
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
    /// Tasks dispatched to it and not completed (waiting and running).
    pub queue_length: usize,
    /// Requests it runs at once (its queue estimate's slots).
    pub max_concurrency: usize,
    /// Tasks it is running (callback: accepted; openai: requests in flight).
    pub running: usize,
}

/// A task to place: what a decision needs to know of it and of the moment.
#[derive(Debug, Clone, Copy)]
pub struct Placing<'a> {
    /// The task.
    pub task_id: &'a TaskId,
    /// Its model.
    pub model: &'a str,
    /// The only kind of TI it may go to (a front-door request: `openai`), if any.
    pub only: Option<TiKind>,
    /// Its metadata (the predictor's features).
    pub metadata: &'a Map<String, Value>,
    /// Why it is placed (submit, re-route).
    pub reason: DecisionReason,
    /// Now, for the queue estimates.
    pub now: Instant,
    /// Now, as the decision records it (Unix seconds).
    pub decided_at: f64,
}

/// Where a task was placed: the decision (with the chosen TI) when a TI of its model is
/// usable, and the prediction it carries either way.
#[derive(Debug)]
pub(super) struct Placement {
    /// The decision to store; `None` when no TI is usable (the task waits, `queued`).
    pub(super) decision: Option<NewDecision>,
    /// Predicted execution time on the chosen TI (or on none), ms.
    pub(super) predicted_ms: f64,
    /// Its error, ms.
    pub(super) predicted_error_ms: f64,
    /// `scheduled` when bound to an OpenAI-compatible TI (whose queue the scheduler
    /// keeps), else `queued` until a TI accepts it.
    pub(super) status: TaskStatus,
}

impl Placement {
    /// The chosen TI, if any.
    pub(super) fn ti(&self) -> Option<TiUuid> {
        self.decision.as_ref().map(|d| d.chosen_ti)
    }
}

/// A successful execution, for the predictor to learn from.
pub(super) struct Execution<'a> {
    pub(super) model: &'a str,
    pub(super) hardware: Option<&'a str>,
    pub(super) metadata: &'a Map<String, Value>,
    pub(super) execution_ms: f64,
}

/// What a dispatcher needs to send a task to a TI.
pub(super) struct DispatchTarget {
    /// How to talk to it.
    pub(super) kind: TiKind,
    /// Where it is.
    pub(super) host: String,
    /// Its port.
    pub(super) port: u16,
    /// The model it serves (an OpenAI request's `model` when the task gives none).
    pub(super) model: String,
    /// Where requests go ([`request_url`]; `None` if its host cannot form a URL).
    pub(super) url: Option<reqwest::Url>,
    /// The token it must echo in its callback.
    pub(super) callback_token: String,
    /// Bounds the dispatches in flight to it.
    pub(super) slots: Arc<Semaphore>,
}

/// What a health probe changed.
pub(super) struct ProbeChange {
    /// The TI's health before the probe.
    pub(super) was_healthy: bool,
    /// Tasks to move elsewhere: the TI has just failed enough probes in a row.
    pub(super) reroute: Vec<TaskId>,
}

/// The cache itself.
pub struct Cache {
    /// Every TI ever registered (removed ones too: their results are still accepted).
    /// Fx hashing: the hot path looks every candidate up here, and the keys are not
    /// attacker-chosen (the scheduler generates them).
    tis: FxHashMap<TiUuid, TiEntry>,
    /// Model name to its registered (not removed) TIs, in registration order.
    models: HashMap<String, Vec<TiUuid>>,
    /// Which TI holds each unfinished task's prediction.
    reservations: HashMap<TaskId, TiUuid>,
    strategy: StrategyKind,
    predict_mode: PredictMode,
    predictor: Predictor,
    rr_cursor: HashMap<String, usize>,
    rng: StdRng,
    lambda: f64,
    max_inflight_dispatches: usize,
    /// First pause of a TI that answers "busy" without a `Retry-After`.
    base_pause: Duration,
}

impl Cache {
    /// An empty cache.
    pub fn new(
        strategy: StrategyKind,
        predict_mode: PredictMode,
        predictor: Predictor,
        rng: StdRng,
        lambda: f64,
        max_inflight_dispatches: usize,
        base_pause: Duration,
    ) -> Self {
        Self {
            tis: FxHashMap::default(),
            models: HashMap::new(),
            reservations: HashMap::new(),
            strategy,
            predict_mode,
            predictor,
            rr_cursor: HashMap::new(),
            rng,
            lambda,
            max_inflight_dispatches,
            base_pause,
        }
    }

    /// Strategy for the next decision.
    pub(super) fn strategy(&self) -> StrategyKind {
        self.strategy
    }

    /// Predict mode for the next decision.
    pub(super) fn predict_mode(&self) -> PredictMode {
        self.predict_mode
    }

    pub(super) fn set_strategy(&mut self, kind: StrategyKind) {
        self.strategy = kind;
    }

    pub(super) fn set_predict_mode(&mut self, mode: PredictMode) {
        self.predict_mode = mode;
    }

    /// Rows in the lookup table.
    pub(super) fn lookup_rows(&self) -> usize {
        self.predictor.lookup_rows()
    }

    /// Replaces the lookup table, or adds to it. Returns the rows now loaded.
    pub(super) fn load_lookup(&mut self, rows: Vec<LookupRow>, append: bool) -> usize {
        self.predictor.load_lookup(rows, append);
        self.predictor.lookup_rows()
    }

    /// Adds or updates a TI from its stored row; a registered one joins its model's
    /// replicas (moving if its model changed) and counts as healthy.
    pub fn upsert_ti(&mut self, ti: StoredTi) {
        let id = ti.ti_uuid;
        if let Some(old) = self.tis.get(&id) {
            if let Some(list) = self.models.get_mut(&old.ti.model_name) {
                list.retain(|t| *t != id);
            }
        }
        if ti.removed_at.is_none() {
            self.models
                .entry(ti.model_name.clone())
                .or_default()
                .push(id);
        }
        // Callback TIs run their own queue (modelled one task at a time) and take up to
        // `max_inflight_dispatches` dispatches at once; an OpenAI-compatible TI runs
        // `max_concurrency` requests, and that many are in flight to it.
        let (dispatches, queue_slots) = match ti.kind {
            TiKind::Callback => (
                ti.max_concurrency
                    .map_or(self.max_inflight_dispatches, |c| c as usize),
                1,
            ),
            TiKind::Openai => {
                let c = ti
                    .max_concurrency
                    .unwrap_or(TiKind::Openai.default_concurrency())
                    as usize;
                (c, c)
            }
        };
        let fresh = |ti: &StoredTi| TiEntry {
            ti: ti.clone(),
            healthy: true,
            failed_probes: 0,
            queue: QueueEstimate::with_slots(queue_slots),
            dispatch_slots: Arc::new(Semaphore::new(dispatches.max(1))),
            url: request_url(ti),
            paused_until: None,
            next_pause: self.base_pause,
        };
        match self.tis.get_mut(&id) {
            // Re-registered with another kind or concurrency: what runs there keeps its
            // permits; new sends count against the new limit.
            Some(entry)
                if entry.ti.kind != ti.kind || entry.ti.max_concurrency != ti.max_concurrency =>
            {
                entry.dispatch_slots = Arc::new(Semaphore::new(dispatches.max(1)));
                entry.queue.set_slots(queue_slots);
                entry.url = request_url(&ti);
                entry.ti = ti;
            }
            Some(entry) => entry.ti = ti,
            None => {
                self.tis.insert(id, fresh(&ti));
            }
        }
        if let Some(entry) = self.tis.get_mut(&id) {
            entry.healthy = true;
            entry.failed_probes = 0;
            entry.reopen_slots();
        }
    }

    /// True if the TI is registered and not removed.
    pub(super) fn is_registered(&self, id: TiUuid) -> bool {
        self.tis.get(&id).is_some_and(|e| e.ti.removed_at.is_none())
    }

    /// Marks a TI removed: it leaves its model's replicas but keeps its queue. Returns the
    /// tasks it holds that it has not accepted yet (they should go elsewhere).
    pub(super) fn remove_ti(&mut self, id: TiUuid, at: f64) -> Vec<TaskId> {
        let Some(entry) = self.tis.get_mut(&id) else {
            return Vec::new();
        };
        entry.ti.removed_at = Some(at);
        entry.close_slots();
        if let Some(list) = self.models.get_mut(&entry.ti.model_name) {
            list.retain(|t| *t != id);
        }
        entry.queue.not_started().cloned().collect()
    }

    /// Every TI, removed ones included, with its live estimate, in registration order.
    pub(super) fn snapshots(&self, now: Instant) -> Vec<TiSnapshot> {
        let mut list: Vec<TiSnapshot> = self
            .tis
            .values()
            .map(|e| {
                let (wait_ms, wait_error_ms) = e.estimate(now);
                TiSnapshot {
                    ti: e.ti.clone(),
                    healthy: e.healthy,
                    wait_ms,
                    wait_error_ms,
                    queue_length: e.queue.len(),
                    max_concurrency: e.queue.slots(),
                    running: e.queue.running(),
                }
            })
            .collect();
        list.sort_by(|a, b| {
            a.ti.registered_at
                .total_cmp(&b.ti.registered_at)
                .then(a.ti.ti_uuid.cmp(&b.ti.ti_uuid))
        });
        list
    }

    /// True if some registered TI of `model` is OpenAI-compatible.
    pub(super) fn serves_openai(&self, model: &str) -> bool {
        self.models
            .get(model)
            .is_some_and(|ids| ids.iter().any(|id| self.kind(*id) == Some(TiKind::Openai)))
    }

    /// The models that some registered OpenAI-compatible TI serves, sorted, each with the
    /// earliest registration time (Unix seconds) among those TIs.
    pub(super) fn openai_models(&self) -> Vec<(String, f64)> {
        let mut models: Vec<(String, f64)> = self
            .models
            .iter()
            .filter_map(|(model, ids)| {
                ids.iter()
                    .filter_map(|id| self.tis.get(id))
                    .filter(|e| e.ti.kind == TiKind::Openai && e.ti.removed_at.is_none())
                    .map(|e| e.ti.registered_at)
                    .min_by(f64::total_cmp)
                    .map(|at| (model.clone(), at))
            })
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        models
    }

    /// True if some registered TI serves `model` (healthy or not).
    pub(super) fn serves(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|l| !l.is_empty())
    }

    /// The task's TI if it is usable, and whether any TI of the model is.
    pub(super) fn usability(&self, ti: Option<TiUuid>, model: &str) -> (Option<TiUuid>, bool) {
        let usable = |id: &TiUuid| self.tis.get(id).is_some_and(TiEntry::usable);
        (
            ti.filter(|id| usable(id)),
            self.models
                .get(model)
                .is_some_and(|ids| ids.iter().any(usable)),
        )
    }

    /// What a dispatcher needs to send to `ti`, if it is usable.
    pub(super) fn dispatch_target(&self, ti: TiUuid) -> Option<DispatchTarget> {
        self.tis
            .get(&ti)
            .filter(|e| e.usable())
            .map(|e| DispatchTarget {
                kind: e.ti.kind,
                host: e.ti.host.clone(),
                port: e.ti.port,
                model: e.ti.model_name.clone(),
                url: e.url.clone(),
                callback_token: e.ti.callback_token.clone(),
                slots: e.dispatch_slots.clone(),
            })
    }

    /// How the scheduler talks to the TI.
    pub(super) fn kind(&self, ti: TiUuid) -> Option<TiKind> {
        self.tis.get(&ti).map(|e| e.ti.kind)
    }

    /// The TI answered "busy" (408, 429, 503): no new request to it for `retry_after`,
    /// or, when it gave none, for a pause that doubles each time (from `ti.retry_backoff_ms`,
    /// at most 30 s).
    pub(super) fn pause(&mut self, ti: TiUuid, retry_after: Option<Duration>, now: Instant) {
        if let Some(e) = self.tis.get_mut(&ti) {
            let pause = retry_after.unwrap_or(e.next_pause).min(MAX_PAUSE);
            if retry_after.is_none() {
                e.next_pause = (e.next_pause * 2).min(MAX_PAUSE);
            }
            e.paused_until = Some(now + pause);
        }
    }

    /// Until when the TI is paused, if it is now.
    pub(super) fn paused_until(&self, ti: TiUuid) -> Option<Instant> {
        let now = Instant::now();
        self.tis
            .get(&ti)
            .and_then(|e| e.paused_until)
            .filter(|until| *until > now)
    }

    /// The TI answered a request: its pauses start again from the base.
    pub(super) fn answered(&mut self, ti: TiUuid) {
        if let Some(e) = self.tis.get_mut(&ti) {
            e.next_pause = self.base_pause;
        }
    }

    /// The TI's state as a `ti` event.
    pub(super) fn ti_event(&self, ti: TiUuid) -> Option<Event> {
        self.tis.get(&ti).map(|e| Event::Ti {
            ti_uuid: ti,
            model_name: e.ti.model_name.clone(),
            healthy: e.healthy,
            removed: e.ti.removed_at.is_some(),
        })
    }

    /// The TI's host and port, removed or not.
    pub(super) fn address(&self, ti: TiUuid) -> Option<(String, u16)> {
        self.tis.get(&ti).map(|e| (e.ti.host.clone(), e.ti.port))
    }

    /// The TI's hardware, if it reports one.
    pub(super) fn hardware(&self, ti: TiUuid) -> Option<String> {
        self.tis.get(&ti).and_then(|e| e.ti.hardware.clone())
    }

    /// True if `token` is the TI's callback token (compared in constant time).
    pub(super) fn token_matches(&self, ti: TiUuid, token: &str) -> bool {
        self.tis
            .get(&ti)
            .is_some_and(|e| bool::from(e.ti.callback_token.as_bytes().ct_eq(token.as_bytes())))
    }

    /// Takes a TI out of scheduling until a health probe succeeds. Returns whether it was
    /// healthy until now.
    pub(super) fn mark_unhealthy(&mut self, ti: TiUuid) -> bool {
        self.tis.get_mut(&ti).is_some_and(|e| {
            e.close_slots();
            std::mem::replace(&mut e.healthy, false)
        })
    }

    /// The TIs to probe: every registered one, and every removed one still holding tasks.
    pub(super) fn probe_targets(&self) -> Vec<(TiUuid, String, u16)> {
        self.tis
            .values()
            .filter(|e| e.ti.removed_at.is_none() || !e.queue.is_empty())
            .map(|e| (e.ti.ti_uuid, e.ti.host.clone(), e.ti.port))
            .collect()
    }

    /// Records a probe's answer. After `threshold` failures in a row the TI's tasks are
    /// handed back to be re-routed (once, at the threshold).
    pub(super) fn record_probe(
        &mut self,
        ti: TiUuid,
        healthy: bool,
        threshold: u32,
    ) -> Option<ProbeChange> {
        let entry = self.tis.get_mut(&ti)?;
        let was_healthy = std::mem::replace(&mut entry.healthy, healthy);
        let mut reroute = Vec::new();
        if healthy {
            entry.failed_probes = 0;
            if entry.ti.removed_at.is_none() {
                entry.reopen_slots();
            }
        } else {
            entry.close_slots();
            entry.failed_probes += 1;
            if entry.failed_probes == threshold {
                reroute.extend(entry.queue.task_ids().cloned());
            }
        }
        Some(ProbeChange {
            was_healthy,
            reroute,
        })
    }

    /// Puts a task's prediction in a TI's queue (moving it from wherever it was).
    pub fn reserve(&mut self, task_id: &TaskId, ti: TiUuid, mean_ms: f64, error_ms: f64) {
        self.release(task_id);
        if let Some(entry) = self.tis.get_mut(&ti) {
            entry.queue.push(task_id.clone(), mean_ms, error_ms);
            self.reservations.insert(task_id.clone(), ti);
        }
    }

    /// Takes a task's prediction out of its TI's queue. Returns that TI.
    pub fn release(&mut self, task_id: &TaskId) -> Option<TiUuid> {
        let ti = self.reservations.remove(task_id)?;
        if let Some(entry) = self.tis.get_mut(&ti) {
            entry.queue.remove(task_id, Instant::now());
        }
        Some(ti)
    }

    /// True if `ti` holds the task's prediction (it is the task's current TI).
    pub(super) fn holds(&self, task_id: &TaskId, ti: TiUuid) -> bool {
        self.reservations.get(task_id) == Some(&ti)
    }

    /// Notes that `ti` accepted the task, if it still holds its prediction.
    pub(super) fn mark_started(&mut self, task_id: &TaskId, ti: TiUuid, at: Instant) {
        if self.holds(task_id, ti) {
            if let Some(entry) = self.tis.get_mut(&ti) {
                entry.queue.mark_started(task_id, at);
            }
        }
    }

    /// A completed task: learns from its execution time when it succeeded, and takes its
    /// prediction off its TI.
    pub(super) fn complete(&mut self, task_id: &TaskId, succeeded: Option<Execution<'_>>) {
        if let Some(e) = succeeded {
            self.predictor
                .observe(e.model, e.hardware, e.metadata, e.execution_ms);
        }
        self.release(task_id);
    }

    /// What the predictor learned since the last call, to save.
    pub(super) fn take_learned(&mut self) -> Observed {
        self.predictor.take_changed()
    }

    /// Places a task: chooses a TI among the model's usable ones (of kind `only`, when
    /// given) with the current strategy and reserves the prediction there. With no usable
    /// TI, the task keeps the model's prediction and no TI. Used by submit, the front door
    /// and re-routes alike.
    pub(super) fn place(&mut self, task: &Placing<'_>) -> Placement {
        match self.choose(task) {
            Some(d) => self.reserved(d),
            None => self.unplaced(task.model, task.metadata),
        }
    }

    /// Places a submitted task as [`Cache::place`] does, once admission control admits it
    /// (`admission.rs`): checked before its prediction is reserved, so a refused task
    /// leaves every queue estimate as it was.
    pub(super) fn admit(&mut self, task: &Placing<'_>, ask: &Ask) -> Result<Placement, Refusal> {
        if ask.is_free() {
            return Ok(self.place(task));
        }
        let waiting = match ask.limits.max_waiting_tasks {
            Some(_) => self.waiting(task.model),
            None => 0,
        };
        let decision = self.choose(task);
        let wait_and_execution_ms = decision.as_ref().map(|d| {
            let wait = d
                .candidates
                .iter()
                .find(|c| c.ti_uuid == d.chosen_ti)
                .map_or(0.0, |c| c.wait_ms);
            (wait, d.predicted_ms)
        });
        let seen = Seen {
            waiting,
            wait_and_execution_ms,
        };
        admission::check(ask, task.model, seen)?;
        Ok(match decision {
            Some(d) => self.reserved(d),
            None => self.unplaced(task.model, task.metadata),
        })
    }

    /// Unfinished tasks on the model's registered TIs (healthy or not).
    fn waiting(&self, model: &str) -> usize {
        self.models.get(model).map_or(0, |ids| {
            ids.iter()
                .filter_map(|id| self.tis.get(id))
                .map(|e| e.queue.len())
                .sum()
        })
    }

    /// The placement of a decision, its prediction reserved on the chosen TI.
    fn reserved(&mut self, d: NewDecision) -> Placement {
        self.reserve(
            &d.task_id,
            d.chosen_ti,
            d.predicted_ms,
            d.predicted_error_ms,
        );
        Placement {
            predicted_ms: d.predicted_ms,
            predicted_error_ms: d.predicted_error_ms,
            status: match self.kind(d.chosen_ti) {
                Some(TiKind::Openai) => TaskStatus::Scheduled,
                _ => TaskStatus::Queued,
            },
            decision: Some(d),
        }
    }

    /// The placement of a task no TI of its model can take now: the model's prediction,
    /// no TI.
    fn unplaced(&self, model: &str, metadata: &Map<String, Value>) -> Placement {
        let p = self
            .predictor
            .predict(self.predict_mode, model, None, metadata);
        Placement {
            decision: None,
            predicted_ms: p.mean_ms,
            predicted_error_ms: p.error_ms,
            status: TaskStatus::Queued,
        }
    }

    /// Chooses a TI for a task among the model's usable ones with the current strategy and
    /// reserves the prediction there. `None` when no TI is usable.
    pub fn decide(&mut self, task: &Placing<'_>) -> Option<NewDecision> {
        let d = self.choose(task)?;
        self.reserve(
            task.task_id,
            d.chosen_ti,
            d.predicted_ms,
            d.predicted_error_ms,
        );
        Some(d)
    }

    /// Chooses a TI for a task among the model's usable ones (of kind `only`, when given)
    /// with the current strategy, reserving nothing. `None` when no TI is usable.
    fn choose(&mut self, task: &Placing<'_>) -> Option<NewDecision> {
        let Placing {
            task_id,
            model,
            only,
            metadata,
            reason,
            now,
            decided_at,
        } = *task;
        let ids = self.models.get(model)?;
        let mut candidates = Vec::with_capacity(ids.len());
        let mut predictions: Vec<Prediction> = Vec::with_capacity(ids.len());
        // Predictions depend on the hardware only; most models have one or two kinds.
        let mut by_hardware: Vec<(Option<&str>, Prediction)> = Vec::new();
        for id in ids {
            let wanted = |e: &&TiEntry| e.usable() && only.is_none_or(|k| e.ti.kind == k);
            let Some(entry) = self.tis.get(id).filter(wanted) else {
                continue;
            };
            let hardware = entry.ti.hardware.as_deref();
            let prediction = match by_hardware.iter().find(|(h, _)| *h == hardware) {
                Some((_, p)) => *p,
                None => {
                    let p = self
                        .predictor
                        .predict(self.predict_mode, model, hardware, metadata);
                    by_hardware.push((hardware, p));
                    p
                }
            };
            let (wait_ms, wait_error_ms) = entry.estimate(now);
            candidates.push(Candidate {
                ti_uuid: *id,
                wait_ms,
                wait_error_ms,
                queue_length: entry.queue.len(),
                predicted_ms: prediction.mean_ms,
                predicted_error_ms: prediction.error_ms,
                prediction_source: prediction.source.as_str(),
                score: 0.0,
            });
            predictions.push(prediction);
        }
        if candidates.is_empty() {
            return None;
        }
        if !self.rr_cursor.contains_key(model) {
            self.rr_cursor.insert(model.to_string(), 0);
        }
        let cursor = self.rr_cursor.get_mut(model)?;
        let chosen = strategy::select(
            self.strategy,
            &mut candidates,
            cursor,
            self.lambda,
            &mut self.rng,
        );
        let prediction = predictions[chosen];
        let chosen_ti = candidates[chosen].ti_uuid;
        Some(NewDecision {
            task_id: task_id.clone(),
            decided_at,
            reason,
            strategy: self.strategy.as_str(),
            predict_mode: self.predict_mode.as_str(),
            predicted_ms: prediction.mean_ms,
            predicted_error_ms: prediction.error_ms,
            prediction_source: prediction.source.as_str(),
            lookup_fallback: prediction.lookup_fallback,
            chosen_ti,
            candidates,
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn cache() -> Cache {
        Cache::new(
            StrategyKind::ShortestQueue,
            PredictMode::Default,
            Predictor::new(1000.0, 500.0, Vec::new(), Vec::new(), Vec::new()),
            StdRng::seed_from_u64(1),
            1.0,
            64,
            Duration::from_millis(100),
        )
    }

    fn url_of(cache: &Cache, ti: TiUuid) -> String {
        let target = cache.dispatch_target(ti).expect("a usable TI");
        target.url.expect("a URL").to_string()
    }

    #[test]
    fn a_ti_registered_again_with_another_kind_is_sent_to_that_kind_s_url() {
        let mut cache = cache();
        let mut ti = StoredTi {
            ti_uuid: TiUuid::generate(),
            host: "127.0.0.1".into(),
            port: 8000,
            model_name: "m".into(),
            hardware: None,
            callback_token: "t".into(),
            registered_at: 0.0,
            removed_at: None,
            kind: TiKind::Openai,
            max_concurrency: None,
        };
        let id = ti.ti_uuid;
        cache.upsert_ti(ti.clone());
        // An OpenAI-compatible TI's root: each request sets its own path.
        assert_eq!(url_of(&cache, id), "http://127.0.0.1:8000/");

        ti.kind = TiKind::Callback;
        cache.upsert_ti(ti.clone());
        assert_eq!(url_of(&cache, id), "http://127.0.0.1:8000/queue/submit");

        ti.kind = TiKind::Openai;
        cache.upsert_ti(ti);
        assert_eq!(url_of(&cache, id), "http://127.0.0.1:8000/");
    }
}
