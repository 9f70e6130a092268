//! The server's one error type. Domain code returns [`Error`]; `service::status` maps it to a
//! `tonic::Status`, once, for every service and stream. Bad input names the field and the
//! rule that was broken.

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
    /// The caller is known but may not do this (another runner's attempt, a token of the
    /// wrong kind).
    #[error("{0}")]
    PermissionDenied(String),
    /// No valid credential (missing, unknown, revoked, or its runner no longer exists).
    #[error("{0}")]
    Unauthenticated(String),
    /// Something is larger than the server accepts.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not done because of something else that happened first (an earlier report of the
    /// same attempt was refused; a newer session replaced this one): the caller may try again.
    #[error("{0}")]
    Aborted(String),
    /// The database could not be reached or refused the statement.
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// The server is shutting down or overloaded.
    #[error("{0}")]
    Unavailable(String),
    /// Stored data could not be decoded, or an invariant broke: a bug or a corrupted row.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A free-text field: at most `max` bytes and no NUL (PostgreSQL's text columns refuse
/// NUL, and what is stored must read back the same on either database).
pub fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max || value.contains('\0') {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} bytes without NUL"),
        ));
    }
    Ok(())
}

impl Error {
    /// Bad input: `field` breaks `rule`.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// A runner that does not exist (never did, or retention deleted it): its credential is
    /// refused and it must register again (see `runners::state`).
    pub fn unknown_runner(id: uuid::Uuid) -> Self {
        Error::Unauthenticated(format!(
            "runner {id} is not registered (it may have been deleted after being offline): register again"
        ))
    }

    /// A runner whose credential was revoked (it deregistered): refused; register again.
    pub fn revoked_runner(id: uuid::Uuid) -> Self {
        Error::Unauthenticated(format!(
            "the credential of runner {id} was revoked (the runner deregistered): register again"
        ))
    }

    /// The same error again, for each of several callers answered by one failed operation
    /// (a database error keeps its message, not its source).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::Invalid { field, rule } => Error::invalid(field.clone(), rule.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::Unauthenticated(m) => Error::Unauthenticated(m.clone()),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::Aborted(m) => Error::Aborted(m.clone()),
            Error::Database(e) => Error::Unavailable(format!("database error: {e}")),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Internal(format!("stored protobuf could not be decoded: {e}"))
    }
}
