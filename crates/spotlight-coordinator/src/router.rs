//! Per-frame routing: cutout plan → workers → merged, normalised prediction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use spotlight_codec::Codec;
use spotlight_model::{MergeError, Model};
use spotlight_proto::v1 as pb;

use crate::error::{ApiError, ErrorCode};
use crate::link::{FrameAnswers, FrameLogits};
use crate::metrics::RouteMetrics;
use crate::registry::{Failure, InFlight, Registry};
use crate::task::{ActiveTask, RouteGroup};

/// Routing deadlines.
#[derive(Debug, Clone, Copy)]
pub struct RouteLimits {
    /// How long a frame waits for a worker hosting a needed segment to be live.
    pub no_worker_wait: Duration,
    /// Deadline of one call to a worker.
    pub worker_timeout: Duration,
}

/// Most workers one branch's frames are sent to before they are answered with the last
/// failure.
const MAX_ATTEMPTS: usize = 3;

/// Routes frames; cheap to clone.
#[derive(Clone)]
pub struct Router {
    model: Arc<Model>,
    registry: Arc<Registry>,
    limits: RouteLimits,
    /// When a draining coordinator's shutdown is `late`, frames still in flight are
    /// answered UNAVAILABLE, so each gets an answer before it exits.
    shutdown: spotlight_service::Shutdown,
    metrics: Arc<RouteMetrics>,
}

/// Checks a frame's tensor against `model` without decoding it (shape, codec, byte length).
pub fn check_features(model: &Model, f: Option<&pb::FeatureTensor>) -> Result<(), ApiError> {
    let f =
        f.ok_or_else(|| ApiError::new(ErrorCode::InvalidArgument, "frame has no feature tensor"))?;
    let codec = Codec::from_wire(f.codec)
        .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let expected = model.feature_shape(1);
    if f.shape != expected {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!(
                "feature tensor has shape {:?}; model {} expects {:?}",
                f.shape,
                model.name(),
                expected
            ),
        ));
    }
    spotlight_codec::check_len(codec, f.data.len(), model.feature_len())
        .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))
}

impl Router {
    /// Once `shutdown` is late, every frame still routing is answered UNAVAILABLE.
    pub fn new(
        model: Arc<Model>,
        registry: Arc<Registry>,
        limits: RouteLimits,
        shutdown: spotlight_service::Shutdown,
        metrics: Arc<RouteMetrics>,
    ) -> Self {
        Self {
            model,
            registry,
            limits,
            shutdown,
            metrics,
        }
    }

    /// What routing counts.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.metrics
    }

    /// Resolves once the router gives up on frames in flight.
    async fn given_up(&self) {
        self.shutdown.late().await;
    }

    /// Checks a frame's tensor against the model without decoding it.
    pub fn check_features(&self, f: Option<&pb::FeatureTensor>) -> Result<(), ApiError> {
        check_features(&self.model, f)
    }

    /// Answers one frame under `task`.
    pub async fn route(
        &self,
        seq: u64,
        features: Option<pb::FeatureTensor>,
        task: Arc<ActiveTask>,
    ) -> Result<pb::Prediction, ApiError> {
        self.route_batch(vec![(seq, features)], task)
            .await
            .pop()
            .unwrap_or_else(|| Err(ApiError::new(ErrorCode::Internal, "frame lost in routing")))
    }

    /// Answers frames that arrived together under `task`, one answer per frame in order.
    /// Each top-level branch gets one call for all the frames (the feature bytes are shared,
    /// not copied); a frame's answer is as if it had come alone.
    pub async fn route_batch(
        &self,
        frames: Vec<(u64, Option<pb::FeatureTensor>)>,
        task: Arc<ActiveTask>,
    ) -> Vec<Result<pb::Prediction, ApiError>> {
        let started = Instant::now();
        let bytes: usize = frames
            .iter()
            .map(|(seq, f)| {
                pb::Frame {
                    seq: *seq,
                    features: None,
                }
                .encoded_len()
                    + f.as_ref()
                        .map_or(0, |f| prost::encoding::message::encoded_len(2, f))
            })
            .sum();
        self.metrics.received(frames.len() as u64, bytes as u64);
        let answers = self.route_checked(frames, &task).await;
        let elapsed = started.elapsed();
        for answer in &answers {
            match answer {
                Ok(p) => {
                    self.metrics.predicted(
                        &task.plan.segments,
                        task.plan.cloud_macs,
                        task.plan.cloud_macs_saved,
                    );
                    self.metrics.answered(elapsed, p.encoded_len() as u64, None);
                }
                Err(e) => {
                    // seq, code and message, as the frame's error carries them.
                    let bytes = 16 + e.message.len();
                    self.metrics.answered(elapsed, bytes as u64, Some(e.code));
                }
            }
        }
        answers
    }

    async fn route_checked(
        &self,
        frames: Vec<(u64, Option<pb::FeatureTensor>)>,
        task: &Arc<ActiveTask>,
    ) -> Vec<Result<pb::Prediction, ApiError>> {
        let ncat = self.model.categories().len();
        let mut answers: Vec<Result<Vec<f32>, ApiError>> = Vec::with_capacity(frames.len());
        let mut valid = Vec::with_capacity(frames.len());
        let mut tensors = Vec::with_capacity(frames.len());
        for (i, (_, f)) in frames.iter().enumerate() {
            match self.check_features(f.as_ref()) {
                Ok(()) => {
                    answers.push(Ok(vec![f32::NAN; ncat]));
                    valid.push(i);
                    tensors.push(f.clone().unwrap_or_default());
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        if !tensors.is_empty() {
            let groups = task.groups.len();
            let work = async {
                match task.groups.as_slice() {
                    [one] => vec![self.call(one, tensors).await],
                    groups => {
                        let calls = groups.iter().map(|g| self.call(g, tensors.clone()));
                        futures::future::join_all(calls).await
                    }
                }
            };
            let results = tokio::select! {
                results = work => results,
                _ = self.given_up() => vec![
                    Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "the coordinator is shutting down and its drain time is nearly over; the frame was not answered in time",
                    ));
                    groups
                ],
            };
            for result in results {
                match result {
                    Ok(per_frame) => {
                        for (&i, answer) in valid.iter().zip(per_frame) {
                            match (&mut answers[i], answer) {
                                (Ok(logits), Ok(got)) => {
                                    for (c, z) in got {
                                        if let Some(slot) = logits.get_mut(c as usize) {
                                            *slot = z;
                                        }
                                    }
                                }
                                (slot @ Ok(_), Err(e)) => *slot = Err(e),
                                (Err(_), _) => {}
                            }
                        }
                    }
                    Err(e) => {
                        for &i in &valid {
                            if answers[i].is_ok() {
                                answers[i] = Err(e.clone());
                            }
                        }
                    }
                }
            }
        }
        frames
            .into_iter()
            .zip(answers)
            .map(|((seq, _), logits)| self.prediction(seq, task, &logits?))
            .collect()
    }

    /// Merges one frame's logits under `task` into its prediction.
    fn prediction(
        &self,
        seq: u64,
        task: &ActiveTask,
        logits: &[f32],
    ) -> Result<pb::Prediction, ApiError> {
        let plan = &task.plan;
        let names = self.model.categories();
        // Worker answers were checked (finite logits) and task gains bounded: a merge that
        // still fails is a fault here, never a prediction carrying NaN.
        let scores = self.model.merge(plan, logits).map_err(|e| {
            let message = match e {
                MergeError::Missing(c) => {
                    format!("no worker returned a logit for category \"{}\"", names[c])
                }
                MergeError::NonFinite {
                    category,
                    logit,
                    log_gain,
                } => format!(
                    "category \"{}\" has no finite score (logit {logit}, gain offset {log_gain})",
                    names[category]
                ),
            };
            ApiError::new(ErrorCode::Internal, message)
        })?;
        let top = scores.top().unwrap_or_default();
        Ok(pb::Prediction {
            seq,
            task_version: task.version,
            top_index: top as u32,
            top_name: names[top].clone(),
            scores: scores
                .scores
                .iter()
                .map(|s| pb::CategoryScore {
                    index: s.index as u32,
                    name: names[s.index].clone(),
                    score: s.score,
                    logit: s.logit,
                })
                .collect(),
            cost: Some(pb::Cost {
                segments_run: plan
                    .segments
                    .iter()
                    .map(|&s| self.model.segments()[s].id.clone())
                    .collect(),
                cloud_macs: plan.cloud_macs,
                cloud_macs_saved: plan.cloud_macs_saved,
            }),
        })
    }

    /// Sends one branch's work to the least busy healthy replica. A replica that is
    /// unreachable is counted against it and the frames go to another (up to
    /// `MAX_ATTEMPTS` replicas); frames a replica refuses for lack of room
    /// (RESOURCE_EXHAUSTED) go to another replica when there is one. A replica that does
    /// not answer within `worker_timeout` is DEADLINE_EXCEEDED: the time is spent.
    async fn call(
        &self,
        group: &RouteGroup,
        features: Vec<pb::FeatureTensor>,
    ) -> Result<FrameAnswers, ApiError> {
        let segments = &group.segments;
        let mut answers: Vec<Option<Result<FrameLogits, ApiError>>> = vec![None; features.len()];
        // Frames not answered yet, by index into `features`.
        let mut todo: Vec<usize> = (0..features.len()).collect();
        let mut tried = Vec::new();
        let mut last: Option<ApiError> = None;
        // Frames a draining replica handed back may wait for a replacement like new frames.
        let mut replaced = false;
        while !todo.is_empty() && tried.len() < MAX_ATTEMPTS {
            let wait = if tried.is_empty() || replaced {
                self.limits.no_worker_wait
            } else {
                Duration::ZERO
            };
            let Some(worker) = self.registry.pick_within(segments, &tried, wait).await else {
                break;
            };
            tried.push(worker.lease_id);
            let batch: Vec<pb::FeatureTensor> = if todo.len() == features.len() {
                features.clone()
            } else {
                todo.iter().map(|&i| features[i].clone()).collect()
            };
            let _in_flight = InFlight::new(worker.clone(), batch.len() as u32);
            let call = worker.link.run(group.runs.clone(), batch);
            let result = match tokio::time::timeout(self.limits.worker_timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(ApiError::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "worker \"{}\" did not answer within {} ms",
                        worker.worker_id,
                        self.limits.worker_timeout.as_millis()
                    ),
                )),
            };
            match result {
                Ok(got) => {
                    // Frames the replica had no room for, and frames a draining replica
                    // handed back (UNAVAILABLE for the frame, not the call), go to another.
                    let (mut overloaded, mut handed_back) = (Vec::new(), Vec::new());
                    for (&i, answer) in todo.iter().zip(got) {
                        match &answer {
                            Err(e) if e.code == ErrorCode::ResourceExhausted => overloaded.push(i),
                            Err(e) if e.code == ErrorCode::Unavailable => handed_back.push(i),
                            _ => {}
                        }
                        answers[i] = Some(answer);
                    }
                    if overloaded.is_empty() {
                        // Handing frames back is how a replica leaves cleanly, not a fault.
                        self.registry.succeeded(&worker);
                    } else {
                        self.registry
                            .failed(&worker, Failure::Overloaded, "queue full");
                        tracing::debug!(
                            worker = worker.worker_id,
                            frames = overloaded.len(),
                            "worker queue full; trying another replica"
                        );
                        self.metrics.rerouted("overloaded", overloaded.len() as u64);
                    }
                    if !handed_back.is_empty() {
                        tracing::debug!(
                            worker = worker.worker_id,
                            frames = handed_back.len(),
                            "worker handed frames back; trying another replica"
                        );
                        self.metrics
                            .rerouted("handed_back", handed_back.len() as u64);
                    }
                    replaced = !handed_back.is_empty();
                    overloaded.extend(handed_back);
                    overloaded.sort_unstable();
                    todo = overloaded;
                }
                Err(e) => {
                    self.registry.failed(&worker, Failure::Fault, &e.message);
                    if e.code != ErrorCode::Unavailable {
                        // Past the deadline, or an answer that cannot be used: not retried.
                        for &i in &todo {
                            answers[i] = Some(Err(e.clone()));
                        }
                        todo.clear();
                        break;
                    }
                    tracing::warn!(worker = worker.worker_id, error = %e.message, "worker unreachable; trying another replica");
                    self.metrics.rerouted("unavailable", todo.len() as u64);
                    last = Some(e);
                }
            }
        }
        if answers.iter().all(Option::is_none) {
            let ids: Vec<_> = segments
                .iter()
                .map(|&s| self.model.segments()[s].id.as_str())
                .collect();
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                match last {
                    None => format!(
                        "no live worker hosts segments {ids:?} (waited {} ms)",
                        self.limits.no_worker_wait.as_millis()
                    ),
                    Some(e) => format!(
                        "every live worker hosting segments {ids:?} failed; last: {}",
                        e.message
                    ),
                },
            ));
        }
        Ok(answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(last.clone().unwrap_or_else(|| {
                        ApiError::new(ErrorCode::Unavailable, "no worker could take the frame")
                    }))
                })
            })
            .collect())
    }
}
