//! Writing an A/B disk image from an [`AbLayout`]: the partition table, the shared FAT
//! partition, slot `a` (and on `tryboot` its own boot partition), an empty slot `b`, and the
//! data partition seeded with the node's state folders. Like `crate::disk`, without loop
//! devices or mounts.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use clutch_config::board::PartitionTable;

use super::files::PERSISTENT;
use super::{AbLayout, DATA_LABEL, Role, Slot};
use crate::disk::{Extent, SECTOR};
use crate::{cmd, disk};

/// A partition's GUID, stable per build seed.
pub fn part_guid(seed: &str, number: u32) -> uuid::Uuid {
    let ns = uuid::Uuid::from_u128(0x6c75_7463_6863_6c75_7463_6800_0000_0002);
    uuid::Uuid::new_v5(&ns, format!("{seed}/part{number}").as_bytes())
}

/// Creates `path` (sparse, the layout's size) with the partition table.
pub fn create_table(
    path: &Path,
    l: &AbLayout,
    ids: &disk::Ids,
    seed: &str,
    bios_code: Option<&str>,
) -> Result<()> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(l.total)?;
    match l.table {
        PartitionTable::Gpt => write_gpt(f, l, ids, seed, bios_code),
        PartitionTable::Mbr => {
            let mut mbr =
                mbrman::MBR::new_from(&mut f, SECTOR as u32, ids.mbr_disk_id.to_le_bytes())
                    .context("creating the MBR")?;
            for p in &l.parts {
                mbr[p.number as usize] = mbrman::MBRPartitionEntry {
                    boot: mbrman::BOOT_INACTIVE,
                    first_chs: mbrman::CHS::empty(),
                    sys: p.mbr_type,
                    last_chs: mbrman::CHS::empty(),
                    starting_lba: u32::try_from(p.extent.start / SECTOR)?,
                    sectors: u32::try_from(p.extent.size / SECTOR)?,
                };
            }
            mbr.write_into(&mut f).context("writing the MBR")?;
            f.sync_all()?;
            Ok(())
        }
    }
}

fn write_gpt(
    mut f: File,
    l: &AbLayout,
    ids: &disk::Ids,
    seed: &str,
    bios_code: Option<&str>,
) -> Result<()> {
    let mut parts = BTreeMap::new();
    for p in &l.parts {
        // Legacy BIOS bootable (attribute bit 2) on the shared FAT, for gptmbr.bin.
        let flags = if p.role == Role::Boot && bios_code.is_some() {
            1 << 2
        } else {
            0
        };
        parts.insert(
            p.number,
            gpt::partition::Partition {
                part_type_guid: gpt::partition_types::Type {
                    guid: p.gpt_type,
                    os: gpt::partition_types::OperatingSystem::Linux,
                },
                part_guid: part_guid(seed, p.number),
                first_lba: p.extent.start / SECTOR,
                last_lba: p.extent.end() / SECTOR - 1,
                flags,
                name: p.label.clone(),
            },
        );
    }
    let mut mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(l.total / SECTOR - 1).unwrap_or(u32::MAX),
    );
    if let Some(code_path) = bios_code {
        let mut code = [0u8; 440];
        File::open(code_path)
            .and_then(|mut m| m.read_exact(&mut code))
            .with_context(|| format!("reading the BIOS boot code {code_path}"))?;
        mbr.set_bootcode(code);
    }
    mbr.overwrite_lba0(&mut f)
        .context("writing the protective MBR")?;
    let mut d = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(f, Some(ids.disk_guid))
        .context("creating the GPT")?;
    d.update_partitions(parts).context("adding partitions")?;
    d.write().context("writing the GPT")?.sync_all()?;
    Ok(())
}

/// Copies a file system image into the disk at `at` (it must fit).
pub fn copy_into(disk_image: &Path, at: Extent, fs_image: &Path) -> Result<()> {
    let mut src =
        File::open(fs_image).with_context(|| format!("reading {}", fs_image.display()))?;
    let len = src.metadata()?.len();
    anyhow::ensure!(
        len <= at.size,
        "{} ({} MiB) does not fit its {} MiB partition",
        fs_image.display(),
        len >> 20,
        at.size >> 20
    );
    let mut dst = OpenOptions::new().write(true).open(disk_image)?;
    dst.seek(SeekFrom::Start(at.start))?;
    // Zero blocks are skipped (seeked over): the disk stays sparse.
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = at.start;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks(4096) {
            if chunk.iter().any(|b| *b != 0) {
                dst.seek(SeekFrom::Start(pos))?;
                dst.write_all(chunk)?;
            }
            pos += chunk.len() as u64;
        }
    }
    dst.sync_all()?;
    Ok(())
}

pub use clutch_config::ab::PersistentDir;

/// Moves the node's state folders out of the staged root into `data_tree` (keeping owners
/// and modes: etcd's data folder belongs to `etcd`), leaving empty mount points behind.
pub fn split_state(staging: &Path, data_tree: &Path) -> Result<Vec<PersistentDir>> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(data_tree)?;
    let mut dirs = Vec::new();
    for (dir, node) in PERSISTENT {
        let inside = staging.join(node.trim_start_matches('/'));
        let dest = data_tree.join(dir);
        let (uid, gid, mode) = if inside.is_dir() {
            let m = std::fs::metadata(&inside)?;
            std::fs::rename(&inside, &dest)
                .with_context(|| format!("moving {} to the data partition", inside.display()))?;
            std::fs::create_dir_all(&inside)?;
            std::fs::set_permissions(&inside, m.permissions())?;
            (m.uid(), m.gid(), m.mode() & 0o7777)
        } else {
            std::fs::create_dir_all(&inside)?;
            std::fs::create_dir_all(&dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
            (0, 0, 0o755)
        };
        dirs.push(PersistentDir {
            dir: dir.to_string(),
            node: node.to_string(),
            uid,
            gid,
            mode,
        });
    }
    Ok(dirs)
}

/// The data partition's ext4 file system, holding `tree`.
pub fn mkfs_data(image: &Path, at: Extent, uuid: &uuid::Uuid, tree: &Path) -> Result<()> {
    let mut c = Command::new("mkfs.ext4");
    c.env("E2FSPROGS_FAKE_TIME", disk::source_date_epoch().to_string())
        .args(["-q", "-F", "-b", "4096", "-L", DATA_LABEL, "-U"])
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},root_owner=0:0,hash_seed={uuid},lazy_itable_init=0,nodiscard",
            at.start
        ))
        .arg("-d")
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", at.size / 1024));
    cmd::run(&mut c).context("writing the data partition (mkfs.ext4 -d)")?;
    Ok(())
}

/// The `disk::Layout` view (boot + slot a) for the helpers that take one (syslinux).
pub fn as_disk_layout(l: &AbLayout) -> disk::Layout {
    disk::Layout {
        total: l.total,
        boot: l.part(Role::Boot).extent,
        root: l.part(Role::Root(Slot::A)).extent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::{AbPlan, layout, plan};

    fn amd64_plan() -> (clutch_config::Board, AbPlan) {
        let b = crate::testutil::board("amd64");
        let mut c =
            crate::testutil::image_config("[update]\nsource = \"http://10.0.0.1:8080/update/\"\n");
        c.image.release = Some("1".try_into().unwrap());
        let p = plan(&c, &b, 0).unwrap().unwrap();
        (b, p)
    }

    #[test]
    fn gpt_has_typed_labelled_slots_that_sysupdate_can_find() {
        let (b, p) = amd64_plan();
        let l = layout(&b, &p, clutch_config::ImageSize::Auto, 300 << 20).unwrap();
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("d.img");
        create_table(&img, &l, &disk::Ids::from_seed("s"), "s", None).unwrap();
        let d = gpt::GptConfig::new().writable(false).open(&img).unwrap();
        let ps = d.partitions();
        assert_eq!(ps.len(), 4);
        assert_eq!(ps[&2].name, "clutch_1");
        assert_eq!(ps[&3].name, "_empty");
        assert_eq!(ps[&4].name, "clutch-data");
        assert_eq!(
            ps[&2].part_type_guid.guid.to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(ps[&2].part_type_guid.guid, ps[&3].part_type_guid.guid);
        assert_eq!(
            ps[&4].last_lba * SECTOR + SECTOR,
            l.part(Role::Data).extent.end()
        );
        // sfdisk agrees about names and types, when it is here.
        if let Ok(o) = Command::new("sfdisk").arg("--json").arg(&img).output() {
            if o.status.success() {
                let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                let p = &j["partitiontable"]["partitions"];
                assert_eq!(p[1]["name"], "clutch_1");
                assert_eq!(p[1]["type"], "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709");
            }
        }
    }

    #[test]
    fn state_moves_to_the_data_tree_with_its_owner_and_mode() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("stage");
        std::fs::create_dir_all(s.join("home/admin/.ssh")).unwrap();
        std::fs::write(s.join("home/admin/.ssh/authorized_keys"), b"k").unwrap();
        std::fs::create_dir_all(s.join("var/lib/etcd")).unwrap();
        std::fs::set_permissions(
            s.join("var/lib/etcd"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let d = t.path().join("data");
        let dirs = split_state(&s, &d).unwrap();
        let etcd = dirs.iter().find(|p| p.dir == "etcd").unwrap();
        assert_eq!((etcd.node.as_str(), etcd.mode), ("/var/lib/etcd", 0o700));
        let rancher = dirs.iter().find(|p| p.dir == "rancher").unwrap();
        assert_eq!((rancher.uid, rancher.mode), (0, 0o755));
        assert!(d.join("home/admin/.ssh/authorized_keys").is_file());
        assert!(
            !s.join("home/admin").exists(),
            "the slot keeps an empty mount point"
        );
        assert!(s.join("home").is_dir());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("etcd")), 0o700);
        assert_eq!(mode(&s.join("var/lib/etcd")), 0o700);
        for (dir, node) in PERSISTENT {
            assert!(d.join(dir).is_dir(), "{dir}");
            assert!(s.join(node.trim_start_matches('/')).is_dir(), "{node}");
        }
    }
}
