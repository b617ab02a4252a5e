//! Where log lines go: stderr (the journal under systemd), never failing.
//!
//! Invariant: writing a log line cannot fail or panic. (It can block while
//! stderr blocks, a pipe to a stalled reader: the watchdog is what notices
//! that.) A line that stderr does not take (its file is on a full disk, its
//! pipe is gone) is dropped whole and counted in
//! `drmirror_log_write_errors_total`; the next line is tried again, so the
//! log resumes by itself once space returns.
//!
//! Under systemd (`JOURNAL_STREAM` set) each line starts with its syslog
//! priority, `<3>` for an error down to `<7>` for debug ([`Prioritized`]):
//! journald takes it from there (sd-daemon(3)), so `journalctl -p err`
//! finds the errors, where every line used to be logged at "info".

use std::io::Write;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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

/// The syslog priority journald files a line of `level` under.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// An event format that puts the event's priority (`<N>`, see
/// [`priority`]) in front of what `F` writes.
pub struct Prioritized<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}
