//! Journal ingest: captured changes persisted per second.
//!
//! Three figures from the same run, so that the ratio means something on a
//! noisy shared machine:
//! - `raw_rocksdb_put`: plain batched RocksDB puts of path-sized keys (the ceiling);
//! - `journal_distinct`: `Journal::record` of distinct paths (no coalescing);
//! - `journal_coalesced`: `Journal::record` of writes to 100 hot files.
//!
//! Run: `cargo bench --bench journal_ingest` (criterion prints elements/s).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use drmirror::journal::{flags, Change, Journal};

const BATCH: usize = 1000;

fn paths(n: usize, offset: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            format!(
                "data/project-{:04}/src/module_{:06}.rs",
                (i + offset) % 5000,
                i + offset
            )
            .into_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_ingest");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);

    let dir = tempfile::tempdir().expect("tempdir");
    let raw = rocksdb::DB::open_default(dir.path().join("raw")).expect("open raw");
    let mut n = 0usize;
    g.bench_function("raw_rocksdb_put", |b| {
        b.iter(|| {
            let mut wb = rocksdb::WriteBatch::default();
            for p in paths(BATCH, n) {
                wb.put(&p, [0u8; 17]);
            }
            n += BATCH;
            raw.write(wb).expect("write");
        })
    });

    let j = Journal::open(&dir.path().join("j1")).expect("open journal");
    let t = j.target_id("bench").expect("target");
    let mut n = 0usize;
    g.bench_function("journal_distinct", |b| {
        b.iter(|| {
            let ch: Vec<Change> = paths(BATCH, n)
                .into_iter()
                .map(|path| Change::Dirty {
                    path,
                    flags: flags::CONTENT | flags::LIVE,
                })
                .collect();
            n += BATCH;
            j.record(&[t], &ch).expect("record");
        })
    });

    let j2 = Journal::open(&dir.path().join("j2")).expect("open journal");
    let t2 = j2.target_id("bench").expect("target");
    let hot = paths(100, 0);
    g.bench_function("journal_coalesced", |b| {
        b.iter(|| {
            let ch: Vec<Change> = (0..BATCH)
                .map(|i| Change::Dirty {
                    path: hot[i % hot.len()].clone(),
                    flags: flags::CONTENT | flags::LIVE,
                })
                .collect();
            j2.record(&[t2], &ch).expect("record");
        })
    });
    g.finish();
    let coalesced = j2.pending_count(t2).expect("count");
    assert_eq!(
        coalesced, 100,
        "coalescing must leave one entry per hot path"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
