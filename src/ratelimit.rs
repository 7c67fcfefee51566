//! Rate limits: a per-connection publish budget ([`TokenBucket`]) and a cap on open connections
//! per client address ([`PerIpLimit`]). It owns the arithmetic and the grouping of addresses. It
//! is pure: time comes in as an `Instant` argument, nothing here reads a clock, sleeps, touches a
//! socket or holds global state. It must not decide what happens to a client over its limit
//! (error reply, close 1008, 429) or count it; the event loop does that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token bucket: up to `burst` publishes at once, refilled at `rate` per second.
///
/// It is kept as one timestamp instead of a token count (the "generic cell rate algorithm",
/// which behaves exactly like a token bucket): `tat` is the time at which the bucket will be full
/// again. Taking a token pushes `tat` one interval (1/rate) later; a take is refused while `tat`
/// is more than `burst - 1` intervals ahead of now. There is no fractional token to round and
/// no refill step to run. Integer nanoseconds throughout, no allocation.
///
/// Size: 24 bytes on 64-bit Linux (a 16-byte `Instant` and two `u32`), and `Option<TokenBucket>`
/// is the same size, so a connection pays nothing extra when limits are off. There is one per
/// connection, so this matters at a million connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Theoretical arrival time: when the bucket will be full again. At or before now: full.
    tat: Instant,
    /// Nanoseconds per token (1e9 / rate), at least 1.
    interval_ns: u32,
    /// Tokens the bucket holds when full, at least 1.
    burst: u32,
}

impl TokenBucket {
    /// A full bucket holding `burst` tokens, refilled at `rate` tokens per second. Both must be
    /// at least 1 (configuration validation guarantees it; 0 is treated as 1 in release builds).
    /// Rates above 1e9/s are treated as 1e9/s.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        debug_assert!(rate > 0 && burst > 0, "rate {rate} burst {burst}");
        TokenBucket {
            tat: now,
            interval_ns: (1_000_000_000 / rate.max(1)).max(1),
            burst: burst.max(1),
        }
    }

    /// Takes one token if there is one; `false` means the caller is over its rate and the action
    /// must be refused. `now` should not go backwards; if it does, the bucket simply looks
    /// emptier than it is, never fuller.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let interval = Duration::from_nanos(u64::from(self.interval_ns));
        // How far ahead of now the bucket's "full again" time may be and still leave one token.
        let slack = interval * (self.burst - 1);
        if self.tat.saturating_duration_since(now) > slack {
            return false;
        }
        // A bucket that has been idle refills only up to `burst`: restart from now.
        self.tat = self.tat.max(now) + interval;
        true
    }

    /// Tokens available at `now`, rounded down (for tests and diagnostics).
    pub fn available(&self, now: Instant) -> u32 {
        let ahead = self.tat.saturating_duration_since(now).as_nanos();
        let used = ahead.div_ceil(u128::from(self.interval_ns));
        self.burst.saturating_sub(used.min(u128::from(u32::MAX)) as u32)
    }
}

/// The unit a connection cap is counted in: one IPv4 address, or one IPv6 /64 network.
///
/// IPv4 by full address: one address is usually one household or office behind NAT, and large
/// carrier NATs already put many users behind one address, so grouping wider would lock out
/// strangers. IPv6 by /64: a single subscriber line is handed at least a /64 and a host can pick
/// any of its 2^64 addresses (privacy extensions rotate them on their own), so counting single
/// IPv6 addresses would be no limit at all; /64 is the smallest unit one party reliably controls.
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports for
/// IPv4 clients) count as the IPv4 address; otherwise every IPv4 client would share one /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpGroup {
    /// An IPv4 address (also from an IPv4-mapped IPv6 address).
    V4(u32),
    /// The top 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for IpGroup {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => IpGroup::V4(v4.to_bits()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpGroup::V4(v4.to_bits()),
                None => IpGroup::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// Open connections per client address group (see [`IpGroup`]), capped at a maximum.
///
/// Call [`try_acquire`](Self::try_acquire) when a connection is accepted and
/// [`release`](Self::release) exactly once when a connection that acquired closes. Entries are
/// removed when their count returns to zero, so the map holds at most one entry per open
/// connection and empties when they all close. The map uses std's SipHash, keyed randomly per
/// process, because the keys are chosen by clients: a predictable hash would let them collide
/// entries on purpose and make every accept slow.
///
/// Connections behind a reverse proxy all come from the proxy's address; the cap then limits the
/// proxy, so leave it off there.
#[derive(Debug, Clone)]
pub struct PerIpLimit {
    counts: HashMap<IpGroup, u32>,
    max: u32,
}

impl PerIpLimit {
    /// Allows up to `max` (at least 1) open connections per group.
    pub fn new(max: u32) -> Self {
        debug_assert!(
            max > 0,
            "a zero cap refuses everyone; leave the limit off instead"
        );
        PerIpLimit {
            counts: HashMap::new(),
            max: max.max(1),
        }
    }

    /// Counts a new connection from `ip`; `false` (and nothing counted) when its group is at the
    /// cap, in which case the connection must be refused and `release` not called for it.
    pub fn try_acquire(&mut self, ip: IpAddr) -> bool {
        let count = self.counts.entry(ip.into()).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    /// Uncounts a closed connection from `ip` that had been acquired.
    pub fn release(&mut self, ip: IpAddr) {
        let group = IpGroup::from(ip);
        let Some(count) = self.counts.get_mut(&group) else {
            // A release without an acquire would let a group exceed its cap later.
            debug_assert!(false, "release of {ip} without acquire");
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.counts.remove(&group);
            // After a connection flood the table would keep its peak capacity forever; give it
            // back once it is mostly empty (amortised: each shrink follows many removals).
            if self.counts.capacity() > 1024 && self.counts.len() < self.counts.capacity() / 4 {
                self.counts.shrink_to(self.counts.len() * 2);
            }
        }
    }

    /// Open connections counted for `ip`'s group.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.counts.get(&ip.into()).copied().unwrap_or(0)
    }

    /// Number of groups with at least one open connection.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when no connection is counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bucket_starts_full_and_allows_exactly_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!(b.available(t0), 5);
        for i in 0..5 {
            assert!(b.try_take(t0), "take {i}");
        }
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0));
        assert_eq!(b.available(t0), 0);
    }

    #[test]
    fn bucket_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        while b.try_take(t0) {}
        // 10 per second: one token every 100 ms, none before.
        assert!(!b.try_take(t0 + 99 * MS));
        assert!(b.try_take(t0 + 100 * MS));
        assert!(!b.try_take(t0 + 100 * MS));
        assert!(!b.try_take(t0 + 199 * MS));
        assert!(b.try_take(t0 + 200 * MS));
        // 350 ms later: three more tokens, not four.
        let t1 = t0 + 550 * MS;
        assert_eq!(b.available(t1), 3);
        assert_eq!((0..10).filter(|_| b.try_take(t1)).count(), 3);
    }

    #[test]
    fn idle_bucket_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 3, t0);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.available(later), 3);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 3);
    }

    #[test]
    fn sustained_rate_is_honoured_over_a_long_run() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(50, 10, t0);
        // Try every millisecond for 10 s: burst + rate * seconds, give or take the last token.
        let taken = (0..10_000u32).filter(|ms| b.try_take(t0 + MS * *ms)).count();
        assert!((509..=510).contains(&taken), "{taken}");
    }

    #[test]
    fn burst_of_one_and_uneven_rates() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 1, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 + 333 * MS));
        assert!(b.try_take(t0 + 334 * MS));
        let mut fast = TokenBucket::new(u32::MAX, 2, t0);
        assert!(fast.try_take(t0));
        assert!(fast.try_take(t0));
        assert!(!fast.try_take(t0));
        assert!(fast.try_take(t0 + Duration::from_nanos(1)));
    }

    #[test]
    fn time_going_backwards_never_adds_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1, 2, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 - Duration::from_secs(5)));
    }

    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn bucket_is_small() {
        assert_eq!(std::mem::size_of::<TokenBucket>(), 24);
        assert_eq!(std::mem::size_of::<Option<TokenBucket>>(), 24);
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn per_ip_cap_and_return_to_empty() {
        let mut l = PerIpLimit::new(2);
        let a = v4("192.0.2.1");
        let b = v4("192.0.2.2");
        assert!(l.try_acquire(a));
        assert!(l.try_acquire(a));
        assert!(!l.try_acquire(a), "third from the same address");
        assert_eq!(l.count(a), 2);
        assert!(l.try_acquire(b), "a neighbour is not affected");
        assert_eq!(l.len(), 2);
        l.release(a);
        assert!(l.try_acquire(a), "a slot freed by a close is reusable");
        l.release(a);
        l.release(a);
        l.release(b);
        assert!(l.is_empty());
        assert_eq!(l.count(a), 0);
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let mut l = PerIpLimit::new(2);
        assert!(l.try_acquire(v6("2001:db8:1:2::1")));
        assert!(l.try_acquire(v6("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        assert!(
            !l.try_acquire(v6("2001:db8:1:2:abcd::9")),
            "same /64, new address"
        );
        assert!(l.try_acquire(v6("2001:db8:1:3::1")), "next /64 is separate");
        assert_eq!(l.len(), 2);
        l.release(v6("2001:db8:1:2::77"));
        l.release(v6("2001:db8:1:2::78"));
        l.release(v6("2001:db8:1:3::1"));
        assert!(l.is_empty());
    }

    #[test]
    fn ipv4_mapped_counts_as_ipv4() {
        let mut l = PerIpLimit::new(1);
        assert!(l.try_acquire(v6("::ffff:192.0.2.1")));
        assert!(!l.try_acquire(v4("192.0.2.1")), "same client, either form");
        assert!(
            l.try_acquire(v6("::ffff:192.0.2.2")),
            "other IPv4 clients are not lumped into ::/64"
        );
        assert_eq!(IpGroup::from(v6("::ffff:10.0.0.1")), IpGroup::V4(0x0a00_0001));
        l.release(v4("192.0.2.1"));
        l.release(v4("192.0.2.2"));
        assert!(l.is_empty());
    }

    #[test]
    fn table_gives_memory_back_after_a_flood() {
        let mut l = PerIpLimit::new(1);
        let ips: Vec<IpAddr> = (0..50_000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from_bits(0x0a00_0000 + i)))
            .collect();
        for ip in &ips {
            assert!(l.try_acquire(*ip));
        }
        let peak = l.counts.capacity();
        for ip in &ips {
            l.release(*ip);
        }
        assert!(l.is_empty());
        assert!(
            l.counts.capacity() < peak / 8,
            "{} of {peak}",
            l.counts.capacity()
        );
    }
}
