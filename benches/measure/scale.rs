//! `cargo bench --bench measure -- scale`: start-up and reads at scale. It builds a database with a
//! large history of completed tasks (each with its decision) and a number of unfinished
//! ones, then starts the service on it (a child process) and measures the time from spawn
//! to the first successful `GET /ready`, the latency of `GET /task/query` on random
//! historical tasks, that of `GET /tasks` for each documented filter ([`super::history`]),
//! and the service's peak RSS. One task in a hundred failed.

use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::Rng;

use super::load::{free_port, peak_rss_mib};
use ti_scheduler::store;

/// Options of the scale benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Completed tasks in the history.
    #[arg(long, default_value_t = 1_000_000)]
    pub history: u64,
    /// Unfinished tasks.
    #[arg(long, default_value_t = 10_000)]
    pub unfinished: u64,
    /// `/task/query` requests to time.
    #[arg(long, default_value_t = 2_000)]
    pub queries: u64,
}

/// Builds the database; returns the submit time of its oldest task.
fn fill(db: &std::path::Path, args: &ScaleArgs) -> anyhow::Result<f64> {
    store::migrate(db)?;
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "synchronous", "OFF")?;
    let txn = conn.transaction()?;
    let ti = "00000000-0000-4000-8000-000000000001";
    let first = ti_scheduler::domain::unix_now() - 86_400.0;
    // Port 9 (discard): nothing listens, so recovery finds the TI unreachable at once.
    txn.execute(
        "INSERT INTO task_instances (ti_uuid, host, port, model_name, hardware, callback_token, registered_at)
         VALUES (?1, '127.0.0.1', 9, 'llama-7b', 'A100', 'token', 0)",
        [ti],
    )?;
    {
        let mut task = txn.prepare(
            "INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid, predicted_ms,
                                predicted_error_ms, submit_time, dispatch_time, completion_time,
                                execution_time_ms, result, outcome)
             VALUES (?1, 'llama-7b', '{\"prompt\":\"hello\"}', '{\"input_tokens\":100}', ?2, ?3, 100, 10,
                     ?4, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut decision = txn.prepare(
            "INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode, predicted_ms,
                                    predicted_error_ms, prediction_source, lookup_fallback, chosen_ti, candidates)
             VALUES (?1, ?2, 'submit', 'shortest_queue', 'default', 100, 10, 'learned', 0, ?3,
                     '[{\"ti_uuid\":\"00000000-0000-4000-8000-000000000001\",\"wait_ms\":0}]')",
        )?;
        for i in 0..args.history + args.unfinished {
            let id = format!("task-scale-{i:09}");
            let at = first + i as f64 * 0.001;
            let done = i < args.history;
            let failed = done && i % 100 == 0;
            task.execute(rusqlite::params![
                id,
                if done { "completed" } else { "scheduled" },
                ti,
                at,
                done.then_some(at + 0.1),
                done.then_some(100.0),
                done.then_some(if failed {
                    "{\"error\":\"failed\"}"
                } else {
                    "{\"output\":\"ok\"}"
                }),
                done.then_some(if failed { "failed" } else { "succeeded" }),
            ])?;
            decision.execute(rusqlite::params![id, at, ti])?;
        }
    }
    txn.commit()?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(first)
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("ti-scheduler-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("scale.db");
    let filled = Instant::now();
    let first_submit = fill(&db, args).context("building the database")?;
    let size_mib = std::fs::metadata(&db)?.len() as f64 / (1024.0 * 1024.0);
    eprintln!(
        "built {} completed + {} unfinished tasks ({size_mib:.0} MiB) in {:.1} s",
        args.history,
        args.unfinished,
        filled.elapsed().as_secs_f64()
    );

    let port = free_port()?;
    let log = std::fs::File::create(dir.join("service.log"))?;
    let started = Instant::now();
    let mut child = std::process::Command::new(super::SERVICE_BIN)
        .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--db"])
        .arg(&db)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = format!("http://127.0.0.1:{port}");
    let ready = loop {
        if let Ok(r) = http.get(format!("{base}/ready")).send().await {
            if r.status().is_success() {
                break started.elapsed();
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "not ready in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut rng = rand::rng();
    for _ in 0..args.queries {
        let id = format!("task-scale-{:09}", rng.random_range(0..args.history.max(1)));
        let t = Instant::now();
        let r = http
            .get(format!("{base}/task/query?task_id={id}"))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "query {id}: {}", r.status());
        r.bytes().await?;
        latency.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    let layout = super::history::HistoryLayout {
        first_submit,
        last_submit: first_submit + (args.history + args.unfinished) as f64 * 0.001,
        model_name: "llama-7b".into(),
        ti_uuid: "00000000-0000-4000-8000-000000000001".into(),
    };
    let per_filter = (args.queries / 10).max(2);
    let history = super::history::run(&http, &base, &layout, per_filter).await?;
    let rss = peak_rss_mib(child.id()).unwrap_or(f64::NAN);
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();

    println!(
        "Scale: {} completed tasks (with their decisions) and {} unfinished, database {size_mib:.0} MiB",
        args.history, args.unfinished
    );
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    println!(
        "| restart to ready (spawn → first 200 from /ready) | {:.0} ms |",
        ready.as_secs_f64() * 1000.0
    );
    println!(
        "| /task/query latency, p50 / p99 / max ({} random historical tasks, one client) | {:.2} / {:.2} / {:.2} ms |",
        args.queries,
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    println!("| peak RSS of the service | {rss:.1} MiB |");
    println!();
    super::history::print(&history, per_filter);
    Ok(())
}
