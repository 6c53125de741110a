//! `/image-info`: an image's metadata, read from its header only and kept for every object.
//!
//! `GET /image-info?url=URL` describes what `/image-proxy?url=URL` serves, and
//! `GET /image-info/<route path>` what that route path serves (e.g.
//! `/image-info/storage/v1/object/public/{bucket}/{path}`), as JSON:
//! `{width, height, format, content_type, bytes, etag, orientation, has_alpha, frames,
//! animated, duration_ms}`. The answer comes from the object's source record
//! ([`super::record`]) while that is fresh; otherwise from the stored object when a tier holds it, else from its first bytes
//! (a `Range` request, nothing stored but the record): an object too large to store is never
//! read whole for its metadata.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderValue, Response, StatusCode};

use super::record::{Making, NOT_STORED, SourceRecord};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::freshness::{self, Usability};
use crate::proxy::{CACHE_STATUS, CacheStatus, Proxy, ProxyRequest};
use crate::transform::ImageInfo;

/// Bytes first read of an object no tier holds: image headers (a JPEG's EXIF and ICC segments
/// included) nearly always end well before.
const PROBE_BYTES: usize = 64 * 1024;
/// Bytes read when the header did not end within [`PROBE_BYTES`] (a JPEG with a large EXIF
/// thumbnail or colour profile before its frame header).
const PROBE_MORE_BYTES: usize = 1024 * 1024;

/// Answers an `/image-info` request for the object `request` fetches (a GET of it, without
/// conditionals or ranges: see `http::routes::Routes::image_info_source`); `head`: HEAD, no
/// body; `making`: the records being made ([`super::Render`]'s), whose generation a record
/// made now shares.
///
/// # Errors
/// [`ProxyError::NotFound`] for a missing object; the origin's failures;
/// [`ProxyError::NotAnImage`] when the object's header is not one of an image this build
/// reads.
pub(crate) async fn handle(
    proxy: &Arc<Proxy>,
    request: ProxyRequest,
    head: bool,
    max_source_bytes: u64,
    making: &Making,
) -> Result<Response<ProxyBody>, ProxyError> {
    let now = SystemTime::now();
    let record_key = request.primary.source_record();
    let stored = proxy.lookup_derived(&record_key).await;
    if let Some(found) = &stored
        && freshness::usability(
            &found.object.freshness,
            found.object.age(now),
            &request.directives,
        ) == Usability::Fresh
        && let Some(record) = SourceRecord::from_object(&found.object)
        && record.image.is_some()
    {
        let status = CacheStatus::hit(found.tier_name);
        let cache_control = found.object.headers.get(CACHE_CONTROL).cloned();
        return respond(&record, cache_control, found.object.age(now), head, status);
    }
    // the stored object when a tier holds one (revalidated if stale), else its first bytes
    let whole = if proxy.holds(&request.key) {
        match proxy.source(request.clone(), max_source_bytes).await {
            Ok(source) if source.status == StatusCode::OK => {
                let len = source.body.len() as u64;
                Some((source.headers, source.body, Some(len)))
            }
            Ok(source) if source.status == StatusCode::NOT_FOUND => {
                return Err(ProxyError::NotFound("no such object".into()));
            }
            Ok(source) => {
                return Err(ProxyError::Upstream(format!(
                    "the origin answered {}",
                    source.status
                )));
            }
            // grown past what is read whole: its first bytes will do
            Err(ProxyError::TooLarge(_)) => None,
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let (headers, bytes, total_bytes) = match whole {
        Some(read) => read,
        None => {
            let mut lead = proxy.leading_bytes(&request, PROBE_BYTES).await?;
            if !lead.whole && crate::transform::probe(&lead.bytes).is_err() {
                lead = proxy.leading_bytes(&request, PROBE_MORE_BYTES).await?;
            }
            (lead.headers, lead.bytes, lead.total_bytes)
        }
    };
    // as a render's: built on the record stored now and those being made, sharing the generation
    let (record, _making) = making
        .record(proxy, &request.primary, &headers, &bytes, total_bytes)
        .await;
    if record.image.is_none() {
        return Err(ProxyError::NotAnImage(
            "the object's header is not that of an image this server reads (JPEG, PNG, GIF, WebP)"
                .into(),
        ));
    }
    let freshness = proxy.derived_freshness(&request, StatusCode::OK, &headers, now);
    let object = record.to_object(&headers, freshness.unwrap_or(NOT_STORED), now);
    let (cache_control, age) = (object.headers.get(CACHE_CONTROL).cloned(), object.age(now));
    let mut status = CacheStatus::MISS.with_detail("info");
    if freshness.is_some() && proxy.store_derived(record_key, object).await {
        status = status.stored();
    }
    respond(&record, cache_control, age, head, status)
}

/// `/image-info`'s JSON: the image's [`ImageInfo`] and what the record says of the object.
#[derive(serde::Serialize)]
struct Answer<'a> {
    #[serde(flatten)]
    image: &'a ImageInfo,
    content_type: Option<&'a str>,
    bytes: Option<u64>,
    etag: Option<&'a str>,
}

/// The JSON answer for `record`, with the `Cache-Control` and `Age` of its stored object.
fn respond(
    record: &SourceRecord,
    cache_control: Option<HeaderValue>,
    age: Duration,
    head: bool,
    status: CacheStatus,
) -> Result<Response<ProxyBody>, ProxyError> {
    let image = record
        .image
        .as_ref()
        .ok_or_else(|| ProxyError::NotAnImage("not an image".into()))?;
    let body = serde_json::to_vec(&Answer {
        image,
        content_type: record.content_type.as_deref(),
        bytes: record.bytes,
        etag: record.etag.as_deref(),
    })
    .expect("JSON serializes");
    status.record_in_span();
    let mut response = Response::new(if head {
        ProxyBody::empty()
    } else {
        ProxyBody::full(body.clone())
    });
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some(v) = cache_control {
        headers.insert(CACHE_CONTROL, v);
    }
    headers.insert(AGE, HeaderValue::from(age.as_secs()));
    headers.insert(CACHE_STATUS.clone(), status.header_value());
    Ok(response)
}
