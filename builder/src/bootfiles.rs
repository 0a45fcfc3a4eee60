//! Finding a board's `boot.files` in the staged root filesystem. A `from` path may hold `*`
//! wildcards in its components (e.g. `/usr/lib/linux-image-*/broadcom/x.dtb`, whose folder
//! name carries the kernel version); when several paths match, the one that sorts last in
//! version order wins (the newest kernel).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::stage::resolve_in_root;

/// Resolves `pattern` (absolute, inside the image) to a host path under `root`; `None` when
/// a wildcard matches nothing. Without wildcards this is [`resolve_in_root`].
pub fn resolve_pattern(root: &Path, pattern: &str) -> Result<Option<PathBuf>> {
    if !pattern.contains('*') {
        return Ok(Some(resolve_in_root(root, pattern)?));
    }
    // Expand component by component; each candidate is a path inside the image.
    let mut candidates = vec![String::new()];
    for comp in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for c in &candidates {
            if comp.contains('*') {
                let dir = resolve_in_root(root, if c.is_empty() { "/" } else { c })?;
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if wildcard_match(comp, &name) {
                        next.push(format!("{c}/{name}"));
                    }
                }
            } else {
                next.push(format!("{c}/{comp}"));
            }
        }
        candidates = next;
    }
    let mut found = Vec::new();
    for c in candidates {
        let p = resolve_in_root(root, &c)?;
        if p.exists() {
            found.push((c, p));
        }
    }
    found.sort_by(|a, b| version_cmp(&a.0, &b.0));
    Ok(found.pop().map(|(_, p)| p))
}

/// Replaces the staged file `src` (a host path under `root`, already copied to the boot
/// partition as `to`) by a link to that copy through the partition's mount point `mount`
/// (`/boot/firmware`): relative when the copy is below the file's folder
/// (`/boot/vmlinuz-6.12 -> firmware/vmlinuz`), absolute otherwise.
pub fn link_to_boot_copy(root: &Path, src: &Path, mount: &str, to: &str) -> Result<()> {
    let node = Path::new("/").join(
        src.strip_prefix(root)
            .with_context(|| format!("{} is not inside {}", src.display(), root.display()))?,
    );
    let target = Path::new(mount).join(to);
    let dir = node.parent().unwrap_or(Path::new("/"));
    let link = match target.strip_prefix(dir) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => target.clone(),
    };
    std::fs::remove_file(src).with_context(|| format!("removing {}", src.display()))?;
    std::os::unix::fs::symlink(&link, src)
        .with_context(|| format!("linking {} -> {}", src.display(), link.display()))?;
    Ok(())
}

/// `*` matches any run of characters (none included); everything else matches itself.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == name;
    }
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Compares strings with digit runs taken as numbers (`6.12.10` after `6.12.9`).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let da = trim_zeros(&a[..na]);
                let db = trim_zeros(&b[..nb]);
                let o = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_in_boot_becomes_a_link_to_the_boot_partition_copy() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("boot/firmware")).unwrap();
        std::fs::write(r.join("boot/vmlinuz-6.12.1-arm64"), b"kernel").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.12.1-arm64", r.join("vmlinuz")).unwrap();
        let src = resolve_pattern(r, "/vmlinuz").unwrap().unwrap();
        link_to_boot_copy(r, &src, "/boot/firmware", "vmlinuz").unwrap();
        assert_eq!(
            std::fs::read_link(r.join("boot/vmlinuz-6.12.1-arm64")).unwrap(),
            Path::new("firmware/vmlinuz")
        );
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::fs::write(r.join("usr/lib/x.bin"), b"x").unwrap();
        link_to_boot_copy(r, &r.join("usr/lib/x.bin"), "/boot/firmware", "x.bin").unwrap();
        assert_eq!(
            std::fs::read_link(r.join("usr/lib/x.bin")).unwrap(),
            Path::new("/boot/firmware/x.bin")
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("linux-image-*", "linux-image-6.12.9-arm64"));
        assert!(wildcard_match("*", "x"));
        assert!(wildcard_match("a*b*c", "aXXbYc"));
        assert!(wildcard_match("a*b", "ab"));
        assert!(!wildcard_match("a*b", "a"));
        assert!(!wildcard_match("linux-image-*", "linux-headers-6.1"));
        assert!(!wildcard_match("abc", "abcd"));
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(version_cmp("6.12.10", "6.12.9"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-31", "6.1.0-9"), Ordering::Greater);
        assert_eq!(version_cmp("6.1", "6.1"), Ordering::Equal);
        assert_eq!(version_cmp("6.1", "6.1.0"), Ordering::Less);
    }

    #[test]
    fn newest_kernel_dtb_wins_and_missing_is_none() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for v in ["6.12.9-arm64", "6.12.10-arm64"] {
            let d = r.join(format!("usr/lib/linux-image-{v}/broadcom"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("bcm2711-rpi-4-b.dtb"), v).unwrap();
        }
        // Debian's usrmerge: /lib -> usr/lib must be followed.
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
        let p = resolve_pattern(r, "/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb")
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::read_to_string(p).unwrap(), "6.12.10-arm64");
        assert!(
            resolve_pattern(r, "/usr/lib/linux-image-*/broadcom/nope.dtb")
                .unwrap()
                .is_none()
        );
        assert!(
            resolve_pattern(r, "/usr/lib/nothing-*/x")
                .unwrap()
                .is_none()
        );
    }
}
