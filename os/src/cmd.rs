//! Running programs: one trait for every crate ([`CommandRunner`]), the real runner, and a
//! [`Redactor`] that keeps secrets (tokens, keys, passwords passed on a command line or
//! printed by a tool) out of logs and error messages.

use std::io;
use std::process::{Command, Stdio};

/// Result of a finished command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CmdOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
    /// A successful run with this stdout (for fakes).
    pub fn success(stdout: &str) -> Self {
        CmdOutput {
            code: 0,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }
    /// A failed run (exit 1) with this stderr (for fakes).
    pub fn failure(stderr: &str) -> Self {
        CmdOutput {
            code: 1,
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }
}

/// Runs a program to completion, stdin closed, output captured.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        program: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> io::Result<CmdOutput>;
}

/// `program args` with `env` added and stdin closed: how every real runner starts one.
fn command(program: &str, args: &[String], env: &[(String, String)]) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null());
    c
}

/// A finished run's exit code and output, decoded.
fn finished(status: std::process::ExitStatus, stdout: &[u8], stderr: &[u8]) -> CmdOutput {
    CmdOutput {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    }
}

/// Runs commands for real.
pub struct RealRunner;

impl CommandRunner for RealRunner {
    fn run(
        &self,
        program: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> io::Result<CmdOutput> {
        let out = command(program, args, env).output()?;
        Ok(finished(out.status, &out.stdout, &out.stderr))
    }
}

/// Runs programs for real, killing one that is still running after `limit` (a client whose
/// server is gone can wait forever: `etcdctl lease keep-alive --once` ignores its own
/// `--command-timeout`). The program runs in its own process group and the whole group is
/// killed, so nothing it started keeps running or holds its output open. A killed run is an
/// [`io::ErrorKind::TimedOut`] error with what it had printed to stderr.
pub struct TimeLimitedRunner {
    pub limit: std::time::Duration,
}

impl CommandRunner for TimeLimitedRunner {
    fn run(
        &self,
        program: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> io::Result<CmdOutput> {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        use std::sync::mpsc;
        use std::time::Instant;

        let deadline = Instant::now() + self.limit;
        let mut child = command(program, args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let kill_group = || {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        };
        // Both pipes drained while waiting, so a chatty program never blocks on a full one.
        let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
        let drain = |is_out: bool, r: Option<Box<dyn Read + Send>>| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut b = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut b);
                }
                let _ = tx.send((is_out, b));
            });
        };
        drain(
            true,
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        drain(
            false,
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn Read + Send>),
        );
        drop(tx);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Ok(None) => break None,
                Err(e) => {
                    kill_group();
                    let _ = child.wait();
                    return Err(e);
                }
            }
        };
        if status.is_none() {
            kill_group();
            let _ = child.wait();
        }
        // The output, until the pipes close or the deadline (a process the program left
        // behind may hold them open: the group is killed then).
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = match rx.recv_timeout(left.max(std::time::Duration::from_millis(200))) {
                Ok(g) => g,
                Err(_) => {
                    kill_group();
                    match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                        Ok(g) => g,
                        Err(_) => break,
                    }
                }
            };
            if got.0 {
                out = got.1;
            } else {
                err = got.1;
            }
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match status {
            Some(st) => Ok(finished(st, &out, &err)),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{program} still running after {:?}; killed{}",
                    self.limit,
                    match text(&err).trim() {
                        "" => String::new(),
                        e => format!(" (it said: {e})"),
                    }
                ),
            )),
        }
    }
}

/// Replaces known secret values with `<redacted>` in text that is about to be logged or put
/// into an error.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new() -> Self {
        Redactor::default()
    }
    /// Adds a secret; values shorter than 8 bytes are ignored (they would redact ordinary
    /// words).
    pub fn secret(mut self, s: impl Into<String>) -> Self {
        let s = s.into();
        if s.len() >= 8 && !self.secrets.contains(&s) {
            self.secrets.push(s);
            // Longest first, so a secret that contains another is replaced whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
        self
    }
    pub fn redact(&self, text: &str) -> String {
        let mut t = text.to_string();
        for s in &self.secrets {
            if t.contains(s.as_str()) {
                t = t.replace(s.as_str(), "<redacted>");
            }
        }
        t
    }
    /// The command line as a shell would read it, secrets redacted.
    pub fn describe(&self, program: &str, args: &[String]) -> String {
        let mut s = quote(program);
        for a in args {
            s.push(' ');
            s.push_str(&quote(a));
        }
        self.redact(&s)
    }
}

fn quote(a: &str) -> String {
    let plain = !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b));
    if plain {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// A recording fake of [`CommandRunner`] for tests: every call is kept, and a closure
/// decides each answer.
#[cfg(any(test, feature = "testing"))]
pub mod fake {
    use super::*;
    use std::sync::Mutex;

    /// One recorded call.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Call {
        pub program: String,
        pub args: Vec<String>,
        pub env: Vec<(String, String)>,
    }

    impl Call {
        /// `program arg arg ...` (for assertions).
        pub fn line(&self) -> String {
            std::iter::once(self.program.as_str())
                .chain(self.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ")
        }
    }

    type Answer = dyn Fn(&Call) -> CmdOutput + Send + Sync;

    pub struct FakeRunner {
        calls: Mutex<Vec<Call>>,
        answer: Box<Answer>,
    }

    impl FakeRunner {
        /// Every call succeeds with empty output.
        pub fn ok() -> Self {
            FakeRunner::new(|_| CmdOutput::success(""))
        }
        pub fn new(answer: impl Fn(&Call) -> CmdOutput + Send + Sync + 'static) -> Self {
            FakeRunner {
                calls: Mutex::new(Vec::new()),
                answer: Box::new(answer),
            }
        }
        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
        pub fn lines(&self) -> Vec<String> {
            self.calls().iter().map(Call::line).collect()
        }
    }

    impl CommandRunner for FakeRunner {
        fn run(
            &self,
            program: &str,
            args: &[String],
            env: &[(String, String)],
        ) -> io::Result<CmdOutput> {
            let call = Call {
                program: program.into(),
                args: args.to_vec(),
                env: env.to_vec(),
            };
            let out = (self.answer)(&call);
            self.calls.lock().unwrap().push(call);
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_secrets_longest_first() {
        let r = Redactor::new()
            .secret("K10abcdef::server:supersecret")
            .secret("supersecret")
            .secret("short");
        let line = r.describe(
            "k3s",
            &["--token".into(), "K10abcdef::server:supersecret".into()],
        );
        assert_eq!(line, "k3s --token <redacted>");
        assert_eq!(r.redact("x supersecret y short"), "x <redacted> y short");
    }

    #[test]
    fn quoting_reads_as_a_shell_would() {
        let r = Redactor::new();
        assert_eq!(
            r.describe(
                "echo",
                &["a b".into(), "it's".into(), "".into(), "k=v".into()]
            ),
            "echo 'a b' 'it'\\''s' '' k=v"
        );
    }

    #[test]
    fn real_runners_capture_output_and_code() {
        let limited = TimeLimitedRunner {
            limit: std::time::Duration::from_secs(20),
        };
        for r in [&RealRunner as &dyn CommandRunner, &limited] {
            let o = r
                .run(
                    "sh",
                    &["-c".into(), "echo out; echo err >&2; exit 3".into()],
                    &[],
                )
                .unwrap();
            assert_eq!(
                (o.code, o.stdout.as_str(), o.stderr.as_str()),
                (3, "out\n", "err\n")
            );
            assert!(r.run("/nonexistent/prog", &[], &[]).is_err());
        }
    }

    #[test]
    fn fake_runner_records_calls() {
        let f = fake::FakeRunner::new(|c| {
            if c.args.first().is_some_and(|a| a == "fail") {
                CmdOutput::failure("no")
            } else {
                CmdOutput::success("yes")
            }
        });
        assert!(f.run("x", &["ok".into()], &[]).unwrap().ok());
        assert!(!f.run("x", &["fail".into()], &[]).unwrap().ok());
        assert_eq!(f.lines(), vec!["x ok", "x fail"]);
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_program_past_its_limit_is_killed_and_says_so() {
        let r = TimeLimitedRunner {
            limit: Duration::from_millis(300),
        };
        let t = Instant::now();
        let e = r.run("sleep", &["30".into()], &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("sleep still running"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // What it left behind is killed too, and does not hold the call up.
        let t = Instant::now();
        let o = r
            .run("sh", &["-c".into(), "sleep 30 & echo started".into()], &[])
            .unwrap();
        assert_eq!(o.stdout, "started\n");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
}
