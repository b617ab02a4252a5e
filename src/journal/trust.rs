//! What a target file alike in metadata to the source's may stand for,
//! while the shipper renames things on the target.
//!
//! A *look-alike* is a target file whose size, mtime and mode equal the
//! source file's at the same path but that the index names no copy at. A
//! compare may take it for the source file's copy and write that claim
//! into the index (a target seeded by rsync is adopted so, not copied
//! again). Renames make that unsafe in two ways, each with its rule here:
//!
//! 1. **A compare beside the shipper** (the startup scan runs in its own
//!    thread) reads the index and the target's listing, then writes its
//!    claims. A rename the shipper applies on the target in between moves
//!    the file it saw elsewhere, and the index move that goes with the
//!    rename may be committed before the claim: the claim then names a file
//!    that is not there, or another directory's look-alike (what the crash
//!    storm test found: `missing` files and `id` files with the other
//!    directory's content, the index naming them as copied). Invariant: a
//!    compare's claims are written only if, from before it read the index
//!    and the target until the write, no renames were under way on the
//!    target (from before the first is applied until their index moves are
//!    committed: [`TargetTrust::renames_begin`],
//!    [`TargetTrust::claim_if_unmoved`]); the check and the write hold the
//!    lock a rename's start takes, so renames that begin later find the
//!    claims in the index and their moves carry them. A compare that loses the race enqueues those paths
//!    instead: the shipper applies them in order with its renames.
//! 2. **A distrusted subtree** (a doubt a crash left: renames applied on
//!    the target in part or twice, see `Journal::resolve_doubts`) may hold
//!    any file's look-alike: there no look-alike stands until a startup
//!    scan has compared everything. Invariant: distrust follows the
//!    subtree: a rename out of (or of an ancestor of) a distrusted path
//!    distrusts its destination before the target applies it
//!    ([`TargetTrust::carried`]).
//!
//! The distrusted paths are kept in memory (read per compared file) and in
//! the journal's `meta` (a crash before the startup scan ends keeps them).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::paths;

/// One target's rules (see the module doc).
#[derive(Debug, Default)]
pub struct TargetTrust {
    /// Target renames begun.
    epoch: AtomicU64,
    /// Held by a rename's start and by a compare's check-and-write.
    fence: Mutex<()>,
    /// Distrusted subtrees (rule 2): after a crash in a rename storm,
    /// thousands; looked up per compared file by its ancestors.
    distrust: RwLock<BTreeSet<Vec<u8>>>,
}

impl TargetTrust {
    pub fn with_distrust(paths: Vec<Vec<u8>>) -> TargetTrust {
        TargetTrust {
            distrust: RwLock::new(paths.into_iter().collect()),
            ..TargetTrust::default()
        }
    }

    /// Read by a compare before it reads the index and the target.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Called by the shipper before it applies renames on the target; the
    /// renames are under way (the epoch odd, as in a seqlock) until the
    /// guard is dropped, which the shipper does once their index moves are
    /// committed.
    pub fn renames_begin(&self) -> RenamesUnderWay<'_> {
        let _g = self.fence();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        RenamesUnderWay(self)
    }

    /// Runs `write` (a compare's claims) if no renames were under way when
    /// `epoch` was read and none began since; returns whether it ran.
    pub fn claim_if_unmoved<E>(
        &self,
        epoch: u64,
        write: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let _g = self.fence();
        if epoch % 2 == 1 || self.epoch.load(Ordering::Acquire) != epoch {
            return Ok(false);
        }
        write().map(|()| true)
    }

    fn fence(&self) -> MutexGuard<'_, ()> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `p` is within a distrusted subtree.
    pub fn distrusts(&self, p: &[u8]) -> bool {
        within_any(&self.distrust.read().unwrap_or_else(|p| p.into_inner()), p)
    }

    /// Whether nothing is distrusted.
    pub fn trusts_all(&self) -> bool {
        self.distrust
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Where a rename `from` → `to` carries distrust: `to` when `from` is
    /// within a distrusted subtree, and the rebased path of each distrusted
    /// subtree within `from`. Each must be [`TargetTrust::add`]ed (and
    /// persisted) before the target applies the rename.
    pub fn carried(&self, from: &[u8], to: &[u8]) -> Vec<Vec<u8>> {
        let d = self.distrust.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if within_any(&d, from) {
            out.push(to.to_vec());
        } else {
            let below = [from, b"/"].concat();
            out.extend(
                d.range(below.clone()..)
                    .take_while(|p| p.starts_with(&below))
                    .map(|p| paths::rebase(p, from, to)),
            );
        }
        out.retain(|p| !within_any(&d, p));
        out
    }

    pub fn add(&self, p: &[u8]) {
        let mut d = self.distrust.write().unwrap_or_else(|p| p.into_inner());
        if !within_any(&d, p) {
            d.insert(p.to_vec());
        }
    }

    pub fn clear(&self) {
        self.distrust
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Renames under way on a target (see [`TargetTrust::renames_begin`]).
#[must_use]
pub struct RenamesUnderWay<'a>(&'a TargetTrust);

impl Drop for RenamesUnderWay<'_> {
    fn drop(&mut self) {
        self.0.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether `p` is within one of `d`: `p` itself or one of its ancestors
/// (the root, `""`, included) is in it.
fn within_any(d: &BTreeSet<Vec<u8>>, p: &[u8]) -> bool {
    if d.is_empty() {
        return false;
    }
    d.contains(p)
        || d.contains(&b""[..])
        || p.iter()
            .enumerate()
            .any(|(i, &c)| c == b'/' && d.contains(&p[..i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_begun_after_the_epoch_was_read_stops_the_claims() {
        let t = TargetTrust::default();
        let e = t.epoch();
        assert_eq!(t.claim_if_unmoved::<()>(e, || Ok(())), Ok(true));
        let under_way = t.renames_begin();
        let mut wrote = false;
        assert_eq!(
            t.claim_if_unmoved::<()>(e, || {
                wrote = true;
                Ok(())
            }),
            Ok(false)
        );
        assert!(!wrote);
        // Read while renames are under way: they may move what it reads.
        let during = t.epoch();
        assert_eq!(t.claim_if_unmoved::<()>(during, || Ok(())), Ok(false));
        drop(under_way);
        assert_eq!(t.claim_if_unmoved::<()>(during, || Ok(())), Ok(false));
        assert_eq!(t.claim_if_unmoved::<()>(t.epoch(), || Ok(())), Ok(true));
    }

    #[test]
    fn distrust_follows_renames_out_of_and_of_ancestors_of_a_distrusted_path() {
        let t = TargetTrust::with_distrust(vec![b"a/b".to_vec()]);
        assert!(t.distrusts(b"a/b/c") && t.distrusts(b"a/b") && !t.distrusts(b"a/bc"));
        assert!(!t.distrusts(b"a") && !t.distrusts(b""));
        assert_eq!(t.carried(b"a/b/c", b"x"), vec![b"x".to_vec()]);
        assert_eq!(t.carried(b"a", b"y"), vec![b"y/b".to_vec()]);
        assert!(t.carried(b"a/c", b"z").is_empty());
        // Already distrusted there.
        assert!(t.carried(b"a/b/c", b"a/b/d").is_empty());
        t.add(b"x");
        t.add(b"x/y");
        assert!(t.distrusts(b"x/y/z"));
        t.clear();
        assert!(t.trusts_all() && !t.distrusts(b"a/b/c"));
        // The whole target.
        t.add(b"");
        assert!(t.distrusts(b"any/thing"));
        assert!(t.carried(b"x", b"y").is_empty());
    }
}
