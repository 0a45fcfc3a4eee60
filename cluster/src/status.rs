//! Formation progress as the caller sees it: a [`Status`] snapshot sent to the caller's
//! [`StatusSink`] on every change (firstboot turns it into status.json and the console line).

use clutch_config::Hostname;
use serde::{Deserialize, Serialize};

use crate::id::{InstanceId, NodeId, Phase, Role};
use crate::wire::MemberInfo;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub node_id: NodeId,
    pub hostname: Hostname,
    pub role: Role,
    /// The cluster instance this node is in (or is listed to start).
    pub cluster: Option<InstanceId>,
    /// The candidate this node promised its bootstrap vote to (kept on disk).
    pub vote: Option<NodeId>,
    /// Id of the coordinating server (the bootstrapper, or the server that admitted us).
    pub leader: Option<NodeId>,
    pub members: Vec<MemberInfo>,
    /// Nodes of our cluster seen on mDNS (not counting us).
    pub peers_seen: usize,
    /// Of those, peers that proved the token.
    pub peers_authenticated: usize,
    /// Human reason why formation is waiting ("3/3 nodes authenticated, settling 2s").
    pub waiting: String,
    /// Things the operator should know that do not stop formation (two clusters seen...).
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

/// Receives status updates.
pub trait StatusSink: Send + Sync {
    fn update(&self, status: &Status);
}

/// A sink that only logs.
pub struct LogSink;

impl StatusSink for LogSink {
    fn update(&self, s: &Status) {
        tracing::info!(phase = %s.phase, role = %s.role, members = s.members.len(), waiting = %s.waiting, "status");
    }
}
