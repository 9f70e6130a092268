//! The server's one error type and its one mapping to `tonic::Status`.
//!
//! Domain code returns [`Error`]; services turn it into a status with `?` through the
//! `From` impl below. Bad input names the field and the rule that was broken.
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Everything that can go wrong inside the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field breaks a rule. `field` is the protobuf path, e.g. `spec.timeout_seconds`.
    #[error("invalid {field}: {rule}")]
    Invalid { field: String, rule: String },
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is valid but the current state forbids it (e.g. a stale lease).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller is authenticated but may not touch this (another runner's attempt).
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credential.
    #[error("{0}")]
    Unauthenticated(String),
    /// The database could not be reached or refused the statement.
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// The server is shutting down or overloaded.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data could not be decoded: a bug or a corrupted row.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Bad input: `field` breaks `rule`.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// The same error again, for each of several callers answered by one failed operation
    /// (a database error keeps its code and message, not its source).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Invalid { field, rule } => Error::invalid(field.clone(), rule.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::Database(e) => Error::Unavailable(format!("database error: {e}")),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Database(_) | Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Internal(format!("stored protobuf could not be decoded: {e}"))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::Invalid { field, rule } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.add_bad_request_violation(field.clone(), rule.clone());
                Status::with_error_details(Code::InvalidArgument, e.to_string(), details)
            }
            Error::Database(db) => {
                tracing::warn!(error = %db, "database error answered as UNAVAILABLE");
                Status::unavailable(e.to_string())
            }
            Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
            _ => Status::new(e.code(), e.to_string()),
        }
    }
}
