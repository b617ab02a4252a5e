//! The churn model test: a seeded generator of filesystem operations run
//! against a live daemon in bursts, with kill -9 at random points, ending
//! with `verify --checksum` equal.
//!
//! The generator is single-threaded and reads the tree it churns to pick its
//! operands (a random descent from the root), so a seed replays the same
//! operations; what varies between runs is only where the daemon is when
//! they land. Operations that fail (a name gone, a rename into its own
//! subtree, `RENAME_NOREPLACE` onto an existing name) are part of the mix
//! and counted, not errors.
//!
//! Short form (default suite): a few thousand operations and a few kills per
//! capture backend and for a `tcp://` target. Long form:
//! `tools/churn` (`DRMIRROR_CHURN_OPS`, `DRMIRROR_CHURN_KILLS`,
//! `DRMIRROR_CHURN_SEED`, `DRMIRROR_CHURN_LINKS`).

use crate::util::*;
use rustix::fs::{renameat_with, RenameFlags, CWD};
use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// Above this many entries the mix leans towards removals.
const MAX_ENTRIES: usize = 1500;
/// How many operations the failure report shows.
const OP_LOG: usize = 400;

/// The kinds of operation, with their weights in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Create,
    Write,
    Resize,
    Rename,
    Exchange,
    NoReplace,
    Link,
    Unlink,
    Symlink,
    Mkdir,
    Rmdir,
    Chmod,
    Touch,
    MoveIn,
    MoveOut,
}

const MIX: &[(Op, u64)] = &[
    (Op::Create, 14),
    (Op::Write, 12),
    (Op::Resize, 5),
    (Op::Rename, 12),
    (Op::Exchange, 8),
    (Op::NoReplace, 4),
    (Op::Link, 4),
    (Op::Unlink, 8),
    (Op::Symlink, 5),
    (Op::Mkdir, 7),
    (Op::Rmdir, 4),
    (Op::Chmod, 5),
    (Op::Touch, 3),
    (Op::MoveIn, 3),
    (Op::MoveOut, 2),
];

/// The generator: churns `root` (inside the source); `outside` is a
/// directory of the same filesystem outside the source, where trees are
/// prepared before they are moved in and put when they are moved out.
struct Churn {
    root: PathBuf,
    outside: PathBuf,
    rng: XorShift,
    seq: u64,
    /// Hard links in the mix (`DRMIRROR_CHURN_LINKS=1`). Off by default:
    /// a write or chmod through one name of a link group reaches the other
    /// names on the target only once link groups are tracked (the fidelity
    /// issue); with links on, this test shows that divergence.
    links: bool,
    done: u64,
    failed: u64,
    entries: usize,
    log: VecDeque<String>,
    /// Every operation and kill, in order, each with the time (UTC) it was
    /// done (`ops.log` in the test's directory, kept with it when a run
    /// fails).
    trace: std::io::BufWriter<fs::File>,
}

impl Churn {
    fn new(root: PathBuf, outside: PathBuf, seed: u64, links: bool, trace: &Path) -> Churn {
        mkdirp(&root);
        mkdirp(&outside);
        let trace = std::io::BufWriter::new(fs::File::create(trace).expect("create the op log"));
        Churn {
            trace,
            root,
            outside,
            rng: XorShift::new(seed),
            seq: 0,
            links,
            done: 0,
            failed: 0,
            entries: 0,
            log: VecDeque::new(),
        }
    }

    /// Runs `n` operations back to back.
    fn burst(&mut self, n: u64) {
        for _ in 0..n {
            if self.done % 250 == 0 {
                self.entries = walk(&self.root).len();
            }
            let op = self.pick_op();
            let what = self.apply(op);
            self.done += 1;
            if what.starts_with('!') {
                self.failed += 1;
            }
            if self.log.len() == OP_LOG {
                self.log.pop_front();
            }
            let line = format!("{} {op:?} {what}", self.done);
            let _ = writeln!(self.trace, "{} {line}", stamp());
            self.log.push_back(line);
        }
    }

    /// Marks an event of the run (a kill, a restart) in the op log.
    fn mark(&mut self, what: &str) {
        let _ = writeln!(self.trace, "{} --- {what} after op {}", stamp(), self.done);
        let _ = self.trace.flush();
    }

    fn pick_op(&mut self) -> Op {
        if self.entries > MAX_ENTRIES && self.rng.below(2) == 0 {
            return [Op::Unlink, Op::Rmdir, Op::MoveOut][self.rng.below(3) as usize];
        }
        let total: u64 = MIX.iter().map(|(_, w)| w).sum();
        let mut r = self.rng.below(total);
        for &(op, w) in MIX {
            if r < w {
                return if op == Op::Link && !self.links {
                    Op::Create
                } else {
                    op
                };
            }
            r -= w;
        }
        Op::Create
    }

    /// A fresh name; one in 8 is an odd one (a space, a newline, non-ASCII,
    /// a leading dash, a temp-file look).
    fn name(&mut self) -> String {
        self.seq += 1;
        match self.rng.below(16) {
            0 => format!("odd name {}\n\u{e9}", self.seq),
            1 => format!("-{}.tmp~", self.seq),
            _ => format!("n{}", self.seq),
        }
    }

    /// A random existing entry below the root (not the root), reached by a
    /// random descent; None in an empty tree.
    fn entry(&mut self) -> Option<PathBuf> {
        let mut at = self.root.clone();
        let mut picked = None;
        for _ in 0..(1 + self.rng.below(5)) {
            let Ok(rd) = fs::read_dir(&at) else { break };
            let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            if names.is_empty() {
                break;
            }
            names.sort();
            let p = names.swap_remove(self.rng.below(names.len() as u64) as usize);
            let is_dir = fs::symlink_metadata(&p)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            picked = Some(p.clone());
            if !is_dir {
                break;
            }
            at = p;
        }
        picked
    }

    /// A random directory: the root or an existing directory below it.
    fn dir(&mut self) -> PathBuf {
        match self.entry() {
            Some(p) if lmeta_opt(&p).is_some_and(|m| m.is_dir()) => p,
            Some(p) => p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or(self.root.clone()),
            None => self.root.clone(),
        }
    }

    /// A random regular file, if the descent ends on one.
    fn file(&mut self) -> Option<PathBuf> {
        let p = self.entry()?;
        lmeta_opt(&p).filter(|m| m.is_file()).map(|_| p)
    }

    /// Applies `op`; returns what it did, starting with `!` if it failed.
    fn apply(&mut self, op: Op) -> String {
        let r = match op {
            Op::Create => self.create(),
            Op::Write => self.write(),
            Op::Resize => self.resize(),
            Op::Rename => self.rename(RenameFlags::empty()),
            Op::Exchange => self.rename(RenameFlags::EXCHANGE),
            Op::NoReplace => self.rename(RenameFlags::NOREPLACE),
            Op::Link => self.link(),
            Op::Unlink => self.unlink(),
            Op::Symlink => self.symlink(),
            Op::Mkdir => self.mkdir(),
            Op::Rmdir => self.rmdir(),
            Op::Chmod => self.chmod(),
            Op::Touch => self.touch(),
            Op::MoveIn => self.move_in(),
            Op::MoveOut => self.move_out(),
        };
        r.unwrap_or_else(|e| format!("!{e}"))
    }

    fn create(&mut self) -> Result<String, String> {
        let p = self.dir().join(self.name());
        let len = self.size();
        fs::write(&p, pattern(len, self.rng.next_u64())).map_err(|e| show(&p, e))?;
        Ok(format!("{} ({len} B)", p.display()))
    }

    /// Mostly small files, some of a few hundred KiB.
    fn size(&mut self) -> usize {
        match self.rng.below(10) {
            0 => 0,
            1 => self.rng.range(65_536, 400_000) as usize,
            _ => self.rng.below(8192) as usize,
        }
    }

    /// A random regular file opened for writing, and its length.
    fn open_file(&mut self) -> Result<(PathBuf, fs::File, u64), String> {
        let p = self.file().ok_or("no file")?;
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| show(&p, e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok((p, f, len))
    }

    fn write(&mut self) -> Result<String, String> {
        let (p, f, len) = self.open_file()?;
        let at = self.rng.below(len + 1);
        let data = pattern(self.rng.range(1, 4096) as usize, self.rng.next_u64());
        f.write_all_at(&data, at).map_err(|e| show(&p, e))?;
        Ok(format!("{} @{at}+{}", p.display(), data.len()))
    }

    fn resize(&mut self) -> Result<String, String> {
        let (p, f, len) = self.open_file()?;
        let to = self.rng.below(2 * len + 4096);
        f.set_len(to).map_err(|e| show(&p, e))?;
        Ok(format!("{} {len} -> {to}", p.display()))
    }

    /// rename(2), RENAME_EXCHANGE or RENAME_NOREPLACE of a random entry to
    /// another random entry (exchange, or replace) or a new name.
    fn rename(&mut self, flags: RenameFlags) -> Result<String, String> {
        let from = self.entry().ok_or("empty tree")?;
        let to = if flags == RenameFlags::EXCHANGE || self.rng.below(3) == 0 {
            self.entry().ok_or("empty tree")?
        } else {
            self.dir().join(self.name())
        };
        renameat_with(CWD, &from, CWD, &to, flags)
            .map_err(|e| format!("{} -> {}: {e}", from.display(), to.display()))?;
        Ok(format!("{} -> {}", from.display(), to.display()))
    }

    fn link(&mut self) -> Result<String, String> {
        let p = self.file().ok_or("no file")?;
        let to = self.dir().join(self.name());
        fs::hard_link(&p, &to).map_err(|e| show(&to, e))?;
        Ok(format!("{} -> {}", p.display(), to.display()))
    }

    fn unlink(&mut self) -> Result<String, String> {
        let p = self.entry().ok_or("empty tree")?;
        if lmeta_opt(&p).is_some_and(|m| m.is_dir()) {
            return Err(format!("{} is a directory", p.display()));
        }
        fs::remove_file(&p).map_err(|e| show(&p, e))?;
        Ok(p.display().to_string())
    }

    fn symlink(&mut self) -> Result<String, String> {
        let p = self.dir().join(self.name());
        let text = match self.rng.below(4) {
            0 => format!("/nonexistent/{}", self.seq),
            1 => "..".to_string(),
            _ => format!("n{}", self.rng.below(self.seq + 1)),
        };
        std::os::unix::fs::symlink(&text, &p).map_err(|e| show(&p, e))?;
        Ok(format!("{} -> {text}", p.display()))
    }

    fn mkdir(&mut self) -> Result<String, String> {
        let p = self.dir().join(self.name());
        fs::create_dir(&p).map_err(|e| show(&p, e))?;
        Ok(p.display().to_string())
    }

    /// rmdir(2) of an empty directory, or `rm -r` of a whole subtree.
    fn rmdir(&mut self) -> Result<String, String> {
        let p = self.dir();
        if p == self.root {
            return Err("picked the root".into());
        }
        let r = if self.rng.below(2) == 0 {
            fs::remove_dir(&p)
        } else {
            fs::remove_dir_all(&p)
        };
        r.map_err(|e| show(&p, e))?;
        Ok(p.display().to_string())
    }

    fn chmod(&mut self) -> Result<String, String> {
        let p = self.entry().ok_or("empty tree")?;
        let m = lmeta_opt(&p).ok_or("gone")?;
        if m.file_type().is_symlink() {
            return Err("a symlink".into());
        }
        // Directories keep owner rwx: the generator must be able to go on.
        let modes: &[u32] = if m.is_dir() {
            &[0o700, 0o755, 0o711, 0o1777]
        } else {
            &[0o600, 0o644, 0o640, 0o755, 0o4755, 0o000]
        };
        let mode = modes[self.rng.below(modes.len() as u64) as usize];
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(|e| show(&p, e))?;
        Ok(format!("{} {mode:o}", p.display()))
    }

    /// An mtime put into the past (as `touch -d` or a restore would).
    fn touch(&mut self) -> Result<String, String> {
        let p = self.entry().ok_or("empty tree")?;
        let sec = 1_500_000_000 + self.rng.below(100_000_000) as i64;
        let nsec = self.rng.below(1_000_000_000) as i64;
        set_mtime(&p, sec, nsec);
        Ok(format!("{} {sec}.{nsec:09}", p.display()))
    }

    /// Moves a tree in from outside the source: one moved out earlier, or
    /// a new one prepared there (files written before the move).
    fn move_in(&mut self) -> Result<String, String> {
        let parked: Vec<PathBuf> = fs::read_dir(&self.outside)
            .map_err(|e| show(&self.outside, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let from = if !parked.is_empty() && self.rng.below(2) == 0 {
            parked[self.rng.below(parked.len() as u64) as usize].clone()
        } else {
            let name = self.name();
            let t = self.outside.join(name);
            for k in 0..self.rng.range(1, 6) {
                let len = self.size();
                write(
                    &t.join(format!("in{k}")),
                    &pattern(len, self.rng.next_u64()),
                );
            }
            mkdirp(&t.join("sub"));
            write(&t.join("sub/deep"), b"deep");
            t
        };
        let to = self.dir().join(self.name());
        fs::rename(&from, &to).map_err(|e| show(&to, e))?;
        Ok(format!("{} -> {}", from.display(), to.display()))
    }

    /// Moves an entry out of the source (to be moved back in later, or
    /// removed when too many are parked).
    fn move_out(&mut self) -> Result<String, String> {
        let p = self.entry().ok_or("empty tree")?;
        let name = self.name();
        let to = self.outside.join(name);
        fs::rename(&p, &to).map_err(|e| show(&p, e))?;
        if walk(&self.outside).len() > 200 {
            let _ = fs::remove_dir_all(&self.outside);
            mkdirp(&self.outside);
        }
        Ok(format!("{} -> {}", p.display(), to.display()))
    }

    /// The last operations, for a failure report.
    fn recent(&self) -> String {
        self.log.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// The logs of every daemon a test started in `root`, concatenated.
fn daemon_logs(root: &Path) -> String {
    let mut names: Vec<PathBuf> = fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("daemon-"))
    });
    names.sort();
    names
        .iter()
        .map(|p| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned())
        .collect()
}

/// The wall-clock time, as the daemons' logs print it (UTC), to line
/// `ops.log` up with them.
fn stamp() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let day = t.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        t.subsec_micros()
    )
}

fn lmeta_opt(p: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(p).ok()
}

fn show(p: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", p.display())
}

/// A number from the environment, decimal or `0x` hex (as the summary
/// line prints seeds); a value that is neither is refused.
fn env_u64(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    };
    parsed.unwrap_or_else(|| panic!("{name}={v}: not a number"))
}

/// Where the daemon sends its copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dest {
    Local,
    Tcp,
}

struct Run {
    env: Env,
    tcp: Option<Tcp>,
    receiver: Option<Daemon>,
}

impl Run {
    fn new(b: Backend, dest: Dest) -> Run {
        let env = Env::with(b);
        let tcp = (dest == Dest::Tcp).then(|| Tcp::new(&env));
        let receiver = tcp.as_ref().map(|t| t.receiver(&env, &[]));
        Run { env, tcp, receiver }
    }

    fn start(&self) -> Daemon {
        match &self.tcp {
            None => self.env.start(&["--scrub-interval", "1s"]),
            Some(t) => {
                let watch = self.env.backend.map_or("auto", Backend::name);
                let d = self.env.spawn_config(&format!(
                    "source = {}\nstate_dir = {}\nwatch = \"{watch}\"\nscrub_interval = \"1s\"\n{}",
                    toml_str(&self.env.src),
                    toml_str(&self.env.state),
                    t.target_toml(&self.env)
                ));
                d.wait_log("drmirror ready", secs(60));
                d
            }
        }
    }
}

/// Churns the source of a live daemon: `ops` operations in bursts of up to
/// 300, with `kills` kill -9s at random points (a few operations more while
/// it is down, then a restart); after every fourth restart, and at the end,
/// a quiet wait until `verify --checksum` is equal.
fn churn(b: Backend, dest: Dest, default_ops: u64, default_kills: u64) {
    let ops = env_u64("DRMIRROR_CHURN_OPS", default_ops);
    let kills = env_u64("DRMIRROR_CHURN_KILLS", default_kills);
    let seed = env_u64("DRMIRROR_CHURN_SEED", (0xc4 << 32) | (ops ^ kills));
    let links = env_u64("DRMIRROR_CHURN_LINKS", 0) == 1;
    let mut run = Run::new(b, dest);
    let mut c = Churn::new(
        run.env.s("churn"),
        run.env.root.join("outside"),
        seed,
        links,
        &run.env.root.join("ops.log"),
    );
    c.burst(200);
    let mut d = run.start();
    let started = Instant::now();
    let mut rng = XorShift::new(seed ^ 0x9e37_79b9);
    let mut kill_at: Vec<u64> = (0..kills).map(|_| rng.below(ops)).collect();
    kill_at.sort_unstable();
    let mut next_kill = kill_at.iter().copied().peekable();
    let (mut restarts, mut checks) = (0u64, 0u64);
    while c.done < ops {
        let until_kill = next_kill
            .peek()
            .map_or(u64::MAX, |&k| k.saturating_sub(c.done));
        c.burst(rng.range(1, 300).min(ops - c.done).min(until_kill.max(1)));
        if next_kill.peek().is_some_and(|&k| c.done >= k) {
            next_kill.next();
            d.kill9();
            c.mark("kill -9");
            c.burst(rng.below(40));
            d = run.start();
            restarts += 1;
            c.mark(&format!("restart {restarts}"));
            run = no_false_alarms(run, &d, &mut c);
            if restarts % 4 == 0 {
                run = converged(run, &d, &c);
                checks += 1;
            }
        } else if rng.below(4) == 0 {
            thread::sleep(Duration::from_millis(rng.below(30)));
        }
    }
    let run = converged(run, &d, &c);
    eprintln!(
        "churn ({} {}): seed {seed:#x}, {} operations ({} failed as intended), {restarts} kill -9s, {} quiet checks, {} entries at the end, {:.1} s, 0 divergences",
        b.name(),
        if dest == Dest::Tcp { "tcp://" } else { "local" },
        c.done,
        c.failed,
        checks + 1,
        walk(&c.root).len(),
        started.elapsed().as_secs_f64()
    );
    assert!(c.done >= ops && c.failed < c.done / 2, "{}", c.recent());
    let run = no_false_alarms(run, &d, &mut c);
    eprintln!(
        "churn: the daemons' scrubs made {} passes, 0 divergences",
        daemon_logs(&run.env.root)
            .matches("scrub pass done")
            .count()
    );
    d.terminate();
    if let Some(r) = &run.receiver {
        r.terminate();
    }
}

/// The background scrub (a pass a second in every daemon here) judged no
/// change on its way to be a divergence, and found none. Checked now and
/// then during the run too, so a failure stops near its cause, keeping the
/// run's directory (the daemons' logs and `ops.log`) for a look.
fn no_false_alarms(run: Run, d: &Daemon, c: &mut Churn) -> Run {
    let logs = daemon_logs(&run.env.root);
    let false_alarms: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("diverged from the source"))
        .collect();
    if false_alarms.is_empty() {
        return run;
    }
    c.mark("the scrub reported divergences");
    let root = keep(run, d);
    panic!(
        "the scrub reported divergences (kept: {}):\n{false_alarms:#?}",
        root.display()
    );
}

/// Ends a failed run keeping its directory (the daemons' logs and
/// `ops.log`), which it returns. Stopped hard: a stop that fails (a SIGTERM
/// before the handler is installed) must not unwind before the directory is
/// kept.
fn keep(run: Run, d: &Daemon) -> std::path::PathBuf {
    d.force_kill();
    if let Some(r) = &run.receiver {
        r.force_kill();
    }
    let root = run.env.root.clone();
    // Not dropped: dropping would remove the directory.
    std::mem::forget(run);
    root
}

/// Waits until the mirror is equal with checksums; on failure, the panic
/// shows the last operations, and the run's directory is kept.
fn converged(run: Run, d: &Daemon, c: &Churn) -> Run {
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run.env.converge_for(&["--checksum"], d, secs(120));
    }));
    let Err(e) = out else {
        return run;
    };
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "converge failed".into());
    let root = keep(run, d);
    panic!(
        "{msg}\n(kept: {})\nthe last {OP_LOG} operations (after op {}):\n{}",
        root.display(),
        c.done,
        c.recent()
    );
}

#[test]
fn churn_with_kills_fanotify() {
    with_backend(Backend::Fanotify, |b| churn(b, Dest::Local, 12_000, 6));
}

#[test]
fn churn_with_kills_inotify() {
    with_backend(Backend::Inotify, |b| churn(b, Dest::Local, 12_000, 6));
}

/// The same churn against a `tcp://` target (the receiver stays up while
/// the daemon is killed).
#[test]
fn churn_with_kills_to_a_remote_target() {
    churn(Backend::Auto, Dest::Tcp, 8_000, 4);
}
