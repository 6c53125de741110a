//! One proxied request: cache key → memory tier → upstream fetch → streamed response, teeing a
//! storable body into the tier. Shared by every proxy route; the routes only differ in how they
//! build a [`ProxyRequest`] (target URL, guard).
//!
//! Decides the `Cache-Status` (RFC 9211) and which headers pass. Does not parse client requests
//! or render errors (`http.rs`), nor judge freshness (`freshness.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{
    ACCEPT_RANGES, AGE, AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_DISPOSITION,
    CONTENT_ENCODING, CONTENT_LANGUAGE, CONTENT_LENGTH, CONTENT_LOCATION, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, EXPIRES, HOST, HeaderName, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, LOCATION, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, RANGE, RETRY_AFTER, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
    VARY, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use tracing::{Instrument, Span};
use url::Url;

use crate::body::ProxyBody;
use crate::cache::{CacheKey, CachedObject, PassMarker, TieredCache};
use crate::collapse::{Collapser, Leader, Outcome, Role, SharedHead, SharedReader};
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::freshness::{self, RequestDirectives, RequestFacts, Usability, if_none_match_matches};
use crate::metrics::Metrics;
use crate::pressure::{Reading, ReservationPool};
use crate::tee::{StoreTarget, TeeBody};
use crate::upstream::{
    Guard, RequestBody, Upstream, UpstreamError, UpstreamHead, UpstreamRequest, UpstreamResponse,
};
use tokio::sync::watch;

/// `Surrogate-Control`: caching directives for surrogates such as this one.
pub static SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Cache-Status values. The cache name is `imgedge`.
pub mod status {
    pub const HIT_MEMORY: &str = "imgedge; hit; detail=memory";
    /// Served from the disk tier (and promoted into memory).
    pub const HIT_DISK: &str = "imgedge; hit; detail=disk";
    /// A stale response served because the request's `max-stale` accepted it.
    pub const HIT_STALE: &str = "imgedge; hit; detail=memory-stale";
    /// A stale response served while it is refreshed in the background (RFC 5861 §3).
    pub const HIT_STALE_WHILE_REVALIDATE: &str = "imgedge; hit; detail=stale-while-revalidate";
    /// A stale response served because the origin failed (RFC 5861 §4).
    pub const STALE_IF_ERROR: &str = "imgedge; fwd=stale; detail=stale-if-error";
    /// Stale, served because the origin could not be reached (RFC 9111 §4.2.4).
    pub const STALE_IF_UNREACHABLE: &str = "imgedge; fwd=stale; detail=unreachable";
    /// A stale stored response the origin confirmed with 304 (RFC 9111 §4.3).
    pub const REVALIDATED: &str = "imgedge; fwd=stale; fwd-status=304";
    /// A fresh stored response validated because the request asked (`no-cache`, `max-age`).
    pub const REVALIDATED_ON_REQUEST: &str = "imgedge; fwd=request; fwd-status=304";
    pub const MISS_STORED: &str = "imgedge; fwd=uri-miss; stored";
    pub const MISS_TOO_LARGE: &str = "imgedge; fwd=uri-miss; detail=too-large";
    pub const MISS_HEAD: &str = "imgedge; fwd=uri-miss; detail=method";
    /// Not teed into memory because memory pressure is at bypass or above.
    pub const MISS_MEMORY_PRESSURE: &str = "imgedge; fwd=uri-miss; detail=memory-pressure";
    /// A follower of another request's fill (collapsed forwarding).
    pub const MISS_COLLAPSED: &str = "imgedge; fwd=uri-miss; collapsed";
    /// A method that is never looked up (POST, PUT, DELETE, ...), forwarded on a route.
    pub const FORWARD_METHOD: &str = "imgedge; fwd=method";
}

/// Origin response headers passed to clients; everything else (hop-by-hop, `Set-Cookie`,
/// server internals) is dropped. `Age` is forwarded on a miss but never stored.
const FORWARDED: [HeaderName; 11] = [
    CONTENT_TYPE,
    ETAG,
    LAST_MODIFIED,
    CACHE_CONTROL,
    EXPIRES,
    CONTENT_ENCODING,
    CONTENT_LANGUAGE,
    CONTENT_DISPOSITION,
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
    fn upstream_headers(&self) -> HeaderMap {
        match self {
            Forwarding::Bare => HeaderMap::new(),
            Forwarding::Headers { headers, .. } => headers.clone(),
        }
    }

    fn response_headers(&self, upstream: &HeaderMap) -> HeaderMap {
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

    fn facts(&self) -> RequestFacts {
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
    fn is_plain(&self) -> bool {
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

/// A GET or HEAD for a cacheable upstream object, as a route resolved it.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    /// The absolute upstream URL to fetch on a miss.
    pub url: Url,
    /// The key of the stored response: `primary`, or the variant of it this request selects
    /// when the stored response had `Vary` (resolved by [`Proxy::handle`]).
    pub key: CacheKey,
    /// The key of the URL itself: purges and invalidations address it.
    pub primary: CacheKey,
    pub guard: Guard,
    /// HEAD: answered from the tier on a hit, forwarded as HEAD (and not stored) on a miss.
    pub head: bool,
    /// The client's `If-None-Match`, answered with 304 on a matching hit.
    pub if_none_match: Option<HeaderValue>,
    /// The client's `Range` and `If-Range`: a single byte range is answered 206 from a stored
    /// 200 (RFC 9110 §14); anything else gets the whole response.
    pub range: Option<HeaderValue>,
    pub if_range: Option<HeaderValue>,
    /// The client's `Cache-Control` (and `Pragma`) request directives.
    pub directives: RequestDirectives,
    /// The route's freshness for responses that state none and have no `Last-Modified`.
    pub default_ttl: Option<Duration>,
    pub forwarding: Forwarding,
}

/// The proxy core: the memory tier, the in-flight fills and the upstream clients.
pub struct Proxy {
    tier: TieredCache,
    collapser: Arc<Collapser>,
    /// The memory monitor's level: at bypass and above nothing new is teed into memory.
    pressure: watch::Receiver<Reading>,
    /// What the fills in flight may collect; a fill that cannot reserve is not stored.
    fills: Arc<ReservationPool>,
    /// Keys being refreshed in the background (stale-while-revalidate), one task per key.
    refreshing: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    cache: CacheConfig,
}

impl Proxy {
    pub fn new(
        tier: TieredCache,
        upstream: Upstream,
        metrics: Arc<Metrics>,
        cache: CacheConfig,
        pressure: watch::Receiver<Reading>,
        fills: Arc<ReservationPool>,
    ) -> Self {
        Proxy {
            fills,
            tier,
            collapser: Arc::new(Collapser::default()),
            refreshing: Default::default(),
            upstream,
            metrics,
            cache,
            pressure,
        }
    }

    /// Upstream fetches in flight: the count, and the `oldest` as (URL, age).
    pub fn inflight(&self, oldest: usize) -> (usize, Vec<(Arc<str>, Duration)>) {
        self.upstream.inflight(oldest)
    }

    /// The in-flight fill reservation pool.
    pub fn fills(&self) -> &ReservationPool {
        &self.fills
    }

    pub fn tier(&self) -> &TieredCache {
        &self.tier
    }

    /// Aborts the shared fills no client is reading; see [`Collapser::abort_unread`].
    pub fn abort_unread_fills(&self) -> usize {
        self.collapser.abort_unread()
    }

    /// Answers `req` from the memory tier, a fill in flight, or the origin. The returned body
    /// streams; failures after this returns abort the client connection.
    ///
    /// # Errors
    /// A [`ProxyError`] for anything that fails before the response head (for a follower, the
    /// leader's error).
    pub async fn handle(
        self: &Arc<Self>,
        mut req: ProxyRequest,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Forwarding::Headers { headers, .. } = &req.forwarding
            && let Some(index) = self.tier.vary_index(&req.primary).await
        {
            req.key = req.primary.variant(&index, headers);
        }
        let now = SystemTime::now();
        let found = self.tier.lookup(&req.key).await;
        let found_in = found.as_ref().map(|f| f.tier);
        let cached = found.map(|f| f.object);
        let usability = cached
            .as_ref()
            .map(|o| freshness::usability(&o.freshness, o.age(now), &req.directives));
        let hit = match usability {
            Some(Usability::Fresh) if found_in == Some(0) => Some(status::HIT_MEMORY),
            Some(Usability::Fresh) => Some(status::HIT_DISK),
            Some(Usability::StaleAccepted) => Some(status::HIT_STALE),
            Some(Usability::StaleWhileRevalidate) => Some(status::HIT_STALE_WHILE_REVALIDATE),
            Some(Usability::NeedsValidation) | None => None,
        };
        // Every tier above the one that answered missed; it hit when its object may serve; the
        // tiers below count as misses when the request goes on to the origin.
        for (i, name) in self.tier.tier_names().enumerate() {
            match found_in {
                Some(f) if i < f => self.metrics.cache_lookup(name, false),
                Some(f) if i == f => self.metrics.cache_lookup(name, hit.is_some()),
                _ if hit.is_none() => self.metrics.cache_lookup(name, false),
                _ => {}
            }
        }
        if let (Some(object), Some(cache_status)) = (&cached, hit) {
            if usability == Some(Usability::StaleWhileRevalidate) {
                self.refresh_in_background(&req, object.clone());
            }
            Span::current().record("cache", cache_status);
            return Ok(hit_response(object, &req, now, cache_status));
        }
        if req.directives.only_if_cached {
            return Err(ProxyError::NotCached);
        }
        // What may stand in if the origin fails: a stale response that allows it with
        // stale-if-error (RFC 5861 §4, also for 5xx answers), or any stale response that need
        // not be revalidated when the origin cannot be reached at all (RFC 9111 §4.2.4).
        let fallback = cached
            .clone()
            .filter(|o| o.freshness.may_serve_stale(o.age(now), Duration::MAX))
            .map(|o| (o, req.clone()));
        let result = self.upstream_path(req, cached).await;
        let Some((object, req)) = fallback else {
            return result;
        };
        let now = SystemTime::now();
        let age = object.age(now);
        let unreachable = matches!(
            result,
            Err(ProxyError::Upstream(_) | ProxyError::UpstreamTimeout(_))
        );
        let failed = match &result {
            Err(_) => true,
            Ok(response) => response.status().is_server_error(),
        };
        let freshness = &object.freshness;
        let cache_status = if failed && freshness.may_serve_stale(age, freshness.stale_if_error) {
            status::STALE_IF_ERROR
        } else if unreachable && freshness.may_serve_stale(age, self.cache.stale_if_unreachable) {
            status::STALE_IF_UNREACHABLE
        } else {
            return result;
        };
        Span::current().record("cache", cache_status);
        Ok(hit_response(&object, &req, now, cache_status))
    }

    /// Refreshes a stale object in a task of its own while the stale copy is served (RFC 5861
    /// §3), at most once at a time per key.
    fn refresh_in_background(self: &Arc<Self>, req: &ProxyRequest, object: Arc<CachedObject>) {
        {
            let mut refreshing = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
            if !refreshing.insert(req.key.clone()) {
                return;
            }
        }
        let this = self.clone();
        let mut req = req.clone();
        req.head = false;
        req.if_none_match = None;
        req.directives = RequestDirectives::default();
        let task = async move {
            let key = req.key.clone();
            if let Ok(response) = this.upstream_path(req, Some(object)).await {
                // Drive the body to its end so that a fill completes and is stored.
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            }
            this.refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        };
        tokio::spawn(task.instrument(Span::current()));
    }

    /// Everything after the memory tier could not answer: revalidation of a stored response,
    /// collapsed forwarding, or a fetch of its own.
    async fn upstream_path(
        &self,
        req: ProxyRequest,
        cached: Option<Arc<CachedObject>>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = SystemTime::now();
        if let Some(object) = cached
            && req.forwarding.is_plain()
            && (object.headers.contains_key(ETAG) || object.headers.contains_key(LAST_MODIFIED))
        {
            return self.revalidate(req, object, now).await;
        }
        if req.head || !req.forwarding.is_plain() || self.tier.pass_marker(&req.key).await.is_some()
        {
            return self.fetch(req, None).await;
        }
        match self.collapser.join(&req.key) {
            Role::Leader(leader) => self.fetch(req, Some(leader)).await,
            Role::Follower(fill) => match fill.wait_outcome(self.cache.lock_timeout).await {
                Some(Outcome::Shared(head)) => {
                    self.metrics.collapsed.inc();
                    Span::current().record("cache", status::MISS_COLLAPSED);
                    let mut response =
                        Response::new(ProxyBody::Shared(Box::new(SharedReader::new(fill))));
                    *response.status_mut() = head.status;
                    *response.headers_mut() = head.headers.clone();
                    response.headers_mut().insert(
                        CACHE_STATUS.clone(),
                        HeaderValue::from_static(status::MISS_COLLAPSED),
                    );
                    Ok(response)
                }
                Some(Outcome::Failed(e)) => Err(e),
                // Pass, or no head within lock_timeout: fetch on our own.
                Some(Outcome::Pass | Outcome::Waiting) | None => self.fetch(req, None).await,
            },
        }
    }

    /// Fetches from the origin and builds the streamed response; as `leader`, shares the fill or
    /// releases the followers.
    async fn fetch(
        &self,
        req: ProxyRequest,
        leader: Option<Leader>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let fetched = self.send(&req, req.forwarding.upstream_headers()).await;
        let upstream = match fetched {
            Ok(u) => u,
            Err(e) => {
                let e = ProxyError::from(e);
                if let Some(leader) = leader {
                    leader.fail(e.clone());
                }
                return Err(e);
            }
        };
        Ok(self.respond(req, upstream, leader).await)
    }

    /// Validates a stored response that may not serve as it is (stale, or refused by the
    /// request's directives) with a conditional request (RFC 9111 §4.3.1). A 304 updates the
    /// stored headers and freshness from its own (§4.3.4) and serves the stored body; any other
    /// response is handled as a miss and replaces it.
    async fn revalidate(
        &self,
        req: ProxyRequest,
        object: Arc<CachedObject>,
        now: SystemTime,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut headers = req.forwarding.upstream_headers();
        if let Some(etag) = object.headers.get(ETAG) {
            headers.insert(IF_NONE_MATCH, etag.clone());
        }
        if let Some(last_modified) = object.headers.get(LAST_MODIFIED) {
            headers.insert(IF_MODIFIED_SINCE, last_modified.clone());
        }
        let upstream = self.send(&req, headers).await?;
        if upstream.head.status != StatusCode::NOT_MODIFIED {
            return Ok(self.respond(req, upstream, None).await);
        }
        Span::current().record("upstream_status", 304);
        let was_fresh = object.is_fresh(now);
        let mut merged = object.headers.clone();
        let update = req.forwarding.response_headers(&upstream.head.headers);
        for name in update.keys() {
            // Fields the stored body depends on are not taken from a 304 (§3.2).
            let describes_body = [CONTENT_LENGTH, CONTENT_ENCODING, CONTENT_RANGE, ETAG]
                .contains(name)
                || name.as_str() == "content-md5";
            if !describes_body {
                merged.remove(name);
                for value in update.get_all(name) {
                    merged.append(name.clone(), value.clone());
                }
            }
        }
        let decided = freshness::storable(
            object.status,
            &merged,
            req.forwarding.facts(),
            upstream.head.times,
            self.cache.freshness_policy(req.default_ttl),
        );
        merged.remove(AGE);
        let cache_status = if was_fresh {
            status::REVALIDATED_ON_REQUEST
        } else {
            status::REVALIDATED
        };
        Span::current().record("cache", cache_status);
        let refreshed = CachedObject {
            status: object.status,
            headers: merged,
            body: object.body.clone(),
            response_time: upstream.head.times.response_time,
            freshness: decided.unwrap_or(object.freshness),
        };
        let response = hit_response(&refreshed, &req, SystemTime::now(), cache_status);
        if decided.is_ok() && !req.directives.no_store {
            self.tier.insert(req.key.clone(), refreshed).await;
        } else {
            self.tier.invalidate(&req.key).await;
        }
        Ok(response)
    }

    /// Builds the streamed response for an origin response to `req`; as `leader`, shares the fill
    /// or releases the followers.
    async fn respond(
        &self,
        req: ProxyRequest,
        upstream: UpstreamResponse,
        leader: Option<Leader>,
    ) -> Response<ProxyBody> {
        let UpstreamResponse { head, body } = upstream;
        Span::current().record("upstream_status", head.status.as_u16());
        let mut headers = req.forwarding.response_headers(&head.headers);
        if let Some(length) = head.content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let (cache_status, mut store) = self.plan(&req, &head, &headers).await;
        Span::current().record("cache", cache_status.as_str());
        // A bodyless response (a 204, say) is complete already, and hyper never polls an empty
        // body, so a tee would never see its end: store it now.
        if body.is_end_stream()
            && head.content_length.is_none()
            && let Some(target) = store.take()
        {
            target.store(bytes::Bytes::new()).await;
        }
        let served_headers = headers.clone();
        headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_str(&cache_status).expect("cache status is ASCII"),
        );
        // A storable miss with a known length is shared with followers when this request leads
        // (see collapse.rs); otherwise it streams to this client, teed when storable (tee.rs).
        let body = match (store, leader) {
            // A response that varies is not shared: followers may select other variants.
            (Some(store), Some(leader))
                if head.content_length.is_some() && !head.headers.contains_key(VARY) =>
            {
                let total = head.content_length.expect("shared fills have a length") as usize;
                let shared = SharedHead {
                    status: head.status,
                    headers: served_headers,
                };
                ProxyBody::Shared(Box::new(leader.share(shared, body, total, store)))
            }
            (store, leader) => {
                if let Some(leader) = leader {
                    leader.pass();
                }
                ProxyBody::Tee(Box::new(TeeBody::new(body, store)))
            }
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        response
    }

    /// Removes the object and any pass marker under `key` from both tiers; returns whether an
    /// object was stored in either.
    pub async fn purge(&self, key: &CacheKey) -> bool {
        let existed = self.tier.contains(key);
        self.tier.invalidate(key).await;
        tracing::info!(key = key.as_str(), existed, "purged");
        existed
    }

    /// Forwards a request whose method is never looked up or stored (RFC 9111 §2: only GET and
    /// HEAD are cached here), streaming its body upstream and the response back. A non-error
    /// response invalidates the stored response for the URI and for a same-origin `Location` or
    /// `Content-Location` (RFC 9111 §4.4).
    ///
    /// # Errors
    /// A [`ProxyError`] for anything that fails before the response head.
    pub async fn forward(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        body: RequestBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let request = UpstreamRequest {
            method,
            url: url.clone(),
            headers,
            body,
            guard: Guard::Trusted,
        };
        let fetched = self.upstream.fetch(request).await;
        self.count_fetch(&fetched);
        let UpstreamResponse { head, body } = fetched?;
        Span::current().record("upstream_status", head.status.as_u16());
        Span::current().record("cache", status::FORWARD_METHOD);
        if !head.status.is_client_error() && !head.status.is_server_error() {
            self.tier.invalidate(&CacheKey::for_url(&url)).await;
            for name in [LOCATION, CONTENT_LOCATION] {
                let target = head
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| url.join(v).ok());
                if let Some(target) = target.filter(|t| t.origin() == url.origin()) {
                    self.tier.invalidate(&CacheKey::for_url(&target)).await;
                }
            }
        }
        let mut headers = end_to_end(&head.headers, &[]);
        if let Some(length) = head.content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(status::FORWARD_METHOD),
        );
        let mut response = Response::new(ProxyBody::Tee(Box::new(TeeBody::new(body, None))));
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        Ok(response)
    }

    /// Sends `req`'s GET (or HEAD) upstream with `headers`, counting the outcome.
    async fn send(
        &self,
        req: &ProxyRequest,
        headers: HeaderMap,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let method = if req.head { Method::HEAD } else { Method::GET };
        let request = UpstreamRequest {
            headers,
            ..UpstreamRequest::bare(method, req.url.clone(), req.guard)
        };
        let fetched = self.upstream.fetch(request).await;
        self.count_fetch(&fetched);
        fetched
    }

    fn count_fetch(&self, fetched: &Result<UpstreamResponse, UpstreamError>) {
        match fetched {
            Ok(r) => {
                let head = r
                    .head
                    .times
                    .response_time
                    .duration_since(r.head.times.request_time);
                self.metrics
                    .upstream("ok", head.ok().map(|d| d.as_secs_f64()));
            }
            Err(UpstreamError::Timeout { .. }) => self.metrics.upstream("timeout", None),
            Err(UpstreamError::Refused(_)) => self.metrics.upstream("refused", None),
            Err(_) => self.metrics.upstream("error", None),
        }
    }

    /// Decides the `Cache-Status` of a miss and, when its body is to be stored, where; remembers
    /// responses that will not be stored (hit-for-pass).
    async fn plan(
        &self,
        req: &ProxyRequest,
        upstream: &UpstreamHead,
        headers: &HeaderMap,
    ) -> (String, Option<StoreTarget>) {
        if req.head {
            return (status::MISS_HEAD.to_owned(), None);
        }
        let marker = |reason: &'static str, length_bytes: Option<u64>| PassMarker {
            reason,
            length_bytes,
        };
        let freshness = match freshness::storable(
            upstream.status,
            &upstream.headers,
            req.forwarding.facts(),
            upstream.times,
            self.cache.freshness_policy(req.default_ttl),
        ) {
            Ok(f) => f,
            Err(reason) => {
                if req.forwarding.is_plain() {
                    self.tier
                        .mark_pass(
                            req.key.clone(),
                            marker(reason.detail(), upstream.content_length),
                        )
                        .await;
                }
                return (
                    format!("imgedge; fwd=uri-miss; detail={}", reason.detail()),
                    None,
                );
            }
        };
        let max = self.cache.max_cacheable_bytes;
        match upstream.content_length {
            Some(length) if length > max => {
                tracing::info!(
                    key = req.key.as_str(),
                    size_bytes = length,
                    max_cacheable_bytes = max,
                    "too large to store"
                );
                self.tier
                    .mark_pass(req.key.clone(), marker(PassMarker::TOO_LARGE, Some(length)))
                    .await;
                return (status::MISS_TOO_LARGE.to_owned(), None);
            }
            None => {
                if let Some(seen) = self
                    .tier
                    .pass_marker(&req.key)
                    .await
                    .filter(|m| m.is_too_large())
                {
                    tracing::info!(
                        key = req.key.as_str(),
                        size_bytes = seen.length_bytes,
                        "too large to store (remembered): streaming without collecting"
                    );
                    return (status::MISS_TOO_LARGE.to_owned(), None);
                }
            }
            Some(_) => {}
        }
        if !self.pressure.borrow().level.stores() {
            return (status::MISS_MEMORY_PRESSURE.to_owned(), None);
        }
        if req.directives.no_store {
            return (
                "imgedge; fwd=uri-miss; detail=request-no-store".to_owned(),
                None,
            );
        }
        // A response that varies is stored under the variant this request selects (§4.1).
        let mut key = req.key.clone();
        if let Forwarding::Headers { headers, .. } = &req.forwarding {
            let names = freshness::vary_names(&upstream.headers).unwrap_or_default();
            if !names.is_empty() {
                let index = self.tier.set_vary_index(&req.primary, names).await;
                key = req.primary.variant(&index, headers);
            }
        }
        // Admission: the bytes this fill will hold, reserved before it holds them.
        let Some(reservation) = self.fills.try_reserve(upstream.content_length.unwrap_or(0)) else {
            tracing::info!(
                key = req.key.as_str(),
                "not stored: in-flight fill reservation exhausted"
            );
            return (status::MISS_MEMORY_PRESSURE.to_owned(), None);
        };
        let mut stored_headers = headers.clone();
        stored_headers.remove(AGE);
        let fill = StoreTarget {
            reservation,
            status: upstream.status,
            tier: self.tier.clone(),
            key,
            headers: stored_headers,
            response_time: upstream.times.response_time,
            freshness,
            max_cacheable_bytes: max,
            too_large: marker(PassMarker::TOO_LARGE, None),
        };
        (status::MISS_STORED.to_owned(), Some(fill))
    }
}

/// The allowlisted end-to-end headers of an origin response.
fn allowlisted(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(FORWARDED.len() + 4);
    for name in &FORWARDED {
        for value in upstream.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// A response served from the tier: 304 when the client's `If-None-Match` matches the stored
/// `ETag` (RFC 9110 §13.1.2), else 200 with the stored headers and body (a `Bytes` clone, not a
/// copy). Both carry `Age` (RFC 9111 §5.1) and `Cache-Status`.
fn hit_response(
    object: &CachedObject,
    req: &ProxyRequest,
    now: SystemTime,
    cache_status: &'static str,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(object.age(now).as_secs());
    let hit = HeaderValue::from_static(cache_status);
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
            freshness::single_byte_range(range, total)
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
