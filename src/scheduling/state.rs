//! The hot-path cache: every TI with its queue estimate, the models' replicas, the current
//! strategy and predict mode, and the predictor. It lives behind one `std::sync::Mutex`
//! held for microseconds and never across an `.await`; SQLite is the truth and this is
//! rebuilt from it at start-up.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::queue::QueueEstimate;
use super::strategy;
use crate::domain::{
    Candidate, DecisionReason, NewDecision, PredictMode, StrategyKind, TaskId, TiUuid,
};
use crate::predictor::{Prediction, Predictor};
use crate::store::StoredTi;
use crate::ti::TiClient;

/// One TI as the scheduler sees it.
#[derive(Debug)]
pub struct TiEntry {
    /// What is stored of it.
    pub ti: StoredTi,
    /// False after a failed health probe or dispatch, until a probe succeeds.
    pub healthy: bool,
    /// Consecutive failed health probes.
    pub failed_probes: u32,
    /// Tasks dispatched to it and not completed, with their predictions.
    pub queue: QueueEstimate,
    /// Bounds the dispatches in flight to it.
    pub dispatch_slots: Arc<Semaphore>,
    /// Its `POST /queue/submit` URL (`None` if its host cannot form one).
    pub submit_url: Option<reqwest::Url>,
}

impl TiEntry {
    /// Registered and healthy: may get new tasks.
    pub fn usable(&self) -> bool {
        self.healthy && self.ti.removed_at.is_none()
    }
}

/// The cache itself.
pub struct State {
    /// Every TI ever registered (removed ones too: their results are still accepted).
    /// Fx hashing: the hot path looks every candidate up here, and the keys are not
    /// attacker-chosen (the scheduler generates them).
    pub tis: FxHashMap<TiUuid, TiEntry>,
    /// Model name to its registered (not removed) TIs, in registration order.
    pub models: HashMap<String, Vec<TiUuid>>,
    /// Which TI holds each unfinished task's prediction.
    pub reservations: HashMap<TaskId, TiUuid>,
    /// Strategy for the next decision.
    pub strategy: StrategyKind,
    /// Predict mode for the next decision.
    pub predict_mode: PredictMode,
    /// Execution-time predictor.
    pub predictor: Predictor,
    rr_cursor: HashMap<String, usize>,
    rng: StdRng,
    lambda: f64,
    max_inflight_dispatches: usize,
}

impl State {
    /// An empty cache.
    pub fn new(
        strategy: StrategyKind,
        predict_mode: PredictMode,
        predictor: Predictor,
        rng: StdRng,
        lambda: f64,
        max_inflight_dispatches: usize,
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
        }
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
        let slots = self.max_inflight_dispatches.max(1);
        let entry = self.tis.entry(id).or_insert_with(|| TiEntry {
            ti: ti.clone(),
            healthy: true,
            failed_probes: 0,
            queue: QueueEstimate::default(),
            dispatch_slots: Arc::new(Semaphore::new(slots)),
            submit_url: TiClient::submit_url(&ti.host, ti.port),
        });
        entry.ti = ti;
        entry.healthy = true;
        entry.failed_probes = 0;
    }

    /// Marks a TI removed: it leaves its model's replicas but keeps its queue.
    pub fn remove_ti(&mut self, id: TiUuid, at: f64) {
        if let Some(entry) = self.tis.get_mut(&id) {
            entry.ti.removed_at = Some(at);
            if let Some(list) = self.models.get_mut(&entry.ti.model_name) {
                list.retain(|t| *t != id);
            }
        }
    }

    /// True if some registered TI serves `model` (healthy or not).
    pub fn serves(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|l| !l.is_empty())
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

    /// Notes that `ti` accepted the task, if it still holds its prediction.
    pub fn mark_started(&mut self, task_id: &TaskId, ti: TiUuid, at: Instant) {
        if self.reservations.get(task_id) == Some(&ti) {
            if let Some(entry) = self.tis.get_mut(&ti) {
                entry.queue.mark_started(task_id, at);
            }
        }
    }

    /// Chooses a TI for a task among the model's usable ones with the current strategy and
    /// reserves the prediction there. `None` when no TI is usable.
    pub fn decide(
        &mut self,
        task_id: &TaskId,
        model: &str,
        metadata: &Map<String, Value>,
        reason: DecisionReason,
        now: Instant,
        decided_at: f64,
    ) -> Option<NewDecision> {
        let ids = self.models.get(model)?;
        let mut candidates = Vec::with_capacity(ids.len());
        let mut predictions: Vec<Prediction> = Vec::with_capacity(ids.len());
        // Predictions depend on the hardware only; most models have one or two kinds.
        let mut by_hardware: Vec<(Option<&str>, Prediction)> = Vec::new();
        for id in ids {
            let Some(entry) = self.tis.get(id).filter(|e| e.usable()) else {
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
            candidates.push(Candidate {
                ti_uuid: *id,
                wait_ms: entry.queue.wait_ms(now),
                wait_error_ms: entry.queue.error_ms(),
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
        self.reserve(task_id, chosen_ti, prediction.mean_ms, prediction.error_ms);
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
