//! A task's outcome: the TI's result callback (`POST /result/submit`), or a result that
//! recovery fetched from the TI, is stored (the first one wins), the predictor learns from
//! the execution time, and the task's prediction leaves its TI's queue. What the predictor
//! learns is saved once a second by the flush loop (`background.rs`), not with each
//! completion: it is derived data that `ti-scheduler retrain` can rebuild.

use serde_json::{json, Map, Value};

use super::cache::Execution;
use super::events::Event;
use super::{Error, Scheduler};
use crate::domain::{unix_now, Outcome, TaskId, TaskStatus, TiUuid, Usage};
use crate::store::{Completion, DecisionRepo, Flush, LearnedRepo, StatsRepo, TaskRepo};
use crate::telemetry;
use crate::ti::protocol::ResultCallback;
use crate::ti::upstream_body;

/// Longest error message of a failed task in its log line, in characters.
const LOGGED_ERROR_CHARS: usize = 300;

/// What a failed task's stored result says went wrong, cut to [`LOGGED_ERROR_CHARS`].
fn failure_message(result: &Value) -> String {
    let message = result
        .get("error")
        .and_then(Value::as_str)
        .map_or_else(|| result.to_string(), str::to_string);
    match message.char_indices().nth(LOGGED_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
    }
}

/// How a task ended, as it is stored.
#[derive(Debug, Clone)]
pub(super) struct Finished {
    execution_ms: f64,
    /// The stored result: JSON text.
    result: String,
    /// For a failed task, what went wrong (its log line); `None` when it succeeded.
    failure: Option<String>,
    usage: Option<Usage>,
    ttft_ms: Option<f64>,
}

impl Finished {
    /// What a callback TI reported: a result, or an error (stored as `{"error": ...}`).
    pub(super) fn reported(
        execution_ms: f64,
        result: Option<Value>,
        error: Option<String>,
    ) -> Self {
        match error {
            Some(e) => Self::failed(execution_ms, json!({ "error": e })),
            None => {
                let result = result.unwrap_or(Value::Null).to_string();
                Self::success(execution_ms, result, None)
            }
        }
    }

    /// A success: its result as JSON text and the token usage it reports.
    fn success(execution_ms: f64, result: String, usage: Option<Usage>) -> Self {
        Self {
            execution_ms,
            result,
            failure: None,
            usage,
            ttft_ms: None,
        }
    }

    /// An OpenAI response that succeeded, with the token usage it reports.
    fn succeeded(execution_ms: f64, response: Value) -> Self {
        let usage = crate::ti::openai::usage(&response);
        Self::success(execution_ms, response.to_string(), usage)
    }

    fn failed(execution_ms: f64, result: Value) -> Self {
        Self {
            execution_ms,
            failure: Some(failure_message(&result)),
            result: result.to_string(),
            usage: None,
            ttft_ms: None,
        }
    }

    /// An OpenAI-compatible TI's 2xx answer, stored as the TI sent it when it is a JSON
    /// object (checked, its `usage` read, the rest not parsed into a tree: see
    /// [`crate::ti::openai::checked_answer`]), parsed when it is other JSON, and a
    /// rejection when it is not JSON at all.
    pub(super) fn answered(execution_ms: f64, status: u16, body: &[u8]) -> Self {
        if let Some((text, usage)) = crate::ti::openai::checked_answer(body) {
            return Self::success(execution_ms, text.to_string(), usage);
        }
        match serde_json::from_slice(body) {
            Ok(other) => Self::succeeded(execution_ms, other),
            Err(_) => Self::rejected(execution_ms, status, upstream_body(body)),
        }
    }

    /// A streamed answer that ended well: what was put together of it (see
    /// [`crate::ti::openai::StreamAssembly`]) and the time to its first text.
    pub(super) fn streamed(execution_ms: f64, assembled: Value, ttft_ms: Option<f64>) -> Self {
        Self {
            ttft_ms,
            ..Self::succeeded(execution_ms, assembled)
        }
    }

    /// The scheduler gave the task up (its client left, its stream broke, nobody is left
    /// to answer): failed, with `{"error": message}`.
    pub(super) fn abandoned(execution_ms: f64, message: &str, ttft_ms: Option<f64>) -> Self {
        Self {
            ttft_ms,
            ..Self::failed(execution_ms, json!({ "error": message }))
        }
    }

    /// A TI refused the task itself (a 4xx other than 408 and 429, to a dispatch or to an
    /// OpenAI request): the task failed, with the TI's status and body (see
    /// [`crate::ti::upstream_body`]).
    pub(super) fn rejected(execution_ms: f64, status: u16, upstream: Value) -> Self {
        let detail = upstream
            .pointer("/error/message")
            .or_else(|| upstream.get("message"))
            .or_else(|| upstream.get("detail"))
            .and_then(Value::as_str)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        Self::failed(
            execution_ms,
            json!({
                "error": format!("the TI rejected the task with HTTP {status}{detail}"),
                "upstream_status": status,
                "upstream_body": upstream,
            }),
        )
    }
}

impl Scheduler {
    /// The TI's callback (`POST /result/submit`).
    ///
    /// The usual case is answered from memory: the task's prediction sits on the calling
    /// TI and the token is that TI's, so one UPDATE stores the result. Anything else (a
    /// late result from a TI the task was moved away from, an unknown task, a wrong token,
    /// a repeated callback) takes the checked path through the database.
    pub async fn accept_result(&self, callback: ResultCallback) -> Result<(), Error> {
        let task_id = TaskId::from_stored(callback.task_id.clone());
        let ti: Option<TiUuid> = callback.ti_uuid.parse().ok();
        let exec = callback.execution_time;
        let exec_ok = exec.is_finite() && exec >= 0.0;
        let expected = ti.filter(|ti| {
            let cache = self.cache();
            cache.holds(&task_id, *ti) && cache.token_matches(*ti, &callback.callback_token)
        });
        if let (Some(ti), true) = (expected, exec_ok) {
            // Not applied means it completed meanwhile: a repeat, answered as success.
            let finished = Finished::reported(exec, callback.result, callback.error);
            self.complete(&task_id, ti, finished).await?;
            return Ok(());
        }

        let task = self
            .task(&task_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("task '{}' not found", callback.task_id)))?;
        let forbidden = || {
            Error::Forbidden(format!(
                "ti_uuid '{}' with this callback_token is not a TaskInstance that task '{}' was dispatched to",
                callback.ti_uuid, callback.task_id
            ))
        };
        let ti = ti.ok_or_else(forbidden)?;
        let token_ok = self.cache().token_matches(ti, &callback.callback_token);
        if !token_ok || !DecisionRepo::was_chosen(&self.inner.db.read, &task_id, ti).await? {
            return Err(forbidden());
        }
        if task.status == TaskStatus::Completed {
            return Ok(());
        }
        if !exec_ok {
            return Err(Error::Invalid(format!(
                "execution_time must be a non-negative number of ms, got {exec}"
            )));
        }
        let finished = Finished::reported(exec, callback.result, callback.error);
        self.complete(&task_id, ti, finished).await?;
        Ok(())
    }

    /// Stores a task's outcome (the first one wins), learns from its execution time and
    /// takes its prediction off its TI. Returns false if it was already completed.
    pub(super) async fn complete(
        &self,
        task_id: &TaskId,
        ti: TiUuid,
        finished: Finished,
    ) -> Result<bool, Error> {
        self.finish(task_id, Some(ti), finished, Flush::OnCommit)
            .await
    }

    /// [`Self::complete`], for an outcome that may come from no TI at all (a front-door
    /// request given up before any TI answered), flushed to disk as `flush` says.
    pub(super) async fn finish(
        &self,
        task_id: &TaskId,
        ti: Option<TiUuid>,
        finished: Finished,
        flush: Flush,
    ) -> Result<bool, Error> {
        let Finished {
            execution_ms,
            result,
            failure,
            usage,
            ttft_ms,
        } = finished;
        let outcome = if failure.is_some() {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        };
        let completion_time = unix_now();
        let completion = Completion {
            result,
            outcome,
            execution_time_ms: execution_ms,
            completion_time,
            usage,
            result_ti: ti,
            ttft_ms,
        };
        let hardware = ti.and_then(|ti| self.cache().hardware(ti));
        let id = task_id.clone();
        let stored = self
            .inner
            .db
            .writer
            .run_flushed(flush, move |conn| {
                TaskRepo::complete(conn, &id, &completion)
            })
            .await?;
        let Some(stored) = stored else {
            return Ok(false);
        };
        let model = &stored.model_name;
        let metadata: Map<String, Value> = match outcome {
            Outcome::Succeeded => serde_json::from_str(&stored.metadata).unwrap_or_default(),
            Outcome::Failed => Map::new(),
        };
        let succeeded = (outcome == Outcome::Succeeded).then_some(Execution {
            model,
            hardware: hardware.as_deref(),
            metadata: &metadata,
            execution_ms,
        });
        self.cache().complete(task_id, succeeded);
        self.inner.waiters.notify(task_id);
        self.inner
            .events
            .publish(Event::task(task_id, model, TaskStatus::Completed, ti));
        let recorded = &self.inner.completions;
        recorded
            .completed
            .get(model, (ti, outcome), || {
                let ti_label = ti.map_or_else(|| "none".to_string(), |ti| ti.to_string());
                metrics::counter!(
                    telemetry::TASKS_COMPLETED,
                    "model" => model.clone(),
                    "ti" => ti_label,
                    "outcome" => outcome.as_str()
                )
            })
            .increment(1);
        recorded
            .latency
            .get(
                model,
                (),
                || metrics::histogram!(telemetry::TASK_LATENCY, "model" => model.clone()),
            )
            .record((completion_time - stored.submit_time).max(0.0));
        if outcome == Outcome::Succeeded && execution_ms > 0.0 {
            let error = (execution_ms - stored.predicted_ms).abs() / execution_ms;
            recorded
                .prediction_error
                .get(
                    model,
                    (),
                    || metrics::histogram!(telemetry::PREDICTION_ERROR, "model" => model.clone()),
                )
                .record(error);
        }
        if let Some(error) = failure {
            let address = ti.map_or_else(|| "none".to_string(), |ti| self.ti_address(ti));
            tracing::warn!(
                task_id = %task_id,
                model = %model,
                ti = %ti.map(|t| t.to_string()).unwrap_or_default(),
                ti_address = %address,
                error = %error,
                "task failed"
            );
        }
        Ok(true)
    }

    /// Saves what the predictor learned since the last flush (one write for all of it).
    pub(super) async fn flush_learning(&self) -> Result<(), Error> {
        let changed = self.cache().take_learned();
        if changed.stats.is_empty() && changed.models.is_empty() {
            return Ok(());
        }
        self.inner
            .db
            .writer
            .run(move |conn| {
                for stats in &changed.stats {
                    StatsRepo::save(conn, stats)?;
                }
                for learned in &changed.models {
                    LearnedRepo::save(conn, learned)?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }
}
