//! A model of the journal's backlog: random sequences of captured changes
//! (in batches that mix paths and renames), shipper reads, completions from
//! reads that newer changes have overtaken, requeues and reopenings, for
//! two targets, against a plain in-memory map of what must be pending.
//!
//! What it holds the journal to (see `src/journal.rs`'s module doc):
//! - a change is pending for every target until a completion that read it,
//!   or a newer change to the same path, is done: a completion never drops
//!   a change it did not read;
//! - entries coalesce per path: newest sequence number, flags OR-ed, except
//!   `ABSENT`, which holds only if every coalesced entry said so;
//! - a rename moves the pending entries at and below its source to its
//!   destination, marks both paths, and waits in sequence order until a
//!   completion names it;
//! - all of it survives a reopen, and sequence numbers are never reused.
//!
//! `PROPTEST_CASES=5000 cargo test --release --test it journal_model` is the
//! long form.

use std::collections::BTreeMap;

use drmirror::journal::{flags, Change, Completion, Journal, TargetId};
use proptest::prelude::*;

/// The paths the changes are drawn from: few, so that they collide, nest
/// and rename into one another.
const PATHS: [&str; 8] = ["a", "a/b", "a/b/c", "a/c", "b", "b/c", "c", "c/a"];

const FLAGS: [u8; 5] = [
    flags::RECURSIVE,
    flags::CONTENT,
    flags::STARTUP,
    flags::LIVE,
    flags::ABSENT,
];

#[derive(Clone, Debug)]
enum Op {
    /// `record` of these changes (index into PATHS; a rename is two).
    Record(Vec<ChangeSpec>),
    /// A shipper of target `t` reads its backlog now (the snapshot a later
    /// `Complete` works from).
    Read(usize),
    /// Target `t` completes the entries and renames of its last read that
    /// `pick` selects, and requeues some paths.
    Complete {
        t: usize,
        pick: u64,
        requeue: Vec<(usize, u8)>,
    },
    Reopen,
}

#[derive(Clone, Debug)]
enum ChangeSpec {
    Dirty(usize, u8),
    Rename(usize, usize),
}

fn flag_set() -> impl Strategy<Value = u8> {
    proptest::collection::vec(proptest::bool::ANY, FLAGS.len()).prop_map(|on| {
        on.iter()
            .zip(FLAGS)
            .filter(|(on, _)| **on)
            .fold(0, |acc, (_, f)| acc | f)
    })
}

fn change() -> impl Strategy<Value = ChangeSpec> {
    prop_oneof![
        3 => (0..PATHS.len(), flag_set()).prop_map(|(p, f)| ChangeSpec::Dirty(p, f)),
        1 => (0..PATHS.len(), 0..PATHS.len()).prop_map(|(a, b)| ChangeSpec::Rename(a, b)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(change(), 1..6).prop_map(Op::Record),
        2 => (0..2usize).prop_map(Op::Read),
        2 => (
            0..2usize,
            any::<u64>(),
            proptest::collection::vec((0..PATHS.len(), flag_set()), 0..3)
        )
            .prop_map(|(t, pick, requeue)| Op::Complete { t, pick, requeue }),
        1 => Just(Op::Reopen),
    ]
}

/// What must be pending for one target.
#[derive(Default)]
struct Backlog {
    /// path → (seq, flags)
    pending: BTreeMap<Vec<u8>, (u64, u8)>,
    /// seq → (from, to)
    renames: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    read: Option<Read>,
}

/// A shipper's read of its backlog: entries with their seqs, and the
/// renames' seqs.
#[derive(Clone, Default)]
struct Read {
    entries: Vec<(Vec<u8>, u64)>,
    renames: Vec<u64>,
}

fn merge(a: (u64, u8), b: (u64, u8)) -> (u64, u8) {
    let absent = a.1 & b.1 & flags::ABSENT;
    (a.0.max(b.0), ((a.1 | b.1) & !flags::ABSENT) | absent)
}

fn within(p: &[u8], dir: &[u8]) -> bool {
    p == dir || (p.starts_with(dir) && p.get(dir.len()) == Some(&b'/'))
}

impl Backlog {
    fn put(&mut self, path: Vec<u8>, v: (u64, u8)) {
        let e = self.pending.entry(path).or_insert(v);
        *e = merge(*e, v);
    }

    fn rename(&mut self, seq: u64, from: &[u8], to: &[u8]) {
        self.renames.insert(seq, (from.to_vec(), to.to_vec()));
        let moved: Vec<(Vec<u8>, (u64, u8))> = self
            .pending
            .iter()
            .filter(|(p, _)| within(p, from))
            .map(|(p, v)| (p.clone(), *v))
            .collect();
        for (p, _) in &moved {
            self.pending.remove(p);
        }
        for (p, (_, f)) in moved {
            let np = [to, &p[from.len()..]].concat();
            self.put(np, (seq, f));
        }
        self.put(from.to_vec(), (seq, flags::LIVE));
        self.put(to.to_vec(), (seq, flags::LIVE));
    }
}

struct Model {
    seq: u64,
    targets: [Backlog; 2],
}

fn check(j: &Journal, ids: &[TargetId; 2], m: &Model) -> Result<(), TestCaseError> {
    for (i, &t) in ids.iter().enumerate() {
        let got: BTreeMap<Vec<u8>, (u64, u8)> = j
            .pending_batch(t, None, 1000)
            .unwrap()
            .into_iter()
            .map(|(p, v)| (p, (v.seq, v.flags)))
            .collect();
        prop_assert_eq!(&got, &m.targets[i].pending, "pending of target {}", i);
        let renames: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = j
            .renames(t, 1000)
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, (r.from, r.to)))
            .collect();
        prop_assert_eq!(&renames, &m.targets[i].renames, "renames of target {}", i);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    let ids = [j.target_id("one").unwrap(), j.target_id("two").unwrap()];
    let mut m = Model {
        seq: j.seq_now(),
        targets: Default::default(),
    };
    for op in ops {
        match op {
            Op::Record(specs) => record(&j, &ids, &mut m, &specs),
            Op::Read(t) => {
                let b = &mut m.targets[t];
                let entries = j.pending_batch(ids[t], None, 1000).unwrap();
                let renames = j.renames(ids[t], 1000).unwrap();
                b.read = Some(Read {
                    entries: entries.into_iter().map(|(p, v)| (p, v.seq)).collect(),
                    renames: renames.into_iter().map(|r| r.seq).collect(),
                });
            }
            Op::Complete { t, pick, requeue } => {
                complete(&j, ids[t], &mut m, t, pick, requeue);
            }
            Op::Reopen => {
                drop(j);
                j = Journal::open(dir.path()).unwrap();
                prop_assert_eq!(
                    [j.target_id("one").unwrap(), j.target_id("two").unwrap()],
                    ids
                );
                // Never reused: a completion read before the reopen must not
                // match a change recorded after it.
                prop_assert!(j.seq_now() >= m.seq, "seq went back to {}", j.seq_now());
                m.seq = j.seq_now();
            }
        }
        check(&j, &ids, &m)?;
    }
    Ok(())
}

fn record(j: &Journal, ids: &[TargetId; 2], m: &mut Model, specs: &[ChangeSpec]) {
    let changes: Vec<Change> = specs
        .iter()
        .filter_map(|c| match *c {
            ChangeSpec::Dirty(p, f) => Some(Change::Dirty {
                path: PATHS[p].as_bytes().to_vec(),
                flags: f,
            }),
            // A directory cannot move into itself.
            ChangeSpec::Rename(a, b) => {
                let (from, to) = (PATHS[a].as_bytes(), PATHS[b].as_bytes());
                (!within(from, to) && !within(to, from)).then(|| Change::Rename {
                    from: from.to_vec(),
                    to: to.to_vec(),
                })
            }
        })
        .collect();
    if changes.is_empty() {
        return;
    }
    j.record(ids, &changes).unwrap();
    for c in changes {
        m.seq += 1;
        for b in &mut m.targets {
            match &c {
                Change::Dirty { path, flags } => b.put(path.clone(), (m.seq, *flags)),
                Change::Rename { from, to } => b.rename(m.seq, from, to),
            }
        }
    }
}

fn complete(
    j: &Journal,
    id: TargetId,
    m: &mut Model,
    t: usize,
    pick: u64,
    requeue: Vec<(usize, u8)>,
) {
    let Read { entries, renames } = m.targets[t].read.clone().unwrap_or_default();
    let chosen = |i: usize| pick >> (i % 64) & 1 == 1;
    let c = Completion {
        done: entries
            .iter()
            .enumerate()
            .filter(|(i, _)| chosen(*i))
            .map(|(_, e)| e.clone())
            .collect(),
        renames_done: renames
            .iter()
            .enumerate()
            .filter(|(i, _)| chosen(*i + 32))
            .map(|(_, s)| *s)
            .collect(),
        requeue: requeue
            .iter()
            .map(|&(p, f)| (PATHS[p].as_bytes().to_vec(), f))
            .collect(),
        ..Default::default()
    };
    j.complete(id, &c).unwrap();
    let b = &mut m.targets[t];
    for (p, seq) in &c.done {
        if b.pending.get(p).is_some_and(|v| v.0 == *seq) {
            b.pending.remove(p);
        }
    }
    for s in &c.renames_done {
        b.renames.remove(s);
    }
    for (p, f) in c.requeue {
        m.seq += 1;
        m.targets[t].put(p, (m.seq, f));
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_backlog_matches_its_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
