//! Where log lines go: stderr (the journal under systemd), never failing.
//!
//! Invariant: writing a log line cannot fail or panic. (It can block while
//! stderr blocks, a pipe to a stalled reader: the watchdog is what notices
//! that.) A line that stderr does not take (its file is on a full disk, its
//! pipe is gone) is dropped whole and counted in
//! `drmirror_log_write_errors_total`; the next line is tried again, so the
//! log resumes by itself once space returns.

use std::io::Write;

/// A [`Write`] to stderr that reports every write as done.
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One `write_all` per line (tracing-subscriber formats a whole event
        // into one buffer): a line is written or dropped, rarely cut.
        if std::io::stderr().lock().write_all(buf).is_err() {
            metrics::counter!("drmirror_log_write_errors_total").increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
