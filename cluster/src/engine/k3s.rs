//! `k3s`: renders `/etc/rancher/k3s/config.yaml` and a systemd unit
//! (`server --cluster-init` / `server --server https://<first>:6443` / `agent`), with the
//! secure join token `K10<sha256 of the server CA>::server:<secret>`. The k3s binary itself
//! is installed by the image builder at [`K3S_BIN`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Engine, EngineError, Joiner, LocalNode, wait_until};
use crate::id::Role;
use crate::sys::{self, CommandRunner, ServiceManager};
use crate::wire::{JoinInfo, MemberInfo};

pub const K3S_BIN: &str = "/usr/local/bin/k3s";
pub const UNIT: &str = "k3s";
pub const CONFIG: &str = "/etc/rancher/k3s/config.yaml";
pub const UNIT_FILE: &str = "/etc/systemd/system/k3s.service";
pub const SERVER_CA: &str = "/var/lib/rancher/k3s/server/tls/server-ca.crt";
pub const KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
pub const SECRET_FILE: &str = "/var/lib/clutch/k3s-secret";

/// How this node runs k3s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum K3sMode {
    /// First server: `server --cluster-init` with the plain secret.
    Init {
        secret: String,
    },
    /// Further server joining `server_url` with the full secure token.
    Server {
        server_url: String,
        token: String,
    },
    Agent {
        server_url: String,
        token: String,
    },
}

/// The mDNS name every server answers (tls-san and registration name).
pub fn api_name(cluster: &str) -> String {
    format!("{cluster}-api.local")
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("string serialises")
}

fn addr_s(a: IpAddr) -> String {
    a.to_string()
}

/// Render config.yaml.
pub fn render_config(me: &LocalNode, mode: &K3sMode) -> String {
    let mut y = format!(
        "# Written by clutch for cluster {} on {}; rewritten at every join.\n",
        me.cluster_name, me.hostname
    );
    let server_common = |y: &mut String| {
        y.push_str(&format!("advertise-address: {}\n", q(&addr_s(me.addr))));
        y.push_str("tls-san:\n");
        for san in [
            api_name(&me.cluster_name),
            format!("{}.local", me.hostname),
            addr_s(me.addr),
        ] {
            y.push_str(&format!("  - {}\n", q(&san)));
        }
        y.push_str("write-kubeconfig-mode: \"0600\"\n");
    };
    match mode {
        K3sMode::Init { secret } => {
            y.push_str("cluster-init: true\n");
            y.push_str(&format!("token: {}\n", q(secret)));
        }
        K3sMode::Server { server_url, token } | K3sMode::Agent { server_url, token } => {
            y.push_str(&format!("server: {}\n", q(server_url)));
            y.push_str(&format!("token: {}\n", q(token)));
        }
    }
    y.push_str(&format!("node-name: {}\n", q(&me.hostname)));
    y.push_str(&format!("node-ip: {}\n", q(&addr_s(me.addr))));
    if !matches!(mode, K3sMode::Agent { .. }) {
        server_common(&mut y);
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

/// `K10<sha256(ca)>::server:<secret>`.
pub fn secure_token(ca_pem: &[u8], secret: &str) -> String {
    format!(
        "K10{}::server:{secret}",
        hex::encode(Sha256::digest(ca_pem))
    )
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

    fn write(&self, me: &LocalNode, mode: &K3sMode) -> Result<(), EngineError> {
        sys::write_atomic(
            &sys::under(&self.root, CONFIG),
            render_config(me, mode).as_bytes(),
            0o600,
        )?;
        sys::write_atomic(
            &sys::under(&self.root, UNIT_FILE),
            render_unit(mode).as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    fn secret(&self) -> Result<String, EngineError> {
        let p = sys::under(&self.root, SECRET_FILE);
        if let Ok(s) = std::fs::read_to_string(&p) {
            if !s.trim().is_empty() {
                return Ok(s.trim().to_string());
            }
        }
        let bytes: [u8; 24] = rand::random();
        let s = hex::encode(bytes);
        sys::write_atomic(&p, s.as_bytes(), 0o600)?;
        Ok(s)
    }

    /// Copy the kubeconfig to the admin user's home.
    pub fn install_kubeconfig(&self) -> Result<(), EngineError> {
        let Some(user) = &self.admin_user else {
            return Ok(());
        };
        let passwd = std::fs::read_to_string(sys::under(&self.root, "/etc/passwd"))?;
        let Some((uid, gid, home)) = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 6 && f[0] == user {
                Some((
                    f[2].parse::<u32>().ok()?,
                    f[3].parse::<u32>().ok()?,
                    f[5].to_string(),
                ))
            } else {
                None
            }
        }) else {
            return Err(EngineError::Io(format!("user {user} not in /etc/passwd")));
        };
        let src = std::fs::read(sys::under(&self.root, KUBECONFIG))?;
        let dir = sys::under(&self.root, &home).join(".kube");
        let dst = dir.join("config");
        sys::write_atomic(&dst, &src, 0o600)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid))?;
        Ok(())
    }

    fn start(&self, me: &LocalNode, role: Role) -> Result<(), EngineError> {
        self.services.restart(UNIT).map_err(EngineError::Service)?;
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
}

fn https(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("https://{a}:6443"),
        IpAddr::V6(a) => format!("https://[{a}]:6443"),
    }
}

impl Engine for K3sEngine {
    fn name(&self) -> &'static str {
        "k3s"
    }
    fn bootstrap(&self, me: &LocalNode) -> Result<(), EngineError> {
        let mode = K3sMode::Init {
            secret: self.secret()?,
        };
        self.write(me, &mode)?;
        self.start(me, Role::Server)
    }
    fn admit(
        &self,
        me: &LocalNode,
        joiner: &Joiner,
        _role: Role,
        stale: &[MemberInfo],
    ) -> Result<JoinInfo, EngineError> {
        for s in stale {
            // A replaced node: drop its old Kubernetes node object (ignore "not found").
            let _ = self.runner.run(
                K3S_BIN,
                &[
                    "kubectl".into(),
                    "delete".into(),
                    "node".into(),
                    s.hostname.clone(),
                    "--ignore-not-found".into(),
                ],
                &[],
            );
        }
        let ca = std::fs::read(sys::under(&self.root, SERVER_CA))?;
        let mut info = JoinInfo::new();
        info.insert("server_url".into(), https(me.addr));
        info.insert("token".into(), secure_token(&ca, &self.secret()?));
        let _ = joiner;
        Ok(info)
    }
    fn join(&self, me: &LocalNode, role: Role, info: &JoinInfo) -> Result<(), EngineError> {
        let server_url = info
            .get("server_url")
            .ok_or(EngineError::MissingInfo("server_url"))?
            .clone();
        let token = info
            .get("token")
            .ok_or(EngineError::MissingInfo("token"))?
            .clone();
        let mode = if role == Role::Agent {
            K3sMode::Agent { server_url, token }
        } else {
            K3sMode::Server { server_url, token }
        };
        self.write(me, &mode)?;
        self.start(me, role)
    }
    fn resume(&self, _me: &LocalNode, _role: Role) -> Result<(), EngineError> {
        self.services.restart(UNIT).map_err(EngineError::Service)
    }
    fn health(&self, me: &LocalNode) -> Result<(), EngineError> {
        let role = match std::fs::read_to_string(sys::under(&self.root, UNIT_FILE)) {
            Ok(u) if u.contains(" agent ") => Role::Agent,
            _ => Role::Server,
        };
        self.health_as(me, role)
    }
    fn members(&self, _me: &LocalNode) -> Result<Vec<String>, EngineError> {
        let out = self
            .runner
            .run(
                K3S_BIN,
                &[
                    "kubectl".into(),
                    "get".into(),
                    "nodes".into(),
                    "-o".into(),
                    "name".into(),
                ],
                &[],
            )
            .map_err(|e| EngineError::Command(e.to_string()))?;
        Ok(out
            .stdout
            .lines()
            .map(|l| l.trim_start_matches("node/").to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }
}
