use serde_json::{json, Value};
use ti_scheduler::store;
use ti_scheduler::ti::sim::SimConfig;
use tokio_util::sync::CancellationToken;

use crate::helpers::{execute, open_store, spawn_app, spawn_ti_with, wait_for, TestApp};

fn law(hardware: &str, factor: f64) -> SimConfig {
    SimConfig {
        model: "llama-7b".into(),
        hardware: Some(hardware.into()),
        parallelism: 4,
        base_ms: 10.0 * factor,
        per_input_token_ms: 0.02 * factor,
        per_output_token_ms: 0.5 * factor,
        ..SimConfig::default()
    }
}

/// The candidates of the latest decision: (hardware order as registered) predicted_ms and source.
async fn last_candidates(app: &TestApp) -> Vec<Value> {
    let text: String = app
        .sql_text("SELECT candidates FROM decisions ORDER BY id DESC LIMIT 1")
        .await;
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn the_learned_model_predicts_per_hardware_survives_a_restart_and_can_be_retrained() {
    let app = spawn_app().await;
    let fast = spawn_ti_with(law("A100", 1.0)).await;
    let slow = spawn_ti_with(law("T4", 2.5)).await;
    let fast_id = app.register(&fast).await;
    app.register(&slow).await;
    app.set_strategy("round_robin").await;
    let mut tasks = Vec::new();
    for k in 0..60 {
        let meta =
            json!({"input_tokens": 100 + (k * 37) % 900, "output_tokens": 10 + (k * 13) % 90});
        tasks.push(app.submit("llama-7b", meta).await.0);
    }
    for t in &tasks {
        app.wait_completed(t).await;
    }

    app.set_strategy("shortest_queue").await;
    let (probe, chosen) = app
        .submit(
            "llama-7b",
            json!({"input_tokens": 500, "output_tokens": 50}),
        )
        .await;
    assert_eq!(
        chosen, fast_id,
        "both idle: the faster hardware completes first"
    );
    let candidates = last_candidates(&app).await;
    let predicted: Vec<f64> = candidates
        .iter()
        .map(|c| c["predicted_ms"].as_f64().unwrap())
        .collect();
    for c in &candidates {
        assert_eq!(c["prediction_source"], "learned", "{c}");
    }
    // Law: A100 10 + 0.02·500 + 0.5·50 = 45 ms; T4 2.5× that (plus timer overshoot).
    assert!((40.0..60.0).contains(&predicted[0]), "{predicted:?}");
    let ratio = predicted[1] / predicted[0];
    assert!((2.0..3.0).contains(&ratio), "{predicted:?}");
    // The learned state is saved every second.
    wait_for("the learned models to be saved", || async {
        (app.count("SELECT COUNT(*) FROM learned_models").await == 3).then_some(())
    })
    .await;

    app.wait_completed(&probe).await;
    let app = app.restart().await;
    let (probe, _) = app
        .submit(
            "llama-7b",
            json!({"input_tokens": 500, "output_tokens": 50}),
        )
        .await;
    let after: Vec<f64> = last_candidates(&app)
        .await
        .iter()
        .map(|c| c["predicted_ms"].as_f64().unwrap())
        .collect();
    assert_eq!(after.len(), 2);
    for (a, b) in after.iter().zip(&predicted) {
        assert!(
            (a - b).abs() / b < 0.1,
            "reloaded {after:?} vs {predicted:?}"
        );
    }

    // Retrain from history into a database whose learned state was lost.
    app.wait_completed(&probe).await;
    let (settings, _dir) = app.stop().await;
    execute(
        &settings,
        "DELETE FROM learned_models; DELETE FROM execution_stats;",
    )
    .await;
    let stop = CancellationToken::new();
    let (db, writer) = open_store(&settings, stop.clone()).await;
    let report = ti_scheduler::predictor::retrain(&db).await.unwrap();
    assert_eq!((report.executions, report.models), (62, 3));
    let models: Vec<ti_scheduler::predictor::StoredModel> =
        store::LearnedRepo::all(&db.read).await.unwrap();
    let a100 = models.iter().find(|m| m.hardware == "A100").unwrap();
    let x = ti_scheduler::predictor::learned::features(
        json!({"input_tokens": 500, "output_tokens": 50})
            .as_object()
            .unwrap(),
    );
    let (mean, _) = a100.model.predict(&x);
    assert!(
        (mean - predicted[0]).abs() / predicted[0] < 0.1,
        "{mean} vs {}",
        predicted[0]
    );
    stop.cancel();
    writer.await.unwrap();
}
