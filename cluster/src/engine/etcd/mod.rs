//! `etcd`: Debian's etcd-server, configured through `/etc/default/etcd` ([`env`]), members
//! added with `etcdctl` (v3 API; flags common to etcd 3.4 and 3.5).
//!
//! Security: on the node's own address, client (2379) and peer (2380) traffic is TLS with
//! client certificates from the cluster CA ([`crate::pki`]); only 127.0.0.1:2379 is plain,
//! for local tools. The CA is made by the bootstrapping node and given to every server (so
//! any of them can admit later nodes); each member's key is made on the member and only its
//! certificate request travels, inside an encrypted session.
//!
//! Formation: members of the bootstrap plan start together with the same initial cluster
//! (`new`), so the cluster forms in one election; later nodes are added one at a time
//! (`member add`, `existing`).
//!
//! # A join cut short
//!
//! A joiner can lose its power after the admitting server ran `etcdctl member add` for it
//! but before its own etcd is healthy. It then boots without `cluster.json` and asks to be
//! admitted again. Removing and re-adding its member, as for a replaced node, does not work
//! then: when it was the second member, the cluster has lost quorum until that very member
//! comes back, so `member remove` fails — forever. So [`members::plan_admit`] lets a joiner
//! that already is a member (its peer URL, unstarted or under its own name, and no replaced
//! node involved) back in as that same member, and when quorum is lost the admitting server
//! reads the member list from its own local state (`member list --consistency=s`). The
//! joiner restarts etcd on the data dir the cut join left when that dir belongs to the same
//! member (its WAL exists and the env file that etcd started with names that member), else
//! on an empty one.

pub mod env;
pub mod members;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::env::{ClusterState, EnvSpec, LOCAL_ENDPOINT, Peer, TlsFiles, env_member, env_token};
use self::members::{AdmitPlan, EtcdMember, parse_added_id, parse_initial_cluster, plan_admit};
use super::{
    Admission, Engine, EngineError, JoinInfo, Joiner, LocalNode, PlanStart, passwd_ids, wait_until,
};
use crate::id::{InstanceId, Role};
use crate::pki::{self, Bundle, Ca, Names};
use crate::secret::Secret;
use crate::sys::{self, CommandRunner, ServiceManager};
use crate::wire::Bootstrap;

pub const UNIT: &str = "etcd";
pub const ENV_FILE: &str = "/etc/default/etcd";
pub const DATA_DIR: &str = "/var/lib/etcd/clutch";
/// etcd's TLS files (owned by the etcd user; the key mode 0600).
pub const TLS_DIR: &str = "/var/lib/etcd/clutch-tls";
/// The cluster CA on servers (root only).
pub const PKI_DIR: &str = "/var/lib/clutch/pki";

/// What an etcd member needs to start. Every field is typed: the env file is rendered from
/// these types, never from text a peer wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdJoin {
    pub initial_cluster: Vec<Peer>,
    pub state: ClusterState,
    pub token: InstanceId,
    pub member_id: Option<u64>,
    /// The joiner already is `member_id` (its earlier join was cut short).
    pub rejoin: bool,
    pub tls: Bundle,
}

pub struct EtcdEngine {
    /// Root for config and data paths ("/" on a node).
    pub root: PathBuf,
    pub services: Arc<dyn ServiceManager>,
    pub runner: Arc<dyn CommandRunner>,
    pub etcdctl: String,
    pub health_timeout: Duration,
}

impl EtcdEngine {
    pub fn new(
        root: PathBuf,
        services: Arc<dyn ServiceManager>,
        runner: Arc<dyn CommandRunner>,
    ) -> Self {
        EtcdEngine {
            root,
            services,
            runner,
            etcdctl: "etcdctl".into(),
            health_timeout: Duration::from_secs(90),
        }
    }
    fn path(&self, abs: &str) -> PathBuf {
        sys::under(&self.root, abs)
    }
    pub fn env_path(&self) -> PathBuf {
        self.path(ENV_FILE)
    }
    pub fn data_dir(&self) -> PathBuf {
        self.path(DATA_DIR)
    }
    fn tls(&self, name: &str) -> PathBuf {
        self.path(TLS_DIR).join(name)
    }
    fn pki(&self, name: &str) -> PathBuf {
        self.path(PKI_DIR).join(name)
    }

    fn ctl(&self, args: &[&str]) -> Result<String, EngineError> {
        let mut a: Vec<String> = vec![
            format!("--endpoints={LOCAL_ENDPOINT}"),
            "--dial-timeout=3s".into(),
            "--command-timeout=5s".into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let command = format!("etcdctl {}", args.join(" "));
        let out = self
            .runner
            .run(&self.etcdctl, &a, &[("ETCDCTL_API".into(), "3".into())])
            .map_err(|e| EngineError::Command {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        if out.ok() {
            Ok(out.stdout)
        } else {
            Err(EngineError::Command {
                command,
                detail: out.stderr.trim().to_string(),
            })
        }
    }

    /// The member list as this server knows it locally (etcd 3.5's `member list` is
    /// linearizable by default and fails without quorum; `--consistency=s`, from 3.5.8, is
    /// served locally; etcd 3.4 has no such flag and always answers locally).
    fn list_local(&self) -> Result<Vec<EtcdMember>, EngineError> {
        match self.ctl(&["member", "list", "-w", "json", "--consistency=s"]) {
            Ok(out) => members::parse_member_list(&out),
            Err(EngineError::Command { detail, .. }) if detail.contains("unknown flag") => {
                members::parse_member_list(&self.ctl(&["member", "list", "-w", "json"])?)
            }
            Err(e) => Err(e),
        }
    }

    fn restart(&self) -> Result<(), EngineError> {
        self.services
            .restart(UNIT)
            .map_err(|reason| EngineError::Service {
                unit: UNIT.into(),
                reason,
            })
    }

    fn write_env(
        &self,
        me: &LocalNode,
        j: &EtcdJoin,
        member: Option<u64>,
    ) -> Result<(), EngineError> {
        let (ca, cert, key) = (
            self.tls("ca.crt"),
            self.tls("node.crt"),
            self.tls("node.key"),
        );
        let text = env::render_env(&EnvSpec {
            cluster_name: &me.cluster_name,
            name: &me.hostname,
            addr: me.addr,
            data_dir: &self.data_dir(),
            initial_cluster: &j.initial_cluster,
            state: j.state,
            token: &j.token,
            member,
            tls: TlsFiles {
                ca: &ca,
                cert: &cert,
                key: &key,
            },
        });
        clutch_os::fs::write_atomic(&self.env_path(), text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Stop etcd, empty its data dir, then write the env file and start etcd on it. In this
    /// order, a data dir never holds the state of another member than the env file names.
    fn start_fresh(
        &self,
        me: &LocalNode,
        j: &EtcdJoin,
        member: Option<u64>,
    ) -> Result<(), EngineError> {
        let _ = self.services.stop(UNIT);
        let dd = self.data_dir();
        if dd.exists() {
            std::fs::remove_dir_all(&dd).map_err(EngineError::read(dd.clone()))?;
        }
        self.write_env(me, j, member)?;
        self.restart()
    }

    fn env_text(&self) -> Option<String> {
        std::fs::read_to_string(self.env_path()).ok()
    }

    /// The member the env file was written for (`# member <hex id>`).
    pub fn env_member(&self) -> Option<u64> {
        env_member(&self.env_text()?)
    }

    /// True when the data dir holds a WAL (etcd then starts from it, as the member it
    /// was written by, and ignores the initial-cluster settings).
    pub fn has_wal(&self) -> bool {
        std::fs::read_dir(self.data_dir().join("member/wal"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".wal"))
            })
            .unwrap_or(false)
    }

    fn wait_healthy(&self, me: &LocalNode) -> Result<(), EngineError> {
        wait_until(self.health_timeout, || self.health(me))
    }

    fn list(&self) -> Result<Vec<EtcdMember>, EngineError> {
        members::parse_member_list(&self.ctl(&["member", "list", "-w", "json"])?)
    }

    fn load_ca(&self) -> Result<Ca, EngineError> {
        let (cp, kp) = (self.pki("ca.crt"), self.pki("ca.key"));
        let cert = std::fs::read_to_string(&cp).map_err(EngineError::read(cp))?;
        let key = std::fs::read_to_string(&kp).map_err(EngineError::read(kp))?;
        Ok(Ca::from_pem(&cert, &key)?)
    }

    fn save_ca(&self, cert: &str, key: &Secret) -> Result<(), EngineError> {
        clutch_os::fs::write_atomic(&self.pki("ca.key"), key.expose().as_bytes(), 0o600)?;
        clutch_os::fs::write_atomic(&self.pki("ca.crt"), cert.as_bytes(), 0o644)?;
        Ok(())
    }

    /// The certificate bundle for `joiner`: its request signed for the names this server
    /// verified (its host name and the address it connected from), and the CA key for
    /// servers.
    fn bundle(&self, joiner: &Joiner, role: Role) -> Result<Bundle, EngineError> {
        let csr = joiner
            .csr
            .as_deref()
            .ok_or_else(|| EngineError::BadInfo("no certificate request".into()))?;
        let ca = self.load_ca()?;
        let h = joiner.hostname.to_string();
        let names = Names {
            common_name: h.clone(),
            dns: vec![h.clone(), format!("{h}.local"), "localhost".into()],
            ips: vec![joiner.addr, "127.0.0.1".parse().expect("an address")],
        };
        Ok(Bundle {
            ca_cert: ca.cert_pem(),
            cert: ca.sign(csr, &names)?,
            ca_key: (role == Role::Server).then(|| ca.key_pem()),
        })
    }

    /// Installs the bundle: the signed certificate must be for the key this node made for
    /// its request; etcd's files go to the etcd user, the CA to root.
    fn install_tls(&self, b: &Bundle) -> Result<(), EngineError> {
        let pending = self.pki("member-request.key");
        let key = std::fs::read_to_string(&pending).map_err(EngineError::read(pending))?;
        if !pki::same_key(&b.cert, &key)? {
            return Err(EngineError::BadInfo(
                "the certificate sent is not for this node's key".into(),
            ));
        }
        let owner = passwd_ids(&self.root, "etcd").map(|(u, g, _)| (u, g));
        let w = |name: &str, data: &str, mode| {
            clutch_os::fs::write_atomic_owned(&self.tls(name), data.as_bytes(), mode, owner)
        };
        w("ca.crt", &b.ca_cert, 0o644)?;
        w("node.key", &key, 0o600)?;
        w("node.crt", &b.cert, 0o644)?;
        if let Some(k) = &b.ca_key {
            self.save_ca(&b.ca_cert, k)?;
        }
        Ok(())
    }

    fn admit_runtime(
        &self,
        joiner: &Joiner,
        replaces: &[crate::wire::MemberInfo],
    ) -> Result<(Vec<Peer>, Option<u64>, bool), EngineError> {
        let plan = match self.list() {
            Ok(list) => plan_admit(&list, joiner, replaces),
            Err(e) => {
                // No quorum (etcd 3.5 serves a linearizable `member list` only with quorum):
                // typically a one-member cluster that added this very joiner, which then
                // lost power. Our local view is enough to let that member back in; anything
                // else changes membership, which needs quorum: wait for it.
                let local = self.list_local().map_err(|e2| EngineError::Command {
                    command: "etcdctl member list".into(),
                    detail: format!("{e}; and locally: {e2}"),
                })?;
                match plan_admit(&local, joiner, replaces) {
                    p @ AdmitPlan::Rejoin { .. } => {
                        tracing::warn!(joiner = %joiner.hostname, "etcd has no quorum ({e}); the joiner is a member already, letting it back in");
                        p
                    }
                    AdmitPlan::Add { .. } => return Err(e),
                }
            }
        };
        match plan {
            AdmitPlan::Rejoin {
                id,
                initial_cluster,
            } => {
                tracing::info!(member = format!("{id:x}"), joiner = %joiner.hostname, "joiner is an etcd member already (its earlier join was cut short): rejoining as that member");
                Ok((initial_cluster, Some(id), true))
            }
            AdmitPlan::Add { remove } => {
                for id in remove {
                    tracing::info!(member = format!("{id:x}"), joiner = %joiner.hostname, "removing stale etcd member");
                    self.ctl(&["member", "remove", &format!("{id:x}")])?;
                }
                let url = env::peer_url(joiner.addr);
                let out = self.ctl(&[
                    "member",
                    "add",
                    joiner.hostname.as_str(),
                    &format!("--peer-urls={url}"),
                ])?;
                Ok((parse_initial_cluster(&out)?, parse_added_id(&out), false))
            }
        }
    }

    /// Start etcd as the server `j` describes, keeping a data dir that belongs to it.
    fn start_server(&self, me: &LocalNode, j: &EtcdJoin) -> Result<(), EngineError> {
        let token = format!("clutch-{}", j.token);
        let keep = match j.state {
            // A listed member restarted mid-bootstrap: its WAL is this cluster's.
            ClusterState::New => {
                self.has_wal() && self.env_text().as_deref().and_then(env_token) == Some(token)
            }
            // The cut-short join got as far as etcd's WAL: this member's raft state, which
            // the cluster may count on.
            ClusterState::Existing => {
                j.rejoin
                    && j.member_id.is_some()
                    && self.env_member() == j.member_id
                    && self.has_wal()
            }
        };
        if keep {
            tracing::info!("restarting etcd on its existing data dir");
            self.write_env(me, j, j.member_id)?;
            self.restart()?;
            match self.wait_healthy(me) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(
                    "etcd did not come up on the old data dir ({e}); starting over with an empty one"
                ),
            }
        }
        self.start_fresh(me, j, j.member_id)?;
        self.wait_healthy(me)
    }
}

impl Engine for EtcdEngine {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn plan_start(&self, _: Role) -> PlanStart {
        PlanStart::Together
    }
    fn found(&self, me: &LocalNode, _plan: &Bootstrap) -> Result<(), EngineError> {
        if self.load_ca().is_ok() {
            return Ok(());
        }
        let ca = Ca::generate(&me.cluster_name)?;
        self.save_ca(&ca.cert_pem(), &ca.key_pem())
    }
    fn request(&self, me: &LocalNode) -> Result<Option<String>, EngineError> {
        let r = pki::key_and_request(me.hostname.as_str())?;
        clutch_os::fs::write_atomic(
            &self.pki("member-request.key"),
            r.key.expose().as_bytes(),
            0o600,
        )?;
        Ok(Some(r.csr))
    }
    fn admit(
        &self,
        _me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        how: Admission<'_>,
    ) -> Result<JoinInfo, EngineError> {
        let tls = self.bundle(joiner, role)?;
        let (initial_cluster, member_id, rejoin, state, token) = match how {
            Admission::FromPlan(plan) => (
                plan.servers()
                    .map(|m| Peer {
                        name: m.hostname.clone(),
                        addr: m.addr,
                    })
                    .collect(),
                None,
                false,
                ClusterState::New,
                plan.instance.clone(),
            ),
            Admission::Runtime { instance, .. } if role != Role::Server => (
                vec![],
                None,
                false,
                ClusterState::Existing,
                instance.clone(),
            ),
            Admission::Runtime { replaces, instance } => {
                let (ic, id, rejoin) = self.admit_runtime(joiner, replaces)?;
                (ic, id, rejoin, ClusterState::Existing, instance.clone())
            }
        };
        Ok(JoinInfo::Etcd(EtcdJoin {
            initial_cluster,
            state,
            token,
            member_id,
            rejoin,
            tls,
        }))
    }
    fn join(&self, me: &LocalNode, role: Role, info: &JoinInfo) -> Result<(), EngineError> {
        let j = match info {
            JoinInfo::Etcd(j) => j,
            other => {
                return Err(EngineError::WrongEngine {
                    want: "etcd",
                    got: other.kind(),
                });
            }
        };
        self.install_tls(&j.tls)?;
        if role != Role::Server {
            // Agents run no etcd member; they keep membership (and a client certificate).
            let _ = self.services.stop(UNIT);
            return Ok(());
        }
        if j.initial_cluster.is_empty() {
            return Err(EngineError::BadInfo("empty initial cluster".into()));
        }
        self.start_server(me, j)
    }
    fn resume(&self, _me: &LocalNode, role: Role) -> Result<(), EngineError> {
        if role == Role::Server {
            // Without clutch's member settings (a root slot that did not get them), etcd
            // would start as a lone default member on localhost and answer the health
            // check: a node that looks ready but is not in its cluster.
            if !self.env_text().is_some_and(|t| env::is_clutch_env(&t)) {
                return Err(EngineError::NotConfigured {
                    path: self.env_path(),
                    why: "does not hold this node's etcd member settings (written when it joined); not starting etcd on the packaged defaults".into(),
                });
            }
            self.restart()?;
        }
        Ok(())
    }
    fn health(&self, _me: &LocalNode) -> Result<(), EngineError> {
        self.ctl(&["endpoint", "health"])
            .map(|_| ())
            .map_err(|e| EngineError::Unhealthy(e.to_string()))
    }
    fn members(&self, _me: &LocalNode) -> Result<Vec<String>, EngineError> {
        Ok(self.list()?.into_iter().map(|m| m.name).collect())
    }
}

#[cfg(test)]
mod tests;
