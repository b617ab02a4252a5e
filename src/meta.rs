//! The metadata drmirror compares and records for every entry.

use rustix::fs::{FileType, Stat};

/// The kinds of entries drmirror mirrors. FIFOs, sockets' entries and
/// devices are mirrored as `rsync -D` keeps them (see
/// [`crate::fidelity`]); `Other` is any type the kernel may add beyond
/// these (never mirrored, as `rsync -a` skips what it does not know).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[repr(u8)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Other = 4,
    Fifo = 5,
    Socket = 6,
    CharDev = 7,
    BlockDev = 8,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Other,
            5 => Kind::Fifo,
            6 => Kind::Socket,
            7 => Kind::CharDev,
            8 => Kind::BlockDev,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Other => "special file",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
        }
    }

    /// A FIFO, a socket's entry or a device: made with `mknod`, no content.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev
        )
    }

    /// A device, whose `rdev` is part of what it is.
    pub fn is_device(self) -> bool {
        matches!(self, Kind::CharDev | Kind::BlockDev)
    }

    /// The `S_IFMT` bits of this kind, for `mknod`.
    pub fn file_type(self) -> Option<FileType> {
        Some(match self {
            Kind::Fifo => FileType::Fifo,
            Kind::Socket => FileType::Socket,
            Kind::CharDev => FileType::CharacterDevice,
            Kind::BlockDev => FileType::BlockDevice,
            _ => return None,
        })
    }
}

/// Metadata of one filesystem entry, as read by `lstat`.
///
/// Equality leaves out `nlink`: two `Meta` are equal when they describe the
/// same entry in the same state, and the journal's index (which records what
/// was copied) does not keep link counts (see [`Meta::nlink`]).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    /// The device number of a device; 0 for everything else.
    pub rdev: u64,
    /// The link count as read (0 where unknown: decoded from the index,
    /// received over the wire, listed without a stat). Only to find hard
    /// links (see [`crate::links`]): not encoded, sent or compared.
    #[serde(skip)]
    pub nlink: u64,
}

impl PartialEq for Meta {
    fn eq(&self, o: &Meta) -> bool {
        let Meta {
            kind,
            mode,
            uid,
            gid,
            size,
            mtime_ns,
            ctime_ns,
            ino,
            dev,
            rdev,
            nlink: _,
        } = *self;
        kind == o.kind
            && mode == o.mode
            && uid == o.uid
            && gid == o.gid
            && size == o.size
            && mtime_ns == o.mtime_ns
            && ctime_ns == o.ctime_ns
            && ino == o.ino
            && dev == o.dev
            && rdev == o.rdev
    }
}

impl Eq for Meta {}

impl Meta {
    /// This entry as an index entry that vouches for nothing: the index
    /// still accounts for it (a compare finds the target's entry extra
    /// when the source loses it), but it equals no metadata a source
    /// entry can have (a change time no clock gives), so every compare
    /// looks at the target itself.
    pub fn unverified(self) -> Meta {
        Meta {
            ctime_ns: i64::MIN,
            ..self
        }
    }

    // `st_mtime` is i64 on 64-bit targets and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    pub fn from_stat(st: &Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDev,
            FileType::BlockDevice => Kind::BlockDev,
            _ => Kind::Other,
        };
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime_ns: i64::from(st.st_mtime) * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: i64::from(st.st_ctime) * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino,
            dev: st.st_dev,
            rdev: if kind.is_device() { st.st_rdev } else { 0 },
            // u32 on some architectures.
            #[allow(clippy::unnecessary_cast)]
            nlink: st.st_nlink as u64,
        }
    }

    /// True when a target entry with metadata `other` already mirrors this
    /// source entry: same kind, mode and mtime, same size for files, same
    /// device number for devices, and the same owner when `owner` is set.
    /// Symlink targets and extended attributes are compared separately.
    pub fn mirrors(&self, other: &Meta, owner: bool) -> bool {
        self.kind == other.kind
            && (self.kind == Kind::Symlink || self.mode == other.mode)
            && self.mtime_ns == other.mtime_ns
            && (self.kind != Kind::File || self.size == other.size)
            && self.rdev == other.rdev
            && (!owner || (self.uid == other.uid && self.gid == other.gid))
    }

    /// Little-endian encoding used in the journal's `index`: this many
    /// bytes, or [`Meta::DEVICE_LEN`] for a device (its `rdev` appended),
    /// so that the common entry pays nothing for the rare one. A journal
    /// written before devices were mirrored holds only the short form.
    pub const ENCODED_LEN: usize = 1 + 4 * 3 + 8 * 5;
    pub const DEVICE_LEN: usize = Self::ENCODED_LEN + 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; Self::ENCODED_LEN];
        b[0] = self.kind as u8;
        b[1..5].copy_from_slice(&self.mode.to_le_bytes());
        b[5..9].copy_from_slice(&self.uid.to_le_bytes());
        b[9..13].copy_from_slice(&self.gid.to_le_bytes());
        b[13..21].copy_from_slice(&self.size.to_le_bytes());
        b[21..29].copy_from_slice(&self.mtime_ns.to_le_bytes());
        b[29..37].copy_from_slice(&self.ctime_ns.to_le_bytes());
        b[37..45].copy_from_slice(&self.ino.to_le_bytes());
        b[45..53].copy_from_slice(&self.dev.to_le_bytes());
        if self.rdev != 0 {
            b.extend_from_slice(&self.rdev.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Meta> {
        if b.len() != Self::ENCODED_LEN && b.len() != Self::DEVICE_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Some(Meta {
            kind: Kind::from_u8(b[0])?,
            mode: u32_at(1),
            uid: u32_at(5),
            gid: u32_at(9),
            size: u64_at(13),
            mtime_ns: u64_at(21) as i64,
            ctime_ns: u64_at(29) as i64,
            ino: u64_at(37),
            dev: u64_at(45),
            rdev: if b.len() == Self::DEVICE_LEN {
                u64_at(53)
            } else {
                0
            },
            nlink: 0,
        })
    }
}

/// A one-byte regular file `ino` on device `dev` (unit tests).
#[cfg(test)]
pub fn test_file(dev: u64, ino: u64) -> Meta {
    Meta {
        kind: Kind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: 1,
        mtime_ns: 1,
        ctime_ns: 1,
        ino,
        dev,
        rdev: 0,
        nlink: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_roundtrip() {
        let m = Meta {
            kind: Kind::Symlink,
            mode: 0o4755,
            uid: 1,
            gid: 2,
            size: u64::MAX - 3,
            mtime_ns: -5,
            ctime_ns: 1_700_000_000_123_456_789,
            ino: 42,
            dev: 7,
            rdev: 0,
            nlink: 1,
        };
        assert_eq!(m.encode().len(), Meta::ENCODED_LEN);
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        let d = Meta {
            kind: Kind::CharDev,
            rdev: 0x0103,
            ..m
        };
        assert_eq!(d.encode().len(), Meta::DEVICE_LEN);
        assert_eq!(Meta::decode(&d.encode()), Some(d));
        assert_eq!(Meta::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn mirrors_ignores_inode_and_ctime() {
        let a = Meta {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 10,
            mtime_ns: 5,
            ctime_ns: 6,
            ino: 1,
            dev: 1,
            rdev: 0,
            nlink: 1,
        };
        let b = Meta {
            ino: 9,
            ctime_ns: 99,
            dev: 3,
            ..a
        };
        assert!(a.mirrors(&b, true));
        assert!(!a.mirrors(&Meta { size: 11, ..b }, true));
        assert!(!a.mirrors(&Meta { uid: 3, ..b }, true));
        assert!(a.mirrors(&Meta { uid: 3, ..b }, false));
    }
}
