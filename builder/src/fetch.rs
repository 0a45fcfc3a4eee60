//! Every download of the builder goes through here: a pinned sha256 is checked and the blob
//! is kept in a content-addressed cache (`<cache>/blobs/sha256/<hex>`), so a second build
//! never downloads again and a tampered or truncated download never reaches an image.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{0}` is not a sha256 (64 hex digits)")]
    BadDigest(String),
    #[error("downloading {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("downloading {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: sha256 is {actual}, but {expected} is pinned; the file was not kept")]
    Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported URL scheme in `{0}` (http, https and file are supported)")]
    Scheme(String),
}

pub struct Fetcher {
    dir: PathBuf,
    client: reqwest::blocking::Client,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Fetcher {
    pub fn new(cache: &Path) -> Result<Self, FetchError> {
        let dir = cache.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .timeout(Duration::from_secs(30 * 60))
            .user_agent(concat!("clutch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| FetchError::Http {
                url: String::new(),
                source,
            })?;
        Ok(Fetcher { dir, client })
    }

    /// The cached blob for `sha256`, downloading it from `url` first if needed.
    pub fn fetch(&self, url: &str, sha256: &str) -> Result<PathBuf, FetchError> {
        let want = sha256.to_ascii_lowercase();
        if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FetchError::BadDigest(sha256.into()));
        }
        let dest = self.dir.join(&want);
        if dest.is_file() {
            // Re-hash on use: a cache on a bad disk must not poison images.
            if hash_file(&dest)? == want {
                tracing::debug!(url, "fetch: cache hit");
                return Ok(dest);
            }
            tracing::warn!(path = %dest.display(), "cached blob is corrupt; downloading again");
            let _ = std::fs::remove_file(&dest);
        }
        let tmp = self
            .dir
            .join(format!(".{want}.{}.part", std::process::id()));
        let result = self.download(url, &tmp);
        let actual = match result {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if actual != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchError::Mismatch {
                url: url.into(),
                expected: want,
                actual,
            });
        }
        std::fs::rename(&tmp, &dest).map_err(io_err(&dest))?;
        crate::atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        tracing::info!(url, "fetched and verified");
        Ok(dest)
    }

    /// Streams `url` into `tmp`, returning the sha256 of what was written.
    fn download(&self, url: &str, tmp: &Path) -> Result<String, FetchError> {
        let mut out = File::create(tmp).map_err(io_err(tmp))?;
        let mut hasher = Sha256::new();
        let mut reader: Box<dyn Read> = if let Some(path) = url.strip_prefix("file://") {
            Box::new(File::open(path).map_err(io_err(Path::new(path)))?)
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let resp = self
                .client
                .get(url)
                .send()
                .map_err(|source| FetchError::Http {
                    url: url.into(),
                    source,
                })?;
            if !resp.status().is_success() {
                return Err(FetchError::Status {
                    url: url.into(),
                    status: resp.status().as_u16(),
                });
            }
            Box::new(resp)
        } else {
            return Err(FetchError::Scheme(url.into()));
        };
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(io_err(tmp))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(tmp))?;
        }
        out.sync_all().map_err(io_err(tmp))?;
        Ok(hex::encode(hasher.finalize()))
    }
}

pub fn hash_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(io_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// A one-file HTTP server on loopback for tests of everything that downloads.
#[cfg(test)]
pub(crate) mod test_http {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A one-file HTTP server on loopback that counts requests (answers at most 8).
    pub struct Server {
        pub url: String,
        pub hits: Arc<AtomicUsize>,
    }

    pub fn serve(body: &'static [u8]) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/blob", l.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten().take(8) {
                h.fetch_add(1, Ordering::SeqCst);
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let mut w = &s;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = w.write_all(body);
            }
        });
        Server { url, hits }
    }
}

#[cfg(test)]
mod tests {
    use super::test_http::serve;
    use super::*;
    use std::sync::atomic::Ordering;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn downloads_verifies_and_caches() {
        let cache = tempfile::tempdir().unwrap();
        let s = serve(b"k3s binary stand-in");
        let f = Fetcher::new(cache.path()).unwrap();
        let p = f.fetch(&s.url, &sha(b"k3s binary stand-in")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"k3s binary stand-in");
        assert!(p.starts_with(cache.path().join("blobs/sha256")));
        // Second fetch is served from the cache: no new request.
        let p2 = f.fetch(&s.url, &sha(b"k3s binary stand-in")).unwrap();
        assert_eq!(p, p2);
        assert_eq!(s.hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn mismatch_keeps_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let s = serve(b"tampered");
        let f = Fetcher::new(cache.path()).unwrap();
        let want = sha(b"original");
        let e = f.fetch(&s.url, &want).unwrap_err();
        assert!(matches!(e, FetchError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains(&want));
        let left: Vec<_> = std::fs::read_dir(cache.path().join("blobs/sha256"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "nothing may stay behind: {left:?}");
    }

    #[test]
    fn corrupt_cache_entry_is_refetched() {
        let cache = tempfile::tempdir().unwrap();
        let s = serve(b"payload");
        let f = Fetcher::new(cache.path()).unwrap();
        let p = f.fetch(&s.url, &sha(b"payload")).unwrap();
        std::fs::write(&p, b"bitrot").unwrap();
        let p = f.fetch(&s.url, &sha(b"payload")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"payload");
        assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn bad_digest_and_scheme() {
        let cache = tempfile::tempdir().unwrap();
        let f = Fetcher::new(cache.path()).unwrap();
        assert!(matches!(
            f.fetch("http://x", "abc"),
            Err(FetchError::BadDigest(_))
        ));
        assert!(matches!(
            f.fetch("ftp://x", &"0".repeat(64)),
            Err(FetchError::Scheme(_))
        ));
    }
}
