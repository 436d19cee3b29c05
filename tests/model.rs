//! Model-based test of the whole path, origin -> fault proxy -> sidecar -> views and Watch
//! subscribers, over real loopback gRPC. proptest generates a sequence of operations (publish,
//! delete, cut the feed, an outage longer than the origin's retained window, restart the origin
//! as a new epoch, open and close Watch streams, check) and runs it against the system and a
//! model: a map per topic. At every check, after waiting for quiescence on events:
//! - the origin's rows equal the model and the sidecar's replicas equal the origin's, byte for byte;
//! - every view equals a from-scratch recompute of the model by a naive oracle;
//! - every open Watch, folded into a map (reset = start over), equals its source.
//!
//! Throughout, a reader task polls each source's epoch and version and fails the case if a
//! version ever goes back within an epoch.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use common::*;
use viewcar::pb::cache::v1 as cache;
use viewcar::store::Source;
use viewcar::views::ViewSpec;
use viewcar::{FeedStats, OriginConfig, Sidecar};

const TOPICS: [&str; 2] = ["products", "prices"];
const VIEWS: [&str; 2] = ["page", "by_cat"];
const SOURCES: [&str; 4] = ["products", "prices", "page", "by_cat"];
const KEYS: u8 = 4;
/// The retained window of a squeezed origin: any outage of more batches resumes outside it.
const TINY_RETAIN: usize = 2;
/// More Watch streams than this stay unopened.
const MAX_WATCHES: usize = 3;

fn views() -> Vec<ViewSpec> {
    vec![
        ViewSpec::new("page", "products")
            .filter("status == 'active'")
            .include("price", "prices", "id"),
        ViewSpec::new("by_cat", "products")
            .include("price", "prices", "id")
            .group_by("category")
            .select(["id", "price.amount as amount"]),
    ]
}

// ----- operations -----

/// One change: key index, and the value seed (`None` = delete).
type Change = (u8, Option<u8>);

#[derive(Debug, Clone)]
enum Op {
    /// One batch (one version) on a topic.
    Publish { topic: usize, changes: Vec<Change> },
    /// Reset every feed connection; the sidecar reconnects and resumes.
    Cut,
    /// The sidecar is away while these batches are published: with a squeezed origin, its
    /// resume point falls outside the retained window (Reset + snapshot).
    Outage { batches: Vec<(usize, Change)> },
    /// A new origin (a new epoch, no data) on the same address.
    Restart { squeezed: bool },
    /// Open a Watch (all keys, initial rows) on a source.
    Subscribe { source: usize },
    /// Close the n-th open Watch (modulo how many are open).
    Unsubscribe { nth: usize },
    /// Wait for quiescence and compare everything with the model.
    Check,
}

fn change() -> impl Strategy<Value = Change> {
    (0..KEYS, prop::option::weighted(0.8, 0..8u8))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // A batch names a key at most once (the origin refuses duplicates).
        6 => (
            0..TOPICS.len(),
            prop::collection::btree_map(0..KEYS, prop::option::weighted(0.8, 0..8u8), 1..4)
        )
            .prop_map(|(topic, changes)| Op::Publish {
                topic,
                changes: changes.into_iter().collect()
            }),
        2 => Just(Op::Cut),
        2 => prop::collection::vec((0..TOPICS.len(), change()), 0..6)
            .prop_map(|batches| Op::Outage { batches }),
        1 => any::<bool>().prop_map(|squeezed| Op::Restart { squeezed }),
        2 => (0..SOURCES.len()).prop_map(|source| Op::Subscribe { source }),
        1 => any::<usize>().prop_map(|nth| Op::Unsubscribe { nth }),
        2 => Just(Op::Check),
    ]
}

fn key(k: u8) -> String {
    format!("p{k}")
}

/// The value a seed stands for: a product (active or not, in one of two categories) or a price.
fn value(topic: usize, k: u8, seed: u8) -> String {
    match TOPICS[topic] {
        "products" => json!({
            "id": key(k),
            "status": if seed % 2 == 0 { "active" } else { "draft" },
            "category": if seed % 4 < 2 { "a" } else { "b" },
            "rev": seed,
        }),
        _ => json!({ "id": key(k), "amount": 100 + u32::from(seed) }),
    }
    .to_string()
}

// ----- the model and its oracle -----

type Rows = BTreeMap<String, Bytes>;

#[derive(Debug, Default, Clone)]
struct Model {
    topics: [Rows; 2],
}

impl Model {
    fn publish(&mut self, topic: usize, changes: &[Change]) -> Vec<viewcar::Put> {
        changes
            .iter()
            .map(|&(k, v)| match v {
                Some(seed) => {
                    let v = value(topic, k, seed);
                    self.topics[topic].insert(key(k), Bytes::from(v.clone()));
                    put(&key(k), &v)
                }
                None => {
                    self.topics[topic].remove(&key(k));
                    del(&key(k))
                }
            })
            .collect()
    }

    /// Every row of a source, as JSON for views and as bytes for topics.
    fn expected(&self, source: &str) -> BTreeMap<String, Value> {
        let json = |b: &Bytes| serde_json::from_slice::<Value>(b).expect("model values are JSON");
        match source {
            "products" => self.topics[0]
                .iter()
                .map(|(k, v)| (k.clone(), json(v)))
                .collect(),
            "prices" => self.topics[1]
                .iter()
                .map(|(k, v)| (k.clone(), json(v)))
                .collect(),
            "page" => self
                .joined()
                .filter(|(_, row)| row.get("status") == Some(&json!("active")))
                .map(|(k, row)| (k, Value::Object(row)))
                .collect(),
            "by_cat" => {
                let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
                // `joined` walks products in key order: members come out sorted by key.
                for (_, row) in self.joined() {
                    let Some(Value::String(cat)) = row.get("category") else {
                        continue;
                    };
                    let mut member = Map::new();
                    member.insert("id".into(), row["id"].clone());
                    if let Some(amount) = row["price"].get("amount") {
                        member.insert("amount".into(), amount.clone());
                    }
                    groups.entry(cat.clone()).or_default().push(member.into());
                }
                groups
                    .into_iter()
                    .map(|(g, m)| (g, Value::Array(m)))
                    .collect()
            }
            other => panic!("no source {other}"),
        }
    }

    /// Each product with its price included (or `null`), in key order.
    fn joined(&self) -> impl Iterator<Item = (String, Map<String, Value>)> + '_ {
        self.topics[0].iter().map(|(k, v)| {
            let Ok(Value::Object(mut row)) = serde_json::from_slice(v) else {
                panic!("model products are JSON objects");
            };
            let price = row
                .get("id")
                .and_then(Value::as_str)
                .and_then(|id| self.topics[1].get(id))
                .map(|p| serde_json::from_slice(p).expect("model prices are JSON"))
                .unwrap_or(Value::Null);
            row.insert("price".into(), price);
            (k.clone(), row)
        })
    }
}

// ----- the system -----

/// A Watch stream folded into the rows it describes.
struct Watcher {
    source: &'static str,
    rows: Arc<Mutex<BTreeMap<String, Bytes>>>,
    /// Ticks on every event received.
    events: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Watcher {
    async fn open(sidecar: &Sidecar, source: &'static str) -> Watcher {
        let mut stream = cache_client(sidecar)
            .await
            .watch(cache::WatchRequest {
                source: source.to_string(),
                keys: Vec::new(),
                prefix: String::new(),
                send_initial: true,
            })
            .await
            .expect("Watch opens")
            .into_inner();
        let rows = Arc::new(Mutex::new(BTreeMap::new()));
        let (tick, events) = watch::channel(0u64);
        let folded = rows.clone();
        let task = tokio::spawn(async move {
            use cache::watch_event::Kind;
            while let Ok(Some(ev)) = stream.message().await {
                {
                    let mut rows = folded.lock().unwrap();
                    match ev.kind {
                        Some(Kind::Upsert(i)) => {
                            rows.insert(i.key, i.value);
                        }
                        Some(Kind::Delete(i)) => {
                            rows.remove(&i.key);
                        }
                        // Current rows follow a reset.
                        Some(Kind::Reset(_)) => rows.clear(),
                        Some(Kind::Synced(_)) | None => {}
                    }
                }
                tick.send_modify(|n| *n += 1);
            }
        });
        Watcher {
            source,
            rows,
            events,
            task,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse(source: &str, key: &str, b: &[u8]) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("{source}/{key} is not JSON ({e}): {}", text(b)))
}

fn source_rows(s: &Source) -> BTreeMap<String, Bytes> {
    s.keyspace()
        .keys()
        .into_iter()
        .filter_map(|k| s.get(&k).map(|r| (k.to_string(), r.value)))
        .collect()
}

fn as_json(source: &str, rows: &BTreeMap<String, Bytes>) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|(k, v)| (k.clone(), parse(source, k, v)))
        .collect()
}

/// Waits until `now()` equals `want`, re-checking whenever `changes` ticks.
async fn converge(
    what: &str,
    mut changes: watch::Receiver<u64>,
    want: &BTreeMap<String, Value>,
    now: impl Fn() -> BTreeMap<String, Value>,
) {
    let _ = tokio::time::timeout(DEADLINE, async {
        while now() != *want {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert_eq!(now(), *want, "{what} differs from the model");
}

/// Polls the epoch and version of every source until stopped; the first time a version goes
/// back within an epoch is the error.
fn spawn_reader(
    sources: Vec<Arc<Source>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<u64, String>> {
    tokio::spawn(async move {
        let mut last: Vec<(Arc<String>, u64)> = sources
            .iter()
            .map(|_| (Arc::new(String::new()), 0))
            .collect();
        let mut samples = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for (s, last) in sources.iter().zip(last.iter_mut()) {
                let (epoch, version) = s.position();
                if *epoch == *last.0 && version < last.1 {
                    return Err(format!(
                        "{} went back from {} to {version} in epoch '{epoch}'",
                        s.name(),
                        last.1
                    ));
                }
                *last = (epoch, version);
                samples += 1;
            }
            tokio::task::yield_now().await;
        }
        Ok(samples)
    })
}

fn origin_cfg(squeezed: bool) -> OriginConfig {
    OriginConfig {
        retain_batches: if squeezed { TINY_RETAIN } else { 10_000 },
        ..origin_config()
    }
}

struct System {
    origin: TestOrigin,
    proxy: Proxy,
    sidecar: Sidecar,
    feed: Arc<FeedStats>,
    watchers: Vec<Watcher>,
    model: Model,
}

impl System {
    async fn start(squeezed: bool) -> System {
        let origin = TestOrigin::start(origin_cfg(squeezed)).await;
        let proxy = Proxy::start(origin.addr).await;
        let mut cfg = sidecar_config(&proxy.url(), &TOPICS);
        cfg.views = views();
        let sidecar = start_sidecar(cfg).await;
        let feed = sidecar.feed_stats("o").expect("feed stats").clone();
        System {
            origin,
            proxy,
            sidecar,
            feed,
            watchers: Vec::new(),
            model: Model::default(),
        }
    }

    fn publish(&mut self, topic: usize, changes: &[Change]) {
        let puts = self.model.publish(topic, changes);
        self.origin
            .origin
            .publish(TOPICS[topic], puts)
            .expect("publish");
    }

    async fn apply(&mut self, op: &Op) {
        match op {
            Op::Publish { topic, changes } => self.publish(*topic, changes),
            Op::Cut => self.proxy.cut(),
            Op::Outage { batches } => {
                // From a connected feed, so that the cut below is surely noticed: after a
                // `Cut` the replicas are current while the feed is still redialling, and a
                // refused dial is not a disconnect.
                let feed = self.feed.clone();
                eventually("feed connected", || feed.connected.load(Ordering::Relaxed)).await;
                self.proxy.set_upstream(Upstream::Refuse);
                let before = counter(&self.feed.disconnects);
                self.proxy.cut();
                eventually("feed disconnected", || counter(&feed.disconnects) > before).await;
                for (topic, change) in batches {
                    self.publish(*topic, std::slice::from_ref(change));
                }
                self.proxy.set_upstream(Upstream::Forward(self.origin.addr));
            }
            Op::Restart { squeezed } => {
                self.origin.restart(origin_cfg(*squeezed)).await;
                self.model = Model::default();
            }
            Op::Subscribe { source } => {
                if self.watchers.len() < MAX_WATCHES {
                    let w = Watcher::open(&self.sidecar, SOURCES[*source]).await;
                    self.watchers.push(w);
                }
            }
            Op::Unsubscribe { nth } => {
                if !self.watchers.is_empty() {
                    let n = nth % self.watchers.len();
                    self.watchers.remove(n);
                }
            }
            Op::Check => self.check().await,
        }
    }

    /// Waits until every replica has applied the origin's current position.
    async fn settle(&self) {
        let o = &self.origin.origin;
        for topic in TOPICS {
            let v = o.version(topic).unwrap_or(0);
            // `position`, not `epoch()` and `version()` apart: those can pair the origin's new
            // epoch with the replica's version from the previous one.
            wait_source(
                &source(&self.sidecar, topic),
                "the origin's position",
                |s| {
                    let (epoch, version) = s.position();
                    s.is_synced() && epoch.as_str() == o.epoch() && version >= v
                },
            )
            .await;
        }
    }

    async fn check(&self) {
        self.settle().await;
        let o = &self.origin.origin;
        for (i, topic) in TOPICS.iter().enumerate() {
            let origin_rows: Rows = o.rows(topic).into_iter().collect();
            assert_eq!(
                origin_rows, self.model.topics[i],
                "origin '{topic}' vs model"
            );
            // The origin did not move since `settle`: the replica holds exactly its position.
            let s = source(&self.sidecar, topic);
            assert_eq!(source_rows(&s), origin_rows, "replica '{topic}' vs origin");
        }
        for view in VIEWS {
            let s = source(&self.sidecar, view);
            let want = self.model.expected(view);
            converge(
                &format!("view '{view}'"),
                s.subscribe_changes(),
                &want,
                || as_json(view, &source_rows(&s)),
            )
            .await;
        }
        for (i, w) in self.watchers.iter().enumerate() {
            let want = self.model.expected(w.source);
            converge(
                &format!("watch #{i} on '{}'", w.source),
                w.events.clone(),
                &want,
                || as_json(w.source, &w.rows.lock().unwrap()),
            )
            .await;
        }
    }
}

/// Totals over the cases run, printed by the tests.
static OPS: AtomicU64 = AtomicU64::new(0);
static RESNAPSHOTS: AtomicU64 = AtomicU64::new(0);
static SAMPLES: AtomicU64 = AtomicU64::new(0);

fn totals() -> String {
    format!(
        "{} ops, {} Reset + snapshot on the feed, {} reader samples",
        counter(&OPS),
        counter(&RESNAPSHOTS),
        counter(&SAMPLES)
    )
}

/// Runs one case on its own runtime: the operations, then a final check.
fn run(squeezed: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut sys = System::start(squeezed).await;
        let stop = Arc::new(AtomicBool::new(false));
        let reader = spawn_reader(
            SOURCES.iter().map(|s| source(&sys.sidecar, s)).collect(),
            stop.clone(),
        );
        for op in ops {
            tokio::time::timeout(DEADLINE * 2, sys.apply(op))
                .await
                .unwrap_or_else(|_| panic!("{op:?} did not finish within its deadline"));
        }
        within(sys.check()).await;
        stop.store(true, Ordering::Relaxed);
        let samples = reader.await.expect("reader task");
        prop_assert!(samples.is_ok(), "{}", samples.unwrap_err());
        OPS.fetch_add(ops.len() as u64, Ordering::Relaxed);
        RESNAPSHOTS.fetch_add(counter(&sys.feed.resets), Ordering::Relaxed);
        SAMPLES.fetch_add(samples.unwrap_or(0), Ordering::Relaxed);
        drop(sys);
        Ok(())
    })
}

fn cases(n: u32, max_ops: usize) -> (ProptestConfig, impl Strategy<Value = (bool, Vec<Op>)>) {
    let cfg = ProptestConfig {
        cases: n,
        // Each case runs live servers: shrinking stays short, and failures are kept as
        // explicit regression tests below rather than in a persistence file.
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    (
        cfg,
        (any::<bool>(), prop::collection::vec(op(), 1..max_ops)),
    )
}

#[test]
fn system_follows_the_model() {
    let start = Instant::now();
    let (cfg, strategy) = cases(32, 16);
    let n = cfg.cases;
    proptest!(cfg, |((squeezed, ops) in strategy)| {
        run(squeezed, &ops)?;
    });
    eprintln!("model: {n} cases in {:?}: {}", start.elapsed(), totals());
}

/// The long variant: `cargo test --test model -- --ignored`.
#[test]
#[ignore]
fn system_follows_the_model_long() {
    let start = Instant::now();
    let (cfg, strategy) = cases(300, 40);
    let n = cfg.cases;
    proptest!(cfg, |((squeezed, ops) in strategy)| {
        run(squeezed, &ops)?;
    });
    eprintln!(
        "model (long): {n} cases in {:?}: {}",
        start.elapsed(),
        totals()
    );
}

// ----- cases worth keeping -----

#[test]
fn restart_then_squeezed_outage() {
    run(
        true,
        &[
            Op::Publish {
                topic: 0,
                changes: vec![(0, Some(0)), (1, Some(3))],
            },
            Op::Subscribe { source: 2 },
            Op::Publish {
                topic: 1,
                changes: vec![(0, Some(1))],
            },
            Op::Restart { squeezed: true },
            Op::Publish {
                topic: 0,
                changes: vec![(2, Some(2))],
            },
            Op::Outage {
                batches: vec![
                    (0, (2, None)),
                    (1, (2, Some(4))),
                    (0, (3, Some(0))),
                    (1, (0, Some(5))),
                ],
            },
            Op::Subscribe { source: 3 },
            Op::Cut,
            Op::Check,
        ],
    )
    .expect("case holds");
}

/// Found by `system_follows_the_model_long`: across origin restarts, a reader polling a replica's
/// epoch and version saw the new epoch paired with the previous epoch's version, after which the
/// new epoch's version seemed to go back (4 to 1). Fixed by `Source::position`.
#[test]
fn restarts_never_pair_a_new_epoch_with_an_old_version() {
    let p = |topic: usize, changes: &[Change]| Op::Publish {
        topic,
        changes: changes.to_vec(),
    };
    run(
        false,
        &[
            p(1, &[(1, Some(0))]),
            Op::Cut,
            Op::Subscribe { source: 1 },
            p(0, &[(0, Some(0)), (1, Some(0)), (3, Some(1))]),
            Op::Cut,
            Op::Check,
            p(1, &[(0, None), (3, Some(0))]),
            Op::Unsubscribe { nth: 1 },
            p(1, &[(1, Some(2))]),
            p(1, &[(1, Some(0)), (3, Some(1))]),
            Op::Check,
            Op::Outage {
                batches: vec![(1, (0, Some(0))), (0, (3, None)), (1, (1, Some(5)))],
            },
            p(0, &[(0, None)]),
            p(0, &[(2, Some(6)), (3, None)]),
            Op::Check,
            Op::Subscribe { source: 2 },
            p(0, &[(3, Some(1))]),
            p(0, &[(1, Some(3))]),
            Op::Unsubscribe { nth: 0 },
            p(0, &[(1, Some(1))]),
            p(0, &[(3, Some(1))]),
            Op::Restart { squeezed: false },
            p(0, &[(1, None), (2, None)]),
            Op::Subscribe { source: 3 },
            Op::Check,
            Op::Restart { squeezed: false },
            Op::Unsubscribe { nth: 0 },
            p(0, &[(2, None)]),
            p(1, &[(2, None)]),
            Op::Subscribe { source: 0 },
        ],
    )
    .expect("case holds");
}
