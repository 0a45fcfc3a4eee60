//! Update coordination in etcd, through `etcdctl`: the lock recipe etcd's own Lock API
//! implements (a key per contender, attached to the contender's lease; the oldest key by
//! create revision holds the lock), a lease per ticket so a dead holder lets go after one
//! TTL, `endpoint health --cluster` for the quorum check, and permanent keys for bad
//! releases.
//!
//! Keys (all under `/clutch/rollout/`): `servers/<lease>` and `agents/<lease>` (the queues,
//! value: who and which release), `bad/<release>` (who found it bad and why).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use clutch_config::Release;
use serde::{Deserialize, Serialize};

use super::{BadRelease, Coordinator, Me, RolloutError, Ticket, Turn, safe_without_me};
use crate::engine::etcd::env::client_url;
use crate::id::Role;
use crate::sys::CommandRunner;

pub const PREFIX: &str = "/clutch/rollout/";

/// Client certificate files (for https endpoints and the health of every member).
#[derive(Clone, Debug)]
pub struct TlsClient {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct EtcdCoordinator {
    pub runner: Arc<dyn CommandRunner>,
    pub etcdctl: String,
    /// Where to talk to the cluster: the local plain endpoint on a server, members'
    /// https URLs on an agent.
    pub endpoints: Vec<String>,
    pub tls: Option<TlsClient>,
    /// How long a ticket outlives its holder (it covers a reboot and rejoin).
    pub ttl: Duration,
    /// Agents that may update at once.
    pub agent_budget: usize,
}

/// Who holds (or waits for) a ticket, as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Holder {
    node: crate::id::NodeId,
    hostname: clutch_config::Hostname,
    release: Release,
}

/// One key of a `get -w json` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub create_revision: u64,
}

/// Parses `etcdctl get ... -w json` (base64 keys and values).
pub fn parse_kvs(json: &str) -> Result<Vec<Kv>, RolloutError> {
    #[derive(Deserialize)]
    struct Raw {
        key: String,
        #[serde(default)]
        value: String,
        #[serde(default)]
        create_revision: u64,
    }
    #[derive(Deserialize)]
    struct Resp {
        #[serde(default)]
        kvs: Vec<Raw>,
    }
    let bad = |detail: String| RolloutError::Parse {
        what: "etcdctl get",
        detail,
    };
    let r: Resp = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| bad(e.to_string()))
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    r.kvs
        .iter()
        .map(|k| {
            Ok(Kv {
                key: b64(&k.key)?,
                value: b64(&k.value)?,
                create_revision: k.create_revision,
            })
        })
        .collect()
}

/// Parses `endpoint health --cluster -w json`: (endpoint, healthy).
pub fn parse_health(json: &str) -> Result<Vec<(String, bool)>, RolloutError> {
    #[derive(Deserialize)]
    struct H {
        endpoint: String,
        #[serde(default)]
        health: bool,
    }
    let v: Vec<H> = serde_json::from_str(json.trim()).map_err(|e| RolloutError::Parse {
        what: "etcdctl endpoint health",
        detail: e.to_string(),
    })?;
    Ok(v.into_iter().map(|h| (h.endpoint, h.health)).collect())
}

/// The lease id from `lease grant` (`lease 694d80... granted with TTL(600s)`).
pub fn parse_lease(out: &str) -> Option<String> {
    let rest = out.trim().strip_prefix("lease ")?;
    let (id, tail) = rest.split_once(' ')?;
    (tail.starts_with("granted") && u64::from_str_radix(id, 16).is_ok()).then(|| id.to_string())
}

impl EtcdCoordinator {
    fn ctl_out(&self, args: &[&str]) -> Result<crate::sys::CmdOutput, RolloutError> {
        let mut a: Vec<String> = vec![
            format!("--endpoints={}", self.endpoints.join(",")),
            "--dial-timeout=3s".into(),
            "--command-timeout=5s".into(),
        ];
        if let Some(t) = &self.tls {
            a.push(format!("--cacert={}", t.ca.display()));
            a.push(format!("--cert={}", t.cert.display()));
            a.push(format!("--key={}", t.key.display()));
        }
        a.extend(args.iter().map(|s| s.to_string()));
        self.runner
            .run(&self.etcdctl, &a, &[("ETCDCTL_API".into(), "3".into())])
            .map_err(|e| RolloutError::Command {
                command: format!("etcdctl {}", args.join(" ")),
                detail: e.to_string(),
            })
    }

    fn ctl(&self, args: &[&str]) -> Result<String, RolloutError> {
        let out = self.ctl_out(args)?;
        if out.ok() {
            Ok(out.stdout)
        } else {
            Err(RolloutError::Command {
                command: format!("etcdctl {}", args.join(" ")),
                detail: out.stderr.trim().to_string(),
            })
        }
    }

    fn queue(role: Role) -> &'static str {
        if role == Role::Server {
            "servers"
        } else {
            "agents"
        }
    }

    /// The queue of `role`, oldest first.
    fn contenders(&self, role: Role) -> Result<Vec<Kv>, RolloutError> {
        let prefix = format!("{PREFIX}{}/", Self::queue(role));
        let mut kvs = parse_kvs(&self.ctl(&["get", "--prefix", &prefix, "-w", "json"])?)?;
        kvs.sort_by_key(|k| k.create_revision);
        Ok(kvs)
    }

    /// Is the cluster safe without `me`? Voters from the member list, health of each
    /// member's client endpoint.
    fn quorum_check(&self, me: &Me) -> Result<Turn, RolloutError> {
        let members = crate::engine::etcd::members::parse_member_list(
            &self.ctl(&["member", "list", "-w", "json"])?,
        )
        .map_err(|e| RolloutError::Parse {
            what: "etcdctl member list",
            detail: e.to_string(),
        })?;
        let voters = members.len();
        // Unhealthy members make etcdctl exit non-zero; its JSON still lists everyone.
        let out = self.ctl_out(&["endpoint", "health", "--cluster", "-w", "json"])?;
        let health = parse_health(&out.stdout).map_err(|e| match out.ok() {
            true => e,
            false => RolloutError::Command {
                command: "etcdctl endpoint health --cluster".into(),
                detail: out.stderr.trim().to_string(),
            },
        })?;
        let mine = client_url(me.addr);
        let others_healthy = health.iter().filter(|(e, h)| *h && e != &mine).count();
        Ok(match safe_without_me(voters, others_healthy) {
            Ok(()) => Turn::Go,
            Err(why) => Turn::Wait(why),
        })
    }
}

impl Coordinator for EtcdCoordinator {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn bad(&self, release: &Release) -> Result<Option<BadRelease>, RolloutError> {
        let key = format!("{PREFIX}bad/{release}");
        let kvs = parse_kvs(&self.ctl(&["get", &key, "-w", "json"])?)?;
        match kvs.first() {
            None => Ok(None),
            Some(kv) => {
                serde_json::from_str(&kv.value)
                    .map(Some)
                    .map_err(|e| RolloutError::Parse {
                        what: "a bad-release key",
                        detail: e.to_string(),
                    })
            }
        }
    }
    fn enqueue(&self, me: &Me, role: Role, release: &Release) -> Result<Ticket, RolloutError> {
        let ttl = self.ttl.as_secs().max(10).to_string();
        let out = self.ctl(&["lease", "grant", &ttl])?;
        let lease = parse_lease(&out).ok_or_else(|| RolloutError::Parse {
            what: "etcdctl lease grant",
            detail: out.clone(),
        })?;
        let key = format!("{PREFIX}{}/{lease}", Self::queue(role));
        let value = serde_json::to_string(&Holder {
            node: me.node_id.clone(),
            hostname: me.hostname.clone(),
            release: release.clone(),
        })
        .expect("serialises");
        self.ctl(&["put", &format!("--lease={lease}"), &key, &value])?;
        Ok(Ticket {
            release: release.clone(),
            role,
            node: me.node_id.clone(),
            lease,
            key,
        })
    }
    fn turn(&self, me: &Me, t: &Ticket) -> Result<Turn, RolloutError> {
        let queue = self.contenders(t.role)?;
        let Some(rank) = queue.iter().position(|k| k.key == t.key) else {
            return Err(RolloutError::Lost {
                release: t.release.clone(),
            });
        };
        let name = |k: &Kv| {
            serde_json::from_str::<Holder>(&k.value)
                .map(|h| h.hostname.to_string())
                .unwrap_or_else(|_| k.key.clone())
        };
        if t.role == Role::Server {
            if rank > 0 {
                return Ok(Turn::Wait(format!(
                    "{} holds the voters' update ticket",
                    name(&queue[0])
                )));
            }
            return self.quorum_check(me);
        }
        if rank < self.agent_budget.max(1) {
            Ok(Turn::Go)
        } else {
            let ahead: Vec<String> = queue[..rank].iter().map(name).collect();
            Ok(Turn::Wait(format!(
                "{} agent(s) ahead ({}), {} may update at once",
                rank,
                ahead.join(", "),
                self.agent_budget.max(1)
            )))
        }
    }
    fn keep(&self, t: &Ticket) -> Result<(), RolloutError> {
        match self.ctl(&["lease", "keep-alive", "--once", &t.lease]) {
            Ok(_) => Ok(()),
            Err(RolloutError::Command { detail, .. }) if detail.contains("not found") => {
                Err(RolloutError::Lost {
                    release: t.release.clone(),
                })
            }
            Err(e) => Err(e),
        }
    }
    fn release(&self, t: &Ticket) -> Result<(), RolloutError> {
        match self.ctl(&["lease", "revoke", &t.lease]) {
            Ok(_) => Ok(()),
            // Expired already: nothing to give back.
            Err(RolloutError::Command { detail, .. }) if detail.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
    fn mark_bad(&self, me: &Me, release: &Release, why: &str) -> Result<(), RolloutError> {
        let v = serde_json::to_string(&BadRelease {
            node: me.node_id.clone(),
            hostname: me.hostname.clone(),
            why: why.chars().take(500).collect(),
        })
        .expect("serialises");
        self.ctl(&["put", &format!("{PREFIX}bad/{release}"), &v])
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clutch_os::cmd::CmdOutput;
    use clutch_os::cmd::fake::FakeRunner;

    const GET: &str = r#"{"header":{"revision":9},"kvs":[{"key":"L2NsdXRjaC9yb2xsb3V0L3NlcnZlcnMvMjA0MGEyM2I3NGJjMjQwNw==","create_revision":7,"mod_revision":7,"version":1,"value":"eyJub2RlIjoiYSJ9","lease":2324035783968433159}],"count":1}"#;

    #[test]
    fn etcdctl_answers_parse() {
        let kvs = parse_kvs(GET).unwrap();
        assert_eq!(kvs[0].key, "/clutch/rollout/servers/2040a23b74bc2407");
        assert_eq!(kvs[0].value, r#"{"node":"a"}"#);
        assert_eq!(kvs[0].create_revision, 7);
        assert!(parse_kvs(r#"{"header":{}}"#).unwrap().is_empty());
        assert_eq!(
            parse_lease("lease 2040a23b74bc2405 granted with TTL(60s)\n").as_deref(),
            Some("2040a23b74bc2405")
        );
        assert_eq!(parse_lease("Error: etcdserver: no leader"), None);
        let h = parse_health(r#"[{"endpoint":"https://10.0.0.1:2379","health":true,"took":"1ms"},{"endpoint":"https://10.0.0.2:2379","health":false,"error":"context deadline exceeded"}]"#).unwrap();
        assert_eq!(
            h,
            vec![
                ("https://10.0.0.1:2379".into(), true),
                ("https://10.0.0.2:2379".into(), false)
            ]
        );
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A coordinator whose etcdctl answers from a closure of its arguments.
    fn coordinator(
        answer: impl Fn(&str) -> CmdOutput + Send + Sync + 'static,
    ) -> (EtcdCoordinator, Arc<FakeRunner>) {
        let r = Arc::new(FakeRunner::new(move |c| answer(&c.args[3..].join(" "))));
        (
            EtcdCoordinator {
                runner: r.clone(),
                etcdctl: "etcdctl".into(),
                endpoints: vec!["http://127.0.0.1:2379".into()],
                tls: None,
                ttl: Duration::from_secs(600),
                agent_budget: 2,
            },
            r,
        )
    }

    fn me() -> Me {
        Me {
            node_id: "aa".parse().unwrap(),
            hostname: "node-a".try_into().unwrap(),
            addr: "10.0.0.1".parse().unwrap(),
        }
    }

    fn queue_json(keys: &[(&str, u64, &str)]) -> String {
        let kvs: Vec<String> = keys
            .iter()
            .map(|(k, rev, host)| {
                let v = format!(r#"{{"node":"{host}{host}","hostname":"{host}","release":"2"}}"#);
                format!(
                    r#"{{"key":"{}","create_revision":{rev},"value":"{}"}}"#,
                    b64(k),
                    b64(&v)
                )
            })
            .collect();
        format!(r#"{{"kvs":[{}]}}"#, kvs.join(","))
    }

    #[test]
    fn the_oldest_voter_goes_only_when_the_others_keep_quorum() {
        let members = r#"{"members":[{"ID":1,"name":"node-a"},{"ID":2,"name":"node-b"},{"ID":3,"name":"node-c"}]}"#;
        let healthy = |b: bool| {
            format!(
                r#"[{{"endpoint":"https://10.0.0.1:2379","health":true}},{{"endpoint":"https://10.0.0.2:2379","health":true}},{{"endpoint":"https://10.0.0.3:2379","health":{b}}}]"#
            )
        };
        let t = Ticket {
            release: "2".try_into().unwrap(),
            role: Role::Server,
            node: "aa".parse().unwrap(),
            lease: "a1".into(),
            key: "/clutch/rollout/servers/a1".into(),
        };
        for (c_healthy, want_go) in [(true, true), (false, false)] {
            let (c, _) = coordinator(move |a| {
                if a.starts_with("get --prefix") {
                    CmdOutput::success(&queue_json(&[
                        ("/clutch/rollout/servers/a1", 5, "node-a"),
                        ("/clutch/rollout/servers/b1", 6, "node-b"),
                    ]))
                } else if a.starts_with("member list") {
                    CmdOutput::success(members)
                } else {
                    CmdOutput {
                        code: if c_healthy { 0 } else { 1 },
                        stdout: healthy(c_healthy),
                        stderr: String::new(),
                    }
                }
            });
            let turn = c.turn(&me(), &t).unwrap();
            assert_eq!(turn == Turn::Go, want_go, "{turn:?}");
        }
        // Second in the queue: waits for the first, names it.
        let (c, _) = coordinator(|_| {
            CmdOutput::success(&queue_json(&[
                ("/clutch/rollout/servers/b1", 4, "node-b"),
                ("/clutch/rollout/servers/a1", 5, "node-a"),
            ]))
        });
        assert_eq!(
            c.turn(&me(), &t).unwrap(),
            Turn::Wait("node-b holds the voters' update ticket".into())
        );
        // Our key is gone (lease expired): the ticket is lost.
        let (c, _) = coordinator(|_| CmdOutput::success(r#"{"kvs":[]}"#));
        assert!(matches!(c.turn(&me(), &t), Err(RolloutError::Lost { .. })));
    }

    #[test]
    fn agents_go_within_their_budget() {
        let q = queue_json(&[
            ("/clutch/rollout/agents/1", 1, "x"),
            ("/clutch/rollout/agents/2", 2, "y"),
            ("/clutch/rollout/agents/3", 3, "z"),
        ]);
        let (c, _) = coordinator(move |_| CmdOutput::success(&q));
        let t = |k: &str| Ticket {
            release: "2".try_into().unwrap(),
            role: Role::Agent,
            node: "aa".parse().unwrap(),
            lease: "1".into(),
            key: format!("/clutch/rollout/agents/{k}"),
        };
        assert_eq!(c.turn(&me(), &t("2")).unwrap(), Turn::Go);
        assert!(
            matches!(c.turn(&me(), &t("3")).unwrap(), Turn::Wait(w) if w.contains("2 agent(s) ahead (x, y)"))
        );
    }

    #[test]
    fn enqueue_puts_a_key_on_a_fresh_lease_and_release_revokes_it() {
        let (c, r) = coordinator(|a| {
            if a.starts_with("lease grant") {
                CmdOutput::success("lease 694d80e5ea1c0b05 granted with TTL(600s)\n")
            } else if a.starts_with("lease revoke") {
                CmdOutput::failure("Error: etcdserver: requested lease not found")
            } else {
                CmdOutput::success("OK\n")
            }
        });
        let t = c
            .enqueue(&me(), Role::Server, &"2".try_into().unwrap())
            .unwrap();
        assert_eq!(t.key, "/clutch/rollout/servers/694d80e5ea1c0b05");
        c.release(&t).unwrap();
        let lines: Vec<String> = r.calls().iter().map(|c| c.args[3..].join(" ")).collect();
        assert_eq!(lines[0], "lease grant 600");
        assert!(lines[1].starts_with("put --lease=694d80e5ea1c0b05 /clutch/rollout/servers/694d80e5ea1c0b05 {\"node\":\"aa\""), "{}", lines[1]);
        assert_eq!(lines[2], "lease revoke 694d80e5ea1c0b05");
    }
}
