//! Network-namespace harness: a hub namespace holding bridges, one namespace per node
//! linked to a hub bridge by a veth pair (named `eth0` inside the node). Everything this
//! creates lives inside namespaces it made; [`Lab`]'s Drop kills every process in them
//! (all started by the test) and deletes them, also when the test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "lab-token-0123456789abcdef0123456789abcdef";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `tool` is on PATH. Missing under CI=true fails the test (CI installs it);
/// elsewhere the test is skipped, loudly.
pub fn need_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is needed by this test (scripts/install-host-deps installs it)");
    }
    eprintln!("SKIPPED: {tool} is not installed");
    false
}

pub fn is_root() -> bool {
    sh(&["id", "-u"]).trim() == "0"
}

/// Whether a netns test can run: root is needed (`ip netns`). Without it the test fails
/// under CI=true and is skipped, loudly, otherwise.
pub fn need_root() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("netns tests need root in CI");
    }
    eprintln!("SKIPPED: netns test needs root (ip netns); run as root to exercise it");
    false
}

/// The helper binary (src/bin/clutch-cluster-node.rs).
pub fn helper() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_clutch-cluster-node"))
}

pub struct Node {
    pub idx: usize,
    pub ns: String,
    pub ip: String,
    pub id: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Node {
    pub fn status_file(&self) -> PathBuf {
        self.dir.join("status.jsonl")
    }
    /// All status lines so far.
    pub fn history(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.status_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    pub fn last(&self) -> Option<serde_json::Value> {
        self.history()
            .into_iter()
            .rev()
            .find(|v| v.get("phase").is_some())
    }
    pub fn phase(&self) -> String {
        self.last()
            .and_then(|v| v["phase"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    pub fn phases_seen(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for h in self.history() {
            if let Some(p) = h["phase"].as_str() {
                if v.last().map(String::as_str) != Some(p) {
                    v.push(p.to_string());
                }
            }
        }
        v
    }
    /// This node founded the cluster (it was the leader of the bootstrap plan).
    pub fn bootstrapped(&self) -> bool {
        self.history()
            .iter()
            .any(|h| h["outcome"]["bootstrapped"] == true)
    }
    /// The cluster instance in the last status.
    pub fn cluster(&self) -> Option<String> {
        self.last()
            .and_then(|v| v["cluster"].as_str().map(str::to_string))
    }
    /// The leader in the last status.
    pub fn leader(&self) -> Option<String> {
        self.last()
            .and_then(|v| v["leader"].as_str().map(str::to_string))
    }
    pub fn members(&self) -> usize {
        self.last()
            .map(|v| v["members"].as_array().map_or(0, |a| a.len()))
            .unwrap_or(0)
    }
    pub fn role(&self) -> String {
        self.last()
            .and_then(|v| v["role"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// Run a command inside this node's namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .output()
            .unwrap()
    }
}

#[derive(Clone)]
pub struct NodeOpts<'a> {
    pub cluster: &'a str,
    pub token: &'a str,
    pub expected: u32,
    pub servers: u32,
    pub settle_ms: u64,
    pub engine: &'a str,
}

impl NodeOpts<'_> {
    /// The public cluster key these nodes advertise (what an attacker reads from mDNS).
    pub fn cluster_key(&self) -> String {
        clutch_cluster::ClusterKey::new(self.cluster, self.engine, self.expected, self.servers)
            .to_string()
    }
}

pub struct Lab {
    pub tag: String,
    pub hub: String,
    pub nodes: Vec<Node>,
    pub tmp: tempfile::TempDir,
    namespaces: Vec<String>,
}

impl Lab {
    /// A hub with bridges `br0` and `br1` and `n` node namespaces on `br0`.
    pub fn new(n: usize) -> Lab {
        let tag = format!(
            "ct{}x{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let hub = format!("{tag}hub");
        let mut lab = Lab {
            tag: tag.clone(),
            hub: hub.clone(),
            nodes: Vec::new(),
            tmp: tempfile::tempdir().unwrap(),
            namespaces: Vec::new(),
        };
        sh(&["ip", "netns", "add", &hub]);
        lab.namespaces.push(hub.clone());
        for br in ["br0", "br1"] {
            sh(&["ip", "-n", &hub, "link", "add", br, "type", "bridge"]);
            // No IGMP snooping: mDNS multicast must flood between ports.
            sh(&[
                "ip",
                "-n",
                &hub,
                "link",
                "set",
                br,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
            sh(&["ip", "-n", &hub, "link", "set", br, "up"]);
        }
        for i in 0..n {
            let ns = format!("{tag}n{i}");
            sh(&["ip", "netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            let port = format!("p{i}");
            sh(&[
                "ip", "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&[
                "ip", "-n", &hub, "link", "set", &port, "master", "br0", "up",
            ]);
            let ip = format!("10.77.0.{}", 10 + i);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let dir = lab.tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            lab.nodes.push(Node {
                idx: i,
                ns,
                ip,
                id: String::new(),
                dir,
                child: None,
            });
        }
        lab
    }

    /// Add an extra namespace on bridge `br0` (an attacker's machine) at `ip`, with
    /// `extra` more addresses on the same link; returns its name.
    pub fn add_host(&mut self, name: &str, ip: &str, extra: &[String]) -> String {
        let ns = format!("{}{name}", self.tag);
        sh(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("x{name}");
        sh(&[
            "ip", "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &self.hub, "link", "set", &port, "master", "br0", "up",
        ]);
        for a in std::iter::once(ip.to_string()).chain(extra.iter().cloned()) {
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "eth0",
            ]);
        }
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Cut (`false`) or restore (`true`) node `i`'s link at the bridge.
    pub fn link(&self, i: usize, up: bool) {
        sh(&[
            "ip",
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// Capture every frame on bridge `br0` into `file` (tcpdump in the hub namespace).
    pub fn capture(&self, file: &Path) -> Capture {
        let child = Command::new("ip")
            .args([
                "netns", "exec", &self.hub, "tcpdump", "-i", "br0", "-U", "-s", "0", "-w",
            ])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        // tcpdump says "listening on" once it captures.
        std::thread::sleep(Duration::from_millis(800));
        Capture {
            child,
            file: file.to_path_buf(),
        }
    }

    /// Move node `i`'s link to bridge `br`.
    pub fn attach(&self, i: usize, br: &str) {
        sh(&[
            "ip",
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("p{i}"),
            "master",
            br,
        ]);
    }

    pub fn start(&mut self, i: usize, id: &str, o: &NodeOpts) {
        self.start_as(i, id, &format!("host{i}"), o)
    }

    /// Start node `i` with node id `id` and host name `host` (its state dir is kept across
    /// starts: a restart is a reboot).
    pub fn start_as(&mut self, i: usize, id: &str, host: &str, o: &NodeOpts) {
        let node = &mut self.nodes[i];
        node.id = id.to_string();
        let token_file = node.dir.join("token");
        std::fs::write(&token_file, o.token).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("node.log"))
            .unwrap();
        let root = node.dir.join("root");
        let helper = helper();
        let args: Vec<String> = ["netns", "exec", &node.ns]
            .iter()
            .map(|s| s.to_string())
            .chain([helper.display().to_string(), "node".into()])
            .chain(
                [
                    ("--id", id.to_string()),
                    ("--hostname", host.to_string()),
                    ("--cluster", o.cluster.to_string()),
                    ("--token-file", token_file.display().to_string()),
                    ("--expected", o.expected.to_string()),
                    ("--servers", o.servers.to_string()),
                    ("--state-dir", node.dir.join("state").display().to_string()),
                    ("--settle-ms", o.settle_ms.to_string()),
                    ("--engine", o.engine.to_string()),
                    ("--root", root.display().to_string()),
                    ("--status-file", node.status_file().display().to_string()),
                ]
                .into_iter()
                .flat_map(|(k, v)| [k.to_string(), v]),
            )
            .collect();
        let child = Command::new("ip")
            .args(&args)
            .env("RUST_LOG", "info,mdns_sd=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    pub fn dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!(
                "--- node {} ({}) phases {:?} last {:?}\n{}\n",
                n.idx,
                n.id,
                n.phases_seen(),
                n.last(),
                tail(&n.log(), 30)
            ));
        }
        s
    }
}

/// A running packet capture; [`Capture::finish`] stops it (by its pid) and returns the bytes.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    pub fn finish(mut self) -> Vec<u8> {
        // SIGINT: tcpdump flushes and exits.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        for ns in self.namespaces.iter().rev() {
            // Anything still running in a namespace we made was started by this test
            // (e.g. etcd children of a killed node): end it by pid.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Poll `cond` until true or panic with `what` and the lab dump after `timeout`.
pub fn wait_for(lab: &Lab, timeout: Duration, what: &str, mut cond: impl FnMut(&Lab) -> bool) {
    let start = Instant::now();
    while !cond(lab) {
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                lab.dump()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("{what}: {:.1}s", start.elapsed().as_secs_f64());
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Run `f` on a new thread that first enters network namespace `ns` (made by a [`Lab`]).
/// Only that thread (and threads it spawns, which inherit it) is in the namespace; the
/// rest of the test process stays where it was.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("/run/netns/{ns}: {e}"));
    let ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            drop(file);
            f()
        })
        .unwrap()
}

/// Raise this process's open-file soft limit to its hard limit (attackers hold many sockets).
pub fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Open file descriptors of process `pid` (None once it is gone).
pub fn fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// Resident set size of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

impl Node {
    /// Pid of the node process (`ip netns exec` execs the helper in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
    /// Node ids named as leader or member in any status line so far.
    pub fn ids_ever_named(&self) -> Vec<String> {
        let mut v = Vec::new();
        for h in self.history() {
            if let Some(l) = h["leader"].as_str() {
                v.push(l.to_string());
            }
            for m in h["members"].as_array().into_iter().flatten() {
                if let Some(id) = m["node_id"].as_str() {
                    v.push(id.to_string());
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }
}
