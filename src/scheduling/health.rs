//! TI health: a TI whose dispatches fail or whose probe (`GET /health`) fails gets no new
//! tasks; after `ti.reroute_after_failed_probes` failed probes in a row its tasks move
//! elsewhere; a probe that succeeds brings it back, and the tasks waiting for a usable TI
//! are swept to it.

use super::Scheduler;
use crate::domain::TiUuid;

impl Scheduler {
    /// Takes a TI out of scheduling until a health probe succeeds.
    pub(super) fn mark_unhealthy(&self, ti: TiUuid, why: &str) {
        let changed = {
            let mut cache = self.cache();
            cache
                .mark_unhealthy(ti)
                .then(|| cache.ti_event(ti))
                .flatten()
        };
        if changed.is_some() {
            tracing::warn!(ti = %ti, ti_address = %self.ti_address(ti), why, "TI marked unhealthy");
        }
        self.publish_ti(changed);
    }

    /// Probes every registered TI, and every removed one still holding tasks, once;
    /// re-routes the tasks of TIs that failed too many probes in a row.
    pub(super) async fn probe_health(&self) {
        let targets = self.cache().probe_targets();
        let probes = targets.into_iter().map(|(id, host, port)| {
            let client = self.inner.client.clone();
            async move { (id, client.health(&host, port).await) }
        });
        let results = futures::future::join_all(probes).await;
        let threshold = self.inner.settings.ti.reroute_after_failed_probes.max(1);
        let mut recovered = false;
        let mut dead = Vec::new();
        let mut changed = Vec::new();
        {
            let mut cache = self.cache();
            for (id, result) in results {
                let Some(change) = cache.record_probe(id, result.is_ok(), threshold) else {
                    continue;
                };
                match result {
                    Ok(()) if !change.was_healthy => {
                        tracing::info!(ti = %id, "TI healthy again");
                        recovered = true;
                        changed.extend(cache.ti_event(id));
                    }
                    Err(e) if change.was_healthy => {
                        tracing::warn!(ti = %id, error = %e, "TI failed its health probe");
                        changed.extend(cache.ti_event(id));
                    }
                    _ => {}
                }
                dead.extend(change.reroute);
            }
        }
        for event in changed {
            self.publish_ti(Some(event));
        }
        for task_id in dead {
            self.spawn_reroute(task_id);
        }
        if recovered {
            self.spawn_sweep();
        }
    }
}
