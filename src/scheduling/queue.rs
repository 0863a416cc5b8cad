//! A TI's queue estimate (SPEC.md §7): the tasks dispatched to it and not completed, each
//! with its own prediction. The expected wait is the sum of their means less the time
//! the oldest has already run; its error is the root of the sum of their variances.

use std::collections::{BTreeMap, HashMap};

use tokio::time::Instant;

use crate::domain::TaskId;

#[derive(Debug, Clone)]
struct Entry {
    task_id: TaskId,
    mean_ms: f64,
    var_ms2: f64,
    /// When the TI accepted it; `None` until then.
    started: Option<Instant>,
}

/// The live estimate of one TI's queue.
#[derive(Debug, Clone, Default)]
pub struct QueueEstimate {
    /// Entries in the order they joined the queue (the TI runs them FIFO).
    entries: BTreeMap<u64, Entry>,
    position: HashMap<TaskId, u64>,
    next_seq: u64,
    sum_mean_ms: f64,
    sum_var_ms2: f64,
}

impl QueueEstimate {
    /// Adds a task with its predicted execution time and error on this TI.
    /// A task already present is left as it is.
    pub fn push(&mut self, task_id: TaskId, mean_ms: f64, error_ms: f64) {
        if self.position.contains_key(&task_id) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let var_ms2 = error_ms * error_ms;
        self.sum_mean_ms += mean_ms;
        self.sum_var_ms2 += var_ms2;
        self.position.insert(task_id.clone(), seq);
        self.entries.insert(
            seq,
            Entry {
                task_id,
                mean_ms,
                var_ms2,
                started: None,
            },
        );
    }

    /// Notes that the TI accepted the task at `at` (its clock starts).
    pub fn mark_started(&mut self, task_id: &TaskId, at: Instant) {
        if let Some(entry) = self
            .position
            .get(task_id)
            .and_then(|seq| self.entries.get_mut(seq))
        {
            entry.started.get_or_insert(at);
        }
    }

    /// Removes exactly this task's prediction. Returns false if it was not queued here.
    ///
    /// When the oldest task leaves, the TI goes on with the next one, so that one's clock
    /// starts now if it was accepted earlier (it was waiting, not running).
    pub fn remove(&mut self, task_id: &TaskId, now: Instant) -> bool {
        let Some(seq) = self.position.remove(task_id) else {
            return false;
        };
        let was_head = self.entries.keys().next() == Some(&seq);
        if let Some(entry) = self.entries.remove(&seq) {
            self.sum_mean_ms -= entry.mean_ms;
            self.sum_var_ms2 -= entry.var_ms2;
        }
        if was_head {
            if let Some(started) = self
                .entries
                .values_mut()
                .next()
                .and_then(|e| e.started.as_mut())
            {
                *started = (*started).max(now);
            }
        }
        if self.entries.is_empty() {
            // A drained queue is exactly zero, whatever rounding the sums gathered.
            self.sum_mean_ms = 0.0;
            self.sum_var_ms2 = 0.0;
        }
        true
    }

    /// Tasks in the queue.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no task is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids of the queued tasks, oldest first.
    pub fn task_ids(&self) -> impl Iterator<Item = &TaskId> {
        self.entries.values().map(|e| &e.task_id)
    }

    /// Ids of the queued tasks the TI has not accepted yet.
    pub fn not_started(&self) -> impl Iterator<Item = &TaskId> {
        self.entries
            .values()
            .filter(|e| e.started.is_none())
            .map(|e| &e.task_id)
    }

    /// Expected wait before a new task would start, ms, at `now`.
    pub fn wait_ms(&self, now: Instant) -> f64 {
        let ran = self
            .entries
            .values()
            .next()
            .and_then(|oldest| {
                let started = oldest.started?;
                let ran = now.saturating_duration_since(started).as_secs_f64() * 1000.0;
                Some(ran.min(oldest.mean_ms))
            })
            .unwrap_or(0.0);
        (self.sum_mean_ms - ran).max(0.0)
    }

    /// Error (standard deviation) of the wait, ms.
    pub fn error_ms(&self) -> f64 {
        self.sum_var_ms2.max(0.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(n: u32) -> TaskId {
        TaskId::from_stored(format!("t{n}"))
    }

    #[test]
    fn wait_is_the_sum_of_means_and_error_the_root_of_summed_variances() {
        let mut q = QueueEstimate::default();
        q.push(id(1), 100.0, 30.0);
        q.push(id(2), 200.0, 40.0);
        let now = Instant::now();
        assert_eq!(q.wait_ms(now), 300.0);
        assert_eq!(q.error_ms(), 50.0);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn completion_removes_exactly_that_tasks_prediction_and_drains_to_zero() {
        let mut q = QueueEstimate::default();
        q.push(id(1), 0.1, 0.3);
        q.push(id(2), 0.2, 0.7);
        let now = Instant::now();
        assert!(q.remove(&id(2), now));
        assert!((q.wait_ms(now) - 0.1).abs() < 1e-12);
        assert!(!q.remove(&id(2), now), "removing twice changes nothing");
        assert!(q.remove(&id(1), now));
        assert_eq!(q.wait_ms(Instant::now()), 0.0);
        assert_eq!(q.error_ms(), 0.0);
    }

    #[test]
    fn time_the_oldest_task_has_run_is_taken_off_up_to_its_mean() {
        let mut q = QueueEstimate::default();
        let t0 = Instant::now();
        q.push(id(1), 100.0, 10.0);
        q.push(id(2), 100.0, 10.0);
        q.mark_started(&id(1), t0);
        assert_eq!(q.wait_ms(t0 + Duration::from_millis(40)), 160.0);
        assert_eq!(
            q.wait_ms(t0 + Duration::from_millis(500)),
            100.0,
            "capped at its mean"
        );
        q.mark_started(&id(2), t0);
        assert_eq!(
            q.wait_ms(t0 + Duration::from_millis(40)),
            160.0,
            "only the oldest counts"
        );
    }

    #[test]
    fn the_next_tasks_clock_starts_when_the_oldest_leaves_not_when_it_was_accepted() {
        let mut q = QueueEstimate::default();
        let t0 = Instant::now();
        q.push(id(1), 100.0, 10.0);
        q.push(id(2), 100.0, 10.0);
        q.mark_started(&id(1), t0);
        q.mark_started(&id(2), t0);
        let done = t0 + Duration::from_millis(100);
        q.remove(&id(1), done);
        assert_eq!(q.wait_ms(done + Duration::from_millis(30)), 70.0);
    }
}
