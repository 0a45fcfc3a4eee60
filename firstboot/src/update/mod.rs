//! Updating a node without reflashing it: `clutch-firstboot update [--now] [--rollback]`
//! and the per-boot health check that commits a new release or rolls it back.
//!
//! The engine is the board's (see the builder's `update` module): systemd-sysupdate writes
//! the inactive slot from files this module downloaded and checked against the signed
//! `SHA256SUMS` ([`verify`], [`fetch`]); systemd-boot counts boots of the new entry and
//! `systemd-bless-boot` commits it once [`flow::health`] let `boot-complete.target` through;
//! on a Raspberry Pi 4 the firmware's `tryboot` does the trial boot. This module decides
//! and records ([`state`]), switches what only clutch can switch (syslinux, `autoboot.txt`,
//! `os_prefix=`; [`boot`]), and keeps the node's identity across slots ([`slot`]).
//!
//! The seam for coordinated cluster rollouts is [`flow::Rollout`]: asked before the node
//! goes down (it may say wait), its ticket kept in the state across the reboot, told after
//! the commit or the rollback. [`coordinated`] implements it over the cluster's store.

pub mod boot;
pub mod cli;
pub mod coordinated;
pub mod fetch;
pub mod flow;
pub mod real;
pub mod slot;
pub mod state;
pub mod verify;

use crate::facts::Paths;

/// Writes the update part of the live status (`update.json`) and merges it into
/// `status.json` when that exists.
pub fn publish(paths: &Paths, live: &state::Live) {
    let p = state::Live::path(paths);
    if let Err(e) = live.save(&p) {
        tracing::warn!("cannot write {}: {e}", p.display());
        return;
    }
    let sp = paths.status_file();
    if let Ok(mut s) = crate::status::read_status(&sp) {
        merge(&mut s, live);
        let _ = crate::status::write_status(&sp, &s);
    }
}

/// Puts the release, slot and update state into a status.
pub fn merge(s: &mut crate::status::Status, live: &state::Live) {
    s.release = live.release.clone();
    s.slot = live.slot.clone();
    s.update = Some(live.update.clone());
}

/// At boot, before the node setup: the node's identity into this slot, the state folders'
/// owners for this release, and the live status of releases and updates. Returns the files
/// taken over (for the log).
pub fn on_boot(paths: &Paths, sys: &dyn crate::sys::Sys) -> Vec<String> {
    let carried = slot::carry_in(paths);
    // A unit file that appeared after systemd loaded its units (k3s's, handed over from
    // the slot before) is only known to it after a reload.
    if carried
        .iter()
        .any(|f| f.starts_with("/etc/systemd/system/"))
    {
        if let Err(e) = sys.run(&crate::sys::Cmd::new("systemctl", &["daemon-reload"])) {
            tracing::warn!("systemctl daemon-reload after taking over unit files: {e}");
        }
    }
    slot::fix_ownership(paths, sys);
    match slot::detect(paths) {
        Ok(Some(r)) => {
            let st = state::UpdateState::load(paths).unwrap_or_default();
            let update = match (&st.pending, &st.last) {
                (Some(p), _) if p.release == r.release => state::UpdateStatus {
                    state: "trying".into(),
                    release: p.release.to_string(),
                    ..Default::default()
                },
                (_, last) => state::UpdateStatus {
                    state: "idle".into(),
                    last: last.clone(),
                    ..Default::default()
                },
            };
            publish(
                paths,
                &state::Live {
                    release: r.release.to_string(),
                    slot: r.slot.as_str().into(),
                    update: state::UpdateStatus {
                        scheme: r.info.scheme.clone(),
                        ..update
                    },
                },
            );
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("update: {e}"),
    }
    carried
}
