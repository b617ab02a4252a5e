//! `drmirror verify`: each kind of difference is detected and printed with
//! its documented prefix; identical trees exit 0.

use crate::util::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;

/// A source tree and an exact copy of it in dst.
fn fixture() -> Env {
    let env = Env::new();
    write(&env.s("a.txt"), b"alpha");
    chmod(&env.s("a.txt"), 0o644);
    write(&env.s("dir/b.txt"), &pattern(1000, 1));
    write(&env.s("dir/c.bin"), &pattern(5000, 2));
    symlink("a.txt", &env.s("link"));
    mkdirp(&env.s("emptydir"));
    write(&env.s("x"), b"x-file");
    set_mtime(&env.s("dir/c.bin"), 1_500_000_000, 42);
    clone_tree(&env.src, &env.dst);
    let o = env.verify_out(&["--checksum"]);
    assert_eq!(
        o.code,
        Some(0),
        "fixture copy must verify as identical\n{}",
        o.describe()
    );
    env
}

/// A difference line for `path` of `kind` exists: `missing: P`, `extra: P`
/// or `differs(K[,K...]): P`.
fn has_diff(stdout: &str, kind: &str, path: &str) -> bool {
    stdout.lines().any(|l| {
        if kind == "missing" || kind == "extra" {
            return l
                .strip_prefix(kind)
                .and_then(|r| r.strip_prefix(": "))
                .map(|p| p.trim_start_matches("./") == path)
                .unwrap_or(false);
        }
        if let Some(rest) = l.strip_prefix("differs(") {
            if let Some(close) = rest.find("): ") {
                let kinds = &rest[..close];
                let p = rest[close + 3..].trim_start_matches("./");
                return p == path && kinds.split([',', '|', ' ']).any(|k| k == kind);
            }
        }
        false
    })
}

/// Runs verify, expects exit 1, the difference line, and the summary line.
fn expect_diff(env: &Env, extra: &[&str], kind: &str, path: &str) -> CmdOut {
    let o = env.verify_out(extra);
    assert_eq!(
        o.code,
        Some(1),
        "verify {extra:?} should report {kind} for {path}\n{}",
        o.describe()
    );
    assert!(
        has_diff(&o.stdout, kind, path),
        "verify {extra:?}: no `{kind}` line for {path:?}\n{}",
        o.describe()
    );
    let last = o.stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("verify: ") && last.contains("difference"),
        "last line should be the `verify: N differences in M entries` summary: {last:?}\n{}",
        o.describe()
    );
    o
}

#[test]
fn verify_identical_trees() {
    let env = fixture();
    let variants: [&[&str]; 2] = [&[], &["--checksum"]];
    for extra in variants {
        let o = env.verify_out(extra);
        assert_eq!(o.code, Some(0), "{}", o.describe());
        let last = o.stdout.lines().last().unwrap_or("");
        assert!(
            last.starts_with("verify: trees are identical"),
            "summary line: {last:?}\n{}",
            o.describe()
        );
        assert!(
            !o.stdout.lines().any(|l| l.starts_with("missing:")
                || l.starts_with("extra:")
                || l.starts_with("differs(")),
            "{}",
            o.describe()
        );
    }
}

#[test]
fn verify_missing_file() {
    let env = fixture();
    remove_file(&env.d("dir/b.txt"));
    copy_mtime(&env.s("dir"), &env.d("dir"));
    expect_diff(&env, &[], "missing", "dir/b.txt");
}

#[test]
fn verify_extra_file() {
    let env = fixture();
    write(&env.d("dir/extra.txt"), b"extra");
    copy_mtime(&env.s("dir"), &env.d("dir"));
    expect_diff(&env, &[], "extra", "dir/extra.txt");
}

#[test]
fn verify_size_difference() {
    let env = fixture();
    write(&env.d("a.txt"), b"alphabet");
    copy_mtime(&env.s("a.txt"), &env.d("a.txt"));
    expect_diff(&env, &[], "size", "a.txt");
}

#[test]
fn verify_content_difference_only_with_checksum() {
    let env = fixture();
    fs::write(env.d("dir/c.bin"), pattern(5000, 3)).expect("rewrite");
    copy_mtime(&env.s("dir/c.bin"), &env.d("dir/c.bin"));
    assert_eq!(
        lmeta(&env.d("dir/c.bin")).len(),
        lmeta(&env.s("dir/c.bin")).len()
    );
    let o = env.verify_out(&[]);
    assert_eq!(
        o.code,
        Some(0),
        "without --checksum same size+mtime must pass\n{}",
        o.describe()
    );
    expect_diff(&env, &["--checksum"], "content", "dir/c.bin");
}

#[test]
fn verify_mode_difference() {
    let env = fixture();
    chmod(&env.d("a.txt"), 0o600);
    expect_diff(&env, &[], "mode", "a.txt");
}

#[test]
fn verify_mtime_difference() {
    let env = fixture();
    let (s, ns) = mtime_of(&env.s("a.txt"));
    set_mtime(&env.d("a.txt"), s, (ns + 1) % 1_000_000_000);
    expect_diff(&env, &[], "mtime", "a.txt");
}

#[test]
fn verify_directory_mtime_difference() {
    let env = fixture();
    set_mtime(&env.d("emptydir"), 1_000_000, 0);
    expect_diff(&env, &[], "mtime", "emptydir");
}

#[test]
fn verify_symlink_target_difference() {
    let env = fixture();
    remove_file(&env.d("link"));
    symlink("b.txt", &env.d("link")); // same length as "a.txt"
    copy_mtime(&env.s("link"), &env.d("link"));
    copy_mtime(&env.src, &env.dst);
    expect_diff(&env, &[], "symlink", "link");
}

#[test]
fn verify_type_difference() {
    let env = fixture();
    remove_file(&env.d("x"));
    mkdirp(&env.d("x"));
    copy_mtime(&env.s("x"), &env.d("x"));
    copy_mtime(&env.src, &env.dst);
    expect_diff(&env, &[], "type", "x");
}

#[test]
fn verify_owner_difference_as_root() {
    if !is_root() {
        eprintln!("verify_owner_difference_as_root: skipped, needs root");
        return;
    }
    let env = fixture();
    lchown(&env.d("a.txt"), 1234, 5678);
    assert_eq!(lmeta(&env.d("a.txt")).uid(), 1234);
    expect_diff(&env, &[], "owner", "a.txt");
    let o = env.verify_out(&["--no-owner"]);
    assert_eq!(
        o.code,
        Some(0),
        "--no-owner must ignore the owner\n{}",
        o.describe()
    );
}

#[test]
fn verify_excludes_apply_to_both_sides() {
    let env = fixture();
    write(&env.d("junk.tmp"), b"junk");
    write(&env.s("dir/src_only.tmp"), b"junk");
    copy_mtime(&env.src, &env.dst);
    copy_mtime(&env.s("dir"), &env.d("dir"));
    expect_diff(&env, &[], "extra", "junk.tmp");
    let o = env.verify_out(&["--exclude", "*.tmp"]);
    assert_eq!(
        o.code,
        Some(0),
        "excluded paths must be ignored\n{}",
        o.describe()
    );
}

#[test]
fn verify_escapes_odd_names() {
    let env = fixture();
    write(&env.src.join(os(b"new\nline")), b"n");
    write(&env.src.join(os(b"bad\xff")), b"b");
    let o = env.verify_out(&[]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stdout.lines().any(|l| l == "missing: new\\nline"),
        "a newline in a name must be escaped as \\n\n{}",
        o.describe()
    );
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("missing: bad") && l.len() > "missing: bad".len()),
        "invalid UTF-8 name not reported\n{}",
        o.describe()
    );
    assert!(
        !o.stdout.lines().any(|l| l == "line"),
        "raw newline leaked into the output\n{}",
        o.describe()
    );
}

#[test]
fn verify_unreadable_root_is_error() {
    let env = Env::new();
    let o = verify_out(&env.root.join("does-not-exist"), &env.dst, &[]);
    assert_eq!(
        o.code,
        Some(2),
        "nonexistent source must exit 2\n{}",
        o.describe()
    );
}

/// `verify --config` compares each local target of a config with its
/// source under the config's excludes and fidelity keys (issue 33: it used
/// to ignore them); `--name` picks one target; an unknown name, and a
/// remote target that cannot be reached, say so and exit 2.
#[test]
fn verify_with_a_config_uses_its_excludes_and_fidelity_keys() {
    let env = fixture();
    let other = env.root.join("dst2");
    clone_tree(&env.src, &other);
    // Left out by the config: an excluded file, and an attribute with
    // `xattrs = false`.
    write(&env.s("dir/scratch.tmp"), b"junk");
    copy_mtime(&env.s("dir"), &env.d("dir"));
    copy_mtime(&env.s("dir"), &other.join("dir"));
    let attr = std::process::Command::new("setfattr")
        .args(["-n", "user.note", "-v", "1"])
        .arg(env.s("a.txt"))
        .status();
    assert!(attr.is_ok_and(|s| s.success()), "setfattr");
    let toml = format!(
        "source = {}\nstate_dir = {}\nexclude = [\"*.tmp\"]\nxattrs = false\n\n\
         [[target]]\nname = \"one\"\npath = {}\n\n[[target]]\nname = \"two\"\npath = {}\n",
        toml_str(&env.src),
        toml_str(&env.state),
        toml_str(&env.dst),
        toml_str(&other)
    );
    let cfg = env.write_config(&toml);
    let run = |extra: &[&str]| {
        let mut args: Vec<OsString> = vec!["verify".into(), "--config".into(), cfg.clone().into()];
        args.extend(extra.iter().map(OsString::from));
        drmirror(&args, secs(60))
    };
    let o = run(&["--checksum"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.contains("target one (") && o.stdout.contains("target two ("));
    // Without the config, both differences count.
    assert_eq!(env.verify_out(&[]).code, Some(1));
    // A real difference in one target: found, with --name too.
    write(&other.join("x"), b"changed on the DR side");
    let o = run(&[]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(has_diff(&o.stdout, "size", "x"), "{}", o.describe());
    assert_eq!(run(&["--name", "one"]).code, Some(0));
    assert_eq!(run(&["--name", "two"]).code, Some(1));
    let o = run(&["--name", "three"]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(o.stderr.contains("no target named \"three\"") && o.stderr.contains("one, two"));
    // A remote target that cannot be reached: said, exit 2.
    let token = env.root.join("token");
    write(&token, b"secret");
    let remote = env.write_config(&format!(
        "source = {}\nstate_dir = {}\n\n[[target]]\nname = \"far\"\npath = \"tcp://127.0.0.1:9/srv/dr\"\ntoken_file = {}\n",
        toml_str(&env.src),
        toml_str(&env.state),
        toml_str(&token)
    ));
    let o = drmirror(
        &["verify".into(), "--config".into(), remote.into_os_string()],
        secs(60),
    );
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(
        o.stderr.contains("cannot reach tcp://127.0.0.1:9/srv/dr"),
        "{}",
        o.describe()
    );
}

/// The difference lines of a verify output (its summary left out).
fn difference_lines(stdout: &str) -> Vec<String> {
    let mut v: Vec<String> = stdout
        .lines()
        .filter(|l| !l.starts_with("verify: ") && !l.starts_with("target "))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// `verify --config` of a remote target (issue 33): through the receiver,
/// identical trees are reported identical, and each kind of difference
/// local verify finds (missing, extra, size, mode, mtime, and content with
/// `--checksum`, hashed on the DR side) is found the same.
fn verify_remote(env: &Env, target_toml: &str) {
    let cfg = env.write_config(&format!(
        "source = {}\nstate_dir = {}\n\n{target_toml}",
        toml_str(&env.src),
        toml_str(&env.state),
    ));
    let run = |extra: &[&str]| {
        let mut args: Vec<OsString> = vec!["verify".into(), "--config".into(), cfg.clone().into()];
        args.extend(extra.iter().map(OsString::from));
        drmirror(&args, secs(120))
    };
    for extra in [&[][..], &["--checksum"][..]] {
        let o = run(extra);
        assert_eq!(o.code, Some(0), "{extra:?}: {}", o.describe());
        assert!(
            o.stdout.contains("verify: trees are identical"),
            "{}",
            o.describe()
        );
    }
    // One difference of each kind.
    remove_file(&env.d("x"));
    write(&env.d("dir/extra.txt"), b"extra");
    copy_mtime(&env.src, &env.dst);
    write(&env.d("a.txt"), b"alphabet");
    copy_mtime(&env.s("a.txt"), &env.d("a.txt"));
    chmod(&env.d("dir/b.txt"), 0o600);
    set_mtime(&env.d("dir/c.bin"), 1_600_000_000, 7);
    // Content alone: same size and mtime, one byte changed.
    let victim = env.d("dir/c2.bin");
    write(&env.s("dir/c2.bin"), &pattern(3000, 9));
    let mut changed = pattern(3000, 9);
    changed[100] ^= 0x55;
    write(&victim, &changed);
    copy_mtime(&env.s("dir/c2.bin"), &victim);
    copy_mtime(&env.s("dir"), &env.d("dir"));
    let local = env.verify_out(&["--checksum"]);
    let remote = run(&["--checksum"]);
    assert_eq!(remote.code, Some(1), "{}", remote.describe());
    for (kind, path) in [
        ("missing", "x"),
        ("extra", "dir/extra.txt"),
        ("size", "a.txt"),
        ("mode", "dir/b.txt"),
        ("mtime", "dir/c.bin"),
        ("content", "dir/c2.bin"),
    ] {
        assert!(
            has_diff(&remote.stdout, kind, path),
            "remote verify: no `{kind}` line for {path}\n{}",
            remote.describe()
        );
    }
    assert_eq!(
        difference_lines(&remote.stdout),
        difference_lines(&local.stdout),
        "remote and local verify disagree\nremote:\n{}\nlocal:\n{}",
        remote.describe(),
        local.describe()
    );
    // Without --checksum the content difference is not seen.
    let o = run(&[]);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        !has_diff(&o.stdout, "content", "dir/c2.bin"),
        "{}",
        o.describe()
    );
}

#[test]
fn verify_a_tcp_target() {
    let env = fixture();
    let tcp = Tcp::new(&env);
    let _r = tcp.receiver(&env, &[]);
    verify_remote(&env, &tcp.target_toml(&env));
}

#[test]
fn verify_an_ssh_target() {
    let env = fixture();
    let Some(sshd) = crate::remote::Sshd::start(&env.root) else {
        return;
    };
    verify_remote(&env, &sshd.target_toml("dr", &env.dst, ""));
}
