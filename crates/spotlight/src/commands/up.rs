//! `spotlight up`: every role in one process on loopback with the shipped model.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use spotlight_edge::{RunOptions, SourceConfig};
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::control_client::ControlClient;
use spotlight_service::certs::DevPki;
use spotlight_service::{AuthChannel, Role, Security, Shutdown};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{init_onnxruntime, load_model, shutdown_signal};
use crate::cli::{UpArgs, split_list};
use crate::settings::Settings;

/// The Fashion-MNIST test set as Debian's `dataset-fashion-mnist` installs it.
const TEST_IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
const TEST_LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

pub fn overrides(a: &UpArgs) -> Vec<(String, String)> {
    let mut o = Vec::new();
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            o.push((k.to_string(), v));
        }
    };
    push("edge.limit", a.limit.map(|l| l.to_string()));
    push("coordinator.grpc_listen", a.grpc_listen.clone());
    push("coordinator.http_listen", a.http_listen.clone());
    push("edge.codec", a.codec.clone());
    push("up.replicas", a.replicas.map(|r| r.to_string()));
    push("edge.transport", a.transport.clone());
    if a.serve {
        push("up.serve", Some("true".into()));
    }
    o
}

fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    addr
}

pub async fn run(settings: Settings, args: UpArgs) -> anyhow::Result<()> {
    init_onnxruntime(&settings)?;
    let model = load_model(&settings)?;
    let switch_to = match args.switch_to.as_deref() {
        Some("none") | Some("") => Vec::new(),
        Some(list) => split_list(list),
        None => settings.up.switch_to.clone(),
    };
    // Refuse a bad switch before anything starts.
    if !switch_to.is_empty() {
        model
            .plan(&spotlight_model::TaskSpec {
                categories: switch_to.clone(),
                gains: Default::default(),
            })
            .context("--switch-to")?;
    }

    // Throwaway credentials for this run (TLS and a token per role), unless --insecure. The
    // files go to a temporary directory removed at exit, so `spotlight task` can be pointed
    // at this run while it serves.
    let creds = if settings.security.insecure {
        tracing::warn!("--insecure: plaintext, and every caller is trusted");
        None
    } else {
        let pki = DevPki::generate(&[]).map_err(anyhow::Error::msg)?;
        let dir = tempfile::Builder::new()
            .prefix("spotlight-up-")
            .tempdir()
            .context("temporary directory for throwaway credentials")?;
        pki.write(dir.path(), true).map_err(anyhow::Error::msg)?;
        Some((pki, dir))
    };
    let security = |role: Role| -> anyhow::Result<Security> {
        Ok(match &creds {
            Some((pki, _)) => pki.security(role, false)?,
            None => Security::insecure(),
        })
    };

    // Workers stop before the coordinator, so that they can still deregister with it.
    let (stop_coordinator, stop_workers) = (Shutdown::new(), Shutdown::new());
    // One registry for every role: the coordinator's GET /metrics serves them all.
    let metrics = spotlight_service::Metrics::new();

    // Coordinator.
    let mut c = settings.coordinator.clone();
    c.security = security(Role::Coordinator)?;
    c.metrics = metrics.clone();
    let grpc = TcpListener::bind(loopback(c.grpc_listen))
        .await
        .with_context(|| {
            format!(
                "binding {} (another spotlight running? try --grpc-listen 127.0.0.1:0)",
                loopback(c.grpc_listen)
            )
        })?;
    let http = TcpListener::bind(loopback(c.http_listen))
        .await
        .with_context(|| {
            format!(
                "binding {} (try --http-listen 127.0.0.1:0)",
                loopback(c.http_listen)
            )
        })?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    let coordinator = tokio::spawn(spotlight_coordinator::run(
        c,
        model.clone(),
        spotlight_coordinator::Listeners { grpc, http },
        stop_coordinator.begun(),
    ));
    let scheme = if creds.is_some() { "https" } else { "http" };
    let coordinator_url = format!("{scheme}://{grpc_addr}");

    // A worker per top-level branch (× replicas).
    let roots: Vec<String> = model
        .segments()
        .iter()
        .filter(|s| s.parent.is_none())
        .map(|s| s.id.clone())
        .collect();
    let mut workers = Vec::new();
    for root in &roots {
        for r in 0..settings.up.replicas {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let config = spotlight_worker::WorkerConfig {
                worker_id: format!("{root}-{r}"),
                coordinator: coordinator_url.clone(),
                branches: vec![root.clone()],
                advertise: None,
                security: security(Role::Worker)?,
                metrics: metrics.clone(),
                ..settings.worker.clone()
            };
            workers.push(tokio::spawn(spotlight_worker::run(
                config,
                model.clone(),
                listener,
                stop_workers.begun(),
            )));
        }
    }
    let expected = roots.len() * settings.up.replicas;
    let mut control = connect(&security(Role::Operator)?, &coordinator_url).await?;
    wait_for_workers(&mut control, expected).await?;
    eprintln!(
        "spotlight up: model {} ({} categories, {} segments), coordinator grpc {grpc_addr} http {http_addr}, {expected} workers",
        model.name(),
        model.categories().len(),
        model.segments().len()
    );

    // Edge agent.
    let mut edge = settings.edge.clone();
    edge.coordinator = coordinator_url.clone();
    if edge.source == SourceConfig::None && !settings.up.serve {
        edge.source = SourceConfig::Idx {
            images: PathBuf::from(TEST_IMAGES),
            labels: Some(PathBuf::from(TEST_LABELS)),
        };
    }
    if edge.output.is_none() && edge.print_tail.is_none() {
        edge.print_tail = Some(8);
    }
    let total = match &edge.source {
        SourceConfig::Idx { images, .. } => {
            let n = spotlight_edge::idx::read_images(images)
                .with_context(|| format!("reading {} (run `make dataset`)", images.display()))?
                .count as u64;
            Some(edge.limit.map_or(n, |l| l.min(n)))
        }
        _ => edge.limit,
    };

    let (progress_tx, mut progress_rx) = watch::channel(0u64);
    let switcher = {
        let switch_to = switch_to.clone();
        let at = total.map(|t| ((t as f64) * settings.up.switch_at).ceil() as u64);
        let mut control = control.clone();
        tokio::spawn(async move {
            let (Some(at), false) = (at, switch_to.is_empty()) else {
                return;
            };
            if progress_rx.wait_for(|&n| n >= at).await.is_err() {
                return;
            }
            let request = pb::SetTaskRequest {
                categories: switch_to.clone(),
                gains: Default::default(),
            };
            match control.set_task(request).await {
                Ok(t) => eprintln!(
                    "spotlight up: after {at} frames, task switched to version {}: categories {:?}",
                    t.get_ref().version,
                    switch_to
                ),
                Err(e) => eprintln!("spotlight up: task switch failed: {}", e.message()),
            }
        })
    };

    let run_edge = edge.source != SourceConfig::None || edge.listen.is_some();
    if run_edge {
        let options = RunOptions {
            progress: Some(progress_tx),
            security: security(Role::Edge)?,
            metrics: metrics.clone(),
            ..RunOptions::default()
        };
        let summary =
            spotlight_edge::run_with(edge, model.clone(), options, shutdown_signal()).await?;
        println!("{summary}");
    }
    switcher.abort();

    if settings.up.serve {
        match &creds {
            Some((_, dir)) => {
                let d = dir.path().display();
                eprintln!(
                    "spotlight up: serving until Ctrl-C with throwaway credentials in {d} — try\n  \
                     curl -s --cacert {d}/ca.pem -H \"Authorization: Bearer $(cat {d}/reader.token)\" https://{http_addr}/v1/task\n  \
                     spotlight task get --coordinator {coordinator_url} --ca {d}/ca.pem --token-file {d}/operator.token"
                );
            }
            None => eprintln!(
                "spotlight up: serving until Ctrl-C (insecure) — try `curl -s http://{http_addr}/v1/task` or `spotlight task get --insecure --coordinator {coordinator_url}`"
            ),
        }
        shutdown_signal().await;
    }
    stop_workers.begin();
    for w in workers {
        w.await.context("worker task")??;
    }
    stop_coordinator.begin();
    coordinator.await.context("coordinator task")??;
    Ok(())
}

async fn connect(security: &Security, url: &str) -> anyhow::Result<ControlClient<AuthChannel>> {
    let endpoint = security.endpoint(url).map_err(anyhow::Error::msg)?;
    for _ in 0..100 {
        if let Ok(channel) = endpoint.connect().await {
            return Ok(ControlClient::with_interceptor(
                channel,
                security.interceptor(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("coordinator at {url} did not come up within 5 s")
}

async fn wait_for_workers(
    control: &mut ControlClient<AuthChannel>,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let live = control
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers
            .len();
        if live >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "only {live} of {n} workers registered within 30 s (see the log with RUST_LOG=info)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
