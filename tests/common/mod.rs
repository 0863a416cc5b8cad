//! Helpers shared by the test targets that run the real binary as child processes
//! (`tests/process.rs`, `tests/failover.rs`).

// Each test target compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::process::Child;
use std::time::Duration;

use rand::SeedableRng;
use ti_scheduler::ti::sim::{SimConfig, SimTi};

/// The settings that make a service under test probe, reconcile and clean up quickly, so
/// that a restart or a take-over is followed within a second or two.
pub const FAST_BACKGROUND: [(&str, &str); 5] = [
    ("TI_SCHEDULER__TI__HEALTH_INTERVAL_MS", "200"),
    ("TI_SCHEDULER__TI__RECONCILE_AFTER_MS", "1000"),
    ("TI_SCHEDULER__CLEANUP__SCHEDULE", "* * * * * *"),
    ("TI_SCHEDULER__CLEANUP__RESULT_TTL_SECS", "1"),
    ("RUST_LOG", "info"),
];

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP client (no proxy) whose requests give up after `timeout`.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(5))
}

/// `n` simulated callback TIs of llama-7b (A100 and H100 in turn), 4 tasks at once each,
/// `base_ms` per task with noise.
pub async fn spawn_tis(n: usize, base_ms: f64) -> Vec<SimTi> {
    let mut tis = Vec::new();
    for i in 0..n {
        let config = SimConfig {
            model: "llama-7b".into(),
            hardware: Some(if i % 2 == 0 { "A100" } else { "H100" }.into()),
            parallelism: 4,
            base_ms,
            noise: 0.3,
            seed: i as u64 + 1,
            ..SimConfig::default()
        };
        tis.push(
            SimTi::spawn(config, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap(),
        );
    }
    tis
}

/// The number of kill points (`kills_var`, else `default`) and the seed (`seed_var`, else
/// random) of a test that kills at random moments, announced with its name so that a
/// failure can be replayed.
pub fn plan(
    name: &str,
    kills_var: &str,
    seed_var: &str,
    default: usize,
) -> (usize, u64, rand::rngs::StdRng) {
    let kills: usize = std::env::var(kills_var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let seed: u64 = std::env::var(seed_var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{name}: {kills} kill points, {seed_var}={seed}");
    (kills, seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Sends `signal` (SIGTERM, SIGKILL, SIGSTOP, SIGCONT...) to the process `pid`.
pub fn signal_pid(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) with a valid signal on a pid has no memory effects.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

/// Sends `signal` to a child process.
pub fn signal(child: &Child, signal: libc::c_int) {
    signal_pid(child.id(), signal);
}
