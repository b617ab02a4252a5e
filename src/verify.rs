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
//!
//! One walk, of the source: each source directory is compared with the
//! listing of its mirror ([`Mirror::list`]), which finds what is missing,
//! differs or is extra there; the walk descends where both sides hold a
//! directory. The mirror is a local directory or a receiver's root
//! ([`Mirror::Remote`]): the same listing, over the wire, and checksums
//! computed on the DR host.

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
use crate::protocol::Entry;
use crate::scan;
use crate::target::remote::RemoteTarget;

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
    /// Of those, entries other than directories.
    pub files: u64,
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

/// What differs between the extended attributes `a` and `b` of one
/// entry: `xattr` (attributes other than ACLs) and `acl`.
fn xattr_differences(a: &fidelity::Xattrs, b: &fidelity::Xattrs) -> Vec<&'static str> {
    let is_acl = |n: &[u8]| n.starts_with(b"system.posix_acl_");
    let part = |x: &fidelity::Xattrs, acl: bool| -> Vec<fidelity::Xattr> {
        x.list
            .iter()
            .filter(|e| is_acl(&e.name) == acl)
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    if part(a, false) != part(b, false) {
        out.push("xattr");
    }
    if part(a, true) != part(b, true) {
        out.push("acl");
    }
    out
}

fn hash_file(root: &Root, rel: &[u8]) -> io::Result<Option<[u8; 32]>> {
    let Some((f, _)) = root.open_file(rel)? else {
        return Ok(None);
    };
    let mut h = blake3::Hasher::new();
    h.update_reader(f)?;
    Ok(Some(*h.finalize().as_bytes()))
}

/// The mirror's side of a comparison.
pub enum Mirror<'t> {
    /// A local directory.
    Local(Root),
    /// A receiver's root, asked over the wire: listings with extended
    /// attributes, and checksums computed on the DR host. What a listing
    /// does not carry is not compared there: the allocation of sparse
    /// files, and a target's hard links among names the source does not
    /// link (link counts are not sent).
    Remote(&'t RemoteTarget),
}

impl Mirror<'_> {
    /// The local directory `path`.
    pub fn local(path: &Path) -> Result<Mirror<'static>, VerifyError> {
        Root::open(path)
            .map(Mirror::Local)
            .map_err(|source| VerifyError::Root {
                path: path.display().to_string(),
                source,
            })
    }

    fn root_meta(&self) -> io::Result<Option<Meta>> {
        match self {
            Mirror::Local(r) => r.lstat(b""),
            Mirror::Remote(t) => t.lstat(b""),
        }
    }

    /// Directory `dir`'s entries, with attributes in namespaces `ns`.
    fn list(&self, dir: &[u8], ns: u8) -> io::Result<Option<Vec<Entry>>> {
        match self {
            Mirror::Local(r) => scan::entries(r, dir, ns, |_, _| false),
            Mirror::Remote(t) => t.list(dir, ns),
        }
    }

    /// The BLAKE3 hash of file `rel`; `None` when there is none.
    fn hash(&self, rel: &[u8]) -> io::Result<Option<[u8; 32]>> {
        match self {
            Mirror::Local(r) => hash_file(r, rel),
            Mirror::Remote(t) => t.hash(rel),
        }
    }

    /// Bytes allocated to `rel`, where known (see [`Mirror::Remote`]).
    fn allocated(&self, rel: &[u8]) -> Option<u64> {
        match self {
            Mirror::Local(r) => allocated(r.open_dir(paths::split(rel).0, false).ok()?, rel),
            Mirror::Remote(_) => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Mirror::Local(r) => r.path().display().to_string(),
            Mirror::Remote(t) => t.describe(),
        }
    }
}

/// Bytes allocated to entry `rel` of directory `dir`.
fn allocated(dir: impl AsFd, rel: &[u8]) -> Option<u64> {
    rustix::fs::statat(
        dir,
        paths::split(rel).1,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .ok()
    .map(|st| st.st_blocks as u64 * 512)
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

/// Compares source `src` with its mirror `dst` (see the module doc).
pub fn verify(src: &Path, dst: &Mirror<'_>, opts: &Options) -> Result<Report, VerifyError> {
    let s = Root::open(src).map_err(|source| VerifyError::Root {
        path: src.display().to_string(),
        source,
    })?;
    let v = Verifier {
        s,
        d: dst,
        opts,
        diffs: Mutex::new(Vec::new()),
        entries: AtomicU64::new(1),
        files: AtomicU64::new(0),
        linked: Mutex::new(Vec::new()),
        errors: AtomicU64::new(0),
        hashed: AtomicU64::new(0),
    };
    v.roots()?;
    scan::walk(
        &v.s,
        b"",
        |dir, children| v.source_dir(dir, children),
        |p, e| v.unreadable(p, e),
    );
    Ok(v.report())
}

/// One comparison's state, shared by the walk's workers.
struct Verifier<'o> {
    s: Root,
    d: &'o Mirror<'o>,
    opts: &'o Options,
    diffs: Mutex<Vec<Difference>>,
    /// Entries compared (the root included).
    entries: AtomicU64,
    /// Of those, entries other than directories.
    files: AtomicU64,
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
    fn roots(&self) -> Result<(), VerifyError> {
        match (self.s.lstat(b""), self.d.root_meta()) {
            (Ok(Some(a)), Ok(Some(b))) => {
                if let Some(w) = compare_meta(&a, &b, self.opts.owner) {
                    self.push(b"", format!("differs({w})"));
                }
                Ok(())
            }
            (a, b) => Err(VerifyError::Root {
                path: if a.is_err() {
                    self.s.path().display().to_string()
                } else {
                    self.d.describe()
                },
                source: a
                    .err()
                    .or(b.err())
                    .unwrap_or_else(|| io::Error::other("not found")),
            }),
        }
    }

    /// A source directory's `children` against the listing of its mirror:
    /// what is missing, differs or is extra there.
    fn source_dir(&self, dir: &[u8], children: &mut [scan::Child]) {
        let opts = self.opts;
        let listed = match self.d.list(dir, opts.keep.namespaces()) {
            Ok(l) => l.unwrap_or_default(),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.push(dir, format!("unreadable-target({e})"));
                children.iter_mut().for_each(|c| c.descend = false);
                return;
            }
        };
        let mut target: HashMap<&[u8], &Entry> =
            listed.iter().map(|e| (e.name.as_slice(), e)).collect();
        let sdir = self.s.open_dir(dir, false).ok();
        let mut files = Vec::new();
        for c in children.iter_mut() {
            if !opts.keep.mirrors_kind(c.meta.kind)
                || opts.filter.excluded(&c.rel, c.meta.kind == Kind::Dir)
            {
                c.descend = false;
                continue;
            }
            self.entries.fetch_add(1, Ordering::Relaxed);
            if c.meta.kind != Kind::Dir {
                self.files.fetch_add(1, Ordering::Relaxed);
            }
            let Some(t) = target.remove(paths::split(&c.rel).1) else {
                self.push(&c.rel, "missing".into());
                c.descend = false;
                continue;
            };
            if !self.entry(c, t, sdir.as_ref()) {
                c.descend = false;
                continue;
            }
            if opts.checksum && c.meta.kind == Kind::File && c.meta.size == t.meta.size {
                files.push((c.rel.clone(), c.meta.size));
            }
        }
        // The source lacks these, or holds them as a kind not mirrored.
        for t in target.values() {
            let rel = paths::join(dir, &t.name);
            if !opts.filter.excluded(&rel, t.meta.kind == Kind::Dir) {
                self.push(&rel, "extra".into());
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

    /// Source entry `c` against its mirror `t` (`sdir`: the source
    /// directory), content aside; false when they differ in type (nothing
    /// more to compare there).
    fn entry(&self, c: &scan::Child, t: &Entry, sdir: Option<&std::os::fd::OwnedFd>) -> bool {
        let opts = self.opts;
        let name = paths::split(&c.rel).1;
        if let Some(w) = compare_meta(&c.meta, &t.meta, opts.owner) {
            self.push(&c.rel, format!("differs({w})"));
            if w == "type" {
                return false;
            }
        }
        if let Some(sd) = sdir.map(|d| d.as_fd()) {
            self.attributes(c, t, sd);
            if opts.keep.sparse
                && c.meta.kind == Kind::File
                && c.meta.size >= SPARSE_SLACK
                && allocated(sd, &c.rel)
                    .zip(self.d.allocated(&c.rel))
                    .is_some_and(|(s, t)| t > s + SPARSE_SLACK)
            {
                self.push(&c.rel, "differs(sparse)".into());
            }
        }
        if opts.keep.hard_links
            && c.meta.kind != Kind::Dir
            && (c.meta.nlink > 1 || t.meta.nlink > 1)
        {
            crate::locks::lock(&self.linked).push((
                (c.meta.dev, c.meta.ino),
                (t.meta.dev, t.meta.ino),
                c.rel.clone(),
            ));
        }
        if c.meta.kind == Kind::Symlink {
            let name_link = sdir.and_then(|sd| fsops::read_link_at(sd.as_fd(), name).ok());
            if name_link != t.link {
                self.push(&c.rel, "differs(symlink)".into());
            }
        }
        true
    }

    /// Extended attributes and ACLs of source entry `c` (in directory `sd`)
    /// against those listed with its mirror `t`.
    fn attributes(&self, c: &scan::Child, t: &Entry, sd: std::os::fd::BorrowedFd<'_>) {
        let ns = self.opts.keep.namespaces();
        if ns == 0 {
            return;
        }
        let name = paths::split(&c.rel).1;
        let ours = match fidelity::read(Handle::At(sd, name), ns) {
            Ok(x) => x,
            Err(e) => return self.unreadable(&c.rel, &e),
        };
        match &t.xattrs {
            Some(theirs) => xattr_differences(&ours, theirs)
                .into_iter()
                .for_each(|k| self.push(&c.rel, format!("differs({k})"))),
            None => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.push(&c.rel, "unreadable-target(its extended attributes)".into());
            }
        }
    }

    /// Checksums `files` on both sides, in parallel.
    fn hash(&self, files: &[(Vec<u8>, u64)]) {
        files.par_iter().for_each(
            |(rel, _)| match (hash_file(&self.s, rel), self.d.hash(rel)) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(_), Ok(_)) => self.push(rel, "differs(content)".into()),
                (Err(e), _) | (_, Err(e)) => self.unreadable(rel, &e),
            },
        );
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
            files: self.files.load(Ordering::Relaxed),
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
