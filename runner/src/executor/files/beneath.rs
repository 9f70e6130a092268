//! Paths under a workspace, opened one component at a time from the workspace's own
//! directory and never through a symbolic link (`openat` with `O_NOFOLLOW`): a workspace a
//! job reuses may hold links an earlier job planted (`out -> /home/runner/.ssh`), and
//! neither an input written nor an artifact read may go through one. The workspace
//! directory itself is taken as it is named (it is the runner's, or the spec's
//! `working_dir`).
use std::{
    ffi::{OsStr, OsString},
    fmt,
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{AtFlags, OFlag, openat, renameat},
    sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat},
    unistd::{UnlinkatFlags, unlinkat},
};

/// Why a path under the workspace was not opened.
#[derive(Debug)]
pub enum Refusal {
    /// This path (relative to the workspace) is a symbolic link.
    Link(PathBuf),
    /// A component of the path is not there.
    Missing,
    /// This path is there but not what was needed, or the system said no.
    Other(PathBuf, io::Error),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Link(p) => write!(
                f,
                "{} in the workspace is a symbolic link (links are not followed)",
                p.display()
            ),
            Refusal::Missing => f.write_str("it is not there"),
            Refusal::Other(p, e) if p.as_os_str().is_empty() => write!(f, "{e}"),
            Refusal::Other(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

/// The file type of `name` in `dir`, the name itself (a link is a link).
pub fn kind_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<SFlag> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    Ok(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))
}

/// Opens directory `name` in `dir`, not through a link.
pub fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the workspace directory `root`.
pub fn open_root(root: &Path) -> Result<OwnedFd, Refusal> {
    nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Refusal::Other(root.to_path_buf(), e.into()))
}

/// What opening `name` in `dir` failing with `errno` means: not there, a link, or else.
fn refusal(dir: BorrowedFd<'_>, name: &OsStr, rel: &Path, errno: Errno) -> Refusal {
    if errno == Errno::ENOENT {
        return Refusal::Missing;
    }
    match kind_at(dir, name) {
        Ok(kind) if kind == SFlag::S_IFLNK => Refusal::Link(rel.to_path_buf()),
        Ok(kind) if errno == Errno::ENOTDIR || kind != SFlag::S_IFDIR => {
            Refusal::Other(rel.to_path_buf(), io::Error::other("not a directory"))
        }
        _ => Refusal::Other(rel.to_path_buf(), errno.into()),
    }
}

/// The components of a relative path (`..`, a root: not allowed).
fn names(rel: &Path) -> Result<Vec<&OsStr>, Refusal> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(Refusal::Other(
                rel.to_path_buf(),
                io::Error::other("not a plain relative path"),
            )),
        })
        .collect()
}

/// Opens directory `rel` under `root` (the workspace's directory), one component at a time
/// and through no link; `create`: making the directories that are not there.
pub fn descend(root: BorrowedFd<'_>, rel: &Path, create: bool) -> Result<OwnedFd, Refusal> {
    let mut dir = root
        .try_clone_to_owned()
        .map_err(|e| Refusal::Other(PathBuf::new(), e))?;
    let mut so_far = PathBuf::new();
    for name in names(rel)? {
        so_far.push(name);
        let opened = match open_dir(dir.as_fd(), name) {
            Err(Errno::ENOENT) if create => {
                match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o777)) {
                    Ok(()) | Err(Errno::EEXIST) => open_dir(dir.as_fd(), name),
                    Err(e) => return Err(Refusal::Other(so_far, e.into())),
                }
            }
            other => other,
        };
        dir = opened.map_err(|e| refusal(dir.as_fd(), name, &so_far, e))?;
    }
    Ok(dir)
}

/// Opens regular file `rel` under `root` for reading, through no link; with its size.
pub fn open_file(root: &Path, rel: &Path) -> Result<(File, u64), Refusal> {
    let name = rel
        .file_name()
        .ok_or_else(|| Refusal::Other(rel.to_path_buf(), io::Error::other("not a file name")))?;
    let top = open_root(root)?;
    let dir = descend(top.as_fd(), rel.parent().unwrap_or(Path::new("")), false)?;
    // O_NONBLOCK: a FIFO put there meanwhile does not hang the open.
    let fd = openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match refusal(dir.as_fd(), name, rel, e) {
        // ENOTDIR is no way to say a file is not a directory.
        Refusal::Other(p, _) if e != Errno::ENOTDIR => Refusal::Other(p, e.into()),
        r => r,
    })?;
    let st = fstat(&fd).map_err(|e| Refusal::Other(rel.to_path_buf(), e.into()))?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(Refusal::Other(
            rel.to_path_buf(),
            io::Error::other("not a regular file"),
        ));
    }
    Ok((File::from(fd), u64::try_from(st.st_size).unwrap_or(0)))
}

/// A file being written at `rel` under a workspace: written under a temporary name in its
/// directory, and given its name by [`Placing::commit`] (which replaces whatever file or
/// link had that name, never writing through one). Dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct Placing {
    dir: OwnedFd,
    temp: OsString,
    name: OsString,
    rel: PathBuf,
    done: bool,
}

impl Placing {
    /// Makes the directories of `rel` under `root` (`root` too) and a new file for it.
    pub fn start(root: &Path, rel: &Path) -> Result<(Placing, File), Refusal> {
        let name = rel.file_name().ok_or_else(|| {
            Refusal::Other(rel.to_path_buf(), io::Error::other("not a file name"))
        })?;
        std::fs::create_dir_all(root).map_err(|e| Refusal::Other(root.to_path_buf(), e))?;
        let top = open_root(root)?;
        let dir = descend(top.as_fd(), rel.parent().unwrap_or(Path::new("")), true)?;
        if kind_at(dir.as_fd(), name) == Ok(SFlag::S_IFDIR) {
            return Err(Refusal::Other(
                rel.to_path_buf(),
                io::Error::other("a directory is there"),
            ));
        }
        let temp = OsString::from(format!(".gantry-{:016x}.partial", rand::random::<u64>()));
        let fd = openat(
            dir.as_fd(),
            temp.as_os_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        )
        .map_err(|e| Refusal::Other(rel.to_path_buf(), e.into()))?;
        let placing = Placing {
            dir,
            temp,
            name: name.to_os_string(),
            rel: rel.to_path_buf(),
            done: false,
        };
        Ok((placing, File::from(fd)))
    }

    /// Gives the written file its name.
    pub fn commit(mut self) -> Result<(), Refusal> {
        renameat(
            self.dir.as_fd(),
            self.temp.as_os_str(),
            self.dir.as_fd(),
            self.name.as_os_str(),
        )
        .map_err(|e| Refusal::Other(self.rel.clone(), e.into()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Placing {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = unlinkat(
                self.dir.as_fd(),
                self.temp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            )
        {
            tracing::debug!(file = %self.rel.display(), error = %e, "removing a partial input");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    #[test]
    fn a_file_is_placed_under_new_directories_and_replaces_what_had_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ws");
        let (placing, mut f) = Placing::start(&root, Path::new("a/b/c.txt")).expect("starts");
        f.write_all(b"new").expect("write");
        placing.commit().expect("commit");
        assert_eq!(std::fs::read(root.join("a/b/c.txt")).expect("read"), b"new");

        // A link with the file's name is replaced, its target left alone.
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").expect("target");
        std::os::unix::fs::symlink(&target, root.join("a/link.txt")).expect("link");
        let (placing, mut f) = Placing::start(&root, Path::new("a/link.txt")).expect("starts");
        f.write_all(b"mine").expect("write");
        placing.commit().expect("commit");
        assert_eq!(std::fs::read(&target).expect("target"), b"keep");
        assert!(
            std::fs::symlink_metadata(root.join("a/link.txt"))
                .expect("placed")
                .is_file()
        );

        // Uncommitted, nothing is left; a directory with the name is not replaced.
        let (placing, _f) = Placing::start(&root, Path::new("a/x")).expect("starts");
        drop(placing);
        let mut left: Vec<_> = std::fs::read_dir(root.join("a"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["b", "link.txt"]);
        assert!(Placing::start(&root, Path::new("a/b")).is_err());
    }

    #[test]
    fn nothing_is_placed_or_read_through_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("ws");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).expect("ws");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("key.pem"), "secret").expect("key");
        std::os::unix::fs::symlink(&outside, root.join("secrets")).expect("link");
        std::os::unix::fs::symlink(outside.join("key.pem"), root.join("key")).expect("link");

        let refused = Placing::start(&root, Path::new("secrets/key.pem")).expect_err("refused");
        assert!(
            matches!(&refused, Refusal::Link(p) if p == Path::new("secrets")),
            "{refused:?}"
        );
        assert_eq!(
            refused.to_string(),
            "secrets in the workspace is a symbolic link (links are not followed)"
        );
        let refused = Placing::start(&root, Path::new("secrets/new/x")).expect_err("refused");
        assert!(matches!(refused, Refusal::Link(_)), "{refused:?}");
        assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 1);

        for rel in ["secrets/key.pem", "key"] {
            let refused = open_file(&root, Path::new(rel)).expect_err(rel);
            assert!(matches!(refused, Refusal::Link(_)), "{rel}: {refused:?}");
        }
        assert!(matches!(
            open_file(&root, Path::new("none")),
            Err(Refusal::Missing)
        ));
        assert!(matches!(
            open_file(&root, Path::new("secrets")),
            Err(Refusal::Link(_))
        ));
        std::fs::create_dir(root.join("d")).expect("dir");
        assert!(matches!(
            open_file(&root, Path::new("d")),
            Err(Refusal::Other(..))
        ));
        std::fs::write(root.join("d/f"), "data").expect("file");
        let (mut f, size) = open_file(&root, Path::new("d/f")).expect("opens");
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        assert_eq!((s.as_str(), size), ("data", 4));
        // A file where a directory is needed.
        let refused = Placing::start(&root, Path::new("d/f/g")).expect_err("refused");
        assert!(refused.to_string().contains("not a directory"), "{refused}");
    }
}
