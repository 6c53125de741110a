//! Memory pressure: the process's RSS against its budget, sampled on a timer and published as a
//! [`Level`] on a watch channel. This module only measures and signals; the request path and the
//! tiers act on the level (see `proxy.rs`, `http.rs`, `relief.rs`).
//!
//! The budget is `[memory] budget_bytes`, or when 0 the cgroup limit of this process (v2
//! `memory.max`, v1 `memory.limit_in_bytes`), else physical memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::rss::RssSource;

/// How hard memory is pressed, in escalating order; each level implies the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Normal,
    /// The memory tier should shed least-recently-used entries.
    Evicting,
    /// `/health` reports `degraded`.
    Warning,
    /// New responses stream without being teed into memory.
    Bypass,
    /// The memory tier is cleared and new proxy requests are shed with 503.
    Critical,
    /// Everything that can be dropped is dropped.
    Emergency,
}

impl Level {
    pub const ALL: [Level; 6] = [
        Level::Normal,
        Level::Evicting,
        Level::Warning,
        Level::Bypass,
        Level::Critical,
        Level::Emergency,
    ];

    /// 0 (normal) to 5 (emergency), for `imgedge_memory_pressure_level`.
    pub fn as_number(self) -> i64 {
        self as i64
    }

    /// The level's name, as in `/health` and the `to` label of
    /// `imgedge_memory_pressure_transitions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Evicting => "evicting",
            Level::Warning => "warning",
            Level::Bypass => "bypass",
            Level::Critical => "critical",
            Level::Emergency => "emergency",
        }
    }

    /// Whether proxy requests are shed (503 `overloaded`) and readiness fails: critical and above.
    pub fn sheds(self) -> bool {
        self >= Level::Critical
    }

    /// Whether new responses may be stored: below bypass.
    pub fn stores(self) -> bool {
        self < Level::Bypass
    }
}

/// RSS fractions of the budget at which each level starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub evicting: f64,
    pub warning: f64,
    pub bypass: f64,
    pub critical: f64,
    pub emergency: f64,
    /// A level is left only once the fraction is this much below where it starts, so levels
    /// do not flap around a threshold.
    pub hysteresis: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            evicting: 0.70,
            warning: 0.75,
            bypass: 0.80,
            critical: 0.90,
            emergency: 0.95,
            hysteresis: 0.03,
        }
    }
}

impl Thresholds {
    fn start(&self, level: Level) -> f64 {
        match level {
            Level::Normal => 0.0,
            Level::Evicting => self.evicting,
            Level::Warning => self.warning,
            Level::Bypass => self.bypass,
            Level::Critical => self.critical,
            Level::Emergency => self.emergency,
        }
    }

    /// The level for `fraction` (RSS / budget) coming from `current`: up at once, down only
    /// past the hysteresis.
    pub fn next(&self, current: Level, fraction: f64) -> Level {
        let raw = Level::ALL
            .into_iter()
            .rev()
            .find(|&l| fraction >= self.start(l))
            .unwrap_or(Level::Normal);
        if raw >= current {
            return raw;
        }
        // Going down: the highest level whose start, less the hysteresis, is still reached.
        Level::ALL
            .into_iter()
            .rev()
            .filter(|&l| l <= current)
            .find(|&l| l == Level::Normal || fraction >= self.start(l) - self.hysteresis)
            .unwrap_or(Level::Normal)
    }
}

/// One reading of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub(crate) struct Reading {
    pub level: Level,
    pub rss_bytes: u64,
    pub budget_bytes: u64,
}

/// Samples RSS every `interval` and publishes the level. Transitions are logged once, with RSS
/// and budget, and counted through `on_transition`.
pub(crate) struct Monitor {
    rss: Arc<dyn RssSource>,
    budget_bytes: u64,
    thresholds: Thresholds,
    interval: Duration,
    tx: watch::Sender<Reading>,
}

impl Monitor {
    pub(crate) fn new(
        rss: Arc<dyn RssSource>,
        budget_bytes: u64,
        thresholds: Thresholds,
        interval: Duration,
    ) -> (Monitor, watch::Receiver<Reading>) {
        let first = Reading {
            level: Level::Normal,
            rss_bytes: 0,
            budget_bytes,
        };
        let (tx, rx) = watch::channel(first);
        let monitor = Monitor {
            rss,
            budget_bytes,
            thresholds,
            interval,
            tx,
        };
        monitor.sample();
        (monitor, rx)
    }

    /// Takes one sample and publishes it; returns the new reading.
    pub(crate) fn sample(&self) -> Reading {
        let previous = *self.tx.borrow();
        let rss_bytes = self.rss.rss_bytes().unwrap_or(previous.rss_bytes);
        let fraction = rss_bytes as f64 / self.budget_bytes.max(1) as f64;
        let level = self.thresholds.next(previous.level, fraction);
        if level != previous.level {
            tracing::warn!(
                from = ?previous.level,
                to = ?level,
                rss_bytes,
                budget_bytes = self.budget_bytes,
                "memory pressure level changed"
            );
        }
        let reading = Reading {
            level,
            rss_bytes,
            budget_bytes: self.budget_bytes,
        };
        self.tx.send_replace(reading);
        reading
    }

    /// Samples until every receiver is gone.
    pub(crate) async fn run(self) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.tx.is_closed() {
            tick.tick().await;
            self.sample();
        }
    }
}

/// The bytes in-flight fills may collect, shared by all of them: RSS sampled every 250 ms cannot
/// see a burst, so each fill reserves what it will hold before it holds it.
///
/// Two bounds apply: the configured capacity (`[memory] inflight_fill_bytes`), and the headroom
/// the last RSS sample left below a line (the `bypass` threshold; [`Self::set_headroom`]): no
/// more may be reserved between two samples than would take RSS from the last reading to that
/// line. Near the line new fills stream unstored instead of jumping past it together.
///
/// Fills take what is free or go without ([`Self::try_reserve`]); a transform, which cannot go
/// without, may wait for room ([`Self::reserve`]), woken when a reservation is returned or the
/// headroom grows.
#[derive(Debug)]
pub(crate) struct ReservationPool {
    capacity_bytes: u64,
    /// The current bound on `used_bytes`: at most `capacity_bytes`.
    limit_bytes: AtomicU64,
    used_bytes: AtomicU64,
    /// Wakes the callers of [`Self::reserve`] when room may have been made.
    room: Notify,
}

impl ReservationPool {
    pub(crate) fn new(capacity_bytes: u64) -> Arc<Self> {
        Arc::new(ReservationPool {
            capacity_bytes,
            limit_bytes: AtomicU64::new(capacity_bytes),
            used_bytes: AtomicU64::new(0),
            room: Notify::new(),
        })
    }

    /// After an RSS sample of `rss_bytes`: until the next one, reservations may add at most
    /// `line_bytes - rss_bytes` to what is reserved now (and never pass the capacity).
    pub(crate) fn set_headroom(&self, rss_bytes: u64, line_bytes: u64) {
        let headroom = line_bytes.saturating_sub(rss_bytes);
        let limit = self
            .used_bytes()
            .saturating_add(headroom)
            .min(self.capacity_bytes);
        let before = self.limit_bytes.swap(limit, Ordering::Relaxed);
        if limit > before {
            self.room.notify_waiters();
        }
    }

    /// The current bound on reserved bytes (see [`Self::set_headroom`]).
    pub(crate) fn limit_bytes(&self) -> u64 {
        self.limit_bytes.load(Ordering::Relaxed)
    }

    /// Reserves `bytes`, or `None` when that would pass the capacity.
    pub(crate) fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.take(bytes).then(|| Reservation {
            pool: self.clone(),
            bytes,
        })
    }

    /// Reserves `bytes`, waiting for room until `deadline`; `None` when none was made by then.
    /// Waiters are not queued in order: whoever fits when room is made takes it.
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        bytes: u64,
        deadline: tokio::time::Instant,
    ) -> Option<Reservation> {
        loop {
            // registered before trying, so that room made in between is not missed
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reservation) = self.try_reserve(bytes) {
                return Some(reservation);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.try_reserve(bytes);
            }
        }
    }

    fn take(&self, bytes: u64) -> bool {
        self.used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&n| n <= self.limit_bytes.load(Ordering::Relaxed))
            })
            .is_ok()
    }

    /// Bytes reserved by fills in flight.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }
}

/// Bytes held by one fill; returned to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    pool: Arc<ReservationPool>,
    bytes: u64,
}

impl Reservation {
    /// Grows the reservation by `more` bytes; false (and unchanged) when the pool is full.
    pub(crate) fn grow(&mut self, more: u64) -> bool {
        let taken = self.pool.take(more);
        if taken {
            self.bytes += more;
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.used_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.pool.room.notify_waiters();
    }
}

/// The memory budget when none is configured: this process's cgroup limit (v2, then v1), else
/// physical memory. `None` only when nothing can be read.
///
/// The cgroup is the process's own, from `/proc/self/cgroup`, and its limit the smallest on the
/// way up to the mount's root (a parent's limit binds its children): in a container with a
/// cgroup namespace that is the root itself; in a nested cgroup without one (a systemd unit's
/// `MemoryMax=`, a cgroup made by hand) the mount's root file would be the whole machine's.
pub(crate) fn detect_budget_bytes() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let read = |path: &std::path::Path| std::fs::read_to_string(path).ok();
    let limit_on_the_way_up = |mount: &str, path: &str, file: &str, v2: bool| {
        let mut dir = std::path::PathBuf::from(mount).join(path.trim_start_matches('/'));
        let mut smallest: Option<u64> = None;
        loop {
            let contents = read(&dir.join(file));
            let limit = if v2 {
                cgroup_limit_bytes(contents.as_deref(), None)
            } else {
                cgroup_limit_bytes(None, contents.as_deref())
            };
            if let Some(l) = limit {
                smallest = Some(smallest.map_or(l, |s| s.min(l)));
            }
            if dir == std::path::Path::new(mount) || !dir.pop() {
                return smallest;
            }
        }
    };
    let (v2_path, v1_path) = cgroup_paths(&own);
    v2_path
        .and_then(|p| limit_on_the_way_up("/sys/fs/cgroup", &p, "memory.max", true))
        .or_else(|| {
            v1_path.and_then(|p| {
                limit_on_the_way_up("/sys/fs/cgroup/memory", &p, "memory.limit_in_bytes", false)
            })
        })
        .or_else(|| {
            cgroup_limit_bytes(
                read(std::path::Path::new("/sys/fs/cgroup/memory.max")).as_deref(),
                read(std::path::Path::new(
                    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                ))
                .as_deref(),
            )
        })
        .or_else(|| {
            let mut system = sysinfo::System::new().ok()?;
            system.refresh_memory();
            Some(system.total_memory()).filter(|&m| m > 0)
        })
}

/// This process's cgroup paths from `/proc/self/cgroup`'s contents: the v2 one (`0::/path`) and
/// the v1 memory controller's (`N:...memory...:/path`).
pub(crate) fn cgroup_paths(proc_self_cgroup: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_owned());
        }
    }
    (v2, v1)
}

/// A cgroup memory limit from the v2 `memory.max` or v1 `memory.limit_in_bytes` contents:
/// `max` (v2) and v1's near-`i64::MAX` page-rounded sentinel mean no limit.
pub(crate) fn cgroup_limit_bytes(v2: Option<&str>, v1: Option<&str>) -> Option<u64> {
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    if let Some(limit) = v2.and_then(parse) {
        return Some(limit);
    }
    v1.and_then(parse).filter(|&l| l < (1 << 62))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rss::SetRss;

    #[test]
    fn levels_escalate_at_once_and_descend_past_the_hysteresis() {
        let t = Thresholds::default();
        assert_eq!(t.next(Level::Normal, 0.5), Level::Normal);
        assert_eq!(t.next(Level::Normal, 0.72), Level::Evicting);
        assert_eq!(t.next(Level::Normal, 0.85), Level::Bypass);
        assert_eq!(t.next(Level::Normal, 0.99), Level::Emergency);
        // Down: 0.88 is below critical (0.90) but within its hysteresis: stay.
        assert_eq!(t.next(Level::Critical, 0.88), Level::Critical);
        assert_eq!(t.next(Level::Critical, 0.86), Level::Bypass);
        assert_eq!(t.next(Level::Critical, 0.10), Level::Normal);
        assert_eq!(t.next(Level::Evicting, 0.68), Level::Evicting);
        assert_eq!(t.next(Level::Evicting, 0.66), Level::Normal);
    }

    #[test]
    fn the_monitor_publishes_every_level_from_its_rss_source() {
        let rss = Arc::new(SetRss::new(0));
        let (monitor, rx) = Monitor::new(
            rss.clone(),
            1000,
            Thresholds::default(),
            Duration::from_secs(1),
        );
        for (bytes, level) in [
            (100, Level::Normal),
            (710, Level::Evicting),
            (760, Level::Warning),
            (810, Level::Bypass),
            (910, Level::Critical),
            (960, Level::Emergency),
            (940, Level::Emergency),
            (500, Level::Normal),
        ] {
            rss.set(bytes);
            monitor.sample();
            assert_eq!(rx.borrow().level, level, "rss {bytes}");
            assert_eq!(rx.borrow().rss_bytes, bytes);
        }
    }

    #[test]
    fn reservations_are_bounded_grow_and_return_on_drop() {
        let pool = ReservationPool::new(100);
        let mut a = pool.try_reserve(60).unwrap();
        assert!(pool.try_reserve(50).is_none());
        assert!(a.grow(40));
        assert!(!a.grow(1));
        assert_eq!(pool.used_bytes(), 100);
        drop(a);
        assert_eq!(pool.used_bytes(), 0);
        assert!(pool.try_reserve(100).is_some());
    }

    #[test]
    fn reservations_stop_at_the_headroom_below_the_line() {
        let pool = ReservationPool::new(1000);
        let a = pool.try_reserve(100).unwrap();
        // RSS 850 of a line at 1000: 150 more may be reserved until the next sample.
        pool.set_headroom(850, 1000);
        assert_eq!(pool.limit_bytes(), 250);
        assert!(pool.try_reserve(200).is_none());
        let b = pool.try_reserve(150).unwrap();
        // Past the line: nothing new.
        pool.set_headroom(1100, 1000);
        assert!(pool.try_reserve(1).is_none());
        drop((a, b));
        // Far below it: the capacity is the bound.
        pool.set_headroom(10, 1_000_000);
        assert_eq!(pool.limit_bytes(), 1000);
        assert!(pool.try_reserve(1000).is_some());
    }

    #[tokio::test]
    async fn a_reservation_waits_for_room_until_its_deadline() {
        let pool = ReservationPool::new(100);
        let held = pool.try_reserve(80).unwrap();
        let start = tokio::time::Instant::now();
        let wait = Duration::from_millis(100);
        // no room is made: none, at the deadline and not before
        assert!(pool.reserve(50, start + wait).await.is_none());
        assert!(start.elapsed() >= wait);
        // room made while it waits is taken
        let waiter = |bytes| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
                pool.reserve(bytes, deadline).await
            })
        };
        let first = waiter(50);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished());
        drop(held);
        let first = first.await.unwrap().expect("room was made");
        assert_eq!(pool.used_bytes(), 50);
        // so is headroom that grows: RSS past the line, then far below it
        pool.set_headroom(2000, 1000);
        let second = waiter(50);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        pool.set_headroom(0, 1000);
        let second = second.await.unwrap().expect("headroom was made");
        assert_eq!(pool.used_bytes(), 100);
        drop((first, second));
        assert_eq!(pool.used_bytes(), 0);
    }

    #[test]
    fn cgroup_limits_are_read_and_no_limit_is_told_apart() {
        assert_eq!(
            cgroup_limit_bytes(Some("536870912\n"), None),
            Some(536_870_912)
        );
        assert_eq!(cgroup_limit_bytes(Some("max\n"), None), None);
        assert_eq!(
            cgroup_limit_bytes(None, Some("268435456")),
            Some(268_435_456)
        );
        assert_eq!(cgroup_limit_bytes(None, Some("9223372036854771712")), None);
        assert_eq!(cgroup_limit_bytes(None, None), None);
        assert_eq!(
            cgroup_paths("12:cpu,cpuacct:/a\n9:memory:/user.slice/job\n0::/ignored\n"),
            (
                Some("/ignored".to_owned()),
                Some("/user.slice/job".to_owned())
            )
        );
        assert_eq!(cgroup_paths("0::/\n"), (Some("/".to_owned()), None));
        assert_eq!(cgroup_paths(""), (None, None));
    }
}
