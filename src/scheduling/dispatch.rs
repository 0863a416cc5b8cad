//! Getting tasks to TIs and results back.
//!
//! After a submit commits, each task is *driven*: dispatched to its TI (bounded
//! concurrency per TI, retries with backoff); on final failure the TI is marked unhealthy
//! and the task re-routed to another TI of the model (a new decision), or left `queued`
//! with no TI until one is usable. Results arrive by callback ([`Scheduler::accept_result`])
//! or by reconciliation (`GET /results/{id}` on the TI).
//!
//! Two background loops keep this honest: health probes (an unhealthy TI gets no tasks;
//! after `reroute_after_failed_probes` failures its tasks move elsewhere; a recovered TI
//! is used again) and the sweep, which re-reads the unfinished tasks from the database and
//! drives what nobody is driving: queued tasks (after a restart or a failed write),
//! tasks waiting for a TI, and scheduled tasks whose callback is overdue. At start-up the
//! sweep reconciles every scheduled task at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::{Error, Scheduler};
use crate::domain::{unix_now, Outcome, TaskId, TaskStatus, TiUuid};
use crate::store::{
    Completion, DecisionReason, DecisionRepo, DecisionRow, LearnedRepo, StatsRepo, TaskRepo,
    UnfinishedTask,
};
use crate::ti::protocol::{DispatchRequest, ResultCallback, TiTaskStatus};
use crate::ti::TiError;

/// What a dispatcher needs of a task.
#[derive(Debug)]
pub(super) struct Payload {
    pub(super) model: String,
    pub(super) task_input: Box<RawValue>,
    pub(super) metadata_raw: Box<RawValue>,
    pub(super) metadata: Map<String, Value>,
}

impl Payload {
    /// From the stored JSON texts.
    pub(super) fn from_stored(
        model: String,
        task_input: String,
        metadata: String,
    ) -> Result<Self, String> {
        let parsed: Map<String, Value> =
            serde_json::from_str(&metadata).map_err(|e| format!("stored metadata: {e}"))?;
        Ok(Self {
            model,
            task_input: RawValue::from_string(task_input)
                .map_err(|e| format!("stored task_input: {e}"))?,
            metadata_raw: RawValue::from_string(metadata)
                .map_err(|e| format!("stored metadata: {e}"))?,
            metadata: parsed,
        })
    }
}

/// The next thing to do for a task being driven.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    /// Send it to this TI.
    Dispatch(TiUuid),
    /// Choose another TI.
    Reroute,
}

enum Sent {
    /// The TI accepted it, or it needs nothing more (completed, shutting down).
    Done,
    /// The TI is not usable (removed or unhealthy): choose another.
    Unusable,
    /// Every attempt failed: the TI is unhealthy.
    Failed,
}

/// One entry of `ti.allowed_hosts`.
#[derive(Debug, Clone)]
pub(super) enum HostRule {
    /// A host name, matched exactly (case-insensitive).
    Name(String),
    /// An address or network.
    Net(IpAddr, u8),
}

impl HostRule {
    /// Parses `name`, `address` or `address/prefix`.
    pub(super) fn parse(rule: &str) -> Result<Self, String> {
        let rule = rule.trim();
        let bad = || format!("ti.allowed_hosts: '{rule}' is not a host name, address or network");
        if let Some((addr, prefix)) = rule.split_once('/') {
            let ip: IpAddr = addr.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(bad());
            }
            return Ok(Self::Net(ip, prefix));
        }
        if let Ok(ip) = rule.parse::<IpAddr>() {
            let full = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(Self::Net(ip, full));
        }
        if rule.is_empty() {
            return Err(bad());
        }
        Ok(Self::Name(rule.to_ascii_lowercase()))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let Self::Net(net, prefix) = self else {
            return false;
        };
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                u128::from(*n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// True if `host` is named by a rule, or is an address inside one. Host names are
/// matched by name only: they are never resolved for this check (no DNS traffic, and no
/// answer that depends on a resolver).
pub(super) fn host_allowed(rules: &[HostRule], host: &str) -> bool {
    let name = host.to_ascii_lowercase();
    match host.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) => rules.iter().any(|r| r.contains(ip)),
        Err(_) => rules
            .iter()
            .any(|r| matches!(r, HostRule::Name(n) if *n == name)),
    }
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Scheduler {
    /// Starts driving a task unless someone already is.
    pub(super) fn spawn_drive(&self, task_id: TaskId, step: Step, payload: Arc<Payload>) {
        if !self.begin_flight(&task_id) {
            return;
        }
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            this.drive(&task_id, step, &payload).await;
            this.end_flight(&task_id);
        });
    }

    /// Re-routes a task whose TI went away, reading it back from the database.
    pub(super) fn spawn_reroute(&self, task_id: TaskId) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            match TaskRepo::find_unfinished(&this.inner.db.read, &task_id).await {
                Ok(Some(task)) => {
                    match Payload::from_stored(task.model_name, task.task_input, task.metadata) {
                        Ok(p) => this.spawn_drive(task_id, Step::Reroute, Arc::new(p)),
                        Err(e) => {
                            tracing::error!(task_id = %task_id, error = %e, "cannot re-route")
                        }
                    }
                }
                Ok(None) => {
                    this.state().release(&task_id);
                }
                Err(e) => {
                    tracing::error!(task_id = %task_id, error = ?e, "cannot read task to re-route")
                }
            }
        });
    }

    fn begin_flight(&self, task_id: &TaskId) -> bool {
        let mut set = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.insert(task_id.clone())
    }

    fn end_flight(&self, task_id: &TaskId) {
        let mut set = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(task_id);
    }

    fn is_in_flight(&self, task_id: &TaskId) -> bool {
        let set = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.contains(task_id)
    }

    async fn drive(&self, task_id: &TaskId, mut step: Step, payload: &Payload) {
        loop {
            step = match step {
                Step::Dispatch(ti) => match self.send(task_id, ti, payload).await {
                    Sent::Done => return,
                    Sent::Unusable => Step::Reroute,
                    Sent::Failed => {
                        self.mark_unhealthy(ti, "dispatches failed");
                        Step::Reroute
                    }
                },
                Step::Reroute => match self.reroute(task_id, payload).await {
                    Some(ti) => Step::Dispatch(ti),
                    None => return,
                },
            };
        }
    }

    /// Takes a TI out of scheduling until a health probe succeeds.
    fn mark_unhealthy(&self, ti: TiUuid, why: &str) {
        if let Some(entry) = self.state().tis.get_mut(&ti) {
            if entry.healthy {
                tracing::warn!(ti = %ti, why, "TI marked unhealthy");
            }
            entry.healthy = false;
        }
    }

    /// Sends the task to `ti` with retries.
    async fn send(&self, task_id: &TaskId, ti: TiUuid, payload: &Payload) -> Sent {
        let target = {
            let st = self.state();
            st.tis.get(&ti).filter(|e| e.usable()).map(|e| {
                (
                    e.submit_url.clone(),
                    e.ti.callback_token.clone(),
                    e.dispatch_slots.clone(),
                )
            })
        };
        let Some((url, token, slots)) = target else {
            return Sent::Unusable;
        };
        let Some(url) = url else {
            tracing::error!(ti = %ti, "the TI's address does not form a URL");
            return Sent::Failed;
        };
        let Ok(permit) = slots.acquire_owned().await else {
            return Sent::Unusable;
        };
        let request = DispatchRequest {
            task_id: task_id.as_str(),
            ti_uuid: ti.to_string(),
            model_name: &payload.model,
            task_input: &payload.task_input,
            metadata: &payload.metadata_raw,
            callback_url: &self.inner.settings.callback_url,
            callback_token: &token,
        };
        let settings = &self.inner.settings.ti;
        let mut backoff = Duration::from_millis(settings.retry_backoff_ms);
        for attempt in 1..=settings.dispatch_attempts.max(1) {
            match self.inner.client.dispatch(&url, &request).await {
                Ok(()) => {
                    // The slot is for talking to the TI, not for our own bookkeeping.
                    drop(permit);
                    self.note_accepted(task_id, ti).await;
                    return Sent::Done;
                }
                // The TI refused the task itself (4xx): the task fails, the TI stays healthy.
                Err(TiError::Rejected { status, body }) => {
                    drop(permit);
                    self.fail_rejected(task_id, ti, status, body).await;
                    return Sent::Done;
                }
                Err(e) => {
                    metrics::counter!("ti_scheduler_dispatch_failures_total").increment(1);
                    tracing::warn!(task_id = %task_id, ti = %ti, attempt, error = %e, "dispatch failed");
                }
            }
            if attempt < settings.dispatch_attempts {
                metrics::counter!("ti_scheduler_dispatch_retries_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    // Left `queued`: the next start-up dispatches it again.
                    _ = self.inner.shutdown.cancelled() => return Sent::Done,
                }
                backoff *= 2;
            }
        }
        Sent::Failed
    }

    /// Completes a task its TI rejected (a 4xx answer to the dispatch) as failed, with
    /// the TI's answer, as SPEC.md §9 does for OpenAI TIs.
    async fn fail_rejected(&self, task_id: &TaskId, ti: TiUuid, status: u16, body: Value) {
        metrics::counter!("ti_scheduler_dispatch_rejections_total").increment(1);
        tracing::warn!(task_id = %task_id, ti = %ti, status, "the TI rejected the task; it fails");
        let result = serde_json::json!({
            "error": format!("the TaskInstance rejected the task: HTTP {status}"),
            "upstream_status": status,
            "upstream_body": body,
        });
        if let Err(e) = self
            .complete_with(task_id, ti, 0.0, result, Outcome::Failed)
            .await
        {
            // Left unfinished: the sweep sends it again and it fails again.
            tracing::error!(task_id = %task_id, error = ?e, "storing the rejection failed");
        }
    }

    async fn note_accepted(&self, task_id: &TaskId, ti: TiUuid) {
        if self.state().reservations.get(task_id) != Some(&ti) {
            // Its result is already stored (a fast TI called back first; the reservation
            // goes only after that commit) or it was moved: nothing to record.
            return;
        }
        let (id, at) = (task_id.clone(), unix_now());
        let marked = self
            .inner
            .db
            .writer
            .run(move |conn| TaskRepo::mark_scheduled(conn, &id, ti, at))
            .await;
        match marked {
            Ok(true) => self.state().mark_started(task_id, ti, Instant::now()),
            // Completed already (a fast TI called back first) or re-routed meanwhile.
            Ok(false) => {}
            // The TI has it; the sweep will send it again and the TI dedupes.
            Err(e) => {
                tracing::error!(task_id = %task_id, error = ?e, "storing the dispatch failed")
            }
        }
    }

    /// Chooses a new TI for an unfinished task and stores the decision. Returns the TI to
    /// dispatch to, or `None` if the task completed meanwhile or no TI is usable (it then
    /// waits, `queued`, for the sweep).
    async fn reroute(&self, task_id: &TaskId, payload: &Payload) -> Option<TiUuid> {
        let (decision, mean, error) = {
            let mut st = self.state();
            st.release(task_id);
            let decision = st.decide(
                task_id,
                &payload.model,
                &payload.metadata,
                DecisionReason::Reroute,
                Instant::now(),
                unix_now(),
            );
            let (mean, error) = match &decision {
                Some(d) => (d.predicted_ms, d.predicted_error_ms),
                None => {
                    let p = st.predictor.predict(
                        st.predict_mode,
                        &payload.model,
                        None,
                        &payload.metadata,
                    );
                    (p.mean_ms, p.error_ms)
                }
            };
            (decision, mean, error)
        };
        let chosen = decision.as_ref().map(|d| d.chosen_ti);
        let id = task_id.clone();
        let moved = match decision.map(DecisionRow::try_from).transpose() {
            Ok(decision) => {
                self.inner
                    .db
                    .writer
                    .run(move |conn| {
                        let moved = TaskRepo::reassign(conn, &id, chosen, mean, error)?;
                        if let (true, Some(d)) = (moved, &decision) {
                            DecisionRepo::insert(conn, d)?;
                        }
                        Ok(moved)
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match moved {
            Ok(true) => {
                match chosen {
                    Some(ti) => tracing::info!(task_id = %task_id, ti = %ti, "task re-routed"),
                    None => {
                        tracing::warn!(task_id = %task_id, model = %payload.model, "no usable TI; task waits")
                    }
                }
                chosen
            }
            Ok(false) => {
                self.state().release(task_id);
                None
            }
            Err(e) => {
                self.state().release(task_id);
                tracing::error!(task_id = %task_id, error = ?e, "storing the re-route failed; the sweep retries");
                None
            }
        }
    }

    /// The TI's callback (`POST /result/submit`).
    ///
    /// The usual case is answered from memory: the task's prediction sits on the calling
    /// TI and the token is that TI's, so one UPDATE stores the result. Anything else (a
    /// late result from a TI the task was moved away from, an unknown task, a wrong token,
    /// a repeated callback) takes the checked path through the database.
    pub async fn accept_result(&self, callback: ResultCallback) -> Result<(), Error> {
        let task_id = TaskId::from_stored(callback.task_id.clone());
        let ti: Option<TiUuid> = callback.ti_uuid.parse().ok();
        let exec = callback.execution_time;
        let exec_ok = exec.is_finite() && exec >= 0.0;
        let expected = ti.filter(|ti| {
            let st = self.state();
            st.reservations.get(&task_id) == Some(ti)
                && st
                    .tis
                    .get(ti)
                    .is_some_and(|e| same_secret(&e.ti.callback_token, &callback.callback_token))
        });
        if let (Some(ti), true) = (expected, exec_ok) {
            // Not applied means it completed meanwhile: a repeat, answered as success.
            self.complete(&task_id, ti, exec, callback.result, callback.error)
                .await?;
            return Ok(());
        }

        let task = self
            .task(&task_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task '{}' not found", callback.task_id)))?;
        let forbidden = || {
            Error::Forbidden(format!(
                "ti_uuid '{}' with this callback_token is not a TaskInstance that task '{}' was dispatched to",
                callback.ti_uuid, callback.task_id
            ))
        };
        let ti = ti.ok_or_else(forbidden)?;
        let token_ok = self
            .state()
            .tis
            .get(&ti)
            .is_some_and(|e| same_secret(&e.ti.callback_token, &callback.callback_token));
        if !token_ok || !DecisionRepo::was_chosen(&self.inner.db.read, &task_id, ti).await? {
            return Err(forbidden());
        }
        if task.status == TaskStatus::Completed {
            return Ok(());
        }
        if !exec_ok {
            return Err(Error::Invalid(format!(
                "execution_time must be a non-negative number of ms, got {exec}"
            )));
        }
        self.complete(&task_id, ti, exec, callback.result, callback.error)
            .await?;
        Ok(())
    }

    /// Stores a task's outcome (the first one wins), learns from its execution time and
    /// takes its prediction off its TI. Returns false if it was already completed.
    async fn complete(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        execution_ms: f64,
        result: Option<Value>,
        error: Option<String>,
    ) -> Result<bool, Error> {
        let (result, outcome) = match error {
            Some(e) => (serde_json::json!({ "error": e }), Outcome::Failed),
            None => (result.unwrap_or(Value::Null), Outcome::Succeeded),
        };
        self.complete_with(task_id, ti, execution_ms, result, outcome)
            .await
    }

    /// [`Scheduler::complete`] with the stored result already shaped.
    async fn complete_with(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        execution_ms: f64,
        result: Value,
        outcome: Outcome,
    ) -> Result<bool, Error> {
        let completion = Completion {
            result: result.to_string(),
            outcome,
            execution_time_ms: execution_ms,
            completion_time: unix_now(),
            result_ti: ti,
        };
        let hardware = self
            .state()
            .tis
            .get(&ti)
            .and_then(|e| e.ti.hardware.clone());
        let id = task_id.clone();
        let stored = self
            .inner
            .db
            .writer
            .run(move |conn| TaskRepo::complete(conn, &id, &completion))
            .await?;
        let Some((model, metadata)) = stored else {
            return Ok(false);
        };
        let mut st = self.state();
        if outcome == Outcome::Succeeded {
            let metadata: Map<String, Value> = serde_json::from_str(&metadata).unwrap_or_default();
            // The learned state is saved by the flush loop.
            st.predictor
                .observe(&model, hardware.as_deref(), &metadata, execution_ms);
        }
        st.release(task_id);
        drop(st);
        let label = match outcome {
            Outcome::Succeeded => "ti_scheduler_completions_total",
            Outcome::Failed => "ti_scheduler_failures_total",
        };
        metrics::counter!(label).increment(1);
        Ok(true)
    }

    /// Saves what the predictor learned since the last flush (one write for all of it).
    pub async fn flush_learning(&self) -> Result<usize, Error> {
        let changed = self.state().predictor.take_changed();
        let n = changed.stats.len() + changed.models.len();
        if n == 0 {
            return Ok(0);
        }
        self.inner
            .db
            .writer
            .run(move |conn| {
                for stats in &changed.stats {
                    StatsRepo::save(conn, stats)?;
                }
                for learned in &changed.models {
                    LearnedRepo::save(conn, learned)?;
                }
                Ok(())
            })
            .await?;
        Ok(n)
    }

    /// Drives one unfinished task from where the database says it stands: a scheduled
    /// task is first checked with its TI (`GET /results/{id}`); a queued one is sent to
    /// its TI, or re-routed when that TI is not usable. `reroute_unreachable` moves a
    /// scheduled task whose TI does not answer (start-up); otherwise the health probes
    /// decide. Does nothing if someone else is driving the task.
    async fn settle(&self, task: UnfinishedTask, reroute_unreachable: bool) -> Settled {
        let task_id = task.task_id.clone();
        if !self.begin_flight(&task_id) {
            return Settled::Skipped;
        }
        let settled = self.settle_in_flight(task, reroute_unreachable).await;
        self.end_flight(&task_id);
        settled
    }

    async fn settle_in_flight(&self, task: UnfinishedTask, reroute_unreachable: bool) -> Settled {
        let step = match (task.status, task.ti_uuid) {
            (TaskStatus::Scheduled, Some(ti)) => match self.ask_ti(&task, ti).await {
                Asked::Finished => return Settled::Stored,
                Asked::Running => return Settled::Kept,
                // The TI never saw it (it restarted, or the dispatch was lost).
                Asked::Unknown => Step::Dispatch(ti),
                Asked::Unreachable if reroute_unreachable => {
                    self.mark_unhealthy(ti, "unreachable during recovery");
                    Step::Reroute
                }
                Asked::Unreachable => return Settled::Unreachable,
            },
            _ => {
                let (usable_ti, model_usable) = self.usability(task.ti_uuid, &task.model_name);
                match usable_ti {
                    Some(ti) => Step::Dispatch(ti),
                    None if model_usable => Step::Reroute,
                    None => return Settled::Waiting,
                }
            }
        };
        let payload = match Payload::from_stored(task.model_name, task.task_input, task.metadata) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(task_id = %task.task_id, error = %e, "cannot dispatch");
                return Settled::Skipped;
            }
        };
        self.drive(&task.task_id, step, &payload).await;
        match step {
            Step::Dispatch(_) => Settled::Sent,
            Step::Reroute => Settled::Rerouted,
        }
    }

    /// The task's TI if it is usable, and whether any TI of the model is.
    fn usability(&self, ti: Option<TiUuid>, model: &str) -> (Option<TiUuid>, bool) {
        let st = self.state();
        let usable = |id: &TiUuid| st.tis.get(id).is_some_and(|e| e.usable());
        (
            ti.filter(|id| usable(id)),
            st.models
                .get(model)
                .is_some_and(|ids| ids.iter().any(usable)),
        )
    }

    /// Asks the TI what became of a scheduled task; stores the outcome if it is finished.
    async fn ask_ti(&self, task: &UnfinishedTask, ti: TiUuid) -> Asked {
        let target = {
            let st = self.state();
            st.tis.get(&ti).map(|e| (e.ti.host.clone(), e.ti.port))
        };
        let Some((host, port)) = target else {
            return Asked::Unknown;
        };
        let report = match self
            .inner
            .client
            .task_report(&host, port, task.task_id.as_str())
            .await
        {
            Ok(Some(report)) => report,
            Ok(None) => return Asked::Unknown,
            Err(e) => {
                tracing::debug!(task_id = %task.task_id, ti = %ti, error = %e, "reconciliation failed");
                return Asked::Unreachable;
            }
        };
        let error = match report.status {
            TiTaskStatus::Queued | TiTaskStatus::Running => return Asked::Running,
            TiTaskStatus::Completed => None,
            TiTaskStatus::Failed => Some(
                report
                    .error
                    .unwrap_or_else(|| "the TI reported the task failed".into()),
            ),
        };
        let exec = report.execution_time.unwrap_or(0.0);
        match self
            .complete(&task.task_id, ti, exec, report.result, error)
            .await
        {
            Ok(_) => {
                tracing::info!(task_id = %task.task_id, ti = %ti, "result recovered from the TI");
                Asked::Finished
            }
            Err(e) => {
                tracing::error!(task_id = %task.task_id, error = ?e, "storing a recovered result failed");
                Asked::Unreachable
            }
        }
    }

    /// One pass over the unfinished tasks: drives in the background what nobody drives:
    /// queued tasks (after a failed write, or waiting for a usable TI) and scheduled
    /// tasks whose callback is overdue.
    pub async fn sweep(&self) -> Result<SweepReport, Error> {
        let tasks = TaskRepo::unfinished(&self.inner.db.read).await?;
        let overdue_before = unix_now() - self.inner.settings.ti.reconcile_after_ms as f64 / 1000.0;
        let mut report = SweepReport::default();
        for task in tasks {
            if self.is_in_flight(&task.task_id) {
                continue;
            }
            let due = match task.status {
                TaskStatus::Queued => {
                    let (usable_ti, model_usable) = self.usability(task.ti_uuid, &task.model_name);
                    if usable_ti.is_none() && !model_usable {
                        report.waiting += 1;
                    }
                    usable_ti.is_some() || model_usable
                }
                TaskStatus::Scheduled => task.dispatch_time.is_some_and(|t| t < overdue_before),
                TaskStatus::Completed => false,
            };
            if !due {
                continue;
            }
            report.driven += 1;
            let this = self.clone();
            self.inner.tracker.spawn(async move {
                this.settle(task, false).await;
            });
        }
        Ok(report)
    }

    /// Runs [`Scheduler::sweep`] in the background.
    pub(super) fn spawn_sweep(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            if let Err(e) = this.sweep().await {
                tracing::error!(error = ?e, "sweep failed");
            }
        });
    }

    /// Start-up recovery: settles every unfinished task with its TI (finished → stored;
    /// queued or running there → kept; unknown there → sent again; TI unreachable →
    /// re-routed; queued → dispatched) and logs a one-line summary.
    pub async fn recover(&self) -> Result<RecoveryReport, Error> {
        let started = std::time::Instant::now();
        let tasks = TaskRepo::unfinished(&self.inner.db.read).await?;
        let mut report = RecoveryReport {
            unfinished: tasks.len(),
            ..RecoveryReport::default()
        };
        let settled: Vec<Settled> = futures::stream::iter(tasks)
            .map(|task| self.settle(task, true))
            .buffer_unordered(RECOVERY_CONCURRENCY)
            .collect()
            .await;
        for s in settled {
            match s {
                Settled::Stored => report.stored += 1,
                Settled::Kept => report.kept += 1,
                Settled::Sent => report.sent += 1,
                Settled::Rerouted => report.rerouted += 1,
                Settled::Waiting => report.waiting += 1,
                Settled::Unreachable | Settled::Skipped => report.skipped += 1,
            }
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            unfinished = report.unfinished,
            results_recovered = report.stored,
            still_running = report.kept,
            sent_again = report.sent,
            rerouted = report.rerouted,
            waiting_for_a_ti = report.waiting,
            skipped = report.skipped,
            elapsed_ms = report.elapsed_ms,
            "recovery done"
        );
        Ok(report)
    }

    /// Probes every registered TI, and every removed one still holding tasks, once;
    /// re-routes the tasks of TIs that failed too many probes in a row. Returns how many
    /// TIs are healthy.
    pub async fn probe_health(&self) -> usize {
        let targets: Vec<(TiUuid, String, u16)> = {
            let st = self.state();
            st.tis
                .values()
                .filter(|e| e.ti.removed_at.is_none() || !e.queue.is_empty())
                .map(|e| (e.ti.ti_uuid, e.ti.host.clone(), e.ti.port))
                .collect()
        };
        let probes = targets.into_iter().map(|(id, host, port)| {
            let client = self.inner.client.clone();
            async move { (id, client.health(&host, port).await) }
        });
        let results = futures::future::join_all(probes).await;
        let threshold = self.inner.settings.ti.reroute_after_failed_probes.max(1);
        let mut recovered = false;
        let mut dead = Vec::new();
        let mut healthy = 0;
        {
            let mut st = self.state();
            for (id, result) in results {
                let Some(entry) = st.tis.get_mut(&id) else {
                    continue;
                };
                match result {
                    Ok(()) => {
                        healthy += 1;
                        if !entry.healthy {
                            tracing::info!(ti = %id, "TI healthy again");
                            recovered = true;
                        }
                        entry.healthy = true;
                        entry.failed_probes = 0;
                    }
                    Err(e) => {
                        if entry.healthy {
                            tracing::warn!(ti = %id, error = %e, "TI failed its health probe");
                        }
                        entry.healthy = false;
                        entry.failed_probes += 1;
                        if entry.failed_probes == threshold {
                            dead.extend(entry.queue.task_ids().cloned());
                        }
                    }
                }
            }
        }
        for task_id in dead {
            self.spawn_reroute(task_id);
        }
        if recovered {
            self.spawn_sweep();
        }
        healthy
    }

    /// Starts start-up recovery, then the loop of health probes and sweeps, and the loop
    /// that saves what the predictor learns.
    pub fn start_background(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut ticks = tokio::time::interval(LEARNING_FLUSH_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = ticks.tick() => false,
                    _ = this.inner.shutdown.cancelled() => true,
                };
                if let Err(e) = this.flush_learning().await {
                    tracing::warn!(error = ?e, "saving the learned predictor state failed; retried next time");
                }
                if stopping {
                    return;
                }
            }
        });
        let interval = Duration::from_millis(self.inner.settings.ti.health_interval_ms.max(10));
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            if let Err(e) = this.recover().await {
                tracing::error!(error = ?e, "recovery failed; the sweeps will retry");
            }
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = this.inner.shutdown.cancelled() => return,
                }
                this.probe_health().await;
                if let Err(e) = this.sweep().await {
                    tracing::error!(error = ?e, "sweep failed");
                }
            }
        });
    }

    /// Stops the background work and waits (a little) for dispatches under way. Tasks left
    /// `queued` are dispatched again at the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "background work still running at shutdown; it resumes at the next start"
            );
        }
        if let Err(e) = self.flush_learning().await {
            tracing::warn!(error = ?e, "saving the learned predictor state at shutdown failed");
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SweepReport {
    /// Tasks handed to a worker (dispatch, re-route or reconciliation).
    pub driven: usize,
    /// Queued tasks with no usable TI.
    pub waiting: usize,
}

/// What start-up recovery did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RecoveryReport {
    /// Unfinished tasks found in the database.
    pub unfinished: usize,
    /// Finished on their TI while we were down: outcome stored.
    pub stored: usize,
    /// Still queued or running on their TI.
    pub kept: usize,
    /// Sent to their TI (again).
    pub sent: usize,
    /// Moved to another TI.
    pub rerouted: usize,
    /// No usable TI for their model yet.
    pub waiting: usize,
    /// Left for the sweeps (unreadable, or driven by someone else).
    pub skipped: usize,
    /// Time taken, ms.
    pub elapsed_ms: u64,
}

/// What settling one unfinished task did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Stored,
    Kept,
    Sent,
    Rerouted,
    Waiting,
    Unreachable,
    Skipped,
}

/// What a TI said of a task.
enum Asked {
    Finished,
    Running,
    Unknown,
    Unreachable,
}

/// How often the predictor's learned state is saved. It is derived data: a crash loses at
/// most this much learning, and `ti-scheduler retrain` rebuilds it from the history.
const LEARNING_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Reconciliations in flight at once during start-up recovery.
const RECOVERY_CONCURRENCY: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_names_addresses_and_networks() {
        let rules: Vec<HostRule> = ["localhost", "10.1.0.0/16", "::1"]
            .iter()
            .map(|r| HostRule::parse(r).unwrap())
            .collect();
        assert!(host_allowed(&rules, "LOCALHOST"));
        assert!(host_allowed(&rules, "10.1.200.3"));
        assert!(!host_allowed(&rules, "10.2.0.1"));
        assert!(host_allowed(&rules, "::1"));
        assert!(host_allowed(&rules, "[::1]"));
        assert!(!host_allowed(&rules, "127.0.0.2"));
        assert!(
            !host_allowed(&rules, "example.com"),
            "names are not resolved"
        );
        assert!(HostRule::parse("10.0.0.0/33").is_err());
        assert!(HostRule::parse("").is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
