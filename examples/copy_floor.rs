//! The floor of an initial sync with drmirror's copy engine: the same
//! parallel walk, listing as the daemon lists a directory the target lacks
//! (a stat per entry: `scan::walk`),
//! feeding the same per-file copy (`LocalTarget::apply_group`: O_TMPFILE,
//! stat before and after, linkat),
//! then the directories' attributes, deepest first; but no journal, no
//! capture and no shipper in between.
//!
//!   copy_floor SRC DST
//!
//! `tools/bench-initial-sync` times it next to `rsync -a` and the daemon:
//! daemon / floor is what the journal, capture and batching cost, and
//! floor / rsync is the best ratio this copy engine can reach on the
//! machine. Not a product path: nothing records what was copied, and a
//! change made meanwhile is not followed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use drmirror::fsops::Root;
use drmirror::journal::flags;
use drmirror::locks::lock;
use drmirror::meta::{Kind, Meta};
use drmirror::scan;
use drmirror::ship::GROUP;
use drmirror::target::local::{DeletePolicy, LocalTarget};
use drmirror::target::Outcome;

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [src, dst] = args.as_slice() else {
        bail!("usage: copy_floor SRC DST");
    };
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("work-{i}"))
        .build_global();
    let t0 = Instant::now();
    let root = Root::open(src).with_context(|| format!("source {}", src.display()))?;
    let owner = rustix::process::geteuid().is_root();
    let target =
        LocalTarget::open(dst, owner).with_context(|| format!("target {}", dst.display()))?;
    let policy = DeletePolicy {
        at_startup: false,
        while_running: false,
    };
    let copied = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let dirs: Mutex<Vec<(Vec<u8>, Meta)>> = Mutex::new(Vec::new());
    if let Some(m) = root.lstat(b"")? {
        lock(&dirs).push((Vec::new(), m));
    }
    // Listed with a stat per entry, as the daemon's startup scan lists a
    // directory new on the target (for its progress in bytes).
    scan::walk(
        &root,
        b"",
        |dir, children| {
            let entries: Vec<(&[u8], u8)> = children
                .iter()
                .map(|c| {
                    let listed = if c.meta.kind == Kind::File {
                        flags::LISTED_FILE
                    } else {
                        0
                    };
                    (c.rel.as_slice(), flags::ABSENT | flags::STARTUP | listed)
                })
                .collect();
            for chunk in entries.chunks(GROUP) {
                for r in target.apply_group(&root, dir, chunk, &[], policy) {
                    match r {
                        Ok(Outcome::Copied { .. }) => {
                            copied.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("copy_floor: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            // The daemon stats each directory it stamps, too.
            lock(&dirs).extend(
                children
                    .iter()
                    .filter(|c| c.meta.kind == Kind::Dir)
                    .filter_map(|c| Some((c.rel.clone(), root.lstat(&c.rel).ok()??))),
            );
        },
        |p, e| {
            eprintln!("copy_floor: {}: {e}", String::from_utf8_lossy(p));
            failed.fetch_add(1, Ordering::Relaxed);
        },
    );
    let mut dirs = dirs.into_inner().unwrap_or_else(|p| p.into_inner());
    // Deepest first, as the daemon stamps them: a child's creation would
    // otherwise move its parent's mtime again.
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (d, m) in &dirs {
        if let Err(e) = target.set_dir_attrs_from(&root, d, m) {
            eprintln!("copy_floor: {e}");
            failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    println!(
        "copy_floor: copied={} dirs={} failed={} secs={:.3}",
        copied.load(Ordering::Relaxed),
        dirs.len(),
        failed.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64()
    );
    if failed.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}
