//! `/task/query`: a task's status and result.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson, ApiQuery, ErrorResponse};
use super::{AppState, SUCCESS};
use crate::domain::{Outcome, TaskId, TaskStatus};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/task/query", get(query_task_get).post(query_task_post))
}

/// Which task, and how long to wait for it to complete.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct TaskQuery {
    /// The id `/queue/submit` returned.
    #[schema(min_length = 1)]
    pub task_id: String,
    /// Long-poll: when the task is not completed, answer once it is or after this many
    /// ms (0..=60000; default 0, answer at once).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 60000)]
    pub wait_ms: Option<f64>,
}

/// Longest long-poll, ms.
const MAX_WAIT_MS: f64 = 60_000.0;

/// Answer of `/task/query`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TaskView {
    /// `success`.
    pub status: String,
    /// The task's id.
    pub task_id: String,
    /// `queued`, `scheduled` or `completed`.
    #[schema(value_type = TaskStatus)]
    pub task_status: String,
    /// Once completed: `succeeded`, or `failed` (then `result` holds `{"error": ...}`
    /// until it expires); null before.
    #[schema(value_type = Option<Outcome>)]
    pub outcome: Option<String>,
    /// The TI currently chosen for it; empty while none is.
    pub scheduled_ti: String,
    /// Unix seconds, millisecond precision.
    pub submit_time: f64,
    /// Null until completed; `{"error": ...}` when it failed; null again once expired.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// The model asked for.
    pub model_name: String,
    /// Unix seconds, once completed.
    pub completion_time: Option<f64>,
    /// As reported by the TI, ms.
    pub execution_time: Option<f64>,
    /// True once the result was cleared by the TTL.
    pub result_expired: bool,
    /// The TI whose result is stored, once completed: after a re-route it may be the TI
    /// the task was moved away from (the first result wins), not `scheduled_ti`.
    pub result_ti: Option<String>,
    /// `usage.prompt_tokens` of an OpenAI-compatible TI's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<i64>,
    /// `usage.completion_tokens` of an OpenAI-compatible TI's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<i64>,
    /// A streamed front-door request's time from its arrival to its first text chunk, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
}

async fn query(app: &AppState, q: &TaskQuery) -> Result<Json<TaskView>, ErrorResponse> {
    let task_id = q.task_id.as_str();
    let shape = |e: ApiError| e.with(&[("task_id", task_id)]);
    let not_found = || shape(ApiError::NotFound(format!("task '{task_id}' not found")));
    if task_id.is_empty() {
        return Err(shape(ApiError::BadRequest(
            "task_id must not be empty".into(),
        )));
    }
    let wait_ms = q.wait_ms.unwrap_or(0.0);
    if !(0.0..=MAX_WAIT_MS).contains(&wait_ms) {
        return Err(shape(ApiError::BadRequest(format!(
            "wait_ms must be in 0..=60000, got {wait_ms}"
        ))));
    }
    let task = app
        .scheduler
        .task_when_completed(
            &TaskId::from_stored(task_id.to_string()),
            std::time::Duration::from_secs_f64(wait_ms / 1000.0),
        )
        .await
        .map_err(|e| shape(e.into()))?
        .ok_or_else(not_found)?;
    Ok(Json(TaskView {
        status: SUCCESS.into(),
        task_id: task.task_id.to_string(),
        task_status: task.status.as_str().into(),
        outcome: task.outcome.map(|o| o.as_str().into()),
        scheduled_ti: task.ti_uuid.map(|t| t.to_string()).unwrap_or_default(),
        submit_time: task.submit_time,
        result: task.result,
        model_name: task.model_name,
        completion_time: task.completion_time,
        execution_time: task.execution_time_ms,
        result_expired: task.result_expired,
        result_ti: task.result_ti.map(|t| t.to_string()),
        prompt_tokens: task.prompt_tokens,
        completion_tokens: task.completion_tokens,
        ttft_ms: task.ttft_ms,
    }))
}

/// A task's status and result (`?task_id=`).
#[utoipa::path(get, path = "/task/query", params(("task_id" = String, Query, min_length = 1, description = "the task"),
    ("wait_ms" = Option<f64>, Query, minimum = 0, maximum = 60000, description = "long-poll: wait up to this many ms (0..=60000) for the task to complete")),
    responses((status = 200, body = TaskView), (status = 400), (status = 404, description = "unknown or purged task")))]
pub(super) async fn query_task_get(
    State(app): State<AppState>,
    query_params: Result<ApiQuery<TaskQuery>, ApiError>,
) -> Result<Json<TaskView>, ErrorResponse> {
    let ApiQuery(q) = query_params.map_err(|e| e.with(&[("task_id", "")]))?;
    query(&app, &q).await
}

/// As `GET /task/query`, with `{task_id}` in a JSON body.
#[utoipa::path(post, path = "/task/query", request_body = TaskQuery,
    responses((status = 200, body = TaskView), (status = 400), (status = 404, description = "unknown or purged task")))]
pub(super) async fn query_task_post(
    State(app): State<AppState>,
    body: Result<ApiJson<TaskQuery>, ApiError>,
) -> Result<Json<TaskView>, ErrorResponse> {
    let ApiJson(q) = body.map_err(|e| e.with(&[("task_id", "")]))?;
    query(&app, &q).await
}
