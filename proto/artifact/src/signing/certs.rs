//! Offline X.509 chain validation to a private root, for certificate-based bundles.
//!
//! Path building, signatures of each link, validity periods, CA basic constraints, path length
//! and name constraints, and the extended key usage are checked by `rustls-webpki` (the
//! verifier rustls uses). On top of that, as `model_signing` requires, the leaf must be allowed
//! to sign: key usage `digitalSignature` or extended key usage `codeSigning`. Unlike
//! `model_signing`, a leaf whose key usage extension lacks `digitalSignature` is refused even
//! with `codeSigning`, an extended key usage without `codeSigning` is refused, and an
//! intermediate whose key usage lacks `keyCertSign` is refused.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use super::SigningError;
use super::keys::{VerifyingKey, pem_blocks};

/// id-kp-codeSigning (1.3.6.1.5.5.7.3.3), DER contents.
const EKU_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

/// What a leaf certificate says about its holder (not trusted by itself).
pub(crate) struct Leaf {
    /// First email, then URI, then DNS subject alternative name; else the subject DN.
    pub identity: String,
    /// Every email, URI and DNS subject alternative name.
    pub names: Vec<String>,
    pub subject: String,
    pub issuer: String,
}

/// Reads the identity from a leaf certificate (DER).
pub(crate) fn describe_leaf(der: &[u8]) -> Result<Leaf, SigningError> {
    let cert = parse(der).map_err(|e| {
        SigningError::MalformedBundle(format!("the signing certificate cannot be parsed: {e}"))
    })?;
    let mut emails = Vec::new();
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    let san = cert.subject_alternative_name().map_err(|e| {
        SigningError::MalformedBundle(format!(
            "the signing certificate's subject alternative names cannot be parsed: {e}"
        ))
    })?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::RFC822Name(v) => emails.push(v.to_string()),
                GeneralName::URI(v) => uris.push(v.to_string()),
                GeneralName::DNSName(v) => dns.push(v.to_string()),
                _ => {}
            }
        }
    }
    let names: Vec<String> = emails.into_iter().chain(uris).chain(dns).collect();
    let subject = cert.subject().to_string();
    Ok(Leaf {
        identity: names.first().cloned().unwrap_or_else(|| subject.clone()),
        names,
        subject,
        issuer: cert.issuer().to_string(),
    })
}

/// The public key of a leaf certificate (DER).
pub(crate) fn leaf_key(der: &[u8]) -> Result<VerifyingKey, SigningError> {
    let cert = parse(der).map_err(|e| {
        SigningError::MalformedBundle(format!("the signing certificate cannot be parsed: {e}"))
    })?;
    VerifyingKey::from_spki_der(cert.public_key().raw)
        .map_err(|e| SigningError::UntrustedCertificate(format!("the leaf's key: {e}")))
}

/// The DER root certificates in a trust anchor's PEM (one or more `CERTIFICATE` blocks).
pub(crate) fn roots_from_pem(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let roots: Vec<Vec<u8>> = pem_blocks(pem)?
        .into_iter()
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| block.der)
        .collect();
    if roots.is_empty() {
        return Err("no PEM CERTIFICATE block".into());
    }
    for root in &roots {
        parse(root).map_err(|e| format!("a root certificate cannot be parsed: {e}"))?;
        webpki::anchor_from_trusted_cert(&CertificateDer::from(root.as_slice()))
            .map_err(|e| format!("a root certificate cannot be a trust anchor: {e}"))?;
    }
    Ok(roots)
}

/// Checks that `chain` (DER, leaf first, then any intermediates in any order; a copy of the
/// root is harmless) leads to one of `roots` and is valid at `at`. The roots themselves must
/// also be valid at `at`. Returns why not.
pub(crate) fn verify_chain(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    at: SystemTime,
) -> Result<(), String> {
    let [leaf_der, rest @ ..] = chain else {
        return Err("the bundle has no certificate".into());
    };
    check_leaf_usage(leaf_der)?;

    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let time = UnixTime::since_unix_epoch(since_epoch);
    let asn1_time = i64::try_from(since_epoch.as_secs())
        .ok()
        .and_then(|secs| ASN1Time::from_timestamp(secs).ok())
        .ok_or("the verification time is out of range")?;

    let leaf = CertificateDer::from(leaf_der.as_slice());
    let end_entity = EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("the leaf certificate cannot be parsed: {e}"))?;
    let intermediates: Vec<CertificateDer<'_>> = rest
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();

    let mut reasons = Vec::new();
    for root_der in roots {
        let root = parse(root_der).map_err(|e| format!("a root cannot be parsed: {e}"))?;
        if !root.validity().is_valid_at(asn1_time) {
            reasons.push(format!(
                "root {:?} has expired or is not yet valid at {asn1_time} (valid {} to {})",
                root.subject().to_string(),
                root.validity().not_before,
                root.validity().not_after
            ));
            continue;
        }
        let root_cert = CertificateDer::from(root_der.as_slice());
        let anchors = [webpki::anchor_from_trusted_cert(&root_cert)
            .map_err(|e| format!("a root cannot be a trust anchor: {e}"))?];
        let result = end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            KeyUsage::required_if_present(EKU_CODE_SIGNING),
            None,
            None,
        );
        match result {
            Ok(path) => {
                for intermediate in path.intermediate_certificates() {
                    check_ca_usage(&intermediate.der())?;
                }
                return Ok(());
            }
            Err(e) => reasons.push(format!(
                "chain to root {:?}: {}",
                root.subject().to_string(),
                describe(&e)
            )),
        }
    }
    Err(reasons.join("; "))
}

/// A readable reason for the chain failures one meets in practice.
fn describe(error: &webpki::Error) -> String {
    use webpki::Error as E;
    let reason = match error {
        E::CertExpired { .. } => "a certificate in the chain has expired",
        E::CertNotValidYet { .. } => "a certificate in the chain is not valid yet",
        E::UnknownIssuer => "no path from the signing certificate to this root",
        E::InvalidSignatureForPublicKey => "a certificate's signature does not verify",
        E::CaUsedAsEndEntity => "the signing certificate is a CA certificate",
        E::EndEntityUsedAsCa => "a certificate that issued another is not a CA",
        E::RequiredEkuNotFoundContext(_) => {
            "the signing certificate's extended key usage does not include codeSigning"
        }
        E::PathLenConstraintViolated => "the chain violates a CA's path length constraint",
        E::NameConstraintViolation => "the chain violates a CA's name constraints",
        other => return format!("{other:?}"),
    };
    format!("{reason} ({error:?})")
}

/// The leaf must be allowed to sign (as `model_signing` checks): key usage
/// `digitalSignature` or extended key usage `codeSigning`; and a key usage extension, when
/// present, must include `digitalSignature`.
fn check_leaf_usage(der: &[u8]) -> Result<(), String> {
    let cert = parse(der).map_err(|e| format!("the leaf certificate cannot be parsed: {e}"))?;
    let key_usage = cert
        .key_usage()
        .map_err(|e| format!("the leaf's key usage cannot be parsed: {e}"))?;
    let extended = cert
        .extended_key_usage()
        .map_err(|e| format!("the leaf's extended key usage cannot be parsed: {e}"))?;
    let digital_signature = key_usage.as_ref().map(|ku| ku.value.digital_signature());
    let code_signing = extended.as_ref().is_some_and(|eku| eku.value.code_signing);
    match digital_signature {
        Some(false) => Err("the leaf's key usage does not allow digitalSignature".into()),
        Some(true) => Ok(()),
        None if code_signing => Ok(()),
        None => Err(
            "the leaf allows neither key usage digitalSignature nor extended key usage codeSigning"
                .into(),
        ),
    }
}

/// An intermediate with a key usage extension must allow `keyCertSign`.
fn check_ca_usage(der: &[u8]) -> Result<(), String> {
    let cert = parse(der).map_err(|e| format!("an intermediate cannot be parsed: {e}"))?;
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(format!(
            "intermediate {:?} is not allowed to sign certificates (key usage lacks keyCertSign)",
            cert.subject().to_string()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("an intermediate's key usage cannot be parsed: {e}")),
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(e.to_string()),
    }
}
