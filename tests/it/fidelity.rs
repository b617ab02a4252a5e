//! A faithful copy (issue 31): extended attributes, POSIX ACLs, sparse
//! files and special files end up on the target as
//! `rsync -aHAXS --numeric-ids` leaves them from the same source, compared
//! with `getfattr`/`getfacl` dumps, `find` and `stat` listings; on a local,
//! a `tcp://` and an `ssh://` target, in an initial sync, live, and across
//! a kill -9. `verify` sees each kind of divergence; a target that refuses
//! some of them is warned once, counted, and mirrors the rest.
//!
//! The trees hold hard links too: link groups in one directory and across
//! directories, changed live and while the daemon is down.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::remote::{config, start_config, Sshd};
use crate::util::*;

/// Runs `script` with bash in `dir`; its stdout. Panics (with stderr) when
/// it fails: the tools are installed by tools/install-deps.
fn sh(dir: &Path, script: &str) -> String {
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("set -eo pipefail; {script}"))
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(
        o.status.success(),
        "`{script}` in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A tree with one of everything `rsync -aHAXS` keeps; hard links with
/// `links`.
fn populate(src: &Path, links: bool) {
    write(&src.join("a"), b"hello");
    write(&src.join("acl_file"), b"acl");
    mkdirp(&src.join("acl_dir"));
    mkdirp(&src.join("sub/deeper"));
    write(&src.join("sub/deeper/f"), b"f");
    symlink("a", &src.join("link"));
    let mut script = String::from(
        "setfattr -n user.color -v blue a
         setfattr -n user.bin -v 0x00ff01 a
         setfattr -n user.big -v 0s$(head -c 2000 /dev/urandom | base64 -w0) sub/deeper/f
         setfacl -m u:nobody:rwx,g:nogroup:r acl_file
         setfacl -m u:nobody:rx -d -m g:nogroup:rx acl_dir
         setfattr -n user.dir -v d acl_dir
         echo inherits > acl_dir/inherits
         truncate -s 100M sparse
         dd if=/dev/urandom of=sparse bs=4k count=1 seek=5120 conv=notrunc status=none
         dd if=/dev/urandom of=sparse_head bs=4k count=2 status=none
         truncate -s 8M sparse_head
         mkfifo -m 0640 fifo
         ",
    );
    if is_root() {
        script.push_str(
            "setfattr -n trusted.t -v 1 a
             mknod -m 0600 chardev c 1 3
             mknod -m 0660 blockdev b 7 200
             ",
        );
    }
    sh(src, &script);
    if links {
        // A pair in one directory (one name with attributes), a group of
        // three across directories, and linked symlink and FIFO (rsync -H
        // keeps those too).
        sh(
            src,
            "ln a a2
             echo group > sub/h1
             ln sub/h1 sub/deeper/h2
             ln sub/h1 h3
             ln -P link sub/link_too
             ln fifo sub/fifo_too
             ",
        );
    }
    drop(UnixListener::bind(src.join("sock")).expect("bind a unix socket"));
    age(src);
}

/// Moves every mtime below `dir` into the past, each its own: rsync
/// 3.5.0 leaves a directory, symlink or special file it creates with its
/// own mtime when the source's falls in the current second (seen here),
/// which would make the reference, not the mirror, differ.
fn age(dir: &Path) {
    sh(
        dir,
        "i=0; find . -depth -print0 | while IFS= read -r -d '' p; do
           i=$((i+1)); touch -h -d @$((1700000000 + i * 97)).$((i * 7919)) \"$p\"
         done",
    );
}

/// Everything rsync -aHAXS keeps of `dir`, as text: attributes, ACLs,
/// types, modes, owners and mtimes, file sizes and allocation, device
/// numbers. A target's own mark (`user.drmirror.target` on its root, see
/// `target::identity`) is left out.
fn dump(dir: &Path) -> String {
    sh(
        dir,
        "find . -print0 | sort -z | while IFS= read -r -d '' p; do
           { getfattr -d -m - -h --absolute-names -- \"$p\" 2>/dev/null \\
               | grep -v -e '^#' -e '^$' -e '^user.drmirror.target=' \\
               | sed \"s|^|$p xattr |\"; } || true
           [ -L \"$p\" ] || { getfacl -P -p -c -- \"$p\" 2>/dev/null | grep -v '^$' \\
               | sed \"s|^|$p acl |\"; } || true
         done
         find . -printf '%p %y %m %U %G %T@\\n' | sort
         find . -type f -printf '%p size=%s blocks=%b links=%n\\n' | sort
         find . \\( -type c -o -type b \\) -exec stat -c '%n %t %T' {} + | sort
         find . ! -type d -links +1 -printf '%i %p\\n' | sort \\
           | awk '{ g[$1] = g[$1] \" \" $2 } END { for (i in g) print \"linked\" g[i] }' | sort",
    )
}

/// What rsync -aHAXS --numeric-ids makes of `src` now, in `root/reference`,
/// from scratch: an update of an earlier copy is not the reference (rsync
/// 3.5.0 updates a FIFO in place when a new one replaced it in the source,
/// and so changes the names still linked to the old one).
fn reference(src: &Path, root: &Path) -> PathBuf {
    let r = root.join("reference");
    if r.exists() {
        std::fs::remove_dir_all(&r).expect("remove the last reference");
    }
    let out = Command::new("rsync")
        .args(["-aHAXS", "--numeric-ids", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", r.display()))
        .output()
        .expect("run rsync");
    assert!(
        out.status.success(),
        "rsync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    r
}

/// The target equals what rsync makes of the source; the line-by-line
/// difference when it does not.
fn assert_like_rsync(env: &Env, when: &str) {
    let want = dump(&reference(&env.src, &env.root));
    let got = dump(&env.dst);
    if want != got {
        let diff: Vec<String> = diff_lines(&want, &got);
        let source: Vec<String> = diff_lines(&dump(&env.src), &got);
        panic!(
            "{when}: the mirror differs from rsync -aHAXS's copy:\n{}\n(from the source itself: {})",
            diff.join("\n"),
            source.join("\n")
        );
    }
}

fn diff_lines(want: &str, got: &str) -> Vec<String> {
    let w: std::collections::BTreeSet<&str> = want.lines().collect();
    let g: std::collections::BTreeSet<&str> = got.lines().collect();
    w.difference(&g)
        .map(|l| format!("rsync: {l}"))
        .chain(g.difference(&w).map(|l| format!("drmirror: {l}")))
        .collect()
}

/// Metadata-only changes, and a file that grows a hole (acceptance 2);
/// with `links`, a new link to a linked file, one to a file that had one
/// name, a member removed, one renamed and a write through one name.
fn change_live(src: &Path, links: bool) {
    if links {
        sh(
            src,
            "ln sub/h1 sub/h4
             ln sub/deeper/f f_too
             rm h3
             mv sub/deeper/h2 h2_moved
             echo more >> sub/h1
             ",
        );
    }
    sh(
        src,
        "setfattr -n user.color -v red a
         setfattr -x user.bin a
         setfacl -m u:nobody:r-x acl_dir/inherits
         setfacl -x g:nogroup acl_file
         setfattr -n user.x -v 2 sub
         chmod 0600 fifo
         truncate -s 1G grown
         dd if=/dev/urandom of=grown bs=4k count=1 seek=131072 conv=notrunc status=none
         mkfifo sub/new_fifo
         ",
    );
    age(src);
}

/// Changes made while the daemon is down; with `links`, a pair broken and
/// a new one made.
fn change_offline(src: &Path, links: bool) {
    if links {
        sh(src, "rm a2; ln acl_dir/inherits inherits_too");
    }
    sh(
        src,
        "setfattr -n user.color -v green a
         setfacl -b acl_file
         rm sock fifo
         mkfifo fifo
         truncate -s 64M sub/sparse2
         echo tail >> sub/sparse2
         ",
    );
    age(src);
}

/// Initial sync, live changes, a kill -9 and changes while down, each
/// ending equal to rsync's copy, through a daemon `start` starts.
fn faithful_through(env: &Env, links: bool, start: &dyn Fn() -> Daemon) {
    populate(&env.src, links);
    // The dump sees what it compares (a test of the test).
    let seen = dump(&env.src);
    for want in [
        "./a xattr user.color=\"blue\"",
        "./acl_file acl user:nobody:rwx",
        "./acl_dir acl default:group:nogroup:r-x",
        "./sparse size=104857600 blocks=8",
        "./fifo p 640",
    ] {
        assert!(seen.contains(want), "no `{want}` in the dump:\n{seen}");
    }
    let d = start();
    d.wait_initial_sync(secs(120));
    env.converge(&["--checksum"], &d);
    assert_like_rsync(env, "after the initial sync");

    change_live(&env.src, links);
    env.converge(&["--checksum"], &d);
    assert_like_rsync(env, "after live changes of metadata");

    d.kill9();
    change_offline(&env.src, links);
    let d = start();
    env.converge(&["--checksum"], &d);
    assert_like_rsync(env, "after a kill -9 and changes while down");
    if links {
        // The dump sees link groups (a test of the test).
        let seen = dump(&env.dst);
        for want in [
            "linked ./h2_moved ./sub/h1 ./sub/h4",
            "linked ./f_too ./sub/deeper/f",
            "linked ./acl_dir/inherits ./inherits_too",
            "linked ./link ./sub/link_too",
        ] {
            assert!(seen.contains(want), "no `{want}` in the dump:\n{seen}");
        }
    }
    // The target's mark (an attribute of its root) is its own: the root's
    // attributes mirrored from the source leave it in place.
    assert!(!d.log().contains("mark is missing"), "{}", d.log_tail());
    d.terminate();
}

#[test]
fn a_local_target_is_what_rsync_ahaxs_makes() {
    let env = Env::new();
    faithful_through(&env, true, &|| env.start(&["--metrics", "off"]));
}

#[test]
fn a_tcp_target_is_what_rsync_ahaxs_makes() {
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let _r = tcp.receiver(&env, &[]);
    let toml = config(&env, &tcp.target_toml(&env), "metrics_listen = \"off\"");
    faithful_through(&env, true, &|| start_config(&env, &toml));
}

#[test]
fn an_ssh_target_is_what_rsync_ahaxs_makes() {
    let env = Env::new();
    let Some(sshd) = Sshd::start(&env.root) else {
        return;
    };
    let toml = config(
        &env,
        &sshd.target_toml("dr", &env.dst, ""),
        "metrics_listen = \"off\"",
    );
    faithful_through(&env, true, &|| start_config(&env, &toml));
}

/// A daemon mirroring to `tcp`'s receiver, with its metrics port, once its
/// initial sync is complete.
fn sync_with_metrics(env: &Env, tcp: &Tcp) -> (Daemon, u16) {
    let port = free_port();
    let toml = config(
        env,
        &tcp.target_toml(env),
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    let d = start_config(env, &toml);
    d.wait_initial_sync(secs(120));
    (d, port)
}

/// A sparse file goes over the wire as its data, not its zeros, and is as
/// sparse on the target (acceptance 5, at the size a test can afford: a
/// 2 GiB file with 2 MiB of data).
#[test]
fn a_sparse_file_crosses_the_wire_as_its_data() {
    let env = Env::new();
    sh(
        &env.src,
        "truncate -s 2G s
         dd if=/dev/urandom of=s bs=1M count=1 seek=100 conv=notrunc status=none
         dd if=/dev/urandom of=s bs=1M count=1 seek=1500 conv=notrunc status=none",
    );
    let tcp = Tcp::new(&env);
    let _r = tcp.receiver(&env, &[]);
    let (d, port) = sync_with_metrics(&env, &tcp);
    env.converge(&["--checksum"], &d);
    let m = http_get(port, "/metrics").expect("metrics");
    let sent: f64 = m
        .lines()
        .filter(|l| l.starts_with("drmirror_wire_bytes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(
        sent > 0.0 && sent < 8.0 * (1 << 20) as f64,
        "a 2 GiB file with 2 MiB of data sent {sent} bytes on the wire\n{}",
        m.lines()
            .filter(|l| l.contains("bytes"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let blocks = sh(&env.dst, "stat -c %b s").trim().parse::<u64>().unwrap();
    assert!(
        blocks * 512 < 8 << 20,
        "the target allocates {} bytes for 2 MiB of data",
        blocks * 512
    );
    d.terminate();
}

/// verify reports each kind of divergence a faithful copy can have, in
/// its one-line form, and exits 1; it reports none on rsync's copy.
#[test]
fn verify_sees_each_kind_of_divergence() {
    let env = Env::new();
    populate(&env.src, true);
    let r = reference(&env.src, &env.root);
    let o = verify_out(&env.src, &r, &["--checksum"]);
    assert_eq!(o.code, Some(0), "rsync -aHAXS's copy: {}", o.describe());

    let mut script = String::from(
        "setfattr -x user.color a
         setfacl -x u:nobody acl_file
         dd if=/dev/zero of=sparse bs=1M count=50 conv=notrunc status=none
         touch -r ../src/sparse sparse
         rm fifo; touch fifo; chmod 0640 fifo; touch -r ../src/fifo fifo
         cp -p a2 a2.new; mv a2.new a2
         ln -f sub/deeper/f h3
         ",
    );
    if is_root() {
        script.push_str(
            "rm chardev; mknod -m 0600 chardev c 1 5; touch -h -r ../src/chardev chardev\n",
        );
    }
    sh(&r, &script);
    let o = verify_out(&env.src, &r, &[]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    let mut want = vec![
        "differs(xattr): a",
        "differs(acl): acl_file",
        "differs(sparse): sparse",
        "differs(type): fifo",
        // A pair split; a name moved from one group to another (the
        // other names of both groups are reported with it).
        "differs(hardlink): a",
        "differs(hardlink): a2",
        "differs(hardlink): h3",
        "differs(hardlink): sub/h1",
    ];
    if is_root() {
        want.push("differs(rdev): chardev");
    }
    for w in want {
        assert!(
            o.stdout.lines().any(|l| l == w),
            "no `{w}` in:\n{}",
            o.stdout
        );
    }
    // What the mirror leaves out, verify leaves out.
    let o = verify_out(
        &env.src,
        &r,
        &[
            "--no-xattrs",
            "--no-acls",
            "--no-sparse",
            "--no-special-files",
            "--no-hard-links",
        ],
    );
    for kind in [
        "differs(hardlink)",
        "differs(xattr)",
        "differs(acl)",
        "differs(sparse)",
        "differs(rdev)",
        "differs(type): fifo",
    ] {
        assert!(
            !o.stdout
                .lines()
                .any(|l| l.starts_with(kind) || l.ends_with(kind)),
            "{kind} reported with it left out:\n{}",
            o.stdout
        );
    }
}

/// A target filesystem without extended attributes (ramfs) mirrors
/// everything else; each refused namespace is warned once, counted, and
/// shown by `status` (acceptance 4, first half).
#[test]
fn a_target_without_xattrs_mirrors_the_rest_and_says_what_it_refuses() {
    let env = Env::new();
    let Some(_m) = mount("ramfs", &env.dst) else {
        return;
    };
    populate(&env.src, false);
    for i in 0..20 {
        let f = env.s(format!("many/{i}"));
        write(&f, b"x");
        sh(&env.src, &format!("setfattr -n user.n -v {i} many/{i}"));
    }
    let port = free_port();
    let d = env.start(&["--metrics", &format!("127.0.0.1:{port}")]);
    d.wait_initial_sync(secs(120));
    env.converge(&["--checksum", "--no-xattrs", "--no-acls"], &d);
    let m = http_get(port, "/metrics").expect("metrics");
    let count = |kind: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("drmirror_unsupported_total{")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        count("xattr_user") >= 21.0,
        "xattr_user refusals: {}\n{m}",
        count("xattr_user")
    );
    assert!(count("acl") >= 2.0, "acl refusals: {}", count("acl"));
    let log = d.log();
    let warned = log.matches("user.* extended attributes not kept").count();
    assert_eq!(
        warned,
        1,
        "one warning per namespace, not per file:\n{}",
        d.log_tail()
    );
    // `status` shows it once the shipper has published it (at most a
    // second after the round that met it).
    wait_until(
        "status to show what the target refuses",
        secs(30),
        Some(&d),
        || {
            let st = status(&env.state, &[]).stdout;
            st.contains("not kept (the target refuses them):")
                && st.contains("xattr_user")
                && st.contains("acl")
        },
    );
    // Nothing is retried for it: no path is failing.
    let st = status(&env.state, &[]);
    assert!(!st.stdout.contains("failing"), "{}", st.describe());
    d.terminate();
}

/// A receiver that is not root cannot make devices or write `trusted.*`:
/// the daemon (root) mirrors the rest, counts both, and keeps no path
/// failing over them (acceptance 4, second half).
#[test]
fn a_receiver_that_is_not_root_mirrors_the_rest() {
    if !is_root() {
        eprintln!("SKIP: needs root to run the receiver as another user");
        return;
    }
    let env = Env::new();
    populate(&env.src, false);
    chown_r(&env.dst, NOBODY.0, NOBODY.1);
    let tcp = Tcp::new(&env);
    lchown(&tcp.token, NOBODY.0, NOBODY.1);
    chmod(&env.root, 0o755);
    let bin = env.bin_for_other_user();
    let args: Vec<std::ffi::OsString> = vec![
        "receive".into(),
        "--listen".into(),
        format!("127.0.0.1:{}", tcp.port).into(),
        "--root".into(),
        env.dst.clone().into(),
        "--token-file".into(),
        tcp.token.clone().into(),
    ];
    let r = Daemon::spawn(&args, &env.root, Some(NOBODY), Some(&bin));
    r.wait_log("listening on", secs(20));
    let (d, port) = sync_with_metrics(&env, &tcp);
    // Owners cannot be kept either (as rsync without root): compared
    // without them; devices are missing, a's trusted.t too, everything
    // else is there.
    let mut want = vec!["differs(xattr): a", "missing: blockdev", "missing: chardev"];
    want.sort();
    let deadline = std::time::Instant::now() + secs(60);
    loop {
        let o = verify_out(&env.src, &env.dst, &["--no-owner", "--checksum"]);
        let mut got: Vec<&str> = o
            .stdout
            .lines()
            .filter(|l| !l.starts_with("verify:"))
            .collect();
        got.sort();
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected exactly {want:?}\n{}\n{}",
            o.describe(),
            d.log_tail()
        );
        std::thread::sleep(ms(200));
    }
    let m = http_get(port, "/metrics").expect("metrics");
    for kind in ["device", "xattr_trusted"] {
        assert!(
            m.lines()
                .any(|l| l.starts_with("drmirror_unsupported_total{")
                    && l.contains(&format!("kind=\"{kind}\""))),
            "no {kind} refusal counted:\n{m}"
        );
    }
    wait_until("status to show the refusals", secs(30), Some(&d), || {
        let st = status(&env.state, &[]).stdout;
        st.contains("device") && st.contains("xattr_trusted")
    });
    let st = status(&env.state, &[]);
    assert!(!st.stdout.contains("failing"), "{}", st.describe());
    d.terminate();
}

/// A write, a chmod or an attribute set through one name of a hard-linked
/// file shows under all its names, but capture reports only the name used:
/// the mirror of every other name must follow all the same (it stayed
/// stale, with the lag at 0, until a scrub). Names in other directories,
/// and one outside the source (which only makes the link count larger).
fn a_change_through_one_hard_link_reaches_every_name(b: Backend) {
    let env = Env::with(b);
    write(&env.s("d1/a"), b"one\n");
    mkdirp(&env.s("d2"));
    mkdirp(&env.s("d3/sub"));
    std::fs::hard_link(env.s("d1/a"), env.s("d2/b")).expect("link");
    std::fs::hard_link(env.s("d1/a"), env.s("d3/sub/c")).expect("link");
    std::fs::hard_link(env.s("d1/a"), env.root.join("outside")).expect("link");
    let d = env.start(&["--metrics", "off"]);
    d.wait_initial_sync(secs(60));
    env.converge(&["--checksum"], &d);

    append(&env.s("d1/a"), b"two\n");
    env.converge(&["--checksum"], &d);
    assert_eq!(read(&env.d("d3/sub/c")), b"one\ntwo\n");

    chmod(&env.s("d2/b"), 0o600);
    env.converge(&[], &d);
    assert_eq!(mode_of(&env.d("d1/a")) & 0o777, 0o600);

    sh(&env.src, "setfattr -n user.k -v v d3/sub/c");
    env.converge(&[], &d);
    append(&env.s("d2/b"), b"three\n");
    env.converge(&["--checksum"], &d);

    // Symlinks and FIFOs have hard links too (fsstress made them: a chown
    // through one name left the other's copy with the old owner).
    sh(
        &env.src,
        "ln -s d1/a sl; ln -P sl d2/sl2; mkfifo d1/p; ln d1/p d3/p2",
    );
    env.converge(&[], &d);
    sh(&env.src, "chmod 0600 d3/p2");
    if is_root() {
        sh(&env.src, "chown -h 1234:1234 d2/sl2");
    }
    env.converge(&[], &d);
    assert_eq!(mode_of(&env.d("d1/p")) & 0o777, 0o600);
    d.terminate();
}

suite!(a_change_through_one_hard_link_reaches_every_name);
