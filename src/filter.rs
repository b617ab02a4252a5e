//! Excludes: gitignore syntax, matched on paths relative to the source root.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// The compiled `exclude` list.
#[derive(Clone, Debug)]
pub struct Filter {
    gi: Gitignore,
}

impl Filter {
    pub fn new(root: &Path, patterns: &[String]) -> Result<Filter, ignore::Error> {
        let mut b = GitignoreBuilder::new(root);
        for p in patterns {
            b.add_line(None, p)?;
        }
        Ok(Filter { gi: b.build()? })
    }

    /// A filter that excludes nothing.
    pub fn none() -> Filter {
        Filter {
            gi: Gitignore::empty(),
        }
    }

    /// True when `rel` (or one of its parents) is excluded.
    pub fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        if rel.is_empty() || self.gi.is_empty() {
            return false;
        }
        self.gi
            .matched_path_or_any_parents(Path::new(OsStr::from_bytes(rel)), is_dir)
            .is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignore_semantics() {
        let f = Filter::new(
            Path::new("/src"),
            &[
                "*.tmp".into(),
                "cache/".into(),
                "/top-only".into(),
                "!keep.tmp".into(),
            ],
        )
        .unwrap();
        assert!(f.excluded(b"a.tmp", false));
        assert!(f.excluded(b"d/e/a.tmp", false));
        assert!(!f.excluded(b"d/keep.tmp", false));
        assert!(f.excluded(b"x/cache", true));
        assert!(!f.excluded(b"x/cache", false));
        assert!(f.excluded(b"x/cache/deep/file", false));
        assert!(f.excluded(b"top-only", false));
        assert!(!f.excluded(b"d/top-only", false));
        assert!(!f.excluded(b"bad\xffname", false));
        assert!(!Filter::none().excluded(b"a.tmp", false));
    }
}
