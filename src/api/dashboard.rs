//! `GET /`: the dashboard, one HTML page with its script and styles inline,
//! compiled into the binary: it makes no request outside the service and works offline.

use axum::response::Html;
use axum::routing::get;
use axum::Router;

use super::AppState;

/// The page.
const PAGE: &str = include_str!("dashboard.html");

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/", get(dashboard))
}

/// The dashboard page.
#[utoipa::path(get, path = "/", responses((status = 200, content_type = "text/html", description = "the dashboard")))]
pub(super) async fn dashboard() -> Html<&'static str> {
    Html(PAGE)
}
