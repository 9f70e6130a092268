//! Work tokens: the identity of one attempt's work (or one sandbox's). A token names its
//! attempt's lease, so that it is checked against one row, and carries 32 random bytes; the
//! server keeps only its SHA-256 (hex), compared in constant time.
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Prefix of work tokens, so that a leaked one is recognisable.
const PREFIX: &str = "gwt_";

/// A new token for the attempt of `lease`: the token (for the runner) and the hash to store.
pub fn issue(lease: Uuid) -> (String, String) {
    let token = format!("{PREFIX}{}_{}", lease.simple(), crate::auth::random_token());
    let hash = hash_of(&token);
    (token, hash)
}

/// SHA-256 of a token, hex.
pub fn hash_of(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The lease a token names. UNAUTHENTICATED when it is not a work token.
pub fn lease_of(token: &str) -> Result<Uuid> {
    token
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split('_').next())
        .and_then(|id| Uuid::try_parse(id).ok())
        .ok_or_else(|| {
            Error::Unauthenticated(
                "not a work token: WorkService takes the GANTRY_WORK_TOKEN of the work".into(),
            )
        })
}

/// Whether `token` hashes to `stored`, in time independent of where they differ.
pub fn matches(token: &str, stored: &str) -> bool {
    let got = hash_of(token);
    got.len() == stored.len()
        && got
            .bytes()
            .zip(stored.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_lease_and_is_stored_only_hashed() {
        let lease = Uuid::now_v7();
        let (token, hash) = issue(lease);
        assert_eq!(lease_of(&token).expect("lease"), lease);
        assert!(!hash.contains(&token) && !token.contains(&hash));
        assert!(matches(&token, &hash));
        let (other, _) = issue(lease);
        assert!(!matches(&other, &hash), "two tokens of one lease differ");
        assert!(lease_of("grc_abc").is_err());
        assert!(lease_of("gwt_notauuid_x").is_err());
    }
}
