//! Issue 10: what an attacker's tests found, one test (or more) per point.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::ti::openai_sim::OpenAiSimConfig;
use ti_scheduler::ti::sim::Faults;

use ti_scheduler::App;

use crate::helpers::{
    assert_message, backend, execute, restart_from, skip_on_postgres, spawn_app, spawn_app_with,
    spawn_openai, spawn_ti, wait_for, Backend, TestApp,
};

/// `task_input` nested `levels` deep (`{}` is 1).
fn nested_input(levels: usize) -> Value {
    let mut v = json!({});
    for _ in 1..levels {
        v = json!({ "a": v });
    }
    v
}

async fn submit_input(app: &TestApp, task_input: Value) -> (StatusCode, Value) {
    app.post(
        "/queue/submit",
        json!({"model_name": "llama-7b", "task_input": task_input}),
    )
    .await
}

// Point 1: a poison task.

#[tokio::test]
async fn a_task_its_ti_rejects_fails_with_the_tis_answer_and_the_other_tasks_and_tis_are_unaffected(
) {
    let app = spawn_app().await;
    let a = spawn_ti("llama-7b", "A100", 5.0).await;
    let b = spawn_ti("llama-7b", "A100", 5.0).await;
    let a_id = app.register(&a).await;
    let b_id = app.register(&b).await;
    app.set_strategy("round_robin").await;
    let mut normal = Vec::new();
    for _ in 0..3 {
        normal.push(app.submit("llama-7b", json!({})).await.0);
    }
    let (status, body) = submit_input(&app, json!({"sim_reject": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let poison = body["task_id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        normal.push(app.submit("llama-7b", json!({})).await.0);
    }

    let failed = app.wait_completed(&poison).await;
    let result = &failed["result"];
    assert_eq!(result["upstream_status"], 400, "{failed}");
    assert!(
        result["upstream_body"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sim_reject")),
        "the TI's JSON body is kept as JSON: {failed}"
    );
    assert!(
        result["error"].as_str().is_some_and(|e| e.contains("400")),
        "{failed}"
    );
    assert_eq!(
        failed["result_ti"], failed["scheduled_ti"],
        "the rejecting TI's answer is the stored outcome"
    );
    let outcome: String = app
        .sql_text(&format!(
            "SELECT outcome FROM tasks WHERE task_id = '{poison}'"
        ))
        .await;
    assert_eq!(outcome, "failed");
    let decisions = app
        .count(&format!(
            "SELECT COUNT(*) FROM decisions WHERE task_id = '{poison}'"
        ))
        .await;
    assert_eq!(decisions, 1, "no re-route");

    let mut used = HashSet::new();
    for task in &normal {
        let done = app.wait_completed(task).await;
        assert!(done["result"]["error"].is_null(), "{done}");
        assert_eq!(done["result_ti"], done["scheduled_ti"], "{done}");
        used.insert(done["scheduled_ti"].as_str().unwrap().to_string());
    }
    assert_eq!(used, HashSet::from([a_id.clone(), b_id.clone()]));
    let (_, list) = app.get("/ti/list").await;
    for ti in list["tis"].as_array().unwrap() {
        assert_eq!(ti["healthy"], true, "{list}");
    }
    assert_eq!(a.stats().accepted + b.stats().accepted, 6);
}

#[tokio::test]
async fn a_task_input_nested_deeper_than_the_limit_is_400_naming_it_and_creates_nothing() {
    let app = spawn_app_with(|s| s.server.max_json_depth = 10).await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let (status, body) = submit_input(&app, nested_input(11)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_message(&body, "task_input nests 11 levels deep; the limit is 10");
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": "llama-7b", "tasks": [
                {"task_input": {}}, {"task_input": nested_input(11)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_message(&body, "tasks[1]: task_input nests 11 levels");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
    let (status, body) = submit_input(&app, nested_input(10)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the limit itself is accepted: {body}"
    );
}

#[tokio::test]
async fn by_default_what_the_simulated_tis_parser_would_refuse_is_refused_at_submit() {
    // 150 levels: over serde_json's 128, which the simulated TI (like many real
    // servers) parses with. Accepted, this task would be rejected by every TI.
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let (status, body) = submit_input(&app, nested_input(150)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_message(&body, "server.max_json_depth");
    let (status, body) = submit_input(&app, nested_input(64)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = app.wait_completed(body["task_id"].as_str().unwrap()).await;
    assert!(done["result"]["error"].is_null(), "the TI took it: {done}");
}

// Point 2: redirects.

/// A server on loopback that answers every request but those of `routes` with a redirect
/// to the same path at `target` (a base URL), counting them in `redirected`; its port.
async fn spawn_redirecting(
    routes: axum::Router,
    target: String,
    redirected: Arc<AtomicU64>,
) -> u16 {
    let redirecting = routes.fallback(move |uri: axum::http::Uri| {
        redirected.fetch_add(1, Ordering::Relaxed);
        let location = format!("{target}{}", uri.path());
        async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, location)],
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, redirecting).await });
    port
}

#[tokio::test]
async fn a_ti_answering_with_a_redirect_is_not_followed_and_not_registered() {
    let target = spawn_ti("llama-7b", "A100", 5.0).await;
    let target_port = target.addr().port();
    // Allowed: 127.0.0.1 (the redirecting server); not allowed: localhost (the target).
    let port = spawn_redirecting(
        axum::Router::new(),
        format!("http://localhost:{target_port}"),
        Arc::default(),
    )
    .await;
    let app = spawn_app_with(|s| s.ti.allowed_hosts = vec!["127.0.0.1".into()]).await;

    let (status, body) = app
        .post("/ti/register", json!({"host": "127.0.0.1", "port": port}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_message(&body, "GET /health answered HTTP 307");
    assert_message(&body, "redirects are not followed");
    assert_eq!(body["ti_uuid"], "");
    let (_, list) = app.get("/ti/list").await;
    assert_eq!(list["tis"], json!([]), "nothing is registered");
    assert_eq!(app.count("SELECT COUNT(*) FROM task_instances").await, 0);
}

#[tokio::test]
async fn an_openai_ti_redirecting_a_request_is_not_followed() {
    let target = spawn_openai(OpenAiSimConfig {
        model: "llama-7b".into(),
        base_ms: 1.0,
        ..OpenAiSimConfig::default()
    })
    .await;
    let target_port = target.addr().port();
    let redirected = Arc::new(AtomicU64::new(0));
    // Healthy and serving the model; every request is sent on to the target.
    let routes = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"data": [{"id": "llama-7b"}]})) }),
        );
    let port = spawn_redirecting(
        routes,
        format!("http://127.0.0.1:{target_port}"),
        redirected.clone(),
    )
    .await;
    let app = spawn_app().await;
    let (status, body) = app
        .post(
            "/ti/register",
            json!({"host": "127.0.0.1", "port": port, "kind": "openai"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = app
        .post(
            "/v1/completions",
            json!({"model": "llama-7b", "prompt": "hi", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "no_usable_instance", "{body}");
    assert!(
        redirected.load(Ordering::Relaxed) >= 1,
        "the TI was asked and answered with a redirect"
    );
    assert_eq!(target.stats().requests, 0, "the redirect was not followed");
}

// Point 8: small ones.

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
    let app = spawn_app_with(|s| s.server.admin_token = "s3cret".into()).await;
    let set = |auth: &'static str| {
        app.client
            .post(app.url("/scheduler/set"))
            .header("authorization", auth)
            .json(&json!({"name": "round_robin"}))
            .send()
    };
    for auth in ["bearer s3cret", "BEARER s3cret", "Bearer s3cret"] {
        let resp = set(auth).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{auth}");
    }
    for auth in ["bearer S3CRET", "Basic s3cret", "bearers3cret", "s3cret"] {
        let resp = set(auth).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth}");
    }
}

#[tokio::test]
async fn host_names_differing_in_case_or_a_trailing_dot_are_one_ti() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    let port = ti.addr().port();
    let mut ids = Vec::new();
    for host in ["LOCALHOST", "localhost.", "localhost"] {
        let (status, body) = app
            .post("/ti/register", json!({"host": host, "port": port}))
            .await;
        assert_eq!(status, StatusCode::OK, "{host}: {body}");
        ids.push(body["ti_uuid"].as_str().unwrap().to_string());
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let (_, list) = app.get("/ti/list").await;
    let tis = list["tis"].as_array().unwrap();
    assert_eq!(tis.len(), 1, "{list}");
    assert_eq!(tis[0]["host"], "localhost");
}

#[tokio::test]
async fn after_a_reroute_the_old_tis_result_can_win_and_the_task_says_which_ti_it_came_from() {
    // Nobody calls back on their own and nothing is reconciled: the test plays the old TI.
    let app = spawn_app_with(|s| s.ti.reconcile_after_ms = 600_000).await;
    let silent = Faults {
        drop_callbacks: true,
        ..Faults::default()
    };
    let old = spawn_ti("llama-7b", "A100", 5.0).await;
    old.set_faults(silent.clone());
    let old_id = app.register(&old).await;
    let (task, first) = app.submit("llama-7b", json!({})).await;
    assert_eq!(first, old_id);
    wait_for("the old TI to accept", || async {
        (app.query(&task).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    let new = spawn_ti("llama-7b", "A100", 5.0).await;
    new.set_faults(silent.clone());
    let new_id = app.register(&new).await;
    old.set_faults(Faults {
        fail_health: true,
        ..silent
    });
    wait_for("the task to be re-routed to the new TI", || async {
        let q = app.query(&task).await;
        (q["scheduled_ti"] == new_id.as_str() && q["task_status"] == "scheduled").then_some(())
    })
    .await;

    let token: String = app
        .sql_text(&format!(
            "SELECT callback_token FROM task_instances WHERE ti_uuid = '{old_id}'"
        ))
        .await;
    let (status, body) = app
        .post(
            "/result/submit",
            json!({"task_id": task, "ti_uuid": old_id, "callback_token": token,
                   "execution_time": 7.0, "result": {"from": "old"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let done = app.query(&task).await;
    assert_eq!(done["task_status"], "completed", "{done}");
    assert_eq!(done["result"], json!({"from": "old"}));
    assert_eq!(done["scheduled_ti"], new_id.as_str());
    assert_eq!(done["result_ti"], old_id.as_str(), "{done}");
    let stored: String = app
        .sql_text(&format!(
            "SELECT result_ti FROM tasks WHERE task_id = '{task}'"
        ))
        .await;
    assert_eq!(stored, old_id);
}

// Point 4: batches.

#[tokio::test]
async fn a_batch_over_the_cap_is_400_naming_count_and_limit_and_creates_nothing() {
    let app = spawn_app_with(|s| s.server.max_batch_tasks = 3).await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let batch =
        |n: usize| json!({"model_name": "llama-7b", "tasks": vec![json!({"task_input": {}}); n]});
    let (status, body) = app.post("/queue/submit_batch", batch(4)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_message(&body, "tasks has 4 entries; the limit is 3 per batch");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 0);
    let (status, body) = app.post("/queue/submit_batch", batch(3)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.count("SELECT COUNT(*) FROM tasks").await, 3);
}

// Point 5: two services on one file.

#[tokio::test]
async fn a_second_service_on_the_same_database_file_refuses_naming_the_holders_pid() {
    if skip_on_postgres("the lock of the SQLite file") {
        return;
    }
    let app = spawn_app().await;
    let refused = match App::build(app.settings.clone()).await {
        Ok(_) => panic!("a second service started on the same file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains(&format!("pid {}", std::process::id())),
        "{refused}"
    );
    assert!(refused.contains("scheduler.db"), "{refused}");
    assert!(!refused.contains('\n'), "one line: {refused}");
    let (status, _) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "the first one is unharmed");

    let (settings, dir) = app.stop().await;
    let again = restart_from(settings, dir).await;
    let (status, body) = again.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_second_service_on_the_same_postgres_database_refuses_naming_the_leader() {
    if backend() == Backend::Sqlite {
        eprintln!("skipped on SQLite: the leader lease of PostgreSQL (SQLite's file lock is the test above)");
        return;
    }
    let app = spawn_app_with(|s| s.ha.lease_ms = 300).await;
    let mut second = app.settings.clone();
    second.server.bind = "127.0.0.1:0".parse().unwrap();
    // Another process would have another pid, hence another default node id.
    second.ha.node_id = "second-node".into();
    let started = std::time::Instant::now();
    let refused = match App::build(second).await {
        Ok(_) => panic!("a second service started on the same database"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(600),
        "it waits two leases for a crashed holder's to expire first: {:?}",
        started.elapsed()
    );
    assert!(refused.contains("another ti-scheduler"), "{refused}");
    assert!(
        refused.contains(&app.url("")),
        "names the holder's URL: {refused}"
    );
    assert!(refused.contains("ha.enabled"), "{refused}");
    assert!(!refused.contains('\n'), "one line: {refused}");
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "the first one is unharmed: {body}");
    assert_eq!(body["role"], "leader", "{body}");

    // Stopped, it releases the lease: the next service takes it at once.
    let (settings, dir) = app.stop().await;
    let again = restart_from(settings, dir).await;
    let (status, body) = again.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

// Point 6: a full disk.

#[tokio::test]
async fn a_full_database_answers_507_turns_ready_503_keeps_reads_and_recovers_once_space_is_freed()
{
    if skip_on_postgres("database.max_size_mb caps the SQLite file") {
        return;
    }
    let app = spawn_app_with(|s| s.database.max_size_mb = 1).await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    let ti_id = app.register(&ti).await;
    // Tasks stay queued: no completion (which may still fit in place) clears the state
    // in the middle of the test; `/ready` reflects the last write.
    ti.set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_for("the probe to mark the TI unhealthy", || async {
        (!app.healthy(&ti_id).await).then_some(())
    })
    .await;
    let padding = "x".repeat(2_000);
    let batch = json!({"model_name": "llama-7b",
                       "tasks": vec![json!({"task_input": {"pad": padding}}); 50]});
    let mut first_task = None;
    let mut refused = None;
    for _ in 0..100 {
        let (status, body) = app.post("/queue/submit_batch", batch.clone()).await;
        if status == StatusCode::INSUFFICIENT_STORAGE {
            refused = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
        first_task
            .get_or_insert_with(|| body["results"][0]["task_id"].as_str().unwrap().to_string());
    }
    let refused = refused.expect("a 1 MiB database fills up");
    assert_message(&refused, "the database is full");
    // The last pages go to single submits.
    let mut single = None;
    for _ in 0..1_000 {
        let (status, body) = submit_input(&app, json!({"pad": padding})).await;
        if status == StatusCode::INSUFFICIENT_STORAGE {
            single = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let single = single.expect("single submits fill the last pages");
    assert_message(&single, "the database is full");
    assert_eq!(single["task_id"], "");
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_message(&ready, "database full");
    let (status, _) = app
        .get(&format!("/task/query?task_id={}", first_task.unwrap()))
        .await;
    assert_eq!(status, StatusCode::OK, "reads go on");

    // Space is freed (here: rows deleted by another connection, as an operator or the
    // cleanup job would); the service recovers by itself, without a restart. The tasks
    // wait for a TI, so they have no decision rows: the oldest tasks go (their 2 KB
    // inputs free pages of every B-tree a small submit writes).
    execute(
        &app.settings,
        "DELETE FROM tasks WHERE task_id IN \
         (SELECT task_id FROM tasks ORDER BY submit_time LIMIT 20)",
    )
    .await;
    let (status, body) = submit_input(&app, json!({"small": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, ready) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
}

// Point 7: corruption at rest.

#[tokio::test]
async fn a_database_file_with_a_corrupt_page_is_refused_at_start_with_the_command_to_inspect_it() {
    if skip_on_postgres("a corrupt page of the SQLite file, PRAGMA quick_check") {
        return;
    }
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let batch = json!({"model_name": "llama-7b",
                       "tasks": vec![json!({"task_input": {"prompt": "p".repeat(300)}}); 200]});
    for _ in 0..3 {
        let (status, body) = app.post("/queue/submit_batch", batch.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (settings, dir) = app.stop().await;
    let path = settings.database.path.clone();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let pages = std::fs::metadata(&path).unwrap().len() / 4096;
    assert!(pages > 20, "{pages} pages");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(pages / 2 * 4096)).unwrap();
        file.write_all(&[0xA5; 4096]).unwrap();
    }

    let refused = match App::build(settings.clone()).await {
        Ok(_) => panic!("a corrupt database was served"),
        Err(e) => format!("{e:#}"),
    };
    assert!(refused.contains("failed PRAGMA quick_check"), "{refused}");
    assert!(
        refused.contains(&format!(
            "sqlite3 {} 'PRAGMA integrity_check'",
            path.display()
        )),
        "{refused}"
    );
    assert!(!refused.contains('\n'), "one line: {refused}");
    drop(dir);
}

// Point 3: slowloris.

/// Reads until the server closes the connection (or resets it); what it sent, if anything.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(crate::helpers::PATIENCE, stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_connection_that_sends_half_a_request_head_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app_with(|s| s.server.header_read_timeout_ms = 300).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    let (status, _) = app.get("/health").await;
    assert_eq!(status, StatusCode::OK, "others are served");
}

#[tokio::test]
async fn beyond_max_connections_a_new_connection_is_closed_and_requests_work_again_once_others_close(
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|s| s.server.max_connections = 2).await;
    const GET: &[u8] = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        // Answered, and kept alive: each holds its slot.
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        held.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // The server may close before the request is written: that is the refusal too.
    let _ = third.write_all(GET).await;
    let answer = read_until_closed(&mut third).await;
    assert!(
        answer.is_empty(),
        "the third connection was served: {answer}"
    );

    drop(held);
    wait_for("a slot to free up", || async {
        let resp = app.client.get(app.url("/health")).send().await.ok()?;
        (resp.status() == StatusCode::OK).then_some(())
    })
    .await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("ti_scheduler_connections_refused_total"),
        "{metrics}"
    );
}
