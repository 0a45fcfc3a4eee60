//! Netboot: the node config comes from the server, not from a FAT partition.
//!
//! A netbooted node (the `pxe` output of `clutch build`) has `clutch.config=<url>` on its
//! kernel command line, its MAC already in the URL (iPXE fills it in). Before the usual
//! loading, [`prepare`] downloads that URL (plain HTTP; the initramfs already brought the link
//! up to fetch the root filesystem) and writes it as `clutch.toml` in the boot folder, which
//! on a netbooted node is part of the RAM overlay. Everything after that is the same as on a
//! disk image. Without the kernel argument nothing happens.
//!
//! Storage: a netbooted root lives in RAM, and so would the loopback backing files under
//! `/var/lib/clutch/storage`. When a local block device carries an ext4 file system labelled
//! [`STORAGE_LABEL`] (made once with `mkfs.ext4 -L clutch-storage /dev/sdX`), [`place_storage`]
//! mounts it there first, so the loopback devices live on that disk and survive reboots;
//! otherwise they stay in RAM. Either way one console line says where they are.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use std::path::PathBuf;

use crate::facts::{Paths, STATE_DIR};
use crate::load::CLUTCH_TOML;
use crate::sys::Sys;

/// The ext4 label of a local file system that holds a netbooted node's loopback storage.
pub const STORAGE_LABEL: &str = "clutch-storage";

pub const CMDLINE_KEY: &str = "clutch.config=";

/// The config URL from a kernel command line (the last one wins, as the kernel does).
pub fn config_url(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|a| a.strip_prefix(CMDLINE_KEY))
        .rfind(|u| !u.is_empty())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

/// `http://host[:port]/path`; IPv6 hosts in brackets. No https (the node has no CA to trust
/// for a LAN server yet; the set itself came over plain HTTP too).
pub fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: unclosed [ in the host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{url}: bad port `{p}`"))?,
        None => 80,
    };
    Ok(HttpUrl {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// The body of a complete HTTP response, or why it is not a usable 200.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code = status_line
        .split_ascii_whitespace()
        .nth(1)
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    if code != "200" {
        return Err(format!("the server answered `{status_line}`"));
    }
    let body = &raw[end + 4..];
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length `{}`", v.trim()))?;
                if body.len() < n {
                    return Err(format!("short body: {} of {n} bytes", body.len()));
                }
                return Ok(body[..n].to_vec());
            }
            if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err("chunked responses are not supported".into());
            }
        }
    }
    Ok(body.to_vec())
}

/// Whether `raw` holds the headers and the whole body their Content-Length announces.
pub fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|n| raw.len() >= end + 4 + n)
}

/// How the config is downloaded (a fake in tests).
pub trait Fetch {
    fn get(&self, url: &str) -> Result<String, String>;
}

/// HTTP/1.0 GET over a plain TCP connection (no chunking to handle), 5 s to connect, 20 s
/// for the answer.
pub struct HttpFetch;

impl Fetch for HttpFetch {
    fn get(&self, url: &str) -> Result<String, String> {
        let u = parse_http_url(url)?;
        let addr = (u.host.as_str(), u.port)
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", u.host))?
            .next()
            .ok_or_else(|| format!("{}: no address", u.host))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let host = if u.host.contains(':') {
            format!("[{}]:{}", u.host, u.port)
        } else {
            format!("{}:{}", u.host, u.port)
        };
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: clutch-firstboot\r\nAccept: application/toml, */*\r\n\r\n",
            u.path
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("sending the request to {addr}: {e}"))?;
        // Read until the body is whole (by Content-Length) or the server closes: a proxy in
        // between may keep the connection open after the server is done.
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        while !response_complete(&raw) && raw.len() < 1 << 20 {
            let n = s
                .read(&mut buf)
                .map_err(|e| format!("reading the answer from {addr}: {e}"))?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let body = parse_response(&raw)?;
        String::from_utf8(body).map_err(|_| "the config is not UTF-8".to_string())
    }
}

/// Writes `text` to `dest` crash-safely (temp name, fsync, rename, fsync of the folder), mode
/// 0600: it may hold the cluster token until the loader moves it to /var/lib/clutch.
fn write_atomic(dest: &Path, text: &str) -> std::io::Result<()> {
    crate::fsx::write_atomic(dest, text.as_bytes(), 0o600)
}

/// On a netbooted node (`clutch.config=` on the kernel command line), downloads the node
/// config into the boot folder as `clutch.toml`, trying `attempts` times `pause` apart.
/// Returns the URL it came from, `None` when the node is not netbooted.
pub fn prepare(
    paths: &Paths,
    fetch: &dyn Fetch,
    attempts: u32,
    pause: &dyn Fn(),
) -> Result<Option<String>, String> {
    let cmdline = std::fs::read_to_string(paths.host("/proc/cmdline")).unwrap_or_default();
    let Some(url) = config_url(&cmdline) else {
        return Ok(None);
    };
    let dest = paths.host(paths.boot_file(CLUTCH_TOML));
    let mut last = String::new();
    for i in 0..attempts.max(1) {
        if i > 0 {
            pause();
        }
        match fetch.get(url) {
            Ok(text) => {
                write_atomic(&dest, &text).map_err(|e| {
                    format!(
                        "writing the node config from {url} to {}: {e}",
                        dest.display()
                    )
                })?;
                return Ok(Some(url.to_string()));
            }
            Err(e) => {
                tracing::warn!("node config from {url}: {e} (attempt {})", i + 1);
                last = e;
            }
        }
    }
    Err(format!(
        "cannot fetch the node config from {url} (clutch.config= on the kernel command line): {last}"
    ))
}

/// What the service calls: [`prepare`] with HTTP, 30 tries 2 s apart; on a netbooted node
/// then [`place_storage`], with its console line.
pub fn prepare_from_server(paths: &Paths) -> Result<Option<String>, String> {
    let url = prepare(paths, &HttpFetch, 30, &|| {
        std::thread::sleep(Duration::from_secs(2))
    })?;
    if url.is_some() {
        match place_storage(paths, &crate::sys::RealSys) {
            Ok(home) => crate::status::print_console(&home.line()),
            Err(e) => crate::status::print_console(&format!(
                "clutch: netboot: local storage disk not used ({e}); {}",
                StorageHome::Ram.line()
            )),
        }
    }
    Ok(url)
}

/// The volume label of an ext2/3/4 file system, from its first 2 KiB (magic 0xEF53 at
/// byte 1080, label at 1144..1160).
pub fn ext4_label(head: &[u8]) -> Option<String> {
    if head.get(1080..1082)? != [0x53, 0xEF] {
        return None;
    }
    let raw = head.get(1144..1160)?;
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

/// The first local block device (by name) with an ext4 labelled [`STORAGE_LABEL`], as a node
/// path (`/dev/vdb`). Loop, RAM, zram, optical and network block devices are not looked at.
pub fn find_storage_device(paths: &Paths) -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(paths.host("/sys/class/block"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !["loop", "ram", "zram", "sr", "nbd", "fd"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let dev = PathBuf::from("/dev").join(&n);
        let mut head = vec![0u8; 2048];
        let mut f = std::fs::File::open(paths.host(&dev)).ok()?;
        f.read_exact(&mut head).ok()?;
        (ext4_label(&head)? == STORAGE_LABEL).then_some(dev)
    })
}

/// Where a netbooted node's loopback storage lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageHome {
    Disk(PathBuf),
    Ram,
}

impl StorageHome {
    /// The console line (said once per boot, before the phase lines).
    pub fn line(&self) -> String {
        match self {
            StorageHome::Disk(d) => format!(
                "clutch: netboot: loopback storage on local disk {} (ext4 labelled {STORAGE_LABEL}) at {STATE_DIR}/storage",
                d.display()
            ),
            StorageHome::Ram => format!(
                "clutch: netboot: loopback storage in RAM (no local file system labelled {STORAGE_LABEL}): its data is lost at power-off"
            ),
        }
    }
}

/// Mounts the [`STORAGE_LABEL`] file system on `/var/lib/clutch/storage` when there is one.
pub fn place_storage(paths: &Paths, sys: &dyn Sys) -> Result<StorageHome, String> {
    let Some(dev) = find_storage_device(paths) else {
        return Ok(StorageHome::Ram);
    };
    let target = paths.state("storage");
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    sys.mount(&paths.host(&dev), &target, "ext4")
        .map_err(|e| format!("mounting {} on {}: {e}", dev.display(), target.display()))?;
    Ok(StorageHome::Disk(dev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::net::TcpListener;

    #[test]
    fn url_from_cmdline() {
        let c = "BOOT_IMAGE=x boot=live clutch.config=http://10.0.2.100/config/52-54-00-12-34-56 quiet\n";
        assert_eq!(
            config_url(c),
            Some("http://10.0.2.100/config/52-54-00-12-34-56")
        );
        assert_eq!(config_url("root=/dev/vda2 rw"), None);
        assert_eq!(config_url("clutch.config="), None);
        assert_eq!(
            config_url("clutch.config=http://a/1 clutch.config=http://b/2"),
            Some("http://b/2")
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://10.0.2.100/config/x").unwrap(),
            HttpUrl {
                host: "10.0.2.100".into(),
                port: 80,
                path: "/config/x".into()
            }
        );
        let u = parse_http_url("http://boot.lan:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("boot.lan", 8080, "/")
        );
        let u = parse_http_url("http://[fd00::1]:8080/c").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 8080));
        assert!(parse_http_url("https://x/").is_err());
        assert!(parse_http_url("http://x:port/").is_err());
        assert!(parse_http_url("http:///x").is_err());
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap(),
            b"abc"
        );
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap(),
            b"all of it"
        );
        let e = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nnot found").unwrap_err();
        assert!(e.contains("404"), "{e}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    struct Flaky {
        fail_first: u32,
        calls: Cell<u32>,
    }
    impl Fetch for Flaky {
        fn get(&self, url: &str) -> Result<String, String> {
            self.calls.set(self.calls.get() + 1);
            if self.calls.get() <= self.fail_first {
                Err("connection refused".into())
            } else {
                Ok(format!("# from {url}\n"))
            }
        }
    }

    fn node(cmdline: &str) -> (tempfile::TempDir, Paths) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/cmdline"), cmdline).unwrap();
        let p = Paths::new(t.path(), "/boot/efi");
        (t, p)
    }

    #[test]
    fn not_netbooted_does_nothing() {
        let (t, p) = node("root=PARTUUID=x rw\n");
        let f = Flaky {
            fail_first: 0,
            calls: Cell::new(0),
        };
        assert_eq!(prepare(&p, &f, 3, &|| {}), Ok(None));
        assert_eq!(f.calls.get(), 0);
        assert!(!t.path().join("boot/efi/clutch.toml").exists());
    }

    #[test]
    fn retries_then_writes_clutch_toml() {
        let (t, p) = node("boot=live clutch.config=http://s/config/aa\n");
        let pauses = Cell::new(0);
        let f = Flaky {
            fail_first: 2,
            calls: Cell::new(0),
        };
        let got = prepare(&p, &f, 5, &|| pauses.set(pauses.get() + 1)).unwrap();
        assert_eq!(got.as_deref(), Some("http://s/config/aa"));
        assert_eq!((f.calls.get(), pauses.get()), (3, 2));
        let dest = t.path().join("boot/efi/clutch.toml");
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            "# from http://s/config/aa\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn gives_up_with_the_url_and_the_reason() {
        let (t, p) = node("clutch.config=http://s/config/aa");
        let f = Flaky {
            fail_first: 99,
            calls: Cell::new(0),
        };
        let e = prepare(&p, &f, 3, &|| {}).unwrap_err();
        assert!(
            e.contains("http://s/config/aa") && e.contains("connection refused"),
            "{e}"
        );
        assert_eq!(f.calls.get(), 3);
        assert!(!t.path().join("boot/efi/clutch.toml").exists());
    }

    fn ext4_head(label: &str) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[1080] = 0x53;
        h[1081] = 0xEF;
        h[1144..1144 + label.len()].copy_from_slice(label.as_bytes());
        h
    }

    #[test]
    fn labels() {
        assert_eq!(
            ext4_label(&ext4_head("clutch-storage")).as_deref(),
            Some("clutch-storage")
        );
        assert_eq!(ext4_label(&ext4_head("")).as_deref(), Some(""));
        assert_eq!(ext4_label(&[0u8; 4096]), None);
        assert_eq!(ext4_label(&[0u8; 100]), None);
    }

    #[test]
    fn storage_goes_to_the_labelled_disk_else_ram() {
        let (t, p) = node("clutch.config=http://s/c");
        let r = t.path();
        for d in [
            "sys/class/block/loop0",
            "sys/class/block/vda",
            "sys/class/block/vdb",
            "dev",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("dev/loop0"), ext4_head("clutch-storage")).unwrap();
        std::fs::write(r.join("dev/vda"), ext4_head("other")).unwrap();
        std::fs::write(r.join("dev/vdb"), vec![0u8; 4096]).unwrap();
        let sys = crate::sys::FakeSys::new();
        assert_eq!(place_storage(&p, &sys), Ok(StorageHome::Ram));
        assert!(sys.calls(r).is_empty(), "a loop device is never used");
        assert!(StorageHome::Ram.line().contains("in RAM"));

        std::fs::write(r.join("dev/vdb"), ext4_head("clutch-storage")).unwrap();
        let home = place_storage(&p, &sys).unwrap();
        assert_eq!(home, StorageHome::Disk("/dev/vdb".into()));
        assert_eq!(
            sys.calls(r),
            ["mount $ROOT/dev/vdb $ROOT/var/lib/clutch/storage ext4"]
        );
        assert!(r.join("var/lib/clutch/storage").is_dir());
        assert!(
            home.line().contains("on local disk /dev/vdb"),
            "{}",
            home.line()
        );
    }

    /// The real client against a one-shot server on loopback.
    #[test]
    fn http_fetch_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&buf[..n]);
            }
            let req = String::from_utf8_lossy(&req).into_owned();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nhostname = \"rack-a1\"\n\n")
                .unwrap();
            // The connection stays open (like behind a proxy): the client must not wait for EOF.
            (req, s)
        });
        let body = HttpFetch
            .get(&format!("http://127.0.0.1:{port}/config/52-54-00-12-34-56"))
            .unwrap();
        assert_eq!(body, "hostname = \"rack-a1\"\n\n");
        let (req, _still_open) = server.join().unwrap();
        assert!(response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"
        ));
        assert!(!response_complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"
        ));
        assert!(!response_complete(b"HTTP/1.0 200 OK\r\n\r\nab"));
        assert!(
            req.starts_with("GET /config/52-54-00-12-34-56 HTTP/1.0\r\n"),
            "{req}"
        );
        assert!(req.contains(&format!("Host: 127.0.0.1:{port}\r\n")));
    }
}
