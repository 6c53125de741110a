//! The HTTP face: [`Router`] answers every request — route it ([`routes`]), admit it
//! ([`admit`]) or serve the operator's endpoints ([`admin`]), hand it to the proxy, render a
//! [`ProxyError`] as JSON — and wraps every response in the access log's body
//! ([`access_log`]). The only module, with `error.rs`, that decides client status codes.

pub mod access_log;
pub mod admin;
pub mod admit;
pub mod info;
pub mod rate;
pub mod record;
pub mod render;
pub mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    ALLOW, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, RETRY_AFTER,
    X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tracing::Instrument;
use tracing::field::Empty;

pub use access_log::LoggedBody;
pub use admin::{Admin, PURGE_PATH};
pub use admit::{Admission, Admitted, Client};
pub use render::Render;
pub use routes::{Route, Routes, SUPABASE_PUBLIC_PREFIX, SUPABASE_RENDER_PREFIX};

use crate::body::ProxyBody;
use crate::config::CspMode;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::proxy::{CACHE_STATUS, CacheStatus, Proxy, content};
use crate::transform::Params;
use crate::upstream::{BoxError, Upload};
use access_log::{AccessLog, REQUEST_ID, RequestIds};
use routes::{Proxied, get_or_head};

/// Everything a request needs, shared by all connections.
pub struct Router {
    pub routes: Routes,
    pub admission: Admission,
    pub admin: Admin,
    pub render: Render,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub request_ids: RequestIds,
    /// `[log] access`: write an access line per request.
    pub access_log: bool,
}

impl Router {
    /// Answers one request that came from `peer`. Never fails: errors become JSON responses.
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<LoggedBody>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let route = self.routes.route_of(req.uri().path());
        let id = self.request_ids.of(req.headers());
        let client = self.admission.client(req.headers(), peer);
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
            .dispatch(route, req, client)
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
                (error_response(&e), Some(message))
            }
        };
        response.headers_mut().insert(REQUEST_ID.clone(), id);
        match route {
            Route::ImageProxy => image_proxy_headers(response.headers_mut()),
            Route::Proxied { index, .. } => route_response_headers(
                response.headers_mut(),
                self.routes.config(index).content_security_policy,
            ),
            Route::Render { .. } | Route::ImageInfo => {
                route_response_headers(response.headers_mut(), CspMode::Sandbox)
            }
            Route::Health | Route::Metrics | Route::Other => {}
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
                Box::pin(info::handle(
                    &self.proxy,
                    &self.routes,
                    &parts,
                    &admitted.client,
                    self.render.config.max_source_bytes,
                ))
                .await
            }
            Route::Render { index } => {
                let (mut parts, _) = req.into_parts();
                let admitted = self.admission.admit(route, &mut parts, client)?;
                // boxed: the render future is large, and held inline it would make every
                // request's future (hits included) larger to move and set up
                Box::pin(self.render.handle(
                    &self.proxy,
                    &self.routes,
                    index,
                    &parts,
                    &admitted.client,
                ))
                .await
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
                    } => {
                        let upload = Upload::new(body, &parts.headers, upload)?;
                        self.proxy
                            .forward(&namespace, method, url, headers, upload)
                            .await
                    }
                }
            }
        }
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

/// `{"error": code, "message": text}` with the error's status; never cached downstream, not
/// sniffed, nothing in it loads or runs, and its `Cache-Status` says whether the request went
/// forward (`fwd=uri-miss`: the origin failed or sent what imgedge refuses) or was refused by
/// imgedge itself, with the error code as `detail`.
fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let (status, code) = e.status();
    let body = serde_json::json!({ "error": code, "message": e.client_message() });
    let mut response = json_response(status, &body);
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
