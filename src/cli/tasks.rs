//! `ti-scheduler tasks`: the task history (`GET /tasks`) of a running scheduler, from the
//! command line.
//!
//! The filters go to the server as they were typed (it validates them, and its message
//! is what the user sees when one is wrong). Each page is printed as a table for people,
//! or as the server's JSON for scripts; `--all` follows `next_cursor` to the last page.

use std::io::Write;

use anyhow::Context;
use serde_json::Value;

/// Options of `ti-scheduler tasks`.
#[derive(Debug, Clone, clap::Args)]
pub struct TasksArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub url: super::ServiceUrl,
    /// Only this model.
    #[arg(long)]
    pub model_name: Option<String>,
    /// queued, scheduled or completed.
    #[arg(long)]
    pub status: Option<String>,
    /// succeeded or failed.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Only tasks whose current TI is this one.
    #[arg(long)]
    pub ti_uuid: Option<String>,
    /// Unix seconds: only tasks submitted at or after (e.g. `$(date -d yesterday +%s)`).
    #[arg(long)]
    pub since: Option<String>,
    /// Unix seconds: only tasks submitted before.
    #[arg(long)]
    pub until: Option<String>,
    /// Tasks per page, 1..=1000 (the server's default: 100).
    #[arg(long)]
    pub limit: Option<String>,
    /// Start after this position (the next_cursor of a previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow next_cursor to the last page.
    #[arg(long)]
    pub all: bool,
    /// Print JSON (the server's answer; with --all, every task in one answer).
    #[arg(long)]
    pub json: bool,
}

impl TasksArgs {
    /// The query parameters of `GET /tasks`, with `cursor` in place of the given one.
    fn query(&self, cursor: Option<&str>) -> Vec<(&'static str, String)> {
        [
            ("model_name", self.model_name.as_deref()),
            ("status", self.status.as_deref()),
            ("outcome", self.outcome.as_deref()),
            ("ti_uuid", self.ti_uuid.as_deref()),
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
            ("limit", self.limit.as_deref()),
            ("cursor", cursor),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v.to_string())))
        .collect()
    }
}

/// Fetches one page: the server's JSON answer, or an error carrying its message.
pub async fn fetch_page(
    client: &reqwest::Client,
    args: &TasksArgs,
    cursor: Option<&str>,
) -> anyhow::Result<Value> {
    let url = args.url.at("/tasks");
    let response = client
        .get(&url)
        .query(&args.query(cursor))
        .send()
        .await
        .with_context(|| format!("requesting {url}"))?;
    super::answer(response, &url).await
}

/// Runs the command, writing to `out`.
pub async fn run(args: &TasksArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let client = super::client()?;
    let mut cursor = args.cursor.clone();
    let mut collected: Vec<Value> = Vec::new();
    let mut first = true;
    loop {
        let mut page = fetch_page(&client, args, cursor.as_deref()).await?;
        let next = page["next_cursor"].as_str().map(str::to_string);
        let tasks = match page["tasks"].take() {
            Value::Array(tasks) => tasks,
            _ => anyhow::bail!("the answer has no tasks list"),
        };
        match (args.json, args.all) {
            (true, false) => {
                page["tasks"] = Value::Array(tasks);
                writeln!(out, "{page}")?;
            }
            (true, true) => collected.extend(tasks),
            (false, _) => {
                if first {
                    writeln!(out, "{}", header())?;
                }
                for task in &tasks {
                    writeln!(out, "{}", row(task))?;
                }
            }
        }
        first = false;
        match (next, args.all) {
            (Some(next), true) => cursor = Some(next),
            (Some(next), false) => {
                if !args.json {
                    writeln!(out, "next page: --cursor {next}")?;
                }
                break;
            }
            (None, _) => break,
        }
    }
    if args.json && args.all {
        let all = serde_json::json!({"status": "success", "tasks": collected, "next_cursor": null});
        writeln!(out, "{all}")?;
    }
    Ok(())
}

/// Column widths: a generated task id, the longest status and outcome, a UUID, a time.
const WIDTHS: [usize; 6] = [41, 16, 9, 9, 36, 23];

fn header() -> String {
    line(
        [
            "TASK_ID",
            "MODEL",
            "STATUS",
            "OUTCOME",
            "TI",
            "SUBMITTED (UTC)",
        ],
        "EXEC_MS",
    )
}

fn row(task: &Value) -> String {
    let text = |key: &str| match &task[key] {
        Value::String(s) if !s.is_empty() => s.clone(),
        _ => "-".to_string(),
    };
    let submitted = task["submit_time"].as_f64().map_or("-".into(), utc);
    let exec = task["execution_time"]
        .as_f64()
        .map_or("-".into(), |ms| format!("{ms:.1}"));
    line(
        [
            &text("task_id"),
            &text("model_name"),
            &text("task_status"),
            &text("outcome"),
            &text("scheduled_ti"),
            &submitted,
        ],
        &exec,
    )
}

fn line(cells: [&str; 6], last: &str) -> String {
    let mut s = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        s.push_str(&format!("{cell:<width$}  "));
    }
    s.push_str(&format!("{last:>10}"));
    s
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss.mmm` in UTC.
pub fn utc(secs: f64) -> String {
    let ms = (secs * 1000.0).round() as i64;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}.{milli:03}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_print_as_utc_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400.5), "2000-02-29 00:00:00.500");
        assert_eq!(utc(1_795_833_489.325), "2026-11-28 02:38:09.325");
    }

    #[test]
    fn a_row_shows_dashes_for_what_a_task_does_not_have_yet() {
        let task = serde_json::json!({"task_id": "t-1", "model_name": "m", "task_status": "queued",
            "outcome": null, "scheduled_ti": "", "submit_time": 0.0, "execution_time": null});
        let row = row(&task);
        assert!(row.starts_with("t-1 "), "{row}");
        assert_eq!(
            row.matches(" - ").count() + usize::from(row.ends_with('-')),
            3,
            "{row}"
        );
    }
}
