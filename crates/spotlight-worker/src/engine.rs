//! Segment sessions and their execution, off the async runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use spotlight_codec::Codec;
use spotlight_model::{Model, OnnxRuntimeError, SegmentSession};
use spotlight_proto::v1 as pb;
use tokio::sync::Semaphore;

/// Why a request failed.
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
    #[error("worker is shutting down")]
    Closed,
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::WrongModel { .. } => tonic::Code::FailedPrecondition,
            EngineError::BadRequest(_) => tonic::Code::InvalidArgument,
            EngineError::NotHosted(_) => tonic::Code::NotFound,
            EngineError::Runtime(_) => tonic::Code::Internal,
            EngineError::Closed => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, e.to_string())
    }
}

struct Hosted {
    session: Mutex<SegmentSession>,
    runs: AtomicU64,
}

/// The hosted segments and their counters.
pub struct Engine {
    model: Arc<Model>,
    worker_id: String,
    /// By segment index; `None` where not hosted.
    hosted: Vec<Option<Hosted>>,
    permits: Semaphore,
    requests: AtomicU64,
}

impl Engine {
    /// Opens the sessions of `branches` (top-level ids; empty = all) and their descendants.
    pub async fn load(
        model: Arc<Model>,
        branches: &[String],
        max_concurrent: usize,
        intra_threads: usize,
    ) -> Result<Self, EngineError> {
        let m = model.clone();
        let branches = branches.to_vec();
        let hosted =
            tokio::task::spawn_blocking(move || -> Result<Vec<Option<Hosted>>, EngineError> {
                (0..m.segments().len())
                    .map(|s| {
                        let root = &m.segments()[m.root_of(s)].id;
                        if branches.is_empty() || branches.contains(root) {
                            let session = SegmentSession::open(&m, s, intra_threads)?;
                            Ok(Some(Hosted {
                                session: Mutex::new(session),
                                runs: AtomicU64::new(0),
                            }))
                        } else {
                            Ok(None)
                        }
                    })
                    .collect()
            })
            .await
            .map_err(|_| EngineError::Closed)??;
        Ok(Self {
            model,
            worker_id: String::new(),
            hosted,
            permits: Semaphore::new(max_concurrent),
            requests: AtomicU64::new(0),
        })
    }

    /// Sets the id reported by [`Engine::stats`].
    pub fn with_worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Hosted segment ids, in tree order.
    pub fn segment_ids(&self) -> Vec<String> {
        self.hosted
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .map(|(s, _)| self.model.segments()[s].id.clone())
            .collect()
    }

    /// Counters since start.
    pub fn stats(&self) -> pb::StatsResponse {
        pb::StatsResponse {
            worker_id: self.worker_id.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            segments_run: self
                .hosted
                .iter()
                .enumerate()
                .filter_map(|(s, h)| {
                    h.as_ref().map(|h| {
                        (
                            self.model.segments()[s].id.clone(),
                            h.runs.load(Ordering::Relaxed),
                        )
                    })
                })
                .collect(),
        }
    }

    /// Runs one request on a blocking thread (at most `max_concurrent` at once).
    pub async fn run(
        self: &Arc<Self>,
        request: pb::RunRequest,
    ) -> Result<pb::RunResponse, EngineError> {
        if request.model_hash != self.model.hash() {
            return Err(EngineError::WrongModel {
                expected: self.model.hash().to_string(),
                got: request.model_hash,
            });
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| EngineError::Closed)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.run_blocking(request))
            .await
            .map_err(|_| EngineError::Closed)?
    }

    fn run_blocking(&self, request: pb::RunRequest) -> Result<pb::RunResponse, EngineError> {
        let model = &self.model;
        let f = request
            .features
            .ok_or_else(|| EngineError::BadRequest("request has no feature tensor".into()))?;
        let expected = model.feature_shape(1);
        if f.shape != expected {
            return Err(EngineError::BadRequest(format!(
                "feature tensor has shape {:?}; expected {expected:?}",
                f.shape
            )));
        }
        let codec =
            Codec::from_wire(f.codec).map_err(|e| EngineError::BadRequest(e.to_string()))?;
        let features =
            spotlight_codec::decode(codec, &f.data, f.scale, f.zero_point, model.feature_len())
                .map_err(|e| EngineError::BadRequest(e.to_string()))?;

        // Resolve and order the requested segments (parents first).
        let mut wanted: Vec<(usize, f32)> = Vec::with_capacity(request.segments.len());
        for r in &request.segments {
            let s = model.segment_index(&r.segment_id).ok_or_else(|| {
                EngineError::BadRequest(format!("unknown segment \"{}\"", r.segment_id))
            })?;
            if self.hosted[s].is_none() {
                return Err(EngineError::NotHosted(r.segment_id.clone()));
            }
            if !r.gain.is_finite() || r.gain < 0.0 {
                return Err(EngineError::BadRequest(format!(
                    "gain of \"{}\" must be finite and >= 0, got {}",
                    r.segment_id, r.gain
                )));
            }
            wanted.push((s, r.gain));
        }
        wanted.sort_by_key(|w| w.0);
        wanted.dedup_by_key(|w| w.0);

        let mut outputs: HashMap<usize, Vec<f32>> = HashMap::new();
        let mut response = pb::RunResponse::default();
        for &(s, gain) in &wanted {
            let input = match model.parent_of(s) {
                None => features.clone(),
                Some(p) => outputs.get(&p).cloned().ok_or_else(|| {
                    EngineError::BadRequest(format!(
                        "segment \"{}\" needs its parent \"{}\" in the same request",
                        model.segments()[s].id,
                        model.segments()[p].id
                    ))
                })?,
            };
            let Some(hosted) = &self.hosted[s] else {
                continue;
            };
            let out = {
                let mut session = hosted.session.lock().unwrap_or_else(|p| p.into_inner());
                session.run(input, vec![gain])?
            };
            hosted.runs.fetch_add(1, Ordering::Relaxed);
            if let Some(feat) = out.features {
                outputs.insert(s, feat);
            }
            if let Some(logits) = out.logits {
                let spec = &model.segments()[s];
                response.outputs.push(pb::SegmentOutput {
                    segment_id: spec.id.clone(),
                    categories: spec.direct_categories.iter().map(|&c| c as u32).collect(),
                    logits,
                });
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(segments = wanted.len(), "request served");
        Ok(response)
    }
}
