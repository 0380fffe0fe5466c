//! The coordinator's metric families (`spotlight_coordinator_*`, listed in
//! `docs/observability.md`): counted where frames are routed, so gRPC and QUIC edges count
//! alike; replicas, the task version and frames in flight are read at scrape time.

use std::sync::{Arc, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use spotlight_model::Model;
use spotlight_service::metrics::{Label, Part, code_label, latency_histogram};

use crate::error::ErrorCode;

/// Every family of the coordinator.
pub struct CoordinatorMetrics {
    pub frames_received: Counter,
    pub frames_answered: Counter,
    pub frame_errors: Family<Label, Counter>,
    pub frame_seconds: Histogram,
    pub wire_bytes: Family<Label, Counter>,
    pub segments_run: Family<Label, Counter>,
    pub cloud_macs: Counter,
    pub cloud_macs_saved: Counter,
    pub rerouted: Family<Label, Counter>,
    pub in_flight: Gauge,
    pub live_replicas: Family<Label, Gauge>,
    pub task_version: Gauge,
    pub ready: Gauge,
}

impl Part for CoordinatorMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = Self {
            frames_received: Counter::default(),
            frames_answered: Counter::default(),
            frame_errors: Family::default(),
            frame_seconds: latency_histogram(),
            wire_bytes: Family::default(),
            segments_run: Family::default(),
            cloud_macs: Counter::default(),
            cloud_macs_saved: Counter::default(),
            rerouted: Family::default(),
            in_flight: Gauge::default(),
            live_replicas: Family::default(),
            task_version: Gauge::default(),
            ready: Gauge::default(),
        };
        let p = "spotlight_coordinator_";
        r.register(
            format!("{p}frames_received"),
            "Frames received from edges (gRPC and QUIC), valid or not",
            m.frames_received.clone(),
        );
        r.register(
            format!("{p}frames_answered"),
            "Frames answered, with a prediction or an error",
            m.frames_answered.clone(),
        );
        r.register(
            format!("{p}frame_errors"),
            "Frames answered with an error, by gRPC code",
            m.frame_errors.clone(),
        );
        r.register_with_unit(
            format!("{p}frame"),
            "Time from a frame reaching the router to its answer (cutout plan, workers, merge)",
            Unit::Seconds,
            m.frame_seconds.clone(),
        );
        r.register_with_unit(
            format!("{p}wire"),
            "Bytes of frames from edges (direction=in) and of answers to them (out), as protobuf",
            Unit::Bytes,
            m.wire_bytes.clone(),
        );
        r.register(
            format!("{p}segments_run"),
            "Segment runs of predictions (frames x segments of their cutout plan), by segment",
            m.segments_run.clone(),
        );
        r.register(
            format!("{p}cloud_macs"),
            "Multiply-accumulates the cloud spent on predictions (their plans' MACs)",
            m.cloud_macs.clone(),
        );
        r.register(
            format!("{p}cloud_macs_saved"),
            "Multiply-accumulates cutout saved on predictions against running every branch",
            m.cloud_macs_saved.clone(),
        );
        r.register(
            format!("{p}rerouted_frames"),
            "Frames sent to another replica, by reason: unavailable (unreachable or stream \
             broken), overloaded (RESOURCE_EXHAUSTED), handed_back (a draining worker)",
            m.rerouted.clone(),
        );
        r.register(
            format!("{p}in_flight_frames"),
            "Frames read from edges and not answered yet",
            m.in_flight.clone(),
        );
        r.register(
            format!("{p}live_replicas"),
            "Live workers hosting each segment (registered, lease current)",
            m.live_replicas.clone(),
        );
        r.register(
            format!("{p}task_version"),
            "Version of the task in force",
            m.task_version.clone(),
        );
        r.register(
            format!("{p}ready"),
            "1 when /readyz answers 200 (every segment has a live worker, not draining)",
            m.ready.clone(),
        );
        m
    }
}

/// Label set of one value.
pub(crate) fn label(key: &'static str, value: impl Into<String>) -> Label {
    [(key, value.into())]
}

/// What the router counts per batch of frames, resolved once so routing hashes no labels.
pub struct RouteMetrics {
    families: Arc<CoordinatorMetrics>,
    /// By segment index.
    segments_run: Vec<Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl RouteMetrics {
    pub fn new(families: Arc<CoordinatorMetrics>, model: &Model) -> Self {
        let segments_run = model
            .segments()
            .iter()
            .map(|s| {
                families
                    .segments_run
                    .get_or_create_owned(&label("segment", s.id.clone()))
            })
            .collect();
        Self {
            bytes_in: families
                .wire_bytes
                .get_or_create_owned(&label("direction", "in")),
            bytes_out: families
                .wire_bytes
                .get_or_create_owned(&label("direction", "out")),
            segments_run,
            families,
        }
    }

    pub fn families(&self) -> &CoordinatorMetrics {
        &self.families
    }

    /// Frames that reached the router, with the bytes they took on the wire.
    pub fn received(&self, frames: u64, bytes: u64) {
        self.families.frames_received.inc_by(frames);
        self.bytes_in.inc_by(bytes);
    }

    /// A prediction that ran `segments` (indices), spending and saving those MACs.
    pub fn predicted(&self, segments: &[usize], macs: u64, saved: u64) {
        for &s in segments {
            if let Some(c) = self.segments_run.get(s) {
                c.inc();
            }
        }
        self.families.cloud_macs.inc_by(macs);
        self.families.cloud_macs_saved.inc_by(saved);
    }

    /// A frame answered after `elapsed` with an answer of `bytes`; `code` when an error.
    pub fn answered(&self, elapsed: Duration, bytes: u64, code: Option<ErrorCode>) {
        let f = &self.families;
        f.frames_answered.inc();
        self.bytes_out.inc_by(bytes);
        f.frame_seconds.observe(elapsed.as_secs_f64());
        if let Some(code) = code {
            f.frame_errors
                .get_or_create(&label("code", code_label(code.grpc() as i32)))
                .inc();
        }
    }

    /// Frames sent to another replica.
    pub fn rerouted(&self, reason: &'static str, frames: u64) {
        self.families
            .rerouted
            .get_or_create(&label("reason", reason))
            .inc_by(frames);
    }
}

/// Sets the scrape-time gauges of `shared` before each scrape, while it lives.
pub(crate) fn watch(metrics: &spotlight_service::Metrics, shared: Weak<crate::Shared>) {
    metrics.on_scrape(move || {
        let Some(s) = shared.upgrade() else {
            return false;
        };
        let m = s.router.metrics().families();
        let live = s.registry.live();
        for (i, seg) in s.model.segments().iter().enumerate() {
            let n = live.iter().filter(|w| w.segments.contains(&i)).count();
            m.live_replicas
                .get_or_create(&label("segment", seg.id.clone()))
                .set(n as i64);
        }
        m.task_version.set(s.task.current().version as i64);
        let total = s.config.max_in_flight_total;
        m.in_flight
            .set(total.saturating_sub(s.in_flight.available_permits()) as i64);
        m.ready.set(i64::from(s.ready().is_ok()));
        true
    });
}
