//! The process's resident set size, behind [`RssSource`] so that the memory-pressure monitor
//! (`pressure.rs`) can be driven by tests with any reading ([`SetRss`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Something that reports the process's RSS.
pub trait RssSource: Send + Sync {
    /// Resident set size in bytes, or `None` when it cannot be read.
    fn rss_bytes(&self) -> Option<u64>;
}

/// This process's RSS, read with sysinfo, refreshing only this process's memory (about 19 µs).
pub struct ProcessRss {
    system: Mutex<System>,
    pid: Pid,
}

impl ProcessRss {
    /// `None` where sysinfo cannot read processes on this platform.
    pub fn new() -> Option<Self> {
        Some(ProcessRss {
            system: Mutex::new(System::new().ok()?),
            pid: sysinfo::get_current_pid().ok()?,
        })
    }
}

impl RssSource for ProcessRss {
    fn rss_bytes(&self) -> Option<u64> {
        let mut system = self.system.lock().unwrap_or_else(|e| e.into_inner());
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        system.process(self.pid).map(|p| p.memory())
    }
}

/// An RSS reading set by hand: tests drive every pressure level with it.
#[derive(Debug, Default)]
pub struct SetRss(AtomicU64);

impl SetRss {
    /// A source that reads `bytes` until [`SetRss::set`] changes it.
    pub fn new(bytes: u64) -> Self {
        SetRss(AtomicU64::new(bytes))
    }

    /// The reading from now on, in bytes.
    pub fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Relaxed);
    }
}

impl RssSource for SetRss {
    fn rss_bytes(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed))
    }
}
