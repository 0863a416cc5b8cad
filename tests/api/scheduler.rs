use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_message, spawn_app, spawn_app_with, spawn_ti};

const CSV: &str = include_str!("../data/lookup.csv");
const SWARMPILOT: &str = include_str!("../data/lookup-swarmpilot.json");

#[tokio::test]
async fn every_strategy_can_be_set_and_info_reports_it() {
    let app = spawn_app().await;
    for name in ["round_robin", "weighted", "probabilistic", "shortest_queue"] {
        let (status, body) = app.post("/scheduler/set", json!({"name": name})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"status": "success", "message": "OK"}));
        let (_, info) = app.get("/scheduler/info").await;
        assert_eq!(info["strategy"], name);
    }
    let (_, info) = app.get("/scheduler/info").await;
    assert_eq!(info["predict_mode"], "default");
    assert_eq!(info["lookup_table_rows"], 0);
    assert_eq!(
        info["strategies"],
        json!(["shortest_queue", "round_robin", "weighted", "probabilistic"])
    );
    assert_eq!(info["predict_modes"], json!(["default", "lookup_table"]));
}

#[tokio::test]
async fn unknown_strategy_is_400_listing_the_valid_ones_and_changes_nothing() {
    let app = spawn_app().await;
    let (status, body) = app.post("/scheduler/set", json!({"name": "fastest"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["status"], "error");
    assert_eq!(
        body["message"],
        "unknown strategy 'fastest'; valid: shortest_queue, round_robin, weighted, probabilistic"
    );
    let (status, _) = app
        .post("/scheduler/set", json!({"name": "Round_Robin"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "names are case-sensitive");
    let (_, info) = app.get("/scheduler/info").await;
    assert_eq!(info["strategy"], "shortest_queue");
}

#[tokio::test]
async fn malformed_or_mistyped_bodies_are_400_naming_the_problem() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_raw("/scheduler/set", "application/json", "{")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{body}"
    );
    let (status, body) = app.post("/scheduler/set", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "missing field `name`");
    let (status, body) = app.post("/scheduler/set", json!({"name": 3})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "name: invalid type");
}

#[tokio::test]
async fn lookup_table_mode_without_a_table_is_409_saying_how_to_load_one() {
    let app = spawn_app().await;
    let (status, body) = app
        .post("/scheduler/predict_mode", json!({"mode": "lookup_table"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_message(&body, "/predictor/lookup_table");
    let (status, body) = app
        .post("/scheduler/predict_mode", json!({"mode": "fast"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "unknown predict mode 'fast'; valid: default, lookup_table"
    );
}

#[tokio::test]
async fn an_imported_csv_table_drives_lookup_table_mode_and_decisions_record_it() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_raw("/predictor/lookup_table", "text/csv", CSV)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], 4);
    let (status, _) = app
        .post("/scheduler/predict_mode", json!({"mode": "lookup_table"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, info) = app.get("/scheduler/info").await;
    assert_eq!(
        (
            info["predict_mode"].as_str(),
            info["lookup_table_rows"].as_i64()
        ),
        (Some("lookup_table"), Some(4))
    );

    let ti = spawn_ti("llama-7b", "A100", 10.0).await;
    app.register(&ti).await;
    let (hit, _) = app
        .submit(
            "llama-7b",
            json!({"input_tokens": 500, "output_tokens": 64}),
        )
        .await;
    // lookup_fallback is INTEGER 0/1 on SQLite, BOOLEAN on PostgreSQL.
    let decision = app
        .sql_row(&format!("SELECT predicted_ms, prediction_source, CASE WHEN lookup_fallback THEN 1 ELSE 0 END FROM decisions WHERE task_id = '{hit}'"))
        .await;
    assert_eq!(decision, [json!(1010.0), json!("lookup_table"), json!(0)]);

    let other = spawn_ti("other-model", "A100", 10.0).await;
    app.register(&other).await;
    let (miss, _) = app.submit("other-model", json!({})).await;
    let decision = app
        .sql_row(&format!(
            "SELECT prediction_source, CASE WHEN lookup_fallback THEN 1 ELSE 0 END FROM decisions WHERE task_id = '{miss}'"
        ))
        .await;
    assert_eq!(decision, [json!("prior"), json!(1)]);
}

#[tokio::test]
async fn a_swarmpilot_json_table_is_imported_and_appended() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_raw("/predictor/lookup_table", "application/json", SWARMPILOT)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], 2, "the failed record is skipped");
    let (status, body) = app
        .post_raw("/predictor/lookup_table?append=true", "text/csv", CSV)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], 6);
    assert_eq!(app.count("SELECT COUNT(*) FROM lookup_rows").await, 6);
}

#[tokio::test]
async fn a_malformed_table_is_400_naming_line_and_column_and_changes_nothing() {
    let app = spawn_app().await;
    let (status, _) = app
        .post_raw("/predictor/lookup_table", "text/csv", CSV)
        .await;
    assert_eq!(status, StatusCode::OK);
    let bad = "model_name,hardware,input_tokens,expect,error\nm,A100,10,5,1\nm,A100,ten,5,1\n";
    let (status, body) = app
        .post_raw("/predictor/lookup_table", "text/csv", bad)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_message(&body, "line 3, column 3 (input_tokens)");
    let (status, body) = app
        .post_raw(
            "/predictor/lookup_table",
            "application/json",
            "[{\"status\": \"success\",}",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("line 1, column"),
        "{body}"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM lookup_rows").await,
        4,
        "the old table is intact"
    );
}

#[tokio::test]
async fn the_admin_token_guards_admin_endpoints_when_configured() {
    let app = spawn_app_with(|s| s.server.admin_token = "s3cret".into()).await;
    let ti = spawn_ti("m-admin", "A100", 10.0).await;
    let register = json!({"host": "127.0.0.1", "port": ti.addr().port()});
    let cases = [
        ("/scheduler/set", json!({"name": "round_robin"})),
        ("/scheduler/predict_mode", json!({"mode": "default"})),
        ("/ti/register", register.clone()),
        (
            "/ti/remove",
            json!({"ti_uuid": "00000000-0000-4000-8000-000000000000"}),
        ),
    ];
    for (path, body) in &cases {
        let (status, answer) = app.post(path, body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {answer}");
        assert_eq!(answer["status"], "error");
        let wrong = app
            .client
            .post(app.url(path))
            .bearer_auth("wrong")
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, body) = app
        .post_raw("/predictor/lookup_table", "text/csv", CSV)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM task_instances").await,
        0,
        "nothing stored"
    );

    let resp = app
        .client
        .post(app.url("/ti/register"))
        .bearer_auth("s3cret")
        .json(&register)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, _) = app.get("/scheduler/info").await;
    assert_eq!(status, StatusCode::OK, "reads stay open");
}
