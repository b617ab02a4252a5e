//! Opening the journal, and what happens when it is corrupt.
//!
//! A journal RocksDB reports corrupt (at open, or while the last run used
//! it: that run leaves [`MARKER`] in the state directory as it exits) is,
//! with `on_corrupt_journal = "rebuild"` (the default), moved aside as
//! `journal.corrupt-<unix time>` (the newest [`KEEP`] are kept for
//! inspection) and replaced by a fresh one. A fresh journal knows nothing
//! of the target, so the startup scan compares the whole tree against the
//! target itself (never against an index), and what was pending when the
//! old journal broke is found by that compare: nothing is lost, and the
//! mirror is protected again without a human. With `"refuse"` the daemon
//! exits with code 2 and a message naming the setting.

use std::path::{Path, PathBuf};

use crate::config::{Config, OnCorruptJournal};
use crate::daemon::DaemonError;
use crate::journal::Journal;

/// Left in the state directory by a run that found its journal corrupt.
pub const MARKER: &str = "journal-corrupt";
/// Corrupt journals kept for inspection.
pub const KEEP: usize = 3;
const ASIDE_PREFIX: &str = "journal.corrupt-";

/// The journal, and where a corrupt one was moved (`None`: none was).
pub fn open(cfg: &Config, jpath: &Path) -> Result<(Journal, Option<PathBuf>), DaemonError> {
    let marker = cfg.state_dir.join(MARKER);
    let why = match std::fs::read_to_string(&marker) {
        Ok(m) => format!("the last run found it corrupt ({})", m.trim()),
        Err(_) => match Journal::open(jpath) {
            Ok(j) => return Ok((j, None)),
            Err(e) if e.is_corruption() => e.to_string(),
            Err(source) => {
                return Err(DaemonError::Journal {
                    path: jpath.to_path_buf(),
                    source,
                })
            }
        },
    };
    if cfg.on_corrupt_journal == OnCorruptJournal::Refuse {
        return Err(DaemonError::CorruptJournal {
            path: jpath.to_path_buf(),
            why,
        });
    }
    let aside = move_aside(&cfg.state_dir, jpath).map_err(|source| DaemonError::StateDir {
        path: jpath.to_path_buf(),
        source,
    })?;
    let _ = std::fs::remove_file(&marker);
    tracing::error!(
        "journal {} is corrupt ({why}): moved aside to {}; starting a fresh journal and \
         comparing the whole tree with every target (on_corrupt_journal = \"rebuild\")",
        jpath.display(),
        aside.display()
    );
    let j = Journal::open(jpath).map_err(|source| DaemonError::Journal {
        path: jpath.to_path_buf(),
        source,
    })?;
    Ok((j, Some(aside)))
}

/// Notes, for the next start, that the journal was found corrupt while
/// this run used it, at startup or later (a table file read fails only
/// when a read reaches it, and the open succeeds again).
pub fn note_if_corrupt(state_dir: &Path, e: &DaemonError) {
    if let Some(je) = e.journal_error().filter(|je| je.is_corruption()) {
        let _ = std::fs::write(state_dir.join(MARKER), je.to_string());
    }
}

fn move_aside(state_dir: &Path, jpath: &Path) -> std::io::Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = state_dir.join(format!("{ASIDE_PREFIX}{now:012}"));
    let mut n = 1;
    while aside.exists() {
        aside = state_dir.join(format!("{ASIDE_PREFIX}{now:012}.{n}"));
        n += 1;
    }
    if jpath.exists() {
        std::fs::rename(jpath, &aside)?;
    }
    prune(state_dir);
    Ok(aside)
}

/// Removes all but the newest [`KEEP`] journals moved aside.
fn prune(state_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return;
    };
    let mut old: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(ASIDE_PREFIX))
        .map(|e| e.path())
        .collect();
    old.sort();
    let extra = old.len().saturating_sub(KEEP);
    for p in old.into_iter().take(extra) {
        if let Err(e) = std::fs::remove_dir_all(&p) {
            tracing::warn!("cannot remove the old corrupt journal {}: {e}", p.display());
        }
    }
}
