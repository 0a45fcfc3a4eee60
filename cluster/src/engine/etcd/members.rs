//! etcd's member lists (`etcdctl member list -w json`, `member add` output) and the
//! decision of how to admit a joiner into a running cluster.

use clutch_config::Hostname;
use serde::Deserialize;

use super::env::{Peer, peer_url};
use crate::engine::{EngineError, Joiner};
use crate::wire::MemberInfo;

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
        .map_err(|e| EngineError::Command {
            command: "etcdctl member list".into(),
            detail: e.to_string(),
        })
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

/// The host address of an `https://ADDR:2380` peer URL.
fn url_addr(u: &str) -> Option<std::net::IpAddr> {
    let rest = u.strip_prefix("https://")?.strip_suffix(":2380")?;
    rest.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// `ETCD_INITIAL_CLUSTER` out of `etcdctl member add` output, as typed peers. A value that
/// is not `name=https://addr:2380,...` is an error: it reaches a file.
pub fn parse_initial_cluster(out: &str) -> Result<Vec<Peer>, EngineError> {
    let v = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("ETCD_INITIAL_CLUSTER=")
                .map(|v| v.trim_matches('"').to_string())
        })
        .ok_or_else(|| EngineError::BadInfo(format!("no ETCD_INITIAL_CLUSTER in: {out}")))?;
    v.split(',')
        .map(|pair| {
            let (name, url) = pair
                .split_once('=')
                .ok_or_else(|| EngineError::BadInfo(format!("initial cluster entry {pair:?}")))?;
            Ok(Peer {
                name: Hostname::try_from(name).map_err(EngineError::BadInfo)?,
                addr: url_addr(url)
                    .ok_or_else(|| EngineError::BadInfo(format!("peer URL {url:?}")))?,
            })
        })
        .collect()
}

/// The initial cluster for member `own` (named `own_name`) of `list`: every named member
/// (an unstarted member other than `own` has no name yet and is left out: with state
/// `existing`, etcd learns the membership from its peers).
pub fn initial_cluster(list: &[EtcdMember], own: u64, own_name: &Hostname) -> Vec<Peer> {
    list.iter()
        .flat_map(|m| {
            let name = if m.id == own {
                Some(own_name.clone())
            } else {
                Hostname::try_from(m.name.as_str()).ok()
            };
            m.peer_urls
                .iter()
                .filter_map(|u| url_addr(u))
                .filter_map(move |addr| name.clone().map(|name| Peer { name, addr }))
        })
        .collect()
}

/// What admitting a server joiner takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmitPlan {
    /// The joiner already is member `id` (an earlier admission of it was cut short): no
    /// membership change, it starts as that member again.
    Rejoin { id: u64, initial_cluster: Vec<Peer> },
    /// Remove these members (a replaced node, an old entry for its URL), then add it.
    Add { remove: Vec<u64> },
}

/// Members to remove before adding `joiner`: same name, or same peer URL (an added but
/// never started member has no name yet), or a replaced node's.
pub fn members_to_remove(
    list: &[EtcdMember],
    joiner: &Joiner,
    replaces: &[MemberInfo],
) -> Vec<u64> {
    let url = peer_url(joiner.addr);
    list.iter()
        .filter(|m| {
            (!m.name.is_empty()
                && (m.name == joiner.hostname.as_str()
                    || replaces.iter().any(|s| s.hostname.as_str() == m.name)))
                || m.peer_urls.contains(&url)
                || replaces
                    .iter()
                    .any(|s| m.peer_urls.contains(&peer_url(s.addr)))
        })
        .map(|m| m.id)
        .collect()
}

/// Decide how to admit `joiner`, given the etcd member list and the clutch members it
/// replaces. It rejoins as the member that has its peer URL when that member is unstarted
/// or carries its hostname and no node is being replaced (a replacement has a new, empty
/// data dir: its member is removed and added anew, which needs quorum).
pub fn plan_admit(list: &[EtcdMember], joiner: &Joiner, replaces: &[MemberInfo]) -> AdmitPlan {
    let url = peer_url(joiner.addr);
    if replaces.is_empty() {
        let own = list.iter().find(|m| {
            m.peer_urls.contains(&url) && (m.name.is_empty() || m.name == joiner.hostname.as_str())
        });
        if let Some(m) = own {
            let duplicate = list
                .iter()
                .any(|o| o.id != m.id && o.name == joiner.hostname.as_str());
            if !duplicate {
                return AdmitPlan::Rejoin {
                    id: m.id,
                    initial_cluster: initial_cluster(list, m.id, &joiner.hostname),
                };
            }
        }
    }
    AdmitPlan::Add {
        remove: members_to_remove(list, joiner, replaces),
    }
}
