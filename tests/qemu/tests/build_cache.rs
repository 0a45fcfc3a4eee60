//! Issue 2: a second build with only `[user]` changed reuses the cached root filesystem and
//! finishes quickly; and the disk it writes has the GPT layout, clean file systems, and
//! nothing per-node baked in (no ssh host keys, empty machine-id).

use std::process::Command;
use std::time::Instant;

use clutch_qemu_tests::*;

fn build(config: &std::path::Path) -> (std::path::PathBuf, String, f64) {
    let out = artifacts().join("out").join(config.file_stem().unwrap());
    let t = Instant::now();
    let o = build_command(config, &out, "raw", Some(&bin("clutch-firstboot")))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "build failed:\n{stderr}");
    let img = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    (img.into(), stderr, secs)
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn user_change_reuses_rootfs_and_layout_checks_pass() {
    let a = test_config("amd64-vm", "cache-a", |t| t);
    let (_, _, first) = build(&a);
    let b = test_config("amd64-vm", "cache-b", |t| {
        t.replace("name = \"admin\"", "name = \"ops\"")
    });
    let (img, log, warm) = build(&b);
    eprintln!("first build {first:.1}s, second build ([user] changed) {warm:.1}s");
    assert!(
        log.contains("reused from the cache"),
        "the root filesystem was rebuilt:\n{log}"
    );
    assert!(warm < 60.0, "a warm build took {warm:.0}s (want < 60s)");

    // GPT layout: ESP (LegacyBIOSBootable) then the root, 1 MiB aligned.
    let json = run(Command::new("sfdisk").arg("--json").arg(&img));
    assert!(json.contains("\"label\": \"gpt\""), "{json}");
    assert!(
        json.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{json}"
    );
    assert!(json.contains("LegacyBIOSBootable"), "{json}");
    assert!(json.contains("\"start\": 2048"), "{json}");

    // fsck.vfat -n and e2fsck -fn on the partitions, extracted to plain files.
    let dir = tempfile::tempdir_in(artifacts()).unwrap();
    let table: serde_json::Value = serde_json::from_str(&json).unwrap();
    let parts: Vec<(u64, u64)> = table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(parts.len(), 2, "{json}");
    let extract = |n: usize| {
        let p = dir.path().join(format!("p{n}.img"));
        run(Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", p.display()))
            .arg("bs=512")
            .arg(format!("skip={}", parts[n].0))
            .arg(format!("count={}", parts[n].1))
            .args(["conv=sparse", "status=none"]));
        p
    };
    let esp = extract(0);
    let root = extract(1);
    run(Command::new("fsck.vfat").arg("-n").arg(&esp));
    run(Command::new("e2fsck").arg("-fn").arg(&root));

    // The user change landed; nothing per node is baked in.
    let passwd = run(Command::new("debugfs")
        .args(["-R", "cat /etc/passwd"])
        .arg(&root));
    assert!(passwd.lines().any(|l| l.starts_with("ops:")), "{passwd}");
    let mid = run(Command::new("debugfs")
        .args(["-R", "stat /etc/machine-id"])
        .arg(&root));
    assert!(mid.contains("Size: 0"), "machine-id must be empty: {mid}");
    let ssh = run(Command::new("debugfs")
        .args(["-R", "ls -p /etc/ssh"])
        .arg(&root));
    assert!(
        !ssh.contains("ssh_host_"),
        "host keys baked into the image: {ssh}"
    );
    let toml = run(Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(&esp)
        .arg("::/clutch.toml"));
    assert!(toml.contains("name = \"ops\""), "{toml}");
}
