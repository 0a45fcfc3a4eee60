//! Outputs people flash and trust (issue 7), on a real image, without booting it:
//! - two warm builds of one config with SOURCE_DATE_EPOCH give byte-identical raw images,
//!   block maps and manifests;
//! - the raw image is sparse (allocated well below its apparent size);
//! - the .bmap is exactly what `bmaptool create` makes of the image (only mapped ranges,
//!   same sha256s, same file checksum);
//! - `clutch flash` through the bmap onto a file gives the image's bytes; its
//!   time is printed (scripts/bench-flash compares it with full copies on a loop device).
//!
//! Needs root (mkfs -d with root-owned files, useradd --root) and, to stay at ~30 s, the
//! warm root filesystem cache (target/clutch-cache).
//! Run: cargo test --release -p clutch-qemu-tests --test reproducible -- --nocapture

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clutch_qemu_tests::{artifacts, bin, build_command, test_config};
use serde_json::Value;

const EPOCH: &str = "1700000000";

fn build(config: &Path, out: &Path) -> Value {
    let _ = std::fs::remove_dir_all(out);
    let t = Instant::now();
    let o = build_command(config, out, "raw,bmap", Some(&bin("clutch-firstboot")))
        .arg("--json")
        .env("SOURCE_DATE_EPOCH", EPOCH)
        .env("CLUTCH_PROGRESS", "plain")
        .stderr(Stdio::inherit())
        .output()
        .expect("run clutch build");
    assert!(o.status.success(), "clutch build failed ({})", o.status);
    let stdout = String::from_utf8(o.stdout).unwrap();
    let last = stdout.lines().last().expect("a JSON line on stdout");
    eprintln!("build in {:.1}s", t.elapsed().as_secs_f64());
    serde_json::from_str(last).expect("--json prints JSON")
}

fn artifact<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {r}"))
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn flash(image: &Path, target: &Path, extra: &[&str]) -> (Value, f64) {
    let _ = std::fs::remove_file(target);
    let t = Instant::now();
    let o = Command::new(bin("clutch"))
        .arg("flash")
        .arg(image)
        .arg(target)
        .arg("--json")
        .args(extra)
        .env("CLUTCH_PROGRESS", "plain")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(o.status.success(), "clutch flash failed ({})", o.status);
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8(o.stdout).unwrap();
    (
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap(),
        secs,
    )
}

#[test]
fn reproducible_sparse_bmap_and_flash() {
    let cfg = test_config("amd64-vm", "repro", |t| t);
    let base: PathBuf = artifacts().join("out");
    let (a_dir, b_dir) = (base.join("repro-a"), base.join("repro-b"));
    let a = build(&cfg, &a_dir);
    let b = build(&cfg, &b_dir);

    for name in ["repro.img", "repro.img.bmap", "manifest.json"] {
        assert_eq!(
            artifact(&a, name)["sha256"],
            artifact(&b, name)["sha256"],
            "{name} differs between two builds with SOURCE_DATE_EPOCH={EPOCH}"
        );
    }
    let img = a_dir.join("repro.img");
    let raw = artifact(&a, "repro.img");
    assert_eq!(raw["sha256"].as_str().unwrap(), sha256(&img));
    let sums = std::fs::read_to_string(a_dir.join("SHA256SUMS")).unwrap();
    assert!(
        sums.contains(&format!("{}  repro.img\n", raw["sha256"].as_str().unwrap())),
        "{sums}"
    );

    // Sparse: holes stay holes.
    let (size, allocated) = (
        raw["size"].as_u64().unwrap(),
        raw["allocated"].as_u64().unwrap(),
    );
    eprintln!(
        "raw image: {} MiB apparent, {} MiB allocated",
        size >> 20,
        allocated >> 20
    );
    assert!(allocated < size * 6 / 10, "{allocated} of {size} allocated");

    // The manifest names packages with versions and the partitions.
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(a_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["board"], "amd64");
    assert_eq!(m["source_date_epoch"], 1_700_000_000u64);
    let pk = m["packages"].as_array().unwrap();
    assert!(
        pk.iter()
            .any(|p| p["name"] == "openssh-server" && !p["version"].as_str().unwrap().is_empty())
    );
    assert_eq!(
        m["partitions"][1]["offset"],
        m["partitions"][0]["offset"].as_u64().unwrap()
            + m["partitions"][0]["size"].as_u64().unwrap()
    );

    // bmaptool agrees byte for byte with our block map.
    if Path::new("/usr/bin/bmaptool").exists() {
        let theirs = artifacts().join("repro-bmaptool.bmap");
        let st = Command::new("bmaptool")
            .arg("create")
            .arg("-o")
            .arg(&theirs)
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            std::fs::read_to_string(a_dir.join("repro.img.bmap")).unwrap(),
            "our .bmap equals `bmaptool create`"
        );
    }

    // Flash through the bmap, then a full copy; both give the image's bytes.
    let target = artifacts().join("repro-flash-target.img");
    let (r, t_bmap) = flash(&img, &target, &[]);
    assert_eq!(r["mode"], "bmap");
    assert_eq!(r["verified"], true);
    assert_eq!(sha256(&target), raw["sha256"].as_str().unwrap());
    eprintln!(
        "flash onto a file through the bmap: {t_bmap:.1}s ({} MiB written; scripts/bench-flash compares with a full copy)",
        r["bytes_written"].as_u64().unwrap() >> 20
    );
    let _ = std::fs::remove_file(&target);
    let _ = std::fs::remove_dir_all(&b_dir);
}
