//! Which headers cross the proxy, each way: [`Forwarding`] (none and an allowlist for
//! `/image-proxy`, end-to-end headers for routes) and [`end_to_end`] (hop-by-hop filtering,
//! RFC 9110 §7.6.1).

use std::net::IpAddr;

use http::header::{
    ACCEPT_ENCODING, AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING,
    CONTENT_LANGUAGE, CONTENT_LENGTH, CONTENT_TYPE, ETAG, EXPIRES, HOST, HeaderName, IF_MATCH,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, LOCATION,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, RANGE, RETRY_AFTER, SET_COOKIE, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::header::{COOKIE, FORWARDED};
use http::{HeaderMap, HeaderValue};

use crate::freshness::RequestFacts;

/// Supabase's `apikey` request header: a credential, like `Authorization`.
pub static APIKEY: HeaderName = HeaderName::from_static("apikey");

/// Request headers that carry credentials: a request with any of them is answered from or
/// stored into the shared cache only with a response marked shareable (RFC 9111 §3.5, which
/// names `Authorization`; a cookie or an API key is the same thing).
pub static CREDENTIALS: [HeaderName; 3] =
    [AUTHORIZATION, COOKIE, HeaderName::from_static("apikey")];

/// Request headers a client could use to pose as a proxy (`X-Forwarded-*` are dropped by
/// prefix too) or to rewrite the request behind imgedge: never passed upstream from a client.
static CLIENT_FORWARDING: [HeaderName; 5] = [
    FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
];

/// The request headers a route forwards: end-to-end ones (see [`end_to_end`]), less `dropped`
/// and anything a client could use to pose as a proxy (`X-Forwarded-*`, `Forwarded`,
/// `X-Real-IP`, `X-Original-URL`, `X-Rewrite-URL`, `X-HTTP-Method-Override`); then imgedge says
/// who the client is, `X-Forwarded-For: <client>` and `Forwarded: for=<client>` (RFC 7239).
pub fn route_request_headers(
    headers: &HeaderMap,
    dropped: &[HeaderName],
    client: IpAddr,
) -> HeaderMap {
    let mut out = end_to_end(headers, dropped);
    let posing: Vec<HeaderName> = out
        .keys()
        .filter(|n| CLIENT_FORWARDING.contains(n) || n.as_str().starts_with("x-forwarded-"))
        .cloned()
        .collect();
    for name in posing {
        out.remove(&name);
    }
    let ip = client.to_string();
    let forwarded = match client {
        IpAddr::V4(_) => format!("for={ip}"),
        IpAddr::V6(_) => format!("for=\"[{ip}]\""),
    };
    out.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&ip).expect("an address is a header value"),
    );
    out.insert(
        FORWARDED,
        HeaderValue::from_str(&forwarded).expect("an address is a header value"),
    );
    out
}

/// `Surrogate-Control`: caching directives for surrogates such as this one.
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// Origin response headers passed to `/image-proxy` clients; everything else (hop-by-hop,
/// `Set-Cookie`, `Content-Disposition` (a download or a file name is not an image proxy's to
/// pass on), server internals) is dropped. `Age` is forwarded on a miss but never stored.
const IMAGE_RESPONSE_HEADERS: [HeaderName; 10] = [
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
    /// client; response headers are allowlisted (`IMAGE_RESPONSE_HEADERS`).
    Bare,
    /// A route: these request headers go upstream (end-to-end ones, already filtered), and every
    /// end-to-end response header comes back, less `Set-Cookie` when `strip_set_cookie`.
    Headers {
        headers: HeaderMap,
        strip_set_cookie: bool,
        /// Whether a response with `Set-Cookie` may be stored (`[[routes]] store_set_cookie`).
        store_set_cookie: bool,
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
                authorized: CREDENTIALS.iter().any(|h| headers.contains_key(h)),
                forwarded_client_headers: true,
            },
        }
    }

    /// Whether a response that carries `Set-Cookie` (after forwarding) may be stored.
    pub(super) fn stores_set_cookie(&self) -> bool {
        matches!(
            self,
            Forwarding::Headers {
                store_set_cookie: true,
                ..
            }
        )
    }

    /// Whether the request asks for the plain, anonymous object: no validator, range or
    /// credential goes upstream, so its response may be shared with followers, may decide
    /// hit-for-pass, and a fill of another request may answer it.
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
            .chain(&CREDENTIALS)
            .any(|h| headers.contains_key(h)),
        }
    }
}

/// The allowlisted end-to-end headers of an origin response.
pub(super) fn allowlisted(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(IMAGE_RESPONSE_HEADERS.len() + 4);
    for name in &IMAGE_RESPONSE_HEADERS {
        for value in upstream.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}
