use super::*;
use crate::engine::PlanStart;
use crate::id::Identity;

fn id(s: &str) -> NodeId {
    s.parse().unwrap()
}
fn fresh() -> PeerView {
    PeerView {
        phase: Phase::Discovering,
        role: Role::None,
        cluster: None,
        bootstrap: None,
    }
}
fn peers(ids: &[&str]) -> BTreeMap<NodeId, PeerView> {
    ids.iter().map(|s| (id(s), fresh())).collect()
}
fn member(s: &str) -> MemberInfo {
    MemberInfo {
        node_id: id(s),
        hostname: format!("host-{s}").try_into().unwrap(),
        role: Role::None,
        addr: "10.0.0.1".parse().unwrap(),
        key: Identity::generate().public(),
    }
}
const S: Duration = Duration::from_secs(3);
const P: Duration = Duration::from_secs(30);

fn rules(me: &str, expected: usize) -> Rules {
    Rules {
        me: id(me),
        expected,
        quorum: expected / 2 + 1,
        settle: S,
        partial_wait: P,
    }
}
fn all(_: Role) -> PlanStart {
    PlanStart::Together
}
fn k3s_like(r: Role) -> PlanStart {
    if r == Role::Agent {
        PlanStart::WhenServerReady
    } else {
        PlanStart::OneByOne
    }
}
fn view<'a>(d: &'a Durable, p: &'a BTreeMap<NodeId, PeerView>) -> View<'a> {
    View {
        durable: d,
        peers: p,
        seen: p.len(),
        plan_start: &all,
    }
}

#[test]
fn the_whole_set_settles_briefly_then_the_lowest_asks_for_votes() {
    let mut e = Election::new(rules("a", 3));
    let d = Durable::default();
    let t0 = Instant::now();
    match e.step(t0, &view(&d, &peers(&[]))) {
        Decision::Wait(w) => assert!(w.contains("1/3 nodes authenticated"), "{w}"),
        x => panic!("{x:?}"),
    }
    let p = peers(&["b", "c"]);
    match e.step(t0, &view(&d, &p)) {
        Decision::Wait(w) => assert!(w.contains("all expected nodes here"), "{w}"),
        x => panic!("{x:?}"),
    }
    assert!(matches!(
        e.step(t0 + Duration::from_secs(2), &view(&d, &p)),
        Decision::Wait(_)
    ));
    assert_eq!(
        e.step(t0 + S, &view(&d, &p)),
        Decision::RequestVotes(vec![id("b"), id("c")])
    );
}

#[test]
fn a_quorum_short_of_the_set_waits_the_partial_window() {
    let mut e = Election::new(rules("a", 3));
    let d = Durable::default();
    let t0 = Instant::now();
    let p = peers(&["b"]);
    e.step(t0, &view(&d, &p));
    match e.step(t0 + S, &view(&d, &p)) {
        Decision::Wait(w) => assert!(w.contains("waiting for the rest"), "{w}"),
        x => panic!("{x:?}"),
    }
    assert_eq!(
        e.step(t0 + P, &view(&d, &p)),
        Decision::RequestVotes(vec![id("b")])
    );
}

#[test]
fn set_change_restarts_settle_and_others_wait_for_the_lowest() {
    let mut e = Election::new(rules("b", 3));
    let d = Durable::default();
    let t0 = Instant::now();
    e.step(t0, &view(&d, &peers(&["a", "c"])));
    match e.step(t0 + S, &view(&d, &peers(&["a", "c"]))) {
        Decision::Wait(w) => assert!(w.contains("waiting for a (lowest id)"), "{w}"),
        x => panic!("{x:?}"),
    }
}

#[test]
fn minority_never_bootstraps() {
    let mut e = Election::new(rules("a", 5));
    let d = Durable::default();
    let t0 = Instant::now();
    for s in 0..200 {
        let p = peers(&["b"]);
        let x = e.step(t0 + Duration::from_secs(s), &view(&d, &p));
        assert!(matches!(x, Decision::Wait(_)), "{x:?}");
    }
}

#[test]
fn a_durable_vote_for_another_candidate_blocks_this_node_forever() {
    // b promised its vote to a; a is out of reach (link cut). b is now the lowest it sees
    // and has a quorum of 3 with c, d... but it never asks for votes.
    let mut e = Election::new(rules("b", 3));
    let d = Durable {
        vote: Some(id("a")),
        ..Durable::default()
    };
    let t0 = Instant::now();
    for s in 0..600 {
        let p = peers(&["c"]);
        match e.step(t0 + Duration::from_secs(s), &view(&d, &p)) {
            Decision::Wait(w) => assert!(w.contains("promised my bootstrap vote to a"), "{w}"),
            x => panic!("{x:?}"),
        }
    }
}

#[test]
fn a_candidate_that_sees_a_lower_id_withdraws() {
    let mut e = Election::new(rules("b", 3));
    let d = Durable {
        vote: Some(id("b")),
        ..Durable::default()
    };
    assert_eq!(
        e.step(Instant::now(), &view(&d, &peers(&["a", "c"]))),
        Decision::Withdraw
    );
    // Still the lowest: it goes on (asks again once settled).
    let mut e = Election::new(rules("a", 3));
    let d = Durable {
        vote: Some(id("a")),
        ..Durable::default()
    };
    let t0 = Instant::now();
    e.step(t0, &view(&d, &peers(&["b", "c"])));
    assert!(matches!(
        e.step(t0 + S, &view(&d, &peers(&["b", "c"]))),
        Decision::RequestVotes(_)
    ));
}

fn the_plan() -> Bootstrap {
    plan(
        InstanceId::generate(),
        id("a"),
        vec![member("c"), member("a"), member("b")],
        2,
    )
}

#[test]
fn a_plan_gives_the_lowest_ids_the_server_role() {
    let p = the_plan();
    let roles: Vec<(String, Role)> = p
        .members
        .iter()
        .map(|m| (m.node_id.to_string(), m.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("a".into(), Role::Server),
            ("b".into(), Role::Server),
            ("c".into(), Role::Agent)
        ]
    );
}

#[test]
fn listed_members_enroll_with_the_leader_or_a_ready_server_of_the_plan() {
    let plan = the_plan();
    let mut e = Election::new(rules("c", 3));
    let d = Durable::default();
    // The leader carries the plan.
    let mut p = peers(&["a", "b"]);
    p.get_mut(&id("a")).unwrap().bootstrap = Some(plan.clone());
    p.get_mut(&id("a")).unwrap().phase = Phase::Bootstrapping;
    assert_eq!(
        e.step(Instant::now(), &view(&d, &p)),
        Decision::Enroll {
            from: id("a"),
            plan: plan.clone()
        }
    );
    // The leader is gone; b, a ready server of the plan, enrolls us.
    let mut p = peers(&["b"]);
    let b = p.get_mut(&id("b")).unwrap();
    b.bootstrap = Some(plan.clone());
    b.phase = Phase::Ready;
    b.role = Role::Server;
    b.cluster = Some(plan.instance.clone());
    let d = Durable {
        bootstrap: Some(plan.clone()),
        cluster: Some(plan.instance.clone()),
        ..Durable::default()
    };
    assert_eq!(
        e.step(Instant::now(), &view(&d, &p)),
        Decision::Enroll {
            from: id("b"),
            plan: plan.clone()
        }
    );
    // Nobody that can enroll us is here: wait, never bootstrap.
    match e.step(Instant::now(), &view(&d, &peers(&[]))) {
        Decision::Wait(w) => assert!(w.contains("listed in the bootstrap plan of a"), "{w}"),
        x => panic!("{x:?}"),
    }
    // The leader founds from its own plan.
    let mut e = Election::new(rules("a", 3));
    let d = Durable {
        bootstrap: Some(plan.clone()),
        ..Durable::default()
    };
    assert_eq!(
        e.step(Instant::now(), &view(&d, &peers(&[]))),
        Decision::Found(plan)
    );
}

#[test]
fn members_that_do_not_start_from_the_plan_join_once_a_server_is_ready() {
    let plan = the_plan();
    let mut e = Election::new(rules("b", 3));
    let d = Durable {
        bootstrap: Some(plan.clone()),
        cluster: Some(plan.instance.clone()),
        ..Durable::default()
    };
    let mut p = peers(&["a"]);
    let a = p.get_mut(&id("a")).unwrap();
    a.bootstrap = Some(plan.clone());
    a.cluster = Some(plan.instance.clone());
    a.phase = Phase::Bootstrapping;
    let v = |p: &BTreeMap<NodeId, PeerView>, e: &mut Election| {
        e.step(
            Instant::now(),
            &View {
                durable: &d,
                peers: p,
                seen: 1,
                plan_start: &k3s_like,
            },
        )
    };
    assert!(matches!(v(&p, &mut e), Decision::Wait(_)));
    let a = p.get_mut(&id("a")).unwrap();
    a.phase = Phase::Ready;
    a.role = Role::Server;
    assert_eq!(v(&p, &mut e), Decision::Join(id("a")));
}

#[test]
fn an_existing_cluster_means_join_and_two_mean_neither() {
    let mut e = Election::new(rules("z", 3));
    let d = Durable::default();
    let (i1, i2) = (InstanceId::generate(), InstanceId::generate());
    let mut p = peers(&["a", "b"]);
    let a = p.get_mut(&id("a")).unwrap();
    a.cluster = Some(i1.clone());
    a.phase = Phase::Ready;
    a.role = Role::Server;
    assert_eq!(
        e.step(Instant::now(), &view(&d, &p)),
        Decision::Join(id("a"))
    );
    p.get_mut(&id("b")).unwrap().cluster = Some(i2.clone());
    match e.step(Instant::now(), &view(&d, &p)) {
        Decision::Conflict(w) => {
            assert!(w.contains(i1.as_str()) && w.contains(i2.as_str()), "{w}")
        }
        x => panic!("{x:?}"),
    }
    // A node of cluster i2 keeps to i2 and waits for its servers.
    let d = Durable {
        cluster: Some(i2.clone()),
        ..Durable::default()
    };
    match e.step(Instant::now(), &view(&d, &p)) {
        Decision::Wait(w) => assert!(w.contains(i2.as_str()), "{w}"),
        x => panic!("{x:?}"),
    }
    // An agent is not a join target.
    let mut p = peers(&["a"]);
    let a = p.get_mut(&id("a")).unwrap();
    a.cluster = Some(i1);
    a.phase = Phase::Ready;
    a.role = Role::Agent;
    assert!(matches!(
        e.step(Instant::now(), &view(&Durable::default(), &p)),
        Decision::Wait(_)
    ));
}

#[test]
fn votes() {
    let d = Durable::default();
    assert!(consider_vote(&d, &id("a"), &id("a")).is_ok());
    assert!(
        consider_vote(&d, &id("b"), &id("a")).is_err(),
        "knows lower id"
    );
    let d = Durable {
        vote: Some(id("a")),
        ..Durable::default()
    };
    assert!(
        consider_vote(&d, &id("a"), &id("a")).is_ok(),
        "same candidate"
    );
    assert!(consider_vote(&d, &id("b"), &id("b")).is_err(), "promised");
    let d = Durable {
        cluster: Some(InstanceId::generate()),
        ..Durable::default()
    };
    assert!(
        consider_vote(&d, &id("a"), &id("a")).is_err(),
        "cluster exists"
    );
}

#[test]
fn two_candidates_cannot_both_win_a_majority() {
    // 5 voters with durable votes; whatever order requests arrive in and whatever lowest
    // id each voter knows, at most one candidate gets 3.
    let ids: Vec<NodeId> = ["a", "b", "c", "d", "e"].iter().map(|s| id(s)).collect();
    for order in 0..32u32 {
        let mut voters: Vec<Durable> = (0..5).map(|_| Durable::default()).collect();
        let (mut va, mut vb) = (0, 0);
        for (i, v) in voters.iter_mut().enumerate() {
            let lowest = if order & (1 << i) != 0 {
                &ids[0]
            } else {
                &ids[1]
            };
            let first_a = (order >> i) & 1 == 0;
            let cands = if first_a {
                [&ids[0], &ids[1]]
            } else {
                [&ids[1], &ids[0]]
            };
            for c in cands {
                if consider_vote(v, c, lowest.min(c)).is_ok() {
                    v.vote = Some(c.clone());
                    if *c == ids[0] { va += 1 } else { vb += 1 }
                }
            }
        }
        assert!(!(va >= 3 && vb >= 3), "order {order}: a={va} b={vb}");
    }
}

#[test]
fn admissions_serialise_joins() {
    let mut a = Admissions::new(Duration::from_secs(60));
    let t0 = Instant::now();
    assert!(a.begin(&id("x"), t0).is_ok());
    assert_eq!(a.begin(&id("y"), t0), Err(id("x")));
    assert!(
        a.begin(&id("x"), t0).is_ok(),
        "the pending joiner may retry"
    );
    a.finish(&id("x"));
    assert!(a.begin(&id("y"), t0).is_ok());
    assert!(
        a.begin(&id("z"), t0 + Duration::from_secs(61)).is_ok(),
        "timed out"
    );
    assert_eq!(a.pending(), Some(&id("z")));
}

#[test]
fn roles_and_backoff() {
    assert_eq!(role_for_joiner(1, 3), Role::Server);
    assert_eq!(role_for_joiner(3, 3), Role::Agent);
    let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
    assert_eq!(b.next_delay(0.999_999).as_millis(), 999);
    for _ in 0..10 {
        b.next_delay(0.5);
    }
    assert!(b.next_delay(0.999_999) < Duration::from_secs(8));
    b.reset();
    assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
}
