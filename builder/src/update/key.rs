//! Release signing: `clutch update-key FILE` makes an Ed25519 key pair (PKCS#8 PEM, mode
//! 0600, and its SubjectPublicKeyInfo PEM in `FILE.pub`, both readable by OpenSSL), and a
//! build signs its `update/SHA256SUMS` with it (`SHA256SUMS.sig`: the raw 64-byte Ed25519
//! signature of the file's bytes, as `openssl pkeyutl -sign -rawin` makes).
//!
//! The private key is read only here; only the public half goes into an image.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{} already exists; not overwriting a signing key", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the signing key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an Ed25519 PKCS#8 PEM private key (make one with `clutch update-key`): {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("encoding the key: {0}")]
    Encode(String),
}

/// The public half's file: `FILE.pub`.
pub fn public_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

fn create_new(path: &Path, mode: u32, data: &[u8]) -> Result<(), KeyError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes a new key pair: `path` (0600) and `path.pub` (0644). Refuses to overwrite either.
pub fn generate(path: &Path, seed: [u8; 32]) -> Result<VerifyingKey, KeyError> {
    let key = SigningKey::from_bytes(&seed);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Encode(e.to_string()))?;
    let pub_path = public_path(path);
    if pub_path.exists() {
        return Err(KeyError::Exists { path: pub_path });
    }
    create_new(path, 0o600, private.as_bytes())?;
    if let Err(e) = create_new(&pub_path, 0o644, public.as_bytes()) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(key.verifying_key())
}

/// A loaded signing key.
pub struct ReleaseKey {
    key: SigningKey,
}

impl ReleaseKey {
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(ReleaseKey { key })
    }

    /// The public half as the image carries it (SubjectPublicKeyInfo PEM).
    pub fn public_pem(&self) -> Result<String, KeyError> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// The detached signature of `data` (64 bytes).
    pub fn sign(&self, data: &[u8]) -> [u8; 64] {
        self.key.sign(data).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::DecodePublicKey;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_key_is_private_signs_and_verifies_with_its_public_half() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("release.key");
        generate(&k, [7; 32]).unwrap();
        let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&k).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        let pub_text = std::fs::read_to_string(public_path(&k)).unwrap();
        assert!(pub_text.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let key = ReleaseKey::load(&k).unwrap();
        assert_eq!(key.public_pem().unwrap(), pub_text);
        let sig = key.sign(b"SHA256SUMS bytes");
        let vk = VerifyingKey::from_public_key_pem(&pub_text).unwrap();
        let sig = ed25519_dalek::Signature::from_bytes(&sig);
        vk.verify_strict(b"SHA256SUMS bytes", &sig).unwrap();
        assert!(vk.verify_strict(b"other bytes", &sig).is_err());
        // Never overwritten.
        assert!(matches!(
            generate(&k, [8; 32]),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn a_wrong_file_says_what_it_should_be() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("x.key");
        std::fs::write(&k, "not a key").unwrap();
        let e = ReleaseKey::load(&k).err().unwrap().to_string();
        assert!(e.contains("clutch update-key"), "{e}");
    }

    /// OpenSSL reads both files and checks the signature (the formats are standard).
    #[test]
    fn openssl_verifies_our_signatures() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            panic!("openssl is needed for this test (scripts/install-host-deps installs it)");
        }
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("r.key");
        generate(&k, [9; 32]).unwrap();
        let data = t.path().join("SHA256SUMS");
        std::fs::write(&data, b"abc  file\n").unwrap();
        let sig = t.path().join("SHA256SUMS.sig");
        std::fs::write(&sig, ReleaseKey::load(&k).unwrap().sign(b"abc  file\n")).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
            .arg(public_path(&k))
            .arg("-in")
            .arg(&data)
            .arg("-sigfile")
            .arg(&sig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
