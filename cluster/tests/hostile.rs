//! Hostile LAN in network namespaces (needs root: `ip netns`, like tests/netns.rs):
//! - a fake leader on mDNS that copies the cluster's public TXT, and relays that
//!   impersonate the real nodes, all pointing at listeners the attacker controls;
//! - a bounded flood of connections (garbage, half handshakes, slow-loris) at one node,
//!   and half handshakes held from 100 source addresses;
//! - a token holder claiming a live node's host name;
//! - packet captures of whole formations (etcd and k3s engines) searched for every secret.
//!
//! The attacker runs inside this test process, on threads that entered a namespace of its
//! own on the lab bridge (10.77.0.13); it only talks to the lab's own addresses.

mod common;

use std::collections::{BTreeSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use serde_json::{Value, json};

const PORT: u16 = clutch_cluster::DEFAULT_PORT;
/// Attacker's own address: node slot 3 of a 4-slot lab.
const EVIL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 13);
/// Lower than every real id, so a node believing it would pick it as candidate or leader.
const FAKE_ID: &str = "0000-leader";

/// One lab at a time: the flood's timings mean something only on an otherwise idle lab.
static SERIAL: Mutex<()> = Mutex::new(());

fn opts() -> NodeOpts<'static> {
    NodeOpts {
        cluster: "lab",
        token: TOKEN,
        expected: 3,
        servers: 3,
        settle_ms: 2000,
        engine: "none",
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    hex::encode(b)
}

fn base64(data: &[u8], url: bool, pad: bool) -> String {
    let abc: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..=c.len() {
            out.push(abc[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if pad {
            for _ in c.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

/// The token in every encoding an attacker could pick up and use.
fn token_forms() -> Vec<String> {
    let t = TOKEN.as_bytes();
    vec![
        TOKEN.to_string(),
        hex::encode(t),
        hex::encode_upper(t),
        base64(t, false, true),
        base64(t, false, false),
        base64(t, true, false),
    ]
}

// ------------------------------------------------------------------ attacker plumbing

/// Everything the attacker's sockets received.
#[derive(Default)]
struct Loot {
    bytes: Vec<u8>,
    leader_conns: usize,
    relay_conns: usize,
    /// Frames real nodes sent back through a relay. A server hello would be harmless; a
    /// server finish (key confirmation) or an encrypted frame (not JSON) would mean a
    /// session ran through the attacker.
    relayed_replies: Vec<Value>,
    /// The public cluster key the attacker read from mDNS.
    seen_cids: Vec<String>,
    /// Node ids the attacker advertised relays for.
    impersonated: Vec<String>,
}

type Shared = Arc<Mutex<Loot>>;

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read one length-prefixed frame, keeping every byte received.
fn read_frame(s: &mut TcpStream, loot: &Shared) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    loot.lock().unwrap().bytes.extend_from_slice(&len);
    let n = u32::from_be_bytes(len) as usize;
    if n > 256 * 1024 {
        return None;
    }
    let mut buf = vec![0u8; n];
    let got = s.read_exact(&mut buf);
    loot.lock().unwrap().bytes.extend_from_slice(&buf);
    got.ok().map(|_| buf)
}

fn write_frame(s: &mut TcpStream, v: &Value) -> bool {
    let b = serde_json::to_vec(v).unwrap();
    s.write_all(&(b.len() as u32).to_be_bytes()).is_ok() && s.write_all(&b).is_ok()
}

/// Accept on `l` until `stop`, one thread per connection.
fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    on_conn: impl Fn(TcpStream) + Send + Sync + 'static,
) -> JoinHandle<()> {
    l.set_nonblocking(true).unwrap();
    let on_conn = Arc::new(on_conn);
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let f = on_conn.clone();
                    conns.push(std::thread::spawn(move || f(s)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => break,
            }
            conns.retain(|h: &JoinHandle<()>| !h.is_finished());
        }
        for h in conns {
            let _ = h.join();
        }
    })
}

/// The fake leader's answer to a node that dials it: everything it can do without the
/// token, as slowly as the node tolerates (about 5 s per message).
fn fake_leader_conn(mut s: TcpStream, cid: &str, loot: &Shared, stop: &AtomicBool) {
    loot.lock().unwrap().leader_conns += 1;
    let _ = s.set_read_timeout(Some(Duration::from_millis(8000)));
    if read_frame(&mut s, loot).is_none() {
        return;
    }
    sleep_unless(stop, Duration::from_millis(4500));
    // A server hello with a key-exchange element of its own (anyone can make one), then a
    // confirmation and a forged admission it cannot make valid without the token.
    let hello = json!({"v": clutch_cluster::handshake::PROTOCOL_VERSION, "cluster": cid,
        "node_id": FAKE_ID, "node_key": random_hex(32), "pake": format!("42{}", random_hex(32))});
    if !write_frame(&mut s, &hello) || read_frame(&mut s, loot).is_none() {
        return;
    }
    sleep_unless(stop, Duration::from_millis(4500));
    let forged = json!({"t": "admitted", "role": "server", "info": {"engine": "none"},
        "leader": FAKE_ID, "members": {"epoch": 99, "members": [{"node_id": FAKE_ID,
        "hostname": "evil", "role": "server", "addr": EVIL.to_string(), "key": random_hex(32)}]}});
    write_frame(
        &mut s,
        &json!({"confirm": random_hex(32), "sig": random_hex(64)}),
    );
    write_frame(&mut s, &forged);
    while !stop.load(Ordering::Relaxed) && read_frame(&mut s, loot).is_some() {}
}

/// Pass bytes between a node that dialled an impersonation and the real node, keeping
/// everything, until either side hangs up.
fn relay_conn(client: TcpStream, target: SocketAddr, loot: &Shared, stop: &Arc<AtomicBool>) {
    loot.lock().unwrap().relay_conns += 1;
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return;
    };
    let pump = |mut from: TcpStream, mut to: TcpStream, loot: Shared, stop: Arc<AtomicBool>| {
        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    loot.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                    all.extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        all
    };
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (l2, st2) = (loot.clone(), stop.clone());
    let up = std::thread::spawn(move || pump(c2, s2, l2, st2));
    let down = pump(server, client, loot.clone(), stop.clone());
    let _ = up.join();
    // Which frames did the real node send back?
    let mut rest = &down[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        if rest.len() < 4 + n {
            break;
        }
        // An encrypted frame is not JSON: keep it as a marker.
        let v =
            serde_json::from_slice(&rest[4..4 + n]).unwrap_or_else(|_| json!({"undecodable": n}));
        loot.lock().unwrap().relayed_replies.push(v);
        rest = &rest[4 + n..];
    }
}

/// The attacker: browses mDNS for the real cluster, then advertises a fake leader with the
/// cluster's public TXT (ready, server, lowest id) and, for every real node it sees, a
/// second advertisement with that node's id pointing at a relay of its own.
struct FakeLeader {
    stop: Arc<AtomicBool>,
    loot: Shared,
    ready: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeLeader {
    fn start(ns: &str) -> FakeLeader {
        let stop = Arc::new(AtomicBool::new(false));
        let loot: Shared = Default::default();
        let ready = Arc::new(AtomicBool::new(false));
        let (st, lt, rd) = (stop.clone(), loot.clone(), ready.clone());
        let thread = in_netns(ns, move || run_fake_leader(st, lt, rd));
        FakeLeader {
            stop,
            loot,
            ready,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeLeader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_fake_leader(stop: Arc<AtomicBool>, loot: Shared, ready: Arc<AtomicBool>) {
    let mdns = ServiceDaemon::new().unwrap();
    let rx = mdns
        .browse(clutch_cluster::discovery::SERVICE_TYPE)
        .unwrap();
    let mut threads = Vec::new();
    let mut have_leader = false;
    let mut next_port = 7400u16;
    while !stop.load(Ordering::Relaxed) {
        let Ok(ev) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let ServiceEvent::ServiceResolved(s) = ev else {
            continue;
        };
        let addrs: Vec<IpAddr> = s.addresses.iter().map(|a| a.to_ip_addr()).collect();
        let Some(real) = addrs.iter().copied().find(|a| a.is_ipv4()) else {
            continue;
        };
        if addrs.contains(&IpAddr::V4(EVIL)) {
            continue; // our own advertisements
        }
        let props: Vec<(String, String)> = s
            .txt_properties
            .iter()
            .map(|p| (p.key().to_string(), p.val_str().to_string()))
            .collect();
        let get = |k: &str| props.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
        let (Some(cid), Some(id)) = (get("cid"), get("id")) else {
            continue;
        };
        loot.lock().unwrap().seen_cids.push(cid.clone());
        let port: u16 = get("port").and_then(|p| p.parse().ok()).unwrap_or(s.port);
        // The same TXT, with our own claims.
        let advert = |id: &str, port: u16| -> Vec<(String, String)> {
            let mut v: Vec<(String, String)> = props
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "id" | "ph" | "ro" | "port"))
                .cloned()
                .collect();
            v.push(("id".into(), id.into()));
            v.push(("ph".into(), "ready".into()));
            v.push(("ro".into(), "server".into()));
            v.push(("port".into(), port.to_string()));
            v.push(("leader".into(), FAKE_ID.into()));
            v
        };
        let register = |instance: &str, port: u16, txt: Vec<(String, String)>| {
            let info = ServiceInfo::new(
                clutch_cluster::discovery::SERVICE_TYPE,
                instance,
                "evil.local.",
                IpAddr::V4(EVIL),
                port,
                &txt[..],
            )
            .unwrap();
            mdns.register(info).unwrap();
        };
        if !have_leader {
            let l = TcpListener::bind((EVIL, PORT)).unwrap();
            let (lt, st, c) = (loot.clone(), stop.clone(), cid.clone());
            let st2 = stop.clone();
            threads.push(accept_loop(l, st2, move |s| {
                fake_leader_conn(s, &c, &lt, &st)
            }));
            register(&format!("clutch-{FAKE_ID}"), PORT, advert(FAKE_ID, PORT));
            have_leader = true;
            ready.store(true, Ordering::Relaxed);
        }
        if !loot.lock().unwrap().impersonated.contains(&id) {
            let l = TcpListener::bind((EVIL, next_port)).unwrap();
            let target = SocketAddr::new(real, port);
            let (lt, st) = (loot.clone(), stop.clone());
            threads.push(accept_loop(l, stop.clone(), move |s| {
                relay_conn(s, target, &lt, &st)
            }));
            register(&format!("clutch-{id}-2"), next_port, advert(&id, next_port));
            loot.lock().unwrap().impersonated.push(id);
            next_port += 1;
        }
    }
    let _ = mdns.shutdown();
    for t in threads {
        let _ = t.join();
    }
}

fn ids_of(v: &Value) -> Vec<String> {
    v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["node_id"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn fake_leader_on_mdns_diverts_nothing_and_learns_nothing() {
    if !need_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(4);
    let real = ["r1", "r2", "r3"];
    // Node 0 first, so the attacker can copy its advertisement...
    lab.start(0, real[0], &opts());
    let attacker = FakeLeader::start(&lab.nodes[3].ns);
    wait_for(
        &lab,
        Duration::from_secs(20),
        "fake leader advertised",
        |_| attacker.ready.load(Ordering::Relaxed),
    );
    // ...and the others boot into a LAN where the fake leader already claims the cluster.
    let t0 = Instant::now();
    lab.start(1, real[1], &opts());
    lab.start(2, real[2], &opts());
    wait_for(
        &lab,
        Duration::from_secs(60),
        "3 real nodes ready with 3 members beside the fake leader",
        |l| (0..3).all(|i| l.nodes[i].phase() == "ready" && l.nodes[i].members() == 3),
    );
    eprintln!(
        "formed beside the fake leader in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    // Let the attacker keep trying on a formed cluster for a few more polls.
    std::thread::sleep(Duration::from_secs(3));
    let stop_at = Instant::now();
    attacker.stop.store(true, Ordering::Relaxed);
    let loot = std::mem::take(&mut *attacker.loot.lock().unwrap());
    drop(attacker);
    eprintln!(
        "attacker stopped in {:.1}s; fake leader dialled {} times, relays {} times ({:?}), {} bytes received",
        stop_at.elapsed().as_secs_f64(),
        loot.leader_conns,
        loot.relay_conns,
        loot.impersonated,
        loot.bytes.len()
    );

    // One cluster of the three real nodes, and the fake is nobody's leader or member.
    let real_set: BTreeSet<String> = real.iter().map(|s| s.to_string()).collect();
    let bootstraps = lab.nodes[..3].iter().filter(|n| n.bootstrapped()).count();
    assert_eq!(bootstraps, 1, "{}", lab.dump());
    let leader = lab.nodes[0].last().unwrap()["leader"].clone();
    for n in &lab.nodes[..3] {
        let last = n.last().unwrap();
        assert_eq!(last["leader"], leader, "{}", lab.dump());
        let ids: BTreeSet<String> = ids_of(&last).into_iter().collect();
        assert_eq!(ids, real_set, "node {}\n{}", n.idx, lab.dump());
        let named = n.ids_ever_named();
        assert!(
            named.iter().all(|id| real_set.contains(id)),
            "node {} named {named:?} as leader or member",
            n.idx
        );
        for h in n.history() {
            if let Some(a) = h["peers_authenticated"].as_u64() {
                assert!(a <= 2, "node {} authenticated {a} peers: {h}", n.idx);
            }
        }
    }
    assert!(real_set.contains(leader.as_str().unwrap()));

    // The attacker was dialled (the test means something) but no session, vote or join
    // ever ran through it.
    assert!(loot.leader_conns > 0, "nobody dialled the fake leader");
    assert!(loot.relay_conns > 0, "nobody dialled an impersonation");
    for v in &loot.relayed_replies {
        assert!(
            v.get("confirm").is_none() && v.get("undecodable").is_none(),
            "a real node confirmed a key or talked in a session through the attacker's relay: {v}"
        );
    }
    // What mDNS told the attacker is the public cluster key: a hash of the name, engine and
    // sizes, the same whatever the token, so it tests no guess of the token.
    assert!(!loot.seen_cids.is_empty());
    for cid in &loot.seen_cids {
        assert_eq!(cid, &opts().cluster_key());
    }
    for word in [
        "\\\"t\\\":\\\"join",
        "\\\"t\\\":\\\"vote",
        "\\\"t\\\":\\\"status",
    ] {
        assert!(
            !contains(&loot.bytes, word.as_bytes()),
            "attacker saw a session message {word}"
        );
    }
    // Nothing it received carries the token, in any encoding.
    for form in token_forms() {
        assert!(
            !contains(&loot.bytes, form.as_bytes()),
            "the token ({form}) reached the attacker"
        );
    }
}

// ------------------------------------------------------------------ flood

#[derive(Debug, Default)]
struct FloodReport {
    attempts: usize,
    connected: usize,
    failed: usize,
    elapsed: Duration,
    /// How long each slow-loris connection stayed open before the node closed it.
    loris_open_for: Vec<Option<Duration>>,
}

/// Wait until `target` accepts, then: slow-loris connections (silent, or half a frame);
/// then `total` connections within `spread` from 3 threads: first a burst of half
/// handshakes (a valid hello, then silence) held open, then a mix of connect-and-close,
/// garbage, oversized frames and more half handshakes.
fn flood(target: SocketAddr, cid: String, total: usize, spread: Duration) -> FloodReport {
    let until = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < until, "{target} never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hello = {
        let b = serde_json::to_vec(&json!({"v": clutch_cluster::handshake::PROTOCOL_VERSION,
            "cluster": cid, "node_id": "ffff-flood", "node_key": random_hex(32),
            "to": target}))
        .unwrap();
        let mut f = (b.len() as u32).to_be_bytes().to_vec();
        f.extend(b);
        f
    };
    // Slow-loris first, while the source is not yet rate-limited.
    let loris: Vec<JoinHandle<Option<Duration>>> = (0..4)
        .map(|i| {
            let half = hello[..hello.len() / 2].to_vec();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
                let t = Instant::now();
                if i % 2 == 1 {
                    s.write_all(&half).ok()?;
                }
                s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                let mut b = [0u8; 512];
                loop {
                    match s.read(&mut b) {
                        Ok(0) => return Some(t.elapsed()),
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::TimedOut => return None,
                        Err(_) => return Some(t.elapsed()),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let attempts = Arc::new(AtomicUsize::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..3)
        .map(|t| {
            let (a, c, f, hello) = (
                attempts.clone(),
                connected.clone(),
                failed.clone(),
                hello.clone(),
            );
            std::thread::spawn(move || {
                let mine = total / 3;
                let pace = spread / mine as u32;
                let mut held: VecDeque<TcpStream> = VecDeque::new();
                for i in 0..mine {
                    let due = start + pace * i as u32;
                    if let Some(d) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                    a.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                    else {
                        f.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    let kind = if i < mine * 2 / 5 { 2 } else { (i + t) % 4 };
                    match kind {
                        0 => {}
                        1 => {
                            let _ = s.write_all(random_hex(48).as_bytes());
                        }
                        2 => {
                            let _ = s.write_all(&hello);
                            held.push_back(s);
                        }
                        _ => {
                            let _ = s.write_all(&u32::MAX.to_be_bytes());
                            let _ = s.write_all(b"{\"v\":");
                            held.push_back(s);
                        }
                    }
                    while held.len() > 300 {
                        held.pop_front();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed();
    FloodReport {
        attempts: attempts.load(Ordering::Relaxed),
        connected: connected.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        loris_open_for: loris.into_iter().map(|h| h.join().unwrap()).collect(),
    }
}

#[test]
fn connection_flood_does_not_stop_formation_or_exhaust_the_node() {
    if !need_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    raise_nofile();
    let mut lab = Lab::new(4);
    // The flooded node has the lowest id: it has to win the election and admit the others
    // while under fire.
    let ids = ["g1", "g2", "g3"];
    let t0 = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        lab.start(i, id, &opts());
    }
    let pid = lab.nodes[0].pid().unwrap();
    let target = SocketAddr::new(lab.nodes[0].ip.parse().unwrap(), PORT);
    // The attacker reads the public cluster key from TXT; here it is simply computed.
    let cid = opts().cluster_key();
    const TOTAL: usize = 3000;
    let attack = in_netns(&lab.nodes[3].ns, move || {
        flood(target, cid, TOTAL, Duration::from_secs(12))
    });
    let mut max_fds = 0;
    let mut max_rss = 0;
    let mut formed_after = None;
    while !attack.is_finished() || formed_after.is_none() {
        max_fds = max_fds.max(fd_count(pid).unwrap_or(0));
        max_rss = max_rss.max(rss_kib(pid).unwrap_or(0));
        if formed_after.is_none()
            && (0..3).all(|i| lab.nodes[i].phase() == "ready" && lab.nodes[i].members() == 3)
        {
            formed_after = Some(t0.elapsed());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "cluster did not form under the flood\n{}",
            lab.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = attack.join().unwrap();
    let formed_after = formed_after.unwrap();
    // Give the node its handshake timeout to shed what the flood left behind.
    std::thread::sleep(Duration::from_secs(3));
    let fds_after = fd_count(pid).unwrap_or(0);
    eprintln!(
        "flood: {} connects ({} connected, {} failed) in {:.1}s; slow-loris closed after {:?}; \
         formed after {:.1}s; node 0: max {max_fds} fds, {fds_after} after, max RSS {max_rss} KiB",
        report.attempts,
        report.connected,
        report.failed,
        report.elapsed.as_secs_f64(),
        report.loris_open_for,
        formed_after.as_secs_f64()
    );

    assert!(
        report.connected >= TOTAL / 2,
        "the flood did not happen: {report:?}"
    );
    assert!(lab.nodes[0].alive(), "flooded node died\n{}", lab.dump());
    assert!(
        formed_after < Duration::from_secs(30),
        "formation took {formed_after:?} under the flood"
    );
    let bootstraps = lab.nodes[..3].iter().filter(|n| n.bootstrapped()).count();
    assert_eq!(bootstraps, 1, "{}", lab.dump());
    assert!(lab.nodes[0].bootstrapped(), "{}", lab.dump());
    assert!(
        max_fds <= 64,
        "flooded node held {max_fds} descriptors at once"
    );
    assert!(fds_after <= 60, "node kept {fds_after} descriptors");
    assert!(max_rss < 64 * 1024, "flooded node grew to {max_rss} KiB");
    for (i, t) in report.loris_open_for.iter().enumerate() {
        let t = t.unwrap_or_else(|| panic!("slow-loris {i} was never closed: {report:?}"));
        assert!(
            t <= Duration::from_secs(12),
            "slow-loris {i} held for {t:?}"
        );
    }
}

// ------------------------------------------------------------------ 100 sources

/// From each of `sources`, keep `per` half handshakes open at `target` (a valid hello,
/// then silence until the node gives up), reopening each as soon as it is closed, until
/// `stop`. Returns how many connections were made.
fn hold_half_handshakes(
    sources: Vec<Ipv4Addr>,
    per: usize,
    target: SocketAddr,
    cid: String,
    stop: Arc<AtomicBool>,
) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let made = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for src in sources {
            for _ in 0..per {
                let (cid, stop, made) = (cid.clone(), stop.clone(), made.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let sock = tokio::net::TcpSocket::new_v4().unwrap();
                        sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).unwrap();
                        let Ok(Ok(mut s)) =
                            tokio::time::timeout(Duration::from_secs(2), sock.connect(target))
                                .await
                        else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        made.fetch_add(1, Ordering::Relaxed);
                        let hello = serde_json::to_vec(&json!({
                            "v": clutch_cluster::handshake::PROTOCOL_VERSION,
                            "cluster": cid, "node_id": "ffff-holder",
                            "node_key": random_hex(32), "to": target}))
                        .unwrap();
                        let _ = s.write_all(&(hello.len() as u32).to_be_bytes()).await;
                        let _ = s.write_all(&hello).await;
                        // Hold it until the node closes it.
                        let mut b = [0u8; 1024];
                        while !stop.load(Ordering::Relaxed) {
                            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
                                .await
                            {
                                Ok(Ok(0)) | Ok(Err(_)) => break,
                                _ => {}
                            }
                        }
                    }
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        made.load(Ordering::Relaxed)
    })
}

#[test]
fn half_handshakes_held_from_100_addresses_do_not_lock_out_the_peers() {
    if !need_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    raise_nofile();
    let mut lab = Lab::new(3);
    let sources: Vec<Ipv4Addr> = (100..200).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect();
    let extra: Vec<String> = sources[1..].iter().map(|a| a.to_string()).collect();
    let ns = lab.add_host("horde", &sources[0].to_string(), &extra);
    // The target is the lowest id: the one that must gather votes and enroll the others.
    let target = SocketAddr::new(lab.nodes[0].ip.parse().unwrap(), PORT);
    let ids = ["h1", "h2", "h3"];
    lab.start(0, ids[0], &opts());
    let stop = Arc::new(AtomicBool::new(false));
    let (st, cid) = (stop.clone(), opts().cluster_key());
    let horde = in_netns(&ns, move || {
        hold_half_handshakes(sources, 4, target, cid, st)
    });
    // Let the horde fill every slot first.
    std::thread::sleep(Duration::from_secs(3));
    let pid = lab.nodes[0].pid().unwrap();
    let t0 = Instant::now();
    lab.start(1, ids[1], &opts());
    lab.start(2, ids[2], &opts());
    let mut max_fds = 0;
    while !(0..3).all(|i| lab.nodes[i].phase() == "ready" && lab.nodes[i].members() == 3) {
        max_fds = max_fds.max(fd_count(pid).unwrap_or(0));
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "no formation while 100 sources hold half handshakes\n{}",
            lab.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let formed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let made = horde.join().unwrap();
    eprintln!(
        "formed {:.1}s after the peers started, beside {made} half handshakes from 100 addresses; node 0 max {max_fds} fds",
        formed.as_secs_f64()
    );
    assert!(made >= 400, "the horde did not happen: {made} connections");
    assert_eq!(lab.nodes.iter().filter(|n| n.bootstrapped()).count(), 1);
    assert!(lab.nodes[0].bootstrapped(), "{}", lab.dump());
    assert!(max_fds <= 200, "node 0 held {max_fds} descriptors");
}

// ------------------------------------------------------------------ claims

#[test]
fn a_token_holder_cannot_take_a_live_nodes_host_name_or_another_address() {
    if !need_root() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(3);
    for (i, id) in ["c1", "c2", "c3"].iter().enumerate() {
        lab.start(i, id, &opts());
    }
    wait_for(&lab, Duration::from_secs(40), "3 ready", |l| {
        l.nodes
            .iter()
            .all(|n| n.phase() == "ready" && n.members() == 3)
    });
    let ns = lab.add_host("insider", "10.77.0.70", &[]);
    let token_file = lab.nodes[0].dir.join("token");
    let target = format!("{}:{PORT}", lab.nodes[0].ip);
    let claim = |host: &str, addr: Option<&str>, id: &str| -> Value {
        let mut args = vec![
            helper().display().to_string(),
            "claim".into(),
            "--target".into(),
            target.clone(),
            "--cluster-key".into(),
            opts().cluster_key(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--hostname".into(),
            host.into(),
            "--id".into(),
            id.into(),
        ];
        if let Some(a) = addr {
            args.extend(["--addr".to_string(), a.to_string()]);
        }
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    // host1 is alive: nobody may take its name (and with it, its etcd member).
    let v = claim("host1", None, "ffff-claimant");
    assert_eq!(v["admitted"], false, "{v}");
    assert!(v["why"].as_str().unwrap().contains("alive"), "{v}");
    // Nor join under another machine's address.
    let v = claim("newcomer", Some("10.77.0.11"), "ffff-other");
    assert_eq!(v["admitted"], false, "{v}");
    assert!(v["why"].as_str().unwrap().contains("source"), "{v}");
    // And the id it used is bound to its key: another key under that id is refused.
    let v = claim("newcomer", None, "ffff-claimant");
    assert_eq!(v["admitted"], false, "{v}");
    std::thread::sleep(Duration::from_secs(2));
    for n in &lab.nodes {
        assert_eq!(n.members(), 3, "{}", lab.dump());
        assert!(!n.ids_ever_named().contains(&"ffff-claimant".to_string()));
    }
    assert!(
        lab.nodes[0]
            .log()
            .contains("authenticated with another key"),
        "{}",
        lab.dump()
    );
}

// ------------------------------------------------------------------ packet captures

/// Every way a secret could show on the wire: the text, and for PEM the lines of its
/// base64 body and a run of its DER bytes.
fn needles(secret: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let mut v = vec![secret.trim().as_bytes().to_vec()];
    if secret.contains("-----BEGIN") {
        let body: String = secret.lines().filter(|l| !l.starts_with("-----")).collect();
        for line in secret
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 24)
        {
            v.push(line.as_bytes().to_vec());
        }
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            let mid = der.len() / 2;
            v.push(der[mid.saturating_sub(12)..(mid + 12).min(der.len())].to_vec());
        }
    } else {
        v.push(hex::encode(secret.trim()).into_bytes());
    }
    v
}

/// Runs a whole formation of `engine` under tcpdump and checks that no secret any node
/// holds afterwards crossed the wire in any form.
fn capture_formation(engine: &'static str, servers: u32) {
    let mut lab = Lab::new(3);
    let pcap = lab.tmp.path().join(format!("{engine}.pcap"));
    let cap = lab.capture(&pcap);
    let o = NodeOpts {
        engine,
        servers,
        ..opts()
    };
    for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
        lab.start(i, id, &o);
    }
    wait_for(&lab, Duration::from_secs(90), "3 ready", |l| {
        l.nodes.iter().all(|n| n.phase() == "ready")
    });
    if engine == "etcd" {
        // Some real client and peer traffic too.
        let put = lab.nodes[0].exec(&["etcdctl", "put", "k", "v"]);
        assert!(put.status.success());
        let get = lab.nodes[2].exec(&["etcdctl", "get", "k"]);
        assert!(get.status.success());
    }
    std::thread::sleep(Duration::from_secs(2));
    let bytes = cap.finish();
    assert!(
        bytes.len() > 10_000,
        "the capture caught little: {} bytes",
        bytes.len()
    );
    let mut secrets: Vec<(String, String)> = token_forms()
        .into_iter()
        .map(|t| ("cluster token".to_string(), t))
        .collect();
    for n in &lab.nodes {
        let root = n.dir.join("root");
        for rel in [
            "var/lib/clutch/pki/ca.key",
            "var/lib/etcd/clutch-tls/node.key",
            "var/lib/clutch/k3s-secret",
            "var/lib/clutch/k3s-agent-secret",
        ] {
            if let Ok(s) = std::fs::read_to_string(root.join(rel)) {
                secrets.push((format!("{rel} of node {}", n.idx), s));
            }
        }
        if let Ok(s) = std::fs::read_to_string(root.join("etc/rancher/k3s/config.yaml")) {
            for l in s
                .lines()
                .filter(|l| l.starts_with("token:") || l.starts_with("agent-token:"))
            {
                let v = l
                    .split_once(':')
                    .unwrap()
                    .1
                    .trim()
                    .trim_matches('"')
                    .to_string();
                secrets.push((format!("k3s {l:.12}… of node {}", n.idx), v));
            }
        }
        let seed = std::fs::read_to_string(n.dir.join("state/node-key")).unwrap();
        secrets.push((format!("node key of node {}", n.idx), seed));
    }
    let kinds: BTreeSet<&str> = secrets
        .iter()
        .map(|(k, _)| k.split(" of ").next().unwrap())
        .collect();
    eprintln!(
        "{engine}: {} bytes captured; checked {} secrets: {kinds:?}",
        bytes.len(),
        secrets.len()
    );
    if engine == "etcd" {
        assert!(kinds.contains("var/lib/clutch/pki/ca.key"), "{kinds:?}");
    } else {
        assert!(
            kinds.iter().any(|k| k.starts_with("k3s token")),
            "{kinds:?}"
        );
    }
    for (what, s) in &secrets {
        for n in needles(s) {
            assert!(
                !contains(&bytes, &n),
                "{what} crossed the wire ({} bytes matched)",
                n.len()
            );
        }
    }
}

#[test]
fn a_captured_etcd_formation_holds_no_secret() {
    if !need_root() || !need_tool("tcpdump") || !need_tool("etcd") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    capture_formation("etcd", 3);
}

#[test]
fn a_captured_k3s_formation_holds_no_secret() {
    if !need_root() || !need_tool("tcpdump") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Two servers and one agent: the agent token and the server token both travel.
    capture_formation("k3s", 2);
}
