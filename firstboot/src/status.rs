//! The live status (`/run/clutch/status.json`) and the console line on every phase change.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::fsx;

pub use clutch_config::Phase;

/// One loopback device as reported in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStatus {
    pub name: String,
    /// The stable path, `/dev/clutch/<name>`.
    pub device: String,
    /// The loop device it points to (`/dev/loop0`); empty when attaching failed.
    pub loop_device: String,
    pub size_bytes: u64,
    /// Mount point when `format = "ext4"`, else empty.
    pub mount: String,
}

/// `/run/clutch/status.json`. Role is `none` without `[cluster]`, `pending` before the cluster
/// code decides; leader is empty until one is known; members are host names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub hostname: String,
    pub node_id: String,
    pub role: String,
    pub leader: String,
    pub members: Vec<String>,
    pub storage: Vec<StorageStatus>,
    /// Settings this node could not apply as given, and what it did instead (a legacy time
    /// zone mapped, a user name refused); the node still comes up.
    #[serde(default)]
    pub warnings: Vec<String>,
    pub error: Option<String>,
    /// Cluster formation: why this node is waiting (peers seen vs needed, settle time), or
    /// empty. Beyond SPEC's keys, for people asking "why is it stuck".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub waiting: String,
    /// The running release (`IMAGE_VERSION` of os-release, the config's `[image] release`)
    /// and, on A/B images, its root slot; empty when unknown.
    #[serde(default)]
    pub release: String,
    #[serde(default)]
    pub slot: String,
    /// Updates (A/B images): see [`crate::update::state::UpdateStatus`].
    #[serde(default)]
    pub update: Option<crate::update::state::UpdateStatus>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            phase: Phase::Configuring,
            hostname: String::new(),
            node_id: String::new(),
            role: "none".into(),
            leader: String::new(),
            members: Vec::new(),
            storage: Vec::new(),
            warnings: Vec::new(),
            error: None,
            waiting: String::new(),
            release: String::new(),
            slot: String::new(),
            update: None,
        }
    }
}

impl Status {
    /// The console line: `clutch: phase=<phase> host=<hostname> role=<role> members=<n>`,
    /// and for `failed` ` error="<short reason>"`.
    pub fn console_line(&self) -> String {
        let mut line = format!(
            "clutch: phase={} host={} role={} members={}",
            self.phase,
            if self.hostname.is_empty() {
                "-"
            } else {
                &self.hostname
            },
            if self.role.is_empty() {
                "-"
            } else {
                &self.role
            },
            self.members.len()
        );
        if let (Phase::Failed, Some(e)) = (self.phase, &self.error) {
            line += &format!(" error=\"{}\"", short_reason(e));
        }
        line
    }

    /// `clutch-status.txt` on the FAT partition: what a person reading the card on another
    /// computer needs to know about the node.
    pub fn report(&self, addresses: &[String]) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let mut s = format!(
            "clutch node status, written by clutch-firstboot at every phase change.\r\n\r\n\
             phase:     {}\r\nhostname:  {}\r\naddresses: {}\r\nrelease:   {}\r\nrole:      {}\r\nmembers:   {}\r\n",
            self.phase,
            dash(&self.hostname),
            if addresses.is_empty() {
                "none yet (the network comes up after this service)".to_string()
            } else {
                addresses.join(" ")
            },
            dash(&self.release),
            dash(&self.role),
            self.members.len(),
        );
        for w in &self.warnings {
            s += &format!("warning:   {w}\r\n");
        }
        s += &format!("error:     {}\r\n", self.error.as_deref().unwrap_or("none"));
        s
    }

    /// A multi-line report for a person (`clutch-firstboot status`).
    pub fn human(&self) -> String {
        let mut s = format!(
            "phase:    {}\nhostname: {}\nnode id:  {}\nrole:     {}\n",
            self.phase, self.hostname, self.node_id, self.role
        );
        if !self.leader.is_empty() {
            s += &format!("leader:   {}\n", self.leader);
        }
        s += &format!("members:  {}", self.members.len());
        if !self.members.is_empty() {
            s += &format!(" ({})", self.members.join(", "));
        }
        s.push('\n');
        for d in &self.storage {
            s += &format!(
                "storage:  {} -> {} ({} bytes){}\n",
                d.device,
                if d.loop_device.is_empty() {
                    "not attached"
                } else {
                    &d.loop_device
                },
                d.size_bytes,
                if d.mount.is_empty() {
                    String::new()
                } else {
                    format!(", mounted on {}", d.mount)
                }
            );
        }
        if !self.waiting.is_empty() {
            s += &format!("waiting:  {}\n", self.waiting);
        }
        if !self.release.is_empty() {
            s += &format!("release:  {} (slot {})\n", self.release, self.slot);
        }
        if let Some(u) = &self.update {
            s += &format!("update:   {}", u.state);
            if !u.release.is_empty() {
                s += &format!(" release {}", u.release);
            }
            if !u.reason.is_empty() {
                s += &format!(": {}", u.reason);
            }
            s.push('\n');
        }
        for w in &self.warnings {
            s += &format!("warning:  {w}\n");
        }
        if let Some(e) = &self.error {
            s += &format!("error:    {e}\n");
        }
        s
    }

    pub fn apply(&mut self, u: StatusUpdate) {
        if let Some(p) = u.phase {
            self.phase = p;
        }
        if let Some(h) = u.hostname {
            self.hostname = h;
        }
        if let Some(n) = u.node_id {
            self.node_id = n;
        }
        if let Some(r) = u.role {
            self.role = r;
        }
        if let Some(l) = u.leader {
            self.leader = l;
        }
        if let Some(m) = u.members {
            self.members = m;
        }
        if let Some(s) = u.storage {
            self.storage = s;
        }
        if let Some(w) = u.warnings {
            self.warnings = w;
        }
        if let Some(e) = u.error {
            self.error = e;
        }
        if let Some(w) = u.waiting {
            self.waiting = w;
        }
    }
}

/// A partial change of the status; unset fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusUpdate {
    pub phase: Option<Phase>,
    pub hostname: Option<String>,
    pub node_id: Option<String>,
    pub role: Option<String>,
    pub leader: Option<String>,
    pub members: Option<Vec<String>>,
    pub storage: Option<Vec<StorageStatus>>,
    pub warnings: Option<Vec<String>>,
    pub error: Option<Option<String>>,
    pub waiting: Option<String>,
}

impl StatusUpdate {
    pub fn phase(p: Phase) -> Self {
        StatusUpdate {
            phase: Some(p),
            ..Default::default()
        }
    }
    pub fn role(mut self, r: impl Into<String>) -> Self {
        self.role = Some(r.into());
        self
    }
    pub fn leader(mut self, l: impl Into<String>) -> Self {
        self.leader = Some(l.into());
        self
    }
    pub fn members(mut self, m: Vec<String>) -> Self {
        self.members = Some(m);
        self
    }
    pub fn error(mut self, e: Option<String>) -> Self {
        self.error = Some(e);
        self
    }
}

/// The status report's name on the FAT partition.
pub const REPORT_FILE: &str = "clutch-status.txt";

/// The node's addresses (every interface but loopback), as `eth0 192.168.1.20/24`.
pub fn addresses() -> Vec<String> {
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for i in ifs {
        if i.interface_name == "lo" {
            continue;
        }
        let Some(a) = i.address else { continue };
        if let Some(v4) = a.as_sockaddr_in() {
            out.push(format!("{} {}", i.interface_name, v4.ip()));
        } else if let Some(v6) = a.as_sockaddr_in6() {
            out.push(format!("{} {}", i.interface_name, v6.ip()));
        }
    }
    out
}

/// An error in a few words for the console line: no directories, at most 100 characters,
/// no quotes or control characters.
pub fn short_reason(e: &str) -> String {
    let first = e.lines().next().unwrap_or("");
    // `/boot/efi/clutch.toml:4:12: ...` -> `clutch.toml:4:12: ...`
    let start = first.split(' ').next().unwrap_or("");
    let trimmed = match start.rfind('/') {
        Some(i) if start.starts_with('/') => &first[i + 1..],
        _ => first,
    };
    let clean: String = trimmed
        .chars()
        .map(|c| if c == '"' { '\'' } else { c })
        .filter(|c| !c.is_control())
        .collect();
    if clean.chars().count() > 100 {
        clean.chars().take(99).collect::<String>() + "…"
    } else {
        clean
    }
}

/// Where status updates go. The cluster code gets a `&dyn StatusSink`.
pub trait StatusSink: Send + Sync {
    fn set(&self, update: StatusUpdate);
    /// The current status (a copy).
    fn get(&self) -> Status;
}

type Console = Box<dyn Fn(&str) + Send + Sync>;

/// The real sink: keeps the status in memory, rewrites `status.json` on every change and
/// prints the console line when the phase changes.
pub struct StatusBoard {
    path: PathBuf,
    state: Mutex<(Status, Option<Phase>)>,
    console: Console,
    report: Option<(PathBuf, Addresses)>,
}

type Addresses = Box<dyn Fn() -> Vec<String> + Send + Sync>;

impl StatusBoard {
    /// `path` is the host path of `status.json`; `console` receives each phase line.
    pub fn new(path: PathBuf, console: Console) -> Self {
        StatusBoard {
            path,
            state: Mutex::new((Status::default(), None)),
            console,
            report: None,
        }
    }

    /// Also writes `clutch-status.txt` (host path `path`) at every phase change, with the
    /// node's addresses from `addresses`.
    pub fn with_report(mut self, path: PathBuf, addresses: Addresses) -> Self {
        self.report = Some((path, addresses));
        self
    }

    /// The release shown in the status.
    pub fn set_release(&self, release: String) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0.release = release;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl StatusSink for StatusBoard {
    fn set(&self, update: StatusUpdate) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (status, printed) = &mut *g;
        status.apply(update);
        if let Err(e) = write_status(&self.path, status) {
            tracing::warn!("cannot write {}: {e}", self.path.display());
        }
        if *printed != Some(status.phase) {
            *printed = Some(status.phase);
            (self.console)(&status.console_line());
            if let Some((p, addresses)) = &self.report {
                let text = status.report(&addresses());
                if let Err(e) = fsx::write_atomic(p, text.as_bytes(), 0o644) {
                    tracing::warn!("cannot write {}: {e}", p.display());
                }
            }
        }
    }

    fn get(&self) -> Status {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

pub fn write_status(path: &Path, s: &Status) -> io::Result<()> {
    // `clutch-firstboot update` runs in another process: take its part from update.json.
    let mut s = s.clone();
    if let Some(live) = crate::update::state::Live::load(&path.with_file_name("update.json")) {
        crate::update::merge(&mut s, &live);
    }
    let mut json = serde_json::to_vec_pretty(&s).map_err(io::Error::other)?;
    json.push(b'\n');
    fsx::write_atomic(path, &json, 0o644)
}

pub fn read_status(path: &Path) -> io::Result<Status> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Every active kernel console (`console=serial0 console=tty1` on a Pi is serial and HDMI;
/// /dev/console alone is only the last one), else /dev/console.
pub fn console_devices() -> Vec<std::path::PathBuf> {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let v: Vec<std::path::PathBuf> = active
        .split_whitespace()
        .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(|n| std::path::Path::new("/dev").join(n))
        .collect();
    if v.is_empty() {
        vec![std::path::PathBuf::from("/dev/console")]
    } else {
        v
    }
}

/// A line for people at the node: to stdout (the journal) and to every active console as
/// it is (journald's forwarding would prefix it with `clutch-firstboot[pid]:`).
pub fn print_console(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    for dev in console_devices() {
        if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open(&dev) {
            let _ = c.write_all(format!("{line}\r\n").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn json_shape_matches_the_spec() {
        let s = Status {
            hostname: "node-abc123".into(),
            node_id: "abc123".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        for k in [
            "phase", "hostname", "node_id", "role", "leader", "members", "storage", "warnings",
            "error",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} missing from {v}");
        }
        assert_eq!(v["phase"], "configuring");
        assert_eq!(v["warnings"], serde_json::json!([]));
        assert!(v["error"].is_null());
    }

    #[test]
    fn console_line_once_per_phase_change() {
        let d = tempfile::tempdir().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let b = StatusBoard::new(
            d.path().join("run/clutch/status.json"),
            Box::new(move |s| l2.lock().unwrap().push(s.to_string())),
        );
        b.set(StatusUpdate {
            hostname: Some("node-1".into()),
            ..StatusUpdate::phase(Phase::Configuring)
        });
        b.set(StatusUpdate::phase(Phase::Configuring).role("none"));
        b.set(StatusUpdate::phase(Phase::Discovering).role("pending"));
        b.set(StatusUpdate::phase(Phase::Joining).members(vec!["a".into(), "b".into()]));
        assert_eq!(
            *lines.lock().unwrap(),
            vec![
                "clutch: phase=configuring host=node-1 role=none members=0",
                "clutch: phase=discovering host=node-1 role=pending members=0",
                "clutch: phase=joining host=node-1 role=pending members=2",
            ]
        );
        let back = read_status(b.path()).unwrap();
        assert_eq!(back.phase, Phase::Joining);
        assert_eq!(back.members.len(), 2);
        assert!(back.human().contains("members:  2 (a, b)"));
    }
}
