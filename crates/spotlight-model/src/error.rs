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
    /// The manifest is of a schema version this reader does not accept.
    #[error(
        "manifest schema {found} is not supported; this reader accepts {accepted}; re-export the \
         package (`python -m spotlight_model export`), or upgrade a spotlight.model/v1 package in \
         place, keeping its ONNX files (`python -m spotlight_model remanifest --out <package dir>`)"
    )]
    UnsupportedSchema { found: String, accepted: String },
    /// The manifest's content does not hash to its `content_hash`: it was edited (a category
    /// order, a normalisation, a file digest …) without being re-hashed.
    #[error(
        "model package {dir} is corrupt or modified: manifest.json says content_hash {manifest}, \
         its content hashes to {actual}"
    )]
    HashMismatch {
        dir: PathBuf,
        manifest: String,
        actual: String,
    },
    /// A file does not match the digest the manifest lists for it.
    #[error(
        "model package {dir} is corrupt or modified: {file} hashes to {actual}, manifest.json \
         lists {manifest}"
    )]
    FileHashMismatch {
        dir: PathBuf,
        file: String,
        manifest: String,
        actual: String,
    },
    /// An ONNX file in the package directory is not listed in the manifest's `files`.
    #[error(
        "model package {dir} holds {file}, which manifest.json does not list in files; remove \
         it or re-export the package"
    )]
    UnlistedFile { dir: PathBuf, file: String },
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
