//! `etcd`: Debian's etcd-server, configured through `/etc/default/etcd` (the
//! `EnvironmentFile` of Debian's `etcd.service`), members added with `etcdctl` (v3 API;
//! flags common to etcd 3.4 and 3.5).
//!
//! # A join cut short
//!
//! A joiner can lose its power after the admitting server ran `etcdctl member add` for it
//! but before its own etcd is healthy. It then boots without `cluster.json` and asks to be
//! admitted again. Removing and re-adding its member, as for a replaced node, does not work
//! then: when it was the second member, the cluster has lost quorum until that very member
//! comes back, so `member remove` (and, on etcd 3.5, even `member list`) fails — forever.
//! So [`plan_admit`] lets a joiner that already is a member (its peer URL, unstarted or
//! under its own name, and no replaced node involved) back in as that same member, and when
//! quorum is lost the admitting server reads the member list from its own peer port
//! (`/members`, served from local state). The joiner restarts etcd on the data dir the cut
//! join left when that dir belongs to the same member (its WAL exists and the env file that
//! etcd started with names that member), else on an empty one.

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

/// `GET url` over plain HTTP, the body on status 200 (a seam for tests).
pub type HttpGet = dyn Fn(&str) -> Result<String, String> + Send + Sync;

pub struct EtcdEngine {
    /// Root for config and data paths ("/" on a node).
    pub root: PathBuf,
    pub services: Arc<dyn ServiceManager>,
    pub runner: Arc<dyn CommandRunner>,
    pub etcdctl: String,
    pub health_timeout: Duration,
    /// Reads the member list from etcd's peer port when the cluster has no quorum.
    pub http_get: Arc<HttpGet>,
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
            http_get: Arc::new(|url: &str| http_get(url, Duration::from_secs(5))),
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
        member: Option<u64>,
    ) -> Result<(), EngineError> {
        let text = render_env(me, &self.data_dir(), initial_cluster, state, member);
        sys::write_atomic(&self.env_path(), text.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Stop etcd, empty its data dir, then write the env file and start etcd on it. In this
    /// order, a data dir never holds the state of another member than the env file names.
    fn start_fresh(
        &self,
        me: &LocalNode,
        initial_cluster: &str,
        state: &str,
        member: Option<u64>,
    ) -> Result<(), EngineError> {
        let _ = self.services.stop(UNIT);
        let dd = self.data_dir();
        if dd.exists() {
            std::fs::remove_dir_all(&dd)?;
        }
        self.write_env(me, initial_cluster, state, member)?;
        self.services.restart(UNIT).map_err(EngineError::Service)
    }

    /// The member the env file was written for (`# member <hex id>`).
    pub fn env_member(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.env_path()).ok()?;
        env_member(&text)
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

    /// The members as this server knows them locally (its peer port's `/members`), for
    /// when the cluster has no quorum and `etcdctl member list` fails.
    fn local_members(&self, me: &LocalNode) -> Result<Vec<EtcdMember>, EngineError> {
        let url = format!("{}/members", peer_url(me.addr));
        let body =
            (self.http_get)(&url).map_err(|e| EngineError::Command(format!("{url}: {e}")))?;
        parse_peer_members(&body)
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

/// The EnvironmentFile for Debian's etcd.service; `member`: the etcd member id this node
/// starts as, when known (a comment line; see [`env_member`]).
pub fn render_env(
    me: &LocalNode,
    data_dir: &Path,
    initial_cluster: &str,
    state: &str,
    member: Option<u64>,
) -> String {
    let peer = peer_url(me.addr);
    let client = client_url(me.addr);
    let member = member
        .map(|m| format!("{ENV_MEMBER}{m:x}\n"))
        .unwrap_or_default();
    format!(
        "# Written by clutch (cluster {cluster}); rewritten at every join.\n\
         {member}\
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

/// The env file line that records the member id (`# member 8e9e05c52164694d`).
const ENV_MEMBER: &str = "# member ";

/// The member id recorded in an env file by [`render_env`].
pub fn env_member(env_text: &str) -> Option<u64> {
    env_text.lines().find_map(|l| {
        l.strip_prefix(ENV_MEMBER)
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    })
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

/// The member list etcd serves on its peer port (`GET <peer url>/members`): local state,
/// answered also without quorum. `[{"id":123,"name":"a","peerURLs":[...],...}, ...]`.
pub fn parse_peer_members(json: &str) -> Result<Vec<EtcdMember>, EngineError> {
    #[derive(Deserialize)]
    struct M {
        id: u64,
        #[serde(default)]
        name: String,
        #[serde(rename = "peerURLs", default)]
        peer_urls: Vec<String>,
    }
    serde_json::from_str::<Vec<M>>(json)
        .map(|v| {
            v.into_iter()
                .map(|m| EtcdMember {
                    id: m.id,
                    name: m.name,
                    peer_urls: m.peer_urls,
                })
                .collect()
        })
        .map_err(|e| EngineError::Command(format!("etcd /members: {e}")))
}

/// The new member's id from `etcdctl member add` output (`Member 8e9e05c52164694d added
/// to cluster ...`).
pub fn parse_added_id(out: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("Member ")?;
        let (id, tail) = rest.split_once(' ')?;
        if !tail.starts_with("added") {
            return None;
        }
        u64::from_str_radix(id, 16).ok()
    })
}

/// `ETCD_INITIAL_CLUSTER` for member `own` (named `own_name`) of `list`, as `etcdctl
/// member add` prints it: `name=peerURL` for every peer URL of every member (an unstarted
/// member has no name yet).
pub fn initial_cluster(list: &[EtcdMember], own: u64, own_name: &str) -> String {
    list.iter()
        .flat_map(|m| {
            let name = if m.id == own { own_name } else { &m.name };
            m.peer_urls.iter().map(move |u| format!("{name}={u}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What admitting a server joiner takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitPlan {
    /// The joiner already is member `id` (an earlier admission of it was cut short): no
    /// membership change, it starts as that member again.
    Rejoin { id: u64, initial_cluster: String },
    /// Remove these members (a replaced node, an old entry for its URL), then add it.
    Add { remove: Vec<u64> },
}

/// Decide how to admit `joiner`, given the etcd member list and the clutch members it
/// replaces (`stale`: same hostname, older node id). It rejoins as the member that has its
/// peer URL when that member is unstarted or carries its hostname and no node is being
/// replaced (a replacement has a new, empty data dir: its member is removed and added anew,
/// which needs quorum).
pub fn plan_admit(list: &[EtcdMember], joiner: &Joiner, stale: &[MemberInfo]) -> AdmitPlan {
    let url = peer_url(joiner.addr);
    if stale.is_empty() {
        let own = list.iter().find(|m| {
            m.peer_urls.contains(&url) && (m.name.is_empty() || m.name == joiner.hostname)
        });
        if let Some(m) = own {
            let duplicate = list
                .iter()
                .any(|o| o.id != m.id && o.name == joiner.hostname);
            if !duplicate {
                return AdmitPlan::Rejoin {
                    id: m.id,
                    initial_cluster: initial_cluster(list, m.id, &joiner.hostname),
                };
            }
        }
    }
    AdmitPlan::Add {
        remove: members_to_remove(list, joiner, stale),
    }
}

/// Plain `GET` of an `http://ADDR:PORT/path` URL (ADDR an IP literal), with `timeout` for
/// connecting and for each read; the body when the status is 200.
pub fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: std::net::SocketAddr = authority
        .parse()
        .map_err(|e| format!("{url}: {authority}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "no end of HTTP headers".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("HTTP status: {status}"));
    }
    Ok(body.to_string())
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
        self.start_fresh(me, &ic, "new", None)?;
        self.wait_healthy(me)
    }
    fn admit(
        &self,
        me: &LocalNode,
        joiner: &Joiner,
        role: Role,
        stale: &[MemberInfo],
    ) -> Result<JoinInfo, EngineError> {
        let mut info = JoinInfo::new();
        if role != Role::Server {
            return Ok(info);
        }
        let plan = match self.list() {
            Ok(list) => plan_admit(&list, joiner, stale),
            Err(e) => {
                // No quorum (etcd 3.5 serves `member list` only with quorum): typically a
                // one-member cluster that added this very joiner, which then lost power.
                // Our local view is enough to let that member back in; anything else
                // changes membership, which needs quorum: wait for it.
                let local = self.local_members(me).map_err(|e2| {
                    EngineError::Command(format!("{e}; and from the peer port: {e2}"))
                })?;
                match plan_admit(&local, joiner, stale) {
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
                info.insert("initial_cluster".into(), initial_cluster);
                info.insert("member_id".into(), format!("{id:x}"));
                info.insert("rejoin".into(), "true".into());
            }
            AdmitPlan::Add { remove } => {
                for id in remove {
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
                let ic = parse_initial_cluster(&out).ok_or_else(|| {
                    EngineError::Command(format!("no ETCD_INITIAL_CLUSTER in: {out}"))
                })?;
                info.insert("initial_cluster".into(), ic);
                if let Some(id) = parse_added_id(&out) {
                    info.insert("member_id".into(), format!("{id:x}"));
                }
            }
        }
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
        let member = info
            .get("member_id")
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        let rejoin = info.get("rejoin").is_some_and(|v| v == "true");
        if rejoin && member.is_some() && self.env_member() == member && self.has_wal() {
            // The cut-short join got as far as etcd's WAL: this member's raft state, which
            // the cluster may count on. Start from it.
            tracing::info!(
                member = format!("{:x}", member.unwrap_or_default()),
                "restarting etcd on the data dir of the interrupted join"
            );
            self.write_env(me, ic, "existing", member)?;
            self.services.restart(UNIT).map_err(EngineError::Service)?;
            match self.wait_healthy(me) {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!(
                    "etcd did not come up on the old data dir ({e}); starting over with an empty one"
                ),
            }
        }
        self.start_fresh(me, ic, "existing", member)?;
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
            Some(0x8e9e05c52164694d),
        );
        assert_eq!(env_member(&e), Some(0x8e9e05c52164694d));
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

    /// What `etcdctl member list -w json` and the peer port's `/members` said on etcd 3.5.16
    /// right after `member add c` on the one-member cluster `a` (so without quorum).
    const LIST_AFTER_ADD: &str = r#"{"header":{"cluster_id":1575429384540285186},"members":[{"ID":2516713510085588220,"peerURLs":["http://10.0.0.3:2380"]},{"ID":7048566815304704621,"name":"a","peerURLs":["http://10.0.0.1:2380"],"clientURLs":["http://10.0.0.1:2379"]}]}"#;
    const PEER_MEMBERS: &str = r#"[{"id":2516713510085588220,"peerURLs":["http://10.0.0.3:2380"]},{"id":7048566815304704621,"peerURLs":["http://10.0.0.1:2380"],"name":"a","clientURLs":["http://10.0.0.1:2379"]}]"#;
    const C_ID: u64 = 2516713510085588220;

    fn joiner_c() -> Joiner {
        Joiner {
            node_id: "cc".parse().unwrap(),
            hostname: "c".into(),
            addr: "10.0.0.3".parse().unwrap(),
        }
    }

    #[test]
    fn peer_members_and_member_add_output_parse() {
        let m = parse_peer_members(PEER_MEMBERS).unwrap();
        assert_eq!(m, parse_member_list(LIST_AFTER_ADD).unwrap());
        assert_eq!(m[0].id, C_ID);
        assert!(m[0].name.is_empty());
        let out = "Member 22ed299a7213f4fc added to cluster 15d0c0dbb2c5e902\n\nETCD_NAME=\"c\"\n";
        assert_eq!(parse_added_id(out), Some(0x22ed299a7213f4fc));
        assert_eq!(parse_added_id("Member list\n"), None);
        assert!(parse_peer_members("<html>").is_err());
    }

    #[test]
    fn a_joiner_that_is_a_member_already_rejoins_as_that_member() {
        let list = parse_member_list(LIST_AFTER_ADD).unwrap();
        let j = joiner_c();
        // Added but never started (no name yet): rejoin, no membership change.
        let want = AdmitPlan::Rejoin {
            id: C_ID,
            initial_cluster: "c=http://10.0.0.3:2380,a=http://10.0.0.1:2380".into(),
        };
        assert_eq!(plan_admit(&list, &j, &[]), want);
        // Started under its own name (its etcd ran before the power cut): the same.
        let mut started = list.clone();
        started[0].name = "c".into();
        assert_eq!(plan_admit(&started, &j, &[]), want);
        // A replaced node (same hostname, new node id, empty disk): remove, add anew.
        let stale = MemberInfo {
            node_id: "old".parse().unwrap(),
            hostname: "c".into(),
            role: Role::Server,
            addr: Some("10.0.0.3".parse().unwrap()),
        };
        assert_eq!(
            plan_admit(&started, &j, &[stale]),
            AdmitPlan::Add { remove: vec![C_ID] }
        );
        // Its address used to be another node's member: remove that one, add.
        let mut other = list.clone();
        other[0].name = "d".into();
        assert_eq!(
            plan_admit(&other, &j, &[]),
            AdmitPlan::Add { remove: vec![C_ID] }
        );
        // A member under its name elsewhere besides the one on its URL: no guessing.
        let mut dup = list.clone();
        dup.push(EtcdMember {
            id: 9,
            name: "c".into(),
            peer_urls: vec!["http://10.0.0.9:2380".into()],
        });
        assert_eq!(
            plan_admit(&dup, &j, &[]),
            AdmitPlan::Add {
                remove: vec![C_ID, 9]
            }
        );
        // Not a member: plain add.
        assert_eq!(
            plan_admit(&list[1..], &j, &[]),
            AdmitPlan::Add { remove: vec![] }
        );
    }

    /// etcdctl as a closure of its arguments (after the endpoint and timeout flags).
    struct ScriptRunner {
        calls: Mutex<Vec<String>>,
        answer: Box<dyn Fn(&str) -> CmdOutput + Send + Sync>,
    }
    impl CommandRunner for ScriptRunner {
        fn run(
            &self,
            _p: &str,
            args: &[String],
            _e: &[(String, String)],
        ) -> std::io::Result<CmdOutput> {
            let a = args[3..].join(" ");
            self.calls.lock().unwrap().push(a.clone());
            Ok((self.answer)(&a))
        }
    }
    fn ok(stdout: &str) -> CmdOutput {
        CmdOutput {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    fn failed(stderr: &str) -> CmdOutput {
        CmdOutput {
            code: 1,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
    #[derive(Default)]
    struct RecordingServices(Mutex<Vec<String>>);
    impl ServiceManager for RecordingServices {
        fn restart(&self, u: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("restart {u}"));
            Ok(())
        }
        fn stop(&self, u: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("stop {u}"));
            Ok(())
        }
    }

    #[test]
    fn without_quorum_the_member_it_waits_for_is_let_back_in_from_the_local_list() {
        let runner = Arc::new(ScriptRunner {
            calls: Mutex::new(vec![]),
            answer: Box::new(|a| {
                if a.starts_with("member list") {
                    failed("Error: context deadline exceeded")
                } else {
                    panic!("no membership change without quorum: {a}")
                }
            }),
        });
        let mut e = EtcdEngine::new("/nonexistent".into(), Arc::new(NoServices), runner.clone());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let a2 = asked.clone();
        e.http_get = Arc::new(move |url: &str| {
            a2.lock().unwrap().push(url.to_string());
            Ok(PEER_MEMBERS.to_string())
        });
        let a = LocalNode {
            hostname: "a".into(),
            ..me()
        };
        let info = e.admit(&a, &joiner_c(), Role::Server, &[]).unwrap();
        assert_eq!(info["rejoin"], "true");
        assert_eq!(info["member_id"], format!("{C_ID:x}"));
        assert_eq!(
            info["initial_cluster"],
            "c=http://10.0.0.3:2380,a=http://10.0.0.1:2380"
        );
        assert_eq!(*asked.lock().unwrap(), vec!["http://10.0.0.1:2380/members"]);
        assert_eq!(*runner.calls.lock().unwrap(), vec!["member list -w json"]);
        // Another node cannot be added without quorum: the error says why.
        let d = Joiner {
            node_id: "dd".parse().unwrap(),
            hostname: "d".into(),
            addr: "10.0.0.4".parse().unwrap(),
        };
        let err = e.admit(&a, &d, Role::Server, &[]).unwrap_err();
        assert!(err.to_string().contains("deadline exceeded"), "{err}");
    }

    #[test]
    fn with_quorum_a_started_rejoiner_keeps_its_member_and_a_new_one_gets_its_id() {
        let runner = Arc::new(ScriptRunner {
            calls: Mutex::new(vec![]),
            answer: Box::new(|a| {
                if a.starts_with("member list") {
                    ok(LIST_AFTER_ADD)
                } else if a.starts_with("member add") {
                    ok(
                        "Member 5 added to cluster 1\n\nETCD_INITIAL_CLUSTER=\"d=http://10.0.0.4:2380,a=http://10.0.0.1:2380\"\n",
                    )
                } else {
                    failed(&format!("unexpected {a}"))
                }
            }),
        });
        let e = EtcdEngine::new("/nonexistent".into(), Arc::new(NoServices), runner.clone());
        let info = e.admit(&me(), &joiner_c(), Role::Server, &[]).unwrap();
        assert_eq!(info["rejoin"], "true");
        assert_eq!(*runner.calls.lock().unwrap(), vec!["member list -w json"]);
        let d = Joiner {
            node_id: "dd".parse().unwrap(),
            hostname: "d".into(),
            addr: "10.0.0.4".parse().unwrap(),
        };
        let info = e.admit(&me(), &d, Role::Server, &[]).unwrap();
        assert_eq!(info["member_id"], "5");
        assert!(!info.contains_key("rejoin"));
    }

    /// A node root with an etcd data dir holding a WAL, and an env file for `member`.
    fn root_with_wal(
        member: Option<u64>,
    ) -> (tempfile::TempDir, EtcdEngine, Arc<RecordingServices>) {
        let t = tempfile::tempdir().unwrap();
        let services = Arc::new(RecordingServices::default());
        let runner = Arc::new(ScriptRunner {
            calls: Mutex::new(vec![]),
            answer: Box::new(|_| ok("")),
        });
        let mut e = EtcdEngine::new(t.path().into(), services.clone(), runner);
        e.health_timeout = Duration::from_millis(10);
        let wal = e.data_dir().join("member/wal");
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), b"w").unwrap();
        std::fs::create_dir_all(e.env_path().parent().unwrap()).unwrap();
        e.write_env(&me(), "x=http://10.0.0.9:2380", "existing", member)
            .unwrap();
        (t, e, services)
    }

    fn rejoin_info(member: u64) -> JoinInfo {
        let mut i = JoinInfo::new();
        i.insert(
            "initial_cluster".into(),
            "node-a=http://10.0.0.1:2380,b=http://10.0.0.2:2380".into(),
        );
        i.insert("member_id".into(), format!("{member:x}"));
        i.insert("rejoin".into(), "true".into());
        i
    }

    #[test]
    fn a_rejoin_restarts_on_the_wal_of_the_same_member_and_wipes_anything_else() {
        // Same member, WAL there: etcd restarts on it, nothing is removed.
        let (_t, e, services) = root_with_wal(Some(0xabc));
        e.join(&me(), Role::Server, &rejoin_info(0xabc)).unwrap();
        assert!(e.has_wal(), "the WAL of the interrupted join is kept");
        assert_eq!(*services.0.lock().unwrap(), vec!["restart etcd"]);
        let env = std::fs::read_to_string(e.env_path()).unwrap();
        assert!(env.contains("ETCD_INITIAL_CLUSTER=node-a=http://10.0.0.1:2380,b="));
        assert_eq!(env_member(&env), Some(0xabc));

        // The WAL belongs to another member (an older admission): wiped, then started.
        let (_t, e, services) = root_with_wal(Some(0xdef));
        e.join(&me(), Role::Server, &rejoin_info(0xabc)).unwrap();
        assert!(!e.has_wal());
        assert_eq!(
            *services.0.lock().unwrap(),
            vec!["stop etcd", "restart etcd"]
        );
        assert_eq!(e.env_member(), Some(0xabc));

        // No member recorded (written before the env file knew it): wiped.
        let (_t, e, _) = root_with_wal(None);
        e.join(&me(), Role::Server, &rejoin_info(0xabc)).unwrap();
        assert!(!e.has_wal());

        // A fresh admission (not a rejoin) always starts on an empty data dir.
        let (_t, e, _) = root_with_wal(Some(0xabc));
        let mut fresh = rejoin_info(0xabc);
        fresh.remove("rejoin");
        e.join(&me(), Role::Server, &fresh).unwrap();
        assert!(!e.has_wal());
    }

    #[test]
    fn a_rejoin_whose_old_data_dir_does_not_come_up_starts_over_empty() {
        let (_t, mut e, services) = root_with_wal(Some(0xabc));
        let healthy_after = Arc::new(Mutex::new(0usize));
        let svc = services.clone();
        let h = healthy_after.clone();
        e.runner = Arc::new(ScriptRunner {
            calls: Mutex::new(vec![]),
            // Healthy only once etcd was restarted a second time (on the empty dir).
            answer: Box::new(move |a| {
                let restarts = svc
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.starts_with("restart"))
                    .count();
                *h.lock().unwrap() = restarts;
                if a.starts_with("endpoint health") && restarts < 2 {
                    failed("unhealthy")
                } else {
                    ok("")
                }
            }),
        });
        e.join(&me(), Role::Server, &rejoin_info(0xabc)).unwrap();
        assert!(!e.has_wal(), "the broken data dir is gone");
        assert_eq!(
            *services.0.lock().unwrap(),
            vec!["restart etcd", "stop etcd", "restart etcd"]
        );
        assert_eq!(*healthy_after.lock().unwrap(), 2);
    }

    #[test]
    fn http_get_reads_the_body_of_a_200_and_names_other_statuses() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut reqs = Vec::new();
            for reply in [
                format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{PEER_MEMBERS}"),
                "HTTP/1.0 404 Not Found\r\n\r\nnope".to_string(),
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                reqs.push(String::from_utf8_lossy(&req).into_owned());
                c.write_all(reply.as_bytes()).unwrap();
            }
            reqs
        });
        let url = format!("http://{addr}/members");
        let body = http_get(&url, Duration::from_secs(5)).unwrap();
        assert_eq!(parse_peer_members(&body).unwrap().len(), 2);
        let e = http_get(&url, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("404"), "{e}");
        let reqs = server.join().unwrap();
        assert!(
            reqs[0].starts_with("GET /members HTTP/1.0\r\n"),
            "{}",
            reqs[0]
        );
        assert!(http_get("https://x/", Duration::from_secs(1)).is_err());
    }
}
