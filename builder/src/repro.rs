//! Reproducible images: with `SOURCE_DATE_EPOCH` set and the same cached root filesystem,
//! two builds of one config give byte-identical raw images.
//!
//! Sources of difference found and how each is handled:
//! - mtimes of files the builder writes into the staged tree (overlays, fstab, units, user
//!   files): clamped to SOURCE_DATE_EPOCH by [`clamp_tree_times`] before mkfs.
//! - ext4 inode ctime and atime: `mkfs.ext4 -d` (e2fsprogs 1.47.0) copies them from the
//!   staged files' `stat`, where ctime is the time of extraction and cannot be set from user
//!   space, and atime moves when mkfs reads the file. [`fix_ext4_times`] rewrites both with
//!   debugfs on every used inode after mkfs.
//! - ext4 superblock/crtime: `E2FSPROGS_FAKE_TIME` (disk::mkfs_root); UUID and htree hash
//!   seed fixed from the config hash; mke2fs reads directories with scandir in name order, so
//!   inode numbers and directory blocks do not depend on the host's readdir order.
//! - /etc/shadow last-change day: shadow's useradd honours SOURCE_DATE_EPOCH (inherited).
//! - FAT: mtools honours SOURCE_DATE_EPOCH; the volume id comes from the config hash.
//! - GPT disk and partition GUIDs: from the config hash (disk::Ids).
//! - qcow2 (`qemu-img convert`) and zst (`zstd -T0`: multi-threaded output does not depend
//!   on the number of threads) are functions of the raw image.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Sets every mtime later than `epoch` in the tree to `epoch`, and every atime to the
/// (clamped) mtime; symlinks themselves included. Returns how many entries were clamped.
pub fn clamp_tree_times(root: &Path, epoch: u64) -> Result<usize> {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = p
            .symlink_metadata()
            .with_context(|| format!("reading {}", p.display()))?;
        if m.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("listing {}", p.display()))? {
                stack.push(e?.path());
            }
        }
        let mtime = m.mtime();
        let clamped = if mtime < 0 || (mtime as u64) <= epoch {
            mtime
        } else {
            n += 1;
            epoch as i64
        };
        let t = libc::timespec {
            tv_sec: clamped as libc::time_t,
            tv_nsec: if clamped == mtime {
                m.mtime_nsec() as _
            } else {
                0
            },
        };
        let times = [t, t];
        let c = CString::new(p.as_os_str().as_bytes())?;
        // SAFETY: a valid NUL-terminated path and a two-element timespec array.
        let r = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setting the times of {}", p.display()));
        }
    }
    Ok(n)
}

/// Inode numbers in use, from `dumpe2fs` output: all inodes minus the "Free inodes:"
/// ranges of every group.
pub fn used_inodes(dumpe2fs: &str) -> Result<Vec<u32>> {
    let count: u32 = dumpe2fs
        .lines()
        .find_map(|l| l.strip_prefix("Inode count:"))
        .and_then(|v| v.trim().parse().ok())
        .context("dumpe2fs printed no `Inode count:`")?;
    let mut free = vec![false; count as usize + 1];
    for l in dumpe2fs.lines() {
        let Some(r) = l.trim_start().strip_prefix("Free inodes: ") else {
            continue;
        };
        if !l.starts_with("  ") {
            continue; // the superblock's total, not a group's list
        }
        for part in r.split(", ").map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (u32, u32) = (
                a.parse()
                    .with_context(|| format!("bad free inode range `{part}`"))?,
                b.parse()
                    .with_context(|| format!("bad free inode range `{part}`"))?,
            );
            if b > count || a > b {
                bail!("free inode range `{part}` outside 1-{count}");
            }
            for i in a..=b {
                free[i as usize] = true;
            }
        }
    }
    // 1-10 are reserved (2 is the root directory); 11 is lost+found.
    Ok((1..=count)
        .filter(|&i| !free[i as usize] && (i == 2 || i >= 11))
        .collect())
}

/// debugfs commands that set ctime and atime of `inodes` to `epoch`.
pub fn time_commands(inodes: &[u32], epoch: u64) -> String {
    let mut s = String::with_capacity(inodes.len() * 64);
    for i in inodes {
        s.push_str(&format!(
            "sif <{i}> ctime @{epoch}\nsif <{i}> atime @{epoch}\n"
        ));
    }
    s
}

/// Rewrites ctime and atime of every used inode of the ext4 file system at `offset` in
/// `image` to `epoch` (see the module notes).
pub fn fix_ext4_times(image: &Path, offset: u64, epoch: u64) -> Result<usize> {
    let dev = format!("{}?offset={offset}", image.display());
    let dump = cmd::run(Command::new("dumpe2fs").arg(&dev))
        .context("listing the root file system's inodes (dumpe2fs)")?;
    let inodes = used_inodes(&dump)?;
    let cmds = tempfile::NamedTempFile::new()?;
    std::fs::write(cmds.path(), time_commands(&inodes, epoch))?;
    cmd::run(
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .arg("-w")
            .arg("-f")
            .arg(cmds.path())
            .arg(&dev),
    )
    .context("fixing inode times in the root file system (debugfs)")?;
    Ok(inodes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_new_files_and_keeps_old_ones() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/new"), b"x").unwrap();
        std::fs::write(r.join("old"), b"y").unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(r.join("old"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::os::unix::fs::symlink("new", r.join("etc/link")).unwrap();
        let n = clamp_tree_times(r, 1_700_000_000).unwrap();
        assert_eq!(n, 4, "root, etc, etc/new, etc/link");
        let mt = |p: &str| r.join(p).symlink_metadata().unwrap().mtime();
        assert_eq!(mt("etc/new"), 1_700_000_000);
        assert_eq!(mt("etc/link"), 1_700_000_000);
        assert_eq!(mt("etc"), 1_700_000_000);
        assert_eq!(mt("old"), 1_000_000);
        let m = r.join("etc/new").metadata().unwrap();
        assert_eq!(m.atime(), 1_700_000_000);
    }

    #[test]
    fn used_inodes_from_dumpe2fs() {
        let d = "Inode count:              40\nFree inodes:              25\n\
            Group 0: (Blocks 0-32767)\n  Free inodes: 16-20, 22-40\n";
        assert_eq!(used_inodes(d).unwrap(), vec![2, 11, 12, 13, 14, 15, 21]);
        assert!(used_inodes("nothing").is_err());
    }

    /// mkfs.ext4 -d twice on the same tree, with the tree touched in between: equal images
    /// only after the time fix-up.
    #[test]
    fn ext4_from_the_same_tree_is_byte_identical() {
        if !crate::doctor::find_in_path("debugfs") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("d/e")).unwrap();
        for n in ["b", "a", "c"] {
            std::fs::write(tree.join("d").join(n), n).unwrap();
        }
        let epoch = 1_700_000_000;
        let mk = |name: &str| {
            let img = t.path().join(name);
            std::fs::File::create(&img)
                .unwrap()
                .set_len(40 << 20)
                .unwrap();
            clamp_tree_times(&tree, epoch).unwrap();
            // As disk::mkfs_root does, with the fake time fixed here (no env in tests).
            cmd::run(
                Command::new("mkfs.ext4")
                    .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
                    .args(["-q", "-F", "-b", "4096", "-U", "11111111-2222-3333-4444-555555555555"])
                    .args(["-E", "offset=1048576,root_owner=0:0,hash_seed=11111111-2222-3333-4444-555555555555,lazy_itable_init=0,nodiscard", "-d"])
                    .arg(&tree)
                    .arg(&img)
                    .arg("32768k"),
            )
            .unwrap();
            fix_ext4_times(&img, 1 << 20, epoch).unwrap();
            crate::fetch::hash_file(&img).unwrap()
        };
        let a = mk("a.img");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        // A metadata change moves the ctime of the file on the host.
        std::fs::set_permissions(
            tree.join("d/a"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        let b = mk("b.img");
        assert_eq!(a, b);
    }
}
