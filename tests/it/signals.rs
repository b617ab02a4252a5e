//! Honest signals (issue 32): the lag never reads below the truth.

use crate::util::*;
use std::time::Instant;

const DIRS: usize = 2000;

/// Kills (or stops) an in-sync daemon, changes a file in each of 2,000
/// directories while it is down, starts it again and scrapes its lag every
/// 50 ms: every scrape taken while any of those changes is still missing
/// on the target reads at least the time since the daemon went down. (The
/// restart's scan finds them; before, the lag read 0 until it had.)
fn the_lag_after_a_restart_counts_from_the_outage(kill: bool) {
    let env = Env::new();
    for i in 0..DIRS {
        write(&env.s(format!("t/d{i:04}/f")), b"before");
    }
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = env.start(&["--metrics", &metrics]);
    env.converge(&[], &d);
    if kill {
        d.kill9();
    } else {
        d.terminate();
    }
    // Gone: every change from now on is one it did not capture.
    let down = Instant::now();
    let big = pattern(32 << 10, 5);
    for i in 0..DIRS {
        write(&env.s(format!("t/d{i:04}/changed")), &big);
    }
    // The outage lasts a few seconds.
    std::thread::sleep(secs(3));
    let d = env.spawn(&["--metrics", &metrics]);
    let missing = || {
        (0..DIRS)
            .filter(|i| !env.d(format!("t/d{i:04}/changed")).exists())
            .count()
    };
    let (mut checked, mut lowest_margin) = (0, f64::MAX);
    loop {
        let at = down.elapsed().as_secs_f64();
        let Some(text) = http_get(port, "/metrics") else {
            assert!(d.is_running(), "{}", d.log_tail());
            std::thread::sleep(ms(50));
            continue;
        };
        let lag = metric(&text, "drmirror_replication_lag_seconds{");
        // Checked after the scrape: missing now means missing then.
        let left = missing();
        if left == 0 {
            break;
        }
        checked += 1;
        lowest_margin = lowest_margin.min(lag - at);
        assert!(
            lag >= at,
            "lag {lag:.2} s while {left} changes made less than {at:.2} s ago are missing\n{}",
            d.log_tail()
        );
        assert!(
            down.elapsed() < secs(120),
            "not converged\n{}",
            d.log_tail()
        );
        std::thread::sleep(ms(50));
    }
    eprintln!("{checked} scrapes while changes were missing; lag - time since down >= {lowest_margin:.2} s");
    assert!(checked > 0, "the target caught up before the first scrape");
    env.converge(&[], &d);
    d.terminate();
}

#[test]
fn the_lag_after_a_kill_counts_from_the_kill() {
    the_lag_after_a_restart_counts_from_the_outage(true);
}

#[test]
fn the_lag_after_a_clean_stop_counts_from_the_stop() {
    the_lag_after_a_restart_counts_from_the_outage(false);
}

/// `status` as a monitoring plugin: OK (0) in sync; WARNING (1) while a
/// path fails (a file rewritten without pause), naming the last error and
/// its age; OK again once it is through, the error marked resolved. (A
/// target down is CRITICAL (2) and no daemon UNKNOWN (3): `ops` tests.)
#[test]
fn status_says_ok_or_warning_and_when_an_error_was_resolved() {
    use std::sync::atomic::AtomicBool;
    let env = Env::new();
    write(&env.s("hot.log"), &pattern(1 << 20, 3));
    let d = env.start(&["--metrics", "off"]);
    env.converge(&[], &d);
    let ask = || status(&env.state, &["--warn-lag", "1000", "--max-lag", "2000"]);
    let o = ask();
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert!(o.stdout.starts_with("DRMIRROR OK: "), "{}", o.describe());
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let _stop = StopOnDrop(&stop);
        let (hot, stop) = (env.s("hot.log"), &stop);
        sc.spawn(move || rewrite_without_pause(&hot, stop));
        wait_until(
            "status warns of the failing path",
            secs(60),
            Some(&d),
            || {
                let o = ask();
                o.code == Some(1)
                    && o.stdout.starts_with("DRMIRROR WARNING: target ")
                    && o.stdout.contains("path(s) failing")
                    && o.stdout.contains("s ago): source hot.log kept changing")
            },
        );
    });
    env.converge(&["--checksum"], &d);
    wait_until(
        "status is OK with the error resolved",
        secs(60),
        Some(&d),
        || {
            let o = ask();
            o.code == Some(0)
                && o.stdout.contains(" ago, resolved ")
                && o.stdout.contains("hot.log")
        },
    );
    let v = status_json(&env.state);
    let t = &v["targets"][0];
    assert!(
        t["last_error_unix"].as_f64() <= t["last_error_resolved_unix"].as_f64(),
        "{v}"
    );
    d.terminate();
}

/// Waits until `status` shows the first target's last error containing
/// every one of `want`, and says CRITICAL (the target is down).
fn wait_last_error(env: &Env, d: &Daemon, want: &[&str]) -> String {
    let mut seen = String::new();
    wait_until(
        "status names why the target is down",
        secs(60),
        Some(d),
        || {
            let o = status(&env.state, &["--json"]);
            let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap_or_default();
            seen = v["targets"][0]["last_error"]
                .as_str()
                .unwrap_or("")
                .to_string();
            o.code == Some(2) && want.iter().all(|w| seen.contains(w))
        },
    );
    seen
}

/// A `tcp://` target whose receiver is not running: `status` (and its
/// exit code) says the target is down and why, the connection refused.
#[test]
fn a_refused_tcp_connection_is_named_in_status() {
    let env = Env::new();
    write(&env.s("f"), b"to ship");
    let tcp = Tcp::new(&env);
    let d = crate::remote::start_config(
        &env,
        &crate::remote::config(&env, &tcp.target_toml(&env), ""),
    );
    let e = wait_last_error(&env, &d, &["cannot reach tcp://", "Connection refused"]);
    eprintln!("last_error: {e}");
    d.terminate();
}

/// An `ssh://` target whose key the DR host does not accept: `status` and
/// the log say that authentication failed and what to check, from ssh's own
/// words (not a guess that drmirror is missing over there), and ssh's
/// lines are not prefixed twice.
#[test]
fn an_ssh_authentication_failure_is_named_in_status() {
    let env = Env::new();
    let Some(sshd) = crate::remote::Sshd::start(&env.root) else {
        return;
    };
    write(&env.s("f"), b"to ship");
    let other = env.root.join("not_authorized_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let toml = sshd
        .target_toml("dr", &env.dst, "")
        .lines()
        .map(|l| {
            if l.starts_with("ssh_identity") {
                format!("ssh_identity = {}", toml_str(&other))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let d = crate::remote::start_config(&env, &crate::remote::config(&env, &toml, ""));
    let e = wait_last_error(&env, &d, &["Permission denied", "authentication failed"]);
    eprintln!("last_error: {e}");
    let log = d.log();
    assert!(!log.contains("ssh: ssh: "), "{}", d.log_tail());
    assert!(!log.contains("is drmirror installed"), "{}", d.log_tail());
    d.terminate();
}

/// Under systemd (`JOURNAL_STREAM` set) each line carries its syslog
/// priority for journald: `<6>` info, `<4>` a warning, `<3>` an error (here
/// the metrics port taken: logged, and mirroring goes on).
#[test]
fn under_systemd_each_log_line_carries_its_priority() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let d = env.start_env(&["--metrics", &addr], &[("JOURNAL_STREAM", "8:12345")]);
    let log = d.log();
    let prio = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{log}"))
            .get(..3)
            .map(str::to_string)
    };
    assert_eq!(prio("drmirror ready").as_deref(), Some("<6>"), "{log}");
    assert_eq!(
        prio("cannot start the metrics endpoint").as_deref(),
        Some("<3>"),
        "{log}"
    );
    assert!(
        log.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('<')),
        "a line without its priority:\n{log}"
    );
    d.terminate();
}

/// `--log-format json` (`log_format = "json"`): one JSON object per line,
/// with its level and message, for log shippers.
#[test]
fn json_logs_are_one_object_per_line() {
    let env = Env::new();
    write(&env.s("f"), b"x");
    let d = env.start_env(&["--log-format", "json"], &[]);
    env.converge(&[], &d);
    d.terminate();
    let log = d.log();
    let mut ready = false;
    for l in log.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "no level: {l}");
        ready |= v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("drmirror ready"));
    }
    assert!(ready, "no ready line:\n{log}");
}

/// `drmirror status --config FILE` run from a shell finds a daemon that
/// runs as `drmirror@INSTANCE` under systemd, whose `StateDirectory=`
/// (`STATE_DIRECTORY`, which the shell lacks) chose its state directory:
/// `/var/lib/drmirror/INSTANCE`, INSTANCE being the config file's stem.
#[test]
fn status_finds_the_state_directory_a_unit_was_given() {
    if !is_root() {
        eprintln!("SKIP: the test uses /var/lib/drmirror, which needs root");
        return;
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            // And the parent, if this test made it (only if empty).
            let _ = std::fs::remove_dir(drmirror::status::SYSTEMD_STATE_ROOT);
        }
    }
    let env = Env::new();
    write(&env.s("f"), b"x");
    let instance = env
        .root
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| format!("test-{n}"))
        .expect("a temp dir name");
    let state = std::path::Path::new("/var/lib/drmirror").join(&instance);
    let _cleanup = Remove(state.clone());
    mkdirp(&state);
    let cfg = env.root.join(format!("{instance}.toml"));
    write(
        &cfg,
        format!(
            "source = {}\nmetrics_listen = \"off\"\n[[target]]\npath = {}\n",
            toml_str(&env.src),
            toml_str(&env.dst)
        )
        .as_bytes(),
    );
    // Through env(1): the harness keeps STATE_DIRECTORY out of daemons.
    let mut cmd = std::process::Command::new("env");
    cmd.arg(format!("STATE_DIRECTORY={}", state.display()))
        .arg(bin())
        .arg("run")
        .arg("--config")
        .arg(&cfg);
    let d = Daemon::spawn_command(cmd, &env.root);
    d.wait_log("drmirror ready", secs(60));
    assert!(
        state.join("status.sock").exists(),
        "the daemon did not use STATE_DIRECTORY\n{}",
        d.log_tail()
    );
    let o = drmirror(
        &[
            std::ffi::OsString::from("status"),
            "--config".into(),
            cfg.clone().into_os_string(),
        ],
        secs(20),
    );
    assert!(
        matches!(o.code, Some(0..=2)) && o.stdout.contains("target"),
        "status --config did not find the daemon\n{}",
        o.describe()
    );
    d.terminate();
}
