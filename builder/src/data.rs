//! Where boards and overlays live: `boards/<name>.toml` and `overlays/<name>/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clutch_config::{Board, ImageConfig};

/// The folder holding `boards/` and `overlays/`.
#[derive(Debug, Clone)]
pub struct DataDir(pub PathBuf);

impl DataDir {
    /// `explicit` (`--data-dir` / `CLUTCH_DATA_DIR`), else the first folder with a `boards/`
    /// among the config's folder and its parents, the current folder and its parents, and
    /// `/usr/share/clutch`.
    pub fn find(explicit: Option<&Path>, config: &Path) -> Result<DataDir> {
        if let Some(d) = explicit {
            if !d.join("boards").is_dir() {
                bail!("{} has no boards/ folder", d.display());
            }
            return Ok(DataDir(d.to_path_buf()));
        }
        let config_dir = std::fs::canonicalize(config)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let cwd = std::env::current_dir().ok();
        let starts = config_dir.into_iter().chain(cwd);
        for start in starts {
            for dir in start.ancestors() {
                if dir.join("boards").is_dir() {
                    return Ok(DataDir(dir.to_path_buf()));
                }
            }
        }
        let system = Path::new("/usr/share/clutch");
        if system.join("boards").is_dir() {
            return Ok(DataDir(system.to_path_buf()));
        }
        bail!(
            "cannot find the boards/ folder next to {} or in /usr/share/clutch; pass --data-dir",
            config.display()
        )
    }

    pub fn board_path(&self, name: &str) -> PathBuf {
        self.0.join("boards").join(format!("{name}.toml"))
    }

    pub fn overlay_path(&self, name: &str) -> PathBuf {
        self.0.join("overlays").join(name)
    }

    pub fn boards(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.0.join("boards"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                if p.extension()? != "toml" {
                    return None;
                }
                Some(p.file_stem()?.to_string_lossy().into_owned())
            })
            .collect();
        v.sort();
        v
    }
}

/// Loads the config's board and checks that its overlays exist; errors are located in the
/// config file.
pub fn resolve(data: &DataDir, config_path: &Path, text: &str, cfg: &ImageConfig) -> Result<Board> {
    let board_path = data.board_path(cfg.board.as_str());
    if !board_path.is_file() {
        let inv = clutch_config::Invalid::new(
            "board",
            format!(
                "there is no board `{}` (no {}); known boards: {}",
                cfg.board,
                board_path.display(),
                data.boards().join(", ")
            ),
        );
        return Err(clutch_config::diag::locate(config_path, text, inv).into());
    }
    let board = clutch_config::load_board(&board_path)?;
    for (i, o) in cfg.overlays.iter().enumerate() {
        let p = data.overlay_path(o.as_str());
        if !p.is_dir() {
            let inv = clutch_config::Invalid::new(
                &format!("overlays[{i}]"),
                format!("there is no overlay `{o}` (no folder {})", p.display()),
            );
            return Err(clutch_config::diag::locate(config_path, text, inv).into());
        }
    }
    Ok(board)
}

/// Reads and validates an image config with its board; every error is located.
pub fn load(data_dir: Option<&Path>, config_path: &Path) -> Result<(DataDir, ImageConfig, Board)> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let cfg = clutch_config::parse_image_config(config_path, &text)?;
    let data = DataDir::find(data_dir, config_path)?;
    let board = resolve(&data, config_path, &text, &cfg)?;
    Ok((data, cfg, board))
}
