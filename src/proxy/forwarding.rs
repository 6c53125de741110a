//! Which headers cross the proxy, each way: [`Forwarding`] (none and an allowlist for
//! `/image-proxy`; for routes, an allowlist of request headers ([`route_request_headers`]) and
//! every end-to-end response header) and [`end_to_end`] (hop-by-hop filtering, RFC 9110
//! §7.6.1).

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

use crate::config::HeaderPattern;
use crate::freshness::RequestFacts;

/// Request headers that carry credentials: a request with any of them is answered from or
/// stored into the shared cache only with a response marked shareable (RFC 9111 §3.5, which
/// names `Authorization`; a cookie or an API key is the same thing).
pub(crate) static CREDENTIALS: [HeaderName; 3] =
    [AUTHORIZATION, COOKIE, HeaderName::from_static("apikey")];

/// Request headers every route forwards (lower case; a trailing `-` is a prefix): content
/// negotiation (`accept*`), conditionals (`if-*`) and ranges, caching directives, the body's own
/// `content-*` headers (uploads; `Content-Length` is framing, set by the sender), credentials
/// (under the credentials rule), the user agent and referrer, CORS (`origin`, preflights), and
/// trace context (W3C, B3, request ids). Everything else a client sends is dropped unless the
/// route lists it in `forward_request_headers`: an origin that honours what imgedge does not
/// understand (`X-HTTP-Method-Override`, `X-Host`, `X-Original-URL`, ...) could be made to run
/// another method or serve another host, and the answer would be cached for everyone.
const STANDARD_REQUEST_HEADERS: [&str; 18] = [
    "accept",
    "accept-",
    "if-",
    "range",
    "cache-control",
    "pragma",
    "content-",
    "authorization",
    "cookie",
    "apikey",
    "user-agent",
    "referer",
    "origin",
    "access-control-request-",
    "traceparent",
    "tracestate",
    "baggage",
    "x-request-id",
];

/// Trace headers of Zipkin's B3 propagation (`b3`, `x-b3-*`).
const B3: [&str; 2] = ["b3", "x-b3-"];

/// Whether a route forwards request header `name`: a standard one, or one the route lists;
/// never `Content-Length` (framing is the sender's).
fn forwarded_header(name: &HeaderName, extra: &[HeaderPattern]) -> bool {
    let n = name.as_str();
    let listed = |p: &&str| {
        if p.ends_with('-') {
            n.starts_with(*p)
        } else {
            n == *p
        }
    };
    let allowed = STANDARD_REQUEST_HEADERS.iter().chain(&B3).any(listed)
        || extra.iter().any(|p| p.matches(name));
    allowed && name != CONTENT_LENGTH
}

/// What imgedge tells an origin about the request it received (RFC 7239 `Forwarded`, and the
/// `X-Forwarded-For/Host/Proto/Port` fields): who asked, and which host, scheme and port they
/// asked. Built from the request itself, or from what a trusted proxy in front says
/// (`[server] trusted_proxies`); never from what an untrusted client says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ForwardedFor {
    /// The client's address.
    pub client: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the client asked for, as in `Host` (`img.example`, `img.example:8080`,
    /// `[2001:db8::1]:8080`), and the port it connected to; `None` when it cannot be trusted
    /// (see `http::client::forwarded`).
    pub host: Option<(String, u16)>,
}

/// The request headers a route forwards: the standard ones (`STANDARD_REQUEST_HEADERS`) and
/// the route's `extra` patterns, end-to-end only (nothing `Connection` names, no hop-by-hop
/// field), less the credentials when `drop_credentials`; then what imgedge says itself:
/// `X-Forwarded-For`, `-Host`, `-Proto`, `-Port` and `Forwarded: for=...;host=...;proto=...`
/// (RFC 7239) from `forwarded`, and with `preserve_host` the client's `Host`.
pub(crate) fn route_request_headers(
    headers: &HeaderMap,
    extra: &[HeaderPattern],
    drop_credentials: bool,
    forwarded: &ForwardedFor,
    preserve_host: bool,
) -> HeaderMap {
    let named_by_connection = connection_names(headers);
    let mut out = HeaderMap::with_capacity(headers.len() + 6);
    for (name, value) in headers {
        let keep = forwarded_header(name, extra)
            && !HOP_BY_HOP.contains(name)
            && name != HOST
            && !(drop_credentials && CREDENTIALS.contains(name))
            && !named_by_connection.iter().any(|n| n == name.as_str());
        if keep {
            out.append(name.clone(), value.clone());
        }
    }
    let ip = forwarded.client.to_string();
    let mut element = match forwarded.client {
        IpAddr::V4(_) => format!("for={ip}"),
        IpAddr::V6(_) => format!("for=\"[{ip}]\""),
    };
    let value = |s: &str| HeaderValue::from_str(s).expect("checked host, address or number");
    // a forwarding header of the client's own (a route may list x-forwarded-*) never survives
    for name in [
        &X_FORWARDED_FOR,
        &X_FORWARDED_HOST,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_PORT,
        &FORWARDED,
    ] {
        out.remove(name);
    }
    out.insert(X_FORWARDED_FOR.clone(), value(&ip));
    out.insert(X_FORWARDED_PROTO.clone(), value(forwarded.proto));
    if let Some((host, port)) = &forwarded.host {
        out.insert(X_FORWARDED_HOST.clone(), value(host));
        out.insert(X_FORWARDED_PORT.clone(), HeaderValue::from(*port));
        element.push_str(&format!(";host=\"{host}\""));
        if preserve_host {
            out.insert(HOST, value(host));
        }
    }
    element.push_str(&format!(";proto={}", forwarded.proto));
    out.insert(FORWARDED, value(&element));
    out
}

pub(super) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// `Surrogate-Control`: caching directives for surrogates such as this one.
pub(crate) static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// Origin response headers passed to `/image-proxy` clients; everything else (hop-by-hop,
/// `Set-Cookie`, `Content-Disposition` (a download or a file name is not an image proxy's to
/// pass on), server internals) is dropped. `Age` is forwarded on a miss but never stored.
const IMAGE_RESPONSE_HEADERS: [HeaderName; 11] = [
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
    // kept with the object for revalidation; passed to clients only with
    // [cache] forward_cdn_cache_control (http.rs)
    HeaderName::from_static("cdn-cache-control"),
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
pub(crate) fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named_by_connection = connection_names(headers);
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

/// The field names `Connection` lists (lower case): hop-by-hop for this message.
fn connection_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect()
}

/// Which headers cross the proxy, each way.
#[derive(Debug, Clone)]
pub(crate) enum Forwarding {
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
