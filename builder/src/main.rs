use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use clutch_builder::{build, data, doctor, flash, serve};
use clutch_config::Format;

mod lab_cli;

/// clutch: build bootable cluster-node images from one TOML file.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image described by CONFIG; the last stdout line is the main artifact's path.
    Build {
        config: PathBuf,
        /// Output folder (default: ./out/<config name>/).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Cache folder for root filesystems and downloads (default: ~/.cache/clutch).
        #[arg(long, env = "CLUTCH_CACHE")]
        cache: Option<PathBuf>,
        /// Output formats, comma separated (raw,qcow2,zst,bmap,pxe,update); default: the config's.
        #[arg(long, value_delimiter = ',', value_parser = parse_format)]
        format: Option<Vec<Format>>,
        /// Folder holding boards/ and overlays/ (default: found next to the config).
        #[arg(long, env = "CLUTCH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The clutch-firstboot binary to put in the image (default: next to clutch).
        #[arg(long, env = "CLUTCH_FIRSTBOOT_BIN")]
        firstboot_bin: Option<PathBuf>,
        /// Print a JSON result (artifacts, sizes, sha256) on stdout instead of the path.
        #[arg(long)]
        json: bool,
        /// Where the Raspberry Pi Imager list's image URLs point: the folder the outputs are
        /// published at (https://..., or file:///... for a local folder). Default: URLs
        /// relative to the JSON file.
        #[arg(long)]
        url_base: Option<String>,
    },
    /// Write IMAGE onto DEVICE (a disk, or a file): through IMAGE.bmap when it exists (only
    /// mapped blocks, each checked), else a full copy; then read back and verify.
    Flash {
        image: PathBuf,
        device: PathBuf,
        /// The block map to use (default: IMAGE.bmap when present).
        #[arg(long)]
        bmap: Option<PathBuf>,
        /// Copy the whole image even when a bmap exists.
        #[arg(long, conflicts_with = "bmap")]
        no_bmap: bool,
        /// Do not read back what was written.
        #[arg(long)]
        no_verify: bool,
        /// Print a JSON result on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Validate CONFIG (and its board and overlays) without building.
    Check {
        config: PathBuf,
        #[arg(long, env = "CLUTCH_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// List the host tools a build needs and whether each is present.
    Doctor,
    /// Print a new random cluster token (256 bits, as 64 hex digits) on stdout.
    Token,
    /// Write a new release-signing key to FILE (mode 0600) and its public half to FILE.pub;
    /// name FILE in `[update] signing_key_file`. Never overwrites an existing key.
    UpdateKey { file: PathBuf },
    /// A local lab: N VMs of a built amd64 image in a private network namespace.
    Lab {
        #[command(subcommand)]
        cmd: lab_cli::LabCmd,
    },
    /// Serve a netboot set (the `pxe/` folder of a build) over HTTP: its files with Range
    /// support, and each node's config at /config/<mac> (DIR/config/<mac12hex>.toml, else
    /// DIR/config/default.toml, else DIR/clutch.toml). Prints the URL on stdout; logs each
    /// request on stderr.
    Serve {
        dir: PathBuf,
        /// Address and port to listen on (boot.ipxe defaults to port 8080 on the DHCP server).
        #[arg(long, default_value = serve::DEFAULT_LISTEN)]
        listen: String,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        "zst" => Ok(Format::Zst),
        "bmap" => Ok(Format::Bmap),
        "pxe" => Ok(Format::Pxe),
        "update" => Ok(Format::Update),
        _ => Err(format!(
            "unknown format `{s}` (raw, qcow2, zst, bmap, pxe, update)"
        )),
    }
}

fn init_logging(verbose: u8, serving: bool) {
    let default = match verbose {
        // `clutch serve` logs every request at info level.
        0 if serving => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(command: Cmd) -> Result<bool> {
    match command {
        Cmd::Build {
            config,
            out,
            cache,
            format,
            data_dir,
            firstboot_bin,
            json,
            url_base,
        } => {
            let r = build::build(&build::BuildOpts {
                config,
                out,
                cache,
                formats: format,
                data_dir,
                firstboot_bin,
                url_base,
            })?;
            if json {
                let v = serde_json::json!({
                    "main_artifact": r.main_artifact,
                    "artifacts": r.written,
                    "rootfs_cached": r.rootfs_cached,
                    "seconds": r.seconds,
                });
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("{}", r.main_artifact.display());
            }
            Ok(true)
        }
        Cmd::Flash {
            image,
            device,
            bmap,
            no_bmap,
            no_verify,
            json,
        } => {
            let mut p = clutch_builder::progress::Progress::new(1);
            p.stage(&format!(
                "flashing {} to {}",
                image.display(),
                device.display()
            ));
            let mut bar = p.bytes(0);
            let r = flash::flash(
                &flash::RealSys,
                &flash::FlashOpts {
                    image,
                    target: device,
                    bmap,
                    no_bmap,
                    no_verify,
                },
                &mut bar,
            )?;
            p.done(&format!(
                "{} MiB written ({}), {:.1}s{}",
                r.bytes_written >> 20,
                if r.mode == "bmap" {
                    "mapped blocks by bmap"
                } else {
                    "whole image"
                },
                r.write_seconds,
                if r.verified {
                    format!(", verified in {:.1}s", r.verify_seconds)
                } else {
                    String::new()
                }
            ));
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", r.target.display());
            }
            Ok(true)
        }
        Cmd::Check { config, data_dir } => {
            let (_, cfg, board) = data::load(data_dir.as_deref(), &config)?;
            let text = std::fs::read_to_string(&config)?;
            for w in clutch_config::warnings(&config, &text, &cfg) {
                eprintln!("clutch: warning: {w}");
            }
            println!(
                "{}: ok (board {}, {} {})",
                config.display(),
                board.name,
                cfg.suite,
                board.arch
            );
            if let Some(u) = &cfg.user {
                // decide_without_root accepted it while loading; say what it will become.
                if let Ok(a) = clutch_config::account::decide_without_root(&u.name) {
                    println!(
                        "note: user.name: {}. Checked against Debian's base-passwd tables and the \
                         accounts clutch's own packages add; the build has the final word, checking \
                         the image's /etc/passwd and /etc/group once its packages are installed.",
                        a.describe(u.name.as_str())
                    );
                }
            }
            Ok(true)
        }
        Cmd::Doctor => {
            let (report, ok) = doctor::report(&doctor::all_tools());
            print!("{report}");
            for w in doctor::warnings() {
                println!("warning: {w}");
            }
            Ok(ok)
        }
        Cmd::Token => {
            let bytes: [u8; 32] = rand::random();
            println!("{}", hex::encode(bytes));
            Ok(true)
        }
        Cmd::UpdateKey { file } => {
            clutch_builder::update::key::generate(&file, rand::random())?;
            eprintln!(
                "clutch: wrote the release-signing key {} (keep it off the nodes) and its public half {}",
                file.display(),
                clutch_builder::update::key::public_path(&file).display()
            );
            println!("{}", file.display());
            Ok(true)
        }
        // Exits with its own code (`lab exec`): handled in main.
        Cmd::Lab { .. } => unreachable!("lab runs from main"),
        Cmd::Serve { dir, listen } => {
            serve::run(&dir, &listen)?;
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, matches!(cli.command, Cmd::Serve { .. }));
    let r = match cli.command {
        Cmd::Lab { cmd } => lab_cli::run(cmd),
        command => run(command).map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("clutch: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
