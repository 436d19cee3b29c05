//! Scenario `freshness`: how long after a publish at the origin a change is visible
//! - to `Get` (a probe publishes, then reads with `min_version` = the published version: the
//!   read returns as soon as the sidecar applied it, so the figure includes one Get round trip);
//! - to gRPC `Watch` subscribers and to WebSocket `/ws` subscribers (every change of the topic).
//!
//! Changes are published at `--change-rate` per second, one version each. Each value carries
//! its publish time (`{"t":<ns>,...}`) on the harness's clock, and the harness is also the
//! subscriber, so one clock times both ends. The CPU the sidecar and the harness each use over
//! the measured window is reported beside the latencies: both share the machine's cores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::watch;

use super::load::{self, Samples};
use super::procs::{OriginHost, SidecarProc, SidecarSpec};
use super::report::{rate, us, Table};
use super::{BenchError, Ctx};
use crate::origin::Put;
use crate::pb::cache::v1 as pb;
use crate::pb::cache::v1::watch_event::Kind;

const KEYS: usize = 10_000;

fn key(i: usize) -> String {
    format!("k{i:05}")
}

/// The publish time in a value written by [`value`]: `{"t":123,...`.
fn stamp(v: &[u8]) -> Option<u64> {
    let rest = v.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn value(t: u64, i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"t":{t},"id":"{}","amount":{},"currency":"EUR"}}"#,
        key(i),
        (i * 7919 + t as usize) % 99_999
    ))
}

/// Each subscriber records into a histogram of its own (merged at the end): a shared one
/// behind a lock was contended by every frame of every subscriber.
fn record(h: &mut Histogram<u64>, from: u64, now: u64, t: u64) {
    if t >= from {
        h.saturating_record(now.saturating_sub(t).max(1));
    }
}

/// What a WebSocket subscriber reads of a frame: its type and the publish time in a change's
/// value. Read without building a JSON tree: the harness shares the machine with the sidecar,
/// and its own parsing of every frame was its largest cost.
#[derive(serde::Deserialize)]
struct WsFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    value: Option<Stamped>,
}

#[derive(serde::Deserialize)]
struct Stamped {
    t: Option<u64>,
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let change_rate = if ctx.args.smoke {
        1000
    } else {
        ctx.args.change_rate.max(1)
    };
    let subscribers = if ctx.args.smoke {
        2
    } else {
        ctx.args.subscribers.max(1)
    };
    let run_for = ctx.run_for(Duration::from_secs(10));
    let warmup = ctx.warmup().max(Duration::from_millis(200));

    let origin = OriginHost::start(&["prices"]).await?;
    let base = Instant::now();
    let now_ns = move || base.elapsed().as_nanos() as u64;
    let seed: Vec<Put> = (0..KEYS)
        .map(|i| Put::upsert(key(i), value(0, i)))
        .collect();
    for chunk in seed.chunks(5000) {
        origin
            .origin
            .publish("prices", chunk.to_vec())
            .map_err(|e| BenchError::setup(e.to_string()))?;
    }
    let sidecar = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: origin.addr,
            topics: &["prices"],
            views: Vec::new(),
            http: true,
            redis: false,
            unix_grpc: false,
            ws_max_connections: None,
        },
        Some(("prices", KEYS as u64)),
        Duration::from_secs(60),
    )
    .await?;

    let (stop_tx, stop) = watch::channel(false);
    let record_from = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let resets = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut watch_tasks = Vec::new();
    let mut ws_tasks = Vec::new();

    // gRPC Watch subscribers, every key of the topic.
    for c in sidecar.clients(subscribers).await? {
        let mut c = c;
        let stream = c
            .watch(pb::WatchRequest {
                source: "prices".into(),
                keys: Vec::new(),
                prefix: String::new(),
                send_initial: false,
            })
            .await
            .map_err(|e| BenchError::setup(format!("Watch: {e}")))?;
        let mut stream = stream.into_inner();
        let (from, resets, mut stop) = (record_from.clone(), resets.clone(), stop.clone());
        watch_tasks.push(tokio::spawn(async move {
            let mut h = load::histogram();
            loop {
                tokio::select! {
                    ev = stream.next() => match ev {
                        Some(Ok(pb::WatchEvent { kind: Some(Kind::Upsert(item)) })) => {
                            if let Some(t) = stamp(&item.value) {
                                record(&mut h, from.load(std::sync::atomic::Ordering::Relaxed), now_ns(), t);
                            }
                        }
                        Some(Ok(pb::WatchEvent { kind: Some(Kind::Reset(_)) })) => {
                            resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            h
        }));
    }

    // WebSocket subscribers, when this build serves /ws.
    let mut ws_ok = false;
    if let Some(http) = sidecar.http {
        let url = format!("ws://{http}/ws");
        for n in 0..subscribers {
            let (mut socket, _) = match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok(s) => s,
                Err(e) => {
                    ctx.report
                        .note("freshness", format!("WebSocket skipped: {url}: {e}"));
                    break;
                }
            };
            ws_ok = true;
            let sub = json!({"op":"subscribe","id":format!("s{n}"),"source":"prices","prefix":"","initial":false});
            socket
                .send(tokio_tungstenite::tungstenite::Message::text(
                    sub.to_string(),
                ))
                .await
                .map_err(|e| BenchError::setup(format!("WebSocket subscribe: {e}")))?;
            let (from, resets, mut stop) = (record_from.clone(), resets.clone(), stop.clone());
            ws_tasks.push(tokio::spawn(async move {
                let mut h = load::histogram();
                loop {
                    tokio::select! {
                        msg = socket.next() => match msg {
                            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                                let now = now_ns();
                                let Ok(f) = serde_json::from_str::<WsFrame<'_>>(text.as_str()) else { continue };
                                match &*f.kind {
                                    "change" => {
                                        if let Some(t) = f.value.and_then(|v| v.t) {
                                            record(&mut h, from.load(std::sync::atomic::Ordering::Relaxed), now, t);
                                        }
                                    }
                                    "reset" => {
                                        resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    }
                                    _ => {}
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        },
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                h
            }));
        }
    } else {
        ctx.report.note(
            "freshness",
            "WebSocket skipped: this build has no http listener",
        );
    }

    // The change generator: `change_rate` publishes per second, in 1 ms ticks.
    let published = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let generator = {
        let origin = origin.origin.clone();
        let mut stop = stop.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let per_ms = f64::from(change_rate) / 1000.0;
            let start = Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let due = (start.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
                while sent < due {
                    let i = (sent as usize * 7919) % KEYS;
                    let _ = origin.publish("prices", vec![Put::upsert(key(i), value(now_ns(), i))]);
                    sent += 1;
                }
                published.store(sent, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };

    // The Get probe: publish, then read with min_version until visible.
    let probe = {
        let origin = origin.origin.clone();
        let client = sidecar.client.clone();
        let mut stop = stop.clone();
        let from = record_from.clone();
        tokio::spawn(async move {
            let mut s = Samples::new();
            let mut i = 0usize;
            loop {
                if *stop.borrow() {
                    break;
                }
                let t = now_ns();
                let Ok(pos) = origin.publish("prices", vec![Put::upsert("probe", value(t, i))])
                else {
                    break;
                };
                let mut c = client.clone();
                let r = c
                    .get(pb::GetRequest {
                        source: "prices".into(),
                        key: "probe".into(),
                        options: Some(pb::ReadOptions {
                            min_version: pos.version,
                            wait_ms: 2000,
                            max_staleness_ms: 0,
                            after: Vec::new(),
                        }),
                    })
                    .await;
                let ok = r
                    .as_ref()
                    .map(|r| r.get_ref().item.as_ref().and_then(|it| stamp(&it.value)) >= Some(t));
                if t >= from.load(std::sync::atomic::Ordering::Relaxed) {
                    match ok {
                        Ok(true) => s.hist.saturating_record(now_ns().saturating_sub(t).max(1)),
                        Ok(false) => s.errors += 1,
                        Err(e) => {
                            s.errors += 1;
                            s.first_error.get_or_insert(e.to_string());
                        }
                    }
                }
                i += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            s
        })
    };

    ctx.progress(format!(
        "freshness: {change_rate} changes/s, {subscribers} Watch + {} WebSocket subscribers, warming up",
        if ws_ok { subscribers } else { 0 }
    ));
    tokio::time::sleep(warmup).await;
    let start_count = published.load(std::sync::atomic::Ordering::Relaxed);
    // The CPU each process uses over the window: the harness (origin, generator, subscribers)
    // shares the machine with the sidecar, and the latencies follow how busy both are.
    let cpu = || {
        (
            super::procs::cpu_secs(std::process::id()),
            super::procs::cpu_secs(sidecar.proc.pid()),
        )
    };
    let cpu0 = cpu();
    record_from.store(now_ns(), std::sync::atomic::Ordering::Relaxed);
    ctx.progress(format!(
        "freshness: measuring for {:.1}s",
        run_for.as_secs_f64()
    ));
    tokio::time::sleep(run_for).await;
    let end_count = published.load(std::sync::atomic::Ordering::Relaxed);
    let cpu1 = cpu();
    let harness_cpu_s = (cpu1.0 - cpu0.0) / run_for.as_secs_f64();
    let sidecar_cpu_s = (cpu1.1 - cpu0.1) / run_for.as_secs_f64();
    // Stop recording and publishing, then collect what each subscriber recorded.
    record_from.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    stop_tx.send_replace(true);
    let _ = generator.await;
    let probe_s = probe.await.map_err(|e| BenchError::setup(e.to_string()))?;
    let merged = |tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>| async move {
        let mut all = load::histogram();
        for t in tasks {
            let h = t.await.map_err(|e| BenchError::setup(e.to_string()))?;
            all.add(&h)
                .map_err(|e| BenchError::setup(format!("merging histograms: {e}")))?;
        }
        Ok::<_, BenchError>(all)
    };
    let watch_hist = merged(watch_tasks).await?;
    let ws_hist = merged(ws_tasks).await?;
    let achieved = (end_count - start_count) as f64 / run_for.as_secs_f64();

    let mut table = Table::new(
        format!(
            "freshness: publish at origin -> visible, changes at {} ({} asked), {subscribers} subscribers per channel; CPU-s per s: sidecar {sidecar_cpu_s:.2}, harness {harness_cpu_s:.2}",
            rate(achieved),
            rate(f64::from(change_rate))
        ),
        &["visible to", "samples", "p50", "p90", "p99", "p99.9", "max"],
    );
    let mut channels: Vec<(&str, Histogram<u64>)> =
        vec![("Get (min_version)", probe_s.hist.clone())];
    channels.push(("gRPC Watch", watch_hist));
    if ws_ok {
        channels.push(("WebSocket", ws_hist));
    }
    for (name, h) in &channels {
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        table.row(vec![
            name.to_string(),
            h.len().to_string(),
            us(q(0.5)),
            us(q(0.9)),
            us(q(0.99)),
            us(q(0.999)),
            us(h.max() as f64 / 1000.0),
        ]);
        let quantiles: Vec<f64> = (1..100)
            .map(|i| f64::from(i) / 100.0)
            .chain([0.995, 0.999, 0.9999, 1.0])
            .collect();
        let cdf: Vec<[f64; 2]> = quantiles.iter().map(|&x| [q(x), x]).collect();
        ctx.report.push(
            "freshness",
            "channels",
            json!({"channel": name, "samples": h.len(), "p50_us": q(0.5), "p90_us": q(0.9),
                   "p99_us": q(0.99), "p999_us": q(0.999), "max_us": h.max() as f64 / 1000.0, "cdf": cdf}),
        );
    }
    ctx.report.add_table(table);
    ctx.report.set(
        "freshness",
        "params",
        json!({"change_rate_asked": change_rate, "change_rate_achieved": achieved, "subscribers": subscribers,
               "run_s": run_for.as_secs_f64(), "probe_errors": probe_s.errors,
               "sidecar_cpu_s_per_s": sidecar_cpu_s, "harness_cpu_s_per_s": harness_cpu_s,
               "subscriber_resets": resets.load(std::sync::atomic::Ordering::Relaxed)}),
    );
    if probe_s.errors > 0 {
        ctx.report.note(
            "freshness",
            format!(
                "{} Get probes failed: {}",
                probe_s.errors,
                probe_s.first_error.unwrap_or_default()
            ),
        );
    }
    drop(sidecar);
    drop(origin);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_reads_back_the_publish_time() {
        assert_eq!(stamp(&value(123_456, 7)), Some(123_456));
        assert_eq!(stamp(b"{\"x\":1}"), None);
    }
}
