//! Tar archives, the Docker engine's copy format, made and read as streams: the docker
//! executor copies a work's inputs into its container as one archive ([`pack`]) and reads
//! its artifacts out of the container as archives ([`unpack`]). Neither is ever whole in
//! memory: the `tar` crate works on blocking readers and writers, and [`Incoming`] and
//! [`Outgoing`] join those (on a blocking thread) to the engine's byte streams through small
//! bounded channels.
use std::{
    io::{self, Read, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Component, Path, PathBuf},
};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Writes `files` (name in the archive, file on this host) to `out` as a tar archive:
/// regular files, mode 0644, owned by root. Parent directories are not in it: the engine
/// makes missing ones, and leaves the image's own as they are.
pub fn pack(out: impl Write, files: &[(String, PathBuf)]) -> io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut builder = tar::Builder::new(out);
    for (name, path) in files {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(now);
        // Exactly `size` bytes, whatever happens to the file meanwhile.
        builder.append_data(&mut header, name, file.take(size))?;
    }
    builder.into_inner()?.flush()
}

/// What one attempt may write out of its container's archives at most, and what it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// Bytes at most (the runner's --max-artifact-transit-bytes).
    pub max_bytes: u64,
    /// Files at most.
    pub max_files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Files written.
    pub files: usize,
    /// A file did not fit: nothing more is written.
    pub spent: bool,
}

impl Budget {
    /// Nothing written yet.
    pub fn new(max_bytes: u64, max_files: usize) -> Self {
        Self {
            max_bytes,
            max_files,
            bytes: 0,
            files: 0,
            spent: false,
        }
    }

    /// Whether a file of `size` bytes fits.
    fn fits(&self, size: u64) -> bool {
        self.files < self.max_files && size <= self.max_bytes.saturating_sub(self.bytes)
    }

    /// The line for the attempt's stderr once it is spent.
    pub fn note(&self) -> Option<String> {
        if !self.spent {
            None
        } else if self.files >= self.max_files {
            Some(format!(
                "gantry: the artifacts read out of the container reached {} files; the rest were not read",
                self.max_files
            ))
        } else {
            Some(format!(
                "gantry: the artifacts read out of the container reached {} bytes (the runner's --max-artifact-transit-bytes); the rest were not read",
                self.max_bytes
            ))
        }
    }
}

/// What [`unpack`] wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Files written.
    pub files: usize,
    /// Lines for the attempt's stderr: links not stored.
    pub notes: Vec<String>,
}

/// Links an archive's notes name at most; past that, one line counts the rest.
const MAX_LINK_NOTES: usize = 20;

/// Reads a tar archive of one path out of a container into `dest`, which stands for that
/// path (`root`, relative to the workspace). The engine names entries after the path's last
/// component (`base`): that component is taken off every entry (`base` ".": leading `.`
/// components are). Only regular files that `wanted` takes (given their path relative to the
/// workspace) are written, with the directories above them, and only at paths that stay
/// under `dest`, until `budget` is spent. Symbolic links are not (a stderr line names each
/// wanted one), nor devices and the like; a hard link is written as a second name of the
/// file it links to when that file was written, and else is named on stderr. Nothing is ever
/// written through a link: none is made under `dest`.
pub fn unpack(
    input: impl Read,
    dest: &Path,
    base: &str,
    root: &Path,
    wanted: &dyn Fn(&Path) -> bool,
    budget: &mut Budget,
) -> io::Result<Unpacked> {
    let mut archive = tar::Archive::new(input);
    let mut unpacked = Unpacked::default();
    let mut links = 0usize;
    let mut note = |unpacked: &mut Unpacked, line: String| {
        links += 1;
        if links <= MAX_LINK_NOTES {
            unpacked.notes.push(line);
        } else if links == MAX_LINK_NOTES + 1 {
            unpacked
                .notes
                .push("gantry: more links were not stored".to_string());
        }
    };
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        // Directories are made for the files in them.
        if kind.is_dir() {
            continue;
        }
        let Some(rest) = under(&entry.path()?, base) else {
            continue;
        };
        // An empty rest is the path itself (`join` would give it a trailing `/`).
        let (target, rel) = if rest.as_os_str().is_empty() {
            (dest.to_path_buf(), root.to_path_buf())
        } else {
            (dest.join(&rest), root.join(&rest))
        };
        if !wanted(&rel) {
            continue;
        }
        let name = crate::executor::files::display_name(&rel);
        if kind.is_symlink() {
            note(&mut unpacked, crate::executor::files::link_note(&rel));
            continue;
        }
        if kind.is_hard_link() {
            let source = entry
                .link_name()?
                .and_then(|l| under(&l, base))
                .filter(|l| !l.as_os_str().is_empty())
                .map(|l| dest.join(l))
                .filter(|source| *source != target);
            // Only a file written here, which is no link: nothing else is made under `dest`.
            let written = source
                .as_ref()
                .is_some_and(|s| std::fs::symlink_metadata(s).is_ok_and(|m| m.is_file()));
            match source {
                Some(source) if written && budget.fits(0) => {
                    make_room(&target)?;
                    std::fs::hard_link(&source, &target)?;
                    budget.files += 1;
                    unpacked.files += 1;
                }
                _ if written => {
                    budget.spent = true;
                    break;
                }
                _ => note(
                    &mut unpacked,
                    format!("gantry: artifact {name:?} is a hard link; not stored"),
                ),
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = entry.size();
        if !budget.fits(size) {
            budget.spent = true;
            break;
        }
        make_room(&target)?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&target)?;
        let left = budget.max_bytes.saturating_sub(budget.bytes);
        let copied = io::copy(&mut (&mut entry).take(left), &mut out)?;
        budget.bytes += copied;
        budget.files += 1;
        unpacked.files += 1;
    }
    Ok(unpacked)
}

/// Makes the directories above `target` (under the transit directory, where no link is)
/// and removes a file already at it (an archive may name a path twice).
fn make_room(target: &Path) -> io::Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if !m.is_dir() => std::fs::remove_file(target),
        _ => Ok(()),
    }
}

/// An entry's path below the archive's root `base`; `None` for a path elsewhere or one with
/// a way out (`..`, a root).
fn under(path: &Path, base: &str) -> Option<PathBuf> {
    let mut components = path.components().filter(|c| *c != Component::CurDir);
    if base != "." {
        match components.next() {
            Some(Component::Normal(first)) if first == base => {}
            _ => return None,
        }
    }
    let mut rest = PathBuf::new();
    for c in components {
        match c {
            Component::Normal(c) => rest.push(c),
            _ => return None,
        }
    }
    Some(rest)
}

/// A blocking reader over bytes sent on a channel (a download as it comes). An `Err` sent
/// is the reader's error; the channel's end is the end of the bytes.
pub struct Incoming {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    buf: Bytes,
}

impl Incoming {
    /// Reads what comes on `rx`. Use from a blocking thread only.
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            buf: Bytes::new(),
        }
    }
}

impl Read for Incoming {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.buf = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// A blocking writer that sends what it is given on a channel (an upload's body). Wrap it
/// in a `BufWriter`: each write is one message.
pub struct Outgoing {
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl Outgoing {
    /// Sends on `tx`. Use from a blocking thread only.
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        Self { tx }
    }
}

impl Write for Outgoing {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(data)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_under_the_archives_root() {
        assert_eq!(
            under(Path::new("out/a/b"), "out"),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(under(Path::new("out"), "out"), Some(PathBuf::new()));
        assert_eq!(under(Path::new("./a"), "."), Some(PathBuf::from("a")));
        assert_eq!(under(Path::new("a"), "."), Some(PathBuf::from("a")));
        assert_eq!(under(Path::new("other/a"), "out"), None);
        assert_eq!(under(Path::new("out/../../etc"), "out"), None);
        assert_eq!(under(Path::new("/etc/passwd"), "."), None);
    }

    /// No limit, every path wanted.
    fn all() -> Budget {
        Budget::new(u64::MAX, usize::MAX)
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("file");
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        b.append_link(&mut h, name, target).expect("link");
    }

    /// An archive as the engine sends one for `out`: the directory, files, a link.
    fn engine_archive() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        b.append_data(&mut dir, "out/", io::empty()).expect("dir");
        file(&mut b, "out/a.txt", b"alpha");
        file(&mut b, "out/deep/b.bin", &[7u8; 3000]);
        link(&mut b, tar::EntryType::Symlink, "out/link", "/etc/passwd");
        b.into_inner().expect("archive")
    }

    #[test]
    fn an_archive_of_one_file_unpacks_to_that_file() {
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "result.txt", b"root");
        let archive = b.into_inner().expect("archive");
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("result.txt");
        let unpacked = unpack(
            &archive[..],
            &dest,
            "result.txt",
            Path::new("result.txt"),
            &|_| true,
            &mut all(),
        )
        .expect("unpacks");
        assert_eq!(unpacked.files, 1);
        assert_eq!(std::fs::read(dest).expect("file"), b"root");
    }

    #[test]
    fn an_engine_archive_unpacks_files_only_and_names_the_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let unpacked = unpack(
            &engine_archive()[..],
            &dest,
            "out",
            Path::new("out"),
            &|_| true,
            &mut all(),
        )
        .expect("unpacks");
        assert_eq!(
            unpacked,
            Unpacked {
                files: 2,
                notes: vec![
                    "gantry: artifact \"out/link\" is a symbolic link; not stored".to_string()
                ],
            }
        );
        assert_eq!(std::fs::read(dest.join("a.txt")).expect("a"), b"alpha");
        assert_eq!(
            std::fs::read(dest.join("deep/b.bin")).expect("b").len(),
            3000
        );
        assert!(std::fs::symlink_metadata(dest.join("link")).is_err());
    }

    #[test]
    fn only_wanted_files_are_written_and_no_more_than_the_budget() {
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "work/src/main.c", &[1u8; 100]);
        file(&mut b, "work/out/a.bin", &[2u8; 100]);
        file(&mut b, "work/out/b.bin", &[3u8; 100]);
        file(&mut b, "work/out/c.bin", &[4u8; 100]);
        let archive = b.into_inner().expect("archive");
        let wanted = crate::executor::files::Wanted::new(&["**/*.bin".to_string()]);
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("all");
        let mut budget = Budget::new(250, 10);
        let unpacked = unpack(
            &archive[..],
            &dest,
            "work",
            Path::new(""),
            &|p| wanted.wants(p),
            &mut budget,
        )
        .expect("unpacks");
        assert_eq!(unpacked.files, 2);
        assert!(!dest.join("src").exists(), "not wanted");
        assert!(dest.join("out/a.bin").exists() && dest.join("out/b.bin").exists());
        assert!(!dest.join("out/c.bin").exists(), "past the budget");
        assert_eq!((budget.bytes, budget.files, budget.spent), (200, 2, true));
        assert!(
            budget.note().is_some_and(
                |n| n.contains("reached 250 bytes (the runner's --max-artifact-transit-bytes)")
            ),
            "{:?}",
            budget.note()
        );

        // And no more files than the budget's.
        let mut budget = Budget::new(u64::MAX, 1);
        let dest = dir.path().join("one");
        let unpacked = unpack(
            &archive[..],
            &dest,
            "work",
            Path::new(""),
            &|_| true,
            &mut budget,
        )
        .expect("unpacks");
        assert_eq!(unpacked.files, 1);
        assert!(budget.spent);
        assert!(budget.note().is_some_and(|n| n.contains("reached 1 files")));
    }

    #[test]
    fn a_hard_link_is_a_second_name_of_a_file_written_else_named() {
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, "out/a", b"alpha");
        link(&mut b, tar::EntryType::Link, "out/b", "out/a");
        link(&mut b, tar::EntryType::Link, "out/c", "out/elsewhere");
        link(&mut b, tar::EntryType::Link, "out/d", "../../etc/passwd");
        link(&mut b, tar::EntryType::Link, "out/e", "/etc/passwd");
        let archive = b.into_inner().expect("archive");
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let unpacked = unpack(
            &archive[..],
            &dest,
            "out",
            Path::new("out"),
            &|_| true,
            &mut all(),
        )
        .expect("unpacks");
        assert_eq!(unpacked.files, 2);
        assert_eq!(std::fs::read(dest.join("b")).expect("b"), b"alpha");
        assert_eq!(
            unpacked.notes,
            ["c", "d", "e"]
                .map(|n| format!("gantry: artifact \"out/{n}\" is a hard link; not stored"))
        );
        for n in ["c", "d", "e"] {
            assert!(std::fs::symlink_metadata(dest.join(n)).is_err(), "{n}");
        }
    }

    #[test]
    fn packed_inputs_unpack_under_their_names_through_the_channels() {
        let src = tempfile::tempdir().expect("tempdir");
        let big = src.path().join("big");
        std::fs::write(&big, vec![1u8; 200_000]).expect("write");
        let small = src.path().join("small");
        std::fs::write(&small, b"s").expect("write");
        let long_name = format!("{}/x.bin", "d".repeat(150));
        let files = vec![("data/in.bin".to_string(), big), (long_name.clone(), small)];
        let (tx, rx) = mpsc::channel(4);
        let packer = std::thread::spawn(move || {
            let mut out = io::BufWriter::new(Outgoing::new(tx));
            pack(&mut out, &files).and_then(|()| out.flush())
        });
        let dest = tempfile::tempdir().expect("tempdir");
        let unpacked = unpack(
            Incoming::new(rx),
            dest.path(),
            ".",
            Path::new(""),
            &|_| true,
            &mut all(),
        )
        .expect("unpacks");
        packer.join().expect("packer").expect("packs");
        assert_eq!(unpacked.files, 2);
        assert_eq!(
            std::fs::read(dest.path().join("data/in.bin"))
                .expect("in")
                .len(),
            200_000
        );
        assert_eq!(
            std::fs::read(dest.path().join(long_name)).expect("long"),
            b"s"
        );
    }
}
