//! End-to-end runs of one boot on a temp root with the recording [`FakeSys`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::facts::Paths;
use crate::facts::testing::{add_link, add_root_disk, write};
use crate::run::{Report, run};
use crate::status::{Phase, Status, StatusBoard, StatusSink, read_status};
use crate::sys::FakeSys;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";
const TOKEN: &str = "0123456789abcdef0123456789abcdef-lab";

/// Compares `actual` with `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites the file.
fn golden(name: &str, actual: &str) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, actual).unwrap();
        return;
    }
    let want = fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            p.display()
        )
    });
    assert_eq!(
        actual, want,
        "golden file {name} differs (UPDATE_GOLDEN=1 rewrites it)"
    );
}

struct Node {
    dir: tempfile::TempDir,
    paths: Paths,
}

impl Node {
    /// A freshly flashed amd64 image: empty machine-id, no host keys, the admin user, a
    /// 2 GiB disk whose 1 GiB root partition is the last one, one wired NIC.
    fn new(clutch_toml: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(&r.join("etc/machine-id"), "");
        // The builder's placeholder host name.
        write(&r.join("etc/hostname"), "clutch\n");
        write(
            &r.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
        );
        write(
            &r.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
        );
        write(
            &r.join("etc/shadow"),
            "root:*:20000:0:99999:7:::\nadmin:!:20000:0:99999:7:::\n",
        );
        write(
            &r.join("etc/group"),
            "root:x:0:\ndaemon:x:1:\ndisk:x:6:\nsudo:x:27:admin\noperator:x:37:\nusers:x:100:\nadmin:x:1000:\n",
        );
        // trixie's tzdata: compiled zones, no legacy names.
        for z in [
            "Etc/UTC",
            "Europe/London",
            "Europe/Berlin",
            "America/New_York",
        ] {
            write(&r.join("usr/share/zoneinfo").join(z), "TZif2 compiled zone");
        }
        std::os::unix::fs::symlink("Etc/UTC", r.join("usr/share/zoneinfo/UTC")).unwrap();
        fs::create_dir_all(r.join("dev")).unwrap();
        add_link(r, "enp0s3", 2, "52:54:00:12:34:56", true, false);
        add_root_disk(r, 4_194_304, 264_192, 1_048_576);
        if let Some(t) = clutch_toml {
            write(&r.join("boot/efi/clutch.toml"), t);
        }
        let paths = Paths::new(r, "/boot/efi");
        Node { dir, paths }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn read(&self, p: &str) -> String {
        fs::read_to_string(self.paths.host(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }
    fn exists(&self, p: &str) -> bool {
        fs::symlink_metadata(self.paths.host(p)).is_ok()
    }
    fn mode(&self, p: &str) -> u32 {
        fs::metadata(self.paths.host(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }
    /// One boot with a fresh fake; returns the report, the console lines and the calls.
    fn boot_with(&self, sys: &FakeSys) -> (Report, Vec<String>) {
        self.boot_fetched(sys, None)
    }
    /// [`Self::boot_with`] on a netbooted node whose config download failed with `fetch_error`.
    fn boot_fetched(&self, sys: &FakeSys, fetch_error: Option<&str>) -> (Report, Vec<String>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let board = StatusBoard::new(
            self.paths.status_file(),
            Box::new(move |s| l2.lock().unwrap().push(s.to_string())),
        )
        .with_report(
            self.paths.host(self.paths.boot_file("clutch-status.txt")),
            Box::new(|| vec!["eth0 192.0.2.7".to_string()]),
        );
        // Formation (`form = true`) needs a network and peers: the cluster crate tests it.
        let rep = run(&self.paths, sys, &board, false, fetch_error);
        assert_eq!(board.get(), self.status(), "status.json matches the sink");
        let l = lines.lock().unwrap().clone();
        (rep, l)
    }
    fn boot(&self) -> (Report, Vec<String>, Vec<String>) {
        let sys = FakeSys::new();
        let (r, l) = self.boot_with(&sys);
        (r, l, sys.calls(self.root()))
    }
    fn status(&self) -> Status {
        read_status(&self.paths.status_file()).unwrap()
    }
    /// What a reboot forgets: /dev and /run are tmpfs, loop devices and mounts are gone.
    fn reboot(&self) {
        let _ = fs::remove_dir_all(self.paths.host("/dev/clutch"));
        let _ = fs::remove_dir_all(self.paths.host("/run"));
        // The fake ssh-keygen made no keys; make them as the real one would have.
        for t in crate::facts::HOST_KEY_TYPES {
            write(&self.paths.host(format!("/etc/ssh/ssh_host_{t}_key")), "k");
            write(
                &self.paths.host(format!("/etc/ssh/ssh_host_{t}_key.pub")),
                "k",
            );
        }
    }
}

fn basic() -> String {
    format!(
        r#"# my node
version = 1

[system]
hostname = "node-{{id}}"
timezone = "Europe/London"

[user]
name = "admin"
authorized_keys = ["{KEY}"]

[ssh]
password_authentication = false

[[storage.loopback]]
name = "data0"
size = "2GiB"
"#
    )
}

fn has(calls: &[String], prefix: &str) -> bool {
    calls.iter().any(|c| c.starts_with(prefix))
}

#[test]
fn first_boot_without_cluster_reaches_ready() {
    let n = Node::new(Some(&basic()));
    let (rep, lines, calls) = n.boot();
    assert_eq!(rep.error, None, "{:?}", rep.outcome);
    assert_eq!(rep.phase, Phase::Ready);
    let id = rep.plan.node_id.clone();
    assert_eq!(id.len(), 32);
    let host = format!("node-{}", &id[..6]);
    assert_eq!(
        lines,
        vec![
            format!("clutch: phase=configuring host={host} role=none members=0"),
            format!("clutch: phase=ready host={host} role=none members=0"),
        ]
    );
    // identity
    assert_eq!(n.read("/var/lib/clutch/node-id").trim(), id);
    let mid = n.read("/etc/machine-id");
    assert!(
        crate::facts::is_node_id(mid.trim()) && mid.trim() != id,
        "{mid}"
    );
    assert_eq!(n.read("/etc/hostname"), format!("{host}\n"));
    assert!(
        n.read("/etc/hosts")
            .contains(&format!("127.0.1.1\t{host}\n"))
    );
    assert!(calls.contains(&format!("sethostname {host}")));
    assert!(
        calls.contains(
            &"run ssh-keygen -q -t ed25519 -N  -f $ROOT/etc/ssh/ssh_host_ed25519_key".to_string()
        ),
        "{calls:#?}"
    );
    // user + ssh
    assert_eq!(
        n.read("/home/admin/.ssh/authorized_keys"),
        crate::render::authorized_keys(&[KEY.try_into().unwrap()])
    );
    assert_eq!(n.mode("/home/admin/.ssh/authorized_keys"), 0o600);
    assert_eq!(n.mode("/home/admin/.ssh"), 0o700);
    assert!(calls.contains(&"chown $ROOT/home/admin/.ssh/authorized_keys 1000:1000".to_string()));
    assert!(
        n.read("/etc/ssh/sshd_config.d/50-clutch.conf")
            .contains("PasswordAuthentication no\n")
    );
    assert!(!n.exists("/etc/ssh/sshd_not_to_be_run"));
    assert_eq!(
        fs::read_link(n.paths.host("/etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/Europe/London")
    );
    // storage: sparse 2 GiB backing file, attached, stable symlink
    let img = n.paths.host("/var/lib/clutch/storage/data0.img");
    let m = fs::metadata(&img).unwrap();
    assert_eq!(m.len(), 2 << 30);
    assert!(std::os::unix::fs::MetadataExt::blocks(&m) < 64, "sparse");
    assert!(
        calls.contains(&"attach_loop $ROOT/var/lib/clutch/storage/data0.img -> loop0".to_string())
    );
    assert_eq!(
        fs::read_link(n.paths.host("/dev/clutch/data0")).unwrap(),
        Path::new("/dev/loop0")
    );
    let st = n.status();
    assert_eq!(st.storage.len(), 1);
    assert_eq!(st.storage[0].loop_device, "/dev/loop0");
    assert_eq!(st.storage[0].size_bytes, 2 << 30);
    // root grow
    assert!(
        calls.contains(&"grow_partition $ROOT/dev/vda 2 Gpt".to_string())
            || calls.contains(&"grow_partition $ROOT/dev/vda 2 Mbr".to_string())
            || !has(&calls, "grow_partition"),
        "{calls:#?}"
    );
    // links, READY
    assert!(calls.contains(&"links_up lo enp0s3".to_string()));
    assert_eq!(
        calls.last().unwrap(),
        "notify READY=1\nSTATUS=clutch: ready"
    );
    assert_eq!(st.phase, Phase::Ready);
    assert_eq!(st.error, None);
}

/// A disk with a real GPT, so the grow step is planned.
fn with_gpt_disk(n: &Node) {
    let disk = n.paths.host("/dev/vda");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(4 << 20).unwrap();
    drop(f);
    let mut g = gpt::GptConfig::new().writable(true).create(&disk).unwrap();
    g.add_partition("root", 1 << 20, gpt::partition_types::LINUX_FS, 0, None)
        .unwrap();
    g.write().unwrap();
}

#[test]
fn root_grows_once() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    let i = calls
        .iter()
        .position(|c| c == "grow_partition $ROOT/dev/vda 2 Gpt")
        .expect("grown");
    assert_eq!(calls[i + 1], "run resize2fs /dev/vda2");
    assert!(n.exists("/var/lib/clutch/done/grow-root"));
    n.reboot();
    let (_, _, calls) = n.boot();
    assert!(
        !has(&calls, "grow_partition") && !has(&calls, "run resize2fs"),
        "{calls:#?}"
    );
}

#[test]
fn failed_grow_is_retried_next_boot() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    let sys = FakeSys::failing(&["run resize2fs"]);
    let (rep, _) = n.boot_with(&sys);
    assert_eq!(rep.phase, Phase::Failed);
    assert!(
        rep.error.as_deref().unwrap().starts_with("grow-root: "),
        "{:?}",
        rep.error
    );
    assert!(!n.exists("/var/lib/clutch/done/grow-root"));
    // everything else still happened
    assert!(n.exists("/dev/clutch/data0"));
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(has(&calls, "run resize2fs"));
}

#[test]
fn no_grow_when_disk_is_full_or_root_not_last() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    // the root partition already fills the disk
    write(
        &n.paths
            .host("/sys/devices/pci0000:00/virtio2/block/vda/vda2/size"),
        &format!("{}\n", 4_194_304 - 264_192 - 34),
    );
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(!has(&calls, "grow_partition"));
    assert!(
        n.exists("/var/lib/clutch/done/grow-root"),
        "nothing to do is done"
    );

    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    let d = n
        .paths
        .host("/sys/devices/pci0000:00/virtio2/block/vda/vda3");
    write(&d.join("partition"), "3\n");
    write(&d.join("start"), "3000000\n");
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "not growing is not an error");
    assert!(!has(&calls, "grow_partition"));
    assert!(
        rep.plan
            .notes
            .iter()
            .any(|x| x.contains("not the last partition")),
        "{:?}",
        rep.plan.notes
    );
}

#[test]
fn second_boot_keeps_identity_and_reattaches_storage() {
    let n = Node::new(Some(&basic()));
    let (first, _, _) = n.boot();
    let mid = n.read("/etc/machine-id");
    n.reboot();
    let (second, lines, calls) = n.boot();
    assert_eq!(second.phase, Phase::Ready);
    assert_eq!(second.plan.node_id, first.plan.node_id);
    assert_eq!(second.plan.hostname, first.plan.hostname);
    assert_eq!(n.read("/etc/machine-id"), mid);
    assert!(!has(&calls, "run ssh-keygen"), "keys exist: {calls:#?}");
    assert!(
        has(&calls, "sethostname "),
        "hostname is set in the kernel every boot"
    );
    assert!(
        has(&calls, "attach_loop "),
        "loop devices are attached every boot"
    );
    assert_eq!(
        fs::read_link(n.paths.host("/dev/clutch/data0")).unwrap(),
        Path::new("/dev/loop0")
    );
    assert_eq!(lines.len(), 2);
}

#[test]
fn already_attached_loop_is_reused() {
    let n = Node::new(Some(&basic()));
    write(
        &n.paths.host("/sys/block/loop7/loop/backing_file"),
        "/var/lib/clutch/storage/data0.img\n",
    );
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(!has(&calls, "attach_loop"));
    assert_eq!(
        fs::read_link(n.paths.host("/dev/clutch/data0")).unwrap(),
        Path::new("/dev/loop7")
    );
    assert_eq!(n.status().storage[0].loop_device, "/dev/loop7");
}

fn ext4_config() -> String {
    basic() + "format = \"ext4\"\nmount = \"/srv/data0\"\n"
}

#[test]
fn ext4_loopback_is_formatted_once_and_mounted_every_boot() {
    let n = Node::new(Some(&ext4_config()));
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    let mkfs = calls
        .iter()
        .position(|c| c.starts_with("run mkfs.ext4"))
        .expect("mkfs");
    assert_eq!(
        calls[mkfs],
        "run mkfs.ext4 -q -F -L data0 -E lazy_itable_init=1,lazy_journal_init=1 /dev/clutch/data0"
    );
    let attach = calls
        .iter()
        .position(|c| c.starts_with("attach_loop"))
        .unwrap();
    let mount = calls.iter().position(|c| c.starts_with("mount ")).unwrap();
    assert!(attach < mkfs && mkfs < mount);
    assert_eq!(
        calls[mount],
        "mount $ROOT/dev/clutch/data0 $ROOT/srv/data0 ext4"
    );
    assert!(n.paths.host("/srv/data0").is_dir());
    assert!(n.exists("/var/lib/clutch/done/mkfs-data0"));
    n.reboot();
    let (_, _, calls) = n.boot();
    assert!(!has(&calls, "run mkfs.ext4"));
    assert!(has(&calls, "mount "));
}

#[test]
fn ext4_found_on_backing_file_is_not_reformatted() {
    // The marker was lost (or the power went after mkfs): the superblock is there.
    let n = Node::new(Some(&ext4_config()));
    let img = n.paths.host("/var/lib/clutch/storage/data0.img");
    let mut b = vec![0u8; 4096];
    b[1080] = 0x53;
    b[1081] = 0xEF;
    write(&img, "");
    fs::write(&img, &b).unwrap();
    // already mounted (unit restarted)
    let mi = n.paths.host("/proc/self/mountinfo");
    let mut t = fs::read_to_string(&mi).unwrap();
    t += "40 22 7:0 / /srv/data0 rw,relatime - ext4 /dev/loop0 rw\n";
    fs::write(&mi, t).unwrap();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(!has(&calls, "run mkfs.ext4"));
    assert!(!has(&calls, "mount "));
    assert!(n.exists("/var/lib/clutch/done/mkfs-data0"));
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        2 << 30,
        "grown to the configured size"
    );
}

fn assert_failed_but_safe(n: &Node, rep: &Report, calls: &[String], lines: &[String], want: &str) {
    assert_eq!(rep.phase, Phase::Failed);
    let e = rep.error.clone().unwrap();
    assert!(e.contains(want), "error `{e}` should contain `{want}`");
    let st = n.status();
    assert_eq!(st.phase, Phase::Failed);
    assert_eq!(st.error.as_deref(), Some(e.as_str()));
    // Safe steps ran: sshd can start with the baked-in keys, machine-id is there.
    assert!(
        calls.contains(
            &"run ssh-keygen -q -t ed25519 -N  -f $ROOT/etc/ssh/ssh_host_ed25519_key".to_string()
        ),
        "{calls:#?}"
    );
    assert!(crate::facts::is_node_id(n.read("/etc/machine-id").trim()));
    assert!(has(calls, "sethostname node-"));
    assert!(has(calls, "links_up lo"));
    assert!(has(calls, "notify READY=1"), "boot goes on");
    assert!(!has(calls, "attach_loop"));
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("clutch: phase=failed host=node-"),
        "{lines:?}"
    );
    // the baked-in authorized_keys are not touched
    assert!(!n.exists("/home/admin/.ssh/authorized_keys"));
    // The reason, in a few words, on the console and on the card.
    let last = lines.last().unwrap();
    let short = crate::status::short_reason(&e);
    assert!(last.ends_with(&format!(" error=\"{short}\"")), "{last}");
    assert!(!short.starts_with('/') && short.len() <= 102, "{short}");
    let report = n.read(&format!("{}/clutch-status.txt", n.paths.boot_dir.display()));
    assert!(report.contains("phase:     failed\r\n"), "{report}");
    assert!(report.contains(&format!("error:     {e}\r\n")), "{report}");
}

#[test]
fn bad_toml_syntax_fails_with_location() {
    let n = Node::new(Some("version = 1\n[system\nhostname = \"x\"\n"));
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(&n, &rep, &calls, &lines, "/boot/efi/clutch.toml:2:");
}

#[test]
fn unknown_key_fails_naming_the_key() {
    let n = Node::new(Some("version = 1\n\n[system]\nhostnme = \"x\"\n"));
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "/boot/efi/clutch.toml:4:1: system.hostnme: unknown field",
    );
}

#[test]
fn bad_hostname_template_fails_naming_the_key() {
    let n = Node::new(Some(
        "version = 1\n[system]\nhostname = \"node-{serial}\"\n",
    ));
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "/boot/efi/clutch.toml:3:12: system.hostname: unknown placeholder",
    );
}

#[test]
fn missing_clutch_toml_fails_clearly() {
    let n = Node::new(None);
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "cannot read /boot/efi/clutch.toml: ",
    );
}

#[test]
fn failed_netboot_download_leads_the_error_when_no_config_is_there() {
    let n = Node::new(None);
    let sys = FakeSys::new();
    let fetch = "cannot fetch the node config from http://10.0.0.1:8080/config/525400123456 \
                 (clutch.config= on the kernel command line): connection refused";
    let (rep, lines) = n.boot_fetched(&sys, Some(fetch));
    let want = format!("{fetch}; cannot read /boot/efi/clutch.toml: ");
    assert_failed_but_safe(&n, &rep, &sys.calls(n.root()), &lines, &want);
}

#[test]
fn failed_netboot_download_with_a_usable_config_goes_on() {
    let n = Node::new(Some(&basic()));
    let (rep, _) = n.boot_fetched(&FakeSys::new(), Some("cannot fetch the node config"));
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
}

#[test]
fn failed_config_keeps_the_hostname_from_an_earlier_boot() {
    let n = Node::new(Some(&basic().replace("node-{id}", "keeper-{id}")));
    let (ok, _, _) = n.boot();
    assert!(ok.plan.hostname.as_str().starts_with("keeper-"));
    write(&n.paths.host("/boot/efi/clutch.toml"), "version = 2\n");
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Failed);
    assert!(
        rep.error
            .as_deref()
            .unwrap()
            .contains("version: config version 2 is not supported")
    );
    assert_eq!(rep.plan.hostname, ok.plan.hostname);
    assert!(calls.contains(&format!("sethostname {}", ok.plan.hostname)));
}

#[test]
fn failed_first_boot_does_not_keep_the_image_placeholder_hostname() {
    // Every node flashed from one image starts as `clutch`; a broken config must still give
    // each its own name (the default template), or they all clash on the network.
    let n = Node::new(Some("version = 2\n"));
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Failed);
    let id = rep.plan.node_id.clone();
    let want = format!("node-{}", &id[..6]);
    assert_eq!(rep.plan.hostname.as_str(), want);
    assert_eq!(n.read("/etc/hostname"), format!("{want}\n"));
    assert!(calls.contains(&format!("sethostname {want}")));
}

#[test]
fn mac_template_without_any_nic_fails() {
    let n = Node::new(Some("version = 1\n[system]\nhostname = \"pi-{mac}\"\n"));
    fs::remove_dir_all(n.paths.host("/sys/class/net")).unwrap();
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "system.hostname: the template `pi-{mac}` uses {mac}",
    );
}

#[test]
fn mac_template_uses_first_wired_link() {
    let n = Node::new(Some("version = 1\n[system]\nhostname = \"pi-{mac}\"\n"));
    add_link(n.root(), "wlan0", 1, "b8:27:eb:00:00:01", true, true);
    add_link(n.root(), "eth1", 5, "52:54:00:00:00:05", true, false);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.plan.hostname.as_str(), "pi-525400123456");
    assert!(calls.contains(&"links_up lo enp0s3 eth1".to_string()));
}

#[test]
fn sys_failure_marks_failed_but_other_steps_run() {
    let n = Node::new(Some(&basic()));
    let sys = FakeSys::failing(&["attach_loop"]);
    let (rep, lines) = n.boot_with(&sys);
    assert_eq!(rep.phase, Phase::Failed);
    let e = rep.error.unwrap();
    assert!(e.starts_with("storage-data0: attach data0"), "{e}");
    assert!(e.contains("fake failure"), "{e}");
    let calls = sys.calls(n.root());
    assert!(has(&calls, "links_up"), "later steps still ran");
    assert!(has(&calls, "notify READY=1"));
    assert_eq!(n.status().storage[0].loop_device, "");
    assert!(lines.last().unwrap().starts_with("clutch: phase=failed"));
}

fn cluster_config() -> String {
    format!(
        r#"version = 1 # format version

[user]
name = "admin"
authorized_keys = ["{KEY}"]

[wifi]
ssid = "lab-net"
psk = "correct horse battery"   # moved off the card at first boot
country = "GB"

# the lab
[cluster]
name = "lab"
engine = "etcd"
token = "{TOKEN}"
expected_size = 3
"#
    )
}

#[test]
fn wpa_supplicant_starts_this_boot_when_wlan0_is_present() {
    let n = Node::new(Some(&cluster_config()));
    add_link(n.root(), "wlan0", 7, "b8:27:eb:00:00:07", true, true);
    let (_, _, calls) = n.boot();
    assert!(
        calls.contains(&"run systemctl --no-block start wpa_supplicant@wlan0.service".to_string()),
        "{calls:?}"
    );
}

#[test]
fn secrets_are_moved_off_the_fat_partition() {
    let n = Node::new(Some(&cluster_config()));
    let (rep, lines, calls) = n.boot();
    assert_eq!(rep.error, None);
    assert_eq!(rep.phase, Phase::Discovering);
    assert!(
        lines[1].starts_with("clutch: phase=discovering host=node-")
            && lines[1].ends_with(" role=pending members=0"),
        "{lines:?}"
    );
    assert_eq!(
        n.read("/var/lib/clutch/cluster-token"),
        format!("{TOKEN}\n")
    );
    assert_eq!(n.mode("/var/lib/clutch/cluster-token"), 0o600);
    assert_eq!(
        n.read("/var/lib/clutch/wifi-psk"),
        "correct horse battery\n"
    );
    assert_eq!(n.mode("/var/lib/clutch/wifi-psk"), 0o600);
    let fat = n.read("/boot/efi/clutch.toml");
    assert!(
        !fat.contains(TOKEN) && !fat.contains("correct horse"),
        "{fat}"
    );
    golden("clutch.toml.after-move", &fat);
    // wifi
    let wpa = n.read("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf");
    assert!(!wpa.contains("correct horse"));
    assert_eq!(
        n.mode("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"),
        0o600
    );
    golden("wpa_supplicant-wlan0.conf", &wpa);
    golden(
        "30-clutch-wlan0.network",
        &n.read("/etc/systemd/network/30-clutch-wlan0.network"),
    );
    assert_eq!(
        fs::read_link(n.paths.host(
            "/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants/wpa_supplicant@wlan0.service"
        ))
        .unwrap(),
        Path::new("/usr/lib/systemd/system/wpa_supplicant@.service")
    );
    // This node has no wlan0: nothing may wait for it (multi-user.target would stall 90 s).
    assert!(!n.exists("/etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"));
    assert!(
        !calls.contains(&"run systemctl --no-block start wpa_supplicant@wlan0.service".to_string())
    );
    assert_eq!(
        calls.last().unwrap(),
        "notify READY=1\nSTATUS=clutch: discovering"
    );
    let (_, token) = rep.plan.cluster.unwrap();
    assert_eq!(token.expose(), TOKEN);

    // Next boot: the secrets come from /var/lib/clutch; the FAT file is not rewritten.
    n.reboot();
    let before = fs::metadata(n.paths.host("/boot/efi/clutch.toml"))
        .unwrap()
        .modified()
        .unwrap();
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Discovering, "{:?}", rep.error);
    assert!(rep.plan.step("secrets").is_none());
    assert_eq!(rep.plan.cluster.unwrap().1.expose(), TOKEN);
    assert_eq!(n.read("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"), wpa);
    assert_eq!(
        fs::metadata(n.paths.host("/boot/efi/clutch.toml"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
}

#[test]
fn moved_secret_without_stored_copy_fails_naming_the_key() {
    let cfg = cluster_config().replace(&format!("token = \"{TOKEN}\"\n"), "");
    let n = Node::new(Some(&cfg));
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "cluster.token: no token in /boot/efi/clutch.toml and none stored in /var/lib/clutch/cluster-token",
    );
}

#[test]
fn new_token_on_the_card_replaces_the_stored_one() {
    let n = Node::new(Some(&cluster_config()));
    n.boot();
    let newer = "ffffffffffffffffffffffffffffffffffff";
    let cfg = cluster_config().replace(TOKEN, newer);
    write(&n.paths.host("/boot/efi/clutch.toml"), &cfg);
    n.reboot();
    let (rep, _, _) = n.boot();
    assert_eq!(rep.plan.cluster.unwrap().1.expose(), newer);
    assert_eq!(
        n.read("/var/lib/clutch/cluster-token"),
        format!("{newer}\n")
    );
    assert!(!n.read("/boot/efi/clutch.toml").contains(newer));
}

#[test]
fn token_file_on_the_card_is_moved_and_removed() {
    let cfg = cluster_config().replace(
        &format!("token = \"{TOKEN}\""),
        "token_file = \"token.txt\"",
    );
    let n = Node::new(Some(&cfg));
    write(&n.paths.host("/boot/efi/token.txt"), &format!("{TOKEN}\n"));
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Discovering, "{:?}", rep.error);
    assert!(!n.exists("/boot/efi/token.txt"));
    assert!(!n.read("/boot/efi/clutch.toml").contains("token_file"));
    assert_eq!(
        n.read("/var/lib/clutch/cluster-token"),
        format!("{TOKEN}\n")
    );

    let n = Node::new(Some(&cfg));
    let (rep, lines, calls) = n.boot();
    assert_failed_but_safe(
        &n,
        &rep,
        &calls,
        &lines,
        "cluster.token_file: cannot read /boot/efi/token.txt",
    );
}

#[test]
fn generated_files_match_golden() {
    let n = Node::new(Some(&basic()));
    n.boot();
    let host = n.read("/etc/hostname");
    // Golden files hold a fixed host name: the fake's node id is deterministic.
    golden("hostname", &host);
    golden("hosts", &n.read("/etc/hosts"));
    golden(
        "50-clutch.conf",
        &n.read("/etc/ssh/sshd_config.d/50-clutch.conf"),
    );
    // Wired links are the image's (80-clutch-wired.network); firstboot writes none.
    assert!(!n.exists("/etc/systemd/network/20-clutch-wired.network"));
    golden(
        "authorized_keys",
        &n.read("/home/admin/.ssh/authorized_keys"),
    );
    golden(
        "sudoers-clutch-admin",
        &n.read("/etc/sudoers.d/clutch-admin"),
    );
    assert_eq!(n.mode("/etc/sudoers.d/clutch-admin"), 0o440);
    golden("status.json", &n.read("/run/clutch/status.json"));
    golden("clutch-status.txt", &n.read("/boot/efi/clutch-status.txt"));
}

#[test]
fn ssh_disabled_and_password_login() {
    let cfg = basic()
        .replace(
            "password_authentication = false",
            "enabled = false\npassword_authentication = true",
        )
        .replace(
            "name = \"admin\"\n",
            "name = \"admin\"\npassword_hash = \"$y$j9T$salt$hash\"\nsudo = false\n",
        );
    let n = Node::new(Some(&cfg));
    write(&n.paths.host("/etc/sudoers.d/clutch-admin"), "old");
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(n.exists("/etc/ssh/sshd_not_to_be_run"));
    assert!(
        n.read("/etc/ssh/sshd_config.d/50-clutch.conf")
            .contains("PasswordAuthentication yes\n")
    );
    assert!(
        n.read("/etc/shadow")
            .contains("admin:$y$j9T$salt$hash:20000:")
    );
    assert!(!n.exists("/etc/sudoers.d/clutch-admin"));
}

#[test]
fn missing_user_is_created() {
    let cfg = basic().replace("name = \"admin\"", "name = \"ops\"");
    let n = Node::new(Some(&cfg));
    let (rep, _, calls) = n.boot();
    assert!(
        calls.contains(
            &"run useradd -R $ROOT -m -s /bin/bash --user-group --groups sudo ops".to_string()
        ),
        "{calls:#?}"
    );
    // The fake useradd made no passwd entry, so owning the keys fails visibly.
    assert_eq!(rep.phase, Phase::Failed);
    assert!(
        rep.error
            .unwrap()
            .contains("user ops is not in /etc/passwd")
    );
}

const CUSTOM: &str = r#"config_version = 1

[system]
hostname = "kitchen-pi"

[user]
name = "pi"
password = "$6$salt$hashhash"
password_encrypted = true

[ssh]
enabled = true
password_authentication = true
authorized_keys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl pi@imager" ]

[wlan]
ssid = "home"
password = "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
password_encrypted = true
hidden = true
country = "DE"

[locale]
keymap = "de"
timezone = "Europe/Berlin"
"#;

fn pi_node(custom: &str) -> Node {
    let n = Node::new(Some(&basic()));
    let n = Node {
        paths: Paths::new(n.root(), "/boot/firmware"),
        ..n
    };
    fs::rename(n.paths.host("/boot/efi"), n.paths.host("/boot/firmware")).unwrap();
    write(
        &n.paths.host("/etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nadmin:x:1001:1001::/home/admin:/bin/bash\npi:x:1000:1000::/home/pi:/bin/bash\n",
    );
    write(&n.paths.host("/etc/shadow"), "pi:!:20000:0:99999:7:::\n");
    write(&n.paths.host("/boot/firmware/custom.toml"), custom);
    n
}

/// A node whose FAT partition holds `files` (name, contents) besides clutch.toml.
fn pi_node_with(files: &[(&str, &str)]) -> Node {
    let n = pi_node("");
    fs::remove_file(n.paths.host("/boot/firmware/custom.toml")).unwrap();
    for (name, text) in files {
        write(&n.paths.host(format!("/boot/firmware/{name}")), text);
    }
    n
}

#[test]
fn custom_toml_is_honoured_once_and_scrubbed_off_the_card() {
    let n = pi_node(CUSTOM);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.error, None);
    assert_eq!(rep.phase, Phase::Ready);
    assert_eq!(rep.plan.hostname.as_str(), "kitchen-pi");
    assert!(calls.contains(&"sethostname kitchen-pi".to_string()));
    // custom.toml's keys go to its user; clutch.toml's user keeps its own.
    let pi_keys = n.read("/home/pi/.ssh/authorized_keys");
    assert!(
        pi_keys.contains("pi@imager") && !pi_keys.contains("me@laptop"),
        "{pi_keys}"
    );
    assert!(
        n.read("/home/admin/.ssh/authorized_keys")
            .contains("me@laptop")
    );
    assert!(n.read("/etc/shadow").contains("pi:$6$salt$hashhash:"));
    assert!(
        n.exists("/etc/sudoers.d/clutch-pi"),
        "Raspberry Pi OS's first user has sudo"
    );
    assert!(
        n.read("/etc/ssh/sshd_config.d/50-clutch.conf")
            .contains("PasswordAuthentication yes")
    );
    let wpa = n.read("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf");
    assert!(
        wpa.contains("country=DE\n") && wpa.contains("scan_ssid=1") && wpa.contains("psk=f42c6fc5"),
        "{wpa}"
    );
    assert!(n.read("/etc/default/keyboard").contains("XKBLAYOUT=\"de\""));
    assert_eq!(n.read("/etc/timezone"), "Europe/Berlin\n");
    assert!(
        n.read("/etc/modprobe.d/clutch-wifi-country.conf")
            .contains("ieee80211_regdom=DE")
    );
    // Applied once: gone from the card, its settings recorded (0600), no plain copy kept.
    assert!(!n.exists("/boot/firmware/custom.toml"));
    assert!(!n.exists("/var/lib/clutch/custom.toml"));
    assert_eq!(n.mode("/var/lib/clutch/imported.toml"), 0o600);
    let overwrite = calls.iter().position(|c| c.contains("overwrite"));
    assert!(
        overwrite.is_none(),
        "the fake records no file I/O: {calls:?}"
    );
    let step = rep.plan.step("inputs").unwrap();
    let dbg = format!("{:?}", step.actions);
    let (w, o, r) = (
        dbg.find("write /var/lib/clutch/imported.toml").unwrap(),
        dbg.find("overwrite /boot/firmware/custom.toml").unwrap(),
        dbg.find("remove /boot/firmware/custom.toml").unwrap(),
    );
    assert!(
        w < o && o < r,
        "recorded, then blanked, then removed: {dbg}"
    );
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(
        rep.plan.hostname.as_str(),
        "kitchen-pi",
        "kept from the record"
    );
    assert!(rep.plan.step("inputs").is_none());
    assert!(!has(&calls, "run useradd"), "{calls:?}");
}

#[test]
fn custom_toml_plain_password_is_hashed_and_never_kept() {
    let n =
        pi_node("[user]\nname = \"pi\"\npassword = \"raspberry\"\npassword_encrypted = false\n");
    write(&n.paths.host("/etc/shadow"), "pi:!:20000:0:99999:7:::\n");
    let (rep, _, _) = n.boot();
    assert_eq!(rep.error, None);
    let shadow = n.read("/etc/shadow");
    let hash = shadow.split(':').nth(1).unwrap();
    assert!(hash.starts_with("$6$"), "{shadow}");
    use sha_crypt::PasswordVerifier;
    sha_crypt::ShaCrypt::SHA512
        .verify_password(b"raspberry", hash)
        .unwrap();
    for f in walk(n.root()) {
        let t = fs::read(&f).unwrap_or_default();
        assert!(
            !t.windows(9).any(|w| w == b"raspberry"),
            "plain password in {}",
            f.display()
        );
    }
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(walk(&p));
        } else if t.is_file() && e.metadata().unwrap().len() < 1 << 20 {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_bad_custom_toml_is_warnings_and_the_node_comes_up() {
    let n = pi_node(
        "config_version = 1\n[system]\nhostname = \"bad_name\"\n[wlan]\ncountry = \"gb\"\n\
         [locale]\nkeymap = \"en_US.UTF-8\"\ntimezone = \"Europe/London\"\n[ssh]\nenabled = \"yes\"\n\
         ssh_import_id = [\"gh:someone\"]\n[extra]\nx = 1\n",
    );
    let (rep, lines, _) = n.boot();
    assert_eq!(rep.error, None);
    assert_eq!(rep.phase, Phase::Ready);
    assert!(lines.last().unwrap().starts_with("clutch: phase=ready"));
    // clutch.toml's settings are all still there.
    assert!(
        n.read("/home/admin/.ssh/authorized_keys")
            .contains("me@laptop")
    );
    assert!(rep.plan.hostname.as_str().starts_with("node-"));
    assert!(
        n.read("/etc/modprobe.d/clutch-wifi-country.conf")
            .contains("regdom=GB"),
        "a lowercase country in a country-only [wlan] is the regulatory domain"
    );
    let w = n.status().warnings.join("\n");
    for want in [
        "/boot/firmware/custom.toml:3:12: system.hostname: `bad_name` is not a valid hostname",
        "/boot/firmware/custom.toml:7:10: locale.keymap: `en_US.UTF-8` is not a keyboard layout",
        "ssh.enabled: must be true or false, not string",
        "ssh.ssh_import_id: keys are not fetched",
        "extra: unknown section or key",
    ] {
        assert!(w.contains(want), "`{want}` missing from:\n{w}");
    }
    assert!(!n.exists("/etc/default/keyboard"));
    // Warnings stay visible at later boots, from the record.
    n.reboot();
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(n.status().warnings.join("\n").contains("en_US.UTF-8"));
}

#[test]
fn unparsable_boot_files_are_warnings_with_their_place() {
    let n = pi_node_with(&[
        ("custom.toml", "[system\n"),
        ("user-data", "#cloud-config\nusers: [\n"),
        (
            "network-config",
            "network:\n  version: 2\n  wifis: &a\n    x: *a\n",
        ),
    ]);
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    let w = n.status().warnings.join("\n");
    assert!(w.contains("/boot/firmware/custom.toml:1:"), "{w}");
    assert!(w.contains("/boot/firmware/user-data:3:"), "{w}");
    assert!(w.contains("aliases"), "{w}");
    assert!(
        !n.exists("/boot/firmware/user-data"),
        "applied (as far as it went) and removed"
    );
}

/// The boot-partition files of `tests/inputs/<case>/` as real producers write them:
/// applied on a Raspberry Pi node, the record they leave (`imported.toml`, with the
/// warnings) is `tests/golden/inputs/<case>.toml`.
#[test]
fn boot_partition_inputs_match_golden() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inputs");
    let mut cases: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 6, "{cases:?}");
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let files: Vec<(String, String)> = fs::read_dir(&case)
            .unwrap()
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read_to_string(e.path()).unwrap(),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let n = pi_node_with(&refs);
        // The fake useradd makes no account: the users these files define are there.
        write(
            &n.paths.host("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nadmin:x:1002:1002::/home/admin:/bin/bash\npi:x:1000:1000::/home/pi:/bin/bash\nbob:x:1001:1001::/home/bob:/bin/bash\n",
        );
        let (rep, _, _) = n.boot();
        assert_eq!(rep.error, None, "{name}");
        assert_eq!(rep.phase, Phase::Ready, "{name}");
        for (f, _) in &files {
            assert!(
                !n.exists(&format!("/boot/firmware/{f}")),
                "{name}: {f} left on the card"
            );
        }
        golden(
            &format!("inputs/{name}.toml"),
            &n.read("/var/lib/clutch/imported.toml"),
        );
    }
}

#[test]
fn custom_toml_hash_without_the_flag_is_a_hash() {
    // Raspberry Pi OS reads `password_encrypted` as true when it is absent.
    let yescrypt = "$y$j9T$Vh6qJ0z8Ff0q5R1zP3YxW/$3Ij4yC2m6m9m8m1yq6h0S6jXyU3mVt8yM3bV1v5rN8D";
    let n = pi_node(&format!(
        "[user]\nname = \"pi\"\npassword = \"{yescrypt}\"\n"
    ));
    let (rep, _, _) = n.boot();
    assert_eq!(rep.error, None);
    assert!(n.read("/etc/shadow").contains(&format!("pi:{yescrypt}:")));
}

#[test]
fn imager_cloud_init_user_logs_in_with_its_key_next_to_the_image_user() {
    let n = pi_node_with(&[
        ("meta-data", "instance-id: rpi-imager-1767225600000\n"),
        (
            "user-data",
            &format!(
                "#cloud-config\nhostname: garden\nmanage_etc_hosts: true\npackages:\n- avahi-daemon\n\n\
                 user:\n  name: alice\n  shell: /bin/bash\n  lock_passwd: true\n  ssh_authorized_keys:\n    - \"{KEY}\"\n  sudo: ALL=(ALL) NOPASSWD:ALL\n\nssh_pwauth: false\n"
            ),
        ),
    ]);
    write(&n.paths.host("/etc/shadow"), "admin:!:20000:0:99999:7:::\n");
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.plan.hostname.as_str(), "garden");
    assert!(
        calls.contains(
            &"run useradd -R $ROOT -m -s /bin/bash --user-group --groups sudo alice".to_string()
        ),
        "{calls:#?}"
    );
    // The fake useradd makes no passwd entry, so owning the keys fails visibly.
    assert!(
        rep.error
            .unwrap()
            .contains("user alice is not in /etc/passwd")
    );
    assert!(n.read("/etc/sudoers.d/clutch-alice").contains("NOPASSWD"));
}

#[test]
fn wifi_removed_from_config_removes_its_files() {
    let n = Node::new(Some(&cluster_config()));
    n.boot();
    let cfg = n.read("/boot/efi/clutch.toml");
    let start = cfg.find("[wifi]").unwrap();
    let end = cfg.find("# the lab").unwrap();
    write(
        &n.paths.host("/boot/efi/clutch.toml"),
        &format!("{}{}", &cfg[..start], &cfg[end..]),
    );
    n.reboot();
    let (rep, _, _) = n.boot();
    assert_eq!(rep.error, None);
    assert!(!n.exists("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"));
    assert!(!n.exists("/etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"));
}

#[test]
fn half_written_host_key_pair_is_regenerated() {
    let n = Node::new(Some(&basic()));
    n.reboot(); // all keys present
    fs::remove_file(n.paths.host("/etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(
        !n.exists("/etc/ssh/ssh_host_ed25519_key"),
        "orphan private key removed"
    );
    assert!(
        n.exists("/etc/ssh/ssh_host_ecdsa_key"),
        "complete pairs kept"
    );
    assert!(calls.contains(
        &"run ssh-keygen -q -t ed25519 -N  -f $ROOT/etc/ssh/ssh_host_ed25519_key".to_string()
    ));
    assert!(
        !calls.iter().any(|c| c.contains("-t ecdsa")),
        "the complete ECDSA pair is not made again: {calls:#?}"
    );
}

#[test]
fn machine_id_kept_when_systemd_already_made_one() {
    let n = Node::new(Some(&basic()));
    write(
        &n.paths.host("/etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    );
    n.boot();
    assert_eq!(
        n.read("/etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n"
    );
    let n = Node::new(Some(&basic()));
    write(&n.paths.host("/etc/machine-id"), "uninitialized\n");
    n.boot();
    assert!(crate::facts::is_node_id(n.read("/etc/machine-id").trim()));
}

#[test]
fn plan_is_deterministic_data() {
    let n = Node::new(Some(&basic()));
    let paths = &n.paths;
    let loaded = crate::load::load(paths, &crate::load::read_sources(paths)).unwrap();
    let facts = crate::facts::gather_for(paths, Some(&loaded.config));
    let fresh = crate::plan::Fresh {
        node_id: "abcdef".repeat(5) + "ab",
        machine_id: "1".repeat(32),
    };
    let p = crate::plan::plan(paths, &facts, &loaded, &fresh).unwrap();
    assert_eq!(p.hostname.as_str(), "node-abcdef");
    let names: Vec<&str> = p.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "identity",
            "users",
            "ssh",
            "system",
            "network",
            "storage-data0",
            "links"
        ]
    );
    assert!(
        p.notes
            .iter()
            .any(|n| n.contains("no GPT or MBR partition table")),
        "{:?}",
        p.notes
    );
    // planning twice gives the same plan; nothing was written
    let q = crate::plan::plan(paths, &facts, &loaded, &fresh).unwrap();
    assert_eq!(p.steps, q.steps);
    assert_eq!(n.read("/etc/hostname"), "clutch\n");
    let dbg = format!("{:?}", p.steps);
    assert!(dbg.contains("write /etc/hostname"), "{dbg}");
}

#[test]
fn secrets_never_appear_in_plan_debug_output() {
    let n = Node::new(Some(&cluster_config()));
    let paths = &n.paths;
    let loaded = crate::load::load(paths, &crate::load::read_sources(paths)).unwrap();
    let dbg = format!("{:?} {:?}", loaded.secret_actions, loaded.config);
    assert!(
        !dbg.contains(TOKEN) && !dbg.contains("correct horse"),
        "{dbg}"
    );
    let _: PathBuf = paths.state("x");
}

#[test]
fn wired_settings_left_by_an_older_firstboot_are_removed() {
    // The image ships 80-clutch-wired.network; a 20-clutch-wired.network would shadow it.
    let n = Node::new(Some(&basic()));
    let old = n.paths.host("/etc/systemd/network/20-clutch-wired.network");
    write(&old, "[Match]\nName=en*\n");
    let (rep, _, _) = n.boot();
    assert_eq!(rep.error, None);
    assert!(!old.exists());
    assert!(!n.exists("/etc/systemd/network/30-clutch-wlan0.network"));
}

// ---- power cuts: hold points (fault injection) and re-running half-done steps

/// A boot with the `clutch.hold` credential, whose fake `hold` fails: the step it is in stops
/// there, as if the power went (the other steps still run; a real node would stop).
fn boot_cut_at(n: &Node, point: &str) -> (Report, Vec<String>, Vec<String>) {
    let mut sys = FakeSys::new().with_credential(crate::hold::CREDENTIAL, point);
    sys.fail.push("hold".into());
    let (r, l) = n.boot_with(&sys);
    (r, l, sys.calls(n.root()))
}

fn pos(calls: &[String], prefix: &str) -> usize {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in {calls:#?}"))
}

/// An ext4 superblock (4 KiB blocks) for a file system of `bytes`, as `/dev/vda2`.
fn root_fs_of(n: &Node, bytes: u64) {
    let mut b = vec![0u8; 2048];
    b[1024 + 0x38] = 0x53;
    b[1024 + 0x39] = 0xEF;
    b[1024 + 0x18..1024 + 0x1C].copy_from_slice(&2u32.to_le_bytes());
    b[1024 + 4..1024 + 8].copy_from_slice(&((bytes / 4096) as u32).to_le_bytes());
    fs::write(n.paths.host("/dev/vda2"), b).unwrap();
}

/// What the kernel sees after a reboot once the table was grown: vda2 reaches the disk end.
fn partition_fills_disk(n: &Node) {
    write(
        &n.paths
            .host("/sys/devices/pci0000:00/virtio2/block/vda/vda2/size"),
        &format!("{}\n", 4_194_304 - 264_192 - 34),
    );
}

#[test]
fn no_hold_without_the_credential() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(!has(&calls, "hold"), "{calls:#?}");
    assert!(
        !rep.plan
            .steps
            .iter()
            .flat_map(|s| &s.actions)
            .any(|a| matches!(a, crate::plan::Action::Hold(_)))
    );
}

#[test]
fn hold_points_sit_where_the_power_cut_tests_need_them() {
    for point in ["hostname", "grow", "loop"] {
        let n = Node::new(Some(&basic()));
        with_gpt_disk(&n);
        let sys = FakeSys::new().with_credential(crate::hold::CREDENTIAL, point);
        let (rep, _) = n.boot_with(&sys);
        let calls = sys.calls(n.root());
        assert_eq!(rep.phase, Phase::Ready, "{point}: {:?}", rep.error);
        let holds: Vec<_> = calls.iter().filter(|c| c.starts_with("hold")).collect();
        assert_eq!(holds, vec![&format!("hold {point}")], "{point}");
        let h = pos(&calls, "hold");
        match point {
            "hostname" => {
                assert!(pos(&calls, "run ssh-keygen") < h && h < pos(&calls, "sethostname"));
                let id_step = rep.plan.step("identity").unwrap();
                let at = |f: &dyn Fn(&crate::plan::Action) -> bool| {
                    id_step.actions.iter().position(f).unwrap()
                };
                let hold = at(&|a| matches!(a, crate::plan::Action::Hold(_)));
                let node_id = at(&|a| format!("{a:?}").contains("/var/lib/clutch/node-id"));
                let hostname = at(&|a| format!("{a:?}").contains("/etc/hostname"));
                assert!(node_id < hold && hold < hostname, "{id_step:#?}");
            }
            "grow" => {
                assert_eq!(calls[h - 1], "grow_partition $ROOT/dev/vda 2 Gpt");
                assert_eq!(calls[h + 1], "run resize2fs /dev/vda2");
            }
            "loop" => {
                assert_eq!(
                    calls[h + 1],
                    "attach_loop $ROOT/var/lib/clutch/storage/data0.img -> loop0"
                );
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn cut_before_the_hostname_keeps_the_node_id() {
    let n = Node::new(Some(&basic()));
    let (cut, lines, _) = boot_cut_at(&n, "hostname");
    let id = cut.plan.node_id.clone();
    let host = format!("node-{}", &id[..6]);
    assert!(lines[0].contains(&format!("host={host}")), "{lines:?}");
    // The id is on disk, the host name is not yet.
    assert_eq!(n.read("/var/lib/clutch/node-id").trim(), id);
    assert_eq!(n.read("/etc/hostname"), "clutch\n");
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert_eq!(rep.plan.node_id, id);
    assert_eq!(n.read("/etc/hostname"), format!("{host}\n"));
    assert!(calls.contains(&format!("sethostname {host}")));
}

#[test]
fn cut_between_partition_and_file_system_grow_finishes_the_file_system() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    let old_fs = 1_048_576 * 512;
    root_fs_of(&n, old_fs);
    let (_, _, calls) = boot_cut_at(&n, "grow");
    assert!(has(&calls, "grow_partition"));
    assert!(!has(&calls, "run resize2fs"), "cut before resize2fs");
    assert!(!n.exists("/var/lib/clutch/done/grow-root"));

    // Next boot: the partition is grown, the file system is not.
    n.reboot();
    partition_fills_disk(&n);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(!has(&calls, "grow_partition"), "{calls:#?}");
    assert!(calls.contains(&"run resize2fs /dev/vda2".to_string()));
    assert!(
        rep.plan
            .notes
            .iter()
            .any(|x| x.contains("growing its file system")),
        "{:?}",
        rep.plan.notes
    );
    assert!(n.exists("/var/lib/clutch/done/grow-root"));
}

#[test]
fn grown_partition_and_file_system_need_nothing() {
    let n = Node::new(Some(&basic()));
    with_gpt_disk(&n);
    partition_fills_disk(&n);
    root_fs_of(&n, (4_194_304 - 264_192 - 34) / 8 * 8 * 512);
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready);
    assert!(!has(&calls, "grow_partition") && !has(&calls, "run resize2fs"));
    assert!(n.exists("/var/lib/clutch/done/grow-root"));
    assert_eq!(rep.plan.step("grow-root").unwrap().actions, vec![]);
}

#[test]
fn cut_before_attaching_keeps_the_backing_file_and_its_data() {
    let n = Node::new(Some(&basic()));
    n.boot();
    // Data written through /dev/clutch/data0 lands in the backing file.
    let img = n.paths.host("/var/lib/clutch/storage/data0.img");
    let pattern = b"clutch power cut pattern";
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(pattern).unwrap();
    }
    n.reboot();
    let (rep, _, calls) = boot_cut_at(&n, "loop");
    assert!(!has(&calls, "attach_loop"), "cut before the attach");
    assert!(!n.exists("/dev/clutch/data0"));
    assert!(
        rep.error
            .as_deref()
            .unwrap_or("")
            .starts_with("storage-data0: "),
        "{:?}",
        rep.error
    );
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(has(&calls, "attach_loop"));
    assert_eq!(
        fs::read_link(n.paths.host("/dev/clutch/data0")).unwrap(),
        Path::new("/dev/loop0")
    );
    assert_eq!(fs::metadata(&img).unwrap().len(), 2 << 30);
    let mut back = vec![0u8; pattern.len()];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = fs::File::open(&img).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert_eq!(back, pattern);
}

#[test]
fn cut_on_the_very_first_loop_setup_attaches_next_boot() {
    // The backing file was made at the cut; nothing attached, no data yet.
    let n = Node::new(Some(&basic()));
    let (_, _, calls) = boot_cut_at(&n, "loop");
    assert!(!has(&calls, "attach_loop"));
    let img = n.paths.host("/var/lib/clutch/storage/data0.img");
    assert_eq!(fs::metadata(&img).unwrap().len(), 2 << 30);
    n.reboot();
    let (rep, _, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(has(&calls, "attach_loop"));
    assert_eq!(n.status().storage[0].loop_device, "/dev/loop0");
}

#[test]
fn everything_is_synced_before_ready() {
    let n = Node::new(Some(&basic()));
    let (_, _, calls) = n.boot();
    let sync = pos(&calls, "syncfs $ROOT");
    assert!(sync > pos(&calls, "run ssh-keygen"));
    assert!(sync < pos(&calls, "notify READY=1"));
}

/// The user-name rule of the config crate at first boot: a system account's name is a
/// warning, never a failed node, and that account gets no keys, shell or sudo.
#[test]
fn a_system_account_as_user_name_is_a_warning_and_nothing_is_touched() {
    let n = Node::new(Some(
        &basic().replace("name = \"admin\"", "name = \"daemon\""),
    ));
    write(
        &n.paths.host("/etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nadmin:x:1000:1000::/home/admin:/bin/bash\n",
    );
    let (rep, lines, calls) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(lines.last().unwrap().starts_with("clutch: phase=ready"));
    assert!(rep.plan.step("users").is_none(), "{:?}", rep.plan.steps);
    assert_eq!(
        rep.plan.user, None,
        "no admin user for the cluster tools either"
    );
    assert!(!has(&calls, "run useradd"), "{calls:#?}");
    assert!(!n.exists("/etc/sudoers.d/clutch-daemon"));
    assert!(!n.exists("/usr/sbin/.ssh"));
    let st = n.status();
    assert_eq!(st.warnings.len(), 1, "{:?}", st.warnings);
    assert!(
        st.warnings[0].starts_with("user `daemon`: `daemon` is a system account (uid 1)")
            && st.warnings[0].ends_with("no user was created or changed"),
        "{}",
        st.warnings[0]
    );
    assert!(st.human().contains("warning:  user `daemon`: `daemon`"));
}

/// custom.toml naming the user like a base-system group (Raspberry Pi Imager lets anyone
/// type `operator`): the user is made with primary group `users`, as the builder would.
#[test]
fn custom_toml_user_named_like_a_group_gets_the_users_group() {
    let n = pi_node(&CUSTOM.replace("name = \"pi\"", "name = \"operator\""));
    let (rep, _, calls) = n.boot();
    assert!(
        calls.contains(
            &"run useradd -R $ROOT -m -s /bin/bash --no-user-group --gid users --groups sudo operator"
                .to_string()
        ),
        "{calls:#?}"
    );
    assert_eq!(
        rep.plan.user.as_deref(),
        Some("admin"),
        "the cluster tools' user stays clutch.toml's"
    );
    // The fake useradd made no passwd entry, so owning the keys fails visibly.
    assert!(
        rep.error
            .unwrap()
            .contains("user operator is not in /etc/passwd")
    );
}

#[test]
fn custom_toml_legacy_time_zone_is_mapped_to_the_modern_one() {
    let n = pi_node(&CUSTOM.replace("Europe/Berlin", "US/Eastern"));
    let (rep, _, _) = n.boot();
    assert_eq!(rep.error, None);
    assert_eq!(
        fs::read_link(n.paths.host("/etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/America/New_York")
    );
    assert_eq!(n.read("/etc/timezone"), "America/New_York\n");
    let w = n.status().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("`US/Eastern` is a legacy name"), "{w:?}");
    assert!(w[0].contains("using `America/New_York`"), "{w:?}");
}

#[test]
fn an_unknown_time_zone_keeps_utc_and_never_dangles() {
    let n = Node::new(Some(&basic().replace("Europe/London", "Europe/Atlantis")));
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert_eq!(
        fs::read_link(n.paths.host("/etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert!(n.status().warnings[0].contains("no time zone `Europe/Atlantis`"));
    // A node without even UTC (no tzdata): no /etc/localtime at all, which means UTC.
    fs::remove_dir_all(n.paths.host("/usr/share/zoneinfo")).unwrap();
    n.reboot();
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Ready, "{:?}", rep.error);
    assert!(!n.exists("/etc/localtime"));
    assert_eq!(n.read("/etc/timezone"), "UTC\n");
}

/// A power cut after the secrets' bytes were overwritten on the card but before the
/// stripped clutch.toml replaced it: the tombstones read as "moved", the stored copies are
/// used, and the rewrite finishes.
#[test]
fn a_cut_between_overwrite_and_rewrite_loses_nothing() {
    let hash = "$y$j9T$abcdefgh$0123456789abcdefghijklmnopqrstuvwxyzABCDEF";
    let cfg = cluster_config().replace(
        "name = \"admin\"\n",
        &format!("name = \"admin\"\npassword_hash = \"{hash}\"\n"),
    );
    let n = Node::new(Some(&cfg));
    let paths = &n.paths;
    let loaded = crate::load::load(paths, &crate::load::read_sources(paths)).unwrap();
    // Carry out the secrets step only up to the overwrite.
    for a in &loaded.secret_actions {
        if matches!(a, crate::plan::Action::WriteFile { path, .. } if path.starts_with("/boot")) {
            break;
        }
        let step = crate::plan::Step {
            name: "secrets".into(),
            marker: false,
            actions: vec![a.clone()],
        };
        let plan = crate::plan::Plan {
            steps: vec![step],
            ..crate::plan::plan_safe(
                paths,
                &crate::facts::Facts::default(),
                &crate::plan::Fresh {
                    node_id: "0".repeat(32),
                    machine_id: "0".repeat(32),
                },
                None,
            )
        };
        let out = crate::apply::apply(&plan, paths, &FakeSys::new());
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    }
    let cut = n.read("/boot/efi/clutch.toml");
    assert_eq!(cut.len(), cfg.len(), "overwritten in place");
    assert!(!cut.contains(TOKEN) && !cut.contains(hash) && !cut.contains("correct horse"));
    assert!(
        cut.contains(&format!("token = \"{}\"", "*".repeat(TOKEN.len()))),
        "{cut}"
    );
    assert_eq!(n.read("/var/lib/clutch/password-hash"), format!("{hash}\n"));
    // Next boot.
    let (rep, _, _) = n.boot();
    assert_eq!(rep.phase, Phase::Discovering, "{:?}", rep.error);
    assert_eq!(rep.plan.cluster.unwrap().1.expose(), TOKEN);
    assert!(n.read("/etc/shadow").contains(&format!("admin:{hash}:")));
    let fat = n.read("/boot/efi/clutch.toml");
    assert!(
        !fat.contains('*') && !fat.contains("token") && !fat.contains("password_hash"),
        "{fat}"
    );
    assert_eq!(n.mode("/var/lib/clutch/password-hash"), 0o600);
}
