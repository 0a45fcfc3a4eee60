//! Host tools a build needs, which Debian package provides each, and whether it is here.

use std::path::Path;

use clutch_config::{Board, Format};

/// How a requirement is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A program on PATH (or in /usr/sbin, /sbin).
    Program,
    /// A file at an absolute path.
    File,
    /// The kernel can mount binfmt_misc (it is mounted, or listed in /proc/filesystems).
    BinfmtMisc,
    /// binfmt_misc runs `qemu-<arch>` programs: the handler is registered and enabled, or
    /// (binfmt_misc not mounted yet) its definition is installed for registration.
    BinfmtHandler(&'static str),
    /// QEMU's user-mode emulator for an architecture: `qemu-<arch>` (trixie's qemu-user) or
    /// `qemu-<arch>-static` (bookworm's qemu-user-static).
    QemuUser(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// What is shown: a program, a path, or a kernel feature.
    pub name: String,
    pub package: &'static str,
    pub why: &'static str,
    pub probe: Probe,
}

impl Tool {
    fn new(name: &str, package: &'static str, why: &'static str) -> Tool {
        let probe = if name.starts_with('/') {
            Probe::File
        } else {
            Probe::Program
        };
        Tool {
            name: name.into(),
            package,
            why,
            probe,
        }
    }

    pub fn present(&self) -> bool {
        match &self.probe {
            Probe::Program => find_in_path(&self.name),
            Probe::File => Path::new(&self.name).exists(),
            Probe::BinfmtMisc => {
                Path::new(crate::foreign::BINFMT_DIR)
                    .join("status")
                    .exists()
                    || std::fs::read_to_string("/proc/filesystems")
                        .map(|f| f.lines().any(|l| l.ends_with("binfmt_misc")))
                        .unwrap_or(false)
            }
            Probe::QemuUser(q) => {
                find_in_path(&format!("qemu-{q}")) || find_in_path(&format!("qemu-{q}-static"))
            }
            Probe::BinfmtHandler(q) => {
                let dir = Path::new(crate::foreign::BINFMT_DIR);
                let st = crate::foreign::binfmt_state(dir, q);
                if st.mounted {
                    // Disabled entries are enabled by the build (update-binfmts).
                    st.entry.is_some()
                } else {
                    Path::new(&format!("/usr/share/binfmts/qemu-{q}")).exists()
                        || Path::new(&format!("/usr/lib/binfmt.d/qemu-{q}.conf")).exists()
                }
            }
        }
    }
}

pub fn find_in_path(prog: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    find_in(&path, prog)
}

/// Whether `prog` is in one of the folders of `path` (a PATH value) or in /usr/sbin, /sbin.
pub fn find_in(path: &std::ffi::OsStr, prog: &str) -> bool {
    std::env::split_paths(path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(prog).is_file())
}

/// Emulation of a foreign architecture (`qemu` is QEMU's name for it: `aarch64`).
pub fn foreign_tools(qemu: &'static str) -> Vec<Tool> {
    vec![
        Tool {
            name: "binfmt_misc (kernel)".into(),
            package: "linux-image (CONFIG_BINFMT_MISC)",
            why: "runs foreign-architecture programs while building the root filesystem",
            probe: Probe::BinfmtMisc,
        },
        Tool {
            name: format!("qemu-{qemu} (user mode)"),
            package: "qemu-user-static",
            why: "emulates the image's architecture",
            probe: Probe::QemuUser(qemu),
        },
        Tool {
            name: format!("binfmt handler qemu-{qemu}"),
            package: "qemu-user-static",
            why: "lets the kernel start the image's programs under QEMU",
            probe: Probe::BinfmtHandler(qemu),
        },
    ]
}

/// Advice about the host that makes foreign builds slow (an old QEMU, no patchelf).
pub fn warnings() -> Vec<String> {
    let mut v: Vec<String> = crate::foreign::slow_qemu_hint("aarch64")
        .into_iter()
        .collect();
    if !find_in_path("patchelf") {
        v.push(
            "patchelf (package patchelf) is missing: a foreign-architecture initramfs then \
             copies its kernel modules with the emulated cp, taking about twice the CPU time"
                .into(),
        );
    }
    v
}

/// Every tool any build may need (what `clutch doctor` lists).
pub fn all_tools() -> Vec<Tool> {
    let mut v = base_tools();
    v.extend(foreign_tools("aarch64"));
    v
}

fn base_tools() -> Vec<Tool> {
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
        Tool::new(
            "debugfs",
            "e2fsprogs",
            "fixes inode times for reproducible builds (SOURCE_DATE_EPOCH)",
        ),
        Tool::new(
            "dumpe2fs",
            "e2fsprogs",
            "lists used inodes for reproducible builds",
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
        Tool::new("mformat", "mtools", "formats the FAT boot partition"),
        Tool::new(
            "mcopy",
            "mtools",
            "writes files into the FAT boot partition",
        ),
        Tool::new("qemu-img", "qemu-utils", "qcow2 output"),
        Tool::new("zstd", "zstd", "zst output"),
        Tool::new("xz", "xz-utils", "update output (compressed release files)"),
        Tool::new("mksquashfs", "squashfs-tools", "pxe output"),
        Tool::new("fsck.vfat", "dosfstools", "checks the FAT partition"),
        Tool::new(
            "bmaptool",
            "bmap-tools",
            "optional: flash .img.bmap files with bmaptool (clutch flash needs nothing)",
        ),
        Tool::new(
            "qemu-system-x86_64",
            "qemu-system-x86",
            "clutch lab and the boot tests",
        ),
    ]
}

/// The tools this particular build needs; `host_arch` is the build machine's Debian arch.
pub fn needed_for(board: &Board, formats: &[Format]) -> Vec<Tool> {
    needed_for_host(board, formats, crate::cross::host_arch())
}

pub fn needed_for_host(board: &Board, formats: &[Format], host_arch: &str) -> Vec<Tool> {
    let mut v: Vec<Tool> = base_tools()
        .into_iter()
        .filter(|t| match t.package {
            "syslinux" | "syslinux-common" => board.boot.syslinux.is_some(),
            "qemu-utils" => formats.contains(&Format::Qcow2),
            "zstd" => formats.contains(&Format::Zst),
            "xz-utils" => formats.contains(&Format::Update),
            "squashfs-tools" => formats.contains(&Format::Pxe),
            "dosfstools" | "qemu-system-x86" | "bmap-tools" => false,
            _ => true,
        })
        .collect();
    if board.arch != host_arch {
        if let Some(q) = crate::foreign::qemu_arch(&board.arch) {
            v.extend(foreign_tools(q));
        }
    }
    v
}

/// An error naming every missing tool and the `apt-get install` line that fixes it.
pub fn require(tools: &[Tool]) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| !t.present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Kernel features are not packages to install.
    let mut pkgs: Vec<&str> = missing
        .iter()
        .map(|t| t.package)
        .filter(|p| !p.contains(' '))
        .collect();
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
            "{:8} {:36} {:34} {}\n",
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
    fn a_pxe_build_needs_squashfs_tools_and_a_foreign_board_needs_emulation() {
        let b = crate::testutil::board("amd64");
        let pk = |v: &[Tool]| v.iter().map(|t| t.package).collect::<Vec<_>>();
        let plain = needed_for_host(&b, &[Format::Raw], "amd64");
        assert!(!pk(&plain).contains(&"squashfs-tools"));
        assert!(!pk(&plain).contains(&"qemu-user-static"));
        let pxe = needed_for_host(&b, &[Format::Raw, Format::Pxe], "amd64");
        assert!(pk(&pxe).contains(&"squashfs-tools"));
        let foreign = needed_for_host(&b, &[Format::Raw], "arm64");
        assert!(
            foreign
                .iter()
                .any(|t| t.probe == Probe::BinfmtHandler("x86_64")),
            "{foreign:?}"
        );
        assert!(pk(&foreign).contains(&"qemu-user-static"));
        assert!(
            foreign.iter().any(|t| t.probe == Probe::QemuUser("x86_64")),
            "{foreign:?}"
        );
    }

    #[test]
    fn find_in_looks_only_at_the_given_path_and_sbin() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("only-here"), b"").unwrap();
        assert!(find_in(t.path().as_os_str(), "only-here"));
        assert!(!find_in(t.path().as_os_str(), "mksquashfs-nope"));
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
