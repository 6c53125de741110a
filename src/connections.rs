//! The connections being served, as counts and clocks: how many are open against
//! `[server] max_connections` ([`Connections`], read by `/health` and `/metrics`), and what each
//! is doing for its timeouts ([`Activity`]: requests in flight, since when idle, whether a
//! request head is arriving), with the hold a request may keep on its connection after its
//! response ([`Busy`]). No I/O and nothing of the crate: `server` drives them, `http` reads them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The open connections: counted against `max_connections`, and read by `/health/ready`.
#[derive(Debug)]
pub(crate) struct Connections {
    open: AtomicUsize,
    max: usize,
}

impl Connections {
    /// Room for `max` connections.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// `[server] max_connections`.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether no more are accepted.
    pub(crate) fn is_full(&self) -> bool {
        self.open() >= self.max
    }

    /// A slot for one more connection, or `None` at the limit.
    pub(crate) fn claim(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One open connection; freed when dropped.
pub(crate) struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one connection is doing, for its timeouts: requests in flight, when it last went idle,
/// and whether an HTTP/1.1 client has started sending its next request head. Times are
/// milliseconds after `started`.
pub(crate) struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// When the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// 1 + when the first byte of a request head arrived with nothing in flight; 0 when none is
    /// being read.
    head_since_ms: AtomicU64,
    /// Whether any request has started.
    used: AtomicBool,
    /// Whether the connection speaks HTTP/2 (a byte read then is a frame, not a head).
    h2: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(0),
            used: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn begin(self: &Arc<Self>, version: http::Version) -> ActivityGuard {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
            self.h2
                .store(version == http::Version::HTTP_2, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(0, Ordering::Relaxed);
        ActivityGuard(self.clone())
    }

    /// Whether the connection speaks HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// Bytes arrived from the client.
    pub(crate) fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.used.load(Ordering::Relaxed)
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since_ms.load(Ordering::Relaxed) == 0
        {
            self.head_since_ms
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// When the connection is to be closed if nothing changes: `None` while a request is in
    /// flight. Until the first request and while a request head arrives, `header_read_timeout`
    /// applies; otherwise, idle, `idle_timeout`.
    pub(crate) fn deadline(&self, limits: ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        let (since, limit) = match self.head_since_ms.load(Ordering::Relaxed) {
            _ if !self.used.load(Ordering::Relaxed) => (Duration::ZERO, limits.header_read_timeout),
            0 => (
                ms(self.idle_since_ms.load(Ordering::Relaxed)),
                limits.idle_timeout,
            ),
            head => (ms(head - 1), limits.header_read_timeout),
        };
        Some(self.started + since + limit)
    }
}

/// A request's hold on its connection: while a guard from [`Busy::hold`] lives, the connection
/// counts as busy with a request, as while a response is being sent (no idle or head
/// timeout), whatever else has ended. For a request body still being read after its response
/// (upload.rs's lingering close).
#[derive(Clone)]
pub(crate) struct Busy(Arc<Activity>);

impl Busy {
    /// The hold a request of the connection whose `activity` this is may take.
    pub(crate) fn of(activity: &Arc<Activity>) -> Busy {
        Busy(activity.clone())
    }
}

impl Busy {
    /// Keeps the connection busy until the guard is dropped.
    pub(crate) fn hold(&self) -> BusyGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        BusyGuard(ActivityGuard(self.0.clone()))
    }
}

/// See [`Busy::hold`].
pub(crate) struct BusyGuard(#[allow(dead_code)] ActivityGuard);

/// One request in flight: ends with its response body (when hyper drops it).
pub(crate) struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The timeouts a connection's [`Activity::deadline`] follows (`[server] header_read_timeout`,
/// `idle_timeout`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}
