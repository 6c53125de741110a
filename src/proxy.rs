//! One proxied request: cache key → tiers → revalidation or collapsed upstream fetch → streamed
//! response, teeing a storable body into the tiers. Shared by every proxy route; the routes only
//! differ in how they build a [`ProxyRequest`] (target URL, guard, forwarding).
//!
//! Here: [`Proxy::handle`] (lookup, hits, stale fallbacks, collapsing, fetch). Beside it:
//! `forwarding.rs` (which headers cross), `hit.rs` (responses from the cache: Range,
//! `If-Range`, 304), `store.rs` (the store decision and revalidation), `forward.rs` (unsafe
//! methods), `source.rs` ([`Proxy::source`]: a complete object for work that needs every byte)
//! and `cache_status.rs` (the typed [`CacheStatus`]). Does not parse client requests or render
//! errors (`http.rs`), nor judge freshness (`freshness.rs`).

mod cache_status;
pub(crate) mod content;
mod forward;
mod forwarding;
mod hit;
mod source;
mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{CONTENT_LENGTH, ETAG, LAST_MODIFIED, VARY, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tracing::{Instrument, Span};
use url::Url;

pub(crate) use cache_status::{CACHE_STATUS, CacheStatus};
pub(crate) use forwarding::{
    CREDENTIALS, ForwardedFor, Forwarding, SURROGATE_CONTROL, end_to_end, route_request_headers,
};
pub use hit::{if_none_match_matches, single_byte_range};

use crate::body::ProxyBody;
use crate::cache::{CacheKey, CachedObject, Placement, TieredCache};
use crate::collapse::{Collapser, Leader, Outcome, Role, SharedHead, SharedReader};
use crate::config::CacheConfig;
use crate::error::ProxyError;
use crate::freshness::{self, RequestDirectives, Usability};
use crate::metrics::Metrics;
use crate::pressure::{Reading, ReservationPool};
use crate::tasks::Tasks;
use crate::tee::TeeBody;
use crate::upstream::{Guard, Upstream, UpstreamError, UpstreamRequest, UpstreamResponse};
use content::ContentPolicy;
use hit::hit_response;

/// A GET or HEAD for a cacheable upstream object, as a route resolved it.
#[derive(Debug, Clone)]
pub(crate) struct ProxyRequest {
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
    /// When the request's authority ends (a signed URL's token expires): what it fetches is
    /// kept fresh until then at most, and never served stale after.
    pub expires_at: Option<SystemTime>,
    /// Which tiers a miss is stored in: everywhere for what clients fetch, below memory for a
    /// transform's source (`[transform] sources_in_memory`).
    pub placement: Placement,
}

/// What the proxy works with; built once by the app (`app.rs`), which hands the same handles
/// to relief (`relief.rs`) and `/health`.
pub(crate) struct ProxyParts {
    pub tier: TieredCache,
    pub collapser: Arc<Collapser>,
    /// What the fills in flight may collect; a fill that cannot reserve is not stored.
    pub fills: Arc<ReservationPool>,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub cache: CacheConfig,
    /// The memory monitor's readings: at bypass and above nothing new is stored.
    pub pressure: watch::Receiver<Reading>,
    /// Where background refreshes (and the pass markers of fills) are spawned.
    pub tasks: Tasks,
    /// What `/image-proxy` may serve.
    pub content: ContentPolicy,
}

/// The proxy core: the tiers, the in-flight fills and the upstream clients.
pub(crate) struct Proxy {
    tier: TieredCache,
    collapser: Arc<Collapser>,
    pressure: watch::Receiver<Reading>,
    fills: Arc<ReservationPool>,
    /// Keys being refreshed in the background (stale-while-revalidate), one task per key.
    refreshing: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    cache: CacheConfig,
    tasks: Tasks,
    content: ContentPolicy,
}

impl Proxy {
    pub(crate) fn new(parts: ProxyParts) -> Self {
        let ProxyParts {
            tier,
            collapser,
            fills,
            upstream,
            metrics,
            cache,
            pressure,
            tasks,
            content,
        } = parts;
        Proxy {
            tier,
            collapser,
            pressure,
            fills,
            refreshing: Default::default(),
            upstream,
            metrics,
            cache,
            tasks,
            content,
        }
    }

    /// Where the proxy's background work runs (and the reading of request bodies nothing
    /// upstream wants any more).
    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Answers `req` from the memory tier, a fill in flight, or the origin. The returned body
    /// streams; failures after this returns abort the client connection.
    ///
    /// # Errors
    /// A [`ProxyError`] for anything that fails before the response head (for a follower, the
    /// leader's error).
    pub(crate) async fn handle(
        self: &Arc<Self>,
        mut req: ProxyRequest,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Forwarding::Headers { headers, .. } = &req.forwarding
            && let Some(index) = self.tier.vary_index(&req.primary).await
        {
            req.key = req.primary.variant(&index, headers);
        }
        let now = SystemTime::now();
        // A request with credentials is answered from the cache only by a response marked
        // shareable (RFC 9111 §3.5): one stored for anonymous requests may differ from what the
        // origin would tell this client.
        let credentialed = req.forwarding.facts().authorized;
        let found = self
            .tier
            .lookup_for(&req.key, req.placement)
            .await
            .filter(|f| {
                !credentialed
                    || freshness::effective_directives(&f.object.headers, self.cache.targeted_field)
                        .shareable()
            });
        let found_in = found.as_ref().map(|f| f.tier);
        let found_name = found.as_ref().map(|f| f.tier_name);
        let cached = found.map(|f| f.object);
        let usability = cached
            .as_ref()
            .map(|o| freshness::usability(&o.freshness, o.age(now), &req.directives));
        let hit = match usability {
            Some(Usability::Fresh) => found_name.map(CacheStatus::hit),
            Some(Usability::StaleAccepted) => Some(CacheStatus::HIT_STALE),
            Some(Usability::StaleWhileRevalidate) => Some(CacheStatus::HIT_STALE_WHILE_REVALIDATE),
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
            cache_status.record_in_span();
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
            CacheStatus::STALE_IF_ERROR
        } else if unreachable && freshness.may_serve_stale(age, self.cache.stale_if_unreachable) {
            CacheStatus::STALE_IF_UNREACHABLE
        } else {
            return result;
        };
        cache_status.record_in_span();
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
        self.tasks.spawn(task.instrument(Span::current()));
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
            Role::Leader(leader) => {
                // A fill of this key may have been stored (and left the collapser) between the
                // lookup and the join: serve what it stored rather than fetch it again.
                if let Some(hit) = self.stored_since(&req).await {
                    drop(leader);
                    return Ok(hit);
                }
                self.fetch(req, Some(leader)).await
            }
            Role::Follower(fill) => match fill.wait_outcome(self.cache.lock_timeout).await {
                Some(Outcome::Shared(head)) => {
                    self.metrics.collapsed.inc();
                    CacheStatus::MISS_COLLAPSED.record_in_span();
                    let mut response =
                        Response::new(ProxyBody::Shared(Box::new(SharedReader::new(fill))));
                    *response.status_mut() = head.status;
                    *response.headers_mut() = head.headers.clone();
                    response.headers_mut().insert(
                        CACHE_STATUS.clone(),
                        CacheStatus::MISS_COLLAPSED.header_value(),
                    );
                    Ok(response)
                }
                Some(Outcome::Failed(e)) => Err(e),
                // Pass, or no head within lock_timeout: fetch on our own (unless a fill
                // stored it meanwhile).
                Some(Outcome::Pass | Outcome::Waiting) | None => {
                    match self.stored_since(&req).await {
                        Some(hit) => Ok(hit),
                        None => self.fetch(req, None).await,
                    }
                }
            },
        }
    }

    /// A fresh object stored in the memory tier under `req.key` since `req`'s lookup missed (a
    /// fill that completed in between), as a hit; `None` otherwise. Only for plain requests
    /// (no credentials, validators or ranges went into the lookup's decision).
    async fn stored_since(&self, req: &ProxyRequest) -> Option<Response<ProxyBody>> {
        if !self.tier.memory().contains(&req.key) {
            return None;
        }
        let object = self.tier.memory().get(&req.key).await?;
        let now = SystemTime::now();
        if freshness::usability(&object.freshness, object.age(now), &req.directives)
            != Usability::Fresh
        {
            return None;
        }
        let cache_status = CacheStatus::hit("memory");
        cache_status.record_in_span();
        Some(hit_response(&object, req, now, cache_status))
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
        self.respond(req, upstream, leader).await
    }

    /// Builds the streamed response for an origin response to `req`; as `leader`, shares the fill
    /// or releases the followers. On `/image-proxy`, an origin's error status is answered with
    /// imgedge's own body, and anything else must be an image (`content.rs`).
    ///
    /// # Errors
    /// [`ProxyError::NotAnImage`] on `/image-proxy`; what reading the first bytes fails with.
    async fn respond(
        &self,
        req: ProxyRequest,
        mut upstream: UpstreamResponse,
        leader: Option<Leader>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        Span::current().record("upstream_status", upstream.head.status.as_u16());
        if matches!(req.forwarding, Forwarding::Bare) {
            if !upstream.head.status.is_success() {
                return Ok(self.origin_error(&req, &upstream.head, leader).await);
            }
            if let Err(e) = self.check_image(&req, &mut upstream).await {
                if matches!(e, ProxyError::NotAnImage(_)) {
                    tracing::info!(url = req.url.as_str(), error = %e, "not an image: refused");
                } else {
                    tracing::warn!(url = req.url.as_str(), error = %e, "upstream body failed before its first bytes");
                }
                if let Some(leader) = leader {
                    leader.fail(e.clone());
                }
                return Err(e);
            }
        }
        let UpstreamResponse { head, body } = upstream;
        let mut headers = req.forwarding.response_headers(&head.headers);
        add_date(&mut headers, head.times.response_time);
        if let Some(length) = head.content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let (cache_status, mut store) = self.plan(&req, &head, &headers).await;
        cache_status.record_in_span();
        // A bodyless response (a 204, say) is complete already, and hyper never polls an empty
        // body, so a tee would never see its end: store it now.
        if body.is_end_stream()
            && head.content_length.is_none()
            && let Some(target) = store.take()
        {
            target.store(bytes::Bytes::new()).await;
        }
        let served_headers = headers.clone();
        headers.insert(CACHE_STATUS.clone(), cache_status.header_value());
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
        Ok(response)
    }

    /// Checks that an `/image-proxy` response is an image: its head, then (unless it has no
    /// body) its first bytes, read ahead without being sent.
    async fn check_image(
        &self,
        req: &ProxyRequest,
        upstream: &mut UpstreamResponse,
    ) -> Result<(), ProxyError> {
        let signature = self.content.check_head(&upstream.head.headers)?;
        let bodyless = req.head
            || matches!(
                upstream.head.status,
                http::StatusCode::NO_CONTENT | http::StatusCode::RESET_CONTENT
            );
        if !bodyless {
            let first = upstream.body.peek(content::SIGNATURE_BYTES).await?;
            ContentPolicy::check_signature(signature, &first)?;
        }
        Ok(())
    }

    /// An origin's error (or any non-2xx it did not redirect) on `/image-proxy`: its status is
    /// kept, but its body (an HTML page, perhaps) is never served from imgedge's origin; the
    /// answer is imgedge's JSON, stored as the origin's would have been (negative caching).
    async fn origin_error(
        &self,
        req: &ProxyRequest,
        head: &crate::upstream::UpstreamHead,
        leader: Option<Leader>,
    ) -> Response<ProxyBody> {
        if let Some(leader) = leader {
            leader.pass();
        }
        let body = bytes::Bytes::from(format!(
            "{{\"error\":\"origin_status\",\"message\":\"the origin answered {}\"}}\n",
            head.status
        ));
        let mut headers = req.forwarding.response_headers(&head.headers);
        headers.remove(http::header::CONTENT_TYPE);
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let (cache_status, store) = self.plan(req, head, &headers).await;
        cache_status.record_in_span();
        if let Some(target) = store {
            target.store(body.clone()).await;
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(CACHE_STATUS.clone(), cache_status.header_value());
        let mut response = Response::new(if req.head {
            ProxyBody::empty()
        } else {
            ProxyBody::full(body)
        });
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        response
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
}

/// Adds `Date` (the time the response arrived) to a response that has none: RFC 9110 §6.6.1
/// requires it of a cache that stores or forwards such a response, and what is derived from a
/// stored response (source records) tells its fills apart by it.
pub(crate) fn add_date(headers: &mut HeaderMap, response_time: SystemTime) {
    if !headers.contains_key(http::header::DATE) {
        headers.insert(
            http::header::DATE,
            HeaderValue::from_str(&httpdate::fmt_http_date(response_time)).expect("ASCII"),
        );
    }
}
