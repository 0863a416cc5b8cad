use reqwest::StatusCode;
use serde_json::json;
use ti_scheduler::ti::sim::{Faults, SimConfig};

use crate::helpers::{spawn_app, spawn_ti, spawn_ti_with, wait_for};

#[tokio::test]
async fn registering_returns_a_uuid_and_the_same_one_for_the_same_address() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let body = json!({"host": "127.0.0.1", "port": ti.addr().port()});
    let (status, first) = app.post("/ti/register", body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["status"], "success");
    assert_eq!(first["message"], "TaskInstance registered successfully");
    let id = first["ti_uuid"].as_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(id).is_ok_and(|u| u.get_version_num() == 4),
        "{id}"
    );
    let (_, second) = app.post("/ti/register", body).await;
    assert_eq!(second["ti_uuid"], id);
    assert_eq!(app.count("SELECT COUNT(*) FROM task_instances").await, 1);
    let (_, list) = app.get("/ti/list").await;
    let tis = list["tis"].as_array().unwrap();
    assert_eq!(tis.len(), 1);
    assert_eq!(tis[0]["model_name"], "llama-7b");
    assert_eq!(tis[0]["hardware"], "A100");
    assert_eq!(tis[0]["healthy"], true);
    assert!(tis[0]["removed_at"].is_null());
}

#[tokio::test]
async fn registering_an_address_where_nothing_listens_is_502_connection_refused() {
    let app = spawn_app().await;
    let free_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": free_port}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        body,
        json!({"status": "error", "message": "Connection refused", "ti_uuid": ""})
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM task_instances").await, 0);
}

#[tokio::test]
async fn registering_an_unhealthy_ti_is_502_health_check_failed() {
    let app = spawn_app().await;
    let ti = spawn_ti_with(SimConfig {
        model: "llama-7b".into(),
        faults: Faults {
            fail_health: true,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": ti.addr().port()}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["message"], "Health check failed: HTTP 500");
    assert_eq!(body["ti_uuid"], "");
}

#[tokio::test]
async fn bad_host_port_or_model_name_is_400_without_connecting() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let port = ti.addr().port();
    let cases = [
        (json!({"host": "", "port": port}), "host must not be empty"),
        (
            json!({"host": "127.0.0.1", "port": 0}),
            "port must be in 1..=65535, got 0",
        ),
        (
            json!({"host": "127.0.0.1", "port": 70000}),
            "port must be in 1..=65535, got 70000",
        ),
        (
            json!({"host": "127.0.0.1", "port": "80"}),
            "port: invalid type",
        ),
        (json!({"port": port}), "missing field `host`"),
        (
            json!({"host": "127.0.0.1", "port": port, "model_name": "gpt-4"}),
            "model_name 'gpt-4' does not match the model 'llama-7b'",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = app.post("/ti/register", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            answer["message"].as_str().unwrap().contains(expected),
            "{body} → {answer}"
        );
        assert_eq!(answer["ti_uuid"], "");
    }
    assert_eq!(app.count("SELECT COUNT(*) FROM task_instances").await, 0);
}

#[tokio::test]
async fn removing_checks_the_uuid_and_echoes_it() {
    let app = spawn_app().await;
    let (status, body) = app
        .post("/ti/remove", json!({"ti_uuid": "not-a-uuid"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"status": "error", "message": "Invalid UUID format", "ti_uuid": "not-a-uuid"})
    );
    let unknown = "3f8e2b9c-1d4a-4c5e-9f7a-2b6c8d0e1f3a";
    let (status, body) = app.post("/ti/remove", json!({"ti_uuid": unknown})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"status": "error", "message": "TaskInstance not found", "ti_uuid": unknown})
    );

    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let id = app.register(&ti).await;
    let (status, body) = app.post("/ti/remove", json!({"ti_uuid": id})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["ti_uuid"], id.as_str());
    assert_eq!(body["message"], "TaskInstance removed successfully");
    let (status, _) = app.post("/ti/remove", json!({"ti_uuid": id})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "already removed");
}

#[tokio::test]
async fn a_removed_ti_gets_no_new_tasks_but_its_in_flight_results_are_stored() {
    let app = spawn_app().await;
    let slow = spawn_ti("llama-7b", "A100", 400.0).await;
    let other = spawn_ti("llama-7b", "A100", 10.0).await;
    let slow_id = app.register(&slow).await;
    let (in_flight, on) = app.submit("llama-7b", json!({})).await;
    assert_eq!(on, slow_id);
    wait_for("the slow TI to accept the task", || async {
        (app.query(&in_flight).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    let other_id = app.register(&other).await;
    let (status, _) = app.post("/ti/remove", json!({"ti_uuid": slow_id})).await;
    assert_eq!(status, StatusCode::OK);

    for _ in 0..5 {
        let (_, ti) = app.submit("llama-7b", json!({})).await;
        assert_eq!(ti, other_id, "no new task goes to a removed TI");
    }
    let done = app.wait_completed(&in_flight).await;
    assert_eq!(done["scheduled_ti"], slow_id.as_str());
    assert_eq!(done["result"]["hardware"], "A100");

    let (_, info) = app.get("/queue/info").await;
    let listed: Vec<_> = info["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["ti_uuid"].clone())
        .collect();
    assert_eq!(
        listed,
        vec![json!(other_id)],
        "removed TIs leave /queue/info"
    );
    let (_, list) = app.get("/ti/list").await;
    let removed = list["tis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["ti_uuid"] == slow_id.as_str())
        .unwrap();
    assert!(removed["removed_at"].as_f64().is_some(), "{removed}");
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE chosen_ti = '{slow_id}'"
        ))
        .await,
        1,
        "history naming it is kept"
    );
}

#[tokio::test]
async fn registering_a_removed_address_again_revives_the_same_uuid() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let id = app.register(&ti).await;
    app.post("/ti/remove", json!({"ti_uuid": id})).await;
    let again = app.register(&ti).await;
    assert_eq!(again, id);
    let (_, list) = app.get("/ti/list").await;
    assert!(list["tis"][0]["removed_at"].is_null());
    let (_, ti_chosen) = app.submit("llama-7b", json!({})).await;
    assert_eq!(ti_chosen, id);
}

#[tokio::test]
async fn registering_outside_the_allow_list_is_400_without_connecting() {
    let app = crate::helpers::spawn_app_with(|s| {
        s.ti.allowed_hosts = vec!["10.0.0.0/8".into(), "ti.internal".into()]
    })
    .await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": ti.addr().port()}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "host '127.0.0.1' is not in the allowed TI hosts (ti.allowed_hosts)"
    );
    assert_eq!(body["ti_uuid"], "");

    let allowed =
        crate::helpers::spawn_app_with(|s| s.ti.allowed_hosts = vec!["127.0.0.0/8".into()]).await;
    allowed.register(&ti).await;
}

#[tokio::test]
async fn registering_a_ti_that_does_not_answer_is_502_timed_out() {
    let app = spawn_app().await;
    // Accepts connections (the kernel does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (status, body) = app
        .post("/ti/register", json!({"host": "127.0.0.1", "port": port}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["message"], "timed out after 500 ms");
    drop(silent);
}
