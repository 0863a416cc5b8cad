//! `GET /events`: task and TI events as Server-Sent Events, filters, resuming
//! with `Last-Event-ID`, and `event: reset` when the missed events are gone.

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_message, spawn_app, spawn_app_with, spawn_ti, TestApp, PATIENCE};

/// One server-sent event.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// An open `/events` stream.
struct Stream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buffer: String,
}

impl Stream {
    async fn open(app: &TestApp, query: &str, last_event_id: Option<u64>) -> Self {
        let mut request = app.client.get(app.url(&format!("/events{query}")));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Self {
            body: Box::pin(resp.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped); `None` when the stream ends.
    async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(Sse {
                    event,
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("an event in time")?
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Events until one matches `done`, which is included.
    async fn until(&mut self, done: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await.expect("the stream goes on");
            let stop = done(&e);
            seen.push(e);
            if stop {
                return seen;
            }
        }
    }
}

fn completed(task: &str) -> impl Fn(&Sse) -> bool + '_ {
    move |e| e.event == "task" && e.data["task_id"] == task && e.data["task_status"] == "completed"
}

#[tokio::test]
async fn task_and_ti_changes_arrive_in_order_with_increasing_ids() {
    let app = spawn_app().await;
    let mut stream = Stream::open(&app, "", None).await;
    let ti = spawn_ti("llama-7b", "A100", 20.0).await;
    let ti_id = app.register(&ti).await;
    let (task, _) = app.submit("llama-7b", json!({})).await;

    let seen = stream.until(completed(&task)).await;
    let registered = &seen[0];
    assert_eq!(registered.event, "ti");
    assert_eq!(
        registered.data,
        json!({"ti_uuid": ti_id, "model_name": "llama-7b", "healthy": true, "removed": false})
    );
    let statuses: Vec<&str> = seen
        .iter()
        .filter(|e| e.event == "task")
        .map(|e| e.data["task_status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.first(), Some(&"queued"));
    assert_eq!(statuses.last(), Some(&"completed"));
    let last = seen.last().unwrap();
    assert_eq!(last.data["scheduled_ti"], ti_id.as_str());
    assert_eq!(last.data["model_name"], "llama-7b");
    assert!(last.data["time"].as_f64().unwrap() > 0.0);
    let ids: Vec<u64> = seen.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test]
async fn filters_keep_only_one_task_or_one_model() {
    let app = spawn_app().await;
    let a = spawn_ti("model-a", "A100", 20.0).await;
    let b = spawn_ti("model-b", "A100", 20.0).await;
    app.register(&a).await;
    app.register(&b).await;
    let mut model_b = Stream::open(&app, "?model_name=model-b", None).await;
    let (first, _) = app.submit("model-a", json!({})).await;
    let (second, _) = app.submit("model-b", json!({})).await;
    let mut one_task = Stream::open(&app, &format!("?task_id={second}"), None).await;

    let seen = model_b.until(completed(&second)).await;
    assert!(
        seen.iter().all(|e| e.data["model_name"] == "model-b"),
        "{seen:?}"
    );
    let seen = one_task.until(completed(&second)).await;
    assert!(
        seen.iter().all(|e| e.data["task_id"] == second.as_str()),
        "{seen:?}"
    );
    assert!(seen.iter().all(|e| e.data["task_id"] != first.as_str()));
}

#[tokio::test]
async fn a_client_resuming_with_last_event_id_gets_what_it_missed() {
    let app = spawn_app().await;
    let ti = spawn_ti("llama-7b", "A100", 20.0).await;
    app.register(&ti).await;
    let mut stream = Stream::open(&app, "", None).await;
    let (task, _) = app.submit("llama-7b", json!({})).await;
    let seen = stream.until(completed(&task)).await;
    drop(stream);

    let first = seen[0].id.unwrap();
    let mut resumed = Stream::open(&app, "", Some(first)).await;
    let replayed = resumed.until(completed(&task)).await;
    let expected: Vec<Option<u64>> = seen[1..].iter().map(|e| e.id).collect();
    let got: Vec<Option<u64>> = replayed.iter().map(|e| e.id).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_client_whose_missed_events_are_gone_gets_a_reset_first() {
    let app = spawn_app_with(|s| s.server.event_buffer = 4).await;
    let ti = spawn_ti("llama-7b", "A100", 5.0).await;
    app.register(&ti).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(app.submit("llama-7b", json!({})).await.0);
    }
    for task in &tasks {
        app.wait_completed(task).await;
    }
    let mut stream = Stream::open(&app, "", Some(1)).await;
    let reset = stream.next().await.unwrap();
    assert_eq!(reset.event, "reset");
    assert!(reset.data["message"]
        .as_str()
        .unwrap()
        .contains("no longer kept"));
    let newest = reset.id.unwrap();
    assert!(newest >= 13, "every task made at least 3 events: {newest}");

    // It goes on live from there.
    let (task, _) = app.submit("llama-7b", json!({})).await;
    let seen = stream.until(completed(&task)).await;
    assert!(seen.iter().all(|e| e.id.unwrap() > newest));
}

#[tokio::test]
async fn a_bad_last_event_id_is_400() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(app.url("/events"))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_message(&body, "Last-Event-ID must be an event id");
}
