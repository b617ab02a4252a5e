//! The background scrub (`scrub_interval`): a target changed behind
//! drmirror's back, with nothing on the source to capture, is found,
//! counted and repaired.

use crate::util::*;
use std::fs;

/// Plants six kinds of divergence in a quiet mirror (a file removed, a file
/// rewritten, an extra file, a directory's mode, a directory removed, a
/// symlink's text) and waits until the scrub has put each right, saying so
/// in the log, in `status` and in its metrics. Before that, passes over the
/// same mirror found nothing.
fn a_planted_divergence_is_found_counted_and_repaired(remote: bool) {
    let env = Env::new();
    write(&env.s("a/f1"), b"one");
    write(&env.s("a/f2"), b"two");
    write(&env.s("b/sub/g"), b"g");
    symlink("a/f1", &env.s("link"));
    mkdirp(&env.s("c"));
    let port = free_port();
    let top = format!("metrics_listen = \"127.0.0.1:{port}\"\nscrub_interval = \"1s\"\n");
    let tcp = remote.then(|| Tcp::new(&env));
    let receiver = tcp.as_ref().map(|t| t.receiver(&env, &[]));
    let d = match &tcp {
        None => env.spawn_config(&env.config_text(&top)),
        Some(t) => env.spawn_config(&format!(
            "source = {}\nstate_dir = {}\n{top}{}",
            toml_str(&env.src),
            toml_str(&env.state),
            t.target_toml(&env)
        )),
    };
    d.wait_log("drmirror ready", secs(60));
    env.converge(&["--checksum"], &d);
    // Passes over the converged mirror find nothing (two, so that one
    // whole pass ran after the copies were confirmed).
    wait_until(
        "two scrub passes over the mirror",
        secs(60),
        Some(&d),
        || d.log().matches("scrub pass done").count() >= 2,
    );
    assert!(
        !d.log().contains("diverged from the source"),
        "{}",
        d.log_tail()
    );

    fs::remove_file(env.d("a/f1")).expect("rm target a/f1");
    write(&env.d("a/f2"), b"changed on the DR side");
    write(&env.d("extra"), b"only on the target");
    chmod(&env.d("b"), 0o700);
    remove_dir_all(&env.d("b/sub"));
    remove_file(&env.d("link"));
    symlink("elsewhere", &env.d("link"));
    // Only the text differs.
    copy_mtime(&env.s("link"), &env.d("link"));
    // Each removal or addition on the target also moved its directory's
    // mtime: `a` diverged too (`b` differs anyway; the root's own
    // attributes are not compared, by the scrub as by verify).
    let found = [
        "at a (metadata)",
        "at a/f1 (missing)",
        "at a/f2 (metadata)",
        "at extra (extra)",
        "at b (metadata)",
        "at b/sub (missing)",
        "at link (symlink)",
    ];
    wait_until(
        "the scrub finds the seven divergences",
        secs(90),
        Some(&d),
        || {
            let log = d.log();
            found.iter().all(|f| log.contains(f))
        },
    );
    env.converge(&["--checksum"], &d);
    let st = status_json(&env.state);
    assert_eq!(st["targets"][0]["scrub_divergences"], 7, "{st}");
    let text = http_get(port, "/metrics").unwrap_or_default();
    assert_eq!(
        metric(&text, "drmirror_scrub_divergences_total"),
        7.0,
        "{text}"
    );
    assert!(
        metric(&text, "drmirror_scrub_passes_total") >= 2.0,
        "{text}"
    );
    // Repaired for good: later passes find nothing more.
    let passes = d.log().matches("scrub pass done").count();
    wait_until("two more scrub passes", secs(60), Some(&d), || {
        d.log().matches("scrub pass done").count() >= passes + 2
    });
    assert_eq!(d.log().matches("diverged from the source").count(), 7);
    d.terminate();
    if let Some(r) = receiver {
        r.terminate();
    }
}

#[test]
fn a_planted_divergence_is_found_counted_and_repaired_locally() {
    a_planted_divergence_is_found_counted_and_repaired(false)
}

#[test]
fn a_planted_divergence_is_found_counted_and_repaired_over_tcp() {
    a_planted_divergence_is_found_counted_and_repaired(true)
}

/// With `special_files = false` a FIFO stays out of the mirror, and no
/// part of the daemon takes that for a difference to mend: no scrub pass
/// counts it a divergence (before, one every pass, each requeued in vain),
/// and a restart's compare does not send it again.
#[test]
fn a_kind_the_target_does_not_keep_is_no_divergence() {
    let env = Env::new();
    write(&env.s("a/f"), b"f");
    mkfifo(&env.s("a/fifo"));
    let made = std::time::Instant::now();
    let toml = env
        .config_text("scrub_interval = \"1s\"\nspecial_files = false\nmetrics_listen = \"off\"\n");
    let d = env.spawn_config(&toml);
    d.wait_log("drmirror ready", secs(60));
    env.converge(&["--checksum", "--no-special-files"], &d);
    assert!(fs::symlink_metadata(env.d("a/fifo")).is_err());
    // The scrub judges only an entry still for its settle time: wait for
    // that to pass (a deliberate passage of time), then two whole passes.
    let settled = drmirror::scrub::SETTLE + secs(1);
    wait_until("the FIFO to settle", secs(60), Some(&d), || {
        made.elapsed() > settled
    });
    let passes = d.log().matches("scrub pass done").count();
    wait_until("two scrub passes after it", secs(60), Some(&d), || {
        d.log().matches("scrub pass done").count() >= passes + 2
    });
    assert!(
        !d.log().contains("diverged from the source"),
        "{}",
        d.log_tail()
    );
    d.terminate();
    let d = env.spawn_config(&toml);
    d.wait_log("startup scan done", secs(60));
    let log = d.log();
    let line = log.lines().find(|l| l.contains("startup scan done"));
    assert!(
        line.is_some_and(|l| l.contains(" differing=0 ")),
        "{}",
        d.log_tail()
    );
    d.terminate();
}

#[test]
fn a_bad_scrub_interval_is_refused_naming_the_key() {
    let env = Env::new();
    for bad in ["\"10ms\"", "\"soon\""] {
        let cfg = env.write_config(&env.config_text(&format!("scrub_interval = {bad}")));
        let o = drmirror(
            &["run".into(), "--config".into(), cfg.into_os_string()],
            secs(30),
        );
        assert_eq!(o.code, Some(2), "{}", o.describe());
        assert!(o.all().contains("scrub_interval"), "{}", o.describe());
    }
}
