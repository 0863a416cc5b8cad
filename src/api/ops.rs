//! Operations: liveness, readiness, Prometheus metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::OpenApi;

use super::error::ApiError;
use super::{AppState, SUCCESS};
use crate::store::TaskRepo;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
}

/// The OpenAPI document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ti-scheduler",
        description = "Central scheduler for ML inference Task Instances"
    ),
    paths(
        super::scheduler::set_strategy,
        super::scheduler::set_predict_mode,
        super::scheduler::scheduler_info,
        super::ti::register_ti,
        super::ti::remove_ti,
        super::ti::list_tis,
        super::queue::submit_task,
        super::queue::submit_batch,
        super::queue::queue_info_get,
        super::queue::queue_info_post,
        super::task::query_task_get,
        super::task::query_task_post,
        super::tasks::list_tasks,
        super::decisions::task_decisions,
        super::stats::stats,
        super::events::events,
        super::dashboard::dashboard,
        super::result::submit_result,
        super::predictor::import_lookup_table,
        health,
        ready,
        metrics_text,
        openapi,
    )
)]
pub struct ApiDoc;

/// The process is alive.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "alive")))]
pub(super) async fn health() -> Json<Value> {
    Json(json!({"status": SUCCESS, "message": "alive"}))
}

/// The database is open and migrated, and was not full at the last write.
#[utoipa::path(get, path = "/ready", responses((status = 200, description = "ready"), (status = 503, description = "not ready")))]
pub(super) async fn ready(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    if app.scheduler.db().writer.is_full() {
        return Err(ApiError::Unavailable(
            "database full: the last write found no space left (disk, or database.max_size_mb); \
             ready again once a write succeeds"
                .into(),
        ));
    }
    TaskRepo::probe(&app.scheduler.db().read)
        .await
        .map_err(|e| {
            tracing::warn!(error = ?e, "readiness check failed");
            ApiError::Unavailable("database not ready".into())
        })?;
    Ok(Json(json!({"status": SUCCESS, "message": "ready"})))
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(super) async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    for ti in app.scheduler.tis() {
        if ti.ti.removed_at.is_some() {
            continue;
        }
        let labels = [
            ("ti_uuid", ti.ti.ti_uuid.to_string()),
            ("model_name", ti.ti.model_name.clone()),
        ];
        metrics::gauge!("ti_scheduler_ti_queue_length", &labels).set(ti.queue_length as f64);
        metrics::gauge!("ti_scheduler_ti_expected_wait_ms", &labels).set(ti.wait_ms);
        metrics::gauge!("ti_scheduler_ti_healthy", &labels).set(f64::from(u8::from(ti.healthy)));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub(super) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
