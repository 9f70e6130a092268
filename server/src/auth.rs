//! Authentication. Three kinds of bearer token, all in metadata `authorization: Bearer …`:
//! the registration token (only for `Register`), per-runner credentials (every other runner
//! call; stored as SHA-256 hashes), and API tokens (JobService, AdminService). Health and
//! reflection need none.
use std::{collections::HashMap, sync::RwLock};

use rand::RngCore;
use sea_orm::EntityTrait;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
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

fn bearer(meta: &MetadataMap) -> Result<&str> {
    let value = meta.get("authorization").ok_or_else(|| {
        Error::Unauthenticated(
            "missing authorization metadata (expected `authorization: Bearer <token>`)".into(),
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| Error::Unauthenticated("authorization metadata is not ASCII".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            Error::Unauthenticated("authorization metadata must be `Bearer <token>`".into())
        })?;
    Ok(token.trim())
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

    /// A client or admin call: needs an API token.
    pub fn client(&self, meta: &MetadataMap) -> Result<()> {
        let h = hash(bearer(meta)?);
        if self.api_tokens.contains(&h) {
            Ok(())
        } else {
            Err(Error::Unauthenticated("invalid API token".into()))
        }
    }

    /// `Register`: needs the registration token.
    pub fn registration(&self, meta: &MetadataMap) -> Result<()> {
        if hash(bearer(meta)?) == self.registration {
            Ok(())
        } else {
            Err(Error::Unauthenticated("invalid registration token".into()))
        }
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

    /// A runner call: needs the runner's credential. Returns the runner id.
    pub async fn runner(&self, store: &Store, meta: &MetadataMap) -> Result<Uuid> {
        let credential = bearer(meta)?;
        let h = hash(credential);
        if let Some(id) = self
            .verified
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
        {
            return Ok(*id);
        }
        let invalid = || Error::Unauthenticated("invalid runner credential".into());
        let id_part = credential
            .strip_prefix(CREDENTIAL_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .ok_or_else(invalid)?;
        let runner_id = Uuid::try_parse(id_part).map_err(|_| invalid())?;
        let row = runner::Entity::find_by_id(runner_id)
            .one(store.db())
            .await?
            .ok_or_else(invalid)?;
        if row.credential_hash != hex::encode(h) {
            return Err(invalid());
        }
        self.verified
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h, runner_id);
        Ok(runner_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let auth = Auth::new("reg", &["api1".into()]);
        let mut meta = MetadataMap::new();
        assert!(matches!(auth.client(&meta), Err(Error::Unauthenticated(_))));
        meta.insert("authorization", "Bearer api1".parse().expect("ascii"));
        assert!(auth.client(&meta).is_ok());
        assert!(auth.registration(&meta).is_err());
        meta.insert("authorization", "Bearer reg".parse().expect("ascii"));
        assert!(auth.registration(&meta).is_ok());
        assert!(auth.client(&meta).is_err());
        meta.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert!(auth.client(&meta).is_err());
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
