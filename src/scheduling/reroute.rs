//! Placing a task again: its TI failed, was removed or died, so the task gets a new
//! decision (the same [`Cache::place`](super::Cache) as a submit) and moves, or waits
//! `queued` with no TI until one of its model is usable.

use std::sync::Arc;

use tokio::time::Instant;

use super::cache::Placing;
use super::dispatch::{Payload, Step};
use super::events::Event;
use super::Scheduler;
use crate::domain::{unix_now, DecisionReason, TaskId, TiUuid};
use crate::store::{DecisionRepo, DecisionRow, TaskRepo};
use crate::telemetry;

impl Scheduler {
    /// Re-routes a task whose TI went away, reading it back from the database.
    pub(super) fn spawn_reroute(&self, task_id: TaskId) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            match TaskRepo::find_unfinished(&this.inner.db.read, &task_id).await {
                Ok(Some(task)) => {
                    match Payload::from_stored(task.model_name, task.task_input, task.metadata) {
                        Ok(p) => this.spawn_drive(task_id, Step::Reroute, Arc::new(p)),
                        Err(e) => {
                            tracing::error!(task_id = %task_id, error = %e, "cannot re-route")
                        }
                    }
                }
                Ok(None) => {
                    this.cache().release(&task_id);
                }
                Err(e) => {
                    tracing::error!(task_id = %task_id, error = ?e, "cannot read task to re-route")
                }
            }
        });
    }

    /// Chooses a new TI for an unfinished task and stores the decision. Returns the TI to
    /// dispatch to, or `None` if the task completed meanwhile or no TI is usable (it then
    /// waits, `queued`, for the sweep).
    pub(super) async fn reroute(&self, task_id: &TaskId, payload: &Payload) -> Option<TiUuid> {
        let (from, placement) = {
            let mut cache = self.cache();
            let from = cache.release(task_id);
            let placement = cache.place(&Placing {
                task_id,
                model: &payload.model,
                only: payload.only_kind(),
                metadata: &payload.metadata,
                reason: DecisionReason::Reroute,
                now: Instant::now(),
                decided_at: unix_now(),
            });
            (from, placement)
        };
        let chosen = placement.ti();
        let (status, mean, error) = (
            placement.status,
            placement.predicted_ms,
            placement.predicted_error_ms,
        );
        let id = task_id.clone();
        let moved = match placement.decision.map(DecisionRow::try_from).transpose() {
            Ok(decision) => {
                self.inner
                    .db
                    .writer
                    .run(move |conn| {
                        let moved = TaskRepo::reassign(conn, &id, chosen, status, mean, error)?;
                        if let (true, Some(d)) = (moved, &decision) {
                            DecisionRepo::insert(conn, d)?;
                        }
                        Ok(moved)
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match moved {
            Ok(true) => {
                self.inner
                    .events
                    .publish(Event::task(task_id, &payload.model, status, chosen));
                let from_address = from.map(|ti| self.ti_address(ti));
                let from = from.map(|ti| ti.to_string());
                match chosen {
                    Some(ti) => {
                        metrics::counter!(telemetry::REROUTES, "model" => payload.model.clone())
                            .increment(1);
                        tracing::info!(
                            task_id = %task_id,
                            model = %payload.model,
                            from_ti = from.as_deref(),
                            from_address = from_address.as_deref(),
                            ti = %ti,
                            ti_address = %self.ti_address(ti),
                            "task re-routed"
                        );
                    }
                    None => tracing::warn!(
                        task_id = %task_id,
                        model = %payload.model,
                        from_ti = from.as_deref(),
                        from_address = from_address.as_deref(),
                        "no usable TI; task waits"
                    ),
                }
                chosen
            }
            Ok(false) => {
                self.cache().release(task_id);
                None
            }
            Err(e) => {
                self.cache().release(task_id);
                tracing::error!(task_id = %task_id, error = ?e, "storing the re-route failed; the sweep retries");
                None
            }
        }
    }
}
