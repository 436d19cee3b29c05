//! on_demand topics over loopback gRPC: bounded by bytes, one Fetch per miss however many wait,
//! kept current by push, and unsubscribed on eviction.

mod common;
#[path = "ops_support/mod.rs"]
mod ops_support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use viewcar::config::{ByteSize, Mode};
use viewcar::internals::parse_prometheus_text;
use viewcar::origin::Put;
use viewcar::pb::cache::v1 as cache;
use viewcar::store::on_demand::ENTRY_OVERHEAD;
use viewcar::store::OnDemand;
use viewcar::{Origin, Sidecar};

const TOPIC: &str = "users";

fn value(i: usize, gen: u32) -> Bytes {
    Bytes::from(format!(
        "{{\"id\":{i},\"gen\":{gen},\"pad\":\"{:064}\"}}",
        i
    ))
}

fn key(i: usize) -> String {
    format!("u{i:05}")
}

/// An origin with `n` keys in `users`, and a sidecar holding it on_demand within `max_bytes`.
async fn setup(n: usize, max_bytes: u64) -> (TestOrigin, Sidecar, Arc<OnDemand>) {
    let origin = TestOrigin::start(origin_config()).await;
    let puts: Vec<Put> = (0..n).map(|i| Put::upsert(key(i), value(i, 0))).collect();
    for chunk in puts.chunks(1000) {
        origin.origin.publish(TOPIC, chunk.to_vec()).expect("seed");
    }
    let mut cfg = sidecar_config(&origin.url(), &[TOPIC]);
    let t = &mut cfg.origins[0].topics[0];
    t.mode = Mode::OnDemand;
    t.max_bytes = Some(ByteSize(max_bytes));
    let sidecar = start_sidecar(cfg).await;
    let od = source(&sidecar, TOPIC)
        .on_demand()
        .expect("on_demand source")
        .clone();
    (origin, sidecar, od)
}

async fn get(
    client: &mut cache::cache_client::CacheClient<tonic::transport::Channel>,
    key: &str,
) -> cache::Item {
    client
        .get(get_waiting(TOPIC, key, 10_000))
        .await
        .expect("get")
        .into_inner()
        .item
        .expect("item")
}

/// Polls `cond` (each check is cheap) until it holds or the test deadline passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn fetches(o: &Origin) -> u64 {
    o.stats().fetches.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ten_times_the_budget_stays_bounded_and_evicted_keys_are_not_pushed() {
    within(async {
        let n = 2000;
        let per_key = (key(0).len() + value(0, 0).len()) as u64 + ENTRY_OVERHEAD;
        // Room for 10% of the keys.
        let budget = per_key * n as u64 / 10;
        let (origin, sidecar, od) = setup(n, budget).await;
        let mut client = cache_client(&sidecar).await;
        for i in 0..n {
            let item = get(&mut client, &key(i)).await;
            assert!(item.found);
            assert_eq!(item.value, value(i, 0));
        }
        od.sync().await;
        let resident = od.resident_keys();
        assert!(
            od.resident_bytes() <= budget,
            "{} resident bytes above the budget {budget}",
            od.resident_bytes()
        );
        assert!(
            resident > 0 && resident <= n as u64 / 10,
            "{resident} resident"
        );
        assert_eq!(
            fetches(&origin.origin),
            n as u64,
            "one Fetch per distinct key"
        );
        // Every unsubscribe reaches the origin: its keyed interest is exactly the resident keys.
        eventually("subscriptions = resident keys", || {
            origin.origin.keyed_subscriptions(TOPIC) as u64 == od.resident_keys()
        })
        .await;

        // An evicted key is no longer pushed; a resident one is, without a refetch.
        let mut evicted = None;
        let mut kept = None;
        for i in 0..n {
            let resident = od.peek(&key(i)).await.is_some();
            match (resident, evicted, kept) {
                (false, None, _) => evicted = Some(i),
                (true, _, None) => kept = Some(i),
                _ => {}
            }
        }
        let (evicted, kept) = (
            evicted.expect("an evicted key"),
            kept.expect("a resident key"),
        );
        assert!(!origin.origin.is_key_subscribed(TOPIC, &key(evicted)));
        let before = fetches(&origin.origin);
        let stray = od.stats().stray.load(Ordering::Relaxed);
        origin
            .origin
            .publish(TOPIC, vec![Put::upsert(key(evicted), value(evicted, 1))])
            .expect("publish");
        origin
            .origin
            .publish(TOPIC, vec![Put::upsert(key(kept), value(kept, 1))])
            .expect("publish");
        // The stream is ordered: once the later change is in, the earlier one was not sent.
        let t = tokio::time::Instant::now();
        loop {
            if od.peek(&key(kept)).await.and_then(|s| s.value) == Some(value(kept, 1)) {
                break;
            }
            assert!(
                t.elapsed() < DEADLINE,
                "push of a resident key never arrived"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(od.stats().stray.load(Ordering::Relaxed), stray);
        assert!(od.peek(&key(evicted)).await.is_none());
        assert_eq!(fetches(&origin.origin), before, "no refetch");
        let got = get(&mut client, &key(kept)).await;
        assert_eq!(got.value, value(kept, 1));
        sidecar.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_readers_of_one_missing_key_make_one_fetch() {
    within(async {
        let (origin, sidecar, od) = setup(10, 1 << 20).await;
        let client = cache_client(&sidecar).await;
        // The feed is up (Get waits for it via wait_ms), so no reader fails on a cold start.
        get(&mut client.clone(), &key(9)).await;
        let before = fetches(&origin.origin);
        let barrier = Arc::new(tokio::sync::Barrier::new(100));
        let readers: Vec<_> = (0..100)
            .map(|_| {
                let mut c = client.clone();
                let b = barrier.clone();
                tokio::spawn(async move {
                    b.wait().await;
                    get(&mut c, &key(3)).await
                })
            })
            .collect();
        for r in readers {
            let item = r.await.expect("reader");
            assert!(item.found);
            assert_eq!(item.value, value(3, 0));
        }
        assert_eq!(fetches(&origin.origin) - before, 1, "exactly one Fetch");
        let st = od.stats();
        assert_eq!(
            st.hits.load(Ordering::Relaxed) + st.misses.load(Ordering::Relaxed),
            101
        );
        sidecar.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resident_key_follows_the_origin_and_absent_keys_are_cached() {
    within(async {
        let (origin, sidecar, od) = setup(10, 1 << 20).await;
        let mut client = cache_client(&sidecar).await;
        assert_eq!(get(&mut client, &key(1)).await.value, value(1, 0));
        let missing = get(&mut client, "nobody").await;
        assert!(!missing.found);
        let before = fetches(&origin.origin);
        assert_eq!(before, 2);
        // Both keys are subscribed once their keyed snapshots are in; then publish.
        eventually("both keys subscribed", || {
            origin.origin.keyed_subscriptions(TOPIC) == 2
        })
        .await;
        origin
            .origin
            .publish(
                TOPIC,
                vec![
                    Put::upsert(key(1), value(1, 1)),
                    Put::upsert("nobody", "here now"),
                ],
            )
            .expect("publish");
        let t = tokio::time::Instant::now();
        while od.peek("nobody").await.and_then(|s| s.value).is_none() {
            assert!(t.elapsed() < DEADLINE, "push never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(get(&mut client, &key(1)).await.value, value(1, 1));
        let now_here = get(&mut client, "nobody").await;
        assert!(now_here.found);
        assert_eq!(now_here.value, Bytes::from("here now"));
        // A delete makes the resident key absent.
        origin
            .origin
            .publish(TOPIC, vec![Put::delete(key(1))])
            .expect("publish");
        let t = tokio::time::Instant::now();
        while od.peek(&key(1)).await.and_then(|s| s.value).is_some() {
            assert!(t.elapsed() < DEADLINE, "delete never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!get(&mut client, &key(1)).await.found);
        assert_eq!(fetches(&origin.origin), before, "no refetch");
        // Scan needs every key; an on_demand source refuses it.
        let err = client
            .scan(cache::ScanRequest {
                source: TOPIC.to_string(),
                ..Default::default()
            })
            .await
            .expect_err("scan refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let status = client
            .list_sources(cache::ListSourcesRequest {})
            .await
            .expect("list")
            .into_inner();
        let s = &status.sources[0];
        assert_eq!(s.mode, "on_demand");
        assert_eq!(s.keys, 2);
        assert_eq!(s.fetches, 2);
        assert_eq!(s.max_bytes, 1 << 20);
        sidecar.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_only_resident_keys_are_subscribed() {
    within(async {
        let (origin, sidecar, od) = setup(10, 1 << 20).await;
        let mut client = cache_client(&sidecar).await;
        for i in 0..3 {
            get(&mut client, &key(i)).await;
        }
        eventually("3 keys subscribed", || {
            origin.origin.keyed_subscriptions(TOPIC) == 3
        })
        .await;
        let feed = sidecar.feed_stats("o").expect("feed").clone();
        let connects = feed.connects.load(Ordering::Relaxed);
        origin.origin.close_streams();
        eventually("reconnected", || {
            feed.connects.load(Ordering::Relaxed) > connects
        })
        .await;
        // Changed while the stream was down (maybe): the resubscribe's snapshot refreshes it.
        origin
            .origin
            .publish(TOPIC, vec![Put::upsert(key(2), value(2, 7))])
            .expect("publish");
        eventually("resident keys resubscribed", || {
            origin.origin.keyed_subscriptions(TOPIC) == 3
        })
        .await;
        let t = tokio::time::Instant::now();
        while od.peek(&key(2)).await.and_then(|s| s.value) != Some(value(2, 7)) {
            assert!(
                t.elapsed() < DEADLINE,
                "change after reconnect never arrived"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            fetches(&origin.origin),
            3,
            "resident keys are not refetched"
        );
        sidecar.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_the_on_demand_counters_and_resident_size() {
    within(async {
        let n = 400;
        let per_key = (key(0).len() + value(0, 0).len()) as u64 + ENTRY_OVERHEAD;
        // The smallest budget config allows (16KiB) holds about 64 keys.
        let budget = per_key * 80;
        let (origin, sidecar, od) = setup(n, budget).await;
        let mut client = cache_client(&sidecar).await;
        for i in 0..n {
            get(&mut client, &key(i)).await;
        }
        let last = key(n - 1);
        get(&mut client, &last).await;
        let r = ops_support::get(sidecar.http_addr(), "/metrics").await;
        assert_eq!(r.status, 200);
        let m = parse_prometheus_text(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body));
        let at = |family: &str| {
            let series =
                format!("viewcar_{family}{{source=\"{TOPIC}\",kind=\"topic\",origin=\"o\"}}");
            *m.get(&series)
                .unwrap_or_else(|| panic!("{series} missing:\n{}", r.body))
        };
        let st = od.stats();
        assert_eq!(at("on_demand_misses_total"), n as f64);
        assert!(at("on_demand_hits_total") >= 1.0);
        assert_eq!(
            at("on_demand_hits_total"),
            st.hits.load(Ordering::Relaxed) as f64
        );
        assert_eq!(
            at("on_demand_fetches_total"),
            fetches(&origin.origin) as f64
        );
        assert_eq!(at("on_demand_coalesced_total"), 0.0);
        assert_eq!(at("on_demand_fetch_errors_total"), 0.0);
        assert_eq!(at("on_demand_max_bytes"), budget as f64);
        // /metrics settles moka's housekeeping first: evictions happened, and what is resident
        // is within the budget and agrees with the source.
        assert!(at("on_demand_evictions_total") >= (n - 80) as f64);
        assert!(at("on_demand_resident_bytes") <= budget as f64);
        assert_eq!(at("on_demand_resident_keys"), od.resident_keys() as f64);
        assert_eq!(at("on_demand_resident_bytes"), od.resident_bytes() as f64);
        assert_eq!(
            m["viewcar_source_keys{source=\"users\",kind=\"topic\",origin=\"o\"}"],
            od.resident_keys() as f64
        );
        sidecar.shutdown().await;
    })
    .await;
}
