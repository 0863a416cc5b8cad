//! The OpenAI front door's side of the core (docs/API.md, The OpenAI front door). A request on
//! `/v1/chat/completions` or `/v1/completions` becomes a task like any other: placed over
//! the model's OpenAI-compatible TIs, committed with its decision before it is sent, queued
//! for a slot of its TI (`dispatch.rs`). But its client waits on the connection: the TI's
//! answer is relayed to it as it arrives (streamed when asked), then stored. A failure
//! before the client got a byte is retried, on another TI if need be; after it, none. A
//! client that leaves cancels the request, and a restart fails what was left unanswered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::Uri;
use futures::Stream;
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};

use super::admission::Ask;
use super::cache::Placing;
use super::complete::Finished;
use super::dispatch::{Exchange, Payload, Step};
use super::events::Event;
use super::submit::refused;
use super::{Error, Scheduler};
use crate::domain::{unix_now, DecisionReason, Origin, TaskId, TaskStatus, TiKind, TiUuid};
use crate::store::{Flush, NewTask};
use crate::telemetry;
use crate::ti::openai::{Chunks, StreamAssembly, Upstream};
use crate::ti::{upstream_body, TiError};

/// The stored error of a request whose client left before its answer was complete.
pub const CLIENT_GONE: &str = "client disconnected";
/// The stored error of a request found unanswered after a restart.
pub const RESTARTED: &str = "scheduler restarted";
/// Why a request is given up when the service stops serving: the client's answer, and
/// the stored error of a stream cut then.
pub const SHUTTING_DOWN: &str = "the scheduler is shutting down";

/// A front-door request, checked by the handler.
#[derive(Debug)]
pub struct ProxyRequest {
    /// The body's `model`: the model whose TIs may answer.
    pub model: String,
    /// Where it goes on the TI: `v1/chat/completions` or `v1/completions`.
    pub path: &'static str,
    /// The client's body (a JSON object), stored and sent as it is.
    pub task_input: Box<RawValue>,
    /// The task's metadata: the path and the predictor's features of the body
    /// ([`crate::ti::openai::RequestFields::add_features`]).
    pub metadata: Map<String, Value>,
    /// The body's `stream`.
    pub stream: bool,
}

/// What the client of a front-door request is answered.
#[derive(Debug)]
pub enum Answer {
    /// A TI's whole answer: its status, content type and body, unchanged.
    Full {
        /// The TI's status.
        status: u16,
        /// The TI's `Content-Type`.
        content_type: Option<String>,
        /// The TI's body.
        body: Bytes,
        /// How long the TI took, from sending the request to its last byte.
        upstream: Duration,
    },
    /// A TI's streamed answer: its status and content type, then its bytes as they
    /// arrive; an error item means the TI's stream broke or the service stopped (the
    /// client's connection is then cut, so that it cannot take a truncated answer for a
    /// whole one).
    Stream {
        /// The TI's status (a 2xx).
        status: u16,
        /// The TI's `Content-Type` (`text/event-stream`).
        content_type: Option<String>,
        /// The bytes, as they arrive.
        chunks: Relayed,
    },
    /// The scheduler's own failure: no usable TI, every attempt failed, shutting down.
    Failed {
        /// 503.
        status: u16,
        /// What went wrong.
        message: String,
    },
}

/// A front-door request, committed: its task and where its answer will come.
#[derive(Debug)]
pub struct Proxied {
    /// Its task.
    pub task_id: TaskId,
    /// Its answer, once a TI gave one (or the scheduler gave up).
    pub answer: oneshot::Receiver<Answer>,
    /// Keep it while the client is connected (for a stream, until its last byte is
    /// written): dropping it cancels the request.
    pub connected: DropGuard,
}

/// The client's end of a front-door request, as the dispatcher holds it.
#[derive(Debug)]
pub(super) struct Reply {
    /// Taken by whoever answers first.
    answer: Mutex<Option<oneshot::Sender<Answer>>>,
    /// Cancelled when the client's connection is gone.
    gone: CancellationToken,
    /// Cancelled when the service stops serving: the request is given up, and the next
    /// start completes it as failed.
    stopping: CancellationToken,
    /// The client asked for a stream.
    stream: bool,
    /// Where it goes on the TI: `v1/chat/completions` or `v1/completions`.
    path: &'static str,
    /// When the request arrived.
    arrived: Instant,
}

impl Reply {
    /// Resolves once the client is gone or the service stops serving.
    pub(super) async fn gone(&self) {
        tokio::select! {
            _ = self.gone.cancelled() => {}
            _ = self.stopping.cancelled() => {}
        }
    }

    /// What goes to the TI: the path, and the body as the client sent it. The handler
    /// checked it (a JSON object whose `model` is a string) and it is stored, byte for
    /// byte, as the task's `task_input`: what [`crate::ti::openai::build_request`] would
    /// make of it is the same text, parsed and written again.
    pub(super) fn request(&self, task_input: &RawValue) -> (String, Bytes) {
        (
            self.path.to_string(),
            Bytes::copy_from_slice(task_input.get().as_bytes()),
        )
    }

    fn take(&self) -> Option<oneshot::Sender<Answer>> {
        self.answer.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Scheduler {
    /// Takes a front-door request: places it over the model's OpenAI-compatible TIs,
    /// commits its task and decision, and starts driving it. The answer comes through
    /// [`Proxied::answer`].
    pub async fn proxy(&self, request: ProxyRequest) -> Result<Proxied, Error> {
        let ProxyRequest {
            model,
            path,
            task_input,
            metadata,
            stream,
        } = request;
        let arrived = Instant::now();
        let task_id = TaskId::generate();
        // Written straight into raw JSON: the text is ours, so it is not parsed again.
        let metadata_raw =
            to_raw_value(&metadata).map_err(|e| Error::Invalid(format!("metadata: {e}")))?;
        let submit_time = unix_now();
        let ask = Ask {
            limits: self.inner.settings.admission,
            ..Ask::default()
        };
        let placed = {
            let mut cache = self.cache();
            if self.is_draining() {
                return Err(Error::Draining);
            }
            if !cache.serves_openai(&model) {
                return Err(Error::NotFound(format!(
                    "The model '{model}' does not exist: no OpenAI-compatible TI serves it"
                )));
            }
            let task = Placing {
                task_id: &task_id,
                model: &model,
                only: Some(TiKind::Openai),
                metadata: &metadata,
                reason: DecisionReason::Submit,
                now: arrived,
                decided_at: submit_time,
            };
            cache.admit(&task, &ask)
        };
        let placement = placed.map_err(refused)?;
        let Some(ti) = placement.ti() else {
            return Err(Error::NoInstance(format!(
                "no usable TaskInstance for model '{model}'"
            )));
        };
        // Claimed before the commit, so that the sweep never drives it without its client.
        self.inner.in_flight.begin(&task_id);
        let row = NewTask {
            task_id: task_id.clone(),
            model_name: model.clone(),
            task_input: task_input.get().to_string(),
            metadata: metadata_raw.get().to_string(),
            ti_uuid: Some(ti),
            status: placement.status,
            predicted_ms: placement.predicted_ms,
            predicted_error_ms: placement.predicted_error_ms,
            submit_time,
            origin: Origin::Openai,
        };
        if let Err(e) = self.commit(vec![(row, placement.decision)]).await {
            self.cache().release(&task_id);
            self.inner.in_flight.end(&task_id);
            return Err(e.into());
        }
        metrics::counter!(telemetry::SUBMITS).increment(1);
        self.inner.events.publish(Event::task(
            &task_id,
            &model,
            TaskStatus::Scheduled,
            Some(ti),
        ));

        let (answer, answered) = oneshot::channel();
        let gone = CancellationToken::new();
        let payload = Payload {
            model,
            task_input,
            metadata_raw,
            metadata,
            reply: Some(Reply {
                answer: Mutex::new(Some(answer)),
                gone: gone.clone(),
                stopping: self.inner.stop_waiting.clone(),
                stream,
                path,
                arrived,
            }),
        };
        let this = self.clone();
        let id = task_id.clone();
        // Boxed: the drive's state is 3.7 KiB, which spawning would otherwise copy three
        // times (into the task, into its cell, and over it with the output).
        self.inner.tracker.spawn(Box::pin(async move {
            this.drive(&id, Step::Dispatch(ti), &payload).await;
            this.answer_unanswered(&id, &payload).await;
            this.inner.in_flight.end(&id);
        }));
        Ok(Proxied {
            task_id,
            answer: answered,
            connected: gone.drop_guard(),
        })
    }

    /// After the drive: a client that got no answer gets the scheduler's own, and the
    /// task is completed as failed (unless the service is stopping: the next start does
    /// it, as after a crash).
    async fn answer_unanswered(&self, task_id: &TaskId, payload: &Payload) {
        let Some(reply) = &payload.reply else { return };
        let Some(answer) = reply.take() else { return };
        let stopping = reply.stopping.is_cancelled() || self.inner.shutdown.is_cancelled();
        let message = if reply.gone.is_cancelled() {
            CLIENT_GONE.to_string()
        } else if stopping {
            SHUTTING_DOWN.to_string()
        } else {
            format!(
                "no TaskInstance of model '{}' could answer the request",
                payload.model
            )
        };
        if !stopping {
            let finished = Finished::abandoned(0.0, &message, None);
            if let Err(e) = self.finish(task_id, None, finished, Flush::Deferred).await {
                tracing::error!(task_id = %task_id, error = ?e, "storing the failure failed");
            }
        }
        tracing::warn!(task_id = %task_id, model = %payload.model, reason = %message, "front-door request failed");
        let _ = answer.send(Answer::Failed {
            status: 503,
            message,
        });
    }

    /// One request to an OpenAI-compatible TI for a front-door request: the answer goes
    /// to the client (streamed when it asked and the TI streams), then is stored. Until
    /// the client has a byte, a failure is retried like any other.
    pub(super) async fn relay(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        url: &Uri,
        body: Bytes,
        reply: &Reply,
    ) -> Exchange {
        let started = Instant::now();
        let response = tokio::select! {
            response = self.inner.client.openai_start(url, body) => response,
            _ = self.inner.shutdown.cancelled() => return Exchange::Done,
            _ = reply.gone() => return Exchange::Done,
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => return Exchange::Failed(e.to_string()),
        };
        let status = response.status;
        if matches!(status, 408 | 429 | 503) {
            self.note_busy(task_id, ti, status, response.retry_after());
            return Exchange::Busy;
        }
        if !(200..500).contains(&status) {
            return Exchange::Failed(format!("HTTP {status}"));
        }
        let content_type = response.content_type().map(str::to_string);
        let streams = reply.stream
            && (200..300).contains(&status)
            && content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream"));
        if streams {
            return self
                .relay_stream(task_id, ti, response, content_type, reply, started)
                .await;
        }
        let body = tokio::select! {
            body = response.body() => body,
            _ = self.inner.shutdown.cancelled() => return Exchange::Done,
            _ = reply.gone() => return Exchange::Done,
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => return Exchange::Failed(e.to_string()),
        };
        let upstream = started.elapsed();
        let Some(answer) = reply.take() else {
            return Exchange::Done;
        };
        let _ = answer.send(Answer::Full {
            status,
            content_type,
            body: body.clone(),
            upstream,
        });
        let execution_ms = upstream.as_secs_f64() * 1000.0;
        let finished = if (200..300).contains(&status) {
            self.cache().answered(ti);
            Finished::answered(execution_ms, status, &body)
        } else {
            metrics::counter!(telemetry::DISPATCH_REJECTIONS).increment(1);
            Finished::rejected(execution_ms, status, upstream_body(&body))
        };
        self.store_answered(task_id, ti, finished).await;
        Exchange::Done
    }

    /// Stores the outcome of a front-door request once its client has the answer (or has
    /// left). Nobody waits for this commit, so it does not wait for `fsync`
    /// ([`Flush::Deferred`]): the next synced commit, or the checkpoint thread within
    /// about 20 ms, takes it to disk, and the client's next request, arriving meanwhile,
    /// does not wait behind that sync. A crash of the process loses nothing; a crash of
    /// the machine before the sync leaves the task unfinished, and the restart records it
    /// as failed, as for a crash between the answer and its commit.
    async fn store_answered(&self, task_id: &TaskId, ti: TiUuid, finished: Finished) {
        self.store_outcome(task_id, ti, finished, Flush::Deferred)
            .await;
    }

    /// Hands a TI's stream to the client, which reads it chunk by chunk as it arrives
    /// ([`Relayed`]), then stores it once it ended: put together when whole, failed if the
    /// client left, the stream broke or the service stopped.
    async fn relay_stream(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        response: Upstream,
        content_type: Option<String>,
        reply: &Reply,
        started: Instant,
    ) -> Exchange {
        let Some(answer) = reply.take() else {
            return Exchange::Done;
        };
        self.cache().answered(ti);
        let (ended, end) = oneshot::channel();
        let status = response.status;
        let chunks = Relayed {
            body: response.chunks(),
            stopping: Box::pin(reply.stopping.clone().cancelled_owned()),
            arrived: reply.arrived,
            assembly: StreamAssembly::default(),
            ttft_ms: None,
            ended: Some(ended),
            _open: StreamOpen::new(),
        };
        // Refused, the stream is dropped unread: it ends as the client's leaving.
        let _ = answer.send(Answer::Stream {
            status,
            content_type,
            chunks,
        });
        let Ended {
            how,
            assembly,
            ttft_ms,
        } = end.await.unwrap_or_default();
        let execution_ms = started.elapsed().as_secs_f64() * 1000.0;
        let failure = match how {
            How::Whole => None,
            How::Left => Some(CLIENT_GONE.to_string()),
            How::Broke(e) => Some(format!("the TI's stream broke: {e}")),
            How::Stopping => Some(SHUTTING_DOWN.to_string()),
        };
        let finished = match failure {
            None => Finished::streamed(execution_ms, assembly.result(), ttft_ms),
            Some(reason) => {
                tracing::warn!(task_id = %task_id, ti = %ti, reason = %reason, "stream ended early; the task fails");
                Finished::abandoned(execution_ms, &reason, ttft_ms)
            }
        };
        self.store_answered(task_id, ti, finished).await;
        Exchange::Done
    }
}

/// A TI's stream on its way to a front-door client. The client's connection reads it
/// itself, so that each chunk is written the moment it arrives, with no task or channel
/// in between; it puts the text together as the chunks pass, and tells the drive how the
/// stream ended (whole, broken, cut by the service stopping, or left by the client when
/// it is dropped unfinished). Dropping it drops the TI's response, which cancels the
/// request upstream.
pub struct Relayed {
    body: Chunks,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When the request arrived, for the time to first token.
    arrived: Instant,
    assembly: StreamAssembly,
    ttft_ms: Option<f64>,
    /// Taken when the stream ends.
    ended: Option<oneshot::Sender<Ended>>,
    _open: StreamOpen,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed")
            .field("ended", &self.ended.is_none())
            .finish_non_exhaustive()
    }
}

/// How a relayed stream ended, and what it carried.
#[derive(Default)]
struct Ended {
    how: How,
    assembly: StreamAssembly,
    ttft_ms: Option<f64>,
}

#[derive(Default)]
enum How {
    /// Read to its end.
    Whole,
    /// The TI's stream broke.
    Broke(TiError),
    /// The service stopped serving.
    Stopping,
    /// Dropped unfinished: the client left.
    #[default]
    Left,
}

impl Relayed {
    /// Says how the stream ended, once; `None` to end the client's stream.
    fn end(&mut self, how: How) -> Option<Result<Bytes, std::io::Error>> {
        let ended = self.ended.take()?;
        let cut = match &how {
            How::Whole | How::Left => None,
            How::Broke(e) => Some(format!("the TI's stream broke: {e}")),
            How::Stopping => Some(SHUTTING_DOWN.to_string()),
        };
        let _ = ended.send(Ended {
            how,
            assembly: std::mem::take(&mut self.assembly),
            ttft_ms: self.ttft_ms,
        });
        // An error cuts the client's connection, so that it cannot take a truncated answer
        // for a whole one.
        cut.map(|c| Err(std::io::Error::other(c)))
    }
}

impl Stream for Relayed {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended.is_none() {
            return Poll::Ready(None);
        }
        if this.stopping.as_mut().poll(cx).is_ready() {
            return Poll::Ready(this.end(How::Stopping));
        }
        match ready!(Pin::new(&mut this.body).poll_next(cx)) {
            Some(Ok(bytes)) => {
                if this.assembly.feed(&bytes) {
                    let ttft = this.arrived.elapsed();
                    this.ttft_ms = Some(ttft.as_secs_f64() * 1000.0);
                    metrics::histogram!(telemetry::OPENAI_TTFT).record(ttft.as_secs_f64());
                }
                Poll::Ready(Some(Ok(bytes)))
            }
            Some(Err(e)) => Poll::Ready(this.end(How::Broke(e))),
            None => Poll::Ready(this.end(How::Whole)),
        }
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.end(How::Left);
    }
}

/// Counts a stream in `ti_scheduler_openai_streams_open` while it lives.
struct StreamOpen;

impl StreamOpen {
    fn new() -> Self {
        metrics::gauge!(telemetry::OPENAI_STREAMS_OPEN).increment(1.0);
        Self
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::OPENAI_STREAMS_OPEN).decrement(1.0);
    }
}
