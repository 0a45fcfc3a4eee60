//! The session server: accepts connections (bounded per source and in total, see
//! [`crate::limits`]), runs the handshake, then answers requests: status, votes, releases,
//! enrollments of plan members and admissions of later nodes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use super::{Shared, pin};
use crate::election::role_for_joiner;
use crate::engine::{Admission, Joiner};
use crate::id::{InstanceId, NodeId, NodeKey, Phase, Role};
use crate::limits::{Admit, HandshakeSlots, SlotId};
use crate::wire::{self, MemberInfo, MemberList, Request, Response, WireError};

/// Connections still in their handshake, per source IP...
const HANDSHAKES_PER_IP: usize = 4;
/// ...and in total (a newcomer evicts from the heaviest source when full).
const HANDSHAKES_TOTAL: usize = 128;
/// A connection that has not authenticated within this long is closed (slow-loris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// An authenticated session idle for this long is closed.
const SESSION_IDLE: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Handshakes {
    slots: Option<HandshakeSlots>,
    running: HashMap<SlotId, AbortHandle>,
}

/// Gives its slot back when the handshake task ends, however it ends.
struct SlotGuard {
    hs: Arc<Mutex<Handshakes>>,
    slot: SlotId,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut h = self.hs.lock().unwrap();
        if let Some(s) = h.slots.as_mut() {
            s.release(self.slot);
        }
        h.running.remove(&self.slot);
    }
}

pub(crate) async fn serve(listener: TcpListener, sh: Arc<Shared>) {
    let hs = Arc::new(Mutex::new(Handshakes {
        slots: Some(HandshakeSlots::new(HANDSHAKES_PER_IP, HANDSHAKES_TOTAL)),
        running: HashMap::new(),
    }));
    // Every connection's task lives in this set: when the server stops (its task is
    // aborted), they all end with it.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ip = peer.ip();
        if sh.st.lock().unwrap().limiter.blocked(ip, Instant::now()) {
            tracing::debug!(%ip, "connection from rate-limited source dropped");
            continue;
        }
        let mut h = hs.lock().unwrap();
        let admit = h.slots.as_mut().map_or(Admit::Refuse, |s| s.admit(ip));
        let slot = match admit {
            Admit::Take(slot) => slot,
            Admit::Evict { slot, evict } => {
                if let Some(a) = h.running.remove(&evict) {
                    a.abort();
                }
                tracing::debug!(%ip, "handshake slots full; evicted the oldest of the heaviest source");
                slot
            }
            Admit::Refuse => {
                tracing::debug!(%ip, "too many handshakes in progress; connection dropped");
                continue;
            }
        };
        let guard = SlotGuard {
            hs: hs.clone(),
            slot,
        };
        let sh = sh.clone();
        let task = conns.spawn(async move { handle_conn(stream, ip, sh, guard).await });
        h.running.insert(slot, task);
    }
}

async fn handle_conn(stream: TcpStream, ip: IpAddr, sh: Arc<Shared>, guard: SlotGuard) {
    let local = match stream.local_addr() {
        Ok(l) => l,
        Err(_) => return,
    };
    let outcome = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        wire::server_handshake(stream, sh.creds(), local),
    )
    .await
    .unwrap_or(Err(WireError::Timeout));
    drop(guard);
    let mut ch = match outcome {
        Ok(ch) => ch,
        Err(e) => {
            let blocked = sh.st.lock().unwrap().limiter.failure(ip, Instant::now());
            tracing::warn!(%ip, "authentication failed: {e}");
            if blocked {
                tracing::warn!(%ip, "too many failed authentications; blocking source for a while");
            }
            return;
        }
    };
    let (peer, key) = (ch.peer().clone(), *ch.peer_key());
    {
        let mut st = sh.st.lock().unwrap();
        st.limiter.success(ip);
        if !pin(&mut st, &peer, &key) {
            tracing::warn!(%ip, %peer, "refusing a session: this node id authenticated with another key before");
            return;
        }
    }
    loop {
        let req: Request = match ch.recv(SESSION_IDLE).await {
            Ok(r) => r,
            Err(WireError::Io(_)) | Err(WireError::Timeout) => return,
            Err(e) => {
                tracing::warn!(%ip, %peer, "bad message in session: {e}");
                return;
            }
        };
        let resp = handle_request(&sh, &peer, &key, ip, req).await;
        if ch.send(&resp).await.is_err() {
            return;
        }
    }
}

async fn handle_request(
    sh: &Arc<Shared>,
    peer: &NodeId,
    key: &NodeKey,
    src: IpAddr,
    req: Request,
) -> Response {
    match req {
        Request::Status => Response::Status(Box::new(sh.peer_status())),
        Request::Vote => vote(sh, peer),
        Request::Release => {
            let r = sh.update_durable(|d| {
                if d.vote.as_ref() == Some(peer) && d.bootstrap.is_none() {
                    tracing::info!(%peer, "candidate withdrew; its vote is free again");
                    d.vote = None;
                }
            });
            match r {
                Ok(()) => Response::Ack,
                Err(e) => Response::Error { why: e.to_string() },
            }
        }
        Request::Enroll { csr } => enroll(sh, peer, key, src, csr).await,
        Request::Join {
            hostname,
            addr,
            csr,
        } => {
            if addr != src {
                return Response::Error {
                    why: format!("join address {addr} is not this connection's source {src}"),
                };
            }
            let j = Joiner {
                node_id: peer.clone(),
                hostname,
                addr,
                csr,
            };
            admit_runtime(sh, j, *key).await
        }
        Request::JoinDone { ok, error } => {
            sh.st.lock().unwrap().admissions.finish(peer);
            if ok {
                tracing::info!(%peer, "join finished");
            } else {
                tracing::warn!(%peer, "join failed on the joiner: {}", error.unwrap_or_default());
            }
            sh.report();
            Response::Ack
        }
    }
}

fn vote(sh: &Shared, candidate: &NodeId) -> Response {
    match sh.grant_vote(candidate) {
        Ok(()) => {
            tracing::info!(%candidate, "granted bootstrap vote (kept on disk)");
            sh.report();
            Response::Vote {
                granted: true,
                reason: String::new(),
            }
        }
        Err(reason) => Response::Vote {
            granted: false,
            reason,
        },
    }
}

/// A member of our bootstrap plan asks for what it needs to start.
async fn enroll(
    sh: &Arc<Shared>,
    peer: &NodeId,
    key: &NodeKey,
    src: IpAddr,
    csr: Option<String>,
) -> Response {
    let (plan, phase, role) = {
        let st = sh.st.lock().unwrap();
        (st.durable.bootstrap.clone(), st.phase, st.role)
    };
    let Some(plan) = plan else {
        return Response::Busy {
            why: format!("{} has no bootstrap plan", sh.me()),
        };
    };
    let Some(m) = plan.member(peer).cloned() else {
        return Response::Error {
            why: format!("{peer} is not in the bootstrap plan of {}", plan.leader),
        };
    };
    if &m.key != key || m.addr != src {
        return Response::Error {
            why: format!("{peer} is in the plan with another key or address"),
        };
    }
    let leader_here = &plan.leader == sh.me() && phase != Phase::Discovering;
    if !(leader_here || (phase == Phase::Ready && role == Role::Server)) {
        return Response::Busy {
            why: format!("{} cannot enroll plan members yet ({phase})", sh.me()),
        };
    }
    let joiner = Joiner {
        node_id: peer.clone(),
        hostname: m.hostname.clone(),
        addr: m.addr,
        csr,
    };
    let (engine, local, role) = (sh.engine.clone(), sh.local.clone(), m.role);
    let plan2 = plan.clone();
    let res = tokio::task::spawn_blocking(move || {
        engine.admit(&local, &joiner, role, Admission::FromPlan(&plan2))
    })
    .await;
    match res {
        Ok(Ok(info)) => {
            tracing::info!(%peer, %role, "enrolled a member of the bootstrap plan");
            let members = sh.st.lock().unwrap().members.clone();
            Response::Admitted {
                role,
                info: Box::new(info),
                leader: plan.leader.clone(),
                members,
            }
        }
        Ok(Err(e)) => Response::Busy {
            why: format!("enrollment on {} failed: {e}", sh.me()),
        },
        Err(e) => Response::Busy { why: e.to_string() },
    }
}

/// Refuses to replace a member that is alive: a node cannot evict another by claiming its
/// host name. A member counts as alive while it answers this node's polls.
fn replaced_members(sh: &Shared, joiner: &Joiner) -> Result<Vec<MemberInfo>, String> {
    let st = sh.st.lock().unwrap();
    let same = st.members.same_hostname(&joiner.hostname, &joiner.node_id);
    for m in &same {
        let alive = &m.node_id == sh.me()
            || st
                .authed
                .get(&m.node_id)
                .is_some_and(|p| p.last_ok.elapsed() < sh.cfg.peer_timeout);
        if alive {
            return Err(format!(
                "host name {} belongs to member {}, which is alive",
                joiner.hostname, m.node_id
            ));
        }
    }
    Ok(same)
}

/// What admitting a joiner into the running cluster takes, decided under the state lock:
/// its role, the members it replaces and the cluster instance. `Err`: the answer already.
fn plan_admission(
    sh: &Shared,
    joiner: &Joiner,
) -> Result<(Role, Vec<MemberInfo>, InstanceId), Response> {
    let peer = &joiner.node_id;
    let instance = {
        let mut st = sh.st.lock().unwrap();
        if st.phase != Phase::Ready || st.role != Role::Server {
            return Err(Response::Busy {
                why: format!("{} is not a ready server", sh.me()),
            });
        }
        let Some(instance) = st.durable.cluster.clone() else {
            return Err(Response::Busy {
                why: format!("{} is in no cluster", sh.me()),
            });
        };
        if let Err(p) = st.admissions.begin(peer, Instant::now()) {
            return Err(Response::Busy {
                why: format!("{} is admitting {p}; one join at a time", sh.me()),
            });
        }
        instance
    };
    let replaces = replaced_members(sh, joiner).map_err(|why| {
        sh.st.lock().unwrap().admissions.finish(peer);
        tracing::warn!(%peer, "refused: {why}");
        Response::Error { why }
    })?;
    let st = sh.st.lock().unwrap();
    let existing = st.members.get(peer).map(|m| m.role);
    // Servers that stay: a replaced member's seat is free for its replacement.
    let staying = st
        .members
        .members
        .iter()
        .filter(|m| m.role == Role::Server && !replaces.iter().any(|r| r.node_id == m.node_id))
        .count();
    let role = match existing {
        Some(r) if r != Role::None => r,
        _ => role_for_joiner(staying, sh.servers),
    };
    Ok((role, replaces, instance))
}

/// The joiner is in: the member list without the members it replaced, with it.
fn record_admission(
    sh: &Shared,
    joiner: &Joiner,
    key: NodeKey,
    role: Role,
    replaces: &[MemberInfo],
) -> (NodeId, MemberList) {
    let mut st = sh.st.lock().unwrap();
    let gone: Vec<NodeId> = replaces.iter().map(|m| m.node_id.clone()).collect();
    st.members.remove(&gone);
    st.members.upsert(MemberInfo {
        node_id: joiner.node_id.clone(),
        hostname: joiner.hostname.clone(),
        role,
        addr: joiner.addr,
        key,
    });
    for g in &gone {
        st.pinned.remove(g);
    }
    let leader = st.leader.clone().unwrap_or_else(|| sh.me().clone());
    (leader, st.members.clone())
}

async fn admit_runtime(sh: &Arc<Shared>, joiner: Joiner, key: NodeKey) -> Response {
    let peer = joiner.node_id.clone();
    let (role, replaces, instance) = match plan_admission(sh, &joiner) {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    if !replaces.is_empty() {
        tracing::info!(%peer, hostname = %joiner.hostname, "replacing member(s) {:?}", replaces.iter().map(|m| m.node_id.to_string()).collect::<Vec<_>>());
    }
    tracing::info!(%peer, hostname = %joiner.hostname, addr = %joiner.addr, %role, "admitting");
    let (engine, local) = (sh.engine.clone(), sh.local.clone());
    let (j2, r2, i2) = (joiner.clone(), replaces.clone(), instance.clone());
    let res = tokio::task::spawn_blocking(move || {
        engine.admit(
            &local,
            &j2,
            role,
            Admission::Runtime {
                replaces: &r2,
                instance: &i2,
            },
        )
    })
    .await;
    let res = match res {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match res {
        Ok(info) => {
            let (leader, members) = record_admission(sh, &joiner, key, role, &replaces);
            sh.persist();
            sh.report();
            Response::Admitted {
                role,
                info: Box::new(info),
                leader,
                members,
            }
        }
        Err(e) => {
            sh.st.lock().unwrap().admissions.finish(&peer);
            tracing::warn!(%peer, "admission failed: {e}");
            Response::Busy {
                why: format!("admission failed on {}: {e}", sh.me()),
            }
        }
    }
}
