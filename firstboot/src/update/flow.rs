//! The update commands: [`check`] (what the source offers, verified), [`apply`] (download,
//! write the inactive slot, switch, reboot), [`health`] (every boot: commit or roll back a
//! release on trial, notice a fallback the boot loader did), [`rollback`] (by command).

use std::path::{Path, PathBuf};

use clutch_config::{Phase, Release, UpdateSource};

use super::boot::{self, Scheme, Slot};
use super::slot::{Running, partition_dev, partition_label};
use super::state::{Live, Outcome, Pending, UpdateState, UpdateStatus, Verdict};
use super::verify::{self, Refusal, ReleaseInfo};
use crate::facts::Paths;
use crate::fsx;

/// Where verified release files wait for sysupdate (node path; the data partition).
pub const INCOMING: &str = "/var/lib/clutch/update/incoming";
/// The sysupdate definitions of the image (node path).
pub const TRANSFERS: &str = "/usr/lib/clutch/sysupdate.d";
/// systemd-sysupdate and the importer it uses: Debian keeps both out of `PATH`.
pub const SYSUPDATE: &str = "/usr/lib/systemd/systemd-sysupdate";
pub const IMPORT: &str = "/usr/lib/systemd/systemd-import";
/// The release-signing public key of the image (node path).
pub const PUBLIC_KEY: &str = "/usr/lib/clutch/update-key.pub";
/// How long a release on trial may take to reach `ready`.
pub const HEALTH_TIMEOUT_SECS: u64 = 600;
/// Size limits of what is downloaded.
const SMALL: u64 = 64 << 10;
const LARGE: u64 = 16 << 30;

/// Side effects of updating (a fake in tests).
pub trait UpdateSys {
    fn download(
        &self,
        url: &str,
        dest: &Path,
        limit: u64,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<u64, String>;
    /// Runs a command; its output, or why it failed (stderr included).
    fn run(&self, program: &str, args: &[String]) -> Result<String, String>;
    /// Reboots; `tryboot`: the Raspberry Pi firmware's one-time trial boot.
    fn reboot(&self, tryboot: bool) -> Result<(), String>;
    fn now(&self) -> u64;
    fn sleep(&self, secs: u64);
    /// Booted by UEFI firmware (else legacy BIOS or a Pi's firmware).
    fn uefi(&self) -> bool;
}

/// What the cluster's rollout coordinator says before this node goes down.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Go; keep this ticket across the reboot.
    Go(Option<serde_json::Value>),
    /// Not now; why.
    Wait(String),
    /// Never: the cluster found this release bad (who, why).
    Refuse(String),
}

/// The seam for coordinated rollouts (one voter at a time, never losing quorum).
pub trait Rollout {
    /// Before anything is downloaded: has the cluster found `release` bad? (who and why)
    fn bad(&self, _release: &Release) -> Result<Option<String>, String> {
        Ok(None)
    }
    fn before_reboot(&self, release: &Release) -> Result<Gate, String>;
    /// While the release is on trial, every [`KEEP_EVERY_SECS`]: hold on to the ticket
    /// (it lives on a lease that must outlive the reboot and the rejoin).
    fn keep(&self, _release: &Release, _ticket: Option<&serde_json::Value>) {}
    /// The node never went down (writing the slot failed): give the ticket back; nothing
    /// was learnt about the release.
    fn give_back(&self, _release: &Release, _why: &str, _ticket: Option<&serde_json::Value>) {}
    fn after_commit(&self, release: &Release, ticket: Option<&serde_json::Value>);
    fn after_rollback(&self, release: &Release, reason: &str, ticket: Option<&serde_json::Value>);
}

/// How often a release on trial renews the rollout ticket.
pub const KEEP_EVERY_SECS: u64 = 30;

/// A node on its own (no cluster, or engine `none`): always go.
pub struct Standalone;

impl Rollout for Standalone {
    fn before_reboot(&self, _: &Release) -> Result<Gate, String> {
        Ok(Gate::Go(None))
    }
    fn after_commit(&self, _: &Release, _: Option<&serde_json::Value>) {}
    fn after_rollback(&self, _: &Release, _: &str, _: Option<&serde_json::Value>) {}
}

/// Why an update command stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stop {
    #[error("refused: {0}")]
    Refused(String),
    /// Not this node's turn within the wait; the next check tries again.
    #[error("waiting for the rollout: {0}")]
    Later(String),
    #[error("{0}")]
    Failed(String),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Self {
        Stop::Refused(r.to_string())
    }
}

pub struct Ctx<'a> {
    pub paths: &'a Paths,
    pub sys: &'a dyn UpdateSys,
    pub rollout: &'a dyn Rollout,
    pub run: Running,
}

impl Ctx<'_> {
    fn host(&self, node: impl AsRef<Path>) -> PathBuf {
        self.paths.host(node)
    }

    /// Publishes the update state.
    pub fn show(&self, u: UpdateStatus) {
        super::publish(
            self.paths,
            &Live {
                release: self.run.release.to_string(),
                slot: self.run.slot.as_str().into(),
                update: UpdateStatus {
                    scheme: self.run.info.scheme.clone(),
                    ..u
                },
            },
        );
    }

    fn state(&self) -> Result<UpdateState, Stop> {
        UpdateState::load(self.paths).map_err(Stop::Failed)
    }

    fn save(&self, s: &UpdateState) -> Result<(), Stop> {
        s.save(self.paths).map_err(Stop::Failed)
    }

    fn boot_file(&self, rel: &str) -> PathBuf {
        self.host(self.paths.boot_dir.join(rel))
    }
}

fn status(state: &str, release: &str, reason: &str) -> UpdateStatus {
    UpdateStatus {
        state: state.into(),
        release: release.into(),
        reason: reason.into(),
        ..Default::default()
    }
}

/// A verified offer.
#[derive(Debug, Clone)]
pub struct Offer {
    pub info: ReleaseInfo,
    pub sums: std::collections::BTreeMap<String, String>,
    pub newer: bool,
}

/// Fetches and verifies what `source` offers.
pub fn check(ctx: &Ctx<'_>, source: &UpdateSource) -> Result<Offer, Stop> {
    let inc = ctx.host(INCOMING);
    fsx::create_dir_all_durable(&inc)
        .map_err(|e| Stop::Failed(format!("{}: {e}", inc.display())))?;
    let fetch_small = |name: &str| -> Result<Vec<u8>, Stop> {
        let dest = inc.join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&dest);
        ctx.sys
            .download(&source.join(name), &dest, SMALL, &mut |_, _| {})
            .map_err(|e| Stop::Failed(format!("cannot fetch {name}: {e}")))?;
        let b = std::fs::read(&dest).map_err(|e| Stop::Failed(e.to_string()))?;
        let _ = std::fs::remove_file(&dest);
        Ok(b)
    };
    let sums_bytes = fetch_small("SHA256SUMS")?;
    let sig = match fetch_small("SHA256SUMS.sig") {
        Ok(s) => s,
        Err(Stop::Failed(e)) if e.contains("404") => return Err(Refusal::Unsigned.into()),
        Err(e) => return Err(e),
    };
    let key = verify::load_key(&ctx.host(PUBLIC_KEY))?;
    verify::check_signature(&key, &sums_bytes, &sig)?;
    let sums = verify::parse_sums(&String::from_utf8_lossy(&sums_bytes))?;
    let info_path = inc.join("release.json");
    let _ = std::fs::remove_file(&info_path);
    ctx.sys
        .download(
            &source.join("release.json"),
            &info_path,
            SMALL,
            &mut |_, _| {},
        )
        .map_err(|e| Stop::Failed(format!("cannot fetch release.json: {e}")))?;
    verify::check_file(&sums, "release.json", &info_path)?;
    let info: ReleaseInfo = serde_json::from_slice(
        &std::fs::read(&info_path).map_err(|e| Stop::Failed(e.to_string()))?,
    )
    .map_err(|e| Refusal::Info(e.to_string()))?;
    for f in &info.files {
        if !sums.contains_key(f) {
            return Err(Refusal::Unlisted { name: f.clone() }.into());
        }
    }
    let st = ctx.state()?;
    let newer = verify::judge(
        &info,
        &ctx.run.info,
        &ctx.run.release,
        st.bad(&info.release).map(|b| b.reason.as_str()),
    )?;
    Ok(Offer { info, sums, newer })
}

/// Downloads the offer's files into the incoming folder, each checked (a partial file
/// from an earlier try is continued).
fn download_all(ctx: &Ctx<'_>, source: &UpdateSource, offer: &Offer) -> Result<(), Stop> {
    let inc = ctx.host(INCOMING);
    let keep: Vec<&String> = offer.info.files.iter().collect();
    if let Ok(rd) = std::fs::read_dir(&inc) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n != "release.json" && !keep.contains(&&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let r = offer.info.release.to_string();
    for name in &offer.info.files {
        let dest = inc.join(name);
        if verify::check_file(&offer.sums, name, &dest).is_ok() {
            continue;
        }
        let mut last_pct = 255u8;
        ctx.sys
            .download(&source.join(name), &dest, LARGE, &mut |done, total| {
                let pct = total.map_or(0, |t| (done * 100 / t.max(1)) as u8);
                if pct / 5 != last_pct / 5 {
                    last_pct = pct;
                    ctx.show(UpdateStatus {
                        progress: Some(pct),
                        ..status("downloading", &r, name)
                    });
                }
            })
            .map_err(|e| Stop::Failed(format!("downloading {name}: {e}")))?;
        if let Err(e) = verify::check_file(&offer.sums, name, &dest) {
            let _ = std::fs::remove_file(&dest);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Writes the inactive slot (sysupdate on GPT schemes; the importer and tar on os-prefix).
fn write_slot(ctx: &Ctx<'_>, offer: &Offer) -> Result<(), Stop> {
    let r = &offer.info.release;
    ctx.show(status("writing", r.as_str(), "the inactive slot"));
    match ctx.run.scheme {
        Scheme::SystemdBoot | Scheme::Tryboot => {
            let args = vec![
                format!("--definitions={}", TRANSFERS),
                "update".into(),
                r.to_string(),
            ];
            ctx.sys
                .run(SYSUPDATE, &args)
                .map_err(|e| Stop::Failed(format!("systemd-sysupdate: {e}")))?;
        }
        Scheme::OsPrefix => write_os_prefix_slot(ctx, offer)?,
    }
    Ok(())
}

fn write_os_prefix_slot(ctx: &Ctx<'_>, offer: &Offer) -> Result<(), Stop> {
    let r = &offer.info.release;
    let other = ctx.run.slot.other();
    let inc = ctx.host(INCOMING);
    let dev = partition_dev(&ctx.run.disk_dev, ctx.run.scheme.root_partition(other));
    let run = |p: &str, a: Vec<String>| {
        ctx.sys
            .run(p, &a)
            .map_err(|e| Stop::Failed(format!("{p}: {e}")))
    };
    run(
        IMPORT,
        vec![
            "raw".into(),
            "--direct".into(),
            inc.join(format!("clutch_{r}.root.raw.xz"))
                .display()
                .to_string(),
            dev.display().to_string(),
        ],
    )?;
    let tar = inc.join(format!("clutch_{r}.boot.tar"));
    run(
        IMPORT,
        vec![
            "raw".into(),
            "--direct".into(),
            inc.join(format!("clutch_{r}.boot.tar.xz"))
                .display()
                .to_string(),
            tar.display().to_string(),
        ],
    )?;
    let folder = ctx.boot_file(other.as_str());
    let _ = std::fs::remove_dir_all(&folder);
    fsx::create_dir_all_durable(&folder).map_err(|e| Stop::Failed(e.to_string()))?;
    run(
        "tar",
        vec![
            "-C".into(),
            folder.display().to_string(),
            "--no-same-owner".into(),
            "-xf".into(),
            tar.display().to_string(),
        ],
    )?;
    // The release's cmdline.txt names slot a's partition; point it at this one.
    let cmdline = folder.join("cmdline.txt");
    let text = std::fs::read_to_string(&cmdline).map_err(|e| Stop::Failed(e.to_string()))?;
    let part = ctx.run.scheme.root_partition(other);
    let root = text
        .split_whitespace()
        .find(|a| a.starts_with("root=PARTUUID="))
        .and_then(|a| a.rsplit_once('-'))
        .map(|(id, _)| format!("{id}-{part:02}"))
        .ok_or_else(|| Stop::Failed("cmdline.txt has no root=PARTUUID=".into()))?;
    fsx::write_atomic(
        &cmdline,
        (boot::with_root(text.trim(), &root) + "\n").as_bytes(),
        0o644,
    )
    .map_err(|e| Stop::Failed(e.to_string()))?;
    fsx::write_atomic(&folder.join("release"), format!("{r}\n").as_bytes(), 0o644)
        .map_err(|e| Stop::Failed(e.to_string()))?;
    Ok(())
}

/// Keeps the engine's configuration of this slot for slot `to` (see [`slot::hand_over`]).
fn hand_over(ctx: &Ctx<'_>, to: Slot) -> Result<(), Stop> {
    super::slot::hand_over(ctx.paths, to).map_err(|e| {
        Stop::Failed(format!(
            "keeping the cluster engine's configuration for slot {}: {e}",
            to.as_str()
        ))
    })
}

/// Points the boot loader at `r` for the trial boot where clutch has to (the rest boots the
/// newest entry by itself). Returns whether the reboot is a Pi `tryboot`.
fn switch_for_trial(ctx: &Ctx<'_>, r: &Release) -> Result<bool, Stop> {
    let fail = |e: std::io::Error| Stop::Failed(e.to_string());
    match ctx.run.scheme {
        Scheme::SystemdBoot if ctx.sys.uefi() => Ok(false),
        Scheme::SystemdBoot => {
            set_syslinux(ctx, r)?;
            Ok(false)
        }
        Scheme::Tryboot => {
            let other = ctx.run.slot.other();
            let (Some(cur), Some(new)) = (
                ctx.run.scheme.boot_partition(ctx.run.slot),
                ctx.run.scheme.boot_partition(other),
            ) else {
                return Err(Stop::Failed("no boot partitions".into()));
            };
            let label = partition_label(ctx.paths, &partition_dev(&ctx.run.disk_dev, new));
            if label.as_deref() != Some(&format!("clutchboot_{r}")) {
                return Err(Stop::Failed(format!(
                    "sysupdate did not put release {r}'s boot files on partition {new} (its label is {label:?})"
                )));
            }
            fsx::write_atomic(
                &ctx.boot_file("autoboot.txt"),
                boot::autoboot_txt(cur, new).as_bytes(),
                0o644,
            )
            .map_err(fail)?;
            Ok(true)
        }
        Scheme::OsPrefix => {
            set_os_prefix(ctx, ctx.run.slot.other())?;
            Ok(false)
        }
    }
}

fn set_os_prefix(ctx: &Ctx<'_>, s: Slot) -> Result<(), Stop> {
    let p = ctx.boot_file("config.txt");
    let text =
        std::fs::read_to_string(&p).map_err(|e| Stop::Failed(format!("{}: {e}", p.display())))?;
    fsx::write_atomic(&p, boot::with_os_prefix(&text, s).as_bytes(), 0o644)
        .map_err(|e| Stop::Failed(e.to_string()))
}

/// The boot entries folder on the ESP and the names of the files in it.
fn entry_names(ctx: &Ctx<'_>) -> Result<(PathBuf, Vec<String>), Stop> {
    let dir = ctx.boot_file("loader/entries");
    let names = std::fs::read_dir(&dir)
        .map_err(|e| Stop::Failed(format!("{}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Ok((dir, names))
}

/// syslinux.cfg booting release `r`, with the options of `r`'s entry.
fn set_syslinux(ctx: &Ctx<'_>, r: &Release) -> Result<(), Stop> {
    let (dir, names) = entry_names(ctx)?;
    let e = boot::entries(names.iter().map(String::as_str))
        .into_iter()
        .find(|e| &e.release == r)
        .ok_or_else(|| {
            Stop::Failed(format!(
                "no boot entry for release {r} in {}",
                dir.display()
            ))
        })?;
    let text =
        std::fs::read_to_string(dir.join(&e.name)).map_err(|e| Stop::Failed(e.to_string()))?;
    let opts = boot::entry_options(&text)
        .ok_or_else(|| Stop::Failed(format!("{} has no options line", e.name)))?;
    fsx::write_atomic(
        &ctx.boot_file("syslinux/syslinux.cfg"),
        boot::syslinux_cfg(r, opts).as_bytes(),
        0o644,
    )
    .map_err(|e| Stop::Failed(e.to_string()))
}

/// Renames release `r`'s entry so systemd-boot sorts it last (no tries left).
fn mark_entry_bad(ctx: &Ctx<'_>, r: &Release) -> Result<(), Stop> {
    let (dir, names) = entry_names(ctx)?;
    for e in boot::entries(names.iter().map(String::as_str)) {
        if &e.release == r && !e.bad() {
            std::fs::rename(dir.join(&e.name), dir.join(e.bad_name()))
                .map_err(|err| Stop::Failed(format!("renaming {}: {err}", e.name)))?;
            fsx::sync_dir(&dir);
        }
    }
    Ok(())
}

/// `update --now`: check, download, ask the rollout, write, switch, reboot.
pub fn apply(ctx: &Ctx<'_>, source: &UpdateSource) -> Result<Option<Release>, Stop> {
    let mut st = ctx.state()?;
    if let Some(p) = &st.pending {
        return Err(Stop::Failed(format!(
            "an update to release {} is not decided yet (it is checked at boot)",
            p.release
        )));
    }
    ctx.show(status("checking", "", source.as_str()));
    let offer = check(ctx, source)?;
    let r = offer.info.release.clone();
    if !offer.newer {
        return Ok(None);
    }
    ctx.show(status("checking", r.as_str(), source.as_str()));
    if let Some(why) = ctx.rollout.bad(&r).map_err(Stop::Failed)? {
        return Err(Stop::Refused(why));
    }
    download_all(ctx, source, &offer)?;
    let ticket = match ctx.rollout.before_reboot(&r).map_err(Stop::Failed)? {
        Gate::Go(t) => t,
        Gate::Wait(why) => {
            ctx.show(status("waiting", r.as_str(), &why));
            return Err(Stop::Later(why));
        }
        Gate::Refuse(why) => return Err(Stop::Refused(why)),
    };
    let give_back = |why: &str| ctx.rollout.give_back(&r, why, ticket.as_ref());
    let to = ctx.run.slot.other();
    if let Err(e) = write_slot(ctx, &offer)
        .and_then(|_| hand_over(ctx, to))
        .and_then(|_| switch_for_trial(ctx, &r))
    {
        give_back(&e.to_string());
        return Err(e);
    }
    let tryboot = ctx.run.scheme == Scheme::Tryboot;
    st.pending = Some(Pending {
        release: r.clone(),
        slot: ctx.run.slot.other().as_str().into(),
        from_release: ctx.run.release.clone(),
        from_slot: ctx.run.slot.as_str().into(),
        started: ctx.sys.now(),
        ticket,
        failure: None,
        written_only: false,
    });
    ctx.save(&st)?;
    ctx.show(status("rebooting", r.as_str(), "into the new slot"));
    crate::status::print_console(&format!(
        "clutch: update rebooting into release={r} slot={}",
        ctx.run.slot.other().as_str()
    ));
    ctx.sys.reboot(tryboot).map_err(Stop::Failed)?;
    Ok(Some(r))
}

/// Reads the node's phase from status.json.
fn phase(ctx: &Ctx<'_>) -> Option<(Phase, Option<String>)> {
    let s = crate::status::read_status(&ctx.paths.status_file()).ok()?;
    Some((s.phase, s.error))
}

/// What [`health`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Nothing,
    Committed(Release),
    /// The boot loader had gone back before this boot.
    FellBack(Release),
    /// This boot gave the release up and is rebooting.
    GaveUp(Release),
}

/// Every boot: decide a release on trial.
pub fn health(ctx: &Ctx<'_>) -> Result<Health, Stop> {
    let mut st = ctx.state()?;
    let Some(p) = st.pending.clone() else {
        return Ok(Health::Nothing);
    };
    if p.release != ctx.run.release {
        let reason = p.failure.clone().unwrap_or_else(|| {
            format!(
                "release {} never came up on slot {} (kernel panic, init failure or hang before clutch-firstboot); the boot loader went back to release {} on slot {}",
                p.release,
                p.slot,
                ctx.run.release,
                ctx.run.slot.as_str()
            )
        });
        finish(ctx, &mut st, Verdict::RolledBack, &p.release, &reason)?;
        ctx.rollout
            .after_rollback(&p.release, &reason, p.ticket.as_ref());
        return Ok(Health::FellBack(p.release));
    }
    ctx.show(status(
        "trying",
        p.release.as_str(),
        "waiting for phase=ready",
    ));
    let deadline = ctx.sys.now() + HEALTH_TIMEOUT_SECS;
    let mut next_keep = 0;
    let why = loop {
        match phase(ctx) {
            Some((Phase::Ready, _)) => {
                commit(ctx)?;
                finish(
                    ctx,
                    &mut st,
                    Verdict::Committed,
                    &p.release,
                    "ready on the new slot",
                )?;
                ctx.rollout.after_commit(&p.release, p.ticket.as_ref());
                return Ok(Health::Committed(p.release));
            }
            Some((Phase::Failed, e)) => {
                break format!(
                    "release {} reached phase=failed: {}",
                    p.release,
                    e.unwrap_or_default()
                );
            }
            _ => {}
        }
        if ctx.sys.now() >= next_keep {
            ctx.rollout.keep(&p.release, p.ticket.as_ref());
            next_keep = ctx.sys.now() + KEEP_EVERY_SECS;
        }
        if ctx.sys.now() >= deadline {
            let ph = phase(ctx).map_or("unknown".to_string(), |(p, _)| p.to_string());
            break format!(
                "release {} did not reach phase=ready within {HEALTH_TIMEOUT_SECS} s (phase={ph})",
                p.release
            );
        }
        ctx.sys.sleep(2);
    };
    give_up(ctx, &mut st, &p, &why)?;
    Ok(Health::GaveUp(p.release))
}

fn commit(ctx: &Ctx<'_>) -> Result<(), Stop> {
    // systemd-boot: systemd-bless-boot renames the entry once boot-complete.target is
    // reached, which waits for this check. Tryboot: make the trial partition the default.
    if ctx.run.scheme == Scheme::Tryboot {
        let s = ctx.run.slot;
        let (Some(cur), Some(other)) = (
            ctx.run.scheme.boot_partition(s),
            ctx.run.scheme.boot_partition(s.other()),
        ) else {
            return Ok(());
        };
        fsx::write_atomic(
            &ctx.boot_file("autoboot.txt"),
            boot::autoboot_txt(cur, other).as_bytes(),
            0o644,
        )
        .map_err(|e| Stop::Failed(e.to_string()))?;
    }
    Ok(())
}

fn give_up(ctx: &Ctx<'_>, st: &mut UpdateState, p: &Pending, why: &str) -> Result<(), Stop> {
    tracing::error!("{why}; rolling back to release {}", p.from_release);
    if let Some(pp) = &mut st.pending {
        pp.failure = Some(why.to_string());
    }
    ctx.save(st)?;
    ctx.show(status("failed", p.release.as_str(), why));
    match ctx.run.scheme {
        Scheme::SystemdBoot if ctx.sys.uefi() => mark_entry_bad(ctx, &p.release)?,
        Scheme::SystemdBoot => set_syslinux(ctx, &p.from_release)?,
        // The trial boot is one-shot: a plain reboot boots the committed partition.
        Scheme::Tryboot => {}
        Scheme::OsPrefix => set_os_prefix(ctx, ctx.run.slot.other())?,
    }
    ctx.sys.reboot(false).map_err(Stop::Failed)
}

fn finish(
    ctx: &Ctx<'_>,
    st: &mut UpdateState,
    v: Verdict,
    r: &Release,
    reason: &str,
) -> Result<(), Stop> {
    let o = Outcome {
        result: v,
        release: r.to_string(),
        reason: reason.to_string(),
        at: ctx.sys.now(),
    };
    if v == Verdict::RolledBack {
        st.mark_bad(r, reason);
    }
    st.pending = None;
    st.last = Some(o.clone());
    ctx.save(st)?;
    let word = match v {
        Verdict::Committed => "committed",
        Verdict::RolledBack => "rolled-back",
        Verdict::Refused => "refused",
        Verdict::Failed => "failed",
    };
    ctx.show(UpdateStatus {
        last: Some(o),
        ..status(word, r.as_str(), reason)
    });
    crate::status::print_console(&format!(
        "clutch: update {word} release={r} reason=\"{reason}\""
    ));
    Ok(())
}

/// `update --rollback`: boot the other slot's release again, and never retry this one.
pub fn rollback(ctx: &Ctx<'_>) -> Result<Release, Stop> {
    let mut st = ctx.state()?;
    let other = ctx.run.slot.other();
    let other_release = match ctx.run.scheme {
        Scheme::OsPrefix => os_prefix_release(ctx, other),
        _ => partition_label(
            ctx.paths,
            &partition_dev(&ctx.run.disk_dev, ctx.run.scheme.root_partition(other)),
        )
        .and_then(|l| {
            l.strip_prefix("clutch_")
                .and_then(|r| Release::try_from(r).ok())
        }),
    }
    .ok_or_else(|| {
        Stop::Failed(format!(
            "slot {} holds no release to go back to",
            other.as_str()
        ))
    })?;
    // Before the boot loader is switched: a hand-over that fails leaves the node as it was.
    hand_over(ctx, other)?;
    match ctx.run.scheme {
        Scheme::SystemdBoot if ctx.sys.uefi() => mark_entry_bad(ctx, &ctx.run.release)?,
        Scheme::SystemdBoot => set_syslinux(ctx, &other_release)?,
        Scheme::Tryboot => {
            let (Some(cur), Some(o)) = (
                ctx.run.scheme.boot_partition(ctx.run.slot),
                ctx.run.scheme.boot_partition(other),
            ) else {
                return Err(Stop::Failed("no boot partitions".into()));
            };
            fsx::write_atomic(
                &ctx.boot_file("autoboot.txt"),
                boot::autoboot_txt(o, cur).as_bytes(),
                0o644,
            )
            .map_err(|e| Stop::Failed(e.to_string()))?;
        }
        Scheme::OsPrefix => set_os_prefix(ctx, other)?,
    }
    let reason = format!(
        "rolled back by command to release {other_release} on slot {}",
        other.as_str()
    );
    st.pending = None;
    finish(
        ctx,
        &mut st,
        Verdict::RolledBack,
        &ctx.run.release.clone(),
        &reason,
    )?;
    ctx.sys.reboot(false).map_err(Stop::Failed)?;
    Ok(other_release)
}

/// The release in a Pi 3 slot folder (the `release` file next to its cmdline.txt).
fn os_prefix_release(ctx: &Ctx<'_>, s: Slot) -> Option<Release> {
    let t = std::fs::read_to_string(ctx.boot_file(&format!("{}/release", s.as_str()))).ok()?;
    Release::try_from(t.trim()).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::update::slot::Running;
    use crate::update::verify::AbInfo;
    use ed25519_dalek::Signer;
    use ed25519_dalek::pkcs8::EncodePublicKey;
    use sha2::Digest;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Serves files from a map, records commands and reboots, and a clock that moves.
    #[derive(Default)]
    pub(crate) struct Fake {
        pub(crate) files: BTreeMap<String, Vec<u8>>,
        pub(crate) ran: RefCell<Vec<String>>,
        pub(crate) reboots: RefCell<Vec<bool>>,
        pub(crate) clock: RefCell<u64>,
        pub(crate) uefi: bool,
        /// Written to status.json when the test sleeps (the node coming up).
        pub(crate) phase_after_sleep: Option<Phase>,
        pub(crate) status_path: PathBuf,
    }

    impl UpdateSys for Fake {
        fn download(
            &self,
            url: &str,
            dest: &Path,
            limit: u64,
            progress: &mut dyn FnMut(u64, Option<u64>),
        ) -> Result<u64, String> {
            let name = url.rsplit('/').next().unwrap();
            let b = self
                .files
                .get(name)
                .ok_or_else(|| format!("{url}: not found (404)"))?;
            if b.len() as u64 > limit {
                return Err("too big".into());
            }
            std::fs::write(dest, b).unwrap();
            progress(b.len() as u64, Some(b.len() as u64));
            Ok(b.len() as u64)
        }
        fn run(&self, program: &str, args: &[String]) -> Result<String, String> {
            self.ran
                .borrow_mut()
                .push(format!("{program} {}", args.join(" ")));
            Ok(String::new())
        }
        fn reboot(&self, tryboot: bool) -> Result<(), String> {
            self.reboots.borrow_mut().push(tryboot);
            Ok(())
        }
        fn now(&self) -> u64 {
            *self.clock.borrow()
        }
        fn sleep(&self, secs: u64) {
            *self.clock.borrow_mut() += secs;
            if let Some(p) = self.phase_after_sleep {
                let s = crate::status::Status {
                    phase: p,
                    error: (p == Phase::Failed).then(|| "users: useradd failed".to_string()),
                    ..Default::default()
                };
                crate::status::write_status(&self.status_path, &s).unwrap();
            }
        }
        fn uefi(&self) -> bool {
            self.uefi
        }
    }

    pub(crate) struct Node {
        _d: tempfile::TempDir,
        pub(crate) paths: Paths,
        pub(crate) key: ed25519_dalek::SigningKey,
    }

    pub(crate) fn node() -> Node {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path(), "/boot/efi");
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let pem = key
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        let kp = paths.host(PUBLIC_KEY);
        std::fs::create_dir_all(kp.parent().unwrap()).unwrap();
        std::fs::write(kp, pem).unwrap();
        std::fs::create_dir_all(paths.host("/boot/efi/loader/entries")).unwrap();
        Node { _d: d, paths, key }
    }

    pub(crate) fn running(release: &str, slot: Slot) -> Running {
        Running {
            info: AbInfo {
                scheme: "systemd-boot".into(),
                board: "amd64".into(),
                arch: "amd64".into(),
                release: "1".try_into().unwrap(),
            },
            scheme: Scheme::SystemdBoot,
            release: release.try_into().unwrap(),
            slot,
            root_dev: "/dev/vda2".into(),
            disk_dev: "/dev/vda".into(),
        }
    }

    /// A release set for `rel`, signed by `key`.
    pub(crate) fn set(rel: &str, key: &ed25519_dalek::SigningKey) -> BTreeMap<String, Vec<u8>> {
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let names = [
            format!("clutch_{rel}.root.raw.xz"),
            format!("clutch_{rel}.conf.xz"),
        ];
        for n in &names {
            files.insert(n.clone(), format!("contents of {n}").into_bytes());
        }
        let info = serde_json::json!({
            "format": 1, "release": rel, "board": "amd64", "arch": "amd64",
            "scheme": "systemd-boot", "files": names, "root_bytes": 10,
        });
        files.insert("release.json".into(), info.to_string().into_bytes());
        let sums: String = files
            .iter()
            .map(|(n, b)| format!("{}  {n}\n", hex::encode(sha2::Sha256::digest(b))))
            .collect();
        files.insert(
            "SHA256SUMS.sig".into(),
            key.sign(sums.as_bytes()).to_bytes().to_vec(),
        );
        files.insert("SHA256SUMS".into(), sums.into_bytes());
        files
    }

    pub(crate) fn src() -> UpdateSource {
        "http://10.0.0.1:8080/update/"
            .to_string()
            .try_into()
            .unwrap()
    }

    fn ctx<'a>(n: &'a Node, sys: &'a Fake, run: Running) -> Ctx<'a> {
        Ctx {
            paths: &n.paths,
            sys,
            rollout: &Standalone,
            run,
        }
    }

    #[test]
    fn a_newer_signed_release_is_written_and_booted() {
        let n = node();
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let c = ctx(&n, &fake, running("1", Slot::A));
        assert_eq!(apply(&c, &src()).unwrap(), Some("2".try_into().unwrap()));
        assert_eq!(
            *fake.ran.borrow(),
            [
                "/usr/lib/systemd/systemd-sysupdate --definitions=/usr/lib/clutch/sysupdate.d update 2"
            ]
        );
        assert_eq!(*fake.reboots.borrow(), [false]);
        let st = UpdateState::load(&n.paths).unwrap();
        let p = st.pending.unwrap();
        assert_eq!((p.release.as_str(), p.slot.as_str()), ("2", "b"));
        let live = Live::load(&Live::path(&n.paths)).unwrap();
        assert_eq!(live.update.state, "rebooting");
        // The files sysupdate reads were each checked.
        assert!(
            n.paths
                .host(INCOMING)
                .join("clutch_2.root.raw.xz")
                .is_file()
        );
    }

    #[test]
    fn unsigned_wrongly_signed_truncated_and_older_releases_are_refused() {
        let n = node();
        let other = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        type Files = BTreeMap<String, Vec<u8>>;
        let cases: Vec<(&str, Files, &str)> = vec![
            (
                "unsigned",
                {
                    let mut f = set("2", &n.key);
                    f.remove("SHA256SUMS.sig");
                    f
                },
                "unsigned release",
            ),
            (
                "wrong key",
                set("2", &other),
                "not signed by this image's release key",
            ),
            (
                "altered sums",
                {
                    let mut f = set("2", &n.key);
                    let s = f.get_mut("SHA256SUMS").unwrap();
                    s[0] ^= 1;
                    f
                },
                "not signed by this image's release key",
            ),
            (
                "truncated",
                {
                    let mut f = set("2", &n.key);
                    f.get_mut("clutch_2.root.raw.xz").unwrap().truncate(3);
                    f
                },
                "clutch_2.root.raw.xz does not match SHA256SUMS (3 bytes received)",
            ),
            (
                "older",
                set("0", &n.key),
                "release 0 is older than the running release 1",
            ),
        ];
        for (what, files, want) in cases {
            let fake = Fake {
                files,
                uefi: true,
                ..Default::default()
            };
            let c = ctx(&n, &fake, running("1", Slot::A));
            let e = apply(&c, &src()).unwrap_err();
            assert!(matches!(e, Stop::Refused(_)), "{what}: {e}");
            assert!(e.to_string().contains(want), "{what}: {e}");
            assert!(fake.ran.borrow().is_empty(), "{what}: nothing written");
            assert!(fake.reboots.borrow().is_empty(), "{what}: no reboot");
            assert!(UpdateState::load(&n.paths).unwrap().pending.is_none());
        }
        // The running release itself: nothing to do.
        let fake = Fake {
            files: set("1", &n.key),
            ..Default::default()
        };
        assert_eq!(
            apply(&ctx(&n, &fake, running("1", Slot::A)), &src()),
            Ok(None)
        );
    }

    pub(crate) fn pending(n: &Node, rel: &str, from: &str) {
        UpdateState {
            pending: Some(Pending {
                release: rel.try_into().unwrap(),
                slot: "b".into(),
                from_release: from.try_into().unwrap(),
                from_slot: "a".into(),
                started: 0,
                ticket: None,
                failure: None,
                written_only: false,
            }),
            ..Default::default()
        }
        .save(&n.paths)
        .unwrap();
    }

    #[test]
    fn ready_on_the_new_slot_commits() {
        let n = node();
        pending(&n, "2", "1");
        let fake = Fake {
            uefi: true,
            phase_after_sleep: Some(Phase::Ready),
            status_path: n.paths.status_file(),
            ..Default::default()
        };
        let h = health(&ctx(&n, &fake, running("2", Slot::B))).unwrap();
        assert_eq!(h, Health::Committed("2".try_into().unwrap()));
        let st = UpdateState::load(&n.paths).unwrap();
        assert!(st.pending.is_none());
        assert_eq!(st.last.unwrap().result, Verdict::Committed);
        assert!(fake.reboots.borrow().is_empty());
        let s = crate::status::read_status(&n.paths.status_file()).unwrap();
        assert_eq!((s.release.as_str(), s.slot.as_str()), ("2", "b"));
        assert_eq!(s.update.unwrap().state, "committed");
    }

    #[test]
    fn a_release_that_never_came_up_is_reported_after_the_fallback() {
        let n = node();
        pending(&n, "3", "2");
        crate::status::write_status(&n.paths.status_file(), &Default::default()).unwrap();
        let fake = Fake::default();
        // The boot loader went back: this boot runs release 2 on slot a.
        let h = health(&ctx(&n, &fake, running("2", Slot::A))).unwrap();
        assert_eq!(h, Health::FellBack("3".try_into().unwrap()));
        let st = UpdateState::load(&n.paths).unwrap();
        let last = st.last.unwrap();
        assert_eq!(last.result, Verdict::RolledBack);
        assert!(
            last.reason.contains("release 3 never came up on slot b"),
            "{}",
            last.reason
        );
        assert!(st.bad[0].release.as_str() == "3");
        let s = crate::status::read_status(&n.paths.status_file()).unwrap();
        let u = s.update.unwrap();
        assert_eq!((u.state.as_str(), u.release.as_str()), ("rolled-back", "3"));
        // And it is never offered again.
        let f2 = Fake {
            files: set("3", &n.key),
            ..Default::default()
        };
        let e = apply(&ctx(&n, &f2, running("2", Slot::A)), &src()).unwrap_err();
        assert!(
            e.to_string()
                .contains("release 3 failed on this node before"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_trial_marks_its_entry_bad_and_reboots() {
        let n = node();
        pending(&n, "2", "1");
        let dir = n.paths.host("/boot/efi/loader/entries");
        std::fs::write(
            dir.join("clutch_1.conf"),
            "options root=PARTLABEL=clutch_1\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("clutch_2+1-1.conf"),
            "options root=PARTLABEL=clutch_2\n",
        )
        .unwrap();
        let fake = Fake {
            uefi: true,
            phase_after_sleep: Some(Phase::Failed),
            status_path: n.paths.status_file(),
            ..Default::default()
        };
        let h = health(&ctx(&n, &fake, running("2", Slot::B))).unwrap();
        assert_eq!(h, Health::GaveUp("2".try_into().unwrap()));
        assert!(dir.join("clutch_2+0-2.conf").is_file());
        assert!(dir.join("clutch_1.conf").is_file());
        assert_eq!(*fake.reboots.borrow(), [false]);
        // The next boot (release 1 again) reports why.
        let st = UpdateState::load(&n.paths).unwrap();
        assert!(
            st.pending
                .unwrap()
                .failure
                .unwrap()
                .contains("phase=failed: users: useradd failed")
        );
        let f2 = Fake::default();
        health(&ctx(&n, &f2, running("1", Slot::A))).unwrap();
        let last = UpdateState::load(&n.paths).unwrap().last.unwrap();
        assert!(
            last.reason.contains("users: useradd failed"),
            "{}",
            last.reason
        );
    }

    #[test]
    fn legacy_bios_switches_syslinux_and_rolls_back_by_command() {
        let n = node();
        let dir = n.paths.host("/boot/efi/loader/entries");
        std::fs::write(
            dir.join("clutch_1.conf"),
            "options root=PARTLABEL=clutch_1 rw\n",
        )
        .unwrap();
        let fake = Fake {
            files: set("2", &n.key),
            uefi: false,
            ..Default::default()
        };
        // sysupdate (faked) would write the entry; do it here.
        std::fs::write(
            dir.join("clutch_2+2-0.conf"),
            "options root=PARTLABEL=clutch_2 rw\n",
        )
        .unwrap();
        // The member settings etcd was started with, in this slot's /etc.
        let env = n.paths.host("/etc/default/etcd");
        std::fs::create_dir_all(env.parent().unwrap()).unwrap();
        std::fs::write(&env, "ETCD_NAME=node-a\n").unwrap();
        apply(&ctx(&n, &fake, running("1", Slot::A)), &src()).unwrap();
        let cfg = std::fs::read_to_string(n.paths.host("/boot/efi/syslinux/syslinux.cfg")).unwrap();
        assert!(cfg.contains("DEFAULT clutch_2\n"), "{cfg}");
        // ... handed over to slot b before the reboot.
        let engine = n.paths.host("/var/lib/clutch/identity/engine");
        assert_eq!(
            std::fs::read_to_string(engine.join("for-slot")).unwrap(),
            "b\n"
        );
        assert_eq!(
            std::fs::read_to_string(engine.join("etc_default_etcd")).unwrap(),
            "ETCD_NAME=node-a\n"
        );
        assert!(cfg.contains("APPEND root=PARTLABEL=clutch_2 rw\n"), "{cfg}");
        // Back by command needs to know what the other slot holds: its GPT label in sysfs.
        let w = |rel: &str, body: &str| {
            let p = n.paths.host(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        w("/sys/class/block/vda2/uevent", "PARTNAME=clutch_1\n");
        let f2 = Fake::default();
        UpdateState::default().save(&n.paths).unwrap();
        let back = rollback(&ctx(&n, &f2, running("2", Slot::B))).unwrap();
        assert_eq!(back.as_str(), "1");
        assert_eq!(
            std::fs::read_to_string(engine.join("for-slot")).unwrap(),
            "a\n"
        );
        let cfg = std::fs::read_to_string(n.paths.host("/boot/efi/syslinux/syslinux.cfg")).unwrap();
        assert!(cfg.contains("DEFAULT clutch_1\n"), "{cfg}");
        assert_eq!(*f2.reboots.borrow(), [false]);
        let st = UpdateState::load(&n.paths).unwrap();
        assert_eq!(st.bad[0].release.as_str(), "2");
    }

    /// The rollout seam: told to wait, the node writes nothing and stays up.
    #[test]
    fn a_coordinator_that_says_wait_keeps_the_node_up() {
        struct Busy;
        impl Rollout for Busy {
            fn before_reboot(&self, _: &Release) -> Result<Gate, String> {
                Ok(Gate::Wait("node-b holds the voter ticket".into()))
            }
            fn after_commit(&self, _: &Release, _: Option<&serde_json::Value>) {}
            fn after_rollback(&self, _: &Release, _: &str, _: Option<&serde_json::Value>) {}
        }
        let n = node();
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let c = Ctx {
            paths: &n.paths,
            sys: &fake,
            rollout: &Busy,
            run: running("1", Slot::A),
        };
        let e = apply(&c, &src()).unwrap_err();
        assert!(e.to_string().contains("node-b holds the voter ticket"));
        assert!(fake.ran.borrow().is_empty() && fake.reboots.borrow().is_empty());
        assert_eq!(
            Live::load(&Live::path(&n.paths)).unwrap().update.state,
            "waiting"
        );
    }
}
