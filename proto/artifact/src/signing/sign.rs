//! Making bundles that `model_signing verify key` / `verify certificate` accept.

use std::path::Path;

use super::bundle::{self, Material};
use super::dsse::{IN_TOTO_PAYLOAD_TYPE, pae};
use super::keys::{SigningKey, VerifyingKey, pem_blocks};
use super::model_path::{GIT_IGNORED_PATHS, hash_model_path};
use super::{ModelFile, SigningError, certs, statement};

/// Signs `files` (names relative to the model root, `"."` for a single-file model) as the
/// model `model_name`, producing a key-based bundle with the key's hint. The statement records
/// the default serialization (`files`, sha256, no symlinks, the git paths ignored), as
/// `model_signing sign key` does.
pub fn sign_files(
    files: &[ModelFile<'_>],
    model_name: &str,
    key: &SigningKey,
) -> Result<Vec<u8>, SigningError> {
    let material = Material::Key {
        hint: Some(key.verifying_key().hint()),
    };
    sign_with_material(files, model_name, key, &material)
}

/// Signs like [`sign_files`] but as a certificate holder: `certificate_chain_pem` holds the
/// signing (leaf) certificate first, then any intermediates and, optionally, the root — as
/// `model_signing sign certificate --signing_certificate … --certificate_chain …` puts them in
/// the bundle. The leaf's public key must be `key`'s.
pub fn sign_files_with_certificate(
    files: &[ModelFile<'_>],
    model_name: &str,
    key: &SigningKey,
    certificate_chain_pem: &str,
) -> Result<Vec<u8>, SigningError> {
    let chain: Vec<Vec<u8>> = pem_blocks(certificate_chain_pem)
        .map_err(SigningError::InvalidInput)?
        .into_iter()
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| block.der)
        .collect();
    let Some(leaf) = chain.first() else {
        return Err(SigningError::InvalidInput(
            "the certificate chain has no CERTIFICATE block".into(),
        ));
    };
    let leaf_key: VerifyingKey = certs::leaf_key(leaf)
        .map_err(|e| SigningError::InvalidInput(format!("the signing certificate: {e}")))?;
    if leaf_key != key.verifying_key() {
        return Err(SigningError::BadKey(
            "the signing certificate is not for this private key".into(),
        ));
    }
    sign_with_material(files, model_name, key, &Material::Certificates(chain))
}

/// Hashes `path` with [`hash_model_path`] and signs it with [`sign_files`], named like
/// `model_signing` names it: the last component of the path.
pub fn sign_model_path(path: &Path, key: &SigningKey) -> Result<Vec<u8>, SigningError> {
    let files = hash_model_path(path)?;
    let model_name = model_name(path);
    sign_files(&ModelFile::list(&files), &model_name, key)
}

fn sign_with_material(
    files: &[ModelFile<'_>],
    model_name: &str,
    key: &SigningKey,
    material: &Material,
) -> Result<Vec<u8>, SigningError> {
    let payload = statement::build(model_name, files, &GIT_IGNORED_PATHS)?;
    let signature = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &payload));
    Ok(bundle::encode(
        material,
        IN_TOTO_PAYLOAD_TYPE,
        &payload,
        &signature,
    ))
}

/// The last path component; for `.` and the like, the name of the directory it resolves to.
fn model_name(path: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    name(path)
        .or_else(|| path.canonicalize().ok().and_then(|p| name(&p)))
        .unwrap_or_default()
}
