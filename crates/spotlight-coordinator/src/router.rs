//! Per-frame routing: cutout plan → workers → merged, normalised prediction.

use std::sync::Arc;
use std::time::Duration;

use spotlight_codec::Codec;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;

use crate::error::{ApiError, ErrorCode};
use crate::link::FrameLogits;
use crate::registry::{InFlight, Registry};
use crate::task::{ActiveTask, RouteGroup};

/// Routing deadlines.
#[derive(Debug, Clone, Copy)]
pub struct RouteLimits {
    /// How long a frame waits for a worker hosting a needed segment to be live.
    pub no_worker_wait: Duration,
    /// Deadline of one call to a worker.
    pub worker_timeout: Duration,
}

/// Routes frames; cheap to clone.
#[derive(Clone)]
pub struct Router {
    model: Arc<Model>,
    registry: Arc<Registry>,
    limits: RouteLimits,
}

impl Router {
    pub fn new(model: Arc<Model>, registry: Arc<Registry>, limits: RouteLimits) -> Self {
        Self {
            model,
            registry,
            limits,
        }
    }

    /// Checks a frame's tensor against the model without decoding it.
    pub fn check_features(&self, f: Option<&pb::FeatureTensor>) -> Result<(), ApiError> {
        let f = f.ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidArgument, "frame has no feature tensor")
        })?;
        let codec = Codec::from_wire(f.codec)
            .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        let expected = self.model.feature_shape(1);
        if f.shape != expected {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "feature tensor has shape {:?}; model {} expects {:?}",
                    f.shape,
                    self.model.name(),
                    expected
                ),
            ));
        }
        spotlight_codec::check_len(codec, f.data.len(), self.model.feature_len())
            .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))
    }

    /// Answers one frame under `task`.
    pub async fn route(
        &self,
        seq: u64,
        features: Option<pb::FeatureTensor>,
        task: Arc<ActiveTask>,
    ) -> Result<pb::Prediction, ApiError> {
        self.check_features(features.as_ref())?;
        let features = features.unwrap_or_default();
        let plan = &task.plan;

        // One call per top-level branch; the feature bytes are shared, not copied.
        let mut logits = vec![f32::NAN; self.model.categories().len()];
        let mut fill = |answer: Result<FrameLogits, ApiError>| -> Result<(), ApiError> {
            for (c, z) in answer? {
                if let Some(slot) = logits.get_mut(c as usize) {
                    *slot = z;
                }
            }
            Ok(())
        };
        match task.groups.as_slice() {
            [one] => fill(self.call(one, features).await)?,
            groups => {
                let calls = groups.iter().map(|g| self.call(g, features.clone()));
                for answer in futures::future::join_all(calls).await {
                    fill(answer)?;
                }
            }
        }
        let scores = self.model.merge(plan, &logits).map_err(|c| {
            ApiError::new(
                ErrorCode::Internal,
                format!(
                    "no worker returned a logit for category \"{}\"",
                    self.model.categories()[c]
                ),
            )
        })?;
        let names = self.model.categories();
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

    /// Sends one branch's work to the least busy live replica; one retry on another replica
    /// if the first is unreachable.
    async fn call(
        &self,
        group: &RouteGroup,
        features: pb::FeatureTensor,
    ) -> Result<FrameLogits, ApiError> {
        let segments = &group.segments;
        let mut tried = Vec::new();
        loop {
            let wait = if tried.is_empty() {
                self.limits.no_worker_wait
            } else {
                Duration::ZERO
            };
            let Some(worker) = self.registry.pick_within(segments, &tried, wait).await else {
                let ids: Vec<_> = segments
                    .iter()
                    .map(|&s| self.model.segments()[s].id.as_str())
                    .collect();
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    if tried.is_empty() {
                        format!(
                            "no live worker hosts segments {ids:?} (waited {} ms)",
                            self.limits.no_worker_wait.as_millis()
                        )
                    } else {
                        format!("every live worker hosting segments {ids:?} failed")
                    },
                ));
            };
            tried.push(worker.lease_id);
            let _in_flight = InFlight::new(worker.clone());
            let call = worker.link.run(group.runs.clone(), features.clone());
            match tokio::time::timeout(self.limits.worker_timeout, call).await {
                Ok(Ok(logits)) => return Ok(logits),
                Ok(Err(e)) if e.code == ErrorCode::Unavailable && tried.len() < 2 => {
                    tracing::warn!(worker = worker.worker_id, error = %e.message, "worker unreachable; trying another replica");
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(ApiError::new(
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "worker \"{}\" did not answer within {} ms",
                            worker.worker_id,
                            self.limits.worker_timeout.as_millis()
                        ),
                    ));
                }
            }
        }
    }
}
