//! on_demand views over loopback gRPC: a row is computed on first read, fetching the on_demand
//! inputs its lookups miss (one round per link of a chain), computed once however many readers
//! wait, kept current by push while resident, and its inputs released when it is evicted. The
//! property at the end checks rows against a from-scratch recompute after random changes,
//! evictions, dropped streams and origin restarts (new epochs).

mod common;
#[path = "common/oracle.rs"]
mod oracle;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use viewcar::config::{ByteSize, Mode};
use viewcar::origin::Put;
use viewcar::pb::cache::v1 as cache;
use viewcar::views::ViewSpec;
use viewcar::Sidecar;

use oracle::{key_text, lookup, path, Topic};

const TOPICS: [&str; 4] = ["products", "prices", "brands", "countries"];

fn page(max_bytes: u64) -> ViewSpec {
    ViewSpec::new("page", "products")
        .filter("status == 'active'")
        .include("price", "prices", "id")
        .include("brand", "brands", "brand_id")
        .include("country", "countries", "brand.country_id")
        .on_demand(max_bytes)
}

/// The origin's config: the four topics declared (a Fetch of a topic nobody published to yet
/// is an absent key, not an unknown topic).
fn origin_cfg() -> viewcar::OriginConfig {
    let mut cfg = origin_config();
    cfg.topics = TOPICS.iter().map(|t| t.to_string()).collect();
    cfg
}

/// An origin, and a sidecar holding every topic on_demand within `topic_bytes` with the
/// on_demand view `page` within `view_bytes`.
async fn setup(topic_bytes: u64, view_bytes: u64) -> (TestOrigin, Sidecar) {
    let origin = TestOrigin::start(origin_cfg()).await;
    let mut cfg = sidecar_config(&origin.url(), &TOPICS);
    for t in &mut cfg.origins[0].topics {
        t.mode = Mode::OnDemand;
        t.max_bytes = Some(ByteSize(topic_bytes));
    }
    // `summary` is an on_demand view over the on_demand view `page`.
    cfg.views = vec![
        page(view_bytes),
        ViewSpec::new("summary", "page")
            .select(["id", "country.name as country"])
            .on_demand(view_bytes),
    ];
    let sidecar = start_sidecar(cfg).await;
    (origin, sidecar)
}

fn put(origin: &TestOrigin, topic: &str, key: &str, v: Value) {
    origin
        .origin
        .publish(topic, vec![Put::upsert(key, Bytes::from(v.to_string()))])
        .expect("publish");
}

/// The chain of rows behind `page[p1]`: the active product p1 (its price `price`, if any)
/// of brand b1, from country DE.
fn put_p1(origin: &TestOrigin, price: Option<Value>) {
    put(
        origin,
        "products",
        "p1",
        json!({"id": "p1", "status": "active", "brand_id": "b1"}),
    );
    if let Some(price) = price {
        put(origin, "prices", "p1", price);
    }
    put(
        origin,
        "brands",
        "b1",
        json!({"name": "B", "country_id": "DE"}),
    );
    put(origin, "countries", "DE", json!({"name": "Germany"}));
}

type Client = cache::cache_client::CacheClient<tonic::transport::Channel>;

/// The row of `page[key]` as the sidecar answers it (`None` = no row).
async fn row(client: &mut Client, key: &str) -> Option<Value> {
    try_row(client, "page", key).await.expect("get")
}

/// The row of `view[key]`, or the error (a miss while the origin is unreachable).
async fn try_row(
    client: &mut Client,
    view: &str,
    key: &str,
) -> Result<Option<Value>, tonic::Status> {
    let item = client
        .get(get_waiting(view, key, 10_000))
        .await?
        .into_inner()
        .item
        .expect("item");
    Ok(item
        .found
        .then(|| serde_json::from_slice(&item.value).expect("a row is JSON")))
}

/// Reads `view[key]` until it equals `want` (pushes take their latency to land, and a miss
/// fails while the origin is being redialled).
async fn row_becomes(client: &mut Client, view: &str, key: &str, want: &Option<Value>) {
    let start = tokio::time::Instant::now();
    loop {
        let got = try_row(client, view, key).await;
        if got.as_ref().ok() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{view}[{key}] is {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn view_stat(sidecar: &Sidecar, f: impl Fn(&viewcar::store::OnDemandStats) -> u64) -> u64 {
    let s = source(sidecar, "page");
    f(s.view_cache().expect("on_demand view").stats())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_is_computed_on_first_read_and_kept_current_by_push() {
    within(async {
        let (origin, sidecar) = setup(1 << 20, 1 << 20).await;
        put_p1(&origin, Some(json!({"amount": 5})));
        let mut client = cache_client(&sidecar).await;
        let want = json!({"id": "p1", "status": "active", "brand_id": "b1",
            "price": {"amount": 5}, "brand": {"name": "B", "country_id": "DE"},
            "country": {"name": "Germany"}});
        assert_eq!(row(&mut client, "p1").await, Some(want.clone()));
        // products[p1]; then prices[p1] and brands[b1] together; then countries[DE].
        assert_eq!(
            view_stat(&sidecar, |s| s.fetches.load(Ordering::Relaxed)),
            3
        );
        assert_eq!(origin.origin.stats().fetches.load(Ordering::Relaxed), 4);
        for (topic, key) in [
            ("products", "p1"),
            ("prices", "p1"),
            ("brands", "b1"),
            ("countries", "DE"),
        ] {
            // The Subscribe goes on the feed stream beside the Fetch (the positions reconcile
            // them), so it may land just after the read.
            eventually(&format!("{topic}[{key}] subscribed"), || {
                origin.origin.is_key_subscribed(topic, key)
            })
            .await;
        }

        // Changes at the end of the chain are pushed and the row follows, without a read miss
        // or a Fetch.
        let misses = view_stat(&sidecar, |s| s.misses.load(Ordering::Relaxed));
        let fetches = origin.origin.stats().fetches.load(Ordering::Relaxed);
        put(&origin, "countries", "DE", json!({"name": "Deutschland"}));
        let mut want = want;
        want["country"] = json!({"name": "Deutschland"});
        row_becomes(&mut client, "page", "p1", &Some(want.clone())).await;
        origin
            .origin
            .publish("prices", vec![Put::delete("p1")])
            .expect("delete");
        want["price"] = Value::Null;
        row_becomes(&mut client, "page", "p1", &Some(want.clone())).await;
        assert_eq!(
            view_stat(&sidecar, |s| s.misses.load(Ordering::Relaxed)),
            misses,
            "a pushed change made a read miss"
        );
        assert_eq!(
            origin.origin.stats().fetches.load(Ordering::Relaxed),
            fetches,
            "a pushed change made a Fetch"
        );
        put(
            &origin,
            "brands",
            "b1",
            json!({"name": "B", "country_id": "FR"}),
        );
        // A lookup key that moves to a key never read is a miss for the engine: the row is
        // dropped and computed again at the next read, fetching countries[FR].
        want["brand"] = json!({"name": "B", "country_id": "FR"});
        want["country"] = Value::Null;
        row_becomes(&mut client, "page", "p1", &Some(want.clone())).await;
        put(
            &origin,
            "products",
            "p1",
            json!({"id": "p1", "status": "gone", "brand_id": "b1"}),
        );
        row_becomes(&mut client, "page", "p1", &None).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_missing_row_compute_it_once() {
    within(async {
        let (origin, sidecar) = setup(1 << 20, 1 << 20).await;
        put_p1(&origin, None);
        let client = cache_client(&sidecar).await;
        let reads = (0..100).map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { row(&mut c, "p1").await })
        });
        let rows: Vec<Option<Value>> = futures_util::future::join_all(reads)
            .await
            .into_iter()
            .map(|r| r.expect("reader"))
            .collect();
        assert!(rows.iter().all(|r| *r == rows[0]) && rows[0].is_some());
        let n = |f: fn(&viewcar::store::OnDemandStats) -> &std::sync::atomic::AtomicU64| {
            view_stat(&sidecar, |s| f(s).load(Ordering::Relaxed))
        };
        // One computation: every other reader waited for it or came after it.
        assert_eq!(n(|s| &s.hits) + n(|s| &s.coalesced) + 1, 100);
        // One Fetch per input key: products, prices (absent), brands, countries.
        assert_eq!(origin.origin.stats().fetches.load(Ordering::Relaxed), 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_rows_release_their_inputs_and_are_no_longer_maintained() {
    within(async {
        let budget = 16 << 10;
        let (origin, sidecar) = setup(1 << 20, budget).await;
        let n = 300;
        let pad = "x".repeat(200);
        let puts: Vec<Put> = (0..n)
            .map(|i| {
                let v = json!({"id": format!("p{i}"), "status": "active", "pad": pad});
                Put::upsert(format!("p{i}"), Bytes::from(v.to_string()))
            })
            .collect();
        origin.origin.publish("products", puts).expect("seed");
        let mut client = cache_client(&sidecar).await;
        for i in 0..n {
            assert!(row(&mut client, &format!("p{i}")).await.is_some());
        }
        let page = source(&sidecar, "page");
        let rows = page.view_cache().expect("on_demand view").clone();
        rows.sync();
        let resident = rows.resident_keys();
        assert!(
            rows.resident_bytes() <= budget,
            "{} bytes resident",
            rows.resident_bytes()
        );
        assert!(resident > 0 && resident < n / 5, "{resident} rows resident");
        // Each resident row pins its products key; evicted rows released theirs.
        let products = source(&sidecar, "products")
            .on_demand()
            .expect("on_demand")
            .clone();
        eventually("pins = resident rows", || {
            rows.sync();
            products.pinned_count() == rows.resident_keys()
        })
        .await;
        // A change to an evicted row's input recomputes nothing; one to a resident row's does.
        let (evicted, kept) = {
            let mut e = None;
            let mut k = None;
            for i in 0..n {
                match rows.peek(&format!("p{i}")) {
                    None if e.is_none() => e = Some(i),
                    Some(_) if k.is_none() => k = Some(i),
                    _ => {}
                }
            }
            (e.expect("an evicted row"), k.expect("a resident row"))
        };
        let view_stats = sidecar.view_stats("page").expect("view stats").clone();
        let recomputes = view_stats.recomputes.load(Ordering::Relaxed);
        for i in [evicted, kept] {
            let v = json!({"id": format!("p{i}"), "status": "active", "note": "changed"});
            put(&origin, "products", &format!("p{i}"), v);
        }
        eventually("the resident row follows", || {
            rows.peek(&format!("p{kept}"))
                .and_then(|s| s.value)
                .is_some_and(|v| {
                    v.starts_with(br#"{"id":"p"#)
                        && v.ends_with(
                            b"\"note\":\"changed\",\"price\":null,\"brand\":null,\"country\":null}",
                        )
                })
        })
        .await;
        assert_eq!(
            view_stats.recomputes.load(Ordering::Relaxed),
            recomputes + 1
        );
        assert!(rows.peek(&format!("p{evicted}")).is_none());
    })
    .await;
}

// ----- the property: rows equal a from-scratch recompute after random changes -----

/// The oracle of `summary[key]`: the `page` row's `id` and `country.name`, when present.
fn summary(m: &[Topic; 4], key: &str) -> Option<Value> {
    let Value::Object(row) = expected(m, key)? else {
        return None;
    };
    let mut out = serde_json::Map::new();
    for (p, name) in [("id", "id"), ("country.name", "country")] {
        if let Some(v) = path(&row, p) {
            out.insert(name.to_string(), v.clone());
        }
    }
    Some(Value::Object(out))
}

/// The oracle: `page[key]` computed from scratch over the origin's current data, by a naive
/// implementation of the view's semantics.
fn expected(m: &[Topic; 4], key: &str) -> Option<Value> {
    let b = m[0].get(key)?;
    let Ok(Value::Object(mut row)) = serde_json::from_slice::<Value>(b) else {
        return None;
    };
    let price = lookup(&m[1], path(&row, "id").and_then(key_text))?;
    row.insert("price".into(), price);
    let brand = lookup(&m[2], path(&row, "brand_id").and_then(key_text))?;
    row.insert("brand".into(), brand);
    let country = lookup(&m[3], path(&row, "brand.country_id").and_then(key_text))?;
    row.insert("country".into(), country);
    (path(&row, "status") == Some(&json!("active"))).then_some(Value::Object(row))
}

const PRODUCTS: usize = 30;

fn topic_key(topic: usize, i: usize) -> String {
    match topic {
        0 | 1 => format!("p{}", i % PRODUCTS),
        2 => format!("b{}", i % 5),
        _ => format!("c{}", i % 3),
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Publish a value (`None` = delete) to `topic[key index]`.
    Publish(usize, usize, Option<Bytes>),
    /// Read `page[p{i}]` and check it against the oracle.
    Read(usize),
    /// Read `summary[p{i}]` (a view over `page`) and check it against the oracle.
    ReadSummary(usize),
    /// The origin drops every stream: the sidecar redials, resubscribes what is resident or
    /// pinned, and refreshes it from keyed snapshots (publishes may land before or after).
    Cut,
    /// The origin restarts empty, in a new epoch: every value held is void.
    Restart,
}

fn value_for(topic: usize) -> BoxedStrategy<Bytes> {
    let json = |v: Value| Bytes::from(v.to_string());
    let good = match topic {
        0 => (
            0..PRODUCTS,
            prop::bool::weighted(0.8),
            0..6usize,
            0..40usize,
        )
            .prop_map(move |(id, active, b, pad)| {
                json(json!({"id": format!("p{id}"),
                    "status": if active { "active" } else { "gone" },
                    "brand_id": format!("b{b}"), "pad": "x".repeat(pad * 10)}))
            })
            .boxed(),
        1 => (0..100u32)
            .prop_map(move |a| json(json!({"amount": a})))
            .boxed(),
        2 => (0..4usize, 0..9u32)
            .prop_map(move |(c, n)| {
                json(json!({"name": format!("brand {n}"), "country_id": format!("c{c}")}))
            })
            .boxed(),
        _ => (0..9u32)
            .prop_map(move |n| json(json!({"name": format!("country {n}")})))
            .boxed(),
    };
    prop_oneof![9 => good, 1 => Just(Bytes::from_static(b"\xffnot json"))].boxed()
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..4usize, 0..PRODUCTS)
            .prop_flat_map(|(t, k)| {
                prop_oneof![4 => value_for(t).prop_map(Some), 1 => Just(None)]
                    .prop_map(move |v| Step::Publish(t, k, v))
            }),
        2 => (0..PRODUCTS).prop_map(Step::Read),
        1 => (0..PRODUCTS).prop_map(Step::ReadSummary),
        1 => prop_oneof![4 => Just(Step::Cut), 1 => Just(Step::Restart)],
    ]
}

/// Every value each row of the property has had since the origin last restarted: what a read
/// may show while pushes land (a row that never was is a bug, not latency).
type History = HashMap<(String, String), Vec<Option<Value>>>;

fn record(history: &mut History, model: &[Topic; 4]) {
    for i in 0..PRODUCTS {
        let key = format!("p{i}");
        for (view, v) in [
            ("page", expected(model, &key)),
            ("summary", summary(model, &key)),
        ] {
            let past = history.entry((view.to_string(), key.clone())).or_default();
            if past.last() != Some(&v) {
                past.push(v);
            }
        }
    }
}

/// Reads `view[key]` until it equals `want`; every read on the way is a value the row has had,
/// and a found row's version never goes back.
async fn row_converges(
    client: &mut Client,
    view: &str,
    key: &str,
    want: &Option<Value>,
    history: &History,
    versions: &mut HashMap<(String, String), u64>,
) {
    let id = (view.to_string(), key.to_string());
    let start = tokio::time::Instant::now();
    loop {
        let got = client
            .get(get_waiting(view, key, 10_000))
            .await
            .map(|r| r.into_inner().item.expect("item"));
        if let Ok(item) = &got {
            let value = item
                .found
                .then(|| serde_json::from_slice::<Value>(&item.value).expect("a row is JSON"));
            if let Some(past) = history.get(&id) {
                assert!(
                    past.contains(&value),
                    "{view}[{key}] read {value:?}, never a value of it: {past:?}"
                );
            }
            if item.found {
                let last = versions.entry(id.clone()).or_insert(0);
                assert!(
                    item.version >= *last,
                    "{view}[{key}] went back from version {last} to {}",
                    item.version
                );
                *last = item.version;
            }
            if &value == want {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{view}[{key}] is {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run_steps(steps: Vec<Step>) {
    // Budgets small enough that rows and inputs are evicted during the run: a row can be up to
    // ~700 bytes, so 16 KiB holds a few dozen.
    let (mut origin, sidecar) = setup(16 << 10, 16 << 10).await;
    let mut model: [Topic; 4] = Default::default();
    let mut client = cache_client(&sidecar).await;
    let mut history = History::new();
    let mut versions = HashMap::new();
    record(&mut history, &model);
    for s in steps {
        match s {
            Step::Publish(t, k, v) => {
                let key = topic_key(t, k);
                let put = match &v {
                    Some(b) => Put::upsert(key.clone(), b.clone()),
                    None => Put::delete(key.clone()),
                };
                origin
                    .origin
                    .publish(TOPICS[t], vec![put])
                    .expect("publish");
                match v {
                    Some(b) => model[t].insert(key, b),
                    None => model[t].remove(&key),
                };
                record(&mut history, &model);
            }
            Step::Read(i) => {
                let key = format!("p{i}");
                let want = expected(&model, &key);
                row_converges(&mut client, "page", &key, &want, &history, &mut versions).await;
            }
            Step::ReadSummary(i) => {
                let key = format!("p{i}");
                let want = summary(&model, &key);
                row_converges(&mut client, "summary", &key, &want, &history, &mut versions).await;
            }
            Step::Cut => origin.origin.close_streams(),
            Step::Restart => {
                origin.restart(origin_cfg()).await;
                model = Default::default();
                // A new epoch: versions start over, and rows of the old data may still be read
                // until the sidecar has resynced.
                versions.clear();
                record(&mut history, &model);
            }
        }
    }
    // Quiescence: every row (resident or computed now) equals the recompute.
    for i in 0..PRODUCTS {
        let key = format!("p{i}");
        let (page, sum) = (expected(&model, &key), summary(&model, &key));
        row_converges(&mut client, "page", &key, &page, &history, &mut versions).await;
        row_converges(&mut client, "summary", &key, &sum, &history, &mut versions).await;
    }
    drop(sidecar);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VIEWS_OD_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(16),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn on_demand_view_rows_equal_a_recompute(steps in prop::collection::vec(step(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(within(run_steps(steps)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_view_over_full_topics_computes_rows_on_read_only() {
    within(async {
        let origin = TestOrigin::start(origin_cfg()).await;
        put(
            &origin,
            "products",
            "p1",
            json!({"id": "p1", "status": "active", "brand_id": "b1"}),
        );
        put(&origin, "brands", "b1", json!({"name": "B"}));
        let mut cfg = sidecar_config(&origin.url(), &TOPICS);
        cfg.views = vec![page(1 << 20)];
        let sidecar = start_sidecar(cfg).await;
        sidecar.synced().await;
        let rows = source(&sidecar, "page")
            .view_cache()
            .expect("on_demand view")
            .clone();
        // Nothing is computed until read.
        assert_eq!(rows.resident_keys(), 0);
        let view_stats = sidecar.view_stats("page").expect("stats").clone();
        assert_eq!(view_stats.recomputes.load(Ordering::Relaxed), 0);
        let mut client = cache_client(&sidecar).await;
        let got = row(&mut client, "p1").await.expect("a row");
        assert_eq!(got["brand"], json!({"name": "B"}));
        // Every input is held: no round of fetching.
        assert_eq!(
            view_stat(&sidecar, |s| s.fetches.load(Ordering::Relaxed)),
            0
        );
        assert_eq!(origin.origin.stats().fetches.load(Ordering::Relaxed), 0);
        // A change to a full input reaches the resident row through the writer.
        put(&origin, "brands", "b1", json!({"name": "B2"}));
        let mut want = got;
        want["brand"] = json!({"name": "B2"});
        row_becomes(&mut client, "page", "p1", &Some(want)).await;
        assert_eq!(view_stat(&sidecar, |s| s.misses.load(Ordering::Relaxed)), 1);
    })
    .await;
}

/// `idle` expiry, with nobody reading or scraping: a view row not read for `idle` is dropped
/// and releases its pins, and its inputs (on_demand topics with `idle` too) are dropped and
/// unsubscribed at the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_rows_and_keys_expire_and_are_unsubscribed() {
    within(async {
        let origin = TestOrigin::start(origin_cfg()).await;
        let mut cfg = sidecar_config(&origin.url(), &TOPICS);
        let idle = Some(viewcar::config::Dur(Duration::from_secs(1)));
        for t in &mut cfg.origins[0].topics {
            t.mode = Mode::OnDemand;
            t.max_bytes = Some(ByteSize(1 << 20));
            t.idle = idle;
        }
        let mut view = page(1 << 20);
        view.idle = idle;
        cfg.views = vec![view];
        let sidecar = start_sidecar(cfg).await;
        put_p1(&origin, Some(json!({"amount": 5})));
        let mut client = cache_client(&sidecar).await;
        // Idle is counted from the read at the latest, so a lower bound from here holds.
        let start = tokio::time::Instant::now();
        assert!(row(&mut client, "p1").await.is_some());
        let rows = source(&sidecar, "page").view_cache().expect("view").clone();
        let products = source(&sidecar, "products")
            .on_demand()
            .expect("topic")
            .clone();
        // Resident counts are as of the last housekeeping.
        sidecar.store().settle().await;
        assert_eq!(rows.resident_keys(), 1);
        assert!(products.pinned_count() >= 1, "the row pins its inputs");
        // The Subscribe travels on the Sync stream and may land just after the read.
        eventually("the origin has the key's subscription", || {
            origin.origin.is_key_subscribed("products", "p1")
        })
        .await;

        // Nobody reads: the row goes after `idle`, then its inputs, and the origin is told.
        loop {
            let gone = rows.resident_keys() == 0
                && products.pinned_count() == 0
                && products.resident_keys() == 0
                && !origin.origin.is_key_subscribed("products", "p1")
                && !origin.origin.is_key_subscribed("countries", "DE");
            if gone {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "still held after {:?}: rows {}, pinned {}, keys {}",
                start.elapsed(),
                rows.resident_keys(),
                products.pinned_count(),
                products.resident_keys()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "expired before idle"
        );
        // Read again: computed afresh (a new round of fetching), same row.
        assert!(row(&mut client, "p1").await.is_some());
    })
    .await;
}
