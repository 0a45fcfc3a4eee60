//! Power cuts during first boot (issue 8): the VM is killed (SIGKILL of QEMU, so the guest's
//! page cache is lost) at known points of clutch-firstboot and booted again on the same
//! disk; the node always comes back to `phase=ready` with the same node id, host name and
//! loopback data.
//!
//! clutch.toml carries a password hash, a secret firstboot moves off the FAT partition at
//! boot 2 (rewriting clutch.toml there) a few seconds before that boot's cut: the rewritten
//! file must survive the cut and the ESP's fsck at the next boot (vfat writes a renamed
//! file's directory entry only with the file's own metadata).
//!
//! The points are clutch-firstboot's hold points (firstboot/src/hold.rs), asked for with the
//! systemd credential `clutch.hold` passed as an SMBIOS type 11 string: firstboot prints
//! `clutch: hold=<point>` and waits there, and the test cuts the power. Deterministic: the
//! cut always lands at the same place, whatever the speed of the machine.
//!
//! One image, one disk (bigger than the image, so the root grows), six boots:
//!  1. hold=hostname (node id written, host name not yet)  -> cut
//!  2. hold=grow (partition table grown, file system not)   -> cut
//!  3. hold=loop (backing file made, not attached)          -> cut
//!  4. normal: ready; write a pattern to /dev/clutch/data0, sync
//!  5. hold=loop again (data on the backing file)           -> cut
//!  6. normal: ready, same identity, pattern intact, root grown; then a last cut while
//!     idle, and on the host the root file system replays its journal and fscks clean.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clutch_qemu_tests::*;

/// Power on to firstboot's hold line or phase line (TCG, one vCPU).
const BOOT: Duration = Duration::from_secs(420);
const SSH: Duration = Duration::from_secs(240);
const GIB: u64 = 1 << 30;
const DISK: &str = "6G";
/// Bytes of the pattern written at the start of data0 (and 1 MiB at its end).
const PATTERN_BYTES: u64 = 4 << 20;
/// The user's password hash in clutch.toml (a secret moved off the FAT partition).
const HASH: &str = "$y$j9T$powerCutSalt012$AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefg";

/// The host name in the first `clutch: phase=<phase> host=<name>` line from `from`.
fn phase_line(vm: &mut Vm, phase: &str) -> (String, usize) {
    let needle = format!("clutch: phase={phase} host=");
    let end = vm.wait_for(&needle, BOOT).unwrap();
    let eol = vm.wait_for_from(end, "\n", BOOT).unwrap();
    let rest = vm.console()[end..eol].trim().to_string();
    let host = rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (host, eol)
}

/// The final phase (the first that is not `configuring`) and its host name.
fn final_phase(vm: &mut Vm) -> (String, String) {
    let line = vm.final_phase_line(BOOT).unwrap();
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_default()
            .to_string()
    };
    (field("phase="), field("host="))
}

/// Identity, storage, root size, status; the pattern's checksum as read from data0.
const NODE_FACTS: &str = r#"set -e
echo hostname=$(hostname)
echo node_id=$(sudo cat /var/lib/clutch/node-id)
echo machine_id=$(cat /etc/machine-id)
echo host_key=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)
echo phase=$(sed -n 's/^ *"phase": *"\([a-z]*\)".*/\1/p' /run/clutch/status.json)
echo status_node_id=$(sed -n 's/^ *"node_id": *"\([0-9a-f]*\)".*/\1/p' /run/clutch/status.json)
echo data0_target=$(readlink /dev/clutch/data0)
echo data0_bytes=$(sudo blockdev --getsize64 /dev/clutch/data0)
echo data0_backing=$(cat /sys/block/$(basename $(readlink -f /dev/clutch/data0))/loop/backing_file)
echo data0_head=$(sudo head -c PATTERN_BYTES /dev/clutch/data0 | sha256sum | cut -d' ' -f1)
echo data0_tail=$(sudo tail -c 1048576 /dev/clutch/data0 | sha256sum | cut -d' ' -f1)
root=$(findmnt -no SOURCE /)
echo root_dev=$root
echo root_start_bytes=$(( $(cat /sys/class/block/$(basename $root)/start) * 512 ))
echo disk_bytes=$(sudo blockdev --getsize64 /dev/vda)
echo root_part_bytes=$(sudo blockdev --getsize64 $root)
echo root_fs_bytes=$(sudo dumpe2fs -h $root 2>/dev/null | awk -F: '/^Block count/{c=$2} /^Block size/{s=$2} END{print c*s}')
echo grow_done=$(sudo test -e /var/lib/clutch/done/grow-root && echo yes || echo no)
echo unit_result=$(systemctl show -p Result --value clutch-firstboot)
echo fat_version_lines=$(sudo grep -c '^version = 1' /boot/efi/clutch.toml || true)
echo fat_hash_lines=$(sudo grep -c 'password_hash' /boot/efi/clutch.toml || true)
echo stored_hash=$(sudo cat /var/lib/clutch/password-hash)
"#;

fn node_facts(port: u16) -> BTreeMap<String, String> {
    kv(&ssh(
        port,
        &NODE_FACTS.replace("PATTERN_BYTES", &PATTERN_BYTES.to_string()),
        SSH,
    )
    .unwrap())
}

/// One boot's record for the summary.
struct Boot {
    what: String,
    secs: f64,
}

#[test]
fn power_cuts_during_first_boot_keep_identity_and_data() {
    let _one = serial_lock();
    let t0 = Instant::now();
    let cfg = test_config("amd64-vm", "powercut", |t| {
        assert!(
            t.contains("name = \"data0\"") && t.contains("size = \"2GiB\""),
            "image-configs/amd64-vm.toml no longer has the 2 GiB data0 device:\n{t}"
        );
        assert!(
            t.contains("\nname = \"admin\"\n"),
            "image-configs/amd64-vm.toml no longer has user admin:\n{t}"
        );
        t.replace(
            "\nname = \"admin\"\n",
            &format!("\nname = \"admin\"\npassword_hash = \"{HASH}\"\n"),
        )
    });
    let img = build_image(&cfg, "raw").expect("build the power-cut test image");
    let disk = overlay(&img, "powercut", Some(DISK)).unwrap();
    let mut boots: Vec<Boot> = Vec::new();
    let vm_opts = |name: String, extra: Vec<String>| VmOpts {
        name,
        disk: disk.clone(),
        format: "qcow2",
        firmware: Firmware::Bios,
        memory_mib: 1024,
        extra,
    };

    // ---- boots 1-3 and 5: hold at a point, then cut the power there.
    let mut host: Option<String> = None;
    let cut_at = |point: &str, n: usize, host: &mut Option<String>, boots: &mut Vec<Boot>| {
        let t = Instant::now();
        let mut extra = smbios_credential("clutch.hold", point);
        extra.extend(["-nic".to_string(), "none".to_string()]);
        let mut vm = Vm::start(vm_opts(format!("powercut-{n}-{point}"), extra)).unwrap();
        let (planned, from) = phase_line(&mut vm, "configuring");
        // The hold line; a phase line instead (a node that no longer loads its config ends
        // `failed`) fails the test at once.
        let mut from = from;
        loop {
            let next = vm
                .wait_for_from(from, "clutch: ", BOOT)
                .unwrap_or_else(|e| vm.fail(&format!("{e:#}")));
            // The whole line: the console arrives in chunks.
            let eol = vm
                .wait_for_from(next, "\n", BOOT)
                .unwrap_or_else(|e| vm.fail(&format!("{e:#}")));
            let line = vm.console()[next..eol].trim().to_string();
            if line == format!("hold={point}") {
                break;
            }
            if line.starts_with("phase=") {
                vm.fail(&format!(
                    "boot {n}: `clutch: {line}` before `clutch: hold={point}`"
                ));
            }
            from = eol;
        }
        let secs = t.elapsed().as_secs_f64();
        // The power cut: SIGKILL to QEMU, whatever the guest had not written is gone.
        vm.kill();
        eprintln!("boot {n}: hold={point} after {secs:.0}s, host {planned}; power cut");
        match host {
            None => *host = Some(planned),
            Some(h) => {
                if *h != planned {
                    vm.fail(&format!(
                        "boot {n} planned host {planned}, earlier boots {h}"
                    ));
                }
            }
        }
        boots.push(Boot {
            what: format!("{n}: hold={point}, cut"),
            secs,
        });
    };
    cut_at("hostname", 1, &mut host, &mut boots);
    cut_at("grow", 2, &mut host, &mut boots);
    cut_at("loop", 3, &mut host, &mut boots);
    let host = host.expect("a host name from boot 1");

    // ---- boot 4: normal, ready; data onto the loopback device.
    let ready_boot = |n: usize, boots: &mut Vec<Boot>| -> (Vm, u16) {
        let port = free_port();
        let t = Instant::now();
        let mut vm = Vm::start(vm_opts(
            format!("powercut-{n}-ready"),
            user_net_with_ssh(port),
        ))
        .unwrap();
        let (phase, h) = final_phase(&mut vm);
        let secs = t.elapsed().as_secs_f64();
        eprintln!("boot {n}: phase={phase} host={h} after {secs:.0}s");
        if phase != "ready" || h != host {
            vm.fail(&format!(
                "boot {n}: expected phase=ready host={host}, got phase={phase} host={h}"
            ));
        }
        boots.push(Boot {
            what: format!("{n}: normal, phase=ready"),
            secs,
        });
        (vm, port)
    };
    let (vm, port) = ready_boot(4, &mut boots);
    let before = node_facts(port);
    eprintln!("boot 4, guest facts: {before:#?}");
    assert_eq!(kv_get(&before, "hostname"), host);
    let node_id = kv_get(&before, "node_id").to_string();
    assert!(
        node_id.len() == 32 && node_id.starts_with(&host[5..]),
        "host {host} is not made from node id {node_id}"
    );
    assert_eq!(kv_get(&before, "status_node_id"), node_id);
    assert_eq!(kv_get(&before, "phase"), "ready");
    assert_eq!(kv_get(&before, "unit_result"), "success");
    assert!(kv_get(&before, "data0_target").starts_with("/dev/loop"));
    assert_eq!(kv_num(&before, "data0_bytes"), 2 * GIB);

    // A pattern only this node writes, at the start and at the end of the device, synced.
    let wrote = kv(&ssh(
        port,
        &format!(
            "set -e\n\
             yes 'clutch power cut {node_id}' | head -c {PATTERN_BYTES} > /tmp/pattern\n\
             sudo dd if=/tmp/pattern of=/dev/clutch/data0 bs=1M conv=fsync status=none\n\
             head -c 1048576 /tmp/pattern | sudo dd of=/dev/clutch/data0 bs=1M seek=2047 conv=fsync status=none\n\
             sync\n\
             echo head=$(sha256sum < /tmp/pattern | cut -d' ' -f1)\n\
             echo tail=$(head -c 1048576 /tmp/pattern | sha256sum | cut -d' ' -f1)\n\
             echo read_head=$(sudo head -c {PATTERN_BYTES} /dev/clutch/data0 | sha256sum | cut -d' ' -f1)\n"
        ),
        SSH,
    )
    .unwrap());
    assert_eq!(
        kv_get(&wrote, "read_head"),
        kv_get(&wrote, "head"),
        "pattern not on data0"
    );
    drop(vm); // power cut while idle (the data was synced)

    // ---- boot 5: hold in loop setup with data on the backing file -> cut.
    let mut host_again = Some(host.clone());
    cut_at("loop", 5, &mut host_again, &mut boots);

    // ---- boot 6: normal; everything as it was.
    let (mut vm, port) = ready_boot(6, &mut boots);
    let after = node_facts(port);
    eprintln!("boot 6, guest facts: {after:#?}");
    for k in [
        "hostname",
        "node_id",
        "machine_id",
        "host_key",
        "data0_backing",
    ] {
        assert_eq!(kv_get(&after, k), kv_get(&before, k), "{k} changed");
    }
    assert_eq!(kv_get(&after, "status_node_id"), node_id);
    assert_eq!(kv_get(&after, "phase"), "ready");
    assert_eq!(kv_get(&after, "unit_result"), "success");
    assert_eq!(kv_num(&after, "data0_bytes"), 2 * GIB);
    assert_eq!(
        kv_get(&after, "data0_head"),
        kv_get(&wrote, "head"),
        "data0's first {PATTERN_BYTES} bytes changed"
    );
    assert_eq!(
        kv_get(&after, "data0_tail"),
        kv_get(&wrote, "tail"),
        "data0's last MiB changed"
    );
    // Root grown through the cut between partition and file system: the partition reaches
    // the (1 MiB aligned) end of the disk, the file system fills the partition.
    let disk_bytes = kv_num(&after, "disk_bytes");
    assert_eq!(disk_bytes, 6 * GIB);
    let start = kv_num(&after, "root_start_bytes");
    let part = kv_num(&after, "root_part_bytes");
    assert!(
        start + part >= disk_bytes - (2 << 20),
        "root partition not grown: {start}+{part} on a {disk_bytes}-byte disk"
    );
    assert_eq!(
        kv_num(&after, "root_fs_bytes"),
        part,
        "ext4 not grown to the partition"
    );
    assert_eq!(kv_get(&after, "grow_done"), "yes");
    // clutch.toml on the ESP: rewritten without the hash at boot 2, intact after its cut.
    assert_eq!(kv_get(&after, "fat_version_lines"), "1", "{after:#?}");
    assert_eq!(kv_get(&after, "fat_hash_lines"), "0", "{after:#?}");
    assert_eq!(kv_get(&after, "stored_hash"), HASH);

    // ---- a last cut while the node runs, then on the host: the root file system replays its
    // journal and is consistent.
    vm.kill();
    drop(vm);
    let t = Instant::now();
    let fsck = fsck_root(&disk, start);
    eprintln!(
        "host fsck of the root file system after the last cut ({:.0}s): {fsck}",
        t.elapsed().as_secs_f64()
    );

    eprintln!("power-cut boots (TCG):");
    for b in &boots {
        eprintln!("  boot {:<28} {:>5.0}s", b.what, b.secs);
    }
    eprintln!("power-cut test took {:.0}s", t0.elapsed().as_secs_f64());
}

/// Copies the root partition out of the overlay (sparse raw), replays the root file system's journal
/// (`e2fsck -E journal_only`) and checks it read-only (`e2fsck -fn`); panics unless clean.
fn fsck_root(disk: &Path, root_start: u64) -> String {
    let raw = artifacts().join("powercut-fsck.img");
    let _ = std::fs::remove_file(&raw);
    let run = |c: &mut Command| {
        let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        (
            o.status,
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    // Only the root partition (the raw driver's `offset` over the qcow2 overlay): e2fsck's
    // own `file?offset=` does not survive the re-open after a journal replay.
    let opts = format!(
        "driver=raw,offset={root_start},file.driver=qcow2,file.file.driver=file,file.file.filename={}",
        disk.display()
    );
    let (st, out) = run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", "--image-opts", &opts])
        .arg(&raw));
    assert!(st.success(), "qemu-img convert: {out}");
    let dev = raw.display().to_string();
    let (st, out) = run(Command::new("e2fsck").args(["-E", "journal_only", "-p", &dev]));
    // 0: nothing to do, 1: the journal was replayed.
    assert!(
        matches!(st.code(), Some(0) | Some(1)),
        "journal replay: {st}: {out}"
    );
    let (st, check) = run(Command::new("e2fsck").args(["-f", "-n", &dev]));
    let _ = std::fs::remove_file(&raw);
    assert!(
        st.success(),
        "root file system not clean after the power cut ({st}):\n{check}"
    );
    check
        .lines()
        .find(|l| l.contains(" files ("))
        .unwrap_or_default()
        .trim()
        .to_string()
}
