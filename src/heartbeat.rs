//! The time capture was last known whole, kept in the journal: the lag's
//! floor after a start that was not handed the kernel's queue (see
//! [`Journal::set_startup_floor`]).
//!
//! Invariant: every change made before the stored time was either recorded
//! in the journal by capture, or found by a startup scan that had finished.
//! So the time only moves when capture saw its queue empty (every event
//! before that moment read and recorded), and only once every target's
//! startup scan is done: until then, changes made while the daemon was
//! down may still be unfound, and a crash must not forget that they are.
//! A stored time is older than the truth by up to a second (it is written
//! at most once a second): the lag it gives errs on the high side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::journal::{Journal, JournalError};

/// Most often the time is written.
const EVERY: Duration = Duration::from_secs(1);

pub struct Heartbeat {
    /// The newest time capture saw its queue empty, not yet written.
    quiet: Option<u64>,
    written: Option<Instant>,
    /// Each target's "startup scan done".
    scans: Vec<Arc<AtomicBool>>,
}

impl Heartbeat {
    pub fn new(scans: Vec<Arc<AtomicBool>>) -> Heartbeat {
        Heartbeat {
            quiet: None,
            written: None,
            scans,
        }
    }

    /// Capture had nothing queued at `ns`: everything before it is read
    /// and recorded.
    pub fn quiet(&mut self, ns: u64) {
        self.quiet = Some(self.quiet.map_or(ns, |q| q.max(ns)));
    }

    /// Writes the newest quiet time, at most once a second.
    pub fn tick(&mut self, journal: &Journal) -> Result<(), JournalError> {
        if self.written.is_some_and(|w| w.elapsed() < EVERY) {
            return Ok(());
        }
        self.write(journal)
    }

    /// Writes the newest quiet time now (at a clean stop).
    pub fn write(&mut self, journal: &Journal) -> Result<(), JournalError> {
        if !self.scans.iter().all(|s| s.load(Ordering::Acquire)) {
            return Ok(());
        }
        if let Some(ns) = self.quiet.take() {
            journal.set_captured_through(ns)?;
            self.written = Some(Instant::now());
        }
        Ok(())
    }
}
