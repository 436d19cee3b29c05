//! The Cache gRPC API over loopback: freshness controls, degradation while the origin is down,
//! Watch ordering, and bad input (unknown sources, oversized messages, refused publishes).
//! Every test runs twice: over TCP, and over a Unix socket (`listen.grpc = "unix:/path"`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tonic::Code;
use viewcar::config::ListenAddr;
use viewcar::config::{ByteSize, Dur};
use viewcar::pb::cache::v1 as cache;
use viewcar::pb::feed::v1 as feed;
use viewcar::{OriginConfig, Sidecar, SidecarConfig};

/// How the tests reach the Cache API.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Unix,
}

/// Starts a sidecar with its Cache API over `t`; for a Unix socket, also the directory that
/// holds the socket file (removed when dropped).
async fn start_over(t: Transport, mut cfg: SidecarConfig) -> (Sidecar, Option<tempfile::TempDir>) {
    let dir = match t {
        Transport::Tcp => None,
        Transport::Unix => {
            let dir = tempfile::tempdir().expect("temp dir");
            cfg.listen.grpc = ListenAddr::Unix(dir.path().join("grpc.sock"));
            // The http listener's default port follows a TCP grpc's port 0 only.
            cfg.listen.http.get_or_insert(loopback0());
            Some(dir)
        }
    };
    let sidecar = start_sidecar(cfg).await;
    if let Transport::Unix = t {
        assert!(
            matches!(sidecar.grpc_addr(), ListenAddr::Unix(_)),
            "{}",
            sidecar.grpc_addr()
        );
    }
    (sidecar, dir)
}

/// A test for each transport: `tcp::NAME` and `unix::NAME` run `NAME(Transport::...)`.
macro_rules! over_both {
    ($($name:ident),* $(,)?) => {
        mod tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Transport::Tcp).await
                }
            )*
        }
        mod unix {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Transport::Unix).await
                }
            )*
        }
    };
}

over_both!(
    unknown_source_is_not_found_naming_it,
    min_version_reads_your_writes,
    origin_down_reads_keep_answering_with_growing_staleness,
    watch_sees_every_change_of_its_keys_in_version_order,
    bad_publishes_are_invalid_argument_and_apply_nothing,
    oversized_messages_are_refused_by_the_configured_limits,
    batch_get_never_sees_half_a_publish,
);

fn change(key: &str, value: Option<&str>) -> feed::Change {
    feed::Change {
        key: key.to_string(),
        value: value
            .map(|v| v.as_bytes().to_vec().into())
            .unwrap_or_default(),
        deleted: value.is_none(),
    }
}

fn publish_request(topic: &str, changes: Vec<feed::Change>) -> feed::PublishRequest {
    feed::PublishRequest {
        topic: topic.to_string(),
        changes,
    }
}

async fn unknown_source_is_not_found_naming_it(t: Transport) {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let (sidecar, _socket) = start_over(t, sidecar_config(&origin.url(), &["t"])).await;
        let mut c = cache_client(&sidecar).await;
        let check = |r: Result<(), tonic::Status>| {
            let e = r.expect_err("unknown source was answered");
            assert_eq!(e.code(), Code::NotFound, "{e:?}");
            assert!(e.message().contains("'nope'"), "{}", e.message());
        };
        check(c.get(get_request("nope", "a")).await.map(|_| ()));
        check(
            c.batch_get(cache::BatchGetRequest {
                keys: vec![
                    cache::Key {
                        source: "t".into(),
                        key: "a".into(),
                    },
                    cache::Key {
                        source: "nope".into(),
                        key: "a".into(),
                    },
                ],
                options: None,
            })
            .await
            .map(|_| ()),
        );
        check(
            c.scan(cache::ScanRequest {
                source: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        );
        check(
            c.watch(cache::WatchRequest {
                source: "nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        );
        sidecar.shutdown().await;
    })
    .await
}

async fn min_version_reads_your_writes(t: Transport) {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("seed", "0")]).unwrap();
        let (sidecar, _socket) = start_over(t, sidecar_config(&origin.url(), &["t"])).await;
        let mut c = cache_client(&sidecar).await;
        let mut writer = origin.feed_client().await;
        for i in 0..20 {
            let value = format!("w{i}");
            let pos = writer
                .publish(publish_request("t", vec![change("k", Some(&value))]))
                .await
                .unwrap()
                .into_inner()
                .position
                .unwrap();
            let got = c
                .get(cache::GetRequest {
                    source: "t".into(),
                    key: "k".into(),
                    options: Some(cache::ReadOptions {
                        min_version: pos.version,
                        wait_ms: 5_000,
                        ..Default::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            let item = got.item.unwrap();
            assert_eq!(text(&item.value), value, "write {i} not seen");
            assert_eq!(item.version, pos.version);
            assert!(got.source_version >= pos.version);
        }
        // A version nobody wrote: refused after the wait, saying why.
        let e = c
            .get(cache::GetRequest {
                source: "t".into(),
                key: "k".into(),
                options: Some(cache::ReadOptions {
                    min_version: 1_000,
                    wait_ms: 50,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(e.message().contains("min_version 1000"), "{}", e.message());
        sidecar.shutdown().await;
    })
    .await
}

async fn origin_down_reads_keep_answering_with_growing_staleness(t: Transport) {
    within(async {
        let mut origin = TestOrigin::start(origin_config()).await;
        let p = origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let mut cfg = sidecar_config(&origin.url(), &["t"]);
        cfg.feed.live_window = Dur(Duration::from_secs(5));
        let (sidecar, _socket) = start_over(t, cfg).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p.epoch, p.version).await;
        let mut c = cache_client(&sidecar).await;
        let live = c.get(get_request("t", "a")).await.unwrap().into_inner();
        assert_eq!(live.staleness_ms, 0);

        origin.stop().await;
        eventually("the sidecar noticed the origin is gone", || {
            !t.is_connected()
        })
        .await;
        let read = |max_staleness_ms: u32| cache::GetRequest {
            source: "t".into(),
            key: "a".into(),
            options: Some(cache::ReadOptions {
                max_staleness_ms,
                ..Default::default()
            }),
        };
        let first = c.get(read(0)).await.unwrap().into_inner();
        assert_eq!(text(&first.item.unwrap().value), "1");
        let mut later = first.staleness_ms;
        let start = tokio::time::Instant::now();
        while later <= first.staleness_ms.max(2) {
            assert!(start.elapsed() < DEADLINE, "staleness does not grow");
            tokio::time::sleep(Duration::from_millis(5)).await;
            let r = c.get(read(0)).await.unwrap().into_inner();
            assert!(r.item.unwrap().found, "data lost while the origin is down");
            later = r.staleness_ms;
        }
        let e = c.get(read(1)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            e.message().contains("'t'") && e.message().contains("ms stale"),
            "{}",
            e.message()
        );
        let ok = c.get(read(60_000)).await.unwrap().into_inner();
        assert!(ok.staleness_ms >= later);
        let listed = c
            .list_sources(cache::ListSourcesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(!listed.sources[0].connected && listed.sources[0].synced);
        sidecar.shutdown().await;
    })
    .await
}

async fn watch_sees_every_change_of_its_keys_in_version_order(t: Transport) {
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        let p0 = origin
            .origin
            .publish("t", vec![put("w1", "0"), put("x", "0")])
            .unwrap();
        let (sidecar, _socket) = start_over(t, sidecar_config(&origin.url(), &["t"])).await;
        let mut c = cache_client(&sidecar).await;
        let mut stream = c
            .watch(cache::WatchRequest {
                source: "t".into(),
                keys: vec!["w1".into(), "w2".into()],
                send_initial: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        use cache::watch_event::Kind;
        let mut got: Vec<(String, u64, Option<String>)> = Vec::new();
        loop {
            match stream.message().await.unwrap().unwrap().kind.unwrap() {
                Kind::Upsert(i) => got.push((i.key, i.version, Some(text(&i.value)))),
                Kind::Synced(v) => {
                    assert_eq!(v, p0.version);
                    break;
                }
                other => panic!("before synced: {other:?}"),
            }
        }
        assert_eq!(got, vec![("w1".into(), p0.version, Some("0".into()))]);

        // A mix of updates, deletes and unwatched keys; the oracle is the origin's own order.
        // A watcher that keeps up is told every change: each batch is read before the next.
        let mut present: BTreeMap<&str, bool> = [("w1", true), ("w2", false)].into();
        let mut want = Vec::new();
        let mut changes = Vec::new();
        for i in 1..=60u32 {
            let mut puts = vec![put("x", &format!("{i}"))];
            let mut touched = Vec::new();
            if i % 2 == 0 {
                touched.push(("w1", i % 6 == 0));
            }
            if i % 3 != 0 {
                touched.push(("w2", i % 5 == 0));
            }
            for (k, delete) in &touched {
                puts.push(if *delete {
                    del(k)
                } else {
                    put(k, &format!("{k}-{i}"))
                });
            }
            let pos = origin.origin.publish("t", puts).unwrap();
            for (k, delete) in touched {
                let was = present.insert(k, !delete).unwrap();
                if delete && was {
                    want.push((k.to_string(), pos.version, None));
                } else if !delete {
                    want.push((k.to_string(), pos.version, Some(format!("{k}-{i}"))));
                }
            }
            while changes.len() < want.len() {
                changes.push(next_change(&mut stream).await);
            }
        }
        assert_eq!(changes, want);

        // A burst may be conflated for a slower watcher, but never reordered or repeated, and
        // it ends at the latest state.
        let mut last = 0;
        for i in 61..=160u32 {
            let pos = origin
                .origin
                .publish("t", vec![put("w1", &format!("w1-{i}")), put("x", "-")])
                .unwrap();
            last = pos.version;
        }
        let mut burst = Vec::new();
        loop {
            let c = next_change(&mut stream).await;
            let done = c.1 == last;
            burst.push(c);
            if done {
                break;
            }
        }
        assert!(burst.windows(2).all(|w| w[0].1 < w[1].1), "{burst:?}");
        assert_eq!(
            burst.last().unwrap().2.as_deref(),
            Some("w1-160"),
            "{burst:?}"
        );
        sidecar.shutdown().await;
    })
    .await
}

/// The next upsert or delete of a watch, as (key, version, value).
async fn next_change(
    stream: &mut tonic::Streaming<cache::WatchEvent>,
) -> (String, u64, Option<String>) {
    use cache::watch_event::Kind;
    match stream.message().await.unwrap().unwrap().kind.unwrap() {
        Kind::Upsert(i) => (i.key, i.version, Some(text(&i.value))),
        Kind::Delete(i) => (i.key, i.version, None),
        other => panic!("unexpected {other:?}"),
    }
}

async fn bad_publishes_are_invalid_argument_and_apply_nothing(t: Transport) {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            topics: vec!["t".into()],
            ..origin_config()
        })
        .await;
        let p0 = origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let (sidecar, _socket) = start_over(t, sidecar_config(&origin.url(), &["t"])).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;
        let mut w = origin.feed_client().await;

        let e = w
            .publish(publish_request(
                "t",
                vec![change("a", Some("2")), change("", Some("x"))],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("empty key"), "{}", e.message());
        let e = w
            .publish(publish_request("u", vec![change("a", Some("2"))]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("'u'"), "{}", e.message());
        let e = w
            .publish(publish_request("", vec![change("a", Some("2"))]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(origin.origin.version("t"), Some(p0.version));
        assert_eq!(origin.origin.version("u"), None);
        assert_eq!(origin.origin.topics(), vec!["t".to_string()]);

        // The next good publish is the very next version, and it is all the sidecar got.
        let p1 = w
            .publish(publish_request("t", vec![change("b", Some("1"))]))
            .await
            .unwrap()
            .into_inner()
            .position
            .unwrap();
        assert_eq!(p1.version, p0.version + 1);
        wait_position(&t, &p1.epoch, p1.version).await;
        assert_eq!(t.get("a").unwrap().value, "1".as_bytes());
        assert_eq!(t.len(), 2);
        sidecar.shutdown().await;
    })
    .await
}

async fn oversized_messages_are_refused_by_the_configured_limits(t: Transport) {
    within(async {
        let origin = TestOrigin::start(OriginConfig {
            max_message_bytes: ByteSize(8 << 10),
            snapshot_chunk_bytes: ByteSize(2 << 10),
            ..origin_config()
        })
        .await;
        let big = "v".repeat(1500);
        let p0 = origin
            .origin
            .publish("t", vec![put("a", &big), put("b", &big), put("c", &big)])
            .unwrap();
        let mut cfg = sidecar_config(&origin.url(), &["t"]);
        cfg.limits.max_message_bytes = ByteSize(4 << 10);
        let (sidecar, _socket) = start_over(t, cfg).await;
        let t = source(&sidecar, "t");
        wait_position(&t, &p0.epoch, p0.version).await;
        let mut c = cache_client(&sidecar).await;

        // Cache API, request above the sidecar's limit.
        let e = c
            .get(get_request("t", &"k".repeat(5 << 10)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("4096"), "{}", e.message());
        // Cache API, answer above the sidecar's limit.
        let keys = ["a", "b", "c"]
            .iter()
            .map(|k| cache::Key {
                source: "t".into(),
                key: k.to_string(),
            })
            .collect();
        let e = c
            .batch_get(cache::BatchGetRequest {
                keys,
                options: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

        // Publish above the origin's limit, over gRPC and from embedding code.
        let mut w = origin.feed_client().await;
        let e = w
            .publish(publish_request(
                "t",
                vec![change("huge", Some(&"h".repeat(9 << 10)))],
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        let e = origin
            .origin
            .publish("t", vec![put("huge", &"h".repeat(9 << 10))])
            .unwrap_err();
        assert!(e.to_string().contains("8192"), "{e}");
        assert_eq!(origin.origin.version("t"), Some(p0.version));

        // A feed message above the sidecar's limit (the origin allows it): never applied, the
        // sidecar keeps serving what it has.
        let feed = sidecar.feed_stats("o").unwrap().clone();
        let before = counter(&feed.disconnects);
        let p1 = origin
            .origin
            .publish("t", vec![put("d", &"d".repeat(6 << 10))])
            .unwrap();
        eventually("the sidecar refused the oversized batch twice", || {
            counter(&feed.disconnects) >= before + 2
        })
        .await;
        assert!(t.version() < p1.version);
        assert!(t.get("d").is_none());
        let ok = c.get(get_request("t", "a")).await.unwrap().into_inner();
        assert!(ok.item.unwrap().found);
        sidecar.shutdown().await;
    })
    .await
}

/// One Publish is one version: a BatchGet racing the writer sees all of its keys from the same
/// version, never half of a batch.
async fn batch_get_never_sees_half_a_publish(t: Transport) {
    within(async {
        const KEYS: usize = 50;
        let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i:02}")).collect();
        let batch = {
            let keys = keys.clone();
            move |n: u32| -> Vec<viewcar::Put> {
                keys.iter().map(|k| put(k, &n.to_string())).collect()
            }
        };
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", batch(0)).unwrap();
        let (sidecar, _socket) = start_over(t, sidecar_config(&origin.url(), &["t"])).await;
        // Synced before the publishes: a first snapshot taken after all of them would show
        // one version only.
        sidecar.synced().await;
        let mut c = cache_client(&sidecar).await;
        let request = cache::BatchGetRequest {
            keys: keys
                .iter()
                .map(|k| cache::Key {
                    source: "t".into(),
                    key: k.clone(),
                })
                .collect(),
            options: Some(cache::ReadOptions {
                wait_ms: 5_000,
                ..Default::default()
            }),
        };
        let publisher = {
            let origin = origin.origin.clone();
            let batch = batch.clone();
            tokio::spawn(async move {
                for n in 1..=2_000u32 {
                    origin.publish("t", batch(n)).unwrap();
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let mut reads = 0;
        let mut distinct = std::collections::BTreeSet::new();
        while !publisher.is_finished() || reads < 100 {
            let items = c
                .batch_get(request.clone())
                .await
                .unwrap()
                .into_inner()
                .items;
            let values: Vec<String> = items.iter().map(|i| text(&i.value)).collect();
            assert!(
                values.iter().all(|v| *v == values[0]),
                "a BatchGet mixed versions: {values:?}"
            );
            distinct.insert(values[0].clone());
            reads += 1;
        }
        publisher.await.unwrap();
        assert!(
            distinct.len() > 1,
            "the reads never overlapped the publishes"
        );
        sidecar.shutdown().await;
    })
    .await
}

/// `listen.grpc = "unix:/path"`: a socket file left by an earlier run is replaced, the file
/// gets `grpc_socket_mode`, a path something still listens on or that is not a socket is
/// refused naming it, and a graceful stop removes the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_cache_api_replaces_a_stale_file_and_refuses_a_live_one() {
    use std::os::unix::fs::PermissionsExt;
    within(async {
        let origin = TestOrigin::start(origin_config()).await;
        origin.origin.publish("t", vec![put("a", "1")]).unwrap();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("grpc.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        let mut cfg = sidecar_config(&origin.url(), &["t"]);
        cfg.listen.grpc = ListenAddr::Unix(path.clone());
        cfg.listen.http = Some(loopback0());
        cfg.listen.grpc_socket_mode = 0o600;
        let sidecar = start_sidecar(cfg.clone()).await;
        let mode = std::fs::metadata(&path)
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut c = cache_client(&sidecar).await;
        let got = c
            .get(cache::GetRequest {
                source: "t".into(),
                key: "a".into(),
                options: Some(cache::ReadOptions {
                    wait_ms: 5_000,
                    ..Default::default()
                }),
            })
            .await
            .expect("Get over the Unix socket")
            .into_inner();
        assert_eq!(got.item.map(|i| i.value.to_vec()), Some(b"1".to_vec()));
        // The command-line client dials the socket too.
        let addr = format!("unix:{}", path.display());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_viewcar"))
                .args(["get", "t", "a", "--addr", &addr])
                .output()
        })
        .await
        .expect("join")
        .expect("run viewcar get");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");

        // A second sidecar on the same path while the first listens: refused, naming the path.
        let err = Sidecar::start(cfg.clone()).await.err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("listens on this socket"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");

        // A path that is not a socket is left alone and refused.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"data").expect("write");
        let mut other = cfg.clone();
        other.listen.grpc = ListenAddr::Unix(file.clone());
        let err = Sidecar::start(other).await.err().expect("refused");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).expect("file kept"), b"data");

        drop(c);
        sidecar.shutdown().await;
        assert!(!path.exists(), "the socket file is removed at shutdown");
    })
    .await;
}

/// Local clients that connect at once to a Unix socket Cache API wait in its backlog: past the
/// connection bound (here one connection) 600 connects all succeed, where a backlog of 128
/// (tokio's default) refused every one past it at once ("Resource temporarily unavailable").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_local_clients_waits_in_the_unix_sockets_backlog() {
    let Some(somaxconn) = somaxconn_above(200) else {
        return;
    };
    let burst = 600.min(somaxconn - 1);
    let origin = TestOrigin::start(origin_config()).await;
    origin.origin.publish("t", vec![put("a", "1")]).unwrap();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("grpc.sock");
    let mut cfg = sidecar_config(&origin.url(), &["t"]);
    cfg.listen.grpc = ListenAddr::Unix(path.clone());
    cfg.listen.http = Some(loopback0());
    cfg.listen.grpc_max_connections = 1;
    let _sidecar = start_sidecar(cfg).await;
    // Takes the one permit: nothing more is accepted while it is open.
    let _first = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..burst {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, 0, "of {burst} connects, {} queued", held.len());
}

/// A socket whose listener is alive but whose backlog is full (it refuses a connect with
/// EAGAIN) is not taken for a stale file: the sidecar is refused, and the file is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_with_a_full_backlog_is_not_taken_for_a_stale_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("grpc.sock");
    // Another process's listener that accepts nothing: its backlog (128) fills.
    let other = std::os::unix::net::UnixListener::bind(&path).expect("listener");
    let mut queued = Vec::new();
    loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    let origin = TestOrigin::start(origin_config()).await;
    let mut cfg = sidecar_config(&origin.url(), &["t"]);
    cfg.listen.grpc = ListenAddr::Unix(path.clone());
    cfg.listen.http = Some(loopback0());
    let err = Sidecar::start(cfg).await.err().expect("refused");
    assert!(err.to_string().contains("listens on this socket"), "{err}");
    // The file is still the other listener's: it accepts what was queued on it.
    other.accept().expect("a queued connection");
    std::os::unix::net::UnixStream::connect(&path).expect("connect once there is room");
    drop(queued);
}
