//! Reading files from the FAT partition, which anyone with the card can write: bounded
//! sizes, regular files only (a link is never followed), UTF-8 text.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The largest file read from the boot partition; real ones are a few KiB.
pub const MAX_FILE: u64 = 256 << 10;

/// A file as read: its text and its length in bytes (what the scrub overwrites).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatText {
    pub text: String,
    pub len: u64,
}

/// Reads `p`: `Ok(None)` when it does not exist; an error (as a sentence) when it is not a
/// regular file, is larger than [`MAX_FILE`] or not UTF-8.
pub fn read(p: &Path) -> Result<Option<FatText>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("is a symbolic link; not followed".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "is {} bytes; files on the boot partition are read up to {} KiB",
            meta.len(),
            MAX_FILE >> 10
        ));
    }
    let mut buf = Vec::new();
    (&mut f)
        .take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    let len = buf.len() as u64;
    let text = String::from_utf8(buf).map_err(|e| {
        format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(Some(FatText { text, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_regular_utf8_files_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("user-data");
        assert_eq!(read(&p).unwrap(), None);
        std::fs::write(&p, "#cloud-config\n").unwrap();
        assert_eq!(read(&p).unwrap().unwrap().len, 14);
        std::fs::write(&p, vec![b'a'; MAX_FILE as usize + 1]).unwrap();
        assert!(read(&p).unwrap_err().contains("256 KiB"));
        std::fs::write(&p, b"a\xffb").unwrap();
        assert!(read(&p).unwrap_err().contains("offset 1"));
        let l = d.path().join("link");
        std::os::unix::fs::symlink("/etc/shadow", &l).unwrap();
        assert!(read(&l).unwrap_err().contains("link"));
        assert!(read(d.path()).unwrap_err().contains("regular"));
    }
}
