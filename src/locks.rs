//! Mutexes that outlive a panicking holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `m` even if a thread panicked while holding it: every value kept
/// behind these locks is whole between statements (a set, a first error, a
/// counter), and a DR daemon that keeps mirroring beats one that stops
/// because an unrelated task panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
