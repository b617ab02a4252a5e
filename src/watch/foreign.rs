//! Events from outside the source, dropped in the kernel.
//!
//! The fanotify filesystem mark reports every change on the filesystem. An
//! event outside the source costs the capture thread a read, a parse and a
//! handle lookup before it is dropped: 8–16 µs of CPU each, a steady tax on
//! a busy shared filesystem, paid once per daemon on it. So the first event
//! dropped from a directory puts an ignore mark on that directory
//! (`FAN_MARK_IGNORE` with `FAN_EVENT_ON_CHILD`, Linux 6.0+), and the
//! kernel drops its later events before they are queued.
//!
//! The marks are evictable (`FAN_MARK_EVICTABLE`): they do not pin the
//! directory's inode, so any number of foreign directories costs bounded
//! kernel memory; a directory whose inode left the cache lost its mark and
//! is marked again at its next events. (Before Linux 6.0 the kernel
//! refuses the flags and nothing is marked: the events are dropped here,
//! as they always were.)
//!
//! Invariants:
//! - No directory inside the source (or inside the origin of a bind mount
//!   under it) keeps an ignore mark by the time capture records anything
//!   that follows it there. A directory is marked only if, opened by its
//!   handle, its path *now* is outside; one can only come inside by a
//!   rename (`FAN_RENAME` cannot be ignored, so the rename is always
//!   reported) or by a mount under the source: both drop every mark of the
//!   group ([`Foreign::flush`]) before their events are handed on, and the
//!   moved-in or mounted subtree is compared with the target afterwards.
//! - On the source's ancestors (and those of bind origins) only events on
//!   non-directories are ignored: the source root's own events (its
//!   attributes, its removal or rename) are reported through its parent.
//! - `FAN_RENAME`, `FAN_DELETE_SELF` and `FAN_MOVE_SELF` are never ignored.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use fanotify::low_level as fan;

use super::fid::consts::*;
use super::self_ignore::SelfIgnore;

/// What a foreign directory's ignore mark drops: every event of the group's
/// mask on the directory and its entries, but renames and the self events.
const IGNORED: u64 = fan::FAN_CREATE
    | fan::FAN_DELETE
    | fan::FAN_MODIFY
    | fan::FAN_CLOSE_WRITE
    | fan::FAN_ATTRIB
    | FAN_ONDIR
    | FAN_EVENT_ON_CHILD;
/// Foreign directories remembered as marked at most (their handles).
const MARKED_MAX: usize = 65_536;
/// Events still seen from a marked directory before it is marked again:
/// those queued before the mark are expected, a steady stream means the
/// mark went with its inode.
const REMARK_AFTER: u32 = 1024;

/// Ignore marks on directories outside the source (see the module doc).
pub struct Foreign {
    /// Set when the kernel refuses the flags.
    disabled: bool,
    /// Whether the group may hold a foreign mark: set by each mark, and at
    /// the start (a group handed over by an earlier run holds its marks).
    any: bool,
    /// Marked directories (handle keys) and the events seen from each since.
    marked: HashMap<Vec<u8>, u32>,
    /// The group's ignore marks for drmirror's own writes, flushed with
    /// these (one flush drops every inode mark of the group).
    self_ignore: Option<Arc<SelfIgnore>>,
}

impl Default for Foreign {
    fn default() -> Self {
        Foreign {
            disabled: false,
            any: true,
            marked: HashMap::new(),
            self_ignore: None,
        }
    }
}

impl Foreign {
    pub fn set_self_ignore(&mut self, s: Arc<SelfIgnore>) {
        self.self_ignore = Some(s);
    }

    /// Whether marks are being added (the kernel takes them).
    pub fn enabled(&self) -> bool {
        !self.disabled
    }

    /// Whether directory `key`'s events need no mark now (it is marked).
    pub fn seen(&mut self, key: &[u8]) -> bool {
        match self.marked.get_mut(key) {
            Some(n) => {
                *n += 1;
                *n % REMARK_AFTER != 0
            }
            None => false,
        }
    }

    /// Marks directory `dir` (open, with its path now `abs`), dropped an
    /// event of as outside the source. `ancestor`: it holds the source or
    /// a bind origin, so only events on its non-directory entries may go.
    pub fn mark(&mut self, group: BorrowedFd<'_>, key: Vec<u8>, dir: impl AsFd, ancestor: bool) {
        if self.disabled {
            return;
        }
        if self.marked.len() >= MARKED_MAX {
            self.marked.clear();
        }
        self.any = true;
        let mask = if ancestor {
            IGNORED & !FAN_ONDIR
        } else {
            IGNORED
        };
        // "." relative to the directory: `dir` is an O_PATH descriptor,
        // which fanotify_mark refuses as the object itself.
        match fan::fanotify_mark(
            group.as_raw_fd(),
            // SURV_MODIFY: a write to a file in it would clear the mask
            // otherwise (and a directory's ignore mark needs it: EISDIR).
            fan::FAN_MARK_ADD
                | FAN_MARK_IGNORE
                | FAN_MARK_EVICTABLE
                | fan::FAN_MARK_IGNORED_SURV_MODIFY,
            mask,
            dir.as_fd().as_raw_fd(),
            Path::new("."),
        ) {
            Ok(()) => {
                metrics::counter!("drmirror_capture_ignore_marks_total").increment(1);
                self.marked.insert(key, 0);
            }
            Err(e) => {
                // EINVAL: a kernel before 6.0. EEXIST: a mark that is not
                // evictable is there (drmirror's own, on a target directory).
                if e.raw_os_error() == Some(libc::EINVAL) {
                    tracing::info!("fanotify: ignore marks are not supported here (Linux 6.0 or later): events outside the source are dropped after they are read");
                    self.disabled = true;
                }
                self.marked.insert(key, 0);
                tracing::debug!("ignore mark on a directory outside the source: {e}");
            }
        }
    }

    /// Drops every ignore mark of the group (a directory moved or mounted
    /// into the source may hold one), then adds drmirror's fixed ones
    /// again.
    pub fn flush(&mut self, group: BorrowedFd<'_>) {
        if !std::mem::take(&mut self.any) {
            return;
        }
        self.marked.clear();
        metrics::counter!("drmirror_capture_ignore_flushes_total").increment(1);
        match &self.self_ignore {
            Some(s) => s.reset(),
            None => super::self_ignore::flush_inode_marks(group),
        }
    }
}
