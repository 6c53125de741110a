//! Admission: the one step every proxied request passes before any work is done for it (no
//! parsing of its target, no lookup, no connection). Today it sheds load at critical memory
//! pressure; request signatures, per-client rate limits and the client address behind trusted
//! proxies belong here too.

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use tokio::sync::watch;

use super::routes::Route;
use crate::error::ProxyError;
use crate::metrics::{self, Metrics};
use crate::pressure::Reading;

/// A request that may proceed, with what admission learned about it.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    pub route: Route,
    /// The peer of the connection the request came on.
    pub peer: SocketAddr,
}

/// What admission decides with.
pub struct Admission {
    /// The memory monitor's readings: requests are shed while the level sheds.
    pub pressure: watch::Receiver<Reading>,
    pub metrics: Arc<Metrics>,
}

impl Admission {
    /// Admits a request for a proxy `route`, with head `parts`, from `peer`.
    ///
    /// # Errors
    /// [`ProxyError::Overloaded`] (503, `Retry-After: 1`) while memory pressure is critical or
    /// worse: the request is counted as shed and nothing else is done for it.
    pub fn admit(
        &self,
        route: Route,
        _parts: &Parts,
        peer: SocketAddr,
    ) -> Result<Admitted, ProxyError> {
        if self.pressure.borrow().level.sheds() {
            self.metrics
                .shed
                .get_or_create(&metrics::ReasonLabels { reason: "memory" })
                .inc();
            return Err(ProxyError::Overloaded);
        }
        Ok(Admitted { route, peer })
    }
}
