//! The `[update]` section (where a node looks for newer releases, how often, and which key
//! signs them) and the board's `[ab]` section (how a board switches between root slots).
//! See SPEC.md "Image config" and "On the image" (Updates).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::diag::Invalid;
use crate::types::Size;

/// How often a node looks for a newer release by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateCheck {
    /// Only when asked (`clutch-firstboot update`).
    #[default]
    Manual,
    Hourly,
    Daily,
}

impl UpdateCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateCheck::Manual => "manual",
            UpdateCheck::Hourly => "hourly",
            UpdateCheck::Daily => "daily",
        }
    }
    /// The systemd calendar expression of a timer, `None` for manual.
    pub fn on_calendar(self) -> Option<&'static str> {
        match self {
            UpdateCheck::Manual => None,
            UpdateCheck::Hourly => Some("hourly"),
            UpdateCheck::Daily => Some("daily"),
        }
    }
}

/// The folder an `update` output is served from: an `http://` URL ending in `/`. Plain HTTP
/// is enough: every file is checked against the signed `SHA256SUMS`, and the LAN is assumed
/// hostile anyway.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpdateSource(String);

impl TryFrom<String> for UpdateSource {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let Some(rest) = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
        else {
            return Err(format!(
                "`{s}` is not an http:// URL (e.g. http://10.0.0.1:8080/update/)"
            ));
        };
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        if s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{s}` must be at most 512 characters without spaces"
            ));
        }
        if s.contains(['?', '#', '"', '\'', '\\']) {
            return Err(format!(
                "`{s}` must name a folder: no query, fragment or quotes"
            ));
        }
        // Files are looked up relative to it: make it a folder.
        let s = if s.ends_with('/') { s } else { format!("{s}/") };
        Ok(UpdateSource(s))
    }
}
impl From<UpdateSource> for String {
    fn from(s: UpdateSource) -> String {
        s.0
    }
}
impl UpdateSource {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The URL of a file in the folder.
    pub fn join(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }
}
impl fmt::Display for UpdateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for UpdateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpdateSource({})", self.0)
    }
}

/// `[update]` in an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    pub source: UpdateSource,
    #[serde(default)]
    pub check: UpdateCheck,
    /// The release-signing key (`clutch update-key`), relative to the config. Only the
    /// builder reads it; the image carries its public half (`<file>.pub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
}

/// `[update]` in a node config (`clutch.toml`): no signing key, ever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeUpdate {
    pub source: UpdateSource,
    #[serde(default)]
    pub check: UpdateCheck,
}

impl UpdateSection {
    pub fn for_node(&self) -> NodeUpdate {
        NodeUpdate {
            source: self.source.clone(),
            check: self.check,
        }
    }
}

/// How a board boots one of two root slots and falls back to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AbScheme {
    /// GPT with typed root slots written by systemd-sysupdate; UEFI boots through
    /// systemd-boot with boot counting (`systemd-bless-boot` commits); legacy BIOS through
    /// syslinux, switched by clutch-firstboot (update and rollback by command only).
    SystemdBoot,
    /// Raspberry Pi 4/5 firmware: `autoboot.txt` with `tryboot_a_b=1`, one FAT boot
    /// partition per slot, `reboot "0 tryboot"` for the trial boot.
    Tryboot,
    /// Firmware without tryboot (Raspberry Pi 3): one FAT partition whose `config.txt`
    /// `os_prefix=` picks the slot's folder; switched by clutch-firstboot (update and
    /// rollback by command only).
    OsPrefix,
}

impl AbScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            AbScheme::SystemdBoot => "systemd-boot",
            AbScheme::Tryboot => "tryboot",
            AbScheme::OsPrefix => "os-prefix",
        }
    }
    /// Does the firmware/boot loader fall back by itself when a new slot does not come up?
    pub fn falls_back_by_itself(self) -> bool {
        matches!(self, AbScheme::SystemdBoot | AbScheme::Tryboot)
    }
}

/// `[ab]` in a board file: how images of this board with `[update]` are laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbBoard {
    pub scheme: AbScheme,
    /// The size of each root slot (every later release must fit in it).
    pub slot_size: Size,
    /// The size of the data partition in the image; it grows to fill the disk at first boot.
    pub data_size: Size,
    /// Size of each slot's own FAT boot partition (`tryboot` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_boot_size: Option<Size>,
}

impl AbBoard {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.slot_size.bytes() < 256 << 20 {
            return Err(Invalid::new(
                "ab.slot_size",
                "a root slot needs at least 256MiB",
            ));
        }
        if self.data_size.bytes() < 32 << 20 {
            return Err(Invalid::new(
                "ab.data_size",
                "the data partition needs at least 32MiB",
            ));
        }
        match (self.scheme, self.slot_boot_size) {
            (AbScheme::Tryboot, None) => Err(Invalid::new(
                "ab.slot_boot_size",
                "scheme = \"tryboot\" needs slot_boot_size (each slot has its own FAT boot partition)",
            )),
            (AbScheme::Tryboot, Some(s)) if s.bytes() < 33 << 20 => Err(Invalid::new(
                "ab.slot_boot_size",
                "a FAT32 boot partition must be at least 33MiB",
            )),
            (AbScheme::SystemdBoot | AbScheme::OsPrefix, Some(_)) => Err(Invalid::new(
                "ab.slot_boot_size",
                "only scheme = \"tryboot\" has a boot partition per slot",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_http_folders() {
        let s = UpdateSource::try_from("http://10.0.0.1:8080/update".to_string()).unwrap();
        assert_eq!(s.as_str(), "http://10.0.0.1:8080/update/");
        assert_eq!(
            s.join("SHA256SUMS"),
            "http://10.0.0.1:8080/update/SHA256SUMS"
        );
        for bad in [
            "ftp://x/",
            "http:///x",
            "10.0.0.1/update/",
            "http://x/a b/",
            "http://x/?q=1",
        ] {
            assert!(UpdateSource::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    #[test]
    fn checks_map_to_timer_calendars() {
        assert_eq!(UpdateCheck::Manual.on_calendar(), None);
        assert_eq!(UpdateCheck::Hourly.on_calendar(), Some("hourly"));
        assert_eq!(UpdateCheck::Daily.on_calendar(), Some("daily"));
    }
}
