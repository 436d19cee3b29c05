//! Publish-at-origin -> delivered-to-WebSocket latency, and frames delivered per CPU second.
//!
//! One process holds an origin, a sidecar replicating it over loopback gRPC, and N WebSocket
//! subscribers over loopback. Changes are published at a fixed rate; each value carries its
//! publish time, and every subscriber records (receive time - publish time) in an HDR
//! histogram. The clients' own cost (reading, parsing) is in the same process, so the CPU
//! figure is for the whole loop, not for the sidecar alone: `viewcar bench push` measures the
//! same fan-out with the sidecar and the subscribers in processes of their own.
//!
//! ```text
//! cargo run --release --example ws_latency -- [--subscribers 1000] [--rate 10000]
//!     [--fanout 1] [--seconds 10] [--batch 10]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use viewcar::config::{Mode, OriginSpec, TopicSpec};
use viewcar::{Origin, OriginConfig, Put, Sidecar, SidecarConfig};

struct Args {
    subscribers: usize,
    rate: u64,
    fanout: usize,
    seconds: u64,
    batch: u64,
}

fn args() -> Args {
    let mut a = Args {
        subscribers: 1000,
        rate: 10_000,
        fanout: 1,
        seconds: 10,
        batch: 10,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let n: u64 = pair.get(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: ws_latency [--subscribers N] [--rate N] [--fanout N] [--seconds N] [--batch N]");
            std::process::exit(64)
        });
        match pair[0].as_str() {
            "--subscribers" => a.subscribers = n as usize,
            "--rate" => a.rate = n,
            "--fanout" => a.fanout = n as usize,
            "--seconds" => a.seconds = n,
            "--batch" => a.batch = n,
            other => {
                eprintln!("unknown flag {other}");
                std::process::exit(64)
            }
        }
    }
    a
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name; 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// The publish time written into a value: `{"t":<ns since start>,...}`.
fn stamp_of(text: &str) -> Option<u64> {
    let at = text.find("\"t\":")? + 4;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[tokio::main]
async fn main() {
    let a = args();
    let keys = a.subscribers; // one key per subscriber; each key watched by `fanout` of them
    let start = Instant::now();

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let origin_addr = listener.local_addr().expect("addr");
    let origin = Origin::new(OriginConfig {
        listen: origin_addr,
        topics: vec!["t".into()],
        ..OriginConfig::default()
    });
    {
        let origin = origin.clone();
        tokio::spawn(async move { origin.serve(listener, std::future::pending()).await });
    }
    let puts = (0..keys)
        .map(|i| Put::upsert(key(i), "{\"t\":0}"))
        .collect();
    origin.publish("t", puts).expect("seed");

    let mut cfg = SidecarConfig::default();
    cfg.listen.grpc = "127.0.0.1:0".parse().expect("literal");
    cfg.ws.max_connections = a.subscribers + 16;
    cfg.origins = vec![OriginSpec {
        name: "o".into(),
        address: format!("http://{origin_addr}"),
        fallback: Vec::new(),
        topics: vec![TopicSpec {
            name: "t".into(),
            mode: Mode::Full,
            max_bytes: None,
            idle: None,
        }],
        tls: None,
    }];
    let sidecar = Sidecar::start(cfg).await.expect("sidecar");
    sidecar.synced().await;
    let url = format!("ws://{}/ws", sidecar.http_addr());

    // Publish -> applied in the sidecar's store (no WebSocket), to split the latency.
    let published: Arc<std::sync::Mutex<std::collections::HashMap<u64, u64>>> = Arc::default();
    let applied = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
    ));
    let applied_task = {
        let source = sidecar.store().source("t").expect("source t").clone();
        let published = published.clone();
        let applied = applied.clone();
        tokio::spawn(async move {
            let mut rx = source.subscribe_changes();
            while rx.changed().await.is_ok() {
                let now = start.elapsed().as_nanos() as u64;
                let v = source.version();
                let t = published.lock().expect("map").remove(&v);
                if let Some(t) = t {
                    let _ = applied
                        .lock()
                        .expect("histogram")
                        .record(now.saturating_sub(t).max(1));
                }
            }
        })
    };
    // Publish -> out of the hub (an in-process watcher of every key): the sidecar without sockets.
    let hub_hist = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram"),
    ));
    let measuring_hub = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hub_task = {
        let source = sidecar.store().source("t").expect("source t").clone();
        let mut watcher = viewcar::hub::Watcher::new(
            sidecar.hub(),
            source,
            viewcar::hub::Selection::Prefix(String::new()),
            false,
            1 << 20,
        );
        let hub_hist = hub_hist.clone();
        let measuring = measuring_hub.clone();
        tokio::spawn(async move {
            while let Some(u) = watcher.next().await {
                let now = start.elapsed().as_nanos() as u64;
                if let viewcar::hub::Update::Row { value, .. } = u {
                    let t = std::str::from_utf8(&value).ok().and_then(stamp_of);
                    if let Some(t) = t.filter(|t| *t > 0) {
                        if measuring.load(Ordering::Relaxed) {
                            let _ = hub_hist
                                .lock()
                                .expect("histogram")
                                .record(now.saturating_sub(t).max(1));
                        }
                    }
                }
            }
        })
    };
    let frames = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..a.subscribers {
        // A small read buffer: tungstenite zeroes this much on every read, and these clients
        // share the process (and the CPU) with the sidecar being measured.
        let config = WebSocketConfig::default().read_buffer_size(16 << 10);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                .await
                .expect("connect");
        let watched: Vec<String> = (0..a.fanout).map(|j| key((i + j) % keys)).collect();
        ws.send(Message::text(
            json!({"op":"subscribe","id":i,"source":"t","keys":watched}).to_string(),
        ))
        .await
        .expect("subscribe");
        let frames = frames.clone();
        let measuring = measuring.clone();
        clients.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let now = start.elapsed().as_nanos() as u64;
                if let Some(t) = stamp_of(text.as_str()) {
                    if t > 0 && measuring.load(Ordering::Relaxed) {
                        let _ = h.record(now.saturating_sub(t).max(1));
                        frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            h
        }));
    }
    eprintln!(
        "{} subscribers connected ({} keys, each watched by {}); publishing {} changes/s in batches of {} for {} s (+1 s warm-up)",
        a.subscribers, keys, a.fanout, a.rate, a.batch, a.seconds
    );

    let batches_per_sec = (a.rate / a.batch).max(1);
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / batches_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = batches_per_sec * (a.seconds + 1);
    let mut next_key = 0usize;
    let mut cpu0 = 0.0;
    let mut t0 = Instant::now();
    let pad = "x".repeat(64);
    for b in 0..total {
        if b == batches_per_sec {
            measuring.store(true, Ordering::Relaxed);
            measuring_hub.store(true, Ordering::Relaxed);
            cpu0 = cpu_seconds();
            t0 = Instant::now();
        }
        tick.tick().await;
        let t = start.elapsed().as_nanos() as u64;
        let value = format!("{{\"t\":{t},\"pad\":\"{pad}\"}}");
        let puts = (0..a.batch)
            .map(|_| {
                next_key = (next_key + 1) % keys;
                Put::upsert(key(next_key), value.clone())
            })
            .collect();
        let pos = origin.publish("t", puts).expect("publish");
        if measuring.load(Ordering::Relaxed) {
            published.lock().expect("map").insert(pos.version, t);
        }
    }
    // Let the last changes arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(false, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let delivered = frames.load(Ordering::Relaxed);
    let hub = sidecar.hub().stats();
    let conflated = hub.conflated.load(Ordering::Relaxed);
    let resets = hub.lagged.load(Ordering::Relaxed);
    applied_task.abort();
    hub_task.abort();
    let hub_hist = hub_hist.lock().expect("histogram").clone();
    println!(
        "publish->out of the hub (in-process watcher of every key): p50 {:.0} us, p99 {:.0} us",
        hub_hist.value_at_quantile(0.5) as f64 / 1000.0,
        hub_hist.value_at_quantile(0.99) as f64 / 1000.0
    );
    let applied = applied.lock().expect("histogram").clone();
    sidecar.shutdown().await;
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    for c in clients {
        if let Ok(h) = c.await {
            all.add(h).expect("same bounds");
        }
    }
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "publish->applied in the sidecar (version watch, {} samples): p50 {:.0} us, p99 {:.0} us",
        applied.len(),
        applied.value_at_quantile(0.5) as f64 / 1000.0,
        applied.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!(
        "subscribers {} fanout {} rate {}/s batch {}: frames {} in {:.1} s = {:.0}/s; cpu {:.2} s => {:.0} frames per cpu-second",
        a.subscribers, a.fanout, a.rate, a.batch, delivered, wall, delivered as f64 / wall, cpu, delivered as f64 / cpu
    );
    println!(
        "latency publish->delivered: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us; conflated {conflated}, resets {resets}",
        us(0.5), us(0.9), us(0.99), us(0.999), all.max() as f64 / 1000.0
    );
}
