//! The `ha_lease` row (PostgreSQL): who leads, under which epoch, until when. Times are the
//! database's clock, so the nodes' clocks need not agree.

use super::StoreError;

/// Repository of the leader lease.
pub struct LeaseRepo;

/// The lease as a standby sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseView {
    /// Raised by every take-over.
    pub epoch: i64,
    /// The leader's `ha.node_id`, if any node holds the lease.
    pub holder: Option<String>,
    /// The leader's `server.public_url`.
    pub url: Option<String>,
    /// True while the lease has not expired.
    pub live: bool,
}

impl LeaseRepo {
    /// Takes the lease for `node` if it has expired (or `node` already holds it), under a
    /// new epoch, for `lease_ms`. Returns the new epoch, or `None` if another node holds
    /// a live lease. A take-over waits for a commit under way of the previous leader
    /// (whose write transactions hold the row `FOR SHARE`), and fences every later one.
    pub async fn try_acquire(
        pool: &sqlx::PgPool,
        node: &str,
        url: &str,
        lease_ms: u64,
    ) -> Result<Option<i64>, StoreError> {
        let ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
        Ok(sqlx::query_scalar!(
            "/* pg */ UPDATE ha_lease
             SET epoch = epoch + 1, holder = $1, url = $2,
                 expires_at = clock_timestamp() + make_interval(secs => $3::BIGINT / 1000.0)
             WHERE id = 1 AND (expires_at < clock_timestamp() OR holder = $1)
             RETURNING epoch",
            node,
            url,
            ms
        )
        .fetch_optional(pool)
        .await?)
    }

    /// Extends the lease of `epoch` by `lease_ms` from now. False if the lease has another
    /// epoch: this node was deposed.
    pub async fn renew(pool: &sqlx::PgPool, epoch: i64, lease_ms: u64) -> Result<bool, StoreError> {
        let ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
        let renewed = sqlx::query!(
            "/* pg */ UPDATE ha_lease
             SET expires_at = clock_timestamp() + make_interval(secs => $2::BIGINT / 1000.0)
             WHERE id = 1 AND epoch = $1",
            epoch,
            ms
        )
        .execute(pool)
        .await?
        .rows_affected();
        Ok(renewed == 1)
    }

    /// Gives the lease of `epoch` up, so that a standby takes over at once.
    pub async fn release(pool: &sqlx::PgPool, epoch: i64) -> Result<(), StoreError> {
        sqlx::query!(
            "/* pg */ UPDATE ha_lease SET expires_at = '-infinity', holder = NULL
             WHERE id = 1 AND epoch = $1",
            epoch
        )
        .execute(pool)
        .await?;
        Ok(())
    }

    /// The lease now.
    pub async fn current(pool: &sqlx::PgPool) -> Result<LeaseView, StoreError> {
        let row = sqlx::query!(
            r#"/* pg */ SELECT epoch, holder, url, expires_at > clock_timestamp() AS "live!"
               FROM ha_lease WHERE id = 1"#
        )
        .fetch_one(pool)
        .await?;
        Ok(LeaseView {
            epoch: row.epoch,
            holder: row.holder,
            url: row.url,
            live: row.live,
        })
    }
}
