//! Comparing a source subtree with a target and enqueuing the differences:
//! the initial sync, the startup rescan, and the rescans of moved-in or
//! overflowed subtrees all come down to these two walks.
//!
//! The source walk compares every entry with the target (metadata, and the
//! link text of symlinks) and enqueues only what differs; entries already in
//! place are recorded in the index. That makes the initial sync resumable: a
//! killed sync restarts the walk, finds what it already copied, and copies
//! the rest. The target walk finds entries the source no longer has.

use std::collections::HashSet;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::filter::Filter;
use crate::fsops::{self, Root};
use crate::journal::{flags, IndexReaders, Journal, JournalError, TargetId};
use crate::locks::lock;
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::scan;
use crate::target::{DirView, Target, Vouch};

/// Counters of a compare walk.
#[derive(Default, Debug)]
pub struct ScanStats {
    /// Source entries compared (not excluded, of a kind the target holds).
    pub scanned: AtomicU64,
    /// The entries among them that are not directories ("files" in
    /// progress figures: see [`crate::progress`]), and the bytes of the
    /// regular files.
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// Pending entries written to the journal.
    pub enqueued: AtomicU64,
    /// Entries that differ from the target: those enqueued, plus the
    /// entries of new directories that one `BULK` entry ships whole
    /// (which `enqueued` counts once, as their directory).
    pub bulk_covered: AtomicU64,
    pub in_sync: AtomicU64,
    /// The files among `in_sync`, and their bytes.
    pub in_sync_files: AtomicU64,
    pub in_sync_bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Source directories that could not be listed: re-enqueued as
    /// recursive entries by the walk, so they are retried (with backoff).
    pub failed_dirs: Mutex<Vec<Vec<u8>>>,
    /// Subtrees skipped because an earlier, interrupted reconciliation had
    /// finished them.
    pub resumed: AtomicU64,
    /// The directories this walk enqueued as BULK entries, whose files it
    /// counts as covered, not one by one (when it lists them, which may be
    /// after a shipper applied the entry: they are put here before the
    /// entry is enqueued). The apply of such an entry takes the directory
    /// out and counts its files then (see [`crate::progress`]). A directory
    /// compared twice in one run (by a restart's first pass and the full
    /// walk, with the target changing in between) can be covered in one
    /// look and listed file by file in the other: only what this set says
    /// was covered is counted done through its BULK entry.
    pub covered_dirs: Mutex<std::collections::HashSet<Vec<u8>>>,
    /// The journal's sequence number when a startup scan's full walk
    /// began (`u64::MAX` before it, set by the scan): the initial sync's
    /// progress counts only what the shipper applies of entries enqueued
    /// from then on (see [`crate::progress::Applied::note`]). A restart's
    /// first pass enqueues entries before it, which the walk compares
    /// again: counted once, by the walk (in sync, or enqueued anew).
    pub walk_seq0: AtomicU64,
}

impl ScanStats {
    /// Entries found to differ from the target (see `bulk_covered`).
    pub fn differing(&self) -> u64 {
        self.enqueued.load(Ordering::Relaxed) + self.bulk_covered.load(Ordering::Relaxed)
    }

    /// Adds the entries `o` compared (a subtree scan that is part of this
    /// one's work: see [`crate::progress`]).
    pub fn absorb(&self, o: &ScanStats) {
        for (to, from) in [
            (&self.scanned, &o.scanned),
            (&self.files, &o.files),
            (&self.bytes, &o.bytes),
            (&self.in_sync, &o.in_sync),
            (&self.in_sync_files, &o.in_sync_files),
            (&self.in_sync_bytes, &o.in_sync_bytes),
        ] {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let moved = std::mem::take(&mut *lock(&o.covered_dirs));
        lock(&self.covered_dirs).extend(moved);
    }

    /// Whether the files of BULK directory `dir` were counted as covered
    /// (and so count done when applied); forgets it.
    pub fn take_covered(&self, dir: &[u8]) -> bool {
        lock(&self.covered_dirs).remove(dir)
    }

    fn add(&self, t: &Tally) {
        self.scanned.fetch_add(t.compared, Ordering::Relaxed);
        self.files.fetch_add(t.files, Ordering::Relaxed);
        self.bytes.fetch_add(t.bytes, Ordering::Relaxed);
        self.in_sync.fetch_add(t.in_sync, Ordering::Relaxed);
        self.in_sync_files
            .fetch_add(t.in_sync_files, Ordering::Relaxed);
        self.in_sync_bytes
            .fetch_add(t.in_sync_bytes, Ordering::Relaxed);
        self.bulk_covered.fetch_add(t.covered, Ordering::Relaxed);
        metrics::counter!("drmirror_scan_files_total").increment(t.compared);
    }
}

/// What a compare of one directory found, child by child (see
/// `Compare::compare_child`).
#[derive(Default)]
struct Found {
    tally: Tally,
    /// Entries to enqueue, with their flags.
    todo: Vec<(Vec<u8>, u8)>,
    /// Look-alikes in place, to claim in the index.
    same: Vec<(Vec<u8>, Meta)>,
    /// Directories the index vouches for (with `list_dirs`).
    same_dirs: Vec<(Vec<u8>, Meta)>,
    /// Entries in place where the index held a directory.
    unheld: Vec<Vec<u8>>,
    /// Directories new on the target, each one BULK entry.
    new_bulk: Vec<Vec<u8>>,
}

/// How the children of one directory are compared.
struct Child<'a> {
    flag: u8,
    /// A BULK entry covers the directory.
    covered: bool,
    list_dirs: bool,
    /// The target keeps hard links.
    links: bool,
    /// New directories become BULK entries.
    bulk: bool,
    trust: &'a crate::journal::TargetTrust,
}

/// A target directory's listing, read once, when first needed.
struct LazyView<'a> {
    target: &'a Target,
    dir: &'a [u8],
    /// `Some(None)`: the target lacks the directory.
    view: Option<Option<DirView>>,
    /// Why it could not be listed.
    failed: Option<io::Error>,
}

impl<'a> LazyView<'a> {
    fn new(target: &'a Target, dir: &'a [u8]) -> LazyView<'a> {
        LazyView {
            target,
            dir,
            view: None,
            failed: None,
        }
    }

    /// The listing (`None`: the target lacks the directory, or could not
    /// list it: see `failed`).
    fn get(&mut self) -> Option<&DirView> {
        if self.view.is_none() {
            self.view = Some(self.target.view(self.dir).unwrap_or_else(|e| {
                self.failed = Some(e);
                None
            }));
        }
        self.view.as_ref().and_then(|v| v.as_ref())
    }

    /// Whether the target lacks the directory (or could not list it).
    fn absent(&self) -> bool {
        matches!(self.view, Some(None))
    }
}

/// What one directory's compare adds to [`ScanStats`].
#[derive(Default)]
struct Tally {
    compared: u64,
    files: u64,
    bytes: u64,
    in_sync: u64,
    in_sync_files: u64,
    in_sync_bytes: u64,
    covered: u64,
}

impl Tally {
    fn compared(&mut self, m: &Meta) {
        self.compared += 1;
        if m.kind != Kind::Dir {
            self.files += 1;
            self.bytes += file_bytes(m);
        }
    }

    fn in_sync(&mut self, m: &Meta) {
        self.in_sync += 1;
        if m.kind != Kind::Dir {
            self.in_sync_files += 1;
            self.in_sync_bytes += file_bytes(m);
        }
    }
}

/// The bytes `m` stands for in progress figures: a regular file's size.
pub fn file_bytes(m: &Meta) -> u64 {
    if m.kind == Kind::File {
        m.size
    } else {
        0
    }
}

/// The smallest subtree (in entries) a reconciliation checkpoints.
const CHECKPOINT_MIN_ENTRIES: u64 = 256;

/// How a compare walk finds entries the source no longer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletions {
    /// It does not (a subtree known to be new on the target).
    Skip,
    /// Each target directory's listing against the source's.
    TargetListing,
    /// The index's entries of each directory against the source's: no
    /// target access at all. Sound once a complete walk has made the index
    /// account for everything the target holds, bar the temporary files of
    /// copies a crash cut short (see [`Compare::remove_stale_temps`]).
    Index,
}

/// Everything a compare walk needs.
pub struct Compare<'a> {
    pub source: &'a Root,
    pub target: &'a Target,
    pub journal: &'a Journal,
    pub t: TargetId,
    pub filter: &'a Filter,
    pub owner: bool,
    pub stats: &'a ScanStats,
    pub stop: &'a AtomicBool,
    pub progress: Option<&'a indicatif::ProgressBar>,
    /// Where to report the directories listed (see [`crate::watch::Watcher::dir_feed`]).
    pub dirs_seen: Option<&'a crossbeam_channel::Sender<Vec<Vec<u8>>>>,
    /// Single files in directories the target lacks may be marked
    /// [`flags::ABSENT`]: only when no older entry can be in flight for
    /// them. A start with a backlog (a resumed initial sync) has a shipper
    /// copying the same names from older entries while the scan runs, and
    /// the check ABSENT skips is what spares their second copy.
    ///
    /// A directory the target lacks is one [`flags::BULK`] entry either
    /// way (a resumed initial sync goes at the speed of a fresh one): its
    /// apply skips that check only for a directory it created itself, and
    /// an older entry copying into it at the same time at worst copies a
    /// file twice, the source's content both times.
    pub absent_ok: bool,
    /// Subtrees where a target file alike in metadata does not stand for
    /// the source's without the index naming it (see
    /// [`crate::target::Vouch`]; a live compare is so everywhere), besides
    /// those the journal distrusts (see `journal::trust`).
    pub distrust: &'a [Vec<u8>],
}

fn symlink_same(src_dir: &Root, rel: &[u8], tdir: Option<&DirView>, name: &[u8]) -> bool {
    let Some(tdir) = tdir else { return false };
    match (src_dir.read_link(rel), tdir.read_link(name)) {
        (Ok(a), Some(b)) => a == b,
        _ => false,
    }
}

/// What the workers of one walk share.
struct WalkShared<'j> {
    /// The first journal error, which ends the walk.
    err: Mutex<Option<JournalError>>,
    /// With [`Deletions::Index`]: the index's entries of each directory.
    index: Option<IndexReaders<'j>>,
    /// In a source walk that may enqueue [`flags::BULK`] entries: the
    /// directories it enqueued so, whose entries the walk then leaves to
    /// them when it lists the directory.
    bulk: Option<Mutex<HashSet<Vec<u8>>>>,
}

impl Compare<'_> {
    fn keep_first(err: &Mutex<Option<JournalError>>, e: JournalError) {
        let mut g = err.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }

    /// Reconciliation: the source subtree against the journal's `index`,
    /// the target touched only where they disagree.
    ///
    /// An entry whose size, mtime, ctime, inode, mode and owner equal its
    /// index entry has not changed since it was copied (the index holds the
    /// source's metadata as it was when the copy was verified): nothing to
    /// do, not even a target `lstat`. Anything else is compared with the
    /// target as in [`Compare::source_walk`]. Deletions are found as
    /// `deletions` says: by the index's entries of each directory, or by
    /// listing each target directory (names only, no stat). A directory's
    /// own index entry cannot vouch for its entries: it is stamped from the
    /// source when the directory is touched, which may be after a change in
    /// it whose event a crash lost.
    ///
    /// With `resume`, the walk checkpoints in the journal each directory
    /// whose subtree it has finished, and skips the subtrees the set holds:
    /// those a previous reconciliation, cut short by a crash, had finished.
    /// (Sound only when capture ran without a gap since that reconciliation
    /// started: the caller's business.)
    pub fn reconcile(
        &self,
        start: &[u8],
        flag: u8,
        resume: Option<&HashSet<Vec<u8>>>,
        deletions: Deletions,
    ) -> Result<(), JournalError> {
        self.walk_source(start, flag, deletions, resume)
    }

    /// The first pass of a reconciliation after a restart without handover:
    /// finds the directories whose entries changed while nothing captured
    /// them, and compares just those, so their changes go out at once
    /// instead of when the full walk reaches them.
    ///
    /// An entry created, deleted or renamed changes its directory's mtime
    /// and ctime, so a directory that differs from its index entry (the
    /// source's metadata when it was last mirrored) is one to compare. The
    /// directories come from the journal's directory list, so this costs
    /// one `lstat` per directory and no listing: well under the full walk's
    /// time, and growing with the number of directories only. Files changed
    /// in place leave their directory alone, and directories the list lacks
    /// (created since the last walk by a run that then lost their events)
    /// are found by the full walk that follows. Returns the number of
    /// directories compared. Errors are left to the full walk.
    ///
    /// A directory changed at or after `recent` (ns since the epoch: when
    /// capture was last known whole, less a margin for the filesystem's
    /// coarse clock) is compared too, whatever its index entry says: that
    /// entry may have been re-stamped from the source after a change that
    /// capture then lost (a crash with events still queued), vouching for a
    /// listing the target does not have. The full walk finds deletions in
    /// the index, and an entry the target holds but the index does not
    /// (a directory a bulk copy made, not indexed yet) would stay there.
    pub fn changed_dirs_first(&self, flag: u8, recent: Option<i64>) -> Result<u64, JournalError> {
        let sh = WalkShared {
            err: Mutex::new(None),
            index: None,
            // This pass compares a few directories, not their subtrees: an
            // entry for a whole new directory is the full walk's to make.
            bulk: None,
        };
        let compared = AtomicU64::new(0);
        let compare = |dir: &[u8]| {
            if let Ok(mut children) = scan::read_children(self.source, dir) {
                self.compare_dir(
                    dir,
                    &mut children,
                    flag,
                    Deletions::TargetListing,
                    false,
                    &sh,
                );
                compared.fetch_add(1, Ordering::Relaxed);
            }
        };
        let check = |chunk: Vec<(Vec<u8>, Option<Meta>)>| {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let chunk: Vec<&(Vec<u8>, Option<Meta>)> = chunk
                .iter()
                .filter(|(d, _)| d.is_empty() || !self.filter.excluded(d, true))
                .collect();
            // The root, and any entry written by an older version, come
            // from the index itself.
            let unknown: Vec<&[u8]> = chunk
                .iter()
                .filter(|(_, m)| m.is_none())
                .map(|(d, _)| d.as_slice())
                .collect();
            let mut looked_up = match self.journal.index_get_many(self.t, &unknown) {
                Ok(v) => v.into_iter(),
                Err(e) => return Self::keep_first(&sh.err, e),
            };
            let mut gone = Vec::new();
            let mut changed = Vec::new();
            for (rel, listed) in chunk {
                let ix = match listed {
                    Some(m) => Some(*m),
                    None => looked_up.next().flatten(),
                };
                match self.source.lstat_quick(rel) {
                    Ok(Some(m)) if m.kind == Kind::Dir => {
                        let late = recent.is_some_and(|t| m.mtime_ns >= t || m.ctime_ns >= t);
                        if ix != Some(m) || late {
                            compare(rel);
                            changed.push((rel.to_vec(), flag));
                        }
                    }
                    Ok(_) => gone.push(rel.as_slice()),
                    Err(_) => {}
                }
            }
            // The directories themselves (their times) go out with them.
            self.stats
                .enqueued
                .fetch_add(changed.len() as u64, Ordering::Relaxed);
            if let Err(e) = self
                .journal
                .enqueue(self.t, &changed)
                .and_then(|()| self.journal.dirlist_remove(self.t, &gone))
            {
                Self::keep_first(&sh.err, e);
            }
        };
        // The list is checked in chunks as it is read: the reading thread
        // hands each to the pool and reads on.
        let check = &check;
        rayon::scope(|s| {
            s.spawn(move |_| check(vec![(Vec::new(), None)]));
            let read = self.journal.dirlist_chunks(self.t, 256, |chunk| {
                s.spawn(move |_| check(chunk));
                !self.stop.load(Ordering::Relaxed)
            });
            if let Err(e) = read {
                Self::keep_first(&sh.err, e);
            }
        });
        match sh.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(compared.into_inner()),
        }
    }

    /// Removes the temporary files that copies a crash cut short may have
    /// left in the target directories `dirs` (see
    /// [`Journal::pending_parents`] for why those are the only ones), and
    /// enqueues (with `flag`) each directory that had one: the removal moved
    /// its mtime. The receiver of a remote target drops its own.
    pub fn remove_stale_temps(
        &self,
        dirs: &HashSet<Vec<u8>>,
        flag: u8,
    ) -> Result<(), JournalError> {
        use rayon::prelude::*;
        if !matches!(self.target, Target::Local(_)) {
            return Ok(());
        }
        let cleaned: Vec<(Vec<u8>, u8)> = dirs
            .par_iter()
            .filter(|dir| {
                let Ok(Some(view)) = self.target.view(dir) else {
                    return false;
                };
                let stale: Vec<Vec<u8>> = view
                    .names()
                    .into_iter()
                    .filter(|n| fsops::is_stale_temp_name(n))
                    .collect();
                stale.iter().for_each(|n| view.remove_stale(n));
                !stale.is_empty()
            })
            .map(|dir| (dir.clone(), flag))
            .collect();
        if !cleaned.is_empty() {
            tracing::info!(
                "removed the temporary files of copies the last run did not finish, in {} directories",
                cleaned.len()
            );
        }
        self.journal.enqueue(self.t, &cleaned)
    }

    /// Compares `start` (itself included) and its subtree with the target,
    /// enqueuing differences with `flag`.
    pub fn source_walk(&self, start: &[u8], flag: u8) -> Result<(), JournalError> {
        self.walk_source(start, flag, Deletions::Skip, None)
    }

    /// Records that the subtree `dir` is reconciled, unless the walk was
    /// stopped or a directory failed (its retry entry is only enqueued at
    /// the end of the walk, so an ancestor must not be checkpointed).
    fn checkpoint(
        &self,
        dir: &[u8],
        abort_after: Option<u64>,
        done: &AtomicU64,
    ) -> Result<(), JournalError> {
        if self.stop.load(Ordering::Relaxed)
            || !self
                .stats
                .failed_dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            return Ok(());
        }
        self.journal.recon_done_put(self.t, &[dir.to_vec()])?;
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        if abort_after.is_some_and(|a| n >= a) {
            // Test hook: a crash in the middle of a reconciliation.
            std::process::abort();
        }
        Ok(())
    }

    /// Compares the (stat'ed) `children` of source directory `dir` with the
    /// index, and where they differ with the target; enqueues what differs
    /// and records in the index what is in place; finds the entries the
    /// source lacks as `deletions` says.
    fn compare_dir(
        &self,
        dir: &[u8],
        children: &mut [scan::Child],
        flag: u8,
        deletions: Deletions,
        list_dirs: bool,
        sh: &WalkShared,
    ) {
        let err = &sh.err;
        let trust = match self.journal.trust(self.t) {
            Ok(t) => t,
            Err(e) => return Self::keep_first(err, e),
        };
        // Before the index is read (see `journal::trust`, rule 1).
        let mut epoch = trust.epoch();
        // A BULK entry copies this directory's entries when it is applied:
        // the target lacked the directory when its parent was compared, and
        // nothing can be there that the apply would not find itself.
        let covered = sh.bulk.as_ref().is_some_and(|b| lock(b).remove(dir));
        let (indexed, extra_ix) = self.indexed(dir, children, covered, deletions, sh, &mut epoch);
        let mut tv = LazyView::new(self.target, dir);
        let mut found = Found::default();
        let how = Child {
            flag,
            covered,
            list_dirs,
            links: self.target.links_names(),
            bulk: sh.bulk.is_some(),
            trust: &trust,
        };
        for (c, ix) in children.iter_mut().zip(indexed) {
            self.compare_child(c, ix, &how, &mut found, &mut tv);
        }
        let Found {
            tally,
            mut todo,
            same,
            same_dirs,
            unheld,
            new_bulk,
        } = found;
        let subdirs: Vec<&[u8]> = children
            .iter()
            .filter(|c| c.descend && c.meta.kind == Kind::Dir)
            .map(|c| c.rel.as_slice())
            .collect();
        if list_dirs {
            // Those the index vouches for; the others join when indexed.
            let listed: Vec<(&[u8], Meta)> =
                same_dirs.iter().map(|(p, m)| (p.as_slice(), *m)).collect();
            if let Err(e) = self.journal.dirlist_put(self.t, &listed) {
                Self::keep_first(err, e);
            }
        }
        if let Some(tx) = self.dirs_seen {
            if !subdirs.is_empty() {
                let _ = tx.send(subdirs.iter().map(|d| d.to_vec()).collect());
            }
        }
        self.stats.add(&tally);
        let names = deletions == Deletions::TargetListing;
        if names {
            tv.get();
        }
        if let Some(e) = tv.failed.take() {
            // The target could not list `dir` (a remote target that
            // went away): nothing here was compared. The whole
            // subtree is compared again, as one recursive entry,
            // once the target answers.
            self.walk_error("target", dir, &e);
            children.iter_mut().for_each(|c| c.descend = false);
            return;
        }
        if names {
            if let Err(e) = self.extra_target_names(dir, children, flag, tv.get()) {
                Self::keep_first(err, e);
            }
        }
        if let Some(b) = sh.bulk.as_ref() {
            // Before their BULK entries are enqueued (below): a shipper
            // that applies one before the walk lists the directory still
            // finds it counted as covered.
            lock(&self.stats.covered_dirs).extend(new_bulk.iter().cloned());
            // Before the walk lists them (it does once this returns).
            lock(b).extend(new_bulk);
        }
        // In the index, not in the source: gone while nothing captured it.
        // (Excluded names are neither mirrored nor deleted.)
        for (name, m) in extra_ix {
            let rel = paths::join(dir, &name);
            if !self.filter.excluded(&rel, m.kind == Kind::Dir) {
                todo.push((rel, flag));
            }
        }
        // The claims first: those a rename overtook join `todo`.
        if let Err(e) = self.claim(&trust, epoch, &same, unheld, flag, &mut todo) {
            Self::keep_first(err, e);
        }
        self.stats
            .enqueued
            .fetch_add(todo.len() as u64, Ordering::Relaxed);
        if let Some(p) = self.progress {
            p.inc(children.len() as u64);
        }
        if let Err(e) = self.journal.enqueue(self.t, &todo) {
            Self::keep_first(err, e);
        }
    }

    /// What the index holds for each of `children` (sorted by name when
    /// read by listing), and what it holds that `children` lack (with
    /// [`Deletions::Index`]); `epoch` becomes that of the reader's snapshot
    /// when a reader is used. Nothing is read for a directory a BULK entry
    /// covers (except to find deletions). An error is kept and reads as
    /// nothing held.
    #[allow(clippy::type_complexity)]
    fn indexed(
        &self,
        dir: &[u8],
        children: &mut [scan::Child],
        covered: bool,
        deletions: Deletions,
        sh: &WalkShared,
        epoch: &mut u64,
    ) -> (Vec<Option<Meta>>, Vec<(Vec<u8>, Meta)>) {
        let mut extra_ix = Vec::new();
        if covered && deletions != Deletions::Index {
            // Compared with nothing: the BULK entry copies them all.
            return (vec![None; children.len()], extra_ix);
        }
        if deletions != Deletions::Index {
            let rels: Vec<&[u8]> = children.iter().map(|c| c.rel.as_slice()).collect();
            return match self.journal.index_get_many(self.t, &rels) {
                Ok(v) => (v, extra_ix),
                Err(e) => {
                    Self::keep_first(&sh.err, e);
                    (vec![None; children.len()], extra_ix)
                }
            };
        }
        let ix = match &sh.index {
            Some(r) => r.children(self.t, dir).map(|(ix, e)| {
                // The reader's view may be older than this directory.
                *epoch = e;
                ix
            }),
            None => self.journal.index_children(self.t, dir),
        };
        let ix = match ix {
            Ok(ix) => ix,
            Err(e) => {
                Self::keep_first(&sh.err, e);
                return (vec![None; children.len()], extra_ix);
            }
        };
        // Both in name order (siblings' keys differ only in the name): one
        // merge pairs them.
        children.sort_unstable_by(|a, b| a.rel.cmp(&b.rel));
        let mut v = Vec::with_capacity(children.len());
        let mut ix = ix.into_iter().peekable();
        for c in children.iter() {
            let name = paths::split(&c.rel).1;
            while let Some((n, m)) = ix.next_if(|(n, _)| n.as_slice() < name) {
                extra_ix.push((n, m));
            }
            v.push(ix.next_if(|(n, _)| n.as_slice() == name).map(|(_, m)| m));
        }
        extra_ix.extend(ix);
        (v, extra_ix)
    }

    /// Child `c` of a directory being compared, the index holding `ix`
    /// there: in place (claimed or vouched), or an entry to enqueue, into
    /// `found`; `tv` lists the target's directory when first needed.
    fn compare_child(
        &self,
        c: &mut scan::Child,
        ix: Option<Meta>,
        how: &Child<'_>,
        found: &mut Found,
        tv: &mut LazyView<'_>,
    ) {
        let flag = how.flag;
        if self.filter.excluded(&c.rel, c.meta.kind == Kind::Dir) {
            c.descend = false;
            return;
        }
        // A kind this target does not hold (special files with
        // `special_files = false`, devices without root) would be sent
        // again at every compare, to be refused again.
        if !self.target.holds_kind(c.meta.kind) {
            return;
        }
        found.tally.compared(&c.meta);
        if how.covered {
            if c.meta.kind == Kind::Dir {
                found.todo.push((c.rel.clone(), flag | flags::BULK));
                found.new_bulk.push(c.rel.clone());
            } else {
                found.tally.covered += 1;
            }
            return;
        }
        let linked = how.links && c.meta.kind != Kind::Dir && c.meta.nlink > 1;
        // Vouched for, but held as a copy apart from another name of the
        // same source file: to be linked (see `Target::note_mirrored`).
        if linked && ix == Some(c.meta) && !self.target.note_mirrored(&c.rel, &c.meta) {
            found.todo.push((c.rel.clone(), flag));
            return;
        }
        if ix == Some(c.meta) {
            found.tally.in_sync(&c.meta);
            if how.list_dirs && c.meta.kind == Kind::Dir {
                found.same_dirs.push((c.rel.clone(), c.meta));
            }
            return;
        }
        let live = flag & flags::LIVE != 0
            || self.distrust.iter().any(|d| paths::is_within(&c.rel, d))
            || how.trust.distrusts(&c.rel);
        let vouch = Vouch::of(ix.as_ref(), live);
        if matches!(vouch, Vouch::Copy { .. }) && !vouch.lets_stand(&c.meta) {
            // The index says the target's file here was copied from another
            // source file. Its size and mtime may still match (directories
            // swapped through a temporary name, two files written in one
            // clock tick): the target's metadata cannot vouch for its
            // content, so it is copied.
            found.todo.push((c.rel.clone(), flag | flags::CONTENT));
            return;
        }
        tv.get();
        let absent_dir = tv.absent();
        let tdir = tv.view.as_ref().and_then(|t| t.as_ref());
        let name = paths::split(&c.rel).1;
        let t = tdir.and_then(|d| d.lstat(name));
        let equal = match t {
            Some(t) if c.meta.mirrors(&t, self.owner) => {
                c.meta.kind != Kind::Symlink || symlink_same(self.source, &c.rel, tdir, name)
            }
            _ => false,
        };
        // Alike in metadata, but not vouched for by the index: what differs
        // may be extended attributes or ACLs. A name of a hard-linked file
        // the index does not vouch for, held apart from another name: its
        // apply links them (see `crate::links::Mirrored`).
        let split = linked && equal && !self.target.note_mirrored(&c.rel, &c.meta);
        let entry = |f: u8| (c.rel.clone(), f);
        if equal && !vouch.lets_stand(&c.meta) {
            found.todo.push(entry(flag | flags::CONTENT));
        } else if equal && (split || !self.same_xattrs(&c.rel, tdir, name)) {
            found.todo.push(entry(flag));
        } else if equal {
            if ix.is_some_and(|m| m.kind == Kind::Dir) && c.meta.kind != Kind::Dir {
                // What the index held below it is gone (see the shipper's
                // rounds).
                found.unheld.push(c.rel.clone());
            }
            found.tally.in_sync(&c.meta);
            found.same.push((c.rel.clone(), c.meta));
        } else if t.is_none() && c.meta.kind == Kind::Dir && how.bulk {
            // New on the target: one entry for the directory and its files
            // (see `covered`).
            found.todo.push(entry(flag | flags::BULK));
            found.new_bulk.push(c.rel.clone());
        } else if absent_dir && self.absent_ok && c.meta.kind != Kind::Dir {
            // The target lacks the whole directory: the apply need not look
            // there before copying (a negative lookup searches the
            // directory's leaf block, for every file of an initial sync).
            // Not for a single missing name: in a directory the target has,
            // a shipper may be copying it right now from an older entry
            // (see `absent_ok`). A target that could not be listed at all
            // drops `todo`.
            found.todo.push(entry(flag | flags::ABSENT));
        } else {
            found.todo.push(entry(flag));
        }
    }

    /// Writes in the index the look-alikes a compare found in place (`same`)
    /// and forgets what it held below those of them it held as directories
    /// (`unheld`): unless a target rename began since `epoch` (see
    /// `journal::trust`, rule 1). If one did, they are added to `todo`: the
    /// shipper applies them after its renames, and each apply says whether
    /// the file is in place.
    fn claim(
        &self,
        trust: &crate::journal::TargetTrust,
        epoch: u64,
        same: &[(Vec<u8>, Meta)],
        unheld: Vec<Vec<u8>>,
        flag: u8,
        todo: &mut Vec<(Vec<u8>, u8)>,
    ) -> Result<(), JournalError> {
        if same.is_empty() {
            return Ok(());
        }
        let forget = crate::journal::Completion {
            index_remove_tree: unheld,
            ..Default::default()
        };
        let claimed = trust.claim_if_unmoved(epoch, || {
            self.journal.complete(self.t, &forget)?;
            self.journal.index_put_many(self.t, same)
        })?;
        if !claimed {
            tracing::debug!(
                entries = same.len(),
                "a target rename overtook a compare: its claims are applied instead"
            );
            todo.extend(same.iter().map(|(p, _)| (p.clone(), flag)));
        } else if tracing::enabled!(tracing::Level::TRACE) {
            for (p, m) in same {
                tracing::trace!(path = %paths::display(p), ino = m.ino, "index claim from a compare");
            }
        }
        Ok(())
    }

    /// The source walk.
    fn walk_source(
        &self,
        start: &[u8],
        flag: u8,
        deletions: Deletions,
        resume: Option<&HashSet<Vec<u8>>>,
    ) -> Result<(), JournalError> {
        let abort_after: Option<u64> =
            crate::failpoints::get(crate::failpoints::Hook::AbortReconcileAfter)
                .and_then(|v| v.to_str()?.parse().ok());
        let checkpointed = AtomicU64::new(0);
        // A startup scan fills the directory list until one has finished;
        // from then on the index writes keep it (see `Journal::dirlist`).
        let list_dirs = resume.is_some() && !self.journal.index_whole(self.t)?;
        // The start directory itself.
        if let Ok(Some(m)) = self.source.lstat(start) {
            let t = self.target.lstat(start).ok().flatten();
            if !matches!(t, Some(t) if m.mirrors(&t, self.owner)) {
                self.journal.enqueue(self.t, &[(start.to_vec(), flag)])?;
            }
        }
        let sh = WalkShared {
            err: Mutex::new(None),
            index: (deletions == Deletions::Index).then(|| IndexReaders::new(self.journal)),
            bulk: Some(Mutex::new(HashSet::new())),
        };
        // Every directory is listed with a stat per entry, those a BULK
        // entry covers too (where only the subdirectories matter to the
        // compare: see `compare_dir`): the initial sync's progress needs
        // their sizes (see `crate::progress`; measured: about 5 % of a
        // 200,000-file initial sync).
        scan::walk_tracked(
            self.source,
            start,
            |dir, children| {
                if self.stop.load(Ordering::Relaxed) {
                    children.iter_mut().for_each(|c| c.descend = false);
                    return;
                }
                if let Some(done) = resume {
                    for c in children.iter_mut() {
                        if c.descend && done.contains(&c.rel) {
                            c.descend = false;
                            self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                self.compare_dir(dir, children, flag, deletions, list_dirs, &sh);
            },
            |p, e| self.walk_error("source", p, e),
            |dir, entries| {
                // Small subtrees are not worth a journal write: a resumed
                // scan walks them again.
                if resume.is_some() && (entries >= CHECKPOINT_MIN_ENTRIES || dir == start) {
                    if let Err(e) = self.checkpoint(dir, abort_after, &checkpointed) {
                        Self::keep_first(&sh.err, e);
                    }
                }
            },
        );
        let failed: Vec<(Vec<u8>, u8)> = self
            .stats
            .failed_dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|d| (d.clone(), flag | flags::RECURSIVE))
            .collect();
        if let Err(e) = self.journal.enqueue(self.t, &failed) {
            Self::keep_first(&sh.err, e);
        }
        match sh.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Walks the target below `start` and enqueues (with `flag`) every entry
    /// the source does not hold as the same kind. Leftover temporary files of
    /// an interrupted copy are removed on the spot.
    pub fn target_walk(&self, start: &[u8], flag: u8) -> Result<(), JournalError> {
        let err = Mutex::new(None);
        self.target.walk(
            start,
            |dir, children| {
                if self.stop.load(Ordering::Relaxed) {
                    children.iter_mut().for_each(|c| c.descend = false);
                    return;
                }
                if let Err(e) = self.target_children(dir, children, flag) {
                    Self::keep_first(&err, e);
                }
            },
            |p, e| {
                self.walk_error("target", p, e);
                // A remote target that went away: compare the subtree again
                // once it is back. (A directory the target cannot list is
                // left alone, as before: it would fail the same way.)
                if crate::target::is_unreachable(e) {
                    if let Err(e) = self
                        .journal
                        .enqueue(self.t, &[(p.to_vec(), flag | flags::RECURSIVE)])
                    {
                        Self::keep_first(&err, e);
                    }
                }
            },
        );
        match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Enqueues the names in target directory `dir` that the source listing
    /// `children` lacks; removes stale temporary files.
    fn extra_target_names(
        &self,
        dir: &[u8],
        children: &[scan::Child],
        flag: u8,
        view: Option<&DirView>,
    ) -> Result<(), JournalError> {
        let Some(td) = view else {
            return Ok(());
        };
        let names = td.names();
        let have: std::collections::HashSet<&[u8]> =
            children.iter().map(|c| paths::split(&c.rel).1).collect();
        let mut todo = Vec::new();
        let mut cleaned = false;
        for name in names {
            if have.contains(name.as_slice()) {
                continue;
            }
            if fsops::is_temp_name(&name) {
                if fsops::is_stale_temp_name(&name) {
                    td.remove_stale(&name);
                    cleaned = true;
                }
                continue;
            }
            let rel = paths::join(dir, &name);
            // Excluded names are neither mirrored nor deleted.
            let is_dir = td.lstat(&name).is_some_and(|m| m.kind == Kind::Dir);
            if !self.filter.excluded(&rel, is_dir) {
                todo.push((rel, flag));
            }
        }
        if cleaned {
            // The removal moved the directory's mtime.
            todo.push((dir.to_vec(), flag));
        }
        self.stats
            .enqueued
            .fetch_add(todo.len() as u64, Ordering::Relaxed);
        self.journal.enqueue(self.t, &todo)
    }

    /// Enqueues the entries of target directory `dir` that the source does
    /// not hold as the same kind; removes stale temporary files.
    fn target_children(
        &self,
        dir: &[u8],
        children: &mut [scan::Child],
        flag: u8,
    ) -> Result<(), JournalError> {
        let sdir = self.source.open_dir(dir, false).ok();
        let tdir = self.target.view(dir).ok().flatten();
        let mut todo = Vec::new();
        let mut cleaned = false;
        for c in children.iter_mut() {
            let name = paths::split(&c.rel).1;
            if fsops::is_temp_name(name) && c.meta.kind != Kind::Dir {
                if fsops::is_stale_temp_name(name) {
                    if let Some(td) = tdir.as_ref() {
                        td.remove_stale(name);
                        cleaned = true;
                    }
                }
                c.descend = false;
                continue;
            }
            if self.filter.excluded(&c.rel, c.meta.kind == Kind::Dir) {
                c.descend = false;
                continue;
            }
            let s = sdir
                .as_ref()
                .and_then(|d| fsops::lstat_at(d.as_fd(), name).ok().flatten());
            match s {
                Some(s) if s.kind == c.meta.kind => {}
                _ => {
                    c.descend = false;
                    todo.push((c.rel.clone(), flag));
                }
            }
        }
        if cleaned {
            // The removal moved the directory's mtime.
            todo.push((dir.to_vec(), flag));
        }
        self.stats
            .enqueued
            .fetch_add(todo.len() as u64, Ordering::Relaxed);
        self.journal.enqueue(self.t, &todo)
    }

    /// Whether source entry `rel` and entry `name` of target directory
    /// `tdir` hold the same extended attributes in the namespaces the
    /// target keeps. Unreadable on either side: not the same (the apply
    /// reads them again and says why).
    fn same_xattrs(&self, rel: &[u8], tdir: Option<&DirView>, name: &[u8]) -> bool {
        let ns = self.target.keep_namespaces();
        if ns == 0 {
            return true;
        }
        let Some(t) = tdir.and_then(|d| d.xattrs(name, ns)) else {
            return false;
        };
        crate::fidelity::read_at(self.source, rel, ns).is_ok_and(|s| s == t)
    }

    fn walk_error(&self, side: &str, p: &[u8], e: &io::Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(side, path = %paths::display(p), "cannot scan directory: {e}; will retry");
        // The subtree was not (fully) compared: retried as a whole.
        if side == "source" || crate::target::is_unreachable(e) {
            self.stats
                .failed_dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(p.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::local::LocalTarget;

    /// Reconciles `src` against an index that records every source entry as
    /// in place plus two ghosts, which the source no longer has; returns
    /// what the walk enqueued.
    fn reconcile_with(deletions: Deletions) -> Vec<Vec<u8>> {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("d/x"), b"x").unwrap();
        std::fs::write(src.join("d/e/y"), b"y").unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let journal = Journal::open(&t.path().join("journal")).unwrap();
        let id = journal.target_id("t").unwrap();
        let source = Root::open(&src).unwrap();
        let mut indexed = Vec::new();
        for rel in [&b""[..], b"d", b"d/e", b"d/x", b"d/e/y"] {
            indexed.push((rel.to_vec(), source.lstat(rel).unwrap().unwrap()));
        }
        let ghost = Meta {
            kind: Kind::File,
            ..indexed[3].1
        };
        // One ghost sorts before the source's entries of its directory,
        // one after them all.
        indexed.push((b"d/e/ghost".to_vec(), ghost));
        indexed.push((b"d/zz".to_vec(), ghost));
        journal.index_put_many(id, &indexed).unwrap();
        // The start directory itself is compared with the target, whose
        // times here differ from the source's or not by the clock's tick.
        reconcile_pending(&journal, id, &src, &dst, true, None, deletions)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// Reconciles `src` against target `dst` (target `id` of `journal`);
    /// returns the pending entries (path, flags) it enqueued, the root's
    /// left out, in path order.
    fn reconcile_pending(
        journal: &Journal,
        id: TargetId,
        src: &std::path::Path,
        dst: &std::path::Path,
        absent_ok: bool,
        resume: Option<&HashSet<Vec<u8>>>,
        deletions: Deletions,
    ) -> Vec<(Vec<u8>, u8)> {
        let source = Root::open(src).unwrap();
        let target = Target::Local(LocalTarget::open(dst, false).unwrap());
        let filter = Filter::new(src, &[]).unwrap();
        let (stats, stop) = (ScanStats::default(), AtomicBool::new(false));
        let cmp = Compare {
            source: &source,
            target: &target,
            journal,
            t: id,
            filter: &filter,
            owner: false,
            stats: &stats,
            stop: &stop,
            progress: None,
            dirs_seen: None,
            absent_ok,
            distrust: &[],
        };
        cmp.reconcile(b"", flags::STARTUP, resume, deletions)
            .unwrap();
        journal
            .pending_batch(id, None, 1000)
            .unwrap()
            .into_iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, v)| (p, v.flags))
            .collect()
    }

    #[test]
    fn index_deletions_find_what_the_source_lost_without_the_target() {
        // The target directory is empty, but the index vouches for it: only
        // the entry the source lost is enqueued.
        assert_eq!(
            reconcile_with(Deletions::Index),
            vec![b"d/e/ghost".to_vec(), b"d/zz".to_vec()]
        );
    }

    #[test]
    fn target_listing_deletions_see_the_target_itself() {
        // Listing the (empty) target finds nothing extra, and the ghost is
        // not there to delete.
        assert!(reconcile_with(Deletions::TargetListing).is_empty());
    }

    /// The pending entries (path, flags) a startup scan of `src` against
    /// the target `dst` enqueues, with or without `absent_ok`.
    fn scan_entries(
        src: &std::path::Path,
        dst: &std::path::Path,
        absent_ok: bool,
    ) -> Vec<(String, u8)> {
        let t = tempfile::tempdir().unwrap();
        let journal = Journal::open(&t.path().join("journal")).unwrap();
        let id = journal.target_id("t").unwrap();
        let resume = HashSet::new();
        reconcile_pending(
            &journal,
            id,
            src,
            dst,
            absent_ok,
            Some(&resume),
            Deletions::TargetListing,
        )
        .into_iter()
        .map(|(p, f)| (String::from_utf8(p).unwrap(), f))
        .collect()
    }

    #[test]
    fn a_directory_new_on_the_target_is_one_bulk_entry_not_one_per_file() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(src.join("old")).unwrap();
        std::fs::create_dir_all(src.join("new/sub/deep")).unwrap();
        std::fs::create_dir_all(src.join("new/empty")).unwrap();
        for f in [
            "top",
            "old/a",
            "old/b",
            "new/x",
            "new/y",
            "new/sub/z",
            "new/sub/deep/w",
        ] {
            std::fs::write(src.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("x", src.join("new/link")).unwrap();
        // The target has `old` (empty, and with another mtime, so that it
        // differs whatever the clock's tick) but nothing of `new`.
        std::fs::create_dir_all(dst.join("old")).unwrap();
        std::fs::File::open(dst.join("old"))
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        let s = flags::STARTUP;
        let b = flags::STARTUP | flags::BULK;
        let want = |v: &[(&str, u8)]| -> Vec<(String, u8)> {
            v.iter().map(|(p, f)| (p.to_string(), *f)).collect()
        };
        // Every directory of `new` is one entry; files of a directory the
        // target has are entries of their own, as ever.
        assert_eq!(
            scan_entries(&src, &dst, true),
            want(&[
                ("new", b),
                ("new/empty", b),
                ("new/sub", b),
                ("new/sub/deep", b),
                ("old", s),
                ("old/a", s),
                ("old/b", s),
                ("top", s),
            ])
        );
        // With a backlog from an earlier run (absent_ok off) too: a
        // resumed initial sync copies whole directories like a fresh one.
        assert_eq!(
            scan_entries(&src, &dst, false),
            scan_entries(&src, &dst, true)
        );
    }
}
