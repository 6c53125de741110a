//! Per-client rate limits (`[limits] per_ip_per_second`, `burst`): governor's keyed GCRA limiter
//! over client addresses (IPv6 by /64, what one subscriber holds), checked by admission. Its
//! state is bounded: clients back to a full bucket are forgotten every
//! [`RETAIN_INTERVAL`], and past [`MAX_CLIENTS`] tracked the state starts afresh, so a spray of
//! source addresses cannot grow memory.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often clients with a full bucket are forgotten.
pub(crate) const RETAIN_INTERVAL: Duration = Duration::from_secs(10);

/// Most clients tracked at once (about 100 bytes each); past it the state starts afresh.
pub(crate) const MAX_CLIENTS: usize = 200_000;

/// The limiter, replaceable as a whole when it tracks too many clients.
pub(crate) struct RateLimits {
    quota: Quota,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    /// [`MAX_CLIENTS`], lower in tests.
    max_clients: usize,
}

impl RateLimits {
    /// `per_second` requests a second per client, in bursts of up to `burst` (at least 1);
    /// `None` when `per_second` is 0 (off).
    pub(crate) fn new(per_second: u32, burst: u32) -> Option<RateLimits> {
        let per_second = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Some(RateLimits {
            quota,
            limiter: RwLock::new(Arc::new(RateLimiter::dashmap(quota))),
            max_clients: MAX_CLIENTS,
        })
    }

    fn limiter(&self) -> Arc<DefaultKeyedRateLimiter<IpAddr>> {
        self.limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counts a request from `client`.
    ///
    /// # Errors
    /// How long until it would be allowed, when it is over the limit.
    pub(crate) fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let limiter = self.limiter();
        limiter
            .check_key(&key(client))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }

    /// Forgets the clients whose bucket is full again; past [`MAX_CLIENTS`], all of them.
    pub(crate) fn retain(&self) {
        let limiter = self.limiter();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() > self.max_clients {
            tracing::warn!(
                clients = limiter.len(),
                max = self.max_clients,
                "rate limits: too many clients tracked, starting afresh"
            );
            *self.limiter.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(RateLimiter::dashmap(self.quota));
        }
    }

    /// Clients tracked now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.limiter().len()
    }
}

/// Runs [`RateLimits::retain`] every [`RETAIN_INTERVAL`] (until the app shuts down).
pub(crate) async fn retain_loop(limits: Arc<RateLimits>) {
    let mut tick = tokio::time::interval(RETAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        limits.retain();
    }
}

/// The key of a client: its IPv4 address, or the /64 its IPv6 address is in.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_its_burst_then_the_rate_and_ipv6_is_limited_by_64() {
        let limits = RateLimits::new(1, 3).unwrap();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limits.check(a).is_ok());
        }
        let wait = limits.check(a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(limits.check(b).is_ok(), "another client has its own bucket");
        // One /64: one client.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for _ in 0..3 {
            assert!(limits.check(v6("2001:db8:1:2::1")).is_ok());
        }
        assert!(limits.check(v6("2001:db8:1:2:ffff::9")).is_err());
        assert!(limits.check(v6("2001:db8:1:3::1")).is_ok());
        assert!(RateLimits::new(0, 10).is_none(), "0 is off");
    }

    #[test]
    fn the_state_is_bounded() {
        let limits = RateLimits::new(1000, 1000).unwrap();
        for i in 0..5000u32 {
            limits.check(IpAddr::from(i.to_be_bytes())).unwrap();
        }
        assert_eq!(limits.len(), 5000);
        // A thousand a second refills a bucket within a millisecond: all of them are forgotten.
        std::thread::sleep(Duration::from_millis(5));
        limits.retain();
        assert_eq!(limits.len(), 0);
        // Clients that stay over their limit are kept, up to the cap; past it, afresh.
        let mut strict = RateLimits::new(1, 1).unwrap();
        strict.max_clients = 100;
        for i in 0..150u32 {
            strict.check(IpAddr::from(i.to_be_bytes())).unwrap();
        }
        strict.retain();
        assert_eq!(strict.len(), 0, "past the cap: afresh");
        for i in 0..50u32 {
            strict.check(IpAddr::from(i.to_be_bytes())).unwrap();
        }
        strict.retain();
        assert_eq!(strict.len(), 50, "under the cap, recent clients are kept");
    }
}
