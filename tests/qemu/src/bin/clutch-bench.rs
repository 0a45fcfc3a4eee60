//! `scripts/bench`: measures what issue 8 asks for and writes a Markdown table.
//!
//!   clutch-bench [--out bench/results.md] [--no-cold] [--no-lab] [--lab-only]
//!                [--no-arm64] [--arm64-only] [--arm64-cold]
//!
//! - cold build: a fresh, empty cache (root filesystem from mmdebstrap)
//! - warm build: the same cache, `[user]` changed
//! - image sizes: raw apparent and on disk, qcow2, zst
//! - first boot under QEMU/TCG (SeaBIOS): power-on to `clutch: phase=ready` and to `login:`;
//!   firstboot's peak memory and CPU time from systemd's accounting
//! - the Raspberry Pi boards (arm64, built under emulation): warm builds of rpi4 and rpi3
//!   (which share one root filesystem) and the rpi4 image sizes; with `--arm64-cold` also a
//!   cold rpi4 build from an empty cache (root filesystem under qemu-user, the aarch64
//!   clutch-firstboot cross-built alongside; about a quarter of an hour)
//! - the 3-node etcd lab (`clutch lab up`, image-configs/amd64-lab.toml): the last VM's
//!   power-on to `phase=ready` on all three, each node's phase times, and per node
//!   clutch-firstboot's peak memory (cgroup MemoryPeak and the daemon's VmHWM) and CPU time
//!
//! It is a benchmark, not a test: it reports numbers and asserts nothing about them.
//! Rows it did not measure this time (`--lab-only`, `--no-lab`, `--no-cold`) are kept from
//! the existing results file, and so is everything after its first table.

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
    build_with(config, cache, formats, Some(&bin("clutch-firstboot")))
}

/// `firstboot`: `None` lets clutch cross-build it (foreign boards).
fn build_with(
    config: &Path,
    cache: &Path,
    formats: &str,
    firstboot: Option<&Path>,
) -> Result<(PathBuf, f64)> {
    let out = artifacts().join("bench").join(config.file_stem().unwrap());
    let _ = std::fs::remove_dir_all(&out);
    let t = Instant::now();
    let o = build_command_in(cache, config, &out, formats, firstboot).output()?;
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
    let flag = |f: &str| args.iter().any(|a| a == f);
    let lab_only = flag("--lab-only");
    let arm64_only = flag("--arm64-only");
    let cold = !flag("--no-cold") && !lab_only && !arm64_only;
    let with_lab = !flag("--no-lab") && !arm64_only;
    let with_arm64 = !flag("--no-arm64") && !lab_only;
    let mut rows = Vec::new();
    let mut row = |what: &str, value: String| {
        eprintln!("bench: {what}: {value}");
        rows.push(Row {
            what: what.into(),
            value,
        });
    };
    if !lab_only && !arm64_only {
        single_vm(cold, &mut row)?;
    }
    if with_arm64 {
        arm64(flag("--arm64-cold"), &mut row)?;
    }
    if with_lab {
        lab_run(&mut row)?;
    }
    write_results(&out_md, rows)
}

/// The image config `base` with its `[user]` renamed: what a warm build changes.
fn user_changed(base: &str, name: &str) -> PathBuf {
    test_config(base, name, |t| {
        let edited = t.replace("name = \"admin\"", "name = \"bench\"");
        assert_ne!(edited, t, "image-configs/{base}.toml has no user `admin`");
        edited
    })
}

/// Builds the Raspberry Pi images (arm64 root filesystem under emulation).
fn arm64(cold: bool, row: &mut dyn FnMut(&str, String)) -> Result<()> {
    let rpi4 = test_config("rpi4", "bench-rpi4", |t| t);
    if cold {
        let fresh = tempfile::tempdir_in(artifacts())?;
        let (_, secs) = build_with(&rpi4, fresh.path(), "raw,zst", None)?;
        row(
            "rpi4 cold build (empty cache: arm64 rootfs under qemu-user, firstboot cross-built alongside; raw+zst)",
            format!("{:.1} min", secs / 60.0),
        );
    }
    let cache = cache_dir();
    build_with(&rpi4, &cache, "raw,zst", None)?; // make sure the shared cache is warm
    let rpi4_user = user_changed("rpi4", "bench-rpi4-user");
    let (img, warm) = build_with(&rpi4_user, &cache, "raw,zst", None)?;
    row(
        "rpi4 warm build ([user] changed, raw+zst)",
        format!("{warm:.1} s"),
    );
    let m = std::fs::metadata(&img)?;
    row("rpi4 raw image, apparent size", mib(m.len()));
    row("rpi4 raw image, allocated on disk", mib(m.blocks() * 512));
    if let Ok(z) = std::fs::metadata(img.with_extension("img.zst")) {
        row("rpi4 zst image", mib(z.len()));
    }
    let rpi3 = test_config("rpi4", "bench-rpi3", |t| {
        t.replace("board = \"rpi4\"", "board = \"rpi3\"")
    });
    let (_, warm3) = build_with(&rpi3, &cache, "raw,zst", None)?;
    row(
        "rpi3 warm build (shares rpi4's root filesystem; raw+zst)",
        format!("{warm3:.1} s"),
    );
    Ok(())
}

/// Builds and boots the single-VM image (amd64-vm).
fn single_vm(cold: bool, row: &mut dyn FnMut(&str, String)) -> Result<()> {
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
    let cfg2 = user_changed("amd64-vm", "bench-vm-user");
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
    Ok(())
}

/// The 3-node lab, as `clutch lab up` runs it: formation time, phase times, and
/// clutch-firstboot's memory and CPU on every node.
fn lab_run(row: &mut dyn FnMut(&str, String)) -> Result<()> {
    use clutch_qemu_tests::lab::{Lab, PhaseWatch, field, firstboot_usage};
    let cfg = test_config("amd64-lab", "bench-lab", |t| t);
    let (img, _) = build(&cfg, &cache_dir(), "raw")?;
    let _one = serial_lock();
    let lab = Lab::up(&img, &artifacts().join("bench/lab"), 3)?;
    let mut w = PhaseWatch::default();
    let limit = Duration::from_secs(20 * 60);
    let formed = loop {
        w.poll(&lab);
        if let Some(f) = w.failed() {
            bail!(
                "{}: phase=failed: {}{}",
                lab.nodes[f.node].name,
                f.line,
                lab.consoles(60)
            );
        }
        if w.ready() == lab.nodes.len() {
            break lab.powered_on.elapsed();
        }
        if lab.powered_on.elapsed() > limit {
            bail!(
                "lab not ready within {}s{}",
                limit.as_secs(),
                lab.consoles(60)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    row(
        "3-node lab (etcd): last VM's power-on to phase=ready on all three (TCG, 3 VMs on 2 cores)",
        format!("{:.0} s", formed.as_secs_f64()),
    );
    let secs = |i: usize, p: &str| {
        w.first_seen
            .get(&(i, 1, p.to_string()))
            .map(|d| d.as_secs_f64())
    };
    let mut joins = Vec::new();
    let mut usage = Vec::new();
    for (i, n) in lab.nodes.iter().enumerate() {
        let role = field(&w.last[&i].line, "role").unwrap_or_default();
        let host = field(&w.last[&i].line, "host").unwrap_or_default();
        eprintln!(
            "bench: lab {} ({host}) phase times:{}",
            n.name,
            w.durations(i, 1)
        );
        if let (Some(a), Some(b)) = (secs(i, "bootstrapping"), secs(i, "ready")) {
            row(
                "lab: bootstrap (phase=bootstrapping to ready, first etcd member)",
                format!("{:.0} s", b - a),
            );
        }
        if let (Some(a), Some(b)) = (secs(i, "joining"), secs(i, "ready")) {
            joins.push(b - a);
        }
        let u = firstboot_usage(&lab, i, Duration::from_secs(180))?;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        usage.push((
            format!(
                "lab {} ({role}): clutch-firstboot memory peak, unit cgroup / daemon VmHWM; CPU time, unit / daemon",
                n.name
            ),
            format!(
                "{} / {}; {} / {}",
                opt(u.memory_peak.map(mib)),
                opt(u.vm_hwm_kib.map(|h| format!("{:.1} MiB", h as f64 / 1024.0))),
                opt(u.cpu_nsec.map(|c| format!("{:.1} s", c as f64 / 1e9))),
                opt(u.daemon_cpu_nsec.map(|c| format!("{:.1} s", c as f64 / 1e9))),
            ),
        ));
    }
    if !joins.is_empty() {
        let v: Vec<String> = joins.iter().map(|j| format!("{j:.0} s")).collect();
        row(
            "lab: join (phase=joining to ready, admitted etcd member start), per joiner",
            v.join(", "),
        );
    }
    if let Some(last) = (0..lab.nodes.len())
        .filter_map(|i| secs(i, "configuring"))
        .reduce(f64::max)
    {
        row(
            "lab: power-on to the last node's first phase line (boot, TCG)",
            format!("{last:.0} s"),
        );
    }
    for (what, value) in usage {
        row(&what, value);
    }
    drop(lab);
    Ok(())
}

/// The rows of the first table of an existing results file, and whatever follows it.
fn existing_results(text: &str) -> (Vec<Row>, String) {
    let mut rows = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if l.starts_with("| measurement |") {
            lines.next(); // |---|---|
            while let Some(r) = lines.peek() {
                let Some(inner) = r.strip_prefix("| ").and_then(|r| r.strip_suffix(" |")) else {
                    break;
                };
                if let Some((what, value)) = inner.rsplit_once(" | ") {
                    rows.push(Row {
                        what: what.into(),
                        value: value.into(),
                    });
                }
                lines.next();
            }
            let rest: Vec<&str> = lines.collect();
            return (rows, rest.join("\n"));
        }
    }
    (rows, String::new())
}

/// Writes the results: this run's rows, in the order of the existing table where it had
/// them, rows this run did not measure kept, and the rest of the existing file after it.
fn write_results(out_md: &Path, rows: Vec<Row>) -> Result<()> {
    let old = std::fs::read_to_string(out_md).unwrap_or_default();
    let (old_rows, rest) = existing_results(&old);
    // The old table with this run's values; a row new to it goes right after the row this
    // run measured before it (or first).
    let mut merged: Vec<Row> = old_rows;
    let mut after: Option<usize> = None;
    for r in rows {
        let at = match merged.iter().position(|m| m.what == r.what) {
            Some(i) => {
                merged[i].value = r.value;
                i
            }
            None => {
                let i = after.map_or(0, |a| a + 1);
                merged.insert(i, r);
                i
            }
        };
        after = Some(at);
    }
    let mut md = String::new();
    writeln!(md, "# clutch benchmarks\n")?;
    writeln!(
        md,
        "Reproduce: `bash scripts/bench` (root; host packages from scripts/install-host-deps);\n\
         `--lab-only` measures only the 3-node lab, `--arm64-only` only the Raspberry Pi boards\n\
         (`--arm64-cold` adds a cold rpi4 build, about a quarter of an hour)."
    )?;
    writeln!(
        md,
        "Machine: {} cores, QEMU TCG (no KVM). Written {}.\n",
        num_cpus(),
        now()
    )?;
    writeln!(md, "| measurement | value |\n|---|---|")?;
    for r in &merged {
        writeln!(md, "| {} | {} |", r.what, r.value)?;
    }
    if !rest.trim().is_empty() {
        writeln!(md, "{}", rest.trim_end())?;
    }
    if let Some(d) = out_md.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = out_md.with_extension("md.tmp");
    std::fs::write(&tmp, &md)?;
    std::fs::rename(&tmp, out_md)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_run_updates_its_rows_and_keeps_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("results.md");
        std::fs::write(
            &p,
            "# clutch benchmarks\n\nMachine: old.\n\n| measurement | value |\n|---|---|\n\
             | warm build | 15.1 s |\n| lab: formation | 400 s |\n\n## Measured elsewhere\n\n| a | b |\n",
        )
        .unwrap();
        let row = |w: &str, v: &str| Row {
            what: w.into(),
            value: v.into(),
        };
        write_results(
            &p,
            vec![
                row("cold build", "80 s"),
                row("lab: formation", "380 s"),
                row("lab node0: cpu", "9 s"),
            ],
        )
        .unwrap();
        let md = std::fs::read_to_string(&p).unwrap();
        let (rows, rest) = existing_results(&md);
        let got: Vec<(String, String)> = rows.into_iter().map(|r| (r.what, r.value)).collect();
        assert_eq!(
            got,
            vec![
                ("cold build".into(), "80 s".into()),
                ("warm build".into(), "15.1 s".into()),
                ("lab: formation".into(), "380 s".into()),
                ("lab node0: cpu".into(), "9 s".into()),
            ]
        );
        assert!(
            rest.contains("## Measured elsewhere\n\n| a | b |"),
            "{rest}"
        );
        assert!(!md.contains("Machine: old."));
    }
}
