//! The shared tier's backend: complete objects in Redis (or Valkey), in the entry format of
//! `entry.rs` with its CRC32, so that several imgedge instances serve each other's fills. It
//! sits behind the storage seam (`tier.rs`) after the disk tier, and is optional
//! (`[cache.shared] url`).
//!
//! It never fails or slows a request beyond `[cache.shared] timeout`: every Redis call runs
//! under that timeout, and a timeout or an error is a miss. A [`Breaker`] (`breaker.rs`) skips the tier
//! after consecutive failures, for a back-off, then lets one call through as a probe; its
//! success closes the breaker. These ordinary failures are results of the backend's futures, never panics, so they
//! never take the seam's path that turns a tier off until restart.
//!
//! What it holds is Redis's: entries expire on their own (every write sets `PX`: the object's
//! remaining freshness plus `[cache] stale_retention`) and Redis evicts under its `maxmemory`, so
//! the seam's [`Holdings`](super::tier::Holdings) track nothing for it (`capacity_bytes` is 0).
//!
//! Not here: routing objects to owners (the balancer's, see ARCHITECTURE.md), and any Redis
//! server management.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::breaker::{Admitted, Breaker, BreakerState};
use super::tier::{Backend, BackendError, BoxFuture};
use super::{CacheKey, CachedObject, entry};
use crate::config::SharedConfig;
use crate::pressure::ReservationPool;
use crate::tasks::Tasks;

/// How long the first connection (at startup, in the background) may take: longer than a
/// request's `timeout`, since no request waits for it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Cache keys longer than this are stored under their SHA-256 instead (with their namespace).
const MAX_KEY_BYTES: usize = 1024;

/// The prefix of every key: `imgedge:v{entry format version}:`. A new entry format writes under
/// new keys, so instances of two versions never read each other's values.
pub(crate) fn key_prefix() -> String {
    format!("imgedge:v{}:", entry::MAGIC[7])
}

/// The Redis key of `key`: [`key_prefix`] and the cache key, which starts with the route's
/// namespace; a cache key longer than 1 KiB is replaced by `{namespace} #sha256:{hex}`.
pub(crate) fn redis_key(key: &CacheKey) -> String {
    let k = key.as_str();
    let mut out = key_prefix();
    if k.len() <= MAX_KEY_BYTES {
        out.push_str(k);
    } else {
        let namespace = k.split(' ').next().unwrap_or_default();
        out.push_str(namespace);
        out.push_str(" #sha256:");
        for b in Sha256::digest(k.as_bytes()) {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The connection: one server (a connection manager, which reconnects by itself), or a Redis
/// Cluster (connected on first use, by the probe; it follows slot moves by itself).
enum Connection {
    Single(ConnectionManager),
    Cluster {
        client: Box<ClusterClient>,
        /// `None` until the first successful connection.
        connection: Mutex<Option<ClusterConnection>>,
    },
}

/// A connection handle for one call.
#[derive(Clone)]
enum Handle {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

/// Why the shared tier could not be set up (a URL `[cache.shared] url` checks at startup, so
/// this is rare).
#[derive(Debug, thiserror::Error)]
#[error("[cache.shared] url: {0}")]
pub(crate) struct OpenError(String);

/// The Redis store. Its calls are made by the seam, inside tasks of their own. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SharedBackend {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    breaker: Mutex<Breaker>,
    /// The breaker's state, readable without the lock (for `/health`).
    state: AtomicU8,
    /// Reads reserve their buffers here: the fill reservation pool.
    fills: Arc<ReservationPool>,
    /// The largest entry written or read, in bytes (entry format: body, headers and framing).
    max_object_bytes: u64,
    /// Every Redis call's limit.
    timeout: Duration,
    /// `[cache] stale_retention`: how long past its freshness an entry is kept.
    stale_retention: Duration,
    /// Where removals (`DEL`) and the first connection run.
    tasks: Tasks,
}

impl SharedBackend {
    /// The backend for `config` (whose `urls` are not empty): no connection is made here. The
    /// first one is made in the background, as the breaker's probe (state `half_open` until it
    /// answers, `open` when it fails), so that an absent Redis never holds up startup.
    ///
    /// # Errors
    /// [`OpenError`] when a URL is not a Redis URL.
    pub(crate) fn open(
        config: &SharedConfig,
        stale_retention: Duration,
        fills: Arc<ReservationPool>,
        tasks: &Tasks,
    ) -> Result<SharedBackend, OpenError> {
        let bad = |e: redis::RedisError| OpenError(e.to_string());
        let urls: Vec<&str> = config.urls.iter().map(|u| u.as_str()).collect();
        if urls.iter().any(|u| u.starts_with("rediss://")) {
            // redis's rustls client config uses the process-wide provider; ring is the one
            // this build carries (as the upstream client's). Already installed is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let connection = if let [url] = urls[..] {
            let client = redis::Client::open(url).map_err(bad)?;
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(config.timeout))
                // Our breaker decides when to try again; the manager reconnects on next use.
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(100));
            Connection::Single(
                ConnectionManager::new_lazy_with_config(client, manager).map_err(bad)?,
            )
        } else {
            let client = ClusterClient::builder(urls)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(config.timeout)
                .build()
                .map_err(bad)?;
            Connection::Cluster {
                client: Box::new(client),
                connection: Mutex::new(None),
            }
        };
        let now = Instant::now();
        let inner = Arc::new(Inner {
            connection,
            breaker: Mutex::new(Breaker::new(BreakerState::HalfOpen, now)),
            state: AtomicU8::new(0),
            fills,
            max_object_bytes: config.max_object_bytes,
            timeout: config.timeout,
            stale_retention,
            tasks: tasks.clone(),
        });
        inner.publish(BreakerState::HalfOpen);
        let probe = inner.clone();
        tasks.spawn(async move {
            let ping = async {
                let mut handle = probe.handle().await?;
                redis::cmd("PING").query_async::<()>(&mut handle).await
            };
            let outcome = match tokio::time::timeout(CONNECT_TIMEOUT, ping).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            };
            let mut breaker = probe.breaker();
            match outcome {
                Ok(()) => {
                    breaker.success();
                    tracing::info!("shared tier connected");
                }
                Err(e) => {
                    breaker.failure(Instant::now(), Admitted::Probe);
                    tracing::warn!(error = %e, "shared tier unreachable: skipped, retried later");
                }
            }
            probe.publish(breaker.state());
        });
        Ok(SharedBackend { inner })
    }

    /// The breaker's state now.
    pub(crate) fn state(&self) -> BreakerState {
        self.inner.current_state()
    }
}

/// An admitted call: reports its outcome to the breaker once; dropped without one (cancelled),
/// it counts as a failure, so that a probe never leaves the breaker half-open for good.
struct Call<'a> {
    inner: &'a Inner,
    admitted: Admitted,
    done: bool,
}

impl Call<'_> {
    fn finish(mut self, ok: bool) {
        self.done = true;
        self.inner.report(ok, self.admitted);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.inner.report(false, self.admitted);
        }
    }
}

impl Inner {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, state: BreakerState) {
        self.state.store(state.as_number() as u8, Ordering::Relaxed);
    }

    fn current_state(&self) -> BreakerState {
        match self.state.load(Ordering::Relaxed) {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }

    /// A call, if the breaker admits one now.
    fn admit(&self) -> Option<Call<'_>> {
        let mut breaker = self.breaker();
        let admitted = breaker.admit(Instant::now());
        self.publish(breaker.state());
        admitted.map(|admitted| Call {
            inner: self,
            admitted,
            done: false,
        })
    }

    fn report(&self, ok: bool, admitted: Admitted) {
        let mut breaker = self.breaker();
        let before = breaker.state();
        if ok {
            breaker.success();
        } else {
            breaker.failure(Instant::now(), admitted);
        }
        let after = breaker.state();
        self.publish(after);
        if before != after {
            tracing::warn!(
                from = before.as_str(),
                to = after.as_str(),
                "shared tier breaker"
            );
        }
    }

    /// A handle to the connection; a cluster's is made on first use.
    async fn handle(&self) -> RedisResult<Handle> {
        match &self.connection {
            Connection::Single(manager) => Ok(Handle::Single(manager.clone())),
            Connection::Cluster { client, connection } => {
                let existing = connection.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(c) = existing {
                    return Ok(Handle::Cluster(c));
                }
                let c = client.get_async_connection().await?;
                *connection.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                Ok(Handle::Cluster(c))
            }
        }
    }

    /// Runs `query` on the connection under the timeout, through the breaker: `Ok(None)` when
    /// the breaker skips it.
    async fn call<T, F>(&self, query: impl FnOnce(Handle) -> F) -> Result<Option<T>, BackendError>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let Some(call) = self.admit() else {
            return Ok(None);
        };
        let run = async {
            let handle = self.handle().await?;
            query(handle).await
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(value)) => {
                call.finish(true);
                Ok(Some(value))
            }
            Ok(Err(e)) => {
                call.finish(false);
                Err(BackendError(format!("redis: {e}")))
            }
            Err(_) => {
                call.finish(false);
                Err(BackendError(format!(
                    "redis: no answer within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// The object under `rkey`. The read first reserves `max_object_bytes` (the most Redis is
    /// asked to send) in the fill reservation pool; without room it is a miss. The value is
    /// decoded in its own buffer (the body stays where Redis's bytes landed), so the read holds
    /// one buffer of the object's size. The reservation is released once the object is
    /// decoded: from then on it is the memory tier's to count.
    async fn get(self: Arc<Self>, rkey: String) -> Result<Option<Arc<CachedObject>>, BackendError> {
        let Some(_reservation) = self.fills.try_reserve(self.max_object_bytes) else {
            tracing::debug!(
                key = rkey,
                "shared tier read skipped: no room in the fill pool"
            );
            return Ok(None);
        };
        let last = self.max_object_bytes.saturating_sub(1);
        let got = self
            .call(|mut handle| {
                let rkey = rkey.clone();
                async move {
                    // The length and at most `max_object_bytes` of the value, in one round trip:
                    // a larger value (written by another configuration) is never read whole.
                    redis::pipe()
                        .cmd("STRLEN")
                        .arg(&rkey)
                        .cmd("GETRANGE")
                        .arg(&rkey)
                        .arg(0)
                        .arg(last)
                        .query_async::<(u64, Vec<u8>)>(&mut handle)
                        .await
                }
            })
            .await?;
        let Some((len, value)) = got else {
            return Ok(None);
        };
        if len == 0 {
            return Ok(None);
        }
        if len > self.max_object_bytes {
            tracing::debug!(
                key = rkey,
                len,
                "shared tier value too large: a miss, removed"
            );
            self.delete(rkey);
            return Ok(None);
        }
        if value.len() as u64 != len {
            // Rewritten between the two commands: a miss, and the new value stays.
            return Ok(None);
        }
        // Decoded in place: the object's body is the value's buffer, which the reservation
        // already covers.
        match entry::decode(value) {
            Ok(object) => Ok(Some(Arc::new(object))),
            Err(e) => {
                tracing::warn!(key = rkey, error = %e, "shared tier value is not an entry: a miss, removed");
                self.delete(rkey);
                Ok(None)
            }
        }
    }

    /// Writes `object` under `rkey` with its expiry; declines (0) what is too large, already
    /// expired, or skipped by the breaker.
    async fn put(&self, rkey: String, object: Arc<CachedObject>) -> Result<u64, BackendError> {
        let len = entry::encoded_len(&object) as u64;
        if len > self.max_object_bytes {
            return Ok(0);
        }
        let ttl = object.kept_for(self.stale_retention, SystemTime::now());
        let ttl_ms = ttl.as_millis().min(u128::from(u64::MAX)) as u64;
        if ttl_ms == 0 {
            return Ok(0);
        }
        let value = entry::encode(&object);
        let written = self
            .call(|mut handle| async move {
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut handle)
                    .await
            })
            .await?;
        Ok(written.map_or(0, |()| len))
    }

    /// Deletes `rkey` in the background, whatever the breaker's state (a purge must reach
    /// Redis if it can), under the timeout; a failure is logged.
    fn delete(self: &Arc<Self>, rkey: String) {
        let inner = self.clone();
        self.tasks.spawn(async move {
            let del = async {
                let mut handle = inner.handle().await?;
                redis::cmd("DEL")
                    .arg(&rkey)
                    .query_async::<()>(&mut handle)
                    .await
            };
            match tokio::time::timeout(inner.timeout, del).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(key = rkey, error = %e, "shared tier DEL failed"),
                Err(_) => tracing::warn!(key = rkey, "shared tier DEL timed out"),
            }
        });
    }
}

impl Backend for SharedBackend {
    fn get(&self, key: &CacheKey) -> BoxFuture<Result<Option<Arc<CachedObject>>, BackendError>> {
        Box::pin(self.inner.clone().get(redis_key(key)))
    }

    fn put(
        &self,
        key: CacheKey,
        object: Arc<CachedObject>,
    ) -> BoxFuture<Result<u64, BackendError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.put(redis_key(&key), object).await })
    }

    /// A `DEL` sent in the background; a Redis that cannot be reached keeps the entry until it
    /// expires.
    fn remove(&self, key: &CacheKey) {
        self.inner.delete(redis_key(key));
    }

    /// 0: Redis's `maxmemory` bounds it, not imgedge; the seam tracks no holdings for it.
    fn capacity_bytes(&self) -> u64 {
        0
    }

    fn state(&self) -> Option<&'static str> {
        Some(self.state().as_str())
    }

    /// `[cache.shared] timeout`: a lookup queued behind stalled reads is a miss too.
    fn read_timeout(&self) -> Option<Duration> {
        Some(self.inner.timeout)
    }

    fn close(&self) -> BoxFuture<()> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_format_version_and_namespace_and_long_ones_are_hashed() {
        let short = CacheKey::new("image-proxy", &url::Url::parse("http://h/a.jpg").unwrap());
        assert_eq!(redis_key(&short), "imgedge:v1:image-proxy http://h/a.jpg");
        let long = format!("http://h/{}", "x".repeat(2000));
        let long = CacheKey::new("/storage", &url::Url::parse(&long).unwrap());
        let k = redis_key(&long);
        assert!(k.starts_with("imgedge:v1:/storage #sha256:"), "{k}");
        assert_eq!(k.len(), "imgedge:v1:/storage #sha256:".len() + 64);
    }
}
