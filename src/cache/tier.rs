//! The storage seam: [`Backend`], what a store below the memory tier implements, and [`Tier`],
//! the protections every such store runs behind, so that every store (the disk tier, the shared
//! tier) inherits them instead of repeating them:
//!
//! - **A store never fails a request.** Every call into a backend runs in a task of its own
//!   ([`Tasks`]), so a panic inside it (foyer on a full disk) becomes a logged miss and turns
//!   the tier off until restart; an error is a logged miss.
//! - **Writes are bounded and in order.** One writer task takes complete objects from a queue of
//!   [`WRITE_QUEUE`] and awaits each write before the next; a full queue drops the write (counted).
//!   Under emergency memory pressure the queue is discarded ([`Tier::drop_queued_writes`]).
//! - **Reads are bounded.** At most [`CONCURRENT_READS`] at once: each holds a whole body outside
//!   any reservation, so a flood of lower-tier hits cannot outgrow the budget between RSS samples.
//! - **What it holds is known.** [`Holdings`] records what this process wrote and has not seen go,
//!   for `/health`, `/metrics` and purge: stores (foyer) expose no count of their own. A store
//!   whose entries expire on their own (Redis) reports capacity 0 and is not tracked.
//! - **Ordinary failures are results, not panics.** A backend that wants to skip a store it
//!   cannot reach (the shared tier's circuit breaker) answers misses and declined writes (0
//!   bytes); only a panic switches a tier off.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Semaphore, mpsc, watch};

use super::{CacheKey, CachedObject};
use crate::tasks::Tasks;

/// Writes waiting for the writer task; more are dropped (and counted).
pub(crate) const WRITE_QUEUE: usize = 64;
/// Reads in flight at once. Each holds the store's read buffer and the object it decodes (up to
/// twice `max_cacheable_bytes`) outside any reservation, and two cores gain nothing from more.
pub(crate) const CONCURRENT_READS: usize = 8;

/// A boxed future that owns what it needs: backend calls run in tasks of their own.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A store below the memory tier. Its futures do their work when polled (inside the task the
/// seam spawns), not when created.
pub(crate) trait Backend: Send + Sync + 'static {
    /// The complete object stored under `key`; `Ok(None)` when there is none, or when what was
    /// there failed its integrity checks (the backend removes it).
    fn get(&self, key: &CacheKey) -> BoxFuture<Result<Option<Arc<CachedObject>>, BackendError>>;

    /// Stores a complete object under `key`, replacing any other; resolves once it is written,
    /// to the bytes the entry takes in the store, or to 0 when the backend declined to write it
    /// (too large or already expired for it, or a store it is skipping for now): not counted as
    /// a write.
    fn put(&self, key: CacheKey, object: Arc<CachedObject>)
    -> BoxFuture<Result<u64, BackendError>>;

    /// Removes `key` now, and for good: a later `get` misses, also after a restart.
    fn remove(&self, key: &CacheKey);

    /// How many bytes of entries the store holds at most; 0 when that is not the process's to
    /// know (a shared store whose entries expire on their own): then [`Holdings`] track nothing.
    fn capacity_bytes(&self) -> u64;

    /// How long a lookup may take in all, waiting for a read permit included; past it the
    /// lookup is a miss, counted as an error. `None` (the default): unbounded (the disk tier).
    fn read_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// The backend's own state for `/health` (`closed`, `open`, `half_open` for the shared
    /// tier's breaker); `None` (the default) when it has none.
    fn state(&self) -> Option<&'static str> {
        None
    }

    /// Closes the store cleanly; nothing is written after.
    fn close(&self) -> BoxFuture<()>;
}

/// A backend's failure: logged and counted, never a request's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BackendError(pub String);

/// A snapshot of one tier for `/health` and `/metrics`; all zero (the default) for a tier that
/// is not configured.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct TierUsage {
    /// The tier's name: `disk` or `shared`.
    #[serde(skip)]
    pub name: &'static str,
    /// False once a backend panicked: the tier is off until restart.
    pub enabled: bool,
    /// The backend's own state ([`Backend::state`]), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// Entries written since this process started and not known to be gone (see [`Holdings`]).
    pub entries: u64,
    /// Their size in the store, in bytes.
    pub bytes: u64,
    pub writes: u64,
    pub write_drops: u64,
    pub hits: u64,
    /// Reads that found nothing usable (absent, damaged, or skipped by the backend); failed
    /// reads are `errors` instead.
    pub misses: u64,
    /// Failed reads and writes (a damaged entry the backend removed is a miss, not an error).
    pub errors: u64,
    pub capacity_bytes: u64,
}

/// A write waiting in the queue, numbered so that [`Tier::drop_queued_writes`] can discard
/// everything queued before it.
type QueuedWrite = (u64, CacheKey, Arc<CachedObject>);

/// A backend behind the seam's protections. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Tier {
    shared: Arc<Shared>,
    /// The writer task's queue. Only `Tier`s hold it: the writer ends once the last is dropped.
    writes: mpsc::Sender<QueuedWrite>,
}

/// What the writer task and every `Tier` clone share.
struct Shared {
    name: &'static str,
    backend: Box<dyn Backend>,
    /// Numbers the queued writes.
    queued: AtomicU64,
    /// Queued writes numbered below this are discarded (emergency memory pressure).
    discard_below: AtomicU64,
    /// Writes that entered the queue.
    enqueued: AtomicU64,
    /// Writes the writer has finished with (written, failed or discarded), for [`Tier::flush`].
    completed: watch::Sender<u64>,
    /// [`CONCURRENT_READS`] permits.
    reads: Semaphore,
    holdings: Mutex<Holdings>,
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    write_drops: AtomicU64,
    errors: AtomicU64,
    /// Cleared when the backend panics: its state may be poisoned.
    enabled: AtomicBool,
    /// Where backend calls and the writer run.
    tasks: Tasks,
}

impl Tier {
    /// Puts `backend` behind the seam as the tier `name` (`disk`, `shared`), its writer and calls spawned
    /// on `tasks`.
    pub(crate) fn new(name: &'static str, backend: impl Backend, tasks: &Tasks) -> Tier {
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let shared = Arc::new(Shared {
            name,
            backend: Box::new(backend),
            queued: AtomicU64::new(0),
            discard_below: AtomicU64::new(0),
            enqueued: AtomicU64::new(0),
            completed: watch::Sender::new(0),
            reads: Semaphore::new(CONCURRENT_READS),
            holdings: Mutex::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            write_drops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
            tasks: tasks.clone(),
        });
        tasks.spawn(write_loop(shared.clone(), queue));
        Tier { shared, writes }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.shared.name
    }

    /// The object stored under `key`, if present and intact; a miss on any failure.
    pub(crate) async fn get(&self, key: &CacheKey) -> Option<Arc<CachedObject>> {
        let s = &self.shared;
        if !s.enabled() {
            return None;
        }
        let Some(limit) = s.backend.read_timeout() else {
            return self.read(key).await;
        };
        // The wait for a read permit counts too: with a stalled store, reads queued behind the
        // ones in flight must not wait for them. The backend's call goes on in its task.
        match tokio::time::timeout(limit, self.read(key)).await {
            Ok(found) => found,
            Err(_) => {
                tracing::warn!(
                    tier = s.name,
                    key = key.as_str(),
                    "tier read timed out: a miss"
                );
                s.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    async fn read(&self, key: &CacheKey) -> Option<Arc<CachedObject>> {
        let s = &self.shared;
        let Ok(_permit) = s.reads.acquire().await else {
            return None;
        };
        match s.tasks.spawn(s.backend.get(key)).await {
            Ok(Some(Ok(Some(object)))) => {
                s.hits.fetch_add(1, Ordering::Relaxed);
                Some(object)
            }
            Ok(Some(Ok(None))) => {
                s.misses.fetch_add(1, Ordering::Relaxed);
                s.holdings().remove(key);
                None
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(tier = s.name, key = key.as_str(), error = %e, "tier read failed: a miss");
                s.errors.fetch_add(1, Ordering::Relaxed);
                None
            }
            // Shutting down.
            Ok(None) => None,
            Err(e) => {
                s.fail("read", &e);
                None
            }
        }
    }

    /// Queues a complete object for writing; drops it (counted) when the queue is full.
    pub(crate) fn store(&self, key: CacheKey, object: Arc<CachedObject>) {
        let s = &self.shared;
        if !s.enabled() {
            return;
        }
        let seq = s.queued.fetch_add(1, Ordering::Relaxed);
        // Counted before it is sent, so that the writer can never finish it first.
        s.enqueued.fetch_add(1, Ordering::AcqRel);
        if self.writes.try_send((seq, key, object)).is_err() {
            s.enqueued.fetch_sub(1, Ordering::AcqRel);
            s.write_drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every write queued before the call has been written (or failed), at most
    /// until `deadline`: at shutdown, so that a restart finds what was stored.
    ///
    /// # Errors
    /// The number of those writes still waiting at the deadline.
    pub(crate) async fn flush(&self, deadline: tokio::time::Instant) -> Result<(), u64> {
        let s = &self.shared;
        let target = s.enqueued.load(Ordering::Acquire);
        let mut completed = s.completed.subscribe();
        let done = tokio::time::timeout_at(deadline, completed.wait_for(|n| *n >= target))
            .await
            .is_ok();
        if done {
            Ok(())
        } else {
            Err(target.saturating_sub(*completed.borrow()))
        }
    }

    /// Discards every write queued so far (counted as dropped), releasing the objects they hold:
    /// under emergency memory pressure the queue may be the last reference to their bodies.
    pub(crate) fn drop_queued_writes(&self) {
        let s = &self.shared;
        s.discard_below
            .store(s.queued.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Removes `key` from the store.
    pub(crate) fn remove(&self, key: &CacheKey) {
        let s = &self.shared;
        if s.enabled()
            && let Err(e) = std::panic::catch_unwind(AssertUnwindSafe(|| s.backend.remove(key)))
        {
            s.fail("remove", &panic_message(&e));
        }
        s.holdings().remove(key);
    }

    /// Whether this process wrote `key` and has not seen it go ([`Holdings`]). Reads nothing.
    pub(crate) fn holds(&self, key: &CacheKey) -> bool {
        self.shared.holdings().sizes.contains_key(key)
    }

    pub(crate) fn usage(&self) -> TierUsage {
        let s = &self.shared;
        let (entries, bytes) = {
            let h = s.holdings();
            (h.sizes.len() as u64, h.bytes)
        };
        TierUsage {
            name: s.name,
            enabled: s.enabled(),
            state: s.backend.state(),
            entries,
            bytes,
            writes: s.writes.load(Ordering::Relaxed),
            write_drops: s.write_drops.load(Ordering::Relaxed),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            capacity_bytes: s.backend.capacity_bytes(),
        }
    }

    /// Closes the backend (after the writer has stopped: see `App::shutdown`).
    pub(crate) async fn close(&self) {
        if self.shared.enabled() {
            self.shared.backend.close().await;
        }
    }
}

impl Shared {
    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn holdings(&self) -> MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A panic inside the backend leaves its state poisoned: stop using the tier, keep serving.
    fn fail(&self, what: &str, e: &dyn fmt::Display) {
        tracing::error!(tier = self.name, error = %e, "tier {what} panicked: tier off until restart");
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.enabled.store(false, Ordering::Relaxed);
    }
}

/// Writes queued objects one at a time, each awaited before the next (foyer drops writes
/// silently when bursts outrun its buffers). Ends when every `Tier` is dropped, or at shutdown.
async fn write_loop(shared: Arc<Shared>, mut queue: mpsc::Receiver<QueuedWrite>) {
    while let Some((seq, key, object)) = queue.recv().await {
        let _done = Completed(&shared);
        if !shared.enabled() {
            continue;
        }
        if seq < shared.discard_below.load(Ordering::Relaxed) {
            shared.write_drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let capacity_bytes = shared.backend.capacity_bytes();
        match shared
            .tasks
            .spawn(shared.backend.put(key.clone(), object))
            .await
        {
            // Declined by the backend: nothing written.
            Ok(Some(Ok(0))) => {}
            Ok(Some(Ok(bytes))) => {
                shared.writes.fetch_add(1, Ordering::Relaxed);
                if capacity_bytes > 0 {
                    shared.holdings().add(key, bytes, capacity_bytes);
                }
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(tier = shared.name, key = key.as_str(), error = %e, "tier write failed");
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => return,
            Err(e) => shared.fail("write", &e),
        }
    }
}

/// Counts one queued write as finished when dropped, however the writer got past it.
struct Completed<'a>(&'a Shared);

impl Drop for Completed<'_> {
    fn drop(&mut self) {
        self.0.completed.send_modify(|n| *n += 1);
    }
}

fn panic_message(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| e.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// What a tier holds, as far as this process knows: the entries it wrote, with their sizes,
/// oldest first. An entry leaves when it is removed or found missing, and the oldest ones leave
/// once the total passes the capacity (foyer reclaims its oldest blocks first). Entries
/// recovered at startup are not counted until they are read.
#[derive(Debug, Default)]
pub(crate) struct Holdings {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> CacheKey {
        CacheKey::new("test", &url::Url::parse(s).unwrap())
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

    /// A backend that panics on demand, else keeps objects in a map.
    #[derive(Default)]
    struct Flaky {
        objects: Arc<Mutex<HashMap<CacheKey, Arc<CachedObject>>>>,
        panic: Arc<AtomicBool>,
        /// How long each write takes.
        write_time: std::time::Duration,
    }

    impl Backend for Flaky {
        fn get(
            &self,
            key: &CacheKey,
        ) -> BoxFuture<Result<Option<Arc<CachedObject>>, BackendError>> {
            let (objects, panic, key) = (self.objects.clone(), self.panic.clone(), key.clone());
            Box::pin(async move {
                assert!(!panic.load(Ordering::Relaxed), "backend panicked");
                Ok(objects.lock().unwrap().get(&key).cloned())
            })
        }

        fn put(
            &self,
            key: CacheKey,
            object: Arc<CachedObject>,
        ) -> BoxFuture<Result<u64, BackendError>> {
            let (objects, write_time) = (self.objects.clone(), self.write_time);
            Box::pin(async move {
                tokio::time::sleep(write_time).await;
                let bytes = object.body.len() as u64;
                objects.lock().unwrap().insert(key, object);
                Ok(bytes)
            })
        }

        fn remove(&self, key: &CacheKey) {
            self.objects.lock().unwrap().remove(key);
        }

        fn capacity_bytes(&self) -> u64 {
            1 << 20
        }

        fn close(&self) -> BoxFuture<()> {
            Box::pin(async {})
        }
    }

    fn object() -> Arc<CachedObject> {
        Arc::new(CachedObject {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"body"),
            response_time: std::time::SystemTime::now(),
            freshness: crate::freshness::Freshness {
                lifetime: std::time::Duration::from_secs(60),
                initial_age: std::time::Duration::ZERO,
                must_revalidate: false,
                stale_while_revalidate: std::time::Duration::ZERO,
                stale_if_error: std::time::Duration::ZERO,
            },
        })
    }

    async fn written(tier: &Tier, n: u64) {
        for _ in 0..500 {
            if tier.usage().writes >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("{n} writes never happened: {:?}", tier.usage());
    }

    #[tokio::test]
    async fn a_panicking_backend_is_a_miss_and_turns_the_tier_off() {
        let tasks = Tasks::new();
        let backend = Flaky::default();
        let panic = backend.panic.clone();
        let tier = Tier::new("test", backend, &tasks);
        let k = key("http://h/a");
        tier.store(k.clone(), object());
        written(&tier, 1).await;
        assert!(tier.holds(&k));
        assert_eq!(tier.get(&k).await.unwrap().body, "body");
        panic.store(true, Ordering::Relaxed);
        assert!(tier.get(&k).await.is_none());
        let usage = tier.usage();
        assert!(!usage.enabled);
        assert_eq!((usage.hits, usage.errors), (1, 1));
        // Off: nothing more is read or queued.
        panic.store(false, Ordering::Relaxed);
        assert!(tier.get(&k).await.is_none());
        tier.store(key("http://h/b"), object());
        assert_eq!(tier.usage().write_drops, 0);
        tasks.shutdown().await;
    }

    #[tokio::test]
    async fn flush_waits_for_the_queued_writes_until_its_deadline() {
        use tokio::time::{Duration, Instant};
        let tasks = Tasks::new();
        let backend = Flaky {
            write_time: Duration::from_millis(20),
            ..Flaky::default()
        };
        let objects = backend.objects.clone();
        let tier = Tier::new("test", backend, &tasks);
        for i in 0..5 {
            tier.store(key(&format!("http://h/{i}")), object());
        }
        assert_eq!(
            tier.flush(Instant::now() + Duration::from_secs(5)).await,
            Ok(())
        );
        assert_eq!(
            objects.lock().unwrap().len(),
            5,
            "every queued write is done"
        );
        for i in 5..10 {
            tier.store(key(&format!("http://h/{i}")), object());
        }
        // 100 ms of writes, 30 ms to wait: at least three are still queued.
        let left = tier.flush(Instant::now() + Duration::from_millis(30)).await;
        assert!(matches!(left, Err(n) if (3..=5).contains(&n)), "{left:?}");
        tasks.shutdown().await;
    }

    #[tokio::test]
    async fn the_writer_ends_with_the_last_tier() {
        let tasks = Tasks::new();
        let tier = Tier::new("test", Flaky::default(), &tasks);
        assert_eq!(tasks.len(), 1, "the writer");
        drop(tier);
        for _ in 0..500 {
            if tasks.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("the writer outlived its tier");
    }
}
