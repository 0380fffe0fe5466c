//! The shared error codes (`spotlight_service::error`), and how model errors map to them.

use spotlight_model::ModelError;
pub use spotlight_service::error::{ApiError, ErrorCode};

/// A model error as the API answers it: a bad task is the caller's error, anything else a bug.
pub fn model_error(e: ModelError) -> ApiError {
    let code = match e {
        ModelError::UnknownCategory { .. }
        | ModelError::UnknownGainTarget { .. }
        | ModelError::BadGain { .. }
        | ModelError::BadTask(_)
        | ModelError::EmptyTask => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, e.to_string())
}
