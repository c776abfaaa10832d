//! The fleet's certificate authority: created once, stored in the database, and used to issue
//! the control plane's server certificate and every agent's short-lived client certificate.
//!
//! Agents send a certificate signing request; only its public key is used. Subject, lifetime,
//! and extensions are always ours, so a crafted CSR cannot ask for a CA bit or another node's
//! name.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is invalid")]
    BadCsr(#[source] rcgen::Error),
    #[error("the client certificate is unreadable")]
    BadPeerCertificate,
    #[error("the client certificate does not name a node")]
    NoNodeInCertificate,
}

/// An issued certificate.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub serial_hex: String,
    pub not_after_unix: i64,
}

/// The CA's certificate and key, ready to sign.
pub struct CertificateAuthority {
    certificate_pem: String,
    certificate_der: Vec<u8>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("sha256", &self.sha256_hex())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new ECDSA P-256 CA, valid for ten years.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "Steward fleet CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Steward");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            certificate_pem: cert.pem(),
            certificate_der: cert.der().to_vec(),
            key,
        })
    }

    /// Restores a stored CA.
    pub fn from_pem(certificate_pem: &str, private_key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(private_key_pem)?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(certificate_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .map_err(|_| PkiError::BadPeerCertificate)?;
        Ok(Self {
            certificate_pem: certificate_pem.to_owned(),
            certificate_der: der,
            key,
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Hex sha256 of the CA certificate: what enrollment tokens pin.
    pub fn sha256_hex(&self) -> String {
        steward_proto::certificate_sha256_hex(&self.certificate_der)
    }

    /// ECDSA P-256 SHA-256 signature (ASN.1 DER) by the CA key, e.g. over an audit export.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        use rcgen::SigningKey;
        Ok(self.key.sign(message)?)
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_pem(&self.certificate_pem, &self.key)?)
    }

    /// A server certificate for the control plane covering `names` (DNS names or IPs).
    /// Returns the chain PEM (leaf then CA, so agents can pin the CA) and the key PEM.
    pub fn issue_server_certificate(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "steward control plane");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, lifetime);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            format!("{}{}", cert.pem(), self.certificate_pem),
            key.serialize_pem(),
        ))
    }

    /// Signs an agent's CSR as the client certificate of `node_id`.
    pub fn issue_node_certificate(
        &self,
        csr_der: &[u8],
        node_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Steward nodes");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://steward/node/{node_id}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let not_after = set_validity(&mut params, lifetime);
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(IssuedCertificate {
            certificate_pem: cert.pem(),
            serial_hex,
            not_after_unix: not_after.unix_timestamp(),
        })
    }
}

/// The node ID named by a verified client certificate (its subject common name).
pub fn node_id_from_certificate(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| PkiError::BadPeerCertificate)?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NoNodeInCertificate)?;
    uuid::Uuid::parse_str(cn).map_err(|_| PkiError::NoNodeInCertificate)?;
    Ok(cn.to_owned())
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    // A minute of back-dating tolerates small clock skew between control plane and agents.
    params.not_before = now - time::Duration::minutes(1);
    let not_after = now + time::Duration::seconds(lifetime.as_secs().min(i64::MAX as u64) as i64);
    params.not_after = not_after;
    not_after
}

fn random_serial() -> SerialNumber {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(key: &KeyPair, cn: &str, is_ca: bool) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn node_certificates_name_the_node_whatever_the_csr_asks_for() {
        let ca = CertificateAuthority::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        let node = uuid::Uuid::new_v4().to_string();
        let csr = csr_for(&key, "someone-else", true);
        let issued = ca
            .issue_node_certificate(&csr, &node, Duration::from_secs(3600))
            .unwrap();
        let der = steward_proto::transport::parse_certs(&issued.certificate_pem, "test")
            .unwrap()
            .remove(0);
        assert_eq!(node_id_from_certificate(&der).unwrap(), node);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(
            !parsed.is_ca(),
            "a CSR must not be able to request the CA bit"
        );
        let lifetime =
            parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
        assert!(
            (3600..=3600 + 61).contains(&lifetime),
            "lifetime {lifetime}"
        );
    }

    #[test]
    fn a_garbled_csr_is_refused() {
        let ca = CertificateAuthority::generate().unwrap();
        let err = ca
            .issue_node_certificate(b"not a csr", "x", Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::BadCsr(_)));
    }

    #[test]
    fn a_stored_ca_restores_with_the_same_hash() {
        let ca = CertificateAuthority::generate().unwrap();
        let restored =
            CertificateAuthority::from_pem(ca.certificate_pem(), &ca.private_key_pem()).unwrap();
        assert_eq!(restored.sha256_hex(), ca.sha256_hex());
    }
}
