use reqwest::StatusCode;
use serde_json::{json, Value};

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
    assert!(
        text.contains("ti_scheduler_tasks_completed_total"),
        "{text}"
    );
    assert!(
        text.contains("ti_scheduler_db_commit_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("ti_scheduler_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains(&format!("ti_scheduler_ti_queue_length{{ti=\"{ti_uuid}\"")),
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

/// What openapi-spec-validator checks that matters here, and the conventions of the
/// document (the error envelope on every error, the admin token, enums, tags).
#[tokio::test]
async fn the_openapi_document_is_valid_and_documents_errors_auth_enums_and_content_types() {
    let app = spawn_app().await;
    let (_, doc) = app.get("/openapi.json").await;
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    // Every $ref resolves.
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &piece[..piece.find('"').unwrap()];
        assert!(schemas.contains_key(name), "unresolved $ref {name}");
    }
    let mut operation_ids = std::collections::HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let at = format!("{method} {path}");
            assert!(operation_ids.insert(op["operationId"].to_string()), "{at}");
            // A path parameter must appear in the path (the validator's complaint).
            for param in op["parameters"].as_array().into_iter().flatten() {
                if param["in"] == "path" {
                    let name = param["name"].as_str().unwrap();
                    assert!(path.contains(&format!("{{{name}}}")), "{at}: {param}");
                }
            }
            let tags = op["tags"].as_array().unwrap();
            assert_eq!(tags.len(), 1, "{at}");
            assert!(!tags[0].as_str().unwrap().contains("::"), "{at}: {tags:?}");
            let responses = op["responses"].as_object().unwrap();
            let mut expected = vec!["405", "500"];
            if op.get("requestBody").is_some() {
                expected.push("413");
            }
            for code in expected {
                assert!(responses.contains_key(code), "{at}: no {code}");
            }
            for (code, response) in responses {
                if code.starts_with(['4', '5']) {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorEnvelope",
                        "{at} {code}"
                    );
                }
            }
            if responses.contains_key("401") {
                assert_eq!(op["security"], json!([{"admin_token": []}]), "{at}");
            }
        }
    }
    let envelope = &schemas["ErrorEnvelope"];
    assert_eq!(envelope["required"], json!(["status", "message"]));
    assert_eq!(envelope["properties"]["status"]["enum"], json!(["error"]));
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"],
        json!({"type": "http", "scheme": "bearer"})
    );

    let lookup = &doc["paths"]["/predictor/lookup_table"]["post"];
    assert_eq!(lookup["parameters"][0]["name"], "append", "{lookup}");
    assert_eq!(lookup["parameters"][0]["in"], "query");
    let content = lookup["requestBody"]["content"].as_object().unwrap();
    assert!(content.contains_key("text/csv") && content.contains_key("application/json"));
    assert!(
        lookup["security"].is_array(),
        "the import needs the admin token"
    );
    assert_ne!(
        doc["paths"]["/queue/info"]["post"]["requestBody"]["required"], true,
        "POST /queue/info takes an empty body"
    );

    assert_eq!(
        schemas["TaskStatus"]["enum"],
        json!(["queued", "scheduled", "completed"])
    );
    assert_eq!(schemas["Outcome"]["enum"], json!(["succeeded", "failed"]));
    assert_eq!(
        schemas["StrategyKind"]["enum"],
        json!(["shortest_queue", "round_robin", "weighted", "probabilistic"])
    );
    assert_eq!(
        schemas["PredictMode"]["enum"],
        json!(["default", "lookup_table"])
    );
    let refers = |schema: &str, field: &str, to: &str| {
        let text = schemas[schema]["properties"][field].to_string();
        assert!(
            text.contains(&format!("#/components/schemas/{to}")),
            "{schema}.{field}: {text}"
        );
    };
    refers("TaskView", "task_status", "TaskStatus");
    refers("TaskView", "outcome", "Outcome");
    refers("HistoryTask", "task_status", "TaskStatus");
    refers("SetStrategyRequest", "name", "StrategyKind");
    refers("PredictModeRequest", "mode", "PredictMode");
    refers("SchedulerInfo", "strategies", "StrategyKind");
    for (schema, field) in [
        ("SubmitRequest", "model_name"),
        ("BatchRequest", "model_name"),
        ("TaskQuery", "task_id"),
        ("RegisterRequest", "host"),
        ("RemoveRequest", "ti_uuid"),
        ("ResultCallback", "task_id"),
    ] {
        assert_eq!(
            schemas[schema]["properties"][field]["minLength"], 1,
            "{schema}.{field}"
        );
    }
}

/// The limits the handlers enforce are in the document, so that a client generated from it
/// (or a property-based run: Schemathesis, see README) sends nothing valid that is refused.
#[tokio::test]
async fn the_openapi_document_declares_the_limits_the_handlers_enforce() {
    let app = spawn_app().await;
    let (_, doc) = app.get("/openapi.json").await;
    let param = |path: &str, name: &str| {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no parameter {name} on {path}"))["schema"]
            .clone()
    };
    let schema = |name: &str| doc["components"]["schemas"][name]["properties"].clone();
    let number = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert_eq!(number(&param("/stats", "window_s")["minimum"]), 1.0);
    assert_eq!(number(&param("/stats", "window_s")["maximum"]), 86_400.0);
    assert_eq!(
        number(&param("/task/query", "wait_ms")["maximum"]),
        60_000.0
    );
    assert_eq!(param("/task/query", "task_id")["minLength"], 1);
    assert_eq!(number(&param("/tasks", "limit")["maximum"]), 1_000.0);
    assert!(param("/tasks", "cursor")["pattern"].is_string());
    assert_eq!(
        param("/events", "Last-Event-ID"),
        json!({"type": "string", "pattern": "^[0-9]{1,19}$"}),
        "a header is a string, never null"
    );
    assert_eq!(
        number(&schema("RegisterRequest")["port"]["maximum"]),
        65_535.0
    );
    assert_eq!(
        number(&schema("RegisterRequest")["max_concurrency"]["minimum"]),
        1.0
    );
    assert_eq!(schema("BatchRequest")["tasks"]["minItems"], 1);
    assert!(schema("SubmitRequest")["task_id"]["pattern"].is_string());
    assert!(schema("RemoveRequest")["ti_uuid"]["pattern"].is_string());
}

/// What the document allows is accepted: a port written `8100.0` (a JSON Schema integer)
/// and a `null` body for `POST /queue/info` (its body is optional).
#[tokio::test]
async fn integral_numbers_and_a_null_optional_body_are_accepted() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    let port = f64::from(ti.addr().port());
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "max_concurrency": 4.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app
        .post("/ti/register", json!({"host": "127.0.0.1", "port": 8100.5}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("port"), "{body}");
    let (status, body) = app
        .post_raw("/queue/info", "application/json", "null")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queues"].as_array().unwrap().len(), 1);
    // serde reads a struct from an array too; the document says an object.
    let (status, body) = app.post_raw("/queue/info", "application/json", "[]").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}
