//! The real cluster (issues 4 and 8): `clutch lab up image-configs/amd64-lab.toml --nodes 3`
//! boots three VMs of one etcd image in a private network namespace; they find each other
//! over mDNS and form a 3-member etcd cluster.
//!
//! In the same run, the first node seen at `phase=joining` loses its power during the join,
//! as soon as its etcd has begun writing its data dir (`clutch lab kill`: SIGKILL to its
//! QEMU; its admitting server has already added it as an etcd member, and being the second
//! member, the cluster has no quorum without it) and is powered on again on the same disk (`clutch lab
//! start`). It must end `phase=ready` with the same node id and hostname, and every node's
//! `etcdctl member list` must show exactly 3 started members (no stale or unstarted
//! duplicate of it). Then, checked from inside the namespace over ssh: a key written on one
//! node is read on another, and with one VM killed the other two still accept writes.

use std::time::{Duration, Instant};

use clutch_qemu_tests::lab::{Lab, PhaseWatch, field};
use clutch_qemu_tests::*;

/// TCG, three guests on two cores: boot, etcd start and formation all run slowly; the
/// power-cut node boots a second time.
const FORMATION: Duration = Duration::from_secs(25 * 60);
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

fn member_lines(list: &str) -> Vec<&str> {
    list.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn three_vms_form_an_etcd_cluster() {
    let _one = serial_lock();
    let t_test = Instant::now();
    let cfg = test_config("amd64-lab", "amd64-lab", |t| t);
    let img = build_image(&cfg, "raw").expect("build amd64-lab");
    let lab = Lab::up(&cfg, &img, &artifacts().join("lab"), 3).expect("clutch lab up");
    let ssh_wait = Duration::from_secs(180);

    let mut w = PhaseWatch::default();
    let mut joining: Option<(usize, Instant)> = None;
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
            joining = (0..lab.nodes.len())
                .find(|&i| w.phase(i) == Some("joining"))
                .map(|i| (i, Instant::now()));
        }
        if let (None, Some((v, since))) = (&cut, joining) {
            let name = lab.nodes[v].name.clone();
            let last = w.last[&v].clone();
            let host = field(&last.line, "host").expect("host= in the phase line");
            // One ssh session waits on the joiner until etcd's data dir shows up, then
            // reports where the join stands; the power goes right after.
            let probe = lab
                .ssh(
                    v,
                    &format!(
                        "sudo cat /var/lib/clutch/node-id; echo; \
                         sudo timeout {} sh -c 'until test -e /var/lib/etcd/clutch/member; do sleep 0.3; done'; \
                         systemctl is-active etcd; \
                         sudo find /var/lib/etcd/clutch -maxdepth 3 2>&1 | head -20; true",
                        CUT_BY.as_secs()
                    ),
                    CUT_BY + Duration::from_secs(60),
                )
                .expect("ssh to the joiner before the power cut");
            let node_id = probe.lines().next().unwrap_or_default().trim().to_string();
            assert_eq!(node_id.len(), 32, "node id of {name}: {probe}");
            let out = lab.kill(&name).expect("clutch lab kill");
            let killed_at = lab.powered_on.elapsed();
            eprintln!(
                "[{:>5.0}s] POWER CUT {name} ({host}, node id {node_id}) {:.0}s into phase=joining: {}\n\
                 joiner just before the cut (etcd unit state, data dir):\n{}",
                killed_at.as_secs_f64(),
                since.elapsed().as_secs_f64(),
                out.trim(),
                probe.lines().skip(1).collect::<Vec<_>>().join("\n")
            );
            assert!(out.contains("killed"), "lab kill: {out}");
            w.poll(&lab);
            assert_eq!(
                (w.last[&v].boot, w.last[&v].phase.as_str()),
                (1, "joining"),
                "{name} finished its join before the power cut; nothing was cut short"
            );
            std::thread::sleep(OFF_FOR);
            let out = lab.start(&name).expect("clutch lab start");
            assert!(out.contains("boot=2"), "lab start: {out}");
            let started_at = lab.powered_on.elapsed();
            eprintln!(
                "[{:>5.0}s] powered {name} on again: {}",
                started_at.as_secs_f64(),
                out.trim()
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
        let victim_rebooted = cut
            .as_ref()
            .is_some_and(|c| w.last.get(&c.node).is_some_and(|e| e.boot == 2));
        if w.ready() == lab.nodes.len() && victim_rebooted {
            break lab.powered_on.elapsed();
        }
        if w.ready() == lab.nodes.len() && cut.is_none() {
            panic!("all nodes ready, but no node was seen in phase=joining to cut");
        }
        if lab.powered_on.elapsed() > FORMATION {
            panic!(
                "not all nodes ready within {}s{}",
                FORMATION.as_secs(),
                lab.consoles(60)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let cut = cut.unwrap();
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
    eprint!("lab status:\n{}", lab.status().unwrap());

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
        .ssh(cut.node, "sudo cat /var/lib/clutch/node-id", ssh_wait)
        .unwrap();
    assert_eq!(id_after.trim(), cut.node_id, "node id of {}", victim.name);
    let status = lab
        .ssh(cut.node, "sudo cat /run/clutch/status.json", ssh_wait)
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
                    "sudo journalctl -u clutch-firstboot {boot} --no-pager -o cat | \
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

    // Kill one VM for good: the other two keep quorum and accept writes.
    let last = lab.nodes.len() - 1;
    let out = lab.kill(&lab.nodes[last].name).expect("clutch lab kill");
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
    drop(lab);
    // Down removed everything it made.
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
    eprintln!(
        "lab test took {:.0}s in total",
        t_test.elapsed().as_secs_f64()
    );
}
