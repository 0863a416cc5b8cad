//! `measure ceiling-server`: the two minimal servers the load benchmark measures
//! the scheduler against. Each answers `POST /queue/submit` like the scheduler does (parse
//! the JSON body, answer `{status, task_id, scheduled_ti}`), and nothing else:
//!
//! - `echo`: no storage at all: what axum and the load generator can do on this machine;
//! - `sqlite`: one row per request inserted by a dedicated writer thread (rusqlite, WAL,
//!   the given synchronous level), all waiting requests in one transaction (group
//!   commit), each answered after the commit: the fastest durable submit possible here.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
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
    let app = Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "success"})) }),
        )
        .route("/queue/submit", post(submit))
        .with_state(writer);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    axum::serve(ti_scheduler::nodelay(listener), app).await?;
    Ok(())
}

async fn submit(
    State(writer): State<Option<mpsc::Sender<Insert>>>,
    body: Bytes,
) -> Result<Json<Value>, StatusCode> {
    let request: Value = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
    let task_id = format!("task-{}", uuid::Uuid::new_v4());
    if let Some(writer) = writer {
        let (done, committed) = oneshot::channel();
        let row = (
            task_id.clone(),
            request["model_name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            request["task_input"].to_string(),
            ti_scheduler::domain::unix_now(),
            done,
        );
        writer
            .send(row)
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        if !committed.await.unwrap_or(false) {
            return Err(StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    Ok(Json(
        json!({"status": "success", "task_id": task_id, "scheduled_ti": ""}),
    ))
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
