//! The fan-out under load, over real WebSockets: many subscribers, and one that stops reading.

mod ws_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use viewcar::config::WsConfig;
use viewcar::Put;
use ws_support::*;

fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// Publishes `batches` versions of `per_batch` changes each; batch `b` writes `{"n": b + 1}`
/// (plus `pad`) to keys `b * per_batch ..` modulo `keys`. Returns each key's final value.
fn burst(
    s: &Setup,
    keys: usize,
    batches: usize,
    per_batch: usize,
    pad: &str,
) -> HashMap<String, Value> {
    let mut last = HashMap::new();
    for b in 0..batches {
        let value = json!({"n": b + 1, "pad": pad});
        let text = value.to_string();
        let puts = (0..per_batch)
            .map(|j| {
                let k = key((b * per_batch + j) % keys);
                last.insert(k.clone(), value.clone());
                Put::upsert(k, text.clone())
            })
            .collect();
        s.origin.publish("t", puts).expect("publish");
    }
    last
}

fn seed(s: &Setup, keys: usize) -> u64 {
    let mut v = 0;
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        let puts = chunk
            .iter()
            .map(|i| Put::upsert(key(*i), json!({"n": 0}).to_string()))
            .collect();
        v = s.origin.publish("t", puts).expect("seed").version;
    }
    v
}

/// Reads frames into a replica until it holds `want` for every key in it.
async fn read_until(ws: &mut Ws, replica: &mut Replica, want: &HashMap<String, Value>) {
    let done = |r: &Replica| {
        want.iter()
            .all(|(k, v)| r.rows.get(k).and_then(|(_, got)| got.as_ref()) == Some(v))
    };
    while !done(replica) {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                replica.apply(&v);
            }
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_get_every_change_in_order_after_a_100k_burst() {
    const SUBSCRIBERS: usize = 1000;
    const KEYS: usize = 10_000;
    const BATCHES: usize = 100;
    const PER_BATCH: usize = 1000;
    let started = Instant::now();
    let s = Arc::new(Setup::start(&["t"], WsConfig::default()).await);
    let v0 = seed(&s, KEYS);
    s.applied("t", v0).await;

    // Subscriber i watches 20 keys; every key has exactly two subscribers.
    let keys_of = |i: usize| -> Vec<String> {
        let other = (i + SUBSCRIBERS / 2) % SUBSCRIBERS;
        (0..10)
            .map(|j| key(i * 10 + j))
            .chain((0..10).map(|j| key(other * 10 + j)))
            .collect()
    };
    let synced = Arc::new(AtomicUsize::new(0));
    let all_synced = Arc::new(Notify::new());
    let (final_tx, final_rx) = tokio::sync::watch::channel(None::<Arc<HashMap<String, Value>>>);
    let mut clients = Vec::new();
    for i in 0..SUBSCRIBERS {
        let (mut ws, local) = connect_at(s.sidecar.http_addr()).await;
        let keys = keys_of(i);
        let synced = synced.clone();
        let all_synced = all_synced.clone();
        let mut final_rx = final_rx.clone();
        clients.push((
            local,
            tokio::spawn(async move {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                subscribe_keys(&mut ws, "s", "t", &refs, true).await;
                let mut replica = Replica::default();
                loop {
                    let v = recv(&mut ws).await;
                    replica.apply(&v);
                    if v["type"] == "synced" {
                        break;
                    }
                }
                assert_eq!(replica.rows.len(), 20, "initial rows");
                if synced.fetch_add(1, Ordering::SeqCst) + 1 == SUBSCRIBERS {
                    all_synced.notify_one();
                }
                let rows_before = replica.frames;
                let want = final_rx
                    .wait_for(Option::is_some)
                    .await
                    .expect("the burst's final values")
                    .clone()
                    .expect("set");
                let mine: HashMap<String, Value> =
                    keys.iter().map(|k| (k.clone(), want[k].clone())).collect();
                read_until(&mut ws, &mut replica, &mine).await;
                (ws, replica.frames - rows_before, replica)
            }),
        ));
    }
    within("every subscriber synced", async {
        while synced.load(Ordering::SeqCst) < SUBSCRIBERS {
            all_synced.notified().await;
        }
    })
    .await;
    let connected = started.elapsed();

    let burst_started = Instant::now();
    let last = burst(&s, KEYS, BATCHES, PER_BATCH, "");
    final_tx.send_replace(Some(Arc::new(last)));
    let mut results = Vec::new();
    for (local, client) in clients {
        let (ws, frames, replica) = within("a subscriber to catch up", client)
            .await
            .expect("subscriber task");
        results.push((local, ws, frames, replica));
    }
    let delivered_in = burst_started.elapsed();

    // Every change to a subscriber's keys was either sent to it, in order and once (checked
    // by Replica::apply), or replaced in its queue by a newer change of the same key.
    let changes_per_sub = 20 * BATCHES * PER_BATCH / KEYS;
    let mut sent = 0;
    let mut conflated = 0;
    for (local, _ws, frames, replica) in &results {
        let q = queue_of(&s.sidecar, *local);
        assert_eq!(q.resets, 0, "{local}: no queue overflow at this load");
        assert_eq!(
            *frames as u64 + q.conflated,
            changes_per_sub as u64,
            "{local}: sent + conflated = every change of its keys; frames {:?}, {}",
            replica.kinds,
            s.upstream()
        );
        assert_eq!(replica.resets, 0);
        sent += frames;
        conflated += q.conflated;
    }
    assert_eq!(s.sidecar.hub().stats().lagged.load(Ordering::Relaxed), 0);
    eprintln!(
        "{SUBSCRIBERS} subscribers connected and synced in {connected:?}; {} changes \
         delivered in {delivered_in:?}: {sent} frames sent, {conflated} conflated",
        BATCHES * PER_BATCH
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_stays_bounded_and_catches_up_to_the_latest() {
    const KEYS: usize = 1000;
    const BATCHES: usize = 100;
    const PER_BATCH: usize = 1000;
    const BOUND: usize = 256;
    const FAST: usize = 10;
    // It is reset every time it overflows while the kernel buffers still take frames; this
    // test is about the bound, not about giving up on it (a_client_that_keeps_falling_behind
    // in ws.rs is).
    let ws_cfg = WsConfig {
        queue: BOUND,
        max_resets: 1000,
        ..WsConfig::default()
    };
    let s = Arc::new(Setup::start(&["t"], ws_cfg).await);
    let v0 = seed(&s, KEYS);
    s.applied("t", v0).await;

    // The slow one: every key, a tiny receive buffer, and it reads nothing during the burst.
    let (mut slow, slow_addr) = connect_small_buffer(s.sidecar.http_addr()).await;
    ws_support::send(
        &mut slow,
        json!({"op":"subscribe","id":"all","source":"t","prefix":"","initial":true}),
    )
    .await;
    let mut fast = Vec::new();
    for i in 0..FAST {
        let (mut ws, local) = connect_at(s.sidecar.http_addr()).await;
        let keys: Vec<String> = (0..10).map(|j| key(i * 10 + j)).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        subscribe_keys(&mut ws, "f", "t", &refs, false).await;
        assert_eq!(recv(&mut ws).await["type"], "synced");
        fast.push((ws, local, keys));
    }

    // Watch the slow connection's queue while the changes flow.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let s = s.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(queue_of(&s.sidecar, slow_addr).queued);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            max
        })
    };
    let last = burst(&s, KEYS, BATCHES, PER_BATCH, &"x".repeat(200));
    let fast_started = Instant::now();
    for (ws, local, keys) in &mut fast {
        let mine: HashMap<String, Value> =
            keys.iter().map(|k| (k.clone(), last[k].clone())).collect();
        let mut replica = Replica::default();
        within("a fast subscriber", read_until(ws, &mut replica, &mine)).await;
        let q = queue_of(&s.sidecar, *local);
        assert_eq!(q.resets, 0, "fast subscribers are never reset");
        assert_eq!(
            replica.frames as u64 + q.conflated,
            (10 * BATCHES * PER_BATCH / KEYS) as u64,
            "fast subscribers get every change (or its newer replacement); frames {:?}, \
             conflated {}, {}",
            replica.kinds,
            q.conflated,
            s.upstream()
        );
    }
    let fast_took = fast_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sampled = sampler.await.expect("sampler");
    let q = queue_of(&s.sidecar, slow_addr);
    assert!(
        sampled <= BOUND,
        "sampled queue length {sampled} > bound {BOUND}"
    );
    assert!(
        q.high_water <= BOUND,
        "queue high water {} > bound {BOUND}",
        q.high_water
    );
    assert!(
        q.resets >= 1,
        "the slow subscriber overflowed its bound: {q:?}"
    );

    // Now it reads: it ends holding the latest value of every key.
    let mut replica = Replica::default();
    within(
        "the slow subscriber to catch up",
        read_until(&mut slow, &mut replica, &last),
    )
    .await;
    assert!(replica.resets >= 1);
    assert_eq!(replica.values(), last);
    eprintln!(
        "slow subscriber: queue high water {} (bound {BOUND}), {} resets, {} frames read after \
         resuming; fast subscribers done {fast_took:?} after the burst",
        q.high_water, q.resets, replica.frames
    );
}
