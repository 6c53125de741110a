//! [`UpstreamBody`]: an origin's response body, read at the consumer's pace, that fails rather
//! than ends when it is incomplete.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::inflight::InflightGuard;
use super::{UploadProgress, UpstreamError, error_chain};

/// An origin's response body as a stream of chunks, exactly as they arrive (at most
/// [`READ_BUFFER_BYTES`](super::READ_BUFFER_BYTES) each; never coalesced or buffered here). It fails rather than ends when
/// the body is incomplete: a stall longer than `idle_timeout`, more than `max_object_bytes`, a
/// length other than `Content-Length`, or a connection error. Reading is driven by the consumer,
/// so a slow client slows the origin read.
pub(crate) struct UpstreamBody {
    pub(super) incoming: Incoming,
    /// Fires `total_timeout` after the request was sent: no fetch lasts longer.
    pub(super) deadline: Pin<Box<Sleep>>,
    pub(super) total_timeout: Duration,
    /// Keeps the fetch in the in-flight list until the body is dropped.
    pub(super) _inflight: InflightGuard,
    /// Fires when the origin has sent nothing for `idle_timeout` while we were waiting for it.
    pub(super) idle: Pin<Box<Sleep>>,
    pub(super) idle_timeout: Duration,
    /// Whether the last poll found the origin with nothing to give (the idle timer is running).
    pub(super) waiting: bool,
    pub(super) received_bytes: u64,
    /// `Content-Length`, or 0 for bodyless responses.
    pub(super) expected_bytes: Option<u64>,
    pub(super) max_bytes: u64,
    pub(super) done: bool,
    /// The first bytes, read ahead by [`UpstreamBody::peek`] and handed out first.
    pub(super) peeked: Option<Bytes>,
    /// The request's upload, if it had one: given up when this response is over while it is
    /// still being sent (the origin answered before reading it all; see
    /// [`UploadProgress::abandon`]).
    pub(super) upload: Option<UploadProgress>,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(upload) = &self.upload {
            upload.abandon();
        }
    }
}

impl UpstreamBody {
    /// Bytes handed out so far: received from the origin, less what [`UpstreamBody::peek`]
    /// holds to hand out again.
    pub(crate) fn received_bytes(&self) -> u64 {
        self.received_bytes - self.peeked.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// The length this body must have, when announced.
    pub(crate) fn expected_bytes(&self) -> Option<u64> {
        self.expected_bytes
    }

    /// Whether nothing more will come: finished, failed, every announced byte received and
    /// handed out (hyper stops polling a body once its `Content-Length` is written), or a
    /// bodyless response.
    pub(crate) fn is_end_stream(&self) -> bool {
        self.peeked.is_none() && self.origin_done()
    }

    /// Whether every announced byte has arrived and been handed out (always false without a
    /// `Content-Length`).
    pub(crate) fn is_complete(&self) -> bool {
        self.peeked.is_none() && self.expected_bytes == Some(self.received_bytes)
    }

    /// Whether the origin has nothing more to send.
    fn origin_done(&self) -> bool {
        self.done || self.expected_bytes == Some(self.received_bytes)
    }

    /// Reads ahead until at least `bytes` bytes have arrived or the body ended, and returns them
    /// (fewer for a shorter body); they are handed out again, first, by `poll_chunk`. For checks
    /// that must see the first bytes before any is served. At most one chunk more than `bytes`
    /// is held, and chunks are joined only while fewer than `bytes` have arrived.
    ///
    /// # Errors
    /// What reading the body fails with.
    pub(crate) async fn peek(&mut self, bytes: usize) -> Result<Bytes, UpstreamError> {
        let mut seen = self.peeked.take().unwrap_or_default();
        while seen.len() < bytes {
            match std::future::poll_fn(|cx| self.poll_origin(cx)).await {
                Some(Ok(chunk)) if seen.is_empty() => seen = chunk,
                Some(Ok(chunk)) => {
                    let mut joined = Vec::with_capacity(seen.len() + chunk.len());
                    joined.extend_from_slice(&seen);
                    joined.extend_from_slice(&chunk);
                    seen = joined.into();
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        self.peeked = (!seen.is_empty()).then(|| seen.clone());
        Ok(seen)
    }

    /// Polls the next chunk: `Some(Ok)` data, `Some(Err)` a failure (after which it is done),
    /// `None` a complete body.
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        if let Some(peeked) = self.peeked.take() {
            return Poll::Ready(Some(Ok(peeked)));
        }
        self.poll_origin(cx)
    }

    /// The next chunk from the origin.
    fn poll_origin(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            if self.origin_done() {
                self.done = true;
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.incoming).poll_frame(cx) {
                Poll::Ready(frame) => {
                    self.waiting = false;
                    frame
                }
                Poll::Pending => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        return self.fail(UpstreamError::TotalTimeout(self.total_timeout));
                    }
                    // The timer measures the origin's silence, not the client's: it starts when
                    // we begin waiting, not when the previous chunk arrived.
                    if !self.waiting {
                        self.waiting = true;
                        self.idle.as_mut().reset(Instant::now() + self.idle_timeout);
                    }
                    ready!(self.idle.as_mut().poll(cx));
                    return self.fail(UpstreamError::Stalled(self.idle_timeout));
                }
            };
            return match frame {
                // An origin that never pauses long enough to stall still meets the deadline.
                Some(Ok(_)) if Instant::now() >= self.deadline.deadline() => {
                    self.fail(UpstreamError::TotalTimeout(self.total_timeout))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => self.accept(chunk),
                    Err(_trailers) => continue,
                },
                Some(Err(e)) => match self.expected_bytes {
                    Some(expected) => self.fail(UpstreamError::LengthMismatch {
                        received_bytes: self.received_bytes,
                        expected_bytes: expected,
                    }),
                    None => self.fail(UpstreamError::Body {
                        received_bytes: self.received_bytes,
                        reason: error_chain(&e),
                    }),
                },
                None => match self.expected_bytes {
                    Some(expected) if expected != self.received_bytes => {
                        self.fail(UpstreamError::LengthMismatch {
                            received_bytes: self.received_bytes,
                            expected_bytes: expected,
                        })
                    }
                    _ => {
                        self.done = true;
                        Poll::Ready(None)
                    }
                },
            };
        }
    }

    /// Counts a chunk against the announced length or `max_object_bytes`.
    fn accept(&mut self, chunk: Bytes) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        self.received_bytes += chunk.len() as u64;
        match self.expected_bytes {
            Some(expected) if self.received_bytes > expected => {
                self.fail(UpstreamError::LengthMismatch {
                    received_bytes: self.received_bytes,
                    expected_bytes: expected,
                })
            }
            None if self.received_bytes > self.max_bytes => {
                self.fail(UpstreamError::BodyTooLarge {
                    max_bytes: self.max_bytes,
                })
            }
            _ => Poll::Ready(Some(Ok(chunk))),
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        self.done = true;
        Poll::Ready(Some(Err(e)))
    }
}
