//! The background scrub: a slow, continuous comparison of each target with
//! the source that does not trust the journal's index, so a target that
//! diverged behind drmirror's back (a file changed or removed on the DR
//! side, a change capture never saw) is found, counted and repaired.
//!
//! One pass visits the source root and every directory of the journal's
//! directory list (see [`Journal::dirlist_chunks`]); in each it lists the
//! source and the target directory and compares each entry's metadata
//! (kind, mode, mtime, size, owner, symlink text: what [`Meta::mirrors`]
//! compares), for the kinds of entry the target holds
//! ([`Target::holds_kind`]: a difference it could not mend is none).
//! Extended attributes, ACLs, link structure, holes and file content are
//! left to `drmirror verify`. A pass is paced to take `scrub_interval` (24 h by default):
//! entries per second = the last startup scan's entry count / interval,
//! never fewer than [`MIN_RATE`].
//!
//! Invariants:
//! - A difference is a **divergence** only if nothing in flight explains
//!   it. When seen, the source entry (or, for an entry only the target
//!   has, its source directory) must have been still for [`SETTLE`]
//!   (capture records a change well within that); the difference is then
//!   a *suspect*, judged once the journal's oldest pending change is
//!   younger than the suspect ([`Journal::oldest_pending_ns`] never reads
//!   later than the truth), i.e. once everything captured before it was
//!   seen has been applied, and no rename is pending. Only if by then the
//!   source entry is unchanged, nothing is pending at its path or above it
//!   and the target still differs is it a divergence: one the daemon would
//!   not have repaired by itself.
//! - A divergence is logged (WARN, with its path), counted
//!   (`drmirror_scrub_divergences_total{target}`, `status`), dropped from
//!   the index (which was wrong about it) and repaired through the
//!   ordinary queue: files with [`flags::CONTENT`], a
//!   directory the target lacks with [`flags::RECURSIVE`], an entry only
//!   the target has under the deletion rule of a startup scan
//!   ([`flags::STARTUP`]: `delete = "always"` or `"startup"`).
//! - The scrub writes nothing to a target itself and skips a target that
//!   is down (its identity failed, or it does not answer); the directory
//!   is visited again next pass.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Sender;

use crate::daemon::DaemonError;
use crate::filter::Filter;
use crate::fsops::{self, Root};
use crate::journal::{flags, now_ns, Completion, Journal, TargetId};
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::scan;
use crate::status::Board;
use crate::target::{DirView, Target};

/// The slowest pace, entries per second, whatever the interval.
pub const MIN_RATE: f64 = 50.0;
/// How long a source entry must have been still before a difference on it
/// counts as a divergence rather than a change on its way.
pub const SETTLE: Duration = Duration::from_secs(10);
/// The longest a pacing sleep lasts before the stop flag is checked.
const NAP: Duration = Duration::from_millis(250);

/// One target's scrub.
pub struct Scrub {
    pub t: TargetId,
    pub name: String,
    pub journal: Arc<Journal>,
    pub source: Arc<Root>,
    pub target: Arc<Target>,
    pub filter: Arc<Filter>,
    pub owner: bool,
    /// The time one full pass should take.
    pub interval: Duration,
    /// Set once the startup scan has finished: the scrub starts after it.
    pub scan_done: Arc<AtomicBool>,
    pub wake: Sender<()>,
    pub board: Arc<Board>,
    pub stop: Arc<AtomicBool>,
}

/// A difference seen by a pass, not yet judged: it is a divergence only if
/// it outlives everything that was in flight when it was seen.
struct Suspect {
    rel: Vec<u8>,
    /// The source entry when seen (None: only the target has it).
    src: Option<Meta>,
    /// What the repair enqueues.
    flag: u8,
    why: &'static str,
    /// When it was seen (the journal's clock, ns).
    seen_ns: u64,
}

/// At most this many suspects wait for the backlog to drain past them.
const MAX_SUSPECTS: usize = 100_000;

impl Scrub {
    /// Runs passes until stopped.
    pub fn run(self) -> Result<(), DaemonError> {
        while !self.scan_done.load(Ordering::Acquire) {
            if !self.nap(NAP) {
                return Ok(());
            }
        }
        let mut suspects = Vec::new();
        loop {
            let started = Instant::now();
            if !self.pass(&mut suspects)? {
                return Ok(());
            }
            // A small tree at the minimum pace is done early: the next
            // pass starts an interval after this one did.
            while started.elapsed() < self.interval {
                self.judge(&mut suspects)?;
                if !self.nap(NAP.min(self.interval.saturating_sub(started.elapsed()))) {
                    return Ok(());
                }
            }
        }
    }

    /// Sleeps `d` unless stopped; false once stopped.
    fn nap(&self, d: Duration) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(d);
        !self.stop.load(Ordering::Relaxed)
    }

    /// Entries per second for a pass over `entries` entries.
    fn rate(&self, entries: u64) -> f64 {
        (entries as f64 / self.interval.as_secs_f64().max(1.0)).max(MIN_RATE)
    }

    /// One pass; false if stopped before its end.
    fn pass(&self, suspects: &mut Vec<Suspect>) -> Result<bool, DaemonError> {
        let t0 = Instant::now();
        let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
        self.journal.dirlist_chunks(self.t, 4096, |chunk| {
            dirs.extend(chunk.into_iter().map(|(d, _)| d));
            true
        })?;
        let rate = self.rate(self.journal.scan_entries(self.t)?.unwrap_or(0));
        let (mut entries, mut skipped, mut divergences) = (0u64, 0u64, 0u64);
        for dir in &dirs {
            match self.up().then(|| self.check_dir(dir, suspects)).flatten() {
                Some(n) => entries += n,
                None => skipped += 1,
            }
            suspects.truncate(MAX_SUSPECTS);
            divergences += self.judge(suspects)?;
            // Paced by entries compared: ahead of schedule, wait.
            let due = Duration::from_secs_f64(entries as f64 / rate);
            while t0.elapsed() < due {
                if !self.nap(NAP.min(due.saturating_sub(t0.elapsed()))) {
                    return Ok(false);
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
        }
        self.finish_pass(t0, dirs.len() as u64, entries, divergences, skipped);
        Ok(true)
    }

    fn finish_pass(&self, t0: Instant, dirs: u64, entries: u64, divergences: u64, skipped: u64) {
        let labels = [("target", self.name.clone())];
        metrics::counter!("drmirror_scrub_passes_total", &labels).increment(1);
        metrics::counter!("drmirror_scrub_entries_total", &labels).increment(entries);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!("drmirror_scrub_last_pass_timestamp_seconds", &labels).set(now);
        self.board.update_target(&self.name, |s| {
            s.scrub_passes += 1;
            s.scrub_last_pass_unix = Some(now);
        });
        tracing::info!(
            "scrub pass done target={} dirs={dirs} entries={entries} divergences={divergences} skipped_dirs={skipped} secs={:.1}",
            self.name,
            t0.elapsed().as_secs_f64()
        );
    }

    /// Whether the target is up (the shipper and the identity check say so).
    fn up(&self) -> bool {
        self.board
            .snapshot()
            .targets
            .iter()
            .find(|s| s.name == self.name)
            .is_none_or(|s| s.up)
    }

    /// Compares source directory `dir` with the target's, adding what
    /// differs to `suspects`; the number of entries compared, or None if
    /// either side could not be listed (gone from the source since:
    /// capture's business; the target not answering: next pass).
    fn check_dir(&self, dir: &[u8], suspects: &mut Vec<Suspect>) -> Option<u64> {
        if !dir.is_empty() && self.filter.excluded(dir, true) {
            return Some(0);
        }
        let dmeta = self.source.lstat(dir).ok().flatten()?;
        let children = scan::read_children(&self.source, dir).ok()?;
        let seen_ns = now_ns();
        let mut suspect = |rel: Vec<u8>, src: Option<Meta>, flag: u8, why: &'static str| {
            let m = src.unwrap_or(dmeta);
            if still(&m, seen_ns) {
                suspects.push(Suspect {
                    rel,
                    src,
                    flag,
                    why,
                    seen_ns,
                })
            }
        };
        let Some(view) = self.target.view(dir).ok()? else {
            if !dir.is_empty() {
                suspect(dir.to_vec(), Some(dmeta), flags::RECURSIVE, "missing");
            }
            return Some(children.len() as u64);
        };
        for c in &children {
            // Not a kind this target holds: a difference it could not mend.
            if !self.target.holds_kind(c.meta.kind)
                || self.filter.excluded(&c.rel, c.meta.kind == Kind::Dir)
            {
                continue;
            }
            let name = paths::split(&c.rel).1;
            if let Some(why) = differs(&self.source, &c.rel, Some(&c.meta), &view, name, self.owner)
            {
                let flag = match (c.meta.kind, why) {
                    (Kind::Dir, "missing") => flags::RECURSIVE,
                    (Kind::File, _) => flags::CONTENT,
                    _ => 0,
                };
                suspect(c.rel.clone(), Some(c.meta), flag, why);
            }
        }
        let have: std::collections::HashSet<&[u8]> =
            children.iter().map(|c| paths::split(&c.rel).1).collect();
        for name in view.names() {
            if !have.contains(name.as_slice()) && self.extra(dir, &name, &view) {
                // Under the deletion rule of a startup scan.
                suspect(paths::join(dir, &name), None, flags::STARTUP, "extra");
            }
        }
        Some(children.len() as u64)
    }

    /// Whether `name`, which the source's `dir` lacks, is an entry only
    /// the target has that drmirror would delete (not one of its temporary
    /// files, not excluded).
    fn extra(&self, dir: &[u8], name: &[u8], view: &DirView) -> bool {
        let is_dir = view.lstat(name).is_some_and(|m| m.kind == Kind::Dir);
        !fsops::is_temp_name(name) && !self.filter.excluded(&paths::join(dir, name), is_dir)
    }

    /// Judges the suspects that everything in flight when they were seen
    /// has passed (the backlog's oldest change is younger): those whose
    /// source entry is unchanged and whose target still differs are
    /// divergences, repaired; the others are dropped. Returns how many
    /// divergences.
    fn judge(&self, suspects: &mut Vec<Suspect>) -> Result<u64, DaemonError> {
        if suspects.is_empty() {
            return Ok(0);
        }
        // A rename not yet applied moves whole subtrees on the target:
        // nothing is judged before it is.
        if !self.journal.renames(self.t, 1)?.is_empty() {
            return Ok(0);
        }
        let drained_to = self.journal.oldest_pending_ns(self.t).unwrap_or(u64::MAX);
        let (ripe, wait): (Vec<Suspect>, Vec<Suspect>) =
            suspects.drain(..).partition(|s| s.seen_ns < drained_to);
        *suspects = wait;
        // (path, flag, a directory the target has, with other attributes)
        let mut repairs: Vec<(Vec<u8>, u8, bool)> = Vec::new();
        for s in ripe {
            // Once per path, and not below a directory this judgement
            // already sends whole.
            let covered = repairs.iter().any(|(r, f, _)| {
                *r == s.rel || (f & flags::RECURSIVE != 0 && paths::is_within(&s.rel, r))
            });
            if !covered && self.still_differs(&s)? {
                tracing::warn!(
                    "scrub: target {} diverged from the source at {} ({}); repairing",
                    self.name,
                    show(&s.rel),
                    s.why
                );
                let dir_there = s.src.is_some_and(|m| m.kind == Kind::Dir) && s.why != "missing";
                repairs.push((s.rel, s.flag, dir_there));
            }
        }
        let n = repairs.len() as u64;
        if n > 0 {
            metrics::counter!("drmirror_scrub_divergences_total", "target" => self.name.clone())
                .increment(n);
            self.board
                .update_target(&self.name, |s| s.scrub_divergences += n);
            // The index was wrong about what the target holds there:
            // forgotten, so that the repair (a rescan of a missing
            // directory, say) compares with the target instead of trusting
            // it. Not a directory that is there with other attributes: its
            // subtree's entries (and the directory list the scrub walks)
            // stand.
            let wrong: Vec<Vec<u8>> = repairs
                .iter()
                .filter(|(_, _, dir_there)| !dir_there)
                .map(|(p, _, _)| p.clone())
                .collect();
            self.journal.complete(
                self.t,
                &Completion {
                    index_remove_tree: wrong,
                    requeue: repairs.into_iter().map(|(p, f, _)| (p, f)).collect(),
                    ..Completion::default()
                },
            )?;
            let _ = self.wake.try_send(());
        }
        Ok(n)
    }

    /// Whether suspect `s` is still there: its source entry as it was, no
    /// entry pending for it, and the target still different.
    fn still_differs(&self, s: &Suspect) -> Result<bool, DaemonError> {
        let src = self.source.lstat(&s.rel).ok().flatten();
        if src != s.src || self.pending_at_or_above(&s.rel)? {
            return Ok(false);
        }
        let (dir, name) = paths::split(&s.rel);
        let view = match self.target.view(dir) {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(src.is_some()),
            Err(_) => return Ok(false),
        };
        Ok(match src {
            Some(m) => differs(&self.source, &s.rel, Some(&m), &view, name, self.owner).is_some(),
            None => view.lstat(name).is_some() && self.extra(dir, name, &view),
        })
    }

    /// Whether an entry is pending at `rel` or at a directory above it (a
    /// rescan covers it; the marks of a rename not yet applied, which
    /// moves it): then it is judged again in a later pass, if it still
    /// differs then.
    fn pending_at_or_above(&self, rel: &[u8]) -> Result<bool, DaemonError> {
        let mut at = Some(rel);
        while let Some(p) = at {
            if self.journal.pending_get(self.t, p)?.is_some() {
                return Ok(true);
            }
            at = paths::parent(p);
        }
        Ok(false)
    }
}

/// Whether `m` has not changed for [`SETTLE`] before `now`: a change
/// younger than that may not be captured yet.
fn still(m: &Meta, now: u64) -> bool {
    let since = now.saturating_sub(SETTLE.as_nanos() as u64) as i64;
    m.ctime_ns <= since && m.mtime_ns <= since
}

/// How the target's `name` in `view` differs from source entry `rel`
/// (`m`), or None if it mirrors it.
fn differs(
    source: &Root,
    rel: &[u8],
    m: Option<&Meta>,
    view: &DirView,
    name: &[u8],
    owner: bool,
) -> Option<&'static str> {
    let m = m?;
    let Some(t) = view.lstat(name) else {
        return Some("missing");
    };
    if t.kind != m.kind {
        return Some("type");
    }
    if !m.mirrors(&t, owner) {
        return Some("metadata");
    }
    if m.kind == Kind::Symlink && source.read_link(rel).ok() != view.read_link(name) {
        return Some("symlink");
    }
    None
}

fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        ".".into()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}
