//! A sandbox that starts a coordinator and N workers in-process on `127.0.0.1:0`, plus
//! helpers to stream frames, so every end-to-end test stays short.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use spotlight_codec::Codec;
use spotlight_coordinator::{CoordinatorConfig, Listeners};
use spotlight_model::{Model, preprocess};
use spotlight_proto::v1 as pb;
use spotlight_runtime::BackboneSession;
use spotlight_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=info cargo test -- --nocapture`).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    }
}

/// The shipped model, loaded once per test binary.
pub fn model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    init_logs();
    MODEL
        .get_or_init(|| {
            spotlight_runtime::init_onnxruntime(None)
                .expect("ONNX Runtime (run `make onnxruntime`)");
            Arc::new(
                Model::load(repo_root().join("models/fashion-mnist-nested"))
                    .expect("shipped model"),
            )
        })
        .clone()
}

/// Copies the package at `src` (its manifest and every file the manifest lists that `keep`
/// accepts) into `dst`, lets `edit` change the manifest, and writes it with its content
/// hash recomputed: a valid package that differs from `src` only by the edit.
pub fn resealed_copy(
    src: &Path,
    dst: &Path,
    keep: impl Fn(&str) -> bool,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let text = std::fs::read_to_string(src.join("manifest.json")).expect("read manifest");
    let mut manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest JSON");
    let files: Vec<String> = manifest["files"]
        .as_object()
        .expect("files")
        .keys()
        .filter(|f| keep(f))
        .cloned()
        .collect();
    for rel in files {
        let to = dst.join(&rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src.join(&rel), to).expect("copy");
    }
    edit(&mut manifest);
    manifest["content_hash"] = spotlight_model::content_hash(&manifest.to_string())
        .expect("hash")
        .into();
    std::fs::write(dst.join("manifest.json"), manifest.to_string()).expect("write manifest");
}

/// Fashion-MNIST test images and labels (`n` first), from the Debian package or
/// `SPOTLIGHT_FASHION_MNIST_DIR`.
pub fn test_images(n: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
    let dir = std::env::var_os("SPOTLIGHT_FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"));
    let read = |name: &str| {
        let path = dir.join(name);
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `make dataset`)", path.display()));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut bytes)
            .expect("gunzip");
        bytes
    };
    let images = read("t10k-images-idx3-ubyte.gz");
    let labels = read("t10k-labels-idx1-ubyte.gz");
    assert_eq!(&images[..4], &[0, 0, 8, 3], "idx3 magic");
    let size = 28 * 28;
    let n = n.min(10_000);
    let imgs = (0..n)
        .map(|i| images[16 + i * size..16 + (i + 1) * size].to_vec())
        .collect();
    (imgs, labels[8..8 + n].to_vec())
}

/// Backbone features (fp32, batch of one each) of `images`.
pub fn features(model: &Model, images: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let mut backbone = BackboneSession::open(model, 2).expect("backbone");
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for chunk in images.chunks(100) {
        let mut batch = Vec::new();
        for img in chunk {
            preprocess(&model.manifest().input, img, &mut buf);
            batch.extend_from_slice(&buf);
        }
        let feats = backbone.run(batch, chunk.len()).expect("backbone run");
        out.extend(feats.chunks(model.feature_len()).map(<[f32]>::to_vec));
    }
    out
}

/// A frame carrying `features` encoded with `codec`.
pub fn frame(model: &Model, seq: u64, features: &[f32], codec: Codec) -> pb::EdgeMessage {
    let e = spotlight_codec::encode(codec, features);
    pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Frame(pb::Frame {
            seq,
            features: Some(pb::FeatureTensor {
                codec: codec.wire(),
                shape: model.feature_shape(1),
                data: e.data.into(),
                scale: e.scale,
                zero_point: e.zero_point,
                ..Default::default()
            }),
        })),
    }
}

/// One frame per feature vector, numbered from 0.
pub fn frames(model: &Model, features: &[Vec<f32>], codec: Codec) -> Vec<pb::EdgeMessage> {
    features
        .iter()
        .enumerate()
        .map(|(i, f)| frame(model, i as u64, f, codec))
        .collect()
}

/// Asserts that an answer is a per-frame error with `code` whose message contains `text`.
pub fn assert_frame_error(answer: &pb::cloud_message::Kind, code: tonic::Code, text: &str) {
    match answer {
        pb::cloud_message::Kind::Error(e) => {
            assert_eq!(e.code, code as i32, "{}", e.message);
            assert!(
                e.message.contains(text),
                "\"{}\" does not contain \"{text}\"",
                e.message
            );
        }
        other => panic!("expected a {code:?} error, got {other:?}"),
    }
}

/// The hello for `model`.
pub fn hello(hash: &str) -> pb::EdgeMessage {
    pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
            model_hash: hash.to_string(),
            edge_id: "test".into(),
            batch_answers: false,
            ..Default::default()
        })),
    }
}

/// A running worker.
pub struct WorkerHandle {
    pub id: String,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub join: tokio::task::JoinHandle<Result<(), spotlight_worker::WorkerError>>,
}

impl WorkerHandle {
    /// Stops it (deregisters) and waits.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.join).await;
    }

    /// Its counters.
    pub async fn stats(&self) -> pb::StatsResponse {
        let mut c = pb::branches_client::BranchesClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect worker");
        c.stats(pb::StatsRequest {})
            .await
            .expect("stats")
            .into_inner()
    }
}

/// Coordinator + workers.
pub struct Sandbox {
    pub model: Arc<Model>,
    config: CoordinatorConfig,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub workers: Vec<WorkerHandle>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<CoordinatorJoin>,
}

/// What to start.
pub struct SandboxBuilder {
    config: CoordinatorConfig,
    workers: Vec<(String, Vec<String>)>,
    model: Arc<Model>,
}

impl SandboxBuilder {
    pub fn new() -> Self {
        let config = CoordinatorConfig {
            lease_ttl_ms: 2000,
            no_worker_wait_ms: 300,
            ..CoordinatorConfig::default()
        };
        Self {
            config,
            workers: Vec::new(),
            model: model(),
        }
    }

    /// Adds a worker hosting `branches` (top-level ids; empty = all).
    pub fn worker(mut self, id: &str, branches: &[&str]) -> Self {
        self.workers.push((
            id.to_string(),
            branches.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// One worker per top-level branch, named after it.
    pub fn worker_per_branch(mut self) -> Self {
        let roots: Vec<String> = self
            .model
            .segments()
            .iter()
            .filter(|s| s.parent.is_none())
            .map(|s| s.id.clone())
            .collect();
        for r in roots {
            self.workers.push((r.clone(), vec![r]));
        }
        self
    }

    pub fn config(mut self, f: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        f(&mut self.config);
        self
    }

    pub async fn start(self) -> Sandbox {
        let mut sandbox = Sandbox::start_coordinator(self.model.clone(), self.config).await;
        for (id, branches) in self.workers {
            let w = sandbox
                .start_worker(&id, &branches, self.model.clone())
                .await;
            sandbox.workers.push(w);
        }
        sandbox.wait_for_workers(sandbox.workers.len()).await;
        sandbox
    }
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub async fn start_coordinator(model: Arc<Model>, config: CoordinatorConfig) -> Sandbox {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (grpc_addr, http_addr) = (
            grpc.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        let (tx, join) = spawn_coordinator(config.clone(), model.clone(), Listeners { grpc, http });
        Sandbox {
            model,
            config,
            grpc: grpc_addr,
            http: http_addr,
            workers: Vec::new(),
            stop: Some(tx),
            join: Some(join),
        }
    }

    /// Starts a worker registered with this coordinator (not added to `workers`).
    pub async fn start_worker(
        &self,
        id: &str,
        branches: &[String],
        model: Arc<Model>,
    ) -> WorkerHandle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = WorkerConfig {
            worker_id: id.to_string(),
            coordinator: format!("http://{}", self.grpc),
            branches: branches.to_vec(),
            heartbeat_ms: 300,
            ..WorkerConfig::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(spotlight_worker::run(config, model, listener, async {
            let _ = rx.await;
        }));
        WorkerHandle {
            id: id.to_string(),
            addr,
            stop: Some(tx),
            join,
        }
    }

    /// Polls (≤ 15 s) until `n` workers are live.
    pub async fn wait_for_workers(&self, n: usize) {
        let mut control = self.control().await;
        for _ in 0..300 {
            let live = control
                .list_workers(pb::ListWorkersRequest {})
                .await
                .expect("list")
                .into_inner()
                .workers
                .len();
            if live == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n} workers did not register within 15 s");
    }

    pub async fn control(&self) -> pb::control_client::ControlClient<tonic::transport::Channel> {
        connect_retry(|| {
            pb::control_client::ControlClient::connect(format!("http://{}", self.grpc))
        })
        .await
    }

    pub async fn inference(
        &self,
    ) -> pb::inference_client::InferenceClient<tonic::transport::Channel> {
        connect_retry(|| {
            pb::inference_client::InferenceClient::connect(format!("http://{}", self.grpc))
        })
        .await
    }

    /// Opens a stream: returns the sender of edge messages and the response stream
    /// (after checking the `ready`).
    pub async fn open_stream(
        &self,
    ) -> (
        tokio::sync::mpsc::Sender<pb::EdgeMessage>,
        tonic::Streaming<pb::CloudMessage>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tx.send(hello(self.model.hash()))
            .await
            .expect("queue hello");
        let mut client = self.inference().await;
        let mut inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        match inbound.message().await.expect("ready").and_then(|m| m.kind) {
            Some(pb::cloud_message::Kind::Ready(_)) => {}
            other => panic!("expected ready, got {other:?}"),
        }
        (tx, inbound)
    }

    /// Sends every frame on one stream and collects exactly one answer per frame
    /// (deadline 60 s), keyed by seq.
    pub async fn classify(
        &self,
        frames: Vec<pb::EdgeMessage>,
    ) -> std::collections::BTreeMap<u64, pb::cloud_message::Kind> {
        let n = frames.len();
        let (tx, mut inbound) = self.open_stream().await;
        tokio::spawn(async move {
            for f in frames {
                if tx.send(f).await.is_err() {
                    break;
                }
            }
        });
        collect(&mut inbound, n).await
    }

    /// Stops the coordinator gracefully and starts a new one on the same addresses; the
    /// workers register again by themselves.
    pub async fn restart_coordinator(&mut self) {
        self.stop_coordinator().await;
        let grpc = rebind(self.grpc).await;
        let http = rebind(self.http).await;
        let (tx, join) = spawn_coordinator(
            self.config.clone(),
            self.model.clone(),
            Listeners { grpc, http },
        );
        self.stop = Some(tx);
        self.join = Some(join);
    }

    /// Stops the coordinator gracefully; panics if it does not stop cleanly within 10 s.
    async fn stop_coordinator(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), j).await;
            assert!(
                matches!(r, Ok(Ok(Ok(())))),
                "coordinator did not stop cleanly: {r:?}"
            );
        }
    }

    /// Stops workers and coordinator.
    pub async fn stop(mut self) {
        for w in std::mem::take(&mut self.workers) {
            w.stop().await;
        }
        self.stop_coordinator().await;
    }
}

/// Binds `addr` again once a stopped server has let go of it: its accept task ends on the
/// runtime's next turn, not when `run` returns (≤ 2 s).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse,
                    "rebind {addr}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("rebind {addr}: {e}"),
        }
    }
}

type CoordinatorJoin = tokio::task::JoinHandle<Result<(), spotlight_coordinator::CoordinatorError>>;

/// Runs a coordinator on `listeners` until the returned sender fires (or is dropped).
fn spawn_coordinator(
    config: CoordinatorConfig,
    model: Arc<Model>,
    listeners: Listeners,
) -> (oneshot::Sender<()>, CoordinatorJoin) {
    let (tx, rx) = oneshot::channel::<()>();
    let join = tokio::spawn(spotlight_coordinator::run(
        config,
        model,
        listeners,
        async {
            let _ = rx.await;
        },
    ));
    (tx, join)
}

/// Reads `n` answers keyed by seq; panics on a duplicate or after 60 s.
pub async fn collect(
    inbound: &mut tonic::Streaming<pb::CloudMessage>,
    n: usize,
) -> std::collections::BTreeMap<u64, pb::cloud_message::Kind> {
    use pb::cloud_message::Kind;
    let mut answers = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answers.len() < n {
        let msg = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} frames answered within 60 s", answers.len()))
            .expect("stream error")
            .unwrap_or_else(|| panic!("stream closed after {} of {n} answers", answers.len()));
        let seq = match &msg.kind {
            Some(Kind::Prediction(p)) => p.seq,
            Some(Kind::Error(e)) => e.seq,
            other => panic!("unexpected message {other:?}"),
        };
        assert!(
            answers.insert(seq, msg.kind.expect("kind")).is_none(),
            "frame {seq} answered twice"
        );
    }
    answers
}

async fn connect_retry<T, F, Fut>(f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::transport::Error>>,
{
    for _ in 0..100 {
        if let Ok(c) = f().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect within 5 s")
}

/// Softmax over `logits[idx]` for each idx in `relevant`.
pub fn softmax(logits: &[f32], relevant: &[usize]) -> Vec<f32> {
    let max = relevant
        .iter()
        .map(|&c| logits[c])
        .fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = relevant
        .iter()
        .map(|&c| f64::from(logits[c] - max).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| (x / s) as f32).collect()
}

/// Minimal HTTP/1.1 client for the control API: returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An HTTP answer: status, header block (lower-cased names as sent) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// Like [`http`], with any content type (`None`: no header) and a body of raw bytes.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let content_type = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let out = String::from_utf8_lossy(&out).into_owned();
    let (headers, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    HttpReply {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_string(),
    }
}
