//! What the tiers and fills give up under memory pressure. The monitor (`pressure.rs`) only
//! signals; this task acts on every reading it publishes:
//!
//! - every reading: fills may reserve only the headroom left below the `bypass` line.
//! - **evicting** and above: least-recently-used memory-tier entries are evicted until RSS is at
//!   or below `[memory] evict_to` of the budget (0.60), or the tier is empty. An allocator
//!   returns freed pages to the system over seconds (jemalloc's background threads, over its
//!   10 s `dirty_decay_ms`), so bytes just evicted are counted as on their way out
//!   ([`Eviction`]) rather than evicted again against a reading that cannot have moved yet.
//! - entering **critical**: the memory tier, its pass markers and `Vary` indexes are cleared.
//! - entering **emergency**: also the disk tier's write queue is dropped and the fills no client
//!   is reading are aborted.
//!
//! Shedding requests (critical) and not teeing (bypass) happen on the request path, which reads
//! the level itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::TieredCache;
use crate::collapse::Collapser;
use crate::metrics::{self, Metrics};
use crate::pressure::{Level, Reading, ReservationPool};

/// How long evicted bytes are expected to take to leave RSS at most; past it, what has not
/// left is assumed to stay (still held by responses in flight, or fragmentation) and eviction
/// goes on against the plain reading.
pub(crate) const EVICTION_PENDING: Duration = Duration::from_secs(15);

/// An eviction episode: from the first reading at `evicting` or above until RSS is at or below
/// the target or the tier is empty.
#[derive(Debug)]
pub(crate) struct Eviction {
    /// RSS at the last eviction.
    rss_at_eviction_bytes: u64,
    /// Bytes evicted and not yet seen leaving RSS, as of the last eviction.
    pending_bytes: u64,
    evicted_at: Instant,
}

impl Eviction {
    /// Evicted bytes not yet seen leaving RSS at a reading of `rss_bytes`: what was pending at
    /// the last eviction, less how far RSS has fallen since; none once `EVICTION_PENDING` passed.
    fn pending_bytes(&self, rss_bytes: u64, now: Instant) -> u64 {
        if now.duration_since(self.evicted_at) >= EVICTION_PENDING {
            return 0;
        }
        let fallen = self.rss_at_eviction_bytes.saturating_sub(rss_bytes);
        self.pending_bytes.saturating_sub(fallen)
    }

    /// What still needs evicting at a reading of `rss_bytes` towards `target_bytes`: the excess
    /// of RSS over the target, less the evicted bytes that have not shown up as a fall yet.
    /// `None` when RSS is at or below the target: the episode is over.
    pub(crate) fn excess_bytes(
        &self,
        rss_bytes: u64,
        target_bytes: u64,
        now: Instant,
    ) -> Option<u64> {
        (rss_bytes > target_bytes).then(|| {
            rss_bytes
                .saturating_sub(self.pending_bytes(rss_bytes, now))
                .saturating_sub(target_bytes)
        })
    }

    /// Records `bytes` evicted at a reading of `rss_bytes`, on top of what is still pending.
    pub(crate) fn evicted(&mut self, bytes: u64, rss_bytes: u64, now: Instant) {
        self.pending_bytes = self.pending_bytes(rss_bytes, now) + bytes;
        self.rss_at_eviction_bytes = rss_bytes;
        self.evicted_at = now;
    }
}

/// What relief acts on: the same handles the proxy and `/health` use.
pub(crate) struct Relief {
    pub tier: TieredCache,
    pub fills: Arc<ReservationPool>,
    pub collapser: Arc<Collapser>,
    pub metrics: Arc<Metrics>,
    /// The fraction of the budget eviction brings RSS down to (`[memory] evict_to`).
    pub evict_to: f64,
    /// The fraction below which fills may reserve bytes (the `bypass` threshold:
    /// [`ReservationPool::set_headroom`]).
    pub fill_line: f64,
}

/// Acts on every reading until the monitor ends (or the app shuts down).
pub(crate) async fn run(mut pressure: watch::Receiver<Reading>, relief: Relief) {
    let Relief {
        tier,
        fills,
        collapser,
        metrics,
        evict_to,
        fill_line,
    } = relief;
    // the first reading is acted on as any other: an instance that starts above a line counts
    // its transition and gives up what that level gives up
    let mut level = Level::Normal;
    let mut episode: Option<Eviction> = None;
    pressure.mark_changed();
    while pressure.changed().await.is_ok() {
        let reading = *pressure.borrow_and_update();
        fills.set_headroom(
            reading.rss_bytes,
            (fill_line * reading.budget_bytes as f64) as u64,
        );
        if reading.level != level {
            metrics
                .pressure_transitions
                .get_or_create(&metrics::LevelLabels {
                    to: reading.level.as_str(),
                })
                .inc();
        }
        if reading.level >= Level::Critical && level < Level::Critical {
            tier.clear_memory().await;
            metrics.relieved("cleared", 1);
            tracing::warn!(
                rss_bytes = reading.rss_bytes,
                "memory tier cleared under critical memory pressure"
            );
        }
        if reading.level == Level::Emergency && level < Level::Emergency {
            tier.drop_queued_writes();
            let aborted = collapser.abort_unread();
            metrics.relieved("aborted_fills", aborted as u64);
            tracing::warn!(
                rss_bytes = reading.rss_bytes,
                aborted_fills = aborted,
                "emergency memory pressure: disk write queue dropped, unread fills aborted"
            );
        }
        level = reading.level;
        if reading.level >= Level::Evicting && episode.is_none() {
            episode = Some(Eviction {
                rss_at_eviction_bytes: reading.rss_bytes,
                pending_bytes: 0,
                evicted_at: Instant::now(),
            });
        }
        let Some(eviction) = episode.as_mut() else {
            continue;
        };
        let now = Instant::now();
        let target_bytes = (evict_to * reading.budget_bytes as f64) as u64;
        let Some(excess_bytes) = eviction.excess_bytes(reading.rss_bytes, target_bytes, now) else {
            episode = None;
            tracing::info!(rss_bytes = reading.rss_bytes, target_bytes, "eviction done");
            continue;
        };
        if excess_bytes == 0 {
            // Enough is evicted; waiting for the allocator to give it back.
            continue;
        }
        let (entries, bytes) = tier.memory().evict_lru(excess_bytes).await;
        if entries == 0 {
            // Nothing left to evict: what remains is not the tier's.
            episode = None;
            tracing::info!(
                rss_bytes = reading.rss_bytes,
                target_bytes,
                "eviction done: the memory tier is empty"
            );
            continue;
        }
        eviction.evicted(bytes, reading.rss_bytes, now);
        metrics.relieved("evicted_entries", entries);
        metrics.relieved("evicted_bytes", bytes);
        tracing::info!(
            rss_bytes = reading.rss_bytes,
            target_bytes,
            entries,
            bytes,
            "evicted least-recently-used entries under memory pressure"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicted_bytes_count_as_leaving_until_rss_shows_them_or_they_expire() {
        let t0 = Instant::now();
        let mut e = Eviction {
            rss_at_eviction_bytes: 1000,
            pending_bytes: 0,
            evicted_at: t0,
        };
        assert_eq!(e.excess_bytes(1000, 600, t0), Some(400));
        e.evicted(300, 1000, t0);
        // RSS has not moved: 100 more to go, not 400.
        assert_eq!(e.excess_bytes(1000, 600, t0), Some(100));
        // RSS fell by 200 of the 300: still 100 to go.
        assert_eq!(e.excess_bytes(800, 600, t0), Some(100));
        e.evicted(100, 800, t0);
        // 100 + 100 pending: nothing more to evict while they leave.
        assert_eq!(e.excess_bytes(800, 600, t0), Some(0));
        // New growth shows through.
        assert_eq!(e.excess_bytes(850, 600, t0), Some(50));
        // Past EVICTION_PENDING what did not leave is assumed to stay.
        let later = t0 + EVICTION_PENDING;
        assert_eq!(e.excess_bytes(800, 600, later), Some(200));
        // At or below the target the episode is over.
        assert_eq!(e.excess_bytes(600, 600, t0), None);
    }
}
