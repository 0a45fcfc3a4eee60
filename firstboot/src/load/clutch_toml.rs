//! `clutch.toml` and its secrets. The cluster token, the wifi key and the password hash
//! (inline or in a `*_file` next to it) are moved into `/var/lib/clutch` (mode 0600) and
//! taken off the FAT partition without leaving a copy there:
//!
//! 1. the secret is written to `/var/lib/clutch/<name>` (durable before anything else);
//! 2. its bytes in the old clutch.toml are overwritten in place with tombstones
//!    ([`secret::TOMBSTONE`]) and the file is fsynced — vfat has no copy-on-write, so this
//!    changes the clusters that held it;
//! 3. the file without the secret keys replaces it (a new file, renamed over the old);
//! 4. a `*_file` is overwritten with blanks, fsynced, then unlinked.
//!
//! A power cut anywhere in between loses nothing: a tombstoned key reads as "moved" and the
//! stored copy is used.

use std::path::{Path, PathBuf};

use clutch_config::diag::{self, Diagnostic};
use clutch_config::{NodeConfig, PasswordHash, Token, WifiPsk};

use super::fat::FatText;
use super::secret::{self, TOMBSTONE};
use super::{LoadError, Sources};
use crate::facts::Paths;
use crate::plan::{Action, Owner, write_secret};

pub const TOKEN_FILE: &str = "cluster-token";
pub const PSK_FILE: &str = "wifi-psk";
pub const PASSWORD_HASH_FILE: &str = "password-hash";

/// Keys removed from the FAT copy once their secret is stored.
const MOVED_KEYS: &[(&str, &str)] = &[
    ("cluster", "token"),
    ("cluster", "token_file"),
    ("wifi", "psk"),
    ("wifi", "psk_file"),
    ("user", "password_hash"),
    ("user", "password_hash_file"),
];

/// clutch.toml parsed, its secrets resolved, and the actions that move them.
pub struct ClutchToml {
    pub config: NodeConfig,
    pub token: Option<Token>,
    pub actions: Vec<Action>,
}

/// One secret: where it may be (inline, a file next to clutch.toml, stored) and where it
/// goes.
struct Secret<'a> {
    file_key: &'static str,
    stored_name: &'static str,
    inline: Option<String>,
    file: Option<PathBuf>,
    stored: Option<&'a str>,
}

pub fn load(paths: &Paths, src: &Sources) -> Result<ClutchToml, LoadError> {
    let fat_path = paths.boot_file(super::CLUTCH_TOML);
    let FatText { text, len } = src.clutch_toml.as_ref().map_err(|reason| LoadError::Read {
        path: fat_path.clone(),
        reason: reason.clone(),
    })?;
    let (parsed_text, _) = secret::blank_tombstones(text);
    let located = |d: Diagnostic| LoadError::Invalid(Box::new(d));
    let mut config: NodeConfig = diag::parse_toml(&fat_path, &parsed_text).map_err(located)?;
    let mut actions = Vec::new();
    let mut remove_fat = Vec::new();

    let read_file = |rel: &Path, key: &str| -> Result<String, LoadError> {
        let shown = paths.boot_dir.join(rel);
        match src.secret_files.iter().find(|(p, _)| p == rel) {
            Some((_, Ok(t))) => Ok(t.text.trim_end_matches(['\r', '\n']).to_string()),
            Some((_, Err(e))) => Err(LoadError::Missing {
                key: key.into(),
                message: format!("cannot read {}: {e}", shown.display()),
            }),
            None => Err(LoadError::Missing {
                key: key.into(),
                message: format!("cannot read {}", shown.display()),
            }),
        }
    };
    // Each secret: the FAT's (inline or file) wins and is stored; else the stored one.
    let mut resolve = |s: Secret, actions: &mut Vec<Action>| -> Result<Option<String>, LoadError> {
        let from_fat = match (s.inline, &s.file) {
            (Some(v), _) => Some(v),
            (None, Some(f)) => {
                let v = read_file(f, s.file_key)?;
                remove_fat.push((paths.boot_dir.join(f), f.clone()));
                Some(v)
            }
            (None, None) => None,
        };
        Ok(match from_fat {
            Some(v) => {
                if s.stored != Some(v.as_str()) {
                    actions.push(write_secret(
                        paths.state_node(s.stored_name),
                        format!("{v}\n"),
                    ));
                }
                Some(v)
            }
            None => s.stored.map(str::to_string),
        })
    };

    let mut token = None;
    if let Some(c) = &mut config.cluster {
        let v = resolve(
            Secret {
                file_key: "cluster.token_file",
                stored_name: TOKEN_FILE,
                inline: c.token.take().map(|t| t.expose().to_string()),
                file: c.token_file.take(),
                stored: src.stored_token.as_deref(),
            },
            &mut actions,
        )?;
        let Some(v) = v else {
            return Err(LoadError::Missing {
                key: "cluster.token".into(),
                message: format!(
                    "no token in {} and none stored in {}: add `token = \"...\"` (>= 32 characters) to [cluster]",
                    fat_path.display(),
                    paths.state_node(TOKEN_FILE).display()
                ),
            });
        };
        token = Some(Token::try_from(v).map_err(|m| LoadError::Missing {
            key: "cluster.token".into(),
            message: m,
        })?);
    }
    if let Some(w) = &mut config.wifi {
        let v = resolve(
            Secret {
                file_key: "wifi.psk_file",
                stored_name: PSK_FILE,
                inline: w.psk.take().map(String::from),
                file: w.psk_file.take(),
                stored: src.stored_psk.as_deref(),
            },
            &mut actions,
        )?;
        // No psk anywhere: an open network.
        w.psk = v
            .map(|v| {
                WifiPsk::try_from(v).map_err(|m| LoadError::Missing {
                    key: "wifi.psk".into(),
                    message: m,
                })
            })
            .transpose()?;
    }
    if let Some(u) = &mut config.user {
        let inline = Some(std::mem::take(&mut u.password_hash))
            .filter(|h| !h.as_str().is_empty())
            .map(String::from);
        let v = resolve(
            Secret {
                file_key: "user.password_hash_file",
                stored_name: PASSWORD_HASH_FILE,
                inline,
                file: u.password_hash_file.take(),
                stored: src.stored_password_hash.as_deref(),
            },
            &mut actions,
        )?;
        if let Some(v) = v {
            u.password_hash = PasswordHash::try_from(v).map_err(|m| LoadError::Missing {
                key: "user.password_hash".into(),
                message: m,
            })?;
        }
    }
    config
        .validate()
        .map_err(|inv| located(diag::locate(&fat_path, &parsed_text, inv)))?;

    // Off the FAT partition: the secret bytes first, then the file without them.
    let spans = secret::secret_spans(text);
    let live: Vec<_> = spans.iter().filter(|s| !s.moved).collect();
    let has_moved_keys = !spans.is_empty() || !remove_fat.is_empty() || has_file_keys(text);
    if !live.is_empty() {
        actions.push(Action::Overwrite {
            path: fat_path.clone(),
            ranges: live
                .iter()
                .map(|s| s.inner.start as u64..s.inner.end as u64)
                .collect(),
            fill: TOMBSTONE,
            len: *len,
        });
    }
    if has_moved_keys {
        actions.push(Action::WriteFile {
            path: fat_path.clone(),
            contents: strip_keys(text, MOVED_KEYS).into(),
            mode: 0o644,
            owner: Owner::Keep,
            secret: false,
        });
    }
    for (node_path, rel) in remove_fat {
        let len = src
            .secret_files
            .iter()
            .find(|(p, _)| *p == rel)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|t| t.len)
            .unwrap_or(0);
        actions.push(Action::Overwrite {
            path: node_path.clone(),
            ranges: std::iter::once(0..len).collect(),
            fill: b' ',
            len,
        });
        actions.push(Action::Remove { path: node_path });
    }
    Ok(ClutchToml {
        config,
        token,
        actions,
    })
}

fn has_file_keys(text: &str) -> bool {
    let Ok(doc) = text.parse::<toml_edit::DocumentMut>() else {
        return false;
    };
    MOVED_KEYS
        .iter()
        .any(|(t, k)| doc.get(t).and_then(|t| t.get(k)).is_some())
}

/// `text` without the given `(table, key)`s; everything else (comments, order) kept.
pub fn strip_keys(text: &str, keys: &[(&str, &str)]) -> String {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return text.to_string();
    };
    for (table, key) in keys {
        if let Some(t) = doc.get_mut(table).and_then(|i| i.as_table_like_mut()) {
            t.remove(key);
        }
    }
    doc.to_string()
}

/// The hostname template of a clutch.toml that does not load, when its `[system] hostname`
/// still reads: a broken file elsewhere should not cost the node its name scheme.
pub fn template_hint(text: &str) -> Option<clutch_config::HostnameTemplate> {
    let t: toml::Table = toml::from_str(text).ok()?;
    let h = t.get("system")?.get("hostname")?.as_str()?;
    clutch_config::HostnameTemplate::try_from(h).ok()
}
