//! The formation loop: asks [`crate::election`] what to do, and does it — gather votes,
//! withdraw, found the cluster from our plan, enroll in a plan, or join a running cluster —
//! until this node is ready; and resuming after a reboot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use super::poller::authed_ids;
use crate::Error;
use crate::election::{self, Backoff, Decision, Election, PeerView, Rules, View};
use crate::engine::{Admission, JoinInfo, Joiner};
use crate::id::{InstanceId, NodeId, Phase, Role};
use crate::state::Membership;
use crate::wire::{Bootstrap, MemberInfo, MemberList, QUICK_TIMEOUT, Request, Response};

fn views(sh: &Shared) -> BTreeMap<NodeId, PeerView> {
    sh.st
        .lock()
        .unwrap()
        .authed
        .iter()
        .map(|(id, p)| {
            (
                id.clone(),
                PeerView {
                    phase: p.status.phase,
                    role: p.status.role,
                    cluster: p.status.cluster.clone(),
                    bootstrap: p.status.bootstrap.clone(),
                },
            )
        })
        .collect()
}

fn fail(sh: &Shared, why: String) -> Result<(), Error> {
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = Phase::Failed;
        st.error = Some(why.clone());
        st.waiting = why.clone();
    }
    sh.report();
    Err(Error::Engine(why))
}

fn set_phase(sh: &Shared, phase: Phase, role: Role, leader: Option<NodeId>, waiting: String) {
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = phase;
        st.role = role;
        if leader.is_some() {
            st.leader = leader;
        }
        st.waiting = waiting;
    }
    sh.report();
}

fn become_ready(sh: &Shared, members: MemberList) {
    {
        let mut st = sh.st.lock().unwrap();
        for m in &members.members {
            st.pinned.entry(m.node_id.clone()).or_insert(m.key);
        }
        if members.epoch >= st.members.epoch {
            st.members = members;
        }
        st.phase = Phase::Ready;
        st.waiting = String::new();
        st.error = None;
    }
    sh.persist();
    sh.report();
}

/// Our own entry for a member list or plan.
fn me_as_member(sh: &Shared, role: Role) -> MemberInfo {
    MemberInfo {
        node_id: sh.me().clone(),
        hostname: sh.hostname().clone(),
        role,
        addr: sh.local.addr,
        key: sh.identity.public(),
    }
}

/// Ask the set for votes (after keeping our own on disk); the voters' entries when a
/// quorum (ourselves included) granted.
async fn gather_votes(sh: &Arc<Shared>, set: &[NodeId]) -> Result<Vec<MemberInfo>, String> {
    // Our own vote first, by the same rule as anyone's (it may have gone to another
    // candidate since the election step looked).
    sh.grant_vote(sh.me())?;
    let targets: Vec<(NodeId, SocketAddr)> = {
        let st = sh.st.lock().unwrap();
        set.iter()
            .filter_map(|id| st.authed.get(id).map(|p| (id.clone(), p.addr)))
            .collect()
    };
    let tasks: Vec<_> = targets
        .into_iter()
        .map(|(id, addr)| {
            let sh = sh.clone();
            tokio::spawn(async move {
                let r = async {
                    let mut c = sh.connect(addr).await?;
                    if c.peer() != &id {
                        return Err(crate::wire::WireError::Unexpected);
                    }
                    let key = *c.peer_key();
                    let status = match c.request_within(&Request::Status, QUICK_TIMEOUT).await? {
                        Response::Status(s) => *s,
                        _ => return Err(crate::wire::WireError::Unexpected),
                    };
                    Ok((
                        c.request_within(&Request::Vote, QUICK_TIMEOUT).await?,
                        status,
                        key,
                    ))
                }
                .await;
                (id, addr, r)
            })
        })
        .collect();
    let mut voters = vec![me_as_member(sh, Role::None)];
    let mut granted_by: Vec<(NodeId, SocketAddr)> = Vec::new();
    let mut denied = Vec::new();
    for t in tasks {
        match t.await {
            Ok((id, addr, Ok((Response::Vote { granted: true, .. }, status, key)))) => {
                voters.push(MemberInfo {
                    node_id: id.clone(),
                    hostname: status.hostname,
                    role: Role::None,
                    addr: addr.ip(),
                    key,
                });
                granted_by.push((id, addr));
            }
            Ok((id, _, Ok((Response::Vote { reason, .. }, _, _)))) => {
                denied.push(format!("{id}: {reason}"))
            }
            Ok((id, _, Ok(_))) => denied.push(format!("{id}: unexpected reply")),
            Ok((id, _, Err(e))) => denied.push(format!("{id}: {e}")),
            Err(e) => denied.push(e.to_string()),
        }
    }
    if voters.len() >= sh.quorum {
        return Ok(voters);
    }
    // Not enough: give every vote back, ours too, so another round (or candidate) can win.
    release(sh, &granted_by).await;
    Err(format!(
        "{}/{} votes ({})",
        voters.len(),
        sh.quorum,
        denied.join("; ")
    ))
}

/// Tell these peers our candidacy is over, and free our own vote.
async fn release(sh: &Arc<Shared>, to: &[(NodeId, SocketAddr)]) {
    for (id, addr) in to {
        let r = async {
            let mut c = sh.connect(*addr).await?;
            c.request_within(&Request::Release, QUICK_TIMEOUT).await
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(%id, "could not release its vote: {e}");
        }
    }
    let me = sh.me().clone();
    let _ = sh.update_durable(|d| {
        if d.vote.as_ref() == Some(&me) && d.bootstrap.is_none() {
            d.vote = None;
        }
    });
}

/// We won: write the plan to disk (that is the moment the cluster exists), then found it.
fn publish_plan(sh: &Shared, voters: Vec<MemberInfo>) -> Result<Bootstrap, Error> {
    let plan = election::plan(InstanceId::generate(), sh.me().clone(), voters, sh.servers);
    tracing::info!(instance = %plan.instance, members = plan.members.len(), "won the election: publishing the bootstrap plan");
    sh.update_durable(|d| {
        d.cluster = Some(plan.instance.clone());
        d.bootstrap = Some(plan.clone());
    })?;
    Ok(plan)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::engine::EngineError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The leader starts the cluster from its plan: what the cluster shares first, then itself
/// as a member of the plan.
async fn found(sh: &Arc<Shared>, plan: Bootstrap) -> Result<(), Error> {
    let mine = plan
        .member(sh.me())
        .cloned()
        .expect("the leader is in its plan");
    sh.st.lock().unwrap().members = MemberList {
        epoch: 1,
        members: plan.members.clone(),
    };
    set_phase(
        sh,
        Phase::Bootstrapping,
        mine.role,
        Some(sh.me().clone()),
        format!(
            "bootstrapping {} cluster {} with {} members",
            sh.engine.name(),
            plan.instance,
            plan.members.len()
        ),
    );
    let (engine, local, p) = (sh.engine.clone(), sh.local.clone(), plan.clone());
    let role = mine.role;
    let res = blocking(move || {
        engine.found(&local, &p)?;
        let joiner = Joiner {
            node_id: local.node_id.clone(),
            hostname: local.hostname.clone(),
            addr: local.addr,
            csr: engine.request(&local)?,
        };
        let info = engine.admit(&local, &joiner, role, Admission::FromPlan(&p))?;
        engine.join(&local, role, &info)
    })
    .await;
    match res {
        Ok(()) => {
            let members = sh.st.lock().unwrap().members.clone();
            become_ready(sh, members);
            Ok(())
        }
        Err(e) => fail(sh, format!("bootstrap failed: {e}")),
    }
}

enum Attempt {
    Done,
    Retry(String),
}

/// Start with what an admitting server sent.
async fn start_with(
    sh: &Arc<Shared>,
    role: Role,
    info: JoinInfo,
    leader: NodeId,
    members: MemberList,
    phase: Phase,
) -> Result<(), String> {
    set_phase(
        sh,
        phase,
        role,
        Some(leader),
        format!("starting {} as {role}", sh.engine.name()),
    );
    sh.st.lock().unwrap().members = members.clone();
    let (engine, local) = (sh.engine.clone(), sh.local.clone());
    blocking(move || engine.join(&local, role, &info)).await?;
    become_ready(sh, members);
    Ok(())
}

/// A member of a plan asks `from` for what it needs, then starts.
async fn enroll(sh: &Arc<Shared>, from: &NodeId, plan: &Bootstrap) -> Attempt {
    let Some(addr) = sh.st.lock().unwrap().authed.get(from).map(|p| p.addr) else {
        return Attempt::Retry(format!("{from} is gone"));
    };
    let (engine, local) = (sh.engine.clone(), sh.local.clone());
    let csr = match blocking(move || engine.request(&local)).await {
        Ok(c) => c,
        Err(e) => return Attempt::Retry(format!("making a certificate request: {e}")),
    };
    let mine = plan.member(sh.me()).map(|m| m.role).unwrap_or(Role::None);
    {
        // The plan's members, until the admitting server sends its list.
        let mut st = sh.st.lock().unwrap();
        if st.members.members.is_empty() {
            st.members = MemberList {
                epoch: 0,
                members: plan.members.clone(),
            };
        }
    }
    set_phase(
        sh,
        Phase::Bootstrapping,
        mine,
        Some(plan.leader.clone()),
        format!(
            "listed in the plan of {}; enrolling with {from}",
            plan.leader
        ),
    );
    let resp = async {
        let mut c = sh.connect(addr).await?;
        c.request(&Request::Enroll { csr }).await
    }
    .await;
    match resp {
        Ok(Response::Admitted {
            role,
            info,
            leader,
            members,
        }) => match start_with(sh, role, *info, leader, members, Phase::Bootstrapping).await {
            Ok(()) => Attempt::Done,
            Err(e) => Attempt::Retry(format!("starting from the plan: {e}")),
        },
        Ok(Response::Busy { why }) | Ok(Response::Error { why }) => Attempt::Retry(why),
        Ok(_) => Attempt::Retry("unexpected reply to enroll".into()),
        Err(e) => Attempt::Retry(format!("enrolling with {from}: {e}")),
    }
}

/// Ask a ready server to admit us to the running cluster.
async fn try_join(sh: &Arc<Shared>, target: &NodeId) -> Attempt {
    let Some(addr) = sh.st.lock().unwrap().authed.get(target).map(|p| p.addr) else {
        return Attempt::Retry(format!("{target} is gone"));
    };
    let (engine, local) = (sh.engine.clone(), sh.local.clone());
    let csr = match blocking(move || engine.request(&local)).await {
        Ok(c) => c,
        Err(e) => return Attempt::Retry(format!("making a certificate request: {e}")),
    };
    let mut c = match sh.connect(addr).await {
        Ok(c) if c.peer() == target => c,
        Ok(_) => return Attempt::Retry(format!("{addr} is no longer {target}")),
        Err(e) => return Attempt::Retry(format!("connecting to {target}: {e}")),
    };
    sh.set_waiting(format!("asking {target} to admit us"));
    let resp = c
        .request(&Request::Join {
            hostname: sh.hostname().clone(),
            addr: sh.local.addr,
            csr,
        })
        .await;
    let (role, info, leader, members) = match resp {
        Ok(Response::Admitted {
            role,
            info,
            leader,
            members,
        }) => (role, *info, leader, members),
        Ok(Response::Busy { why }) | Ok(Response::Error { why }) => return Attempt::Retry(why),
        Ok(_) => return Attempt::Retry("unexpected reply to join".into()),
        Err(e) => return Attempt::Retry(format!("join request to {target}: {e}")),
    };
    tracing::info!(%target, %role, "admitted; joining");
    let res = start_with(sh, role, info, leader, members, Phase::Joining).await;
    let done = Request::JoinDone {
        ok: res.is_ok(),
        error: res.as_ref().err().cloned(),
    };
    if c.request(&done).await.is_err() {
        // The admitting side times the pending join out; try a fresh connection once.
        if let Ok(mut c2) = sh.connect(addr).await {
            let _ = c2.request(&done).await;
        }
    }
    match res {
        Ok(()) => Attempt::Done,
        Err(e) => {
            set_phase(sh, Phase::Discovering, Role::None, None, e.clone());
            Attempt::Retry(format!("join failed: {e}"))
        }
    }
}

/// Resume after a reboot as what we were.
pub(crate) async fn resume(sh: &Arc<Shared>, m: Membership) -> Result<(), Error> {
    {
        let mut st = sh.st.lock().unwrap();
        for x in &m.members.members {
            st.pinned.entry(x.node_id.clone()).or_insert(x.key);
        }
        st.members = m.members.clone();
    }
    set_phase(
        sh,
        Phase::Joining,
        m.role,
        m.leader.clone(),
        format!("restarting as {} after reboot", m.role),
    );
    let (engine, local, role) = (sh.engine.clone(), sh.local.clone(), m.role);
    if let Err(e) = blocking(move || engine.resume(&local, role)).await {
        return fail(sh, format!("resume failed: {e}"));
    }
    loop {
        let (engine, local) = (sh.engine.clone(), sh.local.clone());
        match blocking(move || engine.health(&local)).await {
            Ok(()) => break,
            Err(e) => sh.set_waiting(format!(
                "waiting for {} to become healthy: {e}",
                sh.engine.name()
            )),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    become_ready(sh, m.members);
    Ok(())
}

fn rules(sh: &Shared) -> Rules {
    Rules {
        me: sh.me().clone(),
        expected: sh.cfg.expected_size as usize,
        quorum: sh.quorum,
        settle: sh.cfg.settle,
        partial_wait: sh.cfg.partial_wait,
    }
}

/// Run the election and whatever it decides until this node is ready.
pub(crate) async fn elect_and_join(sh: &Arc<Shared>) -> Result<(), Error> {
    let mut election = Election::new(rules(sh));
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let mut next_try = Instant::now();
    let engine = sh.engine.clone();
    let plan_start = move |r: Role| engine.plan_start(r);
    loop {
        let decision = {
            let peers = views(sh);
            let durable = sh.st.lock().unwrap().durable.clone();
            election.step(
                Instant::now(),
                &View {
                    durable: &durable,
                    peers: &peers,
                    seen: sh.seen(),
                    plan_start: &plan_start,
                },
            )
        };
        let due = Instant::now() >= next_try;
        let mut retry = |why: String, sh: &Shared| {
            let d = backoff.next_delay(rand::random());
            next_try = Instant::now() + d;
            tracing::info!("{why}; retrying in {d:?}");
            sh.set_waiting(format!("{why}; retrying in {:.1}s", d.as_secs_f64()));
        };
        match decision {
            Decision::Wait(why) => {
                sh.st.lock().unwrap().warnings.clear();
                sh.set_waiting(why)
            }
            Decision::Conflict(why) => {
                tracing::warn!("{why}");
                sh.st.lock().unwrap().warnings = vec![why.clone()];
                sh.set_waiting(why);
            }
            Decision::Found(plan) => return found(sh, plan).await,
            Decision::Withdraw => {
                tracing::info!("a lower id is here: withdrawing my candidacy");
                release(sh, &authed_ids(sh)).await;
            }
            Decision::RequestVotes(set) if due => {
                sh.set_waiting(format!(
                    "lowest id of {}: asking for bootstrap votes",
                    set.len() + 1
                ));
                match gather_votes(sh, &set).await {
                    Ok(voters) => {
                        publish_plan(sh, voters)?;
                    }
                    Err(why) => retry(format!("not bootstrapping yet: {why}"), sh),
                }
            }
            Decision::Enroll { from, plan } if due => match enroll(sh, &from, &plan).await {
                Attempt::Done => return Ok(()),
                Attempt::Retry(why) => retry(why, sh),
            },
            Decision::Join(target) if due => match try_join(sh, &target).await {
                Attempt::Done => return Ok(()),
                Attempt::Retry(why) => retry(why, sh),
            },
            _ => {}
        }
        tokio::time::sleep(sh.cfg.poll_interval / 4).await;
    }
}
