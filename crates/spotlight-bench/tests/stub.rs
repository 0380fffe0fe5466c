//! Stub workers behind a real coordinator, on 127.0.0.1:0.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spotlight_bench::stub::StubWorker;
use spotlight_codec::Codec;
use spotlight_coordinator::{CoordinatorConfig, Listeners};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout, timeout_at};
use tonic::Code;
use tonic::transport::Channel;

fn model() -> Arc<Model> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-nested");
    Arc::new(Model::load(dir).expect("shipped model"))
}

fn roots(model: &Model) -> Vec<String> {
    model
        .segments()
        .iter()
        .filter(|s| s.parent.is_none())
        .map(|s| s.id.clone())
        .collect()
}

/// A zero feature tensor of the model's shape.
fn tensor(model: &Model, codec: Codec) -> pb::FeatureTensor {
    let e = spotlight_codec::encode(codec, &vec![0.0; model.feature_len()]);
    pb::FeatureTensor {
        codec: codec.wire(),
        shape: model.feature_shape(1),
        data: e.data.into(),
        scale: e.scale,
        zero_point: e.zero_point,
        ..Default::default()
    }
}

fn run(id: &str) -> pb::SegmentRun {
    pb::SegmentRun {
        segment_id: id.into(),
        gain: 1.0,
    }
}

/// A coordinator serving on 127.0.0.1:0.
struct Coordinator {
    grpc: SocketAddr,
    stop: oneshot::Sender<()>,
    join: tokio::task::JoinHandle<Result<(), spotlight_coordinator::CoordinatorError>>,
}

impl Coordinator {
    async fn start(model: Arc<Model>, lease_ttl_ms: u64) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let config = CoordinatorConfig {
            lease_ttl_ms,
            no_worker_wait_ms: 300,
            ..CoordinatorConfig::default()
        };
        let (stop, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(spotlight_coordinator::run(
            config,
            model,
            Listeners { grpc, http },
            async {
                let _ = rx.await;
            },
        ));
        Self {
            grpc: addr,
            stop,
            join,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn control(&self) -> pb::control_client::ControlClient<Channel> {
        pb::control_client::ControlClient::connect(self.url())
            .await
            .unwrap()
    }

    async fn live_workers(&self) -> Vec<pb::WorkerInfo> {
        self.control()
            .await
            .list_workers(pb::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers
    }

    /// Polls until `n` workers are live; panics after 10 s.
    async fn wait_for_workers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = self.live_workers().await.len();
            if live == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{live} workers live, expected {n}, after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let r = timeout(Duration::from_secs(10), self.join).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "coordinator did not stop cleanly: {r:?}"
        );
    }
}

async fn start_stub(
    model: &Arc<Model>,
    coordinator: &Coordinator,
    id: &str,
    branches: &[&str],
) -> anyhow::Result<StubWorker> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    StubWorker::start(
        model.clone(),
        coordinator.url(),
        id.into(),
        branches.iter().map(|b| b.to_string()).collect(),
        listener,
    )
    .await
}

async fn branches_client(stub: &StubWorker) -> pb::branches_client::BranchesClient<Channel> {
    pb::branches_client::BranchesClient::connect(format!("http://{}", stub.addr))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_is_routed_to_every_branch_and_answered() {
    let model = model();
    let coordinator = Coordinator::start(model.clone(), 2000).await;
    let mut stubs = Vec::new();
    for root in roots(&model) {
        stubs.push(
            start_stub(&model, &coordinator, &root, &[root.as_str()])
                .await
                .unwrap(),
        );
    }
    assert_eq!(stubs.len(), 3, "the model has 3 top-level branches");
    // `start` returns once registered.
    assert_eq!(coordinator.live_workers().await.len(), 3);

    let n = 200u64;
    let (tx, rx) = tokio::sync::mpsc::channel(n as usize + 1);
    tx.send(pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
            model_hash: model.hash().into(),
            edge_id: "stub-test".into(),
            batch_answers: false,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let features = tensor(&model, Codec::Int8);
    for seq in 0..n {
        tx.send(pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Frame(pb::Frame {
                seq,
                features: Some(features.clone()),
            })),
        })
        .await
        .unwrap();
    }
    let mut inference = pb::inference_client::InferenceClient::connect(coordinator.url())
        .await
        .unwrap();
    let mut inbound = inference
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = BTreeSet::new();
    let mut ready = false;
    while seen.len() < n as usize {
        let msg = timeout_at(deadline, inbound.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} frames answered within 30 s", seen.len()))
            .unwrap()
            .unwrap_or_else(|| panic!("stream closed after {} answers", seen.len()));
        match msg.kind.unwrap() {
            pb::cloud_message::Kind::Ready(_) => {
                assert!(!ready, "two readies");
                ready = true;
            }
            pb::cloud_message::Kind::Prediction(p) => {
                assert!(ready, "prediction before ready");
                assert_eq!(p.scores.len(), 10, "all categories scored: {p:?}");
                let cost = p.cost.unwrap();
                assert_eq!(cost.segments_run.len(), model.segments().len());
                assert!(seen.insert(p.seq), "frame {} answered twice", p.seq);
            }
            pb::cloud_message::Kind::Error(e) => panic!("frame {} failed: {}", e.seq, e.message),
            pb::cloud_message::Kind::Answers(_) => panic!("answer batch without batch_answers"),
        }
    }
    assert_eq!(seen, (0..n).collect::<BTreeSet<_>>());
    drop(tx);

    // Each frame ran once on each branch.
    for stub in &stubs {
        assert_eq!(stub.frames(), n, "stub {}", stub.worker_id);
        let stats = branches_client(stub)
            .await
            .stats(pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.worker_id, stub.worker_id);
        assert_eq!(stats.requests, n);
        assert_eq!(stats.segments_run.get(&stub.worker_id), Some(&n));
    }
    assert_eq!(stubs.iter().map(StubWorker::frames).sum::<u64>(), 3 * n);

    // Stopping deregisters at once (the lease would last 2 s).
    for stub in stubs {
        stub.stop().await;
    }
    assert!(coordinator.live_workers().await.is_empty());
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_shaped_like_a_workers_and_requests_are_checked() {
    let model = model();
    let coordinator = Coordinator::start(model.clone(), 2000).await;
    let stub = start_stub(&model, &coordinator, "tops-stub", &["tops"])
        .await
        .unwrap();
    let mut client = branches_client(&stub).await;
    let good = tensor(&model, Codec::F16);
    let mut bad_shape = good.clone();
    bad_shape.shape = vec![1, 8, 7, 6];
    let mut short = tensor(&model, Codec::F32);
    short.data = short.data.slice(..100);
    let tops = || vec![run("tops"), run("tops.light"), run("tops.warm")];

    let batches = vec![
        // 1: frames 1 and 3 malformed.
        pb::RunBatch {
            batch_id: 11,
            model_hash: model.hash().into(),
            segments: tops(),
            features: vec![good.clone(), bad_shape, good.clone(), short],
        },
        // 2: another model.
        pb::RunBatch {
            batch_id: 12,
            model_hash: "sha256:other".into(),
            segments: tops(),
            features: vec![good.clone(), good.clone()],
        },
        // 3: a branch hosted elsewhere.
        pb::RunBatch {
            batch_id: 13,
            model_hash: model.hash().into(),
            segments: vec![run("footwear")],
            features: vec![good.clone()],
        },
        // 4: a child without its parent.
        pb::RunBatch {
            batch_id: 14,
            model_hash: model.hash().into(),
            segments: vec![run("tops.light")],
            features: vec![good.clone()],
        },
        // 5: only the parent: it scores nothing directly.
        pb::RunBatch {
            batch_id: 15,
            model_hash: model.hash().into(),
            segments: vec![run("tops")],
            features: vec![good.clone()],
        },
    ];
    let count = batches.len();
    let mut results = client
        .run_stream(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < count {
        let r = timeout_at(deadline, results.message())
            .await
            .expect("results within 10 s")
            .unwrap()
            .expect("stream open");
        assert!(
            answers.insert(r.batch_id, r).is_none(),
            "batch answered twice"
        );
    }

    let r = &answers[&11];
    assert_eq!(r.rows, vec![0, 2]);
    assert_eq!(
        r.errors
            .iter()
            .map(|e| (e.index, e.code))
            .collect::<Vec<_>>(),
        vec![
            (1, Code::InvalidArgument as i32),
            (3, Code::InvalidArgument as i32)
        ]
    );
    let outputs: Vec<(&str, &[u32], &[f32])> = r
        .outputs
        .iter()
        .map(|o| (o.segment_id.as_str(), &o.categories[..], &o.logits[..]))
        .collect();
    assert_eq!(
        outputs,
        vec![
            ("tops.light", &[0u32, 6][..], &[0.0f32; 4][..]),
            ("tops.warm", &[2, 4][..], &[0.0; 4][..]),
        ]
    );

    let r = &answers[&12];
    assert!(r.rows.is_empty() && r.outputs.is_empty());
    assert_eq!(r.errors.len(), 2);
    for (i, e) in r.errors.iter().enumerate() {
        assert_eq!(e.index, i as u32);
        assert_eq!(e.code, Code::FailedPrecondition as i32, "{}", e.message);
    }
    let r = &answers[&13];
    assert!(r.rows.is_empty());
    assert_eq!(
        r.errors[0].code,
        Code::NotFound as i32,
        "{}",
        r.errors[0].message
    );
    let r = &answers[&14];
    assert!(r.rows.is_empty());
    assert_eq!(
        r.errors[0].code,
        Code::InvalidArgument as i32,
        "{}",
        r.errors[0].message
    );
    let r = &answers[&15];
    assert_eq!(r.rows, vec![0]);
    assert!(r.outputs.is_empty() && r.errors.is_empty());

    // Unary Run: the same answers, as a response or a status.
    let response = client
        .run(pb::RunRequest {
            model_hash: model.hash().into(),
            features: Some(tensor(&model, Codec::Int8)),
            segments: tops(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs.len(), 2);
    assert!(response.outputs.iter().all(|o| o.logits == vec![0.0; 2]));
    let refused = client
        .run(pb::RunRequest {
            model_hash: "sha256:other".into(),
            features: Some(good),
            segments: tops(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Frames that ran: 2 + 1 + 1.
    assert_eq!(stub.frames(), 4);
    let stats = client
        .stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.requests, 4);
    assert_eq!(stats.segments_run["tops"], 4);
    assert_eq!(stats.segments_run["tops.light"], 3);
    assert_eq!(stats.segment_batches["tops"], 3);
    assert!(!stats.segments_run.contains_key("footwear"));

    stub.stop().await;
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_short_lease() {
    let model = model();
    let ttl = Duration::from_millis(300);
    let coordinator = Coordinator::start(model.clone(), ttl.as_millis() as u64).await;
    let stub = start_stub(&model, &coordinator, "all", &[]).await.unwrap();
    let workers = coordinator.live_workers().await;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].segments.len(), model.segments().len());
    // Live all along, over several lease lifetimes.
    let until = Instant::now() + 5 * ttl;
    while Instant::now() < until {
        assert_eq!(coordinator.live_workers().await.len(), 1, "lease lapsed");
        tokio::time::sleep(ttl / 10).await;
    }
    stub.stop().await;
    coordinator.wait_for_workers(0).await;
    coordinator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_an_error() {
    let model = model();
    let coordinator = Coordinator::start(model.clone(), 2000).await;

    let mut manifest = model.manifest().clone();
    manifest.content_hash = "sha256:0000".into();
    let other = Arc::new(Model::from_manifest(model.dir().to_path_buf(), manifest).unwrap());
    let e = start_stub(&other, &coordinator, "other-model", &[])
        .await
        .err()
        .expect("another model is refused");
    assert!(format!("{e:#}").contains("FailedPrecondition"), "{e:#}");

    let e = start_stub(&model, &coordinator, "child", &["tops.light"])
        .await
        .err()
        .expect("a nested segment is not a branch");
    assert!(format!("{e:#}").contains("top-level"), "{e:#}");

    assert!(coordinator.live_workers().await.is_empty());
    coordinator.stop().await;
}
