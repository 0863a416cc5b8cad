//! `cargo bench --bench measure -- load`: the scheduler's own throughput and latency, next to the
//! ceilings of the machine it runs on.
//!
//! The scheduler runs as a child process (`ti-scheduler serve`, the release binary) on a fresh
//! database, so its CPU time and peak RSS can be read from /proc; simulated TIs that finish
//! at once run in this process. Clients drive `POST /queue/submit` closed-loop (each sends
//! its next submit when the previous one is answered) or open-loop at a fixed rate.
//! Submit latency goes to an HDR histogram; end-to-end latency (submit → result stored)
//! and completions per second are read from the database afterwards.
//!
//! With `--raw-ceiling` the same clients, in the same run, also drive two minimal servers
//! (`measure ceiling-server`, this program itself as child processes): a bare axum JSON echo, and axum plus one
//! SQLite WAL insert per request committed in one transaction per batch (group commit, at
//! synchronous NORMAL and FULL). Every figure is then given as a share of its ceiling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sqlx::Connection as _;

use super::ceiling::Record;
use super::workload::MODEL;
use super::SERVICE_BIN;
use ti_scheduler::domain::{Durability, TiKind};
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};
use ti_scheduler::ti::sim::{SimConfig, SimTi};

/// Options of the load benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent closed-loop clients (ignored with --rate).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Open loop at this many submits per second instead of closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Simulated TIs (they finish every task at once).
    #[arg(long, default_value_t = 4)]
    pub tis: usize,
    /// Kind of the simulated TIs: callback (our protocol) or openai (OpenAI-compatible
    /// servers, 64 requests at once each).
    #[arg(long, default_value = "callback", value_parser = TiKind::parse)]
    pub protocol: TiKind,
    /// Tasks per request: above 1, clients use POST /queue/submit_batch and rates count
    /// tasks (not with --raw-ceiling, whose servers take single submits).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Synchronous level of the scheduler's database: full or normal.
    #[arg(long, default_value = "full", value_parser = super::parse_durability)]
    pub durability: Durability,
    /// Also measure the axum echo and SQLite group-commit ceilings.
    #[arg(long)]
    pub raw_ceiling: bool,
    /// Keep the scheduler's state in PostgreSQL: the URL of a server's admin database
    /// (`scripts/pg-cluster.sh start DIR` prints one); each run creates a database of its
    /// own there. Without it, an SQLite file in a scratch directory.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Drive a running scheduler at this URL instead of starting one (its TIs must be
    /// registered for `llama-7b`; CPU, RSS and end-to-end figures are then not available).
    #[arg(long)]
    pub url: Option<String>,
}

/// What the clients measured against one server.
#[derive(Debug, Clone)]
pub struct Drive {
    /// Answered submits per second.
    pub rate: f64,
    /// Submits answered with success.
    pub ok: u64,
    /// Submits answered otherwise or not at all.
    pub errors: u64,
    /// Latency of answered submits, µs.
    pub latency: Histogram<u64>,
}

/// Scheduler-side figures.
#[derive(Debug, Clone, Default)]
pub struct ServerFigures {
    /// CPU seconds (user + system) the scheduler used during the measured window.
    pub cpu_seconds: f64,
    /// Peak resident set, MiB.
    pub peak_rss_mib: f64,
    /// Tasks whose result was stored in the window, per second.
    pub completed_per_s: f64,
    /// End-to-end latency of the tasks submitted in the window, ms.
    pub e2e_ms: Option<Histogram<u64>>,
    /// End to end less the execution time, µs.
    pub overhead_us: Option<Histogram<u64>>,
    /// CPU seconds this process (clients and simulated TIs) used in the window.
    pub load_cpu_seconds: f64,
    /// The group-commit writer over the window, from the scheduler's `/metrics`.
    pub writer: Option<WriterFigures>,
}

/// The group-commit writer's totals (Prometheus `_sum` and `_count` of its histograms).
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterFigures {
    /// Transactions committed.
    pub commits: f64,
    /// Writes they carried.
    pub writes: f64,
    /// Seconds from BEGIN to the end of COMMIT, summed.
    pub busy_seconds: f64,
}

impl WriterFigures {
    /// Reads the totals from the scheduler's `/metrics`.
    async fn scrape(http: &reqwest::Client, url: &str) -> Option<Self> {
        let text = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        Some(Self {
            commits: value("ti_scheduler_db_batch_size_count")?,
            writes: value("ti_scheduler_db_batch_size_sum")?,
            busy_seconds: value("ti_scheduler_db_commit_seconds_sum")?,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            commits: self.commits - before.commits,
            writes: self.writes - before.writes,
            busy_seconds: self.busy_seconds - before.busy_seconds,
        }
    }
}

/// A child process serving HTTP on a port.
pub(super) struct ChildServer {
    child: Child,
    port: u16,
}

impl ChildServer {
    fn spawn(
        program: &Path,
        args: &[&str],
        envs: &[(&str, String)],
        port: u16,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self { child, port })
    }

    pub(super) fn port(&self) -> u16 {
        self.port
    }

    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&self, path: &str) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{}{path}", self.url())).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("server on port {} did not get ready", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn stop(mut self) {
        // SIGTERM would be gentler; the figures are taken before this.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends with ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some((utime + stime) / 100.0)
}

/// Peak resident set of a process, MiB, from /proc.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn submit_body(n: u64) -> Value {
    json!({
        "model_name": MODEL,
        "task_input": {"prompt": "Summarise the following text in one sentence.", "max_tokens": 16},
        "metadata": {"input_tokens": 100 + n % 900, "output_tokens": 16 + n % 200},
    })
}

/// `batch` tasks for `POST /queue/submit_batch`, numbered from `n`.
fn batch_body(n: u64, batch: usize) -> Value {
    let tasks: Vec<Value> = (n..n + batch as u64)
        .map(|k| {
            json!({
                "task_input": {"prompt": "Summarise the following text in one sentence.", "max_tokens": 16},
                "metadata": {"input_tokens": 100 + k % 900, "output_tokens": 16 + k % 200},
            })
        })
        .collect();
    json!({"model_name": MODEL, "tasks": tasks})
}

/// What every client shares: the HTTP client, the counters and the measuring switch.
struct Submitter {
    http: reqwest::Client,
    url: reqwest::Url,
    /// Tasks per request (1: `/queue/submit`).
    batch: usize,
    measuring: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
    sent: AtomicU64,
}

impl Submitter {
    /// One submit request; returns whether it counts (answered with success while
    /// measuring) and its latency, µs. `ok` and `errors` count tasks.
    async fn submit_one(&self) -> (bool, u64) {
        let n = self.sent.fetch_add(self.batch as u64, Ordering::Relaxed);
        let body = match self.batch {
            1 => submit_body(n),
            batch => batch_body(n, batch),
        };
        let started = Instant::now();
        let answered = self.http.post(self.url.clone()).json(&body).send().await;
        let success = match answered {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            _ => false,
        };
        let micros = started.elapsed().as_micros() as u64;
        let measuring = self.measuring.load(Ordering::Relaxed);
        if measuring {
            let counter = if success { &self.ok } else { &self.errors };
            counter.fetch_add(self.batch as u64, Ordering::Relaxed);
        }
        (success && measuring, micros)
    }
}

/// Drives `url` + `/queue/submit` for `warmup` then `duration` seconds; measures the latter.
pub async fn drive(url: &str, args: &LoadArgs) -> anyhow::Result<Drive> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.clients.max(64))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let shared = Arc::new(Submitter {
        http,
        url: reqwest::Url::parse(&match args.batch {
            1 => format!("{url}/queue/submit"),
            _ => format!("{url}/queue/submit_batch"),
        })?,
        batch: args.batch,
        measuring: AtomicBool::new(false),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        sent: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let one = {
        let shared = shared.clone();
        move || {
            let shared = shared.clone();
            async move { shared.submit_one().await }
        }
    };

    let mut workers = Vec::new();
    match args.rate {
        None => {
            for _ in 0..args.clients.max(1) {
                let (one, stop) = (one.clone(), stop.clone());
                workers.push(tokio::spawn(async move {
                    let mut h =
                        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                    while !stop.load(Ordering::Relaxed) {
                        let (measured, micros) = one().await;
                        if measured {
                            let _ = h.record(micros.max(1));
                        }
                    }
                    h
                }));
            }
        }
        Some(rate) => {
            let (one, stop) = (one.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
                let start = tokio::time::Instant::now();
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate))
                        .await;
                    let (one, tx) = (one.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (measured, micros) = one().await;
                        if measured {
                            let _ = tx.send(micros.max(1));
                        }
                    });
                }
                drop(tx);
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                while let Some(micros) = rx.recv().await {
                    let _ = h.record(micros);
                }
                h
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for w in workers {
        latency.add(w.await?)?;
    }
    let ok = shared.ok.load(Ordering::Relaxed);
    Ok(Drive {
        rate: ok as f64 / elapsed,
        ok,
        errors: shared.errors.load(Ordering::Relaxed),
        latency,
    })
}

/// The database of a scheduler under load, as the bench reads it afterwards.
pub(super) enum BenchDb {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (its URL), created for this run.
    Postgres(String),
}

impl BenchDb {
    /// A new database: a file in `dir`, or a fresh database on the server at `postgres`.
    pub(super) async fn create(dir: &Path, postgres: Option<&str>) -> anyhow::Result<Self> {
        let Some(admin) = postgres else {
            return Ok(Self::Sqlite(dir.join("load.db")));
        };
        Ok(Self::Postgres(
            ti_scheduler::store::create_postgres_database(admin, "bench").await?,
        ))
    }

    /// The settings that make the service use it.
    pub(super) fn env(&self) -> (&'static str, String) {
        match self {
            Self::Sqlite(path) => ("TI_SCHEDULER__DATABASE__PATH", path.display().to_string()),
            Self::Postgres(url) => ("TI_SCHEDULER__DATABASE__URL", url.clone()),
        }
    }

    /// The values of a one-column query, as f64, with `binds` as its `?1`, `?2`, ...
    async fn column(&self, sql: &str, binds: &[f64]) -> anyhow::Result<Vec<f64>> {
        Ok(match self {
            Self::Sqlite(path) => {
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                let mut rows = conn.prepare(sql)?;
                let values = rows
                    .query_map(rusqlite::params_from_iter(binds), |r| r.get::<_, f64>(0))?
                    .collect::<Result<_, _>>()?;
                values
            }
            Self::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let sql = sql.replace('?', "$");
                let mut query = sqlx::query_scalar::<_, f64>(sqlx::AssertSqlSafe(sql));
                for value in binds {
                    query = query.bind(*value);
                }
                let values = query.fetch_all(&mut conn).await?;
                conn.close().await?;
                values
            }
        })
    }
}

/// End-to-end figures of the tasks submitted within `[from, to]` (Unix seconds): the
/// completion rate, the submit → result stored latency, and the scheduler's overhead (that
/// latency less the execution time, which for an OpenAI-compatible TI the scheduler
/// measures from sending the request to the end of the answer), µs. Timestamps have
/// millisecond precision, so each figure is ± 1 ms.
async fn end_to_end(
    db: &BenchDb,
    from: f64,
    to: f64,
) -> anyhow::Result<(f64, Histogram<u64>, Histogram<u64>)> {
    let completed = db
        .column(
            "SELECT CAST(COUNT(*) AS DOUBLE PRECISION) FROM tasks
             WHERE completion_time BETWEEN ?1 AND ?2",
            &[from, to],
        )
        .await?
        .first()
        .copied()
        .unwrap_or(0.0);
    let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    for ms in db
        .column(
            "SELECT (completion_time - submit_time) * 1000.0 FROM tasks
             WHERE submit_time BETWEEN ?1 AND ?2 AND completion_time IS NOT NULL",
            &[from, to],
        )
        .await?
    {
        let _ = h.record(ms.round().max(1.0) as u64);
    }
    let mut overhead = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for ms in db
        .column(
            "SELECT (completion_time - submit_time) * 1000.0 - execution_time_ms FROM tasks
             WHERE submit_time BETWEEN ?1 AND ?2 AND completion_time IS NOT NULL",
            &[from, to],
        )
        .await?
    {
        let _ = overhead.record((ms * 1000.0).round().max(1.0) as u64);
    }
    Ok((completed / (to - from), h, overhead))
}

async fn wait_drained(db: &BenchDb) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = db
            .column(
                "SELECT CAST(COUNT(*) AS DOUBLE PRECISION) FROM tasks
                 WHERE status <> 'completed'",
                &[],
            )
            .await?
            .first()
            .copied()
            .unwrap_or(0.0);
        if left == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{left} tasks still unfinished after 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Simulated TIs of either kind that finish every task at once.
enum InstantTis {
    Callback(Vec<SimTi>),
    Openai(Vec<OpenAiSim>),
}

/// Requests in flight to each simulated OpenAI-compatible TI.
const OPENAI_CONCURRENCY: usize = 64;

impl InstantTis {
    async fn spawn(kind: TiKind, n: usize) -> anyhow::Result<Self> {
        if kind == TiKind::Callback {
            return Ok(Self::Callback(instant_tis(n).await?));
        }
        let mut sims = Vec::new();
        for i in 0..n {
            let config = OpenAiSimConfig {
                model: MODEL.into(),
                concurrency: OPENAI_CONCURRENCY,
                base_ms: 0.0,
                seed: i as u64,
                ..OpenAiSimConfig::default()
            };
            sims.push(OpenAiSim::spawn(config, "127.0.0.1:0".parse()?).await?);
        }
        Ok(Self::Openai(sims))
    }

    /// The `/ti/register` bodies.
    fn registrations(&self) -> Vec<Value> {
        match self {
            Self::Callback(tis) => tis
                .iter()
                .map(|t| json!({"host": "127.0.0.1", "port": t.addr().port()}))
                .collect(),
            Self::Openai(sims) => sims
                .iter()
                .map(|s| {
                    json!({"host": "127.0.0.1", "port": s.addr().port(), "kind": "openai",
                           "max_concurrency": OPENAI_CONCURRENCY})
                })
                .collect(),
        }
    }

    async fn stop(self) {
        match self {
            Self::Callback(tis) => {
                for ti in tis {
                    ti.stop().await;
                }
            }
            Self::Openai(sims) => {
                for sim in sims {
                    sim.stop().await;
                }
            }
        }
    }
}

/// Simulated callback TIs that finish every task at once.
async fn instant_tis(n: usize) -> anyhow::Result<Vec<SimTi>> {
    let mut tis = Vec::new();
    for i in 0..n {
        let config = SimConfig {
            model: MODEL.into(),
            hardware: Some("A100".into()),
            parallelism: 64,
            base_ms: 0.0,
            noise: 0.0,
            seed: i as u64,
            ..SimConfig::default()
        };
        tis.push(SimTi::spawn(config, "127.0.0.1:0".parse()?).await?);
    }
    Ok(tis)
}

pub(super) fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "ti-scheduler-load-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub(super) fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Full => "full",
        Durability::Normal => "normal",
    }
}

/// Starts the service binary on `db` (its log in `dir`) at `durability`, waits until it is
/// ready and registers the TIs; returns it with an HTTP client for it.
pub(super) async fn start_scheduler(
    dir: &Path,
    db: &BenchDb,
    durability: Durability,
    registrations: &[Value],
) -> anyhow::Result<(ChildServer, reqwest::Client)> {
    let port = free_port()?;
    let (db_key, db_value) = db.env();
    let server = ChildServer::spawn(
        Path::new(SERVICE_BIN),
        &["serve", "--bind", &format!("127.0.0.1:{port}")],
        &[
            (
                "TI_SCHEDULER__DATABASE__DURABILITY",
                durability_name(durability).to_string(),
            ),
            (db_key, db_value),
        ],
        port,
        &dir.join("scheduler.log"),
    )?;
    server.wait_ready("/ready").await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    for registration in registrations {
        let r = http
            .post(format!("{}/ti/register", server.url()))
            .json(registration)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "register: {}", r.text().await?);
    }
    Ok((server, http))
}

/// The scheduler under load: its drive, and its own figures.
pub async fn run_scheduler(args: &LoadArgs) -> anyhow::Result<(Drive, Option<ServerFigures>)> {
    if let Some(url) = &args.url {
        return Ok((drive(url.trim_end_matches('/'), args).await?, None));
    }
    let dir = scratch_dir()?;
    let db = BenchDb::create(&dir, args.postgres.as_deref()).await?;
    let tis = InstantTis::spawn(args.protocol, args.tis).await?;
    let (server, http) = start_scheduler(&dir, &db, args.durability, &tis.registrations()).await?;
    // CPU time and the writer's totals are read at the edges of the measured window.
    let window = {
        let (pid, http, url) = (server.pid(), http.clone(), server.url());
        let warmup = args.warmup;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
            let at = ti_scheduler::domain::unix_now();
            let cpu = (cpu_seconds(pid), cpu_seconds(std::process::id()));
            (at, cpu, WriterFigures::scrape(&http, &url).await)
        })
    };
    let result = drive(&server.url(), args).await?;
    let to = ti_scheduler::domain::unix_now();
    let cpu_after = (cpu_seconds(server.pid()), cpu_seconds(std::process::id()));
    let writer_after = WriterFigures::scrape(&http, &server.url()).await;
    let (from, cpu_before, writer_before) = window.await?;
    wait_drained(&db).await?;
    let peak = peak_rss_mib(server.pid()).unwrap_or(f64::NAN);
    let (completed_per_s, e2e, overhead) = end_to_end(&db, from, to).await?;
    server.stop();
    tis.stop().await;
    std::fs::remove_dir_all(&dir).ok();
    Ok((
        result,
        Some(ServerFigures {
            cpu_seconds: match (cpu_before.0, cpu_after.0) {
                (Some(a), Some(b)) => b - a,
                _ => f64::NAN,
            },
            load_cpu_seconds: match (cpu_before.1, cpu_after.1) {
                (Some(a), Some(b)) => b - a,
                _ => f64::NAN,
            },
            writer: writer_after.zip(writer_before).map(|(a, b)| a.since(b)),
            peak_rss_mib: peak,
            completed_per_s,
            e2e_ms: Some(e2e),
            overhead_us: Some(overhead),
        }),
    ))
}

/// The database of the relay on `port` (see [`start_relay`]).
pub(super) fn relay_db(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("relay-{port}.db"))
}

/// The `relay` ceiling server in front of `upstreams` (base URLs), as a child process;
/// with `recording`, it commits each request to a database of its own before sending it
/// (one row, or the scheduler's record).
pub(super) async fn start_relay(
    dir: &Path,
    upstreams: &[String],
    recording: Option<(Durability, Record)>,
) -> anyhow::Result<ChildServer> {
    let port = free_port()?;
    let (port_text, to) = (port.to_string(), upstreams.join(","));
    let db = relay_db(dir, port).to_string_lossy().to_string();
    let mut argv = vec![
        "ceiling-server",
        "--mode",
        "relay",
        "--port",
        &port_text,
        "--to",
        &to,
    ];
    if let Some((durability, record)) = recording {
        let record = match record {
            Record::Row => "row",
            Record::Scheduler => "scheduler",
        };
        argv.extend([
            "--db",
            &db,
            "--durability",
            durability_name(durability),
            "--record",
            record,
        ]);
    }
    let log = dir.join(format!("relay-{port}.log"));
    let server = ChildServer::spawn(&std::env::current_exe()?, &argv, &[], port, &log)?;
    server.wait_ready("/health").await?;
    Ok(server)
}

/// A ceiling server under the same load.
pub async fn run_ceiling(
    mode: &str,
    durability: Option<Durability>,
    args: &LoadArgs,
) -> anyhow::Result<Drive> {
    let dir = scratch_dir()?;
    let port = free_port()?;
    let mut argv = vec!["ceiling-server", "--mode", mode, "--port"];
    let port_text = port.to_string();
    argv.push(&port_text);
    let db = dir.join("ceiling.db").to_string_lossy().to_string();
    let sync = durability.map(durability_name).unwrap_or("full");
    if mode == "sqlite" {
        argv.extend(["--db", &db, "--durability", sync]);
    }
    let this = std::env::current_exe()?;
    let server = ChildServer::spawn(&this, &argv, &[], port, &dir.join("ceiling.log"))?;
    server.wait_ready("/health").await?;
    let result = drive(&server.url(), args).await;
    server.stop();
    std::fs::remove_dir_all(&dir).ok();
    result
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs the benchmark and prints its table.
pub async fn run(args: &LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(
        args.batch == 1 || !args.raw_ceiling,
        "--batch and --raw-ceiling do not go together: the ceiling servers take single submits"
    );
    let ceilings = if args.raw_ceiling {
        let echo = run_ceiling("echo", None, args)
            .await
            .context("echo ceiling")?;
        let sqlite = run_ceiling("sqlite", Some(args.durability), args)
            .await
            .context("SQLite ceiling")?;
        Some((echo, sqlite))
    } else {
        None
    };
    let (sched, figures) = run_scheduler(args).await?;

    let mut mode = match args.rate {
        Some(r) => format!("open loop at {r:.0} requests/s"),
        None => format!("closed loop, {} clients", args.clients),
    };
    if args.batch > 1 {
        mode += &format!(
            ", {} tasks per POST /queue/submit_batch (submits/s counts tasks; latencies are per request)",
            args.batch
        );
    }
    println!(
        "Load: {mode}, {:.0} s measured after {:.0} s warm-up, {} simulated {} TIs that finish at once, synchronous={}",
        args.duration,
        args.warmup,
        args.tis,
        args.protocol.as_str(),
        durability_name(args.durability).to_uppercase()
    );
    println!();
    println!("| server | submits/s | share of ceiling | p50 | p90 | p99 | p99.9 | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |name: &str, d: &Drive, ceiling: Option<f64>| {
        println!(
            "| {name} | {:.0} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            d.rate,
            ceiling.map_or("".to_string(), |c| format!("{:.0}%", 100.0 * d.rate / c)),
            pct(&d.latency, 0.5),
            pct(&d.latency, 0.9),
            pct(&d.latency, 0.99),
            pct(&d.latency, 0.999),
            d.errors
        );
    };
    if let Some((echo, sqlite)) = &ceilings {
        row("ceiling: axum JSON echo", echo, None);
        row(
            &format!(
                "ceiling: axum + SQLite group commit ({})",
                durability_name(args.durability)
            ),
            sqlite,
            Some(echo.rate),
        );
        row("ti-scheduler", &sched, Some(sqlite.rate));
    } else {
        row("ti-scheduler", &sched, None);
    }
    if let Some(f) = figures {
        println!();
        if let Some(e2e) = &f.e2e_ms {
            println!(
                "End to end (submit → result stored): p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms over {} tasks; completed {:.0} tasks/s.",
                e2e.value_at_quantile(0.5),
                e2e.value_at_quantile(0.9),
                e2e.value_at_quantile(0.99),
                e2e.value_at_quantile(0.999),
                e2e.len(),
                f.completed_per_s
            );
        }
        if let Some(o) = &f.overhead_us {
            println!(
                "Scheduler overhead (submit → result stored, less the execution time; ± 1 ms, the timestamps' precision): p50 {:.2} ms, p99 {:.2} ms.",
                o.value_at_quantile(0.5) as f64 / 1000.0,
                o.value_at_quantile(0.99) as f64 / 1000.0,
            );
        }
        println!(
            "Scheduler process: {:.1} CPU seconds in the {:.0} s window ({:.0}% of one core; {:.1} µs of CPU per submit), peak RSS {:.1} MiB.",
            f.cpu_seconds,
            args.duration,
            100.0 * f.cpu_seconds / args.duration,
            1e6 * f.cpu_seconds / (sched.ok.max(1) as f64),
            f.peak_rss_mib
        );
        println!(
            "Load tool (clients and simulated TIs): {:.1} CPU seconds ({:.1} µs per submit).",
            f.load_cpu_seconds,
            1e6 * f.load_cpu_seconds / (sched.ok.max(1) as f64),
        );
        if let Some(w) = f.writer.filter(|w| w.commits > 0.0) {
            println!(
                "Group-commit writer: {:.0} commits/s, {:.1} writes per commit, {:.2} ms per commit on average (BEGIN to COMMIT with its fsync), busy {:.0}% of the window.",
                w.commits / args.duration,
                w.writes / w.commits,
                1e3 * w.busy_seconds / w.commits,
                100.0 * w.busy_seconds / args.duration
            );
        }
    }
    Ok(())
}
