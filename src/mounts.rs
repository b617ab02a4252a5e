//! Where a directory is visible inside another tree through a mount.
//!
//! Path checks alone ("the target is not inside the source") miss a bind
//! mount: with the target's directory also mounted somewhere under the
//! source, every copy into the mirror appears in the source again and is
//! copied again, until the disk is full. The same directory reached by two
//! paths has one filesystem and one path within it, which
//! `/proc/self/mountinfo` tells for every mount: this module compares those.
//!
//! Hand-written: the crates that read mountinfo (procfs, mountinfo) bring
//! much more than these two fields and the unescaping of the paths.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// The directory of that filesystem the mount shows.
    pub root: PathBuf,
    /// Where it is shown.
    pub point: PathBuf,
    /// The filesystem type (`ext4`, `tmpfs`, ...).
    pub fstype: String,
}

/// The mounts of this process's namespace, in mount order; empty when
/// `/proc` cannot tell.
pub fn current() -> Vec<Mount> {
    std::fs::read("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<Mount> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|&b| b == b' ');
            let (_id, _parent) = (f.next()?, f.next()?);
            let dev = std::str::from_utf8(f.next()?).ok()?.to_string();
            let root = unescape(f.next()?);
            let point = unescape(f.next()?);
            // Options, optional fields, then `-` and the type.
            let fstype = f.skip_while(|x| *x != b"-").nth(1)?;
            let fstype = String::from_utf8_lossy(fstype).into_owned();
            (root.is_absolute() && point.is_absolute()).then_some(Mount {
                dev,
                root,
                point,
                fstype,
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let oct = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The filesystem of absolute path `p` and `p`'s path within it: the last
/// mounted of the mounts with the longest mount point above `p`.
fn locate<'m>(mounts: &'m [Mount], p: &Path) -> Option<(&'m str, PathBuf)> {
    let m = mounts
        .iter()
        .filter(|m| p.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())?;
    let rest = p.strip_prefix(&m.point).ok()?;
    Some((m.dev.as_str(), m.root.join(rest)))
}

/// A path at or under `tree` through which `inner` can be reached as
/// well, `inner` itself excepted: under `tree`'s own filesystem, or under a
/// mount below `tree`. Both paths absolute and canonical (`inner` may end
/// in components that do not exist yet).
pub fn visible_inside(mounts: &[Mount], tree: &Path, inner: &Path) -> Option<PathBuf> {
    let (dev, rel) = locate(mounts, inner)?;
    let own = locate(mounts, tree).map(|(d, r)| (d, r, tree.to_path_buf()));
    let below = mounts
        .iter()
        .filter(|m| m.point.starts_with(tree) && m.point != tree)
        .map(|m| (m.dev.as_str(), m.root.clone(), m.point.clone()));
    own.into_iter()
        .chain(below)
        .filter(|(d, root, _)| *d == dev && rel.starts_with(root))
        .filter_map(|(_, root, at)| Some(at.join(rel.strip_prefix(&root).ok()?)))
        .find(|at| at != inner)
}

/// The mounts at or below a tree (its own root's excepted), kept current:
/// the kernel flags an open `/proc/self/mountinfo` with POLLPRI on every
/// mount and unmount in the namespace, so a capture backend polls it with
/// its own queue and learns of a mount added or removed under the source
/// while it runs (see [`MountTable::changes`]).
pub struct MountTable {
    file: std::fs::File,
    tree: PathBuf,
    points: std::collections::BTreeMap<PathBuf, Mount>,
}

/// What changed under the tree since the last look.
#[derive(Debug, Default)]
pub struct MountChanges {
    pub added: Vec<Mount>,
    pub removed: Vec<Mount>,
}

impl MountTable {
    /// Opens the table and takes the mounts under `tree` (absolute,
    /// canonical) as known.
    pub fn open(tree: &Path) -> std::io::Result<MountTable> {
        let file = std::fs::File::open("/proc/self/mountinfo")?;
        let mut t = MountTable {
            file,
            tree: tree.to_path_buf(),
            points: Default::default(),
        };
        t.points = t.read()?;
        Ok(t)
    }

    /// The descriptor to poll for `POLLPRI`.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    fn read(&mut self) -> std::io::Result<std::collections::BTreeMap<PathBuf, Mount>> {
        use std::io::{Read, Seek};
        let mut text = Vec::new();
        self.file.rewind()?;
        self.file.read_to_end(&mut text)?;
        // The last mount on a point is the one that shows there.
        Ok(parse(&text)
            .into_iter()
            .filter(|m| m.point.starts_with(&self.tree) && m.point != self.tree)
            .map(|m| (m.point.clone(), m))
            .collect())
    }

    /// Reads the table again (after `POLLPRI`) and returns what changed
    /// under the tree: a mount point new or showing another filesystem or
    /// directory is added (and, in the second case, removed first).
    pub fn changes(&mut self) -> std::io::Result<MountChanges> {
        let now = self.read()?;
        let mut c = MountChanges::default();
        for (p, m) in &self.points {
            if now.get(p) != Some(m) {
                c.removed.push(m.clone());
            }
        }
        for (p, m) in &now {
            if self.points.get(p) != Some(m) {
                c.added.push(m.clone());
            }
        }
        self.points = now;
        Ok(c)
    }
}

/// Waits up to `timeout` for `fd` (a capture group) to be readable or, if
/// given, for the mount table to change; returns (readable, mounts
/// changed). A signal counts as neither. `poll` itself consumes the mount
/// table's flag: the caller must act on `true`.
pub fn poll_with(
    fd: std::os::fd::BorrowedFd<'_>,
    table: Option<&MountTable>,
    timeout: std::time::Duration,
) -> std::io::Result<(bool, bool)> {
    use rustix::event::{PollFd, PollFlags};
    let ts = rustix::fs::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let mut fds = vec![PollFd::new(&fd, PollFlags::IN)];
    if let Some(t) = table {
        fds.push(PollFd::new(&t.file, PollFlags::PRI));
    }
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) => {
            let ready = fds[0].revents().contains(PollFlags::IN);
            let changed = fds
                .get(1)
                .is_some_and(|f| f.revents().intersects(PollFlags::PRI | PollFlags::ERR));
            Ok((ready, changed))
        }
        Err(rustix::io::Errno::INTR) => Ok((false, false)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &[u8] = b"\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:2 / /data rw,relatime shared:2 - ext4 /dev/sda2 rw
31 22 8:3 / /backup rw,relatime shared:3 - xfs /dev/sda3 rw
40 30 8:3 /dr /data/mirror rw,relatime shared:3 - xfs /dev/sda3 rw
41 22 8:2 /projects/a\\040b /srv/ab rw - ext4 /dev/sda2 rw
malformed
";

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn parses_fields_and_unescapes_paths() {
        let m = parse(INFO);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[4],
            Mount {
                dev: "8:2".into(),
                root: p("/projects/a b"),
                point: p("/srv/ab"),
                fstype: "ext4".into(),
            }
        );
        assert_eq!(unescape(b"x\\012y\\134"), p("x\ny\\"));
        assert_eq!(unescape(b"a\\9b\\"), p("a\\9b\\"));
    }

    #[test]
    fn a_bind_mount_below_the_tree_is_found() {
        let m = parse(INFO);
        // /backup/dr is mounted again at /data/mirror.
        assert_eq!(
            visible_inside(&m, &p("/data"), &p("/backup/dr/target")),
            Some(p("/data/mirror/target"))
        );
        assert_eq!(
            visible_inside(&m, &p("/data"), &p("/backup/dr")),
            Some(p("/data/mirror"))
        );
        // Elsewhere on that filesystem: not reachable from /data.
        assert_eq!(visible_inside(&m, &p("/data"), &p("/backup/other")), None);
        assert_eq!(visible_inside(&m, &p("/data/x"), &p("/backup/dr")), None);
    }

    #[test]
    fn a_directory_shown_elsewhere_is_found_in_its_own_filesystem() {
        let m = parse(INFO);
        // /srv/ab is /data/projects/a b: a target there writes into /data.
        assert_eq!(
            visible_inside(&m, &p("/data"), &p("/srv/ab/t")),
            Some(p("/data/projects/a b/t"))
        );
        // And a tree that shows the source: /srv/ab holds /data/projects/a b.
        assert_eq!(
            visible_inside(&m, &p("/srv"), &p("/data/projects/a b")),
            Some(p("/srv/ab"))
        );
        assert_eq!(visible_inside(&m, &p("/srv"), &p("/data/projects")), None);
    }

    #[test]
    fn separate_trees_are_not_flagged() {
        let m = parse(INFO);
        assert_eq!(visible_inside(&m, &p("/data/src"), &p("/backup/t")), None);
        assert_eq!(visible_inside(&m, &p("/data/src"), &p("/data/dst")), None);
        assert_eq!(visible_inside(&m, &p("/data/src"), &p("/var/state")), None);
        assert_eq!(
            visible_inside(&[], &p("/data/src"), &p("/data/src/t")),
            None
        );
    }
}
