//! mDNS traffic per node once a 3-node cluster has formed (engine `none`), in network
//! namespaces like tests/netns.rs (needs root).
//!
//! ```text
//! cargo bench -p clutch-cluster --bench mdns_traffic
//! ```
//!
//! Three nodes start together on the lab bridge; once all are `ready` with 3 members, a
//! sniffer in the hub namespace counts, for 60 s, the UDP port 5353 frames each node sends
//! (frames entering the hub on that node's veth port). Prints a markdown table and writes
//! it to bench/mdns.md with the date and this command.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const WINDOW: Duration = Duration::from_secs(60);
const NODES: usize = 3;
const COMMAND: &str = "cargo bench -p clutch-cluster --bench mdns_traffic";

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    packets: u64,
    /// Ethernet frame bytes (headers included, no FCS).
    bytes: u64,
    queries: u64,
    responses: u64,
}

/// UDP payload of an Ethernet frame whose source or destination port is 5353.
fn mdns_payload(f: &[u8]) -> Option<&[u8]> {
    if f.len() < 14 {
        return None;
    }
    let udp = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f.len() >= 34 && f[23] == 17 => 14 + (f[14] as usize & 0x0f) * 4,
        0x86dd if f.len() >= 62 && f[20] == 17 => 54,
        _ => return None,
    };
    let h = f.get(udp..udp + 8)?;
    let (sport, dport) = (
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
    );
    (sport == 5353 || dport == 5353).then(|| &f[udp + 8..])
}

/// Count, per hub port `p<i>`, the mDNS frames node `i` sends, for `window`.
fn sniff(ports: Vec<String>, window: Duration, stop: Arc<AtomicBool>) -> Vec<Count> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    let socks: Vec<i32> = ports
        .iter()
        .map(|p| {
            let name = std::ffi::CString::new(p.as_str()).unwrap();
            // SAFETY: plain socket calls on values we own; checked below.
            unsafe {
                let ifindex = libc::if_nametoindex(name.as_ptr());
                assert!(ifindex > 0, "no interface {p} in the hub");
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    all as i32,
                );
                assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = all;
                sll.sll_ifindex = ifindex as i32;
                let rc = libc::bind(
                    fd,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind {p}: {}", std::io::Error::last_os_error());
                fd
            }
        })
        .collect();
    let mut counts = vec![Count::default(); socks.len()];
    let mut buf = vec![0u8; 65536];
    let end = Instant::now() + window;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let mut pfds: Vec<libc::pollfd> = socks
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, 200) };
        for (i, p) in pfds.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                // SAFETY: buf and sll outlive the call; sizes passed match.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = unsafe {
                    libc::recvfrom(
                        p.fd,
                        buf.as_mut_ptr() as *mut _,
                        buf.len(),
                        0,
                        &mut sll as *mut _ as *mut libc::sockaddr,
                        &mut len,
                    )
                };
                if n <= 0 {
                    break;
                }
                // Frames the hub sends towards the node are the other nodes' traffic.
                if sll.sll_pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let frame = &buf[..n as usize];
                if let Some(dns) = mdns_payload(frame) {
                    let c = &mut counts[i];
                    c.packets += 1;
                    c.bytes += frame.len() as u64;
                    if dns.get(2).is_some_and(|f| f & 0x80 != 0) {
                        c.responses += 1;
                    } else {
                        c.queries += 1;
                    }
                }
            }
        }
    }
    for fd in socks {
        // SAFETY: closing fds we opened.
        unsafe { libc::close(fd) };
    }
    counts
}

fn main() {
    if !is_root() {
        eprintln!("SKIPPED: the mdns_traffic bench needs root (network namespaces)");
        return;
    }
    let mut lab = Lab::new(NODES);
    let o = NodeOpts {
        cluster: "lab",
        token: TOKEN,
        expected: NODES as u32,
        servers: NODES as u32,
        settle_ms: 2000,
        engine: "none",
    };
    let t0 = Instant::now();
    for i in 0..NODES {
        lab.start(i, &format!("m{}", i + 1), &o);
    }
    wait_for(
        &lab,
        Duration::from_secs(60),
        "all ready with 3 members",
        |l| {
            l.nodes
                .iter()
                .all(|n| n.phase() == "ready" && n.members() == NODES)
        },
    );
    let formed = t0.elapsed();
    eprintln!("sniffing mDNS for {}s", WINDOW.as_secs());
    let stop = Arc::new(AtomicBool::new(false));
    let ports: Vec<String> = (0..NODES).map(|i| format!("p{i}")).collect();
    let st = stop.clone();
    let counts = in_netns(&lab.hub, move || sniff(ports, WINDOW, st))
        .join()
        .expect("sniffer");
    assert!(
        lab.nodes.iter_mut().all(|n| n.alive()),
        "a node died\n{}",
        lab.dump()
    );
    drop(lab);

    let per_min = |v: u64| v as f64 * 60.0 / WINDOW.as_secs_f64();
    let mut table = String::from(
        "| node | packets/min | bytes/min | queries/min | responses/min |\n|---|---|---|---|---|\n",
    );
    let mut total = Count::default();
    for (i, c) in counts.iter().enumerate() {
        total.packets += c.packets;
        total.bytes += c.bytes;
        total.queries += c.queries;
        total.responses += c.responses;
        let _ = writeln!(
            table,
            "| m{} | {:.0} | {:.0} | {:.0} | {:.0} |",
            i + 1,
            per_min(c.packets),
            per_min(c.bytes),
            per_min(c.queries),
            per_min(c.responses)
        );
    }
    let _ = writeln!(
        table,
        "| all {NODES} | {:.0} | {:.0} | {:.0} | {:.0} |",
        per_min(total.packets),
        per_min(total.bytes),
        per_min(total.queries),
        per_min(total.responses)
    );
    println!("{table}");

    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let doc = format!(
        "# mDNS traffic per node, once formed\n\n\
         Reproduce: `{COMMAND}` (root). Written {date}.\n\n\
         {NODES} nodes (engine `none`, settle 2 s) in network namespaces on one bridge formed in \
         {:.1} s; then, for {} s, a sniffer in the hub namespace counted the UDP port 5353 frames \
         each node sent (IPv4 and IPv6; bytes are whole Ethernet frames). Per minute:\n\n{table}\n\
         This is the first minute after formation, the busiest one: mdns-sd's browse queries \
         back off (the interval doubles from 1 s up to 1 h) and cached records are queried \
         again only from 80 % of their TTL (120 s for SRV/A), so later minutes carry less. \
         Announcements happen only when a node's phase or role changes.\n",
        formed.as_secs_f64(),
        WINDOW.as_secs(),
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/mdns.md");
    let tmp = path.with_extension("md.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(doc.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(path.parent().unwrap())?.sync_all()
    };
    if let Err(e) = write() {
        eprintln!("writing {}: {e}", path.display());
        std::process::exit(1);
    }
    eprintln!("wrote {}", path.display());
}
