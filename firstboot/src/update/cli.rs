//! `clutch-firstboot update [--now] [--rollback]` and the boot-time `update --health`.

use clutch_config::NodeConfig;

use super::coordinated::{self, Timing};
use super::flow::{self, Ctx, Health, Stop};
use super::real::RealUpdateSys;
use super::state::{Live, UpdateStatus};
use crate::facts::Paths;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Say whether a newer signed release is offered.
    Check,
    /// Apply it: download, write the inactive slot, reboot into it.
    Now,
    Rollback,
    /// At boot (clutch-update-health.service): commit or roll back a release on trial.
    Health,
}

/// Runs one update command; the process exit code (0: done or nothing to do).
pub fn main(paths: &Paths, mode: Mode) -> i32 {
    let run = match super::slot::detect(paths) {
        Ok(Some(r)) => r,
        Ok(None) if mode == Mode::Health => return 0,
        Ok(None) => {
            eprintln!(
                "clutch-firstboot: this image has no root slots (its config had no [update])"
            );
            return 2;
        }
        Err(e) => {
            eprintln!("clutch-firstboot: update: {e}");
            return 1;
        }
    };
    let config = node_config(paths);
    let cluster = config.as_ref().ok().and_then(|c| c.cluster.as_ref());
    // Told while waiting for the rollout's ticket: the status and this command's output.
    let (release, slot, scheme) = (
        run.release.to_string(),
        run.slot.as_str().to_string(),
        run.info.scheme.clone(),
    );
    let on_wait = Box::new(move |r: &clutch_config::Release, why: &str| {
        println!("clutch: update: release {r} waits for its turn: {why}");
        super::publish(
            paths,
            &Live {
                release: release.clone(),
                slot: slot.clone(),
                update: UpdateStatus {
                    state: "waiting".into(),
                    release: r.to_string(),
                    reason: why.to_string(),
                    scheme: scheme.clone(),
                    ..Default::default()
                },
            },
        );
    });
    let rollout = coordinated::choose(paths, cluster).build(Timing::default(), on_wait);
    let ctx = Ctx {
        paths,
        sys: &RealUpdateSys,
        rollout: rollout.as_ref(),
        run,
    };
    let r = match mode {
        Mode::Health => flow::health(&ctx).map(|h| match h {
            Health::Nothing => "no release on trial".to_string(),
            Health::Committed(r) => format!("release {r} committed"),
            Health::FellBack(r) => format!("release {r} was rolled back by the boot loader"),
            Health::GaveUp(r) => format!("release {r} given up; rebooting into the previous one"),
        }),
        Mode::Rollback => flow::rollback(&ctx).map(|r| format!("rebooting into release {r}")),
        Mode::Check | Mode::Now => source(&config).and_then(|src| {
            if mode == Mode::Check {
                let o = flow::check(&ctx, &src)?;
                // Say so when the cluster stopped this release; only asking may fail.
                if o.newer {
                    ctx.show(UpdateStatus {
                        state: "checking".into(),
                        release: o.info.release.to_string(),
                        source: src.to_string(),
                        ..Default::default()
                    });
                    match ctx.rollout.bad(&o.info.release) {
                        Ok(Some(why)) => return Err(Stop::Refused(why)),
                        Ok(None) => {}
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
                let (state, what) = if o.newer {
                    (
                        "available",
                        format!("release {} is available", o.info.release),
                    )
                } else {
                    (
                        "up-to-date",
                        format!("release {} is running", ctx.run.release),
                    )
                };
                ctx.show(UpdateStatus {
                    state: state.into(),
                    release: o.info.release.to_string(),
                    source: src.to_string(),
                    ..Default::default()
                });
                Ok(what)
            } else {
                flow::apply(&ctx, &src).map(|r| match r {
                    Some(r) => format!("rebooting into release {r}"),
                    None => format!("release {} is the newest; nothing to do", ctx.run.release),
                })
            }
        }),
    };
    match r {
        Ok(msg) => {
            println!("clutch: update: {msg}");
            0
        }
        Err(e) => {
            let (state, code) = match &e {
                Stop::Refused(_) => ("refused", 3),
                // EX_TEMPFAIL: not this node's turn; the next check tries again.
                Stop::Later(_) => ("waiting", 75),
                Stop::Failed(_) => ("failed", 1),
            };
            // A health check that gave up already said so; the rest say it here.
            if mode != Mode::Health {
                // The release this command was about, as the last status of this run said.
                let release = Live::load(&Live::path(paths))
                    .map(|l| l.update.release)
                    .unwrap_or_default();
                ctx.show(UpdateStatus {
                    state: state.into(),
                    release,
                    reason: e.to_string(),
                    ..Default::default()
                });
            }
            eprintln!("clutch-firstboot: update: {e}");
            code
        }
    }
}

fn node_config(paths: &Paths) -> Result<NodeConfig, Stop> {
    crate::load::load(paths, &crate::load::read_sources(paths))
        .map(|l| l.config)
        .map_err(|e| Stop::Failed(format!("the node config is not usable: {e}")))
}

fn source(config: &Result<NodeConfig, Stop>) -> Result<clutch_config::UpdateSource, Stop> {
    config
        .as_ref()
        .map_err(Clone::clone)?
        .update
        .as_ref()
        .map(|u| u.source.clone())
        .ok_or_else(|| Stop::Failed("clutch.toml has no [update] source".into()))
}
