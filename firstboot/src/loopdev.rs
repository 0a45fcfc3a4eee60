//! Attaching a backing file to a loop device with the loop ioctls (no losetup).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;

pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

#[repr(C)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

/// The loop_info64 for `backing`: its name (truncated to 63 bytes), AUTOCLEAR off.
pub fn info_for(backing: &Path, flags: u32) -> LoopInfo64 {
    let mut name = [0u8; 64];
    let b = backing.as_os_str().as_bytes();
    let n = b.len().min(63);
    name[..n].copy_from_slice(&b[..n]);
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags & !LO_FLAGS_AUTOCLEAR,
        lo_file_name: name,
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

fn ioctl(fd: i32, req: u64, arg: usize) -> io::Result<i32> {
    // SAFETY: the callers pass a request number together with an argument of the type the
    // kernel expects for it (an int, or a pointer to a live, properly laid out struct).
    let r = unsafe { libc::ioctl(fd, req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attaches `backing` to a free loop device; returns the device number N of `dev/loopN`.
pub fn attach(backing: &Path, dev: &Path) -> io::Result<u32> {
    attach_with(backing, dev, 0)
}

/// Detaches `dev/loopN` (used by tests; nodes keep their devices).
pub fn detach(dev: &Path, n: u32) -> io::Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .open(dev.join(format!("loop{n}")))?;
    ioctl(f.as_raw_fd(), LOOP_CLR_FD, 0).map(|_| ())
}

/// [`attach`] with extra `lo_flags` (LO_FLAGS_PARTSCAN = 8 in tests).
pub fn attach_with(backing: &Path, dev: &Path, extra_flags: u32) -> io::Result<u32> {
    let file = OpenOptions::new().read(true).write(true).open(backing)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.join("loop-control"))?;
    let mut last = io::Error::other("no free loop device");
    for _ in 0..8 {
        let n = ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE, 0)? as u32;
        let loopdev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.join(format!("loop{n}")))?;
        match configure(loopdev.as_raw_fd(), file.as_raw_fd(), backing, extra_flags) {
            Ok(()) => return Ok(n),
            // Someone else took it between GET_FREE and CONFIGURE: try the next one.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn configure(loop_fd: i32, file_fd: i32, backing: &Path, extra: u32) -> io::Result<()> {
    // Direct I/O avoids caching the data twice (page cache of the file and of the device);
    // not every backing file system allows it, so fall back to buffered I/O.
    for flags in [LO_FLAGS_DIRECT_IO, 0] {
        let cfg = LoopConfig {
            fd: file_fd as u32,
            block_size: 0,
            info: info_for(backing, flags | extra),
            reserved: [0; 8],
        };
        match ioctl(loop_fd, LOOP_CONFIGURE, &cfg as *const LoopConfig as usize) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && flags != 0 => continue,
            // Kernels before 5.8 have no LOOP_CONFIGURE.
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ENOTTY) =>
            {
                return set_fd_then_status(loop_fd, file_fd, backing, extra);
            }
            Err(e) => return Err(e),
        }
    }
    set_fd_then_status(loop_fd, file_fd, backing, extra)
}

fn set_fd_then_status(loop_fd: i32, file_fd: i32, backing: &Path, extra: u32) -> io::Result<()> {
    ioctl(loop_fd, LOOP_SET_FD, file_fd as usize)?;
    let info = info_for(backing, extra);
    if let Err(e) = ioctl(
        loop_fd,
        LOOP_SET_STATUS64,
        &info as *const LoopInfo64 as usize,
    ) {
        let _ = ioctl(loop_fd, LOOP_CLR_FD, 0);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root and /dev/loop-control: `cargo test -p clutch-firstboot -- --ignored`.
    #[test]
    #[ignore]
    fn real_attach_and_grow_on_a_loop_device() {
        const MIB: u64 = 1 << 20;
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let mut g = gpt::GptConfig::new().writable(true).create(&img).unwrap();
        g.add_partition("a", 4 * MIB, gpt::partition_types::EFI, 0, None)
            .unwrap();
        g.add_partition("b", 8 * MIB, gpt::partition_types::LINUX_FS, 0, None)
            .unwrap();
        g.write().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();

        let n = attach_with(&img, Path::new("/dev"), 8).unwrap();
        struct Detach(u32);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = detach(Path::new("/dev"), self.0);
            }
        }
        let _guard = Detach(n);
        let sys = std::path::PathBuf::from(format!("/sys/block/loop{n}"));
        let backing = std::fs::read_to_string(sys.join("loop/backing_file")).unwrap();
        assert_eq!(backing.trim(), img.to_str().unwrap());
        assert_eq!(
            std::fs::read_to_string(sys.join("loop/autoclear"))
                .unwrap()
                .trim(),
            "0"
        );
        let size: u64 = std::fs::read_to_string(sys.join("size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(size * 512, 64 * MIB);
        let dev = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let grown = crate::grow::grow_table(&dev, 2, crate::sys::TableKind::Gpt).unwrap();
        assert!(grown.changed);
        assert_eq!(grown.start_bytes + grown.len_bytes, 63 * MIB);
        let p2 = sys.join(format!("loop{n}p2/size"));
        if !p2.exists() {
            // Some sandboxes run loop with partitions disabled (max_part=0, ext_range=1).
            eprintln!("kernel made no partitions on loop{n}; BLKPG not exercised here");
            return;
        }
        crate::grow::tell_kernel(&dev, 2, grown.start_bytes, grown.len_bytes).unwrap();
        let p2: u64 = std::fs::read_to_string(p2).unwrap().trim().parse().unwrap();
        assert_eq!(p2 * 512, grown.len_bytes);
    }

    #[test]
    fn struct_layout_matches_the_kernel() {
        // include/uapi/linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn info_never_sets_autoclear_and_truncates_name() {
        let long = "/var/lib/clutch/storage/".to_string() + &"x".repeat(80);
        let i = info_for(Path::new(&long), LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO);
        assert_eq!(i.lo_flags, LO_FLAGS_DIRECT_IO);
        assert_eq!(i.lo_file_name[63], 0);
        assert_eq!(&i.lo_file_name[..24], b"/var/lib/clutch/storage/");
    }
}
