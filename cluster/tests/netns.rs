//! Multi-node formation in network namespaces on one machine (needs root: `ip netns`).
//! Each test builds its own hub namespace with bridges and one namespace per node; all
//! traffic stays inside them. Without root the tests fail under CI=true and are skipped
//! (loudly) otherwise.

mod common;

use std::time::Duration;

use common::*;

fn opts<'a>(engine: &'a str, expected: u32, servers: u32) -> NodeOpts<'a> {
    NodeOpts {
        cluster: "lab",
        token: TOKEN,
        expected,
        servers,
        settle_ms: 2000,
        engine,
    }
}

fn count_bootstrapped(lab: &Lab) -> usize {
    lab.nodes.iter().filter(|n| n.bootstrapped()).count()
}

#[test]
fn three_nodes_power_on_together_engine_none() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(3);
    let o = opts("none", 3, 3);
    for (i, id) in ["c3", "a1", "b2"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(&lab, Duration::from_secs(40), "all 3 ready", |l| {
        l.nodes.iter().all(|n| n.phase() == "ready")
    });
    wait_for(
        &lab,
        Duration::from_secs(10),
        "member lists of 3 everywhere",
        |l| l.nodes.iter().all(|n| n.members() == 3),
    );
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    assert!(
        lab.nodes[1].bootstrapped(),
        "lowest id a1 bootstraps\n{}",
        lab.dump()
    );
    for n in &lab.nodes {
        assert_eq!(n.role(), "server");
        assert_eq!(n.last().unwrap()["leader"], "a1");
        assert!(!n.phases_seen().contains(&"failed".to_string()));
    }
}

#[test]
fn three_nodes_form_a_real_etcd_cluster() {
    if !need_root() {
        return;
    }
    let mut lab = Lab::new(3);
    let o = opts("etcd", 3, 3);
    for (i, id) in ["e1", "e2", "e3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(&lab, Duration::from_secs(90), "3 etcd members ready", |l| {
        l.nodes.iter().all(|n| n.phase() == "ready")
    });
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    // etcdctl with no flags works on any member, and sees 3 started members.
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
                    .any(|u| u.as_str().unwrap().starts_with("http://10.77.0.")),
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
    // Also through node 1's cluster address from node 2.
    let ep = format!("--endpoints=http://{}:2379", lab.nodes[1].ip);
    let get = lab.nodes[2].exec(&["etcdctl", &ep, "get", "--print-value-only", "clutch-test"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "hello-from-0");
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
    assert_eq!(count_bootstrapped(&lab), 1, "{}", lab.dump());
    let servers = lab.nodes.iter().filter(|n| n.role() == "server").count();
    assert_eq!(servers, 3, "{}", lab.dump());
    assert_eq!(lab.nodes[3].role(), "agent");
    assert_eq!(lab.nodes[4].role(), "agent");
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
        let s = lab.nodes[i].last().unwrap();
        let ids: Vec<&str> = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["node_id"].as_str().unwrap())
            .collect();
        assert!(!ids.contains(&"w0"), "{ids:?}");
    }
    let w = &lab.nodes[3];
    assert_eq!(w.phases_seen(), vec!["discovering"], "{}", lab.dump());
    assert_eq!(w.last().unwrap()["peers_authenticated"], 0);

    // An attacker that knows the public cluster id (from TXT) but not the token.
    let cid = clutch_cluster::cluster_id(TOKEN, "lab");
    let bad_token = w.dir.join("token");
    let target = format!("{}:{}", lab.nodes[0].ip, clutch_cluster::DEFAULT_PORT);
    let helper = helper();
    let probe = w.exec(&[
        helper.to_str().unwrap(),
        "probe",
        "--target",
        &target,
        "--cid",
        &cid,
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
        "--cluster",
        "lab",
        "--token-file",
        good_token.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["genuine_ok"], true, "{v}");
    assert_eq!(v["server_nonce_fresh"], true, "{v}");
    assert_eq!(v["replay_accepted"], false, "{v}");
    // Still exactly one bootstrap, and the bad node never got anywhere.
    assert_eq!(count_bootstrapped(&lab), 1);
    assert_eq!(lab.nodes[3].phases_seen(), vec!["discovering"]);
}
