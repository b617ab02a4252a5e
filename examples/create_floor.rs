//! The kernel's floor under the receiver's CPU time in `tools/bench-remote`:
//! the system calls drmirror's receiver makes to put a new small file in
//! place at its name (`openat(O_CREAT|O_EXCL)` in the parent directory,
//! `write`, `futimens`, `close`; `LocalTarget::put_new_file` once its
//! memo of new files' owner and mode is warm), made by THREADS threads
//! (default 2) for a copy of SRC held in memory, and nothing else: no
//! wire, no decoding, no checksums, no acknowledgements.
//!
//!   create_floor SRC DST [THREADS]
//!
//! Prints the CPU seconds (user + system, all threads) and the wall time
//! of the create phase alone. DST must not exist. Regular files and
//! directories only; files larger than 64 KiB are refused (the receiver
//! streams those another way).

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use drmirror::fsops;
use rustix::fs::{Mode, OFlags};

struct File {
    name: OsString,
    data: Vec<u8>,
    mode: u32,
    mtime_ns: i64,
}

struct Dir {
    rel: PathBuf,
    files: Vec<File>,
}

fn load(src: &Path, rel: &Path, out: &mut Vec<Dir>) -> Result<()> {
    let here = src.join(rel);
    let mut dir = Dir {
        rel: rel.to_path_buf(),
        files: Vec::new(),
    };
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(&here).with_context(|| format!("listing {}", here.display()))? {
        let e = e.with_context(|| format!("listing {}", here.display()))?;
        let m = e
            .metadata()
            .with_context(|| format!("stat {}", e.path().display()))?;
        if m.is_dir() {
            subdirs.push(rel.join(e.file_name()));
        } else if m.is_file() {
            if m.len() > 64 << 10 {
                bail!("{}: larger than 64 KiB", e.path().display());
            }
            dir.files.push(File {
                name: e.file_name(),
                data: std::fs::read(e.path())
                    .with_context(|| format!("reading {}", e.path().display()))?,
                mode: m.permissions().mode() & 0o7777,
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            });
        } else {
            bail!("{}: neither a file nor a directory", e.path().display());
        }
    }
    out.push(dir);
    for s in subdirs {
        load(src, &s, out)?;
    }
    Ok(())
}

/// User + system CPU seconds of this process, its finished threads included.
fn cpu_s() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a valid, writable rusage; getrusage(RUSAGE_SELF)
    // only fills it in and cannot fail with these arguments.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn create(dst: &Path, dirs: &[&Dir]) -> Result<()> {
    for d in dirs {
        let path = dst.join(&d.rel);
        let dfd = rustix::fs::open(
            &path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", path.display()))?;
        for f in &d.files {
            let what = || format!("{}", path.join(&f.name).display());
            let out = rustix::fs::openat(
                &dfd,
                f.name.as_bytes(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(f.mode & 0o777),
            )
            .with_context(what)?;
            fsops::write_all(out.as_fd(), &f.data).with_context(what)?;
            rustix::fs::futimens(&out, &fsops::mtime_only(f.mtime_ns)).with_context(what)?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let (src, dst, threads) = match args.as_slice() {
        [s, d] => (PathBuf::from(s), PathBuf::from(d), 2),
        [s, d, t] => {
            let t: usize = t
                .to_str()
                .and_then(|t| t.parse().ok())
                .filter(|&t| t > 0)
                .context("THREADS: a positive number")?;
            (PathBuf::from(s), PathBuf::from(d), t)
        }
        _ => bail!("usage: create_floor SRC DST [THREADS]"),
    };
    if dst.exists() {
        bail!(
            "{}: exists (create_floor needs a new directory)",
            dst.display()
        );
    }
    let mut dirs = Vec::new();
    load(&src, Path::new(""), &mut dirs)?;
    for d in &dirs {
        let path = dst.join(&d.rel);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    }
    let files: usize = dirs.iter().map(|d| d.files.len()).sum();
    // Whole directories to each thread, taken in turn: the receiver's
    // workers take whole batches, and a batch is a run of one directory's
    // files.
    let shares: Vec<Vec<&Dir>> = (0..threads)
        .map(|k| dirs.iter().skip(k).step_by(threads).collect())
        .collect();
    let (c0, t0) = (cpu_s(), Instant::now());
    std::thread::scope(|s| {
        let running: Vec<_> = shares
            .iter()
            .map(|share| s.spawn(|| create(&dst, share)))
            .collect();
        running
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| bail!("a thread panicked")))
    })?;
    let (cpu, wall) = (cpu_s() - c0, t0.elapsed().as_secs_f64());
    println!(
        "create_floor: files={files} dirs={} threads={threads} cpu_s={cpu:.2} wall_s={wall:.2} us_per_file={:.1}",
        dirs.len(),
        cpu * 1e6 / files.max(1) as f64
    );
    Ok(())
}
