//! The client commands on the real binary: `submit`, `wait` (a long-poll) and `watch`
//! (follows `/events`), against a running test service.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_ti, PATIENCE};

fn ti_scheduler() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ti-scheduler"));
    cmd.env_remove("TI_SCHEDULER_URL");
    cmd
}

async fn output(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn submit_with_wait_prints_the_completed_task_and_wait_waits_for_one() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 100.0).await;
    app.register(&ti).await;
    let url = app.url("");

    let mut submit = ti_scheduler();
    submit.args([
        "submit",
        "--url",
        &url,
        "--model",
        "llama-7b",
        "--input",
        r#"{"prompt":"hi"}"#,
        "--wait",
    ]);
    let out = output(submit).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["task_status"], "completed");
    assert_eq!(task["result"]["input"], json!({"prompt": "hi"}));

    let (task_id, _) = app.submit("llama-7b", json!({})).await;
    let mut wait = ti_scheduler();
    wait.args(["wait", &task_id, "--url", &url]);
    let out = output(wait).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["task_id"], task_id.as_str());
    assert_eq!(task["task_status"], "completed");
}

#[tokio::test]
async fn client_commands_fail_with_one_line_naming_the_problem() {
    let app = spawn_app().await;
    let url = app.url("");
    let mut bad_input = ti_scheduler();
    bad_input.args(["submit", "--url", &url, "--model", "m", "--input", "[1]"]);
    let out = output(bad_input).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim(), "error: --input must be a JSON object");

    let mut unknown = ti_scheduler();
    unknown.args(["wait", "nope", "--url", &url]);
    let out = output(unknown).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 404") && stderr.contains("task 'nope' not found"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn watch_prints_one_line_per_event() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 20.0).await;
    app.register(&ti).await;
    let mut watch = ti_scheduler()
        .args(["watch", "--url", &app.url(""), "--model-name", "llama-7b"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains(" completed ");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    // Tasks go on arriving until one's completion is printed: the stream may open after
    // the first ones.
    let submitting = async {
        loop {
            app.submit("llama-7b", json!({})).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let lines = tokio::select! {
        lines = tokio::time::timeout(PATIENCE, lines) => lines.expect("watch printed a completion in time").unwrap(),
        _ = submitting => unreachable!("submitting never ends"),
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let last = lines.last().unwrap();
    let fields: Vec<&str> = last.split(' ').collect();
    assert_eq!(fields[1], "task", "{lines:?}");
    assert_eq!(fields[3], "llama-7b");
    assert_eq!(fields[4], "completed");
    assert!(
        fields[0].parse::<u64>().is_ok(),
        "the event id first: {last}"
    );
}
