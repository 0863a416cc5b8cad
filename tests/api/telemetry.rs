//! What an operator scrapes: every metric family described and in base units, the
//! families that explain the scheduler (outcomes per model and TI, re-routes, latency,
//! prediction error, tasks waiting for a TI, build info), per-TI gauges that leave with
//! their TI, and the request id on every answer.

use std::collections::{BTreeMap, HashSet};

use reqwest::StatusCode;
use serde_json::json;
use ti_scheduler::ti::sim::Faults;

use crate::helpers::{spawn_app, spawn_ti, wait_for, TestApp};

/// One sample line of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape of `/metrics`: the `# TYPE` and `# HELP` lines by family, and the samples.
struct Scrape {
    text: String,
    types: Vec<String>,
    helps: HashSet<String>,
    samples: Vec<Sample>,
}

impl Scrape {
    async fn of(app: &TestApp) -> Self {
        Self::parse(app.metrics().await)
    }

    /// Parses the text. Label values here hold no `",` (uuids, model names, addresses),
    /// so a split is enough.
    fn parse(text: String) -> Self {
        let (mut types, mut helps, mut samples) = (Vec::new(), HashSet::new(), Vec::new());
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                types.push(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                if !help.trim().is_empty() {
                    helps.insert(name.to_string());
                }
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split("\",")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                samples.push(Sample {
                    name: name.to_string(),
                    labels,
                    value: value.parse().unwrap(),
                });
            }
        }
        Self {
            text,
            types,
            helps,
            samples,
        }
    }

    /// The value of the sample of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    #[track_caller]
    fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name} with {labels:?} in:\n{}", self.text))
    }
}

const PER_TI: [&str; 4] = [
    "ti_scheduler_ti_queue_length",
    "ti_scheduler_ti_expected_wait_seconds",
    "ti_scheduler_ti_wait_error_seconds",
    "ti_scheduler_ti_healthy",
];

#[tokio::test]
async fn metrics_are_described_in_base_units_explain_the_workload_and_forget_a_removed_ti() {
    let app = spawn_app().await;
    let good = spawn_ti("m-telemetry", "A100", 5.0).await;
    let refusing = spawn_ti("m-telemetry", "A100", 5.0).await;
    let good_id = app.register(&good).await;
    let refusing_id = app.register(&refusing).await;
    refusing.set_faults(Faults {
        refuse_submits: true,
        ..Faults::default()
    });
    app.set_strategy("round_robin").await;
    // Round robin sends one of the two to the refusing TI: it is re-routed to the good one.
    for _ in 0..2 {
        let (task, _) = app.submit("m-telemetry", json!({})).await;
        let done = app.wait_completed(&task).await;
        assert_eq!(done["scheduled_ti"], good_id.as_str(), "{done}");
    }
    good.set_faults(Faults {
        fail_tasks: true,
        ..Faults::default()
    });
    let (failing, _) = app.submit("m-telemetry", json!({})).await;
    app.wait_completed(&failing).await;
    // A model whose only TI is down: its task waits with no TI.
    let lonely = spawn_ti("m-telemetry-down", "A100", 5.0).await;
    let lonely_id = app.register(&lonely).await;
    lonely.set_faults(Faults {
        fail_health: true,
        ..Faults::default()
    });
    wait_for("the lonely TI to be unhealthy", || async {
        (!app.healthy(&lonely_id).await).then_some(())
    })
    .await;
    let (_, none) = app.submit("m-telemetry-down", json!({})).await;
    assert_eq!(none, "");

    let scrape = Scrape::of(&app).await;
    for family in &scrape.types {
        assert!(
            scrape.helps.contains(family),
            "{family} has no # HELP:\n{}",
            scrape.text
        );
        assert!(!family.ends_with("_ms"), "{family} is in milliseconds");
    }
    for sample in &scrape.samples {
        assert!(
            !sample.name.ends_with("_ms") && !sample.name.contains("_ms_"),
            "{} is in milliseconds",
            sample.name
        );
    }
    let model = ("model", "m-telemetry");
    let completed = "ti_scheduler_tasks_completed_total";
    let on_good = ("ti", good_id.as_str());
    assert_eq!(
        scrape.expect(completed, &[model, on_good, ("outcome", "succeeded")]),
        2.0
    );
    assert_eq!(
        scrape.expect(completed, &[model, on_good, ("outcome", "failed")]),
        1.0
    );
    assert!(scrape.expect("ti_scheduler_reroutes_total", &[model]) >= 1.0);
    assert_eq!(
        scrape.expect("ti_scheduler_task_latency_seconds_count", &[model]),
        3.0
    );
    assert!(scrape.expect("ti_scheduler_task_latency_seconds_sum", &[model]) > 0.0);
    assert_eq!(
        scrape.expect("ti_scheduler_prediction_error_ratio_count", &[model]),
        2.0,
        "only succeeded tasks have a prediction error"
    );
    scrape.expect(
        "ti_scheduler_prediction_error_ratio_bucket",
        &[model, ("le", "0.1")],
    );
    assert_eq!(
        scrape.expect(
            "ti_scheduler_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        scrape.expect(
            "ti_scheduler_tasks_waiting_for_ti",
            &[("model", "m-telemetry-down")]
        ),
        1.0
    );
    assert_eq!(
        scrape.expect("ti_scheduler_tasks_waiting_for_ti", &[model]),
        0.0
    );
    let good_address = format!("127.0.0.1:{}", good.addr().port());
    for family in PER_TI {
        scrape.expect(
            family,
            &[on_good, model, ("address", good_address.as_str())],
        );
        scrape.expect(family, &[("ti", refusing_id.as_str())]);
    }
    assert_eq!(
        scrape.expect("ti_scheduler_ti_healthy", &[("ti", lonely_id.as_str())]),
        0.0
    );

    let (status, body) = app
        .post("/ti/remove", json!({"ti_uuid": refusing_id}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let scrape = Scrape::of(&app).await;
    for family in PER_TI {
        assert_eq!(
            scrape.value(family, &[("ti", refusing_id.as_str())]),
            None,
            "{family} still reports the removed TI:\n{}",
            scrape.text
        );
        scrape.expect(family, &[on_good]);
    }
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_sane_one_from_the_client_is_kept() {
    let app = spawn_app().await;
    let request_id = |resp: &reqwest::Response| {
        resp.headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let sent = "client-7f3a.b:1";
    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", sent)
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&resp).as_deref(), Some(sent));

    let resp = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let made = request_id(&resp).expect("a 404 has a request id too");
    assert!(
        made.len() == 16 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made}"
    );

    let resp = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "not sane; <script>")
        .send()
        .await
        .unwrap();
    let replaced = request_id(&resp).unwrap();
    assert!(replaced.len() == 16 && replaced != made, "{replaced}");
}
