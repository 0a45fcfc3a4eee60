//! Test helper: one clutch cluster node (or a probe) as a process, so tests can run many of
//! them in network namespaces.
//!
//! ```text
//! clutch-cluster-node node  --id ID --hostname H --cluster NAME --token-file F --expected N
//!                    --servers S --state-dir D --settle-ms MS --engine none|etcd
//!                    [--root R] --status-file F
//! clutch-cluster-node probe  --target IP:PORT --cid CID --token-file F      (tries to authenticate)
//! clutch-cluster-node replay --target IP:PORT --cluster NAME --token-file F (records, then replays)
//! ```
//! Every status update is appended to the status file as one JSON line; the outcome
//! (or error) of `form` too, as `{"outcome": ...}`. Probes print one JSON line on stdout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clutch_cluster::auth::{self, Hello, Initiator, Proof};
use clutch_cluster::sys::{ChildServices, ChildUnit, RealRunner};
use clutch_cluster::wire::{self, Client, Request, Response};
use clutch_cluster::{
    EtcdEngine, FormationConfig, InterfaceFilter, NodeId, NoneEngine, Status, StatusSink, form,
};
use tokio::net::TcpStream;

struct FileSink(Mutex<std::fs::File>);

impl StatusSink for FileSink {
    fn update(&self, s: &Status) {
        use std::io::Write;
        let mut f = self.0.lock().unwrap();
        let _ = writeln!(f, "{}", serde_json::to_string(s).unwrap());
        let _ = f.flush();
    }
}

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let mode = it.next().unwrap_or_default();
    let mut m = HashMap::new();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_default();
        m.insert(k.trim_start_matches("--").to_string(), v);
    }
    (mode, m)
}

fn token(a: &HashMap<String, String>) -> String {
    std::fs::read_to_string(&a["token-file"])
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let (mode, a) = args();
    match mode.as_str() {
        "node" => node(a).await,
        "probe" => probe(a).await,
        "replay" => replay(a).await,
        _ => {
            eprintln!("usage: clutch-cluster-node node|probe|replay --key value ...");
            std::process::exit(2);
        }
    }
}

async fn node(a: HashMap<String, String>) {
    let status_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a["status-file"])
        .unwrap();
    let sink = Arc::new(FileSink(Mutex::new(status_file)));
    let expected: u32 = a["expected"].parse().unwrap();
    let cfg = FormationConfig {
        node_id: a["id"].parse::<NodeId>().unwrap(),
        hostname: a["hostname"].clone(),
        cluster_name: a["cluster"].clone(),
        token: token(&a),
        expected_size: expected,
        servers: a["servers"].parse().unwrap(),
        state_dir: PathBuf::from(&a["state-dir"]),
        settle: Duration::from_millis(a["settle-ms"].parse().unwrap()),
        poll_interval: Duration::from_millis(500),
        peer_timeout: Duration::from_secs(4),
        interfaces: InterfaceFilter::default(),
        listen_port: clutch_cluster::DEFAULT_PORT,
        mdns: true,
        seeds: vec![],
        addr: None,
    };
    let engine: Box<dyn clutch_cluster::Engine> = match a.get("engine").map(String::as_str) {
        Some("etcd") => {
            let root = PathBuf::from(&a["root"]);
            let mut units = HashMap::new();
            units.insert(
                "etcd".to_string(),
                ChildUnit {
                    program: "etcd".into(),
                    args: vec![],
                    env_file: clutch_cluster::sys::under(
                        &root,
                        clutch_cluster::engine::etcd::ENV_FILE,
                    ),
                    log: root.join("etcd.log"),
                },
            );
            let mut e = EtcdEngine::new(
                root,
                Arc::new(ChildServices::new(units)),
                Arc::new(RealRunner),
            );
            e.health_timeout = Duration::from_secs(60);
            Box::new(e)
        }
        _ => Box::new(NoneEngine),
    };
    match form(cfg, engine, sink.clone()).await {
        Ok(outcome) => {
            {
                use std::io::Write;
                let mut f = sink.0.lock().unwrap();
                let _ = writeln!(
                    f,
                    "{}",
                    serde_json::json!({"outcome": {"role": outcome.role, "bootstrapped": outcome.bootstrapped}})
                );
            }
            // Serve until killed; SIGTERM ends the process (and, via drop, child services).
            tokio::select! {
                _ = outcome.serve() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            use std::io::Write;
            let mut f = sink.0.lock().unwrap();
            let _ = writeln!(f, "{}", serde_json::json!({"error": e.to_string()}));
            std::process::exit(1);
        }
    }
}

async fn probe(a: HashMap<String, String>) {
    let target: SocketAddr = a["target"].parse().unwrap();
    let me: NodeId = "ffff-probe".parse().unwrap();
    let res = async {
        let s = TcpStream::connect(target).await?;
        let mut c = Client::handshake(s, &token(&a), &a["cid"], &me).await?;
        c.request(&Request::Status).await
    }
    .await;
    let out = match res {
        Ok(Response::Status(s)) => serde_json::json!({"authenticated": true, "status": s}),
        Ok(_) => serde_json::json!({"authenticated": true}),
        Err(e) => serde_json::json!({"authenticated": false, "error": e.to_string()}),
    };
    println!("{out}");
}

async fn replay(a: HashMap<String, String>) {
    let target: SocketAddr = a["target"].parse().unwrap();
    let tok = token(&a);
    let cid = clutch_cluster::cluster_id(&tok, &a["cluster"]);
    let me: NodeId = "ffff-recorder".parse().unwrap();
    // 1. A genuine handshake, recording what the client sent (as an eavesdropper would).
    let mut s = TcpStream::connect(target).await.unwrap();
    let init = Initiator::new(&tok, &cid, me.clone(), auth::fresh_nonce()).dialing(target);
    let rec_hello = init.hello().clone();
    wire::send_json(&mut s, &rec_hello).await.unwrap();
    let rh: Hello = wire::recv_json(&mut s).await.unwrap();
    let (awaiting, rec_proof) = init.on_hello(&rh).unwrap();
    wire::send_json(&mut s, &rec_proof).await.unwrap();
    let rp: Proof = wire::recv_json(&mut s).await.unwrap();
    let genuine_ok = awaiting.on_proof(&rp).is_ok();
    drop(s);
    // 2. Replay the recorded hello and proof byte for byte on a new connection.
    let mut s = TcpStream::connect(target).await.unwrap();
    wire::send_json(&mut s, &rec_hello).await.unwrap();
    let rh2: Result<Hello, _> = wire::recv_json(&mut s).await;
    let fresh_nonce = rh2.as_ref().map(|h| h.nonce != rh.nonce).unwrap_or(false);
    wire::send_json(&mut s, &rec_proof).await.ok();
    let replay: Result<Proof, _> = wire::recv_json(&mut s).await;
    println!(
        "{}",
        serde_json::json!({
            "genuine_ok": genuine_ok,
            "server_nonce_fresh": fresh_nonce,
            "replay_accepted": replay.is_ok(),
            "replay_error": replay.err().map(|e| e.to_string()),
        })
    );
}
