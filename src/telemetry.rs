//! Prometheus metrics (the `metrics` facade, exported by
//! `metrics-exporter-prometheus` over HTTP).
//!
//! Names follow Prometheus conventions: base units in the name, `_total`
//! for counters. The live RPO is `drmirror_replication_lag_seconds{target}`:
//! the age of the oldest change not yet applied to that target, 0 in sync.

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, gauge, Unit};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("metrics listen address {addr:?}: {msg}")]
    Address { addr: String, msg: String },
    #[error(
        "cannot start the metrics endpoint on {addr}: {msg} (two daemons cannot share a port: \
         give each its own metrics_listen, or \"off\")"
    )]
    Listen { addr: SocketAddr, msg: String },
    #[error("cannot start the metrics endpoint's thread: {0}")]
    Serve(String),
}

/// Parses a listen address; `off` (or empty) disables the endpoint.
pub fn parse_listen(s: &str) -> Result<Option<SocketAddr>, TelemetryError> {
    let s = s.trim();
    if s.is_empty() || s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e: std::net::AddrParseError| TelemetryError::Address {
            addr: s.to_string(),
            msg: e.to_string(),
        })
}

/// The metrics endpoint between [`install`] and [`Endpoint::serve`]: the
/// recorder takes every metric set from the start, and the port is bound
/// (a taken port is found at once), but no scrape is answered yet. A scrape
/// in that window waits in the listen queue: it gets the lag the daemon
/// has published by then, never a series that is missing or 0 because the
/// lag was not computed yet (a scrape right after a restart read no lag
/// while the changes made during the outage were missing).
pub struct Endpoint {
    runtime: tokio::runtime::Runtime,
    exporter: metrics_exporter_prometheus::ExporterFuture,
}

/// Installs the recorder, binds `addr`, and registers every metric's
/// description; [`Endpoint::serve`] starts answering.
pub fn install(addr: SocketAddr) -> Result<Endpoint, TelemetryError> {
    let err = |msg: String| TelemetryError::Listen { addr, msg };
    // As `PrometheusBuilder::install` does, with the serving put off.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(e.to_string()))?;
    let (recorder, exporter) = {
        let _g = runtime.enter();
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .build()
            .map_err(|e| err(e.to_string()))?
    };
    metrics::set_global_recorder(recorder).map_err(|e| err(e.to_string()))?;
    describe();
    metrics_process::Collector::default().describe();
    zero_counters();
    gauge!("drmirror_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(Endpoint { runtime, exporter })
}

impl Endpoint {
    /// Answers scrapes from now on, on a thread of its own.
    pub fn serve(self) -> Result<(), TelemetryError> {
        let Endpoint { runtime, exporter } = self;
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                if let Err(e) = runtime.block_on(exporter) {
                    tracing::error!("the metrics endpoint stopped: {e:?}");
                }
            })
            .map(|_| ())
            .map_err(|e| TelemetryError::Serve(e.to_string()))
    }
}

/// Help texts of the metrics of replication, capture and scans (and,
/// through [`describe_health`], of the rest).
fn describe() {
    describe_health();
    describe_gauge!(
        "drmirror_replication_lag_seconds",
        Unit::Seconds,
        "Age of the oldest change not yet applied to the target (the live RPO), as of the next refresh (4 a second); after a restart without a gap-free handover, at least the time since capture was last known whole, until the startup scan's findings are applied; 0 when in sync"
    );
    describe_gauge!(
        "drmirror_backlog_entries",
        "Pending (coalesced) paths waiting for the target"
    );
    describe_gauge!(
        "drmirror_backlog_bytes",
        Unit::Bytes,
        "Journal bytes of the pending entries"
    );
    describe_gauge!(
        "drmirror_target_up",
        "1 when the target accepts writes, 0 when its last attempts failed"
    );
    describe_gauge!(
        "drmirror_last_apply_timestamp_seconds",
        Unit::Seconds,
        "Unix time of the last change applied to the target"
    );
    describe_counter!(
        "drmirror_events_total",
        "Changes captured from the kernel, by kind"
    );
    describe_counter!(
        "drmirror_applied_total",
        "Changes applied to a target, by operation"
    );
    describe_counter!(
        "drmirror_sent_bytes_total",
        Unit::Bytes,
        "File and symlink bytes written to the target"
    );
    describe_counter!(
        "drmirror_capture_dropped_total",
        "fanotify events not captured: outside the source (other paths on the marked filesystems, the state dir, a target on the same disk) or naming a directory already gone"
    );
    describe_counter!(
        "drmirror_capture_wakeups_total",
        "Times the capture loop found kernel events to read"
    );
    describe_counter!(
        "drmirror_capture_handle_lookups_total",
        "Directory file handles resolved with open_by_handle_at (once per directory, then cached)"
    );
    describe_counter!(
        "drmirror_capture_ignore_marks_total",
        "fanotify: directories outside the source given an evictable ignore mark after an event from them (the kernel drops their later events)"
    );
    describe_counter!(
        "drmirror_capture_ignore_flushes_total",
        "fanotify: times every ignore mark was dropped because a directory was moved or mounted into the source"
    );
    describe_counter!(
        "drmirror_kernel_overflows_total",
        "Kernel event-queue overflows (each forces a rescan)"
    );
    describe_counter!("drmirror_scan_files_total", "Entries compared by scans");
    describe_gauge!(
        "drmirror_scan_running",
        "1 while a startup scan or rescan runs"
    );
    describe_gauge!(
        "drmirror_capture_info",
        "The change-capture backend in use and the source it mirrors (labels), always 1"
    );
}

/// Help texts of the metrics of errors, connections, the receiver, the
/// build, the journal, the log and the scrub.
fn describe_health() {
    describe_counter!(
        "drmirror_errors_total",
        "Errors by kind (each is logged and retried)"
    );
    describe_counter!(
        "drmirror_wire_bytes_total",
        Unit::Bytes,
        "Bytes written to a remote target's connection (all frames)"
    );
    describe_counter!(
        "drmirror_reconnects_total",
        "Connection attempts to a remote target, by result (connected, failed)"
    );
    describe_counter!(
        "drmirror_backlog_collapsed_total",
        "Changes recorded as directory-level rescans because a backlog reached its bound"
    );
    describe_gauge!(
        "drmirror_capture_unwatched_dirs",
        "Directories inotify could not watch for its watch limit (compared every 30 s instead)"
    );
    describe_counter!(
        "drmirror_receive_refused_total",
        "Connections a receiver turned away, by reason (handshake_timeout, handshake_slots_full, bad_handshake, auth, version, root, connection_limit)"
    );
    describe_gauge!(
        "drmirror_build_info",
        "Build information (label version), always 1"
    );
    describe_gauge!(
        "drmirror_initial_sync_in_progress",
        "1 until a target's initial sync (or the compare after a start) has finished, per target"
    );
    for (name, what) in [
        (
            "drmirror_initial_sync_done_files",
            "files (entries but directories) in place",
        ),
        (
            "drmirror_initial_sync_total_files",
            "files (entries but directories) the startup scan found so far",
        ),
        (
            "drmirror_initial_sync_done_bytes",
            "bytes of regular files in place",
        ),
        (
            "drmirror_initial_sync_total_bytes",
            "bytes of the regular files the startup scan found so far",
        ),
    ] {
        describe_gauge!(
            name,
            format!(
                "Initial sync progress in this run, per target: {what} (see drmirror::progress)"
            )
        );
    }
    describe_gauge!(
        "drmirror_startup_scan_in_progress",
        "1 while a target's startup scan runs, per target"
    );
    describe_gauge!(
        "drmirror_journal_rebuilt",
        "1 if this run started from a fresh journal after finding the old one corrupt"
    );
    describe_counter!(
        "drmirror_log_write_errors_total",
        "Log lines dropped because stderr did not take them (a full disk, a closed pipe)"
    );
    describe_counter!(
        "drmirror_scrub_passes_total",
        "Passes of the background scrub completed, per target"
    );
    describe_counter!(
        "drmirror_scrub_entries_total",
        "Entries the background scrub compared, per target"
    );
    describe_counter!(
        "drmirror_scrub_divergences_total",
        "Entries the scrub found different on the target with nothing in flight to explain it (each repaired), per target"
    );
    describe_gauge!(
        "drmirror_scrub_last_pass_timestamp_seconds",
        Unit::Seconds,
        "Unix time at which the last scrub pass of a target ended"
    );
}

/// Counters without labels, exported at 0 from the start: a rate or an
/// `increase()` over a counter that appears only at its first event misses
/// that event.
fn zero_counters() {
    for name in [
        "drmirror_backlog_collapsed_total",
        "drmirror_capture_handle_lookups_total",
        "drmirror_capture_ignore_flushes_total",
        "drmirror_capture_ignore_marks_total",
        "drmirror_capture_wakeups_total",
        "drmirror_kernel_overflows_total",
        "drmirror_log_write_errors_total",
        "drmirror_scan_files_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}
