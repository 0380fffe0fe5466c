//! Every role in one process, from raw image to prediction: coordinator, a worker per
//! branch and the edge agent (preprocessing, backbone, encoding, stream) on the same cores.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use spotlight_codec::Codec;
use spotlight_coordinator::{CoordinatorConfig, Listeners};
use spotlight_edge::{EdgeConfig, SourceConfig};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_worker::WorkerConfig;
use tokio::net::TcpListener;

use crate::{Measured, cpu};

/// Edge settings of one run.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLoad {
    pub frames: usize,
    pub window: usize,
    pub codec: Codec,
    pub backbone_threads: usize,
}

/// Starts coordinator + one worker per top-level branch in this process, sets the task,
/// runs the edge agent over the first `load.frames` test images, and stops everything.
pub async fn run(
    model: &Arc<Model>,
    dataset: &Path,
    categories: &[String],
    load: EdgeLoad,
) -> anyhow::Result<Measured> {
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let coordinator = tokio::spawn(spotlight_coordinator::run(
        CoordinatorConfig::default(),
        model.clone(),
        Listeners { grpc, http },
        stopped(),
    ));
    let roots: Vec<String> = model
        .segments()
        .iter()
        .filter(|s| s.parent.is_none())
        .map(|s| s.id.clone())
        .collect();
    let (wstop_tx, wstop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for root in &roots {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let config = WorkerConfig {
            worker_id: root.clone(),
            coordinator: format!("http://{addr}"),
            branches: vec![root.clone()],
            ..WorkerConfig::default()
        };
        let mut rx = wstop_rx.clone();
        workers.push(tokio::spawn(spotlight_worker::run(
            config,
            model.clone(),
            listener,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));
    }
    let mut control = loop {
        if let Ok(c) = pb::control_client::ControlClient::connect(format!("http://{addr}")).await {
            break c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while control
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner()
        .workers
        .len()
        < roots.len()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "workers did not register in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    control
        .set_task(pb::SetTaskRequest {
            categories: categories.to_vec(),
            gains: Default::default(),
        })
        .await?;

    let config = EdgeConfig {
        coordinator: format!("http://{addr}"),
        codec: load.codec,
        source: SourceConfig::Idx {
            images: dataset.join("t10k-images-idx3-ubyte.gz"),
            labels: Some(dataset.join("t10k-labels-idx1-ubyte.gz")),
        },
        limit: Some(load.frames as u64),
        max_in_flight: load.window,
        backbone_threads: load.backbone_threads,
        ..EdgeConfig::default()
    };
    let cpu0 = cpu::self_cpu_seconds();
    let t0 = Instant::now();
    let summary = spotlight_edge::run(config, model.clone(), std::future::pending()).await?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu::self_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let _ = wstop_tx.send(true);
    for w in workers {
        let _ = w.await;
    }
    let _ = stop_tx.send(true);
    let _ = coordinator.await;

    let mut m = Measured::new(summary.frames as usize, wall, Vec::new());
    m.p50_ms = summary.latency_p50_ms.unwrap_or(f64::NAN);
    m.p99_ms = summary.latency_p99_ms.unwrap_or(f64::NAN);
    m.p95_ms = f64::NAN;
    if summary.errors > 0 {
        m.errors.insert("any".into(), summary.errors as usize);
    }
    m.accuracy = summary
        .per_version
        .values()
        .last()
        .and_then(|v| v.accuracy());
    m.bytes_per_frame = summary.mean_bytes;
    m.cpu.push(("all roles".into(), cpu));
    m.cloud_macs = summary
        .per_version
        .values()
        .last()
        .and_then(|v| v.mean_cloud_macs())
        .map(|x| x as u64);
    Ok(m)
}
