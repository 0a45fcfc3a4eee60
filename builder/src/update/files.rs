//! The text files of an A/B image, as plain functions of the plan (golden-tested): boot
//! loader entries and configs per scheme, systemd-sysupdate transfer definitions, the fstab
//! and mounts that put the node's state on the data partition, and the release's metadata.

pub use clutch_config::ab::{ReleaseInfo, autoboot_txt, esp_initrd, esp_kernel, syslinux_cfg};
use clutch_config::{AbScheme, Release};

use super::{AbPlan, DATA_LABEL, DATA_MOUNT, root_label, slot_boot_label};

/// The data partition's mount point, relative (for staging).
pub const DATA_MOUNT_REL: &str = "data";
/// Where the node keeps downloaded, verified release files before sysupdate writes them.
pub const INCOMING: &str = "/var/lib/clutch/update/incoming";
/// The sysupdate definitions clutch-firstboot runs with (not `/usr/lib/sysupdate.d`, so
/// systemd's own sysupdate timer, if someone enables it, never runs unverified updates).
pub const TRANSFERS_DIR: &str = "usr/lib/clutch/sysupdate.d";
/// The release-signing public key in the image.
pub const PUBLIC_KEY: &str = "usr/lib/clutch/update-key.pub";
/// Boot attempts a new release gets before the boot loader falls back.
pub const TRIES: u32 = 2;
/// Seconds before a kernel panic reboots (so a release that panics falls back by itself).
pub const PANIC_REBOOT: u32 = 10;

/// State on the data partition, bind-mounted over the slot's paths (data folder, node
/// path). Debian keeps its package database in /var/lib/dpkg, which belongs to the slot's
/// /usr, so /var itself stays per slot; the node's own state in it moves.
pub const PERSISTENT: &[(&str, &str)] = &[
    ("clutch", "/var/lib/clutch"),
    ("home", "/home"),
    ("etcd", "/var/lib/etcd"),
    ("rancher", "/var/lib/rancher"),
];

/// The files a release's update set holds, by role (names in `update/`).
pub fn root_image_name(r: &Release) -> String {
    format!("clutch_{r}.root.raw.xz")
}
pub fn kernel_name(r: &Release) -> String {
    format!("clutch_{r}.vmlinuz.xz")
}
pub fn initrd_name(r: &Release) -> String {
    format!("clutch_{r}.initrd.xz")
}
pub fn entry_name(r: &Release) -> String {
    format!("clutch_{r}.conf.xz")
}
pub fn slot_boot_image_name(r: &Release) -> String {
    format!("clutch_{r}.boot.vfat.xz")
}
pub fn slot_folder_name(r: &Release) -> String {
    format!("clutch_{r}.boot.tar.xz")
}

/// The kernel's root argument: by GPT label on GPT schemes (a release does not know which
/// slot it will land in; sysupdate labels it), by PARTUUID on the MBR scheme.
pub fn root_arg(p: &AbPlan, mbr_root_partuuid: &str) -> String {
    match p.scheme {
        AbScheme::SystemdBoot | AbScheme::Tryboot => {
            format!("root=PARTLABEL={}", root_label(&p.release))
        }
        AbScheme::OsPrefix => format!("root=PARTUUID={mbr_root_partuuid}"),
    }
}

/// The whole command line of a release: root, the board's arguments, the image's, and a
/// reboot on panic.
pub fn cmdline(root: &str, board_and_image_args: &[String]) -> String {
    let mut a = vec![root.to_string()];
    a.extend(board_and_image_args.iter().cloned());
    a.push(format!("panic={PANIC_REBOOT}"));
    a.join(" ")
}

/// A Boot Loader Specification entry. `sort-key` + `version` make systemd-boot put the
/// newest release first; entries without tries left go last, which is the fallback.
pub fn loader_entry(r: &Release, cmdline: &str) -> String {
    format!(
        "title   clutch {r}\n\
         sort-key clutch\n\
         version {r}\n\
         linux   /{}\n\
         initrd  /{}\n\
         options {cmdline}\n",
        esp_kernel(r),
        esp_initrd(r)
    )
}

/// systemd-boot's loader.conf: no menu, the first `clutch_*` entry in its order.
pub fn loader_conf() -> String {
    "timeout 0\nconsole-mode keep\ndefault clutch_*\n".into()
}

/// The `os_prefix=` line added to a Raspberry Pi 3's config.txt (the firmware loads the
/// kernel, initramfs, cmdline.txt and device trees from that folder).
pub fn os_prefix_line(slot_folder: &str) -> String {
    format!("os_prefix={slot_folder}/\n")
}

/// `/etc/fstab` of an A/B root: everything by label, so any release fits any disk.
pub fn fstab(boot_mount: &str, boot_fat_label: &str) -> String {
    let mut s = format!(
        "# Written by clutch build (A/B image). The root file system is the slot the boot\n\
         # loader chose (root= on the kernel command line); the node's state is on {DATA_LABEL}.\n\
         LABEL={boot_fat_label}  {boot_mount}  vfat  defaults,umask=0077,shortname=winnt  0  2\n\
         LABEL={DATA_LABEL}  {DATA_MOUNT}  ext4  defaults,noatime  0  2\n"
    );
    for (dir, node) in PERSISTENT {
        s += &format!(
            "{DATA_MOUNT}/{dir}  {node}  none  bind,x-systemd.requires-mounts-for={DATA_MOUNT}  0  0\n"
        );
    }
    s
}

/// Lines added to the slot's `/etc/os-release` (sysupdate's `%A` is IMAGE_VERSION).
pub fn os_release_lines(r: &Release) -> String {
    format!("IMAGE_ID=clutch\nIMAGE_VERSION={r}\n")
}

fn transfer(source_pattern: &str, target: &str) -> String {
    format!(
        "# Written by clutch build. clutch-firstboot has checked every source file against the\n\
         # signed SHA256SUMS before it runs systemd-sysupdate with these definitions.\n\
         [Transfer]\nProtectVersion=%A\nVerify=no\n\n\
         [Source]\nType=regular-file\nPath={INCOMING}\nMatchPattern={source_pattern}\n\n\
         [Target]\n{target}"
    )
}

/// systemd-sysupdate transfer definitions (file name, content), in the order sysupdate
/// runs them: the boot entry last, so an interrupted update never leaves an entry whose
/// root or kernel is not there.
pub fn transfers(p: &AbPlan) -> Vec<(String, String)> {
    let root = transfer(
        "clutch_@v.root.raw.xz",
        &format!(
            "Type=partition\nPath=auto\nMatchPartitionType=root\nMatchPattern={}\nInstancesMax=2\n",
            "clutch_@v"
        ),
    );
    let mut t = vec![("10-root.transfer".to_string(), root)];
    match p.scheme {
        AbScheme::SystemdBoot => {
            for (n, what, ext) in [
                ("20-kernel.transfer", "vmlinuz", "vmlinuz"),
                ("30-initrd.transfer", "initrd", "initrd"),
            ] {
                t.push((
                    n.into(),
                    transfer(
                        &format!("clutch_@v.{what}.xz"),
                        &format!(
                            "Type=regular-file\nPath=/boot/efi/EFI/clutch\nMatchPattern=clutch_@v.{ext}\nMode=0644\nInstancesMax=2\n"
                        ),
                    ),
                ));
            }
            t.push((
                "90-entry.transfer".into(),
                transfer(
                    "clutch_@v.conf.xz",
                    &format!(
                        "Type=regular-file\nPath=/boot/efi/loader/entries\n\
                         MatchPattern=clutch_@v+@l-@d.conf clutch_@v+@l.conf clutch_@v.conf\n\
                         Mode=0644\nTriesLeft={TRIES}\nTriesDone=0\nInstancesMax=2\n"
                    ),
                ),
            ));
        }
        AbScheme::Tryboot => t.push((
            "20-boot.transfer".into(),
            transfer(
                "clutch_@v.boot.vfat.xz",
                &format!(
                    "Type=partition\nPath=auto\nMatchPartitionType={}\nMatchPattern=clutchboot_@v\nInstancesMax=2\n",
                    super::BASIC_DATA
                ),
            ),
        )),
        // MBR has no partition labels for sysupdate: clutch-firstboot writes the slot.
        AbScheme::OsPrefix => return Vec::new(),
    }
    t
}

/// Labels the builder writes, for the node and the tests: the release's slot boot label.
pub fn labels(r: &Release) -> (String, String) {
    (root_label(r), slot_boot_label(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Release {
        Release::try_from(s).unwrap()
    }

    fn golden(name: &str, got: &str) {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/update")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, got).unwrap();
        }
        let want = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", p.display()));
        assert_eq!(got, want, "{name} differs from its golden file");
    }

    fn plan(scheme: AbScheme) -> AbPlan {
        AbPlan {
            scheme,
            arch: "arm64".into(),
            release: r("2026.12.1"),
            update: clutch_config::UpdateSection {
                source: "http://10.0.0.1:8080/update/"
                    .to_string()
                    .try_into()
                    .unwrap(),
                check: clutch_config::UpdateCheck::Daily,
                signing_key_file: None,
            },
            slot_size: 2 << 30,
            data_size: 256 << 20,
            slot_boot_size: Some(128 << 20),
        }
    }

    #[test]
    fn pi_tryboot_files_match_the_firmware_documentation() {
        let a = autoboot_txt(2, 3);
        golden("rpi4-autoboot.txt", &a);
        // The keys the firmware reads, in the sections it reads them from.
        let all = a.split("[tryboot]").next().unwrap();
        assert!(all.contains("[all]\ntryboot_a_b=1\nboot_partition=2\n"));
        assert!(a.ends_with("[tryboot]\nboot_partition=3\n"));
        let t = transfers(&plan(AbScheme::Tryboot));
        let names: Vec<_> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["10-root.transfer", "20-boot.transfer"]);
        golden("rpi4-20-boot.transfer", &t[1].1);
        assert_eq!(
            root_arg(&plan(AbScheme::Tryboot), "x"),
            "root=PARTLABEL=clutch_2026.12.1"
        );
    }

    #[test]
    fn amd64_entries_count_boots_and_the_entry_is_written_last() {
        let p = plan(AbScheme::SystemdBoot);
        let t = transfers(&p);
        let names: Vec<_> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "10-root.transfer",
                "20-kernel.transfer",
                "30-initrd.transfer",
                "90-entry.transfer"
            ]
        );
        golden("amd64-10-root.transfer", &t[0].1);
        golden("amd64-90-entry.transfer", &t[3].1);
        let c = cmdline(
            &root_arg(&p, ""),
            &["console=ttyS0,115200".into(), "rw".into()],
        );
        assert_eq!(
            c,
            "root=PARTLABEL=clutch_2026.12.1 console=ttyS0,115200 rw panic=10"
        );
        golden("amd64-loader-entry.conf", &loader_entry(&p.release, &c));
        golden("amd64-loader.conf", &loader_conf());
        golden("amd64-syslinux.cfg", &syslinux_cfg(&p.release, &c));
        golden("fstab", &fstab("/boot/efi", "ESP"));
    }

    #[test]
    fn pi3_folders_by_os_prefix() {
        assert_eq!(os_prefix_line("a"), "os_prefix=a/\n");
        assert!(transfers(&plan(AbScheme::OsPrefix)).is_empty());
        assert_eq!(
            root_arg(&plan(AbScheme::OsPrefix), "1234abcd-02"),
            "root=PARTUUID=1234abcd-02"
        );
    }
}
