//! How long the single writer stalls while a large full topic grows by single inserts: loads
//! N keys as one snapshot (as a sidecar does), then applies and flushes N * 3/8 inserts of new
//! keys one batch each, timing every one. Prints the percentiles and the five longest with
//! the insert they happened at: the ordered index's merge (when its overlays pass a quarter of
//! the arena) and each shard's table growing (the tables are planned for the snapshot's count).
//!
//! ```sh
//! cargo run --release --example writer_stalls -- 1000000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use viewcar::config::Mode;
use viewcar::hub::Hub;
use viewcar::internals::{BatchChange, Clock, SnapEntry, Step, Writer, WriterStats};
use viewcar::store::{Source, SourceKind};

fn key(i: usize) -> String {
    format!("k{i:09}")
}

fn main() {
    let keys: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n >= 8 => n,
        Some(_) => {
            eprintln!("usage: writer_stalls [KEYS >= 8]");
            std::process::exit(2);
        }
    };
    let source = Arc::new(Source::new(
        "t",
        SourceKind::Topic {
            origin: Arc::from("o"),
        },
        Mode::Full,
        Clock::new(),
        Duration::from_secs(10),
    ));
    let mut writer = Writer::without_views(Arc::new(Hub::new()), Arc::new(WriterStats::default()));
    // Even keys in the snapshot; the inserts are odd keys, new ones spread over the key range.
    let entries: Vec<SnapEntry> = (0..keys)
        .map(|i| SnapEntry {
            key: key(i * 2),
            value: Bytes::from(vec![b'x'; 100]),
            version: 1,
        })
        .collect();
    let mut events = Vec::new();
    let started = Instant::now();
    writer.apply(
        Step::SnapshotChunk {
            in_flight: None,
            total: keys as u64,
            source: source.clone(),
            epoch: "e".into(),
            version: 1,
            entries: entries.into(),
            last: true,
        },
        &mut events,
    );
    writer.flush(&mut events);
    println!("loaded {keys} keys in {:?}", started.elapsed());

    let n = keys / 4 + keys / 8;
    let mut took: Vec<(Duration, usize)> = Vec::with_capacity(n);
    for j in 0..n {
        let step = Step::Batch {
            source: source.clone(),
            epoch: "e".into(),
            version: 2 + j as u64,
            changes: vec![BatchChange {
                key: key((j * 7919 % keys) * 2 + 1),
                value: Some(Bytes::from_static(b"y")),
            }],
        };
        let t = Instant::now();
        writer.apply(step, &mut events);
        writer.flush(&mut events);
        took.push((t.elapsed(), j));
    }
    let mut sorted: Vec<Duration> = took.iter().map(|t| t.0).collect();
    sorted.sort();
    let at = |q: f64| sorted[((n as f64 * q) as usize).min(n - 1)];
    took.sort_by_key(|t| std::cmp::Reverse(t.0));
    println!(
        "{n} single inserts: p50 {:?}, p99 {:?}, p99.99 {:?}, max {:?}",
        at(0.5),
        at(0.99),
        at(0.9999),
        sorted[n - 1]
    );
    for (d, j) in took.iter().take(5) {
        println!("  {d:?} at insert #{j}");
    }
}
