//! Client commands that talk to a running scheduler over its HTTP API, for people at a
//! terminal and for scripts: `ti-scheduler tasks` (the history), `submit`, `wait` (a
//! long-poll), `watch` (follows `/events`) and `probe` (a health check of `/ready`). Each
//! takes `--url` (or `TI_SCHEDULER_URL`).

mod follow;
mod probe;
mod tasks;

pub use follow::{run_submit, run_wait, run_watch, SubmitArgs, WaitArgs, WatchArgs};
pub use probe::{run_probe, ProbeArgs};
pub use tasks::{fetch_page, run, utc, TasksArgs};

use anyhow::Context;
use serde_json::Value;

/// The answer of a request: its JSON, or an error carrying the server's message.
async fn answer(response: reqwest::Response, url: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    let body: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        let message = body
            .as_ref()
            .and_then(|b| b["message"].as_str())
            .unwrap_or(&text);
        anyhow::bail!("{url} answered HTTP {status}: {message}");
    }
    body.with_context(|| format!("{url} answered something that is not JSON: {text}"))
}

/// Where the scheduler is: `--url`, else `TI_SCHEDULER_URL`, else the default address.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceUrl {
    /// The scheduler's base URL.
    #[arg(
        long = "url",
        env = "TI_SCHEDULER_URL",
        default_value = "http://127.0.0.1:8102"
    )]
    pub base: String,
}

impl ServiceUrl {
    /// The URL of `path` on the scheduler.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }
}

/// An HTTP client for the scheduler (no proxy: it is usually on this machine).
fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().build()?)
}
