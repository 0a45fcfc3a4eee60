//! QEMU for amd64 VMs, shared by `clutch lab` and the boot tests (tests/qemu): the
//! accelerator (KVM when a probe VM really runs under it, else TCG), the arguments every
//! headless VM has, qcow2 overlays, systemd credentials through SMBIOS type 11, and a lab
//! node's whole command line.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::plan::{LabState, NodeSpec, argv};

pub const QEMU_X86: &str = "qemu-system-x86_64";

/// The accelerator a VM runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`), with the host's CPU model.
    Kvm,
    /// QEMU's emulator: works everywhere, about ten times slower.
    #[default]
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `-accel ...` (and `-cpu host` under KVM: the guest sees the real CPU).
    pub fn args(self) -> Vec<String> {
        match self {
            Accel::Kvm => argv(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => argv(&["-accel", "tcg"]),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--accel`: what the user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when the probe says it works, else TCG.
    #[default]
    Auto,
    /// KVM or an error.
    Kvm,
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!("unknown accelerator `{s}` (auto, kvm, tcg)")),
        }
    }
}

/// How long the probe may take to reach the kernel. Under a working KVM the image's kernel
/// prints its banner within a few seconds; a host where KVM cannot run the boot loader stops
/// with "KVM internal error" at once.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// What the kernel prints first on the serial console (the image's command line has
/// `console=ttyS0`).
pub const KERNEL_BANNER: &str = "Linux version";
/// What QEMU prints when KVM cannot run the guest (and then pauses it rather than exiting).
pub const KVM_FAILURE: &str = "KVM internal error";

/// The probe: boots `image` under KVM (writes go to a temporary snapshot, never to the image)
/// until the kernel's banner shows on the serial console. Only that proves KVM works: on some
/// hosts `/dev/kvm` exists and even a BIOS runs under it, but the boot loader stops with an
/// emulation failure.
pub fn probe_cmd(image: &Path) -> Vec<String> {
    let fmt = if image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut v = argv(&[QEMU_X86, "-name", "clutch-kvm-probe"]);
    v.extend(headless_args(Accel::Kvm, 512));
    // A disk the BIOS cannot boot makes it reboot at once, which `-no-reboot` turns into an
    // exit: no waiting out the timeout.
    v.extend(argv(&[
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
        "-boot",
        "strict=on,reboot-timeout=0",
        "-drive",
    ]));
    v.push(format!(
        "file={},format={fmt},if=virtio,snapshot=on,readonly=off",
        image.display()
    ));
    v
}

/// Whether the probe has seen enough (the kernel banner, or KVM's failure) to stop it.
pub fn probe_done(stdout: &str, stderr: &str) -> bool {
    stdout.contains(KERNEL_BANNER) || stderr.contains(KVM_FAILURE)
}

/// What the probe VM did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeRun {
    /// The kernel's banner came, after `took`.
    Booted { took: Duration },
    /// QEMU failed or KVM stopped the guest; QEMU's first message.
    Failed { exit: Option<i32>, message: String },
    /// Nothing within [`PROBE_TIMEOUT`] (killed).
    TimedOut,
    /// QEMU could not be started.
    NotStarted(String),
}

impl ProbeRun {
    /// From what the probe printed; `timed_out`: killed at [`PROBE_TIMEOUT`].
    pub fn from_output(
        stdout: &str,
        stderr: &str,
        exit: Option<i32>,
        took: Duration,
        timed_out: bool,
    ) -> ProbeRun {
        if stderr.contains(KVM_FAILURE) || (!timed_out && !stdout.contains(KERNEL_BANNER)) {
            let message = stderr
                .lines()
                .map(str::trim)
                .find(|l| l.contains(KVM_FAILURE))
                .or_else(|| first_line(stderr))
                .unwrap_or("it ended without starting a kernel (is the disk bootable?)")
                .to_string();
            let message = match stderr.lines().find(|l| l.trim() == "emulation failure") {
                Some(_) => format!("{message} (emulation failure)"),
                None => message,
            };
            ProbeRun::Failed { exit, message }
        } else if stdout.contains(KERNEL_BANNER) {
            ProbeRun::Booted { took }
        } else {
            ProbeRun::TimedOut
        }
    }
}

/// The accelerator chosen and why, for the message and lab.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Decides the accelerator. `kvm_device`: whether `/dev/kvm` exists; `probe`: what the probe
/// VM did (`None` when it was not run). Forcing KVM where it does not work is an error.
pub fn decide(
    choice: AccelChoice,
    kvm_device: bool,
    probe: Option<&ProbeRun>,
) -> Result<AccelDecision, String> {
    if choice == AccelChoice::Tcg {
        return Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: "--accel tcg".into(),
        });
    }
    let verdict = if !kvm_device {
        Err("/dev/kvm does not exist".to_string())
    } else {
        match probe {
            None => Err("KVM probe not run".to_string()),
            Some(ProbeRun::NotStarted(e)) => Err(format!("the KVM probe did not start: {e}")),
            Some(ProbeRun::TimedOut) => Err(format!(
                "/dev/kvm exists, but the probe VM did not reach the kernel within {}s under KVM",
                PROBE_TIMEOUT.as_secs()
            )),
            Some(ProbeRun::Booted { took }) => Ok(format!(
                "the probe VM booted the image's kernel under KVM in {:.1}s",
                took.as_secs_f64()
            )),
            Some(ProbeRun::Failed { exit, message }) => Err(format!(
                "/dev/kvm exists, but the probe VM failed under KVM{}: {message}",
                exit.map(|c| format!(" (exit {c})")).unwrap_or_default()
            )),
        }
    };
    match (choice, verdict) {
        (_, Ok(why)) => Ok(AccelDecision {
            accel: Accel::Kvm,
            reason: why,
        }),
        (AccelChoice::Kvm, Err(why)) => Err(format!("--accel kvm: KVM does not work here: {why}")),
        (_, Err(why)) => Ok(AccelDecision {
            accel: Accel::Tcg,
            reason: format!("{why}; using TCG"),
        }),
    }
}

fn first_line(s: &str) -> Option<&str> {
    s.lines().map(str::trim).find(|l| !l.is_empty())
}

/// What every headless x86 VM has: the `pc` machine on `accel`, one vCPU, `memory_mib`, no
/// display and no monitor.
pub fn headless_args(accel: Accel, memory_mib: u32) -> Vec<String> {
    let mut v = argv(&["-machine", "pc"]);
    v.extend(accel.args());
    v.extend(argv(&[
        "-smp",
        "1",
        "-m",
        &memory_mib.to_string(),
        "-display",
        "none",
        "-monitor",
        "none",
    ]));
    v
}

/// `qemu-img create` of a qcow2 overlay on `base` (raw or qcow2, by its extension); `size`
/// grows the virtual disk (`5G`, or bytes).
pub fn overlay_cmd(base: &Path, overlay: &Path, size: Option<&str>) -> Vec<String> {
    let fmt = if base.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut v = argv(&["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b"]);
    v.push(base.display().to_string());
    v.push(overlay.display().to_string());
    v.extend(size.map(str::to_string));
    v
}

/// QEMU arguments that hand the guest a systemd system credential `name=value` inline (SMBIOS
/// type 11 strings, which systemd imports into `/run/credentials/@system` in a VM). Fine for
/// values that are no secret: the command line is visible to every local user.
pub fn smbios_credential(name: &str, value: &str) -> Vec<String> {
    vec![
        "-smbios".into(),
        format!("type=11,value=io.systemd.credential:{name}={value}"),
    ]
}

/// The same from a file (see [`super::access::credential_file_text`]): the value never
/// appears on the command line.
pub fn smbios_credential_file(path: &Path) -> Vec<String> {
    vec!["-smbios".into(), format!("type=11,path={}", path.display())]
}

/// Marks a lab VM's QEMU process (its pidfile path is on its command line), so a reused pid
/// is never taken for it.
pub fn qemu_marker(n: &NodeSpec) -> String {
    n.pidfile.display().to_string()
}

/// The QEMU command of a lab node, run inside the namespace and daemonised; `credentials`
/// are files handed over as SMBIOS type 11 strings.
pub fn qemu_cmd(s: &LabState, n: &NodeSpec, credentials: &[&Path]) -> Vec<String> {
    let mut v = argv(&["ip", "netns", "exec", &s.namespace, QEMU_X86]);
    v.extend(argv(&["-name", &format!("clutch-lab-{}", n.name)]));
    v.extend(headless_args(s.accel, s.memory_mib));
    v.extend(argv(&[
        // Appended, not truncated: `lab start` powers a node on again on the same log.
        "-chardev",
        &format!("file,id=console,path={},append=on", n.console.display()),
        "-serial",
        "chardev:console",
        "-drive",
        &format!("file={},format=qcow2,if=virtio", n.overlay.display()),
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", n.tap),
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={}", n.mac),
    ]));
    for c in credentials {
        v.extend(smbios_credential_file(c));
    }
    v.extend(argv(&[
        "-pidfile",
        &n.pidfile.display().to_string(),
        "-daemonize",
    ]));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::plan::plan;

    #[test]
    fn lab_vms_run_in_the_namespace_on_their_tap_with_the_chosen_accel() {
        for accel in [Accel::Tcg, Accel::Kvm] {
            let s = plan(
                Path::new("/tmp/x"),
                Path::new("/img/lab.img"),
                3,
                768,
                accel,
            )
            .unwrap();
            let ns = s.namespace.as_str();
            for n in &s.nodes {
                let cred = Path::new("/tmp/x/access/cred");
                let q = qemu_cmd(&s, n, &[cred]);
                assert_eq!(q[..5], ["ip", "netns", "exec", ns, QEMU_X86]);
                let j = q.join(" ");
                assert!(j.contains(&format!(
                    "tap,id=net0,ifname={},script=no,downscript=no",
                    n.tap
                )));
                assert!(j.contains(&format!("mac={}", n.mac)));
                assert!(j.contains(&format!("-accel {accel}")), "{j}");
                assert_eq!(j.contains("-cpu host"), accel == Accel::Kvm, "{j}");
                assert!(j.contains("-smp 1") && j.contains("-m 768"));
                assert!(j.contains(&format!("-pidfile {}", n.pidfile.display())));
                assert!(j.contains("-smbios type=11,path=/tmp/x/access/cred"));
                // The console log is appended to, so a node powered on again keeps its history.
                assert!(j.contains(&format!(
                    "file,id=console,path={},append=on",
                    n.console.display()
                )));
            }
        }
    }

    #[test]
    fn the_probe_boots_the_image_to_its_kernel_under_kvm_without_writing_it() {
        let p = probe_cmd(Path::new("/o/lab.img")).join(" ");
        assert!(p.contains("-accel kvm -cpu host"), "{p}");
        assert!(
            p.contains("file=/o/lab.img,format=raw,if=virtio,snapshot=on"),
            "{p}"
        );
        assert!(
            p.contains("-serial stdio") && p.contains("-no-reboot"),
            "{p}"
        );
        assert!(p.contains("-boot strict=on,reboot-timeout=0"), "{p}");
        assert!(probe_done("...Linux version 6.12", ""));
        // A disk the BIOS cannot boot: QEMU exits 0 with no kernel, which is no proof.
        let none = ProbeRun::from_output(
            "SeaBIOS\nNo bootable device.",
            "",
            Some(0),
            Duration::from_secs(2),
            false,
        );
        assert!(
            matches!(&none, ProbeRun::Failed { message, .. } if message.contains("without starting a kernel")),
            "{none:?}"
        );
        assert!(probe_done("", "KVM internal error. Suberror: 1\n"));
        assert!(!probe_done("SeaBIOS", ""));
    }

    /// What QEMU 7.2 printed on this project's 2-core build machine, where /dev/kvm exists
    /// and a BIOS runs under it, but the boot loader does not.
    const NESTED: &str = "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n\
        KVM internal error. Suberror: 1\nextra data[0]: 0x0000000000000001\nemulation failure\nEAX=00000012 EBX=00000002\n";

    #[test]
    fn kvm_only_when_the_probe_reached_the_kernel() {
        let t = Duration::from_millis(2500);
        let ok = ProbeRun::from_output("SeaBIOS\nLinux version 6.12.48", "", None, t, false);
        assert_eq!(ok, ProbeRun::Booted { took: t });
        let d = decide(AccelChoice::Auto, true, Some(&ok)).unwrap();
        assert_eq!(d.accel, Accel::Kvm);
        assert!(d.reason.contains("in 2.5s"), "{}", d.reason);
        // /dev/kvm missing: TCG, and the probe is not even consulted.
        let d = decide(AccelChoice::Auto, false, None).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.reason.contains("/dev/kvm does not exist"), "{}", d.reason);
        // /dev/kvm there, but KVM stops the guest.
        let bad = ProbeRun::from_output("", NESTED, None, t, false);
        assert_eq!(
            bad,
            ProbeRun::Failed {
                exit: None,
                message: "KVM internal error. Suberror: 1 (emulation failure)".into()
            }
        );
        let d = decide(AccelChoice::Auto, true, Some(&bad)).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert_eq!(
            d.reason,
            "/dev/kvm exists, but the probe VM failed under KVM: KVM internal error. Suberror: 1 (emulation failure); using TCG"
        );
        // QEMU refuses KVM outright.
        let denied = ProbeRun::from_output(
            "",
            "qemu-system-x86_64: failed to initialize kvm: Permission denied\n",
            Some(1),
            t,
            false,
        );
        let d = decide(AccelChoice::Auto, true, Some(&denied)).unwrap();
        assert!(
            d.reason
                .contains("(exit 1): qemu-system-x86_64: failed to initialize kvm"),
            "{}",
            d.reason
        );
        // Neither banner nor error in time.
        let slow = ProbeRun::from_output("SeaBIOS", "", None, PROBE_TIMEOUT, true);
        assert_eq!(slow, ProbeRun::TimedOut);
        assert_eq!(
            decide(AccelChoice::Auto, true, Some(&slow)).unwrap().accel,
            Accel::Tcg
        );
        // Forced: TCG without asking, KVM or an error saying why not.
        assert_eq!(
            decide(AccelChoice::Tcg, true, Some(&ok)).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(
            decide(AccelChoice::Kvm, true, Some(&ok)).unwrap().accel,
            Accel::Kvm
        );
        let e = decide(AccelChoice::Kvm, true, Some(&bad)).unwrap_err();
        assert!(e.starts_with("--accel kvm: KVM does not work here"), "{e}");
        assert_eq!("auto".parse(), Ok(AccelChoice::Auto));
        assert!("hvf".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn credentials_and_overlays() {
        assert_eq!(
            smbios_credential("clutch.hold", "grow"),
            [
                "-smbios",
                "type=11,value=io.systemd.credential:clutch.hold=grow"
            ]
        );
        let o = overlay_cmd(Path::new("/i/a.qcow2"), Path::new("/o/b.qcow2"), Some("8G"));
        assert_eq!(
            o.join(" "),
            "qemu-img create -q -f qcow2 -F qcow2 -b /i/a.qcow2 /o/b.qcow2 8G"
        );
    }
}
