//! Block maps in the format of bmaptool (bmap file format 2.0): the list of block ranges of
//! a sparse image that hold data, each with its sha256, and a checksum over the bmap file
//! itself computed as bmaptool's `BmapCreate` does (sha256 of the file with the checksum
//! field set to 64 ASCII zeros). `bmaptool copy IMAGE DEVICE` accepts what we write, and
//! `clutch flash` reads it back (see `flash`).
//!
//! The mapped ranges come from `SEEK_DATA`/`SEEK_HOLE` on the image file, so only what the
//! file systems wrote is listed; holes never reach the device.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use sha2::{Digest, Sha256};

/// bmaptool's block size: the file system block size of the image (4 KiB on ext4/xfs).
pub const BLOCK_SIZE: u64 = 4096;
pub const VERSION: &str = "2.0";

#[derive(Debug, thiserror::Error)]
pub enum BmapError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BmapError + '_ {
    move |source| BmapError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One range of mapped blocks, both ends included (as bmaptool writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    /// Hex sha256 of the range's bytes (cut at the image end).
    pub sha256: String,
}

impl Range {
    pub fn blocks(&self) -> u64 {
        self.last - self.first + 1
    }
    /// Byte offset and length of the range in an image of `image_size` bytes.
    pub fn bytes(&self, block_size: u64, image_size: u64) -> (u64, u64) {
        let start = self.first * block_size;
        let end = ((self.last + 1) * block_size).min(image_size);
        (start, end - start)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<Range>,
}

impl Bmap {
    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }
    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(Range::blocks).sum()
    }
    /// Bytes a flash through this map writes.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| r.bytes(self.block_size, self.image_size).1)
            .sum()
    }
}

/// The data extents of a file as `[start, end)` byte ranges, from `SEEK_DATA`/`SEEK_HOLE`.
/// A file system without hole reporting gives one extent covering the whole file.
pub fn data_extents(f: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let size = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (d, h) = (data as u64, (hole as u64).min(size));
        if h > d {
            out.push((d, h));
        }
        pos = h.max(d + 1);
    }
    Ok(out)
}

/// One extent as FIEMAP reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fiemap {
    pub logical: u64,
    pub length: u64,
    pub unwritten: bool,
}

const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_FLAG_SYNC: u32 = 1;
const FIEMAP_EXTENT_LAST: u32 = 1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;

/// The file's extents from the FIEMAP ioctl (after syncing it); `Ok(None)` when the file
/// system does not support FIEMAP (tmpfs).
pub fn fiemap(f: &File) -> std::io::Result<Option<Vec<Fiemap>>> {
    const N: usize = 256;
    // struct fiemap (32 bytes) followed by N struct fiemap_extent (56 bytes each), as u64s.
    let mut buf = vec![0u64; (32 + 56 * N) / 8];
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        buf.iter_mut().for_each(|x| *x = 0);
        buf[0] = start;
        buf[1] = u64::MAX - start;
        // fm_flags (u32) | fm_mapped_extents (u32), then fm_extent_count | fm_reserved.
        buf[2] = u64::from(FIEMAP_FLAG_SYNC);
        buf[3] = N as u64;
        // SAFETY: the buffer is large enough for the header and N extents, as announced.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(e),
            };
        }
        let mapped = (buf[2] >> 32) as usize;
        if mapped == 0 {
            return Ok(Some(out));
        }
        let mut last = false;
        for i in 0..mapped.min(N) {
            let e = &buf[4 + i * 7..4 + (i + 1) * 7];
            let flags = e[5] as u32;
            out.push(Fiemap {
                logical: e[0],
                length: e[2],
                unwritten: flags & FIEMAP_EXTENT_UNWRITTEN != 0,
            });
            start = e[0] + e[2];
            last |= flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            return Ok(Some(out));
        }
    }
}

/// Turns preallocated-but-unwritten extents (what `mkfs.ext4` leaves where it zeroes with
/// fallocate) into holes. Both read as zeros, but `SEEK_DATA` reports unwritten extents as
/// data or hole depending on the page cache, and bmaptool's FIEMAP counts them as mapped;
/// as holes, the image's map is the same for everyone and less is allocated and flashed.
/// Returns the bytes released.
pub fn punch_unwritten(path: &Path) -> Result<u64, BmapError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    let Some(extents) = fiemap(&f).map_err(io(path))? else {
        return Ok(0);
    };
    let mut n = 0;
    for e in extents.iter().filter(|e| e.unwritten) {
        // SAFETY: fallocate on our own descriptor.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                e.logical as libc::off_t,
                e.length as libc::off_t,
            )
        };
        if r < 0 {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
        n += e.length;
    }
    f.sync_all().map_err(io(path))?;
    Ok(n)
}

/// Block ranges (both ends included) covering the byte extents: each extent is widened to
/// whole blocks, and ranges that touch are merged.
pub fn block_ranges(extents: &[(u64, u64)], block_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in extents {
        if e <= s {
            continue;
        }
        let first = s / block_size;
        let last = (e - 1) / block_size;
        match out.last_mut() {
            Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// sha256 of `len` bytes at `offset` of `f`, reading in 1 MiB pieces; `tick` gets each
/// piece's length (progress).
pub fn hash_span(
    f: &File,
    offset: u64,
    len: u64,
    tick: &mut dyn FnMut(u64),
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], offset + done)?;
        h.update(&buf[..n]);
        done += n as u64;
        tick(n as u64);
    }
    Ok(hex::encode(h.finalize()))
}

/// Maps `image` (its holes stay out) and hashes every mapped range. `tick` gets the bytes
/// hashed so far in steps (for a progress bar over `Bmap::mapped_bytes`).
pub fn create(image: &Path, tick: &mut dyn FnMut(u64)) -> Result<Bmap, BmapError> {
    let f = File::open(image).map_err(io(image))?;
    let image_size = f.metadata().map_err(io(image))?.len();
    if image_size == 0 {
        return Err(BmapError::Invalid {
            path: image.display().to_string(),
            what: "cannot map an empty image".into(),
        });
    }
    let extents = data_extents(&f).map_err(io(image))?;
    let mut ranges = Vec::new();
    for (first, last) in block_ranges(&extents, BLOCK_SIZE) {
        let start = first * BLOCK_SIZE;
        let end = ((last + 1) * BLOCK_SIZE).min(image_size);
        let sha256 = hash_span(&f, start, end - start, tick).map_err(io(image))?;
        ranges.push(Range {
            first,
            last,
            sha256,
        });
    }
    Ok(Bmap {
        image_size,
        block_size: BLOCK_SIZE,
        ranges,
    })
}

/// `text` written over the start of `placeholder` (as a seek-and-write in a file does).
fn overwrite(placeholder: &str, text: &str) -> String {
    let cut = text.len().min(placeholder.len());
    format!("{text}{}", &placeholder[cut..])
}

/// bmaptool's `human_size`.
fn human_size(size: u64) -> String {
    if size == 1 {
        return "1 byte".into();
    }
    if size < 512 {
        return format!("{size} bytes");
    }
    let mut s = size as f64;
    for m in ["KiB", "MiB", "GiB", "TiB"] {
        s /= 1024.0;
        if s < 1024.0 {
            return format!("{s:.1} {m}");
        }
    }
    format!("{s:.1} EiB")
}

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The bmap file, laid out as bmaptool's `BmapCreate` writes it, with the file checksum.
pub fn to_xml(b: &Bmap) -> String {
    let blocks = b.blocks_count();
    let mapped = b.mapped_blocks();
    let mapped_size = mapped * b.block_size;
    let percent = mapped as f64 * 100.0 / blocks as f64;
    let mut x = String::new();
    x.push_str(concat!(
        "<?xml version=\"1.0\" ?>\n",
        "<!-- This file contains the block map for an image file, which is basically\n",
        "     a list of useful (mapped) block numbers in the image file. In other words,\n",
        "     it lists only those blocks which contain data (boot sector, partition\n",
        "     table, file-system metadata, files, directories, extents, etc). These\n",
        "     blocks have to be copied to the target device. The other blocks do not\n",
        "     contain any useful data and do not have to be copied to the target\n",
        "     device.\n",
        "\n",
        "     The block map an optimization which allows to copy or flash the image to\n",
        "     the image quicker than copying of flashing the entire image. This is\n",
        "     because with bmap less data is copied: <MappedBlocksCount> blocks instead\n",
        "     of <BlocksCount> blocks.\n",
        "\n",
        "     Besides the machine-readable data, this file contains useful commentaries\n",
        "     which contain human-readable information like image size, percentage of\n",
        "     mapped data, etc.\n",
        "\n",
        "     The 'version' attribute is the block map file format version in the\n",
        "     'major.minor' format. The version major number is increased whenever an\n",
        "     incompatible block map format change is made. The minor number changes\n",
        "     in case of minor backward-compatible changes. -->\n",
        "\n",
    ));
    let _ = write!(
        x,
        "<bmap version=\"{VERSION}\">\n    <!-- Image size in bytes: {} -->\n    <ImageSize> {} </ImageSize>\n\n    <!-- Size of a block in bytes -->\n    <BlockSize> {} </BlockSize>\n\n    <!-- Count of blocks in the image file -->\n    <BlocksCount> {} </BlocksCount>\n\n",
        human_size(b.image_size),
        b.image_size,
        b.block_size,
        blocks
    );
    // bmaptool writes these fields as blank placeholders first and overwrites them in
    // place: a shorter value leaves blanks after it, a longer one eats into what follows.
    let human = human_size(b.image_size);
    let mapped_text = format!("{} or {percent:.1}%", human_size(mapped_size));
    let line1 = overwrite(
        &format!("{}   -->\n", " ".repeat(human.len() + 4 + "100.0%".len())),
        &mapped_text,
    );
    let line2 = overwrite(
        &format!(
            "{} </MappedBlocksCount>\n\n",
            " ".repeat(blocks.to_string().len())
        ),
        &mapped.to_string(),
    );
    let _ = write!(
        x,
        "    <!-- Count of mapped blocks: {line1}    <MappedBlocksCount> {line2}"
    );
    x.push_str("    <!-- Type of checksum used in this file -->\n");
    x.push_str("    <ChecksumType> sha256 </ChecksumType>\n\n");
    x.push_str("    <!-- The checksum of this bmap file. When it is calculated, the value of\n");
    x.push_str("         the checksum has be zero (all ASCII \"0\" symbols).  -->\n");
    x.push_str("    <BmapFileChecksum> ");
    let sum_at = x.len();
    x.push_str(ZEROS);
    x.push_str(" </BmapFileChecksum>\n\n");
    x.push_str("    <!-- The block map which consists of elements which may either be a\n");
    x.push_str("         range of blocks or a single block. The 'chksum' attribute\n");
    x.push_str("         (if present) is the checksum of this blocks range. -->\n");
    x.push_str("    <BlockMap>\n");
    for r in &b.ranges {
        if r.first == r.last {
            let _ = writeln!(
                x,
                "        <Range chksum=\"{}\"> {} </Range>",
                r.sha256, r.first
            );
        } else {
            let _ = writeln!(
                x,
                "        <Range chksum=\"{}\"> {}-{} </Range>",
                r.sha256, r.first, r.last
            );
        }
    }
    x.push_str("    </BlockMap>\n</bmap>\n");
    let sum = hex::encode(Sha256::digest(x.as_bytes()));
    x.replace_range(sum_at..sum_at + ZEROS.len(), &sum);
    x
}

/// Text between `<tag>` and `</tag>`, trimmed.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let s = xml.find(&open)? + open.len();
    let e = s + xml[s..].find(&close)?;
    Some(xml[s..e].trim())
}

/// The text without `<!-- ... -->` comments (bmaptool's header comment names elements).
fn strip_comments(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(i) = rest.find("<!--") {
        out.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Reads a bmap file (format 2.x with sha256, as bmaptool and `to_xml` write), checking the
/// file checksum. Errors name the file and the field.
pub fn parse(path: &Path, text: &str) -> Result<Bmap, BmapError> {
    let stripped = strip_comments(text);
    let xml = stripped.as_str();
    let bad = |what: String| BmapError::Invalid {
        path: path.display().to_string(),
        what,
    };
    let version = xml
        .find("<bmap version=\"")
        .map(|i| &xml[i + 15..])
        .and_then(|r| r.split('"').next())
        .ok_or_else(|| bad("no <bmap version=\"...\"> element".into()))?;
    if !version.starts_with("2.") {
        return Err(bad(format!(
            "bmap format version {version} is not supported (2.x is)"
        )));
    }
    let num = |tag: &str| -> Result<u64, BmapError> {
        let t = element(xml, tag).ok_or_else(|| bad(format!("no <{tag}>")))?;
        t.parse()
            .map_err(|_| bad(format!("<{tag}> is not a number: `{t}`")))
    };
    let image_size = num("ImageSize")?;
    let block_size = num("BlockSize")?;
    let blocks = num("BlocksCount")?;
    if block_size == 0 || image_size.div_ceil(block_size) != blocks {
        return Err(bad(format!(
            "<BlocksCount> {blocks} does not match <ImageSize> {image_size} / <BlockSize> {block_size}"
        )));
    }
    let ctype = element(xml, "ChecksumType").unwrap_or("");
    if ctype != "sha256" {
        return Err(bad(format!(
            "<ChecksumType> `{ctype}` is not supported (sha256 is)"
        )));
    }
    let want =
        element(xml, "BmapFileChecksum").ok_or_else(|| bad("no <BmapFileChecksum>".into()))?;
    if want.len() != 64 {
        return Err(bad("<BmapFileChecksum> is not a sha256".into()));
    }
    let zeroed = text.replacen(want, ZEROS, 1);
    let got = hex::encode(Sha256::digest(zeroed.as_bytes()));
    if got != want {
        return Err(bad(format!(
            "the bmap file checksum does not match (file says {want}, content hashes to {got}): the file is damaged"
        )));
    }
    let map = element(xml, "BlockMap").ok_or_else(|| bad("no <BlockMap>".into()))?;
    let mut ranges = Vec::new();
    for (i, piece) in map.split("</Range>").enumerate() {
        let Some(at) = piece.find("<Range") else {
            continue;
        };
        let el = &piece[at..];
        let gt = el
            .find('>')
            .ok_or_else(|| bad(format!("range {}: no `>`", i + 1)))?;
        let (attrs, body) = (&el[..gt], el[gt + 1..].trim());
        let sha256 = attrs
            .find("chksum=\"")
            .map(|j| &attrs[j + 8..])
            .and_then(|r| r.split('"').next())
            .ok_or_else(|| bad(format!("range {} ({body}) has no chksum", i + 1)))?
            .to_string();
        let (a, b) = body.split_once('-').unwrap_or((body, body));
        let p = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| bad(format!("range {}: `{body}` is not a block range", i + 1)))
        };
        let (first, last) = (p(a)?, p(b)?);
        if last < first || last >= blocks {
            return Err(bad(format!(
                "range {}: {body} lies outside the image's {blocks} blocks",
                i + 1
            )));
        }
        ranges.push(Range {
            first,
            last,
            sha256,
        });
    }
    Ok(Bmap {
        image_size,
        block_size,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A sparse file with data at the given byte spans (filled with a pattern).
    fn sparse(path: &Path, size: u64, spans: &[(u64, u64)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for &(s, len) in spans {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            f.write_all_at(&data, s).unwrap();
        }
        f.sync_all().unwrap();
    }

    #[test]
    fn block_ranges_widen_and_merge() {
        let b = 4096;
        assert_eq!(block_ranges(&[(0, 1)], b), vec![(0, 0)]);
        assert_eq!(block_ranges(&[(0, 4096), (4096, 8193)], b), vec![(0, 2)]);
        assert_eq!(
            block_ranges(&[(100, 200), (3 * 4096, 5 * 4096)], b),
            vec![(0, 0), (3, 4)]
        );
        assert_eq!(block_ranges(&[(0, 10), (4095, 4097)], b), vec![(0, 1)]);
        assert!(block_ranges(&[(5, 5)], b).is_empty());
    }

    #[test]
    fn placeholders_are_overwritten_like_a_file() {
        assert_eq!(overwrite("          -->", "abc"), "abc       -->");
        assert_eq!(overwrite("  x", "abcd"), "abcd");
        assert_eq!(overwrite("     -->", "abcdef"), "abcdef->");
    }

    #[test]
    fn human_size_matches_bmaptool() {
        assert_eq!(human_size(1), "1 byte");
        assert_eq!(human_size(100), "100 bytes");
        assert_eq!(human_size(4 << 30), "4.0 GiB");
        assert_eq!(human_size(1268776960), "1.2 GiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    #[test]
    fn maps_only_data_and_hashes_match() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("s.img");
        let mib = 1u64 << 20;
        sparse(
            &img,
            64 * mib,
            &[(0, 10_000), (8 * mib, 3 * mib), (40 * mib, 1)],
        );
        let f = File::open(&img).unwrap();
        // The file really has holes (the rest of the test means nothing otherwise).
        assert!(f.metadata().unwrap().blocks() * 512 < 8 * mib);
        let m = create(&img, &mut |_| {}).unwrap();
        let got: Vec<(u64, u64)> = m.ranges.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(
            got,
            vec![
                (0, 2),
                (8 * mib / 4096, 11 * mib / 4096 - 1),
                (40 * mib / 4096, 40 * mib / 4096)
            ]
        );
        assert_eq!(m.blocks_count(), 64 * mib / 4096);
        for r in &m.ranges {
            let (off, len) = r.bytes(m.block_size, m.image_size);
            let mut buf = vec![0; len as usize];
            f.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(hex::encode(Sha256::digest(&buf)), r.sha256);
        }
        // Round trip through the XML, checksum included.
        let xml = to_xml(&m);
        assert_eq!(parse(&img, &xml).unwrap(), m);
        // A changed byte breaks the file checksum.
        let broken = xml.replacen("<Range chksum=\"", "<Range chksum=\"0", 1);
        let e = parse(&img, &broken).unwrap_err().to_string();
        assert!(e.contains("checksum does not match"), "{e}");
    }

    #[test]
    fn image_size_not_a_block_multiple_hashes_to_the_end() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("odd.img");
        sparse(&img, 3 * 4096 + 100, &[(2 * 4096 + 10, 4096)]);
        let m = create(&img, &mut |_| {}).unwrap();
        assert_eq!(m.blocks_count(), 4);
        assert_eq!((m.ranges[0].first, m.ranges[0].last), (2, 3));
        assert_eq!(
            m.ranges[0].bytes(4096, m.image_size),
            (2 * 4096, 4096 + 100)
        );
        let d = std::fs::read(&img).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&d[2 * 4096..])),
            m.ranges[0].sha256
        );
    }

    #[test]
    fn unwritten_extents_become_holes() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("u.img");
        let f = File::create(&img).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        // Preallocate 4 MiB at 8 MiB (unwritten, reads as zeros).
        let r =
            unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 8 << 20, 4 << 20) };
        assert_eq!(r, 0);
        f.sync_all().unwrap();
        let Some(before) = fiemap(&f).unwrap() else {
            return; // no FIEMAP here (tmpfs)
        };
        assert!(before.iter().any(|e| e.unwritten), "{before:?}");
        let released = punch_unwritten(&img).unwrap();
        assert_eq!(released, 4 << 20);
        let after = fiemap(&f).unwrap().unwrap();
        assert!(after.iter().all(|e| !e.unwritten), "{after:?}");
        let m = create(&img, &mut |_| {}).unwrap();
        assert_eq!(m.mapped_blocks(), 2);
    }

    /// bmaptool itself (package bmap-tools) accepts the file and flashes by it.
    #[test]
    fn bmaptool_copies_through_our_bmap() {
        if !crate::doctor::find_in_path("bmaptool") {
            eprintln!("bmaptool not installed (package bmap-tools); skipping");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("b.img");
        let mib = 1u64 << 20;
        sparse(&img, 32 * mib, &[(0, 5000), (9 * mib, 2 * mib + 7)]);
        let m = create(&img, &mut |_| {}).unwrap();
        let bmap = t.path().join("b.img.bmap");
        std::fs::write(&bmap, to_xml(&m)).unwrap();
        let dest = t.path().join("dest.img");
        let out = std::process::Command::new("bmaptool")
            .arg("copy")
            .arg("--bmap")
            .arg(&bmap)
            .arg(&img)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bmaptool copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&img).unwrap(), std::fs::read(&dest).unwrap());
        // And what bmaptool itself makes of the image is what we make of it.
        let theirs = t.path().join("theirs.bmap");
        let st = std::process::Command::new("bmaptool")
            .arg("create")
            .arg("-o")
            .arg(&theirs)
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success());
        let theirs = std::fs::read_to_string(&theirs).unwrap();
        assert_eq!(parse(&img, &theirs).unwrap(), m);
        assert_eq!(theirs, to_xml(&m), "byte-identical to bmaptool create");
    }
}
