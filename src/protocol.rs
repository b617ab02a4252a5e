//! The wire protocol between a drmirror daemon and `drmirror receive`.
//!
//! A connection is a byte stream (ssh's stdio or TCP). It carries frames:
//!
//! ```text
//! length: u32 LE | crc32: u32 LE | payload: `length` bytes (postcard)
//! ```
//!
//! The crc32 (crc32fast) covers the length field and the payload, so a
//! corrupted length is caught as surely as a corrupted body. A frame longer
//! than [`MAX_FRAME`] is refused before anything is allocated for it. A bad
//! frame ends the connection: after a bad crc the stream cannot be trusted
//! to be aligned on a frame boundary again. Errors in what a well-formed
//! frame asks for (a hostile path, say) are answered per operation and the
//! receiver goes on serving.
//!
//! The daemon speaks first with [`Request::Hello`]; the receiver answers
//! [`Reply::Welcome`] or [`Reply::Refused`] (unknown version, bad token).
//! Then:
//!
//! - *Queries* ([`Request::List`], [`Request::Stat`], [`Request::Signature`],
//!   [`Request::Rename`], [`Request::Sync`]) carry an id and are answered
//!   with that id.
//! - *Batches*: any number of [`Request::Op`] frames with the same batch id,
//!   file content in [`Request::Data`] frames (or, for a small file, in its
//!   [`Op::Whole`] frame), then [`Request::EndBatch`];
//!   the receiver answers once per batch with every operation's result
//!   ([`Reply::Batch`]). The daemon keeps several batches in flight: one
//!   round trip per batch, never one per file.
//!
//! postcard (serde) encodes the payloads: compact, and a malformed payload
//! is an error, never a panic. Byte strings go through `serde_bytes`: one
//! length and a copy, not a sequence of separately encoded `u8`s.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::fidelity::Xattrs;
use crate::meta::Meta;

/// Protocol version spoken by this build. Bump on any incompatible change.
/// 2: `Welcome` carries the receiver's boot id.
/// 3: [`Op::Whole`], a small file in one frame.
/// 4: `Op::Whole { fresh }`.
/// 5: `Welcome { root }` and [`Request::Mark`]: the target's identity.
/// 6: fidelity: extended attributes and ACLs with each entry,
///    [`Op::Special`], [`Chunk::Hole`], `Meta::rdev`, [`Done::Partial`].
/// 7: [`Op::Link`], hard links.
/// 8: [`Request::Space`]: a file that did not fit waits for room.
/// 9: [`Request::Hash`] (`verify --checksum` of a remote target) and
///    [`Request::Writable`] (`drmirror check`).
pub const VERSION: u32 = 9;

/// Largest payload accepted. Data chunks are at most [`CHUNK`] bytes, and
/// listings are split well below this.
pub const MAX_FRAME: usize = 4 << 20;

/// File content travels in chunks of at most this many bytes.
pub const CHUNK: usize = 1 << 20;

/// Directory entries per [`Reply::Listing`] frame.
pub const LIST_CHUNK: usize = 8192;

/// Block size for delta transfers of large files (see [`Chunk::Copy`]).
pub const BLOCK: u64 = 64 * 1024;

/// Longest shared token of a `tcp://` target, in bytes.
pub const TOKEN_MAX: usize = 4096;

/// Largest frame a receiver reads before the peer has shown its token: a
/// [`Request::Hello`] with a token of [`TOKEN_MAX`] bytes and a root path
/// of `PATH_MAX` (4,096) fits with room to spare. A stranger cannot make
/// the receiver allocate more than this.
pub const HELLO_MAX: usize = 16 * 1024;

/// Files up to this size travel whole in one [`Op::Whole`] frame instead of
/// a stream of three or more frames: most files of a large tree are small,
/// and per-file framing was a sizeable part of the sender's and the
/// receiver's CPU time per file.
pub const WHOLE_MAX: u64 = 64 * 1024;

/// Files at least this large that the receiver already holds are sent as a
/// delta against its copy.
pub const DELTA_MIN: u64 = 1 << 20;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: u64, limit: usize },
    #[error("frame checksum mismatch (crc32 {got:#010x}, header says {want:#010x})")]
    BadCrc { got: u32, want: u32 },
    #[error("malformed frame payload: {0}")]
    Decode(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// True when the peer simply went away (not a protocol violation).
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Closed | FrameError::Truncated => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// From the daemon to the receiver.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    Hello {
        /// Always [`MAGIC`]: a stray program on the other end fails fast.
        magic: [u8; 8],
        version: u32,
        /// The shared secret of a `tcp://` target (ssh authenticates itself).
        token: Option<String>,
        /// The directory a `tcp://` target names: the receiver refuses the
        /// connection unless it is the one it serves. (An `ssh://` target
        /// starts its receiver with the path on its command line.)
        #[serde(with = "serde_bytes")]
        root: Option<Vec<u8>>,
    },
    /// The entries of directory `dir` (names, metadata, symlink texts,
    /// and their extended attributes in namespaces `ns`; 0: none).
    List {
        id: u64,
        #[serde(with = "serde_bytes")]
        dir: Vec<u8>,
        ns: u8,
    },
    /// `lstat` of one path.
    Stat {
        id: u64,
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
    },
    /// Block hashes of the receiver's copy of `rel`, for a delta.
    Signature {
        id: u64,
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
    },
    /// Rename `from` to `to`; answers whether it was done.
    Rename {
        id: u64,
        #[serde(with = "serde_bytes")]
        from: Vec<u8>,
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
    },
    /// Make everything applied so far durable (syncfs).
    Sync {
        id: u64,
    },
    /// Give the root the target's mark (see [`crate::target::identity`]);
    /// answered by `Done`. Sent once per connection, before anything else
    /// is asked.
    Mark {
        id: u64,
        mark: String,
    },
    Op {
        batch: u64,
        op: Op,
    },
    /// Content of the file opened by `Op::File { file, .. }`.
    Data {
        file: u64,
        chunk: Chunk,
    },
    EndBatch {
        batch: u64,
    },
    /// The bytes free for the receiver on its root's filesystem, answered
    /// by `Space`: a file that failed for want of room is sent again only
    /// once it fits (see `Shipper::space_retry`).
    Space {
        id: u64,
    },
    /// The BLAKE3 hash of the receiver's copy of file `rel`, answered by
    /// [`Reply::Hash`]: what `verify --checksum` compares, computed on the
    /// DR host (by its workers, several files at once) so that a copy is
    /// audited without sending its content back.
    Hash {
        id: u64,
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
    },
    /// Whether the receiver may write beneath its root (permissions, a
    /// read-only mount), answered by `Done`: what `drmirror check` asks
    /// without writing anything.
    Writable {
        id: u64,
    },
}

impl Request {
    /// The request's name, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Hello",
            Request::List { .. } => "List",
            Request::Stat { .. } => "Stat",
            Request::Signature { .. } => "Signature",
            Request::Rename { .. } => "Rename",
            Request::Sync { .. } => "Sync",
            Request::Mark { .. } => "Mark",
            Request::Op { .. } => "Op",
            Request::Data { .. } => "Data",
            Request::EndBatch { .. } => "EndBatch",
            Request::Space { .. } => "Space",
            Request::Hash { .. } => "Hash",
            Request::Writable { .. } => "Writable",
        }
    }
}

pub const MAGIC: [u8; 8] = *b"drmirror";

/// One change inside a batch.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Op {
    /// Ensure a directory exists (attributes follow with `SetAttrs`).
    Mkdir {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
    },
    Symlink {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        #[serde(with = "serde_bytes")]
        text: Vec<u8>,
        meta: Meta,
        /// The entry's extended attributes in the namespaces kept (see
        /// [`crate::fidelity`]); `None`: leave the target's alone.
        xattrs: Option<Xattrs>,
    },
    /// A FIFO, a socket's entry or a device (`meta.kind`, `meta.rdev`).
    Special {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        meta: Meta,
        xattrs: Option<Xattrs>,
    },
    /// Make `rel` another name of the receiver's entry at `to` (an earlier
    /// path: hard links of files, symlinks and special files, see
    /// [`crate::links`]), which must be a current copy of `meta` (same
    /// type, size, mtime and device number), or the operation fails; then
    /// give it `meta`'s attributes and `xattrs`.
    Link {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        #[serde(with = "serde_bytes")]
        to: Vec<u8>,
        meta: Meta,
        xattrs: Option<Xattrs>,
    },
    /// Remove `rel` (recursively); missing is success.
    Delete {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
    },
    SetAttrs {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        meta: Meta,
        xattrs: Option<Xattrs>,
    },
    /// A regular file; its content follows in `Data { file, .. }` frames
    /// ending with [`Chunk::End`]. With `delta`, `Chunk::Copy` refers to
    /// the receiver's current copy of `rel`.
    File {
        file: u64,
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        meta: Meta,
        delta: bool,
        xattrs: Option<Xattrs>,
    },
    /// A regular file of at most [`WHOLE_MAX`] bytes, content included:
    /// verified against `hash` (of the uncompressed content) and put in
    /// place like a streamed one.
    Whole {
        #[serde(with = "serde_bytes")]
        rel: Vec<u8>,
        meta: Meta,
        /// zstd-compressed (targets with `compress = true`).
        zstd: bool,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        hash: ContentHash,
        /// The sender believes the target has nothing at `rel` (it created
        /// the parent directory in this run): the receiver may create the
        /// file at its name directly, never over anything already there.
        fresh: bool,
        xattrs: Option<Xattrs>,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Chunk {
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// zstd-compressed bytes (targets with `compress = true`).
    Zstd(#[serde(with = "serde_bytes")] Vec<u8>),
    /// `len` bytes at `offset` of the receiver's current copy.
    Copy {
        offset: u64,
        len: u64,
    },
    /// A hole of `len` bytes: skipped, never written (a sparse file stays
    /// sparse). The content hash takes it in as [`hole_marker`].
    Hole {
        len: u64,
    },
    /// End of the file: [`ContentHash`] of the whole content as the daemon
    /// read it. `commit = false` abandons it (the source changed while it
    /// was sent).
    End {
        hash: ContentHash,
        commit: bool,
    },
}

/// One entry of a listing.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Entry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub meta: Meta,
    /// Symlink text, for symlinks.
    #[serde(with = "serde_bytes")]
    pub link: Option<Vec<u8>>,
    /// Extended attributes in the namespaces the listing asked for.
    pub xattrs: Option<Xattrs>,
}

impl Entry {
    /// Roughly what the entry takes in a frame: listings are cut well
    /// below [`MAX_FRAME`] by it, as attributes can make entries large.
    pub fn wire_size(&self) -> usize {
        let x = self.xattrs.as_ref().map_or(0, |x| {
            x.list
                .iter()
                .map(|a| a.name.len() + a.value.len() + 8)
                .sum()
        });
        self.name.len() + self.link.as_ref().map_or(0, Vec::len) + x + 80
    }
}

/// What one batched operation did.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Done {
    Ok,
    /// For `Mkdir`: whether the directory had to be created.
    Dir {
        created: bool,
    },
    /// Done, except what the receiver's filesystem or privileges refused
    /// (kinds of [`crate::fidelity::KINDS`]): never retried, counted.
    Partial {
        refused: Vec<String>,
    },
}

/// What a [`Chunk::Hole`] adds to the content hash in place of its zero
/// bytes (hashing gigabytes of zeros would cost what skipping them saves).
pub fn hole_marker(len: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(b"\0hole\0\0\0");
    m[8..].copy_from_slice(&len.to_le_bytes());
    m
}

/// From the receiver to the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Reply {
    Welcome {
        version: u32,
        /// The receiving machine's boot id when its root is on one of its
        /// own disks: what it applied survives the loss of the connection or
        /// of the receiver process, and is lost only if that machine goes
        /// down before a `Sync`. The daemon may then record copies before
        /// they are flushed, under this id (see [`crate::durability`]).
        /// `None`: every copy must be flushed before it is recorded.
        #[serde(with = "serde_bytes")]
        boot: Option<Vec<u8>>,
        /// What the receiver's root shows of itself (device, inode, mark):
        /// the daemon refuses a root that is not its target (see
        /// [`crate::target::identity::settle_seen`]).
        root: crate::target::identity::Seen,
    },
    Refused {
        reason: String,
    },
    /// One part of a listing; `more` says whether another follows. `None`
    /// entries: the directory does not exist.
    Listing {
        id: u64,
        entries: Option<Vec<Entry>>,
        more: bool,
    },
    Stat {
        id: u64,
        meta: Option<Meta>,
    },
    /// Blake3 (first 16 bytes) of each [`BLOCK`] of the file; empty when the
    /// receiver holds no regular file there.
    Signature {
        id: u64,
        size: u64,
        blocks: Vec<[u8; 16]>,
    },
    /// Answer to `Rename` (`Ok(true)`: renamed; `Ok(false)`: `from` is not
    /// there), to `Sync` and `Mark` (`Ok(true)`), and to `Writable`
    /// (`Ok(true)`, or why not).
    Done {
        id: u64,
        result: Result<bool, String>,
    },
    Batch {
        batch: u64,
        results: Vec<Result<Done, String>>,
    },
    /// A query that failed (a hostile path, an I/O error).
    Failed {
        id: u64,
        error: String,
    },
    /// A protocol violation: the receiver closes the connection after it.
    Fatal {
        reason: String,
    },
    Space {
        id: u64,
        free: u64,
    },
    /// Answer to `Hash`; `None` when the receiver holds no regular file
    /// at the path.
    Hash {
        id: u64,
        hash: Option<[u8; 32]>,
    },
}

/// Appends one frame to `out`; returns its length. The payload is encoded
/// in place, after room left for the header: no copy of file content
/// beyond the one into `out`. On an error `out` keeps the frames before.
pub fn encode_frame<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<usize, FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let payload = out.len() - start - 8;
    if payload > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            len: payload as u64,
            limit: MAX_FRAME,
        });
    }
    let len = (payload as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&h.finalize().to_le_bytes());
    Ok(payload + 8)
}

/// A frame around `payload`, which is taken as already encoded: for
/// crafting frames whose payload no request or reply encodes to (the
/// hostile-input tests).
pub fn frame_of_payload(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(&len);
    f.extend_from_slice(&h.finalize().to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<usize, FrameError> {
    let mut buf = Vec::new();
    let n = encode_frame(&mut buf, msg)?;
    w.write_all(&buf)?;
    Ok(n)
}

/// Reads one frame's payload into `buf` (reused between calls).
pub fn read_payload<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    read_payload_max(r, buf, MAX_FRAME)
}

/// [`read_payload`] for frames of at most `limit` bytes: a larger length is
/// refused before anything is allocated for it.
pub fn read_payload_max<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<(), FrameError> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let want = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len as usize > limit {
        return Err(FrameError::TooLarge {
            len: len as u64,
            limit,
        });
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..4]);
    h.update(buf);
    let got = h.finalize();
    if got != want {
        return Err(FrameError::BadCrc { got, want });
    }
    Ok(())
}

/// Decodes a payload read by [`read_payload`].
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Reads and decodes one frame.
pub fn read_frame<R: Read, T: for<'a> Deserialize<'a>>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<T, FrameError> {
    read_payload(r, buf)?;
    decode(buf)
}

/// Reads the shared token of a `tcp://` link from `path` (both ends use
/// it): surrounding whitespace is dropped; an empty token or one longer
/// than [`TOKEN_MAX`] is refused, naming the file.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if token.len() > TOKEN_MAX {
        return Err(format!(
            "{}: the token is {} bytes long; at most {TOKEN_MAX} are allowed",
            path.display(),
            token.len()
        ));
    }
    Ok(token.to_string())
}

/// Checksum of a whole file's content as sent: xxh3-128, as rsync 3.2+
/// uses for the same check. It catches what the frames' crc32 cannot: a
/// file rebuilt wrong from the receiver's blocks (a delta) or written wrong.
/// It need not resist an adversary: the content comes from the daemon's
/// own source, the transport is authenticated (ssh) or trusted (TCP with a
/// token), and a delta's blocks are matched by blake3. On small files,
/// most of a transfer, blake3 cost the sender several times more CPU.
pub type ContentHash = [u8; 16];

/// Computes a [`ContentHash`] over the chunks of a file.
pub struct ContentHasher(xxhash_rust::xxh3::Xxh3);

impl Default for ContentHasher {
    fn default() -> Self {
        Self(xxhash_rust::xxh3::Xxh3::new())
    }
}

impl ContentHasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(&self) -> ContentHash {
        self.0.digest128().to_le_bytes()
    }
}

/// [`ContentHash`] of `data`, in one piece.
pub fn content_hash(data: &[u8]) -> ContentHash {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// Hash of one delta block (blake3, truncated: collisions of 128 bits are
/// not a practical concern, and the whole-file hash is checked anyway).
pub fn block_hash(data: &[u8]) -> [u8; 16] {
    let h = blake3::hash(data);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.as_bytes()[..16]);
    out
}

/// Constant-time comparison of a presented token with the expected one, so
/// response timing does not reveal how much of a guess was right.
pub fn token_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Kind;
    use proptest::prelude::*;

    fn meta() -> Meta {
        Meta {
            kind: Kind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
            ino: 6,
            dev: 7,
            rdev: 0,
            nlink: 0,
        }
    }

    fn frame(msg: &Request) -> Vec<u8> {
        let mut v = Vec::new();
        write_frame(&mut v, msg).expect("encode");
        v
    }

    #[test]
    fn round_trip() {
        let msgs = vec![
            Request::Hello {
                magic: MAGIC,
                version: VERSION,
                token: Some("t".into()),
                root: Some(b"/srv/dr".to_vec()),
            },
            Request::Op {
                batch: 9,
                op: Op::File {
                    file: 1,
                    rel: b"a/\n\xff".to_vec(),
                    meta: meta(),
                    delta: false,
                    xattrs: Some(crate::fidelity::Xattrs {
                        ns: 9,
                        list: vec![crate::fidelity::Xattr {
                            name: b"user.a".to_vec(),
                            value: vec![0, 1, 255],
                        }],
                    }),
                },
            },
            Request::Data {
                file: 1,
                chunk: Chunk::Bytes(vec![1, 2, 3]),
            },
            Request::Op {
                batch: 9,
                op: Op::Whole {
                    rel: b"b\r\xfe".to_vec(),
                    meta: meta(),
                    zstd: true,
                    data: vec![0, 255, 7],
                    hash: content_hash(b"abc"),
                    fresh: true,
                    xattrs: None,
                },
            },
            Request::Data {
                file: 1,
                chunk: Chunk::Hole { len: 1 << 40 },
            },
            Request::Op {
                batch: 9,
                op: Op::Special {
                    rel: b"dev".to_vec(),
                    meta: Meta {
                        kind: Kind::CharDev,
                        rdev: 0x103,
                        nlink: 0,
                        ..meta()
                    },
                    xattrs: None,
                },
            },
            Request::Op {
                batch: 9,
                op: Op::Link {
                    rel: b"d/second".to_vec(),
                    to: b"first".to_vec(),
                    meta: meta(),
                    xattrs: None,
                },
            },
            Request::EndBatch { batch: 9 },
        ];
        // Frames appended to one buffer, as the sender gathers a batch.
        let mut wire = Vec::new();
        for m in &msgs {
            let before = wire.len();
            let n = encode_frame(&mut wire, m).expect("encode");
            assert_eq!(wire.len() - before, n);
        }
        let mut r = &wire[..];
        let mut buf = Vec::new();
        for m in &msgs {
            let got: Request = read_frame(&mut r, &mut buf).expect("decode");
            assert_eq!(&got, m);
        }
        assert!(matches!(
            read_frame::<_, Request>(&mut r, &mut buf),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn an_oversized_frame_is_refused_and_leaves_the_buffer_as_it_was() {
        let mut out = Vec::new();
        encode_frame(&mut out, &Request::Sync { id: 1 }).expect("encode");
        let kept = out.clone();
        let huge = Request::Data {
            file: 1,
            chunk: Chunk::Bytes(vec![0; MAX_FRAME + 1]),
        };
        let r = encode_frame(&mut out, &huge);
        assert!(matches!(r, Err(FrameError::TooLarge { .. })), "{r:?}");
        assert_eq!(out, kept);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let f = frame(&Request::Stat {
            id: 1,
            rel: b"x".to_vec(),
        });
        for i in 0..f.len() * 8 {
            let mut g = f.clone();
            g[i / 8] ^= 1 << (i % 8);
            let mut buf = Vec::new();
            let r = read_frame::<_, Request>(&mut &g[..], &mut buf);
            assert!(r.is_err(), "bit {i} flipped went unnoticed: {r:?}");
        }
    }

    #[test]
    fn content_hash_is_the_same_whatever_the_chunking() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let whole = content_hash(&data);
        for step in [1, 63, 64, 4096, 65_537, CHUNK] {
            let mut h = ContentHasher::default();
            for c in data.chunks(step) {
                h.update(c);
            }
            assert_eq!(h.finish(), whole, "chunks of {step}");
        }
        let mut other = data.clone();
        other[123_456] ^= 1;
        assert_ne!(content_hash(&other), whole);
        assert_ne!(content_hash(&data[1..]), whole);
    }

    #[test]
    fn welcome_carries_the_receivers_boot_or_none_and_its_root() {
        use crate::target::identity::{MarkRead, Seen};
        let marks = [
            MarkRead::Present("ab12 7".into()),
            MarkRead::Missing,
            MarkRead::Unsupported,
            MarkRead::Unreadable("EIO".into()),
        ];
        for (boot, mark) in [Some(b"0d6c\n\xff".to_vec()), None]
            .into_iter()
            .flat_map(|b| marks.clone().map(|m| (b.clone(), m)))
        {
            let msg = Reply::Welcome {
                version: VERSION,
                boot,
                root: Seen {
                    dev: 0x803,
                    ino: 2,
                    mark,
                },
            };
            let mut f = Vec::new();
            write_frame(&mut f, &msg).expect("encode");
            let mut buf = Vec::new();
            let back = read_frame::<_, Reply>(&mut &f[..], &mut buf).expect("decode");
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let f = frame(&Request::Sync { id: 7 });
        for n in 1..f.len() {
            let mut buf = Vec::new();
            let r = read_frame::<_, Request>(&mut &f[..n], &mut buf);
            assert!(matches!(r, Err(FrameError::Truncated)), "{n}: {r:?}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        let mut buf = Vec::new();
        let r = read_frame::<_, Request>(&mut &f[..], &mut buf);
        assert!(matches!(r, Err(FrameError::TooLarge { .. })), "{r:?}");
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_eq(b"secret", b"secret"));
        assert!(!token_eq(b"secret", b"secreT"));
        assert!(!token_eq(b"secret", b"secret1"));
        assert!(!token_eq(b"", b"x"));
        assert!(token_eq(b"", b""));
    }

    proptest! {
        /// The decoder never panics and never accepts garbage as a frame
        /// unless its crc matches.
        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = &bytes[..];
            let mut buf = Vec::new();
            for _ in 0..4 {
                if read_frame::<_, Request>(&mut r, &mut buf).is_err() {
                    break;
                }
            }
        }

        /// Valid payloads of every request with a few bytes changed, under
        /// a matching crc (what the crc cannot catch: a hostile sender):
        /// each decodes to some request or is an error, never a panic, and
        /// what decodes encodes again.
        #[test]
        fn mutated_requests_decode_or_fail_cleanly(
            which in 0usize..10,
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in proptest::option::of(any::<usize>()),
        ) {
            let samples = [
                Request::Hello { magic: MAGIC, version: VERSION, token: Some("tok".into()), root: Some(b"/r".to_vec()) },
                Request::List { id: 1, dir: b"d/e".to_vec(), ns: 1 },
                Request::Stat { id: 2, rel: b"x".to_vec() },
                Request::Signature { id: 3, rel: b"big".to_vec() },
                Request::Rename { id: 4, from: b"a".to_vec(), to: b"b".to_vec() },
                Request::Sync { id: 5 },
                Request::Op { batch: 6, op: Op::File { file: 7, rel: b"f".to_vec(), meta: meta(), delta: true, xattrs: None } },
                Request::Op { batch: 6, op: Op::Whole { rel: b"w".to_vec(), meta: meta(), zstd: false, data: vec![1; 40], hash: content_hash(&[1; 40]), fresh: false, xattrs: None } },
                Request::Data { file: 7, chunk: Chunk::Copy { offset: 65536, len: 4096 } },
                Request::EndBatch { batch: 6 },
            ];
            let mut payload = postcard::to_allocvec(&samples[which]).expect("encode");
            for (at, byte) in edits {
                let i = at % payload.len();
                payload[i] = byte;
            }
            if let Some(c) = cut {
                payload.truncate(c % (payload.len() + 1));
            }
            let f = frame_of_payload(&payload);
            let mut buf = Vec::new();
            if let Ok(req) = read_frame::<_, Request>(&mut &f[..], &mut buf) {
                let mut again = Vec::new();
                prop_assert!(encode_frame(&mut again, &req).is_ok());
            }
        }

        /// A valid frame header over an arbitrary payload: decoding errors,
        /// never panics.
        #[test]
        fn arbitrary_payload_with_valid_crc(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let f = frame_of_payload(&payload);
            let mut buf = Vec::new();
            let _ = read_frame::<_, Request>(&mut &f[..], &mut buf);
            let _ = read_frame::<_, Reply>(&mut &f[..], &mut buf);
        }
    }

    #[test]
    fn a_token_file_is_trimmed_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("token");
        std::fs::write(&f, " secret\n").expect("write");
        assert_eq!(read_token_file(&f).as_deref(), Ok("secret"));
        std::fs::write(&f, "\n").expect("write");
        assert!(read_token_file(&f).expect_err("empty").contains("is empty"));
        std::fs::write(&f, "x".repeat(TOKEN_MAX + 1)).expect("write");
        let e = read_token_file(&f).expect_err("too long");
        assert!(e.contains("at most 4096"), "{e}");
        // The longest token still fits a Hello's frame, with a root path of
        // PATH_MAX.
        let hello = Request::Hello {
            magic: MAGIC,
            version: VERSION,
            token: Some("x".repeat(TOKEN_MAX)),
            root: Some(vec![b'/'; 4096]),
        };
        let mut out = Vec::new();
        let n = encode_frame(&mut out, &hello).expect("encode");
        assert!(n <= HELLO_MAX, "{n}");
    }
}
