//! The `ti-scheduler` command: the service (default), migrations, lookup import, the task
//! history client and the simulated Task Instance.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use ti_scheduler::config::Settings;
use ti_scheduler::scheduling::{PredictMode, StrategyKind};
use ti_scheduler::ti::sim::{SimConfig, SimTi};
use ti_scheduler::{bench, predictor, store, App};

#[derive(Parser)]
#[command(
    name = "ti-scheduler",
    version,
    about = "Central scheduler for ML inference Task Instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Create or migrate a database file, then exit.
    Migrate {
        /// The database file.
        #[arg(long, default_value = "data/ti-scheduler.db")]
        db: PathBuf,
    },
    /// Import a lookup table (CSV or SwarmPilot JSON) into a database (replacing the table
    /// unless --append). A running server loads it at its next start; to change a running
    /// server's table, use POST /predictor/lookup_table.
    ImportLookup {
        /// The table file.
        file: PathBuf,
        /// The database file.
        #[arg(long, default_value = "data/ti-scheduler.db")]
        db: PathBuf,
        /// Add to the table instead of replacing it.
        #[arg(long)]
        append: bool,
    },
    /// Rebuild the learned models and running statistics from the task history in a
    /// database. Run it while the server is stopped.
    Retrain {
        /// The database file.
        #[arg(long, default_value = "data/ti-scheduler.db")]
        db: PathBuf,
    },
    /// List the task history of a running scheduler (GET /tasks), newest first: a table,
    /// or JSON with --json; --all follows every page.
    Tasks(ti_scheduler::cli::TasksArgs),
    /// Run a simulated Task Instance.
    SimTi(SimArgs),
    /// Benchmarks: measurements for the README, not tests.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
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
    /// A minimal server for the load benchmark's ceilings (started by `bench load`).
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

#[derive(Args, Default)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8102).
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Database file (default data/ti-scheduler.db).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Settings file.
    #[arg(long, default_value = "config/default.toml")]
    config: PathBuf,
}

#[derive(Args)]
struct SimArgs {
    /// The model it serves.
    #[arg(long)]
    model: String,
    /// The hardware it reports.
    #[arg(long)]
    hardware: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8100)]
    port: u16,
    /// Tasks executed at once.
    #[arg(long, default_value_t = 1)]
    parallelism: usize,
    /// Fixed execution time per task, ms.
    #[arg(long, default_value_t = 200.0)]
    base_ms: f64,
    /// ms per input token (metadata.input_tokens).
    #[arg(long, default_value_t = 0.0)]
    per_input_token_ms: f64,
    /// ms per output token (metadata.output_tokens or max_tokens).
    #[arg(long, default_value_t = 0.0)]
    per_output_token_ms: f64,
    /// σ of the lognormal noise on execution times.
    #[arg(long, default_value_t = 0.1)]
    noise: f64,
    /// Share of tasks that fail.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Seed of the noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Finished tasks remembered for GET /results and deduplication (the oldest go first)
    #[arg(long, default_value_t = 100_000)]
    keep_finished: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Benchmarks print tables; the service's own logs would drown them.
    let default_level = match cli.command {
        Some(Command::Bench(_) | Command::Tasks(_)) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .init();
    match cli.command.unwrap_or(Command::Serve(ServeArgs {
        config: PathBuf::from("config/default.toml"),
        ..ServeArgs::default()
    })) {
        Command::Serve(args) => serve(args).await,
        Command::Migrate { db } => {
            let applied = store::migrate(&db)?;
            println!("{}: {applied} migration(s) applied", db.display());
            Ok(())
        }
        Command::ImportLookup { file, db, append } => import_lookup(&file, &db, append).await,
        Command::Retrain { db } => retrain(&db).await,
        Command::Tasks(args) => {
            // A client command: the error is the message, without anyhow's backtrace.
            if let Err(e) = ti_scheduler::cli::run(&args, &mut std::io::stdout().lock()).await {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::SimTi(args) => sim_ti(args).await,
        Command::Bench(which) => bench(which).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(&args.config)
        .with_context(|| format!("reading settings from {}", args.config.display()))?;
    if let Some(bind) = args.bind {
        settings.server.bind = bind;
    }
    if let Some(db) = args.db {
        settings.database.path = db;
    }
    let app = App::build(settings).await?;
    app.run_until(shutdown_signal()).await
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = ?e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = ?e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}

async fn import_lookup(file: &Path, db_path: &Path, append: bool) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("json") => Some("application/json"),
        Some("csv") => Some("text/csv"),
        _ => None,
    };
    let rows = predictor::parse_table(content_type, &text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let count = rows.len();
    let stop = CancellationToken::new();
    let (db, writer) = store::open(db_path, store::Durability::Full, 1, 1, stop.clone()).await?;
    db.writer
        .run(move |conn| {
            if !append {
                store::LookupRepo::clear(conn)?;
            }
            store::LookupRepo::insert(conn, &rows)
        })
        .await?;
    let total = store::LookupRepo::all(&db.read).await?.len();
    stop.cancel();
    writer.await?;
    println!(
        "{}: imported {count} rows from {} ({total} rows in the table)",
        db_path.display(),
        file.display()
    );
    Ok(())
}

async fn retrain(db_path: &Path) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let (db, writer) = store::open(db_path, store::Durability::Full, 1, 1, stop.clone()).await?;
    let report = predictor::retrain(&db).await?;
    stop.cancel();
    writer.await?;
    println!(
        "{}: retrained {} models from {} successful executions",
        db_path.display(),
        report.models,
        report.executions
    );
    Ok(())
}

fn parse_durability(name: &str) -> anyhow::Result<store::Durability> {
    match name {
        "full" => Ok(store::Durability::Full),
        "normal" => Ok(store::Durability::Normal),
        other => anyhow::bail!("unknown durability '{other}'; valid: full, normal"),
    }
}

async fn bench(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Load {
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
            let args = bench::load::LoadArgs {
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
            bench::load::run(&args).await?;
        }
        BenchCommand::Scale {
            history,
            unfinished,
            queries,
        } => {
            bench::scale::run(&bench::scale::ScaleArgs {
                history,
                unfinished,
                queries,
            })
            .await?
        }
        BenchCommand::CeilingServer {
            mode,
            port,
            db,
            durability,
        } => match (mode.as_str(), db) {
            ("echo", _) => bench::ceiling::serve(port, None).await?,
            ("sqlite", Some(db)) => {
                bench::ceiling::serve(port, Some((&db, parse_durability(&durability)?))).await?
            }
            _ => anyhow::bail!("--mode echo, or --mode sqlite with --db PATH"),
        },
        BenchCommand::Prediction {
            checkpoints,
            noise,
            test_tasks,
            seed,
        } => {
            let args = bench::prediction::PredictionArgs {
                checkpoints,
                noise,
                test_tasks,
                seed,
            };
            let results = bench::prediction::run(&args);
            bench::prediction::print(&args, &results);
        }
        BenchCommand::Strategies {
            tasks,
            warmup,
            loads,
            strategies,
            modes,
            time_scale,
            noise,
            seed,
        } => {
            let args = bench::strategies::StrategyArgs {
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
            let results = bench::strategies::run(&args).await?;
            bench::strategies::print(&args, &results);
        }
    }
    Ok(())
}

async fn sim_ti(args: SimArgs) -> anyhow::Result<()> {
    let config = SimConfig {
        model: args.model,
        hardware: args.hardware,
        parallelism: args.parallelism,
        base_ms: args.base_ms,
        per_input_token_ms: args.per_input_token_ms,
        per_output_token_ms: args.per_output_token_ms,
        noise: args.noise,
        fail_rate: args.fail_rate,
        seed: args.seed,
        keep_finished: args.keep_finished,
        ..SimConfig::default()
    };
    let sim = SimTi::spawn(config, SocketAddr::new(args.host, args.port)).await?;
    println!("simulated TI listening on http://{}", sim.addr());
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = sim.wait() => {}
    }
    Ok(())
}
