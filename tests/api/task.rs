use reqwest::StatusCode;
use serde_json::json;
use ti_scheduler::ti::sim::{Faults, SimConfig};

use crate::helpers::{assert_message, spawn_app, spawn_ti, spawn_ti_with, wait_for};

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn a_task_goes_from_submit_to_completed_with_the_tis_result() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 300.0).await;
    let ti_id = app.register(&ti).await;
    let before = now();
    let (task_id, scheduled) = app.submit("llama-7b", json!({"input_tokens": 12})).await;
    let after = now();
    assert!(task_id.starts_with("task-"), "{task_id}");
    assert_eq!(scheduled, ti_id);

    let first = app.query(&task_id).await;
    assert!(
        matches!(first["task_status"].as_str(), Some("queued" | "scheduled")),
        "{first}"
    );
    assert!(first["result"].is_null());
    assert!(
        first["outcome"].is_null(),
        "no outcome before completion: {first}"
    );
    let submit_time = first["submit_time"].as_f64().unwrap();
    assert!(
        submit_time >= before - 0.002 && submit_time <= after + 0.002,
        "{submit_time} not in [{before}, {after}]"
    );
    assert_eq!(
        (submit_time * 1000.0).round() / 1000.0,
        submit_time,
        "millisecond precision"
    );

    wait_for("the TI to accept the task", || async {
        (app.query(&task_id).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    let done = app.wait_completed(&task_id).await;
    assert_eq!(done["task_id"], task_id.as_str());
    assert_eq!(done["scheduled_ti"], ti_id.as_str());
    assert_eq!(done["submit_time"], first["submit_time"]);
    assert_eq!(done["result"]["input"], json!({"prompt": "hello"}));
    assert_eq!(done["result"]["model"], "llama-7b");
    assert!(done["execution_time"].as_f64().unwrap() >= 300.0, "{done}");
    assert!(done["completion_time"].as_f64().unwrap() >= submit_time);
    assert_eq!(done["result_expired"], false);
    assert_eq!(done["outcome"], "succeeded");
    let row = app
        .sql_row(&format!(
            "SELECT outcome, status FROM tasks WHERE task_id = '{task_id}'"
        ))
        .await;
    assert_eq!(row, ["succeeded", "completed"]);
}

#[tokio::test]
async fn a_failed_execution_stores_the_error_as_the_result_and_shows_outcome_failed() {
    let app = spawn_app().await;
    let ti = spawn_ti_with(SimConfig {
        model: "llama-7b".into(),
        base_ms: 5.0,
        faults: Faults {
            fail_tasks: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    app.register(&ti).await;
    let (task_id, _) = app.submit("llama-7b", json!({})).await;
    let done = app.wait_completed(&task_id).await;
    assert_eq!(
        done["result"],
        json!({"error": "simulated failure on llama-7b"})
    );
    assert_eq!(done["outcome"], "failed", "{done}");
    let outcome: String = app
        .sql_text(&format!(
            "SELECT outcome FROM tasks WHERE task_id = '{task_id}'"
        ))
        .await;
    assert_eq!(outcome, "failed");
}

#[tokio::test]
async fn querying_an_unknown_task_is_404_echoing_the_id() {
    let app = spawn_app().await;
    let (status, body) = app.get("/task/query?task_id=task-nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"status": "error", "message": "task 'task-nope' not found", "task_id": "task-nope"})
    );
    let (status, body) = app.post("/task/query", json!({"task_id": "other"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["task_id"], "other");
    let (status, body) = app.get("/task/query").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "task_id");
}

#[tokio::test]
async fn a_task_can_be_queried_by_post_as_well() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let (task_id, _) = app.submit("llama-7b", json!({})).await;
    let (status, body) = app.post("/task/query", json!({"task_id": task_id})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["task_id"], task_id.as_str());
}
