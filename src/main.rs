//! The `drmirror` binary: parse, run, map errors to exit codes
//! (0 ok, 1 failure or differences found, 2 usage or configuration error).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use drmirror::cli::{Cli, Command};
use drmirror::config::{Config, LogFormat, QuickForm};

// The scans allocate a name and a path per entry from every thread; glibc's
// malloc was ~7 % of a reconciliation's CPU time (arena locking and
// consolidation), mimalloc's thread-local free lists a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr on a full disk) is dropped
    // and counted, never an error: tracing-subscriber would report it with
    // `eprintln!`, which panics when stderr fails, and that panic ended
    // whichever thread was logging (a shipper: replication stopped).
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| drmirror::logsink::Stderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Json => fmt.json().init(),
        // Under systemd the journal stamps every line: no clock, and the
        // priority in front (see `drmirror::logsink`).
        LogFormat::Text if journal => fmt
            .event_format(drmirror::logsink::Prioritized(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init(),
        LogFormat::Text => fmt.init(),
    }
}

/// The error chain on one line, without repeating a cause that an outer
/// message already quotes.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if !out.contains(&m) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&m);
        }
    }
    out
}

/// `drmirror status`, as a monitoring plugin: 0 OK, 1 WARNING, 2 CRITICAL
/// (see [`drmirror::status::health`]), 3 UNKNOWN when no daemon can be asked.
fn status(
    state: Option<std::path::PathBuf>,
    config: Option<std::path::PathBuf>,
    source: Option<std::path::PathBuf>,
    json: bool,
    (warn_lag, max_lag): (f64, f64),
) -> ExitCode {
    use drmirror::status::Health;
    let unknown = |msg: String| {
        eprintln!("drmirror: status: {msg}");
        ExitCode::from(Health::Unknown as u8)
    };
    let dir = match (state, config, source) {
        (Some(d), _, _) => d,
        (None, Some(f), _) => match Config::load(&f) {
            Ok(c) => {
                let instance = f.file_stem().and_then(|s| s.to_str());
                drmirror::status::locate(&c.state_dir, &c.source, instance)
            }
            Err(e) => return unknown(format!("config error: {e}")),
        },
        (None, None, Some(s)) => match s.canonicalize() {
            Ok(s) => drmirror::status::locate(&drmirror::config::default_state_dir(&s), &s, None),
            Err(e) => return unknown(format!("source {}: {e}", s.display())),
        },
        (None, None, None) => {
            return unknown("give --state DIR, --config FILE or --source DIR".into())
        }
    };
    let s = match drmirror::status::query(&dir) {
        Ok(s) => s,
        Err(e) => return unknown(e.to_string()),
    };
    let (h, why) = drmirror::status::health(&s, warn_lag, max_lag);
    if json {
        match serde_json::to_string_pretty(&s) {
            Ok(j) => println!("{j}"),
            Err(e) => return unknown(e.to_string()),
        }
    } else {
        print!(
            "{}{}",
            drmirror::status::verdict_line(h, &why),
            drmirror::status::render(&s)
        );
    }
    ExitCode::from(h as u8)
}

/// `drmirror completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    use std::io::Write;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "drmirror", &mut out);
    match std::io::stdout().lock().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

/// `drmirror man DIR`: the manual pages, written into DIR.
fn man(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let written = drmirror::cli::man_pages(&Cli::command()).and_then(|pages| {
        std::fs::create_dir_all(dir)?;
        for (name, text) in &pages {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(pages.len())
    });
    match written {
        Ok(n) => {
            eprintln!("drmirror: {n} manual pages written to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drmirror: man: {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// `drmirror receive`'s arguments.
struct ReceiveArgs {
    root: std::path::PathBuf,
    listen: Option<std::net::SocketAddr>,
    token_file: Option<std::path::PathBuf>,
    limits: drmirror::receive::gate::Limits,
    metrics: Option<String>,
}

/// `drmirror receive`: 0 when the daemon hung up cleanly, 1 on a protocol
/// or I/O error, 2 on bad arguments.
fn receive(a: ReceiveArgs) -> ExitCode {
    init_logging(LogFormat::Text);
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("drmirror receive: {e}");
        ExitCode::from(2)
    };
    match a.metrics.as_deref().map(drmirror::telemetry::parse_listen) {
        Some(Ok(Some(addr))) => {
            if let Err(e) = drmirror::telemetry::install(addr).and_then(|e| e.serve()) {
                return fail(&e);
            }
        }
        Some(Err(e)) => return fail(&e),
        Some(Ok(None)) | None => {}
    }
    let target = match drmirror::receive::open_root(&a.root) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let r = match (a.listen, a.token_file) {
        (None, _) => drmirror::receive::serve_stdio(&target),
        (Some(addr), Some(f)) => {
            let token = match drmirror::protocol::read_token_file(&f) {
                Ok(t) => t,
                Err(e) => return fail(&format!("token file: {e}")),
            };
            let opts = drmirror::receive::TcpOptions {
                addr,
                token,
                limits: a.limits,
            };
            drmirror::receive::serve_tcp(std::sync::Arc::new(target), opts)
        }
        (Some(_), None) => return fail(&"--listen needs --token-file"),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("drmirror receive: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            quick,
            delay,
            metrics,
            watch,
            scrub_interval,
            log_format,
            adopt_target,
        } => run(
            load(config, || QuickForm {
                delay,
                metrics_listen: metrics,
                watch,
                scrub_interval,
                log_format,
                ..quick.form()
            }),
            adopt_target,
        ),
        Command::Receive {
            root,
            listen,
            token_file,
            max_connections,
            max_handshakes,
            max_handshakes_per_address,
            handshake_timeout,
            metrics,
        } => receive(ReceiveArgs {
            root,
            listen,
            token_file,
            limits: drmirror::receive::gate::Limits {
                sessions: max_connections.unwrap_or(8).max(1),
                handshakes: max_handshakes.unwrap_or(16).max(1),
                per_address: max_handshakes_per_address.unwrap_or(4).max(1),
                deadline: handshake_timeout.unwrap_or(std::time::Duration::from_secs(10)),
            },
            metrics,
        }),
        Command::Status {
            state,
            config,
            source,
            json,
            max_lag,
            warn_lag,
        } => status(state, config, source, json, (warn_lag, max_lag)),
        Command::Check {
            config,
            quick,
            adopt_target,
            list,
        } => {
            let cfg = load(config, || quick.form());
            check(cfg, adopt_target, list)
        }
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(&dir),
        Command::Verify(a) => ExitCode::from(verify_cmd(a)),
    }
}

/// `drmirror run`: the daemon, in the foreground.
fn run(cfg: Result<Config, drmirror::config::ConfigError>, adopt: bool) -> ExitCode {
    let cfg = match adopting(cfg, adopt) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(cfg.log_format);
    match drmirror::daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            tracing::error!("{}", render(&anyhow::Error::new(e).context("drmirror run")));
            ExitCode::from(code)
        }
    }
}

/// The config, its targets adopted with `--adopt-target`; a config error
/// is said and exits 2.
fn adopting(
    cfg: Result<Config, drmirror::config::ConfigError>,
    adopt: bool,
) -> Result<Config, ExitCode> {
    let mut cfg = cfg.map_err(|e| {
        eprintln!("drmirror: config error: {e}");
        ExitCode::from(2)
    })?;
    for t in &mut cfg.targets {
        t.adopt |= adopt;
    }
    Ok(cfg)
}

/// `drmirror verify`: exit 0 identical, 1 different, 2 could not compare.
fn verify_cmd(a: drmirror::cli::VerifyArgs) -> u8 {
    let owner = !a.no_owner;
    let loaded = |cfg: Result<Config, drmirror::config::ConfigError>, from: &str| match cfg {
        Ok(cfg) => verify_config(&cfg, from, a.name.as_deref(), a.checksum, owner),
        Err(e) => {
            eprintln!("drmirror: config error: {e}");
            2
        }
    };
    match (&a.config, &a.source, &a.target) {
        (Some(f), _, _) => loaded(Config::load(f), &f.display().to_string()),
        (None, Some(s), Some(t)) if t.to_str().is_some_and(drmirror::target::remote::is_url) => {
            // A remote target: its URL is read as `run` reads it.
            let quick = QuickForm {
                source: Some(s.clone()),
                targets: vec![t.clone()],
                exclude: a.exclude.clone(),
                fidelity: a.fidelity.keys(),
                ..Default::default()
            };
            loaded(Config::from_quick(quick), "the command line")
        }
        (None, Some(s), Some(t)) => match drmirror::verify::Mirror::local(t) {
            Ok(m) => verify(
                s,
                &m,
                a.checksum,
                &a.exclude,
                owner,
                a.fidelity.keys().keep(),
            ),
            Err(e) => {
                eprintln!("drmirror: verify: {e}");
                2
            }
        },
        // clap requires both without --config.
        _ => 2,
    }
}

/// The config file, or else the quick form `quick` makes.
fn load(
    file: Option<std::path::PathBuf>,
    quick: impl FnOnce() -> QuickForm,
) -> Result<Config, drmirror::config::ConfigError> {
    match file {
        Some(f) => Config::load(&f),
        None => Config::from_quick(quick()),
    }
}

/// `drmirror check`: see [`drmirror::check`].
fn check(cfg: Result<Config, drmirror::config::ConfigError>, adopt: bool, list: bool) -> ExitCode {
    let cfg = match adopting(cfg, adopt) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut out = std::io::stdout().lock();
    match drmirror::check::run(&cfg, list, &mut out) {
        Ok(o) => ExitCode::from(o.exit_code()),
        Err(e) => {
            eprintln!("drmirror: check: {e}");
            ExitCode::from(2)
        }
    }
}

/// `drmirror verify --config FILE [--name NAME]`: each target of the
/// config (or the one named) against its source, under the config's
/// excludes and fidelity keys; a remote one through its receiver. The
/// worst exit code of them.
fn verify_config(cfg: &Config, from: &str, name: Option<&str>, checksum: bool, owner: bool) -> u8 {
    let picked: Vec<_> = cfg
        .targets
        .iter()
        .filter(|t| name.is_none_or(|n| t.name == n))
        .collect();
    if picked.is_empty() {
        let names: Vec<&str> = cfg.targets.iter().map(|t| t.name.as_str()).collect();
        eprintln!(
            "drmirror: verify: no target named {:?} in {from} (its targets: {})",
            name.unwrap_or_default(),
            names.join(", ")
        );
        return 2;
    }
    let mut worst = 0;
    for t in &picked {
        if picked.len() > 1 {
            println!("target {} ({}):", t.name, t.path.display());
        }
        let code = match &t.remote {
            Some(spec) => {
                let rt = drmirror::target::remote::RemoteTarget::new(&t.name, spec.clone(), owner)
                    .keeping(cfg.keep);
                if rt.ready().is_err() {
                    let why = rt.unreachable_reason().unwrap_or_default();
                    eprintln!("drmirror: verify: cannot reach {}: {why}", rt.describe());
                    2
                } else {
                    let m = drmirror::verify::Mirror::Remote(&rt);
                    verify(&cfg.source, &m, checksum, &cfg.exclude, owner, cfg.keep)
                }
            }
            None => match drmirror::verify::Mirror::local(&t.path) {
                Ok(m) => verify(&cfg.source, &m, checksum, &cfg.exclude, owner, cfg.keep),
                Err(e) => {
                    eprintln!("drmirror: verify: {e}");
                    2
                }
            },
        };
        worst = worst.max(code);
    }
    worst
}

/// `drmirror verify`: exit 0 equal, 1 different, 2 could not compare.
fn verify(
    source: &std::path::Path,
    target: &drmirror::verify::Mirror<'_>,
    checksum: bool,
    exclude: &[String],
    owner: bool,
    keep: drmirror::fidelity::Keep,
) -> u8 {
    let filter = match drmirror::filter::Filter::new(source, exclude) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("drmirror: config error: `exclude`: {e}");
            return 2;
        }
    };
    let opts = drmirror::verify::Options {
        checksum,
        owner: owner && rustix::process::geteuid().is_root(),
        filter,
        keep,
        // Drawn only when stderr is a terminal.
        progress: Some(drmirror::progress::spinner(
            "{spinner} verify: {pos} entries compared{msg} ({elapsed})",
        )),
    };
    let report = drmirror::verify::verify(source, target, &opts);
    if let Some(pb) = &opts.progress {
        pb.finish_and_clear();
    }
    match report {
        Ok(r) => {
            // Not print!: a closed pipe (`| head`) must end the output, not
            // panic.
            use std::io::Write;
            let _ = std::io::stdout().lock().write_all(r.render().as_bytes());
            u8::from(!r.differences.is_empty())
        }
        Err(e) => {
            eprintln!("drmirror: verify: {e}");
            2
        }
    }
}
