//! Zero-gap restarts through the service manager's file-descriptor store.
//!
//! The capture group — fanotify's, or inotify's — is handed to systemd
//! (`FDSTORE=1`, `FDNAME=drmirror-<backend>`) as soon as it is set up. When
//! the daemon dies — a crash, `kill -9`, an upgrade — systemd keeps the
//! descriptor, and with it the group's marks or watches and its queue of
//! unread events, and passes it back at the next start (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`). The new process reads on where the old one stopped:
//! nothing is missed, nothing needs a rescan. The journal's
//! `capture_reading` flag covers the one gap the kernel cannot: events the
//! old process had read but not yet recorded (see
//! [`crate::journal::Journal::set_capture_reading`]).
//!
//! The unit needs `FileDescriptorStoreMax=` (set in `systemd/drmirror.service`)
//! and, to keep the descriptor across `systemctl restart` too,
//! `FileDescriptorStorePreserve=yes` (systemd 254+).

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;

/// The capture backends whose descriptor can be stored.
pub const BACKENDS: [&str; 2] = ["fanotify", "inotify"];

/// The name a backend's capture descriptor is stored under.
pub fn fdname(backend: &str) -> String {
    format!("drmirror-{backend}")
}

/// The capture descriptor passed back by the service manager, if any, with
/// the backend it belongs to. Any other drmirror descriptor it passed is
/// removed from the store.
pub fn take_stored() -> Option<(&'static str, OwnedFd)> {
    let fds = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!("ignoring descriptors passed by the service manager: {e}");
            return None;
        }
    };
    let mut found = None;
    for (fd, name) in fds {
        let Some(backend) = BACKENDS.into_iter().find(|b| name == fdname(b)) else {
            continue;
        };
        // SAFETY: LISTEN_PID names this process, so the service manager
        // passed `fd` to it; nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match &found {
            None => found = Some((backend, owned)),
            // Two capture groups (a backend switch whose removal was lost):
            // keep the first, close and forget the other.
            Some((first, _)) if *first != backend => remove_stored(backend),
            Some(_) => {}
        }
    }
    found
}

/// Hands `fd`, `backend`'s capture group, to the service manager's fd
/// store; a no-op when not started by one (no `NOTIFY_SOCKET`).
pub fn store(backend: &str, fd: BorrowedFd<'_>) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    let name = fdname(backend);
    match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(&name)], &[fd]) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cannot hand the capture descriptor to the service manager: {e}; a restart will rescan");
            false
        }
    }
}

/// Asks the service manager to drop a stored descriptor this run does not use.
pub fn remove_stored(backend: &str) {
    let name = fdname(backend);
    let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
}
