//! The tee: the body of a miss that is not shared with followers (see `collapse.rs` for the one
//! that is), streamed from the origin to its one client chunk by chunk while (when storable) each
//! chunk is copied into one buffer that becomes a [`CachedObject`]; and [`StoreTarget`], where
//! every complete body goes to be stored.
//!
//! The client's reads drive the origin reads (nothing is read ahead), so a slow client slows
//! the fetch instead of growing memory. The object is inserted only once the last byte arrived
//! and the length matched, and *before* that last byte is handed to the client, so a client that
//! has read a whole body finds it stored. Any failure drops the buffer: a partial body is never
//! stored, and the client's response fails instead of ending.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;

use crate::cache::{CacheKey, CachedObject, PassMarker, Placement, TieredCache};
use crate::freshness::Freshness;
use crate::pressure::Reservation;
use crate::tasks::Tasks;
use crate::upstream::{UpstreamBody, UpstreamError};

/// Where a complete body goes, and what it is stored with.
pub(crate) struct StoreTarget {
    /// The response's status, stored with it.
    pub status: http::StatusCode,
    pub tier: TieredCache,
    pub key: CacheKey,
    /// Response headers served on a hit (see [`CachedObject::headers`]).
    pub headers: HeaderMap,
    pub response_time: SystemTime,
    pub freshness: Freshness,
    /// Collection stops (and the object is remembered as too large) past this many bytes.
    pub max_cacheable_bytes: u64,
    /// What is remembered when the body turns out too large.
    pub too_large: PassMarker,
    /// The in-flight bytes this fill may collect: its Content-Length, or grown as chunks come.
    pub reservation: Reservation,
    /// Where a too-large body's pass marker is recorded from.
    pub tasks: Tasks,
    /// Which tiers it goes to.
    pub placement: Placement,
}

impl StoreTarget {
    /// Stores `body` as the complete object, logging it: the one place a stored object is made.
    pub(crate) async fn store(self, body: Bytes) {
        tracing::info!(
            key = self.key.as_str(),
            size_bytes = body.len(),
            ttl_secs = self.freshness.time_to_live().as_secs(),
            "stored"
        );
        let mut headers = self.headers;
        headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        let object = CachedObject {
            status: self.status,
            headers,
            body,
            response_time: self.response_time,
            freshness: self.freshness,
        };
        self.tier.insert_at(self.key, object, self.placement).await;
    }
}

/// Collects a body while it streams.
struct Collector {
    target: StoreTarget,
    /// Sized to `Content-Length` up front when one was announced, so the stored body is one
    /// allocation of exactly its length.
    buf: Vec<u8>,
}

type PendingInsert = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The body of a miss: the origin's chunks, passed on as they arrive, teed into the memory tier
/// when a [`StoreTarget`] is given.
pub(crate) struct TeeBody {
    upstream: UpstreamBody,
    collector: Option<Collector>,
    /// An insert under way, and what to yield once it is done (`None`: the end of the body).
    inserting: Option<(PendingInsert, Option<Bytes>)>,
    finished: bool,
}

impl TeeBody {
    /// Streams `upstream` unchanged; with a `target`, collects it for the memory tier.
    pub(crate) fn new(upstream: UpstreamBody, target: Option<StoreTarget>) -> Self {
        let collector = target.map(|target| {
            let capacity = match upstream.expected_bytes() {
                Some(n) => n,
                None => target.max_cacheable_bytes.min(64 * 1024),
            };
            Collector {
                target,
                buf: Vec::with_capacity(capacity as usize),
            }
        });
        TeeBody {
            upstream,
            collector,
            inserting: None,
            finished: false,
        }
    }

    /// Bytes still to come when the length is known.
    pub(crate) fn remaining_bytes(&self) -> Option<u64> {
        self.upstream
            .expected_bytes()
            .map(|e| e.saturating_sub(self.upstream.received_bytes()))
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.finished
            || (self.inserting.is_none()
                && self.collector.is_none()
                && self.upstream.is_end_stream())
    }

    /// Polls the next chunk for the client; see the module docs for the guarantees.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            if let Some((insert, then)) = &mut self.inserting {
                ready!(insert.as_mut().poll(cx));
                let then = then.take();
                self.inserting = None;
                if then.is_none() {
                    self.finished = true;
                }
                return Poll::Ready(then.map(Ok));
            }
            if self.finished {
                return Poll::Ready(None);
            }
            match ready!(self.upstream.poll_chunk(cx)) {
                Some(Ok(chunk)) => {
                    self.collect(&chunk);
                    if self.upstream.is_complete() && self.collector.is_some() {
                        self.start_insert(Some(chunk));
                        continue;
                    }
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Some(Err(e)) => {
                    if let Some(c) = self.collector.take() {
                        tracing::info!(key = c.target.key.as_str(), error = %e, "not stored: upstream body failed");
                    }
                    self.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None if self.collector.is_some() => {
                    self.start_insert(None);
                }
                None => {
                    self.finished = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    /// Copies `chunk` into the collector, or gives up collecting once past the limit.
    fn collect(&mut self, chunk: &Bytes) {
        let Some(c) = &mut self.collector else { return };
        let size = (c.buf.len() + chunk.len()) as u64;
        let reserved = self.upstream.expected_bytes().is_some()
            || c.target.reservation.grow(chunk.len() as u64);
        if !reserved {
            tracing::info!(
                key = c.target.key.as_str(),
                size_bytes = size,
                "not stored: in-flight fill reservation exhausted"
            );
            self.collector = None;
            return;
        }
        if size <= c.target.max_cacheable_bytes {
            c.buf.extend_from_slice(chunk);
            return;
        }
        let c = self.collector.take().expect("checked above");
        let StoreTarget {
            tier,
            key,
            mut too_large,
            max_cacheable_bytes,
            tasks,
            ..
        } = c.target;
        tracing::info!(
            key = key.as_str(),
            size_bytes_at_least = size,
            max_cacheable_bytes,
            "too large to store"
        );
        too_large.length_bytes = Some(size);
        tasks.spawn(async move { tier.mark_pass(key, too_large).await });
    }

    /// Turns the collected bytes into an object and starts inserting it, unless they disagree
    /// with what the origin announced and delivered (defence in depth: `UpstreamBody` already
    /// fails such a body, but a partial body must never be stored whatever a reader gets wrong).
    fn start_insert(&mut self, then: Option<Bytes>) {
        let c = self
            .collector
            .take()
            .expect("start_insert needs a collector");
        let collected = c.buf.len() as u64;
        let received = self.upstream.received_bytes();
        let expected = self.upstream.expected_bytes();
        if collected != received || expected.is_some_and(|e| e != collected) {
            tracing::error!(
                key = c.target.key.as_str(),
                collected_bytes = collected,
                received_bytes = received,
                expected_bytes = expected,
                "not stored: collected length disagrees with the origin's"
            );
            self.inserting = Some((Box::pin(async {}), then));
            return;
        }
        // Exact allocation: a no-op when Content-Length sized the buffer, a shrink otherwise.
        let body = Bytes::from(c.buf.into_boxed_slice());
        self.inserting = Some((Box::pin(c.target.store(body)), then));
    }
}
