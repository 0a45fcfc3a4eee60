//! The `update` output: `update/` holds one release for nodes to fetch — the root file
//! system image and the boot files, each xz-compressed (what systemd-sysupdate's importer
//! decompresses), `release.json`, `SHA256SUMS` over all of them, and `SHA256SUMS.sig`, the
//! Ed25519 signature of `SHA256SUMS` by the `[update] signing_key_file` key.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use clutch_config::AbScheme;
use sha2::{Digest, Sha256};

use super::AbPlan;
use super::files::{self, ReleaseInfo};
use super::key::ReleaseKey;
use crate::{cmd, output};

/// The folder in the output that holds the release.
pub const SET_DIR: &str = "update";

/// What goes into a release.
pub struct UpdateInputs<'a> {
    pub plan: &'a AbPlan,
    pub board_name: &'a str,
    /// The release's root file system image (ext4, as written into a slot).
    pub root_image: &'a Path,
    /// Boot files by their name in the set (uncompressed content).
    pub boot: Vec<(String, Vec<u8>)>,
}

/// xz, multi-threaded, with a CRC64 check (systemd-import reads it; Debian's has no zstd).
/// Preset 0: most of a root image is already compressed (xz kernel modules, firmware,
/// initrd), so a 256 MiB slice came out 1.3% larger than at preset 1 in a third of the time.
pub fn xz(src: &Path, dest: &Path) -> Result<()> {
    let out =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    cmd::run(
        Command::new("xz")
            .args(["-T0", "-0", "--check=crc64", "-c"])
            .arg(src)
            .stdout(out),
    )
    .with_context(|| format!("compressing {}", src.display()))?;
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The lines of `SHA256SUMS` for files in `dir` (in the given order).
pub fn sums(dir: &Path, names: &[String]) -> Result<String> {
    let mut s = String::new();
    for n in names {
        s += &format!("{}  {n}\n", sha256_file(&dir.join(n))?);
    }
    Ok(s)
}

/// Writes the release into `work` (a scratch folder), then registers every file with
/// `pending` under `<out>/update/`. Returns a one-line summary.
pub fn write(
    pending: &mut output::Pending,
    out: &Path,
    work: &Path,
    key_file: &Path,
    inp: &UpdateInputs<'_>,
) -> Result<String> {
    let key = ReleaseKey::load(key_file)?;
    let r = &inp.plan.release;
    std::fs::create_dir_all(work)?;
    let mut names = vec![files::root_image_name(r)];
    xz(inp.root_image, &work.join(&names[0]))?;
    for (name, data) in &inp.boot {
        let raw = work.join(format!("{name}.raw"));
        std::fs::write(&raw, data)?;
        let n = format!("{name}.xz");
        xz(&raw, &work.join(&n))?;
        std::fs::remove_file(&raw)?;
        names.push(n);
    }
    let info = ReleaseInfo {
        format: 1,
        release: r.clone(),
        board: inp.board_name.to_string(),
        arch: inp.plan.arch.clone(),
        scheme: inp.plan.scheme.as_str().to_string(),
        files: names.clone(),
        root_bytes: std::fs::metadata(inp.root_image)?.len(),
    };
    std::fs::write(
        work.join("release.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    names.push("release.json".into());
    let sums = sums(work, &names)?;
    std::fs::write(work.join("SHA256SUMS"), &sums)?;
    std::fs::write(work.join("SHA256SUMS.sig"), key.sign(sums.as_bytes()))?;
    names.push("SHA256SUMS".into());
    names.push("SHA256SUMS.sig".into());
    let set = out.join(SET_DIR);
    std::fs::create_dir_all(&set).with_context(|| format!("creating {}", set.display()))?;
    let mut total = 0;
    for n in &names {
        let src: PathBuf = work.join(n);
        total += std::fs::metadata(&src)?.len();
        pending.add(set.join(n), |tmp| {
            std::fs::rename(&src, tmp)
                .or_else(|_| std::fs::copy(&src, tmp).map(|_| ()))
                .with_context(|| format!("moving {}", src.display()))
        })?;
    }
    Ok(format!(
        "update/: release {r} ({} scheme), {} files, {} MiB, signed",
        inp.plan.scheme.as_str(),
        names.len(),
        total >> 20
    ))
}

/// The boot files a release carries, by scheme: (name in the set without `.xz`, content).
pub fn boot_payload(
    p: &AbPlan,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    entry: String,
    slot_boot_image: Option<Vec<u8>>,
    slot_folder_tar: Option<Vec<u8>>,
) -> Vec<(String, Vec<u8>)> {
    let r = &p.release;
    let strip = |n: String| n.trim_end_matches(".xz").to_string();
    match p.scheme {
        AbScheme::SystemdBoot => vec![
            (strip(files::kernel_name(r)), kernel),
            (strip(files::initrd_name(r)), initrd),
            (strip(files::entry_name(r)), entry.into_bytes()),
        ],
        AbScheme::Tryboot => vec![(
            strip(files::slot_boot_image_name(r)),
            slot_boot_image.unwrap_or_default(),
        )],
        AbScheme::OsPrefix => vec![(
            strip(files::slot_folder_name(r)),
            slot_folder_tar.unwrap_or_default(),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_folder_is_signed_over_every_file() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("k");
        super::super::key::generate(&key, [3; 32]).unwrap();
        let b = crate::testutil::board("amd64");
        let mut c =
            crate::testutil::image_config("[update]\nsource = \"http://10.0.0.1:8080/update/\"\n");
        c.image.release = Some("7".try_into().unwrap());
        let p = super::super::plan(&c, &b, 0).unwrap().unwrap();
        let root = t.path().join("root.ext4");
        std::fs::write(&root, vec![0u8; 1 << 20]).unwrap();
        let out = t.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut pending = output::Pending::default();
        let boot = boot_payload(&p, b"K".to_vec(), b"I".to_vec(), "E".into(), None, None);
        let summary = write(
            &mut pending,
            &out,
            &t.path().join("work"),
            &key,
            &UpdateInputs {
                plan: &p,
                board_name: "amd64",
                root_image: &root,
                boot,
            },
        )
        .unwrap();
        assert!(summary.contains("release 7"), "{summary}");
        pending.commit_with_sums(&out.join("SHA256SUMS")).unwrap();
        let u = out.join("update");
        let mut names: Vec<_> = std::fs::read_dir(&u)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "SHA256SUMS",
                "SHA256SUMS.sig",
                "clutch_7.conf.xz",
                "clutch_7.initrd.xz",
                "clutch_7.root.raw.xz",
                "clutch_7.vmlinuz.xz",
                "release.json"
            ]
        );
        let sums_text = std::fs::read_to_string(u.join("SHA256SUMS")).unwrap();
        assert_eq!(sums_text.lines().count(), 5);
        let sig = std::fs::read(u.join("SHA256SUMS.sig")).unwrap();
        let pem = std::fs::read_to_string(super::super::key::public_path(&key)).unwrap();
        use ed25519_dalek::pkcs8::DecodePublicKey;
        let vk = ed25519_dalek::VerifyingKey::from_public_key_pem(&pem).unwrap();
        vk.verify_strict(
            sums_text.as_bytes(),
            &ed25519_dalek::Signature::from_slice(&sig).unwrap(),
        )
        .unwrap();
        // The files decompress to what went in.
        let o = Command::new("xz")
            .args(["-dc"])
            .arg(u.join("clutch_7.vmlinuz.xz"))
            .output()
            .unwrap();
        assert_eq!(o.stdout, b"K");
        let info: ReleaseInfo =
            serde_json::from_slice(&std::fs::read(u.join("release.json")).unwrap()).unwrap();
        assert_eq!(info.release.as_str(), "7");
        assert_eq!(info.scheme, "systemd-boot");
        // The top-level SHA256SUMS lists them as update/...
        let top = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
        assert!(top.contains("  update/SHA256SUMS.sig\n"), "{top}");
    }
}
