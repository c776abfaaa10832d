//! Interoperability with the reference implementation, the `model_signing` Python tool
//! (PyPI `model-signing`, installed into `.venv` by scripts/test.sh): bundles it signs verify
//! here, bundles signed here verify there, and tampering is refused with the specific error.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use steward_artifact::digest::Sha256Hex;
use steward_artifact::signing::{
    ModelFile, SignerKind, SigningError, SigningKey, TrustAnchor, Verified, hash_model_path,
    hash_model_path_ignoring, inspect_bundle, key_fingerprint, sign_files,
    sign_files_with_certificate, sign_model_path, subject_digest, verify_bundle, verify_bundle_at,
    verify_model_path,
};
use tempfile::TempDir;

// ----- the reference tool -----

/// `$STEWARD_MODEL_SIGNING`, else `<workspace>/.venv/bin/model_signing`.
fn tool() -> PathBuf {
    let path = std::env::var_os("STEWARD_MODEL_SIGNING")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/model_signing")
        });
    assert!(
        path.is_file(),
        "the model_signing tool is not at {}: run scripts/test.sh, which installs it into .venv \
         (or point STEWARD_MODEL_SIGNING at it)",
        path.display()
    );
    path
}

fn run_tool(args: &[&OsStr]) -> Output {
    Command::new(tool())
        .args(args)
        .output()
        .expect("model_signing runs")
}

/// Runs the tool and insists it succeeds.
fn tool_ok(args: &[&OsStr]) {
    let out = run_tool(args);
    assert!(
        out.status.success(),
        "model_signing {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

fn tool_sign_key(model: &Path, key: &KeyFiles, signature: &Path) -> Vec<u8> {
    tool_ok(&[
        os("sign"),
        os("key"),
        os(model),
        os("--private_key"),
        os(&key.private_path),
        os("--signature"),
        os(signature),
    ]);
    fs::read(signature).unwrap()
}

fn tool_verify_key(model: &Path, key: &KeyFiles, signature: &Path) -> Output {
    run_tool(&[
        os("verify"),
        os("key"),
        os(model),
        os("--signature"),
        os(signature),
        os("--public_key"),
        os(&key.public_path),
    ])
}

// ----- keys, certificates, models -----

struct KeyFiles {
    private_pem: String,
    public_pem: String,
    private_path: PathBuf,
    public_path: PathBuf,
}

impl KeyFiles {
    fn new(dir: &Path, name: &str, alg: &'static rcgen::SignatureAlgorithm) -> Self {
        Self::from_pair(dir, name, &KeyPair::generate_for(alg).unwrap())
    }

    fn from_pair(dir: &Path, name: &str, pair: &KeyPair) -> Self {
        let private_path = dir.join(format!("{name}.key"));
        let public_path = dir.join(format!("{name}.pub"));
        fs::write(&private_path, pair.serialize_pem()).unwrap();
        fs::write(&public_path, pair.public_key_pem()).unwrap();
        Self {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
            private_path,
            public_path,
        }
    }

    fn anchor(&self) -> TrustAnchor {
        TrustAnchor::PublicKey {
            pem: self.public_pem.clone(),
        }
    }

    fn signing_key(&self) -> SigningKey {
        SigningKey::from_pem(&self.private_pem).unwrap()
    }

    fn fingerprint(&self) -> String {
        key_fingerprint(&self.public_pem).unwrap()
    }
}

fn p256(dir: &Path, name: &str) -> KeyFiles {
    KeyFiles::new(dir, name, &rcgen::PKCS_ECDSA_P256_SHA256)
}

fn write_files(root: &Path, files: &[(&str, &[u8])]) {
    for (name, body) in files {
        let path = root.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
    }
}

/// A directory model with nested, hidden and git files.
fn dir_model(tmp: &Path, name: &str) -> PathBuf {
    let root = tmp.join(name);
    let weights: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    write_files(
        &root,
        &[
            ("model.gguf", &weights),
            ("config.json", b"{\"arch\":\"llama\"}"),
            ("tokenizer/tokenizer.json", b"{\"vocab\":[]}"),
            ("tokenizer-extra.txt", b"extra"),
            (".hidden", b"dot file"),
            (".git/HEAD", b"ref: refs/heads/main\n"),
            (".gitattributes", b"*.gguf filter=lfs\n"),
        ],
    );
    root
}

fn single_model(tmp: &Path, name: &str, body: &[u8]) -> PathBuf {
    let path = tmp.join(name);
    fs::write(&path, body).unwrap();
    path
}

fn verify_path(
    bundle: &[u8],
    model: &Path,
    anchors: &[TrustAnchor],
) -> Result<Verified, SigningError> {
    let files = hash_model_path(model).unwrap();
    verify_bundle(bundle, &ModelFile::list(&files), anchors)
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 1;
    fs::write(path, bytes).unwrap();
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 24 * 3600)
}

struct Pki {
    root_pem: String,
    leaf: KeyFiles,
    leaf_pem_path: PathBuf,
    chain_pem_path: PathBuf,
    root_pem_path: PathBuf,
}

/// A private root (valid for ten years), an intermediate (one year), and a leaf for `identity`
/// (30 days) with `leaf_usage` applied to its parameters.
fn make_pki(dir: &Path, name: &str, identity: &str, leaf_usage: fn(&mut CertificateParams)) -> Pki {
    let now = time::OffsetDateTime::now_utc();
    let validity = |params: &mut CertificateParams, days: i64| {
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
    };
    let mut root = CertificateParams::new(Vec::<String>::new()).unwrap();
    root.distinguished_name
        .push(DnType::CommonName, format!("{name} root"));
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut root, 3650);
    let root = CertifiedIssuer::self_signed(
        root,
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    )
    .unwrap();

    let mut intermediate = CertificateParams::new(Vec::<String>::new()).unwrap();
    intermediate
        .distinguished_name
        .push(DnType::CommonName, format!("{name} signing CA"));
    intermediate.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    intermediate.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    validity(&mut intermediate, 365);
    let intermediate = CertifiedIssuer::signed_by(
        intermediate,
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        &root,
    )
    .unwrap();

    let leaf_pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "model signer");
    leaf.subject_alt_names = vec![SanType::Rfc822Name(identity.try_into().unwrap())];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf_usage(&mut leaf);
    validity(&mut leaf, 30);
    let leaf_cert = leaf.signed_by(&leaf_pair, &intermediate).unwrap();

    let leaf_pem_path = dir.join(format!("{name}-leaf.pem"));
    let chain_pem_path = dir.join(format!("{name}-chain.pem"));
    let root_pem_path = dir.join(format!("{name}-root.pem"));
    fs::write(&leaf_pem_path, leaf_cert.pem()).unwrap();
    fs::write(
        &chain_pem_path,
        format!("{}{}", intermediate.pem(), root.pem()),
    )
    .unwrap();
    fs::write(&root_pem_path, root.pem()).unwrap();
    Pki {
        root_pem: root.pem(),
        leaf: KeyFiles::from_pair(dir, &format!("{name}-leaf"), &leaf_pair),
        leaf_pem_path,
        chain_pem_path,
        root_pem_path,
    }
}

fn code_signing(leaf: &mut CertificateParams) {
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
}

fn tool_sign_certificate(model: &Path, pki: &Pki, signature: &Path) -> Vec<u8> {
    tool_ok(&[
        os("sign"),
        os("certificate"),
        os(model),
        os("--private_key"),
        os(&pki.leaf.private_path),
        os("--signing_certificate"),
        os(&pki.leaf_pem_path),
        os("--certificate_chain"),
        os(&pki.chain_pem_path),
        os("--signature"),
        os(signature),
    ]);
    fs::read(signature).unwrap()
}

fn tool_verify_certificate(model: &Path, root_pem_path: &Path, signature: &Path) -> Output {
    run_tool(&[
        os("verify"),
        os("certificate"),
        os(model),
        os("--signature"),
        os(signature),
        os("--certificate_chain"),
        os(root_pem_path),
    ])
}

fn root_anchor(pki: &Pki, identity: Option<&str>) -> TrustAnchor {
    TrustAnchor::CertificateRoot {
        pem: pki.root_pem.clone(),
        identity: identity.map(str::to_string),
    }
}

/// Rewrites the DSSE payload of a bundle (the signature is kept).
fn edit_payload(bundle: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut bundle: serde_json::Value = serde_json::from_slice(bundle).unwrap();
    let payload = STANDARD
        .decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
        .unwrap();
    let mut statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    edit(&mut statement);
    bundle["dsseEnvelope"]["payload"] = STANDARD
        .encode(serde_json::to_vec_pretty(&statement).unwrap())
        .into();
    serde_json::to_vec(&bundle).unwrap()
}

// ----- the tool signs, we verify -----

#[test]
fn bundle_signed_by_model_signing_with_a_key_verifies_here() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "signer");
    let other = p256(tmp.path(), "other");
    let anchors = [other.anchor(), key.anchor()];

    // A directory model, signature outside it.
    let dir = dir_model(tmp.path(), "llama-tiny");
    let bundle = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));
    let files = hash_model_path(&dir).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            ".hidden",
            "config.json",
            "model.gguf",
            "tokenizer/tokenizer.json",
            "tokenizer-extra.txt"
        ]
    );
    let verified = verify_bundle(&bundle, &ModelFile::list(&files), &anchors).unwrap();
    assert_eq!(verified.anchor_index, 1);
    assert_eq!(verified.signer, key.fingerprint());
    assert_eq!(verified.signer_kind, SignerKind::Key);
    assert_eq!(verified.model_name, "llama-tiny");
    // The tool lists the files in the same order as we do.
    assert_eq!(verified.files, files);

    let summary = inspect_bundle(&bundle).unwrap();
    assert_eq!(summary.signer, Some(key.fingerprint()));
    assert_eq!(summary.signer_kind, SignerKind::Key);
    assert_eq!(summary.files, files);
    assert_eq!(
        summary.subject_digest,
        subject_digest(files.iter().map(|(_, d)| d))
    );

    // A single-file model: one resource named ".", the model named after the file.
    let single = single_model(tmp.path(), "tiny.gguf", b"GGUF single file model");
    let bundle = tool_sign_key(&single, &key, &tmp.path().join("single.sig"));
    let files = hash_model_path(&single).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].0, ".");
    let verified = verify_bundle(&bundle, &ModelFile::list(&files), &anchors).unwrap();
    assert_eq!(verified.model_name, "tiny.gguf");
    assert_eq!(verified.files, files);
    assert_eq!(verified.signer, key.fingerprint());
    // The file's own name is not signed: passed under it, the one file still matches ".".
    let by_name = [ModelFile {
        name: "tiny.gguf",
        sha256: &files[0].1,
    }];
    verify_bundle(&bundle, &by_name, &anchors).unwrap();

    // The signature written inside the model: the tool records it in ignore_paths, which
    // verify_model_path honours; a plain listing of the directory has it as an extra file.
    let sig_inside = dir.join("model.sig");
    let bundle = tool_sign_key(&dir, &key, &sig_inside);
    let summary = inspect_bundle(&bundle).unwrap();
    assert!(summary.ignore_paths.contains(&"model.sig".to_string()));
    let verified = verify_model_path(&bundle, &dir, &anchors).unwrap();
    assert_eq!(verified.files.len(), 5);
    assert!(matches!(
        verify_path(&bundle, &dir, &anchors),
        Err(SigningError::UnexpectedFile(name)) if name == "model.sig"
    ));
    let ignored: Vec<&str> = summary.ignore_paths.iter().map(String::as_str).collect();
    let files = hash_model_path_ignoring(&dir, &ignored).unwrap();
    verify_bundle(&bundle, &ModelFile::list(&files), &anchors).unwrap();

    // P-384 (the tool signs with SHA-384).
    let key384 = KeyFiles::new(tmp.path(), "p384", &rcgen::PKCS_ECDSA_P384_SHA384);
    let bundle = tool_sign_key(&single, &key384, &tmp.path().join("p384.sig"));
    let verified = verify_path(&bundle, &single, &[key.anchor(), key384.anchor()]).unwrap();
    assert_eq!(verified.anchor_index, 1);
    assert_eq!(verified.signer, key384.fingerprint());
}

// ----- we sign, the tool verifies -----

#[test]
fn bundle_signed_here_verifies_with_model_signing() {
    let tmp = TempDir::new().unwrap();
    let dir = dir_model(tmp.path(), "model-dir");
    let single = single_model(tmp.path(), "weights.gguf", b"GGUF weights");
    for (name, alg) in [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
    ] {
        let key = KeyFiles::new(tmp.path(), name, alg);
        let signing_key = key.signing_key();
        // The public key file the tool reads is the one we write.
        fs::write(&key.public_path, signing_key.public_key_pem()).unwrap();
        assert_eq!(signing_key.fingerprint(), key.fingerprint());

        for model in [&dir, &single] {
            let bundle = sign_model_path(model, &signing_key).unwrap();
            let sig = tmp.path().join(format!("{name}-ours.sig"));
            fs::write(&sig, &bundle).unwrap();
            let out = tool_verify_key(model, &key, &sig);
            assert!(
                out.status.success(),
                "model_signing refused our {name} bundle for {}: {}{}",
                model.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            verify_path(&bundle, model, &[key.anchor()]).unwrap();
        }

        // Signed from a file list, written inside the model directory (the tool leaves the
        // signature file out of what it hashes).
        let files = hash_model_path(&dir).unwrap();
        let bundle = sign_files(&ModelFile::list(&files), "model-dir", &signing_key).unwrap();
        let sig = dir.join("model.sig");
        fs::write(&sig, &bundle).unwrap();
        assert!(tool_verify_key(&dir, &key, &sig).status.success());
        fs::remove_file(&sig).unwrap();
    }

    // A single file must be signed as "." to be a single-file model to the tool: signed
    // under its own name, the tool sees a file "weights.gguf" that its manifest lacks.
    let key = p256(tmp.path(), "named");
    let files = hash_model_path(&single).unwrap();
    let named = [ModelFile {
        name: "weights.gguf",
        sha256: &files[0].1,
    }];
    let bundle = sign_files(&named, "weights.gguf", &key.signing_key()).unwrap();
    let sig = tmp.path().join("named.sig");
    fs::write(&sig, &bundle).unwrap();
    assert!(!tool_verify_key(&single, &key, &sig).status.success());

    // The tool does check: a changed byte after signing is refused there too.
    let key = p256(tmp.path(), "control");
    let bundle = sign_model_path(&single, &key.signing_key()).unwrap();
    let sig = tmp.path().join("control.sig");
    fs::write(&sig, &bundle).unwrap();
    assert!(tool_verify_key(&single, &key, &sig).status.success());
    let other = p256(tmp.path(), "control-other");
    assert!(!tool_verify_key(&single, &other, &sig).status.success());
    flip_byte(&single, 0);
    assert!(!tool_verify_key(&single, &key, &sig).status.success());
}

// ----- certificates -----

#[test]
fn certificate_bundle_signed_by_model_signing_verifies_against_a_private_root() {
    let tmp = TempDir::new().unwrap();
    let model = dir_model(tmp.path(), "cert-model");
    let pki = make_pki(tmp.path(), "corp", "ml-release@example.com", code_signing);
    let stranger = make_pki(
        tmp.path(),
        "stranger",
        "ml-release@example.com",
        code_signing,
    );

    let bundle = tool_sign_certificate(&model, &pki, &tmp.path().join("cert.sig"));
    // The tool itself accepts it against the root alone.
    assert!(
        tool_verify_certificate(&model, &pki.root_pem_path, &tmp.path().join("cert.sig"))
            .status
            .success()
    );

    let verified = verify_path(&bundle, &model, &[root_anchor(&pki, None)]).unwrap();
    assert_eq!(verified.signer, "ml-release@example.com");
    assert_eq!(verified.signer_kind, SignerKind::Certificate);
    assert_eq!(verified.anchor_index, 0);

    let summary = inspect_bundle(&bundle).unwrap();
    assert_eq!(summary.signer.as_deref(), Some("ml-release@example.com"));
    assert_eq!(summary.signer_kind, SignerKind::Certificate);
    assert_eq!(
        summary.certificate_subject.as_deref(),
        Some("CN=model signer")
    );
    assert_eq!(
        summary.certificate_issuer.as_deref(),
        Some("CN=corp signing CA")
    );

    // The identity, when required, must be the leaf's.
    let anchors = [root_anchor(&pki, Some("ml-release@example.com"))];
    verify_path(&bundle, &model, &anchors).unwrap();
    match verify_path(
        &bundle,
        &model,
        &[root_anchor(&pki, Some("intern@example.com"))],
    ) {
        Err(SigningError::CertificateIdentityMismatch { expected, found }) => {
            assert_eq!(expected, "intern@example.com");
            assert_eq!(found, "ml-release@example.com");
        }
        other => panic!("expected an identity mismatch, got {other:?}"),
    }

    // Another root (same names, other keys) does not vouch for it.
    assert!(matches!(
        verify_path(&bundle, &model, &[root_anchor(&stranger, None)]),
        Err(SigningError::UntrustedCertificate(_))
    ));
    // Key anchors are not consulted for certificate bundles; the matching root wins.
    let anchors = [
        root_anchor(&stranger, None),
        pki.leaf.anchor(),
        root_anchor(&pki, None),
    ];
    assert_eq!(
        verify_path(&bundle, &model, &anchors).unwrap().anchor_index,
        2
    );
    assert!(matches!(
        verify_path(&bundle, &model, &[pki.leaf.anchor()]),
        Err(SigningError::UntrustedCertificate(_))
    ));

    // Validity is checked at the verification time: after the leaf expires it is refused.
    let files = hash_model_path(&model).unwrap();
    let later = SystemTime::now() + days(60);
    match verify_bundle_at(
        &bundle,
        &ModelFile::list(&files),
        &[root_anchor(&pki, None)],
        later,
    ) {
        Err(SigningError::UntrustedCertificate(reason)) => {
            assert!(reason.contains("has expired"), "{reason}")
        }
        other => panic!("expected an expired certificate, got {other:?}"),
    }

    // A change to the model is still a digest mismatch.
    flip_byte(&model.join("config.json"), 3);
    assert!(matches!(
        verify_path(&bundle, &model, &[root_anchor(&pki, None)]),
        Err(SigningError::DigestMismatch { name, .. }) if name == "config.json"
    ));
}

#[test]
fn certificate_bundle_signed_here_verifies_with_model_signing() {
    let tmp = TempDir::new().unwrap();
    let model = single_model(tmp.path(), "model.gguf", b"GGUF model for certificates");
    let pki = make_pki(tmp.path(), "corp", "release@example.com", code_signing);
    let chain = format!(
        "{}{}",
        fs::read_to_string(&pki.leaf_pem_path).unwrap(),
        fs::read_to_string(&pki.chain_pem_path).unwrap()
    );
    let files = hash_model_path(&model).unwrap();
    let bundle = sign_files_with_certificate(
        &ModelFile::list(&files),
        "model.gguf",
        &pki.leaf.signing_key(),
        &chain,
    )
    .unwrap();
    let sig = tmp.path().join("ours-cert.sig");
    fs::write(&sig, &bundle).unwrap();
    let out = tool_verify_certificate(&model, &pki.root_pem_path, &sig);
    assert!(
        out.status.success(),
        "model_signing refused our certificate bundle: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = verify_path(&bundle, &model, &[root_anchor(&pki, None)]).unwrap();
    assert_eq!(verified.signer, "release@example.com");

    // The certificate must be the key's.
    let other = p256(tmp.path(), "other");
    assert!(matches!(
        sign_files_with_certificate(
            &ModelFile::list(&files),
            "model.gguf",
            &other.signing_key(),
            &chain
        ),
        Err(SigningError::BadKey(_))
    ));
}

#[test]
fn a_leaf_certificate_that_may_not_sign_is_refused() {
    let tmp = TempDir::new().unwrap();
    let model = single_model(tmp.path(), "model.gguf", b"GGUF");
    // A TLS server certificate: no digitalSignature key usage, no codeSigning.
    let pki = make_pki(tmp.path(), "tls", "ops@example.com", |leaf| {
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    });
    let sig = tmp.path().join("tls.sig");
    // The tool signs whatever it is given, but refuses it when verifying; so do we.
    let bundle = tool_sign_certificate(&model, &pki, &sig);
    assert!(
        !tool_verify_certificate(&model, &pki.root_pem_path, &sig)
            .status
            .success()
    );
    assert!(matches!(
        verify_path(&bundle, &model, &[root_anchor(&pki, None)]),
        Err(SigningError::UntrustedCertificate(_))
    ));
}

// ----- refusals -----

#[test]
fn a_changed_byte_is_a_digest_mismatch() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let single = single_model(tmp.path(), "m.gguf", b"GGUF model bytes");
    let single_bundle = tool_sign_key(&single, &key, &tmp.path().join("single.sig"));
    let dir = dir_model(tmp.path(), "dir");
    let dir_bundle = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));

    let signed = hash_model_path(&single).unwrap();
    flip_byte(&single, 5);
    match verify_path(&single_bundle, &single, &[key.anchor()]) {
        Err(SigningError::DigestMismatch {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, ".");
            assert_eq!(expected, signed[0].1);
            assert_ne!(found, expected);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }

    flip_byte(&dir.join("model.gguf"), 4999);
    assert!(matches!(
        verify_path(&dir_bundle, &dir, &[key.anchor()]),
        Err(SigningError::DigestMismatch { name, .. }) if name == "model.gguf"
    ));
}

#[test]
fn a_truncated_file_is_a_digest_mismatch() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let dir = dir_model(tmp.path(), "dir");
    let bundle = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));
    let weights = dir.join("model.gguf");
    let bytes = fs::read(&weights).unwrap();
    fs::write(&weights, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        verify_model_path(&bundle, &dir, &[key.anchor()]),
        Err(SigningError::DigestMismatch { name, .. }) if name == "model.gguf"
    ));
    fs::write(&weights, b"").unwrap();
    assert!(matches!(
        verify_model_path(&bundle, &dir, &[key.anchor()]),
        Err(SigningError::DigestMismatch { name, .. }) if name == "model.gguf"
    ));
}

#[test]
fn another_key_is_a_bad_signature() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let other = p256(tmp.path(), "other");
    let model = single_model(tmp.path(), "m.gguf", b"GGUF");
    let bundle = tool_sign_key(&model, &key, &tmp.path().join("m.sig"));
    assert!(matches!(
        verify_path(&bundle, &model, &[other.anchor()]),
        Err(SigningError::BadSignature)
    ));
    assert!(matches!(
        verify_path(&bundle, &model, &[]),
        Err(SigningError::BadSignature)
    ));

    // Without the hint every key is tried: the signature itself decides.
    let mut value: serde_json::Value = serde_json::from_slice(&bundle).unwrap();
    value["verificationMaterial"]["publicKey"] = serde_json::json!({});
    let no_hint = serde_json::to_vec(&value).unwrap();
    assert!(matches!(
        verify_path(&no_hint, &model, &[other.anchor()]),
        Err(SigningError::BadSignature)
    ));
    verify_path(&no_hint, &model, &[other.anchor(), key.anchor()]).unwrap();
}

#[test]
fn the_signature_of_another_model_is_refused() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let anchors = [key.anchor()];
    let a = single_model(tmp.path(), "a.gguf", b"model A");
    let b = single_model(tmp.path(), "b.gguf", b"model B");
    let bundle_a = tool_sign_key(&a, &key, &tmp.path().join("a.sig"));
    let bundle_b = tool_sign_key(&b, &key, &tmp.path().join("b.sig"));
    verify_path(&bundle_b, &b, &anchors).unwrap();

    // A's bundle presented for B: both are "." but the digests differ.
    assert!(matches!(
        verify_path(&bundle_a, &b, &anchors),
        Err(SigningError::DigestMismatch { name, .. }) if name == "."
    ));
    // A directory model's bundle for a single-file model: its files are missing.
    let dir = dir_model(tmp.path(), "dir");
    let bundle_dir = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));
    assert!(matches!(
        verify_path(&bundle_dir, &b, &anchors),
        Err(SigningError::FileMissing(name)) if name == ".hidden"
    ));
    // A's signature grafted onto B's bundle: it does not cover B's statement.
    let mut grafted: serde_json::Value = serde_json::from_slice(&bundle_b).unwrap();
    let a_value: serde_json::Value = serde_json::from_slice(&bundle_a).unwrap();
    grafted["dsseEnvelope"]["signatures"] = a_value["dsseEnvelope"]["signatures"].clone();
    assert!(matches!(
        verify_path(&serde_json::to_vec(&grafted).unwrap(), &b, &anchors),
        Err(SigningError::BadSignature)
    ));
}

#[test]
fn an_edited_statement_is_a_bad_signature() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let dir = dir_model(tmp.path(), "dir");
    let bundle = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));

    // Swap in a malicious config and make the statement agree with it, consistently (the
    // subject digest recomputed): only the signature can tell.
    fs::write(dir.join("config.json"), b"{\"arch\":\"evil\"}").unwrap();
    let files = hash_model_path(&dir).unwrap();
    let forged = edit_payload(&bundle, |statement| {
        let resources = statement["predicate"]["resources"].as_array_mut().unwrap();
        for resource in resources.iter_mut() {
            let name = resource["name"].as_str().unwrap().to_string();
            let digest = &files.iter().find(|(n, _)| *n == name).unwrap().1;
            resource["digest"] = digest.to_string().into();
        }
        let digests: Vec<Sha256Hex> = resources
            .iter()
            .map(|r| Sha256Hex::parse(r["digest"].as_str().unwrap()).unwrap())
            .collect();
        statement["subject"][0]["digest"]["sha256"] = subject_digest(&digests).to_string().into();
    });
    // The forgery is self-consistent...
    assert_eq!(inspect_bundle(&forged).unwrap().files, files);
    // ...but not signed.
    assert!(matches!(
        verify_path(&forged, &dir, &[key.anchor()]),
        Err(SigningError::BadSignature)
    ));
    // Even a change that leaves the JSON meaning intact breaks it: the bytes are signed.
    let reformatted = edit_payload(&bundle, |_| {});
    assert!(matches!(
        verify_bundle(&reformatted, &[], &[key.anchor()]),
        Err(SigningError::BadSignature)
    ));
}

#[test]
fn an_extra_or_missing_file_in_a_directory_model_is_refused() {
    let tmp = TempDir::new().unwrap();
    let key = p256(tmp.path(), "k");
    let dir = dir_model(tmp.path(), "dir");
    let bundle = tool_sign_key(&dir, &key, &tmp.path().join("dir.sig"));
    let anchors = [key.anchor()];

    // Git metadata is not part of the model.
    write_files(
        &dir,
        &[(".git/refs/heads/main", b"0000"), (".gitignore", b"*.tmp")],
    );
    verify_model_path(&bundle, &dir, &anchors).unwrap();

    write_files(&dir, &[("tokenizer/added.bin", b"new")]);
    assert!(matches!(
        verify_model_path(&bundle, &dir, &anchors),
        Err(SigningError::UnexpectedFile(name)) if name == "tokenizer/added.bin"
    ));
    fs::remove_file(dir.join("tokenizer/added.bin")).unwrap();
    verify_model_path(&bundle, &dir, &anchors).unwrap();

    fs::remove_file(dir.join("tokenizer/tokenizer.json")).unwrap();
    assert!(matches!(
        verify_model_path(&bundle, &dir, &anchors),
        Err(SigningError::FileMissing(name)) if name == "tokenizer/tokenizer.json"
    ));
}
