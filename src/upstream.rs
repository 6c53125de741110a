//! Fetching from origins: two reqwest clients (rustls, streaming), timeouts, and a response body
//! that enforces `idle_timeout`, `max_object_bytes` and the announced `Content-Length`.
//!
//! The `/image-proxy` client is *guarded*: its DNS resolver drops non-global addresses (so the
//! check applies to the very addresses it connects to, defeating DNS rebinding), literal IP hosts
//! are checked before sending (reqwest never resolves them), and every redirect hop is checked
//! like the first URL. The route client (operator-configured upstreams) is not guarded and never
//! follows redirects. Nothing here knows about caching or HTTP status codes sent to clients.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use http::header::{CONTENT_LENGTH, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::time::{Instant, Sleep};
use url::Url;

use crate::config::UpstreamConfig;
use crate::freshness::ResponseTimes;
use crate::target::{HostPolicy, TargetError, is_global};

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
    /// The body ended, or failed, before `Content-Length` bytes arrived, or sent more.
    #[error("upstream body ended after {received_bytes} of {expected_bytes} bytes")]
    LengthMismatch {
        received_bytes: u64,
        expected_bytes: u64,
    },
    /// The connection failed mid-body (reset, protocol error).
    #[error("upstream body failed after {received_bytes} bytes: {reason}")]
    Body { received_bytes: u64, reason: String },
}

/// Which client a fetch goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// `/image-proxy`: client-chosen targets, subject to [`HostPolicy`]; follows redirects.
    Guarded,
    /// Operator-configured route upstreams: not checked, redirects passed to the client.
    Trusted,
}

/// The origin-facing side: clients and limits. Cheap to share behind an `Arc`.
pub struct Upstream {
    guarded: reqwest::Client,
    trusted: reqwest::Client,
    policy: Arc<HostPolicy>,
    connect_timeout: Duration,
    header_timeout: Duration,
    idle_timeout: Duration,
    max_object_bytes: u64,
}

/// A response from an origin: its head, and its body still unread.
pub struct UpstreamResponse {
    pub head: UpstreamHead,
    pub body: UpstreamBody,
}

/// The head of an origin's response.
#[derive(Debug, Clone)]
pub struct UpstreamHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Content-Length` as announced (absent for chunked bodies and HEAD without one).
    pub content_length: Option<u64>,
    /// When the request was sent and the head arrived (RFC 9111 §4.2.3).
    pub times: ResponseTimes,
}

impl Upstream {
    /// Builds both clients.
    ///
    /// # Errors
    /// A message when the TLS stack cannot be initialised.
    pub fn new(config: &UpstreamConfig) -> Result<Self, String> {
        // reqwest is built without a bundled crypto provider; ring is the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = Arc::new(HostPolicy::new(
            config.allowed_hosts.clone(),
            config.allow_private_networks,
        ));
        let base = || {
            reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true)
                .pool_idle_timeout(Duration::from_secs(60))
                .default_headers(HeaderMap::from_iter([(
                    USER_AGENT,
                    HeaderValue::from_str(&config.user_agent).expect("validated by config"),
                )]))
        };
        let redirect_policy = {
            let policy = policy.clone();
            let max = config.max_redirects;
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > max {
                    return attempt.error(UpstreamError::TooManyRedirects(max));
                }
                match policy.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            })
        };
        let guarded = base()
            .dns_resolver(GuardedResolver {
                policy: policy.clone(),
            })
            .redirect(redirect_policy)
            .build()
            .map_err(|e| e.to_string())?;
        let trusted = base()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Upstream {
            guarded,
            trusted,
            policy,
            connect_timeout: config.connect_timeout,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            max_object_bytes: config.max_object_bytes,
        })
    }

    /// Checks a client-chosen URL against `allowed_hosts` and, for literal IPs, the address
    /// rules, before anything is sent.
    ///
    /// # Errors
    /// [`TargetError::HostNotAllowed`] or [`TargetError::PrivateAddress`].
    pub fn check_target(&self, url: &Url) -> Result<(), TargetError> {
        self.policy.check_url(url)
    }

    /// Sends `method` (GET or HEAD) for `url` and returns once the response head has arrived.
    /// The body is not read: it streams from [`UpstreamResponse::body`].
    ///
    /// # Errors
    /// [`UpstreamError::Timeout`] when no connection within `connect_timeout` or no head within
    /// `header_timeout`; [`UpstreamError::TooLarge`] when `Content-Length` exceeds
    /// `max_object_bytes` (the body is then never read); [`UpstreamError::Refused`] when a guarded
    /// fetch resolves only to non-global addresses or redirects somewhere not allowed;
    /// [`UpstreamError::Request`] for everything else before the head.
    pub async fn fetch(
        &self,
        method: Method,
        url: &Url,
        guard: Guard,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let client = match guard {
            Guard::Guarded => {
                self.check_target(url)?;
                &self.guarded
            }
            Guard::Trusted => &self.trusted,
        };
        let is_head = method == Method::HEAD;
        let request_time = SystemTime::now();
        let send = client.request(method, url.clone()).send();
        let response = match tokio::time::timeout(self.header_timeout, send).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    phase: "response head",
                    after: self.header_timeout,
                });
            }
            Ok(Err(e)) => return Err(self.classify(e)),
            Ok(Ok(r)) => r,
        };
        let response_time = SystemTime::now();
        let content_length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = content_length
            && length > self.max_object_bytes
        {
            return Err(UpstreamError::TooLarge {
                length_bytes: length,
                max_bytes: self.max_object_bytes,
            });
        }
        let status = response.status();
        let headers = response.headers().clone();
        // A HEAD response, 204 and 304 have no body whatever their Content-Length says.
        let bodyless =
            is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let body = UpstreamBody {
            stream: Box::pin(response.bytes_stream()),
            idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
            idle_timeout: self.idle_timeout,
            waiting: false,
            received_bytes: 0,
            expected_bytes: if bodyless { Some(0) } else { content_length },
            max_bytes: self.max_object_bytes,
            done: false,
        };
        Ok(UpstreamResponse {
            head: UpstreamHead {
                status,
                headers,
                content_length,
                times: ResponseTimes {
                    request_time,
                    response_time,
                },
            },
            body,
        })
    }

    /// Turns a reqwest error from before the head into an [`UpstreamError`], finding the guard's
    /// own refusals anywhere in its source chain.
    fn classify(&self, e: reqwest::Error) -> UpstreamError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if let Some(t) = err.downcast_ref::<TargetError>() {
                return UpstreamError::Refused(t.clone());
            }
            if let Some(UpstreamError::TooManyRedirects(n)) = err.downcast_ref::<UpstreamError>() {
                return UpstreamError::TooManyRedirects(*n);
            }
            source = err.source();
        }
        if e.is_timeout() {
            return UpstreamError::Timeout {
                phase: "connection",
                after: self.connect_timeout,
            };
        }
        UpstreamError::Request(error_chain(&e))
    }
}

/// `outer: inner: innermost`, without repeating reqwest's URL noise.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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

/// Resolves names for the guarded client and keeps only global addresses, unless the host is
/// trusted. When nothing is left the connection fails with [`TargetError::PrivateAddress`].
struct GuardedResolver {
    policy: Arc<HostPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs: Vec<SocketAddr> = if policy.trusts(&host) {
                addrs
            } else {
                addrs.into_iter().filter(|a| is_global(a.ip())).collect()
            };
            if addrs.is_empty() {
                return Err(Box::new(TargetError::PrivateAddress(host)) as _);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An origin's response body as a stream of chunks, exactly as they arrive (never coalesced or
/// buffered here). It fails rather than ends when the body is incomplete: a stall longer than
/// `idle_timeout`, more than `max_object_bytes`, a length other than `Content-Length`, or a
/// connection error. Reading is driven by the consumer, so a slow client slows the origin read.
pub struct UpstreamBody {
    stream: ChunkStream,
    /// Fires when the origin has sent nothing for `idle_timeout` while we were waiting for it.
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// Whether the last poll found the origin with nothing to give (the idle timer is running).
    waiting: bool,
    received_bytes: u64,
    /// `Content-Length`, or 0 for bodyless responses.
    expected_bytes: Option<u64>,
    max_bytes: u64,
    done: bool,
}

impl UpstreamBody {
    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// The length this body must have, when announced.
    pub fn expected_bytes(&self) -> Option<u64> {
        self.expected_bytes
    }

    /// Whether nothing more will come: finished, failed, or a bodyless response.
    pub fn is_end_stream(&self) -> bool {
        self.done || self.expected_bytes == Some(0)
    }

    /// Whether every announced byte has arrived (always false without a `Content-Length`).
    pub fn is_complete(&self) -> bool {
        self.expected_bytes == Some(self.received_bytes)
    }

    /// Polls the next chunk: `Some(Ok)` data, `Some(Err)` a failure (after which it is done),
    /// `None` a complete body.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.expected_bytes == Some(0) {
            self.done = true;
            return Poll::Ready(None);
        }
        let item = match self.stream.as_mut().poll_next(cx) {
            Poll::Ready(item) => {
                self.waiting = false;
                item
            }
            Poll::Pending => {
                // The timer measures the origin's silence, not the client's: it starts when we
                // begin waiting, not when the previous chunk arrived.
                if !self.waiting {
                    self.waiting = true;
                    self.idle.as_mut().reset(Instant::now() + self.idle_timeout);
                }
                ready!(self.idle.as_mut().poll(cx));
                return self.fail(UpstreamError::Stalled(self.idle_timeout));
            }
        };
        match item {
            Some(Ok(chunk)) => {
                self.received_bytes += chunk.len() as u64;
                match self.expected_bytes {
                    Some(expected) if self.received_bytes > expected => {
                        self.fail(UpstreamError::LengthMismatch {
                            received_bytes: self.received_bytes,
                            expected_bytes: expected,
                        })
                    }
                    None if self.received_bytes > self.max_bytes => {
                        self.fail(UpstreamError::BodyTooLarge {
                            max_bytes: self.max_bytes,
                        })
                    }
                    _ => Poll::Ready(Some(Ok(chunk))),
                }
            }
            Some(Err(e)) => match self.expected_bytes {
                Some(expected) => self.fail(UpstreamError::LengthMismatch {
                    received_bytes: self.received_bytes,
                    expected_bytes: expected,
                }),
                None => self.fail(UpstreamError::Body {
                    received_bytes: self.received_bytes,
                    reason: error_chain(&e),
                }),
            },
            None => match self.expected_bytes {
                Some(expected) if expected != self.received_bytes => {
                    self.fail(UpstreamError::LengthMismatch {
                        received_bytes: self.received_bytes,
                        expected_bytes: expected,
                    })
                }
                _ => {
                    self.done = true;
                    Poll::Ready(None)
                }
            },
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        self.done = true;
        Poll::Ready(Some(Err(e)))
    }
}
