//! Renames that used to leave the mirror wrong without a word (issue 29,
//! items 1 and 3b): `renameat2(RENAME_EXCHANGE)`, which both capture
//! backends report as two renames (a→b, then b→a), and chains of renames
//! through a temporary name committed in one round. Each function runs on
//! every backend (`suite!`).

use rustix::fs::{renameat_with, RenameFlags, CWD};

use crate::util::*;

fn exchange(a: &std::path::Path, b: &std::path::Path) {
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE)
        .unwrap_or_else(|e| panic!("exchange {} {}: {e}", a.display(), b.display()));
}

/// Two files swapped, two directories with contents swapped (the same
/// size and mtime in the files, so only content tells them apart), then
/// writes into the swapped directories: capture must file them under each
/// directory's new path.
fn exchanged_files_and_directories(b: Backend) {
    let env = Env::with(b);
    write(&env.s("fa"), b"AAAA");
    write(&env.s("fb"), b"BBBB");
    set_mtime(&env.s("fa"), 1_600_000_000, 0);
    set_mtime(&env.s("fb"), 1_600_000_000, 0);
    write(&env.s("d1/x/one"), b"from d1");
    write(&env.s("d2/y/two"), b"from d2");
    write(&env.s("deep/d3/z"), b"from d3");
    mkdirp(&env.s("empty"));
    let d = env.start(&[]);
    env.converge(&["--checksum"], &d);

    exchange(&env.s("fa"), &env.s("fb"));
    exchange(&env.s("d1"), &env.s("d2"));
    // Across directories, and a directory with an empty one.
    exchange(&env.s("d1/y"), &env.s("deep/d3"));
    exchange(&env.s("d2/x"), &env.s("empty"));
    env.converge(&["--checksum"], &d);

    // Events in the swapped directories land where the directories are now.
    write(&env.s("d1/y/new-in-y"), b"new");
    write(&env.s("deep/d3/two"), b"rewritten two");
    write(&env.s("empty/one"), b"rewritten one");
    remove_file(&env.s("d1/y/z"));
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// A chain a↔b, b↔c, c↔a, 50 times over, with writes in between.
fn exchange_chains(b: Backend) {
    let env = Env::with(b);
    for n in ["a", "b", "c"] {
        // Alike in size and mtime: only the content tells them apart.
        write(&env.s(format!("{n}/id")), n.as_bytes());
        set_mtime(&env.s(format!("{n}/id")), 1_600_000_000, 0);
        write(&env.s(format!("{n}/sub/file")), n.as_bytes());
    }
    let d = env.start(&[]);
    env.converge(&[], &d);
    for i in 0..50 {
        exchange(&env.s("a"), &env.s("b"));
        exchange(&env.s("b"), &env.s("c"));
        exchange(&env.s("c"), &env.s("a"));
        write(&env.s(format!("a/w{}", i % 5)), format!("{i}").as_bytes());
        write(
            &env.s(format!("b/sub/w{}", i % 3)),
            format!("{i}").as_bytes(),
        );
    }
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// Directories swapped through a temporary name (`mv p tmp; mv q p; mv tmp
/// q`) with writes in between, each round committed before the next; then
/// the daemon is restarted: the startup scan trusts the index, which must
/// have followed the chain.
fn swaps_through_a_temporary_name(b: Backend) {
    let env = Env::with(b);
    write(&env.s("p/id"), b"p");
    write(&env.s("q/id"), b"q");
    let d = env.start(&[]);
    env.converge(&[], &d);
    for i in 0..20 {
        rename(&env.s("p"), &env.s("tmpx"));
        rename(&env.s("q"), &env.s("p"));
        rename(&env.s("tmpx"), &env.s("q"));
        write(&env.s(format!("p/n{i}")), format!("{i}").as_bytes());
    }
    env.converge(&["--checksum"], &d);
    wait_committed(&env.state);
    d.terminate();
    // What the journal's index says the target holds must be true: changes
    // made while stopped are found against it.
    write(&env.s("q/after"), b"after");
    let d = env.start(&[]);
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// A directory renamed onto an empty one (which the rename replaces), then
/// back: not the two halves of an exchange, though the paths are.
fn moved_onto_an_empty_directory_and_back(b: Backend) {
    let env = Env::with(b);
    write(&env.s("a/f"), b"in a");
    mkdirp(&env.s("b"));
    let d = env.start(&[]);
    env.converge(&[], &d);
    rename(&env.s("a"), &env.s("b"));
    write(&env.s("b/g"), b"written at b");
    env.converge(&[], &d);
    rename(&env.s("b"), &env.s("a"));
    write(&env.s("a/h"), b"written at a");
    write(&env.s("a/f"), b"rewritten at a");
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// More renames pending than a round applies (256), and a write to a
/// file renamed late in them whose entry sorts into the first batch (a
/// round takes 2,048 entries in path order) while the entry of its old name
/// sorts into a later one: the round that copied the new content must not
/// run before the rename, which then moved the old file over it (what
/// fsstress found: the file kept its old content, and nothing said so).
/// The renames pile up while the `tcp://` receiver is down.
#[test]
fn more_renames_than_a_round_before_a_write() {
    const N: usize = 3000;
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let receiver = tcp.receiver(&env, &[]);
    for i in 0..N {
        write(&env.s(format!("z/f{i:05}")), format!("old {i}").as_bytes());
    }
    mkdirp(&env.s("a"));
    let port = free_port();
    let d = env.spawn_config(&format!(
        "source = {}\nstate_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        toml_str(&env.src),
        toml_str(&env.state),
        tcp.target_toml(&env)
    ));
    d.wait_log("drmirror ready", secs(60));
    env.converge(&[], &d);
    receiver.terminate();
    // The 300th rename brings z/f02699 to a/g00300: its target entry is
    // in the first batch, its source entry in the third.
    for i in 0..N {
        rename(
            &env.s(format!("z/f{:05}", N - 1 - i)),
            &env.s(format!("a/g{i:05}")),
        );
    }
    write(&env.s("a/g00300"), b"written after the renames, longer");
    wait_events_recorded(port, &d);
    let receiver = tcp.receiver(&env, &[]);
    env.converge(&["--checksum"], &d);
    d.terminate();
    receiver.terminate();
}

/// A directory and a file exchanged, and back: the second time the
/// directory returns to a path the target held a file at. The index used to
/// keep what it had held below the directory when the file replaced it, so
/// its entries (the very same files: same inode, times and size) were
/// found in sync there, and stayed missing on the target (the churn test's
/// divergence, after chains of exchanges and renames).
fn a_directory_and_a_file_exchanged_twice(b: Backend) {
    let env = Env::with(b);
    write(&env.s("p/f1"), b"one");
    write(&env.s("p/sub/f2"), b"two");
    write(&env.s("y"), b"a file");
    let d = env.start(&[]);
    env.converge(&[], &d);
    exchange(&env.s("p"), &env.s("y"));
    env.converge(&[], &d);
    exchange(&env.s("p"), &env.s("y"));
    env.converge(&["--checksum"], &d);
    // And through a rename: the directory moved on from there.
    exchange(&env.s("p"), &env.s("y"));
    env.converge(&[], &d);
    exchange(&env.s("p"), &env.s("y"));
    rename(&env.s("p"), &env.s("q"));
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// A directory made and renamed at once (`mkdir d; mv d e`, as a tool
/// making a temporary directory and moving it into place does): capture
/// reads the CREATE after the rename, so the directory was never watched
/// under either name. Everything later made in it must still arrive (it
/// went unseen with inotify: the churn test's scrub found it, a file moved
/// into such a directory missing on the target).
fn a_directory_renamed_as_soon_as_made_is_watched(b: Backend) {
    let env = Env::with(b);
    mkdirp(&env.s("top"));
    let d = env.start(&[]);
    env.converge(&[], &d);
    for i in 0..20 {
        let tmp = env.s(format!("top/.tmp{i}"));
        std::fs::create_dir(&tmp).expect("mkdir");
        rename(&tmp, &env.s(format!("top/d{i}")));
    }
    env.converge(&[], &d);
    for i in 0..20 {
        write(&env.s(format!("top/d{i}/later")), b"made after the rename");
        mkdirp(&env.s(format!("top/d{i}/sub")));
        write(&env.s(format!("top/d{i}/sub/deeper")), b"and below");
    }
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// Files rewritten in `a` and `a/d` (the directories' own mtimes
/// unchanged in the source, but changed on the target by the copies), and
/// `a` renamed to `b` after the copies, before their round re-stamps the
/// directories: that round cannot, and the index must stop vouching for
/// them while still holding them. Returns the daemon with capture held:
/// the rename is not recorded yet.
fn renamed_before_the_restamp(env: &Env) -> Daemon {
    use drmirror::failpoints::Hook;
    write(&env.s("a/f"), b"one");
    write(&env.s("a/d/f"), b"one");
    let gate = |name: &str| env.root.join(name);
    let held = |name: &str| env.root.join(format!("{name}.held"));
    let var = |name: &str| gate(name).to_str().expect("a UTF-8 temp dir").to_owned();
    let (restamp, capture) = (var("restamp"), var("capture"));
    let d = env.start_env(
        &[],
        &[
            (Hook::HoldRestamp.var(), &restamp),
            (Hook::HoldCapture.var(), &capture),
        ],
    );
    env.converge(&[], &d);
    write(&gate("restamp"), b"");
    write(&env.s("a/f"), b"two, longer");
    write(&env.s("a/d/f"), b"two, longer");
    wait_until(
        "the round to hold before its re-stamp",
        secs(30),
        Some(&d),
        || exists(&held("restamp")),
    );
    write(&gate("capture"), b"");
    wait_until("capture to hold", secs(30), Some(&d), || {
        exists(&held("capture"))
    });
    rename(&env.s("a"), &env.s("b"));
    remove_file(&gate("restamp"));
    wait_committed(&env.state);
    d
}

/// The rename then read: `b/d` vouched for by an entry the rename carried
/// from `a/d` with the target's mtime unlike it, nothing but a scrub pass
/// would look (the churn test's `…/sub (metadata)` divergences). The
/// shipper's, so one backend.
#[test]
fn an_ancestor_renamed_before_its_round_restamps() {
    let env = Env::new();
    let d = renamed_before_the_restamp(&env);
    remove_file(&env.root.join("capture"));
    env.converge(&[], &d);
    d.terminate();
}

/// The rename never read (kill -9), then a restart whose startup scan
/// finds deletions in the index: the directories the round could not
/// re-stamp are still accounted for, and `a` is found extra on the target.
/// (A first fix dropped them from the index; the churn test then found
/// `(extra)` divergences once. This case converges with that version too,
/// its parent being compared with the target's listing: it guards the
/// restart path, it does not reproduce that failure.)
#[test]
fn a_directory_renamed_before_its_round_restamps_then_a_crash() {
    let env = Env::new();
    let d = renamed_before_the_restamp(&env);
    d.kill9();
    let d = env.start(&[]);
    env.converge(&[], &d);
    d.terminate();
}

/// Pairs of directories `p{k}`, `q{k}` of three files each, alike in size
/// and mtime: only content tells their files apart.
fn swap_pairs(env: &Env) {
    for k in 0..PAIRS {
        for side in ["p", "q"] {
            for j in 0..3 {
                let f = env.s(format!("{side}{k}/id{j}"));
                write(&f, side.as_bytes());
                set_mtime(&f, 1_600_000_000, 0);
            }
        }
    }
}

const PAIRS: u64 = 4;

/// Swaps pairs of [`swap_pairs`] at random through a temporary name, as
/// fast as renames go, writing a new file now and then, until `stop`.
fn swap_until(src: &std::path::Path, seed: u64, stop: &std::sync::atomic::AtomicBool) {
    let mut rng = XorShift::new(seed);
    let mut i = 0u64;
    let tmp = src.join("tmpx");
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let k = rng.below(PAIRS);
        let (p, q) = (src.join(format!("p{k}")), src.join(format!("q{k}")));
        rename(&p, &tmp);
        rename(&q, &p);
        rename(&tmp, &q);
        if rng.below(8) == 0 {
            write(&p.join(format!("n{seed}-{i}")), format!("{i}").as_bytes());
        }
        i += 1;
    }
}

/// Runs [`swap_until`] for `d`, then waits for it.
fn swap_for(src: &std::path::Path, seed: u64, d: std::time::Duration) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| swap_until(src, seed, &stop));
        std::thread::sleep(d);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// `swaps_through_a_temporary_name` as a storm: four pairs of directories
/// swapped at random for two seconds. Capture falls behind, renames fall
/// back to copies, and a compare enqueues a file into a directory that
/// the next round's renames replace with another whose files are alike
/// in size and mtime (what that test found once in CI, and this storm in
/// 2 of 23 runs: the apply found the other file's copy unchanged, and the
/// mirror kept it without a word).
fn swap_storm(b: Backend) {
    let env = Env::with(b);
    swap_pairs(&env);
    let d = env.start(&[]);
    env.converge(&["--checksum"], &d);
    swap_for(&env.src, 29, std::time::Duration::from_secs(2));
    env.converge(&["--checksum"], &d);
    wait_committed(&env.state);
    d.terminate();
    let d = env.start(&[]);
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// The storm, with the daemon killed (-9) in the middle of it, six times:
/// renames applied on the target but not yet committed in the journal
/// are applied again at the restart, and the start must not trust
/// what it finds where they went. After each kill, every claim of the
/// index outside the crashed run's doubts must be true of the target
/// ([`false_claims`]); after each restart, the mirror must converge.
///
/// What it found, each a silent divergence (see `journal::trust`,
/// `target::needs_doubt`, `Shipper::restamp`, `overtaken`): the startup
/// scan's claims racing the replayed renames; a BULK directory the target
/// had trusting look-alikes; a copy over a file the index named, of
/// another file, undoubted; a restamp putting back a directory the round
/// removed; a round's copies under a directory it removed beside them; a
/// crashed run's unrecorded copy moved by the replayed renames.
#[test]
fn swap_storm_crashes_fanotify() {
    with_backend(Backend::Fanotify, swap_storm_crashes)
}

#[test]
fn swap_storm_crashes_inotify() {
    with_backend(Backend::Inotify, swap_storm_crashes)
}

fn swap_storm_crashes(b: Backend) {
    let env = Env::with(b);
    swap_pairs(&env);
    let mut d = env.start(&[]);
    env.converge(&["--checksum"], &d);
    let mut rng = XorShift::new(7);
    for cycle in 0..6 {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| swap_until(&env.src, cycle, &stop));
            std::thread::sleep(ms(100 + rng.below(500)));
            d.kill9();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let wrong = false_claims(&env);
        assert!(
            wrong.is_empty(),
            "after crash {cycle}, the index claims copies the target lacks: {wrong:?}\n{}",
            keep_for_study(&env.src)
        );
        d = env.start(&[]);
        env.converge(&["--checksum"], &d);
    }
    d.terminate();
}

/// The index's claims, as a crash left them, that the target belies: a
/// file the index names as a copy of source file (inode) X, outside the
/// paths the crashed run doubted, must hold X's content (the storm never
/// rewrites a file: inode and content stay together), and a directory it
/// names must be one. Read from a copy of
/// the journal: opening it would recover it before the daemon does.
fn false_claims(env: &Env) -> Vec<String> {
    let mut content = std::collections::HashMap::new();
    for e in walk(&env.src).into_iter().map(|r| env.src.join(r)) {
        if lmeta(&e).is_file() {
            content.insert(ino(&e), read(&e));
        }
    }
    let copy = env.root.join("journal-copy");
    let _ = std::fs::remove_dir_all(&copy);
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(env.state.join("journal"))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    let j = drmirror::journal::Journal::open(&copy).unwrap();
    let doubts = j.doubts(0).unwrap();
    let mut wrong = Vec::new();
    let mut dirs = vec![Vec::new()];
    while let Some(dir) = dirs.pop() {
        for (name, m) in j.index_children(0, &dir).unwrap() {
            let p = drmirror::paths::join(&dir, &name);
            if doubts.iter().any(|d| drmirror::paths::is_within(&p, d)) {
                continue;
            }
            let shown = String::from_utf8_lossy(&p).into_owned();
            match m.kind {
                drmirror::meta::Kind::Dir => {
                    if !env.dst.join(&shown).is_dir() {
                        wrong.push(format!("{shown}/ (a directory)"));
                    }
                    dirs.push(p)
                }
                drmirror::meta::Kind::File => {
                    let held = std::fs::read(env.dst.join(&shown)).ok();
                    if held.as_ref() != content.get(&m.ino) {
                        wrong.push(format!("{shown} (source inode {})", m.ino));
                    }
                }
                _ => {}
            }
        }
    }
    drop(j);
    let _ = std::fs::remove_dir_all(&copy);
    wrong
}

suite!(
    swap_storm,
    a_directory_renamed_as_soon_as_made_is_watched,
    a_directory_and_a_file_exchanged_twice,
    moved_onto_an_empty_directory_and_back,
    exchanged_files_and_directories,
    exchange_chains,
    swaps_through_a_temporary_name,
);
