//! Storage for deployments, node labels and each node's assigned models.

use sea_orm::{ActiveModelTrait, ActiveValue::Set, EntityTrait, QueryOrder};

use crate::entity::{deployment, node};
use crate::records::*;
use crate::store::{DbError, Store, node_record};

fn deployment_record(m: deployment::Model) -> DeploymentRecord {
    DeploymentRecord {
        name: m.name,
        model_name: m.model_name,
        model_version: m.model_version,
        digest: m.digest,
        selector: m.selector,
        replicas: m.replicas.max(0) as u32,
        slots: m.slots.max(0) as u32,
        context_per_slot: m.context_per_slot.max(0) as u32,
        gpu_layers: m.gpu_layers,
        created_at: m.created_at,
        updated_at: m.updated_at,
        created_by: m.created_by,
    }
}

fn active(d: &DeploymentRecord) -> deployment::ActiveModel {
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    deployment::ActiveModel {
        name: Set(d.name.clone()),
        model_name: Set(d.model_name.clone()),
        model_version: Set(d.model_version.clone()),
        digest: Set(d.digest.clone()),
        selector: Set(d.selector.clone()),
        replicas: Set(int(d.replicas)),
        slots: Set(int(d.slots)),
        context_per_slot: Set(int(d.context_per_slot)),
        gpu_layers: Set(d.gpu_layers),
        created_at: Set(d.created_at),
        updated_at: Set(d.updated_at),
        created_by: Set(d.created_by.clone()),
    }
}

impl Store {
    pub async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>, DbError> {
        Ok(deployment::Entity::find()
            .order_by_asc(deployment::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(deployment_record)
            .collect())
    }

    pub async fn get_deployment(&self, name: &str) -> Result<Option<DeploymentRecord>, DbError> {
        Ok(deployment::Entity::find_by_id(name)
            .one(&self.db)
            .await?
            .map(deployment_record))
    }

    /// Inserts a new deployment with its audit event; `Conflict` if the name is taken.
    pub async fn insert_deployment(
        &self,
        record: &DeploymentRecord,
        audit: NewAuditEvent,
    ) -> Result<DeploymentRecord, DbError> {
        let txn = self.begin_audited().await?;
        if deployment::Entity::find_by_id(record.name.as_str())
            .one(&*txn)
            .await?
            .is_some()
        {
            return Err(DbError::Conflict(format!(
                "deployment `{}` already exists",
                record.name
            )));
        }
        let stored = active(record).insert(&*txn).await?;
        txn.commit(Some(audit)).await?;
        Ok(deployment_record(stored))
    }

    /// Replaces an existing deployment with its audit event.
    pub async fn update_deployment(
        &self,
        record: &DeploymentRecord,
        audit: NewAuditEvent,
    ) -> Result<DeploymentRecord, DbError> {
        let txn = self.begin_audited().await?;
        if deployment::Entity::find_by_id(record.name.as_str())
            .one(&*txn)
            .await?
            .is_none()
        {
            return Err(DbError::NotFound(format!("deployment `{}`", record.name)));
        }
        let stored = active(record).update(&*txn).await?;
        txn.commit(Some(audit)).await?;
        Ok(deployment_record(stored))
    }

    pub async fn delete_deployment(&self, name: &str, audit: NewAuditEvent) -> Result<(), DbError> {
        let txn = self.begin_audited().await?;
        let deleted = deployment::Entity::delete_by_id(name)
            .exec(&*txn)
            .await?
            .rows_affected;
        if deleted == 0 {
            return Err(DbError::NotFound(format!("deployment `{name}`")));
        }
        txn.commit(Some(audit)).await?;
        Ok(())
    }

    /// Replaces a node's labels with its audit event.
    pub async fn set_node_labels(
        &self,
        id: &str,
        labels: &std::collections::BTreeMap<String, String>,
        audit: NewAuditEvent,
    ) -> Result<NodeRecord, DbError> {
        let txn = self.begin_audited().await?;
        let current = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        let mut model: node::ActiveModel = current.into();
        model.labels = Set(serde_json::to_string(labels).map_err(|e| DbError::Corrupt {
            what: "node labels",
            detail: e.to_string(),
        })?);
        let updated = model.update(&*txn).await?;
        txn.commit(Some(audit)).await?;
        node_record(updated)
    }

    /// Sets a node's assigned models. When they differ from what is stored, the desired
    /// generation is bumped in the same write (with the audit event) and the updated node
    /// is returned; otherwise `None` and nothing is written.
    pub async fn set_node_desired_models(
        &self,
        id: &str,
        models: &[AssignedModel],
        audit: NewAuditEvent,
    ) -> Result<Option<NodeRecord>, DbError> {
        let txn = self.begin_audited().await?;
        let current = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        let json = serde_json::to_string(models).map_err(|e| DbError::Corrupt {
            what: "node desired models",
            detail: e.to_string(),
        })?;
        let stored: Vec<AssignedModel> =
            serde_json::from_str(&current.desired_models).unwrap_or_default();
        if stored == models {
            return Ok(None);
        }
        let generation = current.desired_generation + 1;
        let mut model: node::ActiveModel = current.into();
        model.desired_models = Set(json);
        model.desired_generation = Set(generation);
        let updated = model.update(&*txn).await?;
        txn.commit(Some(audit)).await?;
        node_record(updated).map(Some)
    }
}
