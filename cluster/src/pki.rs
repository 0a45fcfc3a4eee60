//! The cluster's certificate authority (rcgen, ECDSA P-256): made by the node that
//! bootstraps, handed (inside encrypted sessions) to every server so any of them can admit
//! later nodes, and used to sign each member's certificate from a request the member made
//! itself — a node's private TLS key never leaves it.
//!
//! Validity runs from 2000 to 2100: nodes boot with wrong clocks (a Raspberry Pi has no
//! real-time clock and starts at the image's build time until NTP answers), so a certificate
//! valid "from now" would be refused by a peer whose clock is behind. Rotation is a manual
//! re-keying (README, "Cluster security").

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// What a member gets: the CA certificate, its own certificate, and (servers only) the CA
/// key so it can admit others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub ca_cert: String,
    pub cert: String,
    pub ca_key: Option<Secret>,
}

fn validity(p: &mut CertificateParams) {
    p.not_before = date_time_ymd(2000, 1, 1);
    p.not_after = date_time_ymd(2100, 1, 1);
}

/// The cluster CA.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A new CA for `cluster` (its name goes into the subject, for people reading certs).
    pub fn generate(cluster: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("clutch cluster {cluster} CA"));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut p);
        let cert = p.self_signed(&key).map_err(rc("signing the CA"))?;
        Ok(Ca { cert, key })
    }
    /// The CA from its stored certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc("reading the CA key"))?;
        let params =
            CertificateParams::from_ca_cert_pem(cert_pem).map_err(rc("reading the CA cert"))?;
        // Re-signing the same subject with the same key gives an issuer whose name and key
        // identifier match the stored certificate, which is all signing needs.
        let cert = params.self_signed(&key).map_err(rc("loading the CA"))?;
        Ok(Ca { cert, key })
    }
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }
    pub fn key_pem(&self) -> Secret {
        Secret::new(self.key.serialize_pem())
    }
    /// Signs a member certificate for the key in `csr_pem`. The subject and names come from
    /// `names` (what the admitting node verified), never from the request.
    pub fn sign(&self, csr_pem: &str, names: &Names) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(rc("reading the certificate request"))?;
        csr.params = names.params()?;
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .map_err(rc("signing a member certificate"))?;
        Ok(cert.pem())
    }
}

/// Who a member certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub common_name: String,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

impl Names {
    fn params(&self) -> Result<CertificateParams, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.common_name.clone());
        p.distinguished_name = dn;
        for d in &self.dns {
            p.subject_alt_names.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| PkiError::Invalid(format!("not a DNS name: {d:?}")))?,
            ));
        }
        for ip in &self.ips {
            p.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        // Members are servers to clients and peers, and clients of each other.
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p);
        Ok(p)
    }
}

/// A member's own key pair and the request to sign its public half.
pub struct KeyAndRequest {
    pub key: Secret,
    pub csr: String,
}

/// Makes a key pair and a certificate request for it (the names in the request are only a
/// hint; the signer decides).
pub fn key_and_request(common_name: &str) -> Result<KeyAndRequest, PkiError> {
    let key = KeyPair::generate().map_err(rc("generating a member key"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name.to_string());
    p.distinguished_name = dn;
    let csr = p
        .serialize_request(&key)
        .map_err(rc("making a certificate request"))?
        .pem()
        .map_err(rc("encoding the certificate request"))?;
    Ok(KeyAndRequest {
        key: Secret::new(key.serialize_pem()),
        csr,
    })
}

/// The public key of a PEM certificate request (for checking that a signed certificate
/// belongs to the key we hold).
pub fn same_key(cert_pem: &str, key_pem: &str) -> Result<bool, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(rc("reading a member key"))?;
    let params = x509_public_key(cert_pem)?;
    Ok(params == key.public_key_der())
}

fn x509_public_key(cert_pem: &str) -> Result<Vec<u8>, PkiError> {
    use x509_parser::prelude::FromDer;
    let der =
        ::pem::parse(cert_pem).map_err(|e| PkiError::Invalid(format!("certificate PEM: {e}")))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.contents())
        .map_err(|e| PkiError::Invalid(format!("certificate: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            common_name: "node-a".into(),
            dns: vec!["node-a".into(), "node-a.local".into(), "localhost".into()],
            ips: vec!["10.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        }
    }

    #[test]
    fn a_member_certificate_is_signed_for_its_own_key_with_the_signers_names() {
        let ca = Ca::generate("lab").unwrap();
        let req = key_and_request("attacker-chosen-name").unwrap();
        let cert = ca.sign(&req.csr, &names()).unwrap();
        assert!(same_key(&cert, req.key.expose()).unwrap());
        let other = key_and_request("x").unwrap();
        assert!(!same_key(&cert, other.key.expose()).unwrap());
        use x509_parser::prelude::FromDer;
        let der = ::pem::parse(&cert).unwrap();
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(der.contents()).unwrap();
        let subject = c.subject().to_string();
        assert!(subject.contains("node-a"), "{subject}");
        assert!(!subject.contains("attacker"), "{subject}");
        let issuer = c.issuer().to_string();
        assert!(issuer.contains("clutch cluster lab CA"), "{issuer}");
        assert!(
            c.validity().not_before.timestamp() <= 946_684_800,
            "valid from 2000"
        );
    }

    #[test]
    fn a_stored_ca_signs_certificates_that_chain_to_the_original() {
        let ca = Ca::generate("lab").unwrap();
        let again = Ca::from_pem(&ca.cert_pem(), ca.key_pem().expose()).unwrap();
        let req = key_and_request("n").unwrap();
        let cert = again.sign(&req.csr, &names()).unwrap();
        // The signature verifies with the original CA certificate's key.
        use x509_parser::prelude::FromDer;
        let ca_der = ::pem::parse(ca.cert_pem()).unwrap();
        let (_, ca_x) =
            x509_parser::certificate::X509Certificate::from_der(ca_der.contents()).unwrap();
        let der = ::pem::parse(&cert).unwrap();
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(der.contents()).unwrap();
        assert!(c.verify_signature(Some(ca_x.public_key())).is_ok());
        assert_eq!(c.issuer(), ca_x.subject());
    }

    #[test]
    fn garbage_requests_are_refused_and_keys_are_not_printed() {
        let ca = Ca::generate("lab").unwrap();
        assert!(
            ca.sign(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &names()
            )
            .is_err()
        );
        assert!(!format!("{:?}", ca.key_pem()).contains("PRIVATE"));
    }
}
