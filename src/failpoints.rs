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
