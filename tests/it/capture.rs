//! Change capture beyond the behavioural suite in `live`: kernel queue
//! overflow, filesystems mounted under the source, no feedback loop from
//! the daemon's own writes, and inotify's walk-free restart.

use crate::util::*;

/// Stops the daemon, creates more files than the kernel queue holds
/// (16384 events by default, for both backends), resumes it: the overflow
/// is logged, counted, and the rescan brings the target level.
fn overflow_burst_is_rescanned(b: Backend) {
    let env = Env::with(b);
    write(&env.s("before"), b"x");
    // Directories watched before the burst (inotify sees into them).
    for i in 0..16 {
        mkdirp(&env.s(format!("burst/d{i:02}")));
    }
    let d = env.start(&[]);
    env.converge(&[], &d);
    d.signal(rustix::process::Signal::STOP);
    let limit: usize = std::fs::read_to_string(match b {
        Backend::Inotify => "/proc/sys/fs/inotify/max_queued_events",
        _ => "/proc/sys/fs/fanotify/max_queued_events",
    })
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(16384);
    // Distinct files in a few directories: events on distinct objects are
    // never merged by the kernel, so this overflows the queue for sure.
    let n = limit + limit / 2;
    for i in 0..n {
        write(&env.s(format!("burst/d{:02}/f{i:06}", i % 16)), b"burst");
    }
    d.signal(rustix::process::Signal::CONT);
    d.wait_log("queue overflowed", secs(60));
    env.converge_for(&[], &d, secs(240));
    assert_eq!(
        count_files(&env.d("burst"), &|n| n.to_string_lossy().starts_with('f')),
        n
    );
    d.terminate();
}

#[test]
fn overflow_burst_is_rescanned_fanotify() {
    with_backend(Backend::Fanotify, overflow_burst_is_rescanned)
}

#[test]
fn overflow_burst_is_rescanned_inotify() {
    with_backend(Backend::Inotify, overflow_burst_is_rescanned)
}

#[test]
fn a_tmpfs_mounted_under_the_source_gets_its_own_mark() {
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let env = Env::with(Backend::Fanotify);
    write(&env.s("top"), b"top");
    let Some(_m) = mount("tmpfs", &env.s("scratch")) else {
        return;
    };
    write(&env.s("scratch/before"), b"before");
    let d = env.start(&[]);
    let ready = d.wait_log("drmirror ready", secs(5));
    assert!(
        ready.contains("2 filesystem marks"),
        "expected a mark for / and one for the tmpfs: {ready}"
    );
    env.converge(&[], &d);
    write(&env.s("scratch/live/after"), b"after");
    rename(&env.s("scratch/before"), &env.s("scratch/renamed"));
    env.converge(&[], &d);
    assert_eq!(read(&env.d("scratch/live/after")), b"after");
    d.terminate();
}

#[test]
fn a_mount_fanotify_cannot_mark_is_named_and_auto_falls_back() {
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    // Declared before the mount guard, so dropped after it: the temp dir
    // cannot be removed while mqueue is still mounted in it.
    let mut env = Env::with(Backend::Fanotify);
    write(&env.s("top"), b"top");
    // mqueue cannot encode file handles, and is empty: harmless to mirror.
    let Some(_m) = mount("mqueue", &env.s("mq")) else {
        return;
    };
    let d = env.spawn(&[]);
    let st = d.wait_exit(secs(30));
    assert_eq!(st.code(), Some(1), "{}", d.log_tail());
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("fanotify unavailable"))
        .unwrap_or_else(|| panic!("no reason given\n{log}"));
    assert!(
        line.contains("mqueue") && line.contains("/mq") && line.contains("file handles"),
        "the reason must name the filesystem type and the mount: {line}"
    );

    // auto: the same source runs on inotify, and says why.
    env.backend = Some(Backend::Auto);
    let d = env.spawn(&[]);
    let ready = d.wait_log("drmirror ready", secs(30));
    assert!(ready.contains("backend=inotify"), "{ready}");
    let why = d.wait_log("capture backend: inotify", secs(5));
    assert!(why.contains("mqueue"), "{why}");
    env.converge(&[], &d);
    write(&env.s("later"), b"later");
    env.converge(&[], &d);
    d.terminate();
}

/// Source, state dir and target on one filesystem of their own (a tmpfs,
/// so that other tests' writes stay off it): with a filesystem-wide mark
/// the daemon's own writes (journal, target) reach it, and must neither be
/// captured nor keep waking the capture loop. Once idle, neither the
/// captured-event count nor the capture wake-ups may move.
fn no_feedback_loop(b: Backend) {
    if !is_root() {
        eprintln!("SKIP: mounting a tmpfs needs root");
        return;
    }
    let env = Env::with(b);
    let Some(_m) = mount("tmpfs", &env.root) else {
        return;
    };
    for d in [&env.src, &env.dst, &env.state] {
        mkdirp(d);
    }
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = env.start(&["--metrics", &addr]);
    for i in 0..200 {
        write(&env.s(format!("f{i}")), &pattern(5000, i));
    }
    env.converge(&["--checksum"], &d);
    std::thread::sleep(secs(2));
    let sample = |d: &Daemon| {
        let text = http_get(port, "/metrics")
            .unwrap_or_else(|| panic!("no /metrics on {addr}\n{}", d.log_tail()));
        (
            metric(&text, "drmirror_events_total"),
            metric(&text, "drmirror_capture_wakeups_total"),
        )
    };
    let before = sample(&d);
    assert!(before.0 >= 200.0, "the writes were not counted: {before:?}");
    std::thread::sleep(secs(3));
    let after = sample(&d);
    assert_eq!(
        before, after,
        "(events, wake-ups) kept growing with the source idle: the daemon reacts to its own writes"
    );
    d.terminate();
}

#[test]
fn no_feedback_loop_fanotify() {
    with_backend(Backend::Fanotify, no_feedback_loop)
}

#[test]
fn no_feedback_loop_inotify() {
    with_backend(Backend::Inotify, no_feedback_loop)
}

/// A fanotify environment on a tmpfs of its own (mounted at its root, with
/// `dst/` and `state/` made again): the filesystem mark sees only this
/// test's files, not those the other tests create meanwhile on `/tmp`'s.
/// None (skipped) where fanotify or the mount is not available.
fn fanotify_on_a_tmpfs() -> Option<(Env, MountGuard)> {
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return None;
    }
    let env = Env::with(Backend::Fanotify);
    let m = mount("tmpfs", &env.root)?;
    for d in [&env.src, &env.dst, &env.state] {
        mkdirp(d);
    }
    Some((env, m))
}

/// An initial sync into a target on the source's own filesystem: with
/// fanotify's filesystem-wide mark, every copy would come back as events
/// (a create, writes, attribute changes) to be read and dropped. The ignore
/// marks on the target's directories keep them out of the kernel queue:
/// what is left is about one event per directory (its creation), not
/// several per file.
#[test]
fn fanotify_keeps_its_own_target_writes_out_of_the_queue() {
    let Some((env, _m)) = fanotify_on_a_tmpfs() else {
        return;
    };
    let files = 3000;
    gen_tree(&env.src, files, 100);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = env.start(&["--metrics", &addr]);
    assert!(
        d.initial_copied(secs(120)) >= files as u64,
        "{}",
        d.log_tail()
    );
    let text = http_get(port, "/metrics")
        .unwrap_or_else(|| panic!("no /metrics on {addr}\n{}", d.log_tail()));
    let dropped = metric(
        &text,
        "drmirror_capture_dropped_total{reason=\"outside_source\"}",
    );
    // 30 directories (and the restamping of a few): without the marks this
    // is at least one per file.
    assert!(
        dropped < (files / 10) as f64,
        "{dropped} events of the daemon's own writes reached capture for {files} files copied"
    );
    env.converge(&["--checksum"], &d);
    d.terminate();
}

#[test]
fn inotify_restart_restores_watches_from_the_journal() {
    let env = Env::with(Backend::Inotify);
    write(&env.s("a/sub/f"), b"f");
    write(&env.s("b/g"), b"g");
    write(&env.s("c/h"), b"h");
    let d = env.start(&[]);
    let first = d.wait_log("drmirror ready", secs(5));
    assert!(first.contains("from a walk"), "{first}");
    env.converge(&[], &d);
    d.terminate();

    // While stopped: a directory renamed, one created, one deleted.
    rename(&env.s("a"), &env.s("a2"));
    write(&env.s("new/deep/h"), b"h");
    remove_dir_all(&env.s("b"));

    let d = env.start(&[]);
    let ready = d.wait_log("drmirror ready", secs(5));
    assert!(
        ready.contains("restored from the journal"),
        "the second start must not walk: {ready}"
    );
    d.wait_log("startup scan done", secs(60));
    d.wait_log("restored watches complete", secs(5));
    env.converge(&[], &d);
    // Restored watches report changes to files in place, not only new
    // entries (they start with the latter only; see `shallow_mask`).
    write(&env.s("c/h"), b"rewritten in place");
    env.converge(&[], &d);
    assert_eq!(read(&env.d("c/h")), b"rewritten in place");
    // Directories the restored tree did not know are watched now.
    write(&env.s("a2/sub/live"), b"1");
    write(&env.s("new/deep/live"), b"2");
    write(&env.s("new/deep/deeper/live"), b"3");
    env.converge(&[], &d);
    assert_eq!(read(&env.d("new/deep/deeper/live")), b"3");
    d.terminate();

    // And a third start restores the updated tree (a2, new; no a or b).
    let d = env.start(&[]);
    d.wait_log("restored from the journal", secs(5));
    write(&env.s("new/deep/third"), b"3");
    env.converge(&[], &d);
    d.terminate();
}

/// A bind mount under the source of a directory outside it on the same
/// filesystem, present at start: with one filesystem mark, its events name
/// the directory by its own path (outside the source) and used to be
/// dropped as `outside_source` while the initial sync had copied it. Its
/// changes, made through either path, now arrive.
#[test]
fn fanotify_a_bind_of_the_same_filesystem_under_the_source_is_captured() {
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let env = Env::with(Backend::Fanotify);
    let other = env.root.join("other");
    write(&other.join("o1"), b"one");
    write(&other.join("sub/o2"), b"two");
    let Some(_bind) = bind_mount(&other, &env.s("bind")) else {
        return;
    };
    let d = env.start(&[]);
    d.wait_log("bind mount(s) under the source", secs(5));
    env.converge(&[], &d);
    write(&env.s("bind/new"), b"written through the bind");
    write(&other.join("o1"), b"rewritten at the origin, longer");
    std::fs::remove_file(other.join("sub/o2")).expect("rm o2");
    mkdirp(&env.s("bind/sub/deeper"));
    write(&env.s("bind/sub/deeper/f"), b"deep");
    rename(&env.s("bind/new"), &env.s("bind/sub/moved"));
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("bind/sub/moved")), b"written through the bind");
    d.terminate();
}

/// Mounts added under the source while the daemon runs (issue 29, item 7):
/// a bind mount of a directory of the source's own filesystem and a tmpfs
/// (a filesystem of its own). What each shows arrives at once, and so do
/// its later changes; once unmounted, the directory beneath is mirrored
/// again.
fn mounts_added_while_running_are_captured(b: Backend) {
    let env = Env::with(b);
    let other = env.root.join("other");
    write(&other.join("o1"), b"one");
    write(&other.join("sub/o2"), b"two");
    write(&env.s("bind/under"), b"beneath the bind");
    mkdirp(&env.s("tmp"));
    let d = env.start(&[]);
    env.converge(&[], &d);

    let Some(bind) = bind_mount(&other, &env.s("bind")) else {
        d.terminate();
        return;
    };
    d.wait_log("mount added under the source", secs(10));
    env.converge(&[], &d);
    write(&env.s("bind/new"), b"written through the bind");
    write(&other.join("o1"), b"rewritten at the origin, longer");
    mkdirp(&env.s("bind/sub/deeper"));
    write(&env.s("bind/sub/deeper/f"), b"deep");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("bind/new")), b"written through the bind");

    if let Some(tmp) = mount("tmpfs", &env.s("tmp")) {
        write(&env.s("tmp/t1"), b"on the tmpfs");
        env.converge(&[], &d);
        write(&env.s("tmp/t1"), b"rewritten on the tmpfs");
        write(&env.s("tmp/dir/t2"), b"new on the tmpfs");
        env.converge(&["--checksum"], &d);
        drop(tmp);
    }
    drop(bind);
    // Unmounted: the directories beneath show again.
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("bind/under")), b"beneath the bind");
    assert!(!env.d("bind/new").exists());
    d.terminate();
}

#[test]
fn mounts_added_while_running_are_captured_fanotify() {
    with_backend(Backend::Fanotify, mounts_added_while_running_are_captured);
}

#[test]
fn mounts_added_while_running_are_captured_inotify() {
    with_backend(Backend::Inotify, mounts_added_while_running_are_captured);
}

/// A filesystem fanotify cannot mark (mqueue: no file handles), mounted
/// under the source while running: named in a warning and in `status`,
/// which exits 1 until it is unmounted; capture of the rest goes on.
#[test]
fn fanotify_a_mount_it_cannot_mark_while_running_is_reported_by_status() {
    if let Err(why) = fanotify_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let env = Env::with(Backend::Fanotify);
    write(&env.s("top"), b"top");
    let d = env.start(&[]);
    env.converge(&[], &d);
    let ask = || {
        let o = status(&env.state, &["--json"]);
        let v: serde_json::Value = serde_json::from_str(&o.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}\n{}", o.describe()));
        (o.code, v["uncaptured"].clone())
    };
    assert_eq!(ask().0, Some(0));
    let mq = mount("mqueue", &env.s("mq"));
    let Some(mq) = mq else {
        d.terminate();
        return;
    };
    let warn = d.wait_log("cannot capture changes under", secs(10));
    assert!(
        warn.contains("/mq") && warn.contains("file handles"),
        "{warn}"
    );
    // CRITICAL, as a monitoring plugin says it.
    wait_until("status pages", secs(10), Some(&d), || ask().0 == Some(2));
    let (_, uncaptured) = ask();
    let listed = uncaptured.as_array().cloned().unwrap_or_default();
    assert!(
        listed.len() == 1 && listed[0].as_str().is_some_and(|u| u.contains("/mq")),
        "{uncaptured}"
    );
    let human = status(&env.state, &[]);
    assert!(
        human.stdout.contains("NOT CAPTURED")
            && human
                .stdout
                .starts_with("DRMIRROR CRITICAL: 1 part(s) of the source not captured"),
        "{}",
        human.describe()
    );
    write(&env.s("later"), b"still captured");
    env.converge(&[], &d);
    drop(mq);
    d.wait_log("mount removed under the source", secs(10));
    wait_until("status clears the mount", secs(10), Some(&d), || {
        ask().0 == Some(0)
    });
    d.terminate();
}

/// Events outside the source on its filesystem are dropped in the kernel
/// after the first from each directory (an evictable ignore mark, see
/// `src/watch/foreign.rs`), and a directory moved from there into the
/// source is captured whole afterwards: its marks, and those of the
/// directories below it, are gone before its later changes are made.
#[test]
fn fanotify_foreign_directories_are_ignored_in_the_kernel_until_moved_in() {
    let Some((env, _m)) = fanotify_on_a_tmpfs() else {
        return;
    };
    write(&env.s("keep"), b"k");
    let outside = env.root.join("outside");
    mkdirp(&outside);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = env.start(&["--metrics", &addr]);
    env.converge(&[], &d);
    let scrape = |series: &str| {
        let text = http_get(port, "/metrics")
            .unwrap_or_else(|| panic!("no /metrics on {addr}\n{}", d.log_tail()));
        metric(&text, series)
    };
    write(&outside.join("d/sub/first"), b"1");
    wait_until("a foreign directory is marked", secs(30), Some(&d), || {
        scrape("drmirror_capture_ignore_marks_total") >= 2.0
    });
    wait_capture_quiet(port, &d);
    let dropped = || scrape("drmirror_capture_dropped_total{reason=\"outside_source\"}");
    let before = dropped();
    let files = 2000;
    for i in 0..files {
        write(&outside.join(format!("d/sub/f{i}")), b"outside");
    }
    wait_capture_quiet(port, &d);
    let reached = dropped() - before;
    assert!(
        reached < (files / 4) as f64,
        "{reached} events of {files} files written outside the source reached capture"
    );

    rename(&outside.join("d"), &env.s("d"));
    env.converge(&[], &d);
    write(&env.s("d/sub/after"), b"written after the move");
    write(&env.s("d/later"), b"and here");
    write(&env.s("d/sub/new/deep"), b"and deeper");
    env.converge(&[], &d);
    assert_eq!(read(&env.d("d/sub/after")), b"written after the move");
    assert_eq!(read(&env.d("d/sub/new/deep")), b"and deeper");
    d.terminate();
}
