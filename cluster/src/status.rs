//! Status reporting and persisted membership state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Phase, Role};
use crate::wire::{MemberInfo, MemberList};

/// A snapshot of formation progress, sent to the caller's [`StatusSink`] on every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub node_id: NodeId,
    pub hostname: String,
    pub role: Role,
    /// Id of the coordinating server (the bootstrapper, or the server that admitted us).
    pub leader: Option<NodeId>,
    pub members: Vec<MemberInfo>,
    /// Nodes of our cluster seen on mDNS (not counting us).
    pub peers_seen: usize,
    /// Of those, peers that proved the token.
    pub peers_authenticated: usize,
    /// Human reason why formation is waiting ("3/2 nodes authenticated, settling 4s").
    pub waiting: String,
    pub error: Option<String>,
}

/// Receives status updates (firstboot writes status.json and the console line from them).
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

/// What survives a reboot: `<state_dir>/cluster.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub members: MemberList,
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

pub fn load(dir: &Path) -> Option<Persisted> {
    let text = std::fs::read_to_string(state_file(dir)).ok()?;
    match serde_json::from_str(&text) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("ignoring unreadable {}: {e}", state_file(dir).display());
            None
        }
    }
}

pub fn save(dir: &Path, p: &Persisted) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(p).map_err(std::io::Error::other)?;
    crate::sys::write_atomic(&state_file(dir), &text, 0o600)
}
