//! Updates in a cluster: the [`Rollout`] the update flow asks before a node goes down,
//! over the cluster's own store ([`clutch_cluster::rollout::Coordinator`]: etcd's leases,
//! a Kubernetes Lease on k3s).
//!
//! - Before downloading: a release some node found bad is refused, naming that node and
//!   its reason.
//! - Before rebooting: queue for the ticket and wait for it, at most [`Timing::wait`]
//!   (each reason to wait goes to the update status); a voter goes only when the others
//!   keep quorum without it. The ticket is handed to the flow as JSON and kept in the
//!   update state across the reboot.
//! - On the new slot: the ticket is renewed while the node rejoins, and given back once it
//!   is `ready` (committed). A release that was rolled back is first marked bad in the
//!   store, so nobody else tries it, then the ticket is given back.
//!
//! Which coordinator a node uses is decided as data ([`choose`] → [`Choice`]) from the
//! node config and what formation recorded (`cluster.json`), then built ([`Choice::build`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clutch_cluster::Role;
use clutch_cluster::engine::etcd::{TLS_DIR, env::LOCAL_ENDPOINT, env::client_url};
use clutch_cluster::rollout::etcd::{EtcdCoordinator, TlsClient};
use clutch_cluster::rollout::k3s::K3sCoordinator;
use clutch_cluster::rollout::{
    Acquired, BadRelease, Coordinator, Me, RolloutError, Ticket, acquire,
};
use clutch_cluster::state::Store;
use clutch_config::schema::Engine;
use clutch_config::{Cluster, Release};
use clutch_os::cmd::TimeLimitedRunner;
use serde_json::Value;

use super::flow::{Gate, Rollout, Standalone};
use crate::facts::{Paths, STATE_DIR};

/// How long a ticket outlives a holder that stopped renewing it: it must cover the
/// reboot into the new slot until the health check renews it again. A node that dies
/// holding it blocks the others this long at most.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// Agents that may update at once. SPEC.md has no `[update]` key for it yet.
pub const AGENT_BUDGET: usize = 1;
/// At most this long for giving a ticket back: the commit runs inside
/// clutch-update-health.service (15 minutes, 10 of which the wait for `ready` may take).
pub const GIVE_BACK_FOR: Duration = Duration::from_secs(60);
/// Where the k3s coordinator writes its Lease manifests (node path, root only).
pub const K3S_SCRATCH: &str = "/var/lib/clutch/update/rollout";

/// The waits of a coordinated update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long `update --now` waits for its turn before it gives up until the next check.
    pub wait: Duration,
    /// How often it asks meanwhile.
    pub poll: Duration,
    /// How long a rollback keeps trying to mark the release bad (a node that just booted
    /// may not have its etcd member back yet); giving a ticket back tries at most
    /// [`GIVE_BACK_FOR`] of it.
    pub settle: Duration,
    pub retry: Duration,
    /// How often a held ticket is renewed while the slot is written (that can outlast
    /// [`TICKET_TTL`] on a slow card).
    pub renew: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            wait: Duration::from_secs(30 * 60),
            poll: Duration::from_secs(5),
            settle: Duration::from_secs(5 * 60),
            retry: Duration::from_secs(5),
            renew: Duration::from_secs(30),
        }
    }
}

/// Hears each new reason to wait (for the update status and the command's output).
pub type OnWait<'a> = Box<dyn Fn(&Release, &str) + 'a>;

/// A [`Rollout`] over a cluster [`Coordinator`].
pub struct Coordinated<'a> {
    pub coordinator: Arc<dyn Coordinator>,
    pub me: Me,
    pub role: Role,
    pub timing: Timing,
    pub on_wait: OnWait<'a>,
    /// Stops the renewing of a ticket taken by this process.
    renewing: Mutex<Option<Arc<AtomicBool>>>,
}

/// What the status says about a bad release.
pub fn bad_text(release: &Release, b: &BadRelease) -> String {
    format!(
        "release {release} was found bad by {} ({}): {}",
        b.hostname, b.node, b.why
    )
}

/// The ticket the flow kept, if it is one of ours.
fn ticket(v: Option<&Value>) -> Option<Ticket> {
    let v = v?;
    match serde_json::from_value(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("rollout: ignoring a kept ticket that is not one: {e} ({v})");
            None
        }
    }
}

impl<'a> Coordinated<'a> {
    pub fn new(
        coordinator: Arc<dyn Coordinator>,
        me: Me,
        role: Role,
        timing: Timing,
        on_wait: OnWait<'a>,
    ) -> Self {
        Coordinated {
            coordinator,
            me,
            role,
            timing,
            on_wait,
            renewing: Mutex::new(None),
        }
    }

    /// Renews `t` every [`Timing::renew`] until given back or this process ends (the
    /// reboot); from the next boot on, the health check renews it.
    fn renew(&self, t: &Ticket) {
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(old) = self.renewing.lock().unwrap().replace(stop.clone()) {
            old.store(true, Ordering::SeqCst);
        }
        let (c, t, every) = (self.coordinator.clone(), t.clone(), self.timing.renew);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(every);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match c.keep(&t) {
                    Ok(()) => {}
                    Err(e @ RolloutError::Lost { .. }) => {
                        tracing::error!("{} rollout: {e}", c.name());
                        return;
                    }
                    Err(e) => tracing::warn!("{} rollout: renewing the ticket: {e}", c.name()),
                }
            }
        });
    }

    fn stop_renewing(&self) {
        if let Some(s) = self.renewing.lock().unwrap().take() {
            s.store(true, Ordering::SeqCst);
        }
    }

    fn what(&self, e: &RolloutError) -> String {
        format!("{} rollout: {e}", self.coordinator.name())
    }

    /// Runs `f` until it works or `limit` is over; a lost ticket is final.
    fn settle<T>(
        &self,
        doing: &str,
        limit: Duration,
        mut f: impl FnMut() -> Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let start = Instant::now();
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e @ RolloutError::Lost { .. }) => return Err(e),
                Err(e) if start.elapsed() >= limit => return Err(e),
                Err(e) => {
                    tracing::info!("rollout: {doing}: {e}; trying again");
                    std::thread::sleep(self.timing.retry);
                }
            }
        }
    }

    fn give(&self, t: &Ticket) {
        self.stop_renewing();
        match self.settle(
            "giving the ticket back",
            self.timing.settle.min(GIVE_BACK_FOR),
            || self.coordinator.release(t),
        ) {
            Ok(()) => tracing::info!("rollout: ticket for release {} given back", t.release),
            Err(e) => tracing::warn!(
                "{}; the ticket lapses by itself within {} s",
                self.what(&e),
                TICKET_TTL.as_secs()
            ),
        }
    }
}

impl Rollout for Coordinated<'_> {
    fn bad(&self, release: &Release) -> Result<Option<String>, String> {
        self.coordinator
            .bad(release)
            .map(|b| b.map(|b| bad_text(release, &b)))
            .map_err(|e| self.what(&e))
    }

    fn before_reboot(&self, release: &Release) -> Result<Gate, String> {
        let mut last = String::new();
        let got = acquire(
            &*self.coordinator,
            &self.me,
            self.role,
            release,
            self.timing.wait,
            self.timing.poll,
            &mut |why| {
                if why != last {
                    last = why.to_string();
                    (self.on_wait)(release, why);
                }
            },
        )
        .map_err(|e| self.what(&e))?;
        Ok(match got {
            Acquired::Go(t) => {
                self.renew(&t);
                Gate::Go(Some(
                    serde_json::to_value(&t).map_err(|e| format!("ticket: {e}"))?,
                ))
            }
            Acquired::Bad(b) => Gate::Refuse(bad_text(release, &b)),
            Acquired::NotNow(why) => Gate::Wait(format!(
                "{why} (gave up after {} s; the next check tries again)",
                self.timing.wait.as_secs()
            )),
        })
    }

    fn keep(&self, _: &Release, t: Option<&Value>) {
        let Some(t) = ticket(t) else { return };
        match self.coordinator.keep(&t) {
            Ok(()) => {}
            Err(e @ RolloutError::Lost { .. }) => tracing::warn!("{}", self.what(&e)),
            // The store may not be back yet on a node that just booted.
            Err(e) => tracing::debug!("{}", self.what(&e)),
        }
    }

    fn give_back(&self, _: &Release, _: &str, t: Option<&Value>) {
        if let Some(t) = ticket(t) {
            self.give(&t);
        }
    }

    fn after_commit(&self, _: &Release, t: Option<&Value>) {
        if let Some(t) = ticket(t) {
            self.give(&t);
        }
    }

    fn after_rollback(&self, release: &Release, reason: &str, t: Option<&Value>) {
        let t = ticket(t);
        let marked = self.settle("marking the release bad", self.timing.settle, || {
            if let Some(t) = &t {
                let _ = self.coordinator.keep(t);
            }
            self.coordinator.mark_bad(&self.me, release, reason)
        });
        match (marked, t) {
            (Ok(()), Some(t)) => {
                tracing::info!("rollout: release {release} marked bad for the cluster");
                self.give(&t);
            }
            (Ok(()), None) => {
                tracing::info!("rollout: release {release} marked bad for the cluster")
            }
            // Keep the ticket: while it lasts, nobody else starts on this release.
            (Err(e), _) => tracing::error!(
                "{}: release {release} is not marked bad; the ticket lapses within {} s",
                self.what(&e),
                TICKET_TTL.as_secs()
            ),
        }
    }
}

/// How a node coordinates its updates, decided from its config and `cluster.json`.
#[derive(Clone, Debug)]
pub enum Choice {
    /// No coordination; why.
    Alone(String),
    Etcd {
        me: Me,
        role: Role,
        /// The local member on a server; the servers' TLS endpoints on an agent.
        endpoints: Vec<String>,
        tls: TlsClient,
    },
    K3s {
        me: Me,
        role: Role,
        scratch: PathBuf,
    },
}

/// Decides how this node coordinates: no `[cluster]` or engine `none` → alone; not a
/// member yet (no `cluster.json`, so it holds no vote) → alone; etcd → its cluster's etcd;
/// k3s → a Lease through the server's `k3s kubectl`.
pub fn choose(paths: &Paths, cluster: Option<&Cluster>) -> Choice {
    let Some(c) = cluster else {
        return Choice::Alone("no [cluster]".into());
    };
    if c.engine == Engine::None {
        return Choice::Alone("engine none".into());
    }
    let state = paths.host(STATE_DIR);
    let Some(m) = Store::new(&state).membership() else {
        return Choice::Alone(format!(
            "not a cluster member yet (no {}/{})",
            state.display(),
            Store::MEMBERSHIP
        ));
    };
    let Some(mine) = m.members.get(&m.node_id) else {
        return Choice::Alone(format!("{} does not list this node", Store::MEMBERSHIP));
    };
    let me = Me {
        node_id: m.node_id.clone(),
        hostname: mine.hostname.clone(),
        addr: mine.addr,
    };
    match (c.engine, m.role) {
        (_, Role::None) => Choice::Alone("no role in the cluster".into()),
        (Engine::Etcd, role) => {
            let endpoints = if role == Role::Server {
                vec![LOCAL_ENDPOINT.to_string()]
            } else {
                m.members
                    .members
                    .iter()
                    .filter(|x| x.role == Role::Server)
                    .map(|x| client_url(x.addr))
                    .collect()
            };
            let tls = paths.host(TLS_DIR);
            Choice::Etcd {
                me,
                role,
                endpoints,
                tls: TlsClient {
                    ca: tls.join("ca.crt"),
                    cert: tls.join("node.crt"),
                    key: tls.join("node.key"),
                },
            }
        }
        // A k3s agent has no credentials for the API (only its kubelet's, which may not
        // touch kube-system Leases); it holds no vote either.
        (Engine::K3s, Role::Agent) => Choice::Alone(
            "a k3s agent has no API credentials to take a Lease with; agents update without coordination".into(),
        ),
        (Engine::K3s, role) => Choice::K3s {
            me,
            role,
            scratch: paths.host(K3S_SCRATCH),
        },
        (Engine::None, _) => Choice::Alone("engine none".into()),
    }
}

/// The longest one etcdctl or kubectl call may take (each has its own shorter dial and
/// command timeouts; `endpoint health --cluster` dials every member).
const STORE_CALL_LIMIT: Duration = Duration::from_secs(30);

impl Choice {
    /// The rollout this choice means.
    pub fn build<'a>(self, timing: Timing, on_wait: OnWait<'a>) -> Box<dyn Rollout + 'a> {
        // Every store call bounded: a lease keep-alive to a member that is down (a release
        // whose etcd does not start) never returns by itself, and the health check that
        // must roll that release back would wait on it forever.
        let runner = Arc::new(TimeLimitedRunner {
            limit: STORE_CALL_LIMIT,
        });
        let (coordinator, me, role): (Arc<dyn Coordinator>, Me, Role) = match self {
            Choice::Alone(why) => {
                tracing::info!("rollout: updating without coordination: {why}");
                return Box::new(Standalone);
            }
            Choice::Etcd {
                me,
                role,
                endpoints,
                tls,
            } => (
                Arc::new(EtcdCoordinator {
                    runner,
                    etcdctl: "etcdctl".into(),
                    endpoints,
                    tls: Some(tls),
                    ttl: TICKET_TTL,
                    agent_budget: AGENT_BUDGET,
                }),
                me,
                role,
            ),
            Choice::K3s { me, role, scratch } => {
                if let Err(e) = crate::fsx::create_dir_all_durable(&scratch) {
                    tracing::warn!("{}: {e}", scratch.display());
                }
                (
                    Arc::new(K3sCoordinator {
                        runner,
                        scratch,
                        ttl: TICKET_TTL,
                        agent_budget: AGENT_BUDGET,
                        now: Arc::new(SystemTime::now),
                    }),
                    me,
                    role,
                )
            }
        };
        Box::new(Coordinated::new(coordinator, me, role, timing, on_wait))
    }
}

#[cfg(test)]
mod tests {

    use clutch_cluster::rollout::Turn;
    use clutch_cluster::state::Membership;
    use clutch_cluster::wire::MemberList;
    use clutch_cluster::{ClusterKey, InstanceId, MemberInfo, NodeId};

    use super::*;
    use crate::update::boot::Slot;
    use crate::update::flow::tests::{Fake, node, running, set, src};
    use crate::update::flow::{self, Ctx, Health, INCOMING, Stop};
    use crate::update::slot::Running;
    use crate::update::state::{Live, Pending, UpdateState};
    use clutch_config::Phase;

    /// What the update asked of the store.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Bad(String),
        Enqueue(Role, String),
        Turn(String),
        Keep(String),
        Release(String),
        MarkBad(String, String),
    }

    /// A store answering from a script: `turns` in order (then go), a bad release when
    /// `bad` is set.
    #[derive(Default)]
    struct FakeStore {
        turns: Mutex<Vec<Turn>>,
        always_wait: Option<String>,
        bad: Option<BadRelease>,
        calls: Arc<Mutex<Vec<Call>>>,
    }

    impl FakeStore {
        fn log(&self, c: Call) {
            self.calls.lock().unwrap().push(c);
        }
    }

    impl Coordinator for FakeStore {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn bad(&self, r: &Release) -> Result<Option<BadRelease>, RolloutError> {
            self.log(Call::Bad(r.to_string()));
            Ok(self.bad.clone())
        }
        fn enqueue(&self, me: &Me, role: Role, r: &Release) -> Result<Ticket, RolloutError> {
            self.log(Call::Enqueue(role, r.to_string()));
            Ok(Ticket {
                release: r.clone(),
                role,
                node: me.node_id.clone(),
                lease: "694d80e5ea1c0b05".into(),
                key: "/clutch/rollout/servers/694d80e5ea1c0b05".into(),
            })
        }
        fn turn(&self, _: &Me, t: &Ticket) -> Result<Turn, RolloutError> {
            self.log(Call::Turn(t.lease.clone()));
            if let Some(w) = &self.always_wait {
                return Ok(Turn::Wait(w.clone()));
            }
            let mut turns = self.turns.lock().unwrap();
            Ok(if turns.is_empty() {
                Turn::Go
            } else {
                turns.remove(0)
            })
        }
        fn keep(&self, t: &Ticket) -> Result<(), RolloutError> {
            self.log(Call::Keep(t.lease.clone()));
            Ok(())
        }
        fn release(&self, t: &Ticket) -> Result<(), RolloutError> {
            self.log(Call::Release(t.lease.clone()));
            Ok(())
        }
        fn mark_bad(&self, _: &Me, r: &Release, why: &str) -> Result<(), RolloutError> {
            self.log(Call::MarkBad(r.to_string(), why.to_string()));
            Ok(())
        }
    }

    const LEASE: &str = "694d80e5ea1c0b05";

    fn me() -> Me {
        Me {
            node_id: "aa11".parse().unwrap(),
            hostname: "node-a".try_into().unwrap(),
            addr: "10.0.0.1".parse().unwrap(),
        }
    }

    fn fast() -> Timing {
        Timing {
            wait: Duration::from_millis(30),
            poll: Duration::from_millis(1),
            settle: Duration::ZERO,
            retry: Duration::ZERO,
            // Not within a test, but for the one that writes a slot slowly.
            renew: Duration::from_secs(3600),
        }
    }

    type Log<T> = Arc<Mutex<Vec<T>>>;

    /// A coordinated rollout over `store`; the calls it makes, and the waits it heard.
    fn coordinated(store: FakeStore) -> (Coordinated<'static>, Log<Call>, Log<String>) {
        let calls = store.calls.clone();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let c = Coordinated::new(
            Arc::new(store),
            me(),
            Role::Server,
            fast(),
            Box::new(move |r, why| h.lock().unwrap().push(format!("{r}: {why}"))),
        );
        (c, calls, heard)
    }

    fn ctx<'a>(
        n: &'a flow::tests::Node,
        sys: &'a Fake,
        rollout: &'a dyn Rollout,
        run: Running,
    ) -> Ctx<'a> {
        Ctx {
            paths: &n.paths,
            sys,
            rollout,
            run,
        }
    }

    fn the_ticket() -> Ticket {
        Ticket {
            release: "2".try_into().unwrap(),
            role: Role::Server,
            node: "aa11".parse().unwrap(),
            lease: LEASE.into(),
            key: format!("/clutch/rollout/servers/{LEASE}"),
        }
    }

    #[test]
    fn a_node_that_gets_its_turn_keeps_the_ticket_across_the_reboot_and_gives_it_back_when_ready() {
        let n = node();
        let (roll, calls, heard) = coordinated(FakeStore {
            turns: Mutex::new(vec![Turn::Wait(
                "node-b holds the voters' update ticket".into(),
            )]),
            ..Default::default()
        });
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let got = flow::apply(&ctx(&n, &fake, &roll, running("1", Slot::A)), &src());
        assert_eq!(got, Ok(Some("2".try_into().unwrap())));
        assert_eq!(*fake.reboots.borrow(), [false]);
        assert_eq!(
            *heard.lock().unwrap(),
            ["2: node-b holds the voters' update ticket"]
        );
        assert_eq!(
            *calls.lock().unwrap(),
            [
                Call::Bad("2".into()),
                Call::Bad("2".into()),
                Call::Enqueue(Role::Server, "2".into()),
                Call::Bad("2".into()),
                Call::Turn(LEASE.into()),
                Call::Keep(LEASE.into()),
                Call::Bad("2".into()),
                Call::Turn(LEASE.into()),
            ],
            "checked before the download, then queued and waited; nothing given back"
        );
        // The ticket is on the data partition, as JSON, for the next boot.
        let p = UpdateState::load(&n.paths).unwrap().pending.unwrap();
        let kept: Ticket = serde_json::from_value(p.ticket.unwrap()).unwrap();
        assert_eq!(kept, the_ticket());

        // The next boot, on the new slot: held (renewed) until ready, then given back.
        calls.lock().unwrap().clear();
        let fake = Fake {
            uefi: true,
            phase_after_sleep: Some(Phase::Ready),
            status_path: n.paths.status_file(),
            ..Default::default()
        };
        let h = flow::health(&ctx(&n, &fake, &roll, running("2", Slot::B))).unwrap();
        assert_eq!(h, Health::Committed("2".try_into().unwrap()));
        assert_eq!(
            *calls.lock().unwrap(),
            [Call::Keep(LEASE.into()), Call::Release(LEASE.into())]
        );
    }

    /// Writes the slot slowly (a big release on an SD card).
    struct SlowWrite(Fake, Duration);
    impl flow::UpdateSys for SlowWrite {
        fn download(
            &self,
            u: &str,
            d: &std::path::Path,
            l: u64,
            p: &mut dyn FnMut(u64, Option<u64>),
        ) -> Result<u64, String> {
            self.0.download(u, d, l, p)
        }
        fn run(&self, p: &str, a: &[String]) -> Result<String, String> {
            std::thread::sleep(self.1);
            self.0.run(p, a)
        }
        fn reboot(&self, t: bool) -> Result<(), String> {
            self.0.reboot(t)
        }
        fn now(&self) -> u64 {
            self.0.now()
        }
        fn sleep(&self, s: u64) {
            self.0.sleep(s)
        }
        fn uefi(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_held_ticket_is_renewed_while_the_slot_is_written() {
        let n = node();
        let store = FakeStore::default();
        let calls = store.calls.clone();
        let roll = Coordinated::new(
            Arc::new(store),
            me(),
            Role::Server,
            Timing {
                renew: Duration::from_millis(10),
                ..fast()
            },
            Box::new(|_, _| {}),
        );
        let sys = SlowWrite(
            Fake {
                files: set("2", &n.key),
                ..Default::default()
            },
            Duration::from_millis(300),
        );
        let c = Ctx {
            paths: &n.paths,
            sys: &sys,
            rollout: &roll,
            run: running("1", Slot::A),
        };
        assert_eq!(flow::apply(&c, &src()), Ok(Some("2".try_into().unwrap())));
        let seen = calls.lock().unwrap().clone();
        let go = seen
            .iter()
            .rposition(|c| matches!(c, Call::Turn(_)))
            .unwrap();
        assert!(
            seen[go..].contains(&Call::Keep(LEASE.into())),
            "renewed after the turn came: {seen:?}"
        );
        // Given back: the renewing stops.
        roll.after_commit(
            &"2".try_into().unwrap(),
            Some(&serde_json::to_value(the_ticket()).unwrap()),
        );
        std::thread::sleep(Duration::from_millis(50));
        let before = calls.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            calls.lock().unwrap().len(),
            before,
            "no renewing once given back"
        );
    }

    #[test]
    fn a_release_on_trial_renews_its_ticket_until_ready() {
        let n = node();
        pending_with_ticket(&n, "2", "1");
        let (roll, calls, _) = coordinated(FakeStore::default());
        // Not ready for a while: the status says `configuring` until the clock passes.
        crate::status::write_status(&n.paths.status_file(), &Default::default()).unwrap();
        struct Slow {
            inner: Fake,
            ready_at: u64,
        }
        impl flow::UpdateSys for Slow {
            fn download(
                &self,
                u: &str,
                d: &std::path::Path,
                l: u64,
                p: &mut dyn FnMut(u64, Option<u64>),
            ) -> Result<u64, String> {
                self.inner.download(u, d, l, p)
            }
            fn run(&self, p: &str, a: &[String]) -> Result<String, String> {
                self.inner.run(p, a)
            }
            fn reboot(&self, t: bool) -> Result<(), String> {
                self.inner.reboot(t)
            }
            fn now(&self) -> u64 {
                self.inner.now()
            }
            fn sleep(&self, s: u64) {
                *self.inner.clock.borrow_mut() += s;
                if self.now() >= self.ready_at {
                    let st = crate::status::Status {
                        phase: Phase::Ready,
                        ..Default::default()
                    };
                    crate::status::write_status(&self.inner.status_path, &st).unwrap();
                }
            }
            fn uefi(&self) -> bool {
                true
            }
        }
        let sys = Slow {
            inner: Fake {
                status_path: n.paths.status_file(),
                ..Default::default()
            },
            ready_at: 100,
        };
        let c = Ctx {
            paths: &n.paths,
            sys: &sys,
            rollout: &roll,
            run: running("2", Slot::B),
        };
        assert_eq!(
            flow::health(&c).unwrap(),
            Health::Committed("2".try_into().unwrap())
        );
        let calls = calls.lock().unwrap().clone();
        let keeps = calls
            .iter()
            .filter(|c| **c == Call::Keep(LEASE.into()))
            .count();
        // 100 s to ready, renewed every 30 s from the start.
        assert_eq!(keeps, 4, "{calls:?}");
        assert_eq!(calls.last(), Some(&Call::Release(LEASE.into())));
        assert_eq!(calls.len(), 5, "{calls:?}");
    }

    #[test]
    fn a_node_that_does_not_get_its_turn_in_time_stays_up_and_says_why() {
        let n = node();
        let (roll, calls, heard) = coordinated(FakeStore {
            always_wait: Some(
                "quorum at risk: 1 other voter(s) healthy of 3, 2 needed while this one is down"
                    .into(),
            ),
            ..Default::default()
        });
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let e = flow::apply(&ctx(&n, &fake, &roll, running("1", Slot::A)), &src()).unwrap_err();
        assert!(matches!(e, Stop::Later(_)), "{e:?}");
        assert!(e.to_string().contains("quorum at risk"), "{e}");
        assert!(e.to_string().contains("gave up after 0 s"), "{e}");
        assert!(fake.ran.borrow().is_empty(), "no slot written");
        assert!(fake.reboots.borrow().is_empty(), "no reboot");
        assert!(UpdateState::load(&n.paths).unwrap().pending.is_none());
        // Heard once, though asked many times.
        assert_eq!(heard.lock().unwrap().len(), 1);
        // The queued ticket is given back.
        assert_eq!(
            calls.lock().unwrap().last(),
            Some(&Call::Release(LEASE.into()))
        );
        let live = Live::load(&Live::path(&n.paths)).unwrap();
        assert_eq!(
            (live.update.state.as_str(), live.update.release.as_str()),
            ("waiting", "2")
        );
        assert!(live.update.reason.contains("quorum at risk"));
    }

    fn bad_b() -> BadRelease {
        BadRelease {
            node: "bb22".parse().unwrap(),
            hostname: "node-b".try_into().unwrap(),
            why: "release 2 reached phase=failed: users: useradd failed".into(),
        }
    }

    #[test]
    fn a_release_found_bad_elsewhere_is_refused_before_anything_is_downloaded() {
        let n = node();
        let (roll, calls, _) = coordinated(FakeStore {
            bad: Some(bad_b()),
            ..Default::default()
        });
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let e = flow::apply(&ctx(&n, &fake, &roll, running("1", Slot::A)), &src()).unwrap_err();
        assert_eq!(
            e,
            Stop::Refused(
                "release 2 was found bad by node-b (bb22): release 2 reached phase=failed: users: useradd failed"
                    .into()
            )
        );
        assert_eq!(*calls.lock().unwrap(), [Call::Bad("2".into())]);
        assert!(fake.ran.borrow().is_empty() && fake.reboots.borrow().is_empty());
        assert!(
            !n.paths.host(INCOMING).join("clutch_2.root.raw.xz").exists(),
            "the release itself was not downloaded"
        );
        assert!(UpdateState::load(&n.paths).unwrap().pending.is_none());
    }

    #[test]
    fn a_release_found_bad_while_waiting_is_refused_and_the_place_given_back() {
        let n = node();
        let store = FakeStore {
            always_wait: Some("node-b holds the voters' update ticket".into()),
            ..Default::default()
        };
        // Bad only once queued: the check before the download passes.
        struct BadLater(FakeStore);
        impl Coordinator for BadLater {
            fn name(&self) -> &'static str {
                "fake"
            }
            fn bad(&self, r: &Release) -> Result<Option<BadRelease>, RolloutError> {
                let queued = self
                    .0
                    .calls
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|c| matches!(c, Call::Turn(_)));
                self.0.bad(r)?;
                Ok(queued.then(bad_b))
            }
            fn enqueue(&self, me: &Me, role: Role, r: &Release) -> Result<Ticket, RolloutError> {
                self.0.enqueue(me, role, r)
            }
            fn turn(&self, me: &Me, t: &Ticket) -> Result<Turn, RolloutError> {
                self.0.turn(me, t)
            }
            fn keep(&self, t: &Ticket) -> Result<(), RolloutError> {
                self.0.keep(t)
            }
            fn release(&self, t: &Ticket) -> Result<(), RolloutError> {
                self.0.release(t)
            }
            fn mark_bad(&self, me: &Me, r: &Release, why: &str) -> Result<(), RolloutError> {
                self.0.mark_bad(me, r, why)
            }
        }
        let calls = store.calls.clone();
        let roll = Coordinated::new(
            Arc::new(BadLater(store)),
            me(),
            Role::Server,
            Timing {
                wait: Duration::from_secs(60),
                ..fast()
            },
            Box::new(|_, _| {}),
        );
        let fake = Fake {
            files: set("2", &n.key),
            uefi: true,
            ..Default::default()
        };
        let e = flow::apply(&ctx(&n, &fake, &roll, running("1", Slot::A)), &src()).unwrap_err();
        assert!(
            matches!(&e, Stop::Refused(w) if w.contains("found bad by node-b")),
            "{e:?}"
        );
        assert!(fake.ran.borrow().is_empty() && fake.reboots.borrow().is_empty());
        assert_eq!(
            calls.lock().unwrap().last(),
            Some(&Call::Release(LEASE.into()))
        );
    }

    fn pending_with_ticket(n: &flow::tests::Node, rel: &str, from: &str) {
        UpdateState {
            pending: Some(Pending {
                release: rel.try_into().unwrap(),
                slot: "b".into(),
                from_release: from.try_into().unwrap(),
                from_slot: "a".into(),
                started: 0,
                ticket: Some(serde_json::to_value(the_ticket()).unwrap()),
                failure: Some("release 2 reached phase=failed: users: useradd failed".into()),
                written_only: false,
            }),
            ..Default::default()
        }
        .save(&n.paths)
        .unwrap();
    }

    #[test]
    fn a_rolled_back_release_is_marked_bad_before_the_ticket_is_given_back() {
        let n = node();
        pending_with_ticket(&n, "2", "1");
        crate::status::write_status(&n.paths.status_file(), &Default::default()).unwrap();
        let (roll, calls, _) = coordinated(FakeStore::default());
        let fake = Fake::default();
        // Back on release 1: the boot loader (or the health check) went back.
        let h = flow::health(&ctx(&n, &fake, &roll, running("1", Slot::A))).unwrap();
        assert_eq!(h, Health::FellBack("2".try_into().unwrap()));
        let calls = calls.lock().unwrap().clone();
        let why = "release 2 reached phase=failed: users: useradd failed".to_string();
        assert_eq!(
            calls,
            [
                Call::Keep(LEASE.into()),
                Call::MarkBad("2".into(), why),
                Call::Release(LEASE.into())
            ]
        );
    }

    #[test]
    fn a_store_that_cannot_mark_the_release_bad_keeps_the_ticket_until_it_lapses() {
        struct NoWrites(FakeStore);
        impl Coordinator for NoWrites {
            fn name(&self) -> &'static str {
                "fake"
            }
            fn bad(&self, r: &Release) -> Result<Option<BadRelease>, RolloutError> {
                self.0.bad(r)
            }
            fn enqueue(&self, me: &Me, role: Role, r: &Release) -> Result<Ticket, RolloutError> {
                self.0.enqueue(me, role, r)
            }
            fn turn(&self, me: &Me, t: &Ticket) -> Result<Turn, RolloutError> {
                self.0.turn(me, t)
            }
            fn keep(&self, t: &Ticket) -> Result<(), RolloutError> {
                self.0.keep(t)
            }
            fn release(&self, t: &Ticket) -> Result<(), RolloutError> {
                self.0.release(t)
            }
            fn mark_bad(&self, _: &Me, _: &Release, _: &str) -> Result<(), RolloutError> {
                Err(RolloutError::Command {
                    command: "etcdctl put".into(),
                    detail: "context deadline exceeded".into(),
                })
            }
        }
        let store = FakeStore::default();
        let calls = store.calls.clone();
        let roll = Coordinated::new(
            Arc::new(NoWrites(store)),
            me(),
            Role::Server,
            fast(),
            Box::new(|_, _| {}),
        );
        let t = serde_json::to_value(the_ticket()).unwrap();
        roll.after_rollback(&"2".try_into().unwrap(), "panic", Some(&t));
        assert!(
            !calls
                .lock()
                .unwrap()
                .iter()
                .any(|c| matches!(c, Call::Release(_))),
            "not given back: while it lasts nobody else starts on the release"
        );
    }

    #[test]
    fn a_write_that_fails_gives_the_ticket_back_without_calling_the_release_bad() {
        let (roll, calls, _) = coordinated(FakeStore::default());
        let t = serde_json::to_value(the_ticket()).unwrap();
        roll.give_back(
            &"2".try_into().unwrap(),
            "systemd-sysupdate: no space",
            Some(&t),
        );
        assert_eq!(*calls.lock().unwrap(), [Call::Release(LEASE.into())]);
        // A ticket from elsewhere (or none) is left alone.
        roll.after_commit(&"2".try_into().unwrap(), Some(&serde_json::json!({"x": 1})));
        roll.after_commit(&"2".try_into().unwrap(), None);
        assert_eq!(calls.lock().unwrap().len(), 1);
    }

    // --- which coordinator ---

    fn cluster(engine: &str) -> Cluster {
        toml::from_str(&format!(
            "name = \"lab\"\nengine = \"{engine}\"\nexpected_size = 3\n"
        ))
        .unwrap()
    }

    fn member(id: &str, host: &str, role: Role, addr: &str) -> MemberInfo {
        MemberInfo {
            node_id: id.parse().unwrap(),
            hostname: host.try_into().unwrap(),
            role,
            addr: addr.parse().unwrap(),
            key: "00".repeat(32).try_into().unwrap(),
        }
    }

    /// Writes `cluster.json` as formation does, for node `id`.
    fn joined(n: &flow::tests::Node, id: &str, role: Role) {
        let members = vec![
            member("aa11", "node-a", Role::Server, "10.0.0.1"),
            member("bb22", "node-b", Role::Server, "10.0.0.2"),
            member("cc33", "node-c", Role::Server, "10.0.0.3"),
            member("dd44", "node-d", Role::Agent, "10.0.0.4"),
        ];
        let dir = n.paths.host(STATE_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        Store::new(&dir)
            .save_membership(&Membership {
                node_id: id.parse::<NodeId>().unwrap(),
                cluster_key: ClusterKey::new("lab", "etcd", 3, 3),
                instance: InstanceId::generate(),
                role,
                leader: None,
                members: MemberList { epoch: 4, members },
            })
            .unwrap();
    }

    #[test]
    fn the_coordinator_follows_the_engine_and_the_role_formation_recorded() {
        let n = node();
        let root = n.paths.root.clone();
        let alone = |c: Choice| match c {
            Choice::Alone(why) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(alone(choose(&n.paths, None)), "no [cluster]");
        assert_eq!(
            alone(choose(&n.paths, Some(&cluster("none")))),
            "engine none"
        );
        assert!(
            alone(choose(&n.paths, Some(&cluster("etcd")))).contains("not a cluster member yet")
        );

        joined(&n, "bb22", Role::Server);
        match choose(&n.paths, Some(&cluster("etcd"))) {
            Choice::Etcd {
                me,
                role,
                endpoints,
                tls,
            } => {
                assert_eq!(role, Role::Server);
                assert_eq!(
                    (me.node_id.as_str(), me.hostname.as_str()),
                    ("bb22", "node-b")
                );
                assert_eq!(me.addr.to_string(), "10.0.0.2");
                assert_eq!(endpoints, ["http://127.0.0.1:2379"]);
                assert_eq!(tls.ca, root.join("var/lib/etcd/clutch-tls/ca.crt"));
                assert_eq!(tls.cert, root.join("var/lib/etcd/clutch-tls/node.crt"));
                assert_eq!(tls.key, root.join("var/lib/etcd/clutch-tls/node.key"));
            }
            other => panic!("{other:?}"),
        }
        match choose(&n.paths, Some(&cluster("k3s"))) {
            Choice::K3s { role, scratch, .. } => {
                assert_eq!(role, Role::Server);
                assert_eq!(scratch, root.join("var/lib/clutch/update/rollout"));
            }
            other => panic!("{other:?}"),
        }

        // An agent runs no etcd member: it asks the servers, over TLS.
        joined(&n, "dd44", Role::Agent);
        match choose(&n.paths, Some(&cluster("etcd"))) {
            Choice::Etcd {
                role, endpoints, ..
            } => {
                assert_eq!(role, Role::Agent);
                assert_eq!(
                    endpoints,
                    [
                        "https://10.0.0.1:2379",
                        "https://10.0.0.2:2379",
                        "https://10.0.0.3:2379"
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(alone(choose(&n.paths, Some(&cluster("k3s")))).contains("k3s agent"));

        // A member list without this node (replaced) coordinates nothing.
        joined(&n, "ee55", Role::Server);
        assert!(
            alone(choose(&n.paths, Some(&cluster("etcd")))).contains("does not list this node")
        );
    }
}
