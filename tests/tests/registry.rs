//! The model registry over real TLS gRPC: pushes are hashed while they stream, pre-parsed,
//! checked against the trust policy, stored content-addressed, and every outcome audited.

use std::time::Duration;

use steward_proto::admin::v1::{
    AllowUnsignedRequest, GetTrustPolicyRequest, ListModelsRequest, ModelRef,
    RemoveTrustAnchorRequest, RevokeModelRequest,
};
use steward_tests::{
    Backend, TestControlPlane, TestDb, init_logging, sign, signing_key, tiny_gguf,
};

steward_tests::on_both_backends!(
    a_signed_push_is_verified_listed_and_stored_once_per_digest,
    unsigned_models_are_refused_until_an_audited_allowance_permits_them,
    tampered_bytes_other_keys_and_swapped_signatures_are_refused,
    trust_policy_changes_apply_without_a_restart,
);

fn blob_count(cp: &TestControlPlane) -> usize {
    walk(&cp.data_dir.path().join("blobs/sha256"))
}

fn tmp_count(cp: &TestControlPlane) -> usize {
    walk(&cp.data_dir.path().join("blobs/tmp"))
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn a_signed_push_is_verified_listed_and_stored_once_per_digest(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = signing_key(dir.path());
    let anchor = admin.trust_key(&public, "tiny-*").await;
    assert!(anchor.fingerprint.starts_with("sha256:"));
    let model = dir.path().join("tiny.gguf");
    tiny_gguf(&model, 1);
    let sig = sign(&model, &key);

    let pushed = admin
        .push(&model, "tiny-llama", "1.0", Some(&sig))
        .await
        .unwrap();
    let expected = steward_artifact::digest::sha256_reader(std::fs::File::open(&model).unwrap())
        .unwrap()
        .0;
    assert_eq!(pushed.digest, expected.to_string());
    assert_eq!(pushed.verification, "verified");
    assert!(pushed.signer.starts_with("sha256:"), "{}", pushed.signer);
    let facts = pushed.gguf.clone().unwrap();
    assert_eq!(facts.architecture, "llama");
    assert_eq!(facts.parameter_count, 64);
    assert_eq!(facts.context_length, 256);
    assert_eq!(facts.layer_count, 2);

    // Same bytes under another version: one blob.
    let again = admin
        .push(&model, "tiny-llama", "1.1", Some(&sig))
        .await
        .unwrap();
    assert_eq!(again.digest, pushed.digest);
    assert_eq!(blob_count(&cp), 1);
    assert_eq!(tmp_count(&cp), 0);
    let blob = cp
        .data_dir
        .path()
        .join("blobs/sha256")
        .join(&pushed.digest[..2])
        .join(&pushed.digest);
    assert_eq!(std::fs::read(blob).unwrap(), std::fs::read(&model).unwrap());

    // Same version, different bytes: refused, nothing overwritten.
    let other = dir.path().join("other.gguf");
    tiny_gguf(&other, 2);
    let other_sig = sign(&other, &key);
    let err = admin
        .push(&other, "tiny-llama", "1.0", Some(&other_sig))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    let models = admin
        .models()
        .list_models(admin.request(ListModelsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 2);
    let by_digest = admin
        .models()
        .get_model(admin.request(ModelRef {
            model: format!("sha256:{}", pushed.digest),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_digest.name, "tiny-llama");

    let revoked = admin
        .models()
        .revoke_model(admin.request(RevokeModelRequest {
            digest: pushed.digest.clone(),
            reason: "found a flaw".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    assert_eq!(revoked.revoked_reason, "found a flaw");

    let actions: Vec<(String, String)> = cp
        .store()
        .audit_events()
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.outcome))
        .collect();
    for expected in [
        ("trust.anchor.add", "success"),
        ("model.push", "success"),
        ("model.push", "denied"),
        ("model.revoke", "success"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, o)| a == expected.0 && o == expected.1),
            "{expected:?} not audited: {actions:?}"
        );
    }
    cp.stop().await;
    db.cleanup().await;
}

async fn unsigned_models_are_refused_until_an_audited_allowance_permits_them(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("dev.gguf");
    tiny_gguf(&model, 3);

    let err = admin
        .push(&model, "dev-model", "1", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("is unsigned"), "{}", err.message());
    assert_eq!(blob_count(&cp), 0, "a refused push leaves no blob");
    assert_eq!(tmp_count(&cp), 0);

    let policy = admin
        .trust()
        .allow_unsigned(admin.request(AllowUnsignedRequest {
            name_pattern: "dev-*".into(),
            reason: "local experiments".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.unsigned_allowed[0].name_pattern, "dev-*");
    let pushed = admin.push(&model, "dev-model", "1", None).await.unwrap();
    assert_eq!(pushed.verification, "unsigned-allowed (pattern dev-*)");
    assert!(pushed.signer.is_empty());
    // The allowance covers only its pattern.
    assert!(admin.push(&model, "prod-model", "1", None).await.is_err());

    let events = cp.store().audit_events().await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.action == "trust.unsigned.allow" && e.target == "dev-*")
    );
    cp.stop().await;
    db.cleanup().await;
}

async fn tampered_bytes_other_keys_and_swapped_signatures_are_refused(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = signing_key(dir.path());
    admin.trust_key(&public, "*").await;
    let model = dir.path().join("m.gguf");
    tiny_gguf(&model, 4);
    let sig = sign(&model, &key);

    // One byte changed after signing (inside the tensor data, so the GGUF stays valid).
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = dir.path().join("tampered").join("m.gguf");
    std::fs::create_dir_all(tampered.parent().unwrap()).unwrap();
    std::fs::write(&tampered, &bytes).unwrap();
    let err = admin
        .push(&tampered, "m", "1", Some(&sig))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A key the policy does not trust.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_key, _) = signing_key(other_dir.path());
    let copy = other_dir.path().join("m.gguf");
    std::fs::copy(&model, &copy).unwrap();
    let foreign = sign(&copy, &other_key);
    let err = admin
        .push(&model, "m", "2", Some(&foreign))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A valid signature of another model.
    let second = dir.path().join("second").join("m.gguf");
    std::fs::create_dir_all(second.parent().unwrap()).unwrap();
    tiny_gguf(&second, 5);
    let second_sig = sign(&second, &key);
    let err = admin
        .push(&model, "m", "3", Some(&second_sig))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a gguf file").unwrap();
    let err = admin.push(&junk, "m", "4", Some(&sig)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("GGUF"), "{}", err.message());

    assert_eq!(blob_count(&cp), 0, "nothing refused is stored");
    assert_eq!(tmp_count(&cp), 0);
    let denied = cp
        .store()
        .audit_events()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "model.push" && e.outcome == "denied")
        .count();
    assert_eq!(denied, 4, "every refusal is audited");
    // And the genuine article still goes through.
    admin.push(&model, "m", "5", Some(&sig)).await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

async fn trust_policy_changes_apply_without_a_restart(backend: Backend) {
    init_logging();
    let db = TestDb::new(backend).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = signing_key(dir.path());
    let model = dir.path().join("p.gguf");
    tiny_gguf(&model, 6);
    let sig = sign(&model, &key);

    let err = admin.push(&model, "p", "1", Some(&sig)).await.unwrap_err();
    assert!(
        err.message().contains("no trust anchor"),
        "{}",
        err.message()
    );
    let anchor = admin.trust_key(&public, "p").await;
    admin.push(&model, "p", "1", Some(&sig)).await.unwrap();
    admin
        .trust()
        .remove_trust_anchor(admin.request(RemoveTrustAnchorRequest { id: anchor.id }))
        .await
        .unwrap();
    let policy = admin
        .trust()
        .get_trust_policy(admin.request(GetTrustPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(policy.anchors.is_empty());
    assert!(admin.push(&model, "p", "2", Some(&sig)).await.is_err());
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_interrupted_pushes_leave_nothing_behind() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start_with(&db, |c| c.registry.max_artifact_bytes = 1024).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    admin
        .trust()
        .allow_unsigned(admin.request(AllowUnsignedRequest {
            name_pattern: "*".into(),
            reason: "test".into(),
        }))
        .await
        .unwrap();
    let big = dir.path().join("big.gguf");
    std::fs::write(&big, vec![0u8; 4096]).unwrap();
    let err = admin.push(&big, "big", "1", None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("maximum artifact size"),
        "{}",
        err.message()
    );

    // Header announces 1000 bytes; the client goes away after 100.
    use steward_proto::admin::v1::{PushHeader, PushModelRequest, push_model_request};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(PushModelRequest {
        body: Some(push_model_request::Body::Header(PushHeader {
            name: "cut".into(),
            version: "1".into(),
            file_name: "cut.gguf".into(),
            size_bytes: 1000,
            signature_bundle: vec![],
        })),
    })
    .await
    .unwrap();
    tx.send(PushModelRequest {
        body: Some(push_model_request::Body::Chunk(vec![7u8; 100].into())),
    })
    .await
    .unwrap();
    let mut models = admin.models();
    let call = tokio::spawn(async move {
        models
            .push_model(admin.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(walk(&cp.data_dir.path().join("blobs/sha256")), 0);
    assert_eq!(
        walk(&cp.data_dir.path().join("blobs/tmp")),
        0,
        "partial upload removed"
    );
    assert!(cp.store().list_models().await.unwrap().is_empty());
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_on_the_control_plane_host_imports_as_a_signed_model() {
    init_logging();
    let db = TestDb::new(Backend::Sqlite).await;
    let cp = TestControlPlane::start(&db).await;
    let admin = cp.admin().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = signing_key(dir.path());
    admin.trust_key(&public, "*").await;
    let folder = dir.path().join("airgap");
    std::fs::create_dir(&folder).unwrap();
    let model = folder.join("model.gguf");
    tiny_gguf(&model, 7);
    sign(&model, &key);
    let imported = admin
        .models()
        .import_model(admin.request(steward_proto::admin::v1::ImportModelRequest {
            path: folder.to_string_lossy().into_owned(),
            name: "imported".into(),
            version: "1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.verification, "verified");
    assert_eq!(imported.file_name, "model.gguf");
    cp.stop().await;
}
