//! How things look: tables and colours for people, stable JSON for programs.
//!
//! The JSON of a job, an event, a runner or the stats uses the proto's field names, enum
//! values as lower-case names (`"succeeded"`, `"runner_lost"`), times as Unix milliseconds in
//! fields named `*_unix_ms`; absent optional values are `null`. Fields are only ever added.
//! Blobs are `{"digest": "sha256:…", "size": N}`; bytes are base64 in fields named
//! `*_base64`.
use std::io::IsTerminal as _;

use base64::Engine as _;
use gantry_proto as pb;
use serde_json::{Value, json};

/// Whether to colour output: stdout is a terminal and `NO_COLOR` is unset.
pub fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `text` in the colour of `status` (when colouring).
pub fn paint_status(status: pb::JobStatus, text: &str, colour: bool) -> String {
    let code = match status {
        pb::JobStatus::Succeeded => "32",
        pb::JobStatus::Failed | pb::JobStatus::TimedOut => "31",
        pb::JobStatus::Canceled | pb::JobStatus::Canceling => "33",
        pb::JobStatus::Running | pb::JobStatus::Assigned => "36",
        _ => "2",
    };
    paint(code, text, colour)
}

/// `text` in the colour of a sandbox's `status` (when colouring): running green, on its way
/// cyan, deleting yellow, failed red, pending and deleted dim.
pub fn paint_sandbox_status(status: i32, text: &str, colour: bool) -> String {
    let code = match pb::SandboxStatus::try_from(status).unwrap_or_default() {
        pb::SandboxStatus::Running => "32",
        pb::SandboxStatus::Creating | pb::SandboxStatus::Starting => "36",
        pb::SandboxStatus::Deleting => "33",
        pb::SandboxStatus::Failed => "31",
        _ => "2",
    };
    paint(code, text, colour)
}

/// `text` in the colour of a command's `status` (when colouring), as a job's.
pub fn paint_command_status(status: i32, text: &str, colour: bool) -> String {
    let code = match pb::CommandStatus::try_from(status).unwrap_or_default() {
        pb::CommandStatus::Succeeded => "32",
        pb::CommandStatus::Failed | pb::CommandStatus::TimedOut => "31",
        pb::CommandStatus::Canceled | pb::CommandStatus::Canceling => "33",
        pb::CommandStatus::Running => "36",
        _ => "2",
    };
    paint(code, text, colour)
}

/// `text` in the ANSI colour `code` (when colouring).
fn paint(code: &str, text: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `JOB_STATUS_TIMED_OUT` → `timed_out`.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A job status as users read it.
pub fn status_name(s: i32) -> String {
    pb::JobStatus::try_from(s).map_or_else(
        |_| s.to_string(),
        |s| enum_name(s.as_str_name(), "JOB_STATUS_"),
    )
}

/// A sandbox status as users read it (`running`).
pub fn sandbox_status_name(s: i32) -> String {
    pb::SandboxStatus::try_from(s).map_or_else(
        |_| s.to_string(),
        |s| enum_name(s.as_str_name(), "SANDBOX_STATUS_"),
    )
}

/// A command status as users read it (`timed_out`).
pub fn command_status_name(s: i32) -> String {
    pb::CommandStatus::try_from(s).map_or_else(
        |_| s.to_string(),
        |s| enum_name(s.as_str_name(), "COMMAND_STATUS_"),
    )
}

/// Whether a sandbox in this status has ended (DELETED or FAILED).
pub fn sandbox_ended(s: i32) -> bool {
    s == pb::SandboxStatus::Deleted as i32 || s == pb::SandboxStatus::Failed as i32
}

/// Whether a command in this status has ended.
pub fn command_ended(s: i32) -> bool {
    s >= pb::CommandStatus::Succeeded as i32
}

fn pull_policy_name(s: i32) -> String {
    pb::PullPolicy::try_from(s).map_or_else(
        |_| s.to_string(),
        |k| enum_name(k.as_str_name(), "PULL_POLICY_"),
    )
}

/// A failure kind as users read it (`runner_lost`); `None` for no failure.
pub fn failure_name(s: i32) -> Option<String> {
    match pb::FailureKind::try_from(s) {
        Ok(pb::FailureKind::Unspecified) => None,
        Ok(k) => Some(enum_name(k.as_str_name(), "FAILURE_KIND_")),
        Err(_) => Some(s.to_string()),
    }
}

fn executor_name(s: i32) -> String {
    pb::ExecutorKind::try_from(s).map_or_else(
        |_| s.to_string(),
        |k| enum_name(k.as_str_name(), "EXECUTOR_KIND_"),
    )
}

/// An executor phase as users read it.
pub fn phase_name(s: i32) -> String {
    pb::ExecutorPhase::try_from(s).map_or_else(
        |_| s.to_string(),
        |k| enum_name(k.as_str_name(), "EXECUTOR_PHASE_"),
    )
}

/// A storage limit as users write it (`log_bytes`).
pub fn limit_name(s: i32) -> String {
    pb::StorageLimit::try_from(s).map_or_else(
        |_| s.to_string(),
        |k| enum_name(k.as_str_name(), "STORAGE_LIMIT_"),
    )
}

fn runner_state_name(s: i32) -> String {
    pb::RunnerState::try_from(s).map_or_else(
        |_| s.to_string(),
        |k| enum_name(k.as_str_name(), "RUNNER_STATE_"),
    )
}

fn nonzero(ms: i64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

fn progress_json(p: &Option<pb::Progress>) -> Value {
    match p {
        Some(p) => json!({"percent": p.percent, "stage": p.stage, "message": p.message}),
        None => Value::Null,
    }
}

/// A blob as JSON (`null` when absent).
pub fn blob_json(b: Option<&pb::Blob>) -> Value {
    match b {
        Some(b) => json!({"digest": b.digest, "size": b.size}),
        None => Value::Null,
    }
}

/// The fields of a declared input as JSON: its path, and its source as `artifact`
/// (`{"job_id", "name"}`) or `blob_digest`, the other `null`.
fn input_fields(i: &pb::Input) -> serde_json::Map<String, Value> {
    let (artifact, blob_digest) = match &i.source {
        Some(pb::input::Source::Artifact(a)) => {
            (json!({"job_id": a.job_id, "name": a.name}), Value::Null)
        }
        Some(pb::input::Source::BlobDigest(d)) => (Value::Null, json!(d)),
        None => (Value::Null, Value::Null),
    };
    let mut m = serde_json::Map::new();
    m.insert("path".into(), json!(i.path));
    m.insert("artifact".into(), artifact);
    m.insert("blob_digest".into(), blob_digest);
    m
}

/// A declared input as JSON.
pub fn input_json(i: &pb::Input) -> Value {
    Value::Object(input_fields(i))
}

/// A resolved input as JSON: the input's fields, its `index`, its `blob` (or `null`) and why
/// it is `unavailable` (or `null`).
pub fn resolved_input_json(r: &pb::ResolvedInput) -> Value {
    let mut m = r.input.as_ref().map(input_fields).unwrap_or_default();
    m.insert("index".into(), json!(r.index));
    m.insert("blob".into(), blob_json(r.blob.as_ref()));
    m.insert(
        "unavailable".into(),
        json!((!r.unavailable.is_empty()).then_some(&r.unavailable)),
    );
    Value::Object(m)
}

/// Where an input comes from, as `--input` takes it: `JOB:NAME` or `sha256:…`.
pub fn input_source(i: &pb::Input) -> String {
    match &i.source {
        Some(pb::input::Source::Artifact(a)) => format!("{}:{}", a.job_id, a.name),
        Some(pb::input::Source::BlobDigest(d)) => d.clone(),
        None => "-".into(),
    }
}

/// An input as `--input` takes it: `PATH=JOB:NAME` or `PATH=sha256:…`.
pub fn input_line(i: &pb::Input) -> String {
    format!("{}={}", i.path, input_source(i))
}

/// An artifact as JSON.
pub fn artifact_json(a: &pb::Artifact) -> Value {
    json!({
        "job_id": a.job_id,
        "name": a.name,
        "size": a.blob.as_ref().map_or(0, |b| b.size),
        "digest": a.blob.as_ref().map(|b| &b.digest),
        "attempt": a.attempt,
        "created_at_unix_ms": a.created_at_unix_ms,
    })
}

/// A job's result as JSON: `content_type`, `size`, the bytes as `data` when they are UTF-8
/// (else `null`) and always as `data_base64`.
pub fn result_json(r: &pb::JobResult) -> Value {
    json!({
        "content_type": r.content_type,
        "size": r.data.len(),
        "data": std::str::from_utf8(&r.data).ok(),
        "data_base64": base64::engine::general_purpose::STANDARD.encode(&r.data),
        "set_at_unix_ms": nonzero(r.set_at_unix_ms),
        "attempt": r.attempt,
    })
}

/// A job as JSON.
pub fn job_json(job: &pb::Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    json!({
        "id": job.id,
        "status": status_name(job.status),
        "failure_kind": failure_name(job.failure_kind),
        "failure_message": (!job.failure_message.is_empty()).then_some(&job.failure_message),
        "exit_code": job.exit_code,
        "attempt_count": job.attempt_count,
        "runner_id": (!job.runner_id.is_empty()).then_some(&job.runner_id),
        "created_at_unix_ms": job.created_at_unix_ms,
        "updated_at_unix_ms": job.updated_at_unix_ms,
        "finished_at_unix_ms": nonzero(job.finished_at_unix_ms),
        "not_before_unix_ms": nonzero(job.not_before_unix_ms),
        "progress": progress_json(&job.progress),
        "retried_from_job_id": (!job.retried_from_job_id.is_empty()).then_some(&job.retried_from_job_id),
        "parent_job_id": (!job.parent_job_id.is_empty()).then_some(&job.parent_job_id),
        "result": job.result.as_ref().map(result_json),
        "spec": {
            "executor": executor_name(spec.executor),
            "image": (!spec.image.is_empty()).then_some(&spec.image),
            "command": spec.command,
            "args": spec.args,
            "env": spec.env,
            "working_dir": (!spec.working_dir.is_empty()).then_some(&spec.working_dir),
            "queue": spec.queue,
            "labels": spec.labels,
            "priority": spec.priority,
            "timeout_seconds": spec.timeout_seconds,
            "max_attempts": spec.retry.map_or(1, |r| r.max_attempts.max(1)),
            "lock_key": (!spec.lock_key.is_empty()).then_some(&spec.lock_key),
            "idempotency_key": (!spec.idempotency_key.is_empty()).then_some(&spec.idempotency_key),
            "metadata": spec.metadata,
            "inputs": spec.inputs.iter().map(input_json).collect::<Vec<_>>(),
            "artifacts": spec.artifacts,
        },
        "attempts": job.attempts.iter().map(|a| json!({
            "number": a.number,
            "runner_id": a.runner_id,
            "status": status_name(a.status),
            "exit_code": a.exit_code,
            "failure_kind": failure_name(a.failure_kind),
            "failure_message": (!a.failure_message.is_empty()).then_some(&a.failure_message),
            "container_id": (!a.container_id.is_empty()).then_some(&a.container_id),
            "assigned_at_unix_ms": a.assigned_at_unix_ms,
            "started_at_unix_ms": nonzero(a.started_at_unix_ms),
            "finished_at_unix_ms": nonzero(a.finished_at_unix_ms),
        })).collect::<Vec<_>>(),
    })
}

/// A sandbox as JSON.
pub fn sandbox_json(sb: &pb::Sandbox) -> Value {
    let spec = sb.spec.clone().unwrap_or_default();
    json!({
        "id": sb.id,
        "status": sandbox_status_name(sb.status),
        "failure_kind": failure_name(sb.failure_kind),
        "message": (!sb.message.is_empty()).then_some(&sb.message),
        "runner_id": (!sb.runner_id.is_empty()).then_some(&sb.runner_id),
        "container_id": (!sb.container_id.is_empty()).then_some(&sb.container_id),
        "command_count": sb.command_count,
        "created_at_unix_ms": sb.created_at_unix_ms,
        "started_at_unix_ms": nonzero(sb.started_at_unix_ms),
        "finished_at_unix_ms": nonzero(sb.finished_at_unix_ms),
        "last_activity_at_unix_ms": nonzero(sb.last_activity_at_unix_ms),
        "expires_at_unix_ms": nonzero(sb.expires_at_unix_ms),
        "last_event_sequence": sb.last_event_sequence,
        "spec": {
            "executor": executor_name(spec.executor),
            "image": (!spec.image.is_empty()).then_some(&spec.image),
            "env": spec.env,
            "working_dir": (!spec.working_dir.is_empty()).then_some(&spec.working_dir),
            "queue": spec.queue,
            "labels": spec.labels,
            "resources": spec.resources.map(|r| json!({
                "memory_bytes": r.memory_bytes,
                "cpu_millis": r.cpu_millis,
            })),
            "lock_key": (!spec.lock_key.is_empty()).then_some(&spec.lock_key),
            "idle_timeout_seconds": spec.idle_timeout_seconds,
            "max_lifetime_seconds": spec.max_lifetime_seconds,
            "one_shot": spec.one_shot,
            "pull_policy": pull_policy_name(spec.pull_policy),
            "cancel_grace_seconds": spec.cancel_grace_seconds,
            "metadata": spec.metadata,
            "inputs": spec.inputs.iter().map(input_json).collect::<Vec<_>>(),
            "artifacts": spec.artifacts,
        },
    })
}

/// A sandbox's command as JSON.
pub fn command_json(cmd: &pb::SandboxCommand) -> Value {
    let spec = cmd.spec.clone().unwrap_or_default();
    json!({
        "id": cmd.id,
        "sandbox_id": cmd.sandbox_id,
        "number": cmd.number,
        "status": command_status_name(cmd.status),
        "exit_code": cmd.exit_code,
        "failure_kind": failure_name(cmd.failure_kind),
        "failure_message": (!cmd.failure_message.is_empty()).then_some(&cmd.failure_message),
        "created_at_unix_ms": cmd.created_at_unix_ms,
        "started_at_unix_ms": nonzero(cmd.started_at_unix_ms),
        "finished_at_unix_ms": nonzero(cmd.finished_at_unix_ms),
        "progress": progress_json(&cmd.progress),
        "stdout_bytes": cmd.stdout_bytes,
        "stderr_bytes": cmd.stderr_bytes,
        "stdin_bytes": cmd.stdin_bytes,
        "spec": {
            "argv": spec.argv,
            "env": spec.env,
            "working_dir": (!spec.working_dir.is_empty()).then_some(&spec.working_dir),
            "timeout_seconds": spec.timeout_seconds,
            "idempotency_key": (!spec.idempotency_key.is_empty()).then_some(&spec.idempotency_key),
        },
    })
}

/// An event of a sandbox's trail as JSON: [`event_json`] with the sandbox's id as
/// `sandbox_id` (its trail carries it in `job_id`).
pub fn sandbox_event_json(e: &pb::JobEvent) -> Value {
    let mut v = event_json(e);
    if let Some(o) = v.as_object_mut()
        && let Some(id) = o.remove("job_id")
    {
        o.insert("sandbox_id".into(), id);
    }
    v
}

/// An event as JSON.
pub fn event_json(e: &pb::JobEvent) -> Value {
    let mut v = json!({
        "job_id": e.job_id,
        "sequence": e.sequence,
        "at_unix_ms": e.at_unix_ms,
        "attempt": e.attempt,
    });
    let kind = match &e.kind {
        Some(pb::job_event::Kind::Status(s)) => json!({"type": "status",
            "from": status_name(s.from), "to": status_name(s.to),
            "failure_kind": failure_name(s.failure_kind), "message": s.message, "exit_code": s.exit_code}),
        Some(pb::job_event::Kind::Progress(p)) => json!({"type": "progress",
            "percent": p.percent, "stage": p.stage, "message": p.message}),
        Some(pb::job_event::Kind::Phase(p)) => json!({"type": "phase",
            "phase": phase_name(p.phase), "message": p.message}),
        Some(pb::job_event::Kind::Limit(l)) => json!({"type": "limit",
            "limit": limit_name(l.limit), "value": l.value, "message": l.message}),
        Some(pb::job_event::Kind::Sandbox(s)) => json!({"type": "sandbox",
            "from": sandbox_status_name(s.from), "to": sandbox_status_name(s.to),
            "failure_kind": failure_name(s.failure_kind), "message": s.message,
            "runner_id": (!s.runner_id.is_empty()).then_some(&s.runner_id),
            "container_id": (!s.container_id.is_empty()).then_some(&s.container_id)}),
        Some(pb::job_event::Kind::Command(c)) => json!({"type": "command",
            "command_id": c.command_id, "number": c.number,
            "status": command_status_name(c.status), "failure_kind": failure_name(c.failure_kind),
            "message": c.message, "exit_code": c.exit_code, "progress": progress_json(&c.progress)}),
        Some(pb::job_event::Kind::Work(w)) => json!({"type": "work",
            "kind": w.kind, "message": w.message, "fields": w.fields}),
        Some(pb::job_event::Kind::Artifact(a)) => json!({"type": "artifact",
            "name": a.name, "blob": blob_json(a.blob.as_ref()),
            "error": (!a.error.is_empty()).then_some(&a.error)}),
        Some(pb::job_event::Kind::Result(r)) => json!({"type": "result",
            "size": r.size, "content_type": r.content_type}),
        None => json!({"type": "unknown"}),
    };
    if let (Some(v), Some(k)) = (v.as_object_mut(), kind.as_object()) {
        v.extend(k.clone());
    }
    v
}

/// A runner as JSON.
pub fn runner_json(r: &pb::Runner) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "state": runner_state_name(r.state),
        "labels": r.labels,
        "capacity": r.capacity,
        "active_jobs": r.active_jobs,
        "executors": r.executors.iter().map(|e| executor_name(*e)).collect::<Vec<_>>(),
        "queues": r.queues,
        "version": r.version,
        "hostname": r.hostname,
        "last_heartbeat_unix_ms": r.last_heartbeat_unix_ms,
        "registered_at_unix_ms": r.registered_at_unix_ms,
    })
}

/// Stats as JSON.
pub fn stats_json(s: &pb::GetStatsResponse) -> Value {
    json!({
        "jobs_by_status": s.jobs_by_status.iter().map(|c| (status_name(c.status), json!(c.count))).collect::<serde_json::Map<_, _>>(),
        "queues": s.queues.iter().map(|q| json!({"queue": q.queue, "queued": q.queued, "active": q.active})).collect::<Vec<_>>(),
        "runners_by_state": s.runners_by_state.iter().map(|c| (runner_state_name(c.state), json!(c.count))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long ago `unix_ms` was, briefly (`3s`, `5m`, `2h`, `4d`).
pub fn ago(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    span((now_unix_ms() - unix_ms) / 1000)
}

/// How long until `unix_ms`, briefly (`5m`); `0s` once it has passed.
pub fn until(unix_ms: i64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    span((unix_ms - now_unix_ms()) / 1000)
}

/// Seconds, briefly and rounded down: `3s`, `5m`, `2h`, `4d`.
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// What a job runs, in one short line.
pub fn what(spec: &pb::JobSpec) -> String {
    let mut parts = Vec::new();
    if !spec.image.is_empty() {
        parts.push(format!("[{}]", spec.image));
    }
    parts.extend(spec.command.iter().chain(&spec.args).cloned());
    short_line(&parts)
}

/// Words joined into one line of at most 48 characters.
pub fn short_line(parts: &[String]) -> String {
    let line = parts.join(" ").replace('\n', " ");
    if line.chars().count() > 48 {
        format!("{}…", line.chars().take(47).collect::<String>())
    } else {
        line
    }
}

/// Where a sandbox's commands run, in one short line: `docker alpine:3`, `process`.
pub fn sandbox_executor(spec: &pb::SandboxSpec) -> String {
    let executor = executor_name(spec.executor);
    if spec.image.is_empty() {
        executor
    } else {
        short_line(&[executor, spec.image.clone()])
    }
}

/// A table with aligned columns. Cells may carry colour codes; widths count visible text.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<(String, usize)>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row of (shown text, visible width).
    pub fn row(&mut self, cells: Vec<(String, usize)>) {
        self.rows.push(cells);
    }

    /// Adds a row of plain cells.
    pub fn plain(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| {
                    let w = c.chars().count();
                    (c, w)
                })
                .collect(),
        );
    }

    /// Prints it.
    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (_, w)) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(*w);
                }
            }
        }
        let line = |cells: Vec<(String, usize)>| {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, (text, w)) in cells.into_iter().enumerate() {
                out.push_str(&text);
                if i < last {
                    out.push_str(&" ".repeat(widths[i].saturating_sub(w) + 2));
                }
            }
            println!("{}", out.trim_end());
        };
        line(
            self.header
                .iter()
                .map(|h| (h.clone(), h.chars().count()))
                .collect(),
        );
        for row in &self.rows {
            line(row.clone());
        }
    }
}

/// A plain cell: its text and visible width.
pub fn cell(text: String) -> (String, usize) {
    let width = text.chars().count();
    (text, width)
}

/// A status cell (coloured when colouring).
pub fn status_cell(status: i32, colour: bool) -> (String, usize) {
    let name = status_name(status);
    let width = name.chars().count();
    let s = pb::JobStatus::try_from(status).unwrap_or_default();
    (paint_status(s, &name, colour), width)
}

/// A sandbox status cell (coloured when colouring).
pub fn sandbox_status_cell(status: i32, colour: bool) -> (String, usize) {
    let name = sandbox_status_name(status);
    let width = name.chars().count();
    (paint_sandbox_status(status, &name, colour), width)
}

/// A command status cell (coloured when colouring).
pub fn command_status_cell(status: i32, colour: bool) -> (String, usize) {
    let name = command_status_name(status);
    let width = name.chars().count();
    (paint_command_status(status, &name, colour), width)
}

/// Describes a failure for people: `failed (exit_nonzero, exit code 3): exited with code 3`.
pub fn outcome_line(job: &pb::Job) -> String {
    outcome(
        status_name(job.status),
        job.failure_kind,
        job.exit_code,
        &job.failure_message,
    )
}

/// How a sandbox is, for people: `deleted (timeout): lifetime of 1d reached`.
pub fn sandbox_outcome_line(sb: &pb::Sandbox) -> String {
    outcome(
        sandbox_status_name(sb.status),
        sb.failure_kind,
        None,
        &sb.message,
    )
}

/// How a command is, for people: `timed_out (timeout): ran past 60 s`.
pub fn command_outcome_line(cmd: &pb::SandboxCommand) -> String {
    outcome(
        command_status_name(cmd.status),
        cmd.failure_kind,
        cmd.exit_code,
        &cmd.failure_message,
    )
}

/// `status (failure kind, exit code N): message`, leaving out what is absent.
pub fn outcome(status: String, failure_kind: i32, exit_code: Option<i32>, message: &str) -> String {
    let mut s = status;
    let mut detail = Vec::new();
    if let Some(k) = failure_name(failure_kind) {
        detail.push(k);
    }
    if let Some(c) = exit_code {
        detail.push(format!("exit code {c}"));
    }
    if !detail.is_empty() {
        s = format!("{s} ({})", detail.join(", "));
    }
    if !message.is_empty() {
        s = format!("{s}: {message}");
    }
    s
}

/// Whether to colour stderr.
pub fn colour_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
