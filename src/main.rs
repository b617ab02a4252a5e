//! The `drmirror` binary: parse, run, map errors to exit codes
//! (0 ok, 1 failure or differences found, 2 usage or configuration error).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use drmirror::cli::{Cli, Command};
use drmirror::config::{Config, QuickForm};

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            source,
            target,
            state,
            exclude,
            delete,
            delay,
        } => {
            let cfg = match config {
                Some(f) => Config::load(&f),
                None => Config::from_quick(QuickForm {
                    source,
                    targets: target,
                    state_dir: state,
                    exclude,
                    delete,
                    delay,
                }),
            };
            let cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("drmirror: config error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            match drmirror::daemon::run(cfg).context("drmirror run") {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{}", render(&e));
                    ExitCode::from(1)
                }
            }
        }
        Command::Verify {
            source,
            target,
            checksum,
            exclude,
            no_owner,
        } => {
            let filter = match drmirror::filter::Filter::new(&source, &exclude) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("drmirror: config error: `exclude`: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = drmirror::verify::Options {
                checksum,
                owner: !no_owner && rustix::process::geteuid().is_root(),
                filter,
            };
            match drmirror::verify::verify(&source, &target, &opts) {
                Ok(r) => {
                    print!("{}", r.render());
                    if r.differences.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("drmirror: verify: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
