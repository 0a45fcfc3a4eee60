//! What the builder writes and clutch-firstboot reads back on A/B images, in one place so
//! the two sides cannot drift: the slot names, the ESP paths of a release's kernel and
//! initrd, syslinux.cfg (legacy BIOS), Raspberry Pi `autoboot.txt`, and `release.json`.

use serde::{Deserialize, Serialize};

use crate::Release;

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

/// ESP paths of a release's kernel and initrd (systemd-boot scheme).
pub fn esp_kernel(r: &Release) -> String {
    format!("EFI/clutch/clutch_{r}.vmlinuz")
}
pub fn esp_initrd(r: &Release) -> String {
    format!("EFI/clutch/clutch_{r}.initrd")
}

/// syslinux.cfg for legacy BIOS: one entry, the current release. clutch-firstboot rewrites
/// it on update and rollback (syslinux cannot count boots).
pub fn syslinux_cfg(r: &Release, cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nDEFAULT clutch_{r}\n\
         LABEL clutch_{r}\n  LINUX /{}\n  INITRD /{}\n  APPEND {cmdline}\n",
        esp_kernel(r),
        esp_initrd(r)
    )
}

/// Raspberry Pi `autoboot.txt` on the first FAT partition: boot `slot_part` normally and
/// `try_part` when the reboot asked for `tryboot` (`reboot "0 tryboot"`), per the firmware's
/// `tryboot_a_b` mode.
pub fn autoboot_txt(slot_part: u32, try_part: u32) -> String {
    format!(
        "# Written by clutch: the A/B boot partitions (see the Raspberry Pi documentation,\n\
         # \"autoboot.txt\"). clutch-firstboot changes boot_partition when it commits a release.\n\
         [all]\ntryboot_a_b=1\nboot_partition={slot_part}\n[tryboot]\nboot_partition={try_part}\n"
    )
}

/// `release.json` in `update/`: what the set is, for the node to check before anything
/// is written (board, architecture, scheme, release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseInfo {
    pub format: u32,
    pub release: Release,
    pub board: String,
    pub arch: String,
    pub scheme: String,
    /// The files of the set (in `SHA256SUMS` too).
    pub files: Vec<String>,
    /// Bytes of the root file system once written.
    pub root_bytes: u64,
}

/// What a node needs to know about its own image (`/usr/lib/clutch/ab.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbInfo {
    pub scheme: String,
    pub board: String,
    pub arch: String,
    pub release: Release,
}

/// A state folder on the data partition and who owns it in this release
/// (`/usr/lib/clutch/persistent.json`): a node applies it at every boot, so a release that
/// adds a package (etcd) finds its folder owned by that package's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentDir {
    pub dir: String,
    pub node: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}
