//! The simulated Task Instance: a real HTTP server speaking the callback protocol (docs/API.md).
//!
//! It serves one model on one "hardware", accepts tasks (idempotently per `task_id`),
//! runs them FIFO on `parallelism` workers, each taking
//! `(base_ms + per_input_token_ms · input_tokens + per_output_token_ms · output_tokens)`
//! times a mean-one lognormal noise times the slowdown factor, then POSTs the result to
//! the task's callback URL. Fault switches (`POST /admin/faults`) make it fail its health
//! check, refuse or hang on submits, drop callbacks, fail tasks or slow down; `GET /admin/stats`
//! counts what it received and executed. A task whose `task_input` has `"sim_reject": true`
//! is rejected with 400 at submit (as a real TI rejects input it cannot take), and so is
//! a body its JSON parser refuses (serde_json's limit: 128 levels of nesting in the whole
//! submit body). Tests, the demo and benchmarks start it on
//! ephemeral ports with [`SimTi::spawn`]; `ti-scheduler sim-ti` runs one from the shell.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::protocol::{ReceivedTask, ResultCallback, TiTaskReport, TiTaskStatus};

/// How the simulated TI behaves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SimConfig {
    /// The model it reports in `GET /info`.
    pub model: String,
    /// The hardware it reports, if any.
    pub hardware: Option<String>,
    /// Tasks executed at once.
    pub parallelism: usize,
    /// Fixed part of a task's execution time, ms.
    pub base_ms: f64,
    /// ms per `input_tokens` of the task's metadata.
    pub per_input_token_ms: f64,
    /// ms per `output_tokens` (or `max_tokens`) of the task's metadata.
    pub per_output_token_ms: f64,
    /// σ of the lognormal noise multiplying each execution time (0 = exact).
    pub noise: f64,
    /// Share of tasks that fail (0..=1).
    pub fail_rate: f64,
    /// Seed of the noise and failures.
    pub seed: u64,
    /// Finished tasks remembered for `GET /results` and for deduplication; beyond this,
    /// the oldest finished ones are forgotten, so a long run's memory stays bounded.
    pub keep_finished: usize,
    /// Fault switches at start.
    pub faults: Faults,
}

impl SimConfig {
    /// The execution time law without noise, ms: `base_ms + per_input_token_ms ·
    /// input_tokens + per_output_token_ms · output_tokens` (`max_tokens` stands in for
    /// `output_tokens`).
    pub fn law_ms(&self, metadata: &Value) -> f64 {
        let feature = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| metadata.get(*n).and_then(Value::as_f64))
                .unwrap_or(0.0)
                .max(0.0)
        };
        self.base_ms
            + self.per_input_token_ms * feature(&["input_tokens"])
            + self.per_output_token_ms * feature(&["output_tokens", "max_tokens"])
    }
}

/// The mean-one lognormal noise of σ `sigma`, if any.
pub fn noise_law(sigma: f64) -> Option<LogNormal<f64>> {
    (sigma > 0.0)
        .then(|| LogNormal::new(-sigma * sigma / 2.0, sigma).ok())
        .flatten()
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            model: "llama-7b".into(),
            hardware: Some("A100".into()),
            parallelism: 1,
            base_ms: 50.0,
            per_input_token_ms: 0.0,
            per_output_token_ms: 0.0,
            noise: 0.0,
            fail_rate: 0.0,
            seed: 1,
            keep_finished: 100_000,
            faults: Faults::default(),
        }
    }
}

/// Switches that make the simulated TI misbehave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Faults {
    /// `GET /health` answers 500.
    pub fail_health: bool,
    /// `POST /queue/submit` answers 503.
    pub refuse_submits: bool,
    /// Finished tasks are not called back (still visible in `GET /results`).
    pub drop_callbacks: bool,
    /// Every task fails with an error.
    pub fail_tasks: bool,
    /// Execution times are multiplied by this.
    pub slowdown: f64,
    /// `POST /queue/submit` answers only after this long, ms (a hanging TI).
    pub submit_delay_ms: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_health: false,
            refuse_submits: false,
            drop_callbacks: false,
            fail_tasks: false,
            slowdown: 1.0,
            submit_delay_ms: 0,
        }
    }
}

/// What the simulated TI has seen, from `GET /admin/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SimStats {
    /// Distinct tasks accepted.
    pub accepted: u64,
    /// Submits of a task it already had (answered 200, not run again).
    pub duplicates: u64,
    /// Tasks finished (completed or failed).
    pub finished: u64,
    /// Callbacks that reached the scheduler with a 2xx.
    pub callbacks_delivered: u64,
    /// Tasks waiting or running now.
    pub in_progress: u64,
}

#[derive(Debug, Clone)]
struct Record {
    status: TiTaskStatus,
    result: Option<Value>,
    error: Option<String>,
    execution_ms: Option<f64>,
}

struct Sim {
    config: SimConfig,
    faults: Mutex<Faults>,
    tasks: Mutex<Records>,
    stats: Mutex<SimStats>,
    stop: CancellationToken,
    rng: Mutex<StdRng>,
    /// One permit per task that may execute at once; waiting tasks queue for one in order.
    slots: Arc<Semaphore>,
    /// The last callback URL parsed: every task of a scheduler names the same one.
    last_callback: Mutex<Option<(String, reqwest::Url)>>,
    http: reqwest::Client,
}

/// A running simulated TI.
pub struct SimTi {
    addr: SocketAddr,
    sim: Arc<Sim>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl SimTi {
    /// Starts a simulated TI listening on `bind` (port 0 for an ephemeral one).
    pub async fn spawn(config: SimConfig, bind: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let slots = Arc::new(Semaphore::new(config.parallelism.max(1)));
        let sim = Arc::new(Sim {
            faults: Mutex::new(config.faults.clone()),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            config,
            tasks: Mutex::new(Records::default()),
            stats: Mutex::new(SimStats::default()),
            stop: stop.clone(),
            slots,
            last_callback: Mutex::new(None),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(std::io::Error::other)?,
        });
        let app = Router::new()
            .route("/health", get(health))
            .route("/info", get(info))
            .route("/queue/submit", post(submit))
            .route("/results/{task_id}", get(report))
            .route("/admin/faults", post(set_faults))
            .route("/admin/stats", get(stats))
            .with_state(sim.clone());
        let shutdown = stop.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(crate::nodelay(listener), app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!(error = ?e, "simulated TI server failed");
            }
        });
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
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.sim.faults) = faults;
    }

    /// What it has seen so far.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Stops it as a crash would look from outside: the port closes, running tasks are
    /// abandoned and no more callbacks are sent.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }

    /// Runs until the task is cancelled (for the `sim-ti` command).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Every task seen, in arrival order.
#[derive(Default)]
struct Records {
    by_id: HashMap<String, Record>,
    order: VecDeque<String>,
}

impl Records {
    /// Records a new task; false if it was already known.
    fn insert_new(&mut self, task_id: &str, keep_finished: usize) -> bool {
        if self.by_id.contains_key(task_id) {
            return false;
        }
        self.by_id.insert(
            task_id.to_string(),
            Record {
                status: TiTaskStatus::Queued,
                result: None,
                error: None,
                execution_ms: None,
            },
        );
        self.order.push_back(task_id.to_string());
        // Forget the oldest, as long as they are finished.
        while self.by_id.len() > keep_finished.max(1) {
            let Some(oldest) = self.order.front() else {
                break;
            };
            let finished = self
                .by_id
                .get(oldest)
                .is_none_or(|r| matches!(r.status, TiTaskStatus::Completed | TiTaskStatus::Failed));
            if !finished {
                break;
            }
            if let Some(id) = self.order.pop_front() {
                self.by_id.remove(&id);
            }
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    fn stats(&self) -> SimStats {
        let mut stats = lock(&self.stats).clone();
        stats.in_progress = lock(&self.tasks)
            .by_id
            .values()
            .filter(|r| matches!(r.status, TiTaskStatus::Queued | TiTaskStatus::Running))
            .count() as u64;
        stats
    }

    /// Execution time of a task: the law, times noise, times the slowdown, ms.
    fn execution_ms(&self, metadata: &Value) -> f64 {
        let noise = noise_law(self.config.noise)
            .map(|d| d.sample(&mut *lock(&self.rng)))
            .unwrap_or(1.0);
        (self.config.law_ms(metadata) * noise * lock(&self.faults).slowdown.max(0.0)).max(0.0)
    }

    /// Runs a task once one of the `parallelism` slots is free, then delivers its result
    /// (after freeing the slot, so the next task starts at once, as on a real TI). A
    /// stopped TI runs and sends nothing more.
    fn start(self: &Arc<Self>, task: ReceivedTask) {
        let sim = self.clone();
        tokio::spawn(async move {
            let stop = sim.stop.clone();
            let run = async {
                let Ok(slot) = sim.slots.acquire().await else {
                    return;
                };
                let callback = sim.execute(task).await;
                drop(slot);
                if let Some((url, callback)) = callback {
                    match sim.callback_url(&url) {
                        Some(url) => deliver(&sim.http, &url, &callback, &sim.stats).await,
                        None => tracing::warn!(%url, "callback_url is not a URL; result not sent"),
                    }
                }
            };
            tokio::select! {
                _ = run => {}
                _ = stop.cancelled() => {}
            }
        });
    }

    /// `url` parsed, from the cache when it is the last one seen.
    fn callback_url(&self, url: &str) -> Option<reqwest::Url> {
        let mut last = lock(&self.last_callback);
        if let Some((text, parsed)) = last.as_ref() {
            if text == url {
                return Some(parsed.clone());
            }
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        *last = Some((url.to_string(), parsed.clone()));
        Some(parsed)
    }

    /// Executes a task; returns the callback to send and where, unless callbacks are
    /// switched off.
    async fn execute(&self, task: ReceivedTask) -> Option<(String, ResultCallback)> {
        if let Some(r) = lock(&self.tasks).by_id.get_mut(&task.task_id) {
            r.status = TiTaskStatus::Running;
        }
        let planned = self.execution_ms(&task.metadata);
        let started = Instant::now();
        if planned > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(planned / 1000.0)).await;
        }
        let execution_ms = started.elapsed().as_secs_f64() * 1000.0;
        let fails = lock(&self.faults).fail_tasks
            || (self.config.fail_rate > 0.0
                && lock(&self.rng).random::<f64>() < self.config.fail_rate);
        let (result, error) = if fails {
            (
                None,
                Some(format!("simulated failure on {}", self.config.model)),
            )
        } else {
            (
                Some(json!({
                    "output": format!("{} processed {}", self.config.model, task.task_id),
                    "model": self.config.model,
                    "hardware": self.config.hardware,
                    "input": task.task_input,
                })),
                None,
            )
        };
        if let Some(r) = lock(&self.tasks).by_id.get_mut(&task.task_id) {
            r.status = if fails {
                TiTaskStatus::Failed
            } else {
                TiTaskStatus::Completed
            };
            r.result = result.clone();
            r.error = error.clone();
            r.execution_ms = Some(execution_ms);
        }
        lock(&self.stats).finished += 1;
        if lock(&self.faults).drop_callbacks {
            return None;
        }
        let callback = ResultCallback {
            task_id: task.task_id,
            ti_uuid: task.ti_uuid,
            callback_token: task.callback_token,
            execution_time: execution_ms,
            result,
            error,
        };
        Some((task.callback_url, callback))
    }
}

/// POSTs a result callback, retrying a few times on transport errors and 5xx.
async fn deliver(
    http: &reqwest::Client,
    url: &reqwest::Url,
    callback: &ResultCallback,
    stats: &Mutex<SimStats>,
) {
    for attempt in 0..3u32 {
        let sent = http
            .post(url.clone())
            .timeout(Duration::from_secs(5))
            .json(callback)
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                lock(stats).callbacks_delivered += 1;
                return;
            }
            // The scheduler refused it for good (wrong token, unknown task).
            Ok(resp) if resp.status().is_client_error() => return,
            _ => tokio::time::sleep(Duration::from_millis(50 << attempt)).await,
        }
    }
}

async fn health(State(sim): State<Arc<Sim>>) -> Response {
    if lock(&sim.faults).fail_health {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "unhealthy"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "healthy"})).into_response()
    }
}

async fn info(State(sim): State<Arc<Sim>>) -> Json<Value> {
    Json(json!({
        "status": "success",
        "model_name": sim.config.model,
        "hardware": sim.config.hardware,
        "parallelism": sim.config.parallelism,
        "deployed_model": {"model_name": sim.config.model, "hardware": sim.config.hardware},
    }))
}

async fn submit(State(sim): State<Arc<Sim>>, body: axum::body::Bytes) -> Response {
    let delay = lock(&sim.faults).submit_delay_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if lock(&sim.faults).refuse_submits {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": "submits refused (fault switch)"})),
        )
            .into_response();
    }
    let task: ReceivedTask = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"status": "error", "message": e.to_string()})),
            )
                .into_response()
        }
    };
    if task.task_input.get("sim_reject") == Some(&Value::Bool(true)) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "error", "message": "task_input rejected (sim_reject)"})),
        )
            .into_response();
    }
    let fresh = lock(&sim.tasks).insert_new(&task.task_id, sim.config.keep_finished);
    let task_id = task.task_id.clone();
    if fresh {
        lock(&sim.stats).accepted += 1;
        sim.start(task);
    } else {
        lock(&sim.stats).duplicates += 1;
    }
    Json(json!({"status": "success", "task_id": task_id})).into_response()
}

async fn report(State(sim): State<Arc<Sim>>, Path(task_id): Path<String>) -> Response {
    let record = lock(&sim.tasks).by_id.get(&task_id).cloned();
    match record {
        Some(r) => Json(TiTaskReport {
            task_id,
            status: r.status,
            result: r.result,
            error: r.error,
            execution_time: r.execution_ms,
        })
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"status": "error", "message": format!("unknown task '{task_id}'")})),
        )
            .into_response(),
    }
}

async fn set_faults(State(sim): State<Arc<Sim>>, Json(faults): Json<Faults>) -> Json<Value> {
    *lock(&sim.faults) = faults;
    Json(json!({"status": "success"}))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(records: &mut Records, id: &str) {
        records.by_id.get_mut(id).unwrap().status = TiTaskStatus::Completed;
    }

    #[test]
    fn records_forget_the_oldest_finished_tasks_beyond_the_limit_and_never_an_unfinished_one() {
        let mut r = Records::default();
        assert!(r.insert_new("a", 2));
        assert!(!r.insert_new("a", 2), "a known task is not new");
        assert!(r.insert_new("b", 2));
        // "a" is the oldest but still running: it stays, the limit is exceeded for now.
        assert!(r.insert_new("c", 2));
        assert_eq!(r.by_id.len(), 3);
        finish(&mut r, "a");
        finish(&mut r, "b");
        assert!(r.insert_new("d", 2));
        // "a" and "b" are forgotten, oldest first; "c" (running) and "d" stay.
        let mut kept: Vec<&str> = r.by_id.keys().map(String::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["c", "d"]);
        assert_eq!(r.order, ["c", "d"]);
    }
}
