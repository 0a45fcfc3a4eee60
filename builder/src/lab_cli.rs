//! The `clutch lab` command line: parses the verbs and prints; the work is in
//! `clutch_builder::lab`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clutch_builder::build;
use clutch_builder::lab::fresh::{self, Freshness};
use clutch_builder::lab::status::NodeStatus;
use clutch_builder::lab::vm::AccelChoice;
use clutch_builder::lab::wait::{self, Glance, LabObserver, Observer, RealClock, WaitOpts};
use clutch_builder::lab::{LabState, NodeIndex, RealHost, console, ops, plan};
use clutch_config::{Format, Phase};

const DEFAULT_DIR: &str = "clutch-lab";

fn parse_phase(s: &str) -> Result<Phase, String> {
    match Phase::parse(s) {
        Some(Phase::Failed) => Err("`failed` is not a phase to wait for".into()),
        Some(p) => Ok(p),
        None => Err(format!(
            "unknown phase `{s}` (configuring, discovering, bootstrapping, joining, ready)"
        )),
    }
}

/// `clutch lab up`'s options.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    config: PathBuf,
    /// How many VMs.
    #[arg(long)]
    nodes: usize,
    /// Folder for overlays, pidfiles, console logs, access keys and lab.json.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// The image to boot [default: ./out/<config name>/<config name>.img].
    #[arg(long, conflicts_with = "build")]
    image: Option<PathBuf>,
    /// Build the image first (into ./out/<config name>/) when it is missing or older than
    /// its config, board, overlays or the clutch binaries.
    #[arg(long)]
    build: bool,
    /// Root-filesystem cache for --build (default: ~/.cache/clutch).
    #[arg(long, env = "CLUTCH_CACHE")]
    cache: Option<PathBuf>,
    /// Folder holding boards/ and overlays/ for --build (default: found next to the config).
    #[arg(long, env = "CLUTCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Memory per VM in MiB.
    #[arg(long, default_value_t = 768)]
    memory: u32,
    /// auto (KVM when it works, else TCG), kvm (or fail), tcg.
    #[arg(long, default_value = "auto", value_parser = |s: &str| s.parse::<AccelChoice>())]
    accel: AccelChoice,
    /// Block until every node reaches PHASE (e.g. `ready`); exit non-zero as soon as a node
    /// is `failed` or its VM stays off for 20 s, or at the timeout, saying why.
    #[arg(long, value_name = "PHASE", value_parser = parse_phase)]
    wait: Option<Phase>,
    /// Seconds --wait may take from power-on [default: 600 + 120 per node under TCG,
    /// 120 + 30 per node under KVM].
    #[arg(long, value_name = "S", requires = "wait")]
    timeout: Option<u64>,
}

/// `clutch lab` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Boot N VMs of the built amd64 image of CONFIG on a private segment in a new network
    /// namespace (DHCP from a dnsmasq inside it: node I gets 10.77.0.(11+I)). KVM when a probe
    /// VM boots under it, else TCG. Each VM gets an ephemeral access key (systemd credentials)
    /// for `lab exec` and `lab status`; nothing in CONFIG is needed for that.
    Up(UpArgs),
    /// Each node's phase, role, members, release and address, from its live
    /// /run/clutch/status.json (the console's last phase line when it does not answer; the
    /// `source` column says which).
    Status {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run a command on a node as root (`clutch lab exec 1 -- etcdctl member list`); exits
    /// with its exit code (255: the node could not be reached). Words are passed as they are;
    /// for a pipeline use `-- sh -c '...'`.
    Exec {
        /// The node: its number (`1`) or name (`node1`).
        node: NodeIndex,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(last = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
    /// Print a node's serial console log (every boot; `lab start` marks where each began).
    Logs {
        node: NodeIndex,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
    },
    /// Power a stopped or killed node on again, on its own disk, MAC and address (its
    /// console log is appended to, after a `powered on again` line).
    Start {
        node: NodeIndex,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Cut a node's power (SIGKILL to its QEMU); `lab start` boots it again.
    Kill {
        node: NodeIndex,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Serve an update folder (`update/` of `clutch build --format update`) into the lab
    /// network at http://10.77.0.1:8080/ (the `[update] source` of a lab image) and tell every
    /// node to check now; the nodes update one at a time as the cluster allows. Follow it
    /// with `clutch lab status` (release, slot, update state per node).
    Update {
        folder: PathBuf,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Stop the VMs and remove the namespace and the access keys (safe to run twice; console
    /// logs stay).
    Down {
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}", p.display()))
}

fn existing_lab(dir: &Path) -> Result<LabState> {
    let dir = absolute(dir)?;
    plan::load_state(&dir)?.with_context(|| {
        format!(
            "no lab in {} (no {}); `clutch lab up` first",
            dir.display(),
            plan::STATE_FILE
        )
    })
}

/// Builds the image when `--build` says so and it is missing or stale; returns its path.
fn ensure_image(
    config: &Path,
    image: &Path,
    cache: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<PathBuf> {
    let why = match fresh::judge(&fresh::inputs(config, data_dir.as_deref(), image)?) {
        Freshness::Fresh => {
            eprintln!("clutch lab: {} is up to date", image.display());
            return Ok(image.to_path_buf());
        }
        Freshness::Missing => "it does not exist".to_string(),
        Freshness::Stale(why) => why,
    };
    eprintln!("clutch lab: building {} ({why})", image.display());
    let (_, cfg, _) = clutch_builder::data::load(data_dir.as_deref(), config)?;
    let mut formats = cfg.image.formats.clone();
    if !formats.contains(&Format::Raw) {
        formats.push(Format::Raw);
    }
    let r = build::build(&build::BuildOpts {
        config: config.to_path_buf(),
        out: image.parent().map(Path::to_path_buf),
        cache,
        formats: Some(formats),
        data_dir,
        firstboot_bin: None,
        url_base: None,
    })?;
    if !image.is_file() {
        bail!(
            "the build wrote {}, not {}",
            r.main_artifact.display(),
            image.display()
        );
    }
    Ok(image.to_path_buf())
}

/// Prints each node's phase lines on stderr as they come, while waiting.
struct Progress<'a> {
    inner: LabObserver<'a>,
    shown: RefCell<Vec<Option<String>>>,
    start: Instant,
}

impl Observer for Progress<'_> {
    fn nodes(&self) -> usize {
        self.inner.nodes()
    }
    fn name(&self, i: usize) -> String {
        self.inner.name(i)
    }
    fn glance(&self, i: usize) -> Glance {
        let g = self.inner.glance(i);
        let line = g.last.as_ref().map(|l| l.line.clone());
        let mut shown = self.shown.borrow_mut();
        if line.is_some() && shown[i] != line {
            eprintln!(
                "[{:>4.0}s] {}: {}",
                self.start.elapsed().as_secs_f64(),
                self.name(i),
                line.as_deref().unwrap_or_default()
            );
            shown[i] = line;
        }
        g
    }
    fn statuses(&self) -> Vec<NodeStatus> {
        self.inner.statuses()
    }
    fn console_tail(&self, i: usize, lines: usize) -> (String, String) {
        self.inner.console_tail(i, lines)
    }
}

fn up(a: UpArgs) -> Result<ExitCode> {
    let UpArgs {
        config,
        nodes,
        dir,
        image,
        build,
        cache,
        data_dir,
        memory,
        accel,
        wait: wait_for,
        timeout,
    } = a;
    let name = config
        .file_stem()
        .with_context(|| format!("{}: no file name", config.display()))?
        .to_string_lossy()
        .into_owned();
    let default_image = PathBuf::from("out").join(&name).join(format!("{name}.img"));
    let image = absolute(&image.unwrap_or(default_image))?;
    let image = if build {
        ensure_image(&config, &image, cache, data_dir)?
    } else if image.is_file() {
        image
    } else {
        bail!(
            "image {} not found: build it first (`clutch build {}`), add --build, or pass --image",
            image.display(),
            config.display()
        );
    };
    let size = plan::overlay_size(&image, std::fs::metadata(&image)?.len());
    let accel = ops::choose_accel(&RealHost, accel, &image)?;
    eprintln!("clutch lab: accelerator {} ({})", accel.accel, accel.reason);
    let dir = absolute(&dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let s = plan::plan(&dir, &image, nodes, memory, accel.accel)?;
    ops::up(&RealHost, &s, size)?;
    let powered_on = Instant::now();
    println!("namespace={}", s.namespace);
    println!("accel={}", s.accel);
    for n in &s.nodes {
        println!(
            "{}\tip={}\tmac={}\tpidfile={}\tconsole={}",
            n.name,
            n.ip,
            n.mac,
            n.pidfile.display(),
            n.console.display()
        );
    }
    let Some(target) = wait_for else {
        return Ok(ExitCode::SUCCESS);
    };
    let timeout = timeout
        .map(Duration::from_secs)
        .unwrap_or_else(|| wait::default_timeout(s.accel, nodes));
    eprintln!(
        "clutch lab: waiting up to {}s for phase={target} on all {nodes} nodes",
        timeout.as_secs()
    );
    let o = WaitOpts::new(target, timeout);
    let obs = Progress {
        inner: LabObserver {
            host: &RealHost,
            lab: &s,
        },
        shown: RefCell::new(vec![None; nodes]),
        start: powered_on,
    };
    let out = wait::wait(&obs, &RealClock(powered_on), &o);
    let report = wait::report(&obs, &o, &out);
    if out.ok() {
        eprint!("{report}");
        for r in out.rows() {
            println!("{}", r.line());
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprint!("{report}");
    eprintln!(
        "clutch lab: the lab is still up: `clutch lab logs NODE --dir {d}`, `clutch lab down --dir {d}`",
        d = dir.display()
    );
    Ok(ExitCode::FAILURE)
}

pub fn run(c: LabCmd) -> Result<ExitCode> {
    match c {
        LabCmd::Up(a) => up(a),
        LabCmd::Status { dir, json } => {
            let s = existing_lab(&dir)?;
            let rows = ops::statuses(&RealHost, &s);
            if json {
                let v = serde_json::json!({
                    "namespace": s.namespace,
                    "accel": s.accel,
                    "nodes": rows,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("namespace={}", s.namespace);
                for r in &rows {
                    println!("{}", r.line());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Exec { node, dir, cmd } => {
            let s = existing_lab(&dir)?;
            let code = ops::exec(&RealHost, &s, node, &cmd)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        LabCmd::Logs { node, dir, tail } => {
            let s = existing_lab(&dir)?;
            let n = s.node(node)?;
            let text = ops::console_text(n);
            match tail {
                Some(k) => println!("{}", console::tail(&text, k)),
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(text.as_bytes())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Start { node, dir } => {
            let s = existing_lab(&dir)?;
            let boot = ops::start(&RealHost, &s, node)?;
            let n = s.node(node)?;
            println!(
                "{}\tip={}\tmac={}\tpidfile={}\tconsole={}\tboot={boot}",
                n.name,
                n.ip,
                n.mac,
                n.pidfile.display(),
                n.console.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Kill { node, dir } => {
            let s = existing_lab(&dir)?;
            match ops::kill(&RealHost, &s, node)? {
                Some(pid) => println!("killed {node} (pid {pid})"),
                None => println!("{node} was not running"),
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Update { folder, dir } => {
            let s = existing_lab(&dir)?;
            let folder = absolute(&folder)?;
            let clutch = std::env::current_exe().context("locating the clutch binary")?;
            let r = ops::update(&RealHost, &s, &clutch, &folder)?;
            println!("serving {} at {}", folder.display(), r.url);
            let mut ok = true;
            for (node, code) in &r.told {
                println!(
                    "{node}: told to check now ({})",
                    if *code == 0 {
                        "ok".to_string()
                    } else {
                        format!("exit {code}")
                    }
                );
                ok &= *code == 0;
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCmd::Down { dir } => {
            let dir = absolute(&dir)?;
            let r = ops::down(&RealHost, &dir)?;
            if r.stopped.is_empty() && r.namespace_removed.is_none() {
                println!("nothing running in {}", dir.display());
            }
            for p in &r.stopped {
                println!("stopped {p}");
            }
            if let Some(ns) = &r.namespace_removed {
                println!("removed namespace {ns}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
