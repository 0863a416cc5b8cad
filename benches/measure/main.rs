//! The project's measurements (they are not tests): `cargo bench --bench measure -- <what>`
//! with `load`, `scale`, `strategies` or `prediction` and their options (`--help` lists
//! them). Each prints Markdown tables for the README. Built as a bench target, so the
//! service binary carries none of it; cargo hands it the path of the service binary it
//! starts (`CARGO_BIN_EXE_ti-scheduler`).

mod ceiling;
mod load;
mod prediction;
mod scale;
mod strategies;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ti_scheduler::domain::{Durability, PredictMode, StrategyKind};

/// The service binary, built by cargo in the same profile as this program.
const SERVICE_BIN: &str = env!("CARGO_BIN_EXE_ti-scheduler");

#[derive(Parser)]
#[command(
    name = "measure",
    about = "ti-scheduler's benchmarks: measurements for the README"
)]
struct Cli {
    #[command(subcommand)]
    what: Option<Measure>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Measure {
    /// Accuracy of the default predictor against the running mean (offline, no HTTP).
    Prediction {
        /// Completions after which accuracy is measured.
        #[arg(long, value_delimiter = ',', default_value = "20,50,200,1000")]
        checkpoints: Vec<usize>,
        /// σ of the lognormal noise on execution times.
        #[arg(long, default_value_t = 0.1)]
        noise: f64,
        /// Held-out tasks.
        #[arg(long, default_value_t = 500)]
        test_tasks: usize,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Submit throughput and latency of the scheduler (a child process) under load, with
    /// end-to-end latency, CPU time and peak RSS; `--raw-ceiling` also measures the
    /// machine's ceilings in the same run.
    Load {
        /// Concurrent closed-loop clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Open loop at this many submits per second instead.
        #[arg(long)]
        rate: Option<f64>,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Simulated TIs (they finish at once).
        #[arg(long, default_value_t = 4)]
        tis: usize,
        /// Tasks per request: above 1, clients use POST /queue/submit_batch and rates count
        /// tasks (not with --raw-ceiling, whose servers take single submits).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// full or normal.
        #[arg(long, default_value = "full")]
        durability: String,
        /// Also measure the axum echo and SQLite group-commit ceilings.
        #[arg(long)]
        raw_ceiling: bool,
        /// Drive a running scheduler at this URL instead of starting one.
        #[arg(long)]
        url: Option<String>,
    },
    /// Restart-to-ready time, /task/query latency and RSS with a large history.
    Scale {
        /// Completed tasks in the history.
        #[arg(long, default_value_t = 1_000_000)]
        history: u64,
        /// Unfinished tasks.
        #[arg(long, default_value_t = 10_000)]
        unfinished: u64,
        /// /task/query requests to time.
        #[arg(long, default_value_t = 2_000)]
        queries: u64,
    },
    /// A minimal server for the load benchmark's ceilings (started by `load`).
    #[command(hide = true)]
    CeilingServer {
        /// echo or sqlite.
        #[arg(long)]
        mode: String,
        /// Port.
        #[arg(long)]
        port: u16,
        /// Database file (sqlite mode).
        #[arg(long)]
        db: Option<PathBuf>,
        /// full or normal (sqlite mode).
        #[arg(long, default_value = "full")]
        durability: String,
    },
    /// Job completion time per strategy and predict mode on a heterogeneous cluster, and
    /// the calibration of the queue estimates (real service and simulated TIs in-process).
    Strategies {
        /// Measured tasks per run.
        #[arg(long, default_value_t = 600)]
        tasks: usize,
        /// Warm-up tasks per run.
        #[arg(long, default_value_t = 150)]
        warmup: usize,
        /// Arrival rates as shares of capacity.
        #[arg(long, value_delimiter = ',', default_value = "0.7,0.9")]
        loads: Vec<f64>,
        /// Strategies to compare.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "shortest_queue,round_robin,weighted,probabilistic"
        )]
        strategies: Vec<String>,
        /// Predict modes to compare.
        #[arg(long, value_delimiter = ',', default_value = "default,lookup_table")]
        modes: Vec<String>,
        /// Multiplies every execution time.
        #[arg(long, default_value_t = 0.25)]
        time_scale: f64,
        /// σ of the lognormal noise on execution times.
        #[arg(long, default_value_t = 0.1)]
        noise: f64,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

fn parse_durability(name: &str) -> anyhow::Result<Durability> {
    match name {
        "full" => Ok(Durability::Full),
        "normal" => Ok(Durability::Normal),
        other => anyhow::bail!("unknown durability '{other}'; valid: full, normal"),
    }
}

async fn run(which: Measure) -> anyhow::Result<()> {
    match which {
        Measure::Load {
            clients,
            rate,
            duration,
            warmup,
            tis,
            batch,
            durability,
            raw_ceiling,
            url,
        } => {
            let args = load::LoadArgs {
                clients,
                rate,
                duration,
                warmup,
                tis,
                batch,
                durability: parse_durability(&durability)?,
                raw_ceiling,
                url,
            };
            load::run(&args).await?;
        }
        Measure::Scale {
            history,
            unfinished,
            queries,
        } => {
            scale::run(&scale::ScaleArgs {
                history,
                unfinished,
                queries,
            })
            .await?
        }
        Measure::CeilingServer {
            mode,
            port,
            db,
            durability,
        } => match (mode.as_str(), db) {
            ("echo", _) => ceiling::serve(port, None).await?,
            ("sqlite", Some(db)) => {
                ceiling::serve(port, Some((&db, parse_durability(&durability)?))).await?
            }
            _ => anyhow::bail!("--mode echo, or --mode sqlite with --db PATH"),
        },
        Measure::Prediction {
            checkpoints,
            noise,
            test_tasks,
            seed,
        } => {
            let args = prediction::PredictionArgs {
                checkpoints,
                noise,
                test_tasks,
                seed,
            };
            let results = prediction::run(&args);
            prediction::print(&args, &results);
        }
        Measure::Strategies {
            tasks,
            warmup,
            loads,
            strategies,
            modes,
            time_scale,
            noise,
            seed,
        } => {
            let args = strategies::StrategyArgs {
                tasks,
                warmup,
                loads,
                strategies: strategies
                    .iter()
                    .map(|s| StrategyKind::parse(s))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?,
                modes: modes
                    .iter()
                    .map(|m| PredictMode::parse(m))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?,
                time_scale,
                noise,
                seed,
            };
            let results = strategies::run(&args).await?;
            strategies::print(&args, &results);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Tables go to stdout; the service's own logs would drown them.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.what {
        Some(what) => run(what).await,
        // A plain `cargo bench` runs every bench target: this one has nothing to do then.
        None => {
            println!("measure: give what to measure (load, scale, strategies, prediction); --help lists the options");
            Ok(())
        }
    }
}
