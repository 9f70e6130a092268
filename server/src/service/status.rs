//! The one mapping from the server's [`Error`] to a `tonic::Status`, and the codes of
//! refusals tonic makes itself before a request reaches a service:
//! - a message over the size limit is RESOURCE_EXHAUSTED (tonic says OUT_OF_RANGE);
//! - a request body that does not decode (invalid UTF-8 in a string field, a truncated
//!   message) is INVALID_ARGUMENT naming the field (tonic says INTERNAL): it is bad input,
//!   not a fault of the server.
//!
//! Unary calls are corrected by [`RemapLayer`] on their way out; streams the services read
//! themselves (a Session, ReportEvents) map what their inbound stream says with [`inbound`].
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::{
    Code, Status,
    codegen::http::{self, HeaderValue},
};
use tonic_types::StatusExt;

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::Invalid { field, rule } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.add_bad_request_violation(field.clone(), rule.clone());
                return Status::with_error_details(Code::InvalidArgument, e.to_string(), details);
            }
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Database(db) => {
                tracing::warn!(error = %db, "database error answered as UNAVAILABLE");
                Code::Unavailable
            }
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

/// The gRPC code an error maps to (for codes carried inside messages, e.g. ReportRejected).
pub fn code(e: &Error) -> Code {
    Status::from(e.duplicate()).code()
}

/// tonic's message for a message over the size limit.
const TOO_LARGE: &str = "message length too large";
/// prost's message for a body that does not decode.
const UNDECODABLE: &str = "failed to decode Protobuf message";

/// What an inbound stream's error means: the runner's message was too large or did not
/// decode (`Some`, the status to end the call with), or the stream just broke (`None`: the
/// peer went away; nothing to say).
pub fn inbound(status: &Status) -> Option<Status> {
    match status.code() {
        Code::OutOfRange if status.message().contains(TOO_LARGE) => Some(Status::new(
            Code::ResourceExhausted,
            format!(
                "{} (the server's --max-message-bytes): send smaller messages",
                status.message()
            ),
        )),
        Code::Internal if status.message().starts_with(UNDECODABLE) => {
            Some(Error::invalid("request", status.message().to_string()).into())
        }
        _ => None,
    }
}

/// Rewrites the code of the refusals tonic makes before a service sees the request (see the
/// module comment). Responses of the services themselves pass unchanged.
#[derive(Clone, Copy, Debug, Default)]
pub struct RemapLayer;

impl<S> tower_layer::Layer<S> for RemapLayer {
    type Service = Remap<S>;

    fn layer(&self, inner: S) -> Remap<S> {
        Remap(inner)
    }
}

/// The service [`RemapLayer`] wraps.
#[derive(Clone, Debug)]
pub struct Remap<S>(S);

impl<S, B, R> tower_service::Service<http::Request<B>> for Remap<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            remap(response.headers_mut());
            Ok(response)
        })
    }
}

/// Corrects the status of a trailers-only response (the form of every refusal made before
/// a service answered).
fn remap(headers: &mut http::HeaderMap) {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| m.replace("%20", " "))
        .unwrap_or_default();
    let corrected = match code {
        Some("11") if message.contains(TOO_LARGE) => Code::ResourceExhausted,
        Some("13") if message.starts_with(UNDECODABLE) => Code::InvalidArgument,
        _ => return,
    };
    headers.insert(
        "grpc-status",
        HeaderValue::from_str(&(corrected as i32).to_string())
            .unwrap_or(HeaderValue::from_static("2")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: &str, message: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(code).expect("ascii"));
        h.insert(
            "grpc-message",
            HeaderValue::from_str(message).expect("ascii"),
        );
        h
    }

    #[test]
    fn oversized_and_undecodable_requests_get_the_codes_that_fit() {
        let mut h = headers(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205%20bytes",
        );
        remap(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let mut h = headers("13", "failed%20to%20decode%20Protobuf%20message:%20x");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "3");
        // Anything else is left as the service said it.
        let mut h = headers("13", "internal%20error:%20boom");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "13");
        let mut h = headers("11", "out%20of%20range");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "11");
    }

    #[test]
    fn inbound_stream_errors_say_what_was_wrong() {
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        );
        assert_eq!(
            inbound(&big).map(|s| s.code()),
            Some(Code::ResourceExhausted)
        );
        let bad = Status::internal(
            "failed to decode Protobuf message: Report.job_id: invalid string value: data is not UTF-8 encoded",
        );
        let mapped = inbound(&bad).expect("bad input");
        assert_eq!(mapped.code(), Code::InvalidArgument);
        assert!(mapped.message().contains("Report.job_id"));
        assert!(inbound(&Status::cancelled("gone")).is_none());
    }
}
