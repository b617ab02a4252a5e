//! A mirror in a local directory.
//!
//! Files are written to a temporary name in their target directory and
//! renamed into place, so a reader of the target sees the old or the new
//! file, never a half-written one. Durability is per batch: the shipper
//! calls [`LocalTarget::sync`] (one `syncfs`) before the journal records
//! the batch as applied, which costs one flush per batch instead of one
//! `fsync` per file and still never lets the journal claim more than the
//! target's disk holds.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::{ApplyError, Outcome};
use crate::fidelity::{self, Handle, Keep, Refusals, Refused, Xattrs};
use crate::fsops::{self, Root};
use crate::journal::flags;
use crate::links::{Claim, Mirrored};
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::watch::self_ignore::SelfIgnore;

/// How often a file that changes while being copied is retried at once.
const COPY_TRIES: u32 = 3;

pub struct LocalTarget {
    root: Root,
    /// `syncfs` needs a readable fd; the root's is `O_PATH`.
    sync_fd: OwnedFd,
    owner: bool,
    /// O_TMPFILE + linkat works here (cleared at the first refusal).
    tmpfile: AtomicBool,
    /// Set when capture would see this target's writes (fanotify, same
    /// filesystem): each directory written into gets an ignore mark.
    ignore: OnceLock<Arc<SelfIgnore>>,
    /// Directories made on the target as parents of another entry, not by
    /// an entry of their own (see [`LocalTarget::take_made_parents`]);
    /// noted only for a daemon's shipper, which drains them (a receiver
    /// would let them pile up).
    made: std::sync::Mutex<Vec<Vec<u8>>>,
    note_made: AtomicBool,
    /// What is kept beyond content (see [`crate::fidelity`]).
    keep: Keep,
    refusals: Refusals,
    /// Where this target holds copies of hard-linked source files (see
    /// [`crate::links::Mirrored`]).
    mirrored: Arc<Mirrored>,
}

/// Owner, group and mode of a file as `open(O_CREAT | O_EXCL)` made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Created {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// What new files in one directory come out as, by the mode they were
/// created with, so that only the first of each needs an `fstat` (about a
/// twentieth of the receiver's CPU in an initial sync of small files).
///
/// Sound because the kernel derives them from nothing else: the owner is
/// the process's fsuid; the group its fsgid, or the directory's when the
/// directory is set-group-ID or the filesystem is mounted `grpid`; the mode
/// the one asked for, less the umask or as the directory's default ACL
/// says. Only a change to the directory's own group, set-group-ID bit or
/// default ACL would change the answer, and a memo serves one run of files
/// in one directory (see the receiver's `Session::parent`).
#[derive(Debug, Default)]
pub struct Born(Vec<(u32, Created)>);

impl Born {
    fn get(&self, asked: u32) -> Option<Created> {
        self.0.iter().find(|(a, _)| *a == asked).map(|(_, c)| *c)
    }

    fn put(&mut self, asked: u32, c: Created) {
        // A directory's files have a handful of modes at most; a peer
        // sending every mode gets an fstat per file, not a growing list.
        if self.0.len() < 8 {
            self.0.push((asked, c));
        }
    }
}

/// A file being written from a stream (the receiver's side of a copy).
pub struct TempFile {
    dir: Arc<OwnedFd>,
    pub out: OwnedFd,
    tmp: Option<fsops::TempName>,
}

/// The result of a delete policy decision for a path whose source is gone.
#[derive(Clone, Copy, Debug)]
pub struct DeletePolicy {
    pub at_startup: bool,
    pub while_running: bool,
}

impl DeletePolicy {
    pub fn allows(self, f: u8) -> bool {
        (f & flags::STARTUP != 0 && self.at_startup) || (f & flags::LIVE != 0 && self.while_running)
    }
}

impl LocalTarget {
    /// Opens (creating if needed) the target directory.
    pub fn open(path: &Path, owner: bool) -> io::Result<LocalTarget> {
        std::fs::create_dir_all(path)?;
        let sync_fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(LocalTarget {
            root: Root::open(path)?,
            sync_fd,
            owner,
            tmpfile: AtomicBool::new(true),
            ignore: OnceLock::new(),
            made: Default::default(),
            note_made: AtomicBool::new(false),
            keep: Keep::all(),
            refusals: Refusals::new(&path.display().to_string()),
            mirrored: Arc::default(),
        })
    }

    /// This target keeps `keep` (everything by default) and is called
    /// `name` in warnings and metrics.
    pub fn keeping(mut self, keep: Keep, name: &str) -> LocalTarget {
        self.keep = keep;
        self.refusals = Refusals::new(name);
        self
    }

    /// Notes that this target holds a current copy of hard-linked source
    /// file `rel` (`m`); false when another name remembered for it is a
    /// separate current copy (see [`super::Target::note_mirrored`]).
    pub fn note_mirrored(&self, rel: &[u8], m: &Meta) -> bool {
        let Some(other) = self.mirrored.note((m.dev, m.ino), rel) else {
            return true;
        };
        match (self.root.lstat(rel), self.root.lstat(&other)) {
            (Ok(Some(a)), Ok(Some(b))) if b.size == m.size && b.mtime_ns == m.mtime_ns => {
                a.ino == b.ino && a.dev == b.dev
            }
            // The other is not a current copy: nothing to link to.
            _ => true,
        }
    }

    pub fn keep(&self) -> Keep {
        self.keep
    }

    /// What this target refused so far (see [`Refusals`]).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// Gives `h` (`rel` on the target) the attributes `x`; notes and
    /// returns what the target refused.
    fn put_xattrs(&self, h: Handle<'_>, x: Option<&Xattrs>, rel: &[u8]) -> io::Result<Refused> {
        let Some(x) = x else { return Ok(Vec::new()) };
        let refused = fidelity::apply(h, x)?;
        for k in &refused {
            self.refusals.note(k, &paths::display(rel));
        }
        Ok(refused)
    }

    /// The source attributes of `h` this target keeps.
    fn source_xattrs(&self, h: Handle<'_>, rel: &[u8]) -> Result<Option<Xattrs>, ApplyError> {
        self.keep
            .read(h)
            .map_err(|e| ApplyError::source_read(rel, e))
    }

    /// Whether entry `name` of target directory `dir` already mirrors `m`
    /// (and `same` holds): then it is given the attributes `x` and left.
    fn unchanged(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
        rel: &[u8],
        same: impl FnOnce() -> bool,
    ) -> Result<bool, ApplyError> {
        match fsops::lstat_at(dir, name) {
            Ok(Some(t)) if m.mirrors(&t, self.owner) && same() => {
                self.put_xattrs(Handle::At(dir, name), x, rel)
                    .map_err(|e| ApplyError::target_write(rel, e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Owner, mode, mtime and attributes of entry `name` in `dir`.
    fn attrs_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
        rel: &[u8],
    ) -> io::Result<Refused> {
        fsops::set_attrs_at(dir, name, m, self.owner)?;
        self.put_xattrs(Handle::At(dir, name), x, rel)
    }

    /// A readable descriptor of the target directory (the root's is
    /// `O_PATH`): for `syncfs` and the target's mark.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.sync_fd.as_fd()
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// `Err(why)` when the target's path no longer names the directory held
    /// open here (see [`crate::target::identity::still_at`]).
    pub fn still_at_path(&self) -> Result<(), String> {
        let held = crate::target::identity::file_id(self.dir_fd())
            .map_err(|e| format!("cannot look at the held directory: {e}"))?;
        crate::target::identity::still_at(self.root.path(), held)
    }

    /// The bytes free for an unprivileged writer on the target's
    /// filesystem (`f_bavail`: what is left once root's reserve is set
    /// aside, the conservative answer for a copy that must fit).
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = rustix::fs::fstatvfs(self.root.fd())?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Keeps this target's writes out of the capture queue from now on.
    pub fn ignore_own_writes(&self, ig: Arc<SelfIgnore>) {
        let _ = self.ignore.set(ig);
    }

    /// A target directory about to be written into.
    fn writing_in(&self, dir: BorrowedFd<'_>) {
        if let Some(ig) = self.ignore.get() {
            ig.dir(dir);
        }
    }

    /// Flushes everything written so far to the target's disk.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::syncfs(&self.sync_fd)?;
        Ok(())
    }

    fn temp_name(&self) -> fsops::TempName {
        fsops::TempName::register()
    }

    /// Renames `from` to `to` on the target. `Ok(false)` when the target does
    /// not hold `from` as expected; the caller then copies instead.
    pub fn rename(&self, from: &[u8], to: &[u8]) -> Result<bool, ApplyError> {
        let (fp, fname) = paths::split(from);
        let (tp, tname) = paths::split(to);
        let fdir = match self.root.open_dir(fp, false) {
            Ok(d) => d,
            Err(e) if fsops::is_missing(&e) => return Ok(false),
            Err(e) => return Err(ApplyError::target_write(from, e)),
        };
        match fsops::lstat_at(fdir.as_fd(), fname) {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(false),
            Err(e) => return Err(ApplyError::target_write(from, e)),
        }
        let tdir = self.ensure_parent(tp, to)?;
        match rustix::fs::renameat(&fdir, fname, &tdir, tname) {
            Ok(()) => Ok(true),
            // Type clash or a non-empty directory in the way: fall back to
            // per-path sync, which replaces whatever is there.
            Err(rustix::io::Errno::NOTEMPTY)
            | Err(rustix::io::Errno::ISDIR)
            | Err(rustix::io::Errno::NOTDIR)
            | Err(rustix::io::Errno::NOENT)
            | Err(rustix::io::Errno::INVAL) => Ok(false),
            Err(e) => Err(ApplyError::target_write(to, e.into())),
        }
    }

    /// Applies entries that share one parent directory (`rels` all have
    /// parent `parent`): both parents are opened once for the run instead of
    /// once per entry, which is most of the per-file cost of small files.
    pub fn apply_group(
        &self,
        source: &Root,
        parent: &[u8],
        entries: &[(&[u8], u8)],
        vouch: &[super::Vouch],
        policy: DeletePolicy,
    ) -> Vec<Result<Outcome, ApplyError>> {
        let src_dir = match source.open_dir(parent, false) {
            Ok(d) => Some(d),
            Err(e) if fsops::is_missing(&e) => None,
            Err(e) => {
                return entries
                    .iter()
                    .map(|(rel, _)| Err(ApplyError::source_read(rel, io::Error::from(e.kind()))))
                    .collect()
            }
        };
        let mut tdir: Option<OwnedFd> = None;
        entries
            .iter()
            .enumerate()
            .map(|(i, &(rel, f))| {
                let v = vouch.get(i).copied().unwrap_or(super::Vouch::Metadata);
                let Some(sd) = src_dir.as_ref() else {
                    if super::needs_doubt(f, v, None) {
                        return Ok(Outcome::NeedsDoubt);
                    }
                    return self.remove(rel, f, policy);
                };
                let name = paths::split(rel).1;
                if f & flags::LISTED_FILE != 0 && !rel.is_empty() {
                    // `file_at` finds out by its own `fstat` (see the flag),
                    // and whether a doubt is needed.
                    return self.file_in(sd.as_fd(), &mut tdir, rel, f, v);
                }
                // The root (a rescan after a queue overflow) has no name
                // in a parent directory.
                let m = if rel.is_empty() {
                    source.lstat(rel)
                } else {
                    fsops::lstat_at(sd.as_fd(), name)
                }
                .map_err(|e| ApplyError::source_read(rel, e))?;
                if super::needs_doubt(f, v, m.as_ref()) {
                    return Ok(Outcome::NeedsDoubt);
                }
                match m {
                    None => self.remove(rel, f, policy),
                    Some(m) => match m.kind {
                        Kind::Other => Ok(Outcome::Special),
                        Kind::Dir => self.dir(rel, &m, f),
                        Kind::Symlink => self.symlink(source, sd.as_fd(), rel, f),
                        Kind::File => self.file_in(sd.as_fd(), &mut tdir, rel, f, v),
                        _ => self.special(sd.as_fd(), rel, &m, f),
                    },
                }
            })
            .collect()
    }

    /// [`LocalTarget::file_at`] with the group's target directory, opened
    /// by the first file that needs it.
    fn file_in(
        &self,
        sd: BorrowedFd<'_>,
        tdir: &mut Option<OwnedFd>,
        rel: &[u8],
        f: u8,
        vouch: super::Vouch,
    ) -> Result<Outcome, ApplyError> {
        let td = match tdir.take() {
            Some(td) => td,
            None => self.parent_dir(rel)?,
        };
        let r = self.file_at(sd, td.as_fd(), rel, f, vouch);
        *tdir = Some(td);
        r
    }

    fn remove(&self, rel: &[u8], f: u8, policy: DeletePolicy) -> Result<Outcome, ApplyError> {
        if rel.is_empty() {
            // The source root itself is gone; never wipe the mirror for it.
            return Ok(Outcome::DeleteSkipped);
        }
        if !policy.allows(f) {
            return Ok(Outcome::DeleteSkipped);
        }
        let (parent, name) = paths::split(rel);
        match self.root.open_dir(parent, false) {
            Ok(dir) => {
                self.writing_in(dir.as_fd());
                fsops::remove_tree_at(dir.as_fd(), name)
                    .map_err(|e| ApplyError::target_write(rel, e))?;
                Ok(Outcome::Deleted)
            }
            Err(e) if fsops::is_missing(&e) => Ok(Outcome::Deleted),
            Err(e) => Err(ApplyError::target_write(rel, e)),
        }
    }

    fn dir(&self, rel: &[u8], m: &Meta, f: u8) -> Result<Outcome, ApplyError> {
        if rel.is_empty() {
            return Ok(Outcome::Dir {
                meta: *m,
                created: false,
                scan: f & flags::RECURSIVE != 0,
            });
        }
        let existed = matches!(self.root.lstat(rel), Ok(Some(t)) if t.kind == Kind::Dir);
        let (d, made) = self
            .root
            .ensure_dir_made(rel)
            .map_err(|e| ApplyError::target_write(rel, e))?;
        // Its own making is this entry's; an ancestor's is not.
        if let Some(m) = made.filter(|m| m.as_slice() != rel) {
            self.note_made(m);
        }
        self.writing_in(d.as_fd());
        Ok(Outcome::Dir {
            meta: *m,
            created: !existed,
            // A directory new on the target needs its subtree compared when
            // the change was seen live (it may hold entries no event named);
            // the startup scan already walks the whole tree itself.
            scan: f & flags::RECURSIVE != 0 || (!existed && f & flags::LIVE != 0),
        })
    }

    /// Ensures directory `rel` exists; true when it had to be created.
    pub fn make_dir(&self, rel: &[u8]) -> Result<bool, ApplyError> {
        let existed = matches!(self.root.lstat(rel), Ok(Some(t)) if t.kind == Kind::Dir);
        self.root
            .ensure_dir(rel)
            .map_err(|e| ApplyError::target_write(rel, e))?;
        Ok(!existed)
    }

    /// Removes `rel` (recursively); missing is success.
    pub fn delete(&self, rel: &[u8]) -> Result<(), ApplyError> {
        let (parent, name) = paths::split(rel);
        match self.root.open_dir(parent, false) {
            Ok(dir) => fsops::remove_tree_at(dir.as_fd(), name)
                .map_err(|e| ApplyError::target_write(rel, e)),
            Err(e) if fsops::is_missing(&e) => Ok(()),
            Err(e) => Err(ApplyError::target_write(rel, e)),
        }
    }

    /// Puts symlink `rel` with `text` and the attributes of `m` in place.
    pub fn put_symlink(
        &self,
        rel: &[u8],
        text: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Refused, ApplyError> {
        let dir = self.parent_dir(rel)?;
        let tmp = self.temp_name();
        rustix::fs::symlinkat(text, &dir, &*tmp)
            .map_err(|e| ApplyError::target_write(rel, e.into()))?;
        self.install_made(dir.as_fd(), &tmp, m, x, rel)
    }

    /// Puts special file `rel` (a FIFO, a socket's entry, a device) with
    /// `m`'s type, device number and attributes in place. A device this
    /// process may not make is a refusal (see [`crate::fidelity`]).
    pub fn put_special(
        &self,
        rel: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Refused, ApplyError> {
        let Some(ft) = m.kind.file_type() else {
            return Err(ApplyError::target_write(
                rel,
                io::Error::new(io::ErrorKind::InvalidInput, "not a special file"),
            ));
        };
        let dir = self.parent_dir(rel)?;
        let tmp = self.temp_name();
        match rustix::fs::mknodat(&dir, &*tmp, ft, Mode::from_raw_mode(m.mode & 0o777), m.rdev) {
            Ok(()) => {}
            Err(rustix::io::Errno::PERM) if m.kind.is_device() => {
                self.refusals.note("device", &paths::display(rel));
                return Ok(vec!["device"]);
            }
            Err(e) => return Err(ApplyError::target_write(rel, e.into())),
        }
        self.install_made(dir.as_fd(), &tmp, m, x, rel)
    }

    /// Gives entry `tmp`, just made in `dir`, `m`'s attributes and `x`,
    /// and puts it in place as `rel`; removes it on failure.
    fn install_made(
        &self,
        dir: BorrowedFd<'_>,
        tmp: &fsops::TempName,
        m: &Meta,
        x: Option<&Xattrs>,
        rel: &[u8],
    ) -> Result<Refused, ApplyError> {
        let refused = match self.attrs_at(dir, tmp, m, x, rel) {
            Ok(r) => r,
            Err(e) => {
                let _ = rustix::fs::unlinkat(dir, &**tmp, rustix::fs::AtFlags::empty());
                return Err(ApplyError::target_write(rel, e));
            }
        };
        self.install(dir, tmp, paths::split(rel).1, rel)?;
        Ok(refused)
    }

    /// Starts writing file `rel` from a stream: its parent directory and a
    /// temp file in it (see [`LocalTarget::finish_file`]).
    /// `mode` is the file's final mode: the temp file is created with its
    /// permission bits (invisible until complete either way), which spares
    /// the `fchmod` at the end when the umask let them through.
    pub fn begin_file(&self, rel: &[u8], mode: u32) -> Result<TempFile, ApplyError> {
        self.begin_file_in(self.parent_of(rel)?, rel, mode)
    }

    /// [`LocalTarget::begin_file`] in `dir`, which [`LocalTarget::parent_of`]
    /// opened for `rel` (or for a sibling, with nothing renamed or removed
    /// since: the caller's to ensure).
    pub fn begin_file_in(
        &self,
        dir: Arc<OwnedFd>,
        rel: &[u8],
        mode: u32,
    ) -> Result<TempFile, ApplyError> {
        let (out, tmp) = self.create_temp_mode(dir.as_fd(), rel, mode & 0o777)?;
        Ok(TempFile { dir, out, tmp })
    }

    /// The parent directory of `rel`, created as needed, resolved beneath
    /// the root.
    pub fn parent_of(&self, rel: &[u8]) -> Result<Arc<OwnedFd>, ApplyError> {
        self.parent_dir(rel).map(Arc::new)
    }

    /// Gives a complete temp file the attributes of `m` and puts it in
    /// place as `rel`.
    pub fn finish_file(
        &self,
        f: TempFile,
        rel: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Refused, ApplyError> {
        let refused = match self
            .finish_attrs(&f.out, m, None)
            .and_then(|_| self.put_xattrs(Handle::Fd(f.out.as_fd()), x, rel))
        {
            Ok(r) => r,
            Err(e) => {
                self.abort_file(f);
                return Err(ApplyError::target_write(rel, e));
            }
        };
        let name = paths::split(rel).1;
        match f.tmp {
            Some(t) => {
                drop(f.out);
                self.install(f.dir.as_fd(), &t, name, rel)?
            }
            None => self.link_tmpfile(&f.out, f.dir.as_fd(), name, rel)?,
        }
        Ok(refused)
    }

    /// Ends a streamed file at `size` bytes: what it ended with may have
    /// been a hole, skipped rather than written.
    pub fn set_len(&self, f: &TempFile, size: u64) -> io::Result<()> {
        rustix::fs::ftruncate(&f.out, size)?;
        Ok(())
    }

    /// Creates file `rel` in `dir` (its parent, from
    /// [`LocalTarget::parent_of`]) with content `data` and `m`'s attributes,
    /// at its name directly: for a small file the sender believes absent,
    /// whose content is in hand and verified. `Ok(false)`, with nothing
    /// touched, when anything is at the name already (`O_EXCL`, which also
    /// refuses a symlink there): the caller then replaces it through a temp
    /// file as usual. On a failed write the file is removed again.
    ///
    /// Why: an `O_TMPFILE` inode goes on the filesystem's orphan list and
    /// comes off it at the link, two more metadata updates plus a second
    /// system call per file. A receiver in an initial sync of small files
    /// spends most of its time creating and linking; see the README's
    /// bench-remote row for what this saves. What it gives up: for the
    /// microseconds between the create and the last attribute, a reader on
    /// the target (or a receiver killed right then) sees the new file
    /// incomplete, where a temp file would show nothing. Only a name that
    /// held nothing before is ever exposed so, never an older good copy.
    ///
    /// `born`: what the files created so far in `dir` came out as (see
    /// [`Born`]); the caller keeps one per directory.
    pub fn put_new_file(
        &self,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        data: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
        born: &mut Born,
    ) -> Result<Option<Refused>, ApplyError> {
        let name = paths::split(rel).1;
        let out = match rustix::fs::openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(m.mode & 0o777),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::EXIST) => return Ok(None),
            Err(e) => return Err(ApplyError::target_write(rel, e.into())),
        };
        let asked = m.mode & 0o777;
        let known = born.get(asked);
        let r = fsops::write_all(out.as_fd(), data)
            .and_then(|()| self.finish_attrs(&out, m, known))
            .and_then(|got| {
                if known.is_none() {
                    born.put(asked, got);
                }
                self.put_xattrs(Handle::Fd(out.as_fd()), x, rel)
            });
        match r {
            Ok(refused) => Ok(Some(refused)),
            Err(e) => {
                fsops::unlink_if_same(dir, name, out.as_fd());
                Err(ApplyError::target_write(rel, e))
            }
        }
    }

    /// Gives a fresh temp file `m`'s owner, mode and mtime. On a journaling
    /// filesystem each attribute change of the inode is a metadata update:
    /// skip those it does not need (a stat is far cheaper; a file created
    /// with its final mode by the owner it should have needs only its
    /// mtime). fchown clears set-id bits, so the mode is set after it.
    ///
    /// `known`: the file's attributes as created, when the caller knows
    /// them (see [`Born`]); otherwise they are read. Returns them.
    fn finish_attrs(&self, out: &OwnedFd, m: &Meta, known: Option<Created>) -> io::Result<Created> {
        let st = match known {
            Some(c) => c,
            None => {
                let st = rustix::fs::fstat(out)?;
                Created {
                    uid: st.st_uid,
                    gid: st.st_gid,
                    mode: st.st_mode,
                }
            }
        };
        if self.owner && (st.uid != m.uid || st.gid != m.gid) {
            rustix::fs::fchown(
                out,
                Some(rustix::fs::Uid::from_raw(m.uid)),
                Some(rustix::fs::Gid::from_raw(m.gid)),
            )?;
            rustix::fs::fchmod(out, Mode::from_raw_mode(m.mode))?;
        } else if st.mode & 0o7777 != m.mode & 0o7777 {
            rustix::fs::fchmod(out, Mode::from_raw_mode(m.mode))?;
        }
        rustix::fs::futimens(out, &fsops::mtime_only(m.mtime_ns))?;
        Ok(st)
    }

    /// Drops an unfinished temp file.
    pub fn abort_file(&self, f: TempFile) {
        if let Some(t) = f.tmp {
            let _ = rustix::fs::unlinkat(f.dir.as_fd(), &*t, rustix::fs::AtFlags::empty());
        }
    }

    /// Sets a target directory's attributes to the source's current ones.
    pub fn set_dir_attrs(
        &self,
        rel: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Refused, ApplyError> {
        let r = if rel.is_empty() {
            self.set_root_attrs(m)
                .and_then(|()| self.put_xattrs(Handle::At(self.root.fd(), b""), x, rel))
        } else {
            let (parent, name) = paths::split(rel);
            self.root
                .open_dir(parent, false)
                .and_then(|d| self.attrs_at(d.as_fd(), name, m, x, rel))
        };
        match r {
            Ok(r) => Ok(r),
            Err(e) if fsops::is_missing(&e) => Ok(Vec::new()),
            Err(e) => Err(ApplyError::target_write(rel, e)),
        }
    }

    /// [`LocalTarget::set_dir_attrs`] with the attributes read from
    /// `source`'s directory `rel` (a daemon's own target).
    pub fn set_dir_attrs_from(
        &self,
        source: &Root,
        rel: &[u8],
        m: &Meta,
    ) -> Result<(), ApplyError> {
        let x = self
            .keep
            .read_at(source, rel)
            .map_err(|e| ApplyError::source_read(rel, e))?;
        self.set_dir_attrs(rel, m, x.as_ref()).map(drop)
    }

    fn set_root_attrs(&self, m: &Meta) -> io::Result<()> {
        let fd = rustix::fs::open(
            self.root.path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if self.owner {
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(m.uid)),
                Some(rustix::fs::Gid::from_raw(m.gid)),
            )?;
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(m.mode))?;
        rustix::fs::futimens(&fd, &fsops::mtime_only(m.mtime_ns))?;
        Ok(())
    }

    /// Parent directory of `rel` on the target (created as needed).
    fn parent_dir(&self, rel: &[u8]) -> Result<OwnedFd, ApplyError> {
        let d = self.ensure_parent(paths::split(rel).0, rel)?;
        self.writing_in(d.as_fd());
        Ok(d)
    }

    /// Directory `dir` on the target, made as needed for `rel` (an entry in
    /// it): what is made is noted for [`LocalTarget::take_made_parents`].
    fn ensure_parent(&self, dir: &[u8], rel: &[u8]) -> Result<OwnedFd, ApplyError> {
        let (d, made) = self
            .root
            .ensure_dir_made(dir)
            .map_err(|e| ApplyError::target_write(rel, e))?;
        if let Some(m) = made {
            self.note_made(m);
        }
        Ok(d)
    }

    fn note_made(&self, dir: Vec<u8>) {
        if self.note_made.load(Ordering::Relaxed) {
            crate::locks::lock(&self.made).push(dir);
        }
    }

    /// Has this target note the directories it makes as parents, for
    /// [`LocalTarget::take_made_parents`] (the daemon's shippers drain them).
    pub fn note_made_parents(&self) {
        self.note_made.store(true, Ordering::Relaxed);
    }

    /// The directories made on the target since the last call as parents
    /// of other entries (each the topmost of its run).
    ///
    /// The shipper compares each again (a rescan entry): copies read the
    /// source at different moments, and a file copied into a directory the
    /// source has since renamed or removed made that directory again on
    /// the target, after the entry that removed it (the two are applied in
    /// parallel). Left so, it stayed, mode 0700, unknown to the index, so
    /// that no later compare against the index found it.
    pub fn take_made_parents(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *crate::locks::lock(&self.made))
    }

    /// Puts temp file `tmp` in place as `name`, replacing a directory if one
    /// is in the way (the source's entry changed type).
    fn install(
        &self,
        dir: BorrowedFd<'_>,
        tmp: &[u8],
        name: &[u8],
        rel: &[u8],
    ) -> Result<(), ApplyError> {
        let r = match rustix::fs::renameat(dir, tmp, dir, name) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::ISDIR)
            | Err(rustix::io::Errno::NOTEMPTY)
            | Err(rustix::io::Errno::EXIST) => fsops::remove_tree_at(dir, name)
                .and_then(|()| rustix::fs::renameat(dir, tmp, dir, name).map_err(io::Error::from)),
            Err(e) => Err(e.into()),
        };
        // However it failed, the temporary file is ours to remove: left, it
        // would outlive the copy (a long-lived receiver takes the temp
        // files named with its own pid for copies in flight, and never
        // removes them).
        r.map_err(|e| {
            let _ = rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty());
            ApplyError::target_write(rel, e)
        })
    }

    /// Mirrors symlink `rel` (in source directory `sd`).
    fn symlink(
        &self,
        source: &Root,
        sd: BorrowedFd<'_>,
        rel: &[u8],
        f: u8,
    ) -> Result<Outcome, ApplyError> {
        let text = match source.read_link(rel) {
            Ok(t) => t,
            // EINVAL: no longer a symlink.
            Err(e) if fsops::is_missing(&e) || e.raw_os_error() == Some(22) => {
                return Ok(Outcome::Vanished)
            }
            Err(e) => return Err(ApplyError::source_read(rel, e)),
        };
        let Some(m) = source
            .lstat(rel)
            .map_err(|e| ApplyError::source_read(rel, e))?
        else {
            return Ok(Outcome::Vanished);
        };
        let dir = self.parent_dir(rel)?;
        let name = paths::split(rel).1;
        let x = self.source_xattrs(Handle::At(sd, name), rel)?;
        let (linked, mut claim) = self.linked(dir.as_fd(), rel, &m, x.as_ref())?;
        if let Some(out) = linked {
            return Ok(out);
        }
        let same_text =
            || fsops::read_link_at(dir.as_fd(), name).ok().as_deref() == Some(text.as_slice());
        let out = if f & (flags::CONTENT | flags::ABSENT) == 0
            && self.unchanged(dir.as_fd(), name, &m, x.as_ref(), rel, same_text)?
        {
            Outcome::Unchanged { meta: m }
        } else {
            self.put_symlink(rel, &text, &m, x.as_ref())?;
            Outcome::Copied {
                meta: m,
                bytes: text.len() as u64,
            }
        };
        if let Some(c) = claim.as_mut() {
            c.mirrored();
        }
        Ok(out)
    }

    /// Mirrors special file `rel` (in source directory `sd`), unless this
    /// target does not keep special files.
    fn special(
        &self,
        sd: BorrowedFd<'_>,
        rel: &[u8],
        m: &Meta,
        f: u8,
    ) -> Result<Outcome, ApplyError> {
        if !self.keep.specials {
            return Ok(Outcome::Special);
        }
        let name = paths::split(rel).1;
        let x = self.source_xattrs(Handle::At(sd, name), rel)?;
        let dir = self.parent_dir(rel)?;
        let (linked, mut claim) = self.linked(dir.as_fd(), rel, m, x.as_ref())?;
        if let Some(out) = linked {
            return Ok(out);
        }
        if f & (flags::CONTENT | flags::ABSENT) == 0
            && self.unchanged(dir.as_fd(), name, m, x.as_ref(), rel, || true)?
        {
            if let Some(c) = claim.as_mut() {
                c.mirrored();
            }
            return Ok(Outcome::Unchanged { meta: *m });
        }
        if self.put_special(rel, m, x.as_ref())?.contains(&"device") {
            return Ok(Outcome::Special);
        }
        if let Some(c) = claim.as_mut() {
            c.mirrored();
        }
        Ok(Outcome::Copied { meta: *m, bytes: 0 })
    }

    /// An unnamed temp file in `td` (`None` name) or a named one, created
    /// with permission bits `mode` (a named one with its owner bits only).
    fn create_temp_mode(
        &self,
        td: BorrowedFd<'_>,
        rel: &[u8],
        mode: u32,
    ) -> Result<(OwnedFd, Option<fsops::TempName>), ApplyError> {
        if self.tmpfile.load(Ordering::Relaxed) {
            match rustix::fs::openat(
                td,
                c".",
                OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(mode),
            ) {
                Ok(fd) => return Ok((fd, None)),
                Err(rustix::io::Errno::OPNOTSUPP)
                | Err(rustix::io::Errno::ISDIR)
                | Err(rustix::io::Errno::INVAL) => {
                    self.tmpfile.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(ApplyError::target_write(rel, e.into())),
            }
        }
        // A named temp file can be opened by others while it is written:
        // owner bits only until it is complete (finish_file sets the rest).
        let tmp = self.temp_name();
        let fd = rustix::fs::openat(
            td,
            &*tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(mode & 0o700),
        )
        .map_err(|e| ApplyError::target_write(rel, e.into()))?;
        Ok((fd, Some(tmp)))
    }

    /// Gives a complete O_TMPFILE inode its name: directly when the name is
    /// free, else under a temp name renamed over the old entry (atomic for
    /// readers either way).
    fn link_tmpfile(
        &self,
        out: &OwnedFd,
        td: BorrowedFd<'_>,
        name: &[u8],
        rel: &[u8],
    ) -> Result<(), ApplyError> {
        match rustix::fs::linkat(out, c"", td, name, rustix::fs::AtFlags::EMPTY_PATH) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => {
                let tmp = self.temp_name();
                rustix::fs::linkat(out, c"", td, &*tmp, rustix::fs::AtFlags::EMPTY_PATH)
                    .map_err(|e| ApplyError::target_write(rel, e.into()))?;
                self.install(td, &tmp, name, rel)
            }
            Err(e) => {
                // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH: without it, use
                // named temp files from now on (this copy is retried).
                if matches!(
                    e,
                    rustix::io::Errno::NOENT | rustix::io::Errno::PERM | rustix::io::Errno::ACCESS
                ) {
                    self.tmpfile.store(false, Ordering::Relaxed);
                }
                Err(ApplyError::target_write(rel, e.into()))
            }
        }
    }

    /// Links `rel` (in target directory `td`) to a current copy of the same
    /// source inode at one of `names`, as the source's names share it (see
    /// [`crate::links::Mirrored`]); gives it `m`'s attributes and `x`.
    /// `None`: none of `names` holds a current copy (each noted stale).
    fn link_to_copy(
        &self,
        td: BorrowedFd<'_>,
        rel: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
        names: &[Vec<u8>],
        claim: &mut Claim,
    ) -> Result<Option<Outcome>, ApplyError> {
        for other in names {
            match self.link_at(td, rel, other, m, x)? {
                Some((outcome, _)) => return Ok(Some(outcome)),
                None => claim.stale(other),
            }
        }
        Ok(None)
    }

    /// For a symlink or special file `rel` (`m`, in target directory `td`)
    /// with more than one link: claims its inode and links it to a current
    /// copy of another name, if the target holds one (see
    /// [`crate::links::Mirrored`]). Without an outcome, the caller applies
    /// it and says so to the claim.
    fn linked(
        &self,
        td: BorrowedFd<'_>,
        rel: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<(Option<Outcome>, Option<Claim>), ApplyError> {
        if !(self.keep.hard_links && m.nlink > 1) {
            return Ok((None, None));
        }
        let (names, mut claim) = self.mirrored.claim((m.dev, m.ino), rel);
        let out = self.link_to_copy(td, rel, m, x, &names, &mut claim)?;
        if out.is_some() {
            claim.mirrored();
        }
        Ok((out, Some(claim)))
    }

    /// Links `rel` (in target directory `td`) to the target's entry at
    /// `other` if that is a current copy of source entry `m` (see
    /// [`current_copy`]), and gives it `m`'s attributes and `x`. `None`: `other` is
    /// no such copy (gone, replaced, or changed since).
    fn link_at(
        &self,
        td: BorrowedFd<'_>,
        rel: &[u8],
        other: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Option<(Outcome, Refused)>, ApplyError> {
        let name = paths::split(rel).1;
        let copy = match self.root.lstat(other) {
            Ok(Some(t)) if current_copy(&t, m) => t,
            _ => return Ok(None),
        };
        let linked = |t: &Meta| t.ino == copy.ino && t.dev == copy.dev;
        let outcome = if fsops::lstat_at(td, name)
            .ok()
            .flatten()
            .is_some_and(|t| linked(&t))
        {
            Outcome::Unchanged { meta: *m }
        } else {
            let (op, oname) = paths::split(other);
            let Ok(odir) = self.root.open_dir(op, false) else {
                return Ok(None);
            };
            let tmp = self.temp_name();
            self.writing_in(td);
            match rustix::fs::linkat(odir.as_fd(), oname, td, &*tmp, AtFlags::empty()) {
                Ok(()) => {}
                // Gone or replaced meanwhile.
                Err(rustix::io::Errno::NOENT) => return Ok(None),
                Err(e) => return Err(ApplyError::target_write(rel, e.into())),
            }
            self.install(td, &tmp, name, rel)?;
            Outcome::Copied { meta: *m, bytes: 0 }
        };
        let refused = self
            .attrs_at(td, name, m, x, rel)
            .map_err(|e| ApplyError::target_write(rel, e))?;
        Ok(Some((outcome, refused)))
    }

    /// A receiver's [`crate::protocol::Op::Link`]: `rel` becomes another
    /// name of the target's file at `to`, which must be a current copy of
    /// source file `m` (the daemon's record of it may be out of date: the
    /// error says so, and the daemon sends the content instead).
    pub fn put_link(
        &self,
        rel: &[u8],
        to: &[u8],
        m: &Meta,
        x: Option<&Xattrs>,
    ) -> Result<Refused, ApplyError> {
        let dir = self.parent_dir(rel)?;
        match self.link_at(dir.as_fd(), rel, to, m, x)? {
            Some((_, refused)) => Ok(refused),
            None => Err(ApplyError::target_write(
                rel,
                io::Error::other(format!(
                    "{} is not a current copy of it to link to",
                    paths::display(to)
                )),
            )),
        }
    }

    /// Copies regular file `rel` from source directory `sd` into target
    /// directory `td` (its parents on either side) through a temporary name,
    /// unless the target's file is alike and `vouch` lets it stand for the
    /// very file opened (asked of its `fstat`, not of an earlier look: a
    /// rename of the source in between must not pass).
    fn file_at(
        &self,
        sd: BorrowedFd<'_>,
        td: BorrowedFd<'_>,
        rel: &[u8],
        f: u8,
        vouch: super::Vouch,
    ) -> Result<Outcome, ApplyError> {
        let name = paths::split(rel).1;
        let unlink_tmp = |tmp: &Option<fsops::TempName>| {
            if let Some(t) = tmp {
                let _ = rustix::fs::unlinkat(td, &**t, rustix::fs::AtFlags::empty());
            }
        };
        let mut claim: Option<(Vec<Vec<u8>>, Claim)> = None;
        for attempt in 1..=COPY_TRIES {
            let src = match fsops::open_source_at(sd, name) {
                Ok(fd) => fd,
                // Gone, or replaced by a symlink: the event that did it follows.
                Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::LOOP) => {
                    return Ok(Outcome::Vanished)
                }
                Err(e) => return Err(ApplyError::source_read(rel, e.into())),
            };
            let st = rustix::fs::fstat(&src).map_err(|e| ApplyError::source_read(rel, e.into()))?;
            let before = Meta::from_stat(&st);
            if before.kind != Kind::File {
                return Ok(Outcome::Vanished);
            }
            if super::needs_doubt(f, vouch, Some(&before)) {
                // Replaced since the lstat that found no doubt needed.
                return Ok(Outcome::NeedsDoubt);
            }
            let x = self.source_xattrs(Handle::Fd(src.as_fd()), rel)?;
            if self.keep.hard_links && before.nlink > 1 && claim.is_none() {
                claim = Some(self.mirrored.claim((before.dev, before.ino), rel));
            }
            if let Some((names, c)) = claim.as_mut() {
                if let Some(out) = self.link_to_copy(td, rel, &before, x.as_ref(), names, c)? {
                    c.mirrored();
                    return Ok(out);
                }
            }
            if (f & (flags::CONTENT | flags::ABSENT) == 0 || attempt > 1)
                && vouch.lets_stand(&before)
                && self.unchanged(td, name, &before, x.as_ref(), rel, || true)?
            {
                if let Some((_, c)) = claim.as_mut() {
                    c.mirrored();
                }
                return Ok(Outcome::Unchanged { meta: before });
            }
            let sparse =
                self.keep.sparse && fidelity::looks_sparse(before.size, st.st_blocks as u64);
            // New content goes into an unnamed O_TMPFILE inode that is linked
            // in only when complete (one directory update instead of a create
            // plus a rename), or, where that is unavailable, a temp name.
            let (out, tmp) = self.create_temp_mode(td, rel, before.mode & 0o777)?;
            let copied = if sparse {
                copy_sparse(&src, &out, before.size)
            } else {
                copy_contents(&src, &out, before.size)
            };
            let bytes = match copied {
                Ok(b) => b,
                Err((e, target_side)) => {
                    unlink_tmp(&tmp);
                    return Err(if target_side {
                        ApplyError::target_write(rel, e)
                    } else {
                        ApplyError::source_read(rel, e)
                    });
                }
            };
            let after = match rustix::fs::fstat(&src) {
                Ok(st) => Meta::from_stat(&st),
                Err(e) => {
                    unlink_tmp(&tmp);
                    return Err(ApplyError::source_read(rel, e.into()));
                }
            };
            if after.size != before.size
                || after.mtime_ns != before.mtime_ns
                || after.ctime_ns != before.ctime_ns
                || bytes != before.size
            {
                unlink_tmp(&tmp);
                continue;
            }
            if let Err(e) = self
                .finish_attrs(&out, &before, None)
                .and_then(|_| self.put_xattrs(Handle::Fd(out.as_fd()), x.as_ref(), rel))
            {
                unlink_tmp(&tmp);
                return Err(ApplyError::target_write(rel, e));
            }
            match tmp {
                Some(t) => {
                    drop(out);
                    self.install(td, &t, name, rel)?;
                }
                None => self.link_tmpfile(&out, td, name, rel)?,
            }
            if let Some((_, c)) = claim.as_mut() {
                c.mirrored();
            }
            return Ok(Outcome::Copied {
                meta: before,
                bytes,
            });
        }
        Err(ApplyError::Changing {
            path: paths::display(rel),
            tries: COPY_TRIES,
        })
    }
}

/// Whether target entry `t` is a current copy of source entry `m`, to be
/// linked to as another name of it: the same type and mtime, and the same
/// size (a file's content, a symlink's text, which never changes in
/// place) and device number.
fn current_copy(t: &Meta, m: &Meta) -> bool {
    t.kind == m.kind && t.mtime_ns == m.mtime_ns && t.size == m.size && t.rdev == m.rdev
}

/// Below this size a read + write is cheaper than `copy_file_range`'s
/// in-kernel splice setup (measured: most of a small file's copy cost).
const SMALL_FILE: usize = 128 * 1024;

/// Copies through one reused buffer, stopping at `expected` bytes without
/// the EOF probe (a file that grew meanwhile shows in the fstat after the
/// copy, which sends it round again); an empty file costs no read at all.
fn copy_small(src: &OwnedFd, out: &OwnedFd, expected: u64) -> Result<u64, (io::Error, bool)> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; SMALL_FILE]);
    }
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        let mut total = 0u64;
        while total < expected {
            let n = match rustix::io::read(src, &mut buf[..]) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err((e.into(), false)),
            };
            write_out(out, &buf[..n], None)?;
            total += n as u64;
        }
        Ok(total)
    })
}

/// Copies `expected` bytes (or up to EOF, if the file grew) from `src` to
/// `out` in the kernel; falls back to read/write where `copy_file_range`
/// does not work across these filesystems. The error says which side failed.
fn copy_contents(src: &OwnedFd, out: &OwnedFd, expected: u64) -> Result<u64, (io::Error, bool)> {
    if expected <= SMALL_FILE as u64 {
        return copy_small(src, out, expected);
    }
    let mut done: u64 = 0;
    loop {
        // Stop at the expected size without the extra EOF probe: a file that
        // grew meanwhile shows in the fstat after the copy.
        if done == expected && expected > 0 {
            return Ok(done);
        }
        let want = (expected.saturating_sub(done)).clamp(1 << 16, 1 << 30) as usize;
        match rustix::fs::copy_file_range(src, None, out, None, want) {
            Ok(0) => return Ok(done),
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::XDEV)
            | Err(rustix::io::Errno::INVAL)
            | Err(rustix::io::Errno::NOSYS)
            | Err(rustix::io::Errno::OPNOTSUPP)
                if done == 0 =>
            {
                let mut r = File::from(src.try_clone().map_err(|e| (e, false))?);
                let mut w = File::from(out.try_clone().map_err(|e| (e, true))?);
                return io::copy(&mut r, &mut w).map_err(|e| {
                    let target_side =
                        matches!(e.raw_os_error(), Some(28) | Some(27) | Some(122) | Some(30));
                    (e, target_side)
                });
            }
            Err(
                e @ (rustix::io::Errno::NOSPC
                | rustix::io::Errno::FBIG
                | rustix::io::Errno::DQUOT
                | rustix::io::Errno::ROFS),
            ) => return Err((e.into(), true)),
            Err(e) => return Err((e.into(), false)),
        }
    }
}

/// Copies the data extents of `src` (a file of `size` bytes with holes)
/// into `out` at the same offsets and sets `out`'s length: holes stay
/// holes. Returns the file's size when all was copied, fewer bytes when
/// the file shrank meanwhile (the caller's fstat then sends it round
/// again). The error says which side failed.
fn copy_sparse(src: &OwnedFd, out: &OwnedFd, size: u64) -> Result<u64, (io::Error, bool)> {
    let extents = fidelity::data_extents(src.as_fd(), size).map_err(|e| (e, false))?;
    let mut buf = vec![0u8; SMALL_FILE];
    for (start, len) in extents {
        let mut off = start;
        while off < start + len {
            let want = ((start + len - off) as usize).min(buf.len());
            let n = match rustix::io::pread(src, &mut buf[..want], off) {
                Ok(0) => return Ok(off),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err((e.into(), false)),
            };
            write_out(out, &buf[..n], Some(off))?;
            off += n as u64;
        }
    }
    rustix::fs::ftruncate(out, size).map_err(|e| (e.into(), true))?;
    Ok(size)
}

/// Writes all of `data` to `out`, at its file offset or at `at`; an error
/// is the target's (see [`copy_contents`]).
fn write_out(out: &OwnedFd, data: &[u8], at: Option<u64>) -> Result<(), (io::Error, bool)> {
    let mut done = 0;
    while done < data.len() {
        let r = match at {
            Some(at) => rustix::io::pwrite(out, &data[done..], at + done as u64),
            None => rustix::io::write(out, &data[done..]),
        };
        match r {
            Ok(w) => done += w,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err((e.into(), true)),
        }
    }
    Ok(())
}
