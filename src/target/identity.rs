//! Knowing the target we write to.
//!
//! A local target's directory carries a mark, the extended attribute
//! `user.drmirror.target` = `ID GEN`: a random id given at first use and a
//! generation that moves at every start. The journal records the mark with
//! the device and inode of the directory.
//!
//! Invariants:
//! - **The index is trusted only for the target it describes.** At start,
//!   a target whose mark is missing (emptied and recreated, a new disk),
//!   names another id (another mirror's copy) or another generation (a copy
//!   restored from before the last start) is compared in full with the
//!   source, never against the index (its index is forgotten).
//! - **Nothing is written where the target is not.** A target that the
//!   journal knows is refused at start, with the reason, when its path is
//!   missing, is a symlink to another directory, or is on another
//!   filesystem than the one
//!   recorded (the DR filesystem not mounted: the mount point is an empty
//!   directory of the filesystem below). While running, the daemon's pulse
//!   stops it when the path names another directory than the one it holds
//!   open (renamed, replaced, swapped for a symlink, mounted over). Both
//!   are exits with an error, so that the service manager starts it again,
//!   and a start succeeds once the real target is back.
//! - A crash between the journal's record and the mark leaves them
//!   different: the next start compares in full, the safe side.
//!
//! A filesystem without user extended attributes cannot carry the mark:
//! the target is then trusted as before (logged once at start).
//!
//! A remote target is judged the same way at every connection, from what
//! its receiver reports of its root ([`Seen`], in the welcome): another
//! filesystem without the mark refuses the connection before anything is
//! written ([`settle_seen`]), and the daemon then sends the new mark
//! (`Request::Mark`). Its index sample is looked up over the wire.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::journal::{Journal, JournalError, TargetId};
use crate::meta::{Kind, Meta};

pub const XATTR: &str = "user.drmirror.target";
const META_PREFIX: &[u8] = b"target_identity/";

/// What the journal recorded of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Recorded {
    mark: String,
    dev: u64,
    ino: u64,
}

impl Recorded {
    fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.mark, self.dev, self.ino).into_bytes()
    }

    fn decode(b: &[u8]) -> Option<Recorded> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.rsplitn(3, ' ');
        let ino = it.next()?.parse().ok()?;
        let dev = it.next()?.parse().ok()?;
        Some(Recorded {
            mark: it.next()?.to_string(),
            dev,
            ino,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "target {name} ({path}): {why}; writing nothing there (is the DR filesystem mounted?)"
    )]
    NotTheTarget {
        name: String,
        path: String,
        why: String,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

fn key(t: TargetId) -> Vec<u8> {
    let mut k = META_PREFIX.to_vec();
    k.extend_from_slice(&t.to_be_bytes());
    k
}

fn recorded(journal: &Journal, t: TargetId) -> Result<Option<Recorded>, JournalError> {
    Ok(journal
        .meta_get(&key(t))?
        .and_then(|v| Recorded::decode(&v)))
}

/// Before the target is opened (and its directory created): refuses a
/// target the journal knows whose path is missing, a symlink, or on
/// another filesystem.
pub fn check_path(
    journal: &Journal,
    t: TargetId,
    name: &str,
    path: &Path,
) -> Result<(), IdentityError> {
    let Some(r) = recorded(journal, t)? else {
        return Ok(());
    };
    let refuse = |why: String| IdentityError::NotTheTarget {
        name: name.to_string(),
        path: path.display().to_string(),
        why,
    };
    let st = rustix::fs::stat(path).map_err(|e| refuse(format!("it is gone ({e})")))?;
    let link = rustix::fs::lstat(path).is_ok_and(|l| {
        rustix::fs::FileType::from_raw_mode(l.st_mode) == rustix::fs::FileType::Symlink
    });
    if link && (st.st_dev, st.st_ino) != (r.dev, r.ino) {
        return Err(refuse(
            "it is now a symbolic link to another directory than the target".into(),
        ));
    }
    // Device numbers are not stable across reboots (a disk found in
    // another order, device-mapper minors): another device is the target
    // still if the directory carries the target's mark.
    if st.st_dev != r.dev && !carries_id(path, &r.mark) {
        return Err(refuse(format!(
            "it is on another filesystem (device {:#x}) than the one the mirror was written to \
             (device {:#x}), and does not carry the target's mark",
            st.st_dev, r.dev
        )));
    }
    Ok(())
}

/// Whether directory `path` carries a mark with the id of `mark`.
fn carries_id(path: &Path, mark: &str) -> bool {
    let id = |m: &str| m.split(' ').next().map(str::to_string);
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
    .and_then(|fd| read_mark(&fd).ok().flatten())
    .is_some_and(|m| id(&m) == id(mark))
}

/// The device and inode of an open directory.
pub fn file_id(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// `Err(why)` when `path` no longer names the directory `held` (its
/// device and inode) that is written through: renamed, replaced, swapped
/// for a symlink, mounted over, or gone. What is written then is no longer
/// the mirror at the path.
pub fn still_at(path: &Path, held: (u64, u64)) -> Result<(), String> {
    match rustix::fs::stat(path) {
        Ok(st) if (st.st_dev, st.st_ino) == held => Ok(()),
        Ok(_) => Err(
            "the path now names another directory (renamed, replaced or mounted \
                      over) than the one drmirror writes to"
                .into(),
        ),
        Err(e) => Err(format!("the path is gone ({e})")),
    }
}

/// What a target's root shows of itself: its device and inode, and its
/// mark (read on the target's own machine for a remote one).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    pub dev: u64,
    pub ino: u64,
    pub mark: MarkRead,
}

/// The mark, as read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MarkRead {
    Present(String),
    Missing,
    /// The filesystem keeps no user extended attributes.
    Unsupported,
    Unreadable(String),
}

impl Seen {
    /// What the open directory `dir` shows.
    pub fn of(dir: impl AsFd) -> io::Result<Seen> {
        let (dev, ino) = file_id(&dir)?;
        let mark = match read_mark(&dir) {
            Ok(Some(m)) => MarkRead::Present(m),
            Ok(None) => MarkRead::Missing,
            Err(e) if unsupported(&e) => MarkRead::Unsupported,
            Err(e) => MarkRead::Unreadable(e.to_string()),
        };
        Ok(Seen { dev, ino, mark })
    }
}

/// What a start (or a reconnection) makes of a target it has seen.
struct Verdict {
    /// Why the index cannot be trusted, if it cannot.
    distrust: Option<String>,
    /// The record to keep, whose mark the target is given.
    new: Recorded,
}

fn judge(rec: Option<&Recorded>, seen: &Seen) -> Verdict {
    let distrust = match (rec, &seen.mark) {
        (None, _) | (Some(_), MarkRead::Unsupported) => None,
        (Some(_), MarkRead::Unreadable(e)) => Some(format!("its mark cannot be read ({e})")),
        (Some(_), MarkRead::Missing) => {
            Some("its mark is missing (emptied, or a new directory)".into())
        }
        (Some(r), MarkRead::Present(m)) if *m != r.mark => Some(format!(
            "its mark {m:?} is not the one recorded ({:?}): another copy, or one restored \
             from before the last start",
            r.mark
        )),
        (Some(_), MarkRead::Present(_)) => None,
    };
    let id = match (rec, &seen.mark) {
        (Some(r), MarkRead::Present(m)) if *m == r.mark => {
            r.mark.split(' ').next().map(str::to_string)
        }
        _ => None,
    }
    .unwrap_or_else(new_id);
    let gen = rec
        .and_then(|r| r.mark.split(' ').nth(1)?.parse::<u64>().ok())
        .map_or(1, |g| g + 1);
    Verdict {
        distrust,
        new: Recorded {
            mark: format!("{id} {gen}"),
            dev: seen.dev,
            ino: seen.ino,
        },
    }
}

/// Records the verdict: the index is forgotten if it cannot be trusted,
/// and the new record written (the journal first: a crash before the mark
/// is written leaves them different, and the next start compares in full).
fn record(journal: &Journal, t: TargetId, name: &str, v: &Verdict) -> Result<(), JournalError> {
    if let Some(why) = &v.distrust {
        tracing::warn!(
            "target {name}: {why}: comparing the whole target with the source, not trusting \
             what the journal says it holds"
        );
        journal.forget_target(t)?;
    }
    journal.meta_put(&key(t), &v.new.encode())
}

/// Whether drmirror never wrote to the target whose root is open as `dir`:
/// the journal holds no record of it and the root carries no mark (see
/// [`super::adopt`]).
pub fn first_use(journal: &Journal, t: TargetId, dir: impl AsFd) -> Result<bool, IdentityError> {
    let seen = Seen::of(&dir).map_err(|e| IdentityError::NotTheTarget {
        name: String::new(),
        path: String::new(),
        why: e.to_string(),
    })?;
    first_use_seen(journal, t, &seen)
}

/// [`first_use`] of a target whose root shows `seen` (a remote one's, as
/// its receiver reports it).
pub fn first_use_seen(journal: &Journal, t: TargetId, seen: &Seen) -> Result<bool, IdentityError> {
    Ok(recorded(journal, t)?.is_none() && !matches!(seen.mark, MarkRead::Present(_)))
}

/// Once the target is open (`dir`: a readable descriptor of its root):
/// compares its mark with the journal's record, forgets the index of a
/// target it cannot vouch for, and moves the generation. Returns why the
/// index was forgotten, if it was.
pub fn settle(
    journal: &Journal,
    t: TargetId,
    name: &str,
    dir: impl AsFd,
) -> Result<Option<String>, IdentityError> {
    let not_it = |why: String| IdentityError::NotTheTarget {
        name: name.to_string(),
        path: String::new(),
        why,
    };
    let seen = Seen::of(&dir).map_err(|e| not_it(e.to_string()))?;
    let v = judge(recorded(journal, t)?.as_ref(), &seen);
    record(journal, t, name, &v)?;
    match rustix::fs::fsetxattr(
        &dir,
        XATTR,
        v.new.mark.as_bytes(),
        rustix::fs::XattrFlags::empty(),
    ) {
        Ok(()) => {}
        Err(e) if unsupported(&e.into()) => {
            tracing::info!(
                "target {name}: its filesystem keeps no user extended attributes: drmirror \
                 cannot mark it, and trusts that it is the directory it mirrored to"
            );
        }
        Err(e) => return Err(not_it(format!("cannot mark it ({e})"))),
    }
    Ok(v.distrust)
}

/// A remote target's side of [`check_path`] and [`settle`], at each
/// connection: what its receiver saw of its root (`seen`) against the
/// journal's record. `Err` refuses the connection: the root is on another
/// filesystem than the one mirrored to and does not carry the target's
/// mark (the DR filesystem not mounted there). Otherwise the index is
/// forgotten if it cannot be trusted (the first of the pair returned says
/// why), and the second is the mark to give the root, if its filesystem
/// keeps one.
pub fn settle_seen(
    journal: &Journal,
    t: TargetId,
    name: &str,
    path: &str,
    seen: &Seen,
) -> Result<(Option<String>, Option<String>), IdentityError> {
    let rec = recorded(journal, t)?;
    if let Some(r) = &rec {
        let same_id = |m: &str| m.split(' ').next() == r.mark.split(' ').next();
        let marked = matches!(&seen.mark, MarkRead::Present(m) if same_id(m));
        if seen.dev != r.dev && !marked {
            return Err(IdentityError::NotTheTarget {
                name: name.to_string(),
                path: path.to_string(),
                why: format!(
                    "its root is on another filesystem (device {:#x}) than the one the mirror \
                     was written to (device {:#x}), and does not carry the target's mark",
                    seen.dev, r.dev
                ),
            });
        }
    }
    let v = judge(rec.as_ref(), seen);
    record(journal, t, name, &v)?;
    let mark = (seen.mark != MarkRead::Unsupported).then(|| v.new.mark.clone());
    Ok((v.distrust, mark))
}

/// Gives the open directory `dir` the mark `mark` (a receiver, as its
/// daemon asks).
pub fn put_mark(dir: impl AsFd, mark: &str) -> io::Result<()> {
    rustix::fs::fsetxattr(dir, XATTR, mark.as_bytes(), rustix::fs::XattrFlags::empty())?;
    Ok(())
}

/// Samples checked at start: at least this many, or 1 % of the index.
pub const SAMPLE_MIN: usize = 1000;

/// Trust the index, but check it: a sample of what the index says the
/// target holds is looked up on the target (`lookup`: each path's entry
/// there, all at once, so that a remote target answers in one round trip).
/// `Some(why)` if the target lacks or differs from any sampled entry that
/// nothing pending explains (a target emptied while the daemon was
/// stopped, or restored from an older copy); the caller then compares the
/// whole target.
pub fn sample_holds(
    journal: &Journal,
    t: TargetId,
    owner: bool,
    lookup: impl FnOnce(&[Vec<u8>]) -> Vec<io::Result<Option<Meta>>>,
) -> Result<Option<String>, JournalError> {
    let n = journal
        .scan_entries(t)?
        .map_or(SAMPLE_MIN, |e| (e / 100) as usize)
        .max(SAMPLE_MIN);
    let seed = crate::journal::now_ns() ^ u64::from(std::process::id());
    let mut sample = Vec::new();
    for (path, m) in journal.index_sample(t, n, seed)? {
        // In flight: applied (or not) but not committed.
        if journal.pending_get(t, &path)?.is_none() {
            sample.push((path, m));
        }
    }
    let paths: Vec<Vec<u8>> = sample.iter().map(|(p, _)| p.clone()).collect();
    let held = lookup(&paths);
    for (checked, ((path, m), held)) in sample.into_iter().zip(held).enumerate() {
        // Unreadable (or the target unreachable): not evidence either way.
        let Ok(held) = held else {
            continue;
        };
        // A directory's mtime moves with the temp files of copies a crash
        // cut short: only its being there, as a directory, is checked.
        let holds = |h: &Meta| match m.kind {
            Kind::Dir => h.kind == Kind::Dir,
            _ => m.mirrors(h, owner),
        };
        if held.as_ref().is_some_and(holds) {
            continue;
        }
        // A shipper may have applied and committed a newer version since
        // the sample was read: only a record that still stands counts.
        if journal.index_get(t, &path)? != Some(m) || journal.pending_get(t, &path)?.is_some() {
            continue;
        }
        return Ok(Some(format!(
            "{} is {} on the target, unlike what the journal recorded ({} of a sample checked)",
            crate::paths::display(&path),
            if held.is_some() {
                "different"
            } else {
                "missing"
            },
            checked + 1
        )));
    }
    Ok(None)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::EPERM) | Some(libc::EACCES)
    )
}

fn read_mark(dir: impl AsFd) -> io::Result<Option<String>> {
    let mut buf = [0u8; 128];
    match rustix::fs::fgetxattr(dir, XATTR, &mut buf[..]) {
        Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// 128 random bits, hex.
fn new_id() -> String {
    let mut b = [0u8; 16];
    // /dev/urandom: no crate for 16 bytes once per target's first start;
    // the clock and pid are a fallback that is unique enough for a mark.
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        let now = crate::journal::now_ns();
        b[..8].copy_from_slice(&now.to_le_bytes());
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips() {
        let r = Recorded {
            mark: "abcd 7".into(),
            dev: 0x801,
            ino: 42,
        };
        assert_eq!(Recorded::decode(&r.encode()), Some(r));
        assert_eq!(Recorded::decode(b"garbage"), None);
    }
}
