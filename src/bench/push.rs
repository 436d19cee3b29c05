//! Scenario `push`: WebSocket fan-out, with the sidecar's CPU time measured on its own.
//!
//! The sidecar is its own process, as everywhere in the harness, and the subscribers are
//! another (`viewcar bench push-clients`, [`push_clients`](super::push_clients)), so the CPU
//! seconds of the sidecar's process over the measured window (utime + stime from /proc) pay for
//! the frames it delivers and for nothing else. The harness publishes at the origin in its own
//! process, `--change-rate` changes per second, one key per change (one version each), cycling
//! over the keys; every key is watched by `--push-fanout` subscribers, so a change should become
//! that many frames.
//!
//! The window is agreed in advance on the wall clock both processes read ([`wall_ns`]): the
//! harness sends it to the subscribers before it begins, then reads both processes' CPU time
//! at its start and at its end. Figures: frames received in the window, frames per CPU second
//! of the sidecar, publish -> received latency of those frames, and the subscribers' CPU time
//! for reference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::watch;

use super::procs::{self, OriginHost, SidecarProc, SidecarSpec};
use super::push_clients::{key, wall_ns, Tally, SOURCE};
use super::report::{rate, us, Table};
use super::{BenchError, Ctx, PushProtocol};
use crate::origin::Put;

/// How far ahead of its start the window is announced, so the subscribers hold it in time.
const LEAD: Duration = Duration::from_millis(100);

fn value(t: u64) -> Bytes {
    // 64 bytes of padding: a value the size of a small row, as in the freshness run.
    Bytes::from(format!(r#"{{"t":{t},"pad":"{}"}}"#, "x".repeat(64)))
}

async fn sleep_until_wall(t: u64) {
    let now = wall_ns();
    if t > now {
        tokio::time::sleep(Duration::from_nanos(t - now)).await;
    }
}

fn cpu(p: &procs::Proc, what: &str) -> Result<f64, BenchError> {
    p.cpu_seconds().ok_or_else(|| {
        BenchError::setup(format!(
            "cannot read the CPU time of the {what} (/proc/<pid>/stat, Linux only)"
        ))
    })
}

pub async fn run(ctx: &mut Ctx) -> Result<(), BenchError> {
    let a = &ctx.args;
    let subscribers = if a.smoke {
        a.push_subscribers.min(20)
    } else {
        a.push_subscribers
    }
    .max(1);
    let fanout = a.push_fanout.clamp(1, subscribers);
    let asked = if a.smoke { 1000 } else { a.change_rate.max(1) };
    // At least a second, so the CPU time (in 10 ms ticks) is not all rounding.
    let run_for = ctx
        .run_for(Duration::from_secs(10))
        .max(Duration::from_secs(1));
    let warmup = ctx.warmup().max(Duration::from_millis(300));
    let keys = subscribers;

    let origin = OriginHost::start(&[SOURCE]).await?;
    let seed: Vec<Put> = (0..keys).map(|i| Put::upsert(key(i), value(0))).collect();
    for chunk in seed.chunks(5000) {
        origin
            .origin
            .publish(SOURCE, chunk.to_vec())
            .map_err(|e| BenchError::setup(e.to_string()))?;
    }
    let sidecar = SidecarProc::start(
        &ctx.exe,
        SidecarSpec {
            origin: origin.addr,
            topics: &[SOURCE],
            views: Vec::new(),
            http: true,
            redis: false,
            unix_grpc: false,
            ws_max_connections: Some(subscribers + 16),
        },
        Some((SOURCE, keys as u64)),
        Duration::from_secs(60),
    )
    .await?;
    let http = sidecar
        .http
        .ok_or_else(|| BenchError::setup("this build's sidecar has no http listener"))?;

    let protocol = a.push_protocol;
    let (what, channel) = match protocol {
        PushProtocol::Ws => ("WebSocket frame", "WebSocket subscribers"),
        PushProtocol::Watch => ("gRPC Watch event", "gRPC Watch streams"),
    };
    ctx.progress(format!(
        "push: {subscribers} {channel} (fanout {fanout}) connecting"
    ));
    let dir = procs::temp_dir("push-clients")?;
    let target = match protocol {
        PushProtocol::Ws => vec!["--ws-url".to_string(), format!("ws://{http}/ws")],
        PushProtocol::Watch => vec!["--grpc-addr".to_string(), sidecar.grpc.clone()],
    };
    let args: Vec<String> = vec![
        "bench".into(),
        "push-clients".into(),
        "--push-protocol".into(),
        protocol.name().into(),
    ]
    .into_iter()
    .chain(target)
    .chain([
        "--push-subscribers".into(),
        subscribers.to_string(),
        "--push-fanout".into(),
        fanout.to_string(),
    ])
    .collect();
    let (mut clients, stdout) = procs::spawn(&ctx.exe, &args, &dir.join("push-clients.log"), true)?;
    let stdout = stdout.ok_or_else(|| BenchError::setup("push-clients: no stdout"))?;
    let mut lines = procs::stdout_lines(stdout);
    let ready = procs::next_line(&mut lines, Duration::from_secs(120))
        .await
        .map_err(|e| BenchError::setup(format!("push-clients: {e}: {}", clients.log_tail())))?;
    if !ready.starts_with("ready ") {
        return Err(BenchError::setup(format!(
            "push-clients: unexpected line {ready:?}"
        )));
    }

    // The change generator: `asked` publishes per second, in 1 ms ticks, one key each.
    let (stop_tx, stop) = watch::channel(false);
    let published = Arc::new(AtomicU64::new(0));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let generator = {
        let origin = origin.origin.clone();
        let mut stop = stop.clone();
        let (published, errors) = (published.clone(), publish_errors.clone());
        tokio::spawn(async move {
            let per_ms = f64::from(asked) / 1000.0;
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
                    let k = key(sent as usize % keys);
                    if origin
                        .publish(SOURCE, vec![Put::upsert(k, value(wall_ns()))])
                        .is_err()
                    {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    sent += 1;
                }
                published.store(sent, Ordering::Relaxed);
            }
        })
    };

    ctx.progress(format!(
        "push: changes at {}, warming up",
        rate(f64::from(asked))
    ));
    tokio::time::sleep(warmup).await;
    let from = wall_ns() + LEAD.as_nanos() as u64;
    let until = from + run_for.as_nanos() as u64;
    clients.send_line(&format!("window {from} {until}"))?;
    ctx.progress(format!("push: measuring for {:.1}s", run_for.as_secs_f64()));
    sleep_until_wall(from).await;
    let (server0, client0) = (
        cpu(&sidecar.proc, "sidecar")?,
        cpu(&clients, "subscribers")?,
    );
    let published0 = published.load(Ordering::Relaxed);
    let t0 = Instant::now();
    sleep_until_wall(until).await;
    let (server1, client1) = (
        cpu(&sidecar.proc, "sidecar")?,
        cpu(&clients, "subscribers")?,
    );
    let published1 = published.load(Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    let _ = generator.await;
    // Frames read before `until` may still be on their way into a connection's tally.
    tokio::time::sleep(Duration::from_millis(100)).await;
    clients.send_line("report")?;
    let line = procs::next_line(&mut lines, Duration::from_secs(30))
        .await
        .map_err(|e| BenchError::setup(format!("push-clients: {e}: {}", clients.log_tail())))?;
    let tally: Tally = serde_json::from_str(&line)
        .map_err(|e| BenchError::setup(format!("push-clients report {line:?}: {e}")))?;
    drop(clients);
    drop(sidecar);
    drop(origin);

    let hist = tally.histogram();
    let q = |x: f64| hist.value_at_quantile(x) as f64 / 1000.0;
    let server_cpu = server1 - server0;
    let client_cpu = client1 - client0;
    let changes = published1 - published0;
    let achieved = changes as f64 / wall;
    let expected = changes * fanout as u64;
    let frames = tally.frames;
    let per_server_cpu = (server_cpu > 0.0).then(|| frames as f64 / server_cpu);

    let mut table = Table::new(
        format!(
            "push: publish at origin -> {what}, {subscribers} subscribers in their own process, fanout {fanout}, changes at {} ({} asked)",
            rate(achieved),
            rate(f64::from(asked))
        ),
        &[
            "frames",
            "frames/s",
            "sidecar CPU",
            "frames/sidecar CPU s",
            "clients CPU",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
        ],
    );
    table.row(vec![
        frames.to_string(),
        rate(frames as f64 / wall),
        format!("{server_cpu:.2}s"),
        per_server_cpu.map_or_else(|| "-".to_string(), |v| format!("{v:.0}")),
        format!("{client_cpu:.2}s"),
        us(q(0.5)),
        us(q(0.9)),
        us(q(0.99)),
        us(q(0.999)),
        us(hist.max() as f64 / 1000.0),
    ]);
    ctx.report.add_table(table);
    let figures = json!({
        "protocol": protocol.name(),
        "subscribers": subscribers,
        "fanout": fanout,
        "keys": keys,
        "rate": asked,
        "rate_achieved": achieved,
        "run_s": wall,
        "changes": changes,
        "frames": frames,
        "frames_expected": expected,
        "frames_per_s": frames as f64 / wall,
        // /proc counts CPU time in 10 ms ticks.
        "server_cpu_s": (server_cpu * 100.0).round() / 100.0,
        "client_cpu_s": (client_cpu * 100.0).round() / 100.0,
        "frames_per_server_cpu_s": per_server_cpu,
        "samples": hist.len(),
        "p50_us": q(0.5),
        "p90_us": q(0.9),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "max_us": hist.max() as f64 / 1000.0,
        "resets": tally.resets,
        "closed": tally.closed,
        "publish_errors": publish_errors.load(Ordering::Relaxed),
    });
    if let serde_json::Value::Object(m) = figures {
        for (k, v) in m {
            ctx.report.set("push", &k, v);
        }
    }
    if frames == 0 {
        ctx.report.note("push", "no frame arrived in the window");
    }
    if tally.resets > 0 || tally.closed > 0 {
        ctx.report.note(
            "push",
            format!(
                "{} subscriber resets and {} connections closed: they fell behind",
                tally.resets, tally.closed
            ),
        );
    }
    if frames < expected * 99 / 100 {
        ctx.report.note(
            "push",
            format!(
                "{frames} frames of {expected} published in the window: the rest were conflated \
                 (a newer value of the key replaced one still queued) or arrived after it"
            ),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
