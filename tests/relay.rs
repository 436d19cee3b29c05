//! Relays (`[listen] feed`): a sidecar serving the Feed API from what it holds. Positions stay
//! the origin's through a chain of relays, leaves fail over between relays without a snapshot,
//! one relay turns a thousand leaf streams into one origin subscription, and a change batch or
//! snapshot is encoded once for all of them.

mod common;
mod ops_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use viewcar::config::Dur;
use viewcar::pb::feed::v1 as feed;
use viewcar::{Origin, Sidecar, SidecarConfig};

/// A relay's config: the topics of the sidecar at `upstream` (one address or several), served
/// on a Feed listener of its own.
fn relay_config(upstreams: &[String], topics: &[&str]) -> SidecarConfig {
    let mut cfg = sidecar_config(&upstreams[0], topics);
    cfg.origins[0].fallback = upstreams[1..].to_vec();
    cfg.listen.feed = Some(loopback0());
    cfg.relay.progress_interval = Dur(Duration::from_millis(100));
    cfg
}

fn feed_url(s: &Sidecar) -> String {
    format!("http://{}", s.feed_addr().expect("serves feed"))
}

/// Every row of `topic` at `origin` with its version (Fetch of every key).
fn origin_rows(origin: &Origin, topic: &str) -> BTreeMap<String, (Bytes, u64)> {
    let keys: Vec<String> = origin.rows(topic).into_iter().map(|(k, _)| k).collect();
    let got = origin.fetch(topic, &keys).expect("fetch");
    got.entries
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect()
}

fn sidecar_rows(s: &Sidecar, topic: &str) -> BTreeMap<String, (Bytes, u64)> {
    let src = source(s, topic);
    src.keyspace()
        .keys()
        .into_iter()
        .filter_map(|k| src.get(&k).map(|r| (k.to_string(), (r.value, r.version))))
        .collect()
}

/// Waits until `s` holds `topic` at the origin's position, then checks rows and versions.
async fn assert_same(origin: &Origin, s: &Sidecar, topic: &str, what: &str) {
    let version = origin.version(topic).expect("topic");
    wait_position(&source(s, topic), origin.epoch(), version).await;
    let (epoch, at) = source(s, topic).position();
    assert_eq!(
        (epoch.as_str(), at),
        (origin.epoch(), version),
        "{what}: position"
    );
    assert_eq!(
        sidecar_rows(s, topic),
        origin_rows(origin, topic),
        "{what}: rows"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16),
    Delete(u8),
    CutOrigin,
    CutRelay,
    RestartOrigin,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..20, any::<u16>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..20).prop_map(Op::Delete),
        1 => Just(Op::CutOrigin),
        1 => Just(Op::CutRelay),
        1 => Just(Op::RestartOrigin),
    ]
}

async fn chain_case(ops: Vec<Op>) {
    let mut origin = TestOrigin::start(origin_config()).await;
    let r1 = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
    let r2 = start_sidecar(relay_config(&[feed_url(&r1)], &["t"])).await;
    let leaf = start_sidecar(sidecar_config(&feed_url(&r2), &["t"])).await;
    origin.origin.publish("t", vec![put("seed", "0")]).unwrap();
    // The model: what the origin holds, applied independently of it.
    let mut model: BTreeMap<String, String> = BTreeMap::from([("seed".into(), "0".into())]);
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let (k, v) = (format!("k{k}"), v.to_string());
                origin.origin.publish("t", vec![put(&k, &v)]).unwrap();
                model.insert(k, v);
            }
            Op::Delete(k) => {
                let k = format!("k{k}");
                origin.origin.publish("t", vec![del(&k)]).unwrap();
                model.remove(&k);
            }
            Op::CutOrigin => origin.origin.close_streams(),
            Op::CutRelay => r1.relay().unwrap().origin().close_streams(),
            Op::RestartOrigin => {
                // In memory: a new epoch, and the model's data is lost with it.
                origin.restart(origin_config()).await;
                model.clear();
                origin.origin.publish("t", vec![put("seed", "1")]).unwrap();
                model.insert("seed".into(), "1".into());
            }
        }
    }
    let o = origin.origin.clone();
    for (s, what) in [(&r1, "relay 1"), (&r2, "relay 2"), (&leaf, "leaf")] {
        assert_same(&o, s, "t", what).await;
    }
    let held: BTreeMap<String, String> = o
        .rows("t")
        .into_iter()
        .map(|(k, v)| (k, text(&v)))
        .collect();
    assert_eq!(held, model, "the origin holds what the model says");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, .. ProptestConfig::default() })]
    #[test]
    fn a_chain_of_relays_keeps_the_origins_positions(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(within(chain_case(ops)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_at_a_relay_is_refused_naming_the_upstream() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let relay = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        relay.synced().await;
        let mut client = feed_client(relay.feed_addr().unwrap()).await;
        let err = client
            .publish(feed::PublishRequest {
                topic: "t".into(),
                changes: vec![feed::Change {
                    key: "a".into(),
                    value: Bytes::from_static(b"2"),
                    deleted: false,
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains(&origin.url()), "{}", err.message());
        // Fetch of a held topic is served, with the origin's position.
        wait_position(&source(&relay, "t"), origin.origin.epoch(), 1).await;
        // The relay's Feed side takes the snapshot when the writer's step ends, after the source:
        // until then a Fetch is UNAVAILABLE ("retry shortly"), as documented.
        let got = loop {
            match client
                .fetch(feed::FetchRequest {
                    topic: "t".into(),
                    keys: vec!["a".into(), "b".into()],
                })
                .await
            {
                Ok(r) => break r.into_inner(),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                Err(s) => panic!("fetch at the relay: {s:?}"),
            }
        };
        let pos = got.position.unwrap();
        assert_eq!(
            (pos.epoch.as_str(), pos.version),
            (origin.origin.epoch(), 1)
        );
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.missing, vec!["b".to_string()]);
        let err = client
            .fetch(feed::FetchRequest {
                topic: "nope".into(),
                keys: vec!["a".into()],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_listing_two_relays_continues_on_the_other_without_a_snapshot() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let a = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        let b = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        b.synced().await;
        let mut cfg = sidecar_config(&feed_url(&a), &["t"]);
        cfg.origins[0].fallback = vec![feed_url(&b)];
        let leaf = start_sidecar(cfg).await;
        assert_same(&origin.origin, &leaf, "t", "leaf through a").await;
        origin.origin.publish("t", vec![put("b", "2")]).unwrap();
        assert_same(&origin.origin, &leaf, "t", "leaf through a").await;
        let stats = leaf.feed_stats("o").unwrap().clone();
        assert_eq!(counter(&stats.snapshots), 1);
        let b_resumes = counter(&b.relay().unwrap().origin().stats().resumes);

        // Relay a goes away; the leaf redials b and resumes there.
        assert!(a.shutdown().await, "relay a stops within its grace period");
        for i in 0..5 {
            origin
                .origin
                .publish("t", vec![put(&format!("c{i}"), "3")])
                .unwrap();
        }
        origin.origin.publish("t", vec![del("a")]).unwrap();
        assert_same(&origin.origin, &leaf, "t", "leaf through b").await;
        assert_eq!(
            counter(&stats.snapshots),
            1,
            "continued on the other relay without a snapshot"
        );
        assert!(counter(&b.relay().unwrap().origin().stats().resumes) > b_resumes);
    })
    .await
}

/// Every change goes out when it is published, at every hop. With Progress a minute apart at
/// the origin and at the relay (Progress also polls a stream's session), a leaf still gets each
/// of 20 changes, one at a time, within seconds: a stream woken late, on its next Progress,
/// fails this (the other tests here send Progress every 100 ms, which would hide it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_a_leaf_through_a_relay_without_waiting_for_progress() {
    within(async {
        let origin = TestOrigin::start(viewcar::config::OriginConfig {
            progress_interval: Dur(Duration::from_secs(60)),
            ..origin_config()
        })
        .await;
        origin.origin.publish("t", vec![put("a", "0")]).unwrap();
        let mut cfg = relay_config(&[origin.url()], &["t"]);
        cfg.relay.progress_interval = Dur(Duration::from_secs(60));
        let relay = start_sidecar(cfg).await;
        relay.synced().await;
        let leaf = start_sidecar(sidecar_config(&feed_url(&relay), &["t"])).await;
        leaf.synced().await;
        let at_leaf = source(&leaf, "t");
        for i in 1..=20 {
            let v = origin
                .origin
                .publish("t", vec![put("a", &i.to_string())])
                .unwrap()
                .version;
            tokio::time::timeout(
                Duration::from_secs(10),
                wait_source(&at_leaf, "the change", |s| s.position().1 >= v),
            )
            .await
            .unwrap_or_else(|_| panic!("change {i} (version {v}) did not reach the leaf in 10 s"));
        }
        let stats = leaf.feed_stats("o").unwrap().clone();
        assert_eq!(counter(&stats.snapshots), 1, "one stream, never restarted");
    })
    .await
}

/// A leaf fails over to a relay that is behind it (cut off from the origin, same epoch): its
/// stream resumes at the leaf's position and waits there; once that relay catches up, the leaf
/// goes on from where it was, without a snapshot and without applying anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_failing_over_to_a_relay_behind_it_waits_there_and_needs_no_snapshot() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let a = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        // Relay b reaches the origin through a proxy, so it can be cut off from it.
        let proxy = Proxy::start(origin.addr).await;
        let b = start_sidecar(relay_config(&[format!("http://{}", proxy.addr)], &["t"])).await;
        b.synced().await;
        let mut cfg = sidecar_config(&feed_url(&a), &["t"]);
        cfg.origins[0].fallback = vec![feed_url(&b)];
        let leaf = start_sidecar(cfg).await;
        assert_same(&origin.origin, &leaf, "t", "leaf through a").await;
        let stats = leaf.feed_stats("o").unwrap().clone();

        // b falls behind: cut off, it misses version 2, which a and the leaf get.
        proxy.set_upstream(Upstream::Refuse);
        proxy.cut();
        let b_t = source(&b, "t");
        let b_version = b_t.version();
        let pos = origin.origin.publish("t", vec![put("b", "2")]).unwrap();
        assert_same(&origin.origin, &leaf, "t", "leaf through a").await;
        assert_eq!(b_t.version(), b_version, "b is behind the leaf");

        // a goes away: the leaf resumes on b at its own position, ahead of b's.
        let b_resumes = counter(&b.relay().unwrap().origin().stats().resumes);
        assert!(a.shutdown().await);
        common::eventually("the leaf resumed on b", || {
            counter(&b.relay().unwrap().origin().stats().resumes) > b_resumes
        })
        .await;
        let t = source(&leaf, "t");
        assert_eq!(
            t.version(),
            pos.version,
            "nothing of b's older state applied"
        );
        assert_eq!(t.get("b").map(|e| e.value), Some("2".into()));

        // b reaches the origin again and catches up; the leaf follows from version 2 on.
        proxy.set_upstream(Upstream::Forward(origin.addr));
        origin.origin.publish("t", vec![put("c", "3")]).unwrap();
        origin.origin.publish("t", vec![del("a")]).unwrap();
        assert_same(&origin.origin, &leaf, "t", "leaf through b").await;
        assert_eq!(counter(&stats.snapshots), 1, "no snapshot at the leaf");
        assert_eq!(counter(&stats.gaps), 0);
        assert_eq!(counter(&stats.duplicates), 0, "nothing applied twice");
    })
    .await
}

/// A relay cut off from the origin sends no Progress, so a leaf on it hears nothing: after its
/// `feed.idle_timeout` the leaf redials its next address, a live relay, and goes on there from
/// its position, without a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_on_a_relay_cut_off_from_the_origin_moves_to_a_live_one_after_its_idle_timeout() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let a = start_sidecar(relay_config(&[format!("http://{}", proxy.addr)], &["t"])).await;
        let b = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        // b holds the leaf's position before the origin moves on: a relay whose first
        // snapshot is newer than a leaf's position has to send that leaf a snapshot.
        a.synced().await;
        b.synced().await;
        let mut cfg = sidecar_config(&feed_url(&a), &["t"]);
        cfg.origins[0].fallback = vec![feed_url(&b)];
        cfg.feed.idle_timeout = Dur(Duration::from_millis(500));
        let leaf = start_sidecar(cfg).await;
        assert_same(&origin.origin, &leaf, "t", "leaf through a").await;
        let stats = leaf.feed_stats("o").unwrap().clone();
        let b_streams = counter(&b.relay().unwrap().origin().stats().streams_opened);

        // a loses the origin and goes quiet; the origin goes on.
        proxy.set_upstream(Upstream::Refuse);
        proxy.cut();
        origin.origin.publish("t", vec![put("b", "2")]).unwrap();
        origin.origin.publish("t", vec![del("a")]).unwrap();
        assert_same(&origin.origin, &leaf, "t", "leaf moved to b").await;
        assert!(counter(&b.relay().unwrap().origin().stats().streams_opened) > b_streams);
        assert_eq!(counter(&stats.snapshots), 1, "resumed on b, no snapshot");
    })
    .await
}

/// A lightweight leaf: one Sync stream to `addr`, keeping rows and position as a sidecar
/// would, checking `prev_version` continuity, redialling (with its position) when cut.
struct Leaf {
    rows: BTreeMap<String, Bytes>,
    epoch: String,
    version: u64,
    snapshots: u64,
    batches: u64,
    gaps: u64,
}

async fn run_leaf(channel: tonic::transport::Channel, topic: &'static str, leaf: Arc<Mutex<Leaf>>) {
    loop {
        let mut client = feed::feed_client::FeedClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(4);
        let resume = {
            let l = leaf.lock().unwrap();
            (!l.epoch.is_empty()).then(|| feed::Position {
                epoch: l.epoch.clone(),
                version: l.version,
            })
        };
        tx.send(feed::SyncRequest {
            kind: Some(feed::sync_request::Kind::Subscribe(feed::Subscribe {
                topic: topic.into(),
                keys: vec![],
                resume,
            })),
        })
        .await
        .unwrap();
        let Ok(resp) = client.sync(ReceiverStream::new(rx)).await else {
            // A thousand leaves redialling a relay that is down: spread, as sidecars' backoff is.
            let jitter = rand_ms();
            tokio::time::sleep(Duration::from_millis(50 + jitter)).await;
            continue;
        };
        let mut stream = resp.into_inner();
        let mut staging: Option<BTreeMap<String, Bytes>> = None;
        while let Ok(Some(msg)) = stream.message().await {
            let mut l = leaf.lock().unwrap();
            match msg.kind {
                Some(feed::sync_response::Kind::Snapshot(c)) => {
                    let st = staging.get_or_insert_with(BTreeMap::new);
                    for e in c.entries {
                        st.insert(e.key, e.value);
                    }
                    if c.last {
                        l.rows = staging.take().unwrap_or_default();
                        let p = c.position.unwrap();
                        l.epoch = p.epoch;
                        l.version = p.version;
                        l.snapshots += 1;
                    }
                }
                Some(feed::sync_response::Kind::Changes(b)) => {
                    if b.epoch != l.epoch || b.prev_version != l.version {
                        l.gaps += 1;
                        continue;
                    }
                    for c in b.changes {
                        if c.deleted {
                            l.rows.remove(&c.key);
                        } else {
                            l.rows.insert(c.key, c.value);
                        }
                    }
                    l.version = b.version;
                    l.batches += 1;
                }
                Some(feed::sync_response::Kind::Progress(p)) => {
                    let p = p.position.unwrap();
                    if p.epoch == l.epoch && p.version > l.version {
                        l.version = p.version;
                    }
                }
                Some(feed::sync_response::Kind::Reset(_)) => staging = None,
                _ => {}
            }
        }
        drop(tx);
    }
}

/// `n` leaves, a hundred streams per connection (as many sidecars behind one proxy would be).
async fn start_leaves(addr: SocketAddr, topic: &'static str, n: usize) -> Vec<Arc<Mutex<Leaf>>> {
    let mut leaves = Vec::with_capacity(n);
    let mut channel = None;
    for i in 0..n {
        if i % 100 == 0 {
            channel = Some(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy(),
            );
        }
        let leaf = Arc::new(Mutex::new(Leaf {
            rows: BTreeMap::new(),
            epoch: String::new(),
            version: 0,
            snapshots: 0,
            batches: 0,
            gaps: 0,
        }));
        tokio::spawn(run_leaf(channel.clone().unwrap(), topic, leaf.clone()));
        leaves.push(leaf);
    }
    leaves
}

/// Jitter for the test leaves' redial, without a random number crate: the clock's nanoseconds.
fn rand_ms() -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(n % 100)
}

/// The deadline of the thousand-leaf waits: a debug build on a shared two-core machine.
const FLEET_DEADLINE: Duration = Duration::from_secs(90);

async fn all_at(leaves: &[Arc<Mutex<Leaf>>], epoch: &str, version: u64) {
    let start = std::time::Instant::now();
    loop {
        let at = leaves
            .iter()
            .filter(|l| {
                let l = l.lock().unwrap();
                l.epoch == epoch && l.version >= version
            })
            .count();
        if at == leaves.len() {
            return;
        }
        assert!(
            start.elapsed() < FLEET_DEADLINE,
            "only {at} of {} leaves reached {epoch}@{version}",
            leaves.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`within`] with [`FLEET_DEADLINE`].
async fn within_fleet<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(FLEET_DEADLINE * 2, f)
        .await
        .expect("test did not finish within its deadline")
}

fn origin_map(origin: &Origin, topic: &str) -> BTreeMap<String, Bytes> {
    origin.rows(topic).into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_leaf_streams_on_one_relay_are_one_subscription_at_the_origin() {
    within_fleet(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "0")]).unwrap();
        let relay = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        relay.synced().await;
        let addr = relay.feed_addr().unwrap();
        let leaves = start_leaves(addr, "t", 1000).await;
        all_at(&leaves, origin.origin.epoch(), 1).await;
        let stats = relay.relay().unwrap().origin().stats();
        assert_eq!(
            counter(&stats.snapshot_encodings),
            1,
            "one snapshot encoding for a thousand streams at one position"
        );
        let encodings = counter(&stats.batch_encodings);
        let n = 50;
        for i in 0..n {
            let p = if i % 7 == 3 {
                del("a")
            } else {
                put(&format!("k{}", i % 10), &i.to_string())
            };
            origin.origin.publish("t", vec![p]).unwrap();
        }
        let version = origin.origin.version("t").unwrap();
        all_at(&leaves, origin.origin.epoch(), version).await;
        let want = origin_map(&origin.origin, "t");
        for l in &leaves {
            let l = l.lock().unwrap();
            assert_eq!(l.rows, want);
            assert_eq!(l.gaps, 0);
            assert_eq!(l.snapshots, 1);
            assert_eq!(l.batches, n);
        }
        assert_eq!(
            counter(&origin.origin.stats().streams_opened),
            1,
            "the origin serves one stream: the relay's"
        );
        assert_eq!(
            counter(&stats.batch_encodings) - encodings,
            n,
            "each batch encoded once for a thousand streams"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_under_a_thousand_leaves_converges_with_one_shared_snapshot() {
    within_fleet(async {
        let origin = TestOrigin::start(origin_config()).await;
        let rows: Vec<viewcar::Put> = (0..200).map(|i| put(&format!("k{i}"), "v")).collect();
        origin.origin.publish("t", rows).unwrap();
        let mut cfg = relay_config(&[origin.url()], &["t"]);
        let relay = start_sidecar(cfg.clone()).await;
        relay.synced().await;
        let addr = relay.feed_addr().unwrap();
        let leaves = start_leaves(addr, "t", 1000).await;
        all_at(&leaves, origin.origin.epoch(), 1).await;
        assert!(relay.shutdown().await);
        // Outside the restarted relay's window: every leaf needs a snapshot.
        origin
            .origin
            .publish("t", vec![put("k1", "w"), del("k2")])
            .unwrap();
        cfg.listen.feed = Some(addr);
        let relay = start_sidecar(cfg).await;
        let version = origin.origin.version("t").unwrap();
        all_at(&leaves, origin.origin.epoch(), version).await;
        let want = origin_map(&origin.origin, "t");
        for l in &leaves {
            let l = l.lock().unwrap();
            assert_eq!(l.rows, want);
            assert_eq!(l.snapshots, 2);
        }
        let stats = relay.relay().unwrap().origin().stats();
        assert_eq!(counter(&stats.snapshots_sent), 1000);
        assert_eq!(
            counter(&stats.snapshot_encodings),
            1,
            "a thousand leaves at one position share one encoded snapshot"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_served_by_a_relay_is_a_topic_of_the_leaf() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin
            .origin
            .publish(
                "products",
                vec![
                    put("p1", r#"{"name":"a","status":"active"}"#),
                    put("p2", r#"{"name":"b","status":"gone"}"#),
                ],
            )
            .unwrap();
        let mut cfg = relay_config(&[origin.url()], &["products"]);
        cfg.views = vec![toml::from_str(
            "name = \"active\"\nfrom = \"products\"\nwhere = \"status == 'active'\"\n",
        )
        .unwrap()];
        let relay = start_sidecar(cfg).await;
        relay.synced().await;
        let leaf = start_sidecar(sidecar_config(&feed_url(&relay), &["active"])).await;
        leaf.synced().await;
        let active = source(&leaf, "active");
        let view = source(&relay, "active");
        wait_source(&active, "the view's rows", |s| s.len() == 1).await;
        assert_eq!(
            active.epoch().as_str(),
            relay.relay().unwrap().origin().epoch()
        );
        origin
            .origin
            .publish(
                "products",
                vec![put("p2", r#"{"name":"b","status":"active"}"#)],
            )
            .unwrap();
        wait_source(&view, "the view follows", |s| s.len() == 2).await;
        let v = view.version();
        wait_source(&active, "the leaf follows", |s| s.version() >= v).await;
        assert_eq!(
            sidecar_rows(&leaf, "active"),
            sidecar_rows(&relay, "active")
        );
        origin.origin.publish("products", vec![del("p1")]).unwrap();
        wait_source(&view, "the view follows", |s| s.len() == 1).await;
        let v = view.version();
        wait_source(&active, "the leaf follows", |s| s.version() >= v).await;
        assert_eq!(
            sidecar_rows(&leaf, "active"),
            sidecar_rows(&relay, "active")
        );
        // The relay's side shows in its /status (as in /metrics): one leaf stream, its
        // snapshot and the view's two changes since.
        let status: serde_json::Value =
            serde_json::from_str(&ops_support::get(relay.http_addr(), "/status").await.body)
                .unwrap();
        let r = &status["relay"];
        assert_eq!(r["streams"], 1, "{r}");
        assert_eq!(r["streams_opened"], 1, "{r}");
        assert_eq!(r["snapshots_sent"], 1, "{r}");
        assert_eq!(r["batches_sent"], 2, "{r}");
        assert_eq!(r["resets_sent"], 0, "{r}");
        let status: serde_json::Value =
            serde_json::from_str(&ops_support::get(leaf.http_addr(), "/status").await.body)
                .unwrap();
        assert!(status["relay"].is_null(), "a leaf serves no feed");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_its_origin_serves_what_it_holds_and_leaves_see_it_stale() {
    within(async {
        let mut origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let relay = start_sidecar(relay_config(&[origin.url()], &["t"])).await;
        let mut cfg = sidecar_config(&feed_url(&relay), &["t"]);
        cfg.feed.live_window = Dur(Duration::from_millis(300));
        let leaf = start_sidecar(cfg).await;
        assert_same(&origin.origin, &leaf, "t", "leaf").await;
        let t = source(&leaf, "t");
        eventually("the leaf is live", || t.staleness_ms() == 0).await;

        origin.stop().await;
        eventually("the leaf sees the relay's data go stale", || {
            t.staleness_ms() > 0
        })
        .await;
        assert_eq!(t.get("a").map(|r| text(&r.value)), Some("1".to_string()));
        assert!(
            leaf.feed_stats("o")
                .unwrap()
                .connected
                .load(std::sync::atomic::Ordering::Relaxed),
            "still connected to the relay"
        );
    })
    .await
}

/// Connections waiting to be accepted by the IPv4 listener on `port`: the `rx_queue` of its
/// LISTEN line in /proc/net/tcp. `None` without /proc or without that listener.
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl, local_address, rem_address, st (0A: LISTEN), tx_queue:rx_queue, ...
        if f.get(1) != Some(&local.as_str()) || f.get(3) != Some(&"0A") {
            return None;
        }
        let (_, rx) = f.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// A fleet reconnecting at once waits in the relay's listen backlog: past the relay's
/// connection bound (here one connection, so that nothing else is accepted) several hundred
/// connections are completed by the kernel and queued, where a backlog of 128 (the standard
/// library's and tokio's) queued 129 and dropped the rest, some of which then got a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_waits_in_the_relays_backlog() {
    if std::fs::metadata("/proc/net/tcp").is_err() {
        println!("skipped: /proc/net/tcp not found");
        return;
    }
    let Some(somaxconn) = somaxconn_above(200) else {
        return;
    };
    let burst = 600.min(somaxconn - 1);
    let origin = TestOrigin::start(origin_config()).await;
    origin.origin.publish("t", vec![put("a", "1")]).unwrap();
    let mut cfg = relay_config(&[origin.url()], &["t"]);
    cfg.relay.max_connections = 1;
    let relay = start_sidecar(cfg).await;
    let addr = relay.feed_addr().unwrap();
    // Takes the one permit: the relay accepts nothing more while it is open.
    let _first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Not awaited one by one: a connection the queue has no room for waits for the kernel's
    // SYN retry, a second or more.
    let dials: Vec<_> = (0..burst)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
        .collect();
    let mut queued = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while (queued as usize) < burst && tokio::time::Instant::now() < deadline {
        // A kernel counter with nothing to wait on: read again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
        queued = accept_queue(addr.port()).unwrap_or(0);
    }
    assert_eq!(
        queued as usize, burst,
        "connections queued for the relay's accept, of {burst} dialled at once"
    );
    for d in dials {
        d.abort();
    }
}
