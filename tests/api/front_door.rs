//! The OpenAI front door (docs/API.md, The OpenAI front door), driven by a real OpenAI client library
//! (`async-openai`) and, where the client library hides what is checked (headers, raw
//! errors, a client that leaves), by plain HTTP; behind it, simulated OpenAI-compatible
//! servers over real HTTP.

use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::ti::openai_sim::{OpenAiFaults, OpenAiSim, OpenAiSimConfig};

use crate::helpers::{
    restart_from, spawn_app, spawn_app_with, spawn_openai, spawn_ti, wait_for, TestApp,
};

const MODEL: &str = "llama-7b";

fn sim(base_ms: f64, per_output_token_ms: f64) -> OpenAiSimConfig {
    OpenAiSimConfig {
        model: MODEL.into(),
        base_ms,
        per_output_token_ms,
        concurrency: 4,
        ..OpenAiSimConfig::default()
    }
}

/// An OpenAI client whose base URL is the scheduler.
fn openai(app: &TestApp, key: &str) -> Client<OpenAIConfig> {
    let config = OpenAIConfig::new()
        .with_api_base(app.url("/v1"))
        .with_api_key(key);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    Client::with_config(config).with_http_client(http)
}

fn chat(text: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(max_tokens)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

async fn app_with_backend(config: OpenAiSimConfig) -> (TestApp, OpenAiSim, String) {
    let app = spawn_app().await;
    let server = spawn_openai(config).await;
    let ti = app.register_openai(&server, json!({})).await;
    (app, server, ti)
}

/// The one front-door task of the database (the tests send one request at a time).
async fn only_task(app: &TestApp) -> String {
    app.sql_text(
        "SELECT task_id FROM tasks WHERE origin = 'openai' ORDER BY submit_time DESC LIMIT 1",
    )
    .await
}

async fn completed(app: &TestApp, task_id: &str) -> Value {
    let (status, body) = app
        .get(&format!("/task/query?task_id={task_id}&wait_ms=10000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task_status"], "completed", "{body}");
    body
}

#[tokio::test]
async fn an_openai_client_gets_chat_and_legacy_completions_and_each_is_a_task() {
    let (app, server, ti) = app_with_backend(sim(5.0, 0.0)).await;
    let client = openai(&app, "unused");

    let models = client.models().list().await.expect("GET /v1/models");
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, [MODEL]);
    assert_eq!(models.data[0].owned_by, "ti-scheduler");

    let answer = client
        .chat()
        .create(chat("Say hello to the scheduler", 6))
        .await
        .expect("chat completion through the scheduler");
    let text = answer.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert!(!text.is_empty(), "{answer:?}");
    let usage = answer.usage.expect("usage");
    assert_eq!(server.stats().completed, 1);

    let task_id = only_task(&app).await;
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "succeeded");
    assert_eq!(task["scheduled_ti"], ti);
    assert_eq!(task["model_name"], MODEL);
    assert_eq!(task["completion_tokens"], usage.completion_tokens);
    assert_eq!(task["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(
        task["result"]["choices"][0]["message"]["content"], text,
        "the stored result is the TI's answer"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE task_id = '{task_id}' AND chosen_ti = '{ti}'"
        ))
        .await,
        1,
        "the routing decision is recorded"
    );

    let legacy = CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt("Once upon a time")
        .max_tokens(4u32)
        .build()
        .unwrap();
    let answer = client
        .completions()
        .create(legacy)
        .await
        .expect("legacy completion");
    assert!(!answer.choices[0].text.is_empty());
    // The answer leaves before its row is stored (one commit less on the client's path).
    wait_for("both requests to be stored as succeeded", || async {
        let sql = "SELECT COUNT(*) FROM tasks WHERE origin = 'openai' AND outcome = 'succeeded'";
        (app.count(sql).await == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_stream_reaches_the_client_chunk_by_chunk_and_is_stored_whole() {
    let (app, _server, _ti) = app_with_backend(sim(5.0, 5.0)).await;
    let client = openai(&app, "unused");

    let mut request = chat("Stream me some tokens", 12);
    request.stream = Some(true);
    let mut stream = client.chat().create_stream(request).await.expect("stream");
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("a chunk");
        chunks += 1;
        if let Some(delta) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            text.push_str(&delta);
        }
    }
    assert!(chunks >= 2, "one event per token, got {chunks}");
    assert!(!text.is_empty());

    let task = completed(&app, &only_task(&app).await).await;
    assert_eq!(task["outcome"], "succeeded", "{task}");
    assert_eq!(task["result"]["streamed"], true);
    assert_eq!(
        task["result"]["content"], text,
        "the stored text is what the client read"
    );
    assert_eq!(task["result"]["chunks"], chunks);
    let ttft = task["ttft_ms"].as_f64().expect("ttft_ms is stored");
    assert!(ttft > 0.0, "{task}");

    // The front door's own metrics: the request by model and status, its time to first
    // token, the streams gauge. (The recorder is the test process's: other tests count in
    // it too, hence no exact values.)
    let metrics = app.metrics().await;
    let sample = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    assert!(sample(r#"ti_scheduler_openai_requests_total{model="llama-7b",status="200"}"#) >= 1.0);
    assert!(sample("ti_scheduler_openai_ttft_seconds_count") >= 1.0);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ti_scheduler_openai_streams_open ")),
        "the streams gauge is exported"
    );
    assert!(metrics.contains("# HELP ti_scheduler_openai_ttft_seconds"));
}

#[tokio::test]
async fn the_answer_carries_its_task_id_and_backend_errors_pass_through_unchanged() {
    let (app, server, _ti) = app_with_backend(sim(1.0, 0.0)).await;

    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let task_id = resp.headers()["x-task-id"].to_str().unwrap().to_string();
    assert_eq!(task_id, only_task(&app).await);
    assert_eq!(completed(&app, &task_id).await["outcome"], "succeeded");

    // The backend refuses an empty list of messages: its 400 and body reach the client.
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let task_id = resp.headers()["x-task-id"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["message"], "messages is required (a non-empty list)",
        "the backend's own body"
    );
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "failed");
    assert_eq!(task["result"]["upstream_status"], 400);
    assert_eq!(server.stats().rejected, 1);
}

#[tokio::test]
async fn the_front_door_answers_its_own_errors_in_the_openai_shape() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(1.0, 0.0)).await;
    let ti = app.register_openai(&server, json!({})).await;
    // A model served only by a callback TI is not on the front door.
    let _callback = spawn_ti("ocr", "cpu", 5.0).await;
    app.register(&_callback).await;
    let client = openai(&app, "unused");

    let mut unknown = chat("hi", 2);
    unknown.model = "gpt-9".into();
    match client.chat().create(unknown).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.code.as_deref(), Some("model_not_found"), "{e:?}");
            assert!(e.message.contains("gpt-9"), "{e:?}");
        }
        other => panic!("expected model_not_found, got {other:?}"),
    }
    let mut callback_only = chat("hi", 2);
    callback_only.model = "ocr".into();
    assert!(matches!(
        client.chat().create(callback_only).await,
        Err(OpenAIError::ApiError(e)) if e.code.as_deref() == Some("model_not_found")
    ));

    let cases = [
        (
            "/v1/chat/completions",
            "{not json",
            "not valid JSON",
            Value::Null,
        ),
        ("/v1/chat/completions", "[1]", "JSON object", Value::Null),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            "model",
            json!("model"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "llama-7b"}"#,
            "messages",
            json!("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model": "llama-7b", "messages": [], "stream": "yes"}"#,
            "stream",
            json!("stream"),
        ),
        (
            "/v1/completions",
            r#"{"model": "llama-7b"}"#,
            "prompt",
            json!("prompt"),
        ),
    ];
    for (path, body, needle, param) in cases {
        let (status, answer) = app.post_raw(path, "application/json", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        assert_eq!(answer["error"]["param"], param, "{body}");
    }
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tasks").await,
        0,
        "no task for a bad request"
    );

    // With its only TI unhealthy, the model has no usable TI: 503.
    server.set_faults(OpenAiFaults {
        fail_health: true,
        ..OpenAiFaults::default()
    });
    wait_for("the TI to be unhealthy", || async {
        (!app.healthy(&ti).await).then_some(())
    })
    .await;
    // (Plain HTTP: the client library retries a 503 with backoff for a minute.)
    let (status, answer) = app
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"]["code"], "no_usable_instance");
    assert!(answer["error"]["message"].as_str().unwrap().contains(MODEL));
}

#[tokio::test]
async fn a_failure_before_the_first_byte_is_retried_on_another_ti() {
    let app = spawn_app().await;
    let broken = spawn_openai(sim(1.0, 0.0)).await;
    broken.set_faults(OpenAiFaults {
        server_error: true,
        ..OpenAiFaults::default()
    });
    let good = spawn_openai(sim(1.0, 0.0)).await;
    let broken_ti = app.register_openai(&broken, json!({})).await;
    app.register_openai(&good, json!({})).await;
    app.set_strategy("round_robin").await;
    let client = openai(&app, "unused");

    for i in 0..4 {
        let mut request = chat("retry me", 3);
        request.stream = Some(i % 2 == 1);
        if i % 2 == 1 {
            let mut stream = client.chat().create_stream(request).await.expect("stream");
            while let Some(chunk) = stream.next().await {
                chunk.expect("every chunk arrives");
            }
        } else {
            client.chat().create(request).await.expect("answered");
        }
    }
    assert!(broken.stats().faulted >= 1, "the broken TI was tried");
    wait_for("every request to be stored as succeeded", || async {
        (app.count("SELECT COUNT(*) FROM tasks WHERE outcome = 'succeeded'")
            .await
            == 4)
            .then_some(())
    })
    .await;
    assert_eq!(
        good.stats().completed,
        4,
        "the good TI answered every request"
    );
    assert!(
        app.count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE reason = 'reroute' AND chosen_ti <> '{broken_ti}'"
        ))
        .await
            >= 1,
        "the move is a recorded decision"
    );
}

/// Starts a stream of 50 tokens and reads its first chunk: its task id and the rest of
/// its body.
async fn stream_under_way(
    app: &TestApp,
) -> (
    String,
    impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>>,
) {
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "slow"}]}))
        .send()
        .await
        .unwrap();
    let task_id = resp.headers()["x-task-id"].to_str().unwrap().to_string();
    let mut body = Box::pin(resp.bytes_stream());
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(first.starts_with(b"data:"), "{first:?}");
    (task_id, body)
}

/// Reads the rest of a stream, which must end in an error (its connection cut) before the
/// answer is whole, never as if whole.
async fn read_until_cut(body: impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>>) {
    let mut body = std::pin::pin!(body);
    let mut after: Vec<u8> = Vec::new();
    let ended = loop {
        match body.next().await {
            Some(Ok(bytes)) => after.extend_from_slice(&bytes),
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the client's stream ended as if whole after {:?}",
        String::from_utf8_lossy(&after)
    );
    assert!(
        !String::from_utf8_lossy(&after).contains("[DONE]"),
        "the answer was not whole"
    );
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request_upstream() {
    // Slow tokens: a stream lasts seconds, a plain answer too.
    let (app, server, _ti) = app_with_backend(sim(2_000.0, 200.0)).await;

    // A plain request whose client gives up while the backend works.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(app.url("/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": "slow", "max_tokens": 4}))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client timed out");
    let task = completed(&app, &only_task(&app).await).await;
    assert_eq!(task["outcome"], "failed");
    assert_eq!(task["result"]["error"], "client disconnected");
    wait_for("the backend to drop the request", || async {
        (server.stats().running == 0).then_some(())
    })
    .await;

    // A stream whose client reads one chunk and leaves.
    let (task_id, body) = stream_under_way(&app).await;
    drop(body);
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "failed", "{task}");
    assert_eq!(task["result"]["error"], "client disconnected");
    wait_for("the backend to stop generating", || async {
        (server.stats().running == 0).then_some(())
    })
    .await;
    assert_eq!(
        server.stats().completed,
        0,
        "neither request ran to its end"
    );
}

#[tokio::test]
async fn a_stream_cut_by_a_stop_ends_in_an_error_not_as_a_whole_answer() {
    // Slow tokens: the stream is still going when the service stops (no grace in tests).
    let (app, server, _ti) = app_with_backend(sim(0.0, 200.0)).await;
    let (task_id, body) = stream_under_way(&app).await;

    let (settings, dir) = app.stop().await;
    read_until_cut(body).await;

    let app = restart_from(settings, dir).await;
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "failed", "{task}");
    assert_eq!(task["result"]["error"], "the scheduler is shutting down");
    wait_for("the backend to stop generating", || async {
        (server.stats().running == 0).then_some(())
    })
    .await;
    assert_eq!(
        server.stats().completed,
        0,
        "the request did not run to its end"
    );
}

#[tokio::test]
async fn a_stream_that_outlasts_the_request_timeout_is_cut_and_fails() {
    // 50 tokens 200 ms apart: ten seconds of stream, and one second allowed.
    let app = spawn_app_with(|s| s.ti.request_timeout_ms = 1_000).await;
    let server = spawn_openai(sim(0.0, 200.0)).await;
    app.register_openai(&server, json!({})).await;
    let (task_id, body) = stream_under_way(&app).await;

    read_until_cut(body).await;
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "failed", "{task}");
    assert_eq!(
        task["result"]["error"],
        "the TI's stream broke: timed out after 1000 ms"
    );
    wait_for("the backend to stop generating", || async {
        (server.stats().running == 0).then_some(())
    })
    .await;
    assert_eq!(server.stats().completed, 0, "the request was cut upstream");
}

#[tokio::test]
async fn a_request_left_unanswered_by_a_restart_is_completed_as_failed() {
    let (app, server, _ti) = app_with_backend(sim(30_000.0, 0.0)).await;
    let client = app.client.clone();
    let url = app.url("/v1/completions");
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"model": MODEL, "prompt": "long", "max_tokens": 2}))
            .send()
            .await
            .map(|r| r.status())
    });
    wait_for("the backend to run the request", || async {
        (server.stats().running == 1).then_some(())
    })
    .await;
    let task_id = only_task(&app).await;

    let app = app.restart().await;
    let answered = pending.await.unwrap();
    assert!(
        answered
            .as_ref()
            .map_or(true, |s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "the client is told or cut off: {answered:?}"
    );
    let task = completed(&app, &task_id).await;
    assert_eq!(task["outcome"], "failed");
    assert_eq!(task["result"]["error"], "scheduler restarted");
    assert_eq!(server.stats().completed, 0, "it is not sent again");
}

#[tokio::test]
async fn api_keys_guard_the_front_door_and_not_the_rest() {
    let app =
        spawn_app_with(|s| s.server.api_keys = vec!["key-one".into(), "key-two".into()]).await;
    let server = spawn_openai(sim(1.0, 0.0)).await;
    app.register_openai(&server, json!({})).await;

    for key in ["", "wrong"] {
        match openai(&app, key).models().list().await {
            Err(OpenAIError::ApiError(e)) => {
                assert_eq!(e.code.as_deref(), Some("invalid_api_key"), "{e:?}")
            }
            other => panic!("expected 401 for key {key:?}, got {other:?}"),
        }
    }
    let resp = app.client.get(app.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for key in ["key-one", "key-two"] {
        openai(&app, key)
            .chat()
            .create(chat("hi", 2))
            .await
            .unwrap_or_else(|e| panic!("key {key}: {e}"));
    }
    let (status, _) = app.get("/ti/list").await;
    assert_eq!(status, StatusCode::OK, "the keys are for /v1/* only");
}

#[tokio::test]
async fn the_front_door_is_refused_by_admission_control_and_by_a_drain() {
    let app = spawn_app_with(|s| s.scheduling.max_waiting_tasks = 1).await;
    let server = spawn_openai(sim(1_500.0, 0.0)).await;
    app.register_openai(&server, json!({})).await;
    let request = json!({"model": MODEL, "prompt": "one", "max_tokens": 1});

    let (client, url, body) = (
        app.client.clone(),
        app.url("/v1/completions"),
        request.clone(),
    );
    let first = tokio::spawn(async move {
        let resp = client.post(url).json(&body).send().await.unwrap();
        resp.status()
    });
    wait_for("the first request to run", || async {
        (server.stats().running == 1).then_some(())
    })
    .await;

    let resp = app
        .client
        .post(app.url("/v1/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");

    let (status, _) = app.post("/admin/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.post("/v1/completions", request).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "draining", "{body}");

    assert_eq!(
        first.await.unwrap(),
        StatusCode::OK,
        "the drain lets it finish"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM tasks").await,
        1,
        "refused requests leave no task"
    );
}

#[tokio::test]
async fn oversized_and_overdeep_bodies_are_refused_in_the_openai_shape() {
    let app = spawn_app_with(|s| {
        s.server.body_limit_bytes = 2_048;
        s.server.max_json_depth = 8;
    })
    .await;
    let server = spawn_openai(sim(1.0, 0.0)).await;
    app.register_openai(&server, json!({})).await;

    let long = "x".repeat(4_096);
    let (status, body) = app
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": long, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    let deep = format!("{}1{}", "[".repeat(20), "]".repeat(20));
    let text = format!(r#"{{"model": "{MODEL}", "prompt": "p", "logit_bias": {deep}}}"#);
    let (status, body) = app
        .post_raw("/v1/completions", "application/json", text)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("server.max_json_depth"), "{body}");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
    assert_eq!(server.stats().requests, 0, "nothing reached the TI");
}
