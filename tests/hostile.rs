//! Subscribers that never read, measured by the process's memory: a test binary of its own,
//! so that no other test's allocations move the figures.

mod common;

use std::time::Duration;

use common::*;
use viewcar::pb::cache::v1 as cache;

/// Resident and peak resident memory of this process, in bytes (Linux).
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// 100 Watches of every row of a 50k-key source (12 MB), with initial rows, whose clients never
/// read. Each used to copy the whole source into its pending list (~1 GB for 100); now each
/// holds a page and its bounded queues, and past `watch_send_timeout` the Watches end and free
/// their slots of `max_watches`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_watches_with_initial_rows_stay_within_their_bounds() {
    let Some(_) = memory() else {
        eprintln!("skipped: /proc/self/status not found");
        return;
    };
    let origin = TestOrigin::start(origin_config()).await;
    let mut cfg = sidecar_config(&origin.url(), &["t"]);
    cfg.limits.max_watches = 100;
    cfg.limits.watch_send_timeout = viewcar::config::Dur(Duration::from_secs(5));
    let sidecar = start_sidecar(cfg).await;
    let value = format!("{{\"pad\":\"{}\"}}", "x".repeat(230));
    for chunk in 0..50 {
        let puts = (0..1000)
            .map(|i| viewcar::Put::upsert(format!("k{:05}", chunk * 1000 + i), value.clone()))
            .collect();
        origin.origin.publish("t", puts).expect("publish");
    }
    let src = source(&sidecar, "t");
    wait_source(&src, "50k keys", |s| s.len() == 50_000).await;
    // Start the peak over from here (Linux: 5 resets VmHWM to the current resident size).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (before, _) = memory().expect("memory");

    let mut streams = Vec::new();
    for _ in 0..100 {
        // HTTP/2 windows of 64 KiB (hyper's client default is 2 MiB per stream): the client,
        // in this same process, then buffers little of what it never reads.
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.grpc_addr()))
                .expect("endpoint")
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .connect()
                .await
                .expect("connect");
        let mut client = cache::cache_client::CacheClient::new(channel);
        let watch = client
            .watch(cache::WatchRequest {
                source: "t".into(),
                keys: vec![],
                prefix: String::new(),
                send_initial: true,
            })
            .await
            .expect("Watch opens")
            .into_inner();
        // Never read.
        streams.push((client, watch));
    }
    // Every Watch ends once its send has waited past the deadline, freeing its slot.
    let timeouts = &sidecar.hub().stats().send_timeouts;
    within(async {
        while counter(timeouts) < 100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_, peak) = memory().expect("memory");
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 100 << 20,
        "100 unread Watches grew the process by {} MiB at their peak",
        grown >> 20
    );
    // A slot is free again: a new Watch opens and reads up to Synced.
    let mut client = cache_client(&sidecar).await;
    let mut watch = open_watch(&mut client, "t", &["k00001"], true).await;
    within(until_synced(&mut watch)).await;
    drop(streams);
}
