//! Settling the unfinished tasks that nobody is driving, from where the database says
//! they stand: at start-up every one of them ([`Scheduler::recover`]), and then on every
//! sweep the queued ones (after a failed write, or waiting for a usable TI) and the
//! scheduled ones whose callback is overdue. A scheduled task is first checked with its
//! TI (`GET /results/{id}`): finished there → its outcome is stored; queued or running →
//! kept; unknown → sent again (TIs dedupe by task id).

use futures::StreamExt;

use super::complete::Finished;
use super::dispatch::{Payload, Step};
use super::proxy::RESTARTED;
use super::{Error, Scheduler};
use crate::domain::{unix_now, Origin, TaskStatus, TiKind, TiUuid};
use crate::store::{Flush, TaskRepo, UnfinishedTask};
use crate::ti::protocol::TiTaskStatus;

/// Reconciliations in flight at once during start-up recovery.
const RECOVERY_CONCURRENCY: usize = 64;

/// What start-up recovery did, for its one-line summary.
#[derive(Debug, Default, Clone, PartialEq)]
struct RecoveryReport {
    /// Unfinished tasks found in the database.
    unfinished: usize,
    /// Finished on their TI while we were down: outcome stored.
    stored: usize,
    /// Still queued or running on their TI.
    kept: usize,
    /// Sent to their TI (again).
    sent: usize,
    /// Moved to another TI.
    rerouted: usize,
    /// No usable TI for their model yet.
    waiting: usize,
    /// Front-door requests left unanswered: failed (their client is gone).
    unanswered: usize,
    /// Left for the sweeps (unreadable, or driven by someone else).
    skipped: usize,
}

/// What settling one unfinished task did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Stored,
    Kept,
    Sent,
    Rerouted,
    Waiting,
    Unanswered,
    Unreachable,
    Skipped,
}

/// What a TI said of a task.
enum Asked {
    Finished,
    Running,
    Unknown,
    Unreachable,
}

impl Scheduler {
    /// Start-up recovery: settles every unfinished task with its TI (finished → stored;
    /// queued or running there → kept; unknown there → sent again; TI unreachable →
    /// re-routed; queued → dispatched) and logs a one-line summary.
    pub(super) async fn recover(&self) -> Result<(), Error> {
        let started = std::time::Instant::now();
        let tasks = TaskRepo::unfinished(&self.inner.db.read).await?;
        let mut report = RecoveryReport {
            unfinished: tasks.len(),
            ..RecoveryReport::default()
        };
        let settled: Vec<Settled> = futures::stream::iter(tasks)
            .map(|task| self.settle(task, true))
            .buffer_unordered(RECOVERY_CONCURRENCY)
            .collect()
            .await;
        for s in settled {
            match s {
                Settled::Stored => report.stored += 1,
                Settled::Kept => report.kept += 1,
                Settled::Sent => report.sent += 1,
                Settled::Rerouted => report.rerouted += 1,
                Settled::Waiting => report.waiting += 1,
                Settled::Unanswered => report.unanswered += 1,
                Settled::Unreachable | Settled::Skipped => report.skipped += 1,
            }
        }
        tracing::info!(
            unfinished = report.unfinished,
            results_recovered = report.stored,
            still_running = report.kept,
            sent_again = report.sent,
            rerouted = report.rerouted,
            waiting_for_a_ti = report.waiting,
            front_door_failed = report.unanswered,
            skipped = report.skipped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery done"
        );
        Ok(())
    }

    /// One pass over the unfinished tasks: drives in the background what nobody drives:
    /// queued tasks (after a failed write, or waiting for a usable TI) and scheduled
    /// tasks whose callback is overdue.
    pub(super) async fn sweep(&self) -> Result<(), Error> {
        let tasks = TaskRepo::unfinished(&self.inner.db.read).await?;
        let overdue_before = unix_now() - self.inner.settings.ti.reconcile_after_ms as f64 / 1000.0;
        for task in tasks {
            if self.inner.in_flight.contains(&task.task_id) {
                continue;
            }
            // An OpenAI-compatible TI's task is driven from its commit to its answer;
            // one nobody drives (its answer could not be stored) is sent again.
            let waits_for_a_slot = self.is_openai(task.ti_uuid);
            let due = match task.status {
                // A front-door request nobody drives: its answer could not be stored.
                _ if task.origin == Origin::Openai => true,
                TaskStatus::Queued | TaskStatus::Scheduled if waits_for_a_slot => {
                    self.any_usable(&task)
                }
                TaskStatus::Queued => self.any_usable(&task),
                TaskStatus::Scheduled => task.dispatch_time.is_some_and(|t| t < overdue_before),
                TaskStatus::Completed => false,
            };
            if !due {
                continue;
            }
            let this = self.clone();
            self.inner.tracker.spawn(async move {
                this.settle(task, false).await;
            });
        }
        Ok(())
    }

    /// True if the task's TI is OpenAI-compatible.
    fn is_openai(&self, ti: Option<TiUuid>) -> bool {
        ti.and_then(|ti| self.cache().kind(ti)) == Some(TiKind::Openai)
    }

    /// True if the task's TI, or another of its model, is usable.
    fn any_usable(&self, task: &UnfinishedTask) -> bool {
        let (usable_ti, model_usable) = self.cache().usability(task.ti_uuid, &task.model_name);
        usable_ti.is_some() || model_usable
    }

    /// Runs [`Scheduler::sweep`] in the background.
    pub(super) fn spawn_sweep(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            if let Err(e) = this.sweep().await {
                tracing::error!(error = ?e, "sweep failed");
            }
        });
    }

    /// Drives one unfinished task from where the database says it stands: a scheduled
    /// task is first checked with its TI (`GET /results/{id}`); a queued one is sent to
    /// its TI, or re-routed when that TI is not usable. `reroute_unreachable` moves a
    /// scheduled task whose TI does not answer (start-up); otherwise the health probes
    /// decide. Does nothing if someone else is driving the task.
    async fn settle(&self, task: UnfinishedTask, reroute_unreachable: bool) -> Settled {
        let task_id = task.task_id.clone();
        if !self.inner.in_flight.begin(&task_id) {
            return Settled::Skipped;
        }
        let settled = self.settle_in_flight(task, reroute_unreachable).await;
        self.inner.in_flight.end(&task_id);
        settled
    }

    async fn settle_in_flight(&self, task: UnfinishedTask, reroute_unreachable: bool) -> Settled {
        if task.origin == Origin::Openai {
            return self.fail_unanswered(&task, reroute_unreachable).await;
        }
        let step = match (task.status, task.ti_uuid) {
            // A callback TI knows what became of a task it accepted; an OpenAI-compatible
            // TI's request died with the connection, so its task is sent again.
            (TaskStatus::Scheduled, Some(ti)) if !self.is_openai(Some(ti)) => {
                match self.ask_ti(&task, ti).await {
                    Asked::Finished => return Settled::Stored,
                    Asked::Running => return Settled::Kept,
                    // The TI never saw it (it restarted, or the dispatch was lost).
                    Asked::Unknown => Step::Dispatch(ti),
                    Asked::Unreachable if reroute_unreachable => {
                        self.mark_unhealthy(ti, "unreachable during recovery");
                        Step::Reroute
                    }
                    Asked::Unreachable => return Settled::Unreachable,
                }
            }
            _ => {
                let (usable_ti, model_usable) =
                    self.cache().usability(task.ti_uuid, &task.model_name);
                match usable_ti {
                    Some(ti) => Step::Dispatch(ti),
                    None if model_usable => Step::Reroute,
                    None => return Settled::Waiting,
                }
            }
        };
        let payload = match Payload::from_stored(task.model_name, task.task_input, task.metadata) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(task_id = %task.task_id, error = %e, "cannot dispatch");
                return Settled::Skipped;
            }
        };
        self.drive(&task.task_id, step, &payload).await;
        match step {
            Step::Dispatch(_) => Settled::Sent,
            Step::Reroute => Settled::Rerouted,
        }
    }

    /// A front-door request that nobody drives (after a restart, or when its answer
    /// could not be stored): its client is gone, so it is completed as failed rather than
    /// sent again.
    async fn fail_unanswered(&self, task: &UnfinishedTask, at_start: bool) -> Settled {
        let reason = if at_start {
            RESTARTED
        } else {
            "the answer could not be stored"
        };
        let finished = Finished::abandoned(0.0, reason, None);
        match self
            .finish(&task.task_id, None, finished, Flush::OnCommit)
            .await
        {
            Ok(_) => Settled::Unanswered,
            Err(e) => {
                tracing::error!(task_id = %task.task_id, error = ?e, "storing the failure failed");
                Settled::Skipped
            }
        }
    }

    /// Asks the TI what became of a scheduled task; stores the outcome if it is finished.
    async fn ask_ti(&self, task: &UnfinishedTask, ti: TiUuid) -> Asked {
        let Some((host, port)) = self.cache().address(ti) else {
            return Asked::Unknown;
        };
        let report = match self
            .inner
            .client
            .task_report(&host, port, task.task_id.as_str())
            .await
        {
            Ok(Some(report)) => report,
            Ok(None) => return Asked::Unknown,
            Err(e) => {
                tracing::debug!(task_id = %task.task_id, ti = %ti, error = %e, "reconciliation failed");
                return Asked::Unreachable;
            }
        };
        let error = match report.status {
            TiTaskStatus::Queued | TiTaskStatus::Running => return Asked::Running,
            TiTaskStatus::Completed => None,
            TiTaskStatus::Failed => Some(
                report
                    .error
                    .unwrap_or_else(|| "the TI reported the task failed".into()),
            ),
        };
        let exec = report.execution_time.unwrap_or(0.0);
        let finished = Finished::reported(exec, report.result, error);
        match self.complete(&task.task_id, ti, finished).await {
            Ok(_) => {
                tracing::info!(task_id = %task.task_id, ti = %ti, "result recovered from the TI");
                Asked::Finished
            }
            Err(e) => {
                tracing::error!(task_id = %task.task_id, error = ?e, "storing a recovered result failed");
                Asked::Unreachable
            }
        }
    }
}
