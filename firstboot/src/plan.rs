//! Planning: from the loaded config and the observed facts to a [`Plan`] of plain data.
//! Nothing here touches the system; [`crate::apply`] carries a plan out.

use std::fmt;
use std::path::{Path, PathBuf};

use clutch_config::account::{self, Account};
use clutch_config::{Cluster, Hostname, HostnameTemplate, LoopFormat, NodeConfig, Token, zone};

use crate::facts::{Facts, Paths, RootDisk, is_node_id};
use crate::hold::HoldPoint;
use crate::load::imported::{Password, Sudo};
use crate::load::{Loaded, LoginUser, WifiSetting};
use crate::render;
use crate::sys::{Cmd, TableKind};

/// Who owns a written file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Root,
    /// A user from `/etc/passwd` (resolved when applying: the user may be created first).
    User(String),
    /// Whatever owned the file before (e.g. `/etc/shadow`, root:shadow).
    Keep,
}

#[derive(Clone, PartialEq, Eq)]
pub enum Action {
    /// `path` is a node path (looked up under the root).
    WriteFile {
        path: PathBuf,
        contents: Vec<u8>,
        mode: u32,
        owner: Owner,
        /// Don't show the contents in logs or Debug.
        secret: bool,
    },
    MkDir {
        path: PathBuf,
        mode: u32,
        owner: Owner,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    Remove {
        path: PathBuf,
    },
    /// Overwrites `ranges` of an existing file in place with `fill` and fsyncs it; fails when
    /// the file is not `len` bytes long (it changed since it was read). On vfat this changes
    /// the very clusters that held the bytes: how secrets leave the FAT partition.
    Overwrite {
        path: PathBuf,
        ranges: Vec<std::ops::Range<u64>>,
        fill: u8,
        len: u64,
    },
    SetHostname(Hostname),
    Run(Cmd),
    /// Creates a sparse file of `size` bytes, or grows a smaller one.
    SparseFile {
        path: PathBuf,
        size: u64,
    },
    /// Attaches `backing` to a loop device (unless `attached` already) and points
    /// `/dev/clutch/<name>` at it.
    AttachLoop {
        name: String,
        backing: PathBuf,
        attached: Option<u32>,
    },
    Mount {
        source: PathBuf,
        target: PathBuf,
        fstype: String,
    },
    GrowPartition {
        disk: PathBuf,
        partno: u32,
        kind: TableKind,
    },
    LinksUp(Vec<String>),
    /// Fault injection ([`crate::hold`]): stop here until the power is cut.
    Hold(HoldPoint),
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::WriteFile {
                path,
                contents,
                mode,
                owner,
                secret,
            } => {
                write!(f, "write {} mode {mode:o} owner {owner:?}", path.display())?;
                if *secret {
                    write!(f, " ({} bytes, secret)", contents.len())
                } else {
                    write!(f, " ({} bytes)", contents.len())
                }
            }
            Action::MkDir { path, mode, owner } => {
                write!(f, "mkdir {} mode {mode:o} owner {owner:?}", path.display())
            }
            Action::Symlink { path, target } => {
                write!(f, "symlink {} -> {}", path.display(), target.display())
            }
            Action::Remove { path } => write!(f, "remove {}", path.display()),
            Action::Overwrite {
                path,
                ranges,
                fill,
                len,
            } => {
                let r: Vec<String> = ranges
                    .iter()
                    .map(|r| format!("{}..{}", r.start, r.end))
                    .collect();
                write!(
                    f,
                    "overwrite {} [{}] with {:?} ({len} bytes)",
                    path.display(),
                    r.join(","),
                    *fill as char
                )
            }
            Action::SetHostname(h) => write!(f, "sethostname {h}"),
            Action::Run(c) => write!(f, "run {c}"),
            Action::SparseFile { path, size } => write!(f, "sparse {} {size}", path.display()),
            Action::AttachLoop {
                name,
                backing,
                attached,
            } => write!(f, "attach {name} {} {attached:?}", backing.display()),
            Action::Mount {
                source,
                target,
                fstype,
            } => write!(
                f,
                "mount {} {} {fstype}",
                source.display(),
                target.display()
            ),
            Action::GrowPartition { disk, partno, kind } => {
                write!(f, "grow {} {partno} {kind:?}", disk.display())
            }
            Action::LinksUp(n) => write!(f, "links up {}", n.join(" ")),
            Action::Hold(p) => write!(f, "hold {p}"),
        }
    }
}

pub fn write(path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>, mode: u32) -> Action {
    Action::WriteFile {
        path: path.into(),
        contents: contents.into(),
        mode,
        owner: Owner::Root,
        secret: false,
    }
}

pub fn write_secret(path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> Action {
    Action::WriteFile {
        path: path.into(),
        contents: contents.into(),
        mode: 0o600,
        owner: Owner::Root,
        secret: true,
    }
}

fn remove(path: impl Into<PathBuf>) -> Action {
    Action::Remove { path: path.into() }
}

/// A named group of actions. With `marker`, the step runs until it has succeeded once
/// (`/var/lib/clutch/done/<name>` is written after its last action); without, every boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub marker: bool,
    pub actions: Vec<Action>,
}

impl Step {
    fn every_boot(name: &str, actions: Vec<Action>) -> Self {
        Step {
            name: name.into(),
            marker: false,
            actions,
        }
    }
    fn once(name: &str, actions: Vec<Action>) -> Self {
        Step {
            name: name.into(),
            marker: true,
            actions,
        }
    }
}

/// A loopback device the node will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStorage {
    pub name: String,
    pub size: u64,
    pub mount: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub hostname: Hostname,
    pub node_id: String,
    pub steps: Vec<Step>,
    pub storage: Vec<PlannedStorage>,
    /// The cluster section, with its token resolved, when the node should form one.
    pub cluster: Option<(Cluster, Token)>,
    /// Things worth a log line (skipped root grow, ...).
    pub notes: Vec<String>,
    /// Settings applied otherwise than given, for the status (see [`crate::status`]).
    pub warnings: Vec<String>,
    /// The login user this plan sets up (none when the config has none or it was refused).
    pub user: Option<String>,
}

impl Plan {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "system.hostname: the template `{0}` uses {{mac}} but this node has no network interface with a MAC address"
    )]
    NoMac(String),
}

/// Fresh random values the plan may need; made by the caller (through `Sys`) so planning
/// stays deterministic.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub node_id: String,
    pub machine_id: String,
}

/// The primary MAC: first wired link by ifindex, else any physical link.
pub fn primary_mac(facts: &Facts) -> Option<&str> {
    facts
        .links
        .iter()
        .find(|l| !l.wireless)
        .or_else(|| facts.links.first())
        .map(|l| l.mac.as_str())
}

fn node_id(facts: &Facts, fresh: &Fresh) -> String {
    facts
        .node_id
        .clone()
        .unwrap_or_else(|| fresh.node_id.clone())
}

/// Identity: node id, machine id, SSH host keys, hostname. Also what the failed path runs.
fn identity(
    paths: &Paths,
    facts: &Facts,
    fresh: &Fresh,
    hostname: &Hostname,
    fqdn: Option<&str>,
) -> Step {
    let mut a = Vec::new();
    if facts.node_id.is_none() {
        a.push(write(
            paths.state_node("node-id"),
            format!("{}\n", fresh.node_id),
            0o644,
        ));
    }
    let mid_ok = facts.machine_id.as_deref().is_some_and(is_node_id);
    if !mid_ok {
        a.push(write(
            "/etc/machine-id",
            format!("{}\n", fresh.machine_id),
            0o444,
        ));
    }
    if !facts.missing_host_keys.is_empty() {
        a.push(Action::MkDir {
            path: "/etc/ssh".into(),
            mode: 0o755,
            owner: Owner::Root,
        });
        // A key without its other half (power cut during ssh-keygen) is removed and made
        // again; `ssh-keygen -A` is not used, as it would add an RSA key.
        for t in crate::facts::HOST_KEY_TYPES {
            let key = PathBuf::from(format!("/etc/ssh/ssh_host_{t}_key"));
            let key_pub = PathBuf::from(format!("/etc/ssh/ssh_host_{t}_key.pub"));
            let missing = |p: &Path| facts.missing_host_keys.iter().any(|m| m == p);
            if !missing(&key) && !missing(&key_pub) {
                continue;
            }
            a.push(remove(key.clone()));
            a.push(remove(key_pub));
            a.push(Action::Run(
                Cmd::new("ssh-keygen", &["-q", "-t", t, "-N", "", "-f"])
                    .arg_path(&paths.host(&key)),
            ));
        }
    }
    // The node id is on disk (durably) from here on: a power cut now must bring the node back
    // with the same id, and the host name made from it.
    if facts.hold == Some(HoldPoint::Hostname) {
        a.push(Action::Hold(HoldPoint::Hostname));
    }
    a.push(write(
        "/etc/hostname",
        render::hostname_file(hostname),
        0o644,
    ));
    a.push(write(
        "/etc/hosts",
        render::hosts_file(facts.etc_hosts.as_deref(), hostname, fqdn),
        0o644,
    ));
    a.push(Action::SetHostname(hostname.clone()));
    Step::every_boot("identity", a)
}

impl Paths {
    /// A node path under the state directory.
    pub fn state_node(&self, name: &str) -> PathBuf {
        Path::new(crate::facts::STATE_DIR).join(name)
    }
}

fn links_up(facts: &Facts) -> Step {
    let mut names = vec!["lo".to_string()];
    names.extend(
        facts
            .links
            .iter()
            .filter(|l| !l.wireless)
            .map(|l| l.name.clone()),
    );
    Step::every_boot("links", vec![Action::LinksUp(names)])
}

/// The plan when the config could not be used: identity with the hostname the node already
/// has (else the config's template when that much of it reads, else the default), and links
/// up. Nothing that needs the config.
pub fn plan_safe(
    paths: &Paths,
    facts: &Facts,
    fresh: &Fresh,
    template: Option<&HostnameTemplate>,
) -> Plan {
    let id = node_id(facts, fresh);
    let kept = facts
        .etc_hostname
        .as_deref()
        // Placeholders: the builder's `clutch`, Debian's and Raspberry Pi OS's defaults.
        .filter(|h| !matches!(*h, "" | "localhost" | "clutch" | "debian" | "raspberrypi"))
        .and_then(|h| Hostname::try_from(h).ok());
    let mac = primary_mac(facts).unwrap_or("000000000000");
    let hostname = kept
        // A {mac} template without a MAC would give every such node the same name.
        .or_else(|| {
            template
                .filter(|t| !t.uses_mac() || primary_mac(facts).is_some())
                .and_then(|t| t.render(&id[..6], mac).ok())
        })
        .unwrap_or_else(|| {
            HostnameTemplate::default()
                .render(&id[..6], mac)
                .expect("default template renders")
        });
    Plan {
        steps: vec![
            identity(paths, facts, fresh, &hostname, None),
            links_up(facts),
        ],
        hostname,
        node_id: id,
        storage: Vec::new(),
        cluster: None,
        notes: Vec::new(),
        warnings: Vec::new(),
        user: None,
    }
}

/// The size below which growing the root is not worth a partition table edit.
pub const MIN_GROW_BYTES: u64 = 16 << 20;

pub fn plan(
    paths: &Paths,
    facts: &Facts,
    loaded: &Loaded,
    fresh: &Fresh,
) -> Result<Plan, PlanError> {
    let c: &NodeConfig = &loaded.config;
    let id = node_id(facts, fresh);
    let tpl = &c.system.hostname;
    let mac = match primary_mac(facts) {
        Some(m) => m.to_string(),
        None if tpl.uses_mac() => return Err(PlanError::NoMac(tpl.to_string())),
        None => String::new(),
    };
    let hostname = tpl
        .render(&id[..6], &mac)
        .map_err(|_| PlanError::NoMac(tpl.to_string()))?;

    let mut steps = vec![identity(
        paths,
        facts,
        fresh,
        &hostname,
        loaded.fqdn.as_deref(),
    )];
    if !loaded.secret_actions.is_empty() {
        steps.push(Step::every_boot("secrets", loaded.secret_actions.clone()));
    }
    if !loaded.input_actions.is_empty() {
        steps.push(Step::every_boot("inputs", loaded.input_actions.clone()));
    }
    let mut warnings = loaded.warnings.clone();
    let mut accounts = Vec::new();
    for u in &loaded.users {
        if let Some(a) = login_account(facts, u, &mut warnings) {
            accounts.push((u, a));
        }
    }
    if !accounts.is_empty() {
        let mut a = Vec::new();
        for (u, account) in &accounts {
            a.extend(users(paths, facts, u, account, &mut warnings));
        }
        steps.push(Step::every_boot("users", a));
    }
    steps.push(Step::every_boot("ssh", ssh(c)));
    steps.push(Step::every_boot(
        "system",
        system(facts, loaded, &mut warnings),
    ));
    let has_wlan0 = facts.links.iter().any(|l| l.name == "wlan0");
    steps.push(Step::every_boot(
        "network",
        network(loaded.wifi.as_ref(), has_wlan0),
    ));
    let mut notes = Vec::new();
    if !facts.done.contains("grow-root") {
        match &facts.root_disk {
            Ok(r) => match grow(r, facts.hold == Some(HoldPoint::Grow), &mut notes) {
                Ok(actions) => steps.push(Step::once("grow-root", actions)),
                Err(why) => notes.push(format!("root file system not grown: {why}")),
            },
            Err(e) => notes.push(format!("root file system not grown: {e}")),
        }
    }
    let mut storage = Vec::new();
    for l in &c.storage.loopback {
        let name = l.name.to_string();
        let backing = paths.state_node(&format!("storage/{name}.img"));
        let dev = PathBuf::from(format!("/dev/clutch/{name}"));
        let mut a = vec![
            Action::MkDir {
                path: paths.state_node("storage"),
                mode: 0o700,
                owner: Owner::Root,
            },
            Action::SparseFile {
                path: backing.clone(),
                size: l.size.bytes(),
            },
        ];
        // The backing file exists (and is durable), nothing is attached yet: the next boot
        // must attach it again without touching its contents.
        if facts.hold == Some(HoldPoint::Loop) {
            a.push(Action::Hold(HoldPoint::Loop));
        }
        a.push(Action::AttachLoop {
            name: name.clone(),
            backing: backing.clone(),
            attached: facts.loops.get(&backing).copied(),
        });
        steps.push(Step::every_boot(&format!("storage-{name}"), a));
        if l.format == LoopFormat::Ext4 {
            let mkfs = format!("mkfs-{name}");
            if !facts.done.contains(&mkfs) {
                let has_fs = facts.backing.get(&name).is_some_and(|b| b.has_ext4);
                let mut a = Vec::new();
                if !has_fs {
                    a.push(Action::Run(
                        Cmd::new(
                            "mkfs.ext4",
                            &[
                                "-q",
                                "-F",
                                "-L",
                                &name,
                                "-E",
                                "lazy_itable_init=1,lazy_journal_init=1",
                            ],
                        )
                        .arg_path(&dev),
                    ));
                }
                steps.push(Step::once(&mkfs, a));
            }
            if !facts.mounts.contains_key(&l.mount) {
                steps.push(Step::every_boot(
                    &format!("mount-{name}"),
                    vec![
                        Action::MkDir {
                            path: l.mount.clone().into(),
                            mode: 0o755,
                            owner: Owner::Root,
                        },
                        Action::Mount {
                            source: dev.clone(),
                            target: l.mount.clone().into(),
                            fstype: "ext4".into(),
                        },
                    ],
                ));
            }
        }
        storage.push(PlannedStorage {
            name,
            size: l.size.bytes(),
            mount: l.mount.clone(),
        });
    }
    steps.push(links_up(facts));
    let cluster = match (&c.cluster, &loaded.token) {
        (Some(cl), Some(t)) => Some((cl.clone(), t.clone())),
        _ => None,
    };
    Ok(Plan {
        hostname,
        node_id: id,
        steps,
        storage,
        cluster,
        notes,
        warnings,
        user: accounts.first().map(|(u, _)| u.name.to_string()),
    })
}

/// The root grow, in two parts that each converge when run again: the partition table (a
/// no-op once the partition reaches the end of the disk) and the file system (resize2fs is a
/// no-op once it fills the partition). A power cut between them leaves a grown partition
/// with a small file system; the next boot sees that and runs resize2fs alone.
fn grow(r: &RootDisk, hold: bool, notes: &mut Vec<String>) -> Result<Vec<Action>, String> {
    if r.fstype != "ext4" {
        return Err(format!("/ is {}, not ext4", r.fstype));
    }
    if !r.is_last {
        return Err(format!(
            "{} is not the last partition of {}",
            r.part_dev.display(),
            r.disk_dev.display()
        ));
    }
    let resize = Action::Run(Cmd::new("resize2fs", &[]).arg_path(&r.part_dev));
    if r.free_bytes() < MIN_GROW_BYTES {
        // The partition is full size. The file system too, unless an earlier boot stopped
        // between the two (unknown size: resize2fs finds out, and does nothing if so).
        let part_bytes = r.size * 512;
        return Ok(match r.fs_bytes {
            Some(fs) if fs.saturating_add(MIN_GROW_BYTES) > part_bytes => Vec::new(),
            fs => {
                notes.push(format!(
                    "{} already fills {}; growing its file system ({} of {part_bytes} bytes)",
                    r.part_dev.display(),
                    r.disk_dev.display(),
                    fs.map_or("unknown".to_string(), |b| b.to_string())
                ));
                vec![resize]
            }
        });
    }
    let kind = r.table.ok_or_else(|| {
        format!(
            "no GPT or MBR partition table found on {}",
            r.disk_dev.display()
        )
    })?;
    let mut a = vec![Action::GrowPartition {
        disk: r.disk_dev.clone(),
        partno: r.partno,
        kind,
    }];
    if hold {
        a.push(Action::Hold(HoldPoint::Grow));
    }
    a.push(resize);
    Ok(a)
}

/// A login user by the config crate's rule ([`clutch_config::account`]) against this
/// node's own /etc/passwd and /etc/group. A refused name (a system account such as
/// `daemon`, a privileged group such as `disk`) is a warning: no account is created or
/// changed, and the node still comes up.
fn login_account(facts: &Facts, u: &LoginUser, warnings: &mut Vec<String>) -> Option<Account> {
    match account::decide(&u.name, &facts.passwd, &facts.group) {
        Ok(a) => Some(a),
        Err(why) => {
            warnings.push(format!(
                "user `{}`: {why}; no user was created or changed",
                u.name
            ));
            None
        }
    }
}

/// The shadow password field for `p` given the current one (`!` locks, as `passwd -l`).
fn shadow_field(p: &Password, current: Option<&str>) -> Option<String> {
    let base = match (&p.hash, current) {
        (Some(h), _) => h.as_str().to_string(),
        (None, Some(c)) => c.trim_start_matches('!').to_string(),
        (None, None) => String::new(),
    };
    match (p.locked, base.is_empty()) {
        (true, _) => Some(format!("!{base}")),
        (false, true) => None,
        (false, false) => Some(base),
    }
}

fn users(
    paths: &Paths,
    facts: &Facts,
    u: &LoginUser,
    account: &Account,
    warnings: &mut Vec<String>,
) -> Vec<Action> {
    let name = u.name.to_string();
    let mut a = Vec::new();
    // Groups the node has; sudo ones first.
    let mut groups: Vec<String> = Vec::new();
    if u.sudo != Sudo::No {
        groups.push("sudo".into());
    }
    let mut missing = Vec::new();
    for g in &u.groups {
        if groups.contains(g) {
            continue;
        }
        if account::group_names(&facts.group).any(|n| n == g) {
            groups.push(g.clone());
        } else {
            missing.push(g.as_str());
        }
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "user `{name}`: the groups {} do not exist on this node; not joined",
            missing.join(", ")
        ));
    }
    let home = match account {
        Account::Existing(e) => {
            let member = |g: &str| {
                facts.group.lines().any(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    f.len() >= 4 && f[0] == g && f[3].split(',').any(|m| m == name)
                })
            };
            let join: Vec<&str> = groups
                .iter()
                .map(String::as_str)
                .filter(|g| !member(g))
                .collect();
            if !join.is_empty() {
                let mut cmd = Cmd::new("usermod", &["-R"]).arg_path(&paths.root);
                cmd.args
                    .extend(["-a", "-G", &join.join(","), &name].map(String::from));
                a.push(Action::Run(cmd));
            }
            e.home.clone()
        }
        new => {
            let mut cmd = Cmd::new("useradd", &["-R"]).arg_path(&paths.root);
            cmd.args.extend(["-m", "-s", "/bin/bash"].map(String::from));
            cmd.args
                .extend(new.useradd_group_args().iter().map(|s| s.to_string()));
            if !groups.is_empty() {
                cmd.args.extend(["--groups".to_string(), groups.join(",")]);
            }
            cmd.args.push(name.clone());
            a.push(Action::Run(cmd));
            format!("/home/{name}")
        }
    };
    let sudoers = PathBuf::from(format!("/etc/sudoers.d/clutch-{name}"));
    if u.sudo == Sudo::NoPassword {
        a.push(write(sudoers, render::sudoers(&name), 0o440));
    } else {
        a.push(remove(sudoers));
    }
    let ssh_dir = Path::new(&home).join(".ssh");
    a.push(Action::MkDir {
        path: ssh_dir.clone(),
        mode: 0o700,
        owner: Owner::User(name.clone()),
    });
    a.push(Action::WriteFile {
        path: ssh_dir.join("authorized_keys"),
        contents: render::authorized_keys(&u.keys).into(),
        mode: 0o600,
        owner: Owner::User(name.clone()),
        secret: false,
    });
    // No password setting leaves the password as it is (the builder locks it).
    let Some(p) = &u.password else {
        return a;
    };
    let current = facts.shadow.as_deref().and_then(|s| {
        s.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 2 && f[0] == name)
            .map(|f| f[1].to_string())
    });
    let Some(field) = shadow_field(p, current.as_deref()) else {
        return a;
    };
    match facts
        .shadow
        .as_deref()
        .and_then(|s| render::shadow_with_hash(s, &name, &field))
    {
        Some(new) => a.push(Action::WriteFile {
            path: "/etc/shadow".into(),
            contents: new.into(),
            mode: 0o640,
            owner: Owner::Keep,
            secret: true,
        }),
        None => {
            let mut cmd = Cmd::new("chpasswd", &["-e", "-R"]).arg_path(&paths.root);
            cmd.stdin = Some(format!("{name}:{field}\n"));
            a.push(Action::Run(cmd));
        }
    }
    a
}

fn ssh(c: &NodeConfig) -> Vec<Action> {
    let mut a = vec![write(
        "/etc/ssh/sshd_config.d/50-clutch.conf",
        render::sshd_dropin(&c.ssh),
        0o644,
    )];
    // Debian's ssh.service has ConditionPathExists=!/etc/ssh/sshd_not_to_be_run, which is
    // checked when the unit starts, so this works in the boot that writes it.
    let off = "/etc/ssh/sshd_not_to_be_run";
    if c.ssh.enabled {
        a.push(remove(off));
    } else {
        a.push(write(
            off,
            "disabled by clutch.toml: [ssh] enabled = false\n",
            0o644,
        ));
    }
    a
}

/// The zone for /etc/localtime by [`zone::for_node`]: the configured one, else the modern
/// zone a legacy name stands for, else UTC (each with a warning); `None` when the node has
/// not even that, so /etc/localtime is removed (which means UTC) rather than left dangling.
fn node_timezone(facts: &Facts, configured: &str, warnings: &mut Vec<String>) -> Option<String> {
    let shipped = |n: &str| facts.zoneinfo.get(n).copied().unwrap_or(false);
    let (tz, warning) = zone::for_node(configured, shipped);
    warnings.extend(warning);
    shipped(&tz).then_some(tz)
}

fn system(facts: &Facts, loaded: &Loaded, warnings: &mut Vec<String>) -> Vec<Action> {
    let configured = loaded.config.system.timezone.as_str();
    let mut a = match node_timezone(facts, configured, warnings) {
        Some(tz) => vec![
            Action::Symlink {
                path: "/etc/localtime".into(),
                target: Path::new(zone::ZONEINFO).join(&tz),
            },
            write("/etc/timezone", format!("{tz}\n"), 0o644),
        ],
        None => vec![
            remove("/etc/localtime"),
            write("/etc/timezone", format!("{}\n", zone::FALLBACK), 0o644),
        ],
    };
    if let Some(k) = &loaded.keymap {
        a.push(write(
            "/etc/default/keyboard",
            render::keyboard(facts.keyboard.as_deref(), k),
            0o644,
        ));
    }
    // The wifi regulatory domain for the radio, also without a network to join (a
    // custom.toml `[wlan]` with only `country`).
    match &loaded.wifi_country {
        Some(c) => a.push(write(REGDOM_CONF, render::regdom(c), 0o644)),
        None => a.push(remove(REGDOM_CONF)),
    }
    a
}

const REGDOM_CONF: &str = "/etc/modprobe.d/clutch-wifi-country.conf";
const WPA_CONF: &str = "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf";
/// wpa_supplicant is wanted by the wlan0 device, not by multi-user.target: a node without
/// wlan0 (a VM, a Pi whose radio is disabled) must not wait 90 s for a device that never
/// comes, and a late wlan0 still gets its supplicant.
const WPA_WANTS: &str =
    "/etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants/wpa_supplicant@wlan0.service";
/// Where earlier versions linked it.
const OLD_WPA_WANTS: &str =
    "/etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service";

/// Where earlier clutch-firstboot versions wrote the wired settings; the image now ships them
/// (`overlays/base/etc/systemd/network/80-clutch-wired.network`), and a left-over file here
/// would shadow that one, so it is removed.
const OLD_WIRED: &str = "/etc/systemd/network/20-clutch-wired.network";

/// Wifi only: wired links are configured by the image (`80-clutch-wired.network`: DHCP with
/// IPv4 link-local fallback, mDNS off in networkd because clutch answers mDNS itself).
fn network(wifi: Option<&WifiSetting>, has_wlan0: bool) -> Vec<Action> {
    let mut a = vec![remove(OLD_WIRED), remove(OLD_WPA_WANTS)];
    match wifi {
        Some(w) => {
            a.push(write_secret(
                WPA_CONF,
                render::wpa_supplicant(&w.ssid, w.psk.as_ref(), w.country.as_ref(), w.hidden),
            ));
            a.push(write(
                "/etc/systemd/network/30-clutch-wlan0.network",
                render::wlan_network(),
                0o644,
            ));
            a.push(Action::Symlink {
                path: WPA_WANTS.into(),
                target: "/usr/lib/systemd/system/wpa_supplicant@.service".into(),
            });
            // The boot transaction was computed before the symlink existed: when wlan0 is
            // already here, queue the start for this boot too (no-block: we run before
            // sysinit.target).
            if has_wlan0 {
                a.push(Action::Run(Cmd::new(
                    "systemctl",
                    &["--no-block", "start", "wpa_supplicant@wlan0.service"],
                )));
            }
        }
        None => {
            a.push(remove(WPA_CONF));
            a.push(remove("/etc/systemd/network/30-clutch-wlan0.network"));
            a.push(remove(WPA_WANTS));
        }
    }
    a
}
