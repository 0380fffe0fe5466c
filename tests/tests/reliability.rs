//! No frame is lost when the coordinator restarts under a running edge agent.

use std::time::Duration;

use spotlight_edge::{EdgeConfig, ReconnectConfig, RunOptions, SourceConfig, Transport};
use spotlight_proto::v1 as pb;
use spotlight_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_loses_no_frame_across_a_coordinator_restart() {
    restart_under(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_edge_loses_no_frame_across_a_coordinator_restart() {
    restart_under(Transport::Quic).await;
}

async fn restart_under(transport: Transport) {
    let mut sandbox = SandboxBuilder::new()
        .worker_per_branch()
        // Workers need a heartbeat or two to register with the new coordinator.
        .config(|c| c.no_worker_wait_ms = 5000)
        .start()
        .await;
    let out = std::env::temp_dir().join(format!(
        "spotlight-restart-{transport:?}-{}.jsonl",
        std::process::id()
    ));
    let dir = std::env::var("SPOTLIGHT_FASHION_MNIST_DIR")
        .unwrap_or_else(|_| "/usr/share/datasets/fashion-mnist".into());
    let config = EdgeConfig {
        coordinator: format!("http://{}", sandbox.grpc),
        transport,
        source: SourceConfig::Idx {
            images: format!("{dir}/t10k-images-idx3-ubyte.gz").into(),
            labels: Some(format!("{dir}/t10k-labels-idx1-ubyte.gz").into()),
        },
        limit: Some(3000),
        max_in_flight: 32,
        output: Some(out.display().to_string()),
        reconnect: ReconnectConfig {
            initial_backoff_ms: 20,
            max_backoff_ms: 200,
            max_attempts: 50,
        },
        ..EdgeConfig::default()
    };
    let (progress, mut answered) = tokio::sync::watch::channel(0u64);
    let options = RunOptions {
        progress: Some(progress),
        ..RunOptions::default()
    };
    let edge = tokio::spawn(spotlight_edge::run_with(
        config,
        sandbox.model.clone(),
        options,
        std::future::pending(),
    ));

    answered.wait_for(|&n| n >= 300).await.expect("progress");
    sandbox.restart_coordinator().await;
    // Mark what the new coordinator answers: its first task change makes version 2.
    let mut control = sandbox.control().await;
    control
        .set_task(pb::SetTaskRequest {
            categories: vec![],
            gains: Default::default(),
        })
        .await
        .expect("set task");
    let at_restart = *answered.borrow();

    let summary = tokio::time::timeout(Duration::from_secs(120), edge)
        .await
        .expect("edge finishes")
        .expect("join")
        .expect("edge run");
    assert_eq!(
        (summary.frames, summary.predictions, summary.errors),
        (3000, 3000, 0),
        "{summary}"
    );
    let served_by_new = summary.per_version.get(&2).map_or(0, |v| v.predictions);
    assert!(
        at_restart < 3000 && served_by_new > 0,
        "the restart must happen mid-stream: {summary}"
    );

    let text = std::fs::read_to_string(&out).expect("output");
    let mut seqs: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 3000, "each frame reported exactly once");
    let _ = std::fs::remove_file(out);
    sandbox.stop().await;
}
