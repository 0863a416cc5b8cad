use serde_json::{json, Value};
use ti_scheduler::ti::sim::Faults;

use crate::helpers::{spawn_app, spawn_ti, wait_for};

#[tokio::test]
async fn the_tasks_of_a_ti_that_dies_are_rerouted_and_complete() {
    let app = spawn_app().await;
    let doomed = spawn_ti("llama-7b", "A100", 300.0).await;
    let survivor = spawn_ti("llama-7b", "A100", 20.0).await;
    let doomed_id = app.register(&doomed).await;
    let survivor_id = app.register(&survivor).await;
    app.set_strategy("round_robin").await;
    let mut on_doomed = Vec::new();
    let mut all = Vec::new();
    for _ in 0..6 {
        let (task, ti) = app.submit("llama-7b", json!({})).await;
        if ti == doomed_id {
            on_doomed.push(task.clone());
        }
        all.push(task);
    }
    assert_eq!(on_doomed.len(), 3);
    wait_for("the doomed TI to accept its first task", || async {
        (app.query(&on_doomed[0]).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    doomed.stop().await;

    for task in &all {
        app.wait_completed(task).await;
    }
    for task in &on_doomed {
        let done = app.query(task).await;
        assert_eq!(done["scheduled_ti"], survivor_id.as_str(), "{done}");
    }
    assert!(!app.healthy(&doomed_id).await);
    let reroutes = app
        .count("SELECT COUNT(*) FROM decisions WHERE reason = 'reroute'")
        .await;
    assert_eq!(reroutes, 3);
}

#[tokio::test]
async fn a_ti_refusing_dispatches_is_retried_then_its_tasks_go_elsewhere() {
    let app = spawn_app().await;
    let refusing = spawn_ti("llama-7b", "A100", 10.0).await;
    let working = spawn_ti("llama-7b", "A100", 10.0).await;
    let refusing_id = app.register(&refusing).await;
    let working_id = app.register(&working).await;
    refusing.set_faults(Faults {
        refuse_submits: true,
        ..Faults::default()
    });
    app.set_strategy("round_robin").await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(app.submit("llama-7b", json!({})).await.0);
    }
    for task in &tasks {
        let done = app.wait_completed(task).await;
        assert_eq!(done["scheduled_ti"], working_id.as_str());
    }
    assert_eq!(refusing.stats().accepted, 0);
    let rerouted = app
        .sql_rows("SELECT candidates FROM decisions WHERE reason = 'reroute'")
        .await;
    let retries = rerouted
        .iter()
        .filter(|row| {
            let candidates: Value = serde_json::from_str(row[0].as_str().unwrap()).unwrap();
            candidates[0]["ti_uuid"] == working_id.as_str()
        })
        .count();
    assert!(
        retries >= 1,
        "the refused tasks were re-routed with a decision row"
    );
    let _ = refusing_id;
}

#[tokio::test]
async fn an_unhealthy_ti_gets_no_tasks_and_is_used_again_once_healthy() {
    let app = spawn_app().await;
    let flaky = spawn_ti("llama-7b", "A100", 5.0).await;
    let steady = spawn_ti("llama-7b", "A100", 5.0).await;
    let flaky_id = app.register(&flaky).await;
    let steady_id = app.register(&steady).await;
    app.set_strategy("round_robin").await;
    flaky.set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_for("the probe to mark it unhealthy", || async {
        (!app.healthy(&flaky_id).await).then_some(())
    })
    .await;
    for _ in 0..4 {
        assert_eq!(app.submit("llama-7b", json!({})).await.1, steady_id);
    }
    flaky.set_faults(Faults::default());
    wait_for("the probe to see it healthy", || async {
        app.healthy(&flaky_id).await.then_some(())
    })
    .await;
    let mut chosen = Vec::new();
    for _ in 0..4 {
        chosen.push(app.submit("llama-7b", json!({})).await.1);
    }
    assert!(chosen.contains(&flaky_id), "{chosen:?}");
}

#[tokio::test]
async fn a_lost_callback_is_reconciled_from_the_ti() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    ti.set_faults(Faults {
        drop_callbacks: true,
        ..Faults::default()
    });
    app.register(&ti).await;
    let (task_id, _) = app.submit("llama-7b", json!({})).await;
    let done = app.wait_completed(&task_id).await;
    assert_eq!(done["result"]["model"], "llama-7b");
    assert_eq!(
        ti.stats().callbacks_delivered,
        0,
        "the result came by reconciliation"
    );
}

#[tokio::test]
async fn a_task_with_no_usable_ti_stays_queued_and_is_dispatched_when_one_is() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    let id = app.register(&ti).await;
    ti.set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_for("the probe to mark it unhealthy", || async {
        (!app.healthy(&id).await).then_some(())
    })
    .await;
    let (task_id, scheduled) = app.submit("llama-7b", json!({})).await;
    assert_eq!(scheduled, "", "no TI is usable yet");
    let waiting = app.query(&task_id).await;
    assert_eq!(waiting["task_status"], "queued");
    assert_eq!(waiting["scheduled_ti"], "");
    ti.set_faults(Faults::default());
    let done = app.wait_completed(&task_id).await;
    assert_eq!(done["scheduled_ti"], id.as_str());
}

#[tokio::test]
async fn a_ti_that_hangs_on_dispatch_times_out_and_the_task_goes_elsewhere() {
    let app = crate::helpers::spawn_app_with(|s| s.ti.dispatch_timeout_ms = 150).await;
    let hanging = spawn_ti("llama-7b", "A100", 5.0).await;
    let working = spawn_ti("llama-7b", "A100", 5.0).await;
    hanging.set_faults(Faults {
        submit_delay_ms: 5_000,
        ..Faults::default()
    });
    let hanging_id = app.register(&hanging).await;
    let working_id = app.register(&working).await;
    app.set_strategy("round_robin").await;
    let (task, first_choice) = app.submit("llama-7b", json!({})).await;
    assert_eq!(first_choice, hanging_id);
    let done = app.wait_completed(&task).await;
    assert_eq!(done["scheduled_ti"], working_id.as_str());
    assert!(!app.healthy(&hanging_id).await || hanging.stats().accepted == 0);
    let attempts = app
        .count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE task_id = '{task}'"
        ))
        .await;
    assert_eq!(attempts, 2, "one decision at submit, one for the re-route");
}

#[tokio::test]
async fn a_task_its_ti_forgot_is_sent_to_it_again() {
    // A TI that restarts loses its queue; reconciliation finds it does not know the task.
    let app = crate::helpers::spawn_app_with(|s| s.ti.reroute_after_failed_probes = 1_000).await;
    let first = spawn_ti("llama-7b", "A100", 400.0).await;
    let addr = first.addr();
    let id = app.register(&first).await;
    let (task, _) = app.submit("llama-7b", json!({})).await;
    wait_for("the TI to accept", || async {
        (app.query(&task).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    first.stop().await;
    let reborn = ti_scheduler::ti::sim::SimTi::spawn(
        ti_scheduler::ti::sim::SimConfig {
            model: "llama-7b".into(),
            base_ms: 5.0,
            ..Default::default()
        },
        addr,
    )
    .await
    .expect("the TI restarts on the same port");
    let done = app.wait_completed(&task).await;
    assert_eq!(done["scheduled_ti"], id.as_str());
    assert_eq!(
        reborn.stats().accepted,
        1,
        "the reborn TI got the task again"
    );
}
