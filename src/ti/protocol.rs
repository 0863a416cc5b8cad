//! Wire types of the callback protocol (docs/API.md), shared by the scheduler and the simulator.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use utoipa::ToSchema;

/// `POST /queue/submit` on a TI: the scheduler hands it a task.
#[derive(Debug, Serialize)]
pub struct DispatchRequest<'a> {
    /// The task's id; the TI must dedupe on it.
    pub task_id: &'a str,
    /// The id the scheduler gave this TI.
    pub ti_uuid: String,
    /// The model asked for.
    pub model_name: &'a str,
    /// The client's input, passed through.
    pub task_input: &'a RawValue,
    /// The client's metadata (`{}` when none).
    pub metadata: &'a RawValue,
    /// Where to POST the result.
    pub callback_url: &'a str,
    /// Secret to echo in the callback.
    pub callback_token: &'a str,
}

/// What a TI receives in `POST /queue/submit`.
#[derive(Debug, Clone, Deserialize)]
pub struct ReceivedTask {
    /// The task's id.
    pub task_id: String,
    /// The scheduler's id for this TI.
    pub ti_uuid: String,
    /// The model asked for.
    #[serde(default)]
    pub model_name: String,
    /// The client's input.
    #[serde(default)]
    pub task_input: Value,
    /// The client's metadata.
    #[serde(default)]
    pub metadata: Value,
    /// Where to POST the result.
    pub callback_url: String,
    /// Secret to echo in the callback.
    pub callback_token: String,
}

/// A task's state on a TI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TiTaskStatus {
    /// Waiting on the TI.
    Queued,
    /// Executing.
    Running,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
}

/// `GET /results/{task_id}` on a TI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TiTaskReport {
    /// The task's id.
    pub task_id: String,
    /// Where it is.
    pub status: TiTaskStatus,
    /// The result, once completed.
    #[serde(default)]
    pub result: Option<Value>,
    /// The error, once failed.
    #[serde(default)]
    pub error: Option<String>,
    /// ms, once finished.
    #[serde(default)]
    pub execution_time: Option<f64>,
}

/// `POST /result/submit` on the scheduler: a TI reports a finished task.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResultCallback {
    /// The task's id.
    #[schema(min_length = 1)]
    pub task_id: String,
    /// The reporting TI's id, as given at dispatch.
    #[schema(min_length = 1)]
    pub ti_uuid: String,
    /// The TI's callback token, as given at dispatch.
    #[schema(min_length = 1)]
    pub callback_token: String,
    /// Execution time measured by the TI, ms.
    pub execution_time: f64,
    /// The result, on success.
    #[serde(default)]
    pub result: Option<Value>,
    /// What went wrong, on failure.
    #[serde(default)]
    pub error: Option<String>,
}
