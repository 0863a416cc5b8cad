//! Why a task went where it did, and what the service did lately:
//! `GET /task/decisions` and `GET /stats`, read from the database.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_message, spawn_app, spawn_ti};

#[tokio::test]
async fn a_tasks_decisions_show_every_candidate_with_its_estimates() {
    let app = spawn_app().await;
    let fast = spawn_ti("llama-7b", "A100", 20.0).await;
    let slow = spawn_ti("llama-7b", "T4", 20.0).await;
    let fast_ti = app.register(&fast).await;
    let slow_ti = app.register(&slow).await;
    let (task, chosen) = app.submit("llama-7b", json!({"expected_ms": 40})).await;
    app.wait_completed(&task).await;

    let (status, body) = app.get(&format!("/task/decisions?task_id={task}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task_id"], task.as_str());
    let decisions = body["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 1, "{body}");
    let d = &decisions[0];
    assert_eq!(d["reason"], "submit");
    assert_eq!(d["strategy"], "shortest_queue");
    assert_eq!(d["chosen_ti"], chosen.as_str());
    assert_eq!(d["predicted_ms"], 40.0);
    assert_eq!(d["prediction_source"], "metadata_hint");
    let mut candidates: Vec<&str> = d["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ti_uuid"].as_str().unwrap())
        .collect();
    candidates.sort_unstable();
    let mut expected = vec![fast_ti.as_str(), slow_ti.as_str()];
    expected.sort_unstable();
    assert_eq!(candidates, expected);
    for key in [
        "wait_ms",
        "wait_error_ms",
        "queue_length",
        "predicted_ms",
        "score",
    ] {
        assert!(d["candidates"][0].get(key).is_some(), "{key} in {d}");
    }

    let (status, body) = app.get("/task/decisions?task_id=nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_message(&body, "task 'nope' not found");
}

#[tokio::test]
async fn stats_count_what_was_submitted_and_completed_in_the_window() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let ti_id = app.register(&ti).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(app.submit("llama-7b", json!({"expected_ms": 10})).await.0);
    }
    for task in &tasks {
        app.wait_completed(task).await;
    }
    let (status, body) = app.get("/stats?window_s=60").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["window_s"], 60.0);
    let model = &body["models"][0];
    assert_eq!(model["model_name"], "llama-7b");
    assert_eq!(
        (model["submitted"].clone(), model["completed"].clone()),
        (json!(5), json!(5))
    );
    assert_eq!(model["failed"], 0);
    assert!((model["throughput_per_s"].as_f64().unwrap() - 5.0 / 60.0).abs() < 1e-9);
    let p50 = model["jct_ms"]["p50"].as_f64().unwrap();
    assert!(p50 >= 10.0, "{model}");
    assert!(model["prediction_mape"].as_f64().unwrap() >= 0.0);
    let tis: &Value = &body["tis"];
    assert_eq!(tis[0]["ti_uuid"], ti_id.as_str());
    assert_eq!(tis[0]["completed"], 5);
    let busy = tis[0]["busy_share"].as_f64().unwrap();
    assert!(busy > 0.0 && busy < 1.0, "{busy}");

    let (status, body) = app.get("/stats?window_s=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "window_s must be in 1..=86400, got 0");
}
