use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use spotlight_model::TaskSpec;
use spotlight_proto::v1 as pb;
use spotlight_service::Access;
use tonic::{Request, Response, Status};

use super::task_to_proto;
use crate::Shared;

pub struct ControlService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.shared.authorize(request.metadata(), Access::Read)?;
        Ok(Response::new(task_to_proto(&self.shared.task.current())))
    }

    async fn set_task(
        &self,
        request: Request<pb::SetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        self.shared.authorize(request.metadata(), Access::Operate)?;
        let r = request.into_inner();
        let spec = TaskSpec {
            categories: r.categories,
            gains: r.gains.into_iter().collect(),
        };
        let task = self.shared.task.set(spec).await?;
        Ok(Response::new(task_to_proto(&task)))
    }

    type WatchTaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send>>;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        self.shared.authorize(request.metadata(), Access::Read)?;
        let mut rx = self.shared.task.subscribe();
        let shared = self.shared.clone();
        let stream = async_stream(
            move |tx: tokio::sync::mpsc::Sender<Result<pb::Task, Status>>| async move {
                loop {
                    let task = task_to_proto(&rx.borrow_and_update().clone());
                    if tx.send(Ok(task)).await.is_err() {
                        break;
                    }
                    // A watch must not hold the server open past shutdown (SIGTERM).
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { break },
                        _ = shared.stopping() => break,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.shared.authorize(request.metadata(), Access::Read)?;
        let m = &self.shared.model;
        Ok(Response::new(pb::ModelInfo {
            name: m.name().to_string(),
            content_hash: m.hash().to_string(),
            categories: m.categories().to_vec(),
            segments: m
                .segments()
                .iter()
                .map(|s| pb::SegmentInfo {
                    id: s.id.clone(),
                    parent: s.parent.clone().unwrap_or_default(),
                    categories: s
                        .categories
                        .iter()
                        .map(|&c| m.categories()[c].clone())
                        .collect(),
                    params: s.params,
                    macs: s.macs,
                })
                .collect(),
        }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        self.shared.authorize(request.metadata(), Access::Read)?;
        let m = &self.shared.model;
        let workers = self
            .shared
            .registry
            .live()
            .iter()
            .map(|w| {
                let health = w.health_view();
                pb::WorkerInfo {
                    worker_id: w.worker_id.clone(),
                    endpoint: w.endpoint.clone(),
                    segments: w
                        .segments
                        .iter()
                        .map(|&s| m.segments()[s].id.clone())
                        .collect(),
                    outstanding: w.outstanding.load(std::sync::atomic::Ordering::Relaxed),
                    lease_remaining_ms: match w.shared {
                        true => 0,
                        false => w.lease_remaining().as_millis().min(u32::MAX as u128) as u32,
                    },
                    failures: w.failures.load(std::sync::atomic::Ordering::Relaxed),
                    consecutive_failures: health.consecutive_failures,
                    ejections: health.ejections,
                    ejected_remaining_ms: health.ejected_for.as_millis().min(u32::MAX as u128)
                        as u32,
                    frames_routed: w.routed.load(std::sync::atomic::Ordering::Relaxed),
                    lease_in_etcd: w.shared,
                }
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }
}

/// A stream fed by a spawned producer through a small channel.
fn async_stream<T, F, Fut>(producer: F) -> impl Stream<Item = T> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
