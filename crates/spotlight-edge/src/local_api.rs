//! The device API: `POST /v1/classify` with a PNG/JPEG body answers the prediction as JSON;
//! `GET /livez`, `GET /readyz` (200 while a stream to the coordinator is open) and
//! `GET /metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::EdgeMetrics;
use crate::record::{FrameFailure, Input, Item, ItemMeta, Record, Score, SeqGen, code};

/// How long a request may wait for room in the pipeline before 429.
const QUEUE_WAIT: Duration = Duration::from_secs(2);

/// Maps a gRPC status code number to the HTTP status of the device API.
pub fn http_status(code: i32) -> StatusCode {
    match code {
        1 => StatusCode::SERVICE_UNAVAILABLE, // CANCELLED (shutting down)
        3 | 11 => StatusCode::BAD_REQUEST,    // INVALID_ARGUMENT, OUT_OF_RANGE
        4 => StatusCode::GATEWAY_TIMEOUT,     // DEADLINE_EXCEEDED
        5 => StatusCode::NOT_FOUND,           // NOT_FOUND
        8 => StatusCode::TOO_MANY_REQUESTS,   // RESOURCE_EXHAUSTED
        9 => StatusCode::PRECONDITION_FAILED, // FAILED_PRECONDITION
        12 => StatusCode::NOT_IMPLEMENTED,    // UNIMPLEMENTED
        14 => StatusCode::SERVICE_UNAVAILABLE, // UNAVAILABLE
        _ => StatusCode::INTERNAL_SERVER_ERROR, // INTERNAL and the rest
    }
}

/// Body of a successful `POST /v1/classify`.
#[derive(Debug, Serialize)]
pub struct ClassifyResponse {
    pub seq: u64,
    pub predicted: String,
    pub index: u32,
    pub score: f32,
    pub task_version: u64,
    pub scores: Vec<Score>,
    pub segments_run: Vec<String>,
    pub cloud_macs: u64,
    pub cloud_macs_saved: u64,
    pub latency_ms: Option<f64>,
    pub bytes: Option<usize>,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    seq: Option<u64>,
    error: FrameFailure,
}

fn error_response(seq: Option<u64>, failure: FrameFailure) -> Response {
    (
        http_status(failure.code),
        Json(ErrorBody {
            seq,
            error: failure,
        }),
    )
        .into_response()
}

/// Turns a record into the HTTP answer.
pub(crate) fn record_response(record: Record) -> Response {
    match record.outcome {
        Ok(p) => Json(ClassifyResponse {
            seq: record.seq,
            score: p.top_score(),
            predicted: p.top_name,
            index: p.top_index,
            task_version: p.task_version,
            scores: p.scores,
            segments_run: p.segments_run,
            cloud_macs: p.cloud_macs,
            cloud_macs_saved: p.cloud_macs_saved,
            latency_ms: record.latency.map(|l| l.as_secs_f64() * 1e3),
            bytes: record.bytes,
        })
        .into_response(),
        Err(f) => error_response(Some(record.seq), f),
    }
}

/// What the probes and `/metrics` read.
#[derive(Clone)]
pub(crate) struct Probes {
    /// The registry `/metrics` serves.
    pub metrics: spotlight_service::Metrics,
    /// The edge's own families, with whether it is connected.
    pub edge: Arc<EdgeMetrics>,
}

#[derive(Clone)]
struct ApiState {
    items: mpsc::Sender<Item>,
    seq: SeqGen,
    requests: Arc<AtomicU64>,
    probes: Probes,
}

/// The device API router.
pub(crate) fn router(items: mpsc::Sender<Item>, seq: SeqGen, probes: Probes) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ApiState {
            items,
            seq,
            requests: Arc::default(),
            probes,
        })
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.probes.edge.connected() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the coordinator\n",
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    state.probes.metrics.response()
}

#[tracing::instrument(skip_all, fields(seq, bytes = body.len()))]
async fn classify(State(state): State<ApiState>, body: Bytes) -> Response {
    if body.is_empty() {
        return error_response(
            None,
            FrameFailure::new(
                code::INVALID_ARGUMENT,
                "empty body; expected a PNG or JPEG image",
            ),
        );
    }
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let seq = state.seq.next();
    tracing::Span::current().record("seq", seq);
    let (reply, answer) = oneshot::channel();
    let item = Item {
        meta: ItemMeta {
            seq,
            item: format!("http#{n}"),
            label: None,
            reply: Some(reply),
        },
        input: Input::Encoded(body.to_vec()),
    };
    match tokio::time::timeout(QUEUE_WAIT, state.items.send(item)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            return error_response(
                Some(seq),
                FrameFailure::new(code::UNAVAILABLE, "edge agent is shutting down"),
            );
        }
        Err(_) => {
            return error_response(
                Some(seq),
                FrameFailure::new(
                    code::RESOURCE_EXHAUSTED,
                    format!("edge pipeline is full; no room within {QUEUE_WAIT:?}"),
                ),
            );
        }
    }
    match answer.await {
        Ok(record) => record_response(record),
        Err(_) => error_response(
            Some(seq),
            FrameFailure::new(
                code::INTERNAL,
                "the pipeline dropped the request without an answer",
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_http() {
        assert_eq!(http_status(code::INVALID_ARGUMENT), StatusCode::BAD_REQUEST);
        assert_eq!(
            http_status(code::RESOURCE_EXHAUSTED),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(code::UNAVAILABLE),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            http_status(code::INTERNAL),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn failed_records_become_error_statuses() {
        let r = Record {
            seq: 1,
            item: "http#1".into(),
            label: None,
            outcome: Err(FrameFailure::new(
                code::INVALID_ARGUMENT,
                "cannot decode image",
            )),
            latency: None,
            bytes: None,
        };
        assert_eq!(record_response(r).status(), StatusCode::BAD_REQUEST);
    }
}
