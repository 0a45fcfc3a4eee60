//! The seam to cluster formation (the `clutch-cluster` crate): everything it needs comes in
//! through [`ClusterContext`], and it reports through the [`StatusSink`].
//!
//! [`form_cluster`] runs after node setup (READY=1 has already gone to systemd, so boot goes
//! on and systemd-networkd starts). It waits for an IPv4 address on a real link (one with a
//! device behind it: never a bridge, veth, CNI or tunnel link), then runs
//! [`clutch_cluster::form`] on a tokio runtime restricted to those real links, and keeps
//! serving peers for as long as the process lives. Every cluster status change is mapped to
//! firstboot's status (status.json and the console line on phase changes).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clutch_cluster::{NodeId, Role};
use clutch_config::{Cluster, Token};

use crate::status::{Phase, StatusSink, StatusUpdate};

#[derive(Debug, Clone)]
pub struct ClusterContext {
    pub cluster: Cluster,
    pub token: Token,
    /// 32 hex digits, stable per node (`/var/lib/clutch/node-id`); also the cluster node id.
    pub node_id: String,
    pub hostname: clutch_config::Hostname,
    /// Host path of `/var/lib/clutch` (the cluster code keeps its state under it).
    pub state_dir: PathBuf,
    /// The node's root directory (`/` on a node): engines write their config under it and
    /// links are read from `<root>/sys/class/net`.
    pub root: PathBuf,
    /// The image's user (k3s leaves the kubeconfig for it).
    pub admin_user: Option<String>,
}

/// A real link (it has a device: never lo, a bridge, a veth, CNI or a tunnel) and its IPv4
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAddrs {
    pub name: String,
    pub wireless: bool,
    pub v4: Vec<Ipv4Addr>,
}

/// How long a node that only has an IPv4 link-local address waits for a routable one
/// (a DHCP lease) before forming on link-local (the bare-switch case).
pub const LINK_LOCAL_GRACE: Duration = Duration::from_secs(10);

/// The cluster address: a routable IPv4 on a wired link, else on a wireless link; a
/// link-local address only once `ll_for` (how long link-local has been the best we have)
/// reaches `grace`. `None` = keep waiting.
pub fn choose_addr(
    links: &[LinkAddrs],
    ll_for: Duration,
    grace: Duration,
) -> Option<(String, Ipv4Addr)> {
    let pick = |routable: bool, wireless: bool| {
        links
            .iter()
            .filter(|l| l.wireless == wireless)
            .flat_map(|l| l.v4.iter().map(move |a| (l.name.clone(), *a)))
            .find(|(_, a)| a.is_link_local() != routable && !a.is_loopback())
    };
    pick(true, false).or_else(|| pick(true, true)).or_else(|| {
        if ll_for >= grace {
            pick(false, false).or_else(|| pick(false, true))
        } else {
            None
        }
    })
}

/// True when some real link has only a link-local address (so the grace clock runs).
fn has_link_local(links: &[LinkAddrs]) -> bool {
    links.iter().any(|l| l.v4.iter().any(|a| a.is_link_local()))
}

/// Real links (from `<root>/sys/class/net`) with their IPv4 addresses (getifaddrs).
pub fn real_links(root: &Path) -> Vec<LinkAddrs> {
    let links = crate::facts::net_links(&root.join("sys/class/net"));
    let mut addrs: Vec<(String, Ipv4Addr)> = Vec::new();
    if let Ok(it) = nix::ifaddrs::getifaddrs() {
        for ia in it {
            let v4 = ia
                .address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|s| s.ip());
            if let Some(ip) = v4 {
                addrs.push((ia.interface_name.clone(), ip));
            }
        }
    }
    links
        .into_iter()
        .map(|l| LinkAddrs {
            v4: addrs
                .iter()
                .filter(|(n, _)| *n == l.name)
                .map(|(_, a)| *a)
                .collect(),
            name: l.name,
            wireless: l.wireless,
        })
        .collect()
}

/// Maps a cluster status to firstboot's: phase, role (`pending` until decided), leader and
/// members as host names (the leader's id when its host name is not known yet), error.
pub fn map_status(s: &clutch_cluster::Status) -> StatusUpdate {
    let phase = s.phase;
    let role = match s.role {
        Role::None => "pending",
        Role::Server => "server",
        Role::Agent => "agent",
    };
    let leader = match &s.leader {
        None => String::new(),
        Some(id) => s
            .members
            .iter()
            .find(|m| &m.node_id == id)
            .map(|m| m.hostname.to_string())
            .or_else(|| (id == &s.node_id).then(|| s.hostname.to_string()))
            .unwrap_or_else(|| id.to_string()),
    };
    let mut members: Vec<String> = s.members.iter().map(|m| m.hostname.to_string()).collect();
    members.sort();
    members.dedup();
    StatusUpdate {
        leader: Some(leader),
        members: Some(members),
        waiting: Some(s.waiting.clone()),
        ..StatusUpdate::phase(phase).role(role).error(s.error.clone())
    }
}

/// An extra console line is due when the phase stayed (the sink printed nothing) but the
/// role or the member count changed.
fn console_line_due(shown: Option<&(Phase, String, usize)>, now: &(Phase, String, usize)) -> bool {
    match shown {
        None => false,
        Some(prev) => prev.0 == now.0 && prev != now,
    }
}

/// Hands cluster status changes to the thread that owns firstboot's sink.
struct ChannelSink(mpsc::Sender<clutch_cluster::Status>);

impl clutch_cluster::StatusSink for ChannelSink {
    fn update(&self, s: &clutch_cluster::Status) {
        let _ = self.0.send(s.clone());
    }
}

/// Forms (or rejoins) the cluster; called with the phase at `discovering`. Runs for as
/// long as the node should take part (the process stays alive meanwhile); returns only on
/// an error (then the caller reports `failed`).
pub fn form_cluster(ctx: &ClusterContext, sink: &dyn StatusSink) -> Result<(), String> {
    let node_id: NodeId = ctx
        .node_id
        .parse()
        .map_err(|e| format!("node id from /var/lib/clutch/node-id: {e}"))?;
    let mut cluster = ctx.cluster.clone();
    cluster.token = Some(ctx.token.clone());
    let (tx, rx) = mpsc::channel();
    let ctx2 = ctx.clone();
    let worker = std::thread::Builder::new()
        .name("clutch-cluster".into())
        .spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("tokio runtime: {e}"))?;
            rt.block_on(run_formation(ctx2, node_id, cluster, tx))
        })
        .map_err(|e| format!("cluster thread: {e}"))?;
    // Status changes arrive here until the formation thread ends (only on an error).
    let mut last_waiting = String::new();
    let mut shown: Option<(Phase, String, usize)> = None;
    for s in rx {
        if s.waiting != last_waiting && !s.waiting.is_empty() {
            tracing::info!(
                "cluster: {} (seen {}, authenticated {})",
                s.waiting,
                s.peers_seen,
                s.peers_authenticated
            );
        }
        last_waiting = s.waiting.clone();
        sink.set(map_status(&s));
        // The sink prints the console line on phase changes; print it again when only the
        // role or the member count changed, so the console (and `clutch lab status`, which
        // reads it) shows the cluster as it grows.
        let now = sink.get();
        let key = (now.phase, now.role.clone(), now.members.len());
        if console_line_due(shown.as_ref(), &key) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", now.console_line());
            let _ = out.flush();
        }
        shown = Some(key);
    }
    worker
        .join()
        .map_err(|_| "cluster thread panicked".to_string())?
}

async fn run_formation(
    ctx: ClusterContext,
    node_id: NodeId,
    cluster: Cluster,
    tx: mpsc::Sender<clutch_cluster::Status>,
) -> Result<(), String> {
    // networkd starts after READY=1: wait for an address on a real link.
    let started = Instant::now();
    let mut ll_since: Option<Instant> = None;
    let mut told = false;
    let (links, (ifname, addr)) = loop {
        let links = real_links(&ctx.root);
        if has_link_local(&links) {
            ll_since.get_or_insert_with(Instant::now);
        } else {
            ll_since = None;
        }
        let ll_for = ll_since.map(|t| t.elapsed()).unwrap_or_default();
        if let Some(c) = choose_addr(&links, ll_for, LINK_LOCAL_GRACE) {
            break (links, c);
        }
        if !told && started.elapsed() > Duration::from_secs(5) {
            told = true;
            tracing::info!(
                "cluster: waiting for an IPv4 address on a real link ({})",
                links
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    tracing::info!(
        "cluster: address {addr} on {ifname} after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut cfg = clutch_cluster::FormationConfig::new(
        node_id,
        ctx.hostname.clone(),
        &cluster,
        ctx.state_dir.clone(),
    )
    .map_err(|e| e.to_string())?;
    cfg.addr = Some(IpAddr::V4(addr));
    cfg.interfaces.only = Some(links.into_iter().map(|l| l.name).collect());
    let engine = clutch_cluster::engine_for(cluster.engine, ctx.root.clone(), ctx.admin_user);
    let outcome = clutch_cluster::form(cfg, engine, Arc::new(ChannelSink(tx)))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(
        "cluster: ready as {} with {} members{}",
        outcome.role,
        outcome.members.len(),
        if outcome.bootstrapped {
            " (bootstrapped it)"
        } else {
            ""
        }
    );
    outcome.serve().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clutch_cluster::MemberInfo;

    fn link(name: &str, wireless: bool, v4: &[&str]) -> LinkAddrs {
        LinkAddrs {
            name: name.into(),
            wireless,
            v4: v4.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn prefers_routable_wired_then_wireless_then_link_local_after_grace() {
        let g = LINK_LOCAL_GRACE;
        let none: Vec<LinkAddrs> = vec![link("enp0s3", false, &[])];
        assert_eq!(choose_addr(&none, g * 2, g), None);

        let both = vec![
            link("wlan0", true, &["192.168.1.20"]),
            link("enp0s3", false, &["169.254.3.4", "10.0.0.5"]),
        ];
        assert_eq!(
            choose_addr(&both, Duration::ZERO, g),
            Some(("enp0s3".into(), "10.0.0.5".parse().unwrap()))
        );
        let wifi = vec![
            link("enp0s3", false, &["169.254.3.4"]),
            link("wlan0", true, &["192.168.1.20"]),
        ];
        assert_eq!(
            choose_addr(&wifi, Duration::ZERO, g),
            Some(("wlan0".into(), "192.168.1.20".parse().unwrap()))
        );
        let ll = vec![link("enp0s3", false, &["169.254.3.4"])];
        assert_eq!(choose_addr(&ll, Duration::from_secs(3), g), None);
        assert_eq!(
            choose_addr(&ll, g, g),
            Some(("enp0s3".into(), "169.254.3.4".parse().unwrap()))
        );
        assert!(has_link_local(&ll) && !has_link_local(&none));
    }

    #[test]
    fn real_links_reads_sysfs_under_root() {
        // No device link in the fake tree: nothing counts as a real link.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("sys/class/net/br0")).unwrap();
        assert!(real_links(d.path()).is_empty());
    }

    fn member(id: &str, host: &str) -> MemberInfo {
        MemberInfo {
            node_id: id.parse().unwrap(),
            hostname: host.try_into().unwrap(),
            role: Role::Server,
            addr: "10.0.0.1".parse().unwrap(),
            key: clutch_cluster::Identity::generate().public(),
        }
    }

    fn status(phase: Phase, role: Role, leader: Option<&str>) -> clutch_cluster::Status {
        clutch_cluster::Status {
            phase,
            node_id: "aa".parse().unwrap(),
            hostname: "lab-aaaaaa".try_into().unwrap(),
            role,
            cluster: None,
            vote: None,
            leader: leader.map(|l| l.parse().unwrap()),
            members: vec![member("bb", "lab-bbbbbb"), member("aa", "lab-aaaaaa")],
            peers_seen: 2,
            peers_authenticated: 2,
            waiting: String::new(),
            warnings: vec![],
            error: None,
        }
    }

    #[test]
    fn maps_cluster_status_to_firstboot_status() {
        let u = map_status(&status(Phase::Discovering, Role::None, None));
        assert_eq!(u.phase, Some(Phase::Discovering));
        assert_eq!(u.role.as_deref(), Some("pending"));
        assert_eq!(u.leader.as_deref(), Some(""));
        assert_eq!(
            u.members,
            Some(vec!["lab-aaaaaa".to_string(), "lab-bbbbbb".to_string()])
        );
        assert_eq!(u.error, Some(None));

        let u = map_status(&status(Phase::Ready, Role::Server, Some("bb")));
        assert_eq!(u.phase, Some(Phase::Ready));
        assert_eq!(u.role.as_deref(), Some("server"));
        assert_eq!(u.leader.as_deref(), Some("lab-bbbbbb"));

        let mut s = status(Phase::Failed, Role::Agent, Some("cc"));
        s.error = Some("engine: etcd did not start".into());
        let u = map_status(&s);
        assert_eq!(u.phase, Some(Phase::Failed));
        assert_eq!(u.role.as_deref(), Some("agent"));
        assert_eq!(u.leader.as_deref(), Some("cc"), "unknown leader: its id");
        assert_eq!(u.error, Some(Some("engine: etcd did not start".into())));
    }

    #[test]
    fn extra_console_line_only_for_member_or_role_changes_within_a_phase() {
        let k = |p: Phase, r: &str, n: usize| (p, r.to_string(), n);
        let ready2 = k(Phase::Ready, "server", 2);
        assert!(!console_line_due(None, &ready2));
        assert!(console_line_due(
            Some(&ready2),
            &k(Phase::Ready, "server", 3)
        ));
        assert!(!console_line_due(Some(&ready2), &ready2));
        // A phase change is printed by the sink itself.
        assert!(!console_line_due(
            Some(&k(Phase::Joining, "server", 2)),
            &ready2
        ));
        assert!(console_line_due(
            Some(&k(Phase::Discovering, "pending", 0)),
            &k(Phase::Discovering, "server", 0)
        ));
    }

    #[test]
    fn console_lines_follow_cluster_phases() {
        use crate::status::StatusBoard;
        use std::sync::Mutex;
        let d = tempfile::tempdir().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let b = StatusBoard::new(
            d.path().join("status.json"),
            Box::new(move |s| l2.lock().unwrap().push(s.to_string())),
        );
        for (p, r) in [
            (Phase::Discovering, Role::None),
            (Phase::Discovering, Role::None),
            (Phase::Joining, Role::Server),
            (Phase::Ready, Role::Server),
        ] {
            b.set(map_status(&status(p, r, Some("bb"))));
        }
        assert_eq!(
            *lines.lock().unwrap(),
            vec![
                "clutch: phase=discovering host=- role=pending members=2",
                "clutch: phase=joining host=- role=server members=2",
                "clutch: phase=ready host=- role=server members=2",
            ]
        );
        let back = crate::status::read_status(b.path()).unwrap();
        assert_eq!(back.leader, "lab-bbbbbb");
        assert_eq!(back.waiting, "", "a ready node waits for nothing");
    }

    #[test]
    fn status_json_says_why_formation_waits() {
        use crate::status::StatusBoard;
        let d = tempfile::tempdir().unwrap();
        let b = StatusBoard::new(d.path().join("status.json"), Box::new(|_| {}));
        let mut s = status(Phase::Discovering, Role::None, None);
        s.waiting = "2/3 nodes authenticated (2 seen), need quorum 3; waiting".into();
        b.set(map_status(&s));
        let text = std::fs::read_to_string(b.path()).unwrap();
        assert!(
            text.contains(
                "\"waiting\": \"2/3 nodes authenticated (2 seen), need quorum 3; waiting\""
            ),
            "{text}"
        );
        let back = crate::status::read_status(b.path()).unwrap();
        assert!(back.human().contains("waiting:  2/3 nodes authenticated"));
    }
}
