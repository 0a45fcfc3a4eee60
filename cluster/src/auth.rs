//! Mutual challenge–response authentication (pure, no I/O).
//!
//! Flow on one TCP connection (initiator I, responder R, shared token K):
//! 1. I → R `Hello{cluster_id, node_id_I, nonce_I, to}` (`to`: the address I dialled)
//! 2. R → I `Hello{cluster_id, node_id_R, nonce_R}`
//! 3. I → R `Proof{HMAC(K, T ‖ "initiator")}`
//! 4. R → I `Proof{HMAC(K, T ‖ "responder")}` — only after R verified I's proof.
//!
//! T binds the protocol version, cluster id, both node ids, both fresh nonces and the
//! address I dialled, so a recorded proof is useless on any other connection (the other
//! side's nonce differs) and a proof from one direction cannot be reflected back. R accepts
//! a hello only when `to` is its own end of the connection: a stranger that advertises
//! itself on mDNS and relays a node's bytes to a real member (a machine-in-the-middle
//! without the token) cannot complete the handshake, so no session, vote or join ever runs
//! through it. A responder never proves anything to a
//! peer that has not proven the token first, so strangers learn nothing but the public
//! cluster id. After the handshake both sides derive a session key
//! `HMAC(K, T ‖ "session")`; every following message carries a MAC over
//! direction, sequence number and body (see [`Session`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::id::NodeId;

type HmacSha256 = Hmac<Sha256>;

/// 2: the initiator's hello carries (and the transcript binds) the address it dialled.
pub const PROTOCOL_VERSION: u32 = 2;
const NONCE_LEN: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub v: u32,
    pub cluster_id: String,
    pub node_id: NodeId,
    /// Hex of 32 random bytes.
    pub nonce: String,
    /// Initiator only: the responder address it dialled (bound into the transcript).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    pub mac: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("protocol version {0} not supported")]
    Version(u32),
    #[error("peer belongs to another cluster (id {0})")]
    ForeignCluster(String),
    #[error("peer claims our own node id")]
    OwnId,
    #[error("malformed nonce")]
    BadNonce,
    #[error("peer dialled {dialled:?}, but this end is {local} (relayed connection?)")]
    WrongAddress {
        dialled: Option<SocketAddr>,
        local: SocketAddr,
    },
    #[error("proof does not verify (wrong token or replayed handshake)")]
    BadProof,
    #[error("message MAC does not verify")]
    BadMac,
    #[error("message out of sequence (expected {expected}, got {got})")]
    Sequence { expected: u64, got: u64 },
}

pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    rand::random()
}

fn check_hello(h: &Hello, cluster_id: &str, me: &NodeId) -> Result<(), AuthError> {
    if h.v != PROTOCOL_VERSION {
        return Err(AuthError::Version(h.v));
    }
    if h.cluster_id != cluster_id {
        return Err(AuthError::ForeignCluster(h.cluster_id.clone()));
    }
    if &h.node_id == me {
        return Err(AuthError::OwnId);
    }
    match hex::decode(&h.nonce) {
        Ok(n) if n.len() == NONCE_LEN => Ok(()),
        _ => Err(AuthError::BadNonce),
    }
}

fn transcript(cluster_id: &str, initiator: &Hello, responder: &Hello) -> Vec<u8> {
    let to = initiator.to.map(|a| a.to_string()).unwrap_or_default();
    let mut t = Vec::new();
    for part in [
        "clutch-auth-v2",
        cluster_id,
        initiator.node_id.as_str(),
        responder.node_id.as_str(),
        &initiator.nonce,
        &responder.nonce,
        &to,
    ] {
        t.extend_from_slice(part.as_bytes());
        t.push(0);
    }
    t
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("hmac takes any key");
    for p in parts {
        m.update(p);
    }
    m
}

fn proof(token: &str, t: &[u8], dir: &str) -> Proof {
    Proof {
        mac: hex::encode(
            mac(token.as_bytes(), &[t, dir.as_bytes()])
                .finalize()
                .into_bytes(),
        ),
    }
}

fn verify_proof(token: &str, t: &[u8], dir: &str, p: &Proof) -> Result<(), AuthError> {
    let got = hex::decode(&p.mac).map_err(|_| AuthError::BadProof)?;
    mac(token.as_bytes(), &[t, dir.as_bytes()])
        .verify_slice(&got)
        .map_err(|_| AuthError::BadProof)
}

fn session_key(token: &str, t: &[u8]) -> [u8; 32] {
    mac(token.as_bytes(), &[t, b"session"])
        .finalize()
        .into_bytes()
        .into()
}

/// The side that opened the connection.
pub struct Initiator {
    token: String,
    cluster_id: String,
    hello: Hello,
}

pub struct InitiatorAwaitingProof {
    token: String,
    transcript: Vec<u8>,
    peer: NodeId,
}

impl Initiator {
    pub fn new(token: &str, cluster_id: &str, me: NodeId, nonce: [u8; NONCE_LEN]) -> Self {
        Initiator {
            token: token.to_string(),
            cluster_id: cluster_id.to_string(),
            hello: Hello {
                v: PROTOCOL_VERSION,
                cluster_id: cluster_id.to_string(),
                node_id: me,
                nonce: hex::encode(nonce),
                to: None,
            },
        }
    }
    /// Bind the responder address being dialled into the handshake (always do this on a
    /// real connection: it is what makes relaying the handshake fail).
    pub fn dialing(mut self, to: SocketAddr) -> Self {
        self.hello.to = Some(to);
        self
    }
    pub fn hello(&self) -> &Hello {
        &self.hello
    }
    /// The responder's hello arrived: send back our proof.
    pub fn on_hello(self, r: &Hello) -> Result<(InitiatorAwaitingProof, Proof), AuthError> {
        check_hello(r, &self.cluster_id, &self.hello.node_id)?;
        let t = transcript(&self.cluster_id, &self.hello, r);
        let p = proof(&self.token, &t, "initiator");
        Ok((
            InitiatorAwaitingProof {
                token: self.token,
                transcript: t,
                peer: r.node_id.clone(),
            },
            p,
        ))
    }
}

impl InitiatorAwaitingProof {
    pub fn on_proof(self, p: &Proof) -> Result<Session, AuthError> {
        verify_proof(&self.token, &self.transcript, "responder", p)?;
        Ok(Session::new(
            self.peer,
            session_key(&self.token, &self.transcript),
            true,
        ))
    }
}

/// The side that accepted the connection.
pub struct Responder {
    token: String,
    cluster_id: String,
    me: NodeId,
    nonce: [u8; NONCE_LEN],
    local: SocketAddr,
}

pub struct ResponderAwaitingProof {
    token: String,
    transcript: Vec<u8>,
    peer: NodeId,
}

impl Responder {
    /// `local`: this end of the accepted connection (the address the initiator must have
    /// dialled).
    pub fn new(
        token: &str,
        cluster_id: &str,
        me: NodeId,
        nonce: [u8; NONCE_LEN],
        local: SocketAddr,
    ) -> Self {
        Responder {
            token: token.to_string(),
            cluster_id: cluster_id.to_string(),
            me,
            nonce,
            local,
        }
    }
    pub fn on_hello(self, i: &Hello) -> Result<(ResponderAwaitingProof, Hello), AuthError> {
        check_hello(i, &self.cluster_id, &self.me)?;
        if i.to != Some(self.local) {
            return Err(AuthError::WrongAddress {
                dialled: i.to,
                local: self.local,
            });
        }
        let r = Hello {
            v: PROTOCOL_VERSION,
            cluster_id: self.cluster_id.clone(),
            node_id: self.me,
            nonce: hex::encode(self.nonce),
            to: None,
        };
        let t = transcript(&self.cluster_id, i, &r);
        Ok((
            ResponderAwaitingProof {
                token: self.token,
                transcript: t,
                peer: i.node_id.clone(),
            },
            r,
        ))
    }
}

impl ResponderAwaitingProof {
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }
    pub fn on_proof(self, p: &Proof) -> Result<(Session, Proof), AuthError> {
        verify_proof(&self.token, &self.transcript, "initiator", p)?;
        let mine = proof(&self.token, &self.transcript, "responder");
        Ok((
            Session::new(self.peer, session_key(&self.token, &self.transcript), false),
            mine,
        ))
    }
}

/// One authenticated message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub seq: u64,
    /// JSON text of the payload (MAC'd byte for byte).
    pub body: String,
    pub mac: String,
}

/// An authenticated session: MACs every message with the session key, direction and a
/// per-direction sequence number, so messages can be neither forged, reflected, reordered
/// nor replayed.
pub struct Session {
    peer: NodeId,
    key: [u8; 32],
    initiator: bool,
    send_seq: u64,
    recv_seq: u64,
}

impl Session {
    fn new(peer: NodeId, key: [u8; 32], initiator: bool) -> Self {
        Session {
            peer,
            key,
            initiator,
            send_seq: 0,
            recv_seq: 0,
        }
    }
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }
    fn tag(&self, from_initiator: bool, seq: u64, body: &str) -> HmacSha256 {
        let dir: &[u8] = if from_initiator { b"i>r" } else { b"r>i" };
        mac(&self.key, &[dir, &seq.to_be_bytes(), body.as_bytes()])
    }
    pub fn seal(&mut self, body: String) -> Sealed {
        let seq = self.send_seq;
        self.send_seq += 1;
        let mac = hex::encode(self.tag(self.initiator, seq, &body).finalize().into_bytes());
        Sealed { seq, body, mac }
    }
    pub fn open(&mut self, m: &Sealed) -> Result<String, AuthError> {
        let got = hex::decode(&m.mac).map_err(|_| AuthError::BadMac)?;
        self.tag(!self.initiator, m.seq, &m.body)
            .verify_slice(&got)
            .map_err(|_| AuthError::BadMac)?;
        if m.seq != self.recv_seq {
            return Err(AuthError::Sequence {
                expected: self.recv_seq,
                got: m.seq,
            });
        }
        self.recv_seq += 1;
        Ok(m.body.clone())
    }
}

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
        if self.entries.len() > 4096 {
            // Bound memory under a spray of sources: forget quiet ones.
            let window = self.window;
            self.entries.retain(|_, e| {
                e.blocked_until.is_some_and(|u| now < u)
                    || now.duration_since(e.window_start) < window
            });
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
}

/// Caps connections that have not authenticated yet (handshakes in progress), per source
/// IP and in total, so a flood of connections cannot make a node hold unbounded sockets
/// and tasks. Authenticated sessions do not count.
pub struct HandshakeSlots {
    per_ip: usize,
    total: usize,
    open: HashMap<IpAddr, usize>,
    count: usize,
}

impl HandshakeSlots {
    pub fn new(per_ip: usize, total: usize) -> Self {
        HandshakeSlots {
            per_ip,
            total,
            open: HashMap::new(),
            count: 0,
        }
    }
    /// Take a slot for a new connection from `ip`; false = refuse the connection.
    pub fn try_take(&mut self, ip: IpAddr) -> bool {
        let n = self.open.get(&ip).copied().unwrap_or(0);
        if n >= self.per_ip || self.count >= self.total {
            return false;
        }
        self.open.insert(ip, n + 1);
        self.count += 1;
        true
    }
    /// The handshake from `ip` ended (authenticated, failed or timed out).
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            self.count -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }
    pub fn in_use(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef-token";
    const CID: &str = "cid";
    const AT: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)), 7373);

    fn id(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn run(
        ti: &str,
        tr: &str,
        ni: [u8; 32],
        nr: [u8; 32],
    ) -> (Result<Session, AuthError>, Option<Session>) {
        let i = Initiator::new(ti, CID, id("aaa"), ni).dialing(AT);
        let r = Responder::new(tr, CID, id("bbb"), nr, AT);
        let (r, rh) = r.on_hello(i.hello()).unwrap();
        let (i, ip) = i.on_hello(&rh).unwrap();
        match r.on_proof(&ip) {
            Ok((rs, rp)) => (i.on_proof(&rp), Some(rs)),
            Err(e) => (Err(e), None),
        }
    }

    #[test]
    fn same_token_authenticates_both_ways_and_sessions_talk() {
        let (is, rs) = run(TOKEN, TOKEN, fresh_nonce(), fresh_nonce());
        let mut is = is.unwrap();
        let mut rs = rs.unwrap();
        assert_eq!(is.peer(), &id("bbb"));
        assert_eq!(rs.peer(), &id("aaa"));
        let m = is.seal("hello".into());
        assert_eq!(rs.open(&m).unwrap(), "hello");
        // replay of the same sealed message fails (sequence)
        assert!(matches!(rs.open(&m), Err(AuthError::Sequence { .. })));
        // reflection: a message from the initiator fed back to the initiator fails
        let m2 = is.seal("x".into());
        assert_eq!(is.open(&m2), Err(AuthError::BadMac));
        let back = rs.seal("reply".into());
        assert_eq!(is.open(&back).unwrap(), "reply");
        let mut tampered = rs.seal("a".into());
        tampered.body = "b".into();
        assert_eq!(is.open(&tampered), Err(AuthError::BadMac));
    }

    #[test]
    fn wrong_token_is_rejected_and_responder_never_proves() {
        let (is, rs) = run(
            "another-token-that-is-long-enough-000",
            TOKEN,
            fresh_nonce(),
            fresh_nonce(),
        );
        assert_eq!(is.err(), Some(AuthError::BadProof));
        assert!(rs.is_none(), "responder must not yield a session or proof");
    }

    #[test]
    fn replayed_initiator_proof_fails_with_fresh_responder_nonce() {
        let ni = fresh_nonce();
        // Record a genuine exchange.
        let i = Initiator::new(TOKEN, CID, id("aaa"), ni).dialing(AT);
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        let (r, rh) = r.on_hello(i.hello()).unwrap();
        let recorded_hello = i.hello().clone();
        let (_i, recorded_proof) = i.on_hello(&rh).unwrap();
        assert!(r.on_proof(&recorded_proof).is_ok());
        // An attacker replays the recorded hello and proof to a new responder session.
        let r2 = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        let (r2, _) = r2.on_hello(&recorded_hello).unwrap();
        assert_eq!(
            r2.on_proof(&recorded_proof).err(),
            Some(AuthError::BadProof)
        );
    }

    #[test]
    fn reflected_proof_is_rejected() {
        // The initiator's proof must not pass as the responder's.
        let i = Initiator::new(TOKEN, CID, id("aaa"), fresh_nonce()).dialing(AT);
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        let (_r, rh) = r.on_hello(i.hello()).unwrap();
        let (i, ip) = i.on_hello(&rh).unwrap();
        assert_eq!(i.on_proof(&ip).err(), Some(AuthError::BadProof));
    }

    #[test]
    fn relayed_handshake_fails() {
        // A relay M advertises itself; node I dials M, and M passes the bytes to the real R.
        let m: SocketAddr = "10.0.0.66:7373".parse().unwrap();
        let i = Initiator::new(TOKEN, CID, id("aaa"), fresh_nonce()).dialing(m);
        // R refuses a hello addressed to another end of the connection, or to none.
        for to in [Some(m), None] {
            let mut h = i.hello().clone();
            h.to = to;
            let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
            assert_eq!(
                r.on_hello(&h).err(),
                Some(AuthError::WrongAddress {
                    dialled: to,
                    local: AT
                })
            );
        }
        // M rewrites the address: R answers, but I's proof binds the address I dialled.
        let mut h = i.hello().clone();
        h.to = Some(AT);
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        let (r, rh) = r.on_hello(&h).unwrap();
        let (_, proof) = i.on_hello(&rh).unwrap();
        assert_eq!(r.on_proof(&proof).err(), Some(AuthError::BadProof));
    }

    #[test]
    fn hello_checks() {
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        let mut h = Initiator::new(TOKEN, "other", id("aaa"), fresh_nonce())
            .dialing(AT)
            .hello()
            .clone();
        assert!(matches!(r.on_hello(&h), Err(AuthError::ForeignCluster(_))));
        h.cluster_id = CID.into();
        h.node_id = id("bbb");
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        assert_eq!(r.on_hello(&h).err(), Some(AuthError::OwnId));
        h.node_id = id("aaa");
        h.nonce = "00".into();
        let r = Responder::new(TOKEN, CID, id("bbb"), fresh_nonce(), AT);
        assert_eq!(r.on_hello(&h).err(), Some(AuthError::BadNonce));
    }

    #[test]
    fn handshake_slots_cap_per_source_and_in_total() {
        let mut s = HandshakeSlots::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(s.try_take(a) && s.try_take(a));
        assert!(!s.try_take(a), "third from one source");
        assert!(s.try_take(b));
        assert!(!s.try_take(c), "total reached");
        assert_eq!(s.in_use(), 3);
        s.release(a);
        assert!(s.try_take(c));
        assert!(!s.try_take(a), "total still reached");
        s.release(b);
        assert!(s.try_take(a));
        // Releasing a source that holds nothing changes nothing.
        s.release("10.9.9.9".parse().unwrap());
        assert_eq!(s.in_use(), 3);
        for ip in [a, a, c] {
            s.release(ip);
        }
        assert_eq!(s.in_use(), 0);
        assert!(s.open.is_empty());
    }

    #[test]
    fn rate_limiter_blocks_after_failures_and_expires() {
        let mut rl = RateLimiter::new(3, Duration::from_secs(60), Duration::from_secs(10));
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let t0 = Instant::now();
        assert!(!rl.failure(ip, t0));
        assert!(!rl.failure(ip, t0));
        assert!(rl.failure(ip, t0));
        assert!(rl.blocked(ip, t0 + Duration::from_secs(5)));
        assert!(!rl.blocked(other, t0));
        assert!(!rl.blocked(ip, t0 + Duration::from_secs(11)));
        // second block lasts twice as long
        let t1 = t0 + Duration::from_secs(12);
        rl.failure(ip, t1);
        rl.failure(ip, t1);
        assert!(rl.failure(ip, t1));
        assert!(rl.blocked(ip, t1 + Duration::from_secs(15)));
        assert!(!rl.blocked(ip, t1 + Duration::from_secs(21)));
    }
}
