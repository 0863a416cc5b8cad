//! `/admin/*`: operating the service. `POST /admin/drain` stops it taking new tasks before a
//! shutdown (as SIGTERM does), while what it has accepted finishes.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::{Admin, AppState, SUCCESS};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/admin/drain", post(drain))
}

/// Answer of `POST /admin/drain`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DrainResponse {
    /// `success`.
    pub status: String,
    /// What draining means, and whether this call started it.
    pub message: String,
    /// Always true: a drain is not undone.
    pub draining: bool,
    /// Tasks stored and not completed now (running, waiting on a TI, or waiting for one).
    pub unfinished: u64,
}

/// Drains the service: from now on a submit that would create a task answers 503 (code
/// `draining`) and `/ready` answers 503, so a load balancer moves away; tasks already
/// accepted are dispatched and their results stored as usual. Idempotent. SIGTERM and
/// Ctrl-C do the same, then stop once no task is unfinished (or after
/// `server.shutdown_grace_ms`).
#[utoipa::path(post, path = "/admin/drain",
    responses((status = 200, body = DrainResponse), (status = 401, description = "missing or wrong admin token")))]
pub(super) async fn drain(
    _: Admin,
    State(app): State<AppState>,
) -> Result<Json<DrainResponse>, ApiError> {
    let started = app.scheduler.drain();
    let unfinished = app.scheduler.unfinished_tasks().await?;
    let message = format!(
        "{}: new tasks are refused (503) and /ready answers 503; {unfinished} task(s) unfinished",
        if started {
            "draining"
        } else {
            "already draining"
        }
    );
    Ok(Json(DrainResponse {
        status: SUCCESS.into(),
        message,
        draining: true,
        unfinished,
    }))
}
