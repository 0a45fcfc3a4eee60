//! Helpers for tests and benchmarks that drive `clutch lab` (3 VMs in a network namespace):
//! bring the lab up (and always down again), follow the nodes' `clutch: phase=` console
//! lines boot by boot, ssh into nodes from inside the namespace, cut a node's power and
//! power it on again, and read clutch-firstboot's memory and CPU use on a node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{bin, ssh_key};

/// What `clutch lab start` writes into a node's console log before the new boot (see
/// builder/src/lab.rs, `BOOT_MARKER`); the text after the last one is the current boot.
pub const BOOT_MARKER: &str = "----- clutch lab: powered on again";

/// Runs the release `clutch` with `args`; its stdout, or an error when it fails.
pub fn clutch(args: &[&str]) -> Result<String> {
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
pub struct LabGuard {
    pub dir: PathBuf,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        match clutch(&["lab", "down", "--dir", &self.dir.display().to_string()]) {
            Ok(out) => eprint!("lab down:\n{out}"),
            Err(e) => eprintln!("lab down failed: {e:#}"),
        }
    }
}

/// One VM of the lab, as `clutch lab up` printed it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub ip: String,
    pub pidfile: PathBuf,
    pub console: PathBuf,
}

/// `clutch lab up` stdout: `namespace=NS`, then `nodeI\tip=..\tmac=..\tpidfile=..\tconsole=..`.
pub fn parse_up(out: &str) -> (String, Vec<Node>) {
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

/// The console log split into boots (the first power-on, then one per `lab start`), each
/// boot after the first starting with its marker line.
pub fn boots_of(text: &str) -> Vec<&str> {
    let mut cuts: Vec<usize> = text.match_indices(BOOT_MARKER).map(|(i, _)| i).collect();
    cuts.insert(0, 0);
    cuts.push(text.len());
    cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// Every `clutch: phase=X` in `text`, in order, with the rest of its line.
pub fn phases_in(text: &str) -> Vec<(String, String)> {
    text.split(['\n', '\r'])
        .filter_map(|l| {
            let i = l.find("clutch: phase=")?;
            let rest = &l[i + "clutch: phase=".len()..];
            let phase = rest.split_whitespace().next()?.to_string();
            Some((phase, l[i..].trim().to_string()))
        })
        .collect()
}

/// The value of `key=` in a phase line (`host`, `role`, `members`).
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.chars().filter(|c| !c.is_control()).collect())
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

/// The phase lines of each boot of a node's console log.
pub fn phases_by_boot(console: &Path) -> Vec<Vec<(String, String)>> {
    boots_of(&read(console))
        .into_iter()
        .map(phases_in)
        .collect()
}

/// The last `n` lines of a file.
pub fn tail(p: &Path, n: usize) -> String {
    let t = read(p);
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// ssh into a guest from inside the lab's namespace, retrying while sshd comes up.
pub fn ssh_ns(ns: &str, ip: &str, cmd: &str, timeout: Duration) -> Result<String> {
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

/// A running lab; `clutch lab down` when dropped.
pub struct Lab {
    pub dir: PathBuf,
    pub ns: String,
    pub nodes: Vec<Node>,
    /// Just after `clutch lab up` returned: every VM (the last one too) is powered on.
    pub powered_on: Instant,
    _guard: LabGuard,
}

impl Lab {
    /// `clutch lab up CONFIG --nodes N --dir DIR --image IMAGE`, after taking down (and
    /// removing) whatever a killed earlier run left in DIR.
    pub fn up(config: &Path, image: &Path, dir: &Path, nodes: usize) -> Result<Lab> {
        let d = dir.display().to_string();
        let _ = clutch(&["lab", "down", "--dir", &d]);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let guard = LabGuard {
            dir: dir.to_path_buf(),
        };
        let out = clutch(&[
            "lab",
            "up",
            &config.display().to_string(),
            "--nodes",
            &nodes.to_string(),
            "--dir",
            &d,
            "--image",
            &image.display().to_string(),
        ])?;
        let powered_on = Instant::now();
        eprint!("lab up:\n{out}");
        let (ns, list) = parse_up(&out);
        if !ns.starts_with("clutch-lab-") || list.len() != nodes {
            bail!("unexpected `clutch lab up` output: {out:?}");
        }
        Ok(Lab {
            dir: dir.to_path_buf(),
            ns,
            nodes: list,
            powered_on,
            _guard: guard,
        })
    }

    fn lab(&self, verb: &str, node: Option<&str>) -> Result<String> {
        let d = self.dir.display().to_string();
        let mut a = vec!["lab", verb];
        a.extend(node);
        a.extend(["--dir", d.as_str()]);
        clutch(&a)
    }

    pub fn status(&self) -> Result<String> {
        self.lab("status", None)
    }

    /// `clutch lab kill NODE`: a power cut.
    pub fn kill(&self, node: &str) -> Result<String> {
        self.lab("kill", Some(node))
    }

    /// `clutch lab start NODE`: power on again, same disk.
    pub fn start(&self, node: &str) -> Result<String> {
        self.lab("start", Some(node))
    }

    pub fn ssh(&self, node: usize, cmd: &str, timeout: Duration) -> Result<String> {
        ssh_ns(&self.ns, &self.nodes[node].ip, cmd, timeout)
    }

    /// The last `lines` lines of every node's console, for failure messages.
    pub fn consoles(&self, lines: usize) -> String {
        let mut msg = String::new();
        for n in &self.nodes {
            msg += &format!(
                "\n----- console of {} ({}) -----\n{}",
                n.name,
                n.console.display(),
                tail(&n.console, lines)
            );
        }
        msg
    }
}

/// A phase line that showed up on a node's console.
#[derive(Debug, Clone)]
pub struct PhaseEvent {
    pub node: usize,
    /// 1 for the first power-on, 2 after the first `lab start`, ...
    pub boot: usize,
    pub phase: String,
    pub line: String,
    /// Since [`Lab::powered_on`] (host clock, as often as [`PhaseWatch::poll`] runs).
    pub at: Duration,
}

/// Follows the phase lines of every node, boot by boot.
#[derive(Default)]
pub struct PhaseWatch {
    /// Phase lines already reported, per (node, boot).
    done: BTreeMap<(usize, usize), usize>,
    /// When each (node, boot, phase) was first seen.
    pub first_seen: BTreeMap<(usize, usize, String), Duration>,
    /// The latest phase line of each node's current boot.
    pub last: BTreeMap<usize, PhaseEvent>,
}

impl PhaseWatch {
    /// New phase lines since the last call, printed as they come.
    pub fn poll(&mut self, lab: &Lab) -> Vec<PhaseEvent> {
        let mut out = Vec::new();
        for (i, n) in lab.nodes.iter().enumerate() {
            let boots = phases_by_boot(&n.console);
            let current = boots.len();
            for (b, lines) in boots.iter().enumerate() {
                let boot = b + 1;
                let done = self.done.entry((i, boot)).or_default();
                for (phase, line) in &lines[*done..] {
                    let at = lab.powered_on.elapsed();
                    eprintln!(
                        "[{:>5.0}s] {} (boot {boot}): {line}",
                        at.as_secs_f64(),
                        n.name
                    );
                    self.first_seen
                        .entry((i, boot, phase.clone()))
                        .or_insert(at);
                    out.push(PhaseEvent {
                        node: i,
                        boot,
                        phase: phase.clone(),
                        line: line.clone(),
                        at,
                    });
                }
                *done = lines.len();
            }
            match boots[current - 1].last() {
                Some((phase, line)) => {
                    let keep = self
                        .last
                        .get(&i)
                        .is_some_and(|e| e.boot == current && &e.line == line);
                    if !keep {
                        let at = lab.powered_on.elapsed();
                        self.last.insert(
                            i,
                            PhaseEvent {
                                node: i,
                                boot: current,
                                phase: phase.clone(),
                                line: line.clone(),
                                at,
                            },
                        );
                    }
                }
                None => {
                    self.last.remove(&i);
                }
            }
        }
        out
    }

    /// The current phase of node `i` (`None`: this boot has printed no phase yet).
    pub fn phase(&self, i: usize) -> Option<&str> {
        self.last.get(&i).map(|e| e.phase.as_str())
    }

    /// How many nodes are at `phase=ready` in their current boot.
    pub fn ready(&self) -> usize {
        self.last.values().filter(|e| e.phase == "ready").count()
    }

    /// A node whose current boot reports `phase=failed`, with its line.
    pub fn failed(&self) -> Option<&PhaseEvent> {
        self.last.values().find(|e| e.phase == "failed")
    }

    /// "configuring 25s, discovering 44s, ..." for one boot of one node: how long each
    /// phase lasted, and when the first phase line came.
    pub fn durations(&self, node: usize, boot: usize) -> String {
        let mut line = String::new();
        let mut prev: Option<(&str, Duration)> = None;
        for p in [
            "configuring",
            "discovering",
            "bootstrapping",
            "joining",
            "ready",
        ] {
            if let Some(at) = self.first_seen.get(&(node, boot, p.to_string())) {
                if let Some((pp, pa)) = prev {
                    line += &format!(" {pp} {:.0}s,", at.saturating_sub(pa).as_secs_f64());
                }
                prev = Some((p, *at));
            }
        }
        if let Some(at) = self.first_seen.get(&(node, boot, "configuring".into())) {
            line += &format!(" (first phase line at {:.0}s)", at.as_secs_f64());
        }
        line
    }
}

/// clutch-firstboot's resource use on a node, from systemd's accounting and /proc.
#[derive(Debug, Clone, Default)]
pub struct FirstbootUsage {
    /// cgroup memory.peak of clutch-firstboot.service (bytes).
    pub memory_peak: Option<u64>,
    /// CPU time of the unit (ns).
    pub cpu_nsec: Option<u64>,
    /// The daemon's peak resident set (VmHWM, KiB).
    pub vm_hwm_kib: Option<u64>,
    /// Its resident set now (VmRSS, KiB).
    pub vm_rss_kib: Option<u64>,
    /// The daemon's own CPU time (utime + stime of /proc/PID/stat, ns); the rest of
    /// `cpu_nsec` is the programs it ran (etcdctl, systemctl, ...).
    pub daemon_cpu_nsec: Option<u64>,
}

impl FirstbootUsage {
    pub fn parse(out: &str) -> FirstbootUsage {
        let get = |k: &str| -> Option<u64> {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(k))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        let daemon_cpu_nsec = match (get("DaemonTicks="), get("ClkTck=")) {
            (Some(t), Some(hz)) if hz > 0 => Some(t * 1_000_000_000 / hz),
            _ => None,
        };
        FirstbootUsage {
            memory_peak: get("MemoryPeak="),
            cpu_nsec: get("CPUUsageNSec="),
            vm_hwm_kib: get("VmHWM:"),
            vm_rss_kib: get("VmRSS:"),
            daemon_cpu_nsec,
        }
    }
}

/// Reads [`FirstbootUsage`] on node `i` over ssh.
pub fn firstboot_usage(lab: &Lab, i: usize, timeout: Duration) -> Result<FirstbootUsage> {
    let out = lab.ssh(
        i,
        "systemctl show clutch-firstboot -p MemoryPeak -p CPUUsageNSec -p MainPID; \
         pid=$(systemctl show clutch-firstboot -p MainPID --value); \
         grep -E '^(VmHWM|VmRSS):' /proc/$pid/status; \
         echo ClkTck=$(getconf CLK_TCK); \
         sed 's/.*) //' /proc/$pid/stat | awk '{print \"DaemonTicks=\" $12+$13}'; true",
        timeout,
    )?;
    Ok(FirstbootUsage::parse(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_and_phases_split_at_the_marker() {
        let log = "a\nclutch: phase=configuring host=lab-1 role=pending members=0\r\n\
                   clutch: phase=joining host=lab-1 role=server members=2\n\
                   \n----- clutch lab: powered on again: node1 boot 2 -----\n\
                   clutch: phase=ready host=lab-1 role=server members=3\n\
                   \n----- clutch lab: powered on again: node1 boot 3 -----\nbooting\n";
        let b = boots_of(log);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b.concat(), log);
        let p: Vec<Vec<(String, String)>> = b.into_iter().map(phases_in).collect();
        assert_eq!(p[0].len(), 2);
        assert_eq!(p[0][1].0, "joining");
        assert_eq!(p[1][0].0, "ready");
        assert_eq!(field(&p[1][0].1, "host").as_deref(), Some("lab-1"));
        assert_eq!(field(&p[1][0].1, "members").as_deref(), Some("3"));
        assert!(p[2].is_empty());
        assert_eq!(boots_of("no marker").len(), 1);
    }

    #[test]
    fn usage_parses_systemctl_and_proc() {
        let u = FirstbootUsage::parse(
            "MainPID=310\nMemoryPeak=6270976\nCPUUsageNSec=7410000000\nVmHWM:\t    5120 kB\nVmRSS:\t    4000 kB\n\
             ClkTck=100\nDaemonTicks=250\n",
        );
        assert_eq!(u.daemon_cpu_nsec, Some(2_500_000_000));
        assert_eq!(u.memory_peak, Some(6270976));
        assert_eq!(u.cpu_nsec, Some(7_410_000_000));
        assert_eq!(u.vm_hwm_kib, Some(5120));
        assert_eq!(u.vm_rss_kib, Some(4000));
        let none = FirstbootUsage::parse("MemoryPeak=[not set]\n");
        assert_eq!(none.memory_peak, None);
    }
}
