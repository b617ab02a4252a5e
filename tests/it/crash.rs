//! kill -9 under load: after every crash the restarted daemon converges.

use crate::util::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

const PATHS: u64 = 200;
const DIRS: u64 = 10;

/// A thread that keeps creating, modifying, renaming and deleting files in
/// a fixed set of ~200 paths. `pause()` returns only once no operation is in
/// flight.
struct Writer {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    lock: Arc<Mutex<()>>,
    ops: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts paused.
    fn start(root: PathBuf, seed: u64) -> Writer {
        for k in 0..DIRS {
            mkdirp(&root.join(format!("w{k}")));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(true));
        let lock = Arc::new(Mutex::new(()));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, p, l, o) = (stop.clone(), pause.clone(), lock.clone(), ops.clone());
        let handle = thread::spawn(move || {
            let mut rng = XorShift::new(seed);
            while !s.load(Ordering::SeqCst) {
                let paused = {
                    let _g = l.lock().unwrap_or_else(|e| e.into_inner());
                    if p.load(Ordering::SeqCst) {
                        true
                    } else {
                        one_op(&root, &mut rng);
                        o.fetch_add(1, Ordering::SeqCst);
                        false
                    }
                };
                if paused {
                    thread::sleep(ms(5));
                } else {
                    thread::sleep(std::time::Duration::from_micros(rng.below(3000)));
                }
            }
        });
        Writer {
            stop,
            pause,
            lock,
            ops,
            handle: Some(handle),
        }
    }

    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        // Wait for the operation in flight, if any.
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread panicked");
        }
        self.ops()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn path_of(root: &Path, i: u64) -> PathBuf {
    root.join(format!("w{}", i % DIRS))
        .join(format!("p{:03}", i))
}

/// One random operation; failures (missing files etc.) are expected and
/// ignored.
fn one_op(root: &Path, rng: &mut XorShift) {
    let i = rng.below(PATHS);
    let p = path_of(root, i);
    match rng.below(100) {
        0..=34 => {
            let len = rng.below(16_384) as usize;
            let _ = fs::write(&p, pattern(len, rng.next_u64()));
        }
        35..=49 => {
            if let Ok(mut f) = OpenOptions::new().append(true).open(&p) {
                let _ = f.write_all(&pattern(rng.range(1, 2048) as usize, rng.next_u64()));
            }
        }
        50..=64 => {
            let j = rng.below(PATHS);
            let _ = fs::rename(&p, path_of(root, j));
        }
        65..=79 => {
            let _ = fs::remove_file(&p);
        }
        80..=87 => {
            let modes = [0o600, 0o644, 0o640, 0o755];
            let m = modes[rng.below(modes.len() as u64) as usize];
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(m));
        }
        88..=93 => {
            let dir = root.join(format!("w{}", i % DIRS)).join("sub");
            if dir.exists() {
                let _ = fs::remove_dir_all(&dir);
            } else if fs::create_dir(&dir).is_ok() {
                for k in 0..3u64 {
                    let _ = fs::write(
                        dir.join(format!("s{k}")),
                        pattern((100 * k) as usize, rng.next_u64()),
                    );
                }
            }
        }
        94..=96 => {
            let from = root.join(format!("w{}", i % DIRS)).join("sub");
            let to = root.join(format!("w{}", rng.below(DIRS))).join("sub");
            let _ = fs::rename(&from, &to);
        }
        _ => {
            let _ = fs::remove_file(&p);
            let _ = std::os::unix::fs::symlink(format!("p{:03}", rng.below(PATHS)), &p);
        }
    }
}

/// Cycles of: start → load → kill -9 at a random moment (during an initial
/// sync or a restart's startup scan over a 20,000-file tree, or while live
/// changes are being captured and applied) → load while down → restart →
/// quiet → converge with checksums. 10 cycles in the default suite (and 6
/// with inotify); the long run is
/// `DRMIRROR_CRASH_CYCLES=50 cargo test --release --test it crash_kill9`.
#[test]
fn crash_kill9_under_write_load_converges_every_cycle() {
    crash_cycles("auto (fanotify)", Env::new(), false, 10);
}

/// The same with inotify, whose restarts restore the watch tree (watches
/// that start shallow and are completed while capture runs).
#[test]
fn crash_kill9_with_inotify_converges_every_cycle() {
    crash_cycles("inotify", Env::with(Backend::Inotify), false, 6);
}

/// The same with a `tcp://` target: the receiver stays up (same boot of
/// the DR machine) while the daemon is killed, and copies of an initial
/// sync are recorded before the receiver flushes them.
#[test]
fn crash_kill9_with_a_remote_target_converges_every_cycle() {
    crash_cycles("auto (fanotify), tcp:// target", Env::new(), true, 6);
}

/// Starts the daemon on `env`, with a local target or `tcp`'s receiver;
/// waits for `drmirror ready` if `ready`.
fn launch(env: &Env, tcp: Option<&Tcp>, ready: bool) -> Daemon {
    launch_env(env, tcp, ready, &[])
}

/// [`launch`] with extra environment variables.
fn launch_env(env: &Env, tcp: Option<&Tcp>, ready: bool, vars: &[(&str, &str)]) -> Daemon {
    let mut cmd = std::process::Command::new(bin());
    cmd.envs(vars.iter().copied());
    match tcp {
        None => cmd.args(env.run_args(&[])),
        Some(t) => cmd
            .arg("run")
            .arg("--config")
            .arg(env.write_config(&format!(
                "source = {}\nstate_dir = {}\n{}",
                toml_str(&env.src),
                toml_str(&env.state),
                t.target_toml(env)
            ))),
    };
    let d = Daemon::spawn_command(cmd, &env.root);
    if ready {
        d.wait_log("drmirror ready", secs(60));
    }
    d
}

fn crash_cycles(watch: &str, env: Env, remote: bool, default_cycles: usize) {
    let cycles: usize = std::env::var("DRMIRROR_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cycles);
    gen_tree(&env.s("static"), 20_000, 500);
    let root = env.s("load");
    let writer = Writer::start(root.clone(), 0x5eed_1234);
    // Some initial content.
    writer.resume();
    thread::sleep(ms(300));
    writer.pause();

    let mut rng = XorShift::new(42);
    let tcp = remote.then(|| Tcp::new(&env));
    let mut recv = tcp.as_ref().map(|t| t.receiver(&env, &[]));
    let mut d = launch(&env, tcp.as_ref(), true);
    env.converge_for(&["--checksum"], &d, secs(180));
    let (mut in_initial, mut in_scan, mut live) = (0, 0, 0);
    // After some crashes the daemon is restarted and killed again soon
    // after `drmirror ready`: every third, while its startup scan is still
    // reconciling; every fifth, on an empty target and journal, while its
    // initial sync runs. Every other restart must converge.
    let (mut fresh, mut new_mirror) = (false, false);
    for cycle in 0..cycles {
        let before = writer.ops();
        writer.resume();
        thread::sleep(ms(if fresh {
            rng.below(20)
        } else {
            rng.below(1500)
        }));
        let log = d.log();
        let phase = if new_mirror && !log.contains("initial sync complete") {
            in_initial += 1;
            "initial sync"
        } else if log.contains("startup scan done") {
            live += 1;
            "live"
        } else {
            in_scan += 1;
            "startup scan"
        };
        d.kill9();
        thread::sleep(ms(rng.below(300)));
        writer.pause();
        let during = writer.ops() - before;
        eprintln!(
            "crash cycle {cycle}: killed during {phase} after {during} operations, restarting"
        );
        let last = cycle + 1 == cycles;
        new_mirror = false;
        if cycle % 5 == 3 && !last {
            // A new mirror: its initial sync, under the load, is killed next.
            fs::remove_dir_all(&env.dst).expect("rm -r dst");
            fs::remove_dir_all(&env.state).expect("rm -r state");
            mkdirp(&env.dst);
            mkdirp(&env.state);
            if let (Some(t), Some(r)) = (&tcp, recv.take()) {
                // Its root was the directory just removed.
                r.terminate();
                recv = Some(t.receiver(&env, &[]));
            }
            d = launch(&env, tcp.as_ref(), true);
            (fresh, new_mirror) = (true, true);
        } else if cycle % 3 == 1 && !last {
            d = launch(&env, tcp.as_ref(), false);
            let deadline = std::time::Instant::now() + secs(30);
            while !d.log().contains("drmirror ready") {
                assert!(std::time::Instant::now() < deadline, "{}", d.log_tail());
                thread::sleep(ms(1));
            }
            fresh = true;
        } else {
            d = launch(&env, tcp.as_ref(), true);
            env.converge_for(&["--checksum"], &d, secs(120));
            fresh = false;
        }
    }
    let ops = writer.stop();
    eprintln!(
        "crash cycles, watch {watch}: {cycles} ({in_initial} during an initial sync, {in_scan} during a startup scan, {live} live), {ops} operations, 0 divergences"
    );
    assert!(ops > 100, "the writer made only {ops} operations");
    d.terminate();
    if let Some(r) = recv {
        r.terminate();
    }
}

/// kill -9 right after a burst of creations and renames, while the backlog is
/// (likely) still pending.
#[test]
fn crash_with_pending_backlog() {
    let env = Env::new();
    write(&env.s("seed"), b"seed");
    let d = env.start(&[]);
    env.converge(&[], &d);
    gen_tree(&env.s("burst"), 3000, 300);
    rename(&env.s("burst/d0002"), &env.s("moved_d0002"));
    remove_dir_all(&env.s("burst/d0003"));
    write(&env.s("seed"), b"seed changed");
    d.kill9();
    let d2 = env.start(&[]);
    env.converge_for(&["--checksum"], &d2, secs(120));
    assert_eq!(count_files(&env.d("burst"), &is_gen_name), 2400);
    assert_eq!(count_files(&env.d("moved_d0002"), &is_gen_name), 300);
    d2.terminate();
}

#[test]
fn after_a_crash_the_directories_changed_meanwhile_are_compared_first() {
    let env = Env::new();
    // 300 directories: the directory list is read and checked in chunks.
    let files = gen_tree(&env.s("t"), 3000, 10);
    mkdirp(&env.s("empty"));
    let made = std::time::Instant::now();
    let d = env.start(&[]);
    env.converge(&[], &d);
    // Let the startup scan finish (it records the directory list) and the
    // copies be confirmed (they record the index), then crash and change
    // things while nothing captures them.
    d.wait_log("initial sync complete", secs(60));
    // A directory changed within about two seconds before capture was
    // last known whole is compared first too (a change there may have been
    // lost with the kernel's queue: see `Compare::changed_dirs_first`).
    // Here only the three changed while down must be: the tree is let age
    // past that window, and capture stay quiet after it, before the crash.
    thread::sleep(secs(3).saturating_sub(made.elapsed()));
    wait_committed(&env.state);
    d.kill9();
    write(&env.s("t/d0005/while-down"), b"new");
    std::fs::remove_file(&files[2703]).expect("rm t/d0270/f0002703");
    write(&env.s("empty/appeared"), b"x");
    let d = env.start(&[]);
    let line = d.wait_log("changed directories compared first", secs(60));
    // Three directories changed, nothing else did: in each, one entry came
    // or went, and the directory's own times differ.
    assert_eq!(field(&line, "dirs"), 3, "{line}");
    assert_eq!(field(&line, "differing"), 6, "{line}");
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// `chattr` on `path`; false (with the reason printed) where the
/// filesystem or the tool does not allow it.
fn chattr(flag: &str, path: &std::path::Path) -> bool {
    match std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
    {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "SKIP: chattr {flag}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("SKIP: chattr: {e}");
            false
        }
    }
}

#[test]
fn a_restart_after_a_complete_scan_finds_deletions_in_the_index_and_drops_stale_temps() {
    let env = Env::new();
    write(&env.s("a/f"), b"f");
    write(&env.s("b/g"), b"g");
    let d = env.start(&[]);
    env.converge(&[], &d);
    d.wait_log("initial sync complete", secs(60));
    // A copy into target directory `a` fails (immutable), so it is still
    // pending when the daemon dies; a temp file of a copy cut short is
    // left there (as a kill -9 between link and rename would).
    if !chattr("+i", &env.d("a")) {
        d.terminate();
        return;
    }
    write(&env.s("a/new"), b"new");
    d.wait_log("will retry", secs(30));
    d.kill9();
    assert!(chattr("-i", &env.d("a")));
    write(&env.d("a/.drmirror-999999-0.tmp"), b"left by a crash");
    std::fs::remove_file(env.s("b/g")).expect("rm");

    let d = env.start(&[]);
    let line = d.wait_log("startup scan done", secs(60));
    assert!(line.contains("deletions=index"), "{line}");
    // verify lists the target: a temp file left behind would be "extra".
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// A crash after the target lost a directory's entries at a path (renamed
/// or removed there) and before the journal recorded it: the index still
/// held them at that path. Moved back there while the daemon was down, the
/// very same entries (same inode, times and size: a rename leaves the
/// entries of a directory alone) were found "in sync" by the startup scan
/// and stayed missing on the target. A doubt written before the target is
/// touched makes the restart compare them with the target itself.
#[test]
fn a_crash_before_a_removal_is_recorded_leaves_no_stale_index() {
    let abort_before_commit = drmirror::failpoints::Hook::AbortBeforeCommit.var();
    for (away, remote) in [
        ("renamed", false),
        ("moved-out", false),
        ("renamed", true),
        ("moved-out", true),
    ] {
        let env = Env::new();
        let tcp = remote.then(|| Tcp::new(&env));
        let receiver = tcp.as_ref().map(|t| t.receiver(&env, &[]));
        for k in 0..5 {
            write(&env.s(format!("d/f{k}")), format!("file {k}").as_bytes());
        }
        write(&env.s("d/sub/g"), b"deep");
        let d = launch(&env, tcp.as_ref(), true);
        env.converge(&[], &d);
        d.terminate();

        let d = launch_env(&env, tcp.as_ref(), true, &[(abort_before_commit, "1")]);
        d.wait_log("startup scan done", secs(60));
        let parked = match away {
            "renamed" => env.s("e"),
            _ => env.root.join("parked"),
        };
        fs::rename(env.s("d"), &parked).expect("move d away");
        let st = d.wait_exit(secs(60));
        let case = format!("{away} (remote: {remote})");
        assert!(!st.success(), "{case}: the hook aborts the daemon: {st:?}");
        // The target lost `d`, the journal did not record it.
        assert!(!env.d("d").exists(), "{case}: d is still on the target");
        fs::rename(&parked, env.s("d")).expect("move d back");

        let d = launch(&env, tcp.as_ref(), true);
        d.wait_log(
            "what the journal says the target holds there is forgotten",
            secs(60),
        );
        env.converge(&[], &d);
        d.terminate();
        if let Some(r) = receiver {
            r.terminate();
        }
    }
}

/// The initial sync records its copies before flushing the target, under a
/// durable note of the boot (see `drmirror::durability`). After a machine
/// restart, simulated by another boot id, those records are not trusted: a
/// copy the crash lost (a target file cut to nothing, its mtime put back)
/// is found and copied again. In the same boot (only the daemon died) the
/// records stand and the damaged copy stays: the control showing that the
/// note, not the rescan itself, is what repairs it.
#[test]
fn copies_recorded_unflushed_are_compared_again_after_a_machine_restart() {
    let test_boot_id = drmirror::failpoints::Hook::BootId.var();
    let env = Env::new();
    let files = gen_tree(&env.s("t"), 400, 50);
    let d = env.start_env(&[], &[(test_boot_id, "boot-a")]);
    d.wait_initial_sync(secs(60));
    let flushed = d.wait_log("target flushed", secs(60));
    eprintln!("{flushed}");
    d.terminate();
    let victim = env.d(files[123].strip_prefix(&env.src).expect("under src"));
    // As a power loss would leave it.
    let lose_copy = || lose_unflushed_copy(&env.state.join("journal"), &victim, b"boot-a");

    lose_copy();
    let d = env.start_env(&[], &[(test_boot_id, "boot-a")]);
    d.wait_log("startup scan done", secs(60));
    d.wait_log("target flushed", secs(60));
    let (same, report) = env.verify(&[]);
    assert!(
        !same && report.contains(&*victim.file_name().expect("name").to_string_lossy()),
        "in the same boot the index vouches for the copy, which stays damaged: {report}"
    );
    d.terminate();

    lose_copy();
    let d = env.start_env(&[], &[(test_boot_id, "boot-b")]);
    d.wait_log("comparing the whole target with the source again", secs(60));
    env.converge(&["--checksum"], &d);
    d.terminate();
    let j = drmirror::journal::Journal::open(&env.state.join("journal")).expect("journal");
    assert_eq!(
        j.unflushed(0).expect("note"),
        None,
        "a clean stop leaves nothing unflushed"
    );
}

/// A directory made while the daemon was down goes out as one bulk entry
/// (`a/m/n`: made on the target, indexed only once re-stamped); it leaves
/// the source (`rm -r`, which capture, held, never records) before its
/// round re-stamps, so it is never indexed, while its parent `a/m` is
/// re-stamped from the source as it is after the removal. Then a crash:
/// the restart's startup scan must still find `a/m/n` extra on the target.
/// It did not (the churn test's `(extra)` divergences): `a/m` looked
/// unchanged against its index entry, so its listing was not compared,
/// and the full walk finds deletions in the index, which lacked `a/m/n`.
/// A directory changed since capture was last known whole is now compared
/// with the target's listing whatever its index entry says.
#[test]
fn a_change_lost_in_a_crash_after_its_directory_was_restamped_is_found() {
    use drmirror::failpoints::Hook;
    let env = Env::new();
    write(&env.s("a/f"), b"f");
    let gate = |name: &str| env.root.join(name);
    let held = |name: &str| env.root.join(format!("{name}.held"));
    let var = |name: &str| gate(name).to_str().expect("a UTF-8 temp dir").to_owned();
    let (restamp, capture) = (var("restamp"), var("capture"));
    let hooks = [
        (Hook::HoldRestamp.var(), restamp.as_str()),
        (Hook::HoldCapture.var(), capture.as_str()),
    ];
    let d = env.start_env(&[], &hooks);
    env.converge(&[], &d);
    d.kill9();
    // `m` new too: the first pass compares `a` and makes `m` as a plain
    // entry; the compare of `m`'s subtree that follows finds `n` missing on
    // the target and makes it one bulk entry.
    write(&env.s("a/m/n/x"), b"x");
    // Only the round that made `a/m/n` holds.
    write(&gate("restamp"), b"a/m/n");
    let d = env.start_env(&[], &hooks);
    wait_until("the round of a/m/n to hold", secs(30), Some(&d), || {
        exists(&held("restamp"))
    });
    write(&gate("capture"), b"");
    wait_until("capture to hold", secs(30), Some(&d), || {
        exists(&held("capture"))
    });
    remove_dir_all(&env.s("a/m/n"));
    remove_file(&gate("restamp"));
    wait_committed(&env.state);
    d.kill9();
    let d = env.start(&[]);
    env.converge(&[], &d);
    d.terminate();
}
