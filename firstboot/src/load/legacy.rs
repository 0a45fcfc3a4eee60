//! The older Raspberry Pi OS boot-partition files: `ssh`/`ssh.txt` (any content: turn SSH
//! on), `userconf.txt`/`userconf` (`name:crypt-hash`, the first user) and
//! `wpa_supplicant.conf` (its country and first network).

use std::path::Path;

use clutch_config::{Country, PasswordHash, UserName, WifiPsk};

use super::imported::{Imported, ImportedWifi, Password, Sudo};

pub fn ssh() -> Imported {
    Imported {
        ssh_enabled: Some(true),
        ..Default::default()
    }
}

fn warn(out: &mut Imported, path: &Path, line: usize, m: impl std::fmt::Display) {
    out.warnings
        .push(format!("{}:{line}:1: {m}", path.display()));
}

/// `userconf.txt`: one line `name:hash`, as Raspberry Pi OS's userconf-pi reads it.
pub fn userconf(path: &Path, text: &str) -> Imported {
    let mut out = Imported::default();
    let Some((n, line)) = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .find(|(_, l)| !l.is_empty())
        .map(|(i, l)| (l, i))
    else {
        return out;
    };
    let Some((name, hash)) = n.split_once(':') else {
        warn(
            &mut out,
            path,
            line,
            "expected `name:crypt-hash`; no user set up",
        );
        return out;
    };
    let name = match UserName::try_from(name) {
        Ok(u) => u,
        Err(m) => {
            warn(&mut out, path, line, format!("{m}; no user set up"));
            return out;
        }
    };
    let hash = match PasswordHash::try_from(hash) {
        Ok(h) if !h.as_str().is_empty() => h,
        Ok(_) => {
            warn(
                &mut out,
                path,
                line,
                "the password hash is empty; no user set up",
            );
            return out;
        }
        Err(m) => {
            warn(&mut out, path, line, format!("{m}; no user set up"));
            return out;
        }
    };
    let u = out.user(&name);
    u.password = Some(Password {
        hash: Some(hash),
        locked: false,
    });
    u.sudo = Some(Sudo::NoPassword);
    out
}

/// Unquotes a wpa_supplicant value: `"text"` or hex bytes.
fn wpa_string(v: &str) -> Option<String> {
    if let Some(s) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Some(s.to_string());
    }
    let bytes = hex::decode(v).ok()?;
    String::from_utf8(bytes).ok()
}

/// `wpa_supplicant.conf`: `country=`, and the first `network={...}` (ssid, psk or
/// key_mgmt=NONE, scan_ssid).
pub fn wpa_supplicant(path: &Path, text: &str) -> Imported {
    let mut out = Imported::default();
    let mut in_net = false;
    let mut nets = 0;
    let mut cur: Vec<(usize, String, String)> = Vec::new();
    let mut first: Option<Vec<(usize, String, String)>> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("network=") && line.ends_with('{') {
            in_net = true;
            nets += 1;
            cur.clear();
            continue;
        }
        if in_net && line == "}" {
            in_net = false;
            if nets == 1 {
                first = Some(std::mem::take(&mut cur));
            } else {
                warn(
                    &mut out,
                    path,
                    i + 1,
                    "only the first network is set up; this one is ignored",
                );
            }
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            warn(&mut out, path, i + 1, "not `key=value`; ignored");
            continue;
        };
        if in_net {
            cur.push((i + 1, k.trim().to_string(), v.trim().to_string()));
        } else if k.trim() == "country" {
            match Country::try_from(v.trim().to_ascii_uppercase()) {
                Ok(c) => out.wifi_country = Some(c),
                Err(m) => warn(&mut out, path, i + 1, m),
            }
        }
    }
    let Some(net) = first else {
        return out;
    };
    let mut ssid = None;
    let mut psk = None;
    let mut open = false;
    let mut hidden = false;
    for (line, k, v) in net {
        match k.as_str() {
            "ssid" => ssid = wpa_string(&v),
            "psk" => {
                let p = wpa_string(&v)
                    .filter(|_| v.starts_with('"'))
                    .unwrap_or(v.clone());
                match WifiPsk::try_from(p) {
                    Ok(p) => psk = Some(p),
                    Err(m) => warn(&mut out, path, line, format!("psk: {m}")),
                }
            }
            "key_mgmt" if v == "NONE" => open = true,
            "scan_ssid" => hidden = v == "1",
            "key_mgmt" | "priority" | "id_str" | "proto" | "pairwise" | "group" | "ieee80211w" => {}
            _ => warn(&mut out, path, line, format!("{k}: not supported; ignored")),
        }
    }
    match ssid {
        Some(ssid) if !ssid.is_empty() && ssid.len() <= 32 => {
            out.wifi = Some(ImportedWifi {
                ssid,
                psk: if open { None } else { psk },
                hidden,
            });
        }
        _ => warn(
            &mut out,
            path,
            1,
            "the first network has no usable ssid; wifi not set up",
        ),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wpa_supplicant_conf_as_people_wrote_it() {
        let t = "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev\nupdate_config=1\ncountry=gb\n\nnetwork={\n ssid=\"home net\"\n psk=\"correct horse\"\n scan_ssid=1\n}\nnetwork={\n ssid=\"other\"\n key_mgmt=NONE\n}\n";
        let i = wpa_supplicant(Path::new("/boot/firmware/wpa_supplicant.conf"), t);
        assert_eq!(i.wifi_country.unwrap().as_str(), "GB");
        let w = i.wifi.unwrap();
        assert_eq!(w.ssid, "home net");
        assert!(w.hidden && w.psk.is_some());
        assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
        assert!(i.warnings[0].contains(":13:1: only the first network"));
    }

    #[test]
    fn userconf_line() {
        let p = Path::new("/boot/firmware/userconf.txt");
        let i = userconf(p, "pi:$6$abc$def\n");
        assert_eq!(i.users[0].name.as_str(), "pi");
        assert_eq!(
            i.users[0]
                .password
                .as_ref()
                .unwrap()
                .hash
                .as_ref()
                .unwrap()
                .as_str(),
            "$6$abc$def"
        );
        assert!(userconf(p, "pi raspberry\n").warnings[0].contains("name:crypt-hash"));
        assert!(userconf(p, "\n").is_empty());
    }
}
