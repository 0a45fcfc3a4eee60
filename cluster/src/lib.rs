//! Cluster formation for clutch nodes: mDNS discovery, password-authenticated encrypted
//! sessions between nodes, a split-brain-safe election with durable votes, static
//! bootstrap of everyone present, serialised joins for later nodes, and the engines (etcd
//! with TLS, k3s, none).
//!
//! # How firstboot calls it
//!
//! ```no_run
//! use std::sync::Arc;
//! use clutch_cluster::{form, engine_for, FormationConfig, LogSink, NodeId};
//! # async fn run(cluster: clutch_config::Cluster) -> Result<(), clutch_cluster::Error> {
//! // A random node id, generated once and persisted by the caller:
//! let node_id: NodeId = NodeId::generate();
//! let host = "node-1a2b3c".try_into().unwrap();
//! let cfg = FormationConfig::new(node_id, host, &cluster, "/var/lib/clutch".into())?;
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
//! `form` returns once this node is `ready` (bootstrapped, enrolled, joined, or resumed
//! after a reboot from `<state_dir>/cluster.json`) and errors only when the engine failed
//! (phase `failed`). Meanwhile every change goes to the [`StatusSink`].
//!
//! # Protocol in short
//! - mDNS `_clutch._tcp.local.` on links carrying our own address; TXT: `cid` (the public
//!   [`ClusterKey`]: name, engine, expected size, servers), `id`, `ph`, `ro`, `port`.
//! - TCP on `listen_port`: a SPAKE2 handshake keyed by the token, bound to both node ids,
//!   node keys and the dialled address ([`handshake`]); then ChaCha20-Poly1305 sessions
//!   ([`session`]) carrying status, votes, enrollments and joins ([`wire`]).
//! - Election ([`election`]): durable votes, sticky cluster evidence, static bootstrap plan.
//! - Engines ([`engine`]): etcd with TLS and client certificates from a cluster CA
//!   ([`pki`]); k3s with server and agent tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clutch_config::{Hostname, Token};

pub mod discovery;
pub mod election;
pub mod engine;
pub mod handshake;
pub mod id;
pub mod limits;
pub mod pki;
pub mod rollout;
mod runtime;
pub mod secret;
pub mod session;
pub mod state;
pub mod status;
pub mod sys;
pub mod wire;

pub use discovery::InterfaceFilter;
pub use engine::{Engine, EngineError, EtcdEngine, K3sEngine, LocalNode, NoneEngine};
pub use id::{ClusterKey, Identity, InstanceId, NodeId, NodeKey, Phase, Role};
pub use status::{LogSink, Status, StatusSink};
pub use wire::MemberInfo;

use crate::election::Admissions;
use crate::limits::RateLimiter;
use crate::runtime::{Running, Shared, State};
use crate::state::Store;

/// Default TCP port of the membership protocol.
pub const DEFAULT_PORT: u16 = 7373;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster config: {0}")]
    Config(String),
    #[error("state {}: {source}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Saving(#[from] state::StateError),
    #[error("listening on port {0}: {1}")]
    Listen(u16, #[source] std::io::Error),
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
    pub hostname: Hostname,
    pub cluster_name: String,
    /// Shared secret; never leaves the node (the handshake is a PAKE).
    pub token: Token,
    pub expected_size: u32,
    /// Voting members wanted; the rest join as agents.
    pub servers: u32,
    /// Holds the node key, `formation.json` (votes, plan) and `cluster.json`.
    pub state_dir: PathBuf,
    /// How long the whole expected set must stay unchanged before the vote.
    pub settle: Duration,
    /// How long a quorum that is not the whole expected set waits for the rest.
    pub partial_wait: Duration,
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
    /// Defaults: settle 2 s, partial wait 30 s, poll 1 s, peer timeout 6 s, default
    /// interface filter, port [`DEFAULT_PORT`], mDNS on.
    pub fn new(
        node_id: NodeId,
        hostname: Hostname,
        cluster: &clutch_config::Cluster,
        state_dir: PathBuf,
    ) -> Result<Self, Error> {
        let token = cluster.token.clone().ok_or_else(|| {
            Error::Config("cluster.token is not set (token_file not resolved?)".into())
        })?;
        Ok(FormationConfig {
            node_id,
            hostname,
            cluster_name: cluster.name.to_string(),
            token,
            expected_size: cluster.expected_size,
            servers: cluster.servers(),
            state_dir,
            settle: Duration::from_secs(2),
            partial_wait: Duration::from_secs(30),
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

/// Our address on the cluster link (waits for one, reporting why).
async fn cluster_addr(cfg: &FormationConfig, status: &dyn StatusSink) -> std::net::IpAddr {
    loop {
        if let Some(a) = cfg.addr {
            return a;
        }
        if let Some((ifname, a)) = discovery::local_addrs(&cfg.interfaces).into_iter().next() {
            tracing::info!(%ifname, addr = %a, "cluster address");
            return a;
        }
        status.update(&Status {
            phase: Phase::Discovering,
            node_id: cfg.node_id.clone(),
            hostname: cfg.hostname.clone(),
            role: Role::None,
            cluster: None,
            vote: None,
            leader: None,
            members: vec![],
            peers_seen: 0,
            peers_authenticated: 0,
            waiting: "waiting for an IPv4 address on a usable interface".into(),
            warnings: vec![],
            error: None,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The formation state of a node about to start.
fn shared_state(
    cfg: FormationConfig,
    engine: Box<dyn Engine>,
    status: Arc<dyn StatusSink>,
    identity: Identity,
    cluster_key: ClusterKey,
    addr: std::net::IpAddr,
    resume: Option<&state::Membership>,
) -> Arc<Shared> {
    let store = Store::new(&cfg.state_dir);
    let durable = store.durable();
    let local = LocalNode {
        node_id: cfg.node_id.clone(),
        hostname: cfg.hostname.clone(),
        addr,
        cluster_name: cfg.cluster_name.clone(),
    };
    Arc::new(Shared {
        identity,
        cluster_key,
        quorum: cfg.quorum(),
        servers: cfg.servers.max(1) as usize,
        local,
        engine: Arc::from(engine),
        sink: status,
        store,
        st: Mutex::new(State {
            // Resuming: start out as what we were, so peers and the status never see this
            // node rediscover.
            phase: if resume.is_some() {
                Phase::Joining
            } else {
                Phase::Discovering
            },
            role: resume.map_or(Role::None, |m| m.role),
            leader: resume.and_then(|m| m.leader.clone()),
            durable,
            members: Default::default(),
            admissions: Admissions::new(Duration::from_secs(180)),
            authed: Default::default(),
            pinned: Default::default(),
            limiter: RateLimiter::new(5, Duration::from_secs(60), Duration::from_secs(30)),
            waiting: "starting discovery".into(),
            warnings: vec![],
            error: None,
            last_sent: None,
        }),
        peers: Default::default(),
        discovery: Mutex::new(None),
        cfg,
    })
}

/// Starts mDNS (advertising `addr:port`) and the task that hands its peer table to the
/// runtime.
fn start_discovery(
    shared: &Arc<Shared>,
    addr: std::net::IpAddr,
    port: u16,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let advert = discovery::Advert {
        node_id: shared.cfg.node_id.clone(),
        hostname: shared.cfg.hostname.to_string(),
        cluster: shared.cluster_key.clone(),
        addrs: vec![addr],
        port,
    };
    let d = discovery::Discovery::start(&shared.cfg.interfaces, advert)
        .map_err(|e| Error::Discovery(e.to_string()))?;
    let table = d.peers.clone();
    *shared.discovery.lock().unwrap() = Some(d);
    let sh2 = shared.clone();
    Ok(tokio::spawn(async move {
        loop {
            let snapshot = table.lock().unwrap().clone();
            *sh2.peers.lock().unwrap() = snapshot;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}

/// Form or join the cluster; see the crate docs.
pub async fn form(
    cfg: FormationConfig,
    engine: Box<dyn Engine>,
    status: Arc<dyn StatusSink>,
) -> Result<Outcome, Error> {
    if cfg.expected_size == 0 {
        return Err(Error::Config("expected_size must be >= 1".into()));
    }
    clutch_os::fs::create_dir_all_durable(&cfg.state_dir).map_err(|e| Error::State {
        path: cfg.state_dir.clone(),
        source: e.into(),
    })?;
    let identity = Identity::load_or_create(&cfg.state_dir)?;
    let cluster_key = ClusterKey::new(
        &cfg.cluster_name,
        engine.name(),
        cfg.expected_size,
        cfg.servers,
    );
    let resume = Store::new(&cfg.state_dir)
        .membership()
        .filter(|m| m.node_id == cfg.node_id && m.cluster_key == cluster_key);
    let addr = cluster_addr(&cfg, status.as_ref()).await;
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
    let shared = shared_state(
        cfg,
        engine,
        status,
        identity,
        cluster_key,
        addr,
        resume.as_ref(),
    );
    let mut tasks = Vec::new();
    if shared.cfg.mdns {
        tasks.push(start_discovery(&shared, addr, port)?);
    }
    tasks.push(tokio::spawn(runtime::serve(listener, shared.clone())));
    tasks.push(tokio::spawn(runtime::poller(shared.clone())));
    let running = Running {
        tasks,
        shared: shared.clone(),
    };
    shared.report();
    match resume {
        Some(m) => {
            tracing::info!(role = %m.role, "resuming cluster membership from state");
            runtime::resume(&shared, m).await?;
        }
        None => runtime::elect_and_join(&shared).await?,
    }
    let st = shared.st.lock().unwrap();
    let bootstrapped = st
        .durable
        .bootstrap
        .as_ref()
        .is_some_and(|b| &b.leader == shared.me());
    Ok(Outcome {
        role: st.role,
        leader: st.leader.clone(),
        members: st.members.members.clone(),
        bootstrapped,
        running,
    })
}
