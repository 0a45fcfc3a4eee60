//! clutch-firstboot on a real booted amd64 image (issue 3):
//! - A: the node names itself from the template, attaches the 2 GiB loopback device as
//!   `/dev/clutch/data0`, grows the root file system to a bigger disk, moves the wifi secret
//!   off the FAT partition and reaches `phase=ready`; after a power cycle it keeps its
//!   identity and its device. Time to `ready` and peak memory go to the log.
//! - B: a broken `clutch.toml` ends in `phase=failed` with the error (file:line:col and the
//!   key) in the status, and the node still boots and takes ssh logins.
//!
//! The image's user is `operator`, a name Debian's base system has as a group: it builds,
//! boots, and every ssh login below is `operator@node` with the configured key. Its time
//! zone is `America/New_York`. The booted image's /etc/passwd and /etc/group are held
//! against what `clutch check` knows, so check and build agree on the real image.
//!
//! Case A's card also carries what Raspberry Pi Imager and Raspberry Pi OS users put on the
//! boot partition (a `custom.toml` with a hash and no `password_encrypted`, a locale as
//! keymap and a country-only `[wlan]`; Imager 2.x's cloud-init `meta-data`, `user-data`
//! and `network-config`): the node is `ready` with warnings, the cloud-init user logs in
//! with its key, and after power-off the raw FAT partition holds no byte of the cluster
//! token, the wifi keys or the password hashes.
//!
//! One image build and three boots in all (TCG: each boot costs a minute or more).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clutch_qemu_tests::*;

const BOOT: Duration = Duration::from_secs(480);
const SSH: Duration = Duration::from_secs(240);
/// The ESP starts at 1 MiB on the amd64 image.
const GIB: u64 = 1 << 30;
const WIFI_PASSPHRASE: &str = "clutch-test-passphrase";
/// The image's login user: a group of Debian's base system, not a user.
const USER: &str = "operator";
/// The image's cluster token: engine `none`, one node, so the node still comes to `ready`.
const TOKEN: &str = "5f0c2a9e71d48b36e0a4c9d2f7b1186a3d5e9c0b2f4a6d8e1c3b5a7f9e0d2c4b";
/// clutch.toml's password hash for the image user (moved off the card at first boot).
const HASH: &str = "$y$j9T$clutchQemuSalt0$AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefg";
/// custom.toml's user and hash (no `password_encrypted`: Raspberry Pi OS reads it as a hash).
const KEEPER_HASH: &str = "$y$j9T$keeperSalt012345$QwErTyUiOpAsDfGhJkLzXcVbNm9876543210zyxwv";
/// network-config's wifi passphrase (Imager writes the derived key; a person may not).
const NET_PASSPHRASE: &str = "cloud-init-passphrase-42";

/// [`ssh_as`] the image's user.
fn ssh(port: u16, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
    ssh_as(port, USER, cmd, timeout)
}

/// The amd64-vm test config with a `[wifi]` section (a secret to move off the FAT
/// partition); it keeps the image config's 2 GiB `data0` loopback device.
fn image() -> PathBuf {
    static IMG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let cfg = test_config("amd64-vm", "firstboot", |t| {
            assert!(
                t.contains("name = \"data0\"") && t.contains("size = \"2GiB\""),
                "image-configs/amd64-vm.toml no longer has the 2 GiB data0 device:\n{t}"
            );
            assert!(
                t.contains("\nname = \"admin\"\n") && t.contains("\ntimezone = \"UTC\"\n"),
                "image-configs/amd64-vm.toml no longer has user admin and zone UTC:\n{t}"
            );
            let t = t
                .replace(
                    "\nname = \"admin\"\n",
                    &format!("\nname = \"{USER}\"\npassword_hash = \"{HASH}\"\n"),
                )
                .replace("\ntimezone = \"UTC\"\n", "\ntimezone = \"America/New_York\"\n");
            format!(
                "{t}\n[wifi]\nssid = \"clutch-test\"\npsk = \"{WIFI_PASSPHRASE}\"\ncountry = \"GB\"\n\n\
                 [cluster]\nname = \"solo\"\nengine = \"none\"\ntoken = \"{TOKEN}\"\nexpected_size = 1\n"
            )
        });
        build_image(&cfg, "raw").expect("build the firstboot test image")
    })
    .clone()
}

/// `clutch.toml` as it is on the image's FAT partition.
fn fat_clutch_toml(img: &Path) -> String {
    mtools(&["mtype", "-i", &fat(img), "::/clutch.toml"])
}

fn is_node_hostname(h: &str) -> bool {
    h.len() == 11
        && h.starts_with("node-")
        && h[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn final_phase_line(vm: &mut Vm) -> String {
    vm.final_phase_line(BOOT).unwrap()
}

fn assert_with_console(vm: &Vm, ok: bool, what: &str) {
    if !ok {
        vm.fail(what);
    }
}

/// What the guest reports about identity, storage, root size and status.
const NODE_FACTS: &str = r#"set -e
echo hostname=$(hostname)
echo etc_hostname=$(cat /etc/hostname)
echo node_id=$(sudo cat /var/lib/clutch/node-id)
echo machine_id=$(cat /etc/machine-id)
echo data0_target=$(readlink /dev/clutch/data0)
if [ -b /dev/clutch/data0 ]; then echo data0_is_block=yes; else echo data0_is_block=no; fi
echo data0_bytes=$(sudo blockdev --getsize64 /dev/clutch/data0)
echo data0_backing=$(cat /sys/block/$(basename $(readlink -f /dev/clutch/data0))/loop/backing_file)
root=$(findmnt -no SOURCE /)
echo root_dev=$root
echo disk_bytes=$(sudo blockdev --getsize64 /dev/vda)
echo root_part_bytes=$(sudo blockdev --getsize64 $root)
echo root_fs_bytes=$(sudo dumpe2fs -h $root 2>/dev/null | awk -F: '/^Block count/{c=$2} /^Block size/{s=$2} END{print c*s}')
echo df_bytes=$(df -B1 --output=size / | tail -1)
echo phase=$(sed -n 's/^ *"phase": *"\([a-z]*\)".*/\1/p' /run/clutch/status.json)
echo host_keys=$(ls /etc/ssh/ssh_host_*_key.pub | sed 's|.*/ssh_host_||; s|_key.pub||' | sort | tr '\n' ,)
"#;

#[test]
fn first_boot_configures_the_node_and_a_power_cycle_keeps_it() {
    let t0 = Instant::now();
    let _one = serial_lock();
    let img = image();
    let built_fat = fat_clutch_toml(&img);
    let psk_hex = built_fat
        .lines()
        .find_map(|l| l.trim().strip_prefix("psk = "))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no psk in the image's clutch.toml:\n{built_fat}"));
    assert!(
        psk_hex.len() == 64 && psk_hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "the image carries the derived WPA key, not the passphrase: {psk_hex}"
    );
    assert!(!built_fat.contains(WIFI_PASSPHRASE));

    // The card as a Raspberry Pi Imager / Raspberry Pi OS user leaves it.
    let card = artifacts().join("firstboot-a.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&card)
        .status()
        .unwrap();
    assert!(st.success());
    let key = ssh_key().public_line.clone();
    let inputs = [
        (
            "custom.toml",
            format!(
                "config_version = 1\n\n[user]\nname = \"keeper\"\npassword = \"{KEEPER_HASH}\"\n\n\
                 [wlan]\ncountry = \"gb\"\n\n[locale]\nkeymap = \"en_US.UTF-8\"\n"
            ),
        ),
        (
            "meta-data",
            "instance-id: rpi-imager-1767225600000\n".to_string(),
        ),
        (
            "user-data",
            format!(
                "#cloud-config\nmanage_etc_hosts: true\nuser:\n  name: cloudy\n  shell: /bin/bash\n  lock_passwd: true\n  \
                 ssh_authorized_keys:\n    - \"{key}\"\n  sudo: ALL=(ALL) NOPASSWD:ALL\nssh_pwauth: false\n"
            ),
        ),
        (
            "network-config",
            format!(
                "network:\n  version: 2\n  wifis:\n    wlan0:\n      dhcp4: true\n      regulatory-domain: \"GB\"\n      \
                 access-points:\n        \"cloud-net\":\n          hidden: true\n          password: \"{NET_PASSPHRASE}\"\n      optional: true\n"
            ),
        ),
    ];
    for (name, text) in &inputs {
        let f = artifacts().join(format!("firstboot-a-{name}"));
        std::fs::write(&f, text).unwrap();
        mtools(&[
            "mcopy",
            "-o",
            "-i",
            &fat(&card),
            f.to_str().unwrap(),
            &format!("::/{name}"),
        ]);
    }
    assert!(fat_clutch_toml(&card).contains(TOKEN));
    let disk = overlay(&card, "firstboot-a", Some("6G")).unwrap();
    let port = free_port();
    let opts = |name: &str| VmOpts {
        name: name.into(),
        disk: disk.clone(),
        format: "qcow2",
        firmware: Firmware::Bios,
        memory_mib: 1024,
        extra: user_net_with_ssh(port),
    };

    // ---- first boot
    let boot = Instant::now();
    let mut vm = Vm::start(opts("firstboot-a")).unwrap();
    let line = final_phase_line(&mut vm);
    assert_with_console(
        &vm,
        line.starts_with("clutch: phase=discovering host=node-"),
        &format!("expected phase=discovering (a one-node cluster), got `{line}`"),
    );
    vm.wait_for("clutch: phase=ready host=node-", BOOT).unwrap();
    eprintln!(
        "first boot: phase=ready {:.0}s after power on",
        boot.elapsed().as_secs_f64()
    );
    vm.wait_for("login:", BOOT).unwrap();
    eprintln!(
        "first boot: login prompt after {:.0}s",
        boot.elapsed().as_secs_f64()
    );

    let facts = kv(&ssh(port, NODE_FACTS, SSH).unwrap());
    eprintln!("first boot, guest facts: {facts:#?}");
    let host = kv_get(&facts, "hostname").to_string();
    assert!(
        is_node_hostname(&host),
        "hostname `{host}` is not node-XXXXXX"
    );
    assert_eq!(kv_get(&facts, "etc_hostname"), host);
    let node_id = kv_get(&facts, "node_id").to_string();
    assert!(
        node_id.starts_with(&host[5..]),
        "{host} is not from node id {node_id}"
    );
    assert_eq!(kv_get(&facts, "machine_id").len(), 32);
    assert_ne!(kv_get(&facts, "machine_id"), node_id);
    assert_eq!(
        kv_get(&facts, "host_keys"),
        "ecdsa,ed25519,",
        "ssh host keys made at first boot: Ed25519 and ECDSA, no RSA"
    );
    assert_eq!(kv_get(&facts, "data0_is_block"), "yes");
    assert!(kv_get(&facts, "data0_target").starts_with("/dev/loop"));
    assert_eq!(kv_num(&facts, "data0_bytes"), 2 * GIB);
    assert_eq!(
        kv_get(&facts, "data0_backing"),
        "/var/lib/clutch/storage/data0.img"
    );
    // Root grown: the partition reaches the (1 MiB aligned) end of the 6 GiB disk, minus
    // the ESP and the GPT backup; the ext4 file system fills the partition.
    let disk_bytes = kv_num(&facts, "disk_bytes");
    assert_eq!(disk_bytes, 6 * GIB);
    let part = kv_num(&facts, "root_part_bytes");
    assert!(
        part >= disk_bytes - (258 << 20) - (1 << 20),
        "root partition not grown: {part} bytes on a {disk_bytes}-byte disk"
    );
    assert_eq!(
        kv_num(&facts, "root_fs_bytes"),
        part,
        "ext4 not grown to the partition"
    );
    assert!(kv_num(&facts, "df_bytes") > 5 * GIB, "df / is too small");
    assert_eq!(kv_get(&facts, "phase"), "ready");

    // The user named like a base-system group: primary group `users`, sudo as configured,
    // not a member of the group `operator`; the zone the config named.
    let who = kv(&ssh(
        port,
        "echo id=$(id)\necho sudo=$(sudo -n id -un)\necho operator_group=$(getent group operator)\n\
         echo localtime=$(readlink /etc/localtime)\necho zone=$(env -u TZ date -d @1700000000 +%Z)\n",
        SSH,
    )
    .unwrap());
    assert_eq!(
        kv_get(&who, "id"),
        "uid=1000(operator) gid=100(users) groups=100(users),27(sudo)"
    );
    assert_eq!(kv_get(&who, "sudo"), "root");
    assert_eq!(kv_get(&who, "operator_group"), "operator:x:37:");
    assert_eq!(
        kv_get(&who, "localtime"),
        "/usr/share/zoneinfo/America/New_York"
    );
    assert_eq!(kv_get(&who, "zone"), "EST", "November 2023 in New York");
    accounts_are_known_to_check(
        &ssh(port, "cat /etc/passwd", SSH).unwrap(),
        &ssh(port, "cat /etc/group", SSH).unwrap(),
    );

    boot_partition_inputs_were_applied(port);

    // Secrets: nowhere on the FAT partition, in /var/lib/clutch with mode 0600.
    let secrets = kv(&ssh(
        port,
        &format!(
            "echo fat_psk_lines=$(sudo grep -c '^ *psk' /boot/efi/clutch.toml || true)\n\
             echo fat_files_with_key=$(sudo grep -rlF {psk_hex} /boot/efi | wc -l)\n\
             echo fat_ssid=$(sudo grep -c clutch-test /boot/efi/clutch.toml || true)\n\
             echo stored_psk=$(sudo cat /var/lib/clutch/wifi-psk)\n\
             echo stored_mode=$(sudo stat -c %a /var/lib/clutch/wifi-psk)\n\
             echo state_dir_mode=$(sudo stat -c %a /var/lib/clutch)\n\
             echo wpa_mode=$(sudo stat -c %a /etc/wpa_supplicant/wpa_supplicant-wlan0.conf)\n\
             echo wpa_has_key=$(sudo grep -c 'psk={psk_hex}' /etc/wpa_supplicant/wpa_supplicant-wlan0.conf)\n"
        ),
        SSH,
    )
    .unwrap());
    eprintln!(
        "first boot, secrets: fat_psk_lines={} fat_files_with_key={} stored_mode={} wpa_mode={}",
        kv_get(&secrets, "fat_psk_lines"),
        kv_get(&secrets, "fat_files_with_key"),
        kv_get(&secrets, "stored_mode"),
        kv_get(&secrets, "wpa_mode")
    );
    assert_eq!(
        kv_get(&secrets, "fat_psk_lines"),
        "0",
        "psk left in clutch.toml"
    );
    assert_eq!(
        kv_get(&secrets, "fat_files_with_key"),
        "0",
        "WPA key left on the FAT partition"
    );
    assert_eq!(
        kv_get(&secrets, "fat_ssid"),
        "1",
        "the rest of clutch.toml was kept"
    );
    assert_eq!(kv_get(&secrets, "stored_psk"), psk_hex);
    assert_eq!(kv_get(&secrets, "stored_mode"), "600");
    assert_eq!(kv_get(&secrets, "state_dir_mode"), "700");
    assert_eq!(kv_get(&secrets, "wpa_mode"), "600");
    assert_eq!(
        kv_get(&secrets, "wpa_has_key"),
        "0",
        "network-config's network replaced clutch.toml's"
    );

    // Measurements for the issue note (not asserted: TCG timing varies a lot).
    let m = kv(&ssh(
        port,
        "systemctl show clutch-firstboot -p ExecMainStartTimestampMonotonic \
         -p ActiveEnterTimestampMonotonic -p ExecMainExitTimestampMonotonic \
         -p MemoryPeak -p ActiveState -p SubState -p Result\n\
         echo userspace_us=$(systemctl show -p UserspaceTimestampMonotonic --value)\n\
         echo log=$(sudo journalctl -b -u clutch-firstboot -o cat | grep 'finished with phase')\n\
         sudo clutch-firstboot status | sed 's/^/status: /' >&2\n",
        SSH,
    )
    .unwrap());
    let us = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let start = us("ExecMainStartTimestampMonotonic");
    let ready = us("ActiveEnterTimestampMonotonic");
    eprintln!(
        "MEASURED firstboot (first boot, 6G disk, TCG): unit start -> phase=ready (READY=1) {:.2}s; \
         started {:.1}s after userspace; unit MemoryPeak {} (includes ssh-keygen, resize2fs); {}",
        ready.saturating_sub(start) as f64 / 1e6,
        start.saturating_sub(us("userspace_us")) as f64 / 1e6,
        m.get("MemoryPeak").map(String::as_str).unwrap_or("?"),
        m.get("log").map(String::as_str).unwrap_or("?"),
    );
    assert_eq!(
        m.get("Result").map(String::as_str),
        Some("success"),
        "{m:#?}"
    );

    // ---- power cycle: QEMU runs with -no-reboot, so power off and start it again.
    ssh(port, "sudo systemctl --no-block poweroff", SSH).unwrap();
    vm.wait_exit(Duration::from_secs(240)).unwrap();
    drop(vm);
    let boot = Instant::now();
    let mut vm = Vm::start(opts("firstboot-a-again")).unwrap();
    let line = final_phase_line(&mut vm);
    eprintln!(
        "second boot: `{line}` {:.0}s after power on",
        boot.elapsed().as_secs_f64()
    );
    assert_with_console(
        &vm,
        line.starts_with(&format!("clutch: phase=discovering host={host} ")),
        &format!("expected phase=discovering host={host}, got `{line}`"),
    );
    vm.wait_for(&format!("clutch: phase=ready host={host} "), BOOT)
        .unwrap();
    let again = kv(&ssh(port, NODE_FACTS, SSH).unwrap());
    for k in ["hostname", "node_id", "machine_id", "data0_backing"] {
        assert_eq!(
            kv_get(&again, k),
            kv_get(&facts, k),
            "{k} changed after a reboot"
        );
    }
    assert_eq!(kv_get(&again, "data0_is_block"), "yes");
    assert_eq!(kv_num(&again, "data0_bytes"), 2 * GIB);
    assert_eq!(kv_num(&again, "root_part_bytes"), part);
    assert_eq!(kv_get(&again, "phase"), "ready");
    let m2 = kv(&ssh(
        port,
        "systemctl show clutch-firstboot -p ExecMainStartTimestampMonotonic \
         -p ActiveEnterTimestampMonotonic -p MemoryPeak",
        SSH,
    )
    .unwrap());
    let us2 = |k: &str| m2.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    eprintln!(
        "MEASURED firstboot (second boot): unit start -> phase=ready {:.2}s; unit MemoryPeak {}",
        us2("ActiveEnterTimestampMonotonic").saturating_sub(us2("ExecMainStartTimestampMonotonic"))
            as f64
            / 1e6,
        m2.get("MemoryPeak").map(String::as_str).unwrap_or("?"),
    );
    // Power off, then read the FAT partition as the disk holds it.
    ssh(port, "sudo systemctl --no-block poweroff", SSH).unwrap();
    vm.wait_exit(Duration::from_secs(240)).unwrap();
    drop(vm);
    no_secret_on_the_raw_fat(&disk, &psk_hex);
    eprintln!("case A took {:.0}s", t0.elapsed().as_secs_f64());
}

/// The boot-partition files of case A's card, as applied at first boot.
fn boot_partition_inputs_were_applied(port: u16) {
    let k = kv(&ssh(
        port,
        "echo keeper_hash=$(sudo awk -F: '$1==\"keeper\"{print $2}' /etc/shadow)\n\
         echo keeper_sudo=$(sudo -l -U keeper 2>/dev/null | grep -c NOPASSWD)\n\
         echo left=$(sudo ls /boot/efi | grep -cE '^(custom.toml|user-data|meta-data|network-config)$' || true)\n\
         echo report=$(sudo grep -c '^phase: ' /boot/efi/clutch-status.txt)\n\
         echo regdom=$(cat /etc/modprobe.d/clutch-wifi-country.conf | grep -c 'regdom=GB')\n\
         echo wpa_ssid=$(sudo grep -c 'ssid=\"cloud-net\"' /etc/wpa_supplicant/wpa_supplicant-wlan0.conf)\n\
         echo record_mode=$(sudo stat -c %a /var/lib/clutch/imported.toml)\n\
         echo warned=$(grep -c 'en_US.UTF-8' /run/clutch/status.json)\n",
        SSH,
    )
    .unwrap());
    eprintln!("boot-partition inputs: {k:?}");
    assert_eq!(
        kv_get(&k, "keeper_hash"),
        KEEPER_HASH,
        "custom.toml's hash without password_encrypted"
    );
    assert_eq!(kv_get(&k, "left"), "0", "applied once and removed");
    assert_eq!(
        kv_get(&k, "report"),
        "1",
        "clutch-status.txt on the FAT partition"
    );
    assert_eq!(kv_get(&k, "regdom"), "1", "country-only [wlan], lower case");
    assert_eq!(kv_get(&k, "wpa_ssid"), "1", "network-config's access point");
    assert_eq!(kv_get(&k, "record_mode"), "600");
    assert_eq!(
        kv_get(&k, "warned"),
        "1",
        "the locale given as keymap is a warning"
    );
    // The cloud-init user logs in with its key and has passwordless sudo.
    let who = ssh_as(port, "cloudy", "id -un; sudo -n id -un", SSH).unwrap();
    assert_eq!(
        who.split_whitespace().collect::<Vec<_>>(),
        ["cloudy", "root"],
        "{who}"
    );
}

/// No byte of a secret on the FAT partition of the powered-off disk (`grep -c` on the raw
/// partition): the token, both wifi keys, the passphrase and both password hashes.
fn no_secret_on_the_raw_fat(disk: &Path, psk_hex: &str) {
    let raw = artifacts().join("firstboot-a-after.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    let esp = artifacts().join("firstboot-a-esp.img");
    let st = Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", esp.display()))
        .args(["bs=1M", "skip=1", "count=256", "status=none"])
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&esp).unwrap();
    let cloud_key = clutch_config::WifiPsk::try_from(NET_PASSPHRASE.to_string())
        .unwrap()
        .hex_key("cloud-net");
    let mut found = Vec::new();
    for (what, s) in [
        ("cluster token", TOKEN),
        ("clutch.toml wifi key", psk_hex),
        ("clutch.toml password hash", HASH),
        ("custom.toml password hash", KEEPER_HASH),
        ("network-config passphrase", NET_PASSPHRASE),
        ("network-config wifi key", cloud_key.as_str()),
    ] {
        let hits = bytes
            .windows(s.len())
            .filter(|w| *w == s.as_bytes())
            .count();
        eprintln!("raw FAT partition: {hits} copies of the {what}");
        if hits > 0 {
            found.push(what);
        }
    }
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&esp);
    assert!(found.is_empty(), "still on the FAT partition: {found:?}");
    // The partition is still clean for fsck.
}

/// `clutch check` (which has no root filesystem) knows every system account of the real
/// image: each system user's name is refused, and each system group's name gets the verdict
/// the image's own files give.
fn accounts_are_known_to_check(passwd: &str, group: &str) {
    use clutch_config::account::{self, decide, decide_without_root, passwd_entries};
    let mut groups = 0;
    for e in passwd_entries(passwd).filter(|e| e.is_system()) {
        if let Ok(n) = clutch_config::UserName::try_from(e.name.as_str()) {
            assert!(
                decide_without_root(&n).is_err(),
                "`clutch check` would accept the image's system user {e:?}"
            );
        }
    }
    for g in group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().is_ok_and(|gid| gid < 1000)).then(|| f[0])
    }) {
        let Ok(n) = clutch_config::UserName::try_from(g) else {
            continue;
        };
        if account::find_user(passwd, g).is_some() {
            continue;
        }
        groups += 1;
        let (check, image) = (decide_without_root(&n), decide(&n, passwd, group));
        assert_eq!(
            check.as_ref().map(|a| a.useradd_group_args()).ok(),
            image.as_ref().map(|a| a.useradd_group_args()).ok(),
            "group {g}: check says {check:?}, the image {image:?}"
        );
    }
    eprintln!(
        "accounts: {} system users and {groups} system groups of the image agree with `clutch check`",
        passwd_entries(passwd).filter(|e| e.is_system()).count()
    );
}

/// A clutch.toml whose error is at a known place: line 4, column 12, key system.hostname.
const BROKEN: &str = "version = 1\n\n[system]\nhostname = \"node-{serial}\"\ntimezone = \"UTC\"\n";

#[test]
fn broken_config_fails_clearly_and_the_node_still_comes_up() {
    let t0 = Instant::now();
    let _one = serial_lock();
    let img = image();
    let broken_img = artifacts().join("firstboot-broken.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&broken_img)
        .status()
        .unwrap();
    assert!(st.success());
    let toml = artifacts().join("firstboot-broken.toml");
    std::fs::write(&toml, BROKEN).unwrap();
    mtools(&[
        "mcopy",
        "-o",
        "-i",
        &fat(&broken_img),
        toml.to_str().unwrap(),
        "::/clutch.toml",
    ]);
    assert_eq!(fat_clutch_toml(&broken_img), BROKEN);

    let disk = overlay(&broken_img, "firstboot-b", None).unwrap();
    let port = free_port();
    let boot = Instant::now();
    let mut vm = Vm::start(VmOpts {
        name: "firstboot-b".into(),
        disk,
        format: "qcow2",
        firmware: Firmware::Uefi,
        memory_mib: 1024,
        extra: user_net_with_ssh(port),
    })
    .unwrap();
    let line = final_phase_line(&mut vm);
    eprintln!(
        "broken config: `{line}` {:.0}s after power on",
        boot.elapsed().as_secs_f64()
    );
    assert_with_console(
        &vm,
        line.starts_with("clutch: phase=failed host=node-"),
        &format!("expected phase=failed, got `{line}`"),
    );
    vm.wait_for("login:", BOOT).unwrap();
    eprintln!(
        "broken config: login prompt after {:.0}s",
        boot.elapsed().as_secs_f64()
    );

    // The baked-in key still logs in; the status names the place and the key.
    let status = ssh(port, "clutch-firstboot status; hostname", SSH).unwrap();
    eprintln!("broken config, `clutch-firstboot status`:\n{status}");
    let want = "/boot/efi/clutch.toml:4:12: system.hostname";
    assert!(status.contains("phase:    failed"), "{status}");
    assert!(status.contains(&format!("error:    {want}")), "{status}");
    let json = ssh(port, "cat /run/clutch/status.json", SSH).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["phase"], "failed", "{json}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.starts_with(want), "{json}");
    assert!(err.contains("placeholder"), "{json}");
    let host = status.lines().last().unwrap_or_default().trim();
    assert!(
        is_node_hostname(host),
        "a failed node still gets its own name: {host}"
    );
    assert_eq!(v["hostname"], host, "{json}");
    eprintln!("case B took {:.0}s", t0.elapsed().as_secs_f64());
}
