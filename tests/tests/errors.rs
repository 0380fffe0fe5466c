//! Every failure gets a clear message and the right code; no frame is lost.

use std::time::{Duration, Instant};

use spotlight_codec::Codec;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use spotlight_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_category_is_invalid_argument_listing_valid_names() {
    let sandbox = SandboxBuilder::new().start().await;
    let mut control = sandbox.control().await;
    let err = control
        .set_task(pb::SetTaskRequest {
            categories: vec!["Sneaker".into(), "sneakers".into()],
            gains: Default::default(),
        })
        .await
        .expect_err("unknown category must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("unknown category \"sneakers\"; known: T-shirt/top, Trouser"),
        "{}",
        err.message()
    );

    let err = control
        .set_task(pb::SetTaskRequest {
            categories: vec![],
            gains: [("footwear".to_string(), -1.0f32)].into_iter().collect(),
        })
        .await
        .expect_err("negative gain must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The refused changes did not move the version.
    assert_eq!(
        control
            .get_task(pb::GetTaskRequest {})
            .await
            .expect("get")
            .into_inner()
            .version,
        1
    );

    // Same over HTTP: 400 with a JSON error body.
    let (status, body) = http(
        sandbox.http,
        "PUT",
        "/v1/task",
        r#"{"categories": ["Sneakers"]}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"code\":\"invalid_argument\"")
            && body.contains("unknown category \\\"Sneakers\\\""),
        "{body}"
    );
    let (status, body) = http(
        sandbox.http,
        "PUT",
        "/v1/task",
        r#"{"categories": ["Sneaker", "Bag"], "gains": {"Bag": 2}}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\":2"), "{body}");
    let (status, body) = http(sandbox.http, "GET", "/v1/task", "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("\"segments\":[\"footwear\",\"other\"]"),
        "{body}"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_worker_on_another_model_are_refused() {
    let sandbox = SandboxBuilder::new().start().await;
    let mut client = sandbox.inference().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello("sha256:0000")).await.expect("queue");
    let err = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("other model must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("runs model sha256:0000, but this coordinator serves sha256:"),
        "{}",
        err.message()
    );

    let mut registry =
        pb::registry_client::RegistryClient::connect(format!("http://{}", sandbox.grpc))
            .await
            .expect("connect");
    let err = registry
        .register(pb::RegisterRequest {
            worker_id: "stale".into(),
            endpoint: "http://127.0.0.1:1".into(),
            segments: vec!["footwear".into()],
            model_hash: "sha256:0000".into(),
        })
        .await
        .expect_err("other model must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("worker \"stale\" runs model sha256:0000"),
        "{}",
        err.message()
    );
    assert!(
        sandbox
            .control()
            .await
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("list")
            .into_inner()
            .workers
            .is_empty()
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shape_is_a_per_frame_error_and_the_stream_goes_on() {
    let sandbox = SandboxBuilder::new().worker("all", &[]).start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(3);
    let feats = features(&model, &images);
    let mut bad_shape = frame(&model, 1, &feats[1], Codec::F32);
    if let Some(pb::edge_message::Kind::Frame(f)) = &mut bad_shape.kind {
        f.features.as_mut().expect("features").shape = vec![1, 8, 7, 8];
    }
    let mut short = frame(&model, 2, &feats[2], Codec::F16);
    if let Some(pb::edge_message::Kind::Frame(f)) = &mut short.kind {
        f.features.as_mut().expect("features").data.truncate(10);
    }
    let answers = sandbox
        .classify(vec![
            frame(&model, 0, &feats[0], Codec::F32),
            bad_shape,
            short,
        ])
        .await;
    assert!(matches!(answers[&0], Kind::Prediction(_)));
    assert_frame_error(
        &answers[&1],
        tonic::Code::InvalidArgument,
        "shape [1, 8, 7, 8]; model fashion-mnist-nested expects [1, 8, 7, 7]",
    );
    assert_frame_error(
        &answers[&2],
        tonic::Code::InvalidArgument,
        "has 10 bytes; F16 of 392 values needs 784",
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_worker_is_unavailable_within_the_deadline_for_every_frame() {
    // Only "tops" is hosted: footwear frames have nowhere to go.
    let sandbox = SandboxBuilder::new()
        .worker("tops", &["tops"])
        .config(|c| c.no_worker_wait_ms = 200)
        .start()
        .await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(30);
    let feats = features(&model, &images);
    let started = Instant::now();
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    let elapsed = started.elapsed();
    assert_eq!(answers.len(), 30, "every frame answered");
    for k in answers.values() {
        assert_frame_error(
            k,
            tonic::Code::Unavailable,
            "no live worker hosts segments [\"footwear\"]",
        );
    }
    assert!(
        elapsed < Duration::from_secs(10),
        "answers took {elapsed:?}"
    );

    // Restrict the task to tops: the same frames now succeed with only the tops worker.
    let mut control = sandbox.control().await;
    control
        .set_task(pb::SetTaskRequest {
            categories: vec!["Shirt".into(), "Coat".into()],
            gains: Default::default(),
        })
        .await
        .expect("set task");
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    assert!(answers.values().all(|k| matches!(k, Kind::Prediction(p) if p.cost.as_ref().is_some_and(|c| c.segments_run == ["tops", "tops.light", "tops.warm"]))));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_survives_a_coordinator_restart() {
    let dir = std::env::temp_dir().join(format!("spotlight-state-{}", std::process::id()));
    let state = dir.join("task.json");
    let _ = std::fs::remove_dir_all(&dir);
    let config =
        |c: &mut spotlight_coordinator::CoordinatorConfig| c.state_file = Some(state.clone());
    let sandbox = SandboxBuilder::new().config(config).start().await;
    let mut control = sandbox.control().await;
    control
        .set_task(pb::SetTaskRequest {
            categories: vec!["Bag".into()],
            gains: [("other".to_string(), 1.5f32)].into_iter().collect(),
        })
        .await
        .expect("set");
    sandbox.stop().await;

    let sandbox = SandboxBuilder::new().config(config).start().await;
    let task = sandbox
        .control()
        .await
        .get_task(pb::GetTaskRequest {})
        .await
        .expect("get")
        .into_inner();
    assert_eq!(task.version, 2);
    assert_eq!(task.categories, vec!["Bag".to_string()]);
    assert_eq!(task.gains.get("other"), Some(&1.5));
    sandbox.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_leaving_is_noticed_and_replicas_share_the_load() {
    let sandbox = SandboxBuilder::new()
        .worker("a", &[])
        .worker("b", &[])
        .start()
        .await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(60);
    let feats = features(&model, &images);
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    assert!(answers.values().all(|k| matches!(k, Kind::Prediction(_))));
    let (a, b) = (
        sandbox.workers[0].stats().await.requests,
        sandbox.workers[1].stats().await.requests,
    );
    // Three branches per frame, each to the least busy replica.
    assert_eq!(a + b, 180);
    assert!(a > 0 && b > 0, "both replicas should serve: a={a} b={b}");

    let mut sandbox = sandbox;
    let gone = sandbox.workers.remove(1);
    gone.stop().await;
    sandbox.wait_for_workers(1).await;
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    assert!(answers.values().all(|k| matches!(k, Kind::Prediction(_))));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_another_model_exits_with_the_refusal() {
    let sandbox = SandboxBuilder::new().start().await;
    let model = sandbox.model.clone();
    let mut manifest = model.manifest().clone();
    manifest.content_hash = "sha256:1111".into();
    let other = std::sync::Arc::new(
        spotlight_model::Model::from_manifest(model.dir().to_path_buf(), manifest).expect("model"),
    );
    let worker = sandbox.start_worker("stale", &[], other).await;
    let result = tokio::time::timeout(Duration::from_secs(15), worker.join)
        .await
        .expect("worker exits")
        .expect("join");
    let err = result
        .expect_err("registration must be refused")
        .to_string();
    assert!(
        err.contains("refused worker \"stale\"") && err.contains("runs model sha256:1111"),
        "{err}"
    );
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_renewed_only_by_its_holder() {
    let sandbox = SandboxBuilder::new().start().await;
    let mut registry =
        pb::registry_client::RegistryClient::connect(format!("http://{}", sandbox.grpc))
            .await
            .expect("connect");
    let lease = registry
        .register(pb::RegisterRequest {
            worker_id: "a".into(),
            endpoint: "http://127.0.0.1:1".into(),
            segments: vec!["footwear".into()],
            model_hash: sandbox.model.hash().to_string(),
        })
        .await
        .expect("register")
        .into_inner()
        .lease_id;
    registry
        .heartbeat(pb::HeartbeatRequest {
            lease_id: lease,
            worker_id: "a".into(),
        })
        .await
        .expect("holder renews");
    let err = registry
        .heartbeat(pb::HeartbeatRequest {
            lease_id: lease,
            worker_id: "b".into(),
        })
        .await
        .expect_err("another worker must not renew it");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("register again"),
        "{}",
        err.message()
    );
    sandbox.stop().await;
}

/// A frame far larger than any valid tensor (5 MiB, over gRPC's default 4 MiB message
/// limit) is answered with its own INVALID_ARGUMENT, and the frames after it still get
/// predictions on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_gets_its_own_error_and_the_stream_goes_on() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(3);
    let feats = features(&model, &images);
    let mut msgs = frames(&model, &feats, Codec::Int8);
    if let Some(pb::edge_message::Kind::Frame(f)) = &mut msgs[1].kind {
        f.features.as_mut().expect("features").data = vec![7u8; 5 << 20].into();
    }
    let answers = sandbox.classify(msgs).await;
    assert_frame_error(&answers[&1], tonic::Code::InvalidArgument, "bytes");
    for seq in [0, 2] {
        assert!(
            matches!(answers[&seq], pb::cloud_message::Kind::Prediction(_)),
            "frame {seq}: {:?}",
            answers[&seq]
        );
    }
    sandbox.stop().await;
}
