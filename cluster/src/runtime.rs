//! The formation runtime: auth server, peer poller, election loop, joins.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::auth::{self, HandshakeSlots, Hello, Proof, RateLimiter, Responder, Sealed};
use crate::discovery::{Discovery, PeerTable};
use crate::election::{Admissions, Backoff, Decision, Election, PeerView, Voter, role_for_joiner};
use crate::engine::{Engine, Joiner, LocalNode};
use crate::id::{NodeId, Phase, Role};
use crate::status::{self, Persisted, Status, StatusSink};
use crate::wire::{self, Client, MemberInfo, MemberList, PeerStatus, Request, Response, WireError};
use crate::{Error, FormationConfig};

pub(crate) struct AuthedPeer {
    pub status: PeerStatus,
    pub addr: SocketAddr,
    pub last_ok: Instant,
}

pub(crate) struct State {
    pub phase: Phase,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub cluster_exists: bool,
    pub members: MemberList,
    pub voter: Voter,
    pub admissions: Admissions,
    pub authed: BTreeMap<NodeId, AuthedPeer>,
    pub limiter: RateLimiter,
    pub waiting: String,
    pub error: Option<String>,
    pub last_sent: Option<Status>,
}

pub(crate) struct Shared {
    pub cfg: FormationConfig,
    pub token: String,
    pub quorum: usize,
    pub servers: usize,
    pub local: LocalNode,
    pub engine: Arc<dyn Engine>,
    pub sink: Arc<dyn StatusSink>,
    pub st: Mutex<State>,
    pub peers: PeerTable,
    pub discovery: Mutex<Option<Discovery>>,
}

impl Shared {
    fn me(&self) -> &NodeId {
        &self.cfg.node_id
    }

    pub fn peer_status(&self) -> PeerStatus {
        let st = self.st.lock().unwrap();
        PeerStatus {
            node_id: self.cfg.node_id.clone(),
            hostname: self.cfg.hostname.clone(),
            phase: st.phase,
            role: st.role,
            cluster_exists: st.cluster_exists,
            leader: st.leader.clone(),
            members: st.members.clone(),
        }
    }

    fn seen(&self) -> usize {
        let cid = &self.local.cluster_id;
        let mut ids: Vec<NodeId> = self
            .peers
            .lock()
            .unwrap()
            .values()
            .filter(|d| &d.cluster_id == cid && &d.node_id != self.me())
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
                leader: st.leader.clone(),
                members: st.members.members.clone(),
                peers_seen: seen,
                peers_authenticated: st.authed.len(),
                waiting: st.waiting.clone(),
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

    pub fn persist(&self) {
        let p = {
            let st = self.st.lock().unwrap();
            Persisted {
                node_id: self.cfg.node_id.clone(),
                cluster_id: self.local.cluster_id.clone(),
                role: st.role,
                leader: st.leader.clone(),
                members: st.members.clone(),
            }
        };
        if let Err(e) = status::save(&self.cfg.state_dir, &p) {
            tracing::error!("saving cluster state: {e}");
        }
    }
}

// ---------------------------------------------------------------- server side

/// Unauthenticated connections (handshakes in progress) allowed per source IP...
const HANDSHAKES_PER_IP: usize = 8;
/// ...and in total.
const HANDSHAKES_TOTAL: usize = 64;
/// A connection that has not authenticated within this long is closed (slow-loris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Holds a [`HandshakeSlots`] slot until the handshake ends (or its task is dropped).
struct Slot {
    slots: Arc<Mutex<HandshakeSlots>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().unwrap().release(self.ip);
    }
}

pub(crate) async fn serve(listener: TcpListener, sh: Arc<Shared>) {
    let slots = Arc::new(Mutex::new(HandshakeSlots::new(
        HANDSHAKES_PER_IP,
        HANDSHAKES_TOTAL,
    )));
    loop {
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
        if !slots.lock().unwrap().try_take(ip) {
            tracing::debug!(%ip, "too many handshakes in progress; connection dropped");
            continue;
        }
        let slot = Slot {
            slots: slots.clone(),
            ip,
        };
        let sh = sh.clone();
        tokio::spawn(async move { handle_conn(stream, ip, sh, slot).await });
    }
}

async fn handle_conn(mut stream: TcpStream, ip: IpAddr, sh: Arc<Shared>, slot: Slot) {
    let hs = async {
        let local = stream.local_addr()?;
        let hello: Hello = wire::recv_json(&mut stream).await?;
        let r = Responder::new(
            &sh.token,
            &sh.local.cluster_id,
            sh.cfg.node_id.clone(),
            auth::fresh_nonce(),
            local,
        );
        let (awaiting, mine) = r.on_hello(&hello)?;
        wire::send_json(&mut stream, &mine).await?;
        let proof: Proof = wire::recv_json(&mut stream).await?;
        let (session, my_proof) = awaiting.on_proof(&proof)?;
        wire::send_json(&mut stream, &my_proof).await?;
        Ok::<_, WireError>(session)
    };
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
        .await
        .unwrap_or(Err(WireError::Timeout));
    drop(slot);
    let mut session = match outcome {
        Ok(s) => {
            sh.st.lock().unwrap().limiter.success(ip);
            s
        }
        Err(e) => {
            let blocked = sh.st.lock().unwrap().limiter.failure(ip, Instant::now());
            tracing::warn!(%ip, "authentication failed: {e}");
            if blocked {
                tracing::warn!(%ip, "too many failed authentications; blocking source for a while");
            }
            return;
        }
    };
    let peer = session.peer().clone();
    loop {
        let frame = match wire::read_frame(&mut stream, Duration::from_secs(300)).await {
            Ok(f) => f,
            Err(_) => return,
        };
        let req: Request = match serde_json::from_slice::<Sealed>(&frame)
            .map_err(WireError::from)
            .and_then(|s| session.open(&s).map_err(WireError::from))
            .and_then(|b| serde_json::from_str(&b).map_err(WireError::from))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%ip, %peer, "bad message in session: {e}");
                return;
            }
        };
        let resp = handle_request(&sh, &peer, req).await;
        let sealed = match serde_json::to_string(&resp) {
            Ok(b) => session.seal(b),
            Err(_) => return,
        };
        if wire::send_json(&mut stream, &sealed).await.is_err() {
            return;
        }
    }
}

fn lowest_known(sh: &Shared, st: &State) -> NodeId {
    st.authed
        .keys()
        .chain(std::iter::once(sh.me()))
        .min()
        .expect("non-empty")
        .clone()
}

async fn handle_request(sh: &Arc<Shared>, peer: &NodeId, req: Request) -> Response {
    match req {
        Request::Status => Response::Status(sh.peer_status()),
        Request::Vote { candidate } => {
            if &candidate != peer {
                return Response::Error {
                    why: "a node may only ask votes for itself".into(),
                };
            }
            let mut st = sh.st.lock().unwrap();
            let lowest = lowest_known(sh, &st);
            let exists = st.cluster_exists;
            match st
                .voter
                .consider(&candidate, Instant::now(), &lowest, exists)
            {
                Ok(()) => {
                    tracing::info!(%candidate, "granted bootstrap vote");
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
        Request::Join { hostname, addr } => handle_join(sh, peer, hostname, addr).await,
        Request::JoinDone { ok, error } => {
            let mut st = sh.st.lock().unwrap();
            st.admissions.finish(peer);
            if ok {
                tracing::info!(%peer, "join finished");
            } else {
                tracing::warn!(%peer, "join failed on the joiner: {}", error.unwrap_or_default());
            }
            drop(st);
            sh.report();
            Response::Ack
        }
    }
}

async fn handle_join(sh: &Arc<Shared>, peer: &NodeId, hostname: String, addr: IpAddr) -> Response {
    let (role, stale) = {
        let mut st = sh.st.lock().unwrap();
        if st.phase != Phase::Ready || st.role != Role::Server {
            return Response::Busy {
                retry: true,
                why: format!("{} is not a ready server", sh.me()),
            };
        }
        if let Err(p) = st.admissions.begin(peer, Instant::now()) {
            return Response::Busy {
                retry: true,
                why: format!("{} is admitting {p}; one join at a time", sh.me()),
            };
        }
        let existing = st
            .members
            .members
            .iter()
            .find(|m| &m.node_id == peer)
            .map(|m| m.role);
        let stale = st.members.remove_stale(&hostname, peer);
        let role = match existing {
            Some(r) if r != Role::None => r,
            _ => role_for_joiner(st.members.servers(), sh.servers),
        };
        (role, stale)
    };
    if !stale.is_empty() {
        tracing::info!(%peer, %hostname, "replacing stale member(s) {:?}", stale.iter().map(|m| m.node_id.to_string()).collect::<Vec<_>>());
    }
    tracing::info!(%peer, %hostname, %addr, %role, "admitting");
    let engine = sh.engine.clone();
    let local = sh.local.clone();
    let joiner = Joiner {
        node_id: peer.clone(),
        hostname: hostname.clone(),
        addr,
    };
    let stale2 = stale.clone();
    let res =
        tokio::task::spawn_blocking(move || engine.admit(&local, &joiner, role, &stale2)).await;
    let res = match res {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut st = sh.st.lock().unwrap();
    match res {
        Ok(info) => {
            st.members.upsert(MemberInfo {
                node_id: peer.clone(),
                hostname,
                role,
                addr: Some(addr),
            });
            let leader = st.leader.clone().unwrap_or_else(|| sh.me().clone());
            let members = st.members.clone();
            drop(st);
            sh.persist();
            sh.report();
            Response::Admitted {
                role,
                info,
                leader,
                members,
            }
        }
        Err(e) => {
            st.admissions.finish(peer);
            if !stale.is_empty() {
                // keep the list consistent with the engine: the stale ones may be gone already
                st.members.epoch += 1;
            }
            tracing::warn!(%peer, "admission failed: {e}");
            Response::Busy {
                retry: true,
                why: format!("admission failed on {}: {e}", sh.me()),
            }
        }
    }
}

// ---------------------------------------------------------------- client side

pub(crate) async fn connect(sh: &Shared, addr: SocketAddr) -> Result<Client<TcpStream>, WireError> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| WireError::Timeout)??;
    Client::handshake(stream, &sh.token, &sh.local.cluster_id, sh.me()).await
}

/// Candidate addresses of peers of our cluster (mDNS + seeds).
fn poll_targets(sh: &Shared) -> Vec<(Option<NodeId>, Vec<SocketAddr>)> {
    let cid = &sh.local.cluster_id;
    let mut v: Vec<(Option<NodeId>, Vec<SocketAddr>)> = sh
        .peers
        .lock()
        .unwrap()
        .values()
        .filter(|d| &d.cluster_id == cid && &d.node_id != sh.me())
        .map(|d| {
            (
                Some(d.node_id.clone()),
                d.addrs
                    .iter()
                    .map(|a| SocketAddr::new(*a, d.port))
                    .collect(),
            )
        })
        .collect();
    v.extend(sh.cfg.seeds.iter().map(|s| (None, vec![*s])));
    v
}

async fn poll_one(sh: Arc<Shared>, expect: Option<NodeId>, addrs: Vec<SocketAddr>) {
    for addr in addrs {
        let res = async {
            let mut c = connect(&sh, addr).await?;
            match c.request(&Request::Status).await? {
                Response::Status(s) if &s.node_id == c.peer() => Ok(s),
                _ => Err(WireError::Unexpected),
            }
        }
        .await;
        match res {
            Ok(s) => {
                if expect.as_ref().is_some_and(|e| e != &s.node_id) {
                    tracing::debug!(%addr, "peer id changed");
                }
                let mut st = sh.st.lock().unwrap();
                if s.phase == Phase::Ready
                    && s.members.epoch > st.members.epoch
                    && st.phase == Phase::Ready
                {
                    st.members = s.members.clone();
                    if s.leader.is_some() {
                        st.leader = s.leader.clone();
                    }
                }
                st.authed.insert(
                    s.node_id.clone(),
                    AuthedPeer {
                        status: s,
                        addr,
                        last_ok: Instant::now(),
                    },
                );
                return;
            }
            Err(e) => tracing::debug!(%addr, "poll failed: {e}"),
        }
    }
}

/// Polls still running, by target; aborted with the poller.
#[derive(Default)]
struct InFlight(BTreeMap<Vec<SocketAddr>, JoinHandle<()>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

pub(crate) async fn poller(sh: Arc<Shared>) {
    let mut members_epoch = 0;
    // At most one poll per target at a time, and a round never waits for one: a target
    // that answers slowly (or a stranger on mDNS that stalls on purpose) delays only its
    // own next poll, never the polls that keep the authenticated peers fresh.
    let mut in_flight = InFlight::default();
    loop {
        in_flight.0.retain(|_, h| !h.is_finished());
        for (id, addrs) in poll_targets(&sh) {
            if let std::collections::btree_map::Entry::Vacant(e) = in_flight.0.entry(addrs) {
                let addrs = e.key().clone();
                e.insert(tokio::spawn(poll_one(sh.clone(), id, addrs)));
            }
        }
        let changed = {
            let mut st = sh.st.lock().unwrap();
            let timeout = sh.cfg.peer_timeout;
            st.authed.retain(|_, p| p.last_ok.elapsed() < timeout);
            let changed = st.members.epoch != members_epoch;
            members_epoch = st.members.epoch;
            changed
        };
        if changed {
            let ready = sh.st.lock().unwrap().phase == Phase::Ready;
            if ready {
                sh.persist();
            }
        }
        sh.report();
        tokio::time::sleep(sh.cfg.poll_interval).await;
    }
}

// ---------------------------------------------------------------- election loop

fn views(st: &State) -> BTreeMap<NodeId, PeerView> {
    st.authed
        .iter()
        .map(|(id, p)| {
            (
                id.clone(),
                PeerView {
                    phase: p.status.phase,
                    role: p.status.role,
                    cluster_exists: p.status.cluster_exists,
                },
            )
        })
        .collect()
}

/// Ask the set for votes; true when a quorum (ourselves included) granted.
async fn gather_votes(sh: &Arc<Shared>, set: &[NodeId]) -> Result<(), String> {
    {
        let mut st = sh.st.lock().unwrap();
        let lowest = lowest_known(sh, &st);
        let exists = st.cluster_exists;
        st.voter
            .consider(sh.me(), Instant::now(), &lowest, exists)?;
    }
    let addrs: Vec<(NodeId, SocketAddr)> = {
        let st = sh.st.lock().unwrap();
        set.iter()
            .filter_map(|id| st.authed.get(id).map(|p| (id.clone(), p.addr)))
            .collect()
    };
    let tasks: Vec<_> = addrs
        .into_iter()
        .map(|(id, addr)| {
            let sh = sh.clone();
            tokio::spawn(async move {
                let r = async {
                    let mut c = connect(&sh, addr).await?;
                    if c.peer() != &id {
                        return Err(WireError::Unexpected);
                    }
                    c.request(&Request::Vote {
                        candidate: sh.me().clone(),
                    })
                    .await
                }
                .await;
                (id, r)
            })
        })
        .collect();
    let mut granted = 1;
    let mut denied = Vec::new();
    for t in tasks {
        match t.await {
            Ok((_, Ok(Response::Vote { granted: true, .. }))) => granted += 1,
            Ok((
                id,
                Ok(Response::Vote {
                    granted: false,
                    reason,
                }),
            )) => denied.push(format!("{id}: {reason}")),
            Ok((id, Ok(_))) => denied.push(format!("{id}: unexpected reply")),
            Ok((id, Err(e))) => denied.push(format!("{id}: {e}")),
            Err(e) => denied.push(e.to_string()),
        }
    }
    if granted >= sh.quorum {
        Ok(())
    } else {
        Err(format!(
            "{granted}/{} votes ({})",
            sh.quorum,
            denied.join("; ")
        ))
    }
}

pub(crate) async fn bootstrap(sh: &Arc<Shared>) -> Result<(), Error> {
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = Phase::Bootstrapping;
        st.role = Role::Server;
        st.leader = Some(sh.me().clone());
        st.cluster_exists = true;
        st.members = MemberList::default();
        st.members.upsert(MemberInfo {
            node_id: sh.me().clone(),
            hostname: sh.cfg.hostname.clone(),
            role: Role::Server,
            addr: Some(sh.local.addr),
        });
        st.waiting = format!("bootstrapping {} cluster", sh.engine.name());
    }
    tracing::info!("won the election: bootstrapping");
    sh.report();
    let engine = sh.engine.clone();
    let local = sh.local.clone();
    let res = tokio::task::spawn_blocking(move || engine.bootstrap(&local))
        .await
        .map_err(|e| Error::Engine(e.to_string()))?;
    match res {
        Ok(()) => {
            {
                let mut st = sh.st.lock().unwrap();
                st.phase = Phase::Ready;
                st.waiting = String::new();
            }
            sh.persist();
            sh.report();
            Ok(())
        }
        Err(e) => fail(sh, format!("bootstrap failed: {e}")),
    }
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

/// Outcome of one join attempt.
enum JoinResult {
    Joined,
    Retry(String),
}

async fn try_join(sh: &Arc<Shared>, target: &NodeId) -> JoinResult {
    let Some(addr) = sh.st.lock().unwrap().authed.get(target).map(|p| p.addr) else {
        return JoinResult::Retry(format!("{target} is gone"));
    };
    let mut c = match connect(sh, addr).await {
        Ok(c) if c.peer() == target => c,
        Ok(_) => return JoinResult::Retry(format!("{addr} is no longer {target}")),
        Err(e) => return JoinResult::Retry(format!("connecting to {target}: {e}")),
    };
    sh.set_waiting(format!("asking {target} to admit us"));
    let resp = c
        .request(&Request::Join {
            hostname: sh.cfg.hostname.clone(),
            addr: sh.local.addr,
        })
        .await;
    let (role, info, leader, members) = match resp {
        Ok(Response::Admitted {
            role,
            info,
            leader,
            members,
        }) => (role, info, leader, members),
        Ok(Response::Busy { why, .. }) => return JoinResult::Retry(why),
        Ok(Response::Error { why }) => return JoinResult::Retry(why),
        Ok(_) => return JoinResult::Retry("unexpected reply to join".into()),
        Err(e) => return JoinResult::Retry(format!("join request to {target}: {e}")),
    };
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = Phase::Joining;
        st.role = role;
        st.leader = Some(leader);
        st.cluster_exists = true;
        st.members = members;
        st.waiting = format!(
            "admitted by {target} as {role}; starting {}",
            sh.engine.name()
        );
    }
    tracing::info!(%target, %role, "admitted; joining");
    sh.report();
    let engine = sh.engine.clone();
    let local = sh.local.clone();
    let res = tokio::task::spawn_blocking(move || engine.join(&local, role, &info)).await;
    let res = match res {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let done = Request::JoinDone {
        ok: res.is_ok(),
        error: res.as_ref().err().cloned(),
    };
    if c.request(&done).await.is_err() {
        // The admitting side will time the pending join out; try a fresh connection once.
        if let Ok(mut c2) = connect(sh, addr).await {
            let _ = c2.request(&done).await;
        }
    }
    match res {
        Ok(()) => {
            {
                let mut st = sh.st.lock().unwrap();
                st.phase = Phase::Ready;
                st.waiting = String::new();
            }
            sh.persist();
            sh.report();
            JoinResult::Joined
        }
        Err(e) => {
            {
                let mut st = sh.st.lock().unwrap();
                st.phase = Phase::Discovering;
                st.role = Role::None;
                st.cluster_exists = false;
            }
            JoinResult::Retry(format!("join failed: {e}"))
        }
    }
}

/// Resume after a reboot as what we were.
pub(crate) async fn resume(sh: &Arc<Shared>, p: Persisted) -> Result<(), Error> {
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = Phase::Joining;
        st.role = p.role;
        st.leader = p.leader.clone();
        st.cluster_exists = true;
        st.members = p.members.clone();
        st.waiting = format!("restarting as {} after reboot", p.role);
    }
    sh.report();
    let engine = sh.engine.clone();
    let local = sh.local.clone();
    let role = p.role;
    let res = tokio::task::spawn_blocking(move || engine.resume(&local, role))
        .await
        .map_err(|e| Error::Engine(e.to_string()))?;
    if let Err(e) = res {
        return fail(sh, format!("resume failed: {e}"));
    }
    loop {
        let engine = sh.engine.clone();
        let local = sh.local.clone();
        let h = tokio::task::spawn_blocking(move || engine.health(&local))
            .await
            .map_err(|e| Error::Engine(e.to_string()))?;
        match h {
            Ok(()) => break,
            Err(e) => sh.set_waiting(format!(
                "waiting for {} to become healthy: {e}",
                sh.engine.name()
            )),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    {
        let mut st = sh.st.lock().unwrap();
        st.phase = Phase::Ready;
        st.waiting = String::new();
    }
    sh.report();
    Ok(())
}

pub(crate) async fn elect_and_join(sh: &Arc<Shared>) -> Result<(), Error> {
    let mut election = Election::new(sh.me().clone(), sh.quorum, sh.cfg.settle);
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    let mut next_try = Instant::now();
    loop {
        let decision = {
            let st = sh.st.lock().unwrap();
            let v = views(&st);
            drop(st);
            election.step(Instant::now(), sh.seen(), &v)
        };
        match decision {
            Decision::Wait(why) => sh.set_waiting(why),
            Decision::RequestVotes(set) if Instant::now() >= next_try => {
                sh.set_waiting(format!(
                    "lowest id of {}: asking for bootstrap votes",
                    set.len() + 1
                ));
                match gather_votes(sh, &set).await {
                    Ok(()) => return bootstrap(sh).await,
                    Err(why) => {
                        next_try = Instant::now() + backoff.next_delay(rand::random());
                        sh.set_waiting(format!("not bootstrapping yet: {why}"));
                    }
                }
            }
            Decision::Join(target) if Instant::now() >= next_try => {
                match try_join(sh, &target).await {
                    JoinResult::Joined => return Ok(()),
                    JoinResult::Retry(why) => {
                        let d = backoff.next_delay(rand::random());
                        next_try = Instant::now() + d;
                        tracing::info!("join not done: {why}; retrying in {d:?}");
                        sh.set_waiting(format!("{why}; retrying in {:.1}s", d.as_secs_f64()));
                    }
                }
            }
            _ => {}
        }
        tokio::time::sleep(sh.cfg.poll_interval / 2).await;
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
