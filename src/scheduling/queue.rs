//! A TI's queue estimate (README, Scheduling): the tasks dispatched to it and not
//! completed, each with its own prediction.
//!
//! A TI that runs one task at a time (`slots` = 1, every callback TI): the expected wait
//! is the sum of their means less the time the oldest has already run; its error is the
//! root of the sum of their variances.
//!
//! A TI that runs `c` requests at once (an OpenAI-compatible TI; the scheduler itself
//! starts each request, so it knows which are running): the expected wait of a new task
//! is the time until the earliest of the `c` slots is free for it. Each slot starts free
//! at the predicted remaining time of the request it runs (its mean less the time it has
//! run, at least 0; 0 for an idle slot); the waiting tasks, in FIFO order, each take the
//! slot that frees first and hold it for their mean. The new task's wait is then the
//! earliest free time, and its variance the summed variances of what that slot ran and
//! will run (slots are treated as independent; a running task keeps its whole
//! variance, which errs on the side of a wider interval). Past [`EXACT_WAITING`] waiting
//! tasks the rest is spread evenly over the slots (their summed means and variances
//! divided by `c`), which keeps the estimate O(n + 64 log c) per TI. A TI with a free
//! slot and nothing waiting is exactly 0 ± 0.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

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

/// Waiting tasks placed on a slot one by one before the rest is spread evenly.
pub(super) const EXACT_WAITING: usize = 64;

/// The live estimate of one TI's queue.
#[derive(Debug, Clone)]
pub struct QueueEstimate {
    /// Entries in the order they joined the queue (the TI runs them FIFO).
    entries: BTreeMap<u64, Entry>,
    position: HashMap<TaskId, u64>,
    next_seq: u64,
    sum_mean_ms: f64,
    sum_var_ms2: f64,
    /// Tasks the TI runs at once.
    slots: usize,
    /// Entries marked started.
    started: usize,
}

impl Default for QueueEstimate {
    fn default() -> Self {
        Self::with_slots(1)
    }
}

/// A slot's free time for the multi-slot estimate, ordered by time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Slot {
    free_at_ms: f64,
    var_ms2: f64,
}

impl Eq for Slot {}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.free_at_ms
            .total_cmp(&other.free_at_ms)
            .then(self.var_ms2.total_cmp(&other.var_ms2))
    }
}

impl QueueEstimate {
    /// An empty queue of a TI that runs `slots` tasks at once (at least 1).
    pub fn with_slots(slots: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            position: HashMap::new(),
            next_seq: 0,
            sum_mean_ms: 0.0,
            sum_var_ms2: 0.0,
            slots: slots.max(1),
            started: 0,
        }
    }

    /// Tasks the TI runs at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Changes how many tasks the TI runs at once (it was registered again).
    pub fn set_slots(&mut self, slots: usize) {
        self.slots = slots.max(1);
    }

    /// Tasks marked started (accepted by a callback TI; sent to an OpenAI-compatible one).
    pub fn running(&self) -> usize {
        self.started
    }

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
            if entry.started.is_none() {
                entry.started = Some(at);
                self.started += 1;
            }
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
            if entry.started.is_some() {
                self.started -= 1;
            }
        }
        // One task at a time: the next one was waiting, not running, until now.
        if was_head && self.slots == 1 {
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

    /// Expected wait before a new task would start and its error, ms, at `now`.
    pub fn estimate(&self, now: Instant) -> (f64, f64) {
        if self.slots == 1 {
            (self.wait_ms(now), self.error_ms())
        } else {
            self.estimate_slots(now)
        }
    }

    /// The estimate of a TI running `slots` tasks at once (see the module docs).
    fn estimate_slots(&self, now: Instant) -> (f64, f64) {
        let waiting = self.entries.len() - self.started;
        if waiting == 0 && self.started < self.slots {
            return (0.0, 0.0);
        }
        let mut heap: BinaryHeap<Reverse<Slot>> = BinaryHeap::with_capacity(self.slots);
        for e in self.entries.values() {
            if let Some(started) = e.started {
                let ran = now.saturating_duration_since(started).as_secs_f64() * 1000.0;
                heap.push(Reverse(Slot {
                    free_at_ms: (e.mean_ms - ran).max(0.0),
                    var_ms2: e.var_ms2,
                }));
            }
        }
        while heap.len() < self.slots {
            heap.push(Reverse(Slot {
                free_at_ms: 0.0,
                var_ms2: 0.0,
            }));
        }
        let (mut rest_mean, mut rest_var) = (0.0, 0.0);
        let queued = self.entries.values().filter(|e| e.started.is_none());
        for (i, e) in queued.enumerate() {
            if i >= EXACT_WAITING {
                rest_mean += e.mean_ms;
                rest_var += e.var_ms2;
                continue;
            }
            if let Some(Reverse(mut slot)) = heap.pop() {
                slot.free_at_ms += e.mean_ms;
                slot.var_ms2 += e.var_ms2;
                heap.push(Reverse(slot));
            }
        }
        let Some(Reverse(first)) = heap.peek().copied() else {
            return (0.0, 0.0);
        };
        if rest_mean == 0.0 && rest_var == 0.0 {
            return (first.free_at_ms, first.var_ms2.max(0.0).sqrt());
        }
        let c = self.slots as f64;
        let (sum_free, sum_var) = heap.iter().fold((0.0, 0.0), |(f, v), Reverse(s)| {
            (f + s.free_at_ms, v + s.var_ms2)
        });
        let wait = first.free_at_ms.max((sum_free + rest_mean) / c);
        let var = (sum_var + rest_var) / c;
        (wait, var.max(0.0).sqrt())
    }

    /// Expected wait before a new task would start, ms, at `now`, on a TI that runs one
    /// task at a time.
    fn wait_ms(&self, now: Instant) -> f64 {
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

    /// Error (standard deviation) of the wait, ms, on a TI that runs one task at a time.
    fn error_ms(&self) -> f64 {
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

    fn multi(slots: usize) -> QueueEstimate {
        QueueEstimate::with_slots(slots)
    }

    #[test]
    fn a_ti_with_a_free_slot_and_nothing_waiting_is_exactly_zero() {
        let mut q = multi(4);
        let t0 = Instant::now();
        for n in 1..=3 {
            q.push(id(n), 100.0, 10.0);
            q.mark_started(&id(n), t0);
        }
        assert_eq!(q.estimate(t0), (0.0, 0.0));
        assert_eq!(q.running(), 3);
    }

    #[test]
    fn with_every_slot_busy_the_wait_is_the_earliest_remaining_time() {
        let mut q = multi(2);
        let t0 = Instant::now();
        q.push(id(1), 100.0, 10.0);
        q.push(id(2), 300.0, 20.0);
        q.mark_started(&id(1), t0);
        q.mark_started(&id(2), t0);
        let (wait, error) = q.estimate(t0 + Duration::from_millis(40));
        assert_eq!((wait, error), (60.0, 10.0));
    }

    #[test]
    fn waiting_tasks_take_the_slot_that_frees_first_in_fifo_order() {
        let mut q = multi(2);
        let t0 = Instant::now();
        q.push(id(1), 100.0, 3.0);
        q.push(id(2), 300.0, 4.0);
        q.mark_started(&id(1), t0);
        q.mark_started(&id(2), t0);
        // Waiting: 50 (slot 1 frees at 100 → 150), then 400 (slot 1 again at 150 → 550).
        q.push(id(3), 50.0, 12.0);
        q.push(id(4), 400.0, 0.0);
        let (wait, error) = q.estimate(t0);
        assert_eq!(wait, 300.0, "slot 2 frees first, at 300");
        assert_eq!(error, 4.0);
        assert_eq!(q.running(), 2);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn a_long_queue_is_spread_over_the_slots_past_the_exact_part() {
        let mut q = multi(4);
        let t0 = Instant::now();
        let n = (EXACT_WAITING + 4 * 10) as u32;
        for i in 0..n {
            q.push(id(i), 10.0, 1.0);
        }
        let (wait, _) = q.estimate(t0);
        // n tasks of 10 ms on 4 slots: a new one starts after n · 10 / 4.
        assert!((wait - f64::from(n) * 10.0 / 4.0).abs() < 1e-9, "{wait}");
    }

    #[test]
    fn one_slot_behaves_as_before() {
        let mut q = multi(1);
        let t0 = Instant::now();
        q.push(id(1), 100.0, 30.0);
        q.push(id(2), 200.0, 40.0);
        assert_eq!(q.estimate(t0), (300.0, 50.0));
    }
}
