//! Directories inotify could not watch because the watch limit was reached.
//!
//! inotify needs one watch per directory, and the kernel caps them per
//! user (`fs.inotify.max_user_watches`, or `user.max_inotify_watches` in a
//! user namespace). Any user who can write in the source can make more
//! directories than that; if running out of watches stopped the daemon (as
//! it once did, at start and while running), such a user could stop the DR
//! copy. Instead capture degrades, loudly:
//!
//! - a directory whose watch is refused for the limit is noted here, and
//!   nothing below it is watched (its subtree is compared instead);
//! - every [`RETRY`] the noted directories are tried again (deletions may
//!   have freed watches) and each still unwatched is compared in full with
//!   the target (a recursive change), so its changes arrive within about
//!   that time instead of never;
//! - `status` lists them under `NOT CAPTURED` (and exits 1), a metric
//!   counts them, and the log says so when it starts and when it ends.
//!
//! Invariant: a directory is either watched or noted here (or below one
//! noted here), or excluded, or gone.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Event;
use crate::filter::Filter;
use crate::journal::flags;
use crate::paths;

/// How often unwatched directories are tried again and compared.
pub const RETRY: Duration = Duration::from_secs(30);

/// Paths listed by name in `status` (the count covers the rest).
const LISTED: usize = 5;

/// The directories left unwatched, and when to look at them again.
#[derive(Default)]
pub struct Unwatched {
    dirs: BTreeSet<Vec<u8>>,
    next: Option<Instant>,
    /// The set changed since `status` was told.
    changed: bool,
}

impl Unwatched {
    /// Notes `rel` as refused for the limit.
    pub fn note(&mut self, rel: Vec<u8>) {
        if self.dirs.is_empty() {
            tracing::warn!(
                "inotify watch limit ({}) reached at {}: directories past it are compared every {} s instead of captured live; raise fs.inotify.max_user_watches (or run as root for fanotify, which needs no watch per directory)",
                limit(),
                paths::display(&rel),
                RETRY.as_secs()
            );
            self.next = Some(Instant::now() + RETRY);
        }
        if self.dirs.insert(rel) {
            self.changed = true;
            metrics::gauge!("drmirror_capture_unwatched_dirs").set(self.dirs.len() as f64);
        }
    }

    /// Time until the next retry, if any is pending.
    pub fn due_in(&self) -> Option<Duration> {
        self.next
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// At a retry: hands back every noted directory to be watched again
    /// (those refused again are noted again), and queues a comparison of
    /// each that still exists. `None` when no retry is due.
    pub fn take_due(&mut self, filter: &Filter, out: &mut Vec<Event>) -> Option<Vec<Vec<u8>>> {
        if self.due_in() != Some(Duration::ZERO) {
            return None;
        }
        let dirs = std::mem::take(&mut self.dirs);
        self.next = None;
        self.changed = true;
        for d in &dirs {
            if !filter.excluded(d, true) {
                out.push(Event::Dirty {
                    path: d.clone(),
                    flags: flags::RECURSIVE | flags::LIVE,
                });
            }
        }
        Some(dirs.into_iter().collect())
    }

    /// Ends a retry: says so if every directory is watched now.
    pub fn retried(&mut self, had: usize) {
        metrics::gauge!("drmirror_capture_unwatched_dirs").set(self.dirs.len() as f64);
        if self.dirs.is_empty() {
            tracing::info!("inotify: all {had} directories past the watch limit are watched now");
        } else if self.next.is_none() {
            self.next = Some(Instant::now() + RETRY);
        }
    }

    /// Forgets `rel` and what is below it (deleted or moved out).
    pub fn forget_tree(&mut self, rel: &[u8]) {
        let below: Vec<Vec<u8>> = self
            .dirs
            .range(rel.to_vec()..)
            .take_while(|p| p.starts_with(rel))
            .filter(|p| paths::is_within(p, rel))
            .cloned()
            .collect();
        let had = below.len();
        for p in below {
            self.dirs.remove(&p);
            self.changed = true;
        }
        if had > 0 {
            metrics::gauge!("drmirror_capture_unwatched_dirs").set(self.dirs.len() as f64);
        }
        // The last of them gone: the same word as a retry that watched the
        // last (a removal can race a retry, which then notes the limit
        // again for a directory about to go, and no retry follows).
        if had > 0 && self.dirs.is_empty() {
            tracing::info!(
                "inotify: all directories past the watch limit are watched now (the last {had} were removed)"
            );
        }
    }

    /// The `status` lines, when they changed since the last call.
    pub fn report(&mut self) -> Option<Vec<String>> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        if self.dirs.is_empty() {
            return Some(Vec::new());
        }
        let n = self.dirs.len();
        let mut names: Vec<String> = self
            .dirs
            .iter()
            .take(LISTED)
            .map(|d| paths::display(d))
            .collect();
        if n > LISTED {
            names.push(format!("{} more", n - LISTED));
        }
        Some(vec![format!(
            "{n} director{} and all beneath (inotify watch limit {} reached; compared every {} s instead): {}",
            if n == 1 { "y" } else { "ies" },
            limit(),
            RETRY.as_secs(),
            names.join(", ")
        )])
    }
}

/// True for the error `inotify_add_watch` gives at the watch limit.
pub fn is_limit(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(crate::fsops::libc_errno::ENOSPC)
}

/// The limit in force, as far as this process can tell (the lower of the
/// system-wide and the user namespace's).
fn limit() -> u64 {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    [
        read("/proc/sys/fs/inotify/max_user_watches"),
        read("/proc/sys/user/max_inotify_watches"),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0)
}
