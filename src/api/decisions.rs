//! `GET /task/decisions`: why a task went where it did: every decision made
//! for it, with every candidate TI and the estimates it had, from the database.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ApiQuery, ErrorResponse};
use super::{AppState, SUCCESS};
use crate::domain::TaskId;
use crate::store::{DecisionRepo, StoredDecision};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/task/decisions", get(task_decisions))
}

/// Which task.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct DecisionsQuery {
    /// The task's id.
    pub task_id: String,
}

/// One decision.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DecisionView {
    /// Unix seconds.
    pub decided_at: f64,
    /// `submit` or `reroute`.
    pub reason: String,
    /// The strategy that decided.
    pub strategy: String,
    /// The predict mode.
    pub predict_mode: String,
    /// Prediction on the chosen TI, ms.
    pub predicted_ms: f64,
    /// Its error, ms.
    pub predicted_error_ms: f64,
    /// Which predictor gave it.
    pub prediction_source: String,
    /// lookup_table mode found no row and the default chain answered.
    pub lookup_fallback: bool,
    /// The TI chosen.
    pub chosen_ti: String,
    /// Every TI considered: `{ti_uuid, wait_ms, wait_error_ms, queue_length, predicted_ms,
    /// predicted_error_ms, prediction_source, score}`.
    #[schema(value_type = Vec<Object>)]
    pub candidates: Value,
}

impl From<StoredDecision> for DecisionView {
    fn from(d: StoredDecision) -> Self {
        Self {
            decided_at: d.decided_at,
            reason: d.reason,
            strategy: d.strategy,
            predict_mode: d.predict_mode,
            predicted_ms: d.predicted_ms,
            predicted_error_ms: d.predicted_error_ms,
            prediction_source: d.prediction_source,
            lookup_fallback: d.lookup_fallback,
            chosen_ti: d.chosen_ti,
            candidates: d.candidates,
        }
    }
}

/// Answer of `GET /task/decisions`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct DecisionsResponse {
    /// `success`.
    pub status: String,
    /// The task.
    pub task_id: String,
    /// Its decisions, oldest first (none while it waits for a usable TI).
    pub decisions: Vec<DecisionView>,
}

/// Every decision made for a task, with its candidates.
#[utoipa::path(get, path = "/task/decisions", params(("task_id" = String, Query, description = "the task")),
    responses((status = 200, body = DecisionsResponse), (status = 400), (status = 404, description = "unknown or purged task")))]
pub(super) async fn task_decisions(
    State(app): State<AppState>,
    query: Result<ApiQuery<DecisionsQuery>, ApiError>,
) -> Result<Json<DecisionsResponse>, ErrorResponse> {
    let ApiQuery(q) = query.map_err(|e| e.with(&[("task_id", "")]))?;
    let task_id = q.task_id.as_str();
    let shape = |e: ApiError| e.with(&[("task_id", task_id)]);
    let id = TaskId::from_stored(task_id.to_string());
    let read = &app.scheduler.db().read;
    if app
        .scheduler
        .task(&id)
        .await
        .map_err(|e| shape(e.into()))?
        .is_none()
    {
        return Err(shape(ApiError::NotFound(format!(
            "task '{task_id}' not found"
        ))));
    }
    let decisions = DecisionRepo::for_task(read, &id)
        .await
        .map_err(|e| shape(e.into()))?;
    Ok(Json(DecisionsResponse {
        status: SUCCESS.into(),
        task_id: task_id.to_string(),
        decisions: decisions.into_iter().map(DecisionView::from).collect(),
    }))
}
