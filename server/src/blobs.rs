//! The blob store: content-addressed bytes (artifacts, uploaded inputs) behind one trait,
//! `object_store`'s [`ObjectStore`] — a local directory for the embedded setup, any
//! S3-compatible store for several replicas. Metadata (which blobs exist, which artifacts
//! and inputs name them) is in the database; this module only moves bytes.
//!
//! An upload streams into a temporary object while it is hashed, never held whole in
//! memory ([`BlobStore::put`]): a stream cut short, a size or digest that does not match, a
//! limit passed, or the upload abandoned (its call dropped) removes the temporary object.
//! What is staged is moved to its content address (`blobs/<hex>`, [`BlobStore::address`])
//! inside the database transaction that records its row, and retention deletes bytes inside
//! the transaction that deletes the row — so the two never pass each other: a listed blob
//! always has its bytes.
use std::{path::Path, sync::Arc};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream::BoxStream};
use object_store::{ObjectStore, WriteMultipart, path::Path as Key};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Largest piece of a blob sent in one message.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Size of the parts an upload is written in (S3's smallest multipart part).
const PART_BYTES: usize = 5 << 20;
/// Parts of one upload in flight at once: memory per upload is about this many parts.
const PARTS_IN_FLIGHT: usize = 2;
/// Pieces smaller than this are hashed on the async worker itself.
const HASH_INLINE_BYTES: usize = 64 << 10;
/// The digest prefix.
const SHA256: &str = "sha256:";

/// Where blob bytes go.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// What it is, for logs: `local directory …` or `S3 bucket …`.
    describe: String,
}

/// S3-compatible object storage settings.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// Endpoint URL (`http://127.0.0.1:9000`); empty for AWS itself.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// What [`BlobStore::put`] checks.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// The exact size announced, if any.
    pub size: Option<u64>,
    /// The digest announced, if any (already parsed).
    pub digest: Option<String>,
    /// Most bytes allowed (0: no limit), and the name of the flag that sets it.
    pub max_bytes: u64,
    pub limit_name: &'static str,
    /// Field prefix for errors (`header` or `header` of an artifact).
    pub field: &'static str,
}

/// Bytes uploaded and checked, in a temporary object until addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    tmp: Key,
}

/// Where temporary uploads go.
const TMP: &str = "tmp";

/// An upload in progress; dropped before it is disarmed (its call abandoned), it aborts the
/// upload and removes the temporary object in a task of its own.
struct Abandoned {
    writer: Option<WriteMultipart>,
    store: Arc<dyn ObjectStore>,
    tmp: Key,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let (store, tmp) = (self.store.clone(), self.tmp.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = writer.abort().await {
                    tracing::debug!(error = %e, "aborting an abandoned upload");
                }
                match store.delete(&tmp).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => tracing::warn!(%tmp, error = %e, "removing an abandoned upload"),
                }
            });
        }
    }
}

/// `sha256:<64 lowercase hex>` from a request field.
pub fn parse_digest(field: &str, value: &str) -> Result<String> {
    let hex = value
        .strip_prefix(SHA256)
        .ok_or_else(|| Error::invalid(field, "must be `sha256:` followed by 64 hex digits"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            field,
            "must be `sha256:` followed by 64 hex digits",
        ));
    }
    Ok(format!("{SHA256}{}", hex.to_ascii_lowercase()))
}

/// The digest of `data`, as stored.
pub fn digest_of(data: &[u8]) -> String {
    format!("{SHA256}{}", hex::encode(Sha256::digest(data)))
}

fn key_of(digest: &str) -> Key {
    let hex = digest.strip_prefix(SHA256).unwrap_or(digest);
    Key::from(format!("blobs/{hex}"))
}

fn store_error(what: &str, e: object_store::Error) -> Error {
    Error::Unavailable(format!("blob store: {what}: {e}"))
}

impl BlobStore {
    /// Blobs in the directory `dir` (made if absent).
    pub fn local(dir: &Path) -> anyhow::Result<BlobStore> {
        std::fs::create_dir_all(dir)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(BlobStore {
            store: Arc::new(store),
            describe: format!("local directory {}", dir.display()),
        })
    }

    /// Blobs in an S3-compatible bucket.
    pub fn s3(s: &S3Settings) -> anyhow::Result<BlobStore> {
        // The environment's AWS_* settings (web identity, instance profile …) apply unless
        // keys are given.
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region);
        if !s.access_key_id.is_empty() {
            builder = builder
                .with_access_key_id(&s.access_key_id)
                .with_secret_access_key(&s.secret_access_key);
        }
        if !s.endpoint.is_empty() {
            builder = builder
                .with_endpoint(&s.endpoint)
                .with_allow_http(s.endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        Ok(BlobStore {
            store: Arc::new(builder.build()?),
            describe: format!("S3 bucket {} at {}", s.bucket, s.endpoint),
        })
    }

    /// What it is, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Streams `data` into a temporary object (see the module comment); returns it staged,
    /// to be [`BlobStore::address`]ed or [`BlobStore::discard`]ed. `Err` when the stream
    /// failed, a check failed or the store refused; nothing is left then.
    pub async fn put<S>(&self, data: S, expect: &Expect) -> Result<Staged>
    where
        S: Stream<Item = Result<Bytes>> + Send,
    {
        let tmp = Key::from(format!("{TMP}/{}", Uuid::now_v7()));
        let upload = self
            .store
            .put_multipart(&tmp)
            .await
            .map_err(|e| store_error("starting an upload", e))?;
        // Whatever ends this call early (its future dropped with the client's call) leaves
        // the guard to abort the upload and remove the temporary object.
        let mut guard = Abandoned {
            writer: Some(WriteMultipart::new_with_chunk_size(upload, PART_BYTES)),
            store: self.store.clone(),
            tmp: tmp.clone(),
        };
        let Some(writer) = guard.writer.as_mut() else {
            return Err(Error::Internal("the upload's writer is gone".into()));
        };
        match write_all(writer, data, expect).await {
            Ok((digest, size)) => {
                let Some(writer) = guard.writer.take() else {
                    return Err(Error::Internal("the upload's writer is gone".into()));
                };
                if let Err(e) = writer.finish().await {
                    self.remove(&tmp).await;
                    return Err(store_error("finishing an upload", e));
                }
                Ok(Staged { digest, size, tmp })
            }
            Err(e) => {
                if let Some(writer) = guard.writer.take()
                    && let Err(abort) = writer.abort().await
                {
                    tracing::debug!(error = %abort, "aborting a refused upload");
                }
                self.remove(&tmp).await;
                Err(e)
            }
        }
    }

    /// Moves staged bytes to their content address. Called inside the transaction that
    /// records the blob's row (see the module comment).
    pub async fn address(&self, staged: &Staged) -> Result<()> {
        self.store
            .rename(&staged.tmp, &key_of(&staged.digest))
            .await
            .map_err(|e| store_error("addressing an upload", e))
    }

    /// Removes staged bytes that will not be addressed (absent is fine).
    pub async fn discard(&self, staged: &Staged) {
        self.remove(&staged.tmp).await;
    }

    /// Removes temporary objects last modified before `horizon` (Unix ms): what a server
    /// that crashed in the middle of an upload left. Returns how many.
    pub async fn sweep_temporary(&self, horizon: i64) -> Result<u64> {
        let prefix = Key::from(TMP);
        let mut listed = self.store.list(Some(&prefix));
        let mut old = Vec::new();
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| store_error("listing temporary uploads", e))?;
            if meta.last_modified.timestamp_millis() < horizon {
                old.push(meta.location);
            }
        }
        for key in &old {
            self.remove(key).await;
        }
        Ok(old.len() as u64)
    }

    /// The bytes of `digest`, in pieces of at most [`CHUNK_BYTES`], read as they are taken.
    /// NOT_FOUND when the store has no such blob.
    pub async fn read(&self, digest: &str) -> Result<BoxStream<'static, Result<Bytes>>> {
        let got = match self.store.get(&key_of(digest)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NotFound(format!("blob {digest} in the blob store")));
            }
            Err(e) => return Err(store_error("reading", e)),
        };
        let pieces = got
            .into_stream()
            .map(|r| r.map_err(|e| store_error("reading", e)))
            .flat_map(|r| futures::stream::iter(split(r)));
        Ok(pieces.boxed())
    }

    /// Removes the bytes of `digest` (absent is fine).
    pub async fn delete(&self, digest: &str) -> Result<()> {
        match self.store.delete(&key_of(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error("deleting", e)),
        }
    }

    async fn remove(&self, key: &Key) {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(%key, error = %e, "removing a temporary upload"),
        }
    }
}

/// Cuts a piece read from the store into pieces of at most [`CHUNK_BYTES`].
fn split(piece: Result<Bytes>) -> Vec<Result<Bytes>> {
    match piece {
        Err(e) => vec![Err(e)],
        Ok(mut bytes) => {
            let mut out = Vec::with_capacity(bytes.len() / CHUNK_BYTES + 1);
            while bytes.len() > CHUNK_BYTES {
                out.push(Ok(bytes.split_to(CHUNK_BYTES)));
            }
            if !bytes.is_empty() {
                out.push(Ok(bytes));
            }
            out
        }
    }
}

/// Writes every piece of `data`, hashing and counting; checks the limits as it goes and the
/// announced size and digest at the end. Returns the digest and size.
async fn write_all<S>(
    writer: &mut WriteMultipart,
    data: S,
    expect: &Expect,
) -> Result<(String, u64)>
where
    S: Stream<Item = Result<Bytes>> + Send,
{
    let mut data = std::pin::pin!(data);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let field = expect.field;
    while let Some(piece) = data.next().await {
        let piece = piece?;
        if piece.len() > CHUNK_BYTES {
            return Err(Error::invalid(
                "data",
                format!("a message carries at most {CHUNK_BYTES} bytes"),
            ));
        }
        size += piece.len() as u64;
        if expect.max_bytes > 0 && size > expect.max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "more than {} bytes: the server's {} is {}",
                expect.max_bytes, expect.limit_name, expect.max_bytes
            )));
        }
        if let Some(announced) = expect.size
            && size > announced
        {
            return Err(Error::invalid(
                format!("{field}.size"),
                format!("is {announced}, but more bytes came"),
            ));
        }
        hasher = if piece.len() >= HASH_INLINE_BYTES {
            // Hashing a large piece takes a millisecond or more: off the async workers.
            let part = piece.clone();
            tokio::task::spawn_blocking(move || {
                hasher.update(&part);
                hasher
            })
            .await
            .map_err(|e| Error::Internal(format!("hashing an upload: {e}")))?
        } else {
            hasher.update(&piece);
            hasher
        };
        writer
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|e| store_error("writing", e))?;
        writer.put(piece);
    }
    if let Some(announced) = expect.size
        && size != announced
    {
        return Err(Error::invalid(
            format!("{field}.size"),
            format!("is {announced}, but {size} bytes came"),
        ));
    }
    let digest = format!("{SHA256}{}", hex::encode(hasher.finalize()));
    if let Some(announced) = &expect.digest
        && *announced != digest
    {
        return Err(Error::invalid(
            format!("{field}.digest"),
            format!("is {announced}, but the bytes that came are {digest}"),
        ));
    }
    Ok((digest, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(parts: &[&[u8]]) -> impl Stream<Item = Result<Bytes>> + Send + use<> {
        let owned: Vec<Result<Bytes>> = parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        futures::stream::iter(owned)
    }

    async fn read_all(store: &BlobStore, digest: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = store.read(digest).await.expect("read");
        while let Some(p) = s.next().await {
            out.extend_from_slice(&p.expect("piece"));
        }
        out
    }

    fn expect() -> Expect {
        Expect {
            limit_name: "--max-artifact-bytes",
            field: "header",
            ..Expect::default()
        }
    }

    #[tokio::test]
    async fn a_local_store_addresses_bytes_by_their_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::local(dir.path()).expect("store");
        let stored = store
            .put(pieces(&[b"hello ", b"world"]), &expect())
            .await
            .expect("put");
        store.address(&stored).await.expect("address");
        assert_eq!(stored.digest, digest_of(b"hello world"));
        assert_eq!(stored.size, 11);
        assert_eq!(read_all(&store, &stored.digest).await, b"hello world");
        // The same bytes again: the same address.
        let again = store
            .put(pieces(&[b"hello world"]), &expect())
            .await
            .expect("put again");
        store.address(&again).await.expect("address again");
        assert_eq!(
            (again.digest.clone(), again.size),
            (stored.digest.clone(), 11)
        );
        store.delete(&stored.digest).await.expect("delete");
        assert!(matches!(
            store.read(&stored.digest).await.err(),
            Some(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn refused_uploads_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::local(dir.path()).expect("store");
        let wrong_size = Expect {
            size: Some(3),
            ..expect()
        };
        let e = store.put(pieces(&[b"abcd"]), &wrong_size).await.err();
        assert!(
            matches!(&e, Some(Error::Invalid { field, .. }) if field == "header.size"),
            "{e:?}"
        );
        let wrong_digest = Expect {
            digest: Some(digest_of(b"other")),
            ..expect()
        };
        let e = store.put(pieces(&[b"abcd"]), &wrong_digest).await.err();
        assert!(
            matches!(&e, Some(Error::Invalid { field, .. }) if field == "header.digest"),
            "{e:?}"
        );
        let limited = Expect {
            max_bytes: 4,
            ..expect()
        };
        let e = store.put(pieces(&[b"abc", b"de"]), &limited).await.err();
        assert!(
            matches!(&e, Some(Error::ResourceExhausted(m)) if m.contains("--max-artifact-bytes")),
            "{e:?}"
        );
        let broken = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(Error::Aborted("the uploader went away".into())),
        ]);
        assert!(store.put(broken, &expect()).await.is_err());
        // Nothing was addressed, and no temporary object is left.
        let mut left = Vec::new();
        for entry in walk(dir.path()) {
            left.push(entry);
        }
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[tokio::test]
    async fn an_upload_abandoned_midway_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::local(dir.path()).expect("store");
        // One piece, then a stream that never ends: the call is dropped in the middle, as
        // when the client's call goes away.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(1);
        tx.send(Ok(Bytes::from(vec![1u8; 1000])))
            .await
            .expect("send");
        let upload = {
            let store = store.clone();
            tokio::spawn(async move {
                let e = expect();
                store
                    .put(tokio_stream::wrappers::ReceiverStream::new(rx), &e)
                    .await
            })
        };
        // Wait until the temporary object exists, then abandon the call.
        let tmp = dir.path().join(TMP);
        while walk(&tmp).is_empty() {
            tokio::task::yield_now().await;
        }
        upload.abort();
        let _ = upload.await;
        drop(tx);
        let mut left = walk(dir.path());
        for _ in 0..1000 {
            if left.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
            left = walk(dir.path());
        }
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files
    }

    #[test]
    fn digests_are_checked_and_normalised() {
        let hex = "AB".repeat(32);
        assert_eq!(
            parse_digest("d", &format!("sha256:{hex}")).expect("valid"),
            format!("sha256:{}", hex.to_ascii_lowercase())
        );
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(parse_digest("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn large_pieces_are_cut_to_the_chunk_size() {
        let piece = Bytes::from(vec![7u8; CHUNK_BYTES * 2 + 5]);
        let sizes: Vec<usize> = split(Ok(piece))
            .into_iter()
            .map(|p| p.map(|b| b.len()).unwrap_or(0))
            .collect();
        assert_eq!(sizes, vec![CHUNK_BYTES, CHUNK_BYTES, 5]);
    }
}
