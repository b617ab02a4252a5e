//! One receiving session at a time per root.
//!
//! When a daemon dies (kill -9, its machine or link gone) and comes back,
//! its new connection can reach the receiver before the old one has
//! finished: the old session still applies what it had read before the
//! hang-up. Its late writes (a directory created, a file renamed in) then
//! change directories the new daemon has already compared and recorded as
//! equal, and nothing brings the mirror back in step until they change
//! again. So a session holds an exclusive `flock` on the root directory
//! while it writes, and a new one waits for it before saying Welcome.
//!
//! `flock` and not a lock file: the root is the mirror, where no file of
//! ours may appear, and its parent may be shared by other roots. A
//! directory can be flocked like any file; the lock is per open file
//! description, so it serialises the sessions of one `--listen` process
//! as well as the separate processes ssh starts, and it goes away with
//! the process however that ends.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags};
use rustix::io::Errno;

/// How long a new session waits for the previous one. An old session whose
/// peer hung up ends in well under a second (it drops what it had not
/// applied); one that outlasts this is most likely on a link that died
/// silently, still open until the keepalive (or sshd's) notices, and with
/// nothing left to apply: the new session then goes ahead rather than
/// leave the mirror stalled for that long. Below the daemon's 30 s
/// handshake timeout.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(15);

/// Held for the whole of a session; released when dropped.
pub struct RootLock {
    fd: Option<OwnedFd>,
}

/// Takes the root's session lock, waiting up to `wait` for the session
/// holding it. Never fails: past `wait`, or where the filesystem cannot
/// lock (some network filesystems), the session goes on unlocked, and the
/// log says why.
pub fn acquire(root: BorrowedFd<'_>, wait: Duration) -> RootLock {
    let fd = match rustix::fs::openat(
        root,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(
                "cannot open the root to lock it: {e}; serving without the session lock"
            );
            return RootLock { fd: None };
        }
    };
    let start = Instant::now();
    let mut announced = false;
    loop {
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                if announced {
                    tracing::info!(
                        "the previous session on this root ended; waited {} ms",
                        start.elapsed().as_millis()
                    );
                }
                return RootLock { fd: Some(fd) };
            }
            Err(Errno::WOULDBLOCK) => {
                if !announced {
                    tracing::info!("waiting for the previous session on this root to finish");
                    announced = true;
                }
                if start.elapsed() >= wait {
                    tracing::warn!(
                        "the previous session on this root is still open after {} s (a link that died silently, or another daemon mirroring into the same root); serving anyway",
                        wait.as_secs()
                    );
                    return RootLock { fd: None };
                }
                // A poll and not a blocking flock: the wait is bounded, and
                // a blocked flock cannot be given a timeout.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!("cannot lock the root: {e}; serving without the session lock");
                return RootLock { fd: None };
            }
        }
    }
}

impl RootLock {
    /// Whether this session holds the lock.
    pub fn held(&self) -> bool {
        self.fd.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn root(dir: &std::path::Path) -> OwnedFd {
        rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn a_second_session_waits_for_the_first_and_gives_up_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (root(dir.path()), root(dir.path()));
        let first = acquire(a.as_fd(), Duration::ZERO);
        assert!(first.held());
        let second = acquire(b.as_fd(), Duration::from_millis(50));
        assert!(!second.held(), "two sessions held the root at once");
        drop(first);
        let third = acquire(b.as_fd(), Duration::from_millis(50));
        assert!(third.held(), "the lock outlived its session");
        // Other roots are not affected.
        let other = tempfile::tempdir().unwrap();
        assert!(acquire(root(other.path()).as_fd(), Duration::ZERO).held());
    }
}
