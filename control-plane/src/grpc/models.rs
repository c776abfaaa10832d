//! `steward.admin.v1.{ModelService, TrustService, AuditService}`.

use std::sync::Arc;

use steward_artifact::digest::Sha256Hex;
use steward_db::ModelRecord;
use steward_proto::admin::v1 as wire;
use steward_proto::admin::v1::audit_service_server::AuditService;
use steward_proto::admin::v1::model_service_server::ModelService;
use steward_proto::admin::v1::trust_service_server::TrustService;
use steward_proto::admin::v1::{export_audit_response, push_model_request};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::authorize;
use crate::blobs::BlobError;
use crate::deployments::Deployments;
use crate::fleet::Fleet;
use crate::registry::{PushHeader, Registry, RegistryError};
use crate::trust::{KIND_CERTIFICATE_ROOT, TrustPolicy};

pub(crate) fn status(err: &RegistryError) -> Status {
    let message = steward_telemetry::chain(err).to_string();
    match err {
        RegistryError::InvalidArgument(_)
        | RegistryError::Gguf(_)
        | RegistryError::Blob(BlobError::TooLarge { .. } | BlobError::SizeMismatch { .. }) => {
            Status::invalid_argument(message)
        }
        RegistryError::Policy(_) => Status::permission_denied(message),
        RegistryError::Conflict(_) => Status::already_exists(message),
        RegistryError::NotFound(_) => Status::not_found(message),
        RegistryError::Blob(_) | RegistryError::Db(_) => {
            tracing::error!(error = %message, "registry request failed");
            Status::internal(message)
        }
    }
}

pub fn model(record: ModelRecord) -> wire::Model {
    let facts: Option<steward_artifact::gguf::GgufFacts> =
        serde_json::from_str(&record.artifact.gguf_facts_json).ok();
    wire::Model {
        name: record.name,
        version: record.version,
        digest: record.artifact.digest,
        size_bytes: record.artifact.size_bytes,
        file_name: record.artifact.file_name,
        signer: record.artifact.signer,
        verification: record.artifact.verification,
        gguf: facts.map(|f| wire::GgufFacts {
            architecture: f.architecture,
            model_name: f.name.unwrap_or_default(),
            parameter_count: f.parameter_count,
            quantization: f.quantization,
            context_length: f.context_length.unwrap_or(0),
            layer_count: f.block_count.unwrap_or(0),
            estimated_load_bytes: f.estimated_load_bytes,
            gguf_version: f.version,
            tensor_count: f.tensor_count,
            has_chat_template: f.has_chat_template,
        }),
        created_at_unix: record.created_at,
        created_by: record.created_by,
        revoked: record.artifact.revoked_at.is_some(),
        revoked_reason: record.artifact.revoked_reason.unwrap_or_default(),
        revoked_at_unix: record.artifact.revoked_at.unwrap_or(0),
    }
}

fn policy(p: TrustPolicy) -> wire::TrustPolicy {
    wire::TrustPolicy {
        anchors: p.anchors.into_iter().map(anchor).collect(),
        unsigned_allowed: p
            .unsigned
            .into_iter()
            .map(|a| wire::UnsignedAllowance {
                name_pattern: a.name_pattern,
                reason: a.reason,
                created_at_unix: a.created_at,
                created_by: a.created_by,
            })
            .collect(),
    }
}

fn anchor(a: steward_db::TrustAnchorRecord) -> wire::TrustAnchor {
    wire::TrustAnchor {
        kind: if a.kind == KIND_CERTIFICATE_ROOT {
            wire::TrustAnchorKind::CertificateRoot
        } else {
            wire::TrustAnchorKind::PublicKey
        } as i32,
        id: a.id,
        pem: a.pem,
        identity: a.identity,
        name_pattern: a.name_pattern,
        description: a.description,
        fingerprint: a.fingerprint,
        created_at_unix: a.created_at,
        created_by: a.created_by,
    }
}

#[derive(Debug)]
pub struct ModelApi {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    deployments: Arc<Deployments>,
}

impl ModelApi {
    pub fn new(fleet: Arc<Fleet>, registry: Arc<Registry>, deployments: Arc<Deployments>) -> Self {
        Self {
            fleet,
            registry,
            deployments,
        }
    }

    /// Streams the bytes after the header into the blob store and lets the registry decide.
    /// A refusal carries the digest of the bytes when they were all received.
    async fn receive(
        &self,
        actor: &crate::fleet::Actor,
        header: &PushHeader,
        stream: &mut Streaming<wire::PushModelRequest>,
    ) -> Result<ModelRecord, (RegistryError, Option<Sha256Hex>)> {
        let no_digest = |e: RegistryError| (e, None);
        let started = std::time::Instant::now();
        self.registry.check_header(header).map_err(no_digest)?;
        let mut upload = self
            .registry
            .blobs
            .begin(header.size_bytes)
            .await
            .map_err(|e| no_digest(e.into()))?;
        let mut probe = steward_artifact::gguf::stream::GgufProbe::start(
            header.size_bytes,
            self.registry.gguf_limits().clone(),
        );
        while let Some(message) = stream.message().await.map_err(|e| {
            no_digest(RegistryError::InvalidArgument(format!(
                "upload interrupted: {}",
                e.message()
            )))
        })? {
            let Some(push_model_request::Body::Chunk(chunk)) = message.body else {
                return Err(no_digest(RegistryError::InvalidArgument(
                    "only data chunks may follow the header".into(),
                )));
            };
            upload
                .write(&chunk)
                .await
                .map_err(|e| no_digest(e.into()))?;
            probe.feed(chunk).await;
        }
        let received = started.elapsed();
        let staged = upload
            .finish(header.size_bytes)
            .await
            .map_err(|e| no_digest(e.into()))?;
        tracing::debug!(
            bytes = staged.size,
            received_ms = received.as_millis() as u64,
            synced_ms = (started.elapsed() - received).as_millis() as u64,
            "upload staged"
        );
        let digest = staged.digest.clone();
        let streamed = probe.finish().await;
        self.registry
            .accept(actor, header, staged, streamed)
            .await
            .map_err(|e| (e, Some(digest)))
    }
}

#[tonic::async_trait]
impl ModelService for ModelApi {
    async fn push_model(
        &self,
        request: Request<Streaming<wire::PushModelRequest>>,
    ) -> Result<Response<wire::Model>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(wire::PushModelRequest {
                body: Some(push_model_request::Body::Header(h)),
            }) => PushHeader {
                name: h.name,
                version: h.version,
                file_name: h.file_name,
                size_bytes: h.size_bytes,
                signature_bundle: h.signature_bundle,
            },
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a push must be its header",
                ));
            }
        };
        let target = format!("{}@{}", header.name, header.version);
        match self.receive(&actor, &header, &mut stream).await {
            Ok(model_record) => Ok(Response::new(model(model_record))),
            Err((error, digest)) => {
                self.registry
                    .audit_refusal(&actor, "model.push", &target, &error, digest.as_ref())
                    .await;
                Err(status(&error))
            }
        }
    }

    async fn import_model(
        &self,
        request: Request<wire::ImportModelRequest>,
    ) -> Result<Response<wire::Model>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let req = request.into_inner();
        let target = format!("{}@{}", req.name, req.version);
        match self
            .registry
            .import_dir(
                &actor,
                std::path::Path::new(&req.path),
                &req.name,
                &req.version,
            )
            .await
        {
            Ok(m) => Ok(Response::new(model(m))),
            Err(e) => {
                self.registry
                    .audit_refusal(&actor, "model.import", &target, &e, None)
                    .await;
                Err(status(&e))
            }
        }
    }

    async fn list_models(
        &self,
        request: Request<wire::ListModelsRequest>,
    ) -> Result<Response<wire::ListModelsResponse>, Status> {
        authorize(&self.fleet.store, &request).await?;
        let models = self.registry.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(wire::ListModelsResponse {
            models: models.into_iter().map(model).collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<wire::ModelRef>,
    ) -> Result<Response<wire::Model>, Status> {
        authorize(&self.fleet.store, &request).await?;
        let mut found = self
            .registry
            .resolve(request.get_ref().model.trim())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(model(found.remove(0))))
    }

    async fn revoke_model(
        &self,
        request: Request<wire::RevokeModelRequest>,
    ) -> Result<Response<wire::Model>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let req = request.into_inner();
        let mut revoked = self
            .registry
            .revoke(&actor, req.digest.trim(), &req.reason)
            .await
            .map_err(|e| status(&e))?;
        // Every agent stops serving it and deletes it with the desired state sent now,
        // also where it is only cached or pinned by a rollout.
        self.deployments.replace_now_telling_every_agent().await;
        Ok(Response::new(model(revoked.remove(0))))
    }
}

#[derive(Debug)]
pub struct TrustApi {
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    deployments: Arc<Deployments>,
}

impl TrustApi {
    pub fn new(fleet: Arc<Fleet>, registry: Arc<Registry>, deployments: Arc<Deployments>) -> Self {
        Self {
            fleet,
            registry,
            deployments,
        }
    }

    /// The policy after a change; deployments it no longer trusts are re-placed.
    async fn changed(&self) -> Result<Response<wire::TrustPolicy>, Status> {
        self.deployments.trigger();
        self.current().await
    }

    async fn current(&self) -> Result<Response<wire::TrustPolicy>, Status> {
        let p = self.registry.policy().await.map_err(|e| status(&e))?;
        Ok(Response::new(policy(p)))
    }
}

#[tonic::async_trait]
impl TrustService for TrustApi {
    async fn get_trust_policy(
        &self,
        request: Request<wire::GetTrustPolicyRequest>,
    ) -> Result<Response<wire::TrustPolicy>, Status> {
        authorize(&self.fleet.store, &request).await?;
        self.current().await
    }

    async fn add_trust_anchor(
        &self,
        request: Request<wire::AddTrustAnchorRequest>,
    ) -> Result<Response<wire::TrustAnchor>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let req = request.into_inner();
        let certificate_root = match wire::TrustAnchorKind::try_from(req.kind) {
            Ok(wire::TrustAnchorKind::PublicKey) => false,
            Ok(wire::TrustAnchorKind::CertificateRoot) => true,
            _ => {
                return Err(Status::invalid_argument(
                    "trust anchor kind must be public key or certificate root",
                ));
            }
        };
        let record = self
            .registry
            .add_anchor(
                &actor,
                certificate_root,
                &req.pem,
                &req.identity,
                &req.name_pattern,
                &req.description,
            )
            .await
            .map_err(|e| status(&e))?;
        self.deployments.trigger();
        Ok(Response::new(anchor(record)))
    }

    async fn remove_trust_anchor(
        &self,
        request: Request<wire::RemoveTrustAnchorRequest>,
    ) -> Result<Response<wire::TrustPolicy>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        self.registry
            .remove_anchor(&actor, request.get_ref().id.trim())
            .await
            .map_err(|e| status(&e))?;
        self.changed().await
    }

    async fn allow_unsigned(
        &self,
        request: Request<wire::AllowUnsignedRequest>,
    ) -> Result<Response<wire::TrustPolicy>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let req = request.get_ref();
        self.registry
            .allow_unsigned(&actor, &req.name_pattern, &req.reason)
            .await
            .map_err(|e| status(&e))?;
        self.changed().await
    }

    async fn disallow_unsigned(
        &self,
        request: Request<wire::DisallowUnsignedRequest>,
    ) -> Result<Response<wire::TrustPolicy>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        self.registry
            .disallow_unsigned(&actor, request.get_ref().name_pattern.trim())
            .await
            .map_err(|e| status(&e))?;
        self.changed().await
    }
}

#[derive(Debug)]
pub struct AuditApi {
    fleet: Arc<Fleet>,
}

impl AuditApi {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    type ExportAuditStream = ReceiverStream<Result<wire::ExportAuditResponse, Status>>;

    async fn export_audit(
        &self,
        request: Request<wire::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let req = request.into_inner();
        let (events, manifest) = crate::audit_export::export(
            &self.fleet.store,
            &self.fleet.ca,
            req.since_unix,
            req.until_unix,
        )
        .await
        .map_err(|e| Status::internal(steward_telemetry::chain(&e).to_string()))?;
        tracing::info!(%actor, count = events.len(), "audit exported");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            for event in &events {
                let message = wire::ExportAuditResponse {
                    body: Some(export_audit_response::Body::Event(
                        crate::audit_export::wire_event(event),
                    )),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(Ok(wire::ExportAuditResponse {
                    body: Some(export_audit_response::Body::Manifest(manifest)),
                }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
