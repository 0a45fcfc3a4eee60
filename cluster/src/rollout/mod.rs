//! Rolling updates without losing the cluster: who may go down for an update, and when.
//!
//! Coordination goes through the store the cluster already runs, never a component of its
//! own: etcd's leases and keys for the etcd engine ([`etcd`]), a Kubernetes Lease (what
//! kured uses) for k3s ([`k3s`]), nothing for engine `none`.
//!
//! The rules:
//! - A voting member (server) updates only while it holds the one voter ticket, and only
//!   when every other voter is healthy enough that the cluster keeps quorum without it. It
//!   keeps the ticket through its reboot, rejoin and commit, and gives it back when it is
//!   `ready` on the new slot (or rolled back). The ticket lives on a lease with a TTL: a
//!   node that dies holding it blocks the fleet for one TTL at most, and the quorum check
//!   still stops a second voter from going down while the dead one is missing.
//! - Agents hold no vote: up to `agent_budget` of them update at once.
//! - A release that fails on a node is marked bad in the store; nobody else tries it.
//!
//! [`acquire`] is the waiting loop over a [`Coordinator`]; the update itself (write the
//! inactive slot, reboot, commit) belongs to the caller.

pub mod etcd;
pub mod k3s;

use std::time::{Duration, Instant};

use clutch_config::{Hostname, Release};
use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Role};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{command}: {detail}")]
    Command { command: String, detail: String },
    #[error("unexpected answer from {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    #[error("the ticket for release {release} is gone (its lease expired)")]
    Lost { release: Release },
}

/// The node asking.
#[derive(Clone, Debug)]
pub struct Me {
    pub node_id: NodeId,
    pub hostname: Hostname,
    /// Its address on the cluster link (to tell its own etcd endpoint apart).
    pub addr: std::net::IpAddr,
}

/// The right to go down for an update, as kept on the node's data partition across its
/// reboot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ticket {
    pub release: Release,
    pub role: Role,
    pub node: NodeId,
    /// The store's handle on it (the etcd lease id; the Lease holder identity for k3s).
    pub lease: String,
    /// Where it is kept in the store.
    pub key: String,
}

/// A release some node found bad.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRelease {
    pub node: NodeId,
    pub hostname: Hostname,
    pub why: String,
}

/// Whether a queued ticket may go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    Go,
    /// Not yet; why (for the status).
    Wait(String),
}

/// One engine's way of coordinating updates.
pub trait Coordinator: Send + Sync {
    fn name(&self) -> &'static str;
    /// Has a node marked this release bad?
    fn bad(&self, release: &Release) -> Result<Option<BadRelease>, RolloutError>;
    /// Queue for the right to update to `release` as `role` (idempotent per ticket).
    fn enqueue(&self, me: &Me, role: Role, release: &Release) -> Result<Ticket, RolloutError>;
    /// Is it this ticket's turn (and is the cluster safe without this node)?
    fn turn(&self, me: &Me, t: &Ticket) -> Result<Turn, RolloutError>;
    /// Keep holding the ticket (after a reboot, while rejoining), or keep a queued
    /// ticket's place while it waits.
    fn keep(&self, t: &Ticket) -> Result<(), RolloutError>;
    /// Give the ticket back (ready on the new slot, rolled back, or given up).
    fn release(&self, t: &Ticket) -> Result<(), RolloutError>;
    /// Stop the rollout of `release` everywhere.
    fn mark_bad(&self, me: &Me, release: &Release, why: &str) -> Result<(), RolloutError>;
}

/// What [`acquire`] ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Go: update now, keep the ticket until ready on the new slot.
    Go(Ticket),
    /// The release is bad: do not update.
    Bad(BadRelease),
    /// Not within the wait; the last reason.
    NotNow(String),
}

/// Queue for the right to update and wait for it, at most `wait` (the queued ticket is
/// given back when the wait ends without it). `on_wait` hears each reason for waiting.
pub fn acquire(
    c: &dyn Coordinator,
    me: &Me,
    role: Role,
    release: &Release,
    wait: Duration,
    poll: Duration,
    on_wait: &mut dyn FnMut(&str),
) -> Result<Acquired, RolloutError> {
    if let Some(b) = c.bad(release)? {
        return Ok(Acquired::Bad(b));
    }
    let t = c.enqueue(me, role, release)?;
    let start = Instant::now();
    loop {
        if let Some(b) = c.bad(release)? {
            let _ = c.release(&t);
            return Ok(Acquired::Bad(b));
        }
        match c.turn(me, &t)? {
            Turn::Go => return Ok(Acquired::Go(t)),
            Turn::Wait(why) => {
                if start.elapsed() >= wait {
                    let _ = c.release(&t);
                    return Ok(Acquired::NotNow(why));
                }
                on_wait(&why);
                // A queued ticket lives on a lease like a held one: keep its place.
                c.keep(&t)?;
            }
        }
        std::thread::sleep(poll);
    }
}

/// Voters needed for quorum among `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Would the cluster keep quorum with this node down? `others_healthy`: healthy voters
/// other than this one.
pub fn safe_without_me(voters: usize, others_healthy: usize) -> Result<(), String> {
    let need = quorum(voters);
    if others_healthy >= need {
        Ok(())
    } else {
        Err(format!(
            "quorum at risk: {others_healthy} other voter(s) healthy of {voters}, {need} needed while this one is down"
        ))
    }
}

/// No coordination (engine `none`: nothing to lose).
pub struct Uncoordinated;

impl Coordinator for Uncoordinated {
    fn name(&self) -> &'static str {
        "none"
    }
    fn bad(&self, _: &Release) -> Result<Option<BadRelease>, RolloutError> {
        Ok(None)
    }
    fn enqueue(&self, me: &Me, role: Role, release: &Release) -> Result<Ticket, RolloutError> {
        Ok(Ticket {
            release: release.clone(),
            role,
            node: me.node_id.clone(),
            lease: String::new(),
            key: String::new(),
        })
    }
    fn turn(&self, _: &Me, _: &Ticket) -> Result<Turn, RolloutError> {
        Ok(Turn::Go)
    }
    fn keep(&self, _: &Ticket) -> Result<(), RolloutError> {
        Ok(())
    }
    fn release(&self, _: &Ticket) -> Result<(), RolloutError> {
        Ok(())
    }
    fn mark_bad(&self, _: &Me, _: &Release, _: &str) -> Result<(), RolloutError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn quorum_is_checked_without_this_voter() {
        assert!(safe_without_me(3, 2).is_ok());
        assert!(safe_without_me(3, 1).is_err(), "one of three already down");
        assert!(safe_without_me(5, 3).is_ok());
        assert!(safe_without_me(5, 2).is_err());
        assert!(
            safe_without_me(1, 0).is_err(),
            "a single voter never goes down"
        );
        let e = safe_without_me(3, 1).unwrap_err();
        assert!(e.contains("1 other voter(s) healthy of 3, 2 needed"), "{e}");
    }

    /// Answers `turn` from a script; records calls.
    struct Scripted {
        turns: Mutex<Vec<Turn>>,
        bad_after: Option<usize>,
        calls: Mutex<Vec<String>>,
    }
    impl Coordinator for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn bad(&self, _: &Release) -> Result<Option<BadRelease>, RolloutError> {
            let n = self
                .calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| *c == "turn")
                .count();
            Ok(self.bad_after.filter(|a| n >= *a).map(|_| BadRelease {
                node: "x".parse().unwrap(),
                hostname: "x".try_into().unwrap(),
                why: "did not come up".into(),
            }))
        }
        fn enqueue(&self, me: &Me, role: Role, r: &Release) -> Result<Ticket, RolloutError> {
            self.calls.lock().unwrap().push("enqueue".into());
            Uncoordinated.enqueue(me, role, r)
        }
        fn turn(&self, _: &Me, _: &Ticket) -> Result<Turn, RolloutError> {
            self.calls.lock().unwrap().push("turn".into());
            let mut t = self.turns.lock().unwrap();
            Ok(if t.is_empty() { Turn::Go } else { t.remove(0) })
        }
        fn keep(&self, _: &Ticket) -> Result<(), RolloutError> {
            Ok(())
        }
        fn release(&self, _: &Ticket) -> Result<(), RolloutError> {
            self.calls.lock().unwrap().push("release".into());
            Ok(())
        }
        fn mark_bad(&self, _: &Me, _: &Release, _: &str) -> Result<(), RolloutError> {
            Ok(())
        }
    }

    fn me() -> Me {
        Me {
            node_id: "aa".parse().unwrap(),
            hostname: "a".try_into().unwrap(),
            addr: "10.0.0.1".parse().unwrap(),
        }
    }

    #[test]
    fn acquire_waits_its_turn_gives_up_in_time_and_stops_on_a_bad_release() {
        let r: Release = "2".try_into().unwrap();
        let c = Scripted {
            turns: Mutex::new(vec![Turn::Wait("b is updating".into()); 2]),
            bad_after: None,
            calls: Mutex::new(vec![]),
        };
        let mut heard = Vec::new();
        let got = acquire(
            &c,
            &me(),
            Role::Server,
            &r,
            Duration::from_secs(5),
            Duration::ZERO,
            &mut |w| heard.push(w.to_string()),
        )
        .unwrap();
        assert!(matches!(got, Acquired::Go(_)));
        assert_eq!(heard, vec!["b is updating", "b is updating"]);

        let c = Scripted {
            turns: Mutex::new(vec![Turn::Wait("quorum at risk".into()); 100]),
            bad_after: None,
            calls: Mutex::new(vec![]),
        };
        let got = acquire(
            &c,
            &me(),
            Role::Server,
            &r,
            Duration::from_millis(50),
            Duration::from_millis(10),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(got, Acquired::NotNow("quorum at risk".into()));
        assert_eq!(
            c.calls.lock().unwrap().last().unwrap(),
            "release",
            "the queued ticket is given back"
        );

        let c = Scripted {
            turns: Mutex::new(vec![Turn::Wait("b is updating".into()); 100]),
            bad_after: Some(2),
            calls: Mutex::new(vec![]),
        };
        let got = acquire(
            &c,
            &me(),
            Role::Server,
            &r,
            Duration::from_secs(5),
            Duration::ZERO,
            &mut |_| {},
        )
        .unwrap();
        assert!(matches!(got, Acquired::Bad(_)), "{got:?}");
        assert_eq!(c.calls.lock().unwrap().last().unwrap(), "release");
    }
}
