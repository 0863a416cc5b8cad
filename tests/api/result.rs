use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::ti::sim::{Faults, SimTi};

use crate::helpers::{assert_message, spawn_app, spawn_ti, wait_for, TestApp};

/// A task whose TI will not call back, so the test plays the TI.
async fn silent_task(app: &TestApp) -> (SimTi, String, String, String) {
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    ti.set_faults(Faults {
        drop_callbacks: true,
        ..Faults::default()
    });
    let ti_id = app.register(&ti).await;
    let (task_id, _) = app.submit("llama-7b", json!({})).await;
    let token: String = app
        .sql_text(&format!(
            "SELECT callback_token FROM task_instances WHERE ti_uuid = '{ti_id}'"
        ))
        .await;
    (ti, task_id, ti_id, token)
}

fn callback(task_id: &str, ti: &str, token: &str, result: Value) -> Value {
    json!({"task_id": task_id, "ti_uuid": ti, "callback_token": token,
           "execution_time": 12.5, "result": result})
}

#[tokio::test]
async fn a_callback_with_the_wrong_token_or_ti_is_403_and_stores_nothing() {
    let app = spawn_app_long_reconcile().await;
    let (_ti, task_id, ti_id, token) = silent_task(&app).await;
    let (status, body) = app
        .post(
            "/result/submit",
            callback(&task_id, &ti_id, "wrong", json!({"x": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let other = spawn_ti("llama-7b", "H100", 5.0).await;
    let other_id = app.register(&other).await;
    let other_token: String = app
        .sql_text(&format!(
            "SELECT callback_token FROM task_instances WHERE ti_uuid = '{other_id}'"
        ))
        .await;
    let (status, _) = app
        .post(
            "/result/submit",
            callback(&task_id, &other_id, &other_token, json!({"x": 1})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a TI the task was not sent to"
    );
    let (status, _) = app
        .post(
            "/result/submit",
            callback(&task_id, "not-a-uuid", &token, json!({"x": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let stored = app
        .sql_value(&format!(
            "SELECT result FROM tasks WHERE task_id = '{task_id}'"
        ))
        .await;
    assert_eq!(stored, Value::Null);
    assert_ne!(app.query(&task_id).await["task_status"], "completed");
}

#[tokio::test]
async fn a_callback_for_an_unknown_task_is_404() {
    let app = spawn_app().await;
    let (status, body) = app
        .post(
            "/result/submit",
            callback(
                "task-unknown",
                "3f8e2b9c-1d4a-4c5e-9f7a-2b6c8d0e1f3a",
                "t",
                json!(1),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["message"], "task 'task-unknown' not found");
}

#[tokio::test]
async fn a_second_callback_changes_nothing_and_answers_success() {
    let app = spawn_app_long_reconcile().await;
    let (_ti, task_id, ti_id, token) = silent_task(&app).await;
    wait_for("the TI to accept", || async {
        (app.query(&task_id).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    let (status, body) = app
        .post(
            "/result/submit",
            callback(&task_id, &ti_id, &token, json!({"answer": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "success");
    let (status, _) = app
        .post(
            "/result/submit",
            callback(&task_id, &ti_id, &token, json!({"answer": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let done = app.query(&task_id).await;
    assert_eq!(done["task_status"], "completed");
    assert_eq!(
        done["result"],
        json!({"answer": 1}),
        "the first result wins"
    );
    assert_eq!(done["execution_time"], 12.5);
}

#[tokio::test]
async fn a_callback_with_a_negative_execution_time_is_400() {
    let app = spawn_app_long_reconcile().await;
    let (_ti, task_id, ti_id, token) = silent_task(&app).await;
    let mut body = callback(&task_id, &ti_id, &token, json!(1));
    body["execution_time"] = json!(-1.0);
    let (status, answer) = app.post("/result/submit", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&answer, "execution_time");
}

/// Reconciliation would otherwise fetch the result from the TI itself.
async fn spawn_app_long_reconcile() -> TestApp {
    crate::helpers::spawn_app_with(|s| s.ti.reconcile_after_ms = 600_000).await
}
