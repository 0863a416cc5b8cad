//! `/ti/*`: registering, removing and listing Task Instances.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson, ErrorResponse};
use super::{Admin, AppState, SUCCESS};
use crate::domain::{TiKind, TiUuid};
use crate::scheduling::Registration;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/ti/register", post(register_ti))
        .route("/ti/remove", post(remove_ti))
        .route("/ti/list", get(list_tis))
}

/// Body of `POST /ti/register`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct RegisterRequest {
    /// Host of the TI (address or name).
    #[schema(min_length = 1)]
    pub host: String,
    /// Port of the TI, 1..=65535.
    #[schema(minimum = 1, maximum = 65535)]
    #[serde(deserialize_with = "integer")]
    pub port: i64,
    /// The model it serves: for a callback TI it must agree with its `GET /info` (and is
    /// used when that names none); for an OpenAI-compatible TI it must be one of the ids of
    /// its `GET /v1/models` (the first is taken when omitted).
    #[serde(default)]
    pub model_name: Option<String>,
    /// `callback` (default: our protocol) or `openai` (an OpenAI-compatible server).
    #[serde(default)]
    #[schema(value_type = Option<TiKind>)]
    pub kind: Option<String>,
    /// Its hardware (e.g. `A100`); overrides what the TI reports.
    #[serde(default)]
    pub hardware: Option<String>,
    /// Requests in flight to it at once, 1..=1024 (default 8 for `openai`; for a callback
    /// TI, `ti.max_inflight_dispatches`).
    #[serde(default, deserialize_with = "optional_integer")]
    #[schema(minimum = 1, maximum = 1024)]
    pub max_concurrency: Option<i64>,
}

/// A JSON integer, written `8` or `8.0` (JSON Schema's `integer` takes both).
fn integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    n.as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        })
        .ok_or_else(|| serde::de::Error::custom(format!("expected an integer, got {n}")))
}

/// [`integer`], or null.
fn optional_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    struct Wrapped(#[serde(deserialize_with = "integer")] i64);
    Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(n)| n))
}

/// Answer of `POST /ti/register` (`ti_uuid` is empty on error).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RegisterResponse {
    /// `success`.
    pub status: String,
    /// What happened.
    pub message: String,
    /// The TI's id.
    pub ti_uuid: String,
}

/// Body of `POST /ti/remove`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct RemoveRequest {
    /// The TI's id (a UUID).
    #[schema(
        min_length = 1,
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub ti_uuid: String,
}

/// Answer of `POST /ti/remove` (echoes the given id, on error too).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct RemoveResponse {
    /// `success`.
    pub status: String,
    /// What happened.
    pub message: String,
    /// The id given.
    pub ti_uuid: String,
}

/// One TI in `GET /ti/list`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TiView {
    /// Its id.
    pub ti_uuid: String,
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The model it serves.
    pub model_name: String,
    /// Its hardware, if it reported one.
    pub hardware: Option<String>,
    /// Whether it may get new tasks.
    pub healthy: bool,
    /// Tasks dispatched to it and not completed (waiting and running).
    pub queue_length: usize,
    /// `callback` or `openai`.
    pub kind: TiKind,
    /// Requests it runs at once.
    pub max_concurrency: usize,
    /// Requests in flight to it (callback: tasks it accepted).
    pub running: usize,
    /// Unix seconds.
    pub registered_at: f64,
    /// Unix seconds; null while registered.
    pub removed_at: Option<f64>,
}

/// Answer of `GET /ti/list`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TiListResponse {
    /// `success`.
    pub status: String,
    /// Every TI, removed ones included.
    pub tis: Vec<TiView>,
}

/// A host as it is stored: a name in lower case without its trailing dot, so that
/// `LOCALHOST`, `localhost.` and `localhost` are one TI; an address as it was given.
fn normalize_host(raw: &str) -> String {
    let host = raw.trim();
    if host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok()
    {
        return host.to_string();
    }
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// Registers a TI after checking its `GET /health` and `GET /info`.
#[utoipa::path(post, path = "/ti/register", request_body = RegisterRequest,
    responses((status = 200, body = RegisterResponse), (status = 400, description = "bad host, port or model_name"),
              (status = 401), (status = 502, description = "TI unreachable or unhealthy")))]
pub(super) async fn register_ti(
    State(app): State<AppState>,
    admin: Result<Admin, ApiError>,
    body: Result<ApiJson<RegisterRequest>, ApiError>,
) -> Result<Json<RegisterResponse>, ErrorResponse> {
    let shape = |e: ApiError| e.with(&[("ti_uuid", "")]);
    admin.map_err(shape)?;
    let ApiJson(req) = body.map_err(shape)?;
    let host = normalize_host(&req.host);
    let host = host.as_str();
    if host.is_empty() {
        return Err(shape(ApiError::BadRequest("host must not be empty".into())));
    }
    let port = u16::try_from(req.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            shape(ApiError::BadRequest(format!(
                "port must be in 1..=65535, got {}",
                req.port
            )))
        })?;
    let kind = match req.kind.as_deref() {
        None => TiKind::Callback,
        Some(name) => TiKind::parse(name).map_err(|e| shape(ApiError::BadRequest(e)))?,
    };
    let max_concurrency = req
        .max_concurrency
        .map(|c| {
            u32::try_from(c)
                .ok()
                .filter(|c| (1..=1024).contains(c))
                .ok_or_else(|| {
                    shape(ApiError::BadRequest(format!(
                        "max_concurrency must be in 1..=1024, got {c}"
                    )))
                })
        })
        .transpose()?;
    let non_empty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
    };
    let (model, hardware) = (non_empty(&req.model_name), non_empty(&req.hardware));
    let id = app
        .scheduler
        .register(Registration {
            host,
            port,
            model_name: model.as_deref(),
            kind,
            hardware: hardware.as_deref(),
            max_concurrency,
        })
        .await
        .map_err(|e| shape(e.into()))?;
    Ok(Json(RegisterResponse {
        status: SUCCESS.into(),
        message: "TaskInstance registered successfully".into(),
        ti_uuid: id.to_string(),
    }))
}

/// Removes a TI: no new tasks go to it; what it already accepted completes.
#[utoipa::path(post, path = "/ti/remove", request_body = RemoveRequest,
    responses((status = 200, body = RemoveResponse), (status = 400, description = "Invalid UUID format"),
              (status = 401), (status = 404, description = "TaskInstance not found")))]
pub(super) async fn remove_ti(
    State(app): State<AppState>,
    admin: Result<Admin, ApiError>,
    body: Result<ApiJson<RemoveRequest>, ApiError>,
) -> Result<Json<RemoveResponse>, ErrorResponse> {
    admin.map_err(|e| e.with(&[("ti_uuid", "")]))?;
    let ApiJson(req) = body.map_err(|e| e.with(&[("ti_uuid", "")]))?;
    let given = req.ti_uuid.as_str();
    let shape = |e: ApiError| e.with(&[("ti_uuid", given)]);
    let id: TiUuid = given
        .parse()
        .map_err(|_| shape(ApiError::BadRequest("Invalid UUID format".into())))?;
    app.scheduler
        .remove(id)
        .await
        .map_err(|e| shape(e.into()))?;
    Ok(Json(RemoveResponse {
        status: SUCCESS.into(),
        message: "TaskInstance removed successfully".into(),
        ti_uuid: given.to_string(),
    }))
}

/// Every TI ever registered, removed ones included.
#[utoipa::path(get, path = "/ti/list", responses((status = 200, body = TiListResponse)))]
pub(super) async fn list_tis(State(app): State<AppState>) -> Json<TiListResponse> {
    let tis = app
        .scheduler
        .tis()
        .into_iter()
        .map(|s| TiView {
            ti_uuid: s.ti.ti_uuid.to_string(),
            host: s.ti.host,
            port: s.ti.port,
            model_name: s.ti.model_name,
            hardware: s.ti.hardware,
            healthy: s.healthy,
            queue_length: s.queue_length,
            kind: s.ti.kind,
            max_concurrency: s.max_concurrency,
            running: s.running,
            registered_at: s.ti.registered_at,
            removed_at: s.ti.removed_at,
        })
        .collect();
    Json(TiListResponse {
        status: SUCCESS.into(),
        tis,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn host_names_are_lower_case_without_a_trailing_dot_and_addresses_stay() {
        assert_eq!(normalize_host(" LocalHost. "), "localhost");
        assert_eq!(normalize_host("ti-1.Example.ORG"), "ti-1.example.org");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("."), "");
    }
}
