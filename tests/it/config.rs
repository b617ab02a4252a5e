//! Configuration and usage errors: exit code 2 and one line on stderr naming
//! the field; a complete valid config file runs.

use crate::util::*;
use std::ffi::OsString;
use std::path::Path;

fn run_config_file(env: &Env, toml: &str) -> CmdOut {
    let p = env.write_config(toml);
    drmirror(
        &[
            OsString::from("run"),
            OsString::from("--config"),
            p.into_os_string(),
        ],
        secs(30),
    )
}

fn run_cli(args: &[&str]) -> CmdOut {
    let a: Vec<OsString> = args.iter().map(OsString::from).collect();
    drmirror(&a, secs(30))
}

/// Exit 2, exactly one non-empty line on stderr, prefixed
/// `drmirror: config error:`, containing `field`.
fn assert_config_error(out: &CmdOut, field: &str, toml: &str) {
    assert_eq!(
        out.code,
        Some(2),
        "expected exit code 2 for an invalid config (field {field:?})\nconfig:\n{toml}\n{}",
        out.describe()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr, got {}:\n{}\nconfig:\n{toml}",
        lines.len(),
        out.stderr
    );
    assert!(
        lines[0].contains("drmirror: config error:"),
        "stderr line lacks the `drmirror: config error:` prefix: {:?}",
        lines[0]
    );
    assert!(
        lines[0].contains(field),
        "stderr line does not name the field {field:?}: {:?}",
        lines[0]
    );
}

fn p(path: &Path) -> String {
    toml_str(path)
}

#[test]
fn config_unknown_key() {
    let env = Env::new();
    let toml = format!("sorce = {}\n{}", p(&env.src), env.config_text(""));
    assert_config_error(&run_config_file(&env, &toml), "sorce", &toml);
}

#[test]
fn config_unknown_key_in_target_table() {
    let env = Env::new();
    let toml = format!("{}pth = {}\n", env.config_text(""), p(&env.dst));
    assert_config_error(&run_config_file(&env, &toml), "pth", &toml);
}

#[test]
fn config_unknown_key_in_backlog_table() {
    let env = Env::new();
    let toml = format!(
        "source = {}\nstate_dir = {}\n[backlog]\nmax_entires = 5\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&env.state),
        p(&env.dst)
    );
    assert_config_error(&run_config_file(&env, &toml), "max_entires", &toml);
}

#[test]
fn config_wrong_type_delete() {
    let env = Env::new();
    let toml = env.config_text("delete = 3");
    assert_config_error(&run_config_file(&env, &toml), "delete", &toml);
}

#[test]
fn config_bad_delete_value() {
    let env = Env::new();
    let toml = env.config_text("delete = \"sometimes\"");
    assert_config_error(&run_config_file(&env, &toml), "delete", &toml);
}

#[test]
fn config_bad_delay() {
    let env = Env::new();
    let toml = env.config_text("delay = \"soon\"");
    assert_config_error(&run_config_file(&env, &toml), "delay", &toml);
}

#[test]
fn config_bad_watch() {
    let env = Env::new();
    let toml = env.config_text("watch = \"telepathy\"");
    assert_config_error(&run_config_file(&env, &toml), "watch", &toml);
}

#[test]
fn config_missing_source_dir() {
    let env = Env::new();
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.root.join("does-not-exist")),
        p(&env.state),
        p(&env.dst)
    );
    assert_config_error(&run_config_file(&env, &toml), "source", &toml);
}

#[test]
fn config_source_key_absent() {
    let env = Env::new();
    let toml = format!(
        "state_dir = {}\n[[target]]\npath = {}\n",
        p(&env.state),
        p(&env.dst)
    );
    assert_config_error(&run_config_file(&env, &toml), "source", &toml);
}

#[test]
fn config_source_is_a_file() {
    let env = Env::new();
    let file = env.root.join("plain-file");
    write(&file, b"not a directory");
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&file),
        p(&env.state),
        p(&env.dst)
    );
    assert_config_error(&run_config_file(&env, &toml), "source", &toml);
}

#[test]
fn config_target_inside_source() {
    let env = Env::new();
    mkdirp(&env.s("inner"));
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&env.state),
        p(&env.s("inner"))
    );
    assert_config_error(&run_config_file(&env, &toml), "target", &toml);
}

/// A target reachable inside the source through a bind mount would have
/// its copies copied again, without end; a target that shows the source
/// would have the mirror written into the source; a state dir visible in
/// the source would be mirrored while it changes. Each is refused like its
/// plain-path form.
#[test]
fn config_target_or_state_reachable_through_a_bind_mount() {
    let env = Env::new();
    mkdirp(&env.dst);
    let Some(_g1) = bind_mount(&env.dst, &env.s("mirror")) else {
        return;
    };
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&env.state),
        p(&env.dst)
    );
    let out = run_config_file(&env, &toml);
    assert_config_error(&out, "target", &toml);
    assert!(
        out.stderr.contains("a mount") && out.stderr.contains("mirror"),
        "{}",
        out.describe()
    );

    let shows = env.root.join("shows-source");
    let Some(_g2) = bind_mount(&env.src, &shows.join("view")) else {
        return;
    };
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&env.state),
        p(&shows)
    );
    let out = run_config_file(&env, &toml);
    assert_config_error(&out, "target", &toml);
    assert!(
        out.stderr.contains("shows the source"),
        "{}",
        out.describe()
    );

    let state = env.root.join("state-elsewhere");
    mkdirp(&state);
    let Some(_g3) = bind_mount(&state, &env.s("state-view")) else {
        return;
    };
    let other = env.root.join("other-target");
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&state),
        p(&other)
    );
    assert_config_error(&run_config_file(&env, &toml), "state_dir", &toml);
}

#[test]
fn config_state_dir_inside_source() {
    let env = Env::new();
    mkdirp(&env.s(".state"));
    let toml = format!(
        "source = {}\nstate_dir = {}\n[[target]]\npath = {}\n",
        p(&env.src),
        p(&env.s(".state")),
        p(&env.dst)
    );
    assert_config_error(&run_config_file(&env, &toml), "state_dir", &toml);
}

#[test]
fn config_malformed_toml() {
    let env = Env::new();
    let toml = format!("source = \"{}\n[[target]\npath = ", env.src.display());
    let out = run_config_file(&env, &toml);
    assert_eq!(out.code, Some(2), "malformed TOML\n{}", out.describe());
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr:\n{}",
        out.stderr
    );
    assert!(
        lines[0].contains("drmirror: config error:"),
        "{:?}",
        lines[0]
    );
}

#[test]
fn config_file_missing() {
    let env = Env::new();
    let out = drmirror(
        &[
            OsString::from("run"),
            OsString::from("--config"),
            env.root.join("nope.toml").into_os_string(),
        ],
        secs(30),
    );
    assert_eq!(out.code, Some(2), "missing config file\n{}", out.describe());
}

#[test]
fn cli_run_without_source_is_usage_error() {
    let env = Env::new();
    let dst = env.dst.to_str().unwrap();
    let out = run_cli(&["run", "--target", dst]);
    assert_eq!(
        out.code,
        Some(2),
        "run without --source\n{}",
        out.describe()
    );
    let out = run_cli(&["run"]);
    assert_eq!(
        out.code,
        Some(2),
        "run without arguments\n{}",
        out.describe()
    );
}

#[test]
fn cli_bad_delete_value_is_usage_error() {
    let env = Env::new();
    let (src, dst, st) = (
        env.src.to_str().unwrap(),
        env.dst.to_str().unwrap(),
        env.state.to_str().unwrap(),
    );
    let out = run_cli(&[
        "run", "--source", src, "--target", dst, "--state", st, "--delete", "maybe",
    ]);
    assert_eq!(out.code, Some(2), "--delete maybe\n{}", out.describe());
}

#[test]
fn cli_target_inside_source_is_config_error() {
    let env = Env::new();
    mkdirp(&env.s("inner"));
    let inner_path = env.s("inner");
    let (src, inner, st) = (
        env.src.to_str().unwrap(),
        inner_path.to_str().unwrap(),
        env.state.to_str().unwrap(),
    );
    let out = run_cli(&["run", "--source", src, "--target", inner, "--state", st]);
    assert_eq!(
        out.code,
        Some(2),
        "target inside source via CLI\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("target"),
        "stderr should name the target: {}",
        out.stderr
    );
}

#[test]
fn cli_missing_source_dir_is_config_error() {
    let env = Env::new();
    let nope = env.root.join("nope");
    let (src, dst, st) = (
        nope.to_str().unwrap(),
        env.dst.to_str().unwrap(),
        env.state.to_str().unwrap(),
    );
    let out = run_cli(&["run", "--source", src, "--target", dst, "--state", st]);
    assert_eq!(
        out.code,
        Some(2),
        "nonexistent source via CLI\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("source"),
        "stderr should name the source: {}",
        out.stderr
    );
}

#[test]
fn cli_unknown_subcommand_is_usage_error() {
    let out = run_cli(&["frobnicate"]);
    assert_eq!(out.code, Some(2), "unknown subcommand\n{}", out.describe());
}

/// Every documented key, two targets (one named), excludes via the file.
#[test]
fn config_complete_file_runs() {
    let env = Env::new();
    let dst2 = env.root.join("dst2");
    write(&env.s("pre.txt"), b"pre");
    write(&env.s("skip.tmp"), b"excluded");
    let toml = format!(
        r#"source = {src}
state_dir = {state}
exclude = ["*.tmp", "cache/"]
delete = true
delay = "50ms"
watch = "inotify"

[backlog]
max_entries = 1000000
max_bytes = 1073741824

[[target]]
name = "dr1"
path = {dst}

[[target]]
path = {dst2}
"#,
        src = p(&env.src),
        state = p(&env.state),
        dst = p(&env.dst),
        dst2 = p(&dst2)
    );
    let d = env.spawn_config(&toml);
    d.wait_ready();
    d.wait_log("target=dr1", secs(60));
    write(&env.s("live.txt"), b"live");
    write(&env.s("cache/c"), b"excluded");
    let ex = ["--exclude", "*.tmp", "--exclude", "cache/"];
    env.converge(&ex, &d);
    wait_converged(&env.src, &dst2, &ex, Some(&d));
    for t in [&env.dst, &dst2] {
        assert_eq!(read(&t.join("live.txt")), b"live");
        assert_eq!(read(&t.join("pre.txt")), b"pre");
        assert!(
            !exists(&t.join("skip.tmp")),
            "excluded file copied to {}",
            t.display()
        );
        assert!(
            !exists(&t.join("cache")),
            "excluded dir copied to {}",
            t.display()
        );
    }
    d.terminate();
}

/// The README's example configuration (also the package's
/// `examples/drmirror.toml`) is valid, once its paths are this machine's.
#[test]
fn readme_example_config_is_valid() {
    let env = Env::new();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let example: String = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|r| r.split("\n```").next())
        .expect("a ```toml block in the README")
        .to_string();
    let token = env.root.join("token");
    write(&token, b"secret");
    let toml = example
        .replace("\"/data\"", &toml_str(&env.src))
        .replace("\"/var/lib/drmirror/data\"", &toml_str(&env.state))
        .replace("\"/mnt/dr/data\"", &toml_str(&env.dst))
        .replace("\"/etc/drmirror/dr3.token\"", &toml_str(&token));
    assert_ne!(
        toml, example,
        "the example's paths changed: update this test"
    );
    if let Err(e) = drmirror::config::Config::from_toml(&toml, "README example") {
        panic!("the README's example config is invalid: {e}\n{toml}");
    }
}
