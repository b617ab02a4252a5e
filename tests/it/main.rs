//! drmirror integration tests: one binary (`cargo test --release --test it`).
//!
//! Every test runs the real `drmirror` binary against its own temp dirs and
//! checks the result with `drmirror verify` plus direct file checks. The CLI
//! contract the tests rely on is docs/cli.md.

/// Instantiates each behavioural test function (`fn(Backend)`) once per
/// capture backend: `fanotify::NAME`, `inotify::NAME` and `auto::NAME`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        pub mod fanotify {
            $( #[test] fn $name() { crate::util::with_backend(crate::util::Backend::Fanotify, super::$name) } )*
        }
        pub mod inotify {
            $( #[test] fn $name() { crate::util::with_backend(crate::util::Backend::Inotify, super::$name) } )*
        }
        pub mod auto {
            $( #[test] fn $name() { crate::util::with_backend(crate::util::Backend::Auto, super::$name) } )*
        }
    };
}

mod capture;
mod check_cmd;
mod churn;
mod config;
mod crash;
mod faults;
mod fidelity;
mod handover;
mod initial;
mod journal_model;
mod live;
mod lockout;
mod modes;
mod ops;
mod remote;
mod renames;
mod scrub;
mod signals;
mod tools;
mod util;
mod verify_cmd;
