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
