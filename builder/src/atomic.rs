//! Crash-safe file output: write to a temporary name in the same folder, fsync, rename, fsync
//! the folder. A reader (or a later build) sees the old file or the whole new one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary name used for `dest` while it is being written.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

/// Moves a finished temporary file into place.
pub fn commit(tmp: &Path, dest: &Path) -> io::Result<()> {
    File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, dest)?;
    sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

pub fn write(dest: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = temp_path(dest);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        commit(&tmp, dest)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Removes a temporary file when dropped unless it was committed.
pub struct TempGuard(pub Option<PathBuf>);

impl TempGuard {
    pub fn new(p: PathBuf) -> Self {
        TempGuard(Some(p))
    }
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
        }
    }
}
