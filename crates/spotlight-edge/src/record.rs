//! What flows through the pipeline: inputs, and the one record every input ends as.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::EdgeMetrics;

/// gRPC status code numbers used for edge-side failures.
pub mod code {
    /// The run was shut down before the frame was answered.
    pub const CANCELLED: i32 = 1;
    /// The input is not a usable image.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The edge queue is full.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// The coordinator refused the model.
    pub const FAILED_PRECONDITION: i32 = 9;
    /// The backbone failed.
    pub const INTERNAL: i32 = 13;
    /// The coordinator could not be reached.
    pub const UNAVAILABLE: i32 = 14;
}

/// One category's score, as the coordinator sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    pub index: u32,
    pub name: String,
    pub score: f32,
}

/// The cloud's answer to one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloudPrediction {
    pub task_version: u64,
    pub top_index: u32,
    pub top_name: String,
    /// Relevant categories, descending.
    pub scores: Vec<Score>,
    pub segments_run: Vec<String>,
    pub cloud_macs: u64,
    pub cloud_macs_saved: u64,
}

impl CloudPrediction {
    /// Score of the predicted category.
    pub fn top_score(&self) -> f32 {
        self.scores
            .iter()
            .find(|s| s.index == self.top_index)
            .map_or(0.0, |s| s.score)
    }

    /// Whether category `c` is among the task's relevant categories.
    pub fn is_relevant(&self, c: usize) -> bool {
        self.scores.iter().any(|s| s.index as usize == c)
    }
}

/// Why a frame got no prediction: a gRPC status code number and a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrameFailure {
    pub code: i32,
    pub message: String,
}

impl FrameFailure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The final record of one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Sequence number, unique within the run.
    pub seq: u64,
    /// Source item: `file#index`, a path, or `http#n`.
    pub item: String,
    /// Known label (category index) and its name.
    pub label: Option<(usize, String)>,
    pub outcome: Result<CloudPrediction, FrameFailure>,
    /// Backbone start to answer.
    pub latency: Option<Duration>,
    /// Feature payload bytes on the wire.
    pub bytes: Option<usize>,
}

impl Record {
    /// The JSON line written to the output.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "seq": self.seq, "item": self.item });
        if let Some((index, name)) = &self.label {
            v["label"] = name.clone().into();
            v["label_index"] = (*index).into();
        }
        match &self.outcome {
            Ok(p) => {
                v["predicted"] = p.top_name.clone().into();
                v["index"] = p.top_index.into();
                v["score"] = f64::from(p.top_score()).into();
                v["task_version"] = p.task_version.into();
                v["cloud_macs"] = p.cloud_macs.into();
                // Correctness is only defined when the label is among the task's categories.
                if let Some((index, _)) = &self.label {
                    let relevant = p.scores.iter().any(|s| s.index as usize == *index);
                    v["correct"] = if relevant {
                        (p.top_index as usize == *index).into()
                    } else {
                        serde_json::Value::Null
                    };
                }
            }
            Err(f) => v["error"] = serde_json::json!({ "code": f.code, "message": f.message }),
        }
        if let Some(l) = self.latency {
            v["latency_ms"] = (l.as_secs_f64() * 1e3).into();
        }
        if let Some(b) = self.bytes {
            v["bytes"] = b.into();
        }
        v
    }
}

/// Identity and destination of an input travelling through the pipeline.
#[derive(Debug)]
pub struct ItemMeta {
    pub seq: u64,
    pub item: String,
    pub label: Option<usize>,
    /// Local API requests wait here for their record.
    pub reply: Option<oneshot::Sender<Record>>,
}

/// An input's pixels, or what it is before decoding.
#[derive(Debug)]
pub enum Input {
    /// Interleaved pixels already in the manifest's color and size.
    Pixels(Vec<u8>),
    /// PNG/JPEG bytes, decoded on the backbone thread.
    Encoded(Vec<u8>),
    /// The source could not produce the input.
    Failed(FrameFailure),
}

/// One input entering the pipeline.
#[derive(Debug)]
pub struct Item {
    pub meta: ItemMeta,
    pub input: Input,
}

/// Hands out sequence numbers, shared by every source of a run.
#[derive(Debug, Clone, Default)]
pub struct SeqGen(Arc<AtomicU64>);

impl SeqGen {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Turns finished inputs into records: answers the waiting request, if any, and hands the
/// record to the reporter.
#[derive(Clone)]
pub struct Sink {
    categories: Arc<[String]>,
    records: mpsc::UnboundedSender<Record>,
    metrics: Arc<EdgeMetrics>,
}

impl Sink {
    pub fn new(
        categories: &[String],
        records: mpsc::UnboundedSender<Record>,
        metrics: Arc<EdgeMetrics>,
    ) -> Self {
        Self {
            categories: categories.into(),
            records,
            metrics,
        }
    }

    /// The edge's metrics, counted as frames pass.
    pub fn metrics(&self) -> &EdgeMetrics {
        &self.metrics
    }

    pub fn finish(
        &self,
        meta: ItemMeta,
        outcome: Result<CloudPrediction, FrameFailure>,
        latency: Option<Duration>,
        bytes: Option<usize>,
    ) {
        self.metrics
            .finished(outcome.as_ref().err().map(|f| f.code), latency);
        if let Ok(p) = &outcome {
            self.metrics.task_version.set(p.task_version as i64);
        }
        let label = meta
            .label
            .and_then(|i| self.categories.get(i).map(|n| (i, n.clone())));
        let record = Record {
            seq: meta.seq,
            item: meta.item,
            label,
            outcome,
            latency,
            bytes,
        };
        if let Some(reply) = meta.reply {
            // The requester may have gone away; the record is still reported below.
            let _ = reply.send(record.clone());
        }
        if self.records.send(record).is_err() {
            tracing::warn!("reporter is gone; record dropped");
        }
    }

    pub fn fail(&self, meta: ItemMeta, failure: FrameFailure) {
        self.finish(meta, Err(failure), None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction() -> CloudPrediction {
        CloudPrediction {
            task_version: 2,
            top_index: 1,
            top_name: "Trouser".into(),
            scores: vec![
                Score {
                    index: 1,
                    name: "Trouser".into(),
                    score: 0.75,
                },
                Score {
                    index: 3,
                    name: "Dress".into(),
                    score: 0.25,
                },
            ],
            segments_run: vec!["bottoms".into()],
            cloud_macs: 100,
            cloud_macs_saved: 50,
        }
    }

    #[test]
    fn json_lines_carry_prediction_or_error() {
        let mut r = Record {
            seq: 7,
            item: "a.png".into(),
            label: Some((3, "Dress".into())),
            outcome: Ok(prediction()),
            latency: Some(Duration::from_millis(2)),
            bytes: Some(392),
        };
        let v = r.to_json();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["predicted"], "Trouser");
        assert_eq!(v["index"], 1);
        assert_eq!(v["score"], 0.75);
        assert_eq!(v["correct"], false);
        assert_eq!(v["bytes"], 392);
        assert_eq!(v["label"], "Dress");
        // A label outside the task's categories has no correctness.
        r.label = Some((5, "Sandal".into()));
        assert_eq!(r.to_json()["correct"], serde_json::Value::Null);
        r.outcome = Err(FrameFailure::new(14, "no worker"));
        let v = r.to_json();
        assert_eq!(v["error"]["code"], 14);
        assert_eq!(v["error"]["message"], "no worker");
        assert!(v.get("predicted").is_none());
    }

    #[test]
    fn sink_answers_the_waiting_request_and_the_reporter() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let metrics = spotlight_service::Metrics::new();
        let sink = Sink::new(
            &["a".to_string(), "b".to_string()],
            tx,
            metrics.part::<EdgeMetrics>(),
        );
        let (reply, mut waiting) = oneshot::channel();
        let meta = ItemMeta {
            seq: 1,
            item: "x".into(),
            label: Some(1),
            reply: Some(reply),
        };
        sink.fail(meta, FrameFailure::new(3, "bad"));
        let got = waiting.try_recv().unwrap();
        assert_eq!(got.label, Some((1, "b".to_string())));
        assert_eq!(rx.try_recv().unwrap(), got);
        let v = spotlight_service::metrics::parse_text(&metrics.encode());
        assert_eq!(v["spotlight_edge_frames_answered_total"], 1.0);
        assert_eq!(
            v["spotlight_edge_frame_errors_total{code=\"INVALID_ARGUMENT\"}"],
            1.0
        );
    }
}
