//! The memory tier: a moka cache of [`CachedObject`]s weighted by bytes, each expiring
//! `stale_retention` after its freshness ends, with an access clock of its own for
//! least-recently-used eviction under memory pressure (moka cannot evict "LRU until N bytes").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;

use super::{CacheKey, CachedObject};

/// A memory-tier entry: the object and when it was last used.
struct Entry {
    object: Arc<CachedObject>,
    /// The tier's access clock at the last lookup or insert: larger is more recent.
    last_used: AtomicU64,
}

/// Expires each object `stale_retention` (or its own `stale-while-revalidate` or `stale-if-error`
/// window, if longer) after its freshness runs out.
struct FreshnessExpiry {
    stale_retention: Duration,
}

impl Expiry<CacheKey, Arc<Entry>> for FreshnessExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        // Capped (moka adds this to its clock).
        Some(
            value
                .object
                .kept_for(self.stale_retention, SystemTime::now()),
        )
    }
}

/// A snapshot of the memory tier's size.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct MemoryUsage {
    pub entries: u64,
    /// Weighted size: body plus header bytes of every entry.
    pub bytes: u64,
    pub capacity_bytes: u64,
}

/// The memory tier. Cheap to clone (handles to shared state).
#[derive(Clone)]
pub(crate) struct MemoryTier {
    objects: Cache<CacheKey, Arc<Entry>>,
    /// Ticks once per lookup hit or insert; stamps [`Entry::last_used`].
    clock: Arc<AtomicU64>,
    capacity_bytes: u64,
}

impl MemoryTier {
    /// A tier holding at most `capacity_bytes` of weighted entries; least recently used entries
    /// are evicted first once it is full (moka's TinyLFU admission may also refuse a newcomer).
    pub(crate) fn new(capacity_bytes: u64, stale_retention: Duration) -> Self {
        let objects = Cache::builder()
            .name("imgedge-memory")
            .max_capacity(capacity_bytes)
            .weigher(|k: &CacheKey, v: &Arc<Entry>| {
                u32::try_from(v.object.weight_bytes(k)).unwrap_or(u32::MAX)
            })
            .expire_after(FreshnessExpiry { stale_retention })
            .build();
        MemoryTier {
            objects,
            clock: Arc::default(),
            capacity_bytes,
        }
    }

    /// The object stored under `key`, fresh or stale (within `stale_retention`): whether it may
    /// serve a request is the caller's decision (`freshness::usability`).
    pub(crate) async fn get(&self, key: &CacheKey) -> Option<Arc<CachedObject>> {
        let entry = self.objects.get(key).await?;
        entry.last_used.store(self.tick(), Ordering::Relaxed);
        Some(entry.object.clone())
    }

    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.objects.contains_key(key)
    }

    /// Stores `object` under `key`, replacing any other.
    pub(crate) async fn insert(&self, key: CacheKey, object: Arc<CachedObject>) {
        let entry = Entry {
            object,
            last_used: AtomicU64::new(self.tick()),
        };
        self.objects.insert(key, Arc::new(entry)).await;
    }

    pub(crate) async fn invalidate(&self, key: &CacheKey) {
        self.objects.invalidate(key).await;
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Evicts least-recently-used objects (the tiers below keep them) until at least `bytes` of
    /// weight are gone or the tier is empty. Returns the entries and the weighted bytes evicted.
    /// Used under memory pressure (`evicting`): moka's own eviction only acts on inserts past
    /// its capacity.
    pub(crate) async fn evict_lru(&self, bytes: u64) -> (u64, u64) {
        let mut candidates: Vec<(u64, u64, Arc<CacheKey>)> = self
            .objects
            .iter()
            .map(|(key, entry)| {
                let used = entry.last_used.load(Ordering::Relaxed);
                (used, entry.object.weight_bytes(&key), key)
            })
            .collect();
        candidates.sort_unstable_by_key(|&(used, _, _)| used);
        let (mut entries, mut freed) = (0, 0);
        for (_, weight, key) in candidates {
            if freed >= bytes {
                break;
            }
            self.objects.invalidate(&*key).await;
            entries += 1;
            freed += weight;
        }
        self.objects.run_pending_tasks().await;
        (entries, freed)
    }

    /// Drops every object (the tiers below keep them), releasing their bodies now (once no
    /// response still holds them) rather than at moka's next maintenance.
    pub(crate) async fn clear(&self) {
        self.objects.invalidate_all();
        self.objects.run_pending_tasks().await;
    }

    /// Entry count and weighted size in bytes, exact (pending maintenance is run first).
    pub(crate) async fn usage(&self) -> MemoryUsage {
        self.objects.run_pending_tasks().await;
        MemoryUsage {
            entries: self.objects.entry_count(),
            bytes: self.objects.weighted_size(),
            capacity_bytes: self.capacity_bytes,
        }
    }
}
