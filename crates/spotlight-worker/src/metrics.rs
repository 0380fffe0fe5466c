//! The worker's metric families (`spotlight_worker_*`, listed in `docs/observability.md`).
//! Every family carries a `worker` label, so the workers of `spotlight up` can share one
//! registry; [`EngineMetrics`] resolves one worker's series once, so the batcher threads
//! never hash a label.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use spotlight_model::Model;
use spotlight_service::metrics::{Label, Labels2, Part, code_label, latency_histogram};

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every family of the worker.
pub struct WorkerMetrics {
    frames_received: Family<Label, Counter>,
    frames_answered: Family<Label, Counter>,
    frame_errors: Family<Labels2, Counter>,
    handed_back: Family<Label, Counter>,
    queue_wait: Histograms<Label>,
    segment_seconds: Histograms<Labels2>,
    segment_frames: Family<Labels2, Counter>,
    queue_depth: Family<Label, Gauge>,
    in_flight: Family<Label, Gauge>,
    wire_bytes: Family<Labels2, Counter>,
    ready: Family<Label, Gauge>,
}

impl Part for WorkerMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self {
            frames_received: Family::default(),
            frames_answered: Family::default(),
            frame_errors: Family::default(),
            handed_back: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            segment_seconds: Family::new_with_constructor(latency_histogram),
            segment_frames: Family::default(),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            wire_bytes: Family::default(),
            ready: Family::default(),
        };
        let p = "spotlight_worker_";
        r.register(
            format!("{p}frames_received"),
            "Frames received from the coordinator (RunStream and Run)",
            m.frames_received.clone(),
        );
        r.register(
            format!("{p}frames_answered"),
            "Frames answered, with logits or an error",
            m.frames_answered.clone(),
        );
        r.register(
            format!("{p}frame_errors"),
            "Frames answered with an error, by gRPC code",
            m.frame_errors.clone(),
        );
        r.register(
            format!("{p}handed_back_frames"),
            "Frames a draining worker answered UNAVAILABLE for the coordinator to re-route",
            m.handed_back.clone(),
        );
        r.register_with_unit(
            format!("{p}queue_wait"),
            "Time a frame waited in the queue for a batcher thread",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            format!("{p}segment"),
            "Time of one ONNX Runtime run of a segment (a batch of frames), by segment",
            Unit::Seconds,
            m.segment_seconds.clone(),
        );
        r.register(
            format!("{p}segment_frames"),
            "Frames each segment ran, by segment",
            m.segment_frames.clone(),
        );
        r.register(
            format!("{p}queue_depth"),
            "Frames queued for a batcher thread",
            m.queue_depth.clone(),
        );
        r.register(
            format!("{p}in_flight_frames"),
            "Frames received and not answered yet (queued or running)",
            m.in_flight.clone(),
        );
        r.register_with_unit(
            format!("{p}wire"),
            "Bytes of RunBatch messages received (direction=in) and results sent (out)",
            Unit::Bytes,
            m.wire_bytes.clone(),
        );
        r.register(
            format!("{p}ready"),
            "1 when /readyz answers 200: segments loaded, registered, not draining",
            m.ready.clone(),
        );
        m
    }
}

/// Worker `worker`'s `spotlight_worker_ready` series.
pub(crate) fn ready_gauge(metrics: &spotlight_service::Metrics, worker: &str) -> Gauge {
    metrics
        .part::<WorkerMetrics>()
        .ready
        .get_or_create_owned(&[("worker", worker.to_string())])
}

/// One worker's series.
#[derive(Clone)]
pub struct EngineMetrics {
    families: Arc<WorkerMetrics>,
    worker: String,
    pub(crate) frames_received: Counter,
    pub(crate) frames_answered: Counter,
    pub(crate) handed_back: Counter,
    pub(crate) queue_wait: Histogram,
    /// By segment index; `None` where not hosted.
    pub(crate) segment_seconds: Vec<Option<Histogram>>,
    pub(crate) segment_frames: Vec<Option<Counter>>,
    pub(crate) queue_depth: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
}

impl EngineMetrics {
    /// The series of worker `worker`, for the segments `hosted` (by index) of `model`.
    pub fn new(
        metrics: &spotlight_service::Metrics,
        worker: &str,
        model: &Model,
        hosted: &[bool],
    ) -> Self {
        let f = metrics.part::<WorkerMetrics>();
        let w: Label = [("worker", worker.to_string())];
        let per_segment = |s: usize| -> Labels2 {
            [
                ("worker", worker.to_string()),
                ("segment", model.segments()[s].id.clone()),
            ]
        };
        let bytes = |direction: &str| -> Labels2 {
            [
                ("worker", worker.to_string()),
                ("direction", direction.to_string()),
            ]
        };
        let hosted_only = |s: usize| hosted.get(s).copied().unwrap_or(false);
        Self {
            frames_received: f.frames_received.get_or_create_owned(&w),
            frames_answered: f.frames_answered.get_or_create_owned(&w),
            handed_back: f.handed_back.get_or_create_owned(&w),
            queue_wait: f.queue_wait.get_or_create_owned(&w),
            segment_seconds: (0..model.segments().len())
                .map(|s| {
                    hosted_only(s).then(|| f.segment_seconds.get_or_create_owned(&per_segment(s)))
                })
                .collect(),
            segment_frames: (0..model.segments().len())
                .map(|s| {
                    hosted_only(s).then(|| f.segment_frames.get_or_create_owned(&per_segment(s)))
                })
                .collect(),
            queue_depth: f.queue_depth.get_or_create_owned(&w),
            in_flight: f.in_flight.get_or_create_owned(&w),
            bytes_in: f.wire_bytes.get_or_create_owned(&bytes("in")),
            bytes_out: f.wire_bytes.get_or_create_owned(&bytes("out")),
            worker: worker.to_string(),
            families: f,
        }
    }

    /// Answers given: `frames` in all, with `errors` (gRPC code numbers) among them.
    pub(crate) fn answered(&self, frames: usize, errors: impl Iterator<Item = i32>) {
        self.frames_answered.inc_by(frames as u64);
        self.in_flight.dec_by(frames as i64);
        for code in errors {
            self.families
                .frame_errors
                .get_or_create(&[
                    ("worker", self.worker.clone()),
                    ("code", code_label(code).to_string()),
                ])
                .inc();
        }
    }
}
