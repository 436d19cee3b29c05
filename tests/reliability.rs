//! Faults between sidecar and origin, over real loopback gRPC and the fault proxy: history
//! gone, never back in time, a silently dead peer, a reconnect storm, and origins that break
//! the protocol. Every wait is on an event or a deadline-bounded poll of a counter.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use viewcar::config::{ByteSize, Dur, Mode, OriginSpec, TopicSpec};
use viewcar::pb::feed::v1 as feed;
use viewcar::store::Source;
use viewcar::{FeedStats, OriginConfig, Sidecar};

async fn get_value(sidecar: &Sidecar, src: &str, key: &str) -> Option<String> {
    let mut client = cache_client(sidecar).await;
    let item = client
        .get(get_request(src, key))
        .await
        .expect("Get answers")
        .into_inner()
        .item
        .expect("item");
    item.found.then(|| text(&item.value))
}

// ----- bad peers -----

/// A sidecar reading topic `t` of `fake` as `mode`, with messages limited to 4 KiB so that one
/// large batch breaks the protocol; the topic's source and the feed's counters.
async fn bad_peer_sidecar(fake: &FakeOrigin, mode: Mode) -> (Sidecar, Arc<Source>, Arc<FeedStats>) {
    let mut cfg = sidecar_config(&fake.url(), &["t"]);
    cfg.origins[0].topics[0].mode = mode;
    cfg.limits.max_message_bytes = ByteSize(4096);
    let sidecar = start_sidecar(cfg).await;
    let t = source(&sidecar, "t");
    let feed = sidecar.feed_stats("o").unwrap().clone();
    (sidecar, t, feed)
}

/// A batch for a topic the sidecar never subscribed to.
async fn send_batch_for_unsubscribed_topic(s: &FakeStream) {
    s.batch("other", "e", 0, 1, &[("x", Some("1"))]).await
}

/// The batch `e@2 -> e@3` of `t`, larger than the sidecar's 4 KiB message limit.
async fn send_oversized_batch(s: &FakeStream) {
    let big = "x".repeat(10_000);
    s.batch("t", "e", 2, 3, &[("a", Some(big.as_str()))]).await
}

/// The bad message `bad` was counted as one protocol error and the stream was dropped.
fn assert_one_protocol_error(feed: &FeedStats, bad: impl std::fmt::Debug) {
    assert_eq!(counter(&feed.protocol_errors), 1, "{bad:?} not counted");
    assert!(counter(&feed.disconnects) >= 1);
}

/// What a broken origin sends once the sidecar has applied `e@1 {a: 1}` and `e@2 {b: 2}`.
#[derive(Debug, Clone, Copy)]
enum Bad {
    UnsubscribedTopic,
    SnapshotBehindApplied,
    /// A chunk (not `last`) after a complete snapshot, with no Reset or Subscribe asking.
    SnapshotAfterLast,
    /// After a Reset, a snapshot whose chunks name two positions.
    SnapshotPositionChanges,
    Oversized,
}

async fn bad_peer(bad: Bad) {
    within(async {
        let mut fake = FakeOrigin::start().await;
        let (sidecar, t, feed) = bad_peer_sidecar(&fake, Mode::Full).await;
        let mut s = fake.accept().await;
        assert_eq!(s.next_subscribe().await.resume, None);
        s.snapshot("t", "e", 1, &[("a".into(), "1".into())], 10)
            .await;
        s.batch("t", "e", 1, 2, &[("b", Some("2"))]).await;
        wait_position(&t, "e", 2).await;

        match bad {
            Bad::UnsubscribedTopic => send_batch_for_unsubscribed_topic(&s).await,
            Bad::SnapshotBehindApplied => {
                s.snapshot("t", "e", 1, &[("a".into(), "old".into())], 10)
                    .await
            }
            Bad::SnapshotAfterLast => {
                s.send(feed::sync_response::Kind::Snapshot(feed::SnapshotChunk {
                    total_entries: u64::MAX, // a hint that is wrong: it sizes nothing beyond a cap
                    topic: "t".into(),
                    position: Some(feed::Position {
                        epoch: "e".into(),
                        version: 2,
                    }),
                    entries: Vec::new(),
                    last: false,
                }))
                .await
            }
            Bad::SnapshotPositionChanges => {
                s.reset("t", "test").await;
                s.send(feed::sync_response::Kind::Snapshot(feed::SnapshotChunk {
                    total_entries: 0,
                    topic: "t".into(),
                    position: Some(feed::Position {
                        epoch: "e".into(),
                        version: 3,
                    }),
                    entries: vec![feed::Entry {
                        key: "a".into(),
                        value: "3".into(),
                        version: 3,
                    }],
                    last: false,
                }))
                .await;
                s.snapshot("t", "e", 4, &[("z".into(), "4".into())], 10)
                    .await
            }
            Bad::Oversized => send_oversized_batch(&s).await,
        }

        // The sidecar drops the stream and subscribes again on a new one, resuming where it was.
        let mut again = fake.accept().await;
        let sub = again.next_subscribe().await;
        assert_eq!(sub.topic, "t");
        let resume = sub.resume.expect("resubscribed with a resume point");
        assert_eq!((resume.epoch.as_str(), resume.version), ("e", 2));
        assert_one_protocol_error(&feed, bad);

        // The last good data is still served, untouched by the bad message.
        assert_eq!(t.version(), 2);
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("1"));
        assert_eq!(get_value(&sidecar, "t", "b").await.as_deref(), Some("2"));

        // The new stream works.
        again.batch("t", "e", 2, 3, &[("a", Some("3"))]).await;
        wait_position(&t, "e", 3).await;
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("3"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_batch_for_unsubscribed_topic() {
    bad_peer(Bad::UnsubscribedTopic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_snapshot_after_last_behind_applied_version() {
    bad_peer(Bad::SnapshotBehindApplied).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_snapshot_chunk_after_last() {
    bad_peer(Bad::SnapshotAfterLast).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_snapshot_position_changes_midway() {
    bad_peer(Bad::SnapshotPositionChanges).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_oversized_message() {
    bad_peer(Bad::Oversized).await
}

// ----- bad peers on an on_demand topic -----

/// What a broken origin sends on the keyed stream of an on_demand topic once the sidecar holds
/// `a` resident (fetched at `e@1`, answered by a keyed snapshot at `e@1`, changed to `2` by the
/// batch `e@2`).
#[derive(Debug, Clone, Copy)]
enum BadKeyed {
    UnsubscribedTopic,
    /// A chunk (not `last`) no Subscribe asked for, writing `a` at a newer version.
    SnapshotAfterLast,
    /// A whole keyed snapshot (`last`) no Subscribe asked for, writing `a` at a newer version.
    UnaskedSnapshot,
    /// The keyed snapshot answering the Subscribe of a new key `b` is at `e@1`, behind the `e@2`
    /// the stream has already delivered, with an older `b` than the Fetch returned.
    SnapshotBehindApplied,
    Oversized,
}

/// An on_demand topic `t` read from a fake origin: one resident key, then a bad message. The
/// sidecar must drop the stream, count a protocol error, keep serving what is resident as it
/// was, subscribe the resident keys again on a new stream, and go on from there.
async fn bad_keyed_peer(bad: BadKeyed) {
    within(async {
        let mut fake = FakeOrigin::start().await;
        fake.set_position("t", "e", 1);
        fake.set_row("t", "a", "1", 1);
        let (sidecar, t, feed) = bad_peer_sidecar(&fake, Mode::OnDemand).await;
        let mut s = fake.accept().await;

        // A miss: the key is fetched and subscribed; the keyed snapshot answers the Subscribe.
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("1"));
        let sub = s.next_subscribe().await;
        assert_eq!(
            (sub.topic.as_str(), sub.keys.as_slice()),
            ("t", &["a".to_string()][..])
        );
        assert_eq!(sub.resume, None, "keyed subscriptions never resume");
        s.snapshot("t", "e", 1, &[("a".into(), "1".into())], 10)
            .await;
        s.batch("t", "e", 1, 2, &[("a", Some("2"))]).await;
        wait_position(&t, "e", 2).await;
        fake.set_position("t", "e", 2);
        fake.set_row("t", "a", "2", 2);
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("2"));
        assert_eq!(fake.fetches(), 1, "a resident key is read from memory");

        let newer_a = |last| feed::SnapshotChunk {
            total_entries: 0,
            topic: "t".into(),
            position: Some(feed::Position {
                epoch: "e".into(),
                version: 3,
            }),
            entries: vec![feed::Entry {
                key: "a".into(),
                value: "bad".into(),
                version: 3,
            }],
            last,
        };
        match bad {
            BadKeyed::UnsubscribedTopic => send_batch_for_unsubscribed_topic(&s).await,
            BadKeyed::SnapshotAfterLast => {
                s.send(feed::sync_response::Kind::Snapshot(newer_a(false)))
                    .await
            }
            BadKeyed::UnaskedSnapshot => {
                s.send(feed::sync_response::Kind::Snapshot(newer_a(true)))
                    .await
            }
            BadKeyed::SnapshotBehindApplied => {
                fake.set_row("t", "b", "b2", 2);
                assert_eq!(get_value(&sidecar, "t", "b").await.as_deref(), Some("b2"));
                let sub = s.next_subscribe().await;
                assert_eq!(sub.keys, vec!["b".to_string()]);
                s.snapshot("t", "e", 1, &[("b".into(), "b1".into())], 10)
                    .await
            }
            BadKeyed::Oversized => send_oversized_batch(&s).await,
        }

        // The sidecar drops the stream and subscribes its resident keys again on a new one.
        let again = tokio::time::timeout(Duration::from_secs(5), fake.accept()).await;
        let resident_a = t
            .on_demand()
            .expect("on_demand source")
            .peek("a")
            .await
            .map(|s| (s.value.map(|v| text(&v)), s.version));
        let mut again = again.unwrap_or_else(|_| {
            panic!(
                "{bad:?}: the sidecar kept the stream (protocol errors {}, disconnects {}, \
                 resident a = {resident_a:?})",
                counter(&feed.protocol_errors),
                counter(&feed.disconnects)
            )
        });
        let sub = again.next_subscribe().await;
        assert_eq!(sub.topic, "t");
        assert!(sub.keys.contains(&"a".to_string()), "{bad:?}: {sub:?}");
        assert_eq!(sub.resume, None);
        assert_one_protocol_error(&feed, bad);

        // What is resident is still served, untouched by the bad message, without a Fetch.
        let fetched = fake.fetches();
        assert_eq!(
            resident_a,
            Some((Some("2".to_string()), 2)),
            "{bad:?}: resident a changed"
        );
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("2"));
        if let BadKeyed::SnapshotBehindApplied = bad {
            assert_eq!(get_value(&sidecar, "t", "b").await.as_deref(), Some("b2"));
        }
        assert_eq!(
            fake.fetches(),
            fetched,
            "resident keys are read from memory"
        );

        // The new stream works: its keyed snapshot, then changes.
        let entries: Vec<(String, String)> = sub
            .keys
            .iter()
            .map(|k| (k.clone(), if k == "a" { "2" } else { "b2" }.to_string()))
            .collect();
        again.snapshot("t", "e", 2, &entries, 10).await;
        again.batch("t", "e", 2, 3, &[("a", Some("3"))]).await;
        wait_position(&t, "e", 3).await;
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("3"));
        assert_eq!(counter(&feed.protocol_errors), 1);
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keyed_peer_batch_for_unsubscribed_topic() {
    bad_keyed_peer(BadKeyed::UnsubscribedTopic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keyed_peer_snapshot_chunk_after_last() {
    bad_keyed_peer(BadKeyed::SnapshotAfterLast).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keyed_peer_snapshot_nobody_asked_for() {
    bad_keyed_peer(BadKeyed::UnaskedSnapshot).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keyed_peer_snapshot_behind_applied_version() {
    bad_keyed_peer(BadKeyed::SnapshotBehindApplied).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keyed_peer_oversized_message() {
    bad_keyed_peer(BadKeyed::Oversized).await
}

// ----- history gone -----

/// Waits until the feed has noticed the proxy went away.
async fn wait_disconnected(feed: &FeedStats, before: u64) {
    // Only the counter: with a short backoff the feed may be connected again before a poll.
    eventually("feed disconnected", || counter(&feed.disconnects) > before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_behind_the_retained_window_resets_once_per_occurrence() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            retain_batches: 4,
            ..origin_config()
        })
        .await;
        let o = origin.origin.clone();
        let epoch = o.epoch().to_string();
        o.publish("t", vec![put("a", "1"), put("b", "1"), put("c", "1")])
            .unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let sidecar = start_sidecar(sidecar_config(&proxy.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        wait_position(&t, &epoch, o.version("t").unwrap()).await;
        assert_eq!(counter(&o.stats().snapshots_sent), 1);
        assert_eq!(counter(&feed.snapshots), 1);

        for round in 1..=2u64 {
            // The sidecar is away while more than the retained window is published; a key it
            // holds is deleted meanwhile.
            proxy.set_upstream(Upstream::Refuse);
            let before = counter(&feed.disconnects);
            proxy.cut();
            wait_disconnected(&feed, before).await;
            let gone = if round == 1 { "b" } else { "c" };
            o.publish("t", vec![del(gone)]).unwrap();
            for i in 0..10 {
                o.publish("t", vec![put("a", &format!("{round}-{i}"))])
                    .unwrap();
            }
            let (resumes, opened) = (
                counter(&o.stats().resumes),
                counter(&o.stats().streams_opened),
            );
            proxy.set_upstream(Upstream::Forward(origin.addr));
            let v = o.version("t").unwrap();
            wait_position(&t, &epoch, v).await;

            // Exactly one Reset and one snapshot for this occurrence, on one stream: the stale
            // position was tried once, never again.
            assert_eq!(counter(&o.stats().resets_sent), round);
            assert_eq!(counter(&o.stats().snapshots_sent), 1 + round);
            assert_eq!(counter(&feed.resets), round);
            assert_eq!(counter(&feed.snapshots), 1 + round);
            assert_eq!(counter(&o.stats().resumes), resumes);
            assert_eq!(counter(&o.stats().streams_opened), opened + 1);
            assert!(
                t.get(gone).is_none(),
                "'{gone}' deleted meanwhile is still here"
            );
            assert_eq!(text(&t.get("a").unwrap().value), format!("{round}-9"));
            assert_eq!(get_value(&sidecar, "t", gone).await, None);

            // Afterwards the new position resumes: no further snapshot.
            o.publish("t", vec![put("d", &round.to_string())]).unwrap();
            wait_position(&t, &epoch, v + 1).await;
            let before = counter(&feed.disconnects);
            proxy.cut();
            wait_disconnected(&feed, before).await;
            o.publish("t", vec![put("d", "after")]).unwrap();
            wait_position(&t, &epoch, v + 2).await;
            assert_eq!(counter(&o.stats().snapshots_sent), 1 + round);
            assert_eq!(counter(&o.stats().resets_sent), round);
        }
        let mut want = o.rows("t");
        want.sort();
        let mut have: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .filter_map(|k| t.get(k).map(|r| (k.to_string(), r.value.clone())))
            .collect();
        have.sort();
        assert_eq!(have, want);
    })
    .await
}

// ----- silent dead peer -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_feed_is_detected_by_keepalive_and_redialled() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let o = origin.origin.clone();
        let epoch = o.epoch().to_string();
        o.publish("t", vec![put("a", "1")]).unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let mut cfg = sidecar_config(&proxy.url(), &["t"]);
        let (interval, timeout) = (Duration::from_millis(200), Duration::from_millis(200));
        cfg.feed.keepalive_interval = Dur(interval);
        cfg.feed.keepalive_timeout = Dur(timeout);
        // Long enough that only the HTTP/2 keepalive can notice: Progress stops arriving too.
        cfg.feed.idle_timeout = Dur(Duration::from_secs(60));
        let sidecar = start_sidecar(cfg.clone()).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        wait_position(&t, &epoch, 1).await;
        let connects = counter(&feed.connects);

        let start = Instant::now();
        let before = counter(&feed.disconnects);
        proxy.blackhole();
        wait_disconnected(&feed, before).await;
        let detected = start.elapsed();
        eventually("feed redialled", || {
            counter(&feed.connects) > connects && feed.connected.load(Ordering::Relaxed)
        })
        .await;
        let redialled = start.elapsed();
        // A generous bound from the config: a ping is due within one interval and answered
        // within the timeout; twice that plus a second for a loaded machine and the redial.
        let bound = 2 * (interval + timeout) + Duration::from_secs(1) + cfg.feed.backoff_max.0;
        assert!(detected <= bound, "detected after {detected:?}, bound {bound:?}");
        assert!(redialled <= bound, "redialled after {redialled:?}, bound {bound:?}");
        // Not earlier than a ping could have gone unanswered.
        assert!(detected >= timeout, "detected after {detected:?}, before any ping timed out");
        assert_eq!(proxy.open(), 2, "the blackholed connection was closed by the proxy");

        // The new stream resumes and carries changes; data was served throughout.
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("1"));
        o.publish("t", vec![put("a", "2")]).unwrap();
        wait_position(&t, &epoch, 2).await;
        assert_eq!(counter(&feed.snapshots), 1, "resumed without a snapshot");
        eprintln!("blackhole: detected after {detected:?}, redialled after {redialled:?}, bound {bound:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_feed_is_detected_by_idle_timeout_without_keepalive() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let o = origin.origin.clone();
        let epoch = o.epoch().to_string();
        o.publish("t", vec![put("a", "1")]).unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let mut cfg = sidecar_config(&proxy.url(), &["t"]);
        cfg.feed.keepalive_interval = Dur(Duration::from_secs(60));
        cfg.feed.keepalive_timeout = Dur(Duration::from_secs(60));
        // The origin sends Progress every 100 ms.
        let idle = Duration::from_millis(500);
        cfg.feed.idle_timeout = Dur(idle);
        let sidecar = start_sidecar(cfg.clone()).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        wait_position(&t, &epoch, 1).await;
        let connects = counter(&feed.connects);

        let start = Instant::now();
        let before = counter(&feed.disconnects);
        proxy.blackhole();
        wait_disconnected(&feed, before).await;
        let detected = start.elapsed();
        eventually("feed redialled", || counter(&feed.connects) > connects).await;
        let bound = 2 * idle + Duration::from_secs(1) + cfg.feed.backoff_max.0;
        assert!(detected >= idle / 2, "detected after {detected:?}");
        assert!(
            start.elapsed() <= bound,
            "redialled after {:?}",
            start.elapsed()
        );
        o.publish("t", vec![put("a", "2")]).unwrap();
        wait_position(&t, &epoch, 2).await;
    })
    .await
}

// ----- reconnect storm -----

/// Largest number of instants within any window of `width`.
fn densest(times: &[Instant], width: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= width {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_is_spread_by_jitter_and_resnapshots_once() {
    const CLIENTS: usize = 200;
    within(async {
        let topics: Vec<String> = (0..CLIENTS).map(|i| format!("t{i:03}")).collect();
        let cfg = OriginConfig {
            max_streams: 4 * CLIENTS,
            ..origin_config()
        };
        let first = TestOrigin::start(cfg.clone()).await;
        let second = TestOrigin::start(cfg).await;
        for o in [&first.origin, &second.origin] {
            for t in &topics {
                o.publish(t, vec![put("k", t)]).unwrap();
            }
        }
        let proxy = Proxy::start(first.addr).await;

        // One sidecar, 200 feed clients: one origin entry (and one Sync stream) per topic.
        let mut cfg = sidecar_config(&proxy.url(), &[]);
        cfg.feed.backoff_initial = Dur(Duration::from_secs(1));
        cfg.feed.backoff_max = Dur(Duration::from_secs(2));
        cfg.origins = topics
            .iter()
            .map(|t| OriginSpec {
                name: format!("o-{t}"),
                address: proxy.url(),
                fallback: Vec::new(),
                topics: vec![TopicSpec {
                    name: t.clone(),
                    mode: Mode::Full,
                    max_bytes: None,
                    idle: None,
                }],
                tls: None,
            })
            .collect();
        let sidecar = start_sidecar(cfg).await;
        let first_epoch = first.origin.epoch().to_string();
        for t in &topics {
            wait_position(&source(&sidecar, t), &first_epoch, 1).await;
        }
        let stats: Vec<Arc<FeedStats>> = topics
            .iter()
            .map(|t| sidecar.feed_stats(&format!("o-{t}")).unwrap().clone())
            .collect();
        assert!(stats.iter().all(|s| counter(&s.snapshots) == 1));

        // The origin is replaced (a new epoch) and every stream is reset at once.
        let accepted = proxy.accept_times().len();
        proxy.set_upstream(Upstream::Forward(second.addr));
        let lost = Instant::now();
        proxy.cut();
        let second_epoch = second.origin.epoch().to_string();
        for t in &topics {
            wait_position(&source(&sidecar, t), &second_epoch, 1).await;
        }
        let took = lost.elapsed();

        let reconnects = proxy.accept_times().split_off(accepted);
        assert_eq!(reconnects.len(), CLIENTS, "one reconnect per client");
        // The mechanism, not the wall clock (a loaded machine may run late timers together):
        // each client drew its own delay below its backoff (a broken stream's first redial:
        // 2 x backoff_initial, at most backoff_max = 2 s), spread over all of it.
        let mut delays: Vec<u64> = stats
            .iter()
            .map(|s| counter(&s.last_redial_delay_ms))
            .collect();
        delays.sort_unstable();
        assert!(delays.iter().all(|d| *d < 2000), "{delays:?}");
        let distinct = delays.windows(2).filter(|w| w[0] != w[1]).count() + 1;
        assert!(distinct >= CLIENTS * 3 / 4, "{distinct} distinct delays: {delays:?}");
        assert!(
            delays[0] < 500 && delays[CLIENTS - 1] > 1500,
            "delays not spread over the window: {delays:?}"
        );
        for (t, s) in topics.iter().zip(&stats) {
            assert_eq!(counter(&s.snapshots), 2, "{t} resnapshotted more than once");
            assert_eq!(counter(&s.resets), 1, "{t}");
        }
        assert_eq!(
            counter(&second.origin.stats().snapshots_sent),
            CLIENTS as u64
        );
        let peak = densest(&reconnects, Duration::from_millis(100));
        eprintln!("storm: {CLIENTS} reconnects over {took:?}, densest 100ms window {peak}, delays {}..{} ms", delays[0], delays[CLIENTS - 1]);
    })
    .await
}

// ----- never back in time -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_never_goes_back_across_reconnects_and_resnapshots() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            retain_batches: 8,
            snapshot_chunk_entries: 16,
            ..origin_config()
        })
        .await;
        let o = origin.origin.clone();
        let epoch = o.epoch().to_string();
        o.publish(
            "t",
            (0..400).map(|i| put(&format!("k{i:03}"), "0")).collect(),
        )
        .unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let sidecar = start_sidecar(sidecar_config(&proxy.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        wait_position(&t, &epoch, 1).await;

        // A reader polls the version as fast as it can, through every fault below.
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU64::new(0));
        let reader = {
            let (t, stop, samples) = (t.clone(), stop.clone(), samples.clone());
            tokio::spawn(async move {
                let mut last = t.version();
                while !stop.load(Ordering::Relaxed) {
                    let v = t.version();
                    assert!(v >= last, "version went back from {last} to {v}");
                    last = v;
                    samples.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
                last
            })
        };
        // A publisher keeps changing a few keys at a time.
        let publisher = {
            let (o, stop) = (o.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let puts = (0..5)
                        .map(|j| put(&format!("k{:03}", (n * 7 + j * 61) % 400), &n.to_string()))
                        .collect();
                    o.publish("t", puts).unwrap();
                }
            })
        };

        for round in 0..6u64 {
            let connects = counter(&feed.connects);
            let before = counter(&feed.disconnects);
            match round % 3 {
                // A reset in the middle of the stream.
                0 => proxy.cut(),
                // A few more bytes, then a reset: usually inside an HTTP/2 frame.
                1 => proxy.cut_after(37 + 101 * round),
                // Away for longer than the retained window: Reset and a snapshot (400 keys in
                // chunks of 16), the first of which is cut part way through.
                _ => {
                    proxy.set_upstream(Upstream::Refuse);
                    proxy.cut();
                    wait_disconnected(&feed, before).await;
                    let v = o.version("t").unwrap();
                    eventually("window passed", || o.version("t").unwrap() > v + 10).await;
                    let snapshots = counter(&feed.snapshots);
                    let resets = counter(&o.stats().resets_sent);
                    proxy.cut_next_after(3_000);
                    proxy.set_upstream(Upstream::Forward(origin.addr));
                    eventually("resnapshotted", || counter(&feed.snapshots) > snapshots).await;
                    // The cut snapshot was abandoned, and the next stream started over: two
                    // streams, each told to reset, one snapshot completed. (Whether the cut
                    // stream counted as connected depends on whether its headers beat the RST.)
                    assert_eq!(counter(&feed.snapshots), snapshots + 1);
                    assert_eq!(counter(&o.stats().resets_sent), resets + 2);
                }
            }
            wait_disconnected(&feed, before).await;
            eventually("reconnected", || counter(&feed.connects) > connects).await;
            let v = o.version("t").unwrap();
            wait_position(&t, &epoch, v).await;
        }
        stop.store(true, Ordering::Relaxed);
        publisher.await.unwrap();
        let last = reader.await.expect("the reader saw the version go back");
        let v = o.version("t").unwrap();
        wait_position(&t, &epoch, v).await;
        assert!(last <= v);
        assert!(counter(&samples) > 100, "the reader hardly ran");
        assert!(counter(&feed.resets) >= 2, "no resnapshot happened");
        let mut want = o.rows("t");
        want.sort();
        for (k, value) in &want {
            assert_eq!(&t.get(k).expect(k).value, value, "{k}");
        }
        eprintln!(
            "never back: {} samples, {} connects, {} snapshots, final version {v}",
            counter(&samples),
            counter(&feed.connects),
            counter(&feed.snapshots)
        );
    })
    .await
}

// ----- latency -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_delays_changes_without_reordering_or_throttling_them() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let o = origin.origin.clone();
        let epoch = o.epoch().to_string();
        o.publish("t", vec![put("a", "0")]).unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let sidecar = start_sidecar(sidecar_config(&proxy.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &epoch, 1).await;

        let latency = Duration::from_millis(150);
        proxy.set_latency(latency);
        let start = Instant::now();
        o.publish("t", vec![put("a", "1")]).unwrap();
        wait_position(&t, &epoch, 2).await;
        let one = start.elapsed();
        assert!(
            one >= latency,
            "a change arrived after {one:?}, under the added {latency:?}"
        );

        // 300 batches published at once arrive about one latency later, not 300 of them.
        let start = Instant::now();
        for i in 0..300 {
            o.publish("t", vec![put("a", &format!("v{i}"))]).unwrap();
        }
        wait_position(&t, &epoch, 302).await;
        let all = start.elapsed();
        // Not an upper bound on the wall clock (a loaded machine is slow, not wrong): that the
        // batches are not acknowledged one by one shows as every one of them applied, in order,
        // with no gap, after one added latency at least.
        assert!(all >= latency);
        assert_eq!(text(&t.get("a").unwrap().value), "v299");
        assert_eq!(counter(&sidecar.feed_stats("o").unwrap().gaps), 0);
        eprintln!("latency {latency:?}: one change {one:?}, 300 batches {all:?}");
    })
    .await
}

// ----- an origin that holds its response headers back -----

/// A Get that waits for the source: UNAVAILABLE "not synced" if the sidecar never counts the
/// origin reachable.
async fn get_waiting_value(sidecar: &Sidecar, src: &str, key: &str) -> Option<String> {
    let mut client = cache_client(sidecar).await;
    let item = client
        .get(get_waiting(src, key, 10_000))
        .await
        .unwrap_or_else(|s| panic!("Get {src}/{key}: {}: {}", s.code(), s.message()))
        .into_inner()
        .item
        .expect("item");
    item.found.then(|| text(&item.value))
}

/// grpc-go and grpcio send the response headers of Sync together with the first message. A
/// sidecar whose topics are all on_demand asks nothing on a new stream, so such an origin
/// answers nothing: readiness and reads must not wait for the headers, and a key read
/// meanwhile is still subscribed on the stream (which is what the origin is waiting for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_holding_its_headers_back_serves_on_demand_topics() {
    within(async {
        let mut fake = FakeOrigin::holding_headers().await;
        fake.set_position("t", "e", 1);
        fake.set_row("t", "a", "1", 1);
        let (sidecar, t, _feed) = bad_peer_sidecar(&fake, Mode::OnDemand).await;
        // Read through while no header has arrived: one Fetch.
        assert_eq!(
            get_waiting_value(&sidecar, "t", "a").await.as_deref(),
            Some("1")
        );
        assert!(sidecar.readiness().is_ready(), "ready without headers");
        // The key's Subscribe reaches the origin, which only now answers the stream.
        let mut s = fake.accept().await;
        let sub = s.next_subscribe().await;
        assert_eq!(
            (sub.topic.as_str(), sub.keys.as_slice()),
            ("t", &["a".to_string()][..])
        );
        s.snapshot("t", "e", 1, &[("a".into(), "1".into())], 10)
            .await;
        s.batch("t", "e", 1, 2, &[("a", Some("2"))]).await;
        wait_position(&t, "e", 2).await;
        assert_eq!(get_value(&sidecar, "t", "a").await.as_deref(), Some("2"));
        assert_eq!(fake.fetches(), 1, "the pushed value is read from memory");
    })
    .await;
}

/// The same origin with a full topic: the Subscribe is sent before any header, and the
/// snapshot that comes with them syncs the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_holding_its_headers_back_serves_full_topics() {
    within(async {
        let mut fake = FakeOrigin::holding_headers().await;
        let (sidecar, t, _feed) = bad_peer_sidecar(&fake, Mode::Full).await;
        let mut s = fake.accept().await;
        let sub = s.next_subscribe().await;
        assert_eq!((sub.topic.as_str(), sub.keys.len()), ("t", 0));
        s.snapshot("t", "e", 3, &[("a".into(), "x".into())], 10)
            .await;
        sidecar.synced().await;
        wait_position(&t, "e", 3).await;
        assert_eq!(
            get_waiting_value(&sidecar, "t", "a").await.as_deref(),
            Some("x")
        );
    })
    .await;
}
