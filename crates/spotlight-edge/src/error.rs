use std::net::SocketAddr;
use std::path::PathBuf;

use spotlight_runtime::OnnxRuntimeError;

use crate::idx::IdxError;

/// Errors of the edge agent.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The configuration is unusable.
    #[error("invalid edge config: {0}")]
    Config(String),
    /// ONNX Runtime failed (loading the backbone or running it).
    #[error(transparent)]
    Runtime(#[from] OnnxRuntimeError),
    /// An idx dataset could not be read.
    #[error(transparent)]
    Idx(#[from] IdxError),
    /// A dataset source is unusable as a whole.
    #[error("{0}")]
    Source(String),
    /// Pixels do not fit the model input.
    #[error("invalid image: {0}")]
    Image(String),
    /// The JSON lines output could not be written.
    #[error("cannot write output {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The local API could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The coordinator refused the hello (FAILED_PRECONDITION): it serves another model.
    #[error(
        "coordinator {endpoint} refused model {model_hash}: {message}; the edge and the \
         coordinator must run the same model package"
    )]
    ModelMismatch {
        endpoint: String,
        model_hash: String,
        message: String,
    },
    /// The coordinator refused the edge's credentials (UNAUTHENTICATED / PERMISSION_DENIED).
    #[error("coordinator {endpoint} refused the edge's credentials: {message}")]
    Unauthorized { endpoint: String, message: String },
    /// Reconnecting failed `attempts` times in a row.
    #[error(
        "coordinator {endpoint} unreachable after {attempts} attempts (last: {last}); \
         {unanswered} frames in flight reported as errors"
    )]
    Unreachable {
        endpoint: String,
        attempts: u32,
        last: String,
        unanswered: u64,
    },
    /// A task or thread of the agent failed.
    #[error("internal error: {0}")]
    Internal(String),
}
