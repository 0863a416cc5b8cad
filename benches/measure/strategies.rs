//! `cargo bench --bench measure -- strategies`: job completion time of each strategy on a
//! heterogeneous cluster, in both predict modes, and the calibration of the queue
//! estimates.
//!
//! Each run starts the real service in-process on a fresh database, four simulated TIs
//! (two fast, two 2.5× slower, one task at a time, 10 % noise), imports a lookup table of
//! the workload, warms the predictor up with round-robin traffic at half load (not
//! measured), then switches to the strategy and mode under test and submits tasks over
//! HTTP as a Poisson process at the given share of the cluster's capacity. Job completion
//! time (JCT) is `completion_time − submit_time` of each measured task, read from the
//! database afterwards. Calibration is the share of tasks whose actual wait
//! (JCT − execution time) fell within the chosen TI's estimated wait ± 2 errors at submit.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::workload::{self, HARDWARE, MODEL};
use ti_scheduler::config::Settings;
use ti_scheduler::domain::{PredictMode, StrategyKind, TiKind};
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};
use ti_scheduler::ti::sim::SimTi;
use ti_scheduler::App;

/// Options of the strategy benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct StrategyArgs {
    /// Measured tasks per run.
    #[arg(long, default_value_t = 600)]
    pub tasks: usize,
    /// Warm-up tasks per run (round robin, half load).
    #[arg(long, default_value_t = 150)]
    pub warmup: usize,
    /// Arrival rates as shares of the cluster's capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.7,0.9")]
    pub loads: Vec<f64>,
    /// Strategies to compare.
    #[arg(long, value_delimiter = ',', value_parser = StrategyKind::parse,
          default_value = "shortest_queue,round_robin,weighted,probabilistic")]
    pub strategies: Vec<StrategyKind>,
    /// Predict modes to compare.
    #[arg(long, value_delimiter = ',', value_parser = PredictMode::parse,
          default_value = "default,lookup_table")]
    pub modes: Vec<PredictMode>,
    /// Multiplies every execution time (smaller runs faster).
    #[arg(long, default_value_t = 0.25)]
    pub time_scale: f64,
    /// σ of the lognormal noise.
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Seed of arrivals, task sizes and noise.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Kind of the simulated TIs: callback (2 fast + 2 slow, one task at a time) or
    /// openai (OpenAI-compatible servers of mixed hardware and concurrency, see OPENAI_TIS).
    #[arg(long, default_value = "callback", value_parser = TiKind::parse)]
    pub protocol: TiKind,
    /// openai: smallest share of max_tokens a completion takes (1: the output length is
    /// known at submit; below 1 it varies and the predictor only knows the bound).
    #[arg(long, default_value_t = 1.0)]
    pub min_completion_share: f64,
}

/// The OpenAI-compatible cluster: (hardware, requests at once) of each server.
const OPENAI_TIS: [(usize, usize); 4] = [(0, 4), (0, 1), (1, 2), (1, 4)];

/// One run's figures.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Strategy.
    pub strategy: StrategyKind,
    /// Predict mode.
    pub mode: PredictMode,
    /// Share of capacity.
    pub load: f64,
    /// Mean JCT, ms.
    pub mean_ms: f64,
    /// Median JCT, ms.
    pub p50_ms: f64,
    /// 99th percentile JCT, ms.
    pub p99_ms: f64,
    /// Share of actual waits within the estimate ± 2 errors, %.
    pub calibration: f64,
    /// The same, allowing the 2 ms resolution of the stored timestamps, %.
    pub calibration_resolved: f64,
    /// Of the waits outside estimate ± (2σ + 2 ms): the shares longer and shorter than
    /// it, % of all (they say whether the estimate is biased or too narrow).
    pub misses_late_early: (f64, f64),
    /// OpenAI cluster only: how well the execution times were predicted.
    pub accuracy: Option<Accuracy>,
}

/// How well the predictions a cluster's tasks were placed with matched their execution
/// times, next to the best any predictor could do from the same request.
#[derive(Debug, Clone, Copy)]
pub struct Accuracy {
    /// MAPE of the predictions used, %.
    pub mape: f64,
    /// MAPE of the best predictor from the request alone: the law at the prompt's tokens
    /// and the expected completion length given `max_tokens`, %.
    pub best_mape: f64,
    /// Share of execution times within the prediction ± 2 errors, %.
    pub within_2sigma: f64,
}

/// The cluster's capacity in tasks per second under the workload's mix.
pub fn capacity(args: &StrategyArgs) -> f64 {
    match args.protocol {
        TiKind::Callback => HARDWARE
            .iter()
            .map(|hw| {
                2.0 * 1000.0
                    / workload::mean_ms(&workload::sim_config(*hw, args.time_scale, 0.0, 0))
            })
            .sum(),
        TiKind::Openai => OPENAI_TIS
            .iter()
            .map(|&(hw, c)| {
                let config = openai_config(args, hw, c, 0);
                c as f64 * 1000.0 / workload::openai_mean_ms(&config)
            })
            .sum(),
    }
}

/// The simulated OpenAI-compatible server of `HARDWARE[hw]` with `c` slots.
fn openai_config(args: &StrategyArgs, hw: usize, c: usize, seed: u64) -> OpenAiSimConfig {
    workload::openai_config(
        HARDWARE[hw],
        c,
        args.time_scale,
        args.noise,
        args.min_completion_share,
        seed,
    )
}

/// Runs every combination and returns the results.
pub async fn run(args: &StrategyArgs) -> anyhow::Result<Vec<RunResult>> {
    let mut results = Vec::new();
    for &mode in &args.modes {
        for &load in &args.loads {
            for &strategy in &args.strategies {
                let r = run_once(args, strategy, mode, load).await?;
                eprintln!(
                    "{} / {} / {:.0}%: mean {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, calibration {:.1}% ({:.1}% ± 2 ms)",
                    strategy.as_str(),
                    mode.as_str(),
                    load * 100.0,
                    r.mean_ms,
                    r.p50_ms,
                    r.p99_ms,
                    r.calibration,
                    r.calibration_resolved
                );
                results.push(r);
            }
        }
    }
    Ok(results)
}

/// A scratch directory for one run's database.
fn scratch_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "ti-scheduler-bench-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

struct Cluster {
    base: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    sims: Vec<SimTi>,
    openai: Vec<OpenAiSim>,
    protocol: TiKind,
    db: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    async fn start(args: &StrategyArgs, seed: u64) -> anyhow::Result<Self> {
        let dir = scratch_dir("strategies")?;
        let mut settings = Settings::default();
        settings.server.bind = "127.0.0.1:0".parse()?;
        settings.database.path = dir.join("bench.db");
        settings.scheduling.rng_seed = seed;
        settings.ti.health_interval_ms = 1_000;
        let db = settings.database.path.clone();
        let app = App::build(settings).await?;
        let base = format!("http://{}", app.addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        let (mut sims, mut openai, mut registrations) = (Vec::new(), Vec::new(), Vec::new());
        match args.protocol {
            TiKind::Callback => {
                for (i, hw) in HARDWARE.iter().flat_map(|hw| [hw, hw]).enumerate() {
                    let config =
                        workload::sim_config(*hw, args.time_scale, args.noise, seed + i as u64);
                    let sim = SimTi::spawn(config, "127.0.0.1:0".parse()?).await?;
                    registrations.push(json!({"host": "127.0.0.1", "port": sim.addr().port()}));
                    sims.push(sim);
                }
            }
            TiKind::Openai => {
                for (i, &(hw, c)) in OPENAI_TIS.iter().enumerate() {
                    let config = openai_config(args, hw, c, seed + i as u64);
                    let sim = OpenAiSim::spawn(config, "127.0.0.1:0".parse()?).await?;
                    registrations.push(json!({"host": "127.0.0.1", "port": sim.addr().port(),
                        "kind": "openai", "max_concurrency": c, "hardware": HARDWARE[hw].name}));
                    openai.push(sim);
                }
            }
        }
        let http = reqwest::Client::builder().no_proxy().build()?;
        let cluster = Self {
            base,
            http,
            stop: Some(stop),
            server,
            sims,
            openai,
            protocol: args.protocol,
            db,
            dir,
        };
        for registration in registrations {
            cluster.post("/ti/register", registration).await?;
        }
        let table = cluster
            .http
            .post(format!("{}/predictor/lookup_table", cluster.base))
            .header("content-type", "text/csv")
            .body(workload::lookup_csv(args.time_scale))
            .send()
            .await?;
        anyhow::ensure!(
            table.status().is_success(),
            "lookup import: {}",
            table.text().await?
        );
        Ok(cluster)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "{path}: HTTP {status}: {body}");
        Ok(body)
    }

    /// Submits `n` tasks as a Poisson process of `rate` per second; returns their ids.
    async fn submit_poisson(
        &self,
        n: usize,
        rate: f64,
        rng: &mut rand::rngs::StdRng,
    ) -> anyhow::Result<Vec<String>> {
        let gaps = Exp::new(rate).context("arrival rate")?;
        let start = tokio::time::Instant::now();
        let mut at = 0.0;
        let mut pending = Vec::with_capacity(n);
        for _ in 0..n {
            at += gaps.sample(rng);
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            let body = match self.protocol {
                TiKind::Callback => json!({"model_name": MODEL, "task_input": {"prompt": "bench"},
                                           "metadata": workload::task_metadata(rng)}),
                TiKind::Openai => {
                    json!({"model_name": MODEL, "task_input": workload::openai_body(rng)})
                }
            };
            let (http, url) = (self.http.clone(), format!("{}/queue/submit", self.base));
            pending.push(tokio::spawn(async move {
                let resp: Value = http.post(url).json(&body).send().await?.json().await?;
                resp["task_id"]
                    .as_str()
                    .filter(|id| !id.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow::anyhow!("submit failed: {resp}"))
            }));
        }
        let mut ids = Vec::with_capacity(n);
        for p in pending {
            ids.push(p.await??);
        }
        Ok(ids)
    }

    fn unfinished(&self) -> anyhow::Result<i64> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM tasks WHERE status <> 'completed'",
            [],
            |r| r.get(0),
        )?)
    }

    async fn drain(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while self.unfinished()? > 0 {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "tasks did not finish in 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await??;
        for sim in self.sims.drain(..) {
            sim.stop().await;
        }
        for sim in self.openai.drain(..) {
            sim.stop().await;
        }
        std::fs::remove_dir_all(&self.dir).ok();
        Ok(())
    }
}

/// `submit_time` and `completion_time` are stored to the millisecond, so an actual wait
/// is known to ±2 ms; it also holds the ~1 ms the scheduler takes to commit and dispatch,
/// which the queue estimate (exactly 0 on an idle TI) leaves out.
const TIMESTAMP_RESOLUTION_MS: f64 = 2.0;

/// JCT (sorted) and calibration of the measured tasks, from the database: the share of
/// actual waits within the estimate ± 2σ, and within it ± the timestamp resolution.
/// What [`measure`] found.
struct Measured {
    /// JCTs, sorted, ms.
    jct: Vec<f64>,
    /// Waits within ±2σ, %.
    calibration: f64,
    /// Waits within ±(2σ + the timestamps' resolution), %.
    calibration_resolved: f64,
    /// Waits outside that, longer / shorter than the estimate, %.
    misses_late_early: (f64, f64),
}

fn measure(db: &PathBuf, ids: &[String]) -> anyhow::Result<Measured> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut query = conn.prepare(
        "SELECT (t.completion_time - t.submit_time) * 1000.0, t.execution_time_ms, d.chosen_ti, d.candidates
         FROM tasks t JOIN decisions d ON d.task_id = t.task_id AND d.reason = 'submit'
         WHERE t.task_id = ?",
    )?;
    let mut jct = Vec::with_capacity(ids.len());
    let (mut within, mut within_resolution) = (0usize, 0usize);
    let (mut late, mut early) = (0usize, 0usize);
    for id in ids {
        let (total, exec, chosen, candidates): (f64, f64, String, String) =
            query.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        jct.push(total);
        let candidates: Value = serde_json::from_str(&candidates)?;
        let estimate = candidates
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["ti_uuid"] == chosen.as_str()))
            .context("chosen candidate")?;
        let (wait, error) = (
            estimate["wait_ms"].as_f64().unwrap_or(0.0),
            estimate["wait_error_ms"].as_f64().unwrap_or(0.0),
        );
        let actual_wait = (total - exec).max(0.0);
        let miss = (actual_wait - wait).abs() - 2.0 * error;
        if miss <= 0.0 {
            within += 1;
        }
        if miss <= TIMESTAMP_RESOLUTION_MS {
            within_resolution += 1;
        } else if actual_wait > wait {
            late += 1;
        } else {
            early += 1;
        }
    }
    jct.sort_by(f64::total_cmp);
    let share = |n: usize| 100.0 * n as f64 / ids.len().max(1) as f64;
    Ok(Measured {
        jct,
        calibration: share(within),
        calibration_resolved: share(within_resolution),
        misses_late_early: (share(late), share(early)),
    })
}

async fn run_once(
    args: &StrategyArgs,
    strategy: StrategyKind,
    mode: PredictMode,
    load: f64,
) -> anyhow::Result<RunResult> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let cluster = Cluster::start(args, args.seed).await?;
    let capacity = capacity(args);

    cluster
        .post("/scheduler/set", json!({"name": "round_robin"}))
        .await?;
    cluster
        .submit_poisson(args.warmup, 0.5 * capacity, &mut rng)
        .await?;
    cluster.drain().await?;

    cluster
        .post("/scheduler/predict_mode", json!({"mode": mode.as_str()}))
        .await?;
    cluster
        .post("/scheduler/set", json!({"name": strategy.as_str()}))
        .await?;
    let seed_rng: u64 = rng.random();
    let mut arrivals = rand::rngs::StdRng::seed_from_u64(seed_rng);
    let ids = cluster
        .submit_poisson(args.tasks, load * capacity, &mut arrivals)
        .await?;
    cluster.drain().await?;

    let Measured {
        jct,
        calibration,
        calibration_resolved,
        misses_late_early,
    } = measure(&cluster.db, &ids)?;
    let accuracy = match args.protocol {
        TiKind::Openai => Some(accuracy(args, &cluster.db, &ids)?),
        TiKind::Callback => None,
    };
    cluster.stop().await?;
    Ok(RunResult {
        strategy,
        mode,
        load,
        mean_ms: jct.iter().sum::<f64>() / jct.len().max(1) as f64,
        p50_ms: workload::quantile(&jct, 0.5),
        p99_ms: workload::quantile(&jct, 0.99),
        calibration,
        calibration_resolved,
        misses_late_early,
        accuracy,
    })
}

/// [`Accuracy`] of the measured tasks on the OpenAI cluster, from the database.
fn accuracy(args: &StrategyArgs, db: &PathBuf, ids: &[String]) -> anyhow::Result<Accuracy> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut query = conn.prepare(
        "SELECT t.execution_time_ms, d.predicted_ms, d.predicted_error_ms, t.metadata, ti.hardware
         FROM tasks t JOIN decisions d ON d.task_id = t.task_id AND d.reason = 'submit'
              JOIN task_instances ti ON ti.ti_uuid = d.chosen_ti
         WHERE t.task_id = ?",
    )?;
    let share = args.min_completion_share.clamp(0.0, 1.0);
    let (mut ape, mut best_ape, mut within, mut n) = (0.0, 0.0, 0usize, 0usize);
    for id in ids {
        let (actual, predicted, error, metadata, hardware): (f64, f64, f64, String, String) = query
            .query_row([id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
        if actual <= 0.0 {
            continue;
        }
        let metadata: Value = serde_json::from_str(&metadata)?;
        let feature = |name: &str| metadata[name].as_f64().unwrap_or(0.0);
        let hw = HARDWARE
            .iter()
            .position(|h| h.name == hardware)
            .context("hardware of the chosen TI")?;
        let law = openai_config(args, hw, 1, 0);
        // A completion takes ceil(max_tokens · u) tokens, u uniform in [share, 1].
        let expected_tokens = feature("max_tokens") * (1.0 + share) / 2.0 + 0.5;
        let best = law.base_ms
            + law.per_input_token_ms * feature("input_tokens")
            + law.per_output_token_ms * expected_tokens;
        ape += (actual - predicted).abs() / actual;
        best_ape += (actual - best).abs() / actual;
        within += usize::from((actual - predicted).abs() <= 2.0 * error);
        n += 1;
    }
    let pct = |x: f64| 100.0 * x / n.max(1) as f64;
    Ok(Accuracy {
        mape: pct(ape),
        best_mape: pct(best_ape),
        within_2sigma: pct(within as f64),
    })
}

/// Prints the results as Markdown tables.
pub fn print(args: &StrategyArgs, results: &[RunResult]) {
    let cluster = match args.protocol {
        TiKind::Callback => {
            "2 fast (A100) + 2 slow (T4, ×2.5) callback TIs, one task at a time each".to_string()
        }
        TiKind::Openai => {
            let tis: Vec<String> = OPENAI_TIS
                .iter()
                .map(|&(hw, c)| format!("{} ×{c}", HARDWARE[hw].name))
                .collect();
            format!(
                "OpenAI-compatible TIs ({}; hardware and requests at once), completions of \
                 {:.0}–100% of max_tokens",
                tis.join(", "),
                100.0 * args.min_completion_share
            )
        }
    };
    println!(
        "Job completion time: {cluster}, \
         {} measured tasks per run after {} warm-up tasks, time scale {}, {:.0}% noise, \
         capacity {:.1} tasks/s, seed {}",
        args.tasks,
        args.warmup,
        args.time_scale,
        args.noise * 100.0,
        capacity(args),
        args.seed
    );
    println!();
    println!("| predict mode | load | strategy | mean JCT | p50 JCT | p99 JCT | wait within ±2σ | within ±(2σ + 2 ms) | outside: late / early |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {:.0}% | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1}% | {:.1}% | {:.1}% / {:.1}% |",
            r.mode.as_str(),
            r.load * 100.0,
            r.strategy.as_str(),
            r.mean_ms,
            r.p50_ms,
            r.p99_ms,
            r.calibration,
            r.calibration_resolved,
            r.misses_late_early.0,
            r.misses_late_early.1,
        );
    }
    if results.iter().any(|r| r.accuracy.is_some()) {
        println!();
        println!("| load | strategy | prediction MAPE | best possible from the request | execution within ±2σ |");
        println!("|---:|---|---:|---:|---:|");
        for r in results {
            if let Some(a) = r.accuracy {
                println!(
                    "| {:.0}% | {} | {:.1}% | {:.1}% | {:.1}% |",
                    r.load * 100.0,
                    r.strategy.as_str(),
                    a.mape,
                    a.best_mape,
                    a.within_2sigma
                );
            }
        }
    }
    println!();
    for mode in &args.modes {
        for load in &args.loads {
            let find = |s: StrategyKind| {
                results
                    .iter()
                    .find(|r| r.strategy == s && r.mode == *mode && r.load == *load)
            };
            if let (Some(sq), Some(rr)) = (
                find(StrategyKind::ShortestQueue),
                find(StrategyKind::RoundRobin),
            ) {
                println!(
                    "{} mode, {:.0}% load: shortest_queue's mean JCT is {:.1}× lower than round_robin's (p99 {:.1}× lower).",
                    mode.as_str(),
                    load * 100.0,
                    rr.mean_ms / sq.mean_ms,
                    rr.p99_ms / sq.p99_ms
                );
            }
        }
    }
}
