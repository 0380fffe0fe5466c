//! The hosted segments and the dynamic batcher that runs them.
//!
//! Requests (a unary `Run`, or a `RunBatch` of a stream) are checked on the async side and
//! queued as jobs. Batcher threads — each owning its own ONNX Runtime sessions — take every
//! job queued (up to `max_batch` frames, waiting at most `max_delay` for more), decode the
//! frames once, and run each segment once for all the frames that asked for it, feeding each
//! frame its own gain. Nothing here runs a model on an async worker thread.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prost::Message;
use spotlight_codec::{Codec, CodecError, Compression};
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_runtime::{BranchSession, OnnxRuntimeError, SegmentSession};

use crate::metrics::EngineMetrics;

/// Why a request failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("request is for model {got}, this worker runs {expected}")]
    WrongModel { expected: String, got: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("segment \"{0}\" is not hosted here")]
    NotHosted(String),
    #[error(transparent)]
    Runtime(#[from] OnnxRuntimeError),
    #[error("queue full: {queued} frames queued, capacity {capacity}; retry later")]
    Overloaded { queued: usize, capacity: usize },
    #[error("worker is shutting down; the frame is handed back to run on another replica")]
    Closed,
}

impl EngineError {
    /// The error code this error is answered with (the codes every role shares).
    pub fn error_code(&self) -> spotlight_service::ErrorCode {
        use spotlight_service::ErrorCode;
        match self {
            EngineError::WrongModel { .. } => ErrorCode::FailedPrecondition,
            EngineError::BadRequest(_) => ErrorCode::InvalidArgument,
            EngineError::NotHosted(_) => ErrorCode::NotFound,
            EngineError::Runtime(_) => ErrorCode::Internal,
            EngineError::Overloaded { .. } => ErrorCode::ResourceExhausted,
            EngineError::Closed => ErrorCode::Unavailable,
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> tonic::Code {
        self.error_code().grpc()
    }
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        spotlight_service::ApiError::new(e.error_code(), e.to_string()).into()
    }
}

/// How the batcher coalesces frames.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most frames in one ONNX Runtime run (a larger request runs in several).
    pub max_batch: usize,
    /// How long the oldest queued frame may wait for more to arrive; zero runs whatever is
    /// queued as soon as a batcher thread is free.
    pub max_delay: Duration,
    /// Frames queued at most; beyond it requests are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Batcher threads, each with its own sessions.
    pub threads: usize,
    /// ONNX Runtime intra-op threads per session.
    pub intra_threads: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_delay: Duration::ZERO,
            queue_capacity: 4096,
            threads: 1,
            intra_threads: 1,
        }
    }
}

/// Where a job's result goes; called once, on a batcher thread.
pub type Reply = Box<dyn FnOnce(pb::RunBatchResult) + Send>;

/// Frames that need the same segments, checked and waiting for a batcher thread.
struct Job {
    /// (segment index, gain), parents before children.
    segments: Vec<(usize, f32)>,
    /// (position in the request, tensor) of the frames that passed the checks.
    frames: Vec<(u32, pb::FeatureTensor)>,
    /// Frames refused before queueing.
    errors: Vec<pb::ItemError>,
    reply: Reply,
}

#[derive(Default)]
struct QueueState {
    jobs: std::collections::VecDeque<(Instant, Job)>,
    frames: usize,
    closed: bool,
}

/// A bounded multi-consumer queue of jobs.
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    /// Frames queued.
    depth: Gauge,
    /// How long frames waited, observed when a batcher takes them.
    wait: Histogram,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) -> Result<(), Box<(Job, EngineError)>> {
        let mut s = self.lock();
        if s.closed {
            return Err(Box::new((job, EngineError::Closed)));
        }
        let n = job.frames.len();
        if s.frames > 0 && s.frames + n > self.capacity {
            let err = EngineError::Overloaded {
                queued: s.frames,
                capacity: self.capacity,
            };
            return Err(Box::new((job, err)));
        }
        s.frames += n;
        s.jobs.push_back((Instant::now(), job));
        self.depth.set(s.frames as i64);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Blocks until a job is queued, then takes jobs up to `max_batch` frames (at least one
    /// job), waiting up to `max_delay` after the oldest job's arrival for the batch to fill.
    /// `None` once closed and empty.
    fn take(&self, max_batch: usize, max_delay: Duration) -> Option<Vec<Job>> {
        let mut s = self.lock();
        while s.jobs.is_empty() {
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if !max_delay.is_zero() {
            let deadline = s.jobs.front().map(|j| j.0 + max_delay);
            while let Some(deadline) = deadline {
                let now = Instant::now();
                if s.frames >= max_batch || now >= deadline || s.closed {
                    break;
                }
                s = self
                    .ready
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let mut jobs = Vec::new();
        let mut frames = 0;
        let now = Instant::now();
        while let Some((_, front)) = s.jobs.front() {
            let n = front.frames.len();
            if !jobs.is_empty() && frames + n > max_batch {
                break;
            }
            frames += n;
            if let Some((queued, job)) = s.jobs.pop_front() {
                let waited = now.duration_since(queued).as_secs_f64();
                for _ in 0..n {
                    self.wait.observe(waited);
                }
                jobs.push(job);
            }
        }
        s.frames -= frames;
        self.depth.set(s.frames as i64);
        let more = !s.jobs.is_empty();
        drop(s);
        if more {
            // Another batcher thread can start on the rest.
            self.ready.notify_one();
        }
        Some(jobs)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Closes the queue and takes every job still in it, for an answer elsewhere.
    fn hand_back(&self) -> Vec<Job> {
        let mut s = self.lock();
        s.closed = true;
        s.frames = 0;
        self.depth.set(0);
        let jobs = s.jobs.drain(..).map(|(_, job)| job).collect();
        drop(s);
        self.ready.notify_all();
        jobs
    }
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    batches: AtomicU64,
}

/// The hosted segments, their batcher threads and counters.
pub struct Engine {
    model: Arc<Model>,
    worker_id: String,
    metrics: EngineMetrics,
    /// By segment index: hosted here.
    hosted: Vec<bool>,
    counters: Arc<Vec<Counters>>,
    requests: Arc<AtomicU64>,
    fused_runs: Arc<AtomicU64>,
    rejected: AtomicU64,
    queue: Arc<Queue>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Opens the sessions of `branches` (top-level ids; empty = all) and their descendants,
    /// once per batcher thread, and starts the threads. `worker_id` names the worker in
    /// [`Engine::stats`] and in the metrics it registers with `metrics`.
    pub async fn load(
        model: Arc<Model>,
        branches: &[String],
        batch: BatchSettings,
        worker_id: &str,
        metrics: &spotlight_service::Metrics,
    ) -> Result<Self, EngineError> {
        if batch.max_batch == 0 || batch.threads == 0 || batch.queue_capacity == 0 {
            return Err(EngineError::BadRequest(
                "max_batch, threads and queue_capacity must be > 0".into(),
            ));
        }
        let hosted: Vec<bool> = (0..model.segments().len())
            .map(|s| {
                let root = &model.segments()[model.root_of(s)].id;
                branches.is_empty() || branches.contains(root)
            })
            .collect();
        let m = model.clone();
        let h = hosted.clone();
        let sessions = tokio::task::spawn_blocking(move || {
            (0..batch.threads)
                .map(|_| {
                    let segments = h
                        .iter()
                        .enumerate()
                        .map(|(s, &hosted)| {
                            hosted
                                .then(|| SegmentSession::open(&m, s, batch.intra_threads))
                                .transpose()
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    // The fused graph of each hosted top-level branch the package has one of.
                    let branches = (0..m.manifest().branches.len())
                        .filter(|&b| {
                            m.segment_index(&m.manifest().branches[b].id)
                                .is_some_and(|s| h[s])
                        })
                        .map(|b| BranchSession::open(&m, b, batch.intra_threads))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok::<_, OnnxRuntimeError>((segments, branches))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| EngineError::Closed)??;

        let engine_metrics = EngineMetrics::new(metrics, worker_id, &model, &hosted);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity: batch.queue_capacity,
            depth: engine_metrics.queue_depth.clone(),
            wait: engine_metrics.queue_wait.clone(),
        });
        let counters: Arc<Vec<Counters>> =
            Arc::new((0..hosted.len()).map(|_| Counters::default()).collect());
        let requests = Arc::new(AtomicU64::new(0));
        let fused_runs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (i, (sessions, branches)) in sessions.into_iter().enumerate() {
            let mut batcher = Batcher {
                model: model.clone(),
                max_batch: batch.max_batch,
                sessions,
                branches,
                fused_runs: fused_runs.clone(),
                counters: counters.clone(),
                requests: requests.clone(),
                metrics: engine_metrics.clone(),
            };
            let queue = queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("batcher-{i}"))
                .spawn(move || {
                    while let Some(jobs) = queue.take(batch.max_batch, batch.max_delay) {
                        batcher.run(jobs);
                    }
                })
                .map_err(|e| EngineError::BadRequest(format!("cannot start a thread: {e}")))?;
            threads.push(handle);
        }
        Ok(Self {
            model,
            worker_id: worker_id.to_string(),
            metrics: engine_metrics,
            hosted,
            counters,
            requests,
            rejected: AtomicU64::new(0),
            fused_runs,
            queue,
            threads: Mutex::new(threads),
        })
    }

    /// ONNX Runtime runs of fused branch graphs (manifest `branches`) so far: a batch whose
    /// frames all ask for a whole hosted branch runs it as one graph.
    pub fn fused_runs(&self) -> u64 {
        self.fused_runs.load(Ordering::Relaxed)
    }

    /// This worker's series.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.metrics
    }

    /// Frames received and not answered yet (queued or running).
    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// Closes the queue: frames still queued, and any submitted from now on, are answered
    /// UNAVAILABLE at once for the coordinator to run on another replica; the batches
    /// already running finish. Returns how many frames were handed back.
    pub fn hand_back(&self) -> usize {
        let jobs = self.queue.hand_back();
        let mut frames = 0;
        for job in jobs {
            frames += job.frames.len();
            answer_refused(job, &EngineError::Closed);
        }
        self.metrics.handed_back.inc_by(frames as u64);
        frames
    }

    /// Hosted segment ids, in tree order.
    pub fn segment_ids(&self) -> Vec<String> {
        hosted_ids(&self.model, &self.hosted)
    }

    /// Counters since start.
    pub fn stats(&self) -> pb::StatsResponse {
        let hosted = || {
            self.hosted
                .iter()
                .enumerate()
                .filter(|(_, h)| **h)
                .map(|(s, _)| (self.model.segments()[s].id.clone(), &self.counters[s]))
        };
        pb::StatsResponse {
            worker_id: self.worker_id.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            segments_run: hosted()
                .map(|(id, c)| (id, c.frames.load(Ordering::Relaxed)))
                .collect(),
            segment_batches: hosted()
                .map(|(id, c)| (id, c.batches.load(Ordering::Relaxed)))
                .collect(),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Checks a batch and queues it; `reply` gets its result exactly once (at once when the
    /// whole batch is refused, with every frame as an error).
    pub fn submit(
        &self,
        model_hash: &str,
        segments: &[pb::SegmentRun],
        features: Vec<pb::FeatureTensor>,
        reply: Reply,
    ) {
        let n = features.len();
        // Every path below answers exactly once, through this.
        let reply: Reply = {
            let m = self.metrics.clone();
            m.frames_received.inc_by(n as u64);
            m.in_flight.inc_by(n as i64);
            Box::new(move |result: pb::RunBatchResult| {
                m.answered(n, result.errors.iter().map(|e| e.code));
                m.bytes_out.inc_by(result.encoded_len() as u64);
                reply(result);
            })
        };
        let checked = check_request(&self.model, &self.hosted, model_hash, segments, features);
        let CheckedRequest {
            segments,
            frames,
            errors,
        } = match checked {
            Ok(checked) => checked,
            Err(e) => {
                reply(refuse_all(n, &e));
                return;
            }
        };
        if frames.is_empty() {
            // Nothing to run: answer the per-frame errors now.
            reply(pb::RunBatchResult {
                errors,
                ..Default::default()
            });
            return;
        }
        let job = Job {
            segments,
            frames,
            errors,
            reply,
        };
        if let Err(refused) = self.queue.push(job) {
            let (job, e) = *refused;
            let frames = job.frames.len() as u64;
            if matches!(e, EngineError::Closed) {
                self.metrics.handed_back.inc_by(frames);
            } else {
                self.rejected.fetch_add(frames, Ordering::Relaxed);
            }
            tracing::debug!(error = %e, "batch refused");
            answer_refused(job, &e);
        }
    }

    /// Runs one frame (the unary `Run`) through the batcher.
    pub async fn run(&self, request: pb::RunRequest) -> Result<pb::RunResponse, tonic::Status> {
        let features = request
            .features
            .ok_or_else(|| tonic::Status::invalid_argument("request has no feature tensor"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            &request.model_hash,
            &request.segments,
            vec![features],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let result = rx.await.map_err(|_| EngineError::Closed)?;
        if let Some(e) = result.errors.into_iter().next() {
            return Err(tonic::Status::new(tonic::Code::from(e.code), e.message));
        }
        Ok(pb::RunResponse {
            outputs: result.outputs,
        })
    }
}

/// Checks a request against the model and the segments hosted (`hosted[s]`): the
/// segments to run (parents first), the frames that passed the checks, and the errors of
/// those that did not. A worker, and any stand-in for one, answers with what this says.
pub fn check_request(
    model: &Model,
    hosted: &[bool],
    model_hash: &str,
    segments: &[pb::SegmentRun],
    features: Vec<pb::FeatureTensor>,
) -> Result<CheckedRequest, EngineError> {
    if model_hash != model.hash() {
        return Err(EngineError::WrongModel {
            expected: model.hash().to_string(),
            got: model_hash.to_string(),
        });
    }
    if segments.is_empty() {
        return Err(EngineError::BadRequest("request names no segment".into()));
    }
    let mut wanted: Vec<(usize, f32)> = Vec::with_capacity(segments.len());
    for r in segments {
        let s = model.segment_index(&r.segment_id).ok_or_else(|| {
            EngineError::BadRequest(format!(
                "unknown segment \"{}\"; hosted here: {}",
                r.segment_id,
                hosted_ids(model, hosted).join(", ")
            ))
        })?;
        if !hosted.get(s).copied().unwrap_or(false) {
            return Err(EngineError::NotHosted(r.segment_id.clone()));
        }
        if !r.gain.is_finite() || r.gain < 0.0 {
            return Err(EngineError::BadRequest(format!(
                "gain of \"{}\" must be finite and >= 0, got {}",
                r.segment_id, r.gain
            )));
        }
        if wanted.iter().any(|w| w.0 == s) {
            return Err(EngineError::BadRequest(format!(
                "segment \"{}\" is listed twice",
                r.segment_id
            )));
        }
        wanted.push((s, r.gain));
    }
    wanted.sort_by_key(|w| w.0);
    for &(s, _) in &wanted {
        if let Some(p) = model.parent_of(s)
            && !wanted.iter().any(|w| w.0 == p)
        {
            return Err(EngineError::BadRequest(format!(
                "segment \"{}\" needs its parent \"{}\" in the same request",
                model.segments()[s].id,
                model.segments()[p].id
            )));
        }
    }
    if features.len() > MAX_FRAMES_PER_BATCH {
        return Err(EngineError::BadRequest(format!(
            "batch has {} frames; at most {MAX_FRAMES_PER_BATCH}",
            features.len()
        )));
    }
    let expected = model.feature_shape(1);
    let mut frames = Vec::with_capacity(features.len());
    let mut errors = Vec::new();
    for (i, f) in features.into_iter().enumerate() {
        let i = i as u32;
        let checked = if f.shape != expected {
            Err(format!(
                "feature tensor has shape {:?}; expected {expected:?}",
                f.shape
            ))
        } else {
            // Values too: a NaN, an infinity or a huge value (or int8 parameters that decode
            // one) would overflow the branches into NaN logits.
            // Compressed frames are inflated (into at most the expected size) and checked.
            payload(&f)
                .and_then(|p| spotlight_codec::check_payload(&p, model.feature_len()))
                .map_err(|e| e.to_string())
        };
        match checked {
            Ok(()) => frames.push((i, f)),
            Err(message) => errors.push(pb::ItemError {
                index: i,
                code: tonic::Code::InvalidArgument as i32,
                message,
            }),
        }
    }
    Ok(CheckedRequest {
        segments: wanted,
        frames,
        errors,
    })
}

/// The codec's view of a wire tensor; unknown codec or compression numbers are errors.
pub fn payload(f: &pb::FeatureTensor) -> Result<spotlight_codec::Payload<'_>, CodecError> {
    Ok(spotlight_codec::Payload {
        codec: Codec::from_wire(f.codec)?,
        compression: Compression::from_wire(f.compression)?,
        data: &f.data,
        scale: f.scale,
        zero_point: f.zero_point,
        channel_params: &f.channel_params,
    })
}

/// A request that passed [`check_request`].
pub struct CheckedRequest {
    /// (segment index, gain), parents before children.
    pub segments: Vec<(usize, f32)>,
    /// (position in the request, tensor) of the frames that passed.
    pub frames: Vec<(u32, pb::FeatureTensor)>,
    /// Frames refused, with their errors.
    pub errors: Vec<pb::ItemError>,
}

/// Ids of the hosted segments, in tree order.
fn hosted_ids(model: &Model, hosted: &[bool]) -> Vec<String> {
    hosted
        .iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(s, _)| model.segments()[s].id.clone())
        .collect()
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.queue.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Answers every frame of `job` with `e` (and the errors it already had).
fn answer_refused(job: Job, e: &EngineError) {
    let mut result = refuse_all(0, e);
    result.errors = job.errors;
    result
        .errors
        .extend(job.frames.iter().map(|(i, _)| item_error(*i, e)));
    result.errors.sort_by_key(|e| e.index);
    (job.reply)(result);
}

/// Most frames one `RunBatch` may carry.
pub const MAX_FRAMES_PER_BATCH: usize = 4096;

fn item_error(index: u32, e: &EngineError) -> pb::ItemError {
    pb::ItemError {
        index,
        code: e.code() as i32,
        message: e.to_string(),
    }
}

/// A result that refuses all `n` frames with `e`.
fn refuse_all(n: usize, e: &EngineError) -> pb::RunBatchResult {
    pb::RunBatchResult {
        errors: (0..n as u32).map(|i| item_error(i, e)).collect(),
        ..Default::default()
    }
}

/// One batcher thread's sessions and the work it does per batch.
struct Batcher {
    model: Arc<Model>,
    max_batch: usize,
    /// By segment index; `None` where not hosted.
    sessions: Vec<Option<SegmentSession>>,
    /// Fused graphs of hosted top-level branches (manifest `branches`), used for the rows
    /// that run a whole branch.
    branches: Vec<BranchSession>,
    fused_runs: Arc<AtomicU64>,
    counters: Arc<Vec<Counters>>,
    requests: Arc<AtomicU64>,
    metrics: EngineMetrics,
}

/// A segment's output for the rows that ran it.
#[derive(Default)]
struct SegmentRows {
    /// Global rows, ascending.
    rows: Vec<usize>,
    /// `rows.len()` rows of gained features (segments with children).
    features: Vec<f32>,
    feature_len: usize,
    /// `rows.len()` rows of logits (segments with direct categories).
    logits: Vec<f32>,
}

impl Batcher {
    /// Segment `s` ran for `frames` frames in `runs` ONNX Runtime runs.
    fn count(&self, s: usize, frames: usize, runs: u64) {
        let c = &self.counters[s];
        c.frames.fetch_add(frames as u64, Ordering::Relaxed);
        c.batches.fetch_add(runs, Ordering::Relaxed);
        if let Some(f) = &self.metrics.segment_frames[s] {
            f.inc_by(frames as u64);
        }
    }

    fn run(&mut self, jobs: Vec<Job>) {
        let model = self.model.clone();
        let len = model.feature_len();
        // Decode every frame once into one matrix; a frame that fails to decode becomes
        // that frame's error.
        let mut owner: Vec<(usize, u32)> = Vec::new(); // global row → (job, index in request)
        let mut input: Vec<f32> = Vec::new();
        let mut errors: Vec<Vec<pb::ItemError>> = Vec::with_capacity(jobs.len());
        for (j, job) in jobs.iter().enumerate() {
            let mut errs = job.errors.clone();
            for (i, f) in &job.frames {
                let decoded = payload(f)
                    .and_then(|p| spotlight_codec::decode_payload(&p, len))
                    .map_err(|e| e.to_string());
                match decoded {
                    Ok(values) if values.iter().all(|v| v.is_finite()) => {
                        input.extend_from_slice(&values);
                        owner.push((j, *i));
                    }
                    Ok(_) => errs.push(pb::ItemError {
                        index: *i,
                        code: tonic::Code::InvalidArgument as i32,
                        message: "feature tensor holds non-finite values".into(),
                    }),
                    Err(message) => errs.push(pb::ItemError {
                        index: *i,
                        code: tonic::Code::InvalidArgument as i32,
                        message,
                    }),
                }
            }
            errors.push(errs);
        }

        // Each segment once, for every row whose job asked for it, parents first.
        let nseg = model.segments().len();
        let mut done: Vec<Option<SegmentRows>> = (0..nseg).map(|_| None).collect();
        let mut failed: Option<String> = None;
        let gain_of = |j: &Job, s: usize| j.segments.iter().find(|w| w.0 == s).map(|w| w.1);
        for s in 0..nseg {
            if done[s].is_some() {
                continue; // run fused with its branch
            }
            let gains_of_job: Vec<Option<f32>> = jobs.iter().map(|j| gain_of(j, s)).collect();
            if gains_of_job.iter().all(Option::is_none) || failed.is_some() {
                continue;
            }
            let rows: Vec<usize> = (0..owner.len())
                .filter(|&r| gains_of_job[owner[r].0].is_some())
                .collect();
            if rows.is_empty() {
                continue;
            }
            // A top-level branch that every job asking for it asks for whole, with a fused
            // graph: one run for the whole subtree.
            if let Some(b) = self.branches.iter().position(|b| b.segments()[0] == s)
                && jobs.iter().all(|j| {
                    gain_of(j, s).is_none()
                        || self.branches[b]
                            .segments()
                            .iter()
                            .all(|&t| gain_of(j, t).is_some())
                })
            {
                let covered = self.branches[b].segments().to_vec();
                let gains: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| {
                        let job = &jobs[owner[r].0];
                        covered.iter().map(move |&t| gain_of(job, t).unwrap_or(1.0))
                    })
                    .collect();
                let x = gather(&input, len, &rows, |r| r);
                let mut logits: Vec<(usize, Vec<f32>)> = Vec::new();
                let mut runs = 0u64;
                for (xs, gs) in x
                    .chunks(len * self.max_batch)
                    .zip(gains.chunks(covered.len() * self.max_batch))
                {
                    let started = Instant::now();
                    let ran = self.branches[b].run(xs.to_vec(), gs.to_vec(), xs.len() / len);
                    if let Some(h) = &self.metrics.segment_seconds[s] {
                        h.observe(started.elapsed().as_secs_f64());
                    }
                    match ran {
                        Ok(out) if logits.is_empty() => logits = out,
                        Ok(out) => {
                            for ((_, all), (_, more)) in logits.iter_mut().zip(out) {
                                all.extend(more);
                            }
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                    runs += 1;
                }
                if failed.is_some() {
                    continue;
                }
                self.fused_runs.fetch_add(runs, Ordering::Relaxed);
                for &t in &covered {
                    self.count(t, rows.len(), runs);
                    let logits = logits
                        .iter_mut()
                        .find(|(u, _)| *u == t)
                        .map(|(_, l)| std::mem::take(l))
                        .unwrap_or_default();
                    done[t] = Some(SegmentRows {
                        rows: rows.clone(),
                        logits,
                        ..SegmentRows::default()
                    });
                }
                continue;
            }
            let gains: Vec<f32> = rows
                .iter()
                .map(|&r| gains_of_job[owner[r].0].unwrap_or(1.0))
                .collect();
            let x = match model.parent_of(s) {
                None => gather(&input, len, &rows, |r| r),
                Some(p) => {
                    let Some(parent) = done[p].as_ref() else {
                        failed = Some(format!("parent of segment {s} did not run"));
                        continue;
                    };
                    // Rows of a child are a subset of its parent's (checked on submit).
                    gather(&parent.features, parent.feature_len, &rows, |r| {
                        parent.rows.binary_search(&r).unwrap_or(0)
                    })
                }
            };
            let Some(session) = self.sessions[s].as_mut() else {
                failed = Some(format!("segment {s} is not hosted"));
                continue;
            };
            // At most `max_batch` frames per ONNX Runtime run, even when one request
            // brought more.
            let width = x.len() / rows.len();
            let (mut features, mut logits) = (Vec::new(), Vec::new());
            let mut runs = 0u64;
            for (xs, gs) in x
                .chunks(width * self.max_batch)
                .zip(gains.chunks(self.max_batch))
            {
                let started = Instant::now();
                let ran = session.run(xs.to_vec(), gs.to_vec());
                if let Some(h) = &self.metrics.segment_seconds[s] {
                    h.observe(started.elapsed().as_secs_f64());
                }
                match ran {
                    Ok(out) => {
                        features.extend(out.features.unwrap_or_default());
                        logits.extend(out.logits.unwrap_or_default());
                        runs += 1;
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            if failed.is_some() {
                continue;
            }
            self.count(s, rows.len(), runs);
            let feature_len = features.len() / rows.len();
            done[s] = Some(SegmentRows {
                rows,
                features,
                feature_len,
                logits,
            });
        }

        // One result per job.
        let mut row_of_job: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
        for (r, &(j, _)) in owner.iter().enumerate() {
            row_of_job[j].push(r);
        }
        for ((j, job), mut errs) in jobs.into_iter().enumerate().zip(errors) {
            let rows = &row_of_job[j];
            let mut result = pb::RunBatchResult::default();
            if let Some(message) = &failed {
                errs.extend(rows.iter().map(|&r| pb::ItemError {
                    index: owner[r].1,
                    code: tonic::Code::Internal as i32,
                    message: message.clone(),
                }));
            } else {
                result.rows = rows.iter().map(|&r| owner[r].1).collect();
                for &(s, _) in &job.segments {
                    let spec = &model.segments()[s];
                    let (Some(out), Some(_)) = (done[s].as_ref(), spec.logits_output.as_ref())
                    else {
                        continue;
                    };
                    let k = spec.direct_categories.len();
                    let logits = gather(&out.logits, k, rows, |r| {
                        out.rows.binary_search(&r).unwrap_or(0)
                    });
                    result.outputs.push(pb::SegmentOutput {
                        segment_id: spec.id.clone(),
                        categories: spec.direct_categories.iter().map(|&c| c as u32).collect(),
                        logits,
                    });
                }
                self.requests
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
            }
            errs.sort_by_key(|e| e.index);
            result.errors = errs;
            (job.reply)(result);
        }
        if let Some(message) = failed {
            tracing::error!(error = message, "batch failed");
        }
    }
}

/// Rows `rows` of a row-major matrix with rows of `width`, where `at` maps a global row to
/// its position in `matrix`.
fn gather(matrix: &[f32], width: usize, rows: &[usize], at: impl Fn(usize) -> usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        let i = at(r);
        out.extend_from_slice(&matrix[i * width..(i + 1) * width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(frames: usize) -> Job {
        Job {
            segments: vec![(0, 1.0)],
            frames: (0..frames as u32)
                .map(|i| (i, pb::FeatureTensor::default()))
                .collect(),
            errors: Vec::new(),
            reply: Box::new(|_| {}),
        }
    }

    fn queue(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity,
            depth: Gauge::default(),
            wait: spotlight_service::metrics::latency_histogram(),
        }
    }

    #[test]
    fn a_full_queue_refuses_with_resource_exhausted() {
        let q = queue(4);
        assert!(q.push(job(3)).is_ok());
        let refused = q.push(job(2)).err().map(|b| b.1);
        assert!(
            matches!(
                refused,
                Some(EngineError::Overloaded {
                    queued: 3,
                    capacity: 4
                })
            ),
            "{refused:?}"
        );
        assert_eq!(
            EngineError::Overloaded {
                queued: 3,
                capacity: 4
            }
            .code(),
            tonic::Code::ResourceExhausted
        );
        // One frame still fits; an empty queue admits any single job.
        assert!(q.push(job(1)).is_ok());
        let big = queue(2);
        assert!(big.push(job(10)).is_ok());
    }

    #[test]
    fn take_coalesces_jobs_up_to_max_batch_and_keeps_the_rest() {
        let q = queue(100);
        for n in [3, 3, 3] {
            assert!(q.push(job(n)).is_ok());
        }
        let first = q.take(7, Duration::ZERO).expect("jobs");
        assert_eq!(first.iter().map(|j| j.frames.len()).sum::<usize>(), 6);
        assert_eq!(q.depth.get(), 3, "one job of 3 frames still queued");
        let second = q.take(7, Duration::ZERO).expect("jobs");
        assert_eq!(second.len(), 1);
        assert_eq!(q.depth.get(), 0);
        assert_eq!(q.wait.count(), 9, "every frame's wait observed");
        q.close();
        assert!(q.take(7, Duration::ZERO).is_none());
    }

    #[test]
    fn take_waits_up_to_the_delay_for_a_batch_to_fill() {
        let q = Arc::new(queue(100));
        assert!(q.push(job(1)).is_ok());
        let feeder = {
            let q = q.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                q.push(job(1)).is_ok()
            })
        };
        // Generous delay: the second job arrives within it, and the batch is full at 2.
        let jobs = q.take(2, Duration::from_secs(10)).expect("jobs");
        assert!(feeder.join().unwrap_or(false));
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn hand_back_takes_every_queued_job_and_refuses_new_ones() {
        let q = queue(100);
        assert!(q.push(job(2)).is_ok());
        assert!(q.push(job(3)).is_ok());
        let back = q.hand_back();
        assert_eq!(back.iter().map(|j| j.frames.len()).sum::<usize>(), 5);
        assert_eq!(q.depth.get(), 0);
        assert!(matches!(
            q.push(job(1)).err().map(|b| b.1),
            Some(EngineError::Closed)
        ));
        assert!(q.take(7, Duration::ZERO).is_none(), "closed and empty");
        assert_eq!(EngineError::Closed.code(), tonic::Code::Unavailable);
    }
}
