//! The scheduler's background work and its shutdown: start-up recovery followed by the
//! loop of health probes and sweeps, and the loop that saves what the predictor learns.
//! Every task the core spawns is tracked, so shutdown can wait for them.

use std::time::Duration;

use super::Scheduler;

/// How often the predictor's learned state is saved. It is derived data: a crash loses at
/// most this much learning, and `ti-scheduler retrain` rebuilds it from the history.
const LEARNING_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

impl Scheduler {
    /// Starts start-up recovery, then the loop of health probes and sweeps, and the loop
    /// that saves what the predictor learns.
    pub fn start_background(&self) {
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            let mut ticks = tokio::time::interval(LEARNING_FLUSH_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = ticks.tick() => false,
                    _ = this.inner.shutdown.cancelled() => true,
                };
                if let Err(e) = this.flush_learning().await {
                    tracing::warn!(error = ?e, "saving the learned predictor state failed; retried next time");
                }
                if stopping {
                    return;
                }
            }
        });
        let interval = Duration::from_millis(self.inner.settings.ti.health_interval_ms.max(10));
        let this = self.clone();
        self.inner.tracker.spawn(async move {
            if let Err(e) = this.recover().await {
                tracing::error!(error = ?e, "recovery failed; the sweeps will retry");
            }
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    _ = this.inner.shutdown.cancelled() => return,
                }
                this.probe_health().await;
                if let Err(e) = this.sweep().await {
                    tracing::error!(error = ?e, "sweep failed");
                }
            }
        });
    }

    /// Stops the background work and waits (a little) for dispatches under way. Tasks left
    /// `queued` are dispatched again at the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "background work still running at shutdown; it resumes at the next start"
            );
        }
        if let Err(e) = self.flush_learning().await {
            tracing::warn!(error = ?e, "saving the learned predictor state at shutdown failed");
        }
    }
}
