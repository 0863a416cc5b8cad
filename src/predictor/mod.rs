//! Execution-time prediction (README, Prediction).
//!
//! For a task and a candidate TI, [`Predictor::predict`] gives the expected execution time
//! and its error (standard deviation), in ms, and says which source gave it. The `default`
//! chain, in order: the learned model of the model on that hardware (then on any
//! hardware) once it is warm ([`learned`]); a hint in the task's metadata (`expected_ms`
//! or `server_time_cost`); a lookup-table row; the running mean of actual execution times
//! (on that hardware, then on any); the configured prior. In `lookup_table` mode the table
//! is asked first and a miss falls back to that chain, which the decision records.
//! Completions feed [`Predictor::observe`], whose changed state the caller persists.

pub mod learned;
mod lookup;

use std::collections::HashMap;

use serde_json::{Map, Value};

pub use learned::OnlineModel;
pub use lookup::{parse_csv, parse_swarmpilot_json, ImportError, LookupTable};

use crate::domain::{LookupRow, PredictMode};
use crate::store::{Db, ExecutionStats, LearnedRepo, StatsRepo, StoreError, TaskRepo};

/// A learned model as the store keeps it.
pub type StoredModel = crate::store::StoredModel<OnlineModel>;

/// Relative error given to a metadata hint that does not state its own
/// (`expected_error_ms`).
const HINT_RELATIVE_ERROR: f64 = 0.2;

/// Parses a lookup table: CSV for `text/csv`, SwarmPilot JSON for `application/json`;
/// otherwise by its first character (`[` is JSON).
pub fn parse_table(content_type: Option<&str>, text: &str) -> Result<Vec<LookupRow>, ImportError> {
    let json = match content_type {
        Some(ct) if ct.starts_with("text/csv") => false,
        Some(ct) if ct.contains("json") => true,
        _ => text.trim_start().starts_with('['),
    };
    let rows = if json {
        parse_swarmpilot_json(text)?
    } else {
        parse_csv(text)?
    };
    if rows.is_empty() {
        return Err(ImportError("the table has no usable rows".into()));
    }
    Ok(rows)
}

/// Where a prediction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionSource {
    /// The learned regression.
    Learned,
    /// `expected_ms` / `server_time_cost` in the task's metadata.
    MetadataHint,
    /// A lookup-table row.
    LookupTable,
    /// The running mean of actual execution times.
    RunningMean,
    /// The configured prior.
    Prior,
}

impl PredictionSource {
    /// Name stored in decision rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Learned => "learned",
            Self::MetadataHint => "metadata_hint",
            Self::LookupTable => "lookup_table",
            Self::RunningMean => "running_mean",
            Self::Prior => "prior",
        }
    }
}

/// An expected execution time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Mean, ms.
    pub mean_ms: f64,
    /// Standard deviation, ms.
    pub error_ms: f64,
    /// Which source gave it.
    pub source: PredictionSource,
    /// lookup_table mode found no row, so the default chain answered.
    pub lookup_fallback: bool,
}

/// The predictor's state: learned models, the lookup table and running statistics.
#[derive(Debug, Clone)]
pub struct Predictor {
    lookup: LookupTable,
    /// Model name → hardware (`""` = any) → running statistics.
    stats: HashMap<String, HashMap<String, ExecutionStats>>,
    /// Model name → hardware (`""` = any) → learned regression.
    learned: HashMap<String, HashMap<String, OnlineModel>>,
    prior_ms: f64,
    prior_error_ms: f64,
    /// (model, hardware) pairs changed since the last [`Predictor::take_changed`].
    changed: std::collections::HashSet<(String, String)>,
}

/// Learned state to persist: what changed since the last save, or all of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Running statistics rows.
    pub stats: Vec<ExecutionStats>,
    /// Learned models.
    pub models: Vec<StoredModel>,
}

/// The entry for (model, hardware) of a nested map, looked up without allocating.
fn entry_of<'a, T>(
    map: &'a HashMap<String, HashMap<String, T>>,
    model: &str,
    hardware: &str,
) -> Option<&'a T> {
    map.get(model).and_then(|m| m.get(hardware))
}

impl Predictor {
    /// A predictor with this prior, table, statistics and learned models.
    pub fn new(
        prior_ms: f64,
        prior_error_ms: f64,
        lookup: Vec<LookupRow>,
        stats: Vec<ExecutionStats>,
        learned: Vec<StoredModel>,
    ) -> Self {
        let mut predictor = Self {
            lookup: LookupTable::new(lookup),
            stats: HashMap::new(),
            learned: HashMap::new(),
            prior_ms,
            prior_error_ms,
            changed: std::collections::HashSet::new(),
        };
        for s in stats {
            predictor
                .stats
                .entry(s.model_name.clone())
                .or_default()
                .insert(s.hardware.clone(), s);
        }
        for m in learned {
            predictor
                .learned
                .entry(m.model_name)
                .or_default()
                .insert(m.hardware, m.model);
        }
        predictor
    }

    /// Rows in the lookup table.
    pub fn lookup_rows(&self) -> usize {
        self.lookup.len()
    }

    /// Replaces the lookup table, or adds to it.
    pub fn load_lookup(&mut self, rows: Vec<LookupRow>, append: bool) {
        if append {
            self.lookup.extend(rows);
        } else {
            self.lookup = LookupTable::new(rows);
        }
    }

    /// The expected execution time of a task of `model` on a TI with `hardware`.
    /// The TI's hardware wins over a `hardware` named in the metadata.
    pub fn predict(
        &self,
        mode: PredictMode,
        model: &str,
        hardware: Option<&str>,
        metadata: &Map<String, Value>,
    ) -> Prediction {
        let hardware = hardware.or_else(|| metadata.get("hardware").and_then(Value::as_str));
        if mode == PredictMode::LookupTable {
            if let Some(p) = self.lookup_prediction(model, hardware, metadata) {
                return p;
            }
            let mut p = self.default_chain(model, hardware, metadata, false);
            p.lookup_fallback = true;
            return p;
        }
        self.default_chain(model, hardware, metadata, true)
    }

    fn default_chain(
        &self,
        model: &str,
        hardware: Option<&str>,
        metadata: &Map<String, Value>,
        ask_lookup: bool,
    ) -> Prediction {
        let prediction = |mean_ms: f64, error_ms: f64, source| Prediction {
            mean_ms,
            error_ms,
            source,
            lookup_fallback: false,
        };
        let warm = |hw: &str| entry_of(&self.learned, model, hw).filter(|m| m.is_warm());
        if let Some(m) = hardware.and_then(warm).or_else(|| warm("")) {
            let (mean, error) = m.predict(&learned::features(metadata));
            return prediction(mean, error, PredictionSource::Learned);
        }
        let hint = ["expected_ms", "server_time_cost"]
            .iter()
            .find_map(|k| metadata.get(*k).and_then(Value::as_f64))
            .filter(|x| x.is_finite() && *x >= 0.0);
        if let Some(mean) = hint {
            let error = metadata
                .get("expected_error_ms")
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x >= 0.0)
                .unwrap_or(mean * HINT_RELATIVE_ERROR);
            return prediction(mean, error, PredictionSource::MetadataHint);
        }
        if ask_lookup {
            if let Some(p) = self.lookup_prediction(model, hardware, metadata) {
                return p;
            }
        }
        let running = hardware
            .and_then(|hw| entry_of(&self.stats, model, hw))
            .or_else(|| entry_of(&self.stats, model, ""))
            .filter(|s| s.n > 0);
        if let Some(s) = running {
            let error = if s.n > 1 {
                (s.m2 / (s.n - 1) as f64).sqrt()
            } else {
                // One observation says nothing of the spread; assume the prior's
                // relative error.
                s.mean_ms * self.prior_error_ms / self.prior_ms.max(f64::EPSILON)
            };
            return prediction(s.mean_ms, error, PredictionSource::RunningMean);
        }
        prediction(self.prior_ms, self.prior_error_ms, PredictionSource::Prior)
    }

    fn lookup_prediction(
        &self,
        model: &str,
        hardware: Option<&str>,
        metadata: &Map<String, Value>,
    ) -> Option<Prediction> {
        self.lookup
            .find(model, hardware, metadata)
            .map(|row| Prediction {
                mean_ms: row.expect_ms,
                error_ms: row.error_ms,
                source: PredictionSource::LookupTable,
                lookup_fallback: false,
            })
    }

    /// Learns from a successful execution: the running statistics and the learned models
    /// of the model on that hardware and on any hardware. What changed is kept for
    /// [`Predictor::take_changed`].
    pub fn observe(
        &mut self,
        model: &str,
        hardware: Option<&str>,
        metadata: &Map<String, Value>,
        execution_ms: f64,
    ) {
        if !execution_ms.is_finite() || execution_ms < 0.0 {
            return;
        }
        let x = learned::features(metadata);
        let keys = std::iter::once("").chain(hardware.filter(|h| !h.is_empty()));
        for hw in keys {
            let s = self
                .stats
                .entry(model.to_string())
                .or_default()
                .entry(hw.to_string())
                .or_insert_with(|| ExecutionStats {
                    model_name: model.to_string(),
                    hardware: hw.to_string(),
                    ..ExecutionStats::default()
                });
            s.n += 1;
            let delta = execution_ms - s.mean_ms;
            s.mean_ms += delta / s.n as f64;
            s.m2 += delta * (execution_ms - s.mean_ms);

            let m = self
                .learned
                .entry(model.to_string())
                .or_default()
                .entry(hw.to_string())
                .or_default();
            m.observe(&x, execution_ms);
            self.changed.insert((model.to_string(), hw.to_string()));
        }
    }

    /// The current state of everything changed since the last call, to persist.
    pub fn take_changed(&mut self) -> Observed {
        let mut out = Observed::default();
        for (model, hw) in std::mem::take(&mut self.changed) {
            if let Some(s) = entry_of(&self.stats, &model, &hw) {
                out.stats.push(s.clone());
            }
            if let Some(m) = entry_of(&self.learned, &model, &hw) {
                out.models.push(StoredModel {
                    model_name: model,
                    hardware: hw,
                    model: m.clone(),
                });
            }
        }
        out
    }

    /// Everything it has learned, as rows to persist.
    pub fn snapshot(&self) -> Observed {
        let mut all = Observed::default();
        for by_hw in self.stats.values() {
            all.stats.extend(by_hw.values().cloned());
        }
        for (model, by_hw) in &self.learned {
            for (hw, m) in by_hw {
                all.models.push(StoredModel {
                    model_name: model.clone(),
                    hardware: hw.clone(),
                    model: m.clone(),
                });
            }
        }
        all
    }
}

/// What a retrain did.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrainReport {
    /// Successful executions learned from.
    pub executions: usize,
    /// Learned models written.
    pub models: usize,
}

/// Rebuilds the learned models and running statistics from the task history, replacing
/// what is stored. Run it while the service is stopped (a running service keeps its own
/// state in memory and would overwrite it with the next completion).
pub async fn retrain(db: &Db) -> Result<RetrainReport, StoreError> {
    let history = TaskRepo::executions(&db.read).await?;
    let mut predictor = Predictor::new(0.0, 0.0, Vec::new(), Vec::new(), Vec::new());
    for e in &history {
        let metadata: Map<String, Value> = serde_json::from_str(&e.metadata).unwrap_or_default();
        predictor.observe(
            &e.model_name,
            e.hardware.as_deref(),
            &metadata,
            e.execution_time_ms,
        );
    }
    let learned = predictor.snapshot();
    let models = learned.models.len();
    db.writer
        .run(move |conn| {
            StatsRepo::clear(conn)?;
            LearnedRepo::clear(conn)?;
            for s in &learned.stats {
                StatsRepo::save(conn, s)?;
            }
            for m in &learned.models {
                LearnedRepo::save(conn, m)?;
            }
            Ok(())
        })
        .await?;
    Ok(RetrainReport {
        executions: history.len(),
        models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn table() -> Vec<LookupRow> {
        parse_csv(include_str!("../../tests/data/lookup.csv")).unwrap()
    }

    #[test]
    fn the_fallback_chain_goes_hint_then_lookup_then_running_mean_then_prior() {
        let mut p = Predictor::new(1000.0, 500.0, Vec::new(), Vec::new(), Vec::new());
        let m = meta(json!({"input_tokens": 128, "output_tokens": 64}));
        let source = |p: &Predictor, m: &Map<String, Value>| {
            p.predict(PredictMode::Default, "llama-7b", Some("A100"), m)
                .source
        };
        assert_eq!(source(&p, &m), PredictionSource::Prior);
        p.observe("llama-7b", Some("A100"), &Map::new(), 300.0);
        assert_eq!(source(&p, &m), PredictionSource::RunningMean);
        p.load_lookup(table(), false);
        assert_eq!(source(&p, &m), PredictionSource::LookupTable);
        let hinted = meta(json!({"input_tokens": 128, "expected_ms": 42.0}));
        let hint = p.predict(PredictMode::Default, "llama-7b", Some("A100"), &hinted);
        assert_eq!(hint.source, PredictionSource::MetadataHint);
        assert_eq!(hint.mean_ms, 42.0);
    }

    #[test]
    fn a_warm_learned_model_comes_first_per_hardware() {
        let mut p = Predictor::new(1000.0, 500.0, table(), Vec::new(), Vec::new());
        let task =
            |i: f64| meta(json!({"input_tokens": i, "output_tokens": 64, "expected_ms": 5.0}));
        for k in 0..=learned::WARM_AFTER {
            let i = 100.0 + k as f64 * 10.0;
            p.observe("llama-7b", Some("A100"), &task(i), 10.0 + i);
        }
        let on_a100 = p.predict(PredictMode::Default, "llama-7b", Some("A100"), &task(500.0));
        assert_eq!(on_a100.source, PredictionSource::Learned);
        assert!((on_a100.mean_ms - 510.0).abs() < 0.5, "{on_a100:?}");
        let elsewhere = p.predict(PredictMode::Default, "llama-7b", Some("H100"), &task(500.0));
        assert_eq!(
            elsewhere.source,
            PredictionSource::Learned,
            "the all-hardware model stands in"
        );
        let lookup_first = p.predict(
            PredictMode::LookupTable,
            "llama-7b",
            Some("A100"),
            &task(128.0),
        );
        assert_eq!(lookup_first.source, PredictionSource::LookupTable);
        let snapshot = p.snapshot();
        assert_eq!((snapshot.stats.len(), snapshot.models.len()), (2, 2));
    }

    #[test]
    fn lookup_mode_asks_the_table_first_and_records_a_miss() {
        let p = Predictor::new(1000.0, 500.0, table(), Vec::new(), Vec::new());
        let hinted = meta(json!({"input_tokens": 128, "output_tokens": 64, "expected_ms": 42.0}));
        let hit = p.predict(PredictMode::LookupTable, "llama-7b", Some("A100"), &hinted);
        assert_eq!(
            (hit.source, hit.mean_ms, hit.lookup_fallback),
            (PredictionSource::LookupTable, 820.5, false)
        );
        let miss = p.predict(PredictMode::LookupTable, "other", None, &hinted);
        assert_eq!(
            (miss.source, miss.lookup_fallback),
            (PredictionSource::MetadataHint, true)
        );
    }

    #[test]
    fn running_statistics_follow_welford() {
        let mut p = Predictor::new(1000.0, 500.0, Vec::new(), Vec::new(), Vec::new());
        for x in [100.0, 200.0, 300.0] {
            p.observe("m", Some("A100"), &Map::new(), x);
        }
        p.take_changed();
        p.observe("m", None, &Map::new(), 400.0);
        let changed = p.take_changed();
        assert_eq!((changed.stats.len(), changed.models.len()), (1, 1));
        let on_a100 = p.predict(PredictMode::Default, "m", Some("A100"), &Map::new());
        assert_eq!(on_a100.mean_ms, 200.0);
        assert!((on_a100.error_ms - 100.0).abs() < 1e-9);
        let anywhere = p.predict(PredictMode::Default, "m", Some("T4"), &Map::new());
        assert_eq!(anywhere.mean_ms, 250.0);
    }
}
