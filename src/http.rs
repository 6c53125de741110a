//! The HTTP face: routing, parsing client requests into [`ProxyRequest`]s, rendering
//! [`ProxyError`]s as JSON, `/health` and `/metrics`, request ids, and the access log line that
//! closes every request once its body has finished (or failed).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE, IF_NONE_MATCH};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use percent_encoding::percent_decode_str;
use tracing::field::Empty;
use tracing::{Instrument, Span};
use url::Url;

use crate::body::ProxyBody;
use crate::cache::disk::DiskBackend;
use crate::cache::{CacheKey, MemoryTier, Tier, TierUsage, TieredCache};
use crate::config::Config;
use crate::error::ProxyError;
use crate::freshness::RequestDirectives;
use crate::metrics::{self, Metrics};
use crate::pressure::{Level, Monitor, Reading, ReservationPool, detect_budget_bytes};
use crate::proxy::{Forwarding, Proxy, ProxyRequest, end_to_end};
use crate::rss::RssSource;
use crate::target;
use crate::tasks::Tasks;
use crate::upstream::{BoxError, Guard, Upstream, UpstreamError};
use tokio::sync::watch;

/// `X-Request-Id`: echoed when the client sent a sane one, generated otherwise.
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The bulk purge endpoint.
pub const PURGE_PATH: &str = "/_imgedge/purge";
/// Largest accepted bulk purge body, in bytes.
const PURGE_BODY_BYTES: usize = 1 << 20;

/// Prefix of Supabase Storage's public object route.
pub const SUPABASE_PUBLIC_PREFIX: &str = "/storage/v1/object/public/";

/// Supabase's `apikey` request header: a credential, like `Authorization`.
static APIKEY: HeaderName = HeaderName::from_static("apikey");

/// What a request is for. The built-in paths win over `[[routes]]` prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    ImageProxy,
    Health,
    Metrics,
    /// `config.routes[index]`, named `name` in logs and metrics.
    Proxied {
        index: usize,
        name: &'static str,
    },
    Other,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::ImageProxy => "image-proxy",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Proxied { name, .. } => name,
            Route::Other => "other",
        }
    }
}

/// Why the process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot detect the memory budget: set [memory] budget_bytes")]
    NoBudget,
    #[error(transparent)]
    MemoryBudget(#[from] crate::config::MemoryBudgetError),
    #[error("cannot read this process's RSS")]
    NoRss,
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
}

/// Everything a request needs, shared by all connections.
pub struct App {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    config: Config,
    /// The memory monitor's latest reading.
    pressure: watch::Receiver<Reading>,
    started: Instant,
    /// Set when shutdown begins: `/health/ready` answers 503 from then on.
    draining: AtomicBool,
    /// Distinguishes this process's generated request ids from another's.
    instance: u32,
    next_request: AtomicU64,
}

impl App {
    /// Builds the tier, the upstream clients, the metrics and the memory monitor for `config`.
    ///
    /// # Errors
    /// [`SetupError`]: the memory budget cannot be determined or leaves the memory tier too
    /// little room, or the upstream clients cannot be built.
    pub async fn new(config: Config, rss: Arc<dyn RssSource>) -> Result<Self, SetupError> {
        let metrics = Arc::new(Metrics::default());
        let budget_bytes = match config.memory.budget_bytes {
            0 => detect_budget_bytes().ok_or(SetupError::NoBudget)?,
            b => b,
        };
        config.check_memory_budget(budget_bytes)?;
        let (monitor, pressure) = Monitor::new(
            rss,
            budget_bytes,
            config.memory.thresholds,
            config.memory.sample_interval,
        );
        let tasks = Tasks::new();
        tasks.spawn(monitor.run());
        tracing::info!(budget_bytes, "memory budget");
        let mut lower = Vec::new();
        if let Some(dir) = &config.cache.disk_dir {
            // A disk that cannot be opened costs the disk tier, never the service.
            match DiskBackend::open(dir, config.cache.disk_capacity_bytes).await {
                Ok(disk) => {
                    tracing::info!(dir = %dir.display(), capacity_bytes = config.cache.disk_capacity_bytes, "disk tier open");
                    lower.push(Tier::new("disk", disk, &tasks));
                }
                Err(e) => {
                    tracing::error!(error = %e, "disk tier unavailable: serving from memory and upstream")
                }
            }
        }
        let tier = TieredCache::new(
            MemoryTier::new(
                config.cache.memory_capacity_bytes,
                config.cache.stale_retention,
            ),
            lower,
        );
        let upstream = Upstream::new(&config.upstream)?;
        let proxy = Arc::new(Proxy::new(
            tier,
            upstream,
            metrics.clone(),
            config.cache.clone(),
            pressure.clone(),
            ReservationPool::new(match config.memory.inflight_fill_bytes {
                0 => budget_bytes / 4,
                n => n,
            }),
        ));
        tasks.spawn(crate::relief::run(
            pressure.clone(),
            proxy.clone(),
            metrics.clone(),
            config.memory.evict_to,
            config.memory.thresholds.bypass,
        ));
        let instance = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or_default();
        Ok(App {
            proxy,
            metrics,
            config,
            pressure,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            instance,
            next_request: AtomicU64::new(0),
        })
    }

    /// Marks the instance as draining (shutting down): `/health/ready` answers 503 `draining`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Which route serves `path`: a built-in path, else the route with the longest matching
    /// prefix.
    fn route_of(&self, path: &str) -> Route {
        match path {
            "/image-proxy" => Route::ImageProxy,
            "/health" | "/health/live" | "/health/ready" => Route::Health,
            "/metrics" => Route::Metrics,
            _ => self
                .config
                .routes
                .iter()
                .enumerate()
                .filter(|(_, r)| path.starts_with(&r.prefix))
                .max_by_key(|(_, r)| r.prefix.len())
                .map_or(Route::Other, |(index, r)| Route::Proxied {
                    index,
                    name: r.name,
                }),
        }
    }

    /// Answers one request. Never fails: errors become JSON responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<LoggedBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let route = self.route_of(req.uri().path());
        let id = self.request_id(&req);
        let span = tracing::info_span!(
            "request",
            id = %id.to_str().unwrap_or_default(),
            route = route.name(),
            method = %req.method(),
            cache = Empty,
            upstream_status = Empty,
        );
        let result = self.dispatch(route, req).instrument(span.clone()).await;
        let (mut response, error) = match result {
            Ok(r) => (r, None),
            Err(e) => {
                let message = e.to_string();
                (error_response(&e), Some(message))
            }
        };
        response.headers_mut().insert(REQUEST_ID.clone(), id);
        let status = response.status().as_u16();
        self.metrics.request(route.name(), status);
        response.map(|inner| LoggedBody {
            inner,
            span,
            log: Some(AccessLog {
                start,
                status,
                bytes: 0,
                error,
                enabled: self.config.log.access,
                metrics: self.metrics.clone(),
            }),
        })
    }

    async fn dispatch<B>(
        &self,
        route: Route,
        req: Request<B>,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method().as_str() == "PURGE" {
            self.authorize_purge(&req)?;
            let key = match route {
                Route::ImageProxy => CacheKey::for_url(&target::parse_image_url(
                    req.uri().query(),
                    self.config.server.max_url_bytes,
                )?),
                Route::Proxied { index, .. } => {
                    CacheKey::for_url(&route_url(&self.config.routes[index].upstream, req.uri())?)
                }
                _ => {
                    return Err(ProxyError::NotFound(
                        "nothing cacheable at this path".into(),
                    ));
                }
            };
            let purged = self.proxy.purge(&key).await;
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "purged": purged as u32 }),
            ));
        }
        if req.uri().path() == PURGE_PATH {
            return self.purge_urls(req).await;
        }
        if matches!(route, Route::ImageProxy | Route::Proxied { .. })
            && self.pressure.borrow().level.sheds()
        {
            self.metrics
                .shed
                .get_or_create(&metrics::ReasonLabels { reason: "memory" })
                .inc();
            return Err(ProxyError::Overloaded);
        }
        match route {
            Route::ImageProxy => {
                let head = get_or_head(req.method())?;
                let url =
                    target::parse_image_url(req.uri().query(), self.config.server.max_url_bytes)?;
                self.proxy
                    .handle(proxy_request(
                        &req,
                        url,
                        Some(self.config.cache.default_ttl),
                        Guard::Guarded,
                        head,
                        Forwarding::Bare,
                    ))
                    .await
            }
            Route::Proxied { index, name } => {
                let route = &self.config.routes[index];
                let url = route_url(&route.upstream, req.uri())?;
                // Public Supabase objects need no credentials, and supabase-js sends its key with
                // every request: dropping them keeps public objects storable (RFC 9111 §3.5).
                let public_object =
                    name == "supabase" && req.uri().path().starts_with(SUPABASE_PUBLIC_PREFIX);
                let credentials = [AUTHORIZATION, APIKEY.clone(), COOKIE];
                let dropped: &[HeaderName] = if public_object { &credentials } else { &[] };
                let headers = end_to_end(req.headers(), dropped);
                match *req.method() {
                    Method::GET | Method::HEAD => {
                        let head = req.method() == Method::HEAD;
                        let forwarding = Forwarding::Headers {
                            headers,
                            strip_set_cookie: public_object,
                        };
                        self.proxy
                            .handle(proxy_request(
                                &req,
                                url,
                                route.default_ttl,
                                Guard::Trusted,
                                head,
                                forwarding,
                            ))
                            .await
                    }
                    _ => {
                        let method = req.method().clone();
                        let body = req.into_body().map_err(Into::into).boxed_unsync();
                        self.proxy.forward(method, url, headers, body).await
                    }
                }
            }
            Route::Health => {
                get_or_head(req.method())?;
                let level = self.pressure.borrow().level;
                Ok(match req.uri().path() {
                    // Liveness: the process answers.
                    "/health/live" => {
                        json_response(StatusCode::OK, &serde_json::json!({ "status": "live" }))
                    }
                    // Readiness: take this instance out while it sheds load or shuts down.
                    "/health/ready" if self.draining.load(Ordering::Relaxed) => json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({ "status": "draining", "level": level }),
                    ),
                    "/health/ready" if level.sheds() => json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({ "status": "not-ready", "level": level }),
                    ),
                    "/health/ready" => json_response(
                        StatusCode::OK,
                        &serde_json::json!({ "status": "ready", "level": level }),
                    ),
                    _ => self.health().await,
                })
            }
            Route::Metrics => {
                get_or_head(req.method())?;
                Ok(self.metrics_text().await)
            }
            Route::Other => Err(ProxyError::NotFound(format!(
                "no route for {}",
                req.uri().path()
            ))),
        }
    }

    /// Checks `Authorization: Bearer <[admin] token>` for purging.
    ///
    /// # Errors
    /// [`ProxyError::NotFound`] when purging is disabled, [`ProxyError::Unauthorized`] when the
    /// token is missing or wrong.
    fn authorize_purge<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        let Some(token) = &self.config.admin.token else {
            return Err(ProxyError::NotFound(
                "purging is disabled: [admin] token is not set".into(),
            ));
        };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Compared in constant time: the comparison must not reveal how much of a guess matched.
        let equal = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if equal {
            Ok(())
        } else {
            Err(ProxyError::Unauthorized)
        }
    }

    /// `POST /_imgedge/purge` with `{"urls": ["http://...", ...]}`: purges `/image-proxy` targets.
    async fn purge_urls<B>(&self, req: Request<B>) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed(req.method().clone()));
        }
        self.authorize_purge(&req)?;
        let body = http_body_util::Limited::new(req.into_body(), PURGE_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequest(format!("cannot read the body: {e}")))?
            .to_bytes();
        #[derive(serde::Deserialize)]
        struct Purge {
            urls: Vec<String>,
        }
        let purge: Purge = serde_json::from_slice(&body)
            .map_err(|e| ProxyError::BadRequest(format!("expected {{\"urls\": [...]}}: {e}")))?;
        let mut keys = Vec::with_capacity(purge.urls.len());
        for url in &purge.urls {
            let url = Url::parse(url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    ProxyError::BadRequest(format!("not an absolute http(s) URL: {url:?}"))
                })?;
            keys.push(CacheKey::for_url(&url));
        }
        let mut purged = 0u32;
        for key in &keys {
            purged += self.proxy.purge(key).await as u32;
        }
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "purged": purged, "urls": keys.len() }),
        ))
    }

    async fn health(&self) -> Response<ProxyBody> {
        let memory = self.proxy.tier().memory().usage().await;
        let reading = *self.pressure.borrow();
        // Every tier by name; `disk` always, all zero when there is none.
        let mut cache = serde_json::json!({ "memory": memory, "disk": TierUsage::default() });
        for tier in self.proxy.tier().lower() {
            cache[tier.name()] = serde_json::json!(tier.usage());
        }
        let (inflight_count, inflight_oldest) = self.proxy.inflight(20);
        let (status, code) = match reading.level {
            l if l.sheds() => ("critical", StatusCode::SERVICE_UNAVAILABLE),
            l if l >= Level::Warning => ("degraded", StatusCode::OK),
            _ => ("ok", StatusCode::OK),
        };
        let body = serde_json::json!({
            "status": status,
            "memory": reading,
            "inflight": {
                "count": inflight_count,
                "oldest": inflight_oldest
                    .iter()
                    .map(|(url, age)| serde_json::json!({ "url": url.as_ref(), "age_ms": age.as_millis() as u64 }))
                    .collect::<Vec<_>>(),
            },
            "fills": {
                "reserved_bytes": self.proxy.fills().used_bytes(),
                "capacity_bytes": self.proxy.fills().capacity_bytes(),
                "limit_bytes": self.proxy.fills().limit_bytes(),
            },
            "cache": cache,
            "draining": self.draining.load(Ordering::Relaxed),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        json_response(code, &body)
    }

    async fn metrics_text(&self) -> Response<ProxyBody> {
        let memory = self.proxy.tier().memory().usage().await;
        let lower: Vec<TierUsage> = self.proxy.tier().lower().iter().map(Tier::usage).collect();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let tiers = std::iter::once(("memory", memory.bytes, memory.entries))
            .chain(lower.iter().map(|t| (t.name, t.bytes, t.entries)));
        for (tier, bytes, entries) in tiers {
            let tier = metrics::TierLabels { tier };
            self.metrics
                .cache_bytes
                .get_or_create(&tier)
                .set(gauge(bytes));
            self.metrics
                .cache_entries
                .get_or_create(&tier)
                .set(gauge(entries));
        }
        let reading = *self.pressure.borrow();
        self.metrics.rss_bytes.set(gauge(reading.rss_bytes));
        self.metrics.budget_bytes.set(gauge(reading.budget_bytes));
        self.metrics
            .inflight_upstream
            .set(self.proxy.inflight(0).0 as i64);
        self.metrics.pressure_level.set(reading.level.as_number());
        if let Some(disk) = lower.iter().find(|t| t.name == "disk") {
            for (event, n) in [
                ("writes", disk.writes),
                ("write_drops", disk.write_drops),
                ("errors", disk.errors),
            ] {
                self.metrics
                    .disk_events
                    .get_or_create(&metrics::DiskEventLabels { event })
                    .set(gauge(n));
            }
        }
        let mut response = Response::new(ProxyBody::full(self.metrics.encode()));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    /// The client's `X-Request-Id` when it is 1–64 characters of `[A-Za-z0-9._-]`, else a new one.
    fn request_id<B>(&self, req: &Request<B>) -> HeaderValue {
        if let Some(v) = req.headers().get(&REQUEST_ID) {
            let b = v.as_bytes();
            if (1..=64).contains(&b.len())
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
            {
                return v.clone();
            }
        }
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{:08x}{n:08x}", self.instance)).expect("hex is ASCII")
    }
}

fn get_or_head(method: &Method) -> Result<bool, ProxyError> {
    match *method {
        Method::GET => Ok(false),
        Method::HEAD => Ok(true),
        ref m => Err(ProxyError::MethodNotAllowed(m.clone())),
    }
}

fn proxy_request<B>(
    req: &Request<B>,
    url: Url,
    default_ttl: Option<std::time::Duration>,
    guard: Guard,
    head: bool,
    forwarding: Forwarding,
) -> ProxyRequest {
    ProxyRequest {
        key: CacheKey::for_url(&url),
        primary: CacheKey::for_url(&url),
        url,
        guard,
        head,
        if_none_match: req.headers().get(IF_NONE_MATCH).cloned(),
        range: req.headers().get(http::header::RANGE).cloned(),
        if_range: req.headers().get(http::header::IF_RANGE).cloned(),
        directives: RequestDirectives::parse(req.headers()),
        default_ttl,
        forwarding,
    }
}

/// `upstream` + the request's path and query.
///
/// # Errors
/// [`ProxyError::BadPath`] for `.`/`..` segments (raw or percent-encoded) and backslashes: URL
/// parsing would resolve them, letting a path climb out of its route's prefix upstream.
fn route_url(upstream: &Url, uri: &Uri) -> Result<Url, ProxyError> {
    for segment in uri.path().split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        if decoded == "." || decoded == ".." || decoded.contains('\\') {
            return Err(ProxyError::BadPath(format!(
                "path segment {segment:?} is not allowed"
            )));
        }
    }
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let joined = format!(
        "{}{path_and_query}",
        upstream.as_str().trim_end_matches('/')
    );
    Url::parse(&joined).map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))
}

/// `{"error": code, "message": text}` with the error's status; never cached downstream.
fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let (status, code) = e.status();
    let body = serde_json::json!({ "error": code, "message": e.to_string() });
    let mut response = json_response(status, &body);
    if matches!(e, ProxyError::Overloaded) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if matches!(e, ProxyError::MethodNotAllowed(_)) {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(ProxyBody::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What the access line reports once a response body is done.
struct AccessLog {
    start: Instant,
    status: u16,
    bytes: u64,
    /// The error message of an error response.
    error: Option<String>,
    enabled: bool,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// `outcome`: `complete`, `aborted` (the body failed) or `client-gone` (dropped unfinished).
    fn finish(self, span: &Span, outcome: &'static str) {
        self.metrics.response_bytes.inc_by(self.bytes);
        if self.enabled {
            let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
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
pub struct LoggedBody {
    inner: ProxyBody,
    /// The request's span, entered while the body is polled.
    span: Span,
    /// Taken when the access line is written, so it is written once.
    log: Option<AccessLog>,
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
