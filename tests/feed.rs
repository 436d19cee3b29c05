//! The feed protocol end to end over loopback gRPC: snapshots, changes, resume, Reset, epochs,
//! gap detection, and what readers see while it all happens.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use viewcar::pb::cache::v1 as cache;
use viewcar::pb::feed::v1 as feed;
use viewcar::{Origin, OriginConfig};

/// A Sync stream on `raw` subscribed to `keys` of `topic`, its first message (the keyed
/// snapshot) read: the request sender and the rest of the stream.
async fn open_keyed(
    raw: &mut feed::feed_client::FeedClient<tonic::transport::Channel>,
    topic: &str,
    keys: &[&str],
) -> (
    mpsc::Sender<feed::SyncRequest>,
    tonic::Streaming<feed::SyncResponse>,
) {
    let (tx, mut stream) = open_sync(raw, subscribe(topic, keys, None)).await;
    let first = stream.message().await.unwrap().expect("keyed snapshot");
    assert!(matches!(
        first.kind,
        Some(feed::sync_response::Kind::Snapshot(_))
    ));
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_arrives_in_chunks_then_changes_and_deletes() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            snapshot_chunk_entries: 1000,
            ..origin_config()
        })
        .await;
        let puts = (0..10_000)
            .map(|i| put(&format!("k{i:05}"), &format!("v{i}")))
            .collect();
        let p1 = origin.origin.publish("items", puts).unwrap();

        // What goes over the wire: several chunks, one position, `last` only on the final one.
        let mut raw = origin.feed_client().await;
        let (tx, rx) = mpsc::channel(1);
        tx.send(subscribe("items", &[], None)).await.unwrap();
        let mut stream = raw
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (mut chunks, mut entries) = (0, 0);
        loop {
            let msg = stream.message().await.unwrap().expect("stream open");
            let Some(feed::sync_response::Kind::Snapshot(c)) = msg.kind else {
                panic!("expected a snapshot chunk, got {msg:?}");
            };
            assert_eq!(c.position.as_ref(), Some(&p1));
            chunks += 1;
            entries += c.entries.len();
            if c.last {
                break;
            }
        }
        assert!(chunks > 1, "10k keys came in {chunks} chunk(s)");
        assert_eq!(entries, 10_000);
        drop((tx, stream));

        let sidecar = start_sidecar(sidecar_config(&origin.url(), &["items"])).await;
        let items = source(&sidecar, "items");
        wait_position(&items, &p1.epoch, p1.version).await;
        assert_eq!(items.len(), 10_000);
        let mut client = cache_client(&sidecar).await;
        let got = client
            .get(get_request("items", "k09999"))
            .await
            .unwrap()
            .into_inner();
        let item = got.item.unwrap();
        assert!(item.found);
        assert_eq!(text(&item.value), "v9999");
        assert_eq!(got.source_version, p1.version);

        let p2 = origin
            .origin
            .publish(
                "items",
                vec![put("k00001", "new"), del("k00002"), put("n1", "x")],
            )
            .unwrap();
        wait_position(&items, &p2.epoch, p2.version).await;
        let a = client.get(get_request("items", "k00001")).await.unwrap();
        let a = a.into_inner().item.unwrap();
        assert_eq!((text(&a.value).as_str(), a.version), ("new", p2.version));
        let b = client.get(get_request("items", "k00002")).await.unwrap();
        assert!(
            !b.into_inner().item.unwrap().found,
            "deleted key still found"
        );
        let scan = client
            .scan(cache::ScanRequest {
                source: "items".into(),
                prefix: "n".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(scan.items.len(), 1);
        assert_eq!(scan.items[0].key, "n1");
        assert_eq!(items.len(), 10_000);
        sidecar.shutdown().await;
    })
    .await
}

/// Reads watch events until `done` says the list is complete.
async fn collect_watch(
    stream: &mut tonic::Streaming<cache::WatchEvent>,
    events: &mut Vec<cache::watch_event::Kind>,
    done: impl Fn(&[cache::watch_event::Kind]) -> bool,
) {
    while !done(events) {
        let ev = stream.message().await.unwrap().expect("watch open");
        events.push(ev.kind.expect("event kind"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_resumes_inside_the_window_without_a_snapshot() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let p0 = origin
            .origin
            .publish("t", vec![put("a", "1"), put("b", "1")])
            .unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let sidecar = start_sidecar(sidecar_config(&proxy.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;

        let mut client = cache_client(&sidecar).await;
        let mut watch = open_watch(&mut client, "t", &["a", "b"], true).await;
        let mut events = Vec::new();
        collect_watch(&mut watch, &mut events, |e| {
            matches!(e.last(), Some(cache::watch_event::Kind::Synced(_)))
        })
        .await;

        let stats = origin.origin.stats();
        let feed = sidecar.feed_stats("o").unwrap().clone();
        assert_eq!(counter(&stats.snapshots_sent), 1);
        assert_eq!(counter(&stats.resumes), 0);

        // Break the path and keep it broken while the origin moves on, so that the changes can
        // only arrive through the resume.
        proxy.set_upstream(Upstream::Refuse);
        proxy.cut();
        eventually("the sidecar noticed the cut", || {
            counter(&feed.disconnects) >= 1
        })
        .await;
        let p1 = origin.origin.publish("t", vec![put("a", "2")]).unwrap();
        let p2 = origin.origin.publish("t", vec![del("b")]).unwrap();
        proxy.set_upstream(Upstream::Forward(origin.addr));
        wait_position(&t, &p0.epoch, p2.version).await;

        assert_eq!(counter(&stats.snapshots_sent), 1, "a snapshot was sent");
        assert_eq!(counter(&stats.resets_sent), 0);
        assert!(counter(&stats.resumes) >= 1);
        assert_eq!(counter(&feed.snapshots), 1);
        assert_eq!(counter(&feed.resets), 0);
        assert!(counter(&feed.connects) >= 2);
        assert_eq!(t.get("a").unwrap().value, "2".as_bytes());
        assert!(t.get("b").is_none());

        // The watcher saw the two changes once each, in order, and no reset.
        collect_watch(&mut watch, &mut events, |e| {
            matches!(e.last(), Some(cache::watch_event::Kind::Delete(_)))
        })
        .await;
        use cache::watch_event::Kind;
        let got: Vec<(String, String, u64)> = events
            .iter()
            .map(|k| match k {
                Kind::Upsert(i) => ("upsert".into(), i.key.clone(), i.version),
                Kind::Delete(i) => ("delete".into(), i.key.clone(), i.version),
                Kind::Synced(v) => ("synced".into(), String::new(), *v),
                Kind::Reset(r) => panic!("watcher was reset: {r}"),
            })
            .collect();
        let want: Vec<(String, String, u64)> = vec![
            ("upsert".into(), "a".into(), p0.version),
            ("upsert".into(), "b".into(), p0.version),
            ("synced".into(), String::new(), p0.version),
            ("upsert".into(), "a".into(), p1.version),
            ("delete".into(), "b".into(), p2.version),
        ];
        assert_eq!(got, want);
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_outside_the_window_gets_reset_and_a_fresh_snapshot() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            retain_batches: 2,
            ..origin_config()
        })
        .await;
        let p0 = origin
            .origin
            .publish("t", vec![put("a", "1"), put("b", "1"), put("c", "1")])
            .unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let sidecar = start_sidecar(sidecar_config(&proxy.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;
        let feed = sidecar.feed_stats("o").unwrap().clone();

        proxy.set_upstream(Upstream::Refuse);
        proxy.cut();
        eventually("the sidecar noticed the cut", || {
            counter(&feed.disconnects) >= 1
        })
        .await;
        origin.origin.publish("t", vec![del("b")]).unwrap();
        origin.origin.publish("t", vec![put("a", "2")]).unwrap();
        origin.origin.publish("t", vec![put("c", "2")]).unwrap();
        let last = origin.origin.publish("t", vec![put("d", "1")]).unwrap();
        proxy.set_upstream(Upstream::Forward(origin.addr));
        wait_position(&t, &last.epoch, last.version).await;

        let stats = origin.origin.stats();
        assert_eq!(counter(&stats.resets_sent), 1);
        assert_eq!(counter(&stats.snapshots_sent), 2);
        assert_eq!(counter(&stats.resumes), 0);
        assert_eq!(counter(&feed.resets), 1);
        assert_eq!(counter(&feed.snapshots), 2);
        assert!(t.get("b").is_none(), "key deleted meanwhile survived");
        assert_eq!(t.get("a").unwrap().value, "2".as_bytes());
        assert_eq!(t.get("d").unwrap().value, "1".as_bytes());
        assert_eq!(t.len(), 3);
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_restart_with_a_new_epoch_gets_reset_and_a_fresh_snapshot() {
    within(async {
        let mut origin = TestOrigin::start(origin_config()).await;
        let p0 = origin
            .origin
            .publish("t", vec![put("a", "1"), put("b", "1"), put("c", "1")])
            .unwrap();
        let sidecar = start_sidecar(sidecar_config(&origin.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;
        let mut client = cache_client(&sidecar).await;
        let mut watch = open_watch(&mut client, "t", &["a", "b"], false).await;
        let mut events = Vec::new();
        collect_watch(&mut watch, &mut events, |e| !e.is_empty()).await;

        // The restarted origin lost `b` and has other versions: nothing of the old epoch
        // may survive that the new one does not have.
        let next = Origin::new(origin_config());
        let p1 = next
            .publish("t", vec![put("a", "2"), put("c", "1"), put("e", "1")])
            .unwrap();
        assert_ne!(p1.epoch, p0.epoch);
        origin.stop().await;
        origin = TestOrigin::start_on(next, origin.addr).await;
        wait_position(&t, &p1.epoch, p1.version).await;

        let stats = origin.origin.stats();
        assert_eq!(counter(&stats.resets_sent), 1, "resume of the old epoch");
        assert_eq!(counter(&stats.snapshots_sent), 1);
        let feed = sidecar.feed_stats("o").unwrap();
        assert!(counter(&feed.resets) >= 1);
        assert!(t.get("b").is_none(), "key of the old epoch survived");
        assert_eq!(t.get("a").unwrap().value, "2".as_bytes());
        assert_eq!(t.len(), 3);
        let ok = client
            .get(get_request("t", "e"))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.item.unwrap().found);

        // Watchers are told to start over, then see the new epoch's state of their keys.
        // (Both epochs are at version 1: only the epoch tells them apart.)
        assert_eq!(p1.version, p0.version);
        collect_watch(&mut watch, &mut events, |e| {
            e.iter()
                .skip_while(|k| !matches!(k, cache::watch_event::Kind::Reset(_)))
                .any(|k| matches!(k, cache::watch_event::Kind::Synced(_)))
        })
        .await;
        let after_reset: Vec<_> = events
            .iter()
            .skip_while(|k| !matches!(k, cache::watch_event::Kind::Reset(_)))
            .skip(1)
            .collect();
        assert_eq!(
            after_reset,
            vec![&cache::watch_event::Kind::Synced(p1.version)],
            "{events:?}"
        );
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prev_version_gap_resubscribes_instead_of_applying() {
    within(async {
        let mut fake = FakeOrigin::start().await;
        let sidecar = start_sidecar(sidecar_config(&fake.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        let mut s = fake.accept().await;
        let sub = s.next_subscribe().await;
        assert_eq!((sub.topic.as_str(), sub.resume), ("t", None));

        s.snapshot("t", "e1", 1, &[("a".into(), "1".into())], 10)
            .await;
        s.batch("t", "e1", 1, 2, &[("a", Some("2"))]).await;
        // A duplicate is ignored and counted.
        s.batch("t", "e1", 1, 2, &[("a", Some("dup"))]).await;
        s.batch("t", "e1", 2, 3, &[("c", Some("3"))]).await;
        wait_position(&t, "e1", 3).await;
        assert_eq!(counter(&feed.duplicates), 1);
        assert_eq!(t.get("a").unwrap().value, "2".as_bytes());

        // Versions 4 and 5 never arrive.
        s.batch("t", "e1", 5, 6, &[("b", Some("bad")), ("a", None)])
            .await;
        let again = s.next_subscribe().await;
        assert_eq!(again.topic, "t");
        assert_eq!(again.resume, None, "resubscribed with a resume point");
        assert_eq!(counter(&feed.gaps), 1);
        assert!(t.get("b").is_none(), "the batch after the gap was applied");
        assert_eq!(t.get("a").unwrap().value, "2".as_bytes());
        assert_eq!(t.version(), 3);

        // Changes racing the resubscribe are dropped until the snapshot comes.
        s.batch("t", "e1", 6, 7, &[("x", Some("7"))]).await;
        s.snapshot(
            "t",
            "e1",
            7,
            &[("b".into(), "good".into()), ("x".into(), "7".into())],
            1,
        )
        .await;
        wait_position(&t, "e1", 7).await;
        assert_eq!(t.get("b").unwrap().value, "good".as_bytes());
        assert!(t.get("a").is_none());
        assert!(t.get("c").is_none());
        assert_eq!(counter(&feed.gaps), 1);
        sidecar.shutdown().await;
    })
    .await
}

/// Two whole states that share some keys; any read of all keys must match one of them exactly.
fn state(gen: &str, keys: std::ops::Range<usize>) -> Vec<(String, String)> {
    keys.map(|i| (format!("k{i:03}"), format!("{gen}{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_resnapshots_see_old_or_new_never_a_mix() {
    within(async {
        let old = state("A", 0..240);
        let new = state("B", 60..300);
        let all: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
        let expect = |st: &[(String, String)]| -> Vec<Option<String>> {
            let m: HashMap<&str, &str> = st.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            all.iter()
                .map(|k| m.get(k.as_str()).map(|v| v.to_string()))
                .collect()
        };
        let (want_old, want_new) = (expect(&old), expect(&new));

        let mut fake = FakeOrigin::start().await;
        let sidecar = start_sidecar(sidecar_config(&fake.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        let mut s = fake.accept().await;
        s.next_subscribe().await;
        s.snapshot("t", "e", 1, &old, 64).await;
        wait_position(&t, "e", 1).await;

        let reads = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut readers = Vec::new();
        for _ in 0..2 {
            let mut client = cache_client(&sidecar).await;
            let (reads, mut stop) = (reads.clone(), stop_rx.clone());
            let req = cache::BatchGetRequest {
                keys: all
                    .iter()
                    .map(|k| cache::Key {
                        source: "t".into(),
                        key: k.clone(),
                    })
                    .collect(),
                options: None,
            };
            let (want_old, want_new) = (want_old.clone(), want_new.clone());
            readers.push(tokio::spawn(async move {
                let (mut olds, mut news, mut mixed) = (0u64, 0u64, Vec::new());
                while !*stop.borrow_and_update() {
                    let items = client.batch_get(req.clone()).await.unwrap().into_inner();
                    let got: Vec<Option<String>> = items
                        .items
                        .iter()
                        .map(|i| i.found.then(|| text(&i.value)))
                        .collect();
                    if got == want_old {
                        olds += 1;
                    } else if got == want_new {
                        news += 1;
                    } else if mixed.len() < 3 {
                        mixed.push(got);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                (olds, news, mixed)
            }));
        }

        // Swap old and new until the readers have read enough, each swap a Reset and a
        // snapshot in many chunks.
        let mut version = 1;
        while reads.load(Ordering::Relaxed) < 100 && version < 600 {
            version += 1;
            s.reset("t", "test resnapshot").await;
            let st = if version % 2 == 0 { &new } else { &old };
            s.snapshot("t", "e", version, st, 32).await;
        }
        wait_position(&t, "e", version).await;
        stop_tx.send_replace(true);
        let (mut olds, mut news) = (0, 0);
        for r in readers {
            let (o, n, mixed) = r.await.unwrap();
            assert!(mixed.is_empty(), "a read saw a mix of two snapshots");
            olds += o;
            news += n;
        }
        eprintln!("{olds} old and {news} new reads over {version} snapshots");
        assert!(
            olds > 0 && news > 0,
            "reads did not overlap the swaps: {olds} old, {news} new over {version} snapshots"
        );
        sidecar.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_streams_reconnect_and_resume() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let p0 = origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let sidecar = start_sidecar(sidecar_config(&origin.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;
        let feed = sidecar.feed_stats("o").unwrap().clone();
        let stats = origin.origin.stats();

        // Twice: closing streams must not stop the origin from serving new ones.
        for round in 1..=2u64 {
            origin.origin.close_streams();
            eventually("the sidecar reconnected", || {
                counter(&feed.connects) > round && counter(&stats.resumes) >= round
            })
            .await;
            let p = origin
                .origin
                .publish("t", vec![put("a", &format!("{}", round + 1))])
                .unwrap();
            wait_position(&t, &p.epoch, p.version).await;
        }
        assert_eq!(counter(&stats.snapshots_sent), 1);
        assert_eq!(t.get("a").unwrap().value, "3".as_bytes());
        sidecar.shutdown().await;
    })
    .await
}

/// A stream whose connection is cut mid-stream leaves the origin at once: its interest in its
/// keys and its stream slot are released without waiting for a send to fail (the Progress
/// interval here is an hour, and nothing is published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_mid_stream_leaves_its_topics_at_once() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            progress_interval: viewcar::config::Dur(std::time::Duration::from_secs(3600)),
            ..origin_config()
        })
        .await;
        origin
            .origin
            .publish("items", vec![put("k0", "v")])
            .unwrap();
        let proxy = Proxy::start(origin.addr).await;
        let mut raw = feed_client(proxy.addr).await;
        let (tx, _stream) = open_keyed(&mut raw, "items", &["k0"]).await;
        assert!(origin.origin.is_key_subscribed("items", "k0"));
        assert_eq!(origin.origin.open_streams(), 1);

        // The client keeps its request half open; only the connection goes.
        proxy.cut();
        eventually("the cut stream left its topic and its slot", || {
            !origin.origin.is_key_subscribed("items", "k0") && origin.origin.open_streams() == 0
        })
        .await;
        drop(tx);
    })
    .await
}

/// A stream cut off in the middle of a shared snapshot (its leaf stopped reading at the first
/// chunk, then its connection went) drops its session between two chunks: another stream at
/// the same position still gets the whole snapshot, no chunk is encoded twice, and the cut
/// stream's slot is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_mid_snapshot_leaves_the_shared_snapshot_whole_for_others() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            snapshot_chunk_bytes: viewcar::config::ByteSize(4 << 10),
            ..origin_config()
        })
        .await;
        let value = "v".repeat(100);
        let puts: Vec<_> = (0..2000)
            .map(|i| put(&format!("k{i:04}"), &value))
            .collect();
        let p = origin.origin.publish("items", puts).unwrap();

        // A: reads one chunk, then nothing; its HTTP/2 stream window (64 KiB, where hyper's
        // default would take the whole snapshot) holds the session back long before the
        // snapshot's ~220 KiB are sent.
        let proxy = Proxy::start(origin.addr).await;
        let channel = tonic::transport::Endpoint::from_shared(proxy.url())
            .unwrap()
            .initial_stream_window_size(Some(65_535))
            .connect()
            .await
            .unwrap();
        let mut a_client = feed::feed_client::FeedClient::new(channel);
        let (a_tx, mut a) = open_sync(&mut a_client, subscribe("items", &[], None)).await;
        let first = a.message().await.unwrap().expect("a chunk");
        assert!(matches!(
            first.kind,
            Some(feed::sync_response::Kind::Snapshot(ref c)) if !c.last
        ));

        // B, at the same position, reads everything.
        let mut b_client = origin.feed_client().await;
        let (_b_tx, mut b) = open_sync(&mut b_client, subscribe("items", &[], None)).await;
        let mut keys = std::collections::BTreeSet::new();
        let mut chunks = 0u64;
        let mut entries = 0;
        // A goes away while B is still reading.
        let mut cut = false;
        loop {
            let msg = b.message().await.unwrap().expect("a chunk");
            let Some(feed::sync_response::Kind::Snapshot(c)) = msg.kind else {
                continue;
            };
            chunks += 1;
            assert_eq!(c.position.as_ref().map(|p| p.version), Some(p.version));
            entries += c.entries.len();
            keys.extend(c.entries.into_iter().map(|e| e.key));
            if !cut {
                proxy.cut();
                cut = true;
            }
            if c.last {
                break;
            }
        }
        assert_eq!(keys.len(), 2000, "the whole snapshot");
        assert_eq!(entries, 2000, "each key once");
        let stats = origin.origin.stats();
        assert_eq!(
            counter(&stats.snapshots_sent),
            1,
            "B's only: A was cut in the middle of its snapshot"
        );
        assert_eq!(counter(&stats.snapshot_encodings), 1, "one shared snapshot");
        assert_eq!(
            counter(&stats.snapshot_chunks_encoded),
            chunks,
            "no chunk encoded twice"
        );
        eventually("the cut stream released its slot", || {
            origin.origin.open_streams() == 1
        })
        .await;

        // B goes on.
        let next = origin
            .origin
            .publish("items", vec![put("k0000", "w")])
            .unwrap();
        loop {
            let msg = b.message().await.unwrap().expect("a message");
            if let Some(feed::sync_response::Kind::Changes(c)) = msg.kind {
                assert_eq!(c.version, next.version);
                break;
            }
        }
        drop(a_tx);
    })
    .await
}

/// Keys are small; what they pull in is not: a keyed interest is bounded by the bytes it names
/// (keys and their values), first subscribe and later additions alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_interest_past_max_subscribed_bytes_ends_the_stream() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            max_subscribed_bytes: viewcar::config::ByteSize(4096),
            ..origin_config()
        })
        .await;
        let big = "x".repeat(1500);
        let puts = (0..10).map(|i| put(&format!("k{i}"), &big)).collect();
        origin.origin.publish("items", puts).unwrap();

        // Too much at once: refused before anything is sent.
        let mut raw = origin.feed_client().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(subscribe("items", &["k0", "k1", "k2"], None))
            .await
            .unwrap();
        let mut stream = raw
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let status = ending_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("max_subscribed_bytes") && status.message().contains("items"),
            "{status:?}"
        );

        // Within the bound, then past it by adding keys (absent keys count their names only).
        let (tx, mut stream) = open_keyed(&mut raw, "items", &["k0", "k1", "absent"]).await;
        tx.send(subscribe("items", &["k1", "k2"], None))
            .await
            .unwrap();
        let status = ending_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("max_subscribed_bytes"),
            "{status:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_interest_past_max_subscribed_keys_ends_the_stream() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            max_subscribed_keys: 3,
            ..origin_config()
        })
        .await;
        origin
            .origin
            .publish("items", vec![put("a", "1"), put("b", "2")])
            .unwrap();
        let mut raw = origin.feed_client().await;
        let (tx, mut stream) = open_keyed(&mut raw, "items", &["a", "b"]).await;
        // Two keys already subscribed ("b" again does not count twice): 4 > 3.
        tx.send(subscribe("items", &["b", "c", "d"], None))
            .await
            .unwrap();
        let status = ending_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("max_subscribed_keys"),
            "{status:?}"
        );
    })
    .await;
}

/// Sync and Fetch refuse an empty key as Publish does, and a client's long epoch is not echoed
/// back whole in the Reset that answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_keys_are_refused_and_a_huge_epoch_is_not_echoed() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("items", vec![put("a", "1")]).unwrap();
        let mut raw = origin.feed_client().await;

        let err = raw
            .fetch(feed::FetchRequest {
                topic: "items".into(),
                keys: vec!["a".into(), String::new()],
            })
            .await
            .expect_err("empty key in Fetch");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("key 1"), "{err:?}");

        let (tx, rx) = mpsc::channel(4);
        tx.send(subscribe("items", &["a", ""], None)).await.unwrap();
        let mut stream = raw
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let status = ending_status(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("empty"), "{status:?}");

        let (tx, rx) = mpsc::channel(4);
        let epoch = "e".repeat(100 << 10);
        tx.send(subscribe(
            "items",
            &[],
            Some(feed::Position {
                epoch: epoch.clone(),
                version: 1,
            }),
        ))
        .await
        .unwrap();
        let mut stream = raw
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let reset = loop {
            let msg = stream.message().await.unwrap().expect("a message");
            if let Some(feed::sync_response::Kind::Reset(r)) = msg.kind {
                break r;
            }
        };
        assert!(
            reset.reason.len() < 512 && reset.reason.contains("bytes"),
            "{} bytes: {}",
            reset.reason.len(),
            &reset.reason[..reset.reason.len().min(200)]
        );
    })
    .await;
}

/// The replication lag an origin tells in Progress (a Postgres-fed topic's) reaches the
/// sidecar's ListSources (`viewcar sources`), `/status` and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_lag_from_progress_is_shown_by_the_sidecar() {
    within(async {
        let mut fake = FakeOrigin::start().await;
        let sidecar = start_sidecar(sidecar_config(&fake.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        let mut s = fake.accept().await;
        s.next_subscribe().await;
        // Before the topic's first copy is loaded: Progress without a position, with the rows
        // the copy has read. (The stream is handled in order: once the snapshot after it is
        // applied, so is this Progress.)
        s.send(feed::sync_response::Kind::Progress(feed::Progress {
            topic: "t".into(),
            position: None,
            upstream_copied_rows: 70_000,
            ..Default::default()
        }))
        .await;
        s.snapshot("t", "e1", 1, &[("a".into(), "1".into())], 10)
            .await;
        wait_position(&t, "e1", 1).await;
        assert_eq!(t.upstream_copied_rows(), 70_000);
        let mut client = cache_client(&sidecar).await;
        let listed = client
            .list_sources(viewcar::pb::cache::v1::ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        let st = listed.iter().find(|s| s.name == "t").expect("source t");
        assert_eq!(st.upstream_copied_rows, 70_000);
        s.send(feed::sync_response::Kind::Progress(feed::Progress {
            topic: "t".into(),
            position: Some(feed::Position {
                epoch: "e1".into(),
                version: 2,
            }),
            upstream_lag_ms: 1250,
            upstream_lag_bytes: 4096,
            upstream_copied_rows: 0,
        }))
        .await;
        wait_position(&t, "e1", 2).await;
        assert_eq!(t.upstream_lag(), (1250, 4096));
        assert_eq!(t.upstream_copied_rows(), 0, "the copy is loaded");

        let sources = client
            .list_sources(viewcar::pb::cache::v1::ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner()
            .sources;
        let st = sources.iter().find(|s| s.name == "t").expect("source t");
        assert_eq!((st.upstream_lag_ms, st.upstream_lag_bytes), (1250, 4096));

        let text = {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut http = tokio::net::TcpStream::connect(sidecar.http_addr())
                .await
                .unwrap();
            http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut body = String::new();
            http.read_to_string(&mut body).await.unwrap();
            body
        };
        assert!(
            text.contains("viewcar_source_upstream_lag_seconds{source=\"t\"")
                && text.contains(" 1.25\n")
                && text.contains("viewcar_source_upstream_lag_bytes{source=\"t\"")
                && text.contains("viewcar_source_upstream_copied_rows{source=\"t\""),
            "{text}"
        );
    })
    .await;
}

/// A new stream resumes topic by topic. A transaction that touched both topics (version 5 of
/// each, as a Postgres-fed origin numbers them) reaches the sidecar as two tails, one per
/// topic: it is applied whole, in one writer step, once both tails have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_tails_of_several_topics_are_applied_as_one_step() {
    within(async {
        let mut fake = FakeOrigin::start().await;
        let sidecar = start_sidecar(sidecar_config(&fake.url(), &["a", "b"])).await;
        let (a, b) = (source(&sidecar, "a"), source(&sidecar, "b"));
        let feed = sidecar.feed_stats("o").unwrap().clone();
        let s = {
            let mut s = fake.accept().await;
            for _ in 0..2 {
                let sub = s.next_subscribe().await;
                s.snapshot(&sub.topic, "e1", 1, &[("k".into(), "1".into())], 10)
                    .await;
            }
            s
        };
        wait_position(&a, "e1", 1).await;
        wait_position(&b, "e1", 1).await;
        // Connected now: the barrier holds a's half for a bounded time (1 s from the new
        // stream), which the checks below must not spend on a connect.
        let mut client = cache_client(&sidecar).await;
        // The stream fails; the sidecar comes back resuming both topics.
        s.out
            .send(Err(tonic::Status::unavailable("cut")))
            .await
            .unwrap();
        let mut s = fake.accept().await;
        for _ in 0..2 {
            let sub = s.next_subscribe().await;
            assert_eq!(sub.resume.map(|p| p.version), Some(1), "{}", sub.topic);
        }
        let progress = |topic: &str| {
            feed::sync_response::Kind::Progress(feed::Progress {
                topic: topic.into(),
                position: Some(feed::Position {
                    epoch: "e1".into(),
                    version: 5,
                }),
                ..Default::default()
            })
        };
        s.batch("a", "e1", 1, 5, &[("k", Some("5"))]).await;
        s.send(progress("a")).await;
        // Half the transaction is not visible: a read waiting for a's version 5 waits on.
        let get = client.get(cache::GetRequest {
            source: "a".into(),
            key: "k".into(),
            options: Some(cache::ReadOptions {
                min_version: 5,
                wait_ms: 10_000,
                ..Default::default()
            }),
        });
        tokio::pin!(get);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(150), &mut get)
                .await
                .is_err(),
            "a's half of the transaction was visible before b's tail"
        );
        s.batch("b", "e1", 1, 5, &[("k", Some("5"))]).await;
        s.send(progress("b")).await;
        let got = get.await.unwrap().into_inner();
        assert_eq!(got.item.unwrap().value, "5".as_bytes());
        assert_eq!(b.version(), 5, "both halves in one step");
        assert_eq!(b.get("k").unwrap().value, "5".as_bytes());
        assert_eq!(counter(&feed.snapshots), 2, "resumed without a snapshot");
    })
    .await
}

/// A Sync stream read by grpcio (C-core, a gRPC implementation other than ours) from an origin:
/// a 5,000-row snapshot in shared chunks, a change batch after it, status OK in the trailers
/// once its requests end, and a gzip-compressed Sync refused as UNIMPLEMENTED with a reason.
/// The origin's Sync body sends each shared encoding as it is, so this is what checks its
/// framing against a peer that did not write it. Needs Python with grpcio and grpcio-tools
/// (`VIEWCAR_TEST_PYTHON`, as .ci/run sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_reads_a_sync_stream_of_shared_chunks_and_batches() {
    use std::io::{BufRead, BufReader, Write};
    let Some(python) = python_with_grpcio() else {
        return;
    };
    let origin = TestOrigin::start(OriginConfig {
        snapshot_chunk_entries: 700,
        ..origin_config()
    })
    .await;
    let rows = 5000;
    let puts: Vec<viewcar::Put> = (0..rows)
        .map(|i| put(&format!("k{i:05}"), &format!("{{\"n\":{i}}}")))
        .collect();
    origin.origin.publish("items", puts).unwrap();
    let out = tempfile::tempdir().expect("temp dir");
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Kill(
        std::process::Command::new(&python)
            .args([
                format!("{root}/tests/interop/python_sync.py"),
                format!("{root}/proto"),
                out.path().display().to_string(),
                origin.addr.to_string(),
                "items".to_string(),
                rows.to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run python"),
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let mut stderr = child.0.stderr.take().expect("stderr");
    let (synced, lines) = within(tokio::task::spawn_blocking(move || {
        let first = lines.next();
        (first, lines)
    }))
    .await
    .expect("join");
    let fail = move |stderr: &mut std::process::ChildStderr| {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(stderr, &mut text);
        text
    };
    let synced = match synced {
        Some(Ok(line)) => line,
        other => panic!(
            "python ended before its snapshot: {other:?}\n{}",
            fail(&mut stderr)
        ),
    };
    // 5,000 rows at 700 per chunk: 8 chunks.
    assert_eq!(synced, format!("synced {rows} in 8 chunks"));
    origin
        .origin
        .publish("items", vec![put("after", "{\"n\":-1}")])
        .unwrap();
    writeln!(stdin, "published after").expect("write to python");
    let rest: Vec<String> = within(tokio::task::spawn_blocking(move || {
        lines.map_while(Result::ok).collect()
    }))
    .await
    .expect("join");
    assert_eq!(
        rest,
        ["changed after", "ok"],
        "python's output; its stderr:\n{}",
        fail(&mut stderr)
    );
}
