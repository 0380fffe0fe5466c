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
        let Some(etcd) = self.shared.task.etcd() else {
            let lease_id =
                registry.register(r.worker_id, r.endpoint, &r.segments, &r.model_hash)?;
            return Ok(Response::new(pb::RegisterResponse {
                lease_id,
                ttl_ms: registry.ttl().as_millis() as u32,
            }));
        };
        // Replicas: the lease lives in etcd, where every replica sees it; this one routes
        // to the worker at once rather than waiting for its own watch.
        let segments = registry.admit(&r.worker_id, &r.endpoint, &r.segments, &r.model_hash)?;
        let record = crate::cluster::WorkerRecord {
            worker_id: r.worker_id,
            endpoint: r.endpoint,
            segments: r.segments,
            model_hash: r.model_hash,
        };
        let (lease_id, ttl) = etcd.register(&record, registry.ttl()).await?;
        registry.insert(lease_id, record.worker_id, record.endpoint, segments, None)?;
        Ok(Response::new(pb::RegisterResponse {
            lease_id,
            ttl_ms: ttl.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.shared
            .authorize(request.metadata(), Access::Register)?;
        let r = request.into_inner();
        match self.shared.task.etcd() {
            Some(etcd) => etcd.heartbeat(r.lease_id, &r.worker_id).await?,
            None => self.shared.registry.heartbeat(r.lease_id, &r.worker_id)?,
        }
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.shared
            .authorize(request.metadata(), Access::Register)?;
        let lease_id = request.into_inner().lease_id;
        match self.shared.task.etcd() {
            Some(etcd) => {
                etcd.deregister(lease_id).await?;
                self.shared.registry.remove(lease_id, "deregistered");
            }
            None => self.shared.registry.deregister(lease_id)?,
        }
        Ok(Response::new(pb::DeregisterResponse {}))
    }
}
