//! Keeps drmirror's own writes out of its fanotify queue.
//!
//! A fanotify filesystem mark reports every change on the filesystem,
//! including the ones drmirror makes itself when a local target (or the
//! journal) lives on a filesystem under the source. Those events would be
//! dropped as outside the source, but only after the kernel queued them,
//! the capture loop woke, read and resolved them: measured on a 200,000-file
//! initial sync into a target on the source's filesystem, that was a third
//! of the daemon's CPU time and half again on its wall time.
//!
//! fanotify has no subtree filter, so each target directory drmirror writes
//! into gets an ignore mark (`FAN_MARK_IGNORE` with `FAN_EVENT_ON_CHILD`:
//! events on the directory and its entries, not deeper). A mark pins the
//! directory's inode in kernel memory, so their number is bounded: past
//! [`MAX_MARKS`], all inode marks of the group are flushed (its filesystem
//! marks stay) and the fixed ones (the journal directory) are added again.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use fanotify::low_level as fan;

use super::fid::consts::*;

/// Bound on the directories marked at once (each pins an inode, ~1 KiB).
const MAX_MARKS: usize = 8192;

pub struct SelfIgnore {
    fd: OwnedFd,
    /// Filesystems the group has marks on (`statfs` fsids): only
    /// directories on those produce events.
    fsids: Vec<[u8; 8]>,
    /// Always ignored, re-added after a flush.
    fixed: Vec<PathBuf>,
    mask: u64,
    marked: Mutex<HashSet<u64>>,
    /// Cleared when the kernel refuses ignore marks (before Linux 6.0).
    enabled: AtomicBool,
}

/// Drops every inode mark of the fanotify group `group` (its filesystem
/// marks stay). Best effort: a mark left only lets its events through.
pub(super) fn flush_inode_marks(group: BorrowedFd<'_>) {
    if let Err(e) = fan::fanotify_mark(
        group.as_raw_fd(),
        fan::FAN_MARK_FLUSH,
        0,
        fan::AT_FDCWD,
        "/",
    ) {
        tracing::debug!("flushing ignore marks: {e}");
    }
}

impl SelfIgnore {
    /// `fd` is a duplicate of the group's descriptor; `mask` the events of
    /// its filesystem marks. Marks `fixed`; the marks an earlier run left on
    /// a handed-over group stay until [`SelfIgnore::reset`].
    pub(super) fn new(
        fd: OwnedFd,
        fsids: Vec<[u8; 8]>,
        fixed: Vec<PathBuf>,
        mask: u64,
    ) -> io::Result<SelfIgnore> {
        // FAN_RENAME is refused in an ignore mask; renames are rare among
        // drmirror's own writes (a replaced file), the rest are links.
        let mask = (mask & !FAN_RENAME) | FAN_EVENT_ON_CHILD;
        let s = SelfIgnore {
            fd,
            fsids,
            fixed,
            mask,
            marked: Mutex::new(HashSet::new()),
            enabled: AtomicBool::new(true),
        };
        for dir in &s.fixed {
            s.mark(fan::AT_FDCWD, dir)?;
        }
        Ok(s)
    }

    /// Drops every ignore mark of the group, including those an earlier run
    /// left on a handed-over group (their number is unknown, and each pins
    /// an inode), and adds the fixed ones again. Removing thousands of
    /// marks takes tens of milliseconds, so the daemon calls this off its
    /// startup path; a directory marked meanwhile may lose its mark, which
    /// only lets its events through.
    pub fn reset(&self) {
        if let Ok(mut marked) = self.marked.lock() {
            marked.clear();
        }
        self.flush();
    }

    /// Whether the directory open at `fd` is on a filesystem the group
    /// watches, i.e. whether writes under it would come back as events.
    pub fn covers(&self, fd: BorrowedFd<'_>) -> bool {
        super::fanotify::fsid_of(fd).is_ok_and(|f| self.fsids.contains(&f))
    }

    /// Drops every inode mark of the group (its filesystem marks stay) and
    /// adds the fixed ones again. Best effort, like the marks themselves.
    fn flush(&self) {
        flush_inode_marks(self.fd.as_fd());
        let r = self
            .fixed
            .iter()
            .try_for_each(|dir| self.mark(fan::AT_FDCWD, dir));
        if let Err(e) = r {
            tracing::debug!("adding ignore marks again: {e}");
        }
    }

    fn mark(&self, dirfd: i32, path: &Path) -> io::Result<()> {
        fan::fanotify_mark(
            self.fd.as_raw_fd(),
            fan::FAN_MARK_ADD | FAN_MARK_IGNORE | fan::FAN_MARK_IGNORED_SURV_MODIFY,
            self.mask,
            dirfd,
            path,
        )
    }

    /// Ignores events on directory `dir` and its entries from now on.
    /// Best effort: a failure only costs the events it would have spared.
    pub fn dir(&self, dir: BorrowedFd<'_>) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let Ok(st) = rustix::fs::fstat(dir) else {
            return;
        };
        {
            let Ok(mut marked) = self.marked.lock() else {
                return;
            };
            if !marked.insert(st.st_ino) {
                return;
            }
            if marked.len() > MAX_MARKS {
                marked.clear();
                marked.insert(st.st_ino);
                self.flush();
            }
        }
        // "." relative to the directory: `dir` may be an O_PATH descriptor,
        // which fanotify_mark refuses as the object itself.
        if let Err(e) = self.mark(dir.as_raw_fd(), Path::new(".")) {
            if e.raw_os_error() == Some(libc::EINVAL) {
                self.enabled.store(false, Ordering::Relaxed);
            }
            tracing::debug!("ignore mark on a target directory: {e}");
        }
    }
}
