//! The lab as plain data: which VMs, taps, MACs, addresses and files a lab in a folder has
//! (`lab.json`), and the host commands that make its network (namespace, bridge, taps,
//! dnsmasq) and its disks. Nothing here runs anything; [`super::ops`] carries it out.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::access::AccessFiles;
use super::vm::Accel;

/// The lab's /24 inside its namespace.
pub const SUBNET: &str = "10.77.0";
pub const BRIDGE: &str = "br0";
pub const STATE_FILE: &str = "lab.json";
/// Extra virtual disk space over the image size (the root file system grows at first boot
/// and loopback storage lives on it); qcow2 overlays are sparse, so it costs nothing.
pub const DISK_HEADROOM: u64 = 3 << 30;
/// Most VMs one lab may have (addresses 10.77.0.11 up, one MAC byte per node).
pub const MAX_NODES: usize = 50;

/// A node of a lab by its index: `1` and `node1` both name the second VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeIndex(pub usize);

impl NodeIndex {
    pub fn name(self) -> String {
        format!("node{}", self.0)
    }
}

impl fmt::Display for NodeIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

impl FromStr for NodeIndex {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("node").unwrap_or(s);
        digits
            .parse::<usize>()
            .map(NodeIndex)
            .map_err(|_| format!("`{s}` is not a node (give its number, `1`, or name, `node1`)"))
    }
}

/// One VM of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub tap: String,
    pub mac: String,
    pub ip: String,
    pub overlay: PathBuf,
    pub pidfile: PathBuf,
    pub console: PathBuf,
}

/// Everything about a lab; saved as `DIR/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub namespace: String,
    pub dir: PathBuf,
    pub image: PathBuf,
    pub memory_mib: u32,
    pub nodes: Vec<NodeSpec>,
    pub dnsmasq_pidfile: PathBuf,
    /// The accelerator every VM of this lab runs on (`lab start` keeps it).
    #[serde(default)]
    pub accel: Accel,
    /// The lab's access keys (see [`super::access`]).
    pub access: AccessFiles,
}

impl LabState {
    /// The node `which` names, or an error listing the lab's nodes.
    pub fn node(&self, which: NodeIndex) -> Result<&NodeSpec> {
        self.nodes.get(which.0).with_context(|| {
            let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            format!(
                "no node `{which}` in the lab in {} (nodes: {})",
                self.dir.display(),
                names.join(", ")
            )
        })
    }
}

/// The namespace of the lab in `dir` (an absolute path): `clutch-lab-<8 hex>`.
pub fn ns_name(dir: &Path) -> String {
    let h = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("clutch-lab-{}", hex::encode(&h[..4]))
}

/// Plans a lab of `nodes` VMs of `image` in `dir` (absolute) on `accel`.
pub fn plan(
    dir: &Path,
    image: &Path,
    nodes: usize,
    memory_mib: u32,
    accel: Accel,
) -> Result<LabState> {
    if nodes == 0 || nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES} (got {nodes})");
    }
    let namespace = ns_name(dir);
    let h = sha2::Sha256::digest(namespace.as_bytes());
    let nodes = (0..nodes)
        .map(|i| NodeSpec {
            name: NodeIndex(i).name(),
            tap: format!("tap{i}"),
            // Locally administered (QEMU's 52:54:00 prefix), distinct per node and per lab.
            mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], i + 1),
            ip: format!("{SUBNET}.{}", 11 + i),
            overlay: dir.join(format!("node{i}.qcow2")),
            pidfile: dir.join(format!("node{i}.pid")),
            console: dir.join(format!("node{i}.console.log")),
        })
        .collect();
    Ok(LabState {
        access: AccessFiles::in_dir(dir, &namespace),
        namespace,
        dir: dir.to_path_buf(),
        image: image.to_path_buf(),
        memory_mib,
        nodes,
        dnsmasq_pidfile: dir.join("dnsmasq.pid"),
        accel,
    })
}

pub(crate) fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `ip` commands that make the namespace, its bridge and the taps.
pub fn setup_cmds(s: &LabState) -> Vec<Vec<String>> {
    let ns = s.namespace.as_str();
    let addr = format!("{SUBNET}.1/24");
    let mut v = vec![
        argv(&["ip", "netns", "add", ns]),
        argv(&["ip", "-n", ns, "link", "set", "lo", "up"]),
        argv(&["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"]),
        argv(&["ip", "-n", ns, "addr", "add", &addr, "dev", BRIDGE]),
        argv(&["ip", "-n", ns, "link", "set", BRIDGE, "up"]),
    ];
    for n in &s.nodes {
        let t = n.tap.as_str();
        v.push(argv(&[
            "ip", "-n", ns, "tuntap", "add", "dev", t, "mode", "tap",
        ]));
        v.push(argv(&["ip", "-n", ns, "link", "set", t, "master", BRIDGE]));
        v.push(argv(&["ip", "-n", ns, "link", "set", t, "up"]));
    }
    v
}

/// The commands that remove what [`setup_cmds`] made (errors are ignored: pieces may be gone).
pub fn teardown_cmds(s: Option<&LabState>, ns: &str) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<String>> = s
        .into_iter()
        .flat_map(|s| &s.nodes)
        .map(|n| argv(&["ip", "-n", ns, "link", "del", &n.tap]))
        .collect();
    v.push(argv(&["ip", "-n", ns, "link", "del", BRIDGE]));
    v
}

/// dnsmasq inside the namespace: DHCP only, a fixed address per MAC, nothing else.
pub fn dnsmasq_cmd(s: &LabState) -> Vec<String> {
    let mut v = argv(&["ip", "netns", "exec", &s.namespace, "dnsmasq"]);
    v.extend(argv(&[
        "--conf-file=/dev/null",
        "--port=0",
        "--interface",
        BRIDGE,
        "--bind-interfaces",
        "--except-interface=lo",
        "--dhcp-authoritative",
        "--user=root",
        "--log-dhcp",
        // No router, no DNS server: nothing to reach beyond the segment.
        "--dhcp-option=3",
        "--dhcp-option=6",
        &format!("--dhcp-range={SUBNET}.0,static,255.255.255.0,12h"),
    ]));
    v.push(format!(
        "--dhcp-leasefile={}",
        s.dir.join("dnsmasq.leases").display()
    ));
    v.push(format!("--pid-file={}", s.dnsmasq_pidfile.display()));
    v.push(format!(
        "--log-facility={}",
        s.dir.join("dnsmasq.log").display()
    ));
    for n in &s.nodes {
        // No name: the node's host name is its own (`lab-{id}`), not one handed out here.
        v.push(format!("--dhcp-host={},{}", n.mac, n.ip));
    }
    v
}

/// `qemu-img create` of a node's overlay; `size` in bytes (`None`: the image's size).
pub fn overlay_cmd(s: &LabState, n: &NodeSpec, size: Option<u64>) -> Vec<String> {
    super::vm::overlay_cmd(&s.image, &n.overlay, size.map(|b| b.to_string()).as_deref())
}

/// The overlay size for `image`: a raw image's virtual size is its file size, so the overlay
/// grows beyond it by [`DISK_HEADROOM`]; a qcow2 image keeps its own virtual size (`None`).
pub fn overlay_size(image: &Path, image_len: u64) -> Option<u64> {
    if image.extension().is_some_and(|e| e == "qcow2") {
        None
    } else {
        Some(image_len.div_ceil(1 << 20) * (1 << 20) + DISK_HEADROOM)
    }
}

/// Saves the lab state (temp name, fsync, rename).
pub fn save_state(s: &LabState) -> Result<()> {
    let p = s.dir.join(STATE_FILE);
    let tmp = s.dir.join(format!(".{STATE_FILE}.tmp"));
    let mut text = serde_json::to_vec_pretty(s)?;
    text.push(b'\n');
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(())
}

pub fn load_state(dir: &Path) -> Result<Option<LabState>> {
    let p = dir.join(STATE_FILE);
    match std::fs::read(&p) {
        Ok(t) => Ok(Some(
            serde_json::from_slice(&t).with_context(|| format!("{}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    pub(crate) fn lab(dir: &Path) -> LabState {
        plan(dir, Path::new("/img/lab.img"), 3, 768, Accel::Tcg).unwrap()
    }

    #[test]
    fn plan_gives_distinct_macs_ips_taps_inside_one_namespace() {
        let s = lab(Path::new("/tmp/x"));
        assert!(s.namespace.starts_with("clutch-lab-"));
        assert_eq!(s.namespace, ns_name(Path::new("/tmp/x")));
        assert_ne!(s.namespace, ns_name(Path::new("/tmp/y")));
        let macs: BTreeSet<_> = s.nodes.iter().map(|n| n.mac.clone()).collect();
        let ips: BTreeSet<_> = s.nodes.iter().map(|n| n.ip.clone()).collect();
        let taps: BTreeSet<_> = s.nodes.iter().map(|n| n.tap.clone()).collect();
        assert_eq!((macs.len(), ips.len(), taps.len()), (3, 3, 3));
        for m in &macs {
            assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        }
        assert!(plan(Path::new("/tmp/x"), Path::new("/i"), 0, 768, Accel::Tcg).is_err());
        assert!(plan(Path::new("/tmp/x"), Path::new("/i"), 51, 768, Accel::Tcg).is_err());
    }

    #[test]
    fn nodes_are_named_by_number_or_name() {
        assert_eq!("1".parse::<NodeIndex>(), Ok(NodeIndex(1)));
        assert_eq!("node2".parse::<NodeIndex>(), Ok(NodeIndex(2)));
        assert!(
            "nodeX"
                .parse::<NodeIndex>()
                .unwrap_err()
                .contains("`nodeX`")
        );
        let s = lab(Path::new("/tmp/x"));
        assert_eq!(s.node(NodeIndex(2)).unwrap().ip, "10.77.0.13");
        let e = s.node(NodeIndex(7)).unwrap_err();
        assert!(
            format!("{e:#}").contains("nodes: node0, node1, node2"),
            "{e:#}"
        );
    }

    #[test]
    fn every_network_command_stays_in_the_namespace() {
        let s = lab(Path::new("/tmp/x"));
        let ns = s.namespace.clone();
        for c in setup_cmds(&s).iter().chain(&teardown_cmds(Some(&s), &ns)) {
            assert!(
                c[..4] == ["ip", "netns", "add", ns.as_str()] || c[1..3] == ["-n", ns.as_str()],
                "{c:?}"
            );
        }
        let d = dnsmasq_cmd(&s);
        assert_eq!(d[..4], ["ip", "netns", "exec", ns.as_str()]);
        assert!(d.contains(&"--port=0".to_string()));
        assert!(d.contains(&"--dhcp-option=3".to_string()));
        for n in &s.nodes {
            assert!(d.contains(&format!("--dhcp-host={},{}", n.mac, n.ip)));
            let o = overlay_cmd(&s, n, Some(5 << 30));
            assert_eq!(o[5..7], ["-F", "raw"]);
            assert_eq!(o.last().unwrap(), &(5u64 << 30).to_string());
        }
    }

    #[test]
    fn overlays_of_raw_images_get_headroom() {
        assert_eq!(
            overlay_size(Path::new("a.img"), (1 << 30) + 1),
            Some((1 << 30) + (1 << 20) + DISK_HEADROOM)
        );
        assert_eq!(overlay_size(Path::new("a.qcow2"), 1 << 30), None);
    }

    #[test]
    fn state_round_trips_and_a_missing_file_is_no_lab() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        assert!(load_state(t.path()).unwrap().is_none());
        save_state(&s).unwrap();
        assert_eq!(load_state(t.path()).unwrap().unwrap(), s);
    }
}
