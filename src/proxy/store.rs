//! The store decision for a miss ([`Proxy::plan`]: whether and where its body is stored, and
//! its `Cache-Status`) and revalidation of a stored response ([`Proxy::revalidate`],
//! RFC 9111 §4.3).

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{
    AGE, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, SET_COOKIE,
};
use http::{HeaderMap, Response, StatusCode};
use tracing::Span;

use super::hit::hit_response;
use super::{CacheStatus, Forwarding, Proxy, ProxyRequest};
use crate::body::ProxyBody;
use crate::cache::{CachedObject, PassMarker};
use crate::error::ProxyError;
use crate::freshness;
use crate::tee::StoreTarget;
use crate::upstream::UpstreamHead;

impl Proxy {
    /// Validates a stored response that may not serve as it is (stale, or refused by the
    /// request's directives) with a conditional request (RFC 9111 §4.3.1). A 304 updates the
    /// stored headers and freshness from its own (§4.3.4) and serves the stored body; any other
    /// response is handled as a miss and replaces it.
    pub(super) async fn revalidate(
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
            return self.respond(req, upstream, None).await;
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
            self.cache
                .freshness_policy(req.default_ttl)
                .valid_until(req.expires_at),
        );
        merged.remove(AGE);
        let cache_status = if was_fresh {
            CacheStatus::REVALIDATED_ON_REQUEST
        } else {
            CacheStatus::REVALIDATED
        };
        cache_status.record_in_span();
        let refreshed = CachedObject {
            status: object.status,
            headers: merged,
            body: object.body.clone(),
            response_time: upstream.head.times.response_time,
            freshness: decided.unwrap_or(object.freshness),
        };
        let response = hit_response(&refreshed, &req, SystemTime::now(), cache_status);
        if decided.is_ok() && !req.directives.no_store {
            self.tier
                .insert_at(req.key.clone(), refreshed, req.placement)
                .await;
        } else {
            self.tier.invalidate(&req.key).await;
        }
        Ok(response)
    }

    /// Decides the `Cache-Status` of a miss and, when its body is to be stored, where; remembers
    /// responses that will not be stored (hit-for-pass).
    pub(super) async fn plan(
        &self,
        req: &ProxyRequest,
        upstream: &UpstreamHead,
        headers: &HeaderMap,
    ) -> (CacheStatus, Option<StoreTarget>) {
        if req.head {
            return (CacheStatus::MISS_HEAD, None);
        }
        let marker = |reason: &'static str, length_bytes: Option<u64>| PassMarker {
            reason,
            length_bytes,
        };
        let decided = freshness::storable(
            upstream.status,
            &upstream.headers,
            req.forwarding.facts(),
            upstream.times,
            self.cache
                .freshness_policy(req.default_ttl)
                .valid_until(req.expires_at),
        )
        .and_then(|f| {
            // Judged on what would be stored: a cookie /image-proxy or a public Supabase object
            // drops never reaches the tier.
            if headers.contains_key(SET_COOKIE) && !req.forwarding.stores_set_cookie() {
                Err(freshness::NotStorable::SetCookie)
            } else {
                Ok(f)
            }
        });
        let freshness = match decided {
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
                return (CacheStatus::MISS.with_detail(reason.detail()), None);
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
                return (CacheStatus::MISS_TOO_LARGE, None);
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
                    return (CacheStatus::MISS_TOO_LARGE, None);
                }
            }
            Some(_) => {}
        }
        if !self.pressure.borrow().level.stores() {
            return (CacheStatus::MISS_MEMORY_PRESSURE, None);
        }
        if req.directives.no_store {
            return (CacheStatus::MISS.with_detail("request-no-store"), None);
        }
        if !self.tier.stores(&req.key, req.placement) {
            return (CacheStatus::MISS.with_detail("source-not-stored"), None);
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
            return (CacheStatus::MISS_MEMORY_PRESSURE, None);
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
            tasks: self.tasks.clone(),
            placement: req.placement,
        };
        (CacheStatus::MISS_STORED, Some(fill))
    }
}
