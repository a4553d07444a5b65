//! The per-client rate limit: a token bucket per client address (GCRA,
//! from the `governor` crate), the classic defence of a flash sale against
//! one bot hammering the purchase endpoint. Off unless `[rate_limit]` sets
//! `per_second`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use spike_config::balancer::RateLimitSettings;

/// The buckets of every client address, under one quota.
#[derive(Debug)]
pub struct RateLimit {
    settings: RateLimitSettings,
    buckets: DefaultKeyedRateLimiter<IpAddr>,
}

impl RateLimit {
    /// The limit of `settings`, or `None` if they turn it off.
    pub fn new(settings: &RateLimitSettings) -> Option<Self> {
        let rate = NonZeroU32::new(settings.per_second)?;
        let burst = NonZeroU32::new(settings.burst).unwrap_or(rate);
        Some(Self {
            settings: settings.clone(),
            buckets: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        })
    }

    pub fn settings(&self) -> &RateLimitSettings {
        &self.settings
    }

    /// Takes a token from `client`'s bucket; when it is empty, how long
    /// until the next one. The addresses of one IPv6 /64, which one host
    /// usually holds all of, share a bucket.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.buckets
            .check_key(&bucket(client))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets the buckets that are full again, so that memory follows the
    /// clients of the last moments, not every client ever seen.
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// The bucket of an address: itself for IPv4, its /64 for IPv6.
fn bucket(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_while_others_do_not() {
        let limit = RateLimit::new(&RateLimitSettings {
            per_second: 1,
            burst: 3,
        })
        .unwrap();
        let (bot, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(limit.check(bot), Ok(()));
        }
        let wait = limit.check(bot).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(limit.check(other), Ok(()));
    }

    #[test]
    fn zero_per_second_is_off() {
        assert!(RateLimit::new(&RateLimitSettings::default()).is_none());
    }

    #[test]
    fn the_addresses_of_an_ipv6_64_share_a_bucket() {
        let limit = RateLimit::new(&RateLimitSettings {
            per_second: 1,
            burst: 1,
        })
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limit.check(ip("2001:db8:1:2::1")), Ok(()));
        assert!(limit.check(ip("2001:db8:1:2:ffff::9")).is_err());
        assert_eq!(limit.check(ip("2001:db8:1:3::1")), Ok(()));
        // An IPv4 address, however written, is its own bucket.
        assert_eq!(limit.check(ip("::ffff:10.0.0.1")), Ok(()));
        assert!(limit.check(ip("10.0.0.1")).is_err());
    }
}
