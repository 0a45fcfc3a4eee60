//! `clutch lab up --build`: whether the image must be (re)built. An image is fresh when its
//! manifest.json was made from this very config text and nothing it is made of (the board
//! file, the overlays, the clutch and clutch-firstboot binaries, the firstboot unit) changed
//! after it was written.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::data;

/// Why a build is needed, or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    Missing,
    Stale(String),
    Fresh,
}

/// What the decision looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The config's digest now (as the build writes it: [`crate::manifest::config_digest`]).
    pub config_sha256: String,
    /// `config_sha256` in the image's manifest.json (`None`: no readable manifest).
    pub manifest_config_sha256: Option<String>,
    /// When the image was written (`None`: no image).
    pub image_mtime: Option<SystemTime>,
    /// The newest file the image is made of, and when it changed.
    pub newest_input: Option<(PathBuf, SystemTime)>,
}

pub fn judge(i: &Inputs) -> Freshness {
    let Some(image_t) = i.image_mtime else {
        return Freshness::Missing;
    };
    match &i.manifest_config_sha256 {
        None => return Freshness::Stale("it has no readable manifest.json".into()),
        Some(h) if *h != i.config_sha256 => {
            return Freshness::Stale("the config changed since it was built".into());
        }
        Some(_) => {}
    }
    match &i.newest_input {
        Some((p, t)) if *t > image_t => {
            Freshness::Stale(format!("{} changed since it was built", p.display()))
        }
        _ => Freshness::Fresh,
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest file under `p` (or `p` itself).
fn newest_in(p: &Path, best: &mut Option<(PathBuf, SystemTime)>) {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return;
    };
    if let Ok(t) = m.modified() {
        if best.as_ref().is_none_or(|(_, b)| t > *b) {
            *best = Some((p.to_path_buf(), t));
        }
    }
    if m.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            newest_in(&e.path(), best);
        }
    }
}

/// Gathers [`Inputs`] for building `config` into `image` (its manifest.json beside it).
pub fn inputs(config: &Path, data_dir: Option<&Path>, image: &Path) -> Result<Inputs> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let (data, cfg, _) = data::load(data_dir, config)?;
    let manifest_config_sha256 = image
        .parent()
        .map(|d| d.join("manifest.json"))
        .and_then(|m| std::fs::read(m).ok())
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("config_sha256")?.as_str().map(str::to_string));
    let mut newest = None;
    newest_in(&data.board_path(cfg.board.as_str()), &mut newest);
    for o in &cfg.overlays {
        newest_in(&data.overlay_path(o.as_str()), &mut newest);
    }
    newest_in(
        &data.0.join("firstboot/clutch-firstboot.service"),
        &mut newest,
    );
    if let Ok(exe) = std::env::current_exe() {
        newest_in(&exe.with_file_name("clutch-firstboot"), &mut newest);
        newest_in(&exe, &mut newest);
    }
    Ok(Inputs {
        config_sha256: crate::manifest::config_digest(&text),
        manifest_config_sha256,
        image_mtime: mtime(image),
        newest_input: newest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn rebuild_when_missing_or_anything_changed() {
        let fresh = Inputs {
            config_sha256: "aa".into(),
            manifest_config_sha256: Some("aa".into()),
            image_mtime: Some(t(100)),
            newest_input: Some(("boards/amd64.toml".into(), t(50))),
        };
        assert_eq!(judge(&fresh), Freshness::Fresh);
        let mut i = fresh.clone();
        i.image_mtime = None;
        assert_eq!(judge(&i), Freshness::Missing);
        let mut i = fresh.clone();
        i.manifest_config_sha256 = Some("bb".into());
        assert_eq!(
            judge(&i),
            Freshness::Stale("the config changed since it was built".into())
        );
        let mut i = fresh.clone();
        i.manifest_config_sha256 = None;
        assert!(matches!(judge(&i), Freshness::Stale(_)));
        let mut i = fresh;
        i.newest_input = Some(("target/release/clutch-firstboot".into(), t(150)));
        assert_eq!(
            judge(&i),
            Freshness::Stale("target/release/clutch-firstboot changed since it was built".into())
        );
    }

    #[test]
    fn inputs_read_the_manifest_and_the_shipped_board() {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cfg = ws.join("image-configs/amd64-lab.toml");
        let out = tempfile::tempdir().unwrap();
        let img = out.path().join("amd64-lab.img");
        let i = inputs(&cfg, Some(&ws), &img).unwrap();
        assert_eq!(judge(&i), Freshness::Missing);
        std::fs::write(&img, b"x").unwrap();
        let sha = crate::manifest::config_digest(&std::fs::read_to_string(&cfg).unwrap());
        std::fs::write(
            out.path().join("manifest.json"),
            format!("{{\"config_sha256\":\"{sha}\"}}"),
        )
        .unwrap();
        let i = inputs(&cfg, Some(&ws), &img).unwrap();
        assert_eq!(i.manifest_config_sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(i.config_sha256, sha);
        // The image was just written: newer than every input (the test binary included).
        assert_eq!(judge(&i), Freshness::Fresh, "{i:?}");
    }
}
