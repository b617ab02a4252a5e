//! Where the mirror is written. This issue: local directories
//! ([`local::LocalTarget`]); remote targets speak the same operations over
//! the wire protocol in the remote-target issue.

pub mod local;

use std::io;

use crate::meta::Meta;
use crate::paths;

/// What applying one pending path did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Content (file or symlink) written; the target now holds `Meta`.
    Copied { meta: Meta, bytes: u64 },
    /// The target already held it (attributes fixed if needed).
    Unchanged { meta: Meta },
    /// Directory present with the source's attributes; `scan` asks for its
    /// subtree to be compared (new, moved in, or rescan requested).
    Dir {
        meta: Meta,
        created: bool,
        scan: bool,
    },
    /// Source entry gone: removed from the target.
    Deleted,
    /// Source entry gone, but `delete` forbids removing it now.
    DeleteSkipped,
    /// A special file (FIFO, socket, device): not mirrored.
    Special,
    /// The source entry vanished or changed type mid-apply; the event that
    /// did it is already in the journal and will be applied next.
    Vanished,
}

/// Why a path could not be applied. Each is logged, counted and retried.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot read source {path}: {source}")]
    SourceRead { path: String, source: io::Error },
    #[error("cannot write target {path}: {source}")]
    TargetWrite { path: String, source: io::Error },
    #[error("source {path} kept changing while it was copied ({tries} tries)")]
    Changing { path: String, tries: u32 },
}

impl ApplyError {
    pub fn source_read(rel: &[u8], e: io::Error) -> Self {
        ApplyError::SourceRead {
            path: paths::display(rel),
            source: e,
        }
    }
    pub fn target_write(rel: &[u8], e: io::Error) -> Self {
        ApplyError::TargetWrite {
            path: paths::display(rel),
            source: e,
        }
    }
    /// A short label for counters.
    pub fn kind(&self) -> &'static str {
        match self {
            ApplyError::SourceRead { .. } => "source_read",
            ApplyError::TargetWrite { .. } => "target_write",
            ApplyError::Changing { .. } => "changing",
        }
    }
}
