//! The route table: which route serves a path (built-in paths, then the longest `[[routes]]`
//! prefix), and how a request on a proxy route becomes a [`ProxyRequest`] (its upstream URL, its
//! guard, which headers it forwards; the Supabase credentials rule) or a forwarded request.

use http::header::{IF_NONE_MATCH, IF_RANGE, RANGE};
use http::request::Parts;
use http::{HeaderMap, Method, Uri};
use percent_encoding::percent_decode_str;
use std::time::Duration;
use url::Url;

use super::client::Client;
use super::supabase::{RenderKind, SUPABASE_PUBLIC_PREFIX, SUPABASE_SIGNED_PREFIX, Writes};
use crate::cache::{CacheKey, Placement};
use crate::config::{Config, RouteConfig, TargetedOut};
use crate::error::ProxyError;
use crate::freshness::RequestDirectives;
use crate::proxy::{CREDENTIALS, Forwarding, ProxyRequest, route_request_headers};
use crate::target::{self, HostPattern};
use crate::upstream::{Guard, UploadLimits};

/// The path of `/image-info`, and the prefix of its route-path form.
pub(crate) const IMAGE_INFO_PATH: &str = "/image-info";

/// The cache namespace of `/image-proxy`'s objects (a route's is its prefix, which starts with
/// `/`: the two never meet).
pub(crate) const IMAGE_PROXY_NAMESPACE: &str = "image-proxy";

/// What a request is for. The built-in paths win over `[[routes]]` prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    ImageProxy,
    Health,
    Metrics,
    /// `/image-info`: an `/image-proxy` target's or a route path's image metadata.
    ImageInfo,
    /// Supabase's render routes (public, authenticated, signed); `index` is the Supabase
    /// route's.
    Render {
        index: usize,
        kind: RenderKind,
    },
    /// `config.routes[index]`, named `name` in logs and metrics.
    Proxied {
        index: usize,
        name: &'static str,
    },
    Other,
}

impl Route {
    /// The route's name in logs and metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Route::ImageProxy => "image-proxy",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Render { .. } => "render",
            Route::ImageInfo => "image-info",
            Route::Proxied { name, .. } => name,
            Route::Other => "other",
        }
    }
}

/// A request on a proxy route, resolved.
pub(crate) enum Proxied {
    /// GET or HEAD: looked up, fetched, stored.
    Cacheable(ProxyRequest),
    /// Any other method (routes only): forwarded with its body, never stored.
    Forward {
        /// The route's cache namespace, where a successful request invalidates.
        namespace: String,
        method: Method,
        url: Url,
        headers: HeaderMap,
        /// What its body is held to.
        upload: UploadLimits,
        /// On the Supabase route, the objects it changes when it succeeds.
        writes: Option<Writes>,
    },
}

/// The routes of one configuration.
pub struct Routes {
    routes: Vec<RouteConfig>,
    /// `[server] max_url_bytes`: the longest `url=` target, and route path and query, accepted.
    max_url_bytes: usize,
    /// `[server] max_request_body_bytes` and `request_body_timeout`.
    upload: UploadLimits,
    /// `[cache] default_ttl`: `/image-proxy`'s freshness for responses that state none.
    default_ttl: Duration,
    /// `[server] public_hosts`: the hosts imgedge is reached by, passed on to origins.
    public_hosts: Vec<HostPattern>,
    /// The targeted cache-control fields each route's responses carry towards a CDN (by route
    /// index), and `/image-proxy`'s and `/image-info`'s (`[cache]`'s).
    targeted_out: Vec<TargetedOut>,
    default_targeted_out: TargetedOut,
}

impl Routes {
    pub fn new(config: &Config) -> Self {
        Routes {
            routes: config.routes.clone(),
            max_url_bytes: config.server.max_url_bytes,
            upload: UploadLimits {
                max_bytes: config.server.max_request_body_bytes,
                idle_timeout: config.server.request_body_timeout,
            },
            default_ttl: config.cache.default_ttl,
            public_hosts: config.server.public_hosts.clone(),
            targeted_out: config
                .routes
                .iter()
                .map(|r| r.targeted_out(&config.cache.targeted_out))
                .collect(),
            default_targeted_out: config.cache.targeted_out.clone(),
        }
    }

    /// What responses of `route` carry towards a CDN in front (`CDN-Cache-Control`,
    /// `Surrogate-Control`); `None` for imgedge's own endpoints.
    pub(crate) fn targeted_out(&self, route: Route) -> Option<&TargetedOut> {
        match route {
            Route::Proxied { index, .. } | Route::Render { index, .. } => {
                self.targeted_out.get(index)
            }
            Route::ImageProxy | Route::ImageInfo => Some(&self.default_targeted_out),
            Route::Health | Route::Metrics | Route::Other => None,
        }
    }

    /// The configuration of `routes[index]` (of [`Route::Proxied`] and [`Route::Render`]).
    pub(crate) fn config(&self, index: usize) -> &RouteConfig {
        &self.routes[index]
    }

    /// Which route serves `path`: a built-in path, else the route with the longest matching
    /// prefix.
    pub fn route_of(&self, path: &str) -> Route {
        match path {
            "/image-proxy" => Route::ImageProxy,
            "/health" | "/health/live" | "/health/ready" => Route::Health,
            "/metrics" => Route::Metrics,
            _ if path == IMAGE_INFO_PATH
                || path
                    .strip_prefix(IMAGE_INFO_PATH)
                    .is_some_and(|rest| rest.starts_with('/')) =>
            {
                Route::ImageInfo
            }
            _ => self
                .routes
                .iter()
                .enumerate()
                .filter(|(_, r)| path.starts_with(&r.prefix))
                .max_by_key(|(_, r)| r.prefix.len())
                .map_or(Route::Other, |(index, r)| {
                    if r.name == "supabase"
                        && let Some(kind) = RenderKind::of(path)
                    {
                        Route::Render { index, kind }
                    } else {
                        Route::Proxied {
                            index,
                            name: r.name,
                        }
                    }
                }),
        }
    }

    /// The request on a proxy route, resolved: its target, guard and forwarding.
    ///
    /// # Errors
    /// [`ProxyError::Target`] for a bad `/image-proxy` target, [`ProxyError::BadPath`] for a
    /// route path that would climb out of its prefix, [`ProxyError::UriTooLong`] for a route
    /// path and query over `max_url_bytes`, [`ProxyError::MethodNotAllowed`] for other
    /// than GET or HEAD on `/image-proxy`; [`ProxyError::NotFound`] for a route that does not
    /// proxy.
    pub(crate) fn resolve(
        &self,
        route: Route,
        parts: &Parts,
        client: &Client,
    ) -> Result<Proxied, ProxyError> {
        match route {
            Route::ImageProxy => {
                let head = get_or_head(&parts.method)?;
                let url = target::parse_image_url(parts.uri.query(), self.max_url_bytes)?;
                Ok(Proxied::Cacheable(proxy_request(
                    parts,
                    IMAGE_PROXY_NAMESPACE,
                    url,
                    Some(self.default_ttl),
                    Guard::Guarded,
                    head,
                    Forwarding::Bare,
                )))
            }
            Route::Proxied { index, name } => {
                let route = &self.routes[index];
                let target = parts.uri.path_and_query().map_or(0, |p| p.as_str().len());
                if target > self.max_url_bytes {
                    return Err(ProxyError::UriTooLong {
                        length_bytes: target,
                        max_bytes: self.max_url_bytes,
                    });
                }
                let url = route_url(&route.upstream, &parts.uri)?;
                // Public Supabase objects need no credentials, and supabase-js sends its key with
                // every request: dropping them keeps public objects storable (RFC 9111 §3.5).
                let public_object =
                    name == "supabase" && parts.uri.path().starts_with(SUPABASE_PUBLIC_PREFIX);
                let credentialed =
                    !public_object && CREDENTIALS.iter().any(|h| parts.headers.contains_key(h));
                let shareable = matches!(parts.method, Method::GET | Method::HEAD) && !credentialed;
                let forwarded =
                    super::client::forwarded(parts, client, &self.public_hosts, shareable);
                let headers = route_request_headers(
                    &parts.headers,
                    &route.forward_request_headers,
                    public_object,
                    &forwarded,
                    route.preserve_host,
                );
                match parts.method {
                    Method::GET | Method::HEAD => {
                        let forwarding = Forwarding::Headers {
                            headers,
                            strip_set_cookie: public_object,
                            store_set_cookie: route.store_set_cookie,
                        };
                        let mut request = proxy_request(
                            parts,
                            &route.prefix,
                            url,
                            route.default_ttl,
                            Guard::Trusted,
                            parts.method == Method::HEAD,
                            forwarding,
                        );
                        // a signed URL is good until its token expires, and no longer
                        if name == "supabase"
                            && parts.uri.path().starts_with(SUPABASE_SIGNED_PREFIX)
                        {
                            request.expires_at =
                                super::supabase::TokenClaims::of_query(parts.uri.query())
                                    .and_then(|c| c.expires_at());
                        }
                        Ok(Proxied::Cacheable(request))
                    }
                    _ => Ok(Proxied::Forward {
                        namespace: route.prefix.clone(),
                        method: parts.method.clone(),
                        url,
                        headers,
                        upload: self.upload,
                        writes: (name == "supabase")
                            .then(|| Writes::of(&parts.method, &parts.uri, &parts.headers))
                            .flatten(),
                    }),
                }
            }
            _ => Err(ProxyError::NotFound(format!(
                "no route for {}",
                parts.uri.path()
            ))),
        }
    }

    /// The `/image-proxy` or route request whose object an `/image-info` request describes: its
    /// target (`?url=`) or route path, as a GET of the object (no conditionals, no range).
    ///
    /// # Errors
    /// [`ProxyError::NotFound`] for a route path no object route serves; as [`Routes::resolve`].
    pub(crate) fn image_info_source(
        &self,
        parts: &Parts,
        client: &Client,
    ) -> Result<ProxyRequest, ProxyError> {
        let path = parts.uri.path();
        let query = parts
            .uri
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let (route, target) = if path == IMAGE_INFO_PATH {
            (Route::ImageProxy, format!("/image-proxy{query}"))
        } else {
            let rest = path
                .strip_prefix(IMAGE_INFO_PATH)
                .filter(|rest| rest.starts_with('/'))
                .ok_or_else(|| ProxyError::NotFound(format!("no route for {path}")))?;
            match self.route_of(rest) {
                route @ Route::Proxied { .. } => (route, format!("{rest}{query}")),
                _ => {
                    return Err(ProxyError::NotFound(format!(
                        "no object route serves {rest}"
                    )));
                }
            }
        };
        let (mut object, ()) = http::Request::new(()).into_parts();
        object.method = Method::GET;
        object.uri = target
            .parse()
            .map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))?;
        object.version = parts.version;
        object.headers = parts.headers.clone();
        match self.resolve(route, &object, client)? {
            Proxied::Cacheable(mut request) => {
                request.head = false;
                request.if_none_match = None;
                request.range = None;
                request.if_range = None;
                Ok(request)
            }
            Proxied::Forward { .. } => unreachable!("a GET resolves to a cacheable request"),
        }
    }

    /// The request for the object a request on Supabase's render route of `kind` renders:
    /// the object route of that kind on route `index`, as [`Routes::resolve`] makes it (see
    /// `object_parts`); `head` as the render request's method.
    ///
    /// # Errors
    /// As [`Routes::resolve`]; [`ProxyError::MethodNotAllowed`] for other than GET and HEAD.
    pub(crate) fn render_source(
        &self,
        (index, kind): (usize, RenderKind),
        parts: &Parts,
        client: &Client,
    ) -> Result<ProxyRequest, ProxyError> {
        let head = get_or_head(&parts.method)?;
        let route = Route::Proxied {
            index,
            name: "supabase",
        };
        match self.resolve(route, &object_parts(parts, kind)?, client)? {
            Proxied::Cacheable(mut request) => {
                request.head = head;
                Ok(request)
            }
            Proxied::Forward { .. } => unreachable!("a GET resolves to a cacheable request"),
        }
    }

    /// The cache key a `PURGE` of `uri` on `route` names: the object of that route. On the
    /// render route, the source object (purging it purges its renditions and source record).
    ///
    /// # Errors
    /// As [`Routes::resolve`]; [`ProxyError::NotFound`] on a route that stores nothing.
    pub fn purge_key(&self, route: Route, uri: &Uri) -> Result<CacheKey, ProxyError> {
        match route {
            Route::Render { index, kind } => {
                let rest = uri
                    .path()
                    .strip_prefix(kind.render_prefix())
                    .unwrap_or_default();
                let token = (kind == RenderKind::Signed)
                    .then(|| uri.query().and_then(signed_token))
                    .flatten()
                    .map(|t| format!("?{t}"))
                    .unwrap_or_default();
                let object: Uri = format!("{}{rest}{token}", kind.object_prefix())
                    .parse()
                    .map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))?;
                self.purge_key(
                    Route::Proxied {
                        index,
                        name: "supabase",
                    },
                    &object,
                )
            }
            Route::ImageProxy => Ok(CacheKey::new(
                IMAGE_PROXY_NAMESPACE,
                &target::parse_image_url(uri.query(), self.max_url_bytes)?,
            )),
            Route::Proxied { index, .. } => {
                let route = &self.routes[index];
                Ok(CacheKey::new(
                    &route.prefix,
                    &route_url(&route.upstream, uri)?,
                ))
            }
            _ => Err(ProxyError::NotFound(
                "nothing cacheable at this path".into(),
            )),
        }
    }
}

/// The `token=...` pair of a signed URL's query, as it was sent.
pub(crate) fn signed_token(query: &str) -> Option<&str> {
    query.split('&').find(|p| p.starts_with("token="))
}

/// The object-route request for a render request of `kind`: the same bucket and path under
/// the object route of that kind, GET, the request's headers (credentials included: the
/// object route decides what it forwards), no query but a signed URL's `token`.
fn object_parts(parts: &Parts, kind: RenderKind) -> Result<Parts, ProxyError> {
    let path = parts.uri.path();
    let rest = path
        .strip_prefix(kind.render_prefix())
        .ok_or_else(|| ProxyError::NotFound(format!("no route for {path}")))?;
    let token = match kind {
        RenderKind::Signed => parts
            .uri
            .query()
            .and_then(signed_token)
            .map(|t| format!("?{t}"))
            .unwrap_or_default(),
        RenderKind::Public | RenderKind::Authenticated => String::new(),
    };
    let uri = format!("{}{rest}{token}", kind.object_prefix())
        .parse()
        .map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))?;
    let (mut object, ()) = http::Request::new(()).into_parts();
    object.method = Method::GET;
    object.uri = uri;
    object.version = parts.version;
    object.headers = parts.headers.clone();
    Ok(object)
}

/// `false` for GET, `true` for HEAD.
///
/// # Errors
/// [`ProxyError::MethodNotAllowed`] for any other method.
pub(crate) fn get_or_head(method: &Method) -> Result<bool, ProxyError> {
    match *method {
        Method::GET => Ok(false),
        Method::HEAD => Ok(true),
        ref m => Err(ProxyError::MethodNotAllowed(m.clone())),
    }
}

fn proxy_request(
    parts: &Parts,
    namespace: &str,
    url: Url,
    default_ttl: Option<Duration>,
    guard: Guard,
    head: bool,
    forwarding: Forwarding,
) -> ProxyRequest {
    let key = CacheKey::new(namespace, &url);
    ProxyRequest {
        expires_at: None,
        primary: key.clone(),
        key,
        url,
        guard,
        head,
        if_none_match: parts.headers.get(IF_NONE_MATCH).cloned(),
        range: parts.headers.get(RANGE).cloned(),
        if_range: parts.headers.get(IF_RANGE).cloned(),
        directives: RequestDirectives::parse(&parts.headers),
        default_ttl,
        forwarding,
        placement: Placement::Everywhere,
    }
}

/// `upstream` + the request's path and query, exactly as the client sent them (imgedge does not
/// normalise paths: see [`check_path`]).
///
/// # Errors
/// [`ProxyError::BadPath`] for a path [`check_path`] refuses.
fn route_url(upstream: &Url, uri: &Uri) -> Result<Url, ProxyError> {
    check_path(uri.path())?;
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let joined = format!(
        "{}{path_and_query}",
        upstream.as_str().trim_end_matches('/')
    );
    Url::parse(&joined).map_err(|e| ProxyError::BadPath(format!("invalid path: {e}")))
}

/// Refuses a route path that could reach outside its route's prefix on an origin that decodes or
/// normalises it (RFC 3986 §6.2.2) before resolving it. Each segment between raw `/`s is
/// percent-decoded once and refused when it is a dot segment (`.` or `..`, also with path
/// parameters: `..;x`, as Tomcat reads them), contains `/` or `\` (`..%2F`, `..%5C`), a control
/// character or NUL, or still percent-encodes a dot, slash or backslash after decoding (`%252e`:
/// for origins that decode twice). Nothing is rewritten: the path goes upstream and into the
/// cache key as it was sent (case of percent-encodings, encoded unreserved characters, empty
/// segments `//` and a trailing `/` all kept).
///
/// # Errors
/// [`ProxyError::BadPath`], naming the segment.
pub(crate) fn check_path(path: &str) -> Result<(), ProxyError> {
    for segment in path.split('/') {
        let decoded = percent_decode_str(segment).decode_utf8_lossy();
        let name = decoded.split(';').next().unwrap_or_default();
        let lower = decoded.to_ascii_lowercase();
        let refused = name == "."
            || name == ".."
            || decoded.contains(['/', '\\'])
            || decoded.chars().any(char::is_control)
            || ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e));
        if refused {
            return Err(ProxyError::BadPath(format!(
                "path segment {segment:?} is not allowed"
            )));
        }
    }
    Ok(())
}
