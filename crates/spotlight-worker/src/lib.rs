//! A branch worker: hosts a subset of the top-level branches (each with its nested
//! segments), registers them with the coordinator under a lease, and runs exactly the
//! segments each request asks for, feeding each its gain. Frames from every caller are
//! coalesced into batched ONNX Runtime runs (see [`engine`]).

pub mod engine;
mod registration;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_service::{Access, Alpn, Security, Shutdown};
use tokio::net::TcpListener;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub use engine::{BatchSettings, Engine, EngineError};

/// Worker settings (`configs/worker.toml` documents every key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Stable id, shown by the coordinator (e.g. the pod name).
    pub worker_id: String,
    /// Address the Branches gRPC service binds.
    pub listen: SocketAddr,
    /// Address the coordinator should call; default `http://<listen>`.
    pub advertise: Option<String>,
    /// Coordinator gRPC endpoint to register with; several, comma-separated, for coordinator
    /// replicas sharing etcd (the worker moves to the next when one cannot be reached).
    pub coordinator: String,
    /// Top-level segment ids hosted, each with its nested segments; empty = all.
    pub branches: Vec<String>,
    /// Batcher threads: ONNX Runtime runs at once, each thread with its own sessions.
    pub batch_threads: usize,
    /// Most frames coalesced into one ONNX Runtime run.
    pub max_batch: usize,
    /// How long the oldest queued frame waits for a batch to fill (microseconds); 0 runs
    /// whatever is queued as soon as a batcher thread is free.
    pub max_queue_delay_us: u64,
    /// Frames queued at most; beyond it frames are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// ONNX Runtime intra-op threads per segment session.
    pub intra_threads: usize,
    /// Heartbeat period; keep well under the coordinator's lease TTL.
    pub heartbeat_ms: u64,
    /// TLS for Branches and for registering, the worker token for registering, the tokens
    /// allowed to call Branches (loaded from `[security]` by the binary; the library default
    /// is plaintext and open).
    #[serde(skip)]
    pub security: Security,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: "worker-0".into(),
            listen: ([0, 0, 0, 0], 7001).into(),
            advertise: None,
            coordinator: "http://127.0.0.1:7000".into(),
            branches: Vec::new(),
            batch_threads: 1,
            max_batch: 64,
            max_queue_delay_us: 0,
            queue_capacity: 4096,
            intra_threads: 1,
            heartbeat_ms: 2000,
            security: Security::insecure(),
        }
    }
}

impl WorkerConfig {
    /// Checks values that deserialisation cannot, against the model.
    pub fn validate(&self, model: &Model) -> Result<(), String> {
        for b in &self.branches {
            match model.segment_index(b) {
                Some(i) if model.segments()[i].parent.is_none() => {}
                Some(_) => {
                    return Err(format!(
                        "branch \"{b}\" is not a top-level segment; list top-level ids only"
                    ));
                }
                None => {
                    let roots: Vec<_> = model
                        .segments()
                        .iter()
                        .filter(|s| s.parent.is_none())
                        .map(|s| s.id.as_str())
                        .collect();
                    return Err(format!(
                        "unknown branch \"{b}\"; top-level segments: {}",
                        roots.join(", ")
                    ));
                }
            }
        }
        for (key, value) in [
            ("batch_threads", self.batch_threads),
            ("max_batch", self.max_batch),
            ("queue_capacity", self.queue_capacity),
            ("intra_threads", self.intra_threads),
        ] {
            if value == 0 {
                return Err(format!("{key} must be > 0"));
            }
        }
        if self.max_batch > engine::MAX_FRAMES_PER_BATCH {
            return Err(format!(
                "max_batch must be <= {}, got {}",
                engine::MAX_FRAMES_PER_BATCH,
                self.max_batch
            ));
        }
        if self.max_queue_delay_us > 1_000_000 {
            return Err(format!(
                "max_queue_delay_us must be <= 1000000 (1 s), got {}",
                self.max_queue_delay_us
            ));
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be > 0".into());
        }
        Ok(())
    }

    /// The batcher settings.
    pub fn batch_settings(&self) -> BatchSettings {
        BatchSettings {
            max_batch: self.max_batch,
            max_delay: Duration::from_micros(self.max_queue_delay_us),
            queue_capacity: self.queue_capacity,
            threads: self.batch_threads,
            intra_threads: self.intra_threads,
        }
    }
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid worker config: {0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("registration failed: {0}")]
    Registration(String),
}

struct BranchesService {
    engine: Arc<Engine>,
    security: Security,
}

#[tonic::async_trait]
impl pb::branches_server::Branches for BranchesService {
    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunResponse>, Status> {
        self.security
            .authorize_grpc(request.metadata(), Access::Branches)?;
        Ok(Response::new(self.engine.run(request.into_inner()).await?))
    }

    type RunStreamStream = UnboundedReceiverStream<Result<pb::RunBatchResult, Status>>;

    async fn run_stream(
        &self,
        request: Request<Streaming<pb::RunBatch>>,
    ) -> Result<Response<Self::RunStreamStream>, Status> {
        self.security
            .authorize_grpc(request.metadata(), Access::Branches)?;
        let mut inbound = request.into_inner();
        // Unbounded, yet bounded in practice: each result answers a batch that the engine's
        // bounded queue admitted (or refused at once).
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = self.engine.clone();
        tokio::spawn(async move {
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(error = %status, "run stream ended by the caller");
                        break;
                    }
                };
                let tx = tx.clone();
                let id = batch.batch_id;
                engine.submit(
                    &batch.model_hash,
                    &batch.segments,
                    batch.features,
                    Box::new(move |mut result| {
                        result.batch_id = id;
                        let _ = tx.send(Ok(result));
                    }),
                );
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.security
            .authorize_grpc(request.metadata(), Access::Branches)?;
        Ok(Response::new(self.engine.stats()))
    }
}

/// Loads the hosted segments, serves Branches, registers with the coordinator and keeps the
/// lease until `shutdown` resolves; then deregisters and drains.
pub async fn run(
    config: WorkerConfig,
    model: Arc<Model>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate(&model).map_err(WorkerError::Config)?;
    let engine = Engine::load(model.clone(), &config.branches, config.batch_settings()).await?;
    let engine = Arc::new(engine.with_worker_id(config.worker_id.clone()));
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{}://{local}", config.security.scheme()));
    config.security.spawn_reloader();
    tracing::info!(worker_id = config.worker_id, %local, advertise, segments = ?engine.segment_ids(), tls = config.security.tls(), authenticated = config.security.authenticates(), "worker serving");

    // One shutdown for the server and the registration; a refused registration begins it
    // too.
    let stop = Shutdown::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => stop.begin(),
                _ = stop.begun() => {}
            }
        });
    }
    let stopped = || stop.begun();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::branches_server::BranchesServer<BranchesService>>()
        .await;
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(
            pb::branches_server::BranchesServer::new(BranchesService {
                engine: engine.clone(),
                security: config.security.clone(),
            })
            .max_decoding_message_size(16 << 20),
        )
        .serve_with_incoming_shutdown(
            // TLS when configured; TCP_NODELAY either way (`Server::tcp_nodelay` does not
            // apply to pre-bound listeners, and small answers would wait for delayed ACKs).
            config
                .security
                .incoming(listener, Alpn::H2)
                .map_err(|e| WorkerError::Config(format!("serving: {e}")))?,
            stopped(),
        );
    let server = tokio::spawn(server);

    let registration = registration::Registration {
        coordinator: config.coordinator.clone(),
        worker_id: config.worker_id.clone(),
        endpoint: advertise,
        segments: engine.segment_ids(),
        model_hash: model.hash().to_string(),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        security: config.security.clone(),
    };
    let registered = registration.keep(stopped()).await;
    // A refused registration (e.g. another model) stops the server too.
    stop.begin();
    let served = server
        .await
        .map_err(|e| WorkerError::Registration(e.to_string()))?;
    tracing::info!(worker_id = config.worker_id, "worker stopped");
    registered?;
    served?;
    Ok(())
}
