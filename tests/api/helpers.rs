//! Test harness: the real app on an ephemeral port with a fresh database, real simulated
//! TIs, and HTTP helpers.
//!
//! The database is an SQLite file in a temp dir, or, when `TI_TEST_POSTGRES` names a
//! PostgreSQL server (the URL of its admin database, as `scripts/pg-cluster.sh start`
//! prints), a fresh database of its own on that server. [`TestApp::sql_rows`] and its
//! kin read it beside the running service on either backend.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Column, Connection, Row, TypeInfo};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use ti_scheduler::config::{DatabaseLocation, Settings};
use ti_scheduler::domain::Durability;
use ti_scheduler::store;
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
    if let Some(server) = postgres_server() {
        settings.database.url = create_database(&server).await;
    }
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

    /// The rows of a query on the app's database (beside the running service; read-only
    /// on SQLite), each column as JSON: null, a number, a string, or (PostgreSQL's
    /// BOOLEAN) a bool. The query must run on both backends.
    pub async fn sql_rows(&self, query: &str) -> Vec<Vec<Value>> {
        rows(&self.settings, query).await
    }

    /// The first row of a query (which must find one).
    pub async fn sql_row(&self, query: &str) -> Vec<Value> {
        let rows = self.sql_rows(query).await;
        rows.into_iter()
            .next()
            .unwrap_or_else(|| panic!("no row for {query}"))
    }

    /// The first column of the first row of a query.
    pub async fn sql_value(&self, query: &str) -> Value {
        self.sql_row(query).await.swap_remove(0)
    }

    /// The first column of the first row of a query, a string.
    pub async fn sql_text(&self, query: &str) -> String {
        match self.sql_value(query).await {
            Value::String(s) => s,
            other => panic!("{query} gave {other}, not a string"),
        }
    }

    /// The first column of the first row of a query, an integer (`SELECT COUNT(*) ...`).
    pub async fn count(&self, query: &str) -> i64 {
        let value = self.sql_value(query).await;
        value
            .as_i64()
            .unwrap_or_else(|| panic!("{query} gave {value}, not an integer"))
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

/// The database backend of the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A file in the test's temp dir (the default).
    Sqlite,
    /// A database of its own on the server `TI_TEST_POSTGRES` names.
    Postgres,
}

/// The backend of this test run: PostgreSQL when `TI_TEST_POSTGRES` is set.
pub fn backend() -> Backend {
    match postgres_server() {
        Some(_) => Backend::Postgres,
        None => Backend::Sqlite,
    }
}

/// For the tests of SQLite itself (its file, its lock, its pragmas): true, after saying
/// so on stderr, when the run is on PostgreSQL; the test then returns.
pub fn skip_on_postgres(why: &str) -> bool {
    let skip = backend() == Backend::Postgres;
    if skip {
        eprintln!("skipped on PostgreSQL: {why}");
    }
    skip
}

/// The URL of the PostgreSQL server's admin database, from `TI_TEST_POSTGRES`.
fn postgres_server() -> Option<String> {
    std::env::var("TI_TEST_POSTGRES")
        .ok()
        .filter(|url| !url.is_empty())
}

/// Creates a fresh database on the server; returns its URL (the server's, with the new
/// database's name). The cluster is a throw-away one: the databases stay until it goes.
async fn create_database(server: &str) -> String {
    ti_scheduler::store::create_postgres_database(server, "t")
        .await
        .unwrap_or_else(|e| panic!("TI_TEST_POSTGRES={server}: {e:#}"))
}

/// The rows of a query on the database the settings name (see [`TestApp::sql_rows`]).
pub async fn rows(settings: &Settings, query: &str) -> Vec<Vec<Value>> {
    match settings.database.location().expect("database location") {
        DatabaseLocation::Sqlite(path) => {
            let query = query.to_string();
            tokio::task::spawn_blocking(move || sqlite_rows(&path, &query))
                .await
                .unwrap()
        }
        DatabaseLocation::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(query.to_string()))
                .fetch_all(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            conn.close().await.ok();
            rows.iter().map(postgres_row).collect()
        }
    }
}

fn sqlite_rows(path: &std::path::Path, query: &str) -> Vec<Vec<Value>> {
    use rusqlite::types::ValueRef;
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut statement = conn
        .prepare(query)
        .unwrap_or_else(|e| panic!("{query}: {e}"));
    let columns = statement.column_count();
    let rows = statement.query_map([], |row| {
        (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => json!(n),
                    ValueRef::Real(x) => json!(x),
                    ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                    ValueRef::Blob(_) => panic!("{query}: a BLOB column"),
                })
            })
            .collect::<rusqlite::Result<Vec<Value>>>()
    });
    rows.and_then(|rows| rows.collect())
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

fn postgres_row(row: &sqlx::postgres::PgRow) -> Vec<Value> {
    row.columns()
        .iter()
        .map(|column| {
            let i = column.ordinal();
            let value = match column.type_info().name() {
                "BOOL" => row.try_get::<Option<bool>, _>(i).map(|v| json!(v)),
                "INT2" => row.try_get::<Option<i16>, _>(i).map(|v| json!(v)),
                "INT4" => row.try_get::<Option<i32>, _>(i).map(|v| json!(v)),
                "INT8" => row.try_get::<Option<i64>, _>(i).map(|v| json!(v)),
                "FLOAT4" => row.try_get::<Option<f32>, _>(i).map(|v| json!(v)),
                "FLOAT8" => row.try_get::<Option<f64>, _>(i).map(|v| json!(v)),
                "TEXT" | "VARCHAR" | "NAME" => {
                    row.try_get::<Option<String>, _>(i).map(|v| json!(v))
                }
                other => panic!("column {} is {other}: not read by the tests", column.name()),
            };
            value.unwrap_or_else(|e| panic!("column {}: {e}", column.name()))
        })
        .collect()
}

/// Runs statements (`;`-separated) on the database the settings name, beside the
/// service if it runs.
pub async fn execute(settings: &Settings, statements: &str) {
    match settings.database.location().expect("database location") {
        DatabaseLocation::Sqlite(path) => {
            let statements = statements.to_string();
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch(&statements)
                    .unwrap_or_else(|e| panic!("{statements}: {e}"));
            })
            .await
            .unwrap();
        }
        DatabaseLocation::Postgres(url) => {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_string()))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{statements}: {e}"));
            conn.close().await.ok();
        }
    }
}

/// Opens the database the settings name a second time, as the cleanup job or a command
/// would: a read pool and a writer of its own, until `stop` is cancelled (then await the
/// handle).
pub async fn open_store(
    settings: &Settings,
    stop: CancellationToken,
) -> (store::Db, tokio::task::JoinHandle<()>) {
    let opened = match settings.database.location().expect("database location") {
        DatabaseLocation::Sqlite(path) => store::open(&path, Durability::Full, 1, 16, stop).await,
        DatabaseLocation::Postgres(url) => {
            store::open_postgres(&url, Durability::Full, 1, 16, None, stop).await
        }
    };
    opened.expect("the database opens")
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
