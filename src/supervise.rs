//! Supervision of the daemon's long-lived threads.
//!
//! Invariant: no part of the daemon dies quietly. A supervised thread that
//! panics, returns an error, or (if [`Role::Essential`]) returns at all
//! before the daemon was told to stop, ends the whole daemon: a log line
//! names the thread and the cause, and `drmirror run` exits non-zero, so
//! that the service manager (`Restart=on-failure`) starts it again. Nothing
//! is lost by that: every change is in the journal before it is acted on.
//!
//! Why not restart the one thread: a thread that panicked may have left
//! shared state (a lock, a half-built batch, a connection) in a state no
//! other thread can vouch for; a fresh process starts from the journal,
//! which is always consistent. And a daemon that goes on half alive, its
//! capture loop feeding the systemd watchdog while its shipper is gone, is
//! the silent stall this module exists to rule out.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::daemon::DaemonError;

/// What a thread's return means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs for as long as the daemon: returning before the stop is a death.
    Essential,
    /// Has a job that ends (a startup scan): returning `Ok` is normal.
    Task,
}

/// The daemon's stop flag and its channel of fatal errors.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    fatal: tokio::sync::mpsc::UnboundedSender<DaemonError>,
}

impl Supervisor {
    pub fn new(
        stop: Arc<AtomicBool>,
        fatal: tokio::sync::mpsc::UnboundedSender<DaemonError>,
    ) -> Supervisor {
        Supervisor { stop, fatal }
    }

    pub fn stop(&self) -> &Arc<AtomicBool> {
        &self.stop
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Ends the daemon with `e` (the first such error is the exit's cause).
    pub fn fail(&self, e: DaemonError) {
        let _ = self.fatal.send(e);
    }

    /// Starts `f` on a thread named `name` under supervision.
    pub fn spawn<F>(
        self: &Arc<Self>,
        name: impl Into<String>,
        role: Role,
        f: F,
    ) -> Result<JoinHandle<()>, DaemonError>
    where
        F: FnOnce() -> Result<(), DaemonError> + Send + 'static,
    {
        let name = name.into();
        let sup = self.clone();
        let inject = crate::failpoints::get(crate::failpoints::Hook::PanicThread)
            .is_some_and(|v| v == name.as_str());
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    if inject {
                        panic!("the PanicThread failpoint asked this thread to panic");
                    }
                    f()
                }));
                sup.ended(&name, role, r);
            })
            .map_err(DaemonError::Signals)
    }

    fn ended(&self, name: &str, role: Role, r: std::thread::Result<Result<(), DaemonError>>) {
        let why = match r {
            Ok(Ok(())) if role == Role::Task || self.stopping() => return,
            Ok(Ok(())) => "it ended while the daemon was running".to_string(),
            Ok(Err(e)) => {
                // The error is the cause the daemon exits with; logged there.
                self.fail(e);
                return;
            }
            Err(panic) => format!("it panicked: {}", panic_message(&panic)),
        };
        tracing::error!("thread {name} died ({why}): stopping the daemon");
        self.fail(DaemonError::ThreadDied {
            thread: name.to_string(),
            why,
        });
    }
}

/// The text of a panic's payload (a `&str` or a `String` for `panic!`).
pub fn panic_message(p: &Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
