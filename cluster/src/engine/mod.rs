//! Engines: what actually runs on the formed cluster (etcd, k3s, or nothing). All calls
//! are blocking (file writes, process spawns); the formation runtime calls them on a
//! blocking thread.
//!
//! How a node gets into a cluster, as an engine sees it:
//! - The leader of a bootstrap plan calls [`Engine::found`] (make what the cluster shares:
//!   a CA, secrets), then admits itself like any listed member.
//! - A member asks with [`Engine::request`]'s output (a certificate request: its key stays
//!   on it); the admitting server answers with [`Engine::admit`] ([`Admission::FromPlan`]
//!   for members of the plan, which start together; [`Admission::Runtime`] for later nodes,
//!   one at a time); the member starts with [`Engine::join`].

use std::net::IpAddr;
use std::path::PathBuf;

use clutch_config::Hostname;
use serde::{Deserialize, Serialize};

use crate::id::{InstanceId, NodeId, Role};
use crate::pki::PkiError;
use crate::wire::{Bootstrap, MemberInfo};

pub mod etcd;
pub mod k3s;

pub use etcd::{EtcdEngine, EtcdJoin};
pub use k3s::{K3sEngine, K3sJoin};

/// This node, as engines see it.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub node_id: NodeId,
    pub hostname: Hostname,
    /// The node's address on the cluster link (never a bridge address).
    pub addr: IpAddr,
    pub cluster_name: String,
}

/// A node asking to be admitted, as the admitting server verified it: `addr` is the source
/// address of its connection, `hostname` a valid host name.
#[derive(Clone, Debug)]
pub struct Joiner {
    pub node_id: NodeId,
    pub hostname: Hostname,
    pub addr: IpAddr,
    /// Its certificate request, when the engine uses certificates.
    pub csr: Option<String>,
}

/// How a node is being admitted.
#[derive(Clone, Copy, Debug)]
pub enum Admission<'a> {
    /// A member listed in the bootstrap plan: it starts from the plan, with everyone else.
    FromPlan(&'a Bootstrap),
    /// A node joining the running cluster `instance`; `replaces`: members it replaces
    /// (same host name, another node id, no longer alive).
    Runtime {
        replaces: &'a [MemberInfo],
        instance: &'a InstanceId,
    },
}

/// What a joiner needs, per engine. Travels only inside encrypted sessions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "lowercase", deny_unknown_fields)]
pub enum JoinInfo {
    None,
    Etcd(EtcdJoin),
    K3s(K3sJoin),
}

impl JoinInfo {
    fn kind(&self) -> &'static str {
        match self {
            JoinInfo::None => "none",
            JoinInfo::Etcd(_) => "etcd",
            JoinInfo::K3s(_) => "k3s",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Write(#[from] clutch_os::WriteError),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    #[error("{unit}: {reason}")]
    Service { unit: String, reason: String },
    #[error("not healthy: {0}")]
    Unhealthy(String),
    #[error("join info is for engine {got}, this node runs {want}")]
    WrongEngine {
        want: &'static str,
        got: &'static str,
    },
    #[error("join info: {0}")]
    BadInfo(String),
    /// The engine's configuration on this node is not the one clutch wrote when it joined.
    #[error("{}: {why}", path.display())]
    NotConfigured { path: PathBuf, why: String },
    #[error("certificates: {0}")]
    Pki(#[from] PkiError),
}

impl EngineError {
    pub(crate) fn read(path: PathBuf) -> impl FnOnce(std::io::Error) -> EngineError {
        move |source| EngineError::Read { path, source }
    }
}

/// How members of a bootstrap plan (other than its leader) start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanStart {
    /// All at once, with the leader, from the plan (etcd's static bootstrap).
    Together,
    /// As soon as one server of the plan is ready, without waiting on each other (k3s
    /// agents: their token pins the server CA, which exists once a server runs).
    WhenServerReady,
    /// One at a time, like nodes that come later (k3s servers).
    OneByOne,
}

/// One cluster engine.
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// How members of `role` listed in a bootstrap plan start.
    fn plan_start(&self, role: Role) -> PlanStart;
    /// On the leader, before it admits the members of its plan: make what the cluster
    /// shares. Idempotent: a leader restarted mid-bootstrap keeps what it made.
    fn found(&self, me: &LocalNode, plan: &Bootstrap) -> Result<(), EngineError>;
    /// On a joiner: what it sends with its request (a certificate request; the key stays
    /// here).
    fn request(&self, me: &LocalNode) -> Result<Option<String>, EngineError>;
    /// On an admitting server: admit `joiner` as `role`. Returns what it needs to start.
    fn admit(
        &self,
        me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        how: Admission<'_>,
    ) -> Result<JoinInfo, EngineError>;
    /// On the joiner: start with what the cluster sent. Returns once healthy.
    fn join(&self, me: &LocalNode, role: Role, info: &JoinInfo) -> Result<(), EngineError>;
    /// After a reboot: start again as what we were (config is already in place).
    fn resume(&self, me: &LocalNode, role: Role) -> Result<(), EngineError>;
    /// Is the local engine healthy?
    fn health(&self, me: &LocalNode) -> Result<(), EngineError>;
    /// Member names as the engine sees them.
    fn members(&self, me: &LocalNode) -> Result<Vec<String>, EngineError>;
}

/// `none`: discovery, trust and membership only.
pub struct NoneEngine;

impl Engine for NoneEngine {
    fn name(&self) -> &'static str {
        "none"
    }
    fn plan_start(&self, _: Role) -> PlanStart {
        PlanStart::Together
    }
    fn found(&self, _: &LocalNode, _: &Bootstrap) -> Result<(), EngineError> {
        Ok(())
    }
    fn request(&self, _: &LocalNode) -> Result<Option<String>, EngineError> {
        Ok(None)
    }
    fn admit(
        &self,
        _: &LocalNode,
        _: &Joiner,
        _: Role,
        _: Admission<'_>,
    ) -> Result<JoinInfo, EngineError> {
        Ok(JoinInfo::None)
    }
    fn join(&self, _: &LocalNode, _: Role, info: &JoinInfo) -> Result<(), EngineError> {
        match info {
            JoinInfo::None => Ok(()),
            other => Err(EngineError::WrongEngine {
                want: "none",
                got: other.kind(),
            }),
        }
    }
    fn resume(&self, _: &LocalNode, _: Role) -> Result<(), EngineError> {
        Ok(())
    }
    fn health(&self, _: &LocalNode) -> Result<(), EngineError> {
        Ok(())
    }
    fn members(&self, _: &LocalNode) -> Result<Vec<String>, EngineError> {
        Ok(Vec::new())
    }
}

/// Poll `f` until it succeeds or `timeout` passes.
pub(crate) fn wait_until<F: FnMut() -> Result<(), EngineError>>(
    timeout: std::time::Duration,
    mut f: F,
) -> Result<(), EngineError> {
    let start = std::time::Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    }
}

/// The uid and gid of `user` from `<root>/etc/passwd`, if it has one.
pub(crate) fn passwd_ids(root: &std::path::Path, user: &str) -> Option<(u32, u32, PathBuf)> {
    let passwd = std::fs::read_to_string(crate::sys::under(root, "/etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 6 && f[0] == user {
            Some((f[2].parse().ok()?, f[3].parse().ok()?, PathBuf::from(f[5])))
        } else {
            None
        }
    })
}
