//! The lab's side effects on the host: running commands (ip, dnsmasq, qemu, ssh), looking at
//! and signalling processes. [`RealHost`] does them; the tests use a fake that records them.
//! Files in the lab's own folder are written directly (the folder is a parameter).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd;

/// A finished (or timed-out) command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Captured {
    /// `None`: killed by a signal, or by us at the timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
    pub timed_out: bool,
}

impl Captured {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Whether a command's output so far (stdout, stderr) says all that is needed.
pub type Enough = dyn Fn(&str, &str) -> bool + Sync;

pub trait Host: Sync {
    /// Runs a command to completion; fails with its stderr.
    fn run(&self, argv: &[String]) -> Result<String>;
    /// Runs a command, capturing its output, killed after `timeout`; a non-zero exit is
    /// not an error here (the caller reads `code`).
    fn output(&self, argv: &[String], timeout: Duration) -> Result<Captured> {
        self.output_until(argv, timeout, &|_, _| false)
    }
    /// [`Host::output`] that also kills the command as soon as `enough(stdout, stderr)` holds
    /// (then `code` is `None` and `timed_out` false).
    fn output_until(&self, argv: &[String], timeout: Duration, enough: &Enough)
    -> Result<Captured>;
    /// Runs a command on this terminal (stdin, stdout, stderr passed through); its exit code.
    fn interactive(&self, argv: &[String]) -> Result<Option<i32>>;
    fn exists(&self, path: &Path) -> bool;
    fn netns_exists(&self, ns: &str) -> bool;
    /// The pid in `pidfile` when that process is alive and its command line mentions
    /// `marker` (so a reused pid is never killed).
    fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32>;
    /// SIGTERM, then SIGKILL after a while; waits until the process is gone.
    fn stop(&self, pid: u32);
    /// SIGKILL right away (a power cut for a VM); waits until the process is gone.
    fn kill(&self, pid: u32);
}

pub struct RealHost;

impl Host for RealHost {
    fn run(&self, argv: &[String]) -> Result<String> {
        cmd::run(Command::new(&argv[0]).args(&argv[1..]))
    }

    fn output_until(
        &self,
        argv: &[String],
        timeout: Duration,
        enough: &Enough,
    ) -> Result<Captured> {
        let t = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = [
            drain(child.stdout.take().expect("piped"), out.clone()),
            drain(child.stderr.take().expect("piped"), err.clone()),
        ];
        let text = |b: &Mutex<Vec<u8>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
        let (mut timed_out, mut stopped) = (false, false);
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if enough(&text(&out), &text(&err)) {
                stopped = true;
            } else if t.elapsed() >= timeout {
                timed_out = true;
            }
            if stopped || timed_out {
                let _ = child.kill();
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in readers {
            let _ = r.join();
        }
        Ok(Captured {
            code: if timed_out || stopped {
                None
            } else {
                status.code()
            },
            stdout: text(&out),
            stderr: text(&err),
            took: t.elapsed(),
            timed_out,
        })
    }

    fn interactive(&self, argv: &[String]) -> Result<Option<i32>> {
        let st = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        Ok(st.code())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn netns_exists(&self, ns: &str) -> bool {
        Path::new("/run/netns").join(ns).exists()
    }

    fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (cmdline.contains(marker) && !is_zombie(pid)).then_some(pid)
    }

    fn stop(&self, pid: u32) {
        signal(pid, "-TERM");
        wait_gone(pid, Duration::from_secs(5));
        if alive(pid) {
            self.kill(pid);
        }
    }

    fn kill(&self, pid: u32) {
        signal(pid, "-KILL");
        wait_gone(pid, Duration::from_secs(10));
    }
}

/// Copies a pipe into `buf` as it comes, so a caller can look at partial output.
fn drain(
    mut r: impl Read + Send + 'static,
    buf: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn wait_gone(pid: u32, timeout: Duration) {
    let t = Instant::now();
    while alive(pid) && t.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
pub(crate) mod fake {
    //! A host that records typed calls and runs nothing.
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// What the fake was asked to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Run(String),
        Output(String),
        Interactive(String),
        Stop(u32),
        Kill(u32),
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub calls: Mutex<Vec<Call>>,
        pub ns: Mutex<bool>,
        /// A `run` whose command line contains this fails.
        pub fail_on: Option<&'static str>,
        /// pidfile -> pid of live processes.
        pub running: Mutex<BTreeMap<PathBuf, u32>>,
        /// `output` answers: the first whose key the command line contains.
        pub answers: Mutex<Vec<(String, Captured)>>,
        pub paths: Mutex<Vec<PathBuf>>,
    }

    impl FakeHost {
        pub fn new(fail_on: Option<&'static str>) -> FakeHost {
            FakeHost {
                fail_on,
                ..Default::default()
            }
        }
        pub fn lines(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| match c {
                    Call::Run(l) | Call::Output(l) | Call::Interactive(l) => l.clone(),
                    Call::Stop(p) => format!("stop {p}"),
                    Call::Kill(p) => format!("kill -KILL {p}"),
                })
                .collect()
        }
        pub fn answer(&self, key: &str, c: Captured) {
            self.answers.lock().unwrap().push((key.to_string(), c));
        }
    }

    impl Host for FakeHost {
        fn run(&self, argv: &[String]) -> Result<String> {
            let line = argv.join(" ");
            self.calls.lock().unwrap().push(Call::Run(line.clone()));
            if self.fail_on.is_some_and(|f| line.contains(f)) {
                anyhow::bail!("{line}: failed");
            }
            if line.starts_with("ip netns add") {
                *self.ns.lock().unwrap() = true;
            }
            if line.starts_with("ip netns del") {
                *self.ns.lock().unwrap() = false;
            }
            Ok(String::new())
        }
        fn output_until(&self, argv: &[String], _: Duration, _: &Enough) -> Result<Captured> {
            let line = argv.join(" ");
            self.calls.lock().unwrap().push(Call::Output(line.clone()));
            let a = self.answers.lock().unwrap();
            Ok(a.iter()
                .find(|(k, _)| line.contains(k.as_str()))
                .map(|(_, c)| c.clone())
                .unwrap_or(Captured {
                    code: Some(255),
                    stderr: "fake: no answer".into(),
                    ..Default::default()
                }))
        }
        fn interactive(&self, argv: &[String]) -> Result<Option<i32>> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Interactive(argv.join(" ")));
            Ok(Some(3))
        }
        fn exists(&self, p: &Path) -> bool {
            self.paths.lock().unwrap().iter().any(|x| x == p)
        }
        fn netns_exists(&self, _: &str) -> bool {
            *self.ns.lock().unwrap()
        }
        fn live_pid(&self, pidfile: &Path, marker: &str) -> Option<u32> {
            assert!(!marker.is_empty(), "a marker is needed");
            self.running.lock().unwrap().get(pidfile).copied()
        }
        fn stop(&self, pid: u32) {
            self.calls.lock().unwrap().push(Call::Stop(pid));
            self.running.lock().unwrap().retain(|_, p| *p != pid);
        }
        fn kill(&self, pid: u32) {
            self.calls.lock().unwrap().push(Call::Kill(pid));
            self.running.lock().unwrap().retain(|_, p| *p != pid);
        }
    }
}
