//! Crash-safe, symlink-safe file writes.
//!
//! Every file clutch writes goes through [`write_atomic`]: the data goes to a new temporary
//! file in the same directory (created with `O_CREAT|O_EXCL|O_NOFOLLOW`, so an existing file
//! or link under that name is never opened), which is fsynced, renamed over the destination
//! (a rename replaces a link at the destination instead of writing through it) and then the
//! directory is fsynced. A reader, or the next boot after a power cut, sees the old file or
//! the whole new one, never a mix.
//!
//! Writing into a directory that another user controls (a login user's home) needs more:
//! that user can put links where root is about to write. [`write_in_user_dir`] walks from
//! the home directory with `openat(O_NOFOLLOW)` and writes through directory file
//! descriptors only, then hands the file to the user with `fchown` before it gets its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::Mode;

/// A failed file operation, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct WriteError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl WriteError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        WriteError {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> io::Error {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A fresh temporary name next to `name` (never reused, so `O_EXCL` cannot collide with a
/// leftover of a crashed writer).
fn temp_name(name: &str) -> String {
    let r: u64 = rand::random();
    format!(".{name}.{r:016x}.clutch-tmp")
}

fn split(path: &Path) -> Result<(&Path, String), WriteError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            WriteError::new(
                "writing",
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "no file name"),
            )
        })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// Writes `data` to `path` atomically with exactly `mode`; the parent directories are
/// created (durably).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    write_atomic_owned(path, data, mode, None)
}

/// [`write_atomic`], and the file handed to `owner` (uid, gid) before it gets its name.
pub fn write_atomic_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), WriteError> {
    let (dir, name) = split(path)?;
    create_dir_all_durable(dir)?;
    let tmp = dir.join(temp_name(&name));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| WriteError::new("creating", &tmp, e))?;
        finish_file(&mut f, &tmp, path, data, mode, owner)?;
        Ok(f)
    })();
    let f = match written {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(WriteError::new("renaming into", path, e));
    }
    // vfat (the ESP, the Pi's boot partition) keeps a file's directory entry with its
    // inode: a rename over an existing name frees the old file's clusters at once but
    // writes the new entry only when the renamed inode is written back, which a directory
    // fsync does not do. A power cut in between leaves the name pointing at freed
    // clusters, and fsck.fat at the next boot truncates the file to nothing. Syncing the
    // renamed file first writes that entry (a window of the rename call itself remains); on
    // ext4 it is cheap.
    f.sync_all()
        .map_err(|e| WriteError::new("fsync after renaming into", path, e))?;
    sync_dir(dir);
    Ok(())
}

/// Sets the mode and owner of a just-created temp file, writes and fsyncs it.
fn finish_file(
    f: &mut File,
    tmp: &Path,
    dest: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), WriteError> {
    // The umask may have cleared bits; set the mode exactly. A FAT mount with a fixed
    // umask refuses chmod (EPERM): the mode given to open() already holds no more bits than
    // asked for, so that is safe to ignore.
    if let Err(e) = f.set_permissions(fs::Permissions::from_mode(mode)) {
        tracing::debug!("chmod {mode:o} {}: {e}", dest.display());
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&*f, Some(uid), Some(gid))
            .map_err(|e| WriteError::new("chown", tmp, e))?;
    }
    f.write_all(data)
        .map_err(|e| WriteError::new("writing", tmp, e))?;
    f.sync_all().map_err(|e| WriteError::new("fsync", tmp, e))
}

/// Like [`write_atomic`] but leaves the file alone when it already holds `data` with `mode`.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> Result<bool, WriteError> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        let same_mode = meta.is_file() && meta.permissions().mode() & 0o7777 == mode;
        if same_mode && fs::read(path).is_ok_and(|old| old == data) {
            return Ok(false);
        }
    }
    write_atomic(path, data, mode)?;
    Ok(true)
}

/// `create_dir_all`, and the new directories' names made durable too (each parent that got
/// a new entry is fsynced), so a file written into them survives a power cut with its path.
pub fn create_dir_all_durable(dir: &Path) -> Result<(), WriteError> {
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
    fs::create_dir_all(dir).map_err(|e| WriteError::new("creating directory", dir, e))?;
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
    if let Ok(d) = File::open(dir) {
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
pub fn symlink_replace(target: &Path, path: &Path) -> Result<(), WriteError> {
    if fs::read_link(path).ok().as_deref() == Some(target) {
        return Ok(());
    }
    let (dir, name) = split(path)?;
    create_dir_all_durable(dir)?;
    let tmp = dir.join(temp_name(&name));
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(|e| WriteError::new("creating link", &tmp, e))?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(WriteError::new("renaming into", path, e));
    }
    sync_dir(dir);
    Ok(())
}

/// Opens directory `name` under `parent` (a directory fd), never through a link.
fn open_dir_at(parent: &impl AsFd, name: &str) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        parent,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
}

/// Writes `home/<subdir>/<name>` for the user `owner` (uid, gid) who owns `home`, as root,
/// without ever following a link the user may have put there: `home` itself is opened with
/// `O_NOFOLLOW` (its parent, e.g. `/home`, is root's), `subdir` is made (mode 0700, owned
/// by the user) or opened with `O_NOFOLLOW`, and the file is written to a new temporary
/// name there, given to the user with `fchown` and renamed into place — all relative to
/// directory file descriptors. A link at any of these names makes the write fail.
pub fn write_in_user_dir(
    home: &Path,
    subdir: &str,
    name: &str,
    data: &[u8],
    mode: u32,
    owner: (u32, u32),
) -> Result<(), WriteError> {
    let sub_path = home.join(subdir);
    let dest = sub_path.join(name);
    let home_fd = nix::fcntl::open(
        home,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| WriteError::new("opening", home, errno(e)))?;
    match nix::sys::stat::mkdirat(&home_fd, subdir, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(WriteError::new("creating directory", &sub_path, errno(e))),
    }
    let sub_fd = open_dir_at(&home_fd, subdir)
        .map_err(|e| WriteError::new("opening (no links)", &sub_path, errno(e)))?;
    nix::unistd::fchown(
        &sub_fd,
        Some(nix::unistd::Uid::from_raw(owner.0)),
        Some(nix::unistd::Gid::from_raw(owner.1)),
    )
    .map_err(|e| WriteError::new("chown", &sub_path, errno(e)))?;
    let tmp = temp_name(name);
    let tmp_path = sub_path.join(&tmp);
    let fd = nix::fcntl::openat(
        &sub_fd,
        tmp.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(|e| WriteError::new("creating", &tmp_path, errno(e)))?;
    let mut f = File::from(fd);
    let unlink_tmp = |sub_fd: &OwnedFd| {
        let _ = nix::unistd::unlinkat(
            sub_fd,
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    };
    if let Err(e) = finish_file(&mut f, &tmp_path, &dest, data, mode, Some(owner)) {
        unlink_tmp(&sub_fd);
        return Err(e);
    }
    drop(f);
    if let Err(e) =
        nix::fcntl::renameat2(&sub_fd, tmp.as_str(), &sub_fd, name, RenameFlags::empty())
    {
        unlink_tmp(&sub_fd);
        return Err(WriteError::new("renaming into", &dest, errno(e)));
    }
    // The directory entry is durable once the directory is synced.
    let _ = nix::unistd::fsync(&sub_fd);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_write_sets_mode_and_skips_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/secret");
        assert!(write_if_changed(&p, b"x", 0o600).unwrap());
        assert_eq!(mode_of(&p), 0o600);
        assert!(!write_if_changed(&p, b"x", 0o600).unwrap());
        assert!(write_if_changed(&p, b"x", 0o644).unwrap());
        assert!(write_if_changed(&p, b"y", 0o644).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"y");
        // no temp file left behind
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_link_at_the_destination_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let p = d.path().join("out");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_atomic(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&p).unwrap().is_file());
        assert_eq!(fs::read(&p).unwrap(), b"new");
        // write_if_changed does not read through a link either
        std::os::unix::fs::symlink(&victim, d.path().join("l")).unwrap();
        assert!(write_if_changed(&d.path().join("l"), b"keep", 0o644).unwrap());
        assert!(fs::symlink_metadata(d.path().join("l")).unwrap().is_file());
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
    fn errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("file"), b"").unwrap();
        let e = write_atomic(&d.path().join("file/under-a-file"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().contains("file/under-a-file") || e.to_string().contains("file"));
        let io: io::Error = e.into();
        assert!(io.to_string().contains(&d.path().display().to_string()));
    }

    #[test]
    fn symlink_is_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dev/clutch/data0");
        symlink_replace(Path::new("/dev/loop0"), &p).unwrap();
        symlink_replace(Path::new("/dev/loop3"), &p).unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), Path::new("/dev/loop3"));
    }

    fn me() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    #[test]
    fn user_dir_write_makes_the_dir_and_file() {
        let d = tempfile::tempdir().unwrap();
        write_in_user_dir(d.path(), ".kube", "config", b"cfg", 0o600, me()).unwrap();
        let p = d.path().join(".kube/config");
        assert_eq!(fs::read(&p).unwrap(), b"cfg");
        assert_eq!(mode_of(&p), 0o600);
        assert_eq!(mode_of(&d.path().join(".kube")), 0o700);
        // again: replaced, no temp left
        write_in_user_dir(d.path(), ".kube", "config", b"cfg2", 0o600, me()).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"cfg2");
        assert_eq!(fs::read_dir(d.path().join(".kube")).unwrap().count(), 1);
    }

    #[test]
    fn user_dir_write_never_follows_links_the_user_planted() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        let elsewhere = d.path().join("etc");
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        fs::write(elsewhere.join("config"), b"root's").unwrap();
        // The subdirectory is a link to a directory the user may not write.
        std::os::unix::fs::symlink(&elsewhere, home.join(".kube")).unwrap();
        let e = write_in_user_dir(&home, ".kube", "config", b"x", 0o600, me()).unwrap_err();
        assert!(e.to_string().contains(".kube"), "{e}");
        assert_eq!(fs::read(elsewhere.join("config")).unwrap(), b"root's");
        assert!(fs::read_dir(&elsewhere).unwrap().count() == 1);
        // The file itself is a link: it is replaced by a file, the target is untouched.
        fs::remove_file(home.join(".kube")).unwrap();
        fs::create_dir(home.join(".kube")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("config"), home.join(".kube/config")).unwrap();
        write_in_user_dir(&home, ".kube", "config", b"x", 0o600, me()).unwrap();
        assert_eq!(fs::read(elsewhere.join("config")).unwrap(), b"root's");
        assert!(
            fs::symlink_metadata(home.join(".kube/config"))
                .unwrap()
                .is_file()
        );
        // The home directory itself is a link: refused.
        let link_home = d.path().join("linkhome");
        std::os::unix::fs::symlink(&elsewhere, &link_home).unwrap();
        assert!(write_in_user_dir(&link_home, ".kube", "config", b"x", 0o600, me()).is_err());
    }
}
