//! `drmirror run`: lifecycle of the mirror daemon.
//!
//! Start order: lock the state dir, open the journal, open the targets,
//! start capture, say `drmirror ready` — then compare the source with each
//! target in the background (the startup scan) while live changes already
//! flow. Stop (SIGTERM/SIGINT): stop capture and shippers at a batch
//! boundary, flush the journal, exit 0.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use crate::config::{Config, WatchMode};
use crate::filter::Filter;
use crate::fsops::Root;
use crate::journal::{flags, Change, Journal, JournalError, TargetId};
use crate::paths;
use crate::ship::{ShipStats, Shipper};
use crate::supervise::{Role, Supervisor};
use crate::sync::{Compare, Deletions, ScanStats};
use crate::target::identity;
use crate::target::local::{DeletePolicy, LocalTarget};
use crate::target::remote::RemoteTarget;
use crate::target::Target;
use crate::watch::fanotify::FanotifyWatcher;
use crate::watch::inotify::InotifyWatcher;
use crate::watch::{Event, WatchError, Watcher};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("target {name} ({path}) {why}")]
    WrongTarget {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another drmirror is already running with state directory {0}")]
    AlreadyRunning(PathBuf),
    #[error("journal in {path}: {source}")]
    Journal { path: PathBuf, source: JournalError },
    #[error(transparent)]
    JournalRuntime(#[from] JournalError),
    #[error("source {path}: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("target {name} ({path}): {source}")]
    Target {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("exclude patterns: {0}")]
    Filter(#[from] ignore::Error),
    #[error("change capture: {0}")]
    Watch(#[from] WatchError),
    #[error("cannot set up signal handling or worker threads: {0}")]
    Signals(std::io::Error),
    #[error("a worker thread panicked: {0}")]
    Panic(String),
    #[error(
        "the state directory is gone ({0}); stopping, so that no second daemon can start on \
         its path while this one writes the target"
    )]
    StateDirGone(String),
    #[error(
        "journal {path} is corrupt ({why}); on_corrupt_journal = \"refuse\" keeps it as it is: \
         move it aside (or set on_corrupt_journal = \"rebuild\") and start again, and drmirror \
         compares the whole tree with the target"
    )]
    CorruptJournal { path: PathBuf, why: String },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("thread {thread} died: {why}")]
    ThreadDied { thread: String, why: String },
}

impl DaemonError {
    /// The exit code of `drmirror run` for this error: 2 for what a human
    /// must settle (the configuration says to refuse), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::CorruptJournal { .. } | DaemonError::WrongTarget { .. } => 2,
            _ => 1,
        }
    }
}

/// Opens a local target, once its path is known to be the target (see
/// [`identity`]) and, with `guard` (the source and its filter, when a start
/// deletes what the source lacks), not a wrong one (see
/// [`crate::target::adopt`]), and settles its mark.
fn open_local(
    journal: &Journal,
    id: TargetId,
    t: &crate::config::Target,
    owner: bool,
    keep: crate::fidelity::Keep,
    guard: Option<(&Root, &Filter)>,
) -> Result<LocalTarget, DaemonError> {
    identity::check_path(journal, id, &t.name, &t.path)?;
    let l = LocalTarget::open(&t.path, owner).map_err(|source| DaemonError::Target {
        name: t.name.clone(),
        path: t.path.clone(),
        source,
    })?;
    let l = l.keeping(keep, &t.name);
    if let Some((source, filter)) = guard {
        if identity::first_use(journal, id, l.dir_fd())? {
            crate::target::adopt::extraneous(source, l.root(), filter)
                .judge(&t.name, t.adopt)
                .map_err(|why| DaemonError::WrongTarget {
                    name: t.name.clone(),
                    path: t.path.clone(),
                    why,
                })?;
        }
    }
    identity::settle(journal, id, &t.name, l.dir_fd())?;
    l.note_made_parents();
    Ok(l)
}

/// Raises the soft fd limit to the hard one: walks and parallel copies
/// hold many descriptors at once.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

fn lock_state_dir(dir: &std::path::Path) -> Result<File, DaemonError> {
    let err = |source| DaemonError::StateDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(err)?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(DaemonError::AlreadyRunning(dir.to_path_buf())),
        Err(e) => Err(err(e.into())),
    }
}

/// Merges a poll's events into journal changes (see [`Fold::changes`]).
pub fn to_changes(events: Vec<Event>) -> Vec<Change> {
    Fold::default().changes(events)
}

/// How many renames of earlier polls [`Fold`] keeps, and for how long: the
/// two halves of an exchange are queued by one syscall, so a poll boundary
/// between them is at most a read apart.
const RECENT_RENAMES: usize = 256;
const RECENT_FOR: Duration = Duration::from_secs(2);

/// Turns polls of events into journal changes, remembering the last renames
/// so that the two halves of an exchange are recognised whatever came
/// between them.
#[derive(Default)]
pub struct Fold {
    /// Renames recorded by earlier polls, oldest first, with when.
    recent: std::collections::VecDeque<(Vec<u8>, Vec<u8>, Instant)>,
}

/// The marks that stand for both sides of an exchange (or a move there and
/// back): both whole subtrees, and their content.
fn exchanged(a: Vec<u8>, b: Vec<u8>) -> [Change; 2] {
    let f = flags::RECURSIVE | flags::CONTENT | flags::LIVE;
    [
        Change::Dirty { path: a, flags: f },
        Change::Dirty { path: b, flags: f },
    ]
}

/// Whether `p` and `q` are the same entry or one holds the other.
fn overlap(p: &[u8], q: &[u8]) -> bool {
    paths::is_within(p, q) || paths::is_within(q, p)
}

impl Fold {
    /// A poll's events as journal changes: dirty paths coalesce, renames
    /// keep their order relative to the dirty paths around them.
    ///
    /// renameat2(RENAME_EXCHANGE) reaches us as two renames, a->b then b->a
    /// (fsnotify_move twice; no event names the swap), with the events of
    /// other processes possibly between them, or a poll boundary. Recorded
    /// as such they are two *replacing* renames: the target loses b's entry
    /// to the first and gets a's back from the second, move_pending piles
    /// both subtrees' entries onto a, and the index follows those moves.
    /// State-based marks are right whatever happened between the two (a
    /// swap, or a move there and back): both whole subtrees, and the
    /// content (two swapped files may agree in size and mtime). So:
    /// - the reverse of a rename earlier in this poll replaces it with
    ///   those marks, unless a rename between them touched either side;
    /// - the reverse of a rename of an earlier poll (already recorded)
    ///   is recorded, followed by those marks, which repair what the two
    ///   renames did.
    pub fn changes(&mut self, events: Vec<Event>) -> Vec<Change> {
        let mut out = Vec::new();
        let mut seg: std::collections::HashMap<Vec<u8>, u8> = std::collections::HashMap::new();
        let flush = |seg: &mut std::collections::HashMap<Vec<u8>, u8>, out: &mut Vec<Change>| {
            out.extend(
                seg.drain()
                    .map(|(path, flags)| Change::Dirty { path, flags }),
            );
        };
        for e in events {
            match e {
                Event::Dirty { path, flags } => *seg.entry(path).or_insert(0) |= flags,
                Event::Overflow => {
                    *seg.entry(Vec::new()).or_insert(0) |= flags::RECURSIVE | flags::LIVE
                }
                Event::Rename { from, to } => {
                    flush(&mut seg, &mut out);
                    if let Some(i) = reverse_in(&out, &from, &to) {
                        out.remove(i);
                        out.extend(exchanged(from, to));
                    } else if let Some(i) = self
                        .recent
                        .iter()
                        .rposition(|(f, t, at)| *f == to && *t == from && at.elapsed() < RECENT_FOR)
                    {
                        self.recent.remove(i);
                        out.push(Change::Rename {
                            from: from.clone(),
                            to: to.clone(),
                        });
                        out.extend(exchanged(from, to));
                    } else {
                        out.push(Change::Rename { from, to });
                    }
                }
            }
        }
        flush(&mut seg, &mut out);
        self.remember(&out);
        out
    }

    fn remember(&mut self, out: &[Change]) {
        for c in out {
            if let Change::Rename { from, to } = c {
                if self.recent.len() == RECENT_RENAMES {
                    self.recent.pop_front();
                }
                self.recent
                    .push_back((from.clone(), to.clone(), Instant::now()));
            }
        }
    }
}

/// The index in `out` of the rename `to -> from` (the reverse of `from ->
/// to`), if no rename after it touches either side.
fn reverse_in(out: &[Change], from: &[u8], to: &[u8]) -> Option<usize> {
    for (i, c) in out.iter().enumerate().rev() {
        if let Change::Rename { from: f, to: t } = c {
            if f.as_slice() == to && t.as_slice() == from {
                return Some(i);
            }
            if [f, t].iter().any(|p| overlap(p, from) || overlap(p, to)) {
                return None;
            }
        }
    }
    None
}

fn count_events(events: &[Event]) {
    let (mut dirty, mut renames, mut overflows) = (0u64, 0u64, 0u64);
    for e in events {
        match e {
            Event::Dirty { .. } => dirty += 1,
            Event::Rename { .. } => renames += 1,
            Event::Overflow => overflows += 1,
        }
    }
    if dirty > 0 {
        metrics::counter!("drmirror_events_total", "kind" => "change").increment(dirty);
    }
    if renames > 0 {
        metrics::counter!("drmirror_events_total", "kind" => "rename").increment(renames);
    }
    if overflows > 0 {
        metrics::counter!("drmirror_events_total", "kind" => "overflow").increment(overflows);
        metrics::counter!("drmirror_kernel_overflows_total").increment(overflows);
    }
}

/// Kernel events to the journal, write-ahead, until `stop`.
/// Shortest time between two reads of the kernel queue (see capture_loop).
const READ_GAP: Duration = Duration::from_millis(2);

#[allow(clippy::too_many_arguments)]
fn capture_loop(
    watcher: &mut dyn Watcher,
    journal: &Journal,
    ids: &[TargetId],
    wakers: &[(Sender<()>, crate::ship::Hurry)],
    stop: &AtomicBool,
    watchdog: Option<Duration>,
    board: &crate::status::Board,
    heartbeat: &mut crate::heartbeat::Heartbeat,
) -> Result<(), DaemonError> {
    let abort_after_read = crate::failpoints::set(crate::failpoints::Hook::AbortAfterRead);
    let mut events = Vec::new();
    let mut fold = Fold::default();
    let mut reading = false;
    // The first events read queued in the kernel while capture was set up
    // (the watches of a large tree take a good part of a second to
    // restore): they have waited long enough to skip the batching delay.
    let mut first = true;
    let mut last_read = Instant::now();
    let mut last_ping = Instant::now();
    let mut last_status = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // The capture loop feeds the systemd watchdog: if it hangs, the
        // service manager restarts the daemon.
        if watchdog.is_some_and(|w| last_ping.elapsed() >= w) {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            last_ping = Instant::now();
        }
        if last_status.elapsed() >= Duration::from_secs(5) {
            let line = crate::status::one_line(&board.snapshot());
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
            last_status = Instant::now();
        }
        // Cheap (a flag) unless the list changed: checked every turn, so
        // that what set-up could not capture shows before any event.
        if let Some(u) = watcher.uncaptured() {
            board.update(|s| s.uncaptured = u);
        }
        heartbeat.tick(journal)?;
        crate::failpoints::hold_while(crate::failpoints::Hook::HoldCapture, |_| true);
        let before_wait = crate::journal::now_ns();
        if !watcher.wait(Duration::from_millis(200))? {
            // Nothing queued: every event before the wait began is read.
            heartbeat.quiet(before_wait);
            continue;
        }
        // Reading at most every READ_GAP batches a trickle of events (most
        // often the inode-only ATTRIB of each file drmirror links into a
        // target on the source's filesystem, which no ignore mark covers)
        // into one read and one pair of flag writes, for ~2 ms of latency.
        // The kernel queue (16,384 events) would need 8 million events a
        // second to overflow in that time.
        let since = last_read.elapsed();
        if since < READ_GAP {
            std::thread::sleep(READ_GAP - since);
        }
        last_read = Instant::now();
        metrics::counter!("drmirror_capture_wakeups_total").increment(1);
        // The flag brackets a busy spell, not each read: two journal writes
        // per wakeup were most of this loop's cost under a stream of events.
        // Left set between reads, it only makes a crash in that spell
        // rescan, which is the safe side.
        if !reading {
            journal.set_capture_reading(true)?;
            reading = true;
        }
        let before_read = crate::journal::now_ns();
        watcher.read(&mut events)?;
        if abort_after_read && !events.is_empty() {
            std::process::abort();
        }
        if !events.is_empty() {
            count_events(&events);
            let changes = fold.changes(std::mem::take(&mut events));
            journal.record(ids, &changes)?;
            let hurry = std::mem::take(&mut first);
            for (w, h) in wakers {
                if hurry {
                    h.set();
                }
                let _ = w.try_send(());
            }
        }
        if !watcher.wait(Duration::ZERO)? {
            journal.set_capture_reading(false)?;
            reading = false;
            // The read emptied the queue: all before it is recorded.
            heartbeat.quiet(before_read);
        }
    }
    // Everything read has been recorded; what is still queued stays in the
    // kernel (and with the handed-over descriptor).
    if reading {
        journal.set_capture_reading(false)?;
    }
    heartbeat.write(journal)?;
    Ok(())
}

/// After a start that may have missed changes (no gap-free handover): each
/// target's lag counts from when capture was last known whole until its
/// startup scan has compared everything (see [`Journal::set_startup_floor`]).
fn lag_floor(journal: &Journal, ids: impl Iterator<Item = TargetId>) -> Result<(), DaemonError> {
    let Some(since) = journal.captured_through()? else {
        return Ok(());
    };
    let ago = crate::journal::now_ns().saturating_sub(since) as f64 / 1e9;
    tracing::info!(
        "changes made since capture was last known whole ({ago:.1} s ago) may be missing on the targets: each target's lag counts from then until its startup scan has compared everything"
    );
    for t in ids {
        journal.set_startup_floor(t, since);
    }
    Ok(())
}

/// Runs the daemon until a signal or a fatal error.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    let state_dir = cfg.state_dir.clone();
    // Held until the process ends or re-executes itself (the file is
    // close-on-exec): no second daemon takes the state directory while
    // this one waits for space on it.
    let lock = lock_state_dir(&state_dir)?;
    let board = std::sync::OnceLock::new();
    let r = run_daemon(cfg, &lock, &board);
    if let Err(e) = &r {
        crate::rebuild::note_if_corrupt(&state_dir, e);
        let from_journal = e.journal_error().is_some();
        crate::state_space::wait_out_if_full(&state_dir, e, from_journal, board.get());
    }
    r
}

impl DaemonError {
    /// The journal error behind this one, if any.
    pub fn journal_error(&self) -> Option<&JournalError> {
        match self {
            DaemonError::Journal { source, .. } => Some(source),
            DaemonError::JournalRuntime(e) => Some(e),
            DaemonError::Identity(identity::IdentityError::Journal(e)) => Some(e),
            DaemonError::Watch(WatchError::Journal(e)) => Some(e),
            _ => None,
        }
    }
}

/// One target of this run: its journal id, the target, and what its
/// shipper and startup scan share with the rest of the daemon.
struct TargetRun {
    id: TargetId,
    name: String,
    target: Arc<Target>,
    wake: Sender<()>,
    wake_rx: crossbeam_channel::Receiver<()>,
    scan_done: Arc<AtomicBool>,
    hurry: crate::ship::Hurry,
    scan_stats: Arc<ScanStats>,
}

/// What every target's shipper shares (see [`new_shipper`]).
struct ShipperSetup<'a> {
    sh: &'a Shared,
    delay: Duration,
    /// This boot's id (see [`forget_unflushed`]).
    boot: &'a Option<Vec<u8>>,
    run_seq0: u64,
}

/// What a run's threads share: the journal, the source and its filter,
/// how the targets are written, the status board, the stop flag and the
/// scans' pool.
#[derive(Clone)]
struct Shared {
    journal: Arc<Journal>,
    source: Arc<Root>,
    filter: Arc<Filter>,
    policy: DeletePolicy,
    owner: bool,
    board: Arc<crate::status::Board>,
    stop: Arc<AtomicBool>,
    scan_pool: Arc<rayon::ThreadPool>,
}

/// The shipper of target `t` (the `i`th), its progress shown in `status`.
fn new_shipper(t: &TargetRun, i: usize, s: &ShipperSetup<'_>) -> Shipper {
    let stats = Arc::new(ShipStats::default());
    s.sh.board.track_sync(
        &t.name,
        crate::progress::Tracked {
            scan: t.scan_stats.clone(),
            ship: stats.clone(),
            scan_done: t.scan_done.clone(),
        },
    );
    let defer_ok = matches!(t.target.as_ref(), Target::Local(l) if crate::durability::local_disk(l.root().fd()));
    Shipper {
        links: Default::default(),
        boot_id: if defer_ok { s.boot.clone() } else { None },
        boot_gen: 0,
        run_seq0: s.run_seq0,
        rounds: 0,
        progress_ticks: Default::default(),
        progress_bar: None,
        t: t.id,
        name: t.name.clone(),
        journal: s.sh.journal.clone(),
        source: s.sh.source.clone(),
        target: t.target.clone(),
        filter: s.sh.filter.clone(),
        policy: s.sh.policy,
        owner: s.sh.owner,
        delay: s.delay,
        wake: t.wake_rx.clone(),
        stop: s.sh.stop.clone(),
        stats,
        scan_done: t.scan_done.clone(),
        hurry: t.hurry.clone(),
        scan_stats: t.scan_stats.clone(),
        retry: Default::default(),
        cursor: None,
        reported_initial: false,
        acc: Default::default(),
        inflight: Default::default(),
        acc_wrote: false,
        last_flush: Instant::now(),
        flush_tx: None,
        board: s.sh.board.clone(),
        last_report: None,
        scan_pool: s.sh.scan_pool.clone(),
        io_pool: match *t.target {
            Target::Remote(_) => rayon::ThreadPoolBuilder::new()
                .num_threads(crate::ship::REMOTE_IN_FLIGHT)
                .thread_name(move |n| format!("send-{i}-{n}"))
                .build()
                .ok()
                .map(Arc::new),
            Target::Local(_) => None,
        },
        report_every: Duration::from_secs(1),
        log_limit: Default::default(),
        target_up: true,
    }
}

/// The local roots held open (name, path, and the directory's identity),
/// which the pulse checks are still the ones in place.
type LocalRoots = Vec<(String, PathBuf, crate::pulse::FileId)>;

/// Opens every configured target (a remote one connects on first use) and
/// settles what its last run left in doubt.
fn open_targets(
    cfg: &Config,
    journal: &Arc<Journal>,
    source: &Arc<Root>,
    filter: &Arc<Filter>,
    policy: DeletePolicy,
    owner: bool,
) -> Result<(Vec<TargetRun>, LocalRoots), DaemonError> {
    let mut targets = Vec::new();
    let mut local_roots = Vec::new();
    for t in &cfg.targets {
        let id = journal.target_id(&t.name)?;
        // Before anything reads the index (see `Journal::doubt_put`).
        let doubted = journal.resolve_doubts(id)?;
        if doubted > 0 {
            tracing::info!(
                "target {}: the last run stopped while changing {doubted} path(s) on it: \
                 what the journal says the target holds there is forgotten, and compared \
                 with the target itself",
                t.name
            );
        }
        journal.distrust_renamed(id)?;
        // A remote target connects on first use: one that is down at start
        // must not keep the daemon (and capture) from starting.
        let target = match &t.remote {
            Some(spec) => {
                let r = RemoteTarget::new(&t.name, spec.clone(), owner).keeping(cfg.keep);
                let wrong_target = policy
                    .at_startup
                    .then(|| (source.clone(), filter.clone(), t.adopt));
                r.guard_identity(journal.clone(), id, wrong_target);
                Target::Remote(Box::new(r))
            }
            None => {
                let guard = policy.at_startup.then_some((&**source, &**filter));
                Target::Local(open_local(journal, id, t, owner, cfg.keep, guard)?)
            }
        };
        if let Target::Local(l) = &target {
            let held = identity::file_id(l.dir_fd()).map_err(|source| DaemonError::Target {
                name: t.name.clone(),
                path: t.path.clone(),
                source,
            })?;
            local_roots.push((t.name.clone(), t.path.clone(), held));
        }
        let (wake, wake_rx) = bounded(1);
        targets.push(TargetRun {
            id,
            name: t.name.clone(),
            target: Arc::new(target),
            wake,
            wake_rx,
            scan_done: Arc::new(AtomicBool::new(false)),
            hurry: Default::default(),
            scan_stats: Arc::new(ScanStats::default()),
        });
    }
    Ok((targets, local_roots))
}

/// Copies the last run recorded before flushing them (see
/// [`crate::durability`]) are lost if the machine went down since: such a
/// local target is compared whole again. (A remote target's note is of its
/// receiver's machine: its shipper's flusher compares it with the boot the
/// receiver reports.)
///
/// Returns the boot id (see [`crate::durability::boot_id`]).
fn forget_unflushed(
    journal: &Journal,
    targets: &[TargetRun],
) -> Result<Option<Vec<u8>>, DaemonError> {
    let boot = crate::durability::boot_id();
    for t in targets {
        if !matches!(t.target.as_ref(), Target::Local(_)) {
            continue;
        }
        if let Some(noted) = journal.unflushed(t.id)? {
            if boot.as_deref() != Some(noted.as_slice()) {
                tracing::warn!(
                    target = %t.name,
                    "the machine restarted (or a flush failed) before the last copies to this \
                     target were on its disk: comparing the whole target with the source again"
                );
                journal.forget_target(t.id)?;
            }
        }
    }
    Ok(boot)
}

/// What a capture group is set up with: the source, its filter, the
/// journal, and the first target (whose index inotify asks about renames).
struct CaptureSetup<'a> {
    cfg: &'a Config,
    filter: &'a Arc<Filter>,
    journal: &'a Arc<Journal>,
    first: Option<TargetId>,
}

/// What a start must scan, as capture was set up (see
/// [`CaptureSetup::start`]).
#[derive(Clone, Copy)]
struct Capture {
    /// Capture ran without a gap since the last run started: a startup
    /// scan it did not finish can resume from its checkpoint.
    gapless: bool,
    /// And every scan had finished: nothing to scan.
    seamless: bool,
    /// Without a gapless handover: changes are known captured up to here
    /// (see `Compare::changed_dirs_first`).
    whole_until: Option<u64>,
}

impl CaptureSetup<'_> {
    /// Sets capture up: the group the service manager kept (see
    /// [`CaptureSetup::adopt_stored`]) or a new one, the daemon's own
    /// writes kept out, the group stored for the next start; and works out
    /// what this start must scan. With the watcher, its feeds for the
    /// startup scan.
    fn start(
        &self,
        jpath: &Path,
        targets: &[TargetRun],
    ) -> Result<(Box<dyn Watcher>, Feeds, Capture), DaemonError> {
        let journal = self.journal;
        let source_key = std::fs::canonicalize(&self.cfg.source)
            .map(|p| p.into_os_string().into_encoded_bytes())
            .unwrap_or_default();
        // Events the last run took off the kernel queue but never recorded
        // are lost even when the queue itself is handed over.
        let lost_read = journal.capture_was_reading()?;
        let adopted = self.adopt_stored(lost_read, &source_key)?;
        let handed_over = adopted.is_some();
        let mut watcher = match adopted {
            Some(w) => w,
            None => self.new_watcher()?,
        };
        let feeds = (watcher.dir_feed(), watcher.complete_watch());
        keep_own_writes_out(watcher.as_mut(), jpath, handed_over, targets);
        if !handed_over {
            if let Some(fd) = watcher.store_fd() {
                if crate::handover::store(watcher.backend(), fd) {
                    journal.meta_put(crate::journal::META_CAPTURE_SOURCE, &source_key)?;
                }
            }
        }
        journal.set_capture_reading(false)?;
        let mut scans_complete = true;
        for t in targets {
            scans_complete &= journal.scan_complete(t.id)?;
        }
        let gapless = handed_over && !lost_read;
        let seamless = gapless && scans_complete;
        // Read before capture starts: it moves on from here.
        let whole_until = if gapless {
            None
        } else {
            journal.captured_through()?
        };
        if !seamless {
            lag_floor(journal, targets.iter().map(|t| t.id))?;
        }
        if handed_over && seamless {
            tracing::info!(
                "capture handed over by the service manager: no event was missed, no rescan needed"
            );
        } else if handed_over {
            tracing::info!(
                "capture handed over by the service manager, but {}: rescanning",
                if lost_read {
                    "the last run died holding events it had not recorded"
                } else {
                    "a startup scan had not finished"
                }
            );
        }
        let cap = Capture {
            gapless,
            seamless,
            whole_until,
        };
        Ok((watcher, feeds, cap))
    }

    /// The capture group the service manager kept across the last stop (see
    /// [`crate::handover`]), taken over if it was set up for this source and
    /// backend and can be trusted; otherwise dropped.
    fn adopt_stored(
        &self,
        lost_read: bool,
        source_key: &[u8],
    ) -> Result<Option<Box<dyn Watcher>>, DaemonError> {
        let (cfg, filter, journal, first) = (self.cfg, self.filter, self.journal, self.first);
        let Some((backend, fd)) = crate::handover::take_stored() else {
            return Ok(None);
        };
        let same = journal
            .meta_get(crate::journal::META_CAPTURE_SOURCE)?
            .as_deref()
            == Some(source_key);
        let wanted = match cfg.watch {
            WatchMode::Auto => true,
            WatchMode::Fanotify => backend == "fanotify",
            WatchMode::Inotify => backend == "inotify",
        };
        let (f, j) = (filter.clone(), journal.clone());
        let taken = if !same || !wanted {
            Err("it was set up for another source or backend".to_string())
        } else if backend == "fanotify" {
            // fanotify events name the object (a file handle), not a watch:
            // the group is sound even if the last run lost events it had
            // read; the rescan finds those.
            FanotifyWatcher::adopt(fd, &cfg.source, f, j, !lost_read)
                .map(|w| Box::new(w) as Box<dyn Watcher>)
                .map_err(|e| e.to_string())
        } else if lost_read {
            // inotify events name a watch number: a run that died mid-read
            // may have moved watches it never recorded.
            Err("the last run died holding events it had not recorded".to_string())
        } else {
            InotifyWatcher::adopt(fd, &cfg.source, f, j, first)
                .map(|w| Box::new(w) as Box<dyn Watcher>)
                .map_err(|e| e.to_string())
        };
        match taken {
            Ok(w) => Ok(Some(w)),
            Err(why) => {
                tracing::info!("dropping the stored {backend} capture descriptor: {why}");
                crate::handover::remove_stored(backend);
                Ok(None)
            }
        }
    }

    /// A new capture group, of the backend `watch` asks for (`auto`: fanotify
    /// where the kernel and filesystems allow it, inotify otherwise).
    fn new_watcher(&self) -> Result<Box<dyn Watcher>, DaemonError> {
        let (cfg, filter, journal, first) = (self.cfg, self.filter, self.journal, self.first);
        let inotify = || -> Result<Box<dyn Watcher>, WatchError> {
            let w = InotifyWatcher::start(&cfg.source, filter.clone(), journal.clone(), first)?;
            Ok(Box::new(w))
        };
        let fanotify = || -> Result<Box<dyn Watcher>, WatchError> {
            let w = FanotifyWatcher::start(&cfg.source, filter.clone(), journal.clone())?;
            Ok(Box::new(w))
        };
        Ok(match cfg.watch {
            WatchMode::Inotify => inotify()?,
            WatchMode::Fanotify => fanotify()?,
            WatchMode::Auto => match fanotify() {
                Ok(w) => {
                    tracing::info!("capture backend: fanotify (watch = \"auto\"; the kernel and filesystem support it)");
                    w
                }
                Err(e @ WatchError::Unsupported(_)) => {
                    tracing::info!("capture backend: inotify (watch = \"auto\"; {e})");
                    inotify()?
                }
                Err(e) => return Err(e.into()),
            },
        })
    }
}

/// With fanotify, writes to the journal and to a local target on a
/// filesystem under the source come back as events: kept out of the
/// kernel queue (see [`crate::watch::self_ignore`]).
fn keep_own_writes_out(
    watcher: &mut dyn Watcher,
    jpath: &Path,
    handed_over: bool,
    targets: &[TargetRun],
) {
    match watcher.self_ignore(vec![jpath.to_path_buf()]) {
        Ok(Some(ig)) => {
            if handed_over {
                let ig = ig.clone();
                let spawned = std::thread::Builder::new()
                    .name("ignore-reset".into())
                    .spawn(move || ig.reset());
                if let Err(e) = spawned {
                    tracing::debug!("cannot start the ignore-mark reset: {e}");
                }
            }
            for t in targets {
                if let Target::Local(l) = t.target.as_ref() {
                    if ig.covers(l.root().fd()) {
                        l.ignore_own_writes(ig.clone());
                    }
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}; drmirror's own writes will wake capture (and be dropped)"),
    }
}

/// A target's startup scan: compares the whole source with what the
/// target holds (the journal's index where it can be trusted, the target
/// itself where not) and enqueues what differs; then says so
/// (`scan_done`), which the lag and the heartbeat wait for.
struct StartupScan {
    sh: Shared,
    id: TargetId,
    name: String,
    target: Arc<Target>,
    dirs_seen: Option<Sender<Vec<Vec<u8>>>>,
    complete_watch: Option<crate::watch::CompleteWatch>,
    scan_done: Arc<AtomicBool>,
    stats: Arc<ScanStats>,
    wake: Sender<()>,
    hurry: crate::ship::Hurry,
    /// What capture's set-up leaves this scan to do.
    cap: Capture,
    absent_ok: bool,
    /// Directories that may hold temporary files of copies cut short (see
    /// `Journal::pending_parents`), when they could be listed.
    temp_dirs: Option<HashSet<Vec<u8>>>,
}

impl StartupScan {
    fn run(self) -> Result<(), DaemonError> {
        if self.cap.seamless {
            tracing::info!(
                "startup scan skipped target={}: capture was handed over and nothing was missed",
                self.name
            );
            self.sh.board.update(|s| s.scan_running = false);
            self.done();
            return Ok(());
        }
        if let Target::Remote(r) = self.target.as_ref() {
            r.settle_before_scan();
        }
        self.check_index_sample()?;
        let resume = self.resume_list()?;
        let expected = self.sh.journal.scan_entries(self.id)?;
        self.sh
            .board
            .track_scan(self.stats.clone(), expected.unwrap_or(0));
        let pb = crate::progress::spinner(&format!(
            "{{spinner}} startup scan of {}: {{pos}} entries compared ({{per_sec}})",
            self.name
        ));
        let cmp = Compare {
            // The journal's distrust applies (see `journal::trust`).
            distrust: &[],
            source: &self.sh.source,
            target: &self.target,
            journal: &self.sh.journal,
            t: self.id,
            filter: &self.sh.filter,
            owner: self.sh.owner,
            stats: &self.stats,
            stop: &self.sh.stop,
            progress: Some(&pb),
            dirs_seen: self.dirs_seen.as_ref(),
            absent_ok: self.absent_ok,
        };
        let t0 = Instant::now();
        self.stats.walk_seq0.store(u64::MAX, Ordering::Release);
        metrics::gauge!("drmirror_scan_running").increment(1.0);
        metrics::gauge!("drmirror_startup_scan_in_progress", "target" => self.name.clone())
            .set(1.0);
        // Nothing mirrored yet (a first sync): the walk compares it all
        // with the target's listing, and a first pass would only send the
        // root's files a second time (its entries in flight when the walk
        // compares them again).
        if !self.sh.journal.index_children(self.id, b"")?.is_empty() {
            self.changed_dirs_first(&cmp, t0)?;
        }
        // Compare nothing that capture would not also see change from then
        // on (see `Watcher::complete_watch`). The wait is capture's setup,
        // not the scan's work: it is logged apart and left out of the
        // scan's rate.
        let waited = Instant::now();
        if let Some(cw) = &self.complete_watch {
            let _ = cw.go.try_send(());
            let _ = cw.done.recv();
        }
        let waited = waited.elapsed();
        let deletions = self.deletions(&cmp)?;
        self.stats
            .walk_seq0
            .store(self.sh.journal.seq_now(), Ordering::Release);
        let t_walk = Instant::now();
        let r = self
            .sh
            .scan_pool
            .install(|| cmp.reconcile(b"", flags::STARTUP, Some(&resume), deletions));
        let walk_ms = t_walk.elapsed().as_millis();
        pb.finish_and_clear();
        metrics::gauge!("drmirror_scan_running").decrement(1.0);
        metrics::gauge!("drmirror_startup_scan_in_progress", "target" => self.name.clone())
            .set(0.0);
        self.sh.board.update(|s| s.scan_running = false);
        r.and_then(|()| self.record_complete(deletions))?;
        let secs = t0.elapsed().saturating_sub(waited).as_secs_f64();
        let scanned = self.stats.scanned.load(Ordering::Relaxed);
        tracing::info!(
            "startup scan done target={} scanned={} differing={} in_sync={} errors={} resumed_subtrees={} deletions={} secs={:.2} rate={:.0}/s capture_wait_ms={} walk_ms={}",
            self.name,
            scanned,
            self.stats.differing(),
            self.stats.in_sync.load(Ordering::Relaxed),
            self.stats.errors.load(Ordering::Relaxed),
            self.stats.resumed.load(Ordering::Relaxed),
            match deletions {
                Deletions::Index => "index",
                _ => "target-listing",
            },
            secs,
            scanned as f64 / secs.max(1e-6),
            waited.as_millis(),
            walk_ms
        );
        // What it found is enqueued, stamped with the floor: the lag stays
        // until that is applied.
        self.sh.journal.clear_startup_floor(self.id);
        self.done();
        Ok(())
    }

    /// Tells the shipper (and the heartbeat) that the scan is through.
    fn done(&self) {
        self.scan_done.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
    }

    /// A sample of what the index says the target holds, checked on the
    /// target: if it does not hold, the index is forgotten.
    fn check_index_sample(&self) -> Result<(), DaemonError> {
        let t0 = Instant::now();
        let lookup = |paths: &[Vec<u8>]| match self.target.as_ref() {
            Target::Local(l) => paths.iter().map(|p| l.root().lstat(p)).collect(),
            Target::Remote(r) => r.lstat_many(paths),
        };
        if let Some(why) = identity::sample_holds(&self.sh.journal, self.id, self.sh.owner, lookup)?
        {
            tracing::warn!(
                "target {}: {why}: comparing the whole target with the \
                 source, not trusting what the journal says it holds",
                self.name
            );
            self.sh.journal.forget_target(self.id)?;
        } else {
            tracing::debug!(target = %self.name, ms = t0.elapsed().as_millis() as u64, "index sample checked");
        }
        Ok(())
    }

    /// The directories an interrupted scan checkpointed, when it may
    /// resume (only a scan that was cut short has a checkpoint); the scan
    /// is marked incomplete until it ends.
    fn resume_list(&self) -> Result<HashSet<Vec<u8>>, DaemonError> {
        let (j, id) = (&self.sh.journal, self.id);
        let resume = if !j.scan_complete(id)? && self.cap.gapless {
            j.recon_done_list(id)?
        } else {
            j.recon_done_clear(id)?;
            Default::default()
        };
        j.set_scan_complete(id, false)?;
        if !resume.is_empty() {
            tracing::info!(
                "startup scan resumes target={}: capture was handed over without a gap, and the interrupted scan had checkpointed {} directories",
                self.name,
                resume.len()
            );
        }
        Ok(resume)
    }

    /// Directories that changed since they were last mirrored stand out,
    /// and go first (see `Compare::changed_dirs_first`); what the crash or
    /// stop left unmirrored is then all enqueued, and shipped at once.
    fn changed_dirs_first(&self, cmp: &Compare, t0: Instant) -> Result<(), DaemonError> {
        let pre_stats = ScanStats::default();
        let pre = Compare {
            stats: &pre_stats,
            progress: None,
            dirs_seen: None,
            ..*cmp
        };
        // The filesystem stamps changes with a clock up to a tick behind.
        let recent = self
            .cap
            .whole_until
            .map(|ns| ns.saturating_sub(1_000_000_000) as i64);
        let n = self
            .sh
            .scan_pool
            .install(|| pre.changed_dirs_first(flags::STARTUP, recent))?;
        tracing::info!(
            "changed directories compared first target={} dirs={n} differing={} ms={}",
            self.name,
            pre_stats.differing(),
            t0.elapsed().as_millis()
        );
        self.hurry.set();
        let _ = self.wake.try_send(());
        Ok(())
    }

    /// How the walk finds what the source lacks. Once a complete scan has
    /// listed the target, the index accounts for all it holds, bar the
    /// temporary files of copies cut short (removed here first): deletions
    /// are found in it, with no target listing. With `delete` at startup,
    /// that scan must also have deleted the extras it found (not so under a
    /// policy that kept them).
    fn deletions(&self, cmp: &Compare) -> Result<Deletions, DaemonError> {
        let (j, id) = (&self.sh.journal, self.id);
        let index_whole =
            j.index_whole(id)? && (!self.sh.policy.at_startup || j.scan_deleted_extras(id)?);
        Ok(match &self.temp_dirs {
            Some(dirs) if index_whole => {
                self.sh
                    .scan_pool
                    .install(|| cmp.remove_stale_temps(dirs, flags::STARTUP))?;
                Deletions::Index
            }
            _ => Deletions::TargetListing,
        })
    }

    /// Records a walk that ran to the end (one cut short by a stop must run
    /// again next time).
    fn record_complete(&self, deletions: Deletions) -> Result<(), JournalError> {
        if self.sh.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (j, id) = (&self.sh.journal, self.id);
        j.set_scan_complete(id, true)?;
        j.set_index_whole(id)?;
        if deletions == Deletions::TargetListing {
            j.set_scan_deleted_extras(id, self.sh.policy.at_startup)?;
        }
        j.recon_done_clear(id)?;
        // A whole walk: the next one's 100%.
        if self.stats.resumed.load(Ordering::Relaxed) == 0 {
            j.set_scan_entries(id, self.stats.scanned.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// The run itself, under the state directory's `lock`; puts its status
/// board in `board_out`, for `status` to be answered after it stopped.
fn run_daemon(
    cfg: Config,
    lock: &File,
    board_out: &std::sync::OnceLock<Arc<crate::status::Board>>,
) -> Result<(), DaemonError> {
    raise_fd_limit();
    // Named, so that `top -H` and perf tell the copy workers apart: unnamed,
    // they took the name of whichever thread first used the pool (`ship-0`).
    // An error means the pool exists already (a second run in one process).
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("work-{i}"))
        .build_global();
    let guard =
        crate::pulse::StateDirGuard::new(cfg.state_dir.join("lock"), lock).map_err(|source| {
            DaemonError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            }
        })?;
    let jpath = cfg.state_dir.join("journal");
    let (journal, rebuilt) = crate::rebuild::open(&cfg, &jpath)?;
    let journal = Arc::new(journal);
    journal.set_backlog_bound(cfg.backlog.max_entries, cfg.backlog.max_bytes);
    let endpoint = metrics_endpoint(&cfg);
    metrics::gauge!("drmirror_journal_rebuilt").set(if rebuilt.is_some() { 1.0 } else { 0.0 });
    let owner = rustix::process::geteuid().is_root();
    let source = Arc::new(
        Root::open(&cfg.source).map_err(|source| DaemonError::Source {
            path: cfg.source.clone(),
            source,
        })?,
    );
    let filter = Arc::new(Filter::new(&cfg.source, &cfg.exclude)?);
    let policy = DeletePolicy {
        at_startup: cfg.delete.at_startup(),
        while_running: cfg.delete.while_running(),
    };

    let (targets, local_roots) = open_targets(&cfg, &journal, &source, &filter, policy, owner)?;
    let boot = forget_unflushed(&journal, &targets)?;
    let run_seq0 = journal.seq_now();
    let started = Instant::now();
    let setup = CaptureSetup {
        cfg: &cfg,
        filter: &filter,
        journal: &journal,
        first: targets.first().map(|t| t.id),
    };
    let (watcher, (dir_feed, complete_watch), cap) = setup.start(&jpath, &targets)?;
    let board = new_board(&cfg, watcher.backend(), rebuilt, &targets);
    let _ = board_out.set(board.clone());
    let (fatal_tx, fatal_rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let sup = Arc::new(Supervisor::new(stop.clone(), fatal_tx));
    let scan_pool = new_scan_pool()?;
    let mut threads: Vec<JoinHandle<()>> = vec![spawn_status(&sup, &cfg.state_dir, &board, &stop)?];
    let pulse = crate::pulse::Pulse {
        journal: journal.clone(),
        targets: targets.iter().map(|t| (t.id, t.name.clone())).collect(),
        board: board.clone(),
        guard,
        local_roots,
        stop: stop.clone(),
        process: Default::default(),
    };
    threads.push(spawn_pulse(&sup, pulse, endpoint)?);
    tracing::info!(
        "drmirror ready backend={} watches={} source={} targets={} setup_ms={} ({})",
        watcher.backend(),
        watcher.watched(),
        cfg.source.display(),
        targets.len(),
        started.elapsed().as_millis(),
        watcher.describe()
    );
    threads.push(spawn_capture(
        &sup,
        watcher,
        &journal,
        &targets,
        &stop,
        &board,
        cap.seamless,
    )?);

    // Shippers, scrubs and startup scans.
    let sh = Shared {
        journal: journal.clone(),
        source,
        filter,
        policy,
        owner,
        board,
        stop: stop.clone(),
        scan_pool,
    };
    let ship = ShipperSetup {
        sh: &sh,
        delay: cfg.delay,
        boot: &boot,
        run_seq0,
    };
    for (i, t) in targets.iter().enumerate() {
        // One scan reporting directories is enough for the watcher.
        let feeds = (
            if i == 0 { dir_feed.clone() } else { None },
            complete_watch.clone(),
        );
        spawn_target(
            &sup,
            &mut threads,
            (t, i),
            &ship,
            &cap,
            feeds,
            cfg.scrub_interval,
        )?;
    }
    // The scans hold the only senders now: their end tells the watcher
    // that the restored watch tree is confirmed.
    drop(dir_feed);
    drop(complete_watch);

    let outcome = wait_for_stop(fatal_rx);
    stop.store(true, Ordering::SeqCst);
    for t in &targets {
        let _ = t.wake.try_send(());
    }
    crate::status::wake(&cfg.state_dir);
    let mut panicked = None;
    for th in threads {
        let name = th.thread().name().unwrap_or("worker").to_string();
        if th.join().is_err() {
            panicked = Some(name);
        }
    }
    journal.flush()?;
    outcome?;
    if let Some(name) = panicked {
        return Err(DaemonError::Panic(name));
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The metrics endpoint, bound (served once the lag is published: see
/// `telemetry::Endpoint`). Metrics are how the RPO is watched, but a
/// mirror that stops replicating because a port is taken would be worse:
/// an error is logged and the daemon runs without it.
fn metrics_endpoint(cfg: &Config) -> Option<(std::net::SocketAddr, crate::telemetry::Endpoint)> {
    cfg.metrics_listen
        .and_then(|addr| match crate::telemetry::install(addr) {
            Ok(e) => Some((addr, e)),
            Err(e) => {
                tracing::error!("{e}; running without the metrics endpoint");
                None
            }
        })
}

/// The status board `drmirror status` reads, as a start begins.
fn new_board(
    cfg: &Config,
    backend: &str,
    rebuilt: Option<PathBuf>,
    targets: &[TargetRun],
) -> Arc<crate::status::Board> {
    metrics::gauge!(
        "drmirror_capture_info",
        "backend" => backend.to_string(),
        "source" => cfg.source.display().to_string()
    )
    .set(1.0);
    Arc::new(crate::status::Board::new(crate::status::Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        source: cfg.source.display().to_string(),
        capture_backend: backend.to_string(),
        scan_running: true,
        journal_rebuilt: rebuilt.map(|p| p.display().to_string()),
        scan_entries: 0,
        scan_expected: 0,
        uncaptured: Vec::new(),
        waiting: None,
        targets: targets
            .iter()
            .map(|t| crate::status::TargetStatus {
                name: t.name.clone(),
                up: true,
                ..Default::default()
            })
            .collect(),
    }))
}

/// The pool scans (startup, rescans) run on. Their own: rayon serves work
/// from outside a pool only when its workers are idle, so a long scan on
/// the global pool would hold back live capture (new directories are
/// walked there) and the shippers' copies for as long as it runs.
fn new_scan_pool() -> Result<Arc<rayon::ThreadPool>, DaemonError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name(|i| format!("scan-{i}"))
        // Below the capture and shipper threads: a rescan must not hold
        // back live changes (the restart window) on a small machine.
        .start_handler(|_| {
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
        })
        .build()
        .map_err(|e| DaemonError::Signals(std::io::Error::other(e)))?;
    Ok(Arc::new(pool))
}

/// Publishes the first figures, then serves the metrics (`endpoint`) and
/// starts the pulse that keeps them current.
fn spawn_pulse(
    sup: &Arc<Supervisor>,
    pulse: crate::pulse::Pulse,
    endpoint: Option<(std::net::SocketAddr, crate::telemetry::Endpoint)>,
) -> Result<JoinHandle<()>, DaemonError> {
    pulse.prime()?;
    if let Some((addr, e)) = endpoint {
        match e.serve() {
            Ok(()) => tracing::info!("metrics on http://{addr}/metrics"),
            Err(e) => tracing::error!("{e}; running without the metrics endpoint"),
        }
    }
    sup.spawn("pulse", Role::Essential, move || pulse.run())
}

/// Serves `drmirror status` on the state directory's socket.
fn spawn_status(
    sup: &Arc<Supervisor>,
    state_dir: &Path,
    board: &Arc<crate::status::Board>,
    stop: &Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DaemonError> {
    let listener = crate::status::bind(state_dir).map_err(|source| DaemonError::StateDir {
        path: state_dir.join(crate::status::SOCKET_NAME),
        source,
    })?;
    let (board, stop) = (board.clone(), stop.clone());
    sup.spawn("status", Role::Essential, move || {
        listener.serve(&board, &stop);
        Ok(())
    })
}

/// Tells systemd capture is live (`READY=1`; the scan follows) and starts
/// the capture thread.
fn spawn_capture(
    sup: &Arc<Supervisor>,
    mut watcher: Box<dyn Watcher>,
    journal: &Arc<Journal>,
    targets: &[TargetRun],
    stop: &Arc<AtomicBool>,
    board: &Arc<crate::status::Board>,
    seamless: bool,
) -> Result<JoinHandle<()>, DaemonError> {
    let (stop, journal, board) = (stop.clone(), journal.clone(), board.clone());
    let ids: Vec<TargetId> = targets.iter().map(|t| t.id).collect();
    let wakers: Vec<_> = targets
        .iter()
        .map(|t| (t.wake.clone(), t.hurry.clone()))
        .collect();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(if seamless {
            "capturing (handed over, no rescan)"
        } else {
            "capturing; startup scan running"
        }),
    ]);
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut heartbeat =
        crate::heartbeat::Heartbeat::new(targets.iter().map(|t| t.scan_done.clone()).collect());
    sup.spawn("capture", Role::Essential, move || {
        capture_loop(
            watcher.as_mut(),
            &journal,
            &ids,
            &wakers,
            &stop,
            watchdog,
            &board,
            &mut heartbeat,
        )
    })
}

/// The directory feed and the watch tree's confirmation a startup scan
/// gives the watcher (see [`Watcher::dir_feed`]).
type Feeds = (
    Option<Sender<Vec<Vec<u8>>>>,
    Option<crate::watch::CompleteWatch>,
);

/// Starts target `t`'s (the `i`th) threads: its shipper, its scrub (every
/// `scrub`, if any) and its startup scan (as `cap` allows).
fn spawn_target(
    sup: &Arc<Supervisor>,
    threads: &mut Vec<JoinHandle<()>>,
    (t, i): (&TargetRun, usize),
    s: &ShipperSetup<'_>,
    cap: &Capture,
    (dirs_seen, complete_watch): Feeds,
    scrub: Option<Duration>,
) -> Result<(), DaemonError> {
    let journal = &s.sh.journal;
    // Before this run ships anything (see `Journal::pending_parents`).
    let temp_dirs = if cap.seamless {
        None
    } else {
        journal.pending_parents(t.id, 200_000)?
    };
    let absent_ok = !journal.pending_any(t.id)?;
    let shipper = new_shipper(t, i, s);
    threads.push(
        sup.spawn(format!("ship-{}", t.id), Role::Essential, move || {
            shipper.run().map_err(DaemonError::from)
        })?,
    );
    if let Some(interval) = scrub {
        let sh = s.sh;
        let scrub = crate::scrub::Scrub {
            t: t.id,
            name: t.name.clone(),
            journal: journal.clone(),
            source: sh.source.clone(),
            target: t.target.clone(),
            filter: sh.filter.clone(),
            owner: sh.owner,
            interval,
            scan_done: t.scan_done.clone(),
            wake: t.wake.clone(),
            board: sh.board.clone(),
            stop: sh.stop.clone(),
        };
        threads.push(
            sup.spawn(format!("scrub-{}", t.id), Role::Essential, move || {
                scrub.run()
            })?,
        );
    }
    let scan = StartupScan {
        sh: s.sh.clone(),
        id: t.id,
        name: t.name.clone(),
        target: t.target.clone(),
        dirs_seen,
        complete_watch,
        scan_done: t.scan_done.clone(),
        stats: t.scan_stats.clone(),
        wake: t.wake.clone(),
        hurry: t.hurry.clone(),
        cap: *cap,
        absent_ok,
        temp_dirs,
    };
    threads.push(sup.spawn(format!("scan-{}", t.id), Role::Task, move || scan.run())?);
    Ok(())
}

/// Waits for SIGTERM or SIGINT (`Ok`), or for a part of the daemon that
/// died (its error).
fn wait_for_stop(
    mut fatal_rx: tokio::sync::mpsc::UnboundedReceiver<DaemonError>,
) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Signals)?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); Ok(()) }
            Some(e) = fatal_rx.recv() => Err(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rename(from: &str, to: &str) -> Event {
        Event::Rename {
            from: from.as_bytes().to_vec(),
            to: to.as_bytes().to_vec(),
        }
    }

    #[test]
    fn an_exchange_becomes_two_whole_rescans_not_two_renames() {
        let out = to_changes(vec![rename("a", "b"), rename("b", "a")]);
        let f = flags::RECURSIVE | flags::CONTENT | flags::LIVE;
        assert_eq!(out.len(), 2, "{out:?}");
        for p in ["a", "b"] {
            assert!(
                out.iter().any(|c| matches!(c, Change::Dirty { path, flags } if path == p.as_bytes() && *flags == f)),
                "{p}: {out:?}"
            );
        }
        // Other renames between the halves (other processes), or a poll
        // boundary, do not hide the exchange.
        let out = to_changes(vec![rename("a", "b"), rename("x", "y"), rename("b", "a")]);
        assert!(
            matches!(&out[..], [Change::Rename { from, .. }, Change::Dirty { .. }, Change::Dirty { .. }] if from == b"x"),
            "{out:?}"
        );
        let mut fold = Fold::default();
        let first = fold.changes(vec![rename("a", "b")]);
        assert!(matches!(&first[..], [Change::Rename { .. }]), "{first:?}");
        let second = fold.changes(vec![rename("p", "q"), rename("b", "a")]);
        assert!(
            matches!(&second[..], [Change::Rename { .. }, Change::Rename { from, .. }, Change::Dirty { flags: fl, .. }, Change::Dirty { .. }] if from == b"b" && *fl == f),
            "{second:?}"
        );
        // A rename between them that touches a side keeps them apart.
        let out = to_changes(vec![rename("a", "b"), rename("b/x", "c"), rename("b", "a")]);
        assert_eq!(
            out.iter()
                .filter(|c| matches!(c, Change::Rename { .. }))
                .count(),
            3,
            "{out:?}"
        );
        // A chain that does not come back stays renames, in order.
        let out = to_changes(vec![rename("a", "b"), rename("b", "c")]);
        assert!(
            matches!(&out[..], [Change::Rename { to: t1, .. }, Change::Rename { to: t2, .. }] if t1 == b"b" && t2 == b"c"),
            "{out:?}"
        );
    }
}
