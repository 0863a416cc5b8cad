//! Admission control: a submitted task is refused, before anything of it is reserved or
//! stored, when its model is overloaded or its own deadline cannot be met.
//!
//! Three checks, made by [`Cache::admit`](super::Cache) under the cache lock with what the
//! placement has just computed (the model's waiting tasks, the chosen TI's expected wait,
//! the task's predicted execution there):
//!
//! - `scheduling.max_waiting_tasks`: the model's TIs already hold that many unfinished tasks;
//! - `scheduling.max_wait_ms`: the predicted wait on the chosen TI is above it;
//! - `metadata.deadline_ms`: the predicted completion (wait + execution) is above it.
//!
//! A refusal carries the time after which the same task would likely be admitted, from
//! the predicted wait (which falls in real time as the queue runs): the API sends it as
//! `Retry-After`. This file is pure; it sees numbers, not the cache.

use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::SchedulingSettings;

/// The metadata field of a task's own deadline, ms from its submit.
const DEADLINE_FIELD: &str = "deadline_ms";

/// The service's admission limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Largest predicted wait on the chosen TI, ms.
    pub max_wait_ms: Option<f64>,
    /// Most unfinished tasks on a model's TIs.
    pub max_waiting_tasks: Option<usize>,
}

impl Limits {
    /// From `[scheduling]`, where 0 means no limit.
    pub fn from_settings(s: &SchedulingSettings) -> Self {
        Self {
            max_wait_ms: (s.max_wait_ms > 0).then_some(s.max_wait_ms as f64),
            max_waiting_tasks: (s.max_waiting_tasks > 0)
                .then(|| usize::try_from(s.max_waiting_tasks).unwrap_or(usize::MAX)),
        }
    }
}

/// What one task asks of admission: the service's limits and its own deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Ask {
    pub(super) limits: Limits,
    pub(super) deadline_ms: Option<f64>,
    /// The task's position among the items of its submit, for the refusal.
    pub(super) index: usize,
}

impl Ask {
    /// True when nothing is to be checked (the usual case): the placement skips counting.
    pub(super) fn is_free(&self) -> bool {
        self.limits.max_wait_ms.is_none()
            && self.limits.max_waiting_tasks.is_none()
            && self.deadline_ms.is_none()
    }
}

/// What the placement found, for the checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Seen {
    /// Unfinished tasks on the model's TIs (0 when not counted).
    pub(super) waiting: usize,
    /// The chosen TI's expected wait and this task's predicted execution there, ms;
    /// `None` when no TI of the model is usable (the task would wait with none, for a
    /// time nobody can predict).
    pub(super) wait_and_execution_ms: Option<(f64, f64)>,
}

/// Which limit refused a task; the `reason` label of
/// `ti_scheduler_admission_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `scheduling.max_wait_ms`.
    MaxWait,
    /// `scheduling.max_waiting_tasks`.
    MaxWaiting,
    /// The task's `metadata.deadline_ms`.
    Deadline,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxWait => "max_wait",
            Self::MaxWaiting => "max_waiting",
            Self::Deadline => "deadline",
        }
    }
}

/// A task refused by admission control.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// Which limit.
    pub reason: Reason,
    /// The task's model.
    pub model: String,
    /// Its position among the items of its submit (a batch names it).
    pub index: usize,
    /// When to try again: at least a second, in whole seconds.
    pub retry_after: Duration,
    /// What was seen against what was allowed, for the message.
    detail: Detail,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Detail {
    Wait {
        wait_ms: f64,
        limit_ms: f64,
    },
    Waiting {
        waiting: usize,
        limit: usize,
    },
    Deadline {
        wait_ms: f64,
        execution_ms: f64,
        deadline_ms: f64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = &self.model;
        let retry = self.retry_after.as_secs();
        match self.detail {
            Detail::Wait { wait_ms, limit_ms } => write!(
                f,
                "model '{model}' is overloaded: the predicted wait is {wait_ms:.0} ms, above \
                 scheduling.max_wait_ms {limit_ms:.0}; retry in {retry} s"
            ),
            Detail::Waiting { waiting, limit } => write!(
                f,
                "model '{model}' is overloaded: {waiting} of its tasks are unfinished, the \
                 limit is scheduling.max_waiting_tasks {limit}; retry in {retry} s"
            ),
            Detail::Deadline {
                wait_ms,
                execution_ms,
                deadline_ms,
            } => write!(
                f,
                "model '{model}' cannot meet metadata.deadline_ms {deadline_ms}: the predicted \
                 completion is {:.0} ms (wait {wait_ms:.0} + execution {execution_ms:.0}); \
                 retry in {retry} s",
                wait_ms + execution_ms
            ),
        }
    }
}

/// The task's `metadata.deadline_ms`, if it gives one: a positive number of ms.
pub fn deadline_of(metadata: &Map<String, Value>) -> Result<Option<f64>, String> {
    let Some(value) = metadata.get(DEADLINE_FIELD) else {
        return Ok(None);
    };
    match value.as_f64() {
        Some(ms) if ms > 0.0 && ms.is_finite() => Ok(Some(ms)),
        _ => Err(format!(
            "metadata.{DEADLINE_FIELD} must be a positive number of milliseconds, got {value}"
        )),
    }
}

/// Admits the task, or says which limit refuses it and when to retry.
pub(super) fn check(ask: &Ask, model: &str, seen: Seen) -> Result<(), Refusal> {
    let refuse = |reason, retry_ms: f64, detail| Refusal {
        reason,
        model: model.to_string(),
        index: ask.index,
        retry_after: retry_after(retry_ms),
        detail,
    };
    let wait_ms = seen.wait_and_execution_ms.map(|(w, _)| w);
    if let Some(limit) = ask.limits.max_waiting_tasks {
        if seen.waiting >= limit {
            // The model's TIs run its tasks at the pace that empties the chosen one's
            // queue: the excess is gone after that share of its wait.
            let excess = (seen.waiting + 1 - limit) as f64;
            let retry_ms = wait_ms.unwrap_or(0.0) * excess / seen.waiting.max(1) as f64;
            return Err(refuse(
                Reason::MaxWaiting,
                retry_ms,
                Detail::Waiting {
                    waiting: seen.waiting,
                    limit,
                },
            ));
        }
    }
    // With no usable TI the wait cannot be predicted: only the count above applies.
    let Some((wait_ms, execution_ms)) = seen.wait_and_execution_ms else {
        return Ok(());
    };
    if let Some(limit_ms) = ask.limits.max_wait_ms {
        if wait_ms > limit_ms {
            return Err(refuse(
                Reason::MaxWait,
                wait_ms - limit_ms,
                Detail::Wait { wait_ms, limit_ms },
            ));
        }
    }
    if let Some(deadline_ms) = ask.deadline_ms {
        let completion = wait_ms + execution_ms;
        if completion > deadline_ms {
            // Once the wait has run down it fits, unless the execution alone does not:
            // then no later than when the queue is empty.
            return Err(refuse(
                Reason::Deadline,
                (completion - deadline_ms).min(wait_ms),
                Detail::Deadline {
                    wait_ms,
                    execution_ms,
                    deadline_ms,
                },
            ));
        }
    }
    Ok(())
}

/// Whole seconds, rounded up, at least one (`Retry-After` has no finer unit, and 0 would
/// invite an immediate retry).
fn retry_after(ms: f64) -> Duration {
    let secs = (ms / 1000.0).ceil();
    Duration::from_secs(if secs.is_finite() && secs >= 1.0 {
        secs.min(u32::MAX as f64) as u64
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(max_wait_ms: Option<f64>, max_waiting: Option<usize>, deadline: Option<f64>) -> Ask {
        Ask {
            limits: Limits {
                max_wait_ms,
                max_waiting_tasks: max_waiting,
            },
            deadline_ms: deadline,
            index: 0,
        }
    }

    fn seen(waiting: usize, wait_ms: f64, execution_ms: f64) -> Seen {
        Seen {
            waiting,
            wait_and_execution_ms: Some((wait_ms, execution_ms)),
        }
    }

    #[test]
    fn no_limit_admits_everything() {
        let free = Ask::default();
        assert!(free.is_free());
        assert_eq!(check(&free, "m", seen(1_000_000, 1e12, 1e12)), Ok(()));
    }

    #[test]
    fn a_wait_above_max_wait_is_refused_until_it_has_run_down_to_the_limit() {
        let mut a = ask(Some(1_000.0), None, None);
        assert_eq!(check(&a, "m", seen(3, 1_000.0, 50.0)), Ok(()));
        a.index = 2;
        let r = check(&a, "m", seen(3, 3_200.0, 50.0)).unwrap_err();
        assert_eq!(r.reason, Reason::MaxWait);
        assert_eq!(r.index, 2);
        // 2 200 ms above the limit: 3 s, rounded up.
        assert_eq!(r.retry_after, Duration::from_secs(3));
        let text = r.to_string();
        assert!(
            text.contains("'m'") && text.contains("3200 ms") && text.contains("max_wait_ms 1000"),
            "{text}"
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let a = ask(Some(1_000.0), None, None);
        let r = check(&a, "m", seen(1, 1_000.5, 0.0)).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(1));
    }

    #[test]
    fn the_waiting_limit_refuses_at_the_limit_and_retries_after_the_excess_share_of_the_wait() {
        let a = ask(None, Some(4), None);
        assert_eq!(check(&a, "m", seen(3, 9_000.0, 0.0)), Ok(()));
        let r = check(&a, "m", seen(8, 16_000.0, 0.0)).unwrap_err();
        assert_eq!(r.reason, Reason::MaxWaiting);
        // 5 of the 8 must finish first: 5/8 of 16 s.
        assert_eq!(r.retry_after, Duration::from_secs(10));
        assert!(r.to_string().contains("8 of its tasks"), "{r}");
        // With no usable TI the count still applies, and the retry is the minimum.
        let none = Seen {
            waiting: 4,
            wait_and_execution_ms: None,
        };
        let r = check(&a, "m", none).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(1));
        assert_eq!(check(&ask(Some(1.0), None, Some(1.0)), "m", none), Ok(()));
    }

    #[test]
    fn a_deadline_refuses_a_completion_beyond_it() {
        let a = ask(None, None, Some(2_000.0));
        assert_eq!(check(&a, "m", seen(1, 1_500.0, 500.0)), Ok(()));
        let r = check(&a, "m", seen(1, 4_000.0, 500.0)).unwrap_err();
        assert_eq!(r.reason, Reason::Deadline);
        // 2.5 s over; the wait falls that much in 2.5 s.
        assert_eq!(r.retry_after, Duration::from_secs(3));
        assert!(r.to_string().contains("4500 ms"), "{r}");
        // The execution alone is too long: no later than when the queue is empty.
        let r = check(&a, "m", seen(1, 1_200.0, 5_000.0)).unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(2));
    }

    #[test]
    fn deadline_must_be_a_positive_number() {
        let meta = |v: Value| {
            serde_json::json!({ "deadline_ms": v })
                .as_object()
                .cloned()
                .unwrap()
        };
        assert_eq!(deadline_of(&Map::new()), Ok(None));
        assert_eq!(deadline_of(&meta(serde_json::json!(250))), Ok(Some(250.0)));
        assert_eq!(deadline_of(&meta(serde_json::json!(0.5))), Ok(Some(0.5)));
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-3),
            serde_json::json!("soon"),
            serde_json::json!(null),
        ] {
            let e = deadline_of(&meta(bad.clone())).unwrap_err();
            assert!(e.contains("metadata.deadline_ms"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits_of_zero_are_off() {
        let mut s = SchedulingSettings::default();
        assert_eq!(Limits::from_settings(&s), Limits::default());
        s.max_wait_ms = 500;
        s.max_waiting_tasks = 7;
        assert_eq!(
            Limits::from_settings(&s),
            Limits {
                max_wait_ms: Some(500.0),
                max_waiting_tasks: Some(7)
            }
        );
    }
}
