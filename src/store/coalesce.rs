//! Coalescing the hot-path writes: every submit, dispatch acceptance and completion
//! waiting at a moment becomes one statement, not one per request.
//!
//! Each kind of write has a [`Coalescer`]: a small task that takes every request waiting
//! in its channel and hands them to the group-commit [`Writer`] as one write, whose SQL
//! reads all the rows from one JSON array (`json_each`). While a batch commits, the next
//! one gathers; so at 10 000 submits/s a commit carries hundreds of tasks in a handful of
//! statements. Every caller is answered after the commit, as with the writer itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};
use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot};

use super::{Completion, NewDecision, NewTask, StoreError, Writer};
use crate::domain::{TaskId, TiUuid};

/// One write over a batch of items: its output has one entry per item, in order.
pub type BatchWrite<O> = Box<
    dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<Vec<O>, StoreError>>
        + Send,
>;

type Request<I, O> = (I, oneshot::Sender<Result<O, StoreError>>);

/// Gathers concurrent requests of one kind into one write per batch.
pub struct Coalescer<I, O> {
    requests: mpsc::Sender<Request<I, O>>,
}

impl<I, O> Clone for Coalescer<I, O> {
    fn clone(&self) -> Self {
        Self {
            requests: self.requests.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// Starts the coalescing task; `write` turns a batch of items into one write.
    pub fn spawn(
        writer: Writer,
        max_batch: usize,
        write: impl Fn(Vec<I>) -> BatchWrite<O> + Send + 'static,
    ) -> Self {
        let max_batch = max_batch.max(1);
        let (requests, mut rx) = mpsc::channel::<Request<I, O>>(max_batch * 4);
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut waiting, max_batch).await > 0 {
                let (items, replies): (Vec<I>, Vec<_>) = waiting.drain(..).unzip();
                let expected = items.len();
                match writer.run(write(items)).await {
                    Ok(outputs) if outputs.len() == expected => {
                        for (output, reply) in outputs.into_iter().zip(replies) {
                            let _ = reply.send(Ok(output));
                        }
                    }
                    Ok(outputs) => {
                        let e = Arc::new(StoreError::Corrupt(format!(
                            "a batch write answered {} of {expected} items",
                            outputs.len()
                        )));
                        for reply in replies {
                            let _ = reply.send(Err(StoreError::Batch(e.clone())));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for reply in replies {
                            let _ = reply.send(Err(StoreError::Batch(e.clone())));
                        }
                    }
                }
            }
        });
        Self { requests }
    }

    /// Writes one item with the next batch; answers after its commit.
    pub async fn run(&self, item: I) -> Result<O, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((item, tx))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }
}

/// One submit request's rows: its tasks, each with its decision (if a TI was chosen).
pub type SubmitRows = Vec<(NewTask, Option<NewDecision>)>;

/// Inserts the tasks of many submits and their decisions: two statements per batch.
/// Each submit learns, per task, whether it was inserted (false: the id existed).
pub fn insert_submits(batch: Vec<SubmitRows>) -> BatchWrite<Vec<bool>> {
    Box::new(move |conn| {
        Box::pin(async move {
            let tasks: Vec<Value> = batch
                .iter()
                .flatten()
                .map(|(t, _)| {
                    json!({
                        "task_id": t.task_id.as_str(),
                        "model_name": t.model_name,
                        "task_input": t.task_input,
                        "metadata": t.metadata,
                        "ti_uuid": t.ti_uuid.map(|u| u.to_string()),
                        "predicted_ms": t.predicted_ms,
                        "predicted_error_ms": t.predicted_error_ms,
                        "submit_time": t.submit_time,
                    })
                })
                .collect();
            let tasks = Value::Array(tasks).to_string();
            let inserted: HashSet<String> = sqlx::query_scalar!(
                r#"INSERT INTO tasks (task_id, model_name, task_input, metadata, status, ti_uuid,
                                      predicted_ms, predicted_error_ms, submit_time)
                   SELECT j.value ->> 'task_id', j.value ->> 'model_name', j.value ->> 'task_input',
                          j.value ->> 'metadata', 'queued', j.value ->> 'ti_uuid',
                          j.value ->> 'predicted_ms', j.value ->> 'predicted_error_ms',
                          j.value ->> 'submit_time'
                   FROM json_each(?) AS j WHERE true
                   ON CONFLICT (task_id) DO NOTHING
                   RETURNING task_id AS "task_id!: String""#,
                tasks
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();

            // A repeated id is new only where it first appears.
            let mut claimed = HashSet::new();
            let mut decisions = Vec::new();
            let answers: Vec<Vec<bool>> = batch
                .iter()
                .map(|rows| {
                    rows.iter()
                        .map(|(t, d)| {
                            let new = inserted.contains(t.task_id.as_str())
                                && claimed.insert(t.task_id.as_str());
                            if let (true, Some(d)) = (new, d) {
                                decisions.push(decision_json(d));
                            }
                            new
                        })
                        .collect()
                })
                .collect();
            if !decisions.is_empty() {
                let decisions = Value::Array(decisions).to_string();
                sqlx::query!(
                    "INSERT INTO decisions (task_id, decided_at, reason, strategy, predict_mode,
                                            predicted_ms, predicted_error_ms, prediction_source,
                                            lookup_fallback, chosen_ti, candidates)
                     SELECT j.value ->> 'task_id', j.value ->> 'decided_at', j.value ->> 'reason',
                            j.value ->> 'strategy', j.value ->> 'predict_mode',
                            j.value ->> 'predicted_ms', j.value ->> 'predicted_error_ms',
                            j.value ->> 'prediction_source', j.value ->> 'lookup_fallback',
                            j.value ->> 'chosen_ti', j.value -> 'candidates'
                     FROM json_each(?) AS j",
                    decisions
                )
                .execute(&mut *conn)
                .await?;
            }
            Ok(answers)
        })
    })
}

/// A decision as one element of the JSON array `insert_submits` reads.
fn decision_json(d: &NewDecision) -> Value {
    json!({
        "task_id": d.task_id.as_str(),
        "decided_at": d.decided_at,
        "reason": d.reason.as_str(),
        "strategy": d.strategy,
        "predict_mode": d.predict_mode,
        "predicted_ms": d.predicted_ms,
        "predicted_error_ms": d.predicted_error_ms,
        "prediction_source": d.prediction_source,
        "lookup_fallback": i64::from(d.lookup_fallback),
        "chosen_ti": d.chosen_ti.to_string(),
        "candidates": d.candidates,
    })
}

/// A TI accepted a task at a Unix time.
pub type Accepted = (TaskId, TiUuid, f64);

/// Marks many tasks `scheduled`: one statement per batch. Each learns whether it was
/// still queued for that TI (false: completed or re-routed meanwhile).
pub fn mark_scheduled(batch: Vec<Accepted>) -> BatchWrite<bool> {
    Box::new(move |conn| {
        Box::pin(async move {
            let rows: Vec<Value> = batch
                .iter()
                .map(|(id, ti, at)| json!({"task_id": id.as_str(), "ti": ti.to_string(), "at": at}))
                .collect();
            let rows = Value::Array(rows).to_string();
            let marked: HashSet<String> = sqlx::query_scalar!(
                r#"UPDATE tasks SET status = 'scheduled', dispatch_time = j.value ->> 'at'
                   FROM json_each(?) AS j
                   WHERE tasks.task_id = j.value ->> 'task_id' AND tasks.status = 'queued'
                     AND tasks.ti_uuid = j.value ->> 'ti'
                   RETURNING tasks.task_id AS "task_id!: String""#,
                rows
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
            Ok(batch
                .iter()
                .map(|(id, ..)| marked.contains(id.as_str()))
                .collect())
        })
    })
}

/// Stores many results: one statement per batch. Each learns the task's model and
/// metadata if its result was stored, `None` if the task was unknown or already completed
/// (the first result wins; within one batch, the first of the batch).
pub fn complete(batch: Vec<(TaskId, Completion)>) -> BatchWrite<Option<(String, String)>> {
    Box::new(move |conn| {
        Box::pin(async move {
            // One row per task: a repeat in the same batch is a repeat.
            let mut seen = HashSet::new();
            let rows: Vec<Value> = batch
                .iter()
                .filter(|(id, _)| seen.insert(id.as_str()))
                .map(|(id, c)| {
                    json!({
                        "task_id": id.as_str(),
                        "result": c.result,
                        "outcome": c.outcome.as_str(),
                        "execution_time_ms": c.execution_time_ms,
                        "completion_time": c.completion_time,
                    })
                })
                .collect();
            let rows = Value::Array(rows).to_string();
            let mut stored: HashMap<String, (String, String)> = sqlx::query!(
                r#"UPDATE tasks SET status = 'completed', result = j.value -> 'result',
                                    outcome = j.value ->> 'outcome',
                                    execution_time_ms = j.value ->> 'execution_time_ms',
                                    completion_time = j.value ->> 'completion_time'
                   FROM json_each(?) AS j
                   WHERE tasks.task_id = j.value ->> 'task_id' AND tasks.status <> 'completed'
                   RETURNING tasks.task_id AS "task_id!: String",
                             tasks.model_name AS "model_name!: String",
                             tasks.metadata AS "metadata!: String""#,
                rows
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|r| (r.task_id, (r.model_name, r.metadata)))
            .collect();
            Ok(batch
                .iter()
                .map(|(id, _)| stored.remove(id.as_str()))
                .collect())
        })
    })
}
