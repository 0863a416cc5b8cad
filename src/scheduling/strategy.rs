//! The four strategies (docs/API.md, `POST /scheduler/set`): given every usable TI of a
//! model with its queue estimate and this task's prediction there, pick one. Each fills in
//! the candidates' `score` (lower is better) so that the stored decision shows why.

use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::domain::{Candidate, StrategyKind};

/// Picks a candidate; returns its index. `candidates` must not be empty.
///
/// `cursor` is the model's round-robin position; `lambda` the risk weight of `weighted`;
/// `rng` the source of `probabilistic`'s draws.
pub(super) fn select(
    kind: StrategyKind,
    candidates: &mut [Candidate],
    cursor: &mut usize,
    lambda: f64,
    rng: &mut StdRng,
) -> usize {
    let n = candidates.len();
    match kind {
        StrategyKind::RoundRobin => {
            let chosen = *cursor % n;
            *cursor = cursor.wrapping_add(1);
            for (i, c) in candidates.iter_mut().enumerate() {
                c.score = ((i + n - chosen) % n) as f64;
            }
            chosen
        }
        StrategyKind::ShortestQueue => {
            for c in candidates.iter_mut() {
                c.score = c.wait_ms + c.predicted_ms;
            }
            lowest(candidates)
        }
        StrategyKind::Weighted => {
            for c in candidates.iter_mut() {
                c.score = c.wait_ms + c.predicted_ms + lambda * completion_error(c);
            }
            lowest(candidates)
        }
        StrategyKind::Probabilistic => {
            for c in candidates.iter_mut() {
                let mean = c.wait_ms + c.predicted_ms;
                let sd = completion_error(c);
                c.score = match Normal::new(mean, sd) {
                    Ok(law) if sd > 0.0 => law.sample(rng).max(0.0),
                    _ => mean,
                };
            }
            lowest(candidates)
        }
    }
}

/// Standard deviation of the expected completion: the wait's and this task's, independent.
fn completion_error(c: &Candidate) -> f64 {
    (c.wait_error_ms * c.wait_error_ms + c.predicted_error_ms * c.predicted_error_ms).sqrt()
}

/// The lowest score; ties go to the lower wait error, then the shorter queue, then the
/// earlier candidate.
fn lowest(candidates: &[Candidate]) -> usize {
    let mut best = 0;
    for (i, c) in candidates.iter().enumerate().skip(1) {
        let b = &candidates[best];
        let better = c
            .score
            .total_cmp(&b.score)
            .then(c.wait_error_ms.total_cmp(&b.wait_error_ms))
            .then(c.queue_length.cmp(&b.queue_length))
            .is_lt();
        if better {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TiUuid;
    use rand::SeedableRng;

    fn candidate(wait_ms: f64, wait_error_ms: f64, queue_length: usize) -> Candidate {
        Candidate {
            ti_uuid: TiUuid::generate(),
            wait_ms,
            wait_error_ms,
            queue_length,
            predicted_ms: 100.0,
            predicted_error_ms: 10.0,
            prediction_source: "prior",
            score: 0.0,
        }
    }

    fn pick(kind: StrategyKind, cs: &mut [Candidate]) -> usize {
        select(kind, cs, &mut 0, 1.0, &mut StdRng::seed_from_u64(7))
    }

    #[test]
    fn shortest_queue_takes_the_earliest_completion_then_breaks_ties() {
        let mut cs = [
            candidate(300.0, 1.0, 3),
            candidate(100.0, 90.0, 1),
            candidate(200.0, 1.0, 2),
        ];
        assert_eq!(pick(StrategyKind::ShortestQueue, &mut cs), 1);
        assert_eq!(cs[1].score, 200.0);
        let mut tied = [
            candidate(100.0, 50.0, 1),
            candidate(100.0, 20.0, 5),
            candidate(100.0, 20.0, 2),
        ];
        assert_eq!(pick(StrategyKind::ShortestQueue, &mut tied), 2);
    }

    #[test]
    fn predictions_differ_per_ti_and_count_in_the_completion() {
        let mut slow = candidate(0.0, 0.0, 0);
        slow.predicted_ms = 500.0;
        let mut cs = [slow, candidate(300.0, 0.0, 1)];
        assert_eq!(pick(StrategyKind::ShortestQueue, &mut cs), 1);
    }

    #[test]
    fn weighted_prefers_the_lower_error_at_equal_wait() {
        let mut cs = [candidate(100.0, 400.0, 1), candidate(100.0, 10.0, 1)];
        assert_eq!(pick(StrategyKind::Weighted, &mut cs), 1);
        let mut risky_but_fast = [candidate(0.0, 50.0, 1), candidate(500.0, 0.0, 1)];
        assert_eq!(pick(StrategyKind::Weighted, &mut risky_but_fast), 0);
    }

    #[test]
    fn round_robin_cycles_in_order() {
        let mut cs = [
            candidate(0.0, 0.0, 0),
            candidate(0.0, 0.0, 0),
            candidate(0.0, 0.0, 0),
        ];
        let mut cursor = 0;
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..6)
            .map(|_| {
                select(
                    StrategyKind::RoundRobin,
                    &mut cs,
                    &mut cursor,
                    1.0,
                    &mut rng,
                )
            })
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn probabilistic_gives_every_ti_a_share_and_the_least_loaded_the_most() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let mut cs = [
                candidate(100.0, 80.0, 1),
                candidate(150.0, 80.0, 1),
                candidate(250.0, 80.0, 2),
            ];
            counts[select(StrategyKind::Probabilistic, &mut cs, &mut 0, 1.0, &mut rng)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }
}
