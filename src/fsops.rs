//! Symlink-safe filesystem access beneath a root directory.
//!
//! Every access drmirror makes to the source or a target goes through a
//! [`Root`]: the parent directory of an entry is opened with `openat2(2)`
//! and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and the entry itself is then
//! used with `*at` calls and `O_NOFOLLOW`. A symlink inside the tree is
//! therefore mirrored as a symlink and never followed, and no path — however
//! the source changes underneath us — can make drmirror read or write outside
//! the root. (A path through a symlink is simply "not there": the source no
//! longer holds that path as a directory entry, and its delete follows.)

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;

use crate::meta::{Kind, Meta};
use crate::paths;

/// The `openat2` resolution used for every lookup below a root.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// How a source file is opened for copying: never through a symlink, and
/// never blocking on a FIFO that replaced the file since it was seen.
const SOURCE_READ: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY);

/// Whether `O_NOATIME` is still tried: cleared by the first source file it
/// is refused for (not ours, and no `CAP_FOWNER`), so an unprivileged run
/// does not pay two opens per file.
static NOATIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Opens source file `name` in `dir` for copying ([`SOURCE_READ`]), without
/// updating its access time where allowed: a mirror's reads must not write
/// to the source (with `relatime`, the first read of every new file dirties
/// its inode, which costs an inode update per copy now and inode-table
/// writeback later, and hides from atime-based tools what users read).
pub fn open_source_at(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    use std::sync::atomic::Ordering;
    if NOATIME.load(Ordering::Relaxed) {
        match rustix::fs::openat(dir, name, SOURCE_READ | OFlags::NOATIME, Mode::empty()) {
            Err(Errno::PERM) => {
                let r = rustix::fs::openat(dir, name, SOURCE_READ, Mode::empty());
                if r.is_ok() {
                    NOATIME.store(false, Ordering::Relaxed);
                }
                return r;
            }
            r => return r,
        }
    }
    rustix::fs::openat(dir, name, SOURCE_READ, Mode::empty())
}

/// Prefix of drmirror's temporary files in a target. Leftovers of a crash are
/// removed by the startup scan.
pub const TEMP_PREFIX: &[u8] = b".drmirror-";
pub const TEMP_SUFFIX: &[u8] = b".tmp";

/// True for the names of drmirror's own temporary files.
pub fn is_temp_name(name: &[u8]) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// The numbers of this process's temporary files in flight (see
/// [`TempName`]).
static IN_FLIGHT: std::sync::Mutex<std::collections::BTreeSet<u64>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());
static TEMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The name of a temporary file in a target (`.drmirror-PID-N.tmp`), in
/// flight for as long as this value lives: hold it until the file is
/// renamed into place or removed.
///
/// Why a registry rather than the pid alone: a receiver serves connection
/// after connection with one pid, and a copy that failed without removing
/// its temp file (a connection lost mid-file, a path missed) left one that
/// its pid marked as in flight for the receiver's whole life (a 200,000-op
/// churn ended with one on the target). A name of this process that is
/// not registered is a leftover, and removed like an older process's.
pub struct TempName {
    name: Vec<u8>,
    n: u64,
}

impl TempName {
    pub fn register() -> TempName {
        let n = TEMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Registered before the name exists anywhere: a listing that sees
        // the file always finds it in flight.
        crate::locks::lock(&IN_FLIGHT).insert(n);
        let mut name = TEMP_PREFIX.to_vec();
        name.extend_from_slice(format!("{}-{n}", std::process::id()).as_bytes());
        name.extend_from_slice(TEMP_SUFFIX);
        TempName { name, n }
    }
}

impl std::ops::Deref for TempName {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.name
    }
}

impl Drop for TempName {
    fn drop(&mut self) {
        crate::locks::lock(&IN_FLIGHT).remove(&self.n);
    }
}

/// True for temporary files no copy of this process is writing: an
/// earlier process's (the pid is part of the name), or this one's once
/// its [`TempName`] is gone.
pub fn is_stale_temp_name(name: &[u8]) -> bool {
    if !is_temp_name(name) {
        return false;
    }
    let own = format!("{}-", std::process::id());
    let middle = &name[TEMP_PREFIX.len()..name.len() - TEMP_SUFFIX.len()];
    let Some(n) = middle.strip_prefix(own.as_bytes()) else {
        return true;
    };
    match std::str::from_utf8(n)
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(n) => !crate::locks::lock(&IN_FLIGHT).contains(&n),
        None => true,
    }
}

/// True for errors that mean "this path does not exist as a plain entry":
/// missing, or a parent that is no longer a directory or is now a symlink.
pub fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::ENOENT) | Some(libc_errno::ENOTDIR) | Some(libc_errno::ELOOP)
    )
}

/// The few errno values compared by number (rustix returns `io::Error`s
/// through `From<Errno>`, which keeps the raw number).
pub mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const ENOSPC: i32 = 28;
    pub const ELOOP: i32 = 40;
    pub const ENOTEMPTY: i32 = 39;
    pub const EAGAIN: i32 = 11;
}

fn cstr_name(name: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

/// A directory that drmirror reads or writes beneath, held open by fd.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens directory `rel` beneath the root; `read` opens it for listing,
    /// otherwise as an `O_PATH` handle for `*at` calls.
    pub fn open_dir(&self, rel: &[u8], read: bool) -> io::Result<OwnedFd> {
        let flags = if read {
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
        } else {
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
        };
        if rel.is_empty() {
            return open_beneath(self.fd.as_fd(), b".", flags);
        }
        // A path the kernel would refuse whole (ENAMETOOLONG past PATH_MAX)
        // is opened a piece at a time, each piece beneath the directory the
        // last one opened: a user who can write in the source can make a
        // chain of any depth, and it must neither stop capture nor go
        // unmirrored.
        let mut cur: Option<OwnedFd> = None;
        let mut rest = rel;
        while rest.len() > PATH_PIECE {
            let cut = piece_end(rest);
            let from = cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd());
            let fd = open_beneath(
                from,
                &rest[..cut],
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            )?;
            cur = Some(fd);
            rest = &rest[cut + 1..];
        }
        let from = cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd());
        open_beneath(from, rest, flags)
    }

    /// `lstat` of `rel`; `None` when it does not exist as a plain entry.
    pub fn lstat(&self, rel: &[u8]) -> io::Result<Option<Meta>> {
        Ok(self.stat_raw(rel)?.map(|st| Meta::from_stat(&st)))
    }

    /// The bytes a copy of `rel` takes on a filesystem: its size, or what
    /// it allocates when that is less (holes stay holes in a copy).
    pub fn space(&self, rel: &[u8]) -> io::Result<Option<u64>> {
        Ok(self.stat_raw(rel)?.map(|st| {
            let allocated = (st.st_blocks as u64).saturating_mul(512);
            (st.st_size as u64).min(allocated)
        }))
    }

    fn stat_raw(&self, rel: &[u8]) -> io::Result<Option<rustix::fs::Stat>> {
        let r = if rel.is_empty() {
            rustix::fs::fstat(&self.fd).map_err(io::Error::from)
        } else {
            let (parent, name) = paths::split(rel);
            self.open_dir(parent, false).and_then(|dir| {
                rustix::fs::statat(&dir, cstr_name(name)?.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io::Error::from)
            })
        };
        match r {
            Ok(st) => Ok(Some(st)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Root::lstat`] in one system call: the parents of `rel` are
    /// resolved like any path, so one swapped for a symlink is followed.
    /// Only for a guess at what to compare (see
    /// [`crate::sync::Compare::changed_dirs_first`]): whatever is then read
    /// or written is resolved beneath the root.
    pub fn lstat_quick(&self, rel: &[u8]) -> io::Result<Option<Meta>> {
        if rel.is_empty() || self.path.as_os_str().len() + rel.len() >= PATH_PIECE {
            return self.lstat(rel);
        }
        // rustix copies a short path to a buffer on the stack (and refuses
        // one holding a NUL byte).
        match rustix::fs::statat(&self.fd, rel, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Meta::from_stat(&st))),
            Err(e) => {
                let e = io::Error::from(e);
                if is_missing(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The text of symlink `rel`.
    pub fn read_link(&self, rel: &[u8]) -> io::Result<Vec<u8>> {
        let (parent, name) = paths::split(rel);
        let dir = self.open_dir(parent, false)?;
        read_link_at(dir.as_fd(), name)
    }

    /// Opens regular file `rel` for reading, without following a symlink and
    /// without blocking on a FIFO that replaced it. `None` when missing.
    pub fn open_file(&self, rel: &[u8]) -> io::Result<Option<(File, Meta)>> {
        let (parent, name) = paths::split(rel);
        let r = self
            .open_dir(parent, false)
            .and_then(|dir| open_source_at(dir.as_fd(), name).map_err(io::Error::from));
        match r {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)?;
                Ok(Some((File::from(fd), Meta::from_stat(&st))))
            }
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens (creating as needed) the directory `rel` beneath the root for
    /// `*at` calls. Components that exist as something other than a
    /// directory are removed first: the source holds a directory there.
    pub fn ensure_dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        self.ensure_dir_made(rel).map(|(fd, _)| fd)
    }

    /// [`Root::ensure_dir`], and the path of the first directory it had to
    /// create (`rel` itself or an ancestor), if any.
    pub fn ensure_dir_made(&self, rel: &[u8]) -> io::Result<(OwnedFd, Option<Vec<u8>>)> {
        match self.open_dir(rel, false) {
            Ok(fd) => return Ok((fd, None)),
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(e),
        }
        let mut cur = rustix::fs::openat(
            &self.fd,
            c".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut first_made = None;
        let mut len = 0;
        for comp in rel.split(|&b| b == b'/') {
            len += comp.len() + usize::from(len > 0);
            let name = cstr_name(comp)?;
            let (fd, made) = open_or_make_dir(cur.as_fd(), &name)?;
            if made && first_made.is_none() {
                first_made = Some(rel[..len].to_vec());
            }
            cur = fd;
        }
        Ok((cur, first_made))
    }
}

/// Longest path handed to the kernel in one piece: under `PATH_MAX`
/// (4,096 bytes with its NUL), with room for a root's own path where an
/// absolute one is built.
pub const PATH_PIECE: usize = 3072;

/// Where the first piece of `rel` (longer than [`PATH_PIECE`]) ends: at the
/// last `/` within it. A name is at most 255 bytes, so there is one.
fn piece_end(rel: &[u8]) -> usize {
    rel[..=PATH_PIECE]
        .iter()
        .rposition(|&b| b == b'/')
        .unwrap_or(PATH_PIECE)
}

/// `openat2` of `rel` beneath `dir`, retried while a concurrent rename races
/// the lookup (EAGAIN: the kernel asks callers to retry).
fn open_beneath(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let c = cstr_name(rel)?;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, c.as_c_str(), flags, Mode::empty(), BENEATH) {
            Err(Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// A path the kernel can use for directory `rel` of `root` where it takes
/// only a path (`inotify_add_watch`): the absolute path while it is short
/// enough, else `/proc/self/fd/N` of the directory opened beneath the root
/// in pieces (valid while the returned descriptor is open; that magic link
/// must then be followed).
pub fn kernel_path(root: &Root, rel: &[u8]) -> io::Result<(PathBuf, Option<OwnedFd>)> {
    let abs = paths::under(root.path(), rel);
    if abs.as_os_str().len() < PATH_PIECE {
        return Ok((abs, None));
    }
    let fd = root.open_dir(rel, false)?;
    let link = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((link, Some(fd)))
}

/// `lstat` of absolute path `p`; `None` when it cannot be had (gone, or a
/// path past `PATH_MAX`: callers treat that as "not there" and look again).
pub fn lstat_abs(p: &[u8]) -> Option<rustix::fs::Stat> {
    use std::os::unix::ffi::OsStrExt;
    rustix::fs::lstat(std::ffi::OsStr::from_bytes(p)).ok()
}

/// The absolute path of the directory open as `fd`, however long.
/// `/proc/self/fd/N` names at most `PATH_MAX` bytes (the kernel renders it
/// into one page and fails with ENAMETOOLONG past that); then the path is
/// found by walking up through `..` to the first ancestor it can name and
/// looking each directory up in its parent by inode, as `getcwd(3)` did
/// before the kernel had a system call for it. No crate does this.
/// `None` when the directory was deleted or cannot be walked.
pub fn dir_path(fd: BorrowedFd<'_>) -> Option<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = Vec::new();
    let mut cur = rustix::io::fcntl_dupfd_cloexec(fd, 0).ok()?;
    loop {
        match read_proc_link(cur.as_fd()) {
            Ok(link) => {
                let mut abs = link.into_bytes();
                if abs.ends_with(b" (deleted)") || !abs.starts_with(b"/") {
                    return None;
                }
                for n in names.iter().rev() {
                    if abs.len() > 1 {
                        abs.push(b'/');
                    }
                    abs.extend_from_slice(n);
                }
                return Some(abs);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {}
            Err(_) => return None,
        }
        // Deeper than any path can be: something is wrong, give up.
        if names.len() > 1 << 16 {
            return None;
        }
        let st = rustix::fs::fstat(&cur).ok()?;
        let parent = rustix::fs::openat(
            &cur,
            c"..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        names.push(name_in(parent.as_fd(), &st)?);
        cur = parent;
    }
}

/// `readlink` of `/proc/self/fd/N` for `fd`.
fn read_proc_link(fd: BorrowedFd<'_>) -> io::Result<std::ffi::CString> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::readlink(link.as_str(), Vec::new()).map_err(io::Error::from)
}

/// The name under which directory `dir` (its `stat`) appears in `parent`.
fn name_in(parent: BorrowedFd<'_>, dir: &rustix::fs::Stat) -> Option<Vec<u8>> {
    let same = |name: &CStr| {
        rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|s| (s.st_dev, s.st_ino) == (dir.st_dev, dir.st_ino))
    };
    let mut candidates = Vec::new();
    let entries = rustix::fs::Dir::read_from(parent).ok()?;
    for e in entries {
        let e = e.ok()?;
        let name = e.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        // The inode number readdir gives is that of the directory the
        // mount point hides, for a mount point: check each candidate.
        if e.ino() == dir.st_ino && same(name) {
            return Some(name.to_bytes().to_vec());
        }
        if matches!(
            e.file_type(),
            rustix::fs::FileType::Directory | rustix::fs::FileType::Unknown
        ) {
            candidates.push(name.to_owned());
        }
    }
    candidates
        .into_iter()
        .find(|n| same(n))
        .map(|n| n.into_bytes())
}

/// Opens directory `name` in `parent`, making it if missing; true if made.
fn open_or_make_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<(OwnedFd, bool)> {
    let open = |p: BorrowedFd<'_>| {
        rustix::fs::openat(
            p,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match open(parent) {
        Ok(fd) => return Ok((fd, false)),
        Err(Errno::NOENT) => {}
        Err(Errno::NOTDIR) | Err(Errno::LOOP) => remove_tree_at(parent, name.to_bytes())?,
        Err(e) => return Err(e.into()),
    }
    let made = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    Ok((open(parent)?, made))
}

/// Writes all of `data` to `fd`.
pub fn write_all(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        match rustix::io::write(fd, &data[off..]) {
            Ok(n) => off += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Removes `name` in `dir` if it is still the inode open as `fd` (a file
/// this process created and failed to complete; anything that replaced it
/// meanwhile is left alone). Best effort: an error here leaves the
/// incomplete file for the next comparison to replace.
pub fn unlink_if_same(dir: BorrowedFd<'_>, name: &[u8], fd: BorrowedFd<'_>) {
    let (Ok(ours), Ok(there)) = (
        rustix::fs::fstat(fd),
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
    ) else {
        return;
    };
    if (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino) {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
}

/// Reads a symlink's text relative to a directory fd.
pub fn read_link_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    let target = rustix::fs::readlinkat(dir, cstr_name(name)?.as_c_str(), Vec::new())?;
    Ok(target.into_bytes())
}

/// `lstat` of `name` in `dir`; `None` when missing.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Meta>> {
    match rustix::fs::statat(dir, cstr_name(name)?.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(Meta::from_stat(&st))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir`, recursively when it is a directory; never follows
/// symlinks. Missing is success.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let c = cstr_name(name)?;
    match rustix::fs::unlinkat(dir, c.as_c_str(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = match rustix::fs::openat(
        dir,
        c.as_c_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let names = list_dir(sub.as_fd())?;
    for child in names {
        remove_tree_at(sub.as_fd(), &child)?;
    }
    match rustix::fs::unlinkat(dir, c.as_c_str(), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether this process may create entries in directory `dir`: its
/// permissions for the effective user, and `EROFS` on a read-only mount.
pub fn writable(dir: impl AsFd) -> io::Result<()> {
    rustix::fs::accessat(
        dir,
        ".",
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
        rustix::fs::AtFlags::EACCESS,
    )?;
    Ok(())
}

/// The names in an open directory (without `.` and `..`), from its start
/// whatever was read from `dir` before.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0))?;
    let mut out = Vec::new();
    for_each_name(dir, |n, _| {
        out.push(n.to_bytes().to_vec());
        Ok(())
    })?;
    Ok(out)
}

/// Bytes of `getdents64` output read per call: glibc's `readdir` size, a
/// few hundred names.
const DIRENT_BUF: usize = 32 << 10;

thread_local! {
    static DIRENT: std::cell::RefCell<Vec<std::mem::MaybeUninit<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with each name in the open directory `dir` (read from its
/// current position; without `.` and `..`) and the type `getdents` gave
/// it (`Unknown` where the filesystem does not fill it in).
///
/// Hand-written over rustix's `RawDir` rather than its `Dir`: `Dir` reopens
/// the directory (an `openat` and a `close` per directory, several percent
/// of a reconciliation) and starts each directory with a buffer of a few
/// dozen entries; here one 32 KiB buffer per thread serves every directory.
pub fn for_each_name(
    dir: BorrowedFd<'_>,
    mut f: impl FnMut(&CStr, rustix::fs::FileType) -> io::Result<()>,
) -> io::Result<()> {
    for_each_entry(dir, |name, t, _| f(name, t))
}

/// [`for_each_name`], with each entry's inode number as `getdents` gave it
/// (on a mount point: the inode of the directory mounted over, not of the
/// mounted root).
pub fn for_each_entry(
    dir: BorrowedFd<'_>,
    mut f: impl FnMut(&CStr, rustix::fs::FileType, u64) -> io::Result<()>,
) -> io::Result<()> {
    // Taken out while in use: a nested call (none today) finds it empty
    // and reads through a buffer of its own.
    let mut buf = DIRENT.take();
    buf.resize(DIRENT_BUF, std::mem::MaybeUninit::uninit());
    let mut d = rustix::fs::RawDir::new(dir, buf.as_mut_slice());
    let mut r = Ok(());
    while let Some(ent) = d.next() {
        r = ent.map_err(io::Error::from).and_then(|ent| {
            let n = ent.file_name();
            match n.to_bytes() {
                b"." | b".." => Ok(()),
                _ => f(n, ent.file_type(), ent.ino()),
            }
        });
        if r.is_err() {
            break;
        }
    }
    DIRENT.set(buf);
    r
}

/// A timestamp for `utimensat`/`futimens` from nanoseconds since the epoch.
pub fn timespec(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// Timestamps that set mtime and leave atime alone.
pub fn mtime_only(ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT as _,
        },
        last_modification: timespec(ns),
    }
}

/// Sets mode, owner (when `owner`) and mtime of `name` in `dir` to `m`.
/// Symlinks get owner and mtime only (Linux has no symlink modes).
pub fn set_attrs_at(dir: BorrowedFd<'_>, name: &[u8], m: &Meta, owner: bool) -> io::Result<()> {
    let c = cstr_name(name)?;
    if owner {
        rustix::fs::chownat(
            dir,
            c.as_c_str(),
            Some(rustix::fs::Uid::from_raw(m.uid)),
            Some(rustix::fs::Gid::from_raw(m.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if m.kind != Kind::Symlink {
        // Linux's fchmodat cannot refuse to follow a symlink (fchmodat2 is
        // too new to rely on). The target is written by drmirror alone, so a
        // fresh lstat showing a non-symlink is enough to chmod by name.
        match lstat_at(dir, name)? {
            Some(cur) if cur.kind != Kind::Symlink => rustix::fs::chmodat(
                dir,
                c.as_c_str(),
                Mode::from_raw_mode(m.mode),
                AtFlags::empty(),
            )?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "entry vanished or became a symlink while setting attributes",
                ))
            }
        }
    }
    rustix::fs::utimensat(
        dir,
        c.as_c_str(),
        &mtime_only(m.mtime_ns),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_temp_name_is_in_flight_while_its_owner_holds_it() {
        let t = TempName::register();
        let name = t.to_vec();
        assert!(is_temp_name(&name) && !is_stale_temp_name(&name));
        drop(t);
        assert!(is_stale_temp_name(&name), "a leftover of this process");
        assert!(
            is_stale_temp_name(b".drmirror-1-7.tmp"),
            "another process's"
        );
        assert!(is_stale_temp_name(
            format!(".drmirror-{}-x.tmp", std::process::id()).as_bytes()
        ));
        assert!(!is_stale_temp_name(b"drmirror-1-7.tmp"), "not a temp name");
    }

    #[test]
    fn list_dir_reads_every_name_and_rereads_from_the_start() {
        let t = tempfile::tempdir().unwrap();
        // Long names, so the listing spans several 32 KiB getdents reads.
        let mut want: Vec<Vec<u8>> = (0..1500)
            .map(|i| format!("{i:05}-{}", "x".repeat(100)).into_bytes())
            .collect();
        want.push(b"new\nline".to_vec());
        want.push(b"bad-\xff\xfe-utf8".to_vec());
        for n in &want {
            std::fs::write(t.path().join(std::ffi::OsStr::from_bytes(n)), b"").unwrap();
        }
        want.sort();
        let fd = File::open(t.path()).unwrap();
        for _ in 0..2 {
            let mut got = list_dir(fd.as_fd()).unwrap();
            got.sort();
            assert_eq!(got, want);
        }
    }

    /// Paths past PATH_MAX: opened in pieces beneath the root, named by
    /// walking up, made with `ensure_dir`.
    #[test]
    fn a_path_deeper_than_path_max_is_opened_and_named() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let rel: Vec<u8> = (0..24)
            .map(|i| {
                let mut n = format!("{i:02}").into_bytes();
                n.resize(255, b'x');
                n
            })
            .collect::<Vec<_>>()
            .join(&b'/');
        assert!(rel.len() > 6000);
        let made = root.ensure_dir(&rel).unwrap();
        let opened = root.open_dir(&rel, true).unwrap();
        let (a, b) = (
            rustix::fs::fstat(&made).unwrap(),
            rustix::fs::fstat(&opened).unwrap(),
        );
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
        let mut want = t.path().as_os_str().as_bytes().to_vec();
        want.push(b'/');
        want.extend_from_slice(&rel);
        assert_eq!(dir_path(opened.as_fd()), Some(want));
        // A short one is read from /proc in one step.
        assert_eq!(
            dir_path(root.fd()),
            Some(t.path().as_os_str().as_bytes().to_vec())
        );
        // lstat of an entry at the bottom, and a symlink in the way refused.
        let file = [rel.as_slice(), b"/f"].concat();
        rustix::fs::openat(
            &opened,
            "f",
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap();
        assert_eq!(
            root.lstat_quick(&file).unwrap().map(|m| m.kind),
            Some(Kind::File)
        );
        let mid = made_symlink_at_level(&root, &rel, 15);
        assert!(
            is_missing(&root.open_dir(&rel, false).unwrap_err()),
            "{mid}"
        );
    }

    /// Replaces level `level` of `rel` with a symlink to itself's parent.
    fn made_symlink_at_level(root: &Root, rel: &[u8], level: usize) -> String {
        let parts: Vec<&[u8]> = rel.split(|&b| b == b'/').collect();
        let parent = parts[..level].join(&b'/');
        let pfd = root.open_dir(&parent, false).unwrap();
        let name = parts[level];
        rustix::fs::renameat(&pfd, name, &pfd, "moved").unwrap();
        rustix::fs::symlinkat("moved", &pfd, name).unwrap();
        String::from_utf8_lossy(&name[..2]).into_owned()
    }
}
