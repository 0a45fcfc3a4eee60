//! A diskless amd64 VM netboots the `pxe` set: QEMU's iPXE ROM gets DHCP and a small chain
//! script over the user-mode network's built-in TFTP, which chains `boot.ipxe` from
//! `clutch serve` on the host's loopback; live-boot's initrd fetches `rootfs.squashfs`; then
//! clutch-firstboot fetches the node config for the VM's MAC and the node reaches
//! `phase=ready` with the hostname served for that MAC.
//!
//! The guest's network is `restrict=on` (no way out); its only route to the host is a
//! `guestfwd` from 10.0.2.100:80 to `clutch serve` on 127.0.0.1 (through `nc -N`, package
//! netcat-openbsd, one process per connection).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clutch_qemu_tests::*;

const BOOT: Duration = Duration::from_secs(600);
const MAC: &str = "52:54:00:c1:a0:01";

/// `clutch serve` on a free loopback port, killed (by its pid) when dropped.
struct Serve {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let mut child = Command::new(bin("clutch"))
            .arg("serve")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start clutch serve");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first.trim().trim_end_matches('/').to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "serve said {first:?}");
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Serve { child, url, log }
    }

    fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_size(dir: &Path) -> u64 {
    [
        "vmlinuz",
        "initrd.img",
        "rootfs.squashfs",
        "boot.ipxe",
        "clutch.toml",
    ]
    .iter()
    .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
    .sum()
}

#[test]
fn netboots_with_ipxe_and_gets_its_config_by_mac() {
    let cfg = test_config("amd64-vm", "netboot", |t| t);
    let boot_ipxe = build_image(&cfg, "pxe").expect("build the netboot set");
    let set: PathBuf = boot_ipxe.parent().unwrap().to_path_buf();
    assert_eq!(set.file_name().unwrap(), "pxe");
    for f in ["vmlinuz", "initrd.img", "rootfs.squashfs", "boot.ipxe"] {
        assert!(set.join(f).is_file(), "{f} missing in {}", set.display());
    }
    let sums = std::fs::read_to_string(set.parent().unwrap().join("SHA256SUMS")).unwrap();
    for f in [
        "pxe/vmlinuz",
        "pxe/initrd.img",
        "pxe/rootfs.squashfs",
        "pxe/boot.ipxe",
    ] {
        assert!(
            sums.contains(&format!("  {f}\n")),
            "{f} not in SHA256SUMS:\n{sums}"
        );
    }
    let size = set_size(&set);
    eprintln!("netboot set: {} MiB", size >> 20);

    // This VM's config: the built one with a fixed hostname; others would get the built one.
    let built = std::fs::read_to_string(set.join("clutch.toml")).unwrap();
    let mine = built.replace("hostname = \"node-{id}\"", "hostname = \"rack-a1\"");
    assert_ne!(
        built, mine,
        "the built config has no hostname template to replace"
    );
    std::fs::create_dir_all(set.join("config")).unwrap();
    let mac12 = MAC.replace(':', "");
    std::fs::write(set.join(format!("config/{mac12}.toml")), mine).unwrap();

    // The TFTP folder only holds the chain script that points iPXE at the server.
    let tftp = artifacts().join("netboot-tftp");
    std::fs::create_dir_all(&tftp).unwrap();
    std::fs::write(
        tftp.join("chain.ipxe"),
        "#!ipxe\nset clutch-url http://10.0.2.100\nchain ${clutch-url}/boot.ipxe\n",
    )
    .unwrap();
    // A local disk with an ext4 labelled clutch-storage: the loopback storage goes there
    // (the VM boots from the network; -boot n).
    let disk = artifacts().join("netboot-disk.img");
    let _ = std::fs::remove_file(&disk);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "clutch-storage"])
        .arg(&disk)
        .arg("3G")
        .status()
        .unwrap();
    assert!(st.success());

    let _one = serial_lock();
    let serve = Serve::start(&set);
    let t = Instant::now();
    let mut vm = Vm::start(VmOpts {
        name: "netboot".into(),
        disk,
        format: "raw",
        firmware: Firmware::Bios,
        memory_mib: 2048,
        extra: vec![
            "-boot".into(),
            "n".into(),
            "-nic".into(),
            format!(
                "user,model=virtio-net-pci,mac={MAC},restrict=on,tftp={},bootfile=chain.ipxe,guestfwd=tcp:10.0.2.100:80-cmd:nc -N 127.0.0.1 {}",
                tftp.display(),
                serve.port()
            ),
        ],
    })
    .unwrap();
    let at = vm.wait_for("clutch: phase=", BOOT).unwrap();
    let first = vm.console()[at..]
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "first phase line after {:.0}s: phase={first}",
        t.elapsed().as_secs_f64()
    );
    vm.wait_for("clutch: phase=ready host=rack-a1 ", BOOT)
        .unwrap();
    let ready = t.elapsed().as_secs_f64();
    eprintln!(
        "netboot: power-on to phase=ready in {ready:.0}s (set {} MiB)",
        size >> 20
    );
    let log = serve.log.lock().unwrap().clone();
    for want in [
        "path=/boot.ipxe status=200",
        "path=/vmlinuz status=200",
        "path=/initrd.img status=200",
        "path=/rootfs.squashfs status=200",
        "path=/config/52-54-00-c1-a0-01 status=200",
    ] {
        assert!(log.contains(want), "serve did not log `{want}`:\n{log}");
    }
    assert!(
        log.contains(&format!("file=config/{mac12}.toml")),
        "the config for the MAC was not the one served:\n{log}"
    );
    vm.kill();
    drop(serve);
}
