//! Per-frame routing: cutout plan → workers → merged, normalised prediction.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use spotlight_codec::Codec;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;

use crate::error::{ApiError, ErrorCode};
use crate::registry::{InFlight, Registry};
use crate::task::ActiveTask;

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

        // Segments grouped by top-level branch: a branch's subtree lives on one worker.
        let mut groups: BTreeMap<usize, Vec<pb::SegmentRun>> = BTreeMap::new();
        let mut group_segments: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (&s, &gain) in plan.segments.iter().zip(&plan.segment_gains) {
            let root = self.model.root_of(s);
            groups.entry(root).or_default().push(pb::SegmentRun {
                segment_id: self.model.segments()[s].id.clone(),
                gain,
            });
            group_segments.entry(root).or_default().push(s);
        }
        let calls =
            group_segments
                .into_iter()
                .zip(groups.into_values())
                .map(|((_, segs), runs)| {
                    let request = pb::RunRequest {
                        model_hash: self.model.hash().to_string(),
                        features: Some(features.clone()),
                        segments: runs,
                    };
                    self.call(segs, request)
                });
        let responses = futures::future::join_all(calls).await;

        let mut logits = vec![f32::NAN; self.model.categories().len()];
        for response in responses {
            for out in response?.outputs {
                for (&c, &z) in out.categories.iter().zip(&out.logits) {
                    if let Some(slot) = logits.get_mut(c as usize) {
                        *slot = z;
                    }
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
        segments: Vec<usize>,
        request: pb::RunRequest,
    ) -> Result<pb::RunResponse, ApiError> {
        let mut tried = Vec::new();
        loop {
            let wait = if tried.is_empty() {
                self.limits.no_worker_wait
            } else {
                Duration::ZERO
            };
            let Some(worker) = self.registry.pick_within(&segments, &tried, wait).await else {
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
            let mut client = worker.client.clone();
            let mut req = tonic::Request::new(request.clone());
            req.set_timeout(self.limits.worker_timeout);
            match tokio::time::timeout(self.limits.worker_timeout, client.run(req)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable && tried.len() < 2 => {
                    tracing::warn!(worker = worker.worker_id, error = %status.message(), "worker unreachable; trying another replica");
                }
                Ok(Err(status)) => {
                    return Err(ApiError::new(
                        ErrorCode::from_grpc(status.code()),
                        format!("worker \"{}\": {}", worker.worker_id, status.message()),
                    ));
                }
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
