//! The guarded resolver: name resolution for the connectors, where the address guard applies
//! to the very addresses dialled (defeating DNS rebinding).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

use super::BoxError;
use crate::target::{HostPolicy, is_global};

/// Resolves names for the connector. With a policy (guarded fetches) it keeps only global
/// addresses unless the host is trusted; when nothing is left the connection fails as a name
/// that does not resolve fails: a client must not learn which internal names exist (the log
/// says which it was). Without one (route fetches) it resolves plainly.
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
                let why = format!("{host} resolves only to non-global addresses");
                return Err(Box::new(std::io::Error::other(why)) as BoxError);
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tower_service::Service;

    use super::*;

    #[tokio::test]
    async fn a_name_that_resolves_only_to_private_addresses_fails_like_one_that_does_not_resolve() {
        let mut guarded = GuardedResolver {
            policy: Some(Arc::new(HostPolicy::default())),
        };
        let e = guarded
            .call(Name::from_str("localhost").unwrap())
            .await
            .unwrap_err();
        // Not a refusal the client would see as `private_address`: an I/O error, as a failed
        // lookup is, with the reason for the log.
        assert!(e.downcast_ref::<crate::target::TargetError>().is_none());
        assert!(
            e.to_string()
                .contains("resolves only to non-global addresses"),
            "{e}"
        );
        let mut plain = GuardedResolver { policy: None };
        let addrs: Vec<_> = plain
            .call(Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
