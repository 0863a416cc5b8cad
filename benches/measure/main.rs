//! The project's measurements (they are not tests): `cargo bench --bench measure -- <what>`
//! with `load`, `scale`, `strategies`, `prediction` or `proxy` and their options (`--help` lists
//! them). Each prints Markdown tables for the README. Built as a bench target, so the
//! service binary carries none of it; cargo hands it the path of the service binary it
//! starts (`CARGO_BIN_EXE_ti-scheduler`).

mod ceiling;
mod history;
mod load;
mod prediction;
mod proxy;
mod scale;
mod strategies;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use ti_scheduler::domain::Durability;

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
    Prediction(prediction::PredictionArgs),
    /// Submit throughput and latency of the scheduler (a child process) under load, with
    /// end-to-end latency, CPU time and peak RSS; `--raw-ceiling` also measures the
    /// machine's ceilings in the same run.
    Load(load::LoadArgs),
    /// Restart-to-ready time, /task/query latency and RSS with a large history.
    Scale(scale::ScaleArgs),
    /// Job completion time per strategy and predict mode on a heterogeneous cluster, and
    /// the calibration of the queue estimates (real service and simulated TIs in-process).
    Strategies(strategies::StrategyArgs),
    /// What the OpenAI front door adds: the same clients against two simulated
    /// OpenAI-compatible servers directly and through the scheduler, plain and streamed.
    Proxy(proxy::ProxyArgs),
    /// A minimal server for the load benchmark's ceilings (started by `load`).
    #[command(hide = true)]
    CeilingServer {
        /// echo, sqlite or relay.
        #[arg(long)]
        mode: String,
        /// Base URLs the relay passes requests on to (relay mode).
        #[arg(long, value_delimiter = ',')]
        to: Vec<String>,
        /// Port.
        #[arg(long)]
        port: u16,
        /// Database file (sqlite mode; relay mode, to record each request).
        #[arg(long)]
        db: Option<PathBuf>,
        /// full or normal (sqlite mode; relay mode with --db).
        #[arg(long, default_value = "full", value_parser = parse_durability)]
        durability: Durability,
        /// What the relay records of each request with --db: one row, or the scheduler's
        /// task, decision and outcome.
        #[arg(long, value_enum, default_value = "row")]
        record: ceiling::Record,
    },
}

fn parse_durability(name: &str) -> Result<Durability, String> {
    match name {
        "full" => Ok(Durability::Full),
        "normal" => Ok(Durability::Normal),
        other => Err(format!("unknown durability '{other}'; valid: full, normal")),
    }
}

async fn run(which: Measure) -> anyhow::Result<()> {
    match which {
        Measure::Load(args) => load::run(&args).await,
        Measure::Scale(args) => scale::run(&args).await,
        Measure::Proxy(args) => proxy::run(&args).await,
        Measure::Prediction(args) => {
            let results = prediction::run(&args);
            prediction::print(&args, &results);
            Ok(())
        }
        Measure::Strategies(args) => {
            let results = strategies::run(&args).await?;
            strategies::print(&args, &results);
            Ok(())
        }
        Measure::CeilingServer {
            mode,
            port,
            db,
            durability,
            to,
            record,
        } => match (mode.as_str(), db) {
            ("echo", _) => ceiling::serve(port, None).await,
            ("sqlite", Some(db)) => ceiling::serve(port, Some((&db, durability))).await,
            ("relay", db) => {
                let db = db.as_deref().map(|db| (db, durability));
                ceiling::relay(port, to, db, record).await
            }
            _ => anyhow::bail!(
                "--mode echo, --mode sqlite with --db PATH, or --mode relay with --to URL,..."
            ),
        },
    }
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
            println!("measure: give what to measure (load, scale, strategies, prediction, proxy); --help lists the options");
            Ok(())
        }
    }
}
