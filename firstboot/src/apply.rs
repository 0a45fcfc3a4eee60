//! Carrying out a [`Plan`]: file writes under the root, everything else through [`Sys`].

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::facts::Paths;
use crate::fsx;
use crate::plan::{Action, Owner, Plan, Step};
use crate::status::StorageStatus;
use crate::sys::Sys;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `step: error` for every step that failed (the other steps still ran).
    pub errors: Vec<String>,
    pub storage: Vec<StorageStatus>,
}

pub fn apply(plan: &Plan, paths: &Paths, sys: &dyn Sys) -> Outcome {
    let mut out = Outcome::default();
    let mut loops = std::collections::BTreeMap::new();
    for step in &plan.steps {
        match run_step(step, paths, sys, &mut loops) {
            Ok(()) => tracing::debug!("step {} done", step.name),
            Err(e) => {
                tracing::error!("step {}: {e}", step.name);
                out.errors.push(format!("{}: {e}", step.name));
            }
        }
    }
    // What the steps wrote through external commands (ssh-keygen, useradd, resize2fs,
    // mkfs) has no fsync of its own: make it durable before the node says it is ready, so
    // a power cut after that cannot take it back (new host keys after users saw the old).
    if let Err(e) = sys.syncfs(&paths.root) {
        tracing::warn!("syncfs {}: {e}", paths.root.display());
    }
    out.storage = plan
        .storage
        .iter()
        .map(|s| StorageStatus {
            name: s.name.clone(),
            device: format!("/dev/clutch/{}", s.name),
            loop_device: loops
                .get(&s.name)
                .map(|n| format!("/dev/loop{n}"))
                .unwrap_or_default(),
            size_bytes: s.size,
            mount: s.mount.clone(),
        })
        .collect();
    out
}

fn run_step(
    step: &Step,
    paths: &Paths,
    sys: &dyn Sys,
    loops: &mut std::collections::BTreeMap<String, u32>,
) -> io::Result<()> {
    for a in &step.actions {
        tracing::debug!("{}: {a:?}", step.name);
        do_action(a, paths, sys, loops)
            .map_err(|e| io::Error::new(e.kind(), format!("{a:?}: {e}")))?;
    }
    if step.marker {
        fsx::write_atomic(&paths.marker(&step.name), b"", 0o644)?;
    }
    Ok(())
}

fn resolve_owner(paths: &Paths, owner: &Owner, path: &Path) -> io::Result<Option<(u32, u32)>> {
    Ok(match owner {
        Owner::Root => None,
        Owner::Keep => fs::metadata(path).ok().map(|m| (m.uid(), m.gid())),
        Owner::User(u) => {
            let passwd = fs::read_to_string(paths.host("/etc/passwd")).unwrap_or_default();
            let e = clutch_config::account::find_user(&passwd, u).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("user {u} is not in /etc/passwd"),
                )
            })?;
            Some((e.uid, e.gid))
        }
    })
}

fn do_action(
    a: &Action,
    paths: &Paths,
    sys: &dyn Sys,
    loops: &mut std::collections::BTreeMap<String, u32>,
) -> io::Result<()> {
    match a {
        Action::WriteFile {
            path,
            contents,
            mode,
            owner,
            ..
        } => {
            let host = paths.host(path);
            let own = resolve_owner(paths, owner, &host)?;
            let mode = match owner {
                Owner::Keep => fs::metadata(&host)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(*mode),
                _ => *mode,
            };
            if fsx::write_if_changed(&host, contents, mode)? {
                tracing::info!("wrote {}", path.display());
            }
            if let Some((u, g)) = own {
                sys.chown(&host, u, g)?;
            }
        }
        Action::MkDir { path, mode, owner } => {
            let host = paths.host(path);
            if !host.is_dir() {
                fsx::create_dir_all_durable(&host)?;
                fs::set_permissions(&host, fs::Permissions::from_mode(*mode))?;
            }
            if let Some((u, g)) = resolve_owner(paths, owner, &host)? {
                sys.chown(&host, u, g)?;
            }
        }
        Action::Symlink { path, target } => fsx::symlink_replace(target, &paths.host(path))?,
        Action::Remove { path } => match fs::remove_file(paths.host(path)) {
            Ok(()) => {
                tracing::info!("removed {}", path.display());
                if let Some(d) = paths.host(path).parent() {
                    fsx::sync_dir(d);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        },
        Action::Overwrite {
            path,
            ranges,
            fill,
            len,
        } => overwrite(&paths.host(path), ranges, *fill, *len)?,
        Action::SetHostname(h) => sys.sethostname(h.as_str())?,
        Action::Run(cmd) => sys.run(cmd)?,
        Action::SparseFile { path, size } => {
            let host = paths.host(path);
            let existed = host.exists();
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&host)?;
            fs::set_permissions(&host, fs::Permissions::from_mode(0o600))?;
            let len = f.metadata()?.len();
            if len < *size {
                // ftruncate: sparse, no blocks allocated. Growing never touches the data
                // already there, so a power cut before the attach loses nothing.
                f.set_len(*size)?;
                f.sync_all()?;
            }
            if !existed {
                // The new name must survive a power cut too.
                if let Some(parent) = host.parent() {
                    fsx::sync_dir(parent);
                }
            }
            if len > *size {
                tracing::warn!(
                    "{} is {len} bytes, more than the configured {size}; not shrinking it",
                    path.display()
                );
            }
        }
        Action::AttachLoop {
            name,
            backing,
            attached,
        } => {
            let n = match attached {
                Some(n) => *n,
                None => sys.attach_loop(&paths.host(backing), &paths.host("/dev"))?,
            };
            tracing::info!("{} on /dev/loop{n}", backing.display());
            fsx::symlink_replace(
                Path::new(&format!("/dev/loop{n}")),
                &paths.host(format!("/dev/clutch/{name}")),
            )?;
            loops.insert(name.clone(), n);
        }
        Action::Mount {
            source,
            target,
            fstype,
        } => sys.mount(&paths.host(source), &paths.host(target), fstype)?,
        Action::GrowPartition { disk, partno, kind } => {
            sys.grow_partition(&paths.host(disk), *partno, *kind)?
        }
        Action::LinksUp(names) => sys.links_up(names)?,
        Action::Hold(point) => sys.hold(*point)?,
    }
    Ok(())
}

/// Overwrites byte ranges of an existing regular file in place (never through a link) and
/// makes it durable. A file that is gone needs nothing.
fn overwrite(p: &Path, ranges: &[std::ops::Range<u64>], fill: u8, len: u64) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = match fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let m = f.metadata()?;
    if !m.is_file() || m.len() != len {
        return Err(io::Error::other(format!(
            "{} changed since it was read ({} bytes, expected {len}); not overwritten",
            p.display(),
            m.len()
        )));
    }
    for r in ranges {
        let r = r.start.min(len)..r.end.min(len);
        f.write_all_at(&vec![fill; (r.end - r.start) as usize], r.start)?;
    }
    f.sync_all()?;
    tracing::info!(
        "overwrote {} byte range(s) of {} in place",
        ranges.len(),
        p.display()
    );
    Ok(())
}
