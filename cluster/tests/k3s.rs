//! k3s engine at the command and file level (no k3s binary can be had where this runs):
//! generated files against golden files (tests/golden/k3s/), and the engine flow — the
//! leader founds with `--cluster-init`, agents get only the agent token, further servers
//! get the server token and the secrets so any of them can admit — with fake services and
//! a fake k3s. `UPDATE_GOLDEN=1` rewrites the golden files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clutch_cluster::engine::k3s::{self, K3sMode, ServerSecrets};
use clutch_cluster::engine::{Admission, Engine, JoinInfo, Joiner, LocalNode};
use clutch_cluster::secret::Secret;
use clutch_cluster::sys::{CmdOutput, CommandRunner, ServiceManager};
use clutch_cluster::wire::MemberInfo;
use clutch_cluster::{Identity, InstanceId, K3sEngine, Role};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/k3s")
}

fn check_golden(name: &str, actual: &str) {
    let p = golden_dir().join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&p, actual).unwrap();
    }
    let want = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(actual, want, "{name} differs from golden file");
}

fn node(id: &str, host: &str, ip: &str) -> LocalNode {
    LocalNode {
        node_id: id.parse().unwrap(),
        hostname: host.try_into().unwrap(),
        addr: ip.parse().unwrap(),
        cluster_name: "lab".into(),
    }
}

const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn secrets() -> ServerSecrets {
    ServerSecrets {
        secret: Secret::new("s3cret".into()),
        agent_secret: Secret::new("ag3nt".into()),
    }
}

#[derive(Default)]
struct Services(Mutex<Vec<String>>);
impl ServiceManager for Services {
    fn restart(&self, unit: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("restart {unit}"));
        Ok(())
    }
    fn stop(&self, unit: &str) -> Result<(), String> {
        self.0.lock().unwrap().push(format!("stop {unit}"));
        Ok(())
    }
}

/// Pretends to be k3s: once "started", writes the CA and kubeconfig like k3s would, and
/// reports healthy.
struct Runner {
    root: PathBuf,
    calls: Mutex<Vec<String>>,
}
impl CommandRunner for Runner {
    fn run(
        &self,
        program: &str,
        args: &[String],
        _env: &[(String, String)],
    ) -> std::io::Result<CmdOutput> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{program} {}", args.join(" ")));
        let ca = clutch_cluster::sys::under(&self.root, k3s::SERVER_CA);
        std::fs::create_dir_all(ca.parent().unwrap())?;
        std::fs::write(&ca, CA)?;
        std::fs::write(
            clutch_cluster::sys::under(&self.root, k3s::KUBECONFIG),
            "apiVersion: v1\n",
        )?;
        Ok(CmdOutput::success(""))
    }
}

#[test]
fn rendered_files_match_golden() {
    let a = node("aa", "node-a", "10.0.0.1");
    let b = node("bb", "node-b", "10.0.0.2");
    let c = node("cc", "node-c", "10.0.0.3");
    let init = K3sMode::Init { secrets: secrets() };
    let srv = K3sMode::Server {
        server_url: "https://10.0.0.1:6443".into(),
        token: k3s::secure_token(CA, "server", "s3cret"),
        agent_secret: Secret::new("ag3nt".into()),
    };
    let agent = K3sMode::Agent {
        server_url: "https://10.0.0.1:6443".into(),
        token: k3s::secure_token(CA, "node", "ag3nt"),
    };
    check_golden("init-config.yaml", &k3s::render_config(&a, &init));
    check_golden("server-config.yaml", &k3s::render_config(&b, &srv));
    check_golden("agent-config.yaml", &k3s::render_config(&c, &agent));
    check_golden("server.service", &k3s::render_unit(&init));
    check_golden("agent.service", &k3s::render_unit(&agent));
}

#[test]
fn secure_token_formats() {
    let t = k3s::secure_token(CA, "server", "s3cret");
    let t = t.expose();
    assert!(t.starts_with("K10"));
    let (hash, rest) = t[3..].split_once("::").unwrap();
    assert_eq!(hash.len(), 64);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(rest, "server:s3cret");
    let a = k3s::secure_token(CA, "node", "ag3nt");
    assert!(a.expose().ends_with("::node:ag3nt"));
    assert!(
        !format!("{a:?}").contains("ag3nt"),
        "tokens are never printed"
    );
    assert_eq!(k3s::api_name("lab"), "lab-api.local");
}

fn uid_gid() -> (String, String) {
    let id = |f: &str| {
        String::from_utf8(
            std::process::Command::new("id")
                .arg(f)
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string()
    };
    (id("-u"), id("-g"))
}

fn member(n: &LocalNode) -> MemberInfo {
    MemberInfo {
        node_id: n.node_id.clone(),
        hostname: n.hostname.clone(),
        role: Role::None,
        addr: n.addr,
        key: Identity::generate().public(),
    }
}

fn engine_at(root: &Path, admin: Option<&str>) -> (K3sEngine, Arc<Services>) {
    let services = Arc::new(Services::default());
    let runner = Arc::new(Runner {
        root: root.to_path_buf(),
        calls: Mutex::new(vec![]),
    });
    let e = K3sEngine::new(
        root.to_path_buf(),
        services.clone(),
        runner,
        admin.map(str::to_string),
    );
    (e, services)
}

fn joiner(n: &LocalNode) -> Joiner {
    Joiner {
        node_id: n.node_id.clone(),
        hostname: n.hostname.clone(),
        addr: n.addr,
        csr: None,
    }
}

fn read(root: &Path, abs: &str) -> String {
    std::fs::read_to_string(clutch_cluster::sys::under(root, abs)).unwrap()
}

#[test]
fn the_leader_founds_agents_get_agent_tokens_and_servers_get_the_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node("aa", "node-a", "10.0.0.1"),
        node("bb", "node-b", "10.0.0.2"),
        node("cc", "node-c", "10.0.0.3"),
    );
    let first = tmp.path().join("first");
    let (uid, gid) = uid_gid();
    std::fs::create_dir_all(first.join("etc")).unwrap();
    std::fs::create_dir_all(first.join("home/admin")).unwrap();
    std::fs::write(
        first.join("etc/passwd"),
        format!("admin:x:{uid}:{gid}::/home/admin:/bin/sh\n"),
    )
    .unwrap();
    let plan = clutch_cluster::election::plan(
        InstanceId::generate(),
        a.node_id.clone(),
        vec![member(&a), member(&b), member(&c)],
        2,
    );
    let (leader, services) = engine_at(&first, Some("admin"));
    leader.found(&a, &plan).unwrap();
    let info = leader
        .admit(&a, &joiner(&a), Role::Server, Admission::FromPlan(&plan))
        .unwrap();
    let JoinInfo::K3s(j) = &info else { panic!() };
    assert!(j.init && j.token.is_none());
    leader.join(&a, Role::Server, &info).unwrap();
    let cfg = read(&first, k3s::CONFIG);
    assert!(cfg.contains("cluster-init: true"), "{cfg}");
    assert!(cfg.contains("agent-token: "), "{cfg}");
    assert_eq!(services.0.lock().unwrap().as_slice(), ["restart k3s"]);
    assert_eq!(
        std::fs::read_to_string(first.join("home/admin/.kube/config")).unwrap(),
        "apiVersion: v1\n",
        "kubeconfig left for the admin user"
    );
    let secret = read(&first, k3s::SECRET_FILE);
    let agent_secret = read(&first, k3s::AGENT_SECRET_FILE);
    assert_ne!(secret, agent_secret);
    assert_eq!(secret.len(), 64, "256-bit secrets");

    // An agent of the plan: the agent token only.
    let ai = leader
        .admit(&a, &joiner(&c), Role::Agent, Admission::FromPlan(&plan))
        .unwrap();
    let JoinInfo::K3s(aj) = &ai else { panic!() };
    assert!(aj.secrets.is_none(), "agents never get the server secrets");
    let at = aj.token.as_ref().unwrap().expose().to_string();
    assert!(at.ends_with(&format!("::node:{agent_secret}")), "{at}");
    let croot = tmp.path().join("c");
    let (ce, _) = engine_at(&croot, None);
    ce.join(&c, Role::Agent, &ai).unwrap();
    let ccfg = read(&croot, k3s::CONFIG);
    assert!(
        !ccfg.contains(&secret),
        "the server secret reached an agent:\n{ccfg}"
    );
    assert!(!croot.join("var/lib/clutch/k3s-secret").exists());
    check_golden_shape("agent", &read(&croot, k3s::UNIT_FILE));

    // A further server joins at runtime: server token and both secrets, so it can admit.
    let inst = InstanceId::generate();
    let si = leader
        .admit(
            &a,
            &joiner(&b),
            Role::Server,
            Admission::Runtime {
                replaces: &[],
                instance: &inst,
            },
        )
        .unwrap();
    let broot = tmp.path().join("b");
    let (be, _) = engine_at(&broot, None);
    be.join(&b, Role::Server, &si).unwrap();
    let bcfg = read(&broot, k3s::CONFIG);
    assert!(bcfg.contains("::server:"), "{bcfg}");
    assert!(
        bcfg.contains(&format!("agent-token: \"{agent_secret}\"")),
        "{bcfg}"
    );
    check_golden_shape("server", &read(&broot, k3s::UNIT_FILE));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(clutch_cluster::sys::under(&broot, k3s::CONFIG))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "config holds the token");
    // ...and b, not only the leader, admits the next agent with the same agent secret.
    let d = node("dd", "node-d", "10.0.0.4");
    let di = be
        .admit(
            &b,
            &joiner(&d),
            Role::Agent,
            Admission::Runtime {
                replaces: &[],
                instance: &inst,
            },
        )
        .unwrap();
    let JoinInfo::K3s(dj) = di else { panic!() };
    assert!(
        dj.token
            .unwrap()
            .expose()
            .ends_with(&format!("::node:{agent_secret}"))
    );
    assert_eq!(dj.server, b.addr);
}

fn check_golden_shape(kind: &str, unit: &str) {
    assert!(unit.contains(&format!("k3s {kind} --config")), "{unit}");
}

#[test]
fn a_kubeconfig_link_planted_in_the_home_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("r");
    let (uid, gid) = uid_gid();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("home/admin")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        format!("admin:x:{uid}:{gid}::/home/admin:/bin/sh\n"),
    )
    .unwrap();
    std::fs::write(root.join("etc/shadow"), "root's secrets\n").unwrap();
    std::os::unix::fs::symlink(root.join("etc"), root.join("home/admin/.kube")).unwrap();
    std::fs::create_dir_all(clutch_cluster::sys::under(&root, "/etc/rancher/k3s")).unwrap();
    std::fs::write(clutch_cluster::sys::under(&root, k3s::KUBECONFIG), "k").unwrap();
    let (e, _) = engine_at(&root, Some("admin"));
    assert!(e.install_kubeconfig().is_err());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/shadow")).unwrap(),
        "root's secrets\n"
    );
    assert!(!root.join("etc/config").exists());
}
