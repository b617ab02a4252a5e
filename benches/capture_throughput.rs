//! Capture throughput: events/s from the kernel queue to the journal.
//!
//! `cargo bench --bench capture_throughput [-- FILES]` (root; default
//! 1,000,000 files). For each backend: start the watcher on a fresh tree of
//! 1,000 directories, create FILES empty files while the watcher does not
//! read (the kernel queue is raised for the run so that nothing overflows,
//! and restored after), then time the drain: poll, normalise, coalesce and
//! write to the journal, exactly as the daemon's capture loop does.
//!
//! The baseline, measured in the same run, is the rate at which one thread
//! creates those files: the ratio says how much faster capture is than the
//! fastest single writer. "Zero lost" is checked by count: every file must
//! have its own pending entry in the journal, and no overflow may occur.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drmirror::daemon::to_changes;
use drmirror::filter::Filter;
use drmirror::journal::Journal;
use drmirror::watch::fanotify::FanotifyWatcher;
use drmirror::watch::inotify::InotifyWatcher;
use drmirror::watch::{Event, Watcher};

const DIRS: usize = 1000;

/// Sets a sysctl for the lifetime of the guard.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: usize) -> Option<Sysctl> {
        let old = std::fs::read_to_string(path).ok()?;
        std::fs::write(path, value.to_string()).ok()?;
        Some(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

struct Run {
    create_secs: f64,
    drain_secs: f64,
    kernel_events: u64,
    pending: u64,
    overflows: u64,
}

fn run(backend: &str, files: usize) -> Run {
    let tmp = tempfile::Builder::new()
        .prefix("drm-capture-bench")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let src = tmp.path().join("src");
    for d in 0..DIRS {
        std::fs::create_dir_all(src.join(format!("d{d:04}"))).expect("mkdir");
    }
    let journal = Arc::new(Journal::open(&tmp.path().join("journal")).expect("journal"));
    let t = journal.target_id("bench").expect("target id");
    let filter = Arc::new(Filter::none());
    let mut w: Box<dyn Watcher> = match backend {
        "fanotify" => {
            Box::new(FanotifyWatcher::start(&src, filter, journal.clone()).expect("fanotify start"))
        }
        _ => Box::new(
            InotifyWatcher::start(&src, filter, journal.clone(), None).expect("inotify start"),
        ),
    };

    let t0 = Instant::now();
    create(&src, files);
    let create_secs = t0.elapsed().as_secs_f64();

    let mut events = Vec::new();
    let mut kernel_events = 0u64;
    let mut overflows = 0u64;
    let start = Instant::now();
    let mut last_work = start;
    loop {
        w.poll(&mut events, Duration::from_millis(200))
            .expect("poll");
        if events.is_empty() {
            if last_work.elapsed() > Duration::from_millis(500) {
                break;
            }
            continue;
        }
        kernel_events += events.len() as u64;
        overflows += events.iter().filter(|e| **e == Event::Overflow).count() as u64;
        let changes = to_changes(std::mem::take(&mut events));
        journal.record(&[t], &changes).expect("record");
        last_work = Instant::now();
    }
    let drain_secs = last_work.duration_since(start).as_secs_f64();
    let pending = journal.pending_count(t).expect("pending count");
    Run {
        create_secs,
        drain_secs,
        kernel_events,
        pending,
        overflows,
    }
}

fn create(src: &Path, files: usize) {
    for i in 0..files {
        let p = src.join(format!("d{:04}/f{i:07}", i % DIRS));
        std::fs::File::create(&p).expect("create");
    }
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: the capture benchmark needs root (fanotify, and raising the kernel queue limits)");
        return;
    }
    let files: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let queue = files * 3 + 100_000;
    let _f = Sysctl::set("/proc/sys/fs/fanotify/max_queued_events", queue);
    let _i = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", queue);
    println!(
        "capture throughput: {files} file creations in {DIRS} directories, drained after the burst"
    );
    println!(
        "{:<9} {:>12} {:>12} {:>14} {:>13} {:>8} {:>9} {:>6}",
        "backend", "create/s", "capture/s", "events/s", "ratio", "pending", "overflow", "lost"
    );
    for backend in ["fanotify", "inotify"] {
        let r = run(backend, files);
        let create_rate = files as f64 / r.create_secs;
        let capture_rate = files as f64 / r.drain_secs;
        let expected = (files + DIRS) as u64;
        let lost = expected.saturating_sub(r.pending);
        println!(
            "{:<9} {:>12.0} {:>12.0} {:>14.0} {:>12.2}x {:>8} {:>9} {:>6}",
            backend,
            create_rate,
            capture_rate,
            r.kernel_events as f64 / r.drain_secs,
            capture_rate / create_rate,
            r.pending,
            r.overflows,
            lost
        );
        if lost > 0 || r.overflows > 0 {
            eprintln!(
                "{backend}: changes lost ({lost}) or queue overflowed ({})",
                r.overflows
            );
            std::process::exit(1);
        }
    }
}
