//! Admission of TCP connections to the receiver: who may hold a slot, and
//! for how long, before it has shown the token.
//!
//! A stranger on the network must never be able to keep a daemon that holds
//! the token from connecting. The invariants:
//!
//! - A connection that has not yet shown the token holds a **handshake
//!   slot**, never a session slot: handshake slots (`handshakes`, with at
//!   most `per_address` from one IP address) are separate from the
//!   `sessions` slots of authenticated daemons, and each costs at most a
//!   [`HELLO_MAX`](crate::protocol::HELLO_MAX) buffer and a thread blocked
//!   in `read`.
//! - A handshake lasts at most `deadline` from `accept`, however the bytes
//!   trickle in: the reaper shuts the socket's read side down when it
//!   expires (the connection's thread then answers "no handshake within
//!   …" and ends). A per-read timeout would let one byte every few seconds
//!   hold the slot for ever.
//! - When the handshake slots are full, a new connection displaces the
//!   oldest handshake of its own address if that address is at its cap, or
//!   else the oldest of the address holding the most. A flood from one
//!   address displaces only itself and other addresses keep their slots;
//!   and a daemon, whose Hello follows its connect by one round trip, gets
//!   in past connections that have sat there for seconds.
//! - A session slot is taken only once the Hello has passed every check
//!   ([`Ticket::admit`]), and given back when the [`Ticket`] is dropped.
//! - Every refusal is counted in `drmirror_receive_refused_total{reason}`
//!   and logged at most once per address and reason per minute, with the
//!   number left unlogged: a flood cannot fill the log either.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::locks::lock;

/// How many connections may be where, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Authenticated sessions served at once (`--max-connections`).
    pub sessions: usize,
    /// Connections in their handshake at once.
    pub handshakes: usize,
    /// Connections in their handshake at once from one IP address.
    pub per_address: usize,
    /// From `accept` to an accepted Hello.
    pub deadline: Duration,
}

/// Why a connection was turned away: the label of
/// `drmirror_receive_refused_total` and the reason sent to the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The Hello did not arrive in full within the deadline.
    HandshakeTimeout,
    /// Displaced by a newer connection while the handshake slots were full.
    HandshakeSlotsFull,
    /// Not a drmirror Hello: garbage, a frame too large, another request.
    BadHandshake,
    /// Wrong or missing token.
    Auth,
    /// A protocol version this receiver does not speak.
    Version,
    /// The Hello names another root than the one served.
    Root,
    /// Every session slot is taken by authenticated daemons.
    ConnectionLimit,
}

impl RefusalKind {
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::HandshakeTimeout => "handshake_timeout",
            RefusalKind::HandshakeSlotsFull => "handshake_slots_full",
            RefusalKind::BadHandshake => "bad_handshake",
            RefusalKind::Auth => "auth",
            RefusalKind::Version => "version",
            RefusalKind::Root => "root",
            RefusalKind::ConnectionLimit => "connection_limit",
        }
    }
}

impl Refusal {
    pub fn new(kind: RefusalKind, reason: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }
}

/// What a handshake's end depends on: the TCP gate, or nothing (stdio,
/// which ssh has already authenticated).
pub trait Admission {
    /// Why the handshake's reads were cut short from outside, if they were.
    fn cut(&self) -> Option<Refusal>;
    /// The Hello passed its checks: take a session slot.
    fn admit(&mut self) -> Result<(), Refusal>;
}

/// No gate: the stdio receiver.
pub struct Open;

impl Admission for Open {
    fn cut(&self) -> Option<Refusal> {
        None
    }
    fn admit(&mut self) -> Result<(), Refusal> {
        Ok(())
    }
}

/// [`Waiting::cut`] values.
const NOT_CUT: u8 = 0;
const CUT_DEADLINE: u8 = 1;
const CUT_DISPLACED: u8 = 2;

/// A connection in its handshake.
struct Waiting {
    addr: IpAddr,
    since: Instant,
    /// A handle on the socket, to shut its read side down.
    sock: TcpStream,
    /// Set (to `CUT_*`) by whoever shut it down, read by its thread.
    cut: Arc<AtomicU8>,
}

#[derive(Default)]
struct State {
    /// By admission order: the first entry is the oldest.
    waiting: BTreeMap<u64, Waiting>,
    sessions: usize,
    next: u64,
}

impl State {
    fn count_from(&self, addr: IpAddr) -> usize {
        self.waiting.values().filter(|w| w.addr == addr).count()
    }

    /// The handshake a connection from `addr` displaces, if the slots are
    /// full (see the module doc).
    fn to_displace(&self, addr: IpAddr, limits: &Limits) -> Option<u64> {
        let oldest_of = |a: IpAddr| {
            self.waiting
                .iter()
                .find(|(_, w)| w.addr == a)
                .map(|(id, _)| *id)
        };
        if self.count_from(addr) >= limits.per_address {
            return oldest_of(addr);
        }
        if self.waiting.len() < limits.handshakes {
            return None;
        }
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for w in self.waiting.values() {
            *counts.entry(w.addr).or_default() += 1;
        }
        // Most handshakes first; among equals, the one whose oldest is
        // oldest (the map iterates oldest first, and `max_by_key` keeps the
        // last maximum, so iterate newest first).
        let busiest = self
            .waiting
            .values()
            .rev()
            .map(|w| w.addr)
            .max_by_key(|a| counts.get(a).copied().unwrap_or(0))?;
        oldest_of(busiest)
    }

    /// Ends handshake `id` from outside.
    fn cut(&mut self, id: u64, why: u8) {
        if let Some(w) = self.waiting.remove(&id) {
            w.cut.store(why, Ordering::Release);
            // Wakes the thread blocked reading it, which sees end of file.
            let _ = w.sock.shutdown(Shutdown::Read);
        }
    }
}

/// The receiver's admission state, shared by the accept loop, the
/// connections' threads and the reaper.
pub struct Gate {
    limits: Limits,
    state: Mutex<State>,
    /// Wakes the reaper when a handshake begins.
    changed: Condvar,
    log: Mutex<RefusalLog>,
}

impl Gate {
    /// A gate with its reaper thread running.
    pub fn start(limits: Limits) -> std::io::Result<Arc<Gate>> {
        let gate = Arc::new(Gate {
            limits,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            log: Mutex::new(RefusalLog::default()),
        });
        let g = gate.clone();
        std::thread::Builder::new()
            .name("handshake-reaper".into())
            .spawn(move || g.reap())?;
        Ok(gate)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Lets a just-accepted connection begin its handshake, displacing an
    /// older one if the slots are full.
    pub fn enter(self: &Arc<Gate>, sock: &TcpStream, addr: IpAddr) -> std::io::Result<Ticket> {
        let handle = sock.try_clone()?;
        let cut = Arc::new(AtomicU8::new(NOT_CUT));
        let mut st = lock(&self.state);
        if let Some(victim) = st.to_displace(addr, &self.limits) {
            st.cut(victim, CUT_DISPLACED);
        }
        let id = st.next;
        st.next += 1;
        st.waiting.insert(
            id,
            Waiting {
                addr,
                since: Instant::now(),
                sock: handle,
                cut: cut.clone(),
            },
        );
        drop(st);
        self.changed.notify_one();
        Ok(Ticket {
            gate: self.clone(),
            id,
            addr,
            cut,
            in_session: false,
        })
    }

    /// Counts a refusal and logs it, at most once a minute per address
    /// and reason.
    pub fn refused(&self, addr: IpAddr, r: &Refusal) {
        metrics::counter!("drmirror_receive_refused_total", "reason" => r.kind.label())
            .increment(1);
        let line = lock(&self.log).note(addr, r.kind, Instant::now());
        if let Some(unlogged) = line {
            let more = if unlogged > 0 {
                format!(" ({unlogged} more refused for this reason in the last minute)")
            } else {
                String::new()
            };
            tracing::warn!("refusing {addr}: {}{more}", r.reason);
        }
    }

    /// Shuts down handshakes past their deadline, for ever.
    fn reap(&self) {
        let mut st = lock(&self.state);
        loop {
            let now = Instant::now();
            let expired: Vec<u64> = st
                .waiting
                .iter()
                .filter(|(_, w)| now.duration_since(w.since) >= self.limits.deadline)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                st.cut(id, CUT_DEADLINE);
            }
            // Admission order is deadline order: the first expires next.
            let next = st
                .waiting
                .values()
                .next()
                .map(|w| (w.since + self.limits.deadline).saturating_duration_since(now));
            st = match next {
                Some(wait) => {
                    self.changed
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// One connection's place at the gate: a handshake slot, then (after
/// [`Admission::admit`]) a session slot, given back when dropped.
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    addr: IpAddr,
    cut: Arc<AtomicU8>,
    in_session: bool,
}

impl Ticket {
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl Admission for Ticket {
    fn cut(&self) -> Option<Refusal> {
        let deadline = self.gate.limits.deadline;
        match self.cut.load(Ordering::Acquire) {
            CUT_DEADLINE => Some(Refusal::new(
                RefusalKind::HandshakeTimeout,
                format!("no handshake within {} s", deadline.as_secs_f64()),
            )),
            CUT_DISPLACED => Some(Refusal::new(
                RefusalKind::HandshakeSlotsFull,
                format!(
                    "handshake slots full ({} in all, {} per address): displaced by a newer connection",
                    self.gate.limits.handshakes, self.gate.limits.per_address
                ),
            )),
            _ => None,
        }
    }

    fn admit(&mut self) -> Result<(), Refusal> {
        let mut st = lock(&self.gate.state);
        if st.waiting.remove(&self.id).is_none() {
            // Cut between the Hello's last byte and here.
            drop(st);
            return Err(self.cut().unwrap_or_else(|| {
                Refusal::new(RefusalKind::HandshakeTimeout, "handshake cut short")
            }));
        }
        let max = self.gate.limits.sessions;
        if st.sessions >= max {
            return Err(Refusal::new(
                RefusalKind::ConnectionLimit,
                format!("connection limit ({max}) reached"),
            ));
        }
        st.sessions += 1;
        self.in_session = true;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        if self.in_session {
            st.sessions -= 1;
        } else {
            st.waiting.remove(&self.id);
        }
    }
}

/// How often a refusal is logged per address and reason.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Entries kept before old ones are dropped (memory stays bounded however
/// many addresses a flood comes from).
const LOG_ENTRIES: usize = 4096;

/// When each (address, reason) was last logged, and refusals since.
#[derive(Default)]
struct RefusalLog {
    seen: HashMap<(IpAddr, RefusalKind), (Instant, u64)>,
}

impl RefusalLog {
    /// Notes one refusal at `now`: `Some(n)` if it is to be logged, `n`
    /// refusals having gone unlogged since the last line.
    fn note(&mut self, addr: IpAddr, kind: RefusalKind, now: Instant) -> Option<u64> {
        if self.seen.len() >= LOG_ENTRIES {
            self.seen
                .retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
        }
        match self.seen.get_mut(&(addr, kind)) {
            Some((at, unlogged)) if now.duration_since(*at) < LOG_EVERY => {
                *unlogged += 1;
                None
            }
            Some((at, unlogged)) => {
                let n = *unlogged;
                *at = now;
                *unlogged = 0;
                Some(n)
            }
            None => {
                if self.seen.len() < LOG_ENTRIES {
                    self.seen.insert((addr, kind), (now, 0));
                }
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    /// A connected socket, for the gate's shutdown handle.
    fn sock(l: &TcpListener) -> TcpStream {
        let addr = l.local_addr().expect("addr");
        let c = TcpStream::connect(addr).expect("connect");
        let _ = l.accept().expect("accept");
        c
    }

    fn gate(handshakes: usize, per_address: usize) -> Arc<Gate> {
        Gate::start(Limits {
            sessions: 1,
            handshakes,
            per_address,
            deadline: Duration::from_secs(3600),
        })
        .expect("gate")
    }

    #[test]
    fn a_flood_from_one_address_displaces_only_itself() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let g = gate(4, 2);
        let other = g.enter(&sock(&l), ip(2)).expect("enter");
        let flood: Vec<Ticket> = (0..10)
            .map(|_| g.enter(&sock(&l), ip(1)).expect("enter"))
            .collect();
        assert_eq!(other.cut(), None);
        // The last two of the flood hold its two slots.
        let alive: Vec<bool> = flood.iter().map(|t| t.cut().is_none()).collect();
        assert_eq!(alive.iter().filter(|a| **a).count(), 2, "{alive:?}");
        assert!(alive[8] && alive[9], "{alive:?}");
        let cut = flood[0].cut().expect("cut");
        assert_eq!(cut.kind, RefusalKind::HandshakeSlotsFull);
    }

    #[test]
    fn full_slots_displace_the_busiest_address_oldest_first() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let g = gate(3, 2);
        let a1 = g.enter(&sock(&l), ip(1)).expect("enter");
        let b1 = g.enter(&sock(&l), ip(2)).expect("enter");
        let b2 = g.enter(&sock(&l), ip(2)).expect("enter");
        let c1 = g.enter(&sock(&l), ip(3)).expect("enter");
        assert!(b1.cut().is_some());
        assert!(a1.cut().is_none() && b2.cut().is_none() && c1.cut().is_none());
    }

    #[test]
    fn a_session_slot_is_taken_only_on_admission_and_given_back() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let g = gate(4, 4);
        let mut first = g.enter(&sock(&l), ip(1)).expect("enter");
        let mut second = g.enter(&sock(&l), ip(1)).expect("enter");
        first.admit().expect("first session");
        let r = second.admit().expect_err("one session slot");
        assert_eq!(r.kind, RefusalKind::ConnectionLimit);
        drop(first);
        let mut third = g.enter(&sock(&l), ip(1)).expect("enter");
        third.admit().expect("the slot was given back");
        drop(second);
    }

    #[test]
    fn the_reaper_cuts_a_handshake_at_its_deadline() {
        use std::io::Read;
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let g = Gate::start(Limits {
            sessions: 1,
            handshakes: 4,
            per_address: 4,
            deadline: Duration::from_millis(200),
        })
        .expect("gate");
        let _client = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut server, _) = l.accept().expect("accept");
        let mut t = g.enter(&server, ip(1)).expect("enter");
        // Blocks until the reaper shuts the read side down.
        let mut b = [0u8; 1];
        assert_eq!(server.read(&mut b).expect("read"), 0);
        assert_eq!(t.cut().map(|c| c.kind), Some(RefusalKind::HandshakeTimeout));
        assert!(t.admit().is_err());
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_address_and_reason() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let k = RefusalKind::Auth;
        assert_eq!(log.note(ip(1), k, t0), Some(0));
        assert_eq!(log.note(ip(1), k, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note(ip(1), k, t0 + Duration::from_secs(2)), None);
        assert_eq!(log.note(ip(2), k, t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(
            log.note(ip(1), RefusalKind::Version, t0 + Duration::from_secs(2)),
            Some(0)
        );
        assert_eq!(log.note(ip(1), k, t0 + Duration::from_secs(61)), Some(2));
    }
}
