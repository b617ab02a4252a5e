//! Parsing of fanotify events read from a group initialised with
//! `FAN_REPORT_DFID_NAME | FAN_REPORT_FID`.
//!
//! `fanotify-rs` reads only the fixed metadata (its reader assumes 24-byte
//! events), so the variable-length info records that follow — the file
//! handles and names this backend lives on — are parsed here. The parser
//! works on plain byte slices with explicit bounds checks: no `unsafe`, and a
//! short or malformed buffer is an error, never a read past the end.
//!
//! Layouts (`include/uapi/linux/fanotify.h`):
//!
//! ```text
//! fanotify_event_metadata  u32 event_len | u8 vers | u8 reserved | u16 metadata_len
//!                          | u64 mask | i32 fd | i32 pid                     (24 bytes)
//! info header              u8 info_type | u8 pad | u16 len
//! fanotify_event_info_fid  header | fsid [8] | struct file_handle
//! struct file_handle       u32 handle_bytes | i32 handle_type | f_handle[handle_bytes]
//! *_DFID_NAME              ... file_handle followed by a NUL-terminated name
//! ```

/// Constants the `fanotify-rs` crate does not define (kernel ≥ 5.17).
pub mod consts {
    pub const FAN_RENAME: u64 = 0x1000_0000;
    pub const FAN_ONDIR: u64 = 0x4000_0000;
    pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
    pub const FAN_EVENT_ON_CHILD: u64 = 0x0800_0000;
    /// Mark flags the `fanotify` crate lacks (Linux 6.0 and 5.19).
    pub const FAN_MARK_IGNORE: u32 = 0x0000_0400;
    pub const FAN_MARK_EVICTABLE: u32 = 0x0000_0200;
    pub const FAN_REPORT_DFID_NAME: u32 = 0x0000_0400 | 0x0000_0800;
    pub const INFO_FID: u8 = 1;
    pub const INFO_DFID_NAME: u8 = 2;
    pub const INFO_DFID: u8 = 3;
    pub const INFO_OLD_DFID_NAME: u8 = 10;
    pub const INFO_NEW_DFID_NAME: u8 = 12;
    pub const METADATA_VERSION: u8 = 3;
    pub const METADATA_LEN: usize = 24;
}
use consts::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("fanotify event truncated: {0}")]
    Truncated(&'static str),
    #[error("fanotify metadata version {0}, this build understands {METADATA_VERSION}")]
    Version(u8),
}

/// A file identifier: filesystem id + file handle, as one hashable key.
///
/// The key bytes are `fsid (8) | handle_type (4, LE) | f_handle`: the same
/// object always yields the same key, and two filesystems never share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fid<'a> {
    pub fsid: [u8; 8],
    pub handle_type: i32,
    pub handle: &'a [u8],
}

impl Fid<'_> {
    /// The handle a [`Fid::key`] was made of.
    pub fn from_key(key: &[u8]) -> Option<Fid<'_>> {
        let fsid = key.get(..8)?.try_into().ok()?;
        let handle_type = i32::from_le_bytes(key.get(8..12)?.try_into().ok()?);
        Some(Fid {
            fsid,
            handle_type,
            handle: &key[12..],
        })
    }

    pub fn key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(12 + self.handle.len());
        k.extend_from_slice(&self.fsid);
        k.extend_from_slice(&self.handle_type.to_le_bytes());
        k.extend_from_slice(self.handle);
        k
    }
}

/// One event and the info records this backend uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RawEvent<'a> {
    pub mask: u64,
    /// The object itself (`FAN_EVENT_INFO_TYPE_FID`).
    pub fid: Option<Fid<'a>>,
    /// Parent directory + name (`DFID_NAME`); name `.` for an event on a
    /// directory itself.
    pub dfid_name: Option<(Fid<'a>, &'a [u8])>,
    /// `FAN_RENAME`: where it was and where it is now.
    pub old: Option<(Fid<'a>, &'a [u8])>,
    pub new: Option<(Fid<'a>, &'a [u8])>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses the body of a fid info record (after its 4-byte header).
/// Returns the fid and, for `*_NAME` records, the name.
fn parse_fid(rec: &[u8], with_name: bool) -> Result<(Fid<'_>, &[u8]), ParseError> {
    let fsid: [u8; 8] = rec
        .get(4..12)
        .and_then(|s| s.try_into().ok())
        .ok_or(ParseError::Truncated("fsid"))?;
    let hbytes = u32_at(rec, 12).ok_or(ParseError::Truncated("handle size"))? as usize;
    let htype = u32_at(rec, 16).ok_or(ParseError::Truncated("handle type"))? as i32;
    let handle = rec
        .get(20..20 + hbytes)
        .ok_or(ParseError::Truncated("file handle"))?;
    let mut name: &[u8] = &[];
    if with_name {
        let rest = &rec[20 + hbytes..];
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .ok_or(ParseError::Truncated("name without terminating NUL"))?;
        name = &rest[..end];
    }
    Ok((
        Fid {
            fsid,
            handle_type: htype,
            handle,
        },
        name,
    ))
}

/// Iterates over the events in a buffer filled by `read(2)` on the group fd.
pub struct Events<'a> {
    buf: &'a [u8],
}

pub fn events(buf: &[u8]) -> Events<'_> {
    Events { buf }
}

impl<'a> Iterator for Events<'a> {
    type Item = Result<RawEvent<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let r = parse_one(self.buf);
        match r {
            Ok((ev, len)) => {
                self.buf = &self.buf[len..];
                Some(Ok(ev))
            }
            Err(e) => {
                // A malformed event poisons the rest of the buffer: the
                // lengths that would find the next one cannot be trusted.
                self.buf = &[];
                Some(Err(e))
            }
        }
    }
}

fn parse_one(buf: &[u8]) -> Result<(RawEvent<'_>, usize), ParseError> {
    let event_len = u32_at(buf, 0).ok_or(ParseError::Truncated("event length"))? as usize;
    let vers = *buf.get(4).ok_or(ParseError::Truncated("version"))?;
    if vers != METADATA_VERSION {
        return Err(ParseError::Version(vers));
    }
    let meta_len = u16_at(buf, 6).ok_or(ParseError::Truncated("metadata length"))? as usize;
    let mask = u64_at(buf, 8).ok_or(ParseError::Truncated("mask"))?;
    if event_len < METADATA_LEN || meta_len < METADATA_LEN || meta_len > event_len {
        return Err(ParseError::Truncated("event shorter than its metadata"));
    }
    let ev = buf
        .get(..event_len)
        .ok_or(ParseError::Truncated("event longer than the buffer"))?;
    let mut out = RawEvent {
        mask,
        ..Default::default()
    };
    let mut at = meta_len;
    while at < event_len {
        let info_type = ev[at];
        let len = u16_at(ev, at + 2).ok_or(ParseError::Truncated("info header"))? as usize;
        if len < 4 || at + len > event_len {
            return Err(ParseError::Truncated("info record"));
        }
        let rec = &ev[at..at + len];
        match info_type {
            INFO_FID | INFO_DFID => {
                let (fid, _) = parse_fid(rec, false)?;
                if info_type == INFO_FID {
                    out.fid = Some(fid);
                } else {
                    out.dfid_name = Some((fid, b"."));
                }
            }
            INFO_DFID_NAME => out.dfid_name = Some(parse_fid(rec, true)?),
            INFO_OLD_DFID_NAME => out.old = Some(parse_fid(rec, true)?),
            INFO_NEW_DFID_NAME => out.new = Some(parse_fid(rec, true)?),
            // pidfd, error, range, mount records: not requested, skipped.
            _ => {}
        }
        at += len;
    }
    Ok((out, event_len))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an info record as the kernel lays it out (padded to 4 bytes).
    pub fn record(info_type: u8, fsid: [u8; 8], handle: &[u8], name: Option<&[u8]>) -> Vec<u8> {
        let mut r = vec![info_type, 0, 0, 0];
        r.extend_from_slice(&fsid);
        r.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        r.extend_from_slice(&1i32.to_ne_bytes());
        r.extend_from_slice(handle);
        if let Some(n) = name {
            r.extend_from_slice(n);
            r.push(0);
        }
        while r.len() % 4 != 0 {
            r.push(0);
        }
        let len = r.len() as u16;
        r[2..4].copy_from_slice(&len.to_ne_bytes());
        r
    }

    pub fn event(mask: u64, records: &[Vec<u8>]) -> Vec<u8> {
        let body: usize = records.iter().map(Vec::len).sum();
        let mut e = Vec::new();
        e.extend_from_slice(&((METADATA_LEN + body) as u32).to_ne_bytes());
        e.push(METADATA_VERSION);
        e.push(0);
        e.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&1234i32.to_ne_bytes());
        for r in records {
            e.extend_from_slice(r);
        }
        e
    }

    const FS: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[test]
    fn create_with_parent_name_and_object_fid() {
        let buf = event(
            0x100,
            &[
                record(
                    INFO_DFID_NAME,
                    FS,
                    &[9, 9, 9, 9, 1, 0, 0, 0],
                    Some(b"new file\n"),
                ),
                record(INFO_FID, FS, &[7, 7, 7, 7, 2, 0, 0, 0], None),
            ],
        );
        let evs: Vec<_> = events(&buf).collect();
        assert_eq!(evs.len(), 1);
        let e = evs[0].as_ref().unwrap();
        assert_eq!(e.mask, 0x100);
        let (dir, name) = e.dfid_name.unwrap();
        assert_eq!(name, b"new file\n");
        assert_eq!(dir.handle, &[9, 9, 9, 9, 1, 0, 0, 0]);
        assert_eq!(dir.fsid, FS);
        assert_eq!(e.fid.unwrap().handle, &[7, 7, 7, 7, 2, 0, 0, 0]);
        assert_ne!(dir.key(), e.fid.unwrap().key());
    }

    #[test]
    fn several_events_and_rename_records() {
        let mut buf = event(
            FAN_RENAME | FAN_ONDIR,
            &[
                record(INFO_OLD_DFID_NAME, FS, &[1; 8], Some(b"a")),
                record(INFO_NEW_DFID_NAME, FS, &[2; 8], Some(b"b\xff")),
                record(INFO_FID, FS, &[3; 8], None),
            ],
        );
        buf.extend(event(FAN_Q_OVERFLOW, &[]));
        let evs: Vec<_> = events(&buf).map(|e| e.unwrap()).collect();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].old.unwrap().1, b"a");
        assert_eq!(evs[0].new.unwrap().1, b"b\xff");
        assert_eq!(evs[0].new.unwrap().0.handle, &[2; 8]);
        assert_eq!(evs[1].mask, FAN_Q_OVERFLOW);
        assert!(evs[1].fid.is_none() && evs[1].dfid_name.is_none());
    }

    #[test]
    fn unknown_records_are_skipped() {
        let mut pidfd = vec![4u8, 0, 8, 0];
        pidfd.extend_from_slice(&5i32.to_ne_bytes());
        let buf = event(
            0x2,
            &[pidfd, record(INFO_DFID_NAME, FS, &[1; 8], Some(b"f"))],
        );
        let e = events(&buf).next().unwrap().unwrap();
        assert_eq!(e.dfid_name.unwrap().1, b"f");
    }

    #[test]
    fn malformed_buffers_are_errors_not_panics() {
        let good = event(0x2, &[record(INFO_DFID_NAME, FS, &[1; 8], Some(b"f"))]);
        // Every truncation of a valid event is rejected.
        for cut in 1..good.len() {
            let r: Vec<_> = events(&good[..cut]).collect();
            assert!(r.iter().any(|e| e.is_err()), "cut at {cut} accepted");
        }
        let mut bad_version = good.clone();
        bad_version[4] = 2;
        assert_eq!(
            events(&bad_version).next().unwrap(),
            Err(ParseError::Version(2))
        );
        // A handle size that runs past its record.
        let mut rec = record(INFO_FID, FS, &[1; 8], None);
        rec[12..16].copy_from_slice(&200u32.to_ne_bytes());
        assert!(events(&event(0x2, &[rec])).next().unwrap().is_err());
        // A name without its NUL.
        let mut rec = record(INFO_DFID_NAME, FS, &[1; 8], Some(b"abc"));
        let n = rec.len();
        for b in &mut rec[28..n] {
            *b = b'x';
        }
        assert!(events(&event(0x2, &[rec])).next().unwrap().is_err());
        // An info length of zero would loop forever if accepted.
        let mut rec = record(INFO_FID, FS, &[1; 8], None);
        rec[2..4].copy_from_slice(&0u16.to_ne_bytes());
        assert!(events(&event(0x2, &[rec])).next().unwrap().is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            for _ in events(&buf) {}
        }
    }
}
