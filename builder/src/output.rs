//! Output artifacts: each is produced under a temporary name; all are moved into place
//! together with SHA256SUMS only when every one of them was written whole.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{atomic, cmd, fetch};

#[derive(Default)]
pub struct Pending {
    items: Vec<(PathBuf, PathBuf)>,
    guards: Vec<atomic::TempGuard>,
}

impl Pending {
    /// Registers an already written temporary file for `dest`.
    pub fn add_existing(&mut self, tmp: PathBuf, dest: PathBuf) {
        self.items.push((tmp, dest));
    }

    /// Produces `dest`'s content into a temporary file with `make`.
    pub fn add(&mut self, dest: PathBuf, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = atomic::temp_path(&dest);
        let _ = std::fs::remove_file(&tmp);
        self.guards.push(atomic::TempGuard::new(tmp.clone()));
        make(&tmp).with_context(|| format!("writing {}", dest.display()))?;
        self.items.push((tmp, dest));
        Ok(())
    }

    /// Hashes every artifact, then renames all of them and writes SHA256SUMS.
    pub fn commit_with_sums(mut self, sums: &Path) -> Result<Vec<PathBuf>> {
        let mut lines = String::new();
        for (tmp, dest) in &self.items {
            let h = fetch::hash_file(tmp)?;
            // Relative to SHA256SUMS's folder (`pxe/vmlinuz`), so `sha256sum -c` works there.
            let name = match sums.parent().and_then(|d| dest.strip_prefix(d).ok()) {
                Some(rel) if !rel.as_os_str().is_empty() => rel.to_string_lossy(),
                _ => dest
                    .file_name()
                    .context("artifact without a name")?
                    .to_string_lossy(),
            };
            lines.push_str(&format!("{h}  {name}\n"));
        }
        for (tmp, dest) in &self.items {
            atomic::commit(tmp, dest)
                .with_context(|| format!("moving {} into place", dest.display()))?;
        }
        for g in &mut self.guards {
            g.disarm();
        }
        atomic::write(sums, lines.as_bytes())?;
        Ok(self.items.iter().map(|(_, d)| d.clone()).collect())
    }
}

pub fn qcow2(raw: &Path, dest: &Path) -> Result<()> {
    cmd::run(
        Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1",
            ])
            .arg(raw)
            .arg(dest),
    )?;
    Ok(())
}

pub fn zstd(raw: &Path, dest: &Path) -> Result<()> {
    cmd::run(
        Command::new("zstd")
            .args(["-q", "-T0", "-6", "-f", "-o"])
            .arg(dest)
            .arg(raw),
    )?;
    Ok(())
}
