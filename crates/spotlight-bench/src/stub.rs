//! Stub branch workers: they speak the worker's protocols (`Branches`, `Registry`) but run no
//! model, answering every frame at once with logit 0.0 for each direct category of each
//! requested segment. With stubs behind it, the coordinator's routing, batching and merge
//! cost can be measured on its own.
//!
//! A stub checks requests the way a real worker does (model hash, segments, tensor shape
//! and length, without decoding) so that the coordinator sees the same answers, errors
//! included.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{Stream, StreamExt};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::registry_client::RegistryClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

/// How long [`StubWorker::start`] keeps trying to reach the coordinator.
const REGISTER_DEADLINE: Duration = Duration::from_secs(10);

/// How long [`StubWorker::stop`] waits for deregistration and for the server to drain.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A running stub worker.
pub struct StubWorker {
    /// Where its `Branches` service listens.
    pub addr: SocketAddr,
    /// Its worker id.
    pub worker_id: String,
    state: Arc<State>,
    /// Tells the lease task to deregister and end.
    leave: watch::Sender<bool>,
    /// Ends open run streams and stops the server.
    shutdown: watch::Sender<bool>,
    lease: Option<JoinHandle<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl StubWorker {
    /// Serves `Branches` (Run, RunStream, Stats) on `listener`, answering every frame at
    /// once with logit 0.0 for each direct category of each requested segment; registers
    /// with the coordinator at `coordinator` (e.g. "http://127.0.0.1:7000") hosting
    /// `branches` (top-level segment ids, with their descendants; empty = all) and
    /// heartbeats until stopped.
    ///
    /// Returns once the coordinator has granted the lease (retrying for up to 10 s while it
    /// is unreachable); a refusal (e.g. another model hash) is an error.
    pub async fn start(
        model: Arc<Model>,
        coordinator: String,
        worker_id: String,
        branches: Vec<String>,
        listener: TcpListener,
    ) -> anyhow::Result<StubWorker> {
        let hosted = hosted_segments(&model, &branches)?;
        let addr = listener.local_addr().context("listener address")?;
        let state = Arc::new(State::new(model, worker_id.clone(), hosted));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let service = StubService {
            state: state.clone(),
            shutdown: shutdown_rx.clone(),
        };
        // `Server::tcp_nodelay` does not apply to a pre-bound listener; without it, Nagle's
        // algorithm holds back small results behind a delayed ACK (40 ms stalls).
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let server = tonic::transport::Server::builder()
            .add_service(
                pb::branches_server::BranchesServer::new(service)
                    .max_decoding_message_size(16 << 20),
            )
            .serve_with_incoming_shutdown(incoming, signalled(shutdown_rx));
        let server = tokio::spawn(server);

        let registration = pb::RegisterRequest {
            worker_id: worker_id.clone(),
            endpoint: format!("http://{addr}"),
            segments: state.segment_ids(),
            model_hash: state.model.hash().to_string(),
        };
        let channel = Endpoint::from_shared(coordinator.clone())
            .with_context(|| format!("bad coordinator endpoint \"{coordinator}\""))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let mut client = RegistryClient::new(channel);
        let granted = match register(&mut client, &registration, REGISTER_DEADLINE).await {
            Ok(granted) => granted,
            Err(e) => {
                let _ = shutdown.send(true);
                let _ = tokio::time::timeout(STOP_DEADLINE, server).await;
                return Err(e.context(format!(
                    "stub worker \"{worker_id}\" cannot register with {coordinator}"
                )));
            }
        };
        tracing::debug!(
            worker_id,
            %addr,
            lease_id = granted.lease_id,
            ttl_ms = granted.ttl_ms,
            "stub worker registered"
        );

        let (leave, leave_rx) = watch::channel(false);
        let lease = tokio::spawn(keep_lease(client, registration, granted, leave_rx));
        Ok(StubWorker {
            addr,
            worker_id,
            state,
            leave,
            shutdown,
            lease: Some(lease),
            server: Some(server),
        })
    }

    /// Frames answered so far (frames that ran, over `Run` and `RunStream`; frames answered
    /// with an error are not counted).
    pub fn frames(&self) -> u64 {
        self.state.frames.load(Ordering::Relaxed)
    }

    /// Deregisters and stops: open run streams end and the server drains (each step waits
    /// at most 5 s).
    pub async fn stop(mut self) {
        let _ = self.leave.send(true);
        if let Some(lease) = self.lease.take() {
            let _ = tokio::time::timeout(STOP_DEADLINE, lease).await;
        }
        let _ = self.shutdown.send(true);
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(STOP_DEADLINE, server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::warn!(worker_id = self.worker_id, error = %e, "stub server failed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(worker_id = self.worker_id, error = %e, "stub server task failed")
                }
                Err(_) => tracing::warn!(
                    worker_id = self.worker_id,
                    "stub server did not drain in time"
                ),
            }
        }
    }
}

impl Drop for StubWorker {
    /// Dropped without [`StubWorker::stop`]: the lease task still deregisters and the server
    /// still stops, in the background.
    fn drop(&mut self) {
        let _ = self.leave.send(true);
        let _ = self.shutdown.send(true);
    }
}

/// Resolves once `rx` turns true (or its sender is gone).
async fn signalled(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Hosted flags by segment index for `branches` (top-level ids; empty = all).
fn hosted_segments(model: &Model, branches: &[String]) -> anyhow::Result<Vec<bool>> {
    for b in branches {
        match model.segment_index(b) {
            Some(s) if model.segments()[s].parent.is_none() => {}
            Some(_) => bail!("branch \"{b}\" is not a top-level segment; list top-level ids only"),
            None => {
                let roots: Vec<&str> = model
                    .segments()
                    .iter()
                    .filter(|s| s.parent.is_none())
                    .map(|s| s.id.as_str())
                    .collect();
                bail!(
                    "unknown branch \"{b}\"; top-level segments: {}",
                    roots.join(", ")
                );
            }
        }
    }
    Ok((0..model.segments().len())
        .map(|s| {
            let root = &model.segments()[model.root_of(s)].id;
            branches.is_empty() || branches.contains(root)
        })
        .collect())
}

/// Registers, retrying with backoff while the coordinator is unreachable, for up to
/// `deadline`. A refusal is final.
async fn register(
    client: &mut RegistryClient<Channel>,
    request: &pb::RegisterRequest,
    deadline: Duration,
) -> anyhow::Result<pb::RegisterResponse> {
    let until = tokio::time::Instant::now() + deadline;
    let mut backoff = Duration::from_millis(20);
    loop {
        let status = match client.register(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => status,
        };
        let transient = matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded
        );
        if !transient {
            bail!("refused: {:?}: {}", status.code(), status.message());
        }
        if tokio::time::Instant::now() + backoff > until {
            bail!(
                "coordinator unreachable for {} ms: {}",
                deadline.as_millis(),
                status.message()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Heartbeats at a third of the lease TTL, registers again if the lease was lost, and
/// deregisters once `leave` turns true.
async fn keep_lease(
    mut client: RegistryClient<Channel>,
    registration: pb::RegisterRequest,
    granted: pb::RegisterResponse,
    leave: watch::Receiver<bool>,
) {
    let worker_id = registration.worker_id.clone();
    let period =
        |ttl_ms: u32| (Duration::from_millis(u64::from(ttl_ms)) / 3).max(Duration::from_millis(10));
    let mut lease = Some(granted.lease_id);
    let mut wait = period(granted.ttl_ms);
    let left = signalled(leave);
    tokio::pin!(left);
    loop {
        tokio::select! {
            _ = &mut left => break,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = match lease {
            Some(id) => {
                let beat = pb::HeartbeatRequest {
                    lease_id: id,
                    worker_id: worker_id.clone(),
                };
                match client.heartbeat(beat).await {
                    Ok(_) => wait,
                    Err(status) if status.code() == Code::NotFound => {
                        tracing::warn!(worker_id, lease_id = id, "lease lost; registering again");
                        lease = None;
                        Duration::ZERO
                    }
                    Err(status) => {
                        tracing::warn!(worker_id, error = %status.message(), "heartbeat failed");
                        wait.min(Duration::from_millis(200))
                    }
                }
            }
            None => match client.register(registration.clone()).await {
                Ok(response) => {
                    let r = response.into_inner();
                    lease = Some(r.lease_id);
                    period(r.ttl_ms)
                }
                Err(status) => {
                    tracing::warn!(worker_id, error = %status.message(), "cannot register again yet");
                    Duration::from_millis(200)
                }
            },
        };
    }
    if let Some(id) = lease {
        let gone = tokio::time::timeout(
            STOP_DEADLINE,
            client.deregister(pb::DeregisterRequest { lease_id: id }),
        )
        .await;
        match gone {
            Ok(Ok(_)) => tracing::debug!(worker_id, lease_id = id, "stub worker deregistered"),
            Ok(Err(status)) => {
                tracing::warn!(worker_id, error = %status.message(), "deregister failed")
            }
            Err(_) => tracing::warn!(worker_id, "deregister timed out"),
        }
    }
}

/// Per-segment counters.
#[derive(Default)]
struct SegmentCounters {
    frames: AtomicU64,
    batches: AtomicU64,
}

/// What the service answers from.
struct State {
    model: Arc<Model>,
    worker_id: String,
    /// By segment index.
    hosted: Vec<bool>,
    /// Frames that ran.
    frames: AtomicU64,
    segments: Vec<SegmentCounters>,
}

impl State {
    fn new(model: Arc<Model>, worker_id: String, hosted: Vec<bool>) -> Self {
        let segments = (0..hosted.len())
            .map(|_| SegmentCounters::default())
            .collect();
        Self {
            model,
            worker_id,
            hosted,
            frames: AtomicU64::new(0),
            segments,
        }
    }

    /// Hosted segment ids, in tree order.
    fn segment_ids(&self) -> Vec<String> {
        self.hosted
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .map(|(s, _)| self.model.segments()[s].id.clone())
            .collect()
    }

    /// Answers a batch of frames (the result's `batch_id` is left 0).
    fn answer(
        &self,
        model_hash: &str,
        segments: &[pb::SegmentRun],
        features: &[pb::FeatureTensor],
    ) -> pb::RunBatchResult {
        let n = features.len();
        // The same checks, and so the same answers and errors, as a real worker.
        let checked = spotlight_worker::engine::check_request(
            &self.model,
            &self.hosted,
            model_hash,
            segments,
            features.to_vec(),
        );
        let (wanted, rows, errors) = match checked {
            Ok(c) => (
                c.segments.into_iter().map(|(s, _)| s).collect::<Vec<_>>(),
                c.frames.into_iter().map(|(i, _)| i).collect::<Vec<u32>>(),
                c.errors,
            ),
            Err(e) => {
                return pb::RunBatchResult {
                    errors: (0..n as u32)
                        .map(|index| pb::ItemError {
                            index,
                            code: e.code() as i32,
                            message: e.to_string(),
                        })
                        .collect(),
                    ..Default::default()
                };
            }
        };
        let model = &self.model;
        let mut outputs = Vec::new();
        if !rows.is_empty() {
            let ran = rows.len() as u64;
            for &s in &wanted {
                let c = &self.segments[s];
                c.frames.fetch_add(ran, Ordering::Relaxed);
                c.batches.fetch_add(1, Ordering::Relaxed);
                let spec = &model.segments()[s];
                if spec.direct_categories.is_empty() {
                    continue;
                }
                outputs.push(pb::SegmentOutput {
                    segment_id: spec.id.clone(),
                    categories: spec.direct_categories.iter().map(|&c| c as u32).collect(),
                    logits: vec![0.0; rows.len() * spec.direct_categories.len()],
                });
            }
            self.frames.fetch_add(ran, Ordering::Relaxed);
        }
        pb::RunBatchResult {
            batch_id: 0,
            rows,
            outputs,
            errors,
        }
    }

    fn stats(&self) -> pb::StatsResponse {
        let hosted = || {
            self.hosted
                .iter()
                .enumerate()
                .filter(|(_, h)| **h)
                .map(|(s, _)| (self.model.segments()[s].id.clone(), &self.segments[s]))
        };
        pb::StatsResponse {
            worker_id: self.worker_id.clone(),
            requests: self.frames.load(Ordering::Relaxed),
            segments_run: hosted()
                .map(|(id, c)| (id, c.frames.load(Ordering::Relaxed)))
                .collect(),
            segment_batches: hosted()
                .map(|(id, c)| (id, c.batches.load(Ordering::Relaxed)))
                .collect(),
            rejected: 0,
        }
    }
}

struct StubService {
    state: Arc<State>,
    shutdown: watch::Receiver<bool>,
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<pb::RunBatchResult, Status>> + Send>>;

#[tonic::async_trait]
impl pb::branches_server::Branches for StubService {
    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunResponse>, Status> {
        let request = request.into_inner();
        let features = request
            .features
            .ok_or_else(|| Status::invalid_argument("request has no feature tensor"))?;
        let result = self.state.answer(
            &request.model_hash,
            &request.segments,
            std::slice::from_ref(&features),
        );
        if let Some(e) = result.errors.into_iter().next() {
            return Err(Status::new(Code::from(e.code), e.message));
        }
        Ok(Response::new(pb::RunResponse {
            outputs: result.outputs,
        }))
    }

    type RunStreamStream = ResultStream;

    /// Answers each batch as it is read, on the task that polls the response: no queue,
    /// no extra hop. Ends when the caller ends its side, on a transport error, or when the
    /// stub stops.
    async fn run_stream(
        &self,
        request: Request<Streaming<pb::RunBatch>>,
    ) -> Result<Response<Self::RunStreamStream>, Status> {
        let state = self.state.clone();
        let results = request
            .into_inner()
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| futures::future::ready(m.ok()))
            .map(move |batch| {
                let mut result = state.answer(&batch.model_hash, &batch.segments, &batch.features);
                result.batch_id = batch.batch_id;
                Ok(result)
            })
            .take_until(signalled(self.shutdown.clone()));
        Ok(Response::new(Box::pin(results)))
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Ok(Response::new(self.state.stats()))
    }
}
