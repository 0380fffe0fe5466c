//! The spotlight edge agent: runs the CNN backbone on ONNX Runtime, streams encoded feature
//! tensors to the coordinator over one bidirectional gRPC stream, and reports the
//! predictions that come back.
//!
//! Pipeline: sources (idx files, an image folder, the local device API) → a dedicated
//! backbone thread (batches queued images, encodes one frame per image) → the stream driver
//! (bounded window in flight, reconnects with backoff and re-sends unanswered frames) →
//! the reporter thread (JSON lines, tail, progress, [`Summary`]). Every input ends as
//! exactly one record: a prediction or an explicit error.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod backbone;
mod config;
mod error;
mod image_input;
mod local_api;
pub mod metrics;
mod record;
mod report;
mod source;
mod stream;
mod summary;

pub use backbone::{Backbone, encode_features, feature_tensor};
pub use config::{EdgeConfig, ReconnectConfig, SourceConfig, Transport};
pub use error::EdgeError;
pub use image_input::{decode_image, fit_gray};
pub use local_api::{ClassifyResponse, http_status};
pub use record::{CloudPrediction, FrameFailure, Record, Score};
pub use source::{folder, idx};
pub use summary::{Summary, VersionStats, percentile};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spotlight_model::Model;
use spotlight_proto::v1::Hello;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Endpoint;
use tracing::Instrument;

use crate::record::{SeqGen, Sink};
use crate::report::{Output, Reporter, Tail};
use crate::stream::StreamDriver;

/// Optional hooks of a run.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Receives the number of inputs answered (predictions + errors) after each one.
    pub progress: Option<watch::Sender<u64>>,
    /// A pre-bound listener for the local API; takes precedence over `config.listen`.
    pub local_listener: Option<TcpListener>,
    /// TLS to the coordinator and the edge's bearer token (default: plaintext, no token).
    pub security: spotlight_service::Security,
    /// Where the edge's metrics are registered; the local API's `GET /metrics` serves all
    /// of this registry.
    pub metrics: spotlight_service::Metrics,
}

/// Runs the edge agent until the dataset source is exhausted and answered (when there is
/// no local API), or until `shutdown` resolves (then frames in flight get up to
/// `drain_timeout_ms` to be answered).
pub async fn run(
    config: EdgeConfig,
    model: Arc<Model>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, EdgeError> {
    run_with(config, model, RunOptions::default(), shutdown).await
}

/// [`run`] with progress reporting and a pre-bound local API listener.
pub async fn run_with(
    config: EdgeConfig,
    model: Arc<Model>,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, EdgeError> {
    config.validate()?;
    let span =
        tracing::info_span!("edge", edge_id = %config.edge_id, coordinator = %config.coordinator);
    run_validated(config, model, options, shutdown)
        .instrument(span)
        .await
}

fn endpoint(
    security: &spotlight_service::Security,
    coordinator: &str,
) -> Result<Endpoint, EdgeError> {
    Ok(security
        .endpoint(coordinator)
        .map_err(|e| EdgeError::Config(format!("coordinator: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

fn internal(what: &str) -> impl Fn(tokio::task::JoinError) -> EdgeError + '_ {
    move |e| EdgeError::Internal(format!("{what}: {e}"))
}

async fn run_validated(
    config: EdgeConfig,
    model: Arc<Model>,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, EdgeError> {
    let mut endpoints = config
        .coordinators()
        .into_iter()
        .map(|c| Ok((c.to_string(), endpoint(&options.security, c)?)))
        .collect::<Result<std::collections::VecDeque<_>, EdgeError>>()?;
    let (coordinator, endpoint) = endpoints
        .pop_front()
        .ok_or_else(|| EdgeError::Config("no coordinator endpoint".into()))?;
    let security = options.security.clone();
    let dataset = {
        let (source, model) = (config.source.clone(), model.clone());
        tokio::task::spawn_blocking(move || source::load(&source, &model))
            .await
            .map_err(internal("loading the dataset"))??
    };
    let listener = match (options.local_listener, config.listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| EdgeError::Bind { addr, source })?,
        ),
        (None, None) => None,
    };
    let output = Output::open(config.output.as_deref(), config.print_tail.is_some())?;

    // Backbone on its own thread; opening it is the first thing it does.
    let (items_tx, items_rx) = mpsc::channel(config.batch_size * 2);
    let (jobs_tx, jobs_rx) = mpsc::channel(config.batch_size);
    let (records_tx, records_rx) = mpsc::unbounded_channel();
    let edge_metrics = options.metrics.part::<metrics::EdgeMetrics>();
    let sink = Sink::new(model.categories(), records_tx, edge_metrics.clone());
    let (opened_tx, opened_rx) = oneshot::channel();
    let backbone_thread = {
        let (model, sink, codec) = (model.clone(), sink.clone(), config.codec);
        let compression = config.compression;
        let (threads, batch) = (config.backbone_threads, config.batch_size);
        let precompute = config.precompute;
        std::thread::Builder::new()
            .name("spotlight-backbone".into())
            .spawn(move || match Backbone::open(model, codec, threads) {
                Ok(b) => {
                    let b = b.with_compression(compression);
                    let _ = opened_tx.send(Ok(()));
                    backbone::serve(b, batch, items_rx, jobs_tx, sink, precompute);
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                }
            })
            .map_err(|e| EdgeError::Internal(format!("cannot start the backbone thread: {e}")))?
    };
    opened_rx
        .await
        .map_err(|_| EdgeError::Internal("backbone thread exited while opening".into()))??;
    tracing::info!(model = %model.name(), codec = %config.codec, compression = config.compression.name(), "backbone ready");

    let start = Instant::now();
    let reporter = Reporter {
        output,
        tail: config.print_tail.map(Tail::new),
        summary: summary::SummaryBuilder::new(model.cloud_macs_total()),
        progress: options.progress,
        start,
    };
    let reporter_thread = std::thread::Builder::new()
        .name("spotlight-report".into())
        .spawn(move || reporter.run(records_rx))
        .map_err(|e| EdgeError::Internal(format!("cannot start the reporter thread: {e}")))?;

    let stop = spotlight_service::Shutdown::new();
    let seq = SeqGen::default();
    let mut tasks = Vec::new();
    if let Some(dataset) = dataset {
        tasks.push(tokio::spawn({
            let fut = source::feed(
                dataset,
                model.clone(),
                config.limit,
                seq.clone(),
                items_tx.clone(),
                stop.clone(),
            );
            async move {
                fut.await;
            }
            .in_current_span()
        }));
    }
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "local API listening");
        }
        let router = local_api::router(
            items_tx.clone(),
            seq.clone(),
            local_api::Probes {
                metrics: options.metrics.clone(),
                edge: edge_metrics.clone(),
            },
        );
        let stopped = stop.begun();
        tasks.push(tokio::spawn(
            async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "local API failed");
                }
            }
            .in_current_span(),
        ));
    }
    drop(items_tx);

    let hello = Hello {
        model_hash: model.hash().to_string(),
        edge_id: config.edge_id.clone(),
        batch_answers: true,
        codec: config.codec.wire(),
        compression: config.compression.wire(),
        ..Default::default()
    };
    let driver = StreamDriver::new(
        endpoint,
        coordinator,
        hello,
        config.reconnect.clone(),
        config.drain_timeout(),
        sink,
        jobs_rx,
        config.max_in_flight,
        stop.clone(),
    );
    let mut driver = driver;
    driver.answer_timeout = Duration::from_millis(config.answer_timeout_ms);
    driver.security = security;
    driver.transport = config.transport;
    driver.quic_stream_frames = config.quic_stream_frames;
    driver.quic_copies = config.quic_copies;
    driver.time_from_send = config.precompute;
    driver.quic_copy_gap = Duration::from_millis(config.quic_copy_gap_ms);
    driver.alternates = endpoints;
    let mut driver = tokio::spawn(driver.run().in_current_span());
    let shutdown = std::pin::pin!(shutdown);
    let result = tokio::select! {
        r = &mut driver => r,
        () = shutdown => {
            tracing::info!("shutdown requested");
            stop.begin();
            driver.await
        }
    };
    stop.begin();
    for t in tasks {
        t.await.map_err(internal("source task"))?;
    }
    let joined = tokio::task::spawn_blocking(move || {
        let backbone = backbone_thread.join();
        let summary = reporter_thread.join();
        (backbone, summary)
    })
    .await
    .map_err(internal("joining threads"))?;
    let summary = match joined {
        (Ok(()), Ok(summary)) => summary?,
        _ => return Err(EdgeError::Internal("a pipeline thread panicked".into())),
    };
    match result.map_err(internal("stream driver"))? {
        Ok(()) => {
            tracing::info!(
                frames = summary.frames,
                errors = summary.errors,
                "edge run finished"
            );
            Ok(summary)
        }
        Err(e) => {
            tracing::error!(error = %e, summary = %summary, "edge run failed");
            Err(e)
        }
    }
}
