//! What a faithful copy keeps beyond content and [`Meta`](crate::meta::Meta),
//! as `rsync -aXAS -D` does: extended attributes (POSIX ACLs are the
//! `system.posix_acl_*` ones), the holes of sparse files, and FIFOs,
//! sockets' entries and devices; and, per target, what its filesystem or
//! privileges refused.
//!
//! Invariants:
//! - An entry's attributes are made *equal* to the source's within the
//!   namespaces kept ([`Xattrs::ns`]): what the target holds beyond them in
//!   those namespaces is removed (an inherited default ACL, a stale label),
//!   what lies outside them is left alone.
//! - Extended attributes are set after the owner and the mode (`chown`
//!   clears `security.capability`; setting an access ACL sets the mode's
//!   group bits from the ACL, which the source's own ACL and mode agree
//!   on) and before the mtime (setting one touches only the ctime).
//! - A refusal of the target (a namespace its filesystem does not support,
//!   a device a non-root writer may not make) is never an error of the
//!   entry: the rest is mirrored, the refusal is warned once per target
//!   and kind and counted in `drmirror_unsupported_total{target,kind}`. A
//!   refusal retried would be refused forever.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use rustix::fs::{SeekFrom, XattrFlags};
use serde::{Deserialize, Serialize};

/// The kinds a target refused for one entry (see [`Refusals`]).
pub type Refused = Vec<&'static str>;

/// Namespace bits of [`Xattrs::ns`].
pub mod ns {
    pub const USER: u8 = 1;
    pub const TRUSTED: u8 = 2;
    pub const SECURITY: u8 = 4;
    /// `system.posix_acl_access` and `system.posix_acl_default`.
    pub const ACL: u8 = 8;
}

/// What a target keeps beyond content, owner, mode and mtime (the config's
/// `xattrs`, `acls`, `sparse`, `special_files` and `hard_links`, all on
/// by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    pub xattrs: bool,
    pub acls: bool,
    pub sparse: bool,
    pub specials: bool,
    /// Names of one source inode share one inode on the target (see
    /// [`crate::links`]).
    pub hard_links: bool,
    /// The writing side is root: `trusted.*` and `security.*` are read and
    /// written, devices made.
    pub privileged: bool,
}

impl Keep {
    /// Everything, with the privileges of this process.
    pub fn all() -> Keep {
        Keep {
            xattrs: true,
            acls: true,
            sparse: true,
            specials: true,
            hard_links: true,
            privileged: rustix::process::geteuid().is_root(),
        }
    }

    /// The attributes of `h` in the namespaces kept; `None` when none are
    /// (nothing read).
    pub fn read(self, h: Handle<'_>) -> io::Result<Option<Xattrs>> {
        match self.namespaces() {
            0 => Ok(None),
            ns => read(h, ns).map(Some),
        }
    }

    /// [`Keep::read`] of entry `rel` of `root` (see [`read_at`]).
    pub fn read_at(self, root: &crate::fsops::Root, rel: &[u8]) -> io::Result<Option<Xattrs>> {
        match self.namespaces() {
            0 => Ok(None),
            ns => read_at(root, rel, ns).map(Some),
        }
    }

    /// Whether entries of `kind` are mirrored (the FIFOs, sockets' entries
    /// and devices only with `specials`; what [`crate::meta::Kind::Other`]
    /// stands for never).
    pub fn mirrors_kind(self, kind: crate::meta::Kind) -> bool {
        kind != crate::meta::Kind::Other && (self.specials || !kind.is_special())
    }

    /// The namespaces whose attributes are mirrored (0: none).
    pub fn namespaces(self) -> u8 {
        let mut n = 0;
        if self.xattrs {
            n |= ns::USER;
            if self.privileged {
                n |= ns::TRUSTED | ns::SECURITY;
            }
        }
        if self.acls {
            n |= ns::ACL;
        }
        n
    }
}

/// The namespace bit of attribute `name`; `None` for one never mirrored
/// (`system.*` other than the POSIX ACLs: NFSv4 ACLs, for one, are a view
/// of the NFS server's ACL that a local filesystem cannot hold).
fn ns_of(name: &[u8]) -> Option<u8> {
    if name == crate::target::identity::XATTR.as_bytes() {
        // A target's mark (see `target::identity`): the target's own, never
        // copied from a source (one that was a target before, after a
        // failover) nor removed as an extra.
        None
    } else if name.starts_with(b"user.") {
        Some(ns::USER)
    } else if name.starts_with(b"trusted.") {
        Some(ns::TRUSTED)
    } else if name.starts_with(b"security.") {
        Some(ns::SECURITY)
    } else if name == b"system.posix_acl_access" || name == b"system.posix_acl_default" {
        Some(ns::ACL)
    } else {
        None
    }
}

/// The label under which a refusal of `name`'s namespace is counted.
fn refusal_kind(name: &[u8]) -> &'static str {
    match ns_of(name) {
        Some(ns::USER) => "xattr_user",
        Some(ns::TRUSTED) => "xattr_trusted",
        Some(ns::SECURITY) => "xattr_security",
        _ => "acl",
    }
}

/// One extended attribute.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// An entry's extended attributes in the namespaces `ns`, sorted by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Xattrs {
    pub ns: u8,
    pub list: Vec<Xattr>,
}

/// An entry whose attributes are read or written: an open file, or a name
/// in an open directory (a symlink, a FIFO, anything not to be opened).
#[derive(Clone, Copy)]
pub enum Handle<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a [u8]),
}

/// `/proc/self/fd/DIR/NAME`: the `l*xattr` calls take a path, and this one
/// resolves `NAME` in the directory already open without following it
/// (there is no `*xattrat` before Linux 6.13).
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    CString::new(p).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Whether `e` says the filesystem has no extended attributes at all (or
/// none for this kind of entry): as good as an empty list.
fn unsupported(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::NOTSUP || e == rustix::io::Errno::OPNOTSUPP
}

/// Calls `f` with a buffer until it is large enough (an attribute can grow
/// between the size query and the read: ERANGE, then again). The first try
/// is on the stack: most entries have no attributes at all, and an initial
/// sync asks for every file's (an allocation each was measurable).
fn grow<F>(mut f: F) -> rustix::io::Result<Vec<u8>>
where
    F: FnMut(&mut [u8]) -> rustix::io::Result<usize>,
{
    let mut first = [0u8; 256];
    match f(&mut first) {
        Ok(n) => return Ok(first[..n].to_vec()),
        Err(rustix::io::Errno::RANGE) => {}
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; 1024];
    loop {
        match f(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < (1 << 21) => {
                let len = buf.len() * 4;
                buf.resize(len, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

impl Handle<'_> {
    fn list(self) -> rustix::io::Result<Vec<u8>> {
        match self {
            Handle::Fd(fd) => grow(|b| rustix::fs::flistxattr(fd, b)),
            Handle::At(d, n) => {
                let p = proc_path(d, n).map_err(|_| rustix::io::Errno::INVAL)?;
                grow(|b| rustix::fs::llistxattr(&p, b))
            }
        }
    }

    fn get(self, name: &CString) -> rustix::io::Result<Vec<u8>> {
        match self {
            Handle::Fd(fd) => grow(|b| rustix::fs::fgetxattr(fd, name, b)),
            Handle::At(d, n) => {
                let p = proc_path(d, n).map_err(|_| rustix::io::Errno::INVAL)?;
                grow(|b| rustix::fs::lgetxattr(&p, name, b))
            }
        }
    }

    fn set(self, name: &CString, value: &[u8]) -> rustix::io::Result<()> {
        match self {
            Handle::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            Handle::At(d, n) => {
                let p = proc_path(d, n).map_err(|_| rustix::io::Errno::INVAL)?;
                rustix::fs::lsetxattr(&p, name, value, XattrFlags::empty())
            }
        }
    }

    fn remove(self, name: &CString) -> rustix::io::Result<()> {
        match self {
            Handle::Fd(fd) => rustix::fs::fremovexattr(fd, name),
            Handle::At(d, n) => {
                let p = proc_path(d, n).map_err(|_| rustix::io::Errno::INVAL)?;
                rustix::fs::lremovexattr(&p, name)
            }
        }
    }
}

/// Reads the attributes of `h` in namespaces `ns`. A filesystem without
/// extended attributes has none; `ns == 0` costs nothing.
pub fn read(h: Handle<'_>, ns: u8) -> io::Result<Xattrs> {
    let mut out = Xattrs {
        ns,
        list: Vec::new(),
    };
    if ns == 0 {
        return Ok(out);
    }
    let names = match h.list() {
        Ok(n) => n,
        Err(e) if unsupported(e) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if ns_of(name).is_none_or(|b| b & ns == 0) {
            continue;
        }
        let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        match h.get(&c) {
            Ok(value) => out.list.push(Xattr {
                name: name.to_vec(),
                value,
            }),
            // Removed between the list and the read.
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.list.sort();
    Ok(out)
}

/// [`read`] of entry `rel` of `root` (the root itself when empty).
pub fn read_at(root: &crate::fsops::Root, rel: &[u8], ns: u8) -> io::Result<Xattrs> {
    if rel.is_empty() {
        return read(Handle::At(root.fd(), b""), ns);
    }
    let (parent, name) = crate::paths::split(rel);
    let dir = root.open_dir(parent, false)?;
    read(Handle::At(std::os::fd::AsFd::as_fd(&dir), name), ns)
}

/// Makes the attributes of `h` in `want.ns` equal to `want.list`. Returns
/// the kinds the target refused (see the module doc); any other failure
/// is an error of the entry.
pub fn apply(h: Handle<'_>, want: &Xattrs) -> io::Result<Vec<&'static str>> {
    let mut refused = Vec::new();
    if want.ns == 0 {
        return Ok(refused);
    }
    let have = read(h, want.ns)?;
    if have.list == want.list {
        return Ok(refused);
    }
    let c = |n: &[u8]| CString::new(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    for x in &have.list {
        if want.list.binary_search_by(|w| w.name.cmp(&x.name)).is_err() {
            match h.remove(&c(&x.name)?) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    for x in &want.list {
        let same = have
            .list
            .binary_search_by(|h| h.name.cmp(&x.name))
            .is_ok_and(|i| have.list[i].value == x.value);
        if same {
            continue;
        }
        match h.set(&c(&x.name)?, &x.value) {
            Ok(()) => {}
            Err(e)
                if unsupported(e)
                    || e == rustix::io::Errno::PERM
                    || e == rustix::io::Errno::ACCESS =>
            {
                let k = refusal_kind(&x.name);
                if !refused.contains(&k) {
                    refused.push(k);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(refused)
}

/// Whether a file of this size and allocation has holes worth keeping
/// (`st_blocks` counts 512-byte units whatever the block size).
pub fn looks_sparse(size: u64, blocks: u64) -> bool {
    size > 0 && blocks.saturating_mul(512) < size
}

/// The data extents (offset, length) of `fd` up to `size`, by
/// `SEEK_DATA`/`SEEK_HOLE`; a filesystem that does not report holes gives
/// one extent, the whole file.
pub fn data_extents(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let start = match rustix::fs::seek(fd, SeekFrom::Data(off)) {
            Ok(s) => s,
            // No data from `off` on: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) if off == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(fd, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        out.push((start, end - start));
        off = end;
    }
    Ok(out)
}

/// What one target refused: warned once per kind, counted every time.
pub struct Refusals {
    target: String,
    warned: Mutex<BTreeSet<&'static str>>,
}

/// Every kind [`Refusals`] counts, for a refusal reported by a receiver.
pub const KINDS: [&str; 5] = [
    "xattr_user",
    "xattr_trusted",
    "xattr_security",
    "acl",
    "device",
];

impl Refusals {
    pub fn new(target: &str) -> Refusals {
        Refusals {
            target: target.to_string(),
            warned: Mutex::new(BTreeSet::new()),
        }
    }

    /// `kind` was refused for `path`.
    pub fn note(&self, kind: &str, path: &str) {
        let Some(kind) = KINDS.iter().copied().find(|k| *k == kind) else {
            return;
        };
        metrics::counter!("drmirror_unsupported_total", "target" => self.target.clone(), "kind" => kind)
            .increment(1);
        if crate::locks::lock(&self.warned).insert(kind) {
            tracing::warn!(
                "target {}: {} not kept (first: {path}): {}; the rest is mirrored, and further refusals are counted in drmirror_unsupported_total without a warning",
                self.target,
                describe(kind),
                why(kind)
            );
        }
    }

    /// The kinds refused so far (for `status`).
    pub fn seen(&self) -> Vec<&'static str> {
        crate::locks::lock(&self.warned).iter().copied().collect()
    }

    /// Whether making devices was refused.
    pub fn devices(&self) -> bool {
        crate::locks::lock(&self.warned).contains("device")
    }
}

fn describe(kind: &str) -> &'static str {
    match kind {
        "xattr_user" => "user.* extended attributes",
        "xattr_trusted" => "trusted.* extended attributes",
        "xattr_security" => "security.* extended attributes (labels, capabilities)",
        "acl" => "POSIX ACLs",
        _ => "devices",
    }
}

fn why(kind: &str) -> &'static str {
    match kind {
        "device" => "making a device needs root on the writing side",
        "xattr_trusted" | "xattr_security" => {
            "the target's filesystem does not support them, or the writing side is not root"
        }
        _ => "the target's filesystem does not support them",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_keep_and_privilege() {
        let k = Keep {
            xattrs: true,
            acls: true,
            sparse: true,
            specials: true,
            hard_links: true,
            privileged: false,
        };
        assert_eq!(k.namespaces(), ns::USER | ns::ACL);
        let root = Keep {
            privileged: true,
            ..k
        };
        assert_eq!(
            root.namespaces(),
            ns::USER | ns::TRUSTED | ns::SECURITY | ns::ACL
        );
        assert_eq!(
            Keep {
                xattrs: false,
                acls: false,
                ..root
            }
            .namespaces(),
            0
        );
        assert_eq!(ns_of(b"system.nfs4_acl"), None);
        assert_eq!(ns_of(b"system.posix_acl_default"), Some(ns::ACL));
    }

    #[test]
    fn extents_of_a_sparse_file() {
        use std::io::{Seek, Write};
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(dir.path().join("s")).unwrap();
        f.seek(std::io::SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.set_len(32 << 20).unwrap();
        let ext = data_extents(f.as_fd(), 32 << 20).unwrap();
        // A filesystem without hole reporting shows one extent, the file.
        if ext.len() == 1 && ext[0] == (0, 32 << 20) {
            return;
        }
        assert_eq!(ext.len(), 1, "{ext:?}");
        assert!(ext[0].0 <= 8 << 20 && ext[0].0 + ext[0].1 >= (8 << 20) + 4096);
        assert!(ext[0].1 < 1 << 20, "{ext:?}");
    }
}
