//! Cluster formation for clutch nodes (issue 4): mDNS discovery, authenticated peers,
//! split-brain-safe election, serialised joins, and engines (etcd, k3s, none).
//!
//! # How firstboot calls it
//!
//! ```no_run
//! use std::sync::Arc;
//! use clutch_cluster::{form, engine_for, FormationConfig, LogSink, NodeId};
//! # async fn run(cluster: clutch_config::Cluster) -> Result<(), clutch_cluster::Error> {
//! // A random node id, generated once and persisted by the caller:
//! let node_id: NodeId = NodeId::generate();
//! let cfg = FormationConfig::new(node_id, "node-1a2b3c".into(), &cluster, "/var/lib/clutch".into())?;
//! // Real engine: writes under "/", starts services with systemctl.
//! let engine = engine_for(cluster.engine, "/".into(), Some("admin".into()));
//! // A StatusSink of your own writes /run/clutch/status.json and the console line.
//! let outcome = form(cfg, engine, Arc::new(LogSink)).await?;
//! println!("phase=ready role={} members={}", outcome.role, outcome.members.len());
//! // Keep serving: later nodes are admitted by ready servers; never returns normally.
//! outcome.serve().await;
//! # Ok(()) }
//! ```
//!
//! `form` returns once this node is `ready` (bootstrapped, joined, or resumed after a
//! reboot from `<state_dir>/cluster.json`) and errors only when the engine failed
//! (phase `failed`). Meanwhile every change goes to the [`StatusSink`]: phase
//! (`discovering`, `bootstrapping`, `joining`, `ready`, `failed`), role, leader, members and
//! a human `waiting` string ("2/3 nodes authenticated (2 seen), need quorum 3; waiting").
//! Dropping the [`Outcome`] (or the `form` future) stops the background tasks and mDNS.
//!
//! # Protocol in short
//! - mDNS `_clutch._tcp.local.` on links carrying our own address; TXT: `cid` (HMAC of the
//!   token over the cluster name), `id`, `ph`, `ro`, `port`. Never the token.
//! - TCP on `listen_port`: mutual HMAC challenge–response with fresh nonces ([`auth`]),
//!   then MAC'd, sequenced messages: status, vote, join, join-done ([`wire`]).
//!   Failed handshakes are logged and rate-limited per source IP.
//! - Election ([`election`]): quorum of authenticated nodes, settle window, lowest id asks
//!   for votes and bootstraps with a quorum of votes; never when a peer knows a cluster.
//! - Joins: the lowest-id ready server admits one joiner at a time; `servers` voting
//!   members, the rest agents; replaced nodes (same hostname, new id) evict the stale entry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod auth;
pub mod discovery;
pub mod election;
pub mod engine;
pub mod id;
mod runtime;
pub mod status;
pub mod sys;
pub mod wire;

pub use discovery::InterfaceFilter;
pub use engine::{Engine, EngineError, EtcdEngine, K3sEngine, LocalNode, NoneEngine};
pub use id::{NodeId, Phase, Role, cluster_id};
pub use status::{LogSink, Status, StatusSink};
pub use wire::MemberInfo;

use crate::auth::RateLimiter;
use crate::election::{Admissions, Voter};
use crate::runtime::{Running, Shared, State};

/// Default TCP port of the authenticated membership protocol.
pub const DEFAULT_PORT: u16 = 7373;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster config: {0}")]
    Config(String),
    #[error("state dir {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    #[error("listening on port {0}: {1}")]
    Listen(u16, std::io::Error),
    #[error("mDNS: {0}")]
    Discovery(String),
    #[error("engine: {0}")]
    Engine(String),
}

/// Everything `form` needs.
#[derive(Clone, Debug)]
pub struct FormationConfig {
    /// Random, persisted node id (not a MAC or hostname).
    pub node_id: NodeId,
    pub hostname: String,
    pub cluster_name: String,
    /// Shared secret (>= 32 chars); never leaves the node.
    pub token: String,
    pub expected_size: u32,
    /// Voting members wanted; the rest join as agents.
    pub servers: u32,
    /// Holds `cluster.json` (role and membership, for rejoining after a reboot).
    pub state_dir: PathBuf,
    /// How long the authenticated quorum must stay unchanged before bootstrapping.
    pub settle: Duration,
    pub poll_interval: Duration,
    /// An authenticated peer not heard from for this long no longer counts.
    pub peer_timeout: Duration,
    pub interfaces: InterfaceFilter,
    pub listen_port: u16,
    /// Use mDNS (off only in tests that pass `seeds`).
    pub mdns: bool,
    /// Extra peer addresses to poll besides mDNS (tests, static setups).
    pub seeds: Vec<SocketAddr>,
    /// Override the node's cluster address (default: first IPv4 on an allowed interface).
    pub addr: Option<std::net::IpAddr>,
}

impl FormationConfig {
    /// Defaults: settle 10 s, poll 1 s, peer timeout 6 s, default interface filter,
    /// port [`DEFAULT_PORT`], mDNS on.
    pub fn new(
        node_id: NodeId,
        hostname: String,
        cluster: &clutch_config::Cluster,
        state_dir: PathBuf,
    ) -> Result<Self, Error> {
        let token = cluster.token.as_ref().ok_or_else(|| {
            Error::Config("cluster.token is not set (token_file not resolved?)".into())
        })?;
        Ok(FormationConfig {
            node_id,
            hostname,
            cluster_name: cluster.name.to_string(),
            token: token.expose().to_string(),
            expected_size: cluster.expected_size,
            servers: cluster.servers(),
            state_dir,
            settle: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(6),
            interfaces: InterfaceFilter::default(),
            listen_port: DEFAULT_PORT,
            mdns: true,
            seeds: Vec::new(),
            addr: None,
        })
    }

    pub fn quorum(&self) -> usize {
        (self.expected_size / 2 + 1) as usize
    }
}

/// The real engine for a config's `engine` key: files under `root`, services via systemctl.
pub fn engine_for(
    kind: clutch_config::schema::Engine,
    root: PathBuf,
    admin_user: Option<String>,
) -> Box<dyn Engine> {
    use clutch_config::schema::Engine as K;
    let services: Arc<dyn sys::ServiceManager> = Arc::new(sys::Systemd {
        runner: sys::RealRunner,
    });
    let runner: Arc<dyn sys::CommandRunner> = Arc::new(sys::RealRunner);
    match kind {
        K::Etcd => Box::new(EtcdEngine::new(root, services, runner)),
        K::K3s => Box::new(K3sEngine::new(root, services, runner, admin_user)),
        K::None => Box::new(NoneEngine),
    }
}

/// Result of formation. Keep it (or call [`Outcome::serve`]) so this node goes on
/// admitting later nodes and answering peers.
pub struct Outcome {
    pub role: Role,
    pub leader: Option<NodeId>,
    pub members: Vec<MemberInfo>,
    /// True when this node bootstrapped the cluster.
    pub bootstrapped: bool,
    running: Running,
}

impl Outcome {
    /// Serve peers until cancelled (drop the future to stop).
    pub async fn serve(self) {
        std::future::pending::<()>().await;
        drop(self.running);
    }
    /// The latest status (members update as the cluster grows).
    pub fn status(&self) -> Option<Status> {
        self.running.shared.st.lock().unwrap().last_sent.clone()
    }
}

/// Form or join the cluster; see the crate docs.
pub async fn form(
    cfg: FormationConfig,
    engine: Box<dyn Engine>,
    status: Arc<dyn StatusSink>,
) -> Result<Outcome, Error> {
    if cfg.token.len() < 32 {
        return Err(Error::Config("token must be at least 32 characters".into()));
    }
    if cfg.expected_size == 0 {
        return Err(Error::Config("expected_size must be >= 1".into()));
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| Error::StateDir(cfg.state_dir.clone(), e))?;
    let cid = cluster_id(&cfg.token, &cfg.cluster_name);
    let persisted =
        status::load(&cfg.state_dir).filter(|p| p.node_id == cfg.node_id && p.cluster_id == cid);

    // Our address on the cluster link.
    let addr = loop {
        if let Some(a) = cfg.addr {
            break a;
        }
        if let Some((ifname, a)) = discovery::local_addrs(&cfg.interfaces).into_iter().next() {
            tracing::info!(%ifname, addr = %a, "cluster address");
            break a;
        }
        status.update(&Status {
            phase: Phase::Discovering,
            node_id: cfg.node_id.clone(),
            hostname: cfg.hostname.clone(),
            role: Role::None,
            leader: None,
            members: vec![],
            peers_seen: 0,
            peers_authenticated: 0,
            waiting: "waiting for an IPv4 address on a usable interface".into(),
            error: None,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let listener = tokio::net::TcpListener::bind(SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        cfg.listen_port,
    ))
    .await
    .map_err(|e| Error::Listen(cfg.listen_port, e))?;
    let port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(cfg.listen_port);

    let local = LocalNode {
        node_id: cfg.node_id.clone(),
        hostname: cfg.hostname.clone(),
        addr,
        cluster_name: cfg.cluster_name.clone(),
        cluster_id: cid.clone(),
    };
    let vote_ttl = cfg.settle * 3 + Duration::from_secs(15);
    let shared = Arc::new(Shared {
        token: cfg.token.clone(),
        quorum: cfg.quorum(),
        servers: cfg.servers.max(1) as usize,
        local,
        engine: Arc::from(engine),
        sink: status,
        st: Mutex::new(State {
            phase: Phase::Discovering,
            role: Role::None,
            leader: None,
            cluster_exists: false,
            members: Default::default(),
            voter: Voter::new(vote_ttl),
            admissions: Admissions::new(Duration::from_secs(180)),
            authed: Default::default(),
            limiter: RateLimiter::new(5, Duration::from_secs(60), Duration::from_secs(30)),
            waiting: "starting discovery".into(),
            error: None,
            last_sent: None,
        }),
        peers: Default::default(),
        discovery: Mutex::new(None),
        cfg,
    });
    if shared.cfg.mdns {
        let advert = discovery::Advert {
            node_id: shared.cfg.node_id.clone(),
            hostname: shared.cfg.hostname.clone(),
            cluster_id: cid,
            addrs: vec![addr],
            port,
        };
        let d = discovery::Discovery::start(&shared.cfg.interfaces, advert)
            .map_err(|e| Error::Discovery(e.to_string()))?;
        // Share the mDNS peer table with the runtime.
        let table = d.peers.clone();
        *shared.discovery.lock().unwrap() = Some(d);
        let sh2 = shared.clone();
        let sync = tokio::spawn(async move {
            loop {
                let snapshot = table.lock().unwrap().clone();
                *sh2.peers.lock().unwrap() = snapshot;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        return finish(shared, listener, persisted, vec![sync]).await;
    }
    finish(shared, listener, persisted, vec![]).await
}

async fn finish(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    persisted: Option<status::Persisted>,
    mut tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Result<Outcome, Error> {
    if let Some(p) = &persisted {
        // Start out as what we were, so peers and the status sink never see us rediscover.
        let mut st = shared.st.lock().unwrap();
        st.phase = Phase::Joining;
        st.role = p.role;
        st.leader = p.leader.clone();
        st.cluster_exists = true;
        st.members = p.members.clone();
        st.waiting = format!("restarting as {} after reboot", p.role);
    }
    tasks.push(tokio::spawn(runtime::serve(listener, shared.clone())));
    tasks.push(tokio::spawn(runtime::poller(shared.clone())));
    let running = Running {
        tasks,
        shared: shared.clone(),
    };
    shared.report();
    let bootstrapped = match persisted {
        Some(p) => {
            tracing::info!(role = %p.role, "resuming cluster membership from state");
            runtime::resume(&shared, p).await?;
            false
        }
        None => {
            runtime::elect_and_join(&shared).await?;
            shared.st.lock().unwrap().leader.as_ref() == Some(&shared.cfg.node_id)
        }
    };
    let st = shared.st.lock().unwrap();
    Ok(Outcome {
        role: st.role,
        leader: st.leader.clone(),
        members: st.members.members.clone(),
        bootstrapped,
        running,
    })
}
