//! k3s engine: generated files against golden files (tests/golden/k3s/), and the engine
//! flow (bootstrap, admit with the secure K10 token, join as server and agent) with fake
//! services and commands. `UPDATE_GOLDEN=1` rewrites the golden files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clutch_cluster::engine::k3s::{self, K3sMode};
use clutch_cluster::engine::{Engine, Joiner, LocalNode};
use clutch_cluster::sys::{CmdOutput, CommandRunner, ServiceManager};
use clutch_cluster::{K3sEngine, Role};

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

fn node(host: &str, ip: &str) -> LocalNode {
    LocalNode {
        node_id: "aa".parse().unwrap(),
        hostname: host.into(),
        addr: ip.parse().unwrap(),
        cluster_name: "lab".into(),
        cluster_id: "0123456789abcdef0123456789abcdef".into(),
    }
}

const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

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
        Ok(CmdOutput {
            code: 0,
            ..Default::default()
        })
    }
}

#[test]
fn rendered_files_match_golden() {
    let a = node("node-a", "10.0.0.1");
    let b = node("node-b", "10.0.0.2");
    let c = node("node-c", "10.0.0.3");
    let token = k3s::secure_token(CA, "s3cret");
    let init = K3sMode::Init {
        secret: "s3cret".into(),
    };
    let srv = K3sMode::Server {
        server_url: "https://10.0.0.1:6443".into(),
        token: token.clone(),
    };
    let agent = K3sMode::Agent {
        server_url: "https://10.0.0.1:6443".into(),
        token,
    };
    check_golden("init-config.yaml", &k3s::render_config(&a, &init));
    check_golden("server-config.yaml", &k3s::render_config(&b, &srv));
    check_golden("agent-config.yaml", &k3s::render_config(&c, &agent));
    check_golden("server.service", &k3s::render_unit(&init));
    check_golden("agent.service", &k3s::render_unit(&agent));
}

#[test]
fn secure_token_format() {
    let t = k3s::secure_token(CA, "s3cret");
    assert!(t.starts_with("K10"));
    let (hash, rest) = t[3..].split_once("::").unwrap();
    assert_eq!(hash.len(), 64);
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(rest, "server:s3cret");
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

#[test]
fn engine_bootstrap_admit_and_join() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let (uid, gid) = uid_gid();
    std::fs::create_dir_all(first.join("etc")).unwrap();
    std::fs::write(
        first.join("etc/passwd"),
        format!("admin:x:{uid}:{gid}::/home/admin:/bin/sh\n"),
    )
    .unwrap();
    // fixed secret so the generated config is deterministic
    let secret_file = clutch_cluster::sys::under(&first, k3s::SECRET_FILE);
    std::fs::create_dir_all(secret_file.parent().unwrap()).unwrap();
    std::fs::write(&secret_file, "s3cret\n").unwrap();

    let services = Arc::new(Services::default());
    let runner = Arc::new(Runner {
        root: first.clone(),
        calls: Mutex::new(vec![]),
    });
    let e = K3sEngine::new(
        first.clone(),
        services.clone(),
        runner.clone(),
        Some("admin".into()),
    );
    let a = node("node-a", "10.0.0.1");
    e.bootstrap(&a).unwrap();
    let cfg = std::fs::read_to_string(clutch_cluster::sys::under(&first, k3s::CONFIG)).unwrap();
    check_golden("init-config.yaml", &cfg);
    assert_eq!(services.0.lock().unwrap().as_slice(), ["restart k3s"]);
    assert!(runner.calls.lock().unwrap()[0].ends_with("kubectl get --raw /readyz"));
    assert_eq!(
        std::fs::read_to_string(first.join("home/admin/.kube/config")).unwrap(),
        "apiVersion: v1\n",
        "kubeconfig left for the admin user"
    );

    let joiner = Joiner {
        node_id: "bb".parse().unwrap(),
        hostname: "node-b".into(),
        addr: "10.0.0.2".parse().unwrap(),
    };
    let info = e.admit(&a, &joiner, Role::Server, &[]).unwrap();
    assert_eq!(info["server_url"], "https://10.0.0.1:6443");
    assert_eq!(info["token"], k3s::secure_token(CA, "s3cret"));

    for (host, ip, role, golden) in [
        ("node-b", "10.0.0.2", Role::Server, "server-config.yaml"),
        ("node-c", "10.0.0.3", Role::Agent, "agent-config.yaml"),
    ] {
        let root = tmp.path().join(host);
        let services = Arc::new(Services::default());
        let runner = Arc::new(Runner {
            root: root.clone(),
            calls: Mutex::new(vec![]),
        });
        let e = K3sEngine::new(root.clone(), services.clone(), runner, None);
        e.join(&node(host, ip), role, &info).unwrap();
        check_golden(
            golden,
            &std::fs::read_to_string(clutch_cluster::sys::under(&root, k3s::CONFIG)).unwrap(),
        );
        let unit =
            std::fs::read_to_string(clutch_cluster::sys::under(&root, k3s::UNIT_FILE)).unwrap();
        let want = if role == Role::Agent {
            "agent.service"
        } else {
            "server.service"
        };
        check_golden(want, &unit);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(clutch_cluster::sys::under(&root, k3s::CONFIG))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "config holds the token");
    }
}
