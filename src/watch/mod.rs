//! Change capture backends behind one trait.
//!
//! A backend turns kernel notifications into [`Event`]s on paths relative to
//! the source root: it keeps its own bookkeeping (watch descriptors, new
//! directories, renamed subtrees) and persists its watch tree in the
//! journal's `dirs` column family. `watch = "auto"` picks fanotify where
//! the kernel and filesystem allow it and inotify otherwise.

pub mod fanotify;
pub mod fid;
pub mod foreign;
mod fresh;
pub mod inotify;
mod renamed;
pub mod self_ignore;
pub mod unwatched;

use std::time::Duration;

use crate::filter::Filter;
use crate::journal::flags;
use crate::paths;

/// A normalised change notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Something at `path` changed; `flags` are [`crate::journal::flags`].
    Dirty { path: Vec<u8>, flags: u8 },
    /// `from` was renamed to `to`, both inside the source.
    Rename { from: Vec<u8>, to: Vec<u8> },
    /// The kernel dropped events: everything must be rescanned.
    Overflow,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the source directory {0} was deleted or moved away")]
    SourceGone(String),
    #[error("cannot watch {path}: {source}")]
    Add {
        path: String,
        source: std::io::Error,
    },
    #[error("fanotify unavailable: {0}")]
    Unsupported(String),
    #[error("reading kernel events: {0}")]
    Read(std::io::Error),
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
}

/// A change-capture backend.
pub trait Watcher: Send {
    /// The backend's name, as reported in logs and metrics.
    fn backend(&self) -> &'static str;
    /// Waits up to `timeout` until [`Watcher::read`] has something to do.
    fn wait(&mut self, timeout: Duration) -> Result<bool, WatchError>;
    /// Consumes what the kernel has queued (bounded, never blocking long)
    /// and appends it to `out`. Events consumed here exist nowhere else
    /// until the caller has written them to the journal.
    fn read(&mut self, out: &mut Vec<Event>) -> Result<(), WatchError>;
    /// `wait` then `read`.
    fn poll(&mut self, out: &mut Vec<Event>, timeout: Duration) -> Result<(), WatchError> {
        if self.wait(timeout)? {
            self.read(out)?;
        }
        Ok(())
    }
    /// The kernel descriptor to hand to the service manager's fd store, so
    /// that its queue survives a restart of the daemon.
    fn store_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Number of directories watched (inotify) or filesystems marked.
    fn watched(&self) -> usize;
    /// How capture was set up, for the start-up log line.
    fn describe(&self) -> String;
    /// A channel on which the startup scan reports the directories it
    /// lists, for a backend that restored its watches from the journal and
    /// must pick up directories created while it was not running.
    fn dir_feed(&mut self) -> Option<crossbeam_channel::Sender<Vec<Vec<u8>>>> {
        None
    }
    /// For a backend whose capture is not whole when it starts (see
    /// [`CompleteWatch`]).
    fn complete_watch(&mut self) -> Option<CompleteWatch> {
        None
    }
    /// The mounts under the source whose changes this backend cannot
    /// capture ("POINT: why"), when that list changed since the last call
    /// (for `status`).
    fn uncaptured(&mut self) -> Option<Vec<String>> {
        None
    }
    /// For a backend that sees the whole filesystem (fanotify): a handle
    /// that keeps drmirror's own writes out of its queue, with `fixed`
    /// directories (the journal's) ignored for good.
    fn self_ignore(
        &mut self,
        _fixed: Vec<std::path::PathBuf>,
    ) -> Result<Option<std::sync::Arc<self_ignore::SelfIgnore>>, WatchError> {
        Ok(None)
    }
}

/// Restored inotify watches report entries appearing, going and renamed at
/// first (a third of the kernel's time of a full watch), and changes to
/// files in them only once capture has completed them. A startup scan lets
/// capture complete them after its first pass, which finds the entries that
/// appeared while nothing watched (the two would share the machine's cores
/// otherwise), and waits until they are complete before it compares
/// anything else: a change between its comparison and the watch's
/// completion would be seen by neither.
#[derive(Clone)]
pub struct CompleteWatch {
    /// Sent (or dropped by every holder): complete the watches now.
    pub go: crossbeam_channel::Sender<()>,
    /// Disconnects once capture is whole.
    pub done: crossbeam_channel::Receiver<()>,
}

/// Waits up to `timeout` for `fd` (an inotify or fanotify group) to be
/// readable or the mount table under the source to change (what changed is
/// kept in `pending`, for the backend's next read); a signal, or a change
/// of the mount table elsewhere, counts as "not yet". A table that cannot
/// be read again is dropped, with a warning: mounts are no longer followed.
fn wait_with_mounts(
    fd: std::os::fd::BorrowedFd<'_>,
    table: &mut Option<crate::mounts::MountTable>,
    pending: &mut Option<crate::mounts::MountChanges>,
    timeout: Duration,
) -> Result<bool, WatchError> {
    // A change of the mount table elsewhere ends the poll early: it waits
    // again for the rest of `timeout`, since callers rely on the full wait
    // (inotify gives a MOVED_TO a few milliseconds to follow its
    // MOVED_FROM, and other tests' mounts made a rename two events).
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (ready, moved) =
            crate::mounts::poll_with(fd, table.as_ref(), left).map_err(WatchError::Read)?;
        note_mounts(table, pending, moved);
        if ready || pending.is_some() || !moved || left.is_zero() {
            return Ok(ready || pending.is_some());
        }
    }
}

/// After a poll that saw the mount table change (`moved`): what changed
/// under the source, added to `pending`.
fn note_mounts(
    table: &mut Option<crate::mounts::MountTable>,
    pending: &mut Option<crate::mounts::MountChanges>,
    moved: bool,
) {
    if moved {
        if let Some(t) = table.as_mut() {
            match t.changes() {
                Ok(c) if c.added.is_empty() && c.removed.is_empty() => {}
                Ok(c) => {
                    let p = pending.get_or_insert_with(Default::default);
                    p.added.extend(c.added);
                    p.removed.extend(c.removed);
                }
                Err(e) => {
                    tracing::warn!("cannot read the mount table again: {e}; mounts under the source are no longer followed");
                    *table = None;
                }
            }
        }
    }
}

/// Each mount point added or removed under the source (`source_abs`) is
/// compared with the target again, as a whole: what it shows changed at
/// once, without an event.
fn mount_events(
    filter: &Filter,
    source_abs: &[u8],
    c: &crate::mounts::MountChanges,
    out: &mut Vec<Event>,
) {
    use std::os::unix::ffi::OsStrExt;
    for (m, what) in c
        .removed
        .iter()
        .map(|m| (m, "removed"))
        .chain(c.added.iter().map(|m| (m, "added")))
    {
        let abs = m.point.as_os_str().as_bytes();
        let Some(rel) = abs
            .strip_prefix(source_abs)
            .map(|r| r.strip_prefix(b"/").unwrap_or(r))
        else {
            continue;
        };
        if filter.excluded(rel, true) {
            continue;
        }
        tracing::info!(
            "mount {what} under the source: {} ({} {}); comparing it with the target",
            m.point.display(),
            m.fstype,
            m.root.display()
        );
        out.push(Event::Dirty {
            path: rel.to_vec(),
            flags: flags::RECURSIVE | flags::LIVE,
        });
    }
}

/// Marks the parent of `path` dirty: an entry that appears, goes or is
/// renamed changes its directory's mtime, which is mirrored — unless the
/// parent is itself excluded (fanotify sees inside excluded directories).
fn dirty_parent(filter: &Filter, out: &mut Vec<Event>, path: &[u8]) {
    if let Some(p) = paths::parent(path) {
        if filter.excluded(p, true) {
            return;
        }
        out.push(Event::Dirty {
            path: p.to_vec(),
            flags: flags::LIVE,
        });
    }
}

/// `path` appeared (created, or moved in from outside the source). A new
/// directory is `recursive` when things inside it may have escaped capture.
fn on_new(filter: &Filter, path: Vec<u8>, is_dir: bool, recursive: bool, out: &mut Vec<Event>) {
    dirty_parent(filter, out, &path);
    if filter.excluded(&path, is_dir) {
        return;
    }
    let f = match (is_dir, recursive) {
        (true, true) => flags::RECURSIVE,
        (true, false) => 0,
        (false, _) => flags::CONTENT,
    };
    out.push(Event::Dirty {
        path,
        flags: f | flags::LIVE,
    });
}

/// `path` went away (deleted, or moved out of the source). A directory is
/// marked recursive: if a new one takes its name before the change is
/// applied, the old subtree's leftovers on the target must be found.
fn on_gone(filter: &Filter, path: Vec<u8>, is_dir: bool, out: &mut Vec<Event>) {
    dirty_parent(filter, out, &path);
    if !filter.excluded(&path, is_dir) {
        out.push(Event::Dirty {
            path,
            flags: flags::LIVE | if is_dir { flags::RECURSIVE } else { 0 },
        });
    }
}

/// A rename inside the source; an excluded side makes it a creation or a
/// deletion for the mirror.
fn on_rename(filter: &Filter, from: Vec<u8>, to: Vec<u8>, is_dir: bool, out: &mut Vec<Event>) {
    match (filter.excluded(&from, is_dir), filter.excluded(&to, is_dir)) {
        (true, true) => {
            dirty_parent(filter, out, &from);
            dirty_parent(filter, out, &to);
        }
        (true, false) => on_new(filter, to, is_dir, true, out),
        (false, true) => on_gone(filter, from, is_dir, out),
        (false, false) => {
            dirty_parent(filter, out, &from);
            dirty_parent(filter, out, &to);
            // A directory's subtree is compared again once the rename is
            // applied: a rename applies cheaply as such, but an event of
            // the moved subtree may have been filed under a path of
            // another moment (fanotify resolves a handle to where the
            // directory is now, ahead of the events still queued), and a
            // chain of renames can meet a target the path entries around
            // it changed meanwhile. The compare puts right what those left.
            let rescan = is_dir.then(|| to.clone());
            out.push(Event::Rename { from, to });
            if let Some(to) = rescan {
                out.push(Event::Dirty {
                    path: to,
                    flags: flags::RECURSIVE | flags::LIVE,
                });
            }
        }
    }
}
