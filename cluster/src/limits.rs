//! Bounds on what strangers on the LAN can make a node spend (pure, time passed in):
//! - [`RateLimiter`]: failed handshakes per source address, then a growing block.
//! - [`HandshakeSlots`]: connections still in their handshake, per source and in total.
//!   When all are taken, a newcomer takes the oldest slot of the source that holds the most
//!   (fair share), so a flood from many addresses cannot lock out a real peer, whose
//!   handshake takes milliseconds.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Per-source-IP limit on failed handshakes: after `max_failures` failures within `window`,
/// the source is blocked for `block` (doubling on each further block, capped at 16×).
pub struct RateLimiter {
    max_failures: u32,
    window: Duration,
    block: Duration,
    entries: HashMap<IpAddr, Entry>,
}

struct Entry {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
    blocks: u32,
}

/// Sources remembered at most (a spray of addresses cannot grow the table without end).
const LIMITER_ENTRIES: usize = 4096;

impl RateLimiter {
    pub fn new(max_failures: u32, window: Duration, block: Duration) -> Self {
        RateLimiter {
            max_failures,
            window,
            block,
            entries: HashMap::new(),
        }
    }
    /// Is `ip` currently blocked?
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.entries
            .get(&ip)
            .and_then(|e| e.blocked_until)
            .is_some_and(|until| now < until)
    }
    /// Record a failure; returns true when this failure started a block.
    pub fn failure(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.entries.len() >= LIMITER_ENTRIES {
            let window = self.window;
            self.entries.retain(|_, e| {
                e.blocked_until.is_some_and(|u| now < u)
                    || now.duration_since(e.window_start) < window
            });
        }
        if self.entries.len() >= LIMITER_ENTRIES && !self.entries.contains_key(&ip) {
            // Still full of live entries: count nothing new rather than grow.
            return false;
        }
        let e = self.entries.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            blocked_until: None,
            blocks: 0,
        });
        if now.duration_since(e.window_start) > self.window {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures += 1;
        if e.failures >= self.max_failures {
            let factor = 1u32 << e.blocks.min(4);
            e.blocked_until = Some(now + self.block * factor);
            e.blocks += 1;
            e.failures = 0;
            e.window_start = now;
            return true;
        }
        false
    }
    /// A successful handshake clears the failure count (but not an active block).
    pub fn success(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&ip) {
            e.failures = 0;
            e.blocks = 0;
        }
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Identifies one handshake slot.
pub type SlotId = u64;

/// The answer to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Take this slot.
    Take(SlotId),
    /// Take this slot after ending the handshake holding `evict`.
    Evict { slot: SlotId, evict: SlotId },
    /// Drop the connection.
    Refuse,
}

/// Connections that have not authenticated yet, per source IP and in total.
pub struct HandshakeSlots {
    per_ip: usize,
    total: usize,
    next: SlotId,
    open: BTreeMap<SlotId, IpAddr>,
    by_ip: HashMap<IpAddr, usize>,
}

impl HandshakeSlots {
    pub fn new(per_ip: usize, total: usize) -> Self {
        HandshakeSlots {
            per_ip,
            total,
            next: 0,
            open: BTreeMap::new(),
            by_ip: HashMap::new(),
        }
    }
    fn take(&mut self, ip: IpAddr) -> SlotId {
        let id = self.next;
        self.next += 1;
        self.open.insert(id, ip);
        *self.by_ip.entry(ip).or_default() += 1;
        id
    }
    /// Decide about a new connection from `ip`.
    pub fn admit(&mut self, ip: IpAddr) -> Admit {
        let mine = self.by_ip.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_ip {
            return Admit::Refuse;
        }
        if self.open.len() < self.total {
            return Admit::Take(self.take(ip));
        }
        // Full: the source holding the most slots gives up its oldest, but only when it
        // holds more than the newcomer would after taking one.
        let Some((&heavy, &held)) = self.by_ip.iter().max_by_key(|(_, n)| **n) else {
            return Admit::Refuse;
        };
        if held <= mine + 1 {
            return Admit::Refuse;
        }
        let evict = *self
            .open
            .iter()
            .find(|(_, a)| **a == heavy)
            .map(|(id, _)| id)
            .expect("a source with slots holds one");
        self.release(evict);
        Admit::Evict {
            slot: self.take(ip),
            evict,
        }
    }
    /// The handshake in `slot` ended (authenticated, failed, timed out or evicted); a slot
    /// released twice is released once.
    pub fn release(&mut self, slot: SlotId) {
        if let Some(ip) = self.open.remove(&slot) {
            if let Some(n) = self.by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }
    pub fn in_use(&self) -> usize {
        self.open.len()
    }
    pub fn held_by(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn slots_cap_per_source_and_release_once() {
        let mut s = HandshakeSlots::new(2, 3);
        let a = s.admit(ip(1));
        let b = s.admit(ip(1));
        assert!(matches!(a, Admit::Take(_)) && matches!(b, Admit::Take(_)));
        assert_eq!(s.admit(ip(1)), Admit::Refuse, "third from one source");
        let Admit::Take(c) = s.admit(ip(2)) else {
            panic!()
        };
        assert_eq!(s.in_use(), 3);
        // Full: ip(3) holds nothing, ip(1) holds 2 > 0+1: its oldest goes.
        let Admit::Evict { evict, .. } = s.admit(ip(3)) else {
            panic!()
        };
        assert_eq!(Admit::Take(evict), a);
        assert_eq!(s.held_by(ip(1)), 1);
        // Now every source holds one: nobody is evicted for a fourth source.
        assert_eq!(s.admit(ip(4)), Admit::Refuse);
        s.release(c);
        s.release(c);
        assert_eq!(s.in_use(), 2);
    }

    #[test]
    fn a_flood_from_many_sources_cannot_lock_out_a_peer() {
        // 100 attacker addresses, each holding as many slots as it may.
        let mut s = HandshakeSlots::new(4, 128);
        for n in 0..100 {
            for _ in 0..4 {
                let _ = s.admit(ip(1000 + n));
            }
        }
        assert_eq!(s.in_use(), 128);
        // A real peer gets a slot at once.
        assert!(matches!(s.admit(ip(7)), Admit::Evict { .. }));
        assert_eq!(s.in_use(), 128);
    }

    #[test]
    fn rate_limiter_blocks_after_failures_and_expires() {
        let mut rl = RateLimiter::new(3, Duration::from_secs(60), Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!rl.failure(ip(9), t0));
        assert!(!rl.failure(ip(9), t0));
        assert!(rl.failure(ip(9), t0));
        assert!(rl.blocked(ip(9), t0 + Duration::from_secs(5)));
        assert!(!rl.blocked(ip(8), t0));
        assert!(!rl.blocked(ip(9), t0 + Duration::from_secs(11)));
        let t1 = t0 + Duration::from_secs(12);
        rl.failure(ip(9), t1);
        rl.failure(ip(9), t1);
        assert!(rl.failure(ip(9), t1));
        assert!(rl.blocked(ip(9), t1 + Duration::from_secs(15)));
        assert!(!rl.blocked(ip(9), t1 + Duration::from_secs(21)));
    }

    #[test]
    fn rate_limiter_memory_is_bounded() {
        let mut rl = RateLimiter::new(3, Duration::from_secs(60), Duration::from_secs(10));
        let t0 = Instant::now();
        for n in 0..10_000 {
            rl.failure(ip(n), t0);
        }
        assert!(rl.len() <= LIMITER_ENTRIES);
    }
}
