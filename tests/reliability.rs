//! Faults between sidecar and origin, over real loopback gRPC and the fault proxy: history
//! gone, never back in time, a silently dead peer, a reconnect storm, and origins that break
//! the protocol. Every wait is on an event or a deadline-bounded poll of a counter.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use viewcar::config::{ByteSize, Dur, Mode, OriginSpec, TopicSpec};
use viewcar::pb::cache::v1 as cache;
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

/// What a broken origin sends once the sidecar has applied `e@1 {a: 1}` and `e@2 {b: 2}`.
#[derive(Debug, Clone, Copy)]
enum Bad {
    UnsubscribedTopic,
    SnapshotBehindApplied,
    Oversized,
}

async fn bad_peer(bad: Bad) {
    within(async {
        let mut fake = FakeOrigin::start().await;
        let mut cfg = sidecar_config(&fake.url(), &["t"]);
        cfg.limits.max_message_bytes = ByteSize(4096);
        let sidecar = start_sidecar(cfg).await;
        let t = source(&sidecar, "t");
        let feed = sidecar.feed_stats("o").unwrap().clone();
        let mut s = fake.accept().await;
        assert_eq!(s.next_subscribe().await.resume, None);
        s.snapshot("t", "e", 1, &[("a".into(), "1".into())], 10)
            .await;
        s.batch("t", "e", 1, 2, &[("b", Some("2"))]).await;
        wait_position(&t, "e", 2).await;

        match bad {
            Bad::UnsubscribedTopic => s.batch("other", "e", 0, 1, &[("x", Some("1"))]).await,
            Bad::SnapshotBehindApplied => {
                s.snapshot("t", "e", 1, &[("a".into(), "old".into())], 10)
                    .await
            }
            Bad::Oversized => {
                let big = "x".repeat(10_000);
                s.batch("t", "e", 2, 3, &[("a", Some(big.as_str()))]).await
            }
        }

        // The sidecar drops the stream and subscribes again on a new one, resuming where it was.
        let mut again = fake.accept().await;
        let sub = again.next_subscribe().await;
        assert_eq!(sub.topic, "t");
        let resume = sub.resume.expect("resubscribed with a resume point");
        assert_eq!((resume.epoch.as_str(), resume.version), ("e", 2));
        assert_eq!(counter(&feed.protocol_errors), 1, "{bad:?} not counted");
        assert!(counter(&feed.disconnects) >= 1);

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
async fn bad_peer_oversized_message() {
    bad_peer(Bad::Oversized).await
}
