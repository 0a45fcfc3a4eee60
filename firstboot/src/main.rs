use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use clutch_firstboot::facts::{self, Paths};
use clutch_firstboot::status::{self, StatusBoard};
use clutch_firstboot::sys::RealSys;

/// First-boot service of clutch images: applies clutch.toml, sets up storage, reports status.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Root directory of the node (everything is looked up under it).
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    /// Mount point of the FAT partition holding clutch.toml, as seen on the node
    /// [default: /boot/efi or /boot/firmware, whichever has clutch.toml]
    #[arg(long, global = true, env = "CLUTCH_BOOT_DIR")]
    boot_dir: Option<PathBuf>,
    /// More logging (debug); RUST_LOG overrides.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Configure the node (what the systemd unit runs; the default).
    Run,
    /// Print the node's status (from /run/clutch/status.json).
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print what `run` would do, without doing it.
    Plan,
    /// Look for a newer signed release at `[update] source` (A/B images). With --now:
    /// download and check it, write the inactive root slot, reboot into it; it is
    /// committed once the node is ready again, else rolled back.
    Update {
        /// Apply the newest release now (without: only say whether one is offered).
        #[arg(long)]
        now: bool,
        /// Boot the other slot's release again and never retry this one.
        #[arg(long, conflicts_with = "now")]
        rollback: bool,
        /// At boot (clutch-update-health.service): commit or roll back a release on trial.
        #[arg(long, hide = true, conflicts_with_all = ["now", "rollback"])]
        health: bool,
    },
}

fn boot_dir(root: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        ["/boot/efi", "/boot/firmware"]
            .iter()
            .map(PathBuf::from)
            .find(|d| {
                root.join(d.strip_prefix("/").unwrap_or(d))
                    .join("clutch.toml")
                    .exists()
            })
            .unwrap_or_else(|| PathBuf::from("/boot/efi"))
    })
}

/// Peak resident set size (getrusage `ru_maxrss`, KiB) of this process and of the largest
/// child process it waited for (ssh-keygen, resize2fs, mkfs.ext4, ...).
fn peak_rss_kib() -> (i64, i64) {
    let get = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(who, &mut ru) } == 0 {
            ru.ru_maxrss
        } else {
            -1
        }
    };
    (get(libc::RUSAGE_SELF), get(libc::RUSAGE_CHILDREN))
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if cli.verbose { "debug" } else { "info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("clutch-firstboot: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let paths = Paths::new(&cli.root, boot_dir(&cli.root, cli.boot_dir));
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            // Netboot (`clutch.config=` on the kernel command line): clutch.toml comes from
            // the server. Nothing happens on a disk image.
            let fetch_error = match clutch_firstboot::netconfig::prepare_from_server(&paths) {
                Ok(Some(url)) => {
                    tracing::info!("node config fetched from {url}");
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::error!("{e}");
                    println!("clutch: {e}");
                    Some(e)
                }
            };
            let mut board = StatusBoard::new(
                paths.status_file(),
                Box::new(|line| {
                    // stdout goes to the journal; the console (serial included) gets the
                    // line as it is, without journald's `clutch-firstboot[pid]:` prefix.
                    status::print_console(line);
                }),
            );
            // A card pulled from a node that never came up says why.
            let fat_dir = paths.host(&paths.boot_dir);
            if fat_dir.is_dir() {
                board = board.with_report(
                    fat_dir.join(status::REPORT_FILE),
                    Box::new(status::addresses),
                );
            }
            let os_release = std::fs::read_to_string(paths.host("/etc/os-release"));
            if let Some(r) = os_release
                .ok()
                .and_then(|t| clutch_firstboot::update::slot::image_version(&t))
            {
                board.set_release(r.to_string());
            }
            let report =
                clutch_firstboot::run::run(&paths, &RealSys, &board, true, fetch_error.as_deref());
            // A failed node still boots: the error is in the status, the exit code is 0.
            let (own, children) = peak_rss_kib();
            tracing::info!(
                "finished with phase={} (peak RSS {own} KiB; largest child process {children} KiB)",
                report.phase
            );
            Ok(())
        }
        Command::Status { json } => {
            let p = paths.status_file();
            let s = status::read_status(&p)
                .with_context(|| format!("cannot read the status from {}", p.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.human());
            }
            Ok(())
        }
        Command::Update {
            now,
            rollback,
            health,
        } => {
            use clutch_firstboot::update::cli::{Mode, main};
            let mode = match (now, rollback, health) {
                (_, _, true) => Mode::Health,
                (_, true, _) => Mode::Rollback,
                (true, _, _) => Mode::Now,
                _ => Mode::Check,
            };
            std::process::exit(main(&paths, mode))
        }
        Command::Plan => {
            let loaded =
                clutch_firstboot::load::load(&paths, &clutch_firstboot::load::read_sources(&paths));
            // (The salt of a plain-text password's hash is left zero: `plan` writes nothing.)
            let loaded = loaded.context("the node config is not usable")?;
            let mut f = facts::gather_for(&paths, Some(&loaded.config));
            f.hold = clutch_firstboot::hold::requested(&RealSys);
            let fresh = clutch_firstboot::plan::Fresh {
                node_id: "0".repeat(32),
                machine_id: "0".repeat(32),
            };
            let plan = clutch_firstboot::plan::plan(&paths, &f, &loaded, &fresh)?;
            println!("hostname: {}", plan.hostname);
            for n in &plan.notes {
                println!("note: {n}");
            }
            for w in &plan.warnings {
                println!("warning: {w}");
            }
            for s in &plan.steps {
                println!("{}{}:", s.name, if s.marker { " (once)" } else { "" });
                for a in &s.actions {
                    println!("  {a:?}");
                }
            }
            Ok(())
        }
    }
}
