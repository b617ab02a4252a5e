//! A full state directory is waited out in place, not a reason to stop for
//! good.
//!
//! RocksDB takes no write once its filesystem is full: the journal enters
//! an error state the bindings cannot resume from (`Writer has previous
//! error`), and the daemon's threads stop with a journal error. The
//! daemon's `run` then asks [`wait_out_if_full`]: if the state directory's
//! filesystem has less than [`ROOM`] free, the process does not exit. It
//! says why (log, and systemd's `STATUS=`), keeps feeding the watchdog,
//! waits until [`MORE`] more is free than once the journal had closed, and
//! re-executes itself: same PID, same
//! arguments, so the service manager sees no restart, and the new run's
//! startup scan finds whatever changed meanwhile (nothing is lost: changes
//! not yet recorded are found by comparing the tree).
//!
//! Invariants:
//! - Only when the filesystem is short of space, or the journal's error
//!   says it ran out (closing the journal may give back what it had
//!   preallocated); any other error exits as before.
//! - SIGTERM or SIGINT while waiting ends the process (exit 1, the error
//!   that stopped the run logged).
//! - The state directory stays locked while it waits (no second daemon
//!   takes it), and `drmirror status` is answered: CRITICAL, with why it
//!   waits, each target down with that reason and its lag counting on from
//!   what it was when the run stopped (it never reads lower than the
//!   truth: nothing is applied meanwhile).
//! - Re-executions that fail again at once back off (1 s doubling to 60 s;
//!   a run that lasted 5 minutes starts the count again), so a filesystem
//!   that hovers at the edge cannot make a tight loop of it.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::status::Board;

/// Below this much free, a journal error is taken for a full state
/// directory even if it does not say so.
pub const ROOM: u64 = 64 << 20;
/// How much more must be free than right after the journal closed before
/// it starts again. Not a fixed amount: closing the journal gives back its
/// write-ahead logs (up to 64 MiB, each preallocated), which the next run
/// would fill at once, so that space is not taken for space returned.
pub const MORE: u64 = 16 << 20;
/// Free space at which it starts again whatever it was after closing.
pub const PLENTY: u64 = 1 << 30;
/// Carries the re-execution count and time to the next run.
const REEXEC_ENV: &str = "DRMIRROR_SPACE_REEXEC";

/// Bytes free for this process on the filesystem of `dir` (root may use
/// the reserved blocks too); `None` when it cannot be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let blocks = if rustix::process::geteuid().is_root() {
        st.f_bfree
    } else {
        st.f_bavail
    };
    Some(blocks.saturating_mul(st.f_frsize))
}

/// After the run stopped with `err`: if the state directory `state` is
/// short of space, waits until it has [`ROOM`] and re-executes the daemon
/// (does not return then). Returns if there is room, if it cannot tell, on
/// SIGTERM/SIGINT, or if the re-execution failed.
pub fn wait_out_if_full(
    state: &Path,
    err: &dyn std::fmt::Display,
    from_journal: bool,
    board: Option<&Arc<Board>>,
) {
    let text = err.to_string();
    // Closing the journal may give back what it had preallocated, so the
    // journal's error itself tells too: RocksDB's own ENOSPC, or the state
    // it leaves every later write in. (Only the journal's: inotify's watch
    // limit is an ENOSPC too.)
    let said = from_journal
        && (text.contains("No space left") || text.contains("Writer has previous error"));
    match free_bytes(state) {
        Some(free) if free < ROOM || said => {}
        _ => return,
    }
    let (count, last) = previous();
    tracing::error!(
        "{err}: the state directory's filesystem ({}) is full; waiting until {} MiB more are free \
         there, then drmirror starts again by itself (a scan then finds what changed meanwhile)",
        state.display(),
        MORE >> 20
    );
    let why = "waiting for space on the state directory's filesystem";
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(why)]);
    let waiting = board.map(|b| Waiting::start(state, b.clone(), format!("{why}: {err}")));
    let recent = now_secs().saturating_sub(last) < 300;
    let backoff = if recent {
        Duration::from_secs((1u64 << count.min(6)).min(60))
    } else {
        Duration::ZERO
    };
    if !wait(state, backoff, waiting.as_ref()) {
        return;
    }
    tracing::info!("space returned on the state directory's filesystem: starting again");
    let next = if recent { count + 1 } else { 0 };
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let e = std::process::Command::new("/proc/self/exe")
        .args(args)
        .env(REEXEC_ENV, format!("{next} {}", now_secs()))
        .exec();
    tracing::error!("cannot start again (exec /proc/self/exe): {e}");
}

/// The status the stopped run's board shows while it waits, served on the
/// state directory's socket.
struct Waiting {
    board: Arc<Board>,
    since: Instant,
    /// Each target's lag when the run stopped.
    lags: Vec<f64>,
}

impl Waiting {
    fn start(state: &Path, board: Arc<Board>, why: String) -> Waiting {
        board.update(|s| {
            s.waiting = Some(why.clone());
            for t in &mut s.targets {
                t.up = false;
                t.last_error = Some(why.clone());
                t.last_error_unix = Some(crate::status::unix_now());
                t.last_error_resolved_unix = None;
            }
        });
        let lags = board
            .snapshot()
            .targets
            .iter()
            .map(|t| t.lag_seconds)
            .collect();
        // A full filesystem may refuse even the socket's entry: then
        // `status` finds no daemon, as before.
        match crate::status::bind(state) {
            Ok(listener) => {
                let b = board.clone();
                let spawned = std::thread::Builder::new()
                    .name("status".into())
                    .spawn(move || listener.serve(&b, &AtomicBool::new(false)));
                if let Err(e) = spawned {
                    tracing::warn!("cannot answer status while waiting: {e}");
                }
            }
            Err(e) => tracing::warn!("cannot answer status while waiting: {e}"),
        }
        Waiting {
            board,
            since: Instant::now(),
            lags,
        }
    }

    /// Each target's lag grows with the clock: nothing is applied.
    fn tick(&self) {
        let waited = self.since.elapsed().as_secs_f64();
        self.board.update(|s| {
            for (t, lag) in s.targets.iter_mut().zip(&self.lags) {
                t.lag_seconds = lag + waited;
            }
        });
    }
}

/// Waits at least `backoff` and until `state` has [`MORE`] more free than
/// now (or [`PLENTY`]), feeding the watchdog; false on SIGTERM/SIGINT.
fn wait(state: &Path, backoff: Duration, waiting: Option<&Waiting>) -> bool {
    let base = free_bytes(state).unwrap_or(0);
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    rt.block_on(async {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return false;
        };
        let start = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = term.recv() => return false,
                _ = int.recv() => return false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            if let Some(w) = waiting {
                w.tick();
            }
            let room = |f: u64| f >= base.saturating_add(MORE) || f >= PLENTY;
            if start.elapsed() >= backoff && free_bytes(state).is_some_and(room) {
                return true;
            }
        }
    })
}

/// The count and time of the re-execution that started this process.
fn previous() -> (u32, u64) {
    std::env::var(REEXEC_ENV)
        .ok()
        .and_then(|v| {
            let (c, t) = v.split_once(' ')?;
            Some((c.parse().ok()?, t.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
