//! The decision path of a submit: predict this task on every TI, select with the
//! strategy, reserve the prediction in the chosen TI's queue (and release it, so every
//! iteration sees the same queues). 4, 64 and 1024 TIs of one model, each with a few tasks
//! queued, for each strategy. Run with `cargo bench --bench decision`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::SeedableRng;
use serde_json::{json, Map, Value};
use ti_scheduler::domain::{DecisionReason, PredictMode, StrategyKind, TaskId, TiKind, TiUuid};
use ti_scheduler::predictor::Predictor;
use ti_scheduler::scheduling::{Cache, Placing};
use ti_scheduler::store::StoredTi;
use tokio::time::Instant;

fn state(tis: usize, strategy: StrategyKind) -> Cache {
    let mut predictor = Predictor::new(1000.0, 500.0, Vec::new(), Vec::new(), Vec::new());
    // A warm learned model per hardware, as in a running service.
    for k in 0..200u32 {
        for hw in ["A100", "T4"] {
            let meta = json!({"input_tokens": 100 + k * 7, "output_tokens": 10 + k});
            let ms = 20.0 + 0.02 * f64::from(100 + k * 7) + 0.4 * f64::from(10 + k);
            predictor.observe("llama-7b", Some(hw), meta.as_object().unwrap(), ms);
        }
    }
    let rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut st = Cache::new(
        strategy,
        PredictMode::Default,
        predictor,
        rng,
        1.0,
        64,
        std::time::Duration::from_millis(100),
    );
    for i in 0..tis {
        let ti = StoredTi {
            ti_uuid: TiUuid::generate(),
            host: "127.0.0.1".into(),
            port: 8000 + i as u16,
            model_name: "llama-7b".into(),
            hardware: Some(if i % 2 == 0 { "A100" } else { "T4" }.into()),
            callback_token: "t".into(),
            registered_at: i as f64,
            removed_at: None,
            kind: TiKind::Callback,
            max_concurrency: None,
        };
        let id = ti.ti_uuid;
        st.upsert_ti(ti);
        for q in 0..(i % 4) {
            st.reserve(
                &TaskId::from_stored(format!("pre-{i}-{q}")),
                id,
                100.0,
                10.0,
            );
        }
    }
    st
}

fn decision_path(c: &mut Criterion) {
    let metadata: Map<String, Value> = json!({"input_tokens": 512, "output_tokens": 128})
        .as_object()
        .cloned()
        .unwrap();
    let task = TaskId::from_stored("task-bench".into());
    let mut group = c.benchmark_group("decide");
    for tis in [4usize, 64, 1024] {
        for strategy in StrategyKind::ALL {
            let mut st = state(tis, strategy);
            let now = Instant::now();
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), tis), &tis, |b, _| {
                b.iter(|| {
                    let d = st.decide(&Placing {
                        task_id: &task,
                        model: "llama-7b",
                        only: None,
                        metadata: &metadata,
                        reason: DecisionReason::Submit,
                        now,
                        decided_at: 0.0,
                    });
                    st.release(&task);
                    black_box(d)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decision_path);
criterion_main!(benches);
