//! drmirror: a disaster-recovery mirror of a directory tree, current within
//! seconds, restartable in seconds. The architecture and its invariants,
//! end to end, are in `docs/design.md`; the data flow and its modules:
//!
//! ```text
//! kernel ─► watch (fanotify | inotify) ─► daemon::to_changes ─► journal (RocksDB, write-ahead)
//!                                                        │
//! sync (startup / subtree compare, parallel scan) ──────►│
//!                                                        ▼
//!                                   ship (one shipper per target) ─► target::local
//! ```
//!
//! - [`paths`]: relative paths as raw bytes; [`meta`]: what is compared.
//! - [`fsops`]: symlink-safe `*at` access beneath a root; [`scan`]: the parallel walk.
//! - [`journal`]: the persistent backlog, index and watch tree.
//! - [`watch`]: capture backends; [`filter`]: excludes; [`handover`]: the fd store.
//! - [`sync`]: compare walks; [`ship`]: applying the backlog; [`target`]: writing the mirror;
//!   [`durability`]: when a copy may be recorded before it is flushed.
//! - [`protocol`]: frames on the wire; [`receive`]: the DR-side receiver.
//! - [`verify`]: comparing a tree with its mirror, local or remote; [`check`]: what a
//!   start would do, doing none of it; [`config`], [`cli`], [`daemon`]: the front;
//!   [`mounts`]: a target reachable through the source by a bind mount.
//! - Beside the pipeline: [`supervise`] (no thread dies quietly), [`pulse`]
//!   (the lag from the clock; the state directory and local targets still
//!   where they were), [`heartbeat`] (when capture was last known whole:
//!   the lag's floor after a start that may have missed changes), [`logsink`] (a log write never fails),
//!   [`rebuild`] (a corrupt journal moved aside),
//!   [`target::identity`] (the target's mark and the index sample), and
//!   [`scrub`] (the slow background comparison that trusts no index),
//!   [`progress`] (an initial sync's progress in entries and bytes).
//! - [`failpoints`]: the test hooks, compiled only for the tests.

pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod durability;
pub mod failpoints;
pub mod fidelity;
pub mod filter;
pub mod fsops;
pub mod handover;
pub mod heartbeat;
pub mod journal;
pub mod keepalive;
pub mod links;
pub mod locks;
pub mod logsink;
pub mod meta;
pub mod mounts;
pub mod paths;
pub mod progress;
pub mod protocol;
pub mod pulse;
pub mod rebuild;
pub mod receive;
pub mod root_lock;
pub mod scan;
pub mod scrub;
pub mod ship;
pub mod state_space;
pub mod status;
pub mod supervise;
pub mod sync;
pub mod target;
pub mod telemetry;
pub mod verify;
pub mod watch;
