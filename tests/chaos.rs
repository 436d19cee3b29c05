//! Resume under chaos: a stream of multi-key batches through a proxy that resets the feed at
//! random points, with a durable origin restarted on the same data directory and address. At
//! quiescence the replica equals the origin byte for byte, a Watch subscriber never saw a key
//! go back or repeat and ends at the origin's values, and no Get failed meanwhile.
//!
//! The seed is `VIEWCAR_CHAOS_SEED` (printed on every run) so a failure can be replayed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use common::*;
use viewcar::config::Fsync;
use viewcar::pb::cache::v1 as cache;
use viewcar::{Origin, OriginConfig, Put};

const TOPIC: &str = "t";
const KEYS: usize = 300;
const PER_BATCH: usize = 5;
const RESETS: usize = 20;
const RESTARTS: usize = 2;

fn key(i: usize) -> String {
    format!("k{i:03}")
}

fn seed() -> u64 {
    std::env::var("VIEWCAR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c4a0)
}

/// One batch: `PER_BATCH` distinct keys, about a fifth of them deletes; values are arbitrary
/// bytes (empty ones included), so "byte for byte" means something.
fn batch(rng: &mut StdRng, n: u64) -> Vec<Put> {
    let mut keys = BTreeSet::new();
    while keys.len() < PER_BATCH {
        keys.insert(rng.random_range(0..KEYS));
    }
    keys.into_iter()
        .map(|k| {
            if rng.random_ratio(1, 5) {
                Put::delete(key(k))
            } else {
                let len = rng.random_range(0..24);
                let mut v = n.to_le_bytes().to_vec();
                v.truncate(if len == 0 { 0 } else { 8 });
                v.extend((0..len).map(|_| rng.random::<u8>()));
                Put::upsert(key(k), v)
            }
        })
        .collect()
}

/// The per-key view of one Watch stream, checked as events arrive: within a generation (from
/// the start or a `reset` to the next one) a key's versions strictly increase; the rows sent
/// again after a reset are never older than what was seen before it.
#[derive(Default)]
struct WatchLog {
    /// The latest version seen per key (deletes included), across resets: the floor.
    seen: BTreeMap<String, u64>,
    /// Keys already sent in this generation.
    this_gen: BTreeSet<String>,
    rows: BTreeMap<String, Bytes>,
    /// Between a `reset` and the next `synced`: the current rows are being sent again.
    initial: bool,
    events: u64,
    resets: u64,
    violations: Vec<String>,
}

impl WatchLog {
    fn on(&mut self, kind: cache::watch_event::Kind) {
        use cache::watch_event::Kind;
        self.events += 1;
        match kind {
            Kind::Upsert(i) => {
                self.version(&i.key, i.version);
                self.rows.insert(i.key, i.value);
            }
            Kind::Delete(i) => {
                self.version(&i.key, i.version);
                self.rows.remove(&i.key);
            }
            Kind::Synced(_) => self.initial = false,
            Kind::Reset(_) => {
                self.resets += 1;
                self.initial = true;
                self.this_gen.clear();
                self.rows.clear();
            }
        }
    }

    fn version(&mut self, key: &str, version: u64) {
        let fresh = self.this_gen.insert(key.to_string());
        let last = self.seen.get(key).copied();
        // The first row of a key after a reset may repeat the version seen before it (the same
        // row, sent again as the protocol says); anything else must move forward.
        let ok = match last {
            None => true,
            Some(l) if fresh && self.resets > 0 => version >= l,
            Some(l) => version > l,
        };
        if !ok && self.violations.len() < 20 {
            self.violations.push(format!(
                "{key}: version {version} after {last:?} (event {}, initial {})",
                self.events, self.initial
            ));
        }
        self.seen
            .insert(key.to_string(), version.max(last.unwrap_or(0)));
    }
}

fn durable_config(dir: &std::path::Path) -> OriginConfig {
    OriginConfig {
        data_dir: Some(dir.to_path_buf()),
        // Every restart here is a clean close, so an interval fsync keeps the epoch and keeps
        // the run short; what a restart must preserve does not depend on the policy.
        fsync: Fsync::Interval,
        ..origin_config()
    }
}

/// `count` distinct points in `1..batches`, sorted.
fn points(rng: &mut StdRng, batches: u64, count: usize, taken: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    while out.len() < count {
        let p = rng.random_range(1..batches);
        if !taken.contains(&p) {
            out.insert(p);
        }
    }
    out
}

async fn run(batches: u64) {
    let seed = seed();
    println!("chaos: seed {seed} (VIEWCAR_CHAOS_SEED), {batches} batches");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = durable_config(dir.path());
    let mut origin =
        TestOrigin::start_on(Origin::open(cfg.clone()).expect("open"), loopback0()).await;
    let epoch = origin.origin.epoch().to_string();
    // One row before the sidecar starts, so the Watch below opens on a synced source.
    let first = origin
        .origin
        .publish(TOPIC, vec![Put::upsert(key(0), "start")])
        .unwrap();
    let proxy = Arc::new(Proxy::start(origin.addr).await);
    let sidecar = start_sidecar(sidecar_config(&proxy.url(), &[TOPIC])).await;
    let src = source(&sidecar, TOPIC);
    wait_position(&src, &epoch, first.version).await;

    // The Watch subscriber, opened before the chaos starts.
    let mut stream = cache_client(&sidecar)
        .await
        .watch(cache::WatchRequest {
            source: TOPIC.to_string(),
            send_initial: true,
            ..Default::default()
        })
        .await
        .expect("Watch opens")
        .into_inner();
    let log = Arc::new(Mutex::new(WatchLog::default()));
    let (tick, ticks) = watch::channel(0u64);
    let watcher = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(ev)) = stream.message().await {
                if let Some(kind) = ev.kind {
                    log.lock().unwrap().on(kind);
                }
                tick.send_modify(|n| *n += 1);
            }
        })
    };

    // A reader doing Gets throughout; every error counts.
    let stop = Arc::new(AtomicBool::new(false));
    let gets = Arc::new(AtomicU64::new(0));
    let get_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let mut client = cache_client(&sidecar).await;
        let (stop, gets, errors) = (stop.clone(), gets.clone(), get_errors.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6e7);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let k = key(rng.random_range(0..KEYS));
                if let Err(e) = client.get(get_request(TOPIC, &k)).await {
                    errors.lock().unwrap().push(format!("{k}: {e:?}"));
                }
                gets.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // The publisher drives the chaos: at chosen batches it resets the feed (now or a few bytes
    // into what is in flight) or restarts the origin on its data directory and address.
    let restarts = points(&mut rng, batches, RESTARTS, &BTreeSet::new());
    let resets = points(&mut rng, batches, RESETS, &restarts);
    let publisher = {
        let proxy = proxy.clone();
        let cfg = cfg.clone();
        let start = first.clone();
        let src = src.clone();
        let gets = gets.clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 0xba7c4);
        // Progress about every 5% of the run, so a long run that is stopped says how far it got.
        let every = (batches / 20).max(1);
        tokio::spawn(async move {
            let mut last = start;
            let (mut resets_done, mut restarts_done) = (0, 0);
            for n in 1..=batches {
                if restarts.contains(&n) {
                    restarts_done += 1;
                } else if resets.contains(&n) {
                    resets_done += 1;
                }
                if restarts.contains(&n) {
                    origin.restart(cfg.clone()).await;
                } else if resets.contains(&n) {
                    if rng.random_bool(0.5) {
                        proxy.cut();
                    } else {
                        proxy.cut_after(rng.random_range(0..4096));
                    }
                }
                last = origin
                    .origin
                    .publish(TOPIC, batch(&mut rng, n))
                    .expect("publish");
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
                if n % every == 0 {
                    println!(
                        "chaos: {n}/{batches} batches published, replica at version {}, \
                         {resets_done} feed resets, {restarts_done} origin restarts, {} Gets, {:?}",
                        src.position().1,
                        gets.load(Ordering::Relaxed),
                        started.elapsed()
                    );
                }
            }
            (origin, last)
        })
    };
    let (mut origin, last) = publisher.await.expect("publisher");
    let o = origin.origin.clone();
    assert_eq!(o.epoch(), epoch, "a durable origin keeps its epoch");
    assert_eq!(last.epoch, epoch);
    assert_eq!(last.version, first.version + batches);

    // Quiescence: the replica reaches the origin's final position.
    wait_position(&src, &epoch, last.version).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.expect("reader");

    let want: BTreeMap<String, Bytes> = o.rows(TOPIC).into_iter().collect();
    let replica: BTreeMap<String, Bytes> = src
        .keyspace()
        .keys()
        .into_iter()
        .filter_map(|k| src.get(&k).map(|r| (k.to_string(), r.value)))
        .collect();
    assert_eq!(replica, want, "replica == origin (keyspace)");
    let versions: BTreeMap<String, u64> = {
        let keys: Vec<String> = want.keys().cloned().collect();
        o.fetch(TOPIC, &keys)
            .unwrap()
            .entries
            .into_iter()
            .map(|e| (e.key, e.version))
            .collect()
    };
    for (k, v) in &versions {
        assert_eq!(src.get(k).map(|r| r.version), Some(*v), "{k}: version");
    }

    let mut scanned = BTreeMap::new();
    let mut client = cache_client(&sidecar).await;
    let mut page_token = String::new();
    loop {
        let page = client
            .scan(cache::ScanRequest {
                source: TOPIC.to_string(),
                page_token,
                ..Default::default()
            })
            .await
            .expect("Scan")
            .into_inner();
        for i in page.items {
            assert_eq!(
                versions.get(&i.key),
                Some(&i.version),
                "{}: scan version",
                i.key
            );
            scanned.insert(i.key, i.value);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(scanned, want, "replica == origin (Scan)");

    // The watcher ends at the origin's rows and versions.
    let mut ticks = ticks;
    let at_end = |log: &WatchLog| {
        !log.initial && log.rows == want && versions.iter().all(|(k, v)| log.seen.get(k) == Some(v))
    };
    let _ = tokio::time::timeout(DEADLINE, async {
        while !at_end(&log.lock().unwrap()) {
            if ticks.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    watcher.abort();
    let log = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        log.violations.is_empty(),
        "watch order: {:#?}",
        log.violations
    );
    assert!(
        at_end(&log),
        "the watcher ends at the origin's rows and versions"
    );

    let errors = get_errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} Gets failed: {errors:#?}",
        errors.len()
    );
    let gets = gets.load(Ordering::Relaxed);
    assert!(gets > 0, "the reader ran");

    let feed = sidecar.feed_stats("o").expect("feed stats").clone();
    assert!(
        counter(&feed.disconnects) >= RESTARTS as u64,
        "the feed was broken"
    );
    assert_eq!(
        counter(&feed.gaps),
        0,
        "a correct origin never leaves a gap"
    );
    assert_eq!(counter(&feed.protocol_errors), 0);
    println!(
        "chaos: feed connects {}, disconnects {}, snapshots {}, resets {}, duplicates {}; \
         origin resumes {} (since the last restart)",
        counter(&feed.connects),
        counter(&feed.disconnects),
        counter(&feed.snapshots),
        counter(&feed.resets),
        counter(&feed.duplicates),
        counter(&o.stats().resumes),
    );
    sidecar.shutdown().await;
    origin.stop().await;
    println!(
        "chaos: seed {seed}, {batches} batches, {RESETS} feed resets, {RESTARTS} origin \
         restarts, {gets} Gets (0 failed), {} watch events ({} watch resets) in {:?}",
        log.events,
        log.resets,
        started.elapsed()
    );
}

/// 4k batches: an unoptimised redb committed a transaction in about 4 ms on a loaded 2-core
/// machine, so this is what fit in about 20 s; with redb at opt-level 3 in the dev profile
/// (Cargo.toml) the run takes about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_under_chaos() {
    bounded(Duration::from_secs(300), run(4_000)).await;
}

/// Fails the test instead of hanging CI when a run does not finish within `limit`.
async fn bounded(limit: Duration, run: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("the chaos run did not finish within {limit:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200k batches"]
async fn resume_under_chaos_200k() {
    bounded(Duration::from_secs(1200), run(200_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 1M batches"]
async fn resume_under_chaos_1m() {
    bounded(Duration::from_secs(7200), run(1_000_000)).await;
}
