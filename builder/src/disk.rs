//! The disk image: a layout computed as plain data, then written into one file without loop
//! devices or mounts — partition table with the `gpt` crate, the FAT boot partition with
//! `fatfs` (see `fat`), the ext4 root with `mkfs.ext4 -d -E offset=`, syslinux with `--offset`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clutch_config::board::{BootKind, PartitionTable};
use clutch_config::{Board, ImageSize};

use crate::cmd;

pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub size: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub total: u64,
    pub boot: Extent,
    pub root: Extent,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Room an ext4 filesystem needs for `content` bytes of files plus `headroom` free:
/// metadata (inode tables, journal, reserved blocks) is taken as a fifth of the content
/// plus 64MiB.
pub fn ext4_size_for(content: u64, headroom: u64) -> u64 {
    content + content / 5 + (64 << 20) + headroom
}

/// Places the boot and root partitions. `root_needed` is the minimum root filesystem size.
pub fn plan(board: &Board, size: ImageSize, root_needed: u64) -> Result<Layout> {
    let a = board.alignment.bytes();
    let boot = Extent {
        start: a,
        size: align_up(board.boot.size.bytes(), a),
    };
    let root_start = align_up(boot.end(), a);
    // GPT keeps a backup table in the last 33 sectors; keep the end aligned anyway.
    let tail = match board.partition_table {
        PartitionTable::Gpt => a,
        PartitionTable::Mbr => 0,
    };
    let (root_size, total) = match size {
        ImageSize::Auto => {
            let rs = align_up(root_needed, a);
            (rs, root_start + rs + tail)
        }
        ImageSize::Fixed(s) => {
            let total = s.bytes() / a * a;
            let avail = total.saturating_sub(root_start + tail);
            if avail < root_needed {
                bail!(
                    "image.size = {s} is too small: the root filesystem needs {} MiB, leaving room for {} MiB",
                    root_needed.div_ceil(1 << 20),
                    avail >> 20
                );
            }
            (avail, total)
        }
    };
    Ok(Layout {
        total,
        boot,
        root: Extent {
            start: root_start,
            size: root_size,
        },
    })
}

/// Stable identifiers of one image, derived from the build's seed so that equal inputs give
/// equal images.
#[derive(Debug, Clone)]
pub struct Ids {
    pub disk_guid: uuid::Uuid,
    pub boot_guid: uuid::Uuid,
    pub root_guid: uuid::Uuid,
    pub root_fs_uuid: uuid::Uuid,
    pub fat_volume_id: u32,
    pub mbr_disk_id: u32,
}

impl Ids {
    pub fn from_seed(seed: &str) -> Ids {
        let ns = uuid::Uuid::from_u128(0x6c75_7463_6863_6c75_7463_6800_0000_0001);
        let u = |what: &str| uuid::Uuid::new_v5(&ns, format!("{seed}/{what}").as_bytes());
        let v = u("fat-volume-id");
        let m = u("mbr-disk-id");
        Ids {
            disk_guid: u("disk"),
            boot_guid: u("boot"),
            root_guid: u("root"),
            root_fs_uuid: u("rootfs"),
            fat_volume_id: u32::from_le_bytes(v.as_bytes()[..4].try_into().expect("4 bytes")),
            mbr_disk_id: u32::from_le_bytes(m.as_bytes()[..4].try_into().expect("4 bytes")) | 1,
        }
    }

    /// PARTUUID strings as the kernel reports them.
    pub fn partuuids(&self, table: PartitionTable) -> (String, String) {
        match table {
            PartitionTable::Gpt => (self.boot_guid.to_string(), self.root_guid.to_string()),
            PartitionTable::Mbr => (
                format!("{:08x}-01", self.mbr_disk_id),
                format!("{:08x}-02", self.mbr_disk_id),
            ),
        }
    }
}

/// Creates `path` as a sparse file of the layout's size and writes the partition table.
pub fn create_with_table(path: &Path, board: &Board, layout: &Layout, ids: &Ids) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(layout.total)?;
    match board.partition_table {
        PartitionTable::Gpt => write_gpt(f, board, layout, ids),
        PartitionTable::Mbr => write_mbr(f, layout, ids),
    }
}

/// MBR partition type of a FAT32 partition addressed by LBA.
pub const MBR_FAT32_LBA: u8 = 0x0c;
/// MBR partition type of a Linux file system.
pub const MBR_LINUX: u8 = 0x83;

/// The two MBR partition entries of a layout: FAT32 (LBA) boot, Linux root.
pub fn mbr_entries(layout: &Layout) -> Result<[mbrman::MBRPartitionEntry; 2]> {
    let lba = |b: u64, what: &str| {
        u32::try_from(b / SECTOR).with_context(|| {
            format!("the {what} is beyond the 2 TiB an MBR partition table can address")
        })
    };
    let entry = |e: Extent, sys: u8, what: &str| -> Result<mbrman::MBRPartitionEntry> {
        Ok(mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys,
            last_chs: mbrman::CHS::empty(),
            starting_lba: lba(e.start, what)?,
            sectors: lba(e.size, what)?,
        })
    };
    Ok([
        entry(layout.boot, MBR_FAT32_LBA, "boot partition")?,
        entry(layout.root, MBR_LINUX, "root partition")?,
    ])
}

fn write_mbr(mut f: File, layout: &Layout, ids: &Ids) -> Result<()> {
    // The kernel's PARTUUID for MBR disks is the disk signature (little-endian at byte 440)
    // printed as 8 hex digits, then `-NN`.
    let mut mbr = mbrman::MBR::new_from(&mut f, SECTOR as u32, ids.mbr_disk_id.to_le_bytes())
        .context("creating the MBR")?;
    let [boot, root] = mbr_entries(layout)?;
    mbr[1] = boot;
    mbr[2] = root;
    mbr.write_into(&mut f).context("writing the MBR")?;
    f.sync_all()?;
    Ok(())
}

fn write_gpt(mut f: File, board: &Board, layout: &Layout, ids: &Ids) -> Result<()> {
    use gpt::partition::Partition;
    use gpt::partition_types;
    let lba = |b: u64| b / SECTOR;
    let boot_type = match board.boot.kind {
        BootKind::Esp => partition_types::EFI,
        BootKind::Fat => partition_types::BASIC,
    };
    // Legacy BIOS bootable (attribute bit 2): gptmbr.bin boots the partition that has it.
    let boot_flags = if board.boot.syslinux.is_some() {
        1 << 2
    } else {
        0
    };
    let mut parts = BTreeMap::new();
    parts.insert(
        1,
        Partition {
            part_type_guid: boot_type,
            part_guid: ids.boot_guid,
            first_lba: lba(layout.boot.start),
            last_lba: lba(layout.boot.end()) - 1,
            flags: boot_flags,
            name: "boot".into(),
        },
    );
    parts.insert(
        2,
        Partition {
            part_type_guid: partition_types::LINUX_FS,
            part_guid: ids.root_guid,
            first_lba: lba(layout.root.start),
            last_lba: lba(layout.root.end()) - 1,
            flags: 0,
            name: "root".into(),
        },
    );
    let mut mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(lba(layout.total) - 1).unwrap_or(u32::MAX),
    );
    if let Some(s) = &board.boot.syslinux {
        let mut code = [0u8; 440];
        File::open(&s.mbr)
            .and_then(|mut m| m.read_exact(&mut code))
            .with_context(|| {
                format!(
                    "reading the BIOS boot code {} (package syslinux-common)",
                    s.mbr
                )
            })?;
        mbr.set_bootcode(code);
    }
    mbr.overwrite_lba0(&mut f)
        .context("writing the protective MBR")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(f, Some(ids.disk_guid))
        .context("creating the GPT")?;
    disk.update_partitions(parts).context("adding partitions")?;
    let f = disk.write().context("writing the GPT")?;
    f.sync_all()?;
    Ok(())
}

/// Writes an ext4 filesystem holding `tree` into the image at the root extent.
pub fn mkfs_root(
    image: &Path,
    layout: &Layout,
    label: &str,
    uuid: &uuid::Uuid,
    tree: &Path,
) -> Result<()> {
    let mut c = Command::new("mkfs.ext4");
    c.env("E2FSPROGS_FAKE_TIME", source_date_epoch().to_string())
        .args(["-q", "-F", "-b", "4096", "-L", label, "-U"])
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},root_owner=0:0,hash_seed={uuid},lazy_itable_init=0,nodiscard",
            layout.root.start
        ))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", layout.root.size / 1024));
    cmd::run(&mut c).context("writing the ext4 root filesystem (mkfs.ext4 -d)")?;
    Ok(())
}

/// Installs syslinux into the FAT partition at its offset in the image.
pub fn install_syslinux(image: &Path, layout: &Layout, dir: &str) -> Result<()> {
    cmd::run(
        Command::new("syslinux")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("--install")
            .arg("--offset")
            .arg(layout.boot.start.to_string())
            .arg("--directory")
            .arg(format!("/{dir}"))
            .arg(image),
    )
    .context("installing syslinux for legacy BIOS boot")?;
    Ok(())
}

/// Seconds since the epoch used for timestamps inside the image: `SOURCE_DATE_EPOCH` when
/// set, else now.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        })
}

/// Bytes a tree occupies (allocated blocks, directories and inodes included).
pub fn tree_usage(root: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = p.symlink_metadata()?;
        total += m.blocks() * 512 + 256; // + inode
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(total)
}

/// Reads `len` bytes at `offset` of a file (tests and checks).
pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut b = vec![0; len];
    f.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clutch_config::Size;

    fn board() -> Board {
        crate::testutil::board("amd64")
    }

    #[test]
    fn auto_layout_is_aligned_and_leaves_room_for_backup_gpt() {
        let b = board();
        let l = plan(&b, ImageSize::Auto, 700 << 20).unwrap();
        let mib = 1 << 20;
        assert_eq!(l.boot.start, mib);
        assert_eq!(l.boot.size, 256 * mib);
        assert_eq!(l.root.start % mib, 0);
        assert!(l.root.size >= 700 * mib);
        assert!(l.total >= l.root.end() + 33 * SECTOR);
        assert_eq!(l.total % mib, 0);
    }

    #[test]
    fn fixed_size_gives_root_the_rest_or_says_why_not() {
        let b = board();
        let l = plan(&b, ImageSize::Fixed(Size::mib(4096)), 700 << 20).unwrap();
        assert_eq!(l.total, 4096 << 20);
        assert_eq!(l.root.end(), l.total - (1 << 20));
        let e = plan(&b, ImageSize::Fixed(Size::mib(512)), 700 << 20).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    #[test]
    fn ids_are_stable_per_seed() {
        let a = Ids::from_seed("x");
        let b = Ids::from_seed("x");
        let c = Ids::from_seed("y");
        assert_eq!(a.root_guid, b.root_guid);
        assert_ne!(a.root_guid, c.root_guid);
        assert_ne!(a.root_guid, a.boot_guid);
        let (bp, rp) = a.partuuids(PartitionTable::Mbr);
        assert!(bp.ends_with("-01") && rp.ends_with("-02"));
    }

    #[test]
    fn gpt_table_on_a_plain_file() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("d.img");
        let b = board();
        let l = plan(&b, ImageSize::Auto, 64 << 20).unwrap();
        let ids = Ids::from_seed("t");
        create_with_table(&img, &b, &l, &ids).unwrap();
        let disk = gpt::GptConfig::new().writable(false).open(&img).unwrap();
        let p = disk.partitions();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&1].part_guid, ids.boot_guid);
        assert_eq!(p[&1].first_lba * SECTOR, l.boot.start);
        assert_eq!(p[&1].flags & 4, 4, "legacy BIOS bootable");
        assert_eq!(p[&2].last_lba * SECTOR + SECTOR, l.root.end());
        assert_eq!(*disk.guid(), ids.disk_guid);

        if Path::new("/usr/lib/syslinux/mbr/gptmbr.bin").exists() {
            let mbr = read_at(&img, 0, 512).unwrap();
            let code = std::fs::read("/usr/lib/syslinux/mbr/gptmbr.bin").unwrap();
            assert_eq!(&mbr[..64], &code[..64]);
            assert_eq!(&mbr[510..], &[0x55, 0xaa]);
        }
    }

    fn rpi_board() -> Board {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/rpi4.toml");
        clutch_config::load_board(&p).unwrap()
    }

    #[test]
    fn mbr_layout_is_4mib_aligned_fat32_lba_then_linux() {
        let b = rpi_board();
        assert_eq!(b.partition_table, PartitionTable::Mbr);
        let l = plan(&b, ImageSize::Auto, 300 << 20).unwrap();
        let a = 4 << 20;
        for e in [l.boot, l.root] {
            assert_eq!(e.start % a, 0);
            assert_eq!(e.size % a, 0);
        }
        assert!(l.boot.end() <= l.root.start);
        assert_eq!(
            l.total,
            l.root.end(),
            "no backup table at the end of an MBR disk"
        );
        let [boot, root] = mbr_entries(&l).unwrap();
        assert_eq!((boot.sys, root.sys), (0x0c, 0x83));
        assert_eq!(u64::from(root.starting_lba) * SECTOR, l.root.start);
    }

    #[test]
    fn mbr_table_on_a_plain_file_matches_the_partuuids() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("d.img");
        let b = rpi_board();
        let l = plan(&b, ImageSize::Auto, 64 << 20).unwrap();
        let ids = Ids::from_seed("t");
        create_with_table(&img, &b, &l, &ids).unwrap();
        let mut f = File::open(&img).unwrap();
        let mbr = mbrman::MBR::read_from(&mut f, 512).unwrap();
        let used: Vec<_> = mbr.iter().filter(|(_, p)| p.is_used()).collect();
        assert_eq!(used.len(), 2);
        assert_eq!(mbr[1].sys, 0x0c);
        assert_eq!(u64::from(mbr[1].starting_lba) * SECTOR, l.boot.start);
        assert_eq!(u64::from(mbr[1].sectors) * SECTOR, l.boot.size);
        assert_eq!(mbr[2].sys, 0x83);
        assert_eq!(
            u64::from(mbr[2].starting_lba + mbr[2].sectors) * SECTOR,
            l.root.end()
        );
        // What the kernel will call the partitions is what cmdline.txt and fstab say.
        let raw = read_at(&img, 0, 512).unwrap();
        let sig = u32::from_le_bytes(raw[440..444].try_into().unwrap());
        let (bp, rp) = ids.partuuids(PartitionTable::Mbr);
        assert_eq!(bp, format!("{sig:08x}-01"));
        assert_eq!(rp, format!("{sig:08x}-02"));
        assert_eq!(&raw[510..], &[0x55, 0xaa]);
        // And util-linux agrees, when it is here.
        if let Ok(o) = Command::new("sfdisk").arg("--json").arg(&img).output() {
            if o.status.success() {
                let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                let pt = &j["partitiontable"];
                assert_eq!(pt["label"], "dos");
                assert_eq!(pt["id"], format!("0x{sig:08x}"));
                assert_eq!(pt["partitions"][0]["type"], "c");
                assert_eq!(pt["partitions"][1]["type"], "83");
            }
        }
    }
}
