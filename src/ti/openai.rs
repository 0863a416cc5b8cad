//! The scheduler's side of an OpenAI-compatible TI: vLLM, SGLang, TGI,
//! llama.cpp's server, Ollama. Such a server answers each request with its response; it
//! does not call back. This file checks it at registration (`GET /health`, else
//! `GET /v1/models`; the model ids from `GET /v1/models`), builds the request of a task
//! (its path and body), sends it, and reads what the scheduler keeps of the answer
//! (the `usage` counts). It also estimates, from the request alone, the features the
//! predictor uses (`input_tokens`, `max_tokens`).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, Request, Uri};
use futures::Stream;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::time::{Instant, Sleep};

use super::client::root_cause;
use super::{TiClient, TiError};
use crate::domain::Usage;

/// What an OpenAI-compatible TI answered to a request.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// Its HTTP status.
    pub status: u16,
    /// Its `Retry-After`, in seconds (the date form is not used by inference servers).
    pub retry_after: Option<Duration>,
    /// Its body.
    pub body: Bytes,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

impl TiClient {
    /// Health of an OpenAI-compatible TI: `GET /health` answering 2xx; a server without
    /// that route (404) is healthy when `GET /v1/models` answers 2xx.
    pub async fn openai_health(&self, host: &str, port: u16) -> Result<(), TiError> {
        let request = self.http.get(Self::url(host, port, "/health"));
        let resp = Self::send(request, self.health_timeout, "GET /health").await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if status != reqwest::StatusCode::NOT_FOUND {
            return Err(TiError::Unhealthy(status.as_u16()));
        }
        let request = self.http.get(Self::url(host, port, "/v1/models"));
        let resp = Self::send(request, self.health_timeout, "GET /v1/models").await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(TiError::Unhealthy(resp.status().as_u16()))
        }
    }

    /// The model ids an OpenAI-compatible TI serves (`GET /v1/models`), in its order.
    pub async fn openai_models(&self, host: &str, port: u16) -> Result<Vec<String>, TiError> {
        let request = self.http.get(Self::url(host, port, "/v1/models"));
        let resp = Self::success(
            Self::send(request, self.health_timeout, "GET /v1/models").await?,
            "GET /v1/models",
        )?;
        let list: ModelList = resp.json().await.map_err(|e| {
            TiError::Protocol(format!(
                "GET /v1/models answered no {{\"data\": [{{\"id\": ...}}]}} list: {e}"
            ))
        })?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    }

    /// Sends one request to an OpenAI-compatible TI and reads the whole answer, whatever
    /// its status. Transport errors and the request timeout are errors.
    pub async fn openai_send(&self, url: &Uri, body: Bytes) -> Result<UpstreamResponse, TiError> {
        let upstream = self.openai_start(url, body).await?;
        let status = upstream.status;
        let retry_after = upstream.retry_after();
        let body = upstream.body().await?;
        Ok(UpstreamResponse {
            status,
            retry_after,
            body,
        })
    }

    /// Sends one request to an OpenAI-compatible TI and answers once its status and
    /// headers arrived; the body is read by the caller, whole ([`Upstream::body`]) or as
    /// it streams ([`Upstream::chunks`]). The request timeout covers the whole exchange,
    /// body included. A redirect is an error: it is never followed.
    pub async fn openai_start(&self, url: &Uri, body: Bytes) -> Result<Upstream, TiError> {
        let deadline = Instant::now() + self.request_timeout;
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = url.clone();
        request
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let response = tokio::time::timeout_at(deadline, self.openai.request(request))
            .await
            .map_err(|_| timed_out(self.request_timeout))?
            .map_err(TiError::from_hyper)?;
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        if parts.status.is_redirection() {
            return Err(TiError::redirect("the request", status, &parts.headers));
        }
        Ok(Upstream {
            status,
            headers: parts.headers,
            body,
            deadline,
            timeout: self.request_timeout,
        })
    }

    /// A TI's root URL (`http://host:port/`), parsed once at registration; `None` if
    /// `host` cannot form one.
    pub fn openai_root(host: &str, port: u16) -> Option<reqwest::Url> {
        reqwest::Url::parse(&Self::url(host, port, "/")).ok()
    }

    /// The URL of `path` (`v1/...`, as [`request_path`] gives it) on the TI at `root`, as
    /// the request carries it: the root's text and the path, parsed as a URI (a few
    /// hundred instructions, where parsing a whole URL takes thousands).
    ///
    /// ```
    /// use ti_scheduler::ti::TiClient;
    /// let root = TiClient::openai_root("127.0.0.1", 8000).unwrap();
    /// let url = TiClient::openai_url(&root, "v1/chat/completions").unwrap();
    /// assert_eq!(url.to_string(), "http://127.0.0.1:8000/v1/chat/completions");
    /// ```
    pub fn openai_url(root: &reqwest::Url, path: &str) -> Result<Uri, String> {
        let text = format!("{root}{path}");
        text.parse()
            .map_err(|e| format!("'{text}' is not a request URL: {e}"))
    }
}

fn timed_out(timeout: Duration) -> TiError {
    TiError::Timeout(timeout.as_millis() as u64)
}

/// An OpenAI-compatible TI's answer whose status and headers arrived
/// ([`TiClient::openai_start`]); its body is still to be read, before the deadline.
#[derive(Debug)]
pub struct Upstream {
    /// Its HTTP status.
    pub status: u16,
    /// Its headers.
    pub headers: HeaderMap,
    body: Incoming,
    /// When the request's time runs out: its sending plus `timeout`.
    deadline: Instant,
    timeout: Duration,
}

impl Upstream {
    /// Its `Retry-After`, in seconds (the date form is not used by inference servers).
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
    }

    /// Its `Content-Type`, if it is text.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }

    /// Its whole body.
    pub async fn body(self) -> Result<Bytes, TiError> {
        match tokio::time::timeout_at(self.deadline, self.body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) => Err(TiError::Transport(root_cause(&e))),
            Err(_) => Err(timed_out(self.timeout)),
        }
    }

    /// Its body as it arrives, chunk by chunk.
    pub fn chunks(self) -> Chunks {
        Chunks {
            body: self.body,
            deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
            timeout: self.timeout,
        }
    }
}

/// The body of an [`Upstream`], chunk by chunk as it arrives; an error ends it: the
/// connection broke, or the request's time ran out (the timeout covers the whole
/// exchange, as for a body read whole).
#[derive(Debug)]
pub struct Chunks {
    body: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Stream for Chunks {
    type Item = Result<Bytes, TiError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(timed_out(this.timeout))));
        }
        loop {
            return match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(bytes) => Poll::Ready(Some(Ok(bytes))),
                    // Trailers: nothing the client reads.
                    Err(_) => continue,
                },
                Some(Err(e)) => Poll::Ready(Some(Err(TiError::Transport(root_cause(&e))))),
                None => Poll::Ready(None),
            };
        }
    }
}

/// The path a task is sent to: `metadata.path` when given (a leading `/` is optional; it
/// must start with `v1/` and hold only `A-Za-z0-9/_.-`, no `..`), else
/// `v1/chat/completions` when `task_input` has `messages`, else `v1/completions`.
///
/// ```
/// use serde_json::{json, Map};
/// use ti_scheduler::ti::openai::request_path;
/// let chat = json!({"messages": []});
/// assert_eq!(request_path(chat.as_object().unwrap(), &Map::new()).unwrap(), "v1/chat/completions");
/// let meta = json!({"path": "/v1/embeddings"});
/// assert_eq!(request_path(&Map::new(), meta.as_object().unwrap()).unwrap(), "v1/embeddings");
/// assert!(request_path(&Map::new(), json!({"path": "admin"}).as_object().unwrap()).is_err());
/// ```
pub fn request_path(
    task_input: &Map<String, Value>,
    metadata: &Map<String, Value>,
) -> Result<String, String> {
    match metadata.get("path") {
        None | Some(Value::Null) => Ok(if task_input.contains_key("messages") {
            "v1/chat/completions".into()
        } else {
            "v1/completions".into()
        }),
        Some(Value::String(path)) => checked_path(path).map(str::to_string),
        Some(other) => Err(format!("metadata.path must be a string, got {other}")),
    }
}

/// Checks a client's `metadata.path`; answers it without its leading `/`.
fn checked_path(path: &str) -> Result<&str, String> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '.' | '-');
    if !trimmed.starts_with("v1/") || trimmed.len() == 3 {
        return Err(format!(
            "metadata.path must start with 'v1/' (like 'v1/chat/completions'), got '{path}'"
        ));
    }
    if !trimmed.chars().all(allowed) || trimmed.split('/').any(|s| s == "..") {
        return Err(format!(
            "metadata.path may only hold A-Za-z0-9/_.- and no '..' segment, got '{path}'"
        ));
    }
    Ok(trimmed)
}

/// The request of a queued task: its path ([`request_path`]) and its body
/// ([`request_body`]). A front-door request goes as its client sent it instead.
pub fn build_request(
    task_input: &RawValue,
    metadata: &Map<String, Value>,
    model: &str,
) -> Result<(String, Bytes), String> {
    let body: Map<String, Value> = serde_json::from_str(task_input.get())
        .map_err(|e| format!("task_input is not a JSON object: {e}"))?;
    let path = request_path(&body, metadata)?;
    Ok((path, request_body(body, model)?))
}

/// The request body of a queued task: `task_input` with `model` set to the TI's model id
/// when absent, and `stream` false (nobody would read a stream: the answer is stored).
pub fn request_body(mut body: Map<String, Value>, model: &str) -> Result<Bytes, String> {
    if !body.get("model").is_some_and(Value::is_string) {
        body.insert("model".into(), Value::String(model.to_string()));
    }
    body.insert("stream".into(), Value::Bool(false));
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| format!("task_input: {e}"))
}

/// A JSON object answered by an OpenAI-compatible server, checked and its token counts
/// read, without building the rest of it: the text, as the server sent it, is what gets
/// stored. `None` when the body is not a JSON object.
pub fn checked_answer(body: &[u8]) -> Option<(&str, Option<Usage>)> {
    /// Every other field is checked and skipped, never built.
    #[derive(Deserialize)]
    struct Answer {
        usage: Option<Value>,
    }
    let text = std::str::from_utf8(body).ok()?;
    // A struct would also read from an array.
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let answer: Answer = serde_json::from_str(text).ok()?;
    Some((text, answer.usage.as_ref().and_then(counts)))
}

/// The token counts of an OpenAI response's `usage`, when it has them.
pub fn usage(response: &Value) -> Option<Usage> {
    response.get("usage").and_then(counts)
}

/// The token counts of a `usage` object, when it has them.
fn counts(usage: &Value) -> Option<Usage> {
    let count = |name: &str| usage.get(name).and_then(Value::as_i64);
    let found = Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
    };
    (found != Usage::default()).then_some(found)
}

/// What the scheduler keeps of a streamed answer (docs/API.md, The OpenAI front door): the text of its events
/// put together, how many events, and the `usage` if the server sent one. It is fed the
/// bytes as they arrive; an event may be split anywhere between two reads.
#[derive(Debug, Default)]
pub struct StreamAssembly {
    /// Bytes of a line not ended yet.
    pending: Vec<u8>,
    content: String,
    chunks: u64,
    usage: Option<Value>,
}

impl StreamAssembly {
    /// Takes the next bytes of the stream. True if they completed the first event that
    /// carried text (the moment time to first token is measured at).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let had_text = !self.content.is_empty();
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.line(&line);
        }
        !had_text && !self.content.is_empty()
    }

    /// One line of the stream: only `data:` lines with a JSON event count.
    fn line(&mut self, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            return;
        };
        let Ok(event) = serde_json::from_str::<Value>(data.trim_start()) else {
            // `[DONE]`, or something that is not an OpenAI event.
            return;
        };
        self.chunks += 1;
        let choices = event.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let text = choice
                .pointer("/delta/content")
                .or_else(|| choice.get("text"))
                .and_then(Value::as_str);
            if let Some(text) = text {
                self.content.push_str(text);
            }
        }
        if let Some(usage) = event.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
    }

    /// The stored result: `{"streamed": true, "content", "chunks", "usage"?}`.
    pub fn result(self) -> Value {
        let mut result = serde_json::json!({
            "streamed": true,
            "content": self.content,
            "chunks": self.chunks,
        });
        if let Some(usage) = self.usage {
            result["usage"] = usage;
        }
        result
    }
}

/// Characters per token of the input-token estimate: the usual rule of thumb for English
/// text with BPE tokenizers (GPT, Llama, Mistral). The learned model's coefficient for
/// input tokens absorbs a constant error in this ratio; only its variation between
/// prompts stays as noise.
pub const CHARS_PER_TOKEN: f64 = 4.0;

/// The predictor's features from an OpenAI request body alone: `input_tokens` estimated
/// from the prompt or the messages' text (characters / [`CHARS_PER_TOKEN`], rounded up),
/// and `max_tokens` from `max_tokens` or `max_completion_tokens`. Features already in
/// `metadata` win; nothing is added when the body is not an OpenAI request.
pub fn add_features(task_input: &Map<String, Value>, metadata: &mut Map<String, Value>) {
    let bound = || {
        ["max_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|n| task_input.get(*n).and_then(Value::as_f64))
    };
    insert_features(metadata, || prompt_chars(task_input), bound);
}

/// Adds `input_tokens` from the prompt's characters and `max_tokens` from the bound,
/// unless `metadata` has them already.
fn insert_features(
    metadata: &mut Map<String, Value>,
    chars: impl FnOnce() -> Option<usize>,
    bound: impl FnOnce() -> Option<f64>,
) {
    let has = |m: &Map<String, Value>, names: &[&str]| names.iter().any(|n| m.contains_key(*n));
    if !has(metadata, &["input_tokens", "prompt_tokens"]) {
        if let Some(chars) = chars() {
            let tokens = (chars as f64 / CHARS_PER_TOKEN).ceil();
            metadata.insert("input_tokens".into(), tokens.into());
        }
    }
    if !has(metadata, &["output_tokens", "max_tokens"]) {
        if let Some(bound) = bound().filter(|v| v.is_finite() && *v >= 0.0) {
            metadata.insert("max_tokens".into(), bound.into());
        }
    }
}

/// Characters of text in a prompt or a message's content: a string, a list of them, or
/// `{"type": "text", "text": ...}` parts.
pub fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(part) => part.get("text").map_or(0, text_chars),
        _ => 0,
    }
}

/// Characters of text in `prompt` (a string or a list of strings) or in the `content` of
/// `messages` (a string, or a list of `{"type": "text", "text": ...}` parts).
fn prompt_chars(task_input: &Map<String, Value>) -> Option<usize> {
    if let Some(prompt) = task_input.get("prompt") {
        return Some(text_chars(prompt));
    }
    let messages = task_input.get("messages")?.as_array()?;
    Some(
        messages
            .iter()
            .filter_map(|m| m.get("content"))
            .map(text_chars)
            .sum(),
    )
}

/// What the front door reads of a request body, borrowed from its text: the fields it
/// checks or estimates from, each as its JSON text. The rest of the body is checked as
/// JSON and skipped, never built (a tree of the whole body cost the front door 10 000
/// instructions a request): the body is stored and sent as the client wrote it.
#[derive(Debug, Deserialize)]
pub struct RequestFields<'a> {
    /// `model`.
    #[serde(borrow, default)]
    pub model: Option<&'a RawValue>,
    /// `stream`.
    #[serde(borrow, default)]
    pub stream: Option<&'a RawValue>,
    /// `messages` (chat completions).
    #[serde(borrow, default)]
    pub messages: Option<&'a RawValue>,
    /// `prompt` (completions).
    #[serde(borrow, default)]
    pub prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
}

impl<'a> RequestFields<'a> {
    /// Reads the fields of a JSON object's text; the error says what is wrong with it.
    /// (A JSON `null` field reads as absent.)
    pub fn read(text: &'a str) -> Result<Self, String> {
        // A struct would also read from an array.
        if !text.trim_start().starts_with('{') {
            return Err("the request body must be a JSON object".into());
        }
        serde_json::from_str(text).map_err(|e| match e.classify() {
            // Every field is taken as it is: only a field given twice is refused here.
            serde_json::error::Category::Data => format!("the request body: {e}"),
            _ => format!("the request body is not valid JSON: {e}"),
        })
    }

    /// `model`'s value, if it is a string.
    pub fn model_name(&self) -> Option<String> {
        self.model.and_then(|m| serde_json::from_str(m.get()).ok())
    }

    /// The predictor's features, as [`add_features`] finds them in the parsed body.
    pub fn add_features(&self, metadata: &mut Map<String, Value>) {
        let bound = || {
            [self.max_tokens, self.max_completion_tokens]
                .into_iter()
                .flatten()
                .find_map(|raw| serde_json::from_str::<f64>(raw.get()).ok())
        };
        insert_features(metadata, || self.prompt_chars(), bound);
    }

    /// [`prompt_chars`], read from the text.
    fn prompt_chars(&self) -> Option<usize> {
        if let Some(prompt) = self.prompt {
            return Some(raw_text_chars(prompt));
        }
        /// A message's content; its other fields are skipped.
        #[derive(Deserialize)]
        struct Message<'a> {
            #[serde(borrow, default)]
            content: Option<&'a RawValue>,
        }
        let messages: Vec<&RawValue> = serde_json::from_str(self.messages?.get()).ok()?;
        let content = |m: &&RawValue| {
            // Only an object has a content (a struct would also read from an array).
            let message: Message = m
                .get()
                .starts_with('{')
                .then(|| serde_json::from_str(m.get()).ok())??;
            message.content.map(raw_text_chars)
        };
        Some(messages.iter().filter_map(content).sum())
    }
}

/// [`text_chars`] of a value's JSON text: a string without escapes is counted where it
/// lies; anything else is parsed first.
fn raw_text_chars(raw: &RawValue) -> usize {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => inner.chars().count(),
        _ => serde_json::from_str::<Value>(text).map_or(0, |v| text_chars(&v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn paths_come_from_metadata_or_the_body_shape_and_are_checked() {
        let none = Map::new();
        assert_eq!(
            request_path(&map(json!({"prompt": "x"})), &none).unwrap(),
            "v1/completions"
        );
        assert_eq!(
            request_path(&none, &map(json!({"path": "v1/completions"}))).unwrap(),
            "v1/completions"
        );
        for bad in ["v1/", "v2/x", "v1/../admin", "v1/a?b=c", "/", ""] {
            assert!(
                request_path(&none, &map(json!({ "path": bad }))).is_err(),
                "{bad}"
            );
        }
        assert!(request_path(&none, &map(json!({"path": 3}))).is_err());
    }

    #[test]
    fn the_body_gets_the_model_when_absent_and_never_streams() {
        let raw = RawValue::from_string(r#"{"prompt":"hi","stream":true}"#.into()).unwrap();
        let (path, body) = build_request(&raw, &Map::new(), "m").unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(path, "v1/completions");
        assert_eq!(body, json!({"prompt": "hi", "stream": false, "model": "m"}));
        let own = map(json!({"model": "mine"}));
        let body: Value = serde_json::from_slice(&request_body(own, "m").unwrap()).unwrap();
        assert_eq!(body["model"], "mine");
    }

    #[test]
    fn features_are_estimated_from_the_text_and_metadata_wins() {
        let chat = map(json!({
            "messages": [
                {"role": "system", "content": "abcd"},
                {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}
            ],
            "max_completion_tokens": 64
        }));
        let mut meta = Map::new();
        add_features(&chat, &mut meta);
        assert_eq!(meta, map(json!({"input_tokens": 3.0, "max_tokens": 64.0})));

        let mut given = map(json!({"input_tokens": 500, "output_tokens": 10}));
        add_features(&chat, &mut given);
        assert_eq!(
            given,
            map(json!({"input_tokens": 500, "output_tokens": 10}))
        );

        let mut nothing = Map::new();
        add_features(&map(json!({"image": "x"})), &mut nothing);
        assert!(nothing.is_empty());
    }

    #[test]
    fn the_front_door_reads_the_same_features_from_the_text_as_from_the_parsed_body() {
        let bodies = [
            r#"{"model": "m", "prompt": "ééééé", "max_tokens": 7}"#,
            r#"{"prompt": ["ab", "cdé\u00e9\n"], "max_tokens": "7", "max_completion_tokens": 9}"#,
            r#"{"prompt": {"text": "abcd"}, "max_tokens": -1}"#,
            r#"{"messages": [{"role": "user", "content": "h\"i"}, {"content": null}], "max_tokens": 2.5}"#,
            r#"{"messages": [{"content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}]}"#,
            r#"{"messages": ["not a message", ["abcd"], 3, {"content": "xyz"}]}"#,
            r#"{"messages": {"content": "not a list"}, "max_completion_tokens": 1e3}"#,
            r#"{"messages": [], "stream": true}"#,
            r#"{"image": "x"}"#,
        ];
        for text in bodies {
            let mut from_text = Map::new();
            RequestFields::read(text)
                .unwrap()
                .add_features(&mut from_text);
            let mut parsed = Map::new();
            add_features(&serde_json::from_str(text).unwrap(), &mut parsed);
            assert_eq!(from_text, parsed, "{text}");
        }
        let mut chat = Map::new();
        RequestFields::read(bodies[3])
            .unwrap()
            .add_features(&mut chat);
        assert_eq!(chat, map(json!({"input_tokens": 1.0, "max_tokens": 2.5})));
    }

    #[test]
    fn the_front_door_reads_only_a_json_object() {
        assert!(RequestFields::read(r#" {"model": "m"} "#).is_ok());
        for (text, why) in [
            ("[1]", "must be a JSON object"),
            ("\"x\"", "must be a JSON object"),
            ("{\"model\": ", "not valid JSON"),
            (r#"{"model": "a"} x"#, "not valid JSON"),
            (
                r#"{"model": "a", "model": "b"}"#,
                "the request body: duplicate field `model`",
            ),
        ] {
            let e = RequestFields::read(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_stream_is_put_together_whatever_its_splits() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            ": a comment\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in [1, 7, 50, stream.len()] {
            let mut assembly = StreamAssembly::default();
            let firsts: Vec<bool> = stream
                .as_bytes()
                .chunks(split)
                .map(|c| assembly.feed(c))
                .collect();
            assert_eq!(firsts.iter().filter(|f| **f).count(), 1, "split {split}");
            let result = assembly.result();
            assert_eq!(result["content"], "Hello", "split {split}");
            assert_eq!(result["chunks"], 4, "split {split}");
            assert_eq!(result["usage"]["completion_tokens"], 2);
            assert_eq!(usage(&result).unwrap().prompt_tokens, Some(3));
        }
        let mut legacy = StreamAssembly::default();
        legacy.feed(b"data: {\"choices\":[{\"text\":\"a\"},{\"text\":\"b\"}]}\n");
        assert_eq!(legacy.result()["content"], "ab");
    }

    #[test]
    fn usage_is_read_when_present() {
        let body = json!({"usage": {"prompt_tokens": 12, "completion_tokens": 30}});
        assert_eq!(
            usage(&body),
            Some(Usage {
                prompt_tokens: Some(12),
                completion_tokens: Some(30)
            })
        );
        assert_eq!(usage(&json!({"choices": []})), None);
    }

    #[test]
    fn an_answer_is_checked_and_kept_as_sent() {
        let body = b"{\"choices\": [], \"usage\": {\"prompt_tokens\": 12}}\n";
        let (text, found) = checked_answer(body).unwrap();
        assert_eq!(text.as_bytes(), body, "stored byte for byte");
        assert_eq!(found.unwrap().prompt_tokens, Some(12));
        assert_eq!(checked_answer(b"{\"choices\": []}").unwrap().1, None);
        for bad in [
            &b"[1]"[..],
            b"\"text\"",
            b"{\"a\": 1",
            b"{} trailing",
            b"{\"a\": \"\xff\"}",
        ] {
            assert!(
                checked_answer(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
