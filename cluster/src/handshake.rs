//! The handshake between two nodes (pure, no I/O): a password-authenticated key exchange
//! (SPAKE2 over Ed25519, the RustCrypto `spake2` crate) keyed by the cluster token, then key
//! confirmation and a signature by each node's long-term key.
//!
//! Flow on one TCP connection (client C dialled server S):
//! 1. C → S `ClientHello{cluster, node_id, node_key, to}` (`to`: the address C dialled)
//! 2. S → C `ServerHello{cluster, node_id, node_key, pake: SPAKE2 B}`
//! 3. C → S `ClientFinish{pake: SPAKE2 A, confirm, sig}`
//! 4. S → C `ServerFinish{confirm, sig}`, only after C's confirmation verified.
//!
//! What this gives:
//! - Nothing on the wire lets anyone test token guesses offline: SPAKE2's messages are
//!   blinded group elements, and the confirmations are MACs under a key that only the
//!   token (with one side's secret exponent) yields. An active stranger gets one guess per
//!   connection, which the server's rate limiter bounds.
//! - The SPAKE2 identities bind the protocol version, the public cluster key, both node ids,
//!   both node keys and the address the client dialled, so a relay that re-advertises a
//!   node's address, or rewrites who is who, gets a different key and fails confirmation.
//! - Each side signs the transcript with its node key: a node id, once seen, is held by the
//!   same key ever after ([`crate::runtime`] pins it), so a token holder cannot pose as
//!   another member.
//! - The session keys (one per direction) come from HKDF over the SPAKE2 key and the
//!   transcript; [`crate::session`] encrypts everything after the handshake with them.

use std::net::SocketAddr;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity as PakeId, Password, Spake2};
use zeroize::Zeroizing;

use crate::id::{ClusterKey, Identity, NodeId, NodeKey};

type HmacSha256 = Hmac<Sha256>;

/// 3: SPAKE2 and encrypted sessions (1 and 2 were HMAC challenge-response, now refused).
pub const PROTOCOL_VERSION: u32 = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientHello {
    pub v: u32,
    pub cluster: ClusterKey,
    pub node_id: NodeId,
    pub node_key: NodeKey,
    /// The server address the client dialled.
    pub to: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerHello {
    pub v: u32,
    pub cluster: ClusterKey,
    pub node_id: NodeId,
    pub node_key: NodeKey,
    /// SPAKE2 message of side B, hex.
    pub pake: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFinish {
    /// SPAKE2 message of side A, hex.
    pub pake: String,
    pub confirm: String,
    pub sig: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFinish {
    pub confirm: String,
    pub sig: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("protocol version {0} not supported (this node speaks {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("peer belongs to another cluster configuration ({0})")]
    ForeignCluster(ClusterKey),
    #[error("peer claims our own node id")]
    OwnId,
    #[error("peer dialled {dialled}, but this end is {local} (relayed connection?)")]
    WrongAddress {
        dialled: SocketAddr,
        local: SocketAddr,
    },
    #[error("malformed key exchange message")]
    Pake,
    #[error("key confirmation failed (wrong token, or a relayed or altered handshake)")]
    BadConfirm,
    #[error("node key signature does not verify")]
    BadSignature,
}

/// What a node authenticates with.
pub struct Credentials<'a> {
    pub token: &'a [u8],
    pub cluster: &'a ClusterKey,
    pub me: &'a NodeId,
    pub identity: &'a Identity,
}

/// Keys of one established session.
pub struct SessionKeys {
    pub send: Zeroizing<[u8; 32]>,
    pub recv: Zeroizing<[u8; 32]>,
}

/// The outcome of a handshake: who the peer is, and the session keys.
pub struct Established {
    pub peer: NodeId,
    pub peer_key: NodeKey,
    pub keys: SessionKeys,
}

fn lp(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u32).to_be_bytes());
    h.update(part);
}

fn id_a(h: &ClientHello) -> Vec<u8> {
    format!(
        "clutch-v{}\0{}\0{}\0{}\0{}",
        h.v, h.cluster, h.node_id, h.to, h.node_key
    )
    .into_bytes()
}

fn id_b(h: &ServerHello) -> Vec<u8> {
    format!(
        "clutch-v{}\0{}\0{}\0{}",
        h.v, h.cluster, h.node_id, h.node_key
    )
    .into_bytes()
}

fn transcript(c: &ClientHello, s: &ServerHello, msg_a: &[u8], msg_b: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        b"clutch-handshake-v3".as_slice(),
        &id_a(c),
        &id_b(s),
        msg_a,
        msg_b,
    ] {
        lp(&mut h, part);
    }
    h.finalize().into()
}

struct Schedule {
    confirm_c: Zeroizing<[u8; 32]>,
    confirm_s: Zeroizing<[u8; 32]>,
    c2s: Zeroizing<[u8; 32]>,
    s2c: Zeroizing<[u8; 32]>,
}

fn schedule(k: &[u8], t: &[u8; 32]) -> Schedule {
    let hk = Hkdf::<Sha256>::new(Some(t), k);
    let get = |label: &[u8]| {
        let mut out = Zeroizing::new([0u8; 32]);
        hk.expand(label, &mut out[..])
            .expect("32 bytes is a valid HKDF-SHA256 length");
        out
    };
    Schedule {
        confirm_c: get(b"clutch-v3 confirm client"),
        confirm_s: get(b"clutch-v3 confirm server"),
        c2s: get(b"clutch-v3 key client->server"),
        s2c: get(b"clutch-v3 key server->client"),
    }
}

fn confirm(key: &[u8; 32], t: &[u8; 32]) -> String {
    let mut m = HmacSha256::new_from_slice(key).expect("hmac takes any key");
    m.update(t);
    hex::encode(m.finalize().into_bytes())
}

fn verify_confirm(key: &[u8; 32], t: &[u8; 32], got: &str) -> Result<(), HandshakeError> {
    let got = hex::decode(got).map_err(|_| HandshakeError::BadConfirm)?;
    let mut m = HmacSha256::new_from_slice(key).expect("hmac takes any key");
    m.update(t);
    m.verify_slice(&got).map_err(|_| HandshakeError::BadConfirm)
}

fn sig_msg(side: &str, t: &[u8; 32]) -> Vec<u8> {
    let mut m = format!("clutch-v3 node signature {side}\0").into_bytes();
    m.extend_from_slice(t);
    m
}

fn verify_sig(key: &NodeKey, side: &str, t: &[u8; 32], sig: &str) -> Result<(), HandshakeError> {
    let vk = key.verifying_key().ok_or(HandshakeError::BadSignature)?;
    let mut raw = [0u8; 64];
    hex::decode_to_slice(sig, &mut raw).map_err(|_| HandshakeError::BadSignature)?;
    vk.verify_strict(
        &sig_msg(side, t),
        &ed25519_dalek::Signature::from_bytes(&raw),
    )
    .map_err(|_| HandshakeError::BadSignature)
}

fn check_peer(
    v: u32,
    cluster: &ClusterKey,
    peer: &NodeId,
    creds: &Credentials<'_>,
) -> Result<(), HandshakeError> {
    if v != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(v));
    }
    if cluster != creds.cluster {
        return Err(HandshakeError::ForeignCluster(cluster.clone()));
    }
    if peer == creds.me {
        return Err(HandshakeError::OwnId);
    }
    Ok(())
}

/// The side that opened the connection.
pub struct Client<'a> {
    creds: Credentials<'a>,
    hello: ClientHello,
}

pub struct ClientAwaiting {
    t: [u8; 32],
    sched: Schedule,
    peer: NodeId,
    peer_key: NodeKey,
}

impl<'a> Client<'a> {
    /// `to`: the server address being dialled (bound into the handshake: relaying fails).
    pub fn new(creds: Credentials<'a>, to: SocketAddr) -> Self {
        let hello = ClientHello {
            v: PROTOCOL_VERSION,
            cluster: creds.cluster.clone(),
            node_id: creds.me.clone(),
            node_key: creds.identity.public(),
            to,
        };
        Client { creds, hello }
    }
    pub fn hello(&self) -> &ClientHello {
        &self.hello
    }
    /// The server's hello arrived: finish the key exchange, confirm and sign.
    pub fn on_server_hello(
        self,
        s: &ServerHello,
    ) -> Result<(ClientAwaiting, ClientFinish), HandshakeError> {
        check_peer(s.v, &s.cluster, &s.node_id, &self.creds)?;
        let msg_b = hex::decode(&s.pake).map_err(|_| HandshakeError::Pake)?;
        let (state, msg_a) = Spake2::<Ed25519Group>::start_a(
            &Password::new(self.creds.token),
            &PakeId::new(&id_a(&self.hello)),
            &PakeId::new(&id_b(s)),
        );
        let k = Zeroizing::new(state.finish(&msg_b).map_err(|_| HandshakeError::Pake)?);
        let t = transcript(&self.hello, s, &msg_a, &msg_b);
        let sched = schedule(&k, &t);
        let fin = ClientFinish {
            pake: hex::encode(&msg_a),
            confirm: confirm(&sched.confirm_c, &t),
            sig: hex::encode(self.creds.identity.sign(&sig_msg("client", &t))),
        };
        Ok((
            ClientAwaiting {
                t,
                sched,
                peer: s.node_id.clone(),
                peer_key: s.node_key,
            },
            fin,
        ))
    }
}

impl ClientAwaiting {
    pub fn on_server_finish(self, f: &ServerFinish) -> Result<Established, HandshakeError> {
        verify_confirm(&self.sched.confirm_s, &self.t, &f.confirm)?;
        verify_sig(&self.peer_key, "server", &self.t, &f.sig)?;
        Ok(Established {
            peer: self.peer,
            peer_key: self.peer_key,
            keys: SessionKeys {
                send: self.sched.c2s,
                recv: self.sched.s2c,
            },
        })
    }
}

/// The side that accepted the connection.
pub struct Server<'a> {
    creds: Credentials<'a>,
    /// This end of the accepted connection (the address the client must have dialled).
    local: SocketAddr,
}

pub struct ServerAwaiting {
    client: ClientHello,
    hello: ServerHello,
    state: Spake2<Ed25519Group>,
    msg_b: Vec<u8>,
}

impl<'a> Server<'a> {
    pub fn new(creds: Credentials<'a>, local: SocketAddr) -> Self {
        Server { creds, local }
    }
    pub fn on_client_hello(
        self,
        c: &ClientHello,
    ) -> Result<(ServerAwaiting, ServerHello), HandshakeError> {
        check_peer(c.v, &c.cluster, &c.node_id, &self.creds)?;
        if c.to != self.local {
            return Err(HandshakeError::WrongAddress {
                dialled: c.to,
                local: self.local,
            });
        }
        let mut hello = ServerHello {
            v: PROTOCOL_VERSION,
            cluster: self.creds.cluster.clone(),
            node_id: self.creds.me.clone(),
            node_key: self.creds.identity.public(),
            pake: String::new(),
        };
        let (state, msg_b) = Spake2::<Ed25519Group>::start_b(
            &Password::new(self.creds.token),
            &PakeId::new(&id_a(c)),
            &PakeId::new(&id_b(&hello)),
        );
        hello.pake = hex::encode(&msg_b);
        Ok((
            ServerAwaiting {
                client: c.clone(),
                hello: hello.clone(),
                state,
                msg_b,
            },
            hello,
        ))
    }
}

impl ServerAwaiting {
    pub fn peer(&self) -> &NodeId {
        &self.client.node_id
    }
    /// The client's confirmation arrived: verify it (a wrong token fails here, and the
    /// server then proves nothing back), then confirm and sign.
    pub fn on_client_finish(
        self,
        f: &ClientFinish,
        identity: &Identity,
    ) -> Result<(Established, ServerFinish), HandshakeError> {
        let msg_a = hex::decode(&f.pake).map_err(|_| HandshakeError::Pake)?;
        let k = Zeroizing::new(
            self.state
                .finish(&msg_a)
                .map_err(|_| HandshakeError::Pake)?,
        );
        let t = transcript(&self.client, &self.hello, &msg_a, &self.msg_b);
        let sched = schedule(&k, &t);
        verify_confirm(&sched.confirm_c, &t, &f.confirm)?;
        verify_sig(&self.client.node_key, "client", &t, &f.sig)?;
        let fin = ServerFinish {
            confirm: confirm(&sched.confirm_s, &t),
            sig: hex::encode(identity.sign(&sig_msg("server", &t))),
        };
        Ok((
            Established {
                peer: self.client.node_id,
                peer_key: self.client.node_key,
                keys: SessionKeys {
                    send: sched.s2c,
                    recv: sched.c2s,
                },
            },
            fin,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef-token";
    const AT: &str = "10.0.0.2:7373";

    struct Side {
        id: NodeId,
        ident: Identity,
        cluster: ClusterKey,
    }

    fn side(id: &str) -> Side {
        Side {
            id: id.parse().unwrap(),
            ident: Identity::generate(),
            cluster: ClusterKey::new("lab", "etcd", 3, 3),
        }
    }

    fn creds<'a>(s: &'a Side, token: &'a [u8]) -> Credentials<'a> {
        Credentials {
            token,
            cluster: &s.cluster,
            me: &s.id,
            identity: &s.ident,
        }
    }

    type ServerSide = Result<(Established, ServerFinish), HandshakeError>;
    type ClientSide = Option<Result<Established, HandshakeError>>;

    /// A full handshake; the server's result, then the client's.
    fn run(c: &Side, s: &Side, tc: &[u8], ts: &[u8]) -> (ServerSide, ClientSide) {
        let at: SocketAddr = AT.parse().unwrap();
        let client = Client::new(creds(c, tc), at);
        let server = Server::new(creds(s, ts), at);
        let (sw, sh) = server.on_client_hello(client.hello()).unwrap();
        let (cw, cf) = client.on_server_hello(&sh).unwrap();
        match sw.on_client_finish(&cf, &s.ident) {
            Ok((se, sf)) => {
                let ce = cw.on_server_finish(&sf);
                (Ok((se, sf)), Some(ce))
            }
            Err(e) => (Err(e), None),
        }
    }

    #[test]
    fn same_token_gives_both_sides_the_same_keys_and_identities() {
        let (c, s) = (side("aaa"), side("bbb"));
        let (sr, cr) = run(&c, &s, TOKEN, TOKEN);
        let (se, _) = sr.unwrap();
        let ce = cr.unwrap().unwrap();
        assert_eq!(se.peer, c.id);
        assert_eq!(se.peer_key, c.ident.public());
        assert_eq!(ce.peer, s.id);
        assert_eq!(ce.peer_key, s.ident.public());
        assert_eq!(*ce.keys.send, *se.keys.recv);
        assert_eq!(*ce.keys.recv, *se.keys.send);
        assert_ne!(*ce.keys.send, *ce.keys.recv);
    }

    #[test]
    fn wrong_token_fails_at_the_server_which_then_proves_nothing() {
        let (c, s) = (side("aaa"), side("bbb"));
        let (sr, cr) = run(&c, &s, b"another-token-that-is-long-enough-000", TOKEN);
        assert_eq!(sr.err(), Some(HandshakeError::BadConfirm));
        assert!(cr.is_none());
    }

    #[test]
    fn fresh_handshakes_never_repeat_a_message() {
        // Both sides' key-exchange messages are fresh per connection: a recording of one
        // handshake is useless on another.
        let (c, s) = (side("aaa"), side("bbb"));
        let at: SocketAddr = AT.parse().unwrap();
        let server1 = Server::new(creds(&s, TOKEN), at);
        let server2 = Server::new(creds(&s, TOKEN), at);
        let client = Client::new(creds(&c, TOKEN), at);
        let (_, h1) = server1.on_client_hello(client.hello()).unwrap();
        let (w2, h2) = server2.on_client_hello(client.hello()).unwrap();
        assert_ne!(h1.pake, h2.pake);
        // A finish made against server1's hello fails against server2.
        let (_, f1) = client.on_server_hello(&h1).unwrap();
        assert_eq!(
            w2.on_client_finish(&f1, &s.ident).err(),
            Some(HandshakeError::BadConfirm)
        );
    }

    #[test]
    fn relayed_or_rewritten_handshakes_fail() {
        let (c, s) = (side("aaa"), side("bbb"));
        let relay: SocketAddr = "10.0.0.66:7373".parse().unwrap();
        let real: SocketAddr = AT.parse().unwrap();
        let client = Client::new(creds(&c, TOKEN), relay);
        // The real server refuses a hello addressed to another end.
        assert_eq!(
            Server::new(creds(&s, TOKEN), real)
                .on_client_hello(client.hello())
                .err(),
            Some(HandshakeError::WrongAddress {
                dialled: relay,
                local: real
            })
        );
        // The relay rewrites `to`: the server answers, but the client's exchange is bound to
        // the address it dialled, so confirmation fails.
        let mut h = client.hello().clone();
        h.to = real;
        let (sw, sh) = Server::new(creds(&s, TOKEN), real)
            .on_client_hello(&h)
            .unwrap();
        let (_, cf) = client.on_server_hello(&sh).unwrap();
        assert_eq!(
            sw.on_client_finish(&cf, &s.ident).err(),
            Some(HandshakeError::BadConfirm)
        );
    }

    #[test]
    fn a_token_holder_cannot_use_another_nodes_key() {
        // Mallory knows the token and claims node id `aaa` with aaa's public key, but signs
        // with her own key.
        let (c, s, mallory) = (side("aaa"), side("bbb"), side("aaa"));
        let at: SocketAddr = AT.parse().unwrap();
        let client = Client::new(creds(&mallory, TOKEN), at);
        let mut h = client.hello().clone();
        h.node_key = c.ident.public();
        let (sw, sh) = Server::new(creds(&s, TOKEN), at)
            .on_client_hello(&h)
            .unwrap();
        // Mallory must use the claimed key in her own exchange or confirmation fails;
        // either way the signature by the real key is missing.
        let (_, cf) = client.on_server_hello(&sh).unwrap();
        assert!(sw.on_client_finish(&cf, &s.ident).is_err());
    }

    #[test]
    fn hello_checks() {
        let (c, s) = (side("aaa"), side("bbb"));
        let at: SocketAddr = AT.parse().unwrap();
        let mut h = Client::new(creds(&c, TOKEN), at).hello().clone();
        h.cluster = ClusterKey::new("lab", "etcd", 5, 3);
        assert!(matches!(
            Server::new(creds(&s, TOKEN), at).on_client_hello(&h),
            Err(HandshakeError::ForeignCluster(_))
        ));
        h.cluster = s.cluster.clone();
        h.node_id = s.id.clone();
        assert_eq!(
            Server::new(creds(&s, TOKEN), at).on_client_hello(&h).err(),
            Some(HandshakeError::OwnId)
        );
        h.node_id = c.id.clone();
        h.v = 2;
        assert_eq!(
            Server::new(creds(&s, TOKEN), at).on_client_hello(&h).err(),
            Some(HandshakeError::Version(2))
        );
    }
}
