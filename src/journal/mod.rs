//! The persistent journal: one RocksDB database in the state directory.
//!
//! | CF        | key                         | value                          |
//! |-----------|-----------------------------|--------------------------------|
//! | `dirs`    | directory path              | (empty)                        |
//! | `pending` | target id (u16 BE) + path   | [`Pending`]: seq, first seen, flags |
//! | `renames` | target id + seq (u64 BE)    | `from` NUL `to`                |
//! | `index`   | target id + path            | [`Meta`] of what the target holds |
//! | `meta`    | name                        | schema version, seq, target ids |
//!
//! `pending` is state-based: an entry says "make the target's entry at this
//! path match the source's, whatever it is now". That makes replay harmless
//! and coalescing free — 10,000 writes to one file are one key — and it is
//! written with a merge operator so that capture never reads before it
//! writes. Renames are the one thing order matters for; they travel in
//! `renames` in sequence order, are applied before the path entries of the
//! same batch, and always mark both their paths dirty, so a rename that
//! cannot be applied as such degrades into copies, never into a wrong tree.
//!
//! Every captured change is written (WAL on) before anything acts on it; a
//! pending entry is removed, and the index updated, in one `WriteBatch` after
//! the target confirmed the apply — and only if no newer change to the path
//! arrived meanwhile (its sequence number is compared under a lock).
//!
//! The index may lag the target (it is committed once a second, after the
//! flush) but never vouches, after a crash, for entries the target may have
//! lost: an apply that removes or moves what the index holds below a
//! directory writes a *doubt* for that path first, and a start forgets the
//! index under each doubt a crash left and compares those subtrees with the
//! target itself ([`Journal::doubt_put`], [`Journal::resolve_doubts`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, MergeOperands, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::meta::{Kind, Meta};
use crate::paths;

mod trust;
pub use trust::TargetTrust;

/// Version of the on-disk layout. A journal written by another version is
/// refused: guessing at its meaning could silently corrupt the mirror.
pub const SCHEMA_VERSION: u32 = 1;

const CF_DIRS: &str = "dirs";
const CF_PENDING: &str = "pending";
const CF_RENAMES: &str = "renames";
const CF_INDEX: &str = "index";
const CF_META: &str = "meta";
/// The source directories each target's index knows, keyed like `index`
/// (no value): lets a restart find the directories that changed while
/// nothing captured them without listing the tree (see
/// [`crate::sync::Compare::changed_dirs_first`]). Only an accelerator: a
/// directory it lacks is found by the full walk that follows.
const CF_DIRLIST: &str = "dirlist";
/// Sorts after every key (a key holds no run of 0xff bytes this long: a
/// path's names are at most 255 bytes, between `/`s): the end of a
/// delete_range over a whole column family.
const KEY_MAX: [u8; 8192] = [0xff; 8192];
const META_DIRS_BACKEND: &[u8] = b"dirs_backend";
const META_CAPTURE_READING: &[u8] = b"capture_reading";
const META_CAPTURED_THROUGH: &[u8] = b"captured_through";
const META_SCAN_COMPLETE: &[u8] = b"scan_complete/";
const META_SCAN_ENTRIES: &[u8] = b"scan_entries/";
const META_INDEX_WHOLE: &[u8] = b"index_whole/";
const META_SCAN_DELETES: &[u8] = b"scan_deletes/";
const META_UNFLUSHED: &[u8] = b"unflushed/";
/// Reconciliation checkpoint: `recon_done/<target be16><dir>`, one key per
/// directory whose whole subtree the running reconciliation has compared.
const META_RECON_DONE: &[u8] = b"recon_done/";
/// Doubt: `doubt/<target be16><path>` → the shipper's round (u64 LE) that
/// is changing, on the target, an entry the index holds as a directory (or
/// renaming one): written before the target is touched, removed with the
/// round's index changes. See [`Journal::doubt_put`].
const META_DOUBT: &[u8] = b"doubt/";
/// Distrust: `distrust/<target be16><path>` → empty: a doubt a crash left
/// (see [`Journal::resolve_doubts`]) whose subtree a startup scan has not
/// compared to the end yet: there, a target file alike in metadata does
/// not stand for the source's (see [`crate::target::Vouch`]).
const META_DISTRUST: &[u8] = b"distrust/";
/// The name of the marker file (in the journal's directory) that the
/// current inotify group watches: identifies the group at a handover.
pub const META_INOTIFY_GROUP: &[u8] = b"inotify_group";
/// The source a stored capture descriptor was set up for.
pub const META_CAPTURE_SOURCE: &[u8] = b"capture_source";
const CFS: [&str; 6] = [
    CF_DIRS, CF_PENDING, CF_RENAMES, CF_INDEX, CF_META, CF_DIRLIST,
];

const META_SCHEMA: &[u8] = b"schema_version";
const META_SEQ: &[u8] = b"seq";
const META_NEXT_TARGET: &[u8] = b"next_target_id";

/// Identifies a target inside the journal (assigned once per target name).
pub type TargetId = u16;

/// Flags of a pending entry (OR-ed when entries coalesce).
pub mod flags {
    /// The whole subtree must be rescanned (moved in, overflow, failed rename).
    pub const RECURSIVE: u8 = 1;
    /// Content changed: copy even if the metadata looks the same (timestamps
    /// are coarse; a write in the same tick may leave size and mtime alone).
    pub const CONTENT: u8 = 2;
    /// Seen by the startup scan: a missing source entry is deleted on the
    /// target only if `delete` allows it at startup.
    pub const STARTUP: u8 = 4;
    /// Seen live: a missing source entry is deleted if `delete` allows it
    /// while running.
    pub const LIVE: u8 = 8;
    /// The scan found not even the parent directory on the target: copy
    /// without looking there first. Only the run that enqueued it can trust it (a
    /// crash may leave it on an entry the target has since received), so a
    /// shipper ignores it on entries older than its run
    /// ([`super::Journal::seq_now`] at the start).
    pub const ABSENT: u8 = 16;
    /// On a directory the scan found missing on the target: besides the
    /// directory, copy each of its entries other than subdirectories (those
    /// have entries of their own), listed from the source when the entry is
    /// applied. One pending entry per new directory instead of one per file
    /// (see [`crate::ship`]); the entries themselves are copied without
    /// looking on the target only if the apply had to create the directory.
    pub const BULK: u8 = 32;
    /// Never stored: set by the shipper on an entry that a listing of its
    /// directory just showed as a regular file, so that the apply opens it
    /// without an `lstat` first. (If it is something else by then, that
    /// change was captured and its entry follows.)
    pub const LISTED_FILE: u8 = 64;
    /// Never stored: set by the shipper on an entry that the index holds
    /// as a directory, so that an apply that would remove it (the source
    /// holds no directory there now) stops and says so
    /// ([`crate::target::Outcome::NeedsDoubt`]).
    pub const HOLDS_DIR: u8 = 128;
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error(
        "journal schema version {found} is not supported by this drmirror (supports {supported}); \
         use a matching drmirror or move the state directory aside to start over"
    )]
    UnknownSchema { found: u32, supported: u32 },
    #[error("journal is corrupt: {0}")]
    Corrupt(String),
    #[error("too many targets in one journal")]
    TooManyTargets,
    #[error("journal files are damaged: {0}")]
    Damaged(String),
}

impl JournalError {
    /// The journal's files are damaged (RocksDB's `Corruption`, or files
    /// it cannot do without are gone): not an error of the moment that a
    /// retry or a restart would cure.
    pub fn is_corruption(&self) -> bool {
        match self {
            JournalError::Db(e) => e.kind() == rocksdb::ErrorKind::Corruption,
            JournalError::Damaged(_) => true,
            _ => false,
        }
    }
}

/// Whether the journal in `dir` has lost files RocksDB needs to open it as
/// it is: without `CURRENT` RocksDB would create an empty database beside
/// the old files (and forget the backlog without a word); a table file the
/// manifest names but the directory lacks fails the open with an I/O error.
fn missing_files(dir: &Path, open_err: Option<&rocksdb::Error>) -> Option<String> {
    if let Some(e) = open_err {
        let msg = e.to_string();
        let gone = e.kind() == rocksdb::ErrorKind::IOError
            && msg.contains("No such file")
            && (msg.contains(".sst") || msg.contains("MANIFEST"));
        return gone.then_some(msg);
    }
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let has_data = names
        .iter()
        .any(|n| n.starts_with("MANIFEST-") || n.ends_with(".sst"));
    (has_data && !names.iter().any(|n| n == "CURRENT"))
        .then(|| "CURRENT is missing while the journal's other files remain".to_string())
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// A pending entry's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub seq: u64,
    pub first_seen_ns: u64,
    pub flags: u8,
}

impl Pending {
    const LEN: usize = 17;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_seen_ns.to_le_bytes());
        b[16] = self.flags;
        b
    }

    fn decode(b: &[u8]) -> Option<Pending> {
        if b.len() != Self::LEN {
            return None;
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[..8]);
        let mut f = [0u8; 8];
        f.copy_from_slice(&b[8..16]);
        Some(Pending {
            seq: u64::from_le_bytes(s),
            first_seen_ns: u64::from_le_bytes(f),
            flags: b[16],
        })
    }

    /// Coalesces two entries for one path: newest seq, oldest first-seen,
    /// flags OR-ed except [`flags::ABSENT`], which waives a check and so
    /// holds only if both say so. OR-ed, an older run's ABSENT took the
    /// newer entry's seq and with it the trust of the current run: a resumed
    /// initial sync copied a file again, without looking, that its shipper
    /// had just copied from the older entry.
    fn merge(self, o: Pending) -> Pending {
        let absent = self.flags & o.flags & flags::ABSENT;
        Pending {
            seq: self.seq.max(o.seq),
            first_seen_ns: self.first_seen_ns.min(o.first_seen_ns),
            flags: ((self.flags | o.flags) & !flags::ABSENT) | absent,
        }
    }
}

fn pending_merge(_key: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    let mut acc = existing.and_then(Pending::decode);
    for op in ops {
        // An undecodable operand cannot come from this code; skipping it keeps
        // the entry (and so the path's replication) rather than failing reads.
        if let Some(p) = Pending::decode(op) {
            acc = Some(match acc {
                Some(a) => a.merge(p),
                None => p,
            });
        }
    }
    acc.map(|p| p.encode().to_vec())
}

/// A summary of one target's backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BacklogStats {
    pub entries: u64,
    pub bytes: u64,
    pub oldest_ns: Option<u64>,
    pub complete: bool,
}

/// A change captured from the kernel or found by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Dirty { path: Vec<u8>, flags: u8 },
    Rename { from: Vec<u8>, to: Vec<u8> },
}

/// A rename waiting to be applied to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRename {
    pub seq: u64,
    pub from: Vec<u8>,
    pub to: Vec<u8>,
}

/// What a shipper confirms after the target applied a batch.
#[derive(Default, Debug)]
pub struct Completion {
    /// Pending entries applied (removed unless a newer change arrived).
    pub done: Vec<(Vec<u8>, u64)>,
    /// The target now holds this entry with this (source) metadata.
    pub index_put: Vec<(Vec<u8>, Meta)>,
    /// As `index_put`, for entries that are not directories and that the
    /// target did not hold before (copied into a directory the apply
    /// created): nothing of theirs can be in the directory list to remove.
    pub index_new: Vec<(Vec<u8>, Meta)>,
    /// The target no longer holds this path nor anything below it.
    pub index_remove_tree: Vec<Vec<u8>>,
    /// As `index_remove_tree`, for paths the index held as something other
    /// than a directory: a subtree is dropped only if the index has one
    /// there (see [`Journal::complete`]).
    pub index_remove: Vec<Vec<u8>>,
    /// Renames applied (or given up as renames) on the target.
    pub renames_done: Vec<u64>,
    /// Subtrees the target moved: the index follows.
    pub index_moves: Vec<(Vec<u8>, Vec<u8>)>,
    /// New pending entries (a failed rename degrades into these).
    pub requeue: Vec<(Vec<u8>, u8)>,
    /// Doubts this completion settles: path and the round that doubted it
    /// (see [`Journal::doubt_put`]).
    pub undoubt: Vec<(Vec<u8>, u64)>,
}

impl Completion {
    /// Whether it removes what the index holds at `p` (the entry, or a
    /// subtree it lies in).
    pub fn removes(&self, p: &[u8]) -> bool {
        self.index_remove.iter().any(|r| r == p)
            || self
                .index_remove_tree
                .iter()
                .any(|r| paths::is_within(p, r))
    }

    /// Appends `o` (applied after `self`).
    ///
    /// [`Journal::complete`] removes index entries before it puts any, which
    /// is the order within one round (a file put where a directory's subtree
    /// is dropped). Across rounds the later one wins: what `o` removes
    /// cancels what `self` would put there or below. (Committed together, a
    /// round's put of a file it copied outlived the next round's removal of
    /// it.)
    pub fn merge(&mut self, o: Completion) {
        if !o.index_remove.is_empty() || !o.index_remove_tree.is_empty() {
            let gone: std::collections::HashSet<&[u8]> = o
                .index_remove
                .iter()
                .chain(&o.index_remove_tree)
                .map(Vec::as_slice)
                .collect();
            let kept = |p: &Vec<u8>| !paths::ancestors_or_self(p).any(|a| gone.contains(a));
            self.index_put.retain(|(p, _)| kept(p));
            self.index_new.retain(|(p, _)| kept(p));
        }
        self.done.extend(o.done);
        self.index_put.extend(o.index_put);
        self.index_new.extend(o.index_new);
        self.index_remove_tree.extend(o.index_remove_tree);
        self.index_remove.extend(o.index_remove);
        self.renames_done.extend(o.renames_done);
        self.index_moves.extend(o.index_moves);
        self.requeue.extend(o.requeue);
        self.undoubt.extend(o.undoubt);
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
            && self.index_put.is_empty()
            && self.index_new.is_empty()
            && self.index_remove_tree.is_empty()
            && self.index_remove.is_empty()
            && self.renames_done.is_empty()
            && self.index_moves.is_empty()
            && self.requeue.is_empty()
            && self.undoubt.is_empty()
    }
}

/// The journal. Cheap to share behind an `Arc`.
pub struct Journal {
    db: DB,
    seq: AtomicU64,
    /// Serialises read-check-write sequences (completion, renames) against
    /// capture; plain capture writes are merges and need no read.
    lock: Mutex<()>,
    /// The backlog bound and each target's backlog size as last counted
    /// (plus what was recorded since): see [`Journal::record`].
    bound: Mutex<Bound>,
    /// Deletions written to the queue-like column families (`pending`,
    /// `dirlist`) since they were last compacted: see
    /// [`Journal::compact_churned`].
    churn: AtomicU64,
    /// Each target's oldest pending capture time, known without a walk:
    /// see [`Journal::oldest_pending_ns`].
    lag: Mutex<std::collections::HashMap<TargetId, LagClock>>,
    /// Each target's rules for look-alikes (see [`trust`]), made on first use.
    trust: Mutex<std::collections::HashMap<TargetId, std::sync::Arc<TargetTrust>>>,
}

/// What the journal knows of a target's oldest pending change between two
/// walks of its backlog ([`Journal::backlog_stats`]).
///
/// Invariant: `min(walked, since)` is at most the capture time of every
/// change still pending, so a lag computed from it against the clock never
/// under-reports, and it grows by a second each second however long the
/// shipper is stuck (a round blocked on a dead link publishes nothing).
/// It holds because a change is noted in `since` only after its write is
/// in the database, and a walk takes `since` away before it makes its
/// iterator: a change is either in the walk's snapshot or in the next
/// `since`.
#[derive(Clone, Copy, Debug, Default)]
struct LagClock {
    /// The oldest capture time the last walk found (`None`: none pending).
    walked: Option<u64>,
    /// The oldest capture time recorded since that walk began.
    since: Option<u64>,
    /// `since` as it was when the walk under way began: still counted
    /// until that walk's result is stored.
    in_walk: Option<u64>,
    /// After a start that may have missed changes: the last time capture
    /// was known whole, until the startup scan has compared everything
    /// (see [`Journal::set_startup_floor`]).
    floor: Option<u64>,
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[derive(Default)]
struct Bound {
    max_entries: u64,
    max_bytes: u64,
    /// target → (entries, bytes), an over-estimate between counts.
    size: std::collections::HashMap<TargetId, (u64, u64)>,
    /// Targets whose backlog is collapsing (logged once per episode).
    collapsing: std::collections::HashSet<TargetId>,
    /// Target names, for log lines.
    names: std::collections::HashMap<TargetId, String>,
}

impl Bound {
    fn name(&self, t: TargetId) -> String {
        self.names
            .get(&t)
            .cloned()
            .unwrap_or_else(|| format!("#{t}"))
    }

    /// 0: record paths as they are; 1: over the bound; 2: over twice it.
    fn level(&self, t: TargetId) -> u8 {
        let (e, b) = self.size.get(&t).copied().unwrap_or_default();
        if e >= self.max_entries.saturating_mul(2) || b >= self.max_bytes.saturating_mul(2) {
            2
        } else if e >= self.max_entries || b >= self.max_bytes {
            1
        } else {
            0
        }
    }
}

/// Where a change to `path` is recorded while the backlog of its target is
/// over its bound: the parent directory (to be rescanned whole), and past
/// twice the bound the top-level directory, so that however many distinct
/// paths change the backlog stops growing.
fn collapse_path(path: &[u8], level: u8) -> Vec<u8> {
    if level >= 2 {
        match path.iter().position(|&b| b == b'/') {
            Some(i) => path[..i].to_vec(),
            None => Vec::new(),
        }
    } else {
        paths::parent(path).map(|p| p.to_vec()).unwrap_or_default()
    }
}

fn key(t: TargetId, path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + path.len());
    k.extend_from_slice(&t.to_be_bytes());
    k.extend_from_slice(path);
    k
}

/// The smallest key greater than every key starting with `prefix`.
/// The index keys of the entries in `dir` (and below) start with this.
fn children_prefix(t: TargetId, dir: &[u8]) -> Vec<u8> {
    let mut prefix = key(t, dir);
    if !dir.is_empty() {
        prefix.push(b'/');
    }
    prefix
}

/// The entries directly under `prefix` (see [`children_prefix`]): one seek,
/// then a step per entry, and a seek over each subdirectory's own subtree:
/// far cheaper than a lookup per name.
fn children_at(
    it: &mut rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, Meta)>> {
    it.seek(prefix);
    let mut out = Vec::new();
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        let Some(rest) = k.strip_prefix(prefix) else {
            break;
        };
        match rest.iter().position(|&c| c == b'/') {
            // The root's own entry (`dir` empty) is not a child.
            _ if rest.is_empty() => it.next(),
            // Below a subdirectory: skip the rest of its subtree.
            Some(slash) => {
                let mut past = k[..prefix.len() + slash].to_vec();
                past.push(b'/' + 1);
                it.seek(&past);
            }
            None => {
                let m = Meta::decode(v).ok_or_else(|| {
                    JournalError::Corrupt(format!("index value of {} bytes", v.len()))
                })?;
                out.push((rest.to_vec(), m));
                it.next();
            }
        }
    }
    it.status()?;
    Ok(out)
}

/// A directory's entries in the index: names and metadata, in name order.
pub type Children = Vec<(Vec<u8>, Meta)>;

/// Iterators over the index, kept for reuse by a walk that reads the
/// children of directory after directory (a reconciliation): making one
/// (a view of every memtable and level, with their index blocks) cost as
/// much as reading a leaf directory's entries with it.
///
/// An iterator sees the index as it was when made or last refreshed, a few
/// milliseconds at most ([`IndexReaders::FRESH`]). That is enough for a
/// reconciliation, which looks for what changed while nothing captured it:
/// what the shippers recorded meanwhile differs from the source only as
/// live capture has seen (and enqueued) already, so a stale entry can only
/// make it enqueue a path again, never miss one.
pub struct IndexReaders<'a> {
    journal: &'a Journal,
    /// Iterators, when each was made or refreshed, and the target's rename
    /// epoch read just before (see [`Journal::trust`]).
    #[allow(clippy::type_complexity)]
    pool: Mutex<
        Vec<(
            rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
            std::time::Instant,
            (TargetId, u64),
        )>,
    >,
}

impl<'a> IndexReaders<'a> {
    /// How long an iterator is used before it is refreshed (it also pins
    /// the memtables and files it reads).
    const FRESH: std::time::Duration = std::time::Duration::from_millis(50);

    pub fn new(journal: &'a Journal) -> Self {
        Self {
            journal,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// As [`Journal::index_children`], with the rename epoch of target `t`
    /// as it was before the index was read (for
    /// [`TargetTrust::claim_if_unmoved`]).
    pub fn children(&self, t: TargetId, dir: &[u8]) -> Result<(Children, u64)> {
        let reuse = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut it, made, epoch) = match reuse {
            Some((mut it, made, e)) if made.elapsed() >= Self::FRESH || e.0 != t => {
                let e = self.journal.trust(t)?.epoch();
                it.refresh()?;
                (it, std::time::Instant::now(), (t, e))
            }
            Some(r) => r,
            None => {
                let e = self.journal.trust(t)?.epoch();
                (
                    self.journal.db.raw_iterator_cf(self.journal.cf(CF_INDEX)?),
                    std::time::Instant::now(),
                    (t, e),
                )
            }
        };
        let r = children_at(&mut it, &children_prefix(t, dir));
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((it, made, epoch));
        r.map(|c| (c, epoch.1))
    }
}

fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut v = prefix.to_vec();
    while let Some(last) = v.pop() {
        if last < 0xff {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

/// Key range of `path`'s descendants (not `path` itself) for target `t`.
fn subtree_range(t: TargetId, path: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if path.is_empty() {
        let start = key(t, b"");
        let end = prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]);
        // The root's own key equals the prefix; descendants start after it.
        let mut s = start;
        s.push(0);
        return (s, end);
    }
    let mut start = key(t, path);
    start.push(b'/');
    let mut end = key(t, path);
    end.push(b'/' + 1);
    (start, end)
}

/// `prefix` followed by target `t`'s id: the `meta` keys kept per target.
fn tkey(prefix: &[u8], t: TargetId) -> Vec<u8> {
    [prefix, &t.to_be_bytes()[..]].concat()
}

/// The key range `prefix` + target `t` + anything (`prefix` ends in `/`).
fn tkey_range(prefix: &[u8], t: TargetId) -> (Vec<u8>, Vec<u8>) {
    let end = match t.checked_add(1) {
        Some(next) => tkey(prefix, next),
        // e.g. "doubt0": past every target's keys.
        None => prefix_end(prefix).unwrap_or_else(|| KEY_MAX.to_vec()),
    };
    (tkey(prefix, t), end)
}

/// The first key of target `t` and read options bounded to its keys.
fn target_bounds(t: TargetId) -> (Vec<u8>, ReadOptions) {
    let start = key(t, b"");
    let end = prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]);
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end);
    (start, ro)
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Options of the queue-shaped families (`pending`, `renames`,
/// `dirlist`): every entry is deleted soon after it is written, and the
/// shipper reads `pending` and `renames` from the start of a target's range
/// every round.
///
/// A deleted entry stays in the memtable as a tombstone until the memtable
/// is flushed, and every read from the start of the range steps over all of
/// them. With RocksDB's 64 MiB memtable, a daemon under a steady 200
/// changes/s spent most of its shipper's time in `DBIter::Next` over
/// tombstones (perf: ~75 % of `ship-0`), and its CPU per change grew
/// 3.5-fold in ten minutes. A small memtable bounds that walk: flushed, a
/// file dense with deletions is queued for compaction (the collector
/// below), which drops them.
fn queue_options() -> Options {
    let mut o = Options::default();
    o.set_write_buffer_size(QUEUE_MEMTABLE);
    o.add_compact_on_deletion_collector_factory(10_000, 5_000, 0.5);
    o
}

/// Memtable size of the queue-shaped families (see [`queue_options`]).
const QUEUE_MEMTABLE: usize = 4 << 20;

impl Journal {
    /// Opens (creating) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        // A reconciliation reads the whole index once, in a fresh process:
        // every block is a cache miss. Mapped files spare each a `pread`
        // copy (its files are never rewritten in place, only replaced).
        // A/B at 500k files, 6 rounds each: 1,089k vs 1,048k entries/s.
        opts.set_allow_mmap_reads(true);
        // The WAL is kept until every family with data in it has flushed:
        // bounded, so that the journal's size and a restart's replay do not
        // grow with the time since the index last filled its memtable.
        opts.set_max_total_wal_size(64 << 20);
        let mut pending_opts = queue_options();
        pending_opts.set_merge_operator_associative("drmirror_pending_v1", pending_merge);
        let mut index_opts = Options::default();
        // Point reads and short prefix scans: a smaller memtable than
        // RocksDB's 64 MiB default keeps the resident set bounded (a
        // daemon's anonymous memory was its memtables).
        index_opts.set_write_buffer_size(16 << 20);
        let cfs = CFS.iter().map(|name| {
            let o = match *name {
                CF_PENDING => pending_opts.clone(),
                // `meta` is rewritten in place (the sequence counter, the
                // capture flag): a few live keys under many versions, to
                // flush soon like the queues.
                CF_DIRLIST | CF_RENAMES | CF_META => queue_options(),
                CF_INDEX => index_opts.clone(),
                _ => Options::default(),
            };
            ColumnFamilyDescriptor::new(*name, o)
        });
        if let Some(why) = missing_files(dir, None) {
            return Err(JournalError::Damaged(why));
        }
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            match missing_files(dir, Some(&e)) {
                Some(why) => JournalError::Damaged(why),
                None => JournalError::Db(e),
            }
        })?;
        let j = Journal {
            db,
            seq: AtomicU64::new(0),
            lock: Mutex::new(()),
            bound: Mutex::new(Bound {
                max_entries: u64::MAX,
                max_bytes: u64::MAX,
                ..Default::default()
            }),
            churn: AtomicU64::new(0),
            lag: Mutex::default(),
            trust: Mutex::default(),
        };
        j.check_schema()?;
        let seq = j.meta_u64(META_SEQ)?.unwrap_or(0);
        j.seq.store(seq, Ordering::SeqCst);
        Ok(j)
    }

    fn check_schema(&self) -> Result<()> {
        match self.meta_get(META_SCHEMA)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| JournalError::Corrupt("schema_version is not 4 bytes".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(JournalError::UnknownSchema {
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                Ok(())
            }
            None => {
                let meta = self.cf(CF_META)?;
                let any = self
                    .db
                    .iterator_cf(meta, IteratorMode::Start)
                    .next()
                    .is_some();
                if any {
                    return Err(JournalError::Corrupt(
                        "meta has entries but no schema_version".into(),
                    ));
                }
                self.db
                    .put_cf(meta, META_SCHEMA, SCHEMA_VERSION.to_le_bytes())?;
                Ok(())
            }
        }
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| JournalError::Corrupt(format!("column family {name} missing")))
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        self.db.path()
    }

    pub fn meta_get(&self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META)?, k)?)
    }

    pub fn meta_put(&self, k: &[u8], v: &[u8]) -> Result<()> {
        Ok(self.db.put_cf(self.cf(CF_META)?, k, v)?)
    }

    pub fn meta_delete(&self, k: &[u8]) -> Result<()> {
        Ok(self.db.delete_cf(self.cf(CF_META)?, k)?)
    }

    fn flag(&self, k: &[u8]) -> Result<bool> {
        Ok(self.meta_get(k)?.as_deref() == Some(b"1".as_slice()))
    }

    fn set_flag(&self, k: &[u8], on: bool) -> Result<()> {
        self.meta_put(k, if on { b"1" } else { b"0" })
    }

    /// Set while the capture loop holds events it has taken off the kernel
    /// queue but not yet recorded: found set at start, those events may be
    /// lost (the process died in between) and a rescan is due, even when
    /// the kernel queue itself was handed over.
    pub fn set_capture_reading(&self, on: bool) -> Result<()> {
        self.set_flag(META_CAPTURE_READING, on)
    }

    pub fn capture_was_reading(&self) -> Result<bool> {
        self.flag(META_CAPTURE_READING)
    }

    /// Whether target `t`'s last startup scan ran to its end (cleared when
    /// one starts): a scan cut short by a crash must run again.
    pub fn set_scan_complete(&self, t: TargetId, on: bool) -> Result<()> {
        self.set_flag(&tkey(META_SCAN_COMPLETE, t), on)
    }

    /// Records how many entries target `t`'s last complete startup scan
    /// compared (the next one reports its progress against it).
    pub fn set_scan_entries(&self, t: TargetId, n: u64) -> Result<()> {
        self.meta_put(&tkey(META_SCAN_ENTRIES, t), &n.to_le_bytes())
    }

    pub fn scan_entries(&self, t: TargetId) -> Result<Option<u64>> {
        Ok(self
            .meta_get(&tkey(META_SCAN_ENTRIES, t))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes))
    }

    pub fn scan_complete(&self, t: TargetId) -> Result<bool> {
        self.flag(&tkey(META_SCAN_COMPLETE, t))
    }

    /// Whether target `t`'s index accounts for everything the target holds
    /// (bar temporary files of copies a crash cut short), and its directory
    /// list for every directory the index knows: set for good once a
    /// startup scan has listed the whole target and source; from then on,
    /// the writes that confirm each change keep both so. (Unlike
    /// [`Journal::scan_complete`], a scan that is then cut short does not
    /// undo it.)
    pub fn index_whole(&self, t: TargetId) -> Result<bool> {
        self.flag(&tkey(META_INDEX_WHOLE, t))
    }

    /// Whether the last startup scan that listed the target deleted what it
    /// found there and the source lacks (`delete` at startup): only then
    /// does the index account for all the target holds.
    pub fn scan_deleted_extras(&self, t: TargetId) -> Result<bool> {
        self.flag(&tkey(META_SCAN_DELETES, t))
    }

    pub fn set_scan_deleted_extras(&self, t: TargetId, on: bool) -> Result<()> {
        self.set_flag(&tkey(META_SCAN_DELETES, t), on)
    }

    pub fn set_index_whole(&self, t: TargetId) -> Result<()> {
        self.set_flag(&tkey(META_INDEX_WHOLE, t), true)
    }

    /// Notes that target `t`'s index is about to record copies not yet
    /// flushed to its disk, during boot `boot` (see [`crate::durability`]).
    /// Synced to the journal's disk before it returns: it must be there
    /// before any record it covers.
    pub fn set_unflushed(&self, t: TargetId, boot: &[u8]) -> Result<()> {
        let mut o = WriteOptions::default();
        o.set_sync(true);
        let k = tkey(META_UNFLUSHED, t);
        Ok(self.db.put_cf_opt(self.cf(CF_META)?, k, boot, &o)?)
    }

    /// The boot during which target `t`'s index last recorded unflushed
    /// copies, unless a flush has covered them since.
    pub fn unflushed(&self, t: TargetId) -> Result<Option<Vec<u8>>> {
        self.meta_get(&tkey(META_UNFLUSHED, t))
    }

    /// A flush of the target covered every copy recorded so far.
    pub fn clear_unflushed(&self, t: TargetId) -> Result<()> {
        let k = tkey(META_UNFLUSHED, t);
        Ok(self.db.delete_cf(self.cf(CF_META)?, k)?)
    }

    /// Forgets everything the journal believes target `t` holds (its index,
    /// directory list, scan and checkpoint flags), in one write: the target
    /// lost copies the index recorded, so the next scan compares with the
    /// target itself. The backlog stays.
    pub fn forget_target(&self, t: TargetId) -> Result<()> {
        let start = t.to_be_bytes().to_vec();
        let end = match t.checked_add(1) {
            Some(n) => n.to_be_bytes().to_vec(),
            None => KEY_MAX.to_vec(),
        };
        let meta = self.cf(CF_META)?;
        let mut b = WriteBatch::default();
        for cf in [self.cf(CF_INDEX)?, self.cf(CF_DIRLIST)?] {
            b.delete_range_cf(cf, &start, &end);
        }
        for k in [
            META_INDEX_WHOLE,
            META_SCAN_DELETES,
            META_SCAN_COMPLETE,
            META_UNFLUSHED,
        ] {
            b.delete_cf(meta, tkey(k, t));
        }
        for k in [META_RECON_DONE, META_DOUBT, META_DISTRUST] {
            let (p, pend) = tkey_range(k, t);
            b.delete_range_cf(meta, &p, &pend);
        }
        let mut o = WriteOptions::default();
        o.set_sync(true);
        Ok(self.db.write_opt(b, &o)?)
    }

    fn recon_prefix(t: TargetId) -> Vec<u8> {
        tkey(META_RECON_DONE, t)
    }

    /// Checkpoints a reconciliation: every entry below `dirs` has been
    /// compared, and its differences are already enqueued.
    pub fn recon_done_put(&self, t: TargetId, dirs: &[Vec<u8>]) -> Result<()> {
        let cf = self.cf(CF_META)?;
        let mut b = WriteBatch::default();
        let p = Self::recon_prefix(t);
        for d in dirs {
            b.put_cf(cf, [p.as_slice(), d].concat(), b"");
        }
        Ok(self.db.write(b)?)
    }

    /// The directories a reconciliation that was cut short had finished.
    pub fn recon_done_list(&self, t: TargetId) -> Result<std::collections::HashSet<Vec<u8>>> {
        Ok(self.meta_paths(META_RECON_DONE, t)?.into_iter().collect())
    }

    /// Forgets a reconciliation's checkpoint (it finished, or a new one
    /// starts from scratch).
    pub fn recon_done_clear(&self, t: TargetId) -> Result<()> {
        let (p, end) = Self::recon_range(t);
        Ok(self
            .db
            .delete_range_cf(self.cf(CF_META)?, p.as_slice(), end.as_slice())?)
    }

    /// The `meta` key range of target `t`'s reconciliation checkpoint.
    fn recon_range(t: TargetId) -> (Vec<u8>, Vec<u8>) {
        tkey_range(META_RECON_DONE, t)
    }

    /// Records, before a shipper's round touches the target, the paths at
    /// which it may remove or move entries the index holds below them: the
    /// directories it applies and both sides of the renames it applies.
    /// Removed by [`Journal::complete`] with the round's index changes
    /// (`Completion::undoubt`), only if no later round doubted the path
    /// again meanwhile.
    ///
    /// Why: the index is committed after the target changed (once a
    /// second, with the flush that makes the changes durable). A crash in
    /// between leaves the index vouching for entries the target no longer
    /// holds where they were; if the source then holds the very same
    /// entries there again (a directory moved away and back while the
    /// daemon was down keeps its entries' metadata), the startup scan
    /// found them in sync and they stayed missing on the target. A doubt
    /// left by a crash makes the next start forget those index entries
    /// first ([`Journal::resolve_doubts`]), so they are compared with the
    /// target itself.
    pub fn doubt_put(&self, t: TargetId, paths: &[&[u8]], round: u64) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let cf = self.cf(CF_META)?;
        let mut b = WriteBatch::default();
        let p = tkey(META_DOUBT, t);
        for d in paths {
            b.put_cf(cf, [p.as_slice(), d].concat(), round.to_le_bytes());
        }
        // Under the lock `complete` holds: its check of the round and its
        // removal must not straddle this write.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.db.write(b)?)
    }

    /// At a start, before anything reads the index: forgets what the index
    /// says the target holds at and below each path a crashed run was
    /// changing (see [`Journal::doubt_put`]), and the doubts themselves,
    /// and enqueues each path for a compare of its subtree with the
    /// target. Returns how many there were.
    pub fn resolve_doubts(&self, t: TargetId) -> Result<usize> {
        let (p, end) = tkey_range(META_DOUBT, t);
        let meta = self.cf(CF_META)?;
        let doubted = self.meta_paths(META_DOUBT, t)?;
        if doubted.is_empty() {
            return Ok(0);
        }
        let mut b = WriteBatch::default();
        let distrust = tkey(META_DISTRUST, t);
        for d in &doubted {
            let (s, e) = subtree_range(t, d);
            for cf in [self.cf(CF_INDEX)?, self.cf(CF_DIRLIST)?] {
                b.delete_cf(cf, key(t, d));
                b.delete_range_cf(cf, &s, &e);
            }
            // The renames of a chain may have been applied on the target
            // in part, or twice: what is there may be another file's copy
            // alike in size and mtime, so metadata vouches for nothing
            // there until a startup scan has compared it all.
            b.put_cf(meta, [distrust.as_slice(), d].concat(), b"");
        }
        b.delete_range_cf(meta, &p, &end);
        let trust = self.trust(t)?;
        // Without the index there, nothing would find what the target
        // holds there and the source does not: each subtree is compared
        // with the target's own listing (the startup scan's deletion
        // policy applies), its files by content ([`flags::CONTENT`] on a
        // directory's entry: see `Shipper::scan_subtree`).
        let rescan: Vec<(Vec<u8>, u8)> = doubted
            .into_iter()
            .map(|d| (d, flags::RECURSIVE | flags::STARTUP | flags::CONTENT))
            .collect();
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = self.merge_pending(&mut b, t, &rescan)?;
        self.db.write(b)?;
        for (d, _) in &rescan {
            trust.add(d);
        }
        if let Some(ns) = recorded {
            self.note_recorded(&[t], ns);
        }
        Ok(rescan.len())
    }

    /// Target `t`'s rules for look-alikes (see [`trust`]); its distrusted
    /// subtrees are read from the journal on first use.
    pub fn trust(&self, t: TargetId) -> Result<std::sync::Arc<TargetTrust>> {
        let mut all = self.trust.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tr) = all.get(&t) {
            return Ok(tr.clone());
        }
        let tr = std::sync::Arc::new(TargetTrust::with_distrust(
            self.meta_paths(META_DISTRUST, t)?,
        ));
        all.insert(t, tr.clone());
        Ok(tr)
    }

    /// At a start: distrusts both sides of every rename waiting for target
    /// `t`. A copy the last run made but had not recorded (a crash) may
    /// have landed where the source held that file before renames the
    /// target had not applied yet; replayed now, they move it, unnamed by
    /// the index, where the source holds another file alike (the crash
    /// storm test: `p2/id*` holding `q2`'s content after a start that found
    /// no doubt). Returns how many renames there were.
    pub fn distrust_renamed(&self, t: TargetId) -> Result<usize> {
        let renames = self.renames(t, usize::MAX)?;
        let sides: Vec<&[u8]> = renames
            .iter()
            .flat_map(|r| [r.from.as_slice(), r.to.as_slice()])
            .collect();
        self.distrust_add(t, &sides)?;
        Ok(renames.len())
    }

    /// Distrusts `paths` of target `t` (see [`trust`], rule 2), in the
    /// journal first.
    fn distrust_add(&self, t: TargetId, paths: &[&[u8]]) -> Result<()> {
        if paths.is_empty() {
            return Ok(());
        }
        let trust = self.trust(t)?;
        let cf = self.cf(CF_META)?;
        let mut b = WriteBatch::default();
        let p = tkey(META_DISTRUST, t);
        for d in paths {
            b.put_cf(cf, [p.as_slice(), d].concat(), b"");
        }
        self.db.write(b)?;
        for d in paths {
            trust.add(d);
        }
        Ok(())
    }

    /// Before the target applies a rename `from` → `to`: distrusts where it
    /// carries a distrusted subtree (see [`TargetTrust::carried`]), in the
    /// journal first.
    pub fn distrust_carry(&self, t: TargetId, from: &[u8], to: &[u8]) -> Result<()> {
        let carried = self.trust(t)?.carried(from, to);
        for d in &carried {
            tracing::debug!(target_id = t, path = %paths::display(d), "distrust carried by a rename");
        }
        let carried: Vec<&[u8]> = carried.iter().map(|d| d.as_slice()).collect();
        self.distrust_add(t, &carried)
    }

    /// The subtrees of target `t` distrusted in the journal (tests).
    #[cfg(test)]
    fn distrusted(&self, t: TargetId) -> Result<Vec<Vec<u8>>> {
        self.meta_paths(META_DISTRUST, t)
    }

    /// The paths of target `t`'s `meta` keys under `kind` (doubts,
    /// distrusts).
    fn meta_paths(&self, kind: &[u8], t: TargetId) -> Result<Vec<Vec<u8>>> {
        let p = tkey(kind, t);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_META)?,
            IteratorMode::From(&p, Direction::Forward),
        ) {
            let (k, _) = item?;
            match k.strip_prefix(p.as_slice()) {
                Some(d) => out.push(d.to_vec()),
                None => break,
            }
        }
        Ok(out)
    }

    /// A startup scan compared everything and what it enqueued is applied:
    /// no subtree is distrusted now.
    pub fn distrust_clear(&self, t: TargetId) -> Result<()> {
        let (p, end) = tkey_range(META_DISTRUST, t);
        self.db
            .delete_range_cf(self.cf(CF_META)?, p.as_slice(), end.as_slice())?;
        self.trust(t)?.clear();
        Ok(())
    }

    /// The doubts of target `t` (tests, and a test's check of what the
    /// index claims after a crash).
    pub fn doubts(&self, t: TargetId) -> Result<Vec<Vec<u8>>> {
        self.meta_paths(META_DOUBT, t)
    }

    fn meta_u64(&self, k: &[u8]) -> Result<Option<u64>> {
        match self.meta_get(k)? {
            None => Ok(None),
            Some(v) => <[u8; 8]>::try_from(v.as_slice())
                .map(|a| Some(u64::from_le_bytes(a)))
                .map_err(|_| {
                    JournalError::Corrupt(format!("meta {} is not 8 bytes", paths::display(k)))
                }),
        }
    }

    /// The journal id of a target, assigned on first use.
    pub fn target_id(&self, name: &str) -> Result<TargetId> {
        let id = self.target_id_inner(name)?;
        self.bound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .names
            .insert(id, name.to_string());
        Ok(id)
    }

    fn target_id_inner(&self, name: &str) -> Result<TargetId> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let k = [b"target/".as_slice(), name.as_bytes()].concat();
        if let Some(v) = self.meta_get(&k)? {
            return <[u8; 2]>::try_from(v.as_slice())
                .map(u16::from_be_bytes)
                .map_err(|_| JournalError::Corrupt("target id is not 2 bytes".into()));
        }
        let next = self.meta_u64(META_NEXT_TARGET)?.unwrap_or(0);
        let id = TargetId::try_from(next).map_err(|_| JournalError::TooManyTargets)?;
        let mut b = WriteBatch::default();
        let meta = self.cf(CF_META)?;
        b.put_cf(meta, &k, id.to_be_bytes());
        b.put_cf(meta, META_NEXT_TARGET, (next + 1).to_le_bytes());
        self.db.write(b)?;
        Ok(id)
    }

    /// The last sequence number handed out: every entry enqueued from now
    /// on has a larger one.
    pub fn seq_now(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    fn next_seqs(&self, n: u64) -> u64 {
        self.seq.fetch_add(n, Ordering::SeqCst) + 1
    }

    /// Write-ahead of captured changes for every target, in one batch.
    pub fn record(&self, targets: &[TargetId], changes: &[Change]) -> Result<()> {
        if changes.is_empty() || targets.is_empty() {
            return Ok(());
        }
        // Held even for plain merges: `complete` reads a sequence number and
        // deletes on a match, and a merge landing in between would be lost.
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let first = self.next_seqs(changes.len() as u64);
        let now = now_ns();
        let pending = self.cf(CF_PENDING)?;
        let renames = self.cf(CF_RENAMES)?;
        let mut b = WriteBatch::default();
        // The counter goes into the first write: a rename below may split
        // this call into several writes, and after a crash between them a
        // reused sequence number could make `complete` drop a newer change.
        b.put_cf(
            self.cf(CF_META)?,
            META_SEQ,
            (first + changes.len() as u64 - 1).to_le_bytes(),
        );
        for (i, c) in changes.iter().enumerate() {
            let seq = first + i as u64;
            match c {
                Change::Dirty { path, flags } => {
                    tracing::trace!(seq, path = %paths::display(path), flags, "recorded")
                }
                Change::Rename { from, to } => {
                    tracing::trace!(seq, from = %paths::display(from), to = %paths::display(to), "recorded rename")
                }
            }
            match c {
                Change::Dirty { path, flags } => {
                    let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
                    for &t in targets {
                        let (k, f) = match bound.level(t) {
                            0 => (key(t, path), *flags),
                            level => {
                                if bound.collapsing.insert(t) {
                                    tracing::warn!(
                                        "backlog of target {} reached its bound (backlog.max_entries = {}, max_bytes = {}): new changes are recorded as directory-level rescans until it drains",
                                        bound.name(t), bound.max_entries, bound.max_bytes
                                    );
                                }
                                metrics::counter!("drmirror_backlog_collapsed_total").increment(1);
                                (
                                    key(t, &collapse_path(path, level)),
                                    flags::RECURSIVE | (*flags & (flags::LIVE | flags::STARTUP)),
                                )
                            }
                        };
                        let v = Pending {
                            seq,
                            first_seen_ns: now,
                            flags: f,
                        }
                        .encode();
                        let e = bound.size.entry(t).or_default();
                        e.0 += 1;
                        e.1 += (k.len() + v.len()) as u64;
                        b.merge_cf(pending, k, v);
                    }
                }
                Change::Rename { from, to } => {
                    // Moving pending entries reads the database: what this
                    // batch holds so far must be visible to that read.
                    if !b.is_empty() {
                        self.db.write(std::mem::take(&mut b))?;
                    }
                    let mut v = Vec::with_capacity(from.len() + 1 + to.len());
                    v.extend_from_slice(from);
                    v.push(0);
                    v.extend_from_slice(to);
                    for &t in targets {
                        let mut k = t.to_be_bytes().to_vec();
                        k.extend_from_slice(&seq.to_be_bytes());
                        b.put_cf(renames, k, &v);
                        // Earlier pending changes below `from` now live below `to`.
                        self.move_pending(&mut b, t, from, to, seq)?;
                        let mark = Pending {
                            seq,
                            first_seen_ns: now,
                            flags: flags::LIVE,
                        }
                        .encode();
                        b.merge_cf(pending, key(t, from), mark);
                        b.merge_cf(pending, key(t, to), mark);
                    }
                }
            }
        }
        self.db.write(b)?;
        self.note_recorded(targets, now);
        Ok(())
    }

    /// Notes changes captured at `ns` for `targets`, after their write.
    fn note_recorded(&self, targets: &[TargetId], ns: u64) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for &t in targets {
            let c = lag.entry(t).or_default();
            c.since = min_opt(c.since, Some(ns));
        }
    }

    /// The capture time of target `t`'s oldest pending change, as far as
    /// the last walk of its backlog and what was recorded since tell: never
    /// later than the truth (see [`LagClock`]). `None` when nothing is
    /// known to be pending.
    pub fn oldest_pending_ns(&self, t: TargetId) -> Option<u64> {
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.get(&t)
            .and_then(|c| min_opt(min_opt(min_opt(c.walked, c.since), c.in_walk), c.floor))
    }

    /// Target `t` may lack changes made since `ns` that nothing captured
    /// (the daemon was down, or died): until [`Journal::clear_startup_floor`],
    /// its lag counts from `ns` at least, and entries the startup scan
    /// enqueues ([`flags::STARTUP`]) count from `ns`, so the lag stays
    /// there until they are applied.
    pub fn set_startup_floor(&self, t: TargetId, ns: u64) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.entry(t).or_default().floor = Some(ns);
    }

    /// The startup scan of `t` has enqueued all it found.
    pub fn clear_startup_floor(&self, t: TargetId) {
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = lag.get_mut(&t) {
            c.floor = None;
        }
    }

    fn startup_floor(&self, t: TargetId) -> Option<u64> {
        let lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        lag.get(&t).and_then(|c| c.floor)
    }

    /// The last time capture was known to have recorded every change made
    /// before it (see `daemon::capture_loop`): a restart that was not
    /// handed the kernel's queue may have missed changes since.
    pub fn captured_through(&self) -> Result<Option<u64>> {
        Ok(self
            .meta_get(META_CAPTURED_THROUGH)?
            .and_then(|v| v.try_into().ok().map(u64::from_le_bytes)))
    }

    pub fn set_captured_through(&self, ns: u64) -> Result<()> {
        self.meta_put(META_CAPTURED_THROUGH, &ns.to_le_bytes())
    }

    /// Moves the pending entries of `from` and its subtree to `to` (within `b`).
    fn move_pending(
        &self,
        b: &mut WriteBatch,
        t: TargetId,
        from: &[u8],
        to: &[u8],
        seq: u64,
    ) -> Result<()> {
        let pending = self.cf(CF_PENDING)?;
        let mut moved = Vec::new();
        if let Some(v) = self.db.get_cf(pending, key(t, from))? {
            moved.push((from.to_vec(), v));
        }
        let (start, end) = subtree_range(t, from);
        for item in self.range(CF_PENDING, &start, &end)? {
            let (k, v) = item;
            moved.push((k[2..].to_vec(), v));
        }
        for (path, v) in moved {
            let Some(mut p) = Pending::decode(&v) else {
                continue;
            };
            b.delete_cf(pending, key(t, &path));
            p.seq = seq;
            let np = paths::rebase(&path, from, to);
            b.merge_cf(pending, key(t, &np), p.encode());
        }
        Ok(())
    }

    fn range(&self, cf: &str, start: &[u8], end: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let it = self.db.iterator_cf_opt(
            self.cf(cf)?,
            ro,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Up to `limit` pending entries of target `t` in path order, starting
    /// strictly after `after` (or from the first).
    pub fn pending_batch(
        &self,
        t: TargetId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Pending)>> {
        let start = match after {
            Some(p) => {
                let mut k = key(t, p);
                k.push(0);
                k
            }
            None => key(t, b""),
        };
        let end = prefix_end(&t.to_be_bytes()).unwrap_or_else(|| vec![0xff; 3]);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let it = self.db.iterator_cf_opt(
            self.cf(CF_PENDING)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it.take(limit) {
            let (k, v) = item?;
            let p = Pending::decode(&v).ok_or_else(|| {
                JournalError::Corrupt(format!("pending value of {} bytes", v.len()))
            })?;
            out.push((k[2..].to_vec(), p));
        }
        Ok(out)
    }

    /// The parent directories of target `t`'s pending entries, or `None`
    /// if there are more than `max_entries` entries.
    ///
    /// Taken at start, before anything is shipped, these are the only
    /// directories where the last run can have left temporary files of
    /// copies it did not finish: an entry leaves the backlog only once its
    /// copy is in place.
    pub fn pending_parents(
        &self,
        t: TargetId,
        max_entries: usize,
    ) -> Result<Option<std::collections::HashSet<Vec<u8>>>> {
        let mut out = std::collections::HashSet::new();
        let mut after: Option<Vec<u8>> = None;
        let mut seen = 0usize;
        loop {
            let batch = self.pending_batch(t, after.as_deref(), 10_000)?;
            seen += batch.len();
            if seen > max_entries {
                return Ok(None);
            }
            for (p, v) in &batch {
                out.insert(paths::parent(p).unwrap_or_default().to_vec());
                // A BULK entry copies into the directory itself.
                if v.flags & flags::BULK != 0 {
                    out.insert(p.clone());
                }
            }
            match batch.last() {
                Some((p, _)) if batch.len() == 10_000 => after = Some(p.clone()),
                _ => return Ok(Some(out)),
            }
        }
    }

    /// The pending entry of `path` for target `t`, if any.
    pub fn pending_get(&self, t: TargetId, path: &[u8]) -> Result<Option<Pending>> {
        match self.db.get_pinned_cf(self.cf(CF_PENDING)?, key(t, path))? {
            None => Ok(None),
            Some(v) => Pending::decode(&v).map(Some).ok_or_else(|| {
                JournalError::Corrupt(format!("pending value of {} bytes", v.len()))
            }),
        }
    }

    /// Entries, bytes and the oldest first-seen time (ns) of target `t`'s
    /// backlog, looking at `limit` entries at most (`complete` says whether
    /// that was all of them): called about once a second for the metrics.
    /// Bounds every target's backlog (see [`Journal::record`]).
    pub fn set_backlog_bound(&self, max_entries: u64, max_bytes: u64) {
        let mut b = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        b.max_entries = max_entries.max(1);
        b.max_bytes = max_bytes.max(1);
    }

    /// Records a fresh count of target `t`'s backlog (the shipper counts it
    /// about once a second).
    /// How far a backlog count must go to decide the bound exactly: past
    /// twice `max_entries` the level no longer changes (and a count that
    /// stops earlier could only raise the estimate, collapsing changes
    /// sooner than needed).
    pub fn backlog_count_limit(&self) -> usize {
        let b = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        if b.max_entries == u64::MAX {
            return 1_000_000;
        }
        usize::try_from(b.max_entries.saturating_mul(2).saturating_add(1))
            .unwrap_or(usize::MAX)
            .max(1_000_000)
    }

    pub fn note_backlog(&self, t: TargetId, st: &BacklogStats) {
        let mut b = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.size.entry(t).or_default();
        if st.complete {
            *e = (st.entries, st.bytes);
        } else {
            *e = (e.0.max(st.entries), e.1.max(st.bytes));
        }
        if b.level(t) == 0 && b.collapsing.remove(&t) {
            tracing::info!("backlog of target {} is below its bound again", b.name(t));
        }
    }

    pub fn backlog_stats(&self, t: TargetId, limit: usize) -> Result<BacklogStats> {
        // Before the iterator is made: see `LagClock`.
        let since = {
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            let c = lag.entry(t).or_default();
            let since = c.since.take();
            c.in_walk = min_opt(c.in_walk, since);
            since
        };
        let st = self.walk_backlog(t, limit)?;
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        let c = lag.entry(t).or_default();
        c.in_walk = None;
        c.walked = if st.complete {
            st.oldest_ns
        } else {
            // Entries past the limit were not seen: keep what was known.
            min_opt(min_opt(c.walked, since), st.oldest_ns)
        };
        Ok(st)
    }

    fn walk_backlog(&self, t: TargetId, limit: usize) -> Result<BacklogStats> {
        let start = key(t, b"");
        let end = prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let mut st = BacklogStats {
            complete: true,
            ..Default::default()
        };
        for item in self.db.iterator_cf_opt(
            self.cf(CF_PENDING)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            if st.entries as usize >= limit {
                st.complete = false;
                break;
            }
            let (k, v) = item?;
            st.entries += 1;
            st.bytes += (k.len() + v.len()) as u64;
            if let Some(p) = Pending::decode(&v) {
                st.oldest_ns = Some(
                    st.oldest_ns
                        .map_or(p.first_seen_ns, |o| o.min(p.first_seen_ns)),
                );
            }
        }
        Ok(st)
    }

    /// Number of pending entries of target `t` (walks them: for status and
    /// tests, not for hot paths).
    /// Whether target `t` has any pending entry (one seek).
    pub fn pending_any(&self, t: TargetId) -> Result<bool> {
        let (start, ro) = target_bounds(t);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_PENDING)?, ro);
        it.seek(&start);
        let any = it.valid();
        it.status()?;
        Ok(any)
    }

    pub fn pending_count(&self, t: TargetId) -> Result<u64> {
        let (start, ro) = target_bounds(t);
        let mut n = 0;
        for item in self.db.iterator_cf_opt(
            self.cf(CF_PENDING)?,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The oldest renames waiting for target `t`, in sequence order.
    pub fn renames(&self, t: TargetId, limit: usize) -> Result<Vec<PendingRename>> {
        let start = t.to_be_bytes().to_vec();
        let end = prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(
                self.cf(CF_RENAMES)?,
                ro,
                IteratorMode::From(&start, Direction::Forward),
            )
            .take(limit)
        {
            let (k, v) = item?;
            let seq = <[u8; 8]>::try_from(&k[2..])
                .map(u64::from_be_bytes)
                .map_err(|_| JournalError::Corrupt("rename key".into()))?;
            let nul = v
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| JournalError::Corrupt("rename value".into()))?;
            out.push(PendingRename {
                seq,
                from: v[..nul].to_vec(),
                to: v[nul + 1..].to_vec(),
            });
        }
        Ok(out)
    }

    /// What the index says target `t` holds at `path`.
    pub fn index_get(&self, t: TargetId, path: &[u8]) -> Result<Option<Meta>> {
        match self.db.get_pinned_cf(self.cf(CF_INDEX)?, key(t, path))? {
            None => Ok(None),
            Some(v) => Meta::decode(&v)
                .map(Some)
                .ok_or_else(|| JournalError::Corrupt(format!("index value of {} bytes", v.len()))),
        }
    }

    /// The index entries of several paths at once (one batched lookup).
    pub fn index_get_many(&self, t: TargetId, paths: &[&[u8]]) -> Result<Vec<Option<Meta>>> {
        let keys: Vec<Vec<u8>> = paths.iter().map(|p| key(t, p)).collect();
        let cf = self.cf(CF_INDEX)?;
        self.db
            .batched_multi_get_cf(cf, &keys, false)
            .into_iter()
            .map(|r| match r? {
                None => Ok(None),
                Some(v) => Meta::decode(&v).map(Some).ok_or_else(|| {
                    JournalError::Corrupt(format!("index value of {} bytes", v.len()))
                }),
            })
            .collect()
    }

    /// Whether the index holds anything below `dir` for target `t`.
    fn index_has_children(&self, t: TargetId, dir: &[u8]) -> Result<bool> {
        let (s, e) = subtree_range(t, dir);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(e);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_INDEX)?, ro);
        it.seek(&s);
        if it.valid() {
            return Ok(true);
        }
        it.status()?;
        Ok(false)
    }

    /// What the index says target `t` holds directly in directory `dir`:
    /// names and metadata, in name order (see [`IndexReaders`] for a walk).
    pub fn index_children(&self, t: TargetId, dir: &[u8]) -> Result<Vec<(Vec<u8>, Meta)>> {
        let prefix = children_prefix(t, dir);
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(&prefix).unwrap_or_else(|| vec![0xff; 3]));
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_INDEX)?, ro);
        children_at(&mut it, &prefix)
    }

    /// Records directories in the directory list, each with its index
    /// entry.
    pub fn dirlist_put(&self, t: TargetId, dirs: &[(&[u8], Meta)]) -> Result<()> {
        if dirs.is_empty() {
            return Ok(());
        }
        let cf = self.cf(CF_DIRLIST)?;
        let mut b = WriteBatch::default();
        for (d, m) in dirs {
            b.put_cf(cf, key(t, d), m.encode());
        }
        Ok(self.db.write(b)?)
    }

    /// Forgets directories of the directory list (gone from the source).
    pub fn dirlist_remove(&self, t: TargetId, dirs: &[&[u8]]) -> Result<()> {
        if dirs.is_empty() {
            return Ok(());
        }
        let cf = self.cf(CF_DIRLIST)?;
        let mut b = WriteBatch::default();
        for d in dirs {
            b.delete_cf(cf, key(t, d));
        }
        Ok(self.db.write(b)?)
    }

    /// The directories in target `t`'s directory list, in key order, each
    /// with its index entry as last written (`None` if unreadable).
    pub fn dirlist(&self, t: TargetId) -> Result<Vec<(Vec<u8>, Option<Meta>)>> {
        let mut out = Vec::new();
        self.dirlist_chunks(t, 1024, |c| {
            out.extend(c);
            true
        })?;
        Ok(out)
    }

    /// [`Journal::dirlist`] in chunks of up to `n`, handed to `f` as they
    /// are read (so that a caller can work on one while the next is read);
    /// stops early when `f` returns false.
    pub fn dirlist_chunks(
        &self,
        t: TargetId,
        n: usize,
        mut f: impl FnMut(Vec<(Vec<u8>, Option<Meta>)>) -> bool,
    ) -> Result<()> {
        let start = key(t, b"");
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(&start).unwrap_or_else(|| vec![0xff; 3]));
        // A raw iterator lends each key and value: no allocation per entry
        // beyond the path kept.
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_DIRLIST)?, ro);
        it.seek(&start);
        let mut chunk = Vec::with_capacity(n);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            chunk.push((k[2..].to_vec(), Meta::decode(v)));
            if chunk.len() == n && !f(std::mem::replace(&mut chunk, Vec::with_capacity(n))) {
                return Ok(());
            }
            it.next();
        }
        it.status()?;
        if !chunk.is_empty() {
            f(chunk);
        }
        Ok(())
    }

    /// Records index entries (a scan found the target already holding them).
    pub fn index_put_many(&self, t: TargetId, entries: &[(Vec<u8>, Meta)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let index = self.cf(CF_INDEX)?;
        let dirlist = self.cf(CF_DIRLIST)?;
        let mut b = WriteBatch::default();
        for (p, m) in entries {
            b.put_cf(index, key(t, p), m.encode());
            if m.kind == Kind::Dir {
                b.put_cf(dirlist, key(t, p), m.encode());
            } else {
                b.delete_cf(dirlist, key(t, p));
            }
        }
        Ok(self.db.write(b)?)
    }

    /// Applies a shipper's confirmation atomically.
    pub fn complete(&self, t: TargetId, c: &Completion) -> Result<()> {
        if c.is_empty() {
            return Ok(());
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let pending = self.cf(CF_PENDING)?;
        let index = self.cf(CF_INDEX)?;
        let renames = self.cf(CF_RENAMES)?;
        let dirlist = self.cf(CF_DIRLIST)?;
        let mut b = WriteBatch::default();
        self.batch_index_moves(&mut b, t, &c.index_moves)?;
        for p in &c.index_remove_tree {
            tracing::trace!(target_id = t, path = %paths::display(p), "index subtree removed");
            let (s, e) = subtree_range(t, p);
            for cf in [index, dirlist] {
                b.delete_cf(cf, key(t, p));
                b.delete_range_cf(cf, &s, &e);
            }
        }
        // A range tombstone only where there is a subtree to drop: every
        // read of a column family's memtable fragments all of its range
        // tombstones again (RocksDB), so one per deleted file made each
        // round's reads cost more with every file deleted since the last
        // flush (the soak's CPU per change climbed from 0.4 to 5 ms).
        for p in &c.index_remove {
            tracing::trace!(target_id = t, path = %paths::display(p), "index entry removed");
            if self.index_has_children(t, p)? {
                let (s, e) = subtree_range(t, p);
                for cf in [index, dirlist] {
                    b.delete_range_cf(cf, &s, &e);
                }
            }
            for cf in [index, dirlist] {
                b.delete_cf(cf, key(t, p));
            }
        }
        let mut deletes = 0u64;
        if tracing::enabled!(tracing::Level::TRACE) {
            for (p, m) in c.index_put.iter().chain(&c.index_new) {
                tracing::trace!(target_id = t, path = %paths::display(p), ino = m.ino, kind = ?m.kind, "index put");
            }
        }
        for (p, m) in &c.index_put {
            b.put_cf(index, key(t, p), m.encode());
            if m.kind == Kind::Dir {
                b.put_cf(dirlist, key(t, p), m.encode());
            } else {
                b.delete_cf(dirlist, key(t, p));
                deletes += 1;
            }
        }
        for (p, m) in &c.index_new {
            b.put_cf(index, key(t, p), m.encode());
        }
        for (p, seq) in &c.done {
            let k = key(t, p);
            let current = self
                .db
                .get_pinned_cf(pending, &k)?
                .and_then(|v| Pending::decode(&v));
            if matches!(current, Some(cur) if cur.seq == *seq) {
                b.delete_cf(pending, &k);
                deletes += 1;
            }
        }
        for seq in &c.renames_done {
            let mut k = t.to_be_bytes().to_vec();
            k.extend_from_slice(&seq.to_be_bytes());
            b.delete_cf(renames, k);
        }
        let meta = self.cf(CF_META)?;
        let dp = tkey(META_DOUBT, t);
        for (p, round) in &c.undoubt {
            let k = [dp.as_slice(), p].concat();
            let current = self.db.get_pinned_cf(meta, &k)?;
            if current.is_some_and(|v| v.as_ref() == round.to_le_bytes()) {
                b.delete_cf(meta, k);
            }
        }
        let requeued = self.merge_pending(&mut b, t, &c.requeue)?;
        self.db.write(b)?;
        if let Some(ns) = requeued {
            self.note_recorded(&[t], ns);
        } else if !self.pending_any(t)? {
            // Drained, and no record can be under way (they take the same
            // lock): in sync now, not at the next walk of the backlog.
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            let c = lag.entry(t).or_default();
            c.walked = None;
            c.since = None;
        }
        self.churn.fetch_add(deletes, Ordering::Relaxed);
        Ok(())
    }

    /// The index moves of renames applied (`moves`, in order), written
    /// into `b`.
    fn batch_index_moves(
        &self,
        b: &mut WriteBatch,
        t: TargetId,
        moves: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<()> {
        let index = self.cf(CF_INDEX)?;
        let dirlist = self.cf(CF_DIRLIST)?;
        let is_dir = |v: &[u8]| Meta::decode(v).is_some_and(|m| m.kind == Kind::Dir);
        // The moves are worked out in memory, in order, and written with the
        // rest in one batch. In order: a chain applied in one round (`mv p
        // tmp; mv q p; mv tmp q`) must see what the moves before it did, not
        // the index as committed (read so, the third move found nothing at
        // `tmp`, and `q`'s entries were lost). In one batch: the renames'
        // rows are deleted in it, and a chain replayed after a crash that
        // had written only some of its moves would swap the directories back
        // on the target under an index that no longer says so.
        let mut overlay: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> =
            std::collections::BTreeMap::new();
        for (from, to) in moves {
            let moved = self.index_subtree_overlaid(t, from, &overlay)?;
            // What the index says the target holds is what a divergence is
            // read from: each change of it can be followed at trace level.
            tracing::trace!(target_id = t, from = %paths::display(from), to = %paths::display(to), entries = moved.len(), "index move");
            // Whatever the target held at `to` was replaced by the rename.
            for (k, _) in self.index_subtree_overlaid(t, to, &overlay)? {
                overlay.insert(k, None);
            }
            let (ts, te) = subtree_range(t, to);
            for cf in [index, dirlist] {
                b.delete_cf(cf, key(t, to));
                b.delete_range_cf(cf, &ts, &te);
            }
            for (k, _) in &moved {
                overlay.insert(k.clone(), None);
            }
            for (k, v) in moved {
                let new = key(t, &paths::rebase(&k[2..], from, to));
                overlay.insert(new, Some(v));
            }
        }
        for (k, v) in overlay {
            match v {
                Some(v) => {
                    if is_dir(&v) {
                        b.put_cf(dirlist, &k, &v);
                    } else {
                        b.delete_cf(dirlist, &k);
                    }
                    b.put_cf(index, k, v);
                }
                None => {
                    b.delete_cf(index, &k);
                    b.delete_cf(dirlist, &k);
                }
            }
        }
        Ok(())
    }

    /// Index entries (full keys and values) of `dir` and its subtree, as
    /// the index holds them with `overlay` (key → value, or `None` for
    /// deleted) laid over it.
    fn index_subtree_overlaid(
        &self,
        t: TargetId,
        dir: &[u8],
        overlay: &std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let index = self.cf(CF_INDEX)?;
        let mut out: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        let own = key(t, dir);
        if let Some(v) = self.db.get_cf(index, &own)? {
            out.insert(own.clone(), v);
        }
        let (start, end) = subtree_range(t, dir);
        for (k, v) in self.range(CF_INDEX, &start, &end)? {
            out.insert(k, v);
        }
        let laid = overlay
            .range(own.clone()..=own.clone())
            .chain(overlay.range(start..end));
        for (k, v) in laid {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// Compacts `pending` and `dirlist` once `min_deletes` deletions have
    /// been written to them since the last time; returns whether it did.
    ///
    /// Called when a backlog has drained: the tombstones then make up
    /// nearly all of both, the compaction is cheap and drops them, and the
    /// next scans of the backlog (and the next start's) no longer step over
    /// them. The deletion-triggered compaction set at open catches them
    /// only once they are in SST files and enough have gathered.
    pub fn compact_churned(&self, min_deletes: u64) -> Result<bool> {
        if self.churn.load(Ordering::Relaxed) < min_deletes {
            return Ok(false);
        }
        self.churn.store(0, Ordering::Relaxed);
        // Forced: a flushed file of tombstones alone is otherwise moved to
        // the last level as it is, tombstones and all.
        let mut o = rocksdb::CompactOptions::default();
        o.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        o.set_exclusive_manual_compaction(false);
        for name in [CF_PENDING, CF_DIRLIST] {
            self.db
                .compact_range_cf_opt(self.cf(name)?, None::<&[u8]>, None::<&[u8]>, &o);
        }
        Ok(true)
    }

    /// Enqueues entries for one target only (a subtree scan of that target).
    pub fn enqueue(&self, t: TargetId, entries: &[(Vec<u8>, u8)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        for (path, flags) in entries {
            tracing::trace!(path = %paths::display(path), flags, "enqueued");
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = WriteBatch::default();
        let recorded = self.merge_pending(&mut b, t, entries)?;
        self.db.write(b)?;
        if let Some(ns) = recorded {
            self.note_recorded(&[t], ns);
        }
        Ok(())
    }

    /// Adds pending entries (fresh sequence numbers, first seen now) to `b`;
    /// returns that time, for [`Journal::note_recorded`] once `b` is
    /// written. The caller holds the lock.
    fn merge_pending(
        &self,
        b: &mut WriteBatch,
        t: TargetId,
        entries: &[(Vec<u8>, u8)],
    ) -> Result<Option<u64>> {
        if entries.is_empty() {
            return Ok(None);
        }
        let first = self.next_seqs(entries.len() as u64);
        let now = now_ns();
        // What a startup scan finds may have changed as early as the floor.
        let floor = self.startup_floor(t).map(|f| f.min(now));
        let mut oldest = now;
        let pending = self.cf(CF_PENDING)?;
        for (i, (p, f)) in entries.iter().enumerate() {
            let first_seen_ns = match floor {
                Some(fl) if f & flags::STARTUP != 0 => fl,
                _ => now,
            };
            oldest = oldest.min(first_seen_ns);
            let v = Pending {
                seq: first + i as u64,
                first_seen_ns,
                flags: *f,
            };
            b.merge_cf(pending, key(t, p), v.encode());
        }
        b.put_cf(
            self.cf(CF_META)?,
            META_SEQ,
            self.seq.load(Ordering::SeqCst).to_le_bytes(),
        );
        Ok(Some(oldest))
    }

    /// About `n` entries of target `t`'s index, spread over it: each is
    /// the first entry at or after a random key (the index is sorted by
    /// path, so the draw favours entries after sparse stretches; enough
    /// to tell a target that lost much of what its index says it holds).
    /// `seed` drives the draw.
    pub fn index_sample(&self, t: TargetId, n: usize, seed: u64) -> Result<Vec<(Vec<u8>, Meta)>> {
        let (start, ro) = target_bounds(t);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_INDEX)?, ro);
        // The draw spans the first three bytes of the first and the last
        // path, so that it lands among the paths the index holds.
        let prefix = |k: Option<&[u8]>, pad: u8| -> u32 {
            let mut b = [pad; 3];
            for (d, s) in b.iter_mut().zip(k.unwrap_or(&[]).iter().skip(2)) {
                *d = *s;
            }
            u32::from_be_bytes([0, b[0], b[1], b[2]])
        };
        it.seek(&start);
        let lo = prefix(it.key(), 0);
        it.seek_to_last();
        let hi = prefix(it.key(), 0xff).max(lo);
        let mut out = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        let mut x = seed | 1;
        for _ in 0..n {
            // xorshift64: a fresh spread per call, no crate needed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = lo + (x % u64::from(hi - lo + 1)) as u32;
            let mut k = start.clone();
            k.extend_from_slice(&r.to_be_bytes()[1..]);
            it.seek(&k);
            if !it.valid() {
                it.seek(&start);
            }
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                if seen.insert(k.to_vec()) {
                    if let Some(m) = Meta::decode(v) {
                        out.push((k[2..].to_vec(), m));
                    }
                }
            }
        }
        it.status()?;
        Ok(out)
    }

    /// Records watched directories (the persisted watch tree), each with
    /// its backend's value.
    pub fn dirs_put(&self, dirs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if dirs.is_empty() {
            return Ok(());
        }
        self.dirs_update(dirs, &[])
    }

    /// Clears the persisted watch tree and records which backend fills it
    /// from now on (inotify keys it by path, fanotify by file handle).
    pub fn dirs_reset(&self, backend: &[u8]) -> Result<()> {
        let cf = self.cf(CF_DIRS)?;
        let mut b = WriteBatch::default();
        b.delete_range_cf(cf, b"".as_slice(), KEY_MAX.as_slice());
        b.put_cf(self.cf(CF_META)?, META_DIRS_BACKEND, backend);
        Ok(self.db.write(b)?)
    }

    /// Which backend wrote the persisted watch tree, if any.
    pub fn dirs_backend(&self) -> Result<Option<Vec<u8>>> {
        self.meta_get(META_DIRS_BACKEND)
    }

    /// The keys of the persisted watch tree, in key order.
    pub fn dirs_list(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.dirs_entries()?.into_iter().map(|(k, _)| k).collect())
    }

    /// The persisted watch tree's keys and values, in key order.
    pub fn dirs_entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_DIRS)?, IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Applies changes to the persisted watch tree: keys to delete, then
    /// keys to set.
    pub fn dirs_update(&self, put: &[(Vec<u8>, Vec<u8>)], del: &[Vec<u8>]) -> Result<()> {
        let cf = self.cf(CF_DIRS)?;
        let mut b = WriteBatch::default();
        for k in del {
            b.delete_cf(cf, k);
        }
        for (k, v) in put {
            b.put_cf(cf, k, v);
        }
        Ok(self.db.write(b)?)
    }

    /// Forgets a watched directory and its subtree.
    pub fn dirs_remove_tree(&self, dir: &[u8]) -> Result<()> {
        let cf = self.cf(CF_DIRS)?;
        let mut b = WriteBatch::default();
        if dir.is_empty() {
            b.delete_range_cf(cf, b"".as_slice(), KEY_MAX.as_slice());
        } else {
            b.delete_cf(cf, dir);
            let mut s = dir.to_vec();
            s.push(b'/');
            let mut e = dir.to_vec();
            e.push(b'/' + 1);
            b.delete_range_cf(cf, s, e);
        }
        Ok(self.db.write(b)?)
    }

    /// Flushes memtables and the WAL to disk (clean shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        for name in CFS {
            self.db.flush_cf(self.cf(name)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Index metadata of a plain file or directory (the values are beside
    /// the point of these tests).
    fn meta(kind: Kind) -> Meta {
        let (mode, size) = if kind == Kind::Dir {
            (0o755, 0)
        } else {
            (0o644, 1)
        };
        Meta {
            kind,
            mode,
            uid: 0,
            gid: 0,
            size,
            mtime_ns: 1,
            ctime_ns: 1,
            ino: 1,
            dev: 1,
            rdev: 0,
            nlink: 0,
        }
    }
    use crate::meta::Kind;

    fn dirty(p: &[u8], f: u8) -> Change {
        Change::Dirty {
            path: p.to_vec(),
            flags: f,
        }
    }

    #[test]
    fn reconciliation_checkpoint_per_target() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.recon_done_put(1, &[b"a".to_vec(), b"".to_vec(), b"\xffb".to_vec()])
            .unwrap();
        j.recon_done_put(2, &[b"c".to_vec()]).unwrap();
        j.recon_done_put(TargetId::MAX, &[vec![0xff; 3]]).unwrap();
        let got = j.recon_done_list(1).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.contains(b"".as_slice()) && got.contains(b"\xffb".as_slice()));
        j.recon_done_clear(1).unwrap();
        assert!(j.recon_done_list(1).unwrap().is_empty());
        assert_eq!(j.recon_done_list(2).unwrap().len(), 1);
        assert_eq!(j.recon_done_list(TargetId::MAX).unwrap().len(), 1);
        j.recon_done_clear(TargetId::MAX).unwrap();
        assert!(j.recon_done_list(TargetId::MAX).unwrap().is_empty());
        assert_eq!(j.recon_done_list(2).unwrap().len(), 1);
    }

    #[test]
    fn watch_tree_reset_list_update() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.dirs_backend().unwrap(), None);
        j.dirs_reset(b"inotify").unwrap();
        let w = |k: &[u8]| (k.to_vec(), 1i32.to_le_bytes().to_vec());
        j.dirs_put(&[w(b""), w(b"a"), w(b"a/b"), w(b"\xff")])
            .unwrap();
        assert_eq!(j.dirs_entries().unwrap()[1], w(b"a"));
        assert_eq!(j.dirs_list().unwrap().len(), 4);
        j.dirs_update(&[(b"c".to_vec(), Vec::new())], &[b"a/b".to_vec()])
            .unwrap();
        assert_eq!(
            j.dirs_list().unwrap(),
            vec![b"".to_vec(), b"a".to_vec(), b"c".to_vec(), b"\xff".to_vec()]
        );
        // A whole-tree removal and a reset leave nothing, even keys that
        // start with 0xff (raw names, file handles).
        j.dirs_remove_tree(b"").unwrap();
        assert!(j.dirs_list().unwrap().is_empty());
        j.dirs_update(&[(vec![0xff; 40], b"x".to_vec())], &[])
            .unwrap();
        j.dirs_reset(b"fanotify").unwrap();
        assert!(j.dirs_list().unwrap().is_empty());
        assert_eq!(
            j.dirs_backend().unwrap().as_deref(),
            Some(b"fanotify".as_slice())
        );
    }

    #[test]
    fn a_doubt_is_settled_by_its_own_round_and_resolved_by_forgetting_the_subtree() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let u = j.target_id("u").unwrap();
        let (m, dir) = (meta(Kind::File), meta(Kind::Dir));
        let held: Vec<(Vec<u8>, Meta)> = vec![
            (b"a".to_vec(), dir),
            (b"a/f".to_vec(), m),
            (b"a/s".to_vec(), dir),
            (b"a/s/g".to_vec(), m),
            (b"ab".to_vec(), m),
            (b"b".to_vec(), dir),
        ];
        j.index_put_many(t, &held).unwrap();
        j.index_put_many(u, &held).unwrap();
        j.doubt_put(t, &[b"a", b"b"], 1).unwrap();
        j.doubt_put(u, &[b"a"], 1).unwrap();
        // A later round doubted `b` again: round 1's settling leaves it.
        j.doubt_put(t, &[b"b"], 2).unwrap();
        let settle = |p: &[u8], r| Completion {
            undoubt: vec![(p.to_vec(), r)],
            ..Completion::default()
        };
        j.complete(t, &settle(b"b", 1)).unwrap();
        assert_eq!(j.doubts(t).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        j.complete(u, &settle(b"a", 1)).unwrap();
        assert!(j.doubts(u).unwrap().is_empty());
        // A crash now: the next start forgets `a` and `b` and below.
        assert_eq!(j.resolve_doubts(t).unwrap(), 2);
        assert!(j.doubts(t).unwrap().is_empty());
        let rescan: Vec<(Vec<u8>, u8)> = j
            .pending_batch(t, None, 10)
            .unwrap()
            .into_iter()
            .map(|(p, v)| (p, v.flags))
            .collect();
        // Compared by content there (see `META_DISTRUST`), until a startup
        // scan is through.
        let f = flags::RECURSIVE | flags::STARTUP | flags::CONTENT;
        assert_eq!(rescan, vec![(b"a".to_vec(), f), (b"b".to_vec(), f)]);
        assert_eq!(j.distrusted(t).unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(j.distrusted(u).unwrap().is_empty());
        assert!(j.trust(t).unwrap().distrusts(b"a/x"));
        assert!(!j.trust(u).unwrap().distrusts(b"a/x"));
        let left: Vec<Option<Meta>> = held
            .iter()
            .map(|(p, _)| j.index_get_many(t, &[p.as_slice()]).unwrap()[0])
            .collect();
        assert_eq!(left, vec![None, None, None, None, Some(m), None]);
        assert_eq!(j.index_children(u, b"a").unwrap().len(), 2, "other target");
        assert_eq!(j.resolve_doubts(t).unwrap(), 0);
        j.distrust_clear(t).unwrap();
        assert!(j.distrusted(t).unwrap().is_empty());
        assert!(j.trust(t).unwrap().trusts_all());
    }

    /// Distrust a rename carried is in the journal before the rename is
    /// applied: a crash then, and the next start still distrusts it.
    #[test]
    fn distrust_carried_by_a_rename_outlives_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        j.doubt_put(t, &[b"p"], 1).unwrap();
        j.resolve_doubts(t).unwrap();
        j.distrust_carry(t, b"p", b"tmpx").unwrap();
        j.distrust_carry(t, b"q", b"p").unwrap();
        assert!(j.trust(t).unwrap().distrusts(b"tmpx/id"));
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        let tr = j.trust(t).unwrap();
        assert!(tr.distrusts(b"tmpx/id") && tr.distrusts(b"p") && !tr.distrusts(b"q"));
        assert_eq!(
            j.distrusted(t).unwrap(),
            vec![b"p".to_vec(), b"tmpx".to_vec()]
        );
    }

    /// A start distrusts where the renames still waiting will move things.
    #[test]
    fn a_start_distrusts_both_sides_of_the_renames_waiting() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let u = j.target_id("u").unwrap();
        let rename = Change::Rename {
            from: b"a/x".to_vec(),
            to: b"b/y".to_vec(),
        };
        j.record(&[t], &[rename]).unwrap();
        assert_eq!(j.distrust_renamed(t).unwrap(), 1);
        let tr = j.trust(t).unwrap();
        assert!(tr.distrusts(b"a/x/f") && tr.distrusts(b"b/y") && !tr.distrusts(b"a"));
        assert!(j.trust(u).unwrap().trusts_all());
        assert_eq!(
            j.distrusted(t).unwrap(),
            vec![b"a/x".to_vec(), b"b/y".to_vec()]
        );
    }

    #[test]
    fn removing_a_file_drops_a_subtree_only_where_the_index_has_one() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let (f, dir) = (meta(Kind::File), meta(Kind::Dir));
        let held: Vec<(Vec<u8>, Meta)> = vec![
            (b"a".to_vec(), f),
            (b"a.b".to_vec(), f),
            (b"ab".to_vec(), f),
            // Entries below a path the index holds as a file: left by an
            // older run, they must not outlive its removal.
            (b"o".to_vec(), f),
            (b"o/x".to_vec(), f),
            (b"o/y".to_vec(), dir),
            (b"o/y/z".to_vec(), f),
            (b"p".to_vec(), f),
        ];
        j.index_put_many(t, &held).unwrap();
        let remove = Completion {
            index_remove: vec![b"a".to_vec(), b"o".to_vec()],
            ..Completion::default()
        };
        j.complete(t, &remove).unwrap();
        let left: Vec<bool> = held
            .iter()
            .map(|(p, _)| j.index_get_many(t, &[p.as_slice()]).unwrap()[0].is_some())
            .collect();
        assert_eq!(
            left,
            vec![false, true, true, false, false, false, false, true]
        );
        assert!(j.dirlist(t).unwrap().iter().all(|(p, _)| p != b"o/y"));
    }

    /// Two rounds' completions committed as one: what the later one
    /// removes (a file it deleted, a directory it could not re-stamp, with
    /// what was below it) is not put back by the earlier one's entries; what
    /// it puts after its own removal stays.
    #[test]
    fn a_later_rounds_removal_wins_over_an_earlier_rounds_put() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let (f, dir) = (meta(Kind::File), meta(Kind::Dir));
        let mut acc = Completion {
            index_put: vec![
                (b"gone".to_vec(), f),
                (b"d".to_vec(), dir),
                (b"d/x".to_vec(), f),
                (b"dx".to_vec(), f),
                (b"kept".to_vec(), f),
            ],
            index_new: vec![(b"t/n".to_vec(), f)],
            ..Completion::default()
        };
        acc.merge(Completion {
            index_remove: vec![b"gone".to_vec(), b"d".to_vec()],
            index_remove_tree: vec![b"t".to_vec()],
            index_put: vec![(b"d/y".to_vec(), f)],
            ..Completion::default()
        });
        j.complete(t, &acc).unwrap();
        let has = |p: &[u8]| j.index_get_many(t, &[p]).unwrap()[0].is_some();
        for p in [&b"gone"[..], b"d", b"d/x", b"t/n"] {
            assert!(!has(p), "{}", paths::display(p));
        }
        for p in [&b"dx"[..], b"kept", b"d/y"] {
            assert!(has(p), "{}", paths::display(p));
        }
    }

    #[test]
    fn ten_thousand_writes_coalesce_into_one_entry() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        for i in 0..10_000u32 {
            let f = if i == 5 { flags::CONTENT } else { flags::LIVE };
            j.record(&[t], &[dirty(b"dir/file", f)]).unwrap();
        }
        let b = j.pending_batch(t, None, 100).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0, b"dir/file");
        assert_eq!(b[0].1.flags, flags::CONTENT | flags::LIVE);
        assert_eq!(b[0].1.seq, 10_000);
        assert_eq!(j.pending_count(t).unwrap(), 1);
    }

    #[test]
    fn absent_survives_coalescing_only_when_every_entry_has_it() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let a = flags::ABSENT | flags::STARTUP;
        j.enqueue(t, &[(b"both".to_vec(), a), (b"one".to_vec(), a)])
            .unwrap();
        j.enqueue(
            t,
            &[(b"both".to_vec(), a), (b"one".to_vec(), flags::STARTUP)],
        )
        .unwrap();
        j.record(&[t], &[dirty(b"live", flags::CONTENT)]).unwrap();
        j.enqueue(t, &[(b"live".to_vec(), a)]).unwrap();
        let b = j.pending_batch(t, None, 100).unwrap();
        let f: Vec<(&[u8], u8)> = b.iter().map(|(p, v)| (p.as_slice(), v.flags)).collect();
        assert_eq!(
            f,
            vec![
                (b"both".as_slice(), a),
                (b"live".as_slice(), flags::CONTENT | flags::STARTUP),
                (b"one".as_slice(), flags::STARTUP),
            ]
        );
    }

    /// Tombstones in the SST files of `cf`.
    fn sst_deletions(j: &Journal, cf: &str) -> u64 {
        j.db.live_files()
            .unwrap()
            .iter()
            .filter(|f| f.column_family_name == cf)
            .map(|f| f.num_deletions)
            .sum()
    }

    #[test]
    fn a_drained_backlog_is_compacted_free_of_its_tombstones() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let names: Vec<Vec<u8>> = (0..5000).map(|i| format!("f{i:05}").into_bytes()).collect();
        let changes: Vec<Change> = names.iter().map(|n| dirty(n, flags::CONTENT)).collect();
        j.record(&[t], &changes).unwrap();
        let batch = j.pending_batch(t, None, 10_000).unwrap();
        let c = Completion {
            done: batch.iter().map(|(p, v)| (p.clone(), v.seq)).collect(),
            index_put: names
                .iter()
                .map(|n| (n.clone(), meta(Kind::File)))
                .collect(),
            ..Default::default()
        };
        j.complete(t, &c).unwrap();
        // 5,000 pending deletes and 5,000 dirlist deletes: under the bar.
        assert!(!j.compact_churned(10_001).unwrap());
        j.flush().unwrap();
        assert_eq!(sst_deletions(&j, CF_PENDING), 5000);
        assert_eq!(sst_deletions(&j, CF_DIRLIST), 5000);
        assert!(j.compact_churned(10_000).unwrap());
        assert_eq!(sst_deletions(&j, CF_PENDING), 0);
        assert_eq!(sst_deletions(&j, CF_DIRLIST), 0);
        // The count starts again from zero.
        assert!(!j.compact_churned(1).unwrap());
        assert!(j.pending_batch(t, None, 10).unwrap().is_empty());
        assert_eq!(j.index_get(t, b"f00042").unwrap(), Some(meta(Kind::File)));
    }

    #[test]
    fn completion_keeps_entries_changed_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        j.record(&[t], &[dirty(b"a", 0), dirty(b"b", 0)]).unwrap();
        let batch = j.pending_batch(t, None, 10).unwrap();
        j.record(&[t], &[dirty(b"b", 0)]).unwrap();
        let m = meta(Kind::File);
        let c = Completion {
            done: batch.iter().map(|(p, v)| (p.clone(), v.seq)).collect(),
            index_put: vec![(b"a".to_vec(), m)],
            ..Default::default()
        };
        j.complete(t, &c).unwrap();
        let left = j.pending_batch(t, None, 10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0, b"b");
        assert_eq!(j.index_get(t, b"a").unwrap(), Some(m));
    }

    #[test]
    fn a_chain_of_index_moves_in_one_completion_sees_each_move_before_it() {
        // `mv p tmp; mv q p; mv tmp q`, committed in one round.
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("dr").unwrap();
        let with_ino = |ino| Meta {
            ino,
            ..meta(Kind::File)
        };
        j.index_put_many(
            t,
            &[
                (b"p".to_vec(), meta(Kind::Dir)),
                (b"p/id".to_vec(), with_ino(1)),
                (b"q".to_vec(), meta(Kind::Dir)),
                (b"q/id".to_vec(), with_ino(2)),
            ],
        )
        .unwrap();
        let mv = |a: &[u8], b: &[u8]| (a.to_vec(), b.to_vec());
        let c = Completion {
            index_moves: vec![mv(b"p", b"tmp"), mv(b"q", b"p"), mv(b"tmp", b"q")],
            ..Default::default()
        };
        j.complete(t, &c).unwrap();
        let ino = |p: &[u8]| j.index_get(t, p).unwrap().map(|m| m.ino);
        assert_eq!(ino(b"q/id"), Some(1), "q holds what p held");
        assert_eq!(ino(b"p/id"), Some(2), "p holds what q held");
        assert_eq!(ino(b"tmp/id"), None);
        assert_eq!(ino(b"tmp"), None);
    }

    #[test]
    fn rename_moves_pending_subtree_and_targets_are_separate() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t1 = j.target_id("one").unwrap();
        let t2 = j.target_id("two").unwrap();
        assert_ne!(t1, t2);
        j.record(&[t1, t2], &[dirty(b"d/x", flags::CONTENT), dirty(b"dx", 0)])
            .unwrap();
        j.record(
            &[t1],
            &[Change::Rename {
                from: b"d".to_vec(),
                to: b"e/f".to_vec(),
            }],
        )
        .unwrap();
        let paths1: Vec<_> = j
            .pending_batch(t1, None, 10)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            paths1,
            vec![
                b"d".to_vec(),
                b"dx".to_vec(),
                b"e/f".to_vec(),
                b"e/f/x".to_vec()
            ]
        );
        let paths2: Vec<_> = j
            .pending_batch(t2, None, 10)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(paths2, vec![b"d/x".to_vec(), b"dx".to_vec()]);
        let r = j.renames(t1, 10).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].from.as_slice(), r[0].to.as_slice()),
            (&b"d"[..], &b"e/f"[..])
        );
        assert!(j.renames(t2, 10).unwrap().is_empty());
        // Cursor continues after a key.
        let rest = j.pending_batch(t1, Some(b"dx"), 10).unwrap();
        assert_eq!(rest.len(), 2);
    }

    #[test]
    fn index_moves_follow_renames() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let m = meta(Kind::Dir);
        j.index_put_many(
            t,
            &[
                (b"a".to_vec(), m),
                (b"a/b".to_vec(), m),
                (b"ab".to_vec(), m),
            ],
        )
        .unwrap();
        j.complete(
            t,
            &Completion {
                index_moves: vec![(b"a".to_vec(), b"z".to_vec())],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(j.index_get(t, b"a").unwrap().is_none());
        assert!(j.index_get(t, b"a/b").unwrap().is_none());
        assert!(j.index_get(t, b"ab").unwrap().is_some());
        assert!(j.index_get(t, b"z/b").unwrap().is_some());
        j.complete(
            t,
            &Completion {
                index_remove_tree: vec![b"z".to_vec()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(j.index_get(t, b"z").unwrap().is_none());
        assert!(j.index_get(t, b"z/b").unwrap().is_none());
        assert!(j.index_get(t, b"ab").unwrap().is_some());
    }

    #[test]
    fn index_children_are_one_level_only() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let u = j.target_id("u").unwrap();
        let m = meta(Kind::File);
        let keys = [
            "", "a", "a-1", "a/x", "a/x/y", "a/z", "a0", "b", "b/c", "\u{e9}",
        ];
        let e: Vec<(Vec<u8>, Meta)> = keys.iter().map(|k| (k.as_bytes().to_vec(), m)).collect();
        j.index_put_many(t, &e).unwrap();
        j.index_put_many(u, &[(b"q".to_vec(), m)]).unwrap();
        // A reader reused directory after directory (its iterator has no
        // upper bound) answers as a fresh, bounded one.
        let readers = IndexReaders::new(&j);
        let names = |dir: &[u8]| -> Vec<String> {
            let got = j.index_children(t, dir).unwrap();
            assert_eq!(readers.children(t, dir).unwrap().0, got, "{dir:?}");
            got.into_iter()
                .map(|(n, _)| String::from_utf8(n).unwrap())
                .collect()
        };
        assert_eq!(names(b""), ["a", "a-1", "a0", "b", "\u{e9}"]);
        assert_eq!(names(b"a"), ["x", "z"]);
        assert_eq!(names(b"a/x"), ["y"]);
        assert!(names(b"a-1").is_empty());
        assert!(names(b"nope").is_empty());
        assert_eq!(names("\u{e9}".as_bytes()), Vec::<String>::new());
        // Once older than FRESH, it is refreshed: it sees what was written.
        j.index_put_many(t, &[(b"a/w".to_vec(), m)]).unwrap();
        std::thread::sleep(IndexReaders::FRESH + Duration::from_millis(10));
        assert_eq!(names(b"a"), ["w", "x", "z"]);
    }

    /// A reader reused from wherever its last answer left it answers as a
    /// fresh iterator does, in any order of directories.
    #[test]
    fn a_reader_asked_in_any_order_answers_as_a_fresh_one() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let m = meta(Kind::File);
        let mut keys: Vec<String> = Vec::new();
        let mut dirs: Vec<String> = vec![String::new()];
        for i in 0..12 {
            for top in [format!("d{i}"), format!("d{i}-x")] {
                keys.push(top.clone());
                dirs.push(top.clone());
                // 0 to 11 files, and every third directory a subdirectory.
                for f in 0..i {
                    keys.push(format!("{top}/f{f}"));
                }
                if i % 3 == 0 {
                    keys.push(format!("{top}/s"));
                    keys.push(format!("{top}/s/g"));
                    dirs.push(format!("{top}/s"));
                }
            }
        }
        let e: Vec<(Vec<u8>, Meta)> = keys.iter().map(|k| (k.as_bytes().to_vec(), m)).collect();
        j.index_put_many(t, &e).unwrap();
        dirs.sort();
        let mut orders = vec![dirs.clone(), dirs.iter().rev().cloned().collect()];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..4 {
            let mut o = dirs.clone();
            for i in (1..o.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                o.swap(i, (x % (i as u64 + 1)) as usize);
            }
            orders.push(o);
        }
        for order in orders {
            let readers = IndexReaders::new(&j);
            for dir in &order {
                let want = j.index_children(t, dir.as_bytes()).unwrap();
                assert_eq!(
                    readers.children(t, dir.as_bytes()).unwrap().0,
                    want,
                    "{dir:?} in {order:?}"
                );
            }
        }
    }

    #[test]
    fn the_directory_list_follows_the_index() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        let t = j.target_id("t").unwrap();
        let other = j.target_id("other").unwrap();
        let dir = meta(Kind::Dir);
        let file = meta(Kind::File);
        let v = |x: &[&str]| -> Vec<(Vec<u8>, Option<Meta>)> {
            x.iter()
                .map(|s| (s.as_bytes().to_vec(), Some(dir)))
                .collect()
        };
        j.dirlist_put(t, &[(b"a", dir), (b"a/b", dir), (b"c", dir)])
            .unwrap();
        j.dirlist_put(other, &[(b"x", dir)]).unwrap();
        let put = |p: &str, m: Meta| (p.as_bytes().to_vec(), m);
        j.complete(
            t,
            &Completion {
                index_put: vec![
                    put("a/b", dir),
                    put("a/b/d", dir),
                    put("c", file),
                    put("f", file),
                ],
                ..Default::default()
            },
        )
        .unwrap();
        // A directory the index records joins; one replaced by a file leaves.
        assert_eq!(j.dirlist(t).unwrap(), v(&["a", "a/b", "a/b/d"]));
        j.complete(
            t,
            &Completion {
                index_moves: vec![(b"a/b".to_vec(), b"z".to_vec())],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(j.dirlist(t).unwrap(), v(&["a", "z", "z/d"]));
        j.complete(
            t,
            &Completion {
                index_remove_tree: vec![b"z".to_vec()],
                ..Default::default()
            },
        )
        .unwrap();
        j.dirlist_remove(t, &[b"a"]).unwrap();
        assert!(j.dirlist(t).unwrap().is_empty());
        assert_eq!(j.dirlist(other).unwrap(), v(&["x"]));
    }

    #[test]
    fn unknown_schema_is_refused_and_state_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(d.path()).unwrap();
            let t = j.target_id("t").unwrap();
            j.record(&[t], &[dirty(b"x", 0)]).unwrap();
        }
        {
            let j = Journal::open(d.path()).unwrap();
            let t = j.target_id("t").unwrap();
            assert_eq!(j.pending_count(t).unwrap(), 1);
            // seq continues after a reopen
            j.record(&[t], &[dirty(b"y", 0)]).unwrap();
            let b = j.pending_batch(t, Some(b"x"), 1).unwrap();
            assert_eq!(b[0].1.seq, 2);
            j.meta_put(META_SCHEMA, &99u32.to_le_bytes()).unwrap();
        }
        match Journal::open(d.path()) {
            Err(JournalError::UnknownSchema {
                found: 99,
                supported,
            }) => assert_eq!(supported, SCHEMA_VERSION),
            other => panic!("expected UnknownSchema, got {:?}", other.err()),
        }
    }
}
