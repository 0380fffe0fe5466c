//! The cloud roles as separate processes (the `spotlight` binary's `coordinator` and
//! `worker` subcommands on loopback), and a client that streams precomputed frames to them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use spotlight_proto::v1::control_client::ControlClient;
use spotlight_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

use crate::Measured;

/// What to start.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// Workers per top-level branch.
    pub replicas: usize,
    /// Worker `max_batch`.
    pub max_batch: usize,
    /// Worker `max_queue_delay_us`.
    pub max_queue_delay_us: u64,
    /// Stub workers in this process instead of worker processes.
    pub stub: bool,
    /// One worker process hosting every branch (instead of one per top-level branch).
    pub single_worker: bool,
    /// Worker `batch_threads`.
    pub batch_threads: usize,
    /// Coordinator replicas; more than one share task and workers through an etcd this
    /// harness starts (Debian's `etcd-server`), and the load's streams are spread over them.
    pub coordinators: usize,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            max_batch: 64,
            max_queue_delay_us: 0,
            stub: false,
            single_worker: false,
            batch_threads: 1,
            coordinators: 1,
        }
    }
}

/// A coordinator process and its workers.
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The first coordinator's gRPC address (tasks are set there).
    pub grpc: SocketAddr,
    /// Every coordinator's gRPC address.
    pub grpcs: Vec<SocketAddr>,
    coordinators: Vec<Child>,
    /// The etcd replicas share, with its data directory.
    etcd: Option<(Child, tempfile::TempDir)>,
    /// (id, process, Branches address).
    workers: Vec<(String, Child, SocketAddr)>,
    stubs: Vec<crate::stub::StubWorker>,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn spawn(exe: &Path, args: &[String], env: &[(&str, String)], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env("ORT_DISABLE_TELEMETRY", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))
}

impl Cluster {
    /// Starts a coordinator and `replicas` workers per top-level branch, and waits until
    /// every worker is registered.
    pub async fn start(
        exe: &Path,
        model: &Arc<spotlight_model::Model>,
        logs: &Path,
        spec: ClusterSpec,
    ) -> anyhow::Result<Self> {
        let model_dir = model.dir().display().to_string();
        let etcd = match spec.coordinators > 1 {
            true => Some(start_etcd(logs).await?),
            false => None,
        };
        let mut coordinators = Vec::new();
        let mut grpcs = Vec::new();
        for i in 0..spec.coordinators.max(1) {
            let grpc = free_port()?;
            let http = free_port()?;
            let mut args: Vec<String> = vec![
                "--model".into(),
                model_dir.clone(),
                // Loopback only; TLS would add its own cost to every figure.
                "--insecure".into(),
                "coordinator".into(),
                "--grpc-listen".into(),
                grpc.to_string(),
                "--http-listen".into(),
                http.to_string(),
            ];
            if let Some((url, ..)) = &etcd {
                args.extend(["--etcd".into(), url.clone()]);
            }
            coordinators.push(spawn(
                exe,
                &args,
                &[],
                &logs.join(match i {
                    0 => "coordinator.log".to_string(),
                    i => format!("coordinator-{i}.log"),
                }),
            )?);
            grpcs.push(grpc);
        }
        let grpc = grpcs[0];
        let mut cluster = Cluster {
            spec: spec.clone(),
            grpc,
            grpcs,
            coordinators,
            etcd: etcd.map(|(_, child, dir)| (child, dir)),
            workers: Vec::new(),
            stubs: Vec::new(),
        };
        let roots: Vec<String> = if spec.single_worker {
            vec![String::new()]
        } else {
            model
                .segments()
                .iter()
                .filter(|s| s.parent.is_none())
                .map(|s| s.id.clone())
                .collect()
        };
        let library = spotlight_runtime::resolve_library(None)?;
        let coordinator_url = format!("http://{grpc}");
        // The coordinator must be up before workers register.
        let control = connect_control(grpc).await?;
        for root in &roots {
            for r in 0..spec.replicas {
                let id = if root.is_empty() {
                    format!("all-{r}")
                } else {
                    format!("{root}-{r}")
                };
                if spec.stub {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let stub = crate::stub::StubWorker::start(
                        model.clone(),
                        coordinator_url.clone(),
                        id,
                        if root.is_empty() {
                            Vec::new()
                        } else {
                            vec![root.clone()]
                        },
                        listener,
                    )
                    .await?;
                    cluster.stubs.push(stub);
                } else {
                    let listen = free_port()?;
                    let child = spawn(
                        exe,
                        &[
                            "--model".into(),
                            model_dir.clone(),
                            "--insecure".into(),
                            "worker".into(),
                            "--coordinator".into(),
                            coordinator_url.clone(),
                            "--listen".into(),
                            listen.to_string(),
                            "--http-listen".into(),
                            "127.0.0.1:0".into(),
                            "--id".into(),
                            id.clone(),
                        ]
                        .into_iter()
                        .chain(
                            (!root.is_empty())
                                .then(|| ["--branches".to_string(), root.clone()])
                                .into_iter()
                                .flatten(),
                        )
                        .collect::<Vec<String>>(),
                        &[
                            ("ORT_DYLIB_PATH", library.display().to_string()),
                            ("SPOTLIGHT_WORKER__MAX_BATCH", spec.max_batch.to_string()),
                            (
                                "SPOTLIGHT_WORKER__BATCH_THREADS",
                                spec.batch_threads.to_string(),
                            ),
                            (
                                "SPOTLIGHT_WORKER__MAX_QUEUE_DELAY_US",
                                spec.max_queue_delay_us.to_string(),
                            ),
                        ],
                        &logs.join(format!("worker-{id}.log")),
                    )?;
                    cluster.workers.push((id, child, listen));
                }
            }
        }
        let expected = roots.len() * spec.replicas;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut controls = vec![control];
        for &g in &cluster.grpcs[1..] {
            controls.push(connect_control(g).await?);
        }
        loop {
            // Every replica routes to every worker (through etcd when there are several).
            let mut live = usize::MAX;
            for control in &mut controls {
                let n = control
                    .list_workers(pb::ListWorkersRequest {})
                    .await?
                    .into_inner()
                    .workers
                    .len();
                live = live.min(n);
            }
            if live == expected {
                break;
            }
            for (id, child, _) in &mut cluster.workers {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "worker {id} exited with {status}; see {}",
                        logs.join(format!("worker-{id}.log")).display()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("only {live} of {expected} workers registered within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(cluster)
    }

    /// (role, pid) of every cloud process.
    pub fn pids(&self) -> Vec<(String, u32)> {
        // Replicas all count as "coordinator": their CPU adds up.
        let mut pids: Vec<(String, u32)> = self
            .coordinators
            .iter()
            .map(|c| ("coordinator".to_string(), c.id()))
            .collect();
        pids.extend(
            self.workers
                .iter()
                .map(|(id, c, _)| (format!("worker {id}"), c.id())),
        );
        pids
    }

    /// Segment runs (frames) and ONNX Runtime batches so far, summed over the worker
    /// processes (`Branches.Stats`).
    pub async fn batch_counters(&self) -> anyhow::Result<(u64, u64)> {
        let (mut frames, mut batches) = (0, 0);
        for (_, _, addr) in &self.workers {
            let mut c = spotlight_proto::v1::branches_client::BranchesClient::connect(format!(
                "http://{addr}"
            ))
            .await?;
            let s = c.stats(pb::StatsRequest {}).await?.into_inner();
            frames += s.segments_run.values().sum::<u64>();
            batches += s.segment_batches.values().sum::<u64>();
        }
        Ok((frames, batches))
    }

    /// Replaces the task (on the first replica), and waits until every replica has it.
    pub async fn set_task(&self, categories: &[String]) -> anyhow::Result<()> {
        let version = connect_control(self.grpc)
            .await?
            .set_task(pb::SetTaskRequest {
                categories: categories.to_vec(),
                gains: Default::default(),
            })
            .await?
            .into_inner()
            .version;
        let deadline = Instant::now() + Duration::from_secs(5);
        for &g in &self.grpcs[1..] {
            let mut control = connect_control(g).await?;
            while control
                .get_task(pb::GetTaskRequest {})
                .await?
                .into_inner()
                .version
                < version
            {
                if Instant::now() > deadline {
                    bail!("replica {g} did not apply task v{version} within 5 s");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }

    /// Frames the stub workers answered.
    pub fn stub_frames(&self) -> u64 {
        self.stubs.iter().map(|s| s.frames()).sum()
    }

    /// Stops every process.
    pub async fn stop(mut self) {
        for s in std::mem::take(&mut self.stubs) {
            s.stop().await;
        }
        for (_, c, _) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.coordinators {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((c, _)) = &mut self.etcd {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.workers {
            let _ = c.kill();
        }
        for c in &mut self.coordinators {
            let _ = c.kill();
        }
        if let Some((c, _)) = &mut self.etcd {
            let _ = c.kill();
        }
    }
}

/// Starts a single-member etcd on loopback for coordinator replicas; returns its client
/// URL, the process and its data directory. Needs Debian's `etcd-server`.
async fn start_etcd(logs: &Path) -> anyhow::Result<(String, Child, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://{client}");
    let peer_url = format!("http://{peer}");
    let log = std::fs::File::create(logs.join("etcd.log"))?;
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting etcd for coordinator replicas (apt-get install etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(client).await.is_err() {
        if Instant::now() > deadline {
            bail!("etcd did not listen on {client} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((url, child, dir))
}

async fn connect_control(grpc: SocketAddr) -> anyhow::Result<ControlClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ControlClient::connect(format!("http://{grpc}")).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("coordinator at {grpc} did not come up"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// How a client loads the cloud.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent streams.
    pub streams: usize,
    /// Frames in flight per stream.
    pub window: usize,
    /// Frames in all.
    pub frames: usize,
}

/// Streams `load.frames` frames (cycling through `tensors`) to the coordinator at `grpc`
/// and measures what comes back; `cpu_of` names the processes whose CPU time counts.
pub async fn drive(
    grpcs: &[SocketAddr],
    model_hash: &str,
    tensors: Arc<Vec<pb::FeatureTensor>>,
    load: Load,
    cpu_of: Vec<(String, u32)>,
) -> anyhow::Result<Measured> {
    let streams = load.streams.max(1);
    let mut tasks = Vec::new();
    let meter = crate::cpu::CpuMeter::start(cpu_of);
    for s in 0..streams {
        let count = load.frames / streams + usize::from(s < load.frames % streams);
        let tensors = tensors.clone();
        let hash = model_hash.to_string();
        let window = load.window.max(1);
        let plan = StreamPlan {
            offset: s,
            count,
            window,
            until: None,
            answered: None,
        };
        // Streams spread over the replicas, as edges behind one Service would be.
        let grpc = grpcs[s % grpcs.len()];
        tasks.push(tokio::spawn(async move {
            one_stream(grpc, hash, tensors, plan).await
        }));
    }
    let (latencies, errors) = gather(tasks).await?;
    let (cpu, wall) = meter.stop();
    let mut m = Measured::new(load.frames, wall, latencies);
    m.errors = errors;
    m.cpu = cpu;
    m.bytes_per_frame = Some(wire_bytes(&tensors[0]) as f64);
    Ok(m)
}

/// Bytes of one frame message on the wire (protobuf, before HTTP/2 and gRPC framing).
pub fn wire_bytes(t: &pb::FeatureTensor) -> usize {
    use prost::Message;
    pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Frame(pb::Frame {
            seq: 1_000_000,
            features: Some(t.clone()),
        })),
    }
    .encoded_len()
}

/// Streams `duration` long on `streams` streams of `window` frames in flight each, then
/// waits for every frame sent to be answered; `answered` counts answers as they come.
pub async fn drive_for(
    grpc: SocketAddr,
    model_hash: &str,
    tensors: Arc<Vec<pb::FeatureTensor>>,
    streams: usize,
    window: usize,
    duration: Duration,
    answered: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Measured> {
    let until = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams.max(1) {
        let plan = StreamPlan {
            offset: s,
            count: usize::MAX,
            window: window.max(1),
            until: Some(until),
            answered: Some(answered.clone()),
        };
        let (tensors, hash) = (tensors.clone(), model_hash.to_string());
        tasks.push(tokio::spawn(async move {
            one_stream(grpc, hash, tensors, plan).await
        }));
    }
    let (latencies, errors) = gather(tasks).await?;
    // Every frame answered (prediction or error) has a latency; duplicates do not.
    let frames = latencies.len();
    let mut m = Measured::new(frames, started.elapsed().as_secs_f64(), latencies);
    m.errors = errors;
    Ok(m)
}

type StreamOutcome = (Vec<f64>, HashMap<String, usize>);

/// Every stream's latencies, and the errors of all of them by code.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<StreamOutcome>>>,
) -> anyhow::Result<(Vec<f64>, BTreeMap<String, usize>)> {
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let (l, e) = t.await.context("stream task")??;
        latencies.extend(l);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    Ok((latencies, errors))
}

/// One stream's share of a load.
struct StreamPlan {
    /// Which stream (spreads the images over streams).
    offset: usize,
    /// Frames to send at most.
    count: usize,
    /// Frames in flight at most.
    window: usize,
    /// Stop sending at this time (then drain).
    until: Option<Instant>,
    /// Counts answers as they arrive.
    answered: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Streams per `plan`; returns the latency of every prediction and the errors by code. An
/// answer for a frame not in flight (a second answer) counts as a `DUPLICATE` error.
async fn one_stream(
    grpc: SocketAddr,
    hash: String,
    tensors: Arc<Vec<pb::FeatureTensor>>,
    plan: StreamPlan,
) -> anyhow::Result<StreamOutcome> {
    let StreamPlan {
        offset,
        count,
        window,
        until,
        answered,
    } = plan;
    let mut client = InferenceClient::connect(format!("http://{grpc}"))
        .await?
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(window + 2);
    tx.send(pb::EdgeMessage {
        kind: Some(pb::edge_message::Kind::Hello(pb::Hello {
            model_hash: hash,
            edge_id: format!("bench-{offset}"),
            batch_answers: true,
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(Kind::Ready(_)) => {}
        other => bail!("expected ready, got {other:?}"),
    }
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let mut latencies = Vec::with_capacity(count.min(1 << 20));
    let mut errors: HashMap<String, usize> = HashMap::new();
    let (mut next, mut done) = (0usize, 0usize);
    loop {
        let open = until.is_none_or(|u| Instant::now() < u) && next < count;
        if !open && done >= next {
            break;
        }
        // Like the edge agent: every frame the window has room for goes in one message.
        let mut frames = Vec::new();
        while open && next < count && next - done < window {
            let t = &tensors[(offset + next * 7919) % tensors.len()];
            sent_at.insert(next as u64, Instant::now());
            frames.push(pb::Frame {
                seq: next as u64,
                features: Some(t.clone()),
            });
            next += 1;
        }
        if !frames.is_empty() {
            let kind = if frames.len() == 1 {
                pb::edge_message::Kind::Frame(frames.remove(0))
            } else {
                pb::edge_message::Kind::Frames(pb::FrameBatch { frames })
            };
            tx.send(pb::EdgeMessage { kind: Some(kind) }).await?;
        }
        let msg = tokio::time::timeout(Duration::from_secs(60), inbound.message())
            .await
            .context("no answer within 60 s")??
            .context("stream closed early")?;
        let (predictions, errs) = match msg.kind {
            Some(Kind::Prediction(p)) => (vec![p], Vec::new()),
            Some(Kind::Error(e)) => (Vec::new(), vec![e]),
            Some(Kind::Answers(b)) => (b.predictions, b.errors),
            other => bail!("unexpected answer {other:?}"),
        };
        let mut seqs: Vec<u64> = predictions.iter().map(|p| p.seq).collect();
        for e in errs {
            let code = format!("{:?}", tonic::Code::from(e.code));
            *errors.entry(code).or_default() += 1;
            seqs.push(e.seq);
        }
        let before = done;
        for seq in seqs {
            match sent_at.remove(&seq) {
                Some(t) => {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    done += 1;
                }
                None => *errors.entry("DUPLICATE".into()).or_default() += 1,
            }
        }
        if let Some(a) = &answered {
            a.fetch_add((done - before) as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok((latencies, errors))
}

/// Runs a `spotlight edge` process over the first `frames` test images against the
/// cluster, from raw image to prediction, and measures the edge's and the cloud's CPU.
pub async fn edge_process(
    exe: &Path,
    model: &spotlight_model::Model,
    dataset: &Path,
    cluster: &Cluster,
    frames: usize,
    window: usize,
    logs: &Path,
) -> anyhow::Result<Measured> {
    let library = spotlight_runtime::resolve_library(None)?;
    let mut child = Command::new(exe)
        .args([
            "--model",
            &model.dir().display().to_string(),
            "--insecure",
            "edge",
            "--coordinator",
        ])
        .arg(format!("http://{}", cluster.grpc))
        .arg("--idx-images")
        .arg(dataset.join("t10k-images-idx3-ubyte.gz"))
        .arg("--idx-labels")
        .arg(dataset.join("t10k-labels-idx1-ubyte.gz"))
        .args(["--limit", &frames.to_string()])
        .env("SPOTLIGHT_EDGE__MAX_IN_FLIGHT", window.to_string())
        .env("ORT_DYLIB_PATH", library)
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(logs.join("edge.log"))?)
        .spawn()
        .context("starting spotlight edge")?;
    let mut pids = cluster.pids();
    pids.push(("edge".into(), child.id()));
    let meter = crate::cpu::CpuMeter::start(pids);
    // The edge's CPU must be read before it exits: poll until it has printed its summary.
    let mut stdout = child.stdout.take().context("edge stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let mut last = meter.stop();
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait()?.is_none() {
        last = meter.stop();
        anyhow::ensure!(Instant::now() < deadline, "edge did not finish in 600 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let out = reader.join().unwrap_or_default();
    let (cpu, wall) = last;
    let summary = out
        .lines()
        .find(|l| l.starts_with("throughput"))
        .with_context(|| format!("no summary in the edge's output: {out}"))?;
    let field = |name: &str| -> f64 {
        summary
            .split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.trim_end_matches("ms").parse().ok())
            .unwrap_or(f64::NAN)
    };
    let mut m = Measured::new(frames, wall, Vec::new());
    // The edge's own clock starts after its model is loaded: its throughput, not ours.
    m.frames_per_s = field("throughput");
    m.p50_ms = field("p50");
    m.p99_ms = field("p99");
    m.p95_ms = f64::NAN;
    m.cpu = cpu;
    m.bytes_per_frame = Some(field("bytes/frame"));
    if let Some(errors) = out
        .lines()
        .find(|l| l.starts_with("frames"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "errors").nth(1))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&e| e > 0)
    {
        m.errors.insert("any".into(), errors);
    }
    Ok(m)
}

/// Where process logs go.
pub fn log_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("spotlight-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
