//! Behaviour the README promises that no other test drove: the origin's Publish rules and
//! stream queue, the Cache API's guards, the client commands and the data directory's lock,
//! each through the real listener (gRPC over loopback, the binary).

mod common;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use common::*;
use viewcar::pb::cache::v1 as cache;
use viewcar::pb::feed::v1 as feed;
use viewcar::OriginConfig;

fn change(key: &str, value: &str) -> feed::Change {
    feed::Change {
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        deleted: false,
    }
}

/// Publish: more than `max_publish_changes` changes, or one key twice, is refused whole with
/// INVALID_ARGUMENT naming what was wrong; nothing of it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refuses_too_many_changes_and_a_key_twice() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            max_publish_changes: 3,
            ..origin_config()
        })
        .await;
        origin.origin.publish("items", vec![put("z", "0")]).unwrap();
        let mut client = origin.feed_client().await;
        let err = client
            .publish(feed::PublishRequest {
                topic: "items".into(),
                changes: (0..4).map(|i| change(&format!("k{i}"), "v")).collect(),
            })
            .await
            .expect_err("4 changes past a limit of 3");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("limit is 3"), "{err:?}");

        let err = client
            .publish(feed::PublishRequest {
                topic: "items".into(),
                changes: vec![change("a", "1"), change("b", "2"), change("a", "3")],
            })
            .await
            .expect_err("a key twice");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("'a' appears twice"), "{err:?}");

        let fetched = client
            .fetch(feed::FetchRequest {
                topic: "items".into(),
                keys: vec!["a".into(), "b".into(), "k0".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            fetched.entries.is_empty(),
            "something of a refused publish was applied"
        );
        assert_eq!(fetched.position.expect("position").version, 1);
    })
    .await;
}

/// A Sync stream that does not read overflows its `stream_queue`: publishers never wait for it
/// (every publish returns), and once it reads again it gets Reset and a snapshot of the topic
/// as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_queue_is_reset_and_resnapshotted_while_publishers_go_on() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            stream_queue: 4,
            stream_send_buffer: 1,
            ..origin_config()
        })
        .await;
        origin.origin.publish("items", vec![put("a", "0")]).unwrap();
        let mut client = origin.feed_client().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(feed::SyncRequest {
            kind: Some(feed::sync_request::Kind::Subscribe(feed::Subscribe {
                topic: "items".into(),
                keys: vec![],
                resume: None,
            })),
        })
        .await
        .unwrap();
        let mut stream = client
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // The first snapshot arrives; then the stream is not read while 500 batches land.
        loop {
            let msg = stream.message().await.unwrap().expect("message");
            if let Some(feed::sync_response::Kind::Snapshot(s)) = msg.kind {
                if s.last {
                    break;
                }
            }
        }
        // Twice: a stream that fell behind once and caught up is watched for it again.
        let big = "x".repeat(4096);
        for round in 0..2 {
            let lagged_before = origin
                .origin
                .stats()
                .lagged
                .load(std::sync::atomic::Ordering::Relaxed);
            let mut last = 0;
            for i in 0..500 {
                last = origin
                    .origin
                    .publish("items", vec![put(&format!("k{}", i % 50), &big)])
                    .expect("a publish never waits for a slow stream")
                    .version;
            }
            assert!(
                origin
                    .origin
                    .stats()
                    .lagged
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > lagged_before,
                "round {round}: the stream never overflowed its queue"
            );
            // Reading again: a Reset, a whole snapshot, and the stream goes on to the last
            // version.
            let (mut reset, mut snapshot) = (false, false);
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: no Reset and snapshot came"))
                    .unwrap()
                    .expect("message");
                let at = match msg.kind {
                    Some(feed::sync_response::Kind::Reset(_)) => {
                        reset = true;
                        0
                    }
                    Some(feed::sync_response::Kind::Snapshot(s)) if reset && s.last => {
                        snapshot = true;
                        s.position.map_or(0, |p| p.version)
                    }
                    Some(feed::sync_response::Kind::Changes(b)) => b.version,
                    Some(feed::sync_response::Kind::Progress(p)) => {
                        p.position.map_or(0, |p| p.version)
                    }
                    _ => 0,
                };
                if snapshot && at >= last {
                    break;
                }
            }
        }
    })
    .await;
}

/// The Cache API's bounds: BatchGet keys, Watch keys, concurrent Watches, Scan page sizes, and
/// the cap on how long a read waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_api_guards_hold() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let puts = (0..30).map(|i| put(&format!("k{i:02}"), "v")).collect();
        origin.origin.publish("items", puts).unwrap();
        let mut cfg = sidecar_config(&origin.url(), &["items"]);
        cfg.limits.max_batch_keys = 5;
        cfg.limits.max_watch_keys = 2;
        cfg.limits.max_watches = 1;
        cfg.limits.scan_default_limit = 7;
        cfg.limits.scan_max_limit = 10;
        cfg.limits.max_wait = viewcar::config::Dur(Duration::from_millis(300));
        let sidecar = start_sidecar(cfg).await;
        sidecar.synced().await;
        let mut client = cache_client(&sidecar).await;

        let err = client
            .batch_get(cache::BatchGetRequest {
                keys: (0..6)
                    .map(|i| cache::Key {
                        source: "items".into(),
                        key: format!("k{i:02}"),
                    })
                    .collect(),
                options: None,
            })
            .await
            .expect_err("6 keys past max_batch_keys 5");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("limits.max_batch_keys"), "{err:?}");

        let err = client
            .watch(cache::WatchRequest {
                source: "items".into(),
                keys: vec!["k00".into(), "k01".into(), "k02".into()],
                prefix: String::new(),
                send_initial: false,
            })
            .await
            .expect_err("3 keys past max_watch_keys 2");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("limits.max_watch_keys"), "{err:?}");

        let mut open = open_watch(&mut client, "items", &["k00"], true).await;
        until_synced(&mut open).await;
        let err = client
            .watch(cache::WatchRequest {
                source: "items".into(),
                keys: vec!["k01".into()],
                prefix: String::new(),
                send_initial: false,
            })
            .await
            .expect_err("a second Watch past max_watches 1");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("limits.max_watches"), "{err:?}");
        drop(open);

        let scan = |limit: u32| cache::ScanRequest {
            source: "items".into(),
            prefix: "k".into(),
            limit,
            page_token: String::new(),
            options: None,
        };
        let page = client.scan(scan(0)).await.unwrap().into_inner();
        assert_eq!(page.items.len(), 7, "limit 0 = scan_default_limit");
        assert!(!page.next_page_token.is_empty());
        let page = client.scan(scan(1000)).await.unwrap().into_inner();
        assert_eq!(page.items.len(), 10, "capped to scan_max_limit");

        // A wait far past max_wait (300 ms) gives up at the cap, and says how long it waited.
        let mut req = get_waiting("items", "k00", 60_000);
        if let Some(o) = req.options.as_mut() {
            o.min_version = 1_000_000;
        }
        let err = client
            .get(req)
            .await
            .expect_err("never reaches the version");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("waited 300 ms"), "{err:?}");
        sidecar.shutdown().await;
    })
    .await;
}

/// A gRPC Watch whose queue overflows (the client reads nothing while many keys change) gets
/// `reset`, then the current rows and `synced` again: never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_past_its_queue_is_reset_and_resent_the_current_rows() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin
            .origin
            .publish("items", vec![put("k0", "v")])
            .unwrap();
        let mut cfg = sidecar_config(&origin.url(), &["items"]);
        cfg.limits.watch_queue = 4;
        cfg.limits.watch_send_buffer = 1;
        let sidecar = start_sidecar(cfg).await;
        sidecar.synced().await;
        let mut client = cache_client(&sidecar).await;
        let mut watch = client
            .watch(cache::WatchRequest {
                source: "items".into(),
                keys: vec![],
                prefix: "k".into(),
                send_initial: true,
            })
            .await
            .unwrap()
            .into_inner();
        until_synced(&mut watch).await;
        let src = source(&sidecar, "items");
        let big = "x".repeat(8192);
        let mut version = 0;
        for round in 0..20 {
            let puts = (0..50)
                .map(|i| put(&format!("k{i}"), &format!("{round}{big}")))
                .collect();
            version = origin.origin.publish("items", puts).unwrap().version;
        }
        wait_position(&src, origin.origin.epoch(), version).await;
        let resets = sidecar.hub().stats();
        eventually("the watch queue overflowed", || {
            counter(&resets.lagged) >= 1
        })
        .await;
        let mut reset = false;
        loop {
            let ev = watch
                .message()
                .await
                .unwrap()
                .expect("the Watch stays open");
            match ev.kind {
                Some(cache::watch_event::Kind::Reset(_)) => reset = true,
                Some(cache::watch_event::Kind::Synced(v)) if reset && v >= version => break,
                _ => {}
            }
        }
    })
    .await;
}

/// `viewcar get`, `viewcar sources` and `viewcar watch` against a running sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_read_a_sidecar() {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin
            .origin
            .publish("items", vec![put("p1", "{\"n\":1}")])
            .unwrap();
        let sidecar = start_sidecar(sidecar_config(&origin.url(), &["items"])).await;
        sidecar.synced().await;
        let addr = sidecar.grpc_addr().to_string();

        let out = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || run_viewcar(&["get", "items", "p1", "--addr", &addr])
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("{\"n\":1}"), "{stdout}");

        let out = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || run_viewcar(&["get", "items", "nope", "--addr", &addr])
        })
        .await
        .unwrap();
        assert!(!out.status.success(), "an absent key is not success");

        let out = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || run_viewcar(&["sources", "--addr", &addr])
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("items"))
            .unwrap_or_else(|| panic!("no items line in {stdout}"));
        assert!(line.contains("true"), "{line}");

        // `watch` prints the current row, then changes; it runs until stopped.
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_viewcar"))
            .args(["watch", "items", "p1", "--addr", &addr])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("viewcar watch");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, mut rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let mut published = false;
        while let Some(line) = rx.recv().await {
            seen.push(line.clone());
            if !published && line.contains("{\"n\":1}") {
                origin
                    .origin
                    .publish("items", vec![put("p1", "{\"n\":2}")])
                    .unwrap();
                published = true;
            }
            if line.contains("{\"n\":2}") {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            published && seen.iter().any(|l| l.contains("{\"n\":2}")),
            "viewcar watch printed {seen:?}"
        );
    })
    .await;
}

/// Two origins cannot hold one data directory: the second is refused with an error that says
/// so, and the first keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_is_held_by_one_origin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = OriginConfig {
        data_dir: Some(dir.path().to_path_buf()),
        ..origin_config()
    };
    let first = viewcar::Origin::open(cfg.clone()).expect("first origin opens");
    first.publish("items", vec![put("a", "1")]).unwrap();
    let err = match viewcar::Origin::open(cfg) {
        Ok(_) => panic!("a second origin opened the same data directory"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&dir.path().display().to_string()) || err.to_lowercase().contains("lock"),
        "{err}"
    );
    let kept = first.fetch("items", &["a".to_string()]).expect("fetch");
    assert_eq!(kept.entries.len(), 1, "the first origin lost its data");
}

/// `--seed` into a data directory loads once: a restart keeps what the directory holds (and its
/// epoch) and does not load the seed over it.
#[test]
fn a_seed_loads_into_an_empty_data_directory_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seed = dir.path().join("seed.json");
    std::fs::write(&seed, r#"{"items": {"a": {"n": 1}, "b": "two"}}"#).unwrap();
    let cfg = OriginConfig {
        data_dir: Some(dir.path().join("data")),
        seed: Some(seed.clone()),
        ..origin_config()
    };
    let first = viewcar::Origin::with_seed(cfg.clone()).expect("seeded");
    let epoch = first.epoch().to_string();
    let got = first
        .fetch("items", &["a".to_string(), "b".to_string()])
        .expect("fetch");
    assert_eq!(got.entries.len(), 2);
    first.publish("items", vec![put("a", "{\"n\":2}")]).unwrap();
    first.close();
    drop(first);

    // The seed now says otherwise; the directory wins.
    std::fs::write(&seed, r#"{"items": {"a": {"n": 99}, "c": 3}}"#).unwrap();
    let again = viewcar::Origin::with_seed(cfg).expect("reopened");
    assert_eq!(
        again.epoch(),
        epoch,
        "a restart from the directory keeps the epoch"
    );
    let got = again
        .fetch("items", &["a".to_string(), "c".to_string()])
        .expect("fetch");
    assert_eq!(got.entries.len(), 1, "{got:?}");
    assert_eq!(&got.entries[0].value[..], b"{\"n\":2}");
    assert_eq!(got.missing, vec!["c".to_string()]);
}

/// `max_streams`: a Sync stream past it is refused with RESOURCE_EXHAUSTED naming the key; the
/// open one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_streams_past_max_streams_are_refused() {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            max_streams: 1,
            ..origin_config()
        })
        .await;
        origin.origin.publish("items", vec![put("a", "1")]).unwrap();
        let subscribe = || feed::SyncRequest {
            kind: Some(feed::sync_request::Kind::Subscribe(feed::Subscribe {
                topic: "items".into(),
                keys: vec![],
                resume: None,
            })),
        };
        let mut client = origin.feed_client().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(subscribe()).await.unwrap();
        let mut first = client
            .sync(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert!(first.message().await.unwrap().is_some());
        let (tx2, rx2) = mpsc::channel(4);
        tx2.send(subscribe()).await.unwrap();
        let refused = match client.sync(ReceiverStream::new(rx2)).await {
            Err(status) => status,
            Ok(resp) => ending_status(&mut resp.into_inner()).await,
        };
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(refused.message().contains("max_streams"), "{refused:?}");
        // The first stream still carries changes.
        origin.origin.publish("items", vec![put("a", "2")]).unwrap();
        loop {
            let msg = first.message().await.unwrap().expect("first stream open");
            if matches!(msg.kind, Some(feed::sync_response::Kind::Changes(_))) {
                break;
            }
        }
        drop(tx);
    })
    .await;
}

/// `viewcar origin` takes the Publish token from `VIEWCAR_PUBLISH_TOKEN`: without it a Publish
/// is UNAUTHENTICATED, with it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_token_comes_from_the_environment() {
    within(async {
        let mut cmd = viewcar();
        cmd.args(["--log-format", "json", "origin", "--listen", "127.0.0.1:0"])
            .env("VIEWCAR_PUBLISH_TOKEN", "env-s3cret");
        let (_origin, mut log) = spawn(cmd);
        let serving = log_line(&mut log, "origin serving Feed").await;
        let addr = addr(&serving, "addr");
        let mut client = feed_client(addr).await;
        let req = || feed::PublishRequest {
            topic: "items".into(),
            changes: vec![change("a", "1")],
        };
        let err = client.publish(req()).await.expect_err("no token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        let mut with = tonic::Request::new(req());
        with.metadata_mut()
            .insert("authorization", "Bearer env-s3cret".parse().unwrap());
        let ok = client
            .publish(with)
            .await
            .expect("the token from the environment");
        assert_eq!(ok.into_inner().position.expect("position").version, 1);
    })
    .await;
}
