//! The real cluster, the way a CI pipeline runs it (README, "CI recipe"): `clutch lab up
//! image-configs/amd64-lab.toml --nodes 3 --build --wait ready` boots three VMs of one etcd
//! image in a private network namespace; they find each other over mDNS and form a 3-member
//! etcd cluster, and the command exits 0 once every node's live status.json says `ready`.
//! Then `clutch lab status --json` and `clutch lab exec 1 -- etcdctl member list`, and at the
//! end `clutch lab down`.
//!
//! While `lab up --wait` runs, the test follows the consoles through the same lab library
//! (clutch_builder::lab), and the first node seen at `phase=joining` (or, when the nodes
//! bootstrap the cluster together and nobody joins, the first of them at `bootstrapping`)
//! loses its power during that step, as soon as its etcd has begun writing its data dir (SIGKILL to its QEMU; its
//! admitting server has already added it as an etcd member, and being the second member, the
//! cluster has no quorum without it) and is powered on again on the same disk 3 s later (the
//! wait rides through a power cycle that short). It must end `phase=ready` with the same node
//! id and hostname, and every node's `etcdctl member list` must show exactly 3 started members
//! (no stale or unstarted duplicate of it). Then, over the lab's access channel: a key written
//! on one node is read on another, and with one VM killed the other two still accept writes.
//!
//! On the same formed cluster, a rolling update (lab/rollout.rs): release 2 goes through the
//! nodes one at a time while a writer keeps writing, then a bad release 3 stops at the first
//! node, which rolls back. Then one VM is killed for good.
//!
//! Last, on the same image with a broken clutch.toml on its FAT partition, one node ends
//! `phase=failed` and `lab up --wait ready` must exit non-zero within a minute of that,
//! showing the node's error.

use std::time::{Duration, Instant};

use std::path::Path;
use std::process::{Child, Command, Stdio};

use clutch_qemu_tests::lab::{self, Lab, LabGuard, PhaseWatch, field};
use clutch_qemu_tests::*;

#[path = "lab/rollout.rs"]
mod rollout;

/// TCG, three guests on two cores: boot, etcd start and formation all run slowly; the
/// power-cut node boots a second time. (`--timeout` of the recipe's `lab up --wait`.)
const FORMATION: Duration = Duration::from_secs(25 * 60);
/// A cold `--build` (root filesystem and all) before the VMs are powered on.
const BUILD: Duration = Duration::from_secs(30 * 60);
/// The joiner loses its power as soon as etcd has begun writing its data dir (the
/// admitting server ran `etcdctl member add` before the joiner printed `joining`), or
/// after this long in `joining` if etcd never gets that far.
const CUT_BY: Duration = Duration::from_secs(120);
/// How long the power stays off.
const OFF_FOR: Duration = Duration::from_secs(3);

/// What we knew about the power-cut node.
struct Cut {
    node: usize,
    host: String,
    node_id: String,
    killed_at: Duration,
    started: Instant,
    started_at: Duration,
}

/// The node whose formation step to cut short, and that step: the first node seen at
/// `joining` (a node admitted by a running cluster), or, when the nodes bootstrap the cluster
/// together (two or more at `bootstrapping` at once: a static bootstrap, nobody joins), the
/// first of those. A lone bootstrapper is never cut: without it there is no cluster to rejoin.
fn cut_target(w: &PhaseWatch, nodes: usize) -> Option<(usize, &'static str)> {
    if let Some(i) = (0..nodes).find(|&i| w.phase(i) == Some("joining")) {
        return Some((i, "joining"));
    }
    let b: Vec<usize> = (0..nodes)
        .filter(|&i| w.phase(i) == Some("bootstrapping"))
        .collect();
    (b.len() >= 2).then(|| (b[0], "bootstrapping"))
}

fn member_lines(list: &str) -> Vec<&str> {
    list.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn three_vms_form_an_etcd_cluster() {
    let _one = serial_lock();
    let t_test = Instant::now();
    // Release 1 of the lab image, with `[update]` for the rolling update.
    let cfg = test_config("amd64-lab", "amd64-lab", |t| {
        rollout::as_release(t, "1", "")
    });
    let dir = artifacts().join("lab");
    lab::clean(&dir);
    let _down = LabGuard(dir.clone());
    let mut up = recipe_up(&cfg, &dir, 3, "up");
    let lab = loop {
        if let Some(l) = Lab::try_attach(&dir).expect("reading lab.json") {
            break l;
        }
        if let Some(st) = up.try_wait().unwrap() {
            panic!(
                "clutch lab up ended ({st}) before the VMs ran:\n{}",
                output_of(&dir, "up")
            );
        }
        assert!(
            t_test.elapsed() < BUILD,
            "no lab after {BUILD:?}:\n{}",
            output_of(&dir, "up")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "lab powered on {:.0}s into the test",
        t_test.elapsed().as_secs_f64()
    );
    let ssh_wait = Duration::from_secs(180);

    let mut w = PhaseWatch::default();
    // The node to power-cut, the phase it was in, since when.
    let mut joining: Option<(usize, &str, Instant)> = None;
    let mut cut: Option<Cut> = None;
    let all_ready = loop {
        w.poll(&lab);
        if let Some(f) = w.failed() {
            panic!(
                "{} reports phase=failed: {}{}",
                lab.nodes[f.node].name,
                f.line,
                lab.consoles(80)
            );
        }
        if joining.is_none() {
            joining = cut_target(&w, lab.nodes.len()).map(|(i, p)| (i, p, Instant::now()));
        }
        if let (None, Some((v, cut_phase, since))) = (&cut, joining) {
            let name = lab.nodes[v].name.clone();
            let last = w.last[&v].clone();
            let host = field(&last.line, "host").expect("host= in the phase line");
            // One ssh session waits on the joiner until etcd's data dir shows up, then
            // reports where the join stands; the power goes right after.
            let probe = lab
                .ssh(
                    v,
                    &format!(
                        "cat /var/lib/clutch/node-id; echo; \
                         timeout {} sh -c 'until test -e /var/lib/etcd/clutch/member; do sleep 0.3; done'; \
                         systemctl is-active etcd; \
                         find /var/lib/etcd/clutch -maxdepth 3 2>&1 | head -20; true",
                        CUT_BY.as_secs()
                    ),
                    CUT_BY + Duration::from_secs(60),
                )
                .expect("ssh to the joiner before the power cut");
            let node_id = probe.lines().next().unwrap_or_default().trim().to_string();
            assert_eq!(node_id.len(), 32, "node id of {name}: {probe}");
            let pid = lab.kill(&name).expect("lab kill");
            let killed_at = lab.powered_on.elapsed();
            eprintln!(
                "[{:>5.0}s] POWER CUT {name} ({host}, node id {node_id}) {:.0}s into phase={cut_phase}: {}\n\
                 joiner just before the cut (etcd unit state, data dir):\n{}",
                killed_at.as_secs_f64(),
                since.elapsed().as_secs_f64(),
                pid.map(|p| format!("killed (pid {p})")).unwrap_or_default(),
                probe.lines().skip(1).collect::<Vec<_>>().join("\n")
            );
            assert!(pid.is_some(), "{name} was running");
            w.poll(&lab);
            assert_eq!(
                (w.last[&v].boot, w.last[&v].phase.as_str()),
                (1, cut_phase),
                "{name} finished its {cut_phase} before the power cut; nothing was cut short"
            );
            std::thread::sleep(OFF_FOR);
            let boot = lab.start(&name).expect("lab start");
            assert_eq!(boot, 2, "lab start");
            let started_at = lab.powered_on.elapsed();
            eprintln!(
                "[{:>5.0}s] powered {name} on again (boot {boot})",
                started_at.as_secs_f64()
            );
            // What the cluster thinks of it meanwhile (a server that is ready).
            if let Some(s) = (0..lab.nodes.len()).find(|&i| w.phase(i) == Some("ready")) {
                let l = lab
                    .ssh(
                        s,
                        "etcdctl --command-timeout=5s member list 2>&1; true",
                        Duration::from_secs(30),
                    )
                    .unwrap_or_else(|e| format!("{e:#}"));
                eprintln!(
                    "{}: etcdctl member list with {name} down:\n{}",
                    lab.nodes[s].name,
                    l.trim_end()
                );
            }
            cut = Some(Cut {
                node: v,
                host,
                node_id,
                killed_at,
                started: Instant::now(),
                started_at,
            });
        }
        if let Some(st) = up.try_wait().unwrap() {
            let out = output_of(&dir, "up");
            assert!(
                st.success(),
                "clutch lab up --wait ready failed ({st}):\n{out}{}",
                lab.consoles(60)
            );
            eprint!("clutch lab up --wait ready:\n{out}");
            break lab.powered_on.elapsed();
        }
        if lab.powered_on.elapsed() > FORMATION + Duration::from_secs(60) {
            panic!(
                "clutch lab up --wait did not end within {}s{}",
                FORMATION.as_secs(),
                lab.consoles(60)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    w.poll(&lab);
    let Some(cut) = cut else {
        panic!(
            "all nodes ready, but no node was seen joining (or bootstrapping with others) to cut"
        )
    };
    assert_eq!(
        w.ready(),
        lab.nodes.len(),
        "lab up said ready: every console too"
    );
    assert_eq!(
        w.last[&cut.node].boot, 2,
        "the power-cut node is ready in its 2nd boot"
    );
    let victim = &lab.nodes[cut.node];
    let rejoin = cut.started.elapsed();
    eprintln!(
        "formation: all 3 nodes at phase=ready {:.0}s after the last VM was powered on \
         (with {} power-cut at {:.0}s and on again at {:.0}s: ready {:.0}s after that)",
        all_ready.as_secs_f64(),
        victim.name,
        cut.killed_at.as_secs_f64(),
        cut.started_at.as_secs_f64(),
        rejoin.as_secs_f64()
    );
    for (i, n) in lab.nodes.iter().enumerate() {
        eprintln!("phase times {}:{}", n.name, w.durations(i, 1));
        if i == cut.node {
            eprintln!(
                "phase times {} after the power cut (boot 2, from power-on again):{}",
                n.name,
                w.durations(i, 2)
                    .replace(" (first phase line at", " (first phase line at lab time")
            );
        }
    }
    // `clutch lab status --json`: every node's live status.json, 3 members everywhere (the
    // console lines of the first nodes still say fewer).
    let json = clutch(&[
        "lab",
        "status",
        "--json",
        "--dir",
        &dir.display().to_string(),
    ]);
    eprintln!("clutch lab status --json:\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("lab status --json");
    let rows = v["nodes"].as_array().expect("nodes");
    assert_eq!(rows.len(), 3, "{json}");
    for r in rows {
        assert_eq!(r["source"], "status_json", "{json}");
        assert_eq!(r["phase"], "ready", "{json}");
        assert_eq!(r["members"], 3, "{json}");
    }
    // `clutch lab exec 1 -- etcdctl member list`: its output and exit code.
    let list = clutch(&[
        "lab",
        "exec",
        "1",
        "--dir",
        &dir.display().to_string(),
        "--",
        "etcdctl",
        "member",
        "list",
    ]);
    assert_eq!(
        member_lines(&list).len(),
        3,
        "lab exec 1 -- etcdctl member list:\n{list}"
    );
    let st = Command::new(bin("clutch"))
        .args([
            "lab",
            "exec",
            "0",
            "--dir",
            &dir.display().to_string(),
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(7),
        "lab exec passes the command's exit code"
    );
    // The lab's access did not loosen the image's own sshd: its user gets in with the
    // config's key on port 22, root does not (not even with the lab's key).
    assert_eq!(
        port22(&lab, "admin", &ssh_key().private),
        0,
        "admin on port 22"
    );
    assert_ne!(
        port22(&lab, "root", &lab.state.access.client_key),
        0,
        "root on the image's own sshd"
    );

    // The power-cut node is the same node: hostname and node id, and ready in its new boot.
    let ready = &w.last[&cut.node];
    assert_eq!((ready.boot, ready.phase.as_str()), (2, "ready"));
    assert_eq!(
        field(&ready.line, "host").as_deref(),
        Some(cut.host.as_str()),
        "{} came back under another hostname",
        victim.name
    );
    let id_after = lab
        .ssh(cut.node, "cat /var/lib/clutch/node-id", ssh_wait)
        .unwrap();
    assert_eq!(id_after.trim(), cut.node_id, "node id of {}", victim.name);
    let status = lab
        .ssh(cut.node, "cat /run/clutch/status.json", ssh_wait)
        .unwrap();
    assert!(
        status.contains(&cut.node_id) && status.contains("\"ready\""),
        "{}: status.json: {status}",
        victim.name
    );

    // How the cluster let it back in (the admitting server's and its own log).
    for (i, n) in lab.nodes.iter().enumerate() {
        let boot = if i == cut.node { "-b" } else { "" };
        let log = lab
            .ssh(
                i,
                &format!(
                    "journalctl -u clutch-firstboot {boot} --no-pager -o cat | \
                     grep -iE 'rejoin|quorum|stale|admission failed|admitting|interrupted|data dir' | tail -n 8; true"
                ),
                ssh_wait,
            )
            .unwrap_or_else(|e| format!("{e:#}"));
        if !log.trim().is_empty() {
            eprintln!("{} clutch-firstboot log:\n{}", n.name, log.trim_end());
        }
    }

    // From every node: exactly 3 members, all started, one per node (no stale or
    // unstarted duplicate of the power-cut node).
    let hosts: Vec<String> = (0..lab.nodes.len())
        .map(|i| field(&w.last[&i].line, "host").unwrap())
        .collect();
    for (i, n) in lab.nodes.iter().enumerate() {
        let list = lab.ssh(i, "etcdctl member list", ssh_wait).unwrap();
        eprintln!("{}: etcdctl member list:\n{}", n.name, list.trim_end());
        let lines = member_lines(&list);
        assert_eq!(lines.len(), 3, "{}: etcdctl member list:\n{list}", n.name);
        assert_eq!(
            lines.iter().filter(|l| l.contains(", started, ")).count(),
            3,
            "{}: etcdctl member list:\n{list}",
            n.name
        );
        for h in &hosts {
            assert_eq!(
                lines
                    .iter()
                    .filter(|l| l.contains(&format!(", started, {h}, ")))
                    .count(),
                1,
                "{}: one started member named {h}:\n{list}",
                n.name
            );
        }
    }
    outsider_gets_nothing(&lab);
    token_gone_from_the_fat(&lab, &cfg);
    // Written on one, read on another; the power-cut node reads and writes too.
    lab.ssh(0, "etcdctl put clutch/lab written-on-node0", ssh_wait)
        .unwrap();
    let v = lab
        .ssh(1, "etcdctl get --print-value-only clutch/lab", ssh_wait)
        .unwrap();
    assert_eq!(v.trim(), "written-on-node0");
    let v = lab
        .ssh(
            cut.node,
            "etcdctl get --print-value-only clutch/lab",
            ssh_wait,
        )
        .unwrap();
    assert_eq!(v.trim(), "written-on-node0", "read on {}", victim.name);
    let put = lab
        .ssh(
            cut.node,
            "etcdctl put clutch/rejoined power-cut-node",
            ssh_wait,
        )
        .unwrap();
    assert!(put.contains("OK"), "put on {}: {put}", victim.name);
    let other = (cut.node + 1) % lab.nodes.len();
    let v = lab
        .ssh(
            other,
            "etcdctl get --print-value-only clutch/rejoined",
            ssh_wait,
        )
        .unwrap();
    assert_eq!(v.trim(), "power-cut-node");

    rollout::run(&lab, &dir);

    // Kill one VM for good: the other two keep quorum and accept writes.
    let last = lab.nodes.len() - 1;
    let out = clutch(&[
        "lab",
        "kill",
        &last.to_string(),
        "--dir",
        &dir.display().to_string(),
    ]);
    assert!(out.contains("killed"), "lab kill: {out}");
    let t_kill = Instant::now();
    eprintln!("{}", out.trim());
    // A leader election may be under way if the victim led: retry for a while.
    let put = lab
        .ssh(
            0,
            "etcdctl --command-timeout=10s put clutch/after-kill still-writable",
            Duration::from_secs(120),
        )
        .unwrap();
    assert!(put.contains("OK"), "put after kill: {put}");
    let put2 = lab
        .ssh(
            1,
            "etcdctl --command-timeout=10s put clutch/after-kill2 node1-too",
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(put2.contains("OK"), "put on node1 after kill: {put2}");
    let v = lab
        .ssh(
            1,
            "etcdctl get --print-value-only clutch/after-kill",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(v.trim(), "still-writable");
    eprintln!(
        "writes accepted by the 2 survivors {:.0}s after the kill",
        t_kill.elapsed().as_secs_f64()
    );

    let ns = lab.ns.clone();
    let nodes = lab.nodes.clone();
    let access = lab.state.access.dir.clone();
    // The recipe's last step; down removes everything it made.
    let out = clutch(&["lab", "down", "--dir", &dir.display().to_string()]);
    eprint!("clutch lab down:\n{out}");
    drop(lab);
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&ns),
        "namespace {ns} still there"
    );
    for n in &nodes {
        assert!(!n.pidfile.exists(), "{} still has a pidfile", n.name);
    }
    assert!(!access.exists(), "the lab's keys are gone");

    failed_node_ends_the_wait(&cfg);
    eprintln!(
        "lab test took {:.0}s in total",
        t_test.elapsed().as_secs_f64()
    );
}

/// A machine on the lab network without the cluster's certificates (the host side of the
/// lab namespace) can neither read, write nor join etcd, on the client or the peer port.
fn outsider_gets_nothing(lab: &Lab) {
    let run = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns])
            .args(args)
            .output()
            .unwrap()
    };
    for n in &lab.nodes {
        let ip = &n.ip;
        for url in [
            format!("http://{ip}:2379/version"),
            format!("https://{ip}:2379/version"),
            format!("http://{ip}:2380/members"),
            format!("https://{ip}:2380/members"),
        ] {
            let out = run(&["curl", "-sS", "-k", "--max-time", "5", &url]);
            assert!(
                !out.status.success(),
                "{url} answered a machine without certificates: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let ep = format!("--endpoints=https://{ip}:2379");
        for cmd in [
            vec![
                "member",
                "add",
                "intruder",
                "--peer-urls=https://10.77.0.250:2380",
            ],
            vec!["put", "owned", "yes"],
            vec!["get", "--prefix", ""],
        ] {
            let mut a = vec![
                "etcdctl",
                ep.as_str(),
                "--insecure-skip-tls-verify",
                "--dial-timeout=3s",
                "--command-timeout=5s",
            ];
            a.extend(cmd.iter().copied());
            let out = run(&a);
            assert!(
                !out.status.success(),
                "etcdctl {cmd:?} worked without certificates on {ip}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let list = lab
        .ssh(0, "etcdctl member list", Duration::from_secs(60))
        .unwrap();
    assert_eq!(member_lines(&list).len(), 3, "{list}");
    assert!(!list.contains("intruder"), "{list}");
    eprintln!("from the lab network without certificates: no read, write or join on 2379/2380");
}

/// The cluster token was in the image's clutch.toml on the FAT partition; after first boot
/// it is in /var/lib/clutch only: not in the file, and not in the partition's freed clusters
/// either (firstboot overwrites it in place before the file is rewritten).
fn token_gone_from_the_fat(lab: &Lab, cfg: &Path) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the lab config has an inline token");
    for i in 0..lab.nodes.len() {
        let script = format!(
            "set -e; devs=$(blkid -t TYPE=vfat -o device); test -n \"$devs\"; \
             for d in $devs; do printf '%s %s\\n' $d $(grep -c -a -F {token} $d || true); done"
        );
        let out = lab.ssh(i, &script, Duration::from_secs(60)).unwrap();
        let counts: Vec<&str> = out.lines().filter_map(|l| l.split(' ').nth(1)).collect();
        assert!(
            !counts.is_empty() && counts.iter().all(|c| *c == "0"),
            "node {i}: the token is still on a FAT partition (device count):\n{out}"
        );
        eprintln!(
            "node {i}: token on the raw FAT partition(s): {}",
            out.trim()
        );
    }
}

/// The recipe's `clutch lab up CONFIG --nodes N --build --wait ready`, run from the artifacts
/// folder (so `--build` writes `out/<name>/`, where the other tests' builds go) with the test
/// run's cache and this checkout's boards; output in `DIR.<tag>.out`.
fn recipe_up(cfg: &Path, dir: &Path, nodes: usize, tag: &str) -> Child {
    let log = std::fs::File::create(dir.with_extension(format!("{tag}.out"))).unwrap();
    Command::new(bin("clutch"))
        .args(["lab", "up"])
        .arg(cfg)
        .args(["--nodes", &nodes.to_string(), "--build", "--wait", "ready"])
        .args(["--timeout", &FORMATION.as_secs().to_string(), "--dir"])
        .arg(dir)
        .current_dir(artifacts())
        .env("CLUTCH_CACHE", cache_dir())
        .env("CLUTCH_DATA_DIR", workspace())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("clutch lab up")
}

fn output_of(dir: &Path, tag: &str) -> String {
    std::fs::read_to_string(dir.with_extension(format!("{tag}.out"))).unwrap_or_default()
}

/// `clutch ARGS`; its stdout (fails the test when it fails).
fn clutch(args: &[&str]) -> String {
    let o = Command::new(bin("clutch"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "clutch {} failed ({}): {}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// ssh to node0's own sshd (port 22) as `user` with `key`, from inside the namespace; the
/// exit code.
fn port22(lab: &Lab, user: &str, key: &Path) -> i32 {
    Command::new("ip")
        .args(["netns", "exec", &lab.ns, "ssh", "-F", "/dev/null", "-q"])
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args([
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-i",
        ])
        .arg(key)
        .arg(format!("{user}@{}", lab.nodes[0].ip))
        .arg("true")
        .stdin(Stdio::null())
        .status()
        .unwrap()
        .code()
        .unwrap_or(-1)
}

/// A clutch.toml whose error is at a known place (firstboot's test uses the same).
const BROKEN: &str = "version = 1\n\n[system]\nhostname = \"node-{serial}\"\ntimezone = \"UTC\"\n";

/// One VM of the lab image with BROKEN on its FAT partition ends `phase=failed`; the recipe's
/// `lab up --wait ready` must exit non-zero within a minute of that, naming the error.
fn failed_node_ends_the_wait(cfg: &Path) {
    let img = artifacts().join("out/amd64-lab/amd64-lab.img");
    let broken = artifacts().join("lab-broken.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&broken)
        .status()
        .unwrap();
    assert!(st.success());
    let toml = artifacts().join("lab-broken.toml");
    std::fs::write(&toml, BROKEN).unwrap();
    mtools(&[
        "mcopy",
        "-o",
        "-i",
        &fat(&broken),
        toml.to_str().unwrap(),
        "::/clutch.toml",
    ]);
    let dir = artifacts().join("lab-broken");
    lab::clean(&dir);
    let _down = LabGuard(dir.clone());
    let t = Instant::now();
    let o = Command::new(bin("clutch"))
        .args(["lab", "up"])
        .arg(cfg)
        .args([
            "--nodes",
            "1",
            "--wait",
            "ready",
            "--timeout",
            "900",
            "--image",
        ])
        .arg(&broken)
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!(
        "lab up --wait ready on a failing node ({:.0}s):\n{err}",
        took.as_secs_f64()
    );
    assert!(
        !o.status.success(),
        "lab up --wait ready succeeded on a failed node"
    );
    let want = "/boot/efi/clutch.toml:4:12: system.hostname";
    assert!(err.contains("clutch lab: node0 is failed ("), "{err}");
    assert!(
        err.contains(&format!("node0: error: {want}")),
        "the node's error: {err}"
    );
    assert!(err.contains("last 40 lines of node0's console"), "{err}");
    // When the console showed the failure (the progress line `[  Ns] node0: clutch:
    // phase=failed`), and when the command ended.
    let failed_at: f64 = err
        .lines()
        .find(|l| l.contains("node0: clutch: phase=failed"))
        .and_then(|l| l.trim_start_matches('[').split('s').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no failed progress line: {err}"));
    let after = took.as_secs_f64() - failed_at;
    eprintln!(
        "MEASURED lab up --wait exited {after:.0}s after the failed line ({failed_at:.0}s after power-on)"
    );
    assert!(after < 60.0, "exited {after:.0}s after the failure");
    clutch(&["lab", "down", "--dir", &dir.display().to_string()]);
}
