//! The settings taken from the boot partition's other files (custom.toml, cloud-init,
//! the legacy files), merged in SPEC order, and kept in `/var/lib/clutch/imported.toml`
//! (mode 0600) once applied: each file is read once and removed, but clutch re-applies
//! its settings at every boot, so what those files said must stay.

use serde::{Deserialize, Serialize};

use clutch_config::{Country, Hostname, PasswordHash, SshPublicKey, Timezone, UserName, WifiPsk};

/// The record's file name under `/var/lib/clutch`.
pub const RECORD: &str = "imported.toml";

/// How a user may use sudo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sudo {
    /// Member of `sudo`, and `NOPASSWD: ALL` (clutch.toml's `sudo = true`, Raspberry Pi OS's
    /// first user, cloud-init's `ALL=(ALL) NOPASSWD:ALL`).
    NoPassword,
    /// Member of `sudo`; sudo asks for the user's password (cloud-init `sudo: null`).
    WithPassword,
    /// No sudo at all.
    No,
}

/// What to do with a user's password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Password {
    /// The crypt(3) hash to set; none = leave the password as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<PasswordHash>,
    /// Lock password logins (`!` before the hash), as cloud-init's `lock_passwd`.
    #[serde(default)]
    pub locked: bool,
}

/// A login user a boot-partition file defines (or adds keys or a password to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedUser {
    pub name: UserName,
    #[serde(default)]
    pub keys: Vec<SshPublicKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Password>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<Sudo>,
    /// Supplementary groups asked for (those the node has are joined).
    #[serde(default)]
    pub groups: Vec<String>,
}

impl ImportedUser {
    pub fn named(name: UserName) -> Self {
        ImportedUser {
            name,
            keys: Vec::new(),
            password: None,
            sudo: None,
            groups: Vec::new(),
        }
    }

    /// `later` on top of `self`: keys and groups are added, a password or sudo replaces.
    fn merge(&mut self, later: ImportedUser) {
        for k in later.keys {
            if !self.keys.contains(&k) {
                self.keys.push(k);
            }
        }
        for g in later.groups {
            if !self.groups.contains(&g) {
                self.groups.push(g);
            }
        }
        if later.password.is_some() {
            self.password = later.password;
        }
        if later.sudo.is_some() {
            self.sudo = later.sudo;
        }
    }
}

/// A wifi network from custom.toml, network-config or wpa_supplicant.conf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedWifi {
    pub ssid: String,
    /// None: an open network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<WifiPsk>,
    #[serde(default)]
    pub hidden: bool,
}

/// Everything the boot-partition files said, merged.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Imported {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    /// A fully qualified name (cloud-init `fqdn`), for /etc/hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<Timezone>,
    /// A console keyboard layout (`gb`, `de`), for /etc/default/keyboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keymap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_authentication: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi: Option<ImportedWifi>,
    /// The wifi regulatory country (also alone, as in a `[wlan]` with only `country`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi_country: Option<Country>,
    /// Users defined or extended, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<ImportedUser>,
    /// Keys for the image's own user (clutch.toml's `[user]`): custom.toml's
    /// `[ssh] authorized_keys` without a `[user] name`, as Raspberry Pi OS gives them to
    /// its first user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_user_keys: Vec<SshPublicKey>,
    /// What could not be applied, located (`/boot/firmware/custom.toml:3:10: ...`); shown in
    /// the status at every boot until newer files replace them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The files these settings came from, in the order applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

impl Imported {
    /// The user named `name`, added when not there yet.
    pub fn user(&mut self, name: &UserName) -> &mut ImportedUser {
        let i = match self.users.iter().position(|u| &u.name == name) {
            Some(i) => i,
            None => {
                self.users.push(ImportedUser::named(name.clone()));
                self.users.len() - 1
            }
        };
        &mut self.users[i]
    }

    /// `later` (a file further down SPEC's order) on top of `self`: what it names replaces,
    /// users and keys are added.
    pub fn merge(&mut self, later: Imported) {
        macro_rules! replace {
            ($($f:ident),*) => {$( if later.$f.is_some() { self.$f = later.$f; } )*};
        }
        replace!(
            hostname,
            fqdn,
            timezone,
            keymap,
            ssh_enabled,
            password_authentication,
            wifi,
            wifi_country
        );
        for u in later.users {
            let name = u.name.clone();
            self.user(&name).merge(u);
        }
        for k in later.image_user_keys {
            if !self.image_user_keys.contains(&k) {
                self.image_user_keys.push(k);
            }
        }
        self.warnings.extend(later.warnings);
        self.sources.extend(later.sources);
    }

    pub fn is_empty(&self) -> bool {
        *self == Imported::default()
    }
}

/// Parses the stored record; a damaged one is reported and ignored (the settings it held
/// are lost, the node still comes up).
pub fn parse_record(text: &str) -> Result<Imported, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
}

pub fn render_record(i: &Imported) -> String {
    format!(
        "# Written by clutch-firstboot: the settings of boot-partition files it applied \
         (custom.toml, cloud-init, ...).\n# Re-applied at every boot after clutch.toml.\n{}",
        toml::to_string(i).expect("the record serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> UserName {
        UserName::try_from(n).unwrap()
    }

    #[test]
    fn later_files_replace_what_they_name_and_add_users_and_keys() {
        let key = SshPublicKey::try_from(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a",
        )
        .unwrap();
        let mut a = Imported {
            hostname: Some(Hostname::try_from("one").unwrap()),
            timezone: Some(Timezone::try_from("Europe/Berlin").unwrap()),
            ..Default::default()
        };
        a.user(&name("pi")).sudo = Some(Sudo::NoPassword);
        let mut b = Imported {
            hostname: Some(Hostname::try_from("two").unwrap()),
            ..Default::default()
        };
        b.user(&name("pi")).keys.push(key.clone());
        b.user(&name("bob"));
        a.merge(b);
        assert_eq!(a.hostname.as_ref().unwrap().as_str(), "two");
        assert_eq!(a.timezone.as_ref().unwrap().as_str(), "Europe/Berlin");
        assert_eq!(a.users.len(), 2);
        assert_eq!(a.users[0].keys, vec![key]);
        assert_eq!(a.users[0].sudo, Some(Sudo::NoPassword));
        let back = parse_record(&render_record(&a)).unwrap();
        assert_eq!(back, a);
    }
}
