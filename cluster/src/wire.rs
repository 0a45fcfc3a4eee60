//! What crosses the wire: framing (u32 big-endian length + body), the handshake run over a
//! stream, and the membership messages carried, encrypted, over an established session.
//!
//! Everything a peer sends is typed: node ids, host names, addresses and keys are parsed
//! into their validated types when the message is read, so a malformed value ends the
//! session instead of reaching a file or a command line.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clutch_config::Hostname;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::engine::JoinInfo;
use crate::handshake::{self, ClientFinish, ClientHello, Credentials, HandshakeError};
use crate::handshake::{ServerFinish, ServerHello};
use crate::id::{InstanceId, NodeId, NodeKey, Phase, Role};
use crate::session::{Channel, Session};

/// Largest frame inside a session.
pub const MAX_FRAME: usize = 256 * 1024;
/// Largest frame before authentication (hellos and finishes are a few hundred bytes).
pub const MAX_HANDSHAKE_FRAME: usize = 4096;
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
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("frame does not decrypt (altered, replayed or out of order)")]
    Crypto,
    #[error("session closed")]
    Closed,
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

async fn read_frame_max<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, WireError> {
    let fut = async {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
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

pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Vec<u8>, WireError> {
    read_frame_max(r, timeout, MAX_FRAME).await
}

async fn send_plain<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> Result<(), WireError> {
    write_frame(w, &serde_json::to_vec(v)?).await
}

async fn recv_plain<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, WireError> {
    let f = read_frame_max(r, IO_TIMEOUT, MAX_HANDSHAKE_FRAME).await?;
    Ok(serde_json::from_slice(&f)?)
}

/// Runs the client side of the handshake on `stream`, which dialled `to`.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    creds: Credentials<'_>,
    to: SocketAddr,
) -> Result<Channel<S>, WireError> {
    let client = handshake::Client::new(creds, to);
    send_plain(&mut stream, client.hello()).await?;
    let sh: ServerHello = recv_plain(&mut stream).await?;
    let (awaiting, fin) = client.on_server_hello(&sh)?;
    send_plain(&mut stream, &fin).await?;
    let sf: ServerFinish = recv_plain(&mut stream).await?;
    let est = awaiting.on_server_finish(&sf)?;
    Ok(Channel::new(
        stream,
        Session::new(est.peer, est.peer_key, &est.keys),
    ))
}

/// Runs the server side of the handshake on an accepted `stream` whose local end is `local`.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    creds: Credentials<'_>,
    local: SocketAddr,
) -> Result<Channel<S>, WireError> {
    let identity = creds.identity;
    let server = handshake::Server::new(creds, local);
    let ch: ClientHello = recv_plain(&mut stream).await?;
    let (awaiting, sh) = server.on_client_hello(&ch)?;
    send_plain(&mut stream, &sh).await?;
    let cf: ClientFinish = recv_plain(&mut stream).await?;
    let (est, fin) = awaiting.on_client_finish(&cf, identity)?;
    send_plain(&mut stream, &fin).await?;
    Ok(Channel::new(
        stream,
        Session::new(est.peer, est.peer_key, &est.keys),
    ))
}

/// A member of the formed cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberInfo {
    pub node_id: NodeId,
    pub hostname: Hostname,
    pub role: Role,
    pub addr: IpAddr,
    /// The node key that authenticated it (see [`crate::handshake`]).
    pub key: NodeKey,
}

/// Versioned member list, owned by the admitting servers; nodes adopt the highest epoch of
/// their own cluster instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub fn get(&self, id: &NodeId) -> Option<&MemberInfo> {
        self.members.iter().find(|m| &m.node_id == id)
    }
    pub fn upsert(&mut self, m: MemberInfo) {
        self.members.retain(|x| x.node_id != m.node_id);
        self.members.push(m);
        self.members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        self.epoch += 1;
    }
    /// Members with this host name but another node id (a replaced node).
    pub fn same_hostname(&self, hostname: &Hostname, keep: &NodeId) -> Vec<MemberInfo> {
        self.members
            .iter()
            .filter(|m| &m.hostname == hostname && &m.node_id != keep)
            .cloned()
            .collect()
    }
    pub fn remove(&mut self, ids: &[NodeId]) {
        let before = self.members.len();
        self.members.retain(|m| !ids.contains(&m.node_id));
        if self.members.len() != before {
            self.epoch += 1;
        }
    }
}

/// The static bootstrap plan: published once by the elected node, never changed. Every
/// listed member whose engine starts from the plan starts with the same initial member set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub instance: InstanceId,
    pub leader: NodeId,
    pub members: Vec<MemberInfo>,
}

impl Bootstrap {
    pub fn member(&self, id: &NodeId) -> Option<&MemberInfo> {
        self.members.iter().find(|m| &m.node_id == id)
    }
    pub fn servers(&self) -> impl Iterator<Item = &MemberInfo> {
        self.members.iter().filter(|m| m.role == Role::Server)
    }
}

/// A node's status as told to authenticated peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub hostname: Hostname,
    pub phase: Phase,
    pub role: Role,
    /// The cluster this node is in, or knows it is listed in (durable evidence).
    pub cluster: Option<InstanceId>,
    pub leader: Option<NodeId>,
    pub members: MemberList,
    pub bootstrap: Option<Bootstrap>,
    /// The candidate this node has promised its bootstrap vote to, if any.
    pub vote: Option<NodeId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// The session's peer asks for this node's bootstrap vote (for itself).
    Vote,
    /// The session's peer gives up its candidacy: votes promised to it are free again.
    Release,
    /// A member listed in the bootstrap plan asks for what it needs to start.
    Enroll {
        csr: Option<String>,
    },
    /// A node that is not in the plan asks to be admitted to the running cluster.
    Join {
        hostname: Hostname,
        addr: IpAddr,
        csr: Option<String>,
    },
    JoinDone {
        ok: bool,
        error: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Status(Box<PeerStatus>),
    Vote {
        granted: bool,
        reason: String,
    },
    Admitted {
        role: Role,
        info: Box<JoinInfo>,
        leader: NodeId,
        members: MemberList,
    },
    Busy {
        why: String,
    },
    Ack,
    Error {
        why: String,
    },
}

/// Time a request may take to be answered (admissions run the engine: `etcdctl member
/// add`, certificate signing).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a request the peer answers from memory (status, vote, release) may take: one
/// sent into a link that went dark must fail in time for the next election round, not
/// wait out TCP's retransmissions.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(10);

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// Sends a request and waits for its response.
    pub async fn request(&mut self, req: &Request) -> Result<Response, WireError> {
        self.request_within(req, REQUEST_TIMEOUT).await
    }

    /// Sends a request and waits at most `timeout` for its response.
    pub async fn request_within(
        &mut self,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, WireError> {
        self.send(req).await?;
        self.recv(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ClusterKey, Identity};

    #[tokio::test]
    async fn handshake_then_encrypted_requests_over_a_stream() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let cluster = ClusterKey::new("lab", "none", 1, 1);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        let (na, nb): (NodeId, NodeId) = ("aa".parse().unwrap(), "bb".parse().unwrap());
        let at: SocketAddr = "10.0.0.1:7373".parse().unwrap();
        let token = b"t0123456789abcdef0123456789abcdef".to_vec();
        let (t2, c2, ib_pub) = (token.clone(), cluster.clone(), ib.public());
        let server = tokio::spawn(async move {
            let mut ch = server_handshake(
                b,
                Credentials {
                    token: &t2,
                    cluster: &c2,
                    me: &nb,
                    identity: &ib,
                },
                at,
            )
            .await
            .unwrap();
            let r: Request = ch.recv(IO_TIMEOUT).await.unwrap();
            assert!(matches!(r, Request::Status));
            ch.send(&Response::Ack).await.unwrap();
            ch.peer().clone()
        });
        let mut ch = client_handshake(
            a,
            Credentials {
                token: &token,
                cluster: &cluster,
                me: &na,
                identity: &ia,
            },
            at,
        )
        .await
        .unwrap();
        assert_eq!(ch.peer_key(), &ib_pub);
        assert!(matches!(
            ch.request(&Request::Status).await.unwrap(),
            Response::Ack
        ));
        assert_eq!(server.await.unwrap(), "aa".parse::<NodeId>().unwrap());
    }

    #[test]
    fn peer_values_are_validated_when_read() {
        let bad_host = r#"{"t":"join","hostname":"a\nETCD_NAME=x","addr":"10.0.0.1","csr":null}"#;
        assert!(serde_json::from_str::<Request>(bad_host).is_err());
        let dash = r#"{"t":"join","hostname":"--peer-urls","addr":"10.0.0.1","csr":null}"#;
        assert!(serde_json::from_str::<Request>(dash).is_err());
        let ok = r#"{"t":"join","hostname":"node-1","addr":"10.0.0.1","csr":null}"#;
        assert!(serde_json::from_str::<Request>(ok).is_ok());
        let extra = r#"{"t":"join","hostname":"n","addr":"10.0.0.1","csr":null,"x":1}"#;
        assert!(serde_json::from_str::<Request>(extra).is_err());
    }
}
