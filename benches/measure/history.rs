//! `GET /tasks` latency at scale, run by `ti-scheduler bench scale` on its large history:
//! for each documented filter, requests that start at a random point of the history (a
//! random `until`) alternate with requests for their next page (`cursor`), one client.

use std::time::Instant;

use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::Value;

/// Where the benchmark's history lies.
#[derive(Debug, Clone)]
pub struct HistoryLayout {
    /// Submit time of the oldest task (Unix seconds).
    pub first_submit: f64,
    /// Submit time of the newest task.
    pub last_submit: f64,
    /// The model of every task.
    pub model_name: String,
    /// The TI of every task.
    pub ti_uuid: String,
}

/// The latency of one filter.
#[derive(Debug, Clone)]
pub struct FilterLatency {
    /// The query string, without `until` and `cursor`.
    pub filter: String,
    /// Milliseconds.
    pub p50_ms: f64,
    /// Milliseconds.
    pub p99_ms: f64,
    /// Milliseconds.
    pub max_ms: f64,
    /// Mean tasks per answer.
    pub mean_tasks: f64,
}

/// The filters the README documents, as query strings.
fn filters(layout: &HistoryLayout) -> Vec<String> {
    let (m, ti) = (&layout.model_name, &layout.ti_uuid);
    vec![
        String::new(),
        "status=completed".into(),
        "status=scheduled".into(),
        "status=queued".into(),
        "outcome=succeeded".into(),
        "outcome=failed".into(),
        format!("model_name={m}"),
        format!("model_name={m}&status=completed"),
        format!("model_name={m}&outcome=failed"),
        format!("model_name={m}&status=queued"),
        format!("ti_uuid={ti}"),
        format!("ti_uuid={ti}&outcome=failed"),
        // "Every failed task of a model yesterday": a one-hour-wide window.
        format!("model_name={m}&outcome=failed&since=WINDOW"),
        "since=WINDOW".into(),
        // No filter again: the first row runs right after start-up, beside the recovery
        // of the unfinished tasks; this one runs when it is over.
        "AGAIN".into(),
    ]
}

/// Times `requests` `GET /tasks` per documented filter against the service at `base`.
pub async fn run(
    http: &reqwest::Client,
    base: &str,
    layout: &HistoryLayout,
    requests: u64,
) -> anyhow::Result<Vec<FilterLatency>> {
    let mut rng = rand::rng();
    let mut figures = Vec::new();
    for filter in filters(layout) {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut tasks = 0usize;
        let mut cursor: Option<String> = None;
        let mut until = layout.last_submit;
        for i in 0..requests {
            if i % 2 == 0 {
                until = rng.random_range(layout.first_submit..=layout.last_submit + 1.0);
            }
            let mut query = filter
                .replace("WINDOW", &format!("{}", until - 3600.0))
                .replace("AGAIN", "");
            query.push_str(&format!("&until={until}"));
            if let Some(c) = cursor.take().filter(|_| i % 2 == 1) {
                query.push_str(&format!("&cursor={c}"));
            }
            let t = Instant::now();
            let r = http.get(format!("{base}/tasks?{query}")).send().await?;
            anyhow::ensure!(
                r.status().is_success(),
                "GET /tasks?{query}: {}",
                r.status()
            );
            let body: Value = r.json().await?;
            latency.record(t.elapsed().as_micros().max(1) as u64)?;
            tasks += body["tasks"].as_array().map_or(0, Vec::len);
            cursor = body["next_cursor"].as_str().map(str::to_string);
        }
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        figures.push(FilterLatency {
            filter: if filter.is_empty() {
                "(none)".into()
            } else if filter == "AGAIN" {
                "(none), again, last".into()
            } else {
                filter.replace("WINDOW", "until−3600")
            },
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: latency.max() as f64 / 1000.0,
            mean_tasks: tasks as f64 / requests.max(1) as f64,
        });
    }
    Ok(figures)
}

/// Prints the figures as a Markdown table.
pub fn print(figures: &[FilterLatency], requests: u64) {
    println!(
        "| GET /tasks filter ({requests} requests each: random until, then its next page) | tasks per answer | p50 / p99 / max |"
    );
    println!("|---|---:|---:|");
    for f in figures {
        println!(
            "| `{}` | {:.0} | {:.2} / {:.2} / {:.2} ms |",
            f.filter, f.mean_tasks, f.p50_ms, f.p99_ms, f.max_ms
        );
    }
}
