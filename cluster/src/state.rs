//! What formation keeps on disk, under the state dir (mode 0600, written crash-safely):
//! - `formation.json` ([`Durable`]): the bootstrap vote this node promised, the cluster
//!   instance it knows of, and the bootstrap plan it is listed in. Written before the vote
//!   is granted, before a plan is published and as soon as one is learnt, so a reboot or a
//!   power cut never makes a node vote twice or forget that a cluster exists.
//! - `cluster.json` ([`Membership`]): role, leader and member list once `ready`, for
//!   resuming after a reboot.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::id::{ClusterKey, InstanceId, NodeId, Role};
use crate::wire::{Bootstrap, MemberList};

/// A state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: clutch_os::WriteError,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The election state that must survive reboots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Durable {
    /// The candidate this node promised its bootstrap vote to (itself, when a candidate).
    #[serde(default)]
    pub vote: Option<NodeId>,
    /// The cluster this node knows exists (sticky: it never votes again).
    #[serde(default)]
    pub cluster: Option<InstanceId>,
    /// The plan this node is listed in (or published, as leader).
    #[serde(default)]
    pub bootstrap: Option<Bootstrap>,
}

/// Membership once ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    pub node_id: NodeId,
    pub cluster_key: ClusterKey,
    pub instance: InstanceId,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub members: MemberList,
}

/// The files of one node's state dir.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub const FORMATION: &'static str = "formation.json";
    pub const MEMBERSHIP: &'static str = "cluster.json";

    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write<T: Serialize>(&self, name: &str, v: &T) -> Result<(), StateError> {
        let path = self.dir.join(name);
        let text = serde_json::to_vec_pretty(v).map_err(|source| StateError::Json {
            path: path.clone(),
            source,
        })?;
        clutch_os::fs::write_atomic(&path, &text, 0o600)
            .map_err(|source| StateError::Write { path, source })
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<T> {
        let path = self.dir.join(name);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!("ignoring unreadable {}: {e}", path.display());
                None
            }
        }
    }

    pub fn durable(&self) -> Durable {
        self.read(Self::FORMATION).unwrap_or_default()
    }
    pub fn save_durable(&self, d: &Durable) -> Result<(), StateError> {
        self.write(Self::FORMATION, d)
    }
    pub fn membership(&self) -> Option<Membership> {
        self.read(Self::MEMBERSHIP)
    }
    pub fn save_membership(&self, m: &Membership) -> Result<(), StateError> {
        self.write(Self::MEMBERSHIP, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_state_round_trips_and_is_private() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        assert_eq!(s.durable(), Durable::default());
        let v = Durable {
            vote: Some("ab".parse().unwrap()),
            cluster: Some(InstanceId::generate()),
            bootstrap: None,
        };
        s.save_durable(&v).unwrap();
        assert_eq!(s.durable(), v);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(Store::FORMATION))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join(Store::FORMATION), "{garbage").unwrap();
        assert_eq!(s.durable(), Durable::default());
        assert!(s.membership().is_none());
    }
}
