//! Issue 8, build side: a bad config or a full disk gives one clear error and leaves nothing
//! half-written in --out.

use std::process::Command;

use clutch_qemu_tests::*;

fn clutch_build(config: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    build_command(config, out, "raw,qcow2", Some(&bin("clutch-firstboot")))
        .output()
        .unwrap()
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn bad_config_leaves_no_output() {
    let cfg = test_config("amd64-vm", "faults-bad", |t| {
        t.replace("size = \"2GiB\"", "size = \"2 GB please\"")
    });
    let out = artifacts().join("out/faults-bad");
    let _ = std::fs::remove_dir_all(&out);
    let o = clutch_build(&cfg, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("{}:", cfg.display())) && err.contains("storage.loopback[0].size"),
        "{err}"
    );
    assert!(o.stdout.is_empty(), "no artifact path on stdout");
    assert!(
        !out.exists(),
        "--out was created for a config that never built: {:?}",
        entries(&out)
    );
}

/// Unmounts and removes the tmpfs when dropped.
struct Tmpfs(std::path::PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn disk_full_is_a_clear_error_and_nothing_half_written() {
    let cfg = test_config("amd64-vm", "faults-full", |t| t);
    let mnt = artifacts().join("faults-tmpfs");
    let _ = std::fs::create_dir_all(&mnt);
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a 64 MiB tmpfs (the test runs as root)"
    );
    let _guard = Tmpfs(mnt.clone());
    let out = mnt.join("out");
    let o = clutch_build(&cfg, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a build into 64 MiB cannot succeed");
    assert!(
        err.contains("No space left on device"),
        "the error must say why:\n{err}"
    );
    let left = entries(&out);
    assert!(
        left.is_empty(),
        "half-written files left in --out: {left:?}\n{err}"
    );
}
