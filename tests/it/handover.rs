//! Zero-gap restart through the service manager's file-descriptor store.
//!
//! `Manager` plays systemd's part of the protocol, nothing more: it owns
//! the `NOTIFY_SOCKET` datagram socket, keeps the descriptors a daemon
//! sends with `FDSTORE=1` (SCM_RIGHTS), and passes them to the next daemon
//! at fd 3 onwards with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`.

use crate::util::*;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

struct Manager {
    sock: UnixDatagram,
    path: PathBuf,
    stored: Vec<(String, OwnedFd)>,
    messages: Vec<String>,
}

impl Manager {
    fn new(env: &Env) -> Manager {
        let path = env.root.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(ms(100))).expect("timeout");
        Manager {
            sock,
            path,
            stored: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Receives notify messages until `done` holds or `timeout` passes.
    fn pump(&mut self, timeout: std::time::Duration, done: impl Fn(&Manager) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            let mut buf = [0u8; 4096];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let n = match rustix::net::recvmsg(&self.sock, &mut iov, &mut cmsg, RecvFlags::empty())
            {
                Ok(r) => r.bytes,
                Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
                Err(e) => panic!("recvmsg on the notify socket: {e}"),
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(it) = m {
                    fds.extend(it);
                }
            }
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTORE=1") {
                self.stored
                    .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.stored.retain(|(n, _)| *n != name);
            }
            self.messages.push(text);
        }
        true
    }

    fn got(&self, line: &str) -> bool {
        self.messages.iter().any(|m| m.lines().any(|l| l == line))
    }

    /// Starts `drmirror run` the way systemd would, with the stored fds.
    fn spawn(&self, env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID must be the daemon's own pid: the shell's, kept by exec.
        let script = if self.stored.is_empty() {
            r#"exec "$0" "$@""#
        } else {
            r#"LISTEN_PID=$$ exec "$0" "$@""#
        };
        cmd.arg("-c").arg(script).arg(bin());
        cmd.args(env.run_args(args));
        cmd.env("NOTIFY_SOCKET", &self.path);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        if !self.stored.is_empty() {
            let names: Vec<&str> = self.stored.iter().map(|(n, _)| n.as_str()).collect();
            cmd.env("LISTEN_FDS", self.stored.len().to_string());
            cmd.env("LISTEN_FDNAMES", names.join(":"));
            let raw: Vec<i32> = self.stored.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            // SAFETY: runs in the forked child before exec and only calls
            // async-signal-safe fcntl/dup2 on descriptors this process owns.
            unsafe {
                cmd.pre_exec(move || {
                    // Move them out of the way first: a stored fd may sit
                    // where another one must go.
                    let mut high = Vec::new();
                    for fd in &raw {
                        let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
                        if h < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(h);
                    }
                    for (i, h) in high.iter().enumerate() {
                        if libc::dup2(*h, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        Daemon::spawn_command(cmd, &env.root)
    }
}

fn setup(b: Backend) -> Option<(Env, Manager, MountGuard)> {
    if matches!(b, Backend::Fanotify) {
        if let Err(why) = fanotify_available() {
            eprintln!("SKIP: {why}");
            return None;
        }
    }
    let env = Env::with(b);
    // A filesystem of its own: a filesystem mark sees every write on its
    // filesystem, and a kill while the daemon reads other tests' events
    // would rightly force the rescan these tests check is not needed.
    let guard = mount("tmpfs", &env.root)?;
    for d in [&env.src, &env.dst, &env.state] {
        mkdirp(d);
    }
    write(&env.s("a/f"), b"first");
    write(&env.s("b/g"), b"g");
    mkdirp(&env.s("c"));
    let m = Manager::new(&env);
    Some((env, m, guard))
}

/// Starts a daemon under the manager and waits until it is ready, in sync,
/// and has stored its capture descriptor.
fn start_stored(env: &Env, m: &mut Manager, args: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
    let d = m.spawn(env, args, extra_env);
    d.wait_log("drmirror ready", secs(30));
    assert!(
        m.pump(secs(10), |m| m.got("READY=1") && !m.stored.is_empty()),
        "no READY=1 and FDSTORE=1 on the notify socket; got {:?}\n{}",
        m.messages,
        d.log_tail()
    );
    env.converge(&[], &d);
    d
}

#[test]
fn fd_store_handover_misses_nothing_and_needs_no_rescan_fanotify() {
    handover_misses_nothing(Backend::Fanotify);
}

#[test]
fn fd_store_handover_misses_nothing_and_needs_no_rescan_inotify() {
    handover_misses_nothing(Backend::Inotify);
}

fn handover_misses_nothing(b: Backend) {
    let Some((env, mut m, _mount)) = setup(b) else {
        return;
    };
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = start_stored(&env, &mut m, &["--metrics", &addr], &[]);
    // The target shares the source's filesystem, so the daemon's own writes
    // wake its capture loop after the trees already compare equal. A kill
    // while it reads those rightly forces a rescan (it cannot know they were
    // only its own): kill it once capture has gone quiet.
    wait_capture_quiet(port, &d);
    d.kill9();

    // While no daemon runs: the kernel queue of the stored group keeps these.
    write(&env.s("a/new1"), b"written while down");
    append(&env.s("a/f"), b" and more");
    write(&env.s("d/x"), b"new dir while down");
    rename(&env.s("b"), &env.s("b2"));
    std::fs::remove_dir(env.s("c")).expect("rmdir");
    // An outage of a few seconds: without the handover the lag after the
    // restart would count from before it (the floor, see `signals`).
    let down = std::time::Instant::now();
    std::thread::sleep(secs(3));

    let d = m.spawn(&env, &["--metrics", &addr], &[]);
    let log = d.wait_log("capture handed over", secs(30));
    assert!(log.contains("no rescan needed"), "{log}");
    d.wait_log("startup scan skipped", secs(10));
    // Nothing was missed, so no floor: the kernel kept every change, each
    // counts from when the new daemon read it. Scraped until they arrived.
    let arrived = || env.d("a/new1").exists() && env.d("d/x").exists() && env.d("b2/g").exists();
    let mut scraped = 0;
    while scraped == 0 || !arrived() {
        assert!(down.elapsed() < secs(60), "not arrived\n{}", d.log_tail());
        if let Some(text) = http_get(port, "/metrics") {
            scraped += 1;
            let lag = metric(&text, "drmirror_replication_lag_seconds{");
            assert!(
                lag < 3.0,
                "lag {lag:.2} s after a gap-free handover ({:.1} s since the kill)\n{}",
                down.elapsed().as_secs_f64(),
                d.log_tail()
            );
        }
        std::thread::sleep(ms(50));
    }
    assert!(
        !d.log().contains("may be missing on the targets"),
        "a lag floor after a gap-free handover\n{}",
        d.log_tail()
    );
    env.converge(&["--checksum"], &d);
    assert!(
        !d.log().contains("startup scan done"),
        "a rescan ran after a clean handover\n{}",
        d.log_tail()
    );
    assert_eq!(
        m.stored.len(),
        1,
        "the restarted daemon must reuse the stored descriptor, not add one"
    );
    assert_eq!(m.stored[0].0, format!("drmirror-{}", b.name()));
    // And capture goes on live, in the directories created and renamed
    // while it was down too (inotify: watches the journal knew by number).
    write(&env.s("after"), b"after");
    write(&env.s("b2/after"), b"in the renamed directory");
    write(&env.s("d/after"), b"in the new directory");
    mkdirp(&env.s("b2/sub"));
    write(&env.s("b2/sub/deeper"), b"deeper");
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn a_crash_holding_unrecorded_events_forces_a_rescan_fanotify() {
    crash_holding_events_rescans(Backend::Fanotify);
}

#[test]
fn a_crash_holding_unrecorded_events_forces_a_rescan_inotify() {
    crash_holding_events_rescans(Backend::Inotify);
}

fn crash_holding_events_rescans(b: Backend) {
    let Some((env, mut m, _mount)) = setup(b) else {
        return;
    };
    // The hook aborts right after events are taken off the kernel queue.
    let d = start_stored(
        &env,
        &mut m,
        &[],
        &[(drmirror::failpoints::Hook::AbortAfterRead.var(), "1")],
    );
    write(&env.s("a/lost-in-flight"), b"read, never recorded");
    let st = d.wait_exit(secs(30));
    assert!(!st.success(), "the hook should have aborted the daemon");

    let d = m.spawn(&env, &[], &[]);
    if matches!(b, Backend::Inotify) {
        // Its watch numbers may have moved unrecorded: not taken over.
        let log = d.wait_log("dropping the stored inotify capture descriptor", secs(30));
        assert!(log.contains("died holding events"), "{log}");
    } else {
        let log = d.wait_log("capture handed over", secs(30));
        assert!(log.contains("rescanning"), "{log}");
    }
    d.wait_log("startup scan done", secs(60));
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("a/lost-in-flight")), b"read, never recorded");
    write(&env.s("b/live-again"), b"x");
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn without_a_stored_descriptor_a_restart_rescans() {
    let Some((env, mut m, _mount)) = setup(Backend::Fanotify) else {
        return;
    };
    let d = start_stored(&env, &mut m, &[], &[]);
    d.kill9();
    write(&env.s("a/while-down"), b"x");
    m.stored.clear();
    let d = m.spawn(&env, &[], &[]);
    d.wait_log("startup scan done", secs(60));
    assert!(!d.log().contains("capture handed over"));
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn a_stored_descriptor_of_another_backend_is_dropped() {
    let Some((mut env, mut m, _mount)) = setup(Backend::Inotify) else {
        return;
    };
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let d = start_stored(&env, &mut m, &[], &[]);
    d.kill9();
    write(&env.s("a/while-down"), b"x");
    env.backend = Some(Backend::Fanotify);
    let d = m.spawn(&env, &[], &[]);
    let log = d.wait_log("dropping the stored inotify capture descriptor", secs(30));
    assert!(log.contains("another source or backend"), "{log}");
    d.wait_log("startup scan done", secs(60));
    env.converge(&[], &d);
    assert!(
        m.pump(secs(10), |m| m.stored.len() == 1
            && m.stored[0].0 == "drmirror-fanotify"),
        "the store should hold the new fanotify group only: {:?}",
        m.stored.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    d.terminate();
}

#[test]
fn a_crash_during_reconciliation_resumes_it_from_its_checkpoint() {
    // inotify: the daemon's own writes to the target do not wake capture,
    // so the crash below never holds unrecorded events (which would rightly
    // force a scan from scratch).
    let Some((env, mut m, _mount)) = setup(Backend::Inotify) else {
        return;
    };
    // Subtrees big enough to be checkpointed (256 entries and more).
    for i in 0..12 {
        for j in 0..300 {
            write(&env.s(format!("t{i:02}/f{j:03}")), b"x");
        }
    }
    let d = start_stored(&env, &mut m, &[], &[]);
    let full = field(&d.wait_log("startup scan done", secs(30)), "scanned");
    d.kill9();

    // A start without the stored group scans from scratch; it dies after
    // checkpointing three directories.
    m.stored.clear();
    let d = m.spawn(
        &env,
        &[],
        &[(drmirror::failpoints::Hook::AbortReconcileAfter.var(), "3")],
    );
    let st = d.wait_exit(secs(60));
    assert!(
        !st.success(),
        "the hook should have aborted the daemon\n{}",
        d.log_tail()
    );
    assert!(
        m.pump(secs(10), |m| !m.stored.is_empty()),
        "the aborted run stored no capture group"
    );
    write(&env.s("t05/while-down"), b"written while no daemon ran");
    rename(&env.s("t07"), &env.s("t07-renamed"));

    // Its group is handed over: the scan resumes and skips what was done.
    let d = m.spawn(&env, &[], &[]);
    let line = d.wait_log("startup scan resumes", secs(30));
    assert!(line.contains("checkpointed"), "{line}");
    let done = d.wait_log("startup scan done", secs(60));
    eprintln!("full scan: {full} entries; resumed: {done}");
    assert!(field(&done, "resumed_subtrees") >= 1, "{done}");
    assert!(
        field(&done, "scanned") < full,
        "the resumed scan compared as much as a full one ({full}): {done}"
    );
    env.converge(&["--checksum"], &d);
    write(&env.s("t07-renamed/live"), b"live");
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn an_inotify_group_the_journal_does_not_belong_to_is_refused() {
    let Some((env, mut m, _mount)) = setup(Backend::Inotify) else {
        return;
    };
    let d = start_stored(&env, &mut m, &[], &[]);
    d.kill9();
    // A run without the stored group sets up another one, over the same
    // tree: the same watch numbers, maybe for other directories. Its
    // journal is the one the old group would be handed with.
    let old = std::mem::take(&mut m.stored);
    let d = start_stored(&env, &mut m, &[], &[]);
    // Named in the journal: the old group is refused as another's. (Killed
    // before, it is refused because the journal names none: see
    // `an_inotify_group_handed_over_with_shallow_watches_is_refused`.)
    d.wait_log("restored watches complete", secs(30));
    d.kill9();
    m.stored = old;
    write(&env.s("a/while-down"), b"x");
    let d = m.spawn(&env, &[], &[]);
    let log = d.wait_log("dropping the stored inotify capture descriptor", secs(30));
    assert!(log.contains("not the group"), "{log}");
    d.wait_log("startup scan done", secs(60));
    env.converge(&[], &d);
    write(&env.s("b/live"), b"live");
    env.converge(&[], &d);
    d.terminate();
}

/// A group whose restored watches were not all complete yet (they start
/// shallow: entries appearing and going only) is not taken over: it would
/// miss changes to files in place for good.
#[test]
fn an_inotify_group_handed_over_with_shallow_watches_is_refused() {
    let Some((env, mut m, _mount)) = setup(Backend::Inotify) else {
        return;
    };
    let d = start_stored(&env, &mut m, &[], &[]);
    d.kill9();
    // Restored from the journal, and killed (the hook: deterministically)
    // before its watches were complete.
    m.stored.clear();
    let d = start_stored(
        &env,
        &mut m,
        &[],
        &[(drmirror::failpoints::Hook::HoldShallow.var(), "1")],
    );
    assert!(
        d.log().contains("restored from the journal"),
        "{}",
        d.log_tail()
    );
    assert!(
        !d.log().contains("restored watches complete"),
        "{}",
        d.log_tail()
    );
    d.kill9();
    let d = m.spawn(&env, &[], &[]);
    let log = d.wait_log("dropping the stored inotify capture descriptor", secs(30));
    // The restoring run stopped naming the first run's group as soon as it
    // began to renumber the watch tree, and never named its own.
    assert!(log.contains("names no inotify group"), "{log}");
    d.wait_log("restored watches complete", secs(30));
    d.wait_log("startup scan done", secs(60));
    env.converge(&[], &d);
    // A change in place, which a shallow watch would not report.
    append(&env.s("a/f"), b" changed in place");
    env.converge(&[], &d);
    d.terminate();
}

/// `STATUS=` lines say what the daemon does (at start, then every few
/// seconds with each target's lag and backlog); `WATCHDOG=1` is sent when,
/// and only when, the unit asks for it (`WATCHDOG_USEC`).
#[test]
fn notify_reports_status_and_feeds_the_watchdog_only_when_asked() {
    let Some((env, mut m, _guard)) = setup(Backend::Inotify) else {
        return;
    };
    let count = |m: &Manager, line: &str| {
        m.messages
            .iter()
            .filter(|x| x.lines().any(|l| l == line))
            .count()
    };
    let status_with = |m: &Manager, part: &str| {
        m.messages.iter().any(|x| {
            x.lines()
                .any(|l| l.starts_with("STATUS=") && l.contains(part))
        })
    };

    // Asked for: pings at half the interval (here every 150 ms).
    let d = m.spawn(&env, &[], &[("WATCHDOG_USEC", "300000")]);
    let ok = m.pump(secs(20), |m| {
        count(m, "WATCHDOG=1") >= 5 && status_with(m, "backlog")
    });
    assert!(
        ok && m.got("READY=1") && status_with(&m, "capturing"),
        "expected READY=1, STATUS= lines (one with each target's backlog) and WATCHDOG=1 pings; got {:?}\n{}",
        m.messages,
        d.log_tail()
    );
    d.terminate();

    // Not asked for: no pings, over longer than the interval above.
    m.messages.clear();
    let d = m.spawn(&env, &[], &[]);
    m.pump(secs(20), |m| m.got("READY=1"));
    m.pump(secs(2), |_| false);
    assert!(
        m.got("READY=1"),
        "no READY=1: {:?}\n{}",
        m.messages,
        d.log_tail()
    );
    assert_eq!(
        count(&m, "WATCHDOG=1"),
        0,
        "WATCHDOG=1 sent without WATCHDOG_USEC: {:?}",
        m.messages
    );
    d.terminate();
}
