//! The daemon's pulse: a thread that, several times a second, publishes
//! each target's lag from the clock, and checks that the state directory
//! the daemon locked is still the one at its path.
//!
//! Invariants:
//! - The lag (`drmirror_replication_lag_seconds`, `status`) is `now − the
//!   capture time of the oldest change not known to be applied`
//!   ([`Journal::oldest_pending_ns`]), computed here against the clock and
//!   not by the shipper between rounds: it grows by one second per second
//!   whatever holds the backlog up (a link cut in the middle of a round, a
//!   full disk, a stuck thread), and it never reads lower than the truth:
//!   it is published as it will be at the next refresh (at most
//!   [`PERIOD`] high), and after a start that may have missed changes it
//!   counts from when capture was last known whole
//!   ([`crate::heartbeat`]).
//! - A daemon whose state directory was deleted or replaced stops, loudly
//!   (a non-zero exit): its lock no longer keeps a second daemon off the
//!   path, and two daemons would write one target.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::DaemonError;
use crate::journal::{now_ns, Journal, TargetId};
use crate::status::Board;
use crate::target::identity::IdentityError;

/// How often the lag is published and the state directory checked.
const PERIOD: Duration = Duration::from_millis(250);

/// A file's identity: (device, inode).
pub type FileId = (u64, u64);

fn file_id(st: &rustix::fs::Stat) -> FileId {
    (st.st_dev, st.st_ino)
}

/// The state directory's lock file, as locked by this daemon.
pub struct StateDirGuard {
    path: PathBuf,
    id: FileId,
}

impl StateDirGuard {
    /// Remembers which file `lock` (open at `path`) is.
    pub fn new(path: PathBuf, lock: impl AsFd) -> std::io::Result<StateDirGuard> {
        let st = rustix::fs::fstat(lock)?;
        Ok(StateDirGuard {
            path,
            id: file_id(&st),
        })
    }

    /// `Err(why)` if the lock file at the path is gone or another file.
    pub fn check(&self) -> Result<(), String> {
        match rustix::fs::stat(&self.path) {
            Ok(st) if file_id(&st) == self.id => Ok(()),
            Ok(_) => Err(format!(
                "{} was replaced by another file",
                self.path.display()
            )),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }
}

/// What the pulse thread watches.
pub struct Pulse {
    pub journal: Arc<Journal>,
    pub targets: Vec<(TargetId, String)>,
    pub board: Arc<Board>,
    pub guard: StateDirGuard,
    /// Local targets: name, path, and the (device, inode) of the directory
    /// the daemon holds open (see [`crate::target::identity`]).
    pub local_roots: Vec<(String, PathBuf, FileId)>,
    pub stop: Arc<AtomicBool>,
    /// The `process_*` metrics, refreshed every [`PROCESS_EVERY`] turns.
    pub process: metrics_process::Collector,
}

/// Turns of the pulse between two refreshes of the `process_*` metrics
/// (once a second: they are read from `/proc`).
const PROCESS_EVERY: u32 = 4;

impl Pulse {
    /// Publishes every target's lag until `stop`; an error if the state
    /// directory goes away.
    pub fn run(self) -> Result<(), DaemonError> {
        // On a fixed schedule, so that each value holds until the next.
        let mut next = std::time::Instant::now();
        let mut turn = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            if turn % PROCESS_EVERY == 0 {
                self.process.collect();
            }
            turn = turn.wrapping_add(1);
            next += PERIOD;
            self.publish_lag(next.saturating_duration_since(std::time::Instant::now()));
            if let Err(why) = self.guard.check() {
                return Err(DaemonError::StateDirGone(why));
            }
            self.check_targets()?;
            let now = std::time::Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        Ok(())
    }

    /// Publishes the first lag, before the metrics endpoint answers: what a
    /// restart left pending counts from its capture time at once, not from
    /// the shipper's first report (which a round blocked on a dead link
    /// would put off), and a floor set for the startup scan shows from the
    /// first scrape.
    pub fn prime(&self) -> Result<(), DaemonError> {
        for (t, _) in &self.targets {
            self.journal
                .backlog_stats(*t, self.journal.backlog_count_limit())?;
        }
        self.publish_lag(PERIOD);
        Ok(())
    }

    /// Each local target's path must still name the directory the daemon
    /// writes through: one renamed, replaced or mounted over would take
    /// writes that are no longer the mirror.
    fn check_targets(&self) -> Result<(), DaemonError> {
        for (name, path, held) in &self.local_roots {
            crate::target::identity::still_at(path, *held).map_err(|why| {
                IdentityError::NotTheTarget {
                    name: name.clone(),
                    path: path.display().to_string(),
                    why,
                }
            })?;
        }
        Ok(())
    }

    /// Publishes each target's lag as it will be `until_next` from now,
    /// at the next refresh: a reading taken just before that is never
    /// below the truth.
    fn publish_lag(&self, until_next: Duration) {
        let now = now_ns() + until_next.as_nanos() as u64;
        for (t, name) in &self.targets {
            let lag = self
                .journal
                .oldest_pending_ns(*t)
                .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e9);
            metrics::gauge!("drmirror_replication_lag_seconds", "target" => name.clone()).set(lag);
            self.board.update_target(name, |s| s.lag_seconds = lag);
        }
    }
}
