//! `GET /stats?window_s=`: what the service did in a recent window, from the
//! database: per model, tasks submitted, completed and failed, the throughput, job
//! completion time percentiles and how well execution times were predicted; per TI, tasks
//! completed and the share of its slots' time spent executing.

use std::collections::{BTreeMap, HashMap};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiQuery};
use super::{AppState, SUCCESS};
use crate::domain::unix_now;
use crate::store::{CompletedTask, WindowRepo};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/stats", get(stats))
}

/// The window.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct StatsQuery {
    /// Seconds back from now, 1..=86400 (default 300).
    #[serde(default)]
    pub window_s: Option<f64>,
}

/// Job completion time percentiles, ms.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Percentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 95th percentile.
    pub p95: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
}

/// One model's figures.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ModelStats {
    /// The model.
    pub model_name: String,
    /// Tasks submitted in the window.
    pub submitted: i64,
    /// Tasks completed in the window (failures included).
    pub completed: usize,
    /// Of them, failed.
    pub failed: usize,
    /// Completed per second.
    pub throughput_per_s: f64,
    /// Submit to completion of the tasks completed in the window, ms.
    pub jct_ms: Percentiles,
    /// Mean absolute percentage error of the predictions the succeeded tasks were placed
    /// with, against their execution times (%); null without such tasks.
    pub prediction_mape: Option<f64>,
}

/// One TI's figures.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TiStats {
    /// The TI.
    pub ti_uuid: String,
    /// Tasks whose result it gave in the window.
    pub completed: usize,
    /// Their execution time over the window's time of its slots (0..=1).
    pub busy_share: f64,
}

/// Answer of `GET /stats`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct StatsResponse {
    /// `success`.
    pub status: String,
    /// The window, seconds.
    pub window_s: f64,
    /// Per model.
    pub models: Vec<ModelStats>,
    /// Per TI that completed tasks in the window.
    pub tis: Vec<TiStats>,
}

const DEFAULT_WINDOW_S: f64 = 300.0;
const MAX_WINDOW_S: f64 = 86_400.0;

/// What the service did in the last `window_s` seconds.
#[utoipa::path(get, path = "/stats", params(("window_s" = Option<f64>, Query, minimum = 1, maximum = 86400, description = "seconds back from now, 1..=86400 (default 300)")),
    responses((status = 200, body = StatsResponse), (status = 400, description = "bad window_s")))]
pub(super) async fn stats(
    State(app): State<AppState>,
    query: Result<ApiQuery<StatsQuery>, ApiError>,
) -> Result<Json<StatsResponse>, ApiError> {
    let ApiQuery(q) = query?;
    let window_s = q.window_s.unwrap_or(DEFAULT_WINDOW_S);
    if !(1.0..=MAX_WINDOW_S).contains(&window_s) {
        return Err(ApiError::BadRequest(format!(
            "window_s must be in 1..=86400, got {window_s}"
        )));
    }
    let since = unix_now() - window_s;
    let read = &app.scheduler.db().read;
    let submitted = WindowRepo::submitted_since(read, since).await?;
    let completed = WindowRepo::completed_since(read, since).await?;
    let slots: HashMap<String, usize> = app
        .scheduler
        .tis()
        .into_iter()
        .map(|s| (s.ti.ti_uuid.to_string(), s.max_concurrency))
        .collect();
    Ok(Json(StatsResponse {
        status: SUCCESS.into(),
        window_s,
        models: model_stats(&submitted, &completed, window_s),
        tis: ti_stats(&completed, &slots, window_s),
    }))
}

fn model_stats(
    submitted: &[(String, i64)],
    completed: &[CompletedTask],
    window_s: f64,
) -> Vec<ModelStats> {
    let mut by_model: BTreeMap<&str, Vec<&CompletedTask>> = BTreeMap::new();
    for (model, _) in submitted {
        by_model.entry(model).or_default();
    }
    for task in completed {
        by_model.entry(&task.model_name).or_default().push(task);
    }
    by_model
        .into_iter()
        .map(|(model, tasks)| {
            let mut jct: Vec<f64> = tasks.iter().map(|t| t.jct_s * 1000.0).collect();
            jct.sort_by(f64::total_cmp);
            let errors: Vec<f64> = tasks
                .iter()
                .filter(|t| !t.failed)
                .filter_map(|t| {
                    let actual = t.execution_time_ms.filter(|ms| *ms > 0.0)?;
                    Some((actual - t.predicted_ms).abs() / actual)
                })
                .collect();
            ModelStats {
                model_name: model.to_string(),
                submitted: submitted
                    .iter()
                    .find(|(m, _)| m == model)
                    .map_or(0, |(_, n)| *n),
                completed: tasks.len(),
                failed: tasks.iter().filter(|t| t.failed).count(),
                throughput_per_s: tasks.len() as f64 / window_s,
                jct_ms: Percentiles {
                    p50: quantile(&jct, 0.5),
                    p95: quantile(&jct, 0.95),
                    p99: quantile(&jct, 0.99),
                },
                prediction_mape: (!errors.is_empty())
                    .then(|| 100.0 * errors.iter().sum::<f64>() / errors.len() as f64),
            }
        })
        .collect()
}

fn ti_stats(
    completed: &[CompletedTask],
    slots: &HashMap<String, usize>,
    window_s: f64,
) -> Vec<TiStats> {
    let mut by_ti: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for task in completed {
        let Some(ti) = task.result_ti.as_deref() else {
            continue;
        };
        let entry = by_ti.entry(ti).or_default();
        entry.0 += 1;
        entry.1 += task.execution_time_ms.unwrap_or(0.0);
    }
    by_ti
        .into_iter()
        .map(|(ti, (n, busy_ms))| {
            let capacity_ms = window_s * 1000.0 * slots.get(ti).copied().unwrap_or(1) as f64;
            TiStats {
                ti_uuid: ti.to_string(),
                completed: n,
                busy_share: (busy_ms / capacity_ms).min(1.0),
            }
        })
        .collect()
}

/// The `q`-quantile of sorted values (nearest rank); `None` when there are none.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
