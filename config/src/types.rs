//! Validated newtypes. Each parses from a TOML string through `TryFrom<String>`, so a bad
//! value fails during deserialisation with the value's own span.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $check:expr) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s)?;
                Ok($name(s))
            }
        }
        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(s: &str) -> Result<Self, String> {
                Self::try_from(s.to_string())
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_hostname(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("hostname is empty".into());
    }
    if s.len() > 63 {
        return Err(format!("hostname `{s}` is longer than 63 characters"));
    }
    if !s.split('.').all(is_label) {
        return Err(format!(
            "`{s}` is not a valid hostname: use letters, digits and `-` (not at either end of a label)"
        ));
    }
    Ok(())
}

string_newtype!(
    /// A host name as the kernel and DNS accept it (RFC 1123, at most 63 characters).
    Hostname,
    check_hostname
);

/// Sample values used to validate a hostname template before any node exists.
pub const SAMPLE_ID: &str = "0a1b2c";
pub const SAMPLE_MAC: &str = "525400123456";

string_newtype!(
    /// A hostname template: a hostname that may contain `{id}` and `{mac}`.
    HostnameTemplate,
    |s| {
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            let end = rest[i..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in hostname template `{s}`"))?;
            let name = &rest[i + 1..i + end];
            if name != "id" && name != "mac" {
                return Err(format!(
                    "unknown placeholder `{{{name}}}` in hostname template `{s}` (known: {{id}}, {{mac}})"
                ));
            }
            rest = &rest[i + end + 1..];
        }
        if rest.contains('}') {
            return Err(format!("stray `}}` in hostname template `{s}`"));
        }
        check_hostname(&render_template(s, SAMPLE_ID, SAMPLE_MAC))
    }
);

fn render_template(t: &str, id: &str, mac: &str) -> String {
    t.replace("{id}", id).replace("{mac}", mac)
}

impl HostnameTemplate {
    /// Renders the template for one node. `id` is 6 hex chars, `mac` 12 lowercase hex.
    pub fn render(&self, id: &str, mac: &str) -> Result<Hostname, String> {
        Hostname::try_from(render_template(&self.0, id, mac))
    }
    pub fn uses_mac(&self) -> bool {
        self.0.contains("{mac}")
    }
}

impl Default for HostnameTemplate {
    fn default() -> Self {
        HostnameTemplate("node-{id}".into())
    }
}

string_newtype!(
    /// A lowercase name: loopback device, cluster, overlay, board.
    Name,
    |s| {
        if s.is_empty() || s.len() > 32 {
            return Err(format!("`{s}` must be 1 to 32 characters long"));
        }
        let ok_first = s.as_bytes()[0].is_ascii_lowercase() || s.as_bytes()[0].is_ascii_digit();
        if !ok_first
            || !s
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{s}` is not a valid name: use lowercase letters, digits, `-` and `_`, starting with a letter or digit"
            ));
        }
        Ok(())
    }
);

string_newtype!(
    /// A Unix user name as Debian's useradd accepts it (not root).
    UserName,
    |s| {
        let valid = !s.is_empty()
            && s.len() <= 32
            && (s.as_bytes()[0].is_ascii_lowercase() || s.as_bytes()[0] == b'_')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "`{s}` is not a valid user name: lowercase letters, digits, `_`, `-`, starting with a letter, at most 32"
            ));
        }
        if s == "root" {
            return Err("the user cannot be `root`; root login stays locked".into());
        }
        Ok(())
    }
);

string_newtype!(
    /// A Debian package name.
    PackageName,
    |s| {
        let valid = s.len() >= 2
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b) || b == b':'
            });
        if valid {
            Ok(())
        } else {
            Err(format!("`{s}` is not a valid Debian package name"))
        }
    }
);

string_newtype!(
    /// A Debian suite or codename (`trixie`, `bookworm`, `stable`).
    Suite,
    |s| {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            Ok(())
        } else {
            Err(format!("`{s}` is not a Debian suite name"))
        }
    }
);

string_newtype!(
    /// An http(s) mirror URL.
    Mirror,
    |s| {
        if (s.starts_with("http://") || s.starts_with("https://") || s.starts_with("file:/"))
            && !s.contains(char::is_whitespace)
        {
            Ok(())
        } else {
            Err(format!("`{s}` is not an http://, https:// or file:/ URL"))
        }
    }
);

string_newtype!(
    /// A time zone name from the tz database (`UTC`, `Europe/London`).
    Timezone,
    |s| {
        let valid = !s.is_empty()
            && !s.starts_with('/')
            && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
        if valid {
            Ok(())
        } else {
            Err(format!("`{s}` is not a time zone name such as `UTC` or `Europe/London`"))
        }
    }
);

string_newtype!(
    /// A two-letter ISO 3166 country code for the wifi regulatory domain.
    Country,
    |s| {
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(())
        } else {
            Err(format!("`{s}` is not a two-letter upper-case country code such as `GB`"))
        }
    }
);

string_newtype!(
    /// One kernel command line argument.
    KernelArg,
    |s| {
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control()) {
            Err(format!("kernel argument `{s}` must be one non-empty word"))
        } else {
            Ok(())
        }
    }
);

string_newtype!(
    /// A crypt(3) password hash (`$y$...`, `$6$...`), or empty for no password.
    PasswordHash,
    |s| {
        if s.is_empty() {
            return Ok(());
        }
        if !s.starts_with('$') || s.contains(|c: char| c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(
                "password_hash must be a crypt(3) hash such as the output of `mkpasswd -m yescrypt` (starts with `$`)"
                    .into(),
            );
        }
        Ok(())
    }
);

// The newtype macro fixes the derives, so Default is written out.
#[allow(clippy::derivable_impls)]
impl Default for PasswordHash {
    fn default() -> Self {
        PasswordHash(String::new())
    }
}

string_newtype!(
    /// An OpenSSH public key line: `type base64 [comment]`.
    SshPublicKey,
    check_ssh_key
);

const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

fn check_ssh_key(s: &str) -> Result<(), String> {
    if s.contains(['\n', '\r']) {
        return Err("an authorized key must be a single line".into());
    }
    let mut parts = s.split_whitespace();
    let ty = parts.next().ok_or("authorized key is empty")?;
    if !SSH_KEY_TYPES.contains(&ty) {
        return Err(format!(
            "`{ty}` is not an SSH public key type (expected one of {})",
            SSH_KEY_TYPES.join(", ")
        ));
    }
    let b64 = parts
        .next()
        .ok_or("authorized key has no key data after its type")?;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("authorized key data is not valid base64: {e}"))?;
    if blob.len() < 4 {
        return Err("authorized key data is truncated".into());
    }
    let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    if blob.get(4..4 + n) != Some(ty.as_bytes()) {
        return Err(format!("authorized key data does not encode a `{ty}` key"));
    }
    Ok(())
}

/// The cluster's shared secret (at least 32 characters). Never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Token(String);

pub const TOKEN_MIN_LEN: usize = 32;

impl TryFrom<String> for Token {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let s = s.trim().to_string();
        if s.chars().count() < TOKEN_MIN_LEN {
            return Err(format!(
                "token is {} characters long; it must be at least {TOKEN_MIN_LEN} (make one with `clutch token`)",
                s.chars().count()
            ));
        }
        if s.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err("token must not contain white space".into());
        }
        Ok(Token(s))
    }
}
impl From<Token> for String {
    fn from(t: Token) -> String {
        t.0
    }
}
impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Why this token looks made by hand (and so guessable), if it does. `clutch token`
    /// makes 256 random bits; a PAKE keeps guesses online, but a dictionary token still
    /// falls to a patient attacker on the LAN.
    pub fn weakness(&self) -> Option<String> {
        let t = self.0.as_str();
        let len = t.chars().count();
        let has = |f: fn(&char) -> bool| t.chars().any(|c| f(&c));
        let alphabet = [
            (has(char::is_ascii_lowercase), 26.0),
            (has(char::is_ascii_uppercase), 26.0),
            (has(char::is_ascii_digit), 10.0),
            (has(|c| !c.is_ascii_alphanumeric()), 32.0),
        ]
        .iter()
        .filter(|(h, _)| *h)
        .map(|(_, n)| n)
        .sum::<f64>();
        let bits = len as f64 * alphabet.log2();
        let mut distinct: Vec<char> = t.chars().collect();
        distinct.sort_unstable();
        distinct.dedup();
        // Characters that read as words (lowercase runs of three or more) or as counting
        // (0123, abcd): what people type, not what a random source gives.
        let chars: Vec<char> = t.chars().collect();
        let mut human = vec![false; len];
        let mut mark = |from: usize, to: usize, min: usize| {
            if to - from >= min {
                human[from..to].iter_mut().for_each(|h| *h = true);
            }
        };
        let mut start = 0;
        for i in 1..=len {
            if i == len || !(chars[i].is_ascii_lowercase() && chars[start].is_ascii_lowercase()) {
                mark(start, i, 3);
                start = i;
            }
        }
        let mut start = 0;
        for i in 1..=len {
            if i == len || chars[i] as u32 != chars[i - 1] as u32 + 1 {
                mark(start, i, 4);
                start = i;
            }
        }
        let in_words = human.iter().filter(|h| **h).count();
        if bits < 128.0 {
            Some(format!(
                "it holds only about {} bits of randomness",
                bits as u32
            ))
        } else if distinct.len() < 12 {
            Some(format!("it repeats {} distinct characters", distinct.len()))
        } else if in_words * 2 > len {
            Some("it is made mostly of words or counting".into())
        } else {
            None
        }
    }
}
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A WPA passphrase (8–63 printable ASCII) or a raw 64-hex-digit PSK. Never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WifiPsk(String);

impl TryFrom<String> for WifiPsk {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let n = s.len();
        if n == 64 {
            if s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(WifiPsk(s.to_ascii_lowercase()));
            }
            return Err("a 64-character psk must be 64 hex digits (a raw WPA key)".into());
        }
        if !(8..=63).contains(&n) {
            return Err(format!(
                "psk is {n} characters long; a WPA passphrase has 8 to 63 characters (or give the 64-hex-digit key)"
            ));
        }
        if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err("a WPA passphrase may hold printable ASCII characters only".into());
        }
        Ok(WifiPsk(s))
    }
}
impl From<WifiPsk> for String {
    fn from(t: WifiPsk) -> String {
        t.0
    }
}
impl fmt::Debug for WifiPsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WifiPsk(<redacted>)")
    }
}
impl WifiPsk {
    /// The 64-hex-digit WPA key: PBKDF2-HMAC-SHA1(passphrase, ssid, 4096, 32), or the key
    /// itself when it already is one.
    pub fn hex_key(&self, ssid: &str) -> String {
        if self.is_hex_key() {
            return self.0.clone();
        }
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha1::Sha1>(self.0.as_bytes(), ssid.as_bytes(), 4096, &mut out);
        hex::encode(out)
    }
    pub fn is_hex_key(&self) -> bool {
        self.0.len() == 64
    }
}

/// A byte size written as `512MiB`, `4GiB`, `100MB` or a plain number of bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Size(u64);

impl Size {
    pub const fn from_bytes(b: u64) -> Self {
        Size(b)
    }
    pub const fn mib(n: u64) -> Self {
        Size(n << 20)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let bad = || {
            format!(
                "`{s}` is not a size: write a whole number with a unit, such as `512MiB` or `4GiB`"
            )
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        let b = n
            .checked_mul(mult)
            .ok_or_else(|| format!("`{s}` is too large"))?;
        if b == 0 {
            return Err("size must be greater than zero".into());
        }
        Ok(Size(b))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (u, shift) in UNITS {
            if self.0 >= 1 << shift && self.0 % (1 << shift) == 0 {
                return write!(f, "{}{u}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Debug for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

macro_rules! debug_as_display {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    )*};
}
debug_as_display!(
    Hostname,
    HostnameTemplate,
    Name,
    UserName,
    PackageName,
    Suite,
    Mirror,
    Timezone,
    Country,
    KernelArg,
    PasswordHash,
    SshPublicKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("512MiB".parse::<Size>().unwrap().bytes(), 512 << 20);
        assert_eq!("4GiB".parse::<Size>().unwrap().bytes(), 4 << 30);
        assert_eq!("100MB".parse::<Size>().unwrap().bytes(), 100_000_000);
        assert_eq!("4096".parse::<Size>().unwrap().bytes(), 4096);
        assert_eq!(Size::mib(2048).to_string(), "2GiB");
        for bad in [
            "",
            "0MiB",
            "1.5GiB",
            "12 parsecs",
            "-1G",
            "99999999999999TiB",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hostname_templates() {
        let t = HostnameTemplate::try_from("node-{id}").unwrap();
        assert_eq!(t.render("abc123", "x").unwrap().as_str(), "node-abc123");
        let m = HostnameTemplate::try_from("pi-{mac}").unwrap();
        assert!(m.uses_mac());
        assert!(HostnameTemplate::try_from("node-{serial}").is_err());
        assert!(HostnameTemplate::try_from("node_{id}").is_err());
        assert!(HostnameTemplate::try_from("-{id}").is_err());
        assert!(HostnameTemplate::try_from("node-{id").is_err());
    }

    #[test]
    fn ssh_keys() {
        // A real ed25519 public key blob (type string + 32 bytes).
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";
        assert!(SshPublicKey::try_from(k).is_ok());
        assert!(SshPublicKey::try_from("ssh-ed25519 AAAA... me@laptop").is_err());
        assert!(SshPublicKey::try_from("ssh-dss AAAAB3 x").is_err());
        // base64 of a blob that claims to be ssh-rsa but is labelled ed25519
        let rsa = "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x";
        assert!(
            SshPublicKey::try_from(rsa)
                .unwrap_err()
                .contains("does not encode")
        );
    }

    #[test]
    fn wifi_psk_derivation_matches_wpa_passphrase() {
        // wpa_passphrase "IEEE" "password" (IEEE 802.11i test vector)
        let p = WifiPsk::try_from("password".to_string()).unwrap();
        assert_eq!(
            p.hex_key("IEEE"),
            "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
        );
        assert!(WifiPsk::try_from("short".to_string()).is_err());
        assert!(WifiPsk::try_from("z".repeat(64)).is_err());
        assert!(WifiPsk::try_from("A".repeat(64)).unwrap().is_hex_key());
    }

    #[test]
    fn tokens_are_redacted_and_checked() {
        assert!(Token::try_from("short".to_string()).is_err());
        let t = Token::try_from("x".repeat(40)).unwrap();
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn hand_made_tokens_are_told_apart_from_random_ones() {
        let weak = |s: &str| Token::try_from(s.to_string()).unwrap().weakness();
        for hand_made in [
            "lab-token-not-secret-0123456789abcdef",
            "correct-horse-battery-staple-sunshine",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "01234567890123456789012345678901",
            "Password1Password1Password1Password1",
        ] {
            assert!(weak(hand_made).is_some(), "{hand_made}");
        }
        for random in [
            // `clutch token`, `openssl rand -hex 32`, `openssl rand -base64 32`
            "9f2c4e1a7b3d5f60818293a4b5c6d7e8f90112233445566778899aabbccddeef",
            "3b7e1c9a0f5d2e8b4a6c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f00",
            "q1Zr8+W0nT4yB6cV2mK9xL3pD7hF5jG0sA1uE8iO4kM=",
        ] {
            assert_eq!(weak(random), None, "{random}");
        }
    }

    #[test]
    fn names() {
        assert!(Name::try_from("data0").is_ok());
        assert!(Name::try_from("Data0").is_err());
        assert!(Name::try_from("../x").is_err());
        assert!(UserName::try_from("root").is_err());
        assert!(Timezone::try_from("Europe/London").is_ok());
        assert!(Timezone::try_from("../etc/passwd").is_err());
        assert!(Country::try_from("gb").is_err());
    }
}
