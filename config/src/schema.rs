//! The image config (`image-configs/*.toml`), the node config (`clutch.toml` on the FAT
//! partition) and the sections they share. See SPEC.md "Image config".

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::diag::{Invalid, KeyPath};
use crate::release::Release;
use crate::types::*;
use crate::update::{NodeUpdate, UpdateSection};

pub const CONFIG_VERSION: u32 = 1;

fn yes() -> bool {
    true
}
fn default_suite() -> Suite {
    Suite::try_from("trixie").expect("valid suite")
}
fn default_overlays() -> Vec<Name> {
    vec![Name::try_from("base").expect("valid name")]
}
fn default_timezone() -> Timezone {
    Timezone::try_from("UTC").expect("valid tz")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Zst,
    Bmap,
    Pxe,
    /// A signed release for nodes to update to (`update/`); needs `[update]`.
    Update,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Zst => "zst",
            Format::Bmap => "bmap",
            Format::Pxe => "pxe",
            Format::Update => "update",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageSize {
    #[default]
    Auto,
    Fixed(Size),
}

impl TryFrom<String> for ImageSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s == "auto" {
            Ok(ImageSize::Auto)
        } else {
            s.parse::<Size>()
                .map(ImageSize::Fixed)
                .map_err(|e| format!("{e}, or `auto`"))
        }
    }
}
impl From<ImageSize> for String {
    fn from(s: ImageSize) -> String {
        match s {
            ImageSize::Auto => "auto".into(),
            ImageSize::Fixed(s) => s.to_string(),
        }
    }
}
impl Serialize for ImageSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from(*self))
    }
}
impl<'de> Deserialize<'de> for ImageSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ImageSize::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    #[serde(default)]
    pub size: ImageSize,
    #[serde(default = "default_formats")]
    pub formats: Vec<Format>,
    /// The OS release this build is; `None`: derived from the build time (see
    /// [`ImageConfig::release`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
}
fn default_formats() -> Vec<Format> {
    vec![Format::Raw]
}
impl Default for ImageSection {
    fn default() -> Self {
        ImageSection {
            size: ImageSize::Auto,
            formats: default_formats(),
            release: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    #[serde(default)]
    pub hostname: HostnameTemplate,
    #[serde(default = "default_timezone")]
    pub timezone: Timezone,
}
impl Default for System {
    fn default() -> Self {
        System {
            hostname: HostnameTemplate::default(),
            timezone: default_timezone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: UserName,
    #[serde(default)]
    pub authorized_keys: Vec<SshPublicKey>,
    #[serde(default, skip_serializing_if = "is_empty_hash")]
    pub password_hash: PasswordHash,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash_file: Option<PathBuf>,
    #[serde(default = "yes")]
    pub sudo: bool,
}
fn is_empty_hash(h: &PasswordHash) -> bool {
    h.as_str().is_empty()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub password_authentication: bool,
}
impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            enabled: true,
            password_authentication: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wifi {
    pub ssid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<WifiPsk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    pub country: Country,
    #[serde(default)]
    pub hidden: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    #[serde(default = "yes")]
    pub cgroups: bool,
    #[serde(default)]
    pub cmdline: Vec<KernelArg>,
}
impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            cgroups: true,
            cmdline: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopFormat {
    #[default]
    None,
    Ext4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loopback {
    pub name: Name,
    pub size: Size,
    #[serde(default)]
    pub format: LoopFormat,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mount: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loopback: Vec<Loopback>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    K3s,
    Etcd,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: Name,
    pub engine: Engine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default = "one")]
    pub expected_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
}
fn one() -> u32 {
    1
}

impl Cluster {
    /// Voting members wanted; defaults to `min(expected_size, 3)`.
    pub fn servers(&self) -> u32 {
        self.servers.unwrap_or(self.expected_size.min(3))
    }
    /// Nodes that must have proven the token before anyone bootstraps.
    pub fn quorum(&self) -> u32 {
        self.expected_size / 2 + 1
    }
}

/// `clutch.toml` on the image's FAT partition: what a node applies at first boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub version: u32,
    #[serde(default)]
    pub system: System,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(default)]
    pub ssh: Ssh,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi: Option<Wifi>,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<NodeUpdate>,
}

/// An image config: what `clutch build` turns into an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub version: u32,
    pub board: Name,
    #[serde(default = "default_suite")]
    pub suite: Suite,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    #[serde(default)]
    pub packages: Vec<PackageName>,
    #[serde(default = "default_overlays")]
    pub overlays: Vec<Name>,
    #[serde(default)]
    pub image: ImageSection,
    #[serde(default)]
    pub system: System,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    #[serde(default)]
    pub ssh: Ssh,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi: Option<Wifi>,
    #[serde(default)]
    pub kernel: Kernel,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateSection>,
}

pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

impl ImageConfig {
    pub fn mirror(&self) -> &str {
        self.mirror
            .as_ref()
            .map(|m| m.as_str())
            .unwrap_or(DEFAULT_MIRROR)
    }

    /// The node config written to the FAT partition (secrets inline; the node moves them).
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            version: CONFIG_VERSION,
            system: self.system.clone(),
            user: self.user.clone(),
            ssh: self.ssh.clone(),
            wifi: self.wifi.clone(),
            storage: self.storage.clone(),
            cluster: self.cluster.clone(),
            update: self.update.as_ref().map(UpdateSection::for_node),
        }
    }

    /// The release this build is: `[image] release`, else one made from the build time
    /// (`epoch`: `SOURCE_DATE_EPOCH` or now), `YYYY.MM.DD.HHMMSS` in UTC.
    pub fn release(&self, epoch: u64) -> Release {
        if let Some(r) = &self.image.release {
            return r.clone();
        }
        let (y, mo, d) = crate::release::civil_from_days((epoch / 86_400) as i64);
        let s = epoch % 86_400;
        Release::try_from(format!(
            "{y:04}.{mo:02}.{d:02}.{:02}{:02}{:02}",
            s / 3600,
            s / 60 % 60,
            s % 60
        ))
        .expect("digits and dots make a valid release")
    }

    /// Reads every `*_file` secret (relative to `base`) into its inline key.
    pub fn resolve_secret_files(&mut self, base: &Path) -> Result<(), Invalid> {
        if let Some(u) = &mut self.user {
            if let Some(f) = u.password_hash_file.take() {
                let s = read_secret(base, &f, "user.password_hash_file")?;
                u.password_hash = PasswordHash::try_from(s)
                    .map_err(|e| Invalid::new("user.password_hash_file", e))?;
            }
        }
        if let Some(w) = &mut self.wifi {
            if let Some(f) = w.psk_file.take() {
                let s = read_secret(base, &f, "wifi.psk_file")?;
                w.psk = Some(WifiPsk::try_from(s).map_err(|e| Invalid::new("wifi.psk_file", e))?);
            }
        }
        if let Some(u) = &mut self.update {
            if let Some(f) = &u.signing_key_file {
                let p = base.join(f);
                if !p.is_file() {
                    return Err(Invalid::new(
                        "update.signing_key_file",
                        format!(
                            "cannot read {}: make one with `clutch update-key {}`",
                            p.display(),
                            f.display()
                        ),
                    ));
                }
                // Kept as a path the builder can open from anywhere.
                u.signing_key_file = Some(p);
            }
        }
        if let Some(c) = &mut self.cluster {
            if let Some(f) = c.token_file.take() {
                let s = read_secret(base, &f, "cluster.token_file")?;
                c.token =
                    Some(Token::try_from(s).map_err(|e| Invalid::new("cluster.token_file", e))?);
            }
        }
        Ok(())
    }

    /// Cross-field rules of an image config (after `*_file` secrets are read).
    pub fn validate(&self) -> Result<(), Invalid> {
        check_version(self.version)?;
        let mut seen = BTreeSet::new();
        for (i, f) in self.image.formats.iter().enumerate() {
            if !seen.insert(*f) {
                return Err(Invalid::new(
                    &format!("image.formats[{i}]"),
                    format!("format `{}` is listed twice", f.as_str()),
                ));
            }
        }
        if let Some(i) = self.image.formats.iter().position(|f| *f == Format::Update) {
            match &self.update {
                None => {
                    return Err(Invalid::new(
                        &format!("image.formats[{i}]"),
                        "format `update` needs an [update] section (source, signing_key_file)",
                    ));
                }
                Some(u) if u.signing_key_file.is_none() => {
                    return Err(Invalid::new(
                        "update",
                        "format `update` needs signing_key_file (make one with `clutch update-key release.key`)",
                    ));
                }
                Some(_) => {}
            }
        }
        let mut names = BTreeSet::new();
        for (i, o) in self.overlays.iter().enumerate() {
            if !names.insert(o) {
                return Err(Invalid::new(
                    &format!("overlays[{i}]"),
                    format!("overlay `{o}` is listed twice"),
                ));
            }
        }
        validate_node_sections(
            self.user.as_ref(),
            self.wifi.as_ref(),
            &self.storage,
            self.cluster.as_ref(),
            SecretsRequired::Yes,
        )?;
        self.check_os_names()
    }

    /// The user name and time zone against what a trixie root filesystem has (see
    /// [`crate::account`] and [`crate::zone`]); the build checks them again against the
    /// image's own files.
    fn check_os_names(&self) -> Result<(), Invalid> {
        if let Some(u) = &self.user {
            crate::account::decide_without_root(&u.name)
                .map_err(|why| Invalid::new("user.name", why.to_string()))?;
        }
        let packages: Vec<&str> = self.packages.iter().map(|p| p.as_str()).collect();
        crate::zone::check_without_root(self.system.timezone.as_str(), &packages)
            .map_err(|why| Invalid::new("system.timezone", why.to_string()))
    }
}

impl NodeConfig {
    /// Rules for a node config. Secrets may be missing: the node may have moved them already.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_version(self.version)?;
        validate_node_sections(
            self.user.as_ref(),
            self.wifi.as_ref(),
            &self.storage,
            self.cluster.as_ref(),
            SecretsRequired::No,
        )
    }
}

fn check_version(v: u32) -> Result<(), Invalid> {
    if v != CONFIG_VERSION {
        return Err(Invalid::new(
            "version",
            format!(
                "config version {v} is not supported; this clutch reads version {CONFIG_VERSION}"
            ),
        ));
    }
    Ok(())
}

fn read_secret(base: &Path, file: &Path, key: &str) -> Result<String, Invalid> {
    let p = base.join(file);
    std::fs::read_to_string(&p)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|e| Invalid::new(key, format!("cannot read {}: {e}", p.display())))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SecretsRequired {
    Yes,
    No,
}

fn validate_node_sections(
    user: Option<&User>,
    wifi: Option<&Wifi>,
    storage: &Storage,
    cluster: Option<&Cluster>,
    secrets: SecretsRequired,
) -> Result<(), Invalid> {
    if let Some(u) = user {
        if u.password_hash_file.is_some() && !u.password_hash.as_str().is_empty() {
            return Err(Invalid::new(
                "user.password_hash_file",
                "give either password_hash or password_hash_file, not both",
            ));
        }
        if u.authorized_keys.is_empty()
            && u.password_hash.as_str().is_empty()
            && u.password_hash_file.is_none()
        {
            return Err(Invalid::new(
                "user",
                format!(
                    "user `{}` has neither authorized_keys nor a password_hash, so nobody could log in",
                    u.name
                ),
            ));
        }
    }
    if let Some(w) = wifi {
        let n = w.ssid.len();
        if n == 0 || n > 32 {
            return Err(Invalid::new(
                "wifi.ssid",
                format!("an SSID has 1 to 32 bytes, this one has {n}"),
            ));
        }
        if w.ssid.contains(|c: char| c.is_control()) {
            return Err(Invalid::new(
                "wifi.ssid",
                "the SSID contains a control character",
            ));
        }
        if w.psk.is_some() && w.psk_file.is_some() {
            return Err(Invalid::new(
                "wifi.psk_file",
                "give either psk or psk_file, not both",
            ));
        }
    }
    let mut names = BTreeSet::new();
    let mut mounts = BTreeSet::new();
    for (i, l) in storage.loopback.iter().enumerate() {
        let at = |k: &str| {
            KeyPath::root()
                .key("storage")
                .key("loopback")
                .index(i)
                .key(k)
        };
        if !names.insert(l.name.clone()) {
            return Err(Invalid::at(
                at("name"),
                format!("loopback device `{}` is defined twice", l.name),
            ));
        }
        if l.size.bytes() < 1 << 20 {
            return Err(Invalid::at(
                at("size"),
                "a loopback device must be at least 1MiB",
            ));
        }
        match l.format {
            LoopFormat::None if !l.mount.is_empty() => {
                return Err(Invalid::at(
                    at("mount"),
                    "mount needs format = \"ext4\"; a device with format = \"none\" stays a raw block device",
                ));
            }
            LoopFormat::Ext4 => {
                let m = &l.mount;
                if !m.starts_with('/')
                    || m == "/"
                    || m.split('/').any(|p| p == ".." || p == ".")
                    || m.contains(|c: char| c.is_whitespace() || c.is_control())
                {
                    return Err(Invalid::at(
                        at("mount"),
                        format!(
                            "`{m}` is not a usable mount point: give an absolute path such as /srv/data0"
                        ),
                    ));
                }
                if !mounts.insert(m.clone()) {
                    return Err(Invalid::at(
                        at("mount"),
                        format!("mount point {m} is used twice"),
                    ));
                }
            }
            LoopFormat::None => {}
        }
    }
    if let Some(c) = cluster {
        if c.token.is_some() && c.token_file.is_some() {
            return Err(Invalid::new(
                "cluster.token_file",
                "give either token or token_file, not both",
            ));
        }
        if secrets == SecretsRequired::Yes && c.token.is_none() && c.token_file.is_none() {
            return Err(Invalid::new(
                "cluster.token",
                "a cluster needs a token (>= 32 characters) or token_file",
            ));
        }
        if c.expected_size == 0 || c.expected_size > 1000 {
            return Err(Invalid::new(
                "cluster.expected_size",
                "expected_size must be between 1 and 1000",
            ));
        }
        if let Some(s) = c.servers {
            if s == 0 {
                return Err(Invalid::new(
                    "cluster.servers",
                    "servers must be at least 1",
                ));
            }
            if s > c.expected_size {
                return Err(Invalid::new(
                    "cluster.servers",
                    format!(
                        "servers = {s} but expected_size = {}: the cluster could never have that many voting members at bootstrap",
                        c.expected_size
                    ),
                ));
            }
        }
    }
    Ok(())
}
