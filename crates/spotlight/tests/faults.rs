//! Faults, each with real `spotlight` processes on loopback (ports from the OS): a worker
//! killed mid-stream, a worker that hangs, a "worker" that answers bytes that are not
//! HTTP/2, a coordinator stopped with watches and streams open, every replica of a
//! branch gone, and a worker drained with SIGTERM under load. Each test measures the bound it promises and prints what it measured
//! (`cargo test -p spotlight --test faults -- --nocapture`).
//!
//! The tests take one lock, so their timings are not disturbed by each other.

// Test helpers may panic; `Proc` waits for its child on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use spotlight_codec::Codec;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use support::{Coordinator, coordinator, http_get, repo, scrape, sum, try_get, value};

/// The binary's default `model` (crates/spotlight/src/settings.rs): the roles these tests
/// start are given no `--model`, so the edge side must encode with the same package.
const DEFAULT_MODEL: &str = "models/fashion-mnist-nested-v2";

const UNAVAILABLE: i32 = tonic::Code::Unavailable as i32;
const DEADLINE_EXCEEDED: i32 = tonic::Code::DeadlineExceeded as i32;

/// One test at a time: the bounds they measure are about the cloud, not about the tests.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The model the roles load by default, and feature tensors of the first 256 test images from the edge's
/// own backbone (int8, as the edge sends them).
fn model_and_features() -> (Arc<Model>, Arc<Vec<pb::FeatureTensor>>) {
    static CACHE: OnceLock<(Arc<Model>, Arc<Vec<pb::FeatureTensor>>)> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            spotlight_runtime::init_onnxruntime(Some(
                &repo().join("build/onnxruntime/libonnxruntime.so"),
            ))
            .expect("ONNX Runtime (run `make onnxruntime`)");
            let model = Arc::new(Model::load(repo().join(DEFAULT_MODEL)).unwrap());
            let images = spotlight_edge::idx::read_images(Path::new(
                "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
            ))
            .expect("Fashion-MNIST (run `make dataset`)");
            let mut backbone =
                spotlight_edge::Backbone::open(model.clone(), Codec::Int8, 1).expect("backbone");
            let pixels: Vec<&[u8]> = (0..256).map(|i| images.image(i).unwrap()).collect();
            let features = backbone.encode_batch(&pixels).unwrap();
            (model, Arc::new(features))
        })
        .clone()
}

/// What came back for one frame.
#[derive(Debug, Clone)]
struct Answer {
    seq: u64,
    sent: Instant,
    at: Instant,
    /// 0 for a prediction, else the frame's gRPC code.
    code: i32,
    message: String,
}

/// An edge stream driven by the test: up to `window` frames in flight, each answered once.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    sent: Arc<AtomicU64>,
    total: Option<u64>,
    join: tokio::task::JoinHandle<Result<(), String>>,
}

impl Load {
    /// Streams `total` frames (or until [`Load::finish`]) to `grpc`.
    async fn start(grpc: &str, window: usize, total: Option<u64>) -> Load {
        let (model, features) = model_and_features();
        let mut client = pb::inference_client::InferenceClient::connect(grpc.to_string())
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(window + 16);
        tx.send(pb::EdgeMessage {
            kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
                model_hash: model.hash().to_string(),
                edge_id: "faults".into(),
                batch_answers: false,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await.unwrap().and_then(|m| m.kind) {
            Some(Kind::Ready(_)) => {}
            other => panic!("expected ready, got {other:?}"),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let join = {
            let (stop, answers, sent) = (stop.clone(), answers.clone(), sent.clone());
            tokio::spawn(async move {
                let mut in_flight: HashMap<u64, Instant> = HashMap::new();
                let mut next = 0u64;
                // The coordinator stops reading a stream when it stops; its answers still
                // come.
                let mut writable = true;
                loop {
                    let more =
                        writable && !stop.load(Ordering::Relaxed) && total.is_none_or(|t| next < t);
                    while more && in_flight.len() < window {
                        let frame = pb::Frame {
                            seq: next,
                            features: Some(features[next as usize % features.len()].clone()),
                        };
                        let msg = pb::EdgeMessage {
                            kind: Some(pb::edge_message::Kind::Frame(frame)),
                        };
                        if tx.send(msg).await.is_err() {
                            writable = false;
                            break;
                        }
                        in_flight.insert(next, Instant::now());
                        next += 1;
                        sent.store(next, Ordering::Relaxed);
                    }
                    if !more && in_flight.is_empty() {
                        return if writable {
                            Ok(())
                        } else {
                            Err(format!("stream closed before frame {next} was sent"))
                        };
                    }
                    let msg = tokio::time::timeout(Duration::from_secs(60), inbound.message())
                        .await
                        .map_err(|_| {
                            format!("no answer within 60 s; {} in flight", in_flight.len())
                        })?;
                    let kind = match msg {
                        Ok(Some(m)) => m.kind,
                        Ok(None) => {
                            return Err(format!(
                                "stream ended with {} frames unanswered",
                                in_flight.len()
                            ));
                        }
                        Err(status) => return Err(format!("stream failed: {status}")),
                    };
                    let (seq, code, message) = match kind {
                        Some(Kind::Prediction(p)) => (p.seq, 0, String::new()),
                        Some(Kind::Error(e)) => (e.seq, e.code, e.message),
                        other => return Err(format!("unexpected message {other:?}")),
                    };
                    let Some(sent) = in_flight.remove(&seq) else {
                        return Err(format!("frame {seq} answered twice (or never sent)"));
                    };
                    answers.lock().unwrap().push(Answer {
                        seq,
                        sent,
                        at: Instant::now(),
                        code,
                        message,
                    });
                }
            })
        };
        Load {
            stop,
            answers,
            sent,
            total,
            join,
        }
    }

    fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Waits (bounded) until `n` frames are answered.
    async fn wait_answered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.answered() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} frames answered within 60 s",
                self.answered()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops sending (unless a total was given: then sends them all), waits for every
    /// frame in flight, and returns every answer.
    async fn finish(self) -> Vec<Answer> {
        if self.total.is_none() {
            self.stop.store(true, Ordering::Relaxed);
        }
        tokio::time::timeout(Duration::from_secs(90), self.join)
            .await
            .expect("load finishes")
            .expect("join")
            .expect("every frame answered once");
        let answers = self.answers.lock().unwrap().clone();
        let sent = self.sent.load(Ordering::Relaxed) as usize;
        assert_eq!(answers.len(), sent, "every frame sent is answered");
        let mut seqs: Vec<u64> = answers.iter().map(|a| a.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), sent, "no frame answered twice");
        answers
    }
}

/// `Branches.Stats` of the worker at `endpoint`: frames it answered.
async fn worker_requests(endpoint: &str) -> u64 {
    let mut c = pb::branches_client::BranchesClient::connect(endpoint.to_string())
        .await
        .unwrap();
    c.stats(pb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests
}

fn endpoint(c: &Coordinator, worker: &str) -> String {
    c.workers()[worker]["endpoint"]
        .as_str()
        .unwrap()
        .to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A worker killed with SIGKILL mid-stream while another replica hosts its branches: every
/// frame is answered once, ≥ 99.9 % with predictions, and no frame waits more than 1 s
/// across the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_fails_over_within_a_second() {
    let _serial = serial().await;
    let c = coordinator(&[]);
    let a = c.worker("a", &[]);
    let _b = c.worker("b", &[]);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);
    let (ea, eb) = (endpoint(&c, "a"), endpoint(&c, "b"));

    let load = Load::start(&c.grpc, 32, Some(3000)).await;
    load.wait_answered(1000).await;
    let (ra, rb) = (worker_requests(&ea).await, worker_requests(&eb).await);
    assert!(
        ra > 0 && rb > 0,
        "both replicas serve before the kill: a={ra} b={rb}"
    );
    let mut a = a;
    a.child.kill().unwrap();
    let killed = Instant::now();
    let _ = a.child.wait();
    let answers = load.finish().await;

    let predictions = answers.iter().filter(|x| x.code == 0).count();
    let errors: Vec<_> = answers.iter().filter(|x| x.code != 0).collect();
    // How long a frame in flight at the kill, or sent after it, waited beyond the kill.
    let failover = answers
        .iter()
        .filter(|x| x.at > killed)
        .map(|x| x.at - x.sent.max(killed))
        .max()
        .unwrap();
    let first_after = answers
        .iter()
        .filter(|x| x.sent > killed && x.code == 0)
        .map(|x| x.at - killed)
        .min()
        .unwrap();
    let mut before: Vec<Duration> = answers
        .iter()
        .filter(|x| x.at < killed)
        .map(|x| x.at - x.sent)
        .collect();
    before.sort();
    let p99 = before[before.len() * 99 / 100];
    let after = answers.iter().filter(|x| x.at > killed).count();
    eprintln!(
        "kill: {} frames, {predictions} predictions, {} errors, {after} answered after the kill; \
         longest wait across the kill {:.1} ms, first prediction of a frame sent after it {:.1} ms \
         after the kill; p99 latency before it {:.1} ms",
        answers.len(),
        errors.len(),
        ms(failover),
        ms(first_after),
        ms(p99)
    );
    assert_eq!(answers.len(), 3000);
    assert!(
        predictions * 1000 >= 3000 * 999,
        "{predictions} of 3000 predicted; errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(
        after > 500,
        "the kill must happen mid-stream ({after} answered after it)"
    );
    assert!(
        failover <= Duration::from_secs(1),
        "failover took {failover:?}"
    );
    // The dead replica was counted (or its lease is gone) and the survivor took the rest.
    let w = c.workers();
    assert!(
        w.get("a")
            .is_none_or(|a| a["failures"].as_u64().unwrap() > 0),
        "{w:?}"
    );
    assert!(worker_requests(&eb).await > rb);
}

/// A worker that hangs (SIGSTOP) is detected by its deadline and consecutive failures,
/// ejected, traffic goes to the healthy replica, and after SIGCONT it is retried when its
/// ejection ends and takes traffic again. Frames it held are DEADLINE_EXCEEDED, never
/// UNAVAILABLE "Timeout expired".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_ejected_and_takes_traffic_again_after_it_recovers() {
    let _serial = serial().await;
    let c = coordinator(&[
        ("SPOTLIGHT_COORDINATOR__WORKER_TIMEOUT_MS", "1000"),
        ("SPOTLIGHT_COORDINATOR__EJECT_AFTER_FAILURES", "3"),
        ("SPOTLIGHT_COORDINATOR__EJECTION_BASE_MS", "1000"),
        ("SPOTLIGHT_COORDINATOR__EJECTION_MAX_MS", "3000"),
        // The hang must not cost the lease: ejection, not expiry, is under test.
        ("SPOTLIGHT_COORDINATOR__LEASE_TTL_MS", "60000"),
    ]);
    let a = c.worker("a", &[]);
    let _b = c.worker("b", &[]);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);
    let (ea, eb) = (endpoint(&c, "a"), endpoint(&c, "b"));

    let load = Load::start(&c.grpc, 16, None).await;
    load.wait_answered(300).await;
    assert!(worker_requests(&ea).await > 0, "a serves before it hangs");
    a.signal("STOP");
    let stopped = Instant::now();
    let detected = tokio::task::block_in_place(|| {
        c.wait_workers(Duration::from_secs(15), "a ejected", |w| {
            w["a"]["ejections"].as_u64().unwrap() >= 1
        })
    });
    // While a is hung and ejected, b answers.
    let rb = worker_requests(&eb).await;
    let n = load.answered();
    load.wait_answered(n + 300).await;
    assert!(
        worker_requests(&eb).await >= rb + 300,
        "b takes the traffic"
    );
    // When its ejection is over a is tried again, still hangs, and is ejected for longer.
    tokio::task::block_in_place(|| {
        c.wait_workers(Duration::from_secs(15), "a ejected twice", |w| {
            w["a"]["ejections"].as_u64().unwrap() >= 2
        })
    });
    let again = stopped.elapsed();
    let second = c.workers()["a"]["ejected_remaining_ms"].as_u64().unwrap();
    let hung_for = stopped.elapsed();

    a.signal("CONT");
    let resumed = Instant::now();
    // a answers what it held when it resumed; then it must take new traffic once its
    // ejection is over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = worker_requests(&ea).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let back = loop {
        if worker_requests(&ea).await >= base + 100 {
            break resumed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "a took no traffic after it resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let answers = load.finish().await;
    let w = c.workers();
    let errors: Vec<_> = answers.iter().filter(|x| x.code != 0).collect();
    eprintln!(
        "hang: ejected {:.0} ms after SIGSTOP (worker_timeout 1000 ms, 3 failures), retried and \
         ejected again {:.0} ms after SIGSTOP ({second} ms left of the second ejection); hung for \
         {:.0} ms; took traffic again {:.0} ms after SIGCONT; {} frames, {} errors \
         (DEADLINE_EXCEEDED); a: failures {}, ejections {}",
        ms(detected),
        ms(again),
        ms(hung_for),
        ms(back),
        answers.len(),
        errors.len(),
        w["a"]["failures"],
        w["a"]["ejections"],
    );
    assert!(
        detected < Duration::from_secs(3),
        "ejection took {detected:?}"
    );
    // The second ejection lasts twice the base (2000 ms); a little of it has passed.
    assert!(
        (1000..=2000).contains(&second),
        "second ejection {second} ms"
    );
    for e in &errors {
        assert!(
            e.code == DEADLINE_EXCEEDED && e.message.contains("worker \"a\""),
            "a hung worker's frames are DEADLINE_EXCEEDED naming it: {e:?}"
        );
    }
    assert!(w["a"]["failures"].as_u64().unwrap() >= 3, "{w:?}");
    // Only frames a held when it hung or when it was retried fail: a few windows.
    assert!(
        errors.len() * 10 < answers.len(),
        "{} of {} frames failed",
        errors.len(),
        answers.len()
    );
}

/// A "worker" that answers bytes that are not HTTP/2, registered through the Registry API:
/// each call to it fails at once and is retried on the healthy replica (every frame is
/// predicted), it is ejected after consecutive failures, and it is retried only when an
/// ejection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_answering_garbage_is_ejected_and_every_frame_is_predicted() {
    let _serial = serial().await;
    let c = coordinator(&[
        ("SPOTLIGHT_COORDINATOR__EJECT_AFTER_FAILURES", "3"),
        ("SPOTLIGHT_COORDINATOR__EJECTION_BASE_MS", "1000"),
        ("SPOTLIGHT_COORDINATOR__EJECTION_MAX_MS", "4000"),
        ("SPOTLIGHT_COORDINATOR__LEASE_TTL_MS", "60000"),
    ]);
    let _b = c.worker("b", &[]);
    c.wait_workers(Duration::from_secs(30), "worker b", |w| w.len() == 1);

    let garbage = TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    {
        let (accepted, done) = (accepted.clone(), done.clone());
        garbage.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match garbage.accept() {
                    Ok((mut s, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nthis is not HTTP/2\r\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
    }
    let (model, _) = model_and_features();
    let mut registry = pb::registry_client::RegistryClient::connect(c.grpc.clone())
        .await
        .unwrap();
    registry
        .register(pb::RegisterRequest {
            worker_id: "garbage".into(),
            endpoint: format!("http://{garbage_addr}"),
            segments: model.segments().iter().map(|s| s.id.clone()).collect(),
            model_hash: model.hash().to_string(),
        })
        .await
        .unwrap();

    let started = Instant::now();
    let load = Load::start(&c.grpc, 32, Some(3000)).await;
    let ejected = tokio::task::block_in_place(|| {
        c.wait_workers(Duration::from_secs(15), "garbage ejected", |w| {
            w["garbage"]["ejections"].as_u64().unwrap() >= 1
        })
    });
    let answers = load.finish().await;
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let w = c.workers();
    let failures = w["garbage"]["failures"].as_u64().unwrap();
    let ejections = w["garbage"]["ejections"].as_u64().unwrap();
    let predictions = answers.iter().filter(|x| x.code == 0).count();
    eprintln!(
        "garbage: {} frames in {:.0} ms, {predictions} predictions; ejected {:.0} ms after the \
         load started; {failures} failed calls, {ejections} ejections, {} connections accepted",
        answers.len(),
        ms(took),
        ms(ejected),
        accepted.load(Ordering::Relaxed)
    );
    assert_eq!(predictions, 3000, "each call to garbage is retried on b");
    assert!(ejections >= 1 && failures >= 3, "{w:?}");
    // gRPC ListWorkers reports the same counts.
    let listed = pb::control_client::ControlClient::connect(c.grpc.clone())
        .await
        .unwrap()
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let garbage = listed.iter().find(|w| w.worker_id == "garbage").unwrap();
    assert!(
        garbage.failures >= failures && garbage.ejections as u64 >= ejections,
        "{garbage:?}"
    );
    // Without ejection, least-outstanding would prefer the replica that fails fast for
    // nearly every call; with it, garbage sees a few calls per ejection.
    let calls_b = worker_requests(&endpoint(&c, "b")).await;
    assert!(
        failures * 20 < calls_b,
        "garbage got {failures} calls in {ejections} ejections (b answered {calls_b} frames)"
    );
}

/// SIGTERM to a coordinator with a gRPC WatchTask, an HTTP long-poll and an edge stream
/// open, and frames in flight on a worker that hangs: the frames get an explicit
/// UNAVAILABLE, the watches end, and the process exits within its drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_drains_and_exits_within_its_drain_timeout() {
    let _serial = serial().await;
    const DRAIN_MS: u64 = 2000;
    let drain_ms = DRAIN_MS.to_string();
    let mut c = coordinator(&[
        ("SPOTLIGHT_COORDINATOR__DRAIN_TIMEOUT_MS", drain_ms.as_str()),
        // Frames on the hung worker would wait a minute: only the drain answers them.
        ("SPOTLIGHT_COORDINATOR__WORKER_TIMEOUT_MS", "60000"),
    ]);
    let a = c.worker("a", &[]);
    c.wait_workers(Duration::from_secs(30), "worker a", |w| w.len() == 1);

    let mut control = pb::control_client::ControlClient::connect(c.grpc.clone())
        .await
        .unwrap();
    let mut watch = control
        .watch_task(pb::WatchTaskRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().version, 1);
    let http = c.http;
    let long_poll = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = http_get(http, "/v1/task/watch?after=1");
        (answer, started.elapsed())
    });

    let load = Load::start(&c.grpc, 8, None).await;
    load.wait_answered(100).await;
    a.signal("STOP");
    // Let the frames sent now reach the coordinator and wait on the hung worker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = load.sent.load(Ordering::Relaxed) as usize;
    assert!(
        sent > load.answered(),
        "frames are in flight on the hung worker"
    );
    c.proc.signal("TERM");
    let term = Instant::now();

    let exited = tokio::task::block_in_place(|| {
        let deadline = term + Duration::from_secs(15);
        loop {
            if let Some(status) = c.proc.child.try_wait().unwrap() {
                break (status, term.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "coordinator still running 15 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let watch_end = watch.message().await;
    let ((status, body), polled) = long_poll.join().unwrap();
    // The stream ended after answering every frame the coordinator had taken: the load
    // reports the frames it never got to send as unanswered, so read what came back.
    load.stop.store(true, Ordering::Relaxed);
    let ended = tokio::time::timeout(Duration::from_secs(10), load.join).await;
    let answers = load.answers.lock().unwrap().clone();
    let in_flight: Vec<_> = answers.iter().filter(|x| x.at > term).collect();
    eprintln!(
        "drain: exited {:.0} ms after SIGTERM (drain_timeout_ms {DRAIN_MS}, {}); long-poll \
         returned after {:.0} ms; {} frames in flight answered during the drain: {:?}",
        ms(exited.1),
        if c.proc.logged("drain time over") {
            "drain time over"
        } else {
            "drained"
        },
        ms(polled),
        in_flight.len(),
        in_flight.first().map(|x| &x.message)
    );
    assert!(exited.0.success(), "exit status {:?}", exited.0);
    assert!(
        exited.1 <= Duration::from_millis(DRAIN_MS + 1000),
        "exit took {:?}",
        exited.1
    );
    assert!(
        matches!(watch_end, Ok(None)),
        "the gRPC watch ends cleanly: {watch_end:?}"
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\":1"), "{body}");
    // Every frame sent before the hang was answered once; those held by the hung worker
    // got an explicit UNAVAILABLE before the coordinator exited.
    assert_eq!(
        answers.len(),
        sent,
        "every frame the coordinator took is answered; the stream: {ended:?}"
    );
    assert!(!in_flight.is_empty());
    for x in &in_flight {
        assert!(
            x.code == UNAVAILABLE && x.message.contains("shutting down"),
            "{x:?}"
        );
    }
}

/// Every replica of the needed branches killed: frames are UNAVAILABLE within
/// `no_worker_wait_ms` and a margin, and predictions come back when a worker registers
/// again, on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_replicas_gone_is_unavailable_quickly_and_recovers_when_one_returns() {
    let _serial = serial().await;
    const WAIT_MS: u64 = 500;
    let wait_ms = WAIT_MS.to_string();
    let c = coordinator(&[
        ("SPOTLIGHT_COORDINATOR__NO_WORKER_WAIT_MS", wait_ms.as_str()),
        ("SPOTLIGHT_COORDINATOR__LEASE_TTL_MS", "1500"),
    ]);
    let heartbeat = [("SPOTLIGHT_WORKER__HEARTBEAT_MS", "300")];
    let mut a = c.worker("a", &heartbeat);
    let mut b = c.worker("b", &heartbeat);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);

    let load = Load::start(&c.grpc, 4, None).await;
    load.wait_answered(100).await;
    a.child.kill().unwrap();
    b.child.kill().unwrap();
    let _ = (a.child.wait(), b.child.wait());
    let killed = Instant::now();
    // First while the dead workers' leases run (each call fails at once), then after they
    // expire (each frame waits no_worker_wait_ms for a worker).
    let gone = tokio::task::block_in_place(|| {
        c.wait_workers(Duration::from_secs(10), "leases expire", HashMap::is_empty)
    });
    let n = load.answered();
    load.wait_answered(n + 12).await;
    let returned = Instant::now();
    let _c2 = c.worker("c", &heartbeat);
    let registered = returned.elapsed();
    let n = load.answered();
    // Some frames may still be waiting for a worker; the ones sent now must be predicted.
    load.wait_answered(n + 200).await;
    let answers = load.finish().await;

    let dead: Vec<_> = answers
        .iter()
        .filter(|x| x.sent > killed + Duration::from_millis(100) && x.at < returned)
        .collect();
    let slowest = dead.iter().map(|x| x.at - x.sent).max().unwrap();
    let recovered = answers
        .iter()
        .filter(|x| x.code == 0 && x.sent > killed)
        .map(|x| x.at.saturating_duration_since(returned))
        .min()
        .unwrap();
    let after: Vec<_> = answers
        .iter()
        .filter(|x| x.sent > returned + registered)
        .collect();
    eprintln!(
        "all gone: {} frames answered while no worker lived, slowest {:.0} ms \
         (no_worker_wait_ms {WAIT_MS}); leases gone {:.0} ms after the kill; first prediction \
         {:.0} ms after the new worker started (it registered after {:.0} ms)",
        dead.len(),
        ms(slowest),
        ms(gone),
        ms(recovered),
        ms(registered)
    );
    assert!(dead.len() >= 12);
    for x in &dead {
        assert_eq!(x.code, UNAVAILABLE, "{x:?}");
        assert!(
            x.message.contains("no live worker hosts segments")
                || x.message.contains("every live worker hosting segments"),
            "{x:?}"
        );
    }
    assert!(
        slowest <= Duration::from_millis(WAIT_MS + 500),
        "UNAVAILABLE took {slowest:?}"
    );
    assert!(
        after.len() >= 100 && after.iter().all(|x| x.code == 0),
        "recovery"
    );
}

/// A replica whose queue is full (RESOURCE_EXHAUSTED) hands its frames to another replica:
/// every frame is predicted, the refusals are counted against it, and it is not ejected
/// (overload is not a fault; ejecting it would only load the others more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_a_full_replica_refuses_go_to_another() {
    let _serial = serial().await;
    let c = coordinator(&[("SPOTLIGHT_COORDINATOR__EJECT_AFTER_FAILURES", "3")]);
    let _small = c.worker(
        "small",
        &[
            ("SPOTLIGHT_WORKER__QUEUE_CAPACITY", "1"),
            ("SPOTLIGHT_WORKER__MAX_BATCH", "1"),
        ],
    );
    let _big = c.worker("big", &[]);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);

    let load = Load::start(&c.grpc, 64, Some(2000)).await;
    let answers = load.finish().await;
    let mut small = pb::branches_client::BranchesClient::connect(endpoint(&c, "small"))
        .await
        .unwrap();
    let stats = small.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    let w = c.workers();
    let predictions = answers.iter().filter(|x| x.code == 0).count();
    eprintln!(
        "overload: {} frames, {predictions} predictions; small answered {} and refused {} \
         (counted failures {}, ejections {})",
        answers.len(),
        stats.requests,
        stats.rejected,
        w["small"]["failures"],
        w["small"]["ejections"]
    );
    assert!(
        stats.rejected > 0,
        "the small queue must overflow for this test to mean anything"
    );
    assert_eq!(
        predictions, 2000,
        "every refused frame ran on the other replica"
    );
    assert!(w["small"]["failures"].as_u64().unwrap() > 0, "{w:?}");
    assert_eq!(w["small"]["ejections"], 0, "overload does not eject");
}

/// SIGTERM to a worker under load while another replica serves its branches: it turns
/// unready, deregisters, answers the frames it already has, and exits 0 within its drain
/// timeout; every frame is predicted, none fails, and the coordinator counts no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_under_load_drains_and_loses_no_frame() {
    let _serial = serial().await;
    const DRAIN_MS: u64 = 5000;
    let drain_ms = DRAIN_MS.to_string();
    let c = coordinator(&[]);
    let (mut a, a_http) = c.worker_with_http(
        "a",
        &[("SPOTLIGHT_WORKER__DRAIN_TIMEOUT_MS", drain_ms.as_str())],
    );
    let _b = c.worker("b", &[]);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);
    let (ea, eb) = (endpoint(&c, "a"), endpoint(&c, "b"));
    assert_eq!(http_get(a_http, "/readyz").0, 200);

    let load = Load::start(&c.grpc, 32, Some(3000)).await;
    load.wait_answered(1000).await;
    let (ra, rb) = (worker_requests(&ea).await, worker_requests(&eb).await);
    assert!(
        ra > 0 && rb > 0,
        "both replicas serve before the drain: a={ra} b={rb}"
    );
    a.signal("TERM");
    let term = Instant::now();
    // Unready while it drains (if it is still up by the time it has seen the signal).
    let ready_during_drain = tokio::task::block_in_place(|| {
        while a.child.try_wait().unwrap().is_none() && term.elapsed() < Duration::from_secs(5) {
            match try_get(a_http, "/readyz") {
                Some(200) => std::thread::sleep(Duration::from_millis(1)),
                other => return other,
            }
        }
        None
    });
    let (status, took) = tokio::task::block_in_place(|| a.wait_exit(term, Duration::from_secs(15)));
    let answers = load.finish().await;
    let predictions = answers.iter().filter(|x| x.code == 0).count();
    let errors: Vec<_> = answers.iter().filter(|x| x.code != 0).collect();
    let after = answers.iter().filter(|x| x.at > term).count();
    let handed_back = a.logged("handed back");
    let cm = scrape(c.http);
    eprintln!(
        "sigterm: worker a exited {:.0} ms after SIGTERM (status {status:?}, drain_timeout_ms \
         {DRAIN_MS}); /readyz during the drain: {ready_during_drain:?}; {} frames, \
         {predictions} predictions, {} errors, {after} answered after the signal; coordinator \
         re-routed {} frames ({} handed back); hand-back logged: {handed_back}",
        ms(took),
        answers.len(),
        errors.len(),
        sum(&cm, "spotlight_coordinator_rerouted_frames_total"),
        value(
            &cm,
            "spotlight_coordinator_rerouted_frames_total{reason=\"handed_back\"}"
        ),
    );
    assert!(status.success(), "worker exit status {status:?}");
    assert!(
        took < Duration::from_millis(DRAIN_MS),
        "exited after {took:?}, past its drain timeout"
    );
    assert!(a.logged("deregistered"), "it deregistered");
    assert!(
        ready_during_drain.is_none_or(|s| s == 503),
        "/readyz while draining: {ready_during_drain:?}"
    );
    assert_eq!(answers.len(), 3000);
    assert!(
        errors.is_empty(),
        "no frame fails: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(
        after > 500,
        "the drain happens mid-stream ({after} after it)"
    );
    assert_eq!(sum(&cm, "spotlight_coordinator_frame_errors_total"), 0.0);
    assert_eq!(
        value(&cm, "spotlight_coordinator_frames_answered_total"),
        3000.0
    );
    // a left cleanly: gone from the registry, never ejected, b took the rest.
    assert!(!c.workers().contains_key("a"));
    assert!(worker_requests(&eb).await > rb);
}

/// A draining worker that cannot finish its queue in time hands the frames back: queued
/// behind a 1 s batching delay, they are answered UNAVAILABLE when the drain time is
/// nearly over, and the coordinator runs them on the other replica. No frame fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_back_what_it_cannot_finish_and_no_frame_fails() {
    let _serial = serial().await;
    const DRAIN_MS: u64 = 600;
    let drain_ms = DRAIN_MS.to_string();
    let c = coordinator(&[]);
    let (mut slow, slow_http) = c.worker_with_http(
        "slow",
        &[
            ("SPOTLIGHT_WORKER__DRAIN_TIMEOUT_MS", drain_ms.as_str()),
            // Frames wait up to 1 s in its queue for a batch of 4096 to fill.
            ("SPOTLIGHT_WORKER__MAX_QUEUE_DELAY_US", "1000000"),
            ("SPOTLIGHT_WORKER__MAX_BATCH", "4096"),
        ],
    );
    let _fast = c.worker("fast", &[]);
    c.wait_workers(Duration::from_secs(30), "two workers", |w| w.len() == 2);

    let load = Load::start(&c.grpc, 32, Some(2000)).await;
    load.wait_answered(300).await;
    // Signal it just after it took a batch, once new frames wait in its queue: they would
    // wait about a second more, well past the point where the drain gives up on them.
    let depth = "spotlight_worker_queue_depth{worker=\"slow\"}";
    let taken = "spotlight_worker_queue_wait_seconds_count{worker=\"slow\"}";
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = value(&scrape(slow_http), taken);
    let queued = loop {
        let m = scrape(slow_http);
        if value(&m, taken) > before && value(&m, depth) > 0.0 {
            break value(&m, depth);
        }
        assert!(Instant::now() < deadline, "frames queue on the slow worker");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    slow.signal("TERM");
    let term = Instant::now();
    let (status, took) =
        tokio::task::block_in_place(|| slow.wait_exit(term, Duration::from_secs(15)));
    let answers = load.finish().await;
    let errors: Vec<_> = answers.iter().filter(|x| x.code != 0).collect();
    let cm = scrape(c.http);
    let handed_back = value(
        &cm,
        "spotlight_coordinator_rerouted_frames_total{reason=\"handed_back\"}",
    );
    eprintln!(
        "hand-back: {queued} frames queued on slow at SIGTERM; it exited {:.0} ms after \
         (drain_timeout_ms {DRAIN_MS}); {} frames, {} errors; coordinator re-ran \
         {handed_back} handed-back frames; log: {:?}",
        ms(took),
        answers.len(),
        errors.len(),
        slow.line("handed back")
    );
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_millis(DRAIN_MS + 500),
        "exited after {took:?}"
    );
    assert!(
        handed_back > 0.0,
        "frames were queued on the slow worker at the end of its drain"
    );
    assert_eq!(answers.len(), 2000);
    assert!(
        errors.is_empty(),
        "no frame fails: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(sum(&cm, "spotlight_coordinator_frame_errors_total"), 0.0);
}
