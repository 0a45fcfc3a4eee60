//! The amd64 VM image boots to a login prompt under SeaBIOS, with clutch-firstboot started
//! by systemd (its console line seen). The login prompt under OVMF is the first boot of
//! the update test (update.rs), so CI boots once less.

use std::time::Duration;

use clutch_qemu_tests::*;

const BOOT: Duration = Duration::from_secs(300);

fn image() -> std::path::PathBuf {
    static IMG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let cfg = test_config("amd64-vm", "amd64-vm", |t| t);
        build_image(&cfg, "raw").expect("build amd64-vm")
    })
    .clone()
}

fn boots_to_login(firmware: Firmware) {
    let _one = serial_lock();
    let img = image();
    let name = format!("boot-{firmware:?}").to_lowercase();
    let disk = overlay(&img, &name, None).unwrap();
    let mut vm = Vm::start(VmOpts {
        name,
        disk,
        format: "qcow2",
        firmware,
        memory_mib: 1024,
        extra: vec!["-nic".into(), "none".into()],
    })
    .unwrap();
    let t = std::time::Instant::now();
    vm.wait_for("clutch: phase=", BOOT).unwrap();
    vm.wait_for("login:", BOOT).unwrap();
    eprintln!(
        "{firmware:?}: login prompt after {:.0}s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn boots_under_seabios() {
    boots_to_login(Firmware::Bios);
}
