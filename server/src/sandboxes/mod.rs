//! Sandboxes: long-lived workspaces on a runner that take a sequence of commands.
//!
//! A sandbox is a job row of kind SANDBOX: dispatch places it like a job (queue, labels,
//! executor, one slot, a lease with fencing, its lock key), and the job state machine moves
//! it; [`crate::jobs::sandbox_state`] reads its job status as the sandbox lifecycle. Each command is a job row of
//! kind COMMAND whose parent is the sandbox: it is never dispatched, but started by its
//! sandbox — at flush of the unit of work in which the sandbox started running, accepted it,
//! or ended its previous command ([`crate::jobs::lifecycle::Lifecycle`]'s follow-up) — under
//! an attempt bound to the sandbox's lease, and sent to the runner as a persisted
//! `ExecCommand`. Its reports, logs, progress, timeout and cancel are a job attempt's.
//!
//! This module holds what users call: create, read, list, delete, run a command, read and
//! cancel commands, and the idle timeout the reaper enforces.
use crate::jobs::sandbox_state::{self as state, NUMBER_KEY};

use std::collections::HashMap;

use gantry_proto as pb;
use prost::Message;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use crate::{
    batch::{GroupCommit, Queue},
    error::{Error, Result, check_text},
    jobs::{
        self,
        lifecycle::{Env, Lifecycle, new_job},
        spec,
        state::{self as job_state, Kind, status_of},
    },
    store::entity::{attempt, job, sandbox, sandbox_command},
};

/// Metadata key of a command's job spec holding the length of its stdin.
const STDIN_KEY: &str = "gantry/stdin-bytes";
/// Idle timeout of a sandbox that names none, seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u32 = 600;
/// Lifetime of a sandbox that names none, seconds.
pub const DEFAULT_LIFETIME_SECONDS: u32 = 86_400;
/// Timeout of a command that names none, seconds.
pub const DEFAULT_COMMAND_TIMEOUT_SECONDS: u32 = 3600;
/// Largest stdin of a command.
pub const MAX_STDIN_BYTES: usize = 1 << 20;

/// Renames the fields of a job spec's validation error to the request's own.
fn renamed(e: Error, names: &[(&str, &str)]) -> Error {
    match e {
        Error::Invalid { field, rule } => {
            let field = names
                .iter()
                .find(|(from, _)| field == *from || field.starts_with(&format!("{from}[")))
                .map_or(field.clone(), |(from, to)| field.replacen(from, to, 1));
            Error::Invalid { field, rule }
        }
        other => other,
    }
}

/// Validates a sandbox spec, fills in its defaults, and returns it with the job spec its
/// job row stores (the lifetime is the job's timeout).
pub fn validate(spec: Option<pb::SandboxSpec>) -> Result<(pb::SandboxSpec, pb::JobSpec)> {
    let mut spec = spec.ok_or_else(|| Error::invalid("spec", "is required"))?;
    if spec.idle_timeout_seconds == 0 {
        spec.idle_timeout_seconds = DEFAULT_IDLE_TIMEOUT_SECONDS;
    }
    if spec.idle_timeout_seconds > spec::MAX_TIMEOUT_SECONDS {
        return Err(Error::invalid(
            "spec.idle_timeout_seconds",
            format!("must be at most {} (7 days)", spec::MAX_TIMEOUT_SECONDS),
        ));
    }
    if spec.max_lifetime_seconds == 0 {
        spec.max_lifetime_seconds = DEFAULT_LIFETIME_SECONDS;
    }
    let process = spec.image.is_empty()
        && (spec.executor == pb::ExecutorKind::Unspecified as i32
            || spec.executor == pb::ExecutorKind::Process as i32);
    let job = pb::JobSpec {
        executor: spec.executor,
        image: spec.image.clone(),
        // The job rules want a program for the process executor; a sandbox has none.
        command: if process {
            vec!["sandbox".into()]
        } else {
            Vec::new()
        },
        env: spec.env.clone(),
        working_dir: spec.working_dir.clone(),
        queue: spec.queue.clone(),
        labels: spec.labels.clone(),
        timeout_seconds: spec.max_lifetime_seconds,
        lock_key: spec.lock_key.clone(),
        resources: spec.resources,
        metadata: spec.metadata.clone(),
        pull_policy: spec.pull_policy,
        cancel_grace_seconds: spec.cancel_grace_seconds,
        inputs: spec.inputs.clone(),
        artifacts: spec.artifacts.clone(),
        ..Default::default()
    };
    let mut job = spec::validate(Some(job), spec::MAX_TIMEOUT_SECONDS)
        .map_err(|e| renamed(e, &[("spec.timeout_seconds", "spec.max_lifetime_seconds")]))?;
    job.command.clear();
    spec.executor = job.executor;
    spec.queue = job.queue.clone();
    spec.pull_policy = job.pull_policy;
    spec.cancel_grace_seconds = job.cancel_grace_seconds;
    Ok((spec, job))
}

/// Validates a command spec and fills in its defaults.
pub fn validate_command(command: Option<pb::CommandSpec>) -> Result<pb::CommandSpec> {
    let mut command = command.ok_or_else(|| Error::invalid("command", "is required"))?;
    if command.argv.is_empty() {
        return Err(Error::invalid(
            "command.argv",
            "is required (the program and its arguments)",
        ));
    }
    if command.stdin.len() > MAX_STDIN_BYTES {
        return Err(Error::invalid(
            "command.stdin",
            format!(
                "must be at most {MAX_STDIN_BYTES} bytes (1 MiB); it has {}",
                command.stdin.len()
            ),
        ));
    }
    check_text("command.idempotency_key", &command.idempotency_key, 255)?;
    if command.timeout_seconds == 0 {
        command.timeout_seconds = DEFAULT_COMMAND_TIMEOUT_SECONDS;
    }
    let job = pb::JobSpec {
        executor: pb::ExecutorKind::Process as i32,
        command: command.argv.clone(),
        env: command.env.clone(),
        working_dir: command.working_dir.clone(),
        timeout_seconds: command.timeout_seconds,
        ..Default::default()
    };
    spec::validate(Some(job), DEFAULT_COMMAND_TIMEOUT_SECONDS).map_err(|e| {
        renamed(
            e,
            &[
                ("spec.command", "command.argv"),
                ("spec.env", "command.env"),
                ("spec.working_dir", "command.working_dir"),
                ("spec.timeout_seconds", "command.timeout_seconds"),
            ],
        )
    })?;
    Ok(command)
}

/// The sandbox spec a sandbox's job row and own row stand for.
fn sandbox_spec(job: &pb::JobSpec, row: &sandbox::Model) -> pb::SandboxSpec {
    pb::SandboxSpec {
        executor: job.executor,
        image: job.image.clone(),
        env: job.env.clone(),
        working_dir: job.working_dir.clone(),
        queue: job.queue.clone(),
        labels: job.labels.clone(),
        resources: job.resources,
        lock_key: job.lock_key.clone(),
        idle_timeout_seconds: u32::try_from(row.idle_timeout_ms / 1000).unwrap_or(u32::MAX),
        max_lifetime_seconds: job.timeout_seconds,
        one_shot: row.one_shot,
        pull_policy: job.pull_policy,
        cancel_grace_seconds: job.cancel_grace_seconds,
        metadata: job.metadata.clone(),
        inputs: job.inputs.clone(),
        artifacts: job.artifacts.clone(),
    }
}

/// A sandbox as the protocol shows it, from its job row, its own row and its attempt.
fn to_proto(
    model: &job::Model,
    row: &sandbox::Model,
    attempt: Option<&attempt::Model>,
) -> Result<pb::Sandbox> {
    let spec = pb::JobSpec::decode(model.spec.as_slice())?;
    let status = status_of(model.status);
    Ok(pb::Sandbox {
        id: model.id.to_string(),
        spec: Some(sandbox_spec(&spec, row)),
        status: state::sandbox_status(status, row.starting) as i32,
        failure_kind: state::sandbox_failure(
            status,
            pb::FailureKind::try_from(model.failure_kind).unwrap_or_default(),
        ) as i32,
        message: model.failure_message.clone(),
        runner_id: model.runner_id.map(|r| r.to_string()).unwrap_or_default(),
        container_id: attempt.map(|a| a.container_id.clone()).unwrap_or_default(),
        created_at_unix_ms: model.created_at,
        started_at_unix_ms: attempt.and_then(|a| a.started_at).unwrap_or_default(),
        finished_at_unix_ms: model.finished_at.unwrap_or_default(),
        last_activity_at_unix_ms: row.last_activity_at,
        command_count: u32::try_from(row.command_count).unwrap_or_default(),
        last_event_sequence: u64::try_from(model.event_seq).unwrap_or_default(),
        expires_at_unix_ms: attempt.map(|a| a.deadline_at).unwrap_or_default(),
    })
}

/// A command as the protocol shows it.
fn command_to_proto(
    model: &job::Model,
    key: Option<&str>,
    attempt: Option<&attempt::Model>,
) -> Result<pb::SandboxCommand> {
    let spec = pb::JobSpec::decode(model.spec.as_slice())?;
    let meta = |key: &str| -> u32 {
        spec.metadata
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let len = |n: Option<i64>| u64::try_from(n.unwrap_or_default()).unwrap_or_default();
    Ok(pb::SandboxCommand {
        id: model.id.to_string(),
        sandbox_id: model.parent_id.map(|p| p.to_string()).unwrap_or_default(),
        number: meta(NUMBER_KEY),
        spec: Some(pb::CommandSpec {
            argv: spec.command.clone(),
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
            timeout_seconds: spec.timeout_seconds,
            stdin: Vec::new(),
            idempotency_key: key.unwrap_or_default().to_string(),
        }),
        status: state::command_status(status_of(model.status)) as i32,
        exit_code: model.exit_code,
        failure_kind: model.failure_kind,
        failure_message: model.failure_message.clone(),
        created_at_unix_ms: model.created_at,
        started_at_unix_ms: attempt.and_then(|a| a.started_at).unwrap_or_default(),
        finished_at_unix_ms: model.finished_at.unwrap_or_default(),
        progress: model
            .progress
            .as_deref()
            .map(pb::Progress::decode)
            .transpose()?,
        stdout_bytes: len(attempt.map(|a| a.stdout_len)),
        stderr_bytes: len(attempt.map(|a| a.stderr_len)),
        stdin_bytes: meta(STDIN_KEY),
    })
}

/// The latest attempt of each of `jobs`.
async fn latest_attempts(
    db: &impl sea_orm::ConnectionTrait,
    jobs: &[Uuid],
) -> Result<HashMap<Uuid, attempt::Model>> {
    let mut out: HashMap<Uuid, attempt::Model> = HashMap::new();
    for chunk in jobs.chunks(500) {
        for a in attempt::Entity::find()
            .filter(attempt::Column::JobId.is_in(chunk.iter().copied()))
            .all(db)
            .await?
        {
            if out.get(&a.job_id).is_none_or(|b| b.number < a.number) {
                out.insert(a.job_id, a);
            }
        }
    }
    Ok(out)
}

/// A job row of `kind`, or NOT_FOUND naming `what`.
async fn row_of(
    db: &impl sea_orm::ConnectionTrait,
    id: Uuid,
    kind: Kind,
    what: &str,
) -> Result<job::Model> {
    job::Entity::find_by_id(id)
        .one(db)
        .await?
        .filter(|m| Kind::of(m.kind) == kind)
        .ok_or_else(|| Error::NotFound(format!("{what} {id}")))
}

/// One sandbox.
pub async fn get(db: &DatabaseConnection, id: Uuid) -> Result<pb::Sandbox> {
    let model = row_of(db, id, Kind::Sandbox, "sandbox").await?;
    let row = sandbox::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or_else(|| Error::Internal(format!("sandbox {id} has no sandbox row")))?;
    let attempts = latest_attempts(db, &[id]).await?;
    to_proto(&model, &row, attempts.get(&id))
}

/// The sandbox created with idempotency `key`, if any.
async fn existing(db: &DatabaseConnection, key: String) -> Result<Option<Uuid>> {
    Ok(sandbox::Entity::find()
        .filter(sandbox::Column::IdempotencyKey.eq(key))
        .select_only()
        .column(sandbox::Column::Id)
        .into_tuple::<Uuid>()
        .one(db)
        .await?)
}

/// Creates a sandbox, PENDING.
pub async fn create(env: &Env, req: pb::CreateSandboxRequest) -> Result<pb::CreateSandboxResponse> {
    check_text("idempotency_key", &req.idempotency_key, 255)?;
    let (spec, job_spec) = validate(req.spec)?;
    spec::check_inputs_exist(env.store.db(), &job_spec.inputs, "spec.inputs").await?;
    let key = (!req.idempotency_key.is_empty()).then(|| req.idempotency_key.clone());
    if let Some(key) = &key
        && let Some(id) = existing(env.store.db(), key.clone()).await?
    {
        return Ok(pb::CreateSandboxResponse {
            sandbox: Some(get(env.store.db(), id).await?),
            deduplicated: true,
        });
    }
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let mut model = new_job(&job_spec, None, lc.now);
    model.kind = Kind::Sandbox.as_i32();
    model.max_attempts = 1;
    model.idempotency_key = None;
    let id = model.id;
    let row = sandbox::Model {
        id,
        idle_timeout_ms: i64::from(spec.idle_timeout_seconds) * 1000,
        one_shot: spec.one_shot,
        last_activity_at: lc.now,
        command_count: 0,
        starting: false,
        idempotency_key: key.clone(),
    };
    lc.insert_sandbox(model, row);
    let inputs = spec::input_rows(id, &job_spec);
    if !inputs.is_empty() {
        crate::store::entity::job_input::Entity::insert_many(inputs)
            .exec_without_returning(lc.txn())
            .await?;
    }
    let signals = lc.flush().await?;
    if let Err(e) = env.commit(wtx, signals).await {
        // Another create with the same key won the race: answer with its sandbox.
        if let Some(key) = key
            && let Some(id) = existing(env.store.db(), key).await?
        {
            return Ok(pb::CreateSandboxResponse {
                sandbox: Some(get(env.store.db(), id).await?),
                deduplicated: true,
            });
        }
        return Err(e);
    }
    Ok(pb::CreateSandboxResponse {
        sandbox: Some(get(env.store.db(), id).await?),
        deduplicated: false,
    })
}

/// Sandboxes newest first.
pub async fn list(
    db: &DatabaseConnection,
    req: pb::ListSandboxesRequest,
) -> Result<pb::ListSandboxesResponse> {
    let page_size = match req.page_size {
        0 => 50,
        n @ 1..=1000 => n,
        _ => return Err(Error::invalid("page_size", "must be within 0..=1000")),
    };
    let mut q = job::Entity::find().filter(job::Column::Kind.eq(Kind::Sandbox.as_i32()));
    if !req.statuses.is_empty() {
        let mut statuses = Vec::new();
        for s in &req.statuses {
            let status = pb::SandboxStatus::try_from(*s)
                .ok()
                .filter(|s| *s != pb::SandboxStatus::Unspecified)
                .ok_or_else(|| Error::invalid("statuses", format!("unknown sandbox status {s}")))?;
            statuses.extend(state::job_statuses(status).iter().map(|s| *s as i32));
        }
        q = q.filter(job::Column::Status.is_in(statuses));
    }
    if !req.queue.is_empty() {
        q = q.filter(job::Column::Queue.eq(req.queue.clone()));
    }
    if !req.runner_id.is_empty() {
        q = q.filter(job::Column::RunnerId.eq(jobs::parse_id("runner_id", &req.runner_id)?));
    }
    if !req.page_token.is_empty() {
        let after = Uuid::try_parse(&req.page_token)
            .map_err(|_| Error::invalid("page_token", "is not a token this server issued"))?;
        q = q.filter(job::Column::Id.lt(after));
    }
    let mut rows = q
        .order_by_desc(job::Column::Id)
        .limit(u64::from(page_size) + 1)
        .all(db)
        .await?;
    let more = rows.len() > page_size as usize;
    rows.truncate(page_size as usize);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let own: HashMap<Uuid, sandbox::Model> = sandbox::Entity::find()
        .filter(sandbox::Column::Id.is_in(ids.clone()))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let attempts = latest_attempts(db, &ids).await?;
    // Filtering by status reads CREATING and STARTING from the same job status: sort them
    // apart here.
    let wanted: Vec<i32> = req.statuses.clone();
    let mut sandboxes = Vec::with_capacity(rows.len());
    for r in &rows {
        let Some(own) = own.get(&r.id) else {
            continue;
        };
        let s = to_proto(r, own, attempts.get(&r.id))?;
        if wanted.is_empty() || wanted.contains(&s.status) {
            sandboxes.push(s);
        }
    }
    Ok(pb::ListSandboxesResponse {
        next_page_token: if more {
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        },
        sandboxes,
    })
}

/// Deletes a sandbox (see DeleteSandbox in the proto).
pub async fn delete(env: &Env, id: Uuid, reason: &str) -> Result<pb::Sandbox> {
    check_text("reason", reason, 1024)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let view = lc
        .load_for_change(id)
        .await?
        .filter(|v| v.kind == Kind::Sandbox)
        .ok_or_else(|| Error::NotFound(format!("sandbox {id}")))?;
    if job_state::is_terminal(view.status) {
        drop(lc);
        wtx.txn.rollback().await?;
        return get(env.store.db(), id).await;
    }
    let message = if reason.is_empty() {
        "deleted by user".to_string()
    } else {
        format!("deleted by user: {reason}")
    };
    let why = if reason.is_empty() {
        "deleted by user"
    } else {
        reason
    };
    let decision = job_state::stop(&view, message, why, lc.now, env.rules.lease_ms)?;
    lc.apply(decision)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    get(env.store.db(), id).await
}

/// Handle to the command intake: accepted commands are group-committed (see
/// [`crate::batch`]): the RunCommand calls waiting at a moment share one transaction.
pub type Intake = GroupCommit<(Uuid, pb::CommandSpec), (Uuid, bool)>;

/// Bytes of a runner's message besides its ExecCommand (the session frame), counted
/// generously.
const EXEC_HEADROOM: usize = 1024;

/// Commands accepted by one transaction at most.
const MAX_ACCEPTED_AT_ONCE: usize = 256;

/// Starts the command intake on `queue`. A group that fails as a whole (another replica
/// stored the same idempotency key in between, say) is accepted again one at a time, so one
/// bad request never fails the others.
pub fn start(env: Env, queue: Queue<(Uuid, pb::CommandSpec), (Uuid, bool)>) {
    GroupCommit::spawn(
        queue,
        "accept commands",
        MAX_ACCEPTED_AT_ONCE,
        1,
        move |group| {
            let env = env.clone();
            async move {
                match accept(&env, &group).await {
                    Ok(answers) => Ok(answers),
                    Err(e) => {
                        tracing::debug!(error = %e, size = group.len(), "command group failed; one at a time");
                        let mut answers = Vec::with_capacity(group.len());
                        for one in group {
                            answers.push(match accept(&env, std::slice::from_ref(&one)).await {
                                Ok(mut a) => a
                                    .pop()
                                    .unwrap_or_else(|| Err(Error::Internal("no answer".into()))),
                                Err(e) => Err(e),
                            });
                        }
                        Ok(answers)
                    }
                }
            }
        },
    );
}

/// Accepts a command for a sandbox that has not ended (see RunCommand in the proto).
pub async fn run_command(
    intake: &Intake,
    db: &DatabaseConnection,
    req: pb::RunCommandRequest,
) -> Result<pb::RunCommandResponse> {
    let sandbox_id = jobs::parse_id("sandbox_id", &req.sandbox_id)?;
    let command = validate_command(req.command)?;
    let (id, deduplicated) = intake.call((sandbox_id, command)).await?;
    Ok(pb::RunCommandResponse {
        command: Some(get_command(db, id).await?),
        deduplicated,
    })
}

/// Accepts validated commands in one transaction; answers in order, each on its own: a
/// command refused (unknown or ended sandbox) changes nothing and refuses no other.
async fn accept(env: &Env, group: &[(Uuid, pb::CommandSpec)]) -> Result<Vec<Result<(Uuid, bool)>>> {
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let ids: Vec<Uuid> = group
        .iter()
        .map(|(id, _)| *id)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // The one lock order on PostgreSQL: the attempts a follow-up may touch (the sandboxes'
    // own and their running commands'), found with a plain read, then the sandboxes' rows.
    // SQLite has one writer: no order to keep, and no statement to spend on it.
    if env.store.is_postgres() {
        let leases: Vec<Option<Uuid>> = job::Entity::find()
            .select_only()
            .column(job::Column::CurrentLease)
            .filter(
                sea_orm::Condition::any()
                    .add(job::Column::Id.is_in(ids.clone()))
                    .add(job::Column::ParentId.is_in(ids.clone())),
            )
            .filter(job::Column::FinishedAt.is_null())
            .into_tuple()
            .all(lc.txn())
            .await?;
        lc.load_attempts(leases.into_iter().flatten()).await?;
    }
    lc.load_jobs(ids.iter().copied()).await?;
    let sandboxes: std::collections::HashSet<Uuid> = ids
        .iter()
        .copied()
        .filter(|id| {
            lc.job(id)
                .is_some_and(|j| Kind::of(j.kind) == Kind::Sandbox)
        })
        .collect();
    // Keys these sandboxes already accepted.
    let keys: Vec<String> = group
        .iter()
        .filter(|(_, c)| !c.idempotency_key.is_empty())
        .map(|(_, c)| c.idempotency_key.clone())
        .collect();
    let mut seen: HashMap<(Uuid, String), Uuid> = HashMap::new();
    if !keys.is_empty() {
        let stored: Vec<(Uuid, Uuid, Option<String>)> = sandbox_command::Entity::find()
            .select_only()
            .column(sandbox_command::Column::Id)
            .column(sandbox_command::Column::SandboxId)
            .column(sandbox_command::Column::IdempotencyKey)
            .filter(sandbox_command::Column::SandboxId.is_in(ids))
            .filter(sandbox_command::Column::IdempotencyKey.is_in(keys))
            .into_tuple()
            .all(lc.txn())
            .await?;
        for (id, sandbox, key) in stored {
            if let Some(key) = key {
                seen.insert((sandbox, key), id);
            }
        }
    }
    let mut answers = Vec::with_capacity(group.len());
    for (sandbox_id, command) in group {
        answers.push(accept_one(
            &mut lc,
            &mut seen,
            &sandboxes,
            *sandbox_id,
            command,
        ));
    }
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(answers)
}

/// Accepts one command into the unit of work, or refuses it without changing anything.
fn accept_one(
    lc: &mut Lifecycle<'_>,
    seen: &mut HashMap<(Uuid, String), Uuid>,
    sandboxes: &std::collections::HashSet<Uuid>,
    sandbox_id: Uuid,
    command: &pb::CommandSpec,
) -> Result<(Uuid, bool)> {
    if !sandboxes.contains(&sandbox_id) {
        return Err(Error::NotFound(format!("sandbox {sandbox_id}")));
    }
    let key = (!command.idempotency_key.is_empty()).then(|| command.idempotency_key.clone());
    if let Some(id) = key
        .as_ref()
        .and_then(|k| seen.get(&(sandbox_id, k.clone())))
    {
        return Ok((*id, true));
    }
    let view = lc.job_view(&sandbox_id)?;
    if job_state::is_terminal(view.status) || view.status == pb::JobStatus::Canceling {
        let status = lc
            .sandbox(&sandbox_id)
            .map(|row| state::sandbox_status(view.status, row.starting))
            .unwrap_or_default();
        return Err(Error::FailedPrecondition(format!(
            "sandbox {sandbox_id} is {}: it takes no more commands",
            status.as_str_name()
        )));
    }
    let number = lc
        .sandbox(&sandbox_id)
        .map(|row| row.command_count + 1)
        .ok_or_else(|| Error::Internal(format!("sandbox {sandbox_id} has no sandbox row")))?;
    let parent = lc
        .job(&sandbox_id)
        .map(|j| pb::JobSpec::decode(j.spec.as_slice()))
        .transpose()?
        .unwrap_or_default();
    // What the runner will get must fit in one message it can decode.
    let mut env = parent.env.clone();
    env.extend(command.env.clone());
    let exec = pb::Command {
        sequence: u64::MAX,
        created_at_unix_ms: i64::MAX,
        kind: Some(pb::command::Kind::Exec(pb::ExecCommand {
            sandbox_id: sandbox_id.to_string(),
            sandbox_lease_id: sandbox_id.to_string(),
            command_id: sandbox_id.to_string(),
            lease_id: sandbox_id.to_string(),
            number: u32::MAX,
            argv: command.argv.clone(),
            env,
            working_dir: if command.working_dir.is_empty() {
                parent.working_dir.clone()
            } else {
                command.working_dir.clone()
            },
            stdin: command.stdin.clone(),
            deadline_unix_ms: i64::MAX,
            grace_seconds: u32::MAX,
        })),
    };
    let limit = lc.rules.max_message_bytes.saturating_sub(EXEC_HEADROOM);
    if exec.encoded_len() > limit {
        return Err(Error::invalid(
            "command",
            format!(
                "with the sandbox's environment it makes a {} byte message to the runner, over the {limit} bytes a runner takes (argv, env and stdin together)",
                exec.encoded_len()
            ),
        ));
    }
    let spec = pb::JobSpec {
        executor: parent.executor,
        queue: parent.queue.clone(),
        command: command.argv.clone(),
        env: command.env.clone(),
        working_dir: command.working_dir.clone(),
        timeout_seconds: command.timeout_seconds,
        cancel_grace_seconds: parent.cancel_grace_seconds,
        metadata: [
            (NUMBER_KEY.to_string(), number.to_string()),
            (STDIN_KEY.to_string(), command.stdin.len().to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let mut model = new_job(&spec, None, lc.now);
    model.kind = Kind::Command.as_i32();
    model.parent_id = Some(sandbox_id);
    model.max_attempts = 1;
    // The key is the sandbox's own (sandbox_commands), not a job's: jobs keys are global.
    model.idempotency_key = None;
    let id = model.id;
    lc.insert_command(
        model,
        sandbox_command::Model {
            id,
            sandbox_id,
            number,
            stdin: command.stdin.clone(),
            idempotency_key: key.clone(),
        },
    );
    if let Some(key) = key {
        seen.insert((sandbox_id, key), id);
    }
    Ok((id, false))
}

/// One command.
pub async fn get_command(db: &DatabaseConnection, id: Uuid) -> Result<pb::SandboxCommand> {
    let model = row_of(db, id, Kind::Command, "command").await?;
    let key: Option<Option<String>> = sandbox_command::Entity::find_by_id(id)
        .select_only()
        .column(sandbox_command::Column::IdempotencyKey)
        .into_tuple()
        .one(db)
        .await?;
    let attempts = latest_attempts(db, &[id]).await?;
    command_to_proto(&model, key.flatten().as_deref(), attempts.get(&id))
}

/// A sandbox's commands in the order accepted (by number), a page at a time.
pub async fn list_commands(
    db: &DatabaseConnection,
    req: pb::ListCommandsRequest,
) -> Result<pb::ListCommandsResponse> {
    let sandbox_id = jobs::parse_id("sandbox_id", &req.sandbox_id)?;
    let page_size = match req.page_size {
        0 => 50,
        n @ 1..=1000 => n,
        _ => return Err(Error::invalid("page_size", "must be within 0..=1000")),
    };
    row_of(db, sandbox_id, Kind::Sandbox, "sandbox").await?;
    let mut q = sandbox_command::Entity::find()
        .select_only()
        .column(sandbox_command::Column::Id)
        .column(sandbox_command::Column::Number)
        .column(sandbox_command::Column::IdempotencyKey)
        .filter(sandbox_command::Column::SandboxId.eq(sandbox_id));
    if !req.page_token.is_empty() {
        let after: i32 = req
            .page_token
            .parse()
            .map_err(|_| Error::invalid("page_token", "is not a token this server issued"))?;
        q = q.filter(sandbox_command::Column::Number.gt(after));
    }
    let mut page: Vec<(Uuid, i32, Option<String>)> = q
        .order_by_asc(sandbox_command::Column::Number)
        .limit(u64::from(page_size) + 1)
        .into_tuple()
        .all(db)
        .await?;
    let more = page.len() > page_size as usize;
    page.truncate(page_size as usize);
    let ids: Vec<Uuid> = page.iter().map(|(id, _, _)| *id).collect();
    let rows: HashMap<Uuid, job::Model> = job::Entity::find()
        .filter(job::Column::Id.is_in(ids.clone()))
        .all(db)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let attempts = latest_attempts(db, &ids).await?;
    let mut commands = Vec::with_capacity(page.len());
    for (id, _, key) in &page {
        if let Some(row) = rows.get(id) {
            commands.push(command_to_proto(row, key.as_deref(), attempts.get(id))?);
        }
    }
    Ok(pb::ListCommandsResponse {
        commands,
        next_page_token: if more {
            page.last()
                .map(|(_, n, _)| n.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        },
    })
}

/// Cancels one command (see CancelSandboxCommand in the proto).
pub async fn cancel_command(env: &Env, id: Uuid, reason: &str) -> Result<pb::SandboxCommand> {
    check_text("reason", reason, 1024)?;
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let view = lc
        .load_for_change(id)
        .await?
        .filter(|v| v.kind == Kind::Command)
        .ok_or_else(|| Error::NotFound(format!("command {id}")))?;
    let decision =
        job_state::cancel(&view, reason, lc.now, env.rules.lease_ms).map_err(|e| match e {
            Error::FailedPrecondition(_) => Error::FailedPrecondition(format!(
                "command {id} has already ended ({}); an ended command never changes",
                state::command_status(view.status).as_str_name()
            )),
            other => other,
        })?;
    lc.apply(decision)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    get_command(env.store.db(), id).await
}

/// Idle sandboxes deleted per reaper pass at most.
const REAP_IDLE_BATCH: u64 = 256;

/// Deletes every running sandbox idle past its timeout: no command queued or under way
/// since its last activity plus its idle timeout. Decided again on the locked rows.
pub async fn reap_idle(env: &Env, now: i64) -> Result<()> {
    use sea_orm::sea_query::ExprTrait as _;
    // Filtered in SQL: only sandboxes running and past their idle time are read.
    let running = sea_orm::sea_query::Query::select()
        .column(job::Column::Id)
        .from(job::Entity)
        .and_where(job::Column::Kind.eq(Kind::Sandbox.as_i32()))
        .and_where(job::Column::Status.eq(pb::JobStatus::Running as i32))
        .to_owned();
    let idle: Vec<Uuid> = sandbox::Entity::find()
        .select_only()
        .column(sandbox::Column::Id)
        .filter(
            sea_orm::sea_query::Expr::col(sandbox::Column::LastActivityAt)
                .add(sea_orm::sea_query::Expr::col(
                    sandbox::Column::IdleTimeoutMs,
                ))
                .lt(now),
        )
        .filter(sandbox::Column::Id.in_subquery(running))
        .limit(REAP_IDLE_BATCH)
        .into_tuple()
        .all(env.store.db())
        .await?;
    if idle.is_empty() {
        return Ok(());
    }
    let busy: Vec<Uuid> = job::Entity::find()
        .select_only()
        .column(job::Column::ParentId)
        .filter(job::Column::ParentId.is_in(idle.clone()))
        .filter(job::Column::FinishedAt.is_null())
        .into_tuple::<Option<Uuid>>()
        .all(env.store.db())
        .await?
        .into_iter()
        .flatten()
        .collect();
    for id in idle.into_iter().filter(|id| !busy.contains(id)) {
        if let Err(e) = delete_idle(env, id, now).await {
            tracing::warn!(sandbox = %id, error = %e, "could not delete an idle sandbox");
        }
    }
    Ok(())
}

async fn delete_idle(env: &Env, id: Uuid, now: i64) -> Result<()> {
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let Some(view) = lc.load_for_change(id).await? else {
        return Ok(());
    };
    let open: Option<Uuid> = job::Entity::find()
        .select_only()
        .column(job::Column::Id)
        .filter(job::Column::ParentId.eq(id))
        .filter(job::Column::FinishedAt.is_null())
        .into_tuple()
        .one(lc.txn())
        .await?;
    let Some(row) = lc.sandbox(&id).cloned() else {
        return Ok(());
    };
    let still_idle = view.status == pb::JobStatus::Running
        && open.is_none()
        && row.last_activity_at.saturating_add(row.idle_timeout_ms) < now;
    if !still_idle {
        drop(lc);
        wtx.txn.rollback().await?;
        return Ok(());
    }
    let seconds = row.idle_timeout_ms / 1000;
    let why = format!("idle for {seconds} s");
    let decision = job_state::stop(
        &view,
        format!("deleting: {why}"),
        &why,
        lc.now,
        env.rules.lease_ms,
    )?;
    lc.apply(decision)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_sandbox_spec_gets_its_defaults_and_its_own_field_names() {
        let (spec, job) = validate(Some(pb::SandboxSpec::default())).expect("valid");
        assert_eq!(spec.executor, pb::ExecutorKind::Process as i32);
        assert_eq!(spec.idle_timeout_seconds, DEFAULT_IDLE_TIMEOUT_SECONDS);
        assert_eq!(job.timeout_seconds, DEFAULT_LIFETIME_SECONDS);
        assert!(job.command.is_empty());
        assert_eq!(job.queue, "default");
        let long = pb::SandboxSpec {
            max_lifetime_seconds: spec::MAX_TIMEOUT_SECONDS + 1,
            ..Default::default()
        };
        assert_eq!(field_of(validate(Some(long))), "spec.max_lifetime_seconds");
        let docker = pb::SandboxSpec {
            executor: pb::ExecutorKind::Docker as i32,
            ..Default::default()
        };
        assert_eq!(field_of(validate(Some(docker))), "spec.image");
        assert_eq!(field_of(validate(None)), "spec");
    }

    #[test]
    fn a_command_spec_is_refused_naming_the_request_field() {
        let ok = pb::CommandSpec {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert_eq!(
            validate_command(Some(ok.clone()))
                .expect("valid")
                .timeout_seconds,
            DEFAULT_COMMAND_TIMEOUT_SECONDS
        );
        let cases = [
            (pb::CommandSpec::default(), "command.argv"),
            (
                pb::CommandSpec {
                    argv: vec![String::new()],
                    ..Default::default()
                },
                "command.argv",
            ),
            (
                pb::CommandSpec {
                    stdin: vec![0; MAX_STDIN_BYTES + 1],
                    ..ok.clone()
                },
                "command.stdin",
            ),
            (
                pb::CommandSpec {
                    working_dir: "relative".into(),
                    ..ok.clone()
                },
                "command.working_dir",
            ),
            (
                pb::CommandSpec {
                    env: [("1BAD".to_string(), String::new())].into(),
                    ..ok.clone()
                },
                "command.env",
            ),
            (
                pb::CommandSpec {
                    timeout_seconds: spec::MAX_TIMEOUT_SECONDS + 1,
                    ..ok.clone()
                },
                "command.timeout_seconds",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(validate_command(Some(spec))), field);
        }
        assert_eq!(field_of(validate_command(None)), "command");
    }
}
