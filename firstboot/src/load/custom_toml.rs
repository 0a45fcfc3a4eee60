//! Raspberry Pi OS's `custom.toml`, with the meaning raspberrypi-sys-mods' `init_config`
//! gives it: `password_encrypted` is true when absent (in `[user]` and `[wlan]`), a
//! `[wlan]` may hold only `country`, authorized keys are added to the user, a plain-text
//! password is hashed (SHA-512 crypt) before anything keeps it, `ssh_import_id` and unknown
//! keys are warned about. Nothing here fails: each key that cannot be used is a located
//! warning and the rest applies.
//!
//! Two choices where clutch differs: `[ssh] enabled = false` turns SSH off (Raspberry Pi OS
//! just does not turn it on, and it is off there by default), and keys without a
//! `[user] name` go to the image's own user (Raspberry Pi OS's first user).

use std::path::Path;

use clutch_config::diag::{self, Invalid};
use clutch_config::{Country, Hostname, PasswordHash, SshPublicKey, Timezone, UserName, WifiPsk};
use toml::{Table, Value};

use super::imported::{Imported, ImportedWifi, Password, Sudo};
use super::secret;

/// Reads one custom.toml (`path` as the node sees it, for messages).
pub fn read(path: &Path, text: &str, salt: &[u8]) -> Imported {
    let mut out = Imported::default();
    let mut w = Warn {
        path,
        text,
        out: Vec::new(),
    };
    let mut table: Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            let d = diag::parse_toml::<Table>(path, text).err();
            w.out.push(match d {
                Some(d) => format!("{d}; nothing in this file was applied"),
                None => format!("{}: {e}; nothing in this file was applied", path.display()),
            });
            out.warnings = w.out;
            return out;
        }
    };
    match table.remove("config_version") {
        Some(Value::Integer(1)) => {}
        Some(v) => w.at(
            "config_version",
            format!("config_version {v} is not 1; applied as version 1, as Raspberry Pi OS does"),
        ),
        None => {}
    }
    let mut section = |name: &str, w: &mut Warn| -> Table {
        match table.remove(name) {
            Some(Value::Table(t)) => t,
            Some(_) => {
                w.at(name, format!("[{name}] must be a table; ignored"));
                Table::new()
            }
            None => Table::new(),
        }
    };
    let system = section("system", &mut w);
    let user = section("user", &mut w);
    let ssh = section("ssh", &mut w);
    let wlan = section("wlan", &mut w);
    let locale = section("locale", &mut w);
    for k in table.keys() {
        w.at(k, format!("unknown section or key `{k}`; ignored"));
    }

    let mut s = Sect::new("system", system, &mut w);
    if let Some(h) = s.string("hostname") {
        match Hostname::try_from(h) {
            Ok(h) => out.hostname = Some(h),
            Err(m) => s.warn("hostname", m),
        }
    }
    s.done();
    read_user(user, &mut w, &mut out, salt);
    read_ssh(ssh, &mut w, &mut out);
    read_wlan(wlan, &mut w, &mut out);
    let mut s = Sect::new("locale", locale, &mut w);
    if let Some(k) = s.string("keymap") {
        match keymap(&k) {
            Ok(k) => out.keymap = Some(k),
            Err(m) => s.warn("keymap", m),
        }
    }
    if let Some(z) = s.string("timezone") {
        match Timezone::try_from(z) {
            Ok(z) => out.timezone = Some(z),
            Err(m) => s.warn("timezone", m),
        }
    }
    s.done();
    out.warnings = w.out;
    out
}

/// A console keyboard layout as Raspberry Pi OS's `raspi-config` takes it (`gb`, `de`,
/// `us`), not a locale such as `en_US.UTF-8`.
pub fn keymap(k: &str) -> Result<String, String> {
    let ok = (2..=32).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!(
            "`{k}` is not a keyboard layout such as `gb` or `de` (a locale like en_US.UTF-8 is not one); the keyboard layout was left as it is"
        ))
    }
}

fn read_user(t: Table, w: &mut Warn, out: &mut Imported, salt: &[u8]) {
    let mut s = Sect::new("user", t, w);
    let name = s.string("name");
    let password = s.string("password");
    let encrypted = s.bool("password_encrypted").unwrap_or(true);
    let name = match name.map(UserName::try_from) {
        Some(Ok(n)) => Some(n),
        Some(Err(m)) => {
            s.warn("name", format!("{m}; no user was set up from this file"));
            None
        }
        None => None,
    };
    match (name, password) {
        (Some(n), pw) => {
            let u = out.user(&n);
            u.sudo = Some(Sudo::NoPassword);
            u.password = match pw {
                None => Some(Password {
                    hash: None,
                    locked: true,
                }),
                Some(pw) if encrypted => match PasswordHash::try_from(pw) {
                    Ok(h) => Some(Password {
                        hash: Some(h),
                        locked: false,
                    }),
                    Err(m) => {
                        s.warn(
                            "password",
                            format!("{m} (password_encrypted is true when absent); the password was not set"),
                        );
                        None
                    }
                },
                Some(pw) => match secret::hash_plain_password(&pw, salt) {
                    Ok(h) => Some(Password {
                        hash: Some(h),
                        locked: false,
                    }),
                    Err(m) => {
                        s.warn("password", m);
                        None
                    }
                },
            };
        }
        (None, Some(_)) => s.warn(
            "password",
            "a password without a user name; skipped, as Raspberry Pi OS does".into(),
        ),
        (None, None) => {}
    }
    s.done();
}

fn read_ssh(t: Table, w: &mut Warn, out: &mut Imported) {
    let mut s = Sect::new("ssh", t, w);
    if s.t.contains_key("ssh_import_id") {
        s.take("ssh_import_id");
        s.warn(
            "ssh_import_id",
            "keys are not fetched from the network at first boot; add them to authorized_keys"
                .into(),
        );
    }
    if let Some(e) = s.bool("enabled") {
        out.ssh_enabled = Some(e);
    }
    if let Some(p) = s.bool("password_authentication") {
        out.password_authentication = Some(p);
    }
    let keys = s.strings("authorized_keys");
    let mut parsed = Vec::new();
    for (i, k) in keys.into_iter().enumerate() {
        match SshPublicKey::try_from(k) {
            Ok(k) => parsed.push(k),
            Err(m) => s.warn(
                &format!("authorized_keys[{i}]"),
                format!("{m}; key skipped"),
            ),
        }
    }
    // Raspberry Pi OS gives them to its first user: the one [user] names, else the image's.
    match out.users.first_mut() {
        Some(u) => u.keys.extend(parsed),
        None => out.image_user_keys.extend(parsed),
    }
    s.done();
}

fn read_wlan(t: Table, w: &mut Warn, out: &mut Imported) {
    let mut s = Sect::new("wlan", t, w);
    let ssid = s.string("ssid");
    let password = s.string("password");
    let _encrypted = s.bool("password_encrypted");
    let hidden = s.bool("hidden").unwrap_or(false);
    if let Some(c) = s.string("country") {
        // Raspberry Pi OS passes it to raspi-config, which takes lower case too.
        match Country::try_from(c.to_ascii_uppercase()) {
            Ok(c) => out.wifi_country = Some(c),
            Err(m) => s.warn("country", m),
        }
    }
    match (ssid, password) {
        (Some(ssid), pw) => {
            if ssid.is_empty() || ssid.len() > 32 || ssid.contains(|c: char| c.is_control()) {
                s.warn(
                    "ssid",
                    "an SSID has 1 to 32 bytes and no control characters; wifi not set up".into(),
                );
            } else {
                // With password_encrypted (the default) Raspberry Pi OS hands the value to
                // NetworkManager as the psk, which takes the 64-hex key or a passphrase; so
                // does clutch.
                let psk = match pw.map(WifiPsk::try_from) {
                    Some(Ok(p)) => Some(p),
                    Some(Err(m)) => {
                        s.warn("password", format!("{m}; wifi not set up"));
                        s.done();
                        return;
                    }
                    None => None,
                };
                out.wifi = Some(ImportedWifi { ssid, psk, hidden });
            }
        }
        (None, Some(_)) => s.warn(
            "password",
            "a wifi password without an ssid; skipped, as Raspberry Pi OS does".into(),
        ),
        (None, None) => {}
    }
    s.done();
}

/// Collects located warnings for one file.
pub(super) struct Warn<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub out: Vec<String>,
}

impl Warn<'_> {
    pub fn at(&mut self, key: &str, message: String) {
        self.out
            .push(diag::locate(self.path, self.text, Invalid::new(key, message)).to_string());
    }
}

/// One `[section]`: typed getters that warn (and give nothing) on a wrong type; `done`
/// warns about every key left over.
struct Sect<'w, 'a> {
    name: &'static str,
    t: Table,
    w: &'w mut Warn<'a>,
}

impl<'w, 'a> Sect<'w, 'a> {
    fn new(name: &'static str, t: Table, w: &'w mut Warn<'a>) -> Self {
        Sect { name, t, w }
    }
    fn warn(&mut self, key: &str, m: String) {
        self.w.at(&format!("{}.{key}", self.name), m);
    }
    fn take(&mut self, key: &str) -> Option<Value> {
        self.t.remove(key)
    }
    fn string(&mut self, key: &str) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s),
            v => {
                self.warn(
                    key,
                    format!("must be a string, not {}; ignored", v.type_str()),
                );
                None
            }
        }
    }
    fn bool(&mut self, key: &str) -> Option<bool> {
        match self.take(key)? {
            Value::Boolean(b) => Some(b),
            v => {
                self.warn(
                    key,
                    format!("must be true or false, not {}; ignored", v.type_str()),
                );
                None
            }
        }
    }
    fn strings(&mut self, key: &str) -> Vec<String> {
        match self.take(key) {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            Some(v) => {
                self.warn(
                    key,
                    format!("must be a list of strings, not {}; ignored", v.type_str()),
                );
                Vec::new()
            }
        }
    }
    fn done(mut self) {
        let keys: Vec<String> = self.t.keys().cloned().collect();
        for k in keys {
            self.warn(&k, format!("unknown key in [{}]; ignored", self.name));
        }
    }
}
