//! The policies an operator chooses: how tasks are placed ([`StrategyKind`]), how their
//! execution time is predicted ([`PredictMode`]) and how hard a commit is made durable
//! ([`Durability`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A scheduling strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Earliest expected completion.
    ShortestQueue,
    /// Cycle over the healthy TIs.
    RoundRobin,
    /// Lowest expected completion + λ · its error.
    Weighted,
    /// Smallest of one random draw per TI.
    Probabilistic,
}

impl StrategyKind {
    /// Every strategy, in the order the API lists them.
    pub const ALL: [Self; 4] = [
        Self::ShortestQueue,
        Self::RoundRobin,
        Self::Weighted,
        Self::Probabilistic,
    ];

    /// Its API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ShortestQueue => "shortest_queue",
            Self::RoundRobin => "round_robin",
            Self::Weighted => "weighted",
            Self::Probabilistic => "probabilistic",
        }
    }

    /// Parses an API name; the error lists the valid ones.
    ///
    /// ```
    /// use ti_scheduler::domain::StrategyKind;
    /// assert_eq!(StrategyKind::parse("round_robin"), Ok(StrategyKind::RoundRobin));
    /// assert_eq!(
    ///     StrategyKind::parse("fastest").unwrap_err(),
    ///     "unknown strategy 'fastest'; valid: shortest_queue, round_robin, weighted, probabilistic"
    /// );
    /// ```
    pub fn parse(name: &str) -> Result<Self, String> {
        parse_name(name, &Self::ALL, Self::as_str, "strategy")
    }
}

/// How execution times are predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredictMode {
    /// The default chain (learned statistics and fallbacks).
    Default,
    /// The lookup table first.
    LookupTable,
}

impl PredictMode {
    /// Every mode.
    pub const ALL: [Self; 2] = [Self::Default, Self::LookupTable];

    /// Its API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::LookupTable => "lookup_table",
        }
    }

    /// Parses an API name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self, String> {
        parse_name(name, &Self::ALL, Self::as_str, "predict mode")
    }
}

/// The variant named `name` (exactly: names are case-sensitive), or an error that lists
/// the valid names.
fn parse_name<T: Copy>(
    name: &str,
    all: &[T],
    as_str: fn(T) -> &'static str,
    what: &str,
) -> Result<T, String> {
    all.iter()
        .copied()
        .find(|v| as_str(*v) == name)
        .ok_or_else(|| {
            let valid: Vec<&str> = all.iter().map(|v| as_str(*v)).collect();
            format!("unknown {what} '{name}'; valid: {}", valid.join(", "))
        })
}

/// How hard SQLite works to make a commit durable (PRAGMA synchronous, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync the WAL at every commit: a commit survives a crash of the process and a
    /// power loss or OS crash.
    Full,
    /// fsync the WAL only at checkpoints: a commit survives a crash of the process
    /// (kill -9), but the last commits may be lost if the machine loses power.
    Normal,
}

/// How the scheduler talks to a TI: `callback` or `openai`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TiKind {
    /// Our protocol: the TI accepts a task, runs it and calls back with the result.
    Callback,
    /// An OpenAI-compatible inference server (vLLM, SGLang, TGI, llama.cpp, Ollama):
    /// one request, one response. The scheduler queues the tasks and sends each one when
    /// the TI has a free slot.
    Openai,
}

impl TiKind {
    /// Every kind.
    pub const ALL: [Self; 2] = [Self::Callback, Self::Openai];

    /// Its API (and stored) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Callback => "callback",
            Self::Openai => "openai",
        }
    }

    /// Parses an API name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Self, String> {
        parse_name(name, &Self::ALL, Self::as_str, "kind")
    }

    /// Requests in flight to one TI of this kind when registration does not say.
    pub fn default_concurrency(self) -> u32 {
        match self {
            Self::Callback => 1,
            Self::Openai => 8,
        }
    }
}
