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

/// The codec of every gantry.v1 service: prost messages, with a small initial buffer per
/// stream. tonic's default (8 KiB for each direction of each stream) is most of what an idle
/// runner session costs the server; buffers still grow for large messages.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Initial buffer per stream and direction.
    const BUFFER_BYTES: usize = 1024;
    /// tonic's default yield threshold (32 KiB).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// [`ProstCodec`] with [`BUFFER_BYTES`] buffers.
    #[derive(Debug, Clone, Copy)]
    pub struct GantryCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for GantryCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for GantryCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
        }
    }
}
