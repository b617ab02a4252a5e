//! Where the mirror is written: a local directory ([`local::LocalTarget`])
//! or another machine over the wire protocol ([`remote::RemoteTarget`]).
//! [`Target`] gives the shipper and the compare walks one interface to
//! both; [`DirView`] is one target directory as a compare walk sees it.

pub mod adopt;
pub mod identity;
pub mod local;
pub mod remote;
pub mod ssh_cipher;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use crate::fsops::{self, Root};
use crate::journal::flags;
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::protocol::Entry;
use local::{DeletePolicy, LocalTarget};
use remote::RemoteTarget;

/// Whether `e` says a remote target could not be reached (as opposed to
/// an error about one path).
pub fn is_unreachable(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<ApplyError>())
        .is_some_and(|a| matches!(a, ApplyError::Unreachable { .. }))
}

pub enum Target {
    Local(LocalTarget),
    Remote(Box<RemoteTarget>),
}

/// One target directory, for comparing its entries with the source's.
pub enum DirView {
    /// Opened for listing; entries are `lstat`ed on demand.
    Local(OwnedFd),
    /// Fetched whole in one request.
    Remote(HashMap<Vec<u8>, Entry>),
}

impl DirView {
    pub fn lstat(&self, name: &[u8]) -> Option<Meta> {
        match self {
            DirView::Local(fd) => fsops::lstat_at(fd.as_fd(), name).ok().flatten(),
            DirView::Remote(m) => m.get(name).map(|e| e.meta),
        }
    }

    pub fn read_link(&self, name: &[u8]) -> Option<Vec<u8>> {
        match self {
            DirView::Local(fd) => fsops::read_link_at(fd.as_fd(), name).ok(),
            DirView::Remote(m) => m.get(name).and_then(|e| e.link.clone()),
        }
    }

    /// The extended attributes of entry `name` in namespaces `ns` (a
    /// remote view holds those its listing asked for); `None`: unknown.
    pub fn xattrs(&self, name: &[u8], ns: u8) -> Option<crate::fidelity::Xattrs> {
        match self {
            DirView::Local(fd) => {
                crate::fidelity::read(crate::fidelity::Handle::At(fd.as_fd(), name), ns).ok()
            }
            DirView::Remote(m) => m.get(name).and_then(|e| e.xattrs.clone()),
        }
    }

    pub fn names(&self) -> Vec<Vec<u8>> {
        match self {
            DirView::Local(fd) => fsops::list_dir(fd.as_fd()).unwrap_or_default(),
            DirView::Remote(m) => m.keys().cloned().collect(),
        }
    }

    /// Removes a leftover temp file of an earlier run (a receiver cleans
    /// its own, and never lists them).
    pub fn remove_stale(&self, name: &[u8]) {
        if let DirView::Local(fd) = self {
            let _ = fsops::remove_tree_at(fd.as_fd(), name);
        }
    }
}

impl Target {
    /// Why a remote target cannot be reached, while it cannot.
    pub fn unreachable_reason(&self) -> Option<String> {
        match self {
            Target::Local(_) => None,
            Target::Remote(r) => r.unreachable_reason(),
        }
    }

    /// Directories made on the target as parents of other entries since
    /// the last call (see [`LocalTarget::take_made_parents`]); a remote
    /// receiver makes its own and does not report them.
    pub fn take_made_parents(&self) -> Vec<Vec<u8>> {
        match self {
            Target::Local(l) => l.take_made_parents(),
            Target::Remote(_) => Vec::new(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Local(t) => t.root().path().display().to_string(),
            Target::Remote(t) => t.describe(),
        }
    }

    /// `Ok` when the target can be written to now; `Err(wait)` while a
    /// remote target is down and the next connection attempt is `wait` away.
    pub fn ready(&self) -> Result<(), Duration> {
        match self {
            Target::Local(_) => Ok(()),
            Target::Remote(t) => t.ready(),
        }
    }

    /// `vouch[i]`: what lets the target's file of `entries[i]` stand when
    /// it looks alike (all [`Vouch::Metadata`] when `vouch` is empty; a
    /// remote target sends every file's content, or its delta, anyway),
    /// and whether the index names a copy there (see [`needs_doubt`]).
    pub fn apply_group(
        &self,
        source: &Root,
        parent: &[u8],
        entries: &[(&[u8], u8)],
        vouch: &[Vouch],
        policy: DeletePolicy,
    ) -> Vec<Result<Outcome, ApplyError>> {
        match self {
            Target::Local(t) => t.apply_group(source, parent, entries, vouch, policy),
            Target::Remote(t) => t.apply_group(source, parent, entries, vouch, policy),
        }
    }

    pub fn rename(&self, from: &[u8], to: &[u8]) -> Result<bool, ApplyError> {
        match self {
            Target::Local(t) => t.rename(from, to),
            Target::Remote(t) => t.rename(from, to),
        }
    }

    /// Sets the attributes of several entries (directories after a round)
    /// to `items`' metadata and their extended attributes in `source`.
    pub fn set_attrs_many(
        &self,
        source: &Root,
        items: &[(Vec<u8>, Meta)],
    ) -> Vec<Result<(), ApplyError>> {
        match self {
            Target::Local(t) => items
                .iter()
                .map(|(rel, m)| t.set_dir_attrs_from(source, rel, m))
                .collect(),
            Target::Remote(t) => t.set_attrs_many(source, items),
        }
    }

    /// The namespaces of extended attributes this target mirrors (see
    /// [`crate::fidelity::Keep::namespaces`]).
    pub fn keep_namespaces(&self) -> u8 {
        self.keep().namespaces()
    }

    /// Whether this target holds entries of `kind`: the kinds it mirrors
    /// (see [`crate::fidelity::Keep::mirrors_kind`]), devices only while
    /// making them was not refused (the writing side is not root).
    pub fn holds_kind(&self, kind: crate::meta::Kind) -> bool {
        self.keep().mirrors_kind(kind) && !(kind.is_device() && self.refusals().devices())
    }

    /// Whether names of one source inode share one inode here (see
    /// [`crate::links::Mirrored`]).
    pub fn links_names(&self) -> bool {
        self.keep().hard_links
    }

    fn keep(&self) -> crate::fidelity::Keep {
        match self {
            Target::Local(t) => t.keep(),
            Target::Remote(t) => t.keep(),
        }
    }

    /// Notes that this target holds a current copy of hard-linked source
    /// file `rel` (`m`), for its other names to link to. False when it
    /// holds another name of that file as a separate copy: the two are to
    /// be linked (a copy made without links, or by an interrupted run;
    /// told on a local target only: a remote one would need a round trip
    /// per name).
    pub fn note_mirrored(&self, rel: &[u8], m: &Meta) -> bool {
        match self {
            Target::Local(t) => t.note_mirrored(rel, m),
            Target::Remote(t) => {
                t.note_mirrored(rel, m);
                true
            }
        }
    }

    /// The kinds of attributes or entries this target refused so far.
    pub fn refused(&self) -> Vec<&'static str> {
        self.refusals().seen()
    }

    fn refusals(&self) -> &crate::fidelity::Refusals {
        match self {
            Target::Local(t) => t.refusals(),
            Target::Remote(t) => t.refusals(),
        }
    }

    /// Flushes what was applied to the target's disk; returns the boot id
    /// of the machine whose disk it is, when that is another machine that
    /// reported it (a local target's machine is this one: it cannot restart
    /// under a running daemon).
    pub fn sync(&self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Target::Local(t) => t.sync().map(|()| None),
            Target::Remote(t) => t.sync(),
        }
    }

    /// The bytes free for this daemon (or the receiver) on the target's
    /// filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        match self {
            Target::Local(t) => t.free_bytes(),
            Target::Remote(t) => t.free_bytes(),
        }
    }

    pub fn lstat(&self, rel: &[u8]) -> io::Result<Option<Meta>> {
        match self {
            Target::Local(t) => t.root().lstat(rel),
            Target::Remote(t) => t.lstat(rel),
        }
    }

    /// Directory `dir` of the target. `Ok(None)`: the target has no directory `dir`, or cannot list it
    /// (what it would hold is copied again). `Err`: a remote target that
    /// could not be reached; nothing is known about `dir`.
    pub fn view(&self, dir: &[u8]) -> io::Result<Option<DirView>> {
        match self {
            Target::Local(t) => Ok(t.root().open_dir(dir, true).ok().map(DirView::Local)),
            Target::Remote(t) => match t.list(dir, t.keep().namespaces()) {
                Ok(v) => Ok(v.map(|v| {
                    DirView::Remote(v.into_iter().map(|e| (e.name.clone(), e)).collect())
                })),
                Err(e) if is_unreachable(&e) => Err(e),
                Err(_) => Ok(None),
            },
        }
    }

    /// Walks the target below `start` (see [`crate::scan::walk`]).
    pub fn walk<D, E>(&self, start: &[u8], on_dir: D, on_error: E)
    where
        D: Fn(&[u8], &mut [crate::scan::Child]) + Sync,
        E: Fn(&[u8], &io::Error) + Sync,
    {
        match self {
            Target::Local(t) => crate::scan::walk(t.root(), start, on_dir, on_error),
            Target::Remote(t) => t.walk(start, on_dir, on_error),
        }
    }
}

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
    /// Nothing done: the entry is flagged [`flags::HOLDS_DIR`] and its
    /// apply would remove the directory (the source holds something else
    /// there now, or nothing). The shipper records a doubt first, then
    /// applies it again without the flag (see `Journal::doubt_put`).
    NeedsDoubt,
}

/// What lets a target file alike in metadata (size, mtime, mode, owner)
/// stand for the source file it is compared with, instead of a copy.
///
/// The index names the source file each copy was made from, and renames
/// applied on the target move those names with the copies: another file
/// named there means other content, however alike (directories swapped
/// through a temporary name, files written in one clock tick). In steady
/// state the index names every file the target holds, so a live change at
/// a path it names nothing at got there by a way no copy vouches for
/// (renames capture saw in another order than they were made, a compare
/// that read the source ahead of the renames recorded so far): copied. A
/// startup compare trusts the metadata, as rsync does, so that a target
/// seeded by another tool is not copied again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vouch {
    /// Its metadata.
    Metadata,
    /// Only being a copy of this source file (device, inode).
    Copy { dev: u64, ino: u64 },
    /// Nothing: it is copied.
    Nothing,
}

impl Vouch {
    /// From the index's entry for the path and whether the change is live.
    pub fn of(held: Option<&Meta>, live: bool) -> Vouch {
        match held {
            Some(h) if h.kind == Kind::File => Vouch::Copy {
                dev: h.dev,
                ino: h.ino,
            },
            Some(_) => Vouch::Metadata,
            None if live => Vouch::Nothing,
            None => Vouch::Metadata,
        }
    }

    /// Whether a target file alike in metadata to source entry `now` may
    /// stand for it (anything but a regular file may: its metadata and
    /// link text are all there is).
    pub fn lets_stand(self, now: &Meta) -> bool {
        now.kind != Kind::File
            || match self {
                Vouch::Metadata => true,
                // Another filesystem's inode numbers say nothing.
                Vouch::Copy { dev, ino } => now.dev != dev || now.ino == ino,
                Vouch::Nothing => false,
            }
    }
}

/// [`Outcome::NeedsDoubt`] for an entry flagged [`flags::HOLDS_DIR`] whose
/// source is not a directory (`None`: gone), and for one where the index
/// names a copy (`vouch`) that the apply is about to remove or replace
/// with another file's: the index is committed after the target changed,
/// and a crash in between left it naming a file the target had lost, or
/// the other file's copy; a start then found the named source file there
/// again, alike (moved back with its directory): in sync, never copied.
/// (The crash storm test: an `id` file copied over in the crashed run
/// from the other directory's file, the index still naming the old one.)
/// `source`: the source's entry as the apply found it, `None` if gone.
pub fn needs_doubt(f: u8, vouch: Vouch, source: Option<&Meta>) -> bool {
    (f & flags::HOLDS_DIR != 0 && source.map(|m| m.kind) != Some(Kind::Dir))
        || (matches!(vouch, Vouch::Copy { .. })
            && source.is_none_or(|m| m.kind != Kind::File || !vouch.lets_stand(m)))
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
    /// The remote target cannot be reached: nothing about the path itself
    /// failed, so it is not retried on its own (the shipper waits for the
    /// connection instead).
    #[error("target {target} unreachable: {reason}")]
    Unreachable { target: String, reason: String },
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
            ApplyError::Unreachable { .. } => "unreachable",
        }
    }

    /// The target's filesystem is full (or the quota used up): a condition
    /// of the whole target, to wait out, not a fault of the path. A remote
    /// target's error arrives as the receiver's message.
    pub fn out_of_space(&self) -> bool {
        let ApplyError::TargetWrite { source, .. } = self else {
            return false;
        };
        if let Some(code) = source.raw_os_error() {
            return code == libc::ENOSPC || code == libc::EDQUOT;
        }
        let msg = source.to_string();
        msg.contains("No space left on device") || msg.contains("Disk quota exceeded")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::meta::test_file as file;

    #[test]
    fn a_look_alike_stands_only_for_the_copy_the_index_names() {
        let (a, b) = (file(1, 10), file(1, 11));
        assert!(Vouch::of(Some(&a), true).lets_stand(&a));
        assert!(
            !Vouch::of(Some(&a), false).lets_stand(&b),
            "another file's copy"
        );
        assert!(
            Vouch::of(Some(&a), true).lets_stand(&file(2, 11)),
            "another filesystem"
        );
        assert!(!Vouch::of(None, true).lets_stand(&a), "live, named nowhere");
        assert!(
            Vouch::of(None, false).lets_stand(&a),
            "a startup compare trusts metadata"
        );
        let dir = Meta {
            kind: Kind::Dir,
            ..a
        };
        assert!(Vouch::of(Some(&dir), true).lets_stand(&a));
        assert!(Vouch::Nothing.lets_stand(&dir), "only files have content");
    }

    #[test]
    fn a_removal_or_replacement_of_a_copy_the_index_names_is_doubted_first() {
        let copy = Vouch::of(Some(&file(1, 10)), true);
        assert!(needs_doubt(0, copy, None));
        // The same source file, changed: copied over without a doubt.
        assert!(!needs_doubt(0, copy, Some(&file(1, 10))));
        // Another source file: the copy the index names is replaced.
        assert!(needs_doubt(0, copy, Some(&file(1, 11))));
        let dir = Meta {
            kind: Kind::Dir,
            ..file(1, 10)
        };
        assert!(needs_doubt(0, copy, Some(&dir)));
        assert!(!needs_doubt(0, Vouch::Nothing, None));
        assert!(!needs_doubt(0, Vouch::Metadata, Some(&file(1, 11))));
        assert!(needs_doubt(
            flags::HOLDS_DIR,
            Vouch::Metadata,
            Some(&file(1, 10))
        ));
        assert!(!needs_doubt(flags::HOLDS_DIR, Vouch::Metadata, Some(&dir)));
    }
}
