//! A guard against a wrong target.
//!
//! `drmirror run --source oops/src --target oops/important`, where
//! `important` held files of its own, used to log `initial sync complete …
//! deleted=3`: the delete mode removes at start what the source lacks, and
//! nothing asked whether the directory was ever a mirror. So the first time
//! drmirror writes to a target — the journal holds no record of it and its
//! root carries no mark (see [`super::identity`]) — and the delete mode
//! removes extraneous entries at start, the target is looked at first: if
//! it holds entries the source lacks, or of another type (which a copy
//! would replace), the daemon refuses to start (exit 2), naming how many
//! and the first few, unless the target is *adopted* (`adopt = true` on
//! it, or `run --adopt-target`): the usual migration from lsyncd or a seed
//! made by rsync. An adopted target is looked at too (one walk of it, at
//! its first start only), and what the start deletes there is logged: the
//! count and the first paths. A remote target is looked at the same way when the first
//! connection to it finds it so, and the connection is refused (the
//! target is down, with the reason, until it is adopted or corrected).
//!
//! Invariants:
//! - Nothing is written to a target, not even its mark, before the guard
//!   has passed: a refused start leaves it as it was, and the next start
//!   is a first use again.
//! - A target drmirror wrote before (recorded, or marked) is never
//!   guarded: a journal rebuilt after corruption, or a target emptied and
//!   refilled, goes on as before (see the identity's own checks).
//! - Excluded paths are never deleted, so never counted; nor is the
//!   `lost+found` directory at the root of a new filesystem (what it holds
//!   is counted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::filter::Filter;
use crate::fsops::{self, Root};
use crate::meta::Kind;
use crate::paths;
use crate::scan::Child;

/// Paths named in the refusal.
pub const SHOWN: usize = 10;

/// What a start would delete on a target (see the module's doc).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Extraneous {
    /// Entries the source lacks, or holds as another type, counting those
    /// below such a directory.
    pub count: u64,
    /// The first [`SHOWN`] of them, in path order.
    pub first: Vec<Vec<u8>>,
}

impl Extraneous {
    /// The refusal's account of them: `N entries (a, b, …)`.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.first.iter().map(|p| paths::display(p)).collect();
        let more = if self.count > self.first.len() as u64 {
            ", …"
        } else {
            ""
        };
        let noun = if self.count == 1 { "entry" } else { "entries" };
        format!("{} {noun} ({}{more})", self.count, names.join(", "))
    }

    /// What an adopted target's first start says it deletes, after the
    /// target's name.
    pub fn adopted(&self) -> String {
        format!(
            "adopted: this first start deletes {} that the source lacks (the delete mode \
             removes at start what the source lacks)",
            self.describe()
        )
    }

    /// What the guard makes of a first write (see the module doc): `Err`
    /// with the refusal, after the target's name, unless `adopt`; an
    /// adopted target's deletions are logged.
    pub fn judge(&self, name: &str, adopt: bool) -> Result<(), String> {
        if self.count == 0 {
            return Ok(());
        }
        if !adopt {
            return Err(self.refusal());
        }
        tracing::warn!("target {name} {}", self.adopted());
        Ok(())
    }

    /// Why a first write is refused, after the target's name.
    pub fn refusal(&self) -> String {
        format!(
            "holds {} that the source lacks, and drmirror never wrote to it: this first start \
             would delete them (the delete mode removes at start what the source lacks). If it \
             is the mirror (seeded by rsync, or lsyncd's), adopt it: `adopt = true` on the \
             target in the config, or `drmirror run --adopt-target`; otherwise check the \
             target's path",
            self.describe()
        )
    }
}

/// A walk of a target's tree: gets the visitor of each directory's entries
/// (see [`crate::scan::walk`]).
pub type Walk<'a> = &'a (dyn Fn(&[u8], &mut [Child]) + Sync);

/// What local target `target` holds that `source` lacks (see [`extraneous_by`]).
pub fn extraneous(source: &Root, target: &Root, filter: &Filter) -> Extraneous {
    extraneous_by(source, filter, |visit| {
        crate::scan::walk(target, b"", visit, |_, _| {})
    })
}

/// What a target holds that `source` lacks, or holds as another type,
/// outside what `filter` excludes and drmirror's own temporary files:
/// `walk` walks the target (in parallel), each entry is looked up in the
/// source. A directory the walk cannot read holds nothing a start could
/// delete.
pub fn extraneous_by(source: &Root, filter: &Filter, walk: impl FnOnce(Walk<'_>)) -> Extraneous {
    let count = AtomicU64::new(0);
    let first = Mutex::new(Vec::new());
    let note = |rel: &[u8]| {
        count.fetch_add(1, Ordering::Relaxed);
        let mut f = crate::locks::lock(&first);
        f.push(rel.to_vec());
        // Keep the first in path order, whatever order the walk takes.
        if f.len() > 4 * SHOWN {
            f.sort();
            f.truncate(SHOWN);
        }
    };
    walk(&|_, children: &mut [Child]| {
        for c in children.iter_mut() {
            let name = paths::split(&c.rel).1;
            let is_dir = c.meta.kind == Kind::Dir;
            if fsops::is_temp_name(name) || filter.excluded(&c.rel, is_dir) {
                c.descend = false;
                continue;
            }
            // mkfs's, at the root of a DR filesystem.
            let lost_found = is_dir && c.rel == b"lost+found";
            match source.lstat(&c.rel) {
                Ok(Some(s)) if s.kind == c.meta.kind => {}
                _ if lost_found => {}
                // Its subtree goes with it: counted as the walk goes on.
                _ => note(&c.rel),
            }
        }
    });
    let mut first = first.into_inner().unwrap_or_else(|p| p.into_inner());
    first.sort();
    first.truncate(SHOWN);
    Extraneous {
        count: count.into_inner(),
        first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_start_would_delete_is_counted_with_its_subtree() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        for p in [&src, &dst] {
            std::fs::create_dir_all(p.join("same/deeper")).unwrap();
            std::fs::write(p.join("same/f"), b"x").unwrap();
        }
        std::fs::create_dir_all(dst.join("only/sub")).unwrap();
        std::fs::write(dst.join("only/sub/g"), b"x").unwrap();
        std::fs::write(dst.join("same/extra"), b"x").unwrap();
        // A directory where the source has a file: a copy would replace it.
        std::fs::write(src.join("kind"), b"x").unwrap();
        std::fs::create_dir(dst.join("kind")).unwrap();
        std::fs::write(dst.join("ignored.tmp"), b"x").unwrap();
        std::fs::create_dir(dst.join("lost+found")).unwrap();
        let filter = Filter::new(&src, &["*.tmp".to_string()]).unwrap();
        let e = extraneous(
            &Root::open(&src).unwrap(),
            &Root::open(&dst).unwrap(),
            &filter,
        );
        let first: Vec<&[u8]> = e.first.iter().map(|p| p.as_slice()).collect();
        assert_eq!(
            first,
            [
                &b"kind"[..],
                b"only",
                b"only/sub",
                b"only/sub/g",
                b"same/extra"
            ]
        );
        assert_eq!(e.count, 5);
        assert!(e.describe().starts_with("5 entries (kind, only"));
        // A target holding nothing of its own.
        std::fs::remove_dir_all(&dst).unwrap();
        std::fs::create_dir_all(dst.join("same")).unwrap();
        std::fs::create_dir_all(dst.join("lost+found")).unwrap();
        let e = extraneous(
            &Root::open(&src).unwrap(),
            &Root::open(&dst).unwrap(),
            &filter,
        );
        assert_eq!(e, Extraneous::default());
    }
}
