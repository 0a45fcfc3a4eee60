//! `clutch lab up --wait PHASE`: block until every node has reached the phase, or stop as soon
//! as a node is `failed` or its VM is gone, or at the timeout; then say why.
//!
//! Every poll glances at each node's console (the `clutch: phase=` lines clutch-firstboot
//! prints on every change) and its QEMU process: cheap, and a failure shows there the moment
//! it happens. When every console says the phase was reached, the nodes' live status.json
//! confirms it (and gives the current member counts); a node whose access channel does not
//! answer within [`WaitOpts::live_grace`] is taken by its console line, and its row says so.

use std::time::{Duration, Instant};

use clutch_config::Phase;

use super::console::{self, PhaseLine};
use super::host::Host;
use super::ops;
use super::plan::LabState;
use super::status::{NodeStatus, Source};

/// The default `--timeout` for `--wait`. Measured: three nodes form in 320-640 s under TCG
/// with three guests on two cores (joins go one at a time, about a minute each); KVM is
/// about ten times faster. Twice that, and more per node.
pub fn default_timeout(accel: super::vm::Accel, nodes: usize) -> Duration {
    let n = nodes as u64;
    Duration::from_secs(match accel {
        super::vm::Accel::Tcg => 600 + 120 * n,
        super::vm::Accel::Kvm => 120 + 30 * n,
    })
}

/// How far along formation a phase is; `bootstrapping` and `joining` are the two ways on
/// from `discovering`. `None` for `failed`, which is never "reached".
fn rank(p: Phase) -> Option<u8> {
    match p {
        Phase::Configuring => Some(0),
        Phase::Discovering => Some(1),
        Phase::Bootstrapping | Phase::Joining => Some(2),
        Phase::Ready => Some(3),
        Phase::Failed => None,
    }
}

/// Whether a node at `now` has reached `target`.
pub fn reached(target: Phase, now: Option<Phase>) -> bool {
    match (now.and_then(rank), rank(target)) {
        (Some(n), Some(t)) => n >= t,
        _ => false,
    }
}

/// A cheap look at one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glance {
    pub running: bool,
    /// The latest phase line of the node's current boot.
    pub last: Option<PhaseLine>,
}

/// What the wait loop looks at.
pub trait Observer {
    fn nodes(&self) -> usize;
    fn name(&self, i: usize) -> String;
    fn glance(&self, i: usize) -> Glance;
    /// Every node's full row (status.json where it answers).
    fn statuses(&self) -> Vec<NodeStatus>;
    /// The last `lines` lines of node `i`'s console, and where the log is.
    fn console_tail(&self, i: usize, lines: usize) -> (String, String);
}

pub trait Clock {
    fn elapsed(&self) -> Duration;
    fn sleep(&self, d: Duration);
}

#[derive(Debug, Clone, Copy)]
pub struct WaitOpts {
    pub target: Phase,
    pub timeout: Duration,
    /// How often the consoles are looked at.
    pub poll: Duration,
    /// How often, at most, the nodes are asked for status.json while confirming.
    pub live_every: Duration,
    /// How long confirming waits for a node's access channel before its console line counts.
    pub live_grace: Duration,
    /// How long a failed node's access channel gets to answer, for its error in full.
    pub failed_grace: Duration,
    /// How long a node's VM may be off before the wait gives up on it (a power cycle, as
    /// `lab kill` + `lab start` do, takes a few seconds).
    pub stopped_grace: Duration,
}

impl WaitOpts {
    pub fn new(target: Phase, timeout: Duration) -> WaitOpts {
        WaitOpts {
            target,
            timeout,
            poll: Duration::from_secs(1),
            live_every: Duration::from_secs(5),
            live_grace: Duration::from_secs(90),
            stopped_grace: Duration::from_secs(20),
            failed_grace: Duration::from_secs(40),
        }
    }
}

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    Reached {
        rows: Vec<NodeStatus>,
        after: Duration,
    },
    Failed {
        node: usize,
        error: Option<String>,
        rows: Vec<NodeStatus>,
        after: Duration,
    },
    /// A node's VM is not running (QEMU exited or was killed).
    Stopped {
        node: usize,
        rows: Vec<NodeStatus>,
        after: Duration,
    },
    TimedOut {
        rows: Vec<NodeStatus>,
        after: Duration,
    },
}

impl WaitOutcome {
    pub fn ok(&self) -> bool {
        matches!(self, WaitOutcome::Reached { .. })
    }
    pub fn rows(&self) -> &[NodeStatus] {
        match self {
            WaitOutcome::Reached { rows, .. }
            | WaitOutcome::Failed { rows, .. }
            | WaitOutcome::Stopped { rows, .. }
            | WaitOutcome::TimedOut { rows, .. } => rows,
        }
    }
}

/// Waits; see the module doc.
pub fn wait(obs: &dyn Observer, clock: &dyn Clock, o: &WaitOpts) -> WaitOutcome {
    let n = obs.nodes();
    // When every console first showed the phase, and when status.json was last asked.
    let mut all_since: Option<Duration> = None;
    let mut asked_at: Option<Duration> = None;
    let mut off_since: Vec<Option<Duration>> = vec![None; n];
    loop {
        let g: Vec<Glance> = (0..n).map(|i| obs.glance(i)).collect();
        let t = clock.elapsed();
        for (x, since) in g.iter().zip(off_since.iter_mut()) {
            *since = if x.running {
                None
            } else {
                Some(since.unwrap_or(t))
            };
        }
        if let Some(i) = off_since
            .iter()
            .position(|s| s.is_some_and(|s| t.saturating_sub(s) >= o.stopped_grace))
        {
            return WaitOutcome::Stopped {
                node: i,
                rows: obs.statuses(),
                after: clock.elapsed(),
            };
        }
        let failed = |x: &Glance| x.last.as_ref().and_then(|l| l.phase) == Some(Phase::Failed);
        if let Some(i) = g.iter().position(failed) {
            return failed_node(obs, clock, o, i, &g[i]);
        }
        let now = clock.elapsed();
        if g.iter()
            .all(|x| reached(o.target, x.last.as_ref().and_then(|l| l.phase)))
        {
            let since = *all_since.get_or_insert(now);
            if asked_at.is_none_or(|a| now.saturating_sub(a) >= o.live_every) {
                asked_at = Some(now);
                let rows = obs.statuses();
                if let Some(i) = rows
                    .iter()
                    .position(|r| r.source == Source::StatusJson && r.phase == Some(Phase::Failed))
                {
                    return WaitOutcome::Failed {
                        node: i,
                        error: rows[i].error.clone(),
                        rows,
                        after: clock.elapsed(),
                    };
                }
                let live = rows
                    .iter()
                    .all(|r| r.source == Source::StatusJson && reached(o.target, r.phase));
                let by_console = rows.iter().all(|r| reached(o.target, r.phase))
                    && now.saturating_sub(since) >= o.live_grace;
                if live || by_console {
                    return WaitOutcome::Reached {
                        rows,
                        after: clock.elapsed(),
                    };
                }
            }
        } else {
            all_since = None;
        }
        if now >= o.timeout {
            return WaitOutcome::TimedOut {
                rows: obs.statuses(),
                after: now,
            };
        }
        clock.sleep(o.poll);
    }
}

/// The failure of node `i`, with its error: status.json says it in full (the console line at
/// most in short), so a node whose access channel is not up yet (sshd starts after the
/// failed phase) gets [`WaitOpts::failed_grace`] to answer.
fn failed_node(
    obs: &dyn Observer,
    clock: &dyn Clock,
    o: &WaitOpts,
    i: usize,
    g: &Glance,
) -> WaitOutcome {
    let since = clock.elapsed();
    loop {
        let rows = obs.statuses();
        let live = rows[i].source == Source::StatusJson;
        if live || clock.elapsed().saturating_sub(since) >= o.failed_grace {
            let error = rows[i]
                .error
                .clone()
                .or_else(|| g.last.as_ref().and_then(|l| l.error.clone()))
                .or_else(|| {
                    rows[i].unreachable.as_ref().map(|why| {
                        format!(
                            "(its console line gives none, and its status.json could not be read: {why})"
                        )
                    })
                });
            return WaitOutcome::Failed {
                node: i,
                error,
                rows,
                after: clock.elapsed(),
            };
        }
        clock.sleep(o.live_every);
    }
}

/// What to print when the wait did not succeed: each node's row, the failed node's error,
/// and the tail of the console of every node that is to blame.
pub fn report(obs: &dyn Observer, o: &WaitOpts, out: &WaitOutcome) -> String {
    let mut s = String::new();
    let (blame, head): (Vec<usize>, String) = match out {
        WaitOutcome::Reached { after, .. } => (
            vec![],
            format!(
                "all {} nodes reached phase={} after {:.0}s",
                out.rows().len(),
                o.target,
                after.as_secs_f64()
            ),
        ),
        WaitOutcome::Failed { node, after, .. } => (
            vec![*node],
            format!(
                "{} is failed ({:.0}s after power-on)",
                obs.name(*node),
                after.as_secs_f64()
            ),
        ),
        WaitOutcome::Stopped { node, after, .. } => (
            vec![*node],
            format!(
                "{}'s VM is not running any more ({:.0}s after power-on)",
                obs.name(*node),
                after.as_secs_f64()
            ),
        ),
        WaitOutcome::TimedOut { rows, after } => (
            rows.iter()
                .enumerate()
                .filter(|(_, r)| !reached(o.target, r.phase))
                .map(|(i, _)| i)
                .collect(),
            format!(
                "not every node reached phase={} within {:.0}s",
                o.target,
                after.as_secs_f64()
            ),
        ),
    };
    s += &format!("clutch lab: {head}\n");
    if out.ok() {
        return s;
    }
    for (i, r) in out.rows().iter().enumerate() {
        let last = obs
            .glance(i)
            .last
            .map(|l| l.line)
            .unwrap_or_else(|| "(no phase line yet)".into());
        s += &format!("{}\n    last console phase line: {last}\n", r.line());
    }
    if let WaitOutcome::Failed { node, error, .. } = out {
        s += &format!(
            "{}: error: {}\n",
            obs.name(*node),
            error.as_deref().unwrap_or("(none given)")
        );
    }
    for i in blame {
        let (tail, path) = obs.console_tail(i, 40);
        s += &format!(
            "----- last 40 lines of {}'s console ({path}) -----\n{tail}\n----- end of {}'s console -----\n",
            obs.name(i),
            obs.name(i)
        );
    }
    s
}

/// The lab itself, seen through a [`Host`].
pub struct LabObserver<'a> {
    pub host: &'a dyn Host,
    pub lab: &'a LabState,
}

impl Observer for LabObserver<'_> {
    fn nodes(&self) -> usize {
        self.lab.nodes.len()
    }
    fn name(&self, i: usize) -> String {
        self.lab.nodes[i].name.clone()
    }
    fn glance(&self, i: usize) -> Glance {
        let n = &self.lab.nodes[i];
        Glance {
            running: ops::running(self.host, n),
            last: ops::console_phase(n).1,
        }
    }
    fn statuses(&self) -> Vec<NodeStatus> {
        ops::statuses(self.host, self.lab)
    }
    fn console_tail(&self, i: usize, lines: usize) -> (String, String) {
        let n = &self.lab.nodes[i];
        (
            console::tail(&ops::console_text(n), lines),
            n.console.display().to_string(),
        )
    }
}

/// The host's clock, from when the VMs were powered on.
pub struct RealClock(pub Instant);

impl Clock for RealClock {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::console::phase_lines;
    use crate::lab::plan::plan;
    use crate::lab::status::{Live, NodeStatus};
    use crate::lab::vm::Accel;
    use std::cell::{Cell, RefCell};
    use std::path::Path;

    /// A scripted lab: each node's console phase line and status.json change at given times.
    struct Script {
        lab: LabState,
        /// Per node: (from time, console line, live status.json phase or unreachable).
        steps: Vec<Vec<(u64, &'static str, Option<&'static str>)>>,
        stopped_at: Option<(usize, u64)>,
        clock: Rc,
        asked: RefCell<Vec<u64>>,
    }
    type Rc = std::rc::Rc<Cell<u64>>;

    impl Script {
        fn at(&self, i: usize) -> &(u64, &'static str, Option<&'static str>) {
            let t = self.clock.get();
            self.steps[i].iter().rev().find(|s| s.0 <= t).unwrap()
        }
    }

    impl Observer for Script {
        fn nodes(&self) -> usize {
            self.steps.len()
        }
        fn name(&self, i: usize) -> String {
            format!("node{i}")
        }
        fn glance(&self, i: usize) -> Glance {
            Glance {
                running: self
                    .stopped_at
                    .is_none_or(|(n, t)| n != i || self.clock.get() < t),
                last: phase_lines(self.at(i).1).pop(),
            }
        }
        fn statuses(&self) -> Vec<NodeStatus> {
            self.asked.borrow_mut().push(self.clock.get());
            (0..self.nodes())
                .map(|i| {
                    let (_, line, live) = self.at(i);
                    let live = match live {
                        Some(p) => Ok(Live {
                            phase: Phase::parse(p),
                            members: vec!["a".into(), "b".into(), "c".into()],
                            error: (*p == "failed").then(|| "live: bad clutch.toml".into()),
                            ..Default::default()
                        }),
                        None => Err("ssh: refused".into()),
                    };
                    let g = self.glance(i);
                    NodeStatus::new(
                        &self.lab.nodes[i],
                        g.running,
                        1,
                        live,
                        phase_lines(line).last(),
                    )
                })
                .collect()
        }
        fn console_tail(&self, i: usize, _: usize) -> (String, String) {
            (
                format!("console of node{i}\n{}", self.at(i).1),
                format!("/x/node{i}.console.log"),
            )
        }
    }

    struct FakeClock(Rc);
    impl Clock for FakeClock {
        fn elapsed(&self) -> Duration {
            Duration::from_secs(self.0.get())
        }
        fn sleep(&self, d: Duration) {
            self.0.set(self.0.get() + d.as_secs().max(1));
        }
    }

    const BOOT: &str = "";
    const DISC: &str = "clutch: phase=discovering host=lab-a role=pending members=0";
    const JOIN: &str = "clutch: phase=joining host=lab-b role=server members=2";
    const READY1: &str = "clutch: phase=ready host=lab-a role=server members=1";
    const READY3: &str = "clutch: phase=ready host=lab-c role=server members=3";
    const FAILED: &str = "clutch: phase=failed host=lab-b role=none members=0 error=\"clutch.toml:9:1: unknown key `bogus`\"";

    fn script(steps: Vec<Vec<(u64, &'static str, Option<&'static str>)>>) -> (Script, FakeClock) {
        let clock: Rc = Default::default();
        let lab = plan(
            Path::new("/x"),
            Path::new("/i.img"),
            steps.len(),
            768,
            Accel::Tcg,
        )
        .unwrap();
        (
            Script {
                lab,
                steps,
                stopped_at: None,
                clock: clock.clone(),
                asked: RefCell::new(vec![]),
            },
            FakeClock(clock),
        )
    }

    fn opts(target: Phase) -> WaitOpts {
        WaitOpts::new(target, Duration::from_secs(900))
    }

    #[test]
    fn default_timeouts_fit_the_measured_formation() {
        use crate::lab::vm::Accel;
        assert_eq!(default_timeout(Accel::Tcg, 3), Duration::from_secs(960));
        assert_eq!(default_timeout(Accel::Kvm, 3), Duration::from_secs(210));
    }

    #[test]
    fn phases_are_reached_in_order() {
        assert!(reached(Phase::Ready, Some(Phase::Ready)));
        assert!(!reached(Phase::Ready, Some(Phase::Joining)));
        assert!(reached(Phase::Discovering, Some(Phase::Joining)));
        assert!(reached(Phase::Joining, Some(Phase::Bootstrapping)));
        assert!(!reached(Phase::Configuring, Some(Phase::Failed)));
        assert!(!reached(Phase::Configuring, None));
    }

    #[test]
    fn ready_when_every_node_is_ready_by_its_live_status() {
        let (s, c) = script(vec![
            vec![
                (0, BOOT, None),
                (100, DISC, None),
                (200, READY1, Some("ready")),
            ],
            vec![
                (0, BOOT, None),
                (150, JOIN, Some("joining")),
                (300, READY3, Some("ready")),
            ],
            vec![
                (0, BOOT, None),
                (150, DISC, None),
                (400, READY3, None),
                (420, READY3, Some("ready")),
            ],
        ]);
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Reached { rows, after } = &out else {
            panic!("{out:?}")
        };
        // node2's sshd answered at 420s: until then its console line did not count.
        assert!(after.as_secs() >= 420 && after.as_secs() < 430, "{after:?}");
        assert!(rows.iter().all(|r| r.source == Source::StatusJson));
        // Live members: 3 everywhere, though node0's console line still says 1.
        assert!(rows.iter().all(|r| r.members == Some(3)));
        // status.json was asked only once every console said ready, at most every 5s.
        let asked = s.asked.borrow();
        assert!(asked.iter().all(|&t| t >= 400), "{asked:?}");
        assert!(asked.windows(2).all(|w| w[1] - w[0] >= 5), "{asked:?}");
    }

    #[test]
    fn a_node_that_never_answers_counts_by_its_console_after_the_grace() {
        let (s, c) = script(vec![
            vec![(0, BOOT, None), (100, READY3, Some("ready"))],
            vec![(0, BOOT, None), (120, READY3, None)],
        ]);
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Reached { rows, after } = &out else {
            panic!("{out:?}")
        };
        assert!(
            after.as_secs() >= 210 && after.as_secs() <= 216,
            "{after:?}"
        );
        assert_eq!(rows[1].source, Source::Console);
    }

    #[test]
    fn a_failed_node_ends_the_wait_at_once_with_its_error() {
        let (s, c) = script(vec![
            vec![(0, BOOT, None), (100, DISC, None)],
            vec![(0, BOOT, None), (130, FAILED, Some("failed"))],
        ]);
        let o = opts(Phase::Ready);
        let out = wait(&s, &c, &o);
        let WaitOutcome::Failed {
            node, error, after, ..
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(*node, 1);
        assert!(
            after.as_secs() >= 130 && after.as_secs() <= 132,
            "{after:?}"
        );
        // status.json's error is the one shown (the console's is its short form).
        assert_eq!(error.as_deref(), Some("live: bad clutch.toml"));
        let r = report(&s, &o, &out);
        assert!(
            r.starts_with("clutch lab: node1 is failed (130s after power-on)"),
            "{r}"
        );
        assert!(r.contains("node1: error: live: bad clutch.toml"), "{r}");
        assert!(
            r.contains(&format!("last console phase line: {DISC}")),
            "{r}"
        );
        assert!(
            r.contains("----- last 40 lines of node1's console (/x/node1.console.log) -----"),
            "{r}"
        );
        assert!(
            !r.contains("node0's console"),
            "only the failed node's console: {r}"
        );
    }

    #[test]
    fn failed_by_the_console_alone_when_the_node_does_not_answer() {
        let (s, c) = script(vec![vec![(0, BOOT, None), (50, FAILED, None)]]);
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Failed { error, after, .. } = &out else {
            panic!("{out:?}")
        };
        assert_eq!(
            error.as_deref(),
            Some("clutch.toml:9:1: unknown key `bogus`")
        );
        assert_eq!(after.as_secs(), 90, "gave its sshd the 40s grace");
        // No error on the console line either: say why there is none.
        const BARE: &str = "clutch: phase=failed host=lab-b role=none members=0";
        let (s, c) = script(vec![vec![(0, BOOT, None), (50, BARE, None)]]);
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Failed { error, .. } = &out else {
            panic!("{out:?}")
        };
        assert_eq!(
            error.as_deref(),
            Some(
                "(its console line gives none, and its status.json could not be read: ssh: refused)"
            )
        );
    }

    #[test]
    fn a_failed_nodes_error_comes_from_status_json_once_it_answers() {
        const BARE: &str = "clutch: phase=failed host=lab-b role=none members=0";
        let (s, c) = script(vec![vec![
            (0, BOOT, None),
            (61, BARE, None),
            (80, BARE, Some("failed")),
        ]]);
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Failed { error, after, .. } = &out else {
            panic!("{out:?}")
        };
        assert_eq!(error.as_deref(), Some("live: bad clutch.toml"));
        assert!(after.as_secs() >= 80 && after.as_secs() <= 86, "{after:?}");
    }

    #[test]
    fn a_vm_that_stays_off_ends_the_wait() {
        let (mut s, c) = script(vec![vec![(0, DISC, None)], vec![(0, DISC, None)]]);
        s.stopped_at = Some((1, 77));
        let out = wait(&s, &c, &opts(Phase::Ready));
        let WaitOutcome::Stopped { node: 1, after, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(after.as_secs(), 97, "off for the 20s grace");
    }

    #[test]
    fn a_power_cycle_within_the_grace_is_waited_through() {
        // node1 is off from 100s to 110s (killed, powered on again), then joins.
        struct Cycle(Script);
        impl Observer for Cycle {
            fn nodes(&self) -> usize {
                self.0.nodes()
            }
            fn name(&self, i: usize) -> String {
                self.0.name(i)
            }
            fn glance(&self, i: usize) -> Glance {
                let mut g = self.0.glance(i);
                let t = self.0.clock.get();
                g.running = !(i == 1 && (100..110).contains(&t));
                g
            }
            fn statuses(&self) -> Vec<NodeStatus> {
                self.0.statuses()
            }
            fn console_tail(&self, i: usize, n: usize) -> (String, String) {
                self.0.console_tail(i, n)
            }
        }
        let (s, c) = script(vec![
            vec![(0, READY3, Some("ready"))],
            vec![
                (0, JOIN, Some("joining")),
                (110, BOOT, None),
                (200, READY3, Some("ready")),
            ],
        ]);
        let out = wait(&Cycle(s), &c, &opts(Phase::Ready));
        let WaitOutcome::Reached { after, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(after.as_secs(), 200);
    }

    #[test]
    fn timeout_names_the_nodes_that_did_not_get_there() {
        let (s, c) = script(vec![
            vec![(0, READY3, Some("ready"))],
            vec![(0, JOIN, Some("joining"))],
        ]);
        let o = WaitOpts::new(Phase::Ready, Duration::from_secs(60));
        let out = wait(&s, &c, &o);
        let WaitOutcome::TimedOut { after, .. } = &out else {
            panic!("{out:?}")
        };
        assert_eq!(after.as_secs(), 60);
        let r = report(&s, &o, &out);
        assert!(
            r.contains("not every node reached phase=ready within 60s"),
            "{r}"
        );
        assert!(
            r.contains("node1's console") && !r.contains("node0's console"),
            "{r}"
        );
        // A lower target is reached by the same nodes at once.
        let (s, c) = script(vec![
            vec![(0, READY3, Some("ready"))],
            vec![(0, JOIN, Some("joining"))],
        ]);
        assert!(wait(&s, &c, &opts(Phase::Discovering)).ok());
    }
}
