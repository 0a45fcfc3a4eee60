//! `clutch-firstboot` for a foreign architecture (aarch64 on an amd64 host), built from the
//! clutch sources without rustup targets and without the internet:
//!
//! 1. A toolchain root: Debian trixie amd64 with `rustc`, `cargo`, `libstd-rust-dev:<arch>`
//!    (multiarch) and the GNU cross linker, made once with mmdebstrap and kept as a folder in
//!    `<cache>/toolchain/<key>/` (trixie's rustc is 1.85, the firstboot crate's MSRV).
//! 2. The sources: `config/`, `cluster/`, `firstboot/` with a workspace manifest that names
//!    only them, and their dependencies vendored with the host's `cargo vendor` (from the
//!    host's registry cache when it has them), in `<cache>/cross/src/`.
//! 3. The build: `cargo build --offline --release --target <triple> -p clutch-firstboot`
//!    chrooted into the toolchain root, in a private mount and network namespace
//!    (`unshare --mount --net`), with `<cache>/cross` bind-mounted at `/build` so the
//!    target folder (incremental rebuilds) outlives the namespace and nothing is left mounted.
//! 4. The binary is kept in `<cache>/firstboot/<key>/`, keyed by a hash of the sources, the
//!    lock file and the toolchain, so a warm build does no compiling at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{atomic, cmd};

/// Bump when the way the toolchain root is made changes.
const TOOLCHAIN_RECIPE: u32 = 1;
/// The Debian suite whose rustc builds firstboot (trixie: rustc 1.85 = the crate's MSRV).
pub const TOOLCHAIN_SUITE: &str = "trixie";
/// The crates firstboot is made of, relative to the source tree.
pub const CRATES: &[&str] = &["os", "config", "cluster", "firstboot"];

/// How to cross-build for one Debian architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrossTarget {
    pub debian_arch: String,
    pub triple: String,
    pub linker: String,
    /// Packages for the toolchain root besides rustc and cargo.
    pub packages: Vec<String>,
}

/// The cross target for a Debian architecture; `None` when clutch cannot cross-build for it.
pub fn cross_target(debian_arch: &str) -> Option<CrossTarget> {
    let (triple, gnu) = match debian_arch {
        "arm64" => ("aarch64-unknown-linux-gnu", "aarch64-linux-gnu"),
        "armhf" => ("armv7-unknown-linux-gnueabihf", "arm-linux-gnueabihf"),
        "amd64" => ("x86_64-unknown-linux-gnu", "x86_64-linux-gnu"),
        _ => return None,
    };
    Some(CrossTarget {
        debian_arch: debian_arch.into(),
        triple: triple.into(),
        linker: format!("{gnu}-gcc"),
        packages: vec![
            format!("libstd-rust-dev:{debian_arch}"),
            format!("gcc-{gnu}"),
            format!("libc6-dev-{debian_arch}-cross"),
        ],
    })
}

/// The Debian architecture of this machine (what the host's binaries are).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        "x86" => "i386",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        other => other,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ToolchainSpec {
    pub recipe: u32,
    pub suite: String,
    pub mirror: String,
    pub host_arch: String,
    pub target: CrossTarget,
}

impl ToolchainSpec {
    pub fn new(mirror: &str, target: CrossTarget) -> Self {
        ToolchainSpec {
            recipe: TOOLCHAIN_RECIPE,
            suite: TOOLCHAIN_SUITE.into(),
            mirror: mirror.into(),
            host_arch: host_arch().into(),
            target,
        }
    }

    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("spec serialises");
        hex::encode(Sha256::digest(json))[..24].to_string()
    }

    /// The mmdebstrap command that makes the toolchain root in `dest`.
    pub fn mmdebstrap(&self, dest: &Path) -> Command {
        let mut pkgs = vec!["rustc".to_string(), "cargo".to_string()];
        pkgs.extend(self.target.packages.iter().cloned());
        let mut c = Command::new("mmdebstrap");
        c.arg("--mode=root")
            .arg("--variant=apt")
            .arg("--format=directory")
            .arg(format!(
                "--architectures={},{}",
                self.host_arch, self.target.debian_arch
            ))
            .arg(format!("--include={}", pkgs.join(",")))
            .arg("--aptopt=Acquire::Retries \"3\"")
            .arg("--dpkgopt=path-exclude=/usr/share/man/*")
            .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
            .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
            .arg(&self.suite)
            .arg(dest)
            .arg(&self.mirror);
        c
    }
}

/// Is `dir` a clutch source tree that firstboot can be built from?
pub fn is_source_tree(dir: &Path) -> bool {
    dir.join("Cargo.lock").is_file()
        && CRATES
            .iter()
            .all(|c| dir.join(c).join("Cargo.toml").is_file())
}

/// The files of the crates in `src` that shape the binary (no `target/`, no hidden files),
/// relative paths in sorted order.
pub fn source_files(src: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![PathBuf::from("Cargo.toml"), PathBuf::from("Cargo.lock")];
    for c in CRATES {
        let mut stack = vec![PathBuf::from(c)];
        while let Some(rel) = stack.pop() {
            let p = src.join(&rel);
            let m = p
                .symlink_metadata()
                .with_context(|| format!("reading {}", p.display()))?;
            if m.is_dir() {
                for e in std::fs::read_dir(&p)? {
                    let n = e?.file_name();
                    let s = n.to_string_lossy();
                    if s.starts_with('.') || s == "target" {
                        continue;
                    }
                    stack.push(rel.join(&n));
                }
            } else if m.is_file() {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hash over the source files' paths and contents.
pub fn source_key(src: &Path, files: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for f in files {
        let data =
            std::fs::read(src.join(f)).with_context(|| format!("reading {}", f.display()))?;
        h.update(f.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(hex::encode(h.finalize()))
}

/// The workspace manifest for the cross build: the source tree's own, with `members` cut
/// down to [`CRATES`] (inherited package fields, shared dependencies and profiles stay).
pub fn reduced_manifest(root_manifest: &str) -> Result<String> {
    let mut t: toml::Table = toml::from_str(root_manifest).context("parsing Cargo.toml")?;
    let ws = t
        .get_mut("workspace")
        .and_then(|w| w.as_table_mut())
        .context("Cargo.toml has no [workspace]")?;
    ws.insert(
        "members".into(),
        toml::Value::Array(CRATES.iter().map(|c| toml::Value::from(*c)).collect()),
    );
    ws.remove("default-members");
    Ok(toml::to_string(&t)?)
}

/// Cargo's settings inside the toolchain root: vendored sources only, the cross linker.
pub fn cargo_config(target: &CrossTarget) -> String {
    format!(
        "# Written by clutch: offline build from vendored sources.\n\
         [source.crates-io]\nreplace-with = \"vendored-sources\"\n\n\
         [source.vendored-sources]\ndirectory = \"/build/src/vendor\"\n\n\
         [target.{}]\nlinker = \"{}\"\n\n[net]\noffline = true\n",
        target.triple, target.linker
    )
}

/// The script run inside the private namespace: mounts, chroot, cargo.
pub fn build_script(target: &CrossTarget) -> String {
    format!(
        "set -eu\n\
         R=\"$1\"; B=\"$2\"\n\
         mount -t proc proc \"$R/proc\"\n\
         mount --rbind /dev \"$R/dev\"\n\
         mkdir -p \"$R/build\"\n\
         mount --bind \"$B\" \"$R/build\"\n\
         exec chroot \"$R\" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/build \
         CARGO_HOME=/build/cargo-home CARGO_TARGET_DIR=/build/target \
         sh -c 'cd /build/src && cargo --version && rustc --version && \
         cargo build --offline --locked --release --target {} -p clutch-firstboot'\n",
        target.triple
    )
}

/// Returns the toolchain root for `spec`, making it first when absent.
pub fn ensure_toolchain(cache: &Path, spec: &ToolchainSpec) -> Result<PathBuf> {
    let dir = cache.join("toolchain");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = dir.join(spec.key());
    if root.join("usr/bin/cargo").is_file() {
        return Ok(root);
    }
    let tmp = atomic::temp_path(&root);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    tracing::info!(root = %root.display(), "making the cross toolchain root (once)");
    let res = cmd::run(&mut spec.mmdebstrap(&tmp));
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).context(format!(
            "making the {} cross toolchain root with mmdebstrap",
            spec.suite
        ));
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::rename(&tmp, &root)?;
    std::fs::write(
        dir.join(format!("{}.json", spec.key())),
        serde_json::to_vec_pretty(spec)?,
    )?;
    Ok(root)
}

/// The cross-built `clutch-firstboot` for `arch` from the source tree `src`, from the cache
/// when these sources were built before; `true` when it was compiled now.
pub fn ensure_firstboot(
    cache: &Path,
    src: &Path,
    arch: &str,
    mirror: &str,
) -> Result<(PathBuf, bool)> {
    let target = cross_target(arch).with_context(|| {
        format!("clutch cannot cross-build clutch-firstboot for `{arch}`; pass --firstboot-bin")
    })?;
    let spec = ToolchainSpec::new(mirror, target.clone());
    let files = source_files(src)?;
    let key = source_key(src, &files)?;
    let key = hex::encode(Sha256::digest(format!("{key}/{}", spec.key())))[..24].to_string();
    let out_dir = cache.join("firstboot").join(&key);
    let out = out_dir.join("clutch-firstboot");
    if out.is_file() {
        return Ok((out, false));
    }
    eprintln!(
        "clutch: cross-building clutch-firstboot for {} with {TOOLCHAIN_SUITE}'s rustc (once per source change)",
        target.triple
    );
    let root = ensure_toolchain(cache, &spec)?;
    let work = cache.join("cross");
    let tree = work.join("src");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    for f in &files {
        let to = tree.join(f);
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        std::fs::copy(src.join(f), &to).with_context(|| format!("copying {}", f.display()))?;
    }
    let manifest = std::fs::read_to_string(src.join("Cargo.toml"))?;
    std::fs::write(tree.join("Cargo.toml"), reduced_manifest(&manifest)?)?;
    vendor(&tree)?;
    let home = work.join("cargo-home");
    std::fs::create_dir_all(&home)?;
    std::fs::write(home.join("config.toml"), cargo_config(&target))?;

    cmd::run_visible(
        Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
            ])
            .arg(build_script(&target))
            .arg("clutch-cross")
            .arg(&root)
            .arg(&work),
    )
    .with_context(|| {
        format!(
            "cross-building clutch-firstboot for {} with {TOOLCHAIN_SUITE}'s rustc (root {})",
            target.triple,
            root.display()
        )
    })?;
    let built = work
        .join("target")
        .join(&target.triple)
        .join("release/clutch-firstboot");
    std::fs::create_dir_all(&out_dir)?;
    let data = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    atomic::write(&out, &data)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))?;
    Ok((out, true))
}

/// `cargo vendor` with the host's cargo: from its registry cache first, the network second.
fn vendor(tree: &Path) -> Result<()> {
    let attempt = |offline: bool| {
        let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        c.current_dir(tree).arg("vendor").arg("--versioned-dirs");
        if offline {
            c.arg("--offline");
        }
        c.arg("vendor");
        cmd::run(&mut c)
    };
    if let Err(e) = attempt(true) {
        tracing::info!("offline cargo vendor failed ({e:#}); trying with the network");
        attempt(false).context("vendoring firstboot's dependencies (cargo vendor)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm64_target_and_toolchain_command() {
        let t = cross_target("arm64").unwrap();
        assert_eq!(t.triple, "aarch64-unknown-linux-gnu");
        assert_eq!(t.linker, "aarch64-linux-gnu-gcc");
        assert!(t.packages.contains(&"libstd-rust-dev:arm64".to_string()));
        assert!(cross_target("mips").is_none());
        let s = ToolchainSpec::new("http://deb.debian.org/debian", t);
        let c = cmd::describe(&s.mmdebstrap(Path::new("/c/t")));
        assert!(
            c.contains("--architectures=amd64,arm64") || host_arch() != "amd64",
            "{c}"
        );
        assert!(c.contains("--include=rustc,cargo,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross"), "{c}");
        assert!(c.contains(" trixie /c/t "), "{c}");
        let other =
            ToolchainSpec::new("http://mirror.local/debian", cross_target("arm64").unwrap());
        assert_ne!(s.key(), other.key());
    }

    #[test]
    fn manifest_keeps_workspace_inheritance_but_only_firstboot_crates() {
        let m = "[workspace]\nresolver = \"3\"\nmembers = [\"config\", \"builder\", \"firstboot\", \"cluster\", \"tests/qemu\"]\n\n\
                 [workspace.package]\nversion = \"0.1.0\"\nrust-version = \"1.85\"\n\n\
                 [workspace.dependencies]\nserde = \"1\"\n\n[profile.release]\nopt-level = \"s\"\n";
        let r = reduced_manifest(m).unwrap();
        let t: toml::Table = toml::from_str(&r).unwrap();
        let members: Vec<&str> = t["workspace"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(members, CRATES);
        assert_eq!(
            t["workspace"]["package"]["rust-version"].as_str(),
            Some("1.85")
        );
        assert_eq!(t["workspace"]["dependencies"]["serde"].as_str(), Some("1"));
        assert_eq!(t["profile"]["release"]["opt-level"].as_str(), Some("s"));
        assert!(reduced_manifest("[package]\nname = \"x\"\n").is_err());
    }

    #[test]
    fn source_key_follows_content_and_skips_target() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::write(r.join("Cargo.toml"), "[workspace]\n").unwrap();
        std::fs::write(r.join("Cargo.lock"), "").unwrap();
        for c in CRATES {
            std::fs::create_dir_all(r.join(c).join("src")).unwrap();
            std::fs::create_dir_all(r.join(c).join("target")).unwrap();
            std::fs::write(r.join(c).join("Cargo.toml"), c).unwrap();
            std::fs::write(r.join(c).join("src/lib.rs"), "").unwrap();
            std::fs::write(r.join(c).join("target/junk"), "x").unwrap();
        }
        assert!(is_source_tree(r));
        let files = source_files(r).unwrap();
        assert!(
            files
                .iter()
                .all(|f| !f.to_string_lossy().contains("target"))
        );
        assert!(files.contains(&PathBuf::from("firstboot/src/lib.rs")));
        let k1 = source_key(r, &files).unwrap();
        std::fs::write(r.join("firstboot/target/junk"), "y").unwrap();
        assert_eq!(k1, source_key(r, &source_files(r).unwrap()).unwrap());
        std::fs::write(r.join("firstboot/src/lib.rs"), "// changed").unwrap();
        assert_ne!(k1, source_key(r, &source_files(r).unwrap()).unwrap());
    }

    #[test]
    fn chroot_build_is_offline_for_the_target() {
        let t = cross_target("arm64").unwrap();
        let s = build_script(&t);
        assert!(s.contains(
            "--offline --locked --release --target aarch64-unknown-linux-gnu -p clutch-firstboot"
        ));
        let c = cargo_config(&t);
        assert!(
            c.contains("[target.aarch64-unknown-linux-gnu]\nlinker = \"aarch64-linux-gnu-gcc\"")
        );
        assert!(c.contains("directory = \"/build/src/vendor\""));
    }
}
