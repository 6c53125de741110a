//! Fetching from origins: hyper-util's pooled client over rustls (ring, native roots), timeouts,
//! redirects, and a response body that enforces `idle_timeout`, `max_object_bytes` and the
//! announced `Content-Length`.
//!
//! The client is hyper-util's rather than reqwest (which wraps it) because memory control needs a
//! knob reqwest does not expose: the per-connection read buffer. reqwest lets hyper grow it to
//! ~800 KiB for a fast origin and keeps it for the connection's life; measured, 32 slow clients
//! on one large object grew RSS by 35–52 MiB that way. Here it is fixed at
//! [`READ_BUFFER_BYTES`], and HTTP/2 flow-control windows are bounded likewise.
//!
//! `/image-proxy` fetches are *guarded*: the resolver drops non-global addresses (so the check
//! applies to the very addresses dialled, defeating DNS rebinding), literal IP hosts, which no
//! resolver sees, are checked before sending, and every redirect hop is checked like the first
//! URL. Route fetches (operator-configured upstreams) are not checked and never follow redirects.
//! Nothing here knows about caching or the status codes sent to clients.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, LOCATION, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::{ConfigBuilderExt, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioTimer;
use url::Url;

mod body;
mod inflight;
mod resolver;
mod sockets;
mod upload;

pub(crate) use body::UpstreamBody;

use inflight::{InflightGuard, InflightRegistry};
use resolver::GuardedResolver;
use sockets::{Counted, SocketsExhausted};
use tokio::sync::Semaphore;
pub(crate) use upload::{Linger, Upload, UploadError, UploadLimits, UploadProgress};

use crate::config::UpstreamConfig;
use crate::descriptors::DescriptorBudget;
use crate::freshness::ResponseTimes;
use crate::target::{HostPolicy, TargetError};
use crate::tasks::Tasks;

/// Size of each HTTP/1.1 connection's read buffer, in bytes: the most an origin connection holds
/// in user space, and the largest chunk handed to a client.
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;
/// HTTP/2 flow-control window per stream: the most an origin may send ahead of a slow client.
const H2_STREAM_WINDOW_BYTES: u32 = 256 * 1024;
/// HTTP/2 flow-control window per connection, shared by its streams.
const H2_CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
/// How long an idle pooled connection to an origin is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a fetch failed, before or after the response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The target or a redirect hop is not allowed, or resolves only to non-global addresses.
    #[error(transparent)]
    Refused(#[from] TargetError),
    /// No connection or no complete response head within the limit.
    #[error("upstream timed out: no {phase} within {after:?}")]
    Timeout {
        phase: &'static str,
        after: Duration,
    },
    /// Connection refused or reset before the head, TLS failure, malformed response.
    #[error("upstream request failed: {0}")]
    Request(String),
    /// More redirects than `max_redirects`.
    #[error("upstream redirected more than {0} times")]
    TooManyRedirects(usize),
    /// A guarded redirect not followed: its `Location` is not an http(s) URL, or it goes from
    /// https to http without `allow_https_downgrade`.
    #[error("{0}")]
    BadRedirect(String),
    /// The announced `Content-Length` exceeds `max_object_bytes`.
    #[error(
        "upstream object is {length_bytes} bytes, over upstream.max_object_bytes ({max_bytes})"
    )]
    TooLarge { length_bytes: u64, max_bytes: u64 },
    /// The body grew past `max_object_bytes` (no `Content-Length` was announced).
    #[error("upstream body passed upstream.max_object_bytes ({max_bytes}) bytes")]
    BodyTooLarge { max_bytes: u64 },
    /// No body bytes arrived for `idle_timeout`.
    #[error("upstream body stalled for {0:?}")]
    Stalled(Duration),
    /// The fetch ran past `total_timeout` (the in-flight watchdog).
    #[error("upstream fetch passed upstream.total_timeout ({0:?})")]
    TotalTimeout(Duration),
    /// A fill no client was reading, aborted under emergency memory pressure.
    #[error("fill with no client reading it aborted under emergency memory pressure")]
    Shed,
    /// The body ended, or failed, before `Content-Length` bytes arrived, or sent more.
    #[error("upstream body ended after {received_bytes} of {expected_bytes} bytes")]
    LengthMismatch {
        received_bytes: u64,
        expected_bytes: u64,
    },
    /// The connection failed mid-body (reset, protocol error).
    #[error("upstream body failed after {received_bytes} bytes: {reason}")]
    Body { received_bytes: u64, reason: String },
    /// The client's request body could not be sent: too large, stalled, or cut off.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// `[upstream] max_in_flight` requests are in flight, or every upstream socket allowed is
    /// open: nothing was sent.
    #[error("{0}")]
    Busy(&'static str),
}

/// Which rules a fetch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guard {
    /// `/image-proxy`: client-chosen targets, subject to [`HostPolicy`]; follows redirects.
    Guarded,
    /// Operator-configured route upstreams: not checked, redirects passed to the client.
    Trusted,
}

type HttpClient = Client<Counted<HttpsConnector<HttpConnector<GuardedResolver>>>, RequestBody>;

/// A request body sent upstream: empty for cache fills, the client's body streamed for other
/// methods on routes.
pub(crate) type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty [`RequestBody`].
pub(crate) fn empty_body() -> RequestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// One request to an origin.
pub(crate) struct UpstreamRequest {
    pub method: Method,
    pub url: Url,
    /// End-to-end headers to send (already filtered of hop-by-hop ones and `Host`). The
    /// configured `User-Agent` is added when there is none.
    pub headers: HeaderMap,
    /// Sent as is; a guarded fetch must have an empty body (redirects re-send it).
    pub body: RequestBody,
    /// For a client's body ([`Upload`]): its progress, so that `header_timeout` starts once it
    /// has been sent and its failure is reported as such.
    pub upload: Option<UploadProgress>,
    pub guard: Guard,
}

impl UpstreamRequest {
    /// A bodiless GET or HEAD without client headers, as `/image-proxy` sends.
    pub(crate) fn bare(method: Method, url: Url, guard: Guard) -> Self {
        UpstreamRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: empty_body(),
            upload: None,
            guard,
        }
    }
}

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("TLS setup: {0}")]
    Tls(rustls::Error),
    #[error("upstream.user_agent is not a valid header value")]
    UserAgent,
}

/// The origin-facing side: connection pools and limits. Shared behind an `Arc`.
pub(crate) struct Upstream {
    guarded: HttpClient,
    trusted: HttpClient,
    policy: Arc<HostPolicy>,
    user_agent: HeaderValue,
    connect_timeout: Duration,
    header_timeout: Duration,
    idle_timeout: Duration,
    total_timeout: Duration,
    max_object_bytes: u64,
    max_redirects: usize,
    allow_https_downgrade: bool,
    inflight: Arc<InflightRegistry>,
    /// Upstream sockets open now (busy or idle in the pools) are this bound less its permits.
    sockets: Arc<Semaphore>,
    max_sockets: usize,
}

/// A response from an origin: its head, and its body still unread.
pub(crate) struct UpstreamResponse {
    pub head: UpstreamHead,
    pub body: UpstreamBody,
}

/// The head of an origin's response.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Content-Length` as announced (absent for chunked bodies and HEAD without one).
    pub content_length: Option<u64>,
    /// When the request was sent and the head arrived (RFC 9111 §4.2.3).
    pub times: ResponseTimes,
}

impl Upstream {
    /// Builds both connection pools, their connection tasks run on `tasks`: at most
    /// `budget.max_in_flight` requests in flight and `budget.max_upstream_sockets` sockets open.
    ///
    /// # Errors
    /// [`SetupError::Tls`] when the TLS configuration cannot be built, [`SetupError::UserAgent`]
    /// when `[upstream] user_agent` is not a valid header value.
    pub(crate) fn new(
        config: &UpstreamConfig,
        budget: &DescriptorBudget,
        tasks: &Tasks,
    ) -> Result<Self, SetupError> {
        let policy = Arc::new(HostPolicy::new(
            config.allowed_hosts.clone(),
            config.trusted_private_hosts.clone(),
            config.allow_private_networks,
        ));
        let tls = tls_config()?;
        let sockets = Arc::new(Semaphore::new(budget.max_upstream_sockets));
        let client = |resolver: GuardedResolver| {
            let mut http = HttpConnector::new_with_resolver(resolver);
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(config.connect_timeout));
            let https = HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(http);
            let counted = Counted {
                inner: https,
                sockets: sockets.clone(),
            };
            Client::builder(tasks.clone())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .http1_read_buf_exact_size(READ_BUFFER_BYTES)
                .http2_initial_stream_window_size(H2_STREAM_WINDOW_BYTES)
                .http2_initial_connection_window_size(H2_CONNECTION_WINDOW_BYTES)
                .timer(TokioTimer::new())
                .build(counted)
        };
        Ok(Upstream {
            guarded: client(GuardedResolver {
                policy: Some(policy.clone()),
            }),
            trusted: client(GuardedResolver { policy: None }),
            policy,
            user_agent: HeaderValue::from_str(&config.user_agent)
                .map_err(|_| SetupError::UserAgent)?,
            connect_timeout: config.connect_timeout,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            total_timeout: config.total_timeout,
            max_object_bytes: config.max_object_bytes,
            max_redirects: config.max_redirects,
            allow_https_downgrade: config.allow_https_downgrade,
            inflight: Arc::new(InflightRegistry::new(budget.max_in_flight)),
            sockets,
            max_sockets: budget.max_upstream_sockets,
        })
    }

    /// Checks a client-chosen URL against `allowed_hosts` and, for literal IPs, the address
    /// rules, before anything is sent.
    ///
    /// # Errors
    /// [`TargetError::HostNotAllowed`] or [`TargetError::PrivateAddress`].
    pub(crate) fn check_target(&self, url: &Url) -> Result<(), TargetError> {
        self.policy.check_url(url)
    }

    /// Sends `method` (GET or HEAD) for `url` and returns once the response head has arrived;
    /// the body streams from [`UpstreamResponse::body`]. A guarded fetch follows up to
    /// `max_redirects` redirects, checking each hop.
    ///
    /// # Errors
    /// [`UpstreamError::Timeout`] when no connection within `connect_timeout` or no head within
    /// `header_timeout` (per hop); [`UpstreamError::TooLarge`] when `Content-Length` exceeds
    /// `max_object_bytes` (the body is then never read); [`UpstreamError::Refused`] when a guarded
    /// target or hop is not allowed or resolves only to non-global addresses;
    /// [`UpstreamError::TooManyRedirects`]; [`UpstreamError::Request`] for anything else before
    /// the head.
    pub(crate) async fn fetch(
        &self,
        request: UpstreamRequest,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let UpstreamRequest {
            method,
            mut url,
            headers,
            body,
            upload,
            guard,
        } = request;
        let mut hops = 0;
        let request_time = SystemTime::now();
        let inflight = self
            .inflight
            .register(url.as_str())
            .ok_or(UpstreamError::Busy(
                "upstream.max_in_flight requests are in flight",
            ))?;
        if guard == Guard::Trusted {
            let response = self
                .send(&self.trusted, &method, &url, &headers, body, upload.clone())
                .await?;
            return self.receive(response, &method, request_time, inflight, upload);
        }
        loop {
            self.check_target(&url)?;
            let response = self
                .send(&self.guarded, &method, &url, &headers, empty_body(), None)
                .await?;
            let next = redirect_target(
                &url,
                response.status(),
                response.headers(),
                self.allow_https_downgrade,
            )?;
            let Some(next) = next else {
                return self.receive(response, &method, request_time, inflight, None);
            };
            if hops == self.max_redirects {
                return Err(UpstreamError::TooManyRedirects(self.max_redirects));
            }
            hops += 1;
            url = next;
        }
    }

    /// Sends one request and waits for its head: `header_timeout` from when the request (its
    /// body included, for an upload) has been sent.
    async fn send(
        &self,
        client: &HttpClient,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: RequestBody,
        upload: Option<UploadProgress>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .body(body)
            .map_err(|e| UpstreamError::Request(format!("cannot request {url}: {e}")))?;
        *request.headers_mut() = headers.clone();
        if !request.headers().contains_key(USER_AGENT) {
            request
                .headers_mut()
                .insert(USER_AGENT, self.user_agent.clone());
        }
        let response = client.request(request);
        tokio::pin!(response);
        if let Some(mut upload) = upload.clone() {
            // While the body moves, its own limits apply; an origin may answer early.
            tokio::select! {
                result = &mut response => return self.head(result, upload.failure()),
                sent = upload.sent() => sent?,
            }
        }
        match tokio::time::timeout(self.header_timeout, response).await {
            Err(_) => Err(UpstreamError::Timeout {
                phase: "response head",
                after: self.header_timeout,
            }),
            Ok(result) => self.head(result, upload.and_then(|u| u.failure())),
        }
    }

    /// The head, or why there is none: the upload's failure first (the client's fault, not
    /// the origin's), then the client error's classification.
    fn head(
        &self,
        result: Result<http::Response<Incoming>, hyper_util::client::legacy::Error>,
        upload_failure: Option<UploadError>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        match (result, upload_failure) {
            (Ok(r), _) => Ok(r),
            (Err(_), Some(e)) => Err(e.into()),
            (Err(e), None) => Err(self.classify(&e)),
        }
    }

    /// Checks the announced length and wraps the body (which gives the request's `upload` up
    /// when it is over first).
    fn receive(
        &self,
        response: http::Response<Incoming>,
        method: &Method,
        request_time: SystemTime,
        inflight: InflightGuard,
        upload: Option<UploadProgress>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let response_time = SystemTime::now();
        let (parts, incoming) = response.into_parts();
        let content_length = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = content_length
            && length > self.max_object_bytes
        {
            if let Some(upload) = &upload {
                upload.abandon();
            }
            return Err(UpstreamError::TooLarge {
                length_bytes: length,
                max_bytes: self.max_object_bytes,
            });
        }
        // A HEAD response, 204 and 304 have no body whatever their Content-Length says.
        let bodyless = *method == Method::HEAD
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        let deadline = inflight.started + self.total_timeout;
        let body = UpstreamBody {
            incoming,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            total_timeout: self.total_timeout,
            _inflight: inflight,
            idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
            idle_timeout: self.idle_timeout,
            waiting: false,
            received_bytes: 0,
            expected_bytes: if bodyless { Some(0) } else { content_length },
            max_bytes: self.max_object_bytes,
            done: false,
            peeked: None,
            upload,
        };
        Ok(UpstreamResponse {
            head: UpstreamHead {
                status: parts.status,
                headers: parts.headers,
                content_length,
                times: ResponseTimes {
                    request_time,
                    response_time,
                },
            },
            body,
        })
    }

    /// The fetches in flight: how many, and the `oldest` of them as (URL, age), oldest first.
    pub(crate) fn inflight(&self, oldest: usize) -> (usize, Vec<(Arc<str>, Duration)>) {
        self.inflight.snapshot(oldest)
    }

    /// Upstream sockets open now, busy or idle in the pools.
    pub(crate) fn open_sockets(&self) -> usize {
        self.max_sockets - self.sockets.available_permits()
    }

    /// Turns a client error from before the head into an [`UpstreamError`], finding the guard's
    /// refusals and connect timeouts anywhere in its source chain.
    fn classify(&self, e: &(dyn std::error::Error + 'static)) -> UpstreamError {
        let mut source = Some(e);
        while let Some(err) = source {
            if let Some(t) = err.downcast_ref::<TargetError>() {
                return UpstreamError::Refused(t.clone());
            }
            if err.is::<SocketsExhausted>() {
                return UpstreamError::Busy("every upstream socket allowed is open");
            }
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return UpstreamError::Timeout {
                    phase: "connection",
                    after: self.connect_timeout,
                };
            }
            source = err.source();
        }
        UpstreamError::Request(error_chain(e))
    }
}

/// Where a guarded fetch goes next: the resolved `Location` of a 301, 302, 303, 307 or 308
/// (its host normalized as targets are). `None` means "deliver this response": not a redirect,
/// or a redirect without `Location`.
///
/// # Errors
/// [`UpstreamError::BadRedirect`] for a `Location` that is not a valid http(s) URL (`file:`,
/// `data:`, `gopher:`, garbage: passing it on would make imgedge's origin an open redirect) or
/// that goes from https to http unless `allow_downgrade`.
fn redirect_target(
    url: &Url,
    status: StatusCode,
    headers: &HeaderMap,
    allow_downgrade: bool,
) -> Result<Option<Url>, UpstreamError> {
    let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
    let Some(location) = headers.get(LOCATION).filter(|_| redirect) else {
        return Ok(None);
    };
    let bad = |why: String| UpstreamError::BadRedirect(why);
    let mut next = location
        .to_str()
        .ok()
        .and_then(|l| url.join(l).ok())
        .ok_or_else(|| bad("the origin redirected to an invalid Location".to_owned()))?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(bad(format!(
            "the origin redirected to a {}: URL; only http and https are followed",
            next.scheme()
        )));
    }
    if url.scheme() == "https" && next.scheme() == "http" && !allow_downgrade {
        return Err(bad(
            "the origin redirected from https to http (upstream.allow_https_downgrade is off)"
                .to_owned(),
        ));
    }
    next.set_fragment(None);
    crate::target::normalize_host(&mut next);
    Ok(Some(next))
}

/// rustls with ring and the system's root certificates. Without readable roots, https origins
/// fail their handshake (logged at start), and plain http still works.
fn tls_config() -> Result<rustls::ClientConfig, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(SetupError::Tls)?;
    let config = match builder.clone().with_native_roots() {
        Ok(b) => b.with_no_client_auth(),
        Err(e) => {
            tracing::warn!(error = %e, "no system root certificates: https origins will fail");
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// `outer: inner: innermost`, skipping repeats.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let s = err.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = err.source();
    }
    text
}

/// A boxed error, as bodies and resolvers report them.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(
        from: &str,
        status: u16,
        location: Option<&str>,
        downgrade: bool,
    ) -> Result<Option<String>, String> {
        let mut headers = HeaderMap::new();
        if let Some(l) = location {
            headers.insert(LOCATION, HeaderValue::from_str(l).unwrap());
        }
        redirect_target(
            &Url::parse(from).unwrap(),
            StatusCode::from_u16(status).unwrap(),
            &headers,
            downgrade,
        )
        .map(|u| u.map(|u| u.to_string()))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn redirects_go_only_to_http_urls_and_never_down_from_https_unless_allowed() {
        assert_eq!(
            redirect("http://a.example/x", 302, Some("/y#frag"), false),
            Ok(Some("http://a.example/y".to_owned()))
        );
        assert_eq!(
            redirect(
                "http://a.example/x",
                301,
                Some("https://B.example./z"),
                false
            ),
            Ok(Some("https://b.example/z".to_owned()))
        );
        // Not a redirect, or no Location: delivered as it is.
        assert_eq!(
            redirect("http://a.example/x", 200, Some("/y"), false),
            Ok(None)
        );
        assert_eq!(redirect("http://a.example/x", 302, None, false), Ok(None));
        for bad in [
            "file:///etc/passwd",
            "gopher://a.example/",
            "data:text/html,<b>x</b>",
            "javascript:alert(1)",
        ] {
            let e = redirect("http://a.example/x", 302, Some(bad), false).unwrap_err();
            assert!(e.contains("only http and https"), "{bad}: {e}");
        }
        let e = redirect(
            "https://a.example/x",
            307,
            Some("http://a.example/x"),
            false,
        )
        .unwrap_err();
        assert!(e.contains("https to http"), "{e}");
        assert_eq!(
            redirect("https://a.example/x", 307, Some("http://a.example/x"), true),
            Ok(Some("http://a.example/x".to_owned()))
        );
    }
}
