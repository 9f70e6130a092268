//! Streams the services share: a domain stream as the protocol sends it, uploads (a header
//! message, then the bytes) and downloads (blob chunks).
use bytes::Bytes;
use gantry_proto as pb;
use tokio_stream::{Stream as TokioStream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Status, Streaming};

use crate::error::Error;

/// A domain stream as the protocol sends it.
pub(super) type Stream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

pub(super) fn stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<Result<T, Error>>,
) -> Stream<T> {
    Box::pin(ReceiverStream::new(rx).map(|r| r.map_err(Status::from)))
}

/// What one message of an upload carries.
pub(super) enum Part<H> {
    Header(H),
    Data(Vec<u8>),
    Empty,
}

/// Takes the header an upload must start with, and gives the bytes after it as a stream.
pub(super) async fn header_then_data<M, H>(
    mut inbound: Streaming<M>,
    part: fn(M) -> Part<H>,
) -> Result<(H, impl TokioStream<Item = Result<Bytes, Error>> + Send), Status>
where
    M: Send + 'static,
{
    let first_is_header = || Error::invalid("header", "the first message must carry the header");
    let first = inbound.message().await?.ok_or_else(first_is_header)?;
    let Part::Header(header) = part(first) else {
        return Err(first_is_header().into());
    };
    let data = inbound.map(move |message| match message {
        Ok(m) => match part(m) {
            Part::Data(d) => Ok(Bytes::from(d)),
            Part::Empty => Ok(Bytes::new()),
            Part::Header(_) => Err(Error::invalid(
                "header",
                "only the first message carries a header",
            )),
        },
        Err(status) => Err(Error::Aborted(format!(
            "the upload stream broke off: {}",
            status.message()
        ))),
    });
    Ok((header, data))
}

/// Blob chunks as the protocol sends them.
pub(super) fn chunks(
    s: futures::stream::BoxStream<'static, Result<pb::BlobChunk, Error>>,
) -> Stream<pb::BlobChunk> {
    Box::pin(s.map(|r| r.map_err(Status::from)))
}
