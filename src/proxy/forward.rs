//! Requests whose method is never looked up or stored, forwarded on routes (RFC 9111 §2), and
//! the invalidation a successful one causes (RFC 9111 §4.4).

use http::header::{CONTENT_LENGTH, CONTENT_LOCATION, LOCATION};
use http::{HeaderMap, HeaderValue, Method, Response};
use tracing::Span;
use url::Url;

use super::{CACHE_STATUS, CacheStatus, Proxy, end_to_end};
use crate::body::ProxyBody;
use crate::cache::CacheKey;
use crate::error::ProxyError;
use crate::tee::TeeBody;
use crate::upstream::{Guard, Upload, UpstreamRequest, UpstreamResponse};

impl Proxy {
    /// Forwards a request whose method is never looked up or stored (RFC 9111 §2: only GET and
    /// HEAD are cached here), streaming its body upstream (under the [`Upload`] limits) and the response back. A non-error
    /// response invalidates the stored response for the URI and for a same-origin `Location` or
    /// `Content-Location` (RFC 9111 §4.4), in the route's `namespace`.
    ///
    /// # Errors
    /// A [`ProxyError`] for anything that fails before the response head.
    pub(crate) async fn forward(
        &self,
        namespace: &str,
        method: Method,
        url: Url,
        headers: HeaderMap,
        upload: Upload,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let request = UpstreamRequest {
            method,
            url: url.clone(),
            headers,
            body: upload.body,
            upload: Some(upload.progress),
            guard: Guard::Trusted,
        };
        let fetched = self.upstream.fetch(request).await;
        self.count_fetch(&fetched);
        let UpstreamResponse { head, body } = fetched?;
        Span::current().record("upstream_status", head.status.as_u16());
        CacheStatus::FORWARD_METHOD.record_in_span();
        if !head.status.is_client_error() && !head.status.is_server_error() {
            self.tier.invalidate(&CacheKey::new(namespace, &url)).await;
            for name in [LOCATION, CONTENT_LOCATION] {
                let target = head
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| url.join(v).ok());
                if let Some(target) = target.filter(|t| t.origin() == url.origin()) {
                    self.tier
                        .invalidate(&CacheKey::new(namespace, &target))
                        .await;
                }
            }
        }
        let mut headers = end_to_end(&head.headers, &[]);
        if let Some(length) = head.content_length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        headers.insert(
            CACHE_STATUS.clone(),
            CacheStatus::FORWARD_METHOD.header_value(),
        );
        let mut response = Response::new(ProxyBody::Tee(Box::new(TeeBody::new(body, None))));
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}
