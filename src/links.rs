//! The other names of a hard-linked source file.
//!
//! A write (or `chmod`, `setfattr`) through one name of an inode shows
//! under every name of it, but capture sees only the name it was made
//! through: fanotify and inotify report the path that was opened. Left
//! so, the mirror of the other names would stay stale without a word, with
//! the lag at 0 (symlinks and special files have hard links too: a
//! `chown -h` through one name of a linked symlink is the same). After
//! applying a live change of an entry with more than one link, the shipper
//! asks [`Links::stale_others`] for the other names whose
//! index entry no longer matches the source, and queues them.
//!
//! Invariants:
//! - Names are remembered per inode and checked against the source
//!   (`lstat`: same device and inode) each time they are used; a name that
//!   moved on is dropped.
//! - The source is searched (one parallel walk of names and inode numbers
//!   from `getdents`, no `stat` per entry) only for an inode with fewer
//!   names known than its link count, and once per link count: names
//!   outside the source (or excluded) would otherwise cost a walk per write.
//! - What is queued converges: a queued name is applied, its index entry
//!   then matches the source, and the next lookup queues nothing.
//! - Only live changes ask: the startup scan compares every name itself.
//!
//! [`Mirrored`] is the other half: where the *target* holds a copy of each
//! hard-linked source inode, so that a second name is linked to that copy
//! instead of copied again (as `rsync -H` does), and the target's names of
//! one inode share one inode too. Invariants:
//! - A name there is a hint, never trusted alone: it is used only if the
//!   target's file at that name has the source inode's size and mtime now
//!   (the same test that says any copy is current); one that fails is
//!   dropped.
//! - The names of one inode are applied one at a time ([`Mirrored::claim`]):
//!   two names of a new inode in one round would otherwise both be copied.
//! - Names come from this run's copies and from compare walks that find a
//!   name current (index or target); the map is bounded
//!   ([`MIRRORED_MAX`] inodes), and a name not remembered is copied, which
//!   is correct, only not linked.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};

use rustix::fs::{AtFlags, FileType};

use crate::filter::Filter;
use crate::fsops::{self, Root};
use crate::paths;

/// Inodes remembered at most (a map past it starts over: names are
/// found again by a search).
const REMEMBERED: usize = 100_000;

#[derive(Default)]
struct Known {
    names: Vec<Vec<u8>>,
    /// The link count the last search was made at.
    searched_at: Option<u64>,
}

/// Inodes whose mirrored names [`Mirrored`] remembers at most (past it,
/// those not being applied are forgotten).
pub const MIRRORED_MAX: usize = 1_000_000;

/// Names remembered per inode in [`Mirrored`], most recent first.
const NAMES_PER_INODE: usize = 4;

/// A source inode: (device, inode number).
pub type InodeKey = (u64, u64);

/// Where the target holds copies of hard-linked source inodes (see the
/// module's doc).
#[derive(Default)]
pub struct Mirrored {
    groups: Mutex<HashMap<InodeKey, Group>>,
    applied: Condvar,
}

#[derive(Default)]
struct Group {
    names: Vec<Vec<u8>>,
    busy: bool,
}

impl Group {
    fn remember(&mut self, rel: &[u8]) {
        self.names.retain(|n| n.as_slice() != rel);
        self.names.insert(0, rel.to_vec());
        self.names.truncate(NAMES_PER_INODE);
    }
}

/// The apply of one name of a hard-linked inode (see [`Mirrored::claim`]);
/// it owns its map, so that a remote target's batch can hold it until the
/// receiver's answer.
pub struct Claim {
    of: Arc<Mirrored>,
    key: InodeKey,
    rel: Vec<u8>,
    mirrored: bool,
    stale: Vec<Vec<u8>>,
}

impl Mirrored {
    /// Claims inode `key` for the apply of its name `rel`: waits while
    /// another name of it is applied, then returns the other names the
    /// target is thought to hold a copy at, newest first.
    pub fn claim(self: &Arc<Self>, key: InodeKey, rel: &[u8]) -> (Vec<Vec<u8>>, Claim) {
        let mut groups = crate::locks::lock(&self.groups);
        while groups.get(&key).is_some_and(|g| g.busy) {
            groups = self.applied.wait(groups).unwrap_or_else(|p| p.into_inner());
        }
        bound(&mut groups, key);
        let g = groups.entry(key).or_default();
        g.busy = true;
        let names = g
            .names
            .iter()
            .filter(|n| n.as_slice() != rel)
            .cloned()
            .collect();
        let claim = Claim {
            of: self.clone(),
            key,
            rel: rel.to_vec(),
            mirrored: false,
            stale: Vec::new(),
        };
        (names, claim)
    }

    /// Notes that the target holds a current copy of inode `key` at `rel`
    /// (a compare walk found it so); returns the newest other name
    /// remembered, if any.
    pub fn note(&self, key: InodeKey, rel: &[u8]) -> Option<Vec<u8>> {
        let mut groups = crate::locks::lock(&self.groups);
        bound(&mut groups, key);
        let g = groups.entry(key).or_default();
        let other = g.names.iter().find(|n| n.as_slice() != rel).cloned();
        g.remember(rel);
        other
    }
}

/// Keeps the map within [`MIRRORED_MAX`] before `key` is added.
fn bound(groups: &mut HashMap<InodeKey, Group>, key: InodeKey) {
    if groups.len() >= MIRRORED_MAX && !groups.contains_key(&key) {
        groups.retain(|_, g| g.busy);
    }
}

impl Claim {
    /// The target now holds a current copy at the claimed name.
    pub fn mirrored(&mut self) {
        self.mirrored = true;
    }

    /// The target's file at `name` is not a current copy (any more).
    pub fn stale(&mut self, name: &[u8]) {
        self.stale.push(name.to_vec());
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut groups = crate::locks::lock(&self.of.groups);
        if let Some(g) = groups.get_mut(&self.key) {
            g.busy = false;
            g.names.retain(|n| !self.stale.contains(n));
            if self.mirrored {
                g.remember(&self.rel);
            }
        }
        drop(groups);
        self.of.applied.notify_all();
    }
}

/// Names of hard-linked source inodes, by (device, inode).
#[derive(Default)]
pub struct Links {
    known: Mutex<HashMap<(u64, u64), Known>>,
}

impl Links {
    /// For each of `changed` (paths of source files whose live change was
    /// just applied), its other names whose mirror is stale: `stale(rel,
    /// meta)` says whether the index entry of a name differs from its
    /// source metadata `meta`.
    pub fn stale_others(
        &self,
        source: &Root,
        filter: &Filter,
        changed: &[Vec<u8>],
        stale: impl Fn(&[u8], &crate::meta::Meta) -> bool,
    ) -> Vec<Vec<u8>> {
        let linked: Vec<(Vec<u8>, u64, u64, u64)> = changed
            .iter()
            .filter_map(|rel| {
                let st = stat(source, rel)?;
                (st.st_nlink > 1 && FileType::from_raw_mode(st.st_mode) != FileType::Directory)
                    .then(|| (rel.clone(), st.st_dev, st.st_ino, st.st_nlink))
            })
            .collect();
        if linked.is_empty() {
            return Vec::new();
        }
        self.search_unknown(source, filter, &linked);
        let mut out = Vec::new();
        let mut known = crate::locks::lock(&self.known);
        for (rel, dev, ino, _) in &linked {
            let Some(k) = known.get_mut(&(*dev, *ino)) else {
                continue;
            };
            if !k.names.contains(rel) {
                k.names.push(rel.clone());
            }
            k.names.retain(|n| {
                stat(source, n).is_some_and(|st| st.st_dev == *dev && st.st_ino == *ino)
            });
            for n in &k.names {
                if n == rel || out.contains(n) {
                    continue;
                }
                if let Some(m) = source.lstat(n).ok().flatten() {
                    if stale(n, &m) {
                        out.push(n.clone());
                    }
                }
            }
        }
        out
    }

    /// Searches the source for the names of the inodes in `linked` that
    /// have fewer names known than links and were not searched at this
    /// link count yet.
    fn search_unknown(&self, source: &Root, filter: &Filter, linked: &[(Vec<u8>, u64, u64, u64)]) {
        let wanted: HashSet<u64> = {
            let mut known = crate::locks::lock(&self.known);
            if known.len() > REMEMBERED {
                known.clear();
            }
            linked
                .iter()
                .filter(|(_, dev, ino, nlink)| {
                    let k = known.entry((*dev, *ino)).or_default();
                    (k.names.len() as u64) < *nlink && k.searched_at != Some(*nlink)
                })
                .map(|(_, _, ino, _)| *ino)
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let found = search(source, filter, &wanted);
        let mut known = crate::locks::lock(&self.known);
        for (_, dev, ino, nlink) in linked {
            if !wanted.contains(ino) {
                continue;
            }
            let k = known.entry((*dev, *ino)).or_default();
            k.searched_at = Some(*nlink);
            for (fino, rel) in &found {
                if fino == ino && !k.names.contains(rel) {
                    // Same inode number on another filesystem (a mount
                    // below the source) is another file.
                    if stat(source, rel).is_some_and(|st| st.st_dev == *dev) {
                        k.names.push(rel.clone());
                    }
                }
            }
        }
    }
}

fn stat(source: &Root, rel: &[u8]) -> Option<rustix::fs::Stat> {
    let (parent, name) = paths::split(rel);
    let dir = source.open_dir(parent, false).ok()?;
    rustix::fs::statat(dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW).ok()
}

/// The entries of the source but directories, outside what `filter` excludes, whose
/// inode number is in `wanted`: a parallel walk of names and inode numbers.
fn search(source: &Root, filter: &Filter, wanted: &HashSet<u64>) -> Vec<(u64, Vec<u8>)> {
    let found = Mutex::new(Vec::new());
    rayon::scope(|s| visit(s, source, filter, wanted, &found, Vec::new()));
    found.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn visit<'s>(
    s: &rayon::Scope<'s>,
    source: &'s Root,
    filter: &'s Filter,
    wanted: &'s HashSet<u64>,
    found: &'s Mutex<Vec<(u64, Vec<u8>)>>,
    dir: Vec<u8>,
) {
    let Ok(fd) = source.open_dir(&dir, true) else {
        return;
    };
    let mut subdirs = Vec::new();
    let _ = fsops::for_each_entry(fd.as_fd(), |name, t, ino| {
        let rel = paths::join(&dir, name.to_bytes());
        let t = match t {
            FileType::Unknown => {
                match rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => FileType::from_raw_mode(st.st_mode),
                    Err(_) => return Ok(()),
                }
            }
            t => t,
        };
        match t {
            FileType::Directory if !filter.excluded(&rel, true) => subdirs.push(rel),
            // Symlinks and special files have hard links too.
            t if t != FileType::Directory
                && wanted.contains(&ino)
                && !filter.excluded(&rel, false) =>
            {
                crate::locks::lock(found).push((ino, rel));
            }
            _ => {}
        }
        Ok(())
    });
    for d in subdirs {
        s.spawn(move |s| visit(s, source, filter, wanted, found, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn names_of_one_inode_are_applied_one_at_a_time_and_remembered() {
        let m = Arc::new(Mirrored::default());
        let key = (1, 42);
        let (names, mut first) = m.claim(key, b"a");
        assert!(names.is_empty());
        // A second name waits until the first is applied, then sees it.
        let applied = AtomicBool::new(false);
        std::thread::scope(|s| {
            let second = s.spawn(|| {
                let (names, _c) = m.claim(key, b"b");
                assert!(applied.load(Ordering::SeqCst), "claimed while busy");
                names
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            applied.store(true, Ordering::SeqCst);
            first.mirrored();
            drop(first);
            assert_eq!(second.join().unwrap(), vec![b"a".to_vec()]);
        });
        // Not mirrored (a failed apply): not remembered; stale: forgotten.
        let (names, mut c) = m.claim(key, b"c");
        assert_eq!(names, vec![b"a".to_vec()]);
        c.stale(b"a");
        drop(c);
        assert_eq!(m.note(key, b"d"), None);
        assert_eq!(m.note(key, b"e"), Some(b"d".to_vec()));
        let (names, _c) = m.claim(key, b"d");
        assert_eq!(names, vec![b"e".to_vec()]);
    }
}
