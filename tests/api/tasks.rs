//! `GET /tasks` (the task history) and `ti-scheduler tasks` (its command line).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{json, Value};
use ti_scheduler::config::CleanupSettings;
use ti_scheduler::jobs::run_cleanup_once;
use ti_scheduler::ti::sim::{Faults, SimConfig};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    assert_message, open_store, spawn_app, spawn_app_with, spawn_ti, spawn_ti_with, wait_for,
    TestApp,
};

/// One page: its tasks and its `next_cursor`.
async fn page(app: &TestApp, query: &str) -> (Vec<Value>, Option<String>) {
    let (status, body) = app.get(&format!("/tasks?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    assert_eq!(body["status"], "success");
    let tasks = body["tasks"].as_array().unwrap().clone();
    let next = body["next_cursor"].as_str().map(str::to_string);
    (tasks, next)
}

/// Every page of `query`, following `next_cursor`; the tasks in order.
async fn all_pages(app: &TestApp, query: &str) -> Vec<Value> {
    pages_from(app, query, None).await
}

/// Every page of `query` after `cursor`, following `next_cursor`.
async fn pages_from(app: &TestApp, query: &str, mut cursor: Option<String>) -> Vec<Value> {
    let mut tasks = Vec::new();
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_string(),
        };
        let (mut page, next) = page(app, &q).await;
        tasks.append(&mut page);
        match next {
            Some(next) => cursor = Some(next),
            None => return tasks,
        }
    }
}

fn ids(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect()
}

fn set(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}

/// Asserts newest first: submit_time never increases, ties in decreasing task_id.
#[track_caller]
fn assert_newest_first(tasks: &[Value]) {
    for pair in tasks.windows(2) {
        let key = |t: &Value| {
            (
                t["submit_time"].as_f64().unwrap(),
                t["task_id"].as_str().unwrap().to_string(),
            )
        };
        let (a, b) = (key(&pair[0]), key(&pair[1]));
        assert!(a.0 > b.0 || (a.0 == b.0 && a.1 > b.1), "{a:?} before {b:?}");
    }
}

/// Submits `n` tasks in one batch (with these client ids, if given); returns their ids.
async fn submit_batch(
    app: &TestApp,
    model: &str,
    n: usize,
    ids: Option<Vec<String>>,
) -> Vec<String> {
    let tasks: Vec<Value> = (0..n)
        .map(|i| match &ids {
            Some(ids) => json!({"task_input": {"i": i}, "task_id": ids[i]}),
            None => json!({"task_input": {"i": i}}),
        })
        .collect();
    let (status, body) = app
        .post(
            "/queue/submit_batch",
            json!({"model_name": model, "tasks": tasks}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect()
}

/// A TI that finishes at once and runs many tasks together.
async fn instant_ti(model: &str) -> ti_scheduler::ti::sim::SimTi {
    spawn_ti_with(SimConfig {
        model: model.into(),
        base_ms: 0.0,
        parallelism: 64,
        ..SimConfig::default()
    })
    .await
}

async fn ti_with_faults(model: &str, faults: Faults) -> ti_scheduler::ti::sim::SimTi {
    let ti = spawn_ti(model, "A100", 1.0).await;
    ti.set_faults(faults);
    ti
}

#[tokio::test]
async fn filters_select_by_model_status_outcome_ti_and_time_alone_and_combined() {
    let app = spawn_app_with(|s| s.ti.reconcile_after_ms = 600_000).await;
    let good = spawn_ti("llama-7b", "A100", 1.0).await;
    let failing = ti_with_faults(
        "llama-7b",
        Faults {
            fail_tasks: true,
            ..Faults::default()
        },
    )
    .await;
    let ocr = spawn_ti("ocr", "T4", 1.0).await;
    let silent = ti_with_faults(
        "whisper",
        Faults {
            drop_callbacks: true,
            ..Faults::default()
        },
    )
    .await;
    let refusing = ti_with_faults(
        "asr",
        Faults {
            refuse_submits: true,
            ..Faults::default()
        },
    )
    .await;
    let good_id = app.register(&good).await;
    let failing_id = app.register(&failing).await;
    app.register(&ocr).await;
    let silent_id = app.register(&silent).await;
    app.register(&refusing).await;
    app.set_strategy("round_robin").await;

    // What each task is, by id.
    let mut model_of = HashMap::new();
    let mut done = Vec::new();
    for _ in 0..3 {
        for model in ["llama-7b", "llama-7b", "ocr"] {
            let (id, _) = app.submit(model, json!({})).await;
            model_of.insert(id.clone(), model);
            done.push(id);
        }
    }
    let (scheduled, _) = app.submit("whisper", json!({})).await;
    let (queued, _) = app.submit("asr", json!({})).await;
    model_of.insert(scheduled.clone(), "whisper");
    model_of.insert(queued.clone(), "asr");
    let mut views = HashMap::new();
    for id in &done {
        views.insert(id.clone(), app.wait_completed(id).await);
    }
    wait_for("the whisper task to be scheduled", || async {
        (app.query(&scheduled).await["task_status"] == "scheduled").then_some(())
    })
    .await;
    views.insert(scheduled.clone(), app.query(&scheduled).await);
    views.insert(queued.clone(), app.query(&queued).await);
    assert_eq!(views[&queued]["task_status"], "queued");
    let failed: HashSet<String> = done
        .iter()
        .filter(|id| views[*id]["scheduled_ti"] == failing_id.as_str())
        .cloned()
        .collect();
    assert!(
        (1..6).contains(&failed.len()),
        "round robin sent some llama tasks to each TI: {} failed",
        failed.len()
    );

    // Each filter against the tasks we know.
    let expect = |keep: &dyn Fn(&str, &Value) -> bool| -> HashSet<String> {
        views
            .iter()
            .filter(|(id, v)| keep(id, v))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let everything = all_pages(&app, "limit=4").await;
    assert_newest_first(&everything);
    assert_eq!(set(&ids(&everything)), expect(&|_, _| true));
    let by_id: HashMap<String, Value> = everything
        .iter()
        .map(|t| (t["task_id"].as_str().unwrap().to_string(), t.clone()))
        .collect();
    for (id, view) in &views {
        let row = &by_id[id];
        assert_eq!(row["model_name"], model_of[id.as_str()]);
        assert_eq!(row["task_status"], view["task_status"]);
        if id != &queued {
            // The queued task's TI changes while its refused dispatch is retried.
            assert_eq!(row["scheduled_ti"], view["scheduled_ti"]);
        }
        assert_eq!(row["submit_time"], view["submit_time"]);
        assert_eq!(row["completion_time"], view["completion_time"]);
        assert_eq!(row["execution_time"], view["execution_time"]);
        let outcome = match (view["task_status"].as_str(), failed.contains(id)) {
            (Some("completed"), true) => json!("failed"),
            (Some("completed"), false) => json!("succeeded"),
            _ => Value::Null,
        };
        assert_eq!(row["outcome"], outcome, "{id}");
    }

    let times: Vec<f64> = {
        let mut t: Vec<f64> = views
            .values()
            .map(|v| v["submit_time"].as_f64().unwrap())
            .collect();
        t.sort_by(f64::total_cmp);
        t
    };
    let (since, until) = (times[3], times[8]);
    let in_window = |v: &Value| {
        let t = v["submit_time"].as_f64().unwrap();
        t >= since && t < until
    };
    let status_is = |s: &'static str| move |_: &str, v: &Value| v["task_status"] == s;
    let cases: Vec<(String, HashSet<String>)> = vec![
        (
            "model_name=llama-7b".into(),
            expect(&|id, _| model_of[id] == "llama-7b"),
        ),
        ("model_name=nobody".into(), HashSet::new()),
        ("status=queued".into(), expect(&status_is("queued"))),
        ("status=scheduled".into(), expect(&status_is("scheduled"))),
        ("status=completed".into(), expect(&status_is("completed"))),
        ("outcome=failed".into(), failed.clone()),
        (
            "outcome=succeeded".into(),
            expect(&|id, v| v["task_status"] == "completed" && !failed.contains(id)),
        ),
        (
            format!("ti_uuid={good_id}"),
            expect(&|_, v| v["scheduled_ti"] == good_id.as_str()),
        ),
        (
            format!("ti_uuid={silent_id}"),
            HashSet::from([scheduled.clone()]),
        ),
        ("model_name=llama-7b&outcome=failed".into(), failed.clone()),
        (
            "model_name=llama-7b&status=completed&outcome=succeeded".into(),
            expect(&|id, _| model_of[id] == "llama-7b" && !failed.contains(id)),
        ),
        ("model_name=ocr&status=queued".into(), HashSet::new()),
        ("status=queued&outcome=failed".into(), HashSet::new()),
        (
            format!("ti_uuid={failing_id}&outcome=failed"),
            failed.clone(),
        ),
        (
            format!("ti_uuid={failing_id}&model_name=ocr"),
            HashSet::new(),
        ),
        (
            format!("since={since}&until={until}"),
            expect(&|_, v| in_window(v)),
        ),
        (
            format!("model_name=llama-7b&outcome=failed&since={since}&until={until}"),
            expect(&|id, v| failed.contains(id) && in_window(v)),
        ),
        (
            format!("status=completed&since={since}"),
            expect(&|_, v| {
                v["task_status"] == "completed" && v["submit_time"].as_f64().unwrap() >= since
            }),
        ),
        (format!("until={}", times[0]), HashSet::new()),
    ];
    for (query, expected) in cases {
        let tasks = all_pages(&app, &format!("{query}&limit=2")).await;
        assert_newest_first(&tasks);
        let got = ids(&tasks);
        assert_eq!(got.len(), set(&got).len(), "{query}: a task twice");
        assert_eq!(set(&got), expected, "{query}");
    }

    // limit and next_cursor: a full last page still says there is no next one.
    let (first, next) = page(&app, "limit=11").await;
    assert_eq!((first.len(), next.is_some()), (11, false));
    let (first, next) = page(&app, "limit=10").await;
    assert_eq!(first.len(), 10);
    let (rest, last) = page(&app, &format!("limit=10&cursor={}", next.unwrap())).await;
    assert_eq!((rest.len(), last), (1, None));
    let (default_page, _) = page(&app, "").await;
    assert_eq!(
        default_page.len(),
        11,
        "the default limit (100) holds them all"
    );
}

#[tokio::test]
async fn bad_filter_values_are_400s_that_name_the_parameter() {
    let app = spawn_app().await;
    for (query, needle) in [
        (
            "status=done",
            "unknown status 'done'; valid: queued, scheduled, completed",
        ),
        (
            "outcome=ok",
            "unknown outcome 'ok'; valid: succeeded, failed",
        ),
        ("ti_uuid=not-a-uuid", "invalid ti_uuid 'not-a-uuid'"),
        ("since=yesterday", "invalid since 'yesterday'"),
        ("until=12h", "invalid until '12h'"),
        ("limit=0", "invalid limit '0'"),
        ("limit=1001", "invalid limit '1001'"),
        ("limit=many", "invalid limit 'many'"),
        ("cursor=garbage", "invalid cursor 'garbage'"),
        ("model_name=", "model_name must not be empty"),
        ("status=queued&status=completed", "status"),
    ] {
        let (status, body) = app.get(&format!("/tasks?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["status"], "error");
        assert_message(&body, needle);
    }
}

#[tokio::test]
async fn paging_through_ten_thousand_tasks_while_submits_continue_sees_each_once() {
    let app = Arc::new(spawn_app().await);
    // The model's only TI fails its health checks: the tasks are committed and wait,
    // queued, for a usable TI, and the test spends its time on the history, not on
    // running 10,000 tasks.
    let ti = instant_ti("llama-7b").await;
    let ti_id = app.register(&ti).await;
    ti.set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_for("the TI to be unhealthy", || async {
        (!app.healthy(&ti_id).await).then_some(())
    })
    .await;
    // Client-chosen ids in decreasing order for the later batches: id order is not time
    // order, and whole batches share one submit time, so pages end inside ties.
    let mut before = Vec::new();
    for batch in 0..20 {
        let ids = (batch >= 10).then(|| {
            (0..500)
                .map(|i| format!("client-{:05}", 20_000 - batch * 500 - i))
                .collect()
        });
        before.extend(submit_batch(&app, "llama-7b", 500, ids).await);
    }
    assert_eq!(set(&before).len(), 10_000);

    // Another client keeps submitting while the pages are read.
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicUsize::new(0));
    let during = Arc::new(Mutex::new(Vec::new()));
    let submitter = {
        let (app, stop, submitted, during) =
            (app.clone(), stop.clone(), submitted.clone(), during.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let ids = submit_batch(&app, "llama-7b", 20, None).await;
                during.lock().unwrap().extend(ids);
                submitted.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        // Let at least one more batch commit before each page.
        let mark = submitted.load(Ordering::SeqCst);
        wait_for("the other client to submit", || async {
            (submitted.load(Ordering::SeqCst) > mark).then_some(())
        })
        .await;
        let query = match &cursor {
            Some(c) => format!("limit=777&cursor={c}"),
            None => "limit=777".to_string(),
        };
        let (tasks, next) = page(&app, &query).await;
        pages += 1;
        seen.extend(tasks);
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    stop.store(true, Ordering::SeqCst);
    submitter.await.unwrap();

    assert_newest_first(&seen);
    let seen = ids(&seen);
    assert_eq!(seen.len(), set(&seen).len(), "no task is on two pages");
    let seen = set(&seen);
    let missing: Vec<&String> = before.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} tasks missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let during: HashSet<String> = during.lock().unwrap().iter().cloned().collect();
    assert!(!during.is_empty());
    let before = set(&before);
    assert!(
        seen.iter()
            .all(|id| before.contains(id) || during.contains(id)),
        "every task seen was submitted"
    );
    assert!(
        pages >= 13,
        "{pages} pages of 777 for 10,000 tasks and more"
    );
}

#[tokio::test]
async fn the_history_reads_the_same_after_a_restart() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 1.0).await;
    app.register(&ti).await;
    let submitted = submit_batch(&app, "llama-7b", 30, None).await;
    for id in &submitted {
        app.wait_completed(id).await;
    }
    let (first, cursor) = page(&app, "limit=7").await;
    let before = all_pages(&app, "limit=7").await;
    let completed_before = all_pages(&app, "model_name=llama-7b&status=completed&limit=5").await;

    let app = app.restart().await;

    assert_eq!(all_pages(&app, "limit=7").await, before);
    assert_eq!(
        all_pages(&app, "model_name=llama-7b&status=completed&limit=5").await,
        completed_before
    );
    assert_eq!(set(&ids(&before)), set(&submitted));
    // A cursor from before the restart still works.
    let (second, _) = page(&app, &format!("limit=7&cursor={}", cursor.unwrap())).await;
    assert_eq!([first, second].concat(), before[..14].to_vec());
}

#[tokio::test]
async fn paging_goes_on_after_the_cleanup_job_deleted_old_tasks() {
    let app = spawn_app_with(|s| s.ti.reconcile_after_ms = 600_000).await;
    let fast = spawn_ti("llama-7b", "A100", 1.0).await;
    let silent = ti_with_faults(
        "ocr",
        Faults {
            drop_callbacks: true,
            ..Faults::default()
        },
    )
    .await;
    app.register(&fast).await;
    app.register(&silent).await;
    // Alternately a task that completes and one that never does, oldest first.
    let mut unfinished = Vec::new();
    for i in 0..12 {
        if i % 2 == 0 {
            let (id, _) = app.submit("llama-7b", json!({})).await;
            app.wait_completed(&id).await;
        } else {
            unfinished.push(app.submit("ocr", json!({})).await.0);
        }
    }
    let (first, cursor) = page(&app, "limit=4").await;
    assert_eq!(
        first[3]["task_status"], "completed",
        "the cursor names a completed task"
    );

    let stop = CancellationToken::new();
    let (db, writer) = open_store(&app.settings, stop.clone()).await;
    let settings = CleanupSettings {
        result_ttl_secs: 60,
        retention_secs: 3600,
        batch_size: 100,
        ..CleanupSettings::default()
    };
    let later = ti_scheduler::domain::unix_now() + 7200.0;
    let report = run_cleanup_once(&db, &settings, later).await.unwrap();
    assert_eq!(report.purged, 6);
    stop.cancel();
    writer.await.unwrap();

    // The page after the purged task: the unfinished tasks older than it, none twice.
    let rest = pages_from(&app, "limit=2", cursor).await;
    let mut seen = ids(&first);
    seen.extend(ids(&rest));
    assert_eq!(seen.len(), set(&seen).len());
    assert_eq!(
        ids(&rest),
        unfinished[..4].iter().rev().cloned().collect::<Vec<_>>()
    );
    let now = all_pages(&app, "limit=5").await;
    assert_eq!(
        ids(&now),
        unfinished.iter().rev().cloned().collect::<Vec<_>>()
    );
    assert!(all_pages(&app, "status=completed").await.is_empty());
}

/// Runs `ti-scheduler tasks --url <app> args...`; returns (success, stdout, stderr).
async fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ti-scheduler"))
        .args(["tasks", "--url", &app.url("")])
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn the_tasks_command_prints_a_table_or_json_and_follows_every_page_with_all() {
    let app = spawn_app().await;
    let good = spawn_ti("llama-7b", "A100", 1.0).await;
    let failing = ti_with_faults(
        "llama-7b",
        Faults {
            fail_tasks: true,
            ..Faults::default()
        },
    )
    .await;
    app.register(&good).await;
    let failing_id = app.register(&failing).await;
    app.set_strategy("round_robin").await;
    let submitted = submit_batch(&app, "llama-7b", 24, None).await;
    let mut failed = Vec::new();
    for id in &submitted {
        let view = app.wait_completed(id).await;
        if view["scheduled_ti"] == failing_id.as_str() {
            failed.push(id.clone());
        }
    }
    assert!((1..24).contains(&failed.len()), "{} failed", failed.len());

    let (ok, out, err) = cli(&app, &["--limit", "5", "--all", "--json"]).await;
    assert!(ok, "{err}");
    let body: Value = serde_json::from_str(&out).unwrap();
    let listed = ids(body["tasks"].as_array().unwrap());
    assert_eq!(listed.len(), 24);
    assert_eq!(set(&listed), set(&submitted));
    assert_eq!(body["next_cursor"], Value::Null);

    let (ok, out, err) = cli(
        &app,
        &["--model-name", "llama-7b", "--outcome", "failed", "--all"],
    )
    .await;
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    for column in [
        "TASK_ID",
        "MODEL",
        "STATUS",
        "OUTCOME",
        "TI",
        "SUBMITTED (UTC)",
    ] {
        assert!(header.contains(column), "{header}");
    }
    for id in &submitted {
        let line = out.lines().find(|l| l.starts_with(id.as_str()));
        assert_eq!(line.is_some(), failed.contains(id), "{id} in\n{out}");
        if let Some(line) = line {
            assert!(
                line.contains("failed") && line.contains(&failing_id),
                "{line}"
            );
        }
    }

    // One page at a time: the table says how to get the next one.
    let (ok, out, _) = cli(&app, &["--limit", "10"]).await;
    assert!(ok);
    let hint = out
        .lines()
        .find(|l| l.contains("--cursor"))
        .expect("a next-page hint");
    let next = hint.split("--cursor ").nth(1).unwrap().trim();
    let (ok, out, err) = cli(&app, &["--limit", "10", "--cursor", next, "--json"]).await;
    assert!(ok, "{err}");
    let body: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["tasks"].as_array().unwrap().len(), 10);
}

#[tokio::test]
async fn the_tasks_command_prints_the_servers_message_and_fails_on_a_bad_filter() {
    let app = spawn_app().await;
    let (ok, out, err) = cli(&app, &["--status", "done"]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("unknown status 'done'; valid: queued, scheduled, completed"),
        "{err}"
    );
    assert!(err.contains("400"), "{err}");
}
