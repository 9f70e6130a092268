//! Job spec validation: every rule a submitted spec must keep, each broken rule reported as
//! `INVALID_ARGUMENT` naming the field. Returns the spec with defaults filled in, which is
//! what gets stored and handed to runners.
use gantry_proto::{ExecutorKind, Input, JobSpec, PullPolicy, RetryPolicy, input};

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
    check_inputs(&mut spec.inputs)?;
    check_outputs(&spec.artifacts)?;
    Ok(spec)
}

/// Inputs and output paths a spec may declare, at most.
pub const MAX_INPUTS: usize = 64;
pub const MAX_OUTPUTS: usize = 64;
/// Longest relative path (an input target, an output path, an artifact name).
pub const MAX_PATH_BYTES: usize = 1024;

/// A path inside the workspace: relative, at most [`MAX_PATH_BYTES`], without NUL, without
/// `..` or empty components (a leading `/` is an absolute path).
pub fn check_relative_path(field: &str, path: &str) -> Result<()> {
    if path.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(invalid(
            field,
            format!("must be at most {MAX_PATH_BYTES} bytes without NUL"),
        ));
    }
    if path.starts_with('/') {
        return Err(invalid(
            field,
            format!("{path:?} is absolute; it must be relative to the workspace"),
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(invalid(
            field,
            format!("{path:?} leaves the workspace: `..` is not allowed"),
        ));
    }
    if path.split('/').any(|c| c.is_empty() || c == ".") && path != "." {
        return Err(invalid(
            field,
            format!("{path:?} has an empty or `.` component"),
        ));
    }
    Ok(())
}

/// Every blob input of `inputs` must be stored: INVALID_ARGUMENT naming the first that is not.
pub async fn check_inputs_exist(
    db: &impl sea_orm::ConnectionTrait,
    inputs: &[Input],
    field: &str,
) -> Result<()> {
    for (i, input) in inputs.iter().enumerate() {
        if let Some(input::Source::BlobDigest(d)) = &input.source {
            let name = format!("{field}[{i}].blob_digest");
            let digest = crate::blobs::parse_digest(&name, d)?;
            if <crate::store::entity::blob::Entity as sea_orm::EntityTrait>::find_by_id(
                digest.clone(),
            )
            .one(db)
            .await?
            .is_none()
            {
                return Err(Error::invalid(
                    name,
                    format!(
                        "unknown digest {digest}: upload the bytes first (JobService.UploadBlob, `gantry blob put`)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The rows that keep a spec's blob inputs from retention while its job exists.
pub fn input_rows(
    job_id: uuid::Uuid,
    spec: &JobSpec,
) -> Vec<crate::store::entity::job_input::ActiveModel> {
    use sea_orm::IntoActiveModel as _;
    spec.inputs
        .iter()
        .enumerate()
        .filter_map(|(i, input)| match &input.source {
            Some(input::Source::BlobDigest(d)) => Some(
                crate::store::entity::job_input::Model {
                    job_id,
                    idx: i32::try_from(i).unwrap_or(i32::MAX),
                    digest: d.clone(),
                }
                .into_active_model(),
            ),
            _ => None,
        })
        .collect()
}

fn check_inputs(inputs: &mut [Input]) -> Result<()> {
    if inputs.len() > MAX_INPUTS {
        return Err(invalid(
            "spec.inputs",
            format!("at most {MAX_INPUTS} inputs"),
        ));
    }
    let mut paths = std::collections::HashSet::new();
    for (i, input) in inputs.iter_mut().enumerate() {
        let field = format!("spec.inputs[{i}]");
        check_relative_path(&format!("{field}.path"), &input.path)?;
        if !paths.insert(input.path.clone()) {
            return Err(invalid(
                format!("{field}.path"),
                format!("{:?} is the target of an earlier input", input.path),
            ));
        }
        match &mut input.source {
            None => {
                return Err(invalid(
                    format!("{field}.source"),
                    "is required: an artifact (job id and name) or a blob digest",
                ));
            }
            Some(input::Source::Artifact(a)) => {
                if uuid::Uuid::try_parse(&a.job_id).is_err() {
                    return Err(invalid(
                        format!("{field}.artifact.job_id"),
                        format!("{:?} is not a UUID", a.job_id),
                    ));
                }
                check_relative_path(&format!("{field}.artifact.name"), &a.name)?;
            }
            Some(input::Source::BlobDigest(d)) => {
                // Stored as the blob store addresses it (lower-case hex).
                *d = crate::blobs::parse_digest(&format!("{field}.blob_digest"), d)?;
            }
        }
    }
    Ok(())
}

fn check_outputs(outputs: &[String]) -> Result<()> {
    if outputs.len() > MAX_OUTPUTS {
        return Err(invalid(
            "spec.artifacts",
            format!("at most {MAX_OUTPUTS} output paths"),
        ));
    }
    for (i, path) in outputs.iter().enumerate() {
        check_relative_path(&format!("spec.artifacts[{i}]"), path)?;
    }
    Ok(())
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
