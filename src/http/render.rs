//! Supabase's public render route, served here instead of by Supabase:
//! `GET|HEAD /storage/v1/render/image/public/{bucket}/{path}?width=&height=&resize=&quality=`.
//! The original comes through the object route's cache (`/storage/v1/object/public/...`: a
//! memory or disk hit, or a collapsed fetch), and the upstream's render route is never called.
//! Without a size or quality the original is served byte for byte, exactly as the object route
//! serves it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use http::header::{
    ACCEPT, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, EXPIRES,
    IF_NONE_MATCH, LAST_MODIFIED, VARY, X_CONTENT_TYPE_OPTIONS,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::sync::{OnceCell, watch};

use super::admit::Client;
use super::record::SourceRecord;
use super::routes::{Proxied, Route, Routes};
use crate::body::ProxyBody;
use crate::cache::{CacheKey, CachedObject};
use crate::config::TransformConfig;
use crate::error::ProxyError;
use crate::freshness::{self, Freshness, Usability};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::pressure::{Reading, ReservationPool};
use crate::proxy::{
    CACHE_STATUS, CacheStatus, Proxy, ProxyRequest, SourceObject, if_none_match_matches,
};
use crate::transform::{self, Format, Params, Pool, TransformError};

/// The render route's settings, pool, and the memory it answers to.
pub struct Render {
    pub config: TransformConfig,
    pub pool: Pool,
    /// The in-flight pool fills reserve from: a transform reserves its decoded pixels there.
    pub fills: Arc<ReservationPool>,
    /// At bypass pressure and above no transform starts.
    pub pressure: watch::Receiver<Reading>,
    pub metrics: Arc<Metrics>,
    /// Transforms in flight, by source cache key, source validator and parameters: concurrent
    /// requests for one variant wait for the first one's result instead of transforming again.
    inflight: Mutex<HashMap<String, Arc<Shared>>>,
}

/// One transform's result, shared by every request that waited for it.
type Shared = OnceCell<Result<Rendered, ProxyError>>;

/// An encoded variant.
#[derive(Clone)]
struct Rendered {
    bytes: Bytes,
    content_type: &'static str,
}

impl Render {
    pub fn new(
        config: TransformConfig,
        fills: Arc<ReservationPool>,
        pressure: watch::Receiver<Reading>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Render {
            pool: Pool::new(&config),
            config,
            fills,
            pressure,
            metrics,
            inflight: Mutex::default(),
        }
    }

    /// Answers a render request on the Supabase route `index`.
    ///
    /// # Errors
    /// [`ProxyError::MethodNotAllowed`] for other than GET and HEAD; [`ProxyError::BadParameter`]
    /// for a bad parameter; the source's errors as the object route gives them (a missing
    /// object is 404 `not_found`); [`ProxyError::SourceTooLarge`] for a source over
    /// `max_source_bytes`; [`ProxyError::ImageTooLarge`] for one over `max_source_pixels`;
    /// [`ProxyError::NotAnImage`] for one that does not decode; [`ProxyError::Overloaded`]
    /// at bypass memory pressure or above, when the decoded pixels cannot be reserved from the
    /// fill pool, or when no transform turn came within `queue_timeout`.
    pub async fn handle(
        &self,
        proxy: &Arc<Proxy>,
        routes: &Routes,
        index: usize,
        parts: &Parts,
        client: &Client,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let head = super::routes::get_or_head(&parts.method)?;
        let params = Params::from_query(parts.uri.query(), self.config.max_dimension)?;
        self.check_width(&params)?;
        let request = match routes.resolve(
            Route::Proxied {
                index,
                name: "supabase",
            },
            &object_parts(parts)?,
            client,
        )? {
            Proxied::Cacheable(mut request) => {
                request.head = head;
                request
            }
            Proxied::Forward { .. } => unreachable!("a GET resolves to a cacheable request"),
        };
        if params.is_original() && params.download.is_none() {
            // the original, as the object route serves it (HEAD, ranges and validators included)
            return proxy.handle(request).await;
        }
        self.respond(proxy, request, params, parts).await
    }

    /// Answers an `/image-proxy` request that carries transform parameters (`w`, `h`, `fit`,
    /// `q`, `format`; see [`Params::from_image_proxy_query`]): `request` is its resolved
    /// `/image-proxy` request, whose object is the source, content checks included.
    ///
    /// # Errors
    /// As [`Render::handle`].
    pub async fn image_proxy(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        params: Params,
        parts: &Parts,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.check_width(&params)?;
        self.respond(proxy, request, params, parts).await
    }

    /// `[transform] allowed_widths`, when set.
    fn check_width(&self, params: &Params) -> Result<(), ProxyError> {
        match params.width {
            Some(width)
                if !self.config.allowed_widths.is_empty()
                    && !self.config.allowed_widths.contains(&width) =>
            {
                Err(ProxyError::BadParameter(format!(
                    "width={width}: this server renders only widths {:?} (transform.allowed_widths)",
                    self.config.allowed_widths
                )))
            }
            _ => Ok(()),
        }
    }

    /// `request`'s object transformed by `params`: a stored rendition, or 304 for a client that
    /// holds it, or transformed now from the whole source (on the pool, shared with concurrent
    /// requests for the same rendition) and stored. What is known of the source comes from its
    /// source record while that is fresh; the source itself is read only to transform, or to
    /// rebuild the record.
    async fn respond(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        mut params: Params,
        parts: &Parts,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = SystemTime::now();
        let primary = request.primary.clone();
        // an animation is served as it is unless a format was asked for (then its first frame)
        let keeps_animation = params.format.is_none() || params.negotiate;
        if params.negotiate {
            // RFC 9110 §12.5.1: WebP when the client lists it (not only through a wildcard)
            params.format = accepts_webp(&parts.headers).then_some(Format::Webp);
        }
        let canonical = params.canonical();
        let stored_record = proxy.lookup_derived(&primary.source_record()).await;
        let fresh = stored_record.as_ref().filter(|f| {
            freshness::usability(&f.object.freshness, f.object.age(now), &request.directives)
                == Usability::Fresh
        });
        let fresh_record = fresh.and_then(|f| SourceRecord::from_object(&f.object));
        if let (Some(record), Some(record_object)) = (&fresh_record, fresh) {
            if keeps_animation && record.is_animated() {
                return proxy.handle(request).await;
            }
            let etag = record.rendition_etag(&primary, &canonical);
            if let Some(response) = not_modified(parts, etag.as_ref(), &params) {
                return Ok(response);
            }
            let key = primary.rendition(record.generation, &canonical);
            let source = (
                record_object.object.response_time,
                record_object.object.freshness,
            );
            if let Some(hit) = self
                .stored(proxy, key, &request, &params, source, now)
                .await
            {
                return Ok(hit);
            }
        }
        // the source, whole: its record is rebuilt from it (the same generation when it is the
        // same version), then the rendition is looked up again or made
        let previous = stored_record
            .as_ref()
            .and_then(|f| SourceRecord::from_object(&f.object));
        let source = proxy
            .source(request.clone(), self.config.max_source_bytes)
            .await
            .map_err(|e| match e {
                ProxyError::TooLarge(why) => ProxyError::SourceTooLarge(why),
                e => e,
            })?;
        if source.status != StatusCode::OK {
            return Err(match source.status {
                StatusCode::NOT_FOUND => ProxyError::NotFound("no such object".into()),
                s => ProxyError::Upstream(format!("the source answered {s}")),
            });
        }
        let record = SourceRecord::new(
            &source.headers,
            &source.body,
            Some(source.body.len() as u64),
            previous.as_ref(),
        );
        let freshness = proxy.derived_freshness(&request, source.status, &source.headers, now);
        // stored again when it is new, changed, or was stale (its freshness is the source's)
        if let Some(freshness) = freshness
            && fresh_record.as_ref() != Some(&record)
        {
            let object = record.to_object(&source.headers, freshness, now);
            proxy.store_derived(primary.source_record(), object).await;
        }
        if keeps_animation && record.is_animated() {
            drop(source);
            return proxy.handle(request).await;
        }
        let etag = record.rendition_etag(&primary, &canonical);
        if let Some(response) = not_modified(parts, etag.as_ref(), &params) {
            return Ok(response);
        }
        let key = primary.rendition(record.generation, &canonical);
        if let Some(source_freshness) = freshness
            && let Some(hit) = self
                .stored(
                    proxy,
                    key.clone(),
                    &request,
                    &params,
                    (now, source_freshness),
                    now,
                )
                .await
        {
            return Ok(hit);
        }
        if !self.pressure.borrow().level.stores() {
            return Err(ProxyError::Overloaded);
        }
        // collapsed by version, not generation: concurrent first requests each made a record
        let version = record.version().unwrap_or_default();
        let inflight_key = format!("{}\n{version}\n{canonical}", primary.as_str());
        let rendered = self.render(&inflight_key, &source, &params).await?;
        let mut headers = HeaderMap::new();
        for name in [CACHE_CONTROL, EXPIRES, LAST_MODIFIED] {
            if let Some(v) = source.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        drop(source);
        if let Some(etag) = etag {
            headers.insert(ETAG, etag);
        }
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(rendered.content_type),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(rendered.bytes.len()));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let object = CachedObject {
            status: StatusCode::OK,
            headers,
            body: rendered.bytes,
            response_time: now,
            freshness: freshness.unwrap_or(super::record::NOT_STORED),
        };
        let mut status = CacheStatus::MISS.with_detail("transform");
        if freshness.is_some() {
            let object = CachedObject {
                headers: object.headers.clone(),
                body: object.body.clone(),
                ..object
            };
            if proxy.store_derived(key, object).await {
                status = status.stored();
            }
        }
        let response = proxy.serve_stored(&object, &request, now, status);
        Ok(self.finish(response, &params))
    }

    /// The rendition stored under `key`, served as a hit (with [`Render::finish`]'s headers);
    /// made from the version of the source its record names, so when it went stale since (the
    /// source was revalidated, not changed) it is as fresh as the source now is (`source`:
    /// response time and freshness), and stored so again. `None` when none is stored.
    async fn stored(
        &self,
        proxy: &Proxy,
        key: CacheKey,
        request: &ProxyRequest,
        params: &Params,
        (response_time, freshness): (SystemTime, Freshness),
        now: SystemTime,
    ) -> Option<Response<ProxyBody>> {
        let found = proxy.lookup_derived(&key).await?;
        let mut object = found.object;
        if !object.is_fresh(now) {
            let copy = || CachedObject {
                status: object.status,
                headers: object.headers.clone(),
                body: object.body.clone(),
                response_time,
                freshness,
            };
            let refreshed = Arc::new(copy());
            proxy.store_derived(key, copy()).await;
            object = refreshed;
        }
        let status = CacheStatus::hit(found.tier_name);
        Some(self.finish(proxy.serve_stored(&object, request, now, status), params))
    }

    /// Transforms `source` by `params` on the pool; concurrent calls with the same `key` (one
    /// rendition of one version of the source) share the first one's transform.
    async fn render(
        &self,
        key: &str,
        source: &SourceObject,
        params: &Params,
    ) -> Result<Rendered, ProxyError> {
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .clone();
        let mut ran = false;
        let rendered = cell
            .get_or_init(|| {
                ran = true;
                let (pool, fills, body, params) = (
                    self.pool.clone(),
                    self.fills.clone(),
                    source.body.clone(),
                    params.clone(),
                );
                let (max_pixels, max_dimension) =
                    (self.config.max_source_pixels, self.config.max_dimension);
                async move {
                    let output = pool
                        .run(move || {
                            transform::transform(&body, &params, max_pixels, max_dimension, |n| {
                                fills.try_reserve(n)
                            })
                        })
                        .await??;
                    Ok(Rendered {
                        bytes: Bytes::from(output.bytes),
                        content_type: output.content_type,
                    })
                }
            })
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(key);
            }
        }
        let outcome = match (ran, &rendered) {
            (false, _) => "collapsed",
            (true, Ok(_)) => "ok",
            (true, Err(_)) => "failed",
        };
        self.metrics
            .transforms
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        rendered
    }

    /// What a rendition response gains per request, not stored with it (one rendition serves
    /// both): `Vary: Accept` when the format was negotiated (304 included, RFC 9110 §15.4.5),
    /// `Content-Disposition` for `download`.
    fn finish(&self, mut response: Response<ProxyBody>, params: &Params) -> Response<ProxyBody> {
        if params.negotiate {
            response
                .headers_mut()
                .insert(VARY, HeaderValue::from_static("Accept"));
        }
        if let Some(name) = &params.download
            && response.status() != StatusCode::NOT_MODIFIED
        {
            response
                .headers_mut()
                .insert(CONTENT_DISPOSITION, attachment(name));
        }
        response
    }
}

/// 304 for a client whose `If-None-Match` holds the rendition's `etag` (compared weakly, RFC
/// 9110 §13.1.2), before anything is read or transformed; with `Vary: Accept` when the format
/// was negotiated (RFC 9110 §15.4.5).
fn not_modified(
    parts: &Parts,
    etag: Option<&HeaderValue>,
    params: &Params,
) -> Option<Response<ProxyBody>> {
    let (etag, inm) = (etag?, parts.headers.get(IF_NONE_MATCH)?);
    if !if_none_match_matches(inm.to_str().ok()?, etag.to_str().ok()?) {
        return None;
    }
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = response.headers_mut();
    headers.insert(ETAG, etag.clone());
    if params.negotiate {
        headers.insert(VARY, HeaderValue::from_static("Accept"));
    }
    headers.insert(
        CACHE_STATUS.clone(),
        CacheStatus::hit("validator").header_value(),
    );
    Some(response)
}

/// Whether `Accept` lists `image/webp` with a non-zero weight (RFC 9110 §12.5.1). A wildcard
/// alone does not count: clients that send only `*/*` (curl, many libraries) get the source's
/// format, as Supabase does.
fn accepts_webp(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            media.eq_ignore_ascii_case("image/webp")
                && !parts.any(|p| {
                    p.split_once('=').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("q")
                            && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                    })
                })
        })
}

/// The object-route request for a render request: the same bucket and path under
/// `/storage/v1/object/public/`, no query, GET.
fn object_parts(parts: &Parts) -> Result<Parts, ProxyError> {
    let path = parts.uri.path();
    let rest = path
        .strip_prefix(super::routes::SUPABASE_RENDER_PREFIX)
        .ok_or_else(|| ProxyError::NotFound(format!("no route for {path}")))?;
    let uri = format!("{}{rest}", super::routes::SUPABASE_PUBLIC_PREFIX)
        .parse()
        .map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))?;
    let (mut object, ()) = http::Request::new(()).into_parts();
    object.method = Method::GET;
    object.uri = uri;
    object.version = parts.version;
    object.headers = parts.headers.clone();
    Ok(object)
}

/// `attachment`, with `filename` when one was given (quoted, anything unsafe in a quoted string
/// replaced).
fn attachment(name: &str) -> HeaderValue {
    if name.is_empty() {
        return HeaderValue::from_static("attachment");
    }
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    HeaderValue::from_str(&format!("attachment; filename=\"{safe}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

impl From<TransformError> for ProxyError {
    fn from(e: TransformError) -> Self {
        match e {
            TransformError::BadParameter(why) => ProxyError::BadParameter(why),
            e @ TransformError::TooManyPixels { .. } => ProxyError::ImageTooLarge(e.to_string()),
            e @ TransformError::Undecodable(_) => ProxyError::NotAnImage(e.to_string()),
            e @ TransformError::Encode(_) => ProxyError::Upstream(e.to_string()),
            TransformError::NoMemory { .. } => ProxyError::Overloaded,
        }
    }
}
