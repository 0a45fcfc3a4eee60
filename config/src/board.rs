//! Boards are data: `boards/<name>.toml` says everything the builder needs to know about a
//! target (architecture, partition layout, packages, boot files, console). No code branches
//! on a board's name.

use serde::{Deserialize, Serialize};

use crate::diag::Invalid;
use crate::types::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    Gpt,
    Mbr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    pub version: u32,
    pub name: Name,
    #[serde(default)]
    pub description: String,
    /// Debian architecture (`amd64`, `arm64`).
    pub arch: String,
    /// Debian archive components the root filesystem needs.
    #[serde(default = "main_component")]
    pub components: Vec<String>,
    pub kernel_packages: Vec<PackageName>,
    #[serde(default)]
    pub firmware_packages: Vec<PackageName>,
    /// Other packages the board needs (boot loader files, tools).
    #[serde(default)]
    pub packages: Vec<PackageName>,
    /// Extra packages installed only when the image config has `[wifi]`.
    #[serde(default)]
    pub wifi_packages: Vec<PackageName>,
    /// Kernel arguments every image of this board gets (console first, then the rest).
    pub cmdline: Vec<KernelArg>,
    /// The serial console device name (`ttyS0`, `ttyAMA0`), for the getty and tests.
    pub serial: String,
    pub partition_table: PartitionTable,
    /// Partition start/size alignment.
    pub alignment: Size,
    pub boot: BootPartition,
    pub root: RootPartition,
    /// Also write a Raspberry Pi Imager OS-list entry (`<name>.rpi-imager.json`) next to
    /// the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imager: Option<Imager>,
    /// dpkg `path-exclude` patterns for the root filesystem: files of its packages the board
    /// never uses (other SoCs' device trees, firmware for other chips).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dpkg_path_exclude: Vec<String>,
    /// dpkg `path-include` patterns, applied after the excludes (dpkg: the last match wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dpkg_path_include: Vec<String>,
    /// How images with `[update]` hold two root slots; a board without it cannot update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<crate::update::AbBoard>,
}

/// `[imager]` in a board file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Imager {
    /// Raspberry Pi Imager device tags the image is shown for (`pi4-64bit`, `pi3-64bit`).
    #[serde(default)]
    pub devices: Vec<String>,
    /// The OS entry's icon: a URL, or one of Imager's own (`icons/...`).
    pub icon: String,
    /// The devices Imager 2.x offers in its device step (its top-level `imager.devices`):
    /// without them a `--repo` list shows no device and cannot go on.
    #[serde(default)]
    pub hardware: Vec<ImagerDevice>,
}

/// One `[[imager.hardware]]`: a device of Imager's device step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagerDevice {
    pub name: String,
    pub description: String,
    /// The tags OS entries name in their `devices`.
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    /// `armv8` for the 64-bit boards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

fn main_component() -> Vec<String> {
    vec!["main".into()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPartition {
    pub size: Size,
    /// FAT volume label (at most 11 characters).
    pub label: String,
    /// Where the running system mounts it.
    pub mount: String,
    /// `esp` (GPT EFI system partition) or `fat` (MBR type 0x0c).
    pub kind: BootKind,
    /// Files copied from the root filesystem onto the boot partition.
    #[serde(default)]
    pub files: Vec<BootFile>,
    /// Text files rendered onto the boot partition (placeholders: [`TEMPLATE_PLACEHOLDERS`]).
    #[serde(default)]
    pub templates: Vec<BootTemplate>,
    /// Install syslinux into the partition for legacy BIOS boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslinux: Option<Syslinux>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    Esp,
    Fat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    /// Path inside the root filesystem (symlinks followed). A directory is copied whole.
    /// Components may hold `*` wildcards (`/usr/lib/linux-image-*/broadcom/x.dtb`); when
    /// several paths match, the last in version order (the newest kernel) is taken.
    pub from: String,
    /// Path on the boot partition.
    pub to: String,
    /// Leave the file out instead of failing when it is missing.
    #[serde(default)]
    pub optional: bool,
    /// The root filesystem keeps a link to this copy (through the boot partition's mount
    /// point) instead of a second copy of the file: the kernel and initramfs then take
    /// their space once on the image.
    #[serde(default)]
    pub link_from_root: bool,
    /// On A/B images (`[ab]`), the file belongs to a root slot's boot files (kernel,
    /// initrd, device trees) rather than to the shared boot partition.
    #[serde(default)]
    pub slot: bool,
}

/// A text file a board renders: `path` is relative on the boot partition (`boot.templates`)
/// or absolute in the root filesystem (`root.templates`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTemplate {
    pub path: String,
    pub content: String,
    /// On A/B images, the file belongs to a root slot (`cmdline.txt`).
    #[serde(default)]
    pub slot: bool,
}

/// What a board template may hold: `{cmdline}` (the whole kernel command line),
/// `{root_partuuid}` (the root partition's PARTUUID) and `{extra_cmdline}` (the kernel
/// arguments the image config adds to the board's: the cgroup flags and `[kernel] cmdline`).
pub const TEMPLATE_PLACEHOLDERS: &[&str] = &["cmdline", "root_partuuid", "extra_cmdline"];

/// The first `{name}` in `content` that is not a known placeholder.
fn unknown_placeholder(content: &str) -> Option<&str> {
    let mut rest = content;
    while let Some(i) = rest.find('{') {
        rest = &rest[i + 1..];
        let Some(j) = rest.find('}') else { break };
        let name = &rest[..j];
        let looks_like_one =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if looks_like_one && !TEMPLATE_PLACEHOLDERS.contains(&name) {
            return Some(name);
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Syslinux {
    /// Host path of the MBR boot code (`gptmbr.bin` for GPT disks).
    pub mbr: String,
    /// Directory on the boot partition holding `syslinux.cfg`.
    pub dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootPartition {
    pub label: String,
    /// Free space added to the content when the image size is `auto`.
    pub headroom: Size,
    /// Text files rendered into the root filesystem (absolute paths), e.g. the settings
    /// Debian's own boot hooks read when a kernel upgrade rewrites the boot partition.
    #[serde(default)]
    pub templates: Vec<BootTemplate>,
}

impl Board {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.version != 1 {
            return Err(Invalid::new("version", "board file version must be 1"));
        }
        if self.boot.label.is_empty() || self.boot.label.len() > 11 || !self.boot.label.is_ascii() {
            return Err(Invalid::new(
                "boot.label",
                "a FAT label has 1 to 11 ASCII characters",
            ));
        }
        if self.root.label.is_empty() || self.root.label.len() > 16 {
            return Err(Invalid::new(
                "root.label",
                "an ext4 label has 1 to 16 characters",
            ));
        }
        if !self.alignment.bytes().is_power_of_two() || self.alignment.bytes() < 4096 {
            return Err(Invalid::new(
                "alignment",
                "alignment must be a power of two of at least 4KiB",
            ));
        }
        if self.boot.size.bytes() < 33 << 20 {
            return Err(Invalid::new(
                "boot.size",
                "a FAT32 boot partition must be at least 33MiB",
            ));
        }
        if self.boot.kind == BootKind::Esp && self.partition_table != PartitionTable::Gpt {
            return Err(Invalid::new(
                "boot.kind",
                "an `esp` boot partition needs partition_table = \"gpt\"",
            ));
        }
        if let Some(ab) = &self.ab {
            ab.validate()?;
            if ab.scheme == crate::update::AbScheme::SystemdBoot
                && self.partition_table != PartitionTable::Gpt
            {
                return Err(Invalid::new(
                    "ab.scheme",
                    "scheme = \"systemd-boot\" needs partition_table = \"gpt\" (systemd-sysupdate finds slots by GPT type and label)",
                ));
            }
        }
        for (i, f) in self.boot.files.iter().enumerate() {
            if !f.from.starts_with('/') {
                return Err(Invalid::new(
                    &format!("boot.files[{i}].from"),
                    "must be an absolute path in the root filesystem",
                ));
            }
            if !fat_path_ok(&f.to) {
                return Err(Invalid::new(
                    &format!("boot.files[{i}].to"),
                    "must be a relative path on the boot partition",
                ));
            }
        }
        if let Some(im) = &self.imager {
            for (i, tag) in im.devices.iter().enumerate() {
                if !im.hardware.iter().any(|h| h.tags.contains(tag)) {
                    return Err(Invalid::new(
                        &format!("imager.devices[{i}]"),
                        format!(
                            "no [[imager.hardware]] has the tag `{tag}`: Imager would list no device for this image"
                        ),
                    ));
                }
            }
        }
        for (i, t) in self.boot.templates.iter().enumerate() {
            if !fat_path_ok(&t.path) {
                return Err(Invalid::new(
                    &format!("boot.templates[{i}].path"),
                    "must be a relative path on the boot partition",
                ));
            }
        }
        for (i, t) in self.root.templates.iter().enumerate() {
            let rel = t.path.strip_prefix('/').unwrap_or("");
            if !fat_path_ok(rel) {
                return Err(Invalid::new(
                    &format!("root.templates[{i}].path"),
                    "must be an absolute path in the root filesystem, without `.` or `..`",
                ));
            }
        }
        let all = self.boot.templates.iter().map(|t| ("boot", t));
        for (i, (part, t)) in all
            .enumerate()
            .chain(self.root.templates.iter().map(|t| ("root", t)).enumerate())
        {
            if let Some(name) = unknown_placeholder(&t.content) {
                return Err(Invalid::new(
                    &format!("{part}.templates[{i}].content"),
                    format!(
                        "unknown placeholder `{{{name}}}` (known: {})",
                        TEMPLATE_PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn fat_path_ok(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.split('/').any(|s| s.is_empty() || s == ".." || s == ".")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn rpi4() -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/rpi4.toml");
        std::fs::read_to_string(p).unwrap()
    }

    fn err(text: &str) -> String {
        crate::parse_board(Path::new("boards/x.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn shipped_boards_have_only_known_placeholders() {
        for b in ["amd64", "rpi3", "rpi4"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../boards/{b}.toml"));
            crate::load_board(&p).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn unknown_placeholder_names_the_template() {
        let t = rpi4().replace("content = \"{cmdline}\\n\"", "content = \"{cmdlnie}\\n\"");
        assert_ne!(
            t,
            rpi4(),
            "rpi4.toml no longer has the cmdline.txt template"
        );
        let e = err(&t);
        assert!(e.contains("boot.templates[1].content"), "{e}");
        assert!(e.contains("unknown placeholder `{cmdlnie}`"), "{e}");
        // Braces that are not placeholder-shaped stay literal text.
        let ok = rpi4().replace("arm_64bit=1", "# {A-Z} {}\narm_64bit=1");
        crate::parse_board(Path::new("boards/x.toml"), &ok).unwrap();
    }

    #[test]
    fn root_template_paths_must_be_absolute_and_plain() {
        for bad in ["etc/default/x", "/etc/../x", "/", "/etc//x"] {
            let t = format!(
                "{}\n[[root.templates]]\npath = \"{bad}\"\ncontent = \"\"\n",
                rpi4()
            );
            let e = err(&t);
            assert!(e.contains("root.templates["), "{bad}: {e}");
            assert!(e.contains("absolute path"), "{bad}: {e}");
        }
    }
}
