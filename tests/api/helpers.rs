//! Test harness: the real app on an ephemeral port with a fresh SQLite file in a temp
//! dir, real simulated TIs, and HTTP helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;

use ti_scheduler::config::Settings;
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};
use ti_scheduler::ti::sim::{SimConfig, SimTi};
use ti_scheduler::App;

/// How long a test waits for something to happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A running scheduler.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub settings: Settings,
    /// Keeps the database directory alive for the whole test.
    pub dir: std::sync::Arc<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Settings for tests: fast probes and reconciliation, a fixed seed, and no shutdown grace
/// (a test's `stop` is immediate, as a crash-free restart needs).
pub fn test_settings(dir: &TempDir) -> Settings {
    let mut s = Settings::default();
    s.server.bind = "127.0.0.1:0".parse().unwrap();
    s.database.path = dir.path().join("scheduler.db");
    s.ti.health_interval_ms = 100;
    s.ti.health_timeout_ms = 500;
    s.ti.dispatch_timeout_ms = 1_000;
    s.ti.retry_backoff_ms = 20;
    s.ti.reroute_after_failed_probes = 2;
    s.ti.reconcile_after_ms = 500;
    s.scheduling.rng_seed = 42;
    s.server.shutdown_grace_ms = 0;
    s
}

/// Starts the scheduler with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the scheduler with the test settings changed by `adjust`.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut settings = test_settings(&dir);
    adjust(&mut settings);
    start(settings, dir).await
}

async fn start(settings: Settings, dir: std::sync::Arc<TempDir>) -> TestApp {
    let app = App::build(settings.clone()).await.expect("app builds");
    let addr = app.addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        settings,
        dir,
        stop: Some(stop),
        server,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn db_path(&self) -> PathBuf {
        self.settings.database.path.clone()
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        read(resp).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        read(resp).await
    }

    /// The Prometheus text of `GET /metrics` (asserting a 200).
    pub async fn metrics(&self) -> String {
        let resp = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        read(resp).await
    }

    /// Registers a simulated TI; returns its ti_uuid.
    pub async fn register(&self, ti: &SimTi) -> String {
        let (status, body) = self
            .post(
                "/ti/register",
                json!({"host": "127.0.0.1", "port": ti.addr().port()}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["ti_uuid"].as_str().unwrap().to_string()
    }

    pub async fn set_strategy(&self, name: &str) {
        let (status, body) = self.post("/scheduler/set", json!({"name": name})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Submits a task; returns (task_id, scheduled_ti).
    pub async fn submit(&self, model: &str, metadata: Value) -> (String, String) {
        let (status, body) = self
            .post(
                "/queue/submit",
                json!({"model_name": model, "task_input": {"prompt": "hello"}, "metadata": metadata}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["task_id"].as_str().unwrap().to_string(),
            body["scheduled_ti"].as_str().unwrap().to_string(),
        )
    }

    pub async fn query(&self, task_id: &str) -> Value {
        let (status, body) = self.get(&format!("/task/query?task_id={task_id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Waits until the task is completed; returns its query answer.
    pub async fn wait_completed(&self, task_id: &str) -> Value {
        wait_for(&format!("task {task_id} to complete"), || async {
            let body = self.query(task_id).await;
            (body["task_status"] == "completed").then_some(body)
        })
        .await
    }

    /// The queue entry of one TI.
    pub async fn queue_of(&self, ti_uuid: &str) -> Value {
        let (_, body) = self.get("/queue/info").await;
        body["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["ti_uuid"] == ti_uuid)
            .cloned()
            .unwrap_or_else(|| panic!("no queue for {ti_uuid} in {body}"))
    }

    /// Whether the scheduler currently counts the TI healthy.
    pub async fn healthy(&self, ti_uuid: &str) -> bool {
        self.queue_of(ti_uuid).await["healthy"].as_bool().unwrap()
    }

    /// Runs a query on the database file (read-only, beside the running service).
    pub fn sql<T>(
        &self,
        query: &str,
        read: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> T {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row(query, [], read).unwrap()
    }

    pub fn count(&self, query: &str) -> i64 {
        self.sql(query, |r| r.get(0))
    }

    /// Stops the service gracefully and waits until the database is closed.
    pub async fn stop(mut self) -> (Settings, std::sync::Arc<TempDir>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.server)
            .await
            .expect("service stops in time")
            .expect("service task")
            .expect("service ran");
        (self.settings.clone(), self.dir.clone())
    }

    /// Stops the service and starts a new one on the same database file.
    pub async fn restart(self) -> TestApp {
        let (settings, dir) = self.stop().await;
        restart_from(settings, dir).await
    }
}

/// Starts a service on the settings (and database) of a stopped one.
pub async fn restart_from(settings: Settings, dir: std::sync::Arc<TempDir>) -> TestApp {
    start(settings, dir).await
}

async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?} (HTTP {status})"));
    (status, body)
}

/// Asserts that an error body's `message` contains `needle`.
#[track_caller]
pub fn assert_message(body: &Value, needle: &str) {
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"));
    assert!(message.contains(needle), "{needle:?} is not in {body}");
}

/// Polls `check` until it yields a value, failing the test after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a simulated TI on an ephemeral port.
pub async fn spawn_ti(model: &str, hardware: &str, base_ms: f64) -> SimTi {
    spawn_ti_with(SimConfig {
        model: model.into(),
        hardware: Some(hardware.into()),
        base_ms,
        ..SimConfig::default()
    })
    .await
}

pub async fn spawn_ti_with(config: SimConfig) -> SimTi {
    SimTi::spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulated TI starts")
}

/// Starts a simulated OpenAI-compatible server on an ephemeral port.
pub async fn spawn_openai(config: OpenAiSimConfig) -> OpenAiSim {
    OpenAiSim::spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulated OpenAI server starts")
}

impl TestApp {
    /// Registers an OpenAI-compatible TI with these extra fields (`max_concurrency`,
    /// `hardware`, `model_name`); returns its ti_uuid.
    pub async fn register_openai(&self, sim: &OpenAiSim, extra: Value) -> String {
        let mut body = json!({"host": "127.0.0.1", "port": sim.addr().port(), "kind": "openai"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, answer) = self.post("/ti/register", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["ti_uuid"].as_str().unwrap().to_string()
    }

    /// Submits a task with this input and metadata; returns (task_id, scheduled_ti).
    pub async fn submit_input(
        &self,
        model: &str,
        input: Value,
        metadata: Value,
    ) -> (String, String) {
        let (status, body) = self
            .post(
                "/queue/submit",
                json!({"model_name": model, "task_input": input, "metadata": metadata}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["task_id"].as_str().unwrap().to_string(),
            body["scheduled_ti"].as_str().unwrap().to_string(),
        )
    }
}
