//! One long-lived `Branches.RunStream` per worker, carrying many frames per message.
//!
//! Routing hands a frame to a worker's link and awaits its logits. The link's task takes
//! every frame queued since its last send, groups consecutive frames that need the same
//! segments into one `RunBatch`, and matches each `RunBatchResult` back to the frames it
//! answers. A broken stream fails the frames in flight with UNAVAILABLE (routing then tries
//! another replica) and is reopened on the next frame. A failure of the transport (the
//! connection refused or reset, bytes that are not HTTP/2) is UNAVAILABLE whatever code
//! tonic gives it; a worker that does not open the stream in time is DEADLINE_EXCEEDED.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::branches_client::BranchesClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::error::{ApiError, ErrorCode};

/// Logits a worker returned for one frame: (category index, logit).
pub type FrameLogits = Vec<(u32, f32)>;

/// Most frames in one `RunBatch` the link sends.
const MAX_FRAMES_PER_MESSAGE: usize = 256;

/// How often frames whose caller gave up (deadline) are forgotten.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// Frames for a worker, answered together.
struct Request {
    /// The segments to run with their gains; frames sharing this `Arc` share a message.
    segments: Arc<[pb::SegmentRun]>,
    features: Vec<pb::FeatureTensor>,
    reply: Reply,
}

/// One answer per frame of a request, in order.
pub type FrameAnswers = Vec<Result<FrameLogits, ApiError>>;

/// The sending side of a worker's link; cheap to clone. The link's task ends when every
/// clone is dropped.
#[derive(Clone)]
pub struct WorkerLink {
    tx: mpsc::UnboundedSender<Request>,
}

impl std::fmt::Debug for WorkerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerLink")
    }
}

impl WorkerLink {
    /// Starts the link's task (on the current tokio runtime); connects on the first frame.
    pub fn spawn(
        worker_id: String,
        client: BranchesClient<Channel>,
        model: Arc<Model>,
        security: spotlight_service::Security,
        open_timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = LinkTask {
            worker_id,
            client,
            security,
            open_timeout,
            model_hash: model.hash().to_string(),
            model,
            rx,
            next_batch: 1,
            pending: HashMap::new(),
            out: None,
            inbound: None,
        };
        tokio::spawn(task.run());
        Self { tx }
    }

    /// Sends frames and waits for their logits, one answer per frame in order (the caller
    /// applies its own deadline). The outer error fails every frame (link or stream gone).
    pub async fn run(
        &self,
        segments: Arc<[pb::SegmentRun]>,
        features: Vec<pb::FeatureTensor>,
    ) -> Result<FrameAnswers, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ApiError::new(ErrorCode::Unavailable, "worker link closed");
        self.tx
            .send(Request {
                segments,
                features,
                reply,
            })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

type Reply = oneshot::Sender<Result<FrameAnswers, ApiError>>;

/// Each request's reply and how many frames of a batch (in order) are its.
type Replies = Vec<(Reply, usize)>;

struct Pending {
    segments: Arc<[pb::SegmentRun]>,
    replies: Replies,
}

struct LinkTask {
    worker_id: String,
    client: BranchesClient<Channel>,
    /// The coordinator's bearer token goes on every run stream.
    security: spotlight_service::Security,
    /// How long opening the stream may take (a hung worker accepts the connection).
    open_timeout: Duration,
    model_hash: String,
    model: Arc<Model>,
    rx: mpsc::UnboundedReceiver<Request>,
    next_batch: u64,
    /// Batches sent and not yet answered: the segments asked and the frames' replies, by
    /// position.
    pending: HashMap<u64, Pending>,
    out: Option<mpsc::UnboundedSender<pb::RunBatch>>,
    inbound: Option<tonic::Streaming<pb::RunBatchResult>>,
}

impl LinkTask {
    async fn run(mut self) {
        let mut sweep = tokio::time::interval(SWEEP_PERIOD);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                result = next_result(&mut self.inbound) => match result {
                    Some(Ok(r)) => self.answer(r),
                    Some(Err(status)) => self.broken(&format!("stream failed: {}", describe(&status))),
                    None => self.broken("stream closed by the worker"),
                },
                request = self.rx.recv() => {
                    let Some(first) = request else { break };
                    let mut frames = first.features.len();
                    let mut requests = vec![first];
                    while frames < MAX_FRAMES_PER_MESSAGE {
                        match self.rx.try_recv() {
                            Ok(r) => {
                                frames += r.features.len();
                                requests.push(r);
                            }
                            Err(_) => break,
                        }
                    }
                    self.send(requests).await;
                }
                _ = sweep.tick() => {
                    self.pending.retain(|_, p| p.replies.iter().any(|r| !r.0.is_closed()));
                }
            }
        }
        self.broken("worker left");
    }

    /// Opens the stream if it is not open.
    async fn connect(&mut self) -> Result<(), ApiError> {
        if self.out.is_some() {
            return Ok(());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut request = tonic::Request::new(outbound);
        self.security.attach(&mut request);
        let opened = tokio::time::timeout(self.open_timeout, self.client.run_stream(request)).await;
        match opened {
            Ok(Ok(response)) => {
                self.out = Some(tx);
                self.inbound = Some(response.into_inner());
                tracing::debug!(worker_id = self.worker_id, "run stream open");
                Ok(())
            }
            Ok(Err(status)) => Err(ApiError::new(
                transport_code(&status),
                format!(
                    "worker \"{}\": cannot open run stream: {}",
                    self.worker_id,
                    status.message()
                ),
            )),
            Err(_) => Err(ApiError::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "worker \"{}\" did not open its run stream within {} ms",
                    self.worker_id,
                    self.open_timeout.as_millis()
                ),
            )),
        }
    }

    async fn send(&mut self, requests: Vec<Request>) {
        if let Err(e) = self.connect().await {
            for r in requests {
                let _ = r.reply.send(Err(e.clone()));
            }
            return;
        }
        // Consecutive frames with the same segments share a message.
        let mut batches: Vec<(pb::RunBatch, Arc<[pb::SegmentRun]>, Replies)> = Vec::new();
        let mut last: Option<Arc<[pb::SegmentRun]>> = None;
        for r in requests {
            if r.reply.is_closed() {
                continue;
            }
            let same = last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &r.segments));
            if !same {
                let id = self.next_batch;
                self.next_batch += 1;
                batches.push((
                    pb::RunBatch {
                        batch_id: id,
                        model_hash: self.model_hash.clone(),
                        segments: r.segments.to_vec(),
                        features: Vec::new(),
                    },
                    r.segments.clone(),
                    Vec::new(),
                ));
                last = Some(r.segments.clone());
            }
            if let Some((batch, _, replies)) = batches.last_mut() {
                replies.push((r.reply, r.features.len()));
                batch.features.extend(r.features);
            }
        }
        for (batch, segments, replies) in batches {
            let id = batch.batch_id;
            let sent = self.out.as_ref().is_some_and(|out| out.send(batch).is_ok());
            if sent {
                self.pending.insert(id, Pending { segments, replies });
            } else {
                let e = self.unavailable("run stream closed");
                for (r, _) in replies {
                    let _ = r.send(Err(e.clone()));
                }
            }
        }
    }

    /// Hands each frame of a result its logits or its error.
    fn answer(&mut self, result: pb::RunBatchResult) {
        let Some(Pending { segments, replies }) = self.pending.remove(&result.batch_id) else {
            tracing::warn!(
                worker_id = self.worker_id,
                batch_id = result.batch_id,
                "result for an unknown batch ignored"
            );
            return;
        };
        let n: usize = replies.iter().map(|r| r.1).sum();
        let mut answers: Vec<Option<Result<FrameLogits, ApiError>>> = vec![None; n];
        match self.split(&result, &segments, n) {
            Ok(per_row) => {
                for (row, logits) in result.rows.iter().zip(per_row) {
                    answers[*row as usize] = Some(Ok(logits));
                }
                for e in &result.errors {
                    answers[e.index as usize] = Some(Err(ApiError::new(
                        ErrorCode::from_grpc(tonic::Code::from(e.code)),
                        format!("worker \"{}\": {}", self.worker_id, e.message),
                    )));
                }
            }
            Err(message) => {
                // The whole call failed, so routing counts it against the worker.
                let e = ApiError::new(
                    ErrorCode::Internal,
                    format!("worker \"{}\" answered badly: {message}", self.worker_id),
                );
                for (reply, _) in replies {
                    let _ = reply.send(Err(e.clone()));
                }
                return;
            }
        }
        let mut answers = answers.into_iter().map(|answer| {
            answer.unwrap_or_else(|| {
                Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("worker \"{}\" left a frame unanswered", self.worker_id),
                ))
            })
        });
        for (reply, count) in replies {
            let mine: FrameAnswers = answers.by_ref().take(count).collect();
            let _ = reply.send(Ok(mine));
        }
    }

    /// Checks a result against the batch of `n` frames that asked for `segments` — every
    /// frame answered once, exactly the asked segments that score categories, their own
    /// categories, finite logits of the right count — and splits its logits by row.
    fn split(
        &self,
        result: &pb::RunBatchResult,
        segments: &[pb::SegmentRun],
        n: usize,
    ) -> Result<Vec<FrameLogits>, String> {
        let mut seen = vec![false; n];
        for &i in result
            .rows
            .iter()
            .chain(result.errors.iter().map(|e| &e.index))
        {
            let slot = seen
                .get_mut(i as usize)
                .ok_or_else(|| format!("frame index {i} out of range (batch of {n})"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("frame {i} answered twice"));
            }
        }
        let rows = result.rows.len();
        let mut expected: Vec<usize> = segments
            .iter()
            .filter_map(|r| self.model.segment_index(&r.segment_id))
            .filter(|&s| !self.model.segments()[s].direct_categories.is_empty())
            .collect();
        let mut per_row: Vec<FrameLogits> = vec![Vec::new(); rows];
        for out in &result.outputs {
            let s = self
                .model
                .segment_index(&out.segment_id)
                .filter(|s| expected.contains(s))
                .ok_or_else(|| {
                    format!(
                        "output for segment \"{}\", which was not asked or was answered twice",
                        out.segment_id
                    )
                })?;
            expected.retain(|&e| e != s);
            let own = &self.model.segments()[s].direct_categories;
            if out.categories.len() != own.len()
                || out
                    .categories
                    .iter()
                    .zip(own)
                    .any(|(&a, &b)| a as usize != b)
            {
                return Err(format!(
                    "segment \"{}\" answered categories {:?}; it scores {:?}",
                    out.segment_id, out.categories, own
                ));
            }
            if let Some(z) = out.logits.iter().find(|z| !z.is_finite()) {
                return Err(format!(
                    "segment \"{}\" answered a non-finite logit ({z})",
                    out.segment_id
                ));
            }
            let k = out.categories.len();
            if out.logits.len() != rows * k {
                return Err(format!(
                    "segment \"{}\" has {} logits for {rows} frames of {k} categories",
                    out.segment_id,
                    out.logits.len()
                ));
            }
            for (r, row) in per_row.iter_mut().enumerate() {
                row.extend(
                    out.categories
                        .iter()
                        .copied()
                        .zip(out.logits[r * k..(r + 1) * k].iter().copied()),
                );
            }
        }
        if rows > 0
            && let Some(&missing) = expected.first()
        {
            return Err(format!(
                "no output for segment \"{}\"",
                self.model.segments()[missing].id
            ));
        }
        Ok(per_row)
    }

    fn unavailable(&self, why: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("worker \"{}\": {why}", self.worker_id),
        )
    }

    /// Drops the stream and fails every frame in flight on it.
    fn broken(&mut self, why: &str) {
        if !self.pending.is_empty() {
            tracing::warn!(
                worker_id = self.worker_id,
                in_flight = self
                    .pending
                    .values()
                    .map(|p| p.replies.len())
                    .sum::<usize>(),
                why,
                "run stream broken"
            );
        }
        self.out = None;
        self.inbound = None;
        let e = self.unavailable(why);
        for (_, pending) in self.pending.drain() {
            for (r, _) in pending.replies {
                let _ = r.send(Err(e.clone()));
            }
        }
    }
}

/// The next result of an open stream; pending forever when there is none.
async fn next_result(
    inbound: &mut Option<tonic::Streaming<pb::RunBatchResult>>,
) -> Option<Result<pb::RunBatchResult, tonic::Status>> {
    match inbound {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The code of a failed attempt to reach a worker: the transport failing (refused, reset,
/// not HTTP/2; tonic reports these as UNAVAILABLE, UNKNOWN, INTERNAL or CANCELLED) is
/// UNAVAILABLE, so routing tries another replica; a timeout is DEADLINE_EXCEEDED; a status
/// the worker sent keeps its code.
fn transport_code(status: &tonic::Status) -> ErrorCode {
    use std::error::Error;
    match status.code() {
        tonic::Code::DeadlineExceeded => ErrorCode::DeadlineExceeded,
        // tonic's `TimeoutExpired` becomes CANCELLED "Timeout expired".
        tonic::Code::Cancelled if status.message().contains("Timeout expired") => {
            ErrorCode::DeadlineExceeded
        }
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            ErrorCode::Unavailable
        }
        _ if status.source().is_some() => ErrorCode::Unavailable,
        code => ErrorCode::from_grpc(code),
    }
}

/// A status for logs: its code and message.
fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
