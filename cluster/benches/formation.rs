//! Formation time in network namespaces (needs root, like tests/netns.rs): N nodes start
//! together on one bridge; the time from the last node's start to every node `ready`.
//!
//! ```text
//! cargo bench -p clutch-cluster --bench formation
//! ```
//!
//! Three runs each of: 3 nodes and 5 nodes with engine `none` (discovery, handshakes,
//! election, static bootstrap), and 3 nodes with real etcd members (TLS certificates
//! issued, etcd started from the plan). The settle window is the product's default (3 s):
//! it is part of what a user waits for. Writes bench/formation.md with the date and this
//! command.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;

const COMMAND: &str = "cargo bench -p clutch-cluster --bench formation";
const RUNS: usize = 3;

/// One formation; seconds from the last start to all ready.
fn once(n: usize, engine: &str, servers: u32) -> f64 {
    let mut lab = Lab::new(n);
    let o = NodeOpts {
        cluster: "bench",
        token: TOKEN,
        expected: n as u32,
        servers,
        settle_ms: 3000,
        engine,
    };
    for i in 0..n {
        lab.start(i, &format!("b{i}"), &o);
    }
    let t0 = Instant::now();
    wait_for(&lab, Duration::from_secs(120), "all ready", |l| {
        l.nodes.iter().all(|x| x.phase() == "ready")
    });
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(
        lab.nodes.iter().filter(|x| x.bootstrapped()).count(),
        1,
        "{}",
        lab.dump()
    );
    secs
}

fn main() {
    if !is_root() {
        eprintln!("the formation bench needs root (network namespaces)");
        std::process::exit(1);
    }
    let cases: [(&str, usize, &str, u32); 3] = [
        ("3 nodes, engine none", 3, "none", 3),
        ("5 nodes, engine none (3 servers)", 5, "none", 3),
        ("3 nodes, engine etcd (TLS, static bootstrap)", 3, "etcd", 3),
    ];
    let mut table = String::from("| case | runs (s) | median (s) |\n|---|---|---|\n");
    for (what, n, engine, servers) in cases {
        let mut runs: Vec<f64> = (0..RUNS).map(|_| once(n, engine, servers)).collect();
        let shown: Vec<String> = runs.iter().map(|s| format!("{s:.1}")).collect();
        runs.sort_by(|a, b| a.total_cmp(b));
        let _ = writeln!(
            table,
            "| {what} | {} | {:.1} |",
            shown.join(", "),
            runs[RUNS / 2]
        );
    }
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let doc = format!(
        "# Formation time in network namespaces\n\n\
         Reproduce: `{COMMAND}` (root). Written {date}.\n\n\
         Nodes start together in network namespaces on one bridge (one machine, 2 cores); \
         the time is from the last node's start to every node reporting `ready`. It includes \
         mDNS discovery, the handshakes, the 3 s settle window of the whole expected set, \
         the vote, the bootstrap plan and each engine's start.\n\n{table}"
    );
    print!("{doc}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/formation.md");
    std::fs::write(&out, doc).expect("writing bench/formation.md");
}
