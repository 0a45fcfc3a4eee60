//! Downloading a release file over plain HTTP/1.1 into a file, resuming with `Range` after
//! a broken connection, never past a size limit. Integrity comes from the signed
//! `SHA256SUMS`, not from the transport.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use crate::netconfig::parse_http_url;

/// The parsed head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub code: u16,
    pub content_length: Option<u64>,
    /// `Content-Range: bytes <start>-<end>/<total>`: start and total.
    pub range: Option<(u64, Option<u64>)>,
}

/// Parses the status line and headers (without the blank line).
pub fn parse_head(head: &str) -> Result<Head, String> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code: u16 = status
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line `{status}`"))?;
    let mut h = Head {
        code,
        content_length: None,
        range: None,
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            h.content_length = Some(v.parse().map_err(|_| format!("bad Content-Length `{v}`"))?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && !v.eq_ignore_ascii_case("identity")
        {
            return Err(format!("Transfer-Encoding {v} is not supported"));
        } else if k.eq_ignore_ascii_case("content-range") {
            let spec = v
                .strip_prefix("bytes ")
                .ok_or_else(|| format!("bad Content-Range `{v}`"))?;
            let (span, total) = spec
                .split_once('/')
                .ok_or_else(|| format!("bad Content-Range `{v}`"))?;
            let start = span
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad Content-Range `{v}`"))?;
            h.range = Some((start, total.parse().ok()));
        }
    }
    Ok(h)
}

/// Downloads `url` into `dest`, continuing a partial file; at most `limit` bytes in all.
/// `progress(done, total)` hears each chunk. Retries a broken transfer a few times.
pub fn download(
    url: &str,
    dest: &Path,
    limit: u64,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<u64, String> {
    let mut last = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(2 * attempt));
        }
        match once(url, dest, limit, progress) {
            Ok(n) => return Ok(n),
            Err((fatal, e)) => {
                tracing::warn!("downloading {url}: {e}");
                if fatal {
                    return Err(e);
                }
                last = e;
            }
        }
    }
    Err(last)
}

/// One attempt; the bool says whether retrying is pointless.
fn once(
    url: &str,
    dest: &Path,
    limit: u64,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<u64, (bool, String)> {
    let fatal = |e: String| (true, e);
    let retry = |e: String| (false, e);
    let u = parse_http_url(url).map_err(fatal)?;
    let have = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    let addr = (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|e| retry(format!("{}: {e}", u.host)))?
        .next()
        .ok_or_else(|| retry(format!("{}: no address", u.host)))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| retry(format!("connecting to {addr}: {e}")))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| retry(e.to_string()))?;
    let host = if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    };
    let range = if have > 0 {
        format!("Range: bytes={have}-\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: clutch-firstboot\r\n{range}Connection: close\r\n\r\n",
        u.path
    );
    s.write_all(req.as_bytes())
        .map_err(|e| retry(format!("sending the request to {addr}: {e}")))?;
    // The head, byte by byte up to the blank line (at most 16 KiB).
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 << 10 {
            return Err(fatal("the response headers are too long".into()));
        }
        let n = s.read(&mut b).map_err(|e| retry(e.to_string()))?;
        if n == 0 {
            return Err(retry(
                "the server closed the connection before answering".into(),
            ));
        }
        head.push(b[0]);
    }
    let h = parse_head(&String::from_utf8_lossy(&head[..head.len() - 4])).map_err(fatal)?;
    let (mut f, start, total) = match h.code {
        200 => {
            let f = std::fs::File::create(dest)
                .map_err(|e| fatal(format!("{}: {e}", dest.display())))?;
            (f, 0, h.content_length)
        }
        206 => {
            let (start, total) = h
                .range
                .ok_or_else(|| fatal("206 without Content-Range".into()))?;
            if start != have {
                return Err(fatal(format!(
                    "asked for bytes from {have}, got from {start}"
                )));
            }
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(dest)
                .map_err(|e| fatal(format!("{}: {e}", dest.display())))?;
            (f, have, total)
        }
        // Asked past the end: the file is complete (the checksum decides).
        416 if have > 0 => return Ok(have),
        404 => return Err(fatal(format!("{url}: not found (404)"))),
        c => return Err(fatal(format!("{url}: the server answered {c}"))),
    };
    if total.is_some_and(|t| t > limit) {
        return Err(fatal(format!(
            "{url} is {} bytes, more than the {limit} this file may have",
            total.unwrap_or(0)
        )));
    }
    let want = h.content_length;
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| retry(format!("reading {url}: {e}")))?;
        if n == 0 {
            break;
        }
        if start + got + n as u64 > limit {
            return Err(fatal(format!(
                "{url} is larger than the {limit} bytes it may have"
            )));
        }
        f.write_all(&buf[..n])
            .map_err(|e| fatal(format!("{}: {e}", dest.display())))?;
        got += n as u64;
        progress(start + got, total);
        if want.is_some_and(|w| got >= w) {
            break;
        }
    }
    f.sync_all().map_err(|e| fatal(e.to_string()))?;
    if let Some(w) = want {
        if got < w {
            return Err(retry(format!(
                "{url}: the connection ended after {got} of {w} bytes"
            )));
        }
    }
    Ok(start + got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn heads() {
        let h = parse_head(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 10-14/15",
        )
        .unwrap();
        assert_eq!(h.code, 206);
        assert_eq!(h.content_length, Some(5));
        assert_eq!(h.range, Some((10, Some(15))));
        assert!(parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked").is_err());
        assert!(parse_head("garbage").is_err());
    }

    /// A server that cuts the first answer short, then serves the rest by Range.
    #[test]
    fn a_broken_download_resumes_where_it_stopped() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let b2 = body.clone();
        let server = std::thread::spawn(move || {
            let mut ranges = Vec::new();
            for i in 0..2 {
                let (mut c, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut byte = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    c.read_exact(&mut byte).unwrap();
                    req.push(byte[0]);
                }
                let req = String::from_utf8(req).unwrap();
                let from: usize = req
                    .lines()
                    .find_map(|l| l.strip_prefix("Range: bytes="))
                    .map(|r| r.trim_end_matches('-').parse().unwrap())
                    .unwrap_or(0);
                ranges.push(from);
                if i == 0 {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b2.len());
                    c.write_all(head.as_bytes()).unwrap();
                    c.write_all(&b2[..70_000]).unwrap();
                } else {
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                        b2.len() - from,
                        b2.len() - 1,
                        b2.len()
                    );
                    c.write_all(head.as_bytes()).unwrap();
                    c.write_all(&b2[from..]).unwrap();
                }
            }
            ranges
        });
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("f");
        let mut seen = 0;
        let n = download(
            &format!("http://127.0.0.1:{port}/update/f"),
            &dest,
            1 << 20,
            &mut |done, _| seen = done,
        )
        .unwrap();
        assert_eq!(n, body.len() as u64);
        assert_eq!(seen, body.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(server.join().unwrap(), [0, 70_000]);
    }

    #[test]
    fn over_the_limit_is_refused_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
                .unwrap();
        });
        let d = tempfile::tempdir().unwrap();
        let e = download(
            &format!("http://127.0.0.1:{port}/x"),
            &d.path().join("x"),
            100,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(e.contains("more than the 100"), "{e}");
        server.join().unwrap();
    }
}
