//! The coordinator's routing cost, without model compute: an in-process coordinator and one
//! stub worker per top-level branch (answering at once with zero logits), one inference
//! stream. An iteration pushes 256 frames (a window of 256 in flight) and waits for all 256
//! answers; throughput is in frames. Scenarios: all categories (every frame goes to the 3
//! branches) and a footwear-only task (one branch).
//!
//! `cargo bench -p spotlight-tests --bench router`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spotlight_bench::stub::StubWorker;
use spotlight_codec::Codec;
use spotlight_coordinator::CoordinatorConfig;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_tests::Sandbox;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// Frames pushed per iteration, all in flight at once.
const WINDOW: usize = 256;

/// Coordinator, stubs and one open inference stream.
struct Rig {
    sandbox: Sandbox,
    stubs: Vec<StubWorker>,
    tx: mpsc::Sender<pb::EdgeMessage>,
    inbound: tonic::Streaming<pb::CloudMessage>,
    features: pb::FeatureTensor,
    next_seq: u64,
    /// What every answer must show under the current task.
    task_version: u64,
    categories: usize,
}

impl Rig {
    async fn start() -> Rig {
        let dir = spotlight_tests::repo_root().join("models/fashion-mnist-nested");
        let model = Arc::new(Model::load(dir).expect("shipped model"));
        let config = CoordinatorConfig {
            max_in_flight_per_stream: WINDOW,
            ..CoordinatorConfig::default()
        };
        let sandbox = Sandbox::start_coordinator(model.clone(), config).await;
        let roots: Vec<String> = model
            .segments()
            .iter()
            .filter(|s| s.parent.is_none())
            .map(|s| s.id.clone())
            .collect();
        let mut stubs = Vec::new();
        for root in roots {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let stub = StubWorker::start(
                model.clone(),
                format!("http://{}", sandbox.grpc),
                format!("stub-{root}"),
                vec![root],
                listener,
            )
            .await
            .expect("stub worker");
            stubs.push(stub);
        }
        let (tx, inbound) = sandbox.open_stream().await;
        let zeros = spotlight_codec::encode(Codec::Int8, &vec![0.0; model.feature_len()]);
        let features = pb::FeatureTensor {
            codec: Codec::Int8.wire(),
            shape: model.feature_shape(1),
            data: zeros.data.into(),
            scale: zeros.scale,
            zero_point: zeros.zero_point,
            ..Default::default()
        };
        let task = sandbox
            .control()
            .await
            .get_task(pb::GetTaskRequest {})
            .await
            .expect("task")
            .into_inner();
        Rig {
            stubs,
            tx,
            inbound,
            features,
            next_seq: 0,
            task_version: task.version,
            categories: model.categories().len(),
            sandbox,
        }
    }

    /// Sets the task (`categories` by name; empty = all).
    async fn set_task(&mut self, categories: &[&str]) {
        let task = self
            .sandbox
            .control()
            .await
            .set_task(pb::SetTaskRequest {
                categories: categories.iter().map(|c| c.to_string()).collect(),
                gains: Default::default(),
            })
            .await
            .expect("set task")
            .into_inner();
        self.task_version = task.version;
        self.categories = if categories.is_empty() {
            self.sandbox.model.categories().len()
        } else {
            categories.len()
        };
    }

    /// Pushes `n` frames and waits for their `n` answers (all predictions).
    async fn round(&mut self, n: usize) {
        for _ in 0..n {
            let frame = pb::Frame {
                seq: self.next_seq,
                features: Some(self.features.clone()),
            };
            self.next_seq += 1;
            self.tx
                .send(pb::EdgeMessage {
                    kind: Some(pb::edge_message::Kind::Frame(frame)),
                })
                .await
                .expect("stream open");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for got in 0..n {
            let msg = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .unwrap_or_else(|_| panic!("{got} of {n} frames answered within 30 s"))
                .expect("stream error")
                .expect("stream open");
            match msg.kind {
                Some(pb::cloud_message::Kind::Prediction(p)) => {
                    assert_eq!(p.task_version, self.task_version, "task in force");
                    assert_eq!(p.scores.len(), self.categories, "categories scored");
                }
                other => panic!("expected a prediction, got {other:?}"),
            }
        }
    }

    fn stub_frames(&self) -> u64 {
        self.stubs.iter().map(StubWorker::frames).sum()
    }

    async fn stop(self) {
        drop(self.tx);
        for stub in self.stubs {
            stub.stop().await;
        }
        self.sandbox.stop().await;
    }
}

fn router(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let mut rig = rt.block_on(Rig::start());
    // Warm the links (streams to the workers open on the first frame).
    rt.block_on(rig.round(WINDOW));
    assert_eq!(rig.stub_frames(), 3 * WINDOW as u64, "3 branches per frame");

    let mut group = c.benchmark_group("router");
    group.throughput(Throughput::Elements(WINDOW as u64));
    group.bench_function("all categories, 3 branches", |b| {
        b.iter(|| rt.block_on(rig.round(WINDOW)))
    });

    rt.block_on(rig.set_task(&["Sandal", "Sneaker", "Ankle boot"]));
    let before = rig.stub_frames();
    rt.block_on(rig.round(WINDOW));
    assert_eq!(
        rig.stub_frames() - before,
        WINDOW as u64,
        "footwear frames go to one branch"
    );
    group.bench_function("footwear only, 1 branch", |b| {
        b.iter(|| rt.block_on(rig.round(WINDOW)))
    });
    group.finish();
    rt.block_on(rig.stop());
}

criterion_group!(benches, router);
criterion_main!(benches);
