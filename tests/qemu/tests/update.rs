//! A/B updates of an amd64 node under OVMF, from `clutch serve` on the host:
//! - release 1 boots (a node on its own: no cluster);
//! - a tampered release folder is refused, nothing is written;
//! - release 2 (another package: etcd) is applied: the node comes back on slot b, release 2,
//!   with the same node id, host name, ssh host key, /home file and loopback data;
//! - `clutch-firstboot update --rollback` takes the node back to release 1 on slot a by
//!   command;
//! - release 3, whose kernel cannot start init (`init=/bin/false`), panics on each trial
//!   boot; systemd-boot falls back to release 1 by itself, and the node reports release 3
//!   as rolled back, with the reason, and never tries it again.
//!
//! The images and release folders are deleted at the end (a few GiB on a small CI disk).
//!
//! This is also the image tests' UEFI boot: its first boot checks the login prompt under
//! OVMF (the SeaBIOS boot stays in boot.rs).
//!
//! The guest reaches the server through QEMU's `guestfwd` (10.0.2.100:80), so the user
//! network stays `restrict=on`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clutch_qemu_tests::*;

const BOOT: Duration = Duration::from_secs(420);
const SSH: Duration = Duration::from_secs(180);
/// Download, decompression and the slot write, under TCG.
const APPLY: Duration = Duration::from_secs(1200);

/// `clutch serve DIR` on 127.0.0.1:port, stopped (by its pid) when dropped.
struct Serve(Child);

impl Serve {
    fn start(dir: &Path, port: u16) -> Serve {
        let child = Command::new(bin("clutch"))
            .arg("serve")
            .arg(dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clutch serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "clutch serve did not listen");
            std::thread::sleep(Duration::from_millis(200));
        }
        Serve(child)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dir() -> PathBuf {
    let d = artifacts().join("update");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The release-signing key of the test (made once with `clutch update-key`).
fn key() -> PathBuf {
    release_key(&dir().join("release.key"))
}

/// The amd64-vm config with `[update]` as release `release`; `packages` and `cmdline` make
/// the releases differ.
fn config(release: &str, packages: &str, cmdline: &str) -> PathBuf {
    let key = key();
    test_config("amd64-vm", &format!("update-v{release}"), |t| {
        let t = t
            .replace("packages = []", &format!("packages = [{packages}]"))
            .replace(
                "formats = [\"raw\", \"qcow2\"]",
                &format!("formats = [\"raw\"]\nrelease = \"{release}\""),
            )
            .replace(
                "cgroups = true",
                &format!("cgroups = true\ncmdline = [{cmdline}]"),
            );
        format!(
            "{t}\n[update]\nsource = \"http://10.0.2.100/\"\ncheck = \"manual\"\nsigning_key_file = \"{}\"\n",
            key.display()
        )
    })
}

/// The `update/` folder of an `update`-only build (its main artifact is the root image in it).
fn update_dir(main: &Path) -> PathBuf {
    let d = main.parent().unwrap();
    assert!(d.ends_with("update"), "{}", main.display());
    d.to_path_buf()
}

/// What the node says about itself.
const FACTS: &str = r#"
echo node_id=$(sudo cat /var/lib/clutch/node-id)
echo hostname=$(hostname)
echo hostkey=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)
echo machine_id=$(cat /etc/machine-id)
echo marker=$(cat ~/marker 2>/dev/null)
echo loop=$(sudo head -c 12 /dev/clutch/data0 | tr -cd '[:print:]')
echo etcd=$(dpkg-query -W -f='${Status}' etcd-server 2>/dev/null)
echo root=$(findmnt -no SOURCE /)
echo data=$(findmnt -no SOURCE /data)
echo data_bytes=$(lsblk -bno SIZE $(findmnt -no SOURCE /data))
echo entries=$(sudo ls /boot/efi/loader/entries | tr '\n' ' ')
"#;

fn status_json(port: u16) -> serde_json::Value {
    let s = ssh(port, "cat /run/clutch/status.json", SSH).unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("status.json: {e}: {s}"))
}

struct Node {
    disk: PathBuf,
    ssh_port: u16,
    http_port: u16,
    boots: u32,
}

impl Node {
    fn start(&mut self) -> Vm {
        self.boots += 1;
        let extra = vec![
            "-nic".to_string(),
            format!(
                "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22,guestfwd=tcp:10.0.2.100:80-cmd:nc 127.0.0.1 {}",
                self.ssh_port, self.http_port
            ),
        ];
        Vm::start(VmOpts {
            name: format!("update-boot{}", self.boots),
            disk: self.disk.clone(),
            format: "qcow2",
            firmware: Firmware::Uefi,
            memory_mib: 1024,
            extra,
        })
        .unwrap()
    }
}

/// Starts the update the way the timer does, and waits for the node to reboot (QEMU runs
/// with -no-reboot: the reboot ends it). Returns (seconds until the reboot began, seconds
/// the reboot took to end QEMU).
fn apply_and_wait(vm: &mut Vm, port: u16) -> (f64, f64) {
    let t = Instant::now();
    let from = vm.console().len();
    ssh(
        port,
        "sudo systemctl start --no-block clutch-update.service",
        SSH,
    )
    .unwrap();
    vm.wait_for_from(from, "clutch: update rebooting into release=", APPLY)
        .unwrap();
    let applied = t.elapsed().as_secs_f64();
    let t2 = Instant::now();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    (applied, t2.elapsed().as_secs_f64())
}

#[test]
fn releases_are_applied_committed_and_rolled_back() {
    let _one = serial_lock();
    let t_build = Instant::now();
    let v1 = build_image(&config("1", "", ""), "raw").expect("build release 1");
    // Release 2 adds a package (the etcd root filesystem the lab test also uses).
    let v2 = build_image(
        &config("2", "\"etcd-server\", \"etcd-client\"", ""),
        "update",
    )
    .expect("build release 2");
    let v3 = build_image(
        &config(
            "3",
            "\"etcd-server\", \"etcd-client\"",
            "\"init=/bin/false\"",
        ),
        "update",
    )
    .expect("build release 3");
    eprintln!(
        "built 3 releases in {:.0}s",
        t_build.elapsed().as_secs_f64()
    );
    let _cleanup = Cleanup(vec![
        out_dir(&v1),
        out_dir(&v2),
        out_dir(&v3),
        dir().join("tampered"),
        artifacts().join("update.qcow2"),
    ]);
    let (u2, u3) = (update_dir(&v2), update_dir(&v3));
    let mut sizes = String::new();
    for e in std::fs::read_dir(&u2).unwrap().flatten() {
        sizes += &format!(
            "  {} {} bytes\n",
            e.file_name().to_string_lossy(),
            e.metadata().unwrap().len()
        );
    }
    eprintln!("update set of release 2:\n{sizes}");
    // A copy of release 2 with one byte of its boot entry changed (the last file fetched:
    // the root image fetched before it is kept and reused by the real update).
    // Hard links but for the changed file: no second copy of the root image on disk.
    let tampered = dir().join("tampered");
    let _ = std::fs::remove_dir_all(&tampered);
    std::fs::create_dir_all(&tampered).unwrap();
    for e in std::fs::read_dir(&u2).unwrap().flatten() {
        std::fs::hard_link(e.path(), tampered.join(e.file_name())).unwrap();
    }
    let entry = tampered.join("clutch_2.conf.xz");
    std::fs::remove_file(&entry).unwrap();
    std::fs::copy(u2.join("clutch_2.conf.xz"), &entry).unwrap();
    let mut b = std::fs::read(&entry).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(&entry, b).unwrap();

    let mut node = Node {
        disk: overlay(&v1, "update", Some("12G")).unwrap(),
        ssh_port: free_port(),
        http_port: free_port(),
        boots: 0,
    };
    let port = node.ssh_port;

    // Release 1: the first boot, under OVMF.
    let mut vm = node.start();
    let t = Instant::now();
    let line = vm.final_phase_line(BOOT).unwrap();
    if !line.contains("phase=ready") {
        vm.fail(&format!("release 1 did not come up: {line}"));
    }
    vm.wait_for("login:", BOOT).unwrap();
    eprintln!(
        "release 1: ready and login prompt after {:.0}s",
        t.elapsed().as_secs_f64()
    );
    ssh(
        port,
        "echo persisted > ~/marker && echo clutch-loop | sudo dd of=/dev/clutch/data0 conv=fsync status=none",
        SSH,
    )
    .unwrap();
    let before = kv(&ssh(port, FACTS, SSH).unwrap());
    let s = status_json(port);
    assert_eq!(
        (s["release"].as_str(), s["slot"].as_str()),
        (Some("1"), Some("a")),
        "{s}"
    );
    assert_eq!(kv_get(&before, "root"), "/dev/vda2");
    assert!(
        kv_num(&before, "data_bytes") > 7 << 30,
        "the data partition grew to fill the disk: {before:#?}"
    );

    // A tampered release is refused, and nothing happens.
    {
        let _srv = Serve::start(&tampered, node.http_port);
        let out = ssh(port, "sudo clutch-firstboot update --now; echo rc=$?", SSH).unwrap();
        assert!(out.contains("rc=3"), "{out}");
        let s = status_json(port);
        assert_eq!(s["update"]["state"], "refused", "{s}");
        let why = s["update"]["reason"].as_str().unwrap_or_default();
        assert!(
            why.contains("clutch_2.conf.xz does not match SHA256SUMS"),
            "{s}"
        );
    }

    // Release 2 is applied and committed.
    let srv = Serve::start(&u2, node.http_port);
    let (applied, down) = apply_and_wait(&mut vm, port);
    drop(srv);
    drop(vm);
    let t = Instant::now();
    let mut vm = node.start();
    vm.wait_for("clutch: phase=ready", BOOT).unwrap();
    let up = t.elapsed().as_secs_f64();
    vm.wait_for("clutch: update committed release=2", BOOT)
        .unwrap();
    eprintln!(
        "release 2: download+write {applied:.0}s, reboot {down:.0}s, ready {up:.0}s after power-on (downtime {:.0}s)",
        down + up
    );
    let after = kv(&ssh(port, FACTS, SSH).unwrap());
    for k in [
        "node_id",
        "hostname",
        "hostkey",
        "machine_id",
        "marker",
        "loop",
    ] {
        assert_eq!(
            kv_get(&after, k),
            kv_get(&before, k),
            "{k} changed across the update"
        );
    }
    assert_eq!(kv_get(&after, "marker"), "persisted");
    assert_eq!(kv_get(&after, "loop"), "clutch-loop");
    assert_eq!(kv_get(&after, "root"), "/dev/vda3", "slot b");
    assert_eq!(
        kv_get(&after, "etcd"),
        "install ok installed",
        "release 2's package"
    );
    assert!(kv_get(&before, "etcd").is_empty(), "release 1 had no etcd");
    let s = status_json(port);
    assert_eq!(
        (s["release"].as_str(), s["slot"].as_str()),
        (Some("2"), Some("b")),
        "{s}"
    );
    assert_eq!(s["update"]["state"], "committed", "{s}");
    // systemd-bless-boot has taken the counter off the entry.
    let blessed = ssh(
        port,
        "systemctl is-active systemd-bless-boot.service; sudo ls /boot/efi/loader/entries",
        SSH,
    )
    .unwrap();
    assert!(blessed.contains("clutch_2.conf"), "{blessed}");

    // Back to release 1 by command (the node reboots: started without waiting for it).
    let from = vm.console().len();
    ssh(
        port,
        "sudo systemd-run --no-block --unit=clutch-rollback-test clutch-firstboot update --rollback",
        SSH,
    )
    .unwrap();
    vm.wait_for_from(from, "clutch: update rolled-back release=2", SSH)
        .unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    drop(vm);
    let t = Instant::now();
    let mut vm = node.start();
    vm.wait_for("clutch: phase=ready", BOOT).unwrap();
    eprintln!(
        "rollback by command: release 1 ready {:.0}s after power-on",
        t.elapsed().as_secs_f64()
    );
    let s = status_json(port);
    assert_eq!(
        (s["release"].as_str(), s["slot"].as_str()),
        (Some("1"), Some("a")),
        "{s}"
    );
    assert_eq!(s["update"]["last"]["result"], "rolled-back", "{s}");
    assert_eq!(s["update"]["last"]["release"], "2", "{s}");
    let back = kv(&ssh(port, FACTS, SSH).unwrap());
    for k in ["node_id", "hostkey", "marker", "loop"] {
        assert_eq!(
            kv_get(&back, k),
            kv_get(&before, k),
            "{k} after the rollback"
        );
    }
    assert_eq!(kv_get(&back, "root"), "/dev/vda2", "slot a again");
    assert!(kv_get(&back, "etcd").is_empty(), "release 1 has no etcd");

    // Release 3 cannot start init: every trial boot panics, then systemd-boot goes back.
    let srv = Serve::start(&u3, node.http_port);
    let (applied3, _) = apply_and_wait(&mut vm, port);
    drop(srv);
    drop(vm);
    let t = Instant::now();
    let mut panics = 0;
    let mut vm = loop {
        let mut vm = node.start();
        match vm.wait_for("clutch: update rolled-back release=3", BOOT) {
            Ok(_) => break vm,
            Err(_) if vm.console().contains("Kernel panic") && panics < 3 => {
                panics += 1;
                vm.wait_exit(Duration::from_secs(60)).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    };
    eprintln!(
        "release 3: download+write {applied3:.0}s; {panics} panicking trial boots, back on release 1 after {:.0}s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        panics, 2,
        "two trial boots (TriesLeft=2), then the fallback"
    );
    vm.wait_for("clutch: phase=ready", BOOT).unwrap();
    let s = status_json(port);
    assert_eq!(
        (s["release"].as_str(), s["slot"].as_str()),
        (Some("1"), Some("a")),
        "{s}"
    );
    assert_eq!(s["update"]["state"], "rolled-back", "{s}");
    assert_eq!(s["update"]["release"], "3", "{s}");
    let why = s["update"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("release 3 never came up on slot b"), "{s}");
    let back = kv(&ssh(port, FACTS, SSH).unwrap());
    assert_eq!(kv_get(&back, "node_id"), kv_get(&before, "node_id"));
    assert_eq!(kv_get(&back, "hostkey"), kv_get(&before, "hostkey"));
    // It is not tried again.
    let srv = Serve::start(&u3, node.http_port);
    let out = ssh(port, "sudo clutch-firstboot update --now; echo rc=$?", SSH).unwrap();
    drop(srv);
    assert!(out.contains("rc=3"), "{out}");
    let s = status_json(port);
    assert!(
        s["update"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("release 3 failed on this node before"),
        "{s}"
    );
    drop(vm);
    eprintln!("whole test: {:.0}s", t_build.elapsed().as_secs_f64());
}

/// Removes the test's images when dropped, also when the test fails (CI's disk is small;
/// the console logs stay): the overlay holds two written slots, each build its image or
/// root image. `CLUTCH_KEEP_IMAGES=1` keeps them for a look.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::env::var_os("CLUTCH_KEEP_IMAGES").is_some() {
            return;
        }
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// The build's output folder (`target/qemu-tests/out/<name>`) of a main artifact.
fn out_dir(main: &Path) -> PathBuf {
    let out = artifacts().join("out");
    main.ancestors()
        .find(|a| a.parent() == Some(out.as_path()))
        .unwrap_or_else(|| panic!("{} is not in {}", main.display(), out.display()))
        .to_path_buf()
}
