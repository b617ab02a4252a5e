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
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{Mode, OFlags};

use super::{ApplyError, Outcome};
use crate::fsops::{self, Root};
use crate::journal::flags;
use crate::meta::{Kind, Meta};
use crate::paths;

/// How often a file that changes while being copied is retried at once.
const COPY_TRIES: u32 = 3;

pub struct LocalTarget {
    root: Root,
    /// `syncfs` needs a readable fd; the root's is `O_PATH`.
    sync_fd: OwnedFd,
    owner: bool,
    tmp_counter: AtomicU64,
}

/// The result of a delete policy decision for a path whose source is gone.
#[derive(Clone, Copy, Debug)]
pub struct DeletePolicy {
    pub at_startup: bool,
    pub while_running: bool,
}

impl DeletePolicy {
    fn allows(self, f: u8) -> bool {
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
            tmp_counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Flushes everything written so far to the target's disk.
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::syncfs(&self.sync_fd)?;
        Ok(())
    }

    fn temp_name(&self) -> Vec<u8> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let mut v = fsops::TEMP_PREFIX.to_vec();
        v.extend_from_slice(format!("{}-{n}", std::process::id()).as_bytes());
        v.extend_from_slice(fsops::TEMP_SUFFIX);
        v
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
        let tdir = self
            .root
            .ensure_dir(tp)
            .map_err(|e| ApplyError::target_write(to, e))?;
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

    /// Makes the target's entry at `rel` match the source's.
    pub fn apply(
        &self,
        source: &Root,
        rel: &[u8],
        f: u8,
        policy: DeletePolicy,
    ) -> Result<Outcome, ApplyError> {
        let src = source
            .lstat(rel)
            .map_err(|e| ApplyError::source_read(rel, e))?;
        match src {
            None => self.remove(rel, f, policy),
            Some(m) => match m.kind {
                Kind::Other => Ok(Outcome::Special),
                Kind::Dir => self.dir(rel, &m, f),
                Kind::Symlink => self.symlink(source, rel, f),
                Kind::File => self.file(source, rel, f),
            },
        }
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
        self.root
            .ensure_dir(rel)
            .map_err(|e| ApplyError::target_write(rel, e))?;
        Ok(Outcome::Dir {
            meta: *m,
            created: !existed,
            scan: !existed || f & flags::RECURSIVE != 0,
        })
    }

    /// Sets a target directory's attributes to the source's current ones.
    pub fn set_dir_attrs(&self, rel: &[u8], m: &Meta) -> Result<(), ApplyError> {
        let r = if rel.is_empty() {
            self.set_root_attrs(m)
        } else {
            let (parent, name) = paths::split(rel);
            self.root
                .open_dir(parent, false)
                .and_then(|d| fsops::set_attrs_at(d.as_fd(), name, m, self.owner))
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if fsops::is_missing(&e) => Ok(()),
            Err(e) => Err(ApplyError::target_write(rel, e)),
        }
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
        self.root
            .ensure_dir(paths::split(rel).0)
            .map_err(|e| ApplyError::target_write(rel, e))
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
        match rustix::fs::renameat(dir, tmp, dir, name) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::ISDIR)
            | Err(rustix::io::Errno::NOTEMPTY)
            | Err(rustix::io::Errno::EXIST) => {
                fsops::remove_tree_at(dir, name).map_err(|e| ApplyError::target_write(rel, e))?;
                rustix::fs::renameat(dir, tmp, dir, name)
                    .map_err(|e| ApplyError::target_write(rel, e.into()))
            }
            Err(e) => {
                let _ = rustix::fs::unlinkat(dir, tmp, rustix::fs::AtFlags::empty());
                Err(ApplyError::target_write(rel, e.into()))
            }
        }
    }

    fn symlink(&self, source: &Root, rel: &[u8], f: u8) -> Result<Outcome, ApplyError> {
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
        if f & flags::CONTENT == 0 {
            if let Ok(Some(t)) = fsops::lstat_at(dir.as_fd(), name) {
                if m.mirrors(&t, self.owner)
                    && fsops::read_link_at(dir.as_fd(), name).ok().as_deref()
                        == Some(text.as_slice())
                {
                    return Ok(Outcome::Unchanged { meta: m });
                }
            }
        }
        let tmp = self.temp_name();
        rustix::fs::symlinkat(text.as_slice(), &dir, tmp.as_slice())
            .map_err(|e| ApplyError::target_write(rel, e.into()))?;
        if let Err(e) = fsops::set_attrs_at(dir.as_fd(), &tmp, &m, self.owner) {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), rustix::fs::AtFlags::empty());
            return Err(ApplyError::target_write(rel, e));
        }
        self.install(dir.as_fd(), &tmp, name, rel)?;
        Ok(Outcome::Copied {
            meta: m,
            bytes: text.len() as u64,
        })
    }

    fn file(&self, source: &Root, rel: &[u8], f: u8) -> Result<Outcome, ApplyError> {
        let dir = self.parent_dir(rel)?;
        let name = paths::split(rel).1;
        for attempt in 1..=COPY_TRIES {
            let Some((mut src, before)) = source
                .open_file(rel)
                .map_err(|e| ApplyError::source_read(rel, e))?
            else {
                // Vanished since capture: its delete event follows.
                return Ok(Outcome::Vanished);
            };
            if before.kind != Kind::File {
                return Ok(Outcome::Vanished);
            }
            if f & flags::CONTENT == 0 || attempt > 1 {
                if let Ok(Some(t)) = fsops::lstat_at(dir.as_fd(), name) {
                    if before.mirrors(&t, self.owner) {
                        return Ok(Outcome::Unchanged { meta: before });
                    }
                }
            }
            let tmp = self.temp_name();
            let out = rustix::fs::openat(
                &dir,
                tmp.as_slice(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| ApplyError::target_write(rel, e.into()))?;
            let mut out = File::from(out);
            let copied = io::copy(&mut src, &mut out);
            let after = rustix::fs::fstat(&src).map(|st| Meta::from_stat(&st));
            let cleanup = |e: io::Error, read: bool| {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), rustix::fs::AtFlags::empty());
                if read {
                    ApplyError::source_read(rel, e)
                } else {
                    ApplyError::target_write(rel, e)
                }
            };
            let bytes = match copied {
                Ok(b) => b,
                Err(e) => {
                    // io::copy does not say which side failed; ask the target.
                    let target_side =
                        matches!(e.raw_os_error(), Some(28) | Some(27) | Some(122) | Some(30));
                    return Err(cleanup(e, !target_side));
                }
            };
            let after = after.map_err(|e| cleanup(e.into(), true))?;
            if after.size != before.size
                || after.mtime_ns != before.mtime_ns
                || after.ctime_ns != before.ctime_ns
                || bytes != before.size
            {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), rustix::fs::AtFlags::empty());
                continue;
            }
            let fin = (|| -> io::Result<()> {
                if self.owner {
                    rustix::fs::fchown(
                        &out,
                        Some(rustix::fs::Uid::from_raw(before.uid)),
                        Some(rustix::fs::Gid::from_raw(before.gid)),
                    )?;
                }
                rustix::fs::fchmod(&out, Mode::from_raw_mode(before.mode))?;
                rustix::fs::futimens(&out, &fsops::mtime_only(before.mtime_ns))?;
                Ok(())
            })();
            fin.map_err(|e| cleanup(e, false))?;
            drop(out);
            self.install(dir.as_fd(), &tmp, name, rel)?;
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
