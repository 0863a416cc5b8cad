use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{spawn_app, spawn_ti};

#[tokio::test]
async fn health_and_ready_answer_success() {
    let app = spawn_app().await;
    let (status, body) = app.get("/health").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("success"))
    );
    let (status, body) = app.get("/ready").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("success"))
    );
}

#[tokio::test]
async fn openapi_document_covers_every_endpoint() {
    let app = spawn_app().await;
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/scheduler/set",
        "/scheduler/predict_mode",
        "/scheduler/info",
        "/ti/register",
        "/ti/remove",
        "/ti/list",
        "/queue/submit",
        "/queue/submit_batch",
        "/queue/info",
        "/task/query",
        "/tasks",
        "/task/decisions",
        "/stats",
        "/result/submit",
        "/predictor/lookup_table",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        paths["/queue/info"].get("post").is_some() && paths["/queue/info"].get("get").is_some()
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_submits_and_queue_gauges() {
    let app = spawn_app().await;
    let ti = spawn_ti("m-metrics", "A100", 10.0).await;
    let ti_uuid = app.register(&ti).await;
    let (task_id, _) = app.submit("m-metrics", json!({})).await;
    app.wait_completed(&task_id).await;
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert!(text.contains("ti_scheduler_submits_total"), "{text}");
    assert!(text.contains("ti_scheduler_completions_total"), "{text}");
    assert!(
        text.contains("ti_scheduler_db_commit_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("ti_scheduler_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "ti_scheduler_ti_queue_length{{ti_uuid=\"{ti_uuid}\""
        )),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_route_answers_404_with_the_json_envelope() {
    let app = spawn_app().await;
    let (status, body) = app.get("/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["status"], "error");
    assert!(body["message"].as_str().unwrap().contains("/no/such/route"));
}

#[tokio::test]
async fn wrong_method_answers_405_with_the_json_envelope() {
    let app = spawn_app().await;
    let (status, body) = app.get("/queue/submit").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["status"], "error");
}
