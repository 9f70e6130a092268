//! The runner's identity, kept in `<state-dir>/runner.json` so that a restarted runner is
//! the same runner: its id, its credential (the file is private to the user), and what it
//! registered with. A runner whose flags changed (labels, capacity, executors, queues, name)
//! or that points at another server registers anew; ids it had before are remembered so that
//! containers they left behind are still cleaned up.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Earlier ids remembered for orphan cleanup.
const MAX_PREVIOUS_IDS: usize = 8;

/// What the runner registered with; a change means a new registration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Server URL.
    pub server: String,
    /// Runner name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Capacity.
    pub capacity: u32,
    /// Executors offered (proto names).
    pub executors: Vec<String>,
    /// Queues served.
    pub queues: Vec<String>,
    /// Whether it said it holds sandboxes (identities saved before sandboxes existed: no).
    #[serde(default)]
    pub sandboxes: bool,
}

/// The stored identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Identity {
    /// Runner id.
    pub runner_id: String,
    /// Per-runner credential.
    pub credential: String,
    /// What it registered with.
    pub registration: Registration,
    /// Ids this state directory had before (newest last).
    #[serde(default)]
    pub previous_ids: Vec<String>,
}

impl Identity {
    /// Every id whose containers this runner may clean up.
    pub fn all_ids(&self) -> Vec<String> {
        let mut ids = self.previous_ids.clone();
        ids.push(self.runner_id.clone());
        ids
    }

    /// Replaces the identity with a new registration, remembering the old id.
    pub fn replace(&mut self, runner_id: String, credential: String, registration: Registration) {
        if !self.runner_id.is_empty() {
            self.previous_ids.push(std::mem::take(&mut self.runner_id));
            let excess = self.previous_ids.len().saturating_sub(MAX_PREVIOUS_IDS);
            self.previous_ids.drain(..excess);
        }
        self.runner_id = runner_id;
        self.credential = credential;
        self.registration = registration;
    }
}

/// Whether the runner must register (anew) before it runs with `wanted`: it has no
/// identity, or registered with other settings. One exception: a runner that registered
/// before it offered sandboxes, and has no registration token to register anew with, keeps
/// its identity (and runs without being given sandboxes) rather than refusing to start.
pub fn must_register(identity: &Identity, wanted: &Registration, has_token: bool) -> bool {
    if identity.runner_id.is_empty() {
        return true;
    }
    if identity.registration == *wanted {
        return false;
    }
    let only_sandboxes = Registration {
        sandboxes: wanted.sandboxes,
        ..identity.registration.clone()
    } == *wanted;
    if only_sandboxes && !has_token {
        tracing::warn!(
            "this runner registered before it offered sandboxes: the server gives it none until it registers anew (start it once with --registration-token)"
        );
        return false;
    }
    true
}

/// The identity file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("runner.json")
}

/// Loads the identity, if one was saved.
pub fn load(state_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let file = path(state_dir);
    match std::fs::read(&file) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a runner identity (remove it to register anew)",
                file.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Saves the identity atomically (written aside, then renamed), readable by its owner only.
pub fn save(state_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    let file = path(state_dir);
    let tmp = state_dir.join("runner.json.tmp");
    let bytes = serde_json::to_vec_pretty(identity)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_remembers_earlier_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("loads").is_none());
        let mut id = Identity::default();
        id.replace("r1".into(), "c1".into(), Registration::default());
        save(dir.path(), &id).expect("saves");
        let mut back = load(dir.path()).expect("loads").expect("present");
        assert_eq!(back.runner_id, "r1");
        back.replace("r2".into(), "c2".into(), Registration::default());
        assert_eq!(back.all_ids(), ["r1", "r2"]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(path(dir.path()), b"not json").expect("write");
        let e = load(dir.path()).unwrap_err();
        assert!(
            format!("{e:#}").contains("is not a runner identity"),
            "{e:#}"
        );
    }

    #[test]
    fn a_runner_registers_anew_when_its_settings_change_but_not_only_to_offer_sandboxes_without_a_token()
     {
        let wanted = Registration {
            capacity: 2,
            sandboxes: true,
            ..Registration::default()
        };
        assert!(must_register(&Identity::default(), &wanted, false));
        let mut id = Identity::default();
        id.replace("r1".into(), "c1".into(), wanted.clone());
        assert!(!must_register(&id, &wanted, true));
        // An identity saved before sandboxes existed reads as not offering them.
        let old: Identity = serde_json::from_str(
            r#"{"runner_id":"r1","credential":"c1","registration":{"server":"","name":"","labels":{},"capacity":2,"executors":[],"queues":[]}}"#,
        )
        .expect("parses");
        assert!(!old.registration.sandboxes);
        assert!(must_register(&old, &wanted, true));
        assert!(!must_register(&old, &wanted, false));
        // Any other change needs a registration, token or not.
        let more = Registration {
            capacity: 3,
            ..wanted
        };
        assert!(must_register(&old, &more, false));
    }
}
