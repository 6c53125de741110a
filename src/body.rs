//! [`ProxyBody`]: the one response body type the server sends — a whole buffer (errors, hits,
//! health) or a streaming [`TeeBody`] (misses).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::collapse::SharedReader;
use crate::tee::TeeBody;
use crate::upstream::UpstreamError;

/// A response body. An `Err` frame aborts the client connection (HTTP/1.1: the connection is
/// closed before the announced length or the last chunk; HTTP/2: the stream is reset), so a
/// failed body is never mistaken for a complete one.
pub(crate) enum ProxyBody {
    /// A body held whole; `None` once sent, or for an empty body.
    Full(Option<Bytes>),
    /// A body streaming from the origin.
    Tee(Box<TeeBody>),
    /// A reader of a shared fill (collapsed forwarding).
    Shared(Box<SharedReader>),
    /// Bytes already read off a body (to look at them), then the rest of it.
    Prefixed(Option<Bytes>, Box<ProxyBody>),
}

impl ProxyBody {
    pub(crate) fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// `first` (read off `rest` already), then `rest`.
    pub(crate) fn prefixed(first: Bytes, rest: ProxyBody) -> Self {
        ProxyBody::Prefixed((!first.is_empty()).then_some(first), Box::new(rest))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Tee(tee) => tee.poll_chunk(cx).map(|c| c.map(|r| r.map(Frame::data))),
            ProxyBody::Shared(reader) => {
                reader.poll_chunk(cx).map(|c| c.map(|r| r.map(Frame::data)))
            }
            ProxyBody::Prefixed(first, rest) => match first.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(rest.as_mut()).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Tee(tee) => tee.is_end_stream(),
            ProxyBody::Shared(reader) => reader.is_end_stream(),
            ProxyBody::Prefixed(first, rest) => first.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Tee(tee) => match tee.remaining_bytes() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
            ProxyBody::Shared(reader) => SizeHint::with_exact(reader.remaining_bytes()),
            ProxyBody::Prefixed(first, rest) => {
                let first = first.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + first);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + first);
                }
                hint
            }
        }
    }
}
