//! `/queue/*`: submitting tasks and reading the queue estimates.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson, ApiQuery, ErrorResponse};
use super::{AppState, SUCCESS};
use crate::domain::{check_name, TaskId, TiKind};
use crate::scheduling::{self, deadline_of, SubmitItem, Submitted};
use crate::ti::openai::request_path;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/queue/submit", post(submit_task))
        .route("/queue/submit_batch", post(submit_batch))
        .route("/queue/info", get(queue_info_get).post(queue_info_post))
}

/// Body of `POST /queue/submit`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct SubmitRequest {
    /// The model to run the task on.
    #[schema(min_length = 1)]
    pub model_name: String,
    /// Passed to the TI as it is; must be a JSON object.
    #[schema(value_type = Object)]
    pub task_input: Box<RawValue>,
    /// Features for the predictor (`input_tokens`, `output_tokens`, `hardware`, ...), and
    /// `deadline_ms`: a positive number; the task is refused (429) unless its predicted
    /// wait + execution fits in it.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Optional idempotency key: 1–128 characters of `A-Za-z0-9._:-`.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub task_id: Option<String>,
}

/// Answer of `POST /queue/submit` (empty strings on error).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SubmitResponse {
    /// `success`.
    pub status: String,
    /// The task's id.
    pub task_id: String,
    /// The TI chosen for it; empty while no TI of the model is usable.
    pub scheduled_ti: String,
}

/// One task of `POST /queue/submit_batch`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct BatchItem {
    /// Passed to the TI as it is; must be a JSON object.
    #[schema(value_type = Object)]
    pub task_input: Box<RawValue>,
    /// Features for the predictor, and `deadline_ms` (as in `/queue/submit`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    /// Optional idempotency key: 1–128 characters of `A-Za-z0-9._:-`.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub task_id: Option<String>,
}

/// Body of `POST /queue/submit_batch`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct BatchRequest {
    /// The model to run every task on.
    #[schema(min_length = 1)]
    pub model_name: String,
    /// The tasks, committed all or nothing.
    #[schema(min_items = 1)]
    pub tasks: Vec<BatchItem>,
}

/// One task's answer in a batch.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BatchResult {
    /// Position in the request.
    pub index: usize,
    /// The task's id.
    pub task_id: String,
    /// The TI chosen for it.
    pub scheduled_ti: String,
}

/// Answer of `POST /queue/submit_batch`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct BatchResponse {
    /// `success`.
    pub status: String,
    /// One entry per task, in request order.
    pub results: Vec<BatchResult>,
}

/// Filter of `/queue/info`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(super) struct QueueInfoRequest {
    /// Only this model's TIs; all when absent or empty.
    #[serde(default)]
    pub model_name: Option<String>,
}

/// One TI's queue in `/queue/info`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct QueueView {
    /// The model it serves.
    pub model_name: String,
    /// The TI.
    pub ti_uuid: String,
    /// Expected wait of a new task, ms.
    pub waiting_time_expect: f64,
    /// Its error (standard deviation), ms.
    pub waiting_time_error: f64,
    /// Tasks dispatched to it and not completed (waiting and running).
    pub queue_length: usize,
    /// Tasks it is running (openai: requests in flight; callback: tasks it accepted).
    pub running: usize,
    /// Whether it may get new tasks.
    pub healthy: bool,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Its hardware, if known.
    pub hardware: Option<String>,
    /// `callback` or `openai`.
    pub kind: TiKind,
    /// Requests it runs at once.
    pub max_concurrency: usize,
}

/// Answer of `/queue/info`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct QueueInfoResponse {
    /// `success`.
    pub status: String,
    /// One entry per registered TI.
    pub queues: Vec<QueueView>,
}

fn check_model(model: &str) -> Result<&str, ApiError> {
    let model = model.trim();
    if model.is_empty() {
        return Err(ApiError::BadRequest("model_name must not be empty".into()));
    }
    check_name("model_name", model).map_err(ApiError::BadRequest)?;
    Ok(model)
}

fn check_item(
    task_input: Box<RawValue>,
    metadata: Option<Map<String, Value>>,
    task_id: Option<String>,
    max_depth: usize,
) -> Result<SubmitItem, String> {
    if !task_input.get().starts_with('{') {
        return Err("task_input must be a JSON object".into());
    }
    // A TI's JSON parser has a nesting limit of its own (serde_json's is 128 for the
    // whole submit body); what it would refuse is refused here, before it is accepted.
    let depth = text_depth(task_input.get());
    if depth > max_depth {
        return Err(format!(
            "task_input nests {depth} levels deep; the limit is {max_depth} (server.max_json_depth)"
        ));
    }
    if let Some(m) = &metadata {
        let depth = 1 + m.values().map(value_depth).max().unwrap_or(0);
        if depth > max_depth {
            return Err(format!(
                "metadata nests {depth} levels deep; the limit is {max_depth} (server.max_json_depth)"
            ));
        }
    }
    let task_id = task_id.map(|raw| TaskId::parse_client(&raw)).transpose()?;
    let metadata = metadata.unwrap_or_default();
    let deadline_ms = deadline_of(&metadata)?;
    if metadata.contains_key("path") {
        // Where an OpenAI-compatible TI is sent the task: checked now, not at dispatch.
        request_path(&Map::new(), &metadata)?;
    }
    Ok(SubmitItem {
        task_id,
        task_input,
        metadata,
        deadline_ms,
    })
}

/// How deeply arrays and objects nest in valid JSON text (`{}` is 1, a scalar 0),
/// without building the value.
pub(super) fn text_depth(json: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// How deeply arrays and objects nest in a parsed value (`{}` is 1, a scalar 0). The
/// parser already bounds the recursion (128 levels).
fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn ti_text(s: &Submitted) -> String {
    s.scheduled_ti.map(|t| t.to_string()).unwrap_or_default()
}

/// Submits a task; success means it is committed to the database. Admission control may
/// refuse it (429): `scheduling.max_wait_ms`, `scheduling.max_waiting_tasks`, or its own
/// `metadata.deadline_ms` (a positive number: the predicted wait + execution must fit).
#[utoipa::path(post, path = "/queue/submit", request_body = SubmitRequest,
    responses((status = 200, body = SubmitResponse), (status = 400, description = "invalid body"),
              (status = 429, description = "refused by admission control (code overloaded); nothing stored",
               headers(("Retry-After" = u64, description = "whole seconds until the predicted wait allows it"))),
              (status = 503, description = "no TaskInstance serves the model, or the service is draining (code draining)")))]
pub(super) async fn submit_task(
    State(app): State<AppState>,
    body: Result<ApiJson<SubmitRequest>, ApiError>,
) -> Result<Json<SubmitResponse>, ErrorResponse> {
    let shape = |e: ApiError| e.with(&[("task_id", ""), ("scheduled_ti", "")]);
    let ApiJson(req) = body.map_err(shape)?;
    let model = check_model(&req.model_name).map_err(shape)?;
    let item = check_item(
        req.task_input,
        req.metadata,
        req.task_id,
        app.max_json_depth,
    )
    .map_err(|m| shape(ApiError::BadRequest(m)))?;
    let submitted = app
        .scheduler
        .submit(model, vec![item])
        .await
        .map_err(|e| shape(e.into()))?;
    let first = submitted.into_iter().next().ok_or_else(|| {
        shape(ApiError::Internal(anyhow::anyhow!(
            "submit answered nothing"
        )))
    })?;
    Ok(Json(SubmitResponse {
        status: SUCCESS.into(),
        scheduled_ti: ti_text(&first),
        task_id: first.task_id.to_string(),
    }))
}

/// Submits several tasks of one model, all or nothing, in one transaction. A task refused
/// by admission control refuses the whole batch (429 naming its index).
#[utoipa::path(post, path = "/queue/submit_batch", request_body = BatchRequest,
    responses((status = 200, body = BatchResponse), (status = 400, description = "an invalid item, named by index"),
              (status = 429, description = "a task refused by admission control, named by index (code overloaded); nothing stored",
               headers(("Retry-After" = u64, description = "whole seconds until the predicted wait allows it"))),
              (status = 503, description = "no TaskInstance serves the model, or the service is draining (code draining)")))]
pub(super) async fn submit_batch(
    State(app): State<AppState>,
    body: Result<ApiJson<BatchRequest>, ApiError>,
) -> Result<Json<BatchResponse>, ErrorResponse> {
    let shape = |e: ApiError| e.with(&[]);
    let ApiJson(req) = body.map_err(shape)?;
    let model = check_model(&req.model_name).map_err(shape)?;
    if req.tasks.is_empty() {
        return Err(shape(ApiError::BadRequest(
            "tasks must not be empty".into(),
        )));
    }
    if req.tasks.len() > app.max_batch_tasks {
        return Err(shape(ApiError::BadRequest(format!(
            "tasks has {} entries; the limit is {} per batch (server.max_batch_tasks)",
            req.tasks.len(),
            app.max_batch_tasks
        ))));
    }
    let items = req
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            check_item(t.task_input, t.metadata, t.task_id, app.max_json_depth)
                .map_err(|m| ApiError::BadRequest(format!("tasks[{i}]: {m}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let submitted = app
        .scheduler
        .submit(model, items)
        .await
        .map_err(|e| match e {
            scheduling::Error::Overloaded(refusal) => ApiError::refused(&refusal, true),
            e => e.into(),
        })?;
    Ok(Json(BatchResponse {
        status: SUCCESS.into(),
        results: submitted
            .iter()
            .enumerate()
            .map(|(index, s)| BatchResult {
                index,
                task_id: s.task_id.to_string(),
                scheduled_ti: ti_text(s),
            })
            .collect(),
    }))
}

fn queue_info(app: &AppState, filter: QueueInfoRequest) -> Json<QueueInfoResponse> {
    let model = filter.model_name.filter(|m| !m.is_empty());
    let queues = app
        .scheduler
        .tis()
        .into_iter()
        .filter(|s| s.ti.removed_at.is_none())
        .filter(|s| model.as_deref().is_none_or(|m| m == s.ti.model_name))
        .map(|s| QueueView {
            model_name: s.ti.model_name,
            ti_uuid: s.ti.ti_uuid.to_string(),
            waiting_time_expect: s.wait_ms,
            waiting_time_error: s.wait_error_ms,
            queue_length: s.queue_length,
            running: s.running,
            healthy: s.healthy,
            host: s.ti.host,
            port: s.ti.port,
            hardware: s.ti.hardware,
            kind: s.ti.kind,
            max_concurrency: s.max_concurrency,
        })
        .collect();
    Json(QueueInfoResponse {
        status: SUCCESS.into(),
        queues,
    })
}

/// The live queue estimate of every registered TI (`?model_name=` filters).
#[utoipa::path(get, path = "/queue/info", params(("model_name" = Option<String>, Query, description = "only this model")),
    responses((status = 200, body = QueueInfoResponse)))]
pub(super) async fn queue_info_get(
    State(app): State<AppState>,
    ApiQuery(filter): ApiQuery<QueueInfoRequest>,
) -> Json<QueueInfoResponse> {
    queue_info(&app, filter)
}

/// As `GET /queue/info`, with the filter in a JSON body (an empty body means no filter).
#[utoipa::path(post, path = "/queue/info", request_body = Option<QueueInfoRequest>,
    responses((status = 200, body = QueueInfoResponse), (status = 400, description = "invalid body")))]
pub(super) async fn queue_info_post(
    State(app): State<AppState>,
    super::error::Body(bytes): super::error::Body,
) -> Result<Json<QueueInfoResponse>, ApiError> {
    let body = bytes.trim_ascii();
    let filter = if body.is_empty() || body == b"null" {
        QueueInfoRequest::default()
    } else {
        super::error::parse_json(body)?
    };
    Ok(queue_info(&app, filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_depth_counts_nesting_outside_strings() {
        assert_eq!(text_depth("{}"), 1);
        assert_eq!(text_depth(r#"{"a": [1, {"b": []}]}"#), 4);
        assert_eq!(text_depth(r#"{"a": "[[[{{{", "b": "\\\"[["}"#), 1);
        assert_eq!(value_depth(&serde_json::json!({"a": [[1]]})), 3);
        assert_eq!(value_depth(&serde_json::json!(1)), 0);
    }
}
