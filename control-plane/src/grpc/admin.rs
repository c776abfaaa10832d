//! `steward.admin.v1.AdminService`, authenticated by an admin credential in the
//! `authorization: Bearer …` metadata.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::admin::v1::admin_service_server::AdminService;
use steward_proto::admin::v1::{
    CreateEnrollmentTokenRequest, CreateEnrollmentTokenResponse, EnrollmentToken, LabelNodeRequest,
    ListEnrollmentTokensRequest, ListEnrollmentTokensResponse, ListNodesRequest, ListNodesResponse,
    Node, NodeRef, RevokeEnrollmentTokenRequest,
};
use tonic::{Request, Response, Status};

use super::{convert, status};
use crate::deployments::Deployments;
use crate::fleet::{Actor, Fleet, now_unix};

#[derive(Debug)]
pub struct AdminApi {
    fleet: Arc<Fleet>,
    deployments: Arc<Deployments>,
}

impl AdminApi {
    pub fn new(fleet: Arc<Fleet>, deployments: Arc<Deployments>) -> Self {
        Self { fleet, deployments }
    }

    /// Re-places replicas after a change to what placement depends on (cordon, drain,
    /// labels); the node is read again for its new desired generation.
    async fn replaced(&self, node: steward_db::NodeRecord) -> Result<Response<Node>, Status> {
        self.deployments.replace_now().await;
        let node = self.fleet.require_node(&node.id).await.map_err(status)?;
        Ok(Response::new(self.node(node)))
    }

    async fn authorize<T>(&self, request: &Request<T>) -> Result<Actor, Status> {
        super::auth::authorize(&self.fleet.store, request).await
    }

    fn node(&self, record: steward_db::NodeRecord) -> Node {
        convert::node(record, &self.fleet.sessions)
    }

    fn node_ref(request: &Request<NodeRef>) -> Result<String, Status> {
        let node = request.get_ref().node.trim();
        if node.is_empty() {
            return Err(Status::invalid_argument("name a node by ID or name"));
        }
        Ok(node.to_owned())
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.authorize(&request).await?;
        let nodes = self.fleet.list_nodes().await.map_err(status)?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes.into_iter().map(|n| self.node(n)).collect(),
        }))
    }

    async fn get_node(&self, request: Request<NodeRef>) -> Result<Response<Node>, Status> {
        self.authorize(&request).await?;
        let node = self
            .fleet
            .find_node(&Self::node_ref(&request)?)
            .await
            .map_err(status)?;
        Ok(Response::new(self.node(node)))
    }

    async fn cordon_node(&self, request: Request<NodeRef>) -> Result<Response<Node>, Status> {
        let actor = self.authorize(&request).await?;
        let node = self
            .fleet
            .cordon(&actor, &Self::node_ref(&request)?)
            .await
            .map_err(status)?;
        self.replaced(node).await
    }

    async fn uncordon_node(&self, request: Request<NodeRef>) -> Result<Response<Node>, Status> {
        let actor = self.authorize(&request).await?;
        let node = self
            .fleet
            .uncordon(&actor, &Self::node_ref(&request)?)
            .await
            .map_err(status)?;
        self.replaced(node).await
    }

    async fn drain_node(&self, request: Request<NodeRef>) -> Result<Response<Node>, Status> {
        let actor = self.authorize(&request).await?;
        let node = self
            .fleet
            .drain(&actor, &Self::node_ref(&request)?)
            .await
            .map_err(status)?;
        self.replaced(node).await
    }

    async fn label_node(
        &self,
        request: Request<LabelNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let actor = self.authorize(&request).await?;
        let req = request.into_inner();
        let node = self
            .fleet
            .label(&actor, req.node.trim(), req.set, &req.remove)
            .await
            .map_err(status)?;
        self.replaced(node).await
    }

    async fn create_enrollment_token(
        &self,
        request: Request<CreateEnrollmentTokenRequest>,
    ) -> Result<Response<CreateEnrollmentTokenResponse>, Status> {
        let actor = self.authorize(&request).await?;
        let req = request.into_inner();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let (token, record) = self
            .fleet
            .create_enrollment_token(&actor, ttl, &req.description)
            .await
            .map_err(status)?;
        Ok(Response::new(CreateEnrollmentTokenResponse {
            token: token.to_string(),
            info: Some(convert::token(record, now_unix())),
        }))
    }

    async fn list_enrollment_tokens(
        &self,
        request: Request<ListEnrollmentTokensRequest>,
    ) -> Result<Response<ListEnrollmentTokensResponse>, Status> {
        self.authorize(&request).await?;
        let now = now_unix();
        let tokens = self.fleet.list_enrollment_tokens().await.map_err(status)?;
        Ok(Response::new(ListEnrollmentTokensResponse {
            tokens: tokens.into_iter().map(|t| convert::token(t, now)).collect(),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<EnrollmentToken>, Status> {
        let actor = self.authorize(&request).await?;
        let id = request.get_ref().id.trim().to_owned();
        let record = self
            .fleet
            .revoke_enrollment_token(&actor, &id)
            .await
            .map_err(status)?;
        Ok(Response::new(convert::token(record, now_unix())))
    }
}
