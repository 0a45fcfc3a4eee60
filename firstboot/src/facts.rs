//! What the node looks like before planning: read from files under the root directory only
//! (`<root>/proc`, `<root>/sys`, `<root>/etc`, ...), so tests feed it a temp tree.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::fsx::read_opt;
use crate::hold::HoldPoint;
use crate::sys::TableKind;

/// Where things are. `root` is `/` on a node, a temp dir in tests; every other path is a
/// path on the node (`/etc/hostname`) and is looked up under `root` with [`Paths::host`].
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    /// The FAT partition's mount point on the node, `/boot/efi` or `/boot/firmware`.
    pub boot_dir: PathBuf,
}

pub const STATE_DIR: &str = "/var/lib/clutch";
/// Where A/B images mount their data partition (the builder's `update::DATA_MOUNT`).
pub const DATA_MOUNT: &str = "/data";
pub const STATUS_FILE: &str = "/run/clutch/status.json";

impl Paths {
    pub fn new(root: impl Into<PathBuf>, boot_dir: impl Into<PathBuf>) -> Self {
        Paths {
            root: root.into(),
            boot_dir: boot_dir.into(),
        }
    }
    /// The host path of a node path.
    pub fn host(&self, node_path: impl AsRef<Path>) -> PathBuf {
        let p = node_path.as_ref();
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }
    pub fn state(&self, name: &str) -> PathBuf {
        self.host(Path::new(STATE_DIR).join(name))
    }
    pub fn marker(&self, step: &str) -> PathBuf {
        // Steps that change a root slot's own files keep their marker in the slot.
        if crate::update::slot::per_slot(step) {
            return self.host(Path::new(crate::update::slot::SLOT_DONE_DIR).join(step));
        }
        self.state(&format!("done/{step}"))
    }
    /// Node path of a file on the FAT partition.
    pub fn boot_file(&self, name: &str) -> PathBuf {
        self.boot_dir.join(name)
    }
    pub fn status_file(&self) -> PathBuf {
        self.host(STATUS_FILE)
    }
}

/// A network link from `/sys/class/net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLink {
    pub name: String,
    pub ifindex: u32,
    /// 12 lowercase hex digits, no colons.
    pub mac: String,
    pub wireless: bool,
}

/// The partition the root file system lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// Node paths, `/dev/sda2` and `/dev/sda`.
    pub part_dev: PathBuf,
    pub disk_dev: PathBuf,
    pub partno: u32,
    /// In 512-byte sectors, as sysfs counts.
    pub start: u64,
    pub size: u64,
    pub disk_size: u64,
    pub is_last: bool,
    pub fstype: String,
    pub table: Option<TableKind>,
    /// Size of the ext2/3/4 file system on the partition (its superblock), when readable.
    pub fs_bytes: Option<u64>,
}

impl RootDisk {
    /// Bytes after the root partition that a grow would add.
    pub fn free_bytes(&self) -> u64 {
        self.disk_size.saturating_sub(self.start + self.size) * 512
    }
}

/// A loopback backing file as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backing {
    pub size: u64,
    pub has_ext4: bool,
}

#[derive(Debug, Clone)]
pub struct Facts {
    pub links: Vec<NetLink>,
    pub node_id: Option<String>,
    pub machine_id: Option<String>,
    pub etc_hostname: Option<String>,
    pub etc_hosts: Option<String>,
    pub done: BTreeSet<String>,
    /// Host key files that are missing or empty (node paths).
    pub missing_host_keys: Vec<PathBuf>,
    pub root_disk: Result<RootDisk, String>,
    /// Mount point -> source, from `/proc/self/mountinfo`.
    pub mounts: BTreeMap<String, String>,
    /// Backing file (node path) -> loop device number, from `/sys/block/loop*/loop`.
    pub loops: BTreeMap<PathBuf, u32>,
    /// Loopback device name -> backing file, when it exists.
    pub backing: BTreeMap<String, Backing>,
    pub passwd: String,
    pub group: String,
    pub shadow: Option<String>,
    pub keyboard: Option<String>,
    /// Zone name -> whether `/usr/share/zoneinfo/<name>` is a compiled zone; only the names
    /// [`zones`] was asked about.
    pub zoneinfo: BTreeMap<String, bool>,
    /// Fault injection: where to hold ([`crate::hold`]); set by the caller from the
    /// `clutch.hold` credential, never read from the root.
    pub hold: Option<HoldPoint>,
}

impl Default for Facts {
    fn default() -> Self {
        Facts {
            links: Vec::new(),
            node_id: None,
            machine_id: None,
            etc_hostname: None,
            etc_hosts: None,
            done: BTreeSet::new(),
            missing_host_keys: Vec::new(),
            root_disk: Err("not looked up".into()),
            mounts: BTreeMap::new(),
            loops: BTreeMap::new(),
            backing: BTreeMap::new(),
            passwd: String::new(),
            group: String::new(),
            shadow: None,
            keyboard: None,
            zoneinfo: BTreeMap::new(),
            hold: None,
        }
    }
}

/// The host key types a node has. No RSA: its key takes seconds of a Pi's (and a TCG
/// guest's) first boot, and every client clutch targets speaks Ed25519 and ECDSA.
pub const HOST_KEY_TYPES: [&str; 2] = ["ed25519", "ecdsa"];

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

pub fn gather(paths: &Paths, loop_names: &[String]) -> Facts {
    let mut f = Facts {
        links: net_links(&paths.host("/sys/class/net")),
        node_id: read_trim(&paths.state("node-id")).filter(|s| is_node_id(s)),
        machine_id: read_trim(&paths.host("/etc/machine-id")),
        etc_hostname: read_trim(&paths.host("/etc/hostname")),
        etc_hosts: read_opt(&paths.host("/etc/hosts")).ok().flatten(),
        root_disk: root_disk(paths),
        mounts: mounts(&paths.host("/proc/self/mountinfo")),
        loops: loops(&paths.host("/sys/block")),
        passwd: fs::read_to_string(paths.host("/etc/passwd")).unwrap_or_default(),
        group: fs::read_to_string(paths.host("/etc/group")).unwrap_or_default(),
        shadow: read_opt(&paths.host("/etc/shadow")).ok().flatten(),
        keyboard: read_opt(&paths.host("/etc/default/keyboard"))
            .ok()
            .flatten(),
        ..Default::default()
    };
    for dir in [
        paths.state("done"),
        paths.host(crate::update::slot::SLOT_DONE_DIR),
    ] {
        if let Ok(rd) = fs::read_dir(dir) {
            f.done.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .filter(|n| paths.marker(n).exists()),
            );
        }
    }
    for t in HOST_KEY_TYPES {
        for suffix in ["", ".pub"] {
            let p = PathBuf::from(format!("/etc/ssh/ssh_host_{t}_key{suffix}"));
            let ok = fs::metadata(paths.host(&p))
                .map(|m| m.len() > 0)
                .unwrap_or(false);
            if !ok {
                f.missing_host_keys.push(p);
            }
        }
    }
    for name in loop_names {
        let p = paths.state(&format!("storage/{name}.img"));
        if let Ok(m) = fs::metadata(&p) {
            f.backing.insert(
                name.clone(),
                Backing {
                    size: m.len(),
                    has_ext4: has_ext4_magic(&p),
                },
            );
        }
    }
    f
}

/// [`gather`] for a node config (none when it could not be loaded): the state of its
/// loopback devices, and the zones its time zone may come down to.
pub fn gather_for(paths: &Paths, config: Option<&clutch_config::NodeConfig>) -> Facts {
    let Some(c) = config else {
        return gather(paths, &[]);
    };
    let names: Vec<String> = c
        .storage
        .loopback
        .iter()
        .map(|l| l.name.to_string())
        .collect();
    let mut f = gather(paths, &names);
    f.zoneinfo = zones(
        paths,
        &clutch_config::zone::candidates(c.system.timezone.as_str()),
    );
    f
}

/// Which of `names` the node has as compiled zones under /usr/share/zoneinfo.
pub fn zones(paths: &Paths, names: &[String]) -> BTreeMap<String, bool> {
    names
        .iter()
        .map(|n| {
            let p = paths.host(Path::new(clutch_config::zone::ZONEINFO).join(n));
            (n.clone(), clutch_config::zone::is_compiled_zone(&p))
        })
        .collect()
}

pub fn is_node_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// ext2/3/4 superblock magic 0xEF53 at byte 1080.
pub fn has_ext4_magic(p: &Path) -> bool {
    let mut b = [0u8; 2];
    fs::File::open(p)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(1080))?;
            f.read_exact(&mut b)
        })
        .is_ok()
        && b == [0x53, 0xEF]
}

/// The size in bytes of the ext2/3/4 file system whose superblock is at byte 1024 of `p`
/// (a partition, or an image file): blocks count (64-bit when the `64bit` feature is on)
/// times the block size.
pub fn ext4_fs_bytes(p: &Path) -> Option<u64> {
    let mut sb = [0u8; 1024];
    let mut f = fs::File::open(p).ok()?;
    f.seek(SeekFrom::Start(1024)).ok()?;
    f.read_exact(&mut sb).ok()?;
    let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    if sb[0x38..0x3A] != [0x53, 0xEF] {
        return None;
    }
    let log = le32(0x18);
    if log > 16 {
        return None;
    }
    let mut blocks = le32(0x04);
    const INCOMPAT_64BIT: u64 = 0x80;
    if le32(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= le32(0x150) << 32;
    }
    Some(blocks * (1024u64 << log))
}

/// Physical links (those with a `device`), by ifindex.
pub fn net_links(class_net: &Path) -> Vec<NetLink> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir(class_net) else {
        return v;
    };
    for e in rd.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !dir.join("device").exists() {
            continue; // lo, bridges, veth, ...
        }
        // ARPHRD_ETHER = 1 (wifi reports 1 too)
        if read_trim(&dir.join("type")).as_deref() != Some("1") {
            continue;
        }
        let Some(ifindex) = read_trim(&dir.join("ifindex")).and_then(|s| s.parse().ok()) else {
            continue;
        };
        let mac: String = read_trim(&dir.join("address"))
            .unwrap_or_default()
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if mac.len() != 12 || mac == "000000000000" {
            continue;
        }
        let wireless = dir.join("wireless").exists() || dir.join("phy80211").exists();
        v.push(NetLink {
            name,
            ifindex,
            mac,
            wireless,
        });
    }
    v.sort_by_key(|l| l.ifindex);
    v
}

/// `/proc/self/mountinfo`: mount point -> source (the last mount on a point wins).
pub fn mounts(mountinfo: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in fs::read_to_string(mountinfo).unwrap_or_default().lines() {
        if let Some(mi) = parse_mountinfo_line(line) {
            m.insert(mi.mount_point, mi.source);
        }
    }
    m
}

struct MountInfo {
    dev: String,
    mount_point: String,
    fstype: String,
    source: String,
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn parse_mountinfo_line(line: &str) -> Option<MountInfo> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    let mut post = post.split(' ');
    Some(MountInfo {
        dev: pre.get(2)?.to_string(),
        mount_point: unescape(pre.get(4)?),
        fstype: post.next()?.to_string(),
        source: unescape(post.next()?),
    })
}

/// Finds the root partition: `/` in mountinfo gives MAJ:MIN, `/sys/dev/block/MAJ:MIN` the
/// partition directory, whose parent is the disk.
pub fn root_disk(paths: &Paths) -> Result<RootDisk, String> {
    let mi = paths.host("/proc/self/mountinfo");
    let text = fs::read_to_string(&mi).map_err(|e| format!("{}: {e}", mi.display()))?;
    // On A/B images the data partition (last on the disk) grows, not a root slot.
    let grows = if text
        .lines()
        .filter_map(parse_mountinfo_line)
        .any(|m| m.mount_point == DATA_MOUNT)
    {
        DATA_MOUNT
    } else {
        "/"
    };
    let root = text
        .lines()
        .rev()
        .filter_map(parse_mountinfo_line)
        .find(|m| m.mount_point == grows)
        .ok_or("no / in mountinfo")?;
    let link = paths.host(format!("/sys/dev/block/{}", root.dev));
    let part_dir = fs::canonicalize(&link)
        .map_err(|e| format!("root device {} ({}): {e}", root.dev, link.display()))?;
    let partno: u32 = read_trim(&part_dir.join("partition"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("root device {} is not a partition", root.dev))?;
    let disk_dir = part_dir.parent().ok_or("partition has no disk")?;
    let num = |p: &Path| -> Result<u64, String> {
        read_trim(p)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("cannot read {}", p.display()))
    };
    let start = num(&part_dir.join("start"))?;
    let size = num(&part_dir.join("size"))?;
    let disk_size = num(&disk_dir.join("size"))?;
    let mut is_last = true;
    for e in fs::read_dir(disk_dir).map_err(|e| e.to_string())?.flatten() {
        let d = e.path();
        if d != part_dir && d.join("partition").exists() {
            if let Ok(s) = num(&d.join("start")) {
                if s > start {
                    is_last = false;
                }
            }
        }
    }
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let disk_dev = PathBuf::from("/dev").join(name(disk_dir));
    let table = crate::grow::detect(&paths.host(&disk_dev)).ok().flatten();
    let part_dev = PathBuf::from("/dev").join(name(&part_dir));
    let fs_bytes = ext4_fs_bytes(&paths.host(&part_dev));
    Ok(RootDisk {
        part_dev,
        disk_dev,
        partno,
        start,
        size,
        disk_size,
        is_last,
        fstype: root.fstype,
        table,
        fs_bytes,
    })
}

/// Attached loop devices: backing file -> N.
pub fn loops(sys_block: &Path) -> BTreeMap<PathBuf, u32> {
    let mut m = BTreeMap::new();
    let Ok(rd) = fs::read_dir(sys_block) else {
        return m;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("loop")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(b) = read_trim(&e.path().join("loop/backing_file")) {
            if !b.ends_with("(deleted)") {
                m.insert(PathBuf::from(b), n);
            }
        }
    }
    m
}

#[cfg(test)]
pub mod testing {
    //! Builders for fake `/proc` and `/sys` trees.
    use super::*;

    pub fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    pub fn add_link(
        root: &Path,
        name: &str,
        ifindex: u32,
        mac: &str,
        physical: bool,
        wireless: bool,
    ) {
        let d = root.join("sys/class/net").join(name);
        write(&d.join("type"), "1\n");
        write(&d.join("ifindex"), &format!("{ifindex}\n"));
        write(&d.join("address"), &format!("{mac}\n"));
        if physical {
            fs::create_dir_all(d.join("device")).unwrap();
        }
        if wireless {
            fs::create_dir_all(d.join("wireless")).unwrap();
        }
    }

    /// `/` on /dev/vda2 (253:2) of a disk with `disk_sectors`; vda1 is the ESP.
    pub fn add_root_disk(root: &Path, disk_sectors: u64, root_start: u64, root_size: u64) {
        write(
            &root.join("proc/self/mountinfo"),
            "22 1 253:2 / / rw,relatime shared:1 - ext4 /dev/vda2 rw\n\
             30 22 253:1 / /boot/efi rw,relatime shared:2 - vfat /dev/vda1 rw\n",
        );
        let disk = root.join("sys/devices/pci0000:00/virtio2/block/vda");
        write(&disk.join("size"), &format!("{disk_sectors}\n"));
        write(&disk.join("vda1/partition"), "1\n");
        write(&disk.join("vda1/start"), "2048\n");
        write(&disk.join("vda1/size"), "262144\n");
        write(&disk.join("vda2/partition"), "2\n");
        write(&disk.join("vda2/start"), &format!("{root_start}\n"));
        write(&disk.join("vda2/size"), &format!("{root_size}\n"));
        fs::create_dir_all(root.join("sys/dev/block")).unwrap();
        std::os::unix::fs::symlink(disk.join("vda2"), root.join("sys/dev/block/253:2")).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn links_skip_virtual_and_sort_by_ifindex() {
        let d = tempfile::tempdir().unwrap();
        add_link(d.path(), "wlan0", 2, "b8:27:eb:00:00:02", true, true);
        add_link(d.path(), "eth0", 3, "52:54:00:AB:CD:EF", true, false);
        add_link(d.path(), "veth9", 1, "aa:aa:aa:aa:aa:aa", false, false);
        let l = net_links(&d.path().join("sys/class/net"));
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].name, "wlan0");
        assert!(l[0].wireless);
        assert_eq!(l[1].mac, "525400abcdef");
    }

    #[test]
    fn root_disk_from_mountinfo_and_sysfs() {
        let d = tempfile::tempdir().unwrap();
        add_root_disk(d.path(), 4_194_304, 264_192, 1_048_576);
        let p = Paths::new(d.path(), "/boot/efi");
        let r = root_disk(&p).unwrap();
        assert_eq!(r.part_dev, Path::new("/dev/vda2"));
        assert_eq!(r.disk_dev, Path::new("/dev/vda"));
        assert_eq!(r.partno, 2);
        assert!(r.is_last);
        assert_eq!(r.fstype, "ext4");
        assert_eq!(r.free_bytes(), (4_194_304 - 264_192 - 1_048_576) * 512);
        let m = mounts(&d.path().join("proc/self/mountinfo"));
        assert_eq!(m["/boot/efi"], "/dev/vda1");
    }

    #[test]
    fn root_not_a_partition_is_reported() {
        let d = tempfile::tempdir().unwrap();
        write(
            &d.path().join("proc/self/mountinfo"),
            "1 0 0:31 / / rw - overlay overlay rw\n",
        );
        let e = root_disk(&Paths::new(d.path(), "/boot/efi")).unwrap_err();
        assert!(e.contains("0:31"), "{e}");
    }

    #[test]
    fn ext4_size_from_the_superblock() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vda2");
        let mut b = vec![0u8; 4096];
        assert_eq!(ext4_fs_bytes(&p), None, "missing");
        fs::write(&p, &b).unwrap();
        assert_eq!(ext4_fs_bytes(&p), None, "no magic");
        b[1024 + 0x38] = 0x53;
        b[1024 + 0x39] = 0xEF;
        b[1024 + 0x18] = 2; // 4 KiB blocks
        b[1024 + 4..1024 + 8].copy_from_slice(&262_144u32.to_le_bytes());
        fs::write(&p, &b).unwrap();
        assert_eq!(ext4_fs_bytes(&p), Some(1 << 30));
        // 64bit feature: the high half of the block count counts
        b[1024 + 0x60] = 0x80;
        b[1024 + 0x150] = 1;
        fs::write(&p, &b).unwrap();
        assert_eq!(ext4_fs_bytes(&p), Some((262_144 + (1u64 << 32)) * 4096));
    }

    #[test]
    fn loops_and_ext4_magic() {
        let d = tempfile::tempdir().unwrap();
        write(
            &d.path().join("sys/block/loop3/loop/backing_file"),
            "/var/lib/clutch/storage/data0.img\n",
        );
        write(
            &d.path().join("sys/block/loop4/loop/backing_file"),
            "/gone.img (deleted)\n",
        );
        write(&d.path().join("sys/block/sda/size"), "1\n");
        let l = loops(&d.path().join("sys/block"));
        assert_eq!(l.len(), 1);
        assert_eq!(l[Path::new("/var/lib/clutch/storage/data0.img")], 3);
        let img = d.path().join("x.img");
        let mut buf = vec![0u8; 4096];
        fs::write(&img, &buf).unwrap();
        assert!(!has_ext4_magic(&img));
        buf[1080] = 0x53;
        buf[1081] = 0xEF;
        fs::write(&img, &buf).unwrap();
        assert!(has_ext4_magic(&img));
    }
}
