//! Carrying a lab out through a [`Host`]: bring it up (keys, network, disks, VMs) and down
//! again, cut a node's power and power it on again, read every node's status, run a command
//! on a node, and choose the accelerator.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::access::{self, SshOpts};
use super::console::{self, PhaseLine};
use super::host::Host;
use super::plan::{
    self, LabState, NodeIndex, NodeSpec, STATE_FILE, load_state, save_state, setup_cmds,
    teardown_cmds,
};
use super::status::{self, Live, NodeStatus};
use super::vm::{self, AccelChoice, AccelDecision, ProbeRun};

/// Chooses the accelerator: asks the host for `/dev/kvm` and, unless `--accel tcg`, boots
/// `image` under KVM until its kernel starts (see [`vm::probe_cmd`]).
pub fn choose_accel(host: &dyn Host, choice: AccelChoice, image: &Path) -> Result<AccelDecision> {
    let dev = host.exists(Path::new("/dev/kvm"));
    let probe = if choice != AccelChoice::Tcg && dev {
        Some(
            match host.output_until(&vm::probe_cmd(image), vm::PROBE_TIMEOUT, &vm::probe_done) {
                Ok(c) => ProbeRun::from_output(&c.stdout, &c.stderr, c.code, c.took, c.timed_out),
                Err(e) => ProbeRun::NotStarted(format!("{e:#}")),
            },
        )
    } else {
        None
    };
    vm::decide(choice, dev, probe.as_ref()).map_err(anyhow::Error::msg)
}

/// Makes the lab's key pairs, the credential files every VM gets and the pinned known_hosts
/// (all in `DIR/access/`, mode 0700, files 0600). Returns the credential files.
fn make_access(host: &dyn Host, s: &LabState) -> Result<Vec<std::path::PathBuf>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let a = &s.access;
    let _ = std::fs::remove_dir_all(&a.dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&a.dir)
        .with_context(|| format!("{}", a.dir.display()))?;
    for c in access::keygen_cmds(a) {
        host.run(&c).context("making the lab's ssh keys")?;
    }
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("{}", p.display()));
    let client_pub = read(&a.client_key.with_extension("pub"))?;
    let host_private = read(&a.host_key)?;
    let host_pub = read(&a.host_key.with_extension("pub"))?;
    let write = |p: &Path, text: &str| -> Result<()> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("{}", p.display()))
    };
    write(
        &a.known_hosts,
        &access::known_hosts_line(&a.host_alias, &host_pub),
    )?;
    let files = a.credential_files();
    for (f, c) in files
        .iter()
        .zip(access::credentials(&client_pub, &host_private))
    {
        write(f, &access::credential_file_text(&c))?;
    }
    Ok(files)
}

/// Brings the lab up: access keys, namespace, bridge, taps, dnsmasq, overlays, VMs. On any
/// failure everything made so far is removed again.
pub fn up(host: &dyn Host, s: &LabState, disk_size: Option<u64>) -> Result<()> {
    if host.netns_exists(&s.namespace) || load_state(&s.dir)?.is_some() {
        bail!(
            "a lab already exists in {} (namespace {}); run `clutch lab down --dir {}` first",
            s.dir.display(),
            s.namespace,
            s.dir.display()
        );
    }
    // Recorded before anything is made, so `down` finds whatever exists.
    save_state(s)?;
    let r = (|| -> Result<()> {
        let creds = make_access(host, s)?;
        let creds: Vec<&Path> = creds.iter().map(|p| p.as_path()).collect();
        for c in setup_cmds(s) {
            host.run(&c)?;
        }
        host.run(&plan::dnsmasq_cmd(s))
            .context("starting dnsmasq")?;
        for n in &s.nodes {
            let _ = std::fs::remove_file(&n.overlay);
            host.run(&plan::overlay_cmd(s, n, disk_size))
                .with_context(|| format!("overlay for {}", n.name))?;
        }
        for n in &s.nodes {
            let _ = std::fs::remove_file(&n.console);
            host.run(&vm::qemu_cmd(s, n, &creds))
                .with_context(|| format!("starting {}", n.name))?;
            tracing::info!(node = %n.name, mac = %n.mac, ip = %n.ip, accel = %s.accel, "powered on");
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!("lab up failed; cleaning up: {e:#}");
        if let Err(e2) = down(host, &s.dir) {
            tracing::error!("cleanup after the failed `lab up`: {e2:#}");
        }
        return Err(e);
    }
    Ok(())
}

/// Powers a stopped (or killed) node on again: the same overlay disk, MAC, tap, address and
/// credentials; its console log gets a [`console::boot_marker`] and the new boot is appended
/// after it. Returns the boot number (2 for the first restart).
pub fn start(host: &dyn Host, s: &LabState, which: NodeIndex) -> Result<usize> {
    let n = s.node(which)?;
    let name = &n.name;
    if let Some(pid) = host.live_pid(&n.pidfile, &vm::qemu_marker(n)) {
        bail!("{name} is already running (pid {pid}); `clutch lab kill {name}` first");
    }
    if !host.netns_exists(&s.namespace) {
        bail!(
            "the lab's namespace {} is gone; run `clutch lab down --dir {d}` and `clutch lab up` again",
            s.namespace,
            d = s.dir.display()
        );
    }
    if !n.overlay.is_file() {
        bail!("{name}: its disk {} is missing", n.overlay.display());
    }
    let creds = s.access.credential_files();
    if let Some(c) = creds.iter().find(|c| !c.is_file()) {
        bail!("{name}: the lab's access file {} is missing", c.display());
    }
    let _ = std::fs::remove_file(&n.pidfile);
    let old = std::fs::read(&n.console).unwrap_or_default();
    let boot = console::boots(&String::from_utf8_lossy(&old)) + 1;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.console)
            .with_context(|| format!("{}", n.console.display()))?;
        f.write_all(console::boot_marker(name, boot).as_bytes())
            .with_context(|| format!("{}", n.console.display()))?;
    }
    let creds: Vec<&Path> = creds.iter().map(|p| p.as_path()).collect();
    host.run(&vm::qemu_cmd(s, n, &creds))
        .with_context(|| format!("starting {name}"))?;
    tracing::info!(node = %n.name, mac = %n.mac, ip = %n.ip, boot, "powered on again");
    Ok(boot)
}

/// Cuts a node's power: SIGKILL to its QEMU (found by pidfile, so only our own process).
/// Returns the pid that was killed, `None` when the node was not running.
pub fn kill(host: &dyn Host, s: &LabState, which: NodeIndex) -> Result<Option<u32>> {
    let n = s.node(which)?;
    let Some(pid) = host.live_pid(&n.pidfile, &vm::qemu_marker(n)) else {
        return Ok(None);
    };
    host.kill(pid);
    if host.live_pid(&n.pidfile, &vm::qemu_marker(n)).is_some() {
        bail!("{}: QEMU (pid {pid}) survived SIGKILL", n.name);
    }
    let _ = std::fs::remove_file(&n.pidfile);
    tracing::info!(node = %n.name, pid, "power cut");
    Ok(Some(pid))
}

/// What `down` did, for the message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DownReport {
    pub stopped: Vec<String>,
    pub namespace_removed: Option<String>,
}

/// Stops the VMs and dnsmasq (by their pidfiles), removes taps, bridge and namespace, the
/// overlays, the access keys and the state file. Safe to run again: missing pieces are
/// skipped. Console logs stay (they are what one reads after a failure).
pub fn down(host: &dyn Host, dir: &Path) -> Result<DownReport> {
    let mut rep = DownReport::default();
    let state = load_state(dir)?;
    let ns = state
        .as_ref()
        .map(|s| s.namespace.clone())
        .unwrap_or_else(|| plan::ns_name(dir));
    if let Some(s) = &state {
        for n in &s.nodes {
            if let Some(pid) = host.live_pid(&n.pidfile, &vm::qemu_marker(n)) {
                host.stop(pid);
                rep.stopped.push(format!("{} (pid {pid})", n.name));
            }
            let _ = std::fs::remove_file(&n.pidfile);
            let _ = std::fs::remove_file(&n.overlay);
        }
        let marker = s.dnsmasq_pidfile.display().to_string();
        if let Some(pid) = host.live_pid(&s.dnsmasq_pidfile, &marker) {
            host.stop(pid);
            rep.stopped.push(format!("dnsmasq (pid {pid})"));
        }
        let _ = std::fs::remove_file(&s.dnsmasq_pidfile);
        if let Some(pid) = stop_update_server(host, s) {
            rep.stopped.push(format!("update server (pid {pid})"));
        }
        let _ = std::fs::remove_dir_all(&s.access.dir);
    }
    if host.netns_exists(&ns) {
        for c in teardown_cmds(state.as_ref(), &ns) {
            let _ = host.run(&c);
        }
        host.run(&plan::argv(&["ip", "netns", "del", &ns]))
            .with_context(|| format!("removing namespace {ns}"))?;
        rep.namespace_removed = Some(ns);
    }
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    Ok(rep)
}

/// Where `lab update` serves an update folder: the lab bridge's own address, the
/// `[update] source` a lab image's config names (`http://10.77.0.1:8080/`).
pub fn update_listen() -> String {
    format!("{}.1:8080", plan::SUBNET)
}

fn update_pidfile(s: &LabState) -> std::path::PathBuf {
    s.dir.join("update-serve.pid")
}

/// Stops the lab's update server, if one runs (its command line carries the listen
/// address: a reused pid is never stopped).
pub fn stop_update_server(host: &dyn Host, s: &LabState) -> Option<u32> {
    let pid = host.live_pid(&update_pidfile(s), &update_listen())?;
    host.stop(pid);
    let _ = std::fs::remove_file(update_pidfile(s));
    Some(pid)
}

/// `clutch serve FOLDER` inside the lab namespace on [`update_listen`] (replacing an earlier
/// one), its log in the lab folder; the command line that starts it in the background.
pub fn serve_update_cmd(s: &LabState, clutch: &Path, folder: &Path) -> Vec<String> {
    let q = |p: &Path| access::shell_quote(&p.display().to_string());
    plan::argv(&[
        "ip",
        "netns",
        "exec",
        &s.namespace,
        "sh",
        "-c",
        &format!(
            "{} serve {} --listen {} >{} 2>&1 & echo $! >{}",
            q(clutch),
            q(folder),
            update_listen(),
            q(&s.dir.join("update-serve.log")),
            q(&update_pidfile(s)),
        ),
    ])
}

/// What `lab update` did on each node: the exit code of telling it to check now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateReport {
    pub url: String,
    pub told: Vec<(String, i32)>,
}

/// Serves `folder` (an `update/` output) into the lab network and tells every running node
/// to look for a newer release now (its `clutch-update.service`; the node decides, with
/// the cluster, when it may go down).
pub fn update(host: &dyn Host, s: &LabState, clutch: &Path, folder: &Path) -> Result<UpdateReport> {
    if !folder.join("SHA256SUMS").is_file() {
        bail!(
            "{} has no SHA256SUMS: not an update folder from `clutch build --format update`",
            folder.display()
        );
    }
    stop_update_server(host, s);
    host.run(&serve_update_cmd(s, clutch, folder))
        .context("starting the update server in the lab namespace")?;
    let url = format!("http://{}/", update_listen());
    let mut told = Vec::new();
    for n in &s.nodes {
        if !running(host, n) {
            continue;
        }
        let cmd = plan::argv(&["systemctl", "start", "--no-block", "clutch-update.service"]);
        let out = host.output(
            &access::ssh_cmd(s, n, &cmd, SshOpts::default()),
            Duration::from_secs(60),
        )?;
        told.push((n.name.clone(), out.code.unwrap_or(255)));
    }
    Ok(UpdateReport { url, told })
}

/// Whether node `n`'s QEMU is alive.
pub fn running(host: &dyn Host, n: &NodeSpec) -> bool {
    host.live_pid(&n.pidfile, &vm::qemu_marker(n)).is_some()
}

/// The node's console log as text (empty when there is none yet).
pub fn console_text(n: &NodeSpec) -> String {
    String::from_utf8_lossy(&std::fs::read(&n.console).unwrap_or_default()).into_owned()
}

/// The latest phase line of the node's current boot, and which boot that is.
pub fn console_phase(n: &NodeSpec) -> (usize, Option<PhaseLine>) {
    let text = console_text(n);
    let last = console::phase_lines(console::current_boot(&text)).pop();
    (console::boots(&text), last)
}

/// Reads node `n`'s `/run/clutch/status.json` over the access channel.
pub fn read_live(host: &dyn Host, s: &LabState, n: &NodeSpec) -> Result<Live, String> {
    let cmd = plan::argv(&["cat", "/run/clutch/status.json"]);
    let o = SshOpts {
        connect_timeout_secs: 5,
    };
    let c = host
        .output(&access::ssh_cmd(s, n, &cmd, o), Duration::from_secs(20))
        .map_err(|e| format!("{e:#}"))?;
    if c.timed_out {
        return Err("no answer within 20s".into());
    }
    if !c.success() {
        let why = c.stderr.lines().last().unwrap_or("").trim();
        return Err(match c.code {
            Some(255) => format!("ssh: {}", if why.is_empty() { "failed" } else { why }),
            code => format!(
                "cat /run/clutch/status.json: exit {}: {why}",
                code.map(|c| c.to_string()).unwrap_or_default()
            ),
        });
    }
    status::parse_status_json(&c.stdout)
}

/// Every node's row, read in parallel; a stopped node is not asked.
pub fn statuses(host: &dyn Host, s: &LabState) -> Vec<NodeStatus> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                sc.spawn(move || {
                    let up = running(host, n);
                    let live = if up {
                        read_live(host, s, n)
                    } else {
                        Err("not running".into())
                    };
                    let (boot, last) = console_phase(n);
                    NodeStatus::new(n, up, boot, live, last.as_ref())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("status thread"))
            .collect()
    })
}

/// Runs `cmd` on a node (stdin, stdout and stderr are this terminal's); its exit code, 255
/// when ssh could not reach the node.
pub fn exec(host: &dyn Host, s: &LabState, which: NodeIndex, cmd: &[String]) -> Result<i32> {
    let n = s.node(which)?;
    if !running(host, n) {
        bail!("{} is not running (`clutch lab start {}`)", n.name, n.name);
    }
    let code = host.interactive(&access::ssh_cmd(s, n, cmd, SshOpts::default()))?;
    Ok(code.unwrap_or(255))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_serves_the_folder_on_the_bridge_and_tells_every_node() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let folder = t.path().join("update");
        std::fs::create_dir_all(&folder).unwrap();
        let h = FakeHost::new(None);
        assert!(
            update(&h, &s, Path::new("/usr/bin/clutch"), &folder).is_err(),
            "no SHA256SUMS"
        );
        std::fs::write(folder.join("SHA256SUMS"), "").unwrap();
        let cmd = serve_update_cmd(&s, Path::new("/usr/bin/clutch"), &folder);
        assert_eq!(
            &cmd[..5],
            ["ip", "netns", "exec", s.namespace.as_str(), "sh"]
        );
        assert!(
            cmd[6].contains("serve") && cmd[6].contains("--listen 10.77.0.1:8080"),
            "{}",
            cmd[6]
        );
        let r = update(&h, &s, Path::new("/usr/bin/clutch"), &folder).unwrap();
        assert_eq!(r.url, "http://10.77.0.1:8080/");
        // The fake host has no live VMs: nobody is told, but the server was started.
        assert!(r.told.is_empty());
        assert!(
            h.lines()
                .iter()
                .any(|l| l.contains("--listen 10.77.0.1:8080"))
        );
    }
    use crate::lab::host::Captured;
    use crate::lab::host::fake::{Call, FakeHost};
    use crate::lab::plan::plan;
    use crate::lab::vm::Accel;

    fn lab(dir: &Path) -> LabState {
        plan(dir, Path::new("/img/lab.img"), 3, 768, Accel::Tcg).unwrap()
    }

    /// ssh-keygen is the one tool whose files `up` reads back: the fake makes them.
    fn keys(s: &LabState) {
        std::fs::create_dir_all(&s.access.dir).unwrap();
        for k in [&s.access.client_key, &s.access.host_key] {
            std::fs::write(k, "PRIVATE\n").unwrap();
            std::fs::write(k.with_extension("pub"), "ssh-ed25519 AAAAPUB c\n").unwrap();
        }
    }

    struct KeyHost(FakeHost, LabState);
    impl Host for KeyHost {
        fn run(&self, argv: &[String]) -> Result<String> {
            let r = self.0.run(argv);
            if argv[0] == "ssh-keygen"
                && argv.last() == Some(&self.1.access.host_key.display().to_string())
            {
                keys(&self.1);
            }
            r
        }
        fn output_until(
            &self,
            a: &[String],
            t: Duration,
            e: &crate::lab::host::Enough,
        ) -> Result<Captured> {
            self.0.output_until(a, t, e)
        }
        fn interactive(&self, a: &[String]) -> Result<Option<i32>> {
            self.0.interactive(a)
        }
        fn exists(&self, p: &Path) -> bool {
            self.0.exists(p)
        }
        fn netns_exists(&self, ns: &str) -> bool {
            self.0.netns_exists(ns)
        }
        fn live_pid(&self, p: &Path, m: &str) -> Option<u32> {
            self.0.live_pid(p, m)
        }
        fn stop(&self, pid: u32) {
            self.0.stop(pid)
        }
        fn kill(&self, pid: u32) {
            self.0.kill(pid)
        }
    }

    fn host(s: &LabState, fail_on: Option<&'static str>) -> KeyHost {
        KeyHost(FakeHost::new(fail_on), s.clone())
    }

    #[test]
    fn up_makes_keys_then_network_then_vms_with_the_credentials() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        let lines = h.0.lines();
        let first = |pat: &str| lines.iter().position(|l| l.contains(pat)).unwrap();
        assert!(first("ssh-keygen") < first("ip netns add"));
        assert!(first("dnsmasq") < first("qemu-img"));
        assert!(first("qemu-img") < first("qemu-system-x86_64"));
        let qemu: Vec<&String> = lines.iter().filter(|l| l.contains("qemu-system")).collect();
        assert_eq!(qemu.len(), 3);
        for q in &qemu {
            assert_eq!(q.matches("-smbios type=11,path=").count(), 4, "{q}");
            assert!(!q.contains("PRIVATE"), "no secret on the command line: {q}");
        }
        // The credential files hold the keys (0600), known_hosts pins the host key.
        use std::os::unix::fs::PermissionsExt;
        let files = s.access.credential_files();
        for f in &files {
            let m = std::fs::metadata(f).unwrap().permissions().mode();
            assert_eq!(m & 0o777, 0o600, "{}", f.display());
        }
        let dir_mode = std::fs::metadata(&s.access.dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let kh = std::fs::read_to_string(&s.access.known_hosts).unwrap();
        assert_eq!(kh, format!("{} ssh-ed25519 AAAAPUB\n", s.namespace));
        // Down removes the keys with the rest.
        down(&h, t.path()).unwrap();
        assert!(!s.access.dir.exists());
    }

    #[test]
    fn failed_up_removes_the_namespace_and_down_is_idempotent() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, Some("ifname=tap1"));
        let e = up(&h, &s, None).unwrap_err();
        assert!(format!("{e:#}").contains("starting node1"), "{e:#}");
        let lines = h.0.lines();
        assert_eq!(
            lines.last().unwrap(),
            &format!("ip netns del {}", s.namespace)
        );
        assert!(!*h.0.ns.lock().unwrap());
        assert!(load_state(t.path()).unwrap().is_none());
        assert!(!s.access.dir.exists());
        // Nothing left: a second down does nothing and succeeds.
        let n = h.0.lines().len();
        assert_eq!(down(&h, t.path()).unwrap(), DownReport::default());
        assert_eq!(h.0.lines().len(), n);
    }

    #[test]
    fn up_refuses_an_existing_lab_and_records_state_first() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        assert_eq!(load_state(t.path()).unwrap().unwrap(), s);
        assert!(up(&h, &s, None).is_err());
        let r = down(&h, t.path()).unwrap();
        assert_eq!(r.namespace_removed.as_deref(), Some(s.namespace.as_str()));
        assert!(load_state(t.path()).unwrap().is_none());
    }

    #[test]
    fn kill_cuts_only_a_running_node_by_its_pid() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        let n1 = &s.nodes[1];
        std::fs::write(&n1.pidfile, "4242\n").unwrap();
        h.0.running.lock().unwrap().insert(n1.pidfile.clone(), 4242);
        h.0.running
            .lock()
            .unwrap()
            .insert(s.nodes[2].pidfile.clone(), 4343);
        assert_eq!(kill(&h, &s, NodeIndex(1)).unwrap(), Some(4242));
        assert_eq!(h.0.calls.lock().unwrap().last(), Some(&Call::Kill(4242)));
        assert!(!n1.pidfile.exists(), "the dead node's pidfile is removed");
        assert_eq!(
            h.0.running
                .lock()
                .unwrap()
                .values()
                .copied()
                .collect::<Vec<_>>(),
            vec![4343],
            "the other node keeps running"
        );
        let n = h.0.lines().len();
        assert_eq!(kill(&h, &s, NodeIndex(1)).unwrap(), None);
        assert_eq!(h.0.lines().len(), n);
        assert!(kill(&h, &s, NodeIndex(7)).is_err());
    }

    #[test]
    fn start_boots_the_same_disk_mac_and_tap_and_appends_to_the_console() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        let n1 = &s.nodes[1];
        let first_boot =
            h.0.lines()
                .into_iter()
                .find(|l| l.contains("qemu-system-x86_64") && l.contains("ifname=tap1"))
                .unwrap();
        h.0.running.lock().unwrap().insert(n1.pidfile.clone(), 7);
        let e = start(&h, &s, NodeIndex(1)).unwrap_err();
        assert!(
            format!("{e:#}").contains("already running (pid 7)"),
            "{e:#}"
        );
        h.0.running.lock().unwrap().clear();
        let e = start(&h, &s, NodeIndex(1)).unwrap_err();
        assert!(format!("{e:#}").contains("node1.qcow2"), "{e:#}");
        std::fs::write(&n1.overlay, b"qcow2").unwrap();
        std::fs::write(
            &n1.console,
            "boot one\nclutch: phase=joining host=lab-1 role=server members=2\n",
        )
        .unwrap();
        std::fs::write(&n1.pidfile, "99\n").unwrap();
        assert_eq!(start(&h, &s, NodeIndex(1)).unwrap(), 2);
        assert_eq!(
            h.0.lines().last().unwrap(),
            &first_boot,
            "same QEMU command: same overlay, MAC, tap, console, pidfile and credentials"
        );
        assert!(!n1.pidfile.exists(), "the stale pidfile is gone");
        let log = std::fs::read_to_string(&n1.console).unwrap();
        assert!(log.starts_with("boot one\n"), "the old boot is kept: {log}");
        assert!(log.contains("node1 boot 2"), "{log}");
        // Until the new boot prints a phase line, status shows it booting, not joining.
        assert_eq!(console_phase(n1), (2, None));
        assert_eq!(start(&h, &s, NodeIndex(1)).unwrap(), 3);
        down(&h, t.path()).unwrap();
        save_state(&s).unwrap();
        let e = start(&h, &s, NodeIndex(1)).unwrap_err();
        assert!(format!("{e:#}").contains("namespace"), "{e:#}");
    }

    #[test]
    fn status_reads_status_json_over_ssh_and_falls_back_to_the_console() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        for (i, n) in s.nodes.iter().enumerate() {
            std::fs::write(
                &n.console,
                format!(
                    "clutch: phase=ready host=lab-{i} role=server members={}\n",
                    i + 1
                ),
            )
            .unwrap();
        }
        h.0.running
            .lock()
            .unwrap()
            .insert(s.nodes[0].pidfile.clone(), 10);
        h.0.running
            .lock()
            .unwrap()
            .insert(s.nodes[1].pidfile.clone(), 11);
        h.0.answer(
            "10.77.0.11 -- cat /run/clutch/status.json",
            Captured {
                code: Some(0),
                stdout: r#"{"phase":"ready","hostname":"lab-0","role":"server","members":["a","b","c"]}"#.into(),
                ..Default::default()
            },
        );
        h.0.answer(
            "10.77.0.12 --",
            Captured {
                code: Some(255),
                stderr: "ssh: connect to host 10.77.0.12 port 2222: Connection refused\n".into(),
                ..Default::default()
            },
        );
        let rows = statuses(&h, &s);
        assert_eq!(rows[0].source, status::Source::StatusJson);
        assert_eq!(rows[0].members, Some(3));
        assert_eq!(rows[1].source, status::Source::Console);
        assert_eq!(rows[1].members, Some(2));
        assert!(
            rows[1]
                .unreachable
                .as_deref()
                .unwrap()
                .contains("Connection refused")
        );
        // A stopped node is not asked at all.
        assert!(!rows[2].running);
        assert_eq!(rows[2].unreachable.as_deref(), Some("not running"));
        let asked: Vec<String> =
            h.0.lines()
                .into_iter()
                .filter(|l| l.contains("status.json"))
                .collect();
        assert_eq!(asked.len(), 2, "{asked:?}");
        assert!(asked.iter().all(|l| l.contains(" -l root ")));
    }

    #[test]
    fn exec_passes_the_exit_code_and_refuses_a_stopped_node() {
        let t = tempfile::tempdir().unwrap();
        let s = lab(t.path());
        let h = host(&s, None);
        up(&h, &s, None).unwrap();
        let cmd = plan::argv(&["etcdctl", "member", "list"]);
        assert!(exec(&h, &s, NodeIndex(1), &cmd).is_err());
        h.0.running
            .lock()
            .unwrap()
            .insert(s.nodes[1].pidfile.clone(), 11);
        assert_eq!(exec(&h, &s, NodeIndex(1), &cmd).unwrap(), 3);
        match h.0.calls.lock().unwrap().last().unwrap() {
            Call::Interactive(l) => {
                assert!(l.ends_with("10.77.0.12 -- etcdctl member list"), "{l}")
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn accel_probe_runs_only_when_kvm_may_work() {
        let h = FakeHost::new(None);
        let img = Path::new("/o/lab.img");
        let d = choose_accel(&h, AccelChoice::Auto, img).unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(h.lines().is_empty(), "no /dev/kvm: no probe");
        h.paths.lock().unwrap().push("/dev/kvm".into());
        h.answer(
            "-accel kvm -cpu host",
            Captured {
                stdout: "Linux version 6.12".into(),
                took: Duration::from_millis(2200),
                ..Default::default()
            },
        );
        assert_eq!(
            choose_accel(&h, AccelChoice::Auto, img).unwrap().accel,
            Accel::Kvm
        );
        assert_eq!(h.lines().len(), 1);
        assert!(h.lines()[0].contains("file=/o/lab.img,format=raw,if=virtio,snapshot=on"));
        assert_eq!(
            choose_accel(&h, AccelChoice::Tcg, img).unwrap().accel,
            Accel::Tcg
        );
        assert_eq!(h.lines().len(), 1, "--accel tcg runs no probe");
    }
}
