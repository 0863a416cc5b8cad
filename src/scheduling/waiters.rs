//! Clients waiting for a task to complete (`/task/query?wait_ms=`): each waits
//! on the task's [`Notify`], which the completion itself wakes (no polling). A completion
//! looks its task up in a map that is empty unless someone waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::domain::TaskId;

/// The tasks someone waits for.
#[derive(Debug, Default)]
pub(super) struct Waiters(Mutex<HashMap<TaskId, Arc<Notify>>>);

impl Waiters {
    fn map(&self) -> MutexGuard<'_, HashMap<TaskId, Arc<Notify>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task's notifier, shared by everyone waiting for it.
    pub(super) fn subscribe(&self, task_id: &TaskId) -> Arc<Notify> {
        self.map().entry(task_id.clone()).or_default().clone()
    }

    /// Gives the notifier back; the last waiter to leave removes it.
    pub(super) fn release(&self, task_id: &TaskId, notify: Arc<Notify>) {
        let mut map = self.map();
        // Held by the map and by `notify`: nobody else waits.
        if Arc::strong_count(&notify) == 2 {
            map.remove(task_id);
        }
    }

    /// The task completed: wakes everyone waiting for it.
    pub(super) fn notify(&self, task_id: &TaskId) {
        let notify = {
            let mut map = self.map();
            if map.is_empty() {
                return;
            }
            map.remove(task_id)
        };
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}
