//! The access log: [`LoggedBody`], which writes a request's access line once its body has
//! finished, failed or been dropped, and [`RequestIds`], the `X-Request-Id` every line and
//! response carries.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tracing::Span;

use crate::body::ProxyBody;
use crate::metrics::{Metrics, RouteLabels, SourceLabels};
use crate::upstream::UpstreamError;

/// `X-Request-Id`: echoed when the client sent a sane one, generated otherwise.
pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request ids for this process.
pub(crate) struct RequestIds {
    /// Distinguishes this process's generated ids from another's.
    instance: u32,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        let instance = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or_default();
        RequestIds {
            instance,
            next: AtomicU64::new(0),
        }
    }

    /// The client's `X-Request-Id` when it is 1–64 characters of `[A-Za-z0-9._-]`, else a new
    /// one: 16 hex digits.
    pub(crate) fn of(&self, headers: &HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&REQUEST_ID) {
            let b = v.as_bytes();
            if (1..=64).contains(&b.len())
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
            {
                return v.clone();
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}{n:08x}", self.instance)).expect("hex is ASCII")
    }
}

/// Where a response's body comes from, read off its `Cache-Status` (the one record of what the
/// cache did): a tier for hits and for stored copies the origin confirmed or stood in for,
/// `transform` for renditions made for the request, `origin` for other misses, `local` for what
/// imgedge answers itself (errors, `/health`, `/metrics`).
pub(super) fn source_of(headers: &HeaderMap) -> &'static str {
    let Some(status) = headers
        .get(&crate::proxy::CACHE_STATUS)
        .and_then(|v| v.to_str().ok())
    else {
        return "local";
    };
    let tier = || {
        if status.contains("detail=disk") {
            "disk"
        } else if status.contains("detail=shared") {
            "shared"
        } else {
            "memory"
        }
    };
    if status.starts_with("imgedge; hit") {
        tier()
    } else if status.contains("detail=transform") {
        "transform"
    } else if status.contains("fwd-status=304")
        || status.contains("detail=stale-if-error")
        || status.contains("detail=unreachable")
    {
        "memory"
    } else if status.contains("fwd=") {
        "origin"
    } else {
        "local"
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// What the access line reports once a response body is done.
pub(super) struct AccessLog {
    pub(super) start: Instant,
    /// The route's name and where the body comes from, for the metrics.
    pub(super) route: &'static str,
    pub(super) source: &'static str,
    pub(super) status: u16,
    pub(super) bytes: u64,
    /// The error message of an error response.
    pub(super) error: Option<String>,
    pub(super) enabled: bool,
    pub(super) metrics: Arc<Metrics>,
}

impl AccessLog {
    /// `outcome`: `complete`, `aborted` (the body failed) or `client-gone` (dropped unfinished).
    fn finish(self, span: &Span, outcome: &'static str) {
        let elapsed = self.start.elapsed();
        self.metrics
            .response_bytes
            .get_or_create(&SourceLabels {
                source: self.source,
            })
            .inc_by(self.bytes);
        self.metrics
            .request_duration
            .get_or_create(&RouteLabels { route: self.route })
            .observe(elapsed.as_secs_f64());
        if self.enabled {
            let duration_ms = elapsed.as_secs_f64() * 1000.0;
            span.in_scope(|| {
                tracing::info!(
                    status = self.status,
                    bytes = self.bytes,
                    duration_ms = format_args!("{duration_ms:.2}"),
                    outcome,
                    error = self.error,
                    "done"
                )
            });
        }
    }
}

/// A response body that counts what it sends and writes the access line when it ends, fails or
/// is dropped. Polled inside the request's span, so lines logged while streaming (stored, too
/// large) carry the request id.
pub(crate) struct LoggedBody {
    pub(super) inner: ProxyBody,
    /// The request's span, entered while the body is polled.
    pub(super) span: Span,
    /// Taken when the access line is written, so it is written once.
    pub(super) log: Option<AccessLog>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(log), Some(data)) = (&mut this.log, frame.data_ref()) {
                    log.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "response aborted after its head was sent");
                if let Some(log) = this.log.take() {
                    log.finish(&this.span, "aborted");
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.take() {
                    log.finish(&this.span, "complete");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            // Bodies hyper never polls (HEAD, 304, empty) end here complete.
            let outcome = if self.inner.is_end_stream() || log.status == 304 {
                "complete"
            } else {
                "client-gone"
            };
            log.finish(&self.span, outcome);
        }
    }
}
