//! Collapsed forwarding: concurrent misses for one cache key cause one upstream request.
//!
//! The first miss for a key becomes the *leader* and fetches; later ones are *followers* and wait
//! (at most `lock_timeout`) for the leader's response head. What happens then depends on the
//! response:
//!
//! - **Shared**: storable, with a `Content-Length` no larger than `max_cacheable_bytes`. A task
//!   of its own (not any client's) reads the body into one buffer of exactly that length; the
//!   leader and every follower read from it at their own pace, from the first byte, while it
//!   fills. A leader that disconnects does not stop it. The object is inserted into the tier
//!   before its last bytes become readable, so a client holding the whole body finds it stored.
//!   If the fill fails, every reader's response fails (the connection is aborted).
//! - **Pass**: anything else. Followers fetch on their own at once, and the leader streams as
//!   a plain miss.
//! - **Failed** before a head: followers answer the leader's error.
//!
//! Memory per shared fill is its `Content-Length` (bounded by `max_cacheable_bytes`) plus each
//! reader's chunk in flight: readers copy out of the buffer at most [`READ_CHUNK_BYTES`] at a time
//! while it fills, and slice the finished object (zero-copy) once it is complete.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::cache::CacheKey;
use crate::error::ProxyError;
use crate::tasks::Tasks;
use crate::tee::StoreTarget;
use crate::upstream::{UpstreamBody, UpstreamError};

/// Largest piece a reader copies out of a filling buffer at once, in bytes.
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What followers learn once the leader has a response head.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// Still waiting for the head.
    Waiting,
    /// Read the shared body; serve this status and these headers.
    Shared(Arc<SharedHead>),
    /// Fetch on your own.
    Pass,
    /// The fetch failed before a head; answer the same error.
    Failed(ProxyError),
}

/// The response head of a shared fill, as served to every reader (without `Cache-Status`).
pub(crate) struct SharedHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// The in-flight fills, by cache key.
pub(crate) struct Collapser {
    fills: Mutex<HashMap<CacheKey, Arc<Fill>>>,
    /// Where the fill tasks run.
    tasks: Tasks,
}

/// One in-flight fetch that followers can join.
pub(crate) struct Fill {
    key: CacheKey,
    outcome: watch::Sender<Outcome>,
    body: Mutex<SharedBuffer>,
    /// Live [`SharedReader`]s: a filling body with none is read by no client.
    readers: AtomicUsize,
    /// Stops the body's fill ([`Collapser::abort_unread`]).
    abort: Notify,
}

/// The body of a shared fill.
struct SharedBuffer {
    /// Bytes received so far while filling; capacity is exactly the announced length.
    bytes: Vec<u8>,
    /// The whole body once every byte arrived: `bytes`, frozen in place (no copy). Readers read
    /// from here from then on, still only up to `readable`.
    frozen: Option<Bytes>,
    /// How many bytes readers may see. Lags what arrived only for the last chunk, which is
    /// released once the object is stored.
    readable: usize,
    /// The announced length.
    total: usize,
    /// Why the fill failed; readers fail too.
    failed: Option<Arc<UpstreamError>>,
    /// Readers waiting for more.
    wakers: Vec<Waker>,
}

impl SharedBuffer {
    fn new() -> Self {
        SharedBuffer {
            bytes: Vec::new(),
            frozen: None,
            readable: 0,
            total: 0,
            failed: None,
            wakers: Vec::new(),
        }
    }
}

/// A request's part in a fill.
pub(crate) enum Role {
    /// Fetch, then [`Leader::share`] or [`Leader::pass`]; dropping it unpublished lets followers
    /// fetch on their own.
    Leader(Leader),
    /// Wait with [`Fill::wait_outcome`].
    Follower(Arc<Fill>),
}

impl Collapser {
    /// No fills yet; their tasks will be spawned on `tasks`.
    pub(crate) fn new(tasks: Tasks) -> Self {
        Collapser {
            fills: Mutex::default(),
            tasks,
        }
    }

    /// Joins the fill for `key`, or starts one.
    pub(crate) fn join(self: &Arc<Self>, key: &CacheKey) -> Role {
        let mut fills = self.lock();
        if let Some(fill) = fills.get(key) {
            return Role::Follower(fill.clone());
        }
        let (outcome, _) = watch::channel(Outcome::Waiting);
        let fill = Arc::new(Fill::new(key.clone(), outcome));
        fills.insert(key.clone(), fill.clone());
        Role::Leader(Leader {
            fill,
            collapser: self.clone(),
            published: false,
        })
    }

    /// Aborts every shared fill whose body no client is reading (its leader disconnected and no
    /// follower joined), freeing its buffer; nothing of it is stored. Returns how many. For
    /// emergency memory pressure: such a fill holds up to `max_cacheable_bytes` for the cache
    /// alone.
    pub(crate) fn abort_unread(&self) -> usize {
        let fills = self.lock();
        let mut aborted = 0;
        for fill in fills.values() {
            let sharing = matches!(*fill.outcome.borrow(), Outcome::Shared(_));
            if sharing && fill.readers.load(Ordering::Acquire) == 0 {
                fill.abort.notify_one();
                aborted += 1;
            }
        }
        aborted
    }

    fn remove(&self, fill: &Arc<Fill>) {
        let mut fills = self.lock();
        if fills.get(&fill.key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(&fill.key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Arc<Fill>>> {
        self.fills.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Fill {
    fn new(key: CacheKey, outcome: watch::Sender<Outcome>) -> Self {
        Fill {
            key,
            outcome,
            body: Mutex::new(SharedBuffer::new()),
            readers: AtomicUsize::new(0),
            abort: Notify::new(),
        }
    }

    /// Waits for the leader's outcome, at most `lock_timeout`; `None` on timeout.
    pub(crate) async fn wait_outcome(&self, lock_timeout: Duration) -> Option<Outcome> {
        let mut rx = self.outcome.subscribe();
        let waited = tokio::time::timeout(
            lock_timeout,
            rx.wait_for(|o| !matches!(o, Outcome::Waiting)),
        )
        .await;
        match waited {
            Ok(Ok(outcome)) => Some(outcome.clone()),
            // The leader vanished without publishing (its guard publishes Pass on drop, so
            // this is a closed channel): fetch on our own.
            Ok(Err(_)) => Some(Outcome::Pass),
            Err(_) => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SharedBuffer> {
        self.body.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The leader's handle on its fill.
pub(crate) struct Leader {
    fill: Arc<Fill>,
    collapser: Arc<Collapser>,
    published: bool,
}

impl Leader {
    /// Shares the response: spawns the task that reads `body` (whose `Content-Length` is
    /// `total_bytes`) into the shared buffer and stores it, tells followers, and returns the
    /// leader's own reader.
    pub(crate) fn share(
        mut self,
        head: SharedHead,
        body: UpstreamBody,
        total_bytes: usize,
        store: StoreTarget,
    ) -> SharedReader {
        {
            let mut buffer = self.fill.lock();
            buffer.bytes = Vec::with_capacity(total_bytes);
            buffer.total = total_bytes;
        }
        self.published = true;
        let fill = self.fill.clone();
        let collapser = self.collapser.clone();
        // The fill outlives the leader's request but logs as part of it.
        let span = tracing::Span::current();
        let tasks = collapser.tasks.clone();
        tasks.spawn(run_fill(fill.clone(), collapser, body, store).instrument(span));
        self.fill
            .outcome
            .send_replace(Outcome::Shared(Arc::new(head)));
        SharedReader::new(fill)
    }

    /// Tells followers to fetch on their own.
    pub(crate) fn pass(mut self) {
        self.publish(Outcome::Pass);
    }

    /// Tells followers the fetch failed with `error`.
    pub(crate) fn fail(mut self, error: ProxyError) {
        self.publish(Outcome::Failed(error));
    }

    fn publish(&mut self, outcome: Outcome) {
        self.published = true;
        self.collapser.remove(&self.fill);
        self.fill.outcome.send_replace(outcome);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // A leader cancelled before its head (client gone, task aborted) must not strand its
        // followers until lock_timeout.
        if !self.published {
            self.publish(Outcome::Pass);
        }
    }
}

/// Reads the origin body into the shared buffer, stores the object, and ends every reader.
async fn run_fill(
    fill: Arc<Fill>,
    collapser: Arc<Collapser>,
    mut body: UpstreamBody,
    store: StoreTarget,
) {
    let received = loop {
        let next = tokio::select! {
            next = poll_fn(|cx| body.poll_chunk(cx)) => next,
            () = fill.abort.notified() => break Err(UpstreamError::Shed),
        };
        match next {
            Some(Ok(chunk)) => {
                let mut buffer = fill.lock();
                buffer.bytes.extend_from_slice(&chunk);
                if !body.is_complete() {
                    buffer.readable = buffer.bytes.len();
                    wake_all(&mut buffer);
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    let stored = match received {
        Err(e) => {
            tracing::info!(key = fill.key.as_str(), error = %e, "not stored: upstream body failed");
            Err(e)
        }
        Ok(()) => {
            // Freeze in place: readers go on reading the same bytes, still up to `readable`.
            let object_body = {
                let mut buffer = fill.lock();
                let frozen = Bytes::from(std::mem::take(&mut buffer.bytes));
                buffer.frozen = Some(frozen.clone());
                frozen
            };
            store_object(&fill.key, object_body, body.expected_bytes(), store).await
        }
    };
    collapser.remove(&fill);
    let mut buffer = fill.lock();
    match stored {
        Ok(()) => buffer.readable = buffer.total,
        Err(e) => {
            buffer.failed = Some(Arc::new(e));
            // Free the partial body now: readers only need to learn of the failure.
            buffer.bytes = Vec::new();
        }
    }
    wake_all(&mut buffer);
}

/// Inserts a complete body into the tier, unless its length disagrees with the announced one
/// (`UpstreamBody` fails such bodies; this guards against a reader bug storing a partial one).
async fn store_object(
    key: &CacheKey,
    body: Bytes,
    expected_bytes: Option<u64>,
    store: StoreTarget,
) -> Result<(), UpstreamError> {
    if expected_bytes != Some(body.len() as u64) {
        tracing::error!(
            key = key.as_str(),
            collected_bytes = body.len(),
            ?expected_bytes,
            "not stored: length mismatch"
        );
        return Err(UpstreamError::LengthMismatch {
            received_bytes: body.len() as u64,
            expected_bytes: expected_bytes.unwrap_or(0),
        });
    }
    store.store(body).await;
    Ok(())
}

fn wake_all(buffer: &mut SharedBuffer) {
    for waker in buffer.wakers.drain(..) {
        waker.wake();
    }
}

/// One client's view of a shared fill: every byte from the first, at the client's pace.
pub(crate) struct SharedReader {
    fill: Arc<Fill>,
    offset: usize,
    total: usize,
    finished: bool,
}

impl SharedReader {
    /// A reader of `fill` from its first byte: the leader's, or a follower's.
    pub(crate) fn new(fill: Arc<Fill>) -> Self {
        let total = fill.lock().total;
        fill.readers.fetch_add(1, Ordering::AcqRel);
        SharedReader {
            fill,
            offset: 0,
            total,
            finished: false,
        }
    }

    /// The whole body, once every byte arrived and the object was stored: the fill's own
    /// buffer (no copy), however far this reader had read.
    ///
    /// # Errors
    /// The fill's failure, as a reader sees it.
    pub(crate) async fn complete(self) -> Result<Bytes, UpstreamError> {
        poll_fn(|cx| {
            let mut buffer = self.fill.lock();
            if let Some(e) = &buffer.failed {
                return Poll::Ready(Err(UpstreamError::Body {
                    received_bytes: buffer.readable as u64,
                    reason: format!("shared fill failed: {e}"),
                }));
            }
            if let Some(body) = &buffer.frozen
                && buffer.readable == buffer.total
            {
                return Poll::Ready(Ok(body.clone()));
            }
            buffer.wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Bytes still to come.
    pub(crate) fn remaining_bytes(&self) -> u64 {
        (self.total - self.offset) as u64
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.finished || self.offset == self.total
    }

    /// The next piece: copied out of the buffer while it fills, sliced (zero-copy) once every
    /// byte arrived; never past `readable`.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        if self.is_end_stream() {
            self.finished = true;
            return Poll::Ready(None);
        }
        let mut buffer = self.fill.lock();
        if let Some(e) = &buffer.failed {
            self.finished = true;
            return Poll::Ready(Some(Err(UpstreamError::Body {
                received_bytes: self.offset as u64,
                reason: format!("shared fill failed: {e}"),
            })));
        }
        if buffer.readable > self.offset {
            let piece = match &buffer.frozen {
                Some(body) => body.slice(self.offset..buffer.readable),
                None => {
                    let end = buffer.readable.min(self.offset + READ_CHUNK_BYTES);
                    Bytes::copy_from_slice(&buffer.bytes[self.offset..end])
                }
            };
            self.offset += piece.len();
            return Poll::Ready(Some(Ok(piece)));
        }
        buffer.wakers.push(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for SharedReader {
    fn drop(&mut self) {
        self.fill.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn fill_with(buffer: SharedBuffer) -> Arc<Fill> {
        let (outcome, _) = watch::channel(Outcome::Waiting);
        let fill = Fill::new(
            CacheKey::new("test", &url::Url::parse("http://h/a").unwrap()),
            outcome,
        );
        *fill.body.lock().unwrap() = buffer;
        Arc::new(fill)
    }

    fn poll(reader: &mut SharedReader) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        reader.poll_chunk(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_reader_behind_reads_while_the_complete_body_is_being_stored() {
        // Every byte arrived and the buffer is frozen, but the last chunk is held back until
        // the insert finishes: a reader behind must still get what is readable, and no more.
        let body = Bytes::from_static(b"0123456789");
        let mut buffer = SharedBuffer::new();
        buffer.frozen = Some(body.clone());
        buffer.readable = 6;
        buffer.total = 10;
        let fill = fill_with(buffer);
        let mut reader = SharedReader::new(fill.clone());
        let Poll::Ready(Some(Ok(piece))) = poll(&mut reader) else {
            panic!("no piece")
        };
        assert_eq!(&piece[..], b"012345");
        assert!(
            poll(&mut reader).is_pending(),
            "the held-back chunk must wait for the store"
        );
        fill.lock().readable = 10;
        let Poll::Ready(Some(Ok(rest))) = poll(&mut reader) else {
            panic!("no rest")
        };
        assert_eq!(&rest[..], b"6789");
        assert!(matches!(poll(&mut reader), Poll::Ready(None)));
    }

    #[test]
    fn readers_copy_at_most_read_chunk_bytes_while_filling_and_fail_with_the_fill() {
        let mut buffer = SharedBuffer::new();
        buffer.bytes = vec![7u8; 3 * READ_CHUNK_BYTES];
        buffer.readable = buffer.bytes.len();
        buffer.total = 4 * READ_CHUNK_BYTES;
        let fill = fill_with(buffer);
        let mut reader = SharedReader::new(fill.clone());
        let Poll::Ready(Some(Ok(piece))) = poll(&mut reader) else {
            panic!("no piece")
        };
        assert_eq!(piece.len(), READ_CHUNK_BYTES);
        fill.lock().failed = Some(Arc::new(UpstreamError::Stalled(Duration::from_secs(1))));
        assert!(matches!(poll(&mut reader), Poll::Ready(Some(Err(_)))));
        assert!(matches!(poll(&mut reader), Poll::Ready(None)));
    }
}
