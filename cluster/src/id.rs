//! Node ids, cluster ids, phases and roles.

use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A node's random, persisted id. Compared as strings: the lowest id among an
/// authenticated quorum bootstraps. 1..=64 chars of `[0-9a-z-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// A fresh random id (16 lowercase hex chars). The caller persists it.
    pub fn generate() -> NodeId {
        let bytes: [u8; 8] = rand::random();
        NodeId(hex::encode(bytes))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!("node id must be 1..=64 chars, got {}", s.len()));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        {
            return Err(format!("node id {s:?} may only hold 0-9, a-z and '-'"));
        }
        Ok(NodeId(s))
    }
}
impl std::str::FromStr for NodeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NodeId::try_from(s.to_string())
    }
}
impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// Public cluster id: HMAC-SHA256(token, "clutch-cluster-id:" + name), first 16 bytes as
/// hex. Safe to publish in mDNS TXT records; it does not reveal the token.
pub fn cluster_id(token: &str, cluster_name: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("hmac takes any key");
    mac.update(b"clutch-cluster-id:");
    mac.update(cluster_name.as_bytes());
    let out = mac.finalize().into_bytes();
    hex::encode(&out[..16])
}

/// Formation phase of a node: the SPEC's phases, shared with clutch-firstboot (the cluster
/// code never reports `configuring`).
pub use clutch_config::Phase;

/// What a node is in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not decided yet.
    None,
    /// Voting / control-plane member.
    Server,
    /// Non-voting member (k3s agent; for etcd: no etcd member, membership only).
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_id_depends_on_token_and_name_and_hides_token() {
        let t = "a-very-long-shared-secret-token-0123456789";
        let a = cluster_id(t, "lab");
        assert_eq!(a.len(), 32);
        assert_eq!(a, cluster_id(t, "lab"));
        assert_ne!(a, cluster_id(t, "lab2"));
        assert_ne!(
            a,
            cluster_id("another-very-long-shared-secret-token-xx", "lab")
        );
        assert!(!a.contains("secret"));
    }

    #[test]
    fn node_ids_validate_and_order() {
        assert!("".parse::<NodeId>().is_err());
        assert!("ABC".parse::<NodeId>().is_err());
        let a: NodeId = "0a1".parse().unwrap();
        let b: NodeId = "0b0".parse().unwrap();
        assert!(a < b);
        let g = NodeId::generate();
        assert_eq!(g.as_str().len(), 16);
        assert_ne!(g, NodeId::generate());
    }
}
