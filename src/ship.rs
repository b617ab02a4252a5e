//! The shipper: one per target, draining that target's backlog.
//!
//! A round takes the oldest renames (applied in order), then a batch of
//! pending paths (applied in parallel: every apply is idempotent and creates
//! the parents it needs), re-stamps the directories it touched (deepest
//! first: writing into a directory changes its mtime), flushes the target,
//! and only then tells the journal. A path that fails is retried with
//! exponential backoff and never holds back the others.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use rayon::prelude::*;

use crate::filter::Filter;
use crate::fsops::Root;
use crate::journal::{flags, Completion, Journal, JournalError, Pending, TargetId};
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::scan;
use crate::sync::{Compare, ScanStats};
use crate::target::local::DeletePolicy;
use crate::target::{ApplyError, Outcome, Target, Vouch};

const BATCH: usize = 2048;
/// A pending entry: its path and what is pending there.
type BatchEntry = (Vec<u8>, Pending);
/// Pending entries, in path order, as a round reads them.
type Batch = Vec<BatchEntry>;
/// Most [`flags::BULK`] entries (directories) one round applies.
const BULK_PER_ROUND: usize = 256;
/// Renames a round applies at most (before its batch of entries).
const RENAMES_PER_ROUND: usize = 256;
/// Files of BULK directories applied between two chances to commit.
const BULK_WAVE: usize = 16384;
/// Longest run of same-directory entries one task applies.
pub const GROUP: usize = 64;
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// First and longest wait of a path that does not fit in what is free on
/// the target, unless that room is free sooner (see `Shipper::due`).
const SPACE_WAIT_MIN: Duration = Duration::from_secs(60);
const SPACE_WAIT_MAX: Duration = Duration::from_secs(900);
/// How many failing paths `status` names.
const FAILING_SHOWN: usize = 10;
/// Longest time applied changes wait for their syncfs + journal commit.
const GROUP_COMMIT: Duration = Duration::from_secs(1);

/// Counters of one shipper (this process run).
#[derive(Default, Debug)]
pub struct ShipStats {
    pub copied: AtomicU64,
    pub unchanged: AtomicU64,
    pub deleted: AtomicU64,
    pub renamed: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Paths currently waiting for a retry.
    pub failing: AtomicU64,
    /// What was applied of this run's startup scan (see [`crate::progress`]).
    pub initial: crate::progress::Applied,
}

/// The index entries of commits handed to the flusher thread and not yet
/// in the journal. A round reads what the index names at its paths (to
/// vouch for look-alikes, to doubt a removal first: see
/// [`crate::target::Vouch`]); read from the journal alone, a copy made a
/// round earlier was not named yet, and its removal now went undoubted
/// (the swap storm with crashes: the earlier commit landed, the removal's
/// did not, and the index named a file the target had lost).
#[derive(Default)]
pub struct Inflight {
    handed: u64,
    /// The last commit the flusher made.
    committed: Arc<AtomicU64>,
    /// Path → the commit that changes it, and what the index names there
    /// after it (`None`: nothing).
    at: HashMap<Vec<u8>, (u64, Option<crate::meta::Meta>)>,
}

impl Inflight {
    /// `c` goes to the flusher: returns its number.
    fn hand(&mut self, c: &Completion) -> u64 {
        self.handed += 1;
        let n = self.handed;
        for (p, m) in c.index_put.iter().chain(&c.index_new) {
            self.at.insert(p.clone(), (n, Some(*m)));
        }
        // A subtree removed or moved: its paths below are read from the
        // journal (at worst a removal doubted in vain, a copy made again).
        for p in c.index_remove.iter().chain(&c.index_remove_tree) {
            self.at.insert(p.clone(), (n, None));
        }
        for (from, to) in &c.index_moves {
            self.at.insert(from.clone(), (n, None));
            self.at.insert(to.clone(), (n, None));
        }
        n
    }

    /// What the index names at `keys`, given `stored`, the journal's.
    fn held(
        &mut self,
        keys: &[&[u8]],
        stored: Vec<Option<crate::meta::Meta>>,
    ) -> Vec<Option<crate::meta::Meta>> {
        let done = self.committed.load(Ordering::Acquire);
        self.at.retain(|_, (n, _)| *n > done);
        keys.iter()
            .zip(stored)
            .map(|(k, m)| match self.at.get(*k) {
                Some((_, now)) => *now,
                None => m,
            })
            .collect()
    }
}

pub struct Shipper {
    pub t: TargetId,
    pub name: String,
    /// The other names of hard-linked files changed live (see
    /// [`crate::links`]).
    pub links: crate::links::Links,
    pub journal: Arc<Journal>,
    pub source: Arc<Root>,
    pub target: Arc<Target>,
    pub filter: Arc<Filter>,
    pub policy: DeletePolicy,
    pub owner: bool,
    pub delay: Duration,
    pub wake: Receiver<()>,
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<ShipStats>,
    /// Set by the startup scan when it has enqueued everything.
    pub scan_done: Arc<AtomicBool>,
    /// Cuts the batching `delay` short (see [`Hurry`]).
    pub hurry: Hurry,
    pub scan_stats: Arc<ScanStats>,
    pub retry: HashMap<Vec<u8>, Retry>,
    pub cursor: Option<Vec<u8>>,
    pub reported_initial: bool,
    /// Applied but not yet committed (see [`Shipper::flush`]).
    pub acc: Completion,
    /// Handed to the flusher, not yet committed (see [`Inflight`]).
    pub inflight: Inflight,
    pub acc_wrote: bool,
    pub last_flush: Instant,
    /// To the flusher thread, while [`Shipper::run`] runs.
    pub flush_tx: Option<crossbeam_channel::Sender<FlushJob>>,
    /// Live status for `drmirror status`.
    pub board: Arc<crate::status::Board>,
    pub last_report: Option<Instant>,
    /// Thread pool for subtree scans (see [`crate::daemon`]).
    pub scan_pool: Arc<rayon::ThreadPool>,
    pub report_every: Duration,
    /// Caps warning lines when many paths fail at once (a target outage).
    pub log_limit: LogLimit,
    /// False while target writes fail (and nothing succeeds).
    pub target_up: bool,
    /// For a remote target: more threads than cores, each waiting on its
    /// own batch, so that several batches are in flight at once.
    pub io_pool: Option<Arc<rayon::ThreadPool>>,
    /// This boot's id, for a local target whose copies the initial sync
    /// may record before they are flushed (see [`crate::durability`]).
    /// A remote target's receiver reports its own.
    pub boot_id: Option<Vec<u8>>,
    /// A remote target's [`crate::target::remote::RemoteTarget::boot_epoch`]
    /// counter at the last flush.
    pub boot_gen: u64,
    /// [`Journal::seq_now`] when this run started (see [`flags::ABSENT`]).
    pub run_seq0: u64,
    /// Rounds started, numbering the doubts each records
    /// (see [`Journal::doubt_put`]).
    pub rounds: u64,
    /// When the initial sync's progress was last published and logged.
    pub progress_ticks: crate::progress::Ticks,
    /// The initial sync's progress on a terminal (`run` in the foreground),
    /// from its first publication to its end.
    pub progress_bar: Option<indicatif::ProgressBar>,
}

/// Batches in flight to a remote target (threads of its I/O pool).
pub const REMOTE_IN_FLIGHT: usize = 8;

/// At most `LOG_BURST` warnings per `LOG_WINDOW`; then one line saying how
/// many were held back (all of them stay at debug level and in the metrics).
#[derive(Debug)]
pub struct LogLimit {
    window: Instant,
    shown: u32,
    held: u64,
}

const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(30);

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit {
            window: Instant::now(),
            shown: 0,
            held: 0,
        }
    }
}

impl LogLimit {
    pub fn allow(&mut self) -> bool {
        if self.window.elapsed() >= LOG_WINDOW {
            if self.held > 0 {
                tracing::warn!(
                    "{} more failures in the last {}s were not logged (see drmirror_errors_total)",
                    self.held,
                    LOG_WINDOW.as_secs()
                );
            }
            *self = LogLimit::default();
        }
        if self.shown < LOG_BURST {
            self.shown += 1;
            true
        } else {
            self.held += 1;
            false
        }
    }
}

/// What one round applied, for the metrics.
#[derive(Default)]
struct Applied {
    copied: u64,
    deleted: u64,
    mkdir: u64,
    bytes: u64,
}

/// A path that failed and waits before its next attempt.
#[derive(Debug, Clone)]
pub struct Retry {
    at: Instant,
    attempts: u32,
    /// The pending entry's sequence number at the failure: a newer change
    /// to the path (a chmod that makes it readable, say) retries at once.
    seq: Option<u64>,
    /// The last error, for `status`.
    why: String,
    /// Failed for want of space on the target, where it does not fit now:
    /// due again as soon as this many bytes are free there (or after its
    /// long backoff, for a filesystem whose free figure understates what
    /// fits: compression, deduplication).
    need: Option<u64>,
}

/// During which boot of the target's machine a commit's copies were made.
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyBoot {
    /// The target does not say: only a flush makes its copies safe.
    Unknown,
    /// All during this boot.
    Boot(Vec<u8>),
    /// The target's machine restarted among them: some may be lost, and a
    /// flush now covers only those of its current boot.
    Mixed,
}

/// During which boot a remote target's copies since the last flush were
/// applied: `last_gen` is its boot epoch at that flush, `gen` and `boot`
/// now (see [`crate::target::remote::RemoteTarget::boot_epoch`]).
fn remote_apply_boot(last_gen: u64, gen: u64, boot: Option<Vec<u8>>) -> ApplyBoot {
    match (last_gen == gen, boot) {
        (false, _) => ApplyBoot::Mixed,
        (true, Some(b)) => ApplyBoot::Boot(b),
        (true, None) => ApplyBoot::Unknown,
    }
}

/// Work for the flusher thread.
pub enum FlushJob {
    /// Record `c` as applied; `wrote`: after flushing the target, unless
    /// `defer` (see [`crate::durability`]).
    Commit {
        c: Box<Completion>,
        wrote: bool,
        defer: bool,
        boot: ApplyBoot,
        /// Its [`Inflight`] number.
        n: u64,
    },
    /// Flush the target if copies were recorded unflushed.
    Settle,
    /// The backlog drained: drop the journal's tombstones if many gathered.
    Compact,
    Barrier(crossbeam_channel::Sender<Result<(), JournalError>>),
}

/// What a flush of the target did.
enum Flushed {
    /// With the boot id of the target's machine when it is another one
    /// that reports it.
    Done(Option<Vec<u8>>),
    /// The target could not be asked: nothing is known of its disk.
    Unreachable,
    /// Writeback failed: what was applied may never reach the disk.
    Failed,
}

fn sync_target(target: &Target, name: &str) -> Flushed {
    let t0 = Instant::now();
    let r = target.sync();
    tracing::debug!(target = %name, ms = t0.elapsed().as_millis() as u64, "syncfs");
    match r {
        Ok(boot) => Flushed::Done(boot),
        Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
            tracing::debug!(target = %name, "cannot flush: {e}");
            Flushed::Unreachable
        }
        Err(e) => {
            // Writeback failed (EIO, ENOSPC on thin or network storage):
            // what was applied may not be on disk. Nothing is recorded as
            // done; the entries stay pending and are applied again.
            metrics::counter!("drmirror_errors_total", "kind" => "target_sync").increment(1);
            tracing::error!(target = %name, "syncfs failed: {e}; the last changes will be applied again");
            Flushed::Failed
        }
    }
}

/// See [`crate::failpoints::Hook::AbortBeforeCommit`].
static ABORT_BEFORE_COMMIT: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| crate::failpoints::set(crate::failpoints::Hook::AbortBeforeCommit));

/// An entry of a round and what applying it came to.
type Applying<'b> = (&'b Vec<u8>, &'b Pending, Result<Outcome, ApplyError>);
/// What a round's applies add up to before it commits (see
/// [`Shipper::record`]).
#[derive(Default)]
struct RoundAcc {
    c: Completion,
    /// Directories whose mtime the round moved: re-stamped.
    touched: BTreeSet<Vec<u8>>,
    /// Whether anything was written to the target.
    wrote: bool,
    /// Subtrees to compare: (path, flags, created by this round).
    scans: Vec<(Vec<u8>, u8, bool)>,
    /// Directories to copy whole.
    bulk: Vec<BulkDir>,
    applied: Applied,
    target_errors: u64,
    /// Files a live change copied (their other hard-linked names follow).
    live_files: Vec<Vec<u8>>,
}

/// What [`Shipper::apply_todo`] returns: the results, the entries the
/// index held as directories, and those of them doubted.
type Applied3<'b> = (Vec<Applying<'b>>, HashSet<&'b [u8]>, HashSet<&'b [u8]>);

/// The flusher thread's state: commits in order, flushing the target
/// before each, or under the unflushed note of [`crate::durability`].
struct Flusher {
    journal: Arc<Journal>,
    target: Arc<Target>,
    t: TargetId,
    name: String,
    /// The journal's unflushed note for the target: the boot during which
    /// copies were recorded unflushed.
    note: Option<Vec<u8>>,
    /// A flush failed while the note was set: it stays, whatever the later
    /// flushes do (the data of the failed writeback is gone).
    poisoned: bool,
    /// The [`Inflight`] number of the last commit made.
    committed: Arc<AtomicU64>,
}

impl Flusher {
    fn commit(
        &mut self,
        c: &Completion,
        wrote: bool,
        defer: bool,
        boot: &ApplyBoot,
    ) -> Result<(), JournalError> {
        if wrote {
            match (boot, defer) {
                (ApplyBoot::Boot(b), true) => self.note(b)?,
                _ => {
                    let Some(synced) = self.sync()? else {
                        return Ok(());
                    };
                    // A flush covers what its boot applied, not what a
                    // boot of the target's machine lost before it.
                    let covered = match (boot, &synced) {
                        (ApplyBoot::Mixed, _) => false,
                        (ApplyBoot::Boot(b), Some(s)) => b == s,
                        _ => true,
                    };
                    if !covered {
                        tracing::warn!(
                            target = %self.name,
                            "the target's machine restarted while changes were applied to it: they are applied again"
                        );
                        return Ok(());
                    }
                }
            }
        }
        self.journal.complete(self.t, c)
    }

    /// Copies made during boot `b` are about to be recorded unflushed.
    fn note(&mut self, b: &[u8]) -> Result<(), JournalError> {
        match self.note.clone() {
            Some(n) if n == b => return Ok(()),
            Some(n) => self.lost(&n, b)?,
            None => {}
        }
        self.journal.set_unflushed(self.t, b)?;
        self.note = Some(b.to_vec());
        Ok(())
    }

    /// The target's machine restarted while copies recorded unflushed
    /// during boot `old` may not have reached its disk (or a flush failed):
    /// the index may vouch for copies the target lost. It is forgotten and
    /// the whole tree compared with the target again, as at an initial
    /// sync (what survived is found equal and not copied).
    fn lost(&mut self, old: &[u8], now: &[u8]) -> Result<(), JournalError> {
        tracing::warn!(
            target = %self.name,
            before = %String::from_utf8_lossy(old),
            now = %String::from_utf8_lossy(now),
            "the target's machine restarted (or a flush failed) before the last copies to it were on its disk: comparing the whole target with the source again"
        );
        self.journal.forget_target(self.t)?;
        self.journal
            .enqueue(self.t, &[(Vec::new(), flags::RECURSIVE | flags::LIVE)])?;
        self.note = None;
        self.poisoned = false;
        Ok(())
    }

    /// syncfs; `None` if it failed, else the boot id it reported (see
    /// [`Target::sync`]). A flush that covers copies recorded unflushed
    /// clears their note, and one that fails turns the note into one no
    /// boot matches: those copies may never reach the disk, and the next
    /// start compares the whole target again. A flush of another boot than
    /// the note's comes too late: see [`Flusher::lost`].
    fn sync(&mut self) -> Result<Option<Option<Vec<u8>>>, JournalError> {
        let t0 = Instant::now();
        let flushed = sync_target(&self.target, &self.name);
        let synced = match &flushed {
            Flushed::Done(b) => Some(b.clone()),
            _ => None,
        };
        let Some(note) = self.note.clone().filter(|_| !self.poisoned) else {
            return Ok(synced);
        };
        match flushed {
            Flushed::Done(Some(now)) if now != note => self.lost(&note, &now)?,
            // A receiver that no longer says which boot it is in cannot
            // vouch for what an earlier one was given.
            Flushed::Done(None) if matches!(self.target.as_ref(), Target::Remote(_)) => {
                self.lost(&note, b"(not reported)")?
            }
            Flushed::Done(_) => {
                self.journal.clear_unflushed(self.t)?;
                self.note = None;
                tracing::info!(
                    target = %self.name,
                    ms = t0.elapsed().as_millis() as u64,
                    "target flushed: every copy recorded so far is on its disk"
                );
            }
            // The note stays: the next flush tells which boot it reached.
            Flushed::Unreachable => {}
            Flushed::Failed => {
                self.journal.set_unflushed(self.t, b"writeback-failed")?;
                self.note = Some(b"writeback-failed".to_vec());
                self.poisoned = true;
            }
        }
        Ok(synced)
    }
}

/// A wake for changes that have all gathered already, so that the shipper
/// starts its round without the batching `delay`, or ends that wait early:
/// what a restart's first pass (changed directories) enqueued, and the
/// events that queued in the kernel while capture was being set up (the
/// watches of a large tree take a good part of a second to restore).
#[derive(Clone)]
pub struct Hurry {
    tx: crossbeam_channel::Sender<()>,
    rx: Receiver<()>,
}

impl Default for Hurry {
    fn default() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Self { tx, rx }
    }
}

impl Hurry {
    /// Sends along with the shipper's wake, not instead of it.
    pub fn set(&self) {
        let _ = self.tx.try_send(());
    }

    fn take(&self) -> bool {
        self.rx.try_recv().is_ok()
    }

    /// Waits up to `d`, less if hurried meanwhile.
    fn wait(&self, d: Duration) {
        let _ = self.rx.recv_timeout(d);
    }
}

/// How long the flusher waits, with no commit or flush to do, before it
/// flushes on its own if copies are recorded unflushed: a flush that found
/// the target unreachable (at the end of an initial sync, say) is retried
/// even if nothing else is applied, so the note is cleared once the target
/// is back, and a restart of the DR machine meanwhile is found.
const SETTLE_RETRY: Duration = Duration::from_secs(10);

fn flusher_loop(rx: crossbeam_channel::Receiver<FlushJob>, mut f: Flusher) {
    let mut failed: Option<JournalError> = None;
    // Only commits and flushes count as activity: an idle shipper still
    // sends a barrier and a compaction check every round (every second),
    // which must not put the retry off for ever.
    let mut active = Instant::now();
    loop {
        let job = match rx.recv_deadline(active + SETTLE_RETRY) {
            Ok(job) => job,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                active = Instant::now();
                if f.poisoned {
                    continue;
                }
                FlushJob::Settle
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        };
        if matches!(job, FlushJob::Commit { .. } | FlushJob::Settle) {
            active = Instant::now();
        }
        match job {
            FlushJob::Commit {
                c,
                wrote,
                defer,
                boot,
                n,
            } => {
                if failed.is_none() {
                    match f.commit(&c, wrote, defer, &boot) {
                        Ok(()) => f.committed.store(n, Ordering::Release),
                        Err(e) => failed = Some(e),
                    }
                }
            }
            FlushJob::Settle => {
                if failed.is_none() && f.note.is_some() {
                    if let Err(e) = f.sync() {
                        failed = Some(e);
                    }
                }
            }
            FlushJob::Compact => {
                if failed.is_none() {
                    if let Err(e) = compact_churned(&f.journal, &f.name) {
                        failed = Some(e);
                    }
                }
            }
            FlushJob::Barrier(ack) => {
                let _ = ack.send(match failed.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
        }
    }
}

/// Deletions in the journal's queues after which a drained backlog
/// compacts them. Every scan of a queue steps over the tombstones still in
/// its memtable (the check for an empty backlog after each commit, the
/// next batch), so its cost grows with them until the compaction (which
/// flushes the memtable first) drops them: at 100,000, a steady 200
/// changes a second took the daemon from 0.4 to 5 ms of CPU per change
/// over ~4 minutes, then back (`tools/bench-soak`). A compaction of a
/// drained queue is a few milliseconds.
const COMPACT_AFTER_DELETES: u64 = 10_000;

fn compact_churned(journal: &Journal, name: &str) -> Result<(), JournalError> {
    let t0 = Instant::now();
    if journal.compact_churned(COMPACT_AFTER_DELETES)? {
        tracing::debug!(target = %name, ms = t0.elapsed().as_millis() as u64, "journal queues compacted");
    }
    Ok(())
}

/// A [`flags::BULK`] entry whose directory a round put in place.
struct BulkDir {
    path: Vec<u8>,
    seq: u64,
    /// The apply created it: its entries are copied without looking there.
    created: bool,
    flags: u8,
}

impl BulkDir {
    /// Where its entry came from (live or startup), which its files'
    /// entries keep: it decides whether a deletion is allowed.
    fn origin(&self) -> u8 {
        self.flags & (flags::LIVE | flags::STARTUP)
    }
}

/// The paths a round removed from the target.
fn removed_in<'b>(results: &[Applying<'b>]) -> Vec<&'b [u8]> {
    results
        .iter()
        .filter(|(_, _, r)| matches!(r, Ok(Outcome::Deleted)))
        .map(|(p, _, _)| p.as_slice())
        .collect()
}

/// Whether what the apply of `p` wrote or found may be gone: an ancestor
/// was removed in the same round, its entry applied beside `p`'s (groups of
/// siblings run in parallel), maybe after it. Committed, the index named
/// files the target had lost with the directory (the crash storm test:
/// `tmpx` deleted while the source lacked it, its files copied while the
/// source had it again).
fn overtaken(p: &[u8], r: &Result<Outcome, ApplyError>, removed: &[&[u8]]) -> bool {
    matches!(
        r,
        Ok(Outcome::Copied { .. } | Outcome::Unchanged { .. } | Outcome::Dir { .. })
    ) && removed
        .iter()
        .any(|d| d.len() < p.len() && paths::is_within(p, d))
}

/// What [`Shipper::bulk_file`] found of one file.
#[derive(Default)]
struct BulkFile {
    wrote: bool,
    target_error: bool,
    unreachable: bool,
}

/// Entries (paths and flags) of one BULK directory (its index in the
/// round's list), applied as one group.
type BulkTask = (usize, Vec<(Vec<u8>, u8)>);

/// What a round did.
struct Round {
    /// Entries were processed (more may be waiting right away).
    worked: bool,
    /// Nothing at all is pending any more, apart from paths in backoff.
    drained: bool,
}

impl Shipper {
    fn flusher(&self, note: Option<Vec<u8>>) -> Flusher {
        Flusher {
            journal: self.journal.clone(),
            target: self.target.clone(),
            t: self.t,
            name: self.name.clone(),
            note,
            poisoned: false,
            committed: self.inflight.committed.clone(),
        }
    }

    /// Runs until `stop` is set; returns a journal error, which is fatal.
    pub fn run(mut self) -> Result<(), JournalError> {
        let (tx, rx) = crossbeam_channel::bounded(2);
        // A local target's note of this boot: only the daemon died since;
        // the next flush covers those copies too (one of another boot was
        // dealt with before the shippers started). A remote target's note
        // meets the receiver's boot at the first commit or flush.
        let f = self.flusher(self.journal.unflushed(self.t)?);
        std::thread::scope(|s| {
            let flusher = std::thread::Builder::new()
                .name(format!("flush-{}", self.t))
                .spawn_scoped(s, move || flusher_loop(rx, f))
                .map_err(|e| {
                    JournalError::Corrupt(format!("cannot start the flusher thread: {e}"))
                })?;
            self.flush_tx = Some(tx);
            let r = self.serve();
            // A clean stop leaves nothing unflushed.
            let settled = self.settle();
            let f = self.flush_wait();
            self.flush_tx = None;
            let _ = flusher.join();
            r.and(settled).and(f)
        })
    }

    fn serve(&mut self) -> Result<(), JournalError> {
        while !self.stop.load(Ordering::Relaxed) {
            // A remote target that is down: wait for the next connection
            // attempt without touching the backlog (it stays in the
            // journal; capture goes on).
            if let Err(wait) = self.target.ready() {
                if self.target_up {
                    self.target_up = false;
                    self.report(true)?;
                }
                self.report(false)?;
                let _ = self
                    .wake
                    .recv_timeout(wait.clamp(Duration::from_millis(50), Duration::from_secs(1)));
                continue;
            }
            // Read before the round: a scan that finished before the round
            // began has all its entries visible to it.
            let scan_was_done = self.scan_done.load(Ordering::Acquire);
            let r = self.round()?;
            self.report(false)?;
            if r.drained && scan_was_done && !self.reported_initial {
                self.report_initial();
                // `status` says so at once, with the backlog it drained.
                self.report(true)?;
                self.settle()?;
            }
            if r.drained {
                self.compact()?;
                if scan_was_done && self.retry.is_empty() {
                    self.trust_again()?;
                }
            }
            if r.worked {
                continue;
            }
            let wait = self
                .retry
                .values()
                .map(|r| r.at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            if self.wake.recv_timeout(wait).is_ok() {
                // Let a burst gather into one batch, unless what woke the
                // shipper (or comes while it waits) has gathered already.
                if !self.hurry.take() {
                    self.hurry.wait(self.delay);
                }
                while self.wake.try_recv().is_ok() {}
            }
        }
        Ok(())
    }

    /// Once the startup scan compared everything and its entries are
    /// applied, look-alikes in subtrees a crash left distrusted (see
    /// `journal::trust`, rule 2) were all compared by content or copied:
    /// the distrust ends.
    fn trust_again(&mut self) -> Result<(), JournalError> {
        if !self.journal.trust(self.t)?.trusts_all() {
            tracing::info!(target = %self.name, "subtrees a crash left in doubt are compared and in sync");
            self.journal.distrust_clear(self.t)?;
        }
        Ok(())
    }

    /// Publishes lag, backlog and health (metrics and status), at most once
    /// a second unless `now`.
    fn report(&mut self, now: bool) -> Result<(), JournalError> {
        if !self.reported_initial && self.progress_ticks.publish_due() {
            self.publish_progress();
        }
        if !now
            && self
                .last_report
                .is_some_and(|t| t.elapsed() < self.report_every)
        {
            return Ok(());
        }
        let t0 = Instant::now();
        self.last_report = Some(t0);
        let st = self
            .journal
            .backlog_stats(self.t, self.journal.backlog_count_limit())?;
        self.journal.note_backlog(self.t, &st);
        // Counting a large backlog walks it: keep that under ~2% of the
        // shipper's time (once a second while it is small).
        self.report_every = (t0.elapsed() * 50).max(Duration::from_secs(1));
        // The lag is published by the daemon's pulse, from the clock and
        // what this walk found (see `crate::pulse`).
        let name = self.name.clone();
        metrics::gauge!("drmirror_backlog_entries", "target" => name.clone())
            .set(st.entries as f64);
        metrics::gauge!("drmirror_backlog_bytes", "target" => name.clone()).set(st.bytes as f64);
        metrics::gauge!("drmirror_target_up", "target" => name.clone()).set(if self.target_up {
            1.0
        } else {
            0.0
        });
        let (up, failing, done) = (
            self.target_up,
            self.retry.len() as u64,
            self.reported_initial,
        );
        metrics::gauge!("drmirror_initial_sync_in_progress", "target" => name.clone())
            .set(if done { 0.0 } else { 1.0 });
        let failing_shown = self.failing_shown();
        let not_kept: Vec<String> = self
            .target
            .refused()
            .iter()
            .map(|k| k.to_string())
            .collect();
        if !self.target_up {
            if let Some(why) = self.target.unreachable_reason() {
                self.show_error(why);
            }
        }
        self.board.update_target(&name, |t| {
            t.backlog_entries = st.entries;
            t.backlog_bytes = st.bytes;
            t.up = up;
            t.failing_paths = failing;
            t.failing = failing_shown;
            t.initial_sync_done = done;
            t.not_kept = not_kept;
            // Working again: the last error is history.
            if up && failing == 0 && t.last_error.is_some() && t.last_error_resolved_unix.is_none()
            {
                t.last_error_resolved_unix = Some(crate::status::unix_now());
            }
        });
        Ok(())
    }

    /// The other names of the hard-linked files among `changed` whose
    /// index entry no longer matches the source (see [`crate::links`]).
    fn stale_links(&self, changed: &[Vec<u8>]) -> Vec<Vec<u8>> {
        if changed.is_empty() {
            return Vec::new();
        }
        let (journal, t) = (&self.journal, self.t);
        self.links
            .stale_others(&self.source, &self.filter, changed, |rel, m| {
                journal.index_get(t, rel).ok().flatten().as_ref() != Some(m)
            })
    }

    /// The first sequence number whose entries count in the initial sync's
    /// progress: this run's, from the startup scan's full walk on (see
    /// `ScanStats::walk_seq0`).
    fn counts_from(&self) -> u64 {
        self.run_seq0
            .max(self.scan_stats.walk_seq0.load(Ordering::Acquire))
    }

    /// The initial sync's progress now (see [`crate::progress`]).
    fn progress(&self) -> crate::progress::Progress {
        self.stats
            .failing
            .store(self.retry.len() as u64, Ordering::Relaxed);
        crate::progress::Progress::of(
            &self.scan_stats,
            &self.stats.initial,
            self.scan_done.load(Ordering::Acquire),
            self.retry.len() as u64,
        )
    }

    /// Puts the progress in the metrics (`status` reads it itself: see
    /// [`crate::status::Board::track_sync`]); logs it every
    /// [`crate::progress::LOG_EVERY`].
    fn publish_progress(&mut self) -> crate::progress::Progress {
        let p = self.progress();
        crate::progress::publish(&self.name, &p);
        let name = &self.name;
        self.progress_bar
            .get_or_insert_with(|| {
                crate::progress::spinner(&format!("{{spinner}} initial sync of {name}: {{msg}}"))
            })
            .set_message(p.summary());
        if self.progress_ticks.log_due() {
            tracing::info!(
                "initial sync running target={}: {} ({}{})",
                self.name,
                p.summary(),
                p.counters(),
                if p.totals_final {
                    ""
                } else {
                    ", startup scan still counting"
                }
            );
        }
        p
    }

    fn report_initial(&mut self) {
        self.reported_initial = true;
        // Whatever is left there was never applied as a BULK directory.
        crate::locks::lock(&self.scan_stats.covered_dirs).clear();
        let p = self.publish_progress();
        if let Some(pb) = self.progress_bar.take() {
            pb.finish_and_clear();
        }
        tracing::info!(
            "initial sync complete target={} {} bytes={} of {}",
            self.name,
            p.counters(),
            p.bytes_done,
            p.bytes_total,
        );
    }

    /// Whether `path` (its pending entry at `seq`) may be tried now; `free`:
    /// the bytes free on a local target, if a path waits for space.
    fn due(&self, path: &[u8], seq: u64, now: Instant, free: Option<u64>) -> bool {
        self.retry.get(path).is_none_or(|r| {
            r.at <= now
                || r.seq.is_some_and(|s| s != seq)
                || r.need.zip(free).is_some_and(|(n, f)| f >= n)
        })
    }

    /// Schedules the next attempt at `p` with exponential backoff.
    /// A path that waits for room (`need`) starts its backoff at
    /// SPACE_WAIT_MIN: it goes as soon as the room is free, and a file that
    /// cannot fit is not written, or sent over the wire, again and again.
    fn schedule_retry(
        &mut self,
        p: &[u8],
        seq: Option<u64>,
        why: String,
        need: Option<u64>,
    ) -> u32 {
        let attempts = self.retry.get(p).map(|r| r.attempts + 1).unwrap_or(1);
        let (first, cap) = match need {
            Some(_) => (SPACE_WAIT_MIN, SPACE_WAIT_MAX),
            None => (RETRY_MIN, RETRY_MAX),
        };
        let backoff = (first * 2u32.saturating_pow(attempts.min(16) - 1)).min(cap);
        self.retry.insert(
            p.to_vec(),
            Retry {
                at: Instant::now() + backoff,
                attempts,
                seq,
                why,
                need,
            },
        );
        attempts
    }

    /// The failing paths `status` names: the first few, with their errors.
    fn failing_shown(&self) -> Vec<String> {
        let mut v: Vec<(&Vec<u8>, &Retry)> = self.retry.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        let now = Instant::now();
        v.into_iter()
            .take(FAILING_SHOWN)
            .map(|(p, r)| {
                let next = r.at.saturating_duration_since(now).as_secs();
                let (path, why, n) = (paths::display(p), &r.why, r.attempts);
                format!("{path}: {why} (attempt {n}, next within {next}s)")
            })
            .collect()
    }

    /// How to retry path `p`, which failed for want of space: the room it
    /// waits for, if it does not fit in what is free on the target now (its
    /// size, or its allocated bytes if a sparse file; asked every round
    /// while a path waits, of a remote target's receiver too), and a note
    /// for the message. One that fits now met a disk another copy was
    /// filling: it is retried on the short backoff of any failure.
    fn space_retry(&self, p: &[u8]) -> (Option<u64>, String) {
        let bytes = self.source.space(p).ok().flatten().unwrap_or(0);
        match self.target_free() {
            Some(f) if f >= bytes => (None, format!("needs {bytes} bytes, {f} free")),
            Some(f) => (
                Some(bytes),
                format!("needs {bytes} bytes, {f} free; retried when they are"),
            ),
            None => (
                Some(bytes),
                format!("needs {bytes} bytes; retried when they are free"),
            ),
        }
    }

    /// The bytes free on the target (None if it cannot tell: a remote
    /// target that is down).
    fn target_free(&self) -> Option<u64> {
        self.target.free_bytes().ok()
    }

    /// Sets the attributes of the directories a round `touched` on the
    /// target (deepest first, in one call: one batch for a remote target),
    /// as the source has them now, and indexes them.
    ///
    /// One gone from its path since the apply (renamed away, removed), or
    /// whose attributes could not be set, keeps on the target the mtime the
    /// round's writes gave it: its index entry, this round's own from its
    /// apply included, must vouch for nothing
    /// ([`crate::meta::Meta::unverified`]). It
    /// did vouch: renamed on with an ancestor, the entry stood for a
    /// directory whose mtime differed, and no compare looked (the churn
    /// test's `…/sub (metadata)` divergences). Not dropped: the index must
    /// still account for all the target holds, or a compare that finds
    /// deletions in it misses the directory once the source loses it (the
    /// churn test's `(extra)` divergences, with a first version of this).
    /// Unless the round removed it from the target: restamped or put back,
    /// the index named a directory the target no longer held (the crash
    /// storm test: `tmpx`, deleted with the round's entry while the source
    /// still had it, came back as the round's last write).
    fn restamp(&mut self, touched: &BTreeSet<Vec<u8>>, c: &mut Completion, wrote: &mut bool) {
        let mut dirs: Vec<(Vec<u8>, crate::meta::Meta)> = Vec::new();
        let mut unstamped = Vec::new();
        for d in touched.iter().rev() {
            // Removed by this round: a copy beside it may have made it again
            // (its entry is applied again, see `overtaken`), but this round
            // vouches for nothing there.
            if self.filter.excluded(d, true) || c.removes(d) {
                continue;
            }
            match self.source.lstat(d) {
                Ok(Some(m)) if m.kind == Kind::Dir => dirs.push((d.clone(), m)),
                _ => unstamped.push(d.clone()),
            }
        }
        let set = self.target.set_attrs_many(&self.source, &dirs);
        for ((d, m), r) in dirs.into_iter().zip(set) {
            match r {
                Ok(()) => {
                    tracing::trace!(path = %paths::display(&d), "dir attrs set");
                    c.index_put.push((d, m));
                    *wrote = true;
                }
                Err(e) => {
                    tracing::debug!("{e}");
                    unstamped.push(d);
                }
            }
        }
        for d in unstamped {
            let own = c.index_put.iter().rev().find(|(p, _)| *p == d);
            let known = match own {
                Some(&(_, m)) => Some(m),
                None => {
                    let stored = self.journal.index_get(self.t, &d).ok().flatten();
                    self.inflight.held(&[d.as_slice()], vec![stored])[0]
                }
            };
            c.index_put.retain(|(p, _)| *p != d);
            if let Some(m) = known {
                c.index_put.push((d, m.unverified()));
            }
        }
    }

    /// The next batch of pending entries from the cursor on, and whether
    /// it is full (more follow it); the cursor moves past it.
    fn next_batch(&mut self) -> Result<(Batch, bool), JournalError> {
        let mut batch = self
            .journal
            .pending_batch(self.t, self.cursor.as_deref(), BATCH)?;
        let mut full = batch.len() == BATCH;
        // A BULK entry stands for a whole directory of files: a round takes
        // at most BULK_PER_ROUND of them, so that the names it lists stay
        // bounded.
        if let Some((cut, _)) = batch
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.flags & flags::BULK != 0)
            .nth(BULK_PER_ROUND)
        {
            batch.truncate(cut);
            full = true;
        }
        self.cursor = if full {
            batch.last().map(|(p, _)| p.clone())
        } else {
            None
        };
        Ok((batch, full))
    }

    /// Applies the oldest pending renames, in order, and commits them on
    /// their own (their index moves must not be reordered). Returns whether
    /// there were any, and `cut`: entries recorded from then on wait for
    /// the renames not applied yet.
    fn apply_renames(
        &mut self,
        round: u64,
        touched: &mut BTreeSet<Vec<u8>>,
    ) -> Result<(bool, Option<u64>), JournalError> {
        let mut c = Completion::default();
        let mut wrote = false;
        let renames = self.journal.renames(self.t, RENAMES_PER_ROUND)?;
        // Entries recorded after a rename this round does not apply wait
        // for it: applied before it, a copy to its destination would be
        // overwritten by the rename of the older file (what fsstress found
        // when more than a round's worth of renames were pending and the
        // destination's entry sorted into an earlier batch than the
        // source's: the destination kept the old content). Entries are
        // applied only if older than `cut`, the first rename not applied.
        let mut cut = (renames.len() == RENAMES_PER_ROUND)
            .then(|| renames.last().map(|r| r.seq + 1))
            .flatten();
        let sides: Vec<&[u8]> = renames
            .iter()
            .flat_map(|r| [r.from.as_slice(), r.to.as_slice()])
            .collect();
        self.journal.doubt_put(self.t, &sides, round)?;
        // From here until their index moves are committed, a startup scan's
        // claims are not written (see `journal::trust`, rule 1).
        let trust = self.journal.trust(self.t)?;
        let _under_way = (!renames.is_empty()).then(|| trust.renames_begin());
        for r in &renames {
            self.journal.distrust_carry(self.t, &r.from, &r.to)?;
            let applied = self.target.rename(&r.from, &r.to);
            tracing::trace!(target = %self.name, from = %paths::display(&r.from), to = %paths::display(&r.to), seq = r.seq, outcome = ?applied, "rename");
            match applied {
                Ok(true) => {
                    self.stats.renamed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("drmirror_applied_total", "target" => self.name.clone(), "op" => "rename").increment(1);
                    c.index_moves.push((r.from.clone(), r.to.clone()));
                    wrote = true;
                    if !self.scan_done.load(Ordering::Acquire) {
                        // The startup scan may have missed the subtree in
                        // flight (neither under `from` nor yet under `to`).
                        c.requeue
                            .push((r.to.clone(), flags::RECURSIVE | flags::LIVE));
                    }
                }
                Ok(false) => c
                    .requeue
                    .push((r.to.clone(), flags::RECURSIVE | flags::LIVE)),
                // Left in the journal: tried again once the target is back.
                Err(ApplyError::Unreachable { .. }) => {
                    cut = Some(r.seq);
                    break;
                }
                Err(e) => {
                    // Degrade to copies rather than retry in a loop.
                    tracing::warn!(
                        "rename on target {} failed, copying instead: {e}",
                        self.name
                    );
                    c.requeue
                        .push((r.to.clone(), flags::RECURSIVE | flags::LIVE));
                }
            }
            for p in [&r.from, &r.to] {
                if let Some(parent) = paths::parent(p) {
                    touched.insert(parent.to_vec());
                }
            }
            c.renames_done.push(r.seq);
            for p in [&r.from, &r.to] {
                c.undoubt.push((p.clone(), round));
            }
        }
        if !renames.is_empty() {
            // Renames are committed on their own, after everything before
            // them (see `Shipper::accumulate`).
            self.accumulate(c, wrote)?;
            self.flush_wait()?;
        }
        Ok((!renames.is_empty(), cut))
    }

    fn round(&mut self) -> Result<Round, JournalError> {
        let mut acc = RoundAcc::default();
        let t_round = Instant::now();

        if self.cursor.is_none() {
            self.flush_wait()?;
        }
        // The batch is read before the renames: a rename recorded between
        // the two reads is then applied before entries that predate it (and
        // its own marks stay pending), never after entries that follow it.
        let at_start = self.cursor.is_none();
        let cursor0 = self.cursor.clone();
        let (batch, full) = self.next_batch()?;
        self.rounds += 1;
        let round = self.rounds;
        let (renamed, cut) = self.apply_renames(round, &mut acc.touched)?;

        let now = Instant::now();
        let free = if self.retry.values().any(|r| r.need.is_some()) {
            self.target_free()
        } else {
            None
        };
        let todo: Vec<&(Vec<u8>, Pending)> = batch
            .iter()
            .filter(|(_, v)| cut.is_none_or(|c| v.seq < c))
            .filter(|(p, v)| self.due(p, v.seq, now, free))
            .collect();
        if cut.is_some_and(|c| batch.iter().any(|(_, v)| v.seq >= c)) {
            // This batch again, once the renames are through.
            self.cursor = cursor0;
        }

        let t_apply = Instant::now();
        let (results, held_dirs, doubted) = self.apply_todo(&todo, round)?;
        let apply_ms = t_apply.elapsed().as_secs_f64() * 1e3;

        self.record(results, round, (&held_dirs, &doubted), &mut acc);
        let RoundAcc {
            mut c,
            touched,
            mut wrote,
            scans,
            bulk,
            mut applied,
            mut target_errors,
            live_files,
        } = acc;
        target_errors += self.apply_bulk(bulk, &mut applied)?;
        // Other names of hard-linked files changed through one of them.
        for rel in self.stale_links(&live_files) {
            c.requeue.push((rel, flags::CONTENT | flags::LIVE));
        }
        // Directories a copy made as parents are compared again: the source
        // may no longer hold them (see `LocalTarget::take_made_parents`).
        for p in self.target.take_made_parents() {
            c.requeue.push((p, flags::RECURSIVE | flags::LIVE));
        }
        if at_start && !full {
            // This batch was the whole backlog: a retry key it did not hold
            // belongs to a path that moved or was superseded.
            let live: std::collections::HashSet<&[u8]> =
                batch.iter().map(|(p, _)| p.as_slice()).collect();
            self.retry.retain(|k, _| live.contains(k.as_slice()));
        }
        self.stats
            .failing
            .store(self.retry.len() as u64, Ordering::Relaxed);
        self.publish_applied(&applied, target_errors);

        if !touched.is_empty() {
            crate::failpoints::hold_while(crate::failpoints::Hook::HoldRestamp, |p| {
                touched.contains(p)
            });
        }
        self.restamp(&touched, &mut c, &mut wrote);
        // An entry whose subtree is compared below stays pending until that
        // compare has enqueued what differs in it: done before, it would
        // leave a moment with the subtree's differences in no pending entry
        // (a lag of 0 while they are not on the target).
        let (after_scan, done): (Vec<_>, Vec<_>) = std::mem::take(&mut c.done)
            .into_iter()
            .partition(|(p, _)| scans.iter().any(|(s, _, _)| s == p));
        c.done = done;
        // Group commit: one syncfs and one journal write per second (or
        // when the backlog is drained), not per batch.
        self.accumulate(c, wrote)?;
        if !full || self.last_flush.elapsed() >= GROUP_COMMIT {
            self.flush()?;
        }

        tracing::debug!(
            target = %self.name, entries = todo.len(),
            apply_ms, round_ms = t_round.elapsed().as_secs_f64() * 1e3,
            "round"
        );
        self.compare_subtrees(scans, after_scan)?;
        Ok(Round {
            worked: !todo.is_empty() || renamed,
            drained: at_start
                && !full
                && !renamed
                && batch.iter().all(|(p, _)| self.retry.contains_key(p)),
        })
    }

    /// Compares the subtrees a round asked for (new or moved-in
    /// directories, rescans), then commits the entries that waited for
    /// those compares (`after_scan`).
    fn compare_subtrees(
        &mut self,
        scans: Vec<(Vec<u8>, u8, bool)>,
        after_scan: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), JournalError> {
        // Subtrees to compare (new or moved-in directories, rescans). One
        // the target had already is compared with the index as committed,
        // so what this round applied must be in it: a copy not yet there
        // would not be vouched for and be made again (`target::Vouch`).
        if scans.iter().any(|(_, _, created)| !created) {
            self.flush_wait()?;
        }
        for (p, f, created) in scans {
            self.scan_subtree(&p, f, created)?;
        }
        if !after_scan.is_empty() {
            self.acc.merge(Completion {
                done: after_scan,
                ..Completion::default()
            });
            self.flush()?;
        }
        Ok(())
    }

    /// Records what a round's applies (`results`) did into `acc`: the
    /// entries done, the index's changes, the directories to re-stamp,
    /// compare or copy whole (BULK), and the counts. `held`: the entries the
    /// index held as directories, and those of them doubted.
    fn record(
        &mut self,
        results: Vec<Applying<'_>>,
        round: u64,
        (held_dirs, doubted): (&HashSet<&[u8]>, &HashSet<&[u8]>),
        acc: &mut RoundAcc,
    ) {
        let removed = removed_in(&results);
        for (p, v, r) in results {
            tracing::trace!(target = %self.name, path = %paths::display(p), flags = v.flags, seq = v.seq, outcome = ?r, "applied");
            if overtaken(p, &r, &removed) {
                // Stays pending: applied again by a later round.
                tracing::debug!(target = %self.name, path = %paths::display(p), "applied while an ancestor was removed: again");
                continue;
            }
            if matches!(r, Err(ApplyError::TargetWrite { .. })) {
                acc.target_errors += 1;
            }
            if r.is_ok() && doubted.contains(p.as_slice()) {
                acc.c.undoubt.push((p.clone(), round));
            }
            if held_dirs.contains(p.as_slice())
                && matches!(
                    r,
                    Ok(Outcome::Copied { .. }) | Ok(Outcome::Unchanged { .. })
                )
            {
                // A file or symlink where the index held a directory: what
                // it held below is gone from the target. Left, those
                // entries came back to life when a directory was renamed
                // there again, vouching for files the target lacked (the
                // churn test's divergence after chains of exchanges).
                acc.c.index_remove_tree.push(p.clone());
            }
            match r {
                // Not applied (see `apply_todo`): stays pending.
                Ok(Outcome::NeedsDoubt) => {}
                Ok(o) => self.record_outcome(p, v, o, held_dirs.contains(p.as_slice()), acc),
                Err(e) => self.failed(p, v.seq, e),
            }
        }
    }

    /// [`Shipper::record`] of entry `p` (`v`) applied with outcome `o`
    /// (`held_dir`: the index held a directory there).
    fn record_outcome(
        &mut self,
        p: &Vec<u8>,
        v: &Pending,
        o: Outcome,
        held_dir: bool,
        acc: &mut RoundAcc,
    ) {
        if self.retry.remove(p.as_slice()).is_some() {
            tracing::info!(target = %self.name, path = %paths::display(p), "applied after earlier failures");
        }
        // A BULK directory is done once its files are.
        if v.flags & flags::BULK == 0 || !matches!(o, Outcome::Dir { .. }) {
            acc.c.done.push((p.clone(), v.seq));
        }
        let parent = paths::parent(p).map(|x| x.to_vec());
        if v.flags & flags::LIVE != 0
            && matches!(o, Outcome::Copied { meta, .. } | Outcome::Unchanged { meta } if meta.kind != Kind::Dir)
        {
            acc.live_files.push(p.clone());
        }
        self.stats
            .initial
            .note(p, v.flags, v.seq, self.counts_from(), &o);
        match o {
            Outcome::Copied { meta, bytes } => {
                self.stats.copied.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                acc.applied.copied += 1;
                acc.applied.bytes += bytes;
                acc.c.index_put.push((p.clone(), meta));
                acc.touched.extend(parent);
                acc.wrote = true;
            }
            Outcome::Unchanged { meta } => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                acc.c.index_put.push((p.clone(), meta));
                // The copy may be one a crash cut off before its
                // round re-stamped the directory, which the index
                // still holds as mirrored: nothing else would fix
                // the directory's mtime.
                acc.touched.extend(parent);
            }
            Outcome::Dir {
                meta,
                created,
                scan,
            } => {
                if created {
                    self.stats.copied.fetch_add(1, Ordering::Relaxed);
                    acc.applied.mkdir += 1;
                    acc.wrote = true;
                }
                // Even when it existed: a copy in this batch may
                // have created it as the parent of a file.
                acc.touched.extend(parent);
                acc.touched.insert(p.clone());
                if v.flags & flags::BULK != 0 {
                    // Done once its files are; indexed when its
                    // attributes are set after them (an index
                    // entry committed before would vouch for
                    // the mtime the copies are about to move).
                    acc.bulk.push(BulkDir {
                        path: p.clone(),
                        seq: v.seq,
                        created,
                        flags: v.flags,
                    });
                    // The walk that enqueued it covers the
                    // subtree, unless a rescan was asked since.
                    if v.flags & flags::RECURSIVE != 0 {
                        acc.scans.push((p.clone(), v.flags, created));
                    }
                    return;
                }
                acc.c.index_put.push((p.clone(), meta));
                if scan {
                    acc.scans.push((p.clone(), v.flags, created));
                }
            }
            Outcome::Deleted => {
                self.stats.deleted.fetch_add(1, Ordering::Relaxed);
                acc.applied.deleted += 1;
                if held_dir {
                    acc.c.index_remove_tree.push(p.clone());
                } else {
                    acc.c.index_remove.push(p.clone());
                }
                acc.touched.extend(parent);
                acc.wrote = true;
            }
            // Also a copy a crash cut off (see above), since
            // deleted on the source.
            Outcome::DeleteSkipped => acc.touched.extend(parent),
            // (NeedsDoubt: matched above.)
            Outcome::Special | Outcome::Vanished | Outcome::NeedsDoubt => {}
        }
    }

    /// Applies `todo` on the target. An entry that the index holds as a
    /// directory and that the source no longer holds as one is applied
    /// only once a doubt (see [`Journal::doubt_put`]) is recorded for it:
    /// its apply removes what the index holds below it. The apply says so
    /// ([`Outcome::NeedsDoubt`], for entries flagged
    /// [`flags::HOLDS_DIR`]); those are doubted in one write and applied
    /// again. Returns the results, in `todo`'s order, the paths the index
    /// held as directories, and the doubted ones (an entry that then fails
    /// keeps its doubt until a later round applies it).
    #[allow(clippy::type_complexity)]
    fn apply_todo<'b>(
        &mut self,
        todo: &[&'b (Vec<u8>, Pending)],
        round: u64,
    ) -> Result<Applied3<'b>, JournalError> {
        let keys: Vec<&[u8]> = todo.iter().map(|(p, _)| p.as_slice()).collect();
        let (held, vouch) = self.vouches(&keys, |i| todo[i].1.flags & flags::LIVE != 0)?;
        let holds_dir: HashSet<&[u8]> = todo
            .iter()
            .zip(held)
            .filter(|(_, m)| m.is_some_and(|m| m.kind == Kind::Dir))
            .map(|((p, _), _)| p.as_slice())
            .collect();
        let mut results = self.apply_groups(todo, &holds_dir, &vouch);
        // `results` is in `todo`'s order.
        let need: Vec<usize> = (0..results.len())
            .filter(|&i| matches!(results[i].2, Ok(Outcome::NeedsDoubt)))
            .collect();
        if need.is_empty() {
            return Ok((results, holds_dir, HashSet::new()));
        }
        let again: Vec<&'b (Vec<u8>, Pending)> = need.iter().map(|&i| todo[i]).collect();
        // Doubted now: a copy named there may go (but nothing vouches for
        // what may be there again by then).
        let again_vouch: Vec<Vouch> = need
            .iter()
            .map(|&i| match vouch[i] {
                Vouch::Copy { .. } => Vouch::Nothing,
                v => v,
            })
            .collect();
        let doubted: Vec<&'b [u8]> = again.iter().map(|(p, _)| p.as_slice()).collect();
        self.journal.doubt_put(self.t, &doubted, round)?;
        for (i, (_, _, r)) in
            need.into_iter()
                .zip(self.apply_groups(&again, &HashSet::new(), &again_vouch))
        {
            results[i].2 = r;
        }
        Ok((results, holds_dir, doubted.into_iter().collect()))
    }

    /// What the index holds at each of `keys` (its claims in flight
    /// included) and what vouches for a look-alike there (see
    /// [`Vouch`]): `live(i)` for an entry seen changing live (or compared
    /// by content), and in a distrusted subtree (see `journal::trust`,
    /// rule 2) no look-alike stands.
    ///
    /// Asked when an entry is applied, not when it was enqueued: renames
    /// applied on the target in between (the index moves with them) may
    /// have put the copy of another file there (what the swap test found:
    /// a compare enqueued `q/id` into a directory new on the target, the
    /// next round's renames moved `p`'s copy there, and the apply found it
    /// unchanged).
    #[allow(clippy::type_complexity)]
    fn vouches(
        &mut self,
        keys: &[&[u8]],
        live: impl Fn(usize) -> bool,
    ) -> Result<(Vec<Option<Meta>>, Vec<Vouch>), JournalError> {
        let stored = self.journal.index_get_many(self.t, keys)?;
        let held = self.inflight.held(keys, stored);
        let trust = self.journal.trust(self.t)?;
        let vouch = held
            .iter()
            .enumerate()
            .map(|(i, m)| Vouch::of(m.as_ref(), live(i) || trust.distrusts(keys[i])))
            .collect();
        Ok((held, vouch))
    }

    /// Applies `todo` in runs of entries with the same parent (the batch is
    /// in path order), at most GROUP long so that one big directory still
    /// spreads over all cores. Entries in `holds_dir` are flagged
    /// [`flags::HOLDS_DIR`]; `vouch` is in `todo`'s order.
    fn apply_groups<'b>(
        &self,
        todo: &[&'b (Vec<u8>, Pending)],
        holds_dir: &HashSet<&[u8]>,
        vouch: &[Vouch],
    ) -> Vec<Applying<'b>> {
        let mut groups: Vec<(&[&'b BatchEntry], &[Vouch])> = Vec::new();
        let mut start = 0;
        for i in 1..=todo.len() {
            let split = i == todo.len()
                || i - start >= GROUP
                || paths::split(&todo[i].0).0 != paths::split(&todo[start].0).0;
            if split {
                groups.push((&todo[start..i], &vouch[start..i]));
                start = i;
            }
        }
        let apply = || -> Vec<Applying<'b>> {
            groups
                .par_iter()
                .flat_map_iter(|&(g, vouch)| {
                    let parent = paths::split(&g[0].0).0;
                    let entries: Vec<(&[u8], u8)> = g
                        .iter()
                        .map(|(p, v)| {
                            let mut f = v.flags & !flags::BULK;
                            if v.seq <= self.run_seq0 {
                                f &= !flags::ABSENT;
                            }
                            if holds_dir.contains(p.as_slice()) {
                                f |= flags::HOLDS_DIR;
                            }
                            (p.as_slice(), f)
                        })
                        .collect();
                    let out =
                        self.target
                            .apply_group(&self.source, parent, &entries, vouch, self.policy);
                    g.iter().zip(out).map(|(&(p, v), r)| (p, v, r))
                })
                .collect()
        };
        match &self.io_pool {
            Some(pool) => pool.install(apply),
            None => apply(),
        }
    }

    /// Copies the entries of the BULK directories `dirs` (other than their
    /// subdirectories, which have entries of their own) and marks each
    /// directory's entry done once all of them are in place. Copies are
    /// committed as they go, so a crash mid-way loses at most the last
    /// second of them; the directory's entry stays pending until then, and
    /// applied again it compares each entry with the target before copying
    /// (the directory exists by then). An entry that fails is requeued on
    /// its own, to be retried with backoff like any other. Returns the
    /// number of target write errors.
    fn apply_bulk(
        &mut self,
        dirs: Vec<BulkDir>,
        applied: &mut Applied,
    ) -> Result<u64, JournalError> {
        if dirs.is_empty() {
            return Ok(0);
        }
        // Whether each directory's files count in the initial sync's
        // progress when applied (see `ScanStats::covered_dirs`).
        let counted: Vec<bool> = dirs
            .iter()
            .map(|d| self.scan_stats.take_covered(&d.path))
            .collect();
        let mut finished = Completion::default();
        let (tasks, mut left) = self.bulk_tasks(&dirs, &mut finished);
        self.accumulate(finished, false)?;
        let mut unreachable = vec![false; dirs.len()];
        let mut target_errors = 0u64;
        let mut tasks = tasks.into_iter().peekable();
        while tasks.peek().is_some() && !self.stop.load(Ordering::Relaxed) {
            let mut wave = Vec::new();
            let mut n = 0;
            while n < BULK_WAVE {
                let Some(t) = tasks.next() else { break };
                n += t.1.len();
                wave.push(t);
            }
            let vouch = self.bulk_vouches(&dirs, &wave)?;
            let apply = || -> Vec<Vec<Result<Outcome, ApplyError>>> {
                wave.par_iter()
                    .zip(&vouch)
                    .map(|((i, rels), vouch)| {
                        let d = &dirs[*i];
                        let f = d.origin() | if d.created { flags::ABSENT } else { 0 };
                        let entries: Vec<(&[u8], u8)> =
                            rels.iter().map(|(r, lf)| (r.as_slice(), f | lf)).collect();
                        self.target
                            .apply_group(&self.source, &d.path, &entries, vouch, self.policy)
                    })
                    .collect()
            };
            let results = match &self.io_pool {
                Some(pool) => pool.install(apply),
                None => apply(),
            };
            let mut c = Completion::default();
            let mut wrote = false;
            for ((i, rels), out) in wave.iter().zip(results) {
                let d = &dirs[*i];
                for ((rel, _), r) in rels.iter().zip(out) {
                    let f = self.bulk_file(d, counted[*i], rel, r, &mut c, applied);
                    wrote |= f.wrote;
                    target_errors += u64::from(f.target_error);
                    if f.unreachable {
                        // The whole directory goes again once the target
                        // is back.
                        unreachable[*i] = true;
                        self.target_up = false;
                    }
                }
                left[*i] -= 1;
                if left[*i] == 0 && !unreachable[*i] {
                    c.done.push((d.path.clone(), d.seq));
                }
            }
            self.accumulate(c, wrote)?;
            if self.last_flush.elapsed() >= GROUP_COMMIT {
                self.flush()?;
            }
            if !self.reported_initial && self.progress_ticks.publish_due() {
                self.publish_progress();
            }
            if unreachable.iter().any(|u| *u) {
                break;
            }
        }
        Ok(target_errors)
    }

    /// The files of each directory of `dirs`, listed in the source, cut
    /// into tasks of at most [`GROUP`] (directory index, entries), and the
    /// number of tasks per directory. A directory gone from the source, or
    /// with nothing to copy, is done (`finished`); one that cannot be
    /// listed fails.
    fn bulk_tasks(
        &mut self,
        dirs: &[BulkDir],
        finished: &mut Completion,
    ) -> (Vec<BulkTask>, Vec<usize>) {
        let source = self.source.clone();
        let listed: Vec<_> = dirs
            .par_iter()
            .map(|d| scan::read_names(&source, &d.path))
            .collect();
        // (dir index, entry paths and flags) per task; the number of tasks
        // per dir.
        let mut tasks: Vec<BulkTask> = Vec::new();
        let mut left = vec![0usize; dirs.len()];
        for (i, (d, names)) in dirs.iter().zip(listed).enumerate() {
            let names = match names {
                Ok(n) => n,
                // Gone from the source: its deletion follows.
                Err(e) if crate::fsops::is_missing(&e) => {
                    finished.done.push((d.path.clone(), d.seq));
                    continue;
                }
                Err(e) => {
                    self.failed(&d.path, d.seq, ApplyError::source_read(&d.path, e));
                    continue;
                }
            };
            if !d.created {
                // Applied again (after a crash, say): the target may hold
                // entries the source has lost meanwhile, copied by the
                // earlier apply but never indexed, so that no other walk
                // would find them. Each becomes an entry of its own.
                if let Err(e) = self.bulk_extras(d, &names, finished) {
                    self.failed(&d.path, d.seq, e);
                    continue;
                }
            }
            let rels: Vec<(Vec<u8>, u8)> = names
                .into_iter()
                .filter_map(|(n, k)| match k {
                    Kind::File => Some((paths::join(&d.path, &n), flags::LISTED_FILE)),
                    Kind::Symlink | Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                        Some((paths::join(&d.path, &n), 0))
                    }
                    Kind::Dir | Kind::Other => None,
                })
                .filter(|(rel, _)| !self.filter.excluded(rel, false))
                .collect();
            if rels.is_empty() {
                finished.done.push((d.path.clone(), d.seq));
                continue;
            }
            for chunk in rels.chunks(GROUP) {
                tasks.push((i, chunk.to_vec()));
                left[i] += 1;
            }
        }
        (tasks, left)
    }

    /// What vouches for a look-alike in each task of `wave` (see
    /// [`Shipper::vouches`]). In a directory the apply created, nothing
    /// can be there (metadata, unasked); in one the target had, a
    /// look-alike may have come with a rename (the crash storm test: a
    /// startup compare found `q1` missing on the target, renames replayed
    /// after the crash put `p1`'s copy there, and the directory's BULK
    /// apply found its files unchanged).
    fn bulk_vouches(
        &mut self,
        dirs: &[BulkDir],
        wave: &[BulkTask],
    ) -> Result<Vec<Vec<Vouch>>, JournalError> {
        wave.iter()
            .map(|(i, rels)| {
                let d = &dirs[*i];
                if d.created {
                    return Ok(Vec::new());
                }
                let keys: Vec<&[u8]> = rels.iter().map(|(r, _)| r.as_slice()).collect();
                let live = d.flags & (flags::LIVE | flags::CONTENT) != 0;
                Ok(self.vouches(&keys, |_| live)?.1)
            })
            .collect()
    }

    /// Takes the outcome `r` of file `rel` of BULK directory `d` into `c`
    /// and `applied`; `counted`: its files count in the initial sync's
    /// progress (see `ScanStats::covered_dirs`).
    fn bulk_file(
        &mut self,
        d: &BulkDir,
        counted: bool,
        rel: &[u8],
        r: Result<Outcome, ApplyError>,
        c: &mut Completion,
        applied: &mut Applied,
    ) -> BulkFile {
        let mut out = BulkFile::default();
        // A directory (now) or a failure goes again as an entry of its
        // own, counted when that is applied.
        if let (Ok(o), true) = (&r, counted) {
            if !matches!(o, Outcome::Dir { .. } | Outcome::NeedsDoubt) {
                self.stats
                    .initial
                    .note(rel, d.origin(), d.seq, self.counts_from(), o);
            }
        }
        match r {
            Ok(Outcome::Copied { meta, bytes }) => {
                self.stats.copied.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                applied.copied += 1;
                applied.bytes += bytes;
                out.wrote = true;
                if d.created {
                    c.index_new.push((rel.to_vec(), meta));
                } else {
                    c.index_put.push((rel.to_vec(), meta));
                }
            }
            Ok(Outcome::Unchanged { meta }) => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                c.index_put.push((rel.to_vec(), meta));
            }
            Ok(Outcome::Deleted) => {
                self.stats.deleted.fetch_add(1, Ordering::Relaxed);
                applied.deleted += 1;
                c.index_remove_tree.push(rel.to_vec());
                out.wrote = true;
            }
            // Became a directory since the listing: compared with its
            // subtree, as an entry of its own. (NeedsDoubt: never, without
            // the flag; applied again as an entry of its own to be safe.)
            Ok(Outcome::Dir { .. }) | Ok(Outcome::NeedsDoubt) => c
                .requeue
                .push((rel.to_vec(), d.origin() | flags::RECURSIVE)),
            Ok(Outcome::DeleteSkipped | Outcome::Special | Outcome::Vanished) => {}
            Err(ApplyError::Unreachable { .. }) => out.unreachable = true,
            Err(e) => {
                out.target_error = matches!(e, ApplyError::TargetWrite { .. });
                c.requeue.push((rel.to_vec(), d.origin()));
                self.failed(rel, d.seq, e);
            }
        }
        out
    }

    /// Enqueues (in `c`) the entries of BULK directory `d` on the target
    /// that the source listing `names` lacks; removes stale temp files.
    fn bulk_extras(
        &self,
        d: &BulkDir,
        names: &[(Vec<u8>, Kind)],
        c: &mut Completion,
    ) -> Result<(), ApplyError> {
        let view = self.target.view(&d.path).map_err(|e| {
            if crate::target::is_unreachable(&e) {
                ApplyError::Unreachable {
                    target: self.name.clone(),
                    reason: e.to_string(),
                }
            } else {
                ApplyError::target_write(&d.path, e)
            }
        })?;
        let Some(view) = view else {
            return Ok(());
        };
        let have: std::collections::HashSet<&[u8]> =
            names.iter().map(|(n, _)| n.as_slice()).collect();
        for n in view.names() {
            if have.contains(n.as_slice()) {
                continue;
            }
            if crate::fsops::is_temp_name(&n) {
                if crate::fsops::is_stale_temp_name(&n) {
                    view.remove_stale(&n);
                }
                continue;
            }
            let rel = paths::join(&d.path, &n);
            let is_dir = view.lstat(&n).is_some_and(|m| m.kind == Kind::Dir);
            if !self.filter.excluded(&rel, is_dir) {
                c.requeue.push((rel, d.origin()));
            }
        }
        Ok(())
    }

    fn scan_subtree(&mut self, p: &[u8], f: u8, created: bool) -> Result<(), JournalError> {
        let stats = ScanStats::default();
        // Left by a crash mid-rename (see `Journal::resolve_doubts`).
        let distrust = if f & flags::CONTENT != 0 {
            vec![p.to_vec()]
        } else {
            Vec::new()
        };
        let cmp = Compare {
            distrust: &distrust,
            dirs_seen: None,
            source: &self.source,
            target: &self.target,
            journal: &self.journal,
            t: self.t,
            filter: &self.filter,
            owner: self.owner,
            stats: &stats,
            stop: &self.stop,
            progress: None,
            // A directory new to the target, seen live: nothing older is
            // pending below it, bar a rare event that came first.
            absent_ok: true,
        };
        let flag = f & (flags::LIVE | flags::STARTUP);
        let flag = if flag == 0 { flags::LIVE } else { flag };
        // On the scan pool: a big rescan must not queue in front of the
        // capture thread's and this shipper's own work on the global pool.
        self.scan_pool.install(|| -> Result<(), JournalError> {
            cmp.source_walk(p, flag)?;
            if !created {
                cmp.target_walk(p, flag)?;
            }
            Ok(())
        })?;
        if flag & flags::STARTUP != 0 && !self.reported_initial {
            // Part of the startup scan's work (a directory it could not
            // list, or one a BULK entry found made since): its entries
            // count in the initial sync's totals (see `crate::progress`).
            self.scan_stats.absorb(&stats);
        }
        // Unlistable directories were re-enqueued by the walk; back off
        // before trying them again.
        let failed =
            std::mem::take(&mut *stats.failed_dirs.lock().unwrap_or_else(|p| p.into_inner()));
        for d in failed {
            let seq = self.journal.pending_get(self.t, &d)?.map(|v| v.seq);
            self.schedule_retry(&d, seq, "cannot list the directory".into(), None);
        }
        tracing::debug!(
            target = %self.name, path = %paths::display(p),
            scanned = stats.scanned.load(Ordering::Relaxed),
            enqueued = stats.enqueued.load(Ordering::Relaxed),
            differing = stats.differing(),
            "subtree compared"
        );
        Ok(())
    }

    fn publish_applied(&mut self, a: &Applied, target_errors: u64) {
        let name = self.name.clone();
        for (op, n) in [
            ("copy", a.copied),
            ("delete", a.deleted),
            ("mkdir", a.mkdir),
        ] {
            if n > 0 {
                metrics::counter!("drmirror_applied_total", "target" => name.clone(), "op" => op)
                    .increment(n);
            }
        }
        if a.bytes > 0 {
            metrics::counter!("drmirror_sent_bytes_total", "target" => name.clone())
                .increment(a.bytes);
        }
        let any = a.copied + a.deleted + a.mkdir;
        if any > 0 {
            let now = crate::journal::now_ns() as f64 / 1e9;
            metrics::gauge!("drmirror_last_apply_timestamp_seconds", "target" => name.clone())
                .set(now);
            self.board
                .update_target(&name, |t| t.last_apply_unix = Some(now));
            self.target_up = true;
        } else if target_errors > 0 && self.retry.len() > 1 {
            // Down when writes fail and none succeed, for more than one
            // path: one path that fails (a file that cannot fit, a name the
            // target refuses) is shown by name in `status`, and its change
            // keeps the lag growing, but the rest of the target is up.
            self.target_up = false;
        }
    }

    /// Shows `msg` as the target's last error in `status`, timed from when
    /// it first read so (a retry that fails the same way is the same error).
    fn show_error(&self, msg: String) {
        let at = crate::status::unix_now();
        self.board.update_target(&self.name, |t| {
            if t.last_error.as_deref() != Some(msg.as_str()) || t.last_error_resolved_unix.is_some()
            {
                t.last_error_unix = Some(at);
            }
            t.last_error = Some(msg);
            t.last_error_resolved_unix = None;
        });
    }

    fn failed(&mut self, p: &[u8], seq: u64, e: ApplyError) {
        if let ApplyError::Unreachable { .. } = e {
            // Not this path's fault: it stays pending and goes with the
            // rest of the backlog once the target is back (the connection
            // logs the outage once, not once per path).
            self.target_up = false;
            tracing::debug!(target = %self.name, path = %paths::display(p), "{e}");
            let why = self.target.unreachable_reason();
            self.show_error(why.unwrap_or_else(|| e.to_string()));
            return;
        }
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("drmirror_errors_total", "kind" => e.kind()).increment(1);
        // A full target is not retried on a backoff alone: once the room a
        // path needs is free there, it goes (within a round), not after a
        // backoff that grew through the outage.
        let (need, msg) = if e.out_of_space() {
            let (need, note) = self.space_retry(p);
            let msg = format!("waiting for space on the target ({note}): {e}");
            (need, msg)
        } else {
            (None, e.to_string())
        };
        self.show_error(msg.clone());
        // A file that keeps changing raises new events all the time: those
        // must not cut its backoff short, or every round would spend three
        // full copies on it and hold back every other path.
        let changing = matches!(e, ApplyError::Changing { .. });
        let attempts = self.schedule_retry(p, (!changing).then_some(seq), msg, need);
        if attempts == 1 && self.log_limit.allow() {
            tracing::warn!(target = %self.name, kind = e.kind(), "{e}; will retry");
        } else {
            tracing::debug!(target = %self.name, attempts, "{e}; will retry");
        }
    }

    /// During which boot of the target's machine what was applied since
    /// the last flush was applied.
    fn apply_boot(&mut self) -> ApplyBoot {
        match self.target.as_ref() {
            Target::Local(_) => match &self.boot_id {
                Some(b) => ApplyBoot::Boot(b.clone()),
                None => ApplyBoot::Unknown,
            },
            Target::Remote(r) => {
                let (gen, boot) = r.boot_epoch();
                let last = std::mem::replace(&mut self.boot_gen, gen);
                remote_apply_boot(last, gen, boot)
            }
        }
    }

    /// Adds `c` (applied after everything in `self.acc`) to what the next
    /// [`Shipper::flush`] commits. A completion that removes or moves index
    /// entries is committed apart from the puts before it:
    /// [`Journal::complete`] removes and moves before it puts, so within
    /// one commit an earlier round's put of a file copied into a directory
    /// the renames then moved landed at the directory's old path, and the
    /// index vouched there for the copy of another file (the swap storm's
    /// divergence that outlived the first fix of the look-alike check).
    fn accumulate(&mut self, c: Completion, wrote: bool) -> Result<(), JournalError> {
        if !c.index_remove_tree.is_empty()
            || !c.index_remove.is_empty()
            || !c.index_moves.is_empty()
        {
            self.flush()?;
        }
        self.acc.merge(c);
        self.acc_wrote |= wrote;
        Ok(())
    }

    /// Hands what was applied to the flusher thread, which makes it durable
    /// on the target (syncfs) and then tells the journal, while this thread
    /// goes on applying the next batch. At most two commits are in flight.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        let c = std::mem::take(&mut self.acc);
        if (!c.index_remove_tree.is_empty()
            || !c.index_remove.is_empty()
            || !c.index_moves.is_empty())
            && *ABORT_BEFORE_COMMIT
        {
            // Test hook: a crash after the target lost entries the index
            // still records (see `Journal::doubt_put`).
            std::process::abort();
        }
        let wrote = std::mem::take(&mut self.acc_wrote);
        self.last_flush = Instant::now();
        let boot = self.apply_boot();
        if c.is_empty() && !wrote {
            return Ok(());
        }
        match &self.flush_tx {
            Some(tx) => {
                let defer = wrote && matches!(boot, ApplyBoot::Boot(_)) && !self.reported_initial;
                let n = self.inflight.hand(&c);
                if tx
                    .send(FlushJob::Commit {
                        c: Box::new(c),
                        wrote,
                        defer,
                        boot,
                        n,
                    })
                    .is_err()
                {
                    return Err(JournalError::Corrupt("flusher thread is gone".into()));
                }
                Ok(())
            }
            None => self.flusher(None).commit(&c, wrote, false, &boot),
        }
    }

    /// Has the flusher compact the journal's queues, after the commits
    /// before it, if enough was deleted from them.
    fn compact(&mut self) -> Result<(), JournalError> {
        match &self.flush_tx {
            Some(tx) => tx
                .send(FlushJob::Compact)
                .map_err(|_| JournalError::Corrupt("flusher thread is gone".into())),
            None => compact_churned(&self.journal, &self.name),
        }
    }

    /// [`Shipper::flush`], then has the flusher flush the target if copies
    /// were recorded unflushed (the initial sync is over, or the daemon
    /// stops).
    fn settle(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        if let Some(tx) = &self.flush_tx {
            if tx.send(FlushJob::Settle).is_err() {
                return Err(JournalError::Corrupt("flusher thread is gone".into()));
            }
        }
        Ok(())
    }

    /// [`Shipper::flush`], then waits until every commit so far is in the
    /// journal: before reading the backlog from its start again (or the
    /// renames), so that nothing in flight is applied twice.
    pub fn flush_wait(&mut self) -> Result<(), JournalError> {
        self.flush()?;
        let Some(tx) = &self.flush_tx else {
            return Ok(());
        };
        let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
        if tx.send(FlushJob::Barrier(ack_tx)).is_err() {
            return Err(JournalError::Corrupt("flusher thread is gone".into()));
        }
        ack_rx
            .recv()
            .unwrap_or_else(|_| Err(JournalError::Corrupt("flusher thread is gone".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::local::LocalTarget;

    fn flusher() -> (Flusher, TargetId, tempfile::TempDir, tempfile::TempDir) {
        let state = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(state.path()).unwrap());
        let t = journal.target_id("dr").unwrap();
        let target = Arc::new(Target::Local(LocalTarget::open(dst.path(), false).unwrap()));
        let f = Flusher {
            journal,
            target,
            t,
            name: "dr".into(),
            note: None,
            poisoned: false,
            committed: Default::default(),
        };
        (f, t, state, dst)
    }

    /// `path` applied, as a shipper hands it to the flusher.
    fn applied(f: &Flusher, t: TargetId, path: &[u8]) -> Completion {
        f.journal
            .enqueue(t, &[(path.to_vec(), flags::CONTENT)])
            .unwrap();
        let batch = f.journal.pending_batch(t, None, 10).unwrap();
        let (_, p) = batch.iter().find(|(k, _)| k == path).unwrap();
        Completion {
            done: vec![(path.to_vec(), p.seq)],
            ..Default::default()
        }
    }

    /// A remote target's copies since the last flush are vouched for by
    /// its current boot only if its boot epoch stayed put since.
    #[test]
    fn copies_across_a_boot_epoch_move_are_mixed() {
        let b = || Some(b"boot-b".to_vec());
        assert_eq!(remote_apply_boot(0, 1, b()), ApplyBoot::Mixed);
        assert_eq!(remote_apply_boot(1, 2, None), ApplyBoot::Mixed);
        assert_eq!(
            remote_apply_boot(1, 1, b()),
            ApplyBoot::Boot(b"boot-b".to_vec())
        );
        assert_eq!(remote_apply_boot(1, 1, None), ApplyBoot::Unknown);
    }

    /// Copies made over connections to two boots of the target's machine
    /// (`ApplyBoot::Mixed`: it restarted among them, and may have lost the
    /// earlier ones with its page cache) are not recorded as done, though
    /// the flush before the commit succeeds: that flush covers only the
    /// current boot. Their entries stay pending and are applied again. The
    /// same commit within one boot, or from a target that names none, is
    /// recorded.
    #[test]
    fn a_commit_spanning_a_restart_of_the_targets_machine_stays_pending() {
        let (mut f, t, _state, _dst) = flusher();
        let c = applied(&f, t, b"a/file");
        f.commit(&c, true, false, &ApplyBoot::Mixed).unwrap();
        assert_eq!(f.journal.pending_count(t).unwrap(), 1);
        f.commit(&c, true, false, &ApplyBoot::Boot(b"boot-a".to_vec()))
            .unwrap();
        assert_eq!(f.journal.pending_count(t).unwrap(), 0);

        let c = applied(&f, t, b"b/file");
        f.commit(&c, true, false, &ApplyBoot::Mixed).unwrap();
        assert_eq!(f.journal.pending_count(t).unwrap(), 1);
        f.commit(&c, true, false, &ApplyBoot::Unknown).unwrap();
        assert_eq!(f.journal.pending_count(t).unwrap(), 0);
    }

    /// What a round applied under a directory it also removed is applied
    /// again; what it applied beside or above it stands.
    #[test]
    fn an_apply_under_a_directory_the_round_removed_is_overtaken() {
        let v = Pending {
            seq: 1,
            first_seen_ns: 0,
            flags: 0,
        };
        let file = crate::meta::test_file(1, 1);
        let paths: Vec<Vec<u8>> = ["tmp", "tmp/a", "tmpx/b", "q/c"]
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        let copied = || {
            Ok(Outcome::Copied {
                meta: file,
                bytes: 1,
            })
        };
        let results: Vec<Applying> = vec![
            (&paths[0], &v, Ok(Outcome::Deleted)),
            (&paths[1], &v, copied()),
            (&paths[2], &v, copied()),
            (&paths[3], &v, copied()),
        ];
        let removed = removed_in(&results);
        assert_eq!(removed, vec![b"tmp".as_slice()]);
        let again: Vec<bool> = results
            .iter()
            .map(|(p, _, r)| overtaken(p, r, &removed))
            .collect();
        assert_eq!(again, vec![false, true, false, false]);
        assert!(!overtaken(b"tmp/a", &Ok(Outcome::Deleted), &removed));
    }
}
