//! One role per process, for separate hosts.

use anyhow::Context;
use tokio::net::TcpListener;

use spotlight_service::Side;

use super::{init_onnxruntime, load_model, load_security, shutdown_signal};
use crate::cli::{CoordinatorArgs, EdgeArgs, WorkerArgs, split_list};
use crate::settings::Settings;

fn push(out: &mut Vec<(String, String)>, key: &str, value: Option<impl ToString>) {
    if let Some(v) = value {
        out.push((key.to_string(), v.to_string()));
    }
}

pub fn edge_overrides(a: &EdgeArgs) -> Vec<(String, String)> {
    let mut o = Vec::new();
    push(&mut o, "edge.coordinator", a.coordinator.as_ref());
    push(&mut o, "edge.transport", a.transport.as_ref());
    push(
        &mut o,
        "edge.source.idx.images",
        a.idx_images.as_ref().map(|p| p.display().to_string()),
    );
    push(
        &mut o,
        "edge.source.idx.labels",
        a.idx_labels.as_ref().map(|p| p.display().to_string()),
    );
    push(
        &mut o,
        "edge.source.folder.path",
        a.folder.as_ref().map(|p| p.display().to_string()),
    );
    push(&mut o, "edge.listen", a.listen.as_ref());
    push(&mut o, "edge.limit", a.limit);
    push(&mut o, "edge.codec", a.codec.as_ref());
    push(&mut o, "edge.output", a.output.as_ref());
    o
}

pub fn coordinator_overrides(a: &CoordinatorArgs) -> Vec<(String, String)> {
    let mut o = Vec::new();
    push(&mut o, "coordinator.grpc_listen", a.grpc_listen.as_ref());
    push(&mut o, "coordinator.http_listen", a.http_listen.as_ref());
    push(
        &mut o,
        "coordinator.state_file",
        a.state_file.as_ref().map(|p| p.display().to_string()),
    );
    if let Some(e) = &a.etcd {
        for (i, endpoint) in split_list(e).iter().enumerate() {
            o.push((format!("cluster.etcd[{i}]"), endpoint.clone()));
        }
    }
    o
}

pub fn worker_overrides(a: &WorkerArgs) -> Vec<(String, String)> {
    let mut o = Vec::new();
    push(&mut o, "worker.coordinator", a.coordinator.as_ref());
    push(&mut o, "worker.listen", a.listen.as_ref());
    push(&mut o, "worker.http_listen", a.http_listen.as_ref());
    push(&mut o, "worker.advertise", a.advertise.as_ref());
    push(&mut o, "worker.worker_id", a.id.as_ref());
    if let Some(b) = &a.branches {
        // Lists go through the override as an array.
        for (i, name) in split_list(b).iter().enumerate() {
            o.push((format!("worker.branches[{i}]"), name.clone()));
        }
    }
    o
}

pub async fn coordinator(settings: Settings) -> anyhow::Result<()> {
    let security = load_security(&settings, Side::Coordinator)?;
    let model = load_model(&settings)?;
    let mut c = settings.coordinator;
    c.security = security;
    c.cluster = settings.cluster;
    let grpc = TcpListener::bind(c.grpc_listen)
        .await
        .with_context(|| format!("binding gRPC {}", c.grpc_listen))?;
    let http = TcpListener::bind(c.http_listen)
        .await
        .with_context(|| format!("binding HTTP {}", c.http_listen))?;
    spotlight_coordinator::run(
        c,
        model,
        spotlight_coordinator::Listeners { grpc, http },
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn worker(settings: Settings) -> anyhow::Result<()> {
    let security = load_security(&settings, Side::Worker)?;
    init_onnxruntime(&settings)?;
    let model = load_model(&settings)?;
    let mut w = settings.worker;
    w.security = security;
    let grpc = TcpListener::bind(w.listen)
        .await
        .with_context(|| format!("binding {}", w.listen))?;
    let http = TcpListener::bind(w.http_listen)
        .await
        .with_context(|| format!("binding HTTP {}", w.http_listen))?;
    let listeners = spotlight_worker::WorkerListeners {
        grpc,
        http: Some(http),
    };
    spotlight_worker::run(w, model, listeners, shutdown_signal()).await?;
    Ok(())
}

pub async fn edge(settings: Settings) -> anyhow::Result<()> {
    let security = load_security(&settings, Side::Edge)?;
    init_onnxruntime(&settings)?;
    let model = load_model(&settings)?;
    let options = spotlight_edge::RunOptions {
        security,
        ..Default::default()
    };
    let summary =
        spotlight_edge::run_with(settings.edge, model, options, shutdown_signal()).await?;
    println!("{summary}");
    Ok(())
}
