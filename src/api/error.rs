//! The error envelope (docs/API.md, Conventions) and the extractors that produce it for bad input.
//! Beside `status` and `message`, an envelope carries a `code` where the HTTP status alone
//! is ambiguous: `overloaded` (429, with `Retry-After`) and `draining` (503).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::AppState;
use crate::scheduling;
use crate::store::StoreError;

/// Everything an endpoint can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed JSON, wrong type, missing field, bad value.
    #[error("{0}")]
    BadRequest(String),
    /// 401: the admin token is missing or wrong.
    #[error("missing or wrong admin token: send 'Authorization: Bearer <token>'")]
    Unauthorized,
    /// 403: a result callback that does not come from a TI the task was sent to.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such task, TI or route.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 409: not possible in the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than the configured limit.
    #[error("request body too large (limit {0} bytes)")]
    PayloadTooLarge(usize),
    /// 502: a TI could not be reached or failed its health check.
    #[error("{0}")]
    BadGateway(String),
    /// 429: admission control refused a task (its model is overloaded, or its deadline
    /// cannot be met); answered with `Retry-After` and `code: "overloaded"`.
    #[error("{message}")]
    Overloaded {
        /// Names the model, what was predicted and the limit.
        message: String,
        /// Whole seconds, at least 1.
        retry_after_secs: u64,
    },
    /// 503: no usable TI, or the service is not ready.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `code: "draining"`: the service is draining and takes no new task.
    #[error("{0}")]
    Draining(String),
    /// 507: the database is full (the disk, or `database.max_size_mb`); nothing was
    /// written. Clears by itself once space is freed.
    #[error("the database is full (no space left on its disk, or database.max_size_mb reached): nothing was written; retry once space is freed")]
    InsufficientStorage,
    /// 500: the database or another internal part failed; the cause is logged, not shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Draining(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The envelope's `code`, for the errors a client must tell apart from others of the
    /// same HTTP status (a 503 that says "go elsewhere", a 429 that says "later").
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::Overloaded { .. } => Some("overloaded"),
            Self::Draining(_) => Some("draining"),
            _ => None,
        }
    }

    /// A task refused by admission control; in a batch, the message names its index.
    pub(super) fn refused(refusal: &scheduling::Refusal, in_batch: bool) -> Self {
        Self::Overloaded {
            message: if in_batch {
                format!("tasks[{}]: {refusal}", refusal.index)
            } else {
                refusal.to_string()
            },
            retry_after_secs: refusal.retry_after.as_secs().max(1),
        }
    }

    /// This error in the shape of an endpoint that also returns these fields
    /// (empty identifiers, or echoes of the caller's input).
    pub fn with(self, fields: &[(&'static str, &str)]) -> ErrorResponse {
        ErrorResponse {
            error: self,
            fields: fields.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        }
    }
}

impl From<scheduling::Error> for ApiError {
    fn from(e: scheduling::Error) -> Self {
        use scheduling::Error as E;
        match e {
            E::Invalid(m) => Self::BadRequest(m),
            E::NotFound(m) => Self::NotFound(m),
            E::Conflict(m) => Self::Conflict(m),
            E::Forbidden(m) => Self::Forbidden(m),
            E::TiUnreachable(e) => Self::BadGateway(e.to_string()),
            E::NoInstance(m) => Self::Unavailable(m),
            E::Overloaded(refusal) => Self::refused(&refusal, false),
            e @ E::Draining => Self::Draining(e.to_string()),
            E::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_full() {
            tracing::warn!(error = ?e, "a write found the database full");
            return Self::InsufficientStorage;
        }
        match e {
            StoreError::Deposed { .. } => {
                return Self::Unavailable("this node lost the leader lease; ask the leader".into())
            }
            StoreError::WriterClosed => {
                return Self::Unavailable("the database writer has stopped".into())
            }
            // The writer reconnects: worth trying again (a submit with its task_id is
            // idempotent, should the commit have gone through before the connection broke).
            ref e if e.is_connection_lost() => {
                return Self::Unavailable("the connection to the database was lost".into())
            }
            _ => {}
        }
        Self::Internal(e.into())
    }
}

/// An [`ApiError`] with the endpoint's own extra fields.
#[derive(Debug)]
pub struct ErrorResponse {
    error: ApiError,
    fields: Vec<(&'static str, String)>,
}

impl From<ApiError> for ErrorResponse {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            fields: Vec::new(),
        }
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let status = self.error.status();
        if let ApiError::Internal(cause) = &self.error {
            tracing::error!(error = ?cause, "request failed");
        }
        let mut body = Map::new();
        body.insert("status".into(), "error".into());
        body.insert("message".into(), self.error.to_string().into());
        if let Some(code) = self.error.code() {
            body.insert("code".into(), code.into());
        }
        for (key, value) in self.fields {
            body.insert(key.into(), value.into());
        }
        let mut response = (status, Json(Value::Object(body))).into_response();
        if let ApiError::Overloaded {
            retry_after_secs, ..
        } = self.error
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        ErrorResponse::from(self).into_response()
    }
}

/// Parses JSON text, naming the field at fault in the error. Every body of this API is a
/// JSON object: an array is refused (serde would read a struct from one, by position).
pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.trim_ascii_start().starts_with(b"[") {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected a JSON object, got an array".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::BadRequest(format!("invalid JSON body: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// The request body as raw bytes, with the body limit's rejection as a 413 envelope.
pub(super) struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(state.body_limit)
                } else {
                    ApiError::BadRequest(format!("unreadable request body: {e}"))
                }
            })
    }
}

/// A JSON body of type `T`, accepted whatever its Content-Type, with errors that name
/// the field.
pub(super) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let Body(bytes) = Body::from_request(req, state).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Query parameters of type `T`, with errors that name the parameter.
pub(super) struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(ApiQuery)
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
    }
}
