//! `drmirror verify`: compare a source tree with its mirror.
//!
//! Both walks are parallel; `--checksum` hashes both sides of every regular
//! file (BLAKE3) in parallel as well. Beyond type, size, mode, mtime and
//! owner, what a faithful copy keeps is compared too (see
//! [`crate::fidelity`]): extended attributes and ACLs (names and values),
//! the allocation of sparse files, special files and device numbers, and
//! hard links (two source names share an inode exactly when their two
//! target names do). What the options leave out of the mirror is left out
//! of the comparison.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::fidelity::{self, Handle, Keep};
use crate::filter::Filter;
use crate::fsops::{self, Root};
use crate::meta::{Kind, Meta};
use crate::paths;
use crate::scan;

#[derive(Clone, Debug)]
pub struct Options {
    pub checksum: bool,
    pub owner: bool,
    pub filter: Filter,
    /// What the mirror keeps beyond content, and so what is compared.
    pub keep: Keep,
    /// Advanced by the source entries compared; its message says the bytes
    /// checksummed (a bar on a terminal: see `drmirror verify`).
    pub progress: Option<indicatif::ProgressBar>,
}

/// A target file allocating more than its source's blocks and this much
/// has lost holes (`differs(sparse)`); below it, filesystems differ.
const SPARSE_SLACK: u64 = 1 << 20;

/// One difference between the trees.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Difference {
    pub path: Vec<u8>,
    /// `missing`, `extra`, or `differs(what)`.
    pub what: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub entries: u64,
    pub differences: Vec<Difference>,
    /// Directories or files that could not be read (each also a difference).
    pub errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot open {path}: {source}")]
    Root { path: String, source: io::Error },
}

fn compare_meta(s: &Meta, t: &Meta, owner: bool) -> Option<&'static str> {
    if s.kind != t.kind {
        return Some("type");
    }
    if s.kind == Kind::File && s.size != t.size {
        return Some("size");
    }
    if s.kind != Kind::Symlink && s.mode != t.mode {
        return Some("mode");
    }
    if s.mtime_ns != t.mtime_ns {
        return Some("mtime");
    }
    if owner && (s.uid != t.uid || s.gid != t.gid) {
        return Some("owner");
    }
    if s.rdev != t.rdev {
        return Some("rdev");
    }
    None
}

/// Whether entry `name` differs in its extended attributes (`xattr`) or
/// ACLs (`acl`) between source directory `sd` and target directory `td`.
fn compare_xattrs(
    sd: std::os::fd::BorrowedFd<'_>,
    td: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
    ns: u8,
) -> io::Result<Vec<&'static str>> {
    let a = fidelity::read(Handle::At(sd, name), ns)?;
    let b = fidelity::read(Handle::At(td, name), ns)?;
    let mut out = Vec::new();
    let is_acl = |n: &[u8]| n.starts_with(b"system.posix_acl_");
    let part = |x: &fidelity::Xattrs, acl: bool| -> Vec<fidelity::Xattr> {
        x.list
            .iter()
            .filter(|e| is_acl(&e.name) == acl)
            .cloned()
            .collect()
    };
    if part(&a, false) != part(&b, false) {
        out.push("xattr");
    }
    if part(&a, true) != part(&b, true) {
        out.push("acl");
    }
    Ok(out)
}

/// Whether target file `name` allocates far more than its source (see
/// [`SPARSE_SLACK`]).
fn lost_holes(
    sd: std::os::fd::BorrowedFd<'_>,
    td: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
) -> io::Result<bool> {
    let blocks = |d| {
        rustix::fs::statat(d, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map(|st| st.st_blocks as u64 * 512)
    };
    Ok(blocks(td)? > blocks(sd)? + SPARSE_SLACK)
}

fn hash_file(root: &Root, rel: &[u8]) -> io::Result<Option<blake3::Hash>> {
    let Some((f, _)) = root.open_file(rel)? else {
        return Ok(None);
    };
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(Some(h.finalize()))
}

/// A file with more than one link on either side: its source and target
/// inodes, and its path.
type Linked = ((u64, u64), (u64, u64), Vec<u8>);

/// The paths of `linked` whose link structure differs: the names of one
/// source inode that do not all share one target inode, and the names of
/// one target inode that do not all share one source inode.
fn link_differences(linked: &[Linked]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for side in [0, 1] {
        let mut groups: HashMap<(u64, u64), Vec<&Linked>> = HashMap::new();
        for l in linked {
            groups
                .entry(if side == 0 { l.0 } else { l.1 })
                .or_default()
                .push(l);
        }
        for g in groups.values() {
            let other = |l: &Linked| if side == 0 { l.1 } else { l.0 };
            if g.iter().any(|l| other(l) != other(g[0])) {
                out.extend(g.iter().map(|l| l.2.clone()));
            }
        }
    }
    out
}

/// Compares `src` and `dst`: the source walk finds what is missing or
/// differs, the target walk what is extra; hard links are compared once
/// both walks are through.
pub fn verify(src: &Path, dst: &Path, opts: &Options) -> Result<Report, VerifyError> {
    let open = |p: &Path| {
        Root::open(p).map_err(|source| VerifyError::Root {
            path: p.display().to_string(),
            source,
        })
    };
    let v = Verifier {
        s: open(src)?,
        d: open(dst)?,
        opts,
        diffs: Mutex::new(Vec::new()),
        entries: AtomicU64::new(1),
        linked: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        hashed: AtomicU64::new(0),
    };
    v.roots(src, dst)?;
    scan::walk(
        &v.s,
        b"",
        |dir, children| v.source_dir(dir, children),
        |p, e| v.unreadable(p, e),
    );
    scan::walk(
        &v.d,
        b"",
        |dir, children| v.target_dir(dir, children),
        |p, e| {
            v.errors.fetch_add(1, Ordering::Relaxed);
            v.push(p, format!("unreadable-target({e})"));
        },
    );
    Ok(v.report())
}

/// One comparison's state, shared by the walks' workers.
struct Verifier<'o> {
    s: Root,
    d: Root,
    opts: &'o Options,
    diffs: Mutex<Vec<Difference>>,
    /// Entries compared (the root included).
    entries: AtomicU64,
    linked: Mutex<Vec<Linked>>,
    errors: AtomicU64,
    /// Bytes checksummed (progress).
    hashed: AtomicU64,
}

impl Verifier<'_> {
    fn push(&self, path: &[u8], what: String) {
        crate::locks::lock(&self.diffs).push(Difference {
            path: path.to_vec(),
            what,
        })
    }

    fn unreadable(&self, p: &[u8], e: &io::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.push(p, format!("unreadable({e})"));
    }

    /// The roots themselves: both must be there.
    fn roots(&self, src: &Path, dst: &Path) -> Result<(), VerifyError> {
        match (self.s.lstat(b""), self.d.lstat(b"")) {
            (Ok(Some(a)), Ok(Some(b))) => {
                if let Some(w) = compare_meta(&a, &b, self.opts.owner) {
                    self.push(b"", format!("differs({w})"));
                }
                Ok(())
            }
            (a, b) => Err(VerifyError::Root {
                path: if a.is_err() { src } else { dst }.display().to_string(),
                source: a
                    .err()
                    .or(b.err())
                    .unwrap_or_else(|| io::Error::other("not found")),
            }),
        }
    }

    /// A source directory's `children` against the target's.
    fn source_dir(&self, dir: &[u8], children: &mut [scan::Child]) {
        let tdir = self.d.open_dir(dir, false).ok();
        let sdir = self.s.open_dir(dir, false).ok();
        let mut files = Vec::new();
        for c in children.iter_mut() {
            let opts = self.opts;
            if !opts.keep.mirrors_kind(c.meta.kind)
                || opts.filter.excluded(&c.rel, c.meta.kind == Kind::Dir)
            {
                c.descend = false;
                continue;
            }
            self.entries.fetch_add(1, Ordering::Relaxed);
            let name = paths::split(&c.rel).1;
            let t = tdir
                .as_ref()
                .and_then(|td| fsops::lstat_at(td.as_fd(), name).ok().flatten());
            let Some(t) = t else {
                self.push(&c.rel, "missing".into());
                c.descend = false;
                continue;
            };
            if !self.entry(c, &t, sdir.as_ref(), tdir.as_ref()) {
                c.descend = false;
                continue;
            }
            if opts.checksum && c.meta.kind == Kind::File && c.meta.size == t.size {
                files.push((c.rel.clone(), c.meta.size));
            }
        }
        self.hash(&files);
        if let Some(pb) = &self.opts.progress {
            let n: u64 = files.iter().map(|(_, size)| size).sum();
            let total = self.hashed.fetch_add(n, Ordering::Relaxed) + n;
            pb.inc(children.len() as u64);
            if self.opts.checksum {
                pb.set_message(format!(", {} checksummed", crate::progress::bytes(total)));
            }
        }
    }

    /// Source entry `c` against its target `t` (in directories `sdir`,
    /// `tdir`), content aside; false when they differ in type (nothing
    /// more to compare there).
    fn entry(
        &self,
        c: &scan::Child,
        t: &Meta,
        sdir: Option<&std::os::fd::OwnedFd>,
        tdir: Option<&std::os::fd::OwnedFd>,
    ) -> bool {
        let opts = self.opts;
        let name = paths::split(&c.rel).1;
        if let Some(w) = compare_meta(&c.meta, t, opts.owner) {
            self.push(&c.rel, format!("differs({w})"));
            if w == "type" {
                return false;
            }
        }
        if let (Some(sd), Some(td)) = (sdir, tdir) {
            let (sd, td) = (sd.as_fd(), td.as_fd());
            match compare_xattrs(sd, td, name, opts.keep.namespaces()) {
                Ok(kinds) => kinds
                    .into_iter()
                    .for_each(|k| self.push(&c.rel, format!("differs({k})"))),
                Err(e) => self.unreadable(&c.rel, &e),
            }
            if opts.keep.sparse
                && c.meta.kind == Kind::File
                && c.meta.size >= SPARSE_SLACK
                && lost_holes(sd, td, name).unwrap_or(false)
            {
                self.push(&c.rel, "differs(sparse)".into());
            }
        }
        if opts.keep.hard_links
            && c.meta.kind != Kind::Dir
            && t.kind == c.meta.kind
            && (c.meta.nlink > 1 || t.nlink > 1)
        {
            crate::locks::lock(&self.linked).push((
                (c.meta.dev, c.meta.ino),
                (t.dev, t.ino),
                c.rel.clone(),
            ));
        }
        if c.meta.kind == Kind::Symlink {
            let a = self.s.read_link(&c.rel).ok();
            let b = tdir.and_then(|td| fsops::read_link_at(td.as_fd(), name).ok());
            if a != b {
                self.push(&c.rel, "differs(symlink)".into());
            }
        }
        true
    }

    /// Checksums `files` on both sides, in parallel.
    fn hash(&self, files: &[(Vec<u8>, u64)]) {
        files.par_iter().for_each(|(rel, _)| {
            match (hash_file(&self.s, rel), hash_file(&self.d, rel)) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(_), Ok(_)) => self.push(rel, "differs(content)".into()),
                (Err(e), _) | (_, Err(e)) => self.unreadable(rel, &e),
            }
        });
    }

    /// A target directory's `children`: those the source lacks (or holds
    /// as a kind not mirrored) are extra.
    fn target_dir(&self, dir: &[u8], children: &mut [scan::Child]) {
        let sdir = self.s.open_dir(dir, false).ok();
        for c in children.iter_mut() {
            if self.opts.filter.excluded(&c.rel, c.meta.kind == Kind::Dir) {
                c.descend = false;
                continue;
            }
            let name = paths::split(&c.rel).1;
            let src = sdir
                .as_ref()
                .and_then(|sd| fsops::lstat_at(sd.as_fd(), name).ok().flatten());
            match src {
                Some(m) if self.opts.keep.mirrors_kind(m.kind) => {
                    if m.kind != c.meta.kind {
                        c.descend = false;
                    }
                }
                _ => {
                    self.push(&c.rel, "extra".into());
                    c.descend = false;
                }
            }
        }
    }

    /// The differences, sorted, with those of hard-link structure.
    fn report(self) -> Report {
        let linked = self.linked.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut differences = self.diffs.into_inner().unwrap_or_else(|p| p.into_inner());
        differences.extend(
            link_differences(&linked)
                .into_iter()
                .map(|path| Difference {
                    path,
                    what: "differs(hardlink)".into(),
                }),
        );
        differences.sort();
        differences.dedup();
        Report {
            entries: self.entries.load(Ordering::Relaxed),
            differences,
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

impl Report {
    /// The documented output: one line per difference, then a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.differences {
            out.push_str(&format!("{}: {}\n", d.what, paths::display(&d.path)));
        }
        if self.differences.is_empty() {
            out.push_str(&format!(
                "verify: trees are identical ({} entries)\n",
                self.entries
            ));
        } else {
            out.push_str(&format!(
                "verify: {} differences in {} entries\n",
                self.differences.len(),
                self.entries
            ));
        }
        out
    }
}
