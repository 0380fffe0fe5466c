//! The operator-facing surface: gRPC health, HTTP endpoints, long-poll watch.

use std::time::Duration;

use spotlight_proto::v1 as pb;
use spotlight_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_listings() {
    let sandbox = SandboxBuilder::new()
        .worker("tops", &["tops"])
        .start()
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sandbox.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in [
        "spotlight.v1.Inference",
        "spotlight.v1.Control",
        "spotlight.v1.Registry",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let (status, body) = http(sandbox.http, "GET", "/livez", "").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Only tops is hosted: not ready, and the message says what is missing.
    let (status, body) = http(sandbox.http, "GET", "/readyz", "").await;
    assert_eq!(status, 503);
    assert_eq!(body, "no live worker for segments: footwear, other\n");
    let w = sandbox
        .start_worker(
            "rest",
            &["footwear".into(), "other".into()],
            sandbox.model.clone(),
        )
        .await;
    sandbox.wait_for_workers(2).await;
    let (status, _) = http(sandbox.http, "GET", "/readyz", "").await;
    assert_eq!(status, 200);

    let (_, body) = http(sandbox.http, "GET", "/v1/workers", "").await;
    let workers: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ids: Vec<&str> = workers["workers"]
        .as_array()
        .expect("list")
        .iter()
        .map(|w| w["worker_id"].as_str().expect("id"))
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["rest", "tops"]);

    let (_, body) = http(sandbox.http, "GET", "/v1/model", "").await;
    let model: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(model["content_hash"], sandbox.model.hash());
    assert_eq!(
        model["segments"].as_array().expect("segments").len(),
        sandbox.model.segments().len()
    );
    w.stop().await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_watch_long_polls_until_the_task_changes() {
    let sandbox = SandboxBuilder::new().start().await;
    let addr = sandbox.http;
    let watcher =
        tokio::spawn(async move { http(addr, "GET", "/v1/task/watch?after=1", "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!watcher.is_finished(), "watch must wait for a change");
    let (status, _) = http(addr, "PUT", "/v1/task", r#"{"gains": {"footwear": 1.5}}"#).await;
    assert_eq!(status, 200);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("watch returns")
        .expect("join");
    assert_eq!(status, 200);
    let task: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(task["version"], 2);
    assert_eq!(task["gains"]["footwear"], 1.5);
    // Bad JSON is a 400 that shows the expected shape.
    let (status, body) = http(addr, "PUT", "/v1/task", "{categories").await;
    assert_eq!(status, 400);
    assert!(body.contains("task must be JSON like"), "{body}");
    sandbox.stop().await;
}

/// An open `WatchTask` stream does not keep the coordinator from stopping: it ends, and the
/// coordinator stops cleanly (the sandbox asserts within 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_task_watch_does_not_block_shutdown() {
    let sandbox = SandboxBuilder::new().start().await;
    let mut watch = sandbox
        .control()
        .await
        .watch_task(pb::WatchTaskRequest {})
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("ok").expect("current task");
    assert_eq!(first.version, 1);
    let started = std::time::Instant::now();
    sandbox.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "stopped in {:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
        .await
        .expect("the watch ends when the coordinator stops");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no further task after shutdown: {end:?}"
    );
}

/// `GET /metrics` is Prometheus text, open like the probes, and its counters follow the
/// frames: cutout shows as segments not run and MACs saved, exactly as the task's plan says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_frames_segments_and_macs_saved_by_cutout() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let (status, body) = http(
        sandbox.http,
        "PUT",
        "/v1/task",
        r#"{"categories": ["Sandal", "Sneaker", "Ankle boot"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let task: serde_json::Value = serde_json::from_str(&body).expect("json");
    let plan_macs = task["plan"]["cloud_macs"].as_u64().expect("macs") as f64;
    let plan_saved = task["plan"]["cloud_macs_saved"].as_u64().expect("saved") as f64;
    assert!(
        plan_saved > 0.0,
        "footwear only cuts out the other branches"
    );

    let model = sandbox.model.clone();
    let (images, _) = test_images(40);
    let feats = features(&model, &images);
    let answers = sandbox
        .classify(frames(&model, &feats, spotlight_codec::Codec::Int8))
        .await;
    assert_eq!(answers.len(), 40);

    let reply = http_with(sandbox.http, "GET", "/metrics", None, b"").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        reply.headers
    );
    let m = spotlight_service::metrics::parse_text(&reply.body);
    let v = |name: &str| m.get(name).copied().unwrap_or(0.0);
    assert_eq!(v("spotlight_coordinator_frames_received_total"), 40.0);
    assert_eq!(v("spotlight_coordinator_frames_answered_total"), 40.0);
    assert_eq!(v("spotlight_coordinator_frame_seconds_count"), 40.0);
    assert_eq!(
        v("spotlight_coordinator_segments_run_total{segment=\"footwear\"}"),
        40.0
    );
    assert_eq!(
        v("spotlight_coordinator_segments_run_total{segment=\"tops\"}"),
        0.0
    );
    assert_eq!(
        v("spotlight_coordinator_cloud_macs_total"),
        40.0 * plan_macs
    );
    assert_eq!(
        v("spotlight_coordinator_cloud_macs_saved_total"),
        40.0 * plan_saved
    );
    assert_eq!(v("spotlight_coordinator_task_version"), 2.0);
    assert_eq!(
        v("spotlight_coordinator_live_replicas{segment=\"tops\"}"),
        1.0
    );
    assert_eq!(v("spotlight_coordinator_in_flight_frames"), 0.0);
    assert_eq!(v("spotlight_coordinator_ready"), 1.0);
    assert!(v("spotlight_coordinator_wire_bytes_total{direction=\"in\"}") > 0.0);
    assert!(v("spotlight_coordinator_wire_bytes_total{direction=\"out\"}") > 0.0);
    assert!(
        !reply
            .body
            .contains("spotlight_coordinator_frame_errors_total{")
    );

    // One worker gone: its segments have no replica, and the coordinator is not ready.
    let mut sandbox = sandbox;
    let i = sandbox
        .workers
        .iter()
        .position(|w| w.id == "tops")
        .expect("tops");
    sandbox.workers.remove(i).stop().await;
    let (_, text) = http(sandbox.http, "GET", "/metrics", "").await;
    let m = spotlight_service::metrics::parse_text(&text);
    assert_eq!(
        m["spotlight_coordinator_live_replicas{segment=\"tops\"}"],
        0.0
    );
    assert_eq!(m["spotlight_coordinator_ready"], 0.0);
    sandbox.stop().await;
}
