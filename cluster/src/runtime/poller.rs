//! The peer poller: for every peer of our cluster key (from mDNS, and seeds) one watcher
//! keeps an authenticated session open and asks for the peer's status every poll
//! interval, keeping the table of authenticated peers fresh and taking in evidence of a
//! cluster (a plan that lists us, a cluster instance) durably.
//!
//! Sessions are kept, not re-made per poll: a handshake costs a few elliptic-curve
//! operations, which a Raspberry Pi should not spend every second per peer.
//!
//! Bounded: at most [`MAX_WATCHERS`] targets are watched, and a target that does not
//! answer is dialled less and less often (up to every [`MAX_BACKOFF`]), so a LAN full of
//! fake adverts costs little.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::{AuthedPeer, Shared};
use crate::election::Backoff;
use crate::id::{NodeId, Phase};
use crate::session::Channel;
use crate::wire::{PeerStatus, Request, Response, WireError};

const MAX_WATCHERS: usize = 64;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Candidate addresses of peers of our cluster (mDNS + seeds).
fn poll_targets(sh: &Shared) -> Vec<Vec<SocketAddr>> {
    let mut v: Vec<Vec<SocketAddr>> = sh
        .peers
        .lock()
        .unwrap()
        .values()
        .filter(|d| &d.node_id != sh.me())
        .map(|d| {
            d.addrs
                .iter()
                .map(|a| SocketAddr::new(*a, d.port))
                .collect()
        })
        .collect();
    v.extend(sh.cfg.seeds.iter().map(|s| vec![*s]));
    v.sort();
    v.dedup();
    v
}

async fn status_over(sh: &Shared, ch: &mut Channel<TcpStream>) -> Result<PeerStatus, WireError> {
    ch.send(&Request::Status).await?;
    match ch.recv(sh.cfg.peer_timeout).await? {
        Response::Status(s) if &s.node_id == ch.peer() => Ok(*s),
        _ => Err(WireError::Unexpected),
    }
}

/// Takes in what a peer's status tells: a plan that lists us, a cluster instance of a
/// ready member, a newer member list of our cluster.
fn learn(sh: &Shared, s: &PeerStatus) {
    let (adopt_plan, adopt_cluster) = {
        let st = sh.st.lock().unwrap();
        let d = &st.durable;
        let plan = s
            .bootstrap
            .as_ref()
            .filter(|b| d.bootstrap.is_none() && d.cluster.is_none() && b.member(sh.me()).is_some())
            .cloned();
        let cluster = s
            .cluster
            .as_ref()
            .filter(|_| d.cluster.is_none() && plan.is_none() && s.phase == Phase::Ready)
            .cloned();
        (plan, cluster)
    };
    if let Some(plan) = adopt_plan {
        tracing::info!(leader = %plan.leader, instance = %plan.instance, "listed in a bootstrap plan; keeping it");
        let r = sh.update_durable(|d| {
            d.cluster = Some(plan.instance.clone());
            d.bootstrap = Some(plan);
        });
        if let Err(e) = r {
            tracing::error!("{e}");
        }
    } else if let Some(i) = adopt_cluster {
        tracing::info!(instance = %i, peer = %s.node_id, "a cluster exists; this node will join it");
        if let Err(e) = sh.update_durable(|d| d.cluster = Some(i)) {
            tracing::error!("{e}");
        }
    }
    let mut st = sh.st.lock().unwrap();
    if s.phase == Phase::Ready
        && st.phase == Phase::Ready
        && s.cluster.is_some()
        && s.cluster == st.durable.cluster
        && s.members.epoch > st.members.epoch
    {
        for m in &s.members.members {
            st.pinned.entry(m.node_id.clone()).or_insert(m.key);
        }
        st.members = s.members.clone();
    }
}

/// Watches one target for as long as it is listed: a session, a status every interval,
/// a new session (after a growing pause) when it breaks.
async fn watch(sh: Arc<Shared>, addrs: Vec<SocketAddr>) {
    let mut backoff = Backoff::new(sh.cfg.poll_interval, MAX_BACKOFF);
    loop {
        for addr in &addrs {
            let mut ch = match sh.connect(*addr).await {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::debug!(%addr, "poll failed: {e}");
                    continue;
                }
            };
            backoff.reset();
            loop {
                match status_over(&sh, &mut ch).await {
                    Ok(s) => {
                        learn(&sh, &s);
                        sh.st.lock().unwrap().authed.insert(
                            s.node_id.clone(),
                            AuthedPeer {
                                status: s,
                                addr: *addr,
                                last_ok: Instant::now(),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::debug!(%addr, "session ended: {e}");
                        break;
                    }
                }
                tokio::time::sleep(sh.cfg.poll_interval).await;
            }
        }
        tokio::time::sleep(backoff.next_delay(rand::random())).await;
    }
}

/// Watchers by target; aborted with the poller.
#[derive(Default)]
struct Watchers(BTreeMap<Vec<SocketAddr>, JoinHandle<()>>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

pub(crate) async fn poller(sh: Arc<Shared>) {
    let mut members_epoch = 0;
    let mut watchers = Watchers::default();
    loop {
        let targets = poll_targets(&sh);
        watchers.0.retain(|k, h| {
            let keep = targets.contains(k) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for t in targets {
            if watchers.0.len() >= MAX_WATCHERS {
                break;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = watchers.0.entry(t) {
                let h = tokio::spawn(watch(sh.clone(), e.key().clone()));
                e.insert(h);
            }
        }
        let changed = {
            let mut st = sh.st.lock().unwrap();
            let timeout = sh.cfg.peer_timeout;
            st.authed.retain(|_, p| p.last_ok.elapsed() < timeout);
            let changed = st.members.epoch != members_epoch;
            members_epoch = st.members.epoch;
            changed && st.phase == Phase::Ready
        };
        if changed {
            sh.persist();
        }
        sh.report();
        tokio::time::sleep(sh.cfg.poll_interval).await;
    }
}

/// The ids of authenticated peers (for releases).
pub(crate) fn authed_ids(sh: &Shared) -> Vec<(NodeId, SocketAddr)> {
    sh.st
        .lock()
        .unwrap()
        .authed
        .iter()
        .map(|(id, p)| (id.clone(), p.addr))
        .collect()
}
