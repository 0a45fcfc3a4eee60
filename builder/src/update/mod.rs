//! Images that update themselves: two root slots (`a`, `b`), a persistent data partition and
//! a signed `update/` output per release. See SPEC.md "On the image" (Updates).
//!
//! Everything is decided first, as data ([`AbPlan`], [`AbLayout`], the files in [`files`]);
//! [`assemble`] writes the disk, [`output`] the signed release folder, [`key`] holds the
//! signing key. The boot mechanism per board comes from the board's `[ab]` section:
//! - `systemd-boot` (amd64): GPT with root slots of the Discoverable Partitions type for the
//!   architecture, labelled `clutch_<release>` (or `_empty`), written on the node by
//!   systemd-sysupdate; one Boot Loader Specification entry per release with boot counting
//!   (`clutch_<release>+2-0.conf`), blessed by `systemd-bless-boot` once the node is ready.
//! - `tryboot` (Raspberry Pi 4): GPT with a shared `bootfs` (autoboot.txt, clutch.toml), a
//!   FAT boot partition per slot and a root partition per slot, as the firmware's
//!   `tryboot_a_b` mode wants.
//! - `os-prefix` (Raspberry Pi 3, no tryboot): MBR, one FAT with a folder per slot chosen
//!   by `os_prefix=` in config.txt.

pub mod assemble;
pub mod files;
pub mod image;
pub mod key;
pub mod output;

use anyhow::{Result, bail};
use clutch_config::board::PartitionTable;
use clutch_config::{AbScheme, Board, ImageConfig, ImageSize, Release, UpdateSection};

use crate::disk::Extent;

pub use clutch_config::ab::Slot;

/// GPT partition type of a Linux root file system on this Debian architecture
/// (the Discoverable Partitions Specification's, which systemd-sysupdate matches with
/// `MatchPartitionType=root`).
pub fn root_type(arch: &str) -> Result<uuid::Uuid> {
    Ok(match arch {
        "amd64" => uuid::uuid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        "arm64" => uuid::uuid!("b921b045-1df0-41c3-af44-4c6f280d3fae"),
        other => bail!("no root partition type known for Debian architecture {other}"),
    })
}
/// Generic Linux data (the data partition: systemd's gpt-auto must not mount it anywhere).
pub const LINUX_DATA: uuid::Uuid = uuid::uuid!("0fc63daf-8483-4772-8e79-3d69d8477de4");
/// Microsoft basic data: what the Raspberry Pi firmware boots a GPT FAT partition from.
pub const BASIC_DATA: uuid::Uuid = uuid::uuid!("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");
/// EFI system partition.
pub const ESP: uuid::Uuid = uuid::uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");

/// The label of an unused slot partition (systemd-sysupdate's).
pub const EMPTY_LABEL: &str = "_empty";
/// The data partition's GPT label and ext4 label.
pub const DATA_LABEL: &str = "clutch-data";
/// Where a node mounts the data partition.
pub const DATA_MOUNT: &str = "/data";
/// GPT labels are 36 UTF-16 units; `clutchboot_` is the longer prefix.
pub const MAX_RELEASE_LEN: usize = 36 - "clutchboot_".len();

/// The GPT label (and sysupdate instance name) of a release's root slot.
pub fn root_label(r: &Release) -> String {
    format!("clutch_{r}")
}
/// The GPT label of a release's own boot partition (`tryboot`).
pub fn slot_boot_label(r: &Release) -> String {
    format!("clutchboot_{r}")
}

/// What an image with `[update]` is.
#[derive(Debug, Clone, PartialEq)]
pub struct AbPlan {
    pub scheme: AbScheme,
    pub arch: String,
    pub release: Release,
    pub update: UpdateSection,
    pub slot_size: u64,
    pub data_size: u64,
    pub slot_boot_size: Option<u64>,
}

/// Decides whether and how this build is an A/B image; `None` without `[update]`.
pub fn plan(cfg: &ImageConfig, board: &Board, epoch: u64) -> Result<Option<AbPlan>> {
    let Some(update) = &cfg.update else {
        return Ok(None);
    };
    let Some(ab) = &board.ab else {
        bail!(
            "[update]: board {} has no [ab] section, so its images cannot hold two root slots",
            board.name
        );
    };
    let release = cfg.release(epoch);
    let r = release.as_str();
    if r.len() > MAX_RELEASE_LEN || r.contains('+') {
        bail!(
            "image.release: `{r}` cannot name a root slot: at most {MAX_RELEASE_LEN} characters and no `+` (boot counting uses it in file names)"
        );
    }
    Ok(Some(AbPlan {
        scheme: ab.scheme,
        arch: board.arch.clone(),
        release,
        update: update.clone(),
        slot_size: ab.slot_size.bytes(),
        data_size: ab.data_size.bytes(),
        slot_boot_size: ab.slot_boot_size.map(|s| s.bytes()),
    }))
}

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The shared FAT partition (ESP, or the Pi's `bootfs`): boot loader, clutch.toml.
    Boot,
    /// A slot's own FAT boot partition (`tryboot`).
    SlotBoot(Slot),
    Root(Slot),
    Data,
}

/// One partition of an A/B disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbPart {
    pub number: u32,
    pub role: Role,
    /// GPT partition name (empty on MBR).
    pub label: String,
    /// GPT type (unused on MBR).
    pub gpt_type: uuid::Uuid,
    /// MBR system id (unused on GPT).
    pub mbr_type: u8,
    pub extent: Extent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbLayout {
    pub table: PartitionTable,
    pub total: u64,
    pub parts: Vec<AbPart>,
}

impl AbLayout {
    pub fn part(&self, role: Role) -> &AbPart {
        self.parts
            .iter()
            .find(|p| p.role == role)
            .expect("every A/B layout has this partition")
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Places the partitions. `root_needed`: the release's root file system size, which must
/// fit a slot (and so must every later release).
pub fn layout(board: &Board, p: &AbPlan, size: ImageSize, root_needed: u64) -> Result<AbLayout> {
    if root_needed > p.slot_size {
        bail!(
            "release {} needs a {} MiB root file system, but the board's root slots hold {} MiB (ab.slot_size)",
            p.release,
            root_needed.div_ceil(1 << 20),
            p.slot_size >> 20
        );
    }
    let a = board.alignment.bytes();
    let table = match p.scheme {
        AbScheme::SystemdBoot | AbScheme::Tryboot => PartitionTable::Gpt,
        AbScheme::OsPrefix => PartitionTable::Mbr,
    };
    let root_type = root_type(&p.arch)?;
    let mut wanted: Vec<(Role, String, uuid::Uuid, u8, u64)> = Vec::new();
    let boot_type = match p.scheme {
        AbScheme::SystemdBoot => ESP,
        _ => BASIC_DATA,
    };
    wanted.push((
        Role::Boot,
        "boot".into(),
        boot_type,
        crate::disk::MBR_FAT32_LBA,
        board.boot.size.bytes(),
    ));
    if p.scheme == AbScheme::Tryboot {
        let s = p.slot_boot_size.unwrap_or(board.boot.size.bytes());
        wanted.push((
            Role::SlotBoot(Slot::A),
            slot_boot_label(&p.release),
            BASIC_DATA,
            crate::disk::MBR_FAT32_LBA,
            s,
        ));
        wanted.push((
            Role::SlotBoot(Slot::B),
            EMPTY_LABEL.into(),
            BASIC_DATA,
            crate::disk::MBR_FAT32_LBA,
            s,
        ));
    }
    let mbr_linux = crate::disk::MBR_LINUX;
    wanted.push((
        Role::Root(Slot::A),
        root_label(&p.release),
        root_type,
        mbr_linux,
        p.slot_size,
    ));
    wanted.push((
        Role::Root(Slot::B),
        EMPTY_LABEL.into(),
        root_type,
        mbr_linux,
        p.slot_size,
    ));
    let mut parts = Vec::new();
    let mut at = a;
    for (i, (role, label, gpt_type, mbr_type, size)) in wanted.into_iter().enumerate() {
        let size = align_up(size, a);
        parts.push(AbPart {
            number: i as u32 + 1,
            role,
            label: if table == PartitionTable::Gpt {
                label
            } else {
                String::new()
            },
            gpt_type,
            mbr_type,
            extent: Extent { start: at, size },
        });
        at += size;
    }
    let tail = if table == PartitionTable::Gpt { a } else { 0 };
    let min_data = align_up(p.data_size, a);
    let (data_size, total) = match size {
        ImageSize::Auto => (min_data, at + min_data + tail),
        ImageSize::Fixed(s) => {
            let total = s.bytes() / a * a;
            let avail = total.saturating_sub(at + tail);
            if avail < min_data {
                bail!(
                    "image.size = {s} is too small for two {} MiB root slots and a {} MiB data partition",
                    p.slot_size >> 20,
                    min_data >> 20
                );
            }
            (avail, total)
        }
    };
    parts.push(AbPart {
        number: parts.len() as u32 + 1,
        role: Role::Data,
        label: if table == PartitionTable::Gpt {
            DATA_LABEL.into()
        } else {
            String::new()
        },
        gpt_type: LINUX_DATA,
        mbr_type: mbr_linux,
        extent: Extent {
            start: at,
            size: data_size,
        },
    });
    Ok(AbLayout {
        table,
        total,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clutch_config::Size;

    fn cfg(extra: &str) -> ImageConfig {
        crate::testutil::image_config(&format!(
            "[update]\nsource = \"http://10.0.0.1:8080/update/\"\n{extra}"
        ))
    }

    #[test]
    fn no_update_section_no_slots_and_a_board_without_ab_says_so() {
        let b = crate::testutil::board("amd64");
        let plain = crate::testutil::image_config("");
        assert!(plan(&plain, &b, 0).unwrap().is_none());
        let mut no_ab = b.clone();
        no_ab.ab = None;
        let e = plan(&cfg(""), &no_ab, 0).unwrap_err().to_string();
        assert!(e.contains("has no [ab] section"), "{e}");
    }

    #[test]
    fn release_defaults_to_the_build_time_and_must_fit_a_label() {
        let b = crate::testutil::board("amd64");
        let p = plan(&cfg(""), &b, 1_764_763_200).unwrap().unwrap();
        assert_eq!(p.release.as_str(), "2025.12.03.120000");
        let mut c = cfg("");
        c.image.release = Some("x".repeat(26).try_into().unwrap());
        let e = plan(&c, &b, 0).unwrap_err().to_string();
        assert!(e.contains("at most 25 characters"), "{e}");
        c.image.release = Some("1.0+b1".try_into().unwrap());
        assert!(plan(&c, &b, 0).is_err());
    }

    #[test]
    fn amd64_layout_is_esp_two_typed_slots_then_data_last() {
        let b = crate::testutil::board("amd64");
        let mut c = cfg("");
        c.image.release = Some("1".try_into().unwrap());
        let p = plan(&c, &b, 0).unwrap().unwrap();
        let l = layout(&b, &p, ImageSize::Auto, 900 << 20).unwrap();
        let got: Vec<_> = l
            .parts
            .iter()
            .map(|p| (p.number, p.label.as_str(), p.gpt_type.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    "boot",
                    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".to_string()
                ),
                (2, "clutch_1", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709".into()),
                (3, "_empty", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709".into()),
                (
                    4,
                    "clutch-data",
                    "0fc63daf-8483-4772-8e79-3d69d8477de4".into()
                ),
            ]
        );
        assert_eq!(l.table, PartitionTable::Gpt);
        let a = l.part(Role::Root(Slot::A)).extent;
        let bb = l.part(Role::Root(Slot::B)).extent;
        assert_eq!(a.size, bb.size);
        assert_eq!(a.size, b.ab.as_ref().unwrap().slot_size.bytes());
        let d = l.part(Role::Data).extent;
        assert_eq!(
            d.end() + (1 << 20),
            l.total,
            "data is last, before the backup GPT"
        );
        let fixed = layout(&b, &p, ImageSize::Fixed(Size::mib(16 << 10)), 900 << 20).unwrap();
        assert_eq!(fixed.part(Role::Data).extent.end() + (1 << 20), 16 << 30);
        let e = layout(&b, &p, ImageSize::Auto, 64 << 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ab.slot_size"), "{e}");
    }

    /// The numbers are a contract: autoboot.txt names boot partitions 2 and 3, and
    /// clutch-firstboot finds slots by number (its `update::boot::Scheme`).
    #[test]
    fn rpi4_layout_is_bootfs_then_boot_and_root_per_slot_then_data() {
        let b = crate::testutil::board("rpi4");
        let mut c = cfg("");
        c.image.release = Some("1".try_into().unwrap());
        let p = plan(&c, &b, 0).unwrap().unwrap();
        assert_eq!(p.scheme, AbScheme::Tryboot);
        let l = layout(&b, &p, ImageSize::Auto, 900 << 20).unwrap();
        assert_eq!(l.table, PartitionTable::Gpt, "tryboot_a_b wants GPT");
        let got: Vec<_> = l
            .parts
            .iter()
            .map(|p| (p.number, p.role, p.label.as_str(), p.gpt_type))
            .collect();
        let arm64_root = root_type("arm64").unwrap();
        assert_eq!(
            got,
            [
                (1, Role::Boot, "boot", BASIC_DATA),
                (2, Role::SlotBoot(Slot::A), "clutchboot_1", BASIC_DATA),
                (3, Role::SlotBoot(Slot::B), "_empty", BASIC_DATA),
                (4, Role::Root(Slot::A), "clutch_1", arm64_root),
                (5, Role::Root(Slot::B), "_empty", arm64_root),
                (6, Role::Data, "clutch-data", LINUX_DATA),
            ]
        );
        let ab = b.ab.as_ref().unwrap();
        for s in [Slot::A, Slot::B] {
            assert_eq!(
                l.part(Role::SlotBoot(s)).extent.size,
                ab.slot_boot_size.unwrap().bytes()
            );
            assert_eq!(l.part(Role::Root(s)).extent.size, ab.slot_size.bytes());
        }
        assert_eq!(
            files::autoboot_txt(
                l.part(Role::SlotBoot(Slot::A)).number,
                l.part(Role::SlotBoot(Slot::B)).number
            ),
            files::autoboot_txt(2, 3),
            "the image's autoboot.txt names the layout's slot boot partitions"
        );
    }
}
