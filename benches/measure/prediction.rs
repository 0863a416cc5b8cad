//! `cargo bench --bench measure -- prediction`: accuracy of the `default` predictor on the simulated
//! workload, against the running-mean baseline.
//!
//! It feeds the product's [`Predictor`] one completion at a time (random task, random
//! hardware, actual time = law × lognormal noise), exactly as the service does on each
//! callback, and at each checkpoint measures the mean absolute percentage error on a
//! fixed held-out set of 500 tasks, and how often the actual time falls within the
//! predicted mean ± 2 errors. The baseline predicts the running mean of the actual times
//! on that hardware. No HTTP is involved: this isolates the model from queueing.

use rand::{Rng, SeedableRng};
use rand_distr::Distribution;
use serde_json::{Map, Value};

use super::workload::{self, HARDWARE, MODEL};
use ti_scheduler::domain::PredictMode;
use ti_scheduler::predictor::Predictor;
use ti_scheduler::ti::sim::noise_law;

/// Options of the prediction benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictionArgs {
    /// Completions after which accuracy is measured.
    #[arg(long, value_delimiter = ',', default_value = "20,50,200,1000")]
    pub checkpoints: Vec<usize>,
    /// σ of the lognormal noise (0.1 ≈ 10 %).
    #[arg(long, default_value_t = 0.1)]
    pub noise: f64,
    /// Held-out tasks per checkpoint.
    #[arg(long, default_value_t = 500)]
    pub test_tasks: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// One checkpoint's figures.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Completions learned from.
    pub completions: usize,
    /// MAPE of the default predictor, %.
    pub default_mape: f64,
    /// MAPE of the running mean, %.
    pub running_mean_mape: f64,
    /// Share of held-out actual times within the default prediction ± 2 errors, %.
    pub coverage_2sigma: f64,
    /// Where the default predictor's answers came from.
    pub source: &'static str,
}

struct Task {
    hw: usize,
    metadata: Map<String, Value>,
    actual_ms: f64,
}

/// Runs the benchmark.
pub fn run(args: &PredictionArgs) -> Vec<Checkpoint> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let configs: Vec<_> = HARDWARE
        .iter()
        .map(|hw| workload::sim_config(*hw, 1.0, args.noise, 0))
        .collect();
    let noise = noise_law(args.noise);
    let draw = |rng: &mut rand::rngs::StdRng| {
        let hw = rng.random_range(0..HARDWARE.len());
        let metadata = workload::task_metadata(rng);
        let factor = noise.map_or(1.0, |d| d.sample(rng));
        let actual_ms = configs[hw].law_ms(&metadata) * factor;
        Task {
            hw,
            metadata: metadata.as_object().cloned().unwrap_or_default(),
            actual_ms,
        }
    };
    let test: Vec<Task> = (0..args.test_tasks).map(|_| draw(&mut rng)).collect();

    let mut predictor = Predictor::new(1000.0, 500.0, Vec::new(), Vec::new(), Vec::new());
    let mut running = vec![(0usize, 0.0f64); HARDWARE.len()];
    let mut checkpoints = Vec::new();
    let last = args.checkpoints.iter().copied().max().unwrap_or(0);
    for done in 1..=last {
        let task = draw(&mut rng);
        predictor.observe(
            MODEL,
            Some(HARDWARE[task.hw].name),
            &task.metadata,
            task.actual_ms,
        );
        let (n, mean) = &mut running[task.hw];
        *n += 1;
        *mean += (task.actual_ms - *mean) / *n as f64;
        if !args.checkpoints.contains(&done) {
            continue;
        }
        let mut default_ape = 0.0;
        let mut baseline_ape = 0.0;
        let mut covered = 0usize;
        let mut source = "";
        for t in &test {
            let p = predictor.predict(
                PredictMode::Default,
                MODEL,
                Some(HARDWARE[t.hw].name),
                &t.metadata,
            );
            source = p.source.as_str();
            default_ape += (p.mean_ms - t.actual_ms).abs() / t.actual_ms;
            if (p.mean_ms - t.actual_ms).abs() <= 2.0 * p.error_ms {
                covered += 1;
            }
            let baseline = running[t.hw].1;
            baseline_ape += (baseline - t.actual_ms).abs() / t.actual_ms;
        }
        let n = test.len() as f64;
        checkpoints.push(Checkpoint {
            completions: done,
            default_mape: 100.0 * default_ape / n,
            running_mean_mape: 100.0 * baseline_ape / n,
            coverage_2sigma: 100.0 * covered as f64 / n,
            source,
        });
    }
    checkpoints
}

/// Prints the checkpoints as a Markdown table.
pub fn print(args: &PredictionArgs, checkpoints: &[Checkpoint]) {
    println!(
        "Prediction accuracy: token-linear law, {:.0}% lognormal noise, hardware {} (×{}), {} held-out tasks, seed {}",
        args.noise * 100.0,
        HARDWARE.map(|h| h.name).join(" and "),
        HARDWARE.map(|h| h.slowness.to_string()).join(", ×"),
        args.test_tasks,
        args.seed
    );
    println!();
    println!(
        "| completions | default MAPE | source | running-mean MAPE | actual within ±2σ (default) |"
    );
    println!("|---:|---:|---|---:|---:|");
    for c in checkpoints {
        println!(
            "| {} | {:.1}% | {} | {:.1}% | {:.1}% |",
            c.completions, c.default_mape, c.source, c.running_mean_mape, c.coverage_2sigma
        );
    }
}
