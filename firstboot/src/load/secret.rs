//! Secrets on the FAT partition: where a secret value sits in clutch.toml (byte ranges, to
//! overwrite them in place), the tombstone that marks a value already moved, and hashing a
//! plain-text password before anything keeps it.
//!
//! vfat writes file data in place (no copy-on-write): overwriting the bytes of the old
//! clutch.toml changes the very clusters that held the secret, so once the stripped file
//! replaces it (a new file, renamed over the old) no copy of the secret is left on the
//! partition. A value made only of [`TOMBSTONE`] characters means "moved to
//! /var/lib/clutch": the loader drops such keys, so a power cut between the overwrite and
//! the rewrite loses nothing.

use std::ops::Range;

use clutch_config::PasswordHash;
use toml::de::{DeTable, DeValue};

/// What a moved secret's bytes are overwritten with.
pub const TOMBSTONE: u8 = b'*';

/// The secret keys of clutch.toml, as (table, key).
pub const SECRET_KEYS: &[(&str, &str)] = &[
    ("cluster", "token"),
    ("wifi", "psk"),
    ("user", "password_hash"),
];

/// One secret value in clutch.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSpan {
    pub table: &'static str,
    pub key: &'static str,
    /// The whole `key = "value"` (for blanking a tombstoned entry).
    pub entry: Range<usize>,
    /// The value's bytes between its quotes (what is overwritten).
    pub inner: Range<usize>,
    /// Already overwritten (only tombstone characters).
    pub moved: bool,
}

/// The secret values in `text` (a TOML document), in file order.
pub fn secret_spans(text: &str) -> Vec<SecretSpan> {
    let Ok(doc) = DeTable::parse(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (table, key) in SECRET_KEYS {
        let Some(t) = doc
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == *table)
            .and_then(|(_, v)| match v.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            })
        else {
            continue;
        };
        let Some((k, v)) = t.iter().find(|(k, _)| k.get_ref().as_ref() == *key) else {
            continue;
        };
        let DeValue::String(s) = v.get_ref() else {
            continue;
        };
        let span = v.span();
        let raw = &text[span.clone()];
        let quote = if raw.starts_with("\"\"\"") || raw.starts_with("'''") {
            3
        } else {
            1
        };
        if raw.len() < 2 * quote {
            continue;
        }
        let inner = span.start + quote..span.end - quote;
        out.push(SecretSpan {
            table,
            key,
            entry: k.span().start..span.end,
            inner,
            moved: is_tombstone(s),
        });
    }
    out.sort_by_key(|s| s.inner.start);
    out
}

/// A value made only of tombstone characters.
pub fn is_tombstone(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == TOMBSTONE)
}

/// `text` with every tombstoned secret entry blanked out (same length, same line breaks), so
/// that parsing ignores it and every other error keeps its line and column.
pub fn blank_tombstones(text: &str) -> (String, Vec<&'static str>) {
    let mut bytes = text.as_bytes().to_vec();
    let mut dropped = Vec::new();
    for s in secret_spans(text).into_iter().filter(|s| s.moved) {
        for b in &mut bytes[s.entry.clone()] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        dropped.push(s.table);
    }
    (
        String::from_utf8(bytes).expect("only ASCII bytes replaced by spaces"),
        dropped,
    )
}

/// A plain-text password hashed with SHA-512 crypt, as Raspberry Pi OS's init_config does
/// (`crypt.METHOD_SHA512`); `salt` is random bytes (12 make the usual 16 characters).
pub fn hash_plain_password(pw: &str, salt: &[u8]) -> Result<PasswordHash, String> {
    use sha_crypt::PasswordHasher;
    if pw.is_empty() || pw.contains(['\n', '\r', '\0']) {
        return Err("the password must be one non-empty line; it was not set".into());
    }
    let h = sha_crypt::ShaCrypt::SHA512
        .hash_password_with_salt(pw.as_bytes(), salt)
        .map_err(|e| format!("cannot hash the password: {e}"))?;
    PasswordHash::try_from(h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "version = 1\n[user]\nname = \"a\"\npassword_hash = \"$y$j9T$abc\" # x\n[cluster]\nname = \"lab\"\ntoken = \"0123456789abcdef0123456789abcdef\"\n";

    #[test]
    fn spans_cover_the_values_between_their_quotes() {
        let s = secret_spans(T);
        assert_eq!(s.len(), 2);
        assert_eq!(&T[s[0].inner.clone()], "$y$j9T$abc");
        assert_eq!(&T[s[0].entry.clone()], "password_hash = \"$y$j9T$abc\"");
        assert_eq!(&T[s[1].inner.clone()], "0123456789abcdef0123456789abcdef");
        assert!(!s[0].moved);
    }

    #[test]
    fn tombstoned_entries_are_blanked_in_place() {
        let mut b = T.as_bytes().to_vec();
        for s in secret_spans(T) {
            b[s.inner].fill(TOMBSTONE);
        }
        let t = String::from_utf8(b).unwrap();
        assert!(secret_spans(&t).iter().all(|s| s.moved));
        let (blank, dropped) = blank_tombstones(&t);
        assert_eq!(dropped, vec!["user", "cluster"]);
        assert_eq!(blank.len(), T.len());
        assert_eq!(blank.lines().count(), T.lines().count());
        assert!(!blank.contains("token") && !blank.contains("password_hash"));
        assert!(blank.contains("# x"));
        let v: toml::Table = toml::from_str(&blank).unwrap();
        assert!(v["cluster"].get("token").is_none());
    }

    #[test]
    fn plain_passwords_hash_like_glibc_sha512_crypt() {
        // glibc: crypt("raspberry", "$6$saltsaltsaltsalt$")
        let h = sha_crypt::ShaCrypt::SHA512;
        use sha_crypt::PasswordVerifier;
        let made = hash_plain_password("raspberry", b"0123456789ab").unwrap();
        assert!(made.as_str().starts_with("$6$"), "{made:?}");
        h.verify_password(b"raspberry", made.as_str()).unwrap();
        assert!(h.verify_password(b"wrong", made.as_str()).is_err());
        h.verify_password(
            b"raspberry",
            "$6$saltsaltsaltsalt$00of8Y8ZpAGaxosd4pu0Ff19hH8rucpwfCxof/ELn604.90zo6K8TACeDQP6Ttrc5F/ngjq/a4JzEcD.BmaGf1",
        )
        .unwrap_or_else(|e| panic!("glibc's own hash does not verify: {e}"));
        assert!(hash_plain_password("", b"x").is_err());
    }
}
