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

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::Instrument;

pub use auth::Admin;
pub use error::{ApiError, ErrorResponse};

use crate::scheduling::Scheduler;
use crate::telemetry::{self, Handles};

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
    /// The front door's answers counted, by model and status.
    pub openai_requests: Arc<Handles<u16, Counter>>,
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
        .layer(middleware::from_fn_with_state(
            Arc::new(Handles::default()),
            observe_request,
        ))
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The header that carries a request's id, both ways.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A span per request (route, method and request id), the latency histogram, the access
/// log line (debug, target [`telemetry::ACCESS_LOG`]) and the `x-request-id` answer header.
async fn observe_request(
    State(durations): State<Arc<Handles<u16, Histogram>>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_sane_request_id(id))
        .map_or_else(new_request_id, str::to_string);
    // Only the access log wants the path as sent (the route is in the span).
    let uri = tracing::enabled!(target: telemetry::ACCESS_LOG, tracing::Level::DEBUG)
        .then(|| req.uri().path().to_string());
    let span = tracing::info_span!("request", %method, path = %route, %request_id);
    let started = Instant::now();
    let mut response = next.run(req).instrument(span).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    durations
        .get(&route, status, || {
            metrics::histogram!(
                telemetry::HTTP_REQUEST_DURATION,
                "path" => route.clone(),
                "status" => status.to_string()
            )
        })
        .record(elapsed.as_secs_f64());
    if let Some(uri) = uri {
        tracing::debug!(
            target: telemetry::ACCESS_LOG,
            %request_id,
            %method,
            path = %uri,
            status,
            latency_ms = elapsed.as_micros() as f64 / 1000.0,
            "request"
        );
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID: usize = 128;

/// A client's `x-request-id` is kept if it is 1 to [`MAX_REQUEST_ID`] characters of
/// letters, digits and `-_.:/+=@` (a UUID, a trace id); otherwise the service makes one.
fn is_sane_request_id(id: &str) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// A new request id: 16 random hex digits.
fn new_request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The `status` of every success body.
const SUCCESS: &str = "success";

pub use ops::ApiDoc;
