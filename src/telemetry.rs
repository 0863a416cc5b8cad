//! What an operator sees of the service: every Prometheus metric family (its name, type,
//! unit, help text and buckets, in one table: [`FAMILIES`]), the process-wide recorder, the
//! families rendered at scrape time from the cache, and the log output (text or JSON on
//! stderr).
//!
//! Counters and histograms go through the `metrics` crate's recorder, named by the
//! constants below. The per-TI gauges and the tasks waiting for a TI are not: the
//! recorder keeps a gauge forever once set, so a removed TI would go on reporting
//! `healthy 1`. `/metrics` writes them itself from the current state ([`GaugeText`]).

use std::collections::HashMap;
use std::fmt::Write;
use std::hash::Hash;
use std::io::IsTerminal;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Tasks accepted by a submit (a client `task_id` seen before is not counted again).
pub const SUBMITS: &str = "ti_scheduler_submits_total";
/// Completed tasks, by `model`, `ti` and `outcome`.
pub const TASKS_COMPLETED: &str = "ti_scheduler_tasks_completed_total";
/// Re-routes, by `model`.
pub const REROUTES: &str = "ti_scheduler_reroutes_total";
/// Submit to stored result, seconds, by `model`.
pub const TASK_LATENCY: &str = "ti_scheduler_task_latency_seconds";
/// |actual − predicted| / actual execution time, by `model`.
pub const PREDICTION_ERROR: &str = "ti_scheduler_prediction_error_ratio";
/// Dispatch attempts that failed (connection, timeout, 5xx).
pub const DISPATCH_FAILURES: &str = "ti_scheduler_dispatch_failures_total";
/// Dispatch attempts retried.
pub const DISPATCH_RETRIES: &str = "ti_scheduler_dispatch_retries_total";
/// Tasks a TI refused with a 4xx (they fail).
pub const DISPATCH_REJECTIONS: &str = "ti_scheduler_dispatch_rejections_total";
/// Busy answers (408, 429, 503) of OpenAI-compatible TIs.
pub const TI_BUSY: &str = "ti_scheduler_ti_busy_total";
/// Connections closed at once beyond `server.max_connections`.
pub const CONNECTIONS_REFUSED: &str = "ti_scheduler_connections_refused_total";
/// HTTP request latency, seconds, by `path` (the route) and `status`.
pub const HTTP_REQUEST_DURATION: &str = "ti_scheduler_http_request_duration_seconds";
/// One group commit of the writer, seconds.
pub const DB_COMMIT: &str = "ti_scheduler_db_commit_seconds";
/// Writes per group commit.
pub const DB_BATCH_SIZE: &str = "ti_scheduler_db_batch_size";
/// 1, labelled with the `version`.
pub const BUILD_INFO: &str = "ti_scheduler_build_info";
/// Submits refused by admission control, by `model` and `reason`.
pub const ADMISSION_REJECTIONS: &str = "ti_scheduler_admission_rejections_total";
/// 1 while the service drains.
pub const DRAINING: &str = "ti_scheduler_draining";
/// Front-door requests answered, by `model` and `status`.
pub const OPENAI_REQUESTS: &str = "ti_scheduler_openai_requests_total";
/// Front-door streams: arrival to the first chunk with text, seconds.
pub const OPENAI_TTFT: &str = "ti_scheduler_openai_ttft_seconds";
/// Front-door answers: time spent in the scheduler (the whole request less the TI's part),
/// seconds.
pub const OPENAI_ADDED_LATENCY: &str = "ti_scheduler_openai_added_latency_seconds";
/// Front-door streams being relayed now.
pub const OPENAI_STREAMS_OPEN: &str = "ti_scheduler_openai_streams_open";
/// Per TI (scrape time): tasks dispatched to it and not completed.
pub const TI_QUEUE_LENGTH: &str = "ti_scheduler_ti_queue_length";
/// Per TI (scrape time): expected wait of a new task, seconds.
pub const TI_EXPECTED_WAIT: &str = "ti_scheduler_ti_expected_wait_seconds";
/// Per TI (scrape time): σ of that expected wait, seconds.
pub const TI_WAIT_ERROR: &str = "ti_scheduler_ti_wait_error_seconds";
/// Per TI (scrape time): 1 if it gets new tasks.
pub const TI_HEALTHY: &str = "ti_scheduler_ti_healthy";
/// Per model (scrape time): unfinished tasks with no TI.
pub const TASKS_WAITING_FOR_TI: &str = "ti_scheduler_tasks_waiting_for_ti";

/// A Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

impl Kind {
    /// Its name on a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric family.
#[derive(Debug)]
pub struct Family {
    /// Its name, in base units (seconds, ratios).
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its unit, if it has one.
    pub unit: Option<Unit>,
    /// Its `# HELP` text.
    pub help: &'static str,
    /// A histogram's buckets when not [`SECONDS`].
    pub buckets: Option<&'static [f64]>,
}

/// Buckets of the short durations (requests, commits), seconds.
pub const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets of a task's whole life, seconds: milliseconds to an hour.
const TASK_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];
/// Buckets of a relative error: 1 % to 10× off.
const RATIOS: &[f64] = &[0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0];
/// Buckets of the writes per commit.
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

const fn family(name: &'static str, kind: Kind, unit: Option<Unit>, help: &'static str) -> Family {
    Family {
        name,
        kind,
        unit,
        help,
        buckets: None,
    }
}

/// Every family the service exports.
pub const FAMILIES: &[Family] = &[
    family(
        SUBMITS,
        Kind::Counter,
        Some(Unit::Count),
        "Tasks accepted by POST /queue/submit and /queue/submit_batch (a client task_id seen before is not counted again).",
    ),
    family(
        TASKS_COMPLETED,
        Kind::Counter,
        Some(Unit::Count),
        "Tasks completed, by model, TI (ti_uuid of the TI whose outcome was stored) and outcome (succeeded or failed).",
    ),
    family(
        REROUTES,
        Kind::Counter,
        Some(Unit::Count),
        "Tasks placed again on a TI of their model because their TI failed, was removed, died or was busy, by model.",
    ),
    Family {
        buckets: Some(TASK_SECONDS),
        ..family(
            TASK_LATENCY,
            Kind::Histogram,
            Some(Unit::Seconds),
            "End-to-end latency of completed tasks: from the submit to the stored result, seconds, by model.",
        )
    },
    Family {
        buckets: Some(RATIOS),
        ..family(
            PREDICTION_ERROR,
            Kind::Histogram,
            None,
            "Absolute relative error of the execution-time prediction of each succeeded task: |actual - predicted| / actual (0.1 = 10 % off), by model.",
        )
    },
    family(
        DISPATCH_FAILURES,
        Kind::Counter,
        Some(Unit::Count),
        "Dispatch attempts that failed (refused connection, timeout, 5xx); after ti.dispatch_attempts the TI is marked unhealthy.",
    ),
    family(
        DISPATCH_RETRIES,
        Kind::Counter,
        Some(Unit::Count),
        "Dispatch attempts retried after a failure.",
    ),
    family(
        DISPATCH_REJECTIONS,
        Kind::Counter,
        Some(Unit::Count),
        "Tasks a TI refused with a 4xx (other than 408 and 429); they fail.",
    ),
    family(
        TI_BUSY,
        Kind::Counter,
        Some(Unit::Count),
        "Busy answers (408, 429, 503) of OpenAI-compatible TIs; the TI is paused and the task decided again.",
    ),
    family(
        CONNECTIONS_REFUSED,
        Kind::Counter,
        Some(Unit::Count),
        "Connections closed at once because server.max_connections were open.",
    ),
    family(
        HTTP_REQUEST_DURATION,
        Kind::Histogram,
        Some(Unit::Seconds),
        "HTTP request latency, seconds, by route (path) and status.",
    ),
    family(
        DB_COMMIT,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Duration of one group commit of the database writer, seconds.",
    ),
    Family {
        buckets: Some(SIZES),
        ..family(
            DB_BATCH_SIZE,
            Kind::Histogram,
            Some(Unit::Count),
            "Writes carried by one group commit of the database writer.",
        )
    },
    family(
        BUILD_INFO,
        Kind::Gauge,
        None,
        "Always 1; the version label is the running ti-scheduler's version.",
    ),
    family(
        ADMISSION_REJECTIONS,
        Kind::Counter,
        Some(Unit::Count),
        "Submits refused with 429 by admission control, by model and reason (max_wait, max_waiting, deadline).",
    ),
    family(
        DRAINING,
        Kind::Gauge,
        None,
        "1 once the service drains (POST /admin/drain, SIGTERM): new tasks are refused and /ready answers 503.",
    ),
    family(
        OPENAI_REQUESTS,
        Kind::Counter,
        Some(Unit::Count),
        "Requests answered by the OpenAI front door (/v1/chat/completions, /v1/completions), by model and HTTP status.",
    ),
    Family {
        buckets: Some(TASK_SECONDS),
        ..family(
            OPENAI_TTFT,
            Kind::Histogram,
            Some(Unit::Seconds),
            "Streamed front-door requests: time from arrival to the first chunk that carried text, seconds.",
        )
    },
    family(
        OPENAI_ADDED_LATENCY,
        Kind::Histogram,
        Some(Unit::Seconds),
        "Non-streamed front-door requests: time spent in the scheduler (arrival to answer, less the TI's own time), seconds.",
    ),
    family(
        OPENAI_STREAMS_OPEN,
        Kind::Gauge,
        None,
        "Front-door streams being relayed from a TI to a client now.",
    ),
    family(
        TI_QUEUE_LENGTH,
        Kind::Gauge,
        Some(Unit::Count),
        "Tasks dispatched to the TI and not completed (waiting and running), per registered TI.",
    ),
    family(
        TI_EXPECTED_WAIT,
        Kind::Gauge,
        Some(Unit::Seconds),
        "Expected wait of a new task on the TI (its queue estimate), seconds, per registered TI.",
    ),
    family(
        TI_WAIT_ERROR,
        Kind::Gauge,
        Some(Unit::Seconds),
        "Error (standard deviation) of the TI's expected wait, seconds, per registered TI.",
    ),
    family(
        TI_HEALTHY,
        Kind::Gauge,
        None,
        "1 if the TI gets new tasks, 0 if its dispatches or health probes failed, per registered TI.",
    ),
    family(
        TASKS_WAITING_FOR_TI,
        Kind::Gauge,
        Some(Unit::Count),
        "Unfinished tasks with no TI, because no TI of their model was usable, per model.",
    ),
];

/// The family of that name.
pub fn family_of(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The process-wide Prometheus recorder (the `metrics` macros report to one global), with
/// every family described and `build_info` set.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install_recorder).clone()
}

fn install_recorder() -> PrometheusHandle {
    let builder = || recorder_builder().unwrap_or_else(|_| PrometheusBuilder::new());
    let handle = builder().install_recorder().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "another metrics recorder is installed; /metrics shows only its own");
        builder().build_recorder().handle()
    });
    for f in FAMILIES {
        let (name, help) = (f.name.into(), f.help.into());
        metrics::with_recorder(|r| match f.kind {
            Kind::Counter => r.describe_counter(name, f.unit, help),
            Kind::Gauge => r.describe_gauge(name, f.unit, help),
            Kind::Histogram => r.describe_histogram(name, f.unit, help),
        });
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Histogram samples wait in the recorder until they are folded into their buckets,
    // which `/metrics` does, and otherwise only this upkeep: without it a service nobody
    // scrapes keeps every sample (tens of bytes per request).
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(METRICS_UPKEEP_EVERY);
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the metrics upkeep thread");
    }
    handle
}

/// A recorder with every family's buckets (an empty bucket list is the only error).
fn recorder_builder() -> Result<PrometheusBuilder, BuildError> {
    FAMILIES
        .iter()
        .filter_map(|f| f.buckets.map(|b| (f.name, b)))
        .try_fold(
            PrometheusBuilder::new().set_buckets(SECONDS)?,
            |builder, (name, buckets)| {
                builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
            },
        )
}

/// Handles of a labelled family that every request or task records, kept per label set: a
/// name (a model, a route) and a small rest (a status, an outcome). Taking a handle through
/// a `metrics` macro builds the set's labels and key, hashes them and looks them up in the
/// recorder: about 2 500 instructions and a few allocations, five times per front-door
/// request. A kept handle costs a map lookup. The recorder keeps every label set it has
/// seen, so these maps hold no more than it does; they are made after the recorder is
/// installed ([`metrics_handle`], first thing in `App::build`), as a handle reports to the
/// recorder of its making.
#[derive(Debug)]
pub struct Handles<C, H> {
    sets: RwLock<HashMap<String, HashMap<C, H>>>,
}

impl<C, H> Default for Handles<C, H> {
    fn default() -> Self {
        Self {
            sets: RwLock::default(),
        }
    }
}

impl<C: Copy + Eq + Hash, H: Clone> Handles<C, H> {
    /// The handle of the set (`name`, `rest`), made by `make` the first time.
    pub fn get(&self, name: &str, rest: C, make: impl FnOnce() -> H) -> H {
        let sets = self.sets.read().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = sets.get(name).and_then(|set| set.get(&rest)) {
            return handle.clone();
        }
        drop(sets);
        let mut sets = self.sets.write().unwrap_or_else(|p| p.into_inner());
        sets.entry(name.to_string())
            .or_default()
            .entry(rest)
            .or_insert_with(make)
            .clone()
    }
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const METRICS_UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// A gauge family being written in the Prometheus text format, for the families that
/// `/metrics` writes from the current state rather than through the recorder.
pub struct GaugeText<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> GaugeText<'a> {
    /// Appends the family's `# HELP` (from [`FAMILIES`]) and `# TYPE` lines.
    pub fn start(out: &'a mut String, name: &'static str) -> Self {
        let help = family_of(name).map_or("", |f| f.help);
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        Self { out, name }
    }

    /// Appends one sample.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(self.name);
        for (i, (key, value)) in labels.iter().enumerate() {
            self.out.push(if i == 0 { '{' } else { ',' });
            let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", sample_value(value));
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// A sample value as Prometheus spells it.
fn sample_value(v: f64) -> String {
    match v {
        v if v.is_nan() => "NaN".into(),
        v if v == f64::INFINITY => "+Inf".into(),
        v if v == f64::NEG_INFINITY => "-Inf".into(),
        v => v.to_string(),
    }
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The target of the access log lines (one per request, at debug level).
pub const ACCESS_LOG: &str = "ti_scheduler::access";

/// Sends the logs to stderr in `format`, filtered by `RUST_LOG`, or else by `default`.
///
/// The two lines tokio-cron-scheduler logs at start-up (at info) are hidden unless the
/// filter's default level is debug or trace, or it names `tokio_cron_scheduler`.
pub fn init_logging(format: LogFormat, default: &str) {
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|d| !d.trim().is_empty());
    let (mut filter, directives) = match from_env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, from_env.unwrap_or_default()),
        _ => (EnvFilter::new(default), default.to_string()),
    };
    if !shows_cron_lines(&directives) {
        if let Ok(quiet) = "tokio_cron_scheduler=warn".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let stderr = std::io::stderr;
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(stderr)
            .with_env_filter(filter)
            .init(),
    }
}

/// True if the filter `directives` would show tokio-cron-scheduler's start-up lines as
/// debug lines: its default level is debug or trace, or it names the crate.
fn shows_cron_lines(directives: &str) -> bool {
    directives.split(',').map(str::trim).any(|d| {
        d.starts_with("tokio_cron_scheduler")
            || d.eq_ignore_ascii_case("debug")
            || d.eq_ignore_ascii_case("trace")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_set_s_handle_is_made_once_then_kept() {
        let handles: Handles<u16, usize> = Handles::default();
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            made.get()
        };
        assert_eq!(handles.get("llama-7b", 200, make), 1);
        assert_eq!(handles.get("llama-7b", 200, make), 1, "kept");
        assert_eq!(handles.get("llama-7b", 503, make), 2, "another status");
        assert_eq!(handles.get("mistral", 200, make), 3, "another name");
        assert_eq!(handles.get("mistral", 200, make), 3);
        assert_eq!(made.get(), 3);
    }

    #[test]
    fn every_family_has_help_and_no_name_is_in_milliseconds() {
        for f in FAMILIES {
            assert!(!f.help.is_empty(), "{} has no help", f.name);
            assert!(!f.name.ends_with("_ms"), "{} is in ms", f.name);
            assert!(f.name.starts_with("ti_scheduler_"), "{}", f.name);
        }
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family is listed twice");
    }

    #[test]
    fn the_cron_start_up_lines_show_only_at_a_debug_default_level_or_when_named() {
        assert!(!shows_cron_lines("info"));
        assert!(!shows_cron_lines("info,ti_scheduler=debug"));
        assert!(!shows_cron_lines("warn,ti_scheduler::access=debug"));
        assert!(shows_cron_lines("debug"));
        assert!(shows_cron_lines("info, TRACE"));
        assert!(shows_cron_lines("info,tokio_cron_scheduler=info"));
    }

    #[test]
    fn a_written_gauge_has_help_type_and_escaped_labels() {
        let mut out = String::new();
        let mut gauge = GaugeText::start(&mut out, TI_HEALTHY);
        gauge.sample(&[("model", "a\"b\\c\nd"), ("ti", "x")], 1.0);
        gauge.sample(&[], f64::INFINITY);
        let help = family_of(TI_HEALTHY).unwrap().help;
        assert_eq!(
            out,
            format!(
                "# HELP {TI_HEALTHY} {help}\n# TYPE {TI_HEALTHY} gauge\n\
                 {TI_HEALTHY}{{model=\"a\\\"b\\\\c\\nd\",ti=\"x\"}} 1\n{TI_HEALTHY} +Inf\n"
            )
        );
    }
}
