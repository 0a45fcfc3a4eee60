//! `etcd`: Debian's etcd-server, configured through `/etc/default/etcd` (the
//! `EnvironmentFile` of Debian's `etcd.service`), members added with `etcdctl` (v3 API;
//! flags common to etcd 3.4 and 3.5).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Engine, EngineError, Joiner, LocalNode, wait_until};
use crate::id::Role;
use crate::sys::{self, CommandRunner, ServiceManager};
use crate::wire::{JoinInfo, MemberInfo};

pub const UNIT: &str = "etcd";
pub const ENV_FILE: &str = "/etc/default/etcd";
pub const DATA_DIR: &str = "/var/lib/etcd/clutch";
pub const LOCAL_ENDPOINT: &str = "http://127.0.0.1:2379";

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
    pub fn env_path(&self) -> PathBuf {
        sys::under(&self.root, ENV_FILE)
    }
    pub fn data_dir(&self) -> PathBuf {
        sys::under(&self.root, DATA_DIR)
    }

    fn ctl(&self, args: &[&str]) -> Result<String, EngineError> {
        let mut a: Vec<String> = vec![
            format!("--endpoints={LOCAL_ENDPOINT}"),
            "--dial-timeout=3s".into(),
            "--command-timeout=5s".into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let out = self
            .runner
            .run(&self.etcdctl, &a, &[("ETCDCTL_API".into(), "3".into())])
            .map_err(|e| EngineError::Command(format!("etcdctl: {e}")))?;
        if out.ok() {
            Ok(out.stdout)
        } else {
            Err(EngineError::Command(format!(
                "etcdctl {}: {}",
                args.join(" "),
                out.stderr.trim()
            )))
        }
    }

    fn write_env(
        &self,
        me: &LocalNode,
        initial_cluster: &str,
        state: &str,
    ) -> Result<(), EngineError> {
        let text = render_env(me, &self.data_dir(), initial_cluster, state);
        sys::write_atomic(&self.env_path(), text.as_bytes(), 0o644)?;
        Ok(())
    }

    fn start_fresh(&self) -> Result<(), EngineError> {
        let _ = self.services.stop(UNIT);
        let dd = self.data_dir();
        if dd.exists() {
            std::fs::remove_dir_all(&dd)?;
        }
        self.services.restart(UNIT).map_err(EngineError::Service)
    }

    fn wait_healthy(&self, me: &LocalNode) -> Result<(), EngineError> {
        wait_until(self.health_timeout, || self.health(me))
    }

    fn list(&self) -> Result<Vec<EtcdMember>, EngineError> {
        let out = self.ctl(&["member", "list", "-w", "json"])?;
        parse_member_list(&out)
    }
}

pub fn peer_url(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}:2380"),
        IpAddr::V6(a) => format!("http://[{a}]:2380"),
    }
}

fn client_url(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}:2379"),
        IpAddr::V6(a) => format!("http://[{a}]:2379"),
    }
}

/// The EnvironmentFile for Debian's etcd.service.
pub fn render_env(me: &LocalNode, data_dir: &Path, initial_cluster: &str, state: &str) -> String {
    let peer = peer_url(me.addr);
    let client = client_url(me.addr);
    format!(
        "# Written by clutch (cluster {cluster}); rewritten at every join.\n\
         ETCD_NAME={name}\n\
         ETCD_DATA_DIR={data}\n\
         ETCD_LISTEN_PEER_URLS={peer}\n\
         ETCD_INITIAL_ADVERTISE_PEER_URLS={peer}\n\
         ETCD_LISTEN_CLIENT_URLS={LOCAL_ENDPOINT},{client}\n\
         ETCD_ADVERTISE_CLIENT_URLS={client}\n\
         ETCD_INITIAL_CLUSTER={initial_cluster}\n\
         ETCD_INITIAL_CLUSTER_STATE={state}\n\
         ETCD_INITIAL_CLUSTER_TOKEN=clutch-{cid}\n",
        cluster = me.cluster_name,
        name = me.hostname,
        data = data_dir.display(),
        cid = &me.cluster_id[..16.min(me.cluster_id.len())],
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EtcdMember {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
}

pub fn parse_member_list(json: &str) -> Result<Vec<EtcdMember>, EngineError> {
    #[derive(Deserialize)]
    struct L {
        #[serde(default)]
        members: Vec<EtcdMember>,
    }
    serde_json::from_str::<L>(json)
        .map(|l| l.members)
        .map_err(|e| EngineError::Command(format!("etcdctl member list: {e}")))
}

/// Pull `ETCD_INITIAL_CLUSTER` out of `etcdctl member add` output.
pub fn parse_initial_cluster(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("ETCD_INITIAL_CLUSTER=")
            .map(|v| v.trim_matches('"').to_string())
    })
}

/// Members to remove before adding `joiner`: same name, or same peer URL (an added but
/// never started member has no name yet), or a stale hostname.
pub fn members_to_remove(list: &[EtcdMember], joiner: &Joiner, stale: &[MemberInfo]) -> Vec<u64> {
    let url = peer_url(joiner.addr);
    list.iter()
        .filter(|m| {
            (!m.name.is_empty()
                && (m.name == joiner.hostname || stale.iter().any(|s| s.hostname == m.name)))
                || m.peer_urls.contains(&url)
                || stale
                    .iter()
                    .filter_map(|s| s.addr)
                    .any(|a| m.peer_urls.contains(&peer_url(a)))
        })
        .map(|m| m.id)
        .collect()
}

impl Engine for EtcdEngine {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn bootstrap(&self, me: &LocalNode) -> Result<(), EngineError> {
        let ic = format!("{}={}", me.hostname, peer_url(me.addr));
        self.write_env(me, &ic, "new")?;
        self.start_fresh()?;
        self.wait_healthy(me)
    }
    fn admit(
        &self,
        _me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        stale: &[MemberInfo],
    ) -> Result<JoinInfo, EngineError> {
        let mut info = JoinInfo::new();
        if role != Role::Server {
            return Ok(info);
        }
        for id in members_to_remove(&self.list()?, joiner, stale) {
            tracing::info!(member = format!("{id:x}"), joiner = %joiner.hostname, "removing stale etcd member");
            self.ctl(&["member", "remove", &format!("{id:x}")])?;
        }
        let url = peer_url(joiner.addr);
        let out = self.ctl(&[
            "member",
            "add",
            &joiner.hostname,
            &format!("--peer-urls={url}"),
        ])?;
        let ic = parse_initial_cluster(&out)
            .ok_or_else(|| EngineError::Command(format!("no ETCD_INITIAL_CLUSTER in: {out}")))?;
        info.insert("initial_cluster".into(), ic);
        Ok(info)
    }
    fn join(&self, me: &LocalNode, role: Role, info: &JoinInfo) -> Result<(), EngineError> {
        if role != Role::Server {
            // Agents run no etcd member; they keep membership only.
            let _ = self.services.stop(UNIT);
            return Ok(());
        }
        let ic = info
            .get("initial_cluster")
            .ok_or(EngineError::MissingInfo("initial_cluster"))?;
        self.write_env(me, ic, "existing")?;
        self.start_fresh()?;
        self.wait_healthy(me)
    }
    fn resume(&self, _me: &LocalNode, role: Role) -> Result<(), EngineError> {
        if role == Role::Server {
            self.services.restart(UNIT).map_err(EngineError::Service)?;
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
mod tests {
    use super::*;
    use crate::sys::CmdOutput;
    use std::sync::Mutex;

    fn me() -> LocalNode {
        LocalNode {
            node_id: "aa".parse().unwrap(),
            hostname: "node-a".into(),
            addr: "10.0.0.1".parse().unwrap(),
            cluster_name: "lab".into(),
            cluster_id: "0123456789abcdef0123".into(),
        }
    }

    #[test]
    fn env_file_has_both_client_urls() {
        let e = render_env(
            &me(),
            Path::new("/var/lib/etcd/clutch"),
            "node-a=http://10.0.0.1:2380",
            "new",
        );
        let v = sys::parse_env_file(&e);
        let get = |k: &str| {
            v.iter()
                .find(|(a, _)| a == k)
                .map(|(_, b)| b.clone())
                .unwrap()
        };
        assert_eq!(
            get("ETCD_LISTEN_CLIENT_URLS"),
            "http://127.0.0.1:2379,http://10.0.0.1:2379"
        );
        assert_eq!(get("ETCD_LISTEN_PEER_URLS"), "http://10.0.0.1:2380");
        assert_eq!(get("ETCD_INITIAL_CLUSTER_STATE"), "new");
        assert_eq!(get("ETCD_NAME"), "node-a");
        assert_eq!(get("ETCD_INITIAL_CLUSTER_TOKEN"), "clutch-0123456789abcdef");
    }

    #[test]
    fn parses_member_add_and_list() {
        let out = "Member 8e9e05c52164694d added to cluster cdf818194e3a8c32\n\nETCD_NAME=\"b\"\nETCD_INITIAL_CLUSTER=\"a=http://10.0.0.1:2380,b=http://10.0.0.2:2380\"\nETCD_INITIAL_CLUSTER_STATE=\"existing\"\n";
        assert_eq!(
            parse_initial_cluster(out).unwrap(),
            "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380"
        );
        let list = r#"{"header":{"cluster_id":1},"members":[{"ID":10276657743932975437,"name":"a","peerURLs":["http://10.0.0.1:2380"],"clientURLs":["http://10.0.0.1:2379"]},{"ID":5,"peerURLs":["http://10.0.0.9:2380"]}]}"#;
        let m = parse_member_list(list).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].id, 10276657743932975437);
        let j = Joiner {
            node_id: "bb".parse().unwrap(),
            hostname: "b".into(),
            addr: "10.0.0.9".parse().unwrap(),
        };
        assert_eq!(
            members_to_remove(&m, &j, &[]),
            vec![5],
            "unstarted member with joiner's URL"
        );
        let stale = MemberInfo {
            node_id: "old".parse().unwrap(),
            hostname: "a".into(),
            role: Role::Server,
            addr: None,
        };
        assert_eq!(
            members_to_remove(&m, &j, &[stale]),
            vec![10276657743932975437, 5]
        );
    }

    struct FakeRunner(Mutex<Vec<Vec<String>>>);
    impl CommandRunner for FakeRunner {
        fn run(
            &self,
            _p: &str,
            args: &[String],
            _e: &[(String, String)],
        ) -> std::io::Result<CmdOutput> {
            self.0.lock().unwrap().push(args.to_vec());
            let a = args[3..].join(" ");
            let stdout = if a.starts_with("member list") {
                r#"{"members":[{"ID":255,"name":"b","peerURLs":["http://10.0.0.7:2380"]}]}"#
                    .to_string()
            } else if a.starts_with("member add") {
                "ETCD_INITIAL_CLUSTER=\"a=http://10.0.0.1:2380,b=http://10.0.0.2:2380\"\n"
                    .to_string()
            } else {
                String::new()
            };
            Ok(CmdOutput {
                code: 0,
                stdout,
                stderr: String::new(),
            })
        }
    }
    struct NoServices;
    impl ServiceManager for NoServices {
        fn restart(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
        fn stop(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn admit_removes_replaced_member_then_adds() {
        let runner = Arc::new(FakeRunner(Mutex::new(Vec::new())));
        let e = EtcdEngine::new("/nonexistent".into(), Arc::new(NoServices), runner.clone());
        let j = Joiner {
            node_id: "bb".parse().unwrap(),
            hostname: "b".into(),
            addr: "10.0.0.2".parse().unwrap(),
        };
        let info = e.admit(&me(), &j, Role::Server, &[]).unwrap();
        assert_eq!(
            info["initial_cluster"],
            "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380"
        );
        let calls: Vec<String> = runner
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|a| a[3..].join(" "))
            .collect();
        assert_eq!(
            calls,
            vec![
                "member list -w json",
                "member remove ff",
                "member add b --peer-urls=http://10.0.0.2:2380"
            ]
        );
        assert!(e.admit(&me(), &j, Role::Agent, &[]).unwrap().is_empty());
    }
}
