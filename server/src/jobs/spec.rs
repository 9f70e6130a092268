//! Job spec validation: every rule a submitted spec must keep, each broken rule reported as
//! `INVALID_ARGUMENT` naming the field. Returns the spec with defaults filled in, which is
//! what gets stored and handed to runners.
use gantry_proto::{ExecutorKind, JobSpec, PullPolicy, RetryPolicy};

use crate::error::{Error, Result};

/// Queue of a job that names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Longest allowed timeout: seven days.
pub const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3600;
/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Longest backoff: one day.
pub const MAX_BACKOFF_MS: u32 = 86_400_000;
/// Grace between stop signal and kill when the spec names none.
pub const DEFAULT_CANCEL_GRACE_SECONDS: u32 = 10;

const MAX_LIST: usize = 256;
const MAX_ARG_BYTES: usize = 128 * 1024;
const MAX_ENV_VALUE_BYTES: usize = 128 * 1024;
const MAX_METADATA: usize = 64;
const MAX_METADATA_VALUE_BYTES: usize = 4096;
const MAX_LABELS: usize = 64;
const MAX_KEY_BYTES: usize = 255;
const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;

fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Error {
    Error::invalid(field, rule)
}

/// Label key syntax: `[a-z0-9][a-z0-9._/-]*`, 1..=63 bytes.
pub fn check_label_key(field: &str, key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'/' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "label key {key:?} must be 1..=63 bytes of [a-z0-9._/-] starting with [a-z0-9]"
            ),
        ))
    }
}

/// Label value syntax: `[A-Za-z0-9._/-]*`, at most `max` bytes.
pub fn check_label_value(field: &str, value: &str, max: usize) -> Result<()> {
    let ok = value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value:?} must be at most {max} bytes of [A-Za-z0-9._/-]"),
        ))
    }
}

/// Checks a label map (job requirements or runner labels).
pub fn check_labels(field: &str, labels: &std::collections::HashMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(field, format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        check_label_key(field, k)?;
        check_label_value(&format!("{field}[{k}]"), v, 63)?;
    }
    Ok(())
}

fn check_name(field: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    check_label_value(field, value, max)
}

fn check_strings(field: &str, items: &[String]) -> Result<()> {
    if items.len() > MAX_LIST {
        return Err(invalid(field, format!("at most {MAX_LIST} entries")));
    }
    for (i, item) in items.iter().enumerate() {
        if item.len() > MAX_ARG_BYTES {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!("at most {MAX_ARG_BYTES} bytes"),
            ));
        }
        if item.contains('\0') {
            return Err(invalid(format!("{field}[{i}]"), "must not contain NUL"));
        }
    }
    Ok(())
}

/// Validates `spec` and fills in defaults (`queue`, `executor`, `timeout_seconds`,
/// `cancel_grace_seconds`, `pull_policy`, retry).
pub fn validate(spec: Option<JobSpec>, default_timeout_seconds: u32) -> Result<JobSpec> {
    let mut spec = spec.ok_or_else(|| invalid("spec", "is required"))?;

    let executor = ExecutorKind::try_from(spec.executor).map_err(|_| {
        invalid(
            "spec.executor",
            format!("unknown executor {}", spec.executor),
        )
    })?;
    let executor = match executor {
        ExecutorKind::Unspecified if spec.image.is_empty() => ExecutorKind::Process,
        ExecutorKind::Unspecified => ExecutorKind::Docker,
        other => other,
    };
    spec.executor = executor as i32;
    match executor {
        ExecutorKind::Docker => {
            if spec.image.is_empty() {
                return Err(invalid("spec.image", "is required for the docker executor"));
            }
        }
        ExecutorKind::Process => {
            if !spec.image.is_empty() {
                return Err(invalid(
                    "spec.image",
                    "must be empty for the process executor (use spec.command)",
                ));
            }
            if spec.command.first().is_none_or(|c| c.is_empty()) {
                return Err(invalid(
                    "spec.command",
                    "is required for the process executor (the program to run)",
                ));
            }
        }
        ExecutorKind::Unspecified => unreachable!("resolved above"),
    }
    if spec.image.len() > 512
        || spec
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "spec.image",
            "must be at most 512 bytes without whitespace",
        ));
    }
    check_strings("spec.command", &spec.command)?;
    check_strings("spec.args", &spec.args)?;

    if spec.env.len() > MAX_LIST {
        return Err(invalid("spec.env", format!("at most {MAX_LIST} variables")));
    }
    for (name, value) in &spec.env {
        let valid_name = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && name.len() <= 255;
        if !valid_name {
            return Err(invalid(
                "spec.env",
                format!(
                    "variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]* (up to 255 bytes)"
                ),
            ));
        }
        if value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
            return Err(invalid(
                format!("spec.env[{name}]"),
                format!("value must be at most {MAX_ENV_VALUE_BYTES} bytes without NUL"),
            ));
        }
    }
    if spec.working_dir.len() > 4096 || spec.working_dir.contains('\0') {
        return Err(invalid(
            "spec.working_dir",
            "must be at most 4096 bytes without NUL",
        ));
    }
    if !spec.working_dir.is_empty() && !spec.working_dir.starts_with('/') {
        return Err(invalid("spec.working_dir", "must be an absolute path"));
    }

    if spec.queue.is_empty() {
        spec.queue = DEFAULT_QUEUE.to_string();
    }
    check_name("spec.queue", &spec.queue, 63)?;
    check_labels("spec.labels", &spec.labels)?;

    if !(-1000..=1000).contains(&spec.priority) {
        return Err(invalid("spec.priority", "must be within -1000..=1000"));
    }
    if spec.timeout_seconds == 0 {
        spec.timeout_seconds = default_timeout_seconds;
    }
    if spec.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(invalid(
            "spec.timeout_seconds",
            format!("must be at most {MAX_TIMEOUT_SECONDS} (7 days)"),
        ));
    }

    let mut retry = spec.retry.take().unwrap_or_default();
    if retry.max_attempts == 0 {
        retry.max_attempts = 1;
    }
    if retry.max_attempts > MAX_ATTEMPTS {
        return Err(invalid(
            "spec.retry.max_attempts",
            format!("must be at most {MAX_ATTEMPTS}"),
        ));
    }
    if retry.initial_backoff_ms > MAX_BACKOFF_MS {
        return Err(invalid(
            "spec.retry.initial_backoff_ms",
            format!("must be at most {MAX_BACKOFF_MS} (one day)"),
        ));
    }
    if retry.max_backoff_ms == 0 {
        retry.max_backoff_ms = MAX_BACKOFF_MS;
    }
    if retry.max_backoff_ms > MAX_BACKOFF_MS {
        return Err(invalid(
            "spec.retry.max_backoff_ms",
            format!("must be at most {MAX_BACKOFF_MS} (one day)"),
        ));
    }
    if retry.max_backoff_ms < retry.initial_backoff_ms {
        return Err(invalid(
            "spec.retry.max_backoff_ms",
            "must not be below spec.retry.initial_backoff_ms",
        ));
    }
    spec.retry = Some(RetryPolicy { ..retry });

    if !spec.lock_key.is_empty() {
        check_label_value("spec.lock_key", &spec.lock_key, MAX_KEY_BYTES)?;
    }
    crate::error::check_text("spec.idempotency_key", &spec.idempotency_key, MAX_KEY_BYTES)?;
    if let Some(res) = &spec.resources
        && res.memory_bytes != 0
        && res.memory_bytes < MIN_MEMORY_BYTES
    {
        return Err(invalid(
            "spec.resources.memory_bytes",
            format!("must be 0 (no limit) or at least {MIN_MEMORY_BYTES} (4 MiB)"),
        ));
    }
    if spec.metadata.len() > MAX_METADATA {
        return Err(invalid(
            "spec.metadata",
            format!("at most {MAX_METADATA} entries"),
        ));
    }
    for (k, v) in &spec.metadata {
        if k.is_empty() || k.len() > 255 {
            return Err(invalid("spec.metadata", "keys must be 1..=255 bytes"));
        }
        if v.len() > MAX_METADATA_VALUE_BYTES {
            return Err(invalid(
                format!("spec.metadata[{k}]"),
                format!("must be at most {MAX_METADATA_VALUE_BYTES} bytes"),
            ));
        }
    }
    PullPolicy::try_from(spec.pull_policy).map_err(|_| {
        invalid(
            "spec.pull_policy",
            format!("unknown pull policy {}", spec.pull_policy),
        )
    })?;
    if spec.pull_policy == PullPolicy::Unspecified as i32 {
        spec.pull_policy = PullPolicy::IfNotPresent as i32;
    }
    if spec.cancel_grace_seconds == 0 {
        spec.cancel_grace_seconds = DEFAULT_CANCEL_GRACE_SECONDS;
    }
    if spec.cancel_grace_seconds > 3600 {
        return Err(invalid("spec.cancel_grace_seconds", "must be at most 3600"));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(cmd: &str) -> JobSpec {
        JobSpec {
            command: vec![cmd.into()],
            ..Default::default()
        }
    }

    fn field_of(r: Result<JobSpec>) -> String {
        match r {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected an invalid-argument error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = validate(Some(process("true")), 3600).expect("valid");
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.executor, ExecutorKind::Process as i32);
        assert_eq!(spec.timeout_seconds, 3600);
        assert_eq!(spec.retry.expect("retry").max_attempts, 1);
        let docker = validate(
            Some(JobSpec {
                image: "alpine".into(),
                ..Default::default()
            }),
            60,
        )
        .expect("valid");
        assert_eq!(docker.executor, ExecutorKind::Docker as i32);
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        assert_eq!(field_of(validate(None, 60)), "spec");
        assert_eq!(
            field_of(validate(Some(JobSpec::default()), 60)),
            "spec.command"
        );
        let mut s = process("x");
        s.labels.insert("Bad Key".into(), "v".into());
        assert_eq!(field_of(validate(Some(s), 60)), "spec.labels");
        let mut s = process("x");
        s.timeout_seconds = MAX_TIMEOUT_SECONDS + 1;
        assert_eq!(field_of(validate(Some(s), 60)), "spec.timeout_seconds");
        let mut s = process("x");
        s.retry = Some(RetryPolicy {
            max_attempts: 1000,
            ..Default::default()
        });
        assert_eq!(field_of(validate(Some(s), 60)), "spec.retry.max_attempts");
        let mut s = process("x");
        s.priority = 5000;
        assert_eq!(field_of(validate(Some(s), 60)), "spec.priority");
        let mut s = process("x");
        s.env.insert("1BAD".into(), "v".into());
        assert_eq!(field_of(validate(Some(s), 60)), "spec.env");
        let mut s = process("x");
        s.executor = 99;
        assert_eq!(field_of(validate(Some(s), 60)), "spec.executor");
        let mut s = process("x");
        s.lock_key = "has space".into();
        assert_eq!(field_of(validate(Some(s), 60)), "spec.lock_key");
        let s = JobSpec {
            executor: ExecutorKind::Docker as i32,
            ..Default::default()
        };
        assert_eq!(field_of(validate(Some(s), 60)), "spec.image");
    }
}
