//! Harness for the boot tests: builds images with the `clutch` binary, starts them under QEMU
//! with the VM code `clutch lab` uses (clutch_builder::lab::vm: KVM when a probe VM boots
//! under it, else TCG), reads the serial console and fails with the console log attached when
//! an expected line does not come in time. Every VM is killed (by its own pid) when its handle
//! is dropped, also when a test panics.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The lab (clutch_builder::lab) for the 3-VM lab test and the lab benchmark.
pub mod lab;

use clutch_builder::lab::vm::{self as labvm, Accel, AccelChoice};
use clutch_builder::lab::{RealHost, ops};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// Folder for test artifacts (images, logs, keys), kept after the run for inspection.
pub fn artifacts() -> PathBuf {
    let d = workspace().join("target/qemu-tests");
    std::fs::create_dir_all(&d).expect("create target/qemu-tests");
    d
}

/// A release-signing key at `path`, made with `clutch update-key` the first time.
pub fn release_key(path: &Path) -> PathBuf {
    if !path.exists() {
        let st = Command::new(bin("clutch"))
            .arg("update-key")
            .arg(path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "clutch update-key {}", path.display());
    }
    path.to_path_buf()
}

/// The release binaries the tests drive (`cargo build --release --bins` first).
pub fn bin(name: &str) -> PathBuf {
    let p = workspace().join("target/release").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release --bins` before the boot tests",
        p.display()
    );
    p
}

/// Held while a test boots VMs: two cores do not run several TCG guests well, so boot tests
/// take turns, also across test processes (an flock on `target/qemu-tests/.boot-lock`).
pub struct BootLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

pub fn serial_lock() -> BootLock {
    let f = std::fs::File::create(artifacts().join(".boot-lock")).expect("create boot lock");
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock boot lock");
    BootLock { _lock: lock }
}

/// A throwaway ed25519 key pair for logging into test guests.
pub struct SshKey {
    pub private: PathBuf,
    pub public_line: String,
}

pub fn ssh_key() -> &'static SshKey {
    static K: OnceLock<SshKey> = OnceLock::new();
    K.get_or_init(|| {
        let dir = artifacts().join("ssh");
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("id_ed25519");
        if !private.exists() {
            let st = Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "clutch-qemu-test",
                    "-f",
                ])
                .arg(&private)
                .status()
                .expect("ssh-keygen (package openssh-client)");
            assert!(st.success());
        }
        let public_line = std::fs::read_to_string(private.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string();
        SshKey {
            private,
            public_line,
        }
    })
}

/// Writes a copy of `image-configs/<base>.toml` with the test key as the only authorized key
/// and `edit` applied to the text, named `<name>.toml` in the artifacts folder.
pub fn test_config(base: &str, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(
        workspace()
            .join("image-configs")
            .join(format!("{base}.toml")),
    )
    .unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("authorized_keys") {
            out.push_str(&format!(
                "authorized_keys = [\"{}\"]\n",
                ssh_key().public_line
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let dir = artifacts().join("configs");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, edit(out)).unwrap();
    p
}

/// The cache shared by every build of the test run (and by CI runs on the same machine).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CLUTCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/clutch-cache"))
}

/// Builds `config` with the release `clutch` binary; returns the main artifact's path.
pub fn build_image(config: &Path, formats: &str) -> Result<PathBuf> {
    build_image_with(config, formats, Some(&bin("clutch-firstboot")))
}

/// `clutch build CONFIG --out OUT --format FORMATS` with the test run's cache, this
/// checkout's boards and overlays, and `firstboot` (None: clutch finds or cross-builds it).
pub fn build_command(
    config: &Path,
    out: &Path,
    formats: &str,
    firstboot: Option<&Path>,
) -> Command {
    build_command_in(&cache_dir(), config, out, formats, firstboot)
}

/// [`build_command`] with another cache folder.
pub fn build_command_in(
    cache: &Path,
    config: &Path,
    out: &Path,
    formats: &str,
    firstboot: Option<&Path>,
) -> Command {
    let mut c = Command::new(bin("clutch"));
    c.arg("build")
        .arg(config)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .arg("--format")
        .arg(formats)
        .arg("--data-dir")
        .arg(workspace());
    if let Some(f) = firstboot {
        c.arg("--firstboot-bin").arg(f);
    }
    c
}

/// Like [`build_image`]; `firstboot: None` lets `clutch` find (or cross-build) the
/// clutch-firstboot binary for the board's architecture itself.
pub fn build_image_with(config: &Path, formats: &str, firstboot: Option<&Path>) -> Result<PathBuf> {
    let name = config.file_stem().unwrap().to_string_lossy().into_owned();
    let out = artifacts().join("out").join(&name);
    let t = Instant::now();
    let o = build_command(config, &out, formats, firstboot)
        .stderr(Stdio::inherit())
        .output()
        .context("running clutch build")?;
    if !o.status.success() {
        bail!("clutch build {} failed ({})", config.display(), o.status);
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last = stdout
        .lines()
        .last()
        .context("clutch build printed nothing on stdout")?;
    eprintln!("built {} in {:.0}s", last, t.elapsed().as_secs_f64());
    Ok(PathBuf::from(last))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default SeaBIOS.
    Bios,
    /// OVMF (package ovmf), on the default `pc` machine.
    Uefi,
}

pub struct VmOpts {
    pub name: String,
    pub disk: PathBuf,
    /// Disk format of `disk` (`raw` or `qcow2`).
    pub format: &'static str,
    pub firmware: Firmware,
    pub memory_mib: u32,
    /// Extra QEMU arguments (network, more disks).
    pub extra: Vec<String>,
}

/// A kernel, initrd and command line for direct kernel boot (`-kernel`), e.g. taken from an
/// image's boot partition.
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// A running VM whose serial console is captured.
pub struct Vm {
    pub name: String,
    child: Child,
    console: Arc<(Mutex<String>, Condvar)>,
    pub log_path: PathBuf,
    _vars: Option<tempfile::NamedTempFile>,
}

/// A qcow2 overlay on `base`, so a test never changes the built image. `size` grows the disk.
pub fn overlay(base: &Path, name: &str, size: Option<&str>) -> Result<PathBuf> {
    let p = artifacts().join(format!("{name}.qcow2"));
    let _ = std::fs::remove_file(&p);
    let argv = labvm::overlay_cmd(base, &p, size);
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    let st = c.status().context("qemu-img (package qemu-utils)")?;
    if !st.success() {
        bail!("qemu-img create failed for {}", p.display());
    }
    Ok(p)
}

/// The accelerator of this test process's x86 VMs: decided once, by the same probe as
/// `clutch lab up` (booting `disk`, the first VM's, under KVM until its kernel starts).
pub fn accel(disk: &Path) -> Accel {
    static A: OnceLock<Accel> = OnceLock::new();
    *A.get_or_init(|| {
        let d = ops::choose_accel(&RealHost, AccelChoice::Auto, disk).unwrap_or_else(|e| {
            labvm::AccelDecision {
                accel: Accel::Tcg,
                reason: format!("{e:#}"),
            }
        });
        eprintln!("boot tests: accelerator {} ({})", d.accel, d.reason);
        d.accel
    })
}

/// What every test VM has besides its machine: the serial console on stdio (read by the
/// harness), no reboot, and `o.disk` as a virtio disk.
fn console_and_disk(c: &mut Command, o: &VmOpts) {
    c.args(["-serial", "stdio", "-no-reboot", "-drive"])
        .arg(format!(
            "file={},format={},if=virtio",
            o.disk.display(),
            o.format
        ));
}

impl Vm {
    pub fn start(o: VmOpts) -> Result<Vm> {
        let log_path = artifacts().join(format!("{}.console.log", o.name));
        let mut c = Command::new(labvm::QEMU_X86);
        c.args(labvm::headless_args(accel(&o.disk), o.memory_mib));
        console_and_disk(&mut c, &o);
        let mut vars = None;
        if o.firmware == Firmware::Uefi {
            let v = tempfile::NamedTempFile::new_in(artifacts())?;
            std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", v.path())
                .context("OVMF vars (package ovmf)")?;
            c.arg("-drive")
                .arg("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
                .arg("-drive")
                .arg(format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    v.path().display()
                ));
            vars = Some(v);
        }
        c.args(&o.extra);
        Vm::spawn(o.name, log_path, c, vars, "qemu-system-x86")
    }

    /// Boots an arm64 image's own kernel and initrd (`boot`) on QEMU's `virt` machine under
    /// TCG, with `o.disk` as a virtio disk and the serial console on the PL011 (ttyAMA0).
    /// `o.firmware` is not used: the kernel is loaded directly.
    pub fn start_aarch64(o: VmOpts, boot: &DirectBoot) -> Result<Vm> {
        let log_path = artifacts().join(format!("{}.console.log", o.name));
        let mut c = Command::new("qemu-system-aarch64");
        // cortex-a72 (no pointer authentication) is much faster under TCG than `max`.
        c.args(["-machine", "virt", "-accel", "tcg", "-cpu", "cortex-a72"])
            .arg("-m")
            .arg(o.memory_mib.to_string())
            .args(["-smp", "1", "-display", "none", "-monitor", "none"]);
        console_and_disk(&mut c, &o);
        c.arg("-kernel")
            .arg(&boot.kernel)
            .arg("-initrd")
            .arg(&boot.initrd)
            .arg("-append")
            .arg(&boot.append);
        c.args(&o.extra);
        Vm::spawn(o.name, log_path, c, None, "qemu-system-arm")
    }

    fn spawn(
        name: String,
        log_path: PathBuf,
        mut c: Command,
        vars: Option<tempfile::NamedTempFile>,
        package: &str,
    ) -> Result<Vm> {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().with_context(|| {
            format!(
                "starting {} (package {package})",
                c.get_program().to_string_lossy()
            )
        })?;
        let console = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let mut log = std::fs::File::create(&log_path)?;
        let out = child.stdout.take().expect("piped");
        let cons = console.clone();
        std::thread::spawn(move || {
            // Whatever arrives, not whole lines: prompts such as `login: ` end without a
            // newline. A UTF-8 sequence cut at the end of a read waits for the next one.
            let mut r = out;
            let mut chunk = [0u8; 4096];
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let n = match std::io::Read::read(&mut r, &mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log.write_all(&chunk[..n]);
                pending.extend_from_slice(&chunk[..n]);
                let keep = match std::str::from_utf8(&pending) {
                    Err(e) if e.error_len().is_none() => pending.len() - e.valid_up_to(),
                    _ => 0,
                };
                let take = pending.len() - keep;
                let text = String::from_utf8_lossy(&pending[..take]).replace('\r', "");
                pending.drain(..take);
                let (m, cv) = &*cons;
                m.lock().unwrap().push_str(&text);
                cv.notify_all();
            }
        });
        let err = child.stderr.take().expect("piped");
        let cons = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let (m, cv) = &*cons;
                m.lock()
                    .unwrap()
                    .push_str(&format!("[qemu stderr] {line}\n"));
                cv.notify_all();
            }
        });
        Ok(Vm {
            name,
            child,
            console,
            log_path,
            _vars: vars,
        })
    }

    pub fn console(&self) -> String {
        self.console.0.lock().unwrap().clone()
    }

    /// Waits until the console shows a line containing `needle` after byte `from`; returns the
    /// console offset just past it. Fails with the console log when it does not come in time
    /// or QEMU exits.
    pub fn wait_for_from(&mut self, from: usize, needle: &str, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.console;
        let mut text = m.lock().unwrap();
        loop {
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return Ok(from + i + needle.len());
            }
            let now = Instant::now();
            let exited = self.child.try_wait().ok().flatten();
            if now >= deadline || exited.is_some() {
                let why = match exited {
                    Some(st) => format!("QEMU exited ({st})"),
                    None => format!("not seen within {}s", timeout.as_secs()),
                };
                bail!(
                    "{}: waiting for `{needle}`: {why}\n----- console of {} ({}) -----\n{}\n----- end of console -----",
                    self.name,
                    self.name,
                    self.log_path.display(),
                    tail(&text, 200)
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(500));
            text = cv.wait_timeout(text, wait).unwrap().0;
        }
    }

    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<usize> {
        self.wait_for_from(0, needle, timeout)
    }

    /// Waits for the first `clutch: phase=` line that is not `configuring` (the phase this
    /// boot of clutch-firstboot ends in, or waits in); returns the whole line.
    pub fn final_phase_line(&mut self, timeout: Duration) -> Result<String> {
        let mut from = 0;
        loop {
            let end = self.wait_for_from(from, "clutch: phase=", timeout)?;
            let eol = self.wait_for_from(end, "\n", timeout)?;
            let line = format!("clutch: phase={}", self.console()[end..eol].trim());
            if !line.starts_with("clutch: phase=configuring") {
                return Ok(line);
            }
            from = eol;
        }
    }

    /// Fails the test with `what` and the whole console.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n----- console of {} ({}) -----\n{}\n----- end of console -----",
            self.name,
            self.log_path.display(),
            self.console()
        )
    }

    /// Waits for the guest to power itself off (QEMU runs with `-no-reboot`, so a reboot
    /// inside the guest ends QEMU too). Fails with the console log when it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: QEMU still running {}s after the guest was told to power off\n----- console of {} ({}) -----\n{}\n----- end of console -----",
                    self.name,
                    timeout.as_secs(),
                    self.name,
                    self.log_path.display(),
                    tail(&self.console(), 200)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Ends the VM (SIGKILL to our own QEMU process) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A free TCP port on loopback (for QEMU's user-mode `hostfwd`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// QEMU arguments that hand the guest a systemd system credential `name=value` (SMBIOS
/// type 11 strings, which systemd imports into `/run/credentials/@system` in a VM). Units
/// see it with `ImportCredential=name`, e.g. clutch-firstboot's `clutch.hold` hold points.
pub use clutch_builder::lab::vm::smbios_credential;

/// Where the FAT partition starts on an amd64 image (the first partition, at 1 MiB).
pub const ESP_OFFSET: u64 = 1 << 20;

/// Runs an mtools command (`mcopy`, `mtype`, ...); its stdout.
pub fn mtools(args: &[&str]) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("{} (package mtools): {e}", args[0]));
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The mtools name of an amd64 image's FAT partition.
pub fn fat(img: &Path) -> String {
    format!("{}@@{ESP_OFFSET}", img.display())
}

/// User-mode networking with the guest's ssh on `127.0.0.1:port`. Guest traffic stays inside
/// QEMU's private slirp network (`restrict=on`: no route to the outside).
pub fn user_net_with_ssh(port: u16) -> Vec<String> {
    vec![
        "-nic".into(),
        format!("user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"),
    ]
}

/// Runs `cmd` in the guest over ssh as the image configs' user `admin`, retrying while sshd
/// comes up.
pub fn ssh(port: u16, cmd: &str, timeout: Duration) -> Result<String> {
    ssh_as(port, "admin", cmd, timeout)
}

/// [`ssh`] as `user`.
pub fn ssh_as(port: u16, user: &str, cmd: &str, timeout: Duration) -> Result<String> {
    let target = format!("{user}@127.0.0.1");
    let deadline = Instant::now() + timeout;
    loop {
        let o = Command::new("ssh")
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-i",
            ])
            .arg(&ssh_key().private)
            .args(["-p", &port.to_string(), &target, cmd])
            .stdin(Stdio::null())
            .output()
            .context("ssh (package openssh-client)")?;
        if o.status.success() {
            return Ok(String::from_utf8_lossy(&o.stdout).into_owned());
        }
        // 255 is ssh's own failure (not up yet); anything else is the command's.
        if o.status.code() != Some(255) || Instant::now() > deadline {
            bail!(
                "ssh `{cmd}` failed ({}): {}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// `KEY=VALUE` lines (what the tests' guest scripts print) as a map.
pub fn kv(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The value of `k` in a [`kv`] map; panics (showing the map) when the guest did not say.
pub fn kv_get<'a>(m: &'a std::collections::BTreeMap<String, String>, k: &str) -> &'a str {
    m.get(k)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("guest did not report `{k}`: {m:#?}"))
}

/// [`kv_get`] as a number.
pub fn kv_num(m: &std::collections::BTreeMap<String, String>, k: &str) -> u64 {
    kv_get(m, k)
        .parse()
        .unwrap_or_else(|_| panic!("`{k}` is not a number: {m:#?}"))
}
