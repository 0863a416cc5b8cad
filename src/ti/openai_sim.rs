//! The simulated OpenAI-compatible server (`ti-scheduler sim-ti --protocol openai`): what
//! vLLM, SGLang or llama.cpp's server look like from the scheduler, over real HTTP.
//!
//! It serves `GET /health`, `GET /v1/models`, `POST /v1/completions` and
//! `POST /v1/chat/completions` for one model. At most `concurrency` requests run at once
//! (the rest wait, in order, as in a real server's queue). A request's completion length
//! is drawn per request, at most its `max_tokens` (or `max_completion_tokens`; 16 when
//! absent, as OpenAI's API): a share of it drawn uniformly from
//! `[min_completion_share, 1]`. It takes `base_ms + per_input_token_ms · prompt_tokens +
//! per_output_token_ms · completion_tokens`, times a mean-one lognormal noise; the prompt
//! tokens are counted as the scheduler estimates them (characters / 4). The answer has the
//! OpenAI shape with `usage`; `stream: true` answers Server-Sent Events, one chunk per
//! token after the prompt's time, then `data: [DONE]`. A body that is not a request for
//! its model is a 400 (404 for an unknown model), as real servers answer.
//!
//! Fault switches (`POST /admin/faults`): `fail_health` (500 on `/health`), `rate_limited`
//! (429 with `Retry-After`), `unavailable` (503 with `Retry-After`), `server_error` (500),
//! `hang_ms` (answer only after that long), `slowdown`. `GET /admin/stats` counts what
//! it saw, and the most requests it ever ran at once. A crash is [`OpenAiSim::stop`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::openai::{text_chars, CHARS_PER_TOKEN};
use super::sim::noise_law;

/// How the simulated OpenAI-compatible server behaves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OpenAiSimConfig {
    /// The model id it serves (`GET /v1/models`).
    pub model: String,
    /// Requests it runs at once.
    pub concurrency: usize,
    /// Fixed part of a request's time, ms.
    pub base_ms: f64,
    /// ms per prompt token.
    pub per_input_token_ms: f64,
    /// ms per completion token.
    pub per_output_token_ms: f64,
    /// Smallest share of `max_tokens` a completion takes (the share is uniform in
    /// `[min_completion_share, 1]`); 1 makes every completion `max_tokens` long.
    pub min_completion_share: f64,
    /// σ of the lognormal noise multiplying each request's time (0 = exact).
    pub noise: f64,
    /// Seed of the completion lengths and the noise.
    pub seed: u64,
    /// Fault switches at start.
    pub faults: OpenAiFaults,
}

impl Default for OpenAiSimConfig {
    fn default() -> Self {
        Self {
            model: "llama-7b".into(),
            concurrency: 8,
            base_ms: 20.0,
            per_input_token_ms: 0.0,
            per_output_token_ms: 0.0,
            min_completion_share: 0.25,
            noise: 0.0,
            seed: 1,
            faults: OpenAiFaults::default(),
        }
    }
}

/// Switches that make the simulated server misbehave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OpenAiFaults {
    /// `GET /health` answers 500.
    pub fail_health: bool,
    /// Requests answer 429 with `Retry-After: retry_after_s`.
    pub rate_limited: bool,
    /// Requests answer 503 with `Retry-After: retry_after_s`.
    pub unavailable: bool,
    /// `Retry-After` of the two above, seconds.
    pub retry_after_s: f64,
    /// Requests answer 500.
    pub server_error: bool,
    /// Requests are answered only after this long, ms (a hanging server).
    pub hang_ms: u64,
    /// Request times are multiplied by this.
    pub slowdown: f64,
}

impl Default for OpenAiFaults {
    fn default() -> Self {
        Self {
            fail_health: false,
            rate_limited: false,
            unavailable: false,
            retry_after_s: 1.0,
            server_error: false,
            hang_ms: 0,
            slowdown: 1.0,
        }
    }
}

/// What the simulated server has seen, from `GET /admin/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OpenAiSimStats {
    /// Requests received on the completion routes.
    pub requests: u64,
    /// Requests answered 2xx.
    pub completed: u64,
    /// Requests answered 4xx for their body.
    pub rejected: u64,
    /// Requests answered by a fault switch.
    pub faulted: u64,
    /// Requests running now.
    pub running: u64,
    /// The most requests it ever ran at once.
    pub max_running: u64,
}

struct Sim {
    config: OpenAiSimConfig,
    faults: Mutex<OpenAiFaults>,
    stats: Mutex<OpenAiSimStats>,
    rng: Mutex<StdRng>,
    slots: Arc<Semaphore>,
    ids: AtomicU64,
}

/// A running simulated OpenAI-compatible server.
pub struct OpenAiSim {
    addr: SocketAddr,
    sim: Arc<Sim>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OpenAiSim {
    /// Starts one listening on `bind` (port 0 for an ephemeral one).
    pub async fn spawn(config: OpenAiSimConfig, bind: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let sim = Arc::new(Sim {
            faults: Mutex::new(config.faults.clone()),
            stats: Mutex::new(OpenAiSimStats::default()),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            ids: AtomicU64::new(1),
            config,
        });
        let app = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/admin/faults", post(set_faults))
            .route("/admin/stats", get(stats))
            .with_state(sim.clone());
        let server = tokio::spawn(serve_until_stopped(listener, app, stop.clone()));
        Ok(Self {
            addr,
            sim,
            stop,
            server,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault switches.
    pub fn set_faults(&self, faults: OpenAiFaults) {
        *lock(&self.sim.faults) = faults;
    }

    /// What it has seen so far.
    pub fn stats(&self) -> OpenAiSimStats {
        lock(&self.sim.stats).clone()
    }

    /// Stops it as a crash would look from outside: the port closes and requests under
    /// way are cut off.
    pub async fn stop(self) {
        self.stop.cancel();
        self.server.abort();
        let _ = self.server.await;
    }

    /// Runs until the server stops (for the `sim-ti` command).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Which of the two completion routes a request came to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    Completions,
    Chat,
}

/// A request the simulated server will run.
struct Planned {
    route: Route,
    stream: bool,
    include_usage: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Time until the first token, ms.
    prefill_ms: f64,
    /// Time per completion token, ms.
    per_token_ms: f64,
}

impl Sim {
    /// Checks the body as a real server would and draws the completion's length and time.
    fn plan(&self, route: Route, body: &Bytes) -> Result<Planned, (StatusCode, String)> {
        let bad = |status: StatusCode, message: String| (status, message);
        let body: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
            bad(
                StatusCode::BAD_REQUEST,
                format!("the body is not a JSON object: {e}"),
            )
        })?;
        match body.get("model").and_then(Value::as_str) {
            Some(m) if m == self.config.model => {}
            Some(m) => {
                return Err(bad(
                    StatusCode::NOT_FOUND,
                    format!("The model `{m}` does not exist."),
                ))
            }
            None => return Err(bad(StatusCode::BAD_REQUEST, "model is required".into())),
        }
        let text_chars = match route {
            Route::Completions => match body.get("prompt") {
                Some(p @ (Value::String(_) | Value::Array(_))) => text_chars(p),
                _ => {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        "prompt is required (a string or a list)".into(),
                    ))
                }
            },
            Route::Chat => match body.get("messages").and_then(Value::as_array) {
                Some(messages) if !messages.is_empty() => messages
                    .iter()
                    .map(|m| text_chars(m.get("content").unwrap_or(&Value::Null)))
                    .sum(),
                _ => {
                    return Err(bad(
                        StatusCode::BAD_REQUEST,
                        "messages is required (a non-empty list)".into(),
                    ))
                }
            },
        };
        let max_tokens = ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|n| body.get(*n).and_then(Value::as_u64))
            .unwrap_or(16)
            .max(1);
        let (share, noise) = {
            let mut rng = lock(&self.rng);
            let low = self.config.min_completion_share.clamp(0.0, 1.0);
            let share = if low >= 1.0 {
                1.0
            } else {
                rng.random_range(low..=1.0)
            };
            let noise = noise_law(self.config.noise).map_or(1.0, |d| d.sample(&mut *rng));
            (share, noise)
        };
        let completion_tokens = ((max_tokens as f64 * share).ceil() as u64).clamp(1, max_tokens);
        let prompt_tokens = (text_chars as f64 / CHARS_PER_TOKEN).ceil() as u64;
        let scale = noise * lock(&self.faults).slowdown.max(0.0);
        let c = &self.config;
        Ok(Planned {
            route,
            stream: body.get("stream").and_then(Value::as_bool) == Some(true),
            include_usage: body
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true),
            prompt_tokens,
            completion_tokens,
            prefill_ms: (c.base_ms + c.per_input_token_ms * prompt_tokens as f64) * scale,
            per_token_ms: c.per_output_token_ms * scale,
        })
    }

    /// The answer a fault switch gives instead of running the request, if one is on.
    fn fault(&self) -> Option<Response> {
        let f = lock(&self.faults).clone();
        let retry_after = || format!("{}", f.retry_after_s.max(0.0));
        let error = |status: StatusCode, message: &str| {
            Json(
                json!({"error": {"message": message, "type": "ServerError", "code": status.as_u16()}}),
            )
        };
        if f.rate_limited {
            let status = StatusCode::TOO_MANY_REQUESTS;
            return Some(
                (
                    status,
                    [(header::RETRY_AFTER, retry_after())],
                    error(status, "rate limited (fault switch)"),
                )
                    .into_response(),
            );
        }
        if f.unavailable {
            let status = StatusCode::SERVICE_UNAVAILABLE;
            return Some(
                (
                    status,
                    [(header::RETRY_AFTER, retry_after())],
                    error(status, "overloaded (fault switch)"),
                )
                    .into_response(),
            );
        }
        if f.server_error {
            let status = StatusCode::INTERNAL_SERVER_ERROR;
            return Some((status, error(status, "internal error (fault switch)")).into_response());
        }
        None
    }

    fn response_id(&self) -> String {
        format!("cmpl-sim-{}", self.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// The text of `n` completion tokens.
    fn text(n: u64) -> String {
        " tok".repeat(n as usize)
    }

    fn usage(p: &Planned) -> Value {
        json!({
            "prompt_tokens": p.prompt_tokens,
            "completion_tokens": p.completion_tokens,
            "total_tokens": p.prompt_tokens + p.completion_tokens,
        })
    }

    /// The whole (non-streamed) answer.
    fn answer(&self, p: &Planned) -> Value {
        let created = unix_seconds();
        let finish = "length";
        let text = Self::text(p.completion_tokens);
        match p.route {
            Route::Completions => json!({
                "id": self.response_id(), "object": "text_completion", "created": created,
                "model": self.config.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
                "usage": Self::usage(p),
            }),
            Route::Chat => json!({
                "id": self.response_id(), "object": "chat.completion", "created": created,
                "model": self.config.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": Self::usage(p),
            }),
        }
    }

    /// One streamed chunk carrying `text` (or the final one, with `finish_reason`).
    fn chunk(&self, id: &str, p: &Planned, text: Option<&str>) -> Value {
        let finish = if text.is_none() {
            Value::from("length")
        } else {
            Value::Null
        };
        let created = unix_seconds();
        match p.route {
            Route::Completions => json!({
                "id": id, "object": "text_completion", "created": created, "model": self.config.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null}],
            }),
            Route::Chat => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({
                    "id": id, "object": "chat.completion.chunk", "created": created,
                    "model": self.config.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                })
            }
        }
    }

    fn count(&self, f: impl FnOnce(&mut OpenAiSimStats)) {
        f(&mut lock(&self.stats));
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn sleep_ms(ms: f64) {
    if ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
    }
}

/// Holds one of the `concurrency` slots and counts it as running.
struct Running {
    sim: Arc<Sim>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sim.count(|s| s.running -= 1);
    }
}

async fn run(sim: Arc<Sim>, route: Route, body: Bytes) -> Response {
    sim.count(|s| s.requests += 1);
    let hang = lock(&sim.faults).hang_ms;
    if hang > 0 {
        tokio::time::sleep(Duration::from_millis(hang)).await;
    }
    if let Some(answer) = sim.fault() {
        sim.count(|s| s.faulted += 1);
        return answer;
    }
    let planned = match sim.plan(route, &body) {
        Ok(p) => p,
        Err((status, message)) => {
            sim.count(|s| s.rejected += 1);
            let kind = if status == StatusCode::NOT_FOUND {
                "NotFoundError"
            } else {
                "BadRequestError"
            };
            let error =
                json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
            return (status, Json(error)).into_response();
        }
    };
    let permit = match Arc::clone(&sim).acquire_slot().await {
        Some(running) => running,
        None => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    if planned.stream {
        return stream(sim, planned, permit);
    }
    sleep_ms(planned.prefill_ms + planned.per_token_ms * planned.completion_tokens as f64).await;
    let answer = sim.answer(&planned);
    drop(permit);
    sim.count(|s| s.completed += 1);
    Json(answer).into_response()
}

impl Sim {
    /// Waits for a free slot (in arrival order).
    async fn acquire_slot(self: Arc<Self>) -> Option<Running> {
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        self.count(|s| {
            s.running += 1;
            s.max_running = s.max_running.max(s.running);
        });
        Some(Running {
            sim: self,
            _permit: permit,
        })
    }
}

fn stream(sim: Arc<Sim>, planned: Planned, running: Running) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let _running = running;
        let id = sim.response_id();
        let started = Instant::now();
        sleep_ms(planned.prefill_ms).await;
        let send = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        for i in 0..planned.completion_tokens {
            let due = planned.prefill_ms + planned.per_token_ms * i as f64;
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            sleep_ms(due - elapsed).await;
            let chunk = sim.chunk(&id, &planned, Some(" tok"));
            if tx.send(Ok(send(&chunk))).await.is_err() {
                // The client went away: stop generating, as a real server does.
                return;
            }
        }
        let mut last = sim.chunk(&id, &planned, None);
        if planned.include_usage {
            last["usage"] = Sim::usage(&planned);
        }
        let _ = tx.send(Ok(send(&last))).await;
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        sim.count(|s| s.completed += 1);
    });
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(chunks),
    )
        .into_response()
}

async fn health(State(sim): State<Arc<Sim>>) -> Response {
    if lock(&sim.faults).fail_health {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "unhealthy"})),
        )
            .into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn models(State(sim): State<Arc<Sim>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": sim.config.model, "object": "model", "created": 0, "owned_by": "ti-scheduler-sim"}],
    }))
}

async fn completions(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    run(sim, Route::Completions, body).await
}

async fn chat_completions(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    run(sim, Route::Chat, body).await
}

async fn set_faults(State(sim): State<Arc<Sim>>, Json(faults): Json<OpenAiFaults>) -> Json<Value> {
    *lock(&sim.faults) = faults;
    Json(json!({"status": "success"}))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<OpenAiSimStats> {
    Json(lock(&sim.stats).clone())
}

/// Serves HTTP/1 connections until `stop`; then the port closes and every connection is
/// cut at once, requests under way included, as when a server process dies (axum's
/// `serve` would let them finish).
async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let (service, stop) = (service.clone(), stop.clone());
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
