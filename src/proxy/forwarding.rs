//! Which headers cross the proxy, each way: [`Forwarding`] (none and an allowlist for
//! `/image-proxy`, end-to-end headers for routes) and [`end_to_end`] (hop-by-hop filtering,
//! RFC 9110 §7.6.1).

use http::HeaderMap;
use http::header::{
    ACCEPT_ENCODING, AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING,
    CONTENT_LANGUAGE, CONTENT_LENGTH, CONTENT_TYPE, ETAG, EXPIRES, HOST, HeaderName, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, LOCATION,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, RANGE, RETRY_AFTER, SET_COOKIE, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};

use crate::freshness::RequestFacts;

/// `Surrogate-Control`: caching directives for surrogates such as this one.
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// Origin response headers passed to `/image-proxy` clients; everything else (hop-by-hop,
/// `Set-Cookie`, `Content-Disposition` (a download or a file name is not an image proxy's to
/// pass on), server internals) is dropped. `Age` is forwarded on a miss but never stored.
const FORWARDED: [HeaderName; 10] = [
    CONTENT_TYPE,
    ETAG,
    LAST_MODIFIED,
    CACHE_CONTROL,
    EXPIRES,
    CONTENT_ENCODING,
    CONTENT_LANGUAGE,
    LOCATION,
    RETRY_AFTER,
    AGE,
];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others a proxy must not pass on as they are.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// `headers` without hop-by-hop fields, those the `Connection` header names, `Host`,
/// `Content-Length` (framing is the sender's business) and any of `also`.
pub fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named_by_connection: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let drop = HOP_BY_HOP.contains(name)
            || name == HOST
            || name == CONTENT_LENGTH
            || also.contains(name)
            || named_by_connection.iter().any(|n| n == name.as_str());
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Which headers cross the proxy, each way.
#[derive(Debug, Clone)]
pub enum Forwarding {
    /// `/image-proxy`: no client header goes upstream, so a stored response is valid for every
    /// client; response headers are allowlisted (`FORWARDED`).
    Bare,
    /// A route: these request headers go upstream (end-to-end ones, already filtered), and every
    /// end-to-end response header comes back, less `Set-Cookie` when `strip_set_cookie`.
    Headers {
        headers: HeaderMap,
        strip_set_cookie: bool,
    },
}

impl Forwarding {
    pub(super) fn upstream_headers(&self) -> HeaderMap {
        match self {
            // Asks for the plain bytes: a content-coded body would be refused (content.rs).
            Forwarding::Bare => HeaderMap::from_iter([(
                ACCEPT_ENCODING,
                http::HeaderValue::from_static("identity"),
            )]),
            Forwarding::Headers { headers, .. } => headers.clone(),
        }
    }

    pub(super) fn response_headers(&self, upstream: &HeaderMap) -> HeaderMap {
        match self {
            Forwarding::Bare => allowlisted(upstream),
            // Surrogate-Control is addressed to this cache, not passed on (Edge Architecture 1.0).
            Forwarding::Headers {
                strip_set_cookie: true,
                ..
            } => end_to_end(upstream, &[SET_COOKIE, SURROGATE_CONTROL.clone()]),
            Forwarding::Headers { .. } => {
                end_to_end(upstream, std::slice::from_ref(&SURROGATE_CONTROL))
            }
        }
    }

    pub(super) fn facts(&self) -> RequestFacts {
        match self {
            Forwarding::Bare => RequestFacts::default(),
            Forwarding::Headers { headers, .. } => RequestFacts {
                authorized: headers.contains_key(AUTHORIZATION),
                forwarded_client_headers: true,
            },
        }
    }

    /// Whether the request asks for the plain object: no validator or range goes upstream, so
    /// its response may be shared with followers and may decide hit-for-pass.
    pub(super) fn is_plain(&self) -> bool {
        match self {
            Forwarding::Bare => true,
            Forwarding::Headers { headers, .. } => ![
                IF_NONE_MATCH,
                IF_MODIFIED_SINCE,
                IF_MATCH,
                IF_UNMODIFIED_SINCE,
                IF_RANGE,
                RANGE,
            ]
            .iter()
            .any(|h| headers.contains_key(h)),
        }
    }
}

/// The allowlisted end-to-end headers of an origin response.
pub(super) fn allowlisted(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(FORWARDED.len() + 4);
    for name in &FORWARDED {
        for value in upstream.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}
