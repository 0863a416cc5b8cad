//! The drain before a shutdown (`POST /admin/drain`, SIGTERM, Ctrl-C): from then on a
//! submit that would create a task is refused (503, `submit.rs`) and `/ready` answers 503,
//! so a load balancer moves away, while everything already accepted goes on: dispatches,
//! re-routes, result callbacks, the sweep. A shutdown then waits, up to its grace, until
//! no task is unfinished. A drain is never undone: the process is on its way out.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Error, Scheduler};
use crate::store::TaskRepo;
use crate::telemetry;

/// Least time between two counts of the unfinished tasks while a shutdown waits: each
/// completion wakes the wait, and under load they come by the thousand per second.
const RECOUNT_AFTER: Duration = Duration::from_millis(50);

/// Longest time between two counts: a task can also leave by a path that publishes no
/// event.
const RECOUNT_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

impl Scheduler {
    /// Starts draining. Returns false if the service was draining already.
    pub fn drain(&self) -> bool {
        let first = !self.inner.draining.swap(true, Ordering::SeqCst);
        if first {
            metrics::gauge!(telemetry::DRAINING).set(1.0);
            tracing::info!("draining: new tasks are refused and /ready answers 503");
        }
        first
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    /// Tasks stored and not completed (with a TI or waiting for one).
    pub async fn unfinished_tasks(&self) -> Result<u64, Error> {
        Ok(TaskRepo::count_unfinished(&self.inner.db.read).await?)
    }

    /// Drains, then waits until no task is unfinished or `grace` has passed. Says how it
    /// ended in the log; what is left unfinished resumes at the next start.
    pub async fn drain_within(&self, grace: Duration) {
        self.drain();
        let grace_ms = grace.as_millis() as u64;
        if grace.is_zero() {
            tracing::info!("no shutdown grace (server.shutdown_grace_ms = 0): stopping now");
            return;
        }
        match tokio::time::timeout(grace, self.all_finished()).await {
            Ok(()) => tracing::info!("drained: every task has finished"),
            Err(_) => match self.unfinished_tasks().await {
                Ok(left) => tracing::warn!(
                    unfinished = left,
                    grace_ms,
                    "shutdown grace expired (server.shutdown_grace_ms): the unfinished tasks resume at the next start"
                ),
                Err(e) => tracing::warn!(grace_ms, error = ?e, "shutdown grace expired"),
            },
        }
    }

    /// Completes when no task is unfinished: counted again after each event (a
    /// completion publishes one), at most every [`RECOUNT_AFTER`].
    async fn all_finished(&self) {
        let mut first = true;
        loop {
            let seen = self.inner.events.last_id();
            match self.unfinished_tasks().await {
                Ok(0) => return,
                Ok(n) if first => {
                    tracing::info!(unfinished = n, "draining: waiting for the unfinished tasks")
                }
                Ok(n) => tracing::debug!(unfinished = n, "draining"),
                Err(e) => tracing::warn!(error = ?e, "counting the unfinished tasks failed"),
            }
            first = false;
            let _ =
                tokio::time::timeout(RECOUNT_AT_LEAST_EVERY, self.inner.events.wait_after(seen))
                    .await;
            tokio::time::sleep(RECOUNT_AFTER).await;
        }
    }
}
