//! The bidirectional stream to the coordinator: hello, frames out, answers in, a bounded
//! window of frames in flight, and reconnection with exponential backoff that re-sends the
//! unanswered frames.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use spotlight_proto::v1::inference_client::InferenceClient;
use spotlight_proto::v1::{
    CloudMessage, EdgeMessage, Frame, FrameError, Hello, Prediction, cloud_message, edge_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::Instrument;

use crate::EdgeError;
use crate::backbone::Job;
use crate::config::{ReconnectConfig, Transport};
use crate::record::{CloudPrediction, FrameFailure, ItemMeta, Score, Sink, code};

/// How long to wait for `ready` after the hello.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers from the coordinator, whatever the transport.
type Inbound =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<CloudMessage, tonic::Status>> + Send>>;

/// Splits a frame batch into messages of at most `per_stream` frames, each for a QUIC stream
/// of its own: a lost packet then holds up only the frames of its stream.
fn split_for_quic(message: EdgeMessage, per_stream: usize) -> Vec<EdgeMessage> {
    match message.kind {
        Some(edge_message::Kind::Frames(batch)) if batch.frames.len() > per_stream => batch
            .frames
            .chunks(per_stream)
            .map(|c| EdgeMessage {
                kind: Some(match c {
                    [one] => edge_message::Kind::Frame(one.clone()),
                    many => edge_message::Kind::Frames(spotlight_proto::v1::FrameBatch {
                        frames: many.to_vec(),
                    }),
                }),
            })
            .collect(),
        kind => vec![EdgeMessage { kind }],
    }
}

/// Sends `message` on a QUIC stream of its own and reads its answer there. With `copies` >
/// 1, copy k starts k × `gap` later on another stream (so the copies leave in different
/// packets) and the first answer wins; the others are dropped, which resets their streams.
async fn quic_exchange(
    conn: &quinn::Connection,
    message: &EdgeMessage,
    copies: usize,
    gap: Duration,
) -> Result<CloudMessage, tonic::Status> {
    use spotlight_service::quic::{read_msg, write_msg};
    let one = |k: u32| async move {
        if k > 0 {
            tokio::time::sleep(gap * k).await;
        }
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| quic_status(&e))?;
        write_msg(&mut send, message)
            .await
            .map_err(tonic::Status::unavailable)?;
        let _ = send.finish();
        read_msg::<CloudMessage>(&mut recv)
            .await
            .map_err(tonic::Status::unavailable)?
            .ok_or_else(|| tonic::Status::unavailable("stream ended without an answer"))
    };
    if copies <= 1 {
        return one(0).await;
    }
    let attempts = (0..copies as u32).map(|k| Box::pin(one(k)));
    futures::future::select_ok(attempts)
        .await
        .map(|(answer, _others)| answer)
}

/// A QUIC connection's end as a gRPC status: the coordinator closes with the status code as
/// its application error code and the message as the reason.
fn quic_status(e: &quinn::ConnectionError) -> tonic::Status {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => tonic::Status::new(
            tonic::Code::from(close.error_code.into_inner() as i32),
            String::from_utf8_lossy(&close.reason).to_string(),
        ),
        other => tonic::Status::unavailable(format!("QUIC connection: {other}")),
    }
}

/// A frame sent and not yet answered.
#[derive(Debug)]
pub(crate) struct Pending {
    pub meta: ItemMeta,
    pub frame: Frame,
    pub started: Instant,
    /// When it was first sent.
    pub sent: Instant,
}

/// Frames in flight, by seq. Answers for unknown seqs (already answered, e.g. by a stream
/// that broke after answering) are dropped, so each frame is reported once.
#[derive(Debug)]
pub(crate) struct Window {
    cap: usize,
    pending: BTreeMap<u64, Pending>,
    duplicates: u64,
}

/// Most frames the edge puts in one message.
const MAX_FRAMES_PER_MESSAGE: usize = 256;

/// One message for `msgs` (frame messages): the frame itself, or a `FrameBatch`.
fn batch_message(mut msgs: Vec<EdgeMessage>) -> EdgeMessage {
    if msgs.len() == 1 {
        return msgs.remove(0);
    }
    let frames = msgs
        .into_iter()
        .filter_map(|m| match m.kind {
            Some(edge_message::Kind::Frame(f)) => Some(f),
            _ => None,
        })
        .collect();
    EdgeMessage {
        kind: Some(edge_message::Kind::Frames(
            spotlight_proto::v1::FrameBatch { frames },
        )),
    }
}

fn frame_message(frame: Frame) -> EdgeMessage {
    EdgeMessage {
        kind: Some(edge_message::Kind::Frame(frame)),
    }
}

impl Window {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            pending: BTreeMap::new(),
            duplicates: 0,
        }
    }

    pub fn has_room(&self) -> bool {
        self.pending.len() < self.cap
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Answers dropped because their seq was not in flight.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Records a job as in flight; returns the message to send.
    pub fn insert(&mut self, job: Job) -> EdgeMessage {
        let frame = Frame {
            seq: job.meta.seq,
            features: Some(job.features),
        };
        let msg = frame_message(frame.clone());
        self.pending.insert(
            frame.seq,
            Pending {
                meta: job.meta,
                frame,
                started: job.started,
                sent: Instant::now(),
            },
        );
        msg
    }

    /// Every unanswered frame, in seq order, to send again on a new stream.
    pub fn resend(&self) -> Vec<EdgeMessage> {
        self.pending
            .values()
            .map(|p| frame_message(p.frame.clone()))
            .collect()
    }

    /// Takes the frame an answer is for; `None` (counted as duplicate) if it is not in flight.
    pub fn answer(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq);
        if p.is_none() {
            self.duplicates += 1;
        }
        p
    }

    /// Takes every unanswered frame.
    pub fn drain(&mut self) -> Vec<Pending> {
        std::mem::take(&mut self.pending).into_values().collect()
    }
}

pub(crate) fn prediction_from_proto(p: Prediction) -> CloudPrediction {
    let cost = p.cost.unwrap_or_default();
    CloudPrediction {
        task_version: p.task_version,
        top_index: p.top_index,
        top_name: p.top_name,
        scores: p
            .scores
            .into_iter()
            .map(|s| Score {
                index: s.index,
                name: s.name,
                score: s.score,
            })
            .collect(),
        segments_run: cost.segments_run,
        cloud_macs: cost.cloud_macs,
        cloud_macs_saved: cost.cloud_macs_saved,
    }
}

/// What stopped a session.
enum SessionEnd {
    /// Input finished and every frame answered.
    Done,
    /// Shutdown was requested and the drain timeout passed.
    DrainExpired,
    /// The stream or connection broke; reconnect.
    Broken(String),
    /// Reconnecting cannot help.
    Fatal(EdgeError),
}

/// Why opening a session failed.
enum OpenError {
    Retry(String),
    Fatal(EdgeError),
}

enum Event {
    Inbound(Option<Result<CloudMessage, tonic::Status>>),
    Job(Option<Job>),
    Stop,
    Deadline,
    Stalled,
}

/// Everything the stream driver needs.
pub(crate) struct StreamDriver {
    pub endpoint: Endpoint,
    pub coordinator: String,
    pub hello: Hello,
    pub reconnect: ReconnectConfig,
    pub drain_timeout: Duration,
    pub sink: Sink,
    pub jobs: mpsc::Receiver<Job>,
    pub window: Window,
    /// Begun on shutdown (external) or by the driver itself on fatal errors.
    pub stop: spotlight_service::Shutdown,
    /// Frames waiting longer than this with no answer at all mean a stuck stream:
    /// reconnect and re-send.
    pub answer_timeout: Duration,
    /// Adds the edge's bearer token to every stream it opens.
    pub security: spotlight_service::Security,
    /// gRPC or QUIC.
    pub transport: Transport,
    /// QUIC: frames per stream (a lost packet holds up at most these).
    pub quic_stream_frames: usize,
    /// QUIC: copies of each message, `quic_copy_gap` apart; the first answer wins.
    pub quic_copies: usize,
    pub quic_copy_gap: Duration,
    /// Time each frame from when it is sent instead of from its backbone run (`precompute`).
    pub time_from_send: bool,
    /// Other coordinator replicas, tried in turn when the stream breaks.
    pub alternates: std::collections::VecDeque<(String, Endpoint)>,
    input_open: bool,
    deadline: Option<tokio::time::Instant>,
}

impl StreamDriver {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        endpoint: Endpoint,
        coordinator: String,
        hello: Hello,
        reconnect: ReconnectConfig,
        drain_timeout: Duration,
        sink: Sink,
        jobs: mpsc::Receiver<Job>,
        max_in_flight: usize,
        stop: spotlight_service::Shutdown,
    ) -> Self {
        Self {
            endpoint,
            coordinator,
            hello,
            reconnect,
            drain_timeout,
            sink,
            jobs,
            window: Window::new(max_in_flight),
            stop,
            answer_timeout: Duration::from_secs(30),
            security: spotlight_service::Security::insecure(),
            transport: Transport::Grpc,
            quic_stream_frames: 1,
            quic_copies: 1,
            quic_copy_gap: Duration::from_millis(2),
            time_from_send: false,
            alternates: Default::default(),
            input_open: true,
            deadline: None,
        }
    }

    /// Runs until every job is answered (or failed). Errors are fatal model mismatches or
    /// giving up after `max_attempts` failed connection attempts.
    pub async fn run(mut self) -> Result<(), EdgeError> {
        let mut failures = 0u32;
        loop {
            if !self.input_open && self.window.is_empty() {
                return Ok(());
            }
            let span = tracing::info_span!("session", coordinator = %self.coordinator, attempt = failures + 1);
            let end = match self.open().instrument(span.clone()).await {
                Ok((tx, inbound)) => {
                    failures = 0;
                    self.sink.metrics().set_connected(true);
                    let end = self.session(tx, inbound).instrument(span).await;
                    self.sink.metrics().set_connected(false);
                    end
                }
                Err(OpenError::Retry(reason)) => SessionEnd::Broken(reason),
                Err(OpenError::Fatal(e)) => SessionEnd::Fatal(e),
            };
            match end {
                SessionEnd::Done => return Ok(()),
                SessionEnd::DrainExpired => {
                    self.fail_all(FrameFailure::new(
                        code::CANCELLED,
                        "shut down before the coordinator answered",
                    ))
                    .await;
                    return Ok(());
                }
                SessionEnd::Fatal(e) => {
                    self.fail_all(FrameFailure::new(code::FAILED_PRECONDITION, e.to_string()))
                        .await;
                    return Err(e);
                }
                SessionEnd::Broken(reason) => {
                    failures += 1;
                    self.fail_over();
                    if failures >= self.reconnect.max_attempts {
                        let unanswered = self.window.len() as u64;
                        let e = EdgeError::Unreachable {
                            endpoint: self.coordinator.clone(),
                            attempts: failures,
                            last: reason,
                            unanswered,
                        };
                        self.fail_all(FrameFailure::new(code::UNAVAILABLE, e.to_string()))
                            .await;
                        return Err(e);
                    }
                    let wait = self.reconnect.backoff(failures);
                    tracing::warn!(%reason, attempt = failures, wait_ms = wait.as_millis() as u64,
                        unanswered = self.window.len(), "stream to coordinator broke; reconnecting");
                    if self.wait(wait).await {
                        self.fail_all(FrameFailure::new(
                            code::CANCELLED,
                            format!(
                                "shut down while reconnecting to {}: {reason}",
                                self.coordinator
                            ),
                        ))
                        .await;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Moves to the next coordinator replica, if there are several.
    fn fail_over(&mut self) {
        if let Some((coordinator, endpoint)) = self.alternates.pop_front() {
            let old = std::mem::replace(&mut self.coordinator, coordinator);
            let old_endpoint = std::mem::replace(&mut self.endpoint, endpoint);
            tracing::info!(from = %old, to = %self.coordinator, "moving to another coordinator replica");
            self.alternates.push_back((old, old_endpoint));
        }
    }

    /// Waits `wait`; true if the drain deadline passed meanwhile.
    async fn wait(&mut self, wait: Duration) -> bool {
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            let deadline = self.deadline.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = &mut sleep => return false,
                _ = tokio::time::sleep_until(deadline), if self.deadline.is_some() => return true,
                _ = self.stop.begun(), if self.deadline.is_none() => self.start_drain(),
            }
        }
    }

    fn start_drain(&mut self) {
        tracing::info!(
            unanswered = self.window.len(),
            timeout_ms = self.drain_timeout.as_millis() as u64,
            "shutdown requested; draining frames in flight"
        );
        self.deadline = Some(tokio::time::Instant::now() + self.drain_timeout);
    }

    /// Fails every frame in flight and every job still to come with `failure`, and stops
    /// the sources.
    async fn fail_all(&mut self, failure: FrameFailure) {
        self.stop.begin();
        for p in self.window.drain() {
            self.sink.fail(p.meta, failure.clone());
        }
        self.sink.metrics().in_flight.set(0);
        while let Some(job) = self.jobs.recv().await {
            self.sink.fail(job.meta, failure.clone());
        }
        self.input_open = false;
    }

    async fn open(&mut self) -> Result<(mpsc::Sender<EdgeMessage>, Inbound), OpenError> {
        match self.transport {
            Transport::Grpc => self.open_grpc().await,
            Transport::Quic => self.open_quic().await,
        }
    }

    /// QUIC: hello and ready on a control stream, then each message on a stream of its own
    /// whose answers come back on it (see `spotlight_service::quic`).
    async fn open_quic(&mut self) -> Result<(mpsc::Sender<EdgeMessage>, Inbound), OpenError> {
        use spotlight_service::quic::{read_msg, write_msg};
        let uri: tonic::codegen::http::Uri = self
            .coordinator
            .parse()
            .map_err(|e| OpenError::Fatal(EdgeError::Config(format!("coordinator: {e}"))))?;
        let host = uri
            .host()
            .unwrap_or("127.0.0.1")
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(7000);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| OpenError::Retry(format!("cannot resolve {host}:{port}")))?;
        let config = self
            .security
            .quic_client_config()
            .map_err(|e| OpenError::Fatal(EdgeError::Config(e.to_string())))?;
        let bind: std::net::SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| OpenError::Retry(format!("QUIC socket: {e}")))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(addr, self.security.quic_server_name(&host))
            .map_err(|e| OpenError::Retry(format!("cannot connect: {e}")))?
            .await
            .map_err(|e| self.classify(quic_status(&e)))?;
        let (mut control_tx, mut control_rx) = conn
            .open_bi()
            .await
            .map_err(|e| self.classify(quic_status(&e)))?;
        let mut hello = self.hello.clone();
        hello.authorization = self.security.bearer_string();
        let hello = EdgeMessage {
            kind: Some(edge_message::Kind::Hello(hello)),
        };
        write_msg(&mut control_tx, &hello)
            .await
            .map_err(|e| OpenError::Retry(format!("sending hello: {e}")))?;
        let first = tokio::time::timeout(READY_TIMEOUT, read_msg::<CloudMessage>(&mut control_rx))
            .await
            .map_err(|_| OpenError::Retry(format!("no ready within {READY_TIMEOUT:?}")))?;
        match first {
            Ok(Some(CloudMessage {
                kind: Some(cloud_message::Kind::Ready(ready)),
            })) => {
                tracing::info!(task_version = ready.task_version, model = %ready.model_name,
                    resend = self.window.len(), transport = "quic", "stream ready");
            }
            Ok(Some(other)) => {
                return Err(OpenError::Retry(format!(
                    "expected ready after hello, got {:?}",
                    other.kind
                )));
            }
            _ => {
                // Refused: the close carries the status.
                let status = match conn.close_reason() {
                    Some(e) => quic_status(&e),
                    None => match tokio::time::timeout(READY_TIMEOUT, conn.closed()).await {
                        Ok(e) => quic_status(&e),
                        Err(_) => tonic::Status::unavailable("no ready after hello"),
                    },
                };
                return Err(self.classify(status));
            }
        }
        let (tx, mut rx) = mpsc::channel::<EdgeMessage>(self.window.cap + 2);
        let (answers_tx, answers_rx) = mpsc::channel(self.window.cap + 2);
        let per_stream = self.quic_stream_frames.max(1);
        let (copies, gap) = (self.quic_copies.max(1), self.quic_copy_gap);
        tokio::spawn(async move {
            // The endpoint and the control stream live as long as the session.
            let _keep = (endpoint, control_tx, control_rx);
            loop {
                tokio::select! {
                    message = rx.recv() => {
                        let Some(message) = message else { break };
                        for message in split_for_quic(message, per_stream) {
                        let (conn, answers) = (conn.clone(), answers_tx.clone());
                        tokio::spawn(async move {
                            let answer = quic_exchange(&conn, &message, copies, gap).await;
                            let _ = answers.send(answer).await;
                        });
                        }
                    }
                    e = conn.closed() => {
                        let _ = answers_tx.send(Err(quic_status(&e))).await;
                        break;
                    }
                }
            }
            conn.close(0u32.into(), b"edge done");
        });
        for msg in self.window.resend() {
            tx.send(msg)
                .await
                .map_err(|_| OpenError::Retry("request stream closed".into()))?;
        }
        Ok((tx, Box::pin(ReceiverStream::new(answers_rx))))
    }

    /// gRPC: one bidirectional `Inference.Stream`.
    async fn open_grpc(&mut self) -> Result<(mpsc::Sender<EdgeMessage>, Inbound), OpenError> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| OpenError::Retry(format!("cannot connect: {e}")))?;
        let mut client = InferenceClient::new(channel);
        let (tx, rx) = mpsc::channel(self.window.cap + 2);
        let hello = EdgeMessage {
            kind: Some(edge_message::Kind::Hello(self.hello.clone())),
        };
        tx.send(hello)
            .await
            .map_err(|_| OpenError::Retry("request stream closed before hello".into()))?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        self.security.attach(&mut request);
        let mut inbound = client
            .stream(request)
            .await
            .map_err(|s| self.classify(s))?
            .into_inner();
        let first = tokio::time::timeout(READY_TIMEOUT, inbound.next())
            .await
            .map_err(|_| OpenError::Retry(format!("no ready within {READY_TIMEOUT:?}")))?;
        match first {
            Some(Ok(CloudMessage {
                kind: Some(cloud_message::Kind::Ready(ready)),
            })) => {
                tracing::info!(task_version = ready.task_version, model = %ready.model_name,
                    resend = self.window.len(), "stream ready");
                for msg in self.window.resend() {
                    tx.send(msg)
                        .await
                        .map_err(|_| OpenError::Retry("request stream closed".into()))?;
                }
                Ok((tx, Box::pin(inbound)))
            }
            Some(Ok(other)) => Err(OpenError::Retry(format!(
                "expected ready after hello, got {:?}",
                other.kind
            ))),
            Some(Err(status)) => Err(self.classify(status)),
            None => Err(OpenError::Retry(
                "coordinator closed the stream before ready".into(),
            )),
        }
    }

    fn classify(&self, status: tonic::Status) -> OpenError {
        if status.code() == tonic::Code::FailedPrecondition {
            OpenError::Fatal(EdgeError::ModelMismatch {
                endpoint: self.coordinator.clone(),
                model_hash: self.hello.model_hash.clone(),
                message: status.message().to_string(),
            })
        } else if matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ) {
            // Retrying with the same token cannot help.
            OpenError::Fatal(EdgeError::Unauthorized {
                endpoint: self.coordinator.clone(),
                message: status.message().to_string(),
            })
        } else {
            OpenError::Retry(format!(
                "coordinator answered {:?}: {}",
                status.code(),
                status.message()
            ))
        }
    }

    async fn session(&mut self, tx: mpsc::Sender<EdgeMessage>, mut inbound: Inbound) -> SessionEnd {
        // Last time the stream made progress (an answer came, or the window was empty).
        let mut progress = tokio::time::Instant::now();
        loop {
            self.sink.metrics().in_flight.set(self.window.len() as i64);
            if !self.input_open && self.window.is_empty() {
                return SessionEnd::Done;
            }
            if self.window.is_empty() {
                progress = tokio::time::Instant::now();
            }
            let deadline = self.deadline.unwrap_or_else(tokio::time::Instant::now);
            let take_jobs = self.input_open && self.window.has_room();
            let event = tokio::select! {
                m = inbound.next() => Event::Inbound(m),
                _ = tokio::time::sleep_until(progress + self.answer_timeout), if !self.window.is_empty() => Event::Stalled,
                j = self.jobs.recv(), if take_jobs => Event::Job(j),
                _ = self.stop.begun(), if self.deadline.is_none() => Event::Stop,
                _ = tokio::time::sleep_until(deadline), if self.deadline.is_some() => Event::Deadline,
            };
            match event {
                Event::Inbound(Some(Ok(msg))) => {
                    progress = tokio::time::Instant::now();
                    self.sink
                        .metrics()
                        .bytes_in
                        .inc_by(prost::Message::encoded_len(&msg) as u64);
                    self.on_message(msg)
                }
                Event::Stalled => {
                    return SessionEnd::Broken(format!(
                        "{} frames unanswered for {} ms",
                        self.window.len(),
                        self.answer_timeout.as_millis()
                    ));
                }
                Event::Inbound(Some(Err(status))) => {
                    return match self.classify(status) {
                        OpenError::Fatal(e) => SessionEnd::Fatal(e),
                        OpenError::Retry(reason) => SessionEnd::Broken(reason),
                    };
                }
                Event::Inbound(None) => {
                    return SessionEnd::Broken("coordinator closed the stream".into());
                }
                Event::Job(Some(job)) => {
                    // Every frame ready now goes in one message: cheaper per frame on both
                    // sides than a message each.
                    let from_send = self.time_from_send;
                    let stamp = |mut job: Job| {
                        if from_send {
                            job.started = Instant::now();
                        }
                        job
                    };
                    let mut msgs = vec![self.window.insert(stamp(job))];
                    while self.window.has_room() && msgs.len() < MAX_FRAMES_PER_MESSAGE {
                        match self.jobs.try_recv() {
                            Ok(job) => msgs.push(self.window.insert(stamp(job))),
                            Err(_) => break,
                        }
                    }
                    if tx.send(batch_message(msgs)).await.is_err() {
                        return SessionEnd::Broken("request stream closed".into());
                    }
                }
                Event::Job(None) => self.input_open = false,
                Event::Stop => self.start_drain(),
                Event::Deadline => return SessionEnd::DrainExpired,
            }
        }
    }

    fn on_message(&mut self, msg: CloudMessage) {
        let (seq, outcome) = match msg.kind {
            Some(cloud_message::Kind::Prediction(p)) => (p.seq, Ok(prediction_from_proto(p))),
            Some(cloud_message::Kind::Error(FrameError { seq, code, message })) => {
                (seq, Err(FrameFailure::new(code, message)))
            }
            Some(cloud_message::Kind::Answers(batch)) => {
                for p in batch.predictions {
                    self.on_message(CloudMessage {
                        kind: Some(cloud_message::Kind::Prediction(p)),
                    });
                }
                for e in batch.errors {
                    self.on_message(CloudMessage {
                        kind: Some(cloud_message::Kind::Error(e)),
                    });
                }
                return;
            }
            Some(cloud_message::Kind::Ready(_)) | None => {
                tracing::warn!("unexpected message from coordinator ignored");
                return;
            }
        };
        match self.window.answer(seq) {
            Some(p) => {
                self.sink
                    .metrics()
                    .round_trip_seconds
                    .observe(p.sent.elapsed().as_secs_f64());
                let bytes = p.frame.features.as_ref().map(|f| f.data.len());
                self.sink
                    .finish(p.meta, outcome, Some(p.started.elapsed()), bytes);
            }
            None => tracing::debug!(
                seq,
                duplicates = self.window.duplicates(),
                "answer for a frame not in flight ignored"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spotlight_proto::v1::FeatureTensor;

    fn job(seq: u64) -> Job {
        Job {
            meta: ItemMeta {
                seq,
                item: format!("item{seq}"),
                label: None,
                reply: None,
            },
            features: FeatureTensor {
                codec: 3,
                shape: vec![1, 8, 7, 7],
                data: vec![seq as u8; 392].into(),
                scale: 0.1,
                zero_point: 0.0,
                ..Default::default()
            },
            started: Instant::now(),
        }
    }

    fn seqs(msgs: &[EdgeMessage]) -> Vec<u64> {
        msgs.iter()
            .map(|m| match &m.kind {
                Some(edge_message::Kind::Frame(f)) => f.seq,
                _ => panic!("not a frame"),
            })
            .collect()
    }

    #[test]
    fn window_is_bounded() {
        let mut w = Window::new(2);
        w.insert(job(1));
        assert!(w.has_room());
        w.insert(job(2));
        assert!(!w.has_room());
        assert!(w.answer(1).is_some());
        assert!(w.has_room());
    }

    #[test]
    fn reconnect_resends_only_unanswered_frames_in_seq_order() {
        let mut w = Window::new(8);
        for s in [3, 1, 2, 5, 4] {
            let msg = w.insert(job(s));
            assert_eq!(seqs(&[msg]), vec![s]);
        }
        assert_eq!(w.answer(2).map(|p| p.meta.seq), Some(2));
        assert_eq!(w.answer(5).map(|p| p.meta.seq), Some(5));
        // The stream breaks: the new stream gets 1, 3, 4 with their original features.
        let resend = w.resend();
        assert_eq!(seqs(&resend), vec![1, 3, 4]);
        match &resend[1].kind {
            Some(edge_message::Kind::Frame(f)) => {
                assert_eq!(f.features.as_ref().map(|t| t.data[0]), Some(3));
            }
            _ => panic!("not a frame"),
        }
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn answers_are_deduplicated_by_seq() {
        let mut w = Window::new(8);
        w.insert(job(1));
        w.insert(job(2));
        assert!(w.answer(1).is_some());
        // A late duplicate, e.g. the old and the new stream both answered seq 1.
        assert!(w.answer(1).is_none());
        assert!(w.answer(99).is_none());
        assert_eq!(w.duplicates(), 2);
        let left: Vec<u64> = w.drain().into_iter().map(|p| p.meta.seq).collect();
        assert_eq!(left, vec![2]);
        assert!(w.is_empty());
        assert!(w.answer(2).is_none());
    }

    #[test]
    fn predictions_convert_with_cost() {
        let p = prediction_from_proto(Prediction {
            seq: 4,
            task_version: 3,
            top_index: 1,
            top_name: "Trouser".into(),
            scores: vec![spotlight_proto::v1::CategoryScore {
                index: 1,
                name: "Trouser".into(),
                score: 0.9,
                logit: 2.0,
            }],
            cost: Some(spotlight_proto::v1::Cost {
                segments_run: vec!["bottoms".into()],
                cloud_macs: 10,
                cloud_macs_saved: 20,
            }),
        });
        assert_eq!(p.task_version, 3);
        assert_eq!(p.cloud_macs, 10);
        assert_eq!(p.top_score(), 0.9);
        assert!(p.is_relevant(1) && !p.is_relevant(0));
    }
}
