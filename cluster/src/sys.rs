//! Process spawns and service control, behind traits so tests can use fakes or run the
//! real daemons as child processes.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

pub use clutch_os::cmd::{CmdOutput, CommandRunner, RealRunner};
pub use clutch_os::fs::write_atomic;

/// Starts and stops the engine's service.
pub trait ServiceManager: Send + Sync {
    /// (Re)start the unit with its current configuration, without waiting for it.
    fn restart(&self, unit: &str) -> Result<(), String>;
    fn stop(&self, unit: &str) -> Result<(), String>;
    /// Take in a unit file that was written or changed, and enable it for boot.
    fn install(&self, unit: &str) -> Result<(), String> {
        let _ = unit;
        Ok(())
    }
}

/// systemd via `systemctl`.
pub struct Systemd<R: CommandRunner> {
    pub runner: R,
}

impl<R: CommandRunner> Systemd<R> {
    fn systemctl(&self, args: &[&str]) -> Result<(), String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = self
            .runner
            .run("systemctl", &args, &[])
            .map_err(|e| format!("systemctl {}: {e}", args.join(" ")))?;
        if out.ok() {
            Ok(())
        } else {
            Err(format!(
                "systemctl {}: {}",
                args.join(" "),
                out.stderr.trim()
            ))
        }
    }
}

impl<R: CommandRunner> ServiceManager for Systemd<R> {
    /// Only a restart: on a slow node (an SD card, an emulated VM) `daemon-reload` and
    /// `enable` (Debian's sysv-install) take 3 and 10 s, and an engine whose unit file is
    /// packaged needs neither (clutch-firstboot starts it again on every boot).
    fn restart(&self, unit: &str) -> Result<(), String> {
        // `--no-block`: the etcd unit is Type=notify and only reports ready once its cluster
        // has quorum, which for a joiner may need this very call to return first.
        self.systemctl(&["restart", "--no-block", unit])
    }
    fn stop(&self, unit: &str) -> Result<(), String> {
        self.systemctl(&["stop", unit])
    }
    fn install(&self, unit: &str) -> Result<(), String> {
        self.systemctl(&["daemon-reload"])?;
        self.systemctl(&["enable", unit])
    }
}

/// How [`ChildServices`] runs one unit: a program whose environment comes from an
/// `EnvironmentFile`-style file (as the systemd unit would read it).
#[derive(Clone, Debug)]
pub struct ChildUnit {
    pub program: String,
    pub args: Vec<String>,
    pub env_file: PathBuf,
    pub log: PathBuf,
}

/// Runs units as child processes of this process (tests, containers without systemd).
/// Children are killed on restart, stop and drop.
pub struct ChildServices {
    units: HashMap<String, ChildUnit>,
    children: Mutex<HashMap<String, Child>>,
}

impl ChildServices {
    pub fn new(units: HashMap<String, ChildUnit>) -> Self {
        ChildServices {
            units,
            children: Mutex::new(HashMap::new()),
        }
    }
    fn kill(&self, unit: &str) {
        if let Some(mut c) = self.children.lock().unwrap().remove(unit) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parse an EnvironmentFile: `KEY=value` lines, `#` comments, optional double quotes.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

impl ServiceManager for ChildServices {
    fn restart(&self, unit: &str) -> Result<(), String> {
        self.kill(unit);
        let u = self
            .units
            .get(unit)
            .ok_or_else(|| format!("unknown unit {unit}"))?;
        let env = fs::read_to_string(&u.env_file)
            .map(|t| parse_env_file(&t))
            .map_err(|e| format!("{}: {e}", u.env_file.display()))?;
        if let Some(dir) = u.log.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&u.log)
            .map_err(|e| format!("{}: {e}", u.log.display()))?;
        let child = Command::new(&u.program)
            .args(&u.args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", u.program))?;
        tracing::info!(unit, pid = child.id(), "started child service");
        self.children
            .lock()
            .unwrap()
            .insert(unit.to_string(), child);
        Ok(())
    }
    fn stop(&self, unit: &str) -> Result<(), String> {
        self.kill(unit);
        Ok(())
    }
}

impl Drop for ChildServices {
    fn drop(&mut self) {
        let names: Vec<String> = self.children.lock().unwrap().keys().cloned().collect();
        for n in names {
            self.kill(&n);
        }
    }
}

/// `root` joined with an absolute path (`/etc/x` under `/tmp/r` is `/tmp/r/etc/x`).
pub fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_parsing() {
        let v = parse_env_file("# c\nA=1\n B = \"x y\" \n\nbad\nC=a=b\n");
        assert_eq!(
            v,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x y".into()),
                ("C".into(), "a=b".into())
            ]
        );
    }

    #[test]
    fn child_services_run_and_stop() {
        let d = tempfile::tempdir().unwrap();
        let env = d.path().join("env");
        fs::write(&env, "MSG=hello\n").unwrap();
        let mut units = HashMap::new();
        units.insert(
            "t".to_string(),
            ChildUnit {
                program: "sh".into(),
                args: vec!["-c".into(), "echo $MSG; sleep 30".into()],
                env_file: env,
                log: d.path().join("log/t.log"),
            },
        );
        let s = ChildServices::new(units);
        s.restart("t").unwrap();
        let pid = s.children.lock().unwrap()["t"].id();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(
            fs::read_to_string(d.path().join("log/t.log")).unwrap(),
            "hello\n"
        );
        s.stop("t").unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(s.restart("nope").is_err());
    }
}
