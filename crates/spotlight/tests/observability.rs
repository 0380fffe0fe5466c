//! Probes and metrics on every role, as real `spotlight` processes on loopback: `/livez`,
//! `/readyz` and `/metrics` answer on the coordinator, a worker and an edge agent, and the
//! counters equal the frames streamed; `spotlight up` serves every role's metrics on the
//! coordinator (`docs/observability.md`).

// Test helpers may panic; `Proc` waits for its child on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod support;

use std::time::{Duration, Instant};

use support::{addr_after, coordinator, http_get, scrape, start, sum, value};

/// One test at a time: each starts several processes on 2 cores.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Every role answers `/livez`, `/readyz` and `/metrics`, and the counters move with the
/// frames: a coordinator, a worker and an edge agent as processes; the edge streams 50
/// test images and keeps its local API open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_answers_probes_and_metrics_and_counters_follow_the_frames() {
    let _serial = serial().await;
    let c = coordinator(&[]);
    // No worker yet: alive, not ready.
    assert_eq!(http_get(c.http, "/livez").0, 200);
    let (status, body) = http_get(c.http, "/readyz");
    assert_eq!(status, 503, "{body}");
    let (mut w, w_http) = c.worker_with_http("w", &[]);
    c.wait_workers(Duration::from_secs(30), "worker w", |w| w.len() == 1);
    assert_eq!(http_get(c.http, "/readyz").0, 200);
    assert_eq!(http_get(w_http, "/livez").0, 200);
    let (status, body) = http_get(w_http, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // Prometheus text, with the content type scrapers expect.
    let (status, text) = http_get(w_http, "/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("# TYPE spotlight_worker_queue_wait_seconds histogram"),
        "{text}"
    );

    let (mut edge, line) = start(
        &[
            "edge",
            "--coordinator",
            &c.grpc,
            "--listen",
            "127.0.0.1:0",
            "--idx-images",
            "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
            "--limit",
            "50",
        ],
        &[],
        "local API listening",
    );
    let e_http = addr_after(&line, "\"addr\"");
    assert_eq!(http_get(e_http, "/livez").0, 200);
    // Ready once connected; the 50 frames are answered meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    let edge_metrics = loop {
        let m = scrape(e_http);
        if value(&m, "spotlight_edge_frames_answered_total") >= 50.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "edge answered 50 frames: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(http_get(e_http, "/readyz").0, 200);
    assert_eq!(value(&edge_metrics, "spotlight_edge_connected"), 1.0);
    assert_eq!(
        value(&edge_metrics, "spotlight_edge_frames_answered_total"),
        50.0
    );
    assert_eq!(sum(&edge_metrics, "spotlight_edge_frame_errors_total"), 0.0);
    assert_eq!(
        value(&edge_metrics, "spotlight_edge_round_trip_seconds_count"),
        50.0
    );
    assert_eq!(
        value(&edge_metrics, "spotlight_edge_encode_seconds_count"),
        50.0
    );
    assert!(value(&edge_metrics, "spotlight_edge_backbone_seconds_count") >= 1.0);
    assert!(
        value(
            &edge_metrics,
            "spotlight_edge_wire_bytes_total{direction=\"out\"}"
        ) > 0.0
    );
    assert!(
        value(
            &edge_metrics,
            "spotlight_edge_wire_bytes_total{direction=\"in\"}"
        ) > 0.0
    );
    assert_eq!(value(&edge_metrics, "spotlight_edge_task_version"), 1.0);

    let cm = scrape(c.http);
    assert_eq!(
        value(&cm, "spotlight_coordinator_frames_received_total"),
        50.0
    );
    assert_eq!(
        value(&cm, "spotlight_coordinator_frames_answered_total"),
        50.0
    );
    assert_eq!(sum(&cm, "spotlight_coordinator_frame_errors_total"), 0.0);
    assert_eq!(
        value(&cm, "spotlight_coordinator_frame_seconds_count"),
        50.0
    );
    assert_eq!(
        value(
            &cm,
            "spotlight_coordinator_segments_run_total{segment=\"tops\"}"
        ),
        50.0
    );
    assert_eq!(
        value(
            &cm,
            "spotlight_coordinator_live_replicas{segment=\"footwear\"}"
        ),
        1.0
    );
    assert!(value(&cm, "spotlight_coordinator_cloud_macs_total") > 0.0);
    assert_eq!(value(&cm, "spotlight_coordinator_ready"), 1.0);
    assert_eq!(value(&cm, "spotlight_coordinator_task_version"), 1.0);

    // The worker hosts the three top-level branches; the coordinator sends it each frame
    // once per branch.
    let wm = scrape(w_http);
    assert_eq!(
        value(&wm, "spotlight_worker_frames_received_total{worker=\"w\"}"),
        150.0
    );
    assert_eq!(
        value(&wm, "spotlight_worker_frames_answered_total{worker=\"w\"}"),
        150.0
    );
    assert_eq!(
        value(
            &wm,
            "spotlight_worker_segment_frames_total{worker=\"w\",segment=\"footwear\"}"
        ),
        50.0
    );
    assert_eq!(
        value(
            &wm,
            "spotlight_worker_queue_wait_seconds_count{worker=\"w\"}"
        ),
        150.0
    );
    assert_eq!(
        value(&wm, "spotlight_worker_queue_depth{worker=\"w\"}"),
        0.0
    );
    assert_eq!(value(&wm, "spotlight_worker_ready{worker=\"w\"}"), 1.0);

    // Both stop cleanly on SIGTERM.
    edge.signal("TERM");
    let (status, _) =
        tokio::task::block_in_place(|| edge.wait_exit(Instant::now(), Duration::from_secs(15)));
    assert!(status.success(), "edge exit {status:?}");
    w.signal("TERM");
    let (status, took) =
        tokio::task::block_in_place(|| w.wait_exit(Instant::now(), Duration::from_secs(15)));
    assert!(status.success(), "worker exit {status:?}");
    eprintln!("probes: worker idle drain took {:.0} ms", ms(took));
}

/// `spotlight up` runs every role in one process; the coordinator's `GET /metrics` serves
/// all of them: coordinator, each worker (by its `worker` label) and the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spotlight_up_serves_every_role_s_metrics_on_the_coordinator() {
    let _serial = serial().await;
    let (mut up, line) = start(
        &[
            "up",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--limit",
            "200",
            "--switch-to",
            "none",
            "--serve",
        ],
        // With --serve the edge streams only the source it is given.
        &[(
            "SPOTLIGHT_EDGE__SOURCE__IDX__IMAGES",
            "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
        )],
        "serving until Ctrl-C",
    );
    let http = addr_after(&line, "curl -s ");
    let m = scrape(http);
    assert_eq!(value(&m, "spotlight_edge_frames_answered_total"), 200.0);
    assert_eq!(
        value(&m, "spotlight_coordinator_frames_answered_total"),
        200.0
    );
    for worker in ["tops-0", "footwear-0", "other-0"] {
        assert_eq!(
            value(
                &m,
                &format!("spotlight_worker_frames_answered_total{{worker=\"{worker}\"}}")
            ),
            200.0,
            "{worker}"
        );
    }
    // Each family once, whatever shares the registry.
    let (_, text) = http_get(http, "/metrics");
    assert_eq!(
        text.matches("# TYPE spotlight_worker_frames_received_total counter")
            .count(),
        1
    );
    up.signal("TERM");
    let (status, _) =
        tokio::task::block_in_place(|| up.wait_exit(Instant::now(), Duration::from_secs(30)));
    assert!(status.success(), "exit {status:?}");
}
