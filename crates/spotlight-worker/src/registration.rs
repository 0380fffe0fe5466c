//! Register with the coordinator, keep the lease, deregister on the way out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use spotlight_proto::v1 as pb;
use spotlight_proto::v1::registry_client::RegistryClient;
use spotlight_service::Security;
use tonic::transport::Channel;

use crate::WorkerError;
use crate::http::Readiness;

const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) struct Registration {
    pub coordinator: String,
    pub worker_id: String,
    pub endpoint: String,
    pub segments: Vec<String>,
    pub model_hash: String,
    pub heartbeat: Duration,
    /// TLS to the coordinator and the worker token.
    pub security: Security,
    /// Told when a lease is granted or lost.
    pub readiness: Arc<Readiness>,
}

impl Registration {
    /// Registers (retrying with backoff while the coordinator is unreachable), heartbeats,
    /// re-registers if the lease is lost, and deregisters when `stop` resolves. A refusal
    /// (other model, unknown segment) is final.
    pub(crate) async fn keep(self, stop: impl Future<Output = ()>) -> Result<(), WorkerError> {
        tokio::pin!(stop);
        // Coordinator replicas: one client each, used in turn; the worker moves to the next
        // when a call cannot reach the one it uses (the lease lives in the replicas' shared
        // store, so any of them renews it).
        let clients = self
            .coordinator
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| {
                let channel = self
                    .security
                    .endpoint(c)
                    .map_err(|e| {
                        WorkerError::Registration(format!("coordinator endpoint {c}: {e}"))
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy();
                Ok((c.to_string(), RegistryClient::new(channel)))
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        if clients.is_empty() {
            return Err(WorkerError::Registration("no coordinator endpoint".into()));
        }
        let mut current = 0;
        let mut client = clients[current].1.clone();
        let mut backoff = Duration::from_millis(100);
        let mut lease: Option<u64> = None;
        loop {
            let wait = match lease {
                None => match self.register(&mut client).await {
                    Ok(id) => {
                        lease = Some(id);
                        self.readiness.set_registered(true);
                        backoff = Duration::from_millis(100);
                        self.heartbeat
                    }
                    Err(status) if is_final(&status) => {
                        return Err(WorkerError::Registration(format!(
                            "coordinator {} refused worker \"{}\": {}",
                            self.coordinator,
                            self.worker_id,
                            status.message()
                        )));
                    }
                    Err(status) => {
                        tracing::warn!(coordinator = clients[current].0, error = %status.message(), retry_in = ?backoff, "cannot register yet");
                        current = (current + 1) % clients.len();
                        client = clients[current].1.clone();
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        backoff / 2
                    }
                },
                Some(id) => match client
                    .heartbeat(self.request(pb::HeartbeatRequest {
                        lease_id: id,
                        worker_id: self.worker_id.clone(),
                    }))
                    .await
                {
                    Ok(_) => self.heartbeat,
                    Err(status) => {
                        tracing::warn!(lease_id = id, error = %status.message(), "heartbeat failed; registering again");
                        if status.code() == tonic::Code::NotFound {
                            lease = None;
                            self.readiness.set_registered(false);
                            Duration::ZERO
                        } else {
                            current = (current + 1) % clients.len();
                            client = clients[current].1.clone();
                            self.heartbeat.min(Duration::from_millis(500))
                        }
                    }
                },
            };
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.readiness.set_registered(false);
        if let Some(id) = lease {
            match tokio::time::timeout(
                Duration::from_secs(2),
                client.deregister(self.request(pb::DeregisterRequest { lease_id: id })),
            )
            .await
            {
                Ok(Ok(_)) => tracing::info!(lease_id = id, "deregistered"),
                Ok(Err(status)) => {
                    tracing::warn!(lease_id = id, error = %status.message(), "deregister failed")
                }
                Err(_) => tracing::warn!(lease_id = id, "deregister timed out"),
            }
        }
        Ok(())
    }

    async fn register(&self, client: &mut RegistryClient<Channel>) -> Result<u64, tonic::Status> {
        let response = client
            .register(self.request(pb::RegisterRequest {
                worker_id: self.worker_id.clone(),
                endpoint: self.endpoint.clone(),
                segments: self.segments.clone(),
                model_hash: self.model_hash.clone(),
            }))
            .await?
            .into_inner();
        tracing::info!(
            lease_id = response.lease_id,
            ttl_ms = response.ttl_ms,
            "registered with coordinator"
        );
        Ok(response.lease_id)
    }
}

impl Registration {
    /// A call carrying the worker's token.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        self.security.attach(&mut request);
        request
    }
}

/// Refusals that retrying cannot fix: another model, an unknown segment, credentials the
/// coordinator does not accept.
fn is_final(status: &tonic::Status) -> bool {
    spotlight_service::ErrorCode::from_grpc(status.code()).is_final()
}
