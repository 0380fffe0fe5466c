//! Prometheus metrics shared by every role: one registry per process, the buckets every
//! latency histogram uses, and the text exposition `GET /metrics` serves.
//!
//! A role asks the registry for its *part* (its set of metric families) with
//! [`Metrics::part`]; the first call registers the part, later calls (another worker of
//! `spotlight up` in the same process) get the same families, so every family is exposed
//! once whatever runs in the process. Values known only at scrape time (live replicas, the
//! task version) are set by hooks registered with [`Metrics::on_scrape`].
//! The names, types and labels are listed in `docs/observability.md`.

use std::any::{Any, TypeId};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use prometheus_client;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Content-Type` of what [`Metrics::encode`] returns: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of every latency histogram: 50 µs to 10 s, about three per decade,
/// from one segment run on a small batch to a frame queued behind thousands.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Records `d` in seconds.
pub fn observe(h: &Histogram, d: Duration) {
    h.observe(d.as_secs_f64());
}

/// A role's metric families, registered once per [`Metrics`].
pub trait Part: Send + Sync + 'static {
    /// Creates the families and registers them.
    fn register(registry: &mut Registry) -> Self;
}

type Hook = Box<dyn Fn() -> bool + Send + Sync>;

#[derive(Default)]
struct Inner {
    registry: Mutex<Registry>,
    parts: Mutex<Vec<(TypeId, Arc<dyn Any + Send + Sync>)>>,
    hooks: Mutex<Vec<Hook>>,
}

/// The metrics of a process (or of one role, when nothing shares it); cheap to clone,
/// every clone is the same registry. `Default` is a new, empty registry.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Registration and scraping leave nothing half-done if a panic interrupts them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The families of `T`, registered on first use.
    pub fn part<T: Part>(&self) -> Arc<T> {
        let mut parts = lock(&self.0.parts);
        if let Some((_, p)) = parts.iter().find(|(id, _)| *id == TypeId::of::<T>())
            && let Ok(part) = p.clone().downcast::<T>()
        {
            return part;
        }
        let part = Arc::new(T::register(&mut lock(&self.0.registry)));
        parts.push((TypeId::of::<T>(), part.clone()));
        part
    }

    /// Calls `hook` before every scrape, to set values known only then; a hook that returns
    /// false (its owner is gone) is dropped.
    pub fn on_scrape(&self, hook: impl Fn() -> bool + Send + Sync + 'static) {
        lock(&self.0.hooks).push(Box::new(hook));
    }

    /// Every family in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        lock(&self.0.hooks).retain(|hook| hook());
        let mut text = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &lock(&self.0.registry))
        {
            tracing::error!(error = %e, "metrics not encoded");
        }
        text
    }

    /// The `GET /metrics` answer.
    pub fn response(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
            self.encode(),
        )
            .into_response()
    }
}

/// The `code` label of a gRPC status code number: its canonical name (`UNAVAILABLE`), the
/// same in every role.
pub fn code_label(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|c| NAMES.get(c))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// A one-label set, e.g. `[("segment", "tops")]`.
pub type Label = [(&'static str, String); 1];

/// A two-label set.
pub type Labels2 = [(&'static str, String); 2];

/// Sample values of a text exposition, by metric name with labels as written
/// (`name{a="b"}`); for tests and tools that read `/metrics`.
pub fn parse_text(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    struct Demo {
        frames: Counter,
        by_code: Family<Label, Counter>,
    }

    impl Part for Demo {
        fn register(r: &mut Registry) -> Self {
            let d = Demo {
                frames: Counter::default(),
                by_code: Family::default(),
            };
            r.register("spotlight_demo_frames", "Frames.", d.frames.clone());
            r.register("spotlight_demo_errors", "Errors.", d.by_code.clone());
            d
        }
    }

    #[test]
    fn a_part_is_registered_once_and_shared() {
        let m = Metrics::new();
        let a = m.part::<Demo>();
        let b = m.clone().part::<Demo>();
        a.frames.inc();
        b.frames.inc_by(2);
        b.by_code
            .get_or_create(&[("code", "UNAVAILABLE".into())])
            .inc();
        let text = m.encode();
        assert_eq!(
            text.matches("# TYPE spotlight_demo_frames_total").count(),
            1
        );
        let v = parse_text(&text);
        assert_eq!(v["spotlight_demo_frames_total"], 3.0);
        assert_eq!(v["spotlight_demo_errors_total{code=\"UNAVAILABLE\"}"], 1.0);
        // Another registry is another set of values.
        assert!(!Metrics::new().encode().contains("spotlight_demo"));
    }

    #[test]
    fn scrape_hooks_run_before_encoding_until_they_say_stop() {
        let m = Metrics::new();
        let d = m.part::<Demo>();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (d2, alive2) = (d.clone(), alive.clone());
        m.on_scrape(move || {
            d2.frames.inc();
            alive2.load(std::sync::atomic::Ordering::Relaxed)
        });
        m.encode();
        alive.store(false, std::sync::atomic::Ordering::Relaxed);
        m.encode();
        m.encode();
        assert_eq!(d.frames.get(), 2, "ran twice, then dropped");
    }

    #[test]
    fn codes_have_their_grpc_names() {
        assert_eq!(code_label(tonic::Code::Unavailable as i32), "UNAVAILABLE");
        assert_eq!(
            code_label(tonic::Code::Unauthenticated as i32),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_label(99), "UNKNOWN");
        assert_eq!(code_label(-1), "UNKNOWN");
    }

    #[test]
    fn buckets_ascend() {
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
