//! What happened in a recent window of time, for `GET /stats`: the tasks
//! submitted per model, and the tasks completed with their times. Both read the indexes
//! by time (`tasks_completed_at`, and the history index on submit time).

use super::{Reader, StoreError};

/// Repository of the recent-window figures.
pub struct WindowRepo;

/// A task completed in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletedTask {
    /// Its model.
    pub model_name: String,
    /// True when it failed.
    pub failed: bool,
    /// The TI whose result was stored.
    pub result_ti: Option<String>,
    /// Submit to completion, seconds.
    pub jct_s: f64,
    /// Its execution time, ms.
    pub execution_time_ms: Option<f64>,
    /// The prediction it was placed with, ms.
    pub predicted_ms: f64,
}

impl WindowRepo {
    /// Tasks submitted since `since` (Unix seconds), per model.
    pub async fn submitted_since(
        read: &Reader,
        since: f64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => sqlx::query!(
                r#"SELECT model_name, COUNT(*) AS "n!: i64" FROM tasks
                   WHERE submit_time >= ? GROUP BY model_name ORDER BY model_name"#,
                since
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.model_name, r.n))
            .collect(),
            Reader::Postgres(pool) => sqlx::query!(
                r#"/* pg */ SELECT model_name, COUNT(*) AS "n!" FROM tasks
                   WHERE submit_time >= $1 GROUP BY model_name ORDER BY model_name"#,
                since
            )
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| (r.model_name, r.n))
            .collect(),
        })
    }

    /// Tasks completed since `since` (Unix seconds).
    pub async fn completed_since(
        read: &Reader,
        since: f64,
    ) -> Result<Vec<CompletedTask>, StoreError> {
        Ok(match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    CompletedTask,
                    r#"SELECT model_name, outcome = 'failed' AS "failed!: bool", result_ti,
                              completion_time - submit_time AS "jct_s!: f64", execution_time_ms,
                              predicted_ms
                       FROM tasks WHERE status = 'completed' AND completion_time >= ?"#,
                    since
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    CompletedTask,
                    r#"/* pg */ SELECT model_name, outcome = 'failed' AS "failed!", result_ti,
                              completion_time - submit_time AS "jct_s!", execution_time_ms,
                              predicted_ms
                       FROM tasks WHERE status = 'completed' AND completion_time >= $1"#,
                    since
                )
                .fetch_all(pool)
                .await?
            }
        })
    }
}
