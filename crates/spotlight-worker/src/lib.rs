//! A branch worker: hosts a subset of the top-level branches (each with its nested
//! segments), registers them with the coordinator under a lease, and runs exactly the
//! segments each request asks for, feeding each its gain. Frames from every caller are
//! coalesced into batched ONNX Runtime runs (see [`engine`]).
//!
//! Lifecycle: `/readyz` (on `http_listen`) turns ready once the segments are loaded and the
//! lease is granted. On shutdown the worker turns unready, deregisters (the coordinator
//! stops picking it), keeps answering the frames already sent to it until the coordinator
//! closes its run streams, hands back whatever is still queued when the drain is nearly
//! over (UNAVAILABLE per frame, which the coordinator runs on another replica), and exits
//! within `drain_timeout_ms`.

pub mod engine;
mod http;
pub mod metrics;
mod registration;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use serde::{Deserialize, Serialize};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_service::{Access, Alpn, Metrics, Security, Shutdown};
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
    /// Address of the HTTP listener for probes and metrics (`/livez`, `/readyz`,
    /// `/metrics`); bound by the binary, which hands it to [`run`].
    pub http_listen: SocketAddr,
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
    /// How long shutdown may take: deregister, answer the frames already sent, hand back
    /// what is still queued near its end, exit at its end.
    pub drain_timeout_ms: u64,
    /// TLS for Branches and for registering, the worker token for registering, the tokens
    /// allowed to call Branches (loaded from `[security]` by the binary; the library default
    /// is plaintext and open).
    #[serde(skip)]
    pub security: Security,
    /// Where the worker's metrics are registered (shared by every role of `spotlight up`).
    #[serde(skip)]
    pub metrics: Metrics,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: "worker-0".into(),
            listen: ([0, 0, 0, 0], 7001).into(),
            http_listen: ([0, 0, 0, 0], 7081).into(),
            advertise: None,
            coordinator: "http://127.0.0.1:7000".into(),
            branches: Vec::new(),
            batch_threads: 1,
            max_batch: 64,
            max_queue_delay_us: 0,
            queue_capacity: 4096,
            intra_threads: 1,
            heartbeat_ms: 2000,
            drain_timeout_ms: 10_000,
            security: Security::insecure(),
            metrics: Metrics::new(),
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
        if self.drain_timeout_ms < 100 {
            return Err(format!(
                "drain_timeout_ms must be >= 100, got {}",
                self.drain_timeout_ms
            ));
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
    #[error("HTTP listener failed: {0}")]
    Http(std::io::Error),
}

/// Pre-bound sockets, so callers (and tests) choose ports and know them before serving. A
/// bare `TcpListener` is the gRPC listener alone (no probes or metrics over HTTP).
pub struct WorkerListeners {
    /// The Branches gRPC service.
    pub grpc: TcpListener,
    /// `/livez`, `/readyz`, `/metrics`.
    pub http: Option<TcpListener>,
}

impl From<TcpListener> for WorkerListeners {
    fn from(grpc: TcpListener) -> Self {
        Self { grpc, http: None }
    }
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
        let m = self.engine.metrics();
        m.bytes_in.inc_by(request.get_ref().encoded_len() as u64);
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
                engine.metrics().bytes_in.inc_by(batch.encoded_len() as u64);
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

/// Serves probes and metrics, loads the hosted segments, serves Branches, registers with
/// the coordinator and keeps the lease until `shutdown` resolves; then drains (see the
/// module documentation) and returns within `drain_timeout_ms`.
pub async fn run(
    config: WorkerConfig,
    model: Arc<Model>,
    listeners: impl Into<WorkerListeners>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate(&model).map_err(WorkerError::Config)?;
    let listeners = listeners.into();
    let drain = Duration::from_millis(config.drain_timeout_ms);
    // One shutdown for the servers, the registration and the drain; a refused registration
    // begins it too. It turns late shortly before the drain time is over.
    let stop = Shutdown::new();
    stop.follow(shutdown, drain);
    let readiness = Arc::new(http::Readiness::new(metrics::ready_gauge(
        &config.metrics,
        &config.worker_id,
    )));
    {
        let (stop, readiness) = (stop.clone(), readiness.clone());
        tokio::spawn(async move {
            stop.begun().await;
            readiness.set_draining();
        });
    }

    // Probes answer while the segments load (live, not ready) and until the drain is over.
    let http_stop = Shutdown::new();
    let http_server = match listeners.http {
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(worker_id = config.worker_id, http = %addr, "worker probes and metrics listening");
            }
            let incoming = config
                .security
                .incoming(listener, Alpn::Http1)
                .map_err(WorkerError::Http)?;
            let router = http::router(
                readiness.clone(),
                config.metrics.clone(),
                config.security.clone(),
            );
            Some(tokio::spawn(
                axum::serve(incoming, router)
                    .with_graceful_shutdown(http_stop.begun())
                    .into_future(),
            ))
        }
        None => None,
    };

    let engine = match Engine::load(
        model.clone(),
        &config.branches,
        config.batch_settings(),
        &config.worker_id,
        &config.metrics,
    )
    .await
    {
        Ok(engine) => Arc::new(engine),
        Err(e) => {
            stop_http(&http_stop, http_server).await;
            return Err(e.into());
        }
    };
    readiness.set_loaded();
    let local = listeners
        .grpc
        .local_addr()
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{}://{local}", config.security.scheme()));
    config.security.spawn_reloader();
    tracing::info!(worker_id = config.worker_id, %local, advertise, segments = ?engine.segment_ids(), tls = config.security.tls(), authenticated = config.security.authenticates(), "worker serving");

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::branches_server::BranchesServer<BranchesService>>()
        .await;
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.begun().await;
            health
                .set_not_serving::<pb::branches_server::BranchesServer<BranchesService>>()
                .await;
        });
    }
    // Graceful from the start of the drain: no new connection or stream, while the run
    // streams already open keep carrying frames until the coordinator closes them.
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
                .incoming(listeners.grpc, Alpn::H2)
                .map_err(|e| WorkerError::Config(format!("serving: {e}")))?,
            stop.begun(),
        );
    let mut server = tokio::spawn(server);

    let registration = registration::Registration {
        coordinator: config.coordinator.clone(),
        worker_id: config.worker_id.clone(),
        endpoint: advertise,
        segments: engine.segment_ids(),
        model_hash: model.hash().to_string(),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        security: config.security.clone(),
        readiness: readiness.clone(),
    };
    // Returns once deregistered (or refused).
    let registered = registration.keep(stop.begun()).await;
    // A refused registration (e.g. another model) stops the server too.
    stop.begin();
    let draining = std::time::Instant::now();
    tracing::info!(
        worker_id = config.worker_id,
        in_flight = engine.in_flight(),
        "worker draining: answering the frames already sent"
    );
    // Deregistered: the coordinator sends nothing new, and closes its run streams once the
    // frames it sent are answered; the server is done then. Near the end of the drain
    // time, frames still queued go back to the coordinator for another replica.
    let served = tokio::select! {
        served = &mut server => Some(served),
        _ = stop.late() => None,
    };
    let served = match served {
        Some(served) => served,
        None => {
            let handed = engine.hand_back();
            tracing::warn!(
                worker_id = config.worker_id,
                handed_back = handed,
                "drain time nearly over; frames still queued handed back"
            );
            let left = drain.saturating_sub(draining.elapsed());
            match tokio::time::timeout(left, &mut server).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!(
                        drain_ms = drain.as_millis() as u64,
                        "drain time over; exiting with run streams still open"
                    );
                    server.abort();
                    Ok(Ok(()))
                }
            }
        }
    };
    stop_http(&http_stop, http_server).await;
    tracing::info!(
        worker_id = config.worker_id,
        drained_ms = draining.elapsed().as_millis() as u64,
        "worker stopped"
    );
    let served = served.map_err(|e| WorkerError::Registration(e.to_string()))?;
    registered?;
    served?;
    Ok(())
}

/// Stops the HTTP listener (probes answer until the very end) and waits for it briefly.
async fn stop_http(stop: &Shutdown, server: Option<tokio::task::JoinHandle<std::io::Result<()>>>) {
    stop.begin();
    if let Some(server) = server {
        match tokio::time::timeout(Duration::from_secs(1), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP listener failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener task failed"),
            Err(_) => tracing::debug!("HTTP listener still had connections open"),
        }
    }
}
