//! Registering and removing TIs. A registration is checked with the TI itself
//! (`GET /health`, `GET /info`) before it is stored; a removal stops new tasks at once and
//! moves the tasks the TI had not accepted yet.

use super::{Error, Scheduler};
use crate::domain::{check_name, unix_now, TiKind, TiUuid};
use crate::store::{StoredTi, TiRepo};
use crate::ti::TiError;

/// A registration, as checked by the API (host non-empty, port and concurrency in range).
#[derive(Debug, Clone, Copy)]
pub struct Registration<'a> {
    /// Host of the TI.
    pub host: &'a str,
    /// Its port.
    pub port: u16,
    /// The model it should serve, if the caller says.
    pub model_name: Option<&'a str>,
    /// How to talk to it.
    pub kind: TiKind,
    /// Its hardware; overrides what the TI reports.
    pub hardware: Option<&'a str>,
    /// Requests in flight to it at once; `None` takes the kind's default.
    pub max_concurrency: Option<u32>,
}

impl Scheduler {
    /// Registers a TI after checking it with the TI itself (a callback TI: `GET /health`
    /// and `GET /info`; an OpenAI-compatible one: `GET /health` or `GET /v1/models`, and
    /// the model ids of `GET /v1/models`); registering the same host:port again returns
    /// the same id (with the new kind, model, hardware and concurrency).
    pub async fn register(&self, reg: Registration<'_>) -> Result<TiUuid, Error> {
        let Registration {
            host,
            port,
            model_name,
            kind,
            hardware,
            max_concurrency,
        } = reg;
        if !self.inner.settings.allowed_hosts.allows(host) {
            return Err(Error::Invalid(format!(
                "host '{host}' is not in the allowed TI hosts (ti.allowed_hosts)"
            )));
        }
        let names = [
            ("host", Some(host)),
            ("model_name", model_name),
            ("hardware", hardware),
        ];
        for (field, value) in names {
            if let Some(value) = value {
                check_name(field, value).map_err(Error::Invalid)?;
            }
        }
        let (model, reported_hardware) = match kind {
            TiKind::Callback => self.check_callback_ti(host, port, model_name).await?,
            TiKind::Openai => (self.check_openai_ti(host, port, model_name).await?, None),
        };
        // What the TI reports is checked too.
        check_name("the model the TI reports", &model).map_err(Error::Invalid)?;
        if let Some(reported) = &reported_hardware {
            check_name("the hardware the TI reports", reported).map_err(Error::Invalid)?;
        }
        let candidate = StoredTi {
            ti_uuid: TiUuid::generate(),
            host: host.to_string(),
            port,
            model_name: model,
            hardware: hardware.map(str::to_string).or(reported_hardware),
            callback_token: uuid::Uuid::new_v4().simple().to_string(),
            registered_at: unix_now(),
            removed_at: None,
            kind,
            max_concurrency,
        };
        let stored = self
            .inner
            .db
            .writer
            .run(move |conn| TiRepo::upsert_registered(conn, &candidate))
            .await?;
        let id = stored.ti_uuid;
        tracing::info!(ti = %id, host, port, model = %stored.model_name, kind = kind.as_str(), "TI registered");
        let event = {
            let mut cache = self.cache();
            cache.upsert_ti(stored);
            cache.ti_event(id)
        };
        self.publish_ti(event);
        // Tasks that waited for a usable TI of this model can go now.
        self.spawn_sweep();
        Ok(id)
    }

    /// A callback TI's health and `GET /info`: its model (which a given one must match)
    /// and hardware.
    async fn check_callback_ti(
        &self,
        host: &str,
        port: u16,
        model_name: Option<&str>,
    ) -> Result<(String, Option<String>), Error> {
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
        Ok((model, info.hardware))
    }

    /// An OpenAI-compatible TI's health and model ids: a given model must be one of them,
    /// an omitted one takes the first.
    async fn check_openai_ti(
        &self,
        host: &str,
        port: u16,
        model_name: Option<&str>,
    ) -> Result<String, Error> {
        let client = &self.inner.client;
        client.openai_health(host, port).await?;
        let ids = client.openai_models(host, port).await?;
        match model_name {
            Some(given) if ids.iter().any(|id| id == given) => Ok(given.to_string()),
            Some(given) => Err(Error::Invalid(format!(
                "model_name '{given}' is not served by the TI at {host}:{port}; GET /v1/models lists: {}",
                ids.join(", ")
            ))),
            None => ids.into_iter().next().ok_or_else(|| {
                Error::TiUnreachable(TiError::Protocol(format!(
                    "the TI at {host}:{port} lists no model in GET /v1/models"
                )))
            }),
        }
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
        let (waiting, event) = {
            let mut cache = self.cache();
            (cache.remove_ti(id, at), cache.ti_event(id))
        };
        self.publish_ti(event);
        tracing::info!(ti = %id, rerouted = waiting.len(), "TI removed");
        // Tasks it had not accepted yet go elsewhere; what it accepted runs there.
        for task_id in waiting {
            self.spawn_reroute(task_id);
        }
        Ok(())
    }

    /// Publishes a TI's new state, if it is known.
    pub(super) fn publish_ti(&self, event: Option<super::events::Event>) {
        if let Some(event) = event {
            self.inner.events.publish(event);
        }
    }
}
