//! `clutch doctor` as a user runs it: on a machine without mksquashfs it says which Debian
//! package to install.

use std::path::Path;
use std::process::Command;

#[test]
fn doctor_without_mksquashfs_names_squashfs_tools() {
    // A PATH folder with links to every program of /usr/bin except mksquashfs. doctor also
    // looks in /usr/sbin and /sbin, where Debian never puts mksquashfs.
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir("/usr/bin").unwrap().flatten() {
        let n = e.file_name();
        if n != "mksquashfs" {
            let _ = std::os::unix::fs::symlink(e.path(), t.path().join(&n));
        }
    }
    assert!(!Path::new("/usr/sbin/mksquashfs").exists() && !Path::new("/sbin/mksquashfs").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_clutch"))
        .arg("doctor")
        .env("PATH", t.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a missing tool fails doctor:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("mksquashfs"))
        .unwrap_or_else(|| panic!("no mksquashfs line:\n{text}"));
    assert!(
        line.starts_with("MISSING") && line.contains("squashfs-tools"),
        "{line}"
    );
    // Everything else a plain amd64 build needs is still found through the links.
    for l in text.lines() {
        if l.contains("mkfs.ext4") || l.contains("mmdebstrap") {
            assert!(l.starts_with("found"), "{l}");
        }
    }
}
