//! OpenAI-compatible TIs: registration, the scheduler's own queue with `c`
//! slots, every outcome of a request, and the queue estimates, against simulated
//! OpenAI-compatible servers over real HTTP.

use axum::routing::get;
use axum::{Json, Router};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::ti::openai_sim::{OpenAiFaults, OpenAiSimConfig};

use crate::helpers::{assert_message, spawn_app, spawn_openai, spawn_ti, wait_for, TestApp};

const MODEL: &str = "llama-7b";

fn sim(base_ms: f64, concurrency: usize) -> OpenAiSimConfig {
    OpenAiSimConfig {
        model: MODEL.into(),
        base_ms,
        concurrency,
        ..OpenAiSimConfig::default()
    }
}

fn prompt(text: &str) -> Value {
    json!({"prompt": text, "max_tokens": 8})
}

async fn ti_view(app: &TestApp, ti: &str) -> Value {
    let (_, body) = app.get("/ti/list").await;
    body["tis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["ti_uuid"] == ti)
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn an_openai_ti_takes_its_model_from_v1_models_and_is_listed_with_its_kind() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(10.0, 4)).await;
    let ti = app
        .register_openai(&server, json!({"hardware": "H100"}))
        .await;

    let view = ti_view(&app, &ti).await;
    assert_eq!(view["model_name"], MODEL);
    assert_eq!(view["kind"], "openai");
    assert_eq!(view["hardware"], "H100");
    assert_eq!(view["max_concurrency"], 8, "the default for openai");
    let queue = app.queue_of(&ti).await;
    assert_eq!(queue["kind"], "openai");
    assert_eq!(
        (queue["running"].clone(), queue["queue_length"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM task_instances WHERE kind = 'openai' AND hardware = 'H100'"
        )
        .await,
        1
    );

    let port = server.addr().port();
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "kind": "openai", "model_name": "gpt-9"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "GET /v1/models lists: llama-7b");
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "kind": "grpc"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "unknown kind 'grpc'; valid: callback, openai");
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "kind": "openai", "max_concurrency": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "max_concurrency must be in 1..=1024, got 0");
}

#[tokio::test]
async fn a_server_without_a_health_route_is_checked_through_v1_models() {
    let app = spawn_app().await;
    let models = Router::new().route(
        "/v1/models",
        get(|| async { Json(json!({"object": "list", "data": [{"id": "tiny"}, {"id": "big"}]})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, models).await });

    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "kind": "openai", "model_name": "big"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = ti_view(&app, body["ti_uuid"].as_str().unwrap()).await;
    assert_eq!(view["model_name"], "big");
}

#[tokio::test]
async fn a_task_is_sent_as_an_openai_request_and_its_answer_and_usage_are_stored() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(5.0, 4)).await;
    let ti = app.register_openai(&server, json!({})).await;

    // 11 characters: 3 tokens by the scheduler's estimate (and the simulator's count).
    let input = json!({"prompt": "hello world", "max_tokens": 8, "stream": true});
    let (task, scheduled) = app.submit_input(MODEL, input, json!({})).await;
    assert_eq!(scheduled, ti);
    let done = app.wait_completed(&task).await;
    let result = &done["result"];
    assert_eq!(
        result["object"], "text_completion",
        "stream was forced to false"
    );
    assert_eq!(result["model"], MODEL, "model was filled in");
    assert_eq!(done["prompt_tokens"], 3);
    let completion = done["completion_tokens"].as_i64().unwrap();
    assert!((1..=8).contains(&completion), "{completion}");
    assert!(done["execution_time"].as_f64().unwrap() >= 5.0);
    assert_eq!(
        app.count(&format!(
            "SELECT prompt_tokens + completion_tokens FROM tasks WHERE task_id = '{task}' AND outcome = 'succeeded'"
        )).await,
        3 + completion
    );
    let features = app
        .sql_text(&format!(
            "SELECT metadata FROM tasks WHERE task_id = '{task}'"
        ))
        .await;
    let features: Value = serde_json::from_str(&features).unwrap();
    assert_eq!(features, json!({"input_tokens": 3.0, "max_tokens": 8.0}));

    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (task, _) = app.submit_input(MODEL, chat, json!({})).await;
    let done = app.wait_completed(&task).await;
    assert_eq!(done["result"]["object"], "chat.completion");

    let as_completion = json!({"prompt": "x", "max_tokens": 1});
    let (task, _) = app
        .submit_input(MODEL, as_completion, json!({"path": "/v1/completions"}))
        .await;
    assert_eq!(
        app.wait_completed(&task).await["result"]["object"],
        "text_completion"
    );
    assert_eq!(server.stats().completed, 3);
}

#[tokio::test]
async fn a_path_outside_v1_is_refused_at_submit() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(5.0, 1)).await;
    app.register_openai(&server, json!({})).await;
    let (status, body) = app
        .post(
            "/queue/submit",
            json!({"model_name": MODEL, "task_input": prompt("x"), "metadata": {"path": "admin/stop"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "metadata.path must start with 'v1/'");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
}

#[tokio::test]
async fn requests_in_flight_never_exceed_max_concurrency_and_leave_in_fifo_order() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(60.0, 16)).await;
    let ti = app
        .register_openai(&server, json!({"max_concurrency": 2}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(
            app.submit_input(MODEL, prompt(&format!("task {i}")), json!({}))
                .await
                .0,
        );
    }
    let queue = app.queue_of(&ti).await;
    assert_eq!(queue["max_concurrency"], 2);
    assert!(queue["running"].as_u64().unwrap() <= 2, "{queue}");
    let mut finished = Vec::new();
    for task in &tasks {
        finished.push(
            app.wait_completed(task).await["completion_time"]
                .as_f64()
                .unwrap(),
        );
    }
    assert_eq!(server.stats().max_running, 2, "{:?}", server.stats());
    // Two slots, equal times, FIFO: each task finishes no earlier than the one two places
    // ahead of it (the stored times are to the millisecond).
    assert!(
        finished.windows(3).all(|w| w[0] <= w[2]),
        "left in submit order: {finished:?}"
    );
}

#[tokio::test]
async fn a_4xx_answer_fails_the_task_with_the_upstream_status_and_body_and_the_ti_stays_healthy() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(5.0, 2)).await;
    let ti = app.register_openai(&server, json!({})).await;

    // No prompt: the server refuses the request itself.
    let (bad, _) = app
        .submit_input(MODEL, json!({"input": "x"}), json!({}))
        .await;
    let (good, _) = app.submit_input(MODEL, prompt("fine"), json!({})).await;
    let failed = app.wait_completed(&bad).await;
    assert_eq!(failed["result"]["upstream_status"], 400);
    assert_eq!(
        failed["result"]["upstream_body"]["error"]["message"],
        "prompt is required (a string or a list)"
    );
    assert!(failed["result"]["error"]
        .as_str()
        .unwrap()
        .contains("HTTP 400"));
    assert_eq!(
        app.count(&format!(
            "SELECT COUNT(*) FROM tasks WHERE task_id = '{bad}' AND outcome = 'failed'"
        ))
        .await,
        1
    );
    assert_eq!(
        app.wait_completed(&good).await["result"]["object"],
        "text_completion"
    );
    assert!(app.healthy(&ti).await);
    assert_eq!(server.stats().rejected, 1, "sent once, not retried");
}

#[tokio::test]
async fn a_429_pauses_the_ti_for_its_retry_after_and_the_task_is_decided_again() {
    let app = spawn_app().await;
    let server = spawn_openai(OpenAiSimConfig {
        faults: OpenAiFaults {
            rate_limited: true,
            retry_after_s: 0.3,
            ..OpenAiFaults::default()
        },
        ..sim(5.0, 2)
    })
    .await;
    let ti = app.register_openai(&server, json!({})).await;
    let (task, _) = app.submit_input(MODEL, prompt("later"), json!({})).await;
    wait_for("a 429", || async {
        (server.stats().faulted > 0).then_some(())
    })
    .await;
    let paused = app.queue_of(&ti).await;
    assert!(
        paused["waiting_time_expect"].as_f64().unwrap() > 0.0,
        "a paused TI's wait counts the pause: {paused}"
    );
    server.set_faults(OpenAiFaults::default());
    let done = app.wait_completed(&task).await;
    assert_eq!(done["result"]["object"], "text_completion");
    assert!(app.healthy(&ti).await, "busy is not unhealthy");
    assert!(
        app.count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE task_id = '{task}'"
        ))
        .await
            >= 2,
        "decided again after the 429"
    );
}

#[tokio::test]
async fn a_5xx_is_retried_then_the_ti_is_unhealthy_and_the_task_moves() {
    let app = spawn_app().await;
    app.set_strategy("round_robin").await;
    let broken = spawn_openai(OpenAiSimConfig {
        faults: OpenAiFaults {
            server_error: true,
            ..OpenAiFaults::default()
        },
        ..sim(5.0, 2)
    })
    .await;
    let fine = spawn_openai(sim(5.0, 2)).await;
    let broken_ti = app.register_openai(&broken, json!({})).await;
    let fine_ti = app.register_openai(&fine, json!({})).await;

    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(
            app.submit_input(MODEL, prompt(&format!("t{i}")), json!({}))
                .await,
        );
    }
    assert!(tasks.iter().any(|(_, ti)| *ti == broken_ti));
    for (task, _) in &tasks {
        let done = app.wait_completed(task).await;
        assert_eq!(done["scheduled_ti"], fine_ti.as_str());
        assert_eq!(done["result"]["object"], "text_completion");
    }
    // Three attempts (ti.dispatch_attempts) before the task moved.
    assert!(broken.stats().faulted >= 3, "retried: {:?}", broken.stats());
}

#[tokio::test]
async fn a_ti_that_dies_mid_request_has_its_task_sent_again_elsewhere() {
    let app = spawn_app().await;
    app.set_strategy("round_robin").await;
    let dying = spawn_openai(sim(3_000.0, 2)).await;
    let fine = spawn_openai(sim(5.0, 2)).await;
    let dying_ti = app.register_openai(&dying, json!({})).await;
    let fine_ti = app.register_openai(&fine, json!({})).await;
    let mut on_dying = None;
    for i in 0..2 {
        let (task, ti) = app
            .submit_input(MODEL, prompt(&format!("long {i}")), json!({}))
            .await;
        if ti == dying_ti {
            on_dying = Some(task);
        }
    }
    let task = on_dying.expect("round robin sent one task to each TI");
    wait_for("the request to run", || async {
        (dying.stats().running == 1).then_some(())
    })
    .await;
    dying.stop().await;

    let done = app.wait_completed(&task).await;
    assert_eq!(done["scheduled_ti"], fine_ti.as_str());
    assert_eq!(done["result"]["object"], "text_completion");
}

#[tokio::test]
async fn a_ti_with_a_free_slot_is_exactly_zero_and_a_full_one_is_not() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(2_000.0, 4)).await;
    let ti = app
        .register_openai(&server, json!({"max_concurrency": 2}))
        .await;
    app.submit_input(MODEL, prompt("one"), json!({})).await;
    wait_for("one request running", || async {
        (app.queue_of(&ti).await["running"] == 1).then_some(())
    })
    .await;
    let one = app.queue_of(&ti).await;
    assert_eq!(
        (
            one["waiting_time_expect"].as_f64(),
            one["waiting_time_error"].as_f64()
        ),
        (Some(0.0), Some(0.0)),
        "a free slot and nothing waiting: {one}"
    );
    app.submit_input(MODEL, prompt("two"), json!({})).await;
    let full = app.queue_of(&ti).await;
    assert!(
        full["waiting_time_expect"].as_f64().unwrap() > 0.0,
        "{full}"
    );
    assert_eq!(full["queue_length"], 2);
}

#[tokio::test]
async fn shortest_queue_prefers_the_ti_that_finishes_first_not_the_shortest_line() {
    let app = spawn_app().await;
    app.set_strategy("shortest_queue").await;
    let narrow = spawn_openai(sim(1_000.0, 1)).await;
    let wide = spawn_openai(sim(1_000.0, 8)).await;
    let narrow_ti = app
        .register_openai(&narrow, json!({"max_concurrency": 1}))
        .await;
    let wide_ti = app
        .register_openai(&wide, json!({"max_concurrency": 8}))
        .await;
    let mut on_narrow = 0;
    for i in 0..6 {
        let (_, ti) = app
            .submit_input(MODEL, prompt(&format!("t{i}")), json!({}))
            .await;
        assert!(ti == narrow_ti || ti == wide_ti);
        on_narrow += usize::from(ti == narrow_ti);
    }
    // The wide TI has a free slot for each of them: a line there costs nothing. Counting
    // the line as one queue (as for a callback TI) would have sent every other task to
    // the narrow one.
    assert!(on_narrow <= 1, "{on_narrow} of 6 went to the one-slot TI");
}

#[tokio::test]
async fn a_model_may_mix_callback_and_openai_tis() {
    let app = spawn_app().await;
    app.set_strategy("round_robin").await;
    let callback = spawn_ti(MODEL, "A100", 5.0).await;
    let server = spawn_openai(sim(5.0, 2)).await;
    let callback_ti = app.register(&callback).await;
    let openai_ti = app.register_openai(&server, json!({})).await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        let (task, ti) = app
            .submit_input(MODEL, prompt(&format!("t{i}")), json!({}))
            .await;
        let done = app.wait_completed(&task).await;
        assert_eq!(done["scheduled_ti"], ti.as_str());
        seen.insert(ti);
    }
    assert!(
        seen.contains(&callback_ti) && seen.contains(&openai_ti),
        "{seen:?}"
    );
}

#[tokio::test]
async fn openai_tasks_left_unfinished_by_a_restart_are_sent_again() {
    let app = spawn_app().await;
    let server = spawn_openai(sim(400.0, 1)).await;
    app.register_openai(&server, json!({"max_concurrency": 1}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        tasks.push(
            app.submit_input(MODEL, prompt(&format!("t{i}")), json!({}))
                .await
                .0,
        );
    }
    let app = app.restart().await;
    for task in &tasks {
        let done = app.wait_completed(task).await;
        assert_eq!(done["result"]["object"], "text_completion");
    }
    assert!(server.stats().requests >= 3);
}

#[tokio::test]
async fn a_503_pauses_the_ti_like_a_429_and_the_task_completes_after() {
    let app = spawn_app().await;
    let server = spawn_openai(OpenAiSimConfig {
        faults: OpenAiFaults {
            unavailable: true,
            retry_after_s: 0.2,
            ..OpenAiFaults::default()
        },
        ..sim(5.0, 2)
    })
    .await;
    let ti = app.register_openai(&server, json!({})).await;
    let (task, _) = app.submit_input(MODEL, prompt("busy"), json!({})).await;
    wait_for("a 503", || async {
        (server.stats().faulted > 0).then_some(())
    })
    .await;
    server.set_faults(OpenAiFaults::default());
    assert_eq!(
        app.wait_completed(&task).await["result"]["object"],
        "text_completion"
    );
    assert!(app.healthy(&ti).await, "busy is not unhealthy");
}

#[tokio::test]
async fn a_request_that_times_out_is_retried_then_sent_to_another_ti() {
    let app = crate::helpers::spawn_app_with(|s| s.ti.request_timeout_ms = 200).await;
    app.set_strategy("round_robin").await;
    let hanging = spawn_openai(OpenAiSimConfig {
        faults: OpenAiFaults {
            hang_ms: 5_000,
            ..OpenAiFaults::default()
        },
        ..sim(5.0, 4)
    })
    .await;
    let fine = spawn_openai(sim(5.0, 4)).await;
    let hanging_ti = app.register_openai(&hanging, json!({})).await;
    let fine_ti = app.register_openai(&fine, json!({})).await;
    let mut on_hanging = None;
    for i in 0..2 {
        let (task, ti) = app
            .submit_input(MODEL, prompt(&format!("t{i}")), json!({}))
            .await;
        if ti == hanging_ti {
            on_hanging = Some(task);
        }
    }
    let task = on_hanging.expect("round robin sent one task to each TI");
    let done = app.wait_completed(&task).await;
    assert_eq!(done["scheduled_ti"], fine_ti.as_str());
    assert!(
        hanging.stats().requests >= 3,
        "retried: {:?}",
        hanging.stats()
    );
}

#[tokio::test]
async fn the_simulated_server_streams_one_chunk_per_token_then_usage_and_done() {
    let server = spawn_openai(OpenAiSimConfig {
        min_completion_share: 1.0,
        ..sim(5.0, 1)
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", server.addr()))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, " tok".repeat(5));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 5);
    assert_eq!(server.stats().completed, 1);
}
