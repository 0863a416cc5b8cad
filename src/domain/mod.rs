//! The nouns of the service, shared by every layer: identifiers, task states and
//! outcomes here; scheduling policies ([`StrategyKind`], [`PredictMode`], [`Durability`]),
//! decisions and lookup-table rows in the submodules. Nothing here depends on another
//! module of the crate, so `config`, `scheduling`, `predictor` and `store` all build on it
//! without importing each other's nouns.

mod decision;
mod lookup;
mod policy;

pub use decision::{Candidate, DecisionReason, NewDecision};
pub use lookup::LookupRow;
pub use policy::{Durability, PredictMode, StrategyKind, TiKind};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A task's identifier: `task-{uuid}` when the scheduler makes it, or the client's own
/// idempotency key (1–128 characters of `A-Za-z0-9._:-`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// A fresh `task-{uuid}`. The UUID is version 7 (time-ordered): new tasks land at the
    /// end of the primary-key B-tree, so a commit dirties a few pages rather than one per
    /// task.
    pub fn generate() -> Self {
        Self(format!("task-{}", Uuid::now_v7()))
    }

    /// Checks a client-chosen id, naming what is wrong with it.
    ///
    /// ```
    /// use ti_scheduler::domain::TaskId;
    /// assert_eq!(TaskId::parse_client("job-42").unwrap().as_str(), "job-42");
    /// assert!(TaskId::parse_client("no spaces").is_err());
    /// ```
    pub fn parse_client(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 128 {
            return Err(format!(
                "task_id must be 1 to 128 characters long, got {}",
                raw.chars().count()
            ));
        }
        if let Some(bad) = raw
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(format!(
                "task_id may only contain A-Za-z0-9._:- characters, found {bad:?}"
            ));
        }
        Ok(Self(raw.to_string()))
    }

    /// Wraps an id read back from the database or a TI.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Task Instance's identifier (UUID v4), shown in its hyphenated lowercase form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TiUuid(Uuid);

impl TiUuid {
    /// A fresh random id.
    pub fn generate() -> Self {
        Self(Uuid::new_v4())
    }
}

impl FromStr for TiUuid {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for TiUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Where a task is in its life: `queued`, `scheduled`, `completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Committed, not yet accepted by a TI.
    Queued,
    /// A TI accepted it; waiting or executing there.
    Scheduled,
    /// Its result (or error) is stored.
    Completed,
}

impl TaskStatus {
    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Completed => "completed",
        }
    }

    /// Reads a stored name.
    pub fn from_stored(raw: &str) -> Option<Self> {
        match raw {
            "queued" => Some(Self::Queued),
            "scheduled" => Some(Self::Scheduled),
            "completed" => Some(Self::Completed),
            _ => None,
        }
    }
}

/// How a completed task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The TI returned a result.
    Succeeded,
    /// The TI reported an error; the result holds `{"error": ...}`.
    Failed,
}

impl Outcome {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// How a task came in, which decides what a restart does with it unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// `POST /queue/submit`: its client reads the stored result, so it is driven again.
    #[default]
    Queue,
    /// The OpenAI front door (`/v1/*`): its client waits on the connection, so after a
    /// restart nobody is left to answer and it is completed as failed.
    Openai,
}

impl Origin {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Openai => "openai",
        }
    }

    /// From the stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "queue" => Some(Self::Queue),
            "openai" => Some(Self::Openai),
            _ => None,
        }
    }
}

/// Token usage of one request, as an OpenAI-compatible server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<i64>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<i64>,
}

/// Checks a name (a model, a host, a hardware label): no control characters, which no
/// model or host has and PostgreSQL's TEXT could not store (NUL).
///
/// ```
/// use ti_scheduler::domain::check_name;
/// assert!(check_name("model_name", "llama-7b").is_ok());
/// assert_eq!(
///     check_name("model_name", "a\u{0}b").unwrap_err(),
///     "model_name must not contain control characters, found '\\0'"
/// );
/// ```
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!(
            "{field} must not contain control characters, found {:?}",
            c
        )),
        None => Ok(()),
    }
}

/// Current Unix time in seconds, rounded to milliseconds (like Python's `round(time.time(), 3)`).
pub fn unix_now() -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_millis() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_task_ids_are_checked_for_length_and_characters() {
        assert!(TaskId::parse_client("job-1.a_b:c").is_ok());
        assert!(TaskId::parse_client("").unwrap_err().contains("1 to 128"));
        assert!(TaskId::parse_client(&"x".repeat(129))
            .unwrap_err()
            .contains("129"));
        assert!(TaskId::parse_client("a b").unwrap_err().contains("' '"));
        assert!(TaskId::parse_client("é").is_err());
    }

    #[test]
    fn generated_task_ids_have_the_task_prefix() {
        let id = TaskId::generate();
        assert!(id.as_str().starts_with("task-"));
        assert_eq!(id.as_str().len(), "task-".len() + 36);
    }
}
