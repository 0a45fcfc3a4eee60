//! The real [`UpdateSys`]: HTTP downloads, commands, reboots, the clock.

use std::path::Path;
use std::process::Command;

use super::flow::UpdateSys;

pub struct RealUpdateSys;

impl UpdateSys for RealUpdateSys {
    fn download(
        &self,
        url: &str,
        dest: &Path,
        limit: u64,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<u64, String> {
        super::fetch::download(url, dest, limit, progress)
    }

    fn run(&self, program: &str, args: &[String]) -> Result<String, String> {
        tracing::info!("running {program} {}", args.join(" "));
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            return Err(format!(
                "{} ({})",
                tail.into_iter().rev().collect::<Vec<_>>().join("; "),
                out.status
            ));
        }
        Ok(text)
    }

    fn reboot(&self, tryboot: bool) -> Result<(), String> {
        // `systemctl reboot ARG` passes ARG to the kernel's reboot(2) call: the Raspberry Pi
        // firmware reads "0 tryboot" as a one-time trial boot of autoboot.txt's [tryboot].
        let mut args = vec!["reboot".to_string()];
        if tryboot {
            args.push("0 tryboot".into());
        }
        self.run("systemctl", &args).map(|_| ())
    }

    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn sleep(&self, secs: u64) {
        std::thread::sleep(std::time::Duration::from_secs(secs));
    }

    fn uefi(&self) -> bool {
        Path::new("/sys/firmware/efi").is_dir()
    }
}
