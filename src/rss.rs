//! The process's resident set size. Behind [`RssSource`] so that the memory-pressure logic to
//! come can be driven by tests with any reading.

use std::sync::Mutex;

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
