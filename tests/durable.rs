//! The durable origin: with a data directory, a restarted origin keeps its epoch, versions, rows
//! and retained changes, so a following sidecar resumes without a snapshot.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use viewcar::config::Fsync;
use viewcar::{Origin, OriginConfig, Put};

fn durable_config(dir: &std::path::Path) -> OriginConfig {
    OriginConfig {
        data_dir: Some(dir.to_path_buf()),
        ..origin_config()
    }
}

async fn start_durable(cfg: OriginConfig) -> TestOrigin {
    TestOrigin::start_on(Origin::open(cfg).expect("open origin"), loopback0()).await
}

#[tokio::test]
async fn restart_keeps_epoch_versions_and_rows() {
    within(async {
        let dir = tempfile::tempdir().expect("temp dir");
        for fsync in [Fsync::EveryBatch, Fsync::Interval] {
            let cfg = OriginConfig {
                fsync,
                ..durable_config(&dir.path().join(format!("{fsync:?}")))
            };
            let mut origin = start_durable(cfg.clone()).await;
            let o = origin.origin.clone();
            o.publish("prices", vec![Put::upsert("a", "1"), Put::upsert("b", "2")])
                .unwrap();
            o.publish("prices", vec![Put::upsert("a", "3"), Put::delete("b")])
                .unwrap();
            o.publish("stock", vec![Put::upsert("s", "9")]).unwrap();
            let epoch = o.epoch().to_string();
            let rows = o.rows("prices");
            drop(o);

            let o = origin.restart(cfg.clone()).await;
            assert_eq!(o.epoch(), epoch, "{fsync:?}: same epoch after a restart");
            assert_eq!(o.version("prices"), Some(2));
            assert_eq!(o.version("stock"), Some(1));
            assert_eq!(o.rows("prices"), rows);
            assert_eq!(o.rows("prices"), vec![("a".to_string(), "3".into())]);
            let fetched = o.fetch("prices", &["a".to_string()]).unwrap();
            assert_eq!(fetched.entries[0].version, 2, "per-key versions survive");
            let next = o.publish("prices", vec![Put::upsert("c", "4")]).unwrap();
            assert_eq!((next.epoch.as_str(), next.version), (epoch.as_str(), 3));
            origin.stop().await;
        }
    })
    .await
}

#[tokio::test]
async fn sidecar_resumes_without_snapshot_after_restart() {
    within(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = durable_config(dir.path());
        let mut origin = start_durable(cfg.clone()).await;
        let o = origin.origin.clone();
        for i in 0..5 {
            o.publish(
                "prices",
                vec![Put::upsert(format!("k{i}"), format!("v{i}"))],
            )
            .unwrap();
        }
        let epoch = o.epoch().to_string();
        drop(o);
        let sidecar = start_sidecar(sidecar_config(&origin.url(), &["prices"])).await;
        let prices = source(&sidecar, "prices");
        wait_position(&prices, &epoch, 5).await;
        let stats = sidecar.feed_stats("o").expect("feed stats").clone();
        let snapshots = counter(&stats.snapshots);

        let o = origin.restart(cfg).await;
        assert_eq!(o.epoch(), epoch);
        o.publish("prices", vec![Put::upsert("k0", "new"), Put::delete("k4")])
            .unwrap();
        wait_position(&prices, &epoch, 6).await;
        eventually("the sidecar resumed on the restarted origin", || {
            counter(&o.stats().resumes) >= 1
        })
        .await;
        assert_eq!(counter(&o.stats().snapshots_sent), 0, "no snapshot sent");
        assert_eq!(counter(&o.stats().resets_sent), 0, "no reset sent");
        assert_eq!(counter(&stats.snapshots), snapshots, "no snapshot applied");
        assert_eq!(prices.get("k0").map(|e| e.value), Some("new".into()));
        assert!(prices.get("k4").is_none(), "deleted after the restart");
        assert_eq!(prices.get("k3").map(|e| e.value), Some("v3".into()));
        sidecar.shutdown().await;
        origin.stop().await;
    })
    .await
}

#[tokio::test]
async fn restart_without_data_dir_is_a_new_epoch() {
    within(async {
        let mut origin = TestOrigin::start(origin_config()).await;
        origin
            .origin
            .publish("t", vec![Put::upsert("k", "v")])
            .unwrap();
        let epoch = origin.origin.epoch().to_string();
        let o = origin.restart(origin_config()).await;
        assert_ne!(o.epoch(), epoch);
        assert_eq!(o.version("t"), None, "an in-memory origin starts empty");
        origin.stop().await;
    })
    .await
}

#[tokio::test]
async fn a_publish_that_cannot_be_written_is_refused_and_not_applied() {
    within(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut origin = start_durable(durable_config(dir.path())).await;
        let o = origin.origin.clone();
        o.publish("t", vec![Put::upsert("k", "v")]).unwrap();
        o.close();
        let err = o.publish("t", vec![Put::upsert("k", "w")]).unwrap_err();
        assert!(err.to_string().contains("not applied"), "{err}");
        assert_eq!(o.version("t"), Some(1));
        assert_eq!(o.rows("t"), vec![("k".to_string(), "v".into())]);

        let mut client = origin.feed_client().await;
        let status = client
            .publish(viewcar::pb::feed::v1::PublishRequest {
                topic: "t".to_string(),
                changes: vec![viewcar::pb::feed::v1::Change {
                    key: "k".to_string(),
                    value: "x".into(),
                    deleted: false,
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("data directory"), "{status:?}");
        assert_eq!(o.version("t"), Some(1));
        assert_eq!(o.stats().published.load(Ordering::Relaxed), 1);
        origin.stop().await;
    })
    .await
}
