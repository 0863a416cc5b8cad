//! The real binary as a child process: graceful shutdown on SIGTERM, and the crash test
//! (SIGKILL at random moments under concurrent load, restart on the same database, then
//! every acknowledged task must exist and complete, each executed once).
//!
//! `CRASH_KILLS` sets the number of kill points (default 5; `scripts/crash-loop.sh` runs
//! more) and `CRASH_SEED` the seed of the kill moments (default: random, printed).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use ti_scheduler::ti::openai_sim::{OpenAiSim, OpenAiSimConfig};
use ti_scheduler::ti::sim::{SimConfig, SimTi};

use common::{client, client_with_timeout, free_port, spawn_tis};

/// The service under test, as a child process on a fixed port and database file.
struct Service {
    child: Child,
    port: u16,
    db: PathBuf,
    log: PathBuf,
}

impl Service {
    fn start(port: u16, db: &Path, log: &Path) -> Self {
        Self::start_with(port, db, log, &[])
    }

    /// Starts it with these environment variables besides the usual ones.
    fn start_with(port: u16, db: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ti-scheduler"))
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .arg("--db")
            .arg(db)
            .envs(common::FAST_BACKGROUND)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the binary starts");
        Self {
            child,
            port,
            db: db.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        for _ in 0..400 {
            if let Ok(r) = client.get(self.url("/ready")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the service did not get ready; log:\n{}", self.log_tail());
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// kill -9.
    fn kill(mut self) -> (u16, PathBuf, PathBuf) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.port, self.db, self.log)
    }

    /// SIGTERM; returns the exit code.
    async fn terminate(self) -> Option<i32> {
        self.send_sigterm();
        self.wait_exit().await
    }

    /// Sends SIGTERM, without waiting.
    fn send_sigterm(&self) {
        common::signal(&self.child, libc::SIGTERM);
    }

    /// Waits (10 s at most) for the process to exit; returns its exit code. Without
    /// blocking the test's runtime: the simulated TIs run on it, and a draining service
    /// waits for them.
    async fn wait_exit(mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child.kill().unwrap();
        panic!(
            "the service did not stop on SIGTERM; log:\n{}",
            self.log_tail()
        );
    }
}

async fn register(client: &reqwest::Client, service: &Service, ti: &SimTi) {
    register_at(
        client,
        service,
        json!({"host": "127.0.0.1", "port": ti.addr().port()}),
    )
    .await;
}

async fn register_at(client: &reqwest::Client, service: &Service, body: Value) {
    let resp = client
        .post(service.url("/ti/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
}

/// The TIs of a crash test: simulated callback TIs, or simulated OpenAI-compatible servers.
enum Tis {
    Callback(Vec<SimTi>),
    Openai(Vec<OpenAiSim>),
}

impl Tis {
    async fn spawn(kind: &str) -> Self {
        if kind == "callback" {
            return Self::Callback(spawn_tis(3, 20.0).await);
        }
        let mut sims = Vec::new();
        for i in 0..3u64 {
            let config = OpenAiSimConfig {
                model: "llama-7b".into(),
                concurrency: 4,
                base_ms: 20.0,
                noise: 0.3,
                seed: i + 1,
                ..OpenAiSimConfig::default()
            };
            sims.push(
                OpenAiSim::spawn(config, "127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap(),
            );
        }
        Self::Openai(sims)
    }

    async fn register(&self, client: &reqwest::Client, service: &Service) {
        match self {
            Self::Callback(tis) => {
                for ti in tis {
                    register(client, service, ti).await;
                }
            }
            Self::Openai(sims) => {
                for sim in sims {
                    let body = json!({"host": "127.0.0.1", "port": sim.addr().port(),
                                      "kind": "openai", "max_concurrency": 4});
                    register_at(client, service, body).await;
                }
            }
        }
    }

    /// A task's input for these TIs.
    fn input(&self, n: u64) -> Value {
        match self {
            Self::Callback(_) => json!({"n": n}),
            Self::Openai(_) => json!({"prompt": format!("task {n}"), "max_tokens": n % 50 + 1}),
        }
    }

    /// Tasks the TIs ran (callback: accepted; openai: answered).
    fn executed(&self) -> u64 {
        match self {
            Self::Callback(tis) => tis.iter().map(|t| t.stats().accepted).sum(),
            Self::Openai(sims) => sims.iter().map(|s| s.stats().completed).sum(),
        }
    }
}

async fn get_json(client: &reqwest::Client, url: String) -> (u16, Value) {
    let resp = client.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn sigterm_stops_the_service_cleanly_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("s.db"), dir.path().join("s.log"));
    let tis = spawn_tis(1, 50.0).await;
    let client = client();
    let service = Service::start(free_port(), &db, &log);
    service.wait_ready(&client).await;
    register(&client, &service, &tis[0]).await;
    let resp: Value = client
        .post(service.url("/queue/submit"))
        .json(&json!({"model_name": "llama-7b", "task_input": {"p": 1}, "task_id": "term-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["task_id"], "term-1");
    let port = service.port;
    assert_eq!(service.terminate().await, Some(0), "exit code 0 on SIGTERM");

    let service = Service::start(port, &db, &log);
    service.wait_ready(&client).await;
    for _ in 0..200 {
        let (status, body) = get_json(&client, service.url("/task/query?task_id=term-1")).await;
        assert_eq!(status, 200, "{body}");
        if body["task_status"] == "completed" {
            assert_eq!(service.terminate().await, Some(0));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "term-1 did not complete after the restart; log:\n{}",
        service.log_tail()
    );
}

/// A read-only connection to a service's database (running or not).
fn read_only(db: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// The status and outcome of a task in a stopped service's database.
fn stored_state(db: &Path, task_id: &str) -> (String, Option<String>) {
    read_only(db)
        .query_row(
            "SELECT status, outcome FROM tasks WHERE task_id = ?1",
            [task_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// A service with one simulated TI whose tasks run `task_ms`, a shutdown grace of
/// `grace_ms`, and one task submitted (`task_id`).
async fn serve_one_task(
    dir: &Path,
    task_ms: f64,
    grace_ms: &str,
    task_id: &str,
) -> (Service, SimTi, reqwest::Client) {
    let (db, log) = (dir.join("drain.db"), dir.join("drain.log"));
    let ti = SimTi::spawn(
        SimConfig {
            model: "llama-7b".into(),
            base_ms: task_ms,
            noise: 0.0,
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let client = client();
    let env = [("TI_SCHEDULER__SERVER__SHUTDOWN_GRACE_MS", grace_ms)];
    let service = Service::start_with(free_port(), &db, &log, &env);
    service.wait_ready(&client).await;
    register(&client, &service, &ti).await;
    let resp = client
        .post(service.url("/queue/submit"))
        .json(&json!({"model_name": "llama-7b", "task_input": {"p": 1}, "task_id": task_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    (service, ti, client)
}

#[tokio::test]
async fn sigterm_drains_lets_the_task_in_flight_finish_and_exits_0_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let (service, _ti, client) = serve_one_task(dir.path(), 3_000.0, "20000", "slow-1").await;
    service.send_sigterm();

    // Draining: /ready turns 503 (once the signal is handled) and new tasks are refused,
    // while the 3 s task runs on.
    let mut ready = 200;
    for _ in 0..100 {
        ready = client
            .get(service.url("/ready"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "log:\n{}", service.log_tail());
    let resp = client
        .post(service.url("/queue/submit"))
        .json(&json!({"model_name": "llama-7b", "task_input": {"p": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "draining", "{body}");

    let (db, log) = (service.db.clone(), service.log.clone());
    assert_eq!(
        service.wait_exit().await,
        Some(0),
        "exit code 0 after the drain"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert_eq!(
        stored_state(&db, "slow-1"),
        ("completed".into(), Some("succeeded".into())),
        "the task in flight finished before the service stopped; log:\n{log}"
    );
    assert!(log.contains("drained: every task has finished"), "{log}");
}

#[tokio::test]
async fn sigterm_stops_once_the_grace_expires_and_the_unfinished_task_is_left_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let (service, _ti, _) = serve_one_task(dir.path(), 60_000.0, "300", "endless-1").await;
    let (db, log) = (service.db.clone(), service.log.clone());
    assert_eq!(service.terminate().await, Some(0));
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("shutdown grace expired"), "{log}");
    let (status, outcome) = stored_state(&db, "endless-1");
    assert_ne!(status, "completed", "{log}");
    assert_eq!(outcome, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_task_is_lost_when_the_service_is_killed() {
    crash_test("callback").await;
}

/// On OpenAI-compatible TIs delivery is at least once (docs/API.md, Guarantees): a request
/// in flight at the kill is sent again after the restart, so a task may run twice; none is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_task_is_lost_on_openai_tis_when_the_service_is_killed() {
    crash_test("openai").await;
}

/// The kill points (`CRASH_KILLS`, default 5) and seed (`CRASH_SEED`, else random) of a
/// crash test, announced with its name.
fn crash_plan(name: &str) -> (usize, u64, rand::rngs::StdRng) {
    common::plan(
        &format!("crash test ({name})"),
        "CRASH_KILLS",
        "CRASH_SEED",
        5,
    )
}

/// SIGKILLs the service at `kills` random moments 50–600 ms apart, restarting it on the
/// same database each time; `progress` says how far the clients got at each kill.
async fn kill_and_restart(
    mut service: Service,
    client: &reqwest::Client,
    kills: usize,
    rng: &mut rand::rngs::StdRng,
    progress: impl Fn() -> String,
) -> Service {
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
        let before = progress();
        let (port, db, log) = service.kill();
        println!("kill {}: {before}", k + 1);
        service = Service::start(port, &db, &log);
        service.wait_ready(client).await;
    }
    service
}

/// Waits until every task in the service's database is completed (30 s at most).
async fn wait_all_completed(service: &Service, db: &Path) {
    let unfinished = || {
        read_only(db)
            .query_row(
                "SELECT COUNT(*) FROM tasks WHERE status <> 'completed'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
    };
    for _ in 0..600 {
        if unfinished() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "tasks still unfinished after 30 s; log:\n{}",
        service.log_tail()
    );
}

async fn crash_test(kind: &str) {
    let (kills, seed, mut rng) = crash_plan(&format!("{kind} TIs"));

    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("crash.db"), dir.path().join("crash.log"));
    let tis = Arc::new(Tis::spawn(kind).await);
    let client = client();
    let service = Service::start(free_port(), &db, &log);
    service.wait_ready(&client).await;
    tis.register(&client, &service).await;

    // Clients submit with their own task_id and, when the service does not answer,
    // submit the same id again until it does (the idempotent resubmit).
    let base_url = service.url("");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let resubmits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (acked, resubmits, stop, base, tis) = (
            acked.clone(),
            resubmits.clone(),
            stop.clone(),
            base_url.clone(),
            tis.clone(),
        );
        let http = client_with_timeout(Duration::from_secs(3));
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("crash-c{c}-{n}");
                let body = json!({"model_name": "llama-7b", "task_id": id,
                                  "task_input": tis.input(n), "metadata": {"output_tokens": n % 50}});
                loop {
                    match http
                        .post(format!("{base}/queue/submit"))
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            let answer: Value = r.json().await.unwrap();
                            assert_eq!(answer["task_id"], id.as_str());
                            acked.lock().unwrap().push(id.clone());
                            break;
                        }
                        Ok(r) => panic!("submit answered {}", r.status()),
                        Err(_) => {
                            resubmits.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                n += 1;
            }
        }));
    }

    let service = kill_and_restart(service, &client, kills, &mut rng, || {
        format!("{} tasks acknowledged so far", acked.lock().unwrap().len())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let acked: Vec<String> = acked.lock().unwrap().clone();
    let distinct: HashSet<&String> = acked.iter().collect();
    assert_eq!(
        distinct.len(),
        acked.len(),
        "an id was acknowledged twice as new"
    );

    // Every task in the database finishes (results come by callback or reconciliation).
    wait_all_completed(&service, &db).await;

    let mut lost = Vec::new();
    for id in &acked {
        let (status, body) =
            get_json(&client, service.url(&format!("/task/query?task_id={id}"))).await;
        if status != 200 || body["task_status"] != "completed" {
            lost.push((id.clone(), status, body));
        }
    }
    let stored: i64 = read_only(&db)
        .query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0))
        .unwrap();
    let executed = tis.executed();
    let twice = executed.saturating_sub(stored as u64);
    println!(
        "crash test result ({kind} TIs): kill points {kills}, tasks acknowledged {}, tasks stored {stored}, \
         lost {}, executed twice {twice}, resubmits {} (seed {seed})",
        acked.len(),
        lost.len(),
        resubmits.load(Ordering::Relaxed)
    );
    assert!(lost.is_empty(), "acknowledged tasks lost: {lost:?}");
    assert!(stored as usize >= acked.len());
    match *tis {
        Tis::Callback(_) => assert_eq!(
            executed, stored as u64,
            "every stored task ran exactly once on the TIs"
        ),
        Tis::Openai(_) => assert!(
            executed >= stored as u64,
            "every stored task ran at least once: {executed} answers for {stored} tasks"
        ),
    }
    assert_eq!(service.terminate().await, Some(0));
}

/// The OpenAI front door under SIGKILL (docs/API.md, The OpenAI front door): every request
/// is either answered or, if its task was stored, completed as failed; none is sent to a
/// TI twice, and no task is left unfinished. `CRASH_KILLS` and `CRASH_SEED` as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_front_door_request_is_lost_or_answered_twice_when_the_service_is_killed() {
    let (kills, seed, mut rng) = crash_plan("front door");

    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("crash.db"), dir.path().join("crash.log"));
    let tis = Arc::new(Tis::spawn("openai").await);
    let client = client();
    let service = Service::start(free_port(), &db, &log);
    service.wait_ready(&client).await;
    tis.register(&client, &service).await;

    // Each request carries a unique prompt, so that its task row can be found even when
    // the client never saw its x-task-id. Half of them stream.
    #[derive(Default)]
    struct Seen {
        answered: Vec<(String, String)>,
        unanswered: Vec<String>,
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let base_url = service.url("");
    let mut clients = Vec::new();
    for c in 0..4 {
        let (seen, stop, base) = (seen.clone(), stop.clone(), base_url.clone());
        let http = client_with_timeout(Duration::from_secs(5));
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let prompt = format!("front-door c{c} n{n}");
                let body = json!({"model": "llama-7b", "prompt": prompt,
                                  "max_tokens": n % 20 + 1, "stream": !n.is_multiple_of(2)});
                let sent = http
                    .post(format!("{base}/v1/completions"))
                    .json(&body)
                    .send()
                    .await;
                let answered = match sent {
                    Ok(r) if r.status().is_success() => {
                        let task_id = r.headers()["x-task-id"].to_str().unwrap().to_string();
                        // A stream cut by the kill is not an answer.
                        match r.bytes().await {
                            Ok(bytes)
                                if n.is_multiple_of(2) || bytes.ends_with(b"data: [DONE]\n\n") =>
                            {
                                Some(task_id)
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let failed = answered.is_none();
                {
                    let mut seen = seen.lock().unwrap();
                    match answered {
                        Some(task_id) => seen.answered.push((prompt, task_id)),
                        None => seen.unanswered.push(prompt),
                    }
                }
                n += 1;
                if failed {
                    // The service is restarting: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }

    let service = kill_and_restart(service, &client, kills, &mut rng, || {
        format!(
            "{} requests answered so far",
            seen.lock().unwrap().answered.len()
        )
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // Every front-door task completes (after a restart, as failed).
    wait_all_completed(&service, &db).await;
    let rows: Vec<(String, String, String)> = {
        let conn = read_only(&db);
        let mut query = conn
            .prepare(
                "SELECT json_extract(task_input, '$.prompt'), task_id, outcome FROM tasks \
                 WHERE origin = 'openai'",
            )
            .unwrap();
        query
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let mut by_prompt: std::collections::HashMap<&str, Vec<(&str, &str)>> = Default::default();
    for (prompt, task_id, outcome) in &rows {
        by_prompt
            .entry(prompt.as_str())
            .or_default()
            .push((task_id.as_str(), outcome.as_str()));
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let twice: Vec<_> = by_prompt.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "a request became two tasks: {twice:?}");
    let mut lost = Vec::new();
    let mut answered_but_failed = 0;
    for (prompt, task_id) in &seen.answered {
        match by_prompt.get(prompt.as_str()).map(|v| v[0]) {
            Some((stored, outcome)) if stored == task_id => {
                answered_but_failed += usize::from(outcome == "failed");
            }
            other => lost.push((prompt.clone(), other)),
        }
    }
    let recorded_failed = seen
        .unanswered
        .iter()
        .filter(|p| {
            by_prompt
                .get(p.as_str())
                .is_some_and(|v| v[0].1 == "failed")
        })
        .count();
    let never_stored = seen
        .unanswered
        .iter()
        .filter(|p| !by_prompt.contains_key(p.as_str()))
        .count();
    let stored_without_answer = seen.unanswered.len() - recorded_failed - never_stored;
    let executed = tis.executed();
    println!(
        "crash test result (front door): kill points {kills}, requests answered {}, \
         not answered {} (recorded as failed {recorded_failed}, never stored {never_stored}, \
         stored as succeeded while the client's connection died {stored_without_answer}), \
         answered but recorded failed (killed between answer and commit) {answered_but_failed}, \
         task rows {}, lost {}, TI answers {executed} (seed {seed})",
        seen.answered.len(),
        seen.unanswered.len(),
        rows.len(),
        lost.len(),
    );
    assert!(
        lost.is_empty(),
        "answered requests without their task: {lost:?}"
    );
    assert!(
        executed <= rows.len() as u64,
        "a request was sent to a TI twice: {executed} answers for {} tasks",
        rows.len()
    );
    assert!(!seen.answered.is_empty(), "some requests were answered");
    assert_eq!(service.terminate().await, Some(0));
}

/// Submits `body` and returns the task id it was given; panics on anything but success.
async fn submit_ok(client: &reqwest::Client, service: &Service, body: Value) -> String {
    let resp = client
        .post(service.url("/queue/submit"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let answer: Value = resp.json().await.unwrap();
    answer["task_id"].as_str().unwrap().to_string()
}

/// Long-polls `/task/query` until the task completes; returns its view.
async fn completed(client: &reqwest::Client, service: &Service, task_id: &str) -> Value {
    for _ in 0..50 {
        let url = service.url(&format!("/task/query?task_id={task_id}&wait_ms=2000"));
        let (status, body) = get_json(client, url).await;
        assert_eq!(status, 200, "{body}");
        if body["task_status"] == "completed" {
            return body;
        }
    }
    panic!("{task_id} did not complete; log:\n{}", service.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_the_service_runs_and_submits_go_on_restores_every_completed_task() {
    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("live.db"), dir.path().join("live.log"));
    let tis = spawn_tis(2, 5.0).await;
    let client = client();
    let service = Service::start(free_port(), &db, &log);
    service.wait_ready(&client).await;
    for ti in &tis {
        register(&client, &service, ti).await;
    }
    let mut before = Vec::new();
    for n in 0..40 {
        let body = json!({"model_name": "llama-7b", "task_id": format!("before-{n}"),
                          "task_input": {"n": n}});
        before.push(submit_ok(&client, &service, body).await);
    }
    let mut results = Vec::new();
    for id in &before {
        let view = completed(&client, &service, id).await;
        assert_eq!(view["outcome"], "succeeded", "{view}");
        results.push(view["result"].clone());
    }

    // Clients keep submitting while the backup runs; every submit must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (stop, base, client) = (stop.clone(), service.url(""), client.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let resp = client
                    .post(format!("{base}/queue/submit"))
                    .json(&json!({"model_name": "llama-7b", "task_input": {"during": n}}))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
                n += 1;
            }
            n
        })
    };
    let workdir = dir.path().to_path_buf();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_in(
            &workdir,
            &["backup", "--db", "live.db", "--to", "copy.db"],
            &[],
        )
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let during = submitter.await.unwrap();
    assert!(ok, "the backup must run beside the service: {stderr}");
    assert!(
        stdout.starts_with("copy.db: backup of live.db, ") && stdout.contains(" tasks, schema V"),
        "{stdout}"
    );
    let tasks: usize = stdout
        .split(" tasks")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no task count in {stdout}"));
    assert!(tasks >= before.len(), "{stdout}");
    println!("backup: {stdout} ({during} submits while it ran)");

    // The service was not disturbed: still ready, and a new task completes.
    let (status, body) = get_json(&client, service.url("/ready")).await;
    assert_eq!(status, 200, "{body}");
    let after = submit_ok(
        &client,
        &service,
        json!({"model_name": "llama-7b", "task_input": {"after": true}}),
    )
    .await;
    completed(&client, &service, &after).await;

    // A second service on the copy has every task completed before the backup, with its
    // result.
    let restored = Service::start(
        free_port(),
        &dir.path().join("copy.db"),
        &dir.path().join("copy.log"),
    );
    restored.wait_ready(&client).await;
    for (id, result) in before.iter().zip(&results) {
        let (status, view) =
            get_json(&client, restored.url(&format!("/task/query?task_id={id}"))).await;
        assert_eq!(status, 200, "{id} is missing from the copy: {view}");
        assert_eq!(view["task_status"], "completed", "{view}");
        assert_eq!(view["outcome"], "succeeded", "{view}");
        assert_eq!(&view["result"], result, "{id}");
    }
    assert_eq!(restored.terminate().await, Some(0));
    assert_eq!(service.terminate().await, Some(0));
}

#[test]
fn a_backup_refuses_an_existing_file_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    ti_scheduler::store::migrate(&dir.path().join("s.db")).unwrap();
    std::fs::write(dir.path().join("copy.db"), "precious\n").unwrap();
    let (ok, stdout, stderr) = run_in(
        dir.path(),
        &["backup", "--db", "s.db", "--to", "copy.db"],
        &[],
    );
    assert!(!ok, "{stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        non_log_lines(&stderr),
        [
            "error: copy.db already exists; a backup never overwrites a file: \
          give a new name or remove it first"
        ],
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("copy.db")).unwrap(),
        "precious\n"
    );

    // Nor does it create a database that does not exist, or a copy of nothing.
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["backup", "--db", "missing.db", "--to", "new.db"],
        &[],
    );
    assert!(!ok);
    assert_eq!(
        non_log_lines(&stderr),
        [
            "error: database missing.db does not exist; give the one the service uses \
          (--db, --config or TI_SCHEDULER__DATABASE__PATH)"
        ],
        "{stderr}"
    );
    assert!(!dir.path().join("missing.db").exists());
    assert!(!dir.path().join("new.db").exists());
}

#[tokio::test]
async fn probe_exits_0_on_a_ready_service_and_1_naming_the_answer_or_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (db, log) = (dir.path().join("p.db"), dir.path().join("p.log"));
    let client = client();
    let service = Service::start(free_port(), &db, &log);
    service.wait_ready(&client).await;
    let probe = |url: String| {
        let workdir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            run_in(&workdir, &["probe", "--url", &url, "--timeout", "5"], &[])
        })
    };

    let (ok, stdout, stderr) = probe(service.url("")).await.unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(stdout, format!("{}: ready\n", service.url("/ready")));

    // A server that answers, but not 2xx: a simulated TI has no /ready.
    let ti = &spawn_tis(1, 5.0).await[0];
    let ti_url = format!("http://{}", ti.addr());
    let (ok, _, stderr) = probe(ti_url.clone()).await.unwrap();
    assert!(!ok);
    assert_eq!(
        non_log_lines(&stderr),
        [format!(
            "error: {ti_url}/ready answered HTTP 404 Not Found: "
        )],
        "{stderr}"
    );

    let port = service.port;
    assert_eq!(service.terminate().await, Some(0));
    let (ok, _, stderr) = probe(format!("http://127.0.0.1:{port}")).await.unwrap();
    assert!(!ok);
    let lines = non_log_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "error: http://127.0.0.1:{port}/ready did not answer: "
        )),
        "{stderr}"
    );
}

#[test]
fn import_lookup_names_the_bad_line_and_column_and_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lookup.db");
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "model_name,input_tokens,expect,error\nm,10,5,1\nm,ten,5,1\n",
    )
    .unwrap();
    let run = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ti-scheduler"))
            .arg("import-lookup")
            .arg(file)
            .arg("--db")
            .arg(&db)
            .output()
            .unwrap()
    };
    let failed = run(&bad);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("line 3, column 2 (input_tokens)"),
        "{stderr}"
    );
    assert!(!db.exists(), "nothing was written");

    let good = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/lookup-swarmpilot.json"
    );
    let imported = run(Path::new(good));
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let stdout = String::from_utf8_lossy(&imported.stdout);
    assert!(stdout.contains("imported 2 rows"), "{stdout}");
    let rows: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM lookup_rows", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
}

/// Runs the binary with `args` in `dir`, with `env` set (and no inherited
/// `TI_SCHEDULER__` variable or `RUST_LOG`); returns (success, stdout, stderr). Fails the
/// test if the command still runs after 20 s (a service that should have refused to start).
fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    use std::io::{Read, Seek};
    let (mut stdout, mut stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
    let mut command = Command::new(env!("CARGO_BIN_EXE_ti-scheduler"));
    command
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().unwrap())
        .stderr(stderr.try_clone().unwrap());
    for (key, _) in std::env::vars() {
        if key.starts_with("TI_SCHEDULER__") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap();
    let mut status = None;
    for _ in 0..400 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let read = |file: &mut std::fs::File| {
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    };
    let Some(status) = status else {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!(
            "`ti-scheduler {}` still runs after 20 s; stderr:\n{}",
            args.join(" "),
            read(&mut stderr)
        );
    };
    (status.success(), read(&mut stdout), read(&mut stderr))
}

/// The lines of `stderr` that are not log lines (which start with a timestamp).
fn non_log_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

#[test]
fn serve_refuses_a_config_file_that_does_not_exist_in_one_line_even_with_rust_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run_in(
        dir.path(),
        &["serve", "--config", "missing.toml", "--bind", "127.0.0.1:0"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert!(!ok, "it must not start on the defaults");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        non_log_lines(&stderr),
        ["error: config file missing.toml does not exist"],
        "{stderr}"
    );
    assert!(!dir.path().join("data").exists(), "no database was created");
}

#[test]
fn serve_refuses_an_unreachable_postgres_in_one_line_naming_it_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["serve", "--bind", "127.0.0.1:0"],
        &[(
            "TI_SCHEDULER__DATABASE__URL",
            "postgres://scheduler:s3cret@127.0.0.1:1/sched",
        )],
    );
    assert!(!ok, "it must not start");
    let lines = non_log_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with(
            "error: cannot connect to PostgreSQL at postgres://scheduler:***@127.0.0.1:1/sched: "
        ),
        "{stderr}"
    );
    assert!(lines[0].contains("refused"), "{stderr}");
    assert!(
        !stderr.contains("s3cret"),
        "the password is never printed: {stderr}"
    );
}

#[test]
fn serve_refuses_ha_on_sqlite_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["serve", "--bind", "127.0.0.1:0"],
        &[("TI_SCHEDULER__HA__ENABLED", "true")],
    );
    assert!(!ok, "it must not start");
    assert_eq!(
        non_log_lines(&stderr),
        [
            "error: ha.enabled needs PostgreSQL (database.url = \"postgres://...\"); an SQLite file serves one node"
        ],
        "{stderr}"
    );
}

#[test]
fn an_error_is_one_line_and_its_chain_and_backtrace_come_only_with_verbose() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the database file should be: opening it fails deep in SQLite.
    std::fs::create_dir(dir.path().join("dir.db")).unwrap();
    let env = [("RUST_BACKTRACE", "1")];
    let (ok, _, stderr) = run_in(dir.path(), &["migrate", "--db", "dir.db"], &env);
    assert!(!ok);
    let lines = non_log_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");

    let (ok, _, stderr) = run_in(dir.path(), &["migrate", "--db", "dir.db", "-v"], &env);
    assert!(!ok);
    assert!(stderr.contains("Stack backtrace"), "{stderr}");
}

#[test]
fn maintenance_commands_use_the_config_file_then_the_environment_then_db() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.toml"),
        "[database]\npath = \"from-file.db\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = run_in(dir.path(), &["migrate", "--config", "s.toml"], &[]);
    assert!(ok, "{stderr}");
    // The SQLite migrations (V*.sql; migrations/postgres/ holds PostgreSQL's).
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with('V') && name.ends_with(".sql")
        })
        .count();
    assert!(
        stdout.starts_with(&format!("from-file.db: {migrations} migration(s) applied")),
        "{stdout}"
    );

    let env = [("TI_SCHEDULER__DATABASE__PATH", "from-env.db")];
    let (ok, stdout, stderr) = run_in(dir.path(), &["retrain", "--config", "s.toml"], &env);
    assert!(!ok, "retrain must not create a database");
    assert_eq!(
        non_log_lines(&stderr),
        [
            "error: database from-env.db does not exist; give the one the service uses \
          (--db, --config or TI_SCHEDULER__DATABASE__PATH)"
        ],
        "{stdout}{stderr}"
    );
    assert!(!dir.path().join("from-env.db").exists());
    assert!(!dir.path().join("data").exists());

    let (ok, stdout, stderr) = run_in(
        dir.path(),
        &["retrain", "--config", "s.toml", "--db", "from-file.db"],
        &env,
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("from-file.db: retrained 0 models"),
        "{stdout}"
    );

    let table = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/lookup-swarmpilot.json"
    );
    let (ok, stdout, stderr) = run_in(dir.path(), &["import-lookup", table], &env);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("from-env.db: imported 2 rows"),
        "{stdout}"
    );
}

#[tokio::test]
async fn serve_logs_to_stderr_without_colour_and_its_first_line_names_version_config_and_db() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.toml"), "[cleanup]\nbatch_size = 10\n").unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ti-scheduler"))
        .current_dir(dir.path())
        .args(["serve", "--config", "s.toml", "--db", "x.db"])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let service = Service {
        child,
        port,
        db: dir.path().join("x.db"),
        log: dir.path().join("none.log"),
    };
    service.wait_ready(&client()).await;
    common::signal(&service.child, libc::SIGTERM);
    let out = service.child.wait_with_output().unwrap();
    assert!(out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.is_empty(), "logs on stdout: {stdout}");
    assert!(!stderr.contains('\x1b'), "colour codes in a pipe: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("ti-scheduler serve")
            && first.contains(concat!("version=\"", env!("CARGO_PKG_VERSION"), "\""))
            && first.contains("config=s.toml")
            && first.contains("db=x.db"),
        "{first}"
    );
    assert!(stderr.contains("ti-scheduler stopped"), "{stderr}");
}

/// Makes `file` unwritable for this process: `chmod 444`, or, as root (whom permissions do
/// not stop), the immutable attribute. None if neither is possible here (then the caller
/// skips its test, saying why).
fn make_read_only(file: &Path) -> Option<ImmutableGuard> {
    // SAFETY: geteuid(2) only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)).unwrap();
        return Some(ImmutableGuard(None));
    }
    let status = Command::new("chattr")
        .arg("+i")
        .arg(file)
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Some(ImmutableGuard(Some(file.to_path_buf()))),
        _ => None,
    }
}

/// Clears the immutable attribute on drop, so the temp dir can be removed.
struct ImmutableGuard(Option<PathBuf>);

impl Drop for ImmutableGuard {
    fn drop(&mut self) {
        if let Some(file) = &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(file).status();
        }
    }
}

#[test]
fn serve_refuses_a_read_only_database_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    ti_scheduler::store::migrate(&db).unwrap();
    let Some(_guard) = make_read_only(&db) else {
        println!(
            "skipped: running as root and `chattr +i` is not possible here \
             (no CAP_LINUX_IMMUTABLE, or a filesystem without the attribute)"
        );
        return;
    };
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["serve", "--db", "ro.db", "--bind", "127.0.0.1:0"],
        &[],
    );
    assert!(!ok, "it must not start on a file it cannot write: {stderr}");
    let lines = non_log_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ")
            && lines[0].contains("database ro.db is read-only")
            && lines[0].ends_with("the service must write it"),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_database_from_a_newer_version_naming_both_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    ti_scheduler::store::migrate(&db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let known: i64 = conn
        .query_row(
            "SELECT MAX(version) FROM refinery_schema_history",
            [],
            |r| r.get(0),
        )
        .unwrap();
    conn.execute(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
         VALUES (?1, 'from_the_future', '2030-01-01T00:00:00Z', '1')",
        [known + 1],
    )
    .unwrap();
    drop(conn);
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["serve", "--db", "new.db", "--bind", "127.0.0.1:0"],
        &[],
    );
    assert!(!ok);
    let expected = format!(
        "database new.db was created by a newer ti-scheduler, schema V{}; this binary knows V{known}",
        known + 1
    );
    let lines = non_log_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].ends_with(&expected), "{stderr}");
    assert!(!stderr.contains("missing"), "{stderr}");
}

/// Every line of `stderr`, each parsed as a JSON object (the test fails on one that is not).
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            _ => panic!("a log line is not a JSON object: {line:?}\nstderr:\n{stderr}"),
        })
        .collect()
}

#[tokio::test]
async fn serve_with_log_format_json_logs_json_lines_and_with_verbose_an_access_line_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ti-scheduler"))
        .current_dir(dir.path())
        .args(["serve", "--log-format", "json", "-v", "--db", "x.db"])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let service = Service {
        child,
        port,
        db: dir.path().join("x.db"),
        log: dir.path().join("none.log"),
    };
    let client = client();
    service.wait_ready(&client).await;
    let resp = client
        .get(service.url("/health"))
        .header("x-request-id", "process-json-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "process-json-1");
    common::signal(&service.child, libc::SIGTERM);
    let out = service.child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines(&stderr);
    assert_eq!(lines[0]["message"], "ti-scheduler serve", "{stderr}");
    assert_eq!(lines[0]["version"], env!("CARGO_PKG_VERSION"), "{stderr}");
    let access = lines
        .iter()
        .find(|l| l["request_id"] == "process-json-1")
        .unwrap_or_else(|| panic!("no access line for the request:\n{stderr}"));
    assert_eq!(access["target"], "ti_scheduler::access", "{access}");
    assert_eq!(access["level"], "DEBUG", "{access}");
    assert_eq!(access["method"], "GET", "{access}");
    assert_eq!(access["path"], "/health", "{access}");
    assert_eq!(access["status"], 200, "{access}");
    assert!(access["latency_ms"].is_number(), "{access}");
    assert!(
        !lines.iter().any(|l| l["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("tokio_cron_scheduler"))),
        "the cron scheduler's start-up lines are for debugging it: {stderr}"
    );
}

#[test]
fn with_log_format_json_a_refusal_to_start_is_a_json_line_too() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = run_in(
        dir.path(),
        &["serve", "--log-format", "json", "--config", "missing.toml"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert!(!ok);
    let lines = json_lines(&stderr);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert_eq!(
        last["message"], "config file missing.toml does not exist",
        "{stderr}"
    );
}
