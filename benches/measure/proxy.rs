//! `measure proxy`: what the OpenAI front door costs. The same clients call two simulated
//! OpenAI-compatible servers directly and through the scheduler (a child process, with
//! both servers registered as its TIs), in one run, phase after phase:
//!
//! 1. the most requests per second with 16 closed-loop clients, direct then through the
//!    scheduler (its share of direct is the throughput figure);
//! 2. one client: per-request latency, direct and through (the difference of the
//!    percentiles is the latency the scheduler adds);
//! 3. open loop at 50 % and 90 % of the scheduler's maximum rate, direct and through;
//! 4. the same for streams (`stream: true`): time to first chunk on reused and on new
//!    connections, and the time between chunks.
//!
//! Phases 1 and 2 also run through three relays that decide nothing (`measure
//! ceiling-server --mode relay`, child processes in the same stack: axum and reqwest): one
//! records nothing (what proxying alone costs on this machine); one commits each request
//! as one row to SQLite at the same synchronous level before sending it (the least a
//! router that records every request must do); one writes what the scheduler writes, in
//! its schema (task and decision rows before sending, the outcome after): the rest of the
//! scheduler's cost is its own work.
//!
//! Clients, servers and scheduler share the machine's cores, as the targets say.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::ceiling::Record;
use super::load::{durability_name, relay_db, scratch_dir, start_relay, start_scheduler, BenchDb};
use super::workload::MODEL;
use ti_scheduler::domain::Durability;
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};

/// What the relays record, in the order they run: nothing, one row, the scheduler's record.
const RECORDS: [Option<Record>; 3] = [None, Some(Record::Row), Some(Record::Scheduler)];

/// Options of the proxy benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Closed-loop clients of the throughput phases.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Tokens per answer (one streamed chunk each).
    #[arg(long, default_value_t = 16)]
    pub tokens: u64,
    /// Time between two tokens of a stream, ms.
    #[arg(long, default_value_t = 1.0)]
    pub token_ms: f64,
    /// Synchronous level of the scheduler's database: full or normal.
    #[arg(long, default_value = "full", value_parser = super::parse_durability)]
    pub durability: Durability,
    /// Only the plain requests' phases, or only the streams'.
    #[arg(long, value_enum)]
    pub only: Option<Kind>,
}

/// The two kinds of request the phases send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Plain,
    Stream,
}

/// The model of the streamed requests: served by the servers whose tokens take time.
const STREAM_MODEL: &str = "llama-7b-stream";

/// Requests in flight to each simulated server at once.
const BACKEND_CONCURRENCY: usize = 64;

/// Most requests outstanding in an open-loop phase; arrivals beyond are counted as lost.
const OPEN_LOOP_CAP: u64 = 2_048;

/// Where the clients send their requests.
#[derive(Clone)]
struct Target {
    /// Base URLs, used in turn (the two servers directly, or the scheduler).
    bases: Arc<Vec<String>>,
    http: reqwest::Client,
}

impl Target {
    /// With `fresh_connections`, a new connection per request (no pooling).
    fn new(bases: Vec<String>, fresh_connections: bool) -> Self {
        let mut builder = reqwest::Client::builder().no_proxy().tcp_nodelay(true);
        if fresh_connections {
            builder = builder.pool_max_idle_per_host(0);
        }
        Self {
            bases: Arc::new(bases),
            http: builder.build().expect("an HTTP client"),
        }
    }

    fn base(&self, n: u64) -> &str {
        &self.bases[n as usize % self.bases.len()]
    }
}

/// What one request measured, µs.
#[derive(Default)]
struct Sample {
    /// Whole request (non-streamed), or time to the first chunk (streamed).
    latency_us: u64,
    /// Streamed: gaps between successive chunks.
    gaps_us: Vec<u64>,
}

/// The figures of one phase.
struct Phase {
    requests: u64,
    failed: u64,
    seconds: f64,
    latency: Histogram<u64>,
    gaps: Histogram<u64>,
}

impl Phase {
    fn new() -> Self {
        Self {
            requests: 0,
            failed: 0,
            seconds: 0.0,
            latency: Histogram::new(3).expect("histogram"),
            gaps: Histogram::new(3).expect("histogram"),
        }
    }

    fn add(&mut self, sample: Option<Sample>) {
        match sample {
            Some(s) => {
                self.requests += 1;
                let _ = self.latency.record(s.latency_us.max(1));
                for g in s.gaps_us {
                    let _ = self.gaps.record(g.max(1));
                }
            }
            None => self.failed += 1,
        }
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn ms(h: &Histogram<u64>, q: f64) -> f64 {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

fn request_body(n: u64, tokens: u64, stream: bool) -> Value {
    json!({
        "model": if stream { STREAM_MODEL } else { MODEL },
        "messages": [{"role": "user", "content": format!("Request {n}: say something short.")}],
        "max_tokens": tokens,
        "stream": stream,
    })
}

/// One request; `None` if it failed.
async fn one(target: &Target, n: u64, tokens: u64, stream: bool) -> Option<Sample> {
    let url = format!("{}/v1/chat/completions", target.base(n));
    let started = Instant::now();
    let resp = target
        .http
        .post(url)
        .json(&request_body(n, tokens, stream))
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    if !stream {
        resp.bytes().await.ok()?;
        return Some(Sample {
            latency_us: started.elapsed().as_micros() as u64,
            gaps_us: Vec::new(),
        });
    }
    let mut body = resp.bytes_stream();
    let mut sample = Sample::default();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = body.next().await {
        chunk.ok()?;
        let now = Instant::now();
        match last {
            None => sample.latency_us = now.duration_since(started).as_micros() as u64,
            Some(previous) => sample
                .gaps_us
                .push(now.duration_since(previous).as_micros() as u64),
        }
        last = Some(now);
    }
    Some(sample)
}

/// `clients` closed-loop clients for `seconds`.
async fn closed_loop(
    target: &Target,
    clients: usize,
    seconds: f64,
    tokens: u64,
    stream: bool,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let phase = Arc::new(Mutex::new(Phase::new()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (target, stop, counter, phase) =
            (target.clone(), stop.clone(), counter.clone(), phase.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let sample = one(&target, n, tokens, stream).await;
                phase.lock().unwrap().add(sample);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let mut phase = Arc::try_unwrap(phase)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap();
    phase.seconds = started.elapsed().as_secs_f64();
    phase
}

/// Requests arriving at `rate` per second, evenly spaced, for `seconds`.
async fn open_loop(target: &Target, rate: f64, seconds: f64, tokens: u64, stream: bool) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::new()));
    let outstanding = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let total = (rate * seconds) as u64;
    let mut requests = Vec::with_capacity(total as usize);
    for n in 0..total {
        tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate)).await;
        if outstanding.load(Ordering::Relaxed) >= OPEN_LOOP_CAP {
            phase.lock().unwrap().failed += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (target, phase, outstanding) = (target.clone(), phase.clone(), outstanding.clone());
        requests.push(tokio::spawn(async move {
            let sample = one(&target, n, tokens, stream).await;
            phase.lock().unwrap().add(sample);
            outstanding.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    for r in requests {
        let _ = r.await;
    }
    let mut phase = Arc::try_unwrap(phase)
        .ok()
        .expect("requests are done")
        .into_inner()
        .unwrap();
    phase.seconds = started.elapsed().as_secs_f64();
    phase
}

/// What the disk alone gives a commit at `synchronous=FULL`: a WAL frame (4 KiB and its
/// header) appended to a file in the database's directory, then `fsync`, as SQLite does
/// (its bundled build syncs with `fsync`), for `seconds`, `gap` apart, µs. No request can
/// be answered faster than this at FULL, since each is committed before it is sent.
///
/// Back to back is the floor under load. Spaced as one client's streams are (a commit,
/// then nothing until the stream ends), the same commit is several times slower on the
/// README's VM, with the CPU busy or not (README, What it costs): that is the floor of a
/// stream's time to first chunk with one client.
fn disk_commits(
    dir: &std::path::Path,
    seconds: f64,
    gap: Duration,
) -> anyhow::Result<Histogram<u64>> {
    use std::io::{Seek, Write};
    const FRAME: usize = 4096 + 24;
    const WAL_FRAMES: usize = 1000;
    let mut file = std::fs::File::create(dir.join("disk-floor"))?;
    let mut histogram = Histogram::new(3)?;
    let frame = vec![7u8; FRAME];
    let started = Instant::now();
    let mut written = 0;
    while started.elapsed().as_secs_f64() < seconds {
        // Like a WAL that starts over after a checkpoint: it overwrites what it holds.
        if written == WAL_FRAMES {
            file.rewind()?;
            written = 0;
        }
        let commit = Instant::now();
        file.write_all(&frame)?;
        file.sync_all()?;
        histogram.record((commit.elapsed().as_micros() as u64).max(1))?;
        written += 1;
        std::thread::sleep(gap);
    }
    std::fs::remove_file(dir.join("disk-floor"))?;
    Ok(histogram)
}

/// The disk alone, measured before the phases ([`disk_commits`]).
struct Disk {
    back_to_back: Histogram<u64>,
    /// One commit per stream of one client: a stream's length apart.
    spaced: Histogram<u64>,
    gap: Duration,
}

impl Disk {
    fn measure(dir: &std::path::Path, args: &ProxyArgs) -> anyhow::Result<Self> {
        let gap = Duration::from_secs_f64(args.tokens as f64 * args.token_ms / 1000.0);
        Ok(Self {
            back_to_back: disk_commits(dir, 2.0, Duration::ZERO)?,
            spaced: disk_commits(dir, args.duration, gap)?,
            gap,
        })
    }
}

/// A row of the comparison table: the same load, direct and through the scheduler.
struct Row {
    what: String,
    direct: Phase,
    through: Phase,
    /// Through the relays (phases 1 and 2 only), in [`RECORDS`] order.
    relays: Option<[Phase; 3]>,
}

/// Runs the benchmark and prints its tables.
pub async fn run(args: &ProxyArgs) -> anyhow::Result<()> {
    // Two servers that answer plain requests at once (the throughput and latency the
    // scheduler adds, CPU-bound), and two whose tokens come `token_ms` apart (streams).
    let mut sims = Vec::new();
    for (seed, (model, token_ms)) in [
        (MODEL, 0.0),
        (MODEL, 0.0),
        (STREAM_MODEL, args.token_ms),
        (STREAM_MODEL, args.token_ms),
    ]
    .into_iter()
    .enumerate()
    {
        let config = OpenAiSimConfig {
            model: model.into(),
            concurrency: BACKEND_CONCURRENCY,
            base_ms: 0.0,
            per_output_token_ms: token_ms,
            min_completion_share: 1.0,
            seed: seed as u64,
            ..OpenAiSimConfig::default()
        };
        sims.push(OpenAiSim::spawn(config, "127.0.0.1:0".parse()?).await?);
    }
    let dir = scratch_dir()?;
    let db = dir.join("proxy.db");
    let disk = Disk::measure(&dir, args)?;
    let registrations: Vec<Value> = sims
        .iter()
        .map(|sim| {
            json!({"host": "127.0.0.1", "port": sim.addr().port(), "kind": "openai",
                   "max_concurrency": BACKEND_CONCURRENCY})
        })
        .collect();
    let (server, _) = start_scheduler(
        &dir,
        &BenchDb::Sqlite(db.clone()),
        args.durability,
        &registrations,
    )
    .await?;
    let bases = |range: std::ops::Range<usize>| -> Vec<String> {
        sims[range]
            .iter()
            .map(|s| format!("http://{}", s.addr()))
            .collect()
    };
    let through = Target::new(vec![server.url()], false);
    // [plain, stream] × RECORDS.
    let mut relays = Vec::new();
    for range in [0..2, 2..4] {
        for record in RECORDS {
            let recording = record.map(|r| (args.durability, r));
            relays.push(start_relay(&dir, &bases(range.clone()), recording).await?);
        }
    }
    let (d, tokens) = (args.duration, args.tokens);

    let mut rows = Vec::new();
    let kinds: &[bool] = match args.only {
        None => &[false, true],
        Some(Kind::Plain) => &[false],
        Some(Kind::Stream) => &[true],
    };
    for &stream in kinds {
        let kind = if stream { "stream" } else { "plain" };
        let direct_bases = if stream { bases(2..4) } else { bases(0..2) };
        let direct = Target::new(direct_bases.clone(), false);
        let relay = |n: usize| {
            let at = RECORDS.len() * usize::from(stream) + n;
            Target::new(vec![relays[at].url()], false)
        };
        let via: [Target; 3] = [relay(0), relay(1), relay(2)];
        // Warm every path (connections, the predictor's first estimates).
        for target in [&direct, &via[0], &via[1], &via[2], &through] {
            closed_loop(target, args.clients, 1.0, tokens, stream).await;
        }
        let max_direct = closed_loop(&direct, args.clients, d, tokens, stream).await;
        let max_relays = relay_phases(&via, args.clients, d, tokens, stream).await;
        let max_through = closed_loop(&through, args.clients, d, tokens, stream).await;
        let top = max_through.rate();
        rows.push(Row {
            what: format!("{kind}, {} clients, closed loop", args.clients),
            direct: max_direct,
            through: max_through,
            relays: Some(max_relays),
        });
        rows.push(Row {
            what: format!("{kind}, 1 client, reused connection"),
            direct: closed_loop(&direct, 1, d, tokens, stream).await,
            relays: Some(relay_phases(&via, 1, d, tokens, stream).await),
            through: closed_loop(&through, 1, d, tokens, stream).await,
        });
        if stream {
            let fresh_direct = Target::new(direct_bases.clone(), true);
            let fresh_through = Target::new(vec![server.url()], true);
            rows.push(Row {
                what: format!("{kind}, 1 client, new connection per request"),
                direct: closed_loop(&fresh_direct, 1, d, tokens, stream).await,
                through: closed_loop(&fresh_through, 1, d, tokens, stream).await,
                relays: None,
            });
        }
        for share in [0.5, 0.9] {
            let rate = top * share;
            rows.push(Row {
                what: format!(
                    "{kind}, open loop {rate:.0}/s ({:.0} % of max)",
                    share * 100.0
                ),
                direct: open_loop(&direct, rate, d, tokens, stream).await,
                through: open_loop(&through, rate, d, tokens, stream).await,
                relays: None,
            });
        }
    }
    // Every answered request left a task row; give the last completions time to commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.stop();
    let mut recorded = (0, 0);
    for (n, relay) in relays.into_iter().enumerate() {
        let port = relay.port();
        relay.stop();
        if RECORDS[n % RECORDS.len()] == Some(Record::Scheduler) {
            let (tasks, succeeded) = front_door_tasks(&relay_db(&dir, port))?;
            recorded = (recorded.0 + tasks, recorded.1 + succeeded);
        }
    }
    let stored = front_door_tasks(&db)?;
    for sim in sims {
        sim.stop().await;
    }
    std::fs::remove_dir_all(&dir).ok();
    print(args, &rows, stored, &disk);
    println!(
        "The relays that write the scheduler's record left {} task rows, {} of them succeeded.",
        recorded.0, recorded.1
    );
    Ok(())
}

/// The same closed loop through each relay in turn, in [`RECORDS`] order.
async fn relay_phases(
    via: &[Target; 3],
    clients: usize,
    seconds: f64,
    tokens: u64,
    stream: bool,
) -> [Phase; 3] {
    [
        closed_loop(&via[0], clients, seconds, tokens, stream).await,
        closed_loop(&via[1], clients, seconds, tokens, stream).await,
        closed_loop(&via[2], clients, seconds, tokens, stream).await,
    ]
}

/// The front-door task rows of a database in the scheduler's schema, and how many succeeded.
fn front_door_tasks(db: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let conn = rusqlite::Connection::open(db)?;
    Ok(conn.query_row(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE outcome = 'succeeded') FROM tasks \
         WHERE origin = 'openai'",
        [],
        |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)),
    )?)
}

fn print(args: &ProxyArgs, rows: &[Row], (tasks, succeeded): (u64, u64), disk: &Disk) {
    println!(
        "\n## measure proxy: {} s per phase, answers of {} tokens (plain: at once; streamed: {} ms apart), synchronous={}\n",
        args.duration,
        args.tokens,
        args.token_ms,
        durability_name(args.durability)
    );
    println!(
        "Plain requests: latency of the whole request; streams: time to first chunk (TTFC). ms.\n"
    );
    println!("| load | direct req/s | through req/s | share | direct p50 / p99 | through p50 / p99 | added p50 / p99 | failed (direct / through) |");
    println!("|---|---:|---:|---:|---|---|---|---|");
    for r in rows {
        let (d, t) = (&r.direct, &r.through);
        let q = |h: &Histogram<u64>, q| Phase::ms(h, q);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} % | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} |",
            r.what,
            d.rate(),
            t.rate(),
            100.0 * t.rate() / d.rate(),
            q(&d.latency, 0.5),
            q(&d.latency, 0.99),
            q(&t.latency, 0.5),
            q(&t.latency, 0.99),
            q(&t.latency, 0.5) - q(&d.latency, 0.5),
            q(&t.latency, 0.99) - q(&d.latency, 0.99),
            d.failed,
            t.failed,
        );
    }
    println!(
        "\nThe same loads through three relays that decide nothing (axum + reqwest, each its own process): \
         one records nothing; one commits each request to SQLite as one row first; one writes what the \
         scheduler writes, in its schema (task and decision rows first, the outcome after); synchronous={}. \
         Rate (share of direct); added p50 / p99, ms (plain: whole request; streams: TTFC). The last \
         column sets the scheduler against the relay that writes its record: its share of that relay's rate, \
         and its p99 less that relay's, what the scheduler's own work costs.\n",
        durability_name(args.durability)
    );
    println!(
        "| load | direct | relay, records nothing | relay, one row | relay, the scheduler's record | scheduler | scheduler against the record relay |"
    );
    println!("|---|---:|---|---|---|---|---|");
    for r in rows.iter() {
        let Some([bare, row, record]) = &r.relays else {
            continue;
        };
        let d = &r.direct;
        let cell = |p: &Phase| {
            format!(
                "{:.0}/s ({:.0} %); {:.2} / {:.2}",
                p.rate(),
                100.0 * p.rate() / d.rate(),
                Phase::ms(&p.latency, 0.5) - Phase::ms(&d.latency, 0.5),
                Phase::ms(&p.latency, 0.99) - Phase::ms(&d.latency, 0.99),
            )
        };
        let t = &r.through;
        println!(
            "| {} | {:.0}/s | {} | {} | {} | {} | {:.0} % of its rate; p99 {:+.2} ms |",
            r.what,
            d.rate(),
            cell(bare),
            cell(row),
            cell(record),
            cell(t),
            100.0 * t.rate() / record.rate(),
            Phase::ms(&t.latency, 0.99) - Phase::ms(&record.latency, 0.99),
        );
    }
    println!("\nStreams: time between chunks as the client reads them, ms.\n");
    println!("| load | direct p50 / p99 | through p50 / p99 | added p50 / p99 |");
    println!("|---|---|---|---|");
    for r in rows.iter().filter(|r| !r.direct.gaps.is_empty()) {
        let (d, t) = (&r.direct.gaps, &r.through.gaps);
        println!(
            "| {} | {:.3} / {:.3} | {:.3} / {:.3} | {:.3} / {:.3} |",
            r.what,
            Phase::ms(d, 0.5),
            Phase::ms(d, 0.99),
            Phase::ms(t, 0.5),
            Phase::ms(t, 0.99),
            Phase::ms(t, 0.5) - Phase::ms(d, 0.5),
            Phase::ms(t, 0.99) - Phase::ms(d, 0.99),
        );
    }
    println!(
        "\nThe disk alone, before the phases: a 4 KiB append + fsync in the database's directory \
         (the floor of a commit at synchronous=full). Back to back: p50 {:.2} / p99 {:.2} / p99.9 {:.2} ms, \
         {} commits. One every {:.0} ms, as one client's streams commit: p50 {:.2} / p99 {:.2} ms, {} commits.",
        Phase::ms(&disk.back_to_back, 0.5),
        Phase::ms(&disk.back_to_back, 0.99),
        Phase::ms(&disk.back_to_back, 0.999),
        disk.back_to_back.len(),
        disk.gap.as_secs_f64() * 1000.0,
        Phase::ms(&disk.spaced, 0.5),
        Phase::ms(&disk.spaced, 0.99),
        disk.spaced.len(),
    );
    let through: u64 = rows.iter().map(|r| r.through.requests).sum();
    println!(
        "\nAnswered through the scheduler in the measured phases: {through}; front-door task rows \
         (warm-up included): {tasks}, {succeeded} of them succeeded."
    );
}
