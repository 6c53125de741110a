//! Responses served from the cache: a stored object as 200, 206 for a single byte range
//! (RFC 9110 §14), 416, or 304 for a matching `If-None-Match` (RFC 9110 §13.1.2), with `Age`
//! (RFC 9111 §5.1) and `Cache-Status`.

use std::time::SystemTime;

use http::header::{
    ACCEPT_RANGES, AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, ETAG, EXPIRES, LAST_MODIFIED,
};
use http::{HeaderValue, Response, StatusCode};

use super::{CACHE_STATUS, CacheStatus, ProxyRequest};
use crate::body::ProxyBody;
use crate::cache::CachedObject;

/// A response served from the tier: 304 when the client's `If-None-Match` matches the stored
/// `ETag` (RFC 9110 §13.1.2), else 200 with the stored headers and body (a `Bytes` clone, not a
/// copy). Both carry `Age` (RFC 9111 §5.1) and `Cache-Status`.
pub(super) fn hit_response(
    object: &CachedObject,
    req: &ProxyRequest,
    now: SystemTime,
    cache_status: CacheStatus,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(object.age(now).as_secs());
    let hit = cache_status.header_value();
    let not_modified = match (&req.if_none_match, object.headers.get(ETAG)) {
        (Some(inm), Some(etag)) => match (inm.to_str(), etag.to_str()) {
            (Ok(inm), Ok(etag)) => if_none_match_matches(inm, etag),
            _ => false,
        },
        _ => false,
    };
    if not_modified {
        // RFC 9110 §15.4.5: the headers a 200 would have carried that describe validation.
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        for name in [ETAG, CACHE_CONTROL, EXPIRES, LAST_MODIFIED] {
            if let Some(v) = object.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        headers.insert(AGE, age);
        headers.insert(CACHE_STATUS.clone(), hit);
        return response;
    }
    let total = object.body.len() as u64;
    let range = match (&req.range, object.status) {
        (Some(range), StatusCode::OK) if if_range_holds(req.if_range.as_ref(), object) => {
            single_byte_range(range, total)
        }
        _ => None,
    };
    let (status, body) = match range {
        Some(Ok((first, last))) => (
            StatusCode::PARTIAL_CONTENT,
            object.body.slice(first as usize..=last as usize),
        ),
        Some(Err(())) => (StatusCode::RANGE_NOT_SATISFIABLE, bytes::Bytes::new()),
        None => (object.status, object.body.clone()),
    };
    let body_len = body.len();
    let mut response = Response::new(if req.head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(body)
    });
    *response.status_mut() = status;
    let headers = response.headers_mut();
    *headers = object.headers.clone();
    let content_range = match range {
        Some(Ok((first, last))) => Some(format!("bytes {first}-{last}/{total}")),
        Some(Err(())) => Some(format!("bytes */{total}")),
        None => None,
    };
    if let Some(content_range) = content_range {
        headers.insert(
            CONTENT_RANGE,
            HeaderValue::from_str(&content_range).expect("ASCII"),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    if object.status == StatusCode::OK {
        headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    headers.insert(AGE, age);
    headers.insert(CACHE_STATUS.clone(), hit);
    response
}

/// Whether a request's `If-Range` lets its `Range` apply to `object` (RFC 9110 §13.1.5): no
/// `If-Range`, or a strong `ETag` equal to the stored one, or a date equal to its
/// `Last-Modified`. Otherwise the whole representation is sent.
fn if_range_holds(if_range: Option<&HeaderValue>, object: &CachedObject) -> bool {
    let Some(if_range) = if_range else {
        return true;
    };
    let validator =
        if if_range.as_bytes().starts_with(b"\"") || if_range.as_bytes().starts_with(b"W/") {
            object.headers.get(ETAG)
        } else {
            object.headers.get(LAST_MODIFIED)
        };
    !if_range.as_bytes().starts_with(b"W/") && validator == Some(if_range)
}

/// The one byte range a `Range: bytes=...` header asks of a representation of `total` bytes, as
/// inclusive `(first, last)` offsets (RFC 9110 §14.1.2): `Some(Err(()))` when it cannot be
/// satisfied (416), `None` when the header is not a single, well-formed byte range (then the
/// whole representation is sent, as §14.2 allows).
pub fn single_byte_range(range: &http::HeaderValue, total: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = range.to_str().ok()?.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 || total == 0 {
            return Some(Err(()));
        }
        (total.saturating_sub(suffix), total - 1)
    } else {
        let first: u64 = first.parse().ok()?;
        let last = if last.is_empty() {
            u64::MAX
        } else {
            last.parse().ok()?
        };
        if last < first {
            return None;
        }
        if first >= total {
            return Some(Err(()));
        }
        (first, last.min(total - 1))
    };
    Some(Ok(range))
}

/// Weak comparison of a request's `If-None-Match` against an entity tag (RFC 9110 §13.1.2):
/// `*` matches anything, otherwise any listed tag equal to `etag` with `W/` ignored on both.
/// The list is read as entity-tags (RFC 9110 §8.8.3), so a tag holding a comma is one tag; a
/// list is read up to where it stops being entity-tags (the request is then answered in full).
pub fn if_none_match_matches(if_none_match: &str, etag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let etag = opaque(etag);
    let mut rest = if_none_match.trim();
    if rest == "*" {
        return true;
    }
    while !rest.is_empty() {
        let tag = rest.strip_prefix("W/").unwrap_or(rest);
        let Some(after) = tag.strip_prefix('"') else {
            return false;
        };
        let Some(end) = after.find('"') else {
            return false;
        };
        if tag[..end + 2] == etag {
            return true;
        }
        rest = after[end + 1..].trim_start();
        match rest.strip_prefix(',') {
            Some(next) => rest = next.trim_start_matches([' ', '\t', ',']),
            None if rest.is_empty() => break,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_ranges_are_resolved_against_the_length() {
        let r = |s: &str| single_byte_range(&HeaderValue::from_str(s).unwrap(), 100);
        assert_eq!(r("bytes=0-9"), Some(Ok((0, 9))));
        assert_eq!(r("bytes=90-"), Some(Ok((90, 99))));
        assert_eq!(r("bytes=-10"), Some(Ok((90, 99))));
        assert_eq!(r("bytes=95-200"), Some(Ok((95, 99))));
        assert_eq!(r("bytes=100-"), Some(Err(())));
        assert_eq!(r("bytes=-0"), Some(Err(())));
        for ignored in ["bytes=0-1,5-6", "bytes=5-1", "items=0-1", "bytes=a-b"] {
            assert_eq!(r(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        assert!(if_none_match_matches("\"a\"", "\"a\""));
        assert!(if_none_match_matches("W/\"a\"", "\"a\""));
        assert!(if_none_match_matches("\"x\", \"a\"", "W/\"a\""));
        assert!(if_none_match_matches("*", "\"a\""));
        assert!(!if_none_match_matches("\"b\"", "\"a\""));
        // A comma inside a tag is part of it (etagc, RFC 9110 §8.8.3).
        assert!(if_none_match_matches("\"x\", W/\"a,b\"", "\"a,b\""));
        assert!(!if_none_match_matches("\"a,b\"", "\"a\""));
        // Nothing matches past where a list stops being entity-tags.
        for bad in ["a", "\"a", "\"b\" junk \"a\"", "W/", "\"b\", *"] {
            assert!(!if_none_match_matches(bad, "\"a\""), "{bad}");
        }
    }
}
