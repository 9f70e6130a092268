//! The `gantry.v1` protocol: generated messages, clients and servers, plus the encoded
//! descriptor set that server reflection serves.

/// Messages and services of package `gantry.v1`.
#[allow(clippy::large_enum_variant, clippy::doc_overindented_list_items)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");

    /// Encoded `FileDescriptorSet` of every gantry.v1 file, for tonic-reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gantry_descriptor");
}

pub use v1::*;
