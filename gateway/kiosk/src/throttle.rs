//! Login throttling per client address, the first line of defence against guessing.
//!
//! Failed logins are counted per TCP peer address (the kiosk terminates TLS itself, so the
//! peer address is the client's; no forwarding header is read). [`FAILURES`] failures
//! within [`WINDOW_SECS`] start a back-off of [`BACKOFF_SECS`] during which every login
//! attempt from that address, right or wrong, is answered 429 with `Retry-After` and never
//! reaches an account. The per-account lock (`gateway_staff::MAX_FAILURES`, much higher)
//! stays as the second line, so one address alone can never lock an account.
//!
//! Memory is bounded: at most [`MAX_ADDRESSES`] addresses are tracked; entries expire when
//! their window and back-off are over, and when the table is full the entry seen longest
//! ago is dropped (one not backing off before one that is). A success does not clear an
//! address's count: one valid account must not buy unlimited guesses at the others.
//!
//! An IPv4-mapped IPv6 peer counts as its IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Failed logins from one address within [`WINDOW_SECS`] that start a back-off.
pub const FAILURES: u32 = 5;
/// The window failures are counted in.
pub const WINDOW_SECS: u64 = 15 * 60;
/// How long an address is refused once it has reached [`FAILURES`].
pub const BACKOFF_SECS: u64 = 15 * 60;
/// Most addresses tracked at once.
pub const MAX_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: u64,
    blocked_until: Option<u64>,
    last_seen: u64,
}

impl Entry {
    fn blocked_at(&self, now: u64) -> Option<u64> {
        self.blocked_until.filter(|until| *until > now)
    }

    fn expired_at(&self, now: u64) -> bool {
        self.blocked_at(now).is_none() && now >= self.window_start.saturating_add(WINDOW_SECS)
    }
}

/// The per-address failure table.
#[derive(Debug)]
pub struct Throttle {
    by_addr: Mutex<HashMap<IpAddr, Entry>>,
    capacity: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::with_capacity(MAX_ADDRESSES)
    }
}

fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

impl Throttle {
    /// A table tracking at most `capacity` addresses (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            by_addr: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(seconds to wait)` while `addr` is backing off, else `Ok`.
    pub fn check(&self, addr: IpAddr, now: u64) -> Result<(), u64> {
        match self.map().get(&key(addr)).and_then(|e| e.blocked_at(now)) {
            Some(until) => Err(until.saturating_sub(now).max(1)),
            None => Ok(()),
        }
    }

    /// Counts a failed login from `addr`. Returns the end of the back-off (Unix seconds)
    /// when this failure started one, so the caller audits each back-off once.
    pub fn failure(&self, addr: IpAddr, now: u64) -> Option<u64> {
        let addr = key(addr);
        let mut map = self.map();
        if !map.contains_key(&addr) && map.len() >= self.capacity {
            map.retain(|_, e| !e.expired_at(now));
            if map.len() >= self.capacity {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, e)| (e.blocked_at(now).is_some(), e.last_seen))
                    .map(|(a, _)| *a);
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(addr).or_insert(Entry {
            failures: 0,
            window_start: now,
            blocked_until: None,
            last_seen: now,
        });
        entry.last_seen = now;
        if entry.blocked_at(now).is_some() {
            return None;
        }
        if entry.expired_at(now) {
            entry.failures = 0;
            entry.window_start = now;
            entry.blocked_until = None;
        }
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures >= FAILURES {
            let until = now.saturating_add(BACKOFF_SECS);
            entry.failures = 0;
            entry.window_start = until;
            entry.blocked_until = Some(until);
            return Some(until);
        }
        None
    }

    /// How many addresses are tracked now.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// True when no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NOW: u64 = 1_800_000_000;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn the_fifth_failure_starts_one_backoff_that_ends() {
        let t = Throttle::default();
        for i in 0..FAILURES - 1 {
            assert_eq!(t.failure(ip(1), NOW + u64::from(i)), None);
            assert_eq!(t.check(ip(1), NOW + u64::from(i)), Ok(()));
        }
        let until = t.failure(ip(1), NOW + 10);
        assert_eq!(until, Some(NOW + 10 + BACKOFF_SECS));
        assert_eq!(t.check(ip(1), NOW + 10), Err(BACKOFF_SECS));
        assert_eq!(t.failure(ip(1), NOW + 11), None, "one back-off, one report");
        assert_eq!(t.check(ip(2), NOW + 11), Ok(()), "other addresses are free");
        assert_eq!(t.check(ip(1), NOW + 10 + BACKOFF_SECS), Ok(()));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let t = Throttle::default();
        for i in 0..u64::from(FAILURES) * 2 {
            assert_eq!(t.failure(ip(1), NOW + i * WINDOW_SECS / 2), None);
        }
    }

    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_address() {
        let t = Throttle::default();
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        for _ in 0..FAILURES {
            t.failure(mapped, NOW);
        }
        assert!(t.check(ip(1), NOW).is_err());
        assert!(t.check(IpAddr::V6(Ipv6Addr::LOCALHOST), NOW).is_ok());
    }

    #[test]
    fn the_table_is_bounded_and_keeps_backing_off_addresses_longest() {
        let t = Throttle::with_capacity(8);
        for _ in 0..FAILURES {
            t.failure(ip(0), NOW);
        }
        for n in 1..100 {
            t.failure(ip(n), NOW + u64::from(n));
            assert!(t.len() <= 8);
        }
        assert!(
            t.check(ip(0), NOW + 100).is_err(),
            "the blocked one is kept"
        );
        // Expired entries make room first.
        t.failure(ip(500), NOW + 100 + BACKOFF_SECS + WINDOW_SECS);
        assert_eq!(t.len(), 1);
    }
}
