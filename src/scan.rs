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

use rustix::fs::AtFlags;

use crate::fsops::Root;
use crate::meta::{Kind, Meta};
use crate::paths;

/// One entry of a directory being walked.
#[derive(Debug)]
pub struct Child {
    pub rel: Vec<u8>,
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
    rayon::scope(|s| walk_dir(s, root, start.to_vec(), &on_dir, &on_error));
}

fn walk_dir<'s, D, E>(
    s: &rayon::Scope<'s>,
    root: &'s Root,
    dir: Vec<u8>,
    on_dir: &'s D,
    on_error: &'s E,
) where
    D: Fn(&[u8], &mut [Child]) + Sync,
    E: Fn(&[u8], &io::Error) + Sync,
{
    let mut children = match read_children(root, &dir) {
        Ok(c) => c,
        Err(e) if crate::fsops::is_missing(&e) => return,
        Err(e) => {
            on_error(&dir, &e);
            return;
        }
    };
    on_dir(&dir, &mut children);
    for c in children {
        if c.descend && c.meta.kind == Kind::Dir {
            s.spawn(move |s| walk_dir(s, root, c.rel, on_dir, on_error));
        }
    }
}

/// Lists and stats the children of directory `dir`.
pub fn read_children(root: &Root, dir: &[u8]) -> io::Result<Vec<Child>> {
    let fd = root.open_dir(dir, true)?;
    let mut d = rustix::fs::Dir::read_from(fd.as_fd())?;
    let mut out = Vec::new();
    while let Some(ent) = d.read() {
        let ent = ent?;
        let name = ent.file_name();
        let nb = name.to_bytes();
        if nb == b"." || nb == b".." {
            continue;
        }
        match rustix::fs::statat(fd.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let meta = Meta::from_stat(&st);
                out.push(Child {
                    rel: paths::join(dir, nb),
                    descend: meta.kind == Kind::Dir,
                    meta,
                });
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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
