//! Overload and drain: admission control answers 429 with `Retry-After` and stores nothing;
//! a drain refuses new tasks and `/ready` while the tasks in flight finish.
//!
//! The simulated TIs run a task for `input_tokens` ms (`per_input_token_ms` 1, no base, no
//! noise) and the tasks carry the same figure as their `expected_ms` hint, so the queue
//! estimates that admission control reads are known: a task of 60 s keeps its TI's
//! predicted wait far above a limit of 1 s for the whole test.

use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::ti::sim::{SimConfig, SimTi};

use crate::helpers::{assert_message, spawn_app, spawn_app_with, spawn_ti_with, TestApp};

/// A TI of `model` that runs each task for its `input_tokens` ms.
async fn spawn_paced_ti(model: &str) -> SimTi {
    spawn_ti_with(SimConfig {
        model: model.into(),
        base_ms: 0.0,
        per_input_token_ms: 1.0,
        noise: 0.0,
        ..SimConfig::default()
    })
    .await
}

/// Metadata of a task that runs `ms` on a paced TI and is predicted to.
fn runs(ms: u64) -> Value {
    json!({"input_tokens": ms, "expected_ms": ms})
}

/// POSTs `body`; returns the status, the `Retry-After` header in seconds and the body.
async fn post_full(app: &TestApp, path: &str, body: Value) -> (StatusCode, Option<u64>, Value) {
    let resp = app
        .client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").map(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("Retry-After is not whole seconds: {v:?}"))
    });
    (status, retry_after, resp.json().await.unwrap())
}

async fn submit_full(
    app: &TestApp,
    model: &str,
    task_id: &str,
    metadata: Value,
) -> (StatusCode, Option<u64>, Value) {
    post_full(
        app,
        "/queue/submit",
        json!({"model_name": model, "task_id": task_id, "task_input": {"p": 1}, "metadata": metadata}),
    )
    .await
}

/// Asserts a 429 of admission control: the envelope with `code: overloaded`, the
/// submit's empty identifiers and a `Retry-After` of at least a second. Returns it.
#[track_caller]
fn assert_refused(
    (status, retry_after, body): &(StatusCode, Option<u64>, Value),
    needle: &str,
) -> u64 {
    assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(body["code"], "overloaded", "{body}");
    assert_message(body, needle);
    let retry_after = retry_after.unwrap_or_else(|| panic!("no Retry-After with {body}"));
    assert!(retry_after >= 1, "{retry_after}");
    retry_after
}

/// Asserts that no task by this id exists (`/task/query` answers 404).
async fn assert_no_task(app: &TestApp, task_id: &str) {
    let (status, body) = app.get(&format!("/task/query?task_id={task_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{task_id} exists: {body}");
}

/// The value of `ti_scheduler_admission_rejections_total` for this model and reason.
async fn rejections(app: &TestApp, model: &str, reason: &str) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .filter(|l| l.starts_with("ti_scheduler_admission_rejections_total{"))
        .filter(|l| {
            l.contains(&format!("model=\"{model}\"")) && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_submit_whose_predicted_wait_exceeds_max_wait_ms_is_429_with_retry_after_and_stores_nothing(
) {
    let app = spawn_app_with(|s| s.scheduling.max_wait_ms = 1_000).await;
    let ti = spawn_paced_ti("m-wait").await;
    let ti_uuid = app.register(&ti).await;
    let (status, _, body) = submit_full(&app, "m-wait", "long-1", runs(60_000)).await;
    assert_eq!(status, StatusCode::OK, "an idle TI waits 0 ms: {body}");

    let refused = submit_full(&app, "m-wait", "over-wait", runs(10)).await;
    let retry_after = assert_refused(&refused, "model 'm-wait' is overloaded");
    assert_message(&refused.2, "max_wait_ms 1000");
    // About 59 s of the first task's 60 are left above the limit.
    assert!(retry_after <= 60, "{retry_after}");
    assert_eq!(refused.2["task_id"], "", "{}", refused.2);
    assert_eq!(refused.2["scheduled_ti"], "", "{}", refused.2);

    assert_no_task(&app, "over-wait").await;
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM decisions").await, 1);
    let queue = app.queue_of(&ti_uuid).await;
    assert_eq!(
        queue["queue_length"], 1,
        "the refused task left no prediction: {queue}"
    );
}

#[tokio::test]
async fn a_submit_beyond_max_waiting_tasks_of_its_model_is_429_and_other_models_are_not_counted() {
    let app = spawn_app_with(|s| s.scheduling.max_waiting_tasks = 2).await;
    let ti = spawn_paced_ti("m-count").await;
    let other = spawn_paced_ti("m-count-other").await;
    app.register(&ti).await;
    app.register(&other).await;
    for id in ["count-1", "count-2"] {
        let (status, _, body) = submit_full(&app, "m-count", id, runs(60_000)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let refused = submit_full(&app, "m-count", "count-3", runs(10)).await;
    assert_refused(&refused, "2 of its tasks are unfinished");
    assert_message(&refused.2, "max_waiting_tasks 2");
    assert_no_task(&app, "count-3").await;

    let (status, _, body) = submit_full(&app, "m-count-other", "other-1", runs(10)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "another model has its own count: {body}"
    );
}

#[tokio::test]
async fn a_batch_with_a_refused_task_is_429_naming_its_index_and_stores_none_of_it() {
    let app = spawn_app_with(|s| s.scheduling.max_waiting_tasks = 3).await;
    let ti = spawn_paced_ti("m-batch").await;
    let ti_uuid = app.register(&ti).await;
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"task_id": format!("batch-{i}"), "task_input": {"i": i}, "metadata": runs(60_000)}))
        .collect();
    let refused = post_full(
        &app,
        "/queue/submit_batch",
        json!({"model_name": "m-batch", "tasks": tasks}),
    )
    .await;
    assert_refused(&refused, "tasks[3]: model 'm-batch' is overloaded");

    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
    for i in 0..5 {
        assert_no_task(&app, &format!("batch-{i}")).await;
    }
    let queue = app.queue_of(&ti_uuid).await;
    assert_eq!(
        (
            queue["queue_length"].as_u64(),
            queue["waiting_time_expect"].as_f64()
        ),
        (Some(0), Some(0.0)),
        "the three tasks placed before the refused one were taken back: {queue}"
    );
}

#[tokio::test]
async fn a_task_whose_predicted_completion_misses_its_deadline_is_refused_and_one_that_fits_is_accepted(
) {
    let app = spawn_app().await;
    let ti = spawn_paced_ti("m-deadline").await;
    app.register(&ti).await;

    let mut too_long = runs(500);
    too_long["deadline_ms"] = json!(200);
    let refused = submit_full(&app, "m-deadline", "late-1", too_long).await;
    assert_refused(&refused, "cannot meet metadata.deadline_ms 200");
    assert_message(&refused.2, "predicted completion is 500 ms");
    assert_no_task(&app, "late-1").await;

    let mut fits = runs(60_000);
    fits["deadline_ms"] = json!(120_000);
    let (status, _, body) = submit_full(&app, "m-deadline", "fits-1", fits).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.query("fits-1").await["task_id"], "fits-1");

    // Behind that one, a short task with a short deadline waits too long.
    let mut behind = runs(10);
    behind["deadline_ms"] = json!(1_000.5);
    let refused = submit_full(&app, "m-deadline", "late-2", behind).await;
    let retry_after = assert_refused(&refused, "cannot meet metadata.deadline_ms 1000.5");
    assert!(
        retry_after >= 50,
        "the first task has most of a minute left: {retry_after}"
    );
    assert_no_task(&app, "late-2").await;
}

#[tokio::test]
async fn a_deadline_that_is_not_a_positive_number_is_400_naming_the_field() {
    let app = spawn_app().await;
    let ti = spawn_paced_ti("m-bad-deadline").await;
    app.register(&ti).await;
    for bad in [json!("soon"), json!(0), json!(-5), json!(null), json!([1])] {
        let (status, body) = app
            .post(
                "/queue/submit",
                json!({"model_name": "m-bad-deadline", "task_input": {}, "metadata": {"deadline_ms": bad}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_message(&body, "metadata.deadline_ms must be a positive number");
    }
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "m-bad-deadline", "tasks": [
                {"task_input": {}, "metadata": {"deadline_ms": 100}},
                {"task_input": {}, "metadata": {"deadline_ms": "soon"}}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_message(&body, "tasks[1]: metadata.deadline_ms");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
}

#[tokio::test]
async fn refusals_are_counted_per_model_and_reason_in_metrics() {
    let app = spawn_app_with(|s| s.scheduling.max_wait_ms = 1_000).await;
    let ti = spawn_paced_ti("m-adm-metrics").await;
    app.register(&ti).await;
    submit_full(&app, "m-adm-metrics", "metrics-1", runs(60_000)).await;
    assert_eq!(rejections(&app, "m-adm-metrics", "max_wait").await, 0.0);

    assert_refused(
        &submit_full(&app, "m-adm-metrics", "metrics-2", runs(10)).await,
        "max_wait_ms",
    );
    let mut late = runs(10);
    late["deadline_ms"] = json!(5);
    // The wait is checked first: this one counts as a max_wait refusal too.
    assert_refused(
        &submit_full(&app, "m-adm-metrics", "metrics-3", late).await,
        "max_wait_ms",
    );
    assert_eq!(rejections(&app, "m-adm-metrics", "max_wait").await, 2.0);
    assert_eq!(rejections(&app, "m-adm-metrics", "deadline").await, 0.0);
}

/// The admin token of the drain tests.
const TOKEN: &str = "s3cret";

/// A service with the admin token and a paced TI of `model` registered with it.
async fn spawn_guarded_app(model: &str) -> (TestApp, SimTi) {
    let app = spawn_app_with(|s| s.server.admin_token = TOKEN.into()).await;
    let ti = spawn_paced_ti(model).await;
    let resp = app
        .client
        .post(app.url("/ti/register"))
        .bearer_auth(TOKEN)
        .json(&json!({"host": "127.0.0.1", "port": ti.addr().port()}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    (app, ti)
}

/// POST /admin/drain, with this `Authorization` header if any.
async fn drain(app: &TestApp, auth: Option<&str>) -> (StatusCode, Value) {
    let mut request = app.client.post(app.url("/admin/drain"));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let resp = request.send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test]
async fn after_a_drain_submits_and_ready_are_503_and_a_task_accepted_before_still_completes() {
    let (app, _ti) = spawn_guarded_app("m-drain").await;
    let (status, _, body) = submit_full(&app, "m-drain", "before-drain", runs(1_500)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = drain(&app, Some("Bearer s3cret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["draining"], true, "{body}");
    assert_eq!(body["unfinished"], 1, "the task runs 1.5 s: {body}");

    let (status, _, body) = submit_full(&app, "m-drain", "after-drain", runs(10)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "draining", "{body}");
    assert_message(&body, "draining");
    assert_eq!(body["task_id"], "", "{body}");
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "m-drain", "tasks": [{"task_input": {}}]}),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("draining")),
        "{body}"
    );
    assert_no_task(&app, "after-drain").await;
    // Repeating the submit of a stored task creates nothing: it is answered as before.
    let (status, _, body) = submit_full(&app, "m-drain", "before-drain", runs(1_500)).await;
    assert_eq!(
        (status, body["task_id"].as_str()),
        (StatusCode::OK, Some("before-drain")),
        "{body}"
    );

    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "draining", "{body}");
    assert_eq!(app.get("/health").await.0, StatusCode::OK);

    let done = app.wait_completed("before-drain").await;
    assert_eq!(done["outcome"], "succeeded", "{done}");
    let (status, body) = drain(&app, Some("Bearer s3cret")).await;
    assert_eq!(status, StatusCode::OK, "a drain is idempotent: {body}");
    assert_eq!(body["unfinished"], 0, "{body}");
    assert_message(&body, "already draining");
}

#[tokio::test]
async fn a_drain_without_the_admin_token_is_401_and_changes_nothing() {
    let (app, _ti) = spawn_guarded_app("m-drain-401").await;
    for auth in [None, Some("Bearer wrong")] {
        let (status, body) = drain(&app, auth).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        assert_eq!(body["status"], "error", "{body}");
    }
    assert_eq!(app.get("/ready").await.0, StatusCode::OK);
    let (status, _, body) = submit_full(&app, "m-drain-401", "still-open", runs(10)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_drain_endpoint_is_in_the_openapi_document_with_the_admin_token() {
    let app = spawn_app().await;
    let (_, doc) = app.get("/openapi.json").await;
    let op = &doc["paths"]["/admin/drain"]["post"];
    assert!(
        op.is_object(),
        "POST /admin/drain missing: {}",
        doc["paths"]
    );
    assert_eq!(op["security"], json!([{"admin_token": []}]), "{op}");
    let submit = &doc["paths"]["/queue/submit"]["post"]["responses"]["429"];
    assert!(
        submit["headers"]["Retry-After"].is_object(),
        "429 documents Retry-After: {submit}"
    );
    let codes = &doc["components"]["schemas"]["ErrorEnvelope"]["properties"]["code"]["enum"];
    assert_eq!(*codes, json!(["overloaded", "draining"]));
}
