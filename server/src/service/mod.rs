//! The gRPC services: thin translations from protobuf to domain calls and from domain
//! errors to `tonic::Status` (through `From<Error>`). Each method authenticates first.
pub mod admin;
pub mod jobs;
pub mod runner;

/// Bound of every server stream's buffer toward a client.
pub const STREAM_BUFFER: usize = 64;
