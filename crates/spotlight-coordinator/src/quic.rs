//! The edge protocol over QUIC (`spotlight_service::quic` describes it): hello and ready on
//! a control stream, then each edge message on a stream of its own with its answers, so a
//! lost packet delays only the frames of one message. Same checks, routing and answers as
//! the gRPC stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind as Out;
use spotlight_proto::v1::edge_message::Kind as In;
use spotlight_service::Access;
use spotlight_service::quic::{read_msg, write_msg};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::Shared;
use crate::grpc::inference::{
    HELLO_TIMEOUT, MAX_FRAMES_PER_MESSAGE, answer, check_hello, not_a_frame, oversize_batch, ready,
};

/// Serves QUIC on `socket` until shutdown begins; then answers what the connections took.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    socket: std::net::UdpSocket,
) -> Result<(), crate::CoordinatorError> {
    let security = &shared.config.security;
    let mut tls_in_force = security.quic_server_tls();
    let config = security
        .quic_server_config()
        .map_err(|e| crate::CoordinatorError::Config(e.to_string()))?;
    let mut config = Arc::new(config);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some((*config).clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(crate::CoordinatorError::Http)?;
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    // Rotated certificate files (reloaded by the security watcher) apply to
                    // the connections accepted from now on, as on gRPC and HTTPS.
                    let tls = security.quic_server_tls();
                    if let (Some(now), Some(before)) = (&tls, &tls_in_force)
                        && !Arc::ptr_eq(now, before)
                    {
                        match security.quic_server_config() {
                            Ok(fresh) => {
                                endpoint.set_server_config(Some(fresh.clone()));
                                config = Arc::new(fresh);
                                tracing::info!("QUIC: new connections get the reloaded certificate");
                            }
                            Err(e) => tracing::warn!(error = %e, "QUIC: reloaded certificate unusable; keeping the old one"),
                        }
                        tls_in_force = tls;
                    }
                    let (shared, config) = (shared.clone(), config.clone());
                    connections.spawn(async move {
                        if let Err(e) = connection(shared, incoming, config).await {
                            tracing::debug!(error = %e, "QUIC connection ended");
                        }
                    });
                }
                None => break,
            },
            _ = shared.stopping() => break,
        }
    }
    // No new connections; the open ones answer the frames they took.
    endpoint.set_server_config(None);
    while connections.join_next().await.is_some() {}
    endpoint.close(0u32.into(), b"coordinator stopped");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// Closes `conn` with a gRPC status: its code as the application error code.
fn refuse(conn: &quinn::Connection, status: &tonic::Status) {
    conn.close(
        quinn::VarInt::from_u32(status.code() as u32),
        status.message().as_bytes(),
    );
}

/// One edge's connection, accepted with `config` (the certificate in force when it arrived;
/// the connection was queued under the one before a rotation).
async fn connection(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    config: Arc<quinn::ServerConfig>,
) -> Result<(), String> {
    let conn = incoming
        .accept_with(config)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let peer = conn.remote_address();
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            let status = tonic::Status::deadline_exceeded("no hello within 10 s of connecting");
            refuse(&conn, &status);
            return Err(status.message().to_string());
        }
    };
    let hello =
        match tokio::time::timeout(HELLO_TIMEOUT, read_msg::<pb::EdgeMessage>(&mut recv)).await {
            Ok(Ok(Some(pb::EdgeMessage {
                kind: Some(In::Hello(h)),
            }))) => h,
            Ok(Err(e)) => {
                refuse(&conn, &tonic::Status::invalid_argument(e.clone()));
                return Err(e);
            }
            _ => {
                let status = tonic::Status::invalid_argument(
                    "the first message on the control stream must be hello",
                );
                refuse(&conn, &status);
                return Err(status.message().to_string());
            }
        };
    let authorization = (!hello.authorization.is_empty()).then_some(hello.authorization.as_str());
    let checked = shared
        .config
        .security
        .authorize(authorization, Access::Infer)
        .map_err(tonic::Status::from)
        .and_then(|_| check_hello(&shared, &hello));
    if let Err(status) = checked {
        refuse(&conn, &status);
        return Err(status.message().to_string());
    }
    let ready = pb::CloudMessage {
        kind: Some(Out::Ready(ready(&shared))),
    };
    write_msg(&mut send, &ready).await?;
    tracing::info!(edge_id = hello.edge_id, %peer, "QUIC stream opened");

    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight_per_stream));
    let copies = Arc::new(Mutex::new(Copies::new(
        REMEMBERED + shared.config.max_in_flight_per_stream,
    )));
    let mut messages = JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let (shared, permits, copies) = (shared.clone(), permits.clone(), copies.clone());
                    messages.spawn(message(shared, permits, copies, send, recv));
                }
                Err(e) => {
                    tracing::debug!(edge_id = hello.edge_id, error = %e, "QUIC connection closed");
                    break;
                }
            },
            _ = shared.stopping() => break,
        }
    }
    // Frames taken are answered before the connection goes.
    while messages.join_next().await.is_some() {}
    if shared.shutdown.is_begun() {
        conn.close(
            quinn::VarInt::from_u32(tonic::Code::Unavailable as u32),
            b"coordinator shutting down",
        );
    }
    Ok(())
}

/// Answered frames a connection remembers (beyond those in flight), so that a late copy
/// of one gets the same answer instead of being routed again.
const REMEMBERED: usize = 4096;

/// How long a copy that waited for another copy's answer waits more before writing it, so
/// that the copies' answers leave in different packets.
const COPY_GAP: Duration = Duration::from_millis(2);

/// The frames a connection has taken, by seq (unique within an edge's session): an edge
/// that sends copies of a message (`quic_copies`) has each frame routed once, and every
/// copy answered with the same answer.
struct Copies {
    frames: HashMap<u64, Seen>,
    order: VecDeque<u64>,
    cap: usize,
}

struct Seen {
    features: Option<pb::FeatureTensor>,
    answer: watch::Receiver<Option<Out>>,
}

/// What a stream does with one of its frames.
enum Role {
    /// The first copy: route it and publish the answer.
    Route(watch::Sender<Option<Out>>),
    /// Another copy of a frame taken before: wait for that one's answer.
    Follow(watch::Receiver<Option<Out>>),
}

impl Copies {
    fn new(cap: usize) -> Self {
        Self {
            frames: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// Follows an earlier copy of `frame` (same seq, same features), or takes it as new.
    /// A seq seen with other features is a new frame (an edge breaking the protocol's
    /// uniqueness still gets each frame routed).
    fn take(&mut self, frame: &pb::Frame) -> Role {
        if let Some(seen) = self.frames.get(&frame.seq)
            && seen.features == frame.features
        {
            return Role::Follow(seen.answer.clone());
        }
        let (tx, rx) = watch::channel(None);
        self.frames.insert(
            frame.seq,
            Seen {
                features: frame.features.clone(),
                answer: rx,
            },
        );
        self.order.push_back(frame.seq);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.frames.remove(&old);
            }
        }
        Role::Route(tx)
    }
}

/// Waits for the answer another copy of frame `seq` publishes.
async fn followed(seq: u64, mut rx: watch::Receiver<Option<Out>>) -> Out {
    let waited = rx.borrow().is_none();
    let answer = match rx.wait_for(Option::is_some).await {
        Ok(a) => a.clone().expect("waited for an answer"),
        Err(_) => Out::Error(pb::FrameError {
            seq,
            code: tonic::Code::Unavailable as i32,
            message: "another copy of this frame was taken but not answered (coordinator stopping)"
                .into(),
        }),
    };
    if waited {
        tokio::time::sleep(COPY_GAP).await;
    }
    answer
}

/// One edge message on its own stream: route its frames, answer on the same stream.
async fn message(
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    copies: Arc<Mutex<Copies>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let frames = match read_msg::<pb::EdgeMessage>(&mut recv).await {
        Ok(Some(pb::EdgeMessage {
            kind: Some(In::Frame(f)),
        })) => vec![f],
        Ok(Some(pb::EdgeMessage {
            kind: Some(In::Frames(b)),
        })) if b.frames.len() <= MAX_FRAMES_PER_MESSAGE => b.frames,
        Ok(Some(pb::EdgeMessage {
            kind: Some(In::Frames(b)),
        })) => {
            reply(&mut send, oversize_batch(&b.frames)).await;
            return;
        }
        Ok(None) => return,
        Ok(Some(_)) => {
            reply(&mut send, vec![not_a_frame()]).await;
            return;
        }
        Err(e) => {
            let error = Out::Error(pb::FrameError {
                seq: 0,
                code: tonic::Code::InvalidArgument as i32,
                message: format!("unreadable message: {e}"),
            });
            reply(&mut send, vec![error]).await;
            return;
        }
    };
    let roles: Vec<Role> = {
        let mut copies = copies.lock().unwrap_or_else(|p| p.into_inner());
        frames.iter().map(|f| copies.take(f)).collect()
    };
    let mut answers: Vec<Option<Out>> = vec![None; frames.len()];
    let mut routed: Vec<(usize, watch::Sender<Option<Out>>)> = Vec::new();
    let mut following = Vec::new();
    for (i, role) in roles.into_iter().enumerate() {
        match role {
            Role::Route(tx) => routed.push((i, tx)),
            Role::Follow(rx) => following.push((i, rx)),
        }
    }
    let limit = shared.config.max_in_flight_per_stream;
    for chunk in routed.chunks(limit) {
        // Backpressure as on gRPC: per connection, then over all streams.
        let n = chunk.len() as u32;
        let (Ok(_mine), Ok(_all)) = (
            permits.clone().acquire_many_owned(n).await,
            shared.in_flight.clone().acquire_many_owned(n).await,
        ) else {
            return;
        };
        let task = shared.task.current();
        let batch = chunk
            .iter()
            .map(|(i, _)| (frames[*i].seq, frames[*i].features.clone()))
            .collect();
        let results = shared.router.route_batch(batch, task).await;
        for ((i, tx), result) in chunk.iter().zip(results) {
            let out = answer(frames[*i].seq, result);
            tx.send_replace(Some(out.clone()));
            answers[*i] = Some(out);
        }
    }
    for (i, rx) in following {
        answers[i] = Some(followed(frames[i].seq, rx).await);
    }
    reply(&mut send, answers.into_iter().flatten().collect()).await;
}

/// Writes the answers (one message, batched when there are several) and ends the stream.
async fn reply(send: &mut quinn::SendStream, mut answers: Vec<Out>) {
    let kind = if answers.len() == 1 {
        answers.remove(0)
    } else {
        let mut batch = pb::AnswerBatch::default();
        for a in answers {
            match a {
                Out::Prediction(p) => batch.predictions.push(p),
                Out::Error(e) => batch.errors.push(e),
                _ => {}
            }
        }
        Out::Answers(batch)
    };
    let message = pb::CloudMessage { kind: Some(kind) };
    if let Err(e) = write_msg(send, &message).await {
        tracing::debug!(error = %e, "QUIC answer not delivered");
    }
    let _ = send.finish();
}
