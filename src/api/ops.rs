//! Operations: liveness, readiness, Prometheus metrics and the OpenAPI document.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{Object, ObjectBuilder, Ref, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, RefOr};
use utoipa::{Modify, OpenApi};

use super::error::ApiError;
use super::{AppState, SUCCESS};
use crate::scheduling::TiSnapshot;
use crate::store::{Reader, TaskRepo};
use crate::telemetry::{
    GaugeText, TASKS_WAITING_FOR_TI, TI_EXPECTED_WAIT, TI_HEALTHY, TI_QUEUE_LENGTH, TI_WAIT_ERROR,
};

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
        super::admin::drain,
        health,
        ready,
        metrics_text,
        openapi,
    ),
    modifiers(&Conventions),
    tags(
        (name = "scheduler", description = "Strategy and predict mode"),
        (name = "ti", description = "Task Instances: registration and listing"),
        (name = "queue", description = "Submitting tasks and queue estimates"),
        (name = "task", description = "One task's status and result"),
        (name = "tasks", description = "The task history"),
        (name = "result", description = "The TIs' result callback"),
        (name = "predictor", description = "The lookup table"),
        (name = "operations", description = "Liveness, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Name of the error envelope's schema.
const ERROR_SCHEMA: &str = "ErrorEnvelope";

/// Name of the admin token's security scheme.
const ADMIN_SCHEME: &str = "admin_token";

/// What the handlers' annotations leave to the whole document: the error envelope on
/// every error response (and the 405, 413 and 500 any route may answer), the admin token
/// on the operations that answer 401, and one tag per area instead of the module path.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components
            .schemas
            .insert(ERROR_SCHEMA.into(), RefOr::T(error_envelope().into()));
        components.add_security_scheme(
            ADMIN_SCHEME,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let area = area_of(path);
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.tags = Some(vec![area.to_string()]);
                document_errors(op);
            }
        }
    }
}

/// The error envelope (docs/API.md, Conventions); endpoints may add fields (echoes of the request).
fn error_envelope() -> Object {
    ObjectBuilder::new()
        .description(Some(
            "Every error: status \"error\" and a message; some endpoints echo request \
             fields beside them (task_id, ti_uuid).",
        ))
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["error"])),
        )
        .required("status")
        .property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1)),
        )
        .required("message")
        .property(
            "code",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["overloaded", "draining"]))
                .description(Some(
                    "Where the HTTP status alone is ambiguous: overloaded (429, refused by \
                     admission control; see Retry-After), draining (503, the service takes \
                     no new task; go elsewhere).",
                )),
        )
        .build()
}

/// The tag of a path: its first segment, or `operations` for the service's own routes.
fn area_of(path: &str) -> &str {
    match path.trim_start_matches('/').split('/').next() {
        Some(a @ ("scheduler" | "ti" | "queue" | "task" | "tasks" | "result" | "predictor")) => a,
        _ => "operations",
    }
}

/// Adds the responses every route may give, puts the envelope on every error response,
/// and the admin token on operations that answer 401.
fn document_errors(op: &mut Operation) {
    let responses = &mut op.responses.responses;
    let mut add = |code: &str, description: &str| {
        responses
            .entry(code.into())
            .or_insert_with(|| RefOr::T(Response::new(description)));
    };
    add("405", "method not allowed on this route");
    add("500", "internal error (the cause is logged, not shown)");
    if op.request_body.is_some() {
        add("413", "request body larger than server.body_limit_bytes");
    }
    let mut admin = false;
    for (code, response) in op.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if !code.starts_with(['4', '5']) {
            continue;
        }
        admin |= code == "401";
        if response.description.is_empty() {
            response.description = match code.as_str() {
                "400" => "invalid request",
                "401" => "missing or wrong admin token",
                "404" => "not found",
                "503" => "unavailable",
                _ => "error",
            }
            .into();
        }
        response.content.insert(
            "application/json".into(),
            Content::new(Some(Ref::from_schema_name(ERROR_SCHEMA))),
        );
    }
    if admin {
        op.security = Some(vec![SecurityRequirement::new(
            ADMIN_SCHEME,
            Vec::<String>::new(),
        )]);
    }
}

/// The process is alive.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "alive")))]
pub(super) async fn health() -> Json<Value> {
    Json(json!({"status": SUCCESS, "message": "alive"}))
}

/// The database is open and migrated, was not full at the last write, and the service is
/// not draining.
#[utoipa::path(get, path = "/ready", responses((status = 200, description = "ready"), (status = 503, description = "not ready, or draining (code draining)")))]
pub(super) async fn ready(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    if app.scheduler.is_draining() {
        return Err(ApiError::Draining(
            "draining: the service is stopping and accepts no new tasks".into(),
        ));
    }
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
    // On PostgreSQL a serving node holds the leader lease (a standby answers 503).
    if matches!(app.scheduler.db().read, Reader::Postgres(_)) {
        return Ok(Json(
            json!({"status": SUCCESS, "message": "ready", "role": "leader"}),
        ));
    }
    Ok(Json(json!({"status": SUCCESS, "message": "ready"})))
}

/// One per-TI gauge's value.
type PerTi = fn(&TiSnapshot) -> f64;

/// Prometheus text format: the recorder's families, then those written from the current
/// state (per registered TI, and the tasks waiting for a TI per model), so that a removed
/// TI's gauges go with it.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub(super) async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    let mut text = app.metrics.render();
    let tis: Vec<TiSnapshot> = app
        .scheduler
        .tis()
        .into_iter()
        .filter(|t| t.ti.removed_at.is_none())
        .collect();
    let per_ti: [(&'static str, PerTi); 4] = [
        (TI_QUEUE_LENGTH, |t| t.queue_length as f64),
        (TI_EXPECTED_WAIT, |t| t.wait_ms / 1000.0),
        (TI_WAIT_ERROR, |t| t.wait_error_ms / 1000.0),
        (TI_HEALTHY, |t| f64::from(u8::from(t.healthy))),
    ];
    for (name, value) in per_ti {
        let mut gauge = GaugeText::start(&mut text, name);
        for t in &tis {
            let (ti, address) = (
                t.ti.ti_uuid.to_string(),
                format!("{}:{}", t.ti.host, t.ti.port),
            );
            let labels = [
                ("ti", &*ti),
                ("model", &t.ti.model_name),
                ("address", &address),
            ];
            gauge.sample(&labels, value(t));
        }
    }
    match app.scheduler.waiting_for_ti().await {
        Ok(stored) => {
            // Every model with a registered TI, 0 when none of its tasks waits.
            let mut waiting: BTreeMap<&str, i64> =
                tis.iter().map(|t| (t.ti.model_name.as_str(), 0)).collect();
            waiting.extend(stored.iter().map(|(m, n)| (m.as_str(), *n)));
            let mut gauge = GaugeText::start(&mut text, TASKS_WAITING_FOR_TI);
            for (model, n) in waiting {
                gauge.sample(&[("model", model)], n as f64);
            }
        }
        Err(e) => tracing::warn!(error = ?e, "counting the tasks waiting for a TI failed"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub(super) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
