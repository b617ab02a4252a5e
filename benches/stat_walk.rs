//! Baseline for the reconciliation rate: a plain parallel lstat walk.
//!
//! `cargo bench --bench stat_walk -- DIR` walks DIR with rayon, one
//! `symlink_metadata` per entry and nothing else, and prints
//! `entries=N secs=S rate=R` (per second). tools/bench-restart runs it on
//! the same tree as drmirror's startup scan, in the same run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn walk<'s>(s: &rayon::Scope<'s>, dir: PathBuf, n: &'s AtomicU64) {
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            n.fetch_add(1, Ordering::Relaxed);
            if m.is_dir() {
                s.spawn(move |s| walk(s, p, n));
            }
        }
    }
}

fn main() {
    let Some(dir) = std::env::args().skip(1).find(|a| !a.starts_with("--")) else {
        eprintln!("usage: cargo bench --bench stat_walk -- DIR");
        return;
    };
    let n = AtomicU64::new(0);
    let t = Instant::now();
    rayon::scope(|s| walk(s, Path::new(&dir).to_path_buf(), &n));
    let secs = t.elapsed().as_secs_f64();
    let n = n.into_inner();
    println!("entries={n} secs={secs:.3} rate={:.0}", n as f64 / secs);
}
