//! The `pxe` output: a netboot set in `<out>/pxe/`.
//!
//! - `vmlinuz`, `initrd.img`: the image's kernel and initrd. With `pxe` requested, the root
//!   filesystem carries Debian's live-boot (see [`crate::rootfs::format_packages`]), so its
//!   initrd can bring up the network (DHCP), download the squashfs and run from it.
//! - `rootfs.squashfs`: the same staged root filesystem, made with mksquashfs (zstd), with a
//!   netboot fstab (the root is live-boot's overlay: squashfs below, RAM above; there is no
//!   partition to mount), without the initrd copies under /boot (the node never needs them).
//! - `boot.ipxe`: the iPXE script: kernel, initrd and the command line
//!   (`boot=live fetch=<url>/rootfs.squashfs clutch.config=<url>/config/<mac>`).
//! - `clutch.toml`: the node config as built; `clutch serve` answers `/config/<mac>` with
//!   `config/<mac>.toml`, else `config/default.toml`, else this file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clutch_config::{Board, ImageConfig};

use crate::{cmd, output, stage};

/// The folder in the output that holds the set.
pub const SET_DIR: &str = "pxe";

/// The files of a set, in the order they are written (`boot.ipxe` first: when `pxe` is the
/// only format it is the main artifact).
pub const FILES: [&str; 5] = [
    "boot.ipxe",
    "vmlinuz",
    "initrd.img",
    "clutch.toml",
    "rootfs.squashfs",
];

/// `/etc/fstab` inside the squashfs. live-boot adds its own lines (overlay root, /tmp).
pub const FSTAB: &str = "# Written by clutch build for netboot: the root file system is live-boot's overlay\n\
# (rootfs.squashfs below, RAM above); there is no boot or root partition to mount.\n";

/// The kernel arguments after the netboot ones: the board's console settings (less the ones
/// about a root partition), cgroups, and the config's own.
pub fn extra_cmdline(cfg: &ImageConfig, board: &Board) -> Vec<String> {
    let mut args: Vec<String> = board
        .cmdline
        .iter()
        .map(|a| a.to_string())
        .filter(|a| a != "rootwait" && !a.starts_with("root="))
        .collect();
    args.extend(crate::build::image_cmdline_args(cfg));
    args
}

/// The iPXE script. The server URL is `${clutch-url}` when the chaining script set it, else
/// `http://${next-server}:8080` (dnsmasq and `clutch serve` on one host, default port). The
/// node config URL ends in the booting NIC's MAC.
pub fn boot_ipxe(name: &str, extra: &[String]) -> String {
    let mut kernel = vec![
        "${clutch-url}/vmlinuz".to_string(),
        // The EFI stub finds the initrd by this name; harmless under BIOS.
        "initrd=initrd.img".into(),
        "boot=live".into(),
        "fetch=${clutch-url}/rootfs.squashfs".into(),
        "clutch.config=${clutch-url}/config/${netX/mac:hexhyp}".into(),
    ];
    kernel.extend(extra.iter().cloned());
    format!(
        "#!ipxe\n\
         # clutch netboot set `{name}` (clutch build --format pxe), served by `clutch serve`.\n\
         # Set ${{clutch-url}} before chaining this script to use another server or port.\n\
         isset ${{clutch-url}} || set clutch-url http://${{next-server}}:8080\n\
         echo clutch: netbooting {name} from ${{clutch-url}} (${{netX/mac}})\n\
         kernel {}\n\
         initrd ${{clutch-url}}/initrd.img\n\
         boot\n",
        kernel.join(" ")
    )
}

/// mksquashfs arguments: zstd, no appending, the initrd copies under /boot left out, and with
/// `SOURCE_DATE_EPOCH` every time stamp pinned so equal trees give equal images. Owners and
/// modes come from the tree as they are.
pub fn mksquashfs_args(src: &Path, dest: &Path, epoch: Option<u64>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![src.into(), dest.into()];
    for s in [
        "-noappend",
        "-comp",
        "zstd",
        "-b",
        "1M",
        "-no-progress",
        "-quiet",
        "-wildcards",
        "-e",
        "boot/initrd.img*",
    ] {
        a.push(s.into());
    }
    if let Some(t) = epoch {
        for s in ["-mkfs-time", &t.to_string(), "-all-time", &t.to_string()] {
            a.push(s.into());
        }
    }
    a
}

/// `SOURCE_DATE_EPOCH` when it is set to a number.
pub fn source_date_epoch() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Puts the netboot versions of a few files into the staged tree while the squashfs is made,
/// and the originals back when dropped (the tree may still be read after this output).
struct Swapped {
    saved: Vec<(PathBuf, Option<Vec<u8>>)>,
}

impl Swapped {
    fn new(root: &Path, files: &[(&str, &str)]) -> Result<Self> {
        let mut s = Swapped { saved: Vec::new() };
        for (rel, content) in files {
            let p = root.join(rel);
            let old = std::fs::read(&p).ok();
            s.saved.push((p.clone(), old));
            std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok(s)
    }
}

impl Drop for Swapped {
    fn drop(&mut self) {
        for (p, old) in self.saved.drain(..) {
            let _ = match old {
                Some(d) => std::fs::write(&p, d),
                None => std::fs::remove_file(&p),
            };
        }
    }
}

pub struct PxeInputs<'a> {
    pub staging: &'a Path,
    pub cfg: &'a ImageConfig,
    pub board: &'a Board,
    pub name: &'a str,
    /// The node config text, as it goes onto a disk image's FAT partition.
    pub node_config: &'a str,
    /// The node config holds a secret: `clutch.toml` is written mode 0600.
    pub secret: bool,
}

/// Writes the set into `<out>/pxe/` under temporary names registered with `pending`.
/// Returns a one-line summary.
pub fn write(pending: &mut output::Pending, out: &Path, inp: &PxeInputs<'_>) -> Result<String> {
    let dir = out.join(SET_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernel = image_file(inp.staging, "/vmlinuz")?;
    let initrd = image_file(inp.staging, "/initrd.img")?;
    let live_hooks = inp.staging.join("usr/share/initramfs-tools/hooks/live");
    if !live_hooks.is_file() {
        bail!(
            "the root filesystem has no live-boot initramfs hooks ({} is missing), so its initrd cannot netboot",
            live_hooks.display()
        );
    }
    let ipxe = boot_ipxe(inp.name, &extra_cmdline(inp.cfg, inp.board));
    let [f_ipxe, f_kernel, f_initrd, f_config, f_squash] = FILES.map(|f| dir.join(f));
    pending.add(f_ipxe, |t| Ok(std::fs::write(t, &ipxe)?))?;
    pending.add(f_kernel, |t| copy(&kernel, t))?;
    pending.add(f_initrd, |t| copy(&initrd, t))?;
    if inp.secret {
        pending.private(&f_config);
    }
    pending.add(f_config, |t| Ok(std::fs::write(t, inp.node_config)?))?;
    let mut squash_size = 0;
    pending.add(f_squash, |t| {
        let _swap = Swapped::new(inp.staging, &[("etc/fstab", FSTAB)])?;
        cmd::run(Command::new("mksquashfs").args(mksquashfs_args(
            inp.staging,
            t,
            source_date_epoch(),
        )))
        .context("making the squashfs with mksquashfs (package squashfs-tools)")?;
        squash_size = std::fs::metadata(t)?.len();
        Ok(())
    })?;
    let k = std::fs::metadata(&kernel)?.len() + std::fs::metadata(&initrd)?.len();
    Ok(format!(
        "{}: kernel+initrd {} MiB, rootfs.squashfs {} MiB",
        dir.display(),
        k >> 20,
        squash_size >> 20
    ))
}

fn image_file(staging: &Path, path: &str) -> Result<PathBuf> {
    let p = stage::resolve_in_root(staging, path)?;
    if !p.is_file() {
        bail!("netboot needs {path} from the root filesystem, but the image has no such file");
    }
    Ok(p)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::image_config as cfg;

    fn board() -> Board {
        crate::testutil::board("amd64")
    }

    #[test]
    fn script_boots_live_with_fetch_and_config_urls() {
        let extra = extra_cmdline(&cfg("[kernel]\ncmdline = [\"quiet\"]\n"), &board());
        assert!(extra.contains(&"console=ttyS0,115200".to_string()));
        assert!(!extra.iter().any(|a| a.starts_with("root") && a != "rw"));
        assert_eq!(extra.last().unwrap(), "quiet");
        let s = boot_ipxe("lab", &extra);
        assert!(s.starts_with("#!ipxe\n"));
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        for want in [
            "kernel ${clutch-url}/vmlinuz initrd=initrd.img ",
            " boot=live ",
            " fetch=${clutch-url}/rootfs.squashfs ",
            " clutch.config=${clutch-url}/config/${netX/mac:hexhyp} ",
            " console=ttyS0,115200 ",
            " cgroup_enable=memory cgroup_memory=1 ",
        ] {
            assert!(kernel.contains(want), "{want} missing in {kernel}");
        }
        assert!(s.contains("\ninitrd ${clutch-url}/initrd.img\nboot\n"));
        assert!(s.contains("isset ${clutch-url} || set clutch-url http://${next-server}:8080\n"));
        // Every variable is closed (no `{{` or stray braces from format!).
        assert_eq!(s.matches("${").count(), s.matches('}').count());
    }

    #[test]
    fn squashfs_args_pin_times_only_with_an_epoch() {
        let a = mksquashfs_args(Path::new("/s"), Path::new("/d"), Some(1700000000));
        let s: Vec<String> = a.iter().map(|x| x.to_string_lossy().into()).collect();
        assert_eq!(&s[..2], ["/s", "/d"]);
        assert!(s.windows(2).any(|w| w == ["-comp", "zstd"]));
        assert!(s.windows(2).any(|w| w == ["-all-time", "1700000000"]));
        assert!(s.windows(2).any(|w| w == ["-mkfs-time", "1700000000"]));
        assert!(s.contains(&"-noappend".to_string()));
        assert!(
            !s.contains(&"-all-root".to_string()),
            "owners come from the tree"
        );
        let b = mksquashfs_args(Path::new("/s"), Path::new("/d"), None);
        assert!(!b.iter().any(|x| x == "-all-time"));
    }

    #[test]
    fn swapped_files_come_back() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/fstab"), "disk\n").unwrap();
        {
            let _s = Swapped::new(t.path(), &[("etc/fstab", FSTAB), ("etc/new", "x")]).unwrap();
            assert_eq!(
                std::fs::read_to_string(t.path().join("etc/fstab")).unwrap(),
                FSTAB
            );
        }
        assert_eq!(
            std::fs::read_to_string(t.path().join("etc/fstab")).unwrap(),
            "disk\n"
        );
        assert!(!t.path().join("etc/new").exists());
    }

    /// A fake staged tree through the real mksquashfs: the set has every file, the squashfs
    /// has the netboot fstab and no initrd copy, and the tree is as it was.
    #[test]
    fn writes_a_whole_set_when_mksquashfs_is_present() {
        if Command::new("mksquashfs").arg("-version").output().is_err() {
            eprintln!("mksquashfs not installed: skipped");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let st = t.path().join("stage");
        for d in ["etc", "boot", "usr/share/initramfs-tools/hooks"] {
            std::fs::create_dir_all(st.join(d)).unwrap();
        }
        std::fs::write(st.join("etc/fstab"), "PARTUUID=x / ext4\n").unwrap();
        std::fs::write(st.join("boot/vmlinuz-6.12"), "KERNEL").unwrap();
        std::fs::write(st.join("boot/initrd.img-6.12"), "INITRD").unwrap();
        std::fs::write(st.join("usr/share/initramfs-tools/hooks/live"), "#!/bin/sh").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.12", st.join("vmlinuz")).unwrap();
        std::os::unix::fs::symlink("boot/initrd.img-6.12", st.join("initrd.img")).unwrap();
        let out = t.path().join("out");
        let (c, b) = (cfg(""), board());
        let mut pending = output::Pending::default();
        let inp = PxeInputs {
            staging: &st,
            cfg: &c,
            board: &b,
            name: "t",
            node_config: "[system]\n",
            secret: true,
        };
        write(&mut pending, &out, &inp).unwrap();
        let arts = pending.commit_with_sums(&out.join("SHA256SUMS")).unwrap();
        assert_eq!(arts.len(), 5);
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode("pxe/clutch.toml"),
            0o600,
            "the node config holds a secret"
        );
        assert_eq!(mode("pxe/vmlinuz"), 0o644);
        assert_eq!(arts[0], out.join("pxe/boot.ipxe"));
        assert_eq!(
            std::fs::read(out.join("pxe/initrd.img")).unwrap(),
            b"INITRD"
        );
        let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
        assert!(sums.contains("  pxe/rootfs.squashfs\n"), "{sums}");
        let ls = Command::new("unsquashfs")
            .arg("-lls")
            .arg(out.join("pxe/rootfs.squashfs"))
            .output()
            .unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert!(
            ls.contains("boot/vmlinuz-6.12") && !ls.contains("squashfs-root/boot/initrd"),
            "{ls}"
        );
        let fstab = Command::new("unsquashfs")
            .arg("-cat")
            .arg(out.join("pxe/rootfs.squashfs"))
            .arg("etc/fstab")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&fstab.stdout), FSTAB);
        assert_eq!(
            std::fs::read_to_string(st.join("etc/fstab")).unwrap(),
            "PARTUUID=x / ext4\n"
        );
        // No temporary names left behind.
        let left: Vec<_> = std::fs::read_dir(out.join("pxe"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(left.is_empty());
    }
}
