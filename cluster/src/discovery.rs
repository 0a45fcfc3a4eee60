//! mDNS discovery of `_clutch._tcp.local.` with mdns-sd (pure Rust; shares port 5353 with
//! avahi-daemon). Advertises only on links that carry the node's own address.
//!
//! Anyone on the LAN can advertise, so what is kept is bounded: only adverts of our own
//! cluster key, at most [`MAX_PEERS`] of them and [`MAX_PER_ADDRESS`] per address. The TXT
//! record carries only public values (the cluster key, the node id, phase, role, port).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::id::{ClusterKey, NodeId, Phase, Role};

pub const SERVICE_TYPE: &str = "_clutch._tcp.local.";

/// Which network interfaces discovery may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceFilter {
    /// Interface-name prefixes never used (virtual bridges, container links, loopback).
    pub deny_prefixes: Vec<String>,
    /// If set, only these interface names are used.
    pub only: Option<Vec<String>>,
}

impl Default for InterfaceFilter {
    fn default() -> Self {
        InterfaceFilter {
            deny_prefixes: [
                "lo", "docker", "cni", "flannel", "veth", "br-", "virbr", "cali", "tunl", "kube",
                "vxlan", "tap", "tun", "wg", "lxc", "podman",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            only: None,
        }
    }
}

impl InterfaceFilter {
    pub fn allows(&self, name: &str) -> bool {
        if let Some(only) = &self.only {
            return only.iter().any(|o| o == name);
        }
        !self
            .deny_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
    }
}

/// The node's own IPv4 addresses on allowed interfaces: (interface, address), routable
/// addresses before link-local ones.
pub fn local_addrs(filter: &InterfaceFilter) -> Vec<(String, IpAddr)> {
    let mut v: Vec<(String, IpAddr)> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .filter(|i| !i.is_loopback() && filter.allows(&i.name))
        .filter(|i| i.ip().is_ipv4())
        .map(|i| (i.name.clone(), i.ip()))
        .collect();
    v.sort_by_key(|(n, a)| {
        let ll = matches!(a, IpAddr::V4(v4) if v4.is_link_local());
        (ll, n.clone(), *a)
    });
    v
}

/// Adverts of our cluster key kept at most.
pub const MAX_PEERS: usize = 64;
/// Adverts kept per advertised address.
pub const MAX_PER_ADDRESS: usize = 4;

/// A clutch node seen on mDNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub node_id: NodeId,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
    pub phase: Option<Phase>,
    pub role: Option<String>,
    pub last_seen: Instant,
}

/// Peer table shared with the runtime, keyed by mDNS full name.
pub type PeerTable = Arc<Mutex<BTreeMap<String, Discovered>>>;

/// Everything that goes into our advertisement.
#[derive(Clone, Debug)]
pub struct Advert {
    pub node_id: NodeId,
    pub hostname: String,
    pub cluster: ClusterKey,
    pub addrs: Vec<IpAddr>,
    pub port: u16,
}

/// TXT properties. Never the token.
pub fn txt(a: &Advert, phase: Phase, role: Role) -> Vec<(String, String)> {
    vec![
        ("v".into(), "1".into()),
        ("cid".into(), a.cluster.to_string()),
        ("id".into(), a.node_id.to_string()),
        ("ph".into(), phase.as_str().into()),
        ("ro".into(), role.as_str().into()),
        ("port".into(), a.port.to_string()),
    ]
}

pub struct Discovery {
    daemon: ServiceDaemon,
    advert: Advert,
    pub peers: PeerTable,
    stop: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("mdns: {0}")]
pub struct DiscoveryError(String);

/// Keeps `entry` under `name` unless that would pass the table's bounds (an existing name
/// is always updated).
pub fn insert_bounded(table: &mut BTreeMap<String, Discovered>, name: String, entry: Discovered) {
    if !table.contains_key(&name) {
        if table.len() >= MAX_PEERS {
            tracing::debug!(%name, "mdns peer table full; advert ignored");
            return;
        }
        let same_addr = table
            .values()
            .filter(|d| d.addrs.iter().any(|a| entry.addrs.contains(a)))
            .count();
        if same_addr >= MAX_PER_ADDRESS {
            tracing::debug!(%name, "too many adverts for one address; ignored");
            return;
        }
    }
    table.insert(name, entry);
}

impl Discovery {
    pub fn start(filter: &InterfaceFilter, advert: Advert) -> Result<Discovery, DiscoveryError> {
        let e = |x: mdns_sd::Error| DiscoveryError(x.to_string());
        let daemon = ServiceDaemon::new().map_err(e)?;
        daemon.disable_interface(IfKind::All).map_err(e)?;
        let f = filter.clone();
        daemon
            .enable_interface(IfKind::Predicate(IfPredicate::new(move |i| {
                !i.is_loopback() && i.ip().is_ipv4() && f.allows(&i.name)
            })))
            .map_err(e)?;
        let _ = daemon.set_ip_check_interval(5);
        let d = Discovery {
            daemon,
            advert,
            peers: Arc::new(Mutex::new(BTreeMap::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        d.advertise(Phase::Discovering, Role::None)?;
        let rx = d.daemon.browse(SERVICE_TYPE).map_err(e)?;
        let peers = d.peers.clone();
        let stop = d.stop.clone();
        let me = d.advert.node_id.clone();
        let ours = d.advert.cluster.clone();
        std::thread::Builder::new()
            .name("clutch-mdns".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(ServiceEvent::ServiceResolved(s)) => {
                            let get = |k: &str| {
                                s.txt_properties.get_property_val_str(k).map(str::to_string)
                            };
                            let Some(id) = get("id").and_then(|i| i.parse::<NodeId>().ok()) else {
                                continue;
                            };
                            if id == me {
                                continue;
                            }
                            let mut addrs: Vec<IpAddr> =
                                s.addresses.iter().map(|a| a.to_ip_addr()).collect();
                            addrs.sort();
                            let port = get("port").and_then(|p| p.parse().ok()).unwrap_or(s.port);
                            if get("cid").as_deref() != Some(ours.as_str()) {
                                continue;
                            }
                            let entry = Discovered {
                                node_id: id,
                                addrs,
                                port,
                                phase: get("ph").and_then(|p| Phase::parse(&p)),
                                role: get("ro"),
                                last_seen: Instant::now(),
                            };
                            tracing::debug!(name = %s.fullname, ?entry, "mdns peer");
                            insert_bounded(&mut peers.lock().unwrap(), s.fullname.clone(), entry);
                        }
                        Ok(ServiceEvent::ServiceRemoved(_, fullname)) => {
                            peers.lock().unwrap().remove(&fullname);
                        }
                        Ok(_) => {}
                        Err(mdns_sd::RecvTimeoutError::Timeout) => {}
                        Err(_) => break,
                    }
                }
            })
            .map_err(|x| DiscoveryError(x.to_string()))?;
        Ok(d)
    }

    /// (Re-)register our service with the current phase and role.
    pub fn advertise(&self, phase: Phase, role: Role) -> Result<(), DiscoveryError> {
        let a = &self.advert;
        let instance = format!("clutch-{}", a.node_id);
        let host = format!("{}.local.", a.hostname);
        let props = txt(a, phase, role);
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &host,
            &a.addrs[..],
            a.port,
            &props[..],
        )
        .map_err(|x| DiscoveryError(x.to_string()))?;
        self.daemon
            .register(info)
            .map_err(|x| DiscoveryError(x.to_string()))
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.daemon.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_skips_virtual_links() {
        let f = InterfaceFilter::default();
        for bad in [
            "lo",
            "docker0",
            "cni0",
            "flannel.1",
            "veth12ab",
            "br-1234",
            "virbr0",
            "cali9",
            "tunl0",
            "kube-ipvs0",
        ] {
            assert!(!f.allows(bad), "{bad}");
        }
        for good in ["eth0", "enp1s0", "wlan0", "end0", "br0"] {
            assert!(f.allows(good), "{good}");
        }
        let only = InterfaceFilter {
            only: Some(vec!["eth1".into()]),
            ..Default::default()
        };
        assert!(only.allows("eth1") && !only.allows("eth0"));
    }

    #[test]
    fn the_peer_table_is_bounded() {
        let mut t = BTreeMap::new();
        let entry = |ip: &str| Discovered {
            node_id: "ab".parse().unwrap(),
            addrs: vec![ip.parse().unwrap()],
            port: 7373,
            phase: None,
            role: None,
            last_seen: Instant::now(),
        };
        for i in 0..10 {
            insert_bounded(&mut t, format!("n{i}"), entry("10.0.0.1"));
        }
        assert_eq!(t.len(), MAX_PER_ADDRESS);
        insert_bounded(&mut t, "n0".into(), entry("10.0.0.1"));
        assert_eq!(t.len(), MAX_PER_ADDRESS, "updates of a known name are kept");
        for i in 0..200 {
            insert_bounded(
                &mut t,
                format!("m{i}"),
                entry(&format!("10.0.{}.{}", i / 200 + 1, i % 200 + 2)),
            );
        }
        assert_eq!(t.len(), MAX_PEERS);
    }

    #[test]
    fn txt_never_carries_the_token() {
        let token = "super-secret-token-value-0123456789abcdef";
        let a = Advert {
            node_id: "abc".parse().unwrap(),
            hostname: "n".into(),
            cluster: crate::id::ClusterKey::new("lab", "etcd", 3, 3),
            addrs: vec![],
            port: 7443,
        };
        let t = txt(&a, Phase::Ready, Role::Server);
        for (k, v) in &t {
            assert!(!v.contains(token) && !k.contains(token));
        }
        assert!(t.contains(&("ph".into(), "ready".into())));
        assert!(t.contains(&("ro".into(), "server".into())));
    }
}
