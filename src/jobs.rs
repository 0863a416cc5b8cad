//! Periodic jobs. The cleanup job clears results past their TTL and deletes completed
//! tasks (with their decisions) past the retention, in bounded batches through the
//! writer so it never stalls submits. It never touches unfinished tasks. Health probes and
//! the reconciliation sweep run on their own sub-second loop in the scheduling core.

use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::CleanupSettings;
use crate::domain::unix_now;
use crate::store::{Db, StoreError, TaskRepo};

/// What one cleanup run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Results cleared.
    pub expired: u64,
    /// Task rows deleted.
    pub purged: u64,
}

/// One cleanup pass at `now` (Unix seconds).
pub async fn run_cleanup_once(
    db: &Db,
    settings: &CleanupSettings,
    now: f64,
) -> Result<CleanupReport, StoreError> {
    let batch = i64::from(settings.batch_size.max(1));
    let expire_before = now - settings.result_ttl_secs as f64;
    let purge_before = now - settings.retention_secs as f64;
    let mut report = CleanupReport::default();
    loop {
        let n = db
            .writer
            .run(move |conn| TaskRepo::expire_results(conn, expire_before, batch))
            .await?;
        report.expired += n;
        if n < batch as u64 {
            break;
        }
    }
    loop {
        let n = db
            .writer
            .run(move |conn| TaskRepo::purge_completed(conn, purge_before, batch))
            .await?;
        report.purged += n;
        if n < batch as u64 {
            break;
        }
    }
    Ok(report)
}

/// Starts the cron scheduler with the cleanup job.
pub async fn start(db: Db, settings: CleanupSettings) -> anyhow::Result<JobScheduler> {
    let scheduler = JobScheduler::new().await?;
    let schedule = settings.schedule.clone();
    let job = Job::new_async(schedule.as_str(), move |_id, _jobs| {
        let db = db.clone();
        let settings = settings.clone();
        Box::pin(async move {
            match run_cleanup_once(&db, &settings, unix_now()).await {
                Ok(r) if r.expired + r.purged > 0 => {
                    tracing::info!(expired = r.expired, purged = r.purged, "cleanup done")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = ?e, "cleanup failed"),
            }
        })
    })
    .map_err(|e| {
        anyhow::anyhow!("cleanup.schedule '{schedule}' is not a valid cron expression: {e}")
    })?;
    scheduler.add(job).await?;
    scheduler.start().await?;
    Ok(scheduler)
}
