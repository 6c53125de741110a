//! A circuit breaker over calls to a backend that may fail or stall (the shared tier's Redis):
//! after [`FAILURES_TO_OPEN`] consecutive failures it opens and calls are skipped, for a
//! back-off that starts at [`FIRST_BACKOFF`] and doubles up to [`MAX_BACKOFF`]; then it lets
//! one call through as a probe, whose success closes it. Time is passed in: no clock, no I/O.

use std::time::Duration;

use tokio::time::Instant;

/// Consecutive failed calls (errors or timeouts) that open the breaker.
pub(crate) const FAILURES_TO_OPEN: u32 = 5;
/// How long the breaker stays open the first time (a failed probe doubles it: 2 s, 4 s, ...).
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off: each failed probe doubles the last one up to this.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The breaker's state, as `/health` shows it (`cache.shared.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Calls go to Redis.
    Closed,
    /// Calls are skipped (a miss) until the back-off ends.
    Open,
    /// One call (the probe) is in flight; the others are skipped.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The state [`BreakerState::as_str`] names, if any.
    pub(crate) fn from_name(name: &str) -> Option<BreakerState> {
        [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// 0 closed, 1 half-open, 2 open: the `imgedge_shared_breaker_state` gauge.
    pub(crate) fn as_number(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// How [`Breaker::admit`] let a call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admitted {
    /// An ordinary call, the breaker closed.
    Call,
    /// The one call an open breaker lets through after its back-off (or the first connection):
    /// its outcome alone closes or reopens a half-open breaker.
    Probe,
}

/// A circuit breaker over the calls to Redis. Time is passed in, so tests drive it without
/// sleeping.
#[derive(Debug)]
pub(crate) struct Breaker {
    state: BreakerState,
    /// Consecutive failures while closed.
    failures: u32,
    /// The back-off of the current (or next) opening.
    backoff: Duration,
    /// When an open breaker lets its probe through.
    open_until: Instant,
}

impl Breaker {
    /// A breaker in `state` (half-open at startup: the first connection is the probe).
    pub(crate) fn new(state: BreakerState, now: Instant) -> Breaker {
        Breaker {
            state,
            failures: 0,
            backoff: FIRST_BACKOFF,
            open_until: now,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go to Redis at `now`, and as what: an open breaker past its back-off
    /// turns half-open and admits this one call as its [`Admitted::Probe`].
    pub(crate) fn admit(&mut self, now: Instant) -> Option<Admitted> {
        match self.state {
            BreakerState::Closed => Some(Admitted::Call),
            BreakerState::HalfOpen => None,
            BreakerState::Open if now >= self.open_until => {
                self.state = BreakerState::HalfOpen;
                Some(Admitted::Probe)
            }
            BreakerState::Open => None,
        }
    }

    /// An admitted call succeeded: the breaker closes.
    pub(crate) fn success(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
        self.backoff = FIRST_BACKOFF;
    }

    /// A call admitted `as` failed at `now`: the breaker opens after [`FAILURES_TO_OPEN`] in a
    /// row, or at once when the call was the probe (with the back-off doubled). Any other
    /// failure while open or half-open is a call admitted before the breaker opened, ending
    /// late: it says nothing new and neither fails the probe nor lengthens the back-off
    /// (counted so, the calls in flight when Redis stalled doubled it to its cap at once, and a
    /// 5 s stall kept the tier off for minutes).
    pub(crate) fn failure(&mut self, now: Instant, admitted: Admitted) {
        match (self.state, admitted) {
            (BreakerState::Closed, _) => {
                self.failures += 1;
                if self.failures >= FAILURES_TO_OPEN {
                    self.open(now);
                }
            }
            (BreakerState::HalfOpen, Admitted::Probe) => {
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.open(now);
            }
            (BreakerState::HalfOpen | BreakerState::Open, _) => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.failures = 0;
        self.open_until = now + self.backoff;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_five_failures_probes_after_the_backoff_and_doubles_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerState::Closed, t0);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert_eq!(b.admit(t0), Some(Admitted::Call));
            b.failure(t0, Admitted::Call);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.success();
        for _ in 0..FAILURES_TO_OPEN {
            assert_eq!(b.admit(t0), Some(Admitted::Call));
            b.failure(t0, Admitted::Call);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t0 + FIRST_BACKOFF / 2), None);
        // The probe: one call only.
        assert_eq!(b.admit(t0 + FIRST_BACKOFF), Some(Admitted::Probe));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t0 + FIRST_BACKOFF), None);
        // It fails: open for twice as long.
        let t1 = t0 + FIRST_BACKOFF;
        b.failure(t1, Admitted::Probe);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t1 + FIRST_BACKOFF), None);
        assert_eq!(b.admit(t1 + 2 * FIRST_BACKOFF), Some(Admitted::Probe));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn calls_in_flight_when_it_opens_neither_fail_the_probe_nor_lengthen_the_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerState::Closed, t0);
        // eight reads admitted while closed; all time out
        for _ in 0..8 {
            assert_eq!(b.admit(t0), Some(Admitted::Call));
        }
        for _ in 0..6 {
            b.failure(t0, Admitted::Call);
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.backoff, FIRST_BACKOFF);
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(
            b.admit(t1),
            Some(Admitted::Probe),
            "probed after the first back-off"
        );
        // The last two end while the probe is out: they neither fail it nor double the back-off.
        b.failure(t1, Admitted::Call);
        b.failure(t1, Admitted::Call);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.backoff, FIRST_BACKOFF);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn the_backoff_stops_doubling_at_thirty_seconds() {
        let mut now = Instant::now();
        let mut b = Breaker::new(BreakerState::HalfOpen, now);
        for _ in 0..20 {
            b.failure(now, Admitted::Probe);
            now += MAX_BACKOFF;
            assert_eq!(b.admit(now), Some(Admitted::Probe));
        }
        assert_eq!(b.backoff, MAX_BACKOFF);
    }
}
