//! Shared helpers for the integration tests: temp trees, the daemon process,
//! `drmirror verify`, polling with informative failures.
//!
//! Everything is path/`OsStr` based so that names with invalid UTF-8 or
//! newlines work. Every wait has a deadline and panics with the daemon log
//! tail, so a failing test says what the daemon was doing.
#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The drmirror binary under test: cargo's, or `DRMIRROR_TEST_BIN` (a copy
/// that a long run, such as `tools/churn`, keeps while the tree is rebuilt).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("DRMIRROR_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_drmirror").into())
    })
}

/// uid/gid of `nobody` / `nogroup`.
pub const NOBODY: (u32, u32) = (65534, 65534);

/// Default time allowed for the mirror to converge.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

// ---------------------------------------------------------------------------
// Text helpers
// ---------------------------------------------------------------------------

/// Removes ANSI CSI escape sequences (tracing may colour its output).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for c2 in it.by_ref() {
                    if ('@'..='~').contains(&c2) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[... {start} earlier lines ...]\n"));
    }
    out.push_str(&lines[start..].join("\n"));
    out
}

/// The first `n` lines of `s` plus its last line (verify's summary).
pub fn head(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= n + 1 {
        return lines.join("\n");
    }
    format!(
        "{}\n[... {} more lines ...]\n{}",
        lines[..n].join("\n"),
        lines.len() - n - 1,
        lines[lines.len() - 1]
    )
}

/// Parses `key=N` out of a log line (`copied=12`). The key must not be the
/// tail of a longer word.
pub fn kv(line: &str, key: &str) -> Option<u64> {
    let pat = format!("{key}=");
    let bytes = line.as_bytes();
    let mut start = 0;
    while let Some(pos) = line[start..].find(&pat) {
        let abs = start + pos;
        let before_ok = abs == 0 || {
            let b = bytes[abs - 1];
            !(b.is_ascii_alphanumeric() || b == b'_')
        };
        let rest = &line[abs + pat.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if before_ok && !digits.is_empty() {
            return digits.parse().ok();
        }
        start = abs + pat.len();
    }
    None
}

/// Builds an `OsString` from raw bytes (may be invalid UTF-8).
pub fn os(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

/// TOML basic string for a path.
pub fn toml_str(p: &Path) -> String {
    let s = p.to_str().expect("temp paths are UTF-8");
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------
// Deterministic pseudo random numbers and data
// ---------------------------------------------------------------------------

/// xorshift64: deterministic, no dependency.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // A bijective mix: seeds that differ only in bit 0 must still give
        // different streams (`(seed ^ K) | 1` did not).
        let s = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        XorShift(if s == 0 { 1 } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (0 when n == 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// In `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo))
    }
}

/// `len` pseudo random bytes determined by `seed` (never all zeros).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = XorShift::new(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------
// File system helpers (all panic with the path on error)
// ---------------------------------------------------------------------------

pub fn mkdirp(p: &Path) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", p.display()));
}

/// Writes `data` to `p`, creating parent directories.
pub fn write(p: &Path, data: &[u8]) {
    if let Some(parent) = p.parent() {
        mkdirp(parent);
    }
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// Creates `p` with exactly `mode` (no umask surprises) and content.
pub fn write_mode(p: &Path, data: &[u8], mode: u32) {
    if let Some(parent) = p.parent() {
        mkdirp(parent);
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    drop(f);
    chmod(p, mode);
}

pub fn append(p: &Path, data: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open for append {}: {e}", p.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("append {}: {e}", p.display()));
}

pub fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `lstat`.
pub fn lmeta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Exists without following a final symlink.
pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

pub fn ino(p: &Path) -> u64 {
    lmeta(p).ino()
}

pub fn mode_of(p: &Path) -> u32 {
    lmeta(p).mode() & 0o7777
}

pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("lchown {uid}:{gid} {}: {e}", p.display()));
}

/// Makes FIFO `p` (mode 0644).
pub fn mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

pub fn symlink(text: impl AsRef<Path>, link: &Path) {
    if let Some(parent) = link.parent() {
        mkdirp(parent);
    }
    std::os::unix::fs::symlink(text.as_ref(), link).unwrap_or_else(|e| {
        panic!(
            "symlink {} -> {}: {e}",
            link.display(),
            text.as_ref().display()
        )
    });
}

pub fn read_link(p: &Path) -> PathBuf {
    fs::read_link(p).unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
}

pub fn rename(from: &Path, to: &Path) {
    fs::rename(from, to)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", from.display(), to.display()));
}

pub fn remove_file(p: &Path) {
    fs::remove_file(p).unwrap_or_else(|e| panic!("rm {}: {e}", p.display()));
}

pub fn remove_dir_all(p: &Path) {
    fs::remove_dir_all(p).unwrap_or_else(|e| panic!("rm -r {}: {e}", p.display()));
}

/// Sets atime and mtime of `p` (not following symlinks), nanosecond precision.
pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let ts = Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
}

/// (seconds, nanoseconds) of the mtime, not following symlinks.
pub fn mtime_of(p: &Path) -> (i64, i64) {
    let m = lmeta(p);
    (m.mtime(), m.mtime_nsec())
}

/// Copies the mtime of `from` to `to` (both not followed).
pub fn copy_mtime(from: &Path, to: &Path) {
    let (s, ns) = mtime_of(from);
    set_mtime(to, s, ns);
}

/// All entries below `root` (not followed, root excluded), relative, sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(_) => continue,
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// Counts regular files below `root` whose name satisfies `pred`.
/// Tolerates entries vanishing during the walk.
pub fn count_files(root: &Path, pred: &dyn Fn(&OsStr) -> bool) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(r) => r,
            Err(_) => continue,
        };
        for e in rd.flatten() {
            let ft = match e.file_type() {
                Ok(t) => t,
                Err(_) => continue,
            };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && pred(&e.file_name()) {
                n += 1;
            }
        }
    }
    n
}

/// `chown -R -h uid:gid root` (root included).
pub fn chown_r(root: &Path, uid: u32, gid: u32) {
    lchown(root, uid, gid);
    for rel in walk(root) {
        lchown(&root.join(rel), uid, gid);
    }
}

/// Creates `files` files below `root` in directories `dNNNN` of `per_dir`
/// files each, named `fNNNNNNN` (global index), sizes 0..=4096 bytes with
/// index-dependent content. Returns the file paths.
pub fn gen_tree(root: &Path, files: usize, per_dir: usize) -> Vec<PathBuf> {
    mkdirp(root);
    let per_dir = per_dir.max(1);
    let mut out = Vec::with_capacity(files);
    let mut buf: Vec<u8> = Vec::with_capacity(4097);
    for i in 0..files {
        let dir = root.join(format!("d{:04}", i / per_dir));
        if i % per_dir == 0 {
            mkdirp(&dir);
        }
        let p = dir.join(format!("f{:07}", i));
        let size = (i.wrapping_mul(2_654_435_761) >> 7) % 4097;
        buf.clear();
        buf.extend((0..size).map(|j| ((i.wrapping_mul(31)).wrapping_add(j * 7) % 251) as u8));
        fs::write(&p, &buf).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        out.push(p);
    }
    out
}

/// True for names produced by `gen_tree` (`f` + 7 digits).
pub fn is_gen_name(n: &OsStr) -> bool {
    let b = n.as_bytes();
    b.len() == 8 && b[0] == b'f' && b[1..].iter().all(|c| c.is_ascii_digit())
}

/// File names that break naive implementations.
pub fn odd_names() -> Vec<OsString> {
    let v: Vec<&[u8]> = vec![
        &b"with space.txt"[..],
        &b"new\nline"[..],
        &b"bad\xff"[..],
        &b"bad\xc3(utf8"[..],
        "ünïcødé 日本語 🎉.txt".as_bytes(),
        &b"tab\there"[..],
        &b"back\\slash"[..],
        &b"quote\"'"[..],
        &b"-dash"[..],
        &b".hidden"[..],
        &b"glob*?[x]"[..],
        &b"percent%20"[..],
        &b"trailing space "[..],
        &b"CR\rname"[..],
    ];
    v.into_iter().map(os).collect()
}

/// Populates `root` with a tree exercising every kind of entry the mirror
/// must reproduce. Returns the number of regular files (names) created.
pub fn populate_rich(root: &Path) -> usize {
    mkdirp(root);
    let mut files = 0;
    for name in odd_names() {
        write(&root.join(&name), name.as_bytes());
        files += 1;
        write(&root.join("odd_dirs").join(&name).join("inner"), b"inner");
        files += 1;
    }
    write(&root.join("empty"), b"");
    files += 1;

    let mut deep = root.join("deep");
    for _ in 0..70 {
        deep.push("d");
    }
    write(&deep.join("bottom.txt"), b"bottom of a 70-level tree");
    files += 1;

    write(&root.join("links/target.txt"), b"link target");
    files += 1;
    symlink("target.txt", &root.join("links/rel"));
    symlink("/etc/passwd", &root.join("links/abs"));
    symlink("no/such/thing", &root.join("links/dangling"));
    write(&root.join("links/realdir/f"), b"in realdir");
    files += 1;
    symlink("realdir", &root.join("links/dirlink"));
    symlink("../..", &root.join("links/escape"));

    write_mode(&root.join("modes/m600"), b"600", 0o600);
    write_mode(&root.join("modes/m755"), b"#!/bin/sh\n", 0o755);
    write_mode(&root.join("modes/m444"), b"444", 0o444);
    files += 3;
    write(&root.join("modes/private/f"), b"private");
    files += 1;
    chmod(&root.join("modes/private"), 0o700);

    write(&root.join("big.bin"), &pattern(3 << 20, 77));
    files += 1;
    fs::hard_link(root.join("big.bin"), root.join("big.hardlink")).expect("hard link");
    files += 1;

    mkdirp(&root.join("emptydir/nested_empty"));

    if is_root() {
        write(&root.join("owned/f"), b"owned by 1234:5678");
        files += 1;
        lchown(&root.join("owned/f"), 1234, 5678);
        lchown(&root.join("owned"), 1234, 5678);
    }

    files += gen_tree(&root.join("gen"), 300, 60).len();

    // Explicit times last (children were created above).
    set_mtime(&root.join("modes/m600"), 1_000_000_000, 123_456_789);
    set_mtime(&root.join("links/rel"), 1_100_000_000, 1);
    set_mtime(&root.join("emptydir/nested_empty"), 1_150_000_000, 5);
    set_mtime(&root.join("emptydir"), 1_200_000_000, 999_999_999);
    files
}

/// Copies the tree `src` onto `dst` (dst may exist and be empty), preserving
/// type, content, mode, owner (when root), mtime (ns) and symlink text; the
/// root's mode and mtime included.
pub fn clone_tree(src: &Path, dst: &Path) {
    if !exists(dst) {
        fs::create_dir(dst).unwrap_or_else(|e| panic!("mkdir {}: {e}", dst.display()));
    }
    let rd = fs::read_dir(src).unwrap_or_else(|e| panic!("readdir {}: {e}", src.display()));
    for e in rd {
        let e = e.expect("readdir entry");
        clone_entry(&e.path(), &dst.join(e.file_name()));
    }
    copy_attrs(src, dst);
}

fn clone_entry(s: &Path, d: &Path) {
    let m = lmeta(s);
    let ft = m.file_type();
    if ft.is_symlink() {
        symlink(read_link(s), d);
        if is_root() {
            lchown(d, m.uid(), m.gid());
        }
        set_mtime(d, m.mtime(), m.mtime_nsec());
    } else if ft.is_dir() {
        fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        let rd = fs::read_dir(s).unwrap_or_else(|e| panic!("readdir {}: {e}", s.display()));
        for e in rd {
            let e = e.expect("readdir entry");
            clone_entry(&e.path(), &d.join(e.file_name()));
        }
        copy_attrs(s, d);
    } else if ft.is_file() {
        fs::copy(s, d).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", s.display(), d.display()));
        copy_attrs(s, d);
    } else {
        panic!("clone_tree: unsupported file type at {}", s.display());
    }
}

fn copy_attrs(s: &Path, d: &Path) {
    let m = lmeta(s);
    if is_root() {
        lchown(d, m.uid(), m.gid());
    }
    chmod(d, m.mode() & 0o7777);
    set_mtime(d, m.mtime(), m.mtime_nsec());
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Output of a finished command.
pub struct CmdOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            head(&self.stdout, 60),
            tail(&self.stderr, 60)
        )
    }
}

/// Runs `cmd` to completion with captured output; kills it and panics after
/// `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> CmdOut {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut so = child.stdout.take().expect("stdout pipe");
    let mut se = child.stderr.take().expect("stderr pipe");
    let t1 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break Some(st),
            None => {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                thread::sleep(ms(10));
            }
        }
    };
    let out = CmdOut {
        code: status.and_then(|s| s.code()),
        stdout: strip_ansi(&String::from_utf8_lossy(&t1.join().unwrap_or_default())),
        stderr: strip_ansi(&String::from_utf8_lossy(&t2.join().unwrap_or_default())),
    };
    if status.is_none() {
        panic!(
            "command {cmd:?} did not finish within {timeout:?}; {}",
            out.describe()
        );
    }
    out
}

/// Runs `drmirror ARGS` (default log level, no colour), waits up to `timeout`.
pub fn drmirror(args: &[OsString], timeout: Duration) -> CmdOut {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("STATE_DIRECTORY")
        .env("NO_COLOR", "1");
    run_timeout(&mut cmd, timeout)
}

static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running `drmirror run` process; stdout and stderr go to a log file.
pub struct Daemon {
    child: RefCell<Child>,
    status: Cell<Option<ExitStatus>>,
    pub log_path: PathBuf,
    pub pid: u32,
}

impl Daemon {
    /// Spawns `bin() ARGS` (args include the `run` subcommand) with
    /// `RUST_LOG=info`, logging to a new file in `log_dir`. `user` runs it as
    /// that uid/gid (needs root); `other` overrides the binary path.
    pub fn spawn(
        args: &[OsString],
        log_dir: &Path,
        user: Option<(u32, u32)>,
        other: Option<&Path>,
    ) -> Daemon {
        let path: PathBuf = other
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(bin()));
        let mut cmd = Command::new(&path);
        cmd.args(args);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        Daemon::spawn_command(cmd, log_dir)
    }

    /// Spawns a prepared command (arguments, environment, pre-exec hooks)
    /// with `RUST_LOG=info`, output to a new log file in `log_dir`.
    pub fn spawn_command(mut cmd: Command, log_dir: &Path) -> Daemon {
        let n = LOG_SEQ.fetch_add(1, Ordering::SeqCst);
        let log_path = log_dir.join(format!("daemon-{n}.log"));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create log {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("clone log fd");
        // DRMIRROR_TEST_LOG: another level for a debugging run.
        let level = std::env::var("DRMIRROR_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            .env_remove("STATE_DIRECTORY")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log));
        let mut attempts = 0;
        let child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                // ETXTBSY: a freshly copied binary still open in a child
                // forked by a parallel test; retry briefly.
                Err(e) if e.raw_os_error() == Some(26) && attempts < 100 => {
                    attempts += 1;
                    thread::sleep(ms(50));
                }
                Err(e) => panic!("spawn {cmd:?}: {e}"),
            }
        };
        let pid = child.id();
        Daemon {
            child: RefCell::new(child),
            status: Cell::new(None),
            log_path,
            pid,
        }
    }

    /// The exit status if the process has exited.
    pub fn poll_exit(&self) -> Option<ExitStatus> {
        if let Some(s) = self.status.get() {
            return Some(s);
        }
        let r = self
            .child
            .borrow_mut()
            .try_wait()
            .expect("try_wait on drmirror");
        if r.is_some() {
            self.status.set(r);
        }
        r
    }

    pub fn is_running(&self) -> bool {
        self.poll_exit().is_none()
    }

    /// The whole log so far (ANSI stripped, lossy UTF-8).
    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &fs::read(&self.log_path).unwrap_or_default(),
        ))
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- daemon log {} (tail) ---\n{}",
            self.log_path.display(),
            tail(&self.log(), 80)
        )
    }

    /// Waits until a log line contains `needle`; returns that line. Panics
    /// with the log on timeout or if the process exits first.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Some(st) = self.poll_exit() {
                let log = self.log();
                if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                panic!(
                    "drmirror (pid {}) exited ({st}) before logging {needle:?}\n{}",
                    self.pid,
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timeout after {timeout:?} waiting for {needle:?} in the log of drmirror (pid {})\n{}",
                    self.pid,
                    self.log_tail()
                );
            }
            thread::sleep(ms(50));
        }
    }

    /// Waits for `drmirror ready` (60 s).
    pub fn wait_ready(&self) {
        self.wait_log("drmirror ready", secs(60));
    }

    /// Waits for the `initial sync complete` line and returns it.
    pub fn wait_initial_sync(&self, timeout: Duration) -> String {
        self.wait_log("initial sync complete", timeout)
    }

    /// `copied=N` of the first `initial sync complete` line.
    pub fn initial_copied(&self, timeout: Duration) -> u64 {
        let line = self.wait_initial_sync(timeout);
        kv(&line, "copied").unwrap_or_else(|| {
            panic!(
                "no copied=N in the initial sync line {line:?}\n{}",
                self.log_tail()
            )
        })
    }

    /// Sends a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid as i32).expect("nonzero pid");
        rustix::process::kill_process(pid, sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig:?}): {e}", self.pid));
    }

    /// Waits for the process to exit; kills it and panics after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.poll_exit() {
                return st;
            }
            if Instant::now() >= deadline {
                self.force_kill();
                panic!(
                    "drmirror (pid {}) did not exit within {timeout:?}\n{}",
                    self.pid,
                    self.log_tail()
                );
            }
            thread::sleep(ms(20));
        }
    }

    /// SIGKILL and reap, whatever state the process is in (a failure path
    /// keeping evidence).
    pub fn force_kill(&self) {
        if self.status.get().is_some() {
            return;
        }
        let mut c = self.child.borrow_mut();
        let _ = c.kill();
        let st: Option<ExitStatus> = c.wait().ok();
        drop(c);
        if st.is_some() {
            self.status.set(st);
        }
    }

    /// SIGKILL and reap. Panics if the process had already exited (a crash
    /// test must crash a live process).
    pub fn kill9(&self) {
        if let Some(st) = self.poll_exit() {
            panic!(
                "kill9: drmirror (pid {}) had already exited ({st})\n{}",
                self.pid,
                self.log_tail()
            );
        }
        self.force_kill();
        assert!(
            self.status.get().is_some(),
            "kill9: could not reap pid {}",
            self.pid
        );
    }

    /// SIGTERM, wait (30 s), assert exit code 0 and `stopped cleanly`.
    pub fn terminate(&self) {
        self.stop_with(rustix::process::Signal::TERM);
    }

    /// Like `terminate` with another signal (SIGINT).
    pub fn stop_with(&self, sig: rustix::process::Signal) {
        if let Some(st) = self.poll_exit() {
            panic!(
                "stop: drmirror (pid {}) had already exited ({st})\n{}",
                self.pid,
                self.log_tail()
            );
        }
        self.signal(sig);
        let st = self.wait_exit(secs(30));
        assert_eq!(
            st.code(),
            Some(0),
            "drmirror exit status after {sig:?}: {st}\n{}",
            self.log_tail()
        );
        let log = self.log();
        assert!(
            log.contains("stopped cleanly"),
            "no `stopped cleanly` in the log after {sig:?}\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.get().is_none() {
            let c = self.child.get_mut();
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------

/// Runs `drmirror verify --source SRC --target DST EXTRA...`.
pub fn verify_out(src: &Path, dst: &Path, extra: &[&str]) -> CmdOut {
    let mut cmd = Command::new(bin());
    cmd.arg("verify")
        .arg("--source")
        .arg(src)
        .arg("--target")
        .arg(dst)
        .args(extra)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1");
    run_timeout(&mut cmd, secs(300))
}

/// (identical?, stdout+stderr)
pub fn verify(src: &Path, dst: &Path, extra: &[&str]) -> (bool, String) {
    let o = verify_out(src, dst, extra);
    (o.code == Some(0), o.all())
}

/// Polls verify every 200 ms until the trees are identical (90 s).
pub fn wait_converged(src: &Path, dst: &Path, extra: &[&str], d: Option<&Daemon>) -> String {
    wait_converged_for(src, dst, extra, d, CONVERGE_TIMEOUT)
}

/// Polls verify every 200 ms until the trees are identical; panics with the
/// last verify output and the daemon log on timeout or if the daemon died.
pub fn wait_converged_for(
    src: &Path,
    dst: &Path,
    extra: &[&str],
    d: Option<&Daemon>,
    timeout: Duration,
) -> String {
    let start = Instant::now();
    loop {
        let o = verify_out(src, dst, extra);
        if o.code == Some(0) {
            return o.stdout;
        }
        if let Some(d) = d {
            if let Some(st) = d.poll_exit() {
                panic!(
                    "drmirror exited ({st}) while waiting for {} -> {} to converge (verify {:?})\nlast verify: {}\n{}",
                    src.display(),
                    dst.display(),
                    extra,
                    o.describe(),
                    d.log_tail()
                );
            }
        }
        if start.elapsed() >= timeout {
            panic!(
                "not converged after {timeout:?}: {} -> {} (verify {:?})\nlast verify: {}\n{}\n{}",
                src.display(),
                dst.display(),
                extra,
                o.describe(),
                d.map(|d| d.log_tail()).unwrap_or_default(),
                keep_for_study(src)
            );
        }
        thread::sleep(ms(200));
    }
}

/// A copy of the run directory holding `src` (source, target, state and
/// daemon logs), made before a failing test's unwinding removes it: a
/// divergence seen once must be studied from what it left.
pub fn keep_for_study(src: &Path) -> String {
    let Some(root) = src.parent() else {
        return String::new();
    };
    let to = std::env::temp_dir().join(format!(
        "drmirror-failed-{}-{}",
        std::process::id(),
        CONFIG_SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    match Command::new("cp").arg("-a").arg(root).arg(&to).status() {
        Ok(st) if st.success() => {}
        r => return format!("could not copy {} for study: {r:?}", root.display()),
    }
    // The copy has inodes of its own: the source's, to check the index's
    // claims against, and those claims (read from the copied journal).
    let inodes = Command::new("find")
        .arg(src)
        .args(["-printf", "%i %s %T@ %P\n"])
        .output();
    if let Ok(out) = inodes {
        let _ = fs::write(to.join("source-inodes.txt"), out.stdout);
    }
    if let Ok(j) = drmirror::journal::Journal::open(&to.join("state").join("journal")) {
        let mut lines = String::new();
        let mut dirs = vec![Vec::new()];
        while let Some(d) = dirs.pop() {
            for (name, m) in j.index_children(0, &d).unwrap_or_default() {
                let p = if d.is_empty() {
                    name
                } else {
                    [d.as_slice(), b"/", name.as_slice()].concat()
                };
                lines.push_str(&format!(
                    "{} {} {} {} {:?}\n",
                    m.ino,
                    m.size,
                    m.mtime_ns,
                    String::from_utf8_lossy(&p),
                    m.kind
                ));
                if m.kind == drmirror::meta::Kind::Dir {
                    dirs.push(p);
                }
            }
        }
        let _ = fs::write(to.join("index.txt"), lines);
    }
    format!("run directory copied to {}", to.display())
}

/// Polls `cond` every 50 ms; panics with `what` and the daemon log on timeout.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    d: Option<&Daemon>,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if let Some(d) = d {
            if let Some(st) = d.poll_exit() {
                panic!(
                    "drmirror exited ({st}) while waiting until {what}\n{}",
                    d.log_tail()
                );
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "timeout after {timeout:?} waiting until {what}\n{}",
                d.map(|d| d.log_tail()).unwrap_or_default()
            );
        }
        thread::sleep(ms(50));
    }
}

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// A temp dir holding `src/`, `dst/` and `state/` (all created, empty).
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub state: PathBuf,
    /// Capture backend passed to the daemon (`None`: its default, auto).
    pub backend: Option<Backend>,
}

/// The capture backends the behavioural suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Fanotify,
    Inotify,
    Auto,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fanotify => "fanotify",
            Backend::Inotify => "inotify",
            Backend::Auto => "auto",
        }
    }

    /// The backend the daemon must report once ready: `auto` picks fanotify
    /// whenever it is available, which here means running as root on a
    /// kernel with FAN_RENAME (5.17+).
    pub fn expected(self) -> &'static str {
        match self {
            Backend::Fanotify => "fanotify",
            Backend::Inotify => "inotify",
            Backend::Auto if fanotify_available().is_ok() => "fanotify",
            Backend::Auto => "inotify",
        }
    }

    /// `Err(reason)` when this backend cannot run here (printed as a skip).
    pub fn unavailable(self) -> Option<String> {
        match self {
            Backend::Fanotify => fanotify_available().err(),
            _ => None,
        }
    }
}

/// Whether fanotify filesystem marks with FAN_RENAME work here.
pub fn fanotify_available() -> Result<(), String> {
    if !is_root() {
        return Err("fanotify needs CAP_SYS_ADMIN and the tests are not root".into());
    }
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel.trim().split(|c: char| !c.is_ascii_digit());
    let major: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    if (major, minor) < (5, 17) {
        return Err(format!("kernel {} lacks FAN_RENAME (5.17+)", rel.trim()));
    }
    Ok(())
}

/// Runs a suite test against `b`, or prints why it is skipped.
pub fn with_backend(b: Backend, test: fn(Backend)) {
    if let Some(why) = b.unavailable() {
        eprintln!("SKIP ({}): {why}", b.name());
        return;
    }
    test(b)
}

static CONFIG_SEQ: AtomicUsize = AtomicUsize::new(0);

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("drm")
            .tempdir_in("/tmp")
            .expect("create temp dir in /tmp");
        let root = tmp.path().to_path_buf();
        let src = root.join("src");
        let dst = root.join("dst");
        let state = root.join("state");
        for d in [&src, &dst, &state] {
            fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        Env {
            tmp,
            root,
            src,
            dst,
            state,
            backend: None,
        }
    }

    /// An environment whose daemons use capture backend `b`.
    pub fn with(b: Backend) -> Env {
        let mut e = Env::new();
        e.backend = Some(b);
        e
    }

    /// Path below src.
    pub fn s(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.src.join(rel)
    }

    /// Path below dst.
    pub fn d(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dst.join(rel)
    }

    /// `run --source SRC --target DST --state STATE EXTRA...`
    pub fn run_args(&self, extra: &[&str]) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            OsString::from("run"),
            OsString::from("--source"),
            self.src.clone().into_os_string(),
            OsString::from("--target"),
            self.dst.clone().into_os_string(),
            OsString::from("--state"),
            self.state.clone().into_os_string(),
        ];
        if let Some(b) = self.backend {
            a.push(OsString::from("--watch"));
            a.push(OsString::from(b.name()));
        }
        a.extend(extra.iter().map(OsString::from));
        a
    }

    /// Spawns the daemon on src/dst/state (does not wait for ready).
    pub fn spawn(&self, extra: &[&str]) -> Daemon {
        Daemon::spawn(&self.run_args(extra), &self.root, None, None)
    }

    /// Spawns the daemon and waits for `drmirror ready`.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        let d = self.spawn(extra);
        let line = d.wait_log("drmirror ready", secs(60));
        if let Some(b) = self.backend {
            assert!(
                line.contains(&format!("backend={} ", b.expected())),
                "watch = {} must run the {} backend here; ready line: {line}",
                b.name(),
                b.expected()
            );
        }
        d
    }

    /// [`Env::start`] with extra environment variables.
    pub fn start_env(&self, extra: &[&str], vars: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.args(self.run_args(extra)).envs(vars.iter().copied());
        let d = Daemon::spawn_command(cmd, &self.root);
        d.wait_log("drmirror ready", secs(60));
        d
    }

    /// Spawns `drmirror ARGS` (ARGS include `run`).
    pub fn spawn_args(&self, args: &[OsString]) -> Daemon {
        Daemon::spawn(args, &self.root, None, None)
    }

    /// Writes a config file into the temp dir and returns its path.
    pub fn write_config(&self, toml: &str) -> PathBuf {
        let n = CONFIG_SEQ.fetch_add(1, Ordering::SeqCst);
        let p = self.root.join(format!("config-{n}.toml"));
        write(&p, toml.as_bytes());
        p
    }

    /// Spawns `drmirror run --config FILE` with `toml` as the file.
    pub fn spawn_config(&self, toml: &str) -> Daemon {
        let p = self.write_config(toml);
        self.spawn_args(&[
            OsString::from("run"),
            OsString::from("--config"),
            p.into_os_string(),
        ])
    }

    /// Minimal valid config for src/dst/state plus extra top-level lines.
    pub fn config_text(&self, top_level_extra: &str) -> String {
        let watch = match self.backend {
            Some(b) if !top_level_extra.contains("watch") => format!("watch = \"{}\"\n", b.name()),
            _ => String::new(),
        };
        format!(
            "source = {}\nstate_dir = {}\n{watch}{}\n\n[[target]]\npath = {}\n",
            toml_str(&self.src),
            toml_str(&self.state),
            top_level_extra,
            toml_str(&self.dst)
        )
    }

    pub fn verify(&self, extra: &[&str]) -> (bool, String) {
        verify(&self.src, &self.dst, extra)
    }

    pub fn verify_out(&self, extra: &[&str]) -> CmdOut {
        verify_out(&self.src, &self.dst, extra)
    }

    /// wait_converged(src, dst, extra, Some(d)).
    pub fn converge(&self, extra: &[&str], d: &Daemon) -> String {
        wait_converged(&self.src, &self.dst, extra, Some(d))
    }

    pub fn converge_for(&self, extra: &[&str], d: &Daemon, timeout: Duration) -> String {
        wait_converged_for(&self.src, &self.dst, extra, Some(d), timeout)
    }

    /// A path to the drmirror binary that `uid` can execute: the original if
    /// every ancestor directory is world-searchable, else a copy in the temp
    /// dir.
    pub fn bin_for_other_user(&self) -> PathBuf {
        let orig = PathBuf::from(bin());
        let world_ok = |p: &Path| {
            fs::metadata(p)
                .map(|m| m.mode() & 0o001 != 0)
                .unwrap_or(false)
        };
        if orig
            .ancestors()
            .all(|a| a.as_os_str().is_empty() || world_ok(a))
        {
            return orig;
        }
        let copy = self.root.join("drmirror-bin");
        fs::copy(&orig, &copy)
            .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", orig.display(), copy.display()));
        chmod(&copy, 0o755);
        copy
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A plain HTTP/1.0 GET on loopback (no HTTP client crate needed for this).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of a Prometheus sample line starting with `series` (name plus
/// labels, e.g. `drmirror_events_total{kind="change"}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the daemon serving metrics on `port` has not woken its
/// capture loop for a second: it is blocked waiting for the kernel, holding
/// no events it has read but not recorded.
pub fn wait_capture_quiet(port: u16, d: &Daemon) {
    wait_metric_still(port, d, "drmirror_capture_wakeups_total")
}

/// Waits until no new event from the source has been recorded for a
/// second (events of other tests on the same filesystem do not count).
pub fn wait_events_recorded(port: u16, d: &Daemon) {
    wait_metric_still(port, d, "drmirror_events_total")
}

/// Waits until `series` has not changed for a second.
pub fn wait_metric_still(port: u16, d: &Daemon, series: &str) {
    let wakeups = || {
        let text = http_get(port, "/metrics")
            .unwrap_or_else(|| panic!("no /metrics on port {port}\n{}", d.log_tail()));
        metric(&text, series)
    };
    let deadline = Instant::now() + secs(30);
    let mut last = wakeups();
    loop {
        std::thread::sleep(secs(1));
        let now = wakeups();
        if now == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} kept changing ({last} -> {now})\n{}",
            d.log_tail()
        );
        last = now;
    }
}

/// Unmounts (lazily) on drop, so a failing test leaves no mount behind.
pub struct MountGuard(PathBuf);

impl MountGuard {
    /// Takes charge of a mount made at `at` by other means.
    pub fn new(at: &Path) -> MountGuard {
        MountGuard(at.to_path_buf())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

pub fn mount(fstype: &str, at: &Path) -> Option<MountGuard> {
    mount_with(fstype, "defaults", at)
}

/// [`mount`] with mount options `opts` (`-o`).
pub fn mount_with(fstype: &str, opts: &str, at: &Path) -> Option<MountGuard> {
    mkdirp(at);
    let ok = Command::new("mount")
        .args(["-t", fstype, "-o", opts, fstype])
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: cannot mount {fstype} at {}", at.display());
        return None;
    }
    Some(MountGuard(at.to_path_buf()))
}

/// `mount --bind from at`; `None` (with a printed reason) where that is
/// not allowed.
pub fn bind_mount(from: &Path, at: &Path) -> Option<MountGuard> {
    mkdirp(at);
    let ok = Command::new("mount")
        .arg("--bind")
        .arg(from)
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIP: cannot bind-mount {} at {} (needs root)",
            from.display(),
            at.display()
        );
        return None;
    }
    Some(MountGuard(at.to_path_buf()))
}

/// The number after `key=` in `line`.
pub fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// A `drmirror receive --listen` on a free loopback port, serving `env.dst`.
pub struct Tcp {
    pub port: u16,
    pub token: PathBuf,
}

impl Tcp {
    pub fn new(env: &Env) -> Tcp {
        let token = env.root.join("tcp-token");
        write(&token, b"tcp-test-token\n");
        Tcp {
            port: free_port(),
            token,
        }
    }

    pub fn receiver(&self, env: &Env, vars: &[(&str, &str)]) -> Daemon {
        self.receiver_args(env, vars, &[])
    }

    /// [`Tcp::receiver`] with more arguments.
    pub fn receiver_args(&self, env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Daemon {
        self.receiver_on(env, Command::new(bin()), "127.0.0.1", vars, args)
    }

    /// A receiver that `cmd` (bin(), or a wrapper that runs it) starts,
    /// listening on `ip`.
    pub fn receiver_on(
        &self,
        env: &Env,
        mut cmd: Command,
        ip: &str,
        vars: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        cmd.arg("receive")
            .args(args)
            .arg("--listen")
            .arg(format!("{ip}:{}", self.port))
            .arg("--root")
            .arg(&env.dst)
            .arg("--token-file")
            .arg(&self.token)
            .envs(vars.iter().copied());
        let r = Daemon::spawn_command(cmd, &env.root);
        r.wait_log("listening on", secs(20));
        r
    }

    pub fn target_toml(&self, env: &Env) -> String {
        format!(
            "[[target]]\nname = \"dr\"\npath = \"tcp://127.0.0.1:{}{}\"\ntoken_file = {}\n",
            self.port,
            env.dst.display(),
            toml_str(&self.token)
        )
    }
}

/// What a power loss with copies unflushed would leave behind: the
/// journal's note of the boot that copied (for its one target, id 0), and
/// the copy `victim` on the target without its data (emptied, its mtime
/// kept).
pub fn lose_unflushed_copy(journal: &Path, victim: &Path, boot: &[u8]) {
    let j = drmirror::journal::Journal::open(journal).expect("journal");
    j.set_unflushed(0, boot).expect("note");
    drop(j);
    empty_keeping_mtime(victim);
}

/// Empties file `victim` and puts its mtime back: a copy whose data a
/// power loss took (its size and name survived in the journal of the
/// filesystem, its blocks had not been written).
pub fn empty_keeping_mtime(victim: &Path) {
    let mt = mtime_of(victim);
    std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .and_then(|f| f.set_len(0))
        .expect("truncate the copy");
    set_mtime(victim, mt.0, mt.1);
}

/// A network namespace joined to this one by a veth pair: a "DR host" at
/// `peer_ip` whose link can be cut without a word (its interface set
/// down: nothing answers, nothing resets). Removed on drop. Its loopback
/// interface stays down, as nothing needs it: a receiver in it must stop
/// on SIGTERM all the same (it used to connect to its own listen address
/// to wake its accept loop, and hung there).
pub struct NetNs {
    pub name: String,
    host_if: String,
    peer_if: String,
    pub host_ip: String,
    pub peer_ip: String,
}

impl NetNs {
    /// `None` (with a printed reason) without root or iproute2.
    pub fn new() -> Option<NetNs> {
        if !is_root() {
            eprintln!("SKIP: a network namespace needs root");
            return None;
        }
        let id = std::process::id() % 100_000;
        let net = NetNs {
            name: format!("drm{id}"),
            host_if: format!("dmh{id}"),
            peer_if: format!("dmr{id}"),
            host_ip: format!("10.213.{}.1", id % 250),
            peer_ip: format!("10.213.{}.2", id % 250),
        };
        let host_ip = format!("{}/30", net.host_ip);
        let peer_cidr = format!("{}/30", net.peer_ip);
        let steps: [&[&str]; 7] = [
            &["netns", "add", &net.name],
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &net.peer_if,
            ],
            &["link", "set", &net.peer_if, "netns", &net.name],
            &["addr", "add", &host_ip, "dev", &net.host_if],
            &["link", "set", &net.host_if, "up"],
            &[
                "netns",
                "exec",
                &net.name,
                "ip",
                "addr",
                "add",
                &peer_cidr,
                "dev",
                &net.peer_if,
            ],
            &[
                "netns",
                "exec",
                &net.name,
                "ip",
                "link",
                "set",
                &net.peer_if,
                "up",
            ],
        ];
        for args in steps {
            match Command::new("ip").args(args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    eprintln!(
                        "SKIP: ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("SKIP: cannot run ip (iproute2): {e}");
                    return None;
                }
            }
        }
        Some(net)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Sets the DR side's interface up or down.
    pub fn link(&self, up: bool) {
        let st = self
            .command("ip")
            .args(["link", "set", &self.peer_if, if up { "up" } else { "down" }])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip link set {} failed", self.peer_if);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `drmirror status --state STATE EXTRA...`.
pub fn status(state: &Path, extra: &[&str]) -> CmdOut {
    let mut args: Vec<OsString> = vec!["status".into(), "--state".into(), state.into()];
    args.extend(extra.iter().map(OsString::from));
    drmirror(&args, secs(20))
}

pub fn status_json(state: &Path) -> serde_json::Value {
    let o = status(state, &["--json", "--max-lag", "1000000"]);
    // 0-2: the daemon answered (OK, WARNING, CRITICAL); 3: it did not.
    assert!(
        matches!(o.code, Some(0..=2)),
        "status --json failed\n{}",
        o.describe()
    );
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e})\n{}", o.describe()))
}

/// Waits until what the daemon applied is committed to its journal (the
/// index moved with a rename, say): its backlog reads 0 in two reports
/// at least a second apart (reports come at most once a second, so the
/// second one was made after this was called). A target equal to the
/// source says only that the apply happened; the commit follows it.
pub fn wait_committed(state: &Path) {
    let backlog = || status_json(state)["targets"][0]["backlog_entries"].as_u64();
    let deadline = Instant::now() + secs(60);
    loop {
        if backlog() == Some(0) {
            thread::sleep(ms(1100));
            if backlog() == Some(0) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the backlog did not drain");
        thread::sleep(ms(100));
    }
}

/// Sets its flag when dropped, however the scope it guards ends (a failed
/// assertion included): a thread waiting on the flag then stops.
pub struct StopOnDrop<'a>(pub &'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Writes `path` without pause until `stop`: 4 KiB blocks in place, and one
/// in 64 appended (the file grows without end). Returns the writes made.
pub fn rewrite_without_pause(path: &Path, stop: &std::sync::atomic::AtomicBool) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the file to rewrite");
    let block = [b'x'; 4096];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let at = if n % 64 == 0 {
            len
        } else {
            (n * 4096) % len.max(1)
        };
        f.write_all_at(&block, at).expect("write");
        n += 1;
    }
    n
}

/// One entry of a tree as [`tree_state`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryState {
    pub mode: u32,
    pub ino: u64,
    pub ctime_ns: i64,
    pub mtime_ns: i64,
    pub size: u64,
    /// A regular file's content.
    pub content: Vec<u8>,
}

/// Every entry below `root` (its path relative to `root` → its state): a
/// tree compared before and after shows whatever was written, replaced or
/// removed there.
pub fn tree_state(root: &Path) -> std::collections::BTreeMap<String, EntryState> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let p = e.expect("entry").path();
            let md = fs::symlink_metadata(&p).expect("lstat");
            let rel = p.strip_prefix(root).expect("below").display().to_string();
            let state = EntryState {
                mode: md.mode(),
                ino: md.ino(),
                ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
                mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                size: md.size(),
                content: if md.is_file() { read(&p) } else { Vec::new() },
            };
            out.insert(rel, state);
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}
