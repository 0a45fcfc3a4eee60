//! The rolling update of the lab test's formed cluster (same boot, same three VMs):
//! - the lab image is release 1 with `[update]` pointing at the lab's update server
//!   (`http://10.77.0.1:8080/`, what `clutch lab update` serves);
//! - release 2 (the same config) is served and every node is told to update at the same
//!   moment: they must go down one at a time (each node's "rebooting into release" to its
//!   `phase=ready` on the new slot, intervals that never overlap), end on release 2 on slot b
//!   with 3 started etcd members, while a writer puts keys through one node after another
//!   (switching when its node stops answering) and loses no acknowledged write;
//! - release 3 cannot run its etcd (`systemd.mask=etcd.service` on its kernel command line):
//!   the first node to try it reaches `phase=failed`, goes back to release 2 and marks 3 bad
//!   in etcd; the other two refuse it and never reboot.
//!
//! Per-node downtime, the rollout's total time and the writer's availability are printed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clutch_builder::lab::ops;
use clutch_qemu_tests::lab::Lab;
use clutch_qemu_tests::*;

/// Three nodes, one after another: each writes its slot (download, xz, sysupdate under
/// TCG), reboots, rejoins and commits.
const ROLLOUT: Duration = Duration::from_secs(40 * 60);
/// The bad release: one node writes it, fails on it, comes back; the others refuse it.
const BAD_RELEASE: Duration = Duration::from_secs(25 * 60);

/// The release-signing key of the lab's releases (made once with `clutch update-key`).
fn lab_release_key() -> PathBuf {
    release_key(&artifacts().join("lab-release.key"))
}

/// The lab config `t` as release `release`, with `cmdline` (quoted words, comma separated)
/// on the kernel command line and `[update]` from the lab's update server.
pub fn as_release(t: String, release: &str, cmdline: &str) -> String {
    assert!(
        t.contains("formats = [\"raw\"]") && t.contains("cgroups = true"),
        "image-configs/amd64-lab.toml changed shape:\n{t}"
    );
    let t = t
        .replace(
            "formats = [\"raw\"]",
            &format!("formats = [\"raw\"]\nrelease = \"{release}\""),
        )
        .replace(
            "cgroups = true",
            &format!("cgroups = true\ncmdline = [{cmdline}]"),
        );
    format!(
        "{t}\n[update]\nsource = \"http://{}/\"\ncheck = \"manual\"\nsigning_key_file = \"{}\"\n",
        ops::update_listen(),
        lab_release_key().display()
    )
}

/// Builds releases 2 and 3 of the lab config (`update` output only); their `update/`
/// folders.
fn build_releases() -> (PathBuf, PathBuf) {
    let t = Instant::now();
    let build = |release: &str, cmdline: &str| {
        let cfg = test_config("amd64-lab", &format!("amd64-lab-r{release}"), |t| {
            as_release(t, release, cmdline)
        });
        let main = build_image(&cfg, "update")
            .unwrap_or_else(|e| panic!("build lab release {release}: {e:#}"));
        let d = main.parent().unwrap().to_path_buf();
        assert!(d.ends_with("update"), "{}", main.display());
        d
    };
    let r2 = build("2", "");
    let r3 = build("3", "\"systemd.mask=etcd.service\"");
    eprintln!(
        "built lab releases 2 and 3 in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    (r2, r3)
}

fn console_bytes(n: &clutch_builder::lab::NodeSpec) -> Vec<u8> {
    std::fs::read(&n.console).unwrap_or_default()
}

/// A console line of interest, when the test saw it.
#[derive(Debug, Clone)]
struct Seen {
    node: usize,
    at: Duration,
    line: String,
}

/// Follows every node's console for `clutch: update ...` and `clutch: phase=` lines.
struct Consoles {
    from: Vec<usize>,
    seen: Vec<Seen>,
    t0: Instant,
}

impl Consoles {
    fn new(lab: &Lab, t0: Instant) -> Consoles {
        Consoles {
            from: lab.nodes.iter().map(|n| console_bytes(n).len()).collect(),
            seen: Vec::new(),
            t0,
        }
    }

    /// The complete lines each console got since the last poll (raw bytes: a console may
    /// end in the middle of a line or of a character).
    fn poll(&mut self, lab: &Lab) {
        for (i, n) in lab.nodes.iter().enumerate() {
            let bytes = console_bytes(n);
            assert!(
                bytes.len() >= self.from[i],
                "{}'s console log shrank",
                n.name
            );
            let Some(end) = bytes[self.from[i]..].iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let end = self.from[i] + end + 1;
            let text = String::from_utf8_lossy(&bytes[self.from[i]..end]).into_owned();
            for l in text.lines() {
                if let Some(p) = l
                    .find("clutch: update ")
                    .or_else(|| l.find("clutch: phase="))
                {
                    let line = l[p..].trim().to_string();
                    eprintln!(
                        "[{:>5.0}s] {}: {line}",
                        self.t0.elapsed().as_secs_f64(),
                        n.name
                    );
                    self.seen.push(Seen {
                        node: i,
                        at: self.t0.elapsed(),
                        line,
                    });
                }
            }
            self.from[i] = end;
        }
    }

    /// Each time a node was down for release `r`: from its "rebooting into release=r" line
    /// to its next `phase=ready` (None while it is not back).
    fn down(&self, r: &str) -> Vec<(usize, Duration, Option<Duration>)> {
        let mut v = Vec::new();
        for (k, s) in self.seen.iter().enumerate() {
            if s.line
                .starts_with(&format!("clutch: update rebooting into release={r} "))
            {
                let back = self.seen[k + 1..]
                    .iter()
                    .find(|x| x.node == s.node && x.line.starts_with("clutch: phase=ready "))
                    .map(|x| x.at);
                v.push((s.node, s.at, back));
            }
        }
        v
    }
}

/// Tells the writer to stop when dropped, also when an assertion fails (the scope that runs
/// it joins it before the panic goes on).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the writer saw.
#[derive(Default)]
struct Writes {
    acked: Vec<u64>,
    attempts: u64,
    failed: u64,
    longest_gap: Duration,
    switches: Vec<String>,
}

/// Puts `clutch/writer/<n>` through node `at`, one key at a time, until `stop`; a put that
/// fails moves it to the next node.
fn writer(lab: &Lab, stop: &AtomicBool, out: &Mutex<Writes>, t0: Instant) {
    let mut at = 0usize;
    let mut seq = 0u64;
    let mut last_ack = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let put = format!("etcdctl --command-timeout=3s put clutch/writer/{seq:06} {seq}");
        let ok = matches!(
            lab.try_ssh(at, &put, Duration::from_secs(3), Duration::from_secs(15)),
            Ok((true, ref o)) if o.contains("OK")
        );
        let mut w = out.lock().unwrap();
        w.attempts += 1;
        if ok {
            w.longest_gap = w.longest_gap.max(last_ack.elapsed());
            last_ack = Instant::now();
            w.acked.push(seq);
        } else {
            w.failed += 1;
            at = (at + 1) % lab.nodes.len();
            w.switches.push(format!(
                "{:.0}s->{}",
                t0.elapsed().as_secs_f64(),
                lab.nodes[at].name
            ));
        }
        drop(w);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every node's status row (live status.json) from `clutch lab status --json`.
fn rows(dir: &Path) -> Vec<serde_json::Value> {
    let o = Command::new(bin("clutch"))
        .args(["lab", "status", "--json", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = || {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(o.status.success(), "clutch lab status --json: {}", said());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("clutch lab status --json: {e}: {}", said()));
    let rows = v["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 3, "clutch lab status --json: {}", said());
    rows
}

fn lab_update(dir: &Path, folder: &Path) {
    let o = Command::new(bin("clutch"))
        .args(["lab", "update"])
        .arg(folder)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "clutch lab update: {out}");
    eprint!("clutch lab update {}:\n{out}", folder.display());
}

/// The release rolls through the cluster, then the bad one stops at its first node.
pub fn run(lab: &Lab, dir: &Path) {
    let (r2, r3) = build_releases();
    let t0 = Instant::now();
    let mut c = Consoles::new(lab, t0);
    let stop = AtomicBool::new(false);
    let writes = Mutex::new(Writes::default());
    let n = lab.nodes.len();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| writer(lab, &stop, &writes, t0));
        // Let the writer get going before anything goes down.
        std::thread::sleep(Duration::from_secs(5));
        lab_update(dir, &r2);
        let done = loop {
            c.poll(lab);
            let down = c.down("2");
            // Never two nodes down at once. (Times are when this loop saw the lines, every
            // ~2 s; safe because the next node writes its slot for minutes after it gets
            // the ticket, before it goes down.)
            for (k, a) in down.iter().enumerate() {
                for b in &down[k + 1..] {
                    let a_end = a.2.unwrap_or(Duration::MAX);
                    assert!(
                        a_end <= b.1,
                        "{} went down at {:.0}s while {} was down since {:.0}s{}",
                        lab.nodes[b.0].name,
                        b.1.as_secs_f64(),
                        lab.nodes[a.0].name,
                        a.1.as_secs_f64(),
                        lab.consoles(40)
                    );
                }
            }
            let committed = c
                .seen
                .iter()
                .filter(|x| x.line.starts_with("clutch: update committed release=2 "))
                .map(|x| x.node)
                .collect::<BTreeSet<_>>();
            if committed.len() == n {
                break t0.elapsed();
            }
            if let Some(f) = c.seen.iter().find(|x| {
                x.line.starts_with("clutch: phase=failed")
                    || x.line.starts_with("clutch: update rolled-back")
            }) {
                panic!(
                    "{} during the rollout of release 2: {}{}",
                    lab.nodes[f.node].name,
                    f.line,
                    lab.consoles(60)
                );
            }
            assert!(
                t0.elapsed() < ROLLOUT,
                "release 2 not committed on every node within {}s (committed: {committed:?}); status: {:#?}{}",
                ROLLOUT.as_secs(),
                rows(dir),
                lab.consoles(60)
            );
            std::thread::sleep(Duration::from_secs(2));
        };
        // A last round of writes on the updated cluster, then stop the writer.
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        eprintln!(
            "rolling update to release 2: all {n} nodes committed {:.0}s after `lab update`",
            done.as_secs_f64()
        );
        for (node, down, back) in c.down("2") {
            let back = back.expect("every node is back");
            eprintln!(
                "  {}: down from {:.0}s to {:.0}s ({:.0}s: reboot, boot, rejoin)",
                lab.nodes[node].name,
                down.as_secs_f64(),
                back.as_secs_f64(),
                (back - down).as_secs_f64()
            );
        }
    });
    let w = writes.into_inner().unwrap();
    eprintln!(
        "writer: {} puts acknowledged of {} tried ({:.1}%), longest time without an acknowledged put {:.1}s, node switches {:?}",
        w.acked.len(),
        w.attempts,
        100.0 * w.acked.len() as f64 / w.attempts.max(1) as f64,
        w.longest_gap.as_secs_f64(),
        w.switches
    );
    assert_eq!(
        c.down("2").len(),
        n,
        "every node rebooted once for release 2"
    );
    assert!(
        w.acked.len() >= 10,
        "the writer got few puts through: {}",
        w.acked.len()
    );
    // No acknowledged write lost: every acknowledged key is there, read on each node.
    for i in 0..n {
        let keys = lab
            .ssh(
                i,
                "etcdctl get --prefix --keys-only clutch/writer/",
                Duration::from_secs(120),
            )
            .unwrap();
        let have: BTreeSet<u64> = keys
            .lines()
            .filter_map(|l| l.trim().strip_prefix("clutch/writer/"))
            .filter_map(|s| s.parse().ok())
            .collect();
        let lost: Vec<u64> = w
            .acked
            .iter()
            .copied()
            .filter(|k| !have.contains(k))
            .collect();
        assert!(
            lost.is_empty(),
            "{}: acknowledged puts missing: {lost:?}",
            lab.nodes[i].name
        );
        // Three started members, and the node on release 2, slot b.
        let list = lab
            .ssh(i, "etcdctl member list", Duration::from_secs(120))
            .unwrap();
        assert_eq!(
            list.lines().filter(|l| l.contains(", started, ")).count(),
            3,
            "{}: etcdctl member list after the rollout:\n{list}",
            lab.nodes[i].name
        );
    }
    for r in rows(dir) {
        assert_eq!(r["release"], "2", "{r}");
        assert_eq!(r["slot"], "b", "{r}");
        assert_eq!(r["update"]["state"], "committed", "{r}");
        assert_eq!(r["members"], 3, "{r}");
    }

    bad_release(lab, dir, &r3, &mut c);
}

/// Release 3 fails on the first node that tries it; the others never reboot for it.
fn bad_release(lab: &Lab, dir: &Path, r3: &Path, c: &mut Consoles) {
    let t = Instant::now();
    lab_update(dir, r3);
    let (first, state) = loop {
        c.poll(lab);
        let rows = rows(dir);
        let back = rows
            .iter()
            .position(|r| r["update"]["state"] == "rolled-back" && r["update"]["release"] == "3");
        let refused = rows
            .iter()
            .filter(|r| r["update"]["state"] == "refused" && r["update"]["release"] == "3")
            .count();
        if let (Some(b), true) = (back, refused == lab.nodes.len() - 1) {
            break (b, rows);
        }
        assert!(
            t.elapsed() < BAD_RELEASE,
            "release 3: not rolled back on one node and refused by the others within {}s: {rows:#?}{}",
            BAD_RELEASE.as_secs(),
            lab.consoles(60)
        );
        std::thread::sleep(Duration::from_secs(5));
    };
    c.poll(lab);
    eprintln!(
        "release 3: {} tried it, failed and is back on release 2; the others refused it, {:.0}s after `lab update`",
        lab.nodes[first].name,
        t.elapsed().as_secs_f64()
    );
    let tried: Vec<usize> = c.down("3").iter().map(|d| d.0).collect();
    assert_eq!(
        tried,
        vec![first],
        "only {} rebooted into release 3",
        lab.nodes[first].name
    );
    for (i, r) in state.iter().enumerate() {
        assert_eq!(r["release"], "2", "{r}");
        assert_eq!(r["phase"], "ready", "{r}");
        if i != first {
            let why = r["update"]["reason"].as_str().unwrap_or_default();
            let by = state[first]["host"].as_str().unwrap_or_default();
            assert!(
                why.contains(&format!("found bad by {by} ")),
                "{}: refused for another reason than {by} finding it bad: {r}",
                lab.nodes[i].name
            );
        }
    }
    let bad = lab
        .ssh(
            0,
            "etcdctl get --prefix --keys-only /clutch/rollout/bad/",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        bad.contains("/clutch/rollout/bad/3"),
        "release 3 marked bad in etcd: {bad}"
    );
}
