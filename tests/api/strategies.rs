use std::collections::HashMap;

use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_ti};

async fn batch(app: &crate::helpers::TestApp, model: &str, tasks: Vec<Value>) -> Vec<String> {
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": model, "tasks": tasks}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["scheduled_ti"].as_str().unwrap().to_string())
        .collect()
}

fn shares(chosen: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for ti in chosen {
        *counts.entry(ti.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn round_robin_gives_exactly_equal_shares() {
    let app = spawn_app().await;
    let tis = [
        spawn_ti("llama-7b", "A100", 5.0).await,
        spawn_ti("llama-7b", "A100", 50.0).await,
        spawn_ti("llama-7b", "H100", 500.0).await,
    ];
    let mut ids = Vec::new();
    for ti in &tis {
        ids.push(app.register(ti).await);
    }
    app.set_strategy("round_robin").await;
    let mut chosen = Vec::new();
    for _ in 0..30 {
        chosen.push(app.submit("llama-7b", json!({})).await.1);
    }
    let counts = shares(&chosen);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&10), "{counts:?}");
    }
    assert_eq!(&chosen[..3], &ids[..], "in registration order");
}

#[tokio::test]
async fn shortest_queue_avoids_a_loaded_ti() {
    let app = spawn_app().await;
    let loaded = spawn_ti("llama-7b", "A100", 2_000.0).await;
    let loaded_id = app.register(&loaded).await;
    batch(
        &app,
        "llama-7b",
        vec![json!({"task_input": {}, "metadata": {"expected_ms": 2000.0}}); 4],
    )
    .await;
    let idle = spawn_ti("llama-7b", "A100", 10.0).await;
    let idle_id = app.register(&idle).await;

    let chosen = batch(
        &app,
        "llama-7b",
        vec![json!({"task_input": {}, "metadata": {"expected_ms": 100.0}}); 10],
    )
    .await;
    assert!(chosen.iter().all(|t| *t == idle_id), "{chosen:?}");
    let decision: String = app
        .sql_text("SELECT candidates FROM decisions ORDER BY id DESC LIMIT 1")
        .await;
    let candidates: Value = serde_json::from_str(&decision).unwrap();
    let loaded_wait = candidates
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ti_uuid"] == loaded_id.as_str())
        .unwrap()["wait_ms"]
        .as_f64()
        .unwrap();
    assert!(
        loaded_wait > 5_000.0,
        "the decision records the loaded TI's wait: {candidates}"
    );
}

#[tokio::test]
async fn weighted_prefers_the_low_error_ti_at_equal_wait() {
    let app = spawn_app().await;
    let steady = spawn_ti("llama-7b", "A100", 5_000.0).await;
    let erratic = spawn_ti("llama-7b", "A100", 5_000.0).await;
    let steady_id = app.register(&steady).await;
    let erratic_id = app.register(&erratic).await;
    app.set_strategy("round_robin").await;
    let preload = batch(
        &app,
        "llama-7b",
        vec![
            json!({"task_input": {}, "metadata": {"expected_ms": 1000.0, "expected_error_ms": 10.0}}),
            json!({"task_input": {}, "metadata": {"expected_ms": 1000.0, "expected_error_ms": 600.0}}),
        ],
    )
    .await;
    assert_eq!(preload, vec![steady_id.clone(), erratic_id.clone()]);

    app.set_strategy("weighted").await;
    let chosen = batch(
        &app,
        "llama-7b",
        vec![
            json!({"task_input": {}, "metadata": {"expected_ms": 5.0, "expected_error_ms": 0.0}});
            5
        ],
    )
    .await;
    assert!(chosen.iter().all(|t| *t == steady_id), "{chosen:?}");
}

#[tokio::test]
async fn probabilistic_with_a_fixed_seed_gives_every_ti_a_share_and_the_least_loaded_the_most() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    let mut tis = Vec::new();
    for _ in 0..3 {
        let ti = spawn_ti("llama-7b", "A100", 60_000.0).await;
        ids.push(app.register(&ti).await);
        tis.push(ti);
    }
    app.set_strategy("round_robin").await;
    let loads = [500.0, 700.0, 900.0];
    let preload = batch(
        &app,
        "llama-7b",
        loads
            .iter()
            .map(|ms| json!({"task_input": {}, "metadata": {"expected_ms": ms, "expected_error_ms": 300.0}}))
            .collect(),
    )
    .await;
    assert_eq!(preload, ids);

    app.set_strategy("probabilistic").await;
    let chosen = batch(
        &app,
        "llama-7b",
        vec![
            json!({"task_input": {}, "metadata": {"expected_ms": 0.0, "expected_error_ms": 0.0}});
            150
        ],
    )
    .await;
    let counts = shares(&chosen);
    let n: Vec<usize> = ids
        .iter()
        .map(|id| counts.get(id).copied().unwrap_or(0))
        .collect();
    assert!(n.iter().all(|&c| c > 0), "every TI gets a share: {n:?}");
    assert!(
        n[0] > n[1] && n[1] > n[2],
        "the least loaded gets the most: {n:?}"
    );
}
