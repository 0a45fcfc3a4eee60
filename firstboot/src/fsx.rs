//! The crash-safe, link-safe file writes firstboot uses: clutch-os's, with `io::Error`s
//! (the apply layer reports them per action).

use std::io;
use std::path::Path;

pub use clutch_os::fs::{read_opt, sync_dir};

pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    clutch_os::fs::write_atomic(path, data, mode).map_err(io::Error::from)
}

pub fn write_if_changed(path: &Path, data: &[u8], mode: u32) -> io::Result<bool> {
    clutch_os::fs::write_if_changed(path, data, mode).map_err(io::Error::from)
}

pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    clutch_os::fs::create_dir_all_durable(dir).map_err(io::Error::from)
}

pub fn symlink_replace(target: &Path, path: &Path) -> io::Result<()> {
    clutch_os::fs::symlink_replace(target, path).map_err(io::Error::from)
}
