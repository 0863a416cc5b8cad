//! The lookup table of `lookup_table` mode: pre-computed predictions, their two import
//! formats (CSV and SwarmPilot JSON), and nearest-row matching.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use crate::domain::LookupRow;

/// A file that could not be imported; nothing from it is kept.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ImportError(pub String);

/// The rows of the table, grouped by model for matching.
#[derive(Debug, Default, Clone)]
pub struct LookupTable {
    by_model: HashMap<String, Vec<LookupRow>>,
    rows: usize,
}

impl LookupTable {
    /// A table of these rows.
    pub fn new(rows: Vec<LookupRow>) -> Self {
        let mut table = Self::default();
        table.extend(rows);
        table
    }

    /// Adds rows.
    pub fn extend(&mut self, rows: Vec<LookupRow>) {
        self.rows += rows.len();
        for row in rows {
            self.by_model
                .entry(row.model_name.clone())
                .or_default()
                .push(row);
        }
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when no row is loaded.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The row for `model` nearest to the task: hardware must agree when both sides name
    /// one (an exact hardware match beats a row for any hardware); among those, the
    /// smallest relative distance over the row's features (a feature the task lacks
    /// counts as far away).
    pub fn find(
        &self,
        model: &str,
        hardware: Option<&str>,
        metadata: &Map<String, Value>,
    ) -> Option<&LookupRow> {
        let rows = self.by_model.get(model)?;
        rows.iter()
            .filter(|row| match (row.hardware.as_deref(), hardware) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .map(|row| {
                let hardware_rank = u8::from(row.hardware.is_none() || hardware.is_none());
                (hardware_rank, distance(&row.features, metadata), row)
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
            .map(|(_, _, row)| row)
    }
}

fn distance(features: &BTreeMap<String, f64>, metadata: &Map<String, Value>) -> f64 {
    features
        .iter()
        .map(
            |(name, &at)| match metadata.get(name).and_then(Value::as_f64) {
                Some(x) => {
                    let scale = at.abs().max(x.abs()).max(1.0);
                    ((x - at) / scale).powi(2)
                }
                None => 1.0,
            },
        )
        .sum()
}

/// Parses a CSV table: a header, feature columns first (`model_name` required, `hardware`
/// optional, the rest numeric features; an empty cell means the row does not use that
/// feature), then `expect`, `error` and quantile columns (`q0.25`, `q0.5`, ...), all ms.
/// Errors name the line and column.
pub fn parse_csv(text: &str) -> Result<Vec<LookupRow>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| ImportError(format!("line 1: unreadable header: {e}")))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h == name);
    let missing = |name: &str| ImportError(format!("line 1: the header has no '{name}' column"));
    let model_col = column("model_name").ok_or_else(|| missing("model_name"))?;
    let expect_col = column("expect").ok_or_else(|| missing("expect"))?;
    let error_col = column("error").ok_or_else(|| missing("error"))?;
    let hardware_col = column("hardware");
    let mut feature_cols = Vec::new();
    let mut quantile_cols = Vec::new();
    for (i, name) in header.iter().enumerate() {
        if [
            Some(model_col),
            Some(expect_col),
            Some(error_col),
            hardware_col,
        ]
        .contains(&Some(i))
        {
            continue;
        }
        if i > expect_col {
            let q = name
                .strip_prefix('q')
                .and_then(|q| q.parse::<f64>().ok())
                .filter(|q| *q > 0.0 && *q < 1.0)
                .ok_or_else(|| {
                    ImportError(format!(
                        "line 1, column {}: '{name}' after 'expect' must be a quantile like q0.5",
                        i + 1
                    ))
                })?;
            quantile_cols.push((i, q.to_string()));
        } else if name.is_empty() {
            return Err(ImportError(format!(
                "line 1, column {}: empty column name",
                i + 1
            )));
        } else {
            feature_cols.push((i, name.to_string()));
        }
    }

    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            ImportError(format!("line {line}: {e}"))
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let cell = |i: usize| record.get(i).unwrap_or("");
        let number = |i: usize| -> Result<Option<f64>, ImportError> {
            let raw = cell(i);
            if raw.is_empty() {
                return Ok(None);
            }
            match raw.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ImportError(format!(
                    "line {line}, column {} ({}): '{raw}' is not a number",
                    i + 1,
                    &header[i]
                ))),
            }
        };
        let time = |i: usize| -> Result<f64, ImportError> {
            match number(i)? {
                Some(x) if x >= 0.0 => Ok(x),
                Some(x) => Err(ImportError(format!(
                    "line {line}, column {} ({}): {x} is negative",
                    i + 1,
                    &header[i]
                ))),
                None => Err(ImportError(format!(
                    "line {line}, column {} ({}): missing value",
                    i + 1,
                    &header[i]
                ))),
            }
        };
        let model_name = cell(model_col).to_string();
        if model_name.is_empty() {
            return Err(ImportError(format!(
                "line {line}, column {} (model_name): missing value",
                model_col + 1
            )));
        }
        let mut features = BTreeMap::new();
        for (i, name) in &feature_cols {
            if let Some(x) = number(*i)? {
                features.insert(name.clone(), x);
            }
        }
        let mut quantiles = BTreeMap::new();
        for (i, q) in &quantile_cols {
            quantiles.insert(q.clone(), time(*i)?);
        }
        rows.push(LookupRow {
            model_name,
            hardware: hardware_col
                .map(|i| cell(i).to_string())
                .filter(|h| !h.is_empty()),
            features,
            expect_ms: time(expect_col)?,
            error_ms: time(error_col)?,
            quantiles,
        });
    }
    Ok(rows)
}

/// Parses the JSON array format of SwarmPilot prediction files.
///
/// Records whose `status` is not `"success"` are skipped. The model is `model_type`, else
/// `model_info.type`; `model_info.hardware` narrows the match when present; an optional
/// `features` object gives numeric feature values. `expect` and `error` are taken from the
/// record when present, else derived from the quantiles: expect is the median (linearly
/// interpolated between the nearest quantiles), error is the interquartile range / 1.349
/// (the standard deviation of a normal law with that IQR), or, without both quartiles,
/// the spread between the outermost quantiles divided by the normal-law distance between
/// them.
pub fn parse_swarmpilot_json(text: &str) -> Result<Vec<LookupRow>, ImportError> {
    let records: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        ImportError(format!(
            "line {}, column {}: not a JSON array of records: {e}",
            e.line(),
            e.column()
        ))
    })?;
    let mut rows = Vec::new();
    for (index, record) in records.iter().enumerate() {
        let bad = |what: String| ImportError(format!("record {index}: {what}"));
        let record = record
            .as_object()
            .ok_or_else(|| bad("is not a JSON object".into()))?;
        if record.get("status").and_then(Value::as_str) != Some("success") {
            continue;
        }
        let info = record.get("model_info").and_then(Value::as_object);
        let model_name = record
            .get("model_type")
            .and_then(Value::as_str)
            .or_else(|| info.and_then(|i| i.get("type")).and_then(Value::as_str))
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("no model_type (or model_info.type)".into()))?;
        let hardware = info
            .and_then(|i| i.get("hardware"))
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_string);
        let numbers = |field: &str| -> Result<Vec<f64>, ImportError> {
            let Some(raw) = record.get(field) else {
                return Ok(Vec::new());
            };
            let list = raw
                .as_array()
                .ok_or_else(|| bad(format!("'{field}' is not an array")))?;
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| bad(format!("'{field}'[{i}] is not a number")))
                })
                .collect()
        };
        let levels = numbers("quantiles")?;
        let values = numbers("quantile_predictions")?;
        if levels.len() != values.len() {
            return Err(bad(format!(
                "'quantiles' has {} entries but 'quantile_predictions' has {}",
                levels.len(),
                values.len()
            )));
        }
        if let Some(i) = levels.iter().position(|q| !(*q > 0.0 && *q < 1.0)) {
            return Err(bad(format!("'quantiles'[{i}] must be between 0 and 1")));
        }
        if levels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("'quantiles' must be increasing".into()));
        }
        if let Some(i) = values.iter().position(|v| *v < 0.0) {
            return Err(bad(format!("'quantile_predictions'[{i}] is negative")));
        }
        let field = |name: &str| -> Result<Option<f64>, ImportError> {
            match record.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .map(Some)
                    .ok_or_else(|| bad(format!("'{name}' must be a non-negative number"))),
            }
        };
        let curve: Vec<(f64, f64)> = levels.iter().copied().zip(values.iter().copied()).collect();
        let expect_ms = match field("expect")? {
            Some(x) => x,
            None => median(&curve).ok_or_else(|| {
                bad("no 'expect' and no quantile predictions to derive it from".into())
            })?,
        };
        let error_ms = match field("error")? {
            Some(x) => x,
            None => spread(&curve).ok_or_else(|| {
                bad("no 'error' and fewer than two quantiles to derive it from".into())
            })?,
        };
        let mut features = BTreeMap::new();
        if let Some(raw) = record.get("features") {
            let map = raw
                .as_object()
                .ok_or_else(|| bad("'features' is not an object".into()))?;
            for (name, v) in map {
                let x = v
                    .as_f64()
                    .ok_or_else(|| bad(format!("feature '{name}' is not a number")))?;
                features.insert(name.clone(), x);
            }
        }
        rows.push(LookupRow {
            model_name: model_name.to_string(),
            hardware,
            features,
            expect_ms,
            error_ms,
            quantiles: curve.iter().map(|(q, v)| (q.to_string(), *v)).collect(),
        });
    }
    Ok(rows)
}

/// The value at quantile 0.5, interpolated linearly between the nearest given quantiles
/// (the nearest end when 0.5 is outside them).
fn median(curve: &[(f64, f64)]) -> Option<f64> {
    let first = curve.first()?;
    let last = curve.last()?;
    if 0.5 <= first.0 {
        return Some(first.1);
    }
    if 0.5 >= last.0 {
        return Some(last.1);
    }
    curve.windows(2).find_map(|w| {
        let ((q0, v0), (q1, v1)) = (w[0], w[1]);
        (q0..=q1)
            .contains(&0.5)
            .then(|| v0 + (v1 - v0) * (0.5 - q0) / (q1 - q0))
    })
}

/// A standard deviation from the quantiles: IQR / 1.349 when both quartiles are given,
/// else the outermost spread over the normal law's distance between those quantiles.
fn spread(curve: &[(f64, f64)]) -> Option<f64> {
    let at = |q: f64| {
        curve
            .iter()
            .find(|(l, _)| (l - q).abs() < 1e-9)
            .map(|p| p.1)
    };
    if let (Some(q1), Some(q3)) = (at(0.25), at(0.75)) {
        return Some((q3 - q1).max(0.0) / 1.349);
    }
    let (lo, hi) = (curve.first()?, curve.last()?);
    if curve.len() < 2 {
        return None;
    }
    let z = normal_quantile(hi.0) - normal_quantile(lo.0);
    Some((hi.1 - lo.1).max(0.0) / z)
}

/// The standard normal quantile function (Acklam's rational approximation, |error| < 1.2e-9).
// The coefficients are quoted as published.
#[allow(clippy::excessive_precision)]
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CSV: &str = include_str!("../../tests/data/lookup.csv");
    const JSON: &str = include_str!("../../tests/data/lookup-swarmpilot.json");

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn csv_rows_keep_features_times_and_quantiles() {
        let rows = parse_csv(CSV).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].model_name, "llama-7b");
        assert_eq!(rows[0].hardware.as_deref(), Some("A100"));
        assert_eq!(rows[0].features["input_tokens"], 128.0);
        assert_eq!(rows[0].features["output_tokens"], 64.0);
        assert_eq!(rows[0].expect_ms, 820.5);
        assert_eq!(rows[0].error_ms, 95.2);
        assert_eq!(rows[0].quantiles["0.99"], 1090.0);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let bad = "model_name,input_tokens,expect,error\nm,10,5,1\nm,abc,5,1\n";
        let err = parse_csv(bad).unwrap_err().0;
        assert!(err.contains("line 3, column 2 (input_tokens)"), "{err}");
        let neg = "model_name,expect,error\nm,-5,1\n";
        assert!(parse_csv(neg)
            .unwrap_err()
            .0
            .contains("line 2, column 2 (expect)"));
        let no_expect = "model_name,error\nm,1\n";
        assert!(parse_csv(no_expect).unwrap_err().0.contains("'expect'"));
    }

    #[test]
    fn swarmpilot_records_skip_failures_and_derive_expect_and_error() {
        let rows = parse_swarmpilot_json(JSON).unwrap();
        assert_eq!(rows.len(), 2, "the failed record is skipped");
        assert_eq!(rows[0].model_name, "ocr-rec");
        assert_eq!(rows[0].hardware.as_deref(), Some("A100"));
        assert_eq!(rows[0].expect_ms, 209.48);
        let iqr_sigma = (248.25 - 182.61) / 1.349;
        assert!((rows[0].error_ms - iqr_sigma).abs() < 1e-9);
        assert_eq!(rows[1].model_name, "ocr-det");
    }

    #[test]
    fn swarmpilot_errors_name_the_record_or_position() {
        let err = parse_swarmpilot_json("[{\"status\": \"success\"}]")
            .unwrap_err()
            .0;
        assert!(
            err.contains("record 0") && err.contains("model_type"),
            "{err}"
        );
        let err = parse_swarmpilot_json("[\n{\"status\": }]").unwrap_err().0;
        assert!(err.starts_with("line 2, column"), "{err}");
    }

    #[test]
    fn median_interpolates_and_spread_falls_back_to_outer_quantiles() {
        assert_eq!(median(&[(0.25, 100.0), (0.75, 200.0)]), Some(150.0));
        let s = spread(&[(0.1, 100.0), (0.9, 356.31)]).unwrap();
        assert!((s - 100.0).abs() < 0.1, "{s}");
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
    }

    #[test]
    fn matching_prefers_exact_hardware_then_nearest_features() {
        let table = LookupTable::new(parse_csv(CSV).unwrap());
        let near = |hw, m| table.find("llama-7b", hw, &meta(m)).map(|r| r.expect_ms);
        assert_eq!(
            near(
                Some("A100"),
                json!({"input_tokens": 500, "output_tokens": 60})
            ),
            Some(1010.0)
        );
        assert_eq!(
            near(
                Some("A100"),
                json!({"input_tokens": 130, "output_tokens": 64})
            ),
            Some(820.5)
        );
        assert_eq!(
            near(Some("H100"), json!({"input_tokens": 130})),
            Some(1710.0)
        );
        assert_eq!(
            near(Some("T4"), json!({})),
            None,
            "hardware must agree when both name one"
        );
        assert!(table.find("unknown", None, &meta(json!({}))).is_none());
    }
}
