//! A client's submit: each task is placed on a TI under the cache lock, once admission
//! control admits it (`admission.rs`); all of them are committed with their decisions in
//! one transaction (all or nothing), and each is then handed to a dispatcher. One refused
//! task refuses the whole submit, before anything is stored. A client `task_id` makes the
//! submit idempotent. While the service drains, a submit that would create a task is
//! refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::{to_raw_value, RawValue};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::admission::{Ask, Refusal};
use super::cache::Placing;
use super::dispatch::{Payload, Step};
use super::events::Event;
use super::{Error, Scheduler};
use crate::domain::{unix_now, DecisionReason, NewDecision, Origin, TaskId, TaskStatus, TiUuid};
use crate::store::{DecisionRow, NewTask, StoreError, TaskRepo};
use crate::telemetry;

/// Tasks of a batch placed per hold of the cache lock.
const PLACE_CHUNK: usize = 64;

/// A task of a submit.
#[derive(Debug, Clone)]
pub struct SubmitItem {
    /// The client's idempotency key, if any.
    pub task_id: Option<TaskId>,
    /// The client's input, as JSON.
    pub task_input: Box<RawValue>,
    /// The client's metadata.
    pub metadata: Map<String, Value>,
    /// Its `metadata.deadline_ms` (see [`deadline_of`](super::deadline_of)): refused
    /// unless its predicted completion fits in it.
    pub deadline_ms: Option<f64>,
}

/// What a submit answers for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The task's id.
    pub task_id: TaskId,
    /// The TI chosen for it, if one is usable.
    pub scheduled_ti: Option<TiUuid>,
}

/// The submit's items sorted out by their client ids.
struct Sorted {
    /// Answers known already: items whose client id names a stored task.
    answers: Vec<Option<Submitted>>,
    /// Items to create, by index.
    fresh: Vec<usize>,
    /// (item, earlier item with the same client id) inside this submit.
    repeats: Vec<(usize, usize)>,
}

impl Scheduler {
    /// Submits tasks for `model`: chooses a TI for each, commits them all in one
    /// transaction (all or nothing), then dispatches them. A client `task_id` that exists
    /// already answers that task and creates nothing.
    pub async fn submit(
        &self,
        model: &str,
        mut items: Vec<SubmitItem>,
    ) -> Result<Vec<Submitted>, Error> {
        if self.cache().serves_openai(model) {
            // The predictor's features of an OpenAI request come from its body,
            // and are kept with the task so that retraining sees what was known at submit.
            for item in &mut items {
                if let Ok(body) = serde_json::from_str(item.task_input.get()) {
                    crate::ti::openai::add_features(&body, &mut item.metadata);
                }
            }
        }
        let Sorted {
            mut answers,
            fresh,
            repeats,
        } = self.sort_by_client_id(&items).await?;
        let rows = if fresh.is_empty() {
            Vec::new()
        } else {
            self.place_all(model, &items, &fresh).await?
        };
        // What dispatching needs afterwards; the rows themselves go to the writer.
        let placed: Vec<(TaskId, Option<TiUuid>, TaskStatus)> = rows
            .iter()
            .map(|(t, _)| (t.task_id.clone(), t.ti_uuid, t.status))
            .collect();
        let inserted = match self.commit(rows).await {
            Ok(flags) => flags,
            Err(e) => {
                let mut cache = self.cache();
                for (task_id, ..) in &placed {
                    cache.release(task_id);
                }
                return Err(e.into());
            }
        };
        for ((task_id, ti, status), (&i, new)) in placed.into_iter().zip(fresh.iter().zip(inserted))
        {
            answers[i] = Some(if new {
                self.hand_off(model, &items[i], (task_id, ti, status))
            } else {
                // A concurrent submit of the same client id won the race: answer with it.
                self.cache().release(&task_id);
                self.stored_answer(&task_id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt(format!("task {task_id} vanished")))?
            });
        }
        for (i, first) in repeats {
            answers[i] = answers[first].clone();
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Answers the items whose client id names a stored task, and finds the repeats of a
    /// client id inside this submit.
    async fn sort_by_client_id(&self, items: &[SubmitItem]) -> Result<Sorted, Error> {
        let mut answers: Vec<Option<Submitted>> = vec![None; items.len()];
        let mut first_with_id: HashMap<&TaskId, usize> = HashMap::new();
        let mut repeats = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(id) = &item.task_id else { continue };
            if let Some(&first) = first_with_id.get(id) {
                repeats.push((i, first));
                continue;
            }
            first_with_id.insert(id, i);
            answers[i] = self.stored_answer(id).await?;
        }
        let repeated: HashSet<usize> = repeats.iter().map(|(r, _)| *r).collect();
        let fresh = (0..items.len())
            .filter(|&i| answers[i].is_none() && !repeated.contains(&i))
            .collect();
        Ok(Sorted {
            answers,
            fresh,
            repeats,
        })
    }

    /// The answer for a stored task, if there is one by that id.
    async fn stored_answer(&self, id: &TaskId) -> Result<Option<Submitted>, Error> {
        Ok(TaskRepo::find(&self.inner.db.read, id)
            .await?
            .map(|existing| Submitted {
                task_id: existing.task_id,
                scheduled_ti: existing.ti_uuid,
            }))
    }

    /// Places the fresh items, [`PLACE_CHUNK`] per hold of the cache lock: a batch gives
    /// the lock back between chunks, so single submits are placed in between instead of
    /// waiting for the whole batch. A refused item takes back what the others reserved.
    async fn place_all(
        &self,
        model: &str,
        items: &[SubmitItem],
        fresh: &[usize],
    ) -> Result<Vec<(NewTask, Option<NewDecision>)>, Error> {
        let now = Instant::now();
        let submit_time = unix_now();
        let limits = self.inner.settings.admission;
        let mut rows: Vec<(NewTask, Option<NewDecision>)> = Vec::with_capacity(fresh.len());
        for (c, chunk) in fresh.chunks(PLACE_CHUNK).enumerate() {
            if c > 0 {
                tokio::task::yield_now().await;
            }
            let mut cache = self.cache();
            if c == 0 && self.is_draining() {
                return Err(Error::Draining);
            }
            if c == 0 && !cache.serves(model) {
                return Err(Error::NoInstance(format!(
                    "no TaskInstance is registered for model '{model}'"
                )));
            }
            for &i in chunk {
                let item = &items[i];
                let task_id = item.task_id.clone().unwrap_or_else(TaskId::generate);
                let ask = Ask {
                    limits,
                    deadline_ms: item.deadline_ms,
                    index: i,
                };
                let task = Placing {
                    task_id: &task_id,
                    model,
                    only: None,
                    metadata: &item.metadata,
                    reason: DecisionReason::Submit,
                    now,
                    decided_at: submit_time,
                };
                let placed = cache.admit(&task, &ask);
                let placement = match placed {
                    Ok(p) => p,
                    Err(refusal) => {
                        for (task, _) in &rows {
                            cache.release(&task.task_id);
                        }
                        drop(cache);
                        return Err(refused(refusal));
                    }
                };
                let task = NewTask {
                    task_id,
                    model_name: model.to_string(),
                    task_input: item.task_input.get().to_string(),
                    metadata: serialized_object(&item.metadata),
                    ti_uuid: placement.ti(),
                    status: placement.status,
                    predicted_ms: placement.predicted_ms,
                    predicted_error_ms: placement.predicted_error_ms,
                    submit_time,
                    origin: Origin::Queue,
                };
                rows.push((task, placement.decision));
            }
        }
        Ok(rows)
    }

    /// Commits the tasks and their decisions in one transaction. Returns, per task,
    /// whether it was inserted (false: its client id exists already).
    pub(super) async fn commit(
        &self,
        rows: Vec<(NewTask, Option<NewDecision>)>,
    ) -> Result<Vec<bool>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let rows = rows
            .into_iter()
            .map(|(t, d)| Ok((t, d.map(DecisionRow::try_from).transpose()?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.inner
            .db
            .writer
            .run(move |conn| TaskRepo::insert_submit(conn, &rows))
            .await
    }

    /// A committed task: counted, answered, and sent to its TI if it has one.
    fn hand_off(
        &self,
        model: &str,
        item: &SubmitItem,
        (task_id, ti, status): (TaskId, Option<TiUuid>, TaskStatus),
    ) -> Submitted {
        metrics::counter!(telemetry::SUBMITS).increment(1);
        self.inner
            .events
            .publish(Event::task(&task_id, model, status, ti));
        let answer = Submitted {
            task_id: task_id.clone(),
            scheduled_ti: ti,
        };
        if let Some(ti) = ti {
            // Written straight into raw JSON, as the front door does: not parsed back.
            match to_raw_value(&item.metadata) {
                Ok(metadata_raw) => {
                    let payload = Arc::new(Payload {
                        model: model.to_string(),
                        task_input: item.task_input.clone(),
                        metadata_raw,
                        metadata: item.metadata.clone(),
                        reply: None,
                    });
                    self.spawn_drive(task_id, Step::Dispatch(ti), payload);
                }
                // Cannot happen (we serialized it); the sweep would dispatch it.
                Err(e) => tracing::error!(error = %e, "metadata did not serialize"),
            }
        }
        answer
    }
}

/// A task refused by admission control, counted by model and reason.
pub(super) fn refused(refusal: Refusal) -> Error {
    metrics::counter!(
        telemetry::ADMISSION_REJECTIONS,
        "model" => refusal.model.clone(),
        "reason" => refusal.reason.as_str()
    )
    .increment(1);
    Error::Overloaded(refusal)
}

/// A JSON object as text, without copying it first.
pub(super) fn serialized_object(map: &Map<String, Value>) -> String {
    // Serializing a map of JSON values cannot fail (keys are strings).
    serde_json::to_string(map).unwrap_or_else(|_| "{}".to_string())
}
