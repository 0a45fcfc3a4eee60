//! The election and join-serialisation state machines (pure: time is passed in).
//!
//! Rules:
//! - Only authenticated peers count.
//! - If any authenticated peer knows of an existing cluster (it is bootstrapping, joining or
//!   ready), nobody bootstraps: we join the lowest-id ready server, or wait for one.
//! - Otherwise we wait until the authenticated set (ourselves included) reaches quorum
//!   (`floor(expected/2)+1`) and has been unchanged for the settle window. Then the lowest id
//!   in the set is the candidate. The candidate asks the set for votes ([`Voter`]); a node
//!   votes for at most one candidate at a time and never for a candidate when it knows a lower
//!   id. The candidate bootstraps only with a quorum of votes (its own included), so two
//!   candidates can never both bootstrap: two vote quorums would share a voter.
//!   A minority partition never reaches quorum and never bootstraps.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::id::{NodeId, Phase, Role};

/// What we know about one authenticated peer (from its latest status reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub phase: Phase,
    pub role: Role,
    /// The peer is in, or knows of, a formed cluster.
    pub cluster_exists: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do yet; the string says why (for the status line).
    Wait(String),
    /// We are the candidate: ask these peers for votes, then bootstrap with a quorum.
    RequestVotes(Vec<NodeId>),
    /// A cluster exists: ask this (ready server) peer to admit us.
    Join(NodeId),
}

pub struct Election {
    me: NodeId,
    quorum: usize,
    settle: Duration,
    stable: Option<(BTreeSet<NodeId>, Instant)>,
}

fn fmt_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64().ceil() as u64)
}

impl Election {
    pub fn new(me: NodeId, quorum: usize, settle: Duration) -> Self {
        Election {
            me,
            quorum: quorum.max(1),
            settle,
            stable: None,
        }
    }

    /// One step. `seen` = peers of our cluster seen on mDNS (authenticated or not, excluding
    /// us); `peers` = authenticated peers.
    pub fn step(
        &mut self,
        now: Instant,
        seen: usize,
        peers: &BTreeMap<NodeId, PeerView>,
    ) -> Decision {
        if let Some(d) = join_decision(peers) {
            self.stable = None;
            return d;
        }
        let mut set: BTreeSet<NodeId> = peers.keys().cloned().collect();
        set.insert(self.me.clone());
        let have = set.len();
        if have < self.quorum {
            self.stable = None;
            return Decision::Wait(format!(
                "{have}/{} nodes authenticated ({} seen), need quorum {}; waiting",
                self.quorum,
                seen + 1,
                self.quorum
            ));
        }
        let since = match &self.stable {
            Some((s, since)) if *s == set => *since,
            _ => {
                self.stable = Some((set.clone(), now));
                now
            }
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed < self.settle {
            return Decision::Wait(format!(
                "{have}/{} nodes authenticated, settling {}",
                self.quorum,
                fmt_secs(self.settle - elapsed)
            ));
        }
        let lowest = set.iter().next().expect("set holds me").clone();
        if lowest == self.me {
            Decision::RequestVotes(set.into_iter().filter(|n| *n != self.me).collect())
        } else {
            Decision::Wait(format!(
                "{have} nodes authenticated; waiting for {lowest} (lowest id) to bootstrap"
            ))
        }
    }
}

fn join_decision(peers: &BTreeMap<NodeId, PeerView>) -> Option<Decision> {
    if !peers.values().any(|p| p.cluster_exists) {
        return None;
    }
    let target = peers
        .iter()
        .find(|(_, p)| p.phase == Phase::Ready && p.role == Role::Server)
        .map(|(id, _)| id.clone());
    Some(match target {
        Some(t) => Decision::Join(t),
        None => {
            let busy: Vec<String> = peers
                .iter()
                .filter(|(_, p)| p.cluster_exists)
                .map(|(id, p)| format!("{id} {}", p.phase))
                .collect();
            Decision::Wait(format!(
                "a cluster exists ({}); waiting for a ready server to join",
                busy.join(", ")
            ))
        }
    })
}

/// Vote bookkeeping: at most one candidate at a time; a promise lapses after `ttl` (so a
/// candidate that died does not block formation forever).
pub struct Voter {
    ttl: Duration,
    promised: Option<(NodeId, Instant)>,
}

impl Voter {
    pub fn new(ttl: Duration) -> Self {
        Voter {
            ttl,
            promised: None,
        }
    }

    /// Decide a vote request from `candidate`. `lowest_known` is the lowest id among our
    /// authenticated set (ourselves included); `cluster_exists` whether we know of a cluster.
    pub fn consider(
        &mut self,
        candidate: &NodeId,
        now: Instant,
        lowest_known: &NodeId,
        cluster_exists: bool,
    ) -> Result<(), String> {
        if cluster_exists {
            return Err("a cluster already exists".into());
        }
        if lowest_known < candidate {
            return Err(format!("{lowest_known} has a lower id"));
        }
        if let Some((p, at)) = &self.promised {
            if p != candidate && now.saturating_duration_since(*at) < self.ttl {
                return Err(format!("already promised to {p}"));
            }
        }
        self.promised = Some((candidate.clone(), now));
        Ok(())
    }
}

/// Join serialisation on an admitting member: one pending join at a time. A pending join
/// ends when the joiner reports back, or after `timeout`.
pub struct Admissions {
    timeout: Duration,
    pending: Option<(NodeId, Instant)>,
}

impl Admissions {
    pub fn new(timeout: Duration) -> Self {
        Admissions {
            timeout,
            pending: None,
        }
    }
    /// Try to start admitting `joiner`. Err carries who is pending.
    pub fn begin(&mut self, joiner: &NodeId, now: Instant) -> Result<(), NodeId> {
        if let Some((p, at)) = &self.pending {
            if p != joiner && now.saturating_duration_since(*at) < self.timeout {
                return Err(p.clone());
            }
        }
        self.pending = Some((joiner.clone(), now));
        Ok(())
    }
    pub fn finish(&mut self, joiner: &NodeId) {
        if self.pending.as_ref().is_some_and(|(p, _)| p == joiner) {
            self.pending = None;
        }
    }
    pub fn pending(&self) -> Option<&NodeId> {
        self.pending.as_ref().map(|(p, _)| p)
    }
}

/// The role a joiner gets: a server while fewer than `servers` servers exist.
pub fn role_for_joiner(current_servers: usize, servers: usize) -> Role {
    if current_servers < servers {
        Role::Server
    } else {
        Role::Agent
    }
}

/// Exponential backoff with jitter: base·2^n capped at `max`, times a factor in [0.5, 1.0).
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }
    /// Next delay; `jitter` in [0,1) (pass `rand::random()`).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt += 1;
        exp.min(self.max)
            .mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        s.parse().unwrap()
    }
    fn fresh() -> PeerView {
        PeerView {
            phase: Phase::Discovering,
            role: Role::None,
            cluster_exists: false,
        }
    }
    fn peers(ids: &[&str]) -> BTreeMap<NodeId, PeerView> {
        ids.iter().map(|s| (id(s), fresh())).collect()
    }
    const S: Duration = Duration::from_secs(5);

    #[test]
    fn waits_for_quorum_then_settle_then_lowest_requests_votes() {
        let mut e = Election::new(id("a"), 2, S);
        let t0 = Instant::now();
        match e.step(t0, 1, &peers(&[])) {
            Decision::Wait(w) => assert!(
                w.contains("1/2 nodes authenticated (2 seen), need quorum 2"),
                "{w}"
            ),
            d => panic!("{d:?}"),
        }
        let p = peers(&["b", "c"]);
        match e.step(t0, 2, &p) {
            Decision::Wait(w) => assert_eq!(w, "3/2 nodes authenticated, settling 5s"),
            d => panic!("{d:?}"),
        }
        assert!(matches!(
            e.step(t0 + Duration::from_secs(4), 2, &p),
            Decision::Wait(_)
        ));
        assert_eq!(
            e.step(t0 + S, 2, &p),
            Decision::RequestVotes(vec![id("b"), id("c")])
        );
    }

    #[test]
    fn set_change_restarts_settle() {
        let mut e = Election::new(id("a"), 2, S);
        let t0 = Instant::now();
        e.step(t0, 1, &peers(&["b"]));
        e.step(t0 + Duration::from_secs(4), 2, &peers(&["b", "c"]));
        assert!(matches!(
            e.step(t0 + Duration::from_secs(6), 2, &peers(&["b", "c"])),
            Decision::Wait(_)
        ));
        assert!(matches!(
            e.step(t0 + Duration::from_secs(9), 2, &peers(&["b", "c"])),
            Decision::RequestVotes(_)
        ));
    }

    #[test]
    fn non_lowest_waits_for_lowest() {
        let mut e = Election::new(id("b"), 2, S);
        let t0 = Instant::now();
        e.step(t0, 1, &peers(&["a"]));
        match e.step(t0 + S, 1, &peers(&["a"])) {
            Decision::Wait(w) => assert!(w.contains("waiting for a"), "{w}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn minority_never_bootstraps() {
        // 5 expected, quorum 3; two nodes cut off see only each other forever.
        let mut e = Election::new(id("a"), 3, S);
        let t0 = Instant::now();
        for s in 0..100 {
            let d = e.step(t0 + Duration::from_secs(s), 1, &peers(&["b"]));
            assert!(matches!(d, Decision::Wait(_)), "{d:?}");
        }
    }

    #[test]
    fn existing_cluster_means_join_never_bootstrap() {
        let mut e = Election::new(id("a"), 2, Duration::ZERO);
        let t0 = Instant::now();
        let mut p = peers(&["b", "c"]);
        p.get_mut(&id("c")).unwrap().cluster_exists = true;
        p.get_mut(&id("c")).unwrap().phase = Phase::Bootstrapping;
        match e.step(t0, 2, &p) {
            Decision::Wait(w) => assert!(w.contains("c bootstrapping"), "{w}"),
            d => panic!("{d:?}"),
        }
        let c = p.get_mut(&id("c")).unwrap();
        c.phase = Phase::Ready;
        c.role = Role::Server;
        assert_eq!(e.step(t0, 2, &p), Decision::Join(id("c")));
        // an agent is not a join target
        p.get_mut(&id("c")).unwrap().role = Role::Agent;
        assert!(matches!(e.step(t0, 2, &p), Decision::Wait(_)));
    }

    #[test]
    fn voter_promises_one_candidate_at_a_time() {
        let mut v = Voter::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(v.consider(&id("a"), t0, &id("a"), false).is_ok());
        assert!(
            v.consider(&id("a"), t0, &id("a"), false).is_ok(),
            "same candidate again"
        );
        assert!(
            v.consider(&id("b"), t0, &id("b"), false).is_err(),
            "promised to a"
        );
        assert!(
            v.consider(&id("b"), t0 + Duration::from_secs(31), &id("b"), false)
                .is_ok()
        );
        let mut v = Voter::new(Duration::from_secs(30));
        assert!(
            v.consider(&id("b"), t0, &id("a"), false).is_err(),
            "knows lower id"
        );
        assert!(
            v.consider(&id("a"), t0, &id("a"), true).is_err(),
            "cluster exists"
        );
    }

    #[test]
    fn two_candidates_cannot_both_win_a_majority() {
        // 5 voters; whatever order requests arrive in, at most one candidate gets >= 3.
        let ids: Vec<NodeId> = ["a", "b", "c", "d", "e"].iter().map(|s| id(s)).collect();
        for order in 0..32u32 {
            let mut voters: Vec<Voter> = (0..5)
                .map(|_| Voter::new(Duration::from_secs(30)))
                .collect();
            let t0 = Instant::now();
            let (mut va, mut vb) = (0, 0);
            for (i, v) in voters.iter_mut().enumerate() {
                // asymmetric views: each voter's lowest known id is either a or b
                let lowest = if order & (1 << i) != 0 {
                    &ids[0]
                } else {
                    &ids[1]
                };
                let first_a = (order >> i) & 1 == 0;
                let cands = if first_a {
                    [&ids[0], &ids[1]]
                } else {
                    [&ids[1], &ids[0]]
                };
                for c in cands {
                    if v.consider(c, t0, lowest.min(c), false).is_ok() {
                        if *c == ids[0] { va += 1 } else { vb += 1 }
                    }
                }
            }
            assert!(!(va >= 3 && vb >= 3), "order {order}: a={va} b={vb}");
        }
    }

    #[test]
    fn admissions_serialise_joins() {
        let mut a = Admissions::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(a.begin(&id("x"), t0).is_ok());
        assert_eq!(a.begin(&id("y"), t0), Err(id("x")));
        assert!(
            a.begin(&id("x"), t0).is_ok(),
            "the pending joiner may retry"
        );
        a.finish(&id("x"));
        assert!(a.begin(&id("y"), t0).is_ok());
        assert!(
            a.begin(&id("z"), t0 + Duration::from_secs(61)).is_ok(),
            "timed out"
        );
        assert_eq!(a.pending(), Some(&id("z")));
    }

    #[test]
    fn roles_and_backoff() {
        assert_eq!(role_for_joiner(1, 3), Role::Server);
        assert_eq!(role_for_joiner(3, 3), Role::Agent);
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
        assert_eq!(b.next_delay(0.999_999).as_millis(), 999);
        for _ in 0..10 {
            b.next_delay(0.5);
        }
        assert!(b.next_delay(0.999_999) < Duration::from_secs(8));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
    }
}
