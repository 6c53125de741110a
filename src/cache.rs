//! The cache: [`CacheKey`], the stored [`CachedObject`], and [`TieredCache`]: the memory tier
//! ([`memory`], moka) in front of the tiers below it, each behind the storage seam ([`tier`]):
//! the optional disk tier ([`disk`], foyer) and then the optional shared tier ([`shared`], Redis),
//! whose entries both use the format of [`entry`].
//! Also remembers, without their bodies, responses that were not stored (hit-for-pass), and the
//! `Vary` names of varying URLs.
//!
//! No HTTP decisions live here (see `freshness.rs`), and nothing here touches the network.

pub(crate) mod breaker;
pub(crate) mod disk;
pub(crate) mod entry;
pub(crate) mod memory;
pub(crate) mod shared;
pub(crate) mod tier;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use moka::future::Cache;

use crate::freshness::{Freshness, MAX_DELTA};
pub(crate) use memory::MemoryTier;
pub(crate) use tier::{Tier, TierUsage};

/// What identifies a stored response: the namespace of the route that fetched it and the
/// normalized absolute upstream URL, `"{namespace} {url}"` (a URL holds no space, so no two pairs
/// share a key). Namespaces keep routes apart: an object fetched through `/image-proxy` is never
/// served through a `[[routes]]` entry or the other way round, and each route's storage rules
/// apply to its own objects only. `Vary` variants extend the key; every lookup and insert goes
/// through this type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// The key of a GET for `url` (already normalized: a parsed [`url::Url`]) through the route
    /// whose namespace is `namespace` (`image-proxy`, or a route's prefix).
    pub fn new(namespace: &str, url: &url::Url) -> Self {
        // Not `format!`: this runs for every request, and the formatting machinery cost a
        // memory hit 3 000 instructions (loadtest/perhit.sh).
        let mut key = String::with_capacity(namespace.len() + 1 + url.as_str().len());
        key.push_str(namespace);
        key.push(' ');
        key.push_str(url.as_str());
        CacheKey(Arc::from(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of this (primary) key's source record: what transforms and `/image-info` know
    /// of the object (metadata, validator, the generation its renditions are stored under).
    /// Dropped with the object by [`TieredCache::invalidate`], and by
    /// [`TieredCache::insert`] when a different version of the object is stored.
    pub fn source_record(&self) -> CacheKey {
        CacheKey(Arc::from(format!("{}\n#source", self.0)))
    }

    /// The key of a rendition (a transformed variant) of this (primary) key's object: the
    /// source record's `generation` and the canonical output parameters (size, fit, quality,
    /// the negotiated format), never a raw `Accept`. A new generation (a new source version,
    /// a purge) leaves the renditions of the old one unreachable, to age out of the tiers.
    pub fn rendition(&self, generation: u64, canonical_params: &str) -> CacheKey {
        CacheKey(Arc::from(format!(
            "{}\n#render/{generation:016x} {canonical_params}",
            self.0
        )))
    }

    /// The key of the variant of this (primary) key that a request with `headers` selects,
    /// given the response's `Vary` field names (RFC 9111 §4.1). Header values are compared with
    /// their lines joined by commas and surrounding whitespace trimmed; an absent header is a
    /// value of its own.
    pub fn variant(&self, index: &VaryIndex, headers: &HeaderMap) -> CacheKey {
        let mut key = format!("{}\n#vary/{}", self.0, index.generation);
        for name in index.names.iter() {
            key.push('\n');
            key.push_str(name.as_str());
            let mut values = headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                key.push_str("\u{0}absent");
                continue;
            }
            key.push(':');
            for (i, v) in values.enumerate() {
                if i > 0 {
                    key.push(',');
                }
                key.push_str(String::from_utf8_lossy(v.as_bytes()).trim());
            }
        }
        CacheKey(Arc::from(key))
    }
}

/// The `Vary` field names of the latest stored response for a primary key, and a generation that
/// makes variants stored under an earlier index unreachable once it is replaced or removed.
#[derive(Debug, Clone)]
pub struct VaryIndex {
    pub names: Arc<[http::HeaderName]>,
    pub generation: u64,
}

/// A complete response held in the memory tier.
#[derive(Debug)]
pub(crate) struct CachedObject {
    /// Its status: 200, or another cacheable one (RFC 9111 §3).
    pub status: http::StatusCode,
    /// The headers served on a hit: the forwarded end-to-end headers, `Content-Length` and
    /// `X-Content-Type-Options`; never `Age` or `Cache-Status`, which are computed per hit.
    pub headers: HeaderMap,
    /// The whole body: one allocation of exactly its length, so the weigher's count is what is
    /// held (a `Bytes` slice of a larger read buffer would pin memory nobody counts). Served by
    /// cloning the handle, never the bytes.
    pub body: Bytes,
    /// When its response head arrived (`response_time`, RFC 9111 §4.2.3).
    pub response_time: SystemTime,
    /// Freshness lifetime and the age it had on arrival.
    pub freshness: Freshness,
}

/// Bytes charged per entry on top of body and headers: the key, the struct, moka's node.
pub(crate) const ENTRY_OVERHEAD_BYTES: u64 = 256;

impl CachedObject {
    /// The weight of this entry in the memory tier: body plus stored header bytes plus
    /// [`ENTRY_OVERHEAD_BYTES`] and the key.
    pub(crate) fn weight_bytes(&self, key: &CacheKey) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        (self.body.len() + headers + key.as_str().len()) as u64 + ENTRY_OVERHEAD_BYTES
    }

    /// `current_age` (RFC 9111 §4.2.3) at `now`.
    pub(crate) fn age(&self, now: SystemTime) -> Duration {
        self.freshness.current_age(self.response_time, now)
    }

    /// Whether it is still fresh at `now` (RFC 9111 §4.2).
    pub(crate) fn is_fresh(&self, now: SystemTime) -> bool {
        self.freshness.lifetime > self.age(now)
    }

    /// How much longer a tier keeps it at `now`: its remaining freshness plus `stale_retention`,
    /// capped at [`MAX_DELTA`]; zero once that time has passed. Saturating throughout: an entry from an
    /// older disk, or a foreign value, may carry any lifetime.
    pub(crate) fn kept_for(&self, stale_retention: Duration, now: SystemTime) -> Duration {
        let elapsed = now.duration_since(self.response_time).unwrap_or_default();
        self.freshness
            .time_to_live()
            .saturating_add(stale_retention)
            .saturating_sub(elapsed)
            .min(MAX_DELTA)
    }
}

/// Hit-for-pass: what is remembered of a response that was not stored, so that later requests
/// for its key go straight upstream, without waiting on collapsed forwarding and, when it was too
/// large, without collecting its body.
#[derive(Debug, Clone)]
pub(crate) struct PassMarker {
    /// Why it was not stored: a `Cache-Status` detail such as `too-large` or `no-store`.
    pub reason: &'static str,
    /// Its size when it was last seen, in bytes (at least this much without `Content-Length`).
    pub length_bytes: Option<u64>,
}

impl PassMarker {
    /// The reason for objects over `max_cacheable_bytes`.
    pub(crate) const TOO_LARGE: &'static str = "too-large";

    pub(crate) fn is_too_large(&self) -> bool {
        self.reason == Self::TOO_LARGE
    }
}

/// How long a [`PassMarker`] is kept.
const PASS_TTL: Duration = Duration::from_secs(120);
/// How long a [`VaryIndex`] is kept unused: its variants expire on their own; an index found
/// gone is rebuilt by the next response that varies.
const VARY_INDEX_IDLE: Duration = Duration::from_secs(3600);
/// The bytes pass markers may take, and the bytes `Vary` indexes may take, each: their keys are
/// client-chosen URLs (up to `max_url_bytes`), so they are weighed by bytes, not counted.
pub(crate) const INDEX_CAPACITY_BYTES: u64 = 16 * 1024 * 1024;
/// Bytes charged per pass marker or `Vary` index on top of its key.
const INDEX_ENTRY_OVERHEAD_BYTES: u32 = 160;

/// Whether two stored responses carry the same validators (`ETag`, `Last-Modified`): the same
/// version of the object, as far as a cache can tell.
fn same_validators(a: &HeaderMap, b: &HeaderMap) -> bool {
    [http::header::ETAG, http::header::LAST_MODIFIED]
        .iter()
        .all(|name| a.get(name) == b.get(name))
}

/// The weight of an index entry under `key`: the key's bytes and a fixed overhead.
fn index_weight(key: &CacheKey) -> u32 {
    u32::try_from(key.as_str().len())
        .unwrap_or(u32::MAX)
        .saturating_add(INDEX_ENTRY_OVERHEAD_BYTES)
}

/// Which tiers an object is stored in (and a lower tier's hit promoted to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Memory and every tier below it: what clients are served.
    Everywhere,
    /// Only the tiers below memory, unless memory holds the key already (then it is replaced
    /// there too, never left stale); nowhere when there are none. For the sources transforms
    /// read: several MiB each, read once per new rendition, while memory keeps the renditions
    /// clients are served (a 5 MiB source there displaces a hundred thumbnails). See
    /// `[transform] sources_in_memory`.
    BelowMemory,
}

/// Where a lookup found an object: the memory tier (0) or a tier below it (1, 2, ...: the order
/// of [`TieredCache::tier_names`]).
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub object: Arc<CachedObject>,
    pub tier: usize,
    /// The tier's name, `memory` or a lower tier's (`disk`, `shared`): the `Cache-Status` detail
    /// of a hit.
    pub tier_name: &'static str,
}

/// The memory tier in front of the tiers below it (the disk tier, when configured), in lookup
/// order; plus pass markers and variant indexes (memory only). Cheap to clone (handles to
/// shared state).
#[derive(Clone)]
pub(crate) struct TieredCache {
    memory: MemoryTier,
    /// The tiers below memory, in lookup order; each behind the storage seam (`tier.rs`).
    lower: Arc<[Tier]>,
    passes: Cache<CacheKey, PassMarker>,
    /// Primary key → the `Vary` names its variants are keyed by.
    variants: Cache<CacheKey, VaryIndex>,
    next_generation: Arc<AtomicU64>,
}

impl TieredCache {
    /// `memory` in front of `lower`, looked up in that order.
    pub(crate) fn new(memory: MemoryTier, lower: Vec<Tier>) -> Self {
        let passes = Cache::builder()
            .max_capacity(INDEX_CAPACITY_BYTES)
            .weigher(|k: &CacheKey, _: &PassMarker| index_weight(k))
            .time_to_live(PASS_TTL)
            .build();
        let variants = Cache::builder()
            .max_capacity(INDEX_CAPACITY_BYTES)
            .weigher(|k: &CacheKey, v: &VaryIndex| {
                let names: usize = v.names.iter().map(|n| n.as_str().len()).sum();
                index_weight(k).saturating_add(u32::try_from(names).unwrap_or(u32::MAX))
            })
            .time_to_idle(VARY_INDEX_IDLE)
            .build();
        TieredCache {
            memory,
            lower: lower.into(),
            passes,
            variants,
            next_generation: Arc::default(),
        }
    }

    /// The memory tier, for what acts on it alone (eviction and clearing under pressure).
    pub(crate) fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    /// The tiers below memory, in lookup order.
    pub(crate) fn lower(&self) -> &[Tier] {
        &self.lower
    }

    /// Every tier's name in lookup order: `memory`, then the lower tiers'.
    pub(crate) fn tier_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once("memory").chain(self.lower.iter().map(Tier::name))
    }

    /// Whether an object is stored under `key` in memory, or (as far as this process knows, see
    /// [`tier::Holdings`]) in a lower tier. Reads nothing.
    pub(crate) fn contains(&self, key: &CacheKey) -> bool {
        self.memory.contains(key) || self.lower.iter().any(|t| t.holds(key))
    }

    /// The object stored under `key`, fresh or stale, from the first tier that has it; an
    /// object found below memory is promoted into memory and into the lower tiers above the one
    /// that had it.
    pub(crate) async fn lookup(&self, key: &CacheKey) -> Option<Found> {
        self.lookup_for(key, Placement::Everywhere).await
    }

    /// As [`TieredCache::lookup`], promoting an object found below memory only as far as
    /// `placement` stores it (with [`Placement::BelowMemory`], into the lower tiers above the
    /// one that had it).
    pub(crate) async fn lookup_for(&self, key: &CacheKey, placement: Placement) -> Option<Found> {
        if let Some(object) = self.memory.get(key).await {
            return Some(Found {
                object,
                tier: 0,
                tier_name: "memory",
            });
        }
        for (i, tier) in self.lower.iter().enumerate() {
            if let Some(object) = tier.get(key).await {
                for above in &self.lower[..i] {
                    above.store(key.clone(), object.clone());
                }
                if placement == Placement::Everywhere {
                    self.memory.insert(key.clone(), object.clone()).await;
                }
                return Some(Found {
                    object,
                    tier: i + 1,
                    tier_name: tier.name(),
                });
            }
        }
        None
    }

    /// Stores a complete object in every tier, replacing any previous one, and forgets a pass
    /// marker. Writes below memory happen in the background. When the memory tier holds a
    /// source record for `key` made from another version of the object (another `ETag` or
    /// `Last-Modified`), the record is dropped, and with it the renditions of that version.
    pub(crate) async fn insert(&self, key: CacheKey, object: CachedObject) {
        self.insert_at(key, object, Placement::Everywhere).await;
    }

    /// Whether an object stored with `placement` is stored anywhere: not when it belongs below
    /// memory and there is no tier below memory (nor is it in memory already).
    pub(crate) fn stores(&self, key: &CacheKey, placement: Placement) -> bool {
        placement == Placement::Everywhere || !self.lower.is_empty() || self.memory.contains(key)
    }

    /// As [`TieredCache::insert`], in the tiers `placement` names.
    pub(crate) async fn insert_at(
        &self,
        key: CacheKey,
        object: CachedObject,
        placement: Placement,
    ) {
        self.passes.invalidate(&key).await;
        let record = key.source_record();
        if let Some(old) = self.memory.get(&record).await
            && !same_validators(&old.headers, &object.headers)
        {
            self.forget(&record).await;
        }
        let object = Arc::new(object);
        for tier in self.lower.iter() {
            tier.store(key.clone(), object.clone());
        }
        if placement == Placement::Everywhere || self.memory.contains(&key) {
            self.memory.insert(key, object).await;
        }
    }

    /// Drops every object from the memory tier (the lower tiers keep them) and every pass marker
    /// and `Vary` index, releasing them now: for critical memory pressure.
    pub(crate) async fn clear_memory(&self) {
        self.memory.clear().await;
        self.passes.invalidate_all();
        self.variants.invalidate_all();
        self.passes.run_pending_tasks().await;
        self.variants.run_pending_tasks().await;
    }

    /// Pass markers and `Vary` indexes held, and their weighted bytes (pending maintenance run
    /// first).
    pub(crate) async fn index_usage(&self) -> (u64, u64) {
        self.passes.run_pending_tasks().await;
        self.variants.run_pending_tasks().await;
        (
            self.passes.entry_count() + self.variants.entry_count(),
            self.passes.weighted_size() + self.variants.weighted_size(),
        )
    }

    /// Discards the writes queued for every lower tier; see [`Tier::drop_queued_writes`].
    pub(crate) fn drop_queued_writes(&self) {
        for tier in self.lower.iter() {
            tier.drop_queued_writes();
        }
    }

    /// Waits until the writes queued for every lower tier have been written, at most until
    /// `deadline` (see [`Tier::flush`]); returns how many were still waiting then.
    pub(crate) async fn flush(&self, deadline: tokio::time::Instant) -> u64 {
        let mut left = 0;
        for tier in self.lower.iter() {
            if let Err(n) = tier.flush(deadline).await {
                tracing::warn!(
                    tier = tier.name(),
                    writes = n,
                    "shutdown: writes not flushed in time"
                );
                left += n;
            }
        }
        left
    }

    /// Closes every lower tier (after their writers stopped).
    pub(crate) async fn close(&self) {
        for tier in self.lower.iter() {
            tier.close().await;
        }
    }

    /// Forgets the object, any pass marker, any variants and its source record (so its
    /// renditions too) under `key` (RFC 9111 §4.4).
    pub(crate) async fn invalidate(&self, key: &CacheKey) {
        self.forget(key).await;
        self.forget(&key.source_record()).await;
        self.passes.invalidate(key).await;
        self.variants.invalidate(key).await;
    }

    /// Removes the object under `key` from every tier.
    async fn forget(&self, key: &CacheKey) {
        for tier in self.lower.iter() {
            tier.remove(key);
        }
        self.memory.invalidate(key).await;
    }

    /// The variant index of a primary key, if its latest response had `Vary`.
    pub(crate) async fn vary_index(&self, primary: &CacheKey) -> Option<VaryIndex> {
        self.variants.get(primary).await
    }

    /// Records `names` as the variant index of `primary`, keeping the current one when the names
    /// are the same (so the variants stored under it stay reachable).
    pub(crate) async fn set_vary_index(
        &self,
        primary: &CacheKey,
        names: Vec<http::HeaderName>,
    ) -> VaryIndex {
        if let Some(index) = self.variants.get(primary).await
            && index.names[..] == names[..]
        {
            return index;
        }
        let index = VaryIndex {
            names: names.into(),
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
        };
        self.variants.insert(primary.clone(), index.clone()).await;
        index
    }

    /// Remembers, for two minutes, that the response under `key` was not stored.
    pub(crate) async fn mark_pass(&self, key: CacheKey, marker: PassMarker) {
        self.passes.insert(key, marker).await;
    }

    /// The pass marker for `key`, if one is remembered.
    pub(crate) async fn pass_marker(&self, key: &CacheKey) -> Option<PassMarker> {
        self.passes.get(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(body_len: usize, ttl_secs: u64) -> CachedObject {
        CachedObject {
            status: http::StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![7u8; body_len]),
            response_time: SystemTime::now(),
            freshness: Freshness {
                lifetime: Duration::from_secs(ttl_secs),
                initial_age: Duration::ZERO,
                must_revalidate: false,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            },
        }
    }

    fn key(s: &str) -> CacheKey {
        CacheKey::new("test", &url::Url::parse(s).unwrap())
    }

    fn memory_only(capacity_bytes: u64, stale_retention: Duration) -> TieredCache {
        TieredCache::new(MemoryTier::new(capacity_bytes, stale_retention), Vec::new())
    }

    #[tokio::test]
    async fn below_memory_objects_skip_memory_unless_it_holds_them_already() {
        let tier = memory_only(1 << 20, Duration::ZERO);
        let (a, b) = (key("http://h/a"), key("http://h/b"));
        // no tier below memory: stored nowhere
        assert!(!tier.stores(&a, Placement::BelowMemory));
        assert!(tier.stores(&a, Placement::Everywhere));
        tier.insert_at(a.clone(), object(10, 60), Placement::BelowMemory)
            .await;
        assert!(tier.lookup(&a).await.is_none());
        // one memory holds (a client fetched it) is replaced, never left stale
        tier.insert(b.clone(), object(10, 60)).await;
        assert!(tier.stores(&b, Placement::BelowMemory));
        tier.insert_at(b.clone(), object(20, 60), Placement::BelowMemory)
            .await;
        let found = tier.lookup_for(&b, Placement::BelowMemory).await.unwrap();
        assert_eq!((found.tier, found.object.body.len()), (0, 20));
    }

    #[tokio::test]
    async fn weighs_entries_by_bytes_and_evicts_past_capacity() {
        let tier = memory_only(10_000, Duration::ZERO);
        tier.insert(key("http://h/a"), object(4_000, 60)).await;
        let u = tier.memory().usage().await;
        assert_eq!(u.entries, 1);
        assert_eq!(
            u.bytes,
            4_000 + 256 + key("http://h/a").as_str().len() as u64
        );
        for i in 0..10 {
            tier.insert(key(&format!("http://h/{i}")), object(4_000, 60))
                .await;
        }
        let u = tier.memory().usage().await;
        assert!(u.bytes <= 10_000, "{u:?}");
    }

    #[tokio::test]
    async fn evicts_least_recently_used_first_until_enough_bytes_are_gone() {
        let tier = memory_only(1 << 20, Duration::ZERO);
        let keys: Vec<CacheKey> = (0..5).map(|i| key(&format!("http://h/{i}"))).collect();
        for k in &keys {
            tier.insert(k.clone(), object(10_000, 60)).await;
        }
        // Use 0 and 2 again: 1, 3 and 4 are now the least recently used, in that order.
        assert!(tier.memory().get(&keys[0]).await.is_some());
        assert!(tier.lookup(&keys[2]).await.is_some());
        let weight = object(10_000, 60).weight_bytes(&keys[1]);
        let (entries, bytes) = tier.memory().evict_lru(weight + 1).await;
        assert_eq!((entries, bytes), (2, 2 * weight));
        for (i, kept) in [(0, true), (1, false), (2, true), (3, false), (4, true)] {
            assert_eq!(tier.memory().get(&keys[i]).await.is_some(), kept, "key {i}");
        }
        let (entries, _) = tier.memory().evict_lru(u64::MAX).await;
        assert_eq!(entries, 3);
        assert_eq!(tier.memory().usage().await.entries, 0);
    }

    #[tokio::test]
    async fn stale_objects_are_kept_for_stale_retention_only() {
        let k = key("http://h/a");
        for (retention, kept) in [(Duration::ZERO, false), (Duration::from_secs(60), true)] {
            let tier = memory_only(1 << 20, retention);
            let mut o = object(10, 10);
            o.response_time = SystemTime::now() - Duration::from_secs(11);
            tier.insert(k.clone(), o).await;
            let got = tier.memory().get(&k).await;
            assert_eq!(got.is_some(), kept, "retention {retention:?}");
            if let Some(o) = got {
                assert!(!o.is_fresh(SystemTime::now()));
            }
        }
    }

    #[tokio::test]
    async fn invalidating_removes_the_object_and_the_pass_marker() {
        let tier = memory_only(1 << 20, Duration::ZERO);
        let (a, b) = (key("http://h/a"), key("http://h/b"));
        tier.insert(a.clone(), object(10, 60)).await;
        let marker = PassMarker {
            reason: "no-store",
            length_bytes: None,
        };
        tier.mark_pass(b.clone(), marker).await;
        tier.invalidate(&a).await;
        tier.invalidate(&b).await;
        assert!(tier.memory().get(&a).await.is_none());
        assert!(tier.pass_marker(&b).await.is_none());
    }

    #[tokio::test]
    async fn pass_markers_and_vary_indexes_are_bounded_by_bytes_and_cleared_with_memory() {
        let tier = memory_only(1 << 20, Duration::ZERO);
        let long = "x".repeat(4000);
        for i in 0..6000 {
            let k = key(&format!("http://h/{long}/{i}"));
            let marker = PassMarker {
                reason: "no-store",
                length_bytes: None,
            };
            tier.mark_pass(k.clone(), marker).await;
            tier.set_vary_index(&k, vec![http::header::ACCEPT]).await;
        }
        let (entries, bytes) = tier.index_usage().await;
        // 6000 of each at about 4.2 KB would be 50 MB.
        assert!(bytes <= 2 * INDEX_CAPACITY_BYTES, "{bytes} bytes");
        assert!(entries < 2 * 6000, "{entries} entries");
        tier.clear_memory().await;
        assert_eq!(tier.index_usage().await, (0, 0));
    }

    #[tokio::test]
    async fn storing_an_object_forgets_its_pass_marker() {
        let tier = memory_only(1 << 20, Duration::ZERO);
        let k = key("http://h/a");
        tier.mark_pass(
            k.clone(),
            PassMarker {
                reason: PassMarker::TOO_LARGE,
                length_bytes: Some(9),
            },
        )
        .await;
        assert!(tier.pass_marker(&k).await.is_some());
        tier.insert(k.clone(), object(10, 60)).await;
        assert!(tier.pass_marker(&k).await.is_none());
        assert!(tier.memory().get(&k).await.is_some());
    }
}
