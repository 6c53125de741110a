//! Admission: the one step every proxied request passes before any work is done for it (no
//! parsing of its target, no lookup, no connection): load shedding at critical memory pressure,
//! per-client rate limits (`[limits]`), signatures on `/image-proxy` (`[signing] keys`), for
//! the [`Client`] the request is from.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::request::Parts;
use ipnet::IpNet;
use tokio::sync::watch;

use super::client::Client;
use super::rate::RateLimits;
use super::routes::{IMAGE_INFO_PATH, Route};
use crate::error::ProxyError;
use crate::metrics::{self, Metrics};
use crate::pressure::Reading;
use crate::signing::Signer;

/// A request that may proceed, with what admission learned about it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admitted {
    pub route: Route,
    pub client: Client,
}

/// What admission decides with.
pub(crate) struct Admission {
    /// The memory monitor's readings: requests are shed while the level sheds.
    pub pressure: watch::Receiver<Reading>,
    pub metrics: Arc<Metrics>,
    /// `[server] trusted_proxies`.
    pub trusted_proxies: Vec<IpNet>,
    /// `[signing] keys`: when set, `/image-proxy` requests must be signed.
    pub signer: Signer,
    /// `[limits]`: requests per client, when on.
    pub rate: Option<Arc<RateLimits>>,
}

impl Admission {
    /// Admits a request for a proxy `route`, with head `parts`, from `client`. A signed
    /// `/image-proxy` target has its signature removed from `parts.uri`: what follows sees the
    /// target that was signed.
    ///
    /// # Errors
    /// [`ProxyError::Overloaded`] (503, `Retry-After: 1`) while memory pressure is critical or
    /// worse: the request is counted as shed and nothing else is done for it;
    /// [`ProxyError::RateLimited`] (429, `Retry-After`) when the client is over `[limits]`;
    /// [`ProxyError::BadSignature`] (403) for an `/image-proxy` (or `/image-info?url=`)
    /// request whose signature is missing or wrong while keys are set.
    pub(crate) fn admit(
        &self,
        route: Route,
        parts: &mut Parts,
        client: Client,
    ) -> Result<Admitted, ProxyError> {
        if self.pressure.borrow().level.sheds() {
            self.metrics
                .shed
                .get_or_create(&metrics::ReasonLabels { reason: "memory" })
                .inc();
            return Err(ProxyError::Overloaded);
        }
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.check(client.ip)
        {
            self.metrics
                .shed
                .get_or_create(&metrics::ReasonLabels { reason: "rate" })
                .inc();
            return Err(ProxyError::RateLimited { retry_after: wait });
        }
        // `/image-info?url=` fetches what `/image-proxy` would: signed alike (its own path is
        // what is signed); its route-path form follows the routes, which are not signed
        let signed = route == Route::ImageProxy
            || route == Route::ImageInfo && parts.uri.path() == IMAGE_INFO_PATH;
        if signed && self.signer.is_on() {
            let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
            let unsigned = self.signer.verify(target)?;
            parts.uri = unsigned
                .parse()
                .map_err(|_| crate::signing::SignatureError::Mismatch)?;
        }
        Ok(Admitted { route, client })
    }

    /// The client of a request with `headers` from `peer` (see [`Client::identify`]).
    pub(crate) fn client(&self, headers: &HeaderMap, peer: SocketAddr) -> Client {
        Client::identify(headers, peer, &self.trusted_proxies)
    }
}
