//! Engines: what actually runs on the formed cluster. All calls are blocking (file writes,
//! process spawns); the formation runtime calls them on a blocking thread.

use std::net::IpAddr;

use crate::id::{NodeId, Role};
use crate::wire::{JoinInfo, MemberInfo};

pub mod etcd;
pub mod k3s;

pub use etcd::EtcdEngine;
pub use k3s::K3sEngine;

/// This node, as engines see it.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub node_id: NodeId,
    pub hostname: String,
    /// The node's address on the cluster link (never a bridge address).
    pub addr: IpAddr,
    pub cluster_name: String,
    /// Public cluster id (HMAC of the token); usable as a cluster token for engines.
    pub cluster_id: String,
}

/// A node asking to be admitted.
#[derive(Clone, Debug)]
pub struct Joiner {
    pub node_id: NodeId,
    pub hostname: String,
    pub addr: IpAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Command(String),
    #[error("{0}")]
    Service(String),
    #[error("not healthy: {0}")]
    Unhealthy(String),
    #[error("join info is missing {0:?}")]
    MissingInfo(&'static str),
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::Io(e.to_string())
    }
}

/// One cluster engine (etcd, k3s, none).
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    /// Start a brand-new single-member cluster on this node. Returns once it is healthy.
    fn bootstrap(&self, me: &LocalNode) -> Result<(), EngineError>;
    /// On a member: admit `joiner` as `role` (e.g. `etcdctl member add`), after removing
    /// `stale` members (same hostname, older node id). Returns what the joiner needs.
    fn admit(
        &self,
        me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        stale: &[MemberInfo],
    ) -> Result<JoinInfo, EngineError>;
    /// On the joiner: join with the info the cluster sent. Returns once healthy.
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
    fn bootstrap(&self, _: &LocalNode) -> Result<(), EngineError> {
        Ok(())
    }
    fn admit(
        &self,
        _: &LocalNode,
        _: &Joiner,
        _: Role,
        _: &[MemberInfo],
    ) -> Result<JoinInfo, EngineError> {
        Ok(JoinInfo::new())
    }
    fn join(&self, _: &LocalNode, _: Role, _: &JoinInfo) -> Result<(), EngineError> {
        Ok(())
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
