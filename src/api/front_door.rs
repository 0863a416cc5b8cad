//! The OpenAI front door (docs/API.md, The OpenAI front door): `GET /v1/models`, `POST /v1/chat/completions` and
//! `POST /v1/completions`, so that any OpenAI client can use the scheduler as its base
//! URL. Each request is a task (`scheduling/proxy.rs`); the client gets the TI's answer
//! unchanged, streamed when it asked, with the task's id in `x-task-id`. This surface's
//! own errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and
//! its optional API keys (`server.api_keys`) are separate from the admin token.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use super::auth::bearer_token;
use super::queue::text_depth;
use super::AppState;
use crate::scheduling::{Answer, Error, ProxyRequest, SHUTTING_DOWN};
use crate::telemetry;
use crate::ti::openai::RequestFields;

/// The front door's routes.
pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
}

/// The header that names a front-door request's task.
const TASK_ID_HEADER: &str = "x-task-id";

/// An error of the front door, in OpenAI's shape.
#[derive(Debug)]
pub(super) struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    /// A 429's `Retry-After`, whole seconds.
    retry_after_secs: Option<u64>,
}

impl OpenAiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
            retry_after_secs: None,
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "service_unavailable",
            code: Some("no_usable_instance"),
            param: None,
            retry_after_secs: None,
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            code: None,
            param: None,
            retry_after_secs: None,
        }
    }
}

impl From<Error> for OpenAiError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(message) => Self {
                status: StatusCode::NOT_FOUND,
                message,
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                param: Some("model"),
                retry_after_secs: None,
            },
            Error::NoInstance(message) => Self::unavailable(message),
            Error::Draining => Self {
                code: Some("draining"),
                ..Self::unavailable(Error::Draining.to_string())
            },
            Error::Overloaded(refusal) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: refusal.to_string(),
                kind: "rate_limit_error",
                code: Some("overloaded"),
                param: None,
                retry_after_secs: Some(refusal.retry_after.as_secs().max(1)),
            },
            Error::Invalid(message) => Self::invalid(message, None),
            Error::Store(e) => {
                tracing::error!(error = ?e, "front door: database error");
                Self::internal("internal error")
            }
            other => Self::internal(other.to_string()),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Proof that the request may use the front door: with `server.api_keys` set, it carries
/// `Authorization: Bearer <one of them>`.
#[derive(Debug, Clone, Copy)]
pub(super) struct ApiKey;

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, OpenAiError> {
        if app.api_keys.is_empty() {
            return Ok(Self);
        }
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        let Some(given) = given else {
            return Err(unauthorized(
                "You didn't provide an API key: send Authorization: Bearer <key>",
            ));
        };
        // Every key is compared, so the time taken does not say which one nearly matched.
        let matched = app.api_keys.iter().fold(false, |found, key| {
            found | bool::from(given.as_bytes().ct_eq(key.as_bytes()))
        });
        if matched {
            Ok(Self)
        } else {
            Err(unauthorized("Incorrect API key provided"))
        }
    }
}

fn unauthorized(message: &str) -> OpenAiError {
    OpenAiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_string(),
        kind: "invalid_request_error",
        code: Some("invalid_api_key"),
        param: None,
        retry_after_secs: None,
    }
}

/// `GET /v1/models`: the models that some registered OpenAI-compatible TI serves.
async fn models(State(app): State<AppState>, _key: ApiKey) -> Json<Value> {
    let data: Vec<Value> = app
        .scheduler
        .openai_models()
        .into_iter()
        .map(|(id, registered_at)| {
            json!({
                "id": id,
                "object": "model",
                "created": registered_at as u64,
                "owned_by": "ti-scheduler",
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `POST /v1/chat/completions`.
async fn chat_completions(
    State(app): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    forward(&app, Endpoint::Chat, body).await
}

/// `POST /v1/completions`.
async fn completions(
    State(app): State<AppState>,
    _key: ApiKey,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    forward(&app, Endpoint::Completions, body).await
}

/// Which OpenAI endpoint a request came to.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "v1/chat/completions",
            Self::Completions => "v1/completions",
        }
    }
}

/// Checks the request, makes it a task and answers with what its TI answered.
async fn forward(
    app: &AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let request = match checked(app, endpoint, body) {
        Ok(r) => r,
        Err(e) => return counted(app, "", e.into_response()),
    };
    let model = request.model.clone();
    let proxied = match app.scheduler.proxy(request).await {
        Ok(p) => p,
        Err(e) => {
            let model = if matches!(e, Error::NotFound(_)) {
                "" // a name no TI serves: not a label
            } else {
                &model
            };
            return counted(app, model, OpenAiError::from(e).into_response());
        }
    };
    let connected = proxied.connected;
    let answer = proxied.answer.await;
    let mut response = match answer {
        Ok(Answer::Full {
            status,
            content_type,
            body,
            upstream,
        }) => {
            let added = arrived.elapsed().saturating_sub(upstream);
            metrics::histogram!(telemetry::OPENAI_ADDED_LATENCY).record(added.as_secs_f64());
            drop(connected);
            upstream_response(status, content_type, Body::from(body))
        }
        Ok(Answer::Stream {
            status,
            content_type,
            chunks,
        }) => {
            // The guard lives as long as the body: a client that leaves drops both.
            let stream = chunks.map(move |chunk| {
                let _connected = &connected;
                chunk
            });
            let mut response = upstream_response(status, content_type, Body::from_stream(stream));
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        Ok(Answer::Failed { status, message }) => OpenAiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            ..OpenAiError::unavailable(message)
        }
        .into_response(),
        // The service stopped before the request was answered.
        Err(_) => OpenAiError::unavailable(SHUTTING_DOWN).into_response(),
    };
    if let Ok(id) = HeaderValue::from_str(proxied.task_id.as_str()) {
        response.headers_mut().insert(TASK_ID_HEADER, id);
    }
    counted(app, &model, response)
}

/// Counts the answer in `ti_scheduler_openai_requests_total`.
fn counted(app: &AppState, model: &str, response: Response) -> Response {
    let status = response.status().as_u16();
    app.openai_requests
        .get(model, status, || {
            metrics::counter!(
                telemetry::OPENAI_REQUESTS,
                "model" => model.to_string(),
                "status" => status.to_string()
            )
        })
        .increment(1);
    response
}

/// A TI's answer, as the client gets it: its status, content type and body.
fn upstream_response(status: u16, content_type: Option<String>, body: Body) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, body).into_response();
    if let Some(value) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// The request, checked as an OpenAI server would: a JSON object with a `model`, and
/// `messages` (chat) or `prompt` (completions); `stream` a boolean if given.
fn checked(
    app: &AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<ProxyRequest, OpenAiError> {
    let body = body.map_err(|e| OpenAiError {
        status: e.status(),
        ..OpenAiError::invalid(e.body_text(), None)
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| OpenAiError::invalid("the request body is not UTF-8 text", None))?;
    let depth = text_depth(text);
    if depth > app.max_json_depth {
        return Err(OpenAiError::invalid(
            format!(
                "the request body nests {depth} levels deep; the limit is {} (server.max_json_depth)",
                app.max_json_depth
            ),
            None,
        ));
    }
    // The body as it is (whitespace around it aside): what is stored and sent.
    let task_input: Box<RawValue> = serde_json::from_str(text).map_err(|e| {
        OpenAiError::invalid(format!("the request body is not valid JSON: {e}"), None)
    })?;
    let fields =
        RequestFields::read(task_input.get()).map_err(|e| OpenAiError::invalid(e, None))?;
    let model = fields
        .model_name()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            OpenAiError::invalid(
                "you must provide a model parameter (a non-empty string)",
                Some("model"),
            )
        })?;
    let stream = match fields.stream.map(RawValue::get) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(OpenAiError::invalid(
                format!("stream must be a boolean, got {other}"),
                Some("stream"),
            ))
        }
    };
    let starts =
        |field: Option<&RawValue>, with: &[char]| field.is_some_and(|f| f.get().starts_with(with));
    match endpoint {
        Endpoint::Chat if !starts(fields.messages, &['[']) => {
            return Err(OpenAiError::invalid(
                "messages is required: an array of {role, content} objects",
                Some("messages"),
            ));
        }
        Endpoint::Completions if !starts(fields.prompt, &['"', '[']) => {
            return Err(OpenAiError::invalid(
                "prompt is required: a string or an array of strings",
                Some("prompt"),
            ));
        }
        _ => {}
    }
    let mut metadata = Map::new();
    metadata.insert("path".into(), endpoint.path().into());
    fields.add_features(&mut metadata);
    Ok(ProxyRequest {
        model,
        path: endpoint.path(),
        task_input,
        metadata,
        stream,
    })
}
