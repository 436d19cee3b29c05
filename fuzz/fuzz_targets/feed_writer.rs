//! The writer fed an arbitrary sequence of feed steps (snapshot chunks, aborts, batches,
//! progress) for two sources, decoded by hand from the input, and checked after every step
//! against a model: a completed snapshot leaves the source holding exactly its entries, a batch
//! applies on top, and the store's ordered index, byte count and version agree with its rows.

#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use viewcar::config::Mode;
use viewcar::hub::Hub;
use viewcar::internals::{BatchChange, Clock, SnapEntry, Step, Writer, WriterStats};
use viewcar::store::{Source, SourceKind};

/// The input, one byte at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn key(&mut self) -> String {
        // Few keys, so that steps overwrite and delete each other's rows; some share prefixes.
        let b = self.byte();
        format!("k{}", b % 12)
    }

    fn value(&mut self) -> Vec<u8> {
        let b = self.byte();
        vec![b'v'; usize::from(b % 5)]
    }

    fn epoch(&mut self) -> String {
        format!("e{}", self.byte() % 3)
    }
}

type Rows = BTreeMap<String, (Vec<u8>, u64)>;

#[derive(Default)]
struct Model {
    rows: Rows,
    epoch: String,
    version: u64,
    staged: Option<(String, u64, Rows)>,
}

fn check(source: &Source, m: &Model, step: usize) {
    let ks = source.keyspace();
    let got: Rows = ks
        .scan("", None, usize::MAX)
        .into_iter()
        .map(|(k, r)| (k.to_string(), (r.value.to_vec(), r.version)))
        .collect();
    assert_eq!(got, m.rows, "rows of {} after step {step}", source.name());
    assert_eq!(ks.len(), m.rows.len(), "len after step {step}");
    let keys: Vec<String> = ks.keys().iter().map(|k| k.to_string()).collect();
    let want: Vec<String> = m.rows.keys().cloned().collect();
    assert_eq!(keys, want, "ordered index after step {step}");
    let bytes: usize = m.rows.iter().map(|(k, (v, _))| k.len() + v.len()).sum();
    assert_eq!(ks.bytes(), bytes as u64, "byte count after step {step}");
    for (k, (v, ver)) in &m.rows {
        let row = source.get(k).expect("a modelled row is readable");
        assert_eq!((&row.value[..], row.version), (&v[..], *ver));
    }
    assert_eq!(source.version(), m.version, "version after step {step}");
    assert_eq!(*source.epoch(), m.epoch, "epoch after step {step}");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let sources: Vec<Arc<Source>> = ["a", "b"]
        .iter()
        .map(|name| {
            Arc::new(Source::new(
                name,
                SourceKind::Topic {
                    origin: Arc::from("o"),
                },
                Mode::Full,
                Clock::new(),
                Duration::from_secs(10),
            ))
        })
        .collect();
    let mut models: Vec<Model> = vec![Model::default(), Model::default()];
    let mut writer = Writer::without_views(Arc::new(Hub::new()), Arc::new(WriterStats::default()));
    let mut events = Vec::new();
    let mut step = 0;
    while !input.0.is_empty() && step < 512 {
        step += 1;
        let tag = input.byte();
        let i = usize::from(tag >> 7);
        let source = sources[i].clone();
        let m = &mut models[i];
        let op = match tag % 4 {
            0 => {
                let epoch = input.epoch();
                let version = u64::from(input.byte() % 16);
                let n = input.byte() % 8;
                let last = tag & 0x10 != 0;
                let entries: Vec<SnapEntry> = (0..n)
                    .map(|_| SnapEntry {
                        key: input.key(),
                        value: Bytes::from(input.value()),
                        version: u64::from(input.byte() % 16),
                    })
                    .collect();
                let fresh = !matches!(&m.staged, Some((e, v, _)) if *e == epoch && *v == version);
                if fresh {
                    m.staged = Some((epoch.clone(), version, Rows::new()));
                }
                if let Some((_, _, rows)) = m.staged.as_mut() {
                    for e in &entries {
                        rows.insert(e.key.clone(), (e.value.to_vec(), e.version));
                    }
                }
                if last {
                    if let Some((e, v, rows)) = m.staged.take() {
                        m.rows = rows;
                        m.epoch = e;
                        m.version = v;
                    }
                }
                Step::SnapshotChunk {
                    source,
                    epoch,
                    version,
                    entries,
                    last,
                    // A hint, right or wrong: it may size the table, never change the rows.
                    total: u64::MAX >> (input.byte() % 65).min(63),
                }
            }
            1 => {
                m.staged = None;
                Step::AbortSnapshot { source }
            }
            2 => {
                let epoch = input.epoch();
                let version = u64::from(input.byte() % 16);
                let n = input.byte() % 8;
                let changes: Vec<BatchChange> = (0..n)
                    .map(|_| {
                        let key = input.key();
                        let value = input.value();
                        let delete = input.byte() & 1 == 0;
                        BatchChange {
                            key,
                            value: (!delete).then(|| Bytes::from(value)),
                        }
                    })
                    .collect();
                if !(version <= m.version && m.epoch == epoch) {
                    for c in &changes {
                        match &c.value {
                            Some(v) => {
                                m.rows.insert(c.key.clone(), (v.to_vec(), version));
                            }
                            None => {
                                m.rows.remove(&c.key);
                            }
                        }
                    }
                    m.epoch = epoch.clone();
                    m.version = version;
                }
                Step::Batch {
                    source,
                    epoch,
                    version,
                    changes,
                }
            }
            _ => {
                let epoch = input.epoch();
                let version = u64::from(input.byte() % 16);
                if m.epoch == epoch && version > m.version {
                    m.version = version;
                }
                Step::Progress {
                    source,
                    epoch,
                    version,
                }
            }
        };
        writer.apply(op, &mut events);
        if input.byte() & 1 == 0 {
            writer.flush(&mut events);
        }
        for (s, m) in sources.iter().zip(&models) {
            check(s, m, step);
        }
    }
    writer.flush(&mut events);
});
