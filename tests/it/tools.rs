//! The benchmark tools' quick forms, run so that they cannot rot: each runs
//! against the binary under test and must print its table.

use crate::util::*;
use std::process::Command;

/// `tools/bench-vs-lsyncd --quick`: every scenario (initial sync, restart
/// window, steady state, outage) on a 2,000-file tree, both tools.
#[test]
fn bench_vs_lsyncd_quick_prints_every_figure() {
    if !is_root() {
        eprintln!("SKIP: bench-vs-lsyncd needs root");
        return;
    }
    let env = Env::new();
    let json = env.root.join("out.json");
    let o = run_timeout(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/bench-vs-lsyncd"
        ))
        .args(["--quick", "--no-build", "--work"])
        .arg(env.root.join("work"))
        .arg("--trees")
        .arg(env.root.join("trees"))
        .arg("--json")
        .arg(&json)
        .env("DRMIRROR", bin()),
        secs(600),
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    for row in [
        "restart window, worst, 2,000 files",
        "cold initial sync, 2,000 files",
        "steady 200 files/s: p99 write-to-target",
        "steady 200 files/s: CPU (incl. children)",
        "outage, 500 changes: catch-up",
    ] {
        assert!(o.stdout.contains(row), "no row {row:?}\n{}", o.describe());
    }
    let v: serde_json::Value = serde_json::from_slice(&read(&json)).expect("the JSON file parses");
    let res = v["results"].as_object().expect("results");
    for k in [
        "restart_worst_s/2000/drmirror",
        "restart_worst_s/2000/lsyncd",
        "steady_cpu_s/lsyncd",
        "outage_catchup_s/drmirror",
    ] {
        assert!(
            res.get(k).and_then(|x| x.as_f64()).is_some_and(|x| x > 0.0),
            "{k} missing or not positive in {v}"
        );
    }
}
