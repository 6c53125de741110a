//! A complete object for work that needs every byte of it before it can start (image transforms
//! decode from the whole source), obtained the way a client's GET would be — tiers,
//! revalidation, collapsed forwarding, storing — but read to its end here instead of streamed
//! to a client. And what such work stores of its own (source records, renditions), under keys
//! derived from the object's ([`CacheKey::source_record`], [`CacheKey::rendition`]): in the same
//! tiers, by the same pressure rules, served as any hit is.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

use super::hit::hit_response;
use super::{CacheStatus, Proxy, ProxyRequest};
use crate::body::ProxyBody;
use crate::cache::{CacheKey, CachedObject, Found};
use crate::error::ProxyError;
use crate::freshness::{self, Freshness, RequestFacts, ResponseTimes};
use crate::pressure::Reservation;
use crate::tee::TeeBody;

/// The first bytes of an object, read from the origin without storing anything (see
/// [`Proxy::leading_bytes`]).
#[derive(Debug)]
pub(crate) struct LeadingBytes {
    /// The end-to-end headers of the origin's answer (a 206's describe the whole
    /// representation but for `Content-Length` and `Content-Range`).
    pub headers: HeaderMap,
    /// The first bytes: at least the number asked for, unless the object is shorter.
    pub bytes: Bytes,
    /// The object's whole length, when the origin said it (`Content-Range`, or a 200's
    /// `Content-Length`).
    pub total_bytes: Option<u64>,
    /// `bytes` is the whole object.
    pub whole: bool,
}

/// A whole response: what `GET` of the object would have served.
#[derive(Debug)]
pub(crate) struct SourceObject {
    /// 200, or whatever the origin (or the tier) answered: a stored 404 is a `SourceObject` too.
    pub status: StatusCode,
    /// The headers a client would have been served, `Cache-Status` included.
    pub headers: HeaderMap,
    /// Every byte of the body.
    pub body: Bytes,
    /// The in-flight bytes this body holds when it was collected for this caller alone (not a
    /// hit, not a shared fill that went into the tiers); returned to the pool when dropped, so
    /// hold it as long as the body (held for its drop: read only by tests).
    #[allow(dead_code)]
    pub reservation: Option<Reservation>,
}

/// A source as work that reads it as it arrives gets it ([`Proxy::source_stream`]).
pub(crate) struct SourceStream {
    /// 200, or whatever the origin (or the tier) answered.
    pub status: StatusCode,
    /// The headers a client would have been served, `Cache-Status` included.
    pub headers: HeaderMap,
    /// The whole body when it is in memory already (a hit); otherwise the body as it streams
    /// (a fill being stored, or a miss that is not).
    pub body: ProxyBody,
    /// The body's length, when known.
    pub length: Option<u64>,
}

impl Proxy {
    /// `req`'s object as a `GET` without validators or ranges gets it (tiers, collapsed
    /// forwarding, storing), its body left to the caller to read as it arrives: nothing is
    /// collected here, so a source that is not stored is never held whole.
    ///
    /// # Errors
    /// What [`Proxy::handle`] returns; [`ProxyError::TooLarge`] when the body announces more
    /// than `max_bytes`.
    pub(crate) async fn source_stream(
        self: &Arc<Self>,
        mut req: ProxyRequest,
        max_bytes: u64,
    ) -> Result<SourceStream, ProxyError> {
        req.head = false;
        req.if_none_match = None;
        req.range = None;
        req.if_range = None;
        let (parts, body) = self.handle(req).await?.into_parts();
        let length = http_body::Body::size_hint(&body).exact();
        if let Some(n) = length.filter(|&n| n > max_bytes) {
            return Err(ProxyError::TooLarge(format!(
                "the source is {n} bytes, over the limit of {max_bytes}"
            )));
        }
        Ok(SourceStream {
            status: parts.status,
            headers: parts.headers,
            body,
            length,
        })
    }

    /// `req`'s object, complete, as a `GET` without validators or ranges gets it: from a tier,
    /// from a fill in flight (collapsed forwarding: concurrent callers and clients share one
    /// origin request), or from the origin, storing it as any miss is. A shared fill's body is
    /// its own buffer (no copy); any other miss is read into one buffer reserved from the fill
    /// reservation pool before it is held.
    ///
    /// # Errors
    /// What [`Proxy::handle`] returns; [`ProxyError::TooLarge`] when the body is (or announces)
    /// more than `max_bytes`; [`ProxyError::Overloaded`] when the pool cannot hold it;
    /// [`ProxyError::Upstream`] when the body fails before its end.
    pub(crate) async fn source(
        self: &Arc<Self>,
        mut req: ProxyRequest,
        max_bytes: u64,
    ) -> Result<SourceObject, ProxyError> {
        req.head = false;
        req.if_none_match = None;
        req.range = None;
        req.if_range = None;
        let (parts, body) = self.handle(req).await?.into_parts();
        let too_large = |bytes: u64| {
            ProxyError::TooLarge(format!(
                "the source is {bytes} bytes or more, over the limit of {max_bytes}"
            ))
        };
        let (body, reservation) = match body {
            ProxyBody::Full(bytes) => (bytes.unwrap_or_default(), None),
            ProxyBody::Shared(reader) => {
                if reader.remaining_bytes() > max_bytes {
                    return Err(too_large(reader.remaining_bytes()));
                }
                (reader.complete().await?, None)
            }
            ProxyBody::Tee(tee) => {
                let (body, reservation) = self.collect(*tee, max_bytes, too_large).await?;
                (body, Some(reservation))
            }
            ProxyBody::Prefixed(..) => {
                return Err(ProxyError::Upstream(
                    "a prefixed body is not a source (Proxy::handle makes none)".into(),
                ));
            }
        };
        Ok(SourceObject {
            status: parts.status,
            headers: parts.headers,
            body,
            reservation,
        })
    }

    /// Whether `key`'s object is stored in a tier (fresh or stale; see
    /// [`crate::cache::TieredCache::contains`]). Reads nothing.
    pub(crate) fn holds(&self, key: &CacheKey) -> bool {
        self.tier.contains(key)
    }

    /// The first `n` bytes (or more, up to one read more) of `req`'s object, from the origin,
    /// stored nowhere: asked for with `Range: bytes=0-{n-1}` (RFC 9110 §14.2), and from an
    /// origin that ignores it (200) only the first `n` bytes are read before the connection is
    /// dropped. `/image-proxy`'s content checks apply as to any fetch.
    ///
    /// # Errors
    /// [`ProxyError::NotFound`] for a 404 or 410; [`ProxyError::Upstream`] for any other
    /// status than 200 and 206, or a failed fetch; `/image-proxy`'s content errors.
    pub(crate) async fn leading_bytes(
        &self,
        req: &ProxyRequest,
        n: usize,
    ) -> Result<LeadingBytes, ProxyError> {
        let mut headers = req.forwarding.upstream_headers();
        headers.insert(
            http::header::RANGE,
            http::HeaderValue::from_str(&format!("bytes=0-{}", n.max(1) - 1)).expect("ASCII"),
        );
        headers.remove(http::header::IF_RANGE);
        let mut req = req.clone();
        req.head = false;
        let mut upstream = self.send(&req, headers).await?;
        let status = upstream.head.status;
        match status {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Err(ProxyError::NotFound(format!(
                    "the origin answered {status}"
                )));
            }
            s => return Err(ProxyError::Upstream(format!("the origin answered {s}"))),
        }
        if matches!(req.forwarding, super::Forwarding::Bare) {
            self.check_image(&req, &mut upstream).await?;
        }
        let bytes = upstream.body.peek(n).await?;
        let total_bytes = if status == StatusCode::PARTIAL_CONTENT {
            upstream
                .head
                .headers
                .get(http::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, total)| total.trim().parse().ok())
        } else {
            upstream.head.content_length
        };
        let whole = total_bytes == Some(bytes.len() as u64);
        let mut headers = req.forwarding.response_headers(&upstream.head.headers);
        super::add_date(&mut headers, upstream.head.times.response_time);
        Ok(LeadingBytes {
            headers,
            bytes,
            total_bytes,
            whole,
        })
    }

    /// The object stored under a derived key (a source record, a rendition), fresh or stale,
    /// from the first tier that has it; counted as a lookup of each tier it was asked of.
    pub(crate) async fn lookup_derived(&self, key: &CacheKey) -> Option<Found> {
        let found = self.tier.lookup(key).await;
        for (i, name) in self.tier.tier_names().enumerate() {
            match &found {
                Some(f) if i > f.tier => break,
                Some(f) => self.metrics.cache_lookup(name, i == f.tier),
                None => self.metrics.cache_lookup(name, false),
            }
        }
        found
    }

    /// Stores an object under a derived key in every tier, unless memory pressure is at bypass
    /// or above or its body is larger than `[cache] max_cacheable_bytes` (what is derived obeys
    /// the limits of what is fetched); returns whether it was stored.
    pub(crate) async fn store_derived(&self, key: CacheKey, object: CachedObject) -> bool {
        if !self.pressure.borrow().level.stores()
            || object.body.len() as u64 > self.cache.max_cacheable_bytes
        {
            return false;
        }
        self.tier.insert(key, object).await;
        true
    }

    /// How fresh `req`'s object is to a cache that received `status` and `headers` (as
    /// [`Proxy::source`] served them, `Age` included) just now, by the rules and the route's
    /// policy an object is stored by (RFC 9111 §3, §4.2); `None` when it may not be stored:
    /// what is derived from it may not be either.
    pub(crate) fn derived_freshness(
        &self,
        req: &ProxyRequest,
        status: StatusCode,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Option<Freshness> {
        freshness::storable(
            status,
            headers,
            RequestFacts {
                authorized: req.forwarding.facts().authorized,
                forwarded_client_headers: false,
            },
            ResponseTimes {
                request_time: now,
                response_time: now,
            },
            self.cache
                .freshness_policy(req.default_ttl)
                .valid_until(req.expires_at),
        )
        .ok()
    }

    /// A stored derived object served as a hit is: 304 for a matching `If-None-Match`, one
    /// byte range as 206, HEAD without a body, `Age` and `cache_status` (RFC 9111 §4, RFC 9110
    /// §13, §14), by `req`'s conditionals.
    pub(crate) fn serve_stored(
        &self,
        object: &CachedObject,
        req: &ProxyRequest,
        now: SystemTime,
        cache_status: CacheStatus,
    ) -> Response<ProxyBody> {
        cache_status.record_in_span();
        hit_response(object, req, now, cache_status)
    }

    /// Reads a streaming body to its end into one buffer, reserving its bytes first (all of
    /// them when the length is known, else as they come).
    async fn collect(
        &self,
        mut tee: TeeBody,
        max_bytes: u64,
        too_large: impl Fn(u64) -> ProxyError,
    ) -> Result<(Bytes, Reservation), ProxyError> {
        let announced = tee.remaining_bytes();
        if let Some(n) = announced.filter(|&n| n > max_bytes) {
            return Err(too_large(n));
        }
        let mut reservation = self
            .fills
            .try_reserve(announced.unwrap_or(0))
            .ok_or(ProxyError::Overloaded)?;
        let mut body = Vec::with_capacity(announced.unwrap_or(0) as usize);
        while let Some(chunk) = poll_fn(|cx| tee.poll_chunk(cx)).await {
            let chunk = chunk?;
            let size = (body.len() + chunk.len()) as u64;
            if size > max_bytes {
                return Err(too_large(size));
            }
            if announced.is_none() && !reservation.grow(chunk.len() as u64) {
                return Err(ProxyError::Overloaded);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((Bytes::from(body), reservation))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::cache::{MemoryTier, TieredCache};
    use crate::collapse::Collapser;
    use crate::config::Config;
    use crate::freshness::RequestDirectives;
    use crate::metrics::Metrics;
    use crate::pressure::{Level, Reading, ReservationPool};
    use crate::proxy::{Forwarding, ProxyParts};
    use crate::tasks::Tasks;
    use crate::upstream::{Guard, Upstream};

    /// An origin on loopback answering every request with `body` (announced with
    /// `Content-Length` or chunked) after `delay`, counting requests.
    async fn origin(body: Vec<u8>, length: bool, delay: Duration) -> (url::Url, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            url::Url::parse(&format!("http://{}/a.jpg", listener.local_addr().unwrap())).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    let _ = stream.read(&mut head).await;
                    tokio::time::sleep(delay).await;
                    let framing = if length {
                        format!("Content-Length: {}", body.len())
                    } else {
                        "Transfer-Encoding: chunked".to_owned()
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: image/x-test\r\nCache-Control: max-age=600\r\n{framing}\r\nConnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    if length {
                        let _ = stream.write_all(&body).await;
                    } else {
                        let _ = stream
                            .write_all(format!("{:x}\r\n", body.len()).as_bytes())
                            .await;
                        let _ = stream.write_all(&body).await;
                        let _ = stream.write_all(b"\r\n0\r\n\r\n").await;
                    }
                });
            }
        });
        (url, hits)
    }

    fn proxy(tasks: &Tasks, max_cacheable_bytes: u64, fill_bytes: u64) -> Arc<Proxy> {
        let config = Config::from_toml(&format!(
            "[cache]\nmax_cacheable_bytes = {max_cacheable_bytes}\n[upstream]\nallowed_content_types = [\"image/x-test\"]"
        ))
        .unwrap();
        let (_tx, pressure) = tokio::sync::watch::channel(Reading {
            level: Level::Normal,
            rss_bytes: 0,
            budget_bytes: 1 << 30,
        });
        Arc::new(Proxy::new(ProxyParts {
            tier: TieredCache::new(MemoryTier::new(64 << 20, Duration::ZERO), Vec::new()),
            collapser: Arc::new(Collapser::new(tasks.clone())),
            fills: ReservationPool::new(fill_bytes),
            upstream: Arc::new(
                Upstream::new(
                    &config.upstream,
                    &crate::descriptors::DescriptorBudget::new(1 << 20, 100, 100),
                    tasks,
                )
                .unwrap(),
            ),
            metrics: Arc::new(Metrics::default()),
            cache: config.cache,
            pressure,
            tasks: tasks.clone(),
            content: crate::proxy::content::ContentPolicy::new(&config.upstream),
        }))
    }

    fn request(url: &url::Url) -> ProxyRequest {
        ProxyRequest {
            expires_at: None,
            key: crate::cache::CacheKey::new("image-proxy", url),
            primary: crate::cache::CacheKey::new("image-proxy", url),
            url: url.clone(),
            guard: Guard::Trusted,
            head: true,
            if_none_match: Some(http::HeaderValue::from_static("*")),
            range: Some(http::HeaderValue::from_static("bytes=0-1")),
            if_range: None,
            directives: RequestDirectives::default(),
            default_ttl: None,
            forwarding: Forwarding::Bare,
            placement: crate::cache::Placement::Everywhere,
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_the_next_is_a_hit() {
        let tasks = Tasks::new();
        let body = pattern(300_000);
        let (url, hits) = origin(body.clone(), true, Duration::from_millis(100)).await;
        let proxy = proxy(&tasks, 5 << 20, 64 << 20);
        let (a, b) = tokio::join!(
            proxy.source(request(&url), 1 << 20),
            proxy.source(request(&url), 1 << 20)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(hits.load(Ordering::SeqCst), 1, "one origin request");
        assert_eq!((a.status, &a.body[..]), (StatusCode::OK, &body[..]));
        assert_eq!(b.body, a.body);
        assert!(a.reservation.is_none() && b.reservation.is_none());
        let c = proxy.source(request(&url), 1 << 20).await.unwrap();
        assert_eq!(c.headers["cache-status"], "imgedge; hit; detail=memory");
        assert_eq!(c.body, a.body);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        tasks.shutdown().await;
    }

    #[tokio::test]
    async fn an_unstorable_source_is_collected_whole_under_a_reservation() {
        let tasks = Tasks::new();
        // Over max_cacheable_bytes and without a length: streamed, not stored, collected here.
        let body = pattern(200_000);
        let (url, hits) = origin(body.clone(), false, Duration::ZERO).await;
        let proxy = proxy(&tasks, 100_000, 1 << 20);
        let got = proxy.source(request(&url), 1 << 20).await.unwrap();
        assert_eq!(&got.body[..], &body[..]);
        assert_eq!(proxy.fills.used_bytes(), 200_000, "held while the body is");
        drop(got);
        assert_eq!(proxy.fills.used_bytes(), 0);
        proxy.source(request(&url), 1 << 20).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 2, "not stored: fetched again");
        tasks.shutdown().await;
    }

    #[tokio::test]
    async fn a_source_over_the_limit_or_the_pool_is_refused() {
        let tasks = Tasks::new();
        let (announced, _) = origin(pattern(50_000), true, Duration::ZERO).await;
        let (chunked, _) = origin(pattern(50_000), false, Duration::ZERO).await;
        let proxy = proxy(&tasks, 10_000, 1 << 20);
        for url in [&announced, &chunked] {
            let e = proxy.source(request(url), 40_000).await.unwrap_err();
            assert!(matches!(e, ProxyError::TooLarge(_)), "{url}: {e:?}");
        }
        let small_pool = self::proxy(&tasks, 10_000, 1_000);
        for url in [&announced, &chunked] {
            let e = small_pool.source(request(url), 1 << 20).await.unwrap_err();
            assert!(matches!(e, ProxyError::Overloaded), "{url}: {e:?}");
        }
        tasks.shutdown().await;
    }
}
