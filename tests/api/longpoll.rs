//! Results without polling: `/task/query` with `wait_ms` answers when the
//! task completes (woken by the completion) or when `wait_ms` passes, on both kinds of TI.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use ti_scheduler::ti::openai_sim::OpenAiSimConfig;

use crate::helpers::{assert_message, spawn_app, spawn_openai, spawn_ti};

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_the_task_completes() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 300.0).await;
    app.register(&ti).await;
    let (task, _) = app.submit("llama-7b", json!({})).await;

    let asked = Instant::now();
    let (status, body) = app
        .get(&format!("/task/query?task_id={task}&wait_ms=30000"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task_status"], "completed", "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "answered at the completion, not at the end of wait_ms"
    );
}

#[tokio::test]
async fn a_long_poll_that_runs_out_answers_the_current_state() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5_000.0).await;
    app.register(&ti).await;
    let (task, _) = app.submit("llama-7b", json!({})).await;
    let (status, body) = app
        .get(&format!("/task/query?task_id={task}&wait_ms=200"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        matches!(body["task_status"].as_str(), Some("queued" | "scheduled")),
        "{body}"
    );
    assert!(body["result"].is_null());
}

#[tokio::test]
async fn a_long_poll_by_post_waits_for_an_openai_task_too() {
    let app = spawn_app().await;
    let server = spawn_openai(OpenAiSimConfig {
        base_ms: 300.0,
        ..OpenAiSimConfig::default()
    })
    .await;
    app.register_openai(&server, json!({})).await;
    let (task, _) = app
        .submit_input("llama-7b", json!({"prompt": "wait for me"}), json!({}))
        .await;
    let (status, body) = app
        .post("/task/query", json!({"task_id": task, "wait_ms": 30000}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task_status"], "completed", "{body}");
    assert_eq!(body["result"]["object"], "text_completion");
}

#[tokio::test]
async fn a_completed_or_unknown_task_answers_at_once_and_a_bad_wait_is_400() {
    let app = spawn_app().await;
    let (status, body) = app.get("/task/query?task_id=nope&wait_ms=30000").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = app.get("/task/query?task_id=nope&wait_ms=60001").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "wait_ms must be in 0..=60000, got 60001");
    assert_eq!(body["task_id"], "nope");
}
