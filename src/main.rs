//! The `ti-scheduler` command: the service (default), migrations, lookup import, online
//! backup, the client commands (task history, submit, wait, watch, probe) and the
//! simulated Task Instance.

#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ti_scheduler::config::{DatabaseLocation, Loaded, Settings};
use ti_scheduler::domain::{Durability, TiKind};
use ti_scheduler::telemetry::{self, LogFormat};
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};
use ti_scheduler::ti::sim::{SimConfig, SimTi};
use ti_scheduler::{ha, predictor, store, App};

/// mimalloc, not glibc's malloc: each request allocates a few hundred small objects
/// across the runtime's threads (headers, JSON values, futures), and glibc's arenas spent
/// about a sixth of the service's CPU on them under load (README.md, "What it costs").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ti-scheduler",
    version,
    about = "Central scheduler for ML inference Task Instances"
)]
struct Cli {
    /// On an error, print its whole cause chain (and the backtrace if RUST_BACKTRACE=1),
    /// not only one line.
    /// Also raises the service's own logs to debug (the access log included) unless
    /// RUST_LOG is set.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// How logs are written on stderr: text, or json (one JSON object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Create or migrate a database file, then exit.
    Migrate(DbArgs),
    /// Import a lookup table (CSV or SwarmPilot JSON) into a database (replacing the table
    /// unless --append). Run it while the server is stopped (it refuses to touch a file a
    /// server holds); to change a running server's table, use POST /predictor/lookup_table.
    ImportLookup {
        /// The table file.
        file: PathBuf,
        #[command(flatten)]
        db: DbArgs,
        /// Add to the table instead of replacing it.
        #[arg(long)]
        append: bool,
    },
    /// Rebuild the learned models and running statistics from the task history in an
    /// existing database. Run it while the server is stopped.
    Retrain(DbArgs),
    /// Copy the database to a new file, also while the service runs (a consistent
    /// snapshot made by SQLite's VACUUM INTO on a read-only connection; then checked).
    Backup {
        /// The copy to write; it must not exist.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List the task history of a running scheduler (GET /tasks), newest first: a table,
    /// or JSON with --json; --all follows every page.
    Tasks(ti_scheduler::cli::TasksArgs),
    /// Submit a task to a running scheduler; prints its id (with --wait, its result).
    Submit(ti_scheduler::cli::SubmitArgs),
    /// Wait for a task to complete (a long-poll, no polling loop); prints its final state.
    Wait(ti_scheduler::cli::WaitArgs),
    /// Follow a running scheduler's events (/events), one line per event.
    Watch(ti_scheduler::cli::WatchArgs),
    /// Check that a running scheduler is ready (GET /ready): exit status 0 if it answers
    /// 2xx, else 1 with the reason (a health check for containers).
    Probe(ti_scheduler::cli::ProbeArgs),
    /// Run a simulated Task Instance.
    SimTi(SimArgs),
}

/// Which database a maintenance command works on: the one `serve` would use with the
/// same settings, unless `--db` names another.
#[derive(Args, Default)]
struct DbArgs {
    /// Database file (beats TI_SCHEDULER__DATABASE__PATH and the settings file; default
    /// data/ti-scheduler.db).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Settings file (must exist; default config/default.toml if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl DbArgs {
    /// The settings (file, environment, then `--db`), logged with their source.
    fn settings(&self, command: &str) -> anyhow::Result<Settings> {
        let Loaded {
            mut settings,
            source,
        } = Settings::load_for_command(self.config.as_deref())?;
        if let Some(db) = &self.db {
            settings.database.url.clear();
            settings.database.path = db.clone();
        }
        let location = settings.database.location().map_err(anyhow::Error::msg)?;
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            config = %source,
            db = %location.display(),
            "ti-scheduler {command}"
        );
        Ok(settings)
    }

    /// The database a maintenance command works on.
    fn location(&self, command: &str) -> anyhow::Result<DatabaseLocation> {
        let settings = self.settings(command)?;
        settings.database.location().map_err(anyhow::Error::msg)
    }

    /// The SQLite file a maintenance command works on; on PostgreSQL, an error saying
    /// what to use instead.
    fn sqlite_file(&self, command: &str, instead: &str) -> anyhow::Result<PathBuf> {
        match self.location(command)? {
            DatabaseLocation::Sqlite(path) => Ok(path),
            DatabaseLocation::Postgres(_) => {
                anyhow::bail!("{command} works on an SQLite file; on PostgreSQL {instead}")
            }
        }
    }
}

#[derive(Args, Default)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8102).
    #[arg(long)]
    bind: Option<SocketAddr>,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Args)]
struct SimArgs {
    /// callback (our protocol) or openai (an OpenAI-compatible server); both are in
    /// docs/API.md.
    #[arg(long, default_value = "callback", value_parser = TiKind::parse)]
    protocol: TiKind,
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
    /// Tasks executed at once (openai: requests; default 1, or 8 with --protocol openai).
    #[arg(long)]
    parallelism: Option<usize>,
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
    /// openai: smallest share of max_tokens a completion takes (uniform up to 1).
    #[arg(long, default_value_t = 0.25)]
    min_completion_share: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // A client command prints what it fetched; the logs would drown it.
    let default_level = match cli.command {
        Some(
            Command::Tasks(_)
            | Command::Submit(_)
            | Command::Wait(_)
            | Command::Watch(_)
            | Command::Probe(_),
        ) => "warn",
        _ => "info",
    };
    let default_filter = if cli.verbose {
        format!("{default_level},ti_scheduler=debug")
    } else {
        default_level.to_string()
    };
    telemetry::init_logging(cli.log_format, &default_filter);
    let verbose = cli.verbose || tracing::enabled!(tracing::Level::DEBUG);
    match run(cli.command.unwrap_or(Command::Serve(ServeArgs::default()))).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line for an operator; the chain (and a backtrace, if RUST_BACKTRACE
            // asked for one) only on demand.
            let message = if verbose {
                format!("{e:?}")
            } else {
                one_line(&e)
            };
            match cli.log_format {
                LogFormat::Text => eprintln!("error: {message}"),
                LogFormat::Json => eprintln!(
                    "{}",
                    serde_json::json!({"level": "ERROR", "target": "ti_scheduler", "message": message})
                ),
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, joined by ": ".
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(args) => {
            let location = args.location("migrate")?;
            let db = match location {
                DatabaseLocation::Sqlite(path) => path,
                DatabaseLocation::Postgres(ref url) => {
                    let applied = store::migrate_postgres(url).await?;
                    println!("{}: {applied} migration(s) applied", location.display());
                    return Ok(());
                }
            };
            let _lock = store::DbLock::acquire(&db)?;
            let applied = store::migrate(&db)?;
            println!("{}: {applied} migration(s) applied", db.display());
            Ok(())
        }
        Command::ImportLookup { file, db, append } => {
            let path = db.sqlite_file(
                "import-lookup",
                "import through the running service: POST /predictor/lookup_table",
            )?;
            import_lookup(&file, &path, append).await
        }
        Command::Retrain(args) => {
            retrain(&args.sqlite_file(
                "retrain",
                "the running service learns from every completion; retrain is not available",
            )?)
            .await
        }
        Command::Backup { to, db } => {
            let path = db.sqlite_file("backup", "use pg_dump, or the server's own backups")?;
            backup(&path, to).await
        }
        Command::Tasks(args) => ti_scheduler::cli::run(&args, &mut std::io::stdout()).await,
        Command::Submit(args) => ti_scheduler::cli::run_submit(&args, &mut std::io::stdout()).await,
        Command::Wait(args) => ti_scheduler::cli::run_wait(&args, &mut std::io::stdout()).await,
        Command::Watch(args) => ti_scheduler::cli::run_watch(&args, &mut std::io::stdout()).await,
        Command::Probe(args) => ti_scheduler::cli::run_probe(&args, &mut std::io::stdout()).await,
        Command::SimTi(args) => sim_ti(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = args.db.settings("serve")?;
    if let Some(bind) = args.bind {
        settings.server.bind = bind;
    }
    let location = settings.database.location().map_err(anyhow::Error::msg)?;
    let url = match location {
        DatabaseLocation::Postgres(url) if settings.ha.enabled => url,
        DatabaseLocation::Sqlite(_) if settings.ha.enabled => anyhow::bail!(
            "ha.enabled needs PostgreSQL (database.url = \"postgres://...\"); an SQLite file serves one node"
        ),
        _ => {
            let app = App::build(settings).await?;
            return app.run_until(shutdown_signal()).await;
        }
    };
    // High availability: a standby until this node takes the leader lease.
    let listener = tokio::net::TcpListener::bind(settings.server.bind)
        .await
        .with_context(|| format!("binding {}", settings.server.bind))?;
    let public_url = settings.public_url(listener.local_addr()?);
    let lease = ha::Lease::connect(&settings, &url, &public_url).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let (listener, leadership) = ha::standby(
        &lease,
        listener,
        App::limits(&settings),
        stop.clone().cancelled_owned(),
    )
    .await?;
    let Some(leadership) = leadership else {
        tracing::info!("ti-scheduler stopped (standby)");
        return Ok(());
    };
    let app = App::build_on(listener, settings, Some(leadership)).await?;
    app.run_until(stop.cancelled_owned()).await
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
    let _lock = store::DbLock::acquire(db_path)?;
    let stop = CancellationToken::new();
    let (db, writer) = store::open(db_path, Durability::Full, 1, 1, stop.clone()).await?;
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
    // Retraining an empty new file would only hide a wrong path.
    if !db_path.is_file() {
        anyhow::bail!(
            "database {} does not exist; give the one the service uses (--db, --config or TI_SCHEDULER__DATABASE__PATH)",
            db_path.display()
        );
    }
    let _lock = store::DbLock::acquire(db_path)?;
    let stop = CancellationToken::new();
    let (db, writer) = store::open(db_path, Durability::Full, 1, 1, stop.clone()).await?;
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

/// Copies the database (no lock taken: the service may be running) and prints one line.
async fn backup(db_path: &Path, to: PathBuf) -> anyhow::Result<()> {
    let from = db_path.to_path_buf();
    let (report, to) =
        tokio::task::spawn_blocking(move || store::backup(&from, &to).map(|report| (report, to)))
            .await??;
    println!(
        "{}: backup of {}, {:.1} MiB ({} bytes), {} tasks, schema V{}",
        to.display(),
        db_path.display(),
        report.bytes as f64 / (1024.0 * 1024.0),
        report.bytes,
        report.tasks,
        report.schema
    );
    Ok(())
}

async fn sim_ti(args: SimArgs) -> anyhow::Result<()> {
    let bind = SocketAddr::new(args.host, args.port);
    if args.protocol == TiKind::Openai {
        let config = OpenAiSimConfig {
            model: args.model,
            concurrency: args
                .parallelism
                .unwrap_or(TiKind::Openai.default_concurrency() as usize),
            base_ms: args.base_ms,
            per_input_token_ms: args.per_input_token_ms,
            per_output_token_ms: args.per_output_token_ms,
            min_completion_share: args.min_completion_share,
            noise: args.noise,
            seed: args.seed,
            ..OpenAiSimConfig::default()
        };
        let sim = OpenAiSim::spawn(config, bind).await?;
        println!(
            "simulated OpenAI-compatible server listening on http://{}",
            sim.addr()
        );
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = sim.wait() => {}
        }
        return Ok(());
    }
    let config = SimConfig {
        model: args.model,
        hardware: args.hardware,
        parallelism: args.parallelism.unwrap_or(1),
        base_ms: args.base_ms,
        per_input_token_ms: args.per_input_token_ms,
        per_output_token_ms: args.per_output_token_ms,
        noise: args.noise,
        fail_rate: args.fail_rate,
        seed: args.seed,
        keep_finished: args.keep_finished,
        ..SimConfig::default()
    };
    let sim = SimTi::spawn(config, bind).await?;
    println!("simulated TI listening on http://{}", sim.addr());
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = sim.wait() => {}
    }
    Ok(())
}
