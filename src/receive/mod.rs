//! `drmirror receive`: the DR host's end of the wire protocol
//! ([`crate::protocol`]).
//!
//! It serves one connection on stdin/stdout (started by ssh, like rsync's
//! server side) or many over TCP (`--listen`, shared token required). Every
//! write goes through [`LocalTarget`], i.e. beneath the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` and `O_NOFOLLOW`: a
//! path from the wire is first checked to be clean and relative (no `..`,
//! no absolute path, no NUL), and even a clean one can never be resolved
//! through a symlink inside the root. A refused path is answered with an
//! error for that operation and the connection goes on. Malformed frames
//! end the connection with a [`Reply::Fatal`] naming the problem.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::fidelity::{Refused, Xattrs};
use crate::fsops;
use crate::locks::lock;
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::protocol::{
    self, Chunk, Done, Entry, FrameError, Op, Reply, Request, BLOCK, HELLO_MAX, MAGIC, MAX_FRAME,
    VERSION,
};
use crate::target::local::{Born, LocalTarget, TempFile};
use crate::target::ApplyError;

pub mod gate;

use gate::{Admission, Gate, Limits, Open, Refusal, RefusalKind, Ticket};

/// Files a connection may have open at once (one per parallel stream).
const MAX_OPEN_FILES: usize = 256;
/// Batches a connection may have open at once.
const MAX_OPEN_BATCHES: usize = 1024;
/// Operations in one batch.
const MAX_BATCH_OPS: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("cannot open the receiving root {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("refused: {}", .0.reason)]
    Refused(Refusal),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Opens (creating if needed) the directory a receiver writes beneath.
pub fn open_root(root: &Path) -> Result<LocalTarget, ReceiveError> {
    let owner = rustix::process::geteuid().is_root();
    let t = LocalTarget::open(root, owner).map_err(|source| ReceiveError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    // Mirrored files are created with their final permission bits (see
    // `LocalTarget::begin_file`); a umask would only force an extra chmod.
    // Set after the root exists: directories the root needed are created
    // under the caller's umask.
    rustix::process::umask(rustix::fs::Mode::empty());
    Ok(t)
}

/// Serves one connection on stdin/stdout until the daemon hangs up.
pub fn serve_stdio(target: &LocalTarget) -> Result<(), ReceiveError> {
    let stdin = io::stdin().lock();
    serve(target, stdin, io::stdout(), None, &mut Open)
}

/// How the TCP receiver admits connections (see [`gate`]).
pub struct TcpOptions {
    pub addr: SocketAddr,
    pub token: String,
    pub limits: Limits,
}

/// Serves TCP connections (each needs the token) within `opts.limits`
/// until the process is stopped.
pub fn serve_tcp(target: Arc<LocalTarget>, opts: TcpOptions) -> Result<(), ReceiveError> {
    let addr = opts.addr;
    let listen_err = |source| ReceiveError::Listen { addr, source };
    let listener = TcpListener::bind(addr).map_err(listen_err)?;
    let local = listener.local_addr().unwrap_or(addr);
    let stop = Arc::new(AtomicBool::new(false));
    listener
        .try_clone()
        .and_then(|l| stop_on_signal(stop.clone(), l))
        .map_err(listen_err)?;
    let gate = Gate::start(opts.limits).map_err(listen_err)?;
    let l = gate.limits();
    tracing::info!(
        "drmirror receive listening on {} root={} max_connections={} handshakes={} per_address={} handshake_timeout={}s",
        local,
        target.root().path().display(),
        l.sessions,
        l.handshakes,
        l.per_address,
        l.deadline.as_secs_f64()
    );
    let token = Arc::new(opts.token);
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            tracing::info!("drmirror receive stopped cleanly (signal)");
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("accept: the peer is already gone: {e}");
                continue;
            }
        };
        let ticket = match gate.enter(&stream, peer.ip()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{peer}: {e}");
                continue;
            }
        };
        let (target, token, gate) = (target.clone(), token.clone(), gate.clone());
        let spawned = std::thread::Builder::new()
            .name("receive-conn".into())
            .spawn(move || serve_conn(&target, stream, peer, &token, ticket, &gate));
        if let Err(e) = spawned {
            tracing::warn!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// Serves one accepted TCP connection to its end.
fn serve_conn(
    target: &LocalTarget,
    stream: TcpStream,
    peer: SocketAddr,
    token: &str,
    mut ticket: Ticket,
    gate: &Gate,
) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = crate::keepalive::detect_dead_peer(&stream) {
        tracing::warn!("{peer}: cannot set TCP keepalive: {e}; if this daemon's machine dies silently, its connection is kept");
    }
    match serve(
        target,
        &stream,
        &stream,
        Some(token.as_bytes()),
        &mut ticket,
    ) {
        Ok(()) => tracing::info!("{peer}: connection closed"),
        Err(ReceiveError::Refused(r)) => gate.refused(ticket.addr(), &r),
        Err(e) => tracing::warn!("{peer}: {e}"),
    }
}

/// Sets `stop` and wakes the accept loop on SIGTERM or SIGINT. The
/// handlers are in place when this returns.
fn stop_on_signal(stop: Arc<AtomicBool>, listener: TcpListener) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _g = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            stop.store(true, Ordering::Release);
            // Shutting the listening socket down makes a blocked accept
            // return (EINVAL). Not a connection to the listen address,
            // which nothing guarantees this host can reach (a loopback
            // interface down, a firewall): the receiver then ignored
            // SIGTERM.
            let _ = rustix::net::shutdown(&listener, rustix::net::Shutdown::Read);
        })?;
    Ok(())
}

/// Serves one connection: handshake, then requests until the peer closes.
/// `token`: the shared secret the peer must present (TCP). `gate` cuts the
/// handshake short from outside and grants the session a slot.
pub fn serve<R: Read, W: Write + Send>(
    target: &LocalTarget,
    mut r: R,
    mut w: W,
    token: Option<&[u8]>,
    gate: &mut dyn Admission,
) -> Result<(), ReceiveError> {
    let mut buf = Vec::new();
    admit(target, &mut r, &mut w, &mut buf, token, gate)?;
    let r = BufReader::with_capacity(256 * 1024, r);
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    // Held until this function returns, after the workers are done.
    let _session = crate::root_lock::acquire(target.root().fd(), crate::root_lock::TAKEOVER_WAIT);
    welcome(target, &mut w)?;
    // Replies come from the reading loop, the workers and the sync thread.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_WORKERS);
    let shared = Shared {
        w: Mutex::new(w),
        progress: (0..workers).map(|_| Progress::default()).collect(),
        failed: Mutex::new(None),
        queued: AtomicU64::new(0),
        hung_up: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
    };
    let result = std::thread::scope(|sc| {
        // Batches are applied by a few workers side by side: creating a
        // file on a journaling filesystem is tens of microseconds of kernel
        // work, and one thread leaves the DR host's other cores idle. Every
        // request of a batch (its operations and their files' data) goes to
        // one worker, in order. The daemon never has two batches in flight
        // that touch the same path (one path appears once per round, and a
        // round waits for all its acks), so batches need no order between
        // them; renames and syncs wait for what was received before them.
        let mut txs = Vec::with_capacity(workers);
        for p in &shared.progress {
            let (tx, rx) = crossbeam_channel::bounded::<(Request, u64)>(WORKER_QUEUE);
            txs.push(tx);
            let shared = &shared;
            sc.spawn(move || worker(target, rx, p, shared));
        }
        // `syncfs` can take a few hundred ms on a busy disk: it runs beside
        // the loop so that applying the next batches does not wait for it.
        // Bounded: a peer that sends syncs without reading the replies
        // stops being read instead of growing this queue.
        let (sync_tx, sync_rx) = crossbeam_channel::bounded::<(u64, Vec<u64>)>(64);
        let syncer = sc.spawn(|| sync_loop(target, sync_rx, &shared.w, &shared.progress));
        let result = read_loop(target, r, buf, &shared, &txs, &sync_tx);
        drop(txs);
        drop(sync_tx);
        let _ = syncer.join();
        result
    });
    let dropped = shared.dropped.into_inner();
    if dropped > 0 {
        tracing::info!("the peer hung up: {dropped} of its requests dropped unapplied (never acknowledged, so it sends them again)");
    }
    result
}

/// What a connection's reading loop, workers and sync thread share.
struct Shared<W: Write> {
    w: Mutex<BufWriter<W>>,
    /// One per worker.
    progress: Vec<Progress>,
    /// The first error that ends the connection.
    failed: Mutex<Option<String>>,
    /// Bytes of frames handed to workers and not yet handled.
    queued: AtomicU64,
    /// The peer is gone: nothing applied from now on can be acknowledged,
    /// and its next session waits for this one (`root_lock`), so the
    /// workers drop what they still hold instead of applying it.
    hung_up: AtomicBool,
    /// Requests dropped so.
    dropped: AtomicU64,
}

/// Reads the peer's Hello (at most `HELLO_MAX` bytes, unbuffered: nothing
/// larger is allocated before the peer has shown the token), checks it and
/// takes a session slot; a refusal is answered and returned.
fn admit<R: Read, W: Write>(
    target: &LocalTarget,
    r: &mut R,
    w: &mut W,
    buf: &mut Vec<u8>,
    token: Option<&[u8]>,
    gate: &mut dyn Admission,
) -> Result<(), ReceiveError> {
    let hello = protocol::read_payload_max(r, buf, HELLO_MAX)
        .and_then(|()| protocol::decode::<Request>(buf));
    let checked = check_hello(target, hello, token).and_then(|()| gate.admit());
    if let Err(refusal) = checked {
        // Cut from outside (the deadline, a newer connection): that is the
        // reason, not the end of file it caused.
        let refusal = gate.cut().unwrap_or(refusal);
        let _ = protocol::write_frame(
            w,
            &Reply::Refused {
                reason: refusal.reason.clone(),
            },
        );
        let _ = w.flush();
        return Err(ReceiveError::Refused(refusal));
    }
    Ok(())
}

/// Answers an admitted Hello: this receiver's version, boot id (when its
/// root is on a local disk) and what its root shows of itself.
fn welcome<W: Write>(target: &LocalTarget, w: &mut W) -> Result<(), ReceiveError> {
    let boot = if crate::durability::local_disk(target.root().fd()) {
        crate::durability::boot_id()
    } else {
        None
    };
    let root = match crate::target::identity::Seen::of(target.dir_fd()) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!(
                "cannot look at the root {}: {e}",
                target.root().path().display()
            );
            let _ = protocol::write_frame(
                w,
                &Reply::Refused {
                    reason: reason.clone(),
                },
            );
            let _ = w.flush();
            return Err(ReceiveError::Protocol(reason));
        }
    };
    protocol::write_frame(
        w,
        &Reply::Welcome {
            version: VERSION,
            boot,
            root,
        },
    )?;
    w.flush().map_err(FrameError::Io)?;
    Ok(())
}

/// One worker: handles the requests routed to it, in order, until the
/// channel closes or a reply cannot be sent.
fn worker<W: Write>(
    target: &LocalTarget,
    rx: crossbeam_channel::Receiver<(Request, u64)>,
    p: &Progress,
    shared: &Shared<W>,
) {
    // Set however the worker ends (a panic included), so that nobody waits
    // for requests it will never handle.
    struct Stopped<'p>(&'p Progress);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.stopped.store(true, Ordering::Release);
        }
    }
    let _stopped = Stopped(p);
    let mut s = Session::new(target);
    for (req, size) in rx {
        if shared.hung_up.load(Ordering::Acquire) {
            shared.queued.fetch_sub(size, Ordering::AcqRel);
            p.done.fetch_add(1, Ordering::Release);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let r = s.handle(req);
        shared.queued.fetch_sub(size, Ordering::AcqRel);
        p.done.fetch_add(1, Ordering::Release);
        let err = match r {
            Ok(replies) => send_replies(&shared.w, &replies)
                .err()
                .map(|e| e.to_string()),
            Err(reason) => {
                fatal(&shared.w, &reason);
                Some(reason)
            }
        };
        if let Some(e) = err {
            keep_first(&shared.failed, e);
            break;
        }
    }
    s.abort_all();
}

/// Reads the peer's requests until it hangs up: batches go to their
/// workers (memory bounded by `QUEUE_BUDGET`), syncs to the sync thread,
/// queries are answered here (a rename once the workers have handled what
/// came before it).
fn read_loop<R: Read, W: Write>(
    target: &LocalTarget,
    mut r: BufReader<R>,
    mut buf: Vec<u8>,
    shared: &Shared<W>,
    txs: &[crossbeam_channel::Sender<(Request, u64)>],
    sync_tx: &crossbeam_channel::Sender<(u64, Vec<u64>)>,
) -> Result<(), ReceiveError> {
    let (w, progress) = (&shared.w, &shared.progress);
    let mut queries = Session::new(target);
    let mut route = Route::default();
    loop {
        if let Some(reason) = lock(&shared.failed).take() {
            return Err(ReceiveError::Protocol(reason));
        }
        let req = match protocol::read_frame::<_, Request>(&mut r, &mut buf) {
            Ok(req) => req,
            Err(FrameError::Closed) => {
                shared.hung_up.store(true, Ordering::Release);
                return Ok(());
            }
            Err(e) if e.is_disconnect() => {
                shared.hung_up.store(true, Ordering::Release);
                return Err(e.into());
            }
            Err(e) => {
                let reason = e.to_string();
                fatal(w, &reason);
                return Err(ReceiveError::Protocol(reason));
            }
        };
        let worker = match route.worker(&req, txs.len()) {
            Ok(k) => k,
            Err(reason) => {
                fatal(w, &reason);
                return Err(ReceiveError::Protocol(reason));
            }
        };
        if let Some(k) = worker {
            // Memory stays bounded whatever the peer sends: past the
            // budget, reading waits for the workers.
            let size = buf.len() as u64;
            while shared.queued.load(Ordering::Acquire) > QUEUE_BUDGET
                && !progress.iter().any(|p| p.stopped.load(Ordering::Acquire))
            {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            shared.queued.fetch_add(size, Ordering::AcqRel);
            progress[k].sent.fetch_add(1, Ordering::Release);
            if txs[k].send((req, size)).is_err() {
                let reason = lock(&shared.failed)
                    .take()
                    .unwrap_or_else(|| "a worker stopped".into());
                return Err(ReceiveError::Protocol(reason));
            }
            continue;
        }
        match req {
            Request::Sync { id } => {
                let upto = progress
                    .iter()
                    .map(|p| p.sent.load(Ordering::Acquire))
                    .collect();
                if sync_tx.send((id, upto)).is_err() {
                    return Err(ReceiveError::Protocol("the sync thread stopped".into()));
                }
                continue;
            }
            Request::Rename { .. } => {
                // The renamed path may be the parent of files that
                // batches received before it are still writing.
                for p in progress {
                    p.wait_for(p.sent.load(Ordering::Acquire));
                }
            }
            _ => {}
        }
        match queries.handle(req) {
            Ok(replies) => send_replies(w, &replies)?,
            Err(reason) => {
                fatal(w, &reason);
                return Err(ReceiveError::Protocol(reason));
            }
        }
    }
}

/// Checks a Hello: a drmirror client of this protocol version, with the
/// token (TCP), for this root.
fn check_hello(
    target: &LocalTarget,
    hello: Result<Request, FrameError>,
    token: Option<&[u8]>,
) -> Result<(), Refusal> {
    let (magic, version, presented, root) = match hello {
        Ok(Request::Hello {
            magic,
            version,
            token,
            root,
        }) => (magic, version, token, root),
        Ok(other) => {
            return Err(Refusal::new(
                RefusalKind::BadHandshake,
                format!("expected Hello, got {}", other.kind()),
            ))
        }
        Err(e) => {
            return Err(Refusal::new(
                RefusalKind::BadHandshake,
                format!("bad handshake: {e}"),
            ))
        }
    };
    if magic != MAGIC {
        return Err(Refusal::new(
            RefusalKind::BadHandshake,
            "not a drmirror client",
        ));
    }
    if version != VERSION {
        return Err(Refusal::new(
            RefusalKind::Version,
            format!(
                "protocol version {version} is not supported; this receiver speaks {VERSION} (drmirror {})",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if let Some(want) = token {
        let ok = presented
            .as_deref()
            .is_some_and(|p| protocol::token_eq(p.as_bytes(), want));
        if !ok {
            return Err(Refusal::new(
                RefusalKind::Auth,
                "authentication failed: wrong or missing token",
            ));
        }
    }
    // Two targets naming different directories must not end up writing
    // into the same tree.
    if let Some(want) = root {
        same_root(target, &want).map_err(|reason| Refusal::new(RefusalKind::Root, reason))?;
    }
    root_in_place(target).map_err(|reason| Refusal::new(RefusalKind::Root, reason))
}

/// `Err(why)` when the root's path no longer names the directory this
/// receiver holds open (renamed, replaced, mounted over): what it would
/// write is no longer the mirror at that path. Checked at each connection,
/// each batch and each flush; the daemon then keeps the target down with
/// the reason, and goes on once the path names that directory again (a
/// receiver started afresh opens whatever the path names then).
fn root_in_place(target: &LocalTarget) -> Result<(), String> {
    target.still_at_path().map_err(|why| {
        format!(
            "the root {}: {why}; writing nothing there (restart the receiver to serve what the \
             path names now)",
            target.root().path().display()
        )
    })
}

/// Most batch workers per connection.
const MAX_WORKERS: usize = 4;
/// Most bytes of frames queued for the workers of one connection.
const QUEUE_BUDGET: u64 = 64 << 20;
/// Most requests queued for one worker. The frames of concurrent batches
/// arrive interleaved and this thread hands them out in order, so when one
/// worker's queue is full, reading stops for all of them: with 256, this
/// thread blocked on a full queue 30,628 times in a 200,000-file initial
/// sync over loopback. A streamed file is three or more short frames (a
/// small one is a single frame of up to 64 KiB), so the bound is in
/// requests, and the byte budget above still caps the memory.
const WORKER_QUEUE: usize = 16384;

/// Requests handed to one worker, and how many it has handled.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    done: AtomicU64,
    /// The worker ended (the connection is failing): nothing to wait for.
    stopped: AtomicBool,
}

impl Progress {
    /// Waits until the worker handled its first `n` requests (they are
    /// quick: a batch of small operations) or stopped.
    fn wait_for(&self, n: u64) {
        while self.done.load(Ordering::Acquire) < n && !self.stopped.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

/// Which worker holds each open batch and file stream.
#[derive(Default)]
struct Route {
    batches: HashMap<u64, usize>,
    /// File stream -> (worker, batch).
    files: HashMap<u64, (usize, u64)>,
    next: usize,
}

impl Route {
    /// The worker for `req`, `None` for a request this thread answers;
    /// `Err` is a protocol violation.
    fn worker(&mut self, req: &Request, workers: usize) -> Result<Option<usize>, String> {
        Ok(Some(match req {
            Request::Op { batch, op } => {
                let k = match self.batches.get(batch) {
                    Some(&k) => k,
                    None => {
                        if self.batches.len() >= MAX_OPEN_BATCHES {
                            return Err(format!("more than {MAX_OPEN_BATCHES} batches open"));
                        }
                        self.next = (self.next + 1) % workers;
                        self.batches.insert(*batch, self.next);
                        self.next
                    }
                };
                if let Op::File { file, .. } = op {
                    if self.files.len() >= MAX_OPEN_FILES {
                        return Err(format!("more than {MAX_OPEN_FILES} files open at once"));
                    }
                    if self.files.insert(*file, (k, *batch)).is_some() {
                        return Err(format!("file stream {file} opened twice"));
                    }
                }
                k
            }
            Request::Data { file, chunk } => {
                let k = if matches!(chunk, Chunk::End { .. }) {
                    self.files.remove(file)
                } else {
                    self.files.get(file).copied()
                };
                k.map(|(k, _)| k)
                    .ok_or_else(|| format!("data for file stream {file}, which is not open"))?
            }
            Request::EndBatch { batch } => match self.batches.remove(batch) {
                Some(k) => {
                    // Streams the batch left unfinished end with it.
                    self.files.retain(|_, (_, b)| b != batch);
                    k
                }
                None => {
                    self.next = (self.next + 1) % workers;
                    self.next
                }
            },
            // Hashing reads whole files: on the workers, several at once.
            Request::Hash { .. } => {
                self.next = (self.next + 1) % workers;
                self.next
            }
            _ => return Ok(None),
        }))
    }
}

fn keep_first(slot: &Mutex<Option<String>>, reason: String) {
    let mut g = lock(slot);
    if g.is_none() {
        *g = Some(reason);
    }
}

/// `Ok` when `want` (from a target's URL) is the directory this receiver
/// serves.
fn same_root(target: &LocalTarget, want: &[u8]) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let served = target.root().path();
    let asked = Path::new(std::ffi::OsStr::from_bytes(want));
    let same = match (std::fs::canonicalize(served), std::fs::canonicalize(asked)) {
        (Ok(a), Ok(b)) => a == b,
        _ => served == asked,
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "this receiver serves {}, the target names {}",
            served.display(),
            asked.display()
        ))
    }
}

/// Answers Sync requests: one `syncfs` for all that queued up meanwhile,
/// once the workers applied what was received before them.
fn sync_loop<W: Write>(
    target: &LocalTarget,
    rx: crossbeam_channel::Receiver<(u64, Vec<u64>)>,
    w: &Mutex<BufWriter<W>>,
    progress: &[Progress],
) {
    let exit_on_sync = crate::failpoints::set(crate::failpoints::Hook::ExitOnSync);
    while let Ok(first) = rx.recv() {
        if exit_on_sync {
            eprintln!("the ExitOnSync failpoint: exiting before a flush");
            std::process::exit(3);
        }
        let mut syncs = vec![first];
        syncs.extend(rx.try_iter());
        for (k, p) in progress.iter().enumerate() {
            let upto = syncs.iter().filter_map(|(_, u)| u.get(k)).max();
            if let Some(&n) = upto {
                p.wait_for(n);
            }
        }
        // Copies made in a directory moved away are not the mirror at the
        // path: not confirmed (the daemon keeps them pending).
        let result = root_in_place(target).and_then(|()| {
            target
                .sync()
                .map(|()| true)
                .map_err(|e| format!("syncfs: {e}"))
        });
        let replies: Vec<Reply> = syncs
            .into_iter()
            .map(|(id, _)| Reply::Done {
                id,
                result: result.clone(),
            })
            .collect();
        if send_replies(w, &replies).is_err() {
            return;
        }
    }
}

fn send_replies<W: Write>(w: &Mutex<BufWriter<W>>, replies: &[Reply]) -> Result<(), FrameError> {
    if replies.is_empty() {
        return Ok(());
    }
    let mut w = lock(w);
    for rep in replies {
        protocol::write_frame(&mut *w, rep)?;
    }
    w.flush()?;
    Ok(())
}

/// Tells the daemon why the connection ends (best effort).
fn fatal<W: Write>(w: &Mutex<BufWriter<W>>, reason: &str) {
    let _ = send_replies(
        w,
        &[Reply::Fatal {
            reason: reason.to_string(),
        }],
    );
}

/// A file being received.
struct Incoming {
    batch: u64,
    index: usize,
    rel: Vec<u8>,
    meta: Meta,
    tmp: Option<TempFile>,
    base: Option<File>,
    hasher: protocol::ContentHasher,
    /// The first error; the rest of the stream is read and discarded.
    failed: Option<String>,
    xattrs: Option<Xattrs>,
    /// Bytes of content so far, holes included: the file's length at the
    /// end (a trailing hole is never written).
    len: u64,
}

struct Session<'a> {
    target: &'a LocalTarget,
    /// The parent directory of the last file begun, with its batch: the
    /// next file of the same batch and parent reuses it rather than
    /// resolving the path again (most of a batch is one directory's files;
    /// the lookup and close were 2 of some 10 system calls per small file).
    /// Kept only while nothing else happens: any other request this worker
    /// handles, or another batch, drops it. Renames are handled by the
    /// reading thread, not here: they cannot leave it stale because the
    /// sender never renames while a batch is open (a round's renames come
    /// before its batches, and a round waits for all its acks), and a later
    /// batch has another id. Deletions are operations of a batch, so this
    /// worker sees them. (A directory moved by someone else on this host:
    /// each file already held its directory open from its first data to
    /// its link; the cache widens that window to the batch, a few dozen
    /// small files.)
    /// With it, what files created there came out as.
    parent: Option<Parent>,
    open: HashMap<u64, Incoming>,
    batches: HashMap<u64, Vec<Option<Result<Done, String>>>>,
}

/// See [`Session::parent`].
struct Parent {
    batch: u64,
    path: Vec<u8>,
    dir: Arc<OwnedFd>,
    born: Born,
}

/// A path from the wire, checked. `allow_root`: the empty path (the root
/// itself) is acceptable for this operation.
fn checked(rel: &[u8], allow_root: bool) -> Result<(), String> {
    if rel.is_empty() && !allow_root {
        return Err("refused path: the root itself cannot be replaced".into());
    }
    paths::validate(rel).map_err(|e| format!("refused path {}: {e}", paths::display(rel)))
}

fn apply_err(e: ApplyError) -> String {
    e.to_string()
}

impl<'a> Session<'a> {
    fn new(target: &'a LocalTarget) -> Session<'a> {
        Session {
            target,
            parent: None,
            open: HashMap::new(),
            batches: HashMap::new(),
        }
    }

    /// Drops the temp files of streams the connection left unfinished.
    fn abort_all(&mut self) {
        for (_, f) in self.open.drain() {
            if let Some(tmp) = f.tmp {
                self.target.abort_file(tmp);
            }
        }
    }

    /// Handles one request; `Err` is a protocol violation that ends the
    /// connection.
    fn handle(&mut self, req: Request) -> Result<Vec<Reply>, String> {
        if !matches!(
            req,
            Request::Op {
                op: Op::File { .. } | Op::Whole { .. },
                ..
            } | Request::Data { .. }
        ) {
            self.parent = None;
        }
        Ok(match req {
            Request::Hello { .. } => return Err("Hello sent twice".into()),
            Request::List { id, dir, ns } => self.list(id, &dir, ns),
            Request::Stat { id, rel } => vec![match checked(&rel, true) {
                Err(error) => Reply::Failed { id, error },
                Ok(()) => match self.target.root().lstat(&rel) {
                    Ok(meta) => Reply::Stat { id, meta },
                    Err(e) => Reply::Failed {
                        id,
                        error: format!("{}: {e}", paths::display(&rel)),
                    },
                },
            }],
            Request::Signature { id, rel } => vec![self.signature(id, &rel)],
            Request::Hash { id, rel } => vec![self.hash(id, &rel)],
            Request::Writable { id } => vec![Reply::Done {
                id,
                result: crate::fsops::writable(self.target.dir_fd())
                    .map(|()| true)
                    .map_err(|e| format!("cannot write beneath the root: {e}")),
            }],
            Request::Rename { id, from, to } => {
                let result = checked(&from, false)
                    .and_then(|()| checked(&to, false))
                    .and_then(|()| self.target.rename(&from, &to).map_err(apply_err));
                vec![Reply::Done { id, result }]
            }
            Request::Mark { id, mark } => vec![Reply::Done {
                id,
                result: crate::target::identity::put_mark(self.target.dir_fd(), &mark)
                    .map(|()| true)
                    .map_err(|e| format!("cannot mark the root: {e}")),
            }],
            Request::Space { id } => vec![match self.target.free_bytes() {
                Ok(free) => Reply::Space { id, free },
                Err(e) => Reply::Failed {
                    id,
                    error: format!("statvfs: {e}"),
                },
            }],
            Request::Sync { id } => vec![Reply::Done {
                id,
                result: self
                    .target
                    .sync()
                    .map(|()| true)
                    .map_err(|e| format!("syncfs: {e}")),
            }],
            Request::Op { batch, op } => {
                self.op(batch, op)?;
                Vec::new()
            }
            Request::Data { file, chunk } => {
                self.data(file, chunk)?;
                Vec::new()
            }
            Request::EndBatch { batch } => {
                let results = self.batches.remove(&batch).unwrap_or_default();
                let mut unfinished = Vec::new();
                for (k, f) in &self.open {
                    if f.batch == batch {
                        unfinished.push(*k);
                    }
                }
                for k in unfinished {
                    if let Some(f) = self.open.remove(&k) {
                        if let Some(t) = f.tmp {
                            self.target.abort_file(t);
                        }
                    }
                }
                vec![Reply::Batch {
                    batch,
                    results: results
                        .into_iter()
                        .map(|r| {
                            r.unwrap_or_else(|| {
                                Err("file content did not end before its batch did".into())
                            })
                        })
                        .collect(),
                }]
            }
        })
    }

    fn list(&self, id: u64, dir: &[u8], ns: u8) -> Vec<Reply> {
        if let Err(error) = checked(dir, true) {
            return vec![Reply::Failed { id, error }];
        }
        // Temp files are leftovers of a connection that died mid-file: not
        // listed, and removed once stale.
        let skip = |d: Option<std::os::fd::BorrowedFd<'_>>, name: &[u8]| {
            if !fsops::is_temp_name(name) {
                return false;
            }
            if let Some(d) = d.filter(|_| fsops::is_stale_temp_name(name)) {
                let _ = fsops::remove_tree_at(d, name);
            }
            true
        };
        let entries = match crate::scan::entries(self.target.root(), dir, ns, skip) {
            Ok(Some(e)) => e,
            Ok(None) => {
                return vec![Reply::Listing {
                    id,
                    entries: None,
                    more: false,
                }]
            }
            Err(e) => {
                return vec![Reply::Failed {
                    id,
                    error: format!("cannot list {}: {e}", paths::display(dir)),
                }]
            }
        };
        let mut out = Vec::new();
        let mut it = entries.into_iter().peekable();
        loop {
            let mut part: Vec<Entry> = Vec::new();
            let mut bytes = 0;
            while let Some(e) = it.next_if(|e| {
                part.len() < protocol::LIST_CHUNK
                    && (part.is_empty() || bytes + e.wire_size() < protocol::MAX_FRAME / 2)
            }) {
                bytes += e.wire_size();
                part.push(e);
            }
            let more = it.peek().is_some();
            out.push(Reply::Listing {
                id,
                entries: Some(part),
                more,
            });
            if !more {
                return out;
            }
        }
    }

    /// Answers [`Request::Hash`]: the BLAKE3 hash of the file at `rel`.
    fn hash(&self, id: u64, rel: &[u8]) -> Reply {
        if let Err(error) = checked(rel, false) {
            return Reply::Failed { id, error };
        }
        let failed = |e: io::Error| Reply::Failed {
            id,
            error: format!("cannot read {}: {e}", paths::display(rel)),
        };
        let f = match self.target.root().open_file(rel) {
            Ok(Some((f, m))) if m.kind == Kind::File => f,
            Ok(_) => return Reply::Hash { id, hash: None },
            Err(e) => return failed(e),
        };
        let mut h = blake3::Hasher::new();
        match h.update_reader(f) {
            Ok(_) => Reply::Hash {
                id,
                hash: Some(*h.finalize().as_bytes()),
            },
            Err(e) => failed(e),
        }
    }

    fn signature(&self, id: u64, rel: &[u8]) -> Reply {
        if let Err(error) = checked(rel, false) {
            return Reply::Failed { id, error };
        }
        let empty = Reply::Signature {
            id,
            size: 0,
            blocks: Vec::new(),
        };
        let Ok(Some((f, m))) = self.target.root().open_file(rel) else {
            return empty;
        };
        if m.kind != Kind::File || m.size / BLOCK >= (MAX_FRAME / 20) as u64 {
            return empty;
        }
        let mut blocks = Vec::with_capacity((m.size / BLOCK + 1) as usize);
        let mut buf = vec![0u8; BLOCK as usize];
        let mut off = 0u64;
        while off < m.size {
            let want = BLOCK.min(m.size - off) as usize;
            if f.read_exact_at(&mut buf[..want], off).is_err() {
                return empty;
            }
            blocks.push(protocol::block_hash(&buf[..want]));
            off += want as u64;
        }
        Reply::Signature {
            id,
            size: m.size,
            blocks,
        }
    }

    fn result(&mut self, batch: u64, index: usize, r: Result<Done, String>) {
        if let Some(v) = self.batches.get_mut(&batch) {
            if let Some(slot) = v.get_mut(index) {
                *slot = Some(r);
            }
        }
    }

    fn op(&mut self, batch: u64, op: Op) -> Result<(), String> {
        if !self.batches.contains_key(&batch) {
            if self.batches.len() >= MAX_OPEN_BATCHES {
                return Err(format!("more than {MAX_OPEN_BATCHES} batches open"));
            }
            root_in_place(self.target)?;
        }
        let slots = self.batches.entry(batch).or_default();
        if slots.len() >= MAX_BATCH_OPS {
            return Err(format!("more than {MAX_BATCH_OPS} operations in one batch"));
        }
        let index = slots.len();
        slots.push(None);
        let t = self.target;
        let r = match op {
            Op::Mkdir { rel } => checked(&rel, true).and_then(|()| {
                t.make_dir(&rel)
                    .map(|created| Done::Dir { created })
                    .map_err(apply_err)
            }),
            Op::Symlink {
                rel,
                text,
                meta,
                xattrs,
            } => checked(&rel, false).and_then(|()| {
                t.put_symlink(&rel, &text, &meta, xattrs.as_ref())
                    .map(done)
                    .map_err(apply_err)
            }),
            Op::Special { rel, meta, xattrs } => checked(&rel, false).and_then(|()| {
                t.put_special(&rel, &meta, xattrs.as_ref())
                    .map(done)
                    .map_err(apply_err)
            }),
            Op::Link {
                rel,
                to,
                meta,
                xattrs,
            } => checked(&rel, false)
                .and_then(|()| checked(&to, false))
                .and_then(|()| {
                    t.put_link(&rel, &to, &meta, xattrs.as_ref())
                        .map(done)
                        .map_err(apply_err)
                }),
            Op::Delete { rel } => checked(&rel, false)
                .and_then(|()| t.delete(&rel).map(|()| Done::Ok).map_err(apply_err)),
            Op::SetAttrs { rel, meta, xattrs } => checked(&rel, true).and_then(|()| {
                t.set_dir_attrs(&rel, &meta, xattrs.as_ref())
                    .map(done)
                    .map_err(apply_err)
            }),
            Op::File {
                file,
                rel,
                meta,
                delta,
                xattrs,
            } => {
                let inc = Incoming {
                    batch,
                    index,
                    rel,
                    meta,
                    tmp: None,
                    base: None,
                    hasher: protocol::ContentHasher::default(),
                    failed: None,
                    xattrs,
                    len: 0,
                };
                return self.open_stream(file, inc, delta);
            }
            Op::Whole {
                rel,
                meta,
                zstd,
                data,
                hash,
                fresh,
                xattrs,
            } => checked(&rel, false).and_then(|()| {
                self.whole(
                    batch,
                    &rel,
                    &meta,
                    Whole {
                        zstd,
                        data,
                        hash,
                        fresh,
                        xattrs,
                    },
                )
            }),
        };
        self.result(batch, index, r);
        Ok(())
    }

    /// Opens file stream `file` for `inc` (its content arrives in `Data`
    /// frames); with `delta`, against the copy the target holds. A path or
    /// a target that refuses it fails the file, not the connection: the
    /// stream is read and dropped.
    fn open_stream(&mut self, file: u64, mut inc: Incoming, delta: bool) -> Result<(), String> {
        if self.open.contains_key(&file) {
            return Err(format!("file stream {file} opened twice"));
        }
        if self.open.len() >= MAX_OPEN_FILES {
            return Err(format!("more than {MAX_OPEN_FILES} files open at once"));
        }
        let rel = inc.rel.clone();
        let opened = checked(&rel, false).and_then(|()| {
            if delta {
                inc.base = Some(self.delta_base(&rel)?);
            }
            self.begin(inc.batch, &rel, inc.meta.mode)
                .map_err(apply_err)
        });
        match opened {
            Ok(tmp) => inc.tmp = Some(tmp),
            Err(e) => inc.failed = Some(e),
        }
        self.open.insert(file, inc);
        Ok(())
    }

    /// The target's copy of `rel`, which a delta applies to.
    fn delta_base(&self, rel: &[u8]) -> Result<File, String> {
        match self.target.root().open_file(rel) {
            Ok(Some((f, _))) => Ok(f),
            Ok(None) => Err(format!(
                "{}: no copy to apply a delta to",
                paths::display(rel)
            )),
            Err(e) => Err(format!("{}: {e}", paths::display(rel))),
        }
    }

    /// A temp file for `rel` in its parent directory, which the previous
    /// file of the same batch may have resolved already (see `parent`).
    fn begin(&mut self, batch: u64, rel: &[u8], mode: u32) -> Result<TempFile, ApplyError> {
        let dir = self.parent_of(batch, rel)?;
        self.target.begin_file_in(dir, rel, mode)
    }

    /// The parent directory of `rel`: the one the previous file of the same
    /// batch resolved, if it is the same.
    fn parent_of(&mut self, batch: u64, rel: &[u8]) -> Result<Arc<OwnedFd>, ApplyError> {
        self.parent_entry(batch, rel).map(|p| p.dir.clone())
    }

    /// [`Session::parent_of`], with its [`Born`] memo.
    fn parent_entry(&mut self, batch: u64, rel: &[u8]) -> Result<&mut Parent, ApplyError> {
        let path = paths::split(rel).0;
        let p = match self.parent.take() {
            Some(p) if p.batch == batch && p.path == path => p,
            _ => Parent {
                batch,
                path: path.to_vec(),
                dir: self.target.parent_of(rel)?,
                born: Born::default(),
            },
        };
        Ok(self.parent.insert(p))
    }

    /// A small file sent in one frame: checked before anything is created,
    /// then written and put in place like a streamed one.
    fn whole(&mut self, batch: u64, rel: &[u8], meta: &Meta, w: Whole) -> Result<Done, String> {
        let Whole {
            zstd,
            data,
            hash,
            fresh,
            xattrs,
        } = w;
        let data = if zstd {
            zstd_decompress(&data, protocol::WHOLE_MAX as usize)
                .map_err(|e| format!("{}: bad compressed content: {e}", paths::display(rel)))?
        } else if data.len() as u64 > protocol::WHOLE_MAX {
            return Err(format!(
                "{}: {} bytes sent whole, over the {}-byte limit",
                paths::display(rel),
                data.len(),
                protocol::WHOLE_MAX
            ));
        } else {
            data
        };
        if protocol::content_hash(&data) != hash {
            return Err(format!(
                "{}: content checksum mismatch; not installed",
                paths::display(rel)
            ));
        }
        if fresh {
            let target = self.target;
            let p = self.parent_entry(batch, rel).map_err(apply_err)?;
            match target.put_new_file(
                p.dir.as_fd(),
                rel,
                &data,
                meta,
                xattrs.as_ref(),
                &mut p.born,
            ) {
                Ok(Some(refused)) => return Ok(done(refused)),
                // Something is there after all: replaced as usual.
                Ok(None) => {}
                Err(e) => return Err(apply_err(e)),
            }
        }
        let tmp = self.begin(batch, rel, meta.mode).map_err(apply_err)?;
        if let Err(e) = fsops::write_all(tmp.out.as_fd(), &data) {
            self.target.abort_file(tmp);
            return Err(format!("cannot write {}: {e}", paths::display(rel)));
        }
        self.target
            .finish_file(tmp, rel, meta, xattrs.as_ref())
            .map(done)
            .map_err(apply_err)
    }

    fn data(&mut self, file: u64, chunk: Chunk) -> Result<(), String> {
        let Some(inc) = self.open.get_mut(&file) else {
            return Err(format!("data for file stream {file}, which is not open"));
        };
        match chunk {
            Chunk::End { hash, commit } => {
                let Some(inc) = self.open.remove(&file) else {
                    return Ok(());
                };
                let r = self.finish(inc.batch, inc, hash, commit);
                let _ = r;
                Ok(())
            }
            Chunk::Bytes(data) => {
                write_part(inc, &data);
                Ok(())
            }
            Chunk::Zstd(z) => {
                if inc.failed.is_none() {
                    match zstd_decompress(&z, protocol::CHUNK) {
                        Ok(data) => write_part(inc, &data),
                        Err(e) => inc.failed = Some(format!("bad compressed chunk: {e}")),
                    }
                }
                Ok(())
            }
            Chunk::Hole { len } => {
                if inc.failed.is_some() {
                    return Ok(());
                }
                if let Some(t) = inc.tmp.as_ref() {
                    let to = inc.len.saturating_add(len);
                    if let Err(e) = rustix::fs::seek(&t.out, rustix::fs::SeekFrom::Start(to)) {
                        inc.failed = Some(format!(
                            "cannot skip a hole in {}: {e}",
                            paths::display(&inc.rel)
                        ));
                        return Ok(());
                    }
                    inc.len = to;
                    inc.hasher.update(&protocol::hole_marker(len));
                }
                Ok(())
            }
            Chunk::Copy { offset, len } => {
                if inc.failed.is_some() {
                    return Ok(());
                }
                let Some(base) = inc.base.take() else {
                    inc.failed = Some("block copy without a delta base".into());
                    return Ok(());
                };
                let mut buf = vec![0u8; (len.min(protocol::CHUNK as u64)) as usize];
                let mut done = 0u64;
                while done < len && inc.failed.is_none() {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    match base.read_exact_at(&mut buf[..n], offset + done) {
                        Ok(()) => write_part(inc, &buf[..n]),
                        Err(e) => inc.failed = Some(format!("reading the delta base: {e}")),
                    }
                    done += n as u64;
                }
                inc.base = Some(base);
                Ok(())
            }
        }
    }

    fn finish(
        &mut self,
        batch: u64,
        inc: Incoming,
        hash: protocol::ContentHash,
        commit: bool,
    ) -> bool {
        let Incoming {
            index,
            rel,
            meta,
            tmp,
            hasher,
            failed,
            xattrs,
            len,
            ..
        } = inc;
        let r = match (failed, tmp) {
            (Some(e), tmp) => {
                if let Some(t) = tmp {
                    self.target.abort_file(t);
                }
                Err(e)
            }
            (None, None) => Err("no file open".into()),
            (None, Some(t)) => {
                if !commit {
                    self.target.abort_file(t);
                    Err("abandoned by the sender (the source changed while it was sent)".into())
                } else if hasher.finish() != hash {
                    self.target.abort_file(t);
                    Err(format!(
                        "{}: content checksum mismatch; not installed",
                        paths::display(&rel)
                    ))
                } else {
                    self.target
                        .set_len(&t, len)
                        .map_err(|e| format!("cannot write {}: {e}", paths::display(&rel)))
                        .and_then(|()| {
                            self.target
                                .finish_file(t, &rel, &meta, xattrs.as_ref())
                                .map(done)
                                .map_err(apply_err)
                        })
                }
            }
        };
        let ok = r.is_ok();
        self.result(batch, index, r);
        ok
    }
}

/// The content of an [`Op::Whole`] and how to put it in place.
struct Whole {
    zstd: bool,
    data: Vec<u8>,
    hash: protocol::ContentHash,
    fresh: bool,
    xattrs: Option<Xattrs>,
}

/// The answer to an operation done, with what the target refused.
fn done(refused: Refused) -> Done {
    if refused.is_empty() {
        Done::Ok
    } else {
        Done::Partial {
            refused: refused.iter().map(|k| k.to_string()).collect(),
        }
    }
}

fn write_part(inc: &mut Incoming, data: &[u8]) {
    if inc.failed.is_some() {
        return;
    }
    let Some(t) = inc.tmp.as_ref() else { return };
    if let Err(e) = write_holey(t.out.as_fd(), data) {
        inc.failed = Some(format!("cannot write {}: {e}", paths::display(&inc.rel)));
        return;
    }
    inc.len += data.len() as u64;
    inc.hasher.update(data);
}

/// Writes `data` at the file's offset, skipping (seeking over) each whole
/// block of zeros rather than writing it: what a delta or a sender that
/// does not keep holes sends as zeros becomes a hole, as `rsync -S` does.
/// The file's length is set at the end (see `Session::finish`), so a
/// trailing run of zeros is not lost.
fn write_holey(out: std::os::fd::BorrowedFd<'_>, data: &[u8]) -> io::Result<()> {
    const HOLE_BLOCK: usize = 4096;
    let mut start = 0;
    while start < data.len() {
        let zero_run = data[start..]
            .chunks(HOLE_BLOCK)
            .take_while(|b| b.len() == HOLE_BLOCK && b.iter().all(|&x| x == 0))
            .count()
            * HOLE_BLOCK;
        if zero_run > 0 {
            rustix::fs::seek(out, rustix::fs::SeekFrom::Current(zero_run as i64))?;
            start += zero_run;
            continue;
        }
        let data_run = data[start..]
            .chunks(HOLE_BLOCK)
            .take_while(|b| b.len() < HOLE_BLOCK || b.iter().any(|&x| x != 0))
            .map(<[u8]>::len)
            .sum::<usize>();
        fsops::write_all(out, &data[start..start + data_run])?;
        start += data_run;
    }
    Ok(())
}

/// Decompresses `z`, which the protocol allows to hold at most `limit`
/// bytes (a chunk, a whole small file): more is hostile and refused
/// without being inflated further.
fn zstd_decompress(z: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut d = zstd::stream::read::Decoder::new(z)?;
    // A window larger than the content can be is hostile too, and would
    // make the decoder reserve it (up to 128 MiB by default).
    d.window_log_max(limit.next_power_of_two().trailing_zeros() + 1)?;
    d.take(limit as u64 + 1).read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompresses beyond the {limit}-byte limit"),
        ));
    }
    Ok(out)
}
