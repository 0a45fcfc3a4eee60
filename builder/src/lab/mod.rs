//! `clutch lab`: N QEMU VMs booted from one built amd64 image, on a private L2 segment inside
//! a network namespace made for the lab; used by people, by CI pipelines (`up --wait ready`,
//! `exec`, `status --json`) and by the boot tests in tests/qemu, which drive it as a library.
//!
//! Layout (all inside the namespace `clutch-lab-<hash of DIR>`, nothing outside it):
//! a bridge `br0` with 10.77.0.1/24, one tap `tapI` per VM enslaved to it, a dnsmasq that
//! only answers DHCP (no DNS, no router, no name server) and hands each VM's MAC a fixed
//! address 10.77.0.(11+I), and the QEMU processes (KVM when it works, else TCG; `-machine
//! pc`, one vCPU), started with `ip netns exec`, daemonised with pidfiles. Each VM boots a
//! qcow2 overlay of the image (the image stays untouched); serial consoles go to
//! `DIR/nodeI.console.log`.
//!
//! Why DHCP and not the link-local fallback: fixed, known addresses let `status` print them
//! and let people (and the tests) reach nodes from the namespace right away; IPv4 link-local
//! only starts after networkd's DHCP attempts time out and picks random addresses. The
//! bare-switch path is covered by the cluster crate's namespace tests.
//!
//! - [`plan`]: the lab as data (lab.json) and the network/disk commands;
//! - [`vm`]: QEMU (accelerator probe, command lines), shared with tests/qemu;
//! - [`access`]: the node-access channel (an ephemeral key through systemd credentials);
//! - [`console`]: reading phase lines from console logs;
//! - [`status`]: one row per node, from status.json or the console;
//! - [`wait`]: `up --wait PHASE`;
//! - [`fresh`]: `up --build`'s "is the image stale";
//! - [`host`]: the side effects, behind a trait; [`ops`]: carrying the plan out.

pub mod access;
pub mod console;
pub mod fresh;
pub mod host;
pub mod ops;
pub mod plan;
pub mod status;
pub mod vm;
pub mod wait;

pub use host::{Host, RealHost};
pub use plan::{LabState, NodeIndex, NodeSpec};

#[cfg(test)]
mod golden {
    //! The whole plan of a fixed lab as text, compared with `tests/golden/lab-plan.txt`
    //! (`UPDATE_GOLDEN=1` rewrites it): every command `up` and `down` run, and what each VM
    //! is given.
    use std::path::Path;

    use super::access::{self, SshOpts};
    use super::plan::{self, argv};
    use super::vm::{self, Accel};

    fn plan_text() -> String {
        let s = plan::plan(
            Path::new("/srv/lab"),
            Path::new("/srv/out/lab.img"),
            2,
            768,
            Accel::Tcg,
        )
        .unwrap();
        let creds = s.access.credential_files();
        let creds: Vec<&Path> = creds.iter().map(|p| p.as_path()).collect();
        let mut cmds = access::keygen_cmds(&s.access);
        cmds.extend(plan::setup_cmds(&s));
        cmds.push(plan::dnsmasq_cmd(&s));
        for n in &s.nodes {
            cmds.push(plan::overlay_cmd(
                &s,
                n,
                plan::overlay_size(&s.image, 1 << 30),
            ));
        }
        for n in &s.nodes {
            cmds.push(vm::qemu_cmd(&s, n, &creds));
        }
        cmds.push(access::ssh_cmd(
            &s,
            &s.nodes[1],
            &argv(&["etcdctl", "member", "list"]),
            SshOpts::default(),
        ));
        cmds.extend(plan::teardown_cmds(Some(&s), &s.namespace));
        let mut t = String::from("# commands\n");
        for c in cmds {
            t += &c.join(" ");
            t.push('\n');
        }
        t += "# credentials\n";
        for c in access::credentials("ssh-ed25519 AAAACLIENT clutch-lab-client", "HOST KEY\n") {
            t += &format!("## {}\n{}", c.name, String::from_utf8_lossy(&c.value));
        }
        t
    }

    #[test]
    fn the_lab_plan_matches_the_golden_file() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/lab-plan.txt");
        let actual = plan_text();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &actual).unwrap();
        }
        let want = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", p.display()));
        assert_eq!(
            actual,
            want,
            "{} differs (UPDATE_GOLDEN=1 rewrites it)",
            p.display()
        );
    }
}
