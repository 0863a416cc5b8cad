use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_message, spawn_app, spawn_app_with, spawn_ti, wait_for};

#[tokio::test]
async fn submitting_with_no_instance_for_the_model_is_503_naming_it() {
    let app = spawn_app().await;
    let body = json!({"model_name": "llama-7b", "task_input": {"prompt": "hi"}});
    let (status, answer) = app.post("/queue/submit", body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer,
        json!({"status": "error", "message": "no TaskInstance is registered for model 'llama-7b'",
               "task_id": "", "scheduled_ti": ""})
    );
    let ti = spawn_ti("ocr", "A100", 10.0).await;
    app.register(&ti).await;
    let (status, answer) = app.post("/queue/submit", body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer["message"].as_str().unwrap().contains("'llama-7b'"));
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
}

#[tokio::test]
async fn invalid_submits_are_400_naming_the_field_and_store_nothing() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    app.register(&ti).await;
    let cases = [
        (json!({"task_input": {}}), "missing field `model_name`"),
        (
            json!({"model_name": "llama-7b"}),
            "missing field `task_input`",
        ),
        (
            json!({"model_name": "", "task_input": {}}),
            "model_name must not be empty",
        ),
        (
            json!({"model_name": "llama-7b", "task_input": "text"}),
            "task_input must be a JSON object",
        ),
        (
            json!({"model_name": "llama-7b", "task_input": [1]}),
            "task_input must be a JSON object",
        ),
        (
            json!({"model_name": "llama-7b", "task_input": {}, "metadata": 5}),
            "metadata: invalid type",
        ),
        (
            json!({"model_name": 7, "task_input": {}}),
            "model_name: invalid type",
        ),
        (
            json!({"model_name": "llama-7b", "task_input": {}, "task_id": "a b"}),
            "task_id may only contain",
        ),
        (
            json!({"model_name": "llama-7b", "task_input": {}, "task_id": ""}),
            "task_id must be 1 to 128",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = app.post("/queue/submit", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            answer["message"].as_str().unwrap().contains(expected),
            "{body} → {answer}"
        );
        assert_eq!(
            (answer["task_id"].as_str(), answer["scheduled_ti"].as_str()),
            (Some(""), Some(""))
        );
    }
    let (status, _) = app
        .post_raw("/queue/submit", "application/json", "{\"model_name\":")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
    assert_eq!(app.count("SELECT COUNT(*) FROM decisions").await, 0);
}

#[tokio::test]
async fn a_client_task_id_makes_submit_idempotent() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    let ti_id = app.register(&ti).await;
    let body = json!({"model_name": "llama-7b", "task_input": {"n": 1}, "task_id": "job-42"});
    let (status, first) = app.post("/queue/submit", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["task_id"], "job-42");
    assert_eq!(first["scheduled_ti"], ti_id.as_str());
    let done = app.wait_completed("job-42").await;
    let different = json!({"model_name": "llama-7b", "task_input": {"n": 2}, "task_id": "job-42"});
    let (status, again) = app.post("/queue/submit", different).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 1);
    assert_eq!(
        app.query("job-42").await["result"],
        done["result"],
        "nothing was run again"
    );
    assert_eq!(ti.stats().accepted, 1);
}

#[tokio::test]
async fn a_batch_is_committed_whole_with_one_answer_per_task() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    let ti_id = app.register(&ti).await;
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"task_input": {"i": i}, "metadata": {"input_tokens": i}}))
        .chain([
            json!({"task_input": {}, "task_id": "batch-x"}),
            json!({"task_input": {}, "task_id": "batch-x"}),
        ])
        .collect();
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "llama-7b", "tasks": tasks}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["scheduled_ti"], ti_id.as_str());
    }
    assert_eq!(results[5]["task_id"], "batch-x");
    assert_eq!(
        results[6]["task_id"], "batch-x",
        "a repeated id inside a batch is the same task"
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 6);
    for r in results {
        app.wait_completed(r["task_id"].as_str().unwrap()).await;
    }
}

#[tokio::test]
async fn an_invalid_batch_item_is_400_naming_its_index_and_nothing_is_stored() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let tasks = json!([{"task_input": {}}, {"task_input": {}}, {"task_input": 3}]);
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "llama-7b", "tasks": tasks}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "tasks[2]: task_input must be a JSON object"
    );
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "llama-7b", "tasks": [{"task_input": {}}, {}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "tasks[1]");
    let (status, _) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "llama-7b", "tasks": []}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "none", "tasks": [{"task_input": {}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
}

#[tokio::test]
async fn queue_info_lists_registered_tis_filtered_by_model_by_get_and_post() {
    let app = spawn_app().await;
    let a = spawn_ti("llama-7b", "A100", 5.0).await;
    let b = spawn_ti("ocr", "T4", 5.0).await;
    let a_id = app.register(&a).await;
    let b_id = app.register(&b).await;
    let (status, all) = app.get("/queue/info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["status"], "success");
    assert_eq!(all["queues"].as_array().unwrap().len(), 2);
    let entry = &all["queues"][0];
    for field in [
        "model_name",
        "ti_uuid",
        "waiting_time_expect",
        "waiting_time_error",
        "queue_length",
        "healthy",
    ] {
        assert!(entry.get(field).is_some(), "{field} missing in {entry}");
    }
    let (_, llama) = app.get("/queue/info?model_name=llama-7b").await;
    assert_eq!(llama["queues"].as_array().unwrap().len(), 1);
    assert_eq!(llama["queues"][0]["ti_uuid"], a_id.as_str());
    let (_, ocr) = app.post("/queue/info", json!({"model_name": "ocr"})).await;
    assert_eq!(ocr["queues"][0]["ti_uuid"], b_id.as_str());
    let (_, none) = app.get("/queue/info?model_name=unknown").await;
    assert_eq!(none["queues"], json!([]));
    let (status, empty_body) = app.post_raw("/queue/info", "application/json", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(empty_body["queues"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn queue_info_is_positive_while_tasks_run_and_exactly_zero_when_drained() {
    let app = spawn_app().await;
    // Long enough that the first task is still running when the third is submitted and
    // the queue read, on a loaded CI machine too (150 ms was not, once).
    let ti = spawn_ti("llama-7b", "A100", 1000.0).await;
    let id = app.register(&ti).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(
            app.submit("llama-7b", json!({"expected_ms": 1000.0}))
                .await
                .0,
        );
    }
    let busy = app.queue_of(&id).await;
    assert!(
        busy["waiting_time_expect"].as_f64().unwrap() > 0.0,
        "{busy}"
    );
    assert!(busy["waiting_time_error"].as_f64().unwrap() > 0.0, "{busy}");
    assert_eq!(busy["queue_length"], 3);
    for t in &tasks {
        app.wait_completed(t).await;
    }
    let drained = wait_for("the queue to drain", || async {
        let q = app.queue_of(&id).await;
        (q["queue_length"] == 0).then_some(q)
    })
    .await;
    assert_eq!(drained["waiting_time_expect"], json!(0.0));
    assert_eq!(drained["waiting_time_error"], json!(0.0));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = spawn_app_with(|s| s.server.body_limit_bytes = 1024).await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let big = json!({"model_name": "llama-7b", "task_input": {"prompt": "x".repeat(4096)}});
    let (status, body) = app.post("/queue/submit", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["status"], "error");
    assert_message(&body, "1024");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
}
