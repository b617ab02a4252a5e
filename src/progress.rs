//! An initial sync's progress, in files and bytes: what the startup scan
//! has found so far (the totals) against what is in place on the target
//! (done), for `status`, the `STATUS=` line, the metrics and a log line
//! every [`LOG_EVERY`].
//!
//! Definitions (all of this run, per target; a "file" is any entry but a
//! directory: regular files, symlinks, special files):
//! - **total**: every source file the startup scan compared (not
//!   excluded, of a kind the target holds) and the bytes of the regular
//!   files among them. It grows while the scan runs and is final once it
//!   is done (`totals_final`): a percentage before then is of what is
//!   known so far, and `status` says so.
//! - **done**: the files the scan found in place (`skipped`), plus those of
//!   the scan's entries ([`flags::STARTUP`], enqueued in this run) the
//!   shipper has since applied: `copied`, found in place at the apply
//!   (`skipped` too), or `gone` (gone from the source before the apply, or
//!   refused by the target). Entries only the target held and that were
//!   deleted are counted apart (`deleted`), as are the paths waiting for a
//!   retry (`failed`). Directories count in neither figure: the scan lists
//!   them, and a directory can be applied more than once in one sync (once
//!   made, again when its attributes are set after its entries).
//!
//! Invariant: on a tree that holds still, at the end of an initial sync,
//! `total = done + failed` and `total = copied + skipped + gone + failed`.
//! Changes made while it runs can add files the scan never counted (a file
//! created in a directory not yet copied is copied with it), so done may
//! then pass total; it is shown as it is, never capped.
//!
//! An initial sync resumed after an interruption counts what this run
//! compares and applies: the subtrees an earlier run had finished are
//! skipped by the scan (`resumed_subtrees` in its log line), and entries
//! that earlier run left pending there count in neither figure (their
//! sequence numbers predate this run: [`Applied::note`]). Neither do the
//! entries a restart's first pass enqueues before the full walk (which
//! compares the same directories again and counts them once).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::journal::flags;
use crate::meta::Kind;
use crate::sync::{file_bytes, ScanStats};
use crate::target::Outcome;

/// How often a running initial sync logs its progress.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often it publishes it (status, metrics).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// What the shipper applied of the scan's entries (see the module doc).
#[derive(Default, Debug)]
pub struct Applied {
    copied: AtomicU64,
    skipped: AtomicU64,
    gone: AtomicU64,
    deleted: AtomicU64,
    bytes: AtomicU64,
}

impl Applied {
    /// Counts outcome `o` of the entry at `rel`, flagged `f`, of sequence
    /// number `seq`, if it is one of this run's scan: enqueued by it
    /// ([`flags::STARTUP`]) at or after `from` (when its full walk began:
    /// see [`ScanStats::walk_seq0`]), and not the root (compared apart
    /// from the walk).
    pub fn note(&self, rel: &[u8], f: u8, seq: u64, from: u64, o: &Outcome) {
        if f & flags::STARTUP == 0 || seq < from || rel.is_empty() {
            return;
        }
        let (n, bytes) = match o {
            Outcome::Copied { meta, .. } if meta.kind != Kind::Dir => {
                (&self.copied, file_bytes(meta))
            }
            Outcome::Unchanged { meta } if meta.kind != Kind::Dir => {
                (&self.skipped, file_bytes(meta))
            }
            Outcome::Deleted => (&self.deleted, 0),
            Outcome::DeleteSkipped | Outcome::Special | Outcome::Vanished => (&self.gone, 0),
            Outcome::Copied { .. }
            | Outcome::Unchanged { .. }
            | Outcome::Dir { .. }
            | Outcome::NeedsDoubt => return,
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Where one target's progress is read from, at each `status` snapshot
/// (the counters move with every file: read when asked, not pushed).
pub struct Tracked {
    pub scan: Arc<ScanStats>,
    pub ship: Arc<crate::ship::ShipStats>,
    /// Set by the startup scan when it has compared everything.
    pub scan_done: Arc<AtomicBool>,
}

impl Tracked {
    pub fn now(&self) -> Progress {
        Progress::of(
            &self.scan,
            &self.ship.initial,
            self.scan_done.load(Ordering::Acquire),
            self.ship.failing.load(Ordering::Relaxed),
        )
    }
}

/// A snapshot of the progress (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The scan has compared everything: the totals are final.
    pub totals_final: bool,
    pub copied: u64,
    pub skipped: u64,
    pub gone: u64,
    pub failed: u64,
    pub deleted: u64,
}

impl Progress {
    /// The progress now, from the scan's counters, the shipper's, whether
    /// the scan is done and how many paths wait for a retry.
    pub fn of(scan: &ScanStats, applied: &Applied, scan_done: bool, failed: u64) -> Progress {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let in_sync = get(&scan.in_sync_files);
        let (copied, skipped, gone) = (
            get(&applied.copied),
            in_sync + get(&applied.skipped),
            get(&applied.gone),
        );
        Progress {
            files_done: copied + skipped + gone,
            files_total: get(&scan.files),
            bytes_done: get(&scan.in_sync_bytes) + get(&applied.bytes),
            bytes_total: get(&scan.bytes),
            totals_final: scan_done,
            copied,
            skipped,
            gone,
            failed,
            deleted: get(&applied.deleted),
        }
    }

    /// Done as a percentage of the total known (0 with nothing known).
    pub fn percent(&self) -> f64 {
        if self.files_total == 0 {
            return 0.0;
        }
        self.files_done as f64 * 100.0 / self.files_total as f64
    }

    /// "12,345 of 50,000 files (24.7%), 1.2 GiB of 4.0 GiB": "~" marks a
    /// total the scan is still adding to.
    pub fn summary(&self) -> String {
        let about = if self.totals_final { "" } else { "~" };
        format!(
            "{} of {about}{} files ({:.1}%{}), {} of {about}{}",
            thousands(self.files_done),
            thousands(self.files_total),
            self.percent(),
            if self.totals_final {
                ""
            } else {
                " of those found so far"
            },
            bytes(self.bytes_done),
            bytes(self.bytes_total),
        )
    }

    /// The counters, as the log lines give them: they add up as the module
    /// doc says.
    pub fn counters(&self) -> String {
        format!(
            "files={} copied={} skipped={} gone={} failed={} deleted={}",
            self.files_total, self.copied, self.skipped, self.gone, self.failed, self.deleted
        )
    }
}

/// When the shipper last published and logged the progress.
#[derive(Default, Debug)]
pub struct Ticks {
    published: Option<Instant>,
    logged: Option<Instant>,
}

impl Ticks {
    /// Whether to publish now (at most once a second).
    pub fn publish_due(&mut self) -> bool {
        let due = self.published.is_none_or(|t| t.elapsed() >= PUBLISH_EVERY);
        if due {
            self.published = Some(Instant::now());
        }
        due
    }

    /// Whether to log now: every [`LOG_EVERY`], the first one
    /// [`LOG_EVERY`] after the first publication (a short initial sync
    /// logs only its end).
    pub fn log_due(&mut self) -> bool {
        match self.logged {
            None => {
                self.logged = Some(Instant::now());
                false
            }
            Some(t) if t.elapsed() >= LOG_EVERY => {
                self.logged = Some(Instant::now());
                true
            }
            Some(_) => false,
        }
    }
}

/// Sets target `name`'s progress gauges.
pub fn publish(name: &str, p: &Progress) {
    for (metric, v) in [
        ("drmirror_initial_sync_done_files", p.files_done),
        ("drmirror_initial_sync_total_files", p.files_total),
        ("drmirror_initial_sync_done_bytes", p.bytes_done),
        ("drmirror_initial_sync_total_bytes", p.bytes_total),
    ] {
        metrics::gauge!(metric, "target" => name.to_string()).set(v as f64);
    }
}

/// A spinner on stderr with indicatif `template`, ticking by itself; drawn
/// only when stderr is a terminal (indicatif hides it otherwise, so a log
/// file or journald never sees it).
pub fn spinner(template: &str) -> indicatif::ProgressBar {
    let pb =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// `n` with thousands separated by commas.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `n` bytes in binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Kind, Meta};

    fn meta(kind: Kind, size: u64) -> Meta {
        Meta {
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 1,
            dev: 1,
            rdev: 0,
            nlink: 1,
        }
    }

    fn file(size: u64) -> Meta {
        meta(Kind::File, size)
    }

    #[test]
    fn the_counters_add_up_and_only_this_runs_scan_files_count() {
        let scan = ScanStats::default();
        scan.files.store(5, Ordering::Relaxed);
        scan.bytes.store(600, Ordering::Relaxed);
        scan.in_sync_files.store(1, Ordering::Relaxed);
        scan.in_sync_bytes.store(100, Ordering::Relaxed);
        let a = Applied::default();
        let copied = Outcome::Copied {
            meta: file(200),
            bytes: 7,
        };
        let dir = Outcome::Dir {
            meta: meta(Kind::Dir, 4096),
            created: true,
            scan: false,
        };
        a.note(b"a", flags::STARTUP, 10, 10, &copied);
        a.note(
            b"b",
            flags::STARTUP | flags::LIVE,
            12,
            10,
            &Outcome::Unchanged { meta: file(300) },
        );
        a.note(b"gone", flags::STARTUP, 12, 10, &Outcome::Vanished);
        // Not counted: a directory; not this run's scan (live only, an
        // earlier run's, the root).
        a.note(b"d", flags::STARTUP | flags::BULK, 11, 10, &dir);
        a.note(b"c", flags::LIVE, 13, 10, &copied);
        a.note(b"e", flags::STARTUP, 9, 10, &copied);
        a.note(b"", flags::STARTUP, 14, 10, &copied);
        // An entry only the target had: apart.
        a.note(b"x", flags::STARTUP, 15, 10, &Outcome::Deleted);
        let p = Progress::of(&scan, &a, true, 1);
        assert_eq!((p.files_done, p.files_total), (4, 5));
        assert_eq!((p.bytes_done, p.bytes_total), (600, 600));
        assert_eq!(p.files_total, p.copied + p.skipped + p.gone + p.failed);
        assert_eq!(p.deleted, 1);
        assert_eq!(p.summary(), "4 of 5 files (80.0%), 600 B of 600 B");
        let running = Progress::of(&scan, &a, false, 1);
        assert!(
            running
                .summary()
                .contains("of ~5 files (80.0% of those found so far)"),
            "{}",
            running.summary()
        );
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
