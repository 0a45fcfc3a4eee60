//! Which release and slot this boot runs, and what a slot's first boot takes over from the
//! node: the root slots are whole file systems, so the node's identity that lives in
//! `/etc` (ssh host keys, machine id) is kept on the data partition
//! (`/var/lib/clutch/identity/`) and copied into each slot before anything else looks at it.
//!
//! Per slot vs once per node (see `crate::plan`): steps with a marker write it to
//! `/var/lib/clutch/done/` (the data partition: once per node: grow, mkfs of loopback
//! devices) unless they change the slot's own files, whose markers live in the slot
//! (`/etc/clutch/done/`, [`PER_SLOT_STEPS`]) so a new slot runs them again. Every other
//! step (users, keys, hostname, wifi, ssh, time zone, units) runs on every boot from the
//! persistent config anyway.

use std::path::{Path, PathBuf};

use clutch_config::Release;

use super::boot::{Scheme, Slot};
use super::verify::AbInfo;
use crate::facts::Paths;
use crate::fsx;

/// What the image says about its A/B layout (node path); absent on other images.
pub const AB_INFO: &str = "/usr/lib/clutch/ab.json";
/// Node identity kept for every slot (node path).
pub const IDENTITY_DIR: &str = "/var/lib/clutch/identity";
/// Markers of steps that change the slot's own files (node path).
pub const SLOT_DONE_DIR: &str = "/etc/clutch/done";
/// Marker steps whose effect lives in the slot: a new slot runs them again. None today:
/// what changes a slot's own files (users, passwords, host name, units, imported Raspberry
/// Pi OS and cloud-init settings from their record) is applied at every boot, and the
/// once-only steps (grow, mkfs) act on the data partition. A future once-only step that
/// writes into the slot belongs here.
pub const PER_SLOT_STEPS: &[&str] = &[];

/// Is `step`'s marker kept in the slot?
pub fn per_slot(step: &str) -> bool {
    PER_SLOT_STEPS.contains(&step)
}

/// This boot: the image's A/B facts, the running release and slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub info: AbInfo,
    pub scheme: Scheme,
    pub release: Release,
    pub slot: Slot,
    /// Node paths: the root partition and its disk (`/dev/vda2`, `/dev/vda`).
    pub root_dev: PathBuf,
    pub disk_dev: PathBuf,
}

/// Reads `ab.json`; `Ok(None)` on an image without slots.
pub fn ab_info(paths: &Paths) -> Result<Option<AbInfo>, String> {
    let p = paths.host(AB_INFO);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// `IMAGE_VERSION=` of the slot's os-release.
pub fn image_version(os_release: &str) -> Option<Release> {
    os_release.lines().find_map(|l| {
        let v = l.strip_prefix("IMAGE_VERSION=")?;
        Release::try_from(v.trim().trim_matches('"')).ok()
    })
}

/// The release and slot of this boot.
pub fn detect(paths: &Paths) -> Result<Option<Running>, String> {
    let Some(info) = ab_info(paths)? else {
        return Ok(None);
    };
    let scheme = Scheme::parse(&info.scheme)
        .ok_or_else(|| format!("{AB_INFO}: unknown scheme `{}`", info.scheme))?;
    let osr = std::fs::read_to_string(paths.host("/etc/os-release")).unwrap_or_default();
    let release = image_version(&osr).unwrap_or_else(|| info.release.clone());
    let mounts = crate::facts::mounts(&paths.host("/proc/self/mountinfo"));
    let root = mounts.get("/").ok_or("no / in /proc/self/mountinfo")?;
    let root_dev = PathBuf::from(root);
    let name = root_dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = paths.host(format!("/sys/class/block/{name}"));
    let partno: u32 = std::fs::read_to_string(sys.join("partition"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("the root device {root} is not a partition"))?;
    let slot = scheme
        .slot_of_partition(partno)
        .ok_or_else(|| format!("the root partition {root} (number {partno}) is not a root slot"))?;
    let disk = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .ok_or_else(|| format!("no disk for {root}"))?;
    Ok(Some(Running {
        info,
        scheme,
        release,
        slot,
        root_dev,
        disk_dev: PathBuf::from("/dev").join(disk),
    }))
}

/// The node path of partition `n` of `disk` (`/dev/vda` 3 → `/dev/vda3`, `/dev/mmcblk0` 3 →
/// `/dev/mmcblk0p3`).
pub fn partition_dev(disk: &Path, n: u32) -> PathBuf {
    let d = disk.display().to_string();
    if d.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{d}p{n}"))
    } else {
        PathBuf::from(format!("{d}{n}"))
    }
}

/// The GPT name of a partition (`PARTNAME=` in sysfs), e.g. `clutch_2` or `_empty`.
pub fn partition_label(paths: &Paths, dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let uevent =
        std::fs::read_to_string(paths.host(format!("/sys/class/block/{name}/uevent"))).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("PARTNAME=").map(str::to_string))
}

const KEY_FILES: &[&str] = &[
    "ssh_host_rsa_key",
    "ssh_host_rsa_key.pub",
    "ssh_host_ecdsa_key",
    "ssh_host_ecdsa_key.pub",
    "ssh_host_ed25519_key",
    "ssh_host_ed25519_key.pub",
];

fn copy_if_different(from: &Path, to: &Path, mode: u32) -> std::io::Result<bool> {
    match std::fs::read(from) {
        Ok(data) if !data.is_empty() => fsx::write_if_changed(to, &data, mode),
        _ => Ok(false),
    }
}

fn key_mode(name: &str) -> u32 {
    if name.ends_with(".pub") { 0o644 } else { 0o600 }
}

/// The state folders on the data partition and their owner in this release
/// (`/usr/lib/clutch/persistent.json`, written by the builder).
pub const PERSISTENT_INFO: &str = "/usr/lib/clutch/persistent.json";

pub use clutch_config::ab::PersistentDir;

/// One change to a state folder on the data partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipFix {
    /// Node path of the folder.
    pub node: String,
    /// (uid, gid) when the owner differs.
    pub owner: Option<(u32, u32)>,
    /// Permission bits when they differ.
    pub mode: Option<u32>,
}

/// What to change on the data partition's state folders for this release. Only the folder
/// itself: what a package keeps inside is its own.
pub fn ownership_fixes(
    want: &[PersistentDir],
    have: impl Fn(&str) -> Option<(u32, u32, u32)>,
) -> Vec<OwnershipFix> {
    want.iter()
        .filter_map(|d| {
            let (uid, gid, mode) = have(&d.node)?;
            let owner = ((uid, gid) != (d.uid, d.gid)).then_some((d.uid, d.gid));
            let mode = (mode & 0o7777 != d.mode).then_some(d.mode);
            (owner.is_some() || mode.is_some()).then(|| OwnershipFix {
                node: d.node.clone(),
                owner,
                mode,
            })
        })
        .collect()
}

/// Gives the state folders the owner and mode this release's packages expect (a release
/// that adds etcd finds /var/lib/etcd owned by `etcd`).
pub fn fix_ownership(paths: &Paths, sys: &dyn crate::sys::Sys) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(text) = std::fs::read(paths.host(PERSISTENT_INFO)) else {
        return;
    };
    let want: Vec<PersistentDir> = match serde_json::from_slice(&text) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("{PERSISTENT_INFO}: {e}");
            return;
        }
    };
    let have = |node: &str| {
        let m = std::fs::metadata(paths.host(node)).ok()?;
        Some((m.uid(), m.gid(), m.mode()))
    };
    for OwnershipFix { node, owner, mode } in ownership_fixes(&want, have) {
        let p = paths.host(&node);
        if let Some((u, g)) = owner {
            tracing::info!("{node}: owner {u}:{g} for this release");
            if let Err(e) = sys.chown(&p, u, g) {
                tracing::warn!("chown {node}: {e}");
            }
        }
        if let Some(m) = mode {
            if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)) {
                tracing::warn!("chmod {node}: {e}");
            }
        }
    }
}

/// Before the facts are gathered: the node's identity into this slot (a new slot has no
/// host keys and an empty machine id). A no-op on images without slots and on a node's
/// very first boot (nothing kept yet).
pub fn carry_in(paths: &Paths) -> Vec<String> {
    let mut done = Vec::new();
    if !matches!(ab_info(paths), Ok(Some(_))) {
        return done;
    }
    let id = paths.host(IDENTITY_DIR);
    for k in KEY_FILES {
        let to = paths.host(format!("/etc/ssh/{k}"));
        match copy_if_different(&id.join("ssh").join(k), &to, key_mode(k)) {
            Ok(true) => done.push(format!("/etc/ssh/{k}")),
            Ok(false) => {}
            Err(e) => tracing::warn!("keeping {k} for this slot: {e}"),
        }
    }
    match copy_if_different(
        &id.join("machine-id"),
        &paths.host("/etc/machine-id"),
        0o444,
    ) {
        Ok(true) => done.push("/etc/machine-id".into()),
        Ok(false) => {}
        Err(e) => tracing::warn!("keeping the machine id for this slot: {e}"),
    }
    take_handover(paths, &mut done);
    done
}

/// The cluster engine's own configuration, written into `/etc` of the running slot when the
/// node joined (etcd's member settings, k3s's config and unit). A new slot has the
/// packaged defaults there: started on those, etcd would run as a lone default member on
/// localhost instead of this node's member. Handed over when the node leaves a slot.
const ENGINE_FILES: &[(&str, u32)] = &[
    (clutch_cluster::engine::etcd::ENV_FILE, 0o644),
    (clutch_cluster::engine::k3s::CONFIG, 0o600),
    (clutch_cluster::engine::k3s::UNIT_FILE, 0o644),
];

/// Where [`hand_over`] keeps the engine files (node path), and the slot they are for.
const HANDOVER_DIR: &str = "/var/lib/clutch/identity/engine";
const HANDOVER_FOR: &str = "for-slot";

fn handover_name(node_path: &str) -> String {
    node_path.trim_start_matches('/').replace('/', "_")
}

/// Before rebooting into slot `to`: keeps this slot's engine files on the data partition
/// for `to`, which takes them at its next boot ([`carry_in`]). Only the slot named gets
/// them, so a slot that falls back to the one it came from keeps its own.
pub fn hand_over(paths: &Paths, to: Slot) -> std::io::Result<()> {
    let dir = paths.host(HANDOVER_DIR);
    // The target first cleared, so an interrupted hand-over is never taken half-done.
    match std::fs::remove_file(dir.join(HANDOVER_FOR)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    for (f, mode) in ENGINE_FILES {
        let kept = dir.join(handover_name(f));
        match std::fs::read(paths.host(f)) {
            Ok(data) => {
                fsx::write_if_changed(&kept, &data, *mode)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::remove_file(&kept) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    fsx::write_atomic(
        &dir.join(HANDOVER_FOR),
        format!("{}\n", to.as_str()).as_bytes(),
        0o600,
    )
}

/// The engine files handed over to this slot, into it (once: the hand-over is cleared).
fn take_handover(paths: &Paths, done: &mut Vec<String>) {
    let dir = paths.host(HANDOVER_DIR);
    let Ok(for_slot) = std::fs::read_to_string(dir.join(HANDOVER_FOR)) else {
        return;
    };
    let here = match detect(paths) {
        Ok(Some(r)) => r.slot,
        _ => return,
    };
    if for_slot.trim() != here.as_str() {
        return;
    }
    for (f, mode) in ENGINE_FILES {
        // Only a file that was not kept is skipped; any other read error leaves the
        // hand-over in place for the next boot.
        let taken = match std::fs::read(dir.join(handover_name(f))) {
            Ok(data) => fsx::write_if_changed(&paths.host(f), &data, *mode),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        match taken {
            Ok(true) => done.push((*f).to_string()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("taking over {f} from the slot before: {e}");
                return;
            }
        }
    }
    if let Err(e) = std::fs::remove_file(dir.join(HANDOVER_FOR)) {
        tracing::warn!("clearing the engine hand-over: {e}");
    }
    fsx::sync_dir(&dir);
}

/// After the node setup: what the setup made (host keys, machine id) is kept for the
/// other slot, once.
pub fn carry_out(paths: &Paths) {
    if !matches!(ab_info(paths), Ok(Some(_))) {
        return;
    }
    let id = paths.host(IDENTITY_DIR);
    for k in KEY_FILES {
        let kept = id.join("ssh").join(k);
        if kept.exists() {
            continue;
        }
        if let Err(e) = copy_if_different(&paths.host(format!("/etc/ssh/{k}")), &kept, key_mode(k))
        {
            tracing::warn!("keeping {k} on the data partition: {e}");
        }
    }
    let kept = id.join("machine-id");
    if !kept.exists() {
        if let Err(e) = copy_if_different(&paths.host("/etc/machine-id"), &kept, 0o444) {
            tracing::warn!("keeping the machine id on the data partition: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ab_root() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths::new(d.path(), "/boot/efi");
        let w = |rel: &str, body: &str| {
            let f = p.host(rel);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, body).unwrap();
        };
        w(
            AB_INFO,
            r#"{"scheme":"systemd-boot","board":"amd64","arch":"amd64","release":"1"}"#,
        );
        w(
            "/etc/os-release",
            "ID=debian\nIMAGE_ID=clutch\nIMAGE_VERSION=2\n",
        );
        w(
            "/proc/self/mountinfo",
            "22 1 254:3 / / rw,noatime shared:1 - ext4 /dev/vda3 rw\n",
        );
        w("/sys/devices/pci/virtio2/block/vda/vda3/partition", "3\n");
        w(
            "/sys/devices/pci/virtio2/block/vda/vda3/uevent",
            "PARTN=3\nPARTNAME=clutch_2\n",
        );
        std::fs::create_dir_all(p.host("/sys/class/block")).unwrap();
        std::os::unix::fs::symlink(
            p.host("/sys/devices/pci/virtio2/block/vda/vda3"),
            p.host("/sys/class/block/vda3"),
        )
        .unwrap();
        (d, p)
    }

    #[test]
    fn the_running_slot_comes_from_the_root_partition() {
        let (_d, p) = ab_root();
        let r = detect(&p).unwrap().unwrap();
        assert_eq!(r.release.as_str(), "2");
        assert_eq!(r.slot, Slot::B);
        assert_eq!(r.scheme, Scheme::SystemdBoot);
        assert_eq!(r.disk_dev, Path::new("/dev/vda"));
        assert_eq!(
            partition_label(&p, &r.root_dev).as_deref(),
            Some("clutch_2")
        );
        assert_eq!(
            partition_dev(Path::new("/dev/mmcblk0"), 5),
            Path::new("/dev/mmcblk0p5")
        );
        assert_eq!(
            partition_dev(Path::new("/dev/vda"), 2),
            Path::new("/dev/vda2")
        );
        // An image without slots has nothing to detect.
        let plain = tempfile::tempdir().unwrap();
        assert_eq!(
            detect(&Paths::new(plain.path(), "/boot/efi")).unwrap(),
            None
        );
    }

    #[test]
    fn a_new_slot_gets_the_node_identity_back() {
        let (_d, p) = ab_root();
        // First slot: the setup made keys and a machine id; they are kept.
        std::fs::create_dir_all(p.host("/etc/ssh")).unwrap();
        std::fs::write(p.host("/etc/ssh/ssh_host_ed25519_key"), "PRIVATE").unwrap();
        std::fs::write(p.host("/etc/ssh/ssh_host_ed25519_key.pub"), "PUBLIC").unwrap();
        std::fs::write(p.host("/etc/machine-id"), "0123\n").unwrap();
        assert!(carry_in(&p).is_empty(), "nothing kept yet");
        carry_out(&p);
        // A new slot: no keys, an empty machine id.
        std::fs::remove_file(p.host("/etc/ssh/ssh_host_ed25519_key")).unwrap();
        std::fs::remove_file(p.host("/etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
        std::fs::write(p.host("/etc/machine-id"), "").unwrap();
        let got = carry_in(&p);
        assert_eq!(
            got,
            [
                "/etc/ssh/ssh_host_ed25519_key",
                "/etc/ssh/ssh_host_ed25519_key.pub",
                "/etc/machine-id"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(p.host("/etc/ssh/ssh_host_ed25519_key")).unwrap(),
            "PRIVATE"
        );
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(p.host("/etc/ssh/ssh_host_ed25519_key")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(p.host("/etc/machine-id")).unwrap(),
            "0123\n"
        );
        // Kept files are not replaced by a slot's later keys.
        std::fs::write(p.host("/etc/ssh/ssh_host_ed25519_key"), "OTHER").unwrap();
        carry_out(&p);
        assert_eq!(
            std::fs::read_to_string(p.host("/var/lib/clutch/identity/ssh/ssh_host_ed25519_key"))
                .unwrap(),
            "PRIVATE"
        );
        assert!(!per_slot("grow-root") && !per_slot("mkfs-data0"));
    }

    #[test]
    fn the_engine_files_go_to_the_slot_the_node_reboots_into_only() {
        let (_d, p) = ab_root();
        let env = "ETCD_NAME=lab-1\nETCD_DATA_DIR=/var/lib/etcd/clutch\n";
        std::fs::create_dir_all(p.host("/etc/default")).unwrap();
        std::fs::write(p.host("/etc/default/etcd"), env).unwrap();
        // This test root runs slot b; the node leaves it for slot a.
        hand_over(&p, Slot::A).unwrap();
        let kept = p.host("/var/lib/clutch/identity/engine/etc_default_etcd");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), env);
        // Slot b boots again (the trial of a fell back): its own file stays, and the
        // hand-over waits for slot a.
        std::fs::write(p.host("/etc/default/etcd"), "# packaged\n").unwrap();
        assert!(carry_in(&p).is_empty());
        assert_eq!(
            std::fs::read_to_string(p.host("/etc/default/etcd")).unwrap(),
            "# packaged\n"
        );
        // Handed over to b (the slot this root runs): taken once.
        std::fs::write(p.host("/etc/default/etcd"), env).unwrap();
        hand_over(&p, Slot::B).unwrap();
        std::fs::write(p.host("/etc/default/etcd"), "# packaged\n").unwrap();
        assert_eq!(carry_in(&p), ["/etc/default/etcd"]);
        assert_eq!(
            std::fs::read_to_string(p.host("/etc/default/etcd")).unwrap(),
            env
        );
        let m = std::fs::metadata(p.host("/etc/default/etcd")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
        // Once: a later change in the slot is not overwritten at the next boot.
        std::fs::write(p.host("/etc/default/etcd"), "ETCD_NAME=lab-1\n# rejoined\n").unwrap();
        assert!(carry_in(&p).is_empty());
        // k3s's files were absent: none kept, none made.
        assert!(!p.host("/etc/rancher/k3s/config.yaml").exists());
        assert!(
            !p.host("/var/lib/clutch/identity/engine/etc_rancher_k3s_config.yaml")
                .exists()
        );
    }

    #[test]
    fn a_unit_file_taken_over_is_loaded_before_use() {
        let (_d, p) = ab_root();
        let unit = p.host("/etc/systemd/system/k3s.service");
        std::fs::create_dir_all(unit.parent().unwrap()).unwrap();
        std::fs::write(&unit, "[Service]\nExecStart=/usr/local/bin/k3s server\n").unwrap();
        hand_over(&p, Slot::B).unwrap();
        std::fs::remove_file(&unit).unwrap();
        let sys = crate::sys::FakeSys::new();
        let taken = crate::update::on_boot(&p, &sys);
        assert!(
            taken.iter().any(|f| f == "/etc/systemd/system/k3s.service"),
            "{taken:?}"
        );
        assert!(unit.exists());
        let calls = sys.calls(p.host("/").as_path());
        assert!(
            calls.iter().any(|c| c == "run systemctl daemon-reload"),
            "{calls:?}"
        );
    }

    #[test]
    fn state_folders_get_this_releases_owner() {
        let want = vec![
            PersistentDir {
                dir: "etcd".into(),
                node: "/var/lib/etcd".into(),
                uid: 104,
                gid: 107,
                mode: 0o700,
            },
            PersistentDir {
                dir: "home".into(),
                node: "/home".into(),
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
            PersistentDir {
                dir: "rancher".into(),
                node: "/var/lib/rancher".into(),
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
        ];
        let have = |n: &str| match n {
            "/var/lib/etcd" => Some((0, 0, 0o40755)),
            "/home" => Some((0, 0, 0o40755)),
            _ => None,
        };
        assert_eq!(
            ownership_fixes(&want, have),
            [OwnershipFix {
                node: "/var/lib/etcd".into(),
                owner: Some((104, 107)),
                mode: Some(0o700),
            }]
        );
    }
}
