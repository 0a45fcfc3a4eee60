//! Loading the node's settings from the FAT partition, in SPEC's order: `clutch.toml`
//! ([`clutch_toml`], its secrets moved into `/var/lib/clutch`), then Raspberry Pi OS's
//! `custom.toml` ([`custom_toml`]), the cloud-init NoCloud files ([`cloud_init`]) and the
//! legacy files ([`legacy`]), each later one overriding what it names.
//!
//! Only clutch.toml can fail the node. The other files are applied once: what they say is
//! merged into the record `/var/lib/clutch/imported.toml` ([`imported`]), then each is
//! overwritten with blanks and removed; a key that cannot be used is a warning. Reading is
//! gathered up front ([`read_sources`]) so [`load`] itself is pure.

pub mod cloud_init;
pub mod clutch_toml;
pub mod custom_toml;
pub mod fat;
pub mod imported;
pub mod legacy;
pub mod secret;
pub mod yaml;

use std::path::{Path, PathBuf};

use clutch_config::{
    Country, HostnameTemplate, NodeConfig, SshPublicKey, Token, UserName, WifiPsk,
};

use crate::facts::Paths;
use crate::plan::{Action, write_secret};
use fat::FatText;
use imported::{Imported, Password, Sudo};

pub use clutch_toml::{PASSWORD_HASH_FILE, PSK_FILE, TOKEN_FILE, strip_keys};

pub const CLUTCH_TOML: &str = "clutch.toml";

/// The other boot-partition files, in the order they apply.
pub const INPUTS: &[&str] = &[
    "custom.toml",
    "meta-data",
    "user-data",
    "network-config",
    "ssh",
    "ssh.txt",
    "userconf.txt",
    "userconf",
    "wpa_supplicant.conf",
];

/// One boot-partition input found on the card.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub name: &'static str,
    /// As the node sees it (`/boot/firmware/custom.toml`).
    pub path: PathBuf,
    pub read: Result<FatText, String>,
}

/// What the loader reads, gathered up front so loading itself is pure.
#[derive(Debug, Clone)]
pub struct Sources {
    /// `clutch.toml`, or why it could not be read.
    pub clutch_toml: Result<FatText, String>,
    /// `*_file` secrets next to clutch.toml: (name as written, contents or error).
    pub secret_files: Vec<(PathBuf, Result<FatText, String>)>,
    pub stored_token: Option<String>,
    pub stored_psk: Option<String>,
    pub stored_password_hash: Option<String>,
    /// `/var/lib/clutch/imported.toml`.
    pub record: Option<String>,
    pub inputs: Vec<InputFile>,
    /// Random bytes for the salt of a plain-text password's hash (set by the caller).
    pub salt: Vec<u8>,
}

fn stored(p: &Path) -> Option<String> {
    crate::fsx::read_opt(p)
        .ok()
        .flatten()
        .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
}

pub fn read_sources(paths: &Paths) -> Sources {
    let fat_file = |n: &Path| paths.host(paths.boot_dir.join(n));
    let clutch_toml = fat::read(&fat_file(Path::new(CLUTCH_TOML)))
        .and_then(|t| t.ok_or_else(|| "No such file or directory (os error 2)".to_string()));
    let mut secret_files = Vec::new();
    // Peek for the `*_file` keys so their contents are in the sources too.
    if let Ok(t) = &clutch_toml {
        if let Ok(doc) = t.text.parse::<toml_edit::DocumentMut>() {
            for (sec, key) in [
                ("cluster", "token_file"),
                ("wifi", "psk_file"),
                ("user", "password_hash_file"),
            ] {
                if let Some(f) = doc
                    .get(sec)
                    .and_then(|t| t.get(key))
                    .and_then(|v| v.as_str())
                {
                    let rel = PathBuf::from(f);
                    let r = if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..")
                    {
                        Err("must be a file name on the boot partition".to_string())
                    } else {
                        fat::read(&fat_file(&rel)).and_then(|t| {
                            t.ok_or_else(|| "No such file or directory (os error 2)".into())
                        })
                    };
                    secret_files.push((rel, r));
                }
            }
        }
    }
    let inputs = INPUTS
        .iter()
        .filter_map(|name| {
            let read = fat::read(&fat_file(Path::new(name))).transpose()?;
            Some(InputFile {
                name,
                path: paths.boot_file(name),
                read,
            })
        })
        .collect();
    Sources {
        clutch_toml,
        secret_files,
        stored_token: stored(&paths.state(TOKEN_FILE)).map(|s| s.trim().to_string()),
        stored_psk: stored(&paths.state(PSK_FILE)),
        stored_password_hash: stored(&paths.state(PASSWORD_HASH_FILE)),
        record: crate::fsx::read_opt(&paths.state(imported::RECORD))
            .ok()
            .flatten(),
        inputs,
        salt: vec![0; 12],
    }
}

/// A login user to set up: clutch.toml's own (first), then those the other files define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginUser {
    pub name: UserName,
    pub keys: Vec<SshPublicKey>,
    /// None: leave the password as it is.
    pub password: Option<Password>,
    pub sudo: Sudo,
    /// Supplementary groups asked for.
    pub groups: Vec<String>,
}

/// The wifi network to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WifiSetting {
    pub ssid: String,
    pub psk: Option<WifiPsk>,
    pub country: Option<Country>,
    pub hidden: bool,
}

#[derive(Debug, Clone)]
pub struct Loaded {
    /// clutch.toml with the other files' host name, time zone and ssh settings applied.
    pub config: NodeConfig,
    pub token: Option<Token>,
    pub users: Vec<LoginUser>,
    pub wifi: Option<WifiSetting>,
    /// The wifi regulatory country, also without a network.
    pub wifi_country: Option<Country>,
    pub keymap: Option<String>,
    pub fqdn: Option<String>,
    /// Moving clutch.toml's secrets off the FAT partition.
    pub secret_actions: Vec<Action>,
    /// Recording the other files' settings, then scrubbing and removing the files.
    pub input_actions: Vec<Action>,
    /// What the other files said that could not be applied.
    pub warnings: Vec<String>,
    /// Files applied at this boot.
    pub applied: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(Box<clutch_config::Diagnostic>),
    #[error("{key}: {message}")]
    Missing { key: String, message: String },
}

/// Loads the node's settings. `paths` only names files (in errors and actions).
pub fn load(paths: &Paths, src: &Sources) -> Result<Loaded, LoadError> {
    let c = clutch_toml::load(paths, src)?;
    let (imported, input_actions, applied) = imported_settings(paths, src);
    Ok(merge(c, imported, input_actions, applied))
}

/// The hostname template to fall back on when clutch.toml does not load.
pub fn template_hint(src: &Sources) -> Option<HostnameTemplate> {
    clutch_toml::template_hint(&src.clutch_toml.as_ref().ok()?.text)
}

/// The record merged with this boot's new files, and the actions that keep it and remove
/// the files.
fn imported_settings(paths: &Paths, src: &Sources) -> (Imported, Vec<Action>, Vec<String>) {
    let mut rec = match src.record.as_deref().map(imported::parse_record) {
        Some(Ok(r)) => r,
        Some(Err(e)) => Imported {
            warnings: vec![format!(
                "{}: {e}; the settings of earlier boot-partition files are lost",
                paths.state_node(imported::RECORD).display()
            )],
            ..Default::default()
        },
        None => Imported::default(),
    };
    let mut batch = Imported::default();
    let mut scrub = Vec::new();
    let mut applied = Vec::new();
    for f in &src.inputs {
        let t = match &f.read {
            Ok(t) => t,
            Err(e) => {
                batch.warnings.push(format!(
                    "{}: {e}; not applied, and left in place",
                    f.path.display()
                ));
                continue;
            }
        };
        let one = match f.name {
            "custom.toml" => custom_toml::read(&f.path, &t.text, &src.salt),
            "meta-data" => cloud_init::meta_data(&f.path, &t.text),
            "user-data" => cloud_init::user_data(&f.path, &t.text, &src.salt),
            "network-config" => cloud_init::network_config(&f.path, &t.text),
            "ssh" | "ssh.txt" => legacy::ssh(),
            "userconf.txt" | "userconf" => legacy::userconf(&f.path, &t.text),
            _ => legacy::wpa_supplicant(&f.path, &t.text),
        };
        batch.merge(one);
        batch.sources.push(f.path.display().to_string());
        applied.push(f.path.display().to_string());
        scrub.push(Action::Overwrite {
            path: f.path.clone(),
            ranges: std::iter::once(0..t.len).collect(),
            fill: b' ',
            len: t.len,
        });
        scrub.push(Action::Remove {
            path: f.path.clone(),
        });
    }
    // A passphrase is kept only as the WPA key derived from it.
    if let Some(w) = &mut batch.wifi {
        if let Some(p) = &w.psk {
            w.psk = WifiPsk::try_from(p.hex_key(&w.ssid)).ok();
        }
    }
    let mut actions = Vec::new();
    if !applied.is_empty() || !batch.warnings.is_empty() {
        // The warnings shown from now on are this batch's.
        rec.warnings.clear();
        rec.merge(batch);
        actions.push(write_secret(
            paths.state_node(imported::RECORD),
            imported::render_record(&rec),
        ));
        actions.extend(scrub);
    }
    (rec, actions, applied)
}

/// clutch.toml's settings with the imported ones on top.
fn merge(
    c: clutch_toml::ClutchToml,
    mut imp: Imported,
    input_actions: Vec<Action>,
    applied: Vec<String>,
) -> Loaded {
    let mut config = c.config;
    let mut warnings = std::mem::take(&mut imp.warnings);
    if let Some(h) = &imp.hostname {
        config.system.hostname =
            HostnameTemplate::try_from(h.as_str()).expect("a host name is a template");
    }
    if let Some(z) = &imp.timezone {
        config.system.timezone = z.clone();
    }
    if let Some(e) = imp.ssh_enabled {
        config.ssh.enabled = e;
    }
    if let Some(p) = imp.password_authentication {
        config.ssh.password_authentication = p;
    }
    let country = imp
        .wifi_country
        .clone()
        .or_else(|| config.wifi.as_ref().map(|w| w.country.clone()));
    let wifi = match (&imp.wifi, &config.wifi) {
        (Some(w), _) => Some(WifiSetting {
            ssid: w.ssid.clone(),
            psk: w.psk.clone(),
            country: country.clone(),
            hidden: w.hidden,
        }),
        (None, Some(w)) => Some(WifiSetting {
            ssid: w.ssid.clone(),
            psk: w.psk.clone(),
            country: country.clone(),
            hidden: w.hidden,
        }),
        (None, None) => None,
    };
    let mut users: Vec<LoginUser> = config
        .user
        .iter()
        .map(|u| LoginUser {
            name: u.name.clone(),
            keys: u.authorized_keys.clone(),
            password: (!u.password_hash.as_str().is_empty()).then(|| Password {
                hash: Some(u.password_hash.clone()),
                locked: false,
            }),
            sudo: if u.sudo { Sudo::NoPassword } else { Sudo::No },
            groups: Vec::new(),
        })
        .collect();
    for iu in std::mem::take(&mut imp.users) {
        let i = match users.iter().position(|u| u.name == iu.name) {
            Some(i) => i,
            None => {
                users.push(LoginUser {
                    name: iu.name.clone(),
                    keys: Vec::new(),
                    password: None,
                    sudo: Sudo::No,
                    groups: Vec::new(),
                });
                users.len() - 1
            }
        };
        let u = &mut users[i];
        for k in iu.keys {
            if !u.keys.contains(&k) {
                u.keys.push(k);
            }
        }
        if iu.password.is_some() {
            u.password = iu.password;
        }
        if let Some(s) = iu.sudo {
            u.sudo = s;
        }
        for g in iu.groups {
            if !u.groups.contains(&g) {
                u.groups.push(g);
            }
        }
    }
    if !imp.image_user_keys.is_empty() {
        match users.first_mut() {
            Some(u) => {
                for k in std::mem::take(&mut imp.image_user_keys) {
                    if !u.keys.contains(&k) {
                        u.keys.push(k);
                    }
                }
            }
            None => warnings.push(
                "authorized keys without a user: clutch.toml has no [user] and no file named one; keys not installed"
                    .into(),
            ),
        }
    }
    Loaded {
        config,
        token: c.token,
        users,
        wifi,
        wifi_country: country,
        keymap: imp.keymap,
        fqdn: imp.fqdn,
        secret_actions: c.actions,
        input_actions,
        warnings,
        applied,
    }
}
