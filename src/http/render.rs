//! Supabase's public render route, served here instead of by Supabase:
//! `GET|HEAD /storage/v1/render/image/public/{bucket}/{path}?width=&height=&resize=&quality=`.
//! The original comes through the object route's cache (`/storage/v1/object/public/...`: a
//! memory or disk hit, or a collapsed fetch), and the upstream's render route is never called.
//! Without a size or quality the original is served byte for byte, exactly as the object route
//! serves it.

use std::sync::Arc;

use http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    LAST_MODIFIED,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::admit::Client;
use super::routes::{Proxied, Route, Routes};
use crate::body::ProxyBody;
use crate::config::TransformConfig;
use crate::error::ProxyError;
use crate::pressure::{Reading, ReservationPool};
use crate::proxy::{Proxy, if_none_match_matches};
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
}

impl Render {
    pub fn new(
        config: TransformConfig,
        fills: Arc<ReservationPool>,
        pressure: watch::Receiver<Reading>,
    ) -> Self {
        Render {
            pool: Pool::new(&config),
            config,
            fills,
            pressure,
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
        if let Some(width) = params.width
            && !self.config.allowed_widths.is_empty()
            && !self.config.allowed_widths.contains(&width)
        {
            return Err(ProxyError::BadParameter(format!(
                "width={width}: this server renders only widths {:?} (transform.allowed_widths)",
                self.config.allowed_widths
            )));
        }
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
        let etag = variant_etag(&source.headers, &params);
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
        let (max_pixels, max_dimension) =
            (self.config.max_source_pixels, self.config.max_dimension);
        let body = source.body.clone();
        let fills = self.fills.clone();
        let output = self
            .pool
            .run(move || {
                transform::transform(&body, &params, max_pixels, max_dimension, |bytes| {
                    fills.try_reserve(bytes)
                })
            })
            .await??;
        drop(source);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(output.content_type));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(output.bytes.len()));
        let mut response = Response::new(if head {
            ProxyBody::empty()
        } else {
            ProxyBody::full(output.bytes)
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

/// A strong ETag for the variant: the source's validator (ETag, else Last-Modified) and the
/// parameters, hashed; `None` when the source has neither (then no validator is invented).
fn variant_etag(source: &HeaderMap, params: &Params) -> Option<HeaderValue> {
    let validator = source.get(ETAG).or_else(|| source.get(LAST_MODIFIED))?;
    let mut hash = Sha256::new();
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
