//! `/result/submit`: the TIs' completion callback.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use super::error::{ApiError, ApiJson};
use super::scheduler::MessageResponse;
use super::AppState;
use crate::ti::protocol::ResultCallback;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/result/submit", post(submit_result))
}

/// A TI reports a finished task. Idempotent: the first valid result wins.
#[utoipa::path(post, path = "/result/submit", request_body = ResultCallback,
    responses((status = 200, body = MessageResponse), (status = 400), (status = 403, description = "wrong TI or token"),
              (status = 404, description = "unknown task")))]
pub(super) async fn submit_result(
    State(app): State<AppState>,
    ApiJson(callback): ApiJson<ResultCallback>,
) -> Result<Json<MessageResponse>, ApiError> {
    app.scheduler.accept_result(callback).await?;
    Ok(MessageResponse::ok("result stored"))
}
