use std::sync::Arc;

use spotlight_proto::v1 as pb;
use spotlight_service::Access;
use tonic::{Request, Response, Status};

use crate::Shared;

pub struct RegistryService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.shared
            .authorize(request.metadata(), Access::Register)?;
        let r = request.into_inner();
        let registry = &self.shared.registry;
        let lease_id = registry.register(r.worker_id, r.endpoint, &r.segments, &r.model_hash)?;
        Ok(Response::new(pb::RegisterResponse {
            lease_id,
            ttl_ms: registry.ttl().as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.shared
            .authorize(request.metadata(), Access::Register)?;
        let r = request.into_inner();
        self.shared.registry.heartbeat(r.lease_id, &r.worker_id)?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.shared
            .authorize(request.metadata(), Access::Register)?;
        self.shared
            .registry
            .deregister(request.into_inner().lease_id)?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}
