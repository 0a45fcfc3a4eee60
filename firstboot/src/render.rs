//! Generated config files, as pure functions (golden-tested).

use clutch_config::{Country, Hostname, Ssh, SshPublicKey, WifiPsk};

pub const HEADER: &str =
    "# Written by clutch-firstboot at boot from clutch.toml; edits here are overwritten.\n";

pub fn hostname_file(h: &Hostname) -> String {
    format!("{h}\n")
}

const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n\
::1\t\tlocalhost ip6-localhost ip6-loopback\n\
ff02::1\t\tip6-allnodes\n\
ff02::2\t\tip6-allrouters\n";

/// `/etc/hosts` with exactly one `127.0.1.1 [<fqdn>] <hostname>` line (after the 127.0.0.1
/// line), every other line kept.
pub fn hosts_file(existing: Option<&str>, h: &Hostname, fqdn: Option<&str>) -> String {
    let existing = existing
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(DEFAULT_HOSTS);
    let ours = match fqdn.filter(|f| *f != h.as_str()) {
        Some(f) => format!("127.0.1.1\t{f} {h}"),
        None => format!("127.0.1.1\t{h}"),
    };
    let mut out = Vec::new();
    let mut placed = false;
    for line in existing.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first == "127.0.1.1" {
            continue;
        }
        out.push(line.to_string());
        if !placed && first == "127.0.0.1" {
            out.push(ours.clone());
            placed = true;
        }
    }
    if !placed {
        out.insert(0, ours);
    }
    out.join("\n") + "\n"
}

pub fn sshd_dropin(ssh: &Ssh) -> String {
    let yn = |b: bool| if b { "yes" } else { "no" };
    format!(
        "{HEADER}PasswordAuthentication {}\nKbdInteractiveAuthentication {}\nPermitRootLogin no\n\
         HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n",
        yn(ssh.password_authentication),
        yn(ssh.password_authentication)
    )
}

pub fn authorized_keys(keys: &[SshPublicKey]) -> String {
    let mut s = String::from(
        "# Written by clutch-firstboot at boot from clutch.toml [user] authorized_keys.\n",
    );
    for k in keys {
        s += k.as_str();
        s.push('\n');
    }
    s
}

pub fn sudoers(user: &str) -> String {
    format!("{HEADER}{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
}

/// A wpa_supplicant `ssid=` value: quoted when that is unambiguous, else hex.
fn ssid_value(ssid: &str) -> String {
    if ssid
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        format!("\"{ssid}\"")
    } else {
        ssid.bytes().map(|b| format!("{b:02x}")).collect()
    }
}

/// `/etc/wpa_supplicant/wpa_supplicant-wlan0.conf`; the passphrase is stored only as the
/// derived 64-hex key. No psk = an open network.
/// Without a country the world regulatory domain applies.
pub fn wpa_supplicant(
    ssid: &str,
    psk: Option<&WifiPsk>,
    country: Option<&Country>,
    hidden: bool,
) -> String {
    let mut s =
        format!("{HEADER}ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n");
    if let Some(c) = country {
        s += &format!("country={c}\n");
    }
    s += &format!("\nnetwork={{\n\tssid={}\n", ssid_value(ssid));
    if hidden {
        s += "\tscan_ssid=1\n";
    }
    match psk {
        Some(p) => s += &format!("\tkey_mgmt=WPA-PSK\n\tpsk={}\n", p.hex_key(ssid)),
        None => s += "\tkey_mgmt=NONE\n",
    }
    s += "}\n";
    s
}

/// `wlan0`: DHCP with the IPv4 link-local fallback, as the image's wired links have it;
/// mDNS and LLMNR off in networkd (clutch-firstboot answers mDNS itself).
pub fn wlan_network() -> String {
    format!(
        "{HEADER}[Match]\nName=wlan0\n\n[Network]\nDHCP=yes\nLinkLocalAddressing=yes\nMulticastDNS=no\nLLMNR=no\n\n[DHCPv4]\nRouteMetric=600\n"
    )
}

/// `/etc/modprobe.d/clutch-wifi-country.conf`: the radio's regulatory domain from boot on.
pub fn regdom(country: &Country) -> String {
    format!("{HEADER}options cfg80211 ieee80211_regdom={country}\n")
}

/// `/etc/default/keyboard` with XKBLAYOUT set, other lines kept.
pub fn keyboard(existing: Option<&str>, layout: &str) -> String {
    let base = existing.unwrap_or(
        "XKBMODEL=\"pc105\"\nXKBLAYOUT=\"us\"\nXKBVARIANT=\"\"\nXKBOPTIONS=\"\"\nBACKSPACE=\"guess\"\n",
    );
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for line in base.lines() {
        if line.trim_start().starts_with("XKBLAYOUT=") {
            if !placed {
                out.push(format!("XKBLAYOUT=\"{layout}\""));
                placed = true;
            }
        } else {
            out.push(line.to_string());
        }
    }
    if !placed {
        out.push(format!("XKBLAYOUT=\"{layout}\""));
    }
    out.join("\n") + "\n"
}

/// `/etc/shadow` with the password field of `user` replaced; `None` if the user has no line.
pub fn shadow_with_hash(shadow: &str, user: &str, hash: &str) -> Option<String> {
    let mut found = false;
    let lines: Vec<String> = shadow
        .lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(':').collect();
            if f.len() >= 2 && f[0] == user {
                found = true;
                f[1] = hash;
                f.join(":")
            } else {
                l.to_string()
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_replaces_old_line_and_keeps_others() {
        let h = Hostname::try_from("node-abc123").unwrap();
        let old = "127.0.0.1 localhost\n127.0.1.1 debian\n10.0.0.5 nas\n";
        assert_eq!(
            hosts_file(Some(old), &h, None),
            "127.0.0.1 localhost\n127.0.1.1\tnode-abc123\n10.0.0.5 nas\n"
        );
        let no_lo = hosts_file(Some("10.0.0.5 nas\n"), &h, None);
        assert_eq!(no_lo, "127.0.1.1\tnode-abc123\n10.0.0.5 nas\n");
        // idempotent
        let once = hosts_file(Some(old), &h, None);
        assert_eq!(hosts_file(Some(&once), &h, None), once);
        let f = hosts_file(Some(old), &h, Some("node-abc123.lab.example"));
        assert!(
            f.contains("127.0.1.1\tnode-abc123.lab.example node-abc123\n"),
            "{f}"
        );
    }

    #[test]
    fn ssid_quoting() {
        assert_eq!(ssid_value("lab-net"), "\"lab-net\"");
        assert_eq!(ssid_value("a\"b"), "612262");
        assert_eq!(ssid_value("café"), "636166c3a9");
    }

    #[test]
    fn shadow_hash_replaced() {
        let s = "root:*:19000:0:99999:7:::\nadmin:!:19000:0:99999:7:::\n";
        let n = shadow_with_hash(s, "admin", "$y$j9T$abc").unwrap();
        assert_eq!(
            n,
            "root:*:19000:0:99999:7:::\nadmin:$y$j9T$abc:19000:0:99999:7:::\n"
        );
        assert!(shadow_with_hash(s, "bob", "$y$x").is_none());
    }

    #[test]
    fn keyboard_layout() {
        let k = keyboard(Some("XKBMODEL=\"pc105\"\nXKBLAYOUT=\"us\"\n"), "gb");
        assert_eq!(k, "XKBMODEL=\"pc105\"\nXKBLAYOUT=\"gb\"\n");
        assert!(keyboard(None, "de").contains("XKBLAYOUT=\"de\""));
    }
}
