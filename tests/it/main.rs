//! drmirror integration tests: one binary (`cargo test --release --test it`).
//!
//! Every test runs the real `drmirror` binary against its own temp dirs and
//! checks the result with `drmirror verify` plus direct file checks. The CLI
//! contract the tests rely on is docs/cli.md.

mod capture;
mod config;
mod crash;
mod faults;
mod handover;
mod initial;
mod live;
mod modes;
mod ops;
mod remote;
mod util;
mod verify_cmd;
