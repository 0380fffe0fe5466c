use std::path::PathBuf;

/// Errors loading a model package or planning a task on it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected shape.
    #[error("invalid manifest {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The manifest parsed but is inconsistent.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// The files on disk do not match the manifest's content hash.
    #[error(
        "model package {dir} is corrupt or modified: manifest says {manifest}, files hash to {actual}"
    )]
    HashMismatch {
        dir: PathBuf,
        manifest: String,
        actual: String,
    },
    /// A task names a category the model does not know.
    #[error("unknown category \"{name}\"; known: {known}")]
    UnknownCategory { name: String, known: String },
    /// A gain key is neither a category nor a segment.
    #[error(
        "unknown gain target \"{name}\"; expected a category ({categories}) or a segment ({segments})"
    )]
    UnknownGainTarget {
        name: String,
        categories: String,
        segments: String,
    },
    /// A gain is negative, not finite, or above the limit.
    #[error("gain for \"{name}\" must be a finite number in [0, {max}], got {gain}")]
    BadGain { name: String, gain: f32, max: f32 },
    /// A task breaks a stated limit: a category listed twice, too many entries, a name
    /// too long, gains that multiply past the limit along a path.
    #[error("{0}")]
    BadTask(String),
    /// The task leaves nothing to predict.
    #[error(
        "task leaves no category to predict (every relevant category is cut out by a gain of 0)"
    )]
    EmptyTask,
}
