//! Nobody can stop replication from outside (issue 35): strangers on the
//! network cannot keep a daemon that holds the token from its receiver.

use crate::remote::{config, rss_and_cpu, start_config};
use crate::util::*;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use drmirror::protocol::{self, Reply, Request, HELLO_MAX, MAGIC, VERSION};

/// A TCP connection to the receiver from `from` (any 127.x address works
/// on loopback): several source addresses on one machine.
fn connect_from(from: IpAddr, port: u16) -> TcpStream {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd: OwnedFd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &SocketAddr::new(from, 0)).expect("bind the source address");
    connect(&fd, &SocketAddr::from(([127, 0, 0, 1], port))).expect("connect");
    TcpStream::from(fd)
}

/// What a stranger does once connected.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Says nothing.
    Idle,
    /// Announces a frame the size of a Hello, then sends a byte every
    /// half second: a per-read timeout never fires.
    Trickle,
    /// Announces a 4 MiB frame, then trickles.
    Huge,
}

/// How a stranger's connection ended.
#[derive(Debug)]
struct Dropped {
    behaviour: Behaviour,
    after: Duration,
    /// The receiver's reason, from its `Refused` frame.
    reason: String,
}

/// Runs one stranger on `sock` until the receiver closes it (or `give_up`
/// passes, which fails the test).
fn stranger(mut sock: TcpStream, b: Behaviour, give_up: Duration) -> Dropped {
    let t0 = Instant::now();
    let header = |len: u32| {
        let mut h = len.to_le_bytes().to_vec();
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    };
    let _ = match b {
        Behaviour::Idle => Ok(()),
        Behaviour::Trickle => sock.write_all(&header(HELLO_MAX as u32 - 8)),
        Behaviour::Huge => sock.write_all(&header(4 << 20)),
    };
    sock.set_read_timeout(Some(ms(500))).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            t0.elapsed() < give_up,
            "{b:?}: the receiver kept a stranger for {give_up:?}"
        );
        if b != Behaviour::Idle {
            let _ = sock.write_all(b"x");
        }
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            // Closed with our trickled bytes unread.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{b:?}: {e}"),
        }
    }
    let after = t0.elapsed();
    let mut r = &got[..];
    let reason = match protocol::read_frame::<_, Reply>(&mut r, &mut Vec::new()) {
        Ok(Reply::Refused { reason }) => reason,
        other => format!("no Refused frame ({other:?})"),
    };
    Dropped {
        behaviour: b,
        after,
        reason,
    }
}

/// `n` strangers from `from`, a third of each behaviour, each on its own
/// thread.
fn strangers(
    n: usize,
    from: IpAddr,
    port: u16,
    give_up: Duration,
) -> Vec<std::thread::JoinHandle<Dropped>> {
    let kinds = [Behaviour::Idle, Behaviour::Trickle, Behaviour::Huge];
    (0..n)
        .map(|i| {
            let sock = connect_from(from, port);
            let b = kinds[i % kinds.len()];
            std::thread::spawn(move || stranger(sock, b, give_up))
        })
        .collect()
}

/// Checks how each stranger was dropped: at once for a frame too large for
/// a Hello, at the deadline or displaced by a newer one otherwise.
fn check_dropped(all: Vec<std::thread::JoinHandle<Dropped>>, deadline: Duration) {
    for h in all {
        let d = h.join().expect("stranger thread");
        eprintln!(
            "{:?} dropped after {:.2} s: {}",
            d.behaviour,
            d.after.as_secs_f64(),
            d.reason
        );
        match d.behaviour {
            Behaviour::Huge => assert!(
                d.reason.contains("exceeds the 16384-byte limit")
                    || d.reason.contains("handshake slots full"),
                "{d:?}"
            ),
            Behaviour::Idle | Behaviour::Trickle => {
                let timed_out = d
                    .reason
                    .contains(&format!("no handshake within {} s", deadline.as_secs_f64()));
                assert!(
                    timed_out || d.reason.contains("handshake slots full"),
                    "{d:?}"
                );
                // The deadline runs from accept: never before it.
                if timed_out {
                    assert!(d.after >= deadline - ms(100), "{d:?}");
                }
            }
        }
    }
}

/// Acceptance 1 of issue 35: strangers idle or trickling bytes, opened
/// before the daemon connects (from its own address) and during its session
/// (from another), never keep it out: it is never refused, its mirror
/// converges, the strangers are dropped at the handshake deadline (or
/// displaced), every refusal is counted, the log says it once per address
/// and reason, and the receiver's memory stays small.
fn strangers_cannot_keep_the_daemon_out(n: usize) {
    let env = Env::new();
    gen_tree(&env.s("t"), 200, 20);
    let tcp = Tcp::new(&env);
    let mport = free_port();
    let deadline = secs(3);
    let recv = tcp.receiver_args(
        &env,
        &[],
        &[
            "--handshake-timeout",
            "3s",
            "--metrics",
            &format!("127.0.0.1:{mport}"),
        ],
    );
    let give_up = deadline * 10 + secs(30);
    let local: IpAddr = [127, 0, 0, 1].into();
    let mut all = strangers(n, local, tcp.port, give_up);

    let t0 = Instant::now();
    let d = start_config(&env, &config(&env, &tcp.target_toml(&env), ""));
    let line = d.wait_log("initial sync complete", secs(120));
    eprintln!(
        "{n} strangers: initial sync complete {:.2} s after the daemon started",
        t0.elapsed().as_secs_f64()
    );
    eprintln!("{line}");
    env.converge(&[], &d);

    let other: IpAddr = [127, 0, 0, 2].into();
    all.extend(strangers(n, other, tcp.port, give_up));
    write(&env.s("t/during"), b"written while strangers knock");
    env.converge(&[], &d);
    let (rss, _) = rss_and_cpu(recv.pid);
    eprintln!("receiver RSS with {n} + {n} strangers: {} KiB", rss / 1024);
    assert!(rss < 64 << 20, "receiver RSS {rss} bytes");

    check_dropped(all, deadline);
    let log = d.log();
    assert!(
        !log.contains("receiver refused") && !log.contains("cannot reach"),
        "the daemon was kept out:\n{}",
        d.log_tail()
    );
    let text = http_get(mport, "/metrics").expect("receiver metrics");
    let refused = |reason: &str| {
        metric(
            &text,
            &format!("drmirror_receive_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    // Each stranger refused once, for one of its three reasons; the
    // daemon never.
    let dropped = ["bad_handshake", "handshake_timeout", "handshake_slots_full"]
        .iter()
        .map(|r| refused(r))
        .sum::<f64>();
    assert_eq!(dropped, 2.0 * n as f64, "{text}");
    for r in ["auth", "connection_limit", "version", "root"] {
        assert_eq!(refused(r), 0.0, "{r}: {text}");
    }
    // Logged at most once per address and reason within the minute this
    // test lasts.
    let rlog = recv.log();
    for addr in ["127.0.0.1", "127.0.0.2"] {
        for why in ["bad handshake", "no handshake", "handshake slots full"] {
            let lines = rlog
                .lines()
                .filter(|l| l.contains(&format!("refusing {addr}: {why}")))
                .count();
            assert!(
                lines <= 1,
                "{addr} {why}: {lines} lines\n{}",
                recv.log_tail()
            );
        }
        assert!(
            rlog.contains(&format!("refusing {addr}: ")),
            "{}",
            recv.log_tail()
        );
    }
    d.terminate();
    recv.terminate();
}

#[test]
fn eight_strangers_cannot_keep_the_daemon_out() {
    strangers_cannot_keep_the_daemon_out(8);
}

#[test]
fn sixty_four_strangers_cannot_keep_the_daemon_out() {
    strangers_cannot_keep_the_daemon_out(64);
}

/// Sessions are limited by `--max-connections`; strangers do not count.
#[test]
fn tcp_receiver_limits_sessions_not_strangers() {
    let env = Env::new();
    gen_tree(&env.s("t"), 30, 10);
    let tcp = Tcp::new(&env);
    let recv = tcp.receiver_args(
        &env,
        &[],
        &["--max-connections", "1", "--handshake-timeout", "2s"],
    );
    let silent = TcpStream::connect(("127.0.0.1", tcp.port)).expect("connect");
    let d = start_config(&env, &config(&env, &tcp.target_toml(&env), ""));
    env.converge(&[], &d);
    // A second daemon with the token is refused while the first holds the
    // only session slot.
    let mut second = TcpStream::connect(("127.0.0.1", tcp.port)).expect("connect");
    let token = std::fs::read_to_string(&tcp.token).expect("token");
    protocol::write_frame(
        &mut second,
        &Request::Hello {
            magic: MAGIC,
            version: VERSION,
            token: Some(token.trim().to_string()),
            root: None,
        },
    )
    .expect("hello");
    match protocol::read_frame::<_, Reply>(&mut second, &mut Vec::new()) {
        Ok(Reply::Refused { reason }) => {
            assert!(reason.contains("connection limit (1) reached"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The silent client was told why, then hung up on.
    let d2 = stranger(silent, Behaviour::Idle, secs(60));
    assert!(d2.reason.contains("no handshake within 2 s"), "{d2:?}");
    recv.wait_log("refusing 127.0.0.1: no handshake within 2 s", secs(10));
    // Live changes keep flowing over the daemon's connection.
    write(&env.s("t/live"), b"live");
    env.converge(&[], &d);
    assert!(!d.log().contains("receiver refused"), "{}", d.log_tail());
    d.terminate();
    recv.terminate();
}

/// One fuzz case: bytes to send, in chunks with pauses between them.
struct Case {
    bytes: Vec<u8>,
    chunks: Vec<(usize, Duration)>,
    /// A whole valid Hello with the token, sent before the deadline.
    welcome_expected: bool,
}

fn hello_bytes(token: &str) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::encode_frame(
        &mut out,
        &Request::Hello {
            magic: MAGIC,
            version: VERSION,
            token: Some(token.to_string()),
            root: None,
        },
    )
    .expect("encode");
    out
}

/// A random handshake: a valid Hello (sent whole, in pieces, or slowly), or
/// one truncated, bit-flipped, with a wrong token or length, or garbage.
fn fuzz_case(rng: &mut XorShift, token: &str, deadline: Duration) -> Case {
    let good = hello_bytes(token);
    let mut bytes = good.clone();
    let mut valid = true;
    match rng.below(8) {
        0 | 1 => {}
        2 => {
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 << rng.below(8);
            valid = false;
        }
        3 => {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
            valid = false;
        }
        4 => {
            bytes = hello_bytes("not-the-token");
            valid = false;
        }
        5 => {
            let len = rng.next_u64() as u32;
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            valid = false;
        }
        6 => {
            bytes = (0..rng.below(64 << 10))
                .map(|_| rng.next_u64() as u8)
                .collect();
            valid = false;
        }
        _ => {
            // A valid Hello followed by garbage requests.
            bytes.extend((0..rng.below(4096)).map(|_| rng.next_u64() as u8));
        }
    }
    // Chunks of 1 byte up to the whole, with pauses; slow ones may pass
    // the deadline.
    let slow = rng.below(4) == 0;
    let mut chunks = Vec::new();
    let mut left = bytes.len();
    let mut spent = Duration::ZERO;
    while left > 0 {
        let most = if rng.below(2) == 0 { 16 } else { 4096 };
        let n = (1 + rng.below(most) as usize).min(left);
        let pause = if slow {
            ms(rng.below(400))
        } else {
            Duration::from_micros(rng.below(2000))
        };
        spent += pause;
        chunks.push((n, pause));
        left -= n;
    }
    // Room for a busy machine: only a Hello complete well within the
    // deadline must be welcomed.
    let hello_len = good.len().min(bytes.len());
    let mut sent = 0;
    let mut hello_time = Duration::ZERO;
    for (n, pause) in &chunks {
        if sent >= hello_len {
            break;
        }
        hello_time += *pause;
        sent += n;
    }
    Case {
        welcome_expected: valid && hello_time < deadline / 4,
        bytes,
        chunks,
    }
}

/// Runs one case: sends it, then reads until the receiver closes (or
/// welcomes). Returns what came back.
fn run_case(port: u16, c: &Case, give_up: Duration) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut at = 0;
    for (n, pause) in &c.chunks {
        std::thread::sleep(*pause);
        if s.write_all(&c.bytes[at..at + n]).is_err() {
            break; // closed by the receiver: read its reason below
        }
        at += n;
    }
    s.set_read_timeout(Some(ms(200)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if t0.elapsed() > give_up {
            return Err(format!("not closed after {give_up:?}; got {got:?}"));
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                // A welcomed session stays open: that is the outcome.
                let mut r = &got[..];
                if let Ok(Reply::Welcome { .. }) =
                    protocol::read_frame::<_, Reply>(&mut r, &mut Vec::new())
                {
                    return Ok(got);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Acceptance 3 of issue 35: random handshakes, written in random pieces at
/// random speeds by several clients at once, against a real receiver. Each
/// connection is welcomed (a valid Hello with the token, in time) or
/// refused with a reason and closed; none is kept past the deadline; the
/// receiver stays up and small, and a daemon then mirrors through it.
/// `DRMIRROR_FUZZ_SECS` (default 15) sets the length of the run.
#[test]
fn the_handshake_survives_fuzzing_with_slow_and_partial_writes() {
    let secs_total: u64 = std::env::var("DRMIRROR_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("DRMIRROR_FUZZ_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("fuzz seed {seed:#x} for {secs_total} s (DRMIRROR_FUZZ_SEED / DRMIRROR_FUZZ_SECS)");
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let deadline = secs(2);
    let recv = tcp.receiver_args(
        &env,
        &[],
        &[
            "--handshake-timeout",
            "2s",
            "--max-handshakes",
            "64",
            "--max-handshakes-per-address",
            "64",
            "--max-connections",
            "64",
        ],
    );
    let token = std::fs::read_to_string(&tcp.token).expect("token");
    let token = token.trim().to_string();
    let stop = Instant::now() + secs(secs_total);
    let clients = 8;
    let results: Vec<(u64, u64, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|k| {
                let (token, port) = (token.clone(), tcp.port);
                sc.spawn(move || {
                    let mut rng = XorShift::new(seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let (mut cases, mut welcomed, mut refused) = (0, 0, 0);
                    while Instant::now() < stop {
                        let c = fuzz_case(&mut rng, &token, deadline);
                        let got = run_case(port, &c, deadline * 5 + secs(20))
                            .unwrap_or_else(|e| panic!("client {k} case {cases}: {e}"));
                        let mut r = &got[..];
                        match protocol::read_frame::<_, Reply>(&mut r, &mut Vec::new()) {
                            Ok(Reply::Welcome { .. }) => welcomed += 1,
                            Ok(Reply::Refused { .. }) => {
                                assert!(!c.welcome_expected, "client {k} case {cases}: a valid Hello in time was refused: {got:?}");
                                refused += 1
                            }
                            other => panic!("client {k} case {cases}: neither Welcome nor Refused: {other:?}"),
                        }
                        if c.welcome_expected {
                            let mut r = &got[..];
                            assert!(
                                matches!(protocol::read_frame::<_, Reply>(&mut r, &mut Vec::new()), Ok(Reply::Welcome { .. })),
                                "client {k} case {cases}: not welcomed: {got:?}"
                            );
                        }
                        cases += 1;
                    }
                    (cases, welcomed, refused)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let (cases, welcomed, refused) = results
        .iter()
        .fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    let (rss, _) = rss_and_cpu(recv.pid);
    eprintln!(
        "fuzz: {cases} handshakes in {secs_total} s, {welcomed} welcomed, {refused} refused; receiver RSS {} KiB",
        rss / 1024
    );
    assert!(welcomed > 0 && refused > 0, "the cases cover both outcomes");
    assert!(recv.is_running(), "{}", recv.log_tail());
    assert!(rss < 64 << 20, "receiver RSS {rss} bytes");
    // And it still serves a daemon.
    gen_tree(&env.s("t"), 50, 10);
    let d = start_config(&env, &config(&env, &tcp.target_toml(&env), ""));
    env.converge(&[], &d);
    d.terminate();
    recv.terminate();
}

/// Levels of a deep chain: 22 names of 255 bytes, 5,632 bytes below the
/// root, past PATH_MAX (4,096).
const DEEP: usize = 22;

/// Name of level `i` of chain `tag`: 255 bytes, the longest a name can be.
fn chain_name(i: usize, tag: u8) -> Vec<u8> {
    let mut n = format!("{i:02}").into_bytes();
    n.resize(255, tag);
    n
}

/// Makes (or reuses) chain `tag` below `root`: a directory per level, each
/// with a file `f<i>` holding `level <i> <what>`. By descriptor, level by
/// level: the path calls of std fail past PATH_MAX.
fn make_chain(root: &Path, tag: u8, what: &str) {
    use rustix::fs::{mkdirat, openat, Mode, OFlags};
    let mut dir = openat(
        rustix::fs::CWD,
        root,
        OFlags::PATH | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .expect("open root");
    for i in 0..DEEP {
        let name = chain_name(i, tag);
        match mkdirat(&dir, name.as_slice(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("mkdir level {i}: {e}"),
        }
        dir = openat(
            &dir,
            name.as_slice(),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .expect("open level");
        let f = openat(
            &dir,
            format!("f{i}").as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
            Mode::from_raw_mode(0o644),
        )
        .expect("create file");
        rustix::io::write(&f, format!("level {i} {what}\n").as_bytes()).expect("write");
    }
}

/// Opens level `levels` of chain `tag` below `root` (`None` if missing).
fn chain_dir(root: &Path, tag: u8, levels: usize) -> Option<OwnedFd> {
    use rustix::fs::{openat, Mode, OFlags};
    let mut dir = openat(
        rustix::fs::CWD,
        root,
        OFlags::PATH | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .ok()?;
    for i in 0..levels {
        dir = openat(
            &dir,
            chain_name(i, tag).as_slice(),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .ok()?;
    }
    Some(dir)
}

/// The content of each level's file of chain `tag` below `root`.
fn read_chain(root: &Path, tag: u8) -> Vec<Option<String>> {
    use rustix::fs::{openat, Mode, OFlags};
    (0..DEEP)
        .map(|i| {
            let dir = chain_dir(root, tag, i + 1)?;
            let f = openat(
                &dir,
                format!("f{i}").as_str(),
                OFlags::RDONLY,
                Mode::empty(),
            )
            .ok()?;
            let mut s = String::new();
            std::fs::File::from(f).read_to_string(&mut s).ok()?;
            Some(s)
        })
        .collect()
}

/// Chain `tag` is mirrored whole, with the content `what` at every level.
fn assert_chain(env: &Env, tag: u8, what: &str) {
    let want: Vec<Option<String>> = (0..DEEP)
        .map(|i| Some(format!("level {i} {what}\n")))
        .collect();
    assert_eq!(read_chain(&env.src, tag), want, "source");
    assert_eq!(
        read_chain(&env.dst, tag),
        want,
        "chain {} on the target",
        tag as char
    );
}

/// Live changes deep in chain `tag`: a subdirectory made, filled and
/// renamed at the bottom, and the files of the last two levels rewritten.
fn change_deep(root: &Path, tag: u8) {
    use rustix::fs::{mkdirat, openat, renameat, Mode, OFlags};
    let dir = chain_dir(root, tag, DEEP).expect("bottom of the chain");
    mkdirat(&dir, "sub", Mode::from_raw_mode(0o755)).expect("mkdir sub");
    let f = openat(
        &dir,
        "sub/x",
        OFlags::WRONLY | OFlags::CREATE,
        Mode::from_raw_mode(0o600),
    )
    .expect("create sub/x");
    rustix::io::write(&f, b"deep x\n").expect("write");
    renameat(&dir, "sub", &dir, "sub2").expect("rename");
    rustix::fs::symlinkat(format!("f{}", DEEP - 1).as_str(), &dir, "link").expect("symlink");
}

/// Acceptance 2 of issue 35: a chain of directories deeper than PATH_MAX,
/// made before the start, while running and while stopped, neither stops
/// the daemon from starting nor goes unmirrored: a user who can write in
/// the source cannot stop the DR copy.
fn a_chain_deeper_than_path_max_is_mirrored(env: &Env, start: &dyn Fn() -> Daemon) {
    gen_tree(&env.s("t"), 100, 10);
    make_chain(&env.src, b'a', "before");
    let d = start();
    env.converge(&["--checksum"], &d);
    assert_chain(env, b'a', "before");

    make_chain(&env.src, b'b', "live");
    make_chain(&env.src, b'a', "changed");
    change_deep(&env.src, b'a');
    write(&env.s("t/live"), b"live");
    env.converge(&["--checksum"], &d);
    assert_chain(env, b'b', "live");
    assert_chain(env, b'a', "changed");
    let bottom = chain_dir(&env.dst, b'a', DEEP).expect("bottom on the target");
    rustix::fs::statat(&bottom, "sub2/x", rustix::fs::AtFlags::empty()).expect("sub2/x mirrored");
    d.terminate();

    make_chain(&env.src, b'c', "while stopped");
    make_chain(&env.src, b'b', "changed while stopped");
    let d = start();
    env.converge(&["--checksum"], &d);
    assert_chain(env, b'c', "while stopped");
    assert_chain(env, b'b', "changed while stopped");
    // Nothing went wrong on the way (a busy metrics port aside).
    let log = d.log();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("metrics endpoint"))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    d.terminate();
}

fn a_deep_chain_is_mirrored(b: Backend) {
    let env = Env::with(b);
    a_chain_deeper_than_path_max_is_mirrored(&env, &|| env.start(&[]));
}

suite!(a_deep_chain_is_mirrored);

/// The same over a `tcp://` target: the receiver writes beneath its root
/// at any depth too.
#[test]
fn a_deep_chain_is_mirrored_over_tcp() {
    let env = Env::new();
    let tcp = Tcp::new(&env);
    let recv = tcp.receiver(&env, &[]);
    let toml = config(&env, &tcp.target_toml(&env), "");
    a_chain_deeper_than_path_max_is_mirrored(&env, &|| start_config(&env, &toml));
    assert!(!recv.log().contains(" WARN "), "{}", recv.log_tail());
    recv.terminate();
}

/// A file written without pause (rewritten in place all the time, and
/// growing without end) never makes a copy run without end (a copy reads
/// the size it saw at open), is never installed half-written, and holds
/// nothing else back: the rest of the tree is mirrored meanwhile, while
/// `status` names the file and the lag grows with its age, so the gap is on
/// show. Once the writer stops, it arrives.
#[test]
fn a_file_written_without_pause_holds_back_nothing_else_and_is_on_show() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    write(&env.s("hot.log"), &pattern(1 << 20, 3));
    let d = env.start(&["--metrics", "off"]);
    env.converge(&[], &d);
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let _stop = StopOnDrop(&stop);
        let hot = env.s("hot.log");
        let stop = &stop;
        let writer = sc.spawn(move || rewrite_without_pause(&hot, stop));
        // Everything else flows.
        gen_tree(&env.s("meanwhile"), 50, 10);
        wait_until(
            "the rest of the tree is mirrored",
            secs(60),
            Some(&d),
            || {
                let o = env.verify_out(&[]);
                // Only hot.log differs, if anything.
                o.stdout
                    .lines()
                    .all(|l| l.contains("hot.log") || l.starts_with("verify: "))
            },
        );
        // The file that does not settle is named, and the lag shows it.
        wait_until("status names the changing file", secs(60), Some(&d), || {
            let s = status_json(&env.state);
            let t = &s["targets"][0];
            t["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("hot.log"))
                && t["lag_seconds"].as_f64().is_some_and(|l| l >= 2.0)
        });
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().expect("writer");
        eprintln!("{writes} writes of 4 KiB");
    });
    env.converge(&["--checksum"], &d);
    d.terminate();
}

/// FIFOs in the source with a process blocked opening each end: the
/// daemon never opens them (which would wake the one and break the other's
/// pipe), and they stop nothing: the tree around them is mirrored.
#[test]
fn fifos_with_blocked_readers_and_writers_stop_nothing() {
    let env = Env::new();
    gen_tree(&env.s("t"), 30, 10);
    let (r, w) = (env.s("t/read.fifo"), env.s("t/write.fifo"));
    for p in [&r, &w] {
        mkfifo(p);
    }
    // Each blocks in open(2) until the other end is opened.
    let mut reader = std::process::Command::new("cat")
        .arg(&r)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cat");
    let mut writer = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("echo written > '{}'", w.display()))
        .spawn()
        .expect("sh");
    let d = env.start(&["--metrics", "off"]);
    write(&env.s("t/live"), b"live");
    env.converge(&[], &d);
    rustix::fs::utimensat(
        rustix::fs::CWD,
        r.as_path(),
        &rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        },
        rustix::fs::AtFlags::empty(),
    )
    .expect("touch the fifo");
    write(&env.s("t/after-touch"), b"after");
    env.converge(&[], &d);
    // Still blocked: the daemon opened neither.
    assert!(
        reader.try_wait().expect("reader").is_none(),
        "the daemon opened read.fifo for writing"
    );
    assert!(
        writer.try_wait().expect("writer").is_none(),
        "the daemon opened write.fifo for reading"
    );
    // Their own peers end them.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&r)
        .expect("open read.fifo")
        .write_all(b"bye\n")
        .expect("write");
    let out = reader.wait_with_output().expect("reader output");
    assert_eq!(out.stdout, b"bye\n");
    let mut got = String::new();
    std::fs::File::open(&w)
        .expect("open write.fifo")
        .read_to_string(&mut got)
        .expect("read");
    assert_eq!(got, "written\n");
    assert!(writer.wait().expect("writer").success());
    assert!(d.is_running(), "{}", d.log_tail());
    d.terminate();
}

/// A directory of 100,000 entries made while the daemon runs (a user
/// unpacking a mail spool into one directory) neither stops the daemon nor
/// hides changes elsewhere: a file written in the middle of it arrives,
/// everything converges, and a restart finds it all in sync.
#[test]
fn a_directory_of_a_hundred_thousand_entries_stops_nothing() {
    let env = Env::new();
    let d = env.start(&["--metrics", "off"]);
    let big = env.s("big");
    mkdirp(&big);
    for i in 0..100_000u32 {
        std::fs::File::create(big.join(format!("f{i:06}"))).expect("create");
        if i == 50_000 {
            write(&env.s("elsewhere"), b"written halfway");
        }
    }
    env.converge_for(&[], &d, secs(300));
    assert_eq!(read(&env.d("elsewhere")), b"written halfway");
    d.terminate();
    let d = env.start(&["--metrics", "off"]);
    let line = d.wait_initial_sync(secs(120));
    assert_eq!(field(&line, "copied"), 0, "{line}");
    env.converge(&[], &d);
    d.terminate();
}

/// A user who makes more directories than inotify has watches cannot stop
/// the DR copy (it used to refuse to start, and to exit while running):
/// the daemon starts and runs, says what it cannot watch (log, `status`
/// exiting 1), compares those directories every 30 s so their changes still
/// arrive, and watches them once watches are free again. The limit is set
/// low in a user namespace of the daemon's own
/// (`user.max_inotify_watches`), so the rest of the machine is untouched.
#[test]
fn the_inotify_watch_limit_degrades_capture_and_says_so() {
    let env = Env::new();
    gen_tree(&env.s("t"), 20, 10);
    for i in 0..40 {
        write(&env.s(format!("many/d{i:02}/f")), b"before");
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "sh", "-c"])
        .arg("echo 30 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"")
        .arg(bin())
        .args(env.run_args(&["--watch", "inotify", "--metrics", "off"]));
    let d = Daemon::spawn_command(cmd, &env.root);
    d.wait_log("drmirror ready", secs(60));
    let line = d.wait_log("inotify watch limit (30) reached", secs(60));
    eprintln!("{line}");
    env.converge(&[], &d);
    let o = status(&env.state, &[]);
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(
        o.stdout.contains("NOT CAPTURED: ") && o.stdout.contains("inotify watch limit 30"),
        "{}",
        o.describe()
    );
    // Changes in every directory, watched or not, arrive.
    for i in 0..40 {
        write(
            &env.s(format!("many/d{i:02}/f")),
            b"changed, watched or not",
        );
    }
    env.converge_for(&[], &d, secs(120));
    // Watches freed: within a retry, everything is watched again and
    // status says so.
    remove_dir_all(&env.s("many"));
    wait_until(
        "status shows everything captured",
        secs(120),
        Some(&d),
        || status(&env.state, &[]).code == Some(0),
    );
    d.wait_log("directories past the watch limit are watched now", secs(10));
    write(&env.s("t/after"), b"captured live again");
    env.converge(&[], &d);
    d.terminate();
}
