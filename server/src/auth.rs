//! Authentication. Three kinds of bearer token, all in metadata `authorization: Bearer …`:
//! the registration token (only for `Register`), per-runner credentials (every other runner
//! call; stored as SHA-256 hashes, revoked when the runner deregisters), and API tokens
//! (JobService, AdminService). Health and reflection need none.
//!
//! No token, or one the server does not know: UNAUTHENTICATED. A valid token of the wrong
//! kind (a runner credential on JobService, an API token on RunnerService): PERMISSION_DENIED
//! — the caller is known, the call is not allowed. A runner credential whose runner was
//! deleted or deregistered: UNAUTHENTICATED, saying to register again.
use std::{collections::HashMap, sync::RwLock};

use rand::RngCore;
use sea_orm::{EntityTrait, QuerySelect};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    store::{Store, entity::runner},
};

/// Prefix of runner credentials, so that a leaked one is recognisable.
const CREDENTIAL_PREFIX: &str = "grc_";

/// Token checks, shared by the services.
pub struct Auth {
    /// SHA-256 of the registration token.
    registration: [u8; 32],
    /// SHA-256 of each API token.
    api_tokens: Vec<[u8; 32]>,
    /// Credentials already verified against the database: credential hash → runner id.
    /// An entry is dropped ([`Auth::forget`]) as soon as a call finds its runner revoked or
    /// gone, so a stale entry costs at most that one call.
    verified: RwLock<HashMap<[u8; 32], Uuid>>,
}

/// SHA-256 of a secret.
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A fresh random token: 32 bytes, hex.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The token of an `authorization` metadata value (`None`: there was none).
pub fn token(authorization: Option<&str>) -> Result<&str> {
    let value = authorization.ok_or_else(|| {
        Error::Unauthenticated(
            "missing authorization metadata (expected `authorization: Bearer <token>`)".into(),
        )
    })?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            Error::Unauthenticated("authorization metadata must be `Bearer <token>`".into())
        })?;
    Ok(token.trim())
}

/// Which kind of token a caller presented.
enum Kind {
    Api,
    Registration,
    /// A runner credential, verified.
    Runner(Uuid),
}

impl Auth {
    /// Checks against these tokens.
    pub fn new(registration_token: &str, api_tokens: &[String]) -> Auth {
        Auth {
            registration: hash(registration_token),
            api_tokens: api_tokens.iter().map(|t| hash(t)).collect(),
            verified: RwLock::new(HashMap::new()),
        }
    }

    /// What `token` is; UNAUTHENTICATED when it is none of the kinds.
    async fn kind(&self, store: &Store, token: &str) -> Result<Kind> {
        let h = hash(token);
        if self.api_tokens.contains(&h) {
            return Ok(Kind::Api);
        }
        if h == self.registration {
            return Ok(Kind::Registration);
        }
        if let Some(id) = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
        {
            return Ok(Kind::Runner(*id));
        }
        let invalid = || Error::Unauthenticated("invalid token".into());
        let id_part = token
            .strip_prefix(CREDENTIAL_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .ok_or_else(invalid)?;
        let runner_id = Uuid::try_parse(id_part).map_err(|_| invalid())?;
        let row: Option<(String, Option<i64>)> = runner::Entity::find_by_id(runner_id)
            .select_only()
            .column(runner::Column::CredentialHash)
            .column(runner::Column::RevokedAt)
            .into_tuple()
            .one(store.db())
            .await?;
        match row {
            None => Err(Error::unknown_runner(runner_id)),
            Some((stored, _)) if stored != hex::encode(h) => {
                Err(Error::Unauthenticated("invalid runner credential".into()))
            }
            Some((_, Some(_))) => Err(Error::revoked_runner(runner_id)),
            Some((_, None)) => {
                self.verified
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(h, runner_id);
                Ok(Kind::Runner(runner_id))
            }
        }
    }

    /// A JobService or AdminService call (`service` names it): needs an API token.
    pub async fn client(
        &self,
        store: &Store,
        authorization: Option<&str>,
        service: &str,
    ) -> Result<()> {
        match self.kind(store, token(authorization)?).await? {
            Kind::Api => Ok(()),
            Kind::Registration => Err(Error::PermissionDenied(format!(
                "the registration token may only call RunnerService.Register, not {service}: use an API token"
            ))),
            Kind::Runner(id) => Err(Error::PermissionDenied(format!(
                "the credential of runner {id} may only call RunnerService, not {service}: use an API token"
            ))),
        }
    }

    /// `Register`: needs the registration token.
    pub async fn registration(&self, store: &Store, authorization: Option<&str>) -> Result<()> {
        match self.kind(store, token(authorization)?).await? {
            Kind::Registration => Ok(()),
            Kind::Api => Err(Error::PermissionDenied(
                "an API token cannot register a runner: use the registration token".into(),
            )),
            Kind::Runner(id) => Err(Error::PermissionDenied(format!(
                "runner {id} is registered already; Register needs the registration token"
            ))),
        }
    }

    /// Any other RunnerService call: needs a runner credential. Returns the runner id.
    pub async fn runner(&self, store: &Store, authorization: Option<&str>) -> Result<Uuid> {
        match self.kind(store, token(authorization)?).await? {
            Kind::Runner(id) => Ok(id),
            Kind::Api => Err(Error::PermissionDenied(
                "an API token cannot call RunnerService: runners use the credential Register returned".into(),
            )),
            Kind::Registration => Err(Error::PermissionDenied(
                "the registration token may only call RunnerService.Register: use the credential it returned".into(),
            )),
        }
    }

    /// Forgets that `runner_id`'s credential was verified (it was revoked, or the runner is
    /// gone): its next call is checked against the database again.
    pub fn forget(&self, runner_id: Uuid) {
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, id| *id != runner_id);
    }

    /// A new credential for `runner_id`: the credential and the hash to store.
    pub fn issue_credential(runner_id: Uuid) -> (String, String) {
        let credential = format!(
            "{CREDENTIAL_PREFIX}{}_{}",
            runner_id.simple(),
            random_token()
        );
        let stored = hex::encode(hash(&credential));
        (credential, stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_of_the_wrong_kind_are_known_but_not_allowed() {
        let store = Store::memory().await.expect("store");
        let auth = Auth::new("reg", &["api1".into()]);
        let unauthenticated = |r: Result<()>| matches!(r, Err(Error::Unauthenticated(_)));
        let denied = |r: Result<()>| matches!(r, Err(Error::PermissionDenied(_)));
        assert!(unauthenticated(
            auth.client(&store, None, "JobService").await
        ));
        assert!(unauthenticated(
            auth.client(&store, Some("Basic abc"), "JobService").await
        ));
        assert!(unauthenticated(
            auth.client(&store, Some("Bearer nope"), "JobService").await
        ));
        assert!(
            auth.client(&store, Some("Bearer api1"), "JobService")
                .await
                .is_ok()
        );
        assert!(denied(
            auth.client(&store, Some("Bearer reg"), "JobService").await
        ));
        assert!(auth.registration(&store, Some("Bearer reg")).await.is_ok());
        assert!(denied(auth.registration(&store, Some("Bearer api1")).await));
        assert!(matches!(
            auth.runner(&store, Some("Bearer api1")).await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            auth.runner(&store, Some("Bearer reg")).await,
            Err(Error::PermissionDenied(_))
        ));
    }

    #[tokio::test]
    async fn a_credential_of_an_unknown_runner_says_to_register_again() {
        let store = Store::memory().await.expect("store");
        let auth = Auth::new("reg", &["api1".into()]);
        let (credential, _) = Auth::issue_credential(Uuid::now_v7());
        match auth
            .runner(&store, Some(&format!("Bearer {credential}")))
            .await
        {
            Err(Error::Unauthenticated(m)) => assert!(m.contains("register again"), "{m}"),
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    #[test]
    fn credentials_name_their_runner_and_are_stored_hashed() {
        let id = Uuid::now_v7();
        let (credential, stored) = Auth::issue_credential(id);
        assert!(credential.contains(&id.simple().to_string()));
        assert!(!stored.contains(&credential));
        assert_eq!(stored, hex::encode(hash(&credential)));
    }
}
