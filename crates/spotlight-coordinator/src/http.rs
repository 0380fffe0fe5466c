//! The curl-friendly HTTP/JSON control API.
//!
//! - `GET  /v1/task`                      current task
//! - `PUT  /v1/task`                      replace it: `{"categories": [...], "gains": {...}}`
//! - `GET  /v1/task/watch?after=N`        long-poll (≤ 30 s) until the version exceeds N
//! - `GET  /v1/model`                     model, segments, and the current cutout plan
//! - `GET  /v1/workers`                   live workers: frames routed, failures, ejections
//! - `GET  /livez`, `GET /readyz`         liveness; readiness = every segment has a live worker
//!   and the coordinator is not draining
//! - `GET  /metrics`                      Prometheus text: every family of the process
//!
//! With tokens configured, every route but the probes and `/metrics` needs
//! `Authorization: Bearer <token>`: reads a reader or operator token, changes an operator
//! token (401 without a valid token, 403 for a role that may not). `/metrics` needs a reader
//! token only with `[security] protect_metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use spotlight_model::TaskSpec;

use crate::Shared;
use crate::error::ApiError;
use crate::task::ActiveTask;

const WATCH_LIMIT: Duration = Duration::from_secs(30);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/task", get(get_task).put(set_task).post(set_task))
        .route("/v1/task/watch", get(watch_task))
        .route("/v1/model", get(model))
        .route("/v1/workers", get(workers))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authorize,
        ))
        .with_state(shared)
}

/// Probes are open; reads need a reader (or operator) token, anything else an operator one.
async fn authorize(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    use spotlight_service::Access;
    let access = match (request.uri().path(), request.method()) {
        ("/livez" | "/readyz", _) => None,
        ("/metrics", _) => {
            if let Err(e) = s.config.security.authorize_metrics(request.headers()) {
                return ApiError::from(e).into_response();
            }
            None
        }
        (_, &axum::http::Method::GET | &axum::http::Method::HEAD) => Some(Access::Read),
        _ => Some(Access::Operate),
    };
    if let Some(access) = access
        && let Err(e) = s.config.security.authorize_http(request.headers(), access)
    {
        return ApiError::from(e).into_response();
    }
    next.run(request).await
}

fn task_json(shared: &Shared, t: &ActiveTask) -> Value {
    let m = &shared.model;
    json!({
        "version": t.version,
        "categories": t.spec.categories,
        "gains": t.spec.gains,
        "plan": {
            "relevant": t.plan.relevant.iter().map(|&c| &m.categories()[c]).collect::<Vec<_>>(),
            "segments": t.plan.segments.iter().map(|&s| &m.segments()[s].id).collect::<Vec<_>>(),
            "cloud_macs": t.plan.cloud_macs,
            "cloud_macs_saved": t.plan.cloud_macs_saved,
            "cloud_params": t.plan.cloud_params,
        },
    })
}

async fn get_task(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(task_json(&s, &s.task.current()))
}

async fn set_task(
    State(s): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let spec: TaskSpec = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            crate::error::ErrorCode::InvalidArgument,
            format!("task must be JSON like {{\"categories\": [\"Sneaker\"], \"gains\": {{\"footwear\": 2.0}}}}: {e}"),
        )
    })?;
    let task = s.task.set(spec).await?;
    Ok(Json(task_json(&s, &task)))
}

#[derive(Deserialize)]
struct WatchQuery {
    #[serde(default)]
    after: u64,
}

async fn watch_task(State(s): State<Arc<Shared>>, Query(q): Query<WatchQuery>) -> Json<Value> {
    let mut rx = s.task.subscribe();
    tokio::select! {
        _ = tokio::time::timeout(WATCH_LIMIT, rx.wait_for(|t| t.version > q.after)) => {}
        _ = s.stopping() => {}
    }
    Json(task_json(&s, &s.task.current()))
}

async fn model(State(s): State<Arc<Shared>>) -> Json<Value> {
    let m = &s.model;
    let segments: Vec<Value> = m
        .segments()
        .iter()
        .map(|seg| {
            json!({
                "id": seg.id, "parent": seg.parent, "children": seg.children,
                "categories": seg.categories.iter().map(|&c| &m.categories()[c]).collect::<Vec<_>>(),
                "params": seg.params, "macs": seg.macs,
            })
        })
        .collect();
    Json(json!({
        "name": m.name(),
        "content_hash": m.hash(),
        "categories": m.categories(),
        "backbone": {"params": m.manifest().backbone.params, "macs": m.manifest().backbone.macs},
        "segments": segments,
        "task": task_json(&s, &s.task.current()),
    }))
}

async fn workers(State(s): State<Arc<Shared>>) -> Json<Value> {
    let m = &s.model;
    let list: Vec<Value> = s
        .registry
        .live()
        .iter()
        .map(|w| {
            let health = w.health_view();
            json!({
                "worker_id": w.worker_id, "endpoint": w.endpoint,
                "segments": w.segments.iter().map(|&i| &m.segments()[i].id).collect::<Vec<_>>(),
                "outstanding": w.outstanding.load(std::sync::atomic::Ordering::Relaxed),
                "frames_routed": w.routed.load(std::sync::atomic::Ordering::Relaxed),
                // A lease kept in etcd: etcd knows its time left, this replica does not.
                "lease_remaining_ms": (!w.shared).then(|| w.lease_remaining().as_millis() as u64),
                "lease_in_etcd": w.shared,
                "failures": w.failures.load(std::sync::atomic::Ordering::Relaxed),
                "consecutive_failures": health.consecutive_failures,
                "ejections": health.ejections,
                "ejected_remaining_ms": health.ejected_for.as_millis() as u64,
            })
        })
        .collect();
    Json(json!({"workers": list}))
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    match s.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    s.config.metrics.response()
}
