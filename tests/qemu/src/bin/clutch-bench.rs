//! `scripts/bench`: measures what issue 8 asks for and writes a Markdown table.
//!
//!   clutch-bench [--out bench/results.md] [--no-cold]
//!
//! - cold build: a fresh, empty cache (root filesystem from mmdebstrap)
//! - warm build: the same cache, `[user]` changed
//! - image sizes: raw apparent and on disk, qcow2, zst
//! - first boot under QEMU/TCG (SeaBIOS): power-on to `clutch: phase=ready` and to `login:`;
//!   firstboot's peak memory and CPU time from systemd's accounting
//!
//! It is a benchmark, not a test: it reports numbers and asserts nothing about them.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clutch_qemu_tests::*;

struct Row {
    what: String,
    value: String,
}

fn build(config: &Path, cache: &Path, formats: &str) -> Result<(PathBuf, f64)> {
    let out = artifacts().join("bench").join(config.file_stem().unwrap());
    let _ = std::fs::remove_dir_all(&out);
    let t = Instant::now();
    let o =
        build_command_in(cache, config, &out, formats, Some(&bin("clutch-firstboot"))).output()?;
    if !o.status.success() {
        bail!("build failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let secs = t.elapsed().as_secs_f64();
    let img = String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .context("no output")?
        .to_string();
    Ok((img.into(), secs))
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / 1048576.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out_md = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("bench/results.md"));
    let cold = !args.iter().any(|a| a == "--no-cold");
    let mut rows = Vec::new();
    let mut row = |what: &str, value: String| {
        eprintln!("bench: {what}: {value}");
        rows.push(Row {
            what: what.into(),
            value,
        });
    };

    let cfg = test_config("amd64-vm", "bench-vm", |t| t);
    if cold {
        let fresh = tempfile::tempdir_in(artifacts())?;
        let (_, secs) = build(&cfg, fresh.path(), "raw")?;
        row(
            "amd64 cold build (empty cache, raw)",
            format!("{secs:.1} s"),
        );
    }
    let cache = cache_dir();
    build(&cfg, &cache, "raw")?; // make sure the shared cache is warm
    let cfg2 = test_config("amd64-vm", "bench-vm-user", |t| {
        t.replace("name = \"admin\"", "name = \"bench\"")
    });
    let (_, warm) = build(&cfg2, &cache, "raw,qcow2,zst")?;
    row(
        "amd64 warm build ([user] changed, raw+qcow2+zst)",
        format!("{warm:.1} s"),
    );
    let (img, warm_raw) = build(&cfg, &cache, "raw")?;
    row("amd64 warm build (raw only)", format!("{warm_raw:.1} s"));
    let m = std::fs::metadata(&img)?;
    row("raw image, apparent size", mib(m.len()));
    row("raw image, allocated on disk", mib(m.blocks() * 512));
    let dir2 = artifacts().join("bench/bench-vm-user");
    for (ext, what) in [("qcow2", "qcow2 image"), ("img.zst", "zst image")] {
        if let Ok(m) = std::fs::metadata(dir2.join(format!("bench-vm-user.{ext}"))) {
            row(what, mib(m.len()));
        }
    }

    // First boot.
    let _one = serial_lock();
    let disk = overlay(&img, "bench-boot", Some("4G"))?;
    let port = free_port();
    let t0 = Instant::now();
    let mut vm = Vm::start(VmOpts {
        name: "bench-boot".into(),
        disk,
        format: "qcow2",
        firmware: Firmware::Bios,
        memory_mib: 1024,
        extra: user_net_with_ssh(port),
    })?;
    vm.wait_for("clutch: phase=ready", Duration::from_secs(600))?;
    row(
        "first boot: power-on to phase=ready (TCG, SeaBIOS)",
        format!("{:.1} s", t0.elapsed().as_secs_f64()),
    );
    vm.wait_for("login:", Duration::from_secs(600))?;
    row(
        "first boot: power-on to login prompt (TCG)",
        format!("{:.1} s", t0.elapsed().as_secs_f64()),
    );
    let show = ssh(
        port,
        "systemctl show clutch-firstboot -p MemoryPeak -p CPUUsageNSec -p ExecMainStartTimestampMonotonic -p ActiveEnterTimestampMonotonic",
        Duration::from_secs(300),
    )?;
    let get = |k: &str| -> Option<u64> {
        show.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.trim().parse().ok())
    };
    if let Some(p) = get("MemoryPeak") {
        row("clutch-firstboot peak memory (cgroup MemoryPeak)", mib(p));
    }
    if let Some(c) = get("CPUUsageNSec") {
        row(
            "clutch-firstboot CPU time (TCG guest)",
            format!("{:.2} s", c as f64 / 1e9),
        );
    }
    if let (Some(a), Some(b)) = (
        get("ExecMainStartTimestampMonotonic"),
        get("ActiveEnterTimestampMonotonic"),
    ) {
        row(
            "unit start to READY (node setup, TCG guest)",
            format!("{:.2} s", b.saturating_sub(a) as f64 / 1e6),
        );
    }
    drop(vm);

    let mut md = String::new();
    writeln!(md, "# clutch benchmarks\n")?;
    writeln!(
        md,
        "Reproduce: `bash scripts/bench` (root; host packages from scripts/install-host-deps)."
    )?;
    writeln!(
        md,
        "Machine: {} cores, QEMU TCG (no KVM). Written {}.\n",
        num_cpus(),
        now()
    )?;
    writeln!(md, "| measurement | value |\n|---|---|")?;
    for r in &rows {
        writeln!(md, "| {} | {} |", r.what, r.value)?;
    }
    if let Some(d) = out_md.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out_md, &md)?;
    print!("{md}");
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn now() -> String {
    let o = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
