//! `drmirror status`: what the running daemon reports over a Unix socket in
//! its state directory (`status.sock`), as JSON, and the client side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::fs::Timespec;
use serde::{Deserialize, Serialize};

use crate::sync::ScanStats;

pub const SOCKET_NAME: &str = "status.sock";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TargetStatus {
    pub name: String,
    /// Age of the oldest change not yet applied (the live RPO), seconds.
    pub lag_seconds: f64,
    pub backlog_entries: u64,
    pub backlog_bytes: u64,
    /// False while writes to the target fail.
    pub up: bool,
    pub last_error: Option<String>,
    /// When `last_error` happened, and when the target worked again after
    /// it (up, no path failing): an old error is told from a live one.
    #[serde(default)]
    pub last_error_unix: Option<f64>,
    #[serde(default)]
    pub last_error_resolved_unix: Option<f64>,
    /// Unix time of the last applied change.
    pub last_apply_unix: Option<f64>,
    pub initial_sync_done: bool,
    /// Paths waiting for a retry after an error.
    pub failing_paths: u64,
    /// The first few of them: `PATH: ERROR (attempt N, next within Ss)`.
    #[serde(default)]
    pub failing: Vec<String>,
    /// Background scrub (see `drmirror::scrub`): full passes finished,
    /// divergences found (and repaired) since start, the last pass's end.
    #[serde(default)]
    pub scrub_passes: u64,
    #[serde(default)]
    pub scrub_divergences: u64,
    #[serde(default)]
    pub scrub_last_pass_unix: Option<f64>,
    /// What the target refused to keep (kinds of
    /// [`crate::fidelity::KINDS`]): the rest is mirrored without it.
    #[serde(default)]
    pub not_kept: Vec<String>,
    /// The initial sync's progress in this run, entries and bytes (see
    /// [`crate::progress`]); kept at its final figures once it is done.
    #[serde(default)]
    pub sync: Option<crate::progress::Progress>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub source: String,
    pub capture_backend: String,
    pub scan_running: bool,
    /// Where the corrupt journal this run replaced was moved (see
    /// [`crate::rebuild`]); `None` when the journal opened as it was.
    #[serde(default)]
    pub journal_rebuilt: Option<String>,
    /// Entries the startup scans compared so far.
    pub scan_entries: u64,
    /// Entries the same scans counted last time they ran to the end (0:
    /// never), against which `scan_entries` is a percentage.
    #[serde(default)]
    pub scan_expected: u64,
    /// What capture misses under the source (a mount fanotify could not
    /// mark, directories past inotify's watch limit), one line each: what
    /// they show is not kept current. `status` says CRITICAL.
    #[serde(default)]
    pub uncaptured: Vec<String>,
    /// Why the daemon is not running its pipeline but waiting (for space
    /// on the state directory's filesystem: see [`crate::state_space`]).
    /// `status` says CRITICAL.
    #[serde(default)]
    pub waiting: Option<String>,
    pub targets: Vec<TargetStatus>,
}

/// The daemon's live status, updated by its threads.
#[derive(Default)]
pub struct Board {
    inner: Mutex<Status>,
    /// The counters of the startup scans, read at each snapshot: the scans
    /// count every entry, too often to take a lock each time.
    scans: Mutex<Vec<Arc<ScanStats>>>,
    /// Each target's initial sync progress, read at each snapshot too.
    syncs: Mutex<Vec<(String, crate::progress::Tracked)>>,
}

impl Board {
    pub fn new(status: Status) -> Board {
        Board {
            inner: Mutex::new(status),
            scans: Mutex::default(),
            syncs: Mutex::default(),
        }
    }

    /// Counts a startup scan's entries into `scan_entries` from now on;
    /// `expected`: what the same scan counted last time (0: unknown).
    pub fn track_scan(&self, stats: Arc<ScanStats>, expected: u64) {
        self.scans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats);
        self.update(|s| s.scan_expected += expected);
    }

    /// Shows target `name`'s initial sync progress from `tracked` (see
    /// [`crate::progress`]).
    pub fn track_sync(&self, name: &str, tracked: crate::progress::Tracked) {
        crate::locks::lock(&self.syncs).push((name.to_string(), tracked));
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn update_target(&self, name: &str, f: impl FnOnce(&mut TargetStatus)) {
        self.update(|s| {
            if let Some(t) = s.targets.iter_mut().find(|t| t.name == name) {
                f(t)
            }
        })
    }

    pub fn snapshot(&self) -> Status {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let scans = self.scans.lock().unwrap_or_else(|p| p.into_inner());
        if !scans.is_empty() {
            s.scan_entries = scans
                .iter()
                .map(|st| st.scanned.load(Ordering::Relaxed))
                .sum();
        }
        for (name, tracked) in crate::locks::lock(&self.syncs).iter() {
            if let Some(t) = s.targets.iter_mut().find(|t| &t.name == name) {
                t.sync = Some(tracked.now());
            }
        }
        s
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no drmirror is running with state directory {dir} (cannot connect to {socket}: {source})"
    )]
    NotRunning {
        dir: PathBuf,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("reading status from {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed status from {socket}: {source}")]
    Decode {
        socket: PathBuf,
        source: serde_json::Error,
    },
}

/// The daemon's status socket, bound: [`Listener::serve`] answers on it.
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds `state_dir/status.sock`.
pub fn bind(state_dir: &Path) -> std::io::Result<Listener> {
    let path = state_dir.join(SOCKET_NAME);
    // A socket left by a crashed daemon; the state-dir lock guarantees no
    // live daemon owns it.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    Ok(Listener { listener, path })
}

impl Listener {
    /// Serves `board` until `stop` is set (on the calling thread).
    pub fn serve(self, board: &Board, stop: &AtomicBool) {
        let Listener { listener, path } = self;
        while !stop.load(Ordering::Relaxed) {
            // Sleeps until a client connects: an idle daemon should not
            // wake up to look. The stop connects to the socket ([`wake`]);
            // the timeout only bounds the stop if that connection cannot be
            // made.
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            let idle = Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            match rustix::event::poll(&mut fds, Some(&idle)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!("status socket: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                    if let Ok(mut body) = serde_json::to_vec(&board.snapshot()) {
                        body.push(b'\n');
                        let _ = conn.write_all(&body);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::warn!("status socket: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// Makes the status thread of the daemon using `state_dir` notice its stop
/// now rather than at its next timeout.
pub fn wake(state_dir: &Path) {
    let _ = UnixStream::connect(state_dir.join(SOCKET_NAME));
}

/// Asks the daemon using `state_dir` for its status.
/// Where systemd's `StateDirectory=drmirror` (or `drmirror/INSTANCE`)
/// puts a unit's state.
pub const SYSTEMD_STATE_ROOT: &str = "/var/lib/drmirror";

/// The state directory of the daemon that mirrors `source`, for `status
/// --config` or `--source` run from a shell: `state_dir` (configured, or the
/// default as this shell computes it), else where a unit's
/// `StateDirectory=` put it (the daemon saw `STATE_DIRECTORY`, which the
/// shell lacks): `/var/lib/drmirror/INSTANCE` (`instance`: the config
/// file's stem, as `drmirror@INSTANCE` reads `/etc/drmirror/INSTANCE.toml`)
/// or `/var/lib/drmirror`. The first whose daemon says it mirrors `source`;
/// `state_dir` if none does (the error then names it).
pub fn locate(state_dir: &Path, source: &Path, instance: Option<&str>) -> std::path::PathBuf {
    let root = Path::new(SYSTEMD_STATE_ROOT);
    let mut candidates = vec![state_dir.to_path_buf()];
    if let Some(i) = instance {
        candidates.push(root.join(i));
    }
    candidates.push(root.to_path_buf());
    let serves = |dir: &Path| query(dir).is_ok_and(|s| Path::new(&s.source) == source);
    candidates
        .iter()
        .find(|d| serves(d))
        .cloned()
        .unwrap_or_else(|| state_dir.to_path_buf())
}

pub fn query(state_dir: &Path) -> Result<Status, StatusError> {
    let socket = state_dir.join(SOCKET_NAME);
    let mut conn = UnixStream::connect(&socket).map_err(|source| StatusError::NotRunning {
        dir: state_dir.to_path_buf(),
        socket: socket.clone(),
        source,
    })?;
    let io = |source| StatusError::Io {
        socket: socket.clone(),
        source,
    };
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).map_err(io)?;
    serde_json::from_slice(&body).map_err(|source| StatusError::Decode {
        socket: socket.clone(),
        source,
    })
}

/// The human rendering.
/// One line for systemd's `STATUS=` (shown by `systemctl status`).
pub fn one_line(s: &Status) -> String {
    let mut line = format!("capturing ({})", s.capture_backend);
    if s.scan_running {
        line.push_str("; ");
        line.push_str(&scan_progress(s));
    }
    for t in &s.targets {
        line.push_str(&format!(
            "; {}: {}lag {:.1}s, backlog {}",
            t.name,
            if t.up { "" } else { "DOWN, " },
            t.lag_seconds,
            t.backlog_entries
        ));
        if let Some(p) = t.sync.filter(|_| !t.initial_sync_done) {
            line.push_str(&format!(", initial sync {}", p.summary()));
        }
    }
    line
}

/// "reconciling 42% (…)" when the scan's last full count is known, else
/// the count so far (a first scan, the initial sync's).
fn scan_progress(s: &Status) -> String {
    if s.scan_expected == 0 {
        return format!("startup scan: {} entries compared", s.scan_entries);
    }
    // Capped: the tree may have grown since the last count.
    let pct = (s.scan_entries.saturating_mul(100) / s.scan_expected).min(99);
    format!(
        "reconciling {pct}% ({} of ~{} entries compared)",
        s.scan_entries, s.scan_expected
    )
}

/// `drmirror status`'s verdict, as monitoring plugins (Nagios, Icinga)
/// take exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    /// No daemon answered.
    Unknown = 3,
}

impl Health {
    pub fn word(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Critical => "CRITICAL",
            Health::Unknown => "UNKNOWN",
        }
    }
}

/// The verdict on `s` and its reasons: CRITICAL when a target is down,
/// lags more than `max_lag` seconds, or something under the source is not
/// captured; WARNING when a target lags more than `warn_lag` or has paths
/// failing; OK otherwise.
pub fn health(s: &Status, warn_lag: f64, max_lag: f64) -> (Health, Vec<String>) {
    let mut worst = Health::Ok;
    let mut why = Vec::new();
    let mut say = |h: Health, w: String| {
        worst = worst.max(h);
        why.push(w);
    };
    if let Some(w) = &s.waiting {
        say(Health::Critical, format!("not replicating: {w}"));
    }
    if !s.uncaptured.is_empty() {
        say(
            Health::Critical,
            format!("{} part(s) of the source not captured", s.uncaptured.len()),
        );
    }
    for t in &s.targets {
        if !t.up {
            say(Health::Critical, format!("target {} is DOWN", t.name));
        }
        if t.lag_seconds > max_lag {
            say(
                Health::Critical,
                format!(
                    "target {} lags {:.1} s (> {max_lag} s)",
                    t.name, t.lag_seconds
                ),
            );
        } else if t.lag_seconds > warn_lag {
            say(
                Health::Warning,
                format!(
                    "target {} lags {:.1} s (> {warn_lag} s)",
                    t.name, t.lag_seconds
                ),
            );
        }
        if t.failing_paths > 0 {
            say(
                Health::Warning,
                format!("target {}: {} path(s) failing", t.name, t.failing_paths),
            );
        }
    }
    (worst, why)
}

/// The first line of `status`: the verdict, as a monitoring plugin's.
pub fn verdict_line(h: Health, why: &[String]) -> String {
    if why.is_empty() {
        format!("DRMIRROR {}: every target current and captured\n", h.word())
    } else {
        format!("DRMIRROR {}: {}\n", h.word(), why.join("; "))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// "N s ago" for a Unix time, against now.
fn ago(unix: f64) -> String {
    format!("{:.0} s ago", (unix_now() - unix).max(0.0))
}

/// How the last error reads: with its age, and whether it is over.
fn last_error(t: &TargetStatus) -> String {
    let Some(e) = &t.last_error else {
        return String::new();
    };
    let when = t.last_error_unix.map(ago).unwrap_or_default();
    match t.last_error_resolved_unix {
        Some(r) => format!(", last error ({when}, resolved {}): {e}", ago(r)),
        None => format!(", last error ({when}): {e}"),
    }
}

pub fn render(s: &Status) -> String {
    let mut out = format!(
        "drmirror {} (pid {}) source {} capture {}{}\n",
        s.version,
        s.pid,
        s.source,
        s.capture_backend,
        if s.scan_running {
            format!(", {}", scan_progress(s))
        } else {
            String::new()
        }
    );
    if let Some(old) = &s.journal_rebuilt {
        out.push_str(&format!(
            "  journal rebuilt at this start: the corrupt one is kept at {old}\n"
        ));
    }
    if let Some(w) = &s.waiting {
        out.push_str(&format!("  NOT REPLICATING, {w}\n"));
    }
    for u in &s.uncaptured {
        out.push_str(&format!("  NOT CAPTURED: {u}\n"));
    }
    for t in &s.targets {
        out.push_str(&format!(
            "  target {}: {} lag {:.1}s backlog {} entries ({} bytes){}{}\n",
            t.name,
            if t.up { "up" } else { "DOWN" },
            t.lag_seconds,
            t.backlog_entries,
            t.backlog_bytes,
            if t.initial_sync_done {
                ""
            } else {
                ", initial sync running"
            },
            last_error(t),
        ));
        if let Some(p) = &t.sync {
            out.push_str(&format!(
                "    initial sync{}: {}\n",
                if t.initial_sync_done { " done" } else { "" },
                p.summary()
            ));
        }
        for f in &t.failing {
            out.push_str(&format!("    failing: {f}\n"));
        }
        if t.failing_paths > t.failing.len() as u64 {
            out.push_str(&format!(
                "    ... and {} more failing paths\n",
                t.failing_paths - t.failing.len() as u64
            ));
        }
        if !t.not_kept.is_empty() {
            out.push_str(&format!(
                "    not kept (the target refuses them): {}\n",
                t.not_kept.join(", ")
            ));
        }
        if t.scrub_divergences > 0 || t.scrub_passes > 0 {
            out.push_str(&format!(
                "    scrub: {} full passes, {} divergences found and repaired since start\n",
                t.scrub_passes, t.scrub_divergences
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status with one target, `dr`, up.
    fn one_target(backend: &str, scan_running: bool) -> Status {
        Status {
            capture_backend: backend.into(),
            scan_running,
            targets: vec![TargetStatus {
                name: "dr".into(),
                up: true,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_initial_sync_progress_is_read_live_and_shown_while_it_runs() {
        let board = Board::new(one_target("inotify", false));
        let scan = Arc::new(ScanStats::default());
        board.track_sync(
            "dr",
            crate::progress::Tracked {
                scan: scan.clone(),
                ship: Arc::default(),
                scan_done: Arc::default(),
            },
        );
        scan.files.store(2000, Ordering::Relaxed);
        scan.in_sync_files.store(500, Ordering::Relaxed);
        scan.bytes.store(3 << 20, Ordering::Relaxed);
        let s = board.snapshot();
        let line = one_line(&s);
        assert!(
            line.ends_with(
                "dr: lag 0.0s, backlog 0, initial sync 500 of ~2,000 files (25.0% of those found so far), 0 B of ~3.0 MiB"
            ),
            "{line}"
        );
        assert!(
            render(&s).contains("    initial sync: 500 of ~2,000 files"),
            "{}",
            render(&s)
        );
        // Done: no longer in the one-line summary, the figures kept.
        let board = Board::new(Status {
            targets: vec![TargetStatus {
                initial_sync_done: true,
                ..s.targets[0].clone()
            }],
            ..s
        });
        let s = board.snapshot();
        assert!(!one_line(&s).contains("initial sync"), "{}", one_line(&s));
        assert!(render(&s).contains("initial sync done: 500 of ~2,000"));
    }

    #[test]
    fn scan_progress_is_a_share_of_the_last_full_count() {
        let board = Board::new(one_target("fanotify", true));
        let a = Arc::new(ScanStats::default());
        board.track_scan(a.clone(), 0);
        a.scanned.store(250, Ordering::Relaxed);
        // A first scan: a count, no share.
        let line = one_line(&board.snapshot());
        assert!(
            line.contains("startup scan: 250 entries compared"),
            "{line}"
        );

        // Two targets' scans, 1,000 entries each last time.
        let board = Board::new(board.snapshot());
        let b = Arc::new(ScanStats::default());
        board.track_scan(a.clone(), 1000);
        board.track_scan(b.clone(), 1000);
        b.scanned.store(550, Ordering::Relaxed);
        let s = board.snapshot();
        assert_eq!((s.scan_entries, s.scan_expected), (800, 2000));
        let line = one_line(&s);
        assert!(
            line.starts_with("capturing (fanotify); reconciling 40% (800 of ~2000 entries compared); dr: lag 0.0s"),
            "{line}"
        );
        assert!(render(&s).contains("reconciling 40%"), "{}", render(&s));
        // A tree that grew since: never 100% before the end.
        a.scanned.store(5000, Ordering::Relaxed);
        assert!(one_line(&board.snapshot()).contains("reconciling 99%"));
        board.update(|s| s.scan_running = false);
        assert!(!one_line(&board.snapshot()).contains("reconciling"));
    }

    #[test]
    fn health_is_the_worst_of_what_each_target_says() {
        let ok = TargetStatus {
            name: "dr".into(),
            up: true,
            ..Default::default()
        };
        let mut s = Status {
            targets: vec![ok.clone()],
            ..Default::default()
        };
        assert_eq!(health(&s, 30.0, 60.0), (Health::Ok, vec![]));
        s.targets[0].lag_seconds = 31.0;
        assert_eq!(health(&s, 30.0, 60.0).0, Health::Warning);
        s.targets[0].lag_seconds = 0.0;
        s.targets[0].failing_paths = 2;
        assert_eq!(health(&s, 30.0, 60.0).0, Health::Warning);
        s.targets.push(TargetStatus {
            name: "far".into(),
            up: false,
            ..Default::default()
        });
        let (h, why) = health(&s, 30.0, 60.0);
        assert_eq!(h, Health::Critical);
        assert_eq!(why, ["target dr: 2 path(s) failing", "target far is DOWN"]);
        s.targets = vec![ok];
        s.targets[0].lag_seconds = 61.0;
        assert_eq!(health(&s, 30.0, 60.0).0, Health::Critical);
        s.targets[0].lag_seconds = 0.0;
        s.uncaptured = vec!["/src/mq (mounted under the source): no handles".into()];
        assert_eq!(health(&s, 30.0, 60.0).0, Health::Critical);
        assert!(verdict_line(Health::Critical, &health(&s, 30.0, 60.0).1)
            .starts_with("DRMIRROR CRITICAL: 1 part(s) of the source not captured"));
    }
}
