//! Turning an unpacked Debian tree into a clutch root filesystem: overlays, the firstboot
//! service, the user, ssh, time zone, fstab; and removing what must be made per node
//! (ssh host keys, machine-id).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clutch_config::account::{self, Account};
use clutch_config::{Board, ImageConfig, Invalid, User, zone};

use crate::cmd;

/// Paths and ids the staged tree needs to know about.
pub struct StageInputs<'a> {
    pub cfg: &'a ImageConfig,
    pub board: &'a Board,
    pub overlays: Vec<PathBuf>,
    pub firstboot_bin: &'a Path,
    pub firstboot_unit: &'a Path,
    pub root_partuuid: String,
    pub boot_partuuid: String,
    /// From [`plan_names`].
    pub names: NamePlan,
}

/// What the configured names become in this root filesystem, decided before anything is
/// staged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamePlan {
    /// useradd's arguments (without `--root`) for the configured user.
    pub useradd: Option<Vec<String>>,
}

pub fn apply(root: &Path, inp: &StageInputs<'_>) -> Result<()> {
    for o in &inp.overlays {
        copy_tree(o, root).with_context(|| format!("copying overlay {}", o.display()))?;
    }
    install_firstboot(root, inp)?;
    write_fstab(root, inp)?;
    write_root_templates(root, inp)?;
    write_identity_placeholders(root)?;
    set_timezone(root, inp.cfg.system.timezone.as_str())?;
    if let (Some(u), Some(args)) = (&inp.cfg.user, &inp.names.useradd) {
        add_user(root, u, args)?;
    }
    configure_ssh(root, inp.cfg)?;
    enable_units(
        root,
        &["clutch-firstboot.service", "systemd-networkd.service"],
    )?;
    if let Some(c) = &inp.cfg.cluster {
        engine_setup(root, c.engine)?;
    }
    Ok(())
}

/// systemd drop-in for Debian's etcd.service: timing for slow nodes (SD cards, emulated
/// VMs), where etcd's 100 ms / 1 s defaults make leaders flap. `Environment=` only sets
/// what clutch's `/etc/default/etcd` (written at formation) leaves out.
pub const ETCD_DROPIN: &str = "# Written by clutch build ([cluster] engine = \"etcd\").\n\
[Service]\n\
Environment=ETCD_HEARTBEAT_INTERVAL=300\n\
Environment=ETCD_ELECTION_TIMEOUT=3000\n";

/// What the cluster engine needs in the image besides its packages. `etcd`: the packaged
/// etcd.service is disabled (not masked: clutch enables and starts it once it has written
/// `/etc/default/etcd`), so no single-node etcd runs before the cluster is formed.
fn engine_setup(root: &Path, engine: clutch_config::schema::Engine) -> Result<()> {
    use clutch_config::schema::Engine;
    if engine == Engine::Etcd {
        cmd::run(
            Command::new("systemctl")
                .arg(format!("--root={}", root.display()))
                .args(["disable", "etcd.service"]),
        )
        .context("disabling the packaged etcd.service in the image")?;
        write(
            root,
            "etc/systemd/system/etcd.service.d/50-clutch.conf",
            ETCD_DROPIN,
            0o644,
        )?;
    }
    Ok(())
}

/// Writes `content` to `rel` inside `root`, following links in the path inside `root` (an
/// absolute link in the image must not lead out to the host's files).
fn write(root: &Path, rel: &str, content: &str, mode: u32) -> Result<()> {
    let p = resolve_in_root(root, rel)?;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The board's `root.templates` (e.g. `/etc/default/raspi-firmware`, which Debian's
/// raspi-firmware hooks read when a kernel upgrade rewrites config.txt and cmdline.txt).
fn write_root_templates(root: &Path, inp: &StageInputs<'_>) -> Result<()> {
    if inp.board.root.templates.is_empty() {
        return Ok(());
    }
    let vars = crate::build::TemplateVars::new(inp.cfg, inp.board, &inp.root_partuuid);
    for t in &inp.board.root.templates {
        write(root, &t.path, &vars.render(&t.content), 0o644)
            .with_context(|| format!("root.templates: {}", t.path))?;
    }
    Ok(())
}

fn install_firstboot(root: &Path, inp: &StageInputs<'_>) -> Result<()> {
    let bin = root.join("usr/bin/clutch-firstboot");
    std::fs::copy(inp.firstboot_bin, &bin)
        .with_context(|| format!("installing {}", inp.firstboot_bin.display()))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let unit = std::fs::read_to_string(inp.firstboot_unit)
        .with_context(|| format!("reading {}", inp.firstboot_unit.display()))?;
    write(
        root,
        "usr/lib/systemd/system/clutch-firstboot.service",
        &unit,
        0o644,
    )?;
    write(
        root,
        "etc/default/clutch-firstboot",
        &format!(
            "# Written by clutch build. Where the FAT partition with clutch.toml is mounted.\nCLUTCH_BOOT_DIR={}\n",
            inp.board.boot.mount
        ),
        0o644,
    )?;
    std::fs::create_dir_all(root.join("var/lib/clutch"))?;
    std::fs::set_permissions(
        root.join("var/lib/clutch"),
        std::fs::Permissions::from_mode(0o700),
    )?;
    Ok(())
}

pub fn fstab(board: &Board, root_partuuid: &str, boot_partuuid: &str) -> String {
    format!(
        "# Written by clutch build.\n\
         PARTUUID={root_partuuid}  /  ext4  defaults,noatime,errors=remount-ro  0  1\n\
         PARTUUID={boot_partuuid}  {}  vfat  defaults,umask=0077,shortname=winnt  0  2\n",
        board.boot.mount
    )
}

fn write_fstab(root: &Path, inp: &StageInputs<'_>) -> Result<()> {
    std::fs::create_dir_all(root.join(inp.board.boot.mount.trim_start_matches('/')))?;
    write(
        root,
        "etc/fstab",
        &fstab(inp.board, &inp.root_partuuid, &inp.boot_partuuid),
        0o644,
    )
}

fn write_identity_placeholders(root: &Path) -> Result<()> {
    // Made per node at first boot: an empty machine-id (systemd's first-boot marker) and no
    // ssh host keys.
    write(root, "etc/machine-id", "", 0o444)?;
    let dbus_id = root.join("var/lib/dbus/machine-id");
    if dbus_id.symlink_metadata().is_ok() {
        std::fs::remove_file(&dbus_id)?;
    }
    for e in std::fs::read_dir(root.join("etc/ssh"))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("ssh_host_") {
            std::fs::remove_file(e.path())?;
        }
    }
    write(root, "etc/hostname", "clutch\n", 0o644)?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tclutch\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        0o644,
    )?;
    Ok(())
}

/// Checks the configured user name and time zone against this root filesystem, now that
/// its packages are installed (they add system users, and decide which zones exist), by the
/// same rules `clutch check` applies to Debian's tables. The error names the config key; the
/// caller locates it in the config file.
pub fn plan_names(root: &Path, cfg: &ImageConfig) -> Result<NamePlan, PlanNamesError> {
    let read = |rel: &str| {
        let p = root.join(rel);
        std::fs::read_to_string(&p).map_err(|source| PlanNamesError::Read { path: p, source })
    };
    let legacy = cfg
        .packages
        .iter()
        .any(|p| p.as_str() == zone::LEGACY_PACKAGE);
    let tz = cfg.system.timezone.as_str();
    zone::check(tz, legacy, |n| zone_in_root(root, n)).map_err(|why| {
        Invalid::new(
            "system.timezone",
            format!("{why} (checked against this image's {}/)", zone::ZONEINFO),
        )
    })?;
    let useradd = match &cfg.user {
        Some(u) => Some(useradd_args(u, &read("etc/passwd")?, &read("etc/group")?)?),
        None => None,
    };
    Ok(NamePlan { useradd })
}

#[derive(Debug, thiserror::Error)]
pub enum PlanNamesError {
    #[error("cannot read {} in the staged root filesystem: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {}", .0.key, .0.message)]
    Invalid(Invalid),
}

impl From<Invalid> for PlanNamesError {
    fn from(i: Invalid) -> Self {
        PlanNamesError::Invalid(i)
    }
}

/// The builder's verdict on the configured user in a tree with these `/etc/passwd` and
/// `/etc/group` texts: useradd's arguments (without `--root`), or why not.
pub fn useradd_args(u: &User, passwd: &str, group: &str) -> Result<Vec<String>, Invalid> {
    let name = u.name.as_str();
    let why = |m: String| {
        Invalid::new(
            "user.name",
            format!(
                "{m} (in this image's /etc/passwd and /etc/group, after its packages were installed)"
            ),
        )
    };
    let account = account::decide(&u.name, passwd, group).map_err(|r| why(r.to_string()))?;
    if let Account::Existing(e) = &account {
        return Err(why(format!(
            "the root filesystem already has a login user `{name}` (uid {}); clutch makes the user itself",
            e.uid
        )));
    }
    let mut args: Vec<String> = ["--create-home", "--shell", "/bin/bash"]
        .iter()
        .chain(account.useradd_group_args())
        .map(|s| s.to_string())
        .collect();
    if u.sudo {
        args.extend(["--groups".into(), "sudo".into()]);
    }
    let hash = u.password_hash.as_str();
    // `!` keeps the account usable for ssh keys while no password can match.
    args.push("--password".into());
    args.push(if hash.is_empty() { "!" } else { hash }.into());
    args.push(name.into());
    Ok(args)
}

/// Whether the image has a compiled zone `name` (links followed inside the image).
fn zone_in_root(root: &Path, name: &str) -> bool {
    resolve_in_root(root, &format!("{}/{name}", zone::ZONEINFO))
        .is_ok_and(|p| zone::is_compiled_zone(&p))
}

/// Points /etc/localtime at `tz` ([`plan_names`] made sure the image has it).
fn set_timezone(root: &Path, tz: &str) -> Result<()> {
    let zone = Path::new(zone::ZONEINFO).join(tz);
    let lt = root.join("etc/localtime");
    let _ = std::fs::remove_file(&lt);
    symlink(&zone, &lt)?;
    write(root, "etc/timezone", &format!("{tz}\n"), 0o644)
}

fn add_user(root: &Path, u: &User, useradd: &[String]) -> Result<()> {
    let name = u.name.as_str();
    cmd::run(
        Command::new("useradd")
            .arg("--root")
            .arg(root)
            .args(useradd),
    )
    .with_context(|| format!("creating user {name}"))?;
    let passwd = std::fs::read_to_string(root.join("etc/passwd"))?;
    let Some(entry) = account::find_user(&passwd, name) else {
        bail!("useradd ran, but user {name} is not in the image's /etc/passwd");
    };
    let home = root.join(entry.home.trim_start_matches('/'));
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh)?;
    let keys: String = u.authorized_keys.iter().map(|k| format!("{k}\n")).collect();
    write(&ssh, "authorized_keys", &keys, 0o600)?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    for p in [&ssh, &ssh.join("authorized_keys")] {
        std::os::unix::fs::chown(p, Some(entry.uid), Some(entry.gid))?;
    }
    if u.sudo {
        write(
            root,
            &format!("etc/sudoers.d/clutch-{name}"),
            &format!(
                "# Written by clutch build ([user] sudo = true).\n{name} ALL=(ALL) NOPASSWD:ALL\n"
            ),
            0o440,
        )?;
    }
    Ok(())
}

fn configure_ssh(root: &Path, cfg: &ImageConfig) -> Result<()> {
    let pa = if cfg.ssh.password_authentication {
        "yes"
    } else {
        "no"
    };
    write(
        root,
        "etc/ssh/sshd_config.d/50-clutch.conf",
        &format!(
            "# Written by clutch build ([ssh] section).\nPasswordAuthentication {pa}\nKbdInteractiveAuthentication {pa}\nPermitRootLogin no\n"
        ),
        0o644,
    )?;
    if !cfg.ssh.enabled {
        cmd::run(
            Command::new("systemctl")
                .arg(format!("--root={}", root.display()))
                .args(["disable", "ssh.service"]),
        )?;
        cmd::run(
            Command::new("systemctl")
                .arg(format!("--root={}", root.display()))
                .args(["mask", "ssh.service", "ssh.socket"]),
        )?;
    }
    Ok(())
}

fn enable_units(root: &Path, units: &[&str]) -> Result<()> {
    cmd::run(
        Command::new("systemctl")
            .arg(format!("--root={}", root.display()))
            .arg("enable")
            .args(units),
    )
    .context("enabling units in the image")?;
    Ok(())
}

/// Copies a folder tree over `dest`, keeping modes and symlinks; files become root-owned.
pub fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let from = src.join(&rel);
        let to = dest.join(&rel);
        let meta = from.symlink_metadata()?;
        let ft = meta.file_type();
        if ft.is_dir() {
            if !to.is_dir() {
                std::fs::create_dir_all(&to)?;
                std::fs::set_permissions(&to, meta.permissions())?;
            }
            let mut entries: Vec<_> = std::fs::read_dir(&from)?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            entries.sort();
            for n in entries {
                stack.push(rel.join(n));
            }
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&from)?;
            if to.symlink_metadata().is_ok() {
                std::fs::remove_file(&to)?;
            }
            symlink(target, &to)?;
        } else if ft.is_file() {
            if to
                .symlink_metadata()
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                std::fs::remove_file(&to)?;
            }
            std::fs::copy(&from, &to)?;
            std::fs::set_permissions(&to, meta.permissions())?;
        }
    }
    Ok(())
}

/// Resolves `path` (absolute, inside the image) to a host path under `root`, following
/// symlinks as the image would, never leaving `root`.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(comp_name)
        .collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            parts.pop();
            continue;
        }
        let mut cur: PathBuf = root.to_path_buf();
        cur.extend(&parts);
        cur.push(&c);
        match cur.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    bail!("too many symlinks resolving {path} in the image");
                }
                let target = std::fs::read_link(&cur)?;
                if target.is_absolute() {
                    parts.clear();
                }
                for t in target.components().rev().filter_map(comp_name) {
                    pending.push(t);
                }
            }
            _ => parts.push(c),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&parts);
    Ok(out)
}

fn comp_name(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_and_absolute_links_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("boot")).unwrap();
        std::fs::write(r.join("boot/vmlinuz-6.1"), b"k").unwrap();
        symlink("boot/vmlinuz-6.1", r.join("vmlinuz")).unwrap();
        symlink("/boot/vmlinuz-6.1", r.join("abs")).unwrap();
        symlink("../../../../etc/shadow", r.join("escape")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/vmlinuz").unwrap(),
            r.join("boot/vmlinuz-6.1")
        );
        assert_eq!(
            resolve_in_root(r, "/abs").unwrap(),
            r.join("boot/vmlinuz-6.1")
        );
        // `..` never climbs above the image root.
        assert_eq!(resolve_in_root(r, "/escape").unwrap(), r.join("etc/shadow"));
    }

    #[test]
    fn copy_tree_keeps_modes_and_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dst = t.path().join("dst");
        std::fs::create_dir_all(src.join("etc/a")).unwrap();
        std::fs::write(src.join("etc/a/x.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            src.join("etc/a/x.sh"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        symlink("x.sh", src.join("etc/a/y")).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        copy_tree(&src, &dst).unwrap();
        let m = std::fs::metadata(dst.join("etc/a/x.sh")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o750);
        assert_eq!(
            std::fs::read_link(dst.join("etc/a/y")).unwrap(),
            Path::new("x.sh")
        );
    }

    #[test]
    fn fstab_names_both_partitions() {
        let b = crate::testutil::board("amd64");
        let f = fstab(&b, "R-UUID", "B-UUID");
        assert!(f.contains("PARTUUID=R-UUID  /  ext4"));
        assert!(f.contains("PARTUUID=B-UUID  /boot/efi  vfat"));
    }

    #[test]
    fn rpi_root_templates_keep_cmdline_through_kernel_upgrades() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        // Debian ships /etc/default as a folder; a symlinked /etc must be followed.
        std::fs::create_dir_all(root.join("real-etc/default")).unwrap();
        symlink("real-etc", root.join("etc")).unwrap();
        let board = crate::testutil::board("rpi4");
        let cfg = crate::testutil::image_config("[kernel]\ncmdline = [\"quiet\"]\n");
        let bin = root.join("fb");
        let inp = StageInputs {
            cfg: &cfg,
            board: &board,
            overlays: vec![],
            firstboot_bin: &bin,
            firstboot_unit: &bin,
            root_partuuid: "1234abcd-02".into(),
            boot_partuuid: "1234abcd-01".into(),
            names: NamePlan::default(),
        };
        write_root_templates(root, &inp).unwrap();
        let fw = std::fs::read_to_string(root.join("real-etc/default/raspi-firmware")).unwrap();
        assert!(fw.contains("\nROOTPART=\"PARTUUID=1234abcd-02\"\n"), "{fw}");
        assert!(fw.contains("\nCONSOLES=\"tty0 ttyS1,115200\"\n"), "{fw}");
        let custom =
            std::fs::read_to_string(root.join("real-etc/default/raspi-firmware-custom")).unwrap();
        assert!(
            custom.contains("[cm4]\ndevice_tree=bcm2711-rpi-cm4-io.dtb\n"),
            "{custom}"
        );
        let extra =
            std::fs::read_to_string(root.join("real-etc/default/raspi-extra-cmdline")).unwrap();
        assert_eq!(extra, "cgroup_enable=memory cgroup_memory=1 quiet\n");
        // The amd64 board has none and writes nothing.
        let amd = crate::testutil::board("amd64");
        assert!(amd.root.templates.is_empty());
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";

    fn config(user: &str, tz: &str) -> ImageConfig {
        let text = format!(
            "version = 1\nboard = \"amd64\"\npackages = [\"tzdata-legacy\"]\n[system]\ntimezone = \"{tz}\"\n[user]\nname = \"{user}\"\nauthorized_keys = [\"{KEY}\"]\n"
        );
        clutch_config::parse_image_config(Path::new("t.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A staged tree with a real trixie root filesystem's accounts (empty shadow files) and
    /// two compiled zones; US/Eastern is not there, as in trixie without tzdata-legacy.
    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let put = |rel: &str, body: &[u8]| {
            let p = r.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        put("etc/passwd", crate::testutil::TRIXIE_PASSWD.as_bytes());
        put("etc/group", crate::testutil::TRIXIE_GROUP.as_bytes());
        put("etc/shadow", b"");
        put("etc/gshadow", b"");
        put("usr/share/zoneinfo/Etc/UTC", b"TZif2 compiled zone");
        put(
            "usr/share/zoneinfo/America/New_York",
            b"TZif2 compiled zone",
        );
        symlink("Etc/UTC", r.join("usr/share/zoneinfo/UTC")).unwrap();
        std::fs::create_dir_all(r.join("home")).unwrap();
        t
    }

    #[test]
    fn names_are_checked_against_the_staged_tree() {
        let t = tree();
        let plan = |u: &str, tz: &str| plan_names(t.path(), &config(u, tz));
        let ok = plan("operator", "UTC").unwrap();
        let args = ok.useradd.unwrap();
        assert_eq!(
            args.join(" "),
            format!(
                "--create-home --shell /bin/bash --no-user-group --gid users --groups sudo --password ! operator"
            )
        );
        assert!(
            plan("admin", "America/New_York")
                .unwrap()
                .useradd
                .unwrap()
                .contains(&"--user-group".to_string())
        );
        // What `clutch check` cannot know: a user from an extra package (postgresql here).
        let passwd = r#"postgres:x:105:110:PostgreSQL administrator:/var/lib/postgresql:/bin/bash"#;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("etc/passwd"))
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{passwd}\n").as_bytes()).unwrap();
        for (user, tz, key, want) in [
            (
                "postgres",
                "UTC",
                "user.name",
                "`postgres` is a system account (uid 105, \"PostgreSQL administrator\")",
            ),
            // tzdata-legacy is in the config's packages, but not in this tree.
            (
                "admin",
                "US/Eastern",
                "system.timezone",
                "use `America/New_York`",
            ),
            // A zone trixie's tzdata has and this tree lacks (another suite's tzdata).
            (
                "admin",
                "Europe/Paris",
                "system.timezone",
                "no time zone `Europe/Paris`",
            ),
        ] {
            match plan(user, tz) {
                Err(PlanNamesError::Invalid(i)) => {
                    assert_eq!(i.key.to_string(), key);
                    assert!(i.message.contains(want), "{user} {tz}: {}", i.message);
                    assert!(i.message.contains("this image's"), "{}", i.message);
                }
                r => panic!("{user} {tz}: {r:?}"),
            }
        }
    }

    /// The staging of a user whose name a base-system group has, with the real useradd:
    /// the user `operator` gets primary group `users`, the group `operator` stays as it is.
    #[test]
    fn operator_is_staged_with_the_users_group_by_real_useradd() {
        if !crate::testutil::need_root("useradd --root chroots") {
            return;
        }
        let t = tree();
        let r = t.path();
        let cfg = config("operator", "UTC");
        let args = plan_names(r, &cfg).unwrap().useradd.unwrap();
        add_user(r, cfg.user.as_ref().unwrap(), &args).unwrap();
        let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        let passwd = read("etc/passwd");
        assert!(
            passwd.ends_with("operator:x:1000:100::/home/operator:/bin/bash\n"),
            "{passwd}"
        );
        let group = read("etc/group");
        assert!(
            group.contains("\noperator:x:37:\n"),
            "the group is left alone: {group}"
        );
        assert!(group.contains("\nsudo:x:27:operator\n"), "{group}");
        assert_eq!(
            group.matches("operator:").count(),
            1,
            "no second group: {group}"
        );
        assert!(read("etc/shadow").starts_with("operator:!:"));
        let keys = r.join("home/operator/.ssh/authorized_keys");
        assert_eq!(std::fs::read_to_string(&keys).unwrap(), format!("{KEY}\n"));
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&keys).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (1000, 100, 0o600));
        assert!(
            read("etc/sudoers.d/clutch-operator").contains("\noperator ALL=(ALL) NOPASSWD:ALL\n")
        );
    }
}
