//! Zero-gap restarts through the service manager's file-descriptor store.
//!
//! The fanotify group is handed to systemd (`FDSTORE=1`, `FDNAME=`) as soon
//! as it is set up. When the daemon dies — a crash, `kill -9`, an upgrade —
//! systemd keeps the descriptor, and with it the group's marks and its
//! queue of unread events, and passes it back at the next start
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`). The new process reads on where the old
//! one stopped: nothing is missed, nothing needs a rescan. The journal's
//! `capture_reading` flag covers the one gap the kernel cannot: events the
//! old process had read but not yet recorded (see
//! [`crate::journal::Journal::set_capture_reading`]).
//!
//! The unit needs `FileDescriptorStoreMax=` (set in `systemd/drmirror.service`)
//! and, to keep the descriptor across `systemctl restart` too,
//! `FileDescriptorStorePreserve=yes` (systemd 254+).

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;

/// The name the capture descriptor is stored under.
pub const FDNAME: &str = "drmirror-fanotify";

/// The capture descriptor passed back by the service manager, if any.
pub fn take_stored() -> Option<OwnedFd> {
    let fds = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!("ignoring descriptors passed by the service manager: {e}");
            return None;
        }
    };
    let mut found = None;
    for (fd, name) in fds {
        if name == FDNAME && found.is_none() {
            // SAFETY: LISTEN_PID names this process, so the service manager
            // passed `fd` to it; nothing else in the process owns it.
            found = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    found
}

/// Hands `fd` to the service manager's fd store; a no-op when not started
/// by one (no `NOTIFY_SOCKET`).
pub fn store(fd: BorrowedFd<'_>) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(FDNAME)], &[fd]) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("cannot hand the capture descriptor to the service manager: {e}; a restart will rescan");
            false
        }
    }
}

/// Asks the service manager to drop a stored descriptor this run does not use.
pub fn remove_stored() {
    let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(FDNAME)]);
}
