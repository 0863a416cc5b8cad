//! The learned execution-time model of `default` mode: one online regression per model and
//! hardware, trained from the actual execution times of completed tasks.
//!
//! The mean is a linear function of the task's token counts, fitted by recursive least
//! squares (RLS): every completion updates the coefficients in O(d²) with d = 3 (intercept,
//! input tokens, output tokens), no history kept, exact least squares at every step.
//! Inference services' times are close to linear in tokens (prefill ∝ input, decode ∝
//! output), which is what makes this the right shape.
//!
//! The spread is modelled *relative* to the mean: execution-time noise is multiplicative
//! (a 2 000-token task varies by more milliseconds than a 20-token one), so a single
//! residual variance in ms would be too wide for small tasks and too narrow for large
//! ones. Each completion's a-priori relative residual `(actual − predicted) / predicted`
//! feeds a running mean square; the predicted error is `predicted · rms`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Features, each read from the first of its metadata names that is a number (else 0).
pub const FEATURES: [(&str, &[&str]); 2] = [
    ("input_tokens", &["input_tokens", "prompt_tokens"]),
    ("output_tokens", &["output_tokens", "max_tokens"]),
];

const DIM: usize = FEATURES.len() + 1;
/// Token counts are scaled to thousands to keep the RLS matrix well conditioned.
const SCALE: f64 = 1.0 / 1000.0;
/// Initial P = δ·I: a flat prior on the coefficients.
const DELTA: f64 = 1.0e6;
/// Completions before the model's predictions are trusted (and residuals are counted).
pub const WARM_AFTER: u64 = 20;
/// No prediction is more certain than this, relative to its mean.
const MIN_RELATIVE_ERROR: f64 = 0.01;

/// One RLS regression with its relative residual statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineModel {
    /// Completions learned from.
    pub n: u64,
    /// Coefficients: intercept (ms), then ms per thousand of each feature.
    pub theta: [f64; DIM],
    /// The RLS inverse-covariance matrix.
    pub p: [[f64; DIM]; DIM],
    /// Relative residuals counted (after warm-up).
    pub residuals: u64,
    /// Sum of squared relative residuals.
    pub residual_sq_sum: f64,
}

impl Default for OnlineModel {
    fn default() -> Self {
        let mut p = [[0.0; DIM]; DIM];
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = DELTA;
        }
        Self {
            n: 0,
            theta: [0.0; DIM],
            p,
            residuals: 0,
            residual_sq_sum: 0.0,
        }
    }
}

/// The feature vector of a task: 1, then each feature scaled.
pub fn features(metadata: &Map<String, Value>) -> [f64; DIM] {
    let mut x = [1.0; DIM];
    for (i, (_, names)) in FEATURES.iter().enumerate() {
        x[i + 1] = names
            .iter()
            .find_map(|n| metadata.get(*n).and_then(Value::as_f64))
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(0.0)
            * SCALE;
    }
    x
}

fn dot(a: &[f64; DIM], b: &[f64; DIM]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl OnlineModel {
    /// True once it has learned enough to be used.
    pub fn is_warm(&self) -> bool {
        self.n >= WARM_AFTER && self.residuals > 0
    }

    /// The expected execution time (ms, never below 0) and its error.
    pub fn predict(&self, x: &[f64; DIM]) -> (f64, f64) {
        let mean = dot(&self.theta, x).max(0.0);
        let rms = if self.residuals > 0 {
            (self.residual_sq_sum / self.residuals as f64).sqrt()
        } else {
            0.0
        };
        (mean, mean * rms.max(MIN_RELATIVE_ERROR))
    }

    /// Learns from one completion.
    pub fn observe(&mut self, x: &[f64; DIM], actual_ms: f64) {
        if !actual_ms.is_finite() || actual_ms < 0.0 {
            return;
        }
        let predicted = dot(&self.theta, x);
        if self.n >= WARM_AFTER {
            let relative = (actual_ms - predicted) / predicted.max(1.0);
            self.residuals += 1;
            self.residual_sq_sum += relative * relative;
        }
        // k = P x / (1 + xᵀ P x); θ += k (y − θᵀx); P −= k xᵀ P.
        let mut px = [0.0; DIM];
        for (i, row) in self.p.iter().enumerate() {
            px[i] = dot(row, x);
        }
        let denominator = 1.0 + dot(x, &px);
        let k = px.map(|v| v / denominator);
        let error = actual_ms - predicted;
        for (t, ki) in self.theta.iter_mut().zip(&k) {
            *t += ki * error;
        }
        // P is symmetric, so xᵀP = (Px)ᵀ.
        for (i, row) in self.p.iter_mut().enumerate() {
            for (j, cell) in row.iter_mut().enumerate() {
                *cell -= k[i] * px[j];
            }
        }
        self.n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, LogNormal};
    use serde_json::json;

    fn task(input: f64, output: f64) -> Map<String, Value> {
        json!({"input_tokens": input, "output_tokens": output})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn it_learns_a_known_linear_law_exactly_without_noise() {
        let mut m = OnlineModel::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let (i, o) = (
                rng.random_range(10.0..2000.0),
                rng.random_range(10.0..500.0),
            );
            m.observe(&features(&task(i, o)), 25.0 + 0.05 * i + 2.0 * o);
        }
        let (mean, error) = m.predict(&features(&task(1000.0, 100.0)));
        assert!((mean - 275.0).abs() < 0.01, "{mean}");
        assert!(error <= 275.0 * 0.011, "{error}");
        assert!(
            (m.theta[0] - 25.0).abs() < 0.01 && (m.theta[2] - 2000.0).abs() < 0.1,
            "{:?}",
            m.theta
        );
    }

    #[test]
    fn with_ten_percent_noise_the_mean_is_close_and_the_error_is_about_ten_percent() {
        let mut m = OnlineModel::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let noise = LogNormal::new(-0.005, 0.1).unwrap();
        for _ in 0..1000 {
            let (i, o) = (
                rng.random_range(16.0..2048.0),
                rng.random_range(16.0..512.0),
            );
            m.observe(
                &features(&task(i, o)),
                (40.0 + 0.1 * i + 3.0 * o) * noise.sample(&mut rng),
            );
        }
        let truth = 40.0 + 0.1 * 800.0 + 3.0 * 200.0;
        let (mean, error) = m.predict(&features(&task(800.0, 200.0)));
        assert!((mean - truth).abs() / truth < 0.02, "{mean} vs {truth}");
        let relative = error / mean;
        assert!((0.08..0.13).contains(&relative), "{relative}");
    }

    #[test]
    fn it_is_cold_until_warm_after_completions() {
        let mut m = OnlineModel::default();
        for k in 0..WARM_AFTER {
            assert!(!m.is_warm());
            m.observe(&features(&task(k as f64, 1.0)), 10.0);
        }
        m.observe(&features(&task(1.0, 1.0)), 10.0);
        assert!(m.is_warm());
    }

    #[test]
    fn max_tokens_stands_in_for_output_tokens_and_bad_values_count_as_zero() {
        let x = features(
            &json!({"max_tokens": 500, "input_tokens": "many"})
                .as_object()
                .cloned()
                .unwrap(),
        );
        assert_eq!(x, [1.0, 0.0, 0.5]);
    }
}
