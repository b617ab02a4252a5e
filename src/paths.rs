//! Relative paths as raw bytes.
//!
//! Every path drmirror stores or ships is relative to a root (the source, or a
//! target) and kept as the kernel's bytes: Linux names may hold newlines and
//! invalid UTF-8, and a DR mirror must copy them exactly. The empty path is the
//! root itself. Components are separated by a single `/`; there is never a
//! leading or trailing `/`, `.` or `..` (see [`validate`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Splits `rel` into (parent, name). The root has no name.
pub fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// The parent of `rel`, or `None` for the root.
pub fn parent(rel: &[u8]) -> Option<&[u8]> {
    if rel.is_empty() {
        None
    } else {
        Some(split(rel).0)
    }
}

/// `rel`, its parent, and so on up to the root (the empty path).
pub fn ancestors_or_self(rel: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::successors(Some(rel), |p| parent(p))
}

/// `base/name`, or `name` when `base` is the root.
pub fn join(base: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(base.len() + 1 + name.len());
    out.extend_from_slice(base);
    if !base.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// True when `rel` is `dir` itself or lies below it.
pub fn is_within(rel: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || rel == dir || (rel.starts_with(dir) && rel.get(dir.len()) == Some(&b'/'))
}

/// Replaces the prefix `from` of `rel` (which must be within `from`) by `to`.
pub fn rebase(rel: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let rest = &rel[from.len()..];
    if to.is_empty() {
        rest.strip_prefix(b"/").unwrap_or(rest).to_vec()
    } else if from.is_empty() && !rest.is_empty() {
        let mut v = to.to_vec();
        v.push(b'/');
        v.extend_from_slice(rest);
        v
    } else {
        let mut v = to.to_vec();
        v.extend_from_slice(rest);
        v
    }
}

/// Why a relative path is unacceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("absolute path")]
    Absolute,
    #[error("path component `..` or `.`")]
    DotComponent,
    #[error("empty path component")]
    EmptyComponent,
    #[error("NUL byte in path")]
    Nul,
}

/// Checks that `rel` is a clean relative path as described in the module docs.
pub fn validate(rel: &[u8]) -> Result<(), PathError> {
    if rel.is_empty() {
        return Ok(());
    }
    if rel[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if rel.contains(&0) {
        return Err(PathError::Nul);
    }
    for comp in rel.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(PathError::EmptyComponent),
            b"." | b".." => return Err(PathError::DotComponent),
            _ => {}
        }
    }
    Ok(())
}

/// The relative path of `abs` under `root`, if it is under it.
pub fn relative_to(abs: &Path, root: &Path) -> Option<Vec<u8>> {
    abs.strip_prefix(root)
        .ok()
        .map(|p| p.as_os_str().as_bytes().to_vec())
}

/// `root/rel` as a filesystem path (for messages and path-based std APIs).
pub fn under(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// A printable rendering of a raw path: non-printable bytes and invalid UTF-8
/// are escaped so that one difference is always one line of output.
pub fn display(rel: &[u8]) -> String {
    if rel.is_empty() {
        return ".".to_string();
    }
    let mut out = String::with_capacity(rel.len());
    for chunk in rel.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join() {
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a", b"x"), b"a/x");
        assert_eq!(parent(b""), None);
        assert_eq!(parent(b"a"), Some(&b""[..]));
    }

    #[test]
    fn within_and_rebase() {
        assert!(is_within(b"a/b", b"a"));
        assert!(is_within(b"a", b"a"));
        assert!(!is_within(b"ab", b"a"));
        assert!(is_within(b"x", b""));
        assert_eq!(rebase(b"a/b/c", b"a/b", b"z"), b"z/c");
        assert_eq!(rebase(b"a/b", b"a/b", b"z/y"), b"z/y");
        assert_eq!(rebase(b"a/b", b"a", b""), b"b");
    }

    #[test]
    fn validation() {
        assert_eq!(validate(b"/etc"), Err(PathError::Absolute));
        assert_eq!(validate(b"a/../b"), Err(PathError::DotComponent));
        assert_eq!(validate(b"a//b"), Err(PathError::EmptyComponent));
        assert_eq!(validate(b"a/"), Err(PathError::EmptyComponent));
        assert!(validate(b"a b/\n/\xff").is_ok());
    }

    fn arb_rel() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        // Components of arbitrary bytes except '/' and NUL, never "." or "..".
        let comp = proptest::collection::vec(1u8..=255, 1..6)
            .prop_filter("no slash", |c| !c.contains(&b'/'))
            .prop_filter("no dots", |c| c != b"." && c != b"..");
        proptest::collection::vec(comp, 0..5).prop_map(|cs| cs.join(&b'/'))
    }

    proptest::proptest! {
        #[test]
        fn split_join_roundtrip(rel in arb_rel()) {
            proptest::prop_assert!(validate(&rel).is_ok());
            if !rel.is_empty() {
                let (p, n) = split(&rel);
                proptest::prop_assert_eq!(join(p, n), rel.clone());
                proptest::prop_assert!(is_within(&rel, p));
            }
        }

        #[test]
        fn rebase_moves_subtrees(a in arb_rel(), b in arb_rel(), rest in arb_rel()) {
            proptest::prop_assume!(!a.is_empty() && !rest.is_empty());
            let inside = join(&a, &rest);
            let moved = rebase(&inside, &a, &b);
            proptest::prop_assert_eq!(moved.clone(), join(&b, &rest));
            proptest::prop_assert!(validate(&moved).is_ok());
            proptest::prop_assert!(is_within(&moved, &b));
        }
    }

    #[test]
    fn ancestors_go_up_to_the_root() {
        let up: Vec<&[u8]> = ancestors_or_self(b"a/b/c").collect();
        assert_eq!(up, [&b"a/b/c"[..], b"a/b", b"a", b""]);
        assert_eq!(ancestors_or_self(b"").count(), 1);
    }

    #[test]
    fn display_escapes() {
        assert_eq!(display(b"a\nb"), "a\\nb");
        assert_eq!(display(b"x\xffy"), "x\\xffy");
        assert_eq!(display(b""), ".");
    }
}
