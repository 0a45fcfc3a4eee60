//! `clutch lab up|status|down`: N QEMU VMs booted from one built amd64 image, on a private L2
//! segment inside a network namespace made for the lab.
//!
//! Layout (all inside the namespace `clutch-lab-<hash of DIR>`, nothing outside it):
//! a bridge `br0` with 10.77.0.1/24, one tap `tapI` per VM enslaved to it, a dnsmasq that
//! only answers DHCP (no DNS, no router, no name server) and hands each VM's MAC a fixed
//! address 10.77.0.(11+I), and the QEMU processes (TCG, `-machine pc`, one vCPU), started
//! with `ip netns exec`, daemonised with pidfiles. Each VM boots a qcow2 overlay of the image
//! (the image stays untouched); serial consoles go to `DIR/nodeI.console.log`.
//!
//! Why DHCP and not the link-local fallback: fixed, known addresses let `status` print them
//! and let people (and the tests) ssh in from the namespace right away; IPv4 link-local
//! only starts after networkd's DHCP attempts time out and picks random addresses. The
//! bare-switch path is covered by the cluster crate's namespace tests.
//!
//! Everything is planned as plain data first ([`plan`], [`setup_cmds`], [`qemu_cmd`], ...),
//! then carried out through the [`Host`] trait. `up` records the lab in `DIR/lab.json`
//! before starting anything, and tears everything down again when a step fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use clutch_builder::cmd;

/// The lab's /24 inside its namespace.
pub const SUBNET: &str = "10.77.0";
pub const BRIDGE: &str = "br0";
pub const STATE_FILE: &str = "lab.json";
/// Extra virtual disk space over the image size (the root file system grows at first boot
/// and loopback storage lives on it); qcow2 overlays are sparse, so it costs nothing.
pub const DISK_HEADROOM: u64 = 3 << 30;

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
}

/// The namespace of the lab in `dir` (an absolute path): `clutch-lab-<8 hex>`.
pub fn ns_name(dir: &Path) -> String {
    let h = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("clutch-lab-{}", hex::encode(&h[..4]))
}

/// Plans a lab of `nodes` VMs of `image` in `dir` (absolute).
pub fn plan(dir: &Path, image: &Path, nodes: usize, memory_mib: u32) -> Result<LabState> {
    if nodes == 0 || nodes > 50 {
        bail!("--nodes must be between 1 and 50 (got {nodes})");
    }
    let namespace = ns_name(dir);
    let h = sha2::Sha256::digest(namespace.as_bytes());
    let nodes = (0..nodes)
        .map(|i| NodeSpec {
            name: format!("node{i}"),
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
        namespace,
        dir: dir.to_path_buf(),
        image: image.to_path_buf(),
        memory_mib,
        nodes,
        dnsmasq_pidfile: dir.join("dnsmasq.pid"),
    })
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `ip` commands that make the namespace, its bridge and the taps.
pub fn setup_cmds(s: &LabState) -> Vec<Vec<String>> {
    let ns = s.namespace.as_str();
    let mut v = vec![
        argv(&["ip", "netns", "add", ns]),
        argv(&["ip", "-n", ns, "link", "set", "lo", "up"]),
        argv(&["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"]),
        argv(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{SUBNET}.1/24"),
            "dev",
            BRIDGE,
        ]),
        argv(&["ip", "-n", ns, "link", "set", BRIDGE, "up"]),
    ];
    for n in &s.nodes {
        v.push(argv(&[
            "ip", "-n", ns, "tuntap", "add", "dev", &n.tap, "mode", "tap",
        ]));
        v.push(argv(&[
            "ip", "-n", ns, "link", "set", &n.tap, "master", BRIDGE,
        ]));
        v.push(argv(&["ip", "-n", ns, "link", "set", &n.tap, "up"]));
    }
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
    let fmt = if s.image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut v: Vec<String> = vec![
        "qemu-img".into(),
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        fmt.into(),
        "-b".into(),
        s.image.display().to_string(),
        n.overlay.display().to_string(),
    ];
    v.extend(size.map(|b| b.to_string()));
    v
}

/// The QEMU command of a node, run inside the namespace and daemonised.
pub fn qemu_cmd(s: &LabState, n: &NodeSpec) -> Vec<String> {
    let mut v = argv(&["ip", "netns", "exec", &s.namespace, "qemu-system-x86_64"]);
    v.extend(argv(&[
        "-name",
        &format!("clutch-lab-{}", n.name),
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-m",
        &s.memory_mib.to_string(),
        "-display",
        "none",
        "-monitor",
        "none",
        // Appended, not truncated: `lab start` powers a node on again on the same log.
        "-chardev",
        &format!("file,id=console,path={},append=on", n.console.display()),
        "-serial",
        "chardev:console",
        "-drive",
        &format!("file={},format=qcow2,if=virtio", n.overlay.display()),
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", n.tap),
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={}", n.mac),
        "-pidfile",
        &n.pidfile.display().to_string(),
        "-daemonize",
    ]));
    v
}

/// The last `clutch: phase=...` line of a console log, as key/value pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseLine {
    pub phase: String,
    pub host: String,
    pub role: String,
    pub members: String,
}

/// Every `clutch: phase=` line of a console log, in order.
pub fn phase_lines(console: &str) -> Vec<PhaseLine> {
    let mut out = Vec::new();
    for line in console.split(['\n', '\r']) {
        let Some(i) = line.find("clutch: phase=") else {
            continue;
        };
        let mut p = PhaseLine {
            phase: String::new(),
            host: String::new(),
            role: String::new(),
            members: String::new(),
        };
        for kv in line[i + "clutch: ".len()..].split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let v: String = v.chars().filter(|c| !c.is_control()).collect();
            match k {
                "phase" => p.phase = v,
                "host" => p.host = v,
                "role" => p.role = v,
                "members" => p.members = v,
                _ => {}
            }
        }
        if !p.phase.is_empty() {
            out.push(p);
        }
    }
    out
}

/// Starts the line that `lab start` writes into a node's console log before powering the
/// node on again, so one log keeps every boot and readers can tell the boots apart.
pub const BOOT_MARKER: &str = "----- clutch lab: powered on again";

/// The marker line for a node's `boot`-th power-on (2 for the first `lab start`).
pub fn boot_marker(n: &NodeSpec, boot: usize) -> String {
    format!("\n{BOOT_MARKER}: {} boot {boot} -----\n", n.name)
}

/// How many times the node in this console log was powered on (markers + 1).
pub fn boots(console: &str) -> usize {
    console.matches(BOOT_MARKER).count() + 1
}

/// The part of a console log that belongs to the latest power-on.
pub fn current_boot(console: &str) -> &str {
    match console.rfind(BOOT_MARKER) {
        Some(i) => &console[i..],
        None => console,
    }
}

/// One line of `clutch lab status` for a node.
pub fn status_line(n: &NodeSpec, running: bool, last: Option<&PhaseLine>) -> String {
    let state = if running { "running" } else { "stopped" };
    match last {
        Some(p) => format!(
            "{}\t{}\t{}\tphase={} host={} role={} members={}",
            n.name, state, n.ip, p.phase, p.host, p.role, p.members
        ),
        None => format!("{}\t{}\t{}\tphase=(booting)", n.name, state, n.ip),
    }
}

/// The system, for `up`/`down` (a fake in the tests).
pub trait Host {
    /// Runs a command to completion; fails with its stderr.
    fn run(&self, argv: &[String]) -> Result<String>;
    fn netns_exists(&self, ns: &str) -> bool;
    /// The pid in `pidfile` when that process is alive and its command line mentions
    /// `marker` (so a reused pid is never killed).
    fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32>;
    /// SIGTERM, then SIGKILL after a while; waits until the process is gone.
    fn stop(&self, pid: u32);
    /// SIGKILL right away (a power cut for a VM); waits until the process is gone.
    fn kill(&self, pid: u32);
}

pub struct RealHost;

impl Host for RealHost {
    fn run(&self, argv: &[String]) -> Result<String> {
        cmd::run(Command::new(&argv[0]).args(&argv[1..]))
    }
    fn netns_exists(&self, ns: &str) -> bool {
        Path::new("/run/netns").join(ns).exists()
    }
    fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        cmdline.contains(marker).then_some(pid)
    }
    fn stop(&self, pid: u32) {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        wait_gone(pid, Duration::from_secs(5));
        if alive(pid) {
            self.kill(pid);
        }
    }
    fn kill(&self, pid: u32) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        wait_gone(pid, Duration::from_secs(10));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn wait_gone(pid: u32, timeout: Duration) {
    let t = Instant::now();
    while alive(pid) && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
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

/// Brings the lab up: namespace, bridge, taps, dnsmasq, overlays, VMs. On any failure
/// everything made so far is removed again.
pub fn up(host: &dyn Host, s: &LabState, disk_size: Option<u64>) -> Result<()> {
    if host.netns_exists(&s.namespace) || load_state(&s.dir)?.is_some() {
        bail!(
            "a lab already exists in {} (namespace {}); run `clutch lab down --dir {}` first",
            s.dir.display(),
            s.namespace,
            s.dir.display()
        );
    }
    // Recorded before anything is made, so `down` finds whatever exists.
    save_state(s)?;
    let r = (|| -> Result<()> {
        for c in setup_cmds(s) {
            host.run(&c)?;
        }
        host.run(&dnsmasq_cmd(s)).context("starting dnsmasq")?;
        for n in &s.nodes {
            let _ = std::fs::remove_file(&n.overlay);
            host.run(&overlay_cmd(s, n, disk_size))
                .with_context(|| format!("overlay for {}", n.name))?;
        }
        for n in &s.nodes {
            let _ = std::fs::remove_file(&n.console);
            host.run(&qemu_cmd(s, n))
                .with_context(|| format!("starting {}", n.name))?;
            tracing::info!(node = %n.name, mac = %n.mac, ip = %n.ip, "powered on");
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!("lab up failed; cleaning up: {e:#}");
        if let Err(e2) = down(host, &s.dir) {
            tracing::error!("cleanup after the failed `lab up`: {e2:#}");
        }
        return Err(e);
    }
    Ok(())
}

/// The node called `name` (`node0`, `node1`, ...).
pub fn find_node<'a>(s: &'a LabState, name: &str) -> Result<&'a NodeSpec> {
    s.nodes.iter().find(|n| n.name == name).with_context(|| {
        let names: Vec<&str> = s.nodes.iter().map(|n| n.name.as_str()).collect();
        format!(
            "no node `{name}` in the lab in {} (nodes: {})",
            s.dir.display(),
            names.join(", ")
        )
    })
}

fn qemu_marker(n: &NodeSpec) -> String {
    n.pidfile.display().to_string()
}

/// Powers a stopped (or killed) node on again: the same overlay disk, MAC, tap and address;
/// its console log gets a [`boot_marker`] and the new boot is appended after it. Returns
/// the boot number (2 for the first restart).
pub fn start(host: &dyn Host, s: &LabState, name: &str) -> Result<usize> {
    let n = find_node(s, name)?;
    if let Some(pid) = host.live_pid(&n.pidfile, &qemu_marker(n)) {
        bail!("{name} is already running (pid {pid}); `clutch lab kill {name}` first");
    }
    if !host.netns_exists(&s.namespace) {
        bail!(
            "the lab's namespace {} is gone; run `clutch lab down --dir {d}` and `clutch lab up` again",
            s.namespace,
            d = s.dir.display()
        );
    }
    if !n.overlay.is_file() {
        bail!("{name}: its disk {} is missing", n.overlay.display());
    }
    let _ = std::fs::remove_file(&n.pidfile);
    let old = std::fs::read(&n.console).unwrap_or_default();
    let boot = boots(&String::from_utf8_lossy(&old)) + 1;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.console)
            .with_context(|| format!("{}", n.console.display()))?;
        f.write_all(boot_marker(n, boot).as_bytes())
            .with_context(|| format!("{}", n.console.display()))?;
    }
    host.run(&qemu_cmd(s, n))
        .with_context(|| format!("starting {name}"))?;
    tracing::info!(node = %n.name, mac = %n.mac, ip = %n.ip, boot, "powered on again");
    Ok(boot)
}

/// Cuts a node's power: SIGKILL to its QEMU (found by pidfile, so only our own process).
/// Returns the pid that was killed, `None` when the node was not running.
pub fn kill(host: &dyn Host, s: &LabState, name: &str) -> Result<Option<u32>> {
    let n = find_node(s, name)?;
    let Some(pid) = host.live_pid(&n.pidfile, &qemu_marker(n)) else {
        return Ok(None);
    };
    host.kill(pid);
    if host.live_pid(&n.pidfile, &qemu_marker(n)).is_some() {
        bail!("{name}: QEMU (pid {pid}) survived SIGKILL");
    }
    let _ = std::fs::remove_file(&n.pidfile);
    tracing::info!(node = %n.name, pid, "power cut");
    Ok(Some(pid))
}

/// What `down` did, for the message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DownReport {
    pub stopped: Vec<String>,
    pub namespace_removed: Option<String>,
}

/// Stops the VMs and dnsmasq (by their pidfiles), removes taps, bridge and namespace,
/// the overlays and the state file. Safe to run again: missing pieces are skipped.
pub fn down(host: &dyn Host, dir: &Path) -> Result<DownReport> {
    let mut rep = DownReport::default();
    let state = load_state(dir)?;
    let ns = state
        .as_ref()
        .map(|s| s.namespace.clone())
        .unwrap_or_else(|| ns_name(dir));
    if let Some(s) = &state {
        for n in &s.nodes {
            if let Some(pid) = host.live_pid(&n.pidfile, &qemu_marker(n)) {
                host.stop(pid);
                rep.stopped.push(format!("{} (pid {pid})", n.name));
            }
            let _ = std::fs::remove_file(&n.pidfile);
            let _ = std::fs::remove_file(&n.overlay);
        }
        let marker = s.dnsmasq_pidfile.display().to_string();
        if let Some(pid) = host.live_pid(&s.dnsmasq_pidfile, &marker) {
            host.stop(pid);
            rep.stopped.push(format!("dnsmasq (pid {pid})"));
        }
        let _ = std::fs::remove_file(&s.dnsmasq_pidfile);
    }
    if host.netns_exists(&ns) {
        if let Some(s) = &state {
            for n in &s.nodes {
                let _ = host.run(&argv(&["ip", "-n", &ns, "link", "del", &n.tap]));
            }
        }
        let _ = host.run(&argv(&["ip", "-n", &ns, "link", "del", BRIDGE]));
        host.run(&argv(&["ip", "netns", "del", &ns]))
            .with_context(|| format!("removing namespace {ns}"))?;
        rep.namespace_removed = Some(ns);
    }
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    Ok(rep)
}

/// `clutch lab` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Boot N VMs of the built amd64 image of CONFIG on a private segment in a new network
    /// namespace (DHCP from a dnsmasq inside it: node I gets 10.77.0.(11+I)).
    Up {
        config: PathBuf,
        /// How many VMs.
        #[arg(long)]
        nodes: usize,
        /// Folder for overlays, pidfiles, console logs and lab.json.
        #[arg(long, default_value = "clutch-lab")]
        dir: PathBuf,
        /// The image to boot [default: ./out/<config name>/<config name>.img].
        #[arg(long)]
        image: Option<PathBuf>,
        /// Memory per VM in MiB.
        #[arg(long, default_value_t = 768)]
        memory: u32,
    },
    /// Print each node's phase (the last `clutch: phase=` line of its console) and address.
    Status {
        #[arg(long, default_value = "clutch-lab")]
        dir: PathBuf,
    },
    /// Power a stopped or killed node on again, on its own disk, MAC and address (its
    /// console log is appended to, after a `powered on again` line).
    Start {
        /// The node's name as `lab up` and `lab status` print it (node0, node1, ...).
        node: String,
        #[arg(long, default_value = "clutch-lab")]
        dir: PathBuf,
    },
    /// Cut a node's power (SIGKILL to its QEMU); `lab start` boots it again.
    Kill {
        node: String,
        #[arg(long, default_value = "clutch-lab")]
        dir: PathBuf,
    },
    /// Stop the VMs and remove the namespace (safe to run twice).
    Down {
        #[arg(long, default_value = "clutch-lab")]
        dir: PathBuf,
    },
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}", p.display()))
}

fn existing_lab(dir: &Path) -> Result<LabState> {
    let dir = absolute(dir)?;
    load_state(&dir)?.with_context(|| format!("no lab in {} (no {STATE_FILE})", dir.display()))
}

pub fn run(c: LabCmd) -> Result<bool> {
    match c {
        LabCmd::Up {
            config,
            nodes,
            dir,
            image,
            memory,
        } => {
            let name = config
                .file_stem()
                .with_context(|| format!("{}: no file name", config.display()))?
                .to_string_lossy()
                .into_owned();
            let image = image
                .unwrap_or_else(|| PathBuf::from("out").join(&name).join(format!("{name}.img")));
            let image = absolute(&image)?;
            if !image.is_file() {
                bail!(
                    "image {} not found: build it first (`clutch build {}`) or pass --image",
                    image.display(),
                    config.display()
                );
            }
            // A raw image's virtual size is its file size; grow the overlay beyond it.
            // (A qcow2 image keeps its own virtual size.)
            let size = if image.extension().is_some_and(|e| e == "qcow2") {
                None
            } else {
                let len = std::fs::metadata(&image)?.len();
                Some(len.div_ceil(1 << 20) * (1 << 20) + DISK_HEADROOM)
            };
            let dir = absolute(&dir)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            let s = plan(&dir, &image, nodes, memory)?;
            up(&RealHost, &s, size)?;
            println!("namespace={}", s.namespace);
            for n in &s.nodes {
                println!(
                    "{}\tip={}\tmac={}\tpidfile={}\tconsole={}",
                    n.name,
                    n.ip,
                    n.mac,
                    n.pidfile.display(),
                    n.console.display()
                );
            }
            Ok(true)
        }
        LabCmd::Status { dir } => {
            let s = existing_lab(&dir)?;
            println!("namespace={}", s.namespace);
            for n in &s.nodes {
                let running = RealHost.live_pid(&n.pidfile, &qemu_marker(n)).is_some();
                let text = std::fs::read(&n.console).unwrap_or_default();
                let lines = phase_lines(current_boot(&String::from_utf8_lossy(&text)));
                println!("{}", status_line(n, running, lines.last()));
            }
            Ok(true)
        }
        LabCmd::Start { node, dir } => {
            let s = existing_lab(&dir)?;
            let boot = start(&RealHost, &s, &node)?;
            let n = find_node(&s, &node)?;
            println!(
                "{}\tip={}\tmac={}\tpidfile={}\tconsole={}\tboot={boot}",
                n.name,
                n.ip,
                n.mac,
                n.pidfile.display(),
                n.console.display()
            );
            Ok(true)
        }
        LabCmd::Kill { node, dir } => {
            let s = existing_lab(&dir)?;
            match kill(&RealHost, &s, &node)? {
                Some(pid) => println!("killed {node} (pid {pid})"),
                None => println!("{node} was not running"),
            }
            Ok(true)
        }
        LabCmd::Down { dir } => {
            let dir = absolute(&dir)?;
            let r = down(&RealHost, &dir)?;
            if r.stopped.is_empty() && r.namespace_removed.is_none() {
                println!("nothing running in {}", dir.display());
            }
            for p in &r.stopped {
                println!("stopped {p}");
            }
            if let Some(ns) = &r.namespace_removed {
                println!("removed namespace {ns}");
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    fn lab(dir: &Path) -> LabState {
        plan(dir, Path::new("/img/lab.img"), 3, 768).unwrap()
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
        assert!(plan(Path::new("/tmp/x"), Path::new("/i"), 0, 768).is_err());
    }

    #[test]
    fn every_command_stays_in_the_namespace() {
        let s = lab(Path::new("/tmp/x"));
        let ns = s.namespace.clone();
        for c in setup_cmds(&s) {
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
            let q = qemu_cmd(&s, n);
            assert_eq!(
                q[..5],
                ["ip", "netns", "exec", ns.as_str(), "qemu-system-x86_64"]
            );
            let j = q.join(" ");
            assert!(j.contains(&format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                n.tap
            )));
            assert!(j.contains(&format!("mac={}", n.mac)));
            assert!(j.contains("-accel tcg") && j.contains("-smp 1") && j.contains("-m 768"));
            assert!(j.contains(&format!("-pidfile {}", n.pidfile.display())));
            // The console log is appended to, so a node powered on again keeps its history.
            assert!(j.contains(&format!(
                "file,id=console,path={},append=on",
                n.console.display()
            )));
            let o = overlay_cmd(&s, n, Some(5 << 30));
            assert_eq!(o[5..7], ["-F", "raw"]);
            assert_eq!(o.last().unwrap(), &(5u64 << 30).to_string());
        }
    }

    #[test]
    fn phase_lines_parse_the_console() {
        let log = "[  OK  ] Started foo\r\nclutch: phase=configuring host=lab-1 role=pending members=0\r\n\
                   noise clutch: phase=discovering host=lab-1 role=pending members=0\r\n\
                   clutch: phase=ready host=lab-1 role=server members=3\r\n";
        let v = phase_lines(log);
        assert_eq!(v.len(), 3);
        let last = v.last().unwrap();
        assert_eq!(
            (
                last.phase.as_str(),
                last.host.as_str(),
                last.role.as_str(),
                last.members.as_str()
            ),
            ("ready", "lab-1", "server", "3")
        );
        let s = lab(Path::new("/tmp/x"));
        assert_eq!(
            status_line(&s.nodes[0], true, Some(last)),
            "node0\trunning\t10.77.0.11\tphase=ready host=lab-1 role=server members=3"
        );
        assert!(status_line(&s.nodes[1], false, None).contains("stopped"));
        assert!(phase_lines("nothing here\n").is_empty());
    }

    /// Records commands; fails the one that matches `fail_on`. `running` maps pidfiles of
    /// live processes to their pids.
    struct Fake {
        log: RefCell<Vec<String>>,
        ns: RefCell<bool>,
        fail_on: Option<&'static str>,
        running: RefCell<std::collections::BTreeMap<PathBuf, u32>>,
    }

    fn fake(fail_on: Option<&'static str>) -> Fake {
        Fake {
            log: RefCell::new(vec![]),
            ns: RefCell::new(false),
            fail_on,
            running: RefCell::new(Default::default()),
        }
    }
    impl Host for Fake {
        fn run(&self, argv: &[String]) -> Result<String> {
            let line = argv.join(" ");
            self.log.borrow_mut().push(line.clone());
            if self.fail_on.is_some_and(|f| line.contains(f)) {
                bail!("{line}: failed");
            }
            if line.starts_with("ip netns add") {
                *self.ns.borrow_mut() = true;
            }
            if line.starts_with("ip netns del") {
                *self.ns.borrow_mut() = false;
            }
            Ok(String::new())
        }
        fn netns_exists(&self, _: &str) -> bool {
            *self.ns.borrow()
        }
        fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32> {
            assert_eq!(marker, pidfile.display().to_string());
            self.running.borrow().get(pidfile).copied()
        }
        fn stop(&self, pid: u32) {
            self.log.borrow_mut().push(format!("stop {pid}"));
            self.running.borrow_mut().retain(|_, p| *p != pid);
        }
        fn kill(&self, pid: u32) {
            self.log.borrow_mut().push(format!("kill -KILL {pid}"));
            self.running.borrow_mut().retain(|_, p| *p != pid);
        }
    }

    #[test]
    fn failed_up_removes_the_namespace_and_down_is_idempotent() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let f = fake(Some("ifname=tap1"));
        let e = up(&f, &s, None).unwrap_err();
        assert!(format!("{e:#}").contains("starting node1"), "{e:#}");
        let log = f.log.borrow().clone();
        assert_eq!(
            log.last().unwrap(),
            &format!("ip netns del {}", s.namespace)
        );
        assert!(!*f.ns.borrow());
        assert!(load_state(t.path()).unwrap().is_none());
        // Nothing left: a second down does nothing and succeeds.
        let n = f.log.borrow().len();
        assert_eq!(down(&f, t.path()).unwrap(), DownReport::default());
        assert_eq!(f.log.borrow().len(), n);
    }

    #[test]
    fn up_refuses_an_existing_lab_and_records_state_first() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let f = fake(None);
        up(&f, &s, None).unwrap();
        assert_eq!(load_state(t.path()).unwrap().unwrap(), s);
        assert!(up(&f, &s, None).is_err());
        let r = down(&f, t.path()).unwrap();
        assert_eq!(r.namespace_removed.as_deref(), Some(s.namespace.as_str()));
        assert!(load_state(t.path()).unwrap().is_none());
    }

    #[test]
    fn kill_cuts_only_a_running_node_by_its_pid() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let f = fake(None);
        up(&f, &s, None).unwrap();
        let n1 = &s.nodes[1];
        std::fs::write(&n1.pidfile, "4242\n").unwrap();
        f.running.borrow_mut().insert(n1.pidfile.clone(), 4242);
        f.running
            .borrow_mut()
            .insert(s.nodes[2].pidfile.clone(), 4343);
        assert_eq!(kill(&f, &s, "node1").unwrap(), Some(4242));
        assert_eq!(f.log.borrow().last().unwrap(), "kill -KILL 4242");
        assert!(!n1.pidfile.exists(), "the dead node's pidfile is removed");
        assert_eq!(
            f.running.borrow().values().copied().collect::<Vec<_>>(),
            vec![4343],
            "the other node keeps running"
        );
        // Not running any more: nothing to kill, nothing run.
        let n = f.log.borrow().len();
        assert_eq!(kill(&f, &s, "node1").unwrap(), None);
        assert_eq!(f.log.borrow().len(), n);
        let e = kill(&f, &s, "node7").unwrap_err();
        assert!(
            format!("{e:#}").contains("nodes: node0, node1, node2"),
            "{e:#}"
        );
    }

    #[test]
    fn start_boots_the_same_disk_mac_and_tap_and_appends_to_the_console() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let f = fake(None);
        up(&f, &s, None).unwrap();
        let n1 = &s.nodes[1];
        let first_boot = f
            .log
            .borrow()
            .iter()
            .find(|l| l.contains("qemu-system-x86_64") && l.contains("ifname=tap1"))
            .cloned()
            .unwrap();
        // A running node is not started twice.
        f.running.borrow_mut().insert(n1.pidfile.clone(), 7);
        let e = start(&f, &s, "node1").unwrap_err();
        assert!(
            format!("{e:#}").contains("already running (pid 7)"),
            "{e:#}"
        );
        f.running.borrow_mut().clear();
        // The overlay (made by qemu-img, which the fake does not run) must be there.
        let e = start(&f, &s, "node1").unwrap_err();
        assert!(format!("{e:#}").contains("node1.qcow2"), "{e:#}");
        std::fs::write(&n1.overlay, b"qcow2").unwrap();
        std::fs::write(
            &n1.console,
            "boot one\nclutch: phase=joining host=lab-1 role=server members=2\n",
        )
        .unwrap();
        std::fs::write(&n1.pidfile, "99\n").unwrap();
        assert_eq!(start(&f, &s, "node1").unwrap(), 2);
        assert_eq!(
            f.log.borrow().last().unwrap(),
            &first_boot,
            "same QEMU command: same overlay, MAC, tap, console and pidfile"
        );
        assert!(!n1.pidfile.exists(), "the stale pidfile is gone");
        let log = std::fs::read_to_string(&n1.console).unwrap();
        assert!(log.starts_with("boot one\n"), "the old boot is kept: {log}");
        assert!(log.contains("node1 boot 2"), "{log}");
        // Until the new boot prints a phase line, status shows it booting, not joining.
        assert!(phase_lines(current_boot(&log)).is_empty());
        assert_eq!(phase_lines(&log).len(), 1);
        let log2 = log + "clutch: phase=ready host=lab-1 role=server members=3\n";
        assert_eq!(phase_lines(current_boot(&log2))[0].phase, "ready");
        assert_eq!(boots(&log2), 2);
        // Boot numbers go on; with the namespace gone, start refuses.
        assert_eq!(start(&f, &s, "node1").unwrap(), 3);
        down(&f, t.path()).unwrap();
        save_state(&s).unwrap();
        let e = start(&f, &s, "node1").unwrap_err();
        assert!(format!("{e:#}").contains("namespace"), "{e:#}");
    }
}
