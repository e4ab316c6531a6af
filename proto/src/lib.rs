//! The gpulse.v1 wire protocol and conversions from the XID crate's types.
#![allow(clippy::doc_lazy_continuation)]

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("gpulse.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gpulse_descriptor");
}

pub mod convert;
pub mod raw;
pub mod time;
pub mod window;

pub use v1::*;
