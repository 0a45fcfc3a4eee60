//! etcd's configuration as clutch writes it: `/etc/default/etcd` (the `EnvironmentFile` of
//! Debian's `etcd.service`), with TLS on the node's own address and plain HTTP only on
//! 127.0.0.1 (local tools such as `etcdctl` with no flags).

use std::net::IpAddr;
use std::path::Path;

use clutch_config::Hostname;
use serde::{Deserialize, Serialize};

use crate::id::InstanceId;

pub const LOCAL_ENDPOINT: &str = "http://127.0.0.1:2379";

/// One member of an initial cluster: `name=https://addr:2380`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: Hostname,
    pub addr: IpAddr,
}

/// `ETCD_INITIAL_CLUSTER_STATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    New,
    Existing,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        }
    }
}

fn url(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("https://{a}:{port}"),
        IpAddr::V6(a) => format!("https://[{a}]:{port}"),
    }
}

pub fn peer_url(addr: IpAddr) -> String {
    url(addr, 2380)
}

pub fn client_url(addr: IpAddr) -> String {
    url(addr, 2379)
}

/// `name=url,...` for `ETCD_INITIAL_CLUSTER`.
pub fn initial_cluster_string(peers: &[Peer]) -> String {
    peers
        .iter()
        .map(|p| format!("{}={}", p.name, peer_url(p.addr)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the TLS files are (under the node's root).
#[derive(Clone, Debug)]
pub struct TlsFiles<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Everything that goes into the env file.
pub struct EnvSpec<'a> {
    pub cluster_name: &'a str,
    pub name: &'a Hostname,
    pub addr: IpAddr,
    pub data_dir: &'a Path,
    pub initial_cluster: &'a [Peer],
    pub state: ClusterState,
    pub token: &'a InstanceId,
    /// The member id this node starts as, when known (a comment line; see [`env_member`]).
    pub member: Option<u64>,
    /// Paths as the node sees them (not under a test root).
    pub tls: TlsFiles<'a>,
}

/// The env file line that records the member id (`# member 8e9e05c52164694d`).
const ENV_MEMBER: &str = "# member ";

/// The EnvironmentFile for Debian's etcd.service. Every value in it is typed (host names,
/// addresses, an instance id, paths we chose), so nothing a peer sent can add a line.
pub fn render_env(s: &EnvSpec<'_>) -> String {
    let peer = peer_url(s.addr);
    let client = client_url(s.addr);
    let member = s
        .member
        .map(|m| format!("{ENV_MEMBER}{m:x}\n"))
        .unwrap_or_default();
    let (ca, cert, key) = (
        s.tls.ca.display(),
        s.tls.cert.display(),
        s.tls.key.display(),
    );
    format!(
        "# Written by clutch (cluster {cluster}); rewritten at every join.\n\
         {member}\
         ETCD_NAME={name}\n\
         ETCD_DATA_DIR={data}\n\
         ETCD_LISTEN_PEER_URLS={peer}\n\
         ETCD_INITIAL_ADVERTISE_PEER_URLS={peer}\n\
         ETCD_LISTEN_CLIENT_URLS={LOCAL_ENDPOINT},{client}\n\
         ETCD_ADVERTISE_CLIENT_URLS={client}\n\
         ETCD_INITIAL_CLUSTER={ic}\n\
         ETCD_INITIAL_CLUSTER_STATE={state}\n\
         ETCD_INITIAL_CLUSTER_TOKEN=clutch-{token}\n\
         ETCD_CLIENT_CERT_AUTH=true\n\
         ETCD_TRUSTED_CA_FILE={ca}\n\
         ETCD_CERT_FILE={cert}\n\
         ETCD_KEY_FILE={key}\n\
         ETCD_PEER_CLIENT_CERT_AUTH=true\n\
         ETCD_PEER_TRUSTED_CA_FILE={ca}\n\
         ETCD_PEER_CERT_FILE={cert}\n\
         ETCD_PEER_KEY_FILE={key}\n",
        cluster = s.cluster_name.replace(['\n', '\r'], " "),
        name = s.name,
        data = s.data_dir.display(),
        ic = initial_cluster_string(s.initial_cluster),
        state = s.state.as_str(),
        token = s.token,
    )
}

/// Is `env_text` an env file [`render_env`] wrote (not the one Debian's package ships)?
pub fn is_clutch_env(env_text: &str) -> bool {
    env_text
        .lines()
        .any(|l| l.starts_with("ETCD_INITIAL_CLUSTER_TOKEN=clutch-"))
}

/// The member id recorded in an env file by [`render_env`].
pub fn env_member(env_text: &str) -> Option<u64> {
    env_text.lines().find_map(|l| {
        l.strip_prefix(ENV_MEMBER)
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
    })
}

/// The cluster token an env file starts etcd with.
pub fn env_token(env_text: &str) -> Option<String> {
    env_text.lines().find_map(|l| {
        l.strip_prefix("ETCD_INITIAL_CLUSTER_TOKEN=")
            .map(|t| t.trim().to_string())
    })
}
