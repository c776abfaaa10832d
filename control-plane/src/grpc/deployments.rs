//! `steward.admin.v1.DeploymentService`.

use std::sync::Arc;

use steward_proto::admin::v1 as wire;
use steward_proto::admin::v1::deployment_service_server::DeploymentService;
use tonic::{Request, Response, Status};

use super::auth::authorize;
use crate::deployments::{DeployError, DeploymentSpec, DeploymentStatus, Deployments};
use crate::fleet::Fleet;
use steward_db::RolloutPhase;

fn status(err: &DeployError) -> Status {
    let message = steward_telemetry::chain(err).to_string();
    match err {
        DeployError::InvalidArgument(_) => Status::invalid_argument(message),
        DeployError::NotFound(_) => Status::not_found(message),
        DeployError::AlreadyExists(_) => Status::already_exists(message),
        DeployError::Refused { .. } | DeployError::FailedPrecondition(_) => {
            Status::failed_precondition(message)
        }
        DeployError::Registry(e) => super::models::status(e),
        DeployError::Fleet(_) | DeployError::Db(_) => {
            tracing::error!(error = %message, "deployment request failed");
            Status::internal(message)
        }
    }
}

pub fn deployment(d: DeploymentStatus) -> wire::Deployment {
    let r = d.record;
    let rollout = r.rollout.as_ref().map(|rollout| wire_rollout(&r, rollout));
    wire::Deployment {
        name: r.name,
        model_name: r.model_name,
        model_version: r.model_version,
        digest: r.digest,
        selector: r.selector,
        replicas: r.replicas,
        slots: r.slots,
        context_per_slot: r.context_per_slot,
        gpu_layers: r.gpu_layers,
        created_at_unix: r.created_at,
        updated_at_unix: r.updated_at,
        created_by: r.created_by,
        placed: d
            .replicas
            .into_iter()
            .map(|p| wire::Replica {
                node_id: p.node_id,
                node_name: p.node_name,
                digest: p.digest,
                status: p.model,
            })
            .collect(),
        missing_replicas: d.missing_replicas,
        unschedulable_reasons: d.unschedulable_reasons,
        max_unavailable: r.max_unavailable,
        rollout,
    }
}

fn wire_rollout(d: &steward_db::DeploymentRecord, r: &steward_db::Rollout) -> wire::Rollout {
    let (from_settings, to_settings) = crate::rollout::settings_of(d, r);
    let r = r.clone();
    let phase = match r.phase {
        RolloutPhase::Progressing => wire::RolloutPhase::Progressing,
        RolloutPhase::Complete => wire::RolloutPhase::Complete,
        RolloutPhase::RolledBack => wire::RolloutPhase::RolledBack,
        RolloutPhase::RollingBack => wire::RolloutPhase::RollingBack,
    };
    wire::Rollout {
        phase: phase as i32,
        from_model: r.from.to_string(),
        from_digest: r.from.digest,
        to_model: r.to.to_string(),
        to_digest: r.to.digest,
        started_at_unix: r.started_at,
        finished_at_unix: r.finished_at.unwrap_or(0),
        started_by: r.started_by,
        steps: r
            .steps
            .into_iter()
            .map(|(node_id, s)| wire::RolloutStep {
                node_id,
                node_name: s.node_name,
                started_at_unix: s.started_at,
                verified_at_unix: s.verified_at.unwrap_or(0),
            })
            .collect(),
        message: r.message,
        from_settings: from_settings.to_string(),
        to_settings: to_settings.to_string(),
    }
}

#[derive(Debug)]
pub struct DeploymentApi {
    fleet: Arc<Fleet>,
    deployments: Arc<Deployments>,
}

impl DeploymentApi {
    pub fn new(fleet: Arc<Fleet>, deployments: Arc<Deployments>) -> Self {
        Self { fleet, deployments }
    }
}

fn nonzero(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

#[tonic::async_trait]
impl DeploymentService for DeploymentApi {
    async fn create_deployment(
        &self,
        request: Request<wire::CreateDeploymentRequest>,
    ) -> Result<Response<wire::Deployment>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let r = request.into_inner();
        let spec = DeploymentSpec {
            model: Some(r.model),
            selector: (!r.selector.trim().is_empty()).then_some(r.selector),
            replicas: nonzero(r.replicas),
            slots: nonzero(r.slots),
            context_per_slot: nonzero(r.context_per_slot),
            gpu_layers: r.gpu_layers,
            max_unavailable: nonzero(r.max_unavailable),
        };
        let created = self
            .deployments
            .create(&actor, &r.name, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(deployment(created)))
    }

    async fn update_deployment(
        &self,
        request: Request<wire::UpdateDeploymentRequest>,
    ) -> Result<Response<wire::Deployment>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let r = request.into_inner();
        let spec = DeploymentSpec {
            model: r.model,
            selector: r.selector,
            replicas: r.replicas,
            slots: r.slots,
            context_per_slot: r.context_per_slot,
            gpu_layers: r.gpu_layers,
            max_unavailable: r.max_unavailable,
        };
        let updated = self
            .deployments
            .update(&actor, &r.name, spec)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(deployment(updated)))
    }

    async fn delete_deployment(
        &self,
        request: Request<wire::DeploymentRef>,
    ) -> Result<Response<wire::DeleteDeploymentResponse>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        self.deployments
            .delete(&actor, &request.get_ref().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(wire::DeleteDeploymentResponse {}))
    }

    async fn list_deployments(
        &self,
        request: Request<wire::ListDeploymentsRequest>,
    ) -> Result<Response<wire::ListDeploymentsResponse>, Status> {
        authorize(&self.fleet.store, &request).await?;
        let all = self.deployments.list().await.map_err(|e| status(&e))?;
        Ok(Response::new(wire::ListDeploymentsResponse {
            deployments: all.into_iter().map(deployment).collect(),
        }))
    }

    async fn rollback_deployment(
        &self,
        request: Request<wire::DeploymentRef>,
    ) -> Result<Response<wire::Deployment>, Status> {
        let actor = authorize(&self.fleet.store, &request).await?;
        let rolled = self
            .deployments
            .rollback(&actor, &request.get_ref().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(deployment(rolled)))
    }

    async fn get_deployment(
        &self,
        request: Request<wire::DeploymentRef>,
    ) -> Result<Response<wire::Deployment>, Status> {
        authorize(&self.fleet.store, &request).await?;
        let found = self
            .deployments
            .status(&request.get_ref().name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(deployment(found)))
    }
}
