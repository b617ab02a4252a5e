//! `drmirror check`: what a start would do, doing none of it (rsync's
//! `-n`, zrepl's `configcheck`).
//!
//! The configuration was validated by loading it. Then each target: a
//! local one exists (or can be created) and can be written; a remote one is
//! reached (ssh or TCP: the receiver's protocol version and the token are
//! accepted) and its receiver can write beneath its root. Then the source
//! is compared with each target as a first start compares them (by
//! metadata, with [`crate::verify`]'s comparison), and what that start
//! would do is reported: files to copy, directories to make, entries whose
//! attributes it sets, entries it deletes (the delete mode permitting), and
//! whether the guard against a wrong target (see [`crate::target::adopt`])
//! would refuse it.
//!
//! Invariant: nothing is written anywhere — no directory or mark on a
//! target, no journal (the state directory is only looked at).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Config, Target};
use crate::fsops::Root;
use crate::meta::Kind;
use crate::paths;
use crate::scan;
use crate::target::identity::{MarkRead, Seen};
use crate::target::remote::RemoteTarget;
use crate::verify::{self, Mirror};

/// What a first start would do on one target.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries other than directories to copy, with their bytes.
    pub copy: Vec<(Vec<u8>, u64)>,
    /// Directories to make.
    pub mkdir: Vec<Vec<u8>>,
    /// Entries in place whose attributes (mode, owner, mtime of a
    /// directory, extended attributes, ACLs) would be set.
    pub attrs: Vec<Vec<u8>>,
    /// Entries the source lacks: deleted.
    pub extra: Vec<Vec<u8>>,
    /// Entries the source holds as another type: replaced by its copy.
    pub replace: Vec<Vec<u8>>,
    /// Those two, counting what the directories among them hold (what the
    /// guard against a wrong target counts).
    pub extra_entries: u64,
    /// Entries other than directories already in place.
    pub in_place: u64,
    /// Paths that could not be read on either side.
    pub unreadable: Vec<String>,
}

/// How a difference `verify` reports is applied: kinds of difference that
/// take a copy of the entry (any other is an attribute to set).
const COPIED: [&str; 7] = [
    "size", "mtime", "content", "symlink", "rdev", "sparse", "hardlink",
];

impl Plan {
    /// Bytes to copy.
    pub fn bytes(&self) -> u64 {
        self.copy.iter().map(|(_, b)| b).sum()
    }

    /// The plan for source `src` against `mirror`, under `opts` (no
    /// checksums: a start trusts what matches in metadata).
    pub fn of(src: &Path, mirror: &Mirror<'_>, opts: &verify::Options) -> io::Result<Plan> {
        let report = verify::verify(src, mirror, opts).map_err(io::Error::other)?;
        let source = Root::open(src)?;
        // One path may carry several differences (size and mtime).
        let mut by_path: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
        for d in report.differences {
            by_path.entry(d.path).or_default().push(d.what);
        }
        let mut plan = Plan::default();
        let mut copied_here = 0;
        for (path, whats) in by_path {
            if let Some(w) = whats.iter().find(|w| w.starts_with("unreadable")) {
                plan.unreadable
                    .push(format!("{w}: {}", paths::display(&path)));
                continue;
            }
            let kind = |w: &String| {
                w.strip_prefix("differs(")
                    .and_then(|k| k.strip_suffix(')'))
                    .map(str::to_string)
            };
            let kinds: Vec<String> = whats.iter().filter_map(kind).collect();
            let replaced = kinds.iter().any(|k| k == "type");
            let missing = whats.iter().any(|w| w == "missing") || replaced;
            if whats.iter().any(|w| w == "extra") || replaced {
                plan.extra_entries += mirror_subtree(mirror, &path)?;
                match replaced {
                    true => plan.replace.push(path.clone()),
                    false => plan.extra.push(path.clone()),
                }
            }
            let Some(meta) = source.lstat(&path)? else {
                continue;
            };
            let is_dir = meta.kind == Kind::Dir;
            if missing {
                if !is_dir {
                    copied_here += 1;
                }
                plan.add_subtree(&source, &path, meta, opts);
            } else if !is_dir && kinds.iter().any(|k| COPIED.contains(&k.as_str())) {
                copied_here += 1;
                plan.copy.push((path, crate::sync::file_bytes(&meta)));
            } else if !kinds.is_empty() {
                plan.attrs.push(path);
            }
        }
        plan.in_place = report.files.saturating_sub(copied_here);
        plan.copy.sort();
        plan.mkdir.sort();
        Ok(plan)
    }

    /// Source entry `path` (`meta`) and, for a directory, all it holds
    /// that is mirrored: to copy or make.
    fn add_subtree(
        &mut self,
        source: &Root,
        path: &[u8],
        meta: crate::meta::Meta,
        opts: &verify::Options,
    ) {
        if meta.kind != Kind::Dir {
            self.copy
                .push((path.to_vec(), crate::sync::file_bytes(&meta)));
            return;
        }
        self.mkdir.push(path.to_vec());
        let found = std::sync::Mutex::new(Vec::new());
        let failed = std::sync::Mutex::new(Vec::new());
        scan::walk(
            source,
            path,
            |_, children| {
                let mut f = crate::locks::lock(&found);
                for c in children.iter_mut() {
                    if !opts.keep.mirrors_kind(c.meta.kind)
                        || opts.filter.excluded(&c.rel, c.meta.kind == Kind::Dir)
                    {
                        c.descend = false;
                        continue;
                    }
                    f.push((c.rel.clone(), c.meta));
                }
            },
            |p, e| {
                crate::locks::lock(&failed).push(format!("unreadable({e}): {}", paths::display(p)))
            },
        );
        self.unreadable
            .extend(failed.into_inner().unwrap_or_else(|p| p.into_inner()));
        for (rel, m) in found.into_inner().unwrap_or_else(|p| p.into_inner()) {
            match m.kind {
                Kind::Dir => self.mkdir.push(rel),
                _ => self.copy.push((rel, crate::sync::file_bytes(&m))),
            }
        }
    }
}

/// Entries in the mirror's subtree `path`, itself included.
fn mirror_subtree(mirror: &Mirror<'_>, path: &[u8]) -> io::Result<u64> {
    let n = AtomicU64::new(1);
    let count = |_: &[u8], c: &mut [scan::Child]| {
        n.fetch_add(c.len() as u64, Ordering::Relaxed);
    };
    match mirror {
        Mirror::Local(r) => {
            if r.lstat(path)?.is_some_and(|m| m.kind == Kind::Dir) {
                scan::walk(r, path, count, |_, _| {});
            }
        }
        Mirror::Remote(t) => {
            if t.lstat(path)?.is_some_and(|m| m.kind == Kind::Dir) {
                t.walk(path, count, |_, _| {});
            }
        }
    }
    Ok(n.into_inner())
}

/// How a start would go for one target.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
pub enum Outcome {
    /// It would start and write to the target.
    Ready,
    /// It would start, and wait for the target (unreachable, or not
    /// writable yet).
    Waits,
    /// It would refuse to start.
    Refused,
}

impl Outcome {
    /// `drmirror check`'s exit code for the worst outcome.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ready => 0,
            Outcome::Waits => 1,
            Outcome::Refused => 2,
        }
    }
}

/// Checks every target of `cfg` (see the module doc), printing what it
/// finds (and with `list`, every path); returns the worst outcome.
pub fn run(cfg: &Config, list: bool, out: &mut dyn io::Write) -> io::Result<Outcome> {
    let journal = cfg.state_dir.join("journal");
    writeln!(
        out,
        "config: ok: source {}, {} target(s), delete = {}, state {}{}",
        cfg.source.display(),
        cfg.targets.len(),
        cfg.delete.describe(),
        cfg.state_dir.display(),
        if journal.exists() {
            " (holds a journal: a start resumes from it; below is what a first start would do)"
        } else {
            ""
        }
    )?;
    let owner = rustix::process::geteuid().is_root();
    let opts = verify::Options {
        checksum: false,
        owner,
        filter: crate::filter::Filter::new(&cfg.source, &cfg.exclude)
            .map_err(|e| io::Error::other(format!("`exclude`: {e}")))?,
        keep: cfg.keep,
        progress: None,
    };
    let mut worst = Outcome::Ready;
    for t in &cfg.targets {
        let o = target(cfg, t, &opts, journal.exists(), list, out)?;
        worst = worst.max(o);
    }
    writeln!(
        out,
        "check: {}",
        match worst {
            Outcome::Ready => "a start would succeed",
            Outcome::Waits => "a start would wait for a target (see above)",
            Outcome::Refused => "a start would be refused (see above)",
        }
    )?;
    Ok(worst)
}

/// One target: reachable and writable, then its plan.
fn target(
    cfg: &Config,
    t: &Target,
    opts: &verify::Options,
    has_journal: bool,
    list: bool,
    out: &mut dyn io::Write,
) -> io::Result<Outcome> {
    match &t.remote {
        Some(spec) => {
            let rt = RemoteTarget::new(&t.name, spec.clone(), opts.owner).keeping(cfg.keep);
            let name = format!("target {} ({})", t.name, rt.describe());
            if rt.ready().is_err() {
                let why = rt.unreachable_reason().unwrap_or_default();
                writeln!(out, "{name}: cannot be reached: {why}")?;
                return Ok(Outcome::Waits);
            }
            if let Err(e) = rt.writable() {
                writeln!(out, "{name}: reachable, but not writable: {e}")?;
                return Ok(Outcome::Waits);
            }
            writeln!(
                out,
                "{name}: reachable (protocol {}), writable",
                crate::protocol::VERSION
            )?;
            let first = !has_journal && !marked(&rt.root_seen()?);
            report(cfg, t, &Mirror::Remote(&rt), opts, first, list, out)
        }
        None => {
            let name = match t.path.display().to_string() {
                p if p == t.name => format!("target {p}"),
                p => format!("target {} ({p})", t.name),
            };
            if !t.path.exists() {
                let parent = nearest_existing(&t.path);
                return Ok(match writable_path(&parent) {
                    Ok(()) => {
                        writeln!(
                            out,
                            "{name}: does not exist; a start creates it and copies the whole source"
                        )?;
                        Outcome::Ready
                    }
                    Err(e) => {
                        writeln!(
                            out,
                            "{name}: does not exist, and cannot be created in {}: {e}",
                            parent.display()
                        )?;
                        Outcome::Refused
                    }
                });
            }
            if let Err(e) = writable_path(&t.path) {
                writeln!(out, "{name}: not writable: {e}")?;
                return Ok(Outcome::Refused);
            }
            writeln!(out, "{name}: writable")?;
            let root = Root::open(&t.path)?;
            let first = !has_journal && !marked(&Seen::of(root.fd())?);
            report(cfg, t, &Mirror::Local(root), opts, first, list, out)
        }
    }
}

/// Whether a target's root carries drmirror's mark (written to before).
fn marked(seen: &Seen) -> bool {
    matches!(seen.mark, MarkRead::Present(_))
}

fn nearest_existing(p: &Path) -> std::path::PathBuf {
    p.ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

fn writable_path(p: &Path) -> io::Result<()> {
    let dir = rustix::fs::open(
        p,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    crate::fsops::writable(dir)
}

/// The plan for target `t` (`first`: drmirror never wrote there), printed.
fn report(
    cfg: &Config,
    t: &Target,
    mirror: &Mirror<'_>,
    opts: &verify::Options,
    first: bool,
    list: bool,
    out: &mut dyn io::Write,
) -> io::Result<Outcome> {
    let plan = Plan::of(&cfg.source, mirror, opts)?;
    let deletes = cfg.delete.at_startup();
    if list {
        for (p, _) in &plan.copy {
            writeln!(out, "copy: {}", paths::display(p))?;
        }
        for p in &plan.mkdir {
            writeln!(out, "mkdir: {}", paths::display(p))?;
        }
        for p in &plan.attrs {
            writeln!(out, "attrs: {}", paths::display(p))?;
        }
        let verb = if deletes { "delete" } else { "keep" };
        for p in &plan.extra {
            writeln!(out, "{verb}: {}", paths::display(p))?;
        }
        for p in &plan.replace {
            writeln!(out, "replace: {}", paths::display(p))?;
        }
    }
    for u in &plan.unreadable {
        writeln!(out, "  {u}")?;
    }
    writeln!(
        out,
        "  a first start would copy {} files ({}), make {} directories, set the attributes of {} entries; {} files are in place",
        plan.copy.len(),
        crate::progress::bytes(plan.bytes()),
        plan.mkdir.len(),
        plan.attrs.len(),
        plan.in_place,
    )?;
    if plan.extra.is_empty() && plan.replace.is_empty() {
        return Ok(Outcome::Ready);
    }
    let what = format!(
        "{} entries the source lacks and {} it holds as another type ({} with what they hold)",
        plan.extra.len(),
        plan.replace.len(),
        plan.extra_entries
    );
    if !deletes {
        writeln!(
            out,
            "  it would leave in place the {} entries the source lacks (delete = {}), and replace {}",
            plan.extra.len(),
            cfg.delete.describe(),
            plan.replace.len()
        )?;
        return Ok(Outcome::Ready);
    }
    if first && !t.adopt {
        // A local target stops the start; a remote one's connection is
        // refused, and the target stays down until adopted.
        let (outcome, how) = match mirror {
            Mirror::Local(_) => (Outcome::Refused, "a start refuses to delete them (exit 2)"),
            Mirror::Remote(_) => (
                Outcome::Waits,
                "a start refuses to write there, and the target stays down",
            ),
        };
        writeln!(
            out,
            "  REFUSED: the target holds {what}, and drmirror never wrote to it: {how}. If it is \
             the mirror, adopt it: `adopt = true` on the target, or `--adopt-target`"
        )?;
        return Ok(outcome);
    }
    writeln!(out, "  it would delete or replace {what}")?;
    Ok(Outcome::Ready)
}
