//! fanotify backend: one `FAN_MARK_FILESYSTEM` mark per filesystem under
//! the source, whatever the number of directories.
//!
//! Setup is O(1) in the tree size: no walk, no per-directory watch. Events
//! carry the parent directory's file handle and the entry's name
//! (`FAN_REPORT_DFID_NAME`) plus the object's own handle (`FAN_REPORT_FID`).
//! A handle is turned into a path through an in-memory map of directory
//! handles, learnt from the events themselves (a `mkdir` reports the new
//! directory's handle) and, for directories that existed before the start,
//! once per directory with `open_by_handle_at` + `readlink(/proc/self/fd/N)`.
//! The mark covers the whole filesystem, so events outside the source (the
//! state dir, a target on the same disk, anything else) are dropped here,
//! counted, and never turn into work: no feedback loop.
//!
//! Renames use `FAN_RENAME` (Linux ≥ 5.17), which the kernel reports as one
//! event with both the old and the new parent + name: the pairing that
//! inotify leaves to cookies (and that can fall between two reads) is done by
//! the kernel. A directory rename rewrites the cached paths of its subtree in
//! memory, without a syscall or a rescan.
//!
//! The map of directory handles inside the source is also written to the
//! journal's `dirs` column family. It is only trusted across restarts when
//! the capture descriptor itself survived (the restart issue's FD-store
//! handover); after any other start it is cleared, since directories may
//! have moved while nobody was watching.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fanotify::low_level as fan;

use super::fid::{self, consts::*, Fid};
use super::{Event, WatchError, Watcher};
use crate::filter::Filter;
use crate::journal::{flags, Journal};
use crate::paths;

const MASK: u64 = fan::FAN_CREATE
    | fan::FAN_DELETE
    | fan::FAN_MODIFY
    | fan::FAN_CLOSE_WRITE
    | fan::FAN_ATTRIB
    | FAN_RENAME
    | fan::FAN_DELETE_SELF
    | fan::FAN_MOVE_SELF
    | FAN_ONDIR;

/// Past this many cached directory handles the cache is dropped and
/// rebuilt lazily: a busy filesystem outside the source must not grow the
/// daemon's memory without bound.
const CACHE_LIMIT: usize = 1_000_000;

/// A filesystem mounted at or below the source.
#[derive(Debug, Clone)]
pub struct Mount {
    pub point: PathBuf,
    pub fstype: String,
}

/// The mounts whose mount point is `source` or below it, from a
/// `/proc/self/mountinfo` text.
pub fn mounts_under(mountinfo: &str, source: &[u8]) -> Vec<Mount> {
    let source = std::path::Path::new(std::ffi::OsStr::from_bytes(source));
    crate::mounts::parse(mountinfo.as_bytes())
        .into_iter()
        .filter(|m| m.point.starts_with(source))
        .map(|m| Mount {
            point: m.point,
            fstype: m.fstype,
        })
        .collect()
}

pub(super) fn fsid_of(fd: impl AsFd) -> io::Result<[u8; 8]> {
    let st = rustix::fs::fstatfs(fd)?;
    // SAFETY: `Fsid` is `#[repr(C)] struct { int val[2]; }`, 8 bytes of
    // plain integers with no padding or invalid bit patterns; its field is
    // private, and transmute checks the sizes at compile time.
    Ok(unsafe { std::mem::transmute::<rustix::fs::Fsid, [u8; 8]>(st.f_fsid) })
}

/// The handle of the directory open at `fd`, as a [`Fid::key`].
fn handle_key(fd: impl AsFd, fsid: [u8; 8]) -> io::Result<Vec<u8>> {
    const MAX_HANDLE_SZ: usize = 128;
    // `struct file_handle` is 8 bytes of header then the handle: a u64
    // buffer keeps the header aligned.
    let mut buf = vec![0u64; (8 + MAX_HANDLE_SZ) / 8];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `fh` points to a zeroed, 8-aligned buffer of 8 + MAX_HANDLE_SZ
    // bytes; handle_bytes is set to the room left after the header, so the
    // kernel writes within it. The path is an empty C string used with
    // AT_EMPTY_PATH on a valid fd.
    let rc = unsafe {
        (*fh).handle_bytes = MAX_HANDLE_SZ as u32;
        libc::name_to_handle_at(
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            fh,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let n = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let htype = i32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    Ok(Fid {
        fsid,
        handle_type: htype,
        handle: &bytes[8..8 + n.min(MAX_HANDLE_SZ)],
    }
    .key())
}

/// Opens the object a handle names (O_PATH: no permission to read it is
/// needed, only CAP_DAC_READ_SEARCH).
fn open_by_handle(mount: &OwnedFd, f: &Fid<'_>) -> io::Result<OwnedFd> {
    let mut raw = Vec::with_capacity(8 + f.handle.len());
    raw.extend_from_slice(&(f.handle.len() as u32).to_ne_bytes());
    raw.extend_from_slice(&f.handle_type.to_ne_bytes());
    raw.extend_from_slice(f.handle);
    let mut buf = vec![0u64; raw.len().div_ceil(8)];
    for (w, chunk) in buf.iter_mut().zip(raw.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    // SAFETY: `buf` holds a complete, 8-aligned `struct file_handle` whose
    // handle_bytes matches the bytes that follow; the kernel only reads it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_by_handle_at returned a new descriptor that nothing else
    // owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Why fanotify cannot serve this source, in one line.
fn mark_error(point: &Path, fstype: &str, e: io::Error) -> WatchError {
    let reason = match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) => format!(
            "the {fstype} filesystem at {} cannot encode file handles ({e})",
            point.display()
        ),
        Some(libc::EPERM) => {
            "fanotify filesystem marks need CAP_SYS_ADMIN (run as root)".to_string()
        }
        Some(libc::EINVAL) => format!(
            "the kernel refused the mark on {} ({e}); FAN_RENAME needs Linux 5.17 or later",
            point.display()
        ),
        _ => format!("cannot mark {} ({fstype}): {e}", point.display()),
    };
    WatchError::Unsupported(reason)
}

pub struct FanotifyWatcher {
    fd: OwnedFd,
    source: PathBuf,
    source_abs: Vec<u8>,
    filter: Arc<Filter>,
    journal: Arc<Journal>,
    /// An fd on each marked filesystem, to resolve its handles with.
    mounts: HashMap<[u8; 8], OwnedFd>,
    root_key: Vec<u8>,
    /// Directory handle key -> absolute path, and the reverse for renames.
    cache: HashMap<Vec<u8>, Vec<u8>>,
    by_path: BTreeMap<Vec<u8>, Vec<u8>>,
    buf: Vec<u8>,
    /// Handle map changes inside the source, written to `dirs` per poll.
    dirs_put: Vec<(Vec<u8>, Vec<u8>)>,
    dirs_del: Vec<Vec<u8>>,
    /// The persisted map must be dropped before the next write (the cache
    /// was, after an overflow: renames may have been lost).
    dirs_reset: bool,
    marks: usize,
    /// Bind mounts under the source of directories of a filesystem already
    /// marked (see [`Alias`]).
    aliases: Vec<Alias>,
    /// Per marked filesystem, the mountinfo entry its handles resolve
    /// through (that of its first point).
    first: HashMap<[u8; 8], crate::mounts::Mount>,
    /// The mounts under the source, followed while running.
    table: Option<crate::mounts::MountTable>,
    /// Mounts added or removed under the source, not yet acted on.
    mounts_pending: Option<crate::mounts::MountChanges>,
    /// Mount points under the source that could not be marked, and why;
    /// whether that list changed since `status` was told.
    uncaptured: BTreeMap<PathBuf, String>,
    uncaptured_changed: bool,
    /// Ignore marks on directories outside the source (see
    /// [`super::foreign`]).
    foreign: super::foreign::Foreign,
    /// Where the objects renamed since the queue was last empty should be
    /// (see [`super::renamed`]).
    renamed: super::renamed::Renamed,
}

/// A bind mount under the source of a directory of a filesystem the source
/// (or an earlier mount under it) is on. Its events carry handles that
/// resolve, through the first mount of that filesystem, to the directory's
/// own path (`origin`), which may lie outside the source: they are
/// translated to the bind's mount point (`point`) instead of being dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub origin: Vec<u8>,
    pub point: Vec<u8>,
}

/// The mountinfo entry of the mount `path` is on: the one with the longest
/// mount point above it (the last of equals: the one mounted on top).
fn mount_of<'m>(
    mounts: &'m [crate::mounts::Mount],
    path: &Path,
) -> Option<&'m crate::mounts::Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())
}

/// The alias of bind mount `bind` whose filesystem's first mount under the
/// source is `first` (both from mountinfo): where the bind's root appears
/// through `first`. None when the bind shows a directory `first` does not.
pub fn alias_of(first: &crate::mounts::Mount, bind: &crate::mounts::Mount) -> Option<Alias> {
    let inner = bind.root.strip_prefix(&first.root).ok()?;
    let origin = if inner.as_os_str().is_empty() {
        first.point.clone()
    } else {
        first.point.join(inner)
    };
    (origin != bind.point).then(|| Alias {
        origin: origin.into_os_string().into_vec(),
        point: bind.point.clone().into_os_string().into_vec(),
    })
}

impl FanotifyWatcher {
    /// Initialises the group and marks every filesystem under `source`.
    pub fn start(
        source: &Path,
        filter: Arc<Filter>,
        journal: Arc<Journal>,
    ) -> Result<Self, WatchError> {
        let init_flags = fan::FAN_CLASS_NOTIF
            | fan::FAN_CLOEXEC
            | fan::FAN_NONBLOCK
            | FAN_REPORT_DFID_NAME
            | fan::FAN_REPORT_FID;
        let raw = fan::fanotify_init(init_flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32)
            .map_err(|e| {
                WatchError::Unsupported(match e.raw_os_error() {
                    Some(libc::EPERM) => "fanotify needs CAP_SYS_ADMIN (run as root)".into(),
                    Some(libc::EINVAL) => format!(
                        "the kernel does not support FAN_REPORT_DFID_NAME (Linux 5.9 or later): {e}"
                    ),
                    _ => format!("fanotify_init: {e}"),
                })
            })?;
        // SAFETY: fanotify_init returned a new descriptor owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Self::setup(fd, source, filter, journal, true)
    }

    /// Takes over a group an earlier run created and left in the service
    /// manager's fd store: its marks and its queue of unread events are
    /// intact, so nothing that happened in between is missed. The handle map
    /// persisted by that run matches the queue unless it died in the middle
    /// of a read (`trust_map` false: then renames it had taken off the
    /// queue may be missing from the map, which is dropped and rebuilt).
    pub fn adopt(
        fd: OwnedFd,
        source: &Path,
        filter: Arc<Filter>,
        journal: Arc<Journal>,
        trust_map: bool,
    ) -> Result<Self, WatchError> {
        let mut w = Self::setup(fd, source, filter, journal, false)?;
        if !trust_map {
            w.forget_all();
            w.persist()?;
        }
        Ok(w)
    }

    fn setup(
        fd: OwnedFd,
        source: &Path,
        filter: Arc<Filter>,
        journal: Arc<Journal>,
        mark: bool,
    ) -> Result<Self, WatchError> {
        let source = std::fs::canonicalize(source).map_err(|e| WatchError::Add {
            path: source.display().to_string(),
            source: e,
        })?;
        let source_abs = source.as_os_str().as_bytes().to_vec();
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| WatchError::Add {
                path: "/proc/self/mountinfo".into(),
                source: e,
            })?;
        let root_fd = rustix::fs::open(
            &source,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| WatchError::Add {
            path: source.display().to_string(),
            source: e.into(),
        })?;
        let root_fsid = fsid_of(&root_fd).map_err(|e| mark_error(&source, "source", e))?;
        let root_key =
            handle_key(&root_fd, root_fsid).map_err(|e| mark_error(&source, "source", e))?;
        let table = match crate::mounts::MountTable::open(&source) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("cannot follow the mount table (/proc/self/mountinfo): {e}; filesystems mounted under the source while drmirror runs will not be captured");
                None
            }
        };
        let mut w = FanotifyWatcher {
            fd,
            source: source.clone(),
            source_abs: source_abs.clone(),
            filter,
            journal,
            mounts: HashMap::new(),
            first: HashMap::new(),
            root_key: root_key.clone(),
            cache: HashMap::new(),
            by_path: BTreeMap::new(),
            buf: vec![0u8; 256 * 1024],
            dirs_put: Vec::new(),
            dirs_del: Vec::new(),
            dirs_reset: false,
            marks: 0,
            aliases: Vec::new(),
            table,
            mounts_pending: None,
            uncaptured: BTreeMap::new(),
            uncaptured_changed: false,
            foreign: super::foreign::Foreign::default(),
            renamed: super::renamed::Renamed::default(),
        };
        let table = crate::mounts::parse(mountinfo.as_bytes());
        w.add_point(&source, "source", &table, mark)?;
        for m in mounts_under(&mountinfo, &source_abs) {
            // Over-mounted or gone since the mount table was read.
            match w.add_point(&m.point, &m.fstype, &table, mark) {
                Err(WatchError::Add { .. }) => {}
                r => r?,
            }
        }
        if !w.aliases.is_empty() {
            tracing::info!(
                "fanotify: {} bind mount(s) under the source show directories of a marked filesystem: {}",
                w.aliases.len(),
                w.aliases
                    .iter()
                    .map(|a| format!("{} at {}", String::from_utf8_lossy(&a.origin), String::from_utf8_lossy(&a.point)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if mark {
            w.journal.dirs_reset(b"fanotify")?;
        } else if w.journal.dirs_backend()?.as_deref() == Some(b"fanotify".as_slice()) {
            for (k, rel) in w.journal.dirs_entries()? {
                let abs = paths::under(&w.source, &rel).into_os_string().into_vec();
                w.by_path.insert(abs.clone(), k.clone());
                w.cache.insert(k, abs);
            }
        }
        let abs = w.source_abs.clone();
        w.learn(root_key, abs);
        w.persist()?;
        Ok(w)
    }

    /// Marks the filesystem shown at `point` (the source, or a mount under
    /// it), unless it is marked already; a bind mount of a directory of a
    /// marked filesystem becomes an [`Alias`] instead. An excluded point
    /// needs nothing.
    fn add_point(
        &mut self,
        point: &Path,
        fstype: &str,
        table: &[crate::mounts::Mount],
        mark: bool,
    ) -> Result<(), WatchError> {
        let rel = point
            .as_os_str()
            .as_bytes()
            .strip_prefix(self.source_abs.as_slice());
        if let Some(rel) = rel.and_then(|r| r.strip_prefix(b"/")) {
            if self.filter.excluded(rel, true) {
                return Ok(());
            }
        }
        // Not O_PATH: open_by_handle_at refuses such a mount fd (EBADF).
        let dir = rustix::fs::open(
            point,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| WatchError::Add {
            path: point.display().to_string(),
            source: e.into(),
        })?;
        let fsid = fsid_of(&dir).map_err(|e| mark_error(point, fstype, e))?;
        let entry = mount_of(table, point).cloned();
        if self.mounts.contains_key(&fsid) {
            if let (Some(f), Some(b)) = (self.first.get(&fsid), &entry) {
                if b.point == point {
                    self.aliases.extend(alias_of(f, b));
                }
            }
            return Ok(());
        }
        if mark {
            fan::fanotify_mark(
                self.fd.as_raw_fd(),
                fan::FAN_MARK_ADD | fan::FAN_MARK_FILESYSTEM,
                MASK,
                fan::AT_FDCWD,
                point,
            )
            .map_err(|e| mark_error(point, fstype, e))?;
        }
        if let Some(e) = entry {
            self.first.insert(fsid, e);
        }
        self.mounts.insert(fsid, dir);
        self.marks = self.mounts.len();
        Ok(())
    }

    /// Mounts added or removed under the source while running: a new
    /// filesystem is marked, a bind of a marked one becomes an alias, and
    /// each mount point is compared with the target again (what it shows
    /// changed all at once, without an event).
    fn on_mounts(&mut self, out: &mut Vec<Event>) -> Result<(), WatchError> {
        let Some(c) = self.mounts_pending.take() else {
            return Ok(());
        };
        let table = crate::mounts::current();
        if !c.added.is_empty() {
            // What a new mount shows may be a directory marked as foreign.
            self.foreign.flush(self.fd.as_fd());
        }
        for m in &c.removed {
            let point = m.point.as_os_str().as_bytes();
            self.aliases.retain(|a| a.point != point);
            self.uncaptured_changed |= self.uncaptured.remove(&m.point).is_some();
        }
        for m in &c.added {
            if let Err(e) = self.add_point(&m.point, &m.fstype, &table, true) {
                self.uncaptured.insert(m.point.clone(), e.to_string());
                self.uncaptured_changed = true;
                tracing::warn!(
                    "fanotify: cannot capture changes under {} (mounted under the source while running): {e}; it is compared now, but its later changes are not mirrored until drmirror restarts with `watch = \"inotify\"`",
                    m.point.display()
                );
            }
        }
        super::mount_events(&self.filter, &self.source_abs, &c, out);
        Ok(())
    }

    /// The path of `abs` relative to the source, if it is inside.
    fn rel<'p>(&self, abs: &'p [u8]) -> Option<&'p [u8]> {
        let s = &self.source_abs;
        if abs == s.as_slice() {
            return Some(&[]);
        }
        let rest = abs.strip_prefix(s.as_slice())?;
        if s.as_slice() == b"/" {
            return Some(rest);
        }
        rest.strip_prefix(b"/")
    }

    /// The path relative to the source of `abs` as an event names it:
    /// inside the source, or inside the origin of a bind mount under it
    /// (translated to the bind's mount point).
    fn rel_of(&self, abs: &[u8]) -> Option<Vec<u8>> {
        if let Some(r) = self.rel(abs) {
            return Some(r.to_vec());
        }
        self.aliases.iter().find_map(|a| {
            let rest = abs.strip_prefix(a.origin.as_slice())?;
            if !(rest.is_empty() || rest.starts_with(b"/")) {
                return None;
            }
            let mut p = a.point.clone();
            p.extend_from_slice(rest);
            self.rel(&p).map(<[u8]>::to_vec)
        })
    }

    fn learn(&mut self, key: Vec<u8>, abs: Vec<u8>) {
        if self.cache.len() >= CACHE_LIMIT {
            self.forget_all();
        }
        if let Some(rel) = self.rel(&abs) {
            self.dirs_put.push((key.clone(), rel.to_vec()));
        }
        // The two maps stay each other's inverse: a path held by another
        // handle (a directory since moved away or deleted) is that handle's
        // no longer, and this handle's old path is dropped only if it still
        // names this handle.
        if let Some(old) = self.cache.insert(key.clone(), abs.clone()) {
            if old != abs && self.by_path.get(&old) == Some(&key) {
                self.by_path.remove(&old);
            }
        }
        if let Some(prev) = self.by_path.insert(abs, key.clone()) {
            if prev != key {
                self.cache.remove(&prev);
                self.dirs_put.retain(|(k, _)| *k != prev);
                self.dirs_del.push(prev);
            }
        }
    }

    fn forget_all(&mut self) {
        self.dirs_reset = true;
        self.dirs_put.clear();
        self.dirs_del.clear();
        let root = self.cache.remove(&self.root_key);
        self.cache.clear();
        self.by_path.clear();
        if let Some(r) = root {
            self.by_path.insert(r.clone(), self.root_key.clone());
            self.cache.insert(self.root_key.clone(), r);
        }
    }

    fn subtree(&self, abs: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.by_path
            .range(abs.to_vec()..)
            .take_while(|(p, _)| p.starts_with(abs))
            .filter(|(p, _)| p.len() == abs.len() || p.get(abs.len()) == Some(&b'/'))
            .map(|(p, k)| (p.clone(), k.clone()))
            .collect()
    }

    fn forget_tree(&mut self, abs: &[u8]) {
        let gone = self.subtree(abs);
        if gone.is_empty() {
            return;
        }
        // Not saved either if learnt since the last save: the journal's
        // watch tree applies its deletions before its additions.
        let keys: std::collections::HashSet<&Vec<u8>> = gone.iter().map(|(_, k)| k).collect();
        self.dirs_put.retain(|(k, _)| !keys.contains(k));
        for (p, k) in gone {
            self.by_path.remove(&p);
            self.cache.remove(&k);
            if self.rel(&p).is_some() {
                self.dirs_del.push(k);
            }
        }
    }

    /// A directory renamed `from` → `to`: both subtrees leave the cache,
    /// and their handles resolve again (`open_by_handle_at`) on their next
    /// event.
    ///
    /// Why not rebase the cached paths, as an inotify watch table does: the
    /// cache does not hold paths of one moment. A handle resolved by
    /// `open_by_handle_at` gets the directory's path *now*, which is ahead
    /// of the events still queued; replaying those events' renames on it
    /// moved it a second time. Directories swapped through a temporary
    /// name (`mv p tmp; mv q p; mv tmp q`), with a create in one of them
    /// resolved mid-way, ended with each directory cached under the other's
    /// name, and every later event in either went to the wrong path: files
    /// missing on the target, old contents kept, nothing logged.
    /// `renameat2(RENAME_EXCHANGE)`, reported as a→b then b→a, did the
    /// same. Forgetting costs one lookup per directory of the moved
    /// subtrees that sees another event, and is right whatever the order.
    fn move_tree(&mut self, from: &[u8], to: &[u8], moved: Option<Vec<u8>>) {
        self.forget_tree(from);
        self.forget_tree(to);
        if let Some(k) = moved {
            // The event's own handle of the moved directory names it as of
            // this event, like the events around it.
            self.learn(k, to.to_vec());
        }
    }

    /// The absolute path of the directory a handle names, if it still exists.
    fn resolve(&mut self, f: &Fid<'_>) -> Option<Vec<u8>> {
        let key = f.key();
        if let Some(p) = self.cache.get(&key) {
            return Some(p.clone());
        }
        let mount = self.mounts.get(&f.fsid)?;
        let fd = match open_by_handle(mount, f) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::trace!(handle = ?f, "cannot open directory by handle: {e}");
                return None;
            }
        };
        // Any depth: past PATH_MAX, by walking up (see `dir_path`).
        let abs = crate::fsops::dir_path(fd.as_fd())?;
        tracing::trace!(path = %String::from_utf8_lossy(&abs), "resolved a directory handle");
        metrics::counter!("drmirror_capture_handle_lookups_total").increment(1);
        self.learn(key, abs.clone());
        Some(abs)
    }

    fn persist(&mut self) -> Result<(), WatchError> {
        if std::mem::take(&mut self.dirs_reset) {
            self.journal.dirs_reset(b"fanotify")?;
            let root = (self.root_key.clone(), Vec::new());
            self.dirs_put.push(root);
        }
        if self.dirs_put.is_empty() && self.dirs_del.is_empty() {
            return Ok(());
        }
        self.journal.dirs_update(
            &std::mem::take(&mut self.dirs_put),
            &std::mem::take(&mut self.dirs_del),
        )?;
        Ok(())
    }

    fn handle(&mut self, ev: fid::RawEvent<'_>, out: &mut Vec<Event>) -> Result<(), WatchError> {
        let m = ev.mask;
        if m & FAN_Q_OVERFLOW != 0 {
            tracing::warn!("fanotify queue overflowed: events were lost, rescanning the source");
            // Renames may be among the lost events: cached paths are suspect.
            self.forget_all();
            out.push(Event::Overflow);
            return Ok(());
        }
        let is_dir = m & FAN_ONDIR != 0;
        tracing::trace!(mask = format_args!("{m:#x}"), ?ev, "fanotify event");
        if m & FAN_RENAME != 0 {
            return self.on_rename(&ev, is_dir, out);
        }
        if m & (fan::FAN_DELETE_SELF | fan::FAN_MOVE_SELF) != 0 {
            if let Some(f) = ev.fid {
                if f.key() == self.root_key {
                    return Err(WatchError::SourceGone(self.source.display().to_string()));
                }
                if is_dir && m & fan::FAN_DELETE_SELF != 0 {
                    if let Some(p) = self.cache.get(&f.key()).cloned() {
                        self.forget_tree(&p);
                    }
                }
            }
            if m & !(fan::FAN_DELETE_SELF | fan::FAN_MOVE_SELF | FAN_ONDIR) == 0 {
                return Ok(());
            }
        }
        let Some((dir, name)) = ev.dfid_name else {
            return Ok(());
        };
        let Some(dir_abs) = self.resolve(&dir) else {
            metrics::counter!("drmirror_capture_dropped_total", "reason" => "stale_handle")
                .increment(1);
            return Ok(());
        };
        let abs = if name == b"." {
            dir_abs
        } else {
            paths::join(&dir_abs, name)
        };
        let Some(rel) = self.rel_of(&abs) else {
            metrics::counter!("drmirror_capture_dropped_total", "reason" => "outside_source")
                .increment(1);
            if m & fan::FAN_DELETE != 0 && is_dir {
                self.forget_tree(&abs);
            }
            self.ignore_foreign(&dir);
            return Ok(());
        };
        if m & fan::FAN_CREATE != 0 {
            if is_dir {
                if let Some(f) = ev.fid {
                    self.learn(f.key(), abs.clone());
                }
            }
            // No RECURSIVE for a new directory: the mark sees everything
            // created inside it, however fast (unlike a new inotify watch).
            super::on_new(&self.filter, rel, is_dir, false, out);
            return Ok(());
        }
        if m & fan::FAN_DELETE != 0 {
            if is_dir {
                self.forget_tree(&abs);
            }
            super::on_gone(&self.filter, rel, is_dir, out);
            return Ok(());
        }
        if !self.filter.excluded(&rel, is_dir) {
            let content = !is_dir && m & (fan::FAN_MODIFY | fan::FAN_CLOSE_WRITE) != 0;
            out.push(Event::Dirty {
                path: rel,
                flags: flags::LIVE | if content { flags::CONTENT } else { 0 },
            });
        }
        Ok(())
    }

    fn on_rename(
        &mut self,
        ev: &fid::RawEvent<'_>,
        is_dir: bool,
        out: &mut Vec<Event>,
    ) -> Result<(), WatchError> {
        let (Some((od, on)), Some((nd, nn))) = (ev.old, ev.new) else {
            return Ok(());
        };
        let from = self.resolve(&od).map(|d| paths::join(&d, on));
        let to = self.resolve(&nd).map(|d| paths::join(&d, nn));
        if let Some(from) = &from {
            if from == &self.source_abs {
                return Err(WatchError::SourceGone(self.source.display().to_string()));
            }
        }
        if is_dir {
            match (&from, &to) {
                (Some(f), Some(t)) => self.move_tree(f, t, ev.fid.map(|x| x.key())),
                (Some(f), None) => self.forget_tree(f),
                (None, Some(t)) => {
                    if let Some(x) = ev.fid {
                        self.learn(x.key(), t.clone());
                    }
                }
                (None, None) => {}
            }
        }
        let from_rel = from.as_deref().and_then(|f| self.rel_of(f));
        let to_rel = to.as_deref().and_then(|t| self.rel_of(t));
        if let (Some(obj), Some(f)) = (ev.fid, &from) {
            let inside = to.as_deref().filter(|_| to_rel.is_some());
            self.renamed.moved(obj.key(), f, inside, is_dir);
        }
        tracing::trace!(?from_rel, ?to_rel, "fanotify rename");
        if is_dir && from_rel.is_none() && to_rel.is_some() {
            // It may hold directories marked as foreign: unmarked before
            // anything inside it is recorded (see `super::foreign`).
            self.foreign.flush(self.fd.as_fd());
        }
        match (from_rel, to_rel) {
            (Some(f), Some(t)) => super::on_rename(&self.filter, f, t, is_dir, out),
            // Moved in from outside: its whole subtree is new to the mirror.
            (None, Some(t)) => super::on_new(&self.filter, t, is_dir, true, out),
            (Some(f), None) => super::on_gone(&self.filter, f, is_dir, out),
            (None, None) => {
                metrics::counter!("drmirror_capture_dropped_total", "reason" => "outside_source")
                    .increment(1)
            }
        }
        Ok(())
    }

    /// Looks up each object renamed since the last check by its handle;
    /// where one is not at the path its events put it, renames were lost
    /// (see [`super::renamed`]): the subtree at that path, and at its real
    /// path when it is found, are compared again.
    fn check_renamed(&mut self, out: &mut Vec<Event>) {
        let mut lost = 0u64;
        for (key, expected) in self.renamed.take() {
            let Some(f) = fid::Fid::from_key(&key) else {
                continue;
            };
            let Some(mount) = self.mounts.get(&f.fsid) else {
                continue;
            };
            // Gone since (deleted): its deletion is an event of its own.
            let Ok(fd) = open_by_handle(mount, &f) else {
                continue;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else {
                continue;
            };
            let here = crate::fsops::lstat_abs(&expected)
                .is_some_and(|t| t.st_ino == st.st_ino && t.st_dev == st.st_dev);
            if here {
                continue;
            }
            lost += 1;
            let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir();
            // The real path of a directory is always known; a file's, when
            // the kernel has its name at hand.
            let real = crate::fsops::dir_path(fd.as_fd())
                .filter(|p| crate::fsops::lstat_abs(p).is_some_and(|t| t.st_ino == st.st_ino));
            if is_dir {
                self.forget_tree(&expected);
                if let Some(r) = &real {
                    self.forget_tree(r);
                    self.learn(key.clone(), r.clone());
                }
            }
            for p in std::iter::once(expected).chain(real) {
                if let Some(rel) = self.rel_of(&p) {
                    super::on_gone(&self.filter, rel, is_dir, out);
                }
            }
        }
        if lost > 0 {
            metrics::counter!("drmirror_capture_dropped_total", "reason" => "merged_rename")
                .increment(lost);
            tracing::info!(
                entries = lost,
                "renamed entries are not where capture's events put them (the kernel merged \
                 renames equal to ones still queued): comparing them again"
            );
        }
    }

    /// After an event from directory `dir` was dropped as outside the
    /// source: marks `dir` so that the kernel drops its next ones, if its
    /// path now is outside too (see [`super::foreign`]).
    fn ignore_foreign(&mut self, dir: &Fid<'_>) {
        if !self.foreign.enabled() {
            return;
        }
        let key = dir.key();
        if self.foreign.seen(&key) {
            return;
        }
        let Some(mount) = self.mounts.get(&dir.fsid) else {
            return;
        };
        let Ok(fd) = open_by_handle(mount, dir) else {
            return;
        };
        let Some(now) = crate::fsops::dir_path(fd.as_fd()) else {
            return;
        };
        if self.rel_of(&now).is_some() {
            return;
        }
        // `now` holds the source or a bind origin (absolute paths).
        let holds = |path: &[u8]| now == b"/" || paths::is_within(path, &now);
        let ancestor = holds(&self.source_abs) || self.aliases.iter().any(|a| holds(&a.origin));
        self.foreign.mark(self.fd.as_fd(), key, &fd, ancestor);
    }

    fn wait_fd(&mut self, timeout: Duration) -> Result<bool, WatchError> {
        super::wait_with_mounts(
            self.fd.as_fd(),
            &mut self.table,
            &mut self.mounts_pending,
            timeout,
        )
    }

    /// Reads what is queued; `false` once the queue is empty.
    fn read_some(&mut self, out: &mut Vec<Event>) -> Result<bool, WatchError> {
        let mut buf = std::mem::take(&mut self.buf);
        let n = match rustix::io::read(&self.fd, &mut buf[..]) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                self.buf = buf;
                return Ok(false);
            }
            Err(e) => {
                self.buf = buf;
                return Err(WatchError::Read(e.into()));
            }
        };
        let mut r = Ok(n > 0);
        for ev in fid::events(&buf[..n]) {
            match ev {
                Ok(ev) => {
                    if let Err(e) = self.handle(ev, out) {
                        r = Err(e);
                        break;
                    }
                }
                Err(e) => {
                    // Unparseable: assume events were lost, rescan.
                    tracing::error!("{e}; rescanning the source");
                    self.forget_all();
                    out.push(Event::Overflow);
                }
            }
        }
        self.buf = buf;
        r
    }
}

impl Watcher for FanotifyWatcher {
    fn backend(&self) -> &'static str {
        "fanotify"
    }

    fn watched(&self) -> usize {
        self.marks
    }

    fn describe(&self) -> String {
        format!(
            "fanotify: {} filesystem mark{} covering {}",
            self.marks,
            if self.marks == 1 { "" } else { "s" },
            self.source.display()
        )
    }

    fn wait(&mut self, timeout: Duration) -> Result<bool, WatchError> {
        self.wait_fd(timeout)
    }

    fn uncaptured(&mut self) -> Option<Vec<String>> {
        std::mem::take(&mut self.uncaptured_changed).then(|| {
            self.uncaptured
                .iter()
                .map(|(p, why)| format!("{} (mounted under the source): {why}", p.display()))
                .collect()
        })
    }

    fn self_ignore(
        &mut self,
        fixed: Vec<PathBuf>,
    ) -> Result<Option<Arc<super::self_ignore::SelfIgnore>>, WatchError> {
        let err = |e: io::Error| WatchError::Add {
            path: fixed
                .first()
                .map_or_else(String::new, |p| p.display().to_string()),
            source: e,
        };
        let fd = self.fd.try_clone().map_err(err)?;
        let fsids = self.mounts.keys().copied().collect();
        let s = super::self_ignore::SelfIgnore::new(fd, fsids, fixed.clone(), MASK)
            .map(Arc::new)
            .map_err(err)?;
        self.foreign.set_self_ignore(s.clone());
        Ok(Some(s))
    }

    fn store_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn read(&mut self, out: &mut Vec<Event>) -> Result<(), WatchError> {
        self.on_mounts(out)?;
        // Bounded, so that the journal write (and so replication) is never
        // held back by a never-ending stream.
        let mut drained = false;
        for _ in 0..64 {
            if !self.read_some(out)? {
                drained = true;
                break;
            }
        }
        if (drained && !self.renamed.is_empty()) || self.renamed.is_full() {
            self.check_renamed(out);
        }
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bind_of_a_marked_filesystem_maps_its_origin_to_its_mount_point() {
        let mi = b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                   30 22 8:2 / /data rw - ext4 /dev/sdb1 rw\n\
                   31 30 8:2 /other/dir /data/src/bind rw - ext4 /dev/sdb1 rw\n";
        let t = crate::mounts::parse(mi);
        let first = mount_of(&t, Path::new("/data/src")).expect("mount of the source");
        assert_eq!(first.point, Path::new("/data"));
        let bind = mount_of(&t, Path::new("/data/src/bind")).expect("the bind");
        assert_eq!(
            alias_of(first, bind),
            Some(Alias {
                origin: b"/data/other/dir".to_vec(),
                point: b"/data/src/bind".to_vec(),
            })
        );
        // A bind of something the first mount does not show: no alias.
        let narrow = crate::mounts::Mount {
            root: "/only".into(),
            ..first.clone()
        };
        assert_eq!(alias_of(&narrow, bind), None);
    }

    #[test]
    fn mounts_under_the_source_are_found_with_escapes() {
        let mi = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                  30 22 0:5 / /src/a\\040b rw - tmpfs tmpfs rw\n\
                  31 22 0:6 / /srcx rw - tmpfs tmpfs rw\n\
                  32 22 0:7 / /src rw shared:1 - xfs /dev/sdb rw\n";
        let m = mounts_under(mi, b"/src");
        let pts: Vec<_> = m.iter().map(|m| m.point.clone()).collect();
        assert_eq!(pts, vec![PathBuf::from("/src/a b"), PathBuf::from("/src")]);
        assert_eq!(m[0].fstype, "tmpfs");
        assert_eq!(m[1].fstype, "xfs");
        assert_eq!(mounts_under(mi, b"/").len(), 4);
    }
}
