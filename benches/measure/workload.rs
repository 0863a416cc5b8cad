//! The simulated workload the benchmarks share: LLM-like tasks whose execution time is
//! linear in their token counts, on two kinds of hardware, with multiplicative noise.

use rand::Rng;
use serde_json::{json, Value};

use ti_scheduler::ti::openai_sim::OpenAiSimConfig;
use ti_scheduler::ti::sim::SimConfig;

/// The model every benchmark task asks for.
pub const MODEL: &str = "llama-7b";

/// A kind of hardware: its name and how much slower than the fast kind it is.
#[derive(Debug, Clone, Copy)]
pub struct Hardware {
    /// Reported in `GET /info`.
    pub name: &'static str,
    /// Multiplies every term of the law.
    pub slowness: f64,
}

/// The fast and the slow kind.
pub const HARDWARE: [Hardware; 2] = [
    Hardware {
        name: "A100",
        slowness: 1.0,
    },
    Hardware {
        name: "T4",
        slowness: 2.5,
    },
];

/// Token counts are drawn uniformly from these ranges.
pub const INPUT_TOKENS: (u32, u32) = (16, 2048);
/// See [`INPUT_TOKENS`].
pub const OUTPUT_TOKENS: (u32, u32) = (16, 512);

/// The simulated TI of one hardware kind: `20 + 0.02·input + 0.4·output` ms on the fast
/// kind, times `slowness`, times `time_scale`, with lognormal noise of σ `noise`.
pub fn sim_config(hw: Hardware, time_scale: f64, noise: f64, seed: u64) -> SimConfig {
    let k = hw.slowness * time_scale;
    SimConfig {
        model: MODEL.into(),
        hardware: Some(hw.name.into()),
        parallelism: 1,
        base_ms: 20.0 * k,
        per_input_token_ms: 0.02 * k,
        per_output_token_ms: 0.4 * k,
        noise,
        seed,
        ..SimConfig::default()
    }
}

/// The simulated OpenAI-compatible server of one hardware kind running `concurrency`
/// requests at once, with the same law as [`sim_config`] (prompt tokens for input tokens,
/// completion tokens for output tokens). Each completion takes a share of `max_tokens`
/// drawn uniformly from `[min_completion_share, 1]`.
pub fn openai_config(
    hw: Hardware,
    concurrency: usize,
    time_scale: f64,
    noise: f64,
    min_completion_share: f64,
    seed: u64,
) -> OpenAiSimConfig {
    let k = hw.slowness * time_scale;
    OpenAiSimConfig {
        model: MODEL.into(),
        concurrency,
        base_ms: 20.0 * k,
        per_input_token_ms: 0.02 * k,
        per_output_token_ms: 0.4 * k,
        min_completion_share,
        noise,
        seed,
        ..OpenAiSimConfig::default()
    }
}

/// One task as an OpenAI completion request: a prompt of `input_tokens` tokens (by the
/// 4-characters-per-token estimate both sides use) and `max_tokens` = `output_tokens`.
pub fn openai_body(rng: &mut impl Rng) -> Value {
    let input = rng.random_range(INPUT_TOKENS.0..=INPUT_TOKENS.1) as usize;
    let output = rng.random_range(OUTPUT_TOKENS.0..=OUTPUT_TOKENS.1);
    json!({"prompt": "abcd".repeat(input), "max_tokens": output})
}

/// The mean execution time over the task mix on an OpenAI-compatible server, ms.
pub fn openai_mean_ms(config: &OpenAiSimConfig) -> f64 {
    let mid = |(lo, hi): (u32, u32)| f64::from(lo + hi) / 2.0;
    let share = (1.0 + config.min_completion_share.clamp(0.0, 1.0)) / 2.0;
    config.base_ms
        + config.per_input_token_ms * mid(INPUT_TOKENS)
        + config.per_output_token_ms * mid(OUTPUT_TOKENS) * share
}

/// One task's metadata.
pub fn task_metadata(rng: &mut impl Rng) -> Value {
    json!({
        "input_tokens": rng.random_range(INPUT_TOKENS.0..=INPUT_TOKENS.1),
        "output_tokens": rng.random_range(OUTPUT_TOKENS.0..=OUTPUT_TOKENS.1),
    })
}

/// The mean execution time over the task mix on `config`, ms (the law is linear, so it is
/// the law at the mean token counts).
pub fn mean_ms(config: &SimConfig) -> f64 {
    let mid = |(lo, hi): (u32, u32)| f64::from(lo + hi) / 2.0;
    config.law_ms(&json!({"input_tokens": mid(INPUT_TOKENS), "output_tokens": mid(OUTPUT_TOKENS)}))
}

/// A lookup table for the workload, as a user would pre-compute it: the law on a grid of
/// token counts for each hardware kind, with a 10 % error (CSV).
pub fn lookup_csv(time_scale: f64) -> String {
    let mut csv = String::from("model_name,hardware,input_tokens,output_tokens,expect,error\n");
    for hw in HARDWARE {
        let config = sim_config(hw, time_scale, 0.0, 0);
        for input in [16, 256, 512, 768, 1024, 1280, 1536, 1792, 2048] {
            for output in [16, 64, 128, 192, 256, 320, 384, 448, 512] {
                let ms = config.law_ms(&json!({"input_tokens": input, "output_tokens": output}));
                csv.push_str(&format!(
                    "{MODEL},{},{input},{output},{ms:.3},{:.3}\n",
                    hw.name,
                    ms * 0.1
                ));
            }
        }
    }
    csv
}

/// The `q`-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
