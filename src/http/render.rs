//! Supabase's public render route, served here instead of by Supabase:
//! `GET|HEAD /storage/v1/render/image/public/{bucket}/{path}?width=&height=&resize=&quality=`.
//! The original comes through the object route's cache (`/storage/v1/object/public/...`: a
//! memory or disk hit, or a collapsed fetch), and the upstream's render route is never called.
//! Without a size or quality the original is served byte for byte, exactly as the object route
//! serves it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    LAST_MODIFIED,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, watch};

use super::admit::Client;
use super::routes::{Proxied, Route, Routes};
use crate::body::ProxyBody;
use crate::config::TransformConfig;
use crate::error::ProxyError;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::pressure::{Reading, ReservationPool};
use crate::proxy::{Proxy, ProxyRequest, if_none_match_matches};
use crate::transform::{self, Params, Pool, TransformError};

/// `Cache-Status` of a rendered response: generated from the source, the variant not stored.
const RENDERED: &str = "imgedge; fwd=miss; detail=transform";

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

    /// The source of `request`, whole, transformed by `params` (or 304 for a client that holds
    /// the variant), on the pool, shared with concurrent requests for the same variant.
    async fn respond(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        params: Params,
        parts: &Parts,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let head = request.head;
        // the source's cache key: which object, in which route's namespace
        let source_key = request.primary.as_str().to_owned();
        let source = proxy
            .source(request, self.config.max_source_bytes)
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
        let etag = variant_etag(&source_key, &source.headers, &params);
        let mut headers = HeaderMap::new();
        for name in [CACHE_CONTROL, LAST_MODIFIED] {
            if let Some(v) = source.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        if let Some(etag) = &etag {
            headers.insert(ETAG, etag.clone());
        }
        headers.insert("cache-status", HeaderValue::from_static(RENDERED));
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        if let Some(name) = &params.download {
            headers.insert(CONTENT_DISPOSITION, attachment(name));
        }
        // before transforming: a client holding this variant gets 304 for the price of a hit
        // (If-None-Match compares weakly, RFC 9110 §13.1.2)
        if let (Some(etag), Some(inm)) = (&etag, parts.headers.get(IF_NONE_MATCH))
            && if_none_match_matches(
                inm.to_str().unwrap_or_default(),
                etag.to_str().unwrap_or_default(),
            )
        {
            let mut response = Response::new(ProxyBody::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.headers_mut() = headers;
            return Ok(response);
        }
        if !self.pressure.borrow().level.stores() {
            return Err(ProxyError::Overloaded);
        }
        // concurrent requests for one variant of one version of the source share one transform
        let key = format!(
            "{}\n{}\n{}",
            source_key,
            etag.as_ref()
                .and_then(|e| e.to_str().ok())
                .unwrap_or_default(),
            params.canonical()
        );
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let mut ran = false;
        let rendered = cell
            .get_or_init(|| {
                ran = true;
                let (pool, fills, body) =
                    (self.pool.clone(), self.fills.clone(), source.body.clone());
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
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
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
        drop(source);
        let rendered = rendered?;
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(rendered.content_type),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(rendered.bytes.len()));
        let mut response = Response::new(if head {
            ProxyBody::empty()
        } else {
            ProxyBody::full(rendered.bytes)
        });
        *response.headers_mut() = headers;
        Ok(response)
    }
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

/// A strong ETag for the variant: the source's cache key and validator (ETag, else
/// Last-Modified) and the parameters, hashed; `None` when the source has neither (then no
/// validator is invented).
fn variant_etag(source_key: &str, source: &HeaderMap, params: &Params) -> Option<HeaderValue> {
    let validator = source.get(ETAG).or_else(|| source.get(LAST_MODIFIED))?;
    let mut hash = Sha256::new();
    hash.update(source_key.as_bytes());
    hash.update(b"\n");
    hash.update(validator.as_bytes());
    hash.update(b"\n");
    hash.update(params.canonical().as_bytes());
    let digest = hash.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("\"r-{hex}\"")).ok()
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
