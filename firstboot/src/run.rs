//! One boot: load, gather facts, plan, apply, report. Never fails: problems end in
//! `phase=failed` with the error, after the safe steps ran.

use crate::apply::{Outcome, apply};
use crate::cluster::{ClusterContext, form_cluster};
use crate::facts::{Paths, gather_for};
use crate::load::{load, read_sources};
use crate::plan::{Fresh, Plan, plan, plan_safe};
use crate::status::{Phase, StatusSink, StatusUpdate};
use crate::sys::Sys;

/// What happened, for the caller (and tests).
#[derive(Debug)]
pub struct Report {
    pub phase: Phase,
    pub plan: Plan,
    pub outcome: Outcome,
    pub error: Option<String>,
}

fn hex_random(sys: &dyn Sys) -> String {
    let mut b = [0u8; 16];
    sys.random(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs the node setup; with `[cluster]` it then calls into cluster formation when
/// `form` is set (the binary sets it; tests usually don't). `fetch_error`: why a netbooted
/// node's config could not be downloaded; when no usable clutch.toml is there either, it
/// leads the error in the status, since it is the cause.
pub fn run(
    paths: &Paths,
    sys: &dyn Sys,
    sink: &dyn StatusSink,
    form: bool,
    fetch_error: Option<&str>,
) -> Report {
    // A/B images: the node's identity into this slot, the release and slot into the status.
    for f in crate::update::on_boot(paths, sys) {
        tracing::info!("kept for this slot: {f}");
    }
    let fresh = Fresh {
        node_id: hex_random(sys),
        machine_id: hex_random(sys),
    };
    let mut sources = read_sources(paths);
    sys.random(&mut sources.salt);
    let loaded = load(paths, &sources);
    let template = crate::load::template_hint(&sources);
    let mut facts = gather_for(paths, loaded.as_ref().ok().map(|l| &l.config));
    facts.hold = crate::hold::requested(sys);
    let (the_plan, mut error) = match &loaded {
        Ok(l) => match plan(paths, &facts, l, &fresh) {
            Ok(p) => (p, None),
            Err(e) => (
                plan_safe(paths, &facts, &fresh, Some(&l.config.system.hostname)),
                Some(e.to_string()),
            ),
        },
        Err(e) => (
            plan_safe(paths, &facts, &fresh, template.as_ref()),
            Some(match fetch_error {
                Some(f) => format!("{f}; {e}"),
                None => e.to_string(),
            }),
        ),
    };
    if let Some(e) = &error {
        tracing::error!("{e}");
    }
    for n in &the_plan.notes {
        tracing::info!("{n}");
    }
    for w in &the_plan.warnings {
        tracing::warn!("{w}");
    }
    if let Ok(l) = &loaded {
        for f in &l.applied {
            tracing::info!("applied {f} and removed it from the boot partition");
        }
    }
    let role = if the_plan.cluster.is_some() {
        "pending"
    } else {
        "none"
    };
    sink.set(StatusUpdate {
        hostname: Some(the_plan.hostname.to_string()),
        node_id: Some(the_plan.node_id.clone()),
        warnings: Some(the_plan.warnings.clone()),
        ..StatusUpdate::phase(Phase::Configuring).role(role)
    });

    let outcome = apply(&the_plan, paths, sys);
    crate::update::slot::carry_out(paths);
    if error.is_none() && !outcome.errors.is_empty() {
        error = Some(outcome.errors.join("; "));
    }
    let phase = match (&error, &the_plan.cluster) {
        (Some(_), _) => Phase::Failed,
        (None, Some(_)) => Phase::Discovering,
        (None, None) => Phase::Ready,
    };
    sink.set(StatusUpdate {
        storage: Some(outcome.storage.clone()),
        ..StatusUpdate::phase(phase).error(error.clone())
    });
    let status = format!("READY=1\nSTATUS=clutch: {phase}");
    if let Err(e) = sys.notify(&status) {
        tracing::warn!("sd_notify: {e}");
    }

    if form && phase == Phase::Discovering {
        if let Some((cluster, token)) = &the_plan.cluster {
            let ctx = ClusterContext {
                cluster: cluster.clone(),
                token: token.clone(),
                node_id: the_plan.node_id.clone(),
                hostname: the_plan.hostname.clone(),
                state_dir: paths.state(""),
                root: paths.root.clone(),
                admin_user: the_plan.user.clone(),
            };
            if let Err(e) = form_cluster(&ctx, sink) {
                tracing::error!("cluster: {e}");
                sink.set(StatusUpdate::phase(Phase::Failed).error(Some(format!("cluster: {e}"))));
            }
        }
    }
    Report {
        phase,
        plan: the_plan,
        outcome,
        error,
    }
}
