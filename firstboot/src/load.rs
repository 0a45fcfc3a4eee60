//! Loading the node config: `clutch.toml` from the FAT partition, secrets moved to (or taken
//! from) `/var/lib/clutch`, and a Raspberry Pi `custom.toml` merged on top.

use std::path::{Path, PathBuf};

use clutch_config::diag::{self, Diagnostic, Invalid};
use clutch_config::{
    ConfigError, Country, HostnameTemplate, NodeConfig, PasswordHash, SshPublicKey, Timezone,
    Token, User, UserName, Wifi, WifiPsk,
};
use serde::Deserialize;

use crate::facts::Paths;
use crate::fsx::read_opt;
use crate::plan::{Action, write_secret};

pub const CLUTCH_TOML: &str = "clutch.toml";
pub const CUSTOM_TOML: &str = "custom.toml";
pub const TOKEN_FILE: &str = "cluster-token";
pub const PSK_FILE: &str = "wifi-psk";
pub const STORED_CUSTOM: &str = "custom.toml";

/// What the loader reads, gathered up front so loading itself is pure.
#[derive(Debug, Clone)]
pub struct Sources {
    /// `clutch.toml` text, or why it could not be read.
    pub clutch_toml: Result<String, String>,
    pub custom_toml_fat: Option<String>,
    pub custom_toml_stored: Option<String>,
    pub stored_token: Option<String>,
    pub stored_psk: Option<String>,
    /// `*_file` secrets next to clutch.toml: (name as written, contents or error).
    pub secret_files: Vec<(PathBuf, Result<String, String>)>,
}

fn read_or_err(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| e.to_string())
}

pub fn read_sources(paths: &Paths) -> Sources {
    let fat = |n: &str| paths.host(paths.boot_file(n));
    let opt = |p: PathBuf| read_opt(&p).ok().flatten();
    let clutch_toml = read_or_err(&fat(CLUTCH_TOML));
    let mut secret_files = Vec::new();
    // Peek for token_file / psk_file so their contents are in the sources too.
    if let Ok(text) = &clutch_toml {
        if let Ok(doc) = text.parse::<toml_edit::DocumentMut>() {
            for (sec, key) in [("cluster", "token_file"), ("wifi", "psk_file")] {
                if let Some(f) = doc
                    .get(sec)
                    .and_then(|t| t.get(key))
                    .and_then(|v| v.as_str())
                {
                    let rel = PathBuf::from(f);
                    let p = paths.host(paths.boot_dir.join(&rel));
                    secret_files.push((
                        rel,
                        read_or_err(&p).map(|s| s.trim_end_matches(['\r', '\n']).to_string()),
                    ));
                }
            }
        }
    }
    Sources {
        clutch_toml,
        custom_toml_fat: opt(fat(CUSTOM_TOML)),
        custom_toml_stored: opt(paths.state(STORED_CUSTOM)),
        stored_token: opt(paths.state(TOKEN_FILE)).map(|s| s.trim().to_string()),
        stored_psk: opt(paths.state(PSK_FILE))
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string()),
        secret_files,
    }
}

/// Settings from custom.toml that clutch.toml has no key for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    pub keymap: Option<String>,
    /// A plain-text password from custom.toml (`password_encrypted = false`), set once.
    pub plain_password: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config to apply, secrets filled in from wherever they are.
    pub config: NodeConfig,
    pub token: Option<Token>,
    pub extras: Extras,
    /// Moving secrets off the FAT partition: write to /var/lib/clutch first, then rewrite
    /// clutch.toml, so a power cut in between loses nothing.
    pub secret_actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
    #[error("{key}: {message}")]
    Missing { key: String, message: String },
}

impl LoadError {
    fn located(d: Diagnostic) -> Self {
        LoadError::Invalid(Box::new(d))
    }
}

/// Loads the node config. `paths` only names files (in errors and actions); nothing is read.
pub fn load(paths: &Paths, src: &Sources) -> Result<Loaded, LoadError> {
    let fat_path = paths.boot_file(CLUTCH_TOML);
    let text = src.clutch_toml.as_ref().map_err(|reason| LoadError::Read {
        path: fat_path.clone(),
        reason: reason.clone(),
    })?;
    let mut config = clutch_config::parse_node_config(&fat_path, text).map_err(|e| match e {
        ConfigError::Invalid(d) => LoadError::Invalid(d),
        ConfigError::Read { path, source } => LoadError::Read {
            path,
            reason: source.to_string(),
        },
    })?;

    let mut actions = Vec::new();
    let mut strip: Vec<(&str, &str)> = Vec::new();
    let mut remove_fat: Vec<PathBuf> = Vec::new();
    let secret_file = |rel: &Path, key: &str| -> Result<String, LoadError> {
        match src.secret_files.iter().find(|(p, _)| p == rel) {
            Some((_, Ok(s))) => Ok(s.clone()),
            Some((_, Err(e))) => Err(LoadError::Missing {
                key: key.into(),
                message: format!("cannot read {}: {e}", paths.boot_dir.join(rel).display()),
            }),
            None => Err(LoadError::Missing {
                key: key.into(),
                message: format!("cannot read {}", paths.boot_dir.join(rel).display()),
            }),
        }
    };

    // Cluster token.
    let mut token = None;
    if let Some(c) = &mut config.cluster {
        let from_fat = match (c.token.take(), c.token_file.take()) {
            (Some(t), _) => {
                strip.push(("cluster", "token"));
                Some(t)
            }
            (None, Some(f)) => {
                let s = secret_file(&f, "cluster.token_file")?;
                let t = Token::try_from(s).map_err(|m| LoadError::Missing {
                    key: "cluster.token_file".into(),
                    message: m,
                })?;
                strip.push(("cluster", "token_file"));
                remove_fat.push(paths.boot_dir.join(&f));
                Some(t)
            }
            (None, None) => None,
        };
        token = match from_fat {
            Some(t) => {
                if src.stored_token.as_deref() != Some(t.expose()) {
                    actions.push(write_secret(
                        paths.state_node(TOKEN_FILE),
                        format!("{}\n", t.expose()),
                    ));
                }
                Some(t)
            }
            None => match &src.stored_token {
                Some(s) => Some(Token::try_from(s.clone()).map_err(|m| LoadError::Missing {
                    key: "cluster.token".into(),
                    message: format!(
                        "the stored token in {} is unusable: {m}",
                        paths.state_node(TOKEN_FILE).display()
                    ),
                })?),
                None => {
                    return Err(LoadError::Missing {
                        key: "cluster.token".into(),
                        message: format!(
                            "no token in {} and none stored in {}: add `token = \"...\"` (>= 32 characters) to [cluster]",
                            fat_path.display(),
                            paths.state_node(TOKEN_FILE).display()
                        ),
                    });
                }
            },
        };
    }

    // Wifi PSK (stored as given: a passphrase or the 64-hex key).
    if let Some(w) = &mut config.wifi {
        let from_fat = match (w.psk.take(), w.psk_file.take()) {
            (Some(p), _) => {
                strip.push(("wifi", "psk"));
                Some(p)
            }
            (None, Some(f)) => {
                let s = secret_file(&f, "wifi.psk_file")?;
                let p = WifiPsk::try_from(s).map_err(|m| LoadError::Missing {
                    key: "wifi.psk_file".into(),
                    message: m,
                })?;
                strip.push(("wifi", "psk_file"));
                remove_fat.push(paths.boot_dir.join(&f));
                Some(p)
            }
            (None, None) => None,
        };
        w.psk = match from_fat {
            Some(p) => {
                let s: String = p.clone().into();
                if src.stored_psk.as_deref() != Some(s.as_str()) {
                    actions.push(write_secret(paths.state_node(PSK_FILE), format!("{s}\n")));
                }
                Some(p)
            }
            None => match &src.stored_psk {
                Some(s) => Some(
                    WifiPsk::try_from(s.clone()).map_err(|m| LoadError::Missing {
                        key: "wifi.psk".into(),
                        message: format!(
                            "the stored psk in {} is unusable: {m}",
                            paths.state_node(PSK_FILE).display()
                        ),
                    })?,
                ),
                // No psk anywhere: an open network.
                None => None,
            },
        };
    }

    if !strip.is_empty() {
        let new_text = strip_keys(text, &strip);
        actions.push(Action::WriteFile {
            path: fat_path.clone(),
            contents: new_text.into(),
            mode: 0o644,
            owner: crate::plan::Owner::Keep,
            secret: false,
        });
    }
    for f in remove_fat {
        actions.push(Action::Remove { path: f });
    }

    // custom.toml: a new one on the FAT partition wins over the stored one; it is moved
    // off the FAT partition (it may hold passwords) and applied on every later boot.
    let mut extras = Extras::default();
    let custom = match &src.custom_toml_fat {
        Some(t) => {
            actions.push(write_secret(paths.state_node(STORED_CUSTOM), t.clone()));
            actions.push(Action::Remove {
                path: paths.boot_file(CUSTOM_TOML),
            });
            actions.push(Action::Remove {
                path: paths.state_node("done/custom-password"),
            });
            Some((paths.boot_file(CUSTOM_TOML), t))
        }
        None => src
            .custom_toml_stored
            .as_ref()
            .map(|t| (paths.state_node(STORED_CUSTOM), t)),
    };
    if let Some((path, t)) = custom {
        apply_custom(&path, t, &mut config, &mut extras)?;
        config
            .validate()
            .map_err(|inv| LoadError::located(diag::locate(&path, t, inv)))?;
    }

    Ok(Loaded {
        config,
        token,
        extras,
        secret_actions: actions,
    })
}

/// clutch.toml without the given `(table, key)`s; everything else (comments, order) kept.
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

/// The Raspberry Pi OS `custom.toml` (as written by Raspberry Pi Imager). Unknown keys are
/// ignored, as Raspberry Pi OS does.
#[derive(Debug, Default, Deserialize)]
struct Custom {
    #[serde(default)]
    system: CSystem,
    #[serde(default)]
    user: CUser,
    #[serde(default)]
    ssh: CSsh,
    #[serde(default)]
    wlan: Option<CWlan>,
    #[serde(default)]
    locale: CLocale,
}
#[derive(Debug, Default, Deserialize)]
struct CSystem {
    hostname: Option<String>,
}
#[derive(Debug, Default, Deserialize)]
struct CUser {
    name: Option<String>,
    password: Option<String>,
    #[serde(default)]
    password_encrypted: bool,
}
#[derive(Debug, Default, Deserialize)]
struct CSsh {
    enabled: Option<bool>,
    password_authentication: Option<bool>,
    authorized_keys: Option<Vec<String>>,
}
#[derive(Debug, Default, Deserialize)]
struct CWlan {
    ssid: String,
    password: Option<String>,
    #[serde(default)]
    password_encrypted: bool,
    #[serde(default)]
    hidden: bool,
    country: Option<String>,
}
#[derive(Debug, Default, Deserialize)]
struct CLocale {
    keymap: Option<String>,
    timezone: Option<String>,
}

fn apply_custom(
    path: &Path,
    text: &str,
    c: &mut NodeConfig,
    extras: &mut Extras,
) -> Result<(), LoadError> {
    let cu: Custom = diag::parse_toml(path, text).map_err(LoadError::located)?;
    let bad =
        |key: &str, m: String| LoadError::located(diag::locate(path, text, Invalid::new(key, m)));

    if let Some(h) = cu.system.hostname {
        c.system.hostname = HostnameTemplate::try_from(h).map_err(|m| bad("system.hostname", m))?;
    }
    if let Some(tz) = cu.locale.timezone {
        c.system.timezone = Timezone::try_from(tz).map_err(|m| bad("locale.timezone", m))?;
    }
    if let Some(k) = cu.locale.keymap {
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-,".contains(&b))
        {
            return Err(bad(
                "locale.keymap",
                format!("`{k}` is not a keyboard layout such as `gb`"),
            ));
        }
        extras.keymap = Some(k);
    }

    if let Some(n) = cu.user.name {
        let name = UserName::try_from(n).map_err(|m| bad("user.name", m))?;
        match &mut c.user {
            Some(u) => u.name = name,
            None => {
                c.user = Some(User {
                    name,
                    authorized_keys: Vec::new(),
                    password_hash: PasswordHash::default(),
                    password_hash_file: None,
                    sudo: true,
                })
            }
        }
    }
    if let Some(pw) = cu.user.password {
        let Some(u) = &mut c.user else {
            return Err(bad(
                "user.password",
                "a password needs a user: add `name` to [user]".into(),
            ));
        };
        if cu.user.password_encrypted {
            u.password_hash = PasswordHash::try_from(pw).map_err(|m| bad("user.password", m))?;
        } else {
            if pw.is_empty() || pw.contains(['\n', '\r', ':']) {
                return Err(bad(
                    "user.password",
                    "the password must be one line without `:`".into(),
                ));
            }
            extras.plain_password = Some(pw);
        }
    }
    if let Some(e) = cu.ssh.enabled {
        c.ssh.enabled = e;
    }
    if let Some(p) = cu.ssh.password_authentication {
        c.ssh.password_authentication = p;
    }
    if let Some(keys) = cu.ssh.authorized_keys {
        let Some(u) = &mut c.user else {
            return Err(bad(
                "ssh.authorized_keys",
                "authorized keys need a user: add [user] name".into(),
            ));
        };
        let mut parsed = Vec::new();
        for (i, k) in keys.into_iter().enumerate() {
            parsed.push(
                SshPublicKey::try_from(k)
                    .map_err(|m| bad(&format!("ssh.authorized_keys[{i}]"), m))?,
            );
        }
        u.authorized_keys = parsed;
    }

    if let Some(w) = cu.wlan {
        let country = match (w.country, &c.wifi) {
            (Some(cc), _) => Country::try_from(cc).map_err(|m| bad("wlan.country", m))?,
            (None, Some(old)) => old.country.clone(),
            (None, None) => {
                return Err(bad(
                    "wlan.country",
                    "the wifi regulatory country is missing (e.g. country = \"GB\")".into(),
                ));
            }
        };
        let psk = match w.password {
            Some(p) if w.password_encrypted => {
                if p.len() != 64 {
                    return Err(bad(
                        "wlan.password",
                        "with password_encrypted = true the password must be the 64-hex-digit key"
                            .into(),
                    ));
                }
                Some(WifiPsk::try_from(p).map_err(|m| bad("wlan.password", m))?)
            }
            Some(p) => Some(WifiPsk::try_from(p).map_err(|m| bad("wlan.password", m))?),
            None => None,
        };
        c.wifi = Some(Wifi {
            ssid: w.ssid,
            psk,
            psk_file: None,
            country,
            hidden: w.hidden,
        });
    }
    Ok(())
}
