//! Registering and removing TIs. A registration is checked with the TI itself
//! (`GET /health`, `GET /info`) before it is stored; a removal stops new tasks at once and
//! moves the tasks the TI had not accepted yet.

use super::{Error, Scheduler};
use crate::domain::{unix_now, TiUuid};
use crate::store::{StoredTi, TiRepo};

impl Scheduler {
    /// Registers a TI after checking `GET /health` and `GET /info`; registering the same
    /// host:port again returns the same id.
    pub async fn register(
        &self,
        host: &str,
        port: u16,
        model_name: Option<&str>,
    ) -> Result<TiUuid, Error> {
        if !self.inner.settings.allowed_hosts.allows(host) {
            return Err(Error::Invalid(format!(
                "host '{host}' is not in the allowed TI hosts (ti.allowed_hosts)"
            )));
        }
        let client = &self.inner.client;
        client.health(host, port).await?;
        let info = client.info(host, port).await?;
        let model = match (info.model_name.as_deref(), model_name) {
            (Some(reported), Some(given)) if reported != given => {
                return Err(Error::Invalid(format!(
                    "model_name '{given}' does not match the model '{reported}' that the TI at {host}:{port} reports"
                )))
            }
            (Some(reported), _) => reported.to_string(),
            (None, Some(given)) => given.to_string(),
            (None, None) => {
                return Err(Error::Invalid(format!(
                    "the TI at {host}:{port} reports no model in GET /info; give model_name"
                )))
            }
        };
        let candidate = StoredTi {
            ti_uuid: TiUuid::generate(),
            host: host.to_string(),
            port,
            model_name: model,
            hardware: info.hardware,
            callback_token: uuid::Uuid::new_v4().simple().to_string(),
            registered_at: unix_now(),
            removed_at: None,
        };
        let stored = self
            .inner
            .db
            .writer
            .run(move |conn| TiRepo::upsert_registered(conn, &candidate))
            .await?;
        let id = stored.ti_uuid;
        tracing::info!(ti = %id, host, port, model = %stored.model_name, "TI registered");
        self.cache().upsert_ti(stored);
        // Tasks that waited for a usable TI of this model can go now.
        self.spawn_sweep();
        Ok(id)
    }

    /// Removes a TI: it gets no new tasks; what it already accepted runs to completion.
    pub async fn remove(&self, id: TiUuid) -> Result<(), Error> {
        let not_found = || Error::NotFound("TaskInstance not found".into());
        if !self.cache().is_registered(id) {
            return Err(not_found());
        }
        let at = unix_now();
        let removed = self
            .inner
            .db
            .writer
            .run(move |conn| TiRepo::mark_removed(conn, id, at))
            .await?;
        if !removed {
            return Err(not_found());
        }
        let waiting = self.cache().remove_ti(id, at);
        tracing::info!(ti = %id, rerouted = waiting.len(), "TI removed");
        // Tasks it had not accepted yet go elsewhere; what it accepted runs there.
        for task_id in waiting {
            self.spawn_reroute(task_id);
        }
        Ok(())
    }
}
