//! `clutch flash IMAGE DEVICE`: writes an image onto a disk (or a file), through its bmap
//! when one lies next to it (only the mapped ranges, each checked against its sha256), else
//! as a full copy that skips the image's holes (punched on a file target, zeroed on a
//! device). What was written is read back and verified. A device that is mounted, used by
//! a mounted device mapper/RAID volume, swapped on, or that holds the running system's `/`
//! is refused before anything is opened for writing.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bmap::{self, Bmap};

const CHUNK: usize = 4 << 20;

/// A block device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId(pub u32, pub u32);

impl DevId {
    pub fn parse(s: &str) -> Option<DevId> {
        let (a, b) = s.trim().split_once(':')?;
        Some(DevId(a.parse().ok()?, b.parse().ok()?))
    }
    pub fn from_rdev(rdev: u64) -> DevId {
        DevId(libc::major(rdev), libc::minor(rdev))
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// What the safety check reads from /proc and /sys (a fake in tests).
pub trait SysView {
    /// Contents of a file, `None` when absent.
    fn read(&self, path: &str) -> Option<String>;
    /// Names in a folder, empty when absent.
    fn list(&self, path: &str) -> Vec<String>;
}

pub struct RealSys;

impl SysView for RealSys {
    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }
    fn list(&self, path: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn dev_of(sys: &dyn SysView, dir: &str) -> Option<DevId> {
    DevId::parse(&sys.read(&format!("{dir}/dev"))?)
}

fn name_of(sys: &dyn SysView, d: DevId) -> String {
    sys.read(&format!("/sys/dev/block/{d}/uevent"))
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(|n| format!("/dev/{n}")))
        })
        .unwrap_or_else(|| format!("block device {d}"))
}

/// The whole disk a device belongs to (itself when it is not a partition).
fn whole_disk(sys: &dyn SysView, d: DevId) -> DevId {
    let dir = format!("/sys/dev/block/{d}");
    if sys.read(&format!("{dir}/partition")).is_some() {
        if let Some(p) = dev_of(sys, &format!("{dir}/..")) {
            return p;
        }
    }
    d
}

/// The disk, its partitions, and everything stacked on any of them (dm, md), recursively.
fn family(sys: &dyn SysView, disk: DevId) -> BTreeSet<DevId> {
    let mut out = BTreeSet::new();
    let mut todo = vec![disk];
    let dir = format!("/sys/dev/block/{disk}");
    for e in sys.list(&dir) {
        let sub = format!("{dir}/{e}");
        if sys.read(&format!("{sub}/partition")).is_some() {
            if let Some(p) = dev_of(sys, &sub) {
                todo.push(p);
            }
        }
    }
    while let Some(d) = todo.pop() {
        if !out.insert(d) {
            continue;
        }
        for h in sys.list(&format!("/sys/dev/block/{d}/holders")) {
            if let Some(hd) = dev_of(sys, &format!("/sys/class/block/{h}")) {
                todo.push(hd);
            }
        }
    }
    out
}

/// `/dev/NAME` (or a /dev/mapper, /dev/disk/by-* name the caller resolved) to its number.
fn dev_for_source(sys: &dyn SysView, source: &str) -> Option<DevId> {
    let base = source.strip_prefix("/dev/")?;
    let base = base.rsplit('/').next()?;
    dev_of(sys, &format!("/sys/class/block/{base}"))
}

/// Refuses a target device that is in use. `target` is the device's number.
pub fn check_device_free(sys: &dyn SysView, target: DevId) -> Result<()> {
    let disk = whole_disk(sys, target);
    let fam = family(sys, disk);
    let tname = name_of(sys, target);
    let mountinfo = sys.read("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        let mnt = f[4];
        let source = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 2))
            .copied()
            .unwrap_or("");
        let devs = [DevId::parse(f[2]), dev_for_source(sys, source)];
        for d in devs.into_iter().flatten() {
            if fam.contains(&d) {
                if mnt == "/" {
                    bail!(
                        "refusing to write to {tname}: {} holds the running system's root file system (/)",
                        name_of(sys, disk)
                    );
                }
                bail!(
                    "refusing to write to {tname}: {} is mounted at {} (unmount it first)",
                    name_of(sys, d),
                    unescape_mount(mnt)
                );
            }
        }
    }
    for line in sys.read("/proc/swaps").unwrap_or_default().lines().skip(1) {
        if let Some(src) = line.split_whitespace().next() {
            if let Some(d) = dev_for_source(sys, src) {
                if fam.contains(&d) {
                    bail!("refusing to write to {tname}: {src} is in use as swap");
                }
            }
        }
    }
    Ok(())
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t")
}

#[derive(Debug, Clone)]
pub struct FlashOpts {
    pub image: PathBuf,
    pub target: PathBuf,
    /// An explicit bmap; default `<image>.bmap` when it exists.
    pub bmap: Option<PathBuf>,
    /// Full copy even when a bmap exists.
    pub no_bmap: bool,
    /// Skip the read-back check.
    pub no_verify: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlashReport {
    pub image: PathBuf,
    pub target: PathBuf,
    /// `bmap` or `full`.
    pub mode: &'static str,
    pub bmap: Option<PathBuf>,
    pub image_size: u64,
    /// Bytes written to the target (holes punched or skipped are not counted).
    pub bytes_written: u64,
    pub verified: bool,
    pub write_seconds: f64,
    pub verify_seconds: f64,
}

/// Progress callbacks: a new phase with its total bytes, and bytes done in it.
pub trait Ticker {
    fn phase(&mut self, what: &str, total: u64);
    fn tick(&mut self, n: u64);
}

impl Ticker for () {
    fn phase(&mut self, _: &str, _: u64) {}
    fn tick(&mut self, _: u64) {}
}

/// The bmap to use for `image`: explicit, or `<image>.bmap` next to it.
pub fn find_bmap(image: &Path, explicit: Option<&Path>, no_bmap: bool) -> Option<PathBuf> {
    if no_bmap {
        return None;
    }
    if let Some(b) = explicit {
        return Some(b.to_path_buf());
    }
    let mut s = image.as_os_str().to_owned();
    s.push(".bmap");
    let p = PathBuf::from(s);
    p.is_file().then_some(p)
}

struct Target {
    file: File,
    is_device: bool,
}

fn open_target(sys: &dyn SysView, path: &Path, image: &File, image_size: u64) -> Result<Target> {
    let meta = std::fs::metadata(path);
    if let Ok(m) = &meta {
        if m.file_type().is_block_device() {
            check_device_free(sys, DevId::from_rdev(m.rdev()))?;
            // O_EXCL on a block device: the kernel refuses it while anything holds it.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_EXCL)
                .open(path)
                .with_context(|| {
                    format!("opening {} exclusively (is it in use?)", path.display())
                })?;
            let size = device_size(&file).with_context(|| format!("size of {}", path.display()))?;
            if size < image_size {
                bail!(
                    "{} holds {} bytes, the image needs {image_size}",
                    path.display(),
                    size
                );
            }
            return Ok(Target {
                file,
                is_device: true,
            });
        }
        if !m.file_type().is_file() {
            bail!(
                "{} is neither a block device nor a regular file",
                path.display()
            );
        }
        let im = image.metadata()?;
        if m.dev() == im.dev() && m.ino() == im.ino() {
            bail!("{} is the image itself", path.display());
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if file.metadata()?.len() < image_size {
        file.set_len(image_size)
            .with_context(|| format!("growing {} to the image size", path.display()))?;
    }
    Ok(Target {
        file,
        is_device: false,
    })
}

fn device_size(f: &File) -> std::io::Result<u64> {
    // SAFETY: lseek on our own descriptor.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// Copies `len` bytes at `off` from `src` to `dst`, feeding them to `h`.
fn copy_span(
    src: &File,
    dst: &File,
    off: u64,
    len: u64,
    h: &mut Sha256,
    buf: &mut [u8],
    t: &mut dyn Ticker,
) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], off + done)?;
        h.update(&buf[..n]);
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
        t.tick(n as u64);
    }
    Ok(())
}

fn hash_target(
    f: &File,
    off: u64,
    len: u64,
    buf: &mut [u8],
    t: &mut dyn Ticker,
) -> std::io::Result<Sha256> {
    let mut h = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off + done)?;
        h.update(&buf[..n]);
        done += n as u64;
        t.tick(n as u64);
    }
    Ok(h)
}

fn sync_and_drop_cache(f: &File) -> std::io::Result<()> {
    f.sync_all()?;
    // Read back from the device, not from the page cache (advice; best effort).
    // SAFETY: fadvise on our own descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Punches a hole into a regular file (keeps its size).
fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on our own descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn flash(sys: &dyn SysView, opts: &FlashOpts, t: &mut dyn Ticker) -> Result<FlashReport> {
    let name = opts.image.to_string_lossy();
    if name.ends_with(".zst") || name.ends_with(".qcow2") || name.ends_with(".xz") {
        bail!(
            "{} is not a raw image; flash the .img (decompress with `zstd -d --sparse`)",
            opts.image.display()
        );
    }
    let image =
        File::open(&opts.image).with_context(|| format!("opening {}", opts.image.display()))?;
    let image_size = image.metadata()?.len();
    let bmap_path = find_bmap(&opts.image, opts.bmap.as_deref(), opts.no_bmap);
    let bmap = match &bmap_path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let b = bmap::parse(p, &text)?;
            if b.image_size != image_size {
                bail!(
                    "{} describes an image of {} bytes, but {} has {image_size}",
                    p.display(),
                    b.image_size,
                    opts.image.display()
                );
            }
            Some(b)
        }
        None => None,
    };
    let target = open_target(sys, &opts.target, &image, image_size)?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let (mode, written, check) = match &bmap {
        Some(b) => {
            write_by_bmap(&image, &target, b, &mut buf, t).map(|w| ("bmap", w, Check::Ranges))?
        }
        None => {
            let (w, sum) = write_full(&image, &target, image_size, &mut buf, t)?;
            ("full", w, Check::Whole(sum))
        }
    };
    sync_and_drop_cache(&target.file)
        .with_context(|| format!("flushing {}", opts.target.display()))?;
    let write_seconds = start.elapsed().as_secs_f64();
    let vstart = Instant::now();
    if !opts.no_verify {
        match check {
            Check::Ranges => {
                let b = bmap.as_ref().expect("bmap mode");
                t.phase("verifying", b.mapped_bytes());
                for r in &b.ranges {
                    let (off, len) = r.bytes(b.block_size, b.image_size);
                    let got =
                        hex::encode(hash_target(&target.file, off, len, &mut buf, t)?.finalize());
                    if got != r.sha256 {
                        bail!(
                            "verification failed: {} blocks {}-{} read back with sha256 {got}, expected {}",
                            opts.target.display(),
                            r.first,
                            r.last,
                            r.sha256
                        );
                    }
                }
            }
            Check::Whole(want) => {
                t.phase("verifying", image_size);
                let got =
                    hex::encode(hash_target(&target.file, 0, image_size, &mut buf, t)?.finalize());
                if got != want {
                    bail!(
                        "verification failed: the first {image_size} bytes of {} hash to {got}, the image to {want}",
                        opts.target.display()
                    );
                }
            }
        }
    }
    Ok(FlashReport {
        image: opts.image.clone(),
        target: opts.target.clone(),
        mode,
        bmap: bmap_path,
        image_size,
        bytes_written: written,
        verified: !opts.no_verify,
        write_seconds,
        verify_seconds: vstart.elapsed().as_secs_f64(),
    })
}

enum Check {
    Ranges,
    Whole(String),
}

fn write_by_bmap(
    image: &File,
    target: &Target,
    b: &Bmap,
    buf: &mut [u8],
    t: &mut dyn Ticker,
) -> Result<u64> {
    t.phase("writing mapped blocks", b.mapped_bytes());
    let mut written = 0;
    for r in &b.ranges {
        let (off, len) = r.bytes(b.block_size, b.image_size);
        let mut h = Sha256::new();
        copy_span(image, &target.file, off, len, &mut h, buf, t)
            .with_context(|| format!("copying blocks {}-{}", r.first, r.last))?;
        let got = hex::encode(h.finalize());
        if got != r.sha256 {
            bail!(
                "the image does not match its bmap: blocks {}-{} hash to {got}, the bmap says {} (the target is partly written)",
                r.first,
                r.last,
                r.sha256
            );
        }
        written += len;
    }
    Ok(written)
}

/// Copies every byte's worth of the image: data extents are written, holes are punched in a
/// file target and zeroed on a device. Returns bytes written and the image's sha256.
fn write_full(
    image: &File,
    target: &Target,
    size: u64,
    buf: &mut [u8],
    t: &mut dyn Ticker,
) -> Result<(u64, String)> {
    t.phase("writing the whole image", size);
    let extents = bmap::data_extents(image).context("finding the image's data")?;
    let mut h = Sha256::new();
    let mut written = 0;
    let mut pos = 0u64;
    for (s, e) in extents {
        written += fill_hole(target, pos, s, &mut h, t)?;
        copy_span(image, &target.file, s, e - s, &mut h, buf, t)?;
        written += e - s;
        pos = e;
    }
    written += fill_hole(target, pos, size, &mut h, t)?;
    Ok((written, hex::encode(h.finalize())))
}

/// Makes `[from, to)` of the target zero: a punched hole in a file, written zeros on a
/// device. Returns the bytes written.
fn fill_hole(
    target: &Target,
    from: u64,
    to: u64,
    h: &mut Sha256,
    t: &mut dyn Ticker,
) -> Result<u64> {
    if to <= from {
        return Ok(0);
    }
    let zeros = vec![0u8; CHUNK];
    if !target.is_device {
        punch_hole(&target.file, from, to - from).context("punching a hole in the target")?;
    }
    let mut o = from;
    while o < to {
        let n = ((to - o) as usize).min(CHUNK);
        if target.is_device {
            target.file.write_all_at(&zeros[..n], o)?;
        }
        h.update(&zeros[..n]);
        o += n as u64;
        t.tick(n as u64);
    }
    Ok(if target.is_device { to - from } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct FakeSys {
        files: BTreeMap<String, String>,
    }

    impl FakeSys {
        fn file(mut self, p: &str, c: &str) -> Self {
            self.files.insert(p.into(), c.into());
            self
        }
        /// A disk with partitions: /sys/dev/block/M:m and /sys/class/block/NAME entries.
        fn disk(mut self, name: &str, d: DevId, parts: &[(&str, DevId)]) -> Self {
            let add = |s: &mut Self, dir: &str, n: &str, id: DevId| {
                s.files.insert(format!("{dir}/dev"), format!("{id}\n"));
                s.files
                    .insert(format!("{dir}/uevent"), format!("DEVNAME={n}\n"));
                s.files
                    .insert(format!("/sys/class/block/{n}/dev"), format!("{id}\n"));
            };
            let dd = format!("/sys/dev/block/{d}");
            add(&mut self, &dd, name, d);
            for (pn, pd) in parts {
                let pdir = format!("/sys/dev/block/{pd}");
                add(&mut self, &pdir, pn, *pd);
                self.files.insert(format!("{pdir}/partition"), "1\n".into());
                self.files
                    .insert(format!("{pdir}/../dev"), format!("{d}\n"));
                self.files
                    .insert(format!("{dd}/{pn}/partition"), "1\n".into());
                self.files
                    .insert(format!("{dd}/{pn}/dev"), format!("{pd}\n"));
            }
            self
        }
    }

    impl SysView for FakeSys {
        fn read(&self, path: &str) -> Option<String> {
            self.files.get(path).cloned()
        }
        fn list(&self, path: &str) -> Vec<String> {
            let pre = format!("{path}/");
            let set: BTreeSet<String> = self
                .files
                .keys()
                .filter_map(|k| k.strip_prefix(&pre))
                .filter_map(|r| r.split('/').next())
                .filter(|n| !n.is_empty() && *n != "..")
                .map(String::from)
                .collect();
            set.into_iter().collect()
        }
    }

    const SDA: DevId = DevId(8, 0);
    const SDA1: DevId = DevId(8, 1);
    const SDA2: DevId = DevId(8, 2);
    const SDB: DevId = DevId(8, 16);
    const SDB1: DevId = DevId(8, 17);

    fn two_disks(mountinfo: &str) -> FakeSys {
        FakeSys::default()
            .disk("sda", SDA, &[("sda1", SDA1), ("sda2", SDA2)])
            .disk("sdb", SDB, &[("sdb1", SDB1)])
            .file("/proc/self/mountinfo", mountinfo)
            .file("/proc/swaps", "Filename Type Size Used Priority\n")
    }

    const ROOT_ON_SDA2: &str = "22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw\n\
        25 22 8:1 / /boot/efi rw shared:2 - vfat /dev/sda1 rw\n\
        26 22 0:22 / /proc rw - proc proc rw\n";

    #[test]
    fn refuses_the_disk_holding_root_and_its_partitions() {
        let s = two_disks(ROOT_ON_SDA2);
        for d in [SDA, SDA1, SDA2] {
            let e = check_device_free(&s, d).unwrap_err().to_string();
            assert!(
                e.contains("/dev/sda holds the running system's root"),
                "{e}"
            );
        }
        check_device_free(&s, SDB).unwrap();
        check_device_free(&s, SDB1).unwrap();
    }

    #[test]
    fn refuses_a_mounted_partition_of_the_target() {
        let mi = format!("{ROOT_ON_SDA2}40 22 8:17 / /media/my\\040card rw - vfat /dev/sdb1 rw\n");
        let e = check_device_free(&two_disks(&mi), SDB)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/sdb1 is mounted at /media/my card"), "{e}");
    }

    #[test]
    fn refuses_a_disk_under_a_mounted_dm_volume_and_swap() {
        // sdb1 is a LUKS/LVM member; dm-0 on it is mounted (mountinfo shows 253:0).
        let mi = format!("{ROOT_ON_SDA2}41 22 253:0 / /srv rw - ext4 /dev/mapper/vg-srv rw\n");
        let s = two_disks(&mi)
            .file("/sys/dev/block/8:17/holders/dm-0", "")
            .file("/sys/class/block/dm-0/dev", "253:0\n")
            .file("/sys/dev/block/253:0/uevent", "DEVNAME=dm-0\n");
        let e = check_device_free(&s, SDB).unwrap_err().to_string();
        assert!(e.contains("/dev/dm-0 is mounted at /srv"), "{e}");

        let s = two_disks(ROOT_ON_SDA2).file(
            "/proc/swaps",
            "Filename Type Size Used Priority\n/dev/sdb1 partition 1 0 -2\n",
        );
        let e = check_device_free(&s, SDB).unwrap_err().to_string();
        assert!(e.contains("swap"), "{e}");
    }

    #[test]
    fn btrfs_root_with_anonymous_dev_is_found_by_source() {
        let mi = "22 1 0:27 / / rw - btrfs /dev/sda2 rw\n";
        let e = check_device_free(&two_disks(mi), SDA)
            .unwrap_err()
            .to_string();
        assert!(e.contains("root file system"), "{e}");
    }

    /// A sparse image with data in a few places (a pattern, so offsets matter).
    fn sparse_image(path: &Path, size: u64, spans: &[(u64, u64)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for &(s, len) in spans {
            let data: Vec<u8> = (0..len).map(|i| ((s + i) % 253) as u8 + 1).collect();
            f.write_all_at(&data, s).unwrap();
        }
    }

    fn opts(image: &Path, target: &Path) -> FlashOpts {
        FlashOpts {
            image: image.into(),
            target: target.into(),
            bmap: None,
            no_bmap: false,
            no_verify: false,
        }
    }

    #[test]
    fn flash_by_bmap_writes_exactly_the_mapped_ranges() {
        let t = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        let img = t.path().join("a.img");
        sparse_image(
            &img,
            48 * mib,
            &[(0, 8192), (5 * mib, 3 * mib + 5), (47 * mib, mib)],
        );
        let b = bmap::create(&img, &mut |_| {}).unwrap();
        std::fs::write(t.path().join("a.img.bmap"), bmap::to_xml(&b)).unwrap();
        // The target has old content everywhere: bmap leaves unmapped bytes alone.
        let target = t.path().join("card.bin");
        std::fs::write(&target, vec![0xAAu8; (48 * mib) as usize]).unwrap();
        let r = flash(&FakeSys::default(), &opts(&img, &target), &mut ()).unwrap();
        assert_eq!(r.mode, "bmap");
        assert!(r.verified);
        assert_eq!(r.bytes_written, b.mapped_bytes());
        let (i, o) = (
            std::fs::read(&img).unwrap(),
            std::fs::read(&target).unwrap(),
        );
        for rg in &b.ranges {
            let (off, len) = rg.bytes(b.block_size, b.image_size);
            let (a, z) = (off as usize, (off + len) as usize);
            assert_eq!(i[a..z], o[a..z], "range {}-{}", rg.first, rg.last);
        }
        // Outside the mapped ranges the old bytes remain.
        assert_eq!(o[(20 * mib) as usize], 0xAA);
    }

    #[test]
    fn full_copy_to_a_file_stays_sparse_and_equal() {
        let t = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        let img = t.path().join("b.img");
        sparse_image(&img, 64 * mib, &[(0, 4096), (30 * mib, 2 * mib)]);
        let target = t.path().join("copy.img");
        // Stale data where the image has a hole must not survive.
        std::fs::write(&target, vec![0x55u8; (64 * mib) as usize]).unwrap();
        let r = flash(&FakeSys::default(), &opts(&img, &target), &mut ()).unwrap();
        assert_eq!(r.mode, "full");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            std::fs::read(&target).unwrap()
        );
        let m = std::fs::metadata(&target).unwrap();
        assert_eq!(m.len(), 64 * mib);
        assert!(
            m.blocks() * 512 < 8 * mib,
            "the copy keeps the holes: {} bytes allocated",
            m.blocks() * 512
        );
    }

    #[test]
    fn damaged_image_or_bmap_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("c.img");
        sparse_image(&img, 1 << 20, &[(0, 10_000)]);
        let b = bmap::create(&img, &mut |_| {}).unwrap();
        std::fs::write(t.path().join("c.img.bmap"), bmap::to_xml(&b)).unwrap();
        // Change one byte of the image after the bmap was made.
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(b"X", 100)
            .unwrap();
        let target = t.path().join("t.bin");
        let e = flash(&FakeSys::default(), &opts(&img, &target), &mut ()).unwrap_err();
        assert!(
            format!("{e:#}").contains("does not match its bmap"),
            "{e:#}"
        );
        let e = flash(&FakeSys::default(), &opts(&img, &img), &mut ()).unwrap_err();
        assert!(format!("{e:#}").contains("the image itself"), "{e:#}");
    }
}
