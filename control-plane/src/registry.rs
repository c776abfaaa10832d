//! The model registry's application layer: accepting pushed or imported artifacts only after
//! the bytes, the GGUF header and the signature all check out; listing, resolving and
//! revoking them; and managing the trust policy. Every acceptance, refusal and policy change
//! is audited.

use std::path::{Path, PathBuf};

use serde_json::json;
use steward_artifact::digest::Sha256Hex;
use steward_artifact::gguf::{GgufError, GgufFacts, Limits, inspect_file};
use steward_db::{
    ArtifactRecord, DbError, ModelRecord, RegisterConflict, Store, TrustAnchorRecord,
    UnsignedAllowanceRecord,
};

use crate::blobs::{BlobError, BlobStore, Staged};
use crate::fleet::{Actor, audit, now_unix};
use crate::trust::{KIND_CERTIFICATE_ROOT, KIND_PUBLIC_KEY, PolicyRefusal, TrustPolicy};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("upload failed")]
    Blob(#[from] BlobError),
    #[error("the GGUF file is refused")]
    Gguf(#[source] GgufError),
    #[error("the model is refused by the trust policy")]
    Policy(#[source] PolicyRefusal),
    #[error("the model version cannot be registered")]
    Conflict(#[source] RegisterConflict),
    #[error("{0} not found")]
    NotFound(String),
    #[error("storage failed")]
    Db(#[from] DbError),
}

/// Registry tunables.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    pub max_artifact_bytes: u64,
    pub gguf_limits: Limits,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            max_artifact_bytes: 256 << 30,
            gguf_limits: Limits::default(),
        }
    }
}

/// What a pusher declares before the bytes.
#[derive(Clone, Debug)]
pub struct PushHeader {
    pub name: String,
    pub version: String,
    pub file_name: String,
    pub size_bytes: u64,
    pub signature_bundle: Vec<u8>,
}

#[derive(Debug)]
pub struct Registry {
    pub store: Store,
    pub blobs: BlobStore,
    pub settings: RegistrySettings,
}

impl Registry {
    pub fn new(store: Store, blobs: BlobStore, settings: RegistrySettings) -> Self {
        Self {
            store,
            blobs,
            settings,
        }
    }

    /// Checks a header before any byte is accepted.
    pub fn check_header(&self, header: &PushHeader) -> Result<(), RegistryError> {
        check_name("model name", &header.name, true)?;
        check_name("version", &header.version, false)?;
        if header.file_name.is_empty()
            || header.file_name.contains(['/', '\\'])
            || header.file_name.starts_with('.')
            || header.file_name.len() > 255
        {
            return Err(RegistryError::InvalidArgument(format!(
                "file name `{}` must be a plain file name (no directories)",
                header.file_name
            )));
        }
        if header.size_bytes > self.settings.max_artifact_bytes {
            return Err(RegistryError::Blob(BlobError::TooLarge {
                limit: self.settings.max_artifact_bytes,
            }));
        }
        Ok(())
    }

    /// Decides on a fully received upload: GGUF pre-parse, then the trust policy; only then
    /// is the blob published and the version recorded. Refusals are audited by the caller
    /// through [`Registry::audit_refusal`].
    ///
    /// `streamed` is the pre-parse already run on the bytes as they arrived
    /// ([`steward_artifact::gguf::stream::GgufProbe`]); without it the staged file is parsed.
    pub async fn accept(
        &self,
        actor: &Actor,
        header: &PushHeader,
        staged: Staged,
        streamed: Option<Result<GgufFacts, GgufError>>,
    ) -> Result<ModelRecord, RegistryError> {
        let started = std::time::Instant::now();
        let facts = match streamed {
            Some(verdict) => verdict.map_err(RegistryError::Gguf)?,
            None => self.inspect(staged.path()).await?,
        };
        let inspected = started.elapsed();
        let files = vec![(header.file_name.clone(), staged.digest.clone())];
        let policy = TrustPolicy::load(&self.store).await?;
        let acceptance = policy
            .evaluate(
                &header.name,
                &files,
                Some(header.signature_bundle.as_slice()),
            )
            .map_err(RegistryError::Policy)?;
        let evaluated = started.elapsed();
        let digest = staged.digest.clone();
        let size = staged.size;
        let blob = staged.commit().await?;
        let committed = started.elapsed();
        let artifact = ArtifactRecord {
            digest: digest.to_string(),
            size_bytes: size,
            file_name: header.file_name.clone(),
            gguf_facts_json: serde_json::to_string(&facts).unwrap_or_default(),
            signature_bundle: String::from_utf8_lossy(&header.signature_bundle).into_owned(),
            signer: acceptance.signer().to_owned(),
            verification: acceptance.describe(),
            created_at: now_unix(),
            created_by: actor.to_string(),
            revoked_at: None,
            revoked_reason: None,
            revoked_by: None,
        };
        let event = audit(
            actor,
            "model.push",
            &format!("{}@{}", header.name, header.version),
            "success",
            json!({
                "digest": digest.to_string(),
                "size_bytes": size,
                "signer": acceptance.signer(),
                "verification": acceptance.describe(),
                "architecture": facts.architecture,
                "parameter_count": facts.parameter_count,
                "quantization": facts.quantization,
            }),
        );
        let model = self
            .store
            .register_model(artifact, &header.name, &header.version, event)
            .await?
            .map_err(RegistryError::Conflict)?;
        tracing::info!(
            name = %model.name,
            version = %model.version,
            digest = %model.artifact.digest,
            inspected_ms = inspected.as_millis() as u64,
            evaluated_ms = evaluated.as_millis() as u64,
            committed_ms = committed.as_millis() as u64,
            recorded_ms = started.elapsed().as_millis() as u64,
            "model registered"
        );
        // A new model is usually deployed next: have its bytes in memory for the first pull.
        crate::blobs::prefetch(blob, size);
        Ok(model)
    }

    /// Limits for the GGUF pre-parse.
    pub fn gguf_limits(&self) -> &steward_artifact::gguf::Limits {
        &self.settings.gguf_limits
    }

    async fn inspect(&self, path: &Path) -> Result<GgufFacts, RegistryError> {
        let path = path.to_owned();
        let limits = self.settings.gguf_limits.clone();
        tokio::task::spawn_blocking(move || inspect_file(&path, &limits))
            .await
            .map_err(|e| RegistryError::InvalidArgument(format!("GGUF check aborted: {e}")))?
            .map_err(RegistryError::Gguf)
    }

    /// Records a refused push or import with its reason.
    pub async fn audit_refusal(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        error: &RegistryError,
        digest: Option<&Sha256Hex>,
    ) {
        let reason = steward_telemetry::chain(error).to_string();
        tracing::warn!(%actor, action, target, reason, "model refused");
        let event = audit(
            actor,
            action,
            target,
            "denied",
            json!({"reason": reason, "digest": digest.map(ToString::to_string)}),
        );
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %steward_telemetry::chain(&e), "could not audit a refused model");
        }
    }

    /// Imports a folder on this host: exactly one `.gguf` plus its signature bundle.
    pub async fn import_dir(
        &self,
        actor: &Actor,
        dir: &Path,
        name: &str,
        version: &str,
    ) -> Result<ModelRecord, RegistryError> {
        let (model_path, signature_path) = find_import_files(dir)?;
        let signature_bundle = match &signature_path {
            Some(p) => std::fs::read(p).map_err(|source| {
                RegistryError::Blob(BlobError::Io {
                    path: p.clone(),
                    source,
                })
            })?,
            None => Vec::new(),
        };
        let file_name = model_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let staged = self
            .blobs
            .ingest_file(&model_path, self.settings.max_artifact_bytes)
            .await?;
        let header = PushHeader {
            name: name.to_owned(),
            version: version.to_owned(),
            file_name,
            size_bytes: staged.size,
            signature_bundle,
        };
        self.check_header(&header)?;
        self.accept(actor, &header, staged, None).await
    }

    pub async fn list(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        Ok(self.store.list_models().await?)
    }

    /// Resolves `name@version` or a digest.
    pub async fn resolve(&self, reference: &str) -> Result<Vec<ModelRecord>, RegistryError> {
        if let Some(digest) = Sha256Hex::parse(reference) {
            let versions = self.store.versions_of(digest.as_str()).await?;
            if versions.is_empty() {
                return Err(RegistryError::NotFound(format!("artifact {digest}")));
            }
            return Ok(versions);
        }
        let (name, version) = reference.rsplit_once('@').ok_or_else(|| {
            RegistryError::InvalidArgument(format!(
                "`{reference}` is neither NAME@VERSION nor a sha256 digest"
            ))
        })?;
        self.store
            .find_model_version(name, version)
            .await?
            .map(|m| vec![m])
            .ok_or_else(|| RegistryError::NotFound(format!("model {reference}")))
    }

    pub async fn revoke(
        &self,
        actor: &Actor,
        digest: &str,
        reason: &str,
    ) -> Result<Vec<ModelRecord>, RegistryError> {
        let digest = Sha256Hex::parse(digest).ok_or_else(|| {
            RegistryError::InvalidArgument(format!("`{digest}` is not a sha256 digest"))
        })?;
        if reason.trim().is_empty() {
            return Err(RegistryError::InvalidArgument(
                "a revocation needs a reason (--reason)".into(),
            ));
        }
        let event = audit(
            actor,
            "model.revoke",
            digest.as_str(),
            "success",
            json!({"reason": reason}),
        );
        self.store
            .revoke_artifact(
                digest.as_str(),
                reason,
                &actor.to_string(),
                now_unix(),
                event,
            )
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("artifact {digest}")))?;
        self.resolve(digest.as_str()).await
    }

    // ---- trust policy -------------------------------------------------------------------

    pub async fn policy(&self) -> Result<TrustPolicy, RegistryError> {
        Ok(TrustPolicy::load(&self.store).await?)
    }

    pub async fn add_anchor(
        &self,
        actor: &Actor,
        certificate_root: bool,
        pem: &str,
        identity: &str,
        name_pattern: &str,
        description: &str,
    ) -> Result<TrustAnchorRecord, RegistryError> {
        if name_pattern.trim().is_empty() {
            return Err(RegistryError::InvalidArgument(
                "a trust anchor needs a model-name pattern (`*` for all)".into(),
            ));
        }
        let fingerprint = anchor_fingerprint(pem, certificate_root)?;
        let record = TrustAnchorRecord {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            kind: if certificate_root {
                KIND_CERTIFICATE_ROOT
            } else {
                KIND_PUBLIC_KEY
            }
            .to_owned(),
            pem: pem.trim().to_owned() + "\n",
            identity: identity.trim().to_owned(),
            name_pattern: name_pattern.trim().to_owned(),
            description: description.to_owned(),
            fingerprint,
            created_at: now_unix(),
            created_by: actor.to_string(),
        };
        let event = audit(
            actor,
            "trust.anchor.add",
            &record.id,
            "success",
            json!({"kind": record.kind, "fingerprint": record.fingerprint,
                   "identity": record.identity, "name_pattern": record.name_pattern}),
        );
        self.store
            .insert_trust_anchor(record.clone(), event)
            .await?;
        Ok(record)
    }

    pub async fn remove_anchor(&self, actor: &Actor, id: &str) -> Result<(), RegistryError> {
        let event = audit(actor, "trust.anchor.remove", id, "success", json!({}));
        if !self.store.delete_trust_anchor(id, event).await? {
            return Err(RegistryError::NotFound(format!("trust anchor {id}")));
        }
        Ok(())
    }

    pub async fn allow_unsigned(
        &self,
        actor: &Actor,
        pattern: &str,
        reason: &str,
    ) -> Result<(), RegistryError> {
        if pattern.trim().is_empty() || reason.trim().is_empty() {
            return Err(RegistryError::InvalidArgument(
                "allowing unsigned models needs a name pattern and a reason".into(),
            ));
        }
        let event = audit(
            actor,
            "trust.unsigned.allow",
            pattern,
            "success",
            json!({"reason": reason}),
        );
        self.store
            .put_unsigned_allowance(
                UnsignedAllowanceRecord {
                    name_pattern: pattern.trim().to_owned(),
                    reason: reason.to_owned(),
                    created_at: now_unix(),
                    created_by: actor.to_string(),
                },
                event,
            )
            .await?;
        tracing::warn!(%actor, pattern, reason, "unsigned models allowed");
        Ok(())
    }

    pub async fn disallow_unsigned(
        &self,
        actor: &Actor,
        pattern: &str,
    ) -> Result<(), RegistryError> {
        let event = audit(
            actor,
            "trust.unsigned.disallow",
            pattern,
            "success",
            json!({}),
        );
        if !self.store.delete_unsigned_allowance(pattern, event).await? {
            return Err(RegistryError::NotFound(format!(
                "unsigned allowance for `{pattern}`"
            )));
        }
        Ok(())
    }
}

fn check_name(what: &str, value: &str, allow_slash: bool) -> Result<(), RegistryError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '+')
                || (allow_slash && c == '/')
        })
        && !value.starts_with(['.', '-', '/']);
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidArgument(format!(
            "{what} `{value}` must be 1-128 characters of letters, digits and `-_.+`{}",
            if allow_slash { " or `/`" } else { "" }
        )))
    }
}

/// Checks the anchor is usable and returns its fingerprint: for a key the same
/// `sha256:<hint>` a verified signature reports as its signer; for a root, sha256 of the
/// certificate (DER).
fn anchor_fingerprint(pem: &str, certificate: bool) -> Result<String, RegistryError> {
    use steward_artifact::signing::{TrustAnchor, key_fingerprint};
    let invalid = |e: steward_artifact::signing::SigningError| {
        RegistryError::InvalidArgument(format!(
            "unusable trust anchor: {}",
            steward_telemetry::chain(&e)
        ))
    };
    if !certificate {
        return key_fingerprint(pem).map_err(invalid);
    }
    TrustAnchor::CertificateRoot {
        pem: pem.to_owned(),
        identity: None,
    }
    .validate()
    .map_err(invalid)?;
    let der = steward_proto::transport::parse_certs(pem, "the root certificate")
        .map_err(|e| RegistryError::InvalidArgument(e.to_string()))?;
    Ok(format!(
        "sha256:{}",
        steward_proto::certificate_sha256_hex(&der[0])
    ))
}

/// The model and its signature in an import folder.
fn find_import_files(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), RegistryError> {
    let entries = std::fs::read_dir(dir).map_err(|source| {
        RegistryError::Blob(BlobError::Io {
            path: dir.to_owned(),
            source,
        })
    })?;
    let mut models = Vec::new();
    let mut signatures = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".gguf") {
            models.push(path);
        } else if name.ends_with(".sig")
            || name.ends_with(".sigstore")
            || name.ends_with(".sigstore.json")
        {
            signatures.push(path);
        }
    }
    match (models.len(), signatures.len()) {
        (1, 0) => Ok((models.remove(0), None)),
        (1, 1) => Ok((models.remove(0), Some(signatures.remove(0)))),
        (0, _) => Err(RegistryError::InvalidArgument(format!(
            "{} holds no .gguf file",
            dir.display()
        ))),
        (1, _) => Err(RegistryError::InvalidArgument(format!(
            "{} holds more than one signature file",
            dir.display()
        ))),
        _ => Err(RegistryError::InvalidArgument(format!(
            "{} holds more than one .gguf file; import one model per folder",
            dir.display()
        ))),
    }
}
