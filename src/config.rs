//! Configuration: the TOML file, the `run` quick form, and their validation.
//!
//! Everything a daemon needs is checked here, before any state is touched:
//! an invalid configuration is one line naming the field and the problem
//! (exit code 2), never a half-started mirror.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// lsyncd's `delete` semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeleteMode {
    /// Remove extraneous target entries at startup and propagate deletes.
    #[default]
    Always,
    /// Never delete anything on the target.
    Never,
    /// Only remove extraneous target entries during the startup scan.
    Startup,
    /// Only propagate deletes seen while running.
    Running,
}

impl DeleteMode {
    pub fn at_startup(self) -> bool {
        matches!(self, DeleteMode::Always | DeleteMode::Startup)
    }
    pub fn while_running(self) -> bool {
        matches!(self, DeleteMode::Always | DeleteMode::Running)
    }
    /// As the configuration spells it.
    pub fn describe(self) -> &'static str {
        match self {
            DeleteMode::Always => "true",
            DeleteMode::Never => "false",
            DeleteMode::Startup => "\"startup\"",
            DeleteMode::Running => "\"running\"",
        }
    }
    pub fn parse(s: &str) -> Option<DeleteMode> {
        Some(match s {
            "true" => DeleteMode::Always,
            "false" => DeleteMode::Never,
            "startup" => DeleteMode::Startup,
            "running" => DeleteMode::Running,
            _ => return None,
        })
    }
}

impl<'de> Deserialize<'de> for DeleteMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DeleteMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"true, false, "startup" or "running""#)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<DeleteMode, E> {
                Ok(if v {
                    DeleteMode::Always
                } else {
                    DeleteMode::Never
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DeleteMode, E> {
                match v {
                    "startup" => Ok(DeleteMode::Startup),
                    "running" => Ok(DeleteMode::Running),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Capture backend selection: `auto` tries fanotify and falls back to
/// inotify, logging why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    #[default]
    Auto,
    Fanotify,
    Inotify,
}

/// How log lines are written (`log_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event, for people (under systemd, with a journald
    /// priority prefix and no clock: see `drmirror::logsink`).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// What to do with a journal RocksDB reports corrupt (`on_corrupt_journal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCorruptJournal {
    /// Move it aside, start a fresh one and compare the whole tree.
    #[default]
    Rebuild,
    /// Exit (code 2) and leave it for a human.
    Refuse,
}

impl WatchMode {
    pub fn parse(s: &str) -> Option<WatchMode> {
        match s {
            "auto" => Some(WatchMode::Auto),
            "fanotify" => Some(WatchMode::Fanotify),
            "inotify" => Some(WatchMode::Inotify),
            _ => None,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. \"200ms\", \"1s\")"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(r#"a duration such as "200ms" or a number of seconds"#)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom("negative duration"))
        }
    }
    d.deserialize_any(V)
}

/// Bounds on the on-disk backlog of one target.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Backlog {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog {
            max_entries: 10_000_000,
            max_bytes: 4 << 30,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: Option<String>,
    /// A local directory, `ssh://[user@]host[:port]/path` or `tcp://host:port/path`.
    pub path: PathBuf,
    /// ssh: identity file.
    #[serde(default)]
    pub ssh_identity: Option<PathBuf>,
    /// ssh: extra arguments (e.g. `["-o", "ProxyJump=bastion"]`).
    #[serde(default)]
    pub ssh_args: Vec<String>,
    /// ssh: ask ssh to prefer AES-GCM where this CPU runs it in hardware
    /// (see `target::ssh_cipher`).
    #[serde(default)]
    pub ssh_prefer_aes_gcm: Option<bool>,
    /// ssh: drmirror's path on the far side.
    #[serde(default)]
    pub remote_command: Option<String>,
    /// tcp: file holding the shared token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// zstd-compress file data on the wire (remote targets).
    #[serde(default)]
    pub compress: bool,
    /// Bandwidth limit on the wire, e.g. `"10M"` (bytes/s; K, M, G suffixes)
    /// or a number of KiB/s as rsync's `--bwlimit` takes it.
    #[serde(default)]
    pub bwlimit: Option<toml::Value>,
    /// Remote targets: put new small files in place through a temp file
    /// too, so that a reader on the target never sees one incomplete (see
    /// the README's "Atomic writes").
    #[serde(default)]
    pub atomic_new_files: bool,
    /// Write to this target the first time even though it holds entries the
    /// source lacks (which the first start then deletes, as the delete mode
    /// says): see `target::adopt`.
    #[serde(default)]
    pub adopt: bool,
}

pub const DEFAULT_DELAY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: PathBuf,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    delete: DeleteMode,
    #[serde(default, deserialize_with = "de_duration_opt")]
    delay: Option<Duration>,
    #[serde(default)]
    watch: WatchMode,
    #[serde(default)]
    backlog: Backlog,
    #[serde(default, rename = "target")]
    targets: Vec<TargetConfig>,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    on_corrupt_journal: OnCorruptJournal,
    /// A duration, or "off".
    #[serde(default)]
    scrub_interval: Option<String>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default)]
    xattrs: Option<bool>,
    #[serde(default)]
    acls: Option<bool>,
    #[serde(default)]
    sparse: Option<bool>,
    #[serde(default)]
    special_files: Option<bool>,
    #[serde(default)]
    hard_links: Option<bool>,
}

/// The fidelity keys (`xattrs`, `acls`, `sparse`, `special_files`,
/// `hard_links`): each
/// on unless set to false. A DR copy keeps everything by default.
#[derive(Clone, Copy, Debug, Default)]
pub struct FidelityKeys {
    pub xattrs: Option<bool>,
    pub acls: Option<bool>,
    pub sparse: Option<bool>,
    pub special_files: Option<bool>,
    pub hard_links: Option<bool>,
}

impl FidelityKeys {
    /// What is kept, with this process's privileges.
    pub fn keep(self) -> crate::fidelity::Keep {
        crate::fidelity::Keep {
            xattrs: self.xattrs.unwrap_or(true),
            acls: self.acls.unwrap_or(true),
            sparse: self.sparse.unwrap_or(true),
            specials: self.special_files.unwrap_or(true),
            hard_links: self.hard_links.unwrap_or(true),
            ..crate::fidelity::Keep::all()
        }
    }
}

fn de_duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A validated target.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: String,
    /// Local directory (canonical), or the remote path for remote targets.
    pub path: PathBuf,
    /// How to reach it, for a remote target.
    pub remote: Option<crate::target::remote::RemoteSpec>,
    /// Written to the first time whatever it holds (see
    /// [`crate::target::adopt`]).
    pub adopt: bool,
}

/// `bwlimit`: a number is KiB/s (as rsync's `--bwlimit`); a string takes a
/// K, M or G suffix (powers of 1024) and means bytes/s without one.
fn parse_bwlimit(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64 * 1024),
        toml::Value::String(s) => {
            let s = s.trim();
            let (num, mult) = match s.chars().last() {
                Some('K') | Some('k') => (&s[..s.len() - 1], 1u64 << 10),
                Some('M') | Some('m') => (&s[..s.len() - 1], 1 << 20),
                Some('G') | Some('g') => (&s[..s.len() - 1], 1 << 30),
                _ => (s, 1),
            };
            num.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| *n >= 0.0 && n.is_finite())
                .map(|n| (n * mult as f64) as u64)
                .ok_or_else(|| format!("{s:?}: expected e.g. \"10M\" or a number of KiB/s"))
        }
        other => Err(format!(
            "{other}: expected e.g. \"10M\" or a number of KiB/s"
        )),
    }
}

fn remote_target(
    t: &TargetConfig,
    url: &str,
) -> Result<crate::target::remote::RemoteSpec, ConfigError> {
    use crate::target::remote::{parse_url, RemoteSpec, Transport};
    let (transport, path) = parse_url(url).map_err(|e| field("target.path", e.to_string()))?;
    let token = match (&transport, &t.token_file) {
        (Transport::Tcp { .. }, None) => {
            return Err(field(
                "target.token_file",
                format!("{url}: a tcp:// target needs the receiver's shared token"),
            ))
        }
        (Transport::Ssh { .. }, Some(_)) => {
            return Err(field(
                "target.token_file",
                format!("{url}: applies to tcp:// targets only (ssh authenticates itself)"),
            ))
        }
        (_, Some(f)) => {
            Some(crate::protocol::read_token_file(f).map_err(|e| field("target.token_file", e))?)
        }
        (_, None) => None,
    };
    let bwlimit = match &t.bwlimit {
        None => 0,
        Some(v) => parse_bwlimit(v).map_err(|e| field("target.bwlimit", e))?,
    };
    Ok(RemoteSpec {
        transport,
        path,
        identity: t.ssh_identity.clone(),
        ssh_args: t.ssh_args.clone(),
        prefer_aes_gcm: t.ssh_prefer_aes_gcm.unwrap_or(true),
        command: t
            .remote_command
            .clone()
            .unwrap_or_else(|| "drmirror".to_string()),
        token,
        compress: t.compress,
        bwlimit,
        atomic_new_files: t.atomic_new_files,
    })
}

/// A validated configuration: paths are absolute and canonical.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: PathBuf,
    pub state_dir: PathBuf,
    pub exclude: Vec<String>,
    pub delete: DeleteMode,
    pub delay: Duration,
    pub watch: WatchMode,
    pub backlog: Backlog,
    pub targets: Vec<Target>,
    /// Prometheus endpoint; `None` when disabled (`"off"`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub on_corrupt_journal: OnCorruptJournal,
    /// How long one pass of the background scrub takes (see
    /// `drmirror::scrub`); `None`: no scrub (`"off"`).
    pub scrub_interval: Option<Duration>,
    pub log_format: LogFormat,
    /// What a copy keeps beyond content (see [`crate::fidelity`]).
    pub keep: crate::fidelity::Keep,
}

/// The default time of one scrub pass.
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Parses `scrub_interval`: a duration of at least 1 s, or "off".
fn scrub_interval(raw: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    match raw {
        None => Ok(Some(DEFAULT_SCRUB_INTERVAL)),
        Some("off") => Ok(None),
        Some(s) => match parse_duration(s) {
            Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
            Ok(_) => Err(field("scrub_interval", "must be at least 1s, or \"off\"")),
            Err(e) => Err(field("scrub_interval", format!("{s:?}: {e}, or \"off\""))),
        },
    }
}

/// Default Prometheus endpoint (loopback only).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9731";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {msg}")]
    Syntax { file: String, msg: String },
    #[error("`{field}`: {problem}")]
    Field { field: String, problem: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
}

fn field(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// Quick-form settings from the command line.
#[derive(Clone, Debug, Default)]
pub struct QuickForm {
    pub source: Option<PathBuf>,
    pub targets: Vec<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub exclude: Vec<String>,
    pub delete: Option<DeleteMode>,
    pub delay: Option<Duration>,
    pub metrics_listen: Option<String>,
    pub watch: Option<WatchMode>,
    pub scrub_interval: Option<String>,
    pub log_format: Option<LogFormat>,
    pub fidelity: FidelityKeys,
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &file.display().to_string())
    }

    pub fn from_toml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, file, &e))?;
        validate(raw)
    }

    pub fn from_quick(q: QuickForm) -> Result<Config, ConfigError> {
        let source = q
            .source
            .ok_or_else(|| field("source", "missing (--source DIR)"))?;
        if q.targets.is_empty() {
            return Err(field("target", "missing (--target DIR)"));
        }
        validate(RawConfig {
            source,
            state_dir: q.state_dir,
            exclude: q.exclude,
            delete: q.delete.unwrap_or_default(),
            delay: q.delay,
            watch: q.watch.unwrap_or_default(),
            backlog: Backlog::default(),
            targets: q
                .targets
                .into_iter()
                .map(|path| TargetConfig {
                    path,
                    ..Default::default()
                })
                .collect(),
            metrics_listen: q.metrics_listen,
            on_corrupt_journal: OnCorruptJournal::default(),
            scrub_interval: q.scrub_interval,
            log_format: q.log_format.unwrap_or_default(),
            xattrs: q.fidelity.xattrs,
            acls: q.fidelity.acls,
            sparse: q.fidelity.sparse,
            special_files: q.fidelity.special_files,
            hard_links: q.fidelity.hard_links,
        })
    }
}

/// One line: the file, the line number, the key on that line, and the parser's
/// message (toml's own rendering spans several lines with a source excerpt).
fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().replace('\n', " ");
    let Some(span) = e.span() else {
        return ConfigError::Syntax {
            file: file.to_string(),
            msg,
        };
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'));
    let msg = match key {
        Some(k) if !k.is_empty() && !msg.contains(&format!("`{k}`")) => format!("`{k}`: {msg}"),
        _ => msg,
    };
    ConfigError::Syntax {
        file: file.to_string(),
        msg: format!("line {line_no}: {msg}"),
    }
}

/// `path` made absolute and canonical; for a path that does not exist yet,
/// its nearest existing ancestor is canonicalised and the rest appended.
fn canonical_lenient(path: &Path) -> std::io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match cur.canonicalize() {
            Ok(c) => {
                let mut out = c;
                for comp in rest.iter().rev() {
                    out.push(comp);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (cur.parent(), cur.file_name()) else {
                    return Err(e);
                };
                if name == ".." {
                    return Err(e);
                }
                rest.push(name.to_os_string());
                cur = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The documented default state directory for a source.
pub fn default_state_dir(source: &Path) -> PathBuf {
    let base = if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd's StateDirectory= may list several, colon-separated.
        let first = d
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return PathBuf::from(first);
    } else if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(x).join("drmirror")
    } else if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        PathBuf::from(h).join(".local/state/drmirror")
    } else {
        PathBuf::from("/var/lib/drmirror")
    };
    let s = source.to_string_lossy();
    let name: String = s
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let hash = crc32fast::hash(source.as_os_str().as_encoded_bytes());
    base.join(format!("{name}-{hash:08x}"))
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let source = source_dir(&raw.source)?;
    let mounts = crate::mounts::current();
    let targets = targets(&raw.targets, &source, &mounts)?;
    let state_dir = state_dir(raw.state_dir.as_deref(), &source, &mounts, &targets)?;
    let mut gi = ignore::gitignore::GitignoreBuilder::new(&source);
    for pat in &raw.exclude {
        gi.add_line(None, pat)
            .map_err(|e| field("exclude", format!("{pat:?}: {e}")))?;
    }
    gi.build().map_err(|e| field("exclude", e.to_string()))?;
    if raw.backlog.max_entries == 0 {
        return Err(field("backlog.max_entries", "must be at least 1"));
    }
    if raw.backlog.max_bytes == 0 {
        return Err(field("backlog.max_bytes", "must be at least 1"));
    }
    let metrics_listen = crate::telemetry::parse_listen(
        raw.metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN),
    )
    .map_err(|e| field("metrics_listen", e.to_string()))?;
    let delay = raw.delay.unwrap_or(DEFAULT_DELAY);
    if delay > Duration::from_secs(3600) {
        return Err(field("delay", "must be at most 1h"));
    }
    let scrub_interval = scrub_interval(raw.scrub_interval.as_deref())?;
    Ok(Config {
        source,
        state_dir,
        exclude: raw.exclude,
        delete: raw.delete,
        delay,
        watch: raw.watch,
        backlog: raw.backlog,
        targets,
        metrics_listen,
        on_corrupt_journal: raw.on_corrupt_journal,
        scrub_interval,
        log_format: raw.log_format,
        keep: FidelityKeys {
            xattrs: raw.xattrs,
            acls: raw.acls,
            sparse: raw.sparse,
            special_files: raw.special_files,
            hard_links: raw.hard_links,
        }
        .keep(),
    })
}

/// `source`, canonical: it must be a directory.
fn source_dir(raw: &Path) -> Result<PathBuf, ConfigError> {
    let source = raw
        .canonicalize()
        .map_err(|e| field("source", format!("{}: {e}", raw.display())))?;
    if !source.is_dir() {
        return Err(field(
            "source",
            format!("{} is not a directory", source.display()),
        ));
    }
    Ok(source)
}

/// The `[[target]]`s, each checked (see [`local_target`]) and named once.
fn targets(
    raw: &[TargetConfig],
    source: &Path,
    mounts: &[crate::mounts::Mount],
) -> Result<Vec<Target>, ConfigError> {
    if raw.is_empty() {
        return Err(field("target", "at least one [[target]] is required"));
    }
    let mut targets: Vec<Target> = Vec::new();
    for t in raw {
        let url = t.path.to_str().filter(|u| crate::target::remote::is_url(u));
        let (path, remote) = match url {
            Some(url) => {
                let spec = remote_target(t, url)?;
                (spec.path.clone(), Some(spec))
            }
            None => (local_target(t, source, mounts)?, None),
        };
        let name = t.name.clone().unwrap_or_else(|| match url {
            Some(url) => url.to_string(),
            None => path.display().to_string(),
        });
        if name.is_empty() {
            return Err(field("target.name", "must not be empty"));
        }
        if targets.iter().any(|o| o.name == name) {
            return Err(field(
                "target.name",
                format!("duplicate target name {name:?}"),
            ));
        }
        if remote.is_none() && targets.iter().any(|o| o.remote.is_none() && o.path == path) {
            return Err(field(
                "target",
                format!("{} is listed twice", path.display()),
            ));
        }
        targets.push(Target {
            name,
            path,
            remote,
            adopt: t.adopt,
        });
    }
    Ok(targets)
}

/// A local target's path, canonical: no remote-only key, and neither
/// inside the source nor containing it, by path or through a mount.
fn local_target(
    t: &TargetConfig,
    source: &Path,
    mounts: &[crate::mounts::Mount],
) -> Result<PathBuf, ConfigError> {
    if t.ssh_identity.is_some()
        || !t.ssh_args.is_empty()
        || t.ssh_prefer_aes_gcm.is_some()
        || t.remote_command.is_some()
        || t.token_file.is_some()
        || t.compress
        || t.bwlimit.is_some()
        || t.atomic_new_files
    {
        return Err(field(
            "target",
            format!(
                "{}: ssh_*, remote_command, token_file, compress, bwlimit and atomic_new_files apply to ssh:// and tcp:// targets only",
                t.path.display()
            ),
        ));
    }
    let path = canonical_lenient(&t.path)
        .map_err(|e| field("target", format!("{}: {e}", t.path.display())))?;
    let problem = if path.starts_with(source) {
        format!(
            "{} is inside the source {}",
            path.display(),
            source.display()
        )
    } else if source.starts_with(&path) {
        format!(
            "{} contains the source {}",
            path.display(),
            source.display()
        )
    } else if let Some(at) = crate::mounts::visible_inside(mounts, source, &path) {
        format!(
            "{} is also reachable inside the source as {} (a mount): the mirror would be copied into itself",
            path.display(),
            at.display()
        )
    } else if let Some(at) = crate::mounts::visible_inside(mounts, &path, source) {
        format!(
            "{} shows the source again at {} (a mount): the mirror would be written into the source",
            path.display(),
            at.display()
        )
    } else {
        return Ok(path);
    };
    Err(field("target", problem))
}

/// `state_dir` (or the default for `source`), canonical: not inside the
/// source (by path or through a mount), and apart from every local target.
fn state_dir(
    raw: Option<&Path>,
    source: &Path,
    mounts: &[crate::mounts::Mount],
    targets: &[Target],
) -> Result<PathBuf, ConfigError> {
    let state_dir = raw.map_or_else(|| default_state_dir(source), Path::to_path_buf);
    let state_dir = canonical_lenient(&state_dir)
        .map_err(|e| field("state_dir", format!("{}: {e}", state_dir.display())))?;
    if state_dir.starts_with(source) {
        return Err(field(
            "state_dir",
            format!(
                "{} is inside the source {}",
                state_dir.display(),
                source.display()
            ),
        ));
    }
    if let Some(at) = crate::mounts::visible_inside(mounts, source, &state_dir) {
        return Err(field(
            "state_dir",
            format!(
                "{} is also reachable inside the source as {} (a mount)",
                state_dir.display(),
                at.display()
            ),
        ));
    }
    for t in targets.iter().filter(|t| t.remote.is_none()) {
        if state_dir.starts_with(&t.path) || t.path.starts_with(&state_dir) {
            return Err(field(
                "state_dir",
                format!(
                    "{} overlaps the target {}",
                    state_dir.display(),
                    t.path.display()
                ),
            ));
        }
    }
    Ok(state_dir)
}

/// Parses a `--delay` argument.
pub fn parse_delay_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, String, String) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("src")).unwrap();
        let s = t.path().join("src").display().to_string();
        let d = t.path().join("dst").display().to_string();
        (t, s, d)
    }

    fn err(text: &str) -> String {
        Config::from_toml(text, "c.toml").unwrap_err().to_string()
    }

    #[test]
    fn full_config_parses() {
        let (t, s, d) = dirs();
        let c = Config::from_toml(
            &format!(
                "source = {s:?}\nstate_dir = {:?}\nexclude = [\"*.tmp\"]\ndelete = \"running\"\ndelay = \"250ms\"\nwatch = \"inotify\"\n[backlog]\nmax_entries = 5\n[[target]]\nname = \"dr\"\npath = {d:?}\n",
                t.path().join("state").display().to_string()
            ),
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.delete, DeleteMode::Running);
        assert_eq!(c.delay, Duration::from_millis(250));
        assert_eq!(c.backlog.max_entries, 5);
        assert_eq!(c.targets[0].name, "dr");
    }

    #[test]
    fn errors_name_the_field() {
        let (_t, s, d) = dirs();
        assert!(err(&format!("sorce = {s:?}")).contains("sorce"));
        let e = err(&format!(
            "source = {s:?}\ndelete = 3\n[[target]]\npath = {d:?}\n"
        ));
        assert!(e.contains("delete"), "{e}");
        let e = err(&format!(
            "source = {s:?}\ndelay = \"soon\"\n[[target]]\npath = {d:?}\n"
        ));
        assert!(e.contains("delay"), "{e}");
        let e = err(&format!(
            "source = \"/nonexistent/x\"\n[[target]]\npath = {d:?}\n"
        ));
        assert!(e.contains("`source`"), "{e}");
        let e = err(&format!(
            "source = {s:?}\n[[target]]\npath = \"{s}/inner\"\n"
        ));
        assert!(e.contains("`target`") && e.contains("inside"), "{e}");
        let e = err(&format!(
            "source = {s:?}\nstate_dir = \"{s}/st\"\n[[target]]\npath = {d:?}\n"
        ));
        assert!(e.contains("`state_dir`"), "{e}");
        let e = err(&format!("source = {s:?}\n"));
        assert!(e.contains("target"), "{e}");
        assert!(!err("source = [").contains('\n'));
    }

    #[test]
    fn remote_target_options_are_checked() {
        let (t, s, d) = dirs();
        let tok = t.path().join("token");
        std::fs::write(&tok, "secret\n").unwrap();
        let cfg = |target: &str| format!("source = {s:?}\n[[target]]\n{target}\n");
        let c = Config::from_toml(
            &cfg("path = \"ssh://u@dr:2222/srv/m\"\nssh_identity = \"/k\"\ncompress = true\nbwlimit = \"2M\""),
            "c.toml",
        )
        .unwrap();
        let r = c.targets[0].remote.as_ref().unwrap();
        assert!(r.compress);
        assert_eq!(r.bwlimit, 2 << 20);
        assert!(!r.atomic_new_files);
        assert!(r.prefer_aes_gcm, "AES-GCM is preferred unless turned off");
        let c = Config::from_toml(
            &cfg("path = \"ssh://dr/srv/m\"\nssh_prefer_aes_gcm = false"),
            "c.toml",
        )
        .unwrap();
        assert!(!c.targets[0].remote.as_ref().unwrap().prefer_aes_gcm);
        let e = err(&cfg(&format!("path = {d:?}\nssh_prefer_aes_gcm = false")));
        assert!(e.contains("ssh_*") && e.contains("ssh://"), "{e}");
        let c = Config::from_toml(
            &cfg("path = \"ssh://dr/srv/m\"\natomic_new_files = true"),
            "c.toml",
        )
        .unwrap();
        assert!(c.targets[0].remote.as_ref().unwrap().atomic_new_files);
        let e = err(&cfg(&format!("path = {d:?}\natomic_new_files = true")));
        assert!(
            e.contains("atomic_new_files") && e.contains("ssh://"),
            "{e}"
        );
        let e = err(&cfg("path = \"tcp://dr:7878/srv/m\""));
        assert!(e.contains("token_file"), "{e}");
        let e = err(&cfg(&format!(
            "path = \"ssh://dr/srv/m\"\ntoken_file = {:?}",
            tok.display().to_string()
        )));
        assert!(e.contains("token_file") && e.contains("tcp://"), "{e}");
        let e = err(&cfg(&format!("path = {d:?}\ncompress = true")));
        assert!(e.contains("ssh://"), "{e}");
        let e = err(&cfg("path = \"ssh://dr/srv/m\"\nbwlimit = \"fast\""));
        assert!(e.contains("bwlimit"), "{e}");
        let e = err(&cfg("path = \"ssh://dr/relative\"\n").replace("/relative", ""));
        assert!(e.contains("path"), "{e}");
    }
}
