//! cloud-init NoCloud files on the boot partition: `meta-data`, `user-data` (`#cloud-config`)
//! and `network-config` (version 2), the subset Raspberry Pi Imager 2.x and Ubuntu's Pi
//! images write: host name, users (`user:` and `users:`) with `passwd`/`hashed_passwd`,
//! `plain_text_passwd` (hashed here), `lock_passwd`, `ssh_authorized_keys`, `sudo`,
//! `groups`; `ssh_pwauth`, `timezone`, `keyboard` (its layout), and wifi with its access
//! point, hidden flag and regulatory domain. Everything else is a located warning (never a
//! failed node): clutch runs no commands and installs no packages from the boot partition.

use std::path::Path;

use clutch_config::{Country, Hostname, PasswordHash, SshPublicKey, Timezone, UserName, WifiPsk};

use super::imported::{Imported, ImportedUser, ImportedWifi, Password, Sudo};
use super::secret;
use super::yaml::{self, Node};

struct Ctx<'a> {
    path: &'a Path,
    out: Imported,
}

impl Ctx<'_> {
    fn warn(&mut self, n: &Node, key: &str, m: impl std::fmt::Display) {
        let p = n.pos();
        self.out.warnings.push(format!(
            "{}:{}:{}: {key}: {m}",
            self.path.display(),
            p.line,
            p.col
        ));
    }
}

fn parse(path: &Path, text: &str, out: &mut Imported) -> Option<Node> {
    match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            out.warnings.push(format!(
                "{}:{}: {}; nothing in this file was applied",
                path.display(),
                e.pos,
                e.message
            ));
            None
        }
    }
}

/// `meta-data`: `local-hostname` (the host name unless user-data names one).
pub fn meta_data(path: &Path, text: &str) -> Imported {
    let mut c = Ctx {
        path,
        out: Imported::default(),
    };
    let Some(root) = parse(path, text, &mut c.out) else {
        return c.out;
    };
    let Some(entries) = root.entries() else {
        c.warn(&root, "meta-data", "must be a mapping; ignored");
        return c.out;
    };
    for (k, v) in entries {
        match k {
            "local-hostname" | "hostname" => hostname(&mut c, v, k),
            "instance-id" | "dsmode" => {}
            _ => c.warn(v, k, "not used by clutch; ignored"),
        }
    }
    c.out
}

fn hostname(c: &mut Ctx, v: &Node, key: &str) {
    match v.as_str().map(Hostname::try_from) {
        Some(Ok(h)) => c.out.hostname = Some(h),
        Some(Err(m)) => c.warn(v, key, format!("{m}; host name not changed")),
        None => c.warn(v, key, format!("must be a string, not {}", v.kind())),
    }
}

/// Keys Imager and Ubuntu write that need nothing from clutch (it always manages
/// /etc/hosts, answers mDNS itself and never locks root out differently).
const NOTHING_TO_DO: &[&str] = &[
    "manage_etc_hosts",
    "preserve_hostname",
    "prefer_fqdn_over_hostname",
    "disable_root",
    "apt",
    "package_update",
    "package_upgrade",
    "locale",
];

/// `user-data`: a `#cloud-config` document.
pub fn user_data(path: &Path, text: &str, salt: &[u8]) -> Imported {
    let mut c = Ctx {
        path,
        out: Imported::default(),
    };
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !first.trim_end().starts_with("#cloud-config") {
        if !text.trim().is_empty() {
            c.out.warnings.push(format!(
                "{}:1:1: user-data: not a `#cloud-config` file (scripts and other formats are not run); nothing applied",
                path.display()
            ));
        }
        return c.out;
    }
    let Some(root) = parse(path, text, &mut c.out) else {
        return c.out;
    };
    let Some(entries) = root.entries() else {
        c.warn(&root, "user-data", "must be a mapping; ignored");
        return c.out;
    };
    let mut fqdn_host = None;
    for (k, v) in entries {
        match k {
            "hostname" => hostname(&mut c, v, k),
            "fqdn" => match v.as_str() {
                Some(f) if f.len() <= 253 && f.split('.').all(|l| Hostname::try_from(l).is_ok()) => {
                    c.out.fqdn = Some(f.to_string());
                    fqdn_host = Hostname::try_from(f.split('.').next().unwrap_or(f)).ok();
                }
                _ => c.warn(v, k, "is not a host name such as node1.example.org; ignored"),
            },
            "timezone" => match v.as_str().map(Timezone::try_from) {
                Some(Ok(z)) => c.out.timezone = Some(z),
                Some(Err(m)) => c.warn(v, k, format!("{m}; time zone not changed")),
                None => c.warn(v, k, "must be a string"),
            },
            "keyboard" => match v.get("layout").and_then(Node::as_str) {
                Some(l) => match super::custom_toml::keymap(l) {
                    Ok(l) => c.out.keymap = Some(l),
                    Err(m) => c.warn(v, "keyboard.layout", m),
                },
                None => c.warn(v, k, "has no `layout`; ignored"),
            },
            "ssh_pwauth" => match v.as_bool() {
                Some(b) => c.out.password_authentication = Some(b),
                None if v.as_str() == Some("unchanged") => {}
                None => c.warn(v, k, "must be true or false"),
            },
            "enable_ssh" => match v.as_bool() {
                Some(b) => c.out.ssh_enabled = Some(b),
                None => c.warn(v, k, "must be true or false"),
            },
            "ssh_authorized_keys" => {
                let keys = keys(&mut c, v, k);
                c.out.image_user_keys.extend(keys);
            }
            "user" => {
                // cloud-init's default user: clutch's own image user stands for it only by
                // name, so a `user:` is one more user, with the default user's sudo.
                let u = match v {
                    Node::Scalar { text, .. } => single_name(&mut c, v, text),
                    _ => user_entry(&mut c, v, "user", Sudo::NoPassword, salt),
                };
                if let Some(u) = u {
                    add_user(&mut c.out, u);
                }
            }
            "users" => users(&mut c, v, salt),
            "packages" => packages(&mut c, v),
            k if NOTHING_TO_DO.contains(&k) => {}
            "runcmd" | "bootcmd" | "write_files" | "chpasswd" | "password" | "ssh_import_id"
            | "rpi" | "ntp" | "mounts" | "snap" | "power_state" => c.warn(
                v,
                k,
                "not applied: clutch runs no commands and changes nothing else from the boot partition",
            ),
            _ => c.warn(v, k, "unknown to clutch; ignored"),
        }
    }
    if c.out.hostname.is_none() {
        c.out.hostname = fqdn_host;
    }
    c.out
}

fn single_name(c: &mut Ctx, v: &Node, text: &str) -> Option<ImportedUser> {
    match UserName::try_from(text) {
        Ok(n) => {
            let mut u = ImportedUser::named(n);
            u.sudo = Some(Sudo::NoPassword);
            Some(u)
        }
        Err(m) => {
            c.warn(v, "user", format!("{m}; no user set up"));
            None
        }
    }
}

fn add_user(out: &mut Imported, u: ImportedUser) {
    let mut one = Imported::default();
    one.users.push(u);
    out.merge(one);
}

fn packages(c: &mut Ctx, v: &Node) {
    let Node::Seq { items, .. } = v else {
        return c.warn(v, "packages", "must be a list");
    };
    for p in items {
        // Imager asks for avahi-daemon with every host name; clutch answers mDNS itself.
        if p.as_str() != Some("avahi-daemon") {
            c.warn(
                p,
                "packages",
                "not installed: clutch installs no packages at boot",
            );
        }
    }
}

fn keys(c: &mut Ctx, v: &Node, key: &str) -> Vec<SshPublicKey> {
    let items: Vec<&Node> = match v {
        Node::Seq { items, .. } => items.iter().collect(),
        Node::Scalar { .. } if !v.is_null() => vec![v],
        _ if v.is_null() => Vec::new(),
        _ => {
            c.warn(v, key, "must be a list of keys");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, n) in items.into_iter().enumerate() {
        match n.as_str().map(|s| SshPublicKey::try_from(s.trim())) {
            Some(Ok(k)) => out.push(k),
            Some(Err(m)) => c.warn(n, &format!("{key}[{i}]"), format!("{m}; key skipped")),
            None => c.warn(n, &format!("{key}[{i}]"), "must be a string; key skipped"),
        }
    }
    out
}

fn users(c: &mut Ctx, v: &Node, salt: &[u8]) {
    let Node::Seq { items, .. } = v else {
        return c.warn(v, "users", "must be a list");
    };
    for (i, item) in items.iter().enumerate() {
        let key = format!("users[{i}]");
        match item {
            // The distribution's default user: the image has its own.
            Node::Scalar { text, .. } if text == "default" => {}
            Node::Scalar { text, .. } => {
                if let Ok(n) = UserName::try_from(text.as_str()) {
                    add_user(&mut c.out, ImportedUser::named(n));
                } else {
                    c.warn(item, &key, "is not a user name; skipped");
                }
            }
            _ => {
                if let Some(u) = user_entry(c, item, &key, Sudo::No, salt) {
                    add_user(&mut c.out, u);
                }
            }
        }
    }
}

/// One user mapping; `default_sudo` when it has no `sudo` key.
fn user_entry(
    c: &mut Ctx,
    v: &Node,
    key: &str,
    default_sudo: Sudo,
    salt: &[u8],
) -> Option<ImportedUser> {
    let Some(entries) = v.entries() else {
        c.warn(v, key, "must be a mapping; skipped");
        return None;
    };
    let Some(name_node) = v.get("name") else {
        c.warn(v, key, "has no `name`; skipped");
        return None;
    };
    let name = match name_node.as_str().map(UserName::try_from) {
        Some(Ok(n)) => n,
        Some(Err(m)) => {
            c.warn(
                name_node,
                &format!("{key}.name"),
                format!("{m}; user skipped"),
            );
            return None;
        }
        None => {
            c.warn(
                name_node,
                &format!("{key}.name"),
                "must be a string; user skipped",
            );
            return None;
        }
    };
    let mut u = ImportedUser::named(name);
    let mut hash: Option<PasswordHash> = None;
    let mut locked = true;
    let mut sudo = default_sudo;
    for (k, n) in entries {
        let at = format!("{key}.{k}");
        match k {
            "name" => {}
            "passwd" | "hashed_passwd" => match n.as_str().map(PasswordHash::try_from) {
                Some(Ok(h)) if !h.as_str().is_empty() => hash = Some(h),
                Some(Ok(_)) | None => c.warn(n, &at, "must be a crypt(3) hash; not set"),
                Some(Err(m)) => c.warn(n, &at, format!("{m}; not set")),
            },
            "plain_text_passwd" => match n.as_str() {
                Some(p) => match secret::hash_plain_password(p, salt) {
                    Ok(h) => hash = Some(h),
                    Err(m) => c.warn(n, &at, m),
                },
                None => c.warn(n, &at, "must be a string; not set"),
            },
            "lock_passwd" => match n.as_bool() {
                Some(b) => locked = b,
                None => c.warn(n, &at, "must be true or false"),
            },
            "ssh_authorized_keys" => u.keys = keys(c, n, &at),
            "sudo" => sudo = sudo_rule(c, n, &at),
            "groups" => u.groups = groups(c, n, &at),
            "shell" => {
                if n.as_str() != Some("/bin/bash") {
                    c.warn(n, &at, "clutch's users get /bin/bash; ignored");
                }
            }
            "gecos" | "create_groups" => {}
            "ssh_import_id" => c.warn(n, &at, "keys are not fetched from the network; ignored"),
            _ => c.warn(n, &at, "not supported by clutch; ignored"),
        }
    }
    u.sudo = Some(sudo);
    u.password = match (hash, locked) {
        (None, false) => None,
        (hash, locked) => Some(Password { hash, locked }),
    };
    Some(u)
}

/// cloud-init's `sudo`: a sudoers rule (or a list of them), `null`/`false` for none.
fn sudo_rule(c: &mut Ctx, n: &Node, at: &str) -> Sudo {
    let rules: Vec<&str> = match n {
        _ if n.is_null() || n.as_bool() == Some(false) => return Sudo::WithPassword,
        Node::Scalar { text, .. } => vec![text.as_str()],
        Node::Seq { items, .. } => items.iter().filter_map(Node::as_str).collect(),
        _ => Vec::new(),
    };
    let norm = |r: &str| r.split_whitespace().collect::<Vec<_>>().join(" ");
    let all: Vec<String> = rules.iter().map(|r| norm(r)).collect();
    if all.iter().any(|r| {
        matches!(
            r.as_str(),
            "ALL=(ALL) NOPASSWD:ALL"
                | "ALL=(ALL:ALL) NOPASSWD:ALL"
                | "ALL=(ALL) NOPASSWD: ALL"
                | "ALL=(ALL:ALL) NOPASSWD: ALL"
        )
    }) {
        Sudo::NoPassword
    } else if all
        .iter()
        .any(|r| matches!(r.as_str(), "ALL=(ALL) ALL" | "ALL=(ALL:ALL) ALL"))
    {
        Sudo::WithPassword
    } else {
        c.warn(
            n,
            at,
            "only `ALL=(ALL) NOPASSWD:ALL` and `ALL=(ALL) ALL` are understood; this user gets no sudo",
        );
        Sudo::No
    }
}

fn groups(c: &mut Ctx, n: &Node, at: &str) -> Vec<String> {
    let names: Vec<String> = match n {
        Node::Scalar { text, .. } => text.split(',').map(|g| g.trim().to_string()).collect(),
        Node::Seq { items, .. } => items
            .iter()
            .filter_map(|i| i.as_str().map(|s| s.trim().to_string()))
            .collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for g in names.into_iter().filter(|g| !g.is_empty()) {
        if g.len() <= 32
            && g.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
        {
            out.push(g);
        } else {
            c.warn(n, at, format!("`{g}` is not a group name; skipped"));
        }
    }
    out
}

/// `network-config`, version 2 (with or without a `network:` key around it).
pub fn network_config(path: &Path, text: &str) -> Imported {
    let mut c = Ctx {
        path,
        out: Imported::default(),
    };
    let Some(root) = parse(path, text, &mut c.out) else {
        return c.out;
    };
    let net = root.get("network").unwrap_or(&root);
    let Some(entries) = net.entries() else {
        c.warn(net, "network", "must be a mapping; ignored");
        return c.out;
    };
    for (k, v) in entries {
        match k {
            "version" => {
                if v.as_str() != Some("2") {
                    c.warn(v, k, "only version 2 is read; nothing applied");
                    return Imported {
                        warnings: c.out.warnings,
                        ..Default::default()
                    };
                }
            }
            "renderer" => {}
            "ethernets" => ethernets(&mut c, v),
            "wifis" => wifis(&mut c, v),
            _ => c.warn(v, k, "not applied: clutch configures wired links itself"),
        }
    }
    c.out
}

fn ethernets(c: &mut Ctx, v: &Node) {
    for (name, e) in v.entries().unwrap_or_default() {
        for (k, n) in e.entries().unwrap_or_default() {
            let at = format!("ethernets.{name}.{k}");
            match k {
                "dhcp4" | "dhcp6" if n.as_bool() == Some(true) => {}
                "optional" | "match" | "set-name" => {}
                _ => c.warn(
                    n,
                    &at,
                    "not applied: wired links use DHCP with an IPv4 link-local fallback",
                ),
            }
        }
    }
}

fn wifis(c: &mut Ctx, v: &Node) {
    let mut first = true;
    for (iface, w) in v.entries().unwrap_or_default() {
        if !first {
            c.warn(
                w,
                &format!("wifis.{iface}"),
                "only one wifi interface is set up; ignored",
            );
            continue;
        }
        first = false;
        if iface != "wlan0" {
            c.warn(
                w,
                &format!("wifis.{iface}"),
                "set up as wlan0, the name clutch's images give the wifi",
            );
        }
        let mut aps = Vec::new();
        for (k, n) in w.entries().unwrap_or_default() {
            let at = format!("wifis.{iface}.{k}");
            match k {
                "regulatory-domain" => match n
                    .as_str()
                    .map(|s| Country::try_from(s.to_ascii_uppercase()))
                {
                    Some(Ok(cc)) => c.out.wifi_country = Some(cc),
                    _ => c.warn(n, &at, "is not a two-letter country code; ignored"),
                },
                "access-points" => {
                    aps = n
                        .entries()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(s, n)| (s.to_string(), n.clone()))
                        .collect()
                }
                "dhcp4" | "dhcp6" if n.as_bool() == Some(true) => {}
                "optional" | "match" | "set-name" => {}
                _ => c.warn(
                    n,
                    &at,
                    "not applied: wifi uses DHCP with an IPv4 link-local fallback",
                ),
            }
        }
        for (i, (ssid, ap)) in aps.iter().enumerate() {
            let at = format!("wifis.{iface}.access-points.{ssid}");
            if i > 0 {
                c.warn(ap, &at, "only the first access point is set up; ignored");
                continue;
            }
            access_point(c, ssid, ap, &at);
        }
    }
}

fn access_point(c: &mut Ctx, ssid: &str, ap: &Node, at: &str) {
    if ssid.is_empty() || ssid.len() > 32 {
        return c.warn(ap, at, "an SSID has 1 to 32 bytes; wifi not set up");
    }
    let mut password = ap
        .get("password")
        .and_then(Node::as_str)
        .map(str::to_string);
    let mut hidden = false;
    for (k, n) in ap.entries().unwrap_or_default() {
        match k {
            "password" => {}
            "hidden" => hidden = n.as_bool().unwrap_or(false),
            "auth" => {
                for (ak, an) in n.entries().unwrap_or_default() {
                    match (ak, an.as_str()) {
                        ("key-management", Some("none")) => password = None,
                        ("key-management", Some("psk" | "sae")) => {}
                        ("password", Some(p)) => password = Some(p.to_string()),
                        _ => c.warn(an, &format!("{at}.auth.{ak}"), "not supported; ignored"),
                    }
                }
            }
            "mode" if n.as_str() == Some("infrastructure") => {}
            _ => c.warn(n, &format!("{at}.{k}"), "not supported; ignored"),
        }
    }
    let psk = match password.map(WifiPsk::try_from) {
        Some(Ok(p)) => Some(p),
        Some(Err(m)) => {
            return c.warn(
                ap,
                &format!("{at}.password"),
                format!("{m}; wifi not set up"),
            );
        }
        None => None,
    };
    c.out.wifi = Some(ImportedWifi {
        ssid: ssid.to_string(),
        psk,
        hidden,
    });
}
