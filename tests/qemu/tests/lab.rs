//! The real cluster (issue 4): `clutch lab up image-configs/amd64-lab.toml --nodes 3` boots
//! three VMs of one etcd image in a private network namespace; they find each other over
//! mDNS and form a 3-member etcd cluster. Checked from inside the namespace over ssh:
//! `etcdctl member list` shows 3 started members from every node, a key written on one node
//! is read on another, and with one VM killed the other two still accept writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clutch_qemu_tests::*;

/// TCG, three guests on two cores: boot, etcd start and formation all run slowly.
const FORMATION: Duration = Duration::from_secs(20 * 60);

fn clutch(args: &[&str]) -> Result<String> {
    let o = Command::new(bin("clutch"))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running clutch")?;
    if !o.status.success() {
        bail!("clutch {} failed ({})", args.join(" "), o.status);
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs `clutch lab down` when dropped, also when the test panics.
struct LabGuard {
    dir: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        match clutch(&["lab", "down", "--dir", &self.dir.display().to_string()]) {
            Ok(out) => eprint!("lab down:\n{out}"),
            Err(e) => eprintln!("lab down failed: {e:#}"),
        }
    }
}

struct Node {
    name: String,
    ip: String,
    pidfile: PathBuf,
    console: PathBuf,
}

/// `clutch lab up` stdout: `namespace=NS`, then `nodeI\tip=..\tmac=..\tpidfile=..\tconsole=..`.
fn parse_up(out: &str) -> (String, Vec<Node>) {
    let mut ns = String::new();
    let mut nodes = Vec::new();
    for line in out.lines() {
        if let Some(n) = line.strip_prefix("namespace=") {
            ns = n.to_string();
            continue;
        }
        let mut f = line.split('\t');
        let Some(name) = f.next() else { continue };
        let kv: BTreeMap<&str, &str> = f.filter_map(|x| x.split_once('=')).collect();
        if let (Some(ip), Some(p), Some(c)) = (kv.get("ip"), kv.get("pidfile"), kv.get("console")) {
            nodes.push(Node {
                name: name.to_string(),
                ip: ip.to_string(),
                pidfile: PathBuf::from(p),
                console: PathBuf::from(c),
            });
        }
    }
    (ns, nodes)
}

/// Every `clutch: phase=X` of a console log, in order, with the rest of its line.
fn phases(console: &Path) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default()).into_owned();
    text.split(['\n', '\r'])
        .filter_map(|l| {
            let i = l.find("clutch: phase=")?;
            let rest = &l[i + "clutch: phase=".len()..];
            let phase = rest.split_whitespace().next()?.to_string();
            Some((phase, l[i..].trim().to_string()))
        })
        .collect()
}

fn tail(p: &Path, n: usize) -> String {
    let t = String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// ssh into a guest from inside the lab's namespace, retrying while sshd comes up.
fn ssh_ns(ns: &str, ip: &str, cmd: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let o = Command::new("ip")
            .args(["netns", "exec", ns, "ssh", "-q", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "ConnectTimeout=10", "-i"])
            .arg(&ssh_key().private)
            .arg(format!("admin@{ip}"))
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .context("ip netns exec ... ssh")?;
        if o.status.success() {
            return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
        }
        if Instant::now() > deadline {
            bail!(
                "ssh {ip} `{cmd}` failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn three_vms_form_an_etcd_cluster() {
    let _one = serial_lock();
    let t_test = Instant::now();
    let cfg = test_config("amd64-lab", "amd64-lab", |t| t);
    let img = build_image(&cfg, "raw").expect("build amd64-lab");
    let dir = artifacts().join("lab");
    // A lab left behind by a killed run: take it down before starting again.
    let _ = clutch(&["lab", "down", "--dir", &dir.display().to_string()]);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let guard = LabGuard { dir: dir.clone() };

    let out = clutch(&[
        "lab",
        "up",
        &cfg.display().to_string(),
        "--nodes",
        "3",
        "--dir",
        &dir.display().to_string(),
        "--image",
        &img.display().to_string(),
    ])
    .expect("clutch lab up");
    let powered_on = Instant::now();
    eprint!("lab up:\n{out}");
    let (ns, nodes) = parse_up(&out);
    assert!(ns.starts_with("clutch-lab-"), "namespace in {out:?}");
    assert_eq!(nodes.len(), 3, "three nodes in {out:?}");

    // Watch the consoles; note when each phase line first shows up (host clock, 1 s).
    let mut seen: BTreeMap<(String, String), Duration> = BTreeMap::new();
    let mut printed: BTreeMap<String, usize> = BTreeMap::new();
    let all_ready = loop {
        let mut ready = 0;
        for n in &nodes {
            let p = phases(&n.console);
            let done = printed.entry(n.name.clone()).or_default();
            for (phase, line) in &p[*done..] {
                let at = powered_on.elapsed();
                eprintln!("[{:>5.0}s] {}: {line}", at.as_secs_f64(), n.name);
                seen.entry((n.name.clone(), phase.clone())).or_insert(at);
            }
            *done = p.len();
            if p.last().is_some_and(|(ph, _)| ph == "ready") {
                ready += 1;
            }
            if p.last().is_some_and(|(ph, _)| ph == "failed") {
                panic!(
                    "{} reports phase=failed\n----- console -----\n{}",
                    n.name,
                    tail(&n.console, 80)
                );
            }
        }
        if ready == nodes.len() {
            break powered_on.elapsed();
        }
        if powered_on.elapsed() > FORMATION {
            let mut msg = String::new();
            for n in &nodes {
                msg += &format!(
                    "\n----- console of {} ({}) -----\n{}",
                    n.name,
                    n.console.display(),
                    tail(&n.console, 60)
                );
            }
            panic!("not all nodes ready within {}s{msg}", FORMATION.as_secs());
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!(
        "formation: all 3 nodes at phase=ready {:.0}s after the last VM was powered on",
        all_ready.as_secs_f64()
    );
    for n in &nodes {
        let get = |p: &str| seen.get(&(n.name.clone(), p.to_string())).copied();
        let mut line = format!("{}:", n.name);
        let mut prev: Option<(&str, Duration)> = None;
        for p in [
            "configuring",
            "discovering",
            "bootstrapping",
            "joining",
            "ready",
        ] {
            if let Some(at) = get(p) {
                if let Some((pp, pa)) = prev {
                    line += &format!(" {pp} {:.0}s,", (at - pa).as_secs_f64());
                }
                prev = Some((p, at));
            }
        }
        if let Some(at) = get("configuring") {
            line += &format!(" (first phase line at {:.0}s)", at.as_secs_f64());
        }
        eprintln!("phase times {line}");
    }
    eprint!(
        "lab status:\n{}",
        clutch(&["lab", "status", "--dir", &dir.display().to_string()]).unwrap()
    );

    // From every node: 3 started members.
    let ssh_wait = Duration::from_secs(180);
    for n in &nodes {
        let list = ssh_ns(&ns, &n.ip, "etcdctl member list", ssh_wait).unwrap();
        let started = list.lines().filter(|l| l.contains(", started, ")).count();
        assert_eq!(started, 3, "{}: etcdctl member list:\n{list}", n.name);
        eprintln!("{}: etcdctl member list:\n{}", n.name, list.trim_end());
    }
    // Written on one, read on another.
    ssh_ns(
        &ns,
        &nodes[0].ip,
        "etcdctl put clutch/lab written-on-node0",
        ssh_wait,
    )
    .unwrap();
    let v = ssh_ns(
        &ns,
        &nodes[1].ip,
        "etcdctl get --print-value-only clutch/lab",
        ssh_wait,
    )
    .unwrap();
    assert_eq!(v.trim(), "written-on-node0");

    // Kill one VM (by its pid): the other two keep quorum and accept writes.
    let victim = &nodes[2];
    let pid = std::fs::read_to_string(&victim.pidfile)
        .unwrap()
        .trim()
        .to_string();
    let st = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(st.success(), "kill {pid}");
    let t_kill = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t_kill.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("killed {} (pid {pid})", victim.name);
    // A leader election may be under way if the victim led: retry for a while.
    let put = ssh_ns(
        &ns,
        &nodes[0].ip,
        "etcdctl --command-timeout=10s put clutch/after-kill still-writable",
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(put.contains("OK"), "put after kill: {put}");
    let put2 = ssh_ns(
        &ns,
        &nodes[1].ip,
        "etcdctl --command-timeout=10s put clutch/after-kill2 node1-too",
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(put2.contains("OK"), "put on node1 after kill: {put2}");
    let v = ssh_ns(
        &ns,
        &nodes[1].ip,
        "etcdctl get --print-value-only clutch/after-kill",
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(v.trim(), "still-writable");
    eprintln!(
        "writes accepted by the 2 survivors {:.0}s after the kill",
        t_kill.elapsed().as_secs_f64()
    );

    drop(guard);
    // Down removed everything it made.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&ns),
        "namespace {ns} still there"
    );
    for n in &nodes[..2] {
        assert!(!n.pidfile.exists(), "{} still has a pidfile", n.name);
    }
    eprintln!(
        "lab test took {:.0}s in total",
        t_test.elapsed().as_secs_f64()
    );
}
