//! Encrypted sessions: after the handshake, every frame is ChaCha20-Poly1305 under the
//! direction's key from [`crate::handshake`], with a 96-bit nonce made of a per-direction
//! counter. A frame that was altered, replayed, reordered, reflected or cut fails to open and
//! ends the session; the peer learns nothing of the contents (k3s tokens, certificates and
//! keys travel only inside).

use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::handshake::SessionKeys;
use crate::id::{NodeId, NodeKey};
use crate::wire::{self, WireError};

/// One direction of a session.
struct Direction {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        Direction {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            counter: 0,
        }
    }
    fn nonce(&mut self) -> Result<Nonce, WireError> {
        let c = self.counter;
        // 2^64 frames never happen; refuse rather than reuse a nonce.
        self.counter = c.checked_add(1).ok_or(WireError::Closed)?;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&c.to_be_bytes());
        Ok(*Nonce::from_slice(&n))
    }
}

/// The cipher state of an established session (no I/O; see [`Channel`]).
pub struct Session {
    peer: NodeId,
    peer_key: NodeKey,
    send: Direction,
    recv: Direction,
}

impl Session {
    pub fn new(peer: NodeId, peer_key: NodeKey, keys: &SessionKeys) -> Self {
        Session {
            peer,
            peer_key,
            send: Direction::new(&keys.send),
            recv: Direction::new(&keys.recv),
        }
    }
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }
    pub fn peer_key(&self) -> &NodeKey {
        &self.peer_key
    }
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, WireError> {
        let n = self.send.nonce()?;
        self.send
            .cipher
            .encrypt(&n, plaintext)
            .map_err(|_| WireError::Crypto)
    }
    pub fn open(&mut self, frame: &[u8]) -> Result<Vec<u8>, WireError> {
        let n = self.recv.nonce()?;
        self.recv
            .cipher
            .decrypt(&n, frame)
            .map_err(|_| WireError::Crypto)
    }
}

/// A stream with an established [`Session`]: typed messages in, typed messages out.
pub struct Channel<S> {
    stream: S,
    session: Session,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    pub fn new(stream: S, session: Session) -> Self {
        Channel { stream, session }
    }
    pub fn peer(&self) -> &NodeId {
        self.session.peer()
    }
    pub fn peer_key(&self) -> &NodeKey {
        self.session.peer_key()
    }
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(msg)?);
        let frame = self.session.seal(&plain)?;
        wire::write_frame(&mut self.stream, &frame).await
    }
    pub async fn recv<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<T, WireError> {
        let frame = wire::read_frame(&mut self.stream, timeout).await?;
        let plain = zeroize::Zeroizing::new(self.session.open(&frame)?);
        Ok(serde_json::from_slice(&plain)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn pair() -> (Session, Session) {
        let a: [u8; 32] = rand::random();
        let b: [u8; 32] = rand::random();
        let key = crate::id::Identity::generate().public();
        let x = Session::new(
            "x".parse().unwrap(),
            key,
            &SessionKeys {
                send: Zeroizing::new(a),
                recv: Zeroizing::new(b),
            },
        );
        let y = Session::new(
            "y".parse().unwrap(),
            key,
            &SessionKeys {
                send: Zeroizing::new(b),
                recv: Zeroizing::new(a),
            },
        );
        (x, y)
    }

    #[test]
    fn frames_open_once_in_order_and_only_in_their_direction() {
        let (mut x, mut y) = pair();
        let f0 = x.seal(b"hello").unwrap();
        assert!(
            !f0.windows(5).any(|w| w == b"hello"),
            "plaintext on the wire"
        );
        let f1 = x.seal(b"again").unwrap();
        // reordered: f1 first fails (nonce 0 expected)
        let (_, mut y2) = {
            let (a, b) = pair();
            (a, b)
        };
        assert!(y2.open(&f1).is_err());
        assert_eq!(y.open(&f0).unwrap(), b"hello");
        // replayed
        assert!(y.open(&f0).is_err());
        // a failed open still advanced the counter: the session is over, as the runtime
        // treats it (it drops the connection on the first error)
        let (mut x, mut y) = pair();
        let f0 = x.seal(b"a").unwrap();
        // reflected back to its sender
        assert!(x.open(&f0).is_err());
        let mut tampered = f0.clone();
        tampered[0] ^= 1;
        assert!(y.open(&tampered).is_err());
    }

    #[tokio::test]
    async fn channel_carries_typed_messages() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (x, y) = pair();
        let mut ca = Channel::new(a, x);
        let mut cb = Channel::new(b, y);
        ca.send(&serde_json::json!({"k": "v"})).await.unwrap();
        let v: serde_json::Value = cb.recv(Duration::from_secs(1)).await.unwrap();
        assert_eq!(v["k"], "v");
    }
}
