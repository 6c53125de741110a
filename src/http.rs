//! The HTTP face: [`Router`] answers every request — route it ([`routes`]), admit it
//! ([`admit`]) or serve the operator's endpoints ([`admin`]), hand it to the proxy or to
//! rendering ([`crate::render`]), render a [`ProxyError`] as JSON — and wraps every response in
//! the access log's body ([`access_log`]). The only module, with `error.rs`, that decides client
//! status codes.

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod admit;
pub(crate) mod client;
pub(crate) mod rate;
pub mod routes;
pub(crate) mod supabase;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LOCATION, CONTENT_SECURITY_POLICY,
    CONTENT_TYPE, LOCATION, RETRY_AFTER, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tracing::Instrument;
use tracing::field::Empty;
use url::Url;

pub(crate) use access_log::LoggedBody;
pub(crate) use admin::{Admin, PURGE_PATH};
pub(crate) use admit::Admission;
pub(crate) use client::{Asked, Client};
pub use routes::{Route, Routes};

use crate::body::ProxyBody;
use crate::config::{CspMode, TargetedOut};
use crate::connections::Busy;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::proxy::{CACHE_STATUS, CacheStatus, Proxy, content};
use crate::render::Render;
use crate::transform::Params;
use crate::upstream::{BoxError, Linger, Upload};
use access_log::{AccessLog, REQUEST_ID, RequestIds};
use routes::{Proxied, get_or_head};

/// Everything a request needs, shared by all connections.
pub(crate) struct Router {
    pub routes: Routes,
    pub admission: Admission,
    pub admin: Admin,
    pub render: Render,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub request_ids: RequestIds,
    /// `[log] access`: write an access line per request.
    pub access_log: bool,
    /// Which targeted cache-control fields of an origin's responses clients see.
    pub targeted: TargetedIn,
}

/// What becomes of an origin's targeted cache-control fields (RFC 9213) on the way to clients:
/// imgedge's own field is addressed to it and dropped; `CDN-Cache-Control` is dropped unless
/// `[cache] forward_cdn_cache_control` (it may be meant for a CDN in front too).
#[derive(Debug, Clone, Default)]
pub(crate) struct TargetedIn {
    pub own_field: Option<&'static str>,
    pub forward_cdn_cache_control: bool,
}

/// The targeted cache-control fields of a response on its way out: the origin's dropped as
/// `targeted` says; then, on a successful response (2xx, 304) whose origin did not forbid
/// shared caching (`private`, `no-store`, `no-cache` in the directives that govern it, or
/// `Set-Cookie`), the route's own `CDN-Cache-Control` and `Surrogate-Control`, replacing the
/// origin's. An error never carries them: a CDN must not keep it for the year it keeps images.
fn targeted_fields(
    headers: &mut HeaderMap,
    status: StatusCode,
    out: &TargetedOut,
    targeted: &TargetedIn,
) {
    let directives = crate::freshness::effective_directives(headers, targeted.own_field);
    if let Some(own) = targeted.own_field {
        headers.remove(own);
    }
    if !targeted.forward_cdn_cache_control {
        headers.remove(crate::freshness::CDN_CACHE_CONTROL);
    }
    let shareable = (status.is_success() || status == StatusCode::NOT_MODIFIED)
        && !directives.private
        && !directives.no_store
        && !directives.no_cache
        && !headers.contains_key(http::header::SET_COOKIE);
    if !shareable {
        return;
    }
    if let Some(v) = &out.cdn_cache_control {
        headers.insert(crate::freshness::CDN_CACHE_CONTROL, v.clone());
    }
    if let Some(v) = &out.surrogate_control {
        headers.insert(crate::proxy::SURROGATE_CONTROL.clone(), v.clone());
    }
}

impl Router {
    /// Answers one request that came from `peer` on a connection `busy` keeps busy. Never
    /// fails: errors become JSON responses.
    pub(crate) async fn handle<B>(
        &self,
        req: Request<B>,
        peer: SocketAddr,
        busy: Busy,
    ) -> Response<LoggedBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let route = self.routes.route_of(req.uri().path());
        let id = self.request_ids.of(req.headers());
        let client = self.admission.client(req.headers(), peer);
        // What a route response's Location is rewritten to names what this request asked for.
        let asked = matches!(route, Route::Proxied { .. })
            .then(|| Asked::of(req.headers(), req.uri(), &client));
        // imgedge's own errors on the Supabase routes are written as Storage writes its own.
        let error_body = match route {
            Route::Render { .. } => Some(supabase::ErrorBody::Json),
            Route::Proxied {
                name: "supabase", ..
            } => Some(supabase::ErrorBody::for_path(req.uri().path())),
            _ => None,
        };
        let span = tracing::info_span!(
            "request",
            id = %id.to_str().unwrap_or_default(),
            client = %client.ip,
            route = route.name(),
            method = %req.method(),
            cache = Empty,
            upstream_status = Empty,
        );
        let result = self
            .dispatch(route, req, client, busy)
            .instrument(span.clone())
            .await;
        let (mut response, error) = match result {
            Ok(r) => (r, None),
            Err(e) => {
                if matches!(e, ProxyError::Busy(_)) {
                    self.metrics
                        .shed
                        .get_or_create(&crate::metrics::ReasonLabels { reason: "busy" })
                        .inc();
                }
                let message = e.to_string();
                (error_response(&e, error_body.as_ref()), Some(message))
            }
        };
        response.headers_mut().insert(REQUEST_ID.clone(), id);
        match route {
            Route::ImageProxy => image_proxy_headers(response.headers_mut()),
            Route::Proxied { index, .. } => {
                let config = self.routes.config(index);
                if let Some(asked) = &asked {
                    rewrite_locations(response.headers_mut(), &config.upstream, asked);
                }
                route_response_headers(response.headers_mut(), config.content_security_policy);
            }
            Route::Render { .. } | Route::ImageInfo => {
                route_response_headers(response.headers_mut(), CspMode::Sandbox)
            }
            Route::Health | Route::Metrics | Route::Other => {}
        }
        if let Some(out) = self.routes.targeted_out(route) {
            let status = response.status();
            targeted_fields(response.headers_mut(), status, out, &self.targeted);
        }
        let status = response.status().as_u16();
        self.metrics.request(route.name(), status);
        let source = access_log::source_of(response.headers());
        response.map(|inner| LoggedBody {
            inner,
            span,
            log: Some(AccessLog {
                start,
                route: route.name(),
                source,
                status,
                bytes: 0,
                error,
                enabled: self.access_log,
                metrics: self.metrics.clone(),
            }),
        })
    }

    async fn dispatch<B>(
        &self,
        route: Route,
        req: Request<B>,
        client: Client,
        busy: Busy,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if req.method().as_str() == "PURGE" {
            self.admin.authorize_purge(req.headers())?;
            let key = self.routes.purge_key(route, req.uri())?;
            return Ok(self.admin.purge_one(&key).await);
        }
        if req.uri().path() == PURGE_PATH {
            return self.admin.purge_urls(req, &self.routes).await;
        }
        match route {
            Route::Health => {
                get_or_head(req.method())?;
                Ok(self.admin.health(req.uri().path(), req.headers()).await)
            }
            Route::Metrics => {
                get_or_head(req.method())?;
                Ok(self.admin.metrics_text().await)
            }
            Route::Other => Err(ProxyError::NotFound(format!(
                "no route for {}",
                req.uri().path()
            ))),
            Route::ImageInfo => {
                let (mut parts, _) = req.into_parts();
                let admitted = self.admission.admit(route, &mut parts, client)?;
                let head = get_or_head(&parts.method)?;
                let request = self.routes.image_info_source(&parts, &admitted.client)?;
                Box::pin(self.render.image_info(&self.proxy, request, head)).await
            }
            Route::Render { index, kind } => {
                let (mut parts, _) = req.into_parts();
                let admitted = self.admission.admit(route, &mut parts, client)?;
                get_or_head(&parts.method)?;
                let params = supabase::render_params(
                    kind,
                    parts.uri.query(),
                    self.render.config.max_dimension,
                )?;
                self.render.check_width(&params)?;
                let request = self
                    .routes
                    .render_source((index, kind), &parts, &admitted.client)?;
                let transformations = supabase::x_transformations(&params);
                // boxed: the render future is large, and held inline it would make every
                // request's future (hits included) larger to move and set up
                let mut response =
                    Box::pin(self.render.supabase(&self.proxy, request, params, &parts)).await?;
                if let Some(transformations) = transformations {
                    response
                        .headers_mut()
                        .insert(supabase::X_TRANSFORMATIONS, transformations);
                }
                Ok(response)
            }
            Route::ImageProxy | Route::Proxied { .. } => {
                let (mut parts, body) = req.into_parts();
                let admitted = self.admission.admit(route, &mut parts, client)?;
                match self
                    .routes
                    .resolve(admitted.route, &parts, &admitted.client)?
                {
                    Proxied::Cacheable(request) if admitted.route == Route::ImageProxy => {
                        match Params::from_image_proxy_query(
                            parts.uri.query(),
                            self.render.config.max_dimension,
                        )? {
                            Some(params) => {
                                Box::pin(self.render.image_proxy(
                                    &self.proxy,
                                    request,
                                    params,
                                    &parts,
                                ))
                                .await
                            }
                            None => self.proxy.handle(request).await,
                        }
                    }
                    Proxied::Cacheable(request) => self.proxy.handle(request).await,
                    Proxied::Forward {
                        namespace,
                        method,
                        url,
                        headers,
                        upload,
                        writes,
                    } => {
                        let capture = match &writes {
                            Some(w) if w.needs_body() => supabase::BODY_PREFIX_BYTES,
                            _ => 0,
                        };
                        // HTTP/1: a body nothing upstream wants any more is read to its end
                        // (HTTP/2 ends the stream without harm).
                        let linger = (parts.version < http::Version::HTTP_2).then(|| Linger {
                            tasks: self.proxy.tasks().clone(),
                            hold: Some(Box::new(busy.hold())),
                        });
                        let upload = Upload::new(body, &parts.headers, upload, capture, linger)?;
                        let captured = upload.captured.clone();
                        let response = self
                            .proxy
                            .forward(&namespace, method, url, headers, upload)
                            .await?;
                        if let Some(writes) = writes
                            && response.status().is_success()
                        {
                            self.invalidate(admitted.route, &writes, captured.body().as_deref())
                                .await;
                        }
                        Ok(response)
                    }
                }
            }
        }
    }
}

impl Router {
    /// Forgets what a successful Supabase write made stale: every stored response for the
    /// objects it changed (and so the renditions and source records made from them), as a
    /// purge of their paths would. `body`: the whole request body, when it was kept.
    async fn invalidate(&self, route: Route, writes: &supabase::Writes, body: Option<&[u8]>) {
        let paths = writes.stale_paths(body);
        for path in &paths {
            let key = path
                .parse::<http::Uri>()
                .ok()
                .and_then(|uri| self.routes.purge_key(route, &uri).ok());
            if let Some(key) = key {
                self.admin.tier.invalidate(&key).await;
            }
        }
        tracing::debug!(paths = paths.len(), "invalidated what the write changed");
    }
}

/// What every `/image-proxy` response carries, hits, misses and errors alike, whatever was
/// stored: a `Content-Security-Policy` under which nothing loads or runs (an SVG keeps its inline
/// styles), and no `Content-Disposition`.
fn image_proxy_headers(headers: &mut HeaderMap) {
    headers.remove(CONTENT_DISPOSITION);
    let svg = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(content::SVG.as_bytes()));
    let csp = if svg {
        &content::SVG_CSP
    } else {
        &content::IMAGE_CSP
    };
    headers.insert(CONTENT_SECURITY_POLICY, csp.clone());
}

/// What every route response carries: `X-Content-Type-Options: nosniff`, and unless the route
/// passes the origin's own policy, [`content::SCRIPT_CSP`] when its type could run script.
fn route_response_headers(headers: &mut HeaderMap, csp: CspMode) {
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if csp == CspMode::Sandbox && content::may_run_script(headers.get(CONTENT_TYPE)) {
        headers.insert(CONTENT_SECURITY_POLICY, content::SCRIPT_CSP.clone());
    }
}

/// `Location` and `Content-Location` values that point at the route's `upstream` (its scheme,
/// host and port, the scheme's default port written or not, and under its base path) rewritten
/// to point at the origin the client used ([`Asked::origin`]), as nginx's `proxy_redirect
/// default` does: redirects and the URLs an origin builds from its own address (a resumable
/// upload's `Location`) lead back through imgedge. Relative values and other origins' are left
/// as they are. Done per response, on the way out, never to what is stored: a stored response
/// keeps the origin's value, so one client's `Host` never reaches another.
fn rewrite_locations(headers: &mut HeaderMap, upstream: &Url, asked: &Asked) {
    let mut origin = None;
    for name in [LOCATION, CONTENT_LOCATION] {
        if !headers.contains_key(&name) {
            continue;
        }
        let Some(origin) = origin.get_or_insert_with(|| asked.origin()).as_deref() else {
            return;
        };
        let values: Vec<HeaderValue> = headers
            .get_all(&name)
            .iter()
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|v| under_upstream(v, upstream))
                    .map(|rest| {
                        let slash = if rest.starts_with('/') { "" } else { "/" };
                        format!("{origin}{slash}{rest}")
                    })
                    .and_then(|v| HeaderValue::from_str(&v).ok())
                    .unwrap_or_else(|| value.clone())
            })
            .collect();
        headers.remove(&name);
        for value in values {
            headers.append(name.clone(), value);
        }
    }
}

/// The rest of `location` (path, query, fragment, exactly as written) after `upstream`'s origin
/// and base path, when it is an absolute URL there; `None` otherwise.
fn under_upstream<'a>(location: &'a str, upstream: &Url) -> Option<&'a str> {
    let url = Url::parse(location).ok()?;
    let same_origin = url.scheme() == upstream.scheme()
        && url.host() == upstream.host()
        && url.port_or_known_default() == upstream.port_or_known_default();
    if !same_origin {
        return None;
    }
    let (_, after_scheme) = location.split_once("://")?;
    let rest = &after_scheme[after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len())..];
    let rest = rest.strip_prefix(upstream.path().trim_end_matches('/'))?;
    (rest.is_empty() || rest.starts_with(['/', '?', '#'])).then_some(rest)
}

/// `{"error": code, "message": text}` with the error's status (on the Supabase routes, in
/// Storage's shape: [`supabase::ErrorBody`]); never cached downstream, not sniffed, nothing in
/// it loads or runs, and its `Cache-Status` says whether the request went forward
/// (`fwd=uri-miss`: the origin failed or sent what imgedge refuses) or was refused by imgedge
/// itself, with the error code as `detail`.
fn error_response(e: &ProxyError, shape: Option<&supabase::ErrorBody>) -> Response<ProxyBody> {
    let (status, code) = e.status();
    let mut response = match shape {
        None => {
            let body = serde_json::json!({ "error": code, "message": e.client_message() });
            json_response(status, &body)
        }
        Some(shape) => {
            let (content_type, body) = shape.render(status, code, &e.client_message());
            let mut response = Response::new(ProxyBody::full(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, content_type);
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CONTENT_SECURITY_POLICY, content::IMAGE_CSP.clone());
    let cache_status = if e.went_forward() {
        CacheStatus::MISS.with_detail(code)
    } else {
        CacheStatus::refused(code)
    };
    headers.insert(CACHE_STATUS.clone(), cache_status.header_value());
    if matches!(
        e,
        ProxyError::Overloaded | ProxyError::Busy(_) | ProxyError::TransformTimeout
    ) {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ProxyError::RateLimited { retry_after } = e {
        // Whole seconds, rounded up: never 0, which would invite an immediate retry.
        let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    }
    if matches!(e, ProxyError::MethodNotAllowed(_)) {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// A JSON body with `status`; never cached downstream.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(location: &str, upstream: &str, host: &str) -> String {
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, HeaderValue::from_str(location).unwrap());
        headers.insert(CONTENT_LOCATION, HeaderValue::from_str(location).unwrap());
        let mut request = HeaderMap::new();
        request.insert(http::header::HOST, HeaderValue::from_str(host).unwrap());
        let client = Client {
            peer: "127.0.0.1:1".parse().unwrap(),
            ip: "127.0.0.1".parse().unwrap(),
            behind_proxy: false,
        };
        let asked = Asked::of(&request, &http::Uri::from_static("/"), &client);
        rewrite_locations(&mut headers, &Url::parse(upstream).unwrap(), &asked);
        assert_eq!(headers.get(LOCATION), headers.get(CONTENT_LOCATION));
        headers[LOCATION].to_str().unwrap().to_owned()
    }

    #[test]
    fn locations_at_the_upstream_are_rewritten_to_the_origin_the_client_used() {
        let up = "http://storage.internal:8000";
        let edge = "img.example:8080";
        for (location, expected) in [
            (
                "http://storage.internal:8000/storage/v1/upload/resumable/aGk%3D?x=1#f",
                "http://img.example:8080/storage/v1/upload/resumable/aGk%3D?x=1#f",
            ),
            // scheme and host compare as URLs do; the rest is kept exactly as written
            (
                "HTTP://Storage.Internal:8000//a/./b",
                "http://img.example:8080//a/./b",
            ),
            ("http://storage.internal:8000", "http://img.example:8080/"),
            (
                "http://storage.internal:8000?q",
                "http://img.example:8080/?q",
            ),
            // relative, another port, scheme or host: untouched
            ("/storage/v1/x", "/storage/v1/x"),
            (
                "http://storage.internal:8001/x",
                "http://storage.internal:8001/x",
            ),
            (
                "https://storage.internal:8000/x",
                "https://storage.internal:8000/x",
            ),
            ("http://elsewhere.example/x", "http://elsewhere.example/x"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(rewritten(location, up, edge), expected, "{location}");
        }
        // default ports, written or not, are the same origin
        assert_eq!(
            rewritten(
                "https://abcd.supabase.co:443/a",
                "https://abcd.supabase.co",
                "img.example"
            ),
            "http://img.example/a"
        );
        assert_eq!(
            rewritten("http://h/a", "http://h:80", "img.example:80"),
            "http://img.example:80/a"
        );
        // the upstream's base path is the route's root
        for (location, expected) in [
            ("http://h/base/files/a", "http://img.example/files/a"),
            ("http://h/base", "http://img.example/"),
            ("http://h/basement/a", "http://h/basement/a"),
            ("http://h/other/a", "http://h/other/a"),
        ] {
            assert_eq!(
                rewritten(location, "http://h/base/", "img.example"),
                expected
            );
        }
    }
}
