//! `measure ceiling-server`: the two minimal servers the load benchmark measures
//! the scheduler against. Each answers `POST /queue/submit` like the scheduler does (parse
//! the JSON body, answer `{status, task_id, scheduled_ti}`), and nothing else:
//!
//! - `echo`: no storage at all: what axum and the load generator can do on this machine;
//! - `sqlite`: one row per request inserted by a dedicated writer thread (rusqlite, WAL,
//!   the given synchronous level), all waiting requests in one transaction (group
//!   commit), each answered after the commit: the fastest durable submit possible here.
//!
//! And one the proxy benchmark measures the front door against:
//!
//! - `relay`: `POST /v1/chat/completions` passed on to the given servers in turn (reqwest,
//!   the body as it is, the answer streamed back as it comes): a router that decides
//!   nothing, in the scheduler's own stack. Without `--db` it records nothing. With
//!   `--db` and `--record row`, each request is first inserted and committed as in
//!   `sqlite` (the least a router that records every request durably before sending it
//!   must do). With `--record scheduler`, it writes what the scheduler writes, in the
//!   scheduler's own schema (its migrations): the task row and a decision row committed
//!   before the request is sent, and the outcome (the answer, or the text put together
//!   of a stream, with its token counts) once the client has it, without waiting for
//!   fsync. What the scheduler costs beyond that relay is its own work: placing,
//!   predicting, queueing, its metrics and events.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use rusqlite::{params, TransactionBehavior};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use ti_scheduler::domain::{
    unix_now, Candidate, DecisionReason, Durability, NewDecision, Origin, Outcome, TaskId,
    TaskStatus, TiUuid, Usage,
};
use ti_scheduler::store::{Completion, DecisionRow, NewTask, StoreError, TaskRepo, Tx};
use ti_scheduler::ti::openai::{checked_answer, usage, RequestFields, StreamAssembly};

type Insert = (String, String, String, f64, oneshot::Sender<bool>);

/// Serves the `echo` ceiling, or the `sqlite` one when `db` is given.
pub async fn serve(port: u16, db: Option<(&Path, Durability)>) -> anyhow::Result<()> {
    let writer = match db {
        Some((path, durability)) => Some(spawn_writer(path, durability)?),
        None => None,
    };
    listen(
        port,
        Router::new()
            .route("/queue/submit", post(submit))
            .with_state(writer),
    )
    .await
}

/// Serves `app`, with `GET /health`, on the loopback `port`.
async fn listen(port: u16, app: Router) -> anyhow::Result<()> {
    let app = app.route(
        "/health",
        get(|| async { Json(json!({"status": "success"})) }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    axum::serve(ti_scheduler::nodelay(listener), app).await?;
    Ok(())
}

/// What the `relay` ceiling records of each request, with `--db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Record {
    /// One row (id, model, body, time), committed before the request is sent.
    Row,
    /// What the scheduler writes, in its schema: the task and decision rows committed
    /// before the request is sent, the outcome once the client has it.
    Scheduler,
}

/// How the `relay` ceiling records a request.
enum Recorder {
    Row(mpsc::Sender<Insert>),
    Scheduler(TaskLog),
}

/// The `relay` ceiling: its upstreams and which one is next.
struct Relay {
    http: reqwest::Client,
    recorder: Option<Recorder>,
    upstreams: Vec<String>,
    next: AtomicUsize,
}

/// Serves the `relay` ceiling in front of `upstreams` (base URLs), recording each request
/// as `record` says when `db` is given.
pub async fn relay(
    port: u16,
    upstreams: Vec<String>,
    db: Option<(&Path, Durability)>,
    record: Record,
) -> anyhow::Result<()> {
    anyhow::ensure!(!upstreams.is_empty(), "--to needs at least one base URL");
    let relay = Arc::new(Relay {
        recorder: match (db, record) {
            (None, _) => None,
            (Some((path, durability)), Record::Row) => {
                Some(Recorder::Row(spawn_writer(path, durability)?))
            }
            (Some((path, durability)), Record::Scheduler) => Some(Recorder::Scheduler(
                TaskLog::open(path, durability, &upstreams)?,
            )),
        },
        http: reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()?,
        upstreams,
        next: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(relay);
    listen(port, app).await
}

async fn forward(State(relay): State<Arc<Relay>>, body: Bytes) -> Result<Response, StatusCode> {
    let n = relay.next.fetch_add(1, Ordering::Relaxed) % relay.upstreams.len();
    let task = match &relay.recorder {
        None => None,
        Some(Recorder::Row(writer)) => {
            let request: Value =
                serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
            let model = request["model"].as_str().unwrap_or_default().to_string();
            let input = String::from_utf8_lossy(&body).into_owned();
            let task_id = format!("task-{}", uuid::Uuid::now_v7());
            record(writer, task_id, model, input).await?;
            None
        }
        Some(Recorder::Scheduler(log)) => Some(log.submit(&body, n).await?),
    };
    let sent = relay
        .http
        .post(format!("{}/v1/chat/completions", relay.upstreams[n]))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await;
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(_) => {
            if let Some(task) = task {
                task.failed("the upstream did not answer");
            }
            return Err(StatusCode::BAD_GATEWAY);
        }
    };
    let status = upstream.status().as_u16();
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::builder().status(status);
    if let Some(content_type) = &content_type {
        response = response.header(header::CONTENT_TYPE, content_type.as_bytes());
    }
    let streams = content_type
        .as_ref()
        .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    let body = match task {
        None => Body::from_stream(upstream.bytes_stream()),
        Some(task) if streams => {
            // The outcome is written when the client's body is dropped: after its end
            // (marked by the `None` chained behind the upstream's chunks), or when the
            // client leaves.
            let mut stream = StreamOutcome {
                task: Some(task),
                assembly: StreamAssembly::default(),
                ttft_ms: None,
                broke: false,
                ended: false,
            };
            let items = upstream.bytes_stream().map(Some);
            let items = items.chain(futures::stream::once(async { None }));
            Body::from_stream(
                items.filter_map(move |item| futures::future::ready(stream.pass(item))),
            )
        }
        Some(task) => {
            let Ok(answer) = upstream.bytes().await else {
                task.failed("the upstream's answer broke");
                return Err(StatusCode::BAD_GATEWAY);
            };
            let (result, usage) = match checked_answer(&answer) {
                Some((text, usage)) => (text.to_string(), usage),
                None => (String::from_utf8_lossy(&answer).into_owned(), None),
            };
            let ok = (200..300).contains(&status);
            task.finish(result, ok, usage, None);
            Body::from(answer)
        }
    };
    response
        .body(body)
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
}

async fn submit(
    State(writer): State<Option<mpsc::Sender<Insert>>>,
    body: Bytes,
) -> Result<Json<Value>, StatusCode> {
    let request: Value = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
    let task_id = format!("task-{}", uuid::Uuid::new_v4());
    if let Some(writer) = &writer {
        let model = request["model_name"].as_str().unwrap_or_default();
        let input = request["task_input"].to_string();
        record(writer, task_id.clone(), model.to_string(), input).await?;
    }
    Ok(Json(
        json!({"status": "success", "task_id": task_id, "scheduled_ti": ""}),
    ))
}

/// Hands one row to the writer thread and waits for its commit.
async fn record(
    writer: &mpsc::Sender<Insert>,
    task_id: String,
    model: String,
    input: String,
) -> Result<(), StatusCode> {
    let (done, committed) = oneshot::channel();
    let row = (
        task_id,
        model,
        input,
        ti_scheduler::domain::unix_now(),
        done,
    );
    writer
        .send(row)
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    if committed.await.unwrap_or(false) {
        Ok(())
    } else {
        Err(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// Every write waiting for the writer thread (up to 512), once there is one; `None` once
/// the channel is closed.
fn next_batch<T>(rx: &mpsc::Receiver<T>) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().ok()?];
    while batch.len() < 512 {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn spawn_writer(path: &Path, durability: Durability) -> anyhow::Result<mpsc::Sender<Insert>> {
    // Set up exactly as the scheduler's own write connection.
    let conn = ti_scheduler::store::write_connection(path, durability)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY NOT NULL, model_name TEXT NOT NULL,
                                           task_input TEXT NOT NULL, submit_time REAL NOT NULL) WITHOUT ROWID;",
    )?;
    let (tx, rx) = mpsc::channel::<Insert>();
    std::thread::spawn(move || {
        let mut conn = conn;
        while let Some(batch) = next_batch(&rx) {
            let committed = (|| -> rusqlite::Result<()> {
                let txn = conn.transaction()?;
                {
                    let mut insert = txn.prepare_cached(
                        "INSERT INTO tasks (task_id, model_name, task_input, submit_time) VALUES (?, ?, ?, ?)",
                    )?;
                    for (id, model, input, at, _) in &batch {
                        insert.execute(rusqlite::params![id, model, input, at])?;
                    }
                }
                txn.commit()
            })()
            .is_ok();
            for (.., done) in batch {
                let _ = done.send(committed);
            }
        }
    });
    Ok(tx)
}

/// One write of the scheduler's record, for [`TaskLog`]'s writer thread.
enum Write {
    /// The task row and its decision row; `done` hears whether they were committed.
    Submit {
        row: (NewTask, Option<DecisionRow>),
        done: oneshot::Sender<bool>,
    },
    /// The outcome, once the client has the answer; nobody waits for it.
    Outcome {
        task_id: TaskId,
        completion: Completion,
    },
}

/// The `relay` ceiling's record in the scheduler's schema, written by a thread of its
/// own in the scheduler's way (its own statements, `TaskRepo`'s): every waiting write in
/// one transaction, committed with fsync (at `full`) only when a task row is in it.
struct TaskLog {
    writes: mpsc::Sender<Write>,
    /// The `task_instances` row of each upstream, in the same order.
    tis: Vec<TiUuid>,
}

/// A task row committed: what its outcome needs.
struct Submitted {
    writes: mpsc::Sender<Write>,
    task_id: TaskId,
    ti: TiUuid,
    sent: Instant,
}

impl TaskLog {
    /// Migrates `path` with the scheduler's migrations and registers the upstreams as
    /// its TIs.
    fn open(path: &Path, durability: Durability, upstreams: &[String]) -> anyhow::Result<Self> {
        ti_scheduler::store::migrate(path)?;
        let mut conn = ti_scheduler::store::write_connection(path, durability)?;
        let mut tis = Vec::new();
        for base in upstreams {
            let url = reqwest::Url::parse(base)?;
            let ti = TiUuid::generate();
            conn.execute(
                "INSERT INTO task_instances (ti_uuid, host, port, model_name, callback_token,
                                             registered_at, kind)
                 VALUES (?1, ?2, ?3, 'relay', 'relay', ?4, 'openai')",
                params![ti.to_string(), url.host_str(), url.port(), unix_now()],
            )?;
            tis.push(ti);
        }
        let (writes, rx) = mpsc::channel::<Write>();
        let synced = durability == Durability::Full;
        std::thread::spawn(move || {
            let mut at_full = synced;
            while let Some(batch) = next_batch(&rx) {
                let fsync = synced && batch.iter().any(|w| matches!(w, Write::Submit { .. }));
                if fsync != at_full {
                    let level = if fsync { "FULL" } else { "NORMAL" };
                    if conn.pragma_update(None, "synchronous", level).is_ok() {
                        at_full = fsync;
                    }
                }
                let committed = write_batch(&mut conn, &batch).is_ok();
                for write in batch {
                    if let Write::Submit { done, .. } = write {
                        let _ = done.send(committed);
                    }
                }
            }
        });
        Ok(Self { writes, tis })
    }

    /// Commits the task and decision rows of a request going to upstream `n`.
    async fn submit(&self, body: &Bytes, n: usize) -> Result<Submitted, StatusCode> {
        // Read as the scheduler's front door reads it: the fields, not a tree of the body.
        let text = std::str::from_utf8(body).map_err(|_| StatusCode::BAD_REQUEST)?;
        let request = RequestFields::read(text).map_err(|_| StatusCode::BAD_REQUEST)?;
        let model = request.model_name().ok_or(StatusCode::BAD_REQUEST)?;
        let mut metadata = Map::new();
        metadata.insert("path".into(), "v1/chat/completions".into());
        request.add_features(&mut metadata);
        let task_id = TaskId::generate();
        let ti = self.tis[n];
        let at = unix_now();
        let candidates = self
            .tis
            .iter()
            .map(|&ti_uuid| Candidate {
                ti_uuid,
                wait_ms: 0.0,
                wait_error_ms: 0.0,
                queue_length: 0,
                predicted_ms: 0.0,
                predicted_error_ms: 0.0,
                prediction_source: "prior",
                score: 0.0,
            })
            .collect();
        let decision = NewDecision {
            task_id: task_id.clone(),
            decided_at: at,
            reason: DecisionReason::Submit,
            strategy: "round_robin",
            predict_mode: "default",
            predicted_ms: 0.0,
            predicted_error_ms: 0.0,
            prediction_source: "prior",
            lookup_fallback: false,
            chosen_ti: ti,
            candidates,
        };
        let task = NewTask {
            task_id: task_id.clone(),
            model_name: model,
            task_input: String::from_utf8_lossy(body).into_owned(),
            metadata: Value::Object(metadata).to_string(),
            ti_uuid: Some(ti),
            status: TaskStatus::Scheduled,
            predicted_ms: 0.0,
            predicted_error_ms: 0.0,
            submit_time: at,
            origin: Origin::Openai,
        };
        let decision =
            DecisionRow::try_from(decision).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
        let (done, committed) = oneshot::channel();
        self.writes
            .send(Write::Submit {
                row: (task, Some(decision)),
                done,
            })
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        if !committed.await.unwrap_or(false) {
            return Err(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Ok(Submitted {
            writes: self.writes.clone(),
            task_id,
            ti,
            sent: Instant::now(),
        })
    }
}

impl Submitted {
    /// Hands the outcome to the writer thread, without waiting for it.
    fn finish(self, result: String, ok: bool, usage: Option<Usage>, ttft_ms: Option<f64>) {
        let completion = Completion {
            result,
            outcome: if ok {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            },
            execution_time_ms: self.sent.elapsed().as_secs_f64() * 1000.0,
            completion_time: unix_now(),
            usage,
            result_ti: Some(self.ti),
            ttft_ms,
        };
        let _ = self.writes.send(Write::Outcome {
            task_id: self.task_id,
            completion,
        });
    }

    /// Hands a failure as the outcome.
    fn failed(self, error: &str) {
        self.finish(json!({ "error": error }).to_string(), false, None, None);
    }
}

/// A stream on its way to the client: put together as it passes, its outcome written
/// when it is dropped.
struct StreamOutcome {
    /// Taken when the outcome is handed over.
    task: Option<Submitted>,
    assembly: StreamAssembly,
    ttft_ms: Option<f64>,
    broke: bool,
    /// Set once the upstream's stream has ended and the client has read all of it.
    ended: bool,
}

impl StreamOutcome {
    /// Takes the upstream's next chunk on its way to the client; `None`: the end.
    fn pass(&mut self, item: Option<reqwest::Result<Bytes>>) -> Option<reqwest::Result<Bytes>> {
        match &item {
            Some(chunk) => self.feed(chunk),
            None => self.ended = true,
        }
        item
    }

    fn feed(&mut self, chunk: &reqwest::Result<Bytes>) {
        match chunk {
            Ok(bytes) => {
                if self.assembly.feed(bytes) {
                    let sent = self.task.as_ref().map(|t| t.sent);
                    self.ttft_ms = sent.map(|s| s.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Err(_) => self.broke = true,
        }
    }
}

impl Drop for StreamOutcome {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        if self.broke {
            task.failed("the upstream's stream broke");
        } else if !self.ended {
            task.failed("client disconnected");
        } else {
            // As the scheduler stores a stream: what was put together, with its usage.
            let result = std::mem::take(&mut self.assembly).result();
            let usage = usage(&result);
            task.finish(result.to_string(), true, usage, self.ttft_ms);
        }
    }
}

/// One batch of the scheduler's record in one transaction, with the scheduler's own
/// statements.
fn write_batch(conn: &mut rusqlite::Connection, batch: &[Write]) -> Result<(), StoreError> {
    let txn = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut tx = Tx::Sqlite(&txn);
        for write in batch {
            match write {
                Write::Submit { row, .. } => {
                    TaskRepo::insert_submit(&mut tx, std::slice::from_ref(row))?;
                }
                Write::Outcome {
                    task_id,
                    completion,
                } => {
                    TaskRepo::complete(&mut tx, task_id, completion)?;
                }
            }
        }
    }
    Ok(txn.commit()?)
}
