//! The gRPC services: thin translations from protobuf to domain calls and from domain
//! errors to `tonic::Status` (through [`status`], the one mapping). Each method authenticates
//! first. Only this module knows `tonic`.
pub mod admin;
pub mod jobs;
pub mod runner;
pub mod sandbox;
pub mod session;
pub mod status;
pub mod streams;
pub mod work;

use tonic::{Request, Status, metadata::MetadataMap};

use crate::App;

/// The `authorization` metadata value, when present and ASCII.
pub fn authorization(meta: &MetadataMap) -> Option<&str> {
    meta.get("authorization").and_then(|v| v.to_str().ok())
}

/// A JobService or AdminService call (`service`): needs an API token.
async fn client<T>(app: &App, request: &Request<T>, service: &str) -> Result<(), Status> {
    app.auth
        .client(&app.env.store, authorization(request.metadata()), service)
        .await
        .map_err(Status::from)
}
