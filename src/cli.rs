//! Command-line interface (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{DeleteMode, LogFormat, WatchMode};

#[derive(Parser, Debug)]
#[command(
    name = "drmirror",
    version,
    about = "Keeps a disaster-recovery mirror of a directory tree current within seconds"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

fn parse_delete(s: &str) -> Result<DeleteMode, String> {
    DeleteMode::parse(s).ok_or_else(|| "expected true, false, startup or running".to_string())
}

fn parse_watch(s: &str) -> Result<WatchMode, String> {
    WatchMode::parse(s).ok_or_else(|| "expected auto, fanotify or inotify".to_string())
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    LogFormat::parse(s).ok_or_else(|| "expected text or json".to_string())
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    crate::config::parse_delay_arg(s)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mirror a source to one or more targets, in the foreground.
    Run {
        /// TOML configuration file (see README "Configuration").
        #[arg(long, short, conflicts_with_all = ["source", "target", "state", "exclude", "delete", "delay", "metrics", "watch", "scrub_interval", "log_format", "no_xattrs", "no_acls", "no_sparse", "no_special_files", "no_hard_links"])]
        config: Option<PathBuf>,
        #[command(flatten)]
        quick: QuickArgs,
        /// Batching delay, e.g. 100ms.
        #[arg(long, value_parser = parse_delay)]
        delay: Option<Duration>,
        /// Prometheus endpoint, e.g. 127.0.0.1:9731, or `off`.
        #[arg(long)]
        metrics: Option<String>,
        /// Capture backend: auto, fanotify or inotify.
        #[arg(long, value_parser = parse_watch)]
        watch: Option<WatchMode>,
        /// Time of one background scrub pass, e.g. 24h, or `off`.
        #[arg(long)]
        scrub_interval: Option<String>,
        /// Log lines as `text` (default) or `json` (one object per line).
        #[arg(long, value_parser = parse_log_format)]
        log_format: Option<LogFormat>,
        /// Write to targets drmirror never wrote to even if they hold
        /// entries the source lacks, which the first start deletes (as the
        /// delete mode says): for a target seeded by rsync or mirrored by
        /// lsyncd before. Without it such a start is refused (exit 2).
        #[arg(long)]
        adopt_target: bool,
    },
    /// Report the running daemon's lag, backlog and targets.
    Status {
        /// State directory of the daemon to ask.
        #[arg(long, conflicts_with = "config")]
        state: Option<PathBuf>,
        /// Or: the daemon's configuration file (its state_dir is used).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Or: the source (the default state directory is derived from it).
        #[arg(long, conflicts_with_all = ["state", "config"])]
        source: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// CRITICAL (exit 2) when a target lags more than this many
        /// seconds (or is down, or part of the source is not captured).
        #[arg(long, default_value_t = 60.0)]
        max_lag: f64,
        /// WARNING (exit 1) when a target lags more than this many seconds
        /// (or has paths failing).
        #[arg(long, default_value_t = 30.0)]
        warn_lag: f64,
    },
    /// The DR host's end: write what a daemon sends beneath ROOT. Speaks
    /// the protocol on stdin/stdout (what `ssh://` targets run), or serves
    /// `tcp://` targets with --listen.
    Receive {
        /// Directory to write the mirror beneath (created if missing).
        #[arg(long)]
        root: PathBuf,
        /// Serve TCP on this address (e.g. 0.0.0.0:7878) instead of stdio.
        #[arg(long, requires = "token_file")]
        listen: Option<std::net::SocketAddr>,
        /// File holding the shared token TCP clients must present.
        #[arg(long, requires = "listen")]
        token_file: Option<PathBuf>,
        /// Most authenticated TCP sessions served at once [default: 8].
        #[arg(long, requires = "listen")]
        max_connections: Option<usize>,
        /// Most TCP connections in their handshake (not yet shown the
        /// token) at once; a newer one displaces the oldest [default: 16].
        #[arg(long, requires = "listen")]
        max_handshakes: Option<usize>,
        /// Of those, most from one IP address [default: 4].
        #[arg(long, requires = "listen")]
        max_handshakes_per_address: Option<usize>,
        /// Time from connect to an accepted Hello, e.g. 10s [default: 10s].
        #[arg(long, requires = "listen", value_parser = parse_delay)]
        handshake_timeout: Option<Duration>,
        /// Prometheus endpoint of the receiver, e.g. 127.0.0.1:9732.
        #[arg(long)]
        metrics: Option<String>,
    },
    /// Show what a start would do, doing none of it: checks the config and
    /// every target (reachable, writable, receiver version, token), then
    /// reports what a first start would copy, make, update and delete.
    /// Exit 0: a start would succeed; 1: it would wait for a target
    /// (unreachable, not writable); 2: it would be refused (bad config, an
    /// unusable local target, a wrong target).
    Check {
        /// TOML configuration file.
        #[arg(long, short, conflicts_with_all = ["source", "target", "state", "exclude", "delete", "no_xattrs", "no_acls", "no_sparse", "no_special_files", "no_hard_links"])]
        config: Option<PathBuf>,
        #[command(flatten)]
        quick: QuickArgs,
        /// As `run --adopt-target`: the start would write to targets that
        /// hold entries the source lacks.
        #[arg(long)]
        adopt_target: bool,
        /// Print every path: `copy:`, `mkdir:`, `attrs:`, and `delete:` (or
        /// `keep:` when the delete mode keeps them).
        #[arg(long)]
        list: bool,
    },
    /// Compare a source tree with its mirror; exit 1 listing differences.
    Verify(VerifyArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `drmirror completions bash >
    /// /usr/share/bash-completion/completions/drmirror`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages into DIR: drmirror.1 and drmirror-SUBCOMMAND.1,
    /// generated from this command line's own definition, and
    /// drmirror.toml.5, from the README's table of configuration keys.
    Man { dir: PathBuf },
}

/// The manual pages of the command line `cmd` (`drmirror`'s, from
/// [`Cli`]): (file name, roff text) for the command, each subcommand, and
/// the configuration file (see [`config_page`]).
pub fn man_pages(cmd: &clap::Command) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    let mut top = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut top)?;
    pages.push((format!("{}.1", cmd.get_name()), top));
    for sub in cmd.get_subcommands() {
        let title = format!("{}-{}", cmd.get_name(), sub.get_name());
        let mut page = Vec::new();
        // Named drmirror-SUB (as git's pages are), used as `drmirror SUB`.
        let mut named = sub.clone().name(title.clone()).bin_name(format!(
            "{} {}",
            cmd.get_name(),
            sub.get_name()
        ));
        if let Some(v) = cmd.get_version() {
            named = named.version(v.to_string());
        }
        clap_mangen::Man::new(named).render(&mut page)?;
        pages.push((format!("{title}.1"), page));
    }
    let version = cmd.get_version().unwrap_or_default();
    pages.push((format!("{}.toml.5", cmd.get_name()), config_page(version)));
    Ok(pages)
}

/// The README, whose table of configuration keys is the one source of
/// `drmirror.toml(5)` (see [`config_page`]).
const README: &str = include_str!("../README.md");

/// The header row of the README's table of configuration keys.
const KEYS_HEADER: &str = "| Key | Type | Default | Meaning |";

/// The README's table of configuration keys: (key, type, default,
/// meaning), as markdown, in order.
pub fn config_keys() -> Vec<[String; 4]> {
    README
        .lines()
        .skip_while(|l| l.trim() != KEYS_HEADER)
        // The header and the |---| line.
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| {
            let cells: Vec<String> = row
                .trim()
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect();
            <[String; 4]>::try_from(cells).ok()
        })
        .collect()
}

/// Markdown of a table cell as roff: `code` in bold, backslashes and
/// line-leading dots escaped.
fn roff(md: &str) -> String {
    let escaped = md.replace('\\', "\\e");
    let mut out = String::with_capacity(escaped.len());
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("\\fB");
            out.push_str(part);
            out.push_str("\\fR");
        } else {
            out.push_str(part);
        }
    }
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

/// `drmirror.toml(5)`: the configuration file's keys, from the README's
/// table (so that the two cannot disagree).
pub fn config_page(version: &str) -> Vec<u8> {
    let mut t = String::new();
    t.push_str(&format!(
        ".TH drmirror.toml 5 \"\" \"drmirror {version}\" \"File Formats\"\n"
    ));
    t.push_str(".SH NAME\ndrmirror.toml \\- the configuration file of drmirror(1)\n");
    t.push_str(".SH SYNOPSIS\n\\fBdrmirror run \\-\\-config\\fR \\fIFILE\\fR\n.br\n");
    t.push_str("/etc/drmirror/\\fIINSTANCE\\fR.toml (the \\fBdrmirror@.service\\fR unit)\n");
    t.push_str(".SH DESCRIPTION\nA TOML file: the tree to mirror, where its journal is kept, and one \\fB[[target]]\\fR table per mirror. ");
    t.push_str("Unknown keys are errors. Durations are strings such as \\fB\"100ms\"\\fR, \\fB\"5s\"\\fR or \\fB\"24h\"\\fR. ");
    t.push_str("The sections named below (\\(lqChange capture\\(rq, \\(lqFaults\\(rq, ...) are the README's.\n");
    t.push_str(".SH KEYS\n");
    for [key, ty, default, meaning] in config_keys() {
        let default = if default.starts_with("required") || default.starts_with("at least") {
            roff(&default)
        } else {
            format!("default: {}", roff(&default))
        };
        t.push_str(&format!(
            ".TP\n.B {}\n{}; {default}.\n.br\n{}\n",
            key.trim_matches('`'),
            roff(&ty),
            roff(&meaning)
        ));
    }
    t.push_str(".SH SEE ALSO\ndrmirror(1), drmirror-run(1), drmirror-status(1)\n");
    t.into_bytes()
}

/// What a copy leaves out (everything is kept by default; the config's
/// `xattrs`, `acls`, `sparse`, `special_files` and `hard_links` keys say
/// the same).
/// `drmirror verify`'s arguments.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Compare the targets of this config, local or remote, with its
    /// source, under its excludes and fidelity keys (instead of
    /// --source/--target).
    #[arg(long, short, conflicts_with_all = ["source", "target", "exclude", "no_xattrs", "no_acls", "no_sparse", "no_special_files", "no_hard_links"])]
    pub config: Option<PathBuf>,
    /// With --config: only the target of this name.
    #[arg(long, requires = "config")]
    pub name: Option<String>,
    /// The source tree.
    #[arg(long, required_unless_present = "config")]
    pub source: Option<PathBuf>,
    /// Its mirror: a local directory, or an ssh:// URL.
    #[arg(long, required_unless_present = "config")]
    pub target: Option<PathBuf>,
    /// Also compare file contents (BLAKE3, in parallel; a remote target's
    /// on the DR host).
    #[arg(long)]
    pub checksum: bool,
    /// Exclude pattern, gitignore syntax (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Do not compare owner and group (compared by default when root).
    #[arg(long)]
    pub no_owner: bool,
    /// Leave out of the comparison what the mirror leaves out.
    #[command(flatten)]
    pub fidelity: FidelityArgs,
}

/// The quick form's settings `run` and `check` share (a config file
/// conflicts with each).
#[derive(Args, Debug, Default)]
pub struct QuickArgs {
    /// Directory to mirror.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Directory or ssh://[user@]host[:port]/path URL to mirror into
    /// (repeatable).
    #[arg(long)]
    pub target: Vec<PathBuf>,
    /// State directory holding the journal (default: see README).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Exclude pattern, gitignore syntax (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Delete mode: true, false, startup or running.
    #[arg(long, value_parser = parse_delete)]
    pub delete: Option<DeleteMode>,
    #[command(flatten)]
    pub fidelity: FidelityArgs,
}

impl QuickArgs {
    /// The quick form these make (the command's own settings left unset).
    pub fn form(self) -> crate::config::QuickForm {
        crate::config::QuickForm {
            source: self.source,
            targets: self.target,
            state_dir: self.state,
            exclude: self.exclude,
            delete: self.delete,
            fidelity: self.fidelity.keys(),
            ..Default::default()
        }
    }
}

#[derive(Args, Debug, Clone, Copy, Default)]
pub struct FidelityArgs {
    /// Do not mirror extended attributes (user.*; trusted.* and security.*
    /// when root).
    #[arg(long)]
    pub no_xattrs: bool,
    /// Do not mirror POSIX ACLs.
    #[arg(long)]
    pub no_acls: bool,
    /// Write the holes of sparse files out as zeros.
    #[arg(long)]
    pub no_sparse: bool,
    /// Leave out FIFOs, sockets' entries and devices.
    #[arg(long)]
    pub no_special_files: bool,
    /// Copy each name of a hard-linked file on its own (the target then
    /// holds one file per name).
    #[arg(long)]
    pub no_hard_links: bool,
}

impl FidelityArgs {
    pub fn keys(self) -> crate::config::FidelityKeys {
        let off = |no: bool| if no { Some(false) } else { None };
        crate::config::FidelityKeys {
            xattrs: off(self.no_xattrs),
            acls: off(self.no_acls),
            sparse: off(self.no_sparse),
            special_files: off(self.no_special_files),
            hard_links: off(self.no_hard_links),
        }
    }
}
