//! What changed, for `GET /events`: every change of a task's status or TI,
//! and every registration, removal and health change of a TI, numbered in order.
//!
//! The last `server.event_buffer` events ([`EVENT_BUFFER`] by default) are kept in a ring. A client reads everything newer
//! than the last id it saw, so a reconnecting client (`Last-Event-ID`) replays what it
//! missed while that is still in the ring; a client whose id has left the ring (it was
//! too slow, or away too long) is told to start over. Publishing never waits for a
//! client: it appends under a lock held for a push and wakes whoever waits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::Notify;

use crate::domain::{unix_now, TaskId, TaskStatus, TiUuid};

/// Events kept for clients that reconnect or read slowly.
pub const EVENT_BUFFER: usize = 10_000;

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// A task's status or TI changed.
    Task {
        /// The task.
        task_id: TaskId,
        /// Its model.
        model_name: String,
        /// Its new status.
        task_status: TaskStatus,
        /// Its TI; empty while none is usable.
        scheduled_ti: String,
        /// Unix seconds.
        time: f64,
    },
    /// A TI was registered or removed, or its health changed.
    Ti {
        /// The TI.
        ti_uuid: TiUuid,
        /// Its model.
        model_name: String,
        /// Whether it may get tasks.
        healthy: bool,
        /// Whether it was removed.
        removed: bool,
    },
}

impl Event {
    /// A task event at the current time.
    pub(super) fn task(
        task_id: &TaskId,
        model: &str,
        status: TaskStatus,
        ti: Option<TiUuid>,
    ) -> Self {
        Self::Task {
            task_id: task_id.clone(),
            model_name: model.to_string(),
            task_status: status,
            scheduled_ti: ti.map(|t| t.to_string()).unwrap_or_default(),
            time: unix_now(),
        }
    }

    /// The SSE event name: `task` or `ti`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Task { .. } => "task",
            Self::Ti { .. } => "ti",
        }
    }

    /// Its model.
    pub fn model_name(&self) -> &str {
        match self {
            Self::Task { model_name, .. } | Self::Ti { model_name, .. } => model_name,
        }
    }

    /// Its task, for a task event.
    pub fn task_id(&self) -> Option<&TaskId> {
        match self {
            Self::Task { task_id, .. } => Some(task_id),
            Self::Ti { .. } => None,
        }
    }
}

/// What a client reads after the last id it saw.
#[derive(Debug)]
pub enum Since {
    /// The newer events, oldest first (possibly none).
    Events(Vec<(u64, Arc<Event>)>),
    /// Its id has left the ring: it missed events it can no longer get. The newest id,
    /// to go on from.
    Gone(u64),
}

#[derive(Debug, Default)]
struct Ring {
    /// Id of the last event published (ids start at 1).
    last_id: u64,
    events: VecDeque<(u64, Arc<Event>)>,
}

/// The event bus.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    published: Notify,
    capacity: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self::with_capacity(EVENT_BUFFER)
    }
}

impl Events {
    /// A bus that keeps the last `capacity` events (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring::default()),
            published: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// How many events it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event and wakes the clients waiting for one.
    pub(super) fn publish(&self, event: Event) {
        {
            let mut ring = self.ring();
            ring.last_id += 1;
            let id = ring.last_id;
            ring.events.push_back((id, Arc::new(event)));
            if ring.events.len() > self.capacity {
                ring.events.pop_front();
            }
        }
        self.published.notify_waiters();
    }

    /// Id of the newest event (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.ring().last_id
    }

    /// The events newer than `after`.
    pub fn since(&self, after: u64) -> Since {
        let ring = self.ring();
        let oldest = ring.events.front().map_or(ring.last_id + 1, |(id, _)| *id);
        if after + 1 < oldest && after < ring.last_id {
            return Since::Gone(ring.last_id);
        }
        let skip = (after + 1).saturating_sub(oldest) as usize;
        Since::Events(ring.events.iter().skip(skip).cloned().collect())
    }

    /// Waits for the next event after `after`, or returns at once if there is one.
    pub async fn wait_after(&self, after: u64) {
        let published = self.published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        if self.last_id() > after {
            return;
        }
        published.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ti_event(n: u32) -> Event {
        Event::Ti {
            ti_uuid: TiUuid::generate(),
            model_name: format!("m{n}"),
            healthy: true,
            removed: false,
        }
    }

    fn ids(since: Since) -> Vec<u64> {
        match since {
            Since::Events(events) => events.into_iter().map(|(id, _)| id).collect(),
            Since::Gone(last) => panic!("gone, last {last}"),
        }
    }

    #[test]
    fn a_reader_gets_what_is_newer_than_its_id_and_is_told_when_it_fell_out_of_the_ring() {
        let bus = Events::default();
        assert!(ids(bus.since(0)).is_empty());
        for n in 0..3 {
            bus.publish(ti_event(n));
        }
        assert_eq!(ids(bus.since(0)), [1, 2, 3]);
        assert_eq!(ids(bus.since(2)), [3]);
        assert!(ids(bus.since(3)).is_empty());
        for n in 0..EVENT_BUFFER as u32 {
            bus.publish(ti_event(n));
        }
        assert!(matches!(bus.since(1), Since::Gone(last) if last == 3 + EVENT_BUFFER as u64));
        let newest = ids(bus.since(2 + EVENT_BUFFER as u64));
        assert_eq!(newest, [3 + EVENT_BUFFER as u64]);
    }
}
