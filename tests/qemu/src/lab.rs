//! The lab for tests and benchmarks, through the same library `clutch lab` is made of
//! (`clutch_builder::lab`): bring a lab up or attach to the one `clutch lab up` made (and
//! always take it down again), follow the nodes' phase lines boot by boot, run commands on
//! nodes as root over the lab's access channel, cut a node's power and power it on again,
//! and read clutch-firstboot's memory and CPU use on a node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clutch_builder::lab::access::{self, SshOpts};
use clutch_builder::lab::console::{self, PhaseLine};
use clutch_builder::lab::status::NodeStatus;
use clutch_builder::lab::vm::AccelChoice;
use clutch_builder::lab::{Host, LabState, NodeIndex, NodeSpec, RealHost, ops, plan};

pub use clutch_builder::lab::console::BOOT_MARKER;

/// A running lab; taken down (VMs, namespace, keys) when dropped, also when a test panics.
pub struct Lab {
    pub state: LabState,
    pub dir: PathBuf,
    pub ns: String,
    pub nodes: Vec<NodeSpec>,
    /// Just after every VM (the last one too) was powered on.
    pub powered_on: Instant,
}

impl Drop for Lab {
    fn drop(&mut self) {
        match ops::down(&RealHost, &self.dir) {
            Ok(r) => eprintln!(
                "lab down: stopped {:?}, removed namespace {:?}",
                r.stopped, r.namespace_removed
            ),
            Err(e) => eprintln!("lab down failed: {e:#}"),
        }
    }
}

/// Takes the lab in its folder down when dropped (for labs the `clutch` binary made).
pub struct LabGuard(pub PathBuf);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = ops::down(&RealHost, &self.0) {
            eprintln!("lab down {} failed: {e:#}", self.0.display());
        }
    }
}

/// Removes whatever a killed earlier run left in `dir`, and `dir` itself.
pub fn clean(dir: &Path) {
    let _ = ops::down(&RealHost, dir);
    let _ = std::fs::remove_dir_all(dir);
}

impl Lab {
    /// Brings up a lab of `nodes` VMs of `image` in `dir` the way `clutch lab up` does (the
    /// accelerator probe included), after removing what a killed earlier run left there.
    pub fn up(image: &Path, dir: &Path, nodes: usize) -> Result<Lab> {
        clean(dir);
        std::fs::create_dir_all(dir)?;
        let accel = ops::choose_accel(&RealHost, AccelChoice::Auto, image)?;
        eprintln!("lab: accelerator {} ({})", accel.accel, accel.reason);
        let s = plan::plan(dir, image, nodes, 768, accel.accel)?;
        let size = plan::overlay_size(image, std::fs::metadata(image)?.len());
        // Adopted before `up`, so a failing `up` is taken down too.
        let mut lab = Lab::adopt(s.clone());
        ops::up(&RealHost, &s, size)?;
        lab.powered_on = Instant::now();
        Ok(lab)
    }

    /// The lab that `clutch lab up` is bringing up in `dir`, once its lab.json is written
    /// and every VM's QEMU is running; `None` before that.
    pub fn try_attach(dir: &Path) -> Result<Option<Lab>> {
        Ok(plan::load_state(dir)?
            .filter(|s| s.nodes.iter().all(|n| ops::running(&RealHost, n)))
            .map(Lab::adopt))
    }

    fn adopt(s: LabState) -> Lab {
        Lab {
            dir: s.dir.clone(),
            ns: s.namespace.clone(),
            nodes: s.nodes.clone(),
            state: s,
            powered_on: Instant::now(),
        }
    }

    /// Every node's status row (status.json over the access channel, else the console).
    pub fn status(&self) -> Vec<NodeStatus> {
        ops::statuses(&RealHost, &self.state)
    }

    fn index(&self, node: &str) -> Result<NodeIndex> {
        node.parse::<NodeIndex>().map_err(anyhow::Error::msg)
    }

    /// A power cut: SIGKILL to the node's QEMU. The pid, `None` when it was not running.
    pub fn kill(&self, node: &str) -> Result<Option<u32>> {
        ops::kill(&RealHost, &self.state, self.index(node)?)
    }

    /// Power on again, same disk; the boot number (2 after the first power cut).
    pub fn start(&self, node: &str) -> Result<usize> {
        ops::start(&RealHost, &self.state, self.index(node)?)
    }

    /// Runs `script` (`sh -c`) as root on node `i` over the lab's access channel, retrying
    /// while it fails (sshd coming up, a leader election) until `timeout`.
    pub fn ssh(&self, i: usize, script: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let cmd = vec!["sh".to_string(), "-c".into(), script.to_string()];
        let argv = access::ssh_cmd(&self.state, &self.nodes[i], &cmd, SshOpts::default());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = RealHost.output(&argv, left + Duration::from_secs(30))?;
            if c.success() {
                return Ok(c.stdout);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} `{script}` failed (exit {:?}): {}{}",
                    self.nodes[i].name,
                    c.code,
                    c.stdout,
                    c.stderr
                );
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// Runs `script` once on node `i` (no retry): whether it exited 0, and its output.
    /// `connect` bounds the ssh handshake, `timeout` the whole run.
    pub fn try_ssh(
        &self,
        i: usize,
        script: &str,
        connect: Duration,
        timeout: Duration,
    ) -> Result<(bool, String)> {
        let cmd = vec!["sh".to_string(), "-c".into(), script.to_string()];
        let opts = SshOpts {
            connect_timeout_secs: connect.as_secs().max(1) as u32,
        };
        let argv = access::ssh_cmd(&self.state, &self.nodes[i], &cmd, opts);
        let c = RealHost.output(&argv, timeout)?;
        Ok((c.success(), format!("{}{}", c.stdout, c.stderr)))
    }

    /// The last `lines` lines of every node's console, for failure messages.
    pub fn consoles(&self, lines: usize) -> String {
        let mut msg = String::new();
        for n in &self.nodes {
            msg += &format!(
                "\n----- console of {} ({}) -----\n{}",
                n.name,
                n.console.display(),
                console::tail(&ops::console_text(n), lines)
            );
        }
        msg
    }
}

/// The value of `key` (`host`, `role`, `members`) in a phase line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let p: PhaseLine = console::phase_lines(line).pop()?;
    match key {
        "host" => Some(p.host),
        "role" => Some(p.role),
        "members" => p.members.map(|m| m.to_string()),
        _ => None,
    }
}

/// The phase lines of each boot of a node's console log.
pub fn phases_by_boot(console_log: &Path) -> Vec<Vec<PhaseLine>> {
    let text =
        String::from_utf8_lossy(&std::fs::read(console_log).unwrap_or_default()).into_owned();
    console::boots_of(&text)
        .into_iter()
        .map(console::phase_lines)
        .collect()
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

fn word(p: &PhaseLine) -> String {
    p.phase
        .map(|x| x.as_str().to_string())
        .unwrap_or_else(|| "?".into())
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
                for p in &lines[*done..] {
                    let at = lab.powered_on.elapsed();
                    eprintln!(
                        "[{:>5.0}s] {} (boot {boot}): {}",
                        at.as_secs_f64(),
                        n.name,
                        p.line
                    );
                    self.first_seen.entry((i, boot, word(p))).or_insert(at);
                    out.push(PhaseEvent {
                        node: i,
                        boot,
                        phase: word(p),
                        line: p.line.clone(),
                        at,
                    });
                }
                *done = lines.len();
            }
            match boots[current - 1].last() {
                Some(p) => {
                    let keep = self
                        .last
                        .get(&i)
                        .is_some_and(|e| e.boot == current && e.line == p.line);
                    if !keep {
                        let at = lab.powered_on.elapsed();
                        self.last.insert(
                            i,
                            PhaseEvent {
                                node: i,
                                boot: current,
                                phase: word(p),
                                line: p.line.clone(),
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

/// Reads [`FirstbootUsage`] on node `i`.
pub fn firstboot_usage(lab: &Lab, i: usize, timeout: Duration) -> Result<FirstbootUsage> {
    let out = lab
        .ssh(
            i,
            "systemctl show clutch-firstboot -p MemoryPeak -p CPUUsageNSec -p MainPID; \
             pid=$(systemctl show clutch-firstboot -p MainPID --value); \
             grep -E '^(VmHWM|VmRSS):' /proc/$pid/status; \
             echo ClkTck=$(getconf CLK_TCK); \
             sed 's/.*) //' /proc/$pid/stat | awk '{print \"DaemonTicks=\" $12+$13}'; true",
            timeout,
        )
        .context("reading clutch-firstboot's usage")?;
    Ok(FirstbootUsage::parse(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_come_from_the_lab_librarys_phase_lines() {
        let l = "clutch: phase=ready host=lab-1 role=server members=3";
        assert_eq!(field(l, "host").as_deref(), Some("lab-1"));
        assert_eq!(field(l, "role").as_deref(), Some("server"));
        assert_eq!(field(l, "members").as_deref(), Some("3"));
        assert_eq!(field("no phase here", "host"), None);
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
