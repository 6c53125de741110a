//! What the tiers and fills give up under memory pressure. The monitor (`pressure.rs`) only
//! signals; this task acts on every reading it publishes:
//!
//! - **evicting** and above: least-recently-used memory-tier entries are evicted until RSS is at
//!   or below `[memory] evict_to` of the budget (0.60), or the tier is empty. Freed pages take
//!   the allocator about a second to return (jemalloc, `dirty_decay_ms` 1000: see
//!   `.cargo/config.toml`), so after evicting it waits [`EVICTION_SETTLE`] before judging RSS
//!   again, instead of emptying the tier against a reading that cannot have moved yet.
//! - every reading: fills may reserve only the headroom left below the `bypass` line.
//! - entering **critical**: the memory tier is cleared.
//! - entering **emergency**: also the disk tier's write queue is dropped and the fills no client
//!   is reading are aborted.
//!
//! Shedding requests (critical) and not teeing (bypass) happen on the request path, which reads
//! the level itself.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{self, Metrics};
use crate::pressure::{Level, Reading};
use crate::proxy::Proxy;

/// How long after an eviction RSS is left to fall before more is evicted.
pub const EVICTION_SETTLE: Duration = Duration::from_secs(1);

/// Acts on every reading until the monitor ends. `evict_to` is the fraction of the budget
/// eviction brings RSS down to; `fill_line` the fraction below which fills may reserve bytes
/// (the `bypass` threshold: [`crate::pressure::ReservationPool::set_headroom`]).
pub async fn run(
    mut pressure: watch::Receiver<Reading>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    evict_to: f64,
    fill_line: f64,
) {
    let mut level = pressure.borrow().level;
    let mut evicting = false;
    let mut settled_at = Instant::now();
    while pressure.changed().await.is_ok() {
        let reading = *pressure.borrow_and_update();
        proxy.fills().set_headroom(
            reading.rss_bytes,
            (fill_line * reading.budget_bytes as f64) as u64,
        );
        if reading.level != level {
            metrics
                .pressure_transitions
                .get_or_create(&metrics::LevelLabels {
                    to: level_name(reading.level),
                })
                .inc();
        }
        if reading.level >= Level::Critical && level < Level::Critical {
            proxy.tier().clear_memory().await;
            metrics.relieved("cleared", 1);
            tracing::warn!(
                rss_bytes = reading.rss_bytes,
                "memory tier cleared under critical memory pressure"
            );
        }
        if reading.level == Level::Emergency && level < Level::Emergency {
            proxy.tier().drop_queued_disk_writes();
            let aborted = proxy.abort_unread_fills();
            metrics.relieved("aborted_fills", aborted as u64);
            tracing::warn!(
                rss_bytes = reading.rss_bytes,
                aborted_fills = aborted,
                "emergency memory pressure: disk write queue dropped, unread fills aborted"
            );
        }
        level = reading.level;
        if reading.level >= Level::Evicting && !evicting {
            evicting = true;
            settled_at = Instant::now();
        }
        if !evicting || Instant::now() < settled_at {
            continue;
        }
        let target_bytes = (evict_to * reading.budget_bytes as f64) as u64;
        let excess_bytes = reading.rss_bytes.saturating_sub(target_bytes);
        if excess_bytes == 0 {
            evicting = false;
            tracing::info!(rss_bytes = reading.rss_bytes, target_bytes, "eviction done");
            continue;
        }
        let (entries, bytes) = proxy.tier().evict_lru(excess_bytes).await;
        if entries == 0 {
            // Nothing left to evict: what remains is not the tier's.
            evicting = false;
            tracing::info!(
                rss_bytes = reading.rss_bytes,
                target_bytes,
                "eviction done: the memory tier is empty"
            );
            continue;
        }
        metrics.relieved("evicted_entries", entries);
        metrics.relieved("evicted_bytes", bytes);
        tracing::info!(
            rss_bytes = reading.rss_bytes,
            target_bytes,
            entries,
            bytes,
            "evicted least-recently-used entries under memory pressure"
        );
        settled_at = Instant::now() + EVICTION_SETTLE;
    }
}

/// The `to` label of `imgedge_memory_pressure_transitions_total`.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Normal => "normal",
        Level::Evicting => "evicting",
        Level::Warning => "warning",
        Level::Bypass => "bypass",
        Level::Critical => "critical",
        Level::Emergency => "emergency",
    }
}
