//! Moving bytes to and from the server: a file (or standard input) read as a stream of
//! chunks for an upload, hashed on the way; a stream of chunks written to a file (or standard
//! output), hashed on the way and checked against the digest it must have.
//!
//! Memory stays bounded by a chunk or two whatever the size: nothing reads a whole file. An
//! upload always declares its size, so that the server refuses one that ends short: standard
//! input (or a FIFO) is first copied to a temporary file (under `$TMPDIR`, which must have
//! room for it) to learn it. A download to a file goes to a temporary file beside it, renamed
//! into place only once the digest checks out, so a failed download leaves no file that looks
//! whole.
use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt as _, stream::BoxStream};
use gantry_proto as pb;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::client::{CliError, Result, exit};

/// Bytes per message of an upload (the proto's limit for `data`).
pub const CHUNK_BYTES: usize = 1 << 20;

/// `sha256:<hex>` of what `hasher` took in.
pub fn digest_of(hasher: Sha256) -> String {
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// What the read side of an upload has seen: its byte count and hash so far, and the read
/// error that cut it short, if one did. Shared between the stream (which tonic owns while it
/// sends) and the command that reads it once the call is over.
#[derive(Debug, Default)]
pub struct Tally {
    /// Bytes read.
    pub bytes: u64,
    /// Their hash.
    hasher: Sha256,
    /// The read error that ended the stream early.
    pub error: Option<io::Error>,
}

/// A [`Tally`] the stream and the command share.
pub type SharedTally = Arc<Mutex<Tally>>;

/// The count, digest and read error of a finished upload's bytes.
pub fn finish(tally: &SharedTally) -> (u64, String, Option<io::Error>) {
    match tally.lock() {
        Ok(mut t) => {
            let hasher = std::mem::take(&mut t.hasher);
            (t.bytes, digest_of(hasher), t.error.take())
        }
        Err(_) => (
            0,
            String::new(),
            Some(io::Error::other("the upload's reader panicked")),
        ),
    }
}

/// The bytes of `reader` as a stream of chunks of at most [`CHUNK_BYTES`] (full ones but the
/// last), counted and hashed into `tally`. A read error ends the stream and is kept in
/// `tally` to be reported. The server takes the stream's end for the upload's: it refuses
/// one that ends short only because the upload declared its size, which is why every
/// [`Source`] knows its size.
pub fn chunks<R>(reader: R, tally: SharedTally) -> impl Stream<Item = Vec<u8>> + Send + 'static
where
    R: AsyncRead + Unpin + Send + 'static,
{
    futures::stream::unfold(Some(reader), move |reader| {
        let tally = tally.clone();
        async move {
            let mut reader = reader?;
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            let mut eof = false;
            while filled < CHUNK_BYTES {
                match reader.read(&mut buf[filled..]).await {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if let Ok(mut t) = tally.lock() {
                            t.error = Some(e);
                        }
                        return None;
                    }
                }
            }
            if filled == 0 {
                return None;
            }
            buf.truncate(filled);
            if let Ok(mut t) = tally.lock() {
                t.bytes += filled as u64;
                t.hasher.update(&buf);
            }
            Some((buf, (!eof).then_some(reader)))
        }
    })
}

/// Copies `reader` (`what` names it in errors) to a new temporary file under
/// `std::env::temp_dir()`, taken out of its directory at once (it goes with the process);
/// returns the file, read from its start, and its size. A read error is the upload's end
/// before anything was sent.
async fn spool<R>(mut reader: R, what: &str) -> Result<(tokio::fs::File, u64)>
where
    R: AsyncRead + Unpin,
{
    use tokio::io::AsyncSeekExt as _;
    let dir = std::env::temp_dir();
    let path = dir.join(format!(".gantry-upload-{:016x}", rand::random::<u64>()));
    let local = |e: io::Error| {
        CliError::new(
            exit::REFUSED,
            format!(
                "keeping {what} in a temporary file under {} (to learn its size before the upload): {e}; nothing was stored",
                dir.display()
            ),
        )
    };
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await
        .map_err(local)?;
    if let Err(e) = tokio::fs::remove_file(&path).await {
        tracing::warn!(file = %path.display(), error = %e, "removing a temporary file");
    }
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(CliError::new(
                    exit::REFUSED,
                    format!("reading {what}: {e} (nothing was stored)"),
                ));
            }
        };
        file.write_all(&buf[..n]).await.map_err(local)?;
        size += n as u64;
    }
    file.flush().await.map_err(local)?;
    file.seek(io::SeekFrom::Start(0)).await.map_err(local)?;
    Ok((file, size))
}

/// What an upload reads: a file, with its size. Its size goes in the upload's header, so
/// that the server refuses the upload if it ends short, whatever ended it (a read error, the
/// command killed: the server cannot tell a cancelled call's end from a finished one's).
/// Standard input, or a file whose size is not known in advance (a FIFO), is first copied to
/// a temporary file: a read error then fails the upload before anything is sent.
pub enum Source {
    /// A file and its size.
    File(tokio::fs::File, Option<u64>),
}

impl Source {
    /// Opens `path` (`-`: standard input); `what` names it in errors.
    pub async fn open(path: &Path, what: &str) -> Result<Source> {
        if path == Path::new("-") {
            return Source::spooled(tokio::io::stdin(), "standard input").await;
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| CliError::usage(format!("{what} {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| CliError::usage(format!("{what} {}: {e}", path.display())))?;
        if meta.is_dir() {
            return Err(CliError::usage(format!(
                "{what} {}: is a directory",
                path.display()
            )));
        }
        if !meta.is_file() {
            return Source::spooled(file, &path.display().to_string()).await;
        }
        Ok(Source::File(file, Some(meta.len())))
    }

    /// The bytes of `reader`, copied first to learn their size (see [`spool`]).
    async fn spooled<R: AsyncRead + Unpin>(reader: R, what: &str) -> Result<Source> {
        let (file, size) = spool(reader, what).await?;
        Ok(Source::File(file, Some(size)))
    }

    /// Its size.
    pub fn size(&self) -> Option<u64> {
        match self {
            Source::File(_, size) => *size,
        }
    }

    /// Its bytes as chunks, counted into `tally`.
    pub fn into_chunks(self, tally: SharedTally) -> BoxStream<'static, Vec<u8>> {
        match self {
            Source::File(file, _) => chunks(file, tally).boxed(),
        }
    }
}

/// Why an upload of `path` that the server may or may not have taken is not trusted: a read
/// error, or a file whose size changed while it was read. `None` when the bytes sent are the
/// file's.
pub fn read_problem(
    path: &Path,
    size: Option<u64>,
    sent: u64,
    error: Option<io::Error>,
) -> Option<CliError> {
    if let Some(e) = error {
        return Some(CliError::new(
            exit::REFUSED,
            format!("reading {}: {e} (nothing was stored)", path.display()),
        ));
    }
    match size {
        Some(size) if size != sent => Some(CliError::new(
            exit::REFUSED,
            format!(
                "{} changed while it was uploaded ({size} bytes, then {sent}); nothing was stored",
                path.display()
            ),
        )),
        _ => None,
    }
}

/// Where a download goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Standard output.
    Stdout,
    /// This file (replaced if it exists).
    File(PathBuf),
}

impl Dest {
    /// The destination `--to` names: `-` is standard output, an existing directory takes
    /// `base_name` in it, any other path is the file; without `--to`, `default`.
    pub fn from_flag(to: Option<&Path>, base_name: &str, default: Dest) -> Result<Dest> {
        match to {
            None => Ok(default),
            Some(p) if p == Path::new("-") => Ok(Dest::Stdout),
            Some(p) if p.is_dir() => {
                if base_name.is_empty() {
                    Err(CliError::usage(format!(
                        "--to {}: a directory, and the download has no name to take in it",
                        p.display()
                    )))
                } else {
                    Ok(Dest::File(p.join(base_name)))
                }
            }
            Some(p) => Ok(Dest::File(p.to_path_buf())),
        }
    }
}

/// An open destination of a download.
pub enum Sink {
    /// Standard output.
    Stdout(tokio::io::Stdout),
    /// A temporary file beside `dest`, renamed to it by [`Sink::commit`].
    File {
        /// The file written.
        file: tokio::fs::File,
        /// Its path.
        temp: PathBuf,
        /// Where it goes once complete.
        dest: PathBuf,
    },
}

impl Sink {
    /// Opens `dest` for writing (a file: its temporary file, made anew).
    pub async fn open(dest: &Dest) -> Result<Sink> {
        let path = match dest {
            Dest::Stdout => return Ok(Sink::Stdout(tokio::io::stdout())),
            Dest::File(path) => path,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| CliError::usage(format!("{}: not a file name", path.display())))?;
        let temp = dir.join(format!(
            ".{base}.{:016x}.gantry-partial",
            rand::random::<u64>()
        ));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?;
        Ok(Sink::File {
            file,
            temp,
            dest: path.clone(),
        })
    }

    fn writer(&mut self) -> &mut (dyn AsyncWrite + Unpin + Send) {
        match self {
            Sink::Stdout(out) => out,
            Sink::File { file, .. } => file,
        }
    }

    /// What it writes to, for messages.
    fn name(&self) -> String {
        match self {
            Sink::Stdout(_) => "standard output".into(),
            Sink::File { dest, .. } => dest.display().to_string(),
        }
    }

    /// Makes what was written final: flushed, and a file moved into place.
    pub async fn commit(self) -> Result<()> {
        let local =
            |name: String, e: io::Error| CliError::new(exit::REFUSED, format!("{name}: {e}"));
        match self {
            Sink::Stdout(mut out) => out
                .flush()
                .await
                .map_err(|e| local("standard output".into(), e)),
            Sink::File {
                mut file,
                temp,
                dest,
            } => {
                let done = async {
                    file.flush().await?;
                    file.sync_all().await?;
                    drop(file);
                    tokio::fs::rename(&temp, &dest).await
                }
                .await;
                if let Err(e) = done {
                    let _ = tokio::fs::remove_file(&temp).await;
                    return Err(local(dest.display().to_string(), e));
                }
                Ok(())
            }
        }
    }

    /// Drops what was written to a file (standard output cannot take it back).
    pub async fn discard(self) {
        if let Sink::File { file, temp, .. } = self {
            drop(file);
            let _ = tokio::fs::remove_file(&temp).await;
        }
    }
}

/// Writes the chunks of `stream` to `sink` in order and returns their count and digest;
/// `status_error` turns a failed stream into the user's error.
pub async fn receive(
    stream: &mut tonic::Streaming<pb::BlobChunk>,
    sink: &mut Sink,
    status_error: impl Fn(&tonic::Status) -> CliError,
) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| status_error(&s))?;
        if chunk.offset != received {
            return Err(CliError::new(
                exit::REFUSED,
                format!(
                    "the server sent bytes at offset {} where {received} was due",
                    chunk.offset
                ),
            ));
        }
        sink.writer()
            .write_all(&chunk.data)
            .await
            .map_err(|e| CliError::new(exit::REFUSED, format!("writing {}: {e}", sink.name())))?;
        hasher.update(&chunk.data);
        received += chunk.data.len() as u64;
    }
    Ok((received, digest_of(hasher)))
}

/// Receives `stream` into `dest` and checks it has `digest` (and `size`, when known): a file
/// is only put in place when it does. `what` names the bytes in errors (`artifact out.bin of
/// job J`).
pub async fn download(
    stream: &mut tonic::Streaming<pb::BlobChunk>,
    dest: &Dest,
    digest: &str,
    size: Option<u64>,
    what: &str,
    status_error: impl Fn(&tonic::Status) -> CliError,
) -> Result<u64> {
    let mut sink = Sink::open(dest).await?;
    let (received, got) = match receive(stream, &mut sink, status_error).await {
        Ok(r) => r,
        Err(e) => {
            sink.discard().await;
            return Err(e);
        }
    };
    let kept = match dest {
        Dest::Stdout => "they were written to standard output",
        Dest::File(_) => "nothing was written",
    };
    let problem = if got != digest {
        Some(format!(
            "the bytes of {what} that arrived have digest {got}, not {digest} ({kept})"
        ))
    } else {
        size.filter(|s| *s != received)
            .map(|size| format!("{what}: {received} bytes arrived, not {size} ({kept})"))
    };
    if let Some(problem) = problem {
        sink.discard().await;
        return Err(CliError::new(exit::REFUSED, problem));
    }
    sink.commit().await?;
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_full_counted_and_hashed() {
        let data: Vec<u8> = (0..(2 * CHUNK_BYTES + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        let tally = SharedTally::default();
        let sizes: Vec<usize> = chunks(std::io::Cursor::new(data.clone()), tally.clone())
            .map(|c| c.len())
            .collect()
            .await;
        assert_eq!(sizes, vec![CHUNK_BYTES, CHUNK_BYTES, 10]);
        let (bytes, digest, error) = finish(&tally);
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(digest, digest_of(Sha256::new_with_prefix(&data)));
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn nothing_is_no_chunk_with_the_empty_digest() {
        let tally = SharedTally::default();
        let n = chunks(std::io::Cursor::new(Vec::new()), tally.clone())
            .count()
            .await;
        assert_eq!(n, 0);
        let (bytes, digest, _) = finish(&tally);
        assert_eq!(bytes, 0);
        assert_eq!(
            digest,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// A reader that gives `good` bytes, then fails.
    struct Failing {
        good: usize,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.good == 0 {
                return std::task::Poll::Ready(Err(io::Error::other("EIO")));
            }
            let n = self.good.min(buf.remaining());
            buf.put_slice(&vec![7u8; n]);
            self.good -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_of_unknown_size_are_uploaded_with_their_size_or_not_at_all() {
        let data: Vec<u8> = (0..(CHUNK_BYTES + 10)).map(|i| (i % 251) as u8).collect();
        let source = Source::spooled(std::io::Cursor::new(data.clone()), "standard input")
            .await
            .map_err(|e| e.message)
            .expect("spooled");
        assert_eq!(source.size(), Some(data.len() as u64));
        let tally = SharedTally::default();
        let sent: Vec<u8> = source
            .into_chunks(tally.clone())
            .collect::<Vec<_>>()
            .await
            .concat();
        assert_eq!(sent, data);
        let (bytes, digest, error) = finish(&tally);
        assert_eq!(bytes, data.len() as u64);
        assert_eq!(digest, digest_of(Sha256::new_with_prefix(&data)));
        assert!(error.is_none());

        // A read error is the end before anything is sent (or a digest printed).
        let failed = Source::spooled(
            Failing {
                good: 3 * CHUNK_BYTES / 2,
            },
            "standard input",
        )
        .await
        .err()
        .map(|e| e.message);
        assert_eq!(
            failed.as_deref(),
            Some("reading standard input: EIO (nothing was stored)")
        );
    }

    #[tokio::test]
    async fn a_file_is_uploaded_with_its_size()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello")?;
        let source = Source::open(&path, "blob").await.map_err(|e| e.message)?;
        assert_eq!(source.size(), Some(5));
        assert!(
            Source::open(dir.path(), "blob").await.is_err(),
            "a directory"
        );
        Ok(())
    }

    #[test]
    fn a_file_that_changed_size_is_not_trusted() {
        let p = Path::new("out.bin");
        assert!(read_problem(p, Some(10), 10, None).is_none());
        assert!(read_problem(p, None, 7, None).is_none());
        let e = read_problem(p, Some(10), 12, None).map(|e| e.message);
        assert!(e.is_some_and(|m| m.contains("changed")));
        let e = read_problem(p, Some(10), 3, Some(io::Error::other("EIO"))).map(|e| e.message);
        assert!(e.is_some_and(|m| m.contains("EIO")));
    }

    #[test]
    fn to_names_a_file_a_directory_or_stdout() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let default = Dest::File("model.bin".into());
        assert_eq!(
            Dest::from_flag(None, "model.bin", default.clone()).ok(),
            Some(default.clone())
        );
        assert_eq!(
            Dest::from_flag(Some(Path::new("-")), "model.bin", default.clone()).ok(),
            Some(Dest::Stdout)
        );
        assert_eq!(
            Dest::from_flag(Some(dir.path()), "model.bin", default.clone()).ok(),
            Some(Dest::File(dir.path().join("model.bin")))
        );
        let file = dir.path().join("x");
        assert_eq!(
            Dest::from_flag(Some(&file), "model.bin", default).ok(),
            Some(Dest::File(file))
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_sink_puts_its_file_in_place_only_on_commit()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let dest = Dest::File(dir.path().join("a.txt"));
        let mut sink = Sink::open(&dest).await.map_err(|e| e.message)?;
        sink.writer().write_all(b"hello").await?;
        sink.discard().await;
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            0,
            "discard leaves nothing"
        );
        let mut sink = Sink::open(&dest).await.map_err(|e| e.message)?;
        sink.writer().write_all(b"hello").await?;
        sink.commit().await.map_err(|e| e.message)?;
        assert_eq!(std::fs::read(dir.path().join("a.txt"))?, b"hello");
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "no temporary file left"
        );
        Ok(())
    }
}
