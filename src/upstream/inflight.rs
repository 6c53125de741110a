//! The in-flight registry: every upstream fetch from sending its request until its body is
//! dropped, for `/health` and `imgedge_inflight_upstream`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Every upstream fetch in flight, from sending its request until its body is dropped: at
/// most `max` (`[upstream] max_in_flight`).
pub(super) struct InflightRegistry {
    next: std::sync::atomic::AtomicU64,
    entries: std::sync::Mutex<std::collections::HashMap<u64, (Arc<str>, Instant)>>,
    max: usize,
}

impl InflightRegistry {
    pub(super) fn new(max: usize) -> Self {
        InflightRegistry {
            next: Default::default(),
            entries: Default::default(),
            max,
        }
    }

    /// Registers a fetch of `url`, or `None` when `max` are in flight.
    pub(super) fn register(self: &Arc<Self>, url: &str) -> Option<InflightGuard> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        {
            let mut entries = self.lock();
            if entries.len() >= self.max {
                return None;
            }
            entries.insert(id, (Arc::from(url), started));
        }
        Some(InflightGuard {
            registry: self.clone(),
            id,
            started,
        })
    }

    pub(super) fn snapshot(&self, oldest: usize) -> (usize, Vec<(Arc<str>, Duration)>) {
        let entries = self.lock();
        let mut all: Vec<_> = entries
            .values()
            .map(|(u, s)| (u.clone(), s.elapsed()))
            .collect();
        all.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        all.truncate(oldest);
        (entries.len(), all)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (Arc<str>, Instant)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a fetch from the in-flight list when dropped.
pub(super) struct InflightGuard {
    registry: Arc<InflightRegistry>,
    id: u64,
    pub(super) started: Instant,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}
