//! The metadata drmirror compares and records for every entry.

use rustix::fs::{FileType, Stat};

/// The kinds of entries drmirror mirrors. Special files (FIFOs, sockets,
/// devices) are `Other` and are skipped, as `rsync -a` without `-D` does.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[repr(u8)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Other = 4,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Other,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Other => "special file",
        }
    }
}

/// Metadata of one filesystem entry, as read by `lstat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
}

impl Meta {
    /// An entry of which only the kind is known (see [`crate::scan::Child`]).
    pub fn kind_only(kind: Kind) -> Meta {
        Meta {
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            ino: 0,
            dev: 0,
        }
    }

    // `st_mtime` is i64 on 64-bit targets and narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    pub fn from_stat(st: &Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
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
        }
    }

    /// True when a target entry with metadata `other` already mirrors this
    /// source entry: same kind, mode and mtime, same size for files, and the
    /// same owner when `owner` is set. Symlink targets are compared separately.
    pub fn mirrors(&self, other: &Meta, owner: bool) -> bool {
        self.kind == other.kind
            && (self.kind == Kind::Symlink || self.mode == other.mode)
            && self.mtime_ns == other.mtime_ns
            && (self.kind != Kind::File || self.size == other.size)
            && (!owner || (self.uid == other.uid && self.gid == other.gid))
    }

    /// Fixed-size little-endian encoding used in the journal's `index`.
    pub const ENCODED_LEN: usize = 1 + 4 * 3 + 8 * 5;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0] = self.kind as u8;
        b[1..5].copy_from_slice(&self.mode.to_le_bytes());
        b[5..9].copy_from_slice(&self.uid.to_le_bytes());
        b[9..13].copy_from_slice(&self.gid.to_le_bytes());
        b[13..21].copy_from_slice(&self.size.to_le_bytes());
        b[21..29].copy_from_slice(&self.mtime_ns.to_le_bytes());
        b[29..37].copy_from_slice(&self.ctime_ns.to_le_bytes());
        b[37..45].copy_from_slice(&self.ino.to_le_bytes());
        b[45..53].copy_from_slice(&self.dev.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Meta> {
        if b.len() != Self::ENCODED_LEN {
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
        })
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
        };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
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
