//! Getting a committed task to its TI.
//!
//! After a submit commits, each task is *driven*: dispatched to its TI (bounded
//! concurrency per TI, retries with backoff); on final failure the TI is marked unhealthy
//! and the task re-routed (`reroute.rs`) to another TI of the model, or left `queued` with
//! no TI until one is usable. A task is driven by one worker at a time ([`InFlight`]), so
//! the sweep (`recovery.rs`) leaves alone what is already under way.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::http::Uri;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::cache::DispatchTarget;
use super::complete::Finished;
use super::events::Event;
use super::proxy::Reply;
use super::Scheduler;
use crate::domain::{unix_now, TaskId, TaskStatus, TiKind, TiUuid};
use crate::store::{Flush, TaskRepo};
use crate::telemetry;
use crate::ti::openai::build_request;
use crate::ti::protocol::DispatchRequest;
use crate::ti::{upstream_body, TiClient, TiError};

/// What a dispatcher needs of a task.
#[derive(Debug)]
pub(super) struct Payload {
    pub(super) model: String,
    pub(super) task_input: Box<RawValue>,
    pub(super) metadata_raw: Box<RawValue>,
    pub(super) metadata: Map<String, Value>,
    /// A front-door request's client, waiting for the answer (`proxy.rs`).
    pub(super) reply: Option<Reply>,
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
            reply: None,
        })
    }

    /// The kind of TI the task may go to: a front-door request only to an
    /// OpenAI-compatible one.
    pub(super) fn only_kind(&self) -> Option<TiKind> {
        self.reply.as_ref().map(|_| TiKind::Openai)
    }

    /// Resolves when the task's client is gone (a front-door request whose connection
    /// closed); never for a task whose client reads the stored result.
    pub(super) async fn client_gone(&self) {
        match &self.reply {
            Some(reply) => reply.gone().await,
            None => std::future::pending().await,
        }
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

/// How one exchange with an OpenAI-compatible TI went.
pub(super) enum Exchange {
    /// It answered, and the answer is stored (or the task needs nothing more).
    Done,
    /// It answered 408, 429 or 503 and is paused: decide again.
    Busy,
    /// It failed to answer (refused, timed out, 5xx): try again.
    Failed(String),
}

enum Sent {
    /// The TI accepted it, or it needs nothing more (completed, shutting down).
    Done,
    /// The TI is not usable (removed or unhealthy): choose another.
    Unusable,
    /// The TI is busy (it answered 408, 429 or 503 and is paused): decide again.
    Busy,
    /// Every attempt failed: the TI is unhealthy.
    Failed,
}

/// The tasks being driven (dispatched, re-routed or settled) right now.
#[derive(Debug, Default)]
pub(super) struct InFlight(Mutex<HashSet<TaskId>>);

impl InFlight {
    fn set(&self) -> MutexGuard<'_, HashSet<TaskId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the task; false if someone is driving it already.
    pub(super) fn begin(&self, task_id: &TaskId) -> bool {
        self.set().insert(task_id.clone())
    }

    /// Gives the task up.
    pub(super) fn end(&self, task_id: &TaskId) {
        self.set().remove(task_id);
    }

    /// True if someone is driving the task.
    pub(super) fn contains(&self, task_id: &TaskId) -> bool {
        self.set().contains(task_id)
    }
}

impl Scheduler {
    /// Starts driving a task unless someone already is.
    pub(super) fn spawn_drive(&self, task_id: TaskId, step: Step, payload: Arc<Payload>) {
        if !self.inner.in_flight.begin(&task_id) {
            return;
        }
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            this.drive(&task_id, step, &payload).await;
            this.inner.in_flight.end(&task_id);
        });
    }

    /// Dispatches, re-routes on failure, until the task is with a TI or waits for one.
    pub(super) async fn drive(&self, task_id: &TaskId, mut step: Step, payload: &Payload) {
        loop {
            step = match step {
                Step::Dispatch(ti) => match self.send(task_id, ti, payload).await {
                    Sent::Done => return,
                    Sent::Unusable | Sent::Busy => Step::Reroute,
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

    /// Sends the task to `ti` with retries.
    async fn send(&self, task_id: &TaskId, ti: TiUuid, payload: &Payload) -> Sent {
        let Some(target) = self.cache().dispatch_target(ti) else {
            return Sent::Unusable;
        };
        if target.kind == TiKind::Openai {
            return self.send_openai(task_id, ti, target, payload).await;
        }
        let Some(url) = target.url else {
            tracing::error!(ti = %ti, "the TI's address does not form a URL");
            return Sent::Failed;
        };
        let Ok(permit) = target.slots.acquire_owned().await else {
            return Sent::Unusable;
        };
        let request = DispatchRequest {
            task_id: task_id.as_str(),
            ti_uuid: ti.to_string(),
            model_name: &payload.model,
            task_input: &payload.task_input,
            metadata: &payload.metadata_raw,
            callback_url: &self.inner.settings.callback_url,
            callback_token: &target.callback_token,
        };
        let settings = &self.inner.settings.ti;
        let mut backoff = Duration::from_millis(settings.retry_backoff_ms);
        for attempt in 1..=settings.dispatch_attempts.max(1) {
            match self.inner.client.dispatch(&url, &request).await {
                Ok(()) => {
                    // The slot is for talking to the TI, not for our own bookkeeping.
                    drop(permit);
                    self.note_accepted(task_id, ti, &payload.model).await;
                    return Sent::Done;
                }
                // The TI refused the task itself (4xx): the task fails, the TI stays healthy.
                Err(TiError::Rejected { status, body }) => {
                    drop(permit);
                    metrics::counter!(telemetry::DISPATCH_REJECTIONS).increment(1);
                    tracing::warn!(task_id = %task_id, ti = %ti, ti_address = %format_args!("{}:{}", target.host, target.port), status, "the TI rejected the task; it fails");
                    self.store_outcome(
                        task_id,
                        ti,
                        Finished::rejected(0.0, status, body),
                        Flush::OnCommit,
                    )
                    .await;
                    return Sent::Done;
                }
                Err(e) => {
                    metrics::counter!(telemetry::DISPATCH_FAILURES).increment(1);
                    tracing::warn!(task_id = %task_id, ti = %ti, ti_address = %format_args!("{}:{}", target.host, target.port), attempt, error = %e, "dispatch failed");
                }
            }
            if attempt < settings.dispatch_attempts {
                metrics::counter!(telemetry::DISPATCH_RETRIES).increment(1);
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

    async fn note_accepted(&self, task_id: &TaskId, ti: TiUuid, model: &str) {
        if !self.cache().holds(task_id, ti) {
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
            Ok(true) => {
                self.cache().mark_started(task_id, ti, Instant::now());
                self.inner.events.publish(Event::task(
                    task_id,
                    model,
                    TaskStatus::Scheduled,
                    Some(ti),
                ));
            }
            // Completed already (a fast TI called back first) or re-routed meanwhile.
            Ok(false) => {}
            // The TI has it; the sweep will send it again and the TI dedupes.
            Err(e) => {
                tracing::error!(task_id = %task_id, error = ?e, "storing the dispatch failed")
            }
        }
    }

    /// Sends the task to an OpenAI-compatible TI once one of its slots is free (waiting
    /// tasks take the slots in FIFO order), and stores its answer: a 2xx completes it, a
    /// 4xx other than 408 and 429 fails it, 408/429/503 pause the TI and the task is
    /// decided again; other answers, refused connections and timeouts are retried with
    /// backoff, then the TI is unhealthy and the task moves. A front-door request's
    /// answer also goes to its client (`proxy.rs`); if the client leaves first, the drive
    /// stops.
    async fn send_openai(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        target: DispatchTarget,
        payload: &Payload,
    ) -> Sent {
        let request = match &payload.reply {
            Some(reply) => Ok(reply.request(&payload.task_input)),
            None => build_request(&payload.task_input, &payload.metadata, &target.model),
        };
        let request = request.and_then(|(path, body)| {
            let root = target
                .url
                .as_ref()
                .ok_or_else(|| "the TI's address does not form a URL".to_string())?;
            Ok((TiClient::openai_url(root, &path)?, body))
        });
        let (url, body) = match request {
            Ok(request) => request,
            // Submit checked the body and path: only a TI whose host forms no URL gets here.
            Err(e) => {
                tracing::error!(task_id = %task_id, ti = %ti, error = %e, "cannot build the request");
                return Sent::Failed;
            }
        };
        let settings = &self.inner.settings.ti;
        let mut backoff = Duration::from_millis(settings.retry_backoff_ms);
        for attempt in 1..=settings.dispatch_attempts.max(1) {
            let paused = self.cache().paused_until(ti);
            if let Some(until) = paused {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = self.inner.shutdown.cancelled() => return Sent::Done,
                    _ = payload.client_gone() => return Sent::Done,
                }
            }
            let permit = tokio::select! {
                permit = target.slots.clone().acquire_owned() => permit,
                _ = self.inner.shutdown.cancelled() => return Sent::Done,
                _ = payload.client_gone() => return Sent::Done,
            };
            // A closed semaphore: the TI was removed or went unhealthy while we waited.
            let Ok(permit) = permit else {
                return Sent::Unusable;
            };
            {
                let mut cache = self.cache();
                if !cache.holds(task_id, ti) {
                    // Completed or moved while it waited.
                    return Sent::Done;
                }
                if cache.paused_until(ti).is_some() {
                    // Another request found it busy while this one waited: decide again.
                    return Sent::Busy;
                }
                cache.mark_started(task_id, ti, Instant::now());
            }
            // The slot frees once the answer is stored: until then the task still counts
            // as running there, and the next one waits for it, as the estimate assumes.
            let exchanged = match &payload.reply {
                None => self.exchange(task_id, ti, &url, body.clone()).await,
                Some(reply) => self.relay(task_id, ti, &url, body.clone(), reply).await,
            };
            let failure = match exchanged {
                Exchange::Done => {
                    drop(permit);
                    return Sent::Done;
                }
                Exchange::Busy => return Sent::Busy,
                Exchange::Failed(failure) => failure,
            };
            drop(permit);
            metrics::counter!(telemetry::DISPATCH_FAILURES).increment(1);
            tracing::warn!(task_id = %task_id, ti = %ti, ti_address = %format_args!("{}:{}", target.host, target.port),
                attempt, error = %failure, "request failed");
            if attempt < settings.dispatch_attempts {
                metrics::counter!(telemetry::DISPATCH_RETRIES).increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.inner.shutdown.cancelled() => return Sent::Done,
                    _ = payload.client_gone() => return Sent::Done,
                }
                backoff *= 2;
            }
        }
        Sent::Failed
    }

    /// One request to an OpenAI-compatible TI for a task whose client reads the stored
    /// result: the whole answer is read and stored.
    async fn exchange(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        url: &Uri,
        body: axum::body::Bytes,
    ) -> Exchange {
        let started = Instant::now();
        let answer = tokio::select! {
            answer = self.inner.client.openai_send(url, body) => answer,
            // Left unfinished: the next start sends it again.
            _ = self.inner.shutdown.cancelled() => return Exchange::Done,
        };
        let execution_ms = started.elapsed().as_secs_f64() * 1000.0;
        match answer {
            Ok(r) if (200..300).contains(&r.status) => {
                self.cache().answered(ti);
                let finished = Finished::answered(execution_ms, r.status, &r.body);
                self.store_outcome(task_id, ti, finished, Flush::OnCommit)
                    .await;
                Exchange::Done
            }
            Ok(r) if matches!(r.status, 408 | 429 | 503) => {
                self.note_busy(task_id, ti, r.status, r.retry_after);
                Exchange::Busy
            }
            Ok(r) if (400..500).contains(&r.status) => {
                metrics::counter!(telemetry::DISPATCH_REJECTIONS).increment(1);
                let finished = Finished::rejected(execution_ms, r.status, upstream_body(&r.body));
                self.store_outcome(task_id, ti, finished, Flush::OnCommit)
                    .await;
                Exchange::Done
            }
            Ok(r) => Exchange::Failed(format!("HTTP {}", r.status)),
            Err(e) => Exchange::Failed(e.to_string()),
        }
    }

    /// The TI answered "busy": it is paused for its `Retry-After` and the task is decided
    /// again.
    pub(super) fn note_busy(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        status: u16,
        retry_after: Option<Duration>,
    ) {
        metrics::counter!(telemetry::TI_BUSY).increment(1);
        tracing::info!(task_id = %task_id, ti = %ti, status,
            retry_after_s = retry_after.map(|d| d.as_secs_f64()), "TI busy; task decided again");
        self.cache().pause(ti, retry_after, Instant::now());
    }

    /// Stores an outcome, flushed to disk as `flush` says; a failed write leaves the task
    /// unfinished for the sweep, which sends it again.
    pub(super) async fn store_outcome(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        finished: Finished,
        flush: Flush,
    ) {
        if let Err(e) = self.finish(task_id, Some(ti), finished, flush).await {
            tracing::error!(task_id = %task_id, error = ?e, "storing the answer failed; the sweep sends it again");
        }
    }
}
