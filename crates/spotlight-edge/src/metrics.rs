//! The edge agent's metric families (`spotlight_edge_*`, listed in
//! `docs/observability.md`), served by the local API's `GET /metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use spotlight_service::metrics::{Label, Part, code_label, latency_histogram};

/// Every family of the edge agent.
pub struct EdgeMetrics {
    pub(crate) frames_answered: Counter,
    frame_errors: Family<Label, Counter>,
    pub(crate) backbone_seconds: Histogram,
    pub(crate) encode_seconds: Histogram,
    pub(crate) round_trip_seconds: Histogram,
    pub(crate) frame_seconds: Histogram,
    pub(crate) bytes_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) task_version: Gauge,
    connected_gauge: Gauge,
    connected: AtomicBool,
}

impl Part for EdgeMetrics {
    fn register(r: &mut Registry) -> Self {
        let wire: Family<Label, Counter> = Family::default();
        let m = Self {
            frames_answered: Counter::default(),
            frame_errors: Family::default(),
            backbone_seconds: latency_histogram(),
            encode_seconds: latency_histogram(),
            round_trip_seconds: latency_histogram(),
            frame_seconds: latency_histogram(),
            bytes_out: wire.get_or_create_owned(&[("direction", "out".into())]),
            bytes_in: wire.get_or_create_owned(&[("direction", "in".into())]),
            in_flight: Gauge::default(),
            task_version: Gauge::default(),
            connected_gauge: Gauge::default(),
            connected: AtomicBool::new(false),
        };
        let p = "spotlight_edge_";
        r.register(
            format!("{p}frames_answered"),
            "Inputs that ended as a record: a prediction or an error",
            m.frames_answered.clone(),
        );
        r.register(
            format!("{p}frame_errors"),
            "Inputs that ended with an error, by gRPC code",
            m.frame_errors.clone(),
        );
        r.register_with_unit(
            format!("{p}backbone"),
            "Time of one backbone run (a batch of images, with preprocessing)",
            Unit::Seconds,
            m.backbone_seconds.clone(),
        );
        r.register_with_unit(
            format!("{p}encode"),
            "Time to encode one frame's features (codec and lossless stage)",
            Unit::Seconds,
            m.encode_seconds.clone(),
        );
        r.register_with_unit(
            format!("{p}round_trip"),
            "Time from a frame's first send to its answer from the coordinator",
            Unit::Seconds,
            m.round_trip_seconds.clone(),
        );
        r.register_with_unit(
            format!("{p}frame"),
            "Time from the backbone starting on a frame to its answer",
            Unit::Seconds,
            m.frame_seconds.clone(),
        );
        r.register_with_unit(
            format!("{p}wire"),
            "Bytes of feature tensors encoded for sending (direction=out, once per frame) and \
             of the coordinator's messages received (in), as protobuf",
            Unit::Bytes,
            wire,
        );
        r.register(
            format!("{p}in_flight_frames"),
            "Frames sent to the coordinator and not answered yet (the in-flight window)",
            m.in_flight.clone(),
        );
        r.register(
            format!("{p}task_version"),
            "Task version of the latest prediction",
            m.task_version.clone(),
        );
        r.register(
            format!("{p}connected"),
            "1 while a stream to the coordinator is open (hello answered with ready)",
            m.connected_gauge.clone(),
        );
        m
    }
}

impl EdgeMetrics {
    /// A stream to the coordinator opened (ready came) or closed.
    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        self.connected_gauge.set(i64::from(connected));
    }

    /// Whether a stream to the coordinator is open: the edge's readiness.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// An input ended: with `code` when it failed; `latency` from the backbone start when
    /// it was sent.
    pub(crate) fn finished(&self, code: Option<i32>, latency: Option<Duration>) {
        self.frames_answered.inc();
        if let Some(code) = code {
            self.frame_errors
                .get_or_create(&[("code", code_label(code).to_string())])
                .inc();
        }
        if let Some(l) = latency {
            self.frame_seconds.observe(l.as_secs_f64());
        }
    }
}
