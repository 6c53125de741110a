//! The guarded resolver: name resolution for the connectors, where the address guard applies
//! to the very addresses dialled (defeating DNS rebinding).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use super::BoxError;
use crate::target::{HostPolicy, TargetError, is_global};

/// Resolves names for the connector. With a policy (guarded fetches) it keeps only global
/// addresses unless the host is trusted; when nothing is left the connection fails with
/// [`TargetError::PrivateAddress`]. Without one (route fetches) it resolves plainly.
#[derive(Clone)]
pub(super) struct GuardedResolver {
    pub(super) policy: Option<Arc<HostPolicy>>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let addrs = match policy {
                Some(policy) if !policy.trusts(&host) => {
                    addrs.into_iter().filter(|a| is_global(a.ip())).collect()
                }
                _ => addrs,
            };
            if addrs.is_empty() {
                return Err(Box::new(TargetError::PrivateAddress(host)) as BoxError);
            }
            Ok(addrs.into_iter())
        })
    }
}
