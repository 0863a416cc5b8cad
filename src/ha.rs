//! High availability on PostgreSQL: the leader lease (docs/API.md, "Standby nodes").
//!
//! Every node that uses PostgreSQL holds the lease while it serves ([`Leadership`]): the
//! row `ha_lease` names the leader, its epoch and when the lease expires (the database's
//! clock). The leader renews it every third of `ha.lease_ms`; its writer checks the epoch
//! in every transaction ([`crate::store::Fence`]), so a leader that was paused past its
//! lease and lost it cannot commit; nor can a leader paused inside a transaction hold a
//! take-over up (the server ends its writer's session once a transaction sits idle for
//! half a lease). A leader that learns it was deposed stops at once,
//! without draining (the process exits; its supervisor starts it again as a standby).
//!
//! With `ha.enabled`, a node that does not hold the lease is a standby ([`standby`]): it
//! answers every request with 503 naming the leader, and tries to take the lease every
//! tenth of `ha.lease_ms`. Once the leader stops renewing, the lease expires within
//! `ha.lease_ms` and a standby takes it, then builds the service exactly as at a start:
//! the cache rebuilt from the database, unfinished tasks reconciled with their TIs.
//! Without `ha.enabled`, a node waits up to twice `ha.lease_ms` for a lease held by
//! another (a previous process of its own that crashed) and refuses to start if it stays
//! held: two independent schedulers on one database would both dispatch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store::{self, Fence, LeaseRepo};

/// A node's handle on the lease table.
#[derive(Clone)]
pub struct Lease {
    pool: sqlx::PgPool,
    node: Arc<str>,
    url: Arc<str>,
    lease_ms: u64,
}

impl Lease {
    /// Connects to the database at `db_url` (migrating it, so the lease row exists) as
    /// node `ha.node_id` (or host name and pid), advertising `public_url`.
    pub async fn connect(
        settings: &Settings,
        db_url: &str,
        public_url: &str,
    ) -> anyhow::Result<Self> {
        let applied = store::migrate_postgres(db_url).await?;
        if applied > 0 {
            tracing::info!(applied, "database migrated");
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(store::pg_options(db_url)?)
            .await
            .context("connecting to PostgreSQL for the lease")?;
        let node = if settings.ha.node_id.trim().is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "node".into());
            format!("{host}:{}", std::process::id())
        } else {
            settings.ha.node_id.trim().to_string()
        };
        Ok(Self {
            pool,
            node: node.into(),
            url: public_url.into(),
            lease_ms: settings.ha.lease_ms.max(300),
        })
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// Takes the lease if no other node holds a live one.
    pub async fn try_acquire(&self) -> anyhow::Result<Option<Leadership>> {
        let started = Instant::now();
        let Some(epoch) =
            LeaseRepo::try_acquire(&self.pool, &self.node, &self.url, self.lease_ms).await?
        else {
            return Ok(None);
        };
        tracing::info!(epoch, node = %self.node, "leader lease taken");
        Ok(Some(Leadership::start(self.clone(), epoch, started)))
    }

    /// Takes the lease, waiting up to twice `ha.lease_ms` for another holder's to expire
    /// (without `ha.enabled`: a crashed previous process's lease).
    pub async fn acquire_within_two_leases(&self) -> anyhow::Result<Leadership> {
        let deadline = Instant::now() + 2 * self.lease();
        loop {
            if let Some(leadership) = self.try_acquire().await? {
                return Ok(leadership);
            }
            if Instant::now() >= deadline {
                let held = LeaseRepo::current(&self.pool).await?;
                anyhow::bail!(
                    "another ti-scheduler ({} at {}) holds this database; set ha.enabled on \
                     every node to run several",
                    held.holder.as_deref().unwrap_or("?"),
                    held.url.as_deref().unwrap_or("?"),
                );
            }
            tokio::time::sleep(self.lease() / 10).await;
        }
    }
}

/// This node's hold on the lease, while it leads.
pub struct Leadership {
    lease: Lease,
    epoch: i64,
    /// Cancelled when the lease is lost (renewal refused, or impossible until it
    /// expired) or a write found another epoch.
    deposed: CancellationToken,
    /// Ends the renewals (on release).
    stop: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl Leadership {
    fn start(lease: Lease, epoch: i64, taken_at: Instant) -> Self {
        let deposed = CancellationToken::new();
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(renew(
            lease.clone(),
            epoch,
            taken_at,
            deposed.clone(),
            stop.clone(),
        ));
        Self {
            lease,
            epoch,
            deposed,
            stop,
            renewer,
        }
    }

    /// The writer's fence: the epoch, the token to cancel if a write finds another, and
    /// how long its transaction may sit idle: half a lease. A leader paused inside a batch
    /// then loses its session (and its lock on the lease row) before its lease can expire
    /// (it renewed at most a third of a lease before the pause), and a standby, which
    /// only tries to take an expired lease, never waits for it. (A take-over that waited
    /// would also get a short lease: PostgreSQL computes the new `expires_at` before
    /// waiting for a `FOR SHARE` lock, so after a long wait the lease it took was
    /// expired already, and the next standby took it at once.) A live writer runs its
    /// statements back to back.
    pub fn fence(&self) -> Fence {
        Fence {
            epoch: self.epoch,
            deposed: self.deposed.clone(),
            idle_limit: self.lease.lease() / 2,
        }
    }

    /// Cancelled once this node is no longer the leader.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }

    /// Stops renewing and gives the lease up (unless it was lost), so that a standby
    /// takes over at once.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.renewer.await;
        if self.deposed.is_cancelled() {
            return;
        }
        match LeaseRepo::release(&self.lease.pool, self.epoch).await {
            Ok(()) => tracing::info!(epoch = self.epoch, "leader lease released"),
            Err(e) => tracing::warn!(error = ?e, "releasing the leader lease failed"),
        }
        self.lease.pool.close().await;
    }
}

/// Renews the lease every third of its length until `stop`; cancels `deposed` when the
/// lease has another epoch, or when no renewal succeeded before it expired.
async fn renew(
    lease: Lease,
    epoch: i64,
    taken_at: Instant,
    deposed: CancellationToken,
    stop: CancellationToken,
) {
    let length = lease.lease();
    // Each renewal is timed from before it was sent, so this node's idea of its lease
    // never outlives the database's.
    let mut renewed_at = taken_at;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(length / 3) => {}
        }
        let attempt = Instant::now();
        // After a pause (SIGSTOP, a stalled VM) the lease may be gone already.
        if attempt > renewed_at + length {
            tracing::error!(epoch, "the leader lease expired before it could be renewed");
            deposed.cancel();
            return;
        }
        match tokio::time::timeout(
            length / 3,
            LeaseRepo::renew(&lease.pool, epoch, lease.lease_ms),
        )
        .await
        {
            Ok(Ok(true)) => renewed_at = attempt,
            Ok(Ok(false)) => {
                tracing::error!(epoch, "the leader lease was taken by another node");
                deposed.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = ?e, epoch, "renewing the leader lease failed"),
            Err(_) => tracing::warn!(epoch, "renewing the leader lease timed out"),
        }
    }
}

/// Serves as a standby on `listener` until this node takes the lease (returned) or
/// `shutdown` completes (`None`). Every request is answered 503 with the leader's URL.
/// Gives the listener back, to serve the service on.
pub async fn standby(
    lease: &Lease,
    listener: TcpListener,
    limits: crate::server::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<(TcpListener, Option<Leadership>)> {
    // Two handles on one socket: the standby server's, stopped at the end, and ours.
    let ours = listener.into_std()?;
    let theirs = TcpListener::from_std(ours.try_clone()?)?;
    let leader: Arc<std::sync::RwLock<Option<String>>> = Arc::default();
    let answer = leader.clone();
    let router = axum::Router::new().fallback(move || {
        let leader = answer.read().map(|l| l.clone()).unwrap_or_default();
        async move {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "error", "message": "standby", "leader": leader})),
            )
                .into_response()
        }
    });
    let serving = CancellationToken::new();
    let server = tokio::spawn(crate::server::serve(
        theirs,
        router,
        limits,
        serving.clone().cancelled_owned(),
    ));
    tracing::info!(node = %lease.node, "standby: waiting for the leader lease");
    let mut shutdown = std::pin::pin!(shutdown);
    let outcome = loop {
        match lease.try_acquire().await {
            Ok(Some(leadership)) => break Some(leadership),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = ?e, "standby: reading the lease failed"),
        }
        if let Ok(view) = LeaseRepo::current(&lease.pool).await {
            let url = view.live.then_some(view.url).flatten();
            if let Ok(mut l) = leader.write() {
                *l = url;
            }
        }
        tokio::select! {
            _ = &mut shutdown => break None,
            _ = tokio::time::sleep(lease.lease() / 10) => {}
        }
    };
    serving.cancel();
    let _ = server.await;
    Ok((TcpListener::from_std(ours)?, outcome))
}
