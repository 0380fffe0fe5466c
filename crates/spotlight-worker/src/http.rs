//! The worker's HTTP listener (`[worker] http_listen`): `GET /livez`, `GET /readyz` and
//! `GET /metrics`, over TLS when the worker has a certificate. Probes are open; `/metrics`
//! needs a reader token only with `[security] protect_metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
use spotlight_service::{ApiError, Metrics, Security};

/// Whether the worker takes frames: its segments loaded, registered with the coordinator,
/// and not draining. Mirrored in `spotlight_worker_ready`.
pub(crate) struct Readiness {
    loaded: AtomicBool,
    registered: AtomicBool,
    draining: AtomicBool,
    gauge: Gauge,
}

impl Readiness {
    pub(crate) fn new(gauge: Gauge) -> Self {
        gauge.set(0);
        Self {
            loaded: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            gauge,
        }
    }

    pub(crate) fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Relaxed);
        self.update();
    }

    pub(crate) fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
        self.update();
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.update();
    }

    /// `Ok` when ready, else why not.
    pub(crate) fn check(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Err("draining: shutting down")
        } else if !self.loaded.load(Ordering::Relaxed) {
            Err("loading the segments")
        } else if !self.registered.load(Ordering::Relaxed) {
            Err("not registered with the coordinator")
        } else {
            Ok(())
        }
    }

    fn update(&self) {
        self.gauge.set(i64::from(self.check().is_ok()));
    }
}

#[derive(Clone)]
struct Http {
    readiness: Arc<Readiness>,
    metrics: Metrics,
    security: Security,
}

pub(crate) fn router(readiness: Arc<Readiness>, metrics: Metrics, security: Security) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Http {
            readiness,
            metrics,
            security,
        })
}

async fn readyz(State(h): State<Http>) -> Response {
    match h.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics_text(State(h): State<Http>, headers: HeaderMap) -> Response {
    match h.security.authorize_metrics(&headers) {
        Ok(()) => h.metrics.response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_loaded_registered_and_not_draining() {
        let r = Readiness::new(Gauge::default());
        assert_eq!(r.check(), Err("loading the segments"));
        r.set_loaded();
        assert_eq!(r.check(), Err("not registered with the coordinator"));
        r.set_registered(true);
        assert_eq!(r.check(), Ok(()));
        assert_eq!(r.gauge.get(), 1);
        r.set_registered(false);
        assert!(r.check().is_err());
        r.set_registered(true);
        r.set_draining();
        assert_eq!(r.check(), Err("draining: shutting down"));
        assert_eq!(r.gauge.get(), 0);
    }
}
