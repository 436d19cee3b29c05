//! A durable origin killed mid-stream: the real `viewcar origin` process, with a data directory
//! and `fsync = "every_batch"`, takes Publish calls from the test while an embedded sidecar
//! follows it through a proxy, and is killed with SIGKILL at a random point (after a random
//! number of batches, a random few milliseconds into the next Publish), then started again
//! on the same data directory (on a new port; the proxy keeps the sidecar's address). After
//! every restart:
//!
//! - the epoch is the same, and the origin's retained log, replayed from version 0, holds every
//!   batch whose Publish was acknowledged before the kill, at the version it was acknowledged
//!   as, with the same changes (acknowledged = durable); the only other batch it may hold is
//!   the one whose Publish was in flight at the kill, as it was sent;
//! - the rows, with their per-key versions, are those of the batches the log holds;
//! - the sidecar resumes without a snapshot or a reset, and its replica equals the origin's
//!   rows byte for byte, versions included.
//!
//! The seed is `VIEWCAR_CRASH_SEED` (printed on every run) so a failure can be replayed.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use common::*;
use viewcar::pb::feed::v1 as feed;

const TOPIC: &str = "t";
const KEYS: usize = 200;
const PER_BATCH: usize = 4;
const CRASHES: usize = 6;
/// A kill comes after 1..=this many batches acknowledged since the last start.
const MAX_BEFORE_KILL: usize = 150;
/// Batches published after the last restart, all acknowledged.
const AFTER_LAST: usize = 50;

/// What the whole test may take: every Publish is an fsync, and other tests may share the disk.
const TEST_DEADLINE: Duration = Duration::from_secs(180);

fn key(i: usize) -> String {
    format!("k{i:03}")
}

fn seed() -> u64 {
    std::env::var("VIEWCAR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc4a5_4ed0)
}

/// One batch: `PER_BATCH` distinct keys, about a fifth of them deletes; values are arbitrary
/// bytes (empty ones included) starting with the batch's sequence number when long enough.
fn batch(rng: &mut StdRng, n: u64) -> Vec<feed::Change> {
    let mut keys = std::collections::BTreeSet::new();
    while keys.len() < PER_BATCH {
        keys.insert(rng.random_range(0..KEYS));
    }
    keys.into_iter()
        .map(|k| {
            if rng.random_ratio(1, 5) {
                feed::Change {
                    key: key(k),
                    value: Bytes::new(),
                    deleted: true,
                }
            } else {
                let len = rng.random_range(0..24);
                let mut v = n.to_le_bytes().to_vec();
                v.truncate(if len == 0 { 0 } else { 8 });
                v.extend((0..len).map(|_| rng.random::<u8>()));
                feed::Change {
                    key: key(k),
                    value: v.into(),
                    deleted: false,
                }
            }
        })
        .collect()
}

/// The origin config of every run: any free loopback port, an fsync per batch (the default,
/// written out because it is what this test is about), frequent Progress.
const ORIGIN_CONFIG: &str = r#"
listen = "127.0.0.1:0"
fsync = "every_batch"
progress_interval = "100ms"
"#;

/// A running `viewcar origin` process.
struct OriginProcess {
    process: Running,
    addr: SocketAddr,
    epoch: String,
    /// Kept so the log pipe is always drained (a full pipe would block the process).
    _log: mpsc::UnboundedReceiver<String>,
}

/// Starts `viewcar origin` on `data_dir` and waits for it to serve (its "origin serving Feed"
/// log line, written once the listener is bound and the data directory loaded).
async fn start_origin(config: &Path, data_dir: &Path) -> OriginProcess {
    let mut cmd = viewcar();
    cmd.args(["--log-format", "json", "origin", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data_dir);
    let (process, mut log) = spawn(cmd);
    let serving = tokio::time::timeout(DEADLINE, log_line(&mut log, "origin serving Feed"))
        .await
        .expect("the origin process did not start serving in time");
    let epoch = serving["fields"]["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {serving}"))
        .to_string();
    OriginProcess {
        process,
        addr: addr(&serving, "addr"),
        epoch,
        _log: log,
    }
}

/// Every batch acknowledged so far, in order: (version, changes).
type Acked = Arc<Mutex<Vec<(u64, Vec<feed::Change>)>>>;

/// Publishes batches to `addr` one after another until a Publish fails, recording each
/// acknowledged one (its position checked: `epoch`, and the version after the last one).
/// Returns the batch whose Publish failed (it may or may not have been written) and why.
async fn publish_until_error(
    addr: SocketAddr,
    epoch: String,
    acked: Acked,
    count: watch::Sender<usize>,
    mut rng: StdRng,
) -> (Vec<feed::Change>, tonic::Status) {
    let mut client = feed_client(addr).await;
    loop {
        let next = acked.lock().unwrap().len() as u64 + 1;
        let changes = batch(&mut rng, next);
        let request = feed::PublishRequest {
            topic: TOPIC.to_string(),
            changes: changes.clone(),
        };
        match client.publish(request).await {
            Ok(response) => {
                let position = response.into_inner().position.expect("a position");
                assert_eq!(position.epoch, epoch, "acknowledged in the origin's epoch");
                assert_eq!(position.version, next, "acknowledged as the next version");
                let mut acked = acked.lock().unwrap();
                acked.push((position.version, changes));
                count.send_replace(acked.len());
            }
            Err(status) => return (changes, status),
        }
    }
}

/// The origin's retained log of `TOPIC`, replayed from `epoch`@0 on a Sync stream of its own,
/// up to the Progress that follows the replay; and that Progress's version.
async fn replay_log(addr: SocketAddr, epoch: &str) -> (Vec<feed::ChangeBatch>, u64) {
    let mut client = feed_client(addr).await;
    let (requests, rx) = mpsc::channel(1);
    requests
        .send(feed::SyncRequest {
            kind: Some(feed::sync_request::Kind::Subscribe(feed::Subscribe {
                topic: TOPIC.to_string(),
                keys: Vec::new(),
                resume: Some(feed::Position {
                    epoch: epoch.to_string(),
                    version: 0,
                }),
            })),
        })
        .await
        .expect("queue the Subscribe");
    let mut stream = client
        .sync(ReceiverStream::new(rx))
        .await
        .expect("Sync opens")
        .into_inner();
    let mut batches = Vec::new();
    loop {
        let message = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the replay did not end in time")
            .expect("Sync stream")
            .expect("the origin ended the replay stream");
        match message.kind {
            Some(feed::sync_response::Kind::Changes(b)) => batches.push(b),
            Some(feed::sync_response::Kind::Progress(p)) => {
                let position = p.position.expect("a Progress position");
                assert_eq!(position.epoch, epoch);
                drop(requests);
                return (batches, position.version);
            }
            other => panic!("the origin could not replay its log from version 0: {other:?}"),
        }
    }
}

/// The rows the acknowledged batches make: key -> (value, version of the last write).
fn model(acked: &[(u64, Vec<feed::Change>)]) -> BTreeMap<String, (Bytes, u64)> {
    let mut rows = BTreeMap::new();
    for (version, changes) in acked {
        for c in changes {
            if c.deleted {
                rows.remove(&c.key);
            } else {
                rows.insert(c.key.clone(), (c.value.clone(), *version));
            }
        }
    }
    rows
}

/// The origin's rows of `TOPIC` over Fetch (every key the test may write): key -> (value,
/// version), and the position they were read at.
async fn origin_rows(addr: SocketAddr) -> (BTreeMap<String, (Bytes, u64)>, feed::Position) {
    let response = feed_client(addr)
        .await
        .fetch(feed::FetchRequest {
            topic: TOPIC.to_string(),
            keys: (0..KEYS).map(key).collect(),
        })
        .await
        .expect("Fetch")
        .into_inner();
    let rows = response
        .entries
        .into_iter()
        .map(|e| (e.key, (e.value, e.version)))
        .collect();
    (rows, response.position.expect("a Fetch position"))
}

/// The sidecar's replica: key -> (value, version).
fn replica(src: &viewcar::store::Source) -> BTreeMap<String, (Bytes, u64)> {
    src.keyspace()
        .keys()
        .into_iter()
        .filter_map(|k| src.get(&k).map(|r| (k.to_string(), (r.value, r.version))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_survive_sigkill_and_the_sidecar_resumes() {
    tokio::time::timeout(TEST_DEADLINE, crash_and_restart())
        .await
        .expect("the test did not finish within its deadline");
}

async fn crash_and_restart() {
    let seed = seed();
    println!("durable crash: seed {seed} (VIEWCAR_CRASH_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let data_dir = tempfile::tempdir().expect("temp dir");
    let config = write_file("durable_crash", "origin.toml", ORIGIN_CONFIG);

    let mut origin = start_origin(&config, data_dir.path()).await;
    let epoch = origin.epoch.clone();
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let (count, mut counted) = watch::channel(0usize);

    // One batch before the sidecar starts, so it syncs on a topic that exists.
    let first = {
        let changes = vec![feed::Change {
            key: key(0),
            value: "start".into(),
            deleted: false,
        }];
        let position = feed_client(origin.addr)
            .await
            .publish(feed::PublishRequest {
                topic: TOPIC.to_string(),
                changes: changes.clone(),
            })
            .await
            .expect("first Publish")
            .into_inner()
            .position
            .expect("a position");
        assert_eq!(
            (position.epoch.as_str(), position.version),
            (epoch.as_str(), 1)
        );
        acked.lock().unwrap().push((1, changes));
        count.send_replace(1);
        position
    };

    let proxy = Proxy::start(origin.addr).await;
    let sidecar = start_sidecar(sidecar_config(&proxy.url(), &[TOPIC])).await;
    let src = source(&sidecar, TOPIC);
    wait_position(&src, &epoch, first.version).await;
    let stats = sidecar.feed_stats("o").expect("feed stats").clone();
    let snapshots = counter(&stats.snapshots);
    assert_eq!(snapshots, 1, "the sidecar synced with one snapshot");

    let mut in_doubt_written = 0;
    for crash in 0..CRASHES {
        // Publish until the kill; the kill comes once `target` more batches are acknowledged,
        // while the next Publish is (most likely) in flight.
        let base = acked.lock().unwrap().len();
        let target = base + rng.random_range(1..=MAX_BEFORE_KILL);
        let mut publisher = tokio::spawn(publish_until_error(
            origin.addr,
            epoch.clone(),
            acked.clone(),
            count.clone(),
            StdRng::seed_from_u64(seed ^ (crash as u64 + 1)),
        ));
        tokio::select! {
            reached = counted.wait_for(|n| *n >= target) => {
                reached.expect("the count is kept");
            }
            ended = &mut publisher => {
                let (_, status) = ended.expect("publisher");
                panic!("a Publish failed before the kill: {status:?}");
            }
        }
        // A random point in the next Publish's round trip (request in flight, batch being
        // written or synced, response on its way): not a wait for anything.
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..6_000))).await;
        let connects = counter(&stats.connects);
        let status = origin.process.kill();
        let (in_doubt, failed) = tokio::time::timeout(DEADLINE, publisher)
            .await
            .expect("a Publish to a killed origin fails in time")
            .expect("publisher");
        let acked_before = acked.lock().unwrap().clone();
        let (_, seen) = src.position();
        println!(
            "durable crash {crash}: killed ({status}) after {} batches acknowledged; the sidecar \
             had version {seen}; the Publish in flight failed with {:?}",
            acked_before.len(),
            failed.code()
        );

        origin = start_origin(&config, data_dir.path()).await;
        assert_eq!(origin.epoch, epoch, "a durable origin keeps its epoch");

        // The log holds every acknowledged batch as acknowledged, and perhaps the one in doubt.
        let (log, version) = replay_log(origin.addr, &epoch).await;
        let n = acked_before.len() as u64;
        assert!(
            version == n || version == n + 1,
            "after the kill the origin is at version {version}; {n} batches were acknowledged"
        );
        assert_eq!(
            log.len() as u64,
            version,
            "the whole log is retained and replayed"
        );
        let mut prev = 0;
        for (i, b) in log.iter().enumerate() {
            assert_eq!(b.epoch, epoch);
            assert_eq!((b.prev_version, b.version), (prev, prev + 1), "log order");
            prev = b.version;
            match acked_before.get(i) {
                Some((v, changes)) => {
                    assert_eq!(b.version, *v, "acknowledged version");
                    assert_eq!(&b.changes, changes, "acknowledged batch {v}: changes");
                }
                None => assert_eq!(
                    b.changes, in_doubt,
                    "the batch after the acknowledged ones is the one in flight at the kill"
                ),
            }
        }
        if version == n + 1 {
            in_doubt_written += 1;
            acked.lock().unwrap().push((version, in_doubt));
            count.send_replace(version as usize);
        }
        assert!(
            seen <= version,
            "the sidecar had version {seen}, which the restarted origin (at {version}) lost"
        );

        // The rows are those of the logged batches, per-key versions included.
        let want = model(&acked.lock().unwrap());
        let (rows, at) = origin_rows(origin.addr).await;
        assert_eq!((at.epoch.as_str(), at.version), (epoch.as_str(), version));
        assert_eq!(rows, want, "the origin's rows after the restart");

        // The sidecar resumes through the proxy, without a snapshot or a reset, and converges.
        // (It may be at `version` already; the counters are checked again at the end, once
        // later batches have come through the new stream.)
        proxy.set_upstream(Upstream::Forward(origin.addr));
        eventually("the sidecar reconnected to the restarted origin", || {
            counter(&stats.connects) > connects
        })
        .await;
        wait_position(&src, &epoch, version).await;
        assert_eq!(
            replica(&src),
            rows,
            "replica == origin after restart {crash}"
        );
        assert_eq!(counter(&stats.snapshots), snapshots, "no new snapshot");
        assert_eq!(counter(&stats.resets), 0, "no reset");
        assert_eq!(counter(&stats.gaps), 0, "no gap");
        assert_eq!(counter(&stats.protocol_errors), 0);
    }

    // After the last restart: more batches, every one acknowledged, then quiescence.
    let last = {
        let mut client = feed_client(origin.addr).await;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xa57);
        let mut last = None;
        for _ in 0..AFTER_LAST {
            let next = acked.lock().unwrap().len() as u64 + 1;
            let changes = batch(&mut rng, next);
            let position = client
                .publish(feed::PublishRequest {
                    topic: TOPIC.to_string(),
                    changes: changes.clone(),
                })
                .await
                .expect("Publish after the last restart")
                .into_inner()
                .position
                .expect("a position");
            assert_eq!(
                (position.epoch.as_str(), position.version),
                (epoch.as_str(), next)
            );
            acked.lock().unwrap().push((next, changes));
            last = Some(position);
        }
        last.expect("published")
    };
    wait_position(&src, &epoch, last.version).await;
    let want = model(&acked.lock().unwrap());
    let (rows, at) = origin_rows(origin.addr).await;
    assert_eq!(at.version, last.version);
    assert_eq!(rows, want, "the origin's rows at the end");
    assert_eq!(replica(&src), rows, "replica == origin, byte for byte");
    assert_eq!(counter(&stats.snapshots), snapshots, "no new snapshot");
    assert_eq!(counter(&stats.resets), 0, "no reset");
    assert!(
        counter(&stats.disconnects) >= CRASHES as u64,
        "every kill broke the feed"
    );

    sidecar.shutdown().await;
    origin.process.signal("-TERM");
    let status = origin.process.wait(DEADLINE).await;
    assert!(
        status.success(),
        "the origin exits cleanly on SIGTERM: {status}"
    );
    println!(
        "durable crash: seed {seed}, {CRASHES} kills, {} batches ({in_doubt_written} written \
         but not acknowledged), {} feed connects, in {:?}",
        last.version,
        counter(&stats.connects),
        started.elapsed()
    );
}
