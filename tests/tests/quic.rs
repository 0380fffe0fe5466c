//! The edge protocol over QUIC: the same predictions as over gRPC, TLS and tokens as on
//! gRPC, refusals that say why. (Restarts: `reliability.rs`; loss: `docs/quic.md`.)

use std::collections::BTreeMap;
use std::time::Duration;

use spotlight_codec::Codec;
use spotlight_coordinator::CoordinatorConfig;
use spotlight_edge::{EdgeConfig, EdgeError, RunOptions, SourceConfig, Transport};
use spotlight_service::Role;
use spotlight_service::certs::DevPki;
use spotlight_tests::*;

fn edge_config(url: String, transport: Transport, out: &std::path::Path, n: u64) -> EdgeConfig {
    let dir = std::env::var("SPOTLIGHT_FASHION_MNIST_DIR")
        .unwrap_or_else(|_| "/usr/share/datasets/fashion-mnist".into());
    EdgeConfig {
        coordinator: url,
        transport,
        codec: Codec::F32,
        source: SourceConfig::Idx {
            images: format!("{dir}/t10k-images-idx3-ubyte.gz").into(),
            labels: Some(format!("{dir}/t10k-labels-idx1-ubyte.gz").into()),
        },
        limit: Some(n),
        max_in_flight: 64,
        output: Some(out.display().to_string()),
        ..EdgeConfig::default()
    }
}

/// Predicted category by seq, from an edge's JSON lines.
fn predictions(out: &std::path::Path) -> BTreeMap<u64, String> {
    std::fs::read_to_string(out)
        .expect("output")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            (
                v["seq"].as_u64().expect("seq"),
                v["predicted"].as_str().expect("a prediction").to_string(),
            )
        })
        .collect()
}

async fn run_edge(
    config: EdgeConfig,
    security: spotlight_service::Security,
) -> Result<spotlight_edge::Summary, EdgeError> {
    let options = RunOptions {
        security,
        ..RunOptions::default()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        spotlight_edge::run_with(config, model(), options, std::future::pending()),
    )
    .await
    .expect("edge finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_gives_the_same_predictions_as_grpc() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let url = format!("http://{}", sandbox.grpc);
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let mut by_transport = Vec::new();
    for transport in [Transport::Grpc, Transport::Quic] {
        let out = dir.join(format!("spotlight-quic-parity-{transport:?}-{pid}.jsonl"));
        let summary = run_edge(
            edge_config(url.clone(), transport, &out, 500),
            spotlight_service::Security::insecure(),
        )
        .await
        .expect("edge run");
        assert_eq!(
            (summary.frames, summary.predictions, summary.errors),
            (500, 500, 0),
            "{transport:?}: {summary}"
        );
        by_transport.push(predictions(&out));
        let _ = std::fs::remove_file(out);
    }
    assert_eq!(by_transport[0].len(), 500);
    assert_eq!(
        by_transport[0], by_transport[1],
        "lossless codec: the same category for every frame"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_uses_the_coordinators_tls_and_tokens() {
    let pki = DevPki::generate(&[]).expect("pki");
    let config = CoordinatorConfig {
        lease_ttl_ms: 2000,
        no_worker_wait_ms: 2000,
        security: pki.security(Role::Coordinator, false).expect("sec"),
        ..CoordinatorConfig::default()
    };
    let sandbox = Sandbox::start_coordinator(model(), config).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let worker = spotlight_worker::WorkerConfig {
        worker_id: "w".into(),
        coordinator: format!("https://{}", sandbox.grpc),
        heartbeat_ms: 300,
        security: pki.security(Role::Worker, false).expect("sec"),
        ..spotlight_worker::WorkerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(spotlight_worker::run(worker, model(), listener, async {
        let _ = stopped.await;
    }));
    let url = format!("https://{}", sandbox.grpc);
    let out = std::env::temp_dir().join(format!("spotlight-quic-tls-{}.jsonl", std::process::id()));
    // The edge verifies the coordinator against the CA and sends its token in the hello.
    let summary = run_edge(
        edge_config(url.clone(), Transport::Quic, &out, 50),
        pki.security(Role::Edge, false).expect("sec"),
    )
    .await
    .expect("an edge with an edge token streams over QUIC");
    assert_eq!((summary.predictions, summary.errors), (50, 0), "{summary}");
    // A reader token is refused at once, with the coordinator's reason.
    let err = run_edge(
        edge_config(url.clone(), Transport::Quic, &out, 5),
        pki.security(Role::Reader, false).expect("sec"),
    )
    .await
    .expect_err("a reader may not stream");
    assert!(
        matches!(&err, EdgeError::Unauthorized { message, .. } if message.contains("stream frames")),
        "{err}"
    );
    // An edge that trusts another CA never gets a session.
    let other = DevPki::generate(&[]).expect("pki");
    let mut untrusting = edge_config(url, Transport::Quic, &out, 5);
    untrusting.reconnect.max_attempts = 2;
    untrusting.reconnect.initial_backoff_ms = 10;
    let err = run_edge(untrusting, other.security(Role::Edge, false).expect("sec"))
        .await
        .expect_err("the coordinator's certificate is not trusted");
    assert!(
        !matches!(err, EdgeError::Unauthorized { .. }),
        "the handshake fails before any token is sent: {err}"
    );
    let _ = std::fs::remove_file(out);
    let _ = stop.send(());
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_each_message_are_routed_once_and_answered_once() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let url = format!("http://{}", sandbox.grpc);
    let pid = std::process::id();
    let n = 300u64;
    let mut runs = Vec::new();
    for copies in [1, 3] {
        let before: Vec<u64> = worker_requests(&sandbox).await;
        let out = std::env::temp_dir().join(format!("spotlight-quic-copies-{copies}-{pid}.jsonl"));
        let config = EdgeConfig {
            quic_copies: copies,
            // A transport benchmark's set-up: every frame precomputed, timed from sending.
            precompute: copies > 1,
            ..edge_config(url.clone(), Transport::Quic, &out, n)
        };
        let summary = run_edge(config, spotlight_service::Security::insecure())
            .await
            .expect("edge run");
        assert_eq!(
            (summary.frames, summary.predictions, summary.errors),
            (n, n, 0),
            "{copies} copies: {summary}"
        );
        let after = worker_requests(&sandbox).await;
        for (w, (a, b)) in after.iter().zip(&before).enumerate() {
            assert_eq!(
                a - b,
                n,
                "{copies} copies: worker {w} ran each frame once (all categories relevant)"
            );
        }
        let p = predictions(&out);
        assert_eq!(p.len() as u64, n, "{copies} copies: one record per frame");
        runs.push(p);
        let _ = std::fs::remove_file(out);
    }
    assert_eq!(runs[0], runs[1], "copies change no prediction");
    sandbox.stop().await;
}

/// Frames answered so far by each worker of the sandbox.
async fn worker_requests(sandbox: &Sandbox) -> Vec<u64> {
    let mut out = Vec::new();
    for w in &sandbox.workers {
        out.push(w.stats().await.requests);
    }
    out
}
