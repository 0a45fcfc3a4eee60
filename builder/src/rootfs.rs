//! The Debian root filesystem: built once with mmdebstrap, cached as a tarball keyed by a
//! hash of everything that shapes it (suite, arch, mirror, components, packages, recipe), so
//! builds that change only user settings reuse it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clutch_config::{Board, Engine, Format, ImageConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{atomic, cmd};

/// Bump when the way a root filesystem is made changes, so old cache entries are not reused.
const RECIPE: u32 = 1;

/// What every clutch image has, whatever the board.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "openssh-server",
    "sudo",
    "e2fsprogs",
    "iproute2",
    "kmod",
    "tzdata",
    "ca-certificates",
];

/// Packages an output format needs in the root filesystem. `pxe`: Debian's live-boot, whose
/// initramfs hooks (run when it is installed) put DHCP, busybox `wget` and the network drivers
/// into the kernel's initrd, so `boot=live fetch=<url>` can download and mount the squashfs.
pub fn format_packages(format: Format) -> &'static [&'static str] {
    match format {
        Format::Pxe => &["live-boot", "live-boot-initramfs-tools"],
        _ => &[],
    }
}

/// Packages an engine needs on the node.
pub fn engine_packages(engine: Engine) -> &'static [&'static str] {
    match engine {
        Engine::Etcd => &["etcd-server", "etcd-client"],
        Engine::K3s => &["iptables"],
        Engine::None => &[],
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RootfsSpec {
    pub recipe: u32,
    pub suite: String,
    pub arch: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub packages: BTreeSet<String>,
    /// Set (to `foreign::FOREIGN_RECIPE`) when the root filesystem is for another
    /// architecture than the host's and is built under emulation with extra hooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign: Option<u32>,
    /// The board's dpkg path-exclude and path-include patterns (in the key only when set,
    /// so boards without them keep their cache entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_include: Vec<String>,
}

impl RootfsSpec {
    pub fn new(cfg: &ImageConfig, board: &Board) -> Self {
        let mut packages: BTreeSet<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        let board_pkgs = board
            .kernel_packages
            .iter()
            .chain(&board.firmware_packages)
            .chain(&board.packages)
            .chain(
                cfg.wifi
                    .as_ref()
                    .map(|_| &board.wifi_packages)
                    .into_iter()
                    .flatten(),
            );
        packages.extend(board_pkgs.map(|p| p.to_string()));
        if let Some(c) = &cfg.cluster {
            packages.extend(engine_packages(c.engine).iter().map(|s| s.to_string()));
        }
        packages.extend(cfg.packages.iter().map(|p| p.to_string()));
        RootfsSpec {
            recipe: RECIPE,
            suite: cfg.suite.to_string(),
            arch: board.arch.clone(),
            mirror: cfg.mirror().to_string(),
            components: board.components.clone(),
            packages,
            foreign: (board.arch != crate::cross::host_arch())
                .then_some(crate::foreign::FOREIGN_RECIPE),
            path_exclude: board.dpkg_path_exclude.clone(),
            path_include: board.dpkg_path_include.clone(),
        }
    }

    /// Adds what the requested output formats need (only `pxe` needs anything), so images
    /// built without `pxe` keep their cache key.
    pub fn with_formats(mut self, formats: &[Format]) -> Self {
        for f in formats {
            self.packages
                .extend(format_packages(*f).iter().map(|s| s.to_string()));
        }
        self
    }

    /// The cache key: sha256 over the canonical JSON of the spec.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("spec serialises");
        hex::encode(Sha256::digest(json))[..24].to_string()
    }
}

/// Returns the cached tarball for `spec`, building it first when absent. The bool says
/// whether it came from the cache.
pub fn ensure(cache: &Path, spec: &RootfsSpec) -> Result<(PathBuf, bool)> {
    let dir = cache.join("rootfs");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = spec.key();
    let tar = dir.join(format!("{key}.tar"));
    if tar.is_file() {
        return Ok((tar, true));
    }
    let tmp = atomic::temp_path(&tar);
    // A build killed mid-way (power cut, CI timeout) leaves its partial tarball behind.
    let _ = std::fs::remove_file(&tmp);
    let mut guard = atomic::TempGuard::new(tmp.clone());
    if spec.foreign.is_some() {
        crate::foreign::ensure_binfmt(&spec.arch)?;
    }
    let pkgs: Vec<&str> = spec.packages.iter().map(String::as_str).collect();
    let mut c = Command::new("mmdebstrap");
    if spec.foreign.is_some() {
        c.args(crate::foreign::mmdebstrap_args());
    }
    c.arg("--mode=root")
        .arg("--variant=apt")
        .arg("--format=tar")
        .arg(format!("--architectures={}", spec.arch))
        .arg(format!("--components={}", spec.components.join(",")))
        .arg(format!("--include={}", pkgs.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        // Documentation and translations are dead weight on an appliance.
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        .arg("--dpkgopt=path-exclude=/usr/share/info/*")
        .args(board_path_filters(spec))
        .arg(&spec.suite)
        .arg(&tmp)
        .arg(&spec.mirror);
    cmd::run(&mut c).context("building the root filesystem with mmdebstrap")?;
    atomic::commit(&tmp, &tar)?;
    guard.disarm();
    let meta = serde_json::to_vec_pretty(spec)?;
    atomic::write(&dir.join(format!("{key}.json")), &meta)?;
    Ok((tar, false))
}

/// The board's own dpkg path filters, excludes first (dpkg: the last matching one wins).
pub fn board_path_filters(spec: &RootfsSpec) -> Vec<String> {
    let ex = spec
        .path_exclude
        .iter()
        .map(|p| format!("--dpkgopt=path-exclude={p}"));
    let inc = spec
        .path_include
        .iter()
        .map(|p| format!("--dpkgopt=path-include={p}"));
    ex.chain(inc).collect()
}

/// Unpacks a cached root filesystem into `dest` (which must exist and be empty).
pub fn extract(tar: &Path, dest: &Path) -> Result<()> {
    cmd::run(
        Command::new("tar")
            .arg("--extract")
            .arg("--numeric-owner")
            .arg("--preserve-permissions")
            .arg("--xattrs")
            .arg("--xattrs-include=*")
            .arg("--file")
            .arg(tar)
            .arg("--directory")
            .arg(dest),
    )
    .with_context(|| format!("unpacking {}", tar.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::image_config as cfg;

    fn board() -> Board {
        crate::testutil::board("amd64")
    }

    #[test]
    fn key_ignores_user_settings_but_not_packages() {
        let b = board();
        let a = RootfsSpec::new(&cfg(""), &b);
        let mut with_user = cfg("");
        with_user.user.as_mut().unwrap().sudo = false;
        with_user.system.hostname = "other-{id}".to_string().try_into().unwrap();
        assert_eq!(a.key(), RootfsSpec::new(&with_user, &b).key());
        let more = RootfsSpec::new(&cfg("packages = [\"htop\"]"), &b);
        assert_ne!(a.key(), more.key());
        assert!(more.packages.contains("htop"));
        let other_suite = RootfsSpec::new(&cfg("suite = \"bookworm\""), &b);
        assert_ne!(a.key(), other_suite.key());
    }

    #[test]
    fn board_path_filters_change_only_their_boards_key() {
        let b = board();
        let plain = RootfsSpec::new(&cfg(""), &b);
        assert!(plain.path_exclude.is_empty());
        assert!(!serde_json::to_string(&plain).unwrap().contains("path_"));
        let rpi = crate::testutil::board("rpi4");
        let s = RootfsSpec::new(&cfg(""), &rpi);
        let f = board_path_filters(&s);
        let first_include = f.iter().position(|a| a.contains("path-include")).unwrap();
        assert!(
            f[..first_include]
                .iter()
                .all(|a| a.contains("path-exclude")),
            "{f:?}"
        );
        assert!(f.contains(&"--dpkgopt=path-include=/usr/lib/linux-image-*/broadcom/*".into()));
        let rpi3 = crate::testutil::board("rpi3");
        assert_eq!(
            s.key(),
            RootfsSpec::new(&cfg(""), &rpi3).key(),
            "rpi3 and rpi4 share one root filesystem"
        );
    }

    #[test]
    fn pxe_adds_live_boot_and_changes_the_key_only_for_pxe() {
        let b = board();
        let plain = RootfsSpec::new(&cfg(""), &b);
        let disk = plain
            .clone()
            .with_formats(&[Format::Raw, Format::Qcow2, Format::Zst]);
        assert_eq!(plain.key(), disk.key());
        let pxe = plain.clone().with_formats(&[Format::Raw, Format::Pxe]);
        assert_ne!(plain.key(), pxe.key());
        assert!(pxe.packages.contains("live-boot"));
        assert!(pxe.packages.contains("live-boot-initramfs-tools"));
    }

    #[test]
    fn engine_and_board_packages_are_included() {
        let c = cfg(
            "[cluster]\nname = \"lab\"\nengine = \"etcd\"\ntoken = \"0123456789abcdef0123456789abcdef\"",
        );
        let s = RootfsSpec::new(&c, &board());
        for p in [
            "etcd-server",
            "etcd-client",
            "linux-image-amd64",
            "systemd-boot-efi",
            "openssh-server",
        ] {
            assert!(s.packages.contains(p), "{p} missing");
        }
        let mut b = board();
        b.wifi_packages = vec!["firmware-brcm80211".to_string().try_into().unwrap()];
        let without = RootfsSpec::new(&c, &b);
        assert!(
            !without.packages.contains("firmware-brcm80211"),
            "wifi packages only with [wifi]"
        );
        let wifi = cfg("[wifi]\nssid = \"x\"\npsk = \"long enough\"\ncountry = \"GB\"");
        assert!(
            RootfsSpec::new(&wifi, &b)
                .packages
                .contains("firmware-brcm80211")
        );
    }
}
