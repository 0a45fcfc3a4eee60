//! `clutch serve DIR`: serves a netboot set (`pxe/` of a build) over HTTP/1.1.
//!
//! - Static files under DIR with `Content-Length`, `Accept-Ranges: bytes` and single byte
//!   ranges (`206 Partial Content`; `416` when unsatisfiable; several ranges in one request
//!   are answered with the whole file, which RFC 9110 allows). `HEAD` answers the headers only.
//! - `GET /config/<mac>`: the node config for one machine, `DIR/config/<mac12hex>.toml`, else
//!   `DIR/config/default.toml`, else the built `DIR/clutch.toml`. The MAC may be written with
//!   colons, hyphens or nothing between the bytes, in any case.
//! - Paths with `..`, `.`, empty segments, backslashes, NUL or a bad percent-encoding are
//!   refused with 400; files that resolve (through symlinks) outside DIR, folders and missing
//!   files are 404. No listings.
//! - One tracing line per request (method, path, status, bytes, peer, time).
//! - Bounded: at most [`MAX_CONNECTIONS`] connections at once ([`MAX_PER_PEER`] per client
//!   address; more wait in the kernel's backlog), request headers must arrive within
//!   [`HEADER_TIMEOUT`], and a connection that moves no byte for [`IDLE_TIMEOUT`] is closed,
//!   so a slow or silent client cannot hold the server.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};
use tokio::net::TcpListener;

/// The address `clutch serve` listens on unless told otherwise; boot.ipxe defaults to port
/// 8080 on the DHCP `next-server`, so dnsmasq and `clutch serve` on one host need no settings.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections served at once for one client address.
pub const MAX_PER_PEER: usize = 32;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection that moves no byte for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

type RespBody = BoxBody<Bytes, io::Error>;

/// Why a request path is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Malformed or traversing path: 400.
    BadPath(&'static str),
    /// Missing, a folder, or outside DIR: 404.
    NotFound,
}

/// Decodes `%XX` escapes; `None` on a bad escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The relative path a request path names, checked segment by segment (pure; no file access).
pub fn request_rel_path(uri_path: &str) -> Result<PathBuf, Reject> {
    let raw = uri_path
        .strip_prefix('/')
        .ok_or(Reject::BadPath("the path must start with /"))?;
    if raw.is_empty() {
        return Err(Reject::NotFound);
    }
    let decoded = percent_decode(raw).ok_or(Reject::BadPath("bad percent-encoding"))?;
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" => return Err(Reject::BadPath("empty path segment (or an absolute path)")),
            "." | ".." => return Err(Reject::BadPath("`.` and `..` are not allowed")),
            s if s.contains('\\') || s.contains('\0') => {
                return Err(Reject::BadPath("backslash or NUL in the path"));
            }
            s => rel.push(s),
        }
    }
    // Belt and braces: nothing but plain names may remain.
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Reject::BadPath("not a plain relative path"));
    }
    Ok(rel)
}

/// The file under `root` (canonical) that `rel` names, only if it is a regular file whose real
/// path, symlinks resolved, is still inside `root`.
pub fn resolve_in(root: &Path, rel: &Path) -> Result<PathBuf, Reject> {
    let p = root
        .join(rel)
        .canonicalize()
        .map_err(|_| Reject::NotFound)?;
    if !p.starts_with(root) {
        return Err(Reject::NotFound);
    }
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() => Ok(p),
        _ => Err(Reject::NotFound),
    }
}

/// A MAC address as 12 lowercase hex digits (`52:54:00:12:34:56`, `52-54-00-12-34-56`,
/// `525400123456`, any case), or `None`.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    let sep_ok = s.len() == 12 || s.len() == 17;
    (sep_ok && hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// Which files answer `/config/<mac>`, in order.
pub fn config_candidates(mac12: &str) -> [PathBuf; 3] {
    [
        PathBuf::from(format!("config/{mac12}.toml")),
        PathBuf::from("config/default.toml"),
        PathBuf::from("clutch.toml"),
    ]
}

/// The byte range to send for a `Range` header value and a file length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Send everything (no header, a header we do not handle, or several ranges).
    Full,
    /// Send `start..=end` with 206.
    Partial { start: u64, end: u64 },
    /// 416 Range Not Satisfiable.
    Unsatisfiable,
}

pub fn parse_range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(h) = header else {
        return RangeAnswer::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => RangeAnswer::Full,
        },
        // bytes=A-
        (false, true) => match parse(a) {
            Some(s) if s >= len => RangeAnswer::Unsatisfiable,
            Some(s) => RangeAnswer::Partial {
                start: s,
                end: len - 1,
            },
            None => RangeAnswer::Full,
        },
        // bytes=A-B
        (false, false) => match (parse(a), parse(b)) {
            (Some(s), Some(e)) if s > e => RangeAnswer::Full,
            (Some(s), Some(_)) if s >= len => RangeAnswer::Unsatisfiable,
            (Some(s), Some(e)) => RangeAnswer::Partial {
                start: s,
                end: e.min(len - 1),
            },
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

/// Streams `remaining` bytes of a file in 64 KiB frames.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = this.remaining.min(64 * 1024) as usize;
        this.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while it was being sent",
                    ))));
                }
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn empty() -> RespBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(msg.len() + 1));
    r
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()) {
        Some("toml") => "application/toml",
        Some("ipxe") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Answers with the file at `path` (inside the root), honouring Range and HEAD.
async fn send_file(path: &Path, head: bool, range: Option<&str>) -> io::Result<Response<RespBody>> {
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let (status, start, count) = match parse_range(range, len) {
        RangeAnswer::Full => (StatusCode::OK, 0, len),
        RangeAnswer::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return Ok(r);
        }
    };
    let body = if head || count == 0 {
        empty()
    } else {
        if start > 0 {
            file.seek(io::SeekFrom::Start(start)).await?;
        }
        FileBody {
            file,
            remaining: count,
            buf: Vec::new(),
        }
        .boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
                .expect("ascii"),
        );
    }
    Ok(r)
}

fn reject(r: Reject) -> Response<RespBody> {
    match r {
        Reject::BadPath(why) => text(StatusCode::BAD_REQUEST, &format!("bad path: {why}")),
        Reject::NotFound => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The answer to one request; `root` is canonical. Also says which file was sent (for the log).
async fn answer(root: &Path, req: &Request<Incoming>) -> (Response<RespBody>, Option<PathBuf>) {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return (r, None);
        }
    };
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let rel = match request_rel_path(req.uri().path()) {
        Ok(r) => r,
        Err(e) => return (reject(e), None),
    };
    let file = if let Ok(mac) = rel.strip_prefix("config") {
        match mac.to_str().filter(|m| !m.is_empty() && !m.contains('/')) {
            Some(m) if m.ends_with(".toml") => resolve_in(root, &rel),
            Some(m) => match normalize_mac(m) {
                Some(mac12) => config_candidates(&mac12)
                    .iter()
                    .find_map(|c| resolve_in(root, c).ok())
                    .ok_or(Reject::NotFound),
                None => Err(Reject::BadPath(
                    "/config/<mac> needs a MAC address (12 hex digits)",
                )),
            },
            None => Err(Reject::NotFound),
        }
    } else {
        resolve_in(root, &rel)
    };
    let file = match file {
        Ok(f) => f,
        Err(e) => return (reject(e), None),
    };
    match send_file(&file, head, range).await {
        Ok(r) => (r, Some(file)),
        Err(e) => {
            tracing::error!("reading {}: {e}", file.display());
            (
                text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file"),
                None,
            )
        }
    }
}

async fn handle(
    root: Arc<PathBuf>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let t = Instant::now();
    let (resp, file) = answer(&root, &req).await;
    let bytes = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let file = file
        .as_deref()
        .and_then(|f| f.strip_prefix(root.as_path()).ok())
        .map(|f| f.display().to_string())
        .unwrap_or_else(|| "-".into());
    tracing::info!(
        peer = %peer,
        method = %req.method(),
        path = %req.uri().path(),
        status = resp.status().as_u16(),
        bytes = %bytes,
        file = %file,
        ms = t.elapsed().as_millis() as u64,
        "request"
    );
    Ok(resp)
}

/// A stream that notes when it last moved a byte.
struct Tracked<S> {
    inner: S,
    last: Arc<std::sync::Mutex<Instant>>,
}

impl<S> Tracked<S> {
    fn touch(&self) {
        *self.last.lock().unwrap() = Instant::now();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The bounds of one server (the constants above, shorter in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub per_peer: usize,
    pub header_timeout: std::time::Duration,
    pub idle_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            per_peer: MAX_PER_PEER,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// Connections per client address.
struct PerPeer {
    max: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// Holds one of a peer's connection slots.
struct PeerSlot(Arc<PerPeer>, std::net::IpAddr);

impl PerPeer {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut m = self.open.lock().unwrap();
        let n = m.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.0.open.lock().unwrap();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves one connection until it ends, or moves nothing for the idle timeout.
async fn serve_conn(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    root: Arc<PathBuf>,
    limits: Limits,
) {
    let idle = limits.idle_timeout;
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let io = Tracked {
        inner: stream,
        last: last.clone(),
    };
    let svc = hyper::service::service_fn(move |req| handle(root.clone(), peer, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, "connection: {e}");
                }
                return;
            }
            _ = tokio::time::sleep(idle / 4) => {
                if last.lock().unwrap().elapsed() >= idle {
                    tracing::debug!(peer = %peer, "connection idle for {idle:?}: closed");
                    return;
                }
            }
        }
    }
}

/// Serves `dir` on an already bound listener until the future is dropped.
pub async fn serve_on(listener: TcpListener, dir: &Path) -> io::Result<()> {
    serve_with(listener, dir, Limits::default()).await
}

/// [`serve_on`] within `limits`.
pub async fn serve_with(listener: TcpListener, dir: &Path, limits: Limits) -> io::Result<()> {
    let root = Arc::new(dir.canonicalize()?);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let per_peer = Arc::new(PerPeer {
        max: limits.per_peer,
        open: Default::default(),
    });
    loop {
        // At the cap, wait: further clients queue in the listen backlog.
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(peer_slot) = per_peer.take(peer.ip()) else {
            tracing::warn!(peer = %peer, "more than {} connections from one address; closed", limits.per_peer);
            continue;
        };
        let root = root.clone();
        tokio::spawn(async move {
            serve_conn(stream, peer, root, limits).await;
            drop((permit, peer_slot));
        });
    }
}

/// What `clutch serve` checks before it starts: DIR is a folder, and a note when it does not
/// look like a netboot set.
pub fn check_dir(dir: &Path) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    let m = std::fs::metadata(dir).with_context(|| format!("cannot serve {}", dir.display()))?;
    if !m.is_dir() {
        anyhow::bail!("cannot serve {}: not a folder", dir.display());
    }
    let mut notes = Vec::new();
    if !dir.join("boot.ipxe").is_file() {
        let hint = if dir.join("pxe/boot.ipxe").is_file() {
            format!(" (did you mean {}?)", dir.join("pxe").display())
        } else {
            String::new()
        };
        notes.push(format!(
            "{} has no boot.ipxe: not a netboot set from `clutch build --format pxe`{hint}",
            dir.display()
        ));
    }
    Ok(notes)
}

/// `clutch serve`: binds `listen`, prints the URL on stdout, serves until SIGINT/SIGTERM.
pub fn run(dir: &Path, listen: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    for n in check_dir(dir)? {
        tracing::warn!("{n}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        eprintln!("clutch: serving {} on http://{addr}/", dir.display());
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(out, "http://{addr}/")?;
            out.flush()?;
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = serve_on(listener, dir) => r.context("serving")?,
            _ = tokio::signal::ctrl_c() => eprintln!("clutch: serve: interrupted, stopping"),
            _ = term.recv() => eprintln!("clutch: serve: terminated, stopping"),
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(
            parse_range(Some("bytes=0-3"), 10),
            Partial { start: 0, end: 3 }
        );
        assert_eq!(
            parse_range(Some("bytes=4-"), 10),
            Partial { start: 4, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            Partial { start: 7, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-100"), 10),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        // Not understood or several ranges: the whole file.
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("bytes=x-2"), 10), Full);
    }

    #[test]
    fn request_paths() {
        assert_eq!(
            request_rel_path("/boot.ipxe").unwrap(),
            PathBuf::from("boot.ipxe")
        );
        assert_eq!(
            request_rel_path("/config/a%20b.toml").unwrap(),
            PathBuf::from("config/a b.toml")
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a/%2E%2E/%2e%2e/x",
            "//etc/passwd",
            "/a//b",
            "/./a",
            "/a\\..\\b",
            "/%zz",
            "/a%00b",
            "/%2fetc/passwd",
        ] {
            assert!(
                matches!(request_rel_path(bad), Err(Reject::BadPath(_))),
                "{bad} accepted"
            );
        }
        assert_eq!(request_rel_path("/"), Err(Reject::NotFound));
    }

    #[test]
    fn macs() {
        let want = Some("525400123456".to_string());
        assert_eq!(normalize_mac("52:54:00:12:34:56"), want);
        assert_eq!(normalize_mac("52-54-00-12-34-56"), want);
        assert_eq!(normalize_mac("525400123456"), want);
        assert_eq!(normalize_mac("52:54:00:12:34:5G"), None);
        assert_eq!(normalize_mac("52:54:00:12:34"), None);
        assert_eq!(normalize_mac("default"), None);
    }

    /// A set with a file, per-MAC configs, and symlinks that stay in or leave the set.
    fn set() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("set");
        std::fs::create_dir_all(root.join("config")).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(root.join("rootfs.squashfs"), &data).unwrap();
        std::fs::write(root.join("clutch.toml"), "built\n").unwrap();
        std::fs::write(root.join("config/525400aabbcc.toml"), "node-a\n").unwrap();
        std::fs::write(t.path().join("secret"), "outside\n").unwrap();
        symlink("../secret", root.join("escape")).unwrap();
        symlink("/etc/passwd", root.join("abs-escape")).unwrap();
        symlink("rootfs.squashfs", root.join("inside")).unwrap();
        (t, root)
    }

    struct Server {
        addr: SocketAddr,
        _rt: tokio::runtime::Runtime,
    }

    fn start(root: &Path) -> Server {
        start_with(root, Limits::default())
    }

    fn start_with(root: &Path, limits: Limits) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let root = root.to_path_buf();
        rt.spawn(async move { serve_with(listener, &root, limits).await });
        Server { addr, _rt: rt }
    }

    /// Reads until the server closes; how long that took (None: still open at `max`).
    fn closed_after(
        s: &mut std::net::TcpStream,
        max: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let t = Instant::now();
        s.set_read_timeout(Some(max)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => return Some(t.elapsed()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(_) => return Some(t.elapsed()),
            }
        }
    }

    #[test]
    fn slow_silent_and_greedy_clients_are_bounded() {
        use std::time::Duration;
        let (_t, root) = set();
        let srv = start_with(
            &root,
            Limits {
                connections: 4,
                per_peer: 3,
                header_timeout: Duration::from_millis(400),
                idle_timeout: Duration::from_millis(800),
            },
        );
        // Half a request line, then silence: closed at the header timeout.
        let mut slow = std::net::TcpStream::connect(srv.addr).unwrap();
        slow.write_all(b"GET /clutch.toml HT").unwrap();
        let t = closed_after(&mut slow, Duration::from_secs(5)).expect("slow client closed");
        assert!(t < Duration::from_secs(2), "{t:?}");
        // A kept-alive connection that then says nothing: closed once idle.
        let mut idle = std::net::TcpStream::connect(srv.addr).unwrap();
        idle.write_all(b"GET /clutch.toml HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let t = closed_after(&mut idle, Duration::from_secs(5)).expect("idle connection closed");
        assert!(t < Duration::from_secs(3), "{t:?}");
        // One address may hold 3 connections; a 4th is closed at once, and the server
        // still answers once they are gone.
        let held: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(srv.addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut fourth = std::net::TcpStream::connect(srv.addr).unwrap();
        let t = closed_after(&mut fourth, Duration::from_millis(300)).expect("4th closed");
        assert!(t < Duration::from_millis(300));
        drop(held);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(req(srv.addr, "GET", "/clutch.toml", "").0, 200);
    }

    /// One raw HTTP/1.1 request; returns (status, headers lowercased, body).
    fn req(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
        let status = head[9..12].parse().unwrap();
        (status, head, all[split + 4..].to_vec())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::trim)
    }

    #[test]
    fn serves_files_ranges_and_head_over_loopback() {
        let (_t, root) = set();
        let srv = start(&root);
        let data = std::fs::read(root.join("rootfs.squashfs")).unwrap();

        let (st, h, body) = req(srv.addr, "GET", "/rootfs.squashfs", "");
        assert_eq!(st, 200);
        assert_eq!(header(&h, "content-length"), Some("200000"));
        assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
        assert_eq!(body, data);

        let (st, h, body) = req(
            srv.addr,
            "GET",
            "/rootfs.squashfs",
            "Range: bytes=100000-100009\r\n",
        );
        assert_eq!(st, 206);
        assert_eq!(header(&h, "content-length"), Some("10"));
        assert_eq!(
            header(&h, "content-range"),
            Some("bytes 100000-100009/200000")
        );
        assert_eq!(body, &data[100_000..100_010]);

        let (st, h, body) = req(srv.addr, "GET", "/inside", "Range: bytes=-5\r\n");
        assert_eq!(st, 206, "a symlink inside the set is fine");
        assert_eq!(
            header(&h, "content-range"),
            Some("bytes 199995-199999/200000")
        );
        assert_eq!(body, &data[199_995..]);

        let (st, h, _) = req(
            srv.addr,
            "GET",
            "/rootfs.squashfs",
            "Range: bytes=200000-\r\n",
        );
        assert_eq!(st, 416);
        assert_eq!(header(&h, "content-range"), Some("bytes */200000"));

        let (st, h, body) = req(srv.addr, "HEAD", "/rootfs.squashfs", "");
        assert_eq!(st, 200);
        assert_eq!(header(&h, "content-length"), Some("200000"));
        assert!(body.is_empty());

        let (st, _, _) = req(
            srv.addr,
            "POST",
            "/rootfs.squashfs",
            "Content-Length: 0\r\n",
        );
        assert_eq!(st, 405);
    }

    #[test]
    fn refuses_traversal_and_escaping_symlinks() {
        let (_t, root) = set();
        let srv = start(&root);
        for p in [
            "/../secret",
            "/config/../../secret",
            "/%2e%2e/secret",
            "/..%2fsecret",
            "//etc/passwd",
        ] {
            let (st, _, body) = req(srv.addr, "GET", p, "");
            assert_eq!(st, 400, "{p}");
            assert!(!String::from_utf8_lossy(&body).contains("outside"));
        }
        for p in ["/escape", "/abs-escape", "/missing", "/config", "/"] {
            let (st, _, body) = req(srv.addr, "GET", p, "");
            assert_eq!(st, 404, "{p}");
            assert!(!String::from_utf8_lossy(&body).contains("outside"));
        }
    }

    #[test]
    fn config_per_mac_then_default_then_built() {
        let (_t, root) = set();
        let srv = start(&root);
        let get = |p: &str| {
            let (st, _, b) = req(srv.addr, "GET", p, "");
            (st, String::from_utf8(b).unwrap())
        };
        assert_eq!(get("/config/52:54:00:AA:BB:CC"), (200, "node-a\n".into()));
        assert_eq!(get("/config/52-54-00-aa-bb-cc"), (200, "node-a\n".into()));
        assert_eq!(get("/config/525400000001"), (200, "built\n".into()));
        std::fs::write(root.join("config/default.toml"), "default\n").unwrap();
        assert_eq!(get("/config/525400000001"), (200, "default\n".into()));
        assert_eq!(get("/config/not-a-mac").0, 400);
        assert_eq!(get("/config/default.toml"), (200, "default\n".into()));
        std::fs::remove_file(root.join("config/default.toml")).unwrap();
        std::fs::remove_file(root.join("clutch.toml")).unwrap();
        assert_eq!(get("/config/525400000001").0, 404);
    }

    #[test]
    fn check_dir_notes_a_build_folder() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("pxe")).unwrap();
        std::fs::write(t.path().join("pxe/boot.ipxe"), "#!ipxe\n").unwrap();
        let n = check_dir(t.path()).unwrap();
        assert!(n[0].contains("did you mean"), "{n:?}");
        assert!(check_dir(&t.path().join("pxe")).unwrap().is_empty());
        assert!(check_dir(&t.path().join("nope")).is_err());
    }
}
