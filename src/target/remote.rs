//! A mirror on another machine, reached over ssh (`ssh://[user@]host[:port]/path`,
//! running `drmirror receive --root /path` on the far side, as rsync does)
//! or TCP (`tcp://host:port/path`, a `drmirror receive --listen` with a
//! shared token).
//!
//! One connection per target carries everything: batches from the
//! shipper's parallel groups, listings for compare walks, syncs from the
//! flusher. Frames from several threads interleave (each frame is written
//! whole under a lock); a reader thread routes every reply to whoever waits
//! for its id, so any number of batches are in flight at once.
//!
//! When the connection breaks, every waiter gets
//! [`ApplyError::Unreachable`]; nothing is recorded as applied, so the
//! backlog simply stays in the journal. The next use reconnects, no sooner
//! than a capped exponential backoff with jitter allows; while it waits the
//! shipper sleeps (see [`RemoteTarget::ready`]) instead of spinning on the
//! backlog.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::{ApplyError, Outcome};
use crate::fidelity::{self, Handle, Keep, Refusals, Xattrs};
use crate::fsops::{self, Root};
use crate::journal::flags;
use crate::links::{Claim, InodeKey, Mirrored};
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::protocol::{
    self, Chunk, Done, Entry, FrameError, Op, Reply, Request, BLOCK, CHUNK, DELTA_MIN, MAGIC,
    VERSION, WHOLE_MAX,
};
use crate::target::local::DeletePolicy;

/// The first and longest wait between connection attempts. A `tcp://`
/// attempt is one `connect(2)`, refused at once by a machine that is up
/// without its receiver: cheap enough to repeat four times a second, so
/// that a catch-up after an outage starts within a quarter second of the
/// receiver's return (`tools/bench-vs-lsyncd --only outage`: catch-up of
/// 20,000 changes 4.4 s with a 4 s cap, 1.7 s with 1 s, 0.95 s with
/// 0.25 s; CPU while down 0.34 s and 0.58 s in 30 s). An `ssh://` attempt
/// starts a process and authenticates: every few seconds.
const TCP_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(250));
const SSH_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(4));
/// An ssh child's stdout, stdin, and the child.
type SshPipes = (Box<dyn Read + Send>, Box<dyn Write + Send>, Child);
/// How often a target that stays unreachable is logged again.
const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(60);
/// A reply not seen in this long means a hung link: the connection is
/// dropped and made again.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);
const COPY_TRIES: u32 = 3;

/// Where and how to reach a remote target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub transport: Transport,
    /// Directory on the far side.
    pub path: PathBuf,
    /// ssh: identity file (`-i`).
    pub identity: Option<PathBuf>,
    /// ssh: more arguments, before the host (e.g. `-o`, `Compression=no`).
    pub ssh_args: Vec<String>,
    /// ssh: prefer AES-GCM where the CPU runs it in hardware (see
    /// [`super::ssh_cipher`]).
    pub prefer_aes_gcm: bool,
    /// ssh: the program to run on the far side (default `drmirror`).
    pub command: String,
    /// tcp: the shared secret.
    pub token: Option<String>,
    /// zstd-compress file data on the wire.
    pub compress: bool,
    /// Bytes per second on the wire, 0 for no limit.
    pub bwlimit: u64,
    /// Never let the receiver create a file at its name ([`Op::Whole`]'s
    /// `fresh`): every file goes through a temp file.
    pub atomic_new_files: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

/// Why a target URL is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("{0}: expected ssh://[user@]host[:port]/path or tcp://host:port/path")]
    Form(String),
    #[error("{0}: bad port")]
    Port(String),
    #[error("{0}: the path must be absolute (ssh://host/srv/mirror)")]
    Path(String),
}

/// True when `s` names a remote target rather than a local directory.
pub fn is_url(s: &str) -> bool {
    s.starts_with("ssh://") || s.starts_with("tcp://")
}

/// Parses `ssh://[user@]host[:port]/path` or `tcp://host:port/path`
/// (IPv6 hosts in brackets).
pub fn parse_url(url: &str) -> Result<(Transport, PathBuf), UrlError> {
    let (tcp, rest) = if let Some(r) = url.strip_prefix("ssh://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (true, r)
    } else {
        return Err(UrlError::Form(url.into()));
    };
    let Some(slash) = rest.find('/') else {
        return Err(UrlError::Path(url.into()));
    };
    let (auth, path) = rest.split_at(slash);
    if path.len() < 2 {
        return Err(UrlError::Path(url.into()));
    }
    let (user, hostport) = match auth.rsplit_once('@') {
        Some((u, h)) if !tcp && !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(UrlError::Form(url.into())),
        None => (None, auth),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(UrlError::Form(url.into()));
        };
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(UrlError::Form(url.into()));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| UrlError::Port(url.into()))?,
        ),
    };
    let transport = if tcp {
        Transport::Tcp {
            host,
            port: port.ok_or_else(|| UrlError::Port(url.into()))?,
        }
    } else {
        Transport::Ssh { user, host, port }
    };
    Ok((transport, PathBuf::from(path)))
}

/// The last lines of ssh's stderr kept for an error message.
const SSH_LINES_KEPT: usize = 5;

/// Why an ssh connection closed before the handshake, from what ssh said
/// (it has exited: its stderr ends, and the thread reading it with it),
/// with the next step for the common causes.
fn ssh_failure(child: &mut Child, said: &Mutex<Vec<String>>) -> String {
    // ssh is gone or going: wait for its exit status (and so for its last
    // words to be read), a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    // The reader thread takes the last lines as ssh's stderr closes.
    let deadline = Instant::now() + Duration::from_millis(500);
    let lines = loop {
        let l = said.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !l.is_empty() || Instant::now() >= deadline {
            break l;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(last) = lines.iter().rev().find(|l| !l.trim().is_empty()) else {
        return format!(
            "the connection closed during the handshake (ssh exited {}, saying nothing; is drmirror installed on the far side? see `remote_command`)",
            status.map_or("?".to_string(), |s| s.to_string())
        );
    };
    let all = lines.join("\n");
    let hint = if all.contains("Permission denied") {
        "authentication failed: check `ssh_identity` and that its public key is in the remote user's authorized_keys"
    } else if all.contains("Host key verification failed")
        || all.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
    {
        "the host key is unknown or changed: connect once with ssh by hand to accept it, or check known_hosts"
    } else if all.contains("Connection refused")
        || all.contains("Could not resolve")
        || all.contains("timed out")
        || all.contains("No route to host")
    {
        "the DR host or its sshd cannot be reached"
    } else if all.contains("not found") || all.contains("No such file") {
        "drmirror is not where `remote_command` says on the far side"
    } else {
        "see ssh's messages above"
    };
    let last = last.strip_prefix("ssh: ").unwrap_or(last);
    format!("ssh: {last} ({hint})")
}

/// Quotes `s` for the remote shell ssh hands the command to.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One live connection.
struct Conn {
    writer: Mutex<Writer>,
    waiters: Mutex<HashMap<u64, Sender<Reply>>>,
    dead: AtomicBool,
    child: Mutex<Option<Child>>,
    /// The receiving machine's boot id (`Welcome`), if it reported one.
    boot: Option<Vec<u8>>,
    /// What its root showed of itself (`Welcome`).
    root: super::identity::Seen,
}

/// Which boot of the receiving machine the connections served.
#[derive(Default)]
struct Epoch {
    /// Counts changes of boot id between one connection and the next.
    gen: u64,
    boot: Option<Vec<u8>>,
    connected: bool,
}

struct Writer {
    out: BufWriter<Box<dyn Write + Send>>,
    /// Bandwidth limit state: bytes sent since `since`.
    since: Instant,
    sent: u64,
}

impl Conn {
    fn fail_all(&self) {
        self.dead.store(true, Ordering::Release);
        // Dropping the senders wakes every waiter with an error.
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.fail_all();
    }
}

struct Backoff {
    next: Instant,
    delay: Duration,
    /// The transport's first and longest delay (see [`TCP_BACKOFF`]).
    min: Duration,
    max: Duration,
    failures: u32,
    /// When the last "cannot reach" line was logged.
    logged: Option<Instant>,
    seed: u64,
    /// Why the last attempt failed: what `status` shows while waiting.
    last: Option<String>,
}

impl Backoff {
    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift: jitter needs no crypto-grade randomness, and a shared
        // outage must not make every daemon reconnect in lockstep.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = (self.seed % 1000) as f64 / 1000.0; // 0..1
        d.mul_f64(0.75 + frac * 0.5)
    }
}

pub struct RemoteTarget {
    name: String,
    spec: RemoteSpec,
    owner: bool,
    conn: Mutex<Option<Arc<Conn>>>,
    backoff: Mutex<Backoff>,
    ids: AtomicU64,
    /// Serialises connection attempts.
    connecting: Mutex<()>,
    epoch: Mutex<Epoch>,
    /// Bytes written to the wire (all frames).
    pub wire_bytes: Arc<AtomicU64>,
    /// ssh: the `Ciphers` option to pass, worked out once (see
    /// [`RemoteTarget::ciphers`]).
    ciphers: Arc<OnceLock<Option<String>>>,
    /// A daemon's: the journal that knows this target (see
    /// [`RemoteTarget::guard_identity`]).
    guard: OnceLock<Guard>,
    /// What is kept beyond content (see [`crate::fidelity`]).
    keep: Keep,
    /// What the receiver refused.
    refusals: Refusals,
    /// Where the receiver holds copies of hard-linked source files (see
    /// [`crate::links::Mirrored`]).
    mirrored: Arc<Mirrored>,
}

/// What a daemon's remote target checks its receiver's root against at
/// each connection (see [`super::identity::settle_seen`]).
struct Guard {
    journal: Arc<crate::journal::Journal>,
    t: crate::journal::TargetId,
    /// Set once the startup scan has read what the journal knows of the
    /// target: an index forgotten after that also needs the whole tree
    /// compared again by the shipper.
    scan_begun: AtomicBool,
    /// When a start deletes what the source lacks: what a first
    /// connection looks for it with, and whether the target is adopted
    /// (see [`super::adopt`]).
    wrong_target: Option<WrongTarget>,
}

/// The source and its filter, to look for what a first start would
/// delete, and whether the target is adopted (see [`super::adopt`]).
pub type WrongTarget = (Arc<Root>, Arc<crate::filter::Filter>, bool);

impl RemoteTarget {
    pub fn new(name: &str, spec: RemoteSpec, owner: bool) -> RemoteTarget {
        let (min, max) = match spec.transport {
            Transport::Tcp { .. } => TCP_BACKOFF,
            Transport::Ssh { .. } => SSH_BACKOFF,
        };
        let seed = (std::process::id() as u64) << 32
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(1)
            | 1;
        let ciphers = Arc::new(OnceLock::new());
        if let Some(dest) = ssh_dest(&spec.transport).filter(|_| spec.prefer_aes_gcm) {
            // `ssh -G` takes tens of milliseconds: done while the daemon
            // starts, not in front of the first connection.
            let (c, name, spec) = (ciphers.clone(), name.to_string(), spec.clone());
            let _ = std::thread::Builder::new()
                .name("ssh-cipher".into())
                .spawn(move || {
                    c.get_or_init(|| work_out_ciphers(&name, &spec, &dest));
                });
        }
        RemoteTarget {
            ciphers,
            guard: OnceLock::new(),
            keep: Keep::all(),
            refusals: Refusals::new(name),
            mirrored: Arc::default(),
            name: name.to_string(),
            spec,
            owner,
            conn: Mutex::new(None),
            backoff: Mutex::new(Backoff {
                next: Instant::now(),
                delay: min,
                min,
                max,
                failures: 0,
                logged: None,
                seed,
                last: None,
            }),
            ids: AtomicU64::new(1),
            connecting: Mutex::new(()),
            epoch: Mutex::new(Epoch::default()),
            wire_bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes that the receiver holds a current copy of hard-linked source
    /// file `rel` (`m`), for its other names to link to.
    pub fn note_mirrored(&self, rel: &[u8], m: &Meta) {
        self.mirrored.note((m.dev, m.ino), rel);
    }

    /// This target keeps `keep` (everything by default).
    pub fn keeping(mut self, keep: Keep) -> RemoteTarget {
        self.keep = keep;
        self
    }

    pub fn keep(&self) -> Keep {
        self.keep
    }

    /// What the receiver refused so far (see [`Refusals`]).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The source attributes of `h` this target keeps.
    fn source_xattrs(&self, h: Handle<'_>, rel: &[u8]) -> Result<Option<Xattrs>, ApplyError> {
        self.keep
            .read(h)
            .map_err(|e| ApplyError::source_read(rel, e))
    }

    /// Notes what the receiver refused for `rel`.
    fn note_refused(&self, rel: &[u8], done: &Done) {
        if let Done::Partial { refused } = done {
            for k in refused {
                self.refusals.note(k, &paths::display(rel));
            }
        }
    }

    pub fn describe(&self) -> String {
        match &self.spec.transport {
            Transport::Ssh { user, host, port } => format!(
                "ssh://{}{host}{}{}",
                user.as_ref().map(|u| format!("{u}@")).unwrap_or_default(),
                port.map(|p| format!(":{p}")).unwrap_or_default(),
                self.spec.path.display()
            ),
            Transport::Tcp { host, port } => {
                format!("tcp://{host}:{port}{}", self.spec.path.display())
            }
        }
    }

    fn unreachable(&self, reason: impl Into<String>) -> ApplyError {
        ApplyError::Unreachable {
            target: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// The live connection, connecting when the backoff allows. `Err`
    /// carries how long until the next attempt.
    pub fn ready(&self) -> Result<(), Duration> {
        self.conn().map(|_| ()).map_err(|_| {
            let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
            b.next.saturating_duration_since(Instant::now())
        })
    }

    fn conn(&self) -> Result<Arc<Conn>, ApplyError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _g = self.connecting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.live() {
            return Ok(c);
        }
        {
            let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
            if Instant::now() < b.next {
                return Err(self.unreachable(match &b.last {
                    Some(why) => format!("waiting to reconnect; the last attempt: {why}"),
                    None => "waiting to reconnect".into(),
                }));
            }
        }
        match self.connect() {
            Ok(c) => {
                let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                if b.failures > 0 {
                    tracing::info!(target = %self.name, "reconnected to {} after {} failed attempts", self.describe(), b.failures);
                } else {
                    tracing::info!(target = %self.name, "connected to {}", self.describe());
                }
                b.failures = 0;
                b.delay = b.min;
                b.logged = None;
                b.last = None;
                drop(b);
                let mut e = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
                if e.connected && e.boot != c.boot {
                    e.gen += 1;
                }
                e.boot = c.boot.clone();
                e.connected = true;
                drop(e);
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                let base = b.delay;
                let wait = b.jitter(base);
                b.next = Instant::now() + wait;
                b.delay = (b.delay * 2).min(b.max);
                b.failures += 1;
                b.last = Some(e.clone());
                metrics::counter!("drmirror_reconnects_total", "target" => self.name.clone(), "result" => "failed").increment(1);
                // One line per outage and then one a minute, not one per
                // attempt.
                if b.logged
                    .is_none_or(|at| at.elapsed() >= UNREACHABLE_LOG_EVERY)
                {
                    b.logged = Some(Instant::now());
                    tracing::warn!(target = %self.name, "cannot reach {}: {e}; retrying in {:.1}s (attempt {})", self.describe(), wait.as_secs_f64(), b.failures);
                }
                Err(self.unreachable(e))
            }
        }
    }

    /// From now on every connection checks that the receiver's root is
    /// this target, as the journal knows it, and marks it (see
    /// [`super::identity`]). Without it (`verify`, `status`) nothing is
    /// checked.
    pub fn guard_identity(
        &self,
        journal: Arc<crate::journal::Journal>,
        t: crate::journal::TargetId,
        wrong_target: Option<WrongTarget>,
    ) {
        let _ = self.guard.set(Guard {
            journal,
            t,
            scan_begun: AtomicBool::new(false),
            wrong_target,
        });
    }

    /// Connects now, if the target can be reached, so that its identity is
    /// settled before the startup scan trusts the journal's index of it;
    /// then notes that the scan begins.
    pub fn settle_before_scan(&self) {
        if let Err(e) = self.conn() {
            tracing::info!(target = %self.name, "startup scan begins with the target unreachable ({e}); its identity is checked when it connects");
        }
        if let Some(g) = self.guard.get() {
            g.scan_begun.store(true, Ordering::Release);
        }
    }

    /// Checks a new connection's root against the journal (see
    /// [`super::identity::settle_seen`]) and marks it. `Err`: not the
    /// target, or it could not be marked; nothing has been written there.
    fn settle_identity(&self, c: &Conn, seen: &super::identity::Seen) -> Result<(), String> {
        let Some(g) = self.guard.get() else {
            return Ok(());
        };
        if let Some((source, filter, adopt)) = &g.wrong_target {
            let first = super::identity::first_use_seen(&g.journal, g.t, seen)
                .map_err(|e| e.to_string())?;
            if first {
                super::adopt::extraneous_by(source, filter, |visit| {
                    self.walk_on(Some(c), b"", visit, |_, _| {})
                })
                .judge(&self.name, *adopt)
                .map_err(|why| format!("target {} {why}", self.name))?;
            }
        }
        let (distrust, mark) =
            super::identity::settle_seen(&g.journal, g.t, &self.name, &self.describe(), seen)
                .map_err(|e| e.to_string())?;
        if distrust.is_some() && g.scan_begun.load(Ordering::Acquire) {
            // The startup scan went by the index just forgotten.
            g.journal
                .enqueue(g.t, &[(Vec::new(), flags::RECURSIVE | flags::LIVE)])
                .map_err(|e| e.to_string())?;
        }
        let Some(mark) = mark else {
            return Ok(());
        };
        match self.query_on(c, |id| Request::Mark { id, mark }) {
            Ok(Reply::Done { result: Ok(_), .. }) => Ok(()),
            Ok(Reply::Done { result: Err(e), .. }) | Ok(Reply::Failed { error: e, .. }) => {
                Err(format!("cannot mark the target's root: {e}"))
            }
            Ok(other) => Err(format!("unexpected reply to Mark: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn live(&self) -> Option<Arc<Conn>> {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some(c) if !c.dead.load(Ordering::Acquire) => Some(c.clone()),
            Some(_) => {
                *g = None;
                let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                // A connection that just died: the first retry is quick.
                b.next = Instant::now() + b.min;
                None
            }
            None => None,
        }
    }

    /// The `Ciphers` value for ssh (see [`super::ssh_cipher`]): the one
    /// `new` started working out, waited for if need be.
    fn ciphers(&self, dest: &[String]) -> Option<&str> {
        self.ciphers
            .get_or_init(|| work_out_ciphers(&self.name, &self.spec, dest))
            .as_deref()
    }

    /// Opens the transport and does the handshake.
    fn connect(&self) -> Result<Arc<Conn>, String> {
        let mut tcp: Option<TcpStream> = None;
        let ssh_said: Arc<Mutex<Vec<String>>> = Arc::default();
        let (mut r, w, mut child): (Box<dyn Read + Send>, Box<dyn Write + Send>, Option<Child>) =
            match &self.spec.transport {
                Transport::Ssh { .. } => {
                    let (r, w, child) = self.spawn_ssh(&ssh_said)?;
                    (r, w, Some(child))
                }
                Transport::Tcp { host, port } => {
                    let s = self.dial(host, *port)?;
                    let w = s.try_clone().map_err(|e| e.to_string())?;
                    tcp = Some(s.try_clone().map_err(|e| e.to_string())?);
                    (Box::new(s), Box::new(w), None)
                }
            };
        let mut out = BufWriter::with_capacity(256 * 1024, w);
        let mut buf = Vec::new();
        protocol::write_frame(
            &mut out,
            &Request::Hello {
                magic: MAGIC,
                version: VERSION,
                token: self.spec.token.clone(),
                root: match self.spec.transport {
                    Transport::Tcp { .. } => Some(self.spec.path.as_os_str().as_bytes().to_vec()),
                    Transport::Ssh { .. } => None,
                },
            },
        )
        .and_then(|_| out.flush().map_err(FrameError::Io))
        .map_err(|e| format!("handshake: {e}"))?;
        let (boot, root) = match protocol::read_frame::<_, Reply>(&mut r, &mut buf) {
            Ok(Reply::Welcome { boot, root, .. }) => (boot, root),
            Ok(Reply::Refused { reason }) => return Err(format!("receiver refused: {reason}")),
            Ok(other) => return Err(format!("unexpected handshake reply {other:?}")),
            Err(FrameError::Closed) | Err(FrameError::Truncated) => {
                return Err(match child.as_mut() {
                    Some(c) => ssh_failure(c, &ssh_said),
                    None => "the connection closed during the handshake".into(),
                })
            }
            Err(e) => return Err(format!("handshake: {e}")),
        };
        if let Some(s) = &tcp {
            // The handshake is done: from now on replies may take as long as
            // a large batch does (REPLY_TIMEOUT guards the waiters instead).
            s.set_read_timeout(None).map_err(|e| e.to_string())?;
        }
        let conn = Arc::new(Conn {
            writer: Mutex::new(Writer {
                out,
                since: Instant::now(),
                sent: 0,
            }),
            waiters: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            child: Mutex::new(child),
            boot,
            root: root.clone(),
        });
        let weak = Arc::downgrade(&conn);
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("recv-{name}"))
            .spawn(move || reader_loop(r, weak, name))
            .map_err(|e| format!("cannot start the reply reader: {e}"))?;
        if let Err(e) = self.settle_identity(&conn, &root) {
            conn.fail_all();
            return Err(e);
        }
        metrics::counter!("drmirror_reconnects_total", "target" => self.name.clone(), "result" => "connected").increment(1);
        Ok(conn)
    }

    /// Starts `ssh … drmirror receive`; its stderr lines go to the log and
    /// the last few into `said` (see `ssh_failure`).
    fn spawn_ssh(&self, said: &Arc<Mutex<Vec<String>>>) -> Result<SshPipes, String> {
        let mut cmd = Command::new("ssh");
        // First: for ssh the first value given for an option
        // wins, so the user's `-o` overrides the defaults below.
        cmd.args(&self.spec.ssh_args);
        cmd.args(["-o", "BatchMode=yes", "-o", "ServerAliveInterval=15"]);
        cmd.args(["-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10"]);
        let dest = ssh_dest(&self.spec.transport).unwrap_or_default();
        if let Some(c) = self.ciphers(&dest) {
            cmd.arg("-o").arg(format!("Ciphers={c}"));
        }
        if let Some(i) = &self.spec.identity {
            cmd.arg("-i").arg(i);
        }
        cmd.args(&dest);
        cmd.arg("--");
        cmd.arg(format!(
            "{} receive --root {}",
            self.spec.command,
            shell_quote(&self.spec.path.to_string_lossy())
        ));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot run ssh: {e}"))?;
        let (Some(i), Some(o), Some(err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err("ssh without pipes".into());
        };
        let name = self.name.clone();
        let said = said.clone();
        // The far side's complaints (auth, missing drmirror) are
        // the best explanation an operator gets: into our log,
        // and the last few kept for the error (see `ssh_failure`).
        let _ = std::thread::Builder::new()
            .name("ssh-stderr".into())
            .spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    // ssh's own lines start with "ssh: " already.
                    let shown = if line.starts_with("ssh: ") {
                        line.clone()
                    } else {
                        format!("ssh: {line}")
                    };
                    tracing::warn!(target = %name, "{shown}");
                    let mut s = said.lock().unwrap_or_else(|p| p.into_inner());
                    if s.len() == SSH_LINES_KEPT {
                        s.remove(0);
                    }
                    s.push(line);
                }
            });
        Ok((Box::new(o), Box::new(i), child))
    }

    /// Connects to a `tcp://` receiver, with keepalive and a handshake
    /// timeout.
    fn dial(&self, host: &str, port: u16) -> Result<TcpStream, String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("{host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host}: no address"))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        if let Err(e) = crate::keepalive::detect_dead_peer(&s) {
            tracing::warn!(target = %self.name, "cannot set TCP keepalive: {e}; a silently dead link is found only by the reply timeout");
        }
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends frames; on failure the connection is dropped.
    fn send(&self, c: &Conn, msgs: &[Request], flush: bool) -> Result<(), ApplyError> {
        let mut frames = Vec::new();
        for m in msgs {
            self.encode(c, &mut frames, m)?;
        }
        self.send_frames(c, &frames, flush)
    }

    /// Appends the frame of `m` to `frames`. Our own requests always
    /// encode; if one did not, the receiver's view of the batch would be
    /// off by one, so the connection is dropped.
    fn encode(&self, c: &Conn, frames: &mut Vec<u8>, m: &Request) -> Result<(), ApplyError> {
        protocol::encode_frame(frames, m).map(|_| ()).map_err(|e| {
            c.fail_all();
            self.unreachable(format!("encoding a {}: {e}", m.kind()))
        })
    }

    /// Writes frames encoded by [`RemoteTarget::encode`] (outside the
    /// writer's lock, which the senders share); on failure the connection
    /// is dropped.
    fn send_frames(&self, c: &Conn, frames: &[u8], flush: bool) -> Result<(), ApplyError> {
        if c.dead.load(Ordering::Acquire) {
            return Err(self.unreachable("connection lost"));
        }
        let mut w = c.writer.lock().unwrap_or_else(|p| p.into_inner());
        let n = frames.len();
        let r = (|| -> Result<(), FrameError> {
            w.out.write_all(frames)?;
            if flush {
                w.out.flush()?;
            }
            Ok(())
        })();
        self.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!("drmirror_wire_bytes_total", "target" => self.name.clone())
            .increment(n as u64);
        if self.spec.bwlimit > 0 {
            // Token bucket over a one-second window, held under the writer
            // lock so that the limit covers the whole connection.
            w.sent += n as u64;
            let due = Duration::from_secs_f64(w.sent as f64 / self.spec.bwlimit as f64);
            let el = w.since.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
            if w.since.elapsed() > Duration::from_secs(1) {
                w.since = Instant::now();
                w.sent = 0;
            }
        }
        drop(w);
        r.map_err(|e| {
            c.fail_all();
            self.unreachable(format!("send: {e}"))
        })
    }

    fn register(&self, c: &Conn, id: u64) -> Receiver<Reply> {
        let (tx, rx) = crossbeam_channel::unbounded();
        c.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        rx
    }

    fn wait(&self, c: &Conn, rx: &Receiver<Reply>) -> Result<Reply, ApplyError> {
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                c.fail_all();
                Err(self.unreachable("no reply for 5 minutes; reconnecting"))
            }
            Err(_) => Err(self.unreachable("connection lost")),
        }
    }

    /// One query, answered by one reply.
    fn query(&self, make: impl FnOnce(u64) -> Request) -> Result<Reply, ApplyError> {
        let c = self.conn()?;
        self.query_on(&c, make)
    }

    fn query_on(&self, c: &Conn, make: impl FnOnce(u64) -> Request) -> Result<Reply, ApplyError> {
        let id = self.next_id();
        let rx = self.register(c, id);
        self.send(c, &[make(id)], true)?;
        let r = self.wait(c, &rx);
        c.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        r
    }

    /// The entries of directory `dir` on the target, with their extended
    /// attributes in namespaces `ns`; `None` when missing.
    pub fn list(&self, dir: &[u8], ns: u8) -> io::Result<Option<Vec<Entry>>> {
        let c = self.conn().map_err(io::Error::other)?;
        self.list_on(&c, dir, ns)
    }

    /// [`RemoteTarget::list`] on connection `c`.
    fn list_on(&self, c: &Conn, dir: &[u8], ns: u8) -> io::Result<Option<Vec<Entry>>> {
        let id = self.next_id();
        let rx = self.register(c, id);
        let res = (|| {
            self.send(
                c,
                &[Request::List {
                    id,
                    dir: dir.to_vec(),
                    ns,
                }],
                true,
            )?;
            let mut all = Vec::new();
            loop {
                match self.wait(c, &rx)? {
                    Reply::Listing {
                        entries: None,
                        more: false,
                        ..
                    } => return Ok(None),
                    Reply::Listing {
                        entries: Some(e),
                        more,
                        ..
                    } => {
                        all.extend(e);
                        if !more {
                            return Ok(Some(all));
                        }
                    }
                    Reply::Failed { error, .. } => {
                        return Err(ApplyError::TargetWrite {
                            path: paths::display(dir),
                            source: io::Error::other(error),
                        })
                    }
                    other => return Err(self.unreachable(format!("unexpected reply {other:?}"))),
                }
            }
        })();
        c.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        res.map_err(io::Error::other)
    }

    /// What the receiver's root showed of itself when connecting (its
    /// mark: whether drmirror wrote there before).
    pub fn root_seen(&self) -> io::Result<super::identity::Seen> {
        Ok(self.conn().map_err(io::Error::other)?.root.clone())
    }

    /// Whether the receiver may write beneath its root (`Err`: why not).
    pub fn writable(&self) -> io::Result<()> {
        match self
            .query(|id| Request::Writable { id })
            .map_err(io::Error::other)?
        {
            Reply::Done { result: Ok(_), .. } => Ok(()),
            Reply::Done { result: Err(e), .. } | Reply::Failed { error: e, .. } => {
                Err(io::Error::other(e))
            }
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    /// The BLAKE3 hash of the target's file `rel`, computed by the
    /// receiver; `None` when it holds no regular file there.
    pub fn hash(&self, rel: &[u8]) -> io::Result<Option<[u8; 32]>> {
        match self
            .query(|id| Request::Hash {
                id,
                rel: rel.to_vec(),
            })
            .map_err(io::Error::other)?
        {
            Reply::Hash { hash, .. } => Ok(hash),
            Reply::Failed { error, .. } => Err(io::Error::other(error)),
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    pub fn lstat(&self, rel: &[u8]) -> io::Result<Option<Meta>> {
        match self
            .query(|id| Request::Stat {
                id,
                rel: rel.to_vec(),
            })
            .map_err(io::Error::other)?
        {
            Reply::Stat { meta, .. } => Ok(meta),
            Reply::Failed { error, .. } => Err(io::Error::other(error)),
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    /// [`RemoteTarget::lstat`] of each of `rels`, the requests sent at
    /// once and their replies awaited after (one round trip, not one per
    /// path: the start's index sample looks up a thousand).
    pub fn lstat_many(&self, rels: &[Vec<u8>]) -> Vec<io::Result<Option<Meta>>> {
        let c = match self.conn() {
            Ok(c) => c,
            Err(e) => {
                let e = e.to_string();
                return rels
                    .iter()
                    .map(|_| Err(io::Error::other(e.clone())))
                    .collect();
            }
        };
        let asked: Vec<(u64, Receiver<Reply>)> = rels
            .iter()
            .map(|_| {
                let id = self.next_id();
                (id, self.register(&c, id))
            })
            .collect();
        let reqs: Vec<Request> = asked
            .iter()
            .zip(rels)
            .map(|((id, _), rel)| Request::Stat {
                id: *id,
                rel: rel.clone(),
            })
            .collect();
        let sent = self.send(&c, &reqs, true);
        let out = asked
            .iter()
            .map(|(_, rx)| match &sent {
                Err(e) => Err(io::Error::other(e.to_string())),
                Ok(()) => match self.wait(&c, rx).map_err(io::Error::other)? {
                    Reply::Stat { meta, .. } => Ok(meta),
                    Reply::Failed { error, .. } => Err(io::Error::other(error)),
                    other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
                },
            })
            .collect();
        let mut w = c.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for (id, _) in &asked {
            w.remove(id);
        }
        out
    }

    /// The receiving machine's boot id as of the last connection, and a
    /// counter that moves whenever a connection finds another boot than
    /// the connection before it: copies applied while the counter stayed
    /// put were all applied during that boot.
    /// Why the target cannot be reached, while it cannot: the last
    /// connection attempt's error (`None` once connected).
    pub fn unreachable_reason(&self) -> Option<String> {
        let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        b.last
            .as_ref()
            .map(|why| format!("cannot reach {}: {why}", self.describe()))
    }

    pub fn boot_epoch(&self) -> (u64, Option<Vec<u8>>) {
        let e = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        (e.gen, e.boot.clone())
    }

    /// Has the receiver flush its filesystem; returns the boot id of the
    /// machine that did (`None`: not reported). An unreachable receiver is
    /// `NotConnected`: nothing is known of its disk, unlike a failed flush.
    pub fn sync(&self) -> io::Result<Option<Vec<u8>>> {
        let unreachable = |e| io::Error::new(io::ErrorKind::NotConnected, e);
        let c = self.conn().map_err(unreachable)?;
        match self
            .query_on(&c, |id| Request::Sync { id })
            .map_err(unreachable)?
        {
            Reply::Done { result: Ok(_), .. } => Ok(c.boot.clone()),
            Reply::Done { result: Err(e), .. } | Reply::Failed { error: e, .. } => {
                Err(io::Error::other(e))
            }
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    /// The bytes free for the receiver on its root's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        match self
            .query(|id| Request::Space { id })
            .map_err(io::Error::other)?
        {
            Reply::Space { free, .. } => Ok(free),
            Reply::Failed { error, .. } => Err(io::Error::other(error)),
            other => Err(io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    pub fn rename(&self, from: &[u8], to: &[u8]) -> Result<bool, ApplyError> {
        match self.query(|id| Request::Rename {
            id,
            from: from.to_vec(),
            to: to.to_vec(),
        })? {
            Reply::Done { result: Ok(b), .. } => Ok(b),
            Reply::Done { result: Err(e), .. } | Reply::Failed { error: e, .. } => {
                Err(ApplyError::target_write(to, io::Error::other(e)))
            }
            other => Err(self.unreachable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sets attributes of several entries in one batch.
    pub fn set_attrs_many(
        &self,
        source: &Root,
        items: &[(Vec<u8>, Meta)],
    ) -> Vec<Result<(), ApplyError>> {
        let mut ops = Vec::with_capacity(items.len());
        for (rel, meta) in items {
            // Gone or unreadable: its own event or retry follows; the rest
            // of its attributes are still set.
            let xattrs = self.keep.read_at(source, rel).ok().flatten();
            ops.push(Op::SetAttrs {
                rel: rel.clone(),
                meta: *meta,
                xattrs,
            });
        }
        match self.batch(|b| {
            for op in ops {
                b.op(op)?;
            }
            Ok(())
        }) {
            Ok(results) => items
                .iter()
                .zip(
                    results
                        .into_iter()
                        .chain(std::iter::repeat_with(|| Err("no result".to_string()))),
                )
                .map(|((rel, _), r)| {
                    r.map(|d| self.note_refused(rel, &d))
                        .map_err(|e| ApplyError::target_write(rel, io::Error::other(e)))
                })
                .collect(),
            Err(e) => items
                .iter()
                .map(|_| Err(self.unreachable(e.to_string())))
                .collect(),
        }
    }

    /// Runs `fill` to send one batch's operations, then waits for the
    /// batch's results (one per operation sent, in order).
    fn batch(
        &self,
        fill: impl FnOnce(&mut BatchSender<'_>) -> Result<(), ApplyError>,
    ) -> Result<Vec<Result<Done, String>>, ApplyError> {
        let c = self.conn()?;
        let batch = self.next_id();
        let rx = self.register(&c, batch);
        let mut b = BatchSender {
            t: self,
            c: &c,
            batch,
            pending: FRAMES.with(|f| f.take()),
            sent_ops: 0,
            linked: HashMap::new(),
        };
        let r = fill(&mut b).and_then(|()| {
            b.push(Request::EndBatch { batch })?;
            b.flush(true)
        });
        // The buffer is reused by this thread's next batch (a fresh one
        // per batch was page faults and copies while it grew).
        if b.pending.capacity() <= FRAMES_KEPT {
            b.pending.clear();
            FRAMES.with(|f| f.replace(b.pending));
        }
        let r = r.and_then(|()| match self.wait(&c, &rx)? {
            Reply::Batch { results, .. } => Ok(results),
            other => Err(self.unreachable(format!("unexpected reply {other:?}"))),
        });
        c.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&batch);
        r
    }

    /// Applies entries sharing parent directory `parent`, as one batch.
    pub fn apply_group(
        &self,
        source: &Root,
        parent: &[u8],
        entries: &[(&[u8], u8)],
        vouch: &[super::Vouch],
        policy: DeletePolicy,
    ) -> Vec<Result<Outcome, ApplyError>> {
        let src_dir = match source.open_dir(parent, false) {
            Ok(d) => Some(d),
            Err(e) if fsops::is_missing(&e) => None,
            Err(e) => {
                return entries
                    .iter()
                    .map(|(rel, _)| Err(ApplyError::source_read(rel, io::Error::from(e.kind()))))
                    .collect()
            }
        };
        let mut plans: Vec<Plan> = Vec::with_capacity(entries.len());
        let r = self.batch(|b| {
            for (i, &(rel, f)) in entries.iter().enumerate() {
                let v = vouch.get(i).copied().unwrap_or(super::Vouch::Metadata);
                plans.push(self.plan(b, source, src_dir.as_ref(), (rel, f, v), policy)?);
            }
            Ok(())
        });
        let results = match r {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                return entries
                    .iter()
                    .map(|_| Err(self.unreachable(msg.clone())))
                    .collect();
            }
        };
        entries
            .iter()
            .zip(plans)
            .map(|(&(rel, _), p)| self.settle(rel, p, &results))
            .collect()
    }

    /// What entry `rel` (its flags `f`, what vouches for a look-alike `v`)
    /// becomes in batch `b`: an operation sent, or an outcome decided here.
    /// `src_dir`: its source directory (`None`: gone).
    fn plan(
        &self,
        b: &mut BatchSender<'_>,
        source: &Root,
        src_dir: Option<&OwnedFd>,
        (rel, f, v): (&[u8], u8, super::Vouch),
        policy: DeletePolicy,
    ) -> Result<Plan, ApplyError> {
        if let (Some(sd), true) = (src_dir, f & flags::LISTED_FILE != 0 && !rel.is_empty()) {
            // `file` finds out by its own `fstat` (see the flag), and
            // whether a doubt is needed.
            let (sent, linking) = b.file(sd.as_fd(), rel, None, (f, v))?;
            return Ok(Plan::of_file(sent, linking));
        }
        let m = match src_dir {
            None => Ok(None),
            Some(sd) if !rel.is_empty() => fsops::lstat_at(sd.as_fd(), paths::split(rel).1),
            Some(_) => source.lstat(rel),
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => return Ok(Plan::Now(Err(ApplyError::source_read(rel, e)))),
        };
        if super::needs_doubt(f, v, m.as_ref()) {
            return Ok(Plan::Now(Ok(Outcome::NeedsDoubt)));
        }
        let Some(m) = m else {
            if rel.is_empty() || !policy.allows(f) {
                return Ok(Plan::Now(Ok(Outcome::DeleteSkipped)));
            }
            let slot = b.op(Op::Delete { rel: rel.to_vec() })?;
            return Ok(Plan::sent(slot, Then::Deleted, None));
        };
        Ok(match m.kind {
            Kind::Other => Plan::Now(Ok(Outcome::Special)),
            k if k.is_special() && !self.keep.specials => Plan::Now(Ok(Outcome::Special)),
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                let name = paths::split(rel).1;
                let xattrs = match src_dir {
                    Some(sd) => self.source_xattrs(Handle::At(sd.as_fd(), name), rel),
                    None => Ok(None),
                };
                match xattrs {
                    Err(e) => Plan::Now(Err(e)),
                    Ok(xattrs) => {
                        let (linked, linking) = b.link_entry(rel, &m, &xattrs)?;
                        let slot = match linked {
                            Some(slot) => slot,
                            None => b.op(Op::Special {
                                rel: rel.to_vec(),
                                meta: m,
                                xattrs,
                            })?,
                        };
                        Plan::sent(slot, Then::Copied { meta: m, bytes: 0 }, linking)
                    }
                }
            }
            Kind::Dir => {
                let slot = b.op(Op::Mkdir { rel: rel.to_vec() })?;
                Plan::sent(slot, Then::Dir { meta: m, f }, None)
            }
            Kind::Symlink => self.plan_symlink(b, source, rel, m)?,
            Kind::File => match src_dir {
                None => Plan::Now(Ok(Outcome::Vanished)),
                Some(sd) => {
                    let (sent, linking) = b.file(sd.as_fd(), rel, Some(&m), (f, v))?;
                    Plan::of_file(sent, linking)
                }
            },
        })
    }

    /// [`RemoteTarget::plan`] of symlink `rel` (`m`).
    fn plan_symlink(
        &self,
        b: &mut BatchSender<'_>,
        source: &Root,
        rel: &[u8],
        m: Meta,
    ) -> Result<Plan, ApplyError> {
        let read = source
            .read_link(rel)
            .and_then(|t| Ok((t, self.keep.read_at(source, rel)?)));
        Ok(match read {
            Ok((text, xattrs)) => {
                let bytes = text.len() as u64;
                let (linked, linking) = b.link_entry(rel, &m, &xattrs)?;
                let slot = match linked {
                    Some(slot) => slot,
                    None => b.op(Op::Symlink {
                        rel: rel.to_vec(),
                        text,
                        meta: m,
                        xattrs,
                    })?,
                };
                Plan::sent(slot, Then::Copied { meta: m, bytes }, linking)
            }
            Err(e) if fsops::is_missing(&e) || e.raw_os_error() == Some(22) => {
                Plan::Now(Ok(Outcome::Vanished))
            }
            Err(e) => Plan::Now(Err(ApplyError::source_read(rel, e))),
        })
    }

    /// What `rel` became, by its plan `p` and the batch's `results`.
    fn settle(
        &self,
        rel: &[u8],
        p: Plan,
        results: &[Result<Done, String>],
    ) -> Result<Outcome, ApplyError> {
        let (slot, then, linking) = match p {
            Plan::Now(r) => return r,
            Plan::Sent {
                slot,
                then,
                linking,
            } => (slot, then, linking),
        };
        let done = match results
            .get(slot)
            .inspect(|r| Linking::settle(linking, r.is_ok()))
        {
            None => return Err(self.unreachable("batch result missing")),
            Some(Err(e)) => return Err(ApplyError::target_write(rel, io::Error::other(e.clone()))),
            Some(Ok(done)) => done,
        };
        Ok(match then {
            // A device the receiver may not make: not mirrored.
            Then::Copied { .. } if refused_device(done) => {
                self.note_refused(rel, done);
                Outcome::Special
            }
            Then::Deleted => Outcome::Deleted,
            Then::Copied { meta, bytes } => {
                self.note_refused(rel, done);
                Outcome::Copied { meta, bytes }
            }
            Then::Dir { meta, f } => {
                let created = matches!(done, Done::Dir { created: true });
                Outcome::Dir {
                    meta,
                    created,
                    scan: f & flags::RECURSIVE != 0 || (created && f & flags::LIVE != 0),
                }
            }
        })
    }

    /// The target's entries below `start`, walked in parallel (one listing
    /// request per directory, many in flight).
    pub fn walk<D, E>(&self, start: &[u8], on_dir: D, on_error: E)
    where
        D: Fn(&[u8], &mut [crate::scan::Child]) + Sync,
        E: Fn(&[u8], &io::Error) + Sync,
    {
        self.walk_on(None, start, on_dir, on_error)
    }

    /// [`RemoteTarget::walk`] on connection `c` (one being set up), or on
    /// the target's.
    fn walk_on<D, E>(&self, c: Option<&Conn>, start: &[u8], on_dir: D, on_error: E)
    where
        D: Fn(&[u8], &mut [crate::scan::Child]) + Sync,
        E: Fn(&[u8], &io::Error) + Sync,
    {
        fn visit<'s, D, E>(
            s: &rayon::Scope<'s>,
            t: &'s RemoteTarget,
            conn: Option<&'s Conn>,
            dir: Vec<u8>,
            on_dir: &'s D,
            on_error: &'s E,
        ) where
            D: Fn(&[u8], &mut [crate::scan::Child]) + Sync,
            E: Fn(&[u8], &io::Error) + Sync,
        {
            let listed = match conn {
                Some(c) => t.list_on(c, &dir, 0),
                None => t.list(&dir, 0),
            };
            let entries = match listed {
                Ok(Some(e)) => e,
                Ok(None) => return,
                Err(e) => {
                    on_error(&dir, &e);
                    return;
                }
            };
            let mut children: Vec<crate::scan::Child> = entries
                .into_iter()
                .map(|e| crate::scan::Child {
                    rel: paths::join(&dir, &e.name),
                    descend: e.meta.kind == Kind::Dir,
                    meta: e.meta,
                })
                .collect();
            on_dir(&dir, &mut children);
            for c in children {
                if c.descend && c.meta.kind == Kind::Dir {
                    s.spawn(move |s| visit(s, t, conn, c.rel, on_dir, on_error));
                }
            }
        }
        rayon::scope(|s| visit(s, self, c, start.to_vec(), &on_dir, &on_error));
    }

    pub fn owner(&self) -> bool {
        self.owner
    }

    /// Block hashes of the receiver's copy of `rel`, when it holds one.
    #[allow(clippy::type_complexity)]
    fn signature(&self, rel: &[u8]) -> Result<Option<(u64, Vec<[u8; 16]>)>, ApplyError> {
        Ok(
            match self.query(|id| Request::Signature {
                id,
                rel: rel.to_vec(),
            })? {
                Reply::Signature { size, blocks, .. } if !blocks.is_empty() => Some((size, blocks)),
                _ => None,
            },
        )
    }
}

/// What an entry of a group becomes: decided before the batch, or by the
/// receiver's answer to the operation sent for it.
enum Plan {
    Now(Result<Outcome, ApplyError>),
    Sent {
        slot: usize,
        then: Then,
        linking: Option<Linking>,
    },
}

/// What a sent operation means once the receiver did it.
enum Then {
    Dir { meta: Meta, f: u8 },
    Copied { meta: Meta, bytes: u64 },
    Deleted,
}

impl Plan {
    fn sent(slot: usize, then: Then, linking: Option<Linking>) -> Plan {
        Plan::Sent {
            slot,
            then,
            linking,
        }
    }

    /// A file's plan, by what sending it did.
    fn of_file(sent: FileSent, linking: Option<Linking>) -> Plan {
        match sent {
            FileSent::Sent { slot, meta, bytes } => {
                Plan::sent(slot, Then::Copied { meta, bytes }, linking)
            }
            FileSent::Now(r) => Plan::Now(r),
        }
    }
}

/// What sending a file did.
enum FileSent {
    Sent { slot: usize, meta: Meta, bytes: u64 },
    Now(Result<Outcome, ApplyError>),
}

thread_local! {
    /// A sending thread's frame buffer, between batches.
    static FRAMES: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest frame buffer kept between batches: a batch holds 256 KiB of
/// frames before it writes them, plus one frame.
const FRAMES_KEPT: usize = 4 << 20;

/// Frames of one batch on their way out: encoded as they come, and
/// written a few hundred KiB at a time, so small files do not cost a lock
/// and a syscall each.
struct BatchSender<'a> {
    t: &'a RemoteTarget,
    c: &'a Conn,
    batch: u64,
    pending: Vec<u8>,
    /// Operations sent so far: the receiver numbers results the same way.
    sent_ops: usize,
    /// The first name sent in this batch of each hard-linked source file
    /// (the receiver applies a batch in order: a later name links to it).
    linked: HashMap<InodeKey, Vec<u8>>,
}

/// A sent name of a hard-linked source file: the claim on its inode (none
/// for a later name of one claimed in the same batch), and the name it was
/// linked to, if it was (see [`crate::links::Mirrored`]).
struct Linking {
    claim: Option<Claim>,
    to: Option<Vec<u8>>,
}

impl Linking {
    /// Once the receiver answered: a name applied is a copy to link to; a
    /// link refused says its source name is not a current copy.
    fn settle(l: Option<Linking>, ok: bool) {
        let Some(Linking {
            claim: Some(mut c),
            to,
        }) = l
        else {
            return;
        };
        match (ok, to) {
            (true, _) => c.mirrored(),
            (false, Some(to)) => c.stale(&to),
            (false, None) => {}
        }
    }
}

impl BatchSender<'_> {
    fn push(&mut self, r: Request) -> Result<(), ApplyError> {
        self.t.encode(self.c, &mut self.pending, &r)?;
        if self.pending.len() >= 256 * 1024 {
            self.flush(false)?;
        }
        Ok(())
    }

    fn flush(&mut self, and_wire: bool) -> Result<(), ApplyError> {
        let r = self.t.send_frames(self.c, &self.pending, and_wire);
        self.pending.clear();
        r
    }

    /// Sends one operation; returns its result slot.
    fn op(&mut self, op: Op) -> Result<usize, ApplyError> {
        let slot = self.sent_ops;
        self.sent_ops += 1;
        self.push(Request::Op {
            batch: self.batch,
            op,
        })?;
        Ok(slot)
    }

    fn data(&mut self, file: u64, data: &[u8]) -> Result<(), ApplyError> {
        let chunk = if self.t.spec.compress {
            match zstd::bulk::compress(data, 3) {
                Ok(z) if z.len() < data.len() => Chunk::Zstd(z),
                _ => Chunk::Bytes(data.to_vec()),
            }
        } else {
            Chunk::Bytes(data.to_vec())
        };
        self.push(Request::Data { file, chunk })
    }

    /// Streams regular file `rel` (in source directory `sd`): stat before
    /// and after, as a local copy does, and a delta against the receiver's
    /// copy for large files. `seen`: its `lstat` before, if one was made.
    /// `absent`: the target should have nothing at `rel` ([`flags::ABSENT`]).
    fn file(
        &mut self,
        sd: std::os::fd::BorrowedFd<'_>,
        rel: &[u8],
        seen: Option<&Meta>,
        entry: (u8, super::Vouch),
    ) -> Result<(FileSent, Option<Linking>), ApplyError> {
        let mut linking = None;
        let sent = self.file_inner(sd, rel, seen, entry, &mut linking)?;
        if let (FileSent::Sent { meta, .. }, Some(Linking { claim: Some(_), .. })) =
            (&sent, &linking)
        {
            self.linked.insert((meta.dev, meta.ino), rel.to_vec());
        }
        Ok((sent, linking))
    }

    /// [`BatchSender::link`] for a symlink or special file `rel` (`m`): the
    /// slot of the link sent, if one was; without one, the caller sends it
    /// whole, as this batch's first name of its inode.
    fn link_entry(
        &mut self,
        rel: &[u8],
        m: &Meta,
        xattrs: &Option<Xattrs>,
    ) -> Result<(Option<usize>, Option<Linking>), ApplyError> {
        if !(self.t.keep.hard_links && m.nlink > 1) {
            return Ok((None, None));
        }
        let mut linking = None;
        let slot = match self.link(rel, m, xattrs, &mut linking)? {
            Some(FileSent::Sent { slot, .. }) => Some(slot),
            _ => None,
        };
        if slot.is_none() {
            self.linked.insert((m.dev, m.ino), rel.to_vec());
        }
        Ok((slot, linking))
    }

    /// Sends hard-linked file `rel` (`before`) as a link to another name of
    /// it the receiver holds a copy at (one sent earlier in this batch, or
    /// one remembered), if any; `linking` gets the claim on its inode
    /// either way (see [`crate::links::Mirrored`]).
    fn link(
        &mut self,
        rel: &[u8],
        before: &Meta,
        xattrs: &Option<Xattrs>,
        linking: &mut Option<Linking>,
    ) -> Result<Option<FileSent>, ApplyError> {
        let key = (before.dev, before.ino);
        let (claim, to) = match self.linked.get(&key) {
            Some(first) => (None, Some(first.clone())),
            None => {
                let (names, claim) = self.t.mirrored.claim(key, rel);
                (Some(claim), names.into_iter().next())
            }
        };
        *linking = Some(Linking {
            claim,
            to: to.clone(),
        });
        let Some(to) = to else {
            return Ok(None);
        };
        let slot = self.op(Op::Link {
            rel: rel.to_vec(),
            to,
            meta: *before,
            xattrs: xattrs.clone(),
        })?;
        Ok(Some(FileSent::Sent {
            slot,
            meta: *before,
            bytes: 0,
        }))
    }

    fn file_inner(
        &mut self,
        sd: std::os::fd::BorrowedFd<'_>,
        rel: &[u8],
        seen: Option<&Meta>,
        (f, vouch): (u8, super::Vouch),
        linking: &mut Option<Linking>,
    ) -> Result<FileSent, ApplyError> {
        let name = paths::split(rel).1;
        let absent = f & flags::ABSENT != 0;
        for _attempt in 1..=COPY_TRIES {
            let src = match fsops::open_source_at(sd, name) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::LOOP) => {
                    return Ok(FileSent::Now(Ok(Outcome::Vanished)))
                }
                Err(e) => return Ok(FileSent::Now(Err(ApplyError::source_read(rel, e.into())))),
            };
            let st = match rustix::fs::fstat(&src) {
                Ok(st) => st,
                Err(e) => return Ok(FileSent::Now(Err(ApplyError::source_read(rel, e.into())))),
            };
            let before = Meta::from_stat(&st);
            if before.kind != Kind::File {
                return Ok(FileSent::Now(Ok(Outcome::Vanished)));
            }
            if super::needs_doubt(f, vouch, Some(&before)) {
                // Replaced since the lstat that found no doubt needed.
                return Ok(FileSent::Now(Ok(Outcome::NeedsDoubt)));
            }
            let xattrs = match self.t.source_xattrs(Handle::Fd(src.as_fd()), rel) {
                Ok(x) => x,
                Err(e) => return Ok(FileSent::Now(Err(e))),
            };
            if linking.is_none() && self.t.keep.hard_links && before.nlink > 1 {
                if let Some(sent) = self.link(rel, &before, &xattrs, linking)? {
                    return Ok(sent);
                }
            }
            if before.size <= WHOLE_MAX {
                let fresh = absent && !self.t.spec.atomic_new_files;
                match self.whole(&src, rel, &before, fresh, xattrs)? {
                    Some(sent) => return Ok(sent),
                    None => continue,
                }
            }
            let sig = if before.size >= DELTA_MIN && seen.is_none_or(|s| s.size >= DELTA_MIN) {
                self.flush(false)?;
                self.t.signature(rel)?
            } else {
                None
            };
            // Holes are sent as holes; a delta is sent as it always was.
            let extents = match sig.is_none()
                && self.t.keep.sparse
                && fidelity::looks_sparse(before.size, st.st_blocks as u64)
            {
                false => None,
                true => match fidelity::data_extents(src.as_fd(), before.size) {
                    Ok(e) => Some(e),
                    Err(e) => return Ok(FileSent::Now(Err(ApplyError::source_read(rel, e)))),
                },
            };
            let file = self.t.next_id();
            let slot = self.op(Op::File {
                file,
                rel: rel.to_vec(),
                meta: before,
                delta: sig.is_some(),
                xattrs,
            })?;
            let streamed = match extents {
                Some(ext) => self.stream_extents(&src, file, before.size, &ext)?,
                None => self.stream(&src, file, before.size, sig.as_ref())?,
            };
            match streamed {
                Err(e) => {
                    self.push(Request::Data {
                        file,
                        chunk: Chunk::End {
                            hash: [0; 16],
                            commit: false,
                        },
                    })?;
                    return Ok(FileSent::Now(Err(ApplyError::source_read(rel, e))));
                }
                Ok((hash, bytes)) => {
                    let same = read_whole_unchanged(&src, &before, bytes);
                    self.push(Request::Data {
                        file,
                        chunk: Chunk::End { hash, commit: same },
                    })?;
                    if same {
                        return Ok(FileSent::Sent {
                            slot,
                            meta: before,
                            bytes,
                        });
                    }
                }
            }
        }
        Ok(FileSent::Now(Err(ApplyError::Changing {
            path: paths::display(rel),
            tries: COPY_TRIES,
        })))
    }

    /// Sends small file `src` in one [`Op::Whole`]; `None` when it changed
    /// while it was read (nothing was sent: the caller tries again).
    /// `fresh`: see [`Op::Whole`].
    fn whole(
        &mut self,
        src: &OwnedFd,
        rel: &[u8],
        before: &Meta,
        fresh: bool,
        xattrs: Option<Xattrs>,
    ) -> Result<Option<FileSent>, ApplyError> {
        let mut data = vec![0u8; before.size as usize];
        let n = match read_full_at(src.as_fd(), &mut data, 0, before.size) {
            Ok(n) => n,
            Err(e) => return Ok(Some(FileSent::Now(Err(ApplyError::source_read(rel, e))))),
        };
        let same = read_whole_unchanged(src, before, n as u64);
        if !same {
            return Ok(None);
        }
        let hash = protocol::content_hash(&data);
        let (zstd, data) = match self.t.spec.compress {
            true => match zstd::bulk::compress(&data, 3) {
                Ok(z) if z.len() < data.len() => (true, z),
                _ => (false, data),
            },
            false => (false, data),
        };
        let slot = self.op(Op::Whole {
            rel: rel.to_vec(),
            meta: *before,
            zstd,
            data,
            hash,
            fresh,
            xattrs,
        })?;
        Ok(Some(FileSent::Sent {
            slot,
            meta: *before,
            bytes: n as u64,
        }))
    }

    /// Sends the content of sparse file `src`: its data `extents` (see
    /// [`fidelity::data_extents`]) as bytes, the holes between them as
    /// [`Chunk::Hole`]. The inner result is a source read error; the
    /// length returned counts the holes, so that a file that shrank
    /// meanwhile shows as one.
    #[allow(clippy::type_complexity)]
    fn stream_extents(
        &mut self,
        src: &OwnedFd,
        file: u64,
        size: u64,
        extents: &[(u64, u64)],
    ) -> Result<Result<(protocol::ContentHash, u64), io::Error>, ApplyError> {
        let mut hasher = protocol::ContentHasher::default();
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        let holes = extents.iter().copied().chain(std::iter::once((size, 0)));
        for (start, len) in holes {
            if start > off {
                let hole = start - off;
                hasher.update(&protocol::hole_marker(hole));
                self.push(Request::Data {
                    file,
                    chunk: Chunk::Hole { len: hole },
                })?;
                off = start;
            }
            while off < start + len {
                let want = ((start + len - off) as usize).min(buf.len());
                let n = match read_full_at(src.as_fd(), &mut buf[..want], off, start + len) {
                    Ok(n) => n,
                    Err(e) => return Ok(Err(e)),
                };
                if n == 0 {
                    // Shrank: the length sent tells the caller.
                    return Ok(Ok((hasher.finish(), off)));
                }
                hasher.update(&buf[..n]);
                self.data(file, &buf[..n])?;
                off += n as u64;
            }
        }
        Ok(Ok((hasher.finish(), off)))
    }

    /// Sends the content of `src`; the inner result is a source read error.
    #[allow(clippy::type_complexity)]
    fn stream(
        &mut self,
        src: &OwnedFd,
        file: u64,
        size: u64,
        sig: Option<&(u64, Vec<[u8; 16]>)>,
    ) -> Result<Result<(protocol::ContentHash, u64), io::Error>, ApplyError> {
        let mut hasher = protocol::ContentHasher::default();
        // Reads in whole delta blocks when a signature is there.
        let step = if sig.is_some() {
            BLOCK as usize
        } else {
            CHUNK.min(size.max(4096) as usize)
        };
        let mut buf = vec![0u8; step];
        let mut off = 0u64;
        // A run of matching blocks not yet sent as one Copy.
        let mut copy: Option<(u64, u64)> = None;
        // Literal bytes not yet sent (gathered up to CHUNK).
        let mut lit: Vec<u8> = Vec::new();
        loop {
            let n = match read_full_at(src.as_fd(), &mut buf, off, size) {
                Ok(n) => n,
                Err(e) => return Ok(Err(e)),
            };
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            hasher.update(data);
            let matched = sig.is_some_and(|(tsize, blocks)| {
                let i = (off / BLOCK) as usize;
                off + n as u64 <= *tsize
                    && blocks
                        .get(i)
                        .is_some_and(|h| *h == protocol::block_hash(data))
            });
            if matched {
                if !lit.is_empty() {
                    self.data(file, &lit)?;
                    lit.clear();
                }
                copy = match copy {
                    Some((o, l)) if o + l == off => Some((o, l + n as u64)),
                    Some((o, l)) => {
                        self.push(Request::Data {
                            file,
                            chunk: Chunk::Copy { offset: o, len: l },
                        })?;
                        Some((off, n as u64))
                    }
                    None => Some((off, n as u64)),
                };
            } else {
                if let Some((o, l)) = copy.take() {
                    self.push(Request::Data {
                        file,
                        chunk: Chunk::Copy { offset: o, len: l },
                    })?;
                }
                lit.extend_from_slice(data);
                if lit.len() >= CHUNK {
                    self.data(file, &lit)?;
                    lit.clear();
                }
            }
            off += n as u64;
        }
        if let Some((o, l)) = copy {
            self.push(Request::Data {
                file,
                chunk: Chunk::Copy { offset: o, len: l },
            })?;
        }
        if !lit.is_empty() {
            self.data(file, &lit)?;
        }
        Ok(Ok((hasher.finish(), off)))
    }
}

/// Whether the receiver answered that it may not make a device.
fn refused_device(done: &Done) -> bool {
    matches!(done, Done::Partial { refused } if refused.iter().any(|k| k == "device"))
}

/// Whether `bytes` read from `src` are its whole content as of `before`:
/// it has not changed since (size, mtime, ctime) and all of it was read.
fn read_whole_unchanged(src: &OwnedFd, before: &Meta, bytes: u64) -> bool {
    let after = rustix::fs::fstat(src).map(|st| Meta::from_stat(&st));
    matches!(&after, Ok(a) if a.size == before.size
        && a.mtime_ns == before.mtime_ns
        && a.ctime_ns == before.ctime_ns)
        && bytes == before.size
}

/// ssh's `[-p PORT] [user@]host` arguments for an ssh transport.
fn ssh_dest(t: &Transport) -> Option<Vec<String>> {
    let Transport::Ssh { user, host, port } = t else {
        return None;
    };
    let mut dest = Vec::new();
    if let Some(p) = port {
        dest.extend(["-p".to_string(), p.to_string()]);
    }
    dest.push(match user {
        Some(u) => format!("{u}@{host}"),
        None => host.clone(),
    });
    Some(dest)
}

/// [`super::ssh_cipher::preferred`] for target `name`, logged.
fn work_out_ciphers(name: &str, spec: &RemoteSpec, dest: &[String]) -> Option<String> {
    if !spec.prefer_aes_gcm {
        return None;
    }
    let c = super::ssh_cipher::preferred(&spec.ssh_args, dest);
    match &c {
        Some(c) => {
            tracing::info!(target = %name, "ssh: AES-GCM preferred (this CPU runs it in hardware): Ciphers={c}")
        }
        None => tracing::info!(target = %name, "ssh: cipher left to ssh's configuration"),
    }
    c
}

/// Reads up to `buf.len()` bytes at `off`, short at the end of the file or
/// once `end` (the size the file had when it was opened) is reached: the
/// read that would find the end costs a syscall per file, and a file that
/// grew since is caught by the stat after the copy anyway.
fn read_full_at(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64, end: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() && off + (got as u64) < end {
        match rustix::io::pread(fd, &mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Routes replies to their waiters until the connection ends.
fn reader_loop(mut r: Box<dyn Read + Send>, conn: std::sync::Weak<Conn>, name: String) {
    let mut buf = Vec::new();
    loop {
        let reply = match protocol::read_frame::<_, Reply>(&mut r, &mut buf) {
            Ok(rep) => rep,
            Err(e) => {
                if let Some(c) = conn.upgrade() {
                    if !c.dead.load(Ordering::Acquire) {
                        if e.is_disconnect() {
                            tracing::warn!(target = %name, "connection to the receiver lost: {e}");
                        } else {
                            tracing::error!(target = %name, "bad frame from the receiver: {e}; reconnecting");
                        }
                    }
                    c.fail_all();
                }
                return;
            }
        };
        let id = match &reply {
            Reply::Listing { id, .. }
            | Reply::Stat { id, .. }
            | Reply::Signature { id, .. }
            | Reply::Done { id, .. }
            | Reply::Space { id, .. }
            | Reply::Hash { id, .. }
            | Reply::Failed { id, .. } => *id,
            Reply::Batch { batch, .. } => *batch,
            Reply::Fatal { reason } => {
                tracing::error!(target = %name, "the receiver ended the connection: {reason}");
                if let Some(c) = conn.upgrade() {
                    c.fail_all();
                }
                return;
            }
            Reply::Welcome { .. } | Reply::Refused { .. } => continue,
        };
        let Some(c) = conn.upgrade() else { return };
        let tx = c
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }
}
