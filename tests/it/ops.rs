//! Operations: `drmirror status`, the Prometheus endpoint scraped by a real
//! Prometheus, the shipped alert rules (promtool) and systemd units.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Instant;

fn target0(v: &serde_json::Value) -> &serde_json::Value {
    &v["targets"][0]
}

#[test]
fn status_without_daemon_is_an_error() {
    let env = Env::new();
    let o = status(&env.state, &["--json"]);
    // UNKNOWN, as a monitoring plugin says it.
    assert_eq!(o.code, Some(3), "{}", o.describe());
    assert!(
        o.stderr.contains("no drmirror is running"),
        "{}",
        o.describe()
    );
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.describe());
}

struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(scrape_port: u16) -> Option<Prometheus> {
    let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let dir = tempfile::Builder::new()
        .prefix("prom")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: drmirror\n    static_configs:\n      - targets: ['127.0.0.1:{scrape_port}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
        .spawn()
        .expect("start prometheus");
    Some(Prometheus {
        child,
        port,
        _dir: dir,
    })
}

/// The value of `drmirror_replication_lag_seconds` as Prometheus has it.
fn prom_lag(p: &Prometheus) -> Option<f64> {
    let body = http_get(
        p.port,
        "/api/v1/query?query=drmirror_replication_lag_seconds",
    )?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let s = v["data"]["result"][0]["value"][1].as_str()?;
    s.parse().ok()
}

/// One daemon run through three states: in sync, target down with a
/// backlog, caught up again — checked through `drmirror status --json` and
/// through a real Prometheus scraping the daemon.
#[test]
fn status_and_prometheus_follow_an_outage() {
    if !is_root() {
        eprintln!("status_and_prometheus_follow_an_outage: skipped, needs root (runs the daemon as nobody)");
        return;
    }
    let env = Env::new();
    write(&env.s("before"), b"before");
    chown_r(&env.root, NOBODY.0, NOBODY.1);
    let mport = free_port();
    let prom = start_prometheus(mport);
    if prom.is_none() {
        panic!(
            "prometheus is not installed: tools/install-deps installs Debian's prometheus package"
        );
    }
    let prom = prom.expect("checked");
    let maddr = format!("127.0.0.1:{mport}");
    let bin = env.bin_for_other_user();
    let d = Daemon::spawn(
        &env.run_args(&["--metrics", &maddr]),
        &env.root,
        Some(NOBODY),
        Some(&bin),
    );
    d.wait_ready();
    env.converge(&[], &d);

    // 1. In sync.
    wait_until(
        "status reports the initial sync done",
        secs(30),
        Some(&d),
        || target0(&status_json(&env.state))["initial_sync_done"] == true,
    );
    // The lag comes from the clock and the backlog from its last count: a
    // change the initial sync requeued may still be in flight for a moment.
    wait_until("in sync: no lag, no backlog", secs(30), Some(&d), || {
        let v = status_json(&env.state);
        target0(&v)["lag_seconds"] == 0.0 && target0(&v)["backlog_entries"] == 0
    });
    let v = status_json(&env.state);
    let t = target0(&v);
    assert_eq!(t["lag_seconds"], 0.0, "{v}");
    assert_eq!(t["backlog_entries"], 0, "{v}");
    assert_eq!(t["up"], true, "{v}");
    assert_eq!(v["capture_backend"], "inotify", "{v}");
    assert_eq!(status(&env.state, &["--max-lag", "5"]).code, Some(0));
    let metrics = http_get(mport, "/metrics").unwrap_or_default();
    for name in [
        "drmirror_replication_lag_seconds",
        "drmirror_backlog_entries",
        "drmirror_target_up",
        "drmirror_build_info",
        "drmirror_capture_info",
        "drmirror_applied_total",
        "drmirror_initial_sync_done_files",
        "drmirror_initial_sync_total_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }

    // 2. Target down (not writable for the daemon's user), changes pile up.
    // Owned by root as well: the daemon mirrors the root directory's mode
    // and, as its owner, would simply make it writable again.
    lchown(&env.dst, 0, 0);
    chmod(&env.dst, 0o555);
    for i in 0..20 {
        let p = env.s(format!("during-{i}"));
        write(&p, format!("written while down {i}").as_bytes());
        // The daemon runs as nobody and cannot give files away.
        lchown(&p, NOBODY.0, NOBODY.1);
    }
    wait_until(
        "status shows the target down with a backlog",
        secs(60),
        Some(&d),
        || {
            let v = status_json(&env.state);
            let t = target0(&v);
            t["up"] == false
                && t["backlog_entries"].as_u64().unwrap_or(0) >= 20
                && t["lag_seconds"].as_f64().unwrap_or(0.0) > 1.0
        },
    );
    let o = status(&env.state, &["--max-lag", "0.5"]);
    assert_eq!(
        o.code,
        Some(2),
        "a target down must be CRITICAL (exit 2)\n{}",
        o.describe()
    );
    assert!(o.stdout.contains("DOWN"), "{}", o.describe());
    assert!(
        o.stdout.starts_with("DRMIRROR CRITICAL: target ") && o.stdout.contains(" is DOWN"),
        "{}",
        o.describe()
    );
    let t0 = Instant::now();
    let mut seen = None;
    while t0.elapsed() < secs(60) {
        if let Some(l) = prom_lag(&prom).filter(|l| *l > 0.0) {
            seen = Some(l);
            break;
        }
        thread::sleep(ms(500));
    }
    assert!(
        seen.is_some(),
        "Prometheus never saw a lag > 0 while the target was down"
    );

    // 3. Back up: the backlog drains by itself, lag returns to 0.
    chmod(&env.dst, 0o755);
    lchown(&env.dst, NOBODY.0, NOBODY.1);
    env.converge(&["--checksum"], &d);
    wait_until(
        "status shows lag 0 after catch-up",
        secs(60),
        Some(&d),
        || {
            let v = status_json(&env.state);
            let t = target0(&v);
            t["lag_seconds"] == 0.0 && t["backlog_entries"] == 0 && t["up"] == true
        },
    );
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < secs(60) {
        last = prom_lag(&prom);
        if last == Some(0.0) {
            break;
        }
        thread::sleep(ms(500));
    }
    assert_eq!(
        last,
        Some(0.0),
        "Prometheus lag did not return to 0 after catch-up"
    );
    d.terminate();
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/local/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/prometheus");
    for args in [
        ["check", "rules", "drmirror-alerts.yml"],
        ["test", "rules", "drmirror-alerts.test.yml"],
    ] {
        let (ok, said) = promtool(&args, &dir, b"");
        assert!(ok, "promtool {args:?} failed\n{said}");
    }
}

/// `promtool ARGS` (Debian's, which tools/install-deps installs) in `dir`
/// with `input` on its stdin: whether it succeeded, and what it said.
fn promtool(args: &[&str], dir: &Path, input: &[u8]) -> (bool, String) {
    use std::io::Write;
    let Some(promtool) = tool("promtool") else {
        panic!(
            "promtool is not installed: tools/install-deps installs Debian's prometheus package"
        );
    };
    let mut child = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("feed promtool");
    let o = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), said)
}

/// A live scrape, after a mirror converged and a scrub pass, passes
/// `promtool check metrics`: every metric has its help text, counters end
/// in `_total`, units are base units. And the counters without labels are
/// there at 0 from the start.
#[test]
fn a_live_scrape_passes_promtool_check_metrics() {
    let env = Env::new();
    write(&env.s("d/f"), b"x");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = env.start(&["--metrics", &addr, "--scrub-interval", "1s"]);
    d.wait_log("initial sync complete", secs(60));
    env.converge(&[], &d);
    d.wait_log("scrub pass done", secs(60));
    // Published with the next report (every second or so).
    wait_until(
        "the initial sync is reported done",
        secs(30),
        Some(&d),
        || {
            http_get(port, "/metrics").is_some_and(|t| {
                t.contains("drmirror_initial_sync_in_progress{")
                    && metric(&t, "drmirror_initial_sync_in_progress") == 0.0
            })
        },
    );
    let text = http_get(port, "/metrics").expect("scrape");
    assert_eq!(
        metric(&text, "drmirror_startup_scan_in_progress{"),
        0.0,
        "{text}"
    );
    for zero in [
        "drmirror_kernel_overflows_total",
        "drmirror_log_write_errors_total",
        "drmirror_backlog_collapsed_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(zero)),
            "{zero} is not exported from the start:\n{text}"
        );
    }
    let (ok, said) = promtool(&["check", "metrics"], Path::new("/"), text.as_bytes());
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );
    d.terminate();
}

/// The Grafana dashboard (`tools/grafana/drmirror.json`) parses, every
/// query is valid PromQL (`promtool check rules` on a rule file made of
/// them), names only metrics the daemon exports (those `telemetry.rs`
/// describes), and the headline signals are on it.
#[test]
fn the_dashboard_queries_only_metrics_the_daemon_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tools/grafana/drmirror.json")).expect("read");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "a panel without a query: {}",
            p["title"]
        );
        exprs.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().expect("expr").to_string()),
        );
    }
    let names = |s: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("drmirror_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    };
    let telemetry = std::fs::read_to_string(root.join("src/telemetry.rs")).expect("read");
    let exported: std::collections::BTreeSet<String> = names(&telemetry).into_iter().collect();
    let used: std::collections::BTreeSet<String> = exprs.iter().flat_map(|e| names(e)).collect();
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the daemon does not export: {unknown:?}"
    );
    for headline in [
        "drmirror_replication_lag_seconds",
        "drmirror_backlog_entries",
        "drmirror_target_up",
        "drmirror_applied_total",
        "drmirror_errors_total",
        "drmirror_reconnects_total",
        "drmirror_initial_sync_in_progress",
    ] {
        assert!(
            used.contains(headline),
            "{headline} is not on the dashboard"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(e).expect("quote")
        ));
    }
    let file = dir.path().join("dashboard.yml");
    std::fs::write(&file, rules).expect("write rules");
    let (ok, said) = promtool(&["check", "rules", "dashboard.yml"], dir.path(), b"");
    assert!(ok, "a dashboard query is not valid PromQL\n{said}");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        eprintln!(
            "systemd_units_pass_systemd_analyze_verify: skipped, systemd-analyze is not installed"
        );
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("unit")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut n = 0;
    for e in std::fs::read_dir(&units).expect("systemd/") {
        let p = e.expect("entry").path();
        if p.extension().is_none_or(|x| x != "service") {
            continue;
        }
        // The unit names the installed path; point it at the built binary so
        // that verify also checks the command exists and is executable.
        let text = std::fs::read_to_string(&p).expect("read unit");
        let text = text.replace("/usr/local/bin/drmirror", env!("CARGO_BIN_EXE_drmirror"));
        // A template is verified as an instance of it.
        let name = p.file_name().and_then(|n| n.to_str()).expect("name");
        let out = tmp.path().join(name.replace("@.service", "@test.service"));
        std::fs::write(&out, text).expect("write unit");
        let o = Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&out)
            .output()
            .expect("run systemd-analyze");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {}:\n{said}",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 1, "no units in {}", units.display());
}

/// The status reports a startup scan's progress against what the last
/// complete scan counted ("reconciling x%" in `STATUS=` lines and in
/// `drmirror status`); a first scan has no such count.
#[test]
fn status_reports_scan_progress_against_the_last_full_count() {
    let env = Env::new();
    for i in 0..300 {
        write(&env.s(format!("d{}/f{i}", i % 7)), b"x");
    }
    let scanned = |line: &str| -> u64 {
        let n = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("scanned="))
            .unwrap_or_else(|| panic!("no scanned= in {line:?}"));
        n.parse().unwrap_or_else(|e| panic!("scanned={n}: {e}"))
    };

    let d = Daemon::spawn(&env.run_args(&[]), &env.root, None, None);
    let first = scanned(&d.wait_log("startup scan done", secs(60)));
    assert!(first >= 307, "scanned={first}");
    let v = status_json(&env.state);
    assert_eq!(
        v["scan_expected"], 0,
        "a first scan has nothing to compare with: {v}"
    );
    assert_eq!(v["scan_entries"], first, "{v}");
    d.terminate();

    let d = Daemon::spawn(&env.run_args(&[]), &env.root, None, None);
    let second = scanned(&d.wait_log("startup scan done", secs(60)));
    assert_eq!(second, first);
    let v = status_json(&env.state);
    assert_eq!(v["scan_expected"], first, "{v}");
    assert_eq!(v["scan_entries"], second, "{v}");
    d.terminate();
}

/// An idle daemon's status thread sleeps until a client connects (it used
/// to wake up 20 times a second to look), still answers, and the daemon
/// still stops cleanly.
#[test]
fn idle_status_thread_sleeps_until_asked() {
    let env = Env::new();
    write(&env.s("f"), b"x");
    let d = Daemon::spawn(&env.run_args(&[]), &env.root, None, None);
    d.wait_log("startup scan done", secs(60));
    let task = std::fs::read_dir(format!("/proc/{}/task", d.pid))
        .expect("the daemon's threads")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "status"))
        .expect("a thread named status");
    let wakeups = || -> u64 {
        let st = std::fs::read_to_string(task.join("status")).expect("the thread's status");
        st.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no voluntary_ctxt_switches in {st}"))
    };
    let before = wakeups();
    thread::sleep(secs(3));
    let woke = wakeups() - before;
    // One a second for the poll's timeout: 3, or 4 at the edges.
    assert!(
        woke <= 6,
        "the idle status thread woke up {woke} times in 3 s"
    );
    let v = status_json(&env.state);
    assert_eq!(target0(&v)["backlog_entries"], 0, "{v}");
    d.terminate();
}

/// `drmirror completions SHELL` prints a script that knows the subcommands,
/// and `drmirror man DIR` writes a page per command, named and titled
/// `drmirror-SUBCOMMAND` (rendered by man(1) where it is installed).
/// The keys a config parser error lists as expected for an unknown key
/// `bogus` in `toml` (its real list: the parser refuses unknown keys).
fn keys_expected(env: &Env, toml: &str) -> Vec<String> {
    let config = env.write_config(toml);
    let o = drmirror(&["run".into(), "--config".into(), config.into()], secs(20));
    let said = o
        .stderr
        .split("expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no list of expected keys\n{}", o.describe()));
    said.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// drmirror.toml(5), the README's table of keys and the keys the config
/// parser accepts are the same set: a key added to one and not the others
/// fails here.
#[test]
fn the_config_manual_page_names_every_key_the_parser_takes() {
    let env = Env::new();
    let src = toml_str(&env.src);
    let dst = toml_str(&env.dst);
    let top = keys_expected(&env, &format!("source = {src}\nbogus = 1\n"));
    let backlog = keys_expected(&env, &format!("source = {src}\n[backlog]\nbogus = 1\n"));
    let target = keys_expected(
        &env,
        &format!("source = {src}\n[[target]]\npath = {dst}\nbogus = 1\n"),
    );
    let mut parser: Vec<String> = top
        .into_iter()
        .filter(|k| k != "backlog" && k != "target")
        .chain(backlog.iter().map(|k| format!("backlog.{k}")))
        .chain(target.iter().map(|k| format!("target.{k}")))
        .collect();
    parser.sort();
    assert!(parser.len() > 20, "{parser:?}");

    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let mut table: Vec<String> = readme
        .lines()
        .skip_while(|l| l.trim() != "| Key | Type | Default | Meaning |")
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('`').nth(1).map(str::to_owned))
        .filter(|k| k != "[[target]]")
        .collect();
    table.sort();
    assert_eq!(table, parser, "README table (left) against the parser");

    let dir = tempfile::tempdir().expect("tempdir");
    let o = drmirror(&["man".into(), dir.path().into()], secs(20));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let page =
        std::fs::read_to_string(dir.path().join("drmirror.toml.5")).expect("drmirror.toml.5");
    let lines: Vec<&str> = page.lines().collect();
    let mut manual: Vec<String> = lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .filter_map(|w| w[1].strip_prefix(".B ").map(str::to_owned))
        .filter(|k| k != "[[target]]")
        .collect();
    manual.sort();
    assert_eq!(manual, parser, "drmirror.toml(5) (left) against the parser");
    if let Some(man) = tool("man") {
        let o = Command::new(man)
            .arg("-l")
            .arg(dir.path().join("drmirror.toml.5"))
            .env("MANWIDTH", "80")
            .output()
            .expect("man");
        let shown = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && shown.contains("KEYS") && shown.contains("scrub_interval"),
            "man -l drmirror.toml.5: {shown}"
        );
    }
}

#[test]
fn completions_and_manual_pages_come_from_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let o = drmirror(&["completions".into(), shell.into()], secs(20));
        assert_eq!(o.code, Some(0), "{}", o.describe());
        for sub in ["run", "status", "receive", "verify"] {
            assert!(
                o.stdout.contains(sub),
                "{shell}: no {sub}\n{}",
                o.describe()
            );
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let o = drmirror(&["man".into(), dir.path().into()], secs(20));
    assert_eq!(o.code, Some(0), "{}", o.describe());
    for page in [
        "drmirror",
        "drmirror-run",
        "drmirror-status",
        "drmirror-receive",
        "drmirror-verify",
    ] {
        let p = dir.path().join(format!("{page}.1"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(text.contains(&format!(".TH {page} 1")), "{page}: {text}");
        if let Some(man) = tool("man") {
            let o = Command::new(man)
                .arg("-l")
                .arg(&p)
                .env("MANWIDTH", "80")
                .output()
                .expect("man");
            let shown = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && shown.contains("NAME"),
                "man -l {page}: {shown}"
            );
        }
    }
}

/// The system calls a unit's `SystemCallFilter=` lines allow, its
/// `@groups` expanded by `systemd-analyze syscall-filter`.
fn allowed_syscalls(analyze: &Path, unit: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(unit).expect("read unit");
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("SystemCallFilter=") {
            assert!(
                !v.starts_with('~'),
                "{}: a deny list, not an allow list",
                unit.display()
            );
            names.extend(v.split_whitespace().map(str::to_string));
        }
    }
    assert!(
        !names.is_empty(),
        "{} has no SystemCallFilter=",
        unit.display()
    );
    let (groups, calls): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| n.starts_with('@'));
    let mut allowed: std::collections::BTreeSet<String> = calls.into_iter().collect();
    // Each group's listing names its calls and nested groups, one per
    // line, indented; nested groups are listed (expanded) on their own.
    let mut todo = groups;
    let mut seen = std::collections::BTreeSet::new();
    while let Some(g) = todo.pop() {
        if !seen.insert(g.clone()) {
            continue;
        }
        let o = Command::new(analyze)
            .args(["syscall-filter", &g])
            .output()
            .expect("run systemd-analyze syscall-filter");
        assert!(o.status.success(), "systemd-analyze syscall-filter {g}");
        for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if l.starts_with('@') {
                todo.push(l.to_string());
            } else {
                allowed.insert(l.to_string());
            }
        }
    }
    allowed
}

/// The system calls in an `strace -f` output.
fn traced_syscalls(trace: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(trace).expect("read trace");
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines() {
        // "PID name(args…" or "PID <... name resumed>…"
        let rest = line.split_once(' ').map_or("", |(_, r)| r.trim_start());
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with(['(', ' ']) {
            out.insert(name);
        }
    }
    out
}

/// The service units' `SystemCallFilter=` (issue 33: the hardening
/// `systemd-analyze security` asks for) allows every system call the
/// daemon, its ssh client and the receiver make in a real run: capture
/// with fanotify (its mark, and files reopened by handle), an initial sync
/// of every kind of entry to a local, an `ssh://` and a `tcp://` target,
/// live changes, metrics, status, and a clean stop. The calls are traced
/// with `strace -f` (no systemd is needed to run the filter itself).
#[test]
fn service_units_allow_every_system_call_the_daemon_makes() {
    let (Some(analyze), Some(strace)) = (tool("systemd-analyze"), tool("strace")) else {
        eprintln!("skipped: systemd-analyze or strace is not installed");
        return;
    };
    let env = Env::new();
    let Some(sshd) = crate::remote::Sshd::start(&env.root) else {
        return;
    };
    write(&env.s("a/file"), &pattern(300_000, 1));
    write(&env.s("a/small"), b"x");
    std::os::unix::fs::symlink("file", env.s("a/link")).expect("symlink");
    std::fs::hard_link(env.s("a/file"), env.s("a/hard")).expect("hard link");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        env.s("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .expect("mkfifo");
    let sparse = std::fs::File::create(env.s("sparse")).expect("sparse");
    sparse.set_len(8 << 20).expect("set_len");
    let set = Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(env.s("a/small"))
        .status();
    assert!(set.is_ok_and(|s| s.success()), "setfattr");
    // The receiver of the tcp:// target, traced too.
    let tcp_env = Env::new();
    let tcp = Tcp::new(&tcp_env);
    let rtrace = env.root.join("receive.trace");
    let mut rcmd = Command::new(&strace);
    rcmd.args(["-f", "-qq", "-o"]).arg(&rtrace).arg(bin());
    let _receiver = tcp.receiver_on(&tcp_env, rcmd, "127.0.0.1", &[], &[]);
    let metrics = free_port();
    let toml = crate::remote::config(
        &env,
        &format!(
            "[[target]]\nname = \"local\"\npath = {}\n\n{}\n{}",
            toml_str(&env.dst),
            sshd.target_toml("ssh", &env.root.join("dr-ssh"), ""),
            tcp.target_toml(&tcp_env)
        ),
        &format!("metrics_listen = \"127.0.0.1:{metrics}\""),
    );
    let cfg = env.write_config(&toml);
    let trace = env.root.join("daemon.trace");
    let mut cmd = Command::new(&strace);
    cmd.args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(bin())
        .args(["run", "--config"])
        .arg(&cfg);
    let d = Daemon::spawn_command(cmd, &env.root);
    for _ in 0..3 {
        d.wait_log("initial sync complete", secs(120));
    }
    let line = d.wait_log("drmirror ready", secs(60));
    assert!(
        line.contains("backend=fanotify"),
        "fanotify must be traced: {line}"
    );
    write(&env.s("a/new"), b"new");
    rename(&env.s("a/small"), &env.s("a/moved"));
    remove_file(&env.s("a/hard"));
    env.converge(&[], &d);
    let _ = std::net::TcpStream::connect(("127.0.0.1", metrics)).and_then(|mut s| {
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        s.read_to_end(&mut Vec::new())
    });
    let st = drmirror(&["status".into(), "--config".into(), cfg.into()], secs(30));
    assert!(st.code.is_some(), "{}", st.describe());
    // SIGTERM to the daemon itself (strace would only detach), then strace
    // ends with it.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", d.pid, d.pid))
        .expect("strace's children");
    let pid: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("daemon pid");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("pid"),
        rustix::process::Signal::TERM,
    )
    .expect("kill");
    d.wait_exit(secs(60));
    d.wait_log("stopped cleanly", secs(5));
    drop(_receiver);

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for (unit, trace) in [
        ("drmirror.service", &trace),
        ("drmirror@.service", &trace),
        ("drmirror-receive.service", &rtrace),
    ] {
        let allowed = allowed_syscalls(&analyze, &units.join(unit));
        let used = traced_syscalls(trace);
        assert!(
            used.len() > 30 && used.contains("openat"),
            "{unit}: trace unread: {used:?}"
        );
        let refused: Vec<&String> = used.iter().filter(|c| !allowed.contains(*c)).collect();
        assert!(
            refused.is_empty(),
            "{unit}: SystemCallFilter= refuses {refused:?}, which a run made"
        );
    }
    assert!(traced_syscalls(&trace).contains("fanotify_mark"));
}
