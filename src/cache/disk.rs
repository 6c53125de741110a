//! The disk tier's backend: complete objects in a foyer block store that survives restarts, in
//! the entry format of `entry.rs`, behind the protections of the storage seam (`tier.rs`).
//!
//! foyer checksums every entry it reads (xxHash64 over key and value) and treats a mismatch as a
//! miss and a removal, so a disk read checks its bytes once, with foyer's checksum, not ours
//! too; a value that is not an entry of our format version is the same: a miss and a removal.
//! Entries are written from the object and read into it directly through foyer's `Code` (one
//! copy out of foyer's read buffer, into a body of exactly its length).
//!
//! foyer runs its tasks on a runtime of its own (`FoyerRuntime`): its flusher tasks hold
//! handles that keep each other alive, so they never end on their own; shutting that runtime
//! down at close (or drop) is what ends them and frees their buffers. See
//! docs/foyer-disk-tier.md for the other foyer traps this design avoids.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use foyer::{
    BlockEngineConfig, Code, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, PsyncIoEngineConfig, RecoverMode, Spawner,
};

use super::tier::{Backend, BackendError, BoxFuture};
use super::{CacheKey, CachedObject, entry};

/// foyer's block: the largest entry is a block less 4 KiB, so 16 MiB fits a 5 MiB body with room.
const BLOCK_BYTES: usize = 16 * 1024 * 1024;

/// A stored object as foyer keeps it: the same `Arc` as the memory tier's until it is written.
#[derive(Debug, Clone)]
struct DiskValue(Arc<CachedObject>);

/// The value bytes are the entry's length (u64, little-endian, as foyer's own `Bytes` values
/// are framed, so entries written before this type existed still read) and the entry.
impl Code for DiskValue {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        let len = entry::encoded_len(&self.0) as u64;
        writer
            .write_all(&len.to_le_bytes())
            .and_then(|()| entry::write(&self.0, writer))
            .map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let not_ours = |e: &dyn std::fmt::Display| {
            // A parse error makes foyer drop the entry and answer a miss.
            foyer::Error::new(
                foyer::ErrorKind::Parse,
                format!("not an imgedge entry: {e}"),
            )
        };
        let mut len = [0u8; 8];
        reader.read_exact(&mut len).map_err(|e| not_ours(&e))?;
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|e| not_ours(&e))?;
        let mut entry = reader.take(len as u64);
        let object = entry::read(&mut entry, len).map_err(|e| not_ours(&e))?;
        if entry.limit() != 0 {
            return Err(not_ours(&"bytes after the entry"));
        }
        Ok(DiskValue(Arc::new(object)))
    }

    fn estimated_size(&self) -> usize {
        8 + entry::encoded_len(&self.0)
    }
}

type Store = HybridCache<String, DiskValue>;

/// Why the disk tier could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
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
    #[error("starting the disk tier's runtime: {0}")]
    Runtime(std::io::Error),
}

/// The runtime foyer's tasks run on: one worker, and blocking threads for its file I/O.
/// Shut down (its tasks dropped, not awaited) at close or when the backend is dropped.
struct FoyerRuntime(Mutex<Option<tokio::runtime::Runtime>>);

impl FoyerRuntime {
    fn start() -> std::io::Result<FoyerRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(16)
            .thread_name("imgedge-disk")
            .enable_all()
            .build()?;
        Ok(FoyerRuntime(Mutex::new(Some(runtime))))
    }

    fn spawner(&self) -> Spawner {
        let runtime = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Spawner::from(
            runtime
                .as_ref()
                .expect("spawned before shutdown")
                .handle()
                .clone(),
        )
    }

    /// Drops every task of the runtime; allowed inside async code, unlike dropping it.
    fn shutdown(&self) {
        let runtime = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
    }
}

impl Drop for FoyerRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The foyer store. Its calls are made by the seam, inside tasks of their own.
pub(crate) struct DiskBackend {
    store: Store,
    capacity_bytes: u64,
    runtime: Arc<FoyerRuntime>,
}

impl DiskBackend {
    /// Opens (and recovers) the store in `dir`, created 0700 if missing: entries may hold the
    /// bytes of private images, and foyer's padding can hold stray heap bytes.
    ///
    /// # Errors
    /// [`OpenError::Create`] when the directory cannot be created, [`OpenError::Open`] when
    /// foyer cannot open it, [`OpenError::Runtime`] when its runtime cannot start.
    pub(crate) async fn open(dir: &Path, capacity_bytes: u64) -> Result<DiskBackend, OpenError> {
        let open = |source| OpenError::Open {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Create {
            dir: dir.to_owned(),
            source,
        })?;
        restrict(dir);
        let runtime = Arc::new(FoyerRuntime::start().map_err(OpenError::Runtime)?);
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
            .with_weighter(|k: &String, v: &DiskValue| k.len() + v.0.body.len())
            // foyer's own memory part keeps nothing: the moka tier is the memory tier.
            .with_filter(|_: &String, _: &DiskValue| false)
            .storage()
            .with_spawner(runtime.spawner())
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(engine)
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(open)?;
        Ok(DiskBackend {
            store,
            capacity_bytes,
            runtime,
        })
    }
}

impl Backend for DiskBackend {
    fn get(&self, key: &CacheKey) -> BoxFuture<Result<Option<Arc<CachedObject>>, BackendError>> {
        let store = self.store.clone();
        let name = key.as_str().to_owned();
        Box::pin(async move {
            match store.get(&name).await {
                Ok(entry) => Ok(entry.map(|e| e.value().0.clone())),
                Err(e) => Err(BackendError(e.to_string())),
            }
        })
    }

    fn put(
        &self,
        key: CacheKey,
        object: Arc<CachedObject>,
    ) -> BoxFuture<Result<u64, BackendError>> {
        let store = self.store.clone();
        Box::pin(async move {
            let bytes = entry::encoded_len(&object) as u64;
            store.insert(key.as_str().to_owned(), DiskValue(object));
            // Awaited so that the seam's writer sends one write at a time: foyer drops writes
            // silently when bursts outrun its buffers.
            store.storage().wait().await;
            Ok(bytes)
        })
    }

    /// Recorded in foyer's tombstone log, so the entry stays gone after a restart.
    fn remove(&self, key: &CacheKey) {
        self.store.remove(key.as_str());
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    fn close(&self) -> BoxFuture<()> {
        let (store, runtime) = (self.store.clone(), self.runtime.clone());
        Box::pin(async move {
            if let Err(e) = store.close().await {
                tracing::warn!(error = %e, "closing the disk tier");
            }
            runtime.shutdown();
        })
    }
}

#[cfg(unix)]
fn restrict(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> CachedObject {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("image/png"),
        );
        CachedObject {
            status: http::StatusCode::OK,
            headers,
            body: bytes::Bytes::from(vec![9u8; 50_000]),
            response_time: std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_millis(1_700_000_000_123),
            freshness: crate::freshness::Freshness {
                lifetime: std::time::Duration::from_secs(60),
                initial_age: std::time::Duration::ZERO,
                must_revalidate: false,
                stale_while_revalidate: std::time::Duration::ZERO,
                stale_if_error: std::time::Duration::ZERO,
            },
        }
    }

    #[test]
    fn values_are_framed_as_foyer_frames_bytes_so_older_entries_still_read() {
        let o = object();
        let entry = entry::encode(&o);
        // What foyer wrote for a `Bytes` value: its length (usize, little-endian), then it.
        let mut framed = Vec::new();
        bytes::Bytes::from(entry.clone())
            .encode(&mut framed)
            .unwrap();
        let mut ours = Vec::new();
        DiskValue(Arc::new(o)).encode(&mut ours).unwrap();
        assert_eq!(ours, framed);
        let back = DiskValue::decode(&mut &framed[..]).unwrap();
        assert_eq!(back.0.body, object().body);
        assert_eq!(back.0.headers, object().headers);
    }

    #[test]
    fn a_value_that_is_not_an_entry_is_a_parse_error_which_foyer_treats_as_a_miss() {
        let mut framed = Vec::new();
        bytes::Bytes::from_static(b"something else entirely")
            .encode(&mut framed)
            .unwrap();
        let e = DiskValue::decode(&mut &framed[..]).unwrap_err();
        assert_eq!(e.kind(), foyer::ErrorKind::Parse);
    }
}
