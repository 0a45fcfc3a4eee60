//! Multi-node formation in network namespaces on one machine (needs root: `ip netns`).
//! Each test builds its own hub namespace with bridges and one namespace per node; all
//! traffic stays inside them. Without root the tests fail under CI=true and are skipped
//! (loudly) otherwise.
//!
//! What they hold formation to: nodes powered on together start in one static bootstrap;
//! a cut link, a reboot or a mismatched configuration never makes two clusters; a minority
//! never bootstraps.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

fn opts<'a>(engine: &'a str, expected: u32, servers: u32) -> NodeOpts<'a> {
    NodeOpts {
        cluster: "lab",
        token: TOKEN,
        expected,
        servers,
        settle_ms: 1500,
        engine,
    }
}

fn count_bootstrapped(lab: &Lab) -> usize {
    lab.nodes.iter().filter(|n| n.bootstrapped()).count()
}

/// Every node in `idx` is ready, in one cluster instance, with one leader; returns it.
fn one_cluster(lab: &Lab, idx: &[usize]) -> (String, String) {
    let clusters: BTreeSet<Option<String>> = idx.iter().map(|&i| lab.nodes[i].cluster()).collect();
    let leaders: BTreeSet<Option<String>> = idx.iter().map(|&i| lab.nodes[i].leader()).collect();
    assert_eq!(clusters.len(), 1, "{clusters:?}\n{}", lab.dump());
    assert_eq!(leaders.len(), 1, "{leaders:?}\n{}", lab.dump());
    (
        clusters.into_iter().next().flatten().expect("a cluster"),
        leaders.into_iter().next().flatten().expect("a leader"),
    )
}

fn power_on_together(n: usize, expected: u32, servers: u32) {
    let mut lab = Lab::new(n);
    let o = opts("none", expected, servers);
    let ids: Vec<String> = (0..n).map(|i| format!("n{}", (i * 7 + 3) % 10)).collect();
    let t0 = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(
        &lab,
        Duration::from_secs(40),
        &format!("all {n} ready"),
        |l| l.nodes.iter().all(|n| n.phase() == "ready"),
    );
    eprintln!(
        "{n} nodes formed {:.1}s after power-on",
        t0.elapsed().as_secs_f64()
    );
    let all: Vec<usize> = (0..n).collect();
    let (_, leader) = one_cluster(&lab, &all);
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    let lowest = ids.iter().min().unwrap();
    assert_eq!(&leader, lowest, "the lowest id leads");
    for n in &lab.nodes {
        assert_eq!(n.members(), lab.nodes.len(), "{}", lab.dump());
        let phases = n.phases_seen();
        assert_eq!(
            phases,
            vec!["discovering", "bootstrapping", "ready"],
            "one static bootstrap, no runtime join\n{}",
            lab.dump()
        );
    }
    let servers_now = lab.nodes.iter().filter(|n| n.role() == "server").count();
    assert_eq!(servers_now, servers as usize);
}

#[test]
fn three_nodes_powered_on_together_start_in_one_static_bootstrap() {
    if need_root() {
        power_on_together(3, 3, 3);
    }
}

#[test]
fn five_nodes_powered_on_together_start_in_one_static_bootstrap() {
    if need_root() {
        power_on_together(5, 5, 3);
    }
}

#[test]
fn three_nodes_form_a_real_etcd_cluster_with_tls() {
    if !need_root() || !need_tool("etcd") || !need_tool("curl") {
        return;
    }
    let mut lab = Lab::new(3);
    let o = opts("etcd", 3, 3);
    let t0 = Instant::now();
    for (i, id) in ["e1", "e2", "e3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(&lab, Duration::from_secs(90), "3 etcd members ready", |l| {
        l.nodes.iter().all(|n| n.phase() == "ready")
    });
    eprintln!(
        "etcd formed {:.1}s after power-on",
        t0.elapsed().as_secs_f64()
    );
    one_cluster(&lab, &[0, 1, 2]);
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    // etcdctl with no flags works on any member, and sees 3 started members that
    // advertise TLS client URLs.
    for n in &lab.nodes {
        let out = n.exec(&["etcdctl", "member", "list", "-w", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let members = v["members"].as_array().unwrap();
        assert_eq!(members.len(), 3, "{v}");
        for m in members {
            assert!(
                m["name"].as_str().is_some_and(|s| s.starts_with("host")),
                "unstarted member: {v}"
            );
            let urls = m["clientURLs"].as_array().unwrap();
            assert!(
                urls.iter()
                    .all(|u| u.as_str().unwrap().starts_with("https://10.77.0.")),
                "{v}"
            );
        }
    }
    let put = lab.nodes[0].exec(&["etcdctl", "put", "clutch-test", "hello-from-0"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = lab.nodes[2].exec(&["etcdctl", "get", "--print-value-only", "clutch-test"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello-from-0");
    // Through node 1's cluster address from node 2, with node 2's certificate.
    let tls = lab.nodes[2].dir.join("root/var/lib/etcd/clutch-tls");
    let flag = |k: &str, f: &str| format!("--{k}={}", tls.join(f).display());
    let ep = format!("--endpoints=https://{}:2379", lab.nodes[1].ip);
    let get = lab.nodes[2].exec(&[
        "etcdctl",
        &ep,
        &flag("cacert", "ca.crt"),
        &flag("cert", "node.crt"),
        &flag("key", "node.key"),
        "get",
        "--print-value-only",
        "clutch-test",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "hello-from-0",
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    check_outsider_gets_nothing(&mut lab);
}

/// From a machine on the same bridge without a certificate: no read, no write, no join,
/// on either port.
fn check_outsider_gets_nothing(lab: &mut Lab) {
    let ns = lab.add_host("evil", "10.77.0.66", &[]);
    let run = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .output()
            .unwrap()
    };
    let node = lab.nodes[0].ip.clone();
    for url in [
        format!("http://{node}:2379/version"),
        format!("https://{node}:2379/version"),
        format!("https://{node}:2379/v3/kv/range"),
        format!("http://{node}:2380/members"),
        format!("https://{node}:2380/members"),
    ] {
        let out = run(&["curl", "-sS", "-k", "--max-time", "5", &url]);
        assert!(
            !out.status.success(),
            "{url} answered an outsider: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let ep = format!("--endpoints=https://{node}:2379");
    for args in [
        vec![
            "member",
            "add",
            "evil",
            "--peer-urls=https://10.77.0.66:2380",
        ],
        vec!["member", "list"],
        vec!["put", "owned", "yes"],
        vec!["get", "clutch-test"],
    ] {
        let mut a = vec![
            "etcdctl",
            &ep,
            "--insecure-skip-tls-verify",
            "--dial-timeout=3s",
            "--command-timeout=5s",
        ];
        a.extend(args.iter().copied());
        let out = run(&a);
        assert!(
            !out.status.success(),
            "etcdctl {args:?} worked for an outsider: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let list = lab.nodes[1].exec(&["etcdctl", "member", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(!text.contains("evil"), "{text}");
}

#[test]
fn partition_minority_never_bootstraps_and_joins_after_heal() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(5);
    // Nodes 3 and 4 (with the lowest ids, so they would win any election they could
    // hold) are cut off on bridge br1.
    lab.attach(3, "br1");
    lab.attach(4, "br1");
    let o = opts("none", 5, 3);
    for (i, id) in ["m3", "m4", "m5", "m1", "m2"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(&lab, Duration::from_secs(45), "majority of 3 ready", |l| {
        (0..3).all(|i| l.nodes[i].phase() == "ready")
    });
    // Give the minority time in which it could misbehave.
    std::thread::sleep(Duration::from_secs(5));
    for i in [3, 4] {
        let n = &lab.nodes[i];
        assert_eq!(
            n.phases_seen(),
            vec!["discovering"],
            "minority node {i}\n{}",
            lab.dump()
        );
        let w = n.last().unwrap()["waiting"].as_str().unwrap().to_string();
        assert!(w.contains("need quorum 3"), "{w}");
    }
    assert_eq!(count_bootstrapped(&lab), 1);
    // Heal.
    lab.attach(3, "br0");
    lab.attach(4, "br0");
    wait_for(
        &lab,
        Duration::from_secs(45),
        "all 5 ready after heal",
        |l| l.nodes.iter().all(|n| n.phase() == "ready"),
    );
    wait_for(&lab, Duration::from_secs(15), "member lists of 5", |l| {
        l.nodes.iter().all(|n| n.members() == 5)
    });
    one_cluster(&lab, &[0, 1, 2, 3, 4]);
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    let servers = lab.nodes.iter().filter(|n| n.role() == "server").count();
    assert_eq!(servers, 3, "{}", lab.dump());
    assert_eq!(lab.nodes[3].role(), "agent");
    assert_eq!(lab.nodes[4].role(), "agent");
    assert!(lab.nodes[3].phases_seen().contains(&"joining".to_string()));
}

#[test]
fn the_leaders_link_cut_right_after_its_votes_never_makes_a_second_cluster() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(3);
    let o = opts("none", 3, 3);
    for (i, id) in ["v1", "v2", "v3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    // As soon as a voter has promised its vote to v1 (kept on disk), v1 goes dark.
    let start = Instant::now();
    while !(1..3).any(|i| lab.nodes[i].last().is_some_and(|v| v["vote"] == "v1")) {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no vote\n{}",
            lab.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.link(0, false);
    eprintln!(
        "cut v1's link {:.1}s after power-on",
        start.elapsed().as_secs_f64()
    );
    // 60 s of darkness: the other two hold a quorum between them, but never bootstrap
    // a cluster of their own.
    let dark = Instant::now();
    while dark.elapsed() < Duration::from_secs(60) {
        for i in 1..3 {
            let n = &lab.nodes[i];
            assert!(!n.bootstrapped(), "{}", lab.dump());
            if let Some(l) = n.leader() {
                assert_eq!(l, "v1", "node {i} follows another leader\n{}", lab.dump());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.link(0, true);
    wait_for(
        &lab,
        Duration::from_secs(40),
        "all 3 ready after the link returns",
        |l| l.nodes.iter().all(|n| n.phase() == "ready"),
    );
    let (_, leader) = one_cluster(&lab, &[0, 1, 2]);
    assert_eq!(leader, "v1");
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
}

#[test]
fn nodes_configured_for_another_size_never_count_toward_the_quorum() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(5);
    let three = opts("none", 3, 3);
    let five = opts("none", 5, 3);
    // The expected_size=5 nodes have the lowest ids: if they counted, they would lead.
    for (i, id) in ["s3", "s4", "s5"].iter().enumerate() {
        lab.start(i, id, &three);
    }
    lab.start(3, "s1", &five);
    lab.start(4, "s2", &five);
    wait_for(
        &lab,
        Duration::from_secs(40),
        "the 3-node cluster ready",
        |l| (0..3).all(|i| l.nodes[i].phase() == "ready" && l.nodes[i].members() == 3),
    );
    std::thread::sleep(Duration::from_secs(5));
    let (_, leader) = one_cluster(&lab, &[0, 1, 2]);
    assert_eq!(leader, "s3");
    for i in [3, 4] {
        let n = &lab.nodes[i];
        assert_eq!(n.phases_seen(), vec!["discovering"], "{}", lab.dump());
        assert!(n.last().unwrap()["peers_authenticated"].as_u64().unwrap() <= 1);
        assert!(n.cluster().is_none());
    }
    for i in 0..3 {
        let ids = lab.nodes[i].ids_ever_named();
        assert!(
            !ids.contains(&"s1".to_string()) && !ids.contains(&"s2".to_string()),
            "{ids:?}"
        );
    }
}

#[test]
fn a_node_that_reboots_mid_bootstrap_keeps_its_identity_and_its_vote() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(3);
    let o = opts("none", 3, 3);
    for (i, id) in ["k1", "k2", "k3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    let start = Instant::now();
    while !lab.nodes[2].last().is_some_and(|v| v["vote"] == "k1") {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no vote\n{}",
            lab.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // k3 loses its power right after granting its vote, and k1 its link.
    lab.nodes[2].kill();
    lab.link(0, false);
    let key_before = std::fs::read_to_string(lab.nodes[2].dir.join("state/node-key")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    lab.start(2, "k3", &o);
    // Back up: it still holds its promise (from disk), so k2 and k3 together — a quorum —
    // still wait for k1.
    wait_for(
        &lab,
        Duration::from_secs(10),
        "k3 reports its kept vote",
        |l| l.nodes[2].last().is_some_and(|v| v["vote"] == "k1"),
    );
    std::thread::sleep(Duration::from_secs(8));
    for n in &lab.nodes[1..] {
        // A node may have enrolled in k1's plan before the cut; nobody founded another.
        assert!(!n.bootstrapped(), "{}", lab.dump());
        if let Some(l) = n.leader() {
            assert_eq!(l, "k1", "{}", lab.dump());
        }
    }
    lab.link(0, true);
    wait_for(&lab, Duration::from_secs(40), "all 3 ready", |l| {
        l.nodes.iter().all(|n| n.phase() == "ready")
    });
    let (_, leader) = one_cluster(&lab, &[0, 1, 2]);
    assert_eq!(leader, "k1");
    let key_after = std::fs::read_to_string(lab.nodes[2].dir.join("state/node-key")).unwrap();
    assert_eq!(key_before, key_after, "k3 kept its node key");
    assert_eq!(count_bootstrapped(&lab), 1);
}

#[test]
fn wrong_token_node_is_ignored_and_replay_is_rejected() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(4);
    let o = opts("none", 3, 3);
    for (i, id) in ["w1", "w2", "w3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    // Same cluster name, another token, and the lowest id of all.
    let bad = NodeOpts {
        token: "some-other-token-0123456789abcdef0123456789",
        ..opts("none", 3, 3)
    };
    lab.start(3, "w0", &bad);
    wait_for(&lab, Duration::from_secs(40), "3 good nodes ready", |l| {
        (0..3).all(|i| l.nodes[i].phase() == "ready" && l.nodes[i].members() == 3)
    });
    for i in 0..3 {
        assert!(!lab.nodes[i].ids_ever_named().contains(&"w0".to_string()));
    }
    let w = &lab.nodes[3];
    assert_eq!(w.phases_seen(), vec!["discovering"], "{}", lab.dump());
    assert_eq!(w.last().unwrap()["peers_authenticated"], 0);

    // An attacker that knows the public cluster key (from TXT) but not the token.
    let key = o.cluster_key();
    let bad_token = w.dir.join("token");
    let target = format!("{}:{}", lab.nodes[0].ip, clutch_cluster::DEFAULT_PORT);
    let helper = helper();
    let probe = w.exec(&[
        helper.to_str().unwrap(),
        "probe",
        "--target",
        &target,
        "--cluster-key",
        &key,
        "--token-file",
        bad_token.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&probe.stderr)));
    assert_eq!(v["authenticated"], false, "{v}");
    assert!(v.get("status").is_none(), "learned something: {v}");
    assert!(
        lab.nodes[0].log().contains("authentication failed"),
        "failure not logged"
    );

    // Replay: a recorded genuine handshake replayed on a new connection is rejected.
    let good_token = lab.nodes[1].dir.join("token");
    let target = format!("{}:{}", lab.nodes[1].ip, clutch_cluster::DEFAULT_PORT);
    let out = lab.nodes[2].exec(&[
        helper.to_str().unwrap(),
        "replay",
        "--target",
        &target,
        "--cluster-key",
        &key,
        "--token-file",
        good_token.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["genuine_ok"], true, "{v}");
    assert_eq!(v["server_exchange_fresh"], true, "{v}");
    assert_eq!(v["replay_accepted"], false, "{v}");
    assert_eq!(count_bootstrapped(&lab), 1);
    assert_eq!(lab.nodes[3].phases_seen(), vec!["discovering"]);
}
