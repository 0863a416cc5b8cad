//! The HTTP API (docs/API.md): one `router()` per area, merged by [`app`].
//!
//! Handlers are short: they validate the request, call the scheduling core, and shape the
//! answer. Every error is the JSON envelope of [`error::ApiError`]; endpoints that
//! return identifiers keep them (empty, or echoing the caller) in their errors.

mod admin;
mod auth;
mod dashboard;
mod decisions;
mod error;
mod events;
mod front_door;
mod ops;
mod predictor;
mod queue;
mod result;
mod scheduler;
mod stats;
mod task;
mod tasks;
mod ti;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::Instrument;

pub use auth::Admin;
pub use error::{ApiError, ErrorResponse};

use crate::scheduling::Scheduler;

/// What every handler gets: small handles, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The scheduling core.
    pub scheduler: Scheduler,
    /// When set, admin endpoints require `Authorization: Bearer <token>`.
    pub admin_token: Option<Arc<str>>,
    /// Largest accepted body, bytes.
    pub body_limit: usize,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Deepest nesting accepted in a task's `task_input` and `metadata`.
    pub max_json_depth: usize,
    /// Most tasks in one `POST /queue/submit_batch`.
    pub max_batch_tasks: usize,
    /// When non-empty, the front door (`/v1/*`) requires one of these bearer keys.
    pub api_keys: Arc<[Arc<str>]>,
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    let limit = state.body_limit;
    Router::new()
        .merge(scheduler::router())
        .merge(ti::router())
        .merge(queue::router())
        .merge(task::router())
        .merge(decisions::router())
        .merge(stats::router())
        .merge(events::router())
        .merge(dashboard::router())
        .merge(tasks::router())
        .merge(result::router())
        .merge(predictor::router())
        .merge(ops::router())
        .merge(front_door::router())
        .merge(admin::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(observe_request))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A span per request with the matched route, and the latency histogram.
async fn observe_request(req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().clone();
    let span = tracing::info_span!("request", %method, path = %path);
    let started = Instant::now();
    let response = next.run(req).instrument(span).await;
    metrics::histogram!(
        "ti_scheduler_http_request_duration_seconds",
        "path" => path,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// The `status` of every success body.
const SUCCESS: &str = "success";

pub use ops::ApiDoc;
