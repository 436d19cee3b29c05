//! View maintenance on one core: the demo catalog (3000 products) with the demo views, changes
//! applied through the writer's code and the engine exactly as in a running sidecar.
//!
//! - `product_page/*`: changes that recompute product_page rows. Throughput is in recomputed
//!   rows (each group reports how many rows one change recomputes), so criterion's elem/s is
//!   affected-row recomputes per second.
//! - `untouched/*`: a change to a topic no view reads, with the demo views declared and with no
//!   views at all: the cost views add to changes they do not care about.
//!
//! Time is the benchmark thread's own CPU time (`/proc/thread-self/schedstat`), not wall time,
//! so the figures are per core even on a machine shared with other work; where that file is
//! missing, wall time is used.
//!
//! `cargo bench --bench views` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use viewcar::demo::{self, CatalogSize};
use viewcar::views::ViewSpec;
use viewcar::Standalone;

/// The demo topics plus one that no view reads.
const TOPICS: [&str; 7] = [
    "products",
    "prices",
    "inventory",
    "brands",
    "countries",
    "reviews",
    "sessions",
];

fn loaded(views: &[ViewSpec]) -> (Standalone, Vec<(&'static str, Vec<viewcar::Put>)>) {
    let mut s = Standalone::new(&TOPICS, views, Vec::new()).expect("demo views build");
    let catalog = demo::catalog(CatalogSize::default(), 1);
    for (topic, puts) in &catalog {
        let entries = puts
            .iter()
            .filter_map(|p| Some((p.key.clone(), p.value.clone()?)))
            .collect();
        s.load(topic, entries).expect("demo topic");
    }
    (s, catalog)
}

/// Nanoseconds this thread has run on a CPU.
fn cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Runs `f` `iters` times and returns the CPU time it took (wall time without schedstat).
fn timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let (cpu, wall) = (cpu_ns(), Instant::now());
    for _ in 0..iters {
        f();
    }
    match (cpu, cpu_ns()) {
        (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
        _ => wall.elapsed(),
    }
}

fn bytes(v: Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// Rows of product_page that one change recomputes, measured once through the counters.
fn recomputes_per_change(s: &mut Standalone, topic: &str, key: &str, v: Value) -> u64 {
    let stats = s.view_stats("product_page").expect("product_page").clone();
    let before = stats.recomputes.load(Ordering::Relaxed);
    s.apply(topic, vec![(key.to_string(), Some(bytes(v)))])
        .expect("apply");
    stats.recomputes.load(Ordering::Relaxed) - before
}

fn product_page(c: &mut Criterion) {
    let (mut s, catalog) = loaded(&demo::views());
    let mut g = c.benchmark_group("product_page");

    // One price: one row.
    let active = catalog[0]
        .1
        .iter()
        .find(|p| {
            serde_json::from_slice::<Value>(p.value.as_ref().expect("put"))
                .is_ok_and(|v| v["status"] == "active")
        })
        .map(|p| p.key.clone())
        .expect("an active product");
    let price = |n: u64| json!({"id": active, "amount": 1000 + n % 2, "currency": "EUR"});
    let rows = recomputes_per_change(&mut s, "prices", &active, price(1));
    g.throughput(Throughput::Elements(rows));
    let mut n = 0u64;
    g.bench_function(format!("price_change_{rows}_row"), |b| {
        b.iter_custom(|iters| {
            timed(iters, || {
                n += 1;
                black_box(
                    s.apply("prices", vec![(active.clone(), Some(bytes(price(n))))])
                        .expect("apply"),
                );
            })
        })
    });

    // One brand: every product of the brand.
    let brand =
        |n: u64| json!({"id": "b007", "name": format!("Brand {}", n % 2), "country_id": "SE"});
    let rows = recomputes_per_change(&mut s, "brands", "b007", brand(1));
    g.throughput(Throughput::Elements(rows));
    g.bench_function(format!("brand_change_{rows}_rows"), |b| {
        b.iter_custom(|iters| {
            timed(iters, || {
                n += 1;
                black_box(
                    s.apply("brands", vec![("b007".into(), Some(bytes(brand(n))))])
                        .expect("apply"),
                );
            })
        })
    });

    // One country: every product of every brand of the country.
    let country =
        |n: u64| json!({"id": "SE", "name": "Sweden", "currency": "SEK", "vat": 20 + n % 2});
    let rows = recomputes_per_change(&mut s, "countries", "SE", country(1));
    g.throughput(Throughput::Elements(rows));
    g.bench_function(format!("country_change_{rows}_rows"), |b| {
        b.iter_custom(|iters| {
            timed(iters, || {
                n += 1;
                black_box(
                    s.apply("countries", vec![("SE".into(), Some(bytes(country(n))))])
                        .expect("apply"),
                );
            })
        })
    });
    g.finish();
}

fn untouched(c: &mut Criterion) {
    let mut g = c.benchmark_group("untouched");
    g.throughput(Throughput::Elements(1));
    for (name, views) in [("no_views", Vec::new()), ("demo_views", demo::views())] {
        let (mut s, _) = loaded(&views);
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(iters, || {
                    n += 1;
                    let v = json!({"user": "u1", "seen": n});
                    black_box(
                        s.apply("sessions", vec![(format!("s{}", n % 1000), Some(bytes(v)))])
                            .expect("apply"),
                    );
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, product_page, untouched);
criterion_main!(benches);
