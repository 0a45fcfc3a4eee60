//! The formation runtime: shared state, the session server ([`server`]), the peer poller
//! ([`poller`]) and the formation loop ([`formation`]).

mod formation;
mod poller;
mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clutch_config::Hostname;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::FormationConfig;
use crate::discovery::{Discovery, PeerTable};
use crate::election::Admissions;
use crate::engine::{Engine, LocalNode};
use crate::handshake::Credentials;
use crate::id::{ClusterKey, Identity, NodeId, NodeKey, Phase, Role};
use crate::limits::RateLimiter;
use crate::session::Channel;
use crate::state::{Durable, Membership, StateError, Store};
use crate::status::{Status, StatusSink};
use crate::wire::{self, MemberList, PeerStatus, WireError};

pub(crate) use formation::{elect_and_join, resume};
pub(crate) use poller::poller;
pub(crate) use server::serve;

pub(crate) struct AuthedPeer {
    pub status: PeerStatus,
    pub addr: SocketAddr,
    pub last_ok: Instant,
}

pub(crate) struct State {
    pub phase: Phase,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub durable: Durable,
    pub members: MemberList,
    pub admissions: Admissions,
    pub authed: BTreeMap<NodeId, AuthedPeer>,
    /// Node id → the key it authenticated with first (or the key the member list has):
    /// a token holder cannot take over another node's id.
    pub pinned: BTreeMap<NodeId, NodeKey>,
    pub limiter: RateLimiter,
    pub waiting: String,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    pub last_sent: Option<Status>,
}

pub(crate) struct Shared {
    pub cfg: FormationConfig,
    pub identity: Identity,
    pub cluster_key: ClusterKey,
    pub quorum: usize,
    pub servers: usize,
    pub local: LocalNode,
    pub engine: Arc<dyn Engine>,
    pub sink: Arc<dyn StatusSink>,
    pub store: Store,
    pub st: Mutex<State>,
    pub peers: PeerTable,
    pub discovery: Mutex<Option<Discovery>>,
}

/// Pin `key` for `id`; false when `id` is pinned to another key.
pub(crate) fn pin(st: &mut State, id: &NodeId, key: &NodeKey) -> bool {
    match st.pinned.get(id) {
        Some(k) => k == key,
        None => {
            st.pinned.insert(id.clone(), *key);
            true
        }
    }
}

impl Shared {
    pub fn me(&self) -> &NodeId {
        &self.cfg.node_id
    }
    pub fn hostname(&self) -> &Hostname {
        &self.cfg.hostname
    }

    pub fn creds(&self) -> Credentials<'_> {
        Credentials {
            token: self.cfg.token.expose().as_bytes(),
            cluster: &self.cluster_key,
            me: &self.cfg.node_id,
            identity: &self.identity,
        }
    }

    pub fn peer_status(&self) -> PeerStatus {
        let st = self.st.lock().unwrap();
        PeerStatus {
            node_id: self.cfg.node_id.clone(),
            hostname: self.cfg.hostname.clone(),
            phase: st.phase,
            role: st.role,
            cluster: st.durable.cluster.clone(),
            leader: st.leader.clone(),
            members: st.members.clone(),
            bootstrap: st.durable.bootstrap.clone(),
            vote: st.durable.vote.clone(),
        }
    }

    /// Change the durable election state: written to disk first, then taken into memory.
    pub fn update_durable(&self, f: impl FnOnce(&mut Durable)) -> Result<(), StateError> {
        let mut st = self.st.lock().unwrap();
        let mut d = st.durable.clone();
        f(&mut d);
        if d != st.durable {
            self.store.save_durable(&d)?;
            st.durable = d;
        }
        Ok(())
    }

    /// Promise our bootstrap vote to `candidate` if the rules allow it; the check and the
    /// write happen under one lock, so two candidates asking at once cannot both get it.
    pub fn grant_vote(&self, candidate: &NodeId) -> Result<(), String> {
        let mut st = self.st.lock().unwrap();
        let lowest = st
            .authed
            .keys()
            .chain(std::iter::once(self.me()))
            .min()
            .expect("non-empty")
            .clone();
        crate::election::consider_vote(&st.durable, candidate, &lowest)?;
        if st.durable.vote.as_ref() != Some(candidate) {
            let mut d = st.durable.clone();
            d.vote = Some(candidate.clone());
            self.store
                .save_durable(&d)
                .map_err(|e| format!("cannot keep the vote on disk: {e}"))?;
            st.durable = d;
        }
        Ok(())
    }

    fn seen(&self) -> usize {
        let mut ids: Vec<NodeId> = self
            .peers
            .lock()
            .unwrap()
            .values()
            .filter(|d| &d.node_id != self.me())
            .map(|d| d.node_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        let authed = self.st.lock().unwrap().authed.len();
        ids.len().max(authed)
    }

    /// Push a status update if anything changed; also refresh the mDNS TXT on phase change.
    pub fn report(&self) {
        let seen = self.seen();
        let (s, phase_changed) = {
            let mut st = self.st.lock().unwrap();
            let s = Status {
                phase: st.phase,
                node_id: self.cfg.node_id.clone(),
                hostname: self.cfg.hostname.clone(),
                role: st.role,
                cluster: st.durable.cluster.clone(),
                vote: st.durable.vote.clone(),
                leader: st.leader.clone(),
                members: st.members.members.clone(),
                peers_seen: seen,
                peers_authenticated: st.authed.len(),
                waiting: st.waiting.clone(),
                warnings: st.warnings.clone(),
                error: st.error.clone(),
            };
            if st.last_sent.as_ref() == Some(&s) {
                return;
            }
            let changed = st
                .last_sent
                .as_ref()
                .is_none_or(|o| o.phase != s.phase || o.role != s.role);
            st.last_sent = Some(s.clone());
            (s, changed)
        };
        if phase_changed {
            if let Some(d) = self.discovery.lock().unwrap().as_ref() {
                if let Err(e) = d.advertise(s.phase, s.role) {
                    tracing::warn!("mdns re-advertise: {e}");
                }
            }
        }
        self.sink.update(&s);
    }

    pub fn set_waiting(&self, why: String) {
        self.st.lock().unwrap().waiting = why;
        self.report();
    }

    /// Save the membership (when ready).
    pub fn persist(&self) {
        let m = {
            let st = self.st.lock().unwrap();
            let Some(instance) = st.durable.cluster.clone() else {
                return;
            };
            Membership {
                node_id: self.cfg.node_id.clone(),
                cluster_key: self.cluster_key.clone(),
                instance,
                role: st.role,
                leader: st.leader.clone(),
                members: st.members.clone(),
            }
        };
        if let Err(e) = self.store.save_membership(&m) {
            tracing::error!("saving cluster state: {e}");
        }
    }

    /// Open an authenticated, encrypted session to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Channel<TcpStream>, WireError> {
        let stream =
            tokio::time::timeout(std::time::Duration::from_secs(2), TcpStream::connect(addr))
                .await
                .map_err(|_| WireError::Timeout)??;
        let ch = wire::client_handshake(stream, self.creds(), addr).await?;
        if !pin(&mut self.st.lock().unwrap(), ch.peer(), ch.peer_key()) {
            tracing::warn!(%addr, peer = %ch.peer(), "peer presented another key than before for its node id");
            return Err(WireError::Unexpected);
        }
        Ok(ch)
    }
}

/// Background tasks that keep serving after formation (admissions, status for peers).
pub struct Running {
    pub(crate) tasks: Vec<JoinHandle<()>>,
    pub(crate) shared: Arc<Shared>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.discovery.lock().unwrap().take();
    }
}
