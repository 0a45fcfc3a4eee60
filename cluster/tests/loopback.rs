//! In-process formation on 127.0.0.1 (no root, no mDNS: peers are given as seeds):
//! reboot/rejoin from state, replaced node, rate limiting of failed handshakes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clutch_cluster::handshake::Credentials;
use clutch_cluster::wire::{self, Request, Response};
use clutch_cluster::{
    ClusterKey, FormationConfig, Identity, InterfaceFilter, NodeId, NoneEngine, Outcome, Phase,
    Status, StatusSink, form,
};
use tokio::net::TcpStream;

const TOKEN: &str = "loopback-token-0123456789abcdef0123456789";
const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Default)]
struct Record(Mutex<Vec<Status>>);
impl StatusSink for Record {
    fn update(&self, s: &Status) {
        self.0.lock().unwrap().push(s.clone());
    }
}
impl Record {
    fn phases(&self) -> Vec<Phase> {
        let mut v: Vec<Phase> = Vec::new();
        for s in self.0.lock().unwrap().iter() {
            if v.last() != Some(&s.phase) {
                v.push(s.phase);
            }
        }
        v
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((LO, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cfg(id: &str, host: &str, port: u16, seeds: &[u16], state: &std::path::Path) -> FormationConfig {
    FormationConfig {
        node_id: id.parse::<NodeId>().unwrap(),
        hostname: host.try_into().unwrap(),
        cluster_name: "lo".into(),
        token: TOKEN.to_string().try_into().unwrap(),
        expected_size: 3,
        servers: 3,
        state_dir: state.to_path_buf(),
        settle: Duration::from_millis(800),
        partial_wait: Duration::from_secs(5),
        poll_interval: Duration::from_millis(200),
        peer_timeout: Duration::from_secs(2),
        interfaces: InterfaceFilter::default(),
        listen_port: port,
        mdns: false,
        seeds: seeds.iter().map(|p| SocketAddr::new(LO, *p)).collect(),
        addr: Some(LO),
    }
}

async fn start(c: FormationConfig) -> (Outcome, Arc<Record>) {
    let rec = Arc::new(Record::default());
    let id = c.node_id.clone();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        form(c, Box::new(NoneEngine), rec.clone()),
    )
    .await
    .unwrap_or_else(|_| {
        let last = rec.0.lock().unwrap().last().cloned();
        panic!("formation of {id} timed out; last status {last:?}")
    })
    .expect("formation failed");
    (out, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_after_reboot_and_replaced_node_and_rate_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let dirs: Vec<_> = (0..4).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let seeds = |i: usize| -> Vec<u16> { (0..4).filter(|j| *j != i).map(|j| ports[j]).collect() };
    let ids = ["a1", "b2", "c3"];
    let mut tasks = Vec::new();
    for i in 0..3 {
        let c = cfg(ids[i], &format!("h{i}"), ports[i], &seeds(i), &dirs[i]);
        tasks.push(tokio::spawn(start(c)));
    }
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(t.await.unwrap());
    }
    assert_eq!(nodes.iter().filter(|(o, _)| o.bootstrapped).count(), 1);
    assert!(nodes[0].0.bootstrapped, "lowest id bootstraps");

    // Reboot node c3: it resumes as what it was, without a new election or join.
    let (old, _) = nodes.pop().unwrap();
    assert_eq!(old.role, clutch_cluster::Role::Server);
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (again, rec) = start(cfg("c3", "h2", ports[2], &seeds(2), &dirs[2])).await;
    assert_eq!(again.role, clutch_cluster::Role::Server);
    assert!(!again.bootstrapped);
    assert_eq!(
        rec.phases(),
        vec![Phase::Joining, Phase::Ready],
        "resumed from state"
    );
    drop(again);

    // Replace it: same hostname h2, new id, empty state. It is admitted and the stale
    // member is removed, so it takes the freed server seat.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (repl, rec) = start(cfg("d4", "h2", ports[3], &seeds(3), &dirs[3])).await;
    assert_eq!(repl.role, clutch_cluster::Role::Server);
    assert!(rec.phases().contains(&Phase::Joining));
    let ids_now: Vec<String> = repl.members.iter().map(|m| m.node_id.to_string()).collect();
    assert_eq!(ids_now, vec!["a1", "b2", "d4"], "stale c3 removed");

    // Rate limiting: five failed handshakes from 127.0.0.2, then even a correct one from
    // there is dropped for a while (the nodes themselves keep talking from 127.0.0.1).
    let key = ClusterKey::new("lo", "none", 3, 3);
    let me: NodeId = "zz-test".parse().unwrap();
    let ident = Identity::generate();
    let creds = |token: &'static str| Credentials {
        token: token.as_bytes(),
        cluster: &key,
        me: &me,
        identity: &ident,
    };
    let target = SocketAddr::new(LO, ports[0]);
    let ok = wire::client_handshake(
        TcpStream::connect(target).await.unwrap(),
        creds(TOKEN),
        target,
    )
    .await;
    let mut ok = ok.expect("correct token authenticates");
    assert!(matches!(
        ok.request(&Request::Status).await.unwrap(),
        Response::Status(_)
    ));
    for _ in 0..5 {
        let s = from_127_0_0_2(target).await;
        let r = wire::client_handshake(s, creds("wrong-token-0123456789abcdef0123456789"), target)
            .await;
        assert!(r.is_err());
    }
    let s = from_127_0_0_2(target).await;
    assert!(
        wire::client_handshake(s, creds(TOKEN), target)
            .await
            .is_err(),
        "source should be blocked after 5 failures"
    );
    drop(nodes);
    drop(repl);
}

async fn from_127_0_0_2(target: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 0))
        .unwrap();
    sock.connect(target).await.unwrap()
}

/// A seed that accepts and then never answers (like a stranger on mDNS that stalls on
/// purpose) must not hold up the polls of the real peers: their authentication would lapse
/// every round and the quorum would flap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_peer_does_not_hold_up_polling() {
    let tmp = tempfile::tempdir().unwrap();
    let tarpit = std::net::TcpListener::bind((LO, 0)).unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    tarpit.set_nonblocking(true).unwrap();
    let pit = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = tarpit.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        held.len()
    });
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut tasks = Vec::new();
    for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
        let mut seeds: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| ports[j]).collect();
        seeds.push(tarpit_port);
        let c = cfg(id, &format!("h{i}"), ports[i], &seeds, &tmp.path().join(id));
        tasks.push(tokio::spawn(start(c)));
    }
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(t.await.unwrap());
    }
    // Keep serving past two peer timeouts (2 s), as the tarpit stalls every handshake 5 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (out, rec) in &nodes {
        let hist = rec.0.lock().unwrap();
        let first_full = hist
            .iter()
            .position(|s| s.peers_authenticated == 2)
            .expect("both peers authenticated");
        let dips: Vec<usize> = hist[first_full..]
            .iter()
            .map(|s| s.peers_authenticated)
            .filter(|n| *n < 2)
            .collect();
        assert!(
            dips.is_empty(),
            "{}: authenticated peers dropped to {dips:?}",
            out.members.len()
        );
        assert_eq!(out.status().unwrap().peers_authenticated, 2);
    }
    assert_eq!(nodes.iter().filter(|(o, _)| o.bootstrapped).count(), 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(pit.join().unwrap() > 0, "nobody dialled the tarpit");
}
