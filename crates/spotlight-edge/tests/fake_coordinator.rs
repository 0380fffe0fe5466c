//! The edge agent against an in-process fake coordinator on 127.0.0.1:0: full pipeline
//! with the real backbone, reconnect with re-send, model mismatch, giving up, local API.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use spotlight_edge::{EdgeConfig, EdgeError, ReconnectConfig, RunOptions, SourceConfig};
use spotlight_model::Model;
use spotlight_proto::v1::inference_server::{Inference, InferenceServer};
use spotlight_proto::v1::{
    CategoryScore, CloudMessage, Cost, EdgeMessage, Prediction, Ready, cloud_message, edge_message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
const LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

fn model() -> Option<Arc<Model>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-nested");
    // No silent skip: without ONNX Runtime these tests would prove nothing.
    if let Err(e) = spotlight_runtime::init_onnxruntime(None) {
        panic!("{e}");
    }
    Some(Arc::new(Model::load(dir).unwrap()))
}

/// Answers frame `seq` with category `seq % 10`; the first stream breaks after
/// `break_after` frames, answering only the even ones.
struct Fake {
    hash: String,
    break_after: Option<usize>,
    /// The first stream stays open but stops answering after this many frames.
    stall_after: Option<usize>,
    streams: AtomicUsize,
    /// Frames received per seq, over all streams.
    seen: Arc<Mutex<HashMap<u64, usize>>>,
}

#[tonic::async_trait]
impl Inference for Fake {
    type StreamStream = ReceiverStream<Result<CloudMessage, tonic::Status>>;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<EdgeMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(EdgeMessage {
                kind: Some(edge_message::Kind::Hello(h)),
            }) => h,
            _ => return Err(tonic::Status::invalid_argument("expected hello")),
        };
        if hello.model_hash != self.hash {
            return Err(tonic::Status::failed_precondition(format!(
                "model hash {} differs from {}",
                hello.model_hash, self.hash
            )));
        }
        let stream_no = self.streams.fetch_add(1, Ordering::SeqCst);
        let break_after = self.break_after.filter(|_| stream_no == 0);
        let stall_after = self.stall_after.filter(|_| stream_no == 0);
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(256);
        tx.send(Ok(CloudMessage {
            kind: Some(cloud_message::Kind::Ready(Ready {
                task_version: 1,
                model_name: "fake".into(),
            })),
        }))
        .await
        .unwrap();
        tokio::spawn(async move {
            let mut n = 0;
            let mut queue = std::collections::VecDeque::new();
            loop {
                let f = match queue.pop_front() {
                    Some(f) => f,
                    None => match inbound.message().await {
                        Ok(Some(msg)) => {
                            match msg.kind {
                                Some(edge_message::Kind::Frame(f)) => queue.push_back(f),
                                // The edge puts the frames ready together in one message.
                                Some(edge_message::Kind::Frames(b)) => queue.extend(b.frames),
                                _ => {}
                            }
                            continue;
                        }
                        _ => break,
                    },
                };
                *seen.lock().unwrap().entry(f.seq).or_default() += 1;
                n += 1;
                if break_after.is_some_and(|b| n > b) {
                    let _ = tx.send(Err(tonic::Status::unavailable("fake break"))).await;
                    return;
                }
                if break_after.is_some() && f.seq % 2 == 1 {
                    continue;
                }
                if stall_after.is_some_and(|b| n > b) {
                    continue;
                }
                let top = (f.seq % 10) as u32;
                let p = Prediction {
                    seq: f.seq,
                    task_version: 1,
                    top_index: top,
                    top_name: format!("c{top}"),
                    scores: (0..10)
                        .map(|i| CategoryScore {
                            index: i,
                            name: format!("c{i}"),
                            score: if i == top { 0.91 } else { 0.01 },
                            logit: 0.0,
                        })
                        .collect(),
                    cost: Some(Cost {
                        segments_run: vec![],
                        cloud_macs: 1000,
                        cloud_macs_saved: 0,
                    }),
                };
                let msg = CloudMessage {
                    kind: Some(cloud_message::Kind::Prediction(p)),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

async fn start(fake: Fake) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn config(coordinator: String, limit: u64, output: &Path) -> EdgeConfig {
    EdgeConfig {
        coordinator,
        source: SourceConfig::Idx {
            images: IMAGES.into(),
            labels: Some(LABELS.into()),
        },
        limit: Some(limit),
        max_in_flight: 16,
        output: Some(output.display().to_string()),
        reconnect: ReconnectConfig {
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
            max_attempts: 3,
        },
        ..EdgeConfig::default()
    }
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("spotlight-edge-{}-{name}", std::process::id()))
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_stream_is_resumed_and_every_frame_reported_once() {
    let Some(model) = model() else { return };
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let url = start(Fake {
        hash: model.hash().to_string(),
        break_after: Some(10),
        stall_after: None,
        streams: AtomicUsize::new(0),
        seen: seen.clone(),
    })
    .await;
    let out = temp("resume.jsonl");
    let (progress, progress_rx) = tokio::sync::watch::channel(0);
    let options = RunOptions {
        progress: Some(progress),
        local_listener: None,
        ..RunOptions::default()
    };
    let summary = spotlight_edge::run_with(
        config(url, 200, &out),
        model,
        options,
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.frames, summary.predictions, summary.errors),
        (200, 200, 0)
    );
    assert_eq!(*progress_rx.borrow(), 200);
    assert_eq!(summary.mean_bytes, Some(392.0));
    assert!(summary.latency_p50_ms.is_some());
    assert_eq!(summary.per_version[&1].mean_cloud_macs(), Some(1000.0));
    // Some odd seqs of the first stream were sent twice, but each is reported once.
    let resent = seen.lock().unwrap().values().filter(|&&n| n > 1).count();
    assert!(resent > 0, "nothing was re-sent");
    let records = lines(&out);
    let mut seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200);
    for r in &records {
        assert_eq!(
            r["index"].as_u64().unwrap(),
            r["seq"].as_u64().unwrap() % 10
        );
        assert!(r["label"].is_string() && r["item"].as_str().unwrap().contains('#'));
    }
    std::fs::remove_file(out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_mismatch_is_fatal_and_reported() {
    let Some(model) = model() else { return };
    let url = start(Fake {
        hash: "sha256:other".into(),
        break_after: None,
        stall_after: None,
        streams: AtomicUsize::new(0),
        seen: Arc::default(),
    })
    .await;
    let out = temp("mismatch.jsonl");
    let err = spotlight_edge::run(config(url, 20, &out), model, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, EdgeError::ModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("sha256:other"), "{err}");
    let records = lines(&out);
    assert!(!records.is_empty() && records.len() <= 20);
    assert!(
        records.iter().all(|r| r["error"]["code"] == 9),
        "{records:?}"
    );
    std::fs::remove_file(out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_gives_up_with_errors() {
    let Some(model) = model() else { return };
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = temp("unreachable.jsonl");
    let err = spotlight_edge::run(
        config(format!("http://127.0.0.1:{port}"), 10, &out),
        model,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, EdgeError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
    let records = lines(&out);
    assert!(
        records.iter().all(|r| r["error"]["code"] == 14),
        "{records:?}"
    );
    std::fs::remove_file(out).unwrap();
}

async fn post(addr: std::net::SocketAddr, body: &[u8]) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8(resp).unwrap();
    let status = text[9..12].parse().unwrap();
    let json = text.split("\r\n\r\n").nth(1).unwrap();
    (status, serde_json::from_str(json).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_classifies_images_and_rejects_garbage() {
    let Some(model) = model() else { return };
    let url = start(Fake {
        hash: model.hash().to_string(),
        break_after: None,
        stall_after: None,
        streams: AtomicUsize::new(0),
        seen: Arc::default(),
    })
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = EdgeConfig {
        coordinator: url,
        listen: Some(addr),
        ..EdgeConfig::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = RunOptions {
        progress: None,
        local_listener: Some(listener),
        ..RunOptions::default()
    };
    let run = tokio::spawn(spotlight_edge::run_with(cfg, model, options, async move {
        let _ = stop_rx.await;
    }));

    let img = image::GrayImage::from_pixel(28, 28, image::Luma([128]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let (status, body) = post(addr, png.get_ref()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["index"].as_u64().unwrap(),
        body["seq"].as_u64().unwrap() % 10
    );
    assert_eq!(body["scores"].as_array().unwrap().len(), 10);
    let (status, body) = post(addr, b"definitely not a png").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PNG or JPEG")
    );

    stop_tx.send(()).unwrap();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        (summary.frames, summary.predictions, summary.errors),
        (2, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_labels_come_from_directories_and_bad_files_become_error_lines() {
    let Some(model) = model() else { return };
    let url = start(Fake {
        hash: model.hash().to_string(),
        break_after: None,
        stall_after: None,
        streams: AtomicUsize::new(0),
        seen: Arc::default(),
    })
    .await;
    let dir = temp("folder");
    std::fs::create_dir_all(dir.join("Trouser")).unwrap();
    std::fs::create_dir_all(dir.join("unsorted")).unwrap();
    let img = image::RgbImage::from_pixel(64, 48, image::Rgb([10, 200, 30]));
    img.save(dir.join("Trouser/a.png")).unwrap();
    img.save(dir.join("unsorted/b.jpg")).unwrap();
    std::fs::write(dir.join("Trouser/broken.png"), b"not a png").unwrap();
    std::fs::write(dir.join("notes.txt"), b"ignored").unwrap();
    let out = temp("folder.jsonl");
    let cfg = EdgeConfig {
        source: SourceConfig::Folder { path: dir.clone() },
        limit: None,
        ..config(url, 1, &out)
    };
    let summary = spotlight_edge::run(cfg, model, std::future::pending())
        .await
        .unwrap();
    assert_eq!(
        (summary.frames, summary.predictions, summary.errors),
        (3, 2, 1)
    );
    let records = lines(&out);
    let by_item = |suffix: &str| {
        records
            .iter()
            .find(|r| r["item"].as_str().unwrap().ends_with(suffix))
            .unwrap()
            .clone()
    };
    assert_eq!(by_item("a.png")["label"], "Trouser");
    assert!(by_item("b.jpg").get("label").is_none());
    let broken = by_item("broken.png");
    assert_eq!(broken["error"]["code"], 3);
    assert_eq!(broken["label"], "Trouser");
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_file(out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_stream_times_out_and_unanswered_frames_are_resent() {
    let Some(model) = model() else { return };
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let url = start(Fake {
        hash: model.hash().to_string(),
        break_after: None,
        stall_after: Some(20),
        streams: AtomicUsize::new(0),
        seen: seen.clone(),
    })
    .await;
    let out = temp("stall.jsonl");
    let mut cfg = config(url, 100, &out);
    cfg.answer_timeout_ms = 300;
    let summary = spotlight_edge::run(cfg, model, std::future::pending())
        .await
        .unwrap();
    assert_eq!(
        (summary.frames, summary.predictions, summary.errors),
        (100, 100, 0)
    );
    let resent = seen.lock().unwrap().values().filter(|&&n| n > 1).count();
    assert!(
        resent > 0,
        "the frames the silent stream swallowed must be re-sent"
    );
    assert_eq!(lines(&out).len(), 100);
    std::fs::remove_file(out).unwrap();
}
