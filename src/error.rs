//! [`ProxyError`]: every way a request can fail before its response head is sent, and the one
//! mapping from each to an HTTP status and a stable error code.
//!
//! Failures after the head (a body that stalls, resets or ends short) cannot change the status;
//! they abort the client connection instead (see `body.rs`).

use http::StatusCode;

use crate::target::TargetError;
use crate::upstream::{UploadError, UpstreamError};

/// A request that fails before any response byte is sent. Rendered as
/// `{"error": "<code>", "message": "<text>"}` with [`ProxyError::status`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// The `/image-proxy` target was refused before anything was sent.
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{0}")]
    BadPath(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(http::Method),
    #[error("no stored response can serve this request and it asked for only-if-cached")]
    NotCached,
    #[error("a valid Authorization: Bearer token is required")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("memory pressure is critical: try again shortly")]
    Overloaded,
    /// A guarded redirect that imgedge will not follow: not to http(s), or https to http.
    #[error("{0}")]
    BadRedirect(String),
    /// An `/image-proxy` response that is not an allowed image (type, coding or signature).
    #[error("{0}")]
    NotAnImage(String),
    /// A request to `/image-proxy` without a valid signature while `[signing] keys` are set.
    #[error(transparent)]
    BadSignature(#[from] crate::signing::SignatureError),
    /// The client is over `[limits] per_ip_per_second`; it may try again after `retry_after`.
    #[error("too many requests from this client: try again in {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    /// A route's path and query longer than `[server] max_url_bytes`.
    #[error("the request target is {length_bytes} bytes, over server.max_url_bytes ({max_bytes})")]
    UriTooLong {
        length_bytes: usize,
        max_bytes: usize,
    },
    /// A render parameter that is not valid (Supabase answers these 400 too).
    #[error("{0}")]
    BadParameter(String),
    /// A render source whose header announces more than `[transform] max_source_pixels`.
    #[error("{0}")]
    ImageTooLarge(String),
    /// A render source of more than `[transform] max_source_bytes`.
    #[error("{0}")]
    SourceTooLarge(String),
    /// A request body that could not be forwarded whole (see [`UploadError`]).
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// `[upstream] max_in_flight` requests are in flight, or every upstream socket allowed is
    /// open: nothing was sent; try again shortly (`Retry-After: 1`).
    #[error("{0}: try again shortly")]
    Busy(&'static str),
    /// A render-route source that is not an image this server renders, or does not decode
    /// (Supabase answers these 400).
    #[error("{0}")]
    InvalidSource(String),
    /// A transform ran past `[transform] timeout` (`Retry-After: 1`: the time depends on the
    /// machine's load as much as on the image).
    #[error("the transform did not finish within transform.timeout: try again shortly")]
    TransformTimeout,
    /// A transform failed on imgedge's side (an encoder refused).
    #[error("{0}")]
    TransformFailed(String),
}

impl ProxyError {
    /// The message the client sees: the error's own, except for upstream failures, whose
    /// details (an error chain naming addresses, resolution, refusals, TLS) go to the log only,
    /// so that a prober cannot map what lies behind the proxy. Timeouts keep their phase.
    pub fn client_message(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ProxyError::Upstream(_) => "the upstream request failed".into(),
            e => e.to_string().into(),
        }
    }

    /// The status and stable error code the client sees. The codes are part of the API:
    /// `bad_url`, `bad_path`, `host_not_allowed`, `private_address`, `too_large`,
    /// `upstream_error`, `upstream_timeout`, `not_found`, `method_not_allowed`, `not_cached`,
    /// `unauthorized`, `bad_request`, `overloaded`, `bad_redirect`, `not_an_image`,
    /// `bad_signature`, `rate_limited`, `uri_too_long`, `payload_too_large`, `request_timeout`,
    /// `bad_parameter`, `image_too_large`, `busy`, `invalid_source`, `transform_timeout`,
    /// `transform_failed`.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Target(TargetError::BadUrl(_)) => (StatusCode::BAD_REQUEST, "bad_url"),
            ProxyError::Target(
                TargetError::HostNotAllowed(_) | TargetError::PortNotAllowed { .. },
            ) => (StatusCode::FORBIDDEN, "host_not_allowed"),
            ProxyError::Target(TargetError::PrivateAddress(_)) => {
                (StatusCode::FORBIDDEN, "private_address")
            }
            ProxyError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            ProxyError::TooLarge(_) => (StatusCode::BAD_GATEWAY, "too_large"),
            ProxyError::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error"),
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ProxyError::NotCached => (StatusCode::GATEWAY_TIMEOUT, "not_cached"),
            ProxyError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ProxyError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ProxyError::BadRedirect(_) => (StatusCode::BAD_GATEWAY, "bad_redirect"),
            ProxyError::NotAnImage(_) => (StatusCode::BAD_GATEWAY, "not_an_image"),
            ProxyError::BadSignature(_) => (StatusCode::FORBIDDEN, "bad_signature"),
            ProxyError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ProxyError::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            ProxyError::BadParameter(_) => (StatusCode::BAD_REQUEST, "bad_parameter"),
            ProxyError::ImageTooLarge(_) => (StatusCode::UNPROCESSABLE_ENTITY, "image_too_large"),
            ProxyError::SourceTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ProxyError::Upload(UploadError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ProxyError::Upload(UploadError::Stalled(_)) => {
                (StatusCode::REQUEST_TIMEOUT, "request_timeout")
            }
            ProxyError::Upload(UploadError::Failed(_)) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ProxyError::InvalidSource(_) => (StatusCode::BAD_REQUEST, "invalid_source"),
            ProxyError::TransformTimeout => (StatusCode::SERVICE_UNAVAILABLE, "transform_timeout"),
            ProxyError::TransformFailed(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "transform_failed")
            }
        }
    }
}

impl ProxyError {
    /// Whether the request went forward before it failed: the origin failed, timed out, or
    /// answered what imgedge refuses to serve (the `Cache-Status` of the error says
    /// `fwd=uri-miss`); otherwise imgedge refused it itself.
    pub fn went_forward(&self) -> bool {
        matches!(
            self,
            ProxyError::Upstream(_)
                | ProxyError::UpstreamTimeout(_)
                | ProxyError::TooLarge(_)
                | ProxyError::BadRedirect(_)
                | ProxyError::NotAnImage(_)
                | ProxyError::SourceTooLarge(_)
                | ProxyError::ImageTooLarge(_)
                | ProxyError::InvalidSource(_)
        )
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Refused(t) => t.into(),
            UpstreamError::Timeout { .. }
            | UpstreamError::Stalled(_)
            | UpstreamError::TotalTimeout(_) => ProxyError::UpstreamTimeout(e.to_string()),
            UpstreamError::TooLarge { .. } => ProxyError::TooLarge(e.to_string()),
            UpstreamError::BadRedirect(why) => ProxyError::BadRedirect(why),
            UpstreamError::Upload(e) => ProxyError::Upload(e),
            UpstreamError::Busy(why) => ProxyError::Busy(why),
            e => ProxyError::Upstream(e.to_string()),
        }
    }
}
