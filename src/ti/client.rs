//! The scheduler's side of the callback protocol (docs/API.md): one keep-alive HTTP client,
//! and beside it the pooled client of OpenAI-compatible TIs' requests (`openai.rs`).

use std::time::Duration;

use axum::body::Bytes;
use axum::http::header::LOCATION;
use axum::http::HeaderMap;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;
use serde_json::Value;

use super::protocol::{DispatchRequest, TiTaskReport};

/// Why a TI could not be used; the message is what `/ti/register` shows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TiError {
    /// Nothing listens there.
    #[error("Connection refused")]
    ConnectionRefused,
    /// No answer in time.
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// `GET /health` answered with a non-2xx code.
    #[error("Health check failed: HTTP {0}")]
    Unhealthy(u16),
    /// Another request answered with a non-2xx code.
    #[error("{what} failed: HTTP {status}")]
    Status {
        /// Which request.
        what: &'static str,
        /// Its HTTP code.
        status: u16,
    },
    /// The TI rejected the task itself: a 4xx answer to a dispatch other than 408 and
    /// 429. Retrying it, or sending it to another TI, would fail the same way.
    #[error("the TI rejected the task: HTTP {status}")]
    Rejected {
        /// Its HTTP code.
        status: u16,
        /// Its body (at most [`REJECTION_BODY_LIMIT`] bytes): JSON when it parses, else
        /// the text.
        body: Value,
    },
    /// The TI answered with a redirect, which is never followed: the allow-list and the
    /// callback token are for the registered host only.
    #[error(
        "{what} answered HTTP {status} (a redirect to {location}); redirects are not followed"
    )]
    Redirect {
        /// Which request.
        what: String,
        /// Its HTTP code.
        status: u16,
        /// Where it pointed (`Location`).
        location: String,
    },
    /// The answer was not what the protocol says.
    #[error("{0}")]
    Protocol(String),
    /// Any other transport failure.
    #[error("{0}")]
    Transport(String),
}

impl TiError {
    pub(super) fn from_reqwest(e: reqwest::Error, timeout: Duration) -> Self {
        if e.is_timeout() {
            return Self::Timeout(timeout.as_millis() as u64);
        }
        if e.is_connect() {
            return Self::connect_failed(&e);
        }
        Self::Transport(root_cause(&e))
    }

    /// A failed request to an OpenAI-compatible TI (`openai.rs`), in the same terms as
    /// [`Self::from_reqwest`]'s.
    pub(super) fn from_hyper(e: hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            return Self::connect_failed(&e);
        }
        Self::Transport(root_cause(&e))
    }

    /// A connection that could not be made: refused, or why not.
    fn connect_failed(e: &(dyn std::error::Error + 'static)) -> Self {
        let mut source = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Self::ConnectionRefused;
                }
            }
            source = s.source();
        }
        Self::Transport(format!("Connection failed: {}", root_cause(e)))
    }

    /// A 3xx answer to `what`, which is never followed.
    pub(super) fn redirect(what: &str, status: u16, headers: &HeaderMap) -> Self {
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("nowhere")
            .chars()
            .take(200)
            .collect();
        Self::Redirect {
            what: what.to_string(),
            status,
            location,
        }
    }
}

/// Most bytes of a rejecting TI's body kept with the task's result.
pub(super) const REJECTION_BODY_LIMIT: usize = 4096;

pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// What a TI says of itself in `GET /info`.
#[derive(Debug, Clone, PartialEq)]
pub struct TiInfo {
    /// The model it serves, if it says.
    pub model_name: Option<String>,
    /// Its hardware, if it says.
    pub hardware: Option<String>,
}

#[derive(Deserialize)]
struct InfoBody {
    model_name: Option<String>,
    hardware: Option<String>,
    deployed_model: Option<DeployedModel>,
}

#[derive(Deserialize)]
struct DeployedModel {
    model_name: Option<String>,
    hardware: Option<String>,
}

/// The pooled HTTP client of the requests to OpenAI-compatible TIs (`openai.rs`): hyper's,
/// used directly. reqwest, which the other requests use, parses each request's URL twice
/// more (for its redirect policy, which it runs even when redirects are off): about 13 000
/// instructions, 4 % of what a front-door request costs the scheduler.
pub(super) type OpenAiHttp = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// HTTP client for Task Instances.
#[derive(Clone)]
pub struct TiClient {
    pub(super) http: reqwest::Client,
    /// For the requests of OpenAI-compatible TIs; `http` for everything else.
    pub(super) openai: OpenAiHttp,
    pub(super) health_timeout: Duration,
    dispatch_timeout: Duration,
    pub(super) request_timeout: Duration,
}

impl TiClient {
    /// A client with these timeouts: of health checks and `GET /info`, of a dispatch to a
    /// callback TI, and of a whole request to an OpenAI-compatible TI.
    pub fn new(
        health_timeout: Duration,
        dispatch_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // A redirect would send the task, the callback URL and the callback token to a
            // host that was never checked against `ti.allowed_hosts`.
            .redirect(reqwest::redirect::Policy::none())
            // TIs live on our own network; no system proxy should sit in between.
            .no_proxy()
            .build()
            .unwrap_or_default();
        // The same: kept-alive connections, no Nagle delay, never a redirect (hyper's
        // client follows none).
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let openai = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            http,
            openai,
            health_timeout,
            dispatch_timeout,
            request_timeout,
        }
    }

    /// Where a TI takes tasks, parsed once (at registration) rather than per dispatch;
    /// `None` if `host` cannot form a URL.
    pub fn submit_url(host: &str, port: u16) -> Option<reqwest::Url> {
        reqwest::Url::parse(&Self::url(host, port, "/queue/submit")).ok()
    }

    pub(super) fn url(host: &str, port: u16, path: &str) -> String {
        if host.contains(':') && !host.starts_with('[') {
            format!("http://[{host}]:{port}{path}")
        } else {
            format!("http://{host}:{port}{path}")
        }
    }

    /// Sends a request with a timeout; a redirect is an error naming `what`.
    pub(super) async fn send(
        request: reqwest::RequestBuilder,
        timeout: Duration,
        what: &str,
    ) -> Result<reqwest::Response, TiError> {
        let resp = request
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| TiError::from_reqwest(e, timeout))?;
        if resp.status().is_redirection() {
            return Err(TiError::redirect(
                what,
                resp.status().as_u16(),
                resp.headers(),
            ));
        }
        Ok(resp)
    }

    /// The response if it is a 2xx, else the error naming the request.
    pub(super) fn success(
        resp: reqwest::Response,
        what: &'static str,
    ) -> Result<reqwest::Response, TiError> {
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(TiError::Status {
                what,
                status: resp.status().as_u16(),
            })
        }
    }

    /// `GET /health`: Ok if it answers 2xx in time.
    pub async fn health(&self, host: &str, port: u16) -> Result<(), TiError> {
        let request = self.http.get(Self::url(host, port, "/health"));
        let resp = Self::send(request, self.health_timeout, "GET /health").await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(TiError::Unhealthy(resp.status().as_u16()))
        }
    }

    /// `GET /info`: the model and hardware the TI reports.
    pub async fn info(&self, host: &str, port: u16) -> Result<TiInfo, TiError> {
        let request = self.http.get(Self::url(host, port, "/info"));
        let resp = Self::success(
            Self::send(request, self.health_timeout, "GET /info").await?,
            "GET /info",
        )?;
        let body: InfoBody = resp
            .json()
            .await
            .map_err(|e| TiError::Protocol(format!("GET /info answered invalid JSON: {e}")))?;
        let deployed = body.deployed_model;
        let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
        Ok(TiInfo {
            model_name: non_empty(body.model_name)
                .or_else(|| non_empty(deployed.as_ref().and_then(|d| d.model_name.clone()))),
            hardware: non_empty(body.hardware)
                .or_else(|| non_empty(deployed.and_then(|d| d.hardware))),
        })
    }

    /// `POST /queue/submit`: Ok once the TI accepted the task.
    pub async fn dispatch(
        &self,
        url: &reqwest::Url,
        request: &DispatchRequest<'_>,
    ) -> Result<(), TiError> {
        let request = self.http.post(url.clone()).json(request);
        let resp = Self::send(request, self.dispatch_timeout, "dispatch").await?;
        let status = resp.status();
        let retryable = matches!(
            status,
            reqwest::StatusCode::REQUEST_TIMEOUT | reqwest::StatusCode::TOO_MANY_REQUESTS
        );
        if status.is_client_error() && !retryable {
            return Err(TiError::Rejected {
                status: status.as_u16(),
                body: rejection_body(resp).await,
            });
        }
        Self::success(resp, "dispatch")?;
        Ok(())
    }

    /// `GET /results/{task_id}`: what the TI knows of a task; `None` if it never saw it.
    pub async fn task_report(
        &self,
        host: &str,
        port: u16,
        task_id: &str,
    ) -> Result<Option<TiTaskReport>, TiError> {
        let request = self
            .http
            .get(Self::url(host, port, &format!("/results/{task_id}")));
        let resp = Self::send(request, self.dispatch_timeout, "GET /results").await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: Value = Self::success(resp, "GET /results")?
            .json()
            .await
            .map_err(|e| TiError::Protocol(format!("GET /results answered invalid JSON: {e}")))?;
        serde_json::from_value(body)
            .map(Some)
            .map_err(|e| TiError::Protocol(format!("GET /results answered an unknown shape: {e}")))
    }
}

/// The first [`REJECTION_BODY_LIMIT`] bytes of a rejecting TI's body, read without
/// taking more of it.
async fn rejection_body(mut resp: reqwest::Response) -> Value {
    let mut bytes = Vec::new();
    while bytes.len() < REJECTION_BODY_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    upstream_body(&bytes)
}

/// What is kept of a TI's answer in a failed task's result: its first
/// [`REJECTION_BODY_LIMIT`] bytes, as JSON when they parse, else as text (lossy UTF-8);
/// `null` when it sent none.
pub fn upstream_body(bytes: &[u8]) -> Value {
    let bytes = &bytes[..bytes.len().min(REJECTION_BODY_LIMIT)];
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}
