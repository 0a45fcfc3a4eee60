//! Rolling updates coordinated through a real etcd cluster, in network namespaces (needs
//! root, like tests/netns.rs). Every node is told to update at the same moment; the update
//! is simulated (etcd stopped for a while and started again: a reboot), the coordination is
//! the product's ([`clutch_cluster::rollout`]).
//!
//! What it holds the rollout to: voters go down one at a time and only while the others
//! keep quorum; a writer that switches node when one is down loses no acknowledged write; a
//! holder that dies blocks the fleet for one lease TTL at most, and never lets quorum go; a
//! bad release stops at the first node.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn opts(n: u32) -> NodeOpts<'static> {
    NodeOpts {
        cluster: "roll",
        token: TOKEN,
        expected: n,
        servers: n,
        settle_ms: 1000,
        engine: "etcd",
    }
}

/// Form an etcd cluster of `n` with the rollout simulator armed on every node.
fn lab(n: usize, ttl_s: u64) -> Lab {
    let mut lab = Lab::new(n);
    for i in 0..n {
        let trigger = lab.nodes[i].dir.join("update-to");
        let extra = [
            ("--rollout-trigger", trigger.display().to_string()),
            ("--rollout-down-ms", "4000".to_string()),
            ("--rollout-ttl-s", ttl_s.to_string()),
        ];
        lab.start_with(
            i,
            &format!("r{i}"),
            &format!("host{i}"),
            &opts(n as u32),
            &extra,
        );
    }
    wait_for(&lab, Duration::from_secs(90), "etcd cluster ready", |l| {
        l.nodes.iter().all(|x| x.phase() == "ready")
    });
    lab
}

fn tell_all(lab: &Lab, release: &str, except: &[usize]) {
    for (i, n) in lab.nodes.iter().enumerate() {
        if !except.contains(&i) {
            std::fs::write(n.dir.join("update-to"), release).unwrap();
        }
    }
}

/// Rollout events of node `i`: (event name, value, time in ms).
fn events(lab: &Lab, i: usize) -> Vec<(String, Value, u128)> {
    lab.nodes[i]
        .history()
        .into_iter()
        .filter_map(|h| {
            let r = h.get("rollout")?.as_object()?.clone();
            let at = r.get("at_ms")?.as_u64()? as u128;
            const KINDS: [&str; 8] = [
                "down",
                "up",
                "released",
                "rolled_back",
                "skipped_bad",
                "waiting",
                "gave_up",
                "error",
            ];
            let (k, v) = r.into_iter().find(|(k, _)| KINDS.contains(&k.as_str()))?;
            Some((k, v, at))
        })
        .collect()
}

/// Down intervals per node, from `down` to `released`.
fn down_intervals(lab: &Lab) -> Vec<(usize, u128, u128)> {
    let mut v = Vec::new();
    for i in 0..lab.nodes.len() {
        let e = events(lab, i);
        let down = e.iter().find(|(k, _, _)| k == "down").map(|x| x.2);
        let back = e.iter().find(|(k, _, _)| k == "released").map(|x| x.2);
        if let (Some(d), Some(b)) = (down, back) {
            v.push((i, d, b));
        }
    }
    v
}

fn assert_one_at_a_time(lab: &Lab) {
    let iv = down_intervals(lab);
    for a in &iv {
        for b in &iv {
            if a.0 < b.0 {
                assert!(
                    a.2 <= b.1 || b.2 <= a.1,
                    "nodes {} and {} were down together: {iv:?}\n{}",
                    a.0,
                    b.0,
                    lab.dump()
                );
            }
        }
    }
}

/// Writes keys through any node that answers, until `stop`; returns the acknowledged ones.
fn writer(
    lab: &Lab,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    let nss: Vec<String> = lab.nodes.iter().map(|n| n.ns.clone()).collect();
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0u64;
        let mut node = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = format!("w/{i:06}");
            let mut ok = false;
            for _ in 0..nss.len() {
                let out = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &nss[node],
                        "etcdctl",
                        "--command-timeout=2s",
                        "put",
                        &key,
                        "v",
                    ])
                    .output()
                    .unwrap();
                if out.status.success() {
                    ok = true;
                    break;
                }
                node = (node + 1) % nss.len();
            }
            if ok {
                acked.push(key);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        acked
    })
}

fn all_events(lab: &Lab) -> String {
    (0..lab.nodes.len())
        .map(|i| format!("node {i}: {:?}\n", events(lab, i)))
        .collect()
}

fn wait_done(lab: &Lab, nodes: &[usize], timeout: Duration) {
    let start = Instant::now();
    let done = |l: &Lab| {
        nodes.iter().all(|&i| {
            events(l, i)
                .iter()
                .any(|(k, _, _)| k == "released" || k == "skipped_bad")
        })
    };
    while !done(lab) {
        if start.elapsed() > timeout {
            panic!(
                "rollout not done after {timeout:?}:\n{}{}",
                all_events(lab),
                lab.dump()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn three_voters_told_at_once_update_one_by_one_and_no_write_is_lost() {
    if !need_root() || !need_tool("etcd") {
        return;
    }
    let lab = lab(3, 600);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = writer(&lab, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    tell_all(&lab, "2", &[]);
    wait_done(&lab, &[0, 1, 2], Duration::from_secs(180));
    eprintln!("3 voters updated in {:.1}s", t0.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert_one_at_a_time(&lab);
    assert_eq!(down_intervals(&lab).len(), 3, "{}", lab.dump());
    assert!(acked.len() > 50, "the writer wrote little: {}", acked.len());
    let out = lab.nodes[0].exec(&["etcdctl", "get", "--prefix", "w/", "--keys-only"]);
    let have: std::collections::BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|k| !have.contains(*k)).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

#[test]
fn a_bad_release_stops_at_the_first_node() {
    if !need_root() || !need_tool("etcd") {
        return;
    }
    let lab = lab(3, 600);
    tell_all(&lab, "bad-3", &[]);
    wait_done(&lab, &[0, 1, 2], Duration::from_secs(180));
    let iv = down_intervals(&lab);
    assert_eq!(
        iv.len(),
        1,
        "only the first node tried it: {iv:?}\n{}",
        lab.dump()
    );
    let first = iv[0].0;
    assert!(
        events(&lab, first)
            .iter()
            .any(|(k, _, _)| k == "rolled_back")
    );
    for i in (0..3).filter(|i| *i != first) {
        let e = events(&lab, i);
        assert!(
            e.iter().any(|(k, _, _)| k == "skipped_bad"),
            "node {i}: {e:?}"
        );
    }
    let v = lab.nodes[0].exec(&[
        "etcdctl",
        "get",
        "/clutch/rollout/bad/bad-3",
        "--print-value-only",
    ]);
    let why: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(why["hostname"], format!("host{first}"));
}

#[test]
fn a_holder_that_dies_never_lets_quorum_go_and_blocks_for_one_ttl_at_most() {
    if !need_root() || !need_tool("etcd") {
        return;
    }
    // Three voters: with one dead, nobody else may go down (quorum needs both others).
    let mut three = lab(3, 15);
    tell_all(&three, "2", &[1, 2]);
    wait_for(
        &three,
        Duration::from_secs(60),
        "node 0 down for its update",
        |l| events(l, 0).iter().any(|(k, _, _)| k == "down"),
    );
    three.power_off(0);
    tell_all(&three, "2", &[0]);
    std::thread::sleep(Duration::from_secs(30));
    for i in [1, 2] {
        let e = events(&three, i);
        assert!(
            !e.iter().any(|(k, _, _)| k == "down"),
            "node {i} went down beside a dead voter: {e:?}"
        );
    }
    let quorum_wait = [1, 2].iter().any(|&i| {
        events(&three, i).iter().any(|(k, v, _)| {
            k == "waiting" && v.as_str().is_some_and(|w| w.contains("quorum at risk"))
        })
    });
    assert!(
        quorum_wait,
        "once the dead holder's lease ran out, the next holder must wait on quorum\n{}",
        all_events(&three)
    );
    drop(three);

    // Five voters: the dead holder's ticket ends with its lease; the others then update
    // one at a time (with it missing, two more down would lose quorum).
    let mut five = lab(5, 15);
    tell_all(&five, "2", &[1, 2, 3, 4]);
    wait_for(
        &five,
        Duration::from_secs(60),
        "node 0 down for its update",
        |l| events(l, 0).iter().any(|(k, _, _)| k == "down"),
    );
    let died_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    five.power_off(0);
    tell_all(&five, "2", &[0]);
    wait_done(&five, &[1, 2, 3, 4], Duration::from_secs(240));
    let first_after: u128 = (1..5)
        .filter_map(|i| {
            events(&five, i)
                .iter()
                .find(|(k, _, _)| k == "down")
                .map(|x| x.2)
        })
        .min()
        .unwrap();
    assert!(
        first_after >= died_ms + 14_000,
        "the next voter went down {} ms after the holder died, before its lease ran out",
        first_after - died_ms
    );
    assert_one_at_a_time(&five);
    let mut per: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, _, _) in down_intervals(&five) {
        *per.entry(i).or_default() += 1;
    }
    assert_eq!(
        per.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "{}",
        five.dump()
    );
}
