//! Excludes and the four delete modes (lsyncd semantics), from the command
//! line and from a config file.

use crate::util::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::thread;

const EXCLUDES: [&str; 4] = ["--exclude", "*.tmp", "--exclude", "cache/"];

/// Asserts that nothing in the target matches `*.tmp` or is a directory
/// named `cache`.
fn assert_no_excluded_in_target(env: &Env, d: &Daemon) {
    let bad: Vec<PathBuf> = walk(&env.dst)
        .into_iter()
        .filter(|rel| {
            let name = rel
                .file_name()
                .map(|n| n.as_bytes().to_vec())
                .unwrap_or_default();
            name.ends_with(b".tmp") || (name == b"cache" && lmeta(&env.dst.join(rel)).is_dir())
        })
        .collect();
    assert!(
        bad.is_empty(),
        "excluded paths reached the target: {bad:?}\n{}",
        d.log_tail()
    );
}

#[test]
fn excludes_never_reach_target() {
    let env = Env::new();
    write(&env.s("keep.txt"), b"keep");
    write(&env.s("a.tmp"), b"excluded a");
    write(&env.s("sub/b.tmp"), b"excluded b");
    write(&env.s("cache/x"), b"excluded x");
    write(&env.s("sub/cache/y"), b"excluded y");
    write(
        &env.s("sub/cachefile"),
        b"not excluded: cache/ matches directories only",
    );
    write(&env.s("notcache/z"), b"z");
    write(&env.s("sub/keep2"), b"keep2");
    let d = env.start(&EXCLUDES);
    d.wait_initial_sync(secs(60));
    assert_eq!(read(&env.d("keep.txt")), b"keep");
    assert_eq!(
        read(&env.d("sub/cachefile")),
        b"not excluded: cache/ matches directories only"
    );
    assert_no_excluded_in_target(&env, &d);

    // Live: excluded creations, and moves across the exclusion boundary.
    write(&env.s("c.tmp"), b"excluded c");
    write(&env.s("sub/cache/new"), b"excluded new");
    write(&env.s("cache/new2"), b"excluded new2");
    write(&env.s("x/y/cache/q"), b"excluded q");
    write(&env.s("keep3.txt"), b"keep3");
    rename(&env.s("a.tmp"), &env.s("a_visible.txt")); // excluded -> included
    rename(&env.s("keep.txt"), &env.s("keep_hidden.tmp")); // included -> excluded
    rename(&env.s("notcache"), &env.s("sub/cache/notcache")); // dir into an excluded dir
    rename(&env.s("cache"), &env.s("uncached")); // excluded dir becomes included
    env.converge(&EXCLUDES, &d);

    assert_no_excluded_in_target(&env, &d);
    assert_eq!(read(&env.d("a_visible.txt")), b"excluded a");
    assert_eq!(read(&env.d("uncached/x")), b"excluded x");
    assert_eq!(read(&env.d("uncached/new2")), b"excluded new2");
    assert_eq!(read(&env.d("keep3.txt")), b"keep3");
    assert!(
        !exists(&env.d("keep.txt")),
        "file renamed to an excluded name still on target"
    );
    assert!(
        !exists(&env.d("notcache")),
        "dir moved into an excluded dir still on target"
    );
    // Without the excludes the trees differ (the check above is not vacuous).
    let (same, out) = env.verify(&[]);
    assert!(
        !same,
        "verify without excludes should see the excluded files: {out}"
    );
    d.terminate();
}

/// Delete-mode scenario. `mode` is the CLI spelling; `via_config` uses a
/// TOML file instead of flags.
fn delete_scenario(mode: &str, via_config: bool) {
    let startup_delete = mode == "true" || mode == "startup";
    let live_delete = mode == "true" || mode == "running";

    let env = Env::new();
    write(&env.s("keep.txt"), b"keep");
    write(&env.s("victim.txt"), b"victim");
    write(&env.s("victim_dir/inner.txt"), b"inner");
    write(&env.d("extra.txt"), b"only in the target");
    write(&env.d("extra_dir/deep.txt"), b"only in the target too");

    // A target seeded by other means: adopted (see `target::adopt`).
    let d = if via_config {
        let value = match mode {
            "true" | "false" => mode.to_string(),
            other => format!("\"{other}\""),
        };
        let toml = env.config_text(&format!("delete = {value}"));
        env.spawn_config(&format!("{toml}adopt = true\n"))
    } else {
        env.spawn(&["--delete", mode, "--adopt-target"])
    };
    d.wait_ready();
    let line = d.wait_initial_sync(secs(60));
    assert_eq!(read(&env.d("keep.txt")), b"keep", "initial copy ({line})");
    assert_eq!(read(&env.d("victim.txt")), b"victim");

    if startup_delete {
        assert!(
            !exists(&env.d("extra.txt")) && !exists(&env.d("extra_dir")),
            "delete={mode}: extra target entries must be removed by the startup sync ({line})\n{}",
            d.log_tail()
        );
    } else {
        assert!(
            exists(&env.d("extra.txt")) && exists(&env.d("extra_dir/deep.txt")),
            "delete={mode}: extra target entries must survive the startup sync ({line})\n{}",
            d.log_tail()
        );
    }

    // Live deletes, plus changes that must arrive in every mode.
    remove_file(&env.s("victim.txt"));
    remove_dir_all(&env.s("victim_dir"));
    write(&env.s("marker.txt"), b"marker");
    append(&env.s("keep.txt"), b" more");
    wait_until(
        "live changes arrive (marker.txt, keep.txt appended)",
        secs(60),
        Some(&d),
        || {
            fs::read(env.d("marker.txt"))
                .map(|v| v == b"marker")
                .unwrap_or(false)
                && fs::read(env.d("keep.txt"))
                    .map(|v| v == b"keep more")
                    .unwrap_or(false)
        },
    );

    if live_delete {
        wait_until(
            &format!("delete={mode}: live deletes reach the target"),
            secs(60),
            Some(&d),
            || !exists(&env.d("victim.txt")) && !exists(&env.d("victim_dir")),
        );
    } else {
        // Give a (wrongly) propagating implementation time to act.
        thread::sleep(ms(1500));
        assert!(
            exists(&env.d("victim.txt")) && exists(&env.d("victim_dir/inner.txt")),
            "delete={mode}: a live delete was propagated\n{}",
            d.log_tail()
        );
    }
    if !startup_delete {
        assert!(
            exists(&env.d("extra.txt")),
            "delete={mode}: target-only file removed while running\n{}",
            d.log_tail()
        );
    }
    d.terminate();
}

#[test]
fn delete_true_cli() {
    delete_scenario("true", false);
}

#[test]
fn delete_false_cli() {
    delete_scenario("false", false);
}

#[test]
fn delete_startup_cli() {
    delete_scenario("startup", false);
}

#[test]
fn delete_running_cli() {
    delete_scenario("running", false);
}

#[test]
fn delete_true_config() {
    delete_scenario("true", true);
}

#[test]
fn delete_false_config() {
    delete_scenario("false", true);
}

#[test]
fn delete_startup_config() {
    delete_scenario("startup", true);
}

#[test]
fn delete_running_config() {
    delete_scenario("running", true);
}

#[test]
fn default_delete_mode_is_true() {
    let env = Env::new();
    write(&env.s("victim.txt"), b"victim");
    write(&env.d("extra.txt"), b"only in the target");
    let d = env.start(&["--adopt-target"]);
    d.wait_initial_sync(secs(60));
    assert!(
        !exists(&env.d("extra.txt")),
        "default delete mode must remove extras at startup"
    );
    remove_file(&env.s("victim.txt"));
    env.converge(&[], &d);
    assert!(!exists(&env.d("victim.txt")));
    d.terminate();
}
