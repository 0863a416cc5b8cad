//! The dashboard in a real browser: headless Chromium loads `GET /` from a
//! service with simulated TIs and some traffic, driven through the DevTools protocol; the
//! rendered DOM must show the TIs, a completed task and its decision with every
//! candidate. A screenshot is saved.
//!
//! Ignored by a plain `cargo test` (it needs Debian's `chromium`); `.ci/run` installs
//! Chromium and runs it with `cargo test --test api dashboard -- --ignored`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_app, spawn_ti, wait_for, PATIENCE};

/// Headless Chromium with the DevTools protocol on an ephemeral port.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium on `url` and attaches to its page.
    async fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium runs (install Debian's chromium package)");
        // Chromium writes its DevTools port into the profile.
        let active = profile.path().join("DevToolsActivePort");
        let port: u16 = wait_for("Chromium's DevTools port", || async {
            std::fs::read_to_string(&active)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok())
        })
        .await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let page: Value = wait_for("the page target", || async {
            let targets: Value = http
                .get(format!("http://127.0.0.1:{port}/json/list"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            targets
                .as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .cloned()
        })
        .await;
        let ws_url = page["webSocketDebuggerUrl"].as_str().unwrap().to_string();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        Self {
            child,
            _profile: profile,
            ws,
            next_id: 1,
        }
    }

    /// Calls a DevTools method and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("DevTools answers in time")
                .expect("the DevTools connection is open")
                .unwrap();
            if let Message::Text(text) = msg {
                let answer: Value = serde_json::from_str(&text).unwrap();
                if answer["id"] == id {
                    assert!(answer.get("error").is_none(), "{method}: {answer}");
                    return answer["result"].clone();
                }
            }
        }
    }

    /// Evaluates a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs headless Chromium; .ci/run runs it"]
async fn the_dashboard_shows_the_tis_a_completed_task_and_its_decision() {
    let app = spawn_app().await;
    let a = spawn_ti("llama-7b", "A100", 20.0).await;
    let b = spawn_ti("llama-7b", "T4", 40.0).await;
    let ti_a = app.register(&a).await;
    let ti_b = app.register(&b).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(
            app.submit("llama-7b", json!({"output_tokens": 10 * i}))
                .await
                .0,
        );
    }
    for task in &tasks {
        app.wait_completed(task).await;
    }
    let task = tasks.last().unwrap().clone();
    let mut browser = Browser::open(&app.url(&format!("/?task={task}"))).await;

    // The page renders from the service's API and /events; wait until it has.
    let shown = format!(
        "!!document.querySelector('[data-ti=\"{ti_a}\"]') && \
         !!document.querySelector('[data-ti=\"{ti_b}\"]') && \
         !!document.querySelector('[data-task=\"{task}\"][data-status=\"completed\"]') && \
         document.querySelectorAll('[data-candidate]').length === 2 && \
         document.getElementById('live').textContent === 'live'"
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while browser.eval(&shown).await != json!(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard did not show the TIs, the task and its decision:\n{}",
            browser.eval("document.body.innerText").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let decision = browser
        .eval("document.getElementById('decision').innerText")
        .await;
    let decision = decision.as_str().unwrap();
    assert!(decision.contains("shortest_queue"), "{decision}");
    assert!(decision.contains("submit"), "{decision}");
    let chosen = browser
        .eval("document.querySelector('tr.chosen').dataset.candidate")
        .await;
    let (_, scheduled) = (
        (),
        app.query(&task).await["scheduled_ti"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert_eq!(chosen, scheduled, "the chosen TI is marked");

    // A task submitted now shows up live, through /events.
    let (live_task, _) = app.submit("llama-7b", json!({})).await;
    let appears = format!("!!document.querySelector('[data-task=\"{live_task}\"]')");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while browser.eval(&appears).await != json!(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new task did not appear live"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let shot = browser
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(
        png.len() > 10_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    println!("dashboard screenshot: {}", path.display());
}
