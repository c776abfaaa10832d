//! Keys: PEM parsing, the key fingerprint `model_signing` uses as a hint, signing and checking
//! signatures over the DSSE PAE.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePublicKey as _};
use sha2::{Digest as _, Sha256};

use super::SigningError;

/// A private key that signs bundles: ECDSA P-256 (SHA-256), ECDSA P-384 (SHA-384), or Ed25519.
/// `model_signing` verifies the two ECDSA kinds; Ed25519 bundles verify only here.
#[derive(Clone)]
pub enum SigningKey {
    EcdsaP256(p256::ecdsa::SigningKey),
    EcdsaP384(p384::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl std::fmt::Debug for SigningKey {
    /// Shows the kind and the public fingerprint, never the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl SigningKey {
    /// Reads a PEM private key: PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, optionally
    /// after an `EC PARAMETERS` block as `openssl ecparam -genkey` writes). Encrypted keys are
    /// refused.
    pub fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let blocks = pem_blocks(pem).map_err(SigningError::BadKey)?;
        let mut keys = blocks.iter().filter(|b| b.label != "EC PARAMETERS");
        let (Some(block), None) = (keys.next(), keys.next()) else {
            return Err(SigningError::BadKey(
                "expected exactly one PEM private key".into(),
            ));
        };
        if block.encrypted {
            return Err(SigningError::BadKey(
                "encrypted private keys are not supported; decrypt it first".into(),
            ));
        }
        let der = &block.der;
        match block.label.as_str() {
            "PRIVATE KEY" => {
                if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_der(der) {
                    Ok(Self::EcdsaP256(key))
                } else if let Ok(key) = p384::ecdsa::SigningKey::from_pkcs8_der(der) {
                    Ok(Self::EcdsaP384(key))
                } else if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_der(der) {
                    Ok(Self::Ed25519(key))
                } else {
                    Err(SigningError::BadKey(
                        "not an EC P-256, EC P-384 or Ed25519 PKCS#8 private key".into(),
                    ))
                }
            }
            "EC PRIVATE KEY" => {
                if let Ok(key) = p256::SecretKey::from_sec1_der(der) {
                    Ok(Self::EcdsaP256(key.into()))
                } else if let Ok(key) = p384::SecretKey::from_sec1_der(der) {
                    Ok(Self::EcdsaP384(key.into()))
                } else {
                    Err(SigningError::BadKey(
                        "not an EC P-256 or P-384 SEC1 private key".into(),
                    ))
                }
            }
            "ENCRYPTED PRIVATE KEY" => Err(SigningError::BadKey(
                "encrypted private keys are not supported; decrypt it first".into(),
            )),
            other => Err(SigningError::BadKey(format!(
                "unsupported PEM block {other:?} (expected PRIVATE KEY or EC PRIVATE KEY)"
            ))),
        }
    }

    /// `ecdsa-p256-sha256`, `ecdsa-p384-sha384` or `ed25519`.
    pub fn algorithm(&self) -> &'static str {
        self.verifying_key().algorithm()
    }

    /// The public key as PEM SubjectPublicKeyInfo, in the exact form whose sha256 is the key
    /// hint (64-column base64, `\n` line ends).
    pub fn public_key_pem(&self) -> String {
        self.verifying_key().to_pem()
    }

    /// `sha256:<hex>` of [`Self::public_key_pem`]; see [`key_fingerprint`].
    pub fn fingerprint(&self) -> String {
        self.verifying_key().fingerprint()
    }

    pub(crate) fn verifying_key(&self) -> VerifyingKey {
        match self {
            Self::EcdsaP256(key) => VerifyingKey::P256(*key.verifying_key()),
            Self::EcdsaP384(key) => VerifyingKey::P384(*key.verifying_key()),
            Self::Ed25519(key) => VerifyingKey::Ed25519(key.verifying_key()),
        }
    }

    /// Signs `message`: ECDSA (deterministic, RFC 6979) DER-encoded, or a raw Ed25519 signature.
    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        match self {
            Self::EcdsaP256(key) => {
                let signature: p256::ecdsa::Signature = key.sign(message);
                signature.to_der().as_bytes().to_vec()
            }
            Self::EcdsaP384(key) => {
                let signature: p384::ecdsa::Signature = key.sign(message);
                signature.to_der().as_bytes().to_vec()
            }
            Self::Ed25519(key) => key.sign(message).to_bytes().to_vec(),
        }
    }
}

/// The fingerprint of a public key (PEM SubjectPublicKeyInfo): `sha256:` and the hex sha256 of
/// the key re-encoded as PEM with 64-column base64 and `\n` line ends. The hex part is exactly
/// the `verificationMaterial.publicKey.hint` that `model_signing` writes (it hashes the PEM text
/// that Python's `cryptography` produces, not the DER), so a fingerprint can be compared with
/// the hint of a bundle that has not been verified yet.
pub fn key_fingerprint(public_key_pem: &str) -> Result<String, SigningError> {
    Ok(VerifyingKey::from_pem(public_key_pem)?.fingerprint())
}

/// A public key that checks signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VerifyingKey {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl VerifyingKey {
    pub(crate) fn from_pem(pem: &str) -> Result<Self, SigningError> {
        let blocks = pem_blocks(pem).map_err(SigningError::BadKey)?;
        match &blocks[..] {
            [block] if block.label == "PUBLIC KEY" => Self::from_spki_der(&block.der),
            _ => Err(SigningError::BadKey(
                "expected exactly one PEM \"PUBLIC KEY\" block".into(),
            )),
        }
    }

    pub(crate) fn from_spki_der(der: &[u8]) -> Result<Self, SigningError> {
        if let Ok(key) = p256::PublicKey::from_public_key_der(der) {
            Ok(Self::P256(key.into()))
        } else if let Ok(key) = p384::PublicKey::from_public_key_der(der) {
            Ok(Self::P384(key.into()))
        } else if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_der(der) {
            Ok(Self::Ed25519(key))
        } else {
            Err(SigningError::BadKey(
                "not an EC P-256, EC P-384 or Ed25519 public key".into(),
            ))
        }
    }

    pub(crate) fn algorithm(&self) -> &'static str {
        match self {
            Self::P256(_) => "ecdsa-p256-sha256",
            Self::P384(_) => "ecdsa-p384-sha384",
            Self::Ed25519(_) => "ed25519",
        }
    }

    pub(crate) fn to_spki_der(&self) -> Vec<u8> {
        let document = match self {
            Self::P256(key) => key.to_public_key_der(),
            Self::P384(key) => key.to_public_key_der(),
            Self::Ed25519(key) => key.to_public_key_der(),
        };
        // Encoding a valid in-memory key cannot fail.
        document
            .expect("a valid public key encodes as SPKI")
            .into_vec()
    }

    pub(crate) fn to_pem(&self) -> String {
        pem_encode("PUBLIC KEY", &self.to_spki_der())
    }

    /// The bare hex hint (see [`key_fingerprint`]).
    pub(crate) fn hint(&self) -> String {
        hex::encode(Sha256::digest(self.to_pem().as_bytes()))
    }

    pub(crate) fn fingerprint(&self) -> String {
        format!("sha256:{}", self.hint())
    }

    /// Checks `signature` over `message`: DER ECDSA with the curve's hash, or raw Ed25519
    /// (strict verification).
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::P256(key) => p256::ecdsa::Signature::from_der(signature)
                .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            Self::P384(key) => p384::ecdsa::Signature::from_der(signature)
                .is_ok_and(|sig| key.verify(message, &sig).is_ok()),
            Self::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify_strict(message, &sig).is_ok()),
        }
    }
}

/// One PEM block.
pub(crate) struct PemBlock {
    pub label: String,
    pub der: Vec<u8>,
    /// Had RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`): a legacy encrypted key.
    pub encrypted: bool,
}

/// Splits PEM text into its blocks; text outside blocks is ignored (as OpenSSL does).
pub(crate) fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String, bool)> = None;
    for line in text.lines().map(str::trim) {
        match &mut current {
            None => {
                if let Some(label) = line
                    .strip_prefix("-----BEGIN ")
                    .and_then(|rest| rest.strip_suffix("-----"))
                {
                    current = Some((label.to_string(), String::new(), false));
                }
            }
            Some((label, body, encrypted)) => {
                if let Some(end) = line
                    .strip_prefix("-----END ")
                    .and_then(|rest| rest.strip_suffix("-----"))
                {
                    if end != label {
                        return Err(format!("PEM block {label:?} ends as {end:?}"));
                    }
                    let der = STANDARD
                        .decode(body.as_bytes())
                        .map_err(|e| format!("PEM block {label:?} is not valid base64: {e}"))?;
                    blocks.push(PemBlock {
                        label: std::mem::take(label),
                        der,
                        encrypted: *encrypted,
                    });
                    current = None;
                } else if line.contains(':') {
                    *encrypted |= line.contains("ENCRYPTED");
                } else {
                    body.push_str(line);
                }
            }
        }
    }
    if let Some((label, _, _)) = current {
        return Err(format!("PEM block {label:?} has no END line"));
    }
    if blocks.is_empty() {
        return Err("no PEM block found".into());
    }
    Ok(blocks)
}

/// PEM with 64-column base64 and `\n` line ends, the form OpenSSL and `cryptography` write.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        // base64 output is ASCII.
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};

    /// A key made with `openssl ecparam -name prime256v1 -genkey` / `openssl ec -pubout`; its
    /// hint, as `model_signing sign key` 1.1.1 wrote it into the bundle.
    const OPENSSL_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE9i5w/dmvlb+OZpjiilHwDqkBlJjG
H1g03L4BirHSMZErNbGL5G2PTkIeIgUOlnExARdX9nAia7Cez3SKm/bEWw==
-----END PUBLIC KEY-----
";
    const MODEL_SIGNING_HINT: &str =
        "97d1fded3813247eee886ad250ce3ca152111e0e7fd561dea1354a9aa92fc5fb";

    #[test]
    fn fingerprint_is_the_model_signing_hint() {
        assert_eq!(
            key_fingerprint(OPENSSL_PUBLIC_KEY).unwrap(),
            format!("sha256:{MODEL_SIGNING_HINT}")
        );
        let key = VerifyingKey::from_pem(OPENSSL_PUBLIC_KEY).unwrap();
        assert_eq!(key.hint(), MODEL_SIGNING_HINT);
        assert_eq!(key.to_pem(), OPENSSL_PUBLIC_KEY);
    }

    #[test]
    fn fingerprint_does_not_depend_on_how_the_pem_is_laid_out() {
        let body: String = OPENSSL_PUBLIC_KEY
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let reflowed = format!(
            "comment line\r\n-----BEGIN PUBLIC KEY-----\r\n{}\r\n{}\r\n-----END PUBLIC KEY-----",
            &body[..30],
            &body[30..]
        );
        assert_eq!(
            key_fingerprint(&reflowed).unwrap(),
            format!("sha256:{MODEL_SIGNING_HINT}")
        );
    }

    #[test]
    fn private_keys_load_from_pkcs8_and_sec1() {
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let pkcs8 = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
        // `openssl ecparam -genkey` without -noout puts the curve first.
        let with_params = format!(
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
            sec1.as_str()
        );
        let from_pkcs8 = SigningKey::from_pem(&pkcs8).unwrap();
        let from_sec1 = SigningKey::from_pem(&sec1).unwrap();
        let from_params = SigningKey::from_pem(&with_params).unwrap();
        assert_eq!(from_pkcs8.algorithm(), "ecdsa-p256-sha256");
        assert_eq!(from_pkcs8.fingerprint(), from_sec1.fingerprint());
        assert_eq!(from_pkcs8.fingerprint(), from_params.fingerprint());

        let p384 = p384::SecretKey::from_slice(&[9u8; 48]).unwrap();
        let key = SigningKey::from_pem(&p384.to_sec1_pem(LineEnding::LF).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "ecdsa-p384-sha384");
        let key = SigningKey::from_pem(&p384.to_pkcs8_pem(LineEnding::LF).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "ecdsa-p384-sha384");

        let ed = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let key = SigningKey::from_pem(&ed.to_pkcs8_pem(LineEnding::LF).unwrap()).unwrap();
        assert_eq!(key.algorithm(), "ed25519");
        assert!(!format!("{key:?}").contains("030303"));
    }

    #[test]
    fn unusable_private_keys_are_refused() {
        for pem in [
            "",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END EC PRIVATE KEY-----\n",
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n",
            OPENSSL_PUBLIC_KEY,
        ] {
            assert!(
                matches!(SigningKey::from_pem(pem), Err(SigningError::BadKey(_))),
                "{pem:?} was accepted"
            );
        }
    }

    #[test]
    fn each_key_kind_signs_and_verifies() {
        let keys = [
            SigningKey::EcdsaP256(p256::ecdsa::SigningKey::from_slice(&[1u8; 32]).unwrap()),
            SigningKey::EcdsaP384(p384::ecdsa::SigningKey::from_slice(&[2u8; 48]).unwrap()),
            SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[3u8; 32])),
        ];
        for key in &keys {
            let signature = key.sign(b"message");
            let public = VerifyingKey::from_pem(&key.public_key_pem()).unwrap();
            assert!(public.verify(b"message", &signature), "{key:?}");
            assert!(!public.verify(b"messagf", &signature), "{key:?}");
            for other in &keys {
                if other.fingerprint() != key.fingerprint() {
                    assert!(!other.verifying_key().verify(b"message", &signature));
                }
            }
        }
    }
}
