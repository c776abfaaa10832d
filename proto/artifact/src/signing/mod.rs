//! OpenSSF model signing v1.0: sign and verify, offline.
//!
//! A signature is a Sigstore bundle (JSON, media type
//! `application/vnd.dev.sigstore.bundle.v0.3+json`) whose DSSE envelope carries an in-toto
//! Statement v1 with predicate type `https://model_signing/signature/v1.0`. The format and every
//! detail below follow the reference implementation, the `model_signing` Python package (1.1.x),
//! so that bundles it makes verify here and bundles made here verify there:
//!
//! - The predicate lists every file of the model as a resource (`name`, `algorithm: "sha256"`,
//!   `digest` in hex) plus the serialization parameters (`method: "files"`, `hash_type`,
//!   `allow_symlinks`, `ignore_paths`). Names are POSIX paths relative to the model directory;
//!   a single-file model has exactly one resource, named `"."`.
//! - Resources are sorted the way Python sorts `PurePosixPath`s: component by component, so
//!   `a/b` sorts before `a-b` (see [`model_path_order`]).
//! - The statement has one subject: the model name (last component of the model path) and a
//!   sha256 over the concatenated *raw* 32-byte resource digests, in the listed order.
//! - The signature is over DSSE `PAE(payloadType, payload)`: ECDSA with the hash that matches the
//!   curve (P-256/SHA-256, P-384/SHA-384), DER-encoded; Ed25519 is also accepted here, although
//!   `model_signing` itself only handles EC keys.
//! - Key-based bundles carry `verificationMaterial.publicKey.hint`: the hex sha256 of the public
//!   key's PEM text (SubjectPublicKeyInfo, 64-column base64, `\n` line ends) — see
//!   [`key_fingerprint`].
//! - Certificate-based bundles carry `verificationMaterial.x509CertificateChain` (leaf first,
//!   then whatever chain the signer supplied); a single `certificate` is accepted too. The chain
//!   must lead to a configured private root. There is no transparency log, no Fulcio and no
//!   network: everything is checked against the [`TrustAnchor`]s the caller passes.
//!
//! Where this module is stricter than `model_signing` (see [`verify_bundle_at`]): the
//! certificate chain is validated at the verification time rather than at the leaf's
//! `notBefore`, a leaf with a key-usage extension must allow `digitalSignature`, and the
//! pre-1.0 formats (predicate `https://model_signing/Digests/v0.1`, the buggy v0.2 PAE) and
//! shard serialization are refused.

mod bundle;
mod certs;
mod dsse;
mod keys;
mod model_path;
mod sign;
mod statement;
mod verify;

use std::path::PathBuf;

use crate::digest::Sha256Hex;

pub use bundle::BUNDLE_MEDIA_TYPE;
pub use dsse::{IN_TOTO_PAYLOAD_TYPE, pae};
pub use keys::{SigningKey, key_fingerprint};
pub use model_path::{GIT_IGNORED_PATHS, hash_model_path, hash_model_path_ignoring};
pub use sign::{sign_files, sign_files_with_certificate, sign_model_path};
pub use statement::{PREDICATE_TYPE, STATEMENT_TYPE, model_path_order, subject_digest};
pub use verify::{
    inspect_bundle, verify_bundle, verify_bundle_at, verify_model_path, verify_model_path_at,
};

/// One file of a model, as signed: its name relative to the model root (POSIX separators;
/// `"."` for a single-file model) and its sha256.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelFile<'a> {
    pub name: &'a str,
    pub sha256: &'a Sha256Hex,
}

impl<'a> ModelFile<'a> {
    /// Borrows a list as returned by [`hash_model_path`].
    pub fn list(files: &'a [(String, Sha256Hex)]) -> Vec<ModelFile<'a>> {
        files
            .iter()
            .map(|(name, sha256)| ModelFile { name, sha256 })
            .collect()
    }
}

/// What a signature may be trusted by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustAnchor {
    /// A public key (PEM SubjectPublicKeyInfo: EC P-256, P-384 or Ed25519). Verifies key-based
    /// bundles only.
    PublicKey { pem: String },
    /// A private root CA (PEM; several `CERTIFICATE` blocks are each a root). Verifies
    /// certificate-based bundles whose chain leads to it.
    CertificateRoot {
        pem: String,
        /// If set, the leaf certificate must carry exactly this value as one of its subject
        /// alternative names (email, URI or DNS name).
        identity: Option<String>,
    },
}

/// How a bundle says it was signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignerKind {
    /// `verificationMaterial.publicKey`: a bare key, identified by its fingerprint.
    Key,
    /// `verificationMaterial.x509CertificateChain` or `.certificate`.
    Certificate,
}

/// A bundle that verified, and what it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// For a key: its fingerprint, `sha256:<hex>` (see [`key_fingerprint`]). For a certificate:
    /// the leaf's identity — its first email, then URI, then DNS subject alternative name, or
    /// its subject DN if it has none.
    pub signer: String,
    pub signer_kind: SignerKind,
    /// Index into the `anchors` slice of the anchor that verified the signature.
    pub anchor_index: usize,
    /// The model name recorded in the statement (informative only; it is not checked).
    pub model_name: String,
    /// The signed files, in the statement's order.
    pub files: Vec<(String, Sha256Hex)>,
}

/// What a bundle claims, read without checking any signature: nothing here is trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleSummary {
    /// Same format as [`Verified::signer`]: the key hint as `sha256:<hex>` (`None` for an old
    /// key bundle without a hint), or the leaf certificate's identity.
    pub signer: Option<String>,
    pub signer_kind: SignerKind,
    /// Subject and issuer DNs of the leaf certificate, for certificate bundles.
    pub certificate_subject: Option<String>,
    pub certificate_issuer: Option<String>,
    pub model_name: String,
    /// The statement subject's digest: sha256 over the raw resource digests.
    pub subject_digest: Sha256Hex,
    pub files: Vec<(String, Sha256Hex)>,
    /// Paths (relative to the model root) the signer left out of the model.
    pub ignore_paths: Vec<String>,
}

/// Why a bundle was refused or could not be made. Each refusal has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("malformed signature bundle: {0}")]
    MalformedBundle(String),
    #[error("unsupported bundle media type {0:?} (expected {BUNDLE_MEDIA_TYPE:?})")]
    UnsupportedMediaType(String),
    #[error("DSSE payload type is {0:?}, expected {IN_TOTO_PAYLOAD_TYPE:?}")]
    WrongPayloadType(String),
    #[error("in-toto statement type is {0:?}, expected {STATEMENT_TYPE:?}")]
    WrongStatementType(String),
    #[error("predicate type is {0:?}, expected {PREDICATE_TYPE:?}")]
    WrongPredicate(String),
    #[error("unsupported model serialization: {0}")]
    UnsupportedSerialization(String),
    #[error("the bundle carries no signature")]
    NoSignature,
    #[error("the signature does not verify with any configured trust anchor")]
    BadSignature,
    #[error("the signing certificate is not trusted: {0}")]
    UntrustedCertificate(String),
    #[error("the signing certificate is for {found}, not the required identity {expected:?}")]
    CertificateIdentityMismatch { expected: String, found: String },
    #[error("{0:?} is signed but missing from the model")]
    FileMissing(String),
    #[error("{0:?} is in the model but not covered by the signature")]
    UnexpectedFile(String),
    #[error("{name:?} does not match its signed digest: signed {expected}, found {found}")]
    DigestMismatch {
        name: String,
        expected: Sha256Hex,
        found: Sha256Hex,
    },
    #[error("the statement's subject digest {recorded} does not match its resources ({computed})")]
    SubjectDigestMismatch {
        recorded: String,
        computed: Sha256Hex,
    },
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("trust anchor {index} is unusable: {reason}")]
    BadTrustAnchor { index: usize, reason: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("cannot use {}: {reason}", path.display())]
    InvalidModelPath { path: PathBuf, reason: String },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
