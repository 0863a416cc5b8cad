//! A scheduling decision: why it was made, every candidate TI with the estimates it had,
//! and the choice. The scheduling core makes them; the store keeps them.

use serde::Serialize;

use super::{TaskId, TiUuid};

/// Why a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionReason {
    /// The task was submitted.
    Submit,
    /// Its TI failed or went away and it was moved.
    Reroute,
}

impl DecisionReason {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Reroute => "reroute",
        }
    }
}

/// A TI that was considered, with the estimates it had at that moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// The TI.
    pub ti_uuid: TiUuid,
    /// Its expected wait, ms.
    pub wait_ms: f64,
    /// The error of that wait, ms.
    pub wait_error_ms: f64,
    /// Tasks dispatched to it and not completed.
    pub queue_length: usize,
    /// This task's predicted execution time there, ms.
    pub predicted_ms: f64,
    /// The error of that prediction, ms.
    pub predicted_error_ms: f64,
    /// Which predictor gave it.
    pub prediction_source: &'static str,
    /// The strategy's score (lower is better; for round_robin the position in the cycle).
    pub score: f64,
}

/// A decision about to be stored.
#[derive(Debug, Clone)]
pub struct NewDecision {
    /// The task.
    pub task_id: TaskId,
    /// Unix seconds.
    pub decided_at: f64,
    /// Why.
    pub reason: DecisionReason,
    /// Strategy name.
    pub strategy: &'static str,
    /// Predict mode name.
    pub predict_mode: &'static str,
    /// Prediction on the chosen TI, ms.
    pub predicted_ms: f64,
    /// Its error, ms.
    pub predicted_error_ms: f64,
    /// Which predictor gave it.
    pub prediction_source: &'static str,
    /// lookup_table mode found no row and the default chain answered.
    pub lookup_fallback: bool,
    /// The TI chosen.
    pub chosen_ti: TiUuid,
    /// Every TI considered.
    pub candidates: Vec<Candidate>,
}
