//! `k3s`: renders `/etc/rancher/k3s/config.yaml` and a systemd unit (`server
//! --cluster-init` on the leader, `server --server https://<server>:6443` on further
//! servers, `agent` on agents). The k3s binary itself is installed by the image builder at
//! [`K3S_BIN`]; it cannot be downloaded where clutch is tested, so this engine is tested
//! at the command and file level (golden files), never against a running k3s.
//!
//! Tokens (k3s's "secure" format pins the server CA: `K10<sha256 of server-ca.crt>::...`):
//! - servers join with the server token `K10…::server:<secret>` and run with the same
//!   `agent-token`; every server keeps both secrets (`/var/lib/clutch/k3s-secret`,
//!   `k3s-agent-secret`), so any ready server can admit the next node;
//! - agents get only the agent token `K10…::node:<agent secret>`, which k3s accepts for
//!   agents and refuses for servers.
//!
//! k3s needs servers to join one at a time after the first (`--cluster-init`); agents of
//! the plan start as soon as a server is ready, without waiting on each other.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Admission, Engine, EngineError, JoinInfo, Joiner, LocalNode, PlanStart, passwd_ids, wait_until,
};
use crate::id::Role;
use crate::secret::Secret;
use crate::sys::{self, CommandRunner, ServiceManager};
use crate::wire::Bootstrap;

pub const K3S_BIN: &str = "/usr/local/bin/k3s";
pub const UNIT: &str = "k3s";
pub const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const UNIT_FILE: &str = "/etc/systemd/system/k3s.service";
pub const SERVER_CA: &str = "/var/lib/rancher/k3s/server/tls/server-ca.crt";
pub const KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
pub const SECRET_FILE: &str = "/var/lib/clutch/k3s-secret";
pub const AGENT_SECRET_FILE: &str = "/var/lib/clutch/k3s-agent-secret";

/// The two shared secrets every server holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSecrets {
    pub secret: Secret,
    pub agent_secret: Secret,
}

/// What a k3s node needs to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K3sJoin {
    /// Start the cluster (`--cluster-init`): the plan's leader only.
    pub init: bool,
    /// The server to join (ignored with `init`).
    pub server: IpAddr,
    /// The secure join token (server token for servers, agent token for agents).
    pub token: Option<Secret>,
    /// Servers only: the shared secrets, so they can admit others.
    pub secrets: Option<ServerSecrets>,
}

/// How this node runs k3s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum K3sMode {
    /// First server: `server --cluster-init` with the plain secrets.
    Init {
        secrets: ServerSecrets,
    },
    /// Further server joining `server_url` with the full secure token.
    Server {
        server_url: String,
        token: Secret,
        agent_secret: Secret,
    },
    Agent {
        server_url: String,
        token: Secret,
    },
}

/// The mDNS name every server answers (tls-san and registration name).
pub fn api_name(cluster: &str) -> String {
    format!("{cluster}-api.local")
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string serialises")
}

/// Render config.yaml (every value quoted as a JSON string, which YAML reads as is).
pub fn render_config(me: &LocalNode, mode: &K3sMode) -> String {
    let mut y = format!(
        "# Written by clutch for cluster {} on {}; rewritten at every join.\n",
        q(&me.cluster_name),
        me.hostname
    );
    match mode {
        K3sMode::Init { secrets } => {
            y.push_str("cluster-init: true\n");
            y.push_str(&format!("token: {}\n", q(secrets.secret.expose())));
            y.push_str(&format!(
                "agent-token: {}\n",
                q(secrets.agent_secret.expose())
            ));
        }
        K3sMode::Server {
            server_url,
            token,
            agent_secret,
        } => {
            y.push_str(&format!("server: {}\n", q(server_url)));
            y.push_str(&format!("token: {}\n", q(token.expose())));
            y.push_str(&format!("agent-token: {}\n", q(agent_secret.expose())));
        }
        K3sMode::Agent { server_url, token } => {
            y.push_str(&format!("server: {}\n", q(server_url)));
            y.push_str(&format!("token: {}\n", q(token.expose())));
        }
    }
    y.push_str(&format!("node-name: {}\n", q(me.hostname.as_str())));
    y.push_str(&format!("node-ip: {}\n", q(&me.addr.to_string())));
    if !matches!(mode, K3sMode::Agent { .. }) {
        y.push_str(&format!("advertise-address: {}\n", q(&me.addr.to_string())));
        y.push_str("tls-san:\n");
        for san in [
            api_name(&me.cluster_name),
            format!("{}.local", me.hostname),
            me.addr.to_string(),
        ] {
            y.push_str(&format!("  - {}\n", q(&san)));
        }
        y.push_str("write-kubeconfig-mode: \"0600\"\n");
    }
    y
}

/// Render the systemd unit.
pub fn render_unit(mode: &K3sMode) -> String {
    let sub = if matches!(mode, K3sMode::Agent { .. }) {
        "agent"
    } else {
        "server"
    };
    format!(
        "# Written by clutch.\n\
         [Unit]\n\
         Description=Lightweight Kubernetes ({sub}, configured by clutch)\n\
         Documentation=https://k3s.io\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=notify\n\
         EnvironmentFile=-/etc/default/k3s\n\
         ExecStartPre=-/sbin/modprobe br_netfilter\n\
         ExecStartPre=-/sbin/modprobe overlay\n\
         ExecStart={K3S_BIN} {sub} --config {CONFIG}\n\
         KillMode=process\n\
         Delegate=yes\n\
         LimitNOFILE=1048576\n\
         LimitNPROC=infinity\n\
         LimitCORE=infinity\n\
         TasksMax=infinity\n\
         TimeoutStartSec=0\n\
         Restart=always\n\
         RestartSec=5s\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// `K10<sha256(ca)>::<user>:<secret>` (`server` for the server token, `node` for agents).
pub fn secure_token(ca_pem: &[u8], user: &str, secret: &str) -> Secret {
    Secret::new(format!(
        "K10{}::{user}:{secret}",
        hex::encode(Sha256::digest(ca_pem))
    ))
}

fn https(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("https://{a}:6443"),
        IpAddr::V6(a) => format!("https://[{a}]:6443"),
    }
}

pub struct K3sEngine {
    pub root: PathBuf,
    pub services: Arc<dyn ServiceManager>,
    pub runner: Arc<dyn CommandRunner>,
    /// Admin user that gets `~/.kube/config` on servers (uid/gid looked up in `<root>/etc/passwd`).
    pub admin_user: Option<String>,
    pub health_timeout: Duration,
}

impl K3sEngine {
    pub fn new(
        root: PathBuf,
        services: Arc<dyn ServiceManager>,
        runner: Arc<dyn CommandRunner>,
        admin_user: Option<String>,
    ) -> Self {
        K3sEngine {
            root,
            services,
            runner,
            admin_user,
            health_timeout: Duration::from_secs(300),
        }
    }

    fn path(&self, abs: &str) -> PathBuf {
        sys::under(&self.root, abs)
    }

    fn write(&self, me: &LocalNode, mode: &K3sMode) -> Result<(), EngineError> {
        clutch_os::fs::write_atomic(
            &self.path(CONFIG),
            render_config(me, mode).as_bytes(),
            0o600,
        )?;
        clutch_os::fs::write_atomic(&self.path(UNIT_FILE), render_unit(mode).as_bytes(), 0o644)?;
        Ok(())
    }

    fn read_secret(&self, abs: &str) -> Option<Secret> {
        let s = std::fs::read_to_string(self.path(abs)).ok()?;
        let s = s.trim();
        (!s.is_empty()).then(|| Secret::new(s.to_string()))
    }

    /// The shared secrets this server holds.
    fn secrets(&self) -> Result<ServerSecrets, EngineError> {
        match (
            self.read_secret(SECRET_FILE),
            self.read_secret(AGENT_SECRET_FILE),
        ) {
            (Some(secret), Some(agent_secret)) => Ok(ServerSecrets {
                secret,
                agent_secret,
            }),
            _ => Err(EngineError::BadInfo(
                "this server holds no k3s secrets (it cannot admit)".into(),
            )),
        }
    }

    fn save_secrets(&self, s: &ServerSecrets) -> Result<(), EngineError> {
        clutch_os::fs::write_atomic(&self.path(SECRET_FILE), s.secret.expose().as_bytes(), 0o600)?;
        clutch_os::fs::write_atomic(
            &self.path(AGENT_SECRET_FILE),
            s.agent_secret.expose().as_bytes(),
            0o600,
        )?;
        Ok(())
    }

    fn server_ca(&self) -> Result<Vec<u8>, EngineError> {
        let p = self.path(SERVER_CA);
        std::fs::read(&p).map_err(EngineError::read(p))
    }

    /// Copy the kubeconfig into the admin user's home, without following any link the user
    /// put there (see [`clutch_os::fs::write_in_user_dir`]).
    pub fn install_kubeconfig(&self) -> Result<(), EngineError> {
        let Some(user) = &self.admin_user else {
            return Ok(());
        };
        let Some((uid, gid, home)) = passwd_ids(&self.root, user) else {
            return Err(EngineError::BadInfo(format!(
                "user {user} not in /etc/passwd"
            )));
        };
        let src_path = self.path(KUBECONFIG);
        let src = std::fs::read(&src_path).map_err(EngineError::read(src_path))?;
        let home = sys::under(&self.root, &home.to_string_lossy());
        clutch_os::fs::write_in_user_dir(&home, ".kube", "config", &src, 0o600, (uid, gid))?;
        Ok(())
    }

    fn start(&self, me: &LocalNode, role: Role) -> Result<(), EngineError> {
        // The unit file was just written (server or agent): systemd must read it.
        self.services
            .install(UNIT)
            .map_err(|reason| EngineError::Service {
                unit: UNIT.into(),
                reason,
            })?;
        self.services
            .restart(UNIT)
            .map_err(|reason| EngineError::Service {
                unit: UNIT.into(),
                reason,
            })?;
        wait_until(self.health_timeout, || self.health_as(me, role))?;
        if role == Role::Server {
            self.install_kubeconfig()?;
        }
        Ok(())
    }

    fn health_as(&self, _me: &LocalNode, role: Role) -> Result<(), EngineError> {
        let (prog, args): (&str, Vec<String>) = if role == Role::Agent {
            (
                "systemctl",
                vec!["is-active".into(), "--quiet".into(), UNIT.into()],
            )
        } else {
            (
                K3S_BIN,
                vec![
                    "kubectl".into(),
                    "get".into(),
                    "--raw".into(),
                    "/readyz".into(),
                ],
            )
        };
        let out = self
            .runner
            .run(prog, &args, &[])
            .map_err(|e| EngineError::Unhealthy(e.to_string()))?;
        if out.ok() {
            Ok(())
        } else {
            Err(EngineError::Unhealthy(out.stderr.trim().to_string()))
        }
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, EngineError> {
        let mut a = vec!["kubectl".to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        let out = self
            .runner
            .run(K3S_BIN, &a, &[])
            .map_err(|e| EngineError::Command {
                command: format!("k3s {}", a.join(" ")),
                detail: e.to_string(),
            })?;
        Ok(out.stdout)
    }

    /// The join info for a further server or an agent, admitted by this (ready) server.
    fn join_info(&self, me: &LocalNode, role: Role) -> Result<K3sJoin, EngineError> {
        let secrets = self.secrets()?;
        let ca = self.server_ca()?;
        Ok(if role == Role::Agent {
            K3sJoin {
                init: false,
                server: me.addr,
                token: Some(secure_token(&ca, "node", secrets.agent_secret.expose())),
                secrets: None,
            }
        } else {
            K3sJoin {
                init: false,
                server: me.addr,
                token: Some(secure_token(&ca, "server", secrets.secret.expose())),
                secrets: Some(secrets),
            }
        })
    }
}

fn random_secret() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(hex::encode(bytes))
}

impl Engine for K3sEngine {
    fn name(&self) -> &'static str {
        "k3s"
    }
    fn plan_start(&self, role: Role) -> PlanStart {
        match role {
            Role::Agent => PlanStart::WhenServerReady,
            _ => PlanStart::OneByOne,
        }
    }
    fn found(&self, _me: &LocalNode, _plan: &Bootstrap) -> Result<(), EngineError> {
        if self.secrets().is_ok() {
            return Ok(());
        }
        self.save_secrets(&ServerSecrets {
            secret: random_secret(),
            agent_secret: random_secret(),
        })
    }
    fn request(&self, _me: &LocalNode) -> Result<Option<String>, EngineError> {
        Ok(None)
    }
    fn admit(
        &self,
        me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        how: Admission<'_>,
    ) -> Result<JoinInfo, EngineError> {
        if let Admission::FromPlan(plan) = how {
            if joiner.node_id == plan.leader && joiner.node_id == me.node_id {
                return Ok(JoinInfo::K3s(K3sJoin {
                    init: true,
                    server: me.addr,
                    token: None,
                    secrets: Some(self.secrets()?),
                }));
            }
        }
        if let Admission::Runtime { replaces, .. } = how {
            for s in replaces {
                // A replaced node: drop its old Kubernetes node object.
                let _ =
                    self.kubectl(&["delete", "node", s.hostname.as_str(), "--ignore-not-found"]);
            }
        }
        Ok(JoinInfo::K3s(self.join_info(me, role)?))
    }
    fn join(&self, me: &LocalNode, role: Role, info: &JoinInfo) -> Result<(), EngineError> {
        let j = match info {
            JoinInfo::K3s(j) => j,
            other => {
                return Err(EngineError::WrongEngine {
                    want: "k3s",
                    got: other.kind(),
                });
            }
        };
        let missing = |what: &str| EngineError::BadInfo(format!("k3s join info without {what}"));
        let mode = match (j.init, role) {
            (true, _) => K3sMode::Init {
                secrets: j.secrets.clone().ok_or_else(|| missing("secrets"))?,
            },
            (false, Role::Agent) => K3sMode::Agent {
                server_url: https(j.server),
                token: j.token.clone().ok_or_else(|| missing("a token"))?,
            },
            (false, _) => K3sMode::Server {
                server_url: https(j.server),
                token: j.token.clone().ok_or_else(|| missing("a token"))?,
                agent_secret: j
                    .secrets
                    .as_ref()
                    .map(|s| s.agent_secret.clone())
                    .ok_or_else(|| missing("secrets"))?,
            },
        };
        if let Some(s) = &j.secrets {
            self.save_secrets(s)?;
        }
        self.write(me, &mode)?;
        self.start(me, role)
    }
    fn resume(&self, _me: &LocalNode, _role: Role) -> Result<(), EngineError> {
        self.services
            .restart(UNIT)
            .map_err(|reason| EngineError::Service {
                unit: UNIT.into(),
                reason,
            })
    }
    fn health(&self, me: &LocalNode) -> Result<(), EngineError> {
        let role = match std::fs::read_to_string(self.path(UNIT_FILE)) {
            Ok(u) if u.contains(" agent ") => Role::Agent,
            _ => Role::Server,
        };
        self.health_as(me, role)
    }
    fn members(&self, _me: &LocalNode) -> Result<Vec<String>, EngineError> {
        Ok(self
            .kubectl(&["get", "nodes", "-o", "name"])?
            .lines()
            .map(|l| l.trim_start_matches("node/").to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }
}
