//! Deciding whether an offered release may be applied, before anything is written: the
//! Ed25519 signature of `SHA256SUMS` under the key the image carries, each file against
//! `SHA256SUMS`, `release.json` against this image (board, architecture, scheme), and the
//! release against the running one and the ones that failed here.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use clutch_config::Release;
use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Why a release is not applied. Each says it plainly, for the status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("SHA256SUMS.sig is missing or not a 64-byte Ed25519 signature (an unsigned release)")]
    Unsigned,
    #[error(
        "SHA256SUMS is not signed by this image's release key (a wrongly signed or altered release)"
    )]
    BadSignature,
    #[error("the image's release key {path} is unusable: {detail}")]
    Key { path: String, detail: String },
    #[error("SHA256SUMS line {line} is not `<sha256>  <name>`")]
    Sums { line: usize },
    #[error("{name} is not listed in SHA256SUMS")]
    Unlisted { name: String },
    #[error("{name} does not match SHA256SUMS ({got} bytes received): truncated or altered")]
    Mismatch { name: String, got: u64 },
    #[error("release.json is unreadable: {0}")]
    Info(String),
    #[error("the release is for {what} `{offered}`, this node is `{mine}`")]
    Foreign {
        what: &'static str,
        offered: String,
        mine: String,
    },
    #[error("release {offered} is older than the running release {running}")]
    Older { offered: Release, running: Release },
    #[error("release {offered} failed on this node before: {reason}")]
    FailedHere { offered: Release, reason: String },
}

/// `SHA256SUMS`, parsed: name -> sha256 (lower-case hex).
pub fn parse_sums(text: &str) -> Result<BTreeMap<String, String>, Refusal> {
    let mut m = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let bad = || Refusal::Sums { line: i + 1 };
        let (h, n) = l.split_once("  ").ok_or_else(bad)?;
        let n = n.strip_prefix('*').unwrap_or(n);
        let name_ok = !n.is_empty()
            && !n.contains('/')
            && !n.starts_with('.')
            && n.chars().all(|c| c.is_ascii_graphic());
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) || !name_ok {
            return Err(bad());
        }
        m.insert(n.to_string(), h.to_ascii_lowercase());
    }
    Ok(m)
}

/// Loads the image's public key (SubjectPublicKeyInfo PEM).
pub fn load_key(path: &Path) -> Result<VerifyingKey, Refusal> {
    let key_err = |detail: String| Refusal::Key {
        path: path.display().to_string(),
        detail,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| key_err(e.to_string()))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| key_err(e.to_string()))
}

/// Checks `sig` over `sums` (strict Ed25519: no malleable signatures).
pub fn check_signature(key: &VerifyingKey, sums: &[u8], sig: &[u8]) -> Result<(), Refusal> {
    let sig = Signature::from_slice(sig).map_err(|_| Refusal::Unsigned)?;
    key.verify_strict(sums, &sig)
        .map_err(|_| Refusal::BadSignature)
}

/// sha256 and length of a file.
pub fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Is the file at `path` the one `SHA256SUMS` lists as `name`?
pub fn check_file(sums: &BTreeMap<String, String>, name: &str, path: &Path) -> Result<(), Refusal> {
    let want = sums.get(name).ok_or_else(|| Refusal::Unlisted {
        name: name.to_string(),
    })?;
    let (got, len) = file_digest(path).unwrap_or_default();
    if &got != want {
        return Err(Refusal::Mismatch {
            name: name.to_string(),
            got: len,
        });
    }
    Ok(())
}

/// `release.json` as the builder writes it.
pub use clutch_config::ab::ReleaseInfo;

/// What the node knows about its own image (`/usr/lib/clutch/ab.json`).
pub use clutch_config::ab::AbInfo;

/// The verdict on an offered release: `Ok(true)` to apply, `Ok(false)` when it is the
/// running one (nothing to do).
pub fn judge(
    info: &ReleaseInfo,
    me: &AbInfo,
    running: &Release,
    failed_here: Option<&str>,
) -> Result<bool, Refusal> {
    for (what, offered, mine) in [
        ("board", &info.board, &me.board),
        ("architecture", &info.arch, &me.arch),
        ("A/B scheme", &info.scheme, &me.scheme),
    ] {
        if offered != mine {
            return Err(Refusal::Foreign {
                what,
                offered: offered.clone(),
                mine: mine.clone(),
            });
        }
    }
    if &info.release == running {
        return Ok(false);
    }
    if &info.release < running {
        return Err(Refusal::Older {
            offered: info.release.clone(),
            running: running.clone(),
        });
    }
    if let Some(reason) = failed_here {
        return Err(Refusal::FailedHere {
            offered: info.release.clone(),
            reason: reason.to_string(),
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn r(s: &str) -> Release {
        Release::try_from(s).unwrap()
    }

    #[test]
    fn only_the_image_key_over_these_exact_bytes_passes() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let sums = b"00  a\n";
        let sig = k.sign(sums).to_bytes();
        let vk = k.verifying_key();
        assert_eq!(check_signature(&vk, sums, &sig), Ok(()));
        assert_eq!(
            check_signature(&vk, b"00  b\n", &sig),
            Err(Refusal::BadSignature)
        );
        let wrong = other.sign(sums).to_bytes();
        assert_eq!(
            check_signature(&vk, sums, &wrong),
            Err(Refusal::BadSignature)
        );
        assert_eq!(check_signature(&vk, sums, b""), Err(Refusal::Unsigned));
        assert_eq!(
            check_signature(&vk, sums, &sig[..63]),
            Err(Refusal::Unsigned)
        );
    }

    #[test]
    fn sums_refuse_paths_and_odd_lines() {
        let h = "a".repeat(64);
        let m = parse_sums(&format!("{h}  x.xz\n{h}  *y\n\n")).unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.contains_key("y"));
        for bad in [
            format!("{h}  ../etc/shadow\n"),
            format!("{h}  a/b\n"),
            format!("{h} x\n"),
            "zz  x\n".to_string(),
            format!("{h}  .hidden\n"),
        ] {
            assert!(parse_sums(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_truncated_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"whole").unwrap();
        let (h, _) = file_digest(&f).unwrap();
        let sums: BTreeMap<_, _> = [("x".to_string(), h)].into();
        assert_eq!(check_file(&sums, "x", &f), Ok(()));
        std::fs::write(&f, b"who").unwrap();
        let e = check_file(&sums, "x", &f).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x does not match SHA256SUMS (3 bytes received): truncated or altered"
        );
        assert!(matches!(
            check_file(&sums, "y", &f),
            Err(Refusal::Unlisted { .. })
        ));
    }

    #[test]
    fn judging_an_offer() {
        let me = AbInfo {
            scheme: "systemd-boot".into(),
            board: "amd64".into(),
            arch: "amd64".into(),
            release: r("2"),
        };
        let info = |rel: &str, board: &str| ReleaseInfo {
            format: 1,
            release: r(rel),
            board: board.into(),
            arch: "amd64".into(),
            scheme: "systemd-boot".into(),
            files: vec![],
            root_bytes: 1,
        };
        assert_eq!(judge(&info("3", "amd64"), &me, &r("2"), None), Ok(true));
        assert_eq!(judge(&info("2", "amd64"), &me, &r("2"), None), Ok(false));
        assert!(matches!(
            judge(&info("1", "amd64"), &me, &r("2"), None),
            Err(Refusal::Older { .. })
        ));
        assert!(matches!(
            judge(&info("3", "rpi4"), &me, &r("2"), None),
            Err(Refusal::Foreign { what: "board", .. })
        ));
        let e = judge(&info("3", "amd64"), &me, &r("2"), Some("kernel panic")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "release 3 failed on this node before: kernel panic"
        );
    }
}
