//! Storage for deployments, node labels and each node's assigned models.

use sea_orm::sea_query::{Expr, ExprTrait as _};
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
};

use crate::entity::{deployment, node};
use crate::records::*;
use crate::store::{DbError, Store, node_record};

fn deployment_record(m: deployment::Model) -> Result<DeploymentRecord, DbError> {
    let rollout = if m.rollout.is_empty() {
        None
    } else {
        Some(
            serde_json::from_str(&m.rollout).map_err(|e| DbError::Corrupt {
                what: "deployment rollout",
                detail: format!("deployment `{}`: {e}", m.name),
            })?,
        )
    };
    Ok(DeploymentRecord {
        name: m.name,
        model_name: m.model_name,
        model_version: m.model_version,
        digest: m.digest,
        selector: m.selector,
        replicas: u32::try_from(m.replicas).unwrap_or(0),
        slots: u32::try_from(m.slots).unwrap_or(0),
        context_per_slot: u32::try_from(m.context_per_slot).unwrap_or(0),
        gpu_layers: m.gpu_layers,
        created_at: m.created_at,
        updated_at: m.updated_at,
        created_by: m.created_by,
        max_unavailable: u32::try_from(m.max_unavailable).unwrap_or(1),
        rollout,
    })
}

fn active(d: &DeploymentRecord) -> Result<deployment::ActiveModel, DbError> {
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    let rollout = match &d.rollout {
        None => String::new(),
        Some(r) => serde_json::to_string(r).map_err(|e| DbError::Corrupt {
            what: "deployment rollout",
            detail: e.to_string(),
        })?,
    };
    Ok(deployment::ActiveModel {
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
        max_unavailable: Set(int(d.max_unavailable)),
        rollout: Set(rollout),
    })
}

impl Store {
    pub async fn list_deployments(&self) -> Result<Vec<DeploymentRecord>, DbError> {
        deployment::Entity::find()
            .order_by_asc(deployment::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(deployment_record)
            .collect()
    }

    pub async fn get_deployment(&self, name: &str) -> Result<Option<DeploymentRecord>, DbError> {
        deployment::Entity::find_by_id(name)
            .one(&self.db)
            .await?
            .map(deployment_record)
            .transpose()
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
        let stored = active(record)?.insert(&*txn).await?;
        txn.commit(Some(audit)).await?;
        deployment_record(stored)
    }

    /// Replaces an existing deployment with its audit events (in order).
    pub async fn update_deployment(
        &self,
        record: &DeploymentRecord,
        audit: Vec<NewAuditEvent>,
    ) -> Result<DeploymentRecord, DbError> {
        let txn = self.begin_audited().await?;
        if deployment::Entity::find_by_id(record.name.as_str())
            .one(&*txn)
            .await?
            .is_none()
        {
            return Err(DbError::NotFound(format!("deployment `{}`", record.name)));
        }
        let stored = active(record)?.update(&*txn).await?;
        txn.commit_all(audit).await?;
        deployment_record(stored)
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

    /// Replaces a node's labels with its audit event. Writes before it reads, so on SQLite
    /// the transaction holds the write lock from its first statement (a read-then-write
    /// transaction fails with `SQLITE_BUSY_SNAPSHOT` when another writer commits between).
    pub async fn set_node_labels(
        &self,
        id: &str,
        labels: &std::collections::BTreeMap<String, String>,
        audit: NewAuditEvent,
    ) -> Result<NodeRecord, DbError> {
        let json = serde_json::to_string(labels).map_err(|e| DbError::Corrupt {
            what: "node labels",
            detail: e.to_string(),
        })?;
        let txn = self.begin_audited().await?;
        let changed = node::Entity::update_many()
            .col_expr(node::Column::Labels, Expr::value(json))
            .filter(node::Column::Id.eq(id))
            .exec(&*txn)
            .await?
            .rows_affected;
        if changed == 0 {
            return Err(DbError::NotFound(format!("node {id}")));
        }
        let updated = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        txn.commit(Some(audit)).await?;
        node_record(updated)
    }

    /// Sets a node's assigned models. When they differ from what is stored, the desired
    /// generation is bumped in the same write (with the audit event) and the updated node
    /// is returned; otherwise `None` and nothing is written. Writes first, as above.
    pub async fn set_node_desired_models(
        &self,
        id: &str,
        models: &[AssignedModel],
        audit: NewAuditEvent,
    ) -> Result<Option<NodeRecord>, DbError> {
        let json = serde_json::to_string(models).map_err(|e| DbError::Corrupt {
            what: "node desired models",
            detail: e.to_string(),
        })?;
        let txn = self.begin_audited().await?;
        let changed = node::Entity::update_many()
            .col_expr(node::Column::DesiredModels, Expr::value(json.clone()))
            .col_expr(
                node::Column::DesiredGeneration,
                Expr::col(node::Column::DesiredGeneration).add(1),
            )
            .filter(node::Column::Id.eq(id))
            .filter(node::Column::DesiredModels.ne(json))
            .exec(&*txn)
            .await?
            .rows_affected;
        if changed == 0 {
            txn.commit(None).await?;
            return Ok(None);
        }
        let updated = node::Entity::find_by_id(id)
            .one(&*txn)
            .await?
            .ok_or_else(|| DbError::NotFound(format!("node {id}")))?;
        txn.commit(Some(audit)).await?;
        node_record(updated).map(Some)
    }
}
