//! Rendering, a peer of [`crate::proxy`]: images transformed on request (Supabase's render
//! routes, `/image-proxy`'s `w`, `h`, `fit`, `q`, `format`), their metadata (`/image-info`,
//! [`info`]), and the derived objects both store beside the object they come from (a source
//! record of its metadata, [`record`]; renditions). The source comes through the proxy's cache
//! (a memory or disk hit, or a collapsed fetch) and streams into the decoder; what is made is
//! stored in the proxy's tiers under keys derived from the source's. Requests arrive resolved:
//! `http` routes and admits them, and nothing here knows of routes or clients.

pub(crate) mod info;
pub(crate) mod record;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use http::header::{
    ACCEPT, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, EXPIRES,
    IF_NONE_MATCH, LAST_MODIFIED, VARY, X_CONTENT_TYPE_OPTIONS,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use tokio::sync::{OnceCell, watch};

use crate::body::ProxyBody;
use crate::cache::{CacheKey, CachedObject, Placement};
use crate::config::TransformConfig;
use crate::error::ProxyError;
use crate::freshness::{self, Freshness, Usability};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::pressure::{Reading, ReservationPool};
use crate::proxy::{CACHE_STATUS, CacheStatus, Proxy, ProxyRequest, if_none_match_matches};
use crate::transform::{
    self, Format, Limits, Params, Plan, Pool, SourceReader, SourceSender, TransformError, Turn,
};
use http_body_util::BodyExt;
use record::SourceRecord;

/// The render route's settings, pool, and the memory it answers to.
pub(crate) struct Render {
    pub config: TransformConfig,
    /// What a transform answers to, from `config`.
    pub limits: Limits,
    pub pool: Pool,
    /// The in-flight pool fills reserve from: a transform reserves what its plan says it will
    /// hold there.
    pub fills: Arc<ReservationPool>,
    /// At bypass pressure and above no transform starts.
    pub pressure: watch::Receiver<Reading>,
    pub metrics: Arc<Metrics>,
    /// Renditions being made, by source cache key and parameters: concurrent requests for one
    /// rendition wait for the first one's instead of making it again.
    inflight: Mutex<HashMap<String, Arc<Shared>>>,
    /// The generations of the source records being made: renditions of one source made at
    /// once agree on theirs.
    making: record::Making,
}

/// One rendition being made, shared by every request that waited for it.
type Shared = OnceCell<Result<Arc<Made>, ProxyError>>;

/// A rendition, made now or found stored by the request that led, as every request serves it.
struct Made {
    object: CachedObject,
    /// What the leading request's `Cache-Status` said of it.
    status: CacheStatus,
}

/// Whose render this is: Supabase's render route answers a source that is not an image 400
/// (as Supabase does), `/image-proxy` 502 (the origin sent what it said was an image).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    RenderRoute,
    ImageProxy,
}

impl Render {
    pub(crate) fn new(
        config: TransformConfig,
        fills: Arc<ReservationPool>,
        pressure: watch::Receiver<Reading>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Render {
            pool: Pool::new(&config),
            limits: Limits::new(&config),
            config,
            fills,
            pressure,
            metrics,
            inflight: Mutex::default(),
            making: record::Making::default(),
        }
    }

    /// Answers a request on Supabase's render routes: `request` is the resolved request for
    /// the object to render (see `http::routes::Routes::render_source`), `params` its
    /// parameters, already checked (see [`Render::check_width`]); `parts` the request's head
    /// (validators, `Accept`). Without `width`, `height`, `quality`, `format` or `download` the
    /// original is served as the object route serves it.
    ///
    /// # Errors
    /// The source's errors as the object route gives them (a missing object is 404
    /// `not_found`); [`ProxyError::SourceTooLarge`] for a source over `max_source_bytes`;
    /// [`ProxyError::ImageTooLarge`] for one over `max_source_pixels` (or an animation over its
    /// limits); [`ProxyError::InvalidSource`] for one that is not an image or does not decode;
    /// [`ProxyError::Overloaded`] at bypass memory pressure or above, when the transform's bytes
    /// cannot be reserved from the fill pool, or when no transform turn came within
    /// `queue_timeout`; [`ProxyError::TransformTimeout`] past `[transform] timeout`.
    pub(crate) async fn supabase(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        params: Params,
        parts: &Parts,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if params.is_original() && params.download.is_none() {
            // the original, as the object route serves it (HEAD, ranges and validators
            // included), when it is an image: Supabase renders what it serves, and refuses what
            // it cannot render
            return self.original(proxy, request).await;
        }
        self.respond(proxy, request, params, parts, Caller::RenderRoute)
            .await
    }

    /// The original, as the object route serves it, unless its first bytes are not an image
    /// this server renders: then 400 `invalid_source`, as Supabase answers a render of a
    /// non-image source without parameters.
    async fn original(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let head = request.head;
        let response = proxy.handle(request).await?;
        if response.status() != StatusCode::OK || head {
            return Ok(response);
        }
        let (parts, mut body) = response.into_parts();
        let (first, ended) = read_prefix(&mut body, Vec::new(), transform::HEADER_BYTES).await?;
        if transform::probe(&first).is_err() {
            return Err(ProxyError::InvalidSource(
                "The source image is invalid or unsupported for rendering".into(),
            ));
        }
        let rest = if ended { ProxyBody::empty() } else { body };
        Ok(Response::from_parts(
            parts,
            ProxyBody::prefixed(Bytes::from(first), rest),
        ))
    }

    /// Answers an `/image-proxy` request that carries transform parameters (`w`, `h`, `fit`,
    /// `q`, `format`; see [`Params::from_image_proxy_query`]): `request` is its resolved
    /// `/image-proxy` request, whose object is the source, content checks included.
    ///
    /// # Errors
    /// As [`Render::supabase`], but a source that does not decode is 502 `not_an_image`.
    pub(crate) async fn image_proxy(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        params: Params,
        parts: &Parts,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.check_width(&params)?;
        self.respond(proxy, request, params, parts, Caller::ImageProxy)
            .await
    }

    /// Where the sources this renderer reads are stored (`[transform] sources_in_memory`).
    fn source_placement(&self) -> Placement {
        if self.config.sources_in_memory {
            Placement::Everywhere
        } else {
            Placement::BelowMemory
        }
    }

    /// `[transform] allowed_widths`, when set.
    ///
    /// # Errors
    /// [`ProxyError::BadParameter`] for a width not in the list.
    pub(crate) fn check_width(&self, params: &Params) -> Result<(), ProxyError> {
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

    /// Answers an `/image-info` request for the object `request` fetches (see
    /// [`info::handle`]); its source is placed as a render's is
    /// ([`Render::source_placement`]).
    pub(crate) async fn image_info(
        &self,
        proxy: &Arc<Proxy>,
        mut request: ProxyRequest,
        head: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        request.placement = self.source_placement();
        info::handle(
            proxy,
            request,
            head,
            self.config.max_source_bytes,
            &self.making,
        )
        .await
    }

    /// `request`'s object transformed by `params`: a stored rendition, or 304 for a client that
    /// holds it, or made now (shared with concurrent requests for the same rendition) and
    /// stored. What is known of the source comes from its source record while that is fresh;
    /// otherwise the source is read, streamed into the decoder.
    async fn respond(
        &self,
        proxy: &Arc<Proxy>,
        request: ProxyRequest,
        mut params: Params,
        parts: &Parts,
        caller: Caller,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = SystemTime::now();
        let primary = request.primary.clone();
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
            let etag = record.rendition_etag(&primary, &canonical);
            if let Some(response) = not_modified(parts, etag.as_ref(), &params) {
                return Ok(response);
            }
            let key = primary.rendition(record.generation, &canonical);
            let source = (
                record_object.object.response_time,
                record_object.object.freshness,
            );
            if let Some(found) = self.stored(proxy, key, source, now).await {
                let status = found.status;
                return Ok(self.finish(
                    proxy.serve_stored(&found.object, &request, now, status),
                    &params,
                ));
            }
        }
        let key = format!("{}\n{canonical}", primary.as_str());
        let (made, ran) = self
            .collapsed(&key, || {
                self.make(proxy, &request, &params, fresh_record, caller)
            })
            .await;
        let made = made?;
        if let Some(response) = not_modified(parts, made.object.headers.get(ETAG), &params) {
            return Ok(response);
        }
        let status = if ran {
            made.status
        } else {
            made.status.collapsed()
        };
        Ok(self.finish(
            proxy.serve_stored(&made.object, &request, now, status),
            &params,
        ))
    }

    /// Runs `make` once for concurrent callers with the same `key`; the result, and whether
    /// this caller ran it.
    async fn collapsed<F>(
        &self,
        key: &str,
        make: impl FnOnce() -> F,
    ) -> (Result<Arc<Made>, ProxyError>, bool)
    where
        F: Future<Output = Result<Arc<Made>, ProxyError>>,
    {
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .clone();
        let mut ran = false;
        let made = cell
            .get_or_init(|| {
                ran = true;
                make()
            })
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if inflight.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(key);
            }
        }
        if !ran {
            self.metrics
                .transforms
                .get_or_create(&OutcomeLabels {
                    outcome: "collapsed",
                })
                .inc();
        }
        (made, ran)
    }

    /// The rendition, made by this request: a turn of the pool first (a transform waiting for
    /// one holds nothing), then the source (streamed, or whole when it is in memory), its record
    /// (rebuilt: the same generation when it is the same version as the record stored now, or
    /// as one another request is making at the same time), the stored rendition when
    /// there is one; else the plan from the source's header, the reservation of what it says,
    /// and the transform on the pool, the source fed to it as it arrives.
    async fn make(
        &self,
        proxy: &Arc<Proxy>,
        request: &ProxyRequest,
        params: &Params,
        fresh_record: Option<SourceRecord>,
        caller: Caller,
    ) -> Result<Arc<Made>, ProxyError> {
        let primary = &request.primary;
        let canonical = params.canonical();
        let turn = self.pool.turn().await?;
        let deadline = Instant::now() + self.limits.timeout;
        let now = SystemTime::now();
        let mut source_request = request.clone();
        source_request.placement = self.source_placement();
        let source = proxy
            .source_stream(source_request, self.config.max_source_bytes)
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
        let mut body = source.body;
        let (mut prefix, mut ended) =
            read_prefix(&mut body, Vec::new(), transform::HEADER_BYTES).await?;
        let total = if ended {
            Some(prefix.len() as u64)
        } else {
            source.length
        };
        // built on the record stored now and those being made (each from its own fetch, whose
        // Date may differ): renditions made at once agree on the generation
        let (record, _making) = self
            .making
            .record(proxy, primary, &source.headers, &prefix, total)
            .await;
        let freshness = proxy.derived_freshness(request, source.status, &source.headers, now);
        // stored again when it is new, changed, or was stale (its freshness is the source's)
        if let Some(freshness) = freshness
            && fresh_record.as_ref() != Some(&record)
        {
            let object = record.to_object(&source.headers, freshness, now);
            proxy.store_derived(primary.source_record(), object).await;
        }
        let key = primary.rendition(record.generation, &canonical);
        if let Some(source_freshness) = freshness
            && let Some(found) = self
                .stored(proxy, key.clone(), (now, source_freshness), now)
                .await
        {
            return Ok(Arc::new(found));
        }
        if !self.pressure.borrow().level.stores() {
            return Err(ProxyError::Overloaded);
        }
        // the plan, from as much of the header as it needs
        let plan = loop {
            match transform::plan(&prefix, total, params, &self.limits) {
                Err(TransformError::NotAnImage(_))
                    if !ended && prefix.len() < transform::MAX_HEADER_BYTES =>
                {
                    let want = (prefix.len() * 2).min(transform::MAX_HEADER_BYTES);
                    (prefix, ended) = read_prefix(&mut body, prefix, want).await?;
                }
                plan => break plan,
            }
        };
        let plan = plan.map_err(|e| transform_error(e, caller))?;
        // more than the whole fill pool could ever hold: refused for good, not "try later"
        if plan.reserve_bytes > self.fills.capacity_bytes() {
            return Err(ProxyError::ImageTooLarge(format!(
                "transforming this image needs {} bytes, more than memory.inflight_fill_bytes \
                 ({} bytes) could ever reserve",
                plan.reserve_bytes,
                self.fills.capacity_bytes()
            )));
        }
        // room made by the transforms and fills before it; past its wait, "try later"
        let wait_until = deadline.min(Instant::now() + self.pool.queue_timeout());
        let reservation = self
            .fills
            .reserve(plan.reserve_bytes, wait_until.into())
            .await
            .ok_or(ProxyError::Overloaded)?;
        let output = self
            .run(turn, plan, params, (prefix, ended, body), deadline, caller)
            .await;
        drop(reservation);
        self.metrics
            .transforms
            .get_or_create(&OutcomeLabels {
                outcome: if output.is_ok() { "ok" } else { "failed" },
            })
            .inc();
        let output = output?;
        let mut headers = HeaderMap::new();
        for name in [CACHE_CONTROL, EXPIRES, LAST_MODIFIED] {
            if let Some(v) = source.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        if let Some(etag) = record.rendition_etag(primary, &canonical) {
            headers.insert(ETAG, etag);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(output.content_type));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(output.bytes.len()));
        headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let object = CachedObject {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(output.bytes),
            response_time: now,
            freshness: freshness.unwrap_or(record::NOT_STORED),
        };
        let mut status = CacheStatus::MISS.with_detail("transform");
        if freshness.is_some() {
            let copy = CachedObject {
                headers: object.headers.clone(),
                body: object.body.clone(),
                ..object
            };
            if proxy.store_derived(key, copy).await {
                status = status.stored();
            }
        }
        Ok(Arc::new(Made { object, status }))
    }

    /// Runs the planned transform on the pool with `turn`: from the source's `prefix` alone
    /// when that is all of it (`ended`), else with the rest of `body` fed to the decoder as it
    /// arrives (at most a few chunks held between them). A failure of the source's body is
    /// answered as the origin's failure (a stall is 504).
    async fn run(
        &self,
        turn: Turn,
        plan: Plan,
        params: &Params,
        (prefix, ended, body): (Vec<u8>, bool, ProxyBody),
        deadline: Instant,
        caller: Caller,
    ) -> Result<transform::Output, ProxyError> {
        let (params, limits) = (params.clone(), self.limits);
        if ended {
            let reader = SourceReader::whole(Bytes::from(prefix), deadline);
            return self
                .pool
                .run(turn, move || {
                    transform::run(reader, &plan, &params, &limits)
                })
                .await?
                .map_err(|e| transform_error(e, caller));
        }
        let (reader, tx) =
            SourceReader::streaming(Bytes::from(prefix), self.config.max_source_bytes, deadline);
        let work = self.pool.run(turn, move || {
            transform::run(reader, &plan, &params, &limits)
        });
        let (output, fed) = tokio::join!(work, feed(body, tx));
        match (output?, fed) {
            (Err(TransformError::SourceFailed), Err(e)) => Err(e),
            (output, _) => output.map_err(|e| transform_error(e, caller)),
        }
    }

    /// The rendition stored under `key`, as a hit; made from the version of the source its
    /// record names, so when it went stale since (the source was revalidated, not changed) it is
    /// as fresh as the source now is (`source`: response time and freshness), and stored so
    /// again. `None` when none is stored.
    async fn stored(
        &self,
        proxy: &Proxy,
        key: CacheKey,
        (response_time, freshness): (SystemTime, Freshness),
        now: SystemTime,
    ) -> Option<Made> {
        let found = proxy.lookup_derived(&key).await?;
        let object = found.object;
        let copy = || CachedObject {
            status: object.status,
            headers: object.headers.clone(),
            body: object.body.clone(),
            response_time,
            freshness,
        };
        let object = if object.is_fresh(now) {
            copy_object(&object)
        } else {
            proxy.store_derived(key, copy()).await;
            copy()
        };
        Some(Made {
            object,
            status: CacheStatus::hit(found.tier_name),
        })
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

/// A stored object's copy (its body shared, not copied).
fn copy_object(object: &CachedObject) -> CachedObject {
    CachedObject {
        status: object.status,
        headers: object.headers.clone(),
        body: object.body.clone(),
        response_time: object.response_time,
        freshness: object.freshness,
    }
}

/// Reads `body` onto `prefix` until it holds at least `want` bytes or the body ends; whether it
/// ended.
///
/// # Errors
/// The origin's failure, as a [`ProxyError`].
async fn read_prefix(
    body: &mut ProxyBody,
    mut prefix: Vec<u8>,
    want: usize,
) -> Result<(Vec<u8>, bool), ProxyError> {
    while prefix.len() < want {
        match body.frame().await {
            None => return Ok((prefix, true)),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
        }
    }
    Ok((prefix, http_body::Body::is_end_stream(body)))
}

/// Feeds the rest of `body` to a decoder through `tx`, chunk by chunk at the decoder's pace,
/// until the body ends (the sender dropped: the end) or the decoder stops reading. A failure
/// of the body is sent on (the decoder stops) and returned.
async fn feed(mut body: ProxyBody, tx: SourceSender) -> Result<(), ProxyError> {
    loop {
        match body.frame().await {
            None => return Ok(()),
            Some(Err(e)) => {
                let _ = tx.send(Err(())).await;
                return Err(e.into());
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && tx.send(Ok(data)).await.is_err()
                {
                    // the decoder is done with the source
                    return Ok(());
                }
            }
        }
    }
}

/// A transform's failure as the client is told it.
fn transform_error(e: TransformError, caller: Caller) -> ProxyError {
    match e {
        TransformError::NotAnImage(why) | TransformError::Undecodable(why)
            if caller == Caller::RenderRoute =>
        {
            ProxyError::InvalidSource(format!(
                "The source image is invalid or unsupported for rendering: {why}"
            ))
        }
        e => e.into(),
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
            e @ (TransformError::TooManyPixels { .. }
            | TransformError::TooManyFrames { .. }
            | TransformError::TooManyScans { .. }) => ProxyError::ImageTooLarge(e.to_string()),
            e @ (TransformError::NotAnImage(_) | TransformError::Undecodable(_)) => {
                ProxyError::NotAnImage(e.to_string())
            }
            e @ TransformError::Encode(_) => ProxyError::TransformFailed(e.to_string()),
            TransformError::NoMemory { .. } => ProxyError::Overloaded,
            TransformError::TimedOut => ProxyError::TransformTimeout,
            e @ TransformError::SourceTooLarge => ProxyError::SourceTooLarge(e.to_string()),
            e @ TransformError::SourceFailed => ProxyError::Upstream(e.to_string()),
        }
    }
}
