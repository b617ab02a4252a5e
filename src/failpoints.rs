//! Test hooks: faults and stand-ins the integration tests set through the
//! environment of the daemon or receiver they start.
//!
//! Compiled in only with the `failpoints` cargo feature, which the test
//! build turns on (the package is its own dev-dependency with that
//! feature, so `cargo test` needs no flag). A release build for users has
//! neither the hooks nor their variable names: [`get`] is then `None`
//! whatever the environment holds, and the checks fold away.

use std::ffi::OsString;

/// One hook; each variant says where it acts.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// The supervised thread of this name panics as it starts
    /// (`supervise`).
    PanicThread,
    /// Capture aborts right after taking events off the kernel queue,
    /// before recording them (`daemon`).
    AbortAfterRead,
    /// Restored inotify watches stay shallow (`watch::inotify`).
    HoldShallow,
    /// A reconciliation aborts once it has checkpointed this many
    /// directories (`sync`).
    AbortReconcileAfter,
    /// The receiver exits when a flush is asked of it (`receive`).
    ExitOnSync,
    /// The shipper aborts at the commit of a removal or a move on the
    /// target, before the journal records it (`ship`).
    AbortBeforeCommit,
    /// Stands in for the kernel's boot id; empty: none (`durability`).
    BootId,
    /// A file: while it exists, a round that applied something waits
    /// before re-stamping the directories it touched (if the file holds a
    /// path, only a round that touched it), with `FILE.held` there to say
    /// so (`ship`).
    HoldRestamp,
    /// A file: while it exists, capture reads nothing, with `FILE.held`
    /// there to say so (`daemon`).
    HoldCapture,
}

#[cfg(feature = "failpoints")]
impl Hook {
    /// The environment variable that sets it.
    pub fn var(self) -> &'static str {
        match self {
            Hook::PanicThread => "DRMIRROR_TEST_PANIC_THREAD",
            Hook::AbortAfterRead => "DRMIRROR_TEST_ABORT_AFTER_READ",
            Hook::HoldShallow => "DRMIRROR_TEST_HOLD_SHALLOW",
            Hook::AbortReconcileAfter => "DRMIRROR_TEST_ABORT_RECONCILE_AFTER",
            Hook::ExitOnSync => "DRMIRROR_TEST_EXIT_ON_SYNC",
            Hook::AbortBeforeCommit => "DRMIRROR_TEST_ABORT_BEFORE_COMMIT",
            Hook::BootId => "DRMIRROR_TEST_BOOT_ID",
            Hook::HoldRestamp => "DRMIRROR_TEST_HOLD_RESTAMP",
            Hook::HoldCapture => "DRMIRROR_TEST_HOLD_CAPTURE",
        }
    }
}

/// The hook's value, when it is set (and compiled in).
#[cfg(feature = "failpoints")]
pub fn get(hook: Hook) -> Option<OsString> {
    std::env::var_os(hook.var())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn get(_hook: Hook) -> Option<OsString> {
    None
}

/// Whether the hook is set.
pub fn set(hook: Hook) -> bool {
    get(hook).is_some()
}

/// Waits while the file `hook` names exists, with `FILE.held` there
/// meanwhile (a test makes its move once it sees that, then removes the
/// file). A file that holds a path holds only where `about` says yes to
/// it. A test hook: a poll is all it needs.
pub fn hold_while(hook: Hook, about: impl Fn(&[u8]) -> bool) {
    let Some(gate) = get(hook).map(std::path::PathBuf::from) else {
        return;
    };
    let Ok(only) = std::fs::read(&gate) else {
        return;
    };
    if !only.is_empty() && !about(&only) {
        return;
    }
    let mut held = gate.clone().into_os_string();
    held.push(".held");
    let _ = std::fs::write(&held, b"");
    while gate.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(&held);
}
