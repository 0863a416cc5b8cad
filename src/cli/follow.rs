//! `ti-scheduler submit`, `wait` and `watch`: a task's life from the terminal, without a
//! polling loop: `wait` long-polls `/task/query` (each call waits up to a minute, woken by
//! the completion), `watch` follows `/events` and prints one line per event, resuming with
//! `Last-Event-ID` when the connection drops.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{json, Value};

use super::{answer, client};

/// Options of `ti-scheduler submit`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub url: super::ServiceUrl,
    /// The model to run it on.
    #[arg(long)]
    pub model: String,
    /// The task's input, a JSON object.
    #[arg(long, default_value = "{}")]
    pub input: String,
    /// The task's metadata, a JSON object (features such as input_tokens).
    #[arg(long)]
    pub metadata: Option<String>,
    /// An idempotency key.
    #[arg(long)]
    pub task_id: Option<String>,
    /// Wait for the result and print it.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

/// Options of `ti-scheduler wait`.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// The task.
    pub task_id: String,
    /// Where the scheduler is.
    #[command(flatten)]
    pub url: super::ServiceUrl,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

/// Options of `ti-scheduler watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub url: super::ServiceUrl,
    /// Only this model's events.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Only this task's events.
    #[arg(long)]
    pub task_id: Option<String>,
    /// Print each event's JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

fn object(what: &str, text: &str) -> anyhow::Result<Value> {
    let value: Value =
        serde_json::from_str(text).with_context(|| format!("--{what} is not JSON"))?;
    anyhow::ensure!(value.is_object(), "--{what} must be a JSON object");
    Ok(value)
}

/// Submits a task; prints its id (and, with `--wait`, its final state as JSON).
pub async fn run_submit(args: &SubmitArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut body = json!({"model_name": args.model, "task_input": object("input", &args.input)?});
    if let Some(metadata) = &args.metadata {
        body["metadata"] = object("metadata", metadata)?;
    }
    if let Some(id) = &args.task_id {
        body["task_id"] = json!(id);
    }
    let url = args.url.at("/queue/submit");
    let http = client()?;
    let response = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("requesting {url}"))?;
    let submitted = answer(response, &url).await?;
    let task_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !args.wait {
        writeln!(out, "{task_id}")?;
        return Ok(());
    }
    let task = wait(&http, &args.url, &task_id, args.timeout).await?;
    writeln!(out, "{task}")?;
    Ok(())
}

/// Waits for a task to complete; prints its final state as JSON.
pub async fn run_wait(args: &WaitArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let task = wait(&client()?, &args.url, &args.task_id, args.timeout).await?;
    writeln!(out, "{task}")?;
    Ok(())
}

/// Long-polls `/task/query` until the task is completed or `timeout_s` passes.
async fn wait(
    http: &reqwest::Client,
    service: &super::ServiceUrl,
    task_id: &str,
    timeout_s: f64,
) -> anyhow::Result<Value> {
    let url = service.at("/task/query");
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.max(0.0));
    loop {
        let left_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(60_000) as u64;
        let response = http
            .get(&url)
            .query(&[("task_id", task_id), ("wait_ms", &left_ms.to_string())])
            .send()
            .await
            .with_context(|| format!("requesting {url}"))?;
        let task = answer(response, &url).await?;
        if task["task_status"] == "completed" {
            return Ok(task);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "task {task_id} is still {} after {timeout_s} s",
            task["task_status"].as_str().unwrap_or("unfinished")
        );
    }
}

/// Follows `/events`, one line per event, until interrupted; resumes after a dropped
/// connection with `Last-Event-ID`.
pub async fn run_watch(args: &WatchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let http = client()?;
    let url = args.url.at("/events");
    let filters: Vec<(&str, &str)> = [
        ("model_name", args.model_name.as_deref()),
        ("task_id", args.task_id.as_deref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let mut last_id: Option<String> = None;
    loop {
        let mut request = http.get(&url).query(&filters);
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("requesting {url}"))?;
        if !response.status().is_success() {
            answer(response, &url).await?;
            anyhow::bail!("{url} refused the stream");
        }
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if let Some((id, line)) = event_line(&block, args.json) {
                    last_id = id.or(last_id);
                    writeln!(out, "{line}")?;
                    out.flush()?;
                }
            }
        }
        // The stream ended (the service restarted, or we fell behind): resume.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One event block as a line of text (or its JSON), with its id; `None` for a comment.
fn event_line(block: &str, json: bool) -> Option<(Option<String>, String)> {
    let (mut event, mut id, mut data) = ("message", None, String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            event = v.trim();
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim());
        }
    }
    if data.is_empty() {
        return None;
    }
    if json {
        return Some((id, data));
    }
    let d: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
    let field = |k: &str| d[k].as_str().unwrap_or("-").to_string();
    let line = match event {
        "task" => format!(
            "{} task {} {} {} {}",
            id.as_deref().unwrap_or("-"),
            field("task_id"),
            field("model_name"),
            field("task_status"),
            if field("scheduled_ti").is_empty() {
                "-".into()
            } else {
                field("scheduled_ti")
            }
        ),
        "ti" => format!(
            "{} ti {} {} {}{}",
            id.as_deref().unwrap_or("-"),
            field("ti_uuid"),
            field("model_name"),
            if d["healthy"] == true {
                "healthy"
            } else {
                "unhealthy"
            },
            if d["removed"] == true { " removed" } else { "" }
        ),
        other => format!("{} {other} {data}", id.as_deref().unwrap_or("-")),
    };
    Some((id, line))
}

#[cfg(test)]
mod tests {
    use super::event_line;

    #[test]
    fn events_print_as_one_line_each() {
        let block = "event: task\nid: 7\ndata: {\"task_id\":\"t1\",\"model_name\":\"m\",\"task_status\":\"completed\",\"scheduled_ti\":\"ti-1\",\"time\":1.0}\n\n";
        assert_eq!(
            event_line(block, false),
            Some((Some("7".into()), "7 task t1 m completed ti-1".into()))
        );
        assert_eq!(event_line(": keep-alive\n\n", false), None);
    }
}
