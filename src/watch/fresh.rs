//! inotify watches placed ahead of the events still queued.
//!
//! The inotify backend keeps a table of which directory each watch
//! descriptor watches, and moves its entries as rename events are read, in
//! their order. But watches are also *added* while events are read (a new
//! directory and its subtree, a directory the startup scan listed, the
//! whole tree after an overflow), and an added watch is filed at the path
//! the directory has *now*, which already reflects renames whose events are
//! still queued. Applying those events to it again files it under a wrong
//! path, and every later change inside it goes unseen. This happened:
//! `mkdir a/x b/x; rename_exchange(a, b)`, with the two CREATEs read first,
//! left the two `x` watches swapped; and a directory the startup scan
//! listed just after its parent was exchanged was filed under the other
//! side (the churn test found both, a directory created later missing on
//! the target).
//!
//! So such a watch is *fresh* until every event queued before it was added
//! has been read:
//! - while fresh, a rename event read for its path moves it only if its
//!   path no longer names it (an event from before the watch was added is
//!   already part of its path; see [`FreshWatches::stays`]);
//! - a *mark* sent after the read that added it (a watch on the journal's
//!   directory, added and removed again at once: the kernel queues an
//!   `IN_IGNORED` for it behind every event queued so far) tells when that
//!   is so; from then on only later events are read, which move it like
//!   any other;
//! - once its mark is read back, its path is checked against the watch
//!   (re-adding a watch by path with `IN_MASK_ADD` returns the descriptor
//!   of the directory there: exact, where comparing inode numbers read
//!   by another call could race with a rename); a path still wrong after
//!   [`CHECKS`] checks (reads, or short waits when quiet), when no event
//!   read since could explain it, means the table cannot be trusted: the
//!   whole tree is watched again and rescanned (see
//!   [`super::inotify`]'s `rewatch_all`), and the log says so.
//!
//! Invariant: a watch is either fresh (and checked before it is trusted)
//! or was added before every event not yet read.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;

/// Checks of a fresh watch whose path still names another directory (or
/// none) after which the table is given up on.
pub const CHECKS: u32 = 8;

/// A watch descriptor's number (see `inotify::Wd`).
pub type Wd = i32;

/// The mark that tells when every event queued before a fresh watch was
/// added has been read, and the checks its path failed since.
struct Fresh {
    mark: u64,
    misses: u32,
}

/// Whether a path names a watch: `Some(true)` if the directory at the path
/// is the one watch `wd` watches, `None` when that cannot be told.
pub trait Names: Fn(Wd, &[u8]) -> Option<bool> {}
impl<F: Fn(Wd, &[u8]) -> Option<bool>> Names for F {}

/// What [`FreshWatches::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// Nothing fresh is left unconfirmed (or none was due).
    Settled,
    /// Some paths do not name their watch yet: check again soon.
    Pending,
    /// This many watches kept a wrong path: the table is wrong.
    Lost(usize),
}

#[derive(Default)]
pub struct FreshWatches {
    fresh: HashMap<Wd, Fresh>,
    /// Marks sent, and the last one read back.
    sent: u64,
    seen: u64,
    /// Watches added since the last mark was sent.
    unmarked: bool,
    /// The watch numbers of the marks in flight, and their sequence.
    marks: HashMap<Wd, u64>,
    /// The last check left paths to look at again.
    recheck: bool,
}

impl FreshWatches {
    /// Notes that watch `wd` was just filed at its directory's current
    /// path.
    pub fn note(&mut self, wd: Wd) {
        self.unmarked = true;
        self.fresh.insert(
            wd,
            Fresh {
                mark: self.sent + 1,
                misses: 0,
            },
        );
    }

    pub fn is_empty(&self) -> bool {
        self.fresh.is_empty()
    }

    /// Forgets every fresh watch and mark in flight (the table is being
    /// rebuilt, after an overflow that may have dropped the marks).
    pub fn clear(&mut self) {
        self.fresh.clear();
        self.marks.clear();
        self.seen = self.sent;
        self.recheck = false;
    }

    /// Whether fresh watch `wd`, filed at `path`, is still there: a rename
    /// read now for that path predates it (or was undone since), and must
    /// not move it.
    pub fn stays(&self, wd: Wd, path: &[u8], names: impl Names) -> bool {
        self.fresh.contains_key(&wd) && names(wd, path) == Some(true)
    }

    /// After a read that added fresh watches: queues a mark behind every
    /// event queued so far. `group` is the inotify descriptor; `dir`, a
    /// directory outside the source (the journal's).
    pub fn send_mark(&mut self, group: impl AsFd, dir: &Path) {
        use rustix::fs::inotify::{add_watch, remove_watch, WatchFlags};
        if !std::mem::take(&mut self.unmarked) {
            return;
        }
        self.sent += 1;
        // MASK_CREATE: a directory this group watches already (a state
        // directory inside the source) must keep its watch.
        let flags = WatchFlags::DELETE_SELF | WatchFlags::ONLYDIR | WatchFlags::MASK_CREATE;
        match add_watch(&group, dir, flags) {
            Ok(wd) => {
                let _ = remove_watch(&group, wd);
                self.marks.insert(wd, self.sent);
            }
            Err(e) => {
                // No mark (the watch limit, say): the checks start now and
                // repeat until the paths name their watches.
                tracing::debug!("cannot queue an inotify mark on {}: {e}", dir.display());
                self.seen = self.sent;
            }
        }
    }

    /// Whether `wd` (of an `IN_IGNORED` read) was a mark: if so, every
    /// event queued before it has been read.
    pub fn mark_read(&mut self, wd: Wd) -> bool {
        match self.marks.remove(&wd) {
            Some(seq) => {
                self.seen = self.seen.max(seq);
                true
            }
            None => false,
        }
    }

    /// Asks for a mark at the next [`Self::send_mark`], and returns it: once
    /// [`Self::read_back`], every event queued before then has been read.
    pub fn mark_next(&mut self) -> u64 {
        self.unmarked = true;
        self.sent + 1
    }

    /// Whether mark `seq` (of [`Self::mark_next`]) has been read back, or
    /// could not be sent.
    pub fn read_back(&self, seq: u64) -> bool {
        self.seen >= seq
    }

    /// Whether fresh watches wait for a check (see [`Self::check`]) that
    /// no event will bring: capture should look again soon.
    pub fn due(&self) -> bool {
        self.recheck
    }

    /// Checks the fresh watches whose mark was read back: each whose path
    /// (`path_of`) names its directory is confirmed, each gone is
    /// forgotten, the others counted.
    pub fn check(&mut self, path_of: impl Fn(Wd) -> Option<Vec<u8>>, names: impl Names) -> Checked {
        let seen = self.seen;
        let mut lost = 0;
        let mut pending = false;
        self.fresh.retain(|&wd, f| {
            if f.mark > seen {
                return true;
            }
            let Some(path) = path_of(wd) else {
                return false;
            };
            if names(wd, &path) == Some(true) {
                return false;
            }
            f.misses += 1;
            if f.misses > CHECKS {
                lost += 1;
            }
            pending = true;
            true
        });
        self.recheck = pending;
        match (lost, pending) {
            (0, false) => Checked::Settled,
            (0, true) => Checked::Pending,
            (n, _) => Checked::Lost(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::inotify::{init, CreateFlags, ReadFlags};

    /// Reads the group's queued events and hands each `IN_IGNORED` to
    /// `fresh` as the inotify backend does.
    fn read_marks(group: &impl AsFd, fresh: &mut FreshWatches) {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut r = rustix::fs::inotify::Reader::new(group, &mut buf);
        while let Ok(e) = r.next() {
            if e.events().contains(ReadFlags::IGNORED) {
                fresh.mark_read(e.wd());
            }
        }
    }

    #[test]
    fn a_fresh_watch_is_checked_once_its_mark_is_read_and_trusted_or_given_up() {
        let group = init(CreateFlags::NONBLOCK).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut f = FreshWatches::default();
        f.note(7);
        f.note(8);
        // Stays where its path names it, and only while fresh.
        assert!(f.stays(7, b"p", |_, _| Some(true)));
        assert!(!f.stays(7, b"p", |_, _| Some(false)));
        assert!(!f.stays(9, b"p", |_, _| Some(true)));
        // Not checked before the mark is read back.
        let path_of = |wd: Wd| Some(format!("d{wd}").into_bytes());
        assert_eq!(f.check(path_of, |_, _| Some(false)), Checked::Settled);
        f.send_mark(&group, dir.path());
        assert_eq!(f.check(path_of, |_, _| Some(false)), Checked::Settled);
        read_marks(&group, &mut f);
        // 7's path names it: trusted; 8's does not: looked at again, and
        // given up on after CHECKS more.
        let names = |wd: Wd, _: &[u8]| Some(wd == 7);
        assert_eq!(f.check(path_of, names), Checked::Pending);
        assert!(f.due() && !f.stays(7, b"d7", |_, _| Some(true)));
        for _ in 1..CHECKS {
            assert_eq!(f.check(path_of, names), Checked::Pending);
        }
        assert_eq!(f.check(path_of, names), Checked::Lost(1));
        f.clear();
        assert!(f.is_empty() && !f.due());
    }

    #[test]
    fn a_watch_added_after_a_mark_waits_for_the_next() {
        let group = init(CreateFlags::NONBLOCK).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut f = FreshWatches::default();
        f.note(1);
        f.send_mark(&group, dir.path());
        f.note(2);
        read_marks(&group, &mut f);
        let path_of = |wd: Wd| Some(vec![wd as u8]);
        // 1 is due and wrong; 2 is not due yet.
        assert_eq!(f.check(path_of, |_, _| Some(false)), Checked::Pending);
        assert_eq!(f.check(path_of, |wd, _| Some(wd == 1)), Checked::Settled);
        assert!(!f.is_empty());
        f.send_mark(&group, dir.path());
        read_marks(&group, &mut f);
        // Gone from the table (deleted): forgotten.
        assert_eq!(f.check(|_| None, |_, _| Some(false)), Checked::Settled);
        assert!(f.is_empty());
    }
}
