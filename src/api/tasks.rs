//! `GET /tasks`: the task history, filtered, newest first, a page at a time.
//!
//! The query string is read as text, then validated into a [`HistoryFilter`], each bad
//! value a 400 naming its parameter; the page is read through the read pool by
//! [`TaskRepo::history`], keyset-paged: `next_cursor` names the last task of the page.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiQuery};
use super::{AppState, SUCCESS};
use crate::domain::{Outcome, TaskStatus, TiUuid};
use crate::store::{HistoryCursor, HistoryFilter, HistoryRow, TaskRepo};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/tasks", get(list_tasks))
}

/// Tasks per page when `limit` is not given.
pub(super) const DEFAULT_LIMIT: u32 = 100;
/// The largest `limit`.
pub(super) const MAX_LIMIT: u32 = 1000;

/// The filters of `GET /tasks`, as the client wrote them.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryParams {
    /// Only this model.
    #[param(min_length = 1)]
    pub model_name: Option<String>,
    /// `queued`, `scheduled` or `completed`.
    #[param(value_type = Option<TaskStatus>)]
    pub status: Option<String>,
    /// `succeeded` or `failed` (completed tasks only).
    #[param(value_type = Option<Outcome>)]
    pub outcome: Option<String>,
    /// Only tasks whose current TI is this one (UUID).
    #[param(
        pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
    )]
    pub ti_uuid: Option<String>,
    /// Unix seconds: only tasks submitted at or after.
    #[param(value_type = Option<f64>)]
    pub since: Option<String>,
    /// Unix seconds: only tasks submitted before.
    #[param(value_type = Option<f64>)]
    pub until: Option<String>,
    /// Tasks per page, 1..=1000 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page (`{submit_time}~{task_id}`).
    #[param(pattern = "^-?[0-9]{1,15}(\\.[0-9]{1,9})?~[A-Za-z0-9._:-]{1,128}$")]
    pub cursor: Option<String>,
}

/// One task of the history.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HistoryTask {
    /// Its id.
    pub task_id: String,
    /// The model it asked for.
    pub model_name: String,
    /// `queued`, `scheduled` or `completed`.
    #[schema(value_type = TaskStatus)]
    pub task_status: String,
    /// `succeeded` or `failed` once completed, else null.
    #[schema(value_type = Option<Outcome>)]
    pub outcome: Option<String>,
    /// The TI currently chosen for it; empty while none is.
    pub scheduled_ti: String,
    /// Unix seconds, millisecond precision.
    pub submit_time: f64,
    /// Unix seconds, once completed.
    pub completion_time: Option<f64>,
    /// As reported by the TI, ms.
    pub execution_time: Option<f64>,
}

impl From<HistoryRow> for HistoryTask {
    fn from(row: HistoryRow) -> Self {
        Self {
            task_id: row.task_id.to_string(),
            model_name: row.model_name,
            task_status: row.status.as_str().into(),
            outcome: row.outcome.map(|o| o.as_str().into()),
            scheduled_ti: row.ti_uuid.map(|t| t.to_string()).unwrap_or_default(),
            submit_time: row.submit_time,
            completion_time: row.completion_time,
            execution_time: row.execution_time_ms,
        }
    }
}

/// Answer of `GET /tasks`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct HistoryResponse {
    /// `success`.
    pub status: String,
    /// The page, newest first.
    pub tasks: Vec<HistoryTask>,
    /// Pass it as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Validates the query string into a filter, naming the first bad parameter.
pub(super) fn parse_filter(p: HistoryParams) -> Result<HistoryFilter, ApiError> {
    let bad = |m: String| ApiError::BadRequest(m);
    let non_empty = |name: &str, v: Option<String>| match v {
        Some(v) if v.is_empty() => Err(bad(format!("{name} must not be empty"))),
        v => Ok(v),
    };
    let status = non_empty("status", p.status)?
        .map(|s| match s.as_str() {
            "queued" => Ok(TaskStatus::Queued),
            "scheduled" => Ok(TaskStatus::Scheduled),
            "completed" => Ok(TaskStatus::Completed),
            _ => Err(bad(format!(
                "unknown status '{s}'; valid: queued, scheduled, completed"
            ))),
        })
        .transpose()?;
    let outcome = non_empty("outcome", p.outcome)?
        .map(|s| match s.as_str() {
            "succeeded" => Ok(Outcome::Succeeded),
            "failed" => Ok(Outcome::Failed),
            _ => Err(bad(format!(
                "unknown outcome '{s}'; valid: succeeded, failed"
            ))),
        })
        .transpose()?;
    let ti_uuid = non_empty("ti_uuid", p.ti_uuid)?
        .map(|s| {
            s.parse::<TiUuid>()
                .map_err(|_| bad(format!("invalid ti_uuid '{s}': Invalid UUID format")))
        })
        .transpose()?;
    let seconds = |name: &str, v: Option<String>| {
        non_empty(name, v)?
            .map(|s| match s.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(bad(format!(
                    "invalid {name} '{s}': Unix seconds expected (e.g. 1795833489 or 1795833489.325)"
                ))),
            })
            .transpose()
    };
    let since = seconds("since", p.since)?;
    let until = seconds("until", p.until)?;
    let limit = match non_empty("limit", p.limit)? {
        None => DEFAULT_LIMIT,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "invalid limit '{s}': an integer in 1..={MAX_LIMIT} expected"
                )))
            }
        },
    };
    let after = non_empty("cursor", p.cursor)?
        .map(|s| {
            HistoryCursor::decode(&s).ok_or_else(|| {
                bad(format!(
                    "invalid cursor '{s}': pass the next_cursor of a previous page unchanged"
                ))
            })
        })
        .transpose()?;
    Ok(HistoryFilter {
        model_name: non_empty("model_name", p.model_name)?,
        status,
        outcome,
        ti_uuid,
        since,
        until,
        after,
        limit,
    })
}

/// The task history, newest first, filtered and keyset-paged.
///
/// A task committed before the first page was read, and not deleted by the cleanup job
/// meanwhile, is on exactly one page; no task is ever on two. Tasks committed while the
/// pages are read may be missed (start again without a cursor to see them).
#[utoipa::path(get, path = "/tasks", params(HistoryParams),
    responses((status = 200, body = HistoryResponse),
              (status = 400, description = "a bad filter value, named in the message")))]
pub(super) async fn list_tasks(
    State(app): State<AppState>,
    ApiQuery(params): ApiQuery<HistoryParams>,
) -> Result<Json<HistoryResponse>, ApiError> {
    let filter = parse_filter(params)?;
    let page = TaskRepo::history(&app.scheduler.db().read, &filter).await?;
    Ok(Json(HistoryResponse {
        status: SUCCESS.into(),
        tasks: page.tasks.into_iter().map(HistoryTask::from).collect(),
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<HistoryFilter, String> {
        let params: HistoryParams = serde_urlencoded::from_str(query).unwrap();
        parse_filter(params).map_err(|e| e.to_string())
    }

    #[test]
    fn no_parameters_list_everything_a_hundred_at_a_time() {
        assert_eq!(parse("").unwrap(), HistoryFilter::all(DEFAULT_LIMIT));
    }

    #[test]
    fn every_bad_value_is_refused_with_the_parameter_named() {
        for (query, needle) in [
            (
                "status=done",
                "unknown status 'done'; valid: queued, scheduled, completed",
            ),
            (
                "outcome=ok",
                "unknown outcome 'ok'; valid: succeeded, failed",
            ),
            ("ti_uuid=nope", "invalid ti_uuid 'nope'"),
            ("since=yesterday", "invalid since 'yesterday'"),
            ("until=NaN", "invalid until 'NaN'"),
            ("limit=0", "invalid limit '0'"),
            ("limit=1001", "invalid limit '1001'"),
            ("limit=ten", "invalid limit 'ten'"),
            ("limit=-1", "invalid limit '-1'"),
            ("cursor=abc", "invalid cursor 'abc'"),
            ("model_name=", "model_name must not be empty"),
        ] {
            let message = parse(query).unwrap_err();
            assert!(message.contains(needle), "{query}: {message}");
        }
    }

    #[test]
    fn good_values_become_the_typed_filter() {
        let f = parse(
            "model_name=m&status=completed&outcome=failed&since=10.5&until=20&limit=1000\
             &ti_uuid=00000000-0000-4000-8000-000000000001&cursor=15.25~task-1",
        )
        .unwrap();
        assert_eq!(f.model_name.as_deref(), Some("m"));
        assert_eq!(f.status, Some(TaskStatus::Completed));
        assert_eq!(f.outcome, Some(Outcome::Failed));
        assert_eq!((f.since, f.until, f.limit), (Some(10.5), Some(20.0), 1000));
        assert_eq!(f.after.unwrap().task_id.as_str(), "task-1");
        assert!(f.ti_uuid.is_some());
    }
}
