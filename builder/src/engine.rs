//! Binaries a cluster engine needs that Debian does not package (k3s): pinned by sha256,
//! fetched through `fetch` (content-addressed cache), installed into the staged tree.
//! etcd comes from Debian (`rootfs::engine_packages`); `none` needs nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clutch_config::Engine;

use crate::fetch::Fetcher;

/// The k3s release the builder pins (sha256 from the release's sha256sum-<arch>.txt).
pub const K3S_VERSION: &str = "v1.29.15+k3s1";
const K3S_BASE: &str = "https://github.com/k3s-io/k3s/releases/download/v1.29.15%2Bk3s1";
const K3S_PINS: &[(&str, &str, &str)] = &[
    (
        "amd64",
        "k3s",
        "149288dc0012e36658b1b2dbdf4420a269833aede501e18727214301cd28b92c",
    ),
    (
        "arm64",
        "k3s-arm64",
        "2bcf38ebea5e75a69518dc668b546f23409924cc1a023f38ee2ba7a3849cab3a",
    ),
];

/// Where the k3s engine (cluster crate) expects the binary.
pub const K3S_PATH: &str = "usr/local/bin/k3s";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub url: String,
    pub sha256: String,
}

/// The download for `engine` on `arch`, if it needs one. `CLUTCH_K3S_URL` together with
/// `CLUTCH_K3S_SHA256` replace the pin (a local mirror, an air-gapped build, tests).
pub fn pinned(
    engine: Engine,
    arch: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Pinned>> {
    if engine != Engine::K3s {
        return Ok(None);
    }
    match (env("CLUTCH_K3S_URL"), env("CLUTCH_K3S_SHA256")) {
        (Some(url), Some(sha256)) => return Ok(Some(Pinned { url, sha256 })),
        (Some(_), None) | (None, Some(_)) => {
            bail!("set both CLUTCH_K3S_URL and CLUTCH_K3S_SHA256 to use another k3s binary")
        }
        (None, None) => {}
    }
    let Some((_, file, sha)) = K3S_PINS.iter().find(|(a, _, _)| *a == arch) else {
        bail!(
            "no pinned k3s {K3S_VERSION} binary for architecture {arch}; set CLUTCH_K3S_URL and CLUTCH_K3S_SHA256"
        )
    };
    Ok(Some(Pinned {
        url: format!("{K3S_BASE}/{file}"),
        sha256: sha.to_string(),
    }))
}

/// Fetches (or takes from the cache) what the engine needs and installs it under `root`.
/// `env` reads the override variables (`|k| std::env::var(k).ok()` in the builder).
pub fn install(
    root: &Path,
    engine: Engine,
    arch: &str,
    fetcher: &Fetcher,
    env: impl Fn(&str) -> Option<String>,
) -> Result<()> {
    let Some(p) = pinned(engine, arch, env)? else {
        return Ok(());
    };
    let blob = fetcher
        .fetch(&p.url, &p.sha256)
        .with_context(|| format!("fetching k3s {K3S_VERSION} for {arch}"))?;
    let dest = root.join(K3S_PATH);
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    std::fs::copy(&blob, &dest).with_context(|| format!("installing {}", dest.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::test_http::serve;
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_k3s_needs_a_download_and_it_is_pinned_per_arch() {
        let none = |_: &str| None;
        assert_eq!(pinned(Engine::Etcd, "amd64", none).unwrap(), None);
        assert_eq!(pinned(Engine::None, "arm64", none).unwrap(), None);
        let a = pinned(Engine::K3s, "amd64", none).unwrap().unwrap();
        assert!(a.url.ends_with("/k3s") && a.sha256.len() == 64, "{a:?}");
        let b = pinned(Engine::K3s, "arm64", none).unwrap().unwrap();
        assert!(
            b.url.ends_with("/k3s-arm64") && b.sha256 != a.sha256,
            "{b:?}"
        );
        assert!(pinned(Engine::K3s, "riscv64", none).is_err());
        let half = |k: &str| (k == "CLUTCH_K3S_URL").then(|| "http://x".to_string());
        assert!(pinned(Engine::K3s, "amd64", half).is_err());
    }

    #[test]
    fn installs_the_verified_binary_from_a_local_server() {
        let body: &'static [u8] = b"#!/bin/sh\necho k3s stand-in\n";
        let server = serve(body);
        let sha = hex::encode(Sha256::digest(body));
        let cache = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let f = Fetcher::new(cache.path()).unwrap();
        let env = |k: &str| match k {
            "CLUTCH_K3S_URL" => Some(server.url.clone()),
            "CLUTCH_K3S_SHA256" => Some(sha.clone()),
            _ => None,
        };
        install(root.path(), Engine::K3s, "amd64", &f, env).unwrap();
        let k3s = root.path().join(K3S_PATH);
        assert_eq!(std::fs::read(&k3s).unwrap(), body);
        assert_eq!(
            std::fs::metadata(&k3s).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Engines without downloads install nothing.
        let other = tempfile::tempdir().unwrap();
        install(other.path(), Engine::Etcd, "amd64", &f, |_| None).unwrap();
        assert!(!other.path().join(K3S_PATH).exists());
        // A wrong pin is refused and nothing is installed from it.
        let bad = f.fetch(&server.url, &"0".repeat(64)).unwrap_err();
        assert!(bad.to_string().contains("pinned"), "{bad}");
    }
}
