//! The live lane: the paths capture recorded lately, per target, so that a
//! shipper serves them before the rest of a large backlog.
//!
//! A shipper sweeps its backlog in path order (see [`crate::ship`]); with
//! a million entries pending (a burst, an outage, a restart), a file
//! written just behind the sweep's cursor waited a whole pass, over a
//! minute, while the lag gauge (the oldest entry's age) said nothing
//! about it. Each round now also takes the lane's paths, looks up their
//! pending entries and applies them with the sweep's batch, in one path
//! order: what was written a moment ago reaches the target in a round or
//! two, whatever the backlog.
//!
//! Invariants:
//! - The lane is a hint, never the queue: a path is in it only after its
//!   pending entry is written, and a shipper applies what the journal's
//!   pending entry says at the time of the round (applied and completed
//!   like any other, under the same sequence-number check). A path dropped
//!   from the lane (overflow, a restart) is still pending and the sweep
//!   takes it; a path whose entry is gone (the sweep applied it) is
//!   skipped.
//! - Bounded: [`LANE_MAX`] paths per target. When capture outruns a
//!   shipper, the oldest paths leave the lane first (the sweep has them);
//!   memory stays flat however long the outage or burst.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use crate::journal::TargetId;

/// Paths the lane holds per target at most.
pub const LANE_MAX: usize = 8192;

#[derive(Default)]
struct Lane {
    order: VecDeque<Vec<u8>>,
    held: HashSet<Vec<u8>>,
}

impl Lane {
    fn push(&mut self, path: &[u8]) {
        if self.held.contains(path) {
            return;
        }
        if self.order.len() == LANE_MAX {
            if let Some(old) = self.order.pop_front() {
                self.held.remove(&old);
            }
        }
        self.order.push_back(path.to_vec());
        self.held.insert(path.to_vec());
    }

    fn take(&mut self, n: usize) -> Vec<Vec<u8>> {
        let k = n.min(self.order.len());
        let out: Vec<Vec<u8>> = self.order.drain(..k).collect();
        for p in &out {
            self.held.remove(p);
        }
        out
    }
}

/// The live lanes of all targets (shared by capture and the shippers).
#[derive(Default)]
pub struct Lanes {
    lanes: Mutex<HashMap<TargetId, Lane>>,
}

impl Lanes {
    /// Notes paths just recorded as pending, each for its target.
    pub fn push(&self, recorded: &[(TargetId, Vec<u8>)]) {
        let mut lanes = crate::locks::lock(&self.lanes);
        for (t, p) in recorded {
            lanes.entry(*t).or_default().push(p);
        }
    }

    /// Takes up to `n` of target `t`'s paths, oldest first.
    pub fn take(&self, t: TargetId, n: usize) -> Vec<Vec<u8>> {
        let mut lanes = crate::locks::lock(&self.lanes);
        lanes.get_mut(&t).map(|l| l.take(n)).unwrap_or_default()
    }

    /// Puts back paths a round took but could not apply yet (they wait for
    /// a rename ahead of them).
    pub fn put_back(&self, t: TargetId, paths: &[Vec<u8>]) {
        let mut lanes = crate::locks::lock(&self.lanes);
        let lane = lanes.entry(t).or_default();
        for p in paths {
            lane.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_bounded_and_drops_its_oldest_paths() {
        let l = Lanes::default();
        let paths: Vec<(TargetId, Vec<u8>)> = (0..LANE_MAX + 10)
            .map(|i| (1, format!("f{i}").into_bytes()))
            .collect();
        l.push(&paths);
        let got = l.take(1, usize::MAX);
        assert_eq!(got.len(), LANE_MAX);
        assert_eq!(got[0], b"f10".to_vec());
        assert!(l.take(1, 10).is_empty());
    }

    #[test]
    fn a_path_is_held_once_and_taken_in_order() {
        let l = Lanes::default();
        let rec = |t, p: &[u8]| (t, p.to_vec());
        l.push(&[
            rec(1, b"a"),
            rec(1, b"b"),
            rec(1, b"a"),
            rec(2, b"a"),
            rec(2, b"b"),
        ]);
        assert_eq!(l.take(1, 1), vec![b"a".to_vec()]);
        l.put_back(1, &[b"a".to_vec()]);
        assert_eq!(l.take(1, 5), vec![b"b".to_vec(), b"a".to_vec()]);
        assert_eq!(l.take(2, 5).len(), 2);
    }
}
