//! The data path to workers: one long-lived `RunStream` per worker, frames coalesced into
//! batched ONNX Runtime runs, per-frame errors inside a batch.

use spotlight_codec::Codec;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::branches_client::BranchesClient;
use spotlight_tests::*;
use tokio_stream::StreamExt;

fn tensor(model: &spotlight_model::Model, values: &[f32], codec: Codec) -> pb::FeatureTensor {
    match frame(model, 0, values, codec).kind {
        Some(pb::edge_message::Kind::Frame(f)) => f.features.expect("features"),
        other => panic!("not a frame: {other:?}"),
    }
}

/// Under load, each worker runs its segments on many frames at once, and still runs each
/// segment exactly once per frame that needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_coalesce_frames_into_batched_runs() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(600);
    let feats = features(&model, &images);
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    assert_eq!(answers.len(), 600);
    assert!(
        answers
            .values()
            .all(|a| matches!(a, pb::cloud_message::Kind::Prediction(_))),
        "every frame gets a prediction"
    );
    for w in &sandbox.workers {
        let stats = w.stats().await;
        for (segment, &runs) in &stats.segments_run {
            assert_eq!(runs, 600, "{segment} ran once per frame");
            let batches = stats.segment_batches[segment];
            // 256 frames in flight: the batcher never waits, yet finds several queued.
            assert!(
                batches * 2 <= runs,
                "{segment}: {runs} frames in {batches} runs; expected a mean batch of at least 2"
            );
        }
        assert_eq!(stats.requests, 600, "{}", w.id);
        assert_eq!(stats.rejected, 0);
    }
    sandbox.stop().await;
}

/// A batch with a bad frame answers that frame with an error and the others with the same
/// logits as one-frame requests; a batch for another model or with a missing parent is
/// refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stream_answers_bad_frames_alone_and_matches_unary_run() {
    let sandbox = SandboxBuilder::new().worker("all", &[]).start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(3);
    let feats = features(&model, &images);
    let mut client = BranchesClient::connect(format!("http://{}", sandbox.workers[0].addr))
        .await
        .expect("connect worker");
    let segments = vec![
        pb::SegmentRun {
            segment_id: "tops".into(),
            gain: 1.0,
        },
        pb::SegmentRun {
            segment_id: "tops.light".into(),
            gain: 2.0,
        },
        pb::SegmentRun {
            segment_id: "footwear".into(),
            gain: 1.0,
        },
    ];
    let mut short = tensor(&model, &feats[1], Codec::F32);
    short.data = short.data.slice(..100);
    let mut infinite = tensor(&model, &feats[1], Codec::F32);
    let mut bytes = infinite.data.to_vec();
    bytes[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    infinite.data = bytes.into();
    let good = [
        tensor(&model, &feats[0], Codec::F32),
        tensor(&model, &feats[2], Codec::F32),
    ];
    let batches = vec![
        pb::RunBatch {
            batch_id: 7,
            model_hash: model.hash().into(),
            segments: segments.clone(),
            features: vec![good[0].clone(), short, good[1].clone(), infinite],
        },
        pb::RunBatch {
            batch_id: 8,
            model_hash: "sha256:other".into(),
            segments: segments.clone(),
            features: vec![good[0].clone()],
        },
        pb::RunBatch {
            batch_id: 9,
            model_hash: model.hash().into(),
            segments: segments[1..].to_vec(),
            features: vec![good[0].clone(), good[1].clone()],
        },
    ];
    let mut results: Vec<pb::RunBatchResult> = client
        .run_stream(tokio_stream::iter(batches))
        .await
        .expect("stream")
        .into_inner()
        .take(3)
        .map(|r| r.expect("result"))
        .collect()
        .await;
    results.sort_by_key(|r| r.batch_id);
    assert_eq!(
        results.iter().map(|r| r.batch_id).collect::<Vec<_>>(),
        [7, 8, 9]
    );

    let mixed = &results[0];
    assert_eq!(mixed.rows, [0, 2]);
    let codes: Vec<(u32, i32)> = mixed.errors.iter().map(|e| (e.index, e.code)).collect();
    assert_eq!(
        codes,
        [
            (1, tonic::Code::InvalidArgument as i32),
            (3, tonic::Code::InvalidArgument as i32)
        ]
    );
    assert!(
        mixed.errors[0].message.contains("bytes"),
        "{:?}",
        mixed.errors[0]
    );
    assert!(
        mixed.errors[1]
            .message
            .contains("is inf; values must be finite"),
        "{:?}",
        mixed.errors[1]
    );
    // Outputs: the segments with direct categories (tops.light, footwear), two rows each.
    let ids: Vec<&str> = mixed
        .outputs
        .iter()
        .map(|o| o.segment_id.as_str())
        .collect();
    assert_eq!(ids, ["tops.light", "footwear"]);
    for (row, t) in good.iter().enumerate() {
        let unary = client
            .run(pb::RunRequest {
                model_hash: model.hash().into(),
                features: Some(t.clone()),
                segments: segments.clone(),
            })
            .await
            .expect("unary run")
            .into_inner();
        for (batched, single) in mixed.outputs.iter().zip(&unary.outputs) {
            let k = batched.categories.len();
            assert_eq!(batched.categories, single.categories);
            let got = &batched.logits[row * k..(row + 1) * k];
            for (a, b) in got.iter().zip(&single.logits) {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "row {row}: {got:?} vs {:?}",
                    single.logits
                );
            }
        }
    }

    for (result, code, text) in [
        (&results[1], tonic::Code::FailedPrecondition, "model"),
        (&results[2], tonic::Code::InvalidArgument, "parent"),
    ] {
        assert!(result.rows.is_empty() && result.outputs.is_empty());
        assert!(!result.errors.is_empty());
        for e in &result.errors {
            assert_eq!(e.code, code as i32, "{}", e.message);
            assert!(e.message.contains(text), "{}", e.message);
        }
    }
    sandbox.stop().await;
}

/// How a misbehaving worker answers a batch.
type Answer = fn(&pb::RunBatch) -> pb::RunBatchResult;

/// A worker that answers every batch with what `answer` makes of it.
struct BadWorker {
    answer: Answer,
}

#[tonic::async_trait]
impl pb::branches_server::Branches for BadWorker {
    async fn run(
        &self,
        _: tonic::Request<pb::RunRequest>,
    ) -> Result<tonic::Response<pb::RunResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stream only"))
    }

    type RunStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::RunBatchResult, tonic::Status>> + Send>,
    >;

    async fn run_stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::RunBatch>>,
    ) -> Result<tonic::Response<Self::RunStreamStream>, tonic::Status> {
        let answer = self.answer;
        let out = request.into_inner().map(move |b| b.map(|b| answer(&b)));
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn stats(
        &self,
        _: tonic::Request<pb::StatsRequest>,
    ) -> Result<tonic::Response<pb::StatsResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::StatsResponse::default()))
    }
}

/// Serves `answer` as the only worker for every segment; returns after it is registered.
async fn bad_worker(sandbox: &Sandbox, answer: Answer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::branches_server::BranchesServer::new(BadWorker {
                answer,
            }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let mut registry =
        pb::registry_client::RegistryClient::connect(format!("http://{}", sandbox.grpc))
            .await
            .expect("connect registry");
    registry
        .register(pb::RegisterRequest {
            worker_id: "bad".into(),
            endpoint: format!("http://{addr}"),
            segments: sandbox
                .model
                .segments()
                .iter()
                .map(|s| s.id.clone())
                .collect(),
            model_hash: sandbox.model.hash().into(),
        })
        .await
        .expect("register");
}

/// Logits of one segment the batch asked for, `value` everywhere, one row per frame.
fn answer_with(
    b: &pb::RunBatch,
    segment: &str,
    categories: Vec<u32>,
    value: f32,
) -> pb::RunBatchResult {
    pb::RunBatchResult {
        batch_id: b.batch_id,
        rows: (0..b.features.len() as u32).collect(),
        outputs: vec![pb::SegmentOutput {
            segment_id: segment.into(),
            logits: vec![value; b.features.len() * categories.len()],
            categories,
        }],
        errors: Vec::new(),
    }
}

/// A worker's answer is checked: non-finite logits, segments not asked, or another
/// segment's categories make that frame an INTERNAL error naming the worker, never a
/// prediction (with NaN scores or made-up categories).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_worker_answers_become_errors_not_predictions() {
    let cases: [(Answer, &str); 4] = [
        (
            |b| answer_with(b, "footwear", vec![5, 7, 9], f32::INFINITY),
            "non-finite",
        ),
        (|b| answer_with(b, "other", vec![1, 3, 8], 0.0), "not asked"),
        (|b| answer_with(b, "footwear", vec![1, 3, 8], 0.0), "scores"),
        (
            |b| pb::RunBatchResult {
                batch_id: b.batch_id,
                rows: vec![0, 0],
                ..Default::default()
            },
            "twice",
        ),
    ];
    for (answer, text) in cases {
        let sandbox = SandboxBuilder::new().start().await;
        sandbox
            .control()
            .await
            .set_task(pb::SetTaskRequest {
                categories: vec!["Sandal".into(), "Sneaker".into(), "Ankle boot".into()],
                gains: Default::default(),
            })
            .await
            .expect("task");
        bad_worker(&sandbox, answer).await;
        let model = sandbox.model.clone();
        let (images, _) = test_images(4);
        let feats = features(&model, &images);
        let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
        assert_eq!(answers.len(), 4);
        for a in answers.values() {
            assert_frame_error(a, tonic::Code::Internal, text);
            assert_frame_error(a, tonic::Code::Internal, "worker \"bad\"");
        }
        sandbox.stop().await;
    }
}

/// An edge may send several frames per message and take several answers per message:
/// every frame is still answered exactly once, with the same prediction as alone. A batch
/// over the limit is refused with one error and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_batches_and_answer_batches_answer_every_frame_once() {
    use pb::cloud_message::Kind;
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(300);
    let feats = features(&model, &images);
    let alone = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
            model_hash: model.hash().into(),
            edge_id: "batching".into(),
            batch_answers: true,
            ..Default::default()
        })),
    })
    .await
    .expect("hello");
    let mut inbound = sandbox
        .inference()
        .await
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let one: Vec<pb::Frame> = frames(&model, &feats, Codec::Int8)
        .into_iter()
        .filter_map(|m| match m.kind {
            Some(pb::edge_message::Kind::Frame(f)) => Some(f),
            _ => None,
        })
        .collect();
    let too_many = vec![one[0].clone(); 4097];
    for chunk in [one[..100].to_vec(), too_many, one[100..].to_vec()] {
        tx.send(pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Frames(pb::FrameBatch {
                frames: chunk,
            })),
        })
        .await
        .expect("send");
    }
    let mut answers = std::collections::BTreeMap::new();
    let mut refused = Vec::new();
    let mut batched_messages = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while answers.len() < 300 || refused.len() < 4097 {
        let msg = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .expect("answers within 60 s")
            .expect("stream ok")
            .expect("stream open");
        let (predictions, errors) = match msg.kind {
            Some(Kind::Ready(_)) => continue,
            Some(Kind::Prediction(p)) => (vec![p], vec![]),
            Some(Kind::Error(e)) => (vec![], vec![e]),
            Some(Kind::Answers(b)) => {
                batched_messages += 1;
                (b.predictions, b.errors)
            }
            None => panic!("empty message"),
        };
        for e in errors {
            // Each frame of the refused batch is answered (they are copies of seq 0).
            assert_eq!(e.seq, 0, "only the refused batch errs: {e:?}");
            assert!(e.message.contains("at most 4096"), "{}", e.message);
            refused.push(e);
        }
        for p in predictions {
            let seq = p.seq;
            assert!(
                answers.insert(seq, p).is_none(),
                "frame {seq} answered twice"
            );
        }
    }
    assert_eq!(refused.len(), 4097, "one error per refused frame");
    assert!(batched_messages > 0, "answers ready together came batched");
    for (seq, p) in &answers {
        let Kind::Prediction(single) = &alone[seq] else {
            panic!("frame {seq} failed alone")
        };
        assert_eq!(p.top_index, single.top_index, "frame {seq}");
        for (a, b) in p.scores.iter().zip(&single.scores) {
            assert_eq!(a.index, b.index);
            assert!((a.score - b.score).abs() < 1e-5, "frame {seq}");
        }
    }
    sandbox.stop().await;
}

/// `max_batch` caps the frames of one ONNX Runtime run even when one request brings more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_caps_each_run_even_for_a_large_request() {
    let sandbox = SandboxBuilder::new().start().await;
    let model = sandbox.model.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = spotlight_worker::WorkerConfig {
        worker_id: "small-batches".into(),
        coordinator: format!("http://{}", sandbox.grpc),
        branches: vec!["footwear".into()],
        max_batch: 2,
        heartbeat_ms: 300,
        ..spotlight_worker::WorkerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(spotlight_worker::run(
        config,
        model.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    sandbox.wait_for_workers(1).await;
    let (images, _) = test_images(5);
    let feats = features(&model, &images);
    let mut client = BranchesClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let batch = pb::RunBatch {
        batch_id: 1,
        model_hash: model.hash().into(),
        segments: vec![pb::SegmentRun {
            segment_id: "footwear".into(),
            gain: 1.0,
        }],
        features: feats
            .iter()
            .map(|f| tensor(&model, f, Codec::Int8))
            .collect(),
    };
    let result = client
        .run_stream(tokio_stream::iter(vec![batch]))
        .await
        .expect("stream")
        .into_inner()
        .next()
        .await
        .expect("a result")
        .expect("ok");
    assert_eq!(result.rows, [0, 1, 2, 3, 4]);
    assert_eq!(result.outputs[0].logits.len(), 5 * 3);
    let stats = client
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.segments_run["footwear"], 5);
    assert_eq!(
        stats.segment_batches["footwear"], 3,
        "runs of 2, 2 and 1 frames"
    );
    let _ = stop.send(());
    let _ = worker.await;
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_global_in_flight_limit_is_backpressure_not_loss() {
    // Four frames in flight over all streams; three streams of 40 frames each share them.
    let sandbox = SandboxBuilder::new()
        .config(|c| {
            c.max_in_flight_per_stream = 4;
            c.max_in_flight_total = 4;
        })
        .worker_per_branch()
        .start()
        .await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(40);
    let feats = features(&model, &images);
    let sandbox = std::sync::Arc::new(sandbox);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let (s, f) = (sandbox.clone(), frames(&model, &feats, Codec::Int8));
        runs.push(tokio::spawn(async move { s.classify(f).await }));
    }
    for r in runs {
        let answers = tokio::time::timeout(std::time::Duration::from_secs(60), r)
            .await
            .expect("no deadlock under the global limit")
            .expect("join");
        assert_eq!(answers.len(), 40);
        assert!(
            answers
                .values()
                .all(|k| matches!(k, pb::cloud_message::Kind::Prediction(_))),
            "{answers:?}"
        );
    }
}

/// A replica that hands every frame back (UNAVAILABLE per frame, as a draining worker
/// does) loses none: the coordinator runs them on another replica, counts them as
/// re-routed, and does not count the hand-back against the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_handed_back_by_a_draining_replica_run_on_another() {
    let sandbox = SandboxBuilder::new().worker("good", &[]).start().await;
    bad_worker(&sandbox, |b| pb::RunBatchResult {
        batch_id: b.batch_id,
        errors: (0..b.features.len() as u32)
            .map(|index| pb::ItemError {
                index,
                code: tonic::Code::Unavailable as i32,
                message: "worker is shutting down; the frame is handed back".into(),
            })
            .collect(),
        ..Default::default()
    })
    .await;
    sandbox.wait_for_workers(2).await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(200);
    let feats = features(&model, &images);
    let answers = sandbox.classify(frames(&model, &feats, Codec::Int8)).await;
    assert_eq!(answers.len(), 200);
    for a in answers.values() {
        assert!(
            matches!(a, pb::cloud_message::Kind::Prediction(_)),
            "every frame predicted: {a:?}"
        );
    }
    let (_, text) = http(sandbox.http, "GET", "/metrics", "").await;
    let m = spotlight_service::metrics::parse_text(&text);
    let handed_back = m
        .get("spotlight_coordinator_rerouted_frames_total{reason=\"handed_back\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        handed_back > 0.0,
        "some frames went to the replica that hands back: {text}"
    );
    let (_, body) = http(sandbox.http, "GET", "/v1/workers", "").await;
    let workers: serde_json::Value = serde_json::from_str(&body).expect("json");
    for w in workers["workers"].as_array().expect("list") {
        assert_eq!(w["failures"], 0, "a hand-back is no failure: {w}");
    }
    sandbox.stop().await;
}
