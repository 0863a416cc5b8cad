use serde_json::json;

use crate::helpers::{spawn_app, spawn_ti};

#[tokio::test]
async fn tasks_results_tis_strategy_and_mode_survive_a_restart() {
    let app = spawn_app().await;
    let a = spawn_ti("llama-7b", "A100", 5.0).await;
    let b = spawn_ti("llama-7b", "H100", 5.0).await;
    app.register(&a).await;
    app.register(&b).await;
    app.set_strategy("round_robin").await;
    let csv = include_str!("../data/lookup.csv");
    app.post_raw("/predictor/lookup_table", "text/csv", csv)
        .await;
    let (status, _) = app
        .post("/scheduler/predict_mode", json!({"mode": "lookup_table"}))
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let mut before = Vec::new();
    for _ in 0..4 {
        let (task, _) = app.submit("llama-7b", json!({"input_tokens": 128})).await;
        before.push(app.wait_completed(&task).await);
    }
    let (_, tis_before) = app.get("/ti/list").await;

    let app = app.restart().await;

    for task in &before {
        let after = app.query(task["task_id"].as_str().unwrap()).await;
        assert_eq!(&after, task, "the task reads the same after a restart");
    }
    let (_, tis_after) = app.get("/ti/list").await;
    assert_eq!(tis_after, tis_before);
    let (_, info) = app.get("/scheduler/info").await;
    assert_eq!(info["strategy"], "round_robin");
    assert_eq!(info["predict_mode"], "lookup_table");
    assert_eq!(info["lookup_table_rows"], 4);
    let (task, _) = app.submit("llama-7b", json!({})).await;
    app.wait_completed(&task).await;
}

#[tokio::test]
async fn unfinished_tasks_complete_after_a_restart() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 200.0).await;
    let ti_id = app.register(&ti).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(
            app.submit("llama-7b", json!({"expected_ms": 200.0}))
                .await
                .0,
        );
    }
    let app = app.restart().await;
    // The TI calls back to the old address: the results come through reconciliation.
    for task in &tasks {
        let done = app.wait_completed(task).await;
        assert_eq!(done["scheduled_ti"], ti_id.as_str());
        assert_eq!(done["result"]["model"], "llama-7b");
    }
    assert_eq!(ti.stats().accepted, 4, "each task ran once");
    let q = app.queue_of(&ti_id).await;
    assert_eq!(q["queue_length"], 0, "{q}");
}

#[tokio::test]
async fn tasks_of_a_ti_unreachable_at_start_up_are_rerouted() {
    let app = spawn_app().await;
    let doomed = spawn_ti("llama-7b", "A100", 5_000.0).await;
    let survivor = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&doomed).await;
    let survivor_id = app.register(&survivor).await;
    app.set_strategy("round_robin").await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(app.submit("llama-7b", json!({})).await.0);
    }
    let (settings, dir) = app.stop().await;
    doomed.stop().await;
    let app = crate::helpers::restart_from(settings, dir).await;
    for task in &tasks {
        let done = app.wait_completed(task).await;
        assert_eq!(done["scheduled_ti"], survivor_id.as_str());
    }
    assert_eq!(survivor.stats().accepted, 4);
    let history = app
        .sql_rows("SELECT task_id, reason, chosen_ti FROM decisions ORDER BY id")
        .await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM decisions WHERE reason = 'reroute'")
            .await,
        2,
        "{history:?}"
    );
}
