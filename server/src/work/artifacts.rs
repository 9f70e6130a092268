//! Artifacts and blobs: storing what work publishes (WorkService.UploadArtifact) and what
//! users upload beforehand (JobService.UploadBlob), resolving a spec's inputs, listing and
//! downloading, and removing blobs nothing refers to any more.
//!
//! Bytes go to the [`BlobStore`] first; the rows (`blobs`, `artifacts`) are written after,
//! in a transaction that checks the work token again — so an upload cut short, refused or
//! outrun by the end of its attempt is never listed.
use bytes::Bytes;
use futures::{Stream, StreamExt, stream::BoxStream};
use gantry_proto as pb;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, sea_query::OnConflict,
};
use uuid::Uuid;

use super::{verify_in, verify_read};
use crate::{
    blobs::{BlobStore, Expect, Staged, parse_digest},
    error::{Error, Result},
    jobs::{self, lifecycle::Env, spec::check_relative_path},
    store::{
        Store,
        entity::{artifact, blob, job_input},
    },
};

/// The server's limits on stored data.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest artifact or uploaded blob, bytes (0: none).
    pub max_artifact_bytes: u64,
    /// Artifacts one job may hold (0: no limit).
    pub max_artifacts_per_job: u64,
    /// Largest result, bytes.
    pub max_result_bytes: u64,
}

/// A blob row as the protocol shows it.
fn blob_proto(digest: &str, size: i64) -> pb::Blob {
    pb::Blob {
        digest: digest.to_string(),
        size: u64::try_from(size).unwrap_or_default(),
    }
}

fn artifact_proto(a: &artifact::Model) -> pb::Artifact {
    pb::Artifact {
        job_id: a.job_id.to_string(),
        name: a.name.clone(),
        blob: Some(blob_proto(&a.digest, a.size)),
        attempt: u32::try_from(a.attempt).unwrap_or_default(),
        created_at_unix_ms: a.created_at,
    }
}

/// Records (or refreshes) a blob row in the caller's transaction.
async fn upsert_blob(db: &impl ConnectionTrait, digest: &str, size: u64, now: i64) -> Result<()> {
    blob::Entity::insert(blob::ActiveModel {
        digest: Set(digest.to_string()),
        size: Set(i64::try_from(size).unwrap_or(i64::MAX)),
        created_at: Set(now),
        last_used_at: Set(now),
    })
    .on_conflict(
        OnConflict::column(blob::Column::Digest)
            .update_column(blob::Column::LastUsedAt)
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The inputs of `spec`, each resolved to its blob or saying why it cannot be had.
pub async fn resolve_inputs(
    db: &impl ConnectionTrait,
    spec: &pb::JobSpec,
) -> Result<Vec<pb::ResolvedInput>> {
    let mut out = Vec::with_capacity(spec.inputs.len());
    for (i, input) in spec.inputs.iter().enumerate() {
        let (blob, unavailable) = match &input.source {
            Some(pb::input::Source::BlobDigest(d)) => {
                match blob::Entity::find_by_id(d.clone()).one(db).await? {
                    Some(b) => (Some(blob_proto(&b.digest, b.size)), String::new()),
                    None => (None, format!("blob {d} is not stored")),
                }
            }
            Some(pb::input::Source::Artifact(a)) => {
                let found = match Uuid::try_parse(&a.job_id) {
                    Ok(job) => {
                        artifact::Entity::find_by_id((job, a.name.clone()))
                            .one(db)
                            .await?
                    }
                    Err(_) => None,
                };
                match found {
                    Some(f) => (Some(blob_proto(&f.digest, f.size)), String::new()),
                    None => (
                        None,
                        format!("job {} has no artifact named {:?}", a.job_id, a.name),
                    ),
                }
            }
            None => (None, "the input names no source".to_string()),
        };
        out.push(pb::ResolvedInput {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            input: Some(input.clone()),
            blob,
            unavailable,
        });
    }
    Ok(out)
}

/// WorkService.ListInputs.
pub async fn list_inputs(env: &Env, token: &str, job_id: &str) -> Result<pb::ListInputsResponse> {
    let job_id = jobs::parse_id("job_id", job_id)?;
    let db = env.store.db();
    verify_read(db, token, job_id, env.clock.now_ms()).await?;
    let spec = super::spec_of(db, job_id).await?;
    Ok(pb::ListInputsResponse {
        inputs: resolve_inputs(db, &spec).await?,
    })
}

/// WorkService.ReadInput: the bytes of input `index`.
pub async fn read_input(
    env: &Env,
    blobs: &BlobStore,
    token: &str,
    req: pb::ReadInputRequest,
) -> Result<BoxStream<'static, Result<pb::BlobChunk>>> {
    let job_id = jobs::parse_id("job_id", &req.job_id)?;
    let db = env.store.db();
    verify_read(db, token, job_id, env.clock.now_ms()).await?;
    let spec = super::spec_of(db, job_id).await?;
    let index = usize::try_from(req.index).unwrap_or(usize::MAX);
    let Some(input) = spec.inputs.get(index) else {
        return Err(Error::invalid(
            "index",
            format!("job {job_id} declares {} inputs", spec.inputs.len()),
        ));
    };
    let resolved = resolve_inputs(
        db,
        &pb::JobSpec {
            inputs: vec![input.clone()],
            ..Default::default()
        },
    )
    .await?;
    let blob = resolved
        .into_iter()
        .next()
        .and_then(|r| r.blob.ok_or(r.unavailable).ok())
        .ok_or_else(|| Error::NotFound(format!("input {index} of job {job_id}")))?;
    chunks(blobs, &blob.digest).await
}

/// The bytes of `digest` as chunks with their offsets.
async fn chunks(
    blobs: &BlobStore,
    digest: &str,
) -> Result<BoxStream<'static, Result<pb::BlobChunk>>> {
    let pieces = blobs.read(digest).await?;
    let mut offset = 0u64;
    Ok(pieces
        .map(move |piece| {
            piece.map(|data| {
                let chunk = pb::BlobChunk {
                    offset,
                    data: data.to_vec(),
                };
                offset += data.len() as u64;
                chunk
            })
        })
        .boxed())
}

/// WorkService.UploadArtifact: `header` is the first message, `data` the bytes after it.
pub async fn upload_artifact<S>(
    env: &Env,
    blobs: &BlobStore,
    limits: Limits,
    token: &str,
    header: pb::ArtifactHeader,
    data: S,
) -> Result<pb::Artifact>
where
    S: Stream<Item = Result<Bytes>> + Send,
{
    let job_id = jobs::parse_id("header.job_id", &header.job_id)?;
    check_relative_path("header.name", &header.name)?;
    require_size(header.size)?;
    let digest = match header.digest.as_str() {
        "" => None,
        d => Some(parse_digest("header.digest", d)?),
    };
    // Refused before a byte is stored: a bad token, a full job, an announced size too big.
    verify_read(env.store.db(), token, job_id, env.clock.now_ms()).await?;
    if let Err(e) = check_count(env.store.db(), limits, job_id, &header.name).await {
        refused(env, token, job_id, &header.name, &e).await;
        return Err(e);
    }
    if limits.max_artifact_bytes > 0
        && let Some(size) = header.size
        && size > limits.max_artifact_bytes
    {
        let e = too_big(limits.max_artifact_bytes);
        refused(env, token, job_id, &header.name, &e).await;
        return Err(e);
    }
    let expect = Expect {
        size: header.size,
        digest,
        max_bytes: limits.max_artifact_bytes,
        limit_name: "--max-artifact-bytes",
        field: "header",
    };
    let staged = match blobs.put(data, &expect).await {
        Ok(staged) => staged,
        Err(e) => {
            if matches!(e, Error::ResourceExhausted(_)) {
                refused(env, token, job_id, &header.name, &e).await;
            }
            return Err(e);
        }
    };
    let recorded = record_artifact(env, blobs, limits, token, job_id, &header.name, &staged).await;
    if recorded.is_err() {
        blobs.discard(&staged).await;
    }
    recorded
}

/// Lists staged bytes as artifact `name` of `job_id`, addressing them in the same
/// transaction (see [`crate::blobs`]); the token is checked again there.
async fn record_artifact(
    env: &Env,
    blobs: &BlobStore,
    limits: Limits,
    token: &str,
    job_id: Uuid,
    name: &str,
    staged: &Staged,
) -> Result<pb::Artifact> {
    let wtx = env.store.write().await?;
    let mut lc = env.lifecycle(&wtx);
    let scope = verify_in(&mut lc, token, job_id).await?;
    check_count(lc.txn(), limits, job_id, name).await?;
    upsert_blob(lc.txn(), &staged.digest, staged.size, lc.now).await?;
    blobs.address(staged).await?;
    let row = artifact::Model {
        job_id,
        name: name.to_string(),
        attempt: i32::try_from(scope.attempt).unwrap_or(i32::MAX),
        digest: staged.digest.clone(),
        size: i64::try_from(staged.size).unwrap_or(i64::MAX),
        created_at: lc.now,
    };
    artifact::Entity::insert(artifact::ActiveModel {
        job_id: Set(row.job_id),
        name: Set(row.name.clone()),
        attempt: Set(row.attempt),
        digest: Set(row.digest.clone()),
        size: Set(row.size),
        created_at: Set(row.created_at),
    })
    .on_conflict(
        OnConflict::columns([artifact::Column::JobId, artifact::Column::Name])
            .update_columns([
                artifact::Column::Attempt,
                artifact::Column::Digest,
                artifact::Column::Size,
                artifact::Column::CreatedAt,
            ])
            .to_owned(),
    )
    .exec_without_returning(lc.txn())
    .await?;
    let event = pb::ArtifactStored {
        name: name.to_string(),
        blob: Some(blob_proto(&row.digest, row.size)),
        error: String::new(),
    };
    lc.record_work(scope.lease, pb::job_event::Kind::Artifact(event), true)?;
    let signals = lc.flush().await?;
    env.commit(wtx, signals).await?;
    Ok(artifact_proto(&row))
}

/// An upload says its size up front: a client whose call is canceled midway ends its stream
/// the way a finished one does, and only the size tells the two apart.
fn require_size(size: Option<u64>) -> Result<()> {
    match size {
        Some(_) => Ok(()),
        None => Err(Error::invalid(
            "header.size",
            "is required: an upload says how many bytes follow, so that one cut short is never stored",
        )),
    }
}

fn too_big(max: u64) -> Error {
    Error::ResourceExhausted(format!(
        "an artifact is at most {max} bytes (the server's --max-artifact-bytes)"
    ))
}

/// RESOURCE_EXHAUSTED when the job holds its most artifacts already (a name it has is a
/// replacement, not one more).
async fn check_count(
    db: &impl ConnectionTrait,
    limits: Limits,
    job_id: Uuid,
    name: &str,
) -> Result<()> {
    if limits.max_artifacts_per_job == 0 {
        return Ok(());
    }
    let held = artifact::Entity::find()
        .filter(artifact::Column::JobId.eq(job_id))
        .filter(artifact::Column::Name.ne(name))
        .count(db)
        .await?;
    if held >= limits.max_artifacts_per_job {
        return Err(Error::ResourceExhausted(format!(
            "job {job_id} holds {held} artifacts, the most the server keeps per job (--max-artifacts-per-job)"
        )));
    }
    Ok(())
}

/// Records on the job that an artifact was refused (best effort: the caller's error is what
/// matters; a token that is no longer good records nothing).
async fn refused(env: &Env, token: &str, job_id: Uuid, name: &str, why: &Error) {
    let record = async {
        let wtx = env.store.write().await?;
        let mut lc = env.lifecycle(&wtx);
        let scope = verify_in(&mut lc, token, job_id).await?;
        let event = pb::ArtifactStored {
            name: name.to_string(),
            blob: None,
            error: why.to_string(),
        };
        lc.record_work(scope.lease, pb::job_event::Kind::Artifact(event), true)?;
        let signals = lc.flush().await?;
        env.commit(wtx, signals).await
    };
    if let Err(e) = record.await {
        tracing::debug!(%job_id, error = %e, "recording a refused artifact");
    }
}

/// JobService.UploadBlob.
pub async fn upload_blob<S>(
    env: &Env,
    blobs: &BlobStore,
    limits: Limits,
    header: pb::BlobHeader,
    data: S,
) -> Result<pb::Blob>
where
    S: Stream<Item = Result<Bytes>> + Send,
{
    require_size(header.size)?;
    let digest = match header.digest.as_str() {
        "" => None,
        d => Some(parse_digest("header.digest", d)?),
    };
    if limits.max_artifact_bytes > 0
        && let Some(size) = header.size
        && size > limits.max_artifact_bytes
    {
        return Err(Error::ResourceExhausted(format!(
            "a blob is at most {} bytes (the server's --max-artifact-bytes)",
            limits.max_artifact_bytes
        )));
    }
    let expect = Expect {
        size: header.size,
        digest,
        max_bytes: limits.max_artifact_bytes,
        limit_name: "--max-artifact-bytes",
        field: "header",
    };
    let staged = blobs.put(data, &expect).await?;
    let recorded = async {
        let wtx = env.store.write().await?;
        upsert_blob(&wtx.txn, &staged.digest, staged.size, env.clock.now_ms()).await?;
        blobs.address(&staged).await?;
        wtx.commit().await
    }
    .await;
    if let Err(e) = recorded {
        blobs.discard(&staged).await;
        return Err(e);
    }
    Ok(pb::Blob {
        digest: staged.digest,
        size: staged.size,
    })
}

/// JobService.ListArtifacts.
pub async fn list(db: &impl ConnectionTrait, job_id: &str) -> Result<pb::ListArtifactsResponse> {
    let id = jobs::parse_id("job_id", job_id)?;
    let exists = crate::store::entity::job::Entity::find_by_id(id)
        .select_only()
        .column(crate::store::entity::job::Column::Id)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    if exists.is_none() {
        return Err(Error::NotFound(format!("job {id}")));
    }
    let rows = artifact::Entity::find()
        .filter(artifact::Column::JobId.eq(id))
        .order_by_asc(artifact::Column::Name)
        .all(db)
        .await?;
    Ok(pb::ListArtifactsResponse {
        artifacts: rows.iter().map(artifact_proto).collect(),
    })
}

/// JobService.DownloadArtifact.
pub async fn download(
    db: &impl ConnectionTrait,
    blobs: &BlobStore,
    req: pb::DownloadArtifactRequest,
) -> Result<BoxStream<'static, Result<pb::BlobChunk>>> {
    let id = jobs::parse_id("job_id", &req.job_id)?;
    if req.name.is_empty() {
        return Err(Error::invalid("name", "is required"));
    }
    let row = artifact::Entity::find_by_id((id, req.name.clone()))
        .one(db)
        .await?
        .ok_or_else(|| Error::NotFound(format!("artifact {:?} of job {id}", req.name)))?;
    chunks(blobs, &row.digest).await
}

/// JobService.DownloadBlob.
pub async fn download_blob(
    db: &impl ConnectionTrait,
    blobs: &BlobStore,
    digest: &str,
) -> Result<BoxStream<'static, Result<pb::BlobChunk>>> {
    let digest = parse_digest("digest", digest)?;
    if blob::Entity::find_by_id(digest.clone())
        .one(db)
        .await?
        .is_none()
    {
        return Err(Error::NotFound(format!("blob {digest}")));
    }
    chunks(blobs, &digest).await
}

/// Rows deleted per retention pass.
const PURGE_BATCH: u64 = 500;

/// Removes blobs nothing names (no artifact, no job's input) whose last use was before
/// `horizon`: their rows and, in the same transaction, their bytes (see [`crate::blobs`]).
/// Also removes temporary uploads a crashed server left a day or more ago. Returns how many
/// blobs.
pub async fn purge_unreferenced(store: &Store, blobs: &BlobStore, horizon: i64) -> Result<u64> {
    use sea_orm::sea_query::Query;
    let unreferenced = || {
        Condition::all()
            .add(blob::Column::LastUsedAt.lt(horizon))
            .add(
                blob::Column::Digest.not_in_subquery(
                    Query::select()
                        .column(artifact::Column::Digest)
                        .from(artifact::Entity)
                        .to_owned(),
                ),
            )
            .add(
                blob::Column::Digest.not_in_subquery(
                    Query::select()
                        .column(job_input::Column::Digest)
                        .from(job_input::Entity)
                        .to_owned(),
                ),
            )
    };
    let digests: Vec<String> = blob::Entity::find()
        .select_only()
        .column(blob::Column::Digest)
        .filter(unreferenced())
        .limit(PURGE_BATCH)
        .into_tuple()
        .all(store.db())
        .await?;
    let mut deleted = 0;
    if !digests.is_empty() {
        let wtx = store.write().await?;
        // Checked again as the rows go, and the rows stay locked (PostgreSQL) or the writer
        // held (SQLite) while the bytes go: an upload of the same bytes records its row (and
        // addresses its bytes) only after this commits.
        let mut gone = Vec::new();
        for digest in digests {
            let n = blob::Entity::delete_many()
                .filter(unreferenced())
                .filter(blob::Column::Digest.eq(digest.clone()))
                .exec(&wtx.txn)
                .await?
                .rows_affected;
            if n > 0 {
                gone.push(digest);
            }
        }
        for digest in &gone {
            blobs.delete(digest).await?;
        }
        wtx.commit().await?;
        deleted = gone.len() as u64;
        tracing::info!(deleted, "retention: deleted unreferenced blobs");
    }
    // Listing the temporary uploads is a request to the store: once an hour is enough.
    static LAST_SWEEP: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = crate::clock::system_ms();
    let last = LAST_SWEEP.load(std::sync::atomic::Ordering::Relaxed);
    if now - last >= SWEEP_EVERY_MS {
        LAST_SWEEP.store(now, std::sync::atomic::Ordering::Relaxed);
        let swept = blobs
            .sweep_temporary(now.saturating_sub(TEMPORARY_MS))
            .await?;
        if swept > 0 {
            tracing::info!(swept, "retention: removed abandoned temporary uploads");
        }
    }
    Ok(deleted)
}

/// Age past which a temporary upload is abandoned (no upload takes a day).
const TEMPORARY_MS: i64 = 24 * 3600 * 1000;
/// How often temporary uploads are looked over.
const SWEEP_EVERY_MS: i64 = 3600 * 1000;
