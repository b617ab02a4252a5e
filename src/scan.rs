//! Parallel tree walk: directory fds + `fstatat`, fanned out over rayon.
//!
//! Hand-written rather than `jwalk` (unmaintained) or `walkdir` (serial):
//! each directory is opened beneath the root with `openat2` (see
//! [`crate::fsops`]) so the walk can never leave the tree through a symlink
//! swapped in mid-walk, and every child is `fstatat`ed relative to its
//! directory's fd, which spares the kernel a full path lookup per entry.
//! Only one directory fd per running task is open at a time, so a directory
//! with a million subdirectories cannot exhaust the fd limit.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::fs::AtFlags;

use crate::fsops::Root;
use crate::meta::{Kind, Meta};
use crate::paths;

/// One entry of a directory being walked.
#[derive(Debug)]
pub struct Child {
    pub rel: Vec<u8>,
    /// From `lstat`.
    pub meta: Meta,
    /// Whether the walk descends into it; set by the walk for directories,
    /// may be cleared by the visitor (an excluded directory, say).
    pub descend: bool,
}

/// Walks the subtree `start` of `root` in parallel. `on_dir` gets each
/// directory's relative path and its children (never `start` itself as a
/// child); `on_error` gets the directories or entries that could not be read.
/// Entries that vanish during the walk are skipped silently.
pub fn walk<D, E>(root: &Root, start: &[u8], on_dir: D, on_error: E)
where
    D: Fn(&[u8], &mut [Child]) + Sync,
    E: Fn(&[u8], &io::Error) + Sync,
{
    walk_tracked(root, start, on_dir, on_error, |_, _| {});
}

/// [`walk`], and `on_done` gets each directory once `on_dir` has returned
/// for it and for every directory the walk descended into below it (the
/// point at which a reconciliation can checkpoint the whole subtree), with
/// the number of entries listed in that subtree. A
/// directory that could not be listed is reported to `on_error` and counts
/// as done; the caller decides what that means for its ancestors.
pub fn walk_tracked<D, E, F>(root: &Root, start: &[u8], on_dir: D, on_error: E, on_done: F)
where
    D: Fn(&[u8], &mut [Child]) + Sync,
    E: Fn(&[u8], &io::Error) + Sync,
    F: Fn(&[u8], u64) + Sync,
{
    let cb = Callbacks {
        on_dir: &on_dir,
        on_error: &on_error,
        on_done: &on_done,
    };
    let node = Arc::new(Node {
        rel: start.to_vec(),
        pending: AtomicUsize::new(1),
        entries: AtomicU64::new(0),
        parent: None,
    });
    rayon::scope(|s| walk_dir(s, root, node, &cb));
}

struct Callbacks<'a, D, E, F> {
    on_dir: &'a D,
    on_error: &'a E,
    on_done: &'a F,
}

/// A directory whose subtree is still being walked. `pending` counts the
/// directory's own visit plus each subdirectory still in progress; the
/// last to finish reports the directory done and tells its parent.
struct Node {
    rel: Vec<u8>,
    pending: AtomicUsize,
    /// Entries listed in the subtree so far.
    entries: AtomicU64,
    parent: Option<Arc<Node>>,
}

fn finish<F: Fn(&[u8], u64)>(node: Arc<Node>, on_done: &F) {
    let mut cur = Some(node);
    while let Some(n) = cur {
        if n.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let entries = n.entries.load(Ordering::Acquire);
        on_done(&n.rel, entries);
        if let Some(p) = &n.parent {
            // Before the parent's count drops: whoever finishes it sees it.
            p.entries.fetch_add(entries, Ordering::Release);
        }
        cur = n.parent.clone();
    }
}

fn walk_dir<'s, D, E, F>(
    s: &rayon::Scope<'s>,
    root: &'s Root,
    node: Arc<Node>,
    cb: &'s Callbacks<'s, D, E, F>,
) where
    D: Fn(&[u8], &mut [Child]) + Sync,
    E: Fn(&[u8], &io::Error) + Sync,
    F: Fn(&[u8], u64) + Sync,
{
    let dir = &node.rel;
    let mut children = match read_children(root, dir) {
        Ok(c) => c,
        Err(e) => {
            if !crate::fsops::is_missing(&e) {
                (cb.on_error)(dir, &e);
            }
            finish(node, cb.on_done);
            return;
        }
    };
    (cb.on_dir)(dir, &mut children);
    node.entries
        .fetch_add(children.len() as u64, Ordering::Relaxed);
    for c in children {
        if c.descend && c.meta.kind == Kind::Dir {
            node.pending.fetch_add(1, Ordering::Relaxed);
            let child = Arc::new(Node {
                rel: c.rel,
                pending: AtomicUsize::new(1),
                entries: AtomicU64::new(0),
                parent: Some(node.clone()),
            });
            s.spawn(move |s| walk_dir(s, root, child, cb));
        }
    }
    finish(node, cb.on_done);
}

/// Lists and stats the children of directory `dir`.
pub fn read_children(root: &Root, dir: &[u8]) -> io::Result<Vec<Child>> {
    let fd = root.open_dir(dir, true)?;
    let mut out = Vec::new();
    crate::fsops::for_each_name(fd.as_fd(), |name, _| {
        match rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let meta = Meta::from_stat(&st);
                out.push(Child {
                    rel: paths::join(dir, name.to_bytes()),
                    descend: meta.kind == Kind::Dir,
                    meta,
                });
                Ok(())
            }
            Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })?;
    Ok(out)
}

/// The entries of directory `dir` as a listing carries them (what the
/// receiver answers [`crate::protocol::Request::List`] with, and what
/// `verify` compares a local mirror by): metadata, symlink texts, and
/// extended attributes in namespaces `ns` (0: none; unreadable ones are
/// left out, `xattrs: None`, so that the entry differs). `None`: no such
/// directory. Names `skip` says so of are left out; it gets the
/// directory's fd when it could be opened.
pub fn entries(
    root: &Root,
    dir: &[u8],
    ns: u8,
    skip: impl Fn(Option<std::os::fd::BorrowedFd<'_>>, &[u8]) -> bool,
) -> io::Result<Option<Vec<crate::protocol::Entry>>> {
    let children = match read_children(root, dir) {
        Ok(c) => c,
        Err(e) if crate::fsops::is_missing(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let dfd = root.open_dir(dir, false).ok();
    let d = dfd.as_ref().map(|d| d.as_fd());
    let mut out = Vec::with_capacity(children.len());
    for c in children {
        let name = paths::split(&c.rel).1.to_vec();
        if skip(d, &name) {
            continue;
        }
        let link = match (c.meta.kind, d) {
            (Kind::Symlink, Some(d)) => crate::fsops::read_link_at(d, &name).ok(),
            _ => None,
        };
        let xattrs = match d {
            Some(d) if ns != 0 => {
                crate::fidelity::read(crate::fidelity::Handle::At(d, &name), ns).ok()
            }
            _ => None,
        };
        out.push(crate::protocol::Entry {
            name,
            meta: c.meta,
            link,
            xattrs,
        });
    }
    Ok(Some(out))
}

/// The names in directory `dir` with their kinds, from the listing alone:
/// `getdents` reports the type on the filesystems a mirror's source lives
/// on, so this costs no `stat` per entry (one whose type it leaves unknown
/// is stat'ed).
pub fn read_names(root: &Root, dir: &[u8]) -> io::Result<Vec<(Vec<u8>, Kind)>> {
    use rustix::fs::FileType;
    let fd = root.open_dir(dir, true)?;
    let mut out = Vec::new();
    crate::fsops::for_each_name(fd.as_fd(), |name, t| {
        let kind = match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDev,
            FileType::BlockDevice => Kind::BlockDev,
            FileType::Unknown => {
                match rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => Meta::from_stat(&st).kind,
                    Err(rustix::io::Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        out.push((name.to_bytes().to_vec(), kind));
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_directory_is_done_after_its_whole_subtree() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a/b/c", "a/d", "e"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let root = Root::open(r).unwrap();
        let all: Vec<Vec<u8>> = ["", "a", "a/b", "a/b/c", "a/d", "e"]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let visited = Mutex::new(Vec::new());
        let done = Mutex::new(Vec::new());
        walk_tracked(
            &root,
            b"",
            |dir, _| visited.lock().unwrap().push(dir.to_vec()),
            |p, e| panic!("{:?}: {e}", p),
            |dir, entries| {
                assert!(visited.lock().unwrap().iter().any(|v| v == dir));
                // Each directory here holds one entry per listed child.
                let below = all
                    .iter()
                    .filter(|x| crate::paths::is_within(x, dir) && *x != dir)
                    .count() as u64;
                assert_eq!(entries, below, "{:?}", dir);
                // Every directory below `dir` is done already.
                let mut d = done.lock().unwrap();
                for x in all
                    .iter()
                    .filter(|x| crate::paths::is_within(x, dir) && *x != dir)
                {
                    assert!(d.contains(x), "{:?} done before {:?}", dir, x);
                }
                d.push(dir.to_vec());
            },
        );
        let mut got = done.into_inner().unwrap();
        assert_eq!(got.last().map(|v| v.as_slice()), Some(b"".as_slice()));
        got.sort();
        assert_eq!(got, all);
    }

    #[test]
    fn walks_everything_and_never_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("a/b/c")).unwrap();
        std::fs::write(r.join("a/b/c/f"), b"x").unwrap();
        std::fs::write(r.join("top"), b"").unwrap();
        std::os::unix::fs::symlink("/", r.join("a/escape")).unwrap();
        let root = Root::open(r).unwrap();
        let seen = Mutex::new(Vec::new());
        walk(
            &root,
            b"",
            |_, ch| {
                for c in ch.iter() {
                    seen.lock().unwrap().push((c.rel.clone(), c.meta.kind));
                }
            },
            |p, e| panic!("{:?}: {e}", p),
        );
        let mut got = seen.into_inner().unwrap();
        got.sort();
        let want: Vec<(Vec<u8>, Kind)> = vec![
            (b"a".to_vec(), Kind::Dir),
            (b"a/b".to_vec(), Kind::Dir),
            (b"a/b/c".to_vec(), Kind::Dir),
            (b"a/b/c/f".to_vec(), Kind::File),
            (b"a/escape".to_vec(), Kind::Symlink),
            (b"top".to_vec(), Kind::File),
        ];
        assert_eq!(got, want);
    }
}
