//! The operator's endpoints: purging (`PURGE` on a proxied path, `POST /_imgedge/purge`),
//! `/health`, `/health/live`, `/health/ready` and `/metrics`. They read the same handles the
//! proxy and relief act on (the tiers, the fill reservation pool, the upstream clients, the
//! pressure readings), never the proxy itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;
use url::Url;

use super::json_response;
use super::routes::{IMAGE_PROXY_NAMESPACE, Routes};
use crate::body::ProxyBody;
use crate::cache::breaker::BreakerState;
use crate::cache::{CacheKey, INDEX_CAPACITY_BYTES, Tier, TierUsage, TieredCache};
use crate::connections::Connections;
use crate::descriptors::{self, DescriptorBudget};
use crate::error::ProxyError;
use crate::metrics::{self, Metrics};
use crate::pressure::{Level, Reading, ReservationPool};
use crate::upstream::{BoxError, Upstream};

/// The bulk purge endpoint.
pub(crate) const PURGE_PATH: &str = "/_imgedge/purge";
/// Largest accepted bulk purge body, in bytes.
const PURGE_BODY_BYTES: usize = 1 << 20;
/// In-flight fetches listed by `/health`, oldest first.
const HEALTH_INFLIGHT_LISTED: usize = 20;

/// What the admin endpoints read.
pub(crate) struct Admin {
    pub tier: TieredCache,
    pub fills: Arc<ReservationPool>,
    pub upstream: Arc<Upstream>,
    pub pressure: watch::Receiver<Reading>,
    pub metrics: Arc<Metrics>,
    /// `[admin] token`: purging needs it; without one, purging is off.
    pub token: Option<String>,
    /// Set when shutdown begins: `/health/ready` answers 503 from then on.
    pub draining: AtomicBool,
    pub started: Instant,
    /// The open client connections: `/health/ready` answers 503 `full` at the limit.
    pub connections: Arc<Connections>,
    /// How the descriptor limit is shared (`descriptors.rs`), shown in `/health` and `/metrics`.
    pub descriptors: DescriptorBudget,
    /// The transform pool (shared with the render route), for its queue and turns.
    pub transforms: crate::transform::Pool,
}

impl Admin {
    /// Marks the instance as draining (shutting down): `/health/ready` answers 503 `draining`.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Checks `Authorization: Bearer <[admin] token>` for purging.
    ///
    /// # Errors
    /// [`ProxyError::NotFound`] when purging is disabled, [`ProxyError::Unauthorized`] when the
    /// token is missing or wrong.
    pub(crate) fn authorize_purge(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        if self.token.is_none() {
            return Err(ProxyError::NotFound(
                "purging is disabled: [admin] token is not set".into(),
            ));
        }
        if self.is_admin(headers) {
            Ok(())
        } else {
            Err(ProxyError::Unauthorized)
        }
    }

    /// Whether `headers` carry `Authorization: Bearer <[admin] token>` (false without a token).
    fn is_admin(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Compared in constant time: the comparison must not reveal how much of a guess matched.
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Removes the object, any pass marker and its renditions under `key` from every tier;
    /// returns whether the object or a record of its renditions was stored in any (a source
    /// read only by transforms is not kept in memory: see `[transform] sources_in_memory`).
    pub(crate) async fn purge(&self, key: &CacheKey) -> bool {
        let existed = self.tier.contains(key) || self.tier.contains(&key.source_record());
        self.tier.invalidate(key).await;
        tracing::info!(key = key.as_str(), existed, "purged");
        existed
    }

    /// `PURGE` of one object: `{"purged": 0|1}`.
    pub(crate) async fn purge_one(&self, key: &CacheKey) -> Response<ProxyBody> {
        let purged = self.purge(key).await;
        json_response(
            StatusCode::OK,
            &serde_json::json!({ "purged": purged as u32 }),
        )
    }

    /// `POST /_imgedge/purge` with `{"urls": ["http://...", ...], "paths": ["/...", ...]}`
    /// (either may be left out): purges `/image-proxy` targets (`urls`) and the objects the
    /// routes of `routes` serve at `paths` (a request path and query, as a client sends it:
    /// `/storage/v1/object/public/b/a.jpg`, `/image-proxy?url=...`).
    ///
    /// # Errors
    /// [`ProxyError::MethodNotAllowed`], the purge authorization's, and
    /// [`ProxyError::BadRequest`] for a body that is not that JSON, or an entry that names no
    /// stored object (nothing is purged then).
    pub(crate) async fn purge_urls<B>(
        &self,
        req: Request<B>,
        routes: &Routes,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed(req.method().clone()));
        }
        self.authorize_purge(req.headers())?;
        let body = http_body_util::Limited::new(req.into_body(), PURGE_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequest(format!("cannot read the body: {e}")))?
            .to_bytes();
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            #[serde(default)]
            urls: Vec<String>,
            #[serde(default)]
            paths: Vec<String>,
        }
        let purge: Purge = serde_json::from_slice(&body).map_err(|e| {
            ProxyError::BadRequest(format!(
                "expected {{\"urls\": [...], \"paths\": [...]}}: {e}"
            ))
        })?;
        let mut keys = Vec::with_capacity(purge.urls.len() + purge.paths.len());
        for url in &purge.urls {
            let url = Url::parse(url)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    ProxyError::BadRequest(format!("not an absolute http(s) URL: {url:?}"))
                })?;
            keys.push(CacheKey::new(IMAGE_PROXY_NAMESPACE, &url));
        }
        for path in &purge.paths {
            let bad = |why: String| ProxyError::BadRequest(format!("path {path:?}: {why}"));
            let uri = path
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.scheme().is_none() && path.starts_with('/'))
                .ok_or_else(|| bad("not a request path".to_owned()))?;
            let key = routes
                .purge_key(routes.route_of(uri.path()), &uri)
                .map_err(|e| bad(e.to_string()))?;
            keys.push(key);
        }
        let mut purged = 0u32;
        for key in &keys {
            purged += self.purge(key).await as u32;
        }
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "purged": purged, "urls": keys.len() }),
        ))
    }

    /// `/health/live` (the process answers), `/health/ready` (503 `draining` while shutting
    /// down, `full` while `max_connections` are open, `not-ready` while shedding load) or `/health`
    /// (everything: pressure, in-flight fetches and fills, every tier; the in-flight fetches as
    /// a count and the oldest one's age, and their URLs only when `headers` carry the admin
    /// token).
    pub(crate) async fn health(&self, path: &str, headers: &HeaderMap) -> Response<ProxyBody> {
        let level = self.pressure.borrow().level;
        match path {
            "/health/live" => {
                json_response(StatusCode::OK, &serde_json::json!({ "status": "live" }))
            }
            "/health/ready" if self.draining.load(Ordering::Relaxed) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "draining", "level": level }),
            ),
            "/health/ready" if self.connections.is_full() => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "status": "full",
                    "level": level,
                    "connections": self.connections.open(),
                }),
            ),
            "/health/ready" if level.sheds() => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "not-ready", "level": level }),
            ),
            "/health/ready" => json_response(
                StatusCode::OK,
                &serde_json::json!({ "status": "ready", "level": level }),
            ),
            _ => self.health_report(self.is_admin(headers)).await,
        }
    }

    async fn health_report(&self, admin: bool) -> Response<ProxyBody> {
        let memory = self.tier.memory().usage().await;
        let (index_entries, index_bytes) = self.tier.index_usage().await;
        let reading = *self.pressure.borrow();
        // Every tier by name; `disk` and `shared` always, all zero when there is none (and the
        // shared tier's state `off`).
        let mut cache = serde_json::json!({
            "memory": memory,
            "disk": TierUsage::default(),
            "shared": TierUsage {
                state: Some("off"),
                ..TierUsage::default()
            },
            "indexes": {
                "entries": index_entries,
                "bytes": index_bytes,
                "capacity_bytes": 2 * INDEX_CAPACITY_BYTES,
            },
        });
        for tier in self.tier.lower() {
            cache[tier.name()] = serde_json::json!(tier.usage());
        }
        let (inflight_count, inflight_oldest) = self.upstream.inflight(HEALTH_INFLIGHT_LISTED);
        // Without the admin token: how many and how old, never where (origin hosts, ports and
        // other users' paths are the operator's business).
        let oldest_age_ms = inflight_oldest
            .first()
            .map_or(0, |(_, age)| age.as_millis() as u64);
        let mut inflight = serde_json::json!({
            "count": inflight_count,
            "oldest_age_ms": oldest_age_ms,
        });
        if admin {
            inflight["oldest"] = inflight_oldest
                .iter()
                .map(|(url, age)| serde_json::json!({ "url": &**url, "age_ms": age.as_millis() as u64 }))
                .collect();
        }
        let (status, code) = match reading.level {
            l if l.sheds() => ("critical", StatusCode::SERVICE_UNAVAILABLE),
            l if l >= Level::Warning => ("degraded", StatusCode::OK),
            _ => ("ok", StatusCode::OK),
        };
        let body = serde_json::json!({
            "status": status,
            "memory": reading,
            "inflight": inflight,
            "fills": {
                "reserved_bytes": self.fills.used_bytes(),
                "capacity_bytes": self.fills.capacity_bytes(),
                "limit_bytes": self.fills.limit_bytes(),
            },
            "transforms": self.transforms.stats(),
            "cache": cache,
            "draining": self.draining.load(Ordering::Relaxed),
            "connections": {
                "open": self.connections.open(),
                "max": self.connections.max(),
            },
            "upstream": {
                "in_flight": inflight_count,
                "max_in_flight": self.descriptors.max_in_flight,
                "sockets": self.upstream.open_sockets(),
                "max_sockets": self.descriptors.max_upstream_sockets,
            },
            "fds": {
                "open": descriptors::open_fds(),
                "limit": self.descriptors.fd_limit,
            },
            "uptime_seconds": self.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        });
        json_response(code, &body)
    }

    /// `/metrics`: the registry, with the gauges read now (tiers, RSS, budget, in-flight
    /// fetches, pressure level).
    pub(crate) async fn metrics_text(&self) -> Response<ProxyBody> {
        let memory = self.tier.memory().usage().await;
        let lower: Vec<TierUsage> = self.tier.lower().iter().map(Tier::usage).collect();
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
            .set(self.upstream.inflight(0).0 as i64);
        self.metrics.pressure_level.set(reading.level.as_number());
        self.metrics
            .connections_open
            .set(gauge(self.connections.open() as u64));
        self.metrics
            .fill_reserved_bytes
            .set(gauge(self.fills.used_bytes()));
        self.metrics
            .fill_limit_bytes
            .set(gauge(self.fills.limit_bytes()));
        self.metrics
            .fill_capacity_bytes
            .set(gauge(self.fills.capacity_bytes()));
        let pool = self.transforms.stats();
        self.metrics.transform_queue.set(gauge(pool.waiting as u64));
        self.metrics
            .transforms_running
            .set(gauge(pool.running as u64));
        self.metrics.transform_turns.set(gauge(pool.turns as u64));
        let d = &self.descriptors;
        self.metrics
            .connections_max
            .set(gauge(d.max_connections as u64));
        self.metrics
            .upstream_max_in_flight
            .set(gauge(d.max_in_flight as u64));
        self.metrics
            .upstream_sockets
            .set(gauge(self.upstream.open_sockets() as u64));
        self.metrics
            .upstream_max_sockets
            .set(gauge(d.max_upstream_sockets as u64));
        self.metrics.max_fds.set(gauge(d.fd_limit));
        if let Some(open) = descriptors::open_fds() {
            self.metrics.open_fds.set(gauge(open));
        }
        if let Some(disk) = lower.iter().find(|t| t.name == "disk") {
            for (event, n) in [
                ("writes", disk.writes),
                ("write_drops", disk.write_drops),
                ("errors", disk.errors),
            ] {
                self.metrics
                    .disk_events
                    .get_or_create(&metrics::TierEventLabels { event })
                    .set(gauge(n));
            }
        }
        let shared = lower.iter().find(|t| t.name == "shared");
        for (event, n) in [
            ("hits", shared.map_or(0, |t| t.hits)),
            ("misses", shared.map_or(0, |t| t.misses)),
            ("errors", shared.map_or(0, |t| t.errors)),
            ("writes", shared.map_or(0, |t| t.writes)),
            ("write_drops", shared.map_or(0, |t| t.write_drops)),
        ] {
            self.metrics
                .shared_events
                .get_or_create(&metrics::TierEventLabels { event })
                .set(gauge(n));
        }
        // -1: no shared tier.
        self.metrics.shared_breaker_state.set(
            shared
                .and_then(|t| t.state)
                .and_then(BreakerState::from_name)
                .map_or(-1, BreakerState::as_number),
        );
        let mut response = Response::new(ProxyBody::full(self.metrics.encode()));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}
