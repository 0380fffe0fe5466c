//! The coordinator: holds the task, registers workers, routes every frame to the workers
//! hosting the segments its task needs, merges their outputs with top-down attention, and
//! serves the control API (gRPC + HTTP/JSON).

pub mod cluster;
pub mod error;
mod grpc;
mod http;
pub mod link;
pub mod metrics;
mod quic;
pub mod registry;
pub mod router;
pub mod task;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_service::{Access, Alpn, Metrics, Security, Shutdown};
use tokio::net::TcpListener;

pub use error::{ApiError, ErrorCode};

/// Coordinator settings (`configs/coordinator.toml` documents every key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC address: Inference, Control, Registry, health, reflection.
    pub grpc_listen: SocketAddr,
    /// HTTP/JSON control API address.
    pub http_listen: SocketAddr,
    /// Also serve edges over QUIC (UDP) on the gRPC address's port: an edge switches with
    /// `transport = "quic"` and the same address.
    pub quic: bool,
    /// Where the task is persisted; none keeps it in memory only.
    pub state_file: Option<PathBuf>,
    /// Worker lease time to live.
    pub lease_ttl_ms: u64,
    /// How long a frame waits for a live worker hosting a segment it needs.
    pub no_worker_wait_ms: u64,
    /// Deadline of one call to a worker.
    pub worker_timeout_ms: u64,
    /// Frames of one stream in flight at once.
    pub max_in_flight_per_stream: usize,
    /// Frames of all streams together in flight at once: beyond it every stream waits
    /// (backpressure to the edges), so memory stays bounded whatever the number of streams.
    pub max_in_flight_total: usize,
    /// Failed calls in a row (unreachable, past the deadline, a bad answer) that eject a
    /// worker from routing.
    pub eject_after_failures: u32,
    /// How long a worker's first ejection lasts; the n-th lasts n times as long.
    pub ejection_base_ms: u64,
    /// Longest ejection.
    pub ejection_max_ms: u64,
    /// How long shutdown may take: frames still waiting for a worker near its end are
    /// answered UNAVAILABLE, and at its end the coordinator exits with whatever is open.
    pub drain_timeout_ms: u64,
    /// TLS and tokens for every listener and for calls to workers (loaded from
    /// `[security]` by the binary; the library default is plaintext and open).
    #[serde(skip)]
    pub security: Security,
    /// Where the coordinator's metrics are registered; `GET /metrics` serves all of this
    /// registry (in `spotlight up`, every role's).
    #[serde(skip)]
    pub metrics: Metrics,
    /// Replicas sharing task and workers through etcd (`[cluster]`, set by the binary;
    /// default: none, one coordinator).
    #[serde(skip)]
    pub cluster: cluster::ClusterConfig,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_listen: ([0, 0, 0, 0], 7000).into(),
            http_listen: ([0, 0, 0, 0], 7080).into(),
            quic: true,
            state_file: None,
            lease_ttl_ms: 6000,
            no_worker_wait_ms: 1000,
            worker_timeout_ms: 5000,
            max_in_flight_per_stream: 256,
            max_in_flight_total: 16384,
            eject_after_failures: 5,
            ejection_base_ms: 2000,
            ejection_max_ms: 30_000,
            drain_timeout_ms: 10_000,
            security: Security::insecure(),
            metrics: Metrics::new(),
            cluster: cluster::ClusterConfig::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Checks values that deserialisation cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ttl_ms < 100 {
            return Err(format!(
                "lease_ttl_ms must be >= 100, got {}",
                self.lease_ttl_ms
            ));
        }
        if self.worker_timeout_ms == 0 {
            return Err("worker_timeout_ms must be > 0".into());
        }
        if self.max_in_flight_per_stream == 0 {
            return Err("max_in_flight_per_stream must be > 0".into());
        }
        if self.max_in_flight_total < self.max_in_flight_per_stream {
            return Err(format!(
                "max_in_flight_total ({}) must be >= max_in_flight_per_stream ({})",
                self.max_in_flight_total, self.max_in_flight_per_stream
            ));
        }
        if self.eject_after_failures == 0 {
            return Err("eject_after_failures must be >= 1".into());
        }
        if self.ejection_base_ms == 0 || self.ejection_max_ms < self.ejection_base_ms {
            return Err(format!(
                "ejection times must satisfy 0 < ejection_base_ms <= ejection_max_ms, got {} and {}",
                self.ejection_base_ms, self.ejection_max_ms
            ));
        }
        if self.drain_timeout_ms < 100 {
            return Err(format!(
                "drain_timeout_ms must be >= 100, got {}",
                self.drain_timeout_ms
            ));
        }
        if self.cluster.enabled() && self.state_file.is_some() {
            return Err(
                "state_file and cluster.etcd are exclusive: with etcd the task lives in etcd"
                    .into(),
            );
        }
        self.cluster.validate()
    }
}

/// Largest edge message the coordinator decodes; beyond it the stream ends with
/// OUT_OF_RANGE (the frame's seq cannot be read to answer it alone).
pub const MAX_EDGE_MESSAGE_BYTES: usize = 64 << 20;

/// Pre-bound sockets, so callers (and tests) choose ports and know them before serving.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

pub(crate) struct Shared {
    pub(crate) config: CoordinatorConfig,
    pub(crate) model: Arc<Model>,
    pub(crate) task: task::TaskState,
    pub(crate) registry: Arc<registry::Registry>,
    pub(crate) router: router::Router,
    /// The process's shutdown: when it begins, long-lived streams end so the servers can
    /// drain.
    pub(crate) shutdown: Shutdown,
    /// Frames in flight over all streams (`max_in_flight_total` permits).
    pub(crate) in_flight: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    /// Resolves once shutdown has started.
    pub(crate) async fn stopping(&self) {
        self.shutdown.begun().await;
    }

    /// Checks the caller's credentials for `access` (open when no tokens are configured).
    pub(crate) fn authorize(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        access: Access,
    ) -> Result<(), tonic::Status> {
        self.config
            .security
            .authorize_grpc(metadata, access)
            .map(|_| ())
    }

    /// Ready to take frames: not draining, and every segment has a live worker; else why
    /// not.
    pub(crate) fn ready(&self) -> Result<(), String> {
        if self.shutdown.is_begun() {
            return Err("draining: shutting down".into());
        }
        let missing = self.uncovered_segments();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no live worker for segments: {}",
                missing.join(", ")
            ))
        }
    }

    /// Segment ids with no live worker.
    pub(crate) fn uncovered_segments(&self) -> Vec<String> {
        let live = self.registry.live();
        (0..self.model.segments().len())
            .filter(|&s| !live.iter().any(|w| w.segments.contains(&s)))
            .map(|s| self.model.segments()[s].id.clone())
            .collect()
    }
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator config: {0}")]
    Config(String),
    #[error("{0}")]
    Task(ApiError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// Serves until `shutdown` resolves, then drains.
pub async fn run(
    config: CoordinatorConfig,
    model: Arc<Model>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    config.validate().map_err(CoordinatorError::Config)?;
    let (task, task_revision) = match config.cluster.enabled() {
        true => {
            let etcd = cluster::Etcd::connect(&config.cluster)
                .await
                .map_err(CoordinatorError::Config)?;
            task::TaskState::open_shared(model.clone(), etcd, Duration::from_secs(15))
                .await
                .map_err(CoordinatorError::Task)?
        }
        false => (
            task::TaskState::open(model.clone(), config.state_file.clone())
                .map_err(CoordinatorError::Task)?,
            0,
        ),
    };
    let registry = Arc::new(registry::Registry::new(
        model.clone(),
        registry::RegistrySettings {
            ttl: Duration::from_millis(config.lease_ttl_ms),
            security: config.security.clone(),
            ejection: registry::Ejection {
                consecutive_failures: config.eject_after_failures,
                base: Duration::from_millis(config.ejection_base_ms),
                max: Duration::from_millis(config.ejection_max_ms),
            },
            open_timeout: Duration::from_millis(config.worker_timeout_ms),
        },
    ));
    config.security.spawn_reloader();
    let limits = router::RouteLimits {
        no_worker_wait: Duration::from_millis(config.no_worker_wait_ms),
        worker_timeout: Duration::from_millis(config.worker_timeout_ms),
    };
    let drain = Duration::from_millis(config.drain_timeout_ms);
    // Frames still waiting for a worker when the drain is nearly over get an explicit
    // answer with time left to deliver it (up to 1 s, at most half the drain time).
    let stop = Shutdown::new();
    stop.follow(
        async move {
            shutdown.await;
            tracing::info!(drain_ms = drain.as_millis() as u64, "coordinator draining");
        },
        drain,
    );
    let route_metrics = Arc::new(metrics::RouteMetrics::new(
        config.metrics.part::<metrics::CoordinatorMetrics>(),
        &model,
    ));
    let router = router::Router::new(
        model.clone(),
        registry.clone(),
        limits,
        stop.clone(),
        route_metrics,
    );
    let config_total = config.max_in_flight_total;
    let shared = Arc::new(Shared {
        config,
        model,
        task,
        registry: registry.clone(),
        router,
        shutdown: stop.clone(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(config_total)),
    });
    metrics::watch(&shared.config.metrics, Arc::downgrade(&shared));
    let security = shared.config.security.clone();
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map_err(CoordinatorError::Http)?;
    tracing::info!(
        grpc = ?listeners.grpc.local_addr().ok(),
        http = ?listeners.http.local_addr().ok(),
        tls = security.tls(),
        authenticated = security.authenticates(),
        model = shared.model.name(),
        task_version = shared.task.current().version,
        "coordinator serving"
    );

    if let Some(etcd) = shared.task.etcd().cloned() {
        tracing::info!(etcd = ?shared.config.cluster.etcd, prefix = shared.config.cluster.prefix,
            "sharing task and workers with the other replicas through etcd");
        let follower = shared.clone();
        let (etcd2, stop2) = (etcd.clone(), stop.clone());
        tokio::spawn(async move {
            etcd2
                .follow_task(task_revision, stop2, |version, spec| {
                    follower.task.install(version, spec)
                })
                .await
        });
        let (registry, stop2) = (registry.clone(), stop.clone());
        tokio::spawn(async move { etcd.follow_workers(registry, stop2).await });
    }

    let stopped = move || stop.begun();

    let reaper = {
        let registry = registry.clone();
        let period = (registry.ttl() / 2).max(Duration::from_millis(50));
        let stop = stopped();
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(period) => { registry.reap(); }
                }
            }
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::inference_server::InferenceServer<grpc::inference::InferenceService>>()
        .await;
    health
        .set_serving::<pb::control_server::ControlServer<grpc::control::ControlService>>()
        .await;
    health
        .set_serving::<pb::registry_server::RegistryServer<grpc::registry::RegistryService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Reflection(e.to_string()))?;

    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            pb::inference_server::InferenceServer::new(grpc::inference::InferenceService {
                shared: shared.clone(),
            })
            // Room for a full `FrameBatch` (4096 frames, even as f32); a frame of the wrong
            // size below this gets its own INVALID_ARGUMENT and the stream goes on.
            .max_decoding_message_size(MAX_EDGE_MESSAGE_BYTES),
        )
        .add_service(pb::control_server::ControlServer::new(
            grpc::control::ControlService {
                shared: shared.clone(),
            },
        ))
        .add_service(pb::registry_server::RegistryServer::new(
            grpc::registry::RegistryService {
                shared: shared.clone(),
            },
        ))
        .serve_with_incoming_shutdown(
            // TLS when configured; TCP_NODELAY either way (`Server::tcp_nodelay` does not
            // apply to pre-bound listeners, and small answers would wait for delayed ACKs).
            security
                .incoming(listeners.grpc, Alpn::H2)
                .map_err(CoordinatorError::Http)?,
            stopped(),
        );
    let quic = match shared.config.quic {
        true => {
            let addr = grpc_addr;
            // A coordinator restarted on the same address may find its predecessor's QUIC
            // socket still closing for a moment.
            let mut tries = 0;
            let socket = loop {
                match std::net::UdpSocket::bind(addr) {
                    Ok(s) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        return Err(CoordinatorError::Http(std::io::Error::new(
                            e.kind(),
                            format!("binding QUIC (UDP) {addr}: {e}"),
                        )));
                    }
                }
            };
            tracing::info!(quic = %addr, "serving edges over QUIC too");
            Some(tokio::spawn(quic::serve(shared.clone(), socket)))
        }
        false => None,
    };
    // HTTP stays up until gRPC has drained, so probes see /readyz answer 503 meanwhile.
    let (grpc_drained, http_stop) = tokio::sync::oneshot::channel::<()>();
    let http = axum::serve(
        security
            .incoming(listeners.http, Alpn::Http1)
            .map_err(CoordinatorError::Http)?,
        http::router(shared.clone()),
    )
    .with_graceful_shutdown(async move {
        let _ = http_stop.await;
    });
    let grpc = async move {
        let served = grpc.await;
        drop(grpc_drained);
        served
    };

    // A peer that never finishes its part of a graceful close (a stopped worker holding a
    // registry connection, an edge that keeps its side of a stream open) cannot hold the
    // coordinator past its drain time.
    let servers = async {
        let (g, h) = tokio::join!(grpc, http.into_future());
        if let Some(q) = quic {
            match q.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "QUIC server failed"),
                Err(e) => tracing::error!(error = %e, "QUIC server task failed"),
            }
        }
        (g, h)
    };
    let deadline = async {
        stopped().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        (g, h) = servers => {
            reaper.abort();
            g?;
            h.map_err(CoordinatorError::Http)?;
            tracing::info!("coordinator stopped");
        }
        _ = deadline => {
            reaper.abort();
            tracing::warn!(
                drain_ms = drain.as_millis() as u64,
                "drain time over; exiting with connections still open"
            );
        }
    }
    Ok(())
}
