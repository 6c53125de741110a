//! The disk tier: complete objects written to a foyer block store that survives restarts.
//!
//! Every entry is `imgedge`'s own encoding — a magic and format version, the status, times,
//! freshness, headers and body, and a CRC32 over all of it — checked on every read: a mismatch is
//! a miss and a removal, never a served byte. foyer checks its own blocks too.
//!
//! Failure is never a request's problem: writes go through one writer task fed by a bounded queue
//! (a full queue drops the write and counts it), each written and awaited before the next (foyer
//! drops writes silently when bursts outrun its buffers); reads and writes run inside spawned
//! tasks, so a panic inside foyer (as on a full disk) becomes a logged miss and turns the tier
//! off. See docs/foyer-disk-tier.md for the traps this design avoids.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, PsyncIoEngineConfig, RecoverMode,
};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::sync::mpsc;

use super::{CacheKey, CachedObject};
use crate::freshness::Freshness;

/// `IMGEDGE` plus the entry format version.
const MAGIC: &[u8; 8] = b"IMGEDGE\x01";
/// foyer's block: the largest entry is a block less 4 KiB, so 16 MiB fits a 5 MiB body with room.
const BLOCK_BYTES: usize = 16 * 1024 * 1024;
/// Writes waiting for the writer task; more are dropped (and counted).
const WRITE_QUEUE: usize = 64;
/// Reads in flight at once. Each holds foyer's read buffer and the decoded copy of an entry (up
/// to twice `max_cacheable_bytes`) outside any reservation, and two cores gain nothing from more:
/// the bound keeps a flood of disk hits from outgrowing the memory budget between RSS samples.
const CONCURRENT_READS: usize = 8;

type Store = HybridCache<String, Bytes>;

/// Counters of the disk tier, for /health and /metrics.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub writes: AtomicU64,
    pub write_drops: AtomicU64,
    pub hits: AtomicU64,
    /// Entries that failed their checksum or format check (removed) and foyer errors.
    pub errors: AtomicU64,
}

/// A snapshot for /health; all zero (the default) when there is no disk tier.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DiskUsage {
    pub enabled: bool,
    /// Entries written since this process started and not known to be gone (see [`Holdings`]).
    pub entries: u64,
    /// Their encoded size in bytes.
    pub bytes: u64,
    pub writes: u64,
    pub write_drops: u64,
    pub hits: u64,
    pub errors: u64,
    pub capacity_bytes: u64,
}

/// What the disk tier holds, as far as this process knows: the entries it wrote, with their
/// sizes, oldest first. foyer exposes no count of its own, so this mirrors it: an entry leaves
/// when it is removed or found missing, and the oldest ones leave once the total passes the
/// capacity (foyer reclaims its oldest blocks first). Entries recovered at startup are not
/// counted until they are read.
#[derive(Debug, Default)]
pub struct Holdings {
    sizes: HashMap<CacheKey, (u64, u64)>,
    /// (sequence, key) in write order; stale when the key was rewritten or removed since.
    order: VecDeque<(u64, CacheKey)>,
    next: u64,
    bytes: u64,
}

impl Holdings {
    fn add(&mut self, key: CacheKey, bytes: u64, capacity_bytes: u64) {
        self.remove(&key);
        let seq = self.next;
        self.next += 1;
        self.sizes.insert(key.clone(), (seq, bytes));
        self.order.push_back((seq, key));
        self.bytes += bytes;
        while self.bytes > capacity_bytes {
            let Some((seq, key)) = self.order.pop_front() else {
                break;
            };
            if self.sizes.get(&key).is_some_and(|&(s, _)| s == seq) {
                self.remove(&key);
            }
        }
        // Drop stale queue entries so the queue stays proportional to the map.
        if self.order.len() > 2 * self.sizes.len() + 64 {
            let sizes = &self.sizes;
            self.order
                .retain(|(seq, key)| sizes.get(key).is_some_and(|&(s, _)| s == *seq));
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some((_, bytes)) = self.sizes.remove(key) {
            self.bytes -= bytes;
        }
    }
}

/// A write waiting in the queue, numbered so that [`DiskTier::drop_queued_writes`] can discard
/// everything queued before it.
type QueuedWrite = (u64, CacheKey, Arc<CachedObject>);

/// Why the disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("creating {}: {source}", dir.display())]
    Create {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("opening {}: {source}", dir.display())]
    Open {
        dir: std::path::PathBuf,
        source: foyer::Error,
    },
}

/// The disk tier. Cheap to clone.
#[derive(Clone)]
pub struct DiskTier {
    store: Store,
    writes: mpsc::Sender<QueuedWrite>,
    /// Numbers the queued writes.
    queued: Arc<AtomicU64>,
    /// Queued writes numbered below this are discarded (memory pressure).
    discard_below: Arc<AtomicU64>,
    holdings: Arc<Mutex<Holdings>>,
    /// [`CONCURRENT_READS`] permits.
    reads: Arc<tokio::sync::Semaphore>,
    stats: Arc<DiskStats>,
    /// Cleared when foyer fails in a way it does not recover from (a panic).
    enabled: Arc<AtomicBool>,
    capacity_bytes: u64,
}

impl DiskTier {
    /// Opens (and recovers) the tier in `dir`, created 0700 if missing: entries may hold the
    /// bytes of private images, and foyer's padding can hold stray heap bytes.
    ///
    /// # Errors
    /// [`OpenError::Create`] when the directory cannot be created, [`OpenError::Open`] when
    /// foyer cannot open it.
    pub async fn open(dir: &Path, capacity_bytes: u64) -> Result<DiskTier, OpenError> {
        let open = |source| OpenError::Open {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Create {
            dir: dir.to_owned(),
            source,
        })?;
        restrict(dir);
        let device = FsDeviceBuilder::new(dir)
            .with_capacity(capacity_bytes as usize)
            .build()
            .map_err(open)?;
        let engine = BlockEngineConfig::new(device)
            .with_block_size(BLOCK_BYTES)
            .with_buffer_pool_size(2 * BLOCK_BYTES)
            .with_submit_queue_size_threshold(4 * BLOCK_BYTES)
            .with_tombstone_log(true);
        let store: Store = HybridCacheBuilder::new()
            .with_name("imgedge-disk")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(false)
            .memory(1024 * 1024)
            .with_shards(1)
            .with_weighter(|k: &String, v: &Bytes| k.len() + v.len())
            // foyer's own memory part keeps nothing: the moka tier is the memory tier.
            .with_filter(|_: &String, _: &Bytes| false)
            .storage()
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(engine)
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(open)?;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let tier = DiskTier {
            store,
            writes,
            queued: Arc::default(),
            discard_below: Arc::default(),
            holdings: Arc::default(),
            reads: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_READS)),
            stats: Arc::default(),
            enabled: Arc::new(AtomicBool::new(true)),
            capacity_bytes,
        };
        tokio::spawn(tier.clone().write_loop(queue));
        Ok(tier)
    }

    /// Queues a complete object for writing; drops it (counted) when the queue is full.
    pub fn store(&self, key: CacheKey, object: Arc<CachedObject>) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let seq = self.queued.fetch_add(1, Ordering::Relaxed);
        if self.writes.try_send((seq, key, object)).is_err() {
            self.stats.write_drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Discards every write queued so far (counted as dropped), releasing the objects they hold:
    /// under emergency memory pressure the queue may be the last reference to their bodies.
    pub fn drop_queued_writes(&self) {
        self.discard_below
            .store(self.queued.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    async fn write_loop(self, mut queue: mpsc::Receiver<QueuedWrite>) {
        while let Some((seq, key, object)) = queue.recv().await {
            if !self.enabled.load(Ordering::Relaxed) {
                continue;
            }
            if seq < self.discard_below.load(Ordering::Relaxed) {
                self.stats.write_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let entry = encode(&object);
            drop(object);
            let bytes = entry.len() as u64;
            let store = self.store.clone();
            let name = key.as_str().to_owned();
            let written = tokio::spawn(async move {
                store.insert(name, entry);
                store.storage().wait().await;
            })
            .await;
            match written {
                Ok(()) => {
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    self.holdings().add(key, bytes, self.capacity_bytes);
                }
                Err(e) => self.fail("write", &e),
            }
        }
    }

    fn holdings(&self) -> std::sync::MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The object stored under `key`, if present and intact. A damaged entry is removed.
    pub async fn get(&self, key: &CacheKey) -> Option<CachedObject> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let Ok(_permit) = self.reads.acquire().await else {
            return None;
        };
        let store = self.store.clone();
        let name = key.as_str().to_owned();
        let read = tokio::spawn(async move {
            match store.get(&name).await {
                Ok(entry) => Ok(entry.map(|e| e.value().clone())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        let entry = match read {
            Ok(Ok(Some(entry))) => entry,
            Ok(Ok(None)) => {
                self.holdings().remove(key);
                return None;
            }
            Ok(Err(e)) => {
                tracing::warn!(key = key.as_str(), error = %e, "disk tier read failed: a miss");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => {
                self.fail("read", &e);
                return None;
            }
        };
        match decode(entry) {
            Some(object) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(object)
            }
            None => {
                tracing::warn!(
                    key = key.as_str(),
                    "disk entry failed its checksum: removed"
                );
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.remove(key);
                None
            }
        }
    }

    /// Whether this process wrote `key` and has not seen it go ([`Holdings`]).
    pub fn holds(&self, key: &CacheKey) -> bool {
        self.holdings().sizes.contains_key(key)
    }

    /// Removes `key` (recorded in foyer's tombstone log, so it stays gone after a restart).
    pub fn remove(&self, key: &CacheKey) {
        if self.enabled.load(Ordering::Relaxed) {
            self.store.remove(key.as_str());
        }
        self.holdings().remove(key);
    }

    pub fn usage(&self) -> DiskUsage {
        let s = &self.stats;
        let (entries, bytes) = {
            let h = self.holdings();
            (h.sizes.len() as u64, h.bytes)
        };
        DiskUsage {
            enabled: self.enabled.load(Ordering::Relaxed),
            entries,
            bytes,
            writes: s.writes.load(Ordering::Relaxed),
            write_drops: s.write_drops.load(Ordering::Relaxed),
            hits: s.hits.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            capacity_bytes: self.capacity_bytes,
        }
    }

    /// A panic inside foyer leaves its state poisoned: stop using the tier, keep serving.
    fn fail(&self, what: &str, e: &tokio::task::JoinError) {
        tracing::error!(error = %e, "disk tier {what} panicked: disk tier off until restart");
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.enabled.store(false, Ordering::Relaxed);
    }
}

#[cfg(unix)]
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict(_: &Path) {}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The entry format, version 1: magic+version, status, response time, freshness, headers, body,
/// then a CRC32 of everything before it. Integers are big-endian.
pub fn encode(object: &CachedObject) -> Bytes {
    let headers_len: usize = object
        .headers
        .iter()
        .map(|(k, v)| 6 + k.as_str().len() + v.len())
        .sum();
    let mut out = BytesMut::with_capacity(64 + headers_len + object.body.len());
    out.put_slice(MAGIC);
    out.put_u16(object.status.as_u16());
    let since_epoch = object
        .response_time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    out.put_u64(duration_ms(since_epoch));
    let f = &object.freshness;
    for d in [
        f.lifetime,
        f.initial_age,
        f.stale_while_revalidate,
        f.stale_if_error,
    ] {
        out.put_u64(duration_ms(d));
    }
    out.put_u8(u8::from(f.must_revalidate));
    out.put_u32(object.headers.len() as u32);
    for (name, value) in &object.headers {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u64(object.body.len() as u64);
    out.put_slice(&object.body);
    let crc = crc32fast::hash(&out);
    out.put_u32(crc);
    out.freeze()
}

/// Decodes an entry written by [`encode`]; `None` when anything is off (version, checksum,
/// lengths, header syntax). The body is a slice of `entry`, not a copy.
pub fn decode(entry: Bytes) -> Option<CachedObject> {
    if entry.len() < MAGIC.len() + 4 {
        return None;
    }
    let (payload, crc) = entry.split_at(entry.len() - 4);
    if crc32fast::hash(payload) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let payload = entry.slice(..entry.len() - 4);
    let mut r = payload.clone();
    let need = |r: &Bytes, n: usize| (r.remaining() >= n).then_some(());
    need(&r, MAGIC.len())?;
    if &r[..MAGIC.len()] != MAGIC {
        return None;
    }
    r.advance(MAGIC.len());
    need(&r, 2 + 8 + 4 * 8 + 1 + 4)?;
    let status = StatusCode::from_u16(r.get_u16()).ok()?;
    let response_time = SystemTime::UNIX_EPOCH + Duration::from_millis(r.get_u64());
    let mut d = || Duration::from_millis(r.get_u64());
    let (lifetime, initial_age, stale_while_revalidate, stale_if_error) = (d(), d(), d(), d());
    let must_revalidate = r.get_u8() != 0;
    let count = r.get_u32() as usize;
    let mut headers = HeaderMap::with_capacity(count.min(64));
    for _ in 0..count {
        need(&r, 2)?;
        let n = r.get_u16() as usize;
        need(&r, n + 4)?;
        let name = HeaderName::from_bytes(&r[..n]).ok()?;
        r.advance(n);
        let v = r.get_u32() as usize;
        need(&r, v)?;
        let value = HeaderValue::from_bytes(&r[..v]).ok()?;
        r.advance(v);
        headers.append(name, value);
    }
    need(&r, 8)?;
    let body_len = r.get_u64() as usize;
    if r.remaining() != body_len {
        return None;
    }
    Some(CachedObject {
        status,
        headers,
        body: r,
        response_time,
        freshness: Freshness {
            lifetime,
            initial_age,
            must_revalidate,
            stale_while_revalidate,
            stale_if_error,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> CachedObject {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("image/png"),
        );
        headers.append("x-two", HeaderValue::from_static("a"));
        headers.append("x-two", HeaderValue::from_static("b"));
        CachedObject {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from(vec![7u8; 10_000]),
            response_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::from_secs(3),
                must_revalidate: true,
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::from_secs(7),
            },
        }
    }

    fn key(s: &str) -> CacheKey {
        CacheKey::for_url(&url::Url::parse(s).unwrap())
    }

    #[test]
    fn holdings_count_rewrites_once_and_drop_the_oldest_past_capacity() {
        let mut h = Holdings::default();
        h.add(key("http://h/a"), 40, 100);
        h.add(key("http://h/b"), 40, 100);
        h.add(key("http://h/a"), 30, 100);
        assert_eq!((h.sizes.len(), h.bytes), (2, 70));
        // c passes the capacity: b (now the oldest write) goes, a (rewritten later) stays.
        h.add(key("http://h/c"), 50, 100);
        assert_eq!((h.sizes.len(), h.bytes), (2, 80));
        assert!(!h.sizes.contains_key(&key("http://h/b")));
        h.remove(&key("http://h/a"));
        assert_eq!((h.sizes.len(), h.bytes), (1, 50));
    }

    #[test]
    fn entries_round_trip() {
        let o = object();
        let back = decode(encode(&o)).unwrap();
        assert_eq!(back.status, o.status);
        assert_eq!(back.headers, o.headers);
        assert_eq!(back.body, o.body);
        assert_eq!(back.response_time, o.response_time);
        assert_eq!(back.freshness, o.freshness);
    }

    #[test]
    fn any_damaged_byte_or_truncation_is_refused() {
        let entry = encode(&object());
        for i in [
            0,
            8,
            20,
            60,
            entry.len() / 2,
            entry.len() - 5,
            entry.len() - 1,
        ] {
            let mut damaged = entry.to_vec();
            damaged[i] ^= 0x40;
            assert!(decode(Bytes::from(damaged)).is_none(), "byte {i}");
        }
        for len in [0, 3, 11, entry.len() - 1] {
            assert!(decode(entry.slice(..len)).is_none(), "truncated to {len}");
        }
        // A different format version with a valid checksum is refused too.
        let mut other = entry[..entry.len() - 4].to_vec();
        other[7] = 2;
        let crc = crc32fast::hash(&other);
        other.extend_from_slice(&crc.to_be_bytes());
        assert!(decode(Bytes::from(other)).is_none());
    }
}
