//! The config schema shared by `clutch` (the builder) and `clutch-firstboot`.
//!
//! Every loader returns a [`ConfigError`] whose message names `file:line:col` and the key.

pub mod ab;
pub mod account;
pub mod board;
pub mod diag;
pub mod phase;
pub mod release;
pub mod schema;
pub mod types;
pub mod update;
pub mod zone;

use std::path::{Path, PathBuf};

pub use board::{Board, TEMPLATE_PLACEHOLDERS};
pub use diag::{Diagnostic, Invalid, KeyPath};
pub use phase::Phase;
pub use release::Release;
pub use schema::*;
pub use types::*;
pub use update::{AbBoard, AbScheme, NodeUpdate, UpdateCheck, UpdateSection, UpdateSource};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

impl ConfigError {
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            ConfigError::Invalid(d) => Some(d),
            ConfigError::Read { .. } => None,
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_checked<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
    check: impl FnOnce(&mut T) -> Result<(), Invalid>,
) -> Result<T, ConfigError> {
    let mut v: T = diag::parse_toml(path, text).map_err(|d| ConfigError::Invalid(Box::new(d)))?;
    check(&mut v).map_err(|inv| ConfigError::Invalid(Box::new(diag::locate(path, text, inv))))?;
    Ok(v)
}

/// Things in a valid image config that deserve a word (a hand-made cluster token), each
/// located like an error.
pub fn warnings(path: &Path, text: &str, cfg: &ImageConfig) -> Vec<Diagnostic> {
    let mut w = Vec::new();
    if let Some(c) = &cfg.cluster {
        if let Some(why) = c.token.as_ref().and_then(Token::weakness) {
            let key = if c.token_file.is_some() {
                "cluster.token_file"
            } else {
                "cluster.token"
            };
            w.push(diag::locate(
                path,
                text,
                Invalid::new(
                    key,
                    format!("this token looks made by hand ({why}); make one with `clutch token`"),
                ),
            ));
        }
    }
    w
}

/// Parses and validates an image config; `*_file` secrets are read relative to its folder.
pub fn parse_image_config(path: &Path, text: &str) -> Result<ImageConfig, ConfigError> {
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    parse_checked(path, text, |c: &mut ImageConfig| {
        c.validate()?;
        c.resolve_secret_files(&base)?;
        c.validate()
    })
}

pub fn load_image_config(path: &Path) -> Result<ImageConfig, ConfigError> {
    parse_image_config(path, &read(path)?)
}

/// Parses and validates a node config (`clutch.toml`).
pub fn parse_node_config(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
    parse_checked(path, text, |c: &mut NodeConfig| c.validate())
}

pub fn parse_board(path: &Path, text: &str) -> Result<Board, ConfigError> {
    parse_checked(path, text, |b: &mut Board| b.validate())
}

pub fn load_board(path: &Path) -> Result<Board, ConfigError> {
    parse_board(path, &read(path)?)
}
