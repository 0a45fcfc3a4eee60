//! Root filesystems for another architecture (arm64 on an amd64 host): mmdebstrap runs the
//! image's maintainer scripts through qemu-user-static, which the kernel starts by way of
//! binfmt_misc. This module makes sure that path works (mounting binfmt_misc and enabling the
//! qemu handler when needed, with a clear error when it cannot), and holds the mmdebstrap
//! hooks that keep slow work out of emulation:
//!
//! - `update-initramfs` is diverted to a no-op while packages install (the kernel, firmware
//!   and udev packages would each regenerate the initramfs under emulation), and run once at
//!   the end;
//! - ssh host keys are not generated (placeholders stop openssh-server's postinst; the build
//!   removes them and every node makes its own at first boot);
//! - man-db's index rebuild is turned off;
//! - `/boot/firmware` is emptied at the end: Debian's raspi-firmware hooks copy the kernel
//!   there, but the builder writes the boot partition itself from the board file.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Bump when the hooks below change, so cached foreign root filesystems are rebuilt.
pub const FOREIGN_RECIPE: u32 = 1;

pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// QEMU's name for a Debian architecture (`qemu-<name>` binfmt entries).
pub fn qemu_arch(debian_arch: &str) -> Option<&'static str> {
    Some(match debian_arch {
        "arm64" => "aarch64",
        "armhf" | "armel" => "arm",
        "amd64" => "x86_64",
        "i386" => "i386",
        "riscv64" => "riscv64",
        "ppc64el" => "ppc64le",
        "s390x" => "s390x",
        _ => return None,
    })
}

/// What the host's binfmt_misc looks like for one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BinfmtState {
    /// `/proc/sys/fs/binfmt_misc` is mounted (its `status` file exists).
    pub mounted: bool,
    /// The `qemu-<arch>` entry: `None` when absent, else whether it is enabled.
    pub entry: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinfmtAction {
    /// `mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc`.
    Mount,
    /// Write `1` to the disabled `qemu-<arch>` entry.
    Enable(String),
    /// Register the handler from a systemd binfmt.d file (trixie's qemu-user-binfmt).
    Register(PathBuf),
    /// `update-binfmts --enable qemu-<arch>` (bookworm's qemu-user-static + binfmt-support).
    UpdateBinfmts(String),
}

/// The steps that make `qemu-<arch>` programs runnable, from the current state; `conf` is the
/// handler's binfmt.d file when one is installed.
pub fn binfmt_plan(qemu: &str, st: BinfmtState, conf: Option<&Path>) -> Vec<BinfmtAction> {
    let mut v = Vec::new();
    if !st.mounted {
        v.push(BinfmtAction::Mount);
    }
    let name = format!("qemu-{qemu}");
    match (st.entry, conf) {
        (Some(true), _) => {}
        (Some(false), _) => v.push(BinfmtAction::Enable(name)),
        (None, Some(c)) => v.push(BinfmtAction::Register(c.to_path_buf())),
        (None, None) => v.push(BinfmtAction::UpdateBinfmts(name)),
    }
    v
}

/// The installed binfmt.d definition of the `qemu-<arch>` handler, if any.
pub fn binfmt_conf(qemu: &str) -> Option<PathBuf> {
    ["/etc/binfmt.d", "/usr/lib/binfmt.d"]
        .iter()
        .map(|d| Path::new(d).join(format!("qemu-{qemu}.conf")))
        .find(|p| p.is_file())
}

/// Reads the binfmt_misc state for `qemu` under `dir` (normally [`BINFMT_DIR`]).
pub fn binfmt_state(dir: &Path, qemu: &str) -> BinfmtState {
    let mounted = dir.join("status").exists();
    let entry = std::fs::read_to_string(dir.join(format!("qemu-{qemu}")))
        .ok()
        .map(|t| t.lines().next() == Some("enabled"));
    BinfmtState { mounted, entry }
}

fn apply_binfmt(dir: &Path, a: &BinfmtAction) -> Result<()> {
    match a {
        BinfmtAction::Mount => cmd::run(
            Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc"])
                .arg(dir),
        )
        .map(drop),
        BinfmtAction::Enable(name) => std::fs::write(dir.join(name), "1")
            .with_context(|| format!("enabling {}", dir.join(name).display())),
        BinfmtAction::Register(conf) => {
            let line = std::fs::read_to_string(conf)
                .with_context(|| format!("reading {}", conf.display()))?;
            let line = line
                .lines()
                .find(|l| l.starts_with(':'))
                .with_context(|| format!("{} holds no binfmt rule", conf.display()))?;
            std::fs::write(dir.join("register"), line)
                .with_context(|| format!("registering {}", conf.display()))
        }
        BinfmtAction::UpdateBinfmts(name) => {
            cmd::run(Command::new("update-binfmts").arg("--enable").arg(name)).map(drop)
        }
    }
}

/// Makes sure the kernel runs `debian_arch` programs through qemu-user-static.
pub fn ensure_binfmt(debian_arch: &str) -> Result<()> {
    let qemu = qemu_arch(debian_arch).with_context(|| {
        format!("clutch does not know how to emulate the `{debian_arch}` architecture")
    })?;
    let dir = Path::new(BINFMT_DIR);
    let before = binfmt_state(dir, qemu);
    for a in binfmt_plan(qemu, before, binfmt_conf(qemu).as_deref()) {
        if let Err(e) = apply_binfmt(dir, &a) {
            tracing::warn!("{a:?} failed: {e:#}");
        }
    }
    let after = binfmt_state(dir, qemu);
    if after.entry == Some(true) {
        if let Some(hint) = slow_qemu_hint(qemu) {
            tracing::warn!("{hint}");
        }
        return Ok(());
    }
    let why = if !after.mounted {
        format!(
            "{BINFMT_DIR} is not mounted and `mount -t binfmt_misc` failed (in a container, mount it on the host)"
        )
    } else if after.entry.is_none() {
        format!(
            "there is no qemu-{qemu} handler in {BINFMT_DIR}: install QEMU's user-mode emulation \
             (apt-get install --no-install-recommends qemu-user-static binfmt-support)"
        )
    } else {
        format!("{BINFMT_DIR}/qemu-{qemu} is disabled and enabling it failed")
    };
    bail!(
        "cannot build a {debian_arch} root filesystem on this {} host: {why}",
        crate::cross::host_arch()
    )
}

/// QEMU releases before this one run arm64 code several times slower (measured here: gzip
/// of 20 MB under qemu-aarch64 7.2 took 21.6 s, under 10.0 6.9 s).
pub const FAST_QEMU_MAJOR: u32 = 9;

/// `(major, minor)` from `qemu-aarch64 --version` output.
pub fn parse_qemu_version(out: &str) -> Option<(u32, u32)> {
    let rest = out.lines().next()?.split(" version ").nth(1)?;
    let mut it = rest.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The version of the user-mode QEMU for `qemu` installed on PATH.
pub fn qemu_user_version(qemu: &str) -> Option<(u32, u32)> {
    [format!("qemu-{qemu}"), format!("qemu-{qemu}-static")]
        .iter()
        .find_map(|p| Command::new(p).arg("--version").output().ok())
        .and_then(|o| parse_qemu_version(&String::from_utf8_lossy(&o.stdout)))
}

/// A warning when the installed QEMU makes foreign builds needlessly slow.
pub fn slow_qemu_hint(qemu: &str) -> Option<String> {
    let (major, minor) = qemu_user_version(qemu)?;
    (major < FAST_QEMU_MAJOR).then(|| {
        format!(
            "qemu-{qemu} {major}.{minor} emulates several times slower than QEMU {FAST_QEMU_MAJOR} or newer \
             (a cold rpi4 root filesystem took 22.8 min with 7.2); Debian trixie's statically linked \
             qemu-user installs on bookworm too (see scripts/install-host-deps)"
        )
    })
}

/// mmdebstrap `--essential-hook`: runs after the essential packages, before the rest.
pub const ESSENTIAL_HOOK: &str = r#"set -eu
R="$1"
# initramfs: made once by the customize hook, not once per package under emulation.
chroot "$R" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.clutch --add /usr/sbin/update-initramfs
printf '#!/bin/sh\n# clutch build: the initramfs is made once at the end of the build\nexit 0\n' > "$R/usr/sbin/update-initramfs"
chmod 0755 "$R/usr/sbin/update-initramfs"
# ssh host keys: every node makes its own at first boot; skip the throwaway ones.
mkdir -p "$R/etc/ssh"
for t in rsa ecdsa ed25519; do : > "$R/etc/ssh/ssh_host_${t}_key"; done
# man-db: no index rebuild.
if [ -x "$R/usr/bin/debconf-set-selections" ]; then
  echo 'man-db man-db/auto-update boolean false' | chroot "$R" debconf-set-selections
fi
"#;

/// mmdebstrap `--customize-hook`: runs once everything is installed.
///
/// update-initramfs copies ~1000 kernel modules through dracut-install, which starts one
/// `cp` per module; under emulation each start costs a QEMU start-up, half the initramfs's
/// CPU time (measured: 3 min 11 s of CPU with the emulated cp, 1 min 36 s without). So the
/// host's own `cp` stands in for the image's while the initramfs is made: copied with its
/// libraries into a private folder of the chroot and pointed at them with patchelf, it runs
/// natively there. The initramfs is the same either way (checked: same files, modes, owners,
/// link targets and sha256). Without patchelf on the host the emulated cp does the work.
pub const CUSTOMIZE_HOOK: &str = r#"set -eu
R="$1"
rm -f "$R/usr/sbin/update-initramfs"
chroot "$R" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.clutch --remove /usr/sbin/update-initramfs
N=/tmp/clutch-native
native_cp() {
  command -v patchelf >/dev/null || return 1
  deps=$(ldd /usr/bin/cp)
  loader=$(echo "$deps" | awk '$1 ~ /^\/.*ld-linux/ {print $1}')
  [ -n "$loader" ] || return 1
  mkdir -p "$R$N"
  cp /usr/bin/cp "$R$N/cp"
  for lib in $(echo "$deps" | awk '$2 == "=>" && $3 ~ /^\// {print $3}') "$loader"; do
    cp -L "$lib" "$R$N/"
  done
  patchelf --set-interpreter "$N/${loader##*/}" --force-rpath --set-rpath "$N" "$R$N/cp"
  chroot "$R" "$N/cp" --version >/dev/null
}
restore_cp() {
  if [ -e "$R/usr/bin/cp.clutch-emulated" ]; then
    mv -f "$R/usr/bin/cp.clutch-emulated" "$R/usr/bin/cp"
  fi
  rm -rf "$R$N"
}
if [ -x "$R/usr/sbin/update-initramfs" ] && ls "$R"/boot/vmlinuz-* >/dev/null 2>&1; then
  trap restore_cp EXIT
  if native_cp; then
    mv "$R/usr/bin/cp" "$R/usr/bin/cp.clutch-emulated"
    ln -s "$N/cp" "$R/usr/bin/cp"
  else
    echo "clutch: no native cp for the chroot (patchelf missing?); the initramfs takes longer" >&2
  fi
  chroot "$R" update-initramfs -c -k all
  restore_cp
  trap - EXIT
fi
rm -f "$R"/etc/ssh/ssh_host_*
if [ -d "$R/boot/firmware" ]; then
  find "$R/boot/firmware" -mindepth 1 -delete
fi
"#;

/// The extra mmdebstrap arguments of a foreign-architecture build.
pub fn mmdebstrap_args() -> Vec<String> {
    vec![
        format!("--essential-hook={ESSENTIAL_HOOK}"),
        format!("--customize-hook={CUSTOMIZE_HOOK}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_mounts_and_enables_only_what_is_missing() {
        let all = BinfmtState {
            mounted: true,
            entry: Some(true),
        };
        let conf = Path::new("/usr/lib/binfmt.d/qemu-aarch64.conf");
        assert!(binfmt_plan("aarch64", all, Some(conf)).is_empty());
        let none = BinfmtState {
            mounted: false,
            entry: None,
        };
        assert_eq!(
            binfmt_plan("aarch64", none, None),
            vec![
                BinfmtAction::Mount,
                BinfmtAction::UpdateBinfmts("qemu-aarch64".into())
            ]
        );
        assert_eq!(
            binfmt_plan("aarch64", none, Some(conf)),
            vec![BinfmtAction::Mount, BinfmtAction::Register(conf.into())]
        );
        let disabled = BinfmtState {
            mounted: true,
            entry: Some(false),
        };
        assert_eq!(
            binfmt_plan("aarch64", disabled, Some(conf)),
            vec![BinfmtAction::Enable("qemu-aarch64".into())]
        );
    }

    #[test]
    fn register_writes_the_rule_and_enable_writes_one() {
        let t = tempfile::tempdir().unwrap();
        let conf = t.path().join("qemu-aarch64.conf");
        std::fs::write(
            &conf,
            "# comment\n:qemu-aarch64:M::\\x7fELF:\\xff:/usr/bin/qemu-aarch64:OCF\n",
        )
        .unwrap();
        apply_binfmt(t.path(), &BinfmtAction::Register(conf)).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("register")).unwrap(),
            ":qemu-aarch64:M::\\x7fELF:\\xff:/usr/bin/qemu-aarch64:OCF"
        );
        apply_binfmt(t.path(), &BinfmtAction::Enable("qemu-aarch64".into())).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.path().join("qemu-aarch64")).unwrap(),
            "1"
        );
        let empty = t.path().join("empty.conf");
        std::fs::write(&empty, "# nothing\n").unwrap();
        let e = apply_binfmt(t.path(), &BinfmtAction::Register(empty)).unwrap_err();
        assert!(format!("{e:#}").contains("holds no binfmt rule"), "{e:#}");
    }

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(
            parse_qemu_version(
                "qemu-aarch64 version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)\nCopyright"
            ),
            Some((10, 0))
        );
        assert_eq!(
            parse_qemu_version("qemu-aarch64 version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2))
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }

    #[test]
    fn state_is_read_from_the_binfmt_folder() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            binfmt_state(t.path(), "aarch64"),
            BinfmtState {
                mounted: false,
                entry: None
            }
        );
        std::fs::write(t.path().join("status"), "enabled\n").unwrap();
        std::fs::write(
            t.path().join("qemu-aarch64"),
            "disabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n",
        )
        .unwrap();
        assert_eq!(
            binfmt_state(t.path(), "aarch64"),
            BinfmtState {
                mounted: true,
                entry: Some(false)
            }
        );
    }

    #[test]
    fn arch_names() {
        assert_eq!(qemu_arch("arm64"), Some("aarch64"));
        assert_eq!(qemu_arch("armhf"), Some("arm"));
        assert_eq!(qemu_arch("sparc"), None);
    }

    #[test]
    fn hooks_divert_initramfs_and_restore_it() {
        assert!(ESSENTIAL_HOOK.contains("--add /usr/sbin/update-initramfs"));
        assert!(CUSTOMIZE_HOOK.contains("--remove /usr/sbin/update-initramfs"));
        assert!(CUSTOMIZE_HOOK.contains("update-initramfs -c -k all"));
        // The hooks are valid shell.
        for h in [ESSENTIAL_HOOK, CUSTOMIZE_HOOK] {
            let st = Command::new("sh").args(["-n", "-c", h]).status().unwrap();
            assert!(st.success(), "{h}");
        }
    }

    /// A tiny root for `chroot`: the host's static busybox as shell and as the image's `cp`,
    /// and an update-initramfs given by the test.
    fn fake_root(update_initramfs: &str) -> tempfile::TempDir {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["bin", "usr/bin", "usr/sbin", "boot", "tmp", "etc/ssh"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
        for (link, to) in [
            ("bin/sh", "busybox"),
            ("usr/bin/cp", "/bin/busybox"),
            ("usr/bin/head", "/bin/busybox"),
            ("usr/bin/readlink", "/bin/busybox"),
        ] {
            symlink(to, r.join(link)).unwrap();
        }
        let script = |p: &str, body: &str| {
            std::fs::write(r.join(p), format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(r.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // As the essential hook left it: the real one diverted to `.clutch`, which
        // `dpkg-divert --remove` renames back.
        script(
            "usr/sbin/dpkg-divert",
            "/bin/busybox mv /usr/sbin/update-initramfs.clutch /usr/sbin/update-initramfs",
        );
        script("usr/sbin/update-initramfs.clutch", update_initramfs);
        std::fs::write(r.join("boot/vmlinuz-6.12-arm64"), b"").unwrap();
        std::fs::write(r.join("etc/ssh/ssh_host_ed25519_key"), b"").unwrap();
        t
    }

    fn static_busybox() -> bool {
        let out = Command::new("file").arg("/bin/busybox").output();
        out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
    }

    /// The customize hook runs update-initramfs with the host's cp standing in for the
    /// image's, and puts the image's back afterwards, also when update-initramfs fails.
    /// Needs root (chroot), patchelf and busybox-static (scripts/install-host-deps).
    #[test]
    fn customize_hook_lends_a_native_cp_and_always_gives_it_back() {
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !static_busybox() || !crate::doctor::find_in_path("patchelf") {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI must run this test (root, patchelf, busybox-static)"
            );
            eprintln!("SKIPPED: needs root, patchelf and busybox-static");
            return;
        }
        let run = |t: &tempfile::TempDir| {
            Command::new("sh")
                .args(["-c", CUSTOMIZE_HOOK, "hook"])
                .arg(t.path())
                .output()
                .unwrap()
        };
        let ok = fake_root(
            "readlink /usr/bin/cp > /record\n/usr/bin/cp --version | head -n 1 >> /record",
        );
        let out = run(&ok);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let record = std::fs::read_to_string(ok.path().join("record")).unwrap();
        let lines: Vec<&str> = record.lines().collect();
        assert_eq!(lines[0], "/tmp/clutch-native/cp", "{record}");
        assert!(lines[1].starts_with("cp (GNU coreutils)"), "{record}");
        let restored = |t: &tempfile::TempDir| {
            assert_eq!(
                std::fs::read_link(t.path().join("usr/bin/cp")).unwrap(),
                Path::new("/bin/busybox")
            );
            assert!(!t.path().join("usr/bin/cp.clutch-emulated").exists());
            assert!(!t.path().join("tmp/clutch-native").exists());
        };
        restored(&ok);
        assert!(!ok.path().join("etc/ssh/ssh_host_ed25519_key").exists());

        let failing = fake_root("echo mkinitramfs broke >&2; exit 3");
        let out = run(&failing);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("mkinitramfs broke"));
        restored(&failing);
    }
}
