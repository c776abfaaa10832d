//! Verifying bundles against configured trust anchors, offline.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use super::bundle::{self, Material};
use super::dsse::{IN_TOTO_PAYLOAD_TYPE, pae};
use super::keys::VerifyingKey;
use super::model_path::hash_model_path_ignoring;
use super::statement::{self, ParsedStatement, model_path_order};
use super::{BundleSummary, ModelFile, SignerKind, SigningError, TrustAnchor, Verified, certs};

impl TrustAnchor {
    /// Checks that the anchor can be used (the key or root certificates parse), so that a
    /// trust policy can be refused when it is loaded rather than at the first verification.
    pub fn validate(&self) -> Result<(), SigningError> {
        match self {
            Self::PublicKey { pem } => VerifyingKey::from_pem(pem).map(drop),
            Self::CertificateRoot { pem, .. } => certs::roots_from_pem(pem)
                .map(drop)
                .map_err(SigningError::BadKey),
        }
    }
}

/// Verifies a bundle for a model given as its list of files, at the current time. See
/// [`verify_bundle_at`].
pub fn verify_bundle(
    bundle_json: &[u8],
    files: &[ModelFile<'_>],
    anchors: &[TrustAnchor],
) -> Result<Verified, SigningError> {
    verify_bundle_at(bundle_json, files, anchors, SystemTime::now())
}

/// Verifies a bundle:
///
/// 1. parses it (media type, a DSSE envelope with payload type `application/vnd.in-toto+json`,
///    at least one signature);
/// 2. checks the signature over the DSSE PAE against each anchor of the bundle's kind in turn —
///    public keys for key bundles (skipping keys whose fingerprint differs from the bundle's
///    hint), certificate roots for certificate bundles (the chain must be valid at `at`, the
///    leaf allowed to sign, its identity the anchor's if one is set) — and the first that
///    verifies wins;
/// 3. only then reads the statement: statement and predicate types, sha256 file serialization,
///    and the subject digest over the listed resources;
/// 4. checks the resources are exactly `files`: same names, same digests, none missing, none
///    extra. A single-file model is signed as one resource named `"."` (the file's own name is
///    not part of the signature, so a renamed file still verifies, as with `model_signing`):
///    such a statement matches any single file passed, whatever its name.
///
/// Certificate validity is checked at `at` (normally now). `model_signing`, having no trusted
/// signing time, checks the chain at the leaf's `notBefore` instead, which accepts expired
/// certificates; here an expired leaf, intermediate or root is refused.
///
/// A trust anchor that cannot be parsed is an error ([`SigningError::BadTrustAnchor`]) as soon
/// as it is reached; check anchors up front with [`TrustAnchor::validate`].
pub fn verify_bundle_at(
    bundle_json: &[u8],
    files: &[ModelFile<'_>],
    anchors: &[TrustAnchor],
    at: SystemTime,
) -> Result<Verified, SigningError> {
    let authenticated = authenticate(bundle_json, anchors, at)?;
    check_files(&authenticated.statement, files)?;
    Ok(authenticated.into_verified())
}

/// Verifies a model on disk (a file or a directory), at the current time. See
/// [`verify_model_path_at`].
pub fn verify_model_path(
    bundle_json: &[u8],
    model_path: &Path,
    anchors: &[TrustAnchor],
) -> Result<Verified, SigningError> {
    verify_model_path_at(bundle_json, model_path, anchors, SystemTime::now())
}

/// Like `model_signing verify`: checks the signature as [`verify_bundle_at`] does, then hashes
/// `model_path` with [`hash_model_path_ignoring`], leaving out the git paths and the
/// `ignore_paths` the (now verified) statement records, and compares.
pub fn verify_model_path_at(
    bundle_json: &[u8],
    model_path: &Path,
    anchors: &[TrustAnchor],
    at: SystemTime,
) -> Result<Verified, SigningError> {
    let authenticated = authenticate(bundle_json, anchors, at)?;
    let ignored: Vec<&str> = authenticated
        .statement
        .ignore_paths
        .iter()
        .map(String::as_str)
        .collect();
    let files = hash_model_path_ignoring(model_path, &ignored)?;
    check_files(&authenticated.statement, &ModelFile::list(&files))?;
    Ok(authenticated.into_verified())
}

/// Reads a bundle without trusting it: who it claims signed it and which files it lists.
/// The structure is checked (media type, payload type, statement, predicate, subject digest)
/// but no signature is.
pub fn inspect_bundle(bundle_json: &[u8]) -> Result<BundleSummary, SigningError> {
    let parsed = bundle::parse(bundle_json)?;
    if parsed.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(SigningError::WrongPayloadType(parsed.payload_type));
    }
    let statement = statement::parse(&parsed.payload)?;
    let (signer, signer_kind, certificate_subject, certificate_issuer) = match &parsed.material {
        Material::Key { hint } => (
            hint.as_ref()
                .map(|hint| format!("sha256:{}", hint.to_ascii_lowercase())),
            SignerKind::Key,
            None,
            None,
        ),
        Material::Certificates(chain) => {
            let leaf = certs::describe_leaf(&chain[0])?;
            (
                Some(leaf.identity),
                SignerKind::Certificate,
                Some(leaf.subject),
                Some(leaf.issuer),
            )
        }
    };
    Ok(BundleSummary {
        signer,
        signer_kind,
        certificate_subject,
        certificate_issuer,
        model_name: statement.model_name,
        subject_digest: statement.subject_digest,
        files: statement.files,
        ignore_paths: statement.ignore_paths,
    })
}

/// A bundle whose signature verified, with its statement parsed.
struct Authenticated {
    signer: String,
    signer_kind: SignerKind,
    anchor_index: usize,
    statement: ParsedStatement,
}

impl Authenticated {
    fn into_verified(self) -> Verified {
        Verified {
            signer: self.signer,
            signer_kind: self.signer_kind,
            anchor_index: self.anchor_index,
            model_name: self.statement.model_name,
            files: self.statement.files,
        }
    }
}

fn authenticate(
    bundle_json: &[u8],
    anchors: &[TrustAnchor],
    at: SystemTime,
) -> Result<Authenticated, SigningError> {
    let parsed = bundle::parse(bundle_json)?;
    if parsed.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(SigningError::WrongPayloadType(parsed.payload_type));
    }
    if parsed.signatures.is_empty() {
        return Err(SigningError::NoSignature);
    }
    let message = pae(&parsed.payload_type, &parsed.payload);
    // Any of the envelope's signatures will do (model_signing writes exactly one).
    let signed_by = |key: &VerifyingKey| {
        parsed
            .signatures
            .iter()
            .any(|signature| key.verify(&message, signature))
    };

    let (signer, signer_kind, anchor_index) = match &parsed.material {
        Material::Key { hint } => {
            let mut verified = None;
            for (index, anchor) in anchors.iter().enumerate() {
                let TrustAnchor::PublicKey { pem } = anchor else {
                    continue;
                };
                let key = VerifyingKey::from_pem(pem).map_err(|e| bad_anchor(index, e))?;
                // The hint is not trusted: it only spares trying keys that cannot match.
                if hint
                    .as_deref()
                    .is_some_and(|hint| !hint.eq_ignore_ascii_case(&key.hint()))
                {
                    continue;
                }
                if signed_by(&key) {
                    verified = Some((key.fingerprint(), SignerKind::Key, index));
                    break;
                }
            }
            verified.ok_or(SigningError::BadSignature)?
        }
        Material::Certificates(chain) => {
            let leaf = certs::describe_leaf(&chain[0])?;
            let key = certs::leaf_key(&chain[0])?;
            // When no root verifies, report the refusal that got furthest.
            let mut refusal = Refusal::default();
            let mut verified = None;
            for (index, anchor) in anchors.iter().enumerate() {
                let TrustAnchor::CertificateRoot { pem, identity } = anchor else {
                    continue;
                };
                let roots = certs::roots_from_pem(pem)
                    .map_err(|reason| SigningError::BadTrustAnchor { index, reason })?;
                if let Err(reason) = certs::verify_chain(chain, &roots, at) {
                    refusal.note(1, || SigningError::UntrustedCertificate(reason));
                    continue;
                }
                if let Some(expected) = identity.as_ref().filter(|id| !leaf.names.contains(id)) {
                    refusal.note(2, || SigningError::CertificateIdentityMismatch {
                        expected: expected.clone(),
                        found: if leaf.names.is_empty() {
                            format!("{} (no email, URI or DNS name)", leaf.subject)
                        } else {
                            leaf.names.join(", ")
                        },
                    });
                    continue;
                }
                if !signed_by(&key) {
                    refusal.note(3, || SigningError::BadSignature);
                    continue;
                }
                verified = Some((leaf.identity.clone(), SignerKind::Certificate, index));
                break;
            }
            match verified {
                Some(verified) => verified,
                None => {
                    return Err(refusal.error.unwrap_or_else(|| {
                        SigningError::UntrustedCertificate(
                            "no certificate root is configured".into(),
                        )
                    }));
                }
            }
        }
    };

    let statement = statement::parse(&parsed.payload)?;
    Ok(Authenticated {
        signer,
        signer_kind,
        anchor_index,
        statement,
    })
}

/// The most advanced refusal seen so far (a higher rank got further through the checks).
#[derive(Default)]
struct Refusal {
    rank: u8,
    error: Option<SigningError>,
}

impl Refusal {
    fn note(&mut self, rank: u8, error: impl FnOnce() -> SigningError) {
        if self.error.is_none() || rank > self.rank {
            self.rank = rank;
            self.error = Some(error());
        }
    }
}

fn bad_anchor(index: usize, error: SigningError) -> SigningError {
    let reason = match error {
        SigningError::BadKey(reason) => reason,
        other => other.to_string(),
    };
    SigningError::BadTrustAnchor { index, reason }
}

/// The signed resources must be exactly `files`. One exception, as in `model_signing`: a
/// single-file model is signed as one resource named `"."`, whatever the file is called, so
/// such a statement matches any one file passed, by digest alone.
fn check_files(statement: &ParsedStatement, files: &[ModelFile<'_>]) -> Result<(), SigningError> {
    if let ([(name, signed)], [file]) = (&statement.files[..], files)
        && name == "."
    {
        if file.sha256 != signed {
            return Err(SigningError::DigestMismatch {
                name: file.name.to_string(),
                expected: signed.clone(),
                found: file.sha256.clone(),
            });
        }
        return Ok(());
    }
    let mut local = HashMap::with_capacity(files.len());
    for file in files {
        if local.insert(file.name, file.sha256).is_some() {
            return Err(SigningError::InvalidInput(format!(
                "file {:?} is listed twice",
                file.name
            )));
        }
    }
    for (name, signed) in &statement.files {
        match local.remove(name.as_str()) {
            None => return Err(SigningError::FileMissing(name.clone())),
            Some(found) if found != signed => {
                return Err(SigningError::DigestMismatch {
                    name: name.clone(),
                    expected: signed.clone(),
                    found: found.clone(),
                });
            }
            Some(_) => {}
        }
    }
    match local.into_keys().min_by(|a, b| model_path_order(a, b)) {
        Some(extra) => Err(SigningError::UnexpectedFile(extra.to_string())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Sha256Hex;
    use crate::signing::keys::SigningKey;
    use crate::signing::{sign_files, statement::subject_digest};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    fn key(seed: u8) -> SigningKey {
        SigningKey::EcdsaP256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    fn anchor(key: &SigningKey) -> TrustAnchor {
        TrustAnchor::PublicKey {
            pem: key.public_key_pem(),
        }
    }

    fn digest(byte: char) -> Sha256Hex {
        Sha256Hex::parse(&byte.to_string().repeat(64)).unwrap()
    }

    fn model() -> Vec<(String, Sha256Hex)> {
        vec![
            ("weights.gguf".to_string(), digest('a')),
            ("config/tokenizer.json".to_string(), digest('b')),
        ]
    }

    /// Re-signs an edited statement with `key`, keeping the bundle otherwise as is.
    fn resign(statement: &serde_json::Value, payload_type: &str, key: &SigningKey) -> Vec<u8> {
        let payload = serde_json::to_vec(statement).unwrap();
        let signature = key.sign(&pae(payload_type, &payload));
        bundle::encode(
            &Material::Key {
                hint: Some(key.verifying_key().hint()),
            },
            payload_type,
            &payload,
            &signature,
        )
    }

    fn statement_of(bundle_json: &[u8]) -> serde_json::Value {
        let parsed = bundle::parse(bundle_json).unwrap();
        serde_json::from_slice(&parsed.payload).unwrap()
    }

    #[test]
    fn a_bundle_signed_here_verifies_and_reports_its_signer() {
        let files = model();
        let signer = key(1);
        let json = sign_files(&ModelFile::list(&files), "m", &signer).unwrap();
        let anchors = [anchor(&key(2)), anchor(&signer)];
        let verified = verify_bundle(&json, &ModelFile::list(&files), &anchors).unwrap();
        assert_eq!(verified.anchor_index, 1);
        assert_eq!(verified.signer, signer.fingerprint());
        assert_eq!(verified.signer_kind, SignerKind::Key);
        assert_eq!(verified.model_name, "m");
        // Sorted component by component.
        assert_eq!(verified.files[0].0, "config/tokenizer.json");

        let summary = inspect_bundle(&json).unwrap();
        assert_eq!(
            summary.signer.as_deref(),
            Some(signer.fingerprint().as_str())
        );
        assert_eq!(summary.files, verified.files);
        assert_eq!(
            summary.subject_digest,
            subject_digest(verified.files.iter().map(|(_, d)| d))
        );
        assert_eq!(summary.ignore_paths.len(), 4);
    }

    #[test]
    fn ed25519_and_p384_bundles_verify_here() {
        let files = model();
        for signer in [
            SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[5u8; 32])),
            SigningKey::EcdsaP384(p384::ecdsa::SigningKey::from_slice(&[6u8; 48]).unwrap()),
        ] {
            let json = sign_files(&ModelFile::list(&files), "m", &signer).unwrap();
            let verified =
                verify_bundle(&json, &ModelFile::list(&files), &[anchor(&signer)]).unwrap();
            assert_eq!(verified.signer, signer.fingerprint());
            assert!(matches!(
                verify_bundle(&json, &ModelFile::list(&files), &[anchor(&key(1))]),
                Err(SigningError::BadSignature)
            ));
        }
    }

    #[test]
    fn a_bundle_without_hint_is_checked_against_every_key() {
        let files = model();
        let signer = key(1);
        let json = sign_files(&ModelFile::list(&files), "m", &signer).unwrap();
        let hint = signer.verifying_key().hint();
        let without = String::from_utf8(json)
            .unwrap()
            .replace(&format!("{{\"hint\":\"{hint}\"}}"), "{}");
        let anchors = [anchor(&key(2)), anchor(&signer)];
        let verified = verify_bundle(without.as_bytes(), &ModelFile::list(&files), &anchors);
        assert_eq!(verified.unwrap().anchor_index, 1);
        assert!(matches!(
            verify_bundle(without.as_bytes(), &ModelFile::list(&files), &anchors[..1]),
            Err(SigningError::BadSignature)
        ));
        assert_eq!(inspect_bundle(without.as_bytes()).unwrap().signer, None);
    }

    #[test]
    fn a_lying_hint_does_not_help() {
        // The hint names the trusted key but another key signed: still refused.
        let files = model();
        let trusted = key(1);
        let json = sign_files(&ModelFile::list(&files), "m", &key(2)).unwrap();
        let lying = String::from_utf8(json).unwrap().replace(
            &key(2).verifying_key().hint(),
            &trusted.verifying_key().hint(),
        );
        assert!(matches!(
            verify_bundle(
                lying.as_bytes(),
                &ModelFile::list(&files),
                &[anchor(&trusted)]
            ),
            Err(SigningError::BadSignature)
        ));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let files = model();
        let signer = key(1);
        let anchors = [anchor(&signer)];
        let json = sign_files(&ModelFile::list(&files), "m", &signer).unwrap();
        let statement = statement_of(&json);
        let verify = |json: &[u8]| verify_bundle(json, &ModelFile::list(&files), &anchors);

        let mut wrong = statement.clone();
        wrong["predicateType"] = "https://model_signing/Digests/v0.1".into();
        assert!(matches!(
            verify(&resign(&wrong, IN_TOTO_PAYLOAD_TYPE, &signer)),
            Err(SigningError::WrongPredicate(_))
        ));
        let mut wrong = statement.clone();
        wrong["_type"] = "https://in-toto.io/Statement/v0.1".into();
        assert!(matches!(
            verify(&resign(&wrong, IN_TOTO_PAYLOAD_TYPE, &signer)),
            Err(SigningError::WrongStatementType(_))
        ));
        assert!(matches!(
            verify(&resign(&statement, "application/json", &signer)),
            Err(SigningError::WrongPayloadType(t)) if t == "application/json"
        ));
        let mut wrong = statement.clone();
        wrong["subject"][0]["digest"]["sha256"] = digest('c').to_string().into();
        assert!(matches!(
            verify(&resign(&wrong, IN_TOTO_PAYLOAD_TYPE, &signer)),
            Err(SigningError::SubjectDigestMismatch { .. })
        ));

        let edit_bundle = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            edit(&mut value);
            serde_json::to_vec(&value).unwrap()
        };
        let no_signature =
            edit_bundle(&|v| v["dsseEnvelope"]["signatures"] = serde_json::json!([]));
        assert!(matches!(
            verify(&no_signature),
            Err(SigningError::NoSignature)
        ));
        let garbage = edit_bundle(&|v| {
            v["dsseEnvelope"]["signatures"][0]["sig"] = STANDARD.encode([0u8; 70]).into()
        });
        assert!(matches!(verify(&garbage), Err(SigningError::BadSignature)));
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(matches!(
            verify(&text.replace("bundle.v0.3", "bundle.v0.2").into_bytes()),
            Err(SigningError::UnsupportedMediaType(_))
        ));
        assert!(matches!(
            verify(b"{}"),
            Err(SigningError::UnsupportedMediaType(m)) if m.is_empty()
        ));
        assert!(matches!(
            verify(b"not json"),
            Err(SigningError::MalformedBundle(_))
        ));
        // A key bundle with only certificate roots configured.
        let roots = [TrustAnchor::CertificateRoot {
            pem: String::new(),
            identity: None,
        }];
        assert!(matches!(
            verify_bundle(&json, &ModelFile::list(&files), &roots),
            Err(SigningError::BadSignature)
        ));
        // A broken key anchor is reported as such.
        let broken = [TrustAnchor::PublicKey {
            pem: "nonsense".into(),
        }];
        assert!(matches!(
            verify_bundle(&json, &ModelFile::list(&files), &broken),
            Err(SigningError::BadTrustAnchor { index: 0, .. })
        ));
        assert!(broken[0].validate().is_err());
        assert!(anchors[0].validate().is_ok());
    }

    #[test]
    fn a_single_file_model_matches_whatever_the_file_is_called() {
        let signer = key(1);
        let anchors = [anchor(&signer)];
        let d = digest('a');
        let signed = [ModelFile {
            name: ".",
            sha256: &d,
        }];
        let json = sign_files(&signed, "model.gguf", &signer).unwrap();
        let renamed = [ModelFile {
            name: "renamed.gguf",
            sha256: &d,
        }];
        let verified = verify_bundle(&json, &renamed, &anchors).unwrap();
        assert_eq!(verified.files, vec![(".".to_string(), d.clone())]);
        let other = digest('b');
        assert!(matches!(
            verify_bundle(&json, &[ModelFile { name: "renamed.gguf", sha256: &other }], &anchors),
            Err(SigningError::DigestMismatch { name, .. }) if name == "renamed.gguf"
        ));
        // A named resource is not a single-file model: names must match.
        let json = sign_files(&renamed, "model.gguf", &signer).unwrap();
        assert!(matches!(
            verify_bundle(&json, &signed, &anchors),
            Err(SigningError::FileMissing(name)) if name == "renamed.gguf"
        ));
    }

    #[test]
    fn files_must_match_exactly() {
        let files = model();
        let signer = key(1);
        let anchors = [anchor(&signer)];
        let json = sign_files(&ModelFile::list(&files), "m", &signer).unwrap();

        let mut changed = files.clone();
        changed[0].1 = digest('f');
        match verify_bundle(&json, &ModelFile::list(&changed), &anchors) {
            Err(SigningError::DigestMismatch {
                name,
                expected,
                found,
            }) => {
                assert_eq!(name, "weights.gguf");
                assert_eq!(expected, digest('a'));
                assert_eq!(found, digest('f'));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            verify_bundle(&json, &ModelFile::list(&files[..1]), &anchors),
            Err(SigningError::FileMissing(name)) if name == "config/tokenizer.json"
        ));
        let mut extra = files.clone();
        extra.push(("README.md".into(), digest('d')));
        assert!(matches!(
            verify_bundle(&json, &ModelFile::list(&extra), &anchors),
            Err(SigningError::UnexpectedFile(name)) if name == "README.md"
        ));
        let mut twice = files.clone();
        twice.push(files[0].clone());
        assert!(matches!(
            verify_bundle(&json, &ModelFile::list(&twice), &anchors),
            Err(SigningError::InvalidInput(_))
        ));
    }
}
