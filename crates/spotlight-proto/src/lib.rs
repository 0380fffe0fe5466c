//! Generated code for the `spotlight.v1` protocol (see `proto/spotlight/v1/`).

#![allow(clippy::all, missing_docs)]

/// `spotlight.v1` messages and services.
pub mod v1 {
    tonic::include_proto!("spotlight.v1");

    /// Encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("spotlight_descriptor");
}
