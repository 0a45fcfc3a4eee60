//! Host tools a build needs, which Debian package provides each, and whether it is here.

use std::path::Path;

use clutch_config::{Board, Format};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// A program on PATH, or an absolute file path.
    pub name: String,
    pub package: &'static str,
    pub why: &'static str,
}

impl Tool {
    fn new(name: &str, package: &'static str, why: &'static str) -> Tool {
        Tool {
            name: name.into(),
            package,
            why,
        }
    }

    pub fn present(&self) -> bool {
        if self.name.starts_with('/') {
            return Path::new(&self.name).exists();
        }
        find_in_path(&self.name)
    }
}

pub fn find_in_path(prog: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(prog).is_file())
}

/// Every tool any build may need (what `clutch doctor` lists).
pub fn all_tools() -> Vec<Tool> {
    vec![
        Tool::new(
            "mmdebstrap",
            "mmdebstrap",
            "builds the Debian root filesystem",
        ),
        Tool::new("tar", "tar", "unpacks the cached root filesystem"),
        Tool::new(
            "mkfs.ext4",
            "e2fsprogs",
            "writes the ext4 root filesystem (-d)",
        ),
        Tool::new("useradd", "passwd", "creates the image's user"),
        Tool::new(
            "systemctl",
            "systemctl",
            "enables units in the image (--root)",
        ),
        Tool::new("syslinux", "syslinux", "legacy BIOS boot of amd64 images"),
        Tool::new(
            "/usr/lib/syslinux/mbr/gptmbr.bin",
            "syslinux-common",
            "BIOS boot code for GPT disks",
        ),
        Tool::new(
            "mcopy",
            "mtools",
            "used by syslinux to write into the FAT partition",
        ),
        Tool::new("qemu-img", "qemu-utils", "qcow2 output"),
        Tool::new("zstd", "zstd", "zst output"),
        Tool::new("mksquashfs", "squashfs-tools", "pxe output"),
        Tool::new("fsck.vfat", "dosfstools", "checks the FAT partition"),
        Tool::new(
            "qemu-system-x86_64",
            "qemu-system-x86",
            "clutch lab and the boot tests",
        ),
    ]
}

/// The tools this particular build needs.
pub fn needed_for(board: &Board, formats: &[Format]) -> Vec<Tool> {
    all_tools()
        .into_iter()
        .filter(|t| match t.package {
            "syslinux" | "syslinux-common" | "mtools" => board.boot.syslinux.is_some(),
            "qemu-utils" => formats.contains(&Format::Qcow2),
            "zstd" => formats.contains(&Format::Zst),
            "squashfs-tools" => formats.contains(&Format::Pxe),
            "dosfstools" | "qemu-system-x86" => false,
            _ => true,
        })
        .collect()
}

/// An error naming every missing tool and the `apt-get install` line that fixes it.
pub fn require(tools: &[Tool]) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !t.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
    pkgs.sort();
    pkgs.dedup();
    let list: Vec<String> = missing
        .iter()
        .map(|t| format!("  {} (package {}): {}", t.name, t.package, t.why))
        .collect();
    anyhow::bail!(
        "this build needs host tools that are missing:\n{}\ninstall them with: apt-get install --no-install-recommends {}",
        list.join("\n"),
        pkgs.join(" ")
    )
}

/// The `clutch doctor` report: one line per tool. Returns (text, all present).
pub fn report(tools: &[Tool]) -> (String, bool) {
    let mut ok = true;
    let mut s = String::new();
    for t in tools {
        let present = t.present();
        ok &= present;
        s.push_str(&format!(
            "{:8} {:36} {:18} {}\n",
            if present { "found" } else { "MISSING" },
            t.name,
            t.package,
            t.why
        ));
    }
    (s, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let tools = vec![Tool::new(
            "clutch-no-such-tool-xyz",
            "squashfs-tools",
            "pxe output",
        )];
        let (r, ok) = report(&tools);
        assert!(!ok);
        assert!(r.contains("MISSING") && r.contains("squashfs-tools"), "{r}");
        let e = require(&tools).unwrap_err().to_string();
        assert!(
            e.contains("apt-get install --no-install-recommends squashfs-tools"),
            "{e}"
        );
    }

    #[test]
    fn present_tools_pass() {
        let tools = vec![
            Tool::new("sh", "dash", "shell"),
            Tool::new("/", "base-files", "root"),
        ];
        assert!(require(&tools).is_ok());
    }
}
