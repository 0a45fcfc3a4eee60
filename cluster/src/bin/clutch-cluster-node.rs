//! Test helper (not installed on images): one clutch cluster node, or one attacker probe, as
//! a process, so tests can run many of them in network namespaces.
//!
//! ```text
//! clutch-cluster-node node  --id ID --hostname H --cluster NAME --token-file F --expected N
//!                    --servers S --state-dir D --settle-ms MS --engine none|etcd|k3s
//!                    --root R --status-file F [--partial-ms MS]
//! clutch-cluster-node probe  --target IP:PORT --cluster-key K --token-file F
//!     tries to authenticate; prints what it got
//! clutch-cluster-node replay --target IP:PORT --cluster-key K --token-file F
//!     records a genuine handshake, then replays it on a new connection
//! clutch-cluster-node claim  --target IP:PORT --cluster-key K --token-file F --hostname H
//!                    [--addr IP] [--id ID]
//!     a token holder asks to join under host name H (and address IP)
//! ```
//! Every status update is appended to the status file as one JSON line; the outcome (or
//! error) of `form` too, as `{"outcome": ...}`. Probes print one JSON line on stdout.
//!
//! `--engine k3s` runs the real k3s engine with a stand-in for the k3s binary and systemd
//! (k3s cannot be downloaded where this is tested): on its first command it writes a server
//! CA and kubeconfig as k3s would, and every health check passes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clutch_cluster::handshake::{self, ClientHello, Credentials, ServerFinish, ServerHello};
use clutch_cluster::sys::{ChildServices, ChildUnit, CmdOutput, CommandRunner, RealRunner};
use clutch_cluster::wire::{self, Request, Response};
use clutch_cluster::{
    ClusterKey, EtcdEngine, FormationConfig, Identity, InterfaceFilter, K3sEngine, NodeId,
    NoneEngine, Status, StatusSink, form,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        "claim" => claim(a).await,
        _ => {
            eprintln!("usage: clutch-cluster-node node|probe|replay|claim --key value ...");
            std::process::exit(2);
        }
    }
}

/// Stands in for the k3s binary and systemctl: once asked anything, the "server" has a CA
/// and a kubeconfig, and is healthy.
struct FakeK3s {
    root: PathBuf,
}

impl CommandRunner for FakeK3s {
    fn run(&self, _p: &str, _a: &[String], _e: &[(String, String)]) -> std::io::Result<CmdOutput> {
        use clutch_cluster::engine::k3s;
        let ca = clutch_cluster::sys::under(&self.root, k3s::SERVER_CA);
        if !ca.exists() {
            std::fs::create_dir_all(ca.parent().unwrap())?;
            std::fs::write(&ca, fake_ca(&self.root))?;
        }
        let kc = clutch_cluster::sys::under(&self.root, k3s::KUBECONFIG);
        std::fs::create_dir_all(kc.parent().unwrap())?;
        std::fs::write(kc, "apiVersion: v1\n")?;
        Ok(CmdOutput::success(""))
    }
}

fn fake_ca(root: &Path) -> String {
    format!(
        "-----BEGIN CERTIFICATE-----\nfake k3s server CA of {}\n-----END CERTIFICATE-----\n",
        root.display()
    )
}

struct NoServices;
impl clutch_cluster::sys::ServiceManager for NoServices {
    fn restart(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn stop(&self, _: &str) -> Result<(), String> {
        Ok(())
    }
}

fn engine(
    a: &HashMap<String, String>,
) -> (Box<dyn clutch_cluster::Engine>, Option<Arc<ChildServices>>) {
    let root = PathBuf::from(&a["root"]);
    match a.get("engine").map(String::as_str) {
        Some("etcd") => {
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
            let services = Arc::new(ChildServices::new(units));
            let mut e = EtcdEngine::new(root, services.clone(), Arc::new(RealRunner));
            e.health_timeout = Duration::from_secs(60);
            (Box::new(e), Some(services))
        }
        Some("k3s") => {
            let runner = Arc::new(FakeK3s { root: root.clone() });
            (
                Box::new(K3sEngine::new(root, Arc::new(NoServices), runner, None)),
                None,
            )
        }
        _ => (Box::new(NoneEngine), None),
    }
}

async fn node(a: HashMap<String, String>) {
    let status_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a["status-file"])
        .unwrap();
    let sink = Arc::new(FileSink(Mutex::new(status_file)));
    let ms = |k: &str, d: u64| Duration::from_millis(a.get(k).map_or(d, |v| v.parse().unwrap()));
    let cfg = FormationConfig {
        node_id: a["id"].parse::<NodeId>().unwrap(),
        hostname: a["hostname"].as_str().try_into().unwrap(),
        cluster_name: a["cluster"].clone(),
        token: token(&a).try_into().unwrap(),
        expected_size: a["expected"].parse().unwrap(),
        servers: a["servers"].parse().unwrap(),
        state_dir: PathBuf::from(&a["state-dir"]),
        settle: ms("settle-ms", 2000),
        partial_wait: ms("partial-ms", 8000),
        poll_interval: Duration::from_millis(500),
        peer_timeout: Duration::from_secs(4),
        interfaces: InterfaceFilter::default(),
        listen_port: clutch_cluster::DEFAULT_PORT,
        mdns: true,
        seeds: vec![],
        addr: None,
    };
    let (eng, services) = engine(&a);
    let host = cfg.hostname.clone();
    match form(cfg, eng, sink.clone()).await {
        Ok(outcome) => {
            if let Some(trigger) = a.get("rollout-trigger") {
                let sim = rollout::Sim {
                    trigger: PathBuf::from(trigger),
                    root: PathBuf::from(&a["root"]),
                    down: Duration::from_millis(
                        a.get("rollout-down-ms")
                            .map_or(3000, |v| v.parse().unwrap()),
                    ),
                    ttl: Duration::from_secs(
                        a.get("rollout-ttl-s").map_or(600, |v| v.parse().unwrap()),
                    ),
                    me: clutch_cluster::rollout::Me {
                        node_id: a["id"].parse().unwrap(),
                        hostname: host,
                        addr: outcome
                            .members
                            .iter()
                            .find(|m| m.node_id.as_str() == a["id"])
                            .map(|m| m.addr)
                            .expect("this node is a member"),
                    },
                    role: outcome.role,
                    servers: outcome
                        .members
                        .iter()
                        .filter(|m| m.role == clutch_cluster::Role::Server)
                        .map(|m| m.addr)
                        .collect(),
                    services: services.clone(),
                    sink: sink.clone(),
                };
                std::thread::spawn(move || sim.run());
            }
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

/// A rolling update, simulated on a netns node: the update is real coordination through
/// etcd, the "reboot" stops etcd for a while and starts it again on the same data, and a
/// release named `bad-*` fails on its new slot (it is rolled back and marked bad).
mod rollout {
    use super::*;
    use clutch_cluster::rollout::etcd::{EtcdCoordinator, TlsClient};
    use clutch_cluster::rollout::{Acquired, Coordinator, Me, acquire};

    pub struct Sim {
        pub trigger: PathBuf,
        pub root: PathBuf,
        pub down: Duration,
        pub ttl: Duration,
        pub me: Me,
        pub role: clutch_cluster::Role,
        pub servers: Vec<std::net::IpAddr>,
        pub services: Option<Arc<ChildServices>>,
        pub sink: Arc<FileSink>,
    }

    fn ms() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    }

    impl Sim {
        fn log(&self, v: serde_json::Value) {
            use std::io::Write;
            let mut v = v;
            v["at_ms"] = serde_json::json!(ms());
            let mut f = self.sink.0.lock().unwrap();
            let _ = writeln!(f, "{}", serde_json::json!({ "rollout": v }));
            let _ = f.flush();
        }

        fn coordinator(&self) -> EtcdCoordinator {
            let tls = self.root.join("var/lib/etcd/clutch-tls");
            let server = self.role == clutch_cluster::Role::Server;
            EtcdCoordinator {
                runner: Arc::new(RealRunner),
                etcdctl: "etcdctl".into(),
                endpoints: if server {
                    vec!["http://127.0.0.1:2379".into()]
                } else {
                    self.servers
                        .iter()
                        .map(|a| clutch_cluster::engine::etcd::env::client_url(*a))
                        .collect()
                },
                tls: Some(TlsClient {
                    ca: tls.join("ca.crt"),
                    cert: tls.join("node.crt"),
                    key: tls.join("node.key"),
                }),
                ttl: self.ttl,
                agent_budget: 1,
            }
        }

        fn healthy(&self) -> bool {
            let out = std::process::Command::new("etcdctl")
                .args([
                    "--endpoints=http://127.0.0.1:2379",
                    "--command-timeout=2s",
                    "endpoint",
                    "health",
                ])
                .output();
            out.is_ok_and(|o| o.status.success())
        }

        pub fn run(self) {
            let text = loop {
                if let Ok(t) = std::fs::read_to_string(&self.trigger) {
                    break t.trim().to_string();
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let release: clutch_config::Release = text.as_str().try_into().unwrap();
            let c = self.coordinator();
            let server = self.role == clutch_cluster::Role::Server;
            let mut last = String::new();
            let got = acquire(
                &c,
                &self.me,
                self.role,
                &release,
                Duration::from_secs(300),
                Duration::from_millis(500),
                &mut |why| {
                    if why != last {
                        last = why.to_string();
                        self.log(serde_json::json!({"waiting": why}));
                    }
                },
            );
            let t = match got {
                Ok(Acquired::Go(t)) => t,
                Ok(Acquired::Bad(b)) => {
                    self.log(serde_json::json!({"skipped_bad": release.to_string(), "by": b.hostname.to_string()}));
                    return;
                }
                Ok(Acquired::NotNow(why)) => {
                    self.log(serde_json::json!({"gave_up": why}));
                    return;
                }
                Err(e) => {
                    self.log(serde_json::json!({"error": e.to_string()}));
                    return;
                }
            };
            self.log(serde_json::json!({"down": release.to_string()}));
            if let (true, Some(s)) = (server, &self.services) {
                let _ = clutch_cluster::sys::ServiceManager::stop(s.as_ref(), "etcd");
            }
            std::thread::sleep(self.down);
            if let (true, Some(s)) = (server, &self.services) {
                let _ = clutch_cluster::sys::ServiceManager::restart(s.as_ref(), "etcd");
                let start = std::time::Instant::now();
                while !self.healthy() && start.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if release.as_str().starts_with("bad") {
                // The new slot never got to ready: rolled back; stop the rollout.
                let _ = c.mark_bad(&self.me, &release, "did not reach ready on the new slot");
                self.log(serde_json::json!({"rolled_back": release.to_string()}));
            } else {
                let _ = c.keep(&t);
                self.log(serde_json::json!({"up": release.to_string()}));
            }
            let r = c.release(&t);
            self.log(serde_json::json!({"released": r.is_ok()}));
        }
    }
}

/// An authenticated session to `target` as node `id` with a fresh node key and the token
/// and cluster key the arguments name; also the local address of the connection.
async fn session(
    a: &HashMap<String, String>,
    id: &str,
    target: SocketAddr,
) -> Result<
    (
        clutch_cluster::session::Channel<TcpStream>,
        std::net::IpAddr,
    ),
    wire::WireError,
> {
    let me: NodeId = id.parse().unwrap();
    let (ident, tok, key) = (Identity::generate(), token(a), key_of(a));
    let s = TcpStream::connect(target).await?;
    let local = s.local_addr()?.ip();
    let creds = Credentials {
        token: tok.as_bytes(),
        cluster: &key,
        me: &me,
        identity: &ident,
    };
    Ok((wire::client_handshake(s, creds, target).await?, local))
}

fn key_of(a: &HashMap<String, String>) -> ClusterKey {
    a["cluster-key"].clone().try_into().unwrap()
}

/// Try to authenticate with the given token; report what came back.
async fn probe(a: HashMap<String, String>) {
    let target: SocketAddr = a["target"].parse().unwrap();
    let res = async {
        let (mut c, _) = session(&a, "ffff-probe", target).await?;
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

async fn send(s: &mut TcpStream, v: &impl serde::Serialize) -> std::io::Result<()> {
    let b = serde_json::to_vec(v).unwrap();
    s.write_all(&(b.len() as u32).to_be_bytes()).await?;
    s.write_all(&b).await
}

async fn recv(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut b).await?;
    Ok(b)
}

/// Record a genuine handshake (as an eavesdropper with the right to connect would), then
/// replay the client's messages byte for byte on a new connection.
async fn replay(a: HashMap<String, String>) {
    let target: SocketAddr = a["target"].parse().unwrap();
    let me: NodeId = "ffff-recorder".parse().unwrap();
    let (ident, tok, key) = (Identity::generate(), token(&a), key_of(&a));
    let creds = || Credentials {
        token: tok.as_bytes(),
        cluster: &key,
        me: &me,
        identity: &ident,
    };
    let mut s = TcpStream::connect(target).await.unwrap();
    let client = handshake::Client::new(creds(), target);
    let hello: ClientHello = client.hello().clone();
    send(&mut s, &hello).await.unwrap();
    let sh: ServerHello = serde_json::from_slice(&recv(&mut s).await.unwrap()).unwrap();
    let (awaiting, fin) = client.on_server_hello(&sh).unwrap();
    send(&mut s, &fin).await.unwrap();
    let sf: ServerFinish = serde_json::from_slice(&recv(&mut s).await.unwrap()).unwrap();
    let genuine_ok = awaiting.on_server_finish(&sf).is_ok();
    drop(s);
    let mut s = TcpStream::connect(target).await.unwrap();
    send(&mut s, &hello).await.unwrap();
    let sh2: Result<ServerHello, String> = recv(&mut s)
        .await
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
    let fresh = sh2.as_ref().map(|h| h.pake != sh.pake).unwrap_or(false);
    send(&mut s, &fin).await.ok();
    let replay = recv(&mut s).await;
    println!(
        "{}",
        serde_json::json!({
            "genuine_ok": genuine_ok,
            "server_exchange_fresh": fresh,
            "replay_accepted": replay.is_ok(),
            "replay_error": replay.err().map(|e| e.to_string()),
        })
    );
}

/// A token holder asks to be admitted under somebody else's host name.
async fn claim(a: HashMap<String, String>) {
    let target: SocketAddr = a["target"].parse().unwrap();
    let id = a
        .get("id")
        .map_or("ffff-claimant", String::as_str)
        .to_string();
    let res = async {
        let (mut c, local) = session(&a, &id, target).await?;
        // `--addr`: claim another address than the connection's own.
        let addr = a.get("addr").map_or(local, |x| x.parse().unwrap());
        c.request(&Request::Join {
            hostname: a["hostname"].as_str().try_into().unwrap(),
            addr,
            csr: None,
        })
        .await
    }
    .await;
    let out = match res {
        Ok(Response::Admitted { role, .. }) => serde_json::json!({"admitted": true, "role": role}),
        Ok(Response::Error { why }) | Ok(Response::Busy { why }) => {
            serde_json::json!({"admitted": false, "why": why})
        }
        Ok(other) => serde_json::json!({"admitted": false, "why": format!("{other:?}")}),
        Err(e) => serde_json::json!({"admitted": false, "why": e.to_string()}),
    };
    println!("{out}");
}
