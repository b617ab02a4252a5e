//! Where capture believes each object it saw renamed now is, to be checked
//! against the filesystem once the kernel queue is drained.
//!
//! Why: fanotify *merges* an event into an equal one still queued (same
//! object, same directories and names, same process: `fanotify_should_merge`
//! in the kernel), and a `FAN_RENAME` is no exception. Directories swapped
//! through a temporary name (`mv p tmp; mv q p; mv tmp q`) repeat the same
//! three renames every other swap, so while capture lags, a later swap's
//! renames fold into an earlier one's and are never reported: no overflow,
//! nothing in the events says so. Capture then files the directories under
//! each other's names, the target is renamed to match, and files alike in
//! size and mtime keep the other directory's content (the swap tests found
//! it: `q/id` held `p`'s byte, and nothing said so).
//!
//! Invariants:
//! - Every rename capture reports inside the source records its object's
//!   handle and the absolute path it was moved to; a later rename of the
//!   object, or of a directory above where it went, updates that path
//!   ([`Renamed::moved`]).
//! - Once the queue is empty, every recorded object is looked up by handle
//!   and compared (device and inode) with what is at its recorded path.
//!   One that is not there was moved by a rename capture never saw: its
//!   recorded path, and its real one when it can be found, are compared
//!   again by the caller. Checking while events are still queued would
//!   only add false alarms, which cost a compare, never a wrong copy.
//! - The map is bounded: a rename storm that never lets the queue drain is
//!   checked every [`LIMIT`] objects instead (again: false alarms at worst).

use std::collections::HashMap;

use crate::paths;

/// Objects recorded before they are checked even though events are still
/// queued.
pub const LIMIT: usize = 4096;

/// Renamed objects: handle key (see [`super::fid::Fid::key`]) → the
/// absolute path capture believes the object is at.
#[derive(Default)]
pub struct Renamed {
    at: HashMap<Vec<u8>, Vec<u8>>,
}

impl Renamed {
    /// Object `key` was renamed from `from` to `to` (`None`: out of the
    /// source, where it is no longer capture's concern). What was recorded
    /// below a directory moves with it.
    pub fn moved(&mut self, key: Vec<u8>, from: &[u8], to: Option<&[u8]>, is_dir: bool) {
        if is_dir {
            for p in self.at.values_mut() {
                if paths::is_within(p, from) && p.len() > from.len() {
                    *p = match to {
                        Some(to) => paths::rebase(p, from, to),
                        // Gone with its directory: nothing to check there.
                        None => Vec::new(),
                    };
                }
            }
            self.at.retain(|_, p| !p.is_empty());
        }
        match to {
            Some(to) => {
                self.at.insert(key, to.to_vec());
            }
            None => {
                self.at.remove(&key);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.at.len() >= LIMIT
    }

    /// Everything recorded, for a check; the map starts empty again.
    pub fn take(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.at.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_moved_into_a_directory_follows_it() {
        let mut r = Renamed::default();
        r.moved(b"f".to_vec(), b"/s/a", Some(b"/s/d/x"), false);
        r.moved(b"d".to_vec(), b"/s/d", Some(b"/s/e"), true);
        r.moved(b"g".to_vec(), b"/s/b", Some(b"/s/de"), false);
        let mut got = r.take();
        got.sort();
        assert_eq!(
            got,
            vec![
                (b"d".to_vec(), b"/s/e".to_vec()),
                (b"f".to_vec(), b"/s/e/x".to_vec()),
                (b"g".to_vec(), b"/s/de".to_vec()),
            ]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn moved_out_of_the_source_is_forgotten_with_what_it_held() {
        let mut r = Renamed::default();
        r.moved(b"f".to_vec(), b"/s/a", Some(b"/s/d/x"), false);
        r.moved(b"d".to_vec(), b"/s/d", None, true);
        assert!(r.is_empty());
    }
}
