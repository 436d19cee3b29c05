//! The store's read path against a bare DashMap, and the writer applying change batches.
//!
//! `cargo bench --bench store`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dashmap::DashMap;
use viewcar::config::Mode;
use viewcar::hub::Hub;
use viewcar::internals::{BatchChange, Clock, SnapEntry, Step, Writer, WriterStats};
use viewcar::store::{Row, Source, SourceKind};

const KEYS: usize = 100_000;

fn key(i: usize) -> String {
    format!("p{i:06}")
}

fn value(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"p{i:06}","amount":{},"currency":"EUR"}}"#,
        i * 7 % 99_999
    ))
}

fn source() -> Arc<Source> {
    Arc::new(Source::new(
        "prices",
        SourceKind::Topic {
            origin: Arc::from("catalog"),
        },
        Mode::Full,
        Clock::new(),
        Duration::from_secs(10),
    ))
}

fn loaded(writer: &mut Writer, source: &Arc<Source>) {
    let entries: Vec<SnapEntry> = (0..KEYS)
        .map(|i| SnapEntry {
            key: key(i),
            value: value(i),
            version: 1,
        })
        .collect();
    let mut events = Vec::new();
    writer.apply(
        Step::SnapshotChunk {
            in_flight: None,
            total: entries.len() as u64,
            source: source.clone(),
            epoch: "e".into(),
            version: 1,
            entries: entries.into(),
            last: true,
        },
        &mut events,
    );
    writer.flush(&mut events);
}

fn new_writer() -> Writer {
    Writer::without_views(Arc::new(Hub::new()), Arc::new(WriterStats::default()))
}

fn get(c: &mut Criterion) {
    let src = source();
    loaded(&mut new_writer(), &src);
    let bare: DashMap<Arc<str>, Row> = DashMap::new();
    for i in 0..KEYS {
        bare.insert(
            Arc::from(key(i)),
            Row {
                value: value(i),
                version: 1,
            },
        );
    }
    let keys: Vec<String> = (0..4096).map(|i| key(i * 24 % KEYS)).collect();
    let mut g = c.benchmark_group("get");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("source_get", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(src.get(black_box(&keys[i])))
        })
    });
    let mut i = 0;
    g.bench_function("bare_dashmap_get", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(
                bare.get(black_box(keys[i].as_str()))
                    .map(|r| r.value().clone()),
            )
        })
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    let src = source();
    let mut writer = new_writer();
    loaded(&mut writer, &src);
    let mut g = c.benchmark_group("apply");
    for per_batch in [1usize, 10, 100] {
        g.throughput(Throughput::Elements(1));
        let mut version = 1u64;
        let mut n = 0usize;
        g.bench_function(format!("batch_of_{per_batch}"), |b| {
            b.iter_batched(
                || {
                    version += 1;
                    let changes = (0..per_batch)
                        .map(|_| {
                            n = (n + 7919) % KEYS;
                            BatchChange {
                                key: key(n),
                                value: Some(value(n + version as usize)),
                            }
                        })
                        .collect();
                    Step::Batch {
                        source: src.clone(),
                        epoch: "e".into(),
                        version,
                        changes,
                    }
                },
                |op| {
                    let mut events = Vec::with_capacity(per_batch);
                    writer.apply(op, &mut events);
                    writer.flush(&mut events);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, get, apply);
criterion_main!(benches);
