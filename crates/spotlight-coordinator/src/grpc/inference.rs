use std::sync::Arc;
use std::time::Duration;

use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind as Out;
use spotlight_proto::v1::edge_message::Kind as In;
use spotlight_service::Access;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::Shared;
use crate::error::ErrorCode;

/// Most frames in one `FrameBatch` (and answers in one `AnswerBatch`).
pub(crate) const MAX_FRAMES_PER_MESSAGE: usize = 4096;

/// How long a new stream may take to send its hello.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuses a hello for another model (FAILED_PRECONDITION); the same over every transport.
pub(crate) fn check_hello(shared: &crate::Shared, hello: &pb::Hello) -> Result<(), Status> {
    let model = &shared.model;
    if hello.model_hash != model.hash() {
        return Err(Status::failed_precondition(format!(
            "edge \"{}\" runs model {}, but this coordinator serves {} ({})",
            hello.edge_id,
            hello.model_hash,
            model.hash(),
            model.name()
        )));
    }
    Ok(())
}

/// The first answer on a stream.
pub(crate) fn ready(shared: &crate::Shared) -> pb::Ready {
    pb::Ready {
        task_version: shared.task.current().version,
        model_name: shared.model.name().to_string(),
    }
}

/// The answer to one frame.
pub(crate) fn answer(seq: u64, result: Result<pb::Prediction, crate::ApiError>) -> Out {
    match result {
        Ok(p) => Out::Prediction(p),
        Err(e) => {
            tracing::debug!(seq, code = e.code.as_str(), error = %e.message, "frame failed");
            Out::Error(pb::FrameError {
                seq,
                code: e.code.grpc() as i32,
                message: e.message,
            })
        }
    }
}

/// The error for every frame of a batch over [`MAX_FRAMES_PER_MESSAGE`].
pub(crate) fn oversize_batch(frames: &[pb::Frame]) -> Vec<Out> {
    let message = format!(
        "a frame batch holds at most {MAX_FRAMES_PER_MESSAGE} frames, got {}; none of them was run",
        frames.len()
    );
    frames
        .iter()
        .map(|f| {
            Out::Error(pb::FrameError {
                seq: f.seq,
                code: ErrorCode::InvalidArgument.grpc() as i32,
                message: message.clone(),
            })
        })
        .collect()
}

/// The error for a message that is neither a frame nor a frame batch after the hello.
pub(crate) fn not_a_frame() -> Out {
    Out::Error(pb::FrameError {
        seq: 0,
        code: ErrorCode::InvalidArgument.grpc() as i32,
        message: "expected a frame; hello may only be sent once".into(),
    })
}

pub struct InferenceService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    type StreamStream = ReceiverStream<Result<pb::CloudMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::EdgeMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.shared.authorize(request.metadata(), Access::Infer)?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no hello within 10 s of opening the stream",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream closed before hello")),
            Ok(Ok(Some(pb::EdgeMessage {
                kind: Some(In::Hello(h)),
            }))) => h,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message of a stream must be hello",
                ));
            }
        };
        check_hello(&self.shared, &hello)?;
        let limit = self.shared.config.max_in_flight_per_stream;
        let (tx, rx) = mpsc::channel(limit + 1);
        let ready = ready(&self.shared);
        let _ = tx
            .send(Ok(pb::CloudMessage {
                kind: Some(Out::Ready(ready)),
            }))
            .await;
        // Answers go through one forwarder per stream, which puts the answers that are ready
        // together into one `AnswerBatch` for edges that accept it.
        let (answers, mut ready) = mpsc::channel::<Out>(limit + 1);
        let batch_answers = hello.batch_answers;
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(first) = ready.recv().await {
                    let message = if batch_answers {
                        let mut more = Vec::new();
                        while more.len() < MAX_FRAMES_PER_MESSAGE {
                            match ready.try_recv() {
                                Ok(k) => more.push(k),
                                Err(_) => break,
                            }
                        }
                        if more.is_empty() {
                            first
                        } else {
                            let mut batch = pb::AnswerBatch::default();
                            for k in std::iter::once(first).chain(more) {
                                match k {
                                    Out::Prediction(p) => batch.predictions.push(p),
                                    Out::Error(e) => batch.errors.push(e),
                                    _ => {}
                                }
                            }
                            Out::Answers(batch)
                        }
                    } else {
                        first
                    };
                    if tx
                        .send(Ok(pb::CloudMessage {
                            kind: Some(message),
                        }))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        let shared = self.shared.clone();
        let span = tracing::info_span!("stream", edge_id = hello.edge_id, ?peer);
        tracing::info!(parent: &span, "stream opened");
        tokio::spawn(
            async move {
                let permits = Arc::new(Semaphore::new(limit));
                let mut frames = 0u64;
                loop {
                    let next = tokio::select! {
                        m = inbound.message() => m,
                        _ = shared.stopping() => {
                            // Stop reading; frames already read are still answered, then the
                            // stream ends and the edge re-sends the rest elsewhere.
                            tracing::info!("shutting down: closing the stream after frames in flight");
                            break;
                        }
                    };
                    let msg = match next {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(status) => {
                            // E.g. a message over the size limit: the edge learns why its
                            // stream ended instead of seeing OK.
                            tracing::info!(error = %status, "stream ended by the edge");
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                    };
                    let batch = match msg.kind {
                        Some(In::Frame(f)) => vec![f],
                        Some(In::Frames(b)) if b.frames.len() <= MAX_FRAMES_PER_MESSAGE => b.frames,
                        Some(In::Frames(b)) => {
                            // Every frame gets its own answer, as the contract says.
                            for error in oversize_batch(&b.frames) {
                                if answers.send(error).await.is_err() {
                                    break;
                                }
                            }
                            continue;
                        }
                        _ => {
                            if answers.send(not_a_frame()).await.is_err() {
                                break;
                            }
                            continue;
                        }
                    };
                    // Frames that came together are routed together (one call per branch),
                    // in chunks no larger than the stream's in-flight limit.
                    let mut batch = batch;
                    while !batch.is_empty() {
                        let rest = batch.split_off(batch.len().min(limit));
                        let chunk = std::mem::replace(&mut batch, rest);
                        frames += chunk.len() as u64;
                        // Backpressure: at most `limit` frames of this stream in flight.
                        let Ok(permit) = permits.clone().acquire_many_owned(chunk.len() as u32).await else { break };
                        // ... and at most `max_in_flight_total` over all streams.
                        let Ok(global) = shared.in_flight.clone().acquire_many_owned(chunk.len() as u32).await else { break };
                        // The task in force when the frames arrive is the one that answers them.
                        let task = shared.task.current();
                        let router = shared.router.clone();
                        let answers = answers.clone();
                        tokio::spawn(async move {
                            let chunk: Vec<(u64, Option<pb::FeatureTensor>)> =
                                chunk.into_iter().map(|f| (f.seq, f.features)).collect();
                            let seqs: Vec<u64> = chunk.iter().map(|c| c.0).collect();
                            let results = router.route_batch(chunk, task).await;
                            for (seq, result) in seqs.into_iter().zip(results) {
                                if answers.send(answer(seq, result)).await.is_err() {
                                    break;
                                }
                            }
                            drop((permit, global));
                        });
                    }
                }
                tracing::info!(frames, "stream input closed; answering frames still in flight");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
