//! Crash-safe file writes: temp name, fsync, rename, fsync the directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `data` to `path` atomically with `mode`. The parent directory is created.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all_durable(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.clutch-tmp"));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits; set the mode exactly. A FAT mount with a fixed
        // umask refuses chmod (EPERM): the mode given to open() already holds no more bits
        // than asked for, so that is safe to ignore.
        if let Err(e) = f.set_permissions(fs::Permissions::from_mode(mode)) {
            tracing::debug!("chmod {:o} {}: {e}", mode, path.display());
        }
        f.write_all(data)?;
        f.sync_all()?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir);
    Ok(())
}

/// Like [`write_atomic`] but leaves the file alone when it already holds `data` with `mode`.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(old) = fs::read(path) {
        let same_mode = fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777 == mode)
            .unwrap_or(false);
        if old == data && same_mode {
            return Ok(false);
        }
    }
    write_atomic(path, data, mode)?;
    Ok(true)
}

/// `create_dir_all`, and the new directories' names made durable too (each parent that got
/// a new entry is fsynced), so a file written into them survives a power cut with its path.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d);
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    for m in missing.iter().rev() {
        if let Some(p) = m.parent() {
            sync_dir(if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            });
        }
    }
    Ok(())
}

/// fsync a directory so a rename in it is durable. Some file systems (vfat) refuse; ignored.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Reads a file to a string; `Ok(None)` when it does not exist.
pub fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces whatever is at `path` with a symlink to `target` (atomically, via rename).
pub fn symlink_replace(target: &Path, path: &Path) -> io::Result<()> {
    if fs::read_link(path).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    create_dir_all_durable(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.clutch-tmp"));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_skips_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/secret");
        assert!(write_if_changed(&p, b"x", 0o600).unwrap());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!write_if_changed(&p, b"x", 0o600).unwrap());
        assert!(write_if_changed(&p, b"x", 0o644).unwrap());
        assert!(write_if_changed(&p, b"y", 0o644).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"y");
        // no temp file left behind
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn durable_dirs_are_made_like_create_dir_all() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("var/lib/clutch/done");
        create_dir_all_durable(&p).unwrap();
        assert!(p.is_dir());
        create_dir_all_durable(&p).unwrap();
        write_atomic(&d.path().join("new/dir/file"), b"x", 0o644).unwrap();
        assert_eq!(fs::read(d.path().join("new/dir/file")).unwrap(), b"x");
    }

    #[test]
    fn symlink_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dev/clutch/data0");
        symlink_replace(Path::new("/dev/loop0"), &p).unwrap();
        symlink_replace(Path::new("/dev/loop3"), &p).unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), Path::new("/dev/loop3"));
    }
}
