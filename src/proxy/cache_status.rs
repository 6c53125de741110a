//! [`CacheStatus`]: what the cache did with one request, as a typed value rendered in one place
//! into the `Cache-Status` field (RFC 9211) and the access line's `cache` field.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderName, HeaderValue};

/// `Cache-Status` (RFC 9211).
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// One `Cache-Status` entry for the cache named `imgedge` (RFC 9211 §2), rendered as
/// `imgedge; <hit | fwd=...>[; fwd-status=N][; stored][; collapsed][; detail=...]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStatus {
    pub kind: Kind,
    /// `fwd-status`: the status of the response to the forwarded request, when it is not the
    /// one served (a 304 answering a revalidation).
    pub fwd_status: Option<u16>,
    /// `stored`: the response is being stored.
    pub stored: bool,
    /// `collapsed`: the request waited for another one's fetch (collapsed forwarding).
    pub collapsed: bool,
    /// `detail`: imgedge's own word on it (`memory`, `disk`, `too-large`, `memory-pressure`, a
    /// reason not to store, ...).
    pub detail: Option<&'static str>,
}

/// Whether the response came from the cache or why the request went forward (RFC 9211 §2.1,
/// §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `hit`: served from the cache without going forward.
    Hit,
    Forward(Fwd),
    /// Neither: imgedge answered with an error of its own (rendered without `hit` or `fwd`).
    Refused,
}

/// The `fwd` parameter: why the request went forward (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// `uri-miss`: nothing stored for the URI.
    UriMiss,
    /// `stale`: what was stored had to be validated.
    Stale,
    /// `request`: the request asked to go forward (`no-cache`, `max-age`).
    Request,
    /// `method`: a method the cache never answers.
    Method,
}

impl CacheStatus {
    /// A fresh hit from the tier named `tier` (`memory`, `disk`).
    pub(crate) const fn hit(tier: &'static str) -> Self {
        Self::of(Kind::Hit).with_detail(tier)
    }

    /// A request imgedge answered itself, with an error, without looking it up or going
    /// forward (a refusal: a bad target, a rate limit, shedding); `code` is the error code.
    pub(crate) const fn refused(code: &'static str) -> Self {
        Self::of(Kind::Refused).with_detail(code)
    }

    /// A request that went forward for reason `fwd`.
    pub(crate) const fn forward(fwd: Fwd) -> Self {
        Self::of(Kind::Forward(fwd))
    }

    const fn of(kind: Kind) -> Self {
        CacheStatus {
            kind,
            fwd_status: None,
            stored: false,
            collapsed: false,
            detail: None,
        }
    }

    pub(crate) const fn with_detail(self, detail: &'static str) -> Self {
        CacheStatus {
            detail: Some(detail),
            ..self
        }
    }

    pub(crate) const fn with_fwd_status(self, status: u16) -> Self {
        CacheStatus {
            fwd_status: Some(status),
            ..self
        }
    }

    pub(crate) const fn stored(self) -> Self {
        CacheStatus {
            stored: true,
            ..self
        }
    }

    pub(crate) const fn collapsed(self) -> Self {
        CacheStatus {
            collapsed: true,
            ..self
        }
    }

    /// A stale response served because the request's `max-stale` accepted it.
    pub(crate) const HIT_STALE: Self = Self::of(Kind::Hit).with_detail("memory-stale");
    /// A stale response served while it is refreshed in the background (RFC 5861 §3).
    pub(crate) const HIT_STALE_WHILE_REVALIDATE: Self =
        Self::of(Kind::Hit).with_detail("stale-while-revalidate");
    /// A stale response served because the origin failed (RFC 5861 §4).
    pub(crate) const STALE_IF_ERROR: Self = Self::forward(Fwd::Stale).with_detail("stale-if-error");
    /// Stale, served because the origin could not be reached (RFC 9111 §4.2.4).
    pub(crate) const STALE_IF_UNREACHABLE: Self =
        Self::forward(Fwd::Stale).with_detail("unreachable");
    /// A stale stored response the origin confirmed with 304 (RFC 9111 §4.3).
    pub(crate) const REVALIDATED: Self = Self::forward(Fwd::Stale).with_fwd_status(304);
    /// A fresh stored response validated because the request asked (`no-cache`, `max-age`).
    pub(crate) const REVALIDATED_ON_REQUEST: Self =
        Self::forward(Fwd::Request).with_fwd_status(304);
    pub(crate) const MISS: Self = Self::forward(Fwd::UriMiss);
    pub(crate) const MISS_STORED: Self = Self::MISS.stored();
    pub(crate) const MISS_TOO_LARGE: Self = Self::MISS.with_detail("too-large");
    /// HEAD misses go forward as HEAD and are not stored.
    pub(crate) const MISS_HEAD: Self = Self::MISS.with_detail("method");
    /// Not stored because memory pressure is at bypass or above, or the fill reservation pool
    /// is exhausted.
    pub(crate) const MISS_MEMORY_PRESSURE: Self = Self::MISS.with_detail("memory-pressure");
    /// A follower of another request's fill (collapsed forwarding).
    pub(crate) const MISS_COLLAPSED: Self = Self::MISS.collapsed();
    /// A method that is never looked up (POST, PUT, DELETE, ...), forwarded on a route.
    pub(crate) const FORWARD_METHOD: Self = Self::forward(Fwd::Method);

    /// The field value as text: from `RENDERED` for the values on the hot paths (no
    /// allocation), rendered now for any other.
    pub(crate) fn text(&self) -> Cow<'static, str> {
        match RENDERED.iter().find(|(status, _)| status == self) {
            Some((_, text)) => Cow::Borrowed(text),
            None => Cow::Owned(self.to_string()),
        }
    }

    /// Records it as the current request span's `cache` field (the access line's), as a string.
    pub(crate) fn record_in_span(self) {
        tracing::Span::current().record("cache", &*self.text());
    }

    /// The field value.
    pub(crate) fn header_value(&self) -> HeaderValue {
        match self.text() {
            Cow::Borrowed(text) => HeaderValue::from_static(text),
            Cow::Owned(text) => HeaderValue::try_from(text).expect("cache status is ASCII"),
        }
    }
}

/// The values every hit and most misses send, as text written once: rendering them per response
/// (a `String` grown by `fmt`, twice) cost about 2 800 instructions per hit, 5% of a small memory
/// hit's user-space work (`loadtest/perhit.sh`). A test checks each against the rendering.
const RENDERED: [(CacheStatus, &str); 9] = [
    (CacheStatus::hit("memory"), "imgedge; hit; detail=memory"),
    (CacheStatus::hit("disk"), "imgedge; hit; detail=disk"),
    (CacheStatus::MISS_STORED, "imgedge; fwd=uri-miss; stored"),
    (
        CacheStatus::MISS_COLLAPSED,
        "imgedge; fwd=uri-miss; collapsed",
    ),
    (
        CacheStatus::MISS_TOO_LARGE,
        "imgedge; fwd=uri-miss; detail=too-large",
    ),
    (
        CacheStatus::MISS_MEMORY_PRESSURE,
        "imgedge; fwd=uri-miss; detail=memory-pressure",
    ),
    (
        CacheStatus::HIT_STALE_WHILE_REVALIDATE,
        "imgedge; hit; detail=stale-while-revalidate",
    ),
    (
        CacheStatus::REVALIDATED,
        "imgedge; fwd=stale; fwd-status=304",
    ),
    (
        CacheStatus::MISS_HEAD,
        "imgedge; fwd=uri-miss; detail=method",
    ),
];

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("imgedge")?;
        match self.kind {
            Kind::Hit => f.write_str("; hit")?,
            Kind::Refused => {}
            Kind::Forward(fwd) => f.write_str(match fwd {
                Fwd::UriMiss => "; fwd=uri-miss",
                Fwd::Stale => "; fwd=stale",
                Fwd::Request => "; fwd=request",
                Fwd::Method => "; fwd=method",
            })?,
        }
        if let Some(status) = self.fwd_status {
            write!(f, "; fwd-status={status}")?;
        }
        if self.stored {
            f.write_str("; stored")?;
        }
        if self.collapsed {
            f.write_str("; collapsed")?;
        }
        if let Some(detail) = self.detail {
            write!(f, "; detail={detail}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_value_imgedge_sends() {
        for (status, text) in [
            (CacheStatus::hit("memory"), "imgedge; hit; detail=memory"),
            (CacheStatus::hit("disk"), "imgedge; hit; detail=disk"),
            (CacheStatus::HIT_STALE, "imgedge; hit; detail=memory-stale"),
            (
                CacheStatus::HIT_STALE_WHILE_REVALIDATE,
                "imgedge; hit; detail=stale-while-revalidate",
            ),
            (
                CacheStatus::STALE_IF_ERROR,
                "imgedge; fwd=stale; detail=stale-if-error",
            ),
            (
                CacheStatus::STALE_IF_UNREACHABLE,
                "imgedge; fwd=stale; detail=unreachable",
            ),
            (
                CacheStatus::REVALIDATED,
                "imgedge; fwd=stale; fwd-status=304",
            ),
            (
                CacheStatus::REVALIDATED_ON_REQUEST,
                "imgedge; fwd=request; fwd-status=304",
            ),
            (CacheStatus::MISS_STORED, "imgedge; fwd=uri-miss; stored"),
            (
                CacheStatus::MISS_TOO_LARGE,
                "imgedge; fwd=uri-miss; detail=too-large",
            ),
            (
                CacheStatus::MISS_HEAD,
                "imgedge; fwd=uri-miss; detail=method",
            ),
            (
                CacheStatus::MISS_MEMORY_PRESSURE,
                "imgedge; fwd=uri-miss; detail=memory-pressure",
            ),
            (
                CacheStatus::MISS.with_detail("no-store"),
                "imgedge; fwd=uri-miss; detail=no-store",
            ),
            (
                CacheStatus::MISS_COLLAPSED,
                "imgedge; fwd=uri-miss; collapsed",
            ),
            (CacheStatus::FORWARD_METHOD, "imgedge; fwd=method"),
            (
                CacheStatus::refused("rate_limited"),
                "imgedge; detail=rate_limited",
            ),
        ] {
            assert_eq!(status.to_string(), text);
            assert_eq!(status.header_value(), text);
        }
    }

    #[test]
    fn the_values_written_once_are_the_rendered_ones() {
        for (status, text) in RENDERED {
            assert_eq!(status.to_string(), text);
            assert!(matches!(status.text(), Cow::Borrowed(t) if t == text));
        }
        assert!(matches!(
            CacheStatus::MISS.with_detail("no-store").text(),
            Cow::Owned(_)
        ));
    }
}
