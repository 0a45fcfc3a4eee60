//! Growing the root partition (the last one on its disk) to the end of the disk, for GPT
//! (the `gpt` crate) and MBR (`mbrman`), then telling the kernel with BLKPG.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::sys::TableKind;

/// Where the grown partition lies, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grown {
    pub start_bytes: u64,
    pub len_bytes: u64,
    /// False when the partition already reached the end of the disk.
    pub changed: bool,
}

/// Partition ends are aligned down to 1 MiB.
const ALIGN_BYTES: u64 = 1 << 20;

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Logical sector size of `disk`: BLKSSZGET for a block device, 512 for an image file.
pub fn sector_size(f: &File) -> io::Result<u64> {
    if !f.metadata()?.file_type().is_block_device() {
        return Ok(512);
    }
    let mut sz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x1268 as _, &mut sz as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sz as u64)
}

/// Reads which partition table `disk` has.
pub fn detect(disk: &Path) -> io::Result<Option<TableKind>> {
    let mut f = File::open(disk)?;
    let lb = sector_size(&f)?;
    let mut s0 = vec![0u8; lb as usize * 2];
    f.read_exact(&mut s0)?;
    if &s0[lb as usize..lb as usize + 8] == b"EFI PART" {
        return Ok(Some(TableKind::Gpt));
    }
    if s0[510] == 0x55 && s0[511] == 0xAA {
        return Ok(Some(TableKind::Mbr));
    }
    Ok(None)
}

/// Edits the table on `disk` so partition `partno` (the last one) ends at the end of the disk.
pub fn grow_table(disk: &Path, partno: u32, kind: TableKind) -> io::Result<Grown> {
    match kind {
        TableKind::Gpt => grow_gpt(disk, partno),
        TableKind::Mbr => grow_mbr(disk, partno),
    }
}

fn grow_gpt(disk: &Path, partno: u32) -> io::Result<Grown> {
    let lb = sector_size(&File::open(disk)?)?;
    let lbs = if lb == 4096 {
        gpt::disk::LogicalBlockSize::Lb4096
    } else {
        gpt::disk::LogicalBlockSize::Lb512
    };
    let err = |e: gpt::GptError| bad(format!("{}: {e}", disk.display()));
    let mut g = gpt::GptConfig::new()
        .writable(true)
        .only_valid_headers(false)
        .logical_block_size(lbs)
        .open(disk)
        .map_err(err)?;
    let mut parts = g.partitions().clone();
    // The gpt crate writes used entries packed from slot 1; refuse tables with holes rather
    // than renumber partitions under the running system.
    if parts.keys().copied().ne(1..=parts.len() as u32) {
        return Err(bad(format!(
            "{}: partition numbers have holes ({:?}); not editing",
            disk.display(),
            parts.keys().collect::<Vec<_>>()
        )));
    }
    let p = parts
        .get(&partno)
        .ok_or_else(|| bad(format!("{}: no partition {partno}", disk.display())))?
        .clone();
    if parts.values().any(|q| q.first_lba > p.first_lba) {
        return Err(bad(format!(
            "{}: partition {partno} is not the last one",
            disk.display()
        )));
    }
    // Rebuild the headers for the disk's current size: moves the backup header to the end.
    g.update_partitions(parts.clone()).map_err(err)?;
    let last_usable = g.header().last_usable;
    let per_align = (ALIGN_BYTES / lb).max(1);
    let end_excl = (last_usable + 1) / per_align * per_align;
    let new_last = end_excl.saturating_sub(1).max(p.last_lba);
    let changed = new_last > p.last_lba;
    if changed {
        parts.get_mut(&partno).expect("checked above").last_lba = new_last;
    }
    g.update_partitions(parts).map_err(err)?;
    let mut f = g.write().map_err(err)?;
    fix_protective_mbr(&mut f, lb)?;
    f.sync_all()?;
    Ok(Grown {
        start_bytes: p.first_lba * lb,
        len_bytes: (new_last - p.first_lba + 1) * lb,
        changed,
    })
}

/// The protective MBR's 0xEE entry should span the disk. Only its size field is touched, so
/// boot code in the MBR (GRUB for BIOS boot) stays.
fn fix_protective_mbr(f: &mut File, lb: u64) -> io::Result<()> {
    let len = f.seek(SeekFrom::End(0))?;
    let mut s0 = [0u8; 512];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut s0)?;
    if s0[510] != 0x55 || s0[511] != 0xAA || s0[446 + 4] != 0xEE {
        return Ok(());
    }
    let sectors = (len / lb).saturating_sub(1).min(u32::MAX as u64) as u32;
    f.seek(SeekFrom::Start(446 + 12))?;
    f.write_all(&sectors.to_le_bytes())?;
    Ok(())
}

fn grow_mbr(disk: &Path, partno: u32) -> io::Result<Grown> {
    let mut f = OpenOptions::new().read(true).write(true).open(disk)?;
    let lb = sector_size(&f)?;
    let len = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    let err = |e: mbrman::Error| bad(format!("{}: {e}", disk.display()));
    let mut mbr = mbrman::MBR::read_from(&mut f, lb as u32).map_err(err)?;
    if !(1..=4).contains(&partno) || !mbr[partno as usize].is_used() {
        return Err(bad(format!(
            "{}: no primary partition {partno}",
            disk.display()
        )));
    }
    let start = mbr[partno as usize].starting_lba as u64;
    let size = mbr[partno as usize].sectors as u64;
    let later = mbr
        .iter()
        .any(|(i, e)| i != partno as usize && e.is_used() && e.starting_lba as u64 > start);
    if later {
        return Err(bad(format!(
            "{}: partition {partno} is not the last one",
            disk.display()
        )));
    }
    let per_align = (ALIGN_BYTES / lb).max(1);
    let disk_sectors = (len / lb).min(u32::MAX as u64);
    let end_excl = disk_sectors / per_align * per_align;
    let new_size = end_excl.saturating_sub(start).max(size);
    let changed = new_size > size;
    if changed {
        mbr[partno as usize].sectors = new_size as u32;
        f.seek(SeekFrom::Start(0))?;
        mbr.write_into(&mut f).map_err(err)?;
        f.sync_all()?;
    }
    Ok(Grown {
        start_bytes: start * lb,
        len_bytes: new_size * lb,
        changed,
    })
}

#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut libc::c_void,
}

const BLKPG: u64 = 0x1269;
const BLKPG_RESIZE_PARTITION: i32 = 3;

/// Tells the kernel the new size of a partition that is in use (BLKPG_RESIZE_PARTITION;
/// BLKRRPART would fail with EBUSY while the root file system is mounted).
pub fn tell_kernel(disk: &Path, partno: u32, start_bytes: u64, len_bytes: u64) -> io::Result<()> {
    let f = File::open(disk)?;
    let mut part = BlkpgPartition {
        start: start_bytes as i64,
        length: len_bytes as i64,
        pno: partno as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part as *mut BlkpgPartition as *mut libc::c_void,
    };
    // SAFETY: BLKPG takes a pointer to blkpg_ioctl_arg whose data points to a live
    // blkpg_partition; both outlive the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKPG as _, &mut arg as *mut BlkpgIoctlArg) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn make_gpt(path: &Path, size: u64) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let mut g = gpt::GptConfig::new().writable(true).create(path).unwrap();
        g.add_partition("EFI", 8 * MIB, gpt::partition_types::EFI, 0, None)
            .unwrap();
        g.add_partition("root", 16 * MIB, gpt::partition_types::LINUX_FS, 0, None)
            .unwrap();
        let mut f = g.write().unwrap();
        // a protective MBR with boot code in front, as GRUB leaves it
        let pm = gpt::mbr::ProtectiveMBR::with_lb_size((size / 512 - 1) as u32);
        pm.overwrite_lba0(&mut f).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"BOOTCODE").unwrap();
    }

    #[test]
    fn gpt_root_grows_to_end_and_headers_stay_valid() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        make_gpt(&img, 32 * MIB);
        assert_eq!(detect(&img).unwrap(), Some(TableKind::Gpt));
        // the disk "grows" (dd onto a bigger card / qemu-img resize)
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(100 * MIB)
            .unwrap();

        let g = grow_table(&img, 2, TableKind::Gpt).unwrap();
        assert!(g.changed);
        assert_eq!(g.start_bytes + g.len_bytes, 99 * MIB, "{g:?}");

        // Both headers valid after the edit, partition 2 ends at the aligned end.
        let disk = gpt::GptConfig::new()
            .only_valid_headers(true)
            .open(&img)
            .unwrap();
        let p = &disk.partitions()[&2];
        assert_eq!((p.last_lba + 1) * 512, 99 * MIB);
        assert_eq!(
            disk.partitions()[&1].last_lba,
            disk.partitions()[&1].first_lba + 8 * 2048 - 1
        );
        let mut s0 = [0u8; 512];
        File::open(&img).unwrap().read_exact(&mut s0).unwrap();
        assert_eq!(&s0[..8], b"BOOTCODE", "boot code kept");
        let pm_size = u32::from_le_bytes(s0[458..462].try_into().unwrap());
        assert_eq!(pm_size as u64, 100 * MIB / 512 - 1);

        // Idempotent: a second run changes nothing.
        let again = grow_table(&img, 2, TableKind::Gpt).unwrap();
        assert!(!again.changed);
        assert_eq!(again.len_bytes, g.len_bytes);
    }

    #[test]
    fn gpt_refuses_a_partition_that_is_not_last() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        make_gpt(&img, 32 * MIB);
        let e = grow_table(&img, 1, TableKind::Gpt).unwrap_err();
        assert!(e.to_string().contains("not the last"), "{e}");
        assert!(grow_table(&img, 7, TableKind::Gpt).is_err());
    }

    #[test]
    fn mbr_root_grows_to_end() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("sd.img");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        f.set_len(64 * MIB).unwrap();
        let mut mbr = mbrman::MBR::new_from(&mut f, 512, [1, 2, 3, 4]).unwrap();
        mbr[1] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: 0x0c,
            last_chs: mbrman::CHS::empty(),
            starting_lba: 2048,
            sectors: 8 * 2048,
        };
        mbr[2] = mbrman::MBRPartitionEntry {
            boot: mbrman::BOOT_INACTIVE,
            first_chs: mbrman::CHS::empty(),
            sys: 0x83,
            last_chs: mbrman::CHS::empty(),
            starting_lba: 10 * 2048,
            sectors: 20 * 2048,
        };
        mbr.write_into(&mut f).unwrap();
        f.set_len(200 * MIB).unwrap();
        drop(f);
        assert_eq!(detect(&img).unwrap(), Some(TableKind::Mbr));

        let g = grow_table(&img, 2, TableKind::Mbr).unwrap();
        assert!(g.changed);
        assert_eq!(g.start_bytes, 10 * MIB);
        assert_eq!(g.start_bytes + g.len_bytes, 200 * MIB);
        let mut f = File::open(&img).unwrap();
        let mbr = mbrman::MBR::read_from(&mut f, 512).unwrap();
        assert_eq!(mbr[2].sectors as u64 * 512, 190 * MIB);
        assert_eq!(mbr[1].sectors, 8 * 2048);
        assert!(!grow_table(&img, 2, TableKind::Mbr).unwrap().changed);
        assert!(grow_table(&img, 1, TableKind::Mbr).is_err());
    }
}
