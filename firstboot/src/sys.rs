//! Every system call that changes the machine goes through [`Sys`]. [`RealSys`] does it;
//! [`FakeSys`] records it, for tests. File contents are written by the apply layer with
//! plain file I/O under the root directory (a temp dir in tests), so they are not here.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::hold::HoldPoint;

/// An external command (ssh-keygen, mkfs.ext4, resize2fs, chpasswd, systemctl).
#[derive(Clone, PartialEq, Eq)]
pub struct Cmd {
    pub program: String,
    pub args: Vec<String>,
    /// Fed to the command's standard input; redacted in Debug/Display (passwords).
    pub stdin: Option<String>,
}

impl Cmd {
    pub fn new(program: &str, args: &[&str]) -> Self {
        Cmd {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: None,
        }
    }
    pub fn arg_path(mut self, p: &Path) -> Self {
        self.args.push(p.display().to_string());
        self
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.program)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        if self.stdin.is_some() {
            f.write_str(" <stdin redacted>")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cmd({self})")
    }
}

/// The partition table of the root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
}

pub trait Sys {
    /// Fills `buf` with random bytes (node id, machine id).
    fn random(&self, buf: &mut [u8]);
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn run(&self, cmd: &Cmd) -> io::Result<()>;
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    /// Attaches `backing` to a free loop device (nodes under `dev`); returns its number.
    fn attach_loop(&self, backing: &Path, dev: &Path) -> io::Result<u32>;
    fn mount(&self, source: &Path, target: &Path, fstype: &str) -> io::Result<()>;
    /// Grows partition `partno` of `disk` to the end of the disk and tells the kernel.
    fn grow_partition(&self, disk: &Path, partno: u32, kind: TableKind) -> io::Result<()>;
    /// Sets the named links administratively up.
    fn links_up(&self, names: &[String]) -> io::Result<()>;
    /// sd_notify(3) message, e.g. `READY=1`. A no-op without `NOTIFY_SOCKET`.
    fn notify(&self, msg: &str) -> io::Result<()>;
    /// The systemd credential `name` (from `$CREDENTIALS_DIRECTORY`), if the unit has it.
    fn credential(&self, name: &str) -> io::Result<Option<String>>;
    /// Fault injection ([`crate::hold`]): says so on the consoles and never returns on a
    /// node, so a test can cut the power here.
    fn hold(&self, point: HoldPoint) -> io::Result<()>;
    /// Makes everything written to the file system holding `path` durable (syncfs(2)),
    /// including what external commands (ssh-keygen, useradd, resize2fs) wrote.
    fn syncfs(&self, path: &Path) -> io::Result<()>;
}

/// The real thing.
#[derive(Debug, Default)]
pub struct RealSys;

impl Sys for RealSys {
    fn random(&self, buf: &mut [u8]) {
        use rand::Rng;
        rand::rng().fill_bytes(buf);
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name).map_err(io::Error::from)
    }

    fn run(&self, cmd: &Cmd) -> io::Result<()> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        tracing::info!("running {cmd}");
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", cmd.program)))?;
        if let (Some(input), Some(mut pipe)) = (&cmd.stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(io::Error::other(format!(
                "{} failed ({}): {}",
                cmd.program,
                out.status,
                err.trim()
            )));
        }
        Ok(())
    }

    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn attach_loop(&self, backing: &Path, dev: &Path) -> io::Result<u32> {
        crate::loopdev::attach(backing, dev)
    }

    fn mount(&self, source: &Path, target: &Path, fstype: &str) -> io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            nix::mount::MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("mount {} on {}: {e}", source.display(), target.display()),
            )
        })
    }

    fn grow_partition(&self, disk: &Path, partno: u32, kind: TableKind) -> io::Result<()> {
        let g = crate::grow::grow_table(disk, partno, kind)?;
        crate::grow::tell_kernel(disk, partno, g.start_bytes, g.len_bytes)
    }

    fn links_up(&self, names: &[String]) -> io::Result<()> {
        crate::links::links_up(names)
    }

    fn notify(&self, msg: &str) -> io::Result<()> {
        let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(());
        };
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        let b = sock.as_encoded_bytes();
        if let Some(name) = b.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            s.send_to(msg.as_bytes(), PathBuf::from(sock))?;
        }
        Ok(())
    }

    fn credential(&self, name: &str) -> io::Result<Option<String>> {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        crate::hold::read_credential(dir.as_deref(), name)
    }

    fn hold(&self, point: HoldPoint) -> io::Result<()> {
        tracing::warn!("fault injection: holding at `{point}` until the power is cut");
        crate::status::print_console(&point.console_line());
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }

    fn syncfs(&self, path: &Path) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path)?;
        // SAFETY: syncfs takes an open file descriptor, which `f` keeps alive.
        if unsafe { libc::syncfs(f.as_raw_fd()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Records every call as one line; deterministic randomness; can be told to fail calls.
#[derive(Debug, Default)]
pub struct FakeSys {
    log: Mutex<Vec<String>>,
    /// Calls whose log line starts with one of these fail with an I/O error.
    pub fail: Vec<String>,
    next_loop: Mutex<u32>,
    counter: Mutex<u8>,
    credentials: std::collections::BTreeMap<String, String>,
}

impl FakeSys {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn failing(prefixes: &[&str]) -> Self {
        FakeSys {
            fail: prefixes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
    /// With the systemd credential `name` set to `value`.
    pub fn with_credential(mut self, name: &str, value: &str) -> Self {
        self.credentials.insert(name.into(), value.into());
        self
    }
    /// The recorded calls, with `root` (the temp root) shown as `$ROOT`.
    pub fn calls(&self, root: &Path) -> Vec<String> {
        let r = root.display().to_string();
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.replace(&r, "$ROOT"))
            .collect()
    }
    fn record(&self, line: String) -> io::Result<()> {
        let failed = self.fail.iter().any(|p| line.starts_with(p.as_str()));
        self.log.lock().unwrap().push(line.clone());
        if failed {
            Err(io::Error::other(format!("fake failure: {line}")))
        } else {
            Ok(())
        }
    }
}

impl Sys for FakeSys {
    fn random(&self, buf: &mut [u8]) {
        let mut c = self.counter.lock().unwrap();
        for b in buf.iter_mut() {
            *c = c.wrapping_add(1);
            *b = c.wrapping_mul(37);
        }
    }
    fn sethostname(&self, name: &str) -> io::Result<()> {
        self.record(format!("sethostname {name}"))
    }
    fn run(&self, cmd: &Cmd) -> io::Result<()> {
        self.record(format!("run {cmd}"))
    }
    fn chown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.record(format!("chown {} {uid}:{gid}", path.display()))
    }
    fn attach_loop(&self, backing: &Path, _dev: &Path) -> io::Result<u32> {
        let mut n = self.next_loop.lock().unwrap();
        self.record(format!("attach_loop {} -> loop{}", backing.display(), *n))?;
        *n += 1;
        Ok(*n - 1)
    }
    fn mount(&self, source: &Path, target: &Path, fstype: &str) -> io::Result<()> {
        self.record(format!(
            "mount {} {} {fstype}",
            source.display(),
            target.display()
        ))
    }
    fn grow_partition(&self, disk: &Path, partno: u32, kind: TableKind) -> io::Result<()> {
        self.record(format!(
            "grow_partition {} {partno} {kind:?}",
            disk.display()
        ))
    }
    fn links_up(&self, names: &[String]) -> io::Result<()> {
        self.record(format!("links_up {}", names.join(" ")))
    }
    fn notify(&self, msg: &str) -> io::Result<()> {
        self.record(format!("notify {msg}"))
    }
    fn credential(&self, name: &str) -> io::Result<Option<String>> {
        Ok(self.credentials.get(name).cloned())
    }
    /// Records `hold <point>` and returns: a test that wants the step cut short there
    /// makes the fake fail `hold` (the rest of the step is then skipped, as after a crash).
    fn hold(&self, point: HoldPoint) -> io::Result<()> {
        self.record(format!("hold {point}"))
    }
    fn syncfs(&self, path: &Path) -> io::Result<()> {
        self.record(format!("syncfs {}", path.display()))
    }
}
