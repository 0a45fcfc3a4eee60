//! Identifiers: node ids, the public cluster key, cluster instances, roles, and the node's
//! own signing key.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A node's random, persisted id. Compared as strings: the lowest id among an
/// authenticated quorum is the candidate. 1..=64 chars of `[0-9a-z-]`.
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

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: {why}")]
pub struct BadId {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

impl TryFrom<String> for NodeId {
    type Error = BadId;
    fn try_from(s: String) -> Result<Self, BadId> {
        let bad = |why| BadId {
            what: "node id",
            value: s.chars().take(80).collect(),
            why,
        };
        if s.is_empty() || s.len() > 64 {
            return Err(bad("must be 1..=64 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-')
        {
            return Err(bad("may only hold 0-9, a-z and '-'"));
        }
        Ok(NodeId(s))
    }
}
impl std::str::FromStr for NodeId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
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

fn hex_newtype_check(what: &'static str, s: &str, len: usize) -> Result<(), BadId> {
    if s.len() != len
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(BadId {
            what,
            value: s.chars().take(80).collect(),
            why: "not the expected number of lowercase hex digits",
        });
    }
    Ok(())
}

/// The public name of a cluster configuration: a hash of everything nodes must agree on to
/// count toward one quorum (name, engine, expected size, servers). It is what mDNS
/// carries and what the handshake checks first; it holds nothing secret (the token is not
/// part of it), so publishing it helps nobody guess the token.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterKey(String);

impl ClusterKey {
    pub fn new(name: &str, engine: &str, expected_size: u32, servers: u32) -> ClusterKey {
        let mut h = Sha256::new();
        for part in [
            "clutch-cluster-v1",
            name,
            engine,
            &expected_size.to_string(),
            &servers.to_string(),
        ] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part.as_bytes());
        }
        ClusterKey(hex::encode(&h.finalize()[..16]))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for ClusterKey {
    type Error = BadId;
    fn try_from(s: String) -> Result<Self, BadId> {
        hex_newtype_check("cluster key", &s, 32)?;
        Ok(ClusterKey(s))
    }
}
impl From<ClusterKey> for String {
    fn from(k: ClusterKey) -> String {
        k.0
    }
}
impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.0)
    }
}

/// One formed cluster: a random id minted by the node that bootstrapped it. Two instances
/// of one [`ClusterKey`] on a LAN are two clusters; nodes that see that join neither.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceId(String);

impl InstanceId {
    pub fn generate() -> InstanceId {
        let bytes: [u8; 16] = rand::random();
        InstanceId(hex::encode(bytes))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for InstanceId {
    type Error = BadId;
    fn try_from(s: String) -> Result<Self, BadId> {
        hex_newtype_check("cluster instance", &s, 32)?;
        Ok(InstanceId(s))
    }
}
impl From<InstanceId> for String {
    fn from(k: InstanceId) -> String {
        k.0
    }
}
impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({})", self.0)
    }
}

/// Formation phase of a node: the SPEC's phases, shared with clutch-firstboot (the cluster
/// code never reports `configuring`).
pub use clutch_config::Phase;

/// What a node is in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// A node's long-term public key (Ed25519): proves, in every handshake, that a node id is
/// held by the same machine as before, so no token holder can pose as another member.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeKey([u8; 32]);

impl NodeKey {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).ok()
    }
}
impl TryFrom<String> for NodeKey {
    type Error = BadId;
    fn try_from(s: String) -> Result<Self, BadId> {
        hex_newtype_check("node key", &s, 64)?;
        let mut b = [0u8; 32];
        hex::decode_to_slice(&s, &mut b).map_err(|_| BadId {
            what: "node key",
            value: s.clone(),
            why: "not hex",
        })?;
        Ok(NodeKey(b))
    }
}
impl From<NodeKey> for String {
    fn from(k: NodeKey) -> String {
        hex::encode(k.0)
    }
}
impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", &hex::encode(self.0)[..16])
    }
}

/// This node's signing key, kept in `<state_dir>/node-key` (mode 0600, the 32-byte seed as
/// hex). Made once, on the first formation.
pub struct Identity {
    key: ed25519_dalek::SigningKey,
}

impl Identity {
    pub const FILE: &'static str = "node-key";

    pub fn generate() -> Identity {
        let seed: [u8; 32] = rand::random();
        Identity {
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }
    /// Loads `<dir>/node-key`, or makes and stores a new one.
    pub fn load_or_create(dir: &Path) -> Result<Identity, crate::Error> {
        let path = dir.join(Self::FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut seed = zeroize::Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(text.trim(), &mut seed[..]).map_err(|e| {
                    crate::Error::State {
                        path: path.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                    }
                })?;
                Ok(Identity {
                    key: ed25519_dalek::SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate();
                let text = zeroize::Zeroizing::new(hex::encode(id.key.to_bytes()));
                clutch_os::fs::write_atomic(&path, text.as_bytes(), 0o600).map_err(|e| {
                    crate::Error::State {
                        path: path.clone(),
                        source: e.into(),
                    }
                })?;
                Ok(id)
            }
            Err(source) => Err(crate::Error::State { path, source }),
        }
    }
    pub fn public(&self) -> NodeKey {
        NodeKey(self.key.verifying_key().to_bytes())
    }
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.key.sign(msg).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({:?})", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_key_is_public_and_covers_what_quorum_depends_on() {
        let a = ClusterKey::new("lab", "etcd", 3, 3);
        assert_eq!(a.as_str().len(), 32);
        assert_eq!(a, ClusterKey::new("lab", "etcd", 3, 3));
        for other in [
            ClusterKey::new("lab2", "etcd", 3, 3),
            ClusterKey::new("lab", "k3s", 3, 3),
            ClusterKey::new("lab", "etcd", 5, 3),
            ClusterKey::new("lab", "etcd", 3, 1),
        ] {
            assert_ne!(a, other);
        }
        // Length-prefixed: moving text between fields changes the key.
        assert_ne!(
            ClusterKey::new("ab", "c", 1, 1),
            ClusterKey::new("a", "bc", 1, 1)
        );
        assert!(ClusterKey::try_from("xyz".to_string()).is_err());
        assert_eq!(ClusterKey::try_from(a.to_string()).unwrap(), a);
    }

    #[test]
    fn node_ids_validate_and_order() {
        assert!("".parse::<NodeId>().is_err());
        assert!("ABC".parse::<NodeId>().is_err());
        assert!("a\nb".parse::<NodeId>().is_err());
        let a: NodeId = "0a1".parse().unwrap();
        let b: NodeId = "0b0".parse().unwrap();
        assert!(a < b);
        let g = NodeId::generate();
        assert_eq!(g.as_str().len(), 16);
        assert_ne!(g, NodeId::generate());
    }

    #[test]
    fn identity_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(d.path()).unwrap();
        let b = Identity::load_or_create(d.path()).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(Identity::FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let sig = a.sign(b"m");
        let vk = a.public().verifying_key().unwrap();
        assert!(
            vk.verify_strict(b"m", &ed25519_dalek::Signature::from_bytes(&sig))
                .is_ok()
        );
        let k: NodeKey =
            serde_json::from_str(&serde_json::to_string(&a.public()).unwrap()).unwrap();
        assert_eq!(k, a.public());
    }
}
