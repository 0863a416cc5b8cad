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
//!   nothing, in the scheduler's own stack. With `--db`, each request is first inserted
//!   and committed as in `sqlite` (the least a router that records every request durably
//!   before sending it must do); without, it records nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use ti_scheduler::domain::Durability;

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

/// The `relay` ceiling: its upstreams and which one is next.
struct Relay {
    http: reqwest::Client,
    writer: Option<mpsc::Sender<Insert>>,
    upstreams: Vec<String>,
    next: AtomicUsize,
}

/// Serves the `relay` ceiling in front of `upstreams` (base URLs), recording each request
/// first when `db` is given.
pub async fn relay(
    port: u16,
    upstreams: Vec<String>,
    db: Option<(&Path, Durability)>,
) -> anyhow::Result<()> {
    anyhow::ensure!(!upstreams.is_empty(), "--to needs at least one base URL");
    let relay = Arc::new(Relay {
        writer: match db {
            Some((path, durability)) => Some(spawn_writer(path, durability)?),
            None => None,
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
    if let Some(writer) = &relay.writer {
        let request: Value = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
        let model = request["model"].as_str().unwrap_or_default().to_string();
        let input = String::from_utf8_lossy(&body).into_owned();
        let task_id = format!("task-{}", uuid::Uuid::now_v7());
        record(writer, task_id, model, input).await?;
    }
    let n = relay.next.fetch_add(1, Ordering::Relaxed) % relay.upstreams.len();
    let upstream = relay
        .http
        .post(format!("{}/v1/chat/completions", relay.upstreams[n]))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    let mut response = Response::builder().status(upstream.status().as_u16());
    if let Some(content_type) = upstream.headers().get(header::CONTENT_TYPE) {
        response = response.header(header::CONTENT_TYPE, content_type.as_bytes());
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
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
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
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
