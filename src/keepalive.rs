//! Finding a `tcp://` peer that is gone without a word.
//!
//! A DR machine that loses power, or a link that is cut, sends no reset:
//! without this a daemon waiting for a reply notices only after its reply
//! timeout (minutes), and a receiver waiting for requests never does, so
//! the dead connection holds one of its `--max-connections` slots for good.
//! ssh finds the same failure for `ssh://` targets with its own keepalive.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use rustix::net::sockopt;

/// Silence after which the kernel probes the peer.
const IDLE: Duration = Duration::from_secs(15);
/// Time between unanswered probes.
const INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes that end the connection.
const PROBES: u32 = 6;
/// Data left unacknowledged this long ends the connection too (and bounds
/// the probes above): about as long as ssh's `ServerAliveInterval=15`,
/// `ServerAliveCountMax=3` take. A peer that is slow but alive acknowledges
/// (its window may be zero) and is never cut.
const USER_TIMEOUT_MS: u32 = 45_000;

/// Sets keepalive probes and a user timeout on `s`.
pub fn detect_dead_peer(s: &TcpStream) -> io::Result<()> {
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, IDLE)?;
    sockopt::set_tcp_keepintvl(s, INTERVAL)?;
    sockopt::set_tcp_keepcnt(s, PROBES)?;
    sockopt::set_tcp_user_timeout(s, USER_TIMEOUT_MS)?;
    Ok(())
}
