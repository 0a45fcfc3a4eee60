//! Framing (u32 big-endian length + JSON) and the membership messages carried over an
//! authenticated session.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{self, AuthError, Hello, Initiator, Proof, Sealed, Session};
use crate::id::{NodeId, Phase, Role};

pub const MAX_FRAME: usize = 256 * 1024;
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("unexpected reply")]
    Unexpected,
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    if bytes.len() > MAX_FRAME {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let fut = async {
        w.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
        w.write_all(bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| WireError::Timeout)??;
    Ok(())
}

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Vec<u8>, WireError> {
    let fut = async {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).await?;
        Ok(buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| WireError::Timeout)?
}

pub async fn send_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> Result<(), WireError> {
    write_frame(w, &serde_json::to_vec(v)?).await
}

pub async fn recv_json<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, WireError> {
    Ok(serde_json::from_slice(&read_frame(r, IO_TIMEOUT).await?)?)
}

/// A member of the formed cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub node_id: NodeId,
    pub hostname: String,
    pub role: Role,
    pub addr: Option<IpAddr>,
}

/// Versioned member list, owned by the admitting servers; nodes adopt the highest epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    pub epoch: u64,
    pub members: Vec<MemberInfo>,
}

impl MemberList {
    pub fn servers(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.role == Role::Server)
            .count()
    }
    pub fn upsert(&mut self, m: MemberInfo) {
        self.members.retain(|x| x.node_id != m.node_id);
        self.members.push(m);
        self.members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        self.epoch += 1;
    }
    /// Remove members with this hostname but another node id (a replaced node).
    pub fn remove_stale(&mut self, hostname: &str, keep: &NodeId) -> Vec<MemberInfo> {
        let (stale, keepers): (Vec<_>, Vec<_>) = self
            .members
            .drain(..)
            .partition(|m| m.hostname == hostname && &m.node_id != keep);
        self.members = keepers;
        if !stale.is_empty() {
            self.epoch += 1;
        }
        stale
    }
}

/// A node's status as told to authenticated peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub hostname: String,
    pub phase: Phase,
    pub role: Role,
    pub cluster_exists: bool,
    pub leader: Option<NodeId>,
    pub members: MemberList,
}

/// Engine-specific data a joiner needs (e.g. etcd's initial-cluster string, k3s server URL
/// and token). Travels only over authenticated sessions.
pub type JoinInfo = BTreeMap<String, String>;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Request {
    Status,
    Vote { candidate: NodeId },
    Join { hostname: String, addr: IpAddr },
    JoinDone { ok: bool, error: Option<String> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Response {
    Status(PeerStatus),
    Vote {
        granted: bool,
        reason: String,
    },
    Admitted {
        role: Role,
        info: JoinInfo,
        leader: NodeId,
        members: MemberList,
    },
    Busy {
        retry: bool,
        why: String,
    },
    Ack,
    Error {
        why: String,
    },
}

/// A connected stream that knows which address it dialled; the initiator binds it into
/// the handshake (see [`crate::auth`]) so the handshake cannot be relayed.
pub trait Dialled {
    fn dialled(&self) -> std::io::Result<SocketAddr>;
}

impl Dialled for tokio::net::TcpStream {
    fn dialled(&self) -> std::io::Result<SocketAddr> {
        self.peer_addr()
    }
}

/// Client side of a session.
pub struct Client<S> {
    stream: S,
    session: Session,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Dialled> Client<S> {
    /// Run the initiator handshake on `stream`.
    pub async fn handshake(
        mut stream: S,
        token: &str,
        cluster_id: &str,
        me: &NodeId,
    ) -> Result<Self, WireError> {
        let to = stream.dialled()?;
        let init = Initiator::new(token, cluster_id, me.clone(), auth::fresh_nonce()).dialing(to);
        send_json(&mut stream, init.hello()).await?;
        let rh: Hello = recv_json(&mut stream).await?;
        let (awaiting, proof) = init.on_hello(&rh)?;
        send_json(&mut stream, &proof).await?;
        let rp: Proof = recv_json(&mut stream).await?;
        let session = awaiting.on_proof(&rp)?;
        Ok(Client { stream, session })
    }
    pub fn peer(&self) -> &NodeId {
        self.session.peer()
    }
    pub async fn request(&mut self, req: &Request) -> Result<Response, WireError> {
        let sealed = self.session.seal(serde_json::to_string(req)?);
        send_json(&mut self.stream, &sealed).await?;
        let reply: Sealed =
            serde_json::from_slice(&read_frame(&mut self.stream, Duration::from_secs(120)).await?)?;
        let body = self.session.open(&reply)?;
        Ok(serde_json::from_str(&body)?)
    }
}
