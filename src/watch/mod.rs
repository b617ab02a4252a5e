//! Change capture backends behind one trait.
//!
//! A backend turns kernel notifications into [`Event`]s on paths relative to
//! the source root: it keeps its own bookkeeping (watch descriptors, new
//! directories, renamed subtrees) and persists its watch tree in the
//! journal's `dirs` column family. The fanotify backend arrives with the
//! change-capture issue; `watch = "auto"` picks inotify until then.

pub mod inotify;

use std::time::Duration;

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
    #[error(
        "inotify watch limit reached after {added} watches ({needed} directories to watch); \
         raise it with `sysctl fs.inotify.max_user_watches={suggest}` (now {limit})"
    )]
    WatchLimit {
        added: usize,
        needed: usize,
        limit: u64,
        suggest: u64,
    },
    #[error("the source directory {0} was deleted or moved away")]
    SourceGone(String),
    #[error("cannot watch {path}: {source}")]
    Add {
        path: String,
        source: std::io::Error,
    },
    #[error("reading kernel events: {0}")]
    Read(std::io::Error),
    #[error("journal: {0}")]
    Journal(#[from] crate::journal::JournalError),
}

/// A change-capture backend.
pub trait Watcher: Send {
    /// The backend's name, as reported in logs and metrics.
    fn backend(&self) -> &'static str;
    /// Waits up to `timeout` for kernel events and appends them to `out`.
    fn poll(&mut self, out: &mut Vec<Event>, timeout: Duration) -> Result<(), WatchError>;
    /// Number of directories watched (inotify) or filesystems marked.
    fn watched(&self) -> usize;
}
