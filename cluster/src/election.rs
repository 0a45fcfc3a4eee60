//! Who bootstraps, and how everyone else gets in (pure: time and views are passed in).
//!
//! Rules:
//! - Only authenticated peers count, and only peers of the same [`crate::ClusterKey`] (name,
//!   engine, expected size, servers) ever authenticate, so nodes configured differently
//!   never count toward each other's quorum.
//! - Evidence of a cluster is sticky: once a node knows a cluster instance (it is listed
//!   in a bootstrap plan, or an authenticated peer is in a cluster) it keeps that knowledge
//!   on disk and never votes or bootstraps again; it joins.
//! - Otherwise, once the authenticated set (ourselves included) is the whole expected set
//!   and has settled — or is at least a quorum (`floor(expected/2)+1`) and has waited the
//!   longer partial window for the rest — the lowest id asks the set for votes. A vote is
//!   written to disk before it is granted and is never given to another candidate until the
//!   first releases it (it withdraws when it cannot win) or a cluster appears: like Raft's
//!   `votedFor`, it does not lapse with time, because its candidate may have bootstrapped
//!   and only be out of reach. With a quorum of votes the candidate publishes the bootstrap
//!   plan (every voter it counted, the lowest `servers` ids as servers); two candidates can
//!   never both win, since two vote quorums share a voter.
//! - A minority partition never reaches quorum and never bootstraps.
//! - Members listed in the plan start together from it ([`Decision::Enroll`]); nodes that
//!   come later, replacements, and (for k3s) further servers join the running cluster one
//!   at a time ([`Decision::Join`]).
//! - A node that sees two cluster instances, and is in neither, joins neither.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::engine::PlanStart;
use crate::id::{InstanceId, NodeId, Phase, Role};
use crate::state::Durable;
use crate::wire::{Bootstrap, MemberInfo};

/// What we know about one authenticated peer (from its latest status reply).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub phase: Phase,
    pub role: Role,
    pub cluster: Option<InstanceId>,
    pub bootstrap: Option<Bootstrap>,
}

impl PeerView {
    fn ready_server(&self) -> bool {
        self.phase == Phase::Ready && self.role == Role::Server
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do yet; the string says why (for the status).
    Wait(String),
    /// We are the candidate: ask these peers for votes.
    RequestVotes(Vec<NodeId>),
    /// We hold our own vote but a lower id is here: release it and our voters.
    Withdraw,
    /// We published this plan: start the cluster from it.
    Found(Bootstrap),
    /// We are listed in this plan and start from it: ask `from` for what we need.
    Enroll { from: NodeId, plan: Bootstrap },
    /// A cluster exists and we are not (or not yet) in it: ask this ready server.
    Join(NodeId),
    /// Two clusters are on the LAN and we are in neither.
    Conflict(String),
}

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct Rules {
    pub me: NodeId,
    pub expected: usize,
    pub quorum: usize,
    /// How long the whole expected set must stay unchanged before the vote.
    pub settle: Duration,
    /// How long a quorum that is not the whole set waits for the rest.
    pub partial_wait: Duration,
}

/// What the election looks at in one step.
pub struct View<'a> {
    pub durable: &'a Durable,
    pub peers: &'a BTreeMap<NodeId, PeerView>,
    /// Peers of our cluster key seen on mDNS (authenticated or not).
    pub seen: usize,
    /// How the engine starts a member of this role listed in a plan.
    pub plan_start: &'a dyn Fn(Role) -> PlanStart,
}

pub struct Election {
    rules: Rules,
    stable: Option<(BTreeSet<NodeId>, Instant)>,
}

fn fmt_secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64().ceil() as u64)
}

fn ids(v: &[&NodeId]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Election {
    pub fn new(mut rules: Rules) -> Self {
        rules.quorum = rules.quorum.max(1);
        rules.expected = rules.expected.max(rules.quorum);
        Election {
            rules,
            stable: None,
        }
    }

    /// One step of the decision.
    pub fn step(&mut self, now: Instant, v: &View<'_>) -> Decision {
        if let Some(d) = self.planned(v) {
            self.stable = None;
            return d;
        }
        if let Some(d) = self.existing_cluster(v) {
            self.stable = None;
            return d;
        }
        self.vote_step(now, v)
    }

    /// A plan that lists us: ours, or one an authenticated peer carries.
    fn planned(&self, v: &View<'_>) -> Option<Decision> {
        let me = &self.rules.me;
        let plan = v.durable.bootstrap.clone().or_else(|| {
            v.peers
                .values()
                .filter_map(|p| p.bootstrap.as_ref())
                .find(|b| b.member(me).is_some())
                .cloned()
        })?;
        let mine = plan.member(me)?;
        if &plan.leader == me {
            return Some(Decision::Found(plan));
        }
        let start = (v.plan_start)(mine.role);
        if start == PlanStart::OneByOne {
            // Listed, but this engine admits such members one by one once the first is up.
            return None;
        }
        let of_plan =
            |p: &PeerView| p.bootstrap.as_ref().map(|b| &b.instance) == Some(&plan.instance);
        let leader_up = v.peers.get(&plan.leader).is_some_and(of_plan);
        let from = if leader_up && start == PlanStart::Together {
            Some(plan.leader.clone())
        } else {
            v.peers
                .iter()
                .filter(|(id, p)| of_plan(p) && p.ready_server() && plan.member(id).is_some())
                .map(|(id, _)| id.clone())
                .next()
        };
        Some(match from {
            Some(from) => Decision::Enroll { from, plan },
            None => Decision::Wait(format!(
                "listed in the bootstrap plan of {}; waiting for {} to answer",
                plan.leader,
                if start == PlanStart::Together {
                    "it (or a ready server of the plan)"
                } else {
                    "a ready server of the plan"
                }
            )),
        })
    }

    /// A cluster exists (we know an instance, or a peer is in one): join it.
    fn existing_cluster(&self, v: &View<'_>) -> Option<Decision> {
        let mut instances: BTreeMap<&InstanceId, Vec<&NodeId>> = BTreeMap::new();
        for (id, p) in v.peers {
            if let Some(i) = &p.cluster {
                instances.entry(i).or_default().push(id);
            }
        }
        let ours = match &v.durable.cluster {
            Some(i) => i,
            None if instances.len() > 1 => {
                let list: Vec<String> = instances
                    .iter()
                    .map(|(i, m)| format!("{i} ({})", ids(m)))
                    .collect();
                return Some(Decision::Conflict(format!(
                    "two clusters of this configuration are on the network: {}; joining neither",
                    list.join(" and ")
                )));
            }
            None => *instances.keys().next()?,
        };
        let target = v
            .peers
            .iter()
            .find(|(_, p)| p.ready_server() && p.cluster.as_ref() == Some(ours))
            .map(|(id, _)| id.clone());
        Some(match target {
            Some(t) => Decision::Join(t),
            None => {
                let busy: Vec<String> = v
                    .peers
                    .iter()
                    .filter(|(_, p)| p.cluster.as_ref() == Some(ours))
                    .map(|(id, p)| format!("{id} {}", p.phase))
                    .collect();
                Decision::Wait(format!(
                    "cluster {ours} exists ({}); waiting for one of its servers to be ready",
                    if busy.is_empty() {
                        "none of its members is reachable".to_string()
                    } else {
                        busy.join(", ")
                    }
                ))
            }
        })
    }

    fn vote_step(&mut self, now: Instant, v: &View<'_>) -> Decision {
        let me = &self.rules.me;
        let mut set: BTreeSet<NodeId> = v.peers.keys().cloned().collect();
        set.insert(me.clone());
        let lowest = set.iter().next().expect("holds me").clone();
        match &v.durable.vote {
            Some(c) if c == me && &lowest != me => return Decision::Withdraw,
            Some(c) if c != me => {
                self.stable = None;
                return Decision::Wait(format!(
                    "promised my bootstrap vote to {c}; waiting for it to bootstrap or withdraw"
                ));
            }
            _ => {}
        }
        let have = set.len();
        let (needed, settle) = if have >= self.rules.expected {
            (self.rules.expected, self.rules.settle)
        } else {
            (self.rules.quorum, self.rules.partial_wait)
        };
        if have < needed {
            self.stable = None;
            return Decision::Wait(format!(
                "{have}/{} nodes authenticated ({} seen), need quorum {}; waiting",
                self.rules.expected,
                v.seen + 1,
                self.rules.quorum
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
        if elapsed < settle {
            let what = if have >= self.rules.expected {
                "all expected nodes here".to_string()
            } else {
                format!("quorum of {}, waiting for the rest", self.rules.expected)
            };
            return Decision::Wait(format!(
                "{have}/{} nodes authenticated ({what}), settling {}",
                self.rules.expected,
                fmt_secs(settle - elapsed)
            ));
        }
        if &lowest == me {
            Decision::RequestVotes(set.into_iter().filter(|n| n != me).collect())
        } else {
            Decision::Wait(format!(
                "{have} nodes authenticated; waiting for {lowest} (lowest id) to bootstrap"
            ))
        }
    }
}

/// Decide a vote request from `candidate`. `lowest_known`: the lowest id among our
/// authenticated set (ourselves included). On `Ok` the caller writes the vote to disk
/// before it answers.
pub fn consider_vote(
    durable: &Durable,
    candidate: &NodeId,
    lowest_known: &NodeId,
) -> Result<(), String> {
    if let Some(i) = &durable.cluster {
        return Err(format!("cluster {i} already exists"));
    }
    if let Some(c) = &durable.vote {
        if c != candidate {
            return Err(format!("already promised to {c}"));
        }
    }
    if lowest_known < candidate {
        return Err(format!("{lowest_known} has a lower id"));
    }
    Ok(())
}

/// The bootstrap plan of `leader` from the members that voted for it (itself included):
/// the `servers` lowest ids are servers, the rest agents.
pub fn plan(
    instance: InstanceId,
    leader: NodeId,
    mut voters: Vec<MemberInfo>,
    servers: usize,
) -> Bootstrap {
    voters.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    voters.dedup_by(|a, b| a.node_id == b.node_id);
    for (i, m) in voters.iter_mut().enumerate() {
        m.role = role_for_joiner(i, servers.max(1));
    }
    Bootstrap {
        instance,
        leader,
        members: voters,
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
mod tests;
