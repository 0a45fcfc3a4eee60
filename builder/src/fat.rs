//! The FAT32 boot partition, written with mtools straight into the image file at the
//! partition's offset (`-i image@@offset`): no loop device, no mount.
//!
//! Why not the `fatfs` crate: its newest release on crates.io (0.3.6) writes long-file-name
//! entries for `.` and `..` and points FAT32 `..` entries at the root cluster; `fsck.vfat`
//! rejects every directory it creates (see the `fatfs_0_3_is_rejected_by_fsck` note in the
//! issue). mtools is already needed for syslinux, is what the Debian installer uses, and
//! honours SOURCE_DATE_EPOCH.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd;
use crate::disk::{Extent, SECTOR};

/// One file to put on the FAT partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatFile {
    /// Path on the partition, `/`-separated, relative.
    pub path: String,
    pub data: Vec<u8>,
}

fn mtools(prog: &str) -> Command {
    let mut c = Command::new(prog);
    // Images are not real drives: skip geometry checks; a fixed clock for reproducibility.
    c.env("MTOOLS_SKIP_CHECK", "1").env(
        "SOURCE_DATE_EPOCH",
        crate::disk::source_date_epoch()
            .max(315_532_800)
            .to_string(),
    );
    c
}

fn drive(image: &Path, at: Extent) -> String {
    format!("{}@@{}", image.display(), at.start)
}

/// Formats the extent of `image` as FAT32 and writes `files` (sorted, parents created).
pub fn write_fat(
    image: &Path,
    at: Extent,
    label: &str,
    volume_id: u32,
    files: &[FatFile],
) -> Result<()> {
    let d = drive(image, at);
    cmd::run(
        mtools("mformat")
            .args(["-i", &d, "-F", "-v", label, "-N"])
            .arg(format!("{volume_id:08x}"))
            .args(["-h", "255", "-s", "63", "-H"])
            .arg((at.start / SECTOR).to_string())
            .arg("-T")
            .arg((at.size / SECTOR).to_string())
            .arg("::"),
    )
    .context("formatting the FAT32 boot partition (mformat)")?;
    root_dir_label_as_given(image, at, label)?;

    // Stage the files in a folder with clamped times, then copy the tree in one call.
    let tmp = tempfile::tempdir()?;
    let mut sorted: Vec<&FatFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mtime = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(crate::disk::source_date_epoch().max(315_532_800));
    for f in &sorted {
        let p = tmp.path().join(&f.path);
        std::fs::create_dir_all(p.parent().expect("file has a parent"))?;
        std::fs::write(&p, &f.data)?;
        std::fs::File::options()
            .write(true)
            .open(&p)?
            .set_modified(mtime)?;
    }
    // `mcopy -s -m` gives the directories it makes their source's mtime too: clamp them
    // (else every build differs in the directory entries).
    let epoch = crate::disk::source_date_epoch().max(315_532_800);
    crate::repro::clamp_tree_times(tmp.path(), epoch)?;
    let mut top: Vec<_> = std::fs::read_dir(tmp.path())?
        .flatten()
        .map(|e| e.path())
        .collect();
    top.sort();
    if top.is_empty() {
        return Ok(());
    }
    cmd::run(
        mtools("mcopy")
            .args(["-s", "-p", "-m", "-Q", "-i", &d])
            .args(&top)
            .arg("::/"),
    )
    .context("copying files onto the FAT32 boot partition (mcopy; is boot.size big enough?)")?;
    Ok(())
}

/// mformat writes the label as given into the boot sector but upper-cased into the root
/// directory's volume-label entry; fsck.vfat reports the difference. Make both say `label`
/// (e.g. the Raspberry Pi's lower-case `bootfs`).
fn root_dir_label_as_given(image: &Path, at: Extent, label: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, at.start)?;
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([bs[o], bs[o + 1]]));
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]));
    let (bytes, per_cluster, reserved, fats) = (
        u16_at(0x0b),
        u64::from(bs[0x0d]),
        u16_at(0x0e),
        u64::from(bs[0x10]),
    );
    let (fat_size, root_cluster) = (u32_at(0x24), u32_at(0x2c));
    let root = at.start + (reserved + fats * fat_size + (root_cluster - 2) * per_cluster) * bytes;
    let mut dir = vec![0u8; (per_cluster * bytes) as usize];
    f.read_exact_at(&mut dir, root)?;
    let mut name = [b' '; 11];
    name[..label.len().min(11)].copy_from_slice(&label.as_bytes()[..label.len().min(11)]);
    for (i, e) in dir.chunks(32).enumerate() {
        if e[0] == 0 {
            break;
        }
        if e[0] != 0xe5 && e[11] == 0x08 {
            f.write_all_at(&name, root + 32 * i as u64)?;
            f.sync_all()?;
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one file back from the FAT partition of an image.
pub fn read_fat_file(image: &Path, at: Extent, path: &str) -> Result<Vec<u8>> {
    let d = drive(image, at);
    let out = mtools("mcopy")
        .args(["-n", "-i", &d])
        .arg(format!("::/{path}"))
        .arg("-")
        .output()
        .context("running mcopy")?;
    if !out.status.success() {
        anyhow::bail!(
            "{path} is not on the boot partition: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Keeps the FAT32 backup boot sector equal to the primary one (syslinux rewrites only the
/// primary; fsck.vfat reports the difference).
pub fn sync_backup_boot_sector(image: &Path, at: Extent) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, at.start)?;
    let backup = u16::from_le_bytes([bs[0x32], bs[0x33]]) as u64;
    if backup == 0 || backup == 0xffff {
        return Ok(());
    }
    f.write_all_at(&bs, at.start + backup * SECTOR)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A sparse file big enough for `at` plus `tail` bytes.
    fn blank_image(dir: &Path, at: Extent, tail: u64) -> PathBuf {
        let img = dir.join("f.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(at.end() + tail)
            .unwrap();
        img
    }

    /// Copies the partition out, checks it with the host's fsck.vfat (dosfstools; installed
    /// by .ci/run), which must find nothing to fix, and returns its `blkid -o export`.
    fn fsck_and_blkid(dir: &Path, img: &Path, at: Extent) -> String {
        let part = dir.join("p.img");
        let data = crate::disk::read_at(img, at.start, at.size as usize).unwrap();
        std::fs::write(&part, data).unwrap();
        let out = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&part)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("differ"), "{text}");
        let blkid = Command::new("blkid")
            .args(["-o", "export"])
            .arg(&part)
            .output()
            .unwrap();
        String::from_utf8_lossy(&blkid.stdout).into_owned()
    }

    #[test]
    fn fat32_round_trip_and_fsck() {
        let t = tempfile::tempdir().unwrap();
        let at = Extent {
            start: 1 << 20,
            size: 64 << 20,
        };
        let img = blank_image(t.path(), at, 1 << 20);
        let files = vec![
            FatFile {
                path: "EFI/BOOT/BOOTX64.EFI".into(),
                data: vec![7; 5000],
            },
            FatFile {
                path: "loader/entries/clutch.conf".into(),
                data: b"title clutch\n".to_vec(),
            },
            FatFile {
                path: "clutch.toml".into(),
                data: b"version = 1\n".to_vec(),
            },
        ];
        write_fat(&img, at, "ESP", 0x1234_5678, &files).unwrap();
        assert_eq!(
            read_fat_file(&img, at, "clutch.toml").unwrap(),
            b"version = 1\n"
        );
        assert_eq!(
            read_fat_file(&img, at, "EFI/BOOT/BOOTX64.EFI").unwrap(),
            vec![7; 5000]
        );
        assert!(read_fat_file(&img, at, "nope.txt").is_err());
        let b = fsck_and_blkid(t.path(), &img, at);
        assert!(b.contains("TYPE=vfat") && b.contains("LABEL=ESP"), "{b}");
        let bs = crate::disk::read_at(&img, at.start, 512).unwrap();
        assert_eq!(
            &bs[0x52..0x5a],
            b"FAT32   ",
            "FAT32 file system type in the boot sector"
        );
    }

    #[test]
    fn lower_case_label_is_kept_in_both_places_and_fsck_agrees() {
        let t = tempfile::tempdir().unwrap();
        let at = Extent {
            start: 4 << 20,
            size: 64 << 20,
        };
        let img = blank_image(t.path(), at, 0);
        let files = vec![FatFile {
            path: "config.txt".into(),
            data: b"arm_64bit=1\n".to_vec(),
        }];
        write_fat(&img, at, "bootfs", 0x1234_5678, &files).unwrap();
        let b = fsck_and_blkid(t.path(), &img, at);
        assert!(b.contains("\nLABEL=bootfs\n"), "{b}");
        assert_eq!(
            read_fat_file(&img, at, "config.txt").unwrap(),
            b"arm_64bit=1\n"
        );
    }
}
