//! Live mirroring: changes made after `drmirror ready` reach the target.
//!
//! One behavioural suite, run against every capture backend: each test is
//! a function of the backend, and `suite!` instantiates it three times —
//! `fanotify::`, `inotify::` and `auto::` (which also asserts that auto
//! picked the backend it should).

use crate::util::*;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

/// Asserts dst/rel is a symlink whose text is `text`.
fn assert_symlink(env: &Env, rel: &str, text: &str, d: &Daemon) {
    let p = env.d(rel);
    let m = fs::symlink_metadata(&p)
        .unwrap_or_else(|e| panic!("target {} missing: {e}\n{}", p.display(), d.log_tail()));
    assert!(
        m.file_type().is_symlink(),
        "target {} is not a symlink ({:?}): symlinks must never be followed",
        p.display(),
        m.file_type()
    );
    assert_eq!(
        read_link(&p),
        PathBuf::from(text),
        "symlink text of {}",
        p.display()
    );
}

fn live_create_file(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&["--delay", "50ms"]);
    write(&env.s("hello.txt"), b"hello world\n");
    write(&env.s("sub/inner.bin"), &pattern(3000, 1));
    env.converge(&[], &d);
    assert_eq!(read(&env.d("hello.txt")), b"hello world\n");
    assert_eq!(read(&env.d("sub/inner.bin")), pattern(3000, 1));
    d.terminate();
}

fn live_modify_append_and_overwrite(b: Backend) {
    let env = Env::with(b);
    write(&env.s("f"), b"first line\n");
    write(&env.s("g"), &pattern(4096, 2));
    let d = env.start(&[]);
    env.converge(&[], &d);

    append(&env.s("f"), b"second line\n");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("f")), b"first line\nsecond line\n");

    // In-place overwrite, same size, different bytes.
    {
        let mut f = OpenOptions::new()
            .write(true)
            .open(env.s("g"))
            .expect("open g");
        f.write_all(&pattern(4096, 3)).expect("overwrite g");
    }
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("g")), pattern(4096, 3));

    // Truncating overwrite with shorter content.
    write(&env.s("f"), b"short");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("f")), b"short");

    // Editor-style save: write a temp file, rename over the original.
    write(&env.s(".g.swp"), &pattern(1234, 4));
    rename(&env.s(".g.swp"), &env.s("g"));
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("g")), pattern(1234, 4));
    assert!(!exists(&env.d(".g.swp")), "temp file left on target");
    d.terminate();
}

fn live_delete_file(b: Backend) {
    let env = Env::with(b);
    write(&env.s("a"), b"a");
    write(&env.s("b"), b"b");
    write(&env.s("sub/c"), b"c");
    let d = env.start(&[]);
    env.converge(&[], &d);
    assert!(exists(&env.d("a")) && exists(&env.d("sub/c")));

    remove_file(&env.s("a"));
    remove_file(&env.s("sub/c"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("a")), "deleted file a still on target");
    assert!(
        !exists(&env.d("sub/c")),
        "deleted file sub/c still on target"
    );
    assert_eq!(read(&env.d("b")), b"b");
    d.terminate();
}

fn live_rename_within_dir_keeps_inode(b: Backend) {
    let env = Env::with(b);
    write(&env.s("dir/old.txt"), &pattern(2000, 5));
    write(&env.s("dir/x"), b"will be replaced");
    let d = env.start(&[]);
    env.converge(&[], &d);
    let ino0 = ino(&env.d("dir/old.txt"));

    rename(&env.s("dir/old.txt"), &env.s("dir/new.txt"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("dir/old.txt")));
    assert_eq!(
        ino(&env.d("dir/new.txt")),
        ino0,
        "target inode changed: the rename was applied as delete + copy, not as a rename\n{}\n{}",
        d.log_tail(),
        keep_for_study(&env.src)
    );

    // Rename over an existing file.
    rename(&env.s("dir/new.txt"), &env.s("dir/x"));
    env.converge(&["--checksum"], &d);
    assert!(!exists(&env.d("dir/new.txt")));
    assert_eq!(
        ino(&env.d("dir/x")),
        ino0,
        "rename over an existing file was not applied as a rename\n{}\n{}",
        d.log_tail(),
        keep_for_study(&env.src)
    );
    d.terminate();
}

fn live_rename_across_dirs_keeps_inode(b: Backend) {
    let env = Env::with(b);
    write(&env.s("a/f1"), &pattern(2500, 6));
    write(&env.s("b/keep"), b"keep");
    let d = env.start(&[]);
    env.converge(&[], &d);
    let ino0 = ino(&env.d("a/f1"));

    rename(&env.s("a/f1"), &env.s("b/f2"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("a/f1")));
    assert_eq!(
        ino(&env.d("b/f2")),
        ino0,
        "cross-directory rename was not applied as a rename\n{}",
        d.log_tail()
    );

    // Into a directory created just before the rename. inotify may report
    // only the MOVED_FROM (the watch on the new directory comes too late):
    // the rename is then recognised by the inode the index holds for the
    // old path, which the commit of the first rename put there.
    wait_committed(&env.state);
    mkdirp(&env.s("c/deeper"));
    rename(&env.s("b/f2"), &env.s("c/deeper/f3"));
    env.converge(&["--checksum"], &d);
    assert_eq!(
        ino(&env.d("c/deeper/f3")),
        ino0,
        "rename into a new directory was not applied as a rename\n{}",
        d.log_tail()
    );
    d.terminate();
}

fn live_mkdir_nested_with_immediate_files(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&[]);
    mkdirp(&env.s("a/b/c/d"));
    write(&env.s("a/1"), b"1");
    write(&env.s("a/b/2"), b"2");
    write(&env.s("a/b/c/3"), b"3");
    write(&env.s("a/b/c/d/4"), b"4");
    // A burst of nested creations racing the watch setup.
    for i in 0..20 {
        let dir = env.s(format!("burst/{i}/x/y"));
        mkdirp(&dir);
        write(&dir.join("file"), format!("burst {i}").as_bytes());
        write(&env.s(format!("burst/{i}/top")), b"top");
    }
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("a/b/c/d/4")), b"4");
    assert_eq!(read(&env.d("burst/19/x/y/file")), b"burst 19");
    d.terminate();
}

fn live_rmdir_and_remove_subtree(b: Backend) {
    let env = Env::with(b);
    mkdirp(&env.s("empty"));
    gen_tree(&env.s("tree"), 300, 50);
    write(&env.s("tree/nested/deep/x"), b"x");
    write(&env.s("stay/y"), b"y");
    let d = env.start(&[]);
    env.converge(&[], &d);
    assert!(exists(&env.d("tree/nested/deep/x")));

    fs::remove_dir(env.s("empty")).expect("rmdir");
    remove_dir_all(&env.s("tree"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("empty")), "rmdir not mirrored");
    assert!(!exists(&env.d("tree")), "rm -r not mirrored");
    assert_eq!(read(&env.d("stay/y")), b"y");
    d.terminate();
}

fn live_move_directory_with_10000_files(b: Backend) {
    let env = Env::with(b);
    gen_tree(&env.s("big"), 10_000, 500);
    mkdirp(&env.s("other"));
    let d = env.start(&[]);
    env.converge(&[], &d);
    let probe = "d0001/f0000700";
    let ino0 = ino(&env.d("big").join(probe));

    rename(&env.s("big"), &env.s("other/moved"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("big")));
    assert_eq!(
        ino(&env.d("other/moved").join(probe)),
        ino0,
        "directory move was not applied as a rename (file inode changed)\n{}",
        d.log_tail()
    );

    // Watches must follow the moved directory.
    write(
        &env.s("other/moved/d0000/f0000000"),
        b"changed after the move",
    );
    write(&env.s("other/moved/d0003/new"), b"created after the move");
    env.converge(&["--checksum"], &d);
    assert_eq!(
        read(&env.d("other/moved/d0003/new")),
        b"created after the move"
    );
    d.terminate();
}

fn live_move_directory_into_and_out_of_source(b: Backend) {
    let env = Env::with(b);
    let outside = env.root.join("outside");
    gen_tree(&outside.join("incoming"), 200, 40);
    write(&outside.join("incoming/sub/deep/z"), b"z");
    write(&env.s("stay"), b"stay");
    let d = env.start(&[]);
    env.converge(&[], &d);

    rename(&outside.join("incoming"), &env.s("incoming"));
    env.converge(&[], &d);
    assert_eq!(read(&env.d("incoming/sub/deep/z")), b"z");
    assert_eq!(count_files(&env.d("incoming"), &is_gen_name), 200);

    // The moved-in tree must be watched.
    write(&env.s("incoming/sub/deep/after"), b"after");
    env.converge(&[], &d);
    assert_eq!(read(&env.d("incoming/sub/deep/after")), b"after");

    // Move out: gone from the target.
    rename(&env.s("incoming"), &outside.join("gone"));
    // Changes in the moved-out tree must not reach the target.
    write(&outside.join("gone/sub/deep/ghost"), b"ghost");
    write(&env.s("single"), b"single");
    env.converge(&[], &d);
    assert!(
        !exists(&env.d("incoming")),
        "moved-out directory still on target"
    );
    rename(&env.s("single"), &outside.join("single"));
    write(&outside.join("gone/sub/ghost2"), b"ghost2");
    env.converge(&[], &d);
    assert!(!exists(&env.d("single")), "moved-out file still on target");
    let ghosts: Vec<PathBuf> = walk(&env.dst)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("ghost"))
        .collect();
    assert!(
        ghosts.is_empty(),
        "changes outside the source reached the target: {ghosts:?}"
    );
    d.terminate();
}

fn live_symlinks_are_copied_not_followed(b: Backend) {
    let env = Env::with(b);
    write(&env.s("file.txt"), b"file");
    write(&env.s("realdir/inner.txt"), b"inner");
    symlink("file.txt", &env.s("pre_link"));
    let d = env.start(&[]);
    env.converge(&[], &d);
    assert_symlink(&env, "pre_link", "file.txt", &d);

    let links = [
        ("rel", "file.txt"),
        ("abs", "/etc"),
        ("dangling", "does/not/exist"),
        ("dirlink", "realdir"),
        ("escape", "../outside-of-source"),
        ("dotdot", "sub/../file.txt"),
    ];
    for (name, text) in links {
        symlink(text, &env.s(name));
    }
    env.converge(&[], &d);
    for (name, text) in links {
        assert_symlink(&env, name, text, &d);
    }
    assert_eq!(read(&env.d("realdir/inner.txt")), b"inner");

    // Retarget a link; turn a link into a file and a file into a link.
    remove_file(&env.s("rel"));
    symlink("realdir/inner.txt", &env.s("rel"));
    remove_file(&env.s("dangling"));
    write(&env.s("dangling"), b"now a regular file");
    remove_file(&env.s("file.txt"));
    symlink("realdir", &env.s("file.txt"));
    env.converge(&[], &d);
    assert_symlink(&env, "rel", "realdir/inner.txt", &d);
    assert_symlink(&env, "file.txt", "realdir", &d);
    assert!(lmeta(&env.d("dangling")).file_type().is_file());
    assert_eq!(read(&env.d("dangling")), b"now a regular file");
    d.terminate();
}

fn live_chmod_and_mtime(b: Backend) {
    let env = Env::with(b);
    write(&env.s("f"), b"f");
    write(&env.s("dir/g"), b"g");
    let d = env.start(&[]);
    env.converge(&[], &d);

    chmod(&env.s("f"), 0o600);
    chmod(&env.s("dir/g"), 0o640);
    chmod(&env.s("dir"), 0o750);
    set_mtime(&env.s("f"), 978_307_200, 123_456_789);
    set_mtime(&env.s("dir"), 1_000_000_000, 987_654_321);
    env.converge(&[], &d);
    assert_eq!(mode_of(&env.d("f")), 0o600);
    assert_eq!(mode_of(&env.d("dir/g")), 0o640);
    assert_eq!(mode_of(&env.d("dir")), 0o750);
    assert_eq!(mtime_of(&env.d("f")), (978_307_200, 123_456_789));
    assert_eq!(mtime_of(&env.d("dir")), (1_000_000_000, 987_654_321));

    // touch -d only (no content change).
    set_mtime(&env.s("dir/g"), 1_234_567_890, 5);
    env.converge(&[], &d);
    assert_eq!(mtime_of(&env.d("dir/g")), (1_234_567_890, 5));
    d.terminate();
}

fn live_chown(b: Backend) {
    if !is_root() {
        eprintln!("live_chown: skipped, needs root");
        return;
    }
    let env = Env::with(b);
    write(&env.s("f"), b"f");
    write(&env.s("dir/inner"), b"inner");
    symlink("f", &env.s("link"));
    let d = env.start(&[]);
    env.converge(&[], &d);

    for rel in ["f", "dir", "link"] {
        lchown(&env.s(rel), 1234, 5678);
    }
    write(&env.s("new"), b"new");
    lchown(&env.s("new"), 1234, 5678);
    env.converge(&[], &d);
    for rel in ["f", "dir", "link", "new"] {
        let m = lmeta(&env.d(rel));
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "owner of target {rel}");
    }
    assert_eq!(lmeta(&env.d("dir/inner")).uid(), 0);
    d.terminate();
}

fn live_hard_links(b: Backend) {
    let env = Env::with(b);
    write(&env.s("pre"), &pattern(5000, 8));
    let d = env.start(&[]);
    env.converge(&[], &d);

    fs::hard_link(env.s("pre"), env.s("pre_link")).expect("hard link");
    write(&env.s("a"), &pattern(3000, 9));
    fs::hard_link(env.s("a"), env.s("sub_b")).expect("hard link");
    mkdirp(&env.s("sub"));
    fs::hard_link(env.s("a"), env.s("sub/c")).expect("hard link");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("pre_link")), pattern(5000, 8));
    assert_eq!(read(&env.d("a")), pattern(3000, 9));
    assert_eq!(read(&env.d("sub_b")), pattern(3000, 9));
    assert_eq!(read(&env.d("sub/c")), pattern(3000, 9));
    d.terminate();
}

fn live_odd_names(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&[]);
    for name in odd_names() {
        write(&env.src.join(&name), name.as_bytes());
        write(&env.s("dirs").join(&name).join("inner"), b"inner");
    }
    env.converge(&["--checksum"], &d);
    for name in odd_names() {
        assert_eq!(
            read(&env.dst.join(&name)),
            name.as_bytes(),
            "content of {name:?}"
        );
        assert_eq!(read(&env.d("dirs").join(&name).join("inner")), b"inner");
    }

    // Rename between odd names, file and directory.
    let new_name = os(b"renamed \xfe\n\xe6\x97\xa5.txt");
    rename(&env.s("with space.txt"), &env.src.join(&new_name));
    rename(
        &env.s("dirs").join(os(b"bad\xff")),
        &env.s("dirs").join(os(b"moved\n\xff")),
    );
    env.converge(&["--checksum"], &d);
    assert!(!exists(&env.d("with space.txt")));
    assert_eq!(read(&env.dst.join(&new_name)), b"with space.txt");
    assert_eq!(
        read(&env.d("dirs").join(os(b"moved\n\xff")).join("inner")),
        b"inner"
    );
    d.terminate();
}

fn live_max_length_names(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&[]);
    let long_file: String = "f".repeat(255);
    let long_dir: String = "d".repeat(255);
    write(&env.s(&long_file), b"255-byte name");
    write(&env.s(&long_dir).join(&long_file), b"nested 255");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d(&long_file)), b"255-byte name");

    let other: String = "g".repeat(255);
    rename(&env.s(&long_file), &env.s(&other));
    append(&env.s(&long_dir).join(&long_file), b" more");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d(&other)), b"255-byte name");
    d.terminate();
}

fn live_empty_files(b: Backend) {
    let env = Env::with(b);
    write(&env.s("nonempty"), b"data");
    let d = env.start(&[]);
    write(&env.s("empty"), b"");
    mkdirp(&env.s("sub"));
    File::create(env.s("sub/empty2")).expect("create");
    env.converge(&[], &d);
    assert_eq!(lmeta(&env.d("empty")).len(), 0);
    assert!(lmeta(&env.d("sub/empty2")).file_type().is_file());

    // Truncate to zero.
    File::create(env.s("nonempty")).expect("truncate");
    env.converge(&[], &d);
    assert_eq!(lmeta(&env.d("nonempty")).len(), 0);
    d.terminate();
}

fn live_large_file_70mib(b: Backend) {
    const MIB: usize = 1 << 20;
    let env = Env::with(b);
    let d = env.start(&[]);
    {
        let mut f = File::create(env.s("big.bin")).expect("create big.bin");
        for i in 0..70u64 {
            f.write_all(&pattern(MIB, 1000 + i)).expect("write big.bin");
        }
        f.sync_all().expect("fsync");
    }
    env.converge_for(&["--checksum"], &d, secs(180));
    assert_eq!(lmeta(&env.d("big.bin")).len(), 70 * MIB as u64);
    d.terminate();
}

fn live_deep_tree_70_levels(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&[]);
    let rel: PathBuf = (0..70).map(|_| "d").collect();
    mkdirp(&env.s(&rel));
    write(&env.s(&rel).join("bottom.txt"), b"bottom");
    let mid: PathBuf = (0..35).map(|_| "d").collect();
    write(&env.s(&mid).join("middle.txt"), b"middle");
    env.converge(&[], &d);
    assert_eq!(read(&env.d(&rel).join("bottom.txt")), b"bottom");
    assert_eq!(read(&env.d(&mid).join("middle.txt")), b"middle");
    d.terminate();
}

fn live_20000_files_created_after_ready(b: Backend) {
    let env = Env::with(b);
    let d = env.start(&[]);
    let files = gen_tree(&env.s("bulk"), 20_000, 500);
    env.converge_for(&[], &d, secs(180));
    assert_eq!(count_files(&env.d("bulk"), &is_gen_name), 20_000);
    for p in files.iter().step_by(1999) {
        let rel = p.strip_prefix(&env.src).expect("below src");
        assert_eq!(read(&env.d(rel)), read(p), "content of {}", rel.display());
    }
    d.terminate();
}

fn live_file_rewritten_continuously(b: Backend) {
    const SIZE: usize = 4 << 20;
    let env = Env::with(b);
    write(&env.s("hot"), &pattern(SIZE, 0));
    write(&env.s("calm"), b"calm");
    let d = env.start(&[]);
    env.converge(&[], &d);

    let path = env.s("hot");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = thread::spawn(move || {
        let start = Instant::now();
        let mut i: u64 = 1;
        while start.elapsed() < secs(3) && !stop2.load(Ordering::SeqCst) {
            if i % 2 == 0 {
                // Truncating rewrite with a varying size.
                let len = SIZE + (i as usize % 7) * 1000;
                fs::write(&path, pattern(len, i)).expect("rewrite hot");
            } else {
                // In-place partial overwrite (size unchanged).
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open hot");
                let off = (i * 123_457) % (SIZE as u64 - 65_536);
                f.seek(SeekFrom::Start(off)).expect("seek");
                f.write_all(&pattern(65_536, i)).expect("overwrite hot");
            }
            i += 1;
        }
        i
    });
    let iterations = writer.join().expect("writer thread");
    stop.store(true, Ordering::SeqCst);
    assert!(iterations > 5, "writer made only {iterations} iterations");

    env.converge_for(&["--checksum"], &d, secs(120));
    assert!(
        read(&env.d("hot")) == read(&env.s("hot")),
        "hot file content differs"
    );
    d.terminate();
}

/// Runs the daemon as `nobody` so that a mode-000 file is unreadable to it.
fn live_unreadable_file_is_reported_and_retried(b: Backend) {
    if b == Backend::Fanotify {
        eprintln!("live_unreadable_file_is_reported_and_retried: skipped for fanotify, which needs CAP_SYS_ADMIN; this test runs the daemon as nobody");
        return;
    }
    if !is_root() {
        eprintln!("live_unreadable_file_is_reported_and_retried: skipped, needs root");
        return;
    }
    let (uid, gid) = NOBODY;
    let env = Env::with(b);
    write(&env.s("a.txt"), b"a");
    write(&env.s("dir/b.txt"), b"b");
    write_mode(&env.s("secret_init"), b"initially unreadable", 0o000);
    // In a directory the target lacks: copied by the directory's one
    // (bulk) entry, which must hand the file over to a retry of its own.
    write_mode(&env.s("dir/secret_deep"), b"unreadable in a new dir", 0o000);
    chown_r(&env.root, uid, gid);
    let bin = env.bin_for_other_user();
    let d = Daemon::spawn(&env.run_args(&[]), &env.root, Some(NOBODY), Some(&bin));
    d.wait_ready();

    fn mk(p: &Path, data: &[u8], mode: Option<u32>) {
        match mode {
            Some(m) => write_mode(p, data, m),
            None => write(p, data),
        }
        lchown(p, NOBODY.0, NOBODY.1);
    }
    mkdirp(&env.s("live"));
    lchown(&env.s("live"), uid, gid);
    mk(&env.s("live/c.txt"), b"c", None);
    mk(
        &env.s("live/secret_live"),
        b"unreadable when created",
        Some(0o000),
    );
    mk(&env.s("live/d.txt"), b"d", None);

    // Everything but the three secrets arrives; verify lists only them.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let o = env.verify_out(&[]);
        let diffs: Vec<&str> = o
            .stdout
            .lines()
            .filter(|l| !l.starts_with("verify:") && !l.trim().is_empty())
            .collect();
        let only_secrets = o.code == Some(1)
            && diffs.iter().all(|l| l.contains("secret_"))
            && diffs.iter().any(|l| l.contains("secret_init"))
            && diffs.iter().any(|l| l.contains("secret_deep"))
            && diffs.iter().any(|l| l.contains("secret_live"));
        if only_secrets {
            break;
        }
        if let Some(st) = d.poll_exit() {
            panic!(
                "drmirror exited ({st}) on an unreadable file\n{}",
                d.log_tail()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "the readable files did not converge (expected verify to list only the three unreadable files)\nlast verify: {}\n{}",
                o.describe(),
                d.log_tail()
            );
        }
        thread::sleep(ms(200));
    }
    assert_eq!(read(&env.d("live/c.txt")), b"c");
    assert_eq!(read(&env.d("dir/b.txt")), b"b");

    wait_until(
        "the log reports the unreadable files with a permission error",
        secs(15),
        Some(&d),
        || {
            let log = d.log();
            let low = log.to_lowercase();
            log.contains("secret_init")
                && log.contains("secret_deep")
                && log.contains("secret_live")
                && (low.contains("permission denied")
                    || low.contains("eacces")
                    || low.contains("os error 13"))
        },
    );

    // Once readable, they are retried.
    chmod(&env.s("secret_init"), 0o644);
    chmod(&env.s("live/secret_live"), 0o644);
    chmod(&env.s("dir/secret_deep"), 0o644);
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("dir/secret_deep")), b"unreadable in a new dir");
    assert_eq!(read(&env.d("live/secret_live")), b"unreadable when created");
    assert_eq!(read(&env.d("secret_init")), b"initially unreadable");
    d.terminate();
}

fn live_two_targets(b: Backend) {
    let env = Env::with(b);
    let dst2 = env.root.join("dst2");
    write(&env.s("pre"), b"pre");
    let dst2_str = dst2.to_str().expect("utf-8 temp path").to_string();
    let d = env.start(&["--target", dst2_str.as_str()]);
    write(&env.s("live/one"), &pattern(999, 10));
    rename(&env.s("pre"), &env.s("live/pre_moved"));
    env.converge(&["--checksum"], &d);
    wait_converged(&env.src, &dst2, &["--checksum"], Some(&d));
    assert_eq!(read(&dst2.join("live/one")), pattern(999, 10));
    d.terminate();
}

fn live_unreadable_directory_is_retried_once_readable(b: Backend) {
    if b == Backend::Fanotify {
        eprintln!("live_unreadable_directory_is_retried_once_readable: skipped for fanotify, which needs CAP_SYS_ADMIN; this test runs the daemon as nobody");
        return;
    }
    if !is_root() {
        eprintln!("live_unreadable_directory_is_retried_once_readable: skipped, needs root");
        return;
    }
    let env = Env::with(b);
    write(&env.s("a.txt"), b"a");
    write(&env.s("locked/inner/x.txt"), b"x");
    write(&env.s("locked/y.txt"), b"y");
    chown_r(&env.root, NOBODY.0, NOBODY.1);
    chmod(&env.s("locked"), 0o000);
    let bin = env.bin_for_other_user();
    let d = Daemon::spawn(&env.run_args(&[]), &env.root, Some(NOBODY), Some(&bin));
    d.wait_ready();

    // Everything outside the locked directory arrives, the daemon keeps
    // running, and the log names the directory it could not list.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let o = env.verify_out(&["--no-owner"]);
        let diffs: Vec<&str> = o
            .stdout
            .lines()
            .filter(|l| !l.starts_with("verify:") && !l.trim().is_empty())
            .collect();
        if o.code == Some(1) && !diffs.is_empty() && diffs.iter().all(|l| l.contains("locked")) {
            break;
        }
        if let Some(st) = d.poll_exit() {
            panic!(
                "drmirror exited ({st}) on an unreadable directory\n{}",
                d.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "expected only the locked directory to differ\n{}\n{}",
            o.describe(),
            d.log_tail()
        );
        thread::sleep(ms(200));
    }
    assert_eq!(read(&env.d("a.txt")), b"a");
    assert!(
        d.log().contains("locked"),
        "log should name the directory\n{}",
        d.log_tail()
    );

    // Readable again: its contents follow without a restart.
    chmod(&env.s("locked"), 0o755);
    env.converge(&["--checksum", "--no-owner"], &d);
    assert_eq!(read(&env.d("locked/inner/x.txt")), b"x");
    d.terminate();
}

fn live_log_rotation_keeps_both_files_right(b: Backend) {
    let env = Env::with(b);
    write(&env.s("app.log"), b"generation 0\n");
    let d = env.start(&[]);
    env.converge(&[], &d);
    // logrotate's create mode, several generations back to back.
    for g in 1..=5u32 {
        for k in (1..g).rev() {
            let from = env.s(format!("app.log.{k}"));
            if exists(&from) {
                rename(&from, &env.s(format!("app.log.{}", k + 1)));
            }
        }
        rename(&env.s("app.log"), &env.s("app.log.1"));
        write(&env.s("app.log"), format!("generation {g}\n").as_bytes());
        append(&env.s("app.log.1"), b"late line after rotation\n");
    }
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("app.log")), b"generation 5\n");
    d.terminate();
}

fn live_directory_moved_out_and_name_reused_keeps_watching(b: Backend) {
    let env = Env::with(b);
    let outside = env.root.join("outside");
    mkdirp(&outside);
    write(&env.s("work/old.txt"), b"old");
    let d = env.start(&[]);
    env.converge(&[], &d);
    // Out, and a new directory of the same name in one breath.
    rename(&env.s("work"), &outside.join("work"));
    mkdirp(&env.s("work"));
    env.converge(&[], &d);
    // Changes in the new directory must still be seen...
    write(&env.s("work/new.txt"), b"new");
    // ...and changes in the moved-out one must not reach the mirror.
    write(&outside.join("work/stray.txt"), b"stray");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("work/new.txt")), b"new");
    assert!(
        !exists(&env.d("work/stray.txt")),
        "a change outside the source reached the mirror"
    );
    assert!(!exists(&env.d("work/old.txt")));
    d.terminate();
}

suite!(
    live_create_file,
    live_modify_append_and_overwrite,
    live_delete_file,
    live_rename_within_dir_keeps_inode,
    live_rename_across_dirs_keeps_inode,
    live_mkdir_nested_with_immediate_files,
    live_rmdir_and_remove_subtree,
    live_move_directory_with_10000_files,
    live_move_directory_into_and_out_of_source,
    live_symlinks_are_copied_not_followed,
    live_chmod_and_mtime,
    live_chown,
    live_hard_links,
    live_odd_names,
    live_max_length_names,
    live_empty_files,
    live_large_file_70mib,
    live_deep_tree_70_levels,
    live_20000_files_created_after_ready,
    live_file_rewritten_continuously,
    live_unreadable_file_is_reported_and_retried,
    live_two_targets,
    live_unreadable_directory_is_retried_once_readable,
    live_log_rotation_keeps_both_files_right,
    live_directory_moved_out_and_name_reused_keeps_watching,
);
