//! `manifest.json`: what an image is made of (config hash, board, suite, every installed
//! package with its version, partitions) and what was written (artifact sizes and sha256);
//! and, for boards that ask for it, a Raspberry Pi Imager OS-list entry for the image.
//!
//! Nothing in here depends on the time or the machine of the build, so two reproducible
//! builds have equal manifests too.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// One installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// Installed packages from a dpkg status file, sorted by name (then architecture).
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        let mut arch = None;
        let mut installed = false;
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue; // continuation of a multi-line field
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "Package" => name = Some(v.to_string()),
                "Version" => version = Some(v.to_string()),
                "Architecture" => arch = Some(v.to_string()),
                "Status" => installed = v.ends_with(" installed"),
                _ => {}
            }
        }
        if let (true, Some(name), Some(version)) = (installed, name, version) {
            out.push(Package {
                name,
                version,
                architecture: arch.unwrap_or_default(),
            });
        }
    }
    out.sort();
    out
}

/// The packages installed in a staged root tree.
pub fn installed_packages(root: &Path) -> Result<Vec<Package>> {
    let p = root.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(parse_dpkg_status(&text))
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    pub filesystem: String,
    pub label: String,
    pub partuuid: String,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub name: String,
    pub clutch_version: String,
    /// sha256 of the image config with its secrets blanked (see [`config_digest`]): it
    /// tells configs apart without being a way to test guesses of an inline token.
    pub config_sha256: String,
    /// sha256 over the config and the board file: what the disk and partition ids derive from.
    pub build_seed: String,
    pub board: String,
    pub arch: String,
    pub suite: String,
    pub mirror: String,
    /// The cached root filesystem this image was made from.
    pub rootfs_key: String,
    pub source_date_epoch: Option<u64>,
    pub image_size: u64,
    pub partition_table: String,
    pub disk_guid: String,
    pub partitions: Vec<Partition>,
    pub packages: Vec<Package>,
    pub artifacts: Vec<Artifact>,
}

/// Keys whose values are secrets, blanked before the config is hashed.
const SECRET_KEYS: &[(&str, &str)] = &[
    ("cluster", "token"),
    ("wifi", "psk"),
    ("user", "password_hash"),
];

/// sha256 of the config as TOML with every secret value replaced by `"<secret>"`, in toml's
/// own serialisation (so comments and layout do not change it either).
pub fn config_digest(text: &str) -> String {
    let mut t: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        // A config that got this far parses; hash nothing secret-bearing if it ever does not.
        Err(_) => return hex::encode(Sha256::digest(b"unparsable")),
    };
    for (sec, key) in SECRET_KEYS {
        if let Some(v) = t
            .get_mut(*sec)
            .and_then(|s| s.as_table_mut())
            .and_then(|s| s.get_mut(*key))
        {
            *v = toml::Value::String("<secret>".into());
        }
    }
    hex::encode(Sha256::digest(
        toml::to_string(&t).unwrap_or_default().as_bytes(),
    ))
}

/// `SOURCE_DATE_EPOCH` when it is set (and a number).
pub fn source_date_epoch_env() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// The `YYYY-MM-DD` date of a Unix time (UTC).
pub fn ymd(secs: u64) -> String {
    // Days to civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A Raspberry Pi Imager OS-list entry (an `os_list` item of its repository JSON, as its
/// schema `doc/json-schema/os-list-schema.json` requires it; use with `rpi-imager --repo`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImagerEntry {
    pub name: String,
    pub description: String,
    pub icon: String,
    pub url: String,
    pub extract_size: u64,
    pub extract_sha256: String,
    pub image_download_size: u64,
    pub image_download_sha256: String,
    pub release_date: String,
    /// `cloudinit-rpi`: Imager writes its customisation (host name, user, wifi, ssh key,
    /// time zone) as cloud-init files, which clutch-firstboot reads. Without it Imager 1.x
    /// assumes `systemd` and appends `systemd.run=/boot/firstrun.sh` to cmdline.txt.
    pub init_format: String,
    pub devices: Vec<String>,
    /// Imager offers the passwordless-sudo choice (cloud-init `sudo:`), which clutch reads.
    pub capabilities: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmap_url: Option<String>,
}

/// The top-level `imager` block: the devices of Imager 2.x's device step.
#[derive(Debug, Clone, Serialize)]
pub struct ImagerMeta {
    pub devices: Vec<clutch_config::board::ImagerDevice>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImagerList {
    pub imager: ImagerMeta,
    pub os_list: Vec<ImagerEntry>,
}

/// The URL of `file` for Imager: relative to the JSON file (they are published together),
/// or under `url_base` (`https://example.org/images/`, or `file:///srv/images/` for a local
/// folder: Imager itself needs an absolute URL).
pub fn imager_url(url_base: Option<&str>, file: &str) -> String {
    match url_base {
        Some(b) if !b.is_empty() => format!("{}/{file}", b.trim_end_matches('/')),
        _ => file.to_string(),
    }
}

/// `<name>.rpi-imager.json` for a board with `[imager]`: the image to download is the
/// `.img.zst` when built, else the raw image; `None` when the board has no `[imager]` or
/// no raw image was built.
pub fn imager_json(
    name: &str,
    board: &clutch_config::Board,
    images: &[crate::output::Written],
    url_base: Option<&str>,
) -> Result<Option<String>> {
    let Some(im) = &board.imager else {
        return Ok(None);
    };
    let find = |n: String| images.iter().find(|w| w.name == n);
    let Some(raw) = find(format!("{name}.img")) else {
        tracing::warn!("no raw image built: skipping the Raspberry Pi Imager entry");
        return Ok(None);
    };
    let download = find(format!("{name}.img.zst")).unwrap_or(raw);
    let entry = ImagerEntry {
        name: format!("clutch {name}"),
        description: if board.description.is_empty() {
            format!("clutch image {name} for {}", board.name)
        } else {
            format!("clutch image {name}: {}", board.description)
        },
        icon: im.icon.clone(),
        url: imager_url(url_base, &download.name),
        extract_size: raw.size,
        extract_sha256: raw.sha256.clone(),
        image_download_size: download.size,
        image_download_sha256: download.sha256.clone(),
        release_date: ymd(crate::disk::source_date_epoch()),
        init_format: "cloudinit-rpi".into(),
        devices: im.devices.clone(),
        capabilities: vec!["passwordless_sudo".into()],
        bmap_url: find(format!("{name}.img.bmap")).map(|b| imager_url(url_base, &b.name)),
    };
    let list = ImagerList {
        imager: ImagerMeta {
            devices: im.hardware.clone(),
        },
        os_list: vec![entry],
    };
    Ok(Some(serde_json::to_string_pretty(&list)? + "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_digest_ignores_secrets_but_not_settings() {
        let a = "version = 1\n[cluster]\nname = \"lab\"\ntoken = \"one-secret-0123456789abcdef0123456789\"\n";
        let b = "version = 1\n# another comment\n[cluster]\nname = \"lab\"\ntoken = \"two-secret-0123456789abcdef0123456789\"\n";
        let c = "version = 1\n[cluster]\nname = \"lab2\"\ntoken = \"one-secret-0123456789abcdef0123456789\"\n";
        assert_eq!(config_digest(a), config_digest(b));
        assert_ne!(config_digest(a), config_digest(c));
        assert_ne!(config_digest(a), hex::encode(Sha256::digest(a.as_bytes())));
        let w1 = "[wifi]\nssid = \"x\"\npsk = \"passphrase-1\"\n[user]\nname = \"a\"\npassword_hash = \"$y$1\"\n";
        let w2 = "[wifi]\nssid = \"x\"\npsk = \"passphrase-2\"\n[user]\nname = \"a\"\npassword_hash = \"$y$2\"\n";
        assert_eq!(config_digest(w1), config_digest(w2));
    }

    const STATUS: &str = "Package: zlib1g\nStatus: install ok installed\nPriority: required\nArchitecture: amd64\nMulti-Arch: same\nVersion: 1:1.3.dfsg+really1.3.1-1+b1\nDescription: compression library - runtime\n zlib is a library implementing the deflate compression method found\n in gzip and PKZIP.\n\nPackage: removed-one\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 1.0\n\nPackage: base-files\nEssential: yes\nStatus: install ok installed\nArchitecture: amd64\nVersion: 13.8\nConffiles:\n /etc/debian_version 0123\n";

    #[test]
    fn dpkg_status_lists_installed_packages_sorted() {
        let p = parse_dpkg_status(STATUS);
        assert_eq!(
            p,
            vec![
                Package {
                    name: "base-files".into(),
                    version: "13.8".into(),
                    architecture: "amd64".into()
                },
                Package {
                    name: "zlib1g".into(),
                    version: "1:1.3.dfsg+really1.3.1-1+b1".into(),
                    architecture: "amd64".into()
                },
            ]
        );
    }

    #[test]
    fn dates() {
        assert_eq!(ymd(0), "1970-01-01");
        assert_eq!(ymd(1_700_000_000), "2023-11-14");
        assert_eq!(ymd(951_782_400), "2000-02-29");
    }

    fn written(name: &str, size: u64) -> crate::output::Written {
        crate::output::Written {
            name: name.into(),
            path: std::path::PathBuf::from(name),
            size,
            allocated: size,
            sha256: "a".repeat(64),
        }
    }

    fn rpi4_json(url_base: Option<&str>) -> serde_json::Value {
        let board = crate::testutil::board("rpi4");
        let images = [
            written("rpi4.img", 1000),
            written("rpi4.img.zst", 300),
            written("rpi4.img.bmap", 3),
        ];
        let j = imager_json("rpi4", &board, &images, url_base)
            .unwrap()
            .unwrap();
        serde_json::from_str(&j).unwrap()
    }

    #[test]
    fn imager_json_is_relocatable_and_complete() {
        let v = rpi4_json(None);
        let o = &v["os_list"][0];
        assert_eq!(o["url"], "rpi4.img.zst");
        assert_eq!(o["bmap_url"], "rpi4.img.bmap");
        assert_eq!(o["init_format"], "cloudinit-rpi");
        assert_eq!(o["devices"], serde_json::json!(["pi4-64bit"]));
        assert!(o["icon"].as_str().unwrap().starts_with("icons/"));
        assert_eq!(
            v["imager"]["devices"][0]["tags"],
            serde_json::json!(["pi4-64bit"])
        );
        let v = rpi4_json(Some("https://example.org/clutch/"));
        assert_eq!(
            v["os_list"][0]["url"],
            "https://example.org/clutch/rpi4.img.zst"
        );
    }

    /// Raspberry Pi Imager's own schema (tests/fixtures/rpi-imager/, see its README) with
    /// python3-jsonschema, as CI has it: the JSON passes, the old shape (no icon, no devices)
    /// fails.
    #[test]
    fn imager_json_passes_imagers_own_schema() {
        let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/rpi-imager/os-list-schema.json");
        let check = |v: &serde_json::Value| -> Result<(), String> {
            let t = tempfile::tempdir().unwrap();
            let doc = t.path().join("list.json");
            std::fs::write(&doc, v.to_string()).unwrap();
            let out = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import json,sys,jsonschema\n\
                     s=json.load(open(sys.argv[1]));d=json.load(open(sys.argv[2]))\n\
                     jsonschema.Draft7Validator.check_schema(s)\n\
                     jsonschema.validate(d,s,cls=jsonschema.Draft7Validator)",
                ])
                .arg(&schema)
                .arg(&doc)
                .output()
                .expect("python3 (scripts/install-host-deps installs it with python3-jsonschema)");
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        };
        let v = rpi4_json(Some("https://example.org/clutch"));
        check(&v).unwrap_or_else(|e| panic!("{e}"));
        check(&rpi4_json(None)).unwrap_or_else(|e| panic!("{e}"));
        let mut old = v.clone();
        old["os_list"][0].as_object_mut().unwrap().remove("icon");
        let e = check(&old).unwrap_err();
        assert!(e.contains("ValidationError"), "{e}");
        let mut old = v;
        old["os_list"][0].as_object_mut().unwrap().remove("devices");
        assert!(check(&old).is_err());
    }
}
