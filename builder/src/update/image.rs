//! The A/B steps of `clutch build`, called from `crate::build` at three points: after
//! staging ([`stage`]: the slot's fstab, os-release, sysupdate definitions, public key,
//! units; the node's state folders moved out to the data tree), for the boot files
//! ([`boot_files`]: what goes on the shared FAT partition and what belongs to the slot),
//! and for the disk ([`assemble`]).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clutch_config::{AbScheme, Board, ImageConfig};

use super::files;
use super::{AbLayout, AbPlan, Role, Slot, assemble as asm};
use crate::build::TemplateVars;
use crate::cmd;
use crate::disk::{self, Extent};
use crate::fat::{self, FatFile};

/// The update units shipped in the firstboot folder of the data dir.
pub const HEALTH_UNIT: &str = "clutch-update-health.service";
pub const UPDATE_UNIT: &str = "clutch-update.service";
pub const UPDATE_TIMER: &str = "clutch-update.timer";

pub use clutch_config::ab::AbInfo;

fn write(root: &Path, rel: &str, content: &str, mode: u32) -> Result<()> {
    let p = crate::stage::resolve_in_root(root, rel)?;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The timer of `[update] check = "hourly" | "daily"` (randomised, so a fleet does not
/// fetch at once).
pub fn timer_unit(calendar: &str) -> String {
    format!(
        "# Written by clutch build ([update] check).\n[Unit]\nDescription=clutch: look for a newer release\n\n\
         [Timer]\nOnCalendar={calendar}\nRandomizedDelaySec=15min\nPersistent=true\n\n\
         [Install]\nWantedBy=timers.target\n"
    )
}

/// Slot-side staging of an A/B image; moves the state folders into `data_tree`.
pub fn stage(
    staging: &Path,
    data_tree: &Path,
    p: &AbPlan,
    board: &Board,
    public_pem: &str,
    unit_dir: &Path,
) -> Result<()> {
    write(
        staging,
        "etc/fstab",
        &files::fstab(&board.boot.mount, &board.boot.label),
        0o644,
    )?;
    // /etc/os-release is a link to /usr/lib/os-release: append to the file itself.
    let osr = crate::stage::resolve_in_root(staging, "etc/os-release")?;
    let mut text = std::fs::read_to_string(&osr).unwrap_or_default();
    text.retain(|c| c != '\r');
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&osr, kept + &files::os_release_lines(&p.release))?;
    for (name, body) in files::transfers(p) {
        write(
            staging,
            &format!("{}/{name}", files::TRANSFERS_DIR),
            &body,
            0o644,
        )?;
    }
    write(staging, files::PUBLIC_KEY, public_pem, 0o644)?;
    let info = AbInfo {
        scheme: p.scheme.as_str().into(),
        board: board.name.to_string(),
        arch: p.arch.clone(),
        release: p.release.clone(),
    };
    write(
        staging,
        "usr/lib/clutch/ab.json",
        &(serde_json::to_string_pretty(&info)? + "\n"),
        0o644,
    )?;
    let mut enable = vec![HEALTH_UNIT.to_string()];
    for u in [HEALTH_UNIT, UPDATE_UNIT] {
        let body = std::fs::read_to_string(unit_dir.join(u))
            .with_context(|| format!("reading {}", unit_dir.join(u).display()))?;
        write(
            staging,
            &format!("usr/lib/systemd/system/{u}"),
            &body,
            0o644,
        )?;
    }
    if let Some(cal) = p.update.check.on_calendar() {
        write(
            staging,
            &format!("usr/lib/systemd/system/{UPDATE_TIMER}"),
            &timer_unit(cal),
            0o644,
        )?;
        enable.push(UPDATE_TIMER.into());
    }
    cmd::run(
        Command::new("systemctl")
            .arg(format!("--root={}", staging.display()))
            .arg("enable")
            .args(&enable),
    )
    .context("enabling the update units in the image")?;
    std::fs::create_dir_all(staging.join(files::DATA_MOUNT_REL))?;
    let dirs = asm::split_state(staging, data_tree)?;
    write(
        staging,
        "usr/lib/clutch/persistent.json",
        &(serde_json::to_string_pretty(&dirs)? + "\n"),
        0o644,
    )
}

/// The boot files of an A/B image, split by where they go.
#[derive(Debug, Clone, Default)]
pub struct AbBoot {
    /// The shared FAT partition (ESP / bootfs).
    pub shared: Vec<FatFile>,
    /// Slot `a`'s own FAT partition (`tryboot`) or folder (`os-prefix`, already prefixed).
    pub slot: Vec<FatFile>,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    /// The boot loader entry (`systemd-boot`).
    pub entry: String,
}

fn read_from_root(staging: &Path, from: &str, optional: bool) -> Result<Option<Vec<u8>>> {
    let src = crate::bootfiles::resolve_pattern(staging, from)?.unwrap_or_default();
    if src.is_file() {
        return Ok(Some(std::fs::read(&src)?));
    }
    if optional {
        return Ok(None);
    }
    bail!("the board needs {from} from the root filesystem, but the image has no such file")
}

/// Template values of an A/B release: its own command line (root by label, panic reboot).
pub fn template_vars(cfg: &ImageConfig, board: &Board, p: &AbPlan, mbr_root: &str) -> TemplateVars {
    let mut args: Vec<String> = board.cmdline.iter().map(|a| a.to_string()).collect();
    args.extend(crate::build::image_cmdline_args(cfg));
    let root = files::root_arg(p, mbr_root);
    TemplateVars {
        cmdline: files::cmdline(&root, &args),
        root_partuuid: root.trim_start_matches("root=").to_string(),
        extra_cmdline: crate::build::image_cmdline_args(cfg).join(" "),
    }
}

/// Decides every boot file of the image. `node_config`: clutch.toml's text.
pub fn boot_files(
    staging: &Path,
    board: &Board,
    p: &AbPlan,
    vars: &TemplateVars,
    node_config: &str,
) -> Result<AbBoot> {
    let r = &p.release;
    let mut b = AbBoot::default();
    let mut slot_files = Vec::new();
    let mut shared_files = Vec::new();
    for f in &board.boot.files {
        let Some(data) = read_from_root(staging, &f.from, f.optional)? else {
            continue;
        };
        if f.from == "/vmlinuz" {
            b.kernel = data.clone();
        }
        if f.from == "/initrd.img" {
            b.initrd = data.clone();
        }
        let file = FatFile {
            path: f.to.clone(),
            data,
        };
        if f.slot {
            slot_files.push(file)
        } else {
            shared_files.push(file)
        }
    }
    let mut slot_templates = Vec::new();
    let mut shared_templates = Vec::new();
    for t in &board.boot.templates {
        let file = FatFile {
            path: t.path.clone(),
            data: vars.render(&t.content).into_bytes(),
        };
        if t.slot {
            slot_templates.push(file)
        } else {
            shared_templates.push(file)
        }
    }
    let clutch_toml = FatFile {
        path: "clutch.toml".into(),
        data: node_config.as_bytes().to_vec(),
    };
    match p.scheme {
        AbScheme::SystemdBoot => {
            // The board's firmware-side files stay; the kernel and initrd go under EFI/clutch
            // per release, and the loader files are the A/B ones.
            b.entry = files::loader_entry(r, &vars.cmdline);
            b.shared = shared_files;
            b.shared.extend([
                FatFile {
                    path: files::esp_kernel(r),
                    data: b.kernel.clone(),
                },
                FatFile {
                    path: files::esp_initrd(r),
                    data: b.initrd.clone(),
                },
                FatFile {
                    path: format!("loader/entries/clutch_{r}.conf"),
                    data: b.entry.clone().into_bytes(),
                },
                FatFile {
                    path: "loader/loader.conf".into(),
                    data: files::loader_conf().into_bytes(),
                },
                FatFile {
                    path: "syslinux/syslinux.cfg".into(),
                    data: files::syslinux_cfg(r, &vars.cmdline).into_bytes(),
                },
                clutch_toml,
            ]);
        }
        AbScheme::Tryboot => {
            let (a, bpart) = (2, 3);
            b.shared = vec![
                FatFile {
                    path: "autoboot.txt".into(),
                    data: files::autoboot_txt(a, bpart).into_bytes(),
                },
                clutch_toml,
            ];
            b.slot = shared_files;
            b.slot.extend(slot_files);
            b.slot.extend(shared_templates);
            b.slot.extend(slot_templates);
        }
        AbScheme::OsPrefix => {
            let folder = Slot::A.as_str();
            b.shared = shared_files;
            for mut t in shared_templates {
                if t.path == "config.txt" {
                    t.data.extend(b"\n[all]\n");
                    t.data.extend(files::os_prefix_line(folder).into_bytes());
                }
                b.shared.push(t);
            }
            b.shared.push(clutch_toml);
            b.slot = slot_files.into_iter().chain(slot_templates).collect();
            // Which release a folder holds, for `clutch-firstboot update --rollback`.
            b.slot.push(FatFile {
                path: "release".into(),
                data: format!("{r}\n").into_bytes(),
            });
            for f in &mut b.slot {
                f.path = format!("{folder}/{}", f.path);
            }
            b.shared.extend(b.slot.iter().cloned());
        }
    }
    Ok(b)
}

/// Makes the release's root file system as a file of `size` bytes.
pub fn root_fs_image(
    staging: &Path,
    dest: &Path,
    size: u64,
    label: &str,
    uuid: &uuid::Uuid,
) -> Result<()> {
    let _ = std::fs::remove_file(dest);
    let f = std::fs::File::create(dest)?;
    f.set_len(size)?;
    drop(f);
    let l = disk::Layout {
        total: size,
        boot: Extent { start: 0, size: 0 },
        root: Extent { start: 0, size },
    };
    disk::mkfs_root(dest, &l, label, uuid, staging)
}

/// A slot's own FAT boot partition image (`tryboot`), as a file.
pub fn slot_boot_image(
    dest: &Path,
    size: u64,
    label: &str,
    volume_id: u32,
    files: &[FatFile],
) -> Result<()> {
    let _ = std::fs::remove_file(dest);
    std::fs::File::create(dest)?.set_len(size)?;
    fat::write_fat(dest, Extent { start: 0, size }, label, volume_id, files)
}

/// Everything the disk of an A/B image is made of.
pub struct AssembleInputs<'a> {
    pub board: &'a Board,
    pub plan: &'a AbPlan,
    pub layout: &'a AbLayout,
    pub ids: &'a disk::Ids,
    pub seed: &'a str,
    pub boot: &'a AbBoot,
    /// From [`root_fs_image`].
    pub root_fs: &'a Path,
    pub data_tree: &'a Path,
    /// Scratch folder.
    pub work: &'a Path,
}

/// Writes the A/B disk into `image` (which must not exist).
pub fn assemble(image: &Path, inp: &AssembleInputs<'_>) -> Result<()> {
    let l = inp.layout;
    let bios = inp.board.boot.syslinux.as_ref().map(|s| s.mbr.as_str());
    asm::create_table(image, l, inp.ids, inp.seed, bios)?;
    fat::write_fat(
        image,
        l.part(Role::Boot).extent,
        &inp.board.boot.label,
        inp.ids.fat_volume_id,
        &inp.boot.shared,
    )?;
    if inp.plan.scheme == AbScheme::Tryboot {
        let at = l.part(Role::SlotBoot(Slot::A)).extent;
        fat::write_fat(
            image,
            at,
            "boot-a",
            inp.ids.fat_volume_id ^ 0xa,
            &inp.boot.slot,
        )?;
    }
    asm::copy_into(image, l.part(Role::Root(Slot::A)).extent, inp.root_fs)?;
    asm::mkfs_data(
        image,
        l.part(Role::Data).extent,
        &asm::part_guid(inp.seed, 1000),
        inp.data_tree,
    )?;
    if let Some(s) = &inp.board.boot.syslinux {
        let dl = asm::as_disk_layout(l);
        disk::install_syslinux(image, &dl, &s.dir)?;
        fat::sync_backup_boot_sector(image, dl.boot)?;
    }
    let _ = inp.work;
    Ok(())
}

/// The A/B state of a build between staging and the outputs.
pub struct AbStaged {
    pub plan: AbPlan,
    pub vars: TemplateVars,
    pub boot: AbBoot,
    /// The node's state folders, for the data partition (removed when dropped).
    pub data_tree: tempfile::TempDir,
    /// Scratch space for the root image and the release (removed when dropped).
    pub work: tempfile::TempDir,
}

/// What [`prepare`] needs from the build.
pub struct PrepareInputs<'a> {
    pub staging: &'a Path,
    /// Where scratch folders go (the build's work folder).
    pub work_parent: &'a Path,
    pub plan: &'a AbPlan,
    pub cfg: &'a ImageConfig,
    pub board: &'a Board,
    /// The folder holding the update units (`firstboot/` of the data dir).
    pub unit_dir: &'a Path,
    /// clutch.toml's text.
    pub node_config: &'a str,
    /// The MBR PARTUUID of slot a's root (`os-prefix`).
    pub mbr_root: &'a str,
}

/// After staging: the slot's files, the data tree, the boot files.
pub fn prepare(i: &PrepareInputs<'_>) -> Result<AbStaged> {
    let key_file = i
        .plan
        .update
        .signing_key_file
        .as_deref()
        .context("[update] has no signing_key_file: the image could not check releases")?;
    let public = super::key::ReleaseKey::load(key_file)?.public_pem()?;
    let data_tree = tempfile::Builder::new()
        .prefix("data-")
        .tempdir_in(i.work_parent)?;
    let work = tempfile::Builder::new()
        .prefix("ab-")
        .tempdir_in(i.work_parent)?;
    stage(
        i.staging,
        &data_tree.path().join("t"),
        i.plan,
        i.board,
        &public,
        i.unit_dir,
    )?;
    let vars = template_vars(i.cfg, i.board, i.plan, i.mbr_root);
    let boot = boot_files(i.staging, i.board, i.plan, &vars, i.node_config)?;
    Ok(AbStaged {
        plan: i.plan.clone(),
        vars,
        boot,
        data_tree,
        work,
    })
}

/// The disk of an A/B build, and the root image the `update` output reuses.
pub struct AbDisk {
    pub layout: AbLayout,
    pub root_fs: std::path::PathBuf,
    /// The slot's own FAT image (`tryboot`), for the `update` output.
    pub slot_boot: Option<std::path::PathBuf>,
}

/// What [`build_disk`] needs from the build.
pub struct DiskInputs<'a> {
    pub staging: &'a Path,
    pub board: &'a Board,
    pub size: clutch_config::ImageSize,
    pub ids: &'a disk::Ids,
    pub seed: &'a str,
    /// Bytes the staged tree occupies.
    pub usage: u64,
}

/// Writes the A/B disk into `image` from the staged tree.
pub fn build_disk(image: &Path, s: &AbStaged, i: &DiskInputs<'_>) -> Result<AbDisk> {
    let board = i.board;
    let root_bytes = disk::ext4_size_for(i.usage, board.root.headroom.bytes()) / 4096 * 4096;
    let layout = super::layout(board, &s.plan, i.size, root_bytes)?;
    let root_fs = s.work.path().join("root.ext4");
    root_fs_image(
        i.staging,
        &root_fs,
        root_bytes,
        &board.root.label,
        &i.ids.root_fs_uuid,
    )?;
    if let Some(epoch) = crate::manifest::source_date_epoch_env() {
        crate::repro::fix_ext4_times(&root_fs, 0, epoch)?;
    }
    let slot_boot = match s.plan.scheme {
        AbScheme::Tryboot => {
            let p = s.work.path().join("boot.vfat");
            let size = layout.part(Role::SlotBoot(Slot::A)).extent.size;
            slot_boot_image(&p, size, "boot-a", i.ids.fat_volume_id ^ 0xa, &s.boot.slot)?;
            Some(p)
        }
        _ => None,
    };
    assemble(
        image,
        &AssembleInputs {
            board,
            plan: &s.plan,
            layout: &layout,
            ids: i.ids,
            seed: i.seed,
            boot: &s.boot,
            root_fs: &root_fs,
            data_tree: &s.data_tree.path().join("t"),
            work: s.work.path(),
        },
    )?;
    Ok(AbDisk {
        layout,
        root_fs,
        slot_boot,
    })
}

impl AbDisk {
    /// The partitions as `manifest.json` lists them.
    pub fn manifest_partitions(
        &self,
        seed: &str,
        board: &Board,
    ) -> Vec<crate::manifest::Partition> {
        self.layout
            .parts
            .iter()
            .map(|p| {
                let (name, fs, label) = match p.role {
                    Role::Boot => ("boot".to_string(), "vfat", board.boot.label.clone()),
                    Role::SlotBoot(s) => (format!("boot-{}", s.as_str()), "vfat", p.label.clone()),
                    Role::Root(s) => (format!("root-{}", s.as_str()), "ext4", p.label.clone()),
                    Role::Data => ("data".to_string(), "ext4", p.label.clone()),
                };
                crate::manifest::Partition {
                    number: p.number,
                    name,
                    filesystem: fs.into(),
                    label,
                    partuuid: super::assemble::part_guid(seed, p.number).to_string(),
                    offset: p.extent.start,
                    size: p.extent.size,
                }
            })
            .collect()
    }

    /// The boot payload of the `update` output.
    pub fn release_boot(&self, s: &AbStaged) -> Result<Vec<(String, Vec<u8>)>> {
        let slot_boot = match &self.slot_boot {
            Some(p) => Some(std::fs::read(p)?),
            None => None,
        };
        let folder_tar = match s.plan.scheme {
            AbScheme::OsPrefix => Some(slot_folder_tar(s.work.path(), &s.boot.slot)?),
            _ => None,
        };
        Ok(super::output::boot_payload(
            &s.plan,
            s.boot.kernel.clone(),
            s.boot.initrd.clone(),
            s.boot.entry.clone(),
            slot_boot,
            folder_tar,
        ))
    }
}

/// A tar of a slot's boot folder (`os-prefix`), paths relative to the folder.
fn slot_folder_tar(work: &Path, files: &[FatFile]) -> Result<Vec<u8>> {
    let dir = work.join("slot-folder");
    let _ = std::fs::remove_dir_all(&dir);
    let mut names = Vec::new();
    for f in files {
        let rel = f.path.split_once('/').map(|(_, r)| r).unwrap_or(&f.path);
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(&p, &f.data)?;
        names.push(rel.to_string());
    }
    names.sort();
    let tar = work.join("slot-folder.tar");
    cmd::run(
        Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
            .arg(&tar)
            .args(&names),
    )?;
    Ok(std::fs::read(&tar)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_follows_the_check_setting() {
        let t = timer_unit("daily");
        assert!(t.contains("\nOnCalendar=daily\n"), "{t}");
        assert!(t.contains("WantedBy=timers.target"));
    }
}
