//! `/scheduler/*`: the strategy and the predict mode.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson};
use super::{Admin, AppState, SUCCESS};
use crate::domain::{PredictMode, StrategyKind};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/scheduler/set", post(set_strategy))
        .route("/scheduler/predict_mode", post(set_predict_mode))
        .route("/scheduler/info", get(scheduler_info))
}

/// Body of `POST /scheduler/set`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct SetStrategyRequest {
    /// `shortest_queue`, `round_robin`, `weighted` or `probabilistic`.
    #[schema(value_type = StrategyKind)]
    pub name: String,
}

/// Body of `POST /scheduler/predict_mode`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct PredictModeRequest {
    /// `default` or `lookup_table`.
    #[schema(value_type = PredictMode)]
    pub mode: String,
}

/// `{status, message}`: the answer of endpoints that only confirm.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct MessageResponse {
    /// `success`.
    pub status: String,
    /// `OK` or a description.
    pub message: String,
}

impl MessageResponse {
    pub(super) fn ok(message: impl Into<String>) -> Json<Self> {
        Json(Self {
            status: SUCCESS.into(),
            message: message.into(),
        })
    }
}

/// Answer of `GET /scheduler/info`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct SchedulerInfo {
    /// `success`.
    pub status: String,
    /// The current strategy.
    #[schema(value_type = StrategyKind)]
    pub strategy: String,
    /// The current predict mode.
    #[schema(value_type = PredictMode)]
    pub predict_mode: String,
    /// Rows in the lookup table.
    pub lookup_table_rows: usize,
    /// Every strategy name.
    #[schema(value_type = Vec<StrategyKind>)]
    pub strategies: Vec<String>,
    /// Every predict mode name.
    #[schema(value_type = Vec<PredictMode>)]
    pub predict_modes: Vec<String>,
}

/// Sets the scheduling strategy; takes effect for the next submit and survives restarts.
#[utoipa::path(post, path = "/scheduler/set", request_body = SetStrategyRequest,
    responses((status = 200, body = MessageResponse), (status = 400, description = "unknown strategy"), (status = 401)))]
pub(super) async fn set_strategy(
    State(app): State<AppState>,
    _admin: Admin,
    body: Result<ApiJson<SetStrategyRequest>, ApiError>,
) -> Result<Json<MessageResponse>, ApiError> {
    let ApiJson(req) = body?;
    let kind = StrategyKind::parse(&req.name).map_err(ApiError::BadRequest)?;
    app.scheduler.set_strategy(kind).await?;
    Ok(MessageResponse::ok("OK"))
}

/// Sets the predict mode; `lookup_table` needs a loaded table (409 otherwise).
#[utoipa::path(post, path = "/scheduler/predict_mode", request_body = PredictModeRequest,
    responses((status = 200, body = MessageResponse), (status = 400, description = "unknown mode"),
              (status = 401), (status = 409, description = "no lookup table loaded")))]
pub(super) async fn set_predict_mode(
    State(app): State<AppState>,
    _admin: Admin,
    body: Result<ApiJson<PredictModeRequest>, ApiError>,
) -> Result<Json<MessageResponse>, ApiError> {
    let ApiJson(req) = body?;
    let mode = PredictMode::parse(&req.mode).map_err(ApiError::BadRequest)?;
    app.scheduler.set_predict_mode(mode).await?;
    Ok(MessageResponse::ok("OK"))
}

/// The current strategy and predict mode, and what can be chosen.
#[utoipa::path(get, path = "/scheduler/info", responses((status = 200, body = SchedulerInfo)))]
pub(super) async fn scheduler_info(State(app): State<AppState>) -> Json<SchedulerInfo> {
    let (strategy, mode, rows) = app.scheduler.settings();
    Json(SchedulerInfo {
        status: SUCCESS.into(),
        strategy: strategy.as_str().into(),
        predict_mode: mode.as_str().into(),
        lookup_table_rows: rows,
        strategies: StrategyKind::ALL.map(|s| s.as_str().to_string()).to_vec(),
        predict_modes: PredictMode::ALL.map(|m| m.as_str().to_string()).to_vec(),
    })
}
