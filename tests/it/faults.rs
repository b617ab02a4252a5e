//! Faults that used to stop replication, or its signals, without a word
//! (issue 29): a thread that dies, a log on a full disk, a full target, a
//! link cut in the middle of a round, the state directory deleted.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::util::*;

/// A small ext4 filesystem in a file, loop-mounted at `at`: a disk that
/// fills up. Unmounted on drop. `None` (printed) without root or mkfs.
struct LoopFs {
    _mount: MountGuard,
    pub dir: PathBuf,
}

impl LoopFs {
    fn new(image: &Path, at: &Path, mib: u64) -> Option<LoopFs> {
        if !is_root() {
            eprintln!("SKIP: a loop mount needs root");
            return None;
        }
        let f = File::create(image).expect("create image");
        f.set_len(mib << 20).expect("size image");
        drop(f);
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-N", "4096"])
            .arg(image)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: mkfs.ext4 failed");
            return None;
        }
        mkdirp(at);
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: cannot loop-mount {}", image.display());
            return None;
        }
        Some(LoopFs {
            _mount: MountGuard::new(at),
            dir: at.to_path_buf(),
        })
    }

    /// Fills the filesystem to the last block with a file `name`.
    fn fill(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", p.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // dd stops at ENOSPC; the last partial blocks go too.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "i=0; while dd if=/dev/zero bs=1k count=1 of={}.$i 2>/dev/null; do i=$((i+1)); done",
                p.display()
            ))
            .status();
        p
    }

    fn unfill(&self, name: &str) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("rm -f {}/{name}*", self.dir.display()))
            .status();
    }
}

/// `env`'s `run` arguments with `target` as the target instead of `env.dst`.
fn run_args_into(env: &Env, target: &Path) -> Vec<OsString> {
    env.run_args(&[])
        .into_iter()
        .map(|a| {
            if a == env.dst.as_os_str() {
                target.as_os_str().to_owned()
            } else {
                a
            }
        })
        .collect()
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(c) = std::fs::read_to_string(e.path().join("comm")) {
                out.push(c.trim().to_string());
            }
        }
    }
    out
}

fn write_files(env: &Env, dir: &str, n: usize, size: usize) {
    for i in 0..n {
        write(&env.s(format!("{dir}/f{i}")), &pattern(size, i as u64));
    }
}

#[test]
fn a_thread_that_dies_takes_the_daemon_down_naming_it() {
    for thread in ["ship-0", "capture", "pulse", "status"] {
        let env = Env::new();
        write(&env.s("a"), b"a");
        let mut cmd = Command::new(bin());
        cmd.args(env.run_args(&[]))
            .env(drmirror::failpoints::Hook::PanicThread.var(), thread);
        let d = Daemon::spawn_command(cmd, &env.root);
        let st = d.wait_exit(secs(60));
        assert!(
            !st.success(),
            "{thread}: the daemon must exit non-zero when a thread dies ({st})\n{}",
            d.log_tail()
        );
        let log = d.log();
        assert!(
            log.contains(&format!("thread {thread} died")),
            "{thread}: the log must name the thread\n{}",
            d.log_tail()
        );
    }
}

#[test]
fn a_log_on_a_full_disk_does_not_stop_replication() {
    let env = Env::new();
    let Some(fs) = LoopFs::new(&env.root.join("log.img"), &env.root.join("logfs"), 8) else {
        return;
    };
    // The daemon logs to a file on the small filesystem, every line (debug).
    let log_path = fs.dir.join("daemon.log");
    let log = File::create(&log_path).expect("log file");
    let mut cmd = Command::new(bin());
    cmd.args(env.run_args(&[]))
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup")))
        .stderr(Stdio::from(log));
    let mut child = cmd.spawn().expect("spawn drmirror");
    let pid = child.id();
    let alive = |child: &mut std::process::Child| {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("drmirror exited ({st}); log: {}", log_path.display());
        }
    };
    wait_until("drmirror ready", secs(60), None, || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("drmirror ready"))
    });
    fs.fill("ballast");
    // Every one of these changes makes debug lines the log cannot take.
    write_files(&env, "while-full", 300, 1000);
    wait_until(
        "the mirror has the changes made while the log was full",
        CONVERGE_TIMEOUT,
        None,
        || {
            alive(&mut child);
            env.verify(&[]).0
        },
    );
    let names = thread_names(pid);
    for t in ["ship-0", "flush-0", "capture", "pulse"] {
        assert!(
            names.iter().any(|n| n == t),
            "thread {t} is gone: {names:?}"
        );
    }
    let full_len = lmeta(&log_path).len();
    fs.unfill("ballast");
    write_files(&env, "after", 50, 1000);
    wait_until(
        "the mirror has the changes made after space returned",
        CONVERGE_TIMEOUT,
        None,
        || {
            alive(&mut child);
            env.verify(&[]).0
        },
    );
    // Lines are logged again once there is room.
    wait_until("the log grows again", secs(30), None, || {
        lmeta(&log_path).len() > full_len
    });
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("pid"),
        rustix::process::Signal::TERM,
    );
    let st = child.wait().expect("wait");
    assert!(st.success(), "clean stop after the log filled: {st}");
}

/// The state directory's filesystem fills up (issue 29, item 8): the
/// journal can take no more writes, and the daemon used to exit with
/// RocksDB's `Writer has previous error`. Now the process waits, saying
/// why, and starts again by itself (same PID) once there is room; the
/// changes made meanwhile arrive.
#[test]
fn a_full_state_directory_is_waited_out_in_place() {
    let env = Env::new();
    let Some(fs) = LoopFs::new(&env.root.join("state.img"), &env.root.join("statefs"), 96) else {
        return;
    };
    let state = fs.dir.join("state");
    let args: Vec<OsString> = env
        .run_args(&[])
        .into_iter()
        .map(|a| {
            if a == env.state.as_os_str() {
                state.clone().into_os_string()
            } else {
                a
            }
        })
        .collect();
    write(&env.s("seed"), b"seed");
    let d = env.spawn_args(&args);
    d.wait_log("initial sync complete", secs(60));
    fs.fill("ballast");
    // Changes until the journal cannot take them (each one is a write).
    let mut i = 0;
    while !d.log().contains("is full; waiting until") {
        assert!(
            d.poll_exit().is_none(),
            "drmirror exited:\n{}",
            d.log_tail()
        );
        assert!(i < 300_000, "the journal never filled:\n{}", d.log_tail());
        for _ in 0..500 {
            write(
                &env.s(format!("while-full/{}-{i:06}", "n".repeat(100))),
                b"x",
            );
            i += 1;
        }
    }
    assert!(
        d.poll_exit().is_none(),
        "it must wait, not exit:\n{}",
        d.log_tail()
    );
    // While it waits, `status` answers why, CRITICAL, the target down with
    // its lag counting on.
    let waiting = || {
        let o = status(&state, &[]);
        (o.code, o.all())
    };
    // `  target NAME: DOWN lag 12.3s backlog ...`
    let lag = |text: &str| {
        let line = text.lines().find(|l| l.starts_with("  target "))?;
        let at = line.find(" lag ")? + 5;
        line[at..].split('s').next()?.parse::<f64>().ok()
    };
    let (code, first) = waiting();
    assert_eq!(code, Some(2), "{first}");
    assert!(
        first.contains("not replicating: waiting for space on the state directory's filesystem")
            && first.contains("DOWN"),
        "{first}"
    );
    wait_until("the lag it shows grows", secs(20), Some(&d), || {
        let (_, now) = waiting();
        lag(&now).is_some() && lag(&now) > lag(&first)
    });
    // What closing the journal gave back is not taken for space returned.
    std::thread::sleep(secs(3));
    assert!(
        !d.log().contains("space returned"),
        "it started again with the ballast still there:\n{}",
        d.log_tail()
    );
    fs.unfill("ballast");
    d.wait_log(
        "space returned on the state directory's filesystem",
        secs(30),
    );
    wait_until(
        "the same process is ready again",
        secs(60),
        Some(&d),
        || d.log().matches("drmirror ready").count() >= 2,
    );
    write(&env.s("after"), b"after space returned");
    wait_converged(&env.src, &env.dst, &[], Some(&d));
    d.terminate();
}

#[test]
fn a_full_target_resumes_by_itself_when_space_returns() {
    let env = Env::new();
    let Some(fs) = LoopFs::new(&env.root.join("dr.img"), &env.root.join("drfs"), 16) else {
        return;
    };
    let dst = fs.dir.join("mirror");
    mkdirp(&dst);
    write(&env.s("seed"), b"seed");
    let args = run_args_into(&env, &dst);
    let d = env.spawn_args(&args);
    d.wait_log("initial sync complete", secs(60));
    fs.fill("ballast");
    // More than fits in what little the filesystem has left.
    write_files(&env, "big", 40, 64 << 10);
    wait_until(
        "status says the target waits for space",
        secs(60),
        Some(&d),
        || {
            let s = status_json(&env.state);
            s["targets"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("waiting for space"))
        },
    );
    // Long enough for a growing backoff to have grown.
    let held = Instant::now();
    wait_until("a few retries", secs(30), Some(&d), || {
        held.elapsed() >= secs(12)
    });
    let names = thread_names(d.pid);
    for t in ["ship-0", "flush-0", "capture"] {
        assert!(
            names.iter().any(|n| n == t),
            "thread {t} is gone: {names:?}"
        );
    }
    fs.unfill("ballast");
    let back = Instant::now();
    wait_converged(&env.src, &dst, &[], Some(&d));
    eprintln!(
        "converged {:.1} s after space returned on the target",
        back.elapsed().as_secs_f64()
    );
    d.terminate();
}

/// One file larger than the whole target filesystem: it is set aside
/// (retried when its size is free there, or after a growing backoff; named
/// in `status` with its reason) while the rest of the target stays up and
/// takes every other change; once the file fits, it goes too.
#[test]
fn a_file_that_cannot_fit_is_set_aside_and_the_rest_goes_on() {
    let env = Env::new();
    let Some(fs) = LoopFs::new(&env.root.join("dr.img"), &env.root.join("drfs"), 16) else {
        return;
    };
    let dst = fs.dir.join("mirror");
    mkdirp(&dst);
    write_files(&env, "small", 20, 4096);
    let d = env.spawn_args(&run_args_into(&env, &dst));
    d.wait_log("initial sync complete", secs(60));
    write(&env.s("huge"), &pattern(24 << 20, 7));
    let failing_huge = |s: &serde_json::Value| {
        s["targets"][0]["failing"][0].as_str().is_some_and(|f| {
            f.starts_with("huge: waiting for space") && f.contains("needs 25165824 bytes")
        })
    };
    wait_until(
        "status names the file that does not fit",
        secs(60),
        Some(&d),
        || failing_huge(&status_json(&env.state)),
    );
    // Everything else still goes (a copy that meets the disk filled by an
    // attempt at the huge one fails too, and is retried as soon as its
    // few bytes are free), and the target stays up.
    for i in 0..5 {
        write(&env.s(format!("small/later{i}")), b"later");
    }
    wait_until("all but the huge file mirrored", secs(60), Some(&d), || {
        let o = verify_out(&env.src, &dst, &[]);
        let out = o.all();
        let diffs: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(": ") && !l.starts_with("verify:"))
            .collect();
        // (Missing, or an older copy: one taken while it was written.)
        diffs.len() == 1 && diffs[0].ends_with(": huge")
    });
    wait_until(
        "one failing path, the target up",
        secs(30),
        Some(&d),
        || {
            let s = status_json(&env.state);
            s["targets"][0]["up"] == true
                && s["targets"][0]["failing_paths"] == 1
                && failing_huge(&s)
        },
    );
    // Once it fits, it goes at once (a change to the path retries it).
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.s("huge"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("truncate huge");
    wait_converged(&env.src, &dst, &["--checksum"], Some(&d));
    wait_until("no failing path left", secs(30), Some(&d), || {
        status_json(&env.state)["targets"][0]["failing_paths"] == 0
    });
    d.terminate();
}

/// A `tcp://` target whose receiver writes to a 16 MiB tmpfs (env's dst),
/// and the daemon's config for it, `extra` keys first. None without root
/// (the test is skipped). The guards hold the receiver and the mount (and
/// drop in that order: a tuple drops its first field first).
fn small_remote_disk(env: &Env, extra: &str) -> Option<((Daemon, MountGuard), String)> {
    if !is_root() {
        eprintln!("SKIP: mounting a small tmpfs needs root");
        return None;
    }
    let m = mount_with("tmpfs", "size=16m", &env.dst)?;
    let tcp = Tcp::new(env);
    let recv = tcp.receiver(env, &[]);
    let toml = format!(
        "source = {}\nstate_dir = {}\n{extra}{}",
        toml_str(&env.src),
        toml_str(&env.state),
        tcp.target_toml(env)
    );
    Some(((recv, m), toml))
}

/// The same over `tcp://`: the receiver's disk (a 16 MiB tmpfs) cannot
/// hold one file. It is set aside without being sent again while it cannot
/// fit (the daemon asks the receiver for its free space, `Request::Space`),
/// the rest of the target stays up and takes every other change, and once
/// the file fits, it goes.
#[test]
fn a_file_that_cannot_fit_on_a_remote_target_is_not_sent_again_until_it_fits() {
    let env = Env::new();
    let port = free_port();
    let Some((_disk, toml)) =
        small_remote_disk(&env, &format!("metrics_listen = \"127.0.0.1:{port}\"\n"))
    else {
        return;
    };
    write_files(&env, "small", 20, 4096);
    let d = env.spawn_config(&toml);
    d.wait_log("initial sync complete", secs(60));
    let wire = || {
        let text = http_get(port, "/metrics").expect("metrics");
        metric(&text, "drmirror_wire_bytes_total{target=\"dr\"}")
    };
    // Moved in whole: one event (one written in place could be tried
    // while written, and again at its last write).
    let staged = env.root.join("huge");
    write(&staged, &pattern(24 << 20, 7));
    std::fs::rename(&staged, env.s("huge")).expect("move huge in");
    let failing = |s: &serde_json::Value| {
        s["targets"][0]["failing"][0]
            .as_str()
            .filter(|f| {
                f.starts_with("huge: waiting for space") && f.contains("needs 25165824 bytes")
            })
            .map(str::to_string)
    };
    wait_until(
        "status names the file that does not fit",
        secs(60),
        Some(&d),
        || failing(&status_json(&env.state)).is_some(),
    );
    // `(attempt N, next within Ss)`: the attempt, and how long until the
    // next one unless the room frees up sooner.
    let attempt = |shown: &str| {
        let tail = shown.rsplit("(attempt ").next()?;
        let (n, rest) = tail.split_once(", next within ")?;
        let next: u64 = rest.strip_suffix("s)")?.parse().ok()?;
        Some((n.to_string(), next))
    };
    let shown = failing(&status_json(&env.state)).unwrap_or_default();
    let (n, next) = attempt(&shown).expect("attempt and next try in status");
    assert!(
        next >= 30,
        "a file that cannot fit is tried again within {next} s: {shown}"
    );
    let sent = wire();
    for i in 0..5 {
        write(&env.s(format!("small/later{i}")), b"later");
    }
    wait_until("all but the huge file mirrored", secs(60), Some(&d), || {
        let o = verify_out(&env.src, &env.dst, &[]);
        let out = o.all();
        let diffs: Vec<&str> = out
            .lines()
            .filter(|l| l.contains(": ") && !l.starts_with("verify:"))
            .collect();
        diffs.len() == 1 && diffs[0].ends_with(": huge")
    });
    let s = status_json(&env.state);
    assert_eq!(s["targets"][0]["up"], true, "{s}");
    assert_eq!(s["targets"][0]["failing_paths"], 1, "{s}");
    let shown = failing(&s).unwrap_or_default();
    let resent = wire() - sent;
    if attempt(&shown).is_some_and(|(m, _)| m == n) {
        assert!(
            resent < (1 << 20) as f64,
            "{resent} bytes on the wire while the file could not fit"
        );
    }
    // Once it fits, it goes at once (a change to the path retries it; so
    // would the room, asked every round).
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.s("huge"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("truncate huge");
    wait_converged(&env.src, &env.dst, &["--checksum"], Some(&d));
    wait_until("no failing path left", secs(30), Some(&d), || {
        status_json(&env.state)["targets"][0]["failing_paths"] == 0
    });
    d.terminate();
}

/// A path that waits for room on a remote target goes as soon as the
/// receiver reports that room free, without a change to the path: the
/// daemon asks every round.
#[test]
fn a_remote_target_that_gains_room_takes_the_waiting_file() {
    let env = Env::new();
    let Some((_disk, toml)) = small_remote_disk(&env, "") else {
        return;
    };
    write(&env.s("a"), b"a");
    let d = env.spawn_config(&toml);
    d.wait_log("initial sync complete", secs(60));
    write(&env.s("big"), &pattern(20 << 20, 3));
    wait_until(
        "status names the file that does not fit",
        secs(60),
        Some(&d),
        || {
            status_json(&env.state)["targets"][0]["failing"][0]
                .as_str()
                .is_some_and(|f| f.starts_with("big: waiting for space"))
        },
    );
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&env.dst)
        .status()
        .is_ok_and(|s| s.success());
    assert!(grown, "cannot grow the tmpfs");
    // Its backoff alone would hold it a minute (SPACE_WAIT_MIN).
    wait_converged_for(&env.src, &env.dst, &["--checksum"], Some(&d), secs(40));
    d.terminate();
}

#[test]
fn lag_grows_with_the_clock_while_the_link_is_cut() {
    let env = Env::new();
    let Some(net) = NetNs::new() else {
        return;
    };
    let tcp = Tcp::new(&env);
    let _recv = tcp.receiver_on(&env, net.command(bin()), &net.peer_ip, &[], &[]);
    let port = free_port();
    let toml = format!(
        "source = {}\nstate_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        toml_str(&env.src),
        toml_str(&env.state),
        tcp.target_toml(&env).replace("127.0.0.1", &net.peer_ip)
    );
    let d = env.spawn_config(&toml);
    d.wait_log("initial sync complete", secs(60));
    write(&env.s("before"), b"before the cut");
    env.converge(&[], &d);

    net.link(false);
    // A change the shipper picks up at once and cannot deliver: its round
    // blocks on the dead link.
    write(&env.s("during"), &pattern(256 << 10, 1));
    let written = Instant::now();
    let lag = || {
        let text = http_get(port, "/metrics").expect("metrics");
        metric(&text, "drmirror_replication_lag_seconds{target=\"dr\"}")
    };
    let mut scrapes = Vec::new();
    while written.elapsed() < secs(10) {
        let at = written.elapsed().as_secs_f64();
        scrapes.push((at, lag()));
        std::thread::sleep(ms(500));
    }
    // Published every 250 ms from the capture time (a few ms after the
    // write): at most that much below the time since the write.
    for &(at, l) in scrapes.iter().filter(|s| s.0 >= 1.0) {
        assert!(
            l >= at - 0.5,
            "lag {l:.2} s at {at:.2} s into the cut: under-reported\n{scrapes:?}"
        );
    }
    let (t0, l0) = scrapes[2];
    let (t1, l1) = scrapes[scrapes.len() - 1];
    let rate = (l1 - l0) / (t1 - t0);
    assert!(
        rate >= 0.9,
        "lag grew {rate:.2} s per second during the cut\n{scrapes:?}"
    );
    net.link(true);
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn deleting_the_state_directory_stops_the_daemon_loudly() {
    let env = Env::new();
    write(&env.s("a"), b"a");
    let d = env.start(&[]);
    d.wait_log("initial sync complete", secs(60));
    std::fs::remove_dir_all(&env.state).expect("rm state dir");
    let st = d.wait_exit(secs(30));
    assert!(!st.success(), "exit status {st}\n{}", d.log_tail());
    // The pulse's check, or the journal's next write, whichever comes
    // first: either names what is gone.
    let log = d.log();
    assert!(
        log.contains("the state directory is gone")
            || log.contains(&format!("{}/journal", env.state.display())),
        "{}",
        d.log_tail()
    );
}

/// The journal's files of one kind (`.sst`, `.log`), largest first.
fn journal_files(state: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(state.join("journal"))
        .expect("journal dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| (lmeta(&p).len(), p))
        .collect();
    v.sort_by(|a, b| b.cmp(a));
    v.into_iter().map(|(_, p)| p).collect()
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    TruncatedSst,
    GarbledSst,
    TruncatedWal,
    MissingCurrent,
}

fn damage(state: &Path, how: Damage) {
    let j = state.join("journal");
    match how {
        Damage::TruncatedSst => {
            let sst = &journal_files(state, "sst")[0];
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(sst)
                .expect("open sst");
            f.set_len(lmeta(sst).len() / 2).expect("truncate");
        }
        Damage::GarbledSst => {
            use std::os::unix::fs::FileExt;
            let sst = &journal_files(state, "sst")[0];
            let len = lmeta(sst).len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(sst)
                .expect("open sst");
            // Every data block of the table: whatever reads it fails its
            // checksum (the footer is left, so the open itself may pass).
            let garbage = vec![0xa5u8; (len as usize).saturating_sub(4096).max(1)];
            f.write_all_at(&garbage, 0).expect("garble");
        }
        Damage::TruncatedWal => {
            let wal = journal_files(state, "log");
            let wal = wal.first().expect("a WAL file after kill -9");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(wal)
                .expect("open wal");
            f.set_len(lmeta(wal).len() / 2).expect("truncate");
        }
        Damage::MissingCurrent => remove_file(&j.join("CURRENT")),
    }
}

/// A tree mirrored, the daemon stopped (cleanly, or with kill -9 for the
/// WAL), changes made meanwhile, the journal damaged `how`.
fn damaged_env(how: Damage) -> Env {
    let env = Env::new();
    gen_tree(&env.src, 3000, 50);
    let d = env.start(&[]);
    d.wait_initial_sync(secs(120));
    env.converge(&[], &d);
    if matches!(how, Damage::TruncatedWal) {
        // Changes the journal holds only in its WAL when the process dies.
        write_files(&env, "in-wal", 200, 100);
        env.converge(&[], &d);
        d.kill9();
    } else {
        d.terminate();
    }
    write_files(&env, "while-down", 20, 100);
    remove_file(&env.s("while-down/f3"));
    damage(&env.state, how);
    env
}

#[test]
fn a_corrupt_journal_is_moved_aside_and_the_mirror_converges() {
    for how in [
        Damage::MissingCurrent,
        Damage::TruncatedSst,
        Damage::GarbledSst,
        Damage::TruncatedWal,
    ] {
        let env = damaged_env(how);
        let mut d = env.spawn(&[]);
        // A table whose blocks are read only later fails that read: the
        // run exits and leaves a note, and the next start rebuilds.
        let mut runs = 1;
        let rebuilt = loop {
            wait_until("the daemon syncs or exits", secs(120), None, || {
                d.poll_exit().is_some() || d.log().contains("initial sync complete")
            });
            if let Some(st) = d.poll_exit() {
                assert!(runs < 3, "{how:?}: exited again ({st})\n{}", d.log_tail());
                assert!(
                    d.log().contains("corrupt") || d.log().contains("Corruption"),
                    "{how:?}: exited ({st}) without naming the corruption\n{}",
                    d.log_tail()
                );
                runs += 1;
                d = env.spawn(&[]);
                continue;
            }
            break d.log().contains("is corrupt");
        };
        env.converge(&[], &d);
        let asides = std::fs::read_dir(&env.state)
            .expect("state dir")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.corrupt-")
            })
            .count();
        eprintln!("{how:?}: {runs} start(s), rebuilt: {rebuilt}, kept aside: {asides}");
        match how {
            // RocksDB recovers a WAL cut short to its last whole record;
            // the startup scan finds what the lost tail said.
            Damage::TruncatedWal => {}
            _ => {
                assert!(rebuilt, "{how:?}: no rebuild\n{}", d.log_tail());
                assert_eq!(asides, 1, "{how:?}: the corrupt journal is kept aside");
                let s = status_json(&env.state);
                assert!(
                    s["journal_rebuilt"].as_str().is_some(),
                    "{how:?}: status {s}"
                );
            }
        }
        d.terminate();
    }
}

#[test]
fn on_corrupt_journal_refuse_exits_2_naming_the_setting() {
    let env = damaged_env(Damage::MissingCurrent);
    let toml = env.config_text("on_corrupt_journal = \"refuse\"");
    let d = env.spawn_config(&toml);
    let st = d.wait_exit(secs(60));
    assert_eq!(st.code(), Some(2), "{}", d.log_tail());
    let log = d.log();
    assert!(
        log.contains("is corrupt") && log.contains("on_corrupt_journal = \"refuse\""),
        "{}",
        d.log_tail()
    );
    // Left as it was, for a human.
    assert!(env.state.join("journal").exists());
}

/// A mirrored tree, the daemon stopped.
fn mirrored_then_stopped(env: &Env) {
    gen_tree(&env.src, 300, 30);
    let d = env.start(&[]);
    d.wait_initial_sync(secs(60));
    env.converge(&["--checksum"], &d);
    wait_committed(&env.state);
    d.terminate();
}

/// `rm -rf DIR/*`: what a replaced DR disk looks like.
fn empty_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_dir_all(&p);
        } else {
            remove_file(&p);
        }
    }
}

#[test]
fn a_target_emptied_or_restored_while_stopped_is_repaired_at_start() {
    // Emptied (`rm -rf T/*`, a DR disk replaced): the directory and its
    // mark stay, the index sample finds the entries gone.
    let env = Env::new();
    mirrored_then_stopped(&env);
    empty_dir(&env.dst);
    let d = env.start(&[]);
    d.wait_log("comparing the whole target", secs(60));
    env.converge(&["--checksum"], &d);
    d.terminate();

    // Restored from an older copy (its mark of an older generation), and
    // the directory recreated (no mark at all).
    let env = Env::new();
    mirrored_then_stopped(&env);
    let old = env.root.join("old-copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&env.dst)
        .arg(&old)
        .status()
        .expect("cp");
    assert!(st.success());
    let d = env.start(&[]);
    write_files(&env, "later", 20, 100);
    env.converge(&[], &d);
    wait_committed(&env.state);
    d.terminate();
    remove_dir_all(&env.dst);
    let st = Command::new("cp")
        .arg("-a")
        .arg(&old)
        .arg(&env.dst)
        .status()
        .expect("cp");
    assert!(st.success());
    let d = env.start(&[]);
    let line = d.wait_log("comparing the whole target", secs(60));
    assert!(line.contains("mark"), "{line}");
    env.converge(&["--checksum"], &d);
    d.terminate();
}

#[test]
fn an_unmounted_dr_filesystem_is_never_written_and_the_start_says_why() {
    let env = Env::new();
    let mnt = env.root.join("drdisk");
    let image = env.root.join("dr.img");
    let Some(fs) = LoopFs::new(&image, &mnt, 32) else {
        return;
    };
    write(&env.s("a/f"), b"before");
    let args = run_args_into(&env, &mnt);
    let d = env.spawn_args(&args);
    d.wait_log("initial sync complete", secs(60));
    wait_converged(&env.src, &mnt, &[], Some(&d));
    wait_committed(&env.state);
    d.terminate();
    drop(fs);
    wait_until("the DR filesystem is unmounted", secs(30), None, || {
        std::fs::read_dir(&mnt).is_ok_and(|mut r| r.next().is_none())
    });
    write(&env.s("a/f"), b"changed while the DR disk was away");
    let d = env.spawn_args(&args);
    let st = d.wait_exit(secs(60));
    assert!(
        !st.success(),
        "started on the mount point: {st}\n{}",
        d.log_tail()
    );
    assert!(d.log().contains("another filesystem"), "{}", d.log_tail());
    assert!(
        std::fs::read_dir(&mnt).expect("ls").next().is_none(),
        "something was written into the bare mount point"
    );
    // Mounted again: the next start goes on, and the change arrives.
    let ok = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt)
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "remount");
    let _mount = MountGuard::new(&mnt);
    let d = env.spawn_args(&args);
    d.wait_log("drmirror ready", secs(60));
    wait_converged(&env.src, &mnt, &["--checksum"], Some(&d));
    d.terminate();
}

/// The same two checks for a `tcp://` target, where the receiver looks at
/// its root and the daemon judges: emptied while the daemon was stopped
/// (the index sample, over the wire), and recreated (no mark) while both
/// were stopped: each compared in full at the next start and repaired.
#[test]
fn a_remote_target_emptied_or_recreated_while_stopped_is_repaired_at_start() {
    let env = Env::new();
    gen_tree(&env.s("t"), 300, 30);
    let tcp = Tcp::new(&env);
    let toml = crate::remote::config(&env, &tcp.target_toml(&env), "");
    let recv = tcp.receiver(&env, &[]);
    let d = crate::remote::start_config(&env, &toml);
    d.wait_log("initial sync complete", secs(120));
    env.converge(&["--checksum"], &d);
    wait_committed(&env.state);
    d.terminate();
    empty_dir(&env.dst);
    let d = crate::remote::start_config(&env, &toml);
    let line = d.wait_log("comparing the whole target", secs(60));
    assert!(line.contains("missing on the target"), "{line}");
    env.converge(&["--checksum"], &d);
    wait_committed(&env.state);
    d.terminate();
    recv.terminate();

    remove_dir_all(&env.dst);
    mkdirp(&env.dst);
    let recv = tcp.receiver(&env, &[]);
    let d = crate::remote::start_config(&env, &toml);
    let line = d.wait_log("comparing the whole target", secs(60));
    assert!(line.contains("mark is missing"), "{line}");
    env.converge(&["--checksum"], &d);
    d.terminate();
    recv.terminate();
}

/// A `tcp://` target whose DR filesystem is not mounted when its receiver
/// starts (the receiver serves the bare mount point): the daemon refuses
/// the connection before writing anything, says why in its log and in
/// `status`, and goes on once the filesystem is mounted again and the
/// receiver restarted, the change made meanwhile included.
#[test]
fn a_remote_target_whose_dr_filesystem_is_not_mounted_is_never_written() {
    let env = Env::new();
    let image = env.root.join("dr.img");
    let Some(fs) = LoopFs::new(&image, &env.dst, 32) else {
        return;
    };
    write(&env.s("a/f"), b"before");
    let tcp = Tcp::new(&env);
    let toml = crate::remote::config(&env, &tcp.target_toml(&env), "");
    let recv = tcp.receiver(&env, &[]);
    let d = crate::remote::start_config(&env, &toml);
    d.wait_log("initial sync complete", secs(60));
    wait_converged(&env.src, &env.dst, &[], Some(&d));
    wait_committed(&env.state);
    recv.terminate();
    drop(fs);
    wait_until("the DR filesystem is unmounted", secs(30), None, || {
        std::fs::read_dir(&env.dst).is_ok_and(|mut r| r.next().is_none())
    });
    write(&env.s("a/f"), b"changed while the DR disk was away");
    let recv = tcp.receiver(&env, &[]);
    d.wait_log("another filesystem", secs(120));
    wait_until(
        "status says why the target is down",
        secs(60),
        Some(&d),
        || {
            status(&env.state, &[])
                .stdout
                .contains("another filesystem")
        },
    );
    assert!(
        std::fs::read_dir(&env.dst).expect("ls").next().is_none(),
        "something was written into the bare mount point"
    );
    recv.terminate();
    let ok = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&env.dst)
        .status();
    assert!(ok.is_ok_and(|s| s.success()), "remount");
    let _mount = MountGuard::new(&env.dst);
    let recv = tcp.receiver(&env, &[]);
    wait_converged(&env.src, &env.dst, &["--checksum"], Some(&d));
    d.terminate();
    recv.terminate();
}

#[test]
fn a_target_renamed_or_swapped_for_a_symlink_while_running_stops_the_daemon() {
    for how in ["renamed", "symlink"] {
        let env = Env::new();
        write(&env.s("a"), b"a");
        let d = env.start(&[]);
        env.converge(&[], &d);
        let moved = env.root.join("dst-moved");
        rename(&env.dst, &moved);
        if how == "symlink" {
            let elsewhere = env.root.join("elsewhere");
            mkdirp(&elsewhere);
            symlink(&elsewhere, &env.dst);
        }
        write(&env.s("b"), b"after the swap");
        let st = d.wait_exit(secs(30));
        assert!(!st.success(), "{how}: exit {st}\n{}", d.log_tail());
        assert!(
            d.log().contains("another directory") || d.log().contains("is gone"),
            "{how}: {}",
            d.log_tail()
        );
        if how == "symlink" {
            assert!(
                std::fs::read_dir(env.root.join("elsewhere"))
                    .expect("ls")
                    .next()
                    .is_none(),
                "written through the symlink"
            );
        }
    }
}

/// The same on a `tcp://` target: a receiver whose root is renamed away
/// while it serves writes nothing more into the moved directory, the target
/// is down with the reason, and once the directory is back at its path the
/// mirror goes on.
#[test]
fn a_remote_root_renamed_while_serving_takes_no_more_writes_until_it_is_back() {
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let _recv = tcp.receiver(&env, &[]);
    let toml = format!(
        "source = {}\nstate_dir = {}\n{}",
        toml_str(&env.src),
        toml_str(&env.state),
        tcp.target_toml(&env)
    );
    write(&env.s("a"), b"a");
    let d = env.spawn_config(&toml);
    env.converge(&[], &d);
    let moved = env.root.join("dst-moved");
    rename(&env.dst, &moved);
    write(&env.s("b"), b"after the rename");
    wait_until(
        "the target is down, the rename named",
        secs(60),
        Some(&d),
        || {
            let s = status_json(&env.state);
            s["targets"][0]["up"] == false
                && s["targets"][0]["last_error"].as_str().is_some_and(|e| {
                    e.contains("now names another directory") || e.contains("is gone")
                })
        },
    );
    assert!(
        !exists(&moved.join("b")),
        "written into the directory renamed away"
    );
    assert!(
        !exists(&env.d("b")),
        "written at the path it no longer holds"
    );
    rename(&moved, &env.dst);
    wait_converged(&env.src, &env.dst, &[], Some(&d));
    d.terminate();
}
