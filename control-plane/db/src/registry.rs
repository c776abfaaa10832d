//! Storage for the model registry, the trust policy and audit export.

use std::collections::HashMap;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
};

use crate::entity::{artifact, audit_event, model_version, node, trust_anchor, unsigned_allowance};
use crate::records::*;
use crate::store::{DbError, Store, audit_record};

fn artifact_record(m: artifact::Model) -> ArtifactRecord {
    ArtifactRecord {
        digest: m.digest,
        size_bytes: m.size_bytes.max(0) as u64,
        file_name: m.file_name,
        gguf_facts_json: m.gguf_facts,
        signature_bundle: m.signature_bundle,
        signer: m.signer,
        verification: m.verification,
        created_at: m.created_at,
        created_by: m.created_by,
        revoked_at: m.revoked_at,
        revoked_reason: m.revoked_reason,
        revoked_by: m.revoked_by,
    }
}

fn model_record(v: model_version::Model, artifact: ArtifactRecord) -> ModelRecord {
    ModelRecord {
        name: v.name,
        version: v.version,
        created_at: v.created_at,
        created_by: v.created_by,
        artifact,
    }
}

fn anchor_record(m: trust_anchor::Model) -> TrustAnchorRecord {
    TrustAnchorRecord {
        id: m.id,
        kind: m.kind,
        pem: m.pem,
        identity: m.identity,
        name_pattern: m.name_pattern,
        description: m.description,
        fingerprint: m.fingerprint,
        created_at: m.created_at,
        created_by: m.created_by,
    }
}

impl Store {
    /// Stores an artifact (once per digest) and names it `name@version`, atomically, with
    /// its audit event. Registering the same name, version and digest again is a no-op.
    pub async fn register_model(
        &self,
        artifact: ArtifactRecord,
        name: &str,
        version: &str,
        audit: NewAuditEvent,
    ) -> Result<Result<ModelRecord, RegisterConflict>, DbError> {
        let txn = self.begin_audited().await?;
        if let Some(existing) =
            model_version::Entity::find_by_id((name.to_owned(), version.to_owned()))
                .one(&*txn)
                .await?
        {
            if existing.digest != artifact.digest {
                return Ok(Err(RegisterConflict::VersionTaken {
                    name: name.to_owned(),
                    version: version.to_owned(),
                    existing_digest: existing.digest,
                }));
            }
            let stored = artifact::Entity::find_by_id(existing.digest.clone())
                .one(&*txn)
                .await?
                .ok_or_else(|| DbError::NotFound(format!("artifact {}", existing.digest)))?;
            return Ok(Ok(model_record(existing, artifact_record(stored))));
        }
        let stored = match artifact::Entity::find_by_id(artifact.digest.clone())
            .one(&*txn)
            .await?
        {
            Some(stored) => stored,
            None => {
                artifact::ActiveModel {
                    digest: Set(artifact.digest.clone()),
                    size_bytes: Set(i64::try_from(artifact.size_bytes).unwrap_or(i64::MAX)),
                    file_name: Set(artifact.file_name.clone()),
                    gguf_facts: Set(artifact.gguf_facts_json.clone()),
                    signature_bundle: Set(artifact.signature_bundle.clone()),
                    signer: Set(artifact.signer.clone()),
                    verification: Set(artifact.verification.clone()),
                    created_at: Set(artifact.created_at),
                    created_by: Set(artifact.created_by.clone()),
                    revoked_at: Set(None),
                    revoked_reason: Set(None),
                    revoked_by: Set(None),
                }
                .insert(&*txn)
                .await?
            }
        };
        let version_row = model_version::ActiveModel {
            name: Set(name.to_owned()),
            version: Set(version.to_owned()),
            digest: Set(artifact.digest.clone()),
            created_at: Set(artifact.created_at),
            created_by: Set(artifact.created_by.clone()),
        }
        .insert(&*txn)
        .await?;
        txn.commit(Some(audit)).await?;
        Ok(Ok(model_record(version_row, artifact_record(stored))))
    }

    pub async fn find_artifact(&self, digest: &str) -> Result<Option<ArtifactRecord>, DbError> {
        Ok(artifact::Entity::find_by_id(digest)
            .one(&self.db)
            .await?
            .map(artifact_record))
    }

    pub async fn find_model_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ModelRecord>, DbError> {
        let Some(v) = model_version::Entity::find_by_id((name.to_owned(), version.to_owned()))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let artifact = self
            .find_artifact(&v.digest)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("artifact {}", v.digest)))?;
        Ok(Some(model_record(v, artifact)))
    }

    /// Every named version with its artifact, by name then version.
    pub async fn list_models(&self) -> Result<Vec<ModelRecord>, DbError> {
        let artifacts: HashMap<String, ArtifactRecord> = artifact::Entity::find()
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| (m.digest.clone(), artifact_record(m)))
            .collect();
        model_version::Entity::find()
            .order_by_asc(model_version::Column::Name)
            .order_by_asc(model_version::Column::Version)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|v| {
                let artifact = artifacts
                    .get(&v.digest)
                    .cloned()
                    .ok_or_else(|| DbError::NotFound(format!("artifact {}", v.digest)))?;
                Ok(model_record(v, artifact))
            })
            .collect()
    }

    /// Names and versions that point at `digest`.
    pub async fn versions_of(&self, digest: &str) -> Result<Vec<ModelRecord>, DbError> {
        let Some(artifact) = self.find_artifact(digest).await? else {
            return Ok(Vec::new());
        };
        Ok(model_version::Entity::find()
            .filter(model_version::Column::Digest.eq(digest))
            .order_by_asc(model_version::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|v| model_record(v, artifact.clone()))
            .collect())
    }

    /// Marks an artifact revoked. Revoking twice keeps the first reason and audits once.
    pub async fn revoke_artifact(
        &self,
        digest: &str,
        reason: &str,
        by: &str,
        now: UnixSeconds,
        audit: NewAuditEvent,
    ) -> Result<Option<ArtifactRecord>, DbError> {
        let txn = self.begin_audited().await?;
        let changed = artifact::Entity::update_many()
            .col_expr(artifact::Column::RevokedAt, Expr::value(now))
            .col_expr(artifact::Column::RevokedReason, Expr::value(reason))
            .col_expr(artifact::Column::RevokedBy, Expr::value(by))
            .filter(artifact::Column::Digest.eq(digest))
            .filter(artifact::Column::RevokedAt.is_null())
            .exec(&*txn)
            .await?
            .rows_affected;
        if changed == 1 {
            // Every node's desired state lists the revoked digests, so every node's changes:
            // a desired state computed before this revocation then reads as older and the
            // agent ignores it when it arrives after the one that carries the revocation.
            node::Entity::update_many()
                .col_expr(
                    node::Column::DesiredGeneration,
                    sea_orm::sea_query::ExprTrait::add(
                        Expr::col(node::Column::DesiredGeneration),
                        1,
                    ),
                )
                .exec(&*txn)
                .await?;
        }
        let audit = (changed == 1).then_some(audit);
        let stored = artifact::Entity::find_by_id(digest).one(&*txn).await?;
        txn.commit(audit).await?;
        Ok(stored.map(artifact_record))
    }

    /// Digests of every revoked artifact, for agents to delete and refuse.
    pub async fn revoked_artifact_digests(&self) -> Result<Vec<String>, DbError> {
        Ok(artifact::Entity::find()
            .filter(artifact::Column::RevokedAt.is_not_null())
            .order_by_asc(artifact::Column::Digest)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|a| a.digest)
            .collect())
    }

    // ---- trust policy ------------------------------------------------------------------

    pub async fn list_trust_anchors(&self) -> Result<Vec<TrustAnchorRecord>, DbError> {
        Ok(trust_anchor::Entity::find()
            .order_by_asc(trust_anchor::Column::CreatedAt)
            .order_by_asc(trust_anchor::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(anchor_record)
            .collect())
    }

    pub async fn insert_trust_anchor(
        &self,
        anchor: TrustAnchorRecord,
        audit: NewAuditEvent,
    ) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        trust_anchor::ActiveModel {
            id: Set(anchor.id),
            kind: Set(anchor.kind),
            pem: Set(anchor.pem),
            identity: Set(anchor.identity),
            name_pattern: Set(anchor.name_pattern),
            description: Set(anchor.description),
            fingerprint: Set(anchor.fingerprint),
            created_at: Set(anchor.created_at),
            created_by: Set(anchor.created_by),
        }
        .insert(&*txn)
        .await?;
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    /// Removes an anchor; returns whether it existed.
    pub async fn delete_trust_anchor(
        &self,
        id: &str,
        audit: NewAuditEvent,
    ) -> Result<bool, DbError> {
        let txn = self.begin_audited().await?;
        let deleted = trust_anchor::Entity::delete_by_id(id)
            .exec(&*txn)
            .await?
            .rows_affected;
        let audit = (deleted > 0).then_some(audit);
        txn.commit(audit).await?;
        Ok(deleted > 0)
    }

    pub async fn list_unsigned_allowances(&self) -> Result<Vec<UnsignedAllowanceRecord>, DbError> {
        Ok(unsigned_allowance::Entity::find()
            .order_by_asc(unsigned_allowance::Column::NamePattern)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| UnsignedAllowanceRecord {
                name_pattern: m.name_pattern,
                reason: m.reason,
                created_at: m.created_at,
                created_by: m.created_by,
            })
            .collect())
    }

    /// Adds or replaces the allowance for a pattern.
    pub async fn put_unsigned_allowance(
        &self,
        allowance: UnsignedAllowanceRecord,
        audit: NewAuditEvent,
    ) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        unsigned_allowance::Entity::delete_by_id(allowance.name_pattern.clone())
            .exec(&*txn)
            .await?;
        unsigned_allowance::ActiveModel {
            name_pattern: Set(allowance.name_pattern),
            reason: Set(allowance.reason),
            created_at: Set(allowance.created_at),
            created_by: Set(allowance.created_by),
        }
        .insert(&*txn)
        .await?;
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    pub async fn delete_unsigned_allowance(
        &self,
        pattern: &str,
        audit: NewAuditEvent,
    ) -> Result<bool, DbError> {
        let txn = self.begin_audited().await?;
        let deleted = unsigned_allowance::Entity::delete_by_id(pattern.to_owned())
            .exec(&*txn)
            .await?
            .rows_affected;
        let audit = (deleted > 0).then_some(audit);
        txn.commit(audit).await?;
        Ok(deleted > 0)
    }

    // ---- audit export ------------------------------------------------------------------

    /// The contiguous run of events from the first at or after `since` to the last at or
    /// before `until` (0 = unbounded), in chain order. Contiguous by `seq` even if the clock
    /// stepped backwards in between, so an export always verifies as one unbroken chain.
    pub async fn audit_events_between(
        &self,
        since: UnixSeconds,
        until: UnixSeconds,
    ) -> Result<Vec<AuditRecord>, DbError> {
        let mut first = audit_event::Entity::find().order_by_asc(audit_event::Column::Seq);
        if since > 0 {
            first = first.filter(audit_event::Column::At.gte(since));
        }
        let mut last = audit_event::Entity::find().order_by_desc(audit_event::Column::Seq);
        if until > 0 {
            last = last.filter(audit_event::Column::At.lte(until));
        }
        let (Some(first), Some(last)) = (first.one(&self.db).await?, last.one(&self.db).await?)
        else {
            return Ok(Vec::new());
        };
        if first.seq > last.seq {
            return Ok(Vec::new());
        }
        Ok(audit_event::Entity::find()
            .filter(audit_event::Column::Seq.gte(first.seq))
            .filter(audit_event::Column::Seq.lte(last.seq))
            .order_by_asc(audit_event::Column::Seq)
            .all(&self.db)
            .await?
            .into_iter()
            .map(audit_record)
            .collect())
    }
}
