use std::path::Path;
use std::sync::Mutex;

use clutch_os::cmd::CmdOutput;
use clutch_os::cmd::fake::{Call, FakeRunner};

use super::env::{env_token, render_env};
use super::members::{initial_cluster, members_to_remove, parse_member_list};
use super::*;
use crate::id::Identity;
use crate::sys::parse_env_file;
use crate::wire::MemberInfo;

fn host(s: &str) -> clutch_config::Hostname {
    s.try_into().unwrap()
}

fn me() -> LocalNode {
    LocalNode {
        node_id: "aa".parse().unwrap(),
        hostname: host("node-a"),
        addr: "10.0.0.1".parse().unwrap(),
        cluster_name: "lab".into(),
    }
}

fn node_b() -> LocalNode {
    LocalNode {
        node_id: "bb".parse().unwrap(),
        hostname: host("node-b"),
        addr: "10.0.0.2".parse().unwrap(),
        cluster_name: "lab".into(),
    }
}

fn joiner(h: &str, ip: &str) -> Joiner {
    Joiner {
        node_id: format!("{h}{h}").parse().unwrap(),
        hostname: host(h),
        addr: ip.parse().unwrap(),
        csr: None,
    }
}

fn member(id: &str, h: &str, ip: &str, role: Role) -> MemberInfo {
    MemberInfo {
        node_id: id.parse().unwrap(),
        hostname: host(h),
        role,
        addr: ip.parse().unwrap(),
        key: Identity::generate().public(),
    }
}

#[derive(Default)]
struct RecordingServices(Mutex<Vec<String>>);
impl ServiceManager for RecordingServices {
    fn restart(&self, u: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("restart {u}"));
        Ok(())
    }
    fn stop(&self, u: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("stop {u}"));
        Ok(())
    }
}

/// etcdctl's arguments after the endpoint and timeout flags.
fn ctl_args(c: &Call) -> String {
    c.args[3..].join(" ")
}

fn engine(
    root: &Path,
    answer: impl Fn(&str) -> CmdOutput + Send + Sync + 'static,
) -> (EtcdEngine, Arc<FakeRunner>, Arc<RecordingServices>) {
    let runner = Arc::new(FakeRunner::new(move |c| answer(&ctl_args(c))));
    let services = Arc::new(RecordingServices::default());
    let mut e = EtcdEngine::new(root.into(), services.clone(), runner.clone());
    e.health_timeout = Duration::from_millis(10);
    (e, runner, services)
}

fn calls(r: &FakeRunner) -> Vec<String> {
    r.calls().iter().map(ctl_args).collect()
}

#[test]
fn env_file_is_tls_on_the_node_address_and_plain_only_on_loopback() {
    let tok = InstanceId::generate();
    let ic = vec![
        Peer {
            name: host("node-a"),
            addr: "10.0.0.1".parse().unwrap(),
        },
        Peer {
            name: host("node-b"),
            addr: "10.0.0.2".parse().unwrap(),
        },
    ];
    let e = render_env(&EnvSpec {
        cluster_name: "lab\nETCD_X=1",
        name: &host("node-a"),
        addr: "10.0.0.1".parse().unwrap(),
        data_dir: Path::new("/var/lib/etcd/clutch"),
        initial_cluster: &ic,
        state: ClusterState::New,
        token: &tok,
        member: Some(0x8e9e05c52164694d),
        tls: TlsFiles {
            ca: Path::new("/t/ca.crt"),
            cert: Path::new("/t/node.crt"),
            key: Path::new("/t/node.key"),
        },
    });
    assert_eq!(env_member(&e), Some(0x8e9e05c52164694d));
    assert_eq!(env_token(&e), Some(format!("clutch-{tok}")));
    let v = parse_env_file(&e);
    let get = |k: &str| {
        v.iter()
            .find(|(a, _)| a == k)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("{k} missing in\n{e}"))
    };
    assert!(!v.iter().any(|(k, _)| k == "ETCD_X"), "no injected line");
    assert_eq!(
        get("ETCD_LISTEN_CLIENT_URLS"),
        "http://127.0.0.1:2379,https://10.0.0.1:2379"
    );
    assert_eq!(get("ETCD_ADVERTISE_CLIENT_URLS"), "https://10.0.0.1:2379");
    assert_eq!(get("ETCD_LISTEN_PEER_URLS"), "https://10.0.0.1:2380");
    assert_eq!(
        get("ETCD_INITIAL_CLUSTER"),
        "node-a=https://10.0.0.1:2380,node-b=https://10.0.0.2:2380"
    );
    assert_eq!(get("ETCD_INITIAL_CLUSTER_STATE"), "new");
    for k in ["ETCD_CLIENT_CERT_AUTH", "ETCD_PEER_CLIENT_CERT_AUTH"] {
        assert_eq!(get(k), "true");
    }
    assert_eq!(get("ETCD_TRUSTED_CA_FILE"), "/t/ca.crt");
    assert_eq!(get("ETCD_PEER_KEY_FILE"), "/t/node.key");
}

const LIST: &str = r#"{"header":{"cluster_id":1},"members":[{"ID":10276657743932975437,"name":"a","peerURLs":["https://10.0.0.1:2380"],"clientURLs":["https://10.0.0.1:2379"]},{"ID":5,"peerURLs":["https://10.0.0.9:2380"]}]}"#;

#[test]
fn member_lists_and_initial_clusters_parse_into_types() {
    let m = parse_member_list(LIST).unwrap();
    assert_eq!(m.len(), 2);
    let out = "Member 8e9e05c52164694d added to cluster cdf818194e3a8c32\n\nETCD_NAME=\"b\"\nETCD_INITIAL_CLUSTER=\"a=https://10.0.0.1:2380,b=https://10.0.0.2:2380\"\nETCD_INITIAL_CLUSTER_STATE=\"existing\"\n";
    let ic = parse_initial_cluster(out).unwrap();
    assert_eq!(
        env::initial_cluster_string(&ic),
        "a=https://10.0.0.1:2380,b=https://10.0.0.2:2380"
    );
    assert_eq!(parse_added_id(out), Some(0x8e9e05c52164694d));
    for bad in [
        "ETCD_INITIAL_CLUSTER=\"a=http://10.0.0.1:2380\"",
        "ETCD_INITIAL_CLUSTER=\"--x=https://10.0.0.1:2380\"",
        "ETCD_INITIAL_CLUSTER=\"a=https://10.0.0.1:2381\"",
        "ETCD_INITIAL_CLUSTER=\"a=https://not-an-ip:2380\"",
        "nothing",
    ] {
        assert!(parse_initial_cluster(bad).is_err(), "{bad}");
    }
    // The unstarted member (no name) is left out; our own entry gets our name.
    let ic = initial_cluster(&m, 5, &host("b"));
    assert_eq!(
        env::initial_cluster_string(&ic),
        "a=https://10.0.0.1:2380,b=https://10.0.0.9:2380"
    );
    let j = joiner("b", "10.0.0.9");
    assert_eq!(
        members_to_remove(&m, &j, &[]),
        vec![5],
        "unstarted member with joiner's URL"
    );
    let stale = member("old", "a", "10.0.0.50", Role::Server);
    assert_eq!(
        members_to_remove(&m, &j, &[stale]),
        vec![10276657743932975437, 5]
    );
}

/// What `etcdctl member list -w json` said on etcd 3.5.16 right after `member add c` on the
/// one-member cluster `a` (so without quorum).
const LIST_AFTER_ADD: &str = r#"{"header":{"cluster_id":1575429384540285186},"members":[{"ID":2516713510085588220,"peerURLs":["https://10.0.0.3:2380"]},{"ID":7048566815304704621,"name":"a","peerURLs":["https://10.0.0.1:2380"],"clientURLs":["https://10.0.0.1:2379"]}]}"#;
const C_ID: u64 = 2516713510085588220;

#[test]
fn a_joiner_that_is_a_member_already_rejoins_as_that_member() {
    let list = parse_member_list(LIST_AFTER_ADD).unwrap();
    let j = joiner("c", "10.0.0.3");
    let want_ic = "c=https://10.0.0.3:2380,a=https://10.0.0.1:2380";
    let rejoin = |p: AdmitPlan| match p {
        AdmitPlan::Rejoin {
            id,
            initial_cluster,
        } => (id, env::initial_cluster_string(&initial_cluster)),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        rejoin(plan_admit(&list, &j, &[])),
        (C_ID, want_ic.to_string())
    );
    let mut started = list.clone();
    started[0].name = "c".into();
    assert_eq!(
        rejoin(plan_admit(&started, &j, &[])),
        (C_ID, want_ic.to_string())
    );
    // A replaced node (same hostname, new node id, empty disk): remove, add anew.
    let stale = member("old", "c", "10.0.0.3", Role::Server);
    assert_eq!(
        plan_admit(&started, &j, &[stale]),
        AdmitPlan::Add { remove: vec![C_ID] }
    );
    // Its address used to be another node's member: remove that one, add.
    let mut other = list.clone();
    other[0].name = "d".into();
    assert_eq!(
        plan_admit(&other, &j, &[]),
        AdmitPlan::Add { remove: vec![C_ID] }
    );
    // Not a member: plain add.
    assert_eq!(
        plan_admit(&list[1..], &j, &[]),
        AdmitPlan::Add { remove: vec![] }
    );
}

/// A root where this node is a server holding the CA, and a joiner's request.
fn with_ca(root: &Path) -> (EtcdEngine, Arc<FakeRunner>, Arc<RecordingServices>) {
    let (e, r, s) = engine(root, |a| {
        if a.starts_with("member list") {
            CmdOutput::success(
                r#"{"members":[{"ID":255,"name":"node-b","peerURLs":["https://10.0.0.7:2380"]}]}"#,
            )
        } else if a.starts_with("member add") {
            CmdOutput::success(
                "Member 1f added to cluster 1\nETCD_INITIAL_CLUSTER=\"node-a=https://10.0.0.1:2380,node-b=https://10.0.0.2:2380\"\n",
            )
        } else {
            CmdOutput::success("")
        }
    });
    e.found(&me(), &plan()).unwrap();
    (e, r, s)
}

fn plan() -> Bootstrap {
    crate::election::plan(
        InstanceId::generate(),
        "aa".parse().unwrap(),
        vec![
            member("aa", "node-a", "10.0.0.1", Role::None),
            member("bb", "node-b", "10.0.0.2", Role::None),
            member("cc", "node-c", "10.0.0.3", Role::None),
        ],
        2,
    )
}

/// The joiner's side: its own root and its request.
fn joiner_side() -> (
    tempfile::TempDir,
    EtcdEngine,
    Arc<RecordingServices>,
    Joiner,
) {
    let t = tempfile::tempdir().unwrap();
    let (e, _, s) = engine(t.path(), |_| CmdOutput::success(""));
    let node_b = node_b();
    let mut j = joiner("node-b", "10.0.0.2");
    j.csr = e.request(&node_b).unwrap();
    (t, e, s, j)
}

#[test]
fn members_of_the_plan_start_together_with_the_same_initial_cluster() {
    let t = tempfile::tempdir().unwrap();
    let (leader, runner, _) = with_ca(t.path());
    let p = plan();
    let (_jt, je, js, j) = joiner_side();
    let info = leader
        .admit(&me(), &j, Role::Server, Admission::FromPlan(&p))
        .unwrap();
    assert!(
        calls(&runner).is_empty(),
        "no membership change for plan members"
    );
    let JoinInfo::Etcd(ej) = &info else { panic!() };
    assert_eq!(ej.state, ClusterState::New);
    assert_eq!(ej.token, p.instance);
    assert_eq!(
        env::initial_cluster_string(&ej.initial_cluster),
        "node-a=https://10.0.0.1:2380,node-b=https://10.0.0.2:2380",
        "the two servers of the plan"
    );
    assert!(ej.tls.ca_key.is_some(), "servers get the CA key");
    let node_b = node_b();
    je.join(&node_b, Role::Server, &info).unwrap();
    assert_eq!(*js.0.lock().unwrap(), vec!["stop etcd", "restart etcd"]);
    let env = std::fs::read_to_string(je.env_path()).unwrap();
    assert!(env.contains("ETCD_INITIAL_CLUSTER_STATE=new"), "{env}");
    assert!(je.tls("node.key").is_file() && je.pki("ca.key").is_file());
    // An agent of the plan gets a client certificate but no CA key, and runs no etcd.
    let (_jt, je, js, j) = joiner_side();
    let info = leader
        .admit(&me(), &j, Role::Agent, Admission::FromPlan(&p))
        .unwrap();
    let JoinInfo::Etcd(ej) = &info else { panic!() };
    assert!(ej.tls.ca_key.is_none());
    je.join(&node_b, Role::Agent, &info).unwrap();
    assert_eq!(*js.0.lock().unwrap(), vec!["stop etcd"]);
    assert!(!je.pki("ca.key").exists());
}

#[test]
fn a_certificate_for_another_key_or_no_request_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (leader, _, _) = with_ca(t.path());
    let p = plan();
    let (_jt, _je, _js, mut j) = joiner_side();
    let (_ot, oe, _, _) = joiner_side();
    let info = leader
        .admit(&me(), &j, Role::Server, Admission::FromPlan(&p))
        .unwrap();
    // oe made its own request: the certificate for j's key is not for it.
    let err = oe.join(&me(), Role::Server, &info).unwrap_err();
    assert!(err.to_string().contains("not for this node's key"), "{err}");
    j.csr = None;
    assert!(
        leader
            .admit(&me(), &j, Role::Server, Admission::FromPlan(&p))
            .is_err()
    );
    // A server without the CA cannot admit.
    let empty = tempfile::tempdir().unwrap();
    let (no_ca, _, _) = engine(empty.path(), |_| CmdOutput::success(""));
    let (_jt, _, _, j) = joiner_side();
    assert!(
        no_ca
            .admit(&me(), &j, Role::Server, Admission::FromPlan(&p))
            .is_err()
    );
}

#[test]
fn runtime_admission_removes_a_replaced_member_then_adds() {
    let t = tempfile::tempdir().unwrap();
    let (leader, runner, _) = with_ca(t.path());
    let (_jt, _, _, j) = joiner_side();
    let inst = InstanceId::generate();
    let replaced = member("old", "node-b", "10.0.0.7", Role::Server);
    let info = leader
        .admit(
            &me(),
            &j,
            Role::Server,
            Admission::Runtime {
                replaces: &[replaced],
                instance: &inst,
            },
        )
        .unwrap();
    assert_eq!(
        calls(&runner),
        vec![
            "member list -w json",
            "member remove ff",
            "member add node-b --peer-urls=https://10.0.0.2:2380"
        ]
    );
    let JoinInfo::Etcd(ej) = info else { panic!() };
    assert_eq!(ej.state, ClusterState::Existing);
    assert_eq!(ej.member_id, Some(0x1f));
}

#[test]
fn without_quorum_the_member_it_waits_for_is_let_back_in_from_the_local_list() {
    let t = tempfile::tempdir().unwrap();
    let (e, runner, _) = engine(t.path(), |a| {
        if a == "member list -w json" {
            CmdOutput::failure("Error: context deadline exceeded")
        } else if a == "member list -w json --consistency=s" {
            CmdOutput::success(LIST_AFTER_ADD)
        } else {
            panic!("no membership change without quorum: {a}")
        }
    });
    e.found(&me(), &plan()).unwrap();
    let (_jt, _, _, mut j) = joiner_side();
    j.hostname = host("c");
    j.addr = "10.0.0.3".parse().unwrap();
    let inst = InstanceId::generate();
    let info = e
        .admit(
            &me(),
            &j,
            Role::Server,
            Admission::Runtime {
                replaces: &[],
                instance: &inst,
            },
        )
        .unwrap();
    let JoinInfo::Etcd(ej) = info else { panic!() };
    assert!(ej.rejoin);
    assert_eq!(ej.member_id, Some(C_ID));
    assert_eq!(
        calls(&runner),
        vec!["member list -w json", "member list -w json --consistency=s"]
    );
    // Another node cannot be added without quorum: the error says why.
    let (_jt, _, _, d) = joiner_side();
    let err = e
        .admit(
            &me(),
            &d,
            Role::Server,
            Admission::Runtime {
                replaces: &[],
                instance: &inst,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("deadline exceeded"), "{err}");
}

#[test]
fn etcd_3_4_without_the_consistency_flag_lists_locally_anyway() {
    let t = tempfile::tempdir().unwrap();
    let (e, runner, _) = engine(t.path(), |a| {
        if a.contains("--consistency") {
            CmdOutput::failure("Error: unknown flag: --consistency")
        } else {
            CmdOutput::success(LIST)
        }
    });
    assert_eq!(e.list_local().unwrap().len(), 2);
    assert_eq!(calls(&runner).len(), 2);
}

/// A node root whose data dir holds a WAL written under env file `env`.
fn root_with_wal(
    member: Option<u64>,
    token: &InstanceId,
) -> (
    tempfile::TempDir,
    EtcdEngine,
    Arc<RecordingServices>,
    Joiner,
) {
    let (t, e, s, j) = joiner_side();
    let wal = e.data_dir().join("member/wal");
    std::fs::create_dir_all(&wal).unwrap();
    std::fs::write(wal.join("0000000000000000-0000000000000000.wal"), b"w").unwrap();
    let old = EtcdJoin {
        initial_cluster: vec![Peer {
            name: host("x"),
            addr: "10.0.0.9".parse().unwrap(),
        }],
        state: ClusterState::Existing,
        token: token.clone(),
        member_id: member,
        rejoin: false,
        tls: Bundle {
            ca_cert: String::new(),
            cert: String::new(),
            ca_key: None,
        },
    };
    e.write_env(&me(), &old, member).unwrap();
    (t, e, s, j)
}

fn signed_for(j: &Joiner, mut ej: EtcdJoin) -> JoinInfo {
    let t = tempfile::tempdir().unwrap();
    let (leader, _, _) = with_ca(t.path());
    let JoinInfo::Etcd(x) = leader
        .admit(&me(), j, Role::Server, Admission::FromPlan(&plan()))
        .unwrap()
    else {
        panic!()
    };
    ej.tls = x.tls;
    JoinInfo::Etcd(ej)
}

fn rejoin_info(member: u64, token: &InstanceId) -> EtcdJoin {
    EtcdJoin {
        initial_cluster: vec![
            Peer {
                name: host("node-a"),
                addr: "10.0.0.1".parse().unwrap(),
            },
            Peer {
                name: host("node-b"),
                addr: "10.0.0.2".parse().unwrap(),
            },
        ],
        state: ClusterState::Existing,
        token: token.clone(),
        member_id: Some(member),
        rejoin: true,
        tls: Bundle {
            ca_cert: String::new(),
            cert: String::new(),
            ca_key: None,
        },
    }
}

#[test]
fn a_rejoin_restarts_on_the_wal_of_the_same_member_and_wipes_anything_else() {
    let tok = InstanceId::generate();
    // Same member, WAL there: etcd restarts on it, nothing is removed.
    let (_t, e, services, j) = root_with_wal(Some(0xabc), &tok);
    e.join(
        &me(),
        Role::Server,
        &signed_for(&j, rejoin_info(0xabc, &tok)),
    )
    .unwrap();
    assert!(e.has_wal(), "the WAL of the interrupted join is kept");
    assert_eq!(*services.0.lock().unwrap(), vec!["restart etcd"]);
    assert_eq!(e.env_member(), Some(0xabc));

    // The WAL belongs to another member (an older admission): wiped, then started.
    let (_t, e, services, j) = root_with_wal(Some(0xdef), &tok);
    e.join(
        &me(),
        Role::Server,
        &signed_for(&j, rejoin_info(0xabc, &tok)),
    )
    .unwrap();
    assert!(!e.has_wal());
    assert_eq!(
        *services.0.lock().unwrap(),
        vec!["stop etcd", "restart etcd"]
    );

    // A fresh admission (not a rejoin) always starts on an empty data dir.
    let (_t, e, _, j) = root_with_wal(Some(0xabc), &tok);
    let mut fresh = rejoin_info(0xabc, &tok);
    fresh.rejoin = false;
    e.join(&me(), Role::Server, &signed_for(&j, fresh)).unwrap();
    assert!(!e.has_wal());
}

#[test]
fn a_plan_member_restarted_mid_bootstrap_keeps_its_data_dir_only_for_the_same_cluster() {
    let tok = InstanceId::generate();
    let mut new = rejoin_info(0, &tok);
    new.state = ClusterState::New;
    new.member_id = None;
    new.rejoin = false;
    let (_t, e, services, j) = root_with_wal(None, &tok);
    e.join(&me(), Role::Server, &signed_for(&j, new.clone()))
        .unwrap();
    assert!(e.has_wal());
    assert_eq!(*services.0.lock().unwrap(), vec!["restart etcd"]);
    // A WAL of another cluster instance is wiped.
    let (_t, e, _, j) = root_with_wal(None, &InstanceId::generate());
    e.join(&me(), Role::Server, &signed_for(&j, new)).unwrap();
    assert!(!e.has_wal());
}

#[test]
fn a_rejoin_whose_old_data_dir_does_not_come_up_starts_over_empty() {
    let tok = InstanceId::generate();
    let (_t, mut e, services, j) = root_with_wal(Some(0xabc), &tok);
    let svc = services.clone();
    e.runner = Arc::new(FakeRunner::new(move |c| {
        let restarts = svc
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("restart"))
            .count();
        if ctl_args(c).starts_with("endpoint health") && restarts < 2 {
            CmdOutput::failure("unhealthy")
        } else {
            CmdOutput::success("")
        }
    }));
    e.join(
        &me(),
        Role::Server,
        &signed_for(&j, rejoin_info(0xabc, &tok)),
    )
    .unwrap();
    assert!(!e.has_wal(), "the broken data dir is gone");
    assert_eq!(
        *services.0.lock().unwrap(),
        vec!["restart etcd", "stop etcd", "restart etcd"]
    );
}

#[test]
fn a_server_resumes_only_on_the_member_settings_clutch_wrote() {
    let d = tempfile::tempdir().unwrap();
    let (e, _r, s) = engine(d.path(), |_| CmdOutput::success(""));
    std::fs::create_dir_all(e.env_path().parent().unwrap()).unwrap();
    std::fs::write(
        e.env_path(),
        "ETCD_NAME=node-a\nETCD_INITIAL_CLUSTER_TOKEN=clutch-0123\n",
    )
    .unwrap();
    e.resume(&me(), Role::Server).unwrap();
    assert_eq!(*s.0.lock().unwrap(), ["restart etcd"]);
    // A root slot with Debian's packaged /etc/default/etcd: etcd is not started on it.
    std::fs::write(e.env_path(), "# ETCD_NAME=\"default\"\n").unwrap();
    s.0.lock().unwrap().clear();
    let err = e.resume(&me(), Role::Server).unwrap_err().to_string();
    assert!(
        err.contains("/etc/default/etcd") && err.contains("member settings"),
        "{err}"
    );
    assert!(s.0.lock().unwrap().is_empty());
    // Agents run no member: nothing to check.
    e.resume(&me(), Role::Agent).unwrap();
}
