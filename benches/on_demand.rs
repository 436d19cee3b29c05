//! on_demand reads beside full-replica reads, in a running sidecar fed by a real origin over
//! loopback gRPC: the store read path a Get takes, without the Cache API around it.
//!
//! - `hit/*`: one read of a resident key (`OnDemand::get`, moka) and of a full replica
//!   (`Source::get`, DashMap).
//! - `miss/on_demand`: one read of a key that is not resident: subscribe it on the feed stream,
//!   one `Feed.Fetch` to the origin over loopback, insert. Keys are read in a cycle far larger
//!   than the budget, so every read misses.
//! - `zipf/*`: reads of keys drawn from Zipf(1.0) over [`KEYS`] keys, with an on_demand budget of
//!   10% of them (misses fetch), beside the same sequence read from a full replica. Throughput
//!   is in reads; the hit ratio of the on_demand run is printed after the group. `sequential`
//!   is one reader; `concurrent` spreads the same reads over [`READERS`] tasks.
//!
//! - `hit/view_on_demand`, `miss/view_on_demand`, `zipf/sequential/view_on_demand`: the same
//!   for the on_demand view `od_page` (one row per key of `od`, including `full[id]`; budget
//!   twice the topic's, for rows twice the size): a hit reads a resident row; a miss asks the
//!   writer for the row, fetches `od[key]` (one round), and asks again.
//!
//! Wall time (the fetches wait on the network and on the origin's threads).
//!
//! `cargo bench --bench on_demand` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use viewcar::config::{ByteSize, Dur, Mode, OriginSpec, TopicSpec};
use viewcar::store::on_demand::ENTRY_OVERHEAD;
use viewcar::store::{OnDemand, Source, ViewCache};
use viewcar::views::ViewSpec;
use viewcar::{Origin, OriginConfig, Sidecar, SidecarConfig};

/// Keys of each topic at the origin.
const KEYS: usize = 100_000;
/// Reads per measured batch of the Zipf groups.
const BATCH: usize = 1_000;
/// Tasks of the `zipf/concurrent` runs.
const READERS: usize = 16;

fn key(i: usize) -> String {
    format!("p{i:06}")
}

fn value(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"p{i:06}","amount":{},"currency":"EUR","pad":"{:048}"}}"#,
        i * 7 % 99_999,
        i
    ))
}

fn per_key() -> u64 {
    (key(0).len() + value(0).len()) as u64 + ENTRY_OVERHEAD
}

/// Ranks drawn from Zipf(s = 1.0) over `n` ranks: the inverse of the cumulative weights.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|r| {
                acc += 1.0 / r as f64;
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// An origin with `full` and `od` (the same keys), and a sidecar holding `full` as a full
/// replica and `od` on_demand within `od_bytes`.
struct Setup {
    sidecar: Sidecar,
    full: Arc<Source>,
    od: Arc<OnDemand>,
    view: Arc<ViewCache>,
    _origin: Origin,
}

async fn setup(od_bytes: u64) -> Setup {
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let origin = Origin::new(OriginConfig {
        listen: loopback,
        ..OriginConfig::default()
    });
    for topic in ["full", "od"] {
        let puts: Vec<viewcar::Put> = (0..KEYS)
            .map(|i| viewcar::Put::upsert(key(i), value(i)))
            .collect();
        for chunk in puts.chunks(1000) {
            origin.publish(topic, chunk.to_vec()).expect("seed");
        }
    }
    let listener = TcpListener::bind(loopback).await.expect("bind origin");
    let addr = listener.local_addr().expect("origin address");
    let serving = origin.clone();
    tokio::spawn(async move {
        let _ = serving.serve(listener, std::future::pending()).await;
    });

    let mut cfg = SidecarConfig::default();
    cfg.listen.grpc = loopback.into();
    cfg.feed.backoff_initial = Dur(Duration::from_millis(10));
    cfg.origins = vec![OriginSpec {
        name: "o".to_string(),
        address: format!("http://{addr}"),
        fallback: Vec::new(),
        topics: vec![
            TopicSpec {
                name: "full".to_string(),
                mode: Mode::Full,
                max_bytes: None,
                idle: None,
            },
            TopicSpec {
                name: "od".to_string(),
                mode: Mode::OnDemand,
                max_bytes: Some(ByteSize(od_bytes)),
                idle: None,
            },
        ],
        tls: None,
    }];
    // Rows of about twice a value: the row of `od` plus `full[id]`.
    cfg.views = vec![ViewSpec::new("od_page", "od")
        .include("full_row", "full", "id")
        .on_demand(od_bytes * 2)];
    let sidecar = Sidecar::start(cfg).await.expect("sidecar starts");
    sidecar.synced().await;
    let full = sidecar.store().source("full").expect("full").clone();
    let od = sidecar
        .store()
        .source("od")
        .and_then(|s| s.on_demand())
        .expect("od")
        .clone();
    // The feed connects in the background: read until a Fetch answers.
    let start = Instant::now();
    while od.get(&key(0)).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "feed never up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let view = sidecar
        .store()
        .source("od_page")
        .and_then(|s| s.view_cache())
        .expect("od_page")
        .clone();
    Setup {
        sidecar,
        full,
        od,
        view,
        _origin: origin,
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn hit_and_miss(c: &mut Criterion) {
    let rt = runtime();
    // Room for 1,000 keys: the miss cycle over 100,000 never finds one resident.
    let s = rt.block_on(setup(per_key() * 1_000));
    let hot: Vec<String> = (0..100).map(key).collect();
    rt.block_on(async {
        for k in &hot {
            s.od.get(k).await.expect("warm");
            s.view.get(k).await.expect("warm");
        }
        s.od.sync().await;
        s.view.sync();
    });

    let mut g = c.benchmark_group("hit");
    g.bench_function("on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters as usize {
                    black_box(s.od.get(&hot[i % hot.len()]).await.expect("hit"));
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("full_replica", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters as usize {
                black_box(s.full.get(&hot[i % hot.len()]));
            }
            start.elapsed()
        })
    });
    g.bench_function("view_on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters as usize {
                    black_box(s.view.get(&hot[i % hot.len()]).await.expect("hit"));
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("miss");
    g.sample_size(20);
    let mut next = 1_000usize;
    let fetches = s.od.stats().fetches.load(Ordering::Relaxed);
    g.bench_function("on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    next = (next + 1) % KEYS;
                    black_box(s.od.get(&key(next)).await.expect("miss"));
                }
                start.elapsed()
            })
        })
    });
    let fetched = s.od.stats().fetches.load(Ordering::Relaxed) - fetches;
    // The view's budget holds about 1,000 rows too: a cycle far beyond it always misses.
    let mut next_row = 50_000usize;
    g.bench_function("view_on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    next_row = 50_000 + (next_row + 1) % (KEYS / 2);
                    black_box(s.view.get(&key(next_row)).await.expect("miss"));
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    let vs = s.view.stats();
    println!(
        "miss/view_on_demand: {} rounds of fetching, {} hits, {} misses in all",
        vs.fetches.load(Ordering::Relaxed),
        vs.hits.load(Ordering::Relaxed),
        vs.misses.load(Ordering::Relaxed)
    );
    let st = s.od.stats();
    println!(
        "miss/on_demand: {fetched} fetches, {} hits, {} misses in all",
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed)
    );
    rt.block_on(s.sidecar.shutdown());
}

fn zipf(c: &mut Criterion) {
    let rt = runtime();
    let s = Arc::new(rt.block_on(setup(per_key() * KEYS as u64 / 10)));
    let dist = Zipf::new(KEYS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Keys are ranked in a shuffled order, so that hot keys are spread over the key space.
    let mut rank_to_key: Vec<usize> = (0..KEYS).collect();
    for i in (1..KEYS).rev() {
        rank_to_key.swap(i, rng.random_range(0..=i));
    }
    let seq: Arc<Vec<String>> = Arc::new(
        (0..1 << 20)
            .map(|_| key(rank_to_key[dist.sample(&mut rng)]))
            .collect(),
    );
    // Warm the cache with the distribution itself, as a running sidecar would be.
    rt.block_on(async {
        for k in seq.iter().take(200_000) {
            s.od.get(k).await.expect("warm");
            s.view.get(k).await.expect("warm");
        }
        s.od.sync().await;
        s.view.sync();
    });
    let st = s.od.stats().clone();
    let (h0, m0) = (
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed),
    );

    let mut g = c.benchmark_group("zipf");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    let mut at = 0usize;
    g.bench_function("sequential/on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        at = (at + 1) % seq.len();
                        black_box(s.od.get(&seq[at]).await.expect("read"));
                    }
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("sequential/full_replica", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                for _ in 0..BATCH {
                    at = (at + 1) % seq.len();
                    black_box(s.full.get(&seq[at]));
                }
            }
            start.elapsed()
        })
    });
    let (h1, m1) = (
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed),
    );
    let vs = s.view.stats().clone();
    let (vh0, vm0) = (
        vs.hits.load(Ordering::Relaxed),
        vs.misses.load(Ordering::Relaxed),
    );
    g.bench_function("sequential/view_on_demand", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        at = (at + 1) % seq.len();
                        black_box(s.view.get(&seq[at]).await.expect("read"));
                    }
                }
                start.elapsed()
            })
        })
    });
    let (vh1, vm1) = (
        vs.hits.load(Ordering::Relaxed),
        vs.misses.load(Ordering::Relaxed),
    );
    for (name, on_demand) in [
        ("concurrent/on_demand", true),
        ("concurrent/full_replica", false),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let reads = iters as usize * BATCH;
                let base = at;
                at = (at + reads) % seq.len();
                rt.block_on(async {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..READERS)
                        .map(|r| {
                            let (s, seq) = (s.clone(), seq.clone());
                            tokio::spawn(async move {
                                let mut i = r;
                                while i < reads {
                                    let k = &seq[(base + i) % seq.len()];
                                    if on_demand {
                                        black_box(s.od.get(k).await.expect("read"));
                                    } else {
                                        black_box(s.full.get(k));
                                    }
                                    i += READERS;
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.expect("reader");
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    let (h2, m2) = (
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed),
    );
    let ratio = |h: u64, m: u64| 100.0 * h as f64 / (h + m).max(1) as f64;
    rt.block_on(s.od.sync());
    s.view.sync();
    println!(
        "zipf view_on_demand hit ratio: sequential {:.1}% ({} reads); resident {} rows / {} \
         bytes of a {} byte budget",
        ratio(vh1 - vh0, vm1 - vm0),
        vh1 - vh0 + vm1 - vm0,
        s.view.resident_keys(),
        s.view.resident_bytes(),
        s.view.max_bytes(),
    );
    println!(
        "zipf on_demand hit ratio: sequential {:.1}% ({} reads), concurrent {:.1}% ({} reads); \
         resident {} keys / {} bytes of a {} byte budget; coalesced waits {}",
        ratio(h1 - h0, m1 - m0),
        h1 - h0 + m1 - m0,
        ratio(h2 - h1, m2 - m1),
        h2 - h1 + m2 - m1,
        s.od.resident_keys(),
        s.od.resident_bytes(),
        s.od.max_bytes(),
        st.coalesced.load(Ordering::Relaxed),
    );
}

criterion_group!(benches, hit_and_miss, zipf);
criterion_main!(benches);
