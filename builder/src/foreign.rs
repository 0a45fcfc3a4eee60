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

use std::path::Path;
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
    Mount,
    Enable(String),
}

/// The steps that make `qemu-<arch>` programs runnable, from the current state.
pub fn binfmt_plan(qemu: &str, st: BinfmtState) -> Vec<BinfmtAction> {
    let mut v = Vec::new();
    if !st.mounted {
        v.push(BinfmtAction::Mount);
    }
    if st.entry != Some(true) {
        v.push(BinfmtAction::Enable(format!("qemu-{qemu}")));
    }
    v
}

/// Reads the binfmt_misc state for `qemu` under `dir` (normally [`BINFMT_DIR`]).
pub fn binfmt_state(dir: &Path, qemu: &str) -> BinfmtState {
    let mounted = dir.join("status").exists();
    let entry = std::fs::read_to_string(dir.join(format!("qemu-{qemu}")))
        .ok()
        .map(|t| t.lines().next() == Some("enabled"));
    BinfmtState { mounted, entry }
}

/// Makes sure the kernel runs `debian_arch` programs through qemu-user-static.
pub fn ensure_binfmt(debian_arch: &str) -> Result<()> {
    let qemu = qemu_arch(debian_arch).with_context(|| {
        format!("clutch does not know how to emulate the `{debian_arch}` architecture")
    })?;
    let dir = Path::new(BINFMT_DIR);
    let before = binfmt_state(dir, qemu);
    for a in binfmt_plan(qemu, before) {
        let r = match &a {
            BinfmtAction::Mount => cmd::run(
                Command::new("mount")
                    .args(["-t", "binfmt_misc", "binfmt_misc"])
                    .arg(dir),
            ),
            BinfmtAction::Enable(name) => {
                cmd::run(Command::new("update-binfmts").arg("--enable").arg(name))
            }
        };
        if let Err(e) = r {
            tracing::warn!("{a:?} failed: {e:#}");
        }
    }
    let after = binfmt_state(dir, qemu);
    if after.entry == Some(true) {
        return Ok(());
    }
    let why = if !after.mounted {
        format!(
            "{BINFMT_DIR} is not mounted and `mount -t binfmt_misc` failed (in a container, mount it on the host)"
        )
    } else if after.entry.is_none() {
        format!(
            "there is no qemu-{qemu} handler in {BINFMT_DIR}: install qemu-user-static and binfmt-support \
             (apt-get install --no-install-recommends qemu-user-static binfmt-support arch-test)"
        )
    } else {
        format!(
            "{BINFMT_DIR}/qemu-{qemu} is disabled and `update-binfmts --enable qemu-{qemu}` failed"
        )
    };
    bail!(
        "cannot build a {debian_arch} root filesystem on this {} host: {why}",
        crate::cross::host_arch()
    )
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
pub const CUSTOMIZE_HOOK: &str = r#"set -eu
R="$1"
rm -f "$R/usr/sbin/update-initramfs"
chroot "$R" dpkg-divert --quiet --local --rename --divert /usr/sbin/update-initramfs.clutch --remove /usr/sbin/update-initramfs
if [ -x "$R/usr/sbin/update-initramfs" ] && ls "$R"/boot/vmlinuz-* >/dev/null 2>&1; then
  chroot "$R" update-initramfs -c -k all
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
        assert!(binfmt_plan("aarch64", all).is_empty());
        let none = BinfmtState {
            mounted: false,
            entry: None,
        };
        assert_eq!(
            binfmt_plan("aarch64", none),
            vec![
                BinfmtAction::Mount,
                BinfmtAction::Enable("qemu-aarch64".into())
            ]
        );
        let disabled = BinfmtState {
            mounted: true,
            entry: Some(false),
        };
        assert_eq!(
            binfmt_plan("aarch64", disabled),
            vec![BinfmtAction::Enable("qemu-aarch64".into())]
        );
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
}
