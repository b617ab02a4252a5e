//! `drmirror check` (issue 33): it lists exactly what the first start then
//! copies and deletes, says when the start would be refused, and writes
//! nothing, to a local or a `tcp://` target.

use crate::util::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::Path;

/// Every entry below `root` (see [`tree_state`]), and the root's extended
/// attributes (where a mark would go).
type Snapshot = (BTreeMap<String, EntryState>, Vec<u8>);

fn snapshot(root: &Path) -> Snapshot {
    let x = std::process::Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(root)
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    (tree_state(root), x)
}

/// A source and a target that differs from it in every way a start
/// handles: files missing, changed, in place; a directory missing; extra
/// files and an extra directory; a file where the target has a directory.
fn fixture(env: &Env) {
    for i in 0..40 {
        write(&env.s(format!("a/f{i}")), &pattern(100 + i, i as u64));
    }
    for i in 0..10 {
        write(&env.s(format!("b/sub/g{i}")), b"new");
    }
    write(&env.s("c/same"), b"same");
    write(&env.s("t"), b"a file here");
    clone_tree(&env.src, &env.dst);
    for i in 0..5 {
        remove_file(&env.d(format!("a/f{i}")));
    }
    for i in 5..10 {
        write(&env.d(format!("a/f{i}")), b"changed on the DR side");
    }
    std::fs::remove_dir_all(env.d("b")).expect("rm b");
    write(&env.d("a/x1"), b"extra");
    write(&env.d("a/x2"), b"extra");
    write(&env.d("d/e1"), b"extra");
    write(&env.d("d/e2"), b"extra");
    remove_file(&env.d("t"));
    write(&env.d("t/inside"), b"a directory here");
    copy_mtime(&env.s("a"), &env.d("a"));
    copy_mtime(&env.src, &env.dst);
}

/// `check` with `args`: (exit code, its lines).
fn check(args: &[OsString]) -> (Option<i32>, Vec<String>, String) {
    let mut a: Vec<OsString> = vec!["check".into(), "--list".into()];
    a.extend(args.iter().cloned());
    let o = drmirror(&a, secs(120));
    let lines = o.stdout.lines().map(str::to_string).collect();
    (o.code, lines, o.describe())
}

/// The paths of lines `verb: PATH`.
fn listed(lines: &[String], verb: &str) -> BTreeSet<String> {
    let prefix = format!("{verb}: ");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn quick(env: &Env, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--source".into(),
        env.src.clone().into(),
        "--target".into(),
        env.dst.clone().into(),
        "--state".into(),
        env.state.join("new").into(),
    ];
    a.extend(extra.iter().map(OsString::from));
    a
}

#[test]
fn check_lists_what_the_first_start_copies_and_deletes_and_writes_nothing() {
    let env = Env::new();
    fixture(&env);
    let before = snapshot(&env.dst);
    // Refused: the target holds entries the source lacks.
    let (code, lines, said) = check(&quick(&env, &[]));
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("REFUSED") && said.contains("--adopt-target"),
        "{said}"
    );
    let (code, lines_adopted, said) = check(&quick(&env, &["--adopt-target"]));
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(listed(&lines, "copy"), listed(&lines_adopted, "copy"));
    assert_eq!(snapshot(&env.dst), before, "check wrote to the target");
    assert!(
        !exists(&env.state.join("new")),
        "check made the state directory"
    );

    let copy = listed(&lines, "copy");
    let delete = listed(&lines, "delete");
    let want_copy: BTreeSet<String> = (0..10)
        .map(|i| format!("a/f{i}"))
        .chain((0..10).map(|i| format!("b/sub/g{i}")))
        .chain(["t".to_string()])
        .collect();
    assert_eq!(copy, want_copy, "{said}");
    let want_delete: BTreeSet<String> = ["a/x1", "a/x2", "d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(delete, want_delete, "{said}");
    assert_eq!(
        listed(&lines, "replace"),
        ["t".to_string()].into_iter().collect()
    );
    assert_eq!(
        listed(&lines, "mkdir"),
        ["b", "b/sub"].iter().map(|s| s.to_string()).collect()
    );
    assert!(
        said.contains("31 files are in place") && said.contains("(7 with what they hold)"),
        "{said}"
    );

    // The first start does just that.
    let d = env.start(&["--metrics", "off", "--adopt-target"]);
    let line = d.wait_initial_sync(secs(60));
    d.terminate();
    assert_eq!(field(&line, "copied"), copy.len() as u64, "{line}\n{said}");
    assert_eq!(field(&line, "skipped"), 31, "{line}");
    assert_eq!(field(&line, "deleted"), delete.len() as u64, "{line}");
    let after = snapshot(&env.dst);
    let is_dir = |p: &str| env.d(p).is_dir();
    let written: BTreeSet<String> = after
        .0
        .iter()
        .filter(|(p, k)| !is_dir(p) && before.0.get(*p) != Some(k))
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(
        written, copy,
        "the files the start wrote are not those check listed"
    );
    let gone: BTreeSet<&String> = before
        .0
        .keys()
        .filter(|p| !after.0.contains_key(*p))
        .collect();
    for p in &gone {
        assert!(
            delete
                .iter()
                .chain(["t".to_string()].iter())
                .any(|d| *p == d || p.starts_with(&format!("{d}/"))),
            "{p} was deleted, check did not list it"
        );
    }
    for p in &delete {
        assert!(gone.contains(p), "{p} listed, not deleted");
    }
    assert!(
        env.d("t").is_file(),
        "the directory t was not replaced by the file"
    );
    assert!(env.verify(&[]).0);
    // Now marked and in sync: nothing left to do.
    let (code, lines, said) = check(&quick(&env, &[]));
    assert_eq!(code, Some(0), "{said}");
    assert!(
        listed(&lines, "copy").is_empty() && listed(&lines, "delete").is_empty(),
        "{said}"
    );
}

/// The same through a receiver: reachable and writable, the same lists as
/// a local check of the same directory, nothing written; an unreachable
/// target: exit 1.
#[test]
fn check_a_tcp_target() {
    let env = Env::new();
    fixture(&env);
    let before = snapshot(&env.dst);
    let (_, local, _) = check(&quick(&env, &["--adopt-target"]));
    let tcp = Tcp::new(&env);
    let r = tcp.receiver(&env, &[]);
    let cfg = env.write_config(&format!(
        "source = {}\nstate_dir = {}\n\n{}adopt = true\n",
        toml_str(&env.src),
        toml_str(&env.state.join("new")),
        tcp.target_toml(&env)
    ));
    let (code, remote, said) = check(&["--config".into(), cfg.clone().into()]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("reachable (protocol") && said.contains("writable"),
        "{said}"
    );
    for verb in ["copy", "mkdir", "attrs", "delete", "replace"] {
        assert_eq!(
            listed(&remote, verb),
            listed(&local, verb),
            "{verb}: {said}"
        );
    }
    assert_eq!(snapshot(&env.dst), before, "check wrote to the target");
    drop(r);
    let (code, _, said) = check(&["--config".into(), cfg.into()]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("cannot be reached"), "{said}");
}
