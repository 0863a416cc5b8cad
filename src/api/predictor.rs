//! `/predictor/lookup_table`: importing the lookup table of `lookup_table` mode.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiQuery, Body};
use super::{Admin, AppState, SUCCESS};
use crate::predictor::parse_table;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/predictor/lookup_table", post(import_lookup_table))
}

/// Options of the import.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ImportOptions {
    /// Add to the table instead of replacing it.
    #[serde(default)]
    pub append: bool,
}

/// Answer of the import.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ImportResponse {
    /// `success`.
    pub status: String,
    /// What happened.
    pub message: String,
    /// Rows in the table now.
    pub rows: usize,
}

/// Replaces the lookup table atomically (`?append=true` adds to it).
#[utoipa::path(post, path = "/predictor/lookup_table", params(ImportOptions),
    request_body(description = "CSV (text/csv) or SwarmPilot JSON (application/json)",
        content((String = "text/csv"), (Vec<Object> = "application/json"))),
    responses((status = 200, body = ImportResponse), (status = 400, description = "malformed table, naming line and column"),
              (status = 401)))]
pub(super) async fn import_lookup_table(
    State(app): State<AppState>,
    _admin: Admin,
    headers: HeaderMap,
    options: Result<ApiQuery<ImportOptions>, ApiError>,
    body: Result<Body, ApiError>,
) -> Result<Json<ImportResponse>, ApiError> {
    let ApiQuery(options) = options?;
    let Body(bytes) = body?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("the table is not UTF-8 text: {e}")))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let rows = parse_table(content_type, text).map_err(|e| ApiError::BadRequest(e.0))?;
    let imported = rows.len();
    let total = app.scheduler.load_lookup(rows, options.append).await?;
    Ok(Json(ImportResponse {
        status: SUCCESS.into(),
        message: format!("imported {imported} rows"),
        rows: total,
    }))
}
