//! `clutch build`: config -> root filesystem -> staged tree -> disk image -> outputs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clutch_config::{Board, Format, ImageConfig};
use sha2::{Digest, Sha256};

use crate::disk::{self, Ids};
use crate::fat::{self, FatFile};
use crate::{
    atomic, bmap, data, doctor, engine, fetch, manifest, output, pxe, repro, rootfs, stage,
};

#[derive(Debug, Clone, Default)]
pub struct BuildOpts {
    pub config: PathBuf,
    pub out: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    pub formats: Option<Vec<Format>>,
    pub data_dir: Option<PathBuf>,
    pub firstboot_bin: Option<PathBuf>,
    /// Where `<name>.rpi-imager.json`'s image URLs point (default: next to the JSON file).
    pub url_base: Option<String>,
}

#[derive(Debug, Clone)]
pub struct BuildResult {
    pub main_artifact: PathBuf,
    pub artifacts: Vec<PathBuf>,
    pub rootfs_cached: bool,
    /// Every artifact with size and sha256 (manifest.json included).
    pub written: Vec<output::Written>,
    pub seconds: f64,
}

/// Progress per stage (indicatif on a terminal, plain lines otherwise).
pub use crate::progress::Progress;

pub fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("clutch");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/clutch");
    }
    PathBuf::from("/var/cache/clutch")
}

fn config_name(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Where the image's clutch-firstboot comes from.
enum FirstbootSource {
    /// A binary that is already there (`--firstboot-bin`, or next to `clutch`).
    Ready(PathBuf),
    /// To be cross-built for a foreign board from this source tree (cached by source hash).
    Cross,
}

/// The `clutch-firstboot` binary for the board's architecture: `--firstboot-bin`, else the
/// one next to `clutch` when it is for the board's architecture, else (another architecture)
/// cross-built from the clutch source tree in the data folder (see `cross`). Only the checks
/// happen here, so a wrong binary fails the build at once; the cross-build runs later.
fn find_firstboot(
    explicit: Option<&Path>,
    board: &Board,
    data_dir: &Path,
) -> Result<FirstbootSource> {
    if let Some(p) = explicit {
        check_firstboot(p, board)?;
        return Ok(FirstbootSource::Ready(p.to_path_buf()));
    }
    let exe = std::env::current_exe().context("locating the clutch binary")?;
    let next_to_us = exe.with_file_name("clutch-firstboot");
    if board.arch != crate::cross::host_arch() && crate::cross::is_source_tree(data_dir) {
        if next_to_us.is_file() && check_firstboot(&next_to_us, board).is_ok() {
            return Ok(FirstbootSource::Ready(next_to_us));
        }
        return Ok(FirstbootSource::Cross);
    }
    check_firstboot(&next_to_us, board)?;
    Ok(FirstbootSource::Ready(next_to_us))
}

fn cross_build_firstboot(
    board: &Board,
    data_dir: &Path,
    cache: &Path,
    mirror: &str,
) -> Result<(PathBuf, bool)> {
    crate::cross::ensure_firstboot(cache, data_dir, &board.arch, mirror).with_context(|| {
        format!(
            "no {} clutch-firstboot (or pass --firstboot-bin)",
            board.arch
        )
    })
}

/// Fails unless `p` is a Linux ELF binary for the board's architecture.
fn check_firstboot(p: &Path, board: &Board) -> Result<()> {
    if !p.is_file() {
        bail!(
            "no clutch-firstboot binary at {} (build it with `cargo build --release`, or pass --firstboot-bin)",
            p.display()
        );
    }
    let want = match board.arch.as_str() {
        "amd64" => 0x3e,
        "arm64" => 0xb7,
        other => bail!("no known ELF machine for Debian arch {other}"),
    };
    let head = disk::read_at(p, 0, 20).with_context(|| format!("reading {}", p.display()))?;
    let machine = u16::from_le_bytes([head[18], head[19]]);
    if &head[..4] != b"\x7fELF" || machine != want {
        bail!(
            "{} is not a Linux {} binary (ELF machine {machine:#x}); pass --firstboot-bin for the board's architecture",
            p.display(),
            board.arch
        );
    }
    Ok(())
}

/// The node config as written to the FAT partition: the wifi passphrase is replaced by the
/// derived WPA key, so the passphrase itself never lands on the image.
pub fn node_config_toml(cfg: &ImageConfig) -> Result<String> {
    let mut node = cfg.node_config();
    if let Some(w) = &mut node.wifi {
        if let Some(psk) = &w.psk {
            w.psk = Some(
                clutch_config::WifiPsk::try_from(psk.hex_key(&w.ssid))
                    .map_err(anyhow::Error::msg)?,
            );
        }
    }
    let body = toml::to_string_pretty(&node)?;
    Ok(format!(
        "# clutch node config: read by clutch-firstboot when the node boots.\n\
         # Edit it after flashing to change this node; secrets (token, wifi key) are moved\n\
         # off this partition into /var/lib/clutch at first boot.\n\n{body}"
    ))
}

/// The values of a board template's placeholders (`clutch_config::TEMPLATE_PLACEHOLDERS`).
#[derive(Debug, Clone)]
pub struct TemplateVars {
    pub cmdline: String,
    pub root_partuuid: String,
    pub extra_cmdline: String,
}

impl TemplateVars {
    pub fn new(cfg: &ImageConfig, board: &Board, root_partuuid: &str) -> Self {
        TemplateVars {
            cmdline: kernel_cmdline(cfg, board, root_partuuid),
            root_partuuid: root_partuuid.to_string(),
            extra_cmdline: image_cmdline_args(cfg).join(" "),
        }
    }

    /// Renders a board template.
    pub fn render(&self, t: &str) -> String {
        t.replace("{cmdline}", &self.cmdline)
            .replace("{root_partuuid}", &self.root_partuuid)
            .replace("{extra_cmdline}", &self.extra_cmdline)
    }
}

/// The kernel arguments the image config adds to the board's: the cgroup flags (k3s and
/// container runtimes need the memory controller) and `[kernel] cmdline`.
pub fn image_cmdline_args(cfg: &ImageConfig) -> Vec<String> {
    let mut args = Vec::new();
    if cfg.kernel.cgroups {
        args.push("cgroup_enable=memory".into());
        args.push("cgroup_memory=1".into());
    }
    args.extend(cfg.kernel.cmdline.iter().map(|a| a.to_string()));
    args
}

pub fn kernel_cmdline(cfg: &ImageConfig, board: &Board, root_partuuid: &str) -> String {
    let mut args: Vec<String> = vec![format!("root=PARTUUID={root_partuuid}")];
    args.extend(board.cmdline.iter().map(|a| a.to_string()));
    args.extend(image_cmdline_args(cfg));
    args.join(" ")
}

/// Removes a folder when dropped if it is empty.
struct EmptyDirGuard(PathBuf);
impl Drop for EmptyDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Removes a folder tree when dropped.
struct DirGuard(PathBuf);
impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Does the image carry a secret (in its node config on the FAT partition)?
pub fn embeds_secret(cfg: &ImageConfig) -> bool {
    cfg.cluster.as_ref().is_some_and(|c| c.token.is_some())
        || cfg.wifi.as_ref().is_some_and(|w| w.psk.is_some())
        || cfg
            .user
            .as_ref()
            .is_some_and(|u| !u.password_hash.as_str().is_empty())
}

pub fn build(opts: &BuildOpts) -> Result<BuildResult> {
    let text = std::fs::read_to_string(&opts.config)
        .with_context(|| format!("cannot read {}", opts.config.display()))?;
    let (data, cfg, board) = data::load(opts.data_dir.as_deref(), &opts.config)?;
    let formats = opts
        .formats
        .clone()
        .unwrap_or_else(|| cfg.image.formats.clone());
    if formats.is_empty() {
        bail!("no output format requested (raw, qcow2, zst, bmap, pxe)");
    }
    doctor::require(&doctor::needed_for(&board, &formats))?;
    let unit = data.0.join("firstboot/clutch-firstboot.service");
    let name = config_name(&opts.config);
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("out").join(&name));
    let cache = opts.cache.clone().unwrap_or_else(default_cache);
    // An output folder this build made is removed again if the build fails before
    // anything was moved into it: a failed build leaves no trace in --out.
    let _out_guard = (!out.exists()).then(|| EmptyDirGuard(out.clone()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let firstboot_source = find_firstboot(opts.firstboot_bin.as_deref(), &board, &data.0)?;

    // Everything that shapes the image seeds its identifiers.
    let board_text = std::fs::read_to_string(data.board_path(cfg.board.as_str()))?;
    let seed = hex::encode(Sha256::digest(format!("{text}\n--\n{board_text}")));
    let ids = Ids::from_seed(&seed);
    let (boot_uuid, root_uuid) = ids.partuuids(board.partition_table);
    // [update]: two root slots and a data partition (see crate::update).
    let ab = crate::update::plan(&cfg, &board, disk::source_date_epoch())?;
    if formats.contains(&Format::Update) && ab.is_none() {
        bail!("format `update` needs an [update] section in the config");
    }

    let mut p = Progress::new(4 + formats.len());
    let spec = rootfs::RootfsSpec::new(&cfg, &board).with_formats(&formats);
    p.stage(&format!(
        "root filesystem ({} {} , {} packages)",
        spec.suite,
        spec.arch,
        spec.packages.len()
    ));
    // A foreign board's clutch-firstboot is cross-built (natively, on every core) while the
    // root filesystem is made under emulation (one core, mostly): together they take as long
    // as the longer of the two.
    let (firstboot, rootfs) = std::thread::scope(|s| {
        let firstboot = s.spawn(|| match &firstboot_source {
            FirstbootSource::Ready(p) => Ok((p.clone(), None)),
            FirstbootSource::Cross => cross_build_firstboot(&board, &data.0, &cache, cfg.mirror())
                .map(|(p, compiled)| (p, Some(compiled))),
        });
        let rootfs = rootfs::ensure(&cache, &spec);
        let firstboot = firstboot
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the clutch-firstboot cross-build panicked")));
        (firstboot, rootfs)
    });
    let (tar, cached) = rootfs?;
    // `compiled`: None = a given binary, Some(false) = cross-built before, from the cache.
    let (firstboot, compiled) = firstboot?;
    p.done(match (cached, compiled) {
        (true, None) => "reused from the cache",
        (true, Some(false)) => "reused from the cache, the cross-built clutch-firstboot too",
        (true, Some(true)) => "reused from the cache; clutch-firstboot cross-built",
        (false, None) => "built with mmdebstrap",
        (false, Some(false)) => {
            "built with mmdebstrap; cross-built clutch-firstboot from the cache"
        }
        (false, Some(true)) => "built with mmdebstrap, clutch-firstboot cross-built alongside",
    });

    p.stage("staging the image tree");
    let work = cache.join("work");
    std::fs::create_dir_all(&work)?;
    let staging = tempfile::Builder::new()
        .prefix("stage-")
        .tempdir_in(&work)?
        .keep();
    let _cleanup = DirGuard(staging.clone());
    rootfs::extract(&tar, &staging)?;
    let names = stage::plan_names(&staging, &cfg).map_err(|e| match e {
        stage::PlanNamesError::Invalid(inv) => {
            anyhow::Error::from(clutch_config::diag::locate(&opts.config, &text, inv))
        }
        e => e.into(),
    })?;
    let overlays = cfg
        .overlays
        .iter()
        .map(|o| data.overlay_path(o.as_str()))
        .collect();
    stage::apply(
        &staging,
        &stage::StageInputs {
            cfg: &cfg,
            board: &board,
            overlays,
            firstboot_bin: &firstboot,
            firstboot_unit: &unit,
            root_partuuid: root_uuid.clone(),
            boot_partuuid: boot_uuid.clone(),
            names,
        },
    )?;
    if let Some(c) = &cfg.cluster {
        engine::install(
            &staging,
            c.engine,
            &board.arch,
            &fetch::Fetcher::new(&cache)?,
            |k| std::env::var(k).ok(),
        )?;
    }
    let ab_staged = match &ab {
        Some(plan) => Some(crate::update::image::prepare(
            &crate::update::image::PrepareInputs {
                staging: &staging,
                work_parent: &work,
                plan,
                cfg: &cfg,
                board: &board,
                unit_dir: &data.0.join("firstboot"),
                node_config: &node_config_toml(&cfg)?,
                mbr_root: &root_uuid,
            },
        )?),
        None => None,
    };
    let vars = match &ab_staged {
        Some(s) => s.vars.clone(),
        None => TemplateVars::new(&cfg, &board, &root_uuid),
    };
    let boot_files = match &ab_staged {
        Some(s) => s.boot.shared.clone(),
        None => collect_boot_files(&staging, &board, &cfg, &vars)?,
    };
    // Files written above carry the build's time; clamp them (reproducible builds).
    repro::clamp_tree_times(&staging, disk::source_date_epoch())?;
    p.done(&format!(
        "{} files for the boot partition",
        boot_files.len()
    ));

    p.stage("assembling the disk image");
    let usage = disk::tree_usage(&staging)?;
    let raw = out.join(format!("{name}.img"));
    let raw_tmp = atomic::temp_path(&raw);
    let _ = std::fs::remove_file(&raw_tmp);
    // Removes the raw temporary on failure, or when raw was only an intermediate.
    let _raw_guard = atomic::TempGuard::new(raw_tmp.clone());
    let ab_disk = match &ab_staged {
        Some(s) => Some(crate::update::image::build_disk(
            &raw_tmp,
            s,
            &crate::update::image::DiskInputs {
                staging: &staging,
                board: &board,
                size: cfg.image.size,
                ids: &ids,
                seed: &seed,
                usage,
            },
        )?),
        None => None,
    };
    let layout = match &ab_disk {
        Some(d) => crate::update::assemble::as_disk_layout(&d.layout),
        None => disk::plan(
            &board,
            cfg.image.size,
            disk::ext4_size_for(usage, board.root.headroom.bytes()),
        )?,
    };
    if ab_disk.is_none() {
        disk::create_with_table(&raw_tmp, &board, &layout, &ids)?;
        fat::write_fat(
            &raw_tmp,
            layout.boot,
            &board.boot.label,
            ids.fat_volume_id,
            &boot_files,
        )?;
        disk::mkfs_root(
            &raw_tmp,
            &layout,
            &board.root.label,
            &ids.root_fs_uuid,
            &staging,
        )?;
        if let Some(epoch) = manifest::source_date_epoch_env() {
            repro::fix_ext4_times(&raw_tmp, layout.root.start, epoch)?;
        }
        if let Some(s) = &board.boot.syslinux {
            disk::install_syslinux(&raw_tmp, &layout, &s.dir)?;
            fat::sync_backup_boot_sector(&raw_tmp, layout.boot)?;
        }
    }
    // Preallocated zeros become holes: a sparse image whose map does not depend on the
    // page cache (see bmap::punch_unwritten).
    bmap::punch_unwritten(&raw_tmp)?;
    p.done(&format!(
        "{} MiB disk: boot {} MiB, root {} MiB ({} MiB of files)",
        layout.total >> 20,
        layout.boot.size >> 20,
        layout.root.size >> 20,
        usage >> 20
    ));

    // Every artifact is written under a temporary name; all are renamed only once all exist.
    let mut pending = output::Pending::default();
    let secret = embeds_secret(&cfg);
    for f in &formats {
        p.stage(&format!("writing {}", f.as_str()));
        let raw_size = std::fs::metadata(&raw_tmp)?.len();
        let dest = match f {
            Format::Raw => raw.clone(),
            Format::Qcow2 => out.join(format!("{name}.qcow2")),
            Format::Zst => out.join(format!("{name}.img.zst")),
            Format::Bmap => out.join(format!("{name}.img.bmap")),
            Format::Pxe => out.join(pxe::SET_DIR),
            Format::Update => out.join(crate::update::output::SET_DIR),
        };
        if secret && matches!(f, Format::Raw | Format::Qcow2 | Format::Zst) {
            pending.private(&dest);
        }
        let mut detail = dest.display().to_string();
        match f {
            Format::Raw => {
                pending.add_existing(raw_tmp.clone(), dest.clone());
                let a = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&raw_tmp)?);
                detail = format!(
                    "{detail}: {} MiB, {} MiB allocated (sparse)",
                    raw_size >> 20,
                    (a * 512) >> 20
                );
            }
            Format::Qcow2 => {
                let bar = p.bytes(raw_size);
                pending.add(dest.clone(), |tmp| output::qcow2(&raw_tmp, tmp, &bar))?
            }
            Format::Zst => {
                let bar = p.bytes(raw_size);
                pending.add(dest.clone(), |tmp| output::zstd(&raw_tmp, tmp, &bar))?
            }
            Format::Bmap => {
                let f = std::fs::File::open(&raw_tmp)?;
                let data: u64 = bmap::data_extents(&f)?.iter().map(|(s, e)| e - s).sum();
                let bar = p.bytes(data);
                let mut mapped = 0;
                pending.add(dest.clone(), |tmp| {
                    let m = bmap::create(&raw_tmp, &mut |n| bar.inc(n))?;
                    mapped = m.mapped_bytes();
                    Ok(std::fs::write(tmp, bmap::to_xml(&m))?)
                })?;
                detail = format!("{detail}: {} MiB mapped", mapped >> 20);
            }
            Format::Update => {
                let (s, d) = ab_staged
                    .as_ref()
                    .zip(ab_disk.as_ref())
                    .context("no [update]")?;
                let summary = crate::update::output::write(
                    &mut pending,
                    &out,
                    &s.work.path().join("release"),
                    s.plan
                        .update
                        .signing_key_file
                        .as_deref()
                        .context("no signing key")?,
                    &crate::update::output::UpdateInputs {
                        plan: &s.plan,
                        board_name: board.name.as_str(),
                        root_image: &d.root_fs,
                        boot: d.release_boot(s)?,
                    },
                )?;
                p.println(&format!("clutch:       {summary}"));
            }
            Format::Pxe => {
                let node_config = node_config_toml(&cfg)?;
                let summary = pxe::write(
                    &mut pending,
                    &out,
                    &pxe::PxeInputs {
                        staging: &staging,
                        cfg: &cfg,
                        board: &board,
                        name: &name,
                        node_config: &node_config,
                        secret,
                    },
                )?;
                p.println(&format!("clutch:       {summary}"));
            }
        }
        p.done(&detail);
    }

    p.stage("checksums and manifest");
    let bar = p.bytes(pending.unhashed_bytes());
    let images = pending.hash_all(&out, &bar)?;
    let mut m = manifest::Manifest {
        manifest_version: 1,
        name: name.clone(),
        clutch_version: env!("CARGO_PKG_VERSION").to_string(),
        config_sha256: manifest::config_digest(&text),
        build_seed: seed.clone(),
        board: board.name.to_string(),
        arch: board.arch.clone(),
        suite: cfg.suite.to_string(),
        mirror: cfg.mirror().to_string(),
        rootfs_key: spec.key(),
        source_date_epoch: manifest::source_date_epoch_env(),
        image_size: layout.total,
        partition_table: format!("{:?}", board.partition_table).to_lowercase(),
        disk_guid: ids.disk_guid.to_string(),
        partitions: vec![
            manifest::Partition {
                number: 1,
                name: "boot".into(),
                filesystem: "vfat".into(),
                label: board.boot.label.clone(),
                partuuid: boot_uuid.clone(),
                offset: layout.boot.start,
                size: layout.boot.size,
            },
            manifest::Partition {
                number: 2,
                name: "root".into(),
                filesystem: "ext4".into(),
                label: board.root.label.clone(),
                partuuid: root_uuid.clone(),
                offset: layout.root.start,
                size: layout.root.size,
            },
        ],
        packages: manifest::installed_packages(&staging)?,
        artifacts: images
            .iter()
            .map(|w| manifest::Artifact {
                name: w.name.clone(),
                size: w.size,
                sha256: w.sha256.clone(),
            })
            .collect(),
    };
    if let Some(d) = &ab_disk {
        m.partitions = d.manifest_partitions(&seed, &board);
    }
    let manifest_json = serde_json::to_string_pretty(&m)? + "\n";
    pending.add(out.join("manifest.json"), |tmp| {
        Ok(std::fs::write(tmp, &manifest_json)?)
    })?;
    if let Some(json) = manifest::imager_json(&name, &board, &images, opts.url_base.as_deref())? {
        pending.add(out.join(format!("{name}.rpi-imager.json")), |tmp| {
            Ok(std::fs::write(tmp, &json)?)
        })?;
    }
    let written = pending.commit(&out.join("SHA256SUMS"), &bar)?;
    p.done(&format!(
        "{} artifacts in {}, {} packages listed",
        written.len(),
        out.display(),
        m.packages.len()
    ));
    let seconds = p.elapsed();
    p.println(&format!("clutch: built {name} in {seconds:.1}s"));
    // The main artifact: the first requested image format (a bmap only describes one).
    let main_artifact = written
        .iter()
        .find(|w| {
            !w.name.ends_with(".bmap") && !w.name.ends_with(".json") && w.name != "SHA256SUMS"
        })
        .map(|w| w.path.clone())
        .context("no artifact was requested")?;
    Ok(BuildResult {
        main_artifact,
        artifacts: written.iter().map(|w| w.path.clone()).collect(),
        rootfs_cached: cached,
        written,
        seconds,
    })
}

fn collect_boot_files(
    staging: &Path,
    board: &Board,
    cfg: &ImageConfig,
    vars: &TemplateVars,
) -> Result<Vec<FatFile>> {
    let mut files = Vec::new();
    for f in &board.boot.files {
        let src = crate::bootfiles::resolve_pattern(staging, &f.from)?.unwrap_or_default();
        if src.is_dir() {
            add_dir(&src, &f.to, &mut files)?;
        } else if src.is_file() {
            files.push(FatFile {
                path: f.to.clone(),
                data: std::fs::read(&src)?,
            });
            if f.link_from_root {
                crate::bootfiles::link_to_boot_copy(staging, &src, &board.boot.mount, &f.to)?;
            }
        } else if !f.optional {
            bail!(
                "the board needs {} from the root filesystem, but the image has no such file",
                f.from
            );
        }
    }
    for t in &board.boot.templates {
        files.push(FatFile {
            path: t.path.clone(),
            data: vars.render(&t.content).into_bytes(),
        });
    }
    files.push(FatFile {
        path: "clutch.toml".into(),
        data: node_config_toml(cfg)?.into_bytes(),
    });
    Ok(files)
}

fn add_dir(src: &Path, to: &str, files: &mut Vec<FatFile>) -> Result<()> {
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let dest = format!("{to}/{name}");
        if p.is_dir() {
            add_dir(&p, &dest, files)?;
        } else {
            files.push(FatFile {
                path: dest,
                data: std::fs::read(&p)?,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::image_config as cfg;

    #[test]
    fn cmdline_has_root_console_and_cgroups() {
        let b = crate::testutil::board("amd64");
        let c = kernel_cmdline(&cfg("[kernel]\ncmdline = [\"quiet\"]\n"), &b, "ROOT");
        assert!(c.starts_with("root=PARTUUID=ROOT "), "{c}");
        assert!(c.contains("console=ttyS0,115200"));
        assert!(c.contains("cgroup_enable=memory cgroup_memory=1"));
        assert!(c.ends_with(" quiet"));
        let c = kernel_cmdline(&cfg("[kernel]\ncgroups = false\n"), &b, "ROOT");
        assert!(!c.contains("cgroup"));
    }

    #[test]
    fn node_config_on_fat_has_wpa_key_not_passphrase() {
        let c = cfg("[wifi]\nssid = \"IEEE\"\npsk = \"password\"\ncountry = \"GB\"\n");
        let t = node_config_toml(&c).unwrap();
        assert!(!t.contains("\"password\""), "{t}");
        assert!(t.contains("f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"));
        // What we write, firstboot can read back.
        let n = clutch_config::parse_node_config(Path::new("clutch.toml"), &t).unwrap();
        assert_eq!(n.user.unwrap().name.as_str(), "admin");
    }
}
