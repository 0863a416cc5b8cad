use serde_json::json;
use ti_scheduler::config::CleanupSettings;
use ti_scheduler::jobs::{run_cleanup_once, CleanupReport};
use ti_scheduler::ti::sim::Faults;
use tokio_util::sync::CancellationToken;

use crate::helpers::{open_store, spawn_app_with, spawn_ti};

#[tokio::test]
async fn cleanup_expires_results_then_purges_old_tasks_but_never_unfinished_ones() {
    let app = spawn_app_with(|s| s.ti.reconcile_after_ms = 600_000).await;
    let fast = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&fast).await;
    let mut done = Vec::new();
    for _ in 0..3 {
        let (task, _) = app.submit("llama-7b", json!({})).await;
        app.wait_completed(&task).await;
        done.push(task);
    }
    let silent = spawn_ti("ocr", "T4", 5.0).await;
    silent.set_faults(Faults {
        drop_callbacks: true,
        ..Faults::default()
    });
    app.register(&silent).await;
    let (unfinished, _) = app.submit("ocr", json!({})).await;

    // A second connection to the same file, as the cron job's would be.
    let stop = CancellationToken::new();
    let (db, writer) = open_store(&app.settings, stop.clone()).await;
    let settings = CleanupSettings {
        result_ttl_secs: 60,
        retention_secs: 3600,
        batch_size: 2,
        ..CleanupSettings::default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let report = run_cleanup_once(&db, &settings, now).await.unwrap();
    assert_eq!(report, CleanupReport::default(), "nothing is old yet");

    let report = run_cleanup_once(&db, &settings, now + 120.0).await.unwrap();
    assert_eq!(
        report,
        CleanupReport {
            expired: 3,
            purged: 0
        }
    );
    let expired = app.query(&done[0]).await;
    assert_eq!(expired["task_status"], "completed");
    assert!(expired["result"].is_null());
    assert_eq!(expired["result_expired"], true);

    let report = run_cleanup_once(&db, &settings, now + 7200.0)
        .await
        .unwrap();
    assert_eq!(
        report,
        CleanupReport {
            expired: 0,
            purged: 3
        }
    );
    let (status, _) = app.get(&format!("/task/query?task_id={}", done[0])).await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE task_id = '{}'",
            done[1]
        ))
        .await,
        0,
        "decisions go with their task"
    );
    let kept = app.query(&unfinished).await;
    assert_ne!(kept["task_status"], "completed");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 1);

    stop.cancel();
    writer.await.unwrap();
}
